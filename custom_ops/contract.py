"""The IceKNNAttention contract in Python (mirrors CONTRACT.md and src/contract.h).

The rewriter builds nodes from these names; the numpy reference and the tests
read the same defaults, so a change to the contract is made here once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

DOMAIN = "ai.iceformer"
OP_TYPE = "IceKNNAttention"
VERSION = 1

INPUTS = ("Q", "K", "V", "attn_mask", "key_lengths")  # attn_mask and key_lengths are optional
OUTPUTS = ("Y",)

ALWAYS_EXACT = 2147483647  # exact_below value that keeps a block exact at any length
INDEXES = ("cluster", "dci")
EMPTY_ROWS = ("mean", "zero")  # what a row with no allowed key outputs
# Every query scores every centroid and a causal summary snapshots them all: bounded.
MAX_CLUSTERS = 1024
MAX_TAIL_CLUSTERS = 1024
# The accuracy guard probes at most this many rows per head.
MAX_PROBE_ROWS = 4096
# kNN runs only below these magnitudes (the index's float32 sums stay finite);
# |V| is bounded by VALUE_MAGNITUDE_BUDGET / keys.
MAX_KNN_QK_MAGNITUDE = 1e12
VALUE_MAGNITUDE_BUDGET = 1e30
# A float key-padding mask holds 0 (keep) or values at most this (block), e.g. finfo.min.
BLOCKING_BIAS = -1e30
# Causal kNN queries go in tiles of this many rows sharing one boundary (CONTRACT.md).
TAIL_TILE = 16
# The cluster index runs only where its scan covers at most 1/this of the keys.
MIN_KEYS_PER_SCANNED = 8
# The cluster index's default scan covers at least this many clusters' worth of keys.
MIN_SCANNED_CLUSTERS = 2


@dataclass(frozen=True)
class Attributes:
    """The op's attributes with the contract's defaults."""

    scale: float = 0.0  # <= 0 means 1/sqrt(D)
    is_causal: int = 0
    softcap: float = 0.0  # > 0: scores s -> softcap * tanh(s / softcap), before the mask
    sliding_window: int = 0  # > 0: a query sees the keys (p - sliding_window, p], p its aligned position
    empty_rows: str = "mean"  # a row with no allowed key: "mean" of V or "zero" (ONNX Attention)
    top_k: int = 1024
    exact_below: int = 2048
    seed: int = 0
    compensate: int = 1
    index: str = "cluster"
    # index parameters (meaning and measurements in CONTRACT.md / src/contract.h)
    clusters: int = 0
    kmeans_iters: int = 4
    scan_fraction: float = 0.0
    scan_min: int = 0
    tail_clusters: int = 0
    # keys every query attends exactly, and the accuracy guard (CONTRACT.md)
    sinks: int = 4
    window: int = 64
    probe_rows: int = 32
    max_error: float = 0.02

    def scan_floor(self, keys: int) -> int:
        """The cluster index's least scan per query over `keys` keys: `scan_min` as it is, or
        by default top_k but at least MIN_SCANNED_CLUSTERS clusters' worth (sqrt(keys) keys
        each unless `clusters` is set; that part at most an eighth of the keys, the most kNN
        mode scans): a query's best keys spread over several clusters."""
        if self.scan_min > 0:
            return self.scan_min
        keys = max(keys, 0)
        per_cluster = -(-keys // self.clusters) if self.clusters > 0 else math.ceil(math.sqrt(keys))
        return max(self.top_k, min(MIN_SCANNED_CLUSTERS * per_cluster, keys // MIN_KEYS_PER_SCANNED))

    def index_budget(self, keys: int) -> int:
        """The least work per kNN query over `keys` keys: the index's least retrieval (the
        cluster index's scan floor, DCI's top_k) or an explicit `clusters` (each query scores
        every centroid), whichever is larger."""
        floor = self.scan_floor(keys) if self.index == "cluster" else self.top_k
        return max(floor, self.clusters)

    def scan_budget(self, visible_keys, keys: int):
        """Keys a query of the cluster index scores, and attends, in a call over `keys` keys
        (numpy arrays of visible keys welcome)."""
        floor = self.scan_floor(keys)
        budget = np.maximum(floor, np.round(self.scan_fraction * visible_keys))
        return np.minimum(visible_keys, budget)

    def effective_tail_clusters(self, keys: int, index_clusters: int = 0) -> int:
        """Clusters of the tail summary for `keys` allowed keys: by the key count, and at
        least the index's own (`index_clusters`, 0 if it has none)."""
        if self.tail_clusters > 0:
            return self.tail_clusters
        return max(index_clusters, int(min(max(65536 // max(keys, 1), 32), 128)))

    def always_attended(self, num_queries: int, num_keys: int, causal: bool) -> np.ndarray:
        """Bool [Sq, Sk]: the keys kNN mode attends exactly whatever the index finds — the
        first `sinks`, and when causal every key from the tile's boundary on (the
        `window` keys before the query's tile of TAIL_TILE rows, and the tile's own).
        Causality still applies on top."""
        keys = np.arange(num_keys)[None, :]
        always = np.broadcast_to(keys < self.sinks, (num_queries, num_keys))
        if causal:
            tile_start = np.arange(num_queries) // TAIL_TILE * TAIL_TILE
            boundary = np.clip(tile_start + num_keys - num_queries + 1 - self.window, 0, num_keys)
            always = always | (keys >= boundary[:, None])
        return always

    def resolved_scale(self, head_dim: int) -> float:
        return self.scale if self.scale > 0 else 1.0 / math.sqrt(head_dim)

    def uses_knn(self, num_keys: int, queries_per_kv_head: int | None = None, key_padding_only: bool = True) -> bool:
        """Whether a call takes the kNN path (CONTRACT.md, "kNN mode"); otherwise it is exact.

        `queries_per_kv_head` is Sq·Hq/Hkv (None: assume enough queries);
        `key_padding_only` is False when the mask is anything but a key-padding mask.
        """
        if num_keys < self.exact_below or self.top_k >= num_keys or not key_padding_only:
            return False
        if self.softcap > 0 or 0 < self.sliding_window < num_keys:
            return False  # exact honours both; a window already bounds its work
        if num_keys < MIN_KEYS_PER_SCANNED * self.index_budget(num_keys) or MIN_KEYS_PER_SCANNED * self.scan_fraction > 1:
            return False  # a query would score more than an eighth of the keys
        if self.sinks + (self.window if self.is_causal else 0) >= num_keys:
            return False  # every key is attended exactly anyway
        return queries_per_kv_head is None or queries_per_kv_head >= 4.0 * math.sqrt(num_keys)

    @classmethod
    def from_node_attributes(cls, attrs: dict) -> "Attributes":
        return cls(**{k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items() if k in ATTRIBUTE_NAMES})

    def as_node_attributes(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


ATTRIBUTE_NAMES = tuple(f.name for f in fields(Attributes))


class UnknownAttributeError(ValueError):
    """An attribute name the contract does not define."""


def unknown_attributes(node) -> list[str]:
    """Names of the attributes an IceKNNAttention node (onnx.NodeProto) carries that the
    contract does not define. ONNX Runtime cannot refuse them (it gives custom ops
    unchecked attributes and the kernel can only ask for names it knows), so a misspelt
    `is_casual` would silently run with the default: tools that write or check models
    call this instead."""
    return sorted(a.name for a in node.attribute if a.name not in ATTRIBUTE_NAMES)


def refuse_unknown_attributes(names, where: str = OP_TYPE) -> None:
    """UnknownAttributeError naming every name in `names` the contract does not define, and
    the names it does (see `unknown_attributes` for why the kernel cannot do this itself)."""
    unknown = sorted(set(names) - set(ATTRIBUTE_NAMES))
    if unknown:
        raise UnknownAttributeError(f"{where}: unknown attribute{'s' if len(unknown) > 1 else ''} "
                                    f"{', '.join(unknown)} (the contract defines {', '.join(ATTRIBUTE_NAMES)})")


def refuse_unknown_node_attributes(node) -> None:
    """`refuse_unknown_attributes` for the attributes of an IceKNNAttention node (onnx.NodeProto)."""
    refuse_unknown_attributes((a.name for a in node.attribute), f"{OP_TYPE} node {node.name or node.output[0]!r}")


def is_key_padding_mask(mask, batch: int, num_keys: int) -> bool:
    """Whether `mask` (bool or float array, broadcastable to [B, Hq, Sq, Sk]) only removes keys.

    Its shape must be [B or 1, 1, 1, Sk] (after numpy's left-padding with 1s) and,
    for a float mask, every value 0 or blocking.
    """
    shape = (1,) * (4 - mask.ndim) + tuple(mask.shape)
    if shape[1] != 1 or shape[2] != 1 or shape[0] not in (1, batch) or shape[3] not in (1, num_keys):
        return False
    if mask.dtype == bool:
        return True
    return bool(((mask == 0) | (mask <= BLOCKING_BIAS)).all())
