"""Model recipes: exports and trainings behind the shipped test fixtures and demos."""
