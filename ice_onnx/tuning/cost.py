"""The cost model: the expected attention work of a block under a setting.

The unit is one length-D vector product: scoring one key for one query, or adding one
weighted value row. Per query head and query, with v the keys it may see:

- exact:  2·v (score every visible key, add every value row);
- kNN (the cluster index, as the kernel runs it):
      C                                   score the index's centroids (C = `clusters`, 0 → round(√n))
    + 2·min(v, max(scan_min, scan_fraction·v))  score and attend the keys of the clusters it scans
                                          (scan_min 0 → top_k)
    + 2·min(v, sinks + window + 8)  if causal, else 2·min(v, sinks)   the keys always attended
    + 2·T  if compensate                  score the T tail means, add their value sums
                                          (T = `tail_clusters`, 0 → the index's C clusters)
  plus, once per (batch row, kv head) and shared by its query heads, the builds:
    kmeans(n, C), and with compensation and T set apart from C: kmeans(C, T) when C >= T
    (the index's clusters grouped), else kmeans(n, T); kmeans(n, k) = iters·min(n, 32k)·k + n·k
    (Lloyd iterations on a sample of 32 points per cluster, then every point assigned once).

n is the keys the batch row's padding mask allows, v = n for a bidirectional block and
the causal prefix (scaled by n/Sk) for a causal one. A call the kernel routes to exact
attention (contract `uses_knn`: too few keys or queries, a mask other than key padding)
costs what exact costs. The model counts arithmetic, not memory traffic or the index's
bookkeeping, so it ranks settings rather than predicting seconds: at a few hundred keys
the measured kernel is slower than dense attention even where this model says cheaper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ice_onnx.custom_ops.contract import TAIL_TILE, Attributes, is_key_padding_mask

KMEANS_SAMPLE_PER_CLUSTER = 32  # custom_ops/src/kmeans.cc


@dataclass(frozen=True)
class BlockGeometry:
    """What the cost of one attention node depends on, read from a captured run."""

    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    k_len: int
    causal: bool
    key_padding_only: bool  # no mask, or a key-padding mask (kNN may run)
    allowed_keys: tuple[int, ...]  # per batch row

    @classmethod
    def from_tensors(cls, q: np.ndarray, k: np.ndarray, mask: np.ndarray | None, causal: bool) -> "BlockGeometry":
        batch, q_heads, q_len, _ = q.shape
        kv_heads, k_len = k.shape[1], k.shape[2]
        padding_only = mask is None or is_key_padding_mask(mask, batch, k_len)
        allowed = [k_len] * batch
        if mask is not None and padding_only:
            keep = mask if mask.dtype == bool else mask == 0
            keep = np.broadcast_to(keep.reshape((1,) * (4 - keep.ndim) + keep.shape), (batch, 1, 1, k_len))
            allowed = keep.reshape(batch, k_len).sum(axis=1).tolist()
        return cls(batch, q_heads, kv_heads, q_len, k_len, bool(causal), padding_only, tuple(int(n) for n in allowed))

    @property
    def group(self) -> int:
        return self.q_heads // self.kv_heads

    def visible_keys(self) -> np.ndarray:
        """[batch, q_len] keys each query may see."""
        allowed = np.asarray(self.allowed_keys, dtype=np.float64)[:, None]
        if not self.causal:
            return np.broadcast_to(allowed, (self.batch, self.q_len)).copy()
        prefix = np.minimum(np.arange(self.q_len) + self.k_len - self.q_len + 1, self.k_len)
        return np.maximum(prefix[None, :], 0) * allowed / max(self.k_len, 1)

    def runs_knn(self, attributes: Attributes) -> bool:
        return attributes.uses_knn(self.k_len, self.q_len * self.group, self.key_padding_only)


def exact_cost(geometry: BlockGeometry) -> float:
    return float(2.0 * geometry.q_heads * geometry.visible_keys().sum())


def attention_cost(geometry: BlockGeometry, attributes: Attributes) -> float:
    """The block's work under `attributes` (units: length-D vector products)."""
    if not geometry.runs_knn(attributes):
        return exact_cost(geometry)
    visible = geometry.visible_keys()
    allowed = np.asarray(geometry.allowed_keys, dtype=np.float64)
    centroids = np.array([_index_clusters(attributes, n) for n in allowed])[:, None]
    scanned = attributes.scan_budget(visible, geometry.k_len)
    always = attributes.sinks + (attributes.window + TAIL_TILE / 2 if geometry.causal else 0)
    tail = np.array([attributes.effective_tail_clusters(int(n), _index_clusters(attributes, n))
                     if attributes.compensate else 0 for n in allowed])[:, None]
    per_query = centroids + 2 * scanned + 2 * np.minimum(always, visible) + 2 * tail
    builds = sum(_kmeans_cost(n, _index_clusters(attributes, n), attributes.kmeans_iters)
                 + _tail_build_cost(attributes, n, int(t)) for n, t in zip(allowed, tail[:, 0]))
    return float(geometry.q_heads * per_query.sum() + geometry.kv_heads * builds)


def _tail_build_cost(attributes: Attributes, keys: float, tail: int) -> float:
    """The tail summary groups the cluster index's clusters when there are at least
    `tail` of them (k-means over their centroids), else clusters every key."""
    fine = _index_clusters(attributes, keys)
    if not tail or (attributes.index == "cluster" and tail == fine):  # the index's clusters as they are
        return 0.0
    points = fine if attributes.index == "cluster" and fine >= tail else keys
    return _kmeans_cost(points, tail, attributes.kmeans_iters)


def _index_clusters(attributes: Attributes, keys: float) -> int:
    wanted = attributes.clusters if attributes.clusters > 0 else round(math.sqrt(keys))
    return int(max(1, min(wanted, keys)))


def _kmeans_cost(keys: float, clusters: int, iterations: int) -> float:
    clusters = min(clusters, keys)
    sample = min(keys, max(clusters, KMEANS_SAMPLE_PER_CLUSTER * clusters))
    return float(iterations * sample * clusters + keys * clusters)
