"""all-MiniLM-L6-v2: the export recipe and the offline English corpus its evaluation uses."""
