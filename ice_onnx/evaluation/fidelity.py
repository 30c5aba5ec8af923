"""Fidelity metrics: how far a converted model's numbers are from the original's."""

from __future__ import annotations

import numpy as np


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows along the last axis (1 where both rows are zero)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    dots = (a * b).sum(axis=-1)
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    both_zero = (norms == 0) & (dots == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(both_zero, 1.0, dots / norms)


def compare(reference: np.ndarray, candidate: np.ndarray, *, logits: bool = False) -> dict:
    """Errors of `candidate` against `reference` (same shape).

    `cosine` is over the whole flattened tensor, `min_row_cosine` the worst row along the
    last axis (one token's hidden state, one query's output); `top1_agreement` (logits
    only) is the share of positions whose arg-max over the last axis is unchanged.
    """
    reference = np.asarray(reference, dtype=np.float64)
    candidate = np.asarray(candidate, dtype=np.float64)
    if reference.shape != candidate.shape:
        raise ValueError(f"shapes differ: {reference.shape} vs {candidate.shape}")
    error = np.abs(candidate - reference)
    result = {
        "max_abs_error": float(error.max(initial=0.0)),
        "mean_abs_error": float(error.mean()) if error.size else 0.0,
        "cosine": float(cosine_rows(reference.ravel(), candidate.ravel())),
        "min_row_cosine": float(cosine_rows(reference, candidate).min(initial=1.0))
        if reference.ndim else float(cosine_rows(reference.ravel(), candidate.ravel())),
        "top1_agreement": None,
    }
    if logits:
        result["top1_agreement"] = float(np.mean(reference.argmax(-1) == candidate.argmax(-1)))
    return result


def looks_like_logits(name: str) -> bool:
    return "logit" in name.lower()


def mean_pool(hidden: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Sentence embeddings: mean of the hidden states over unmasked tokens, L2-normalised."""
    weights = np.asarray(attention_mask, dtype=np.float64)[..., None]
    pooled = (np.asarray(hidden, dtype=np.float64) * weights).sum(axis=1) / np.maximum(
        weights.sum(axis=1), 1e-9)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def nearest_neighbours(embeddings: np.ndarray) -> np.ndarray:
    """Index of each row's most similar other row (cosine; rows are L2-normalised)."""
    similarity = embeddings @ embeddings.T
    np.fill_diagonal(similarity, -np.inf)
    return similarity.argmax(axis=1)


def softmax_mass(probabilities: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """Per row, the probability mass on the `chosen` (bool, same shape) entries."""
    return np.where(chosen, probabilities, 0.0).sum(axis=-1)


def top_k_recall(retrieved: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    """Per row, the share of the exact top-k (by `scores`, -inf = not a candidate) retrieved.

    Ties are fair: a retrieved key counts when its score is at least the k-th largest, so
    any of several equal keys will do (up to k hits). 1 where no key is a candidate.
    """
    candidates = np.isfinite(scores).sum(axis=-1)
    wanted = np.minimum(k, candidates)
    order = -np.sort(-scores, axis=-1)
    kth = np.take_along_axis(order, np.maximum(wanted - 1, 0)[..., None], axis=-1)
    hits = (retrieved & (scores >= kth) & np.isfinite(scores)).sum(axis=-1)
    return np.where(wanted > 0, np.minimum(hits, wanted) / np.maximum(wanted, 1), 1.0)
