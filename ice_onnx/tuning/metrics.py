"""Budget metrics: how far a converted model's final outputs are from the original's.

Every metric is taken per calibration sample (axis 0 of each judged output) and the
plan is judged by its worst sample:

- `cosine`: cosine of the sample's whole output (flattened) to the original's; budget
  is a floor (e.g. 0.99);
- `row-cosine`: the worst row along the last axis (one token's hidden state, one
  position's logits); a floor, stricter than `cosine`;
- `max-abs`: the largest absolute error; budget is a ceiling.

`damage` turns a score into "how much worse than perfect" (1 − cosine, or the error),
the quantity the search adds up over layers to rank settings.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ice_onnx.evaluation import fidelity


@dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool

    def sample_scores(self, reference: np.ndarray, candidate: np.ndarray, samples: int) -> np.ndarray:
        """One score per sample (one for the whole output when axis 0 is not the samples)."""
        reference = np.asarray(reference, dtype=np.float64)
        candidate = np.asarray(candidate, dtype=np.float64)
        if reference.ndim == 0 or reference.shape[0] != samples:
            reference, candidate = reference.reshape(1, -1), candidate.reshape(1, -1)
        flat_ref, flat_got = reference.reshape(len(reference), -1), candidate.reshape(len(candidate), -1)
        if self.name == "cosine":
            scores = fidelity.cosine_rows(flat_ref, flat_got)
        elif self.name == "row-cosine":
            rows = fidelity.cosine_rows(reference, candidate).reshape(len(reference), -1)
            scores = rows.min(axis=1, initial=1.0)
        else:
            scores = np.abs(flat_ref - flat_got).max(axis=1, initial=0.0)
        return np.where(np.isnan(scores), self.worst, scores)

    @property
    def worst(self) -> float:
        return -np.inf if self.higher_is_better else np.inf

    def combine(self, scores) -> float:
        """The worst of several scores."""
        scores = list(scores)
        if not scores:
            return 1.0 if self.higher_is_better else 0.0
        return float(min(scores) if self.higher_is_better else max(scores))

    def meets(self, score: float, budget: float) -> bool:
        return score >= budget if self.higher_is_better else score <= budget

    def damage(self, score: float) -> float:
        return 1.0 - score if self.higher_is_better else score

    def check_budget(self, budget: float) -> None:
        if self.higher_is_better and not -1.0 <= budget <= 1.0:
            raise ValueError(f"a {self.name} budget is a floor in [-1, 1], not {budget}")
        if not self.higher_is_better and budget < 0:
            raise ValueError(f"a {self.name} budget is a ceiling >= 0, not {budget}")


METRICS = {m.name: m for m in (Metric("cosine", True), Metric("row-cosine", True), Metric("max-abs", False))}
DEFAULT_BUDGETS = {"cosine": 0.99, "row-cosine": 0.99}
