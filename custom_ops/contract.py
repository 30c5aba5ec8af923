"""The IceKNNAttention contract in Python (mirrors CONTRACT.md and src/contract.h).

The rewriter builds nodes from these names; the numpy reference and the tests
read the same defaults, so a change to the contract is made here once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

DOMAIN = "ai.iceformer"
OP_TYPE = "IceKNNAttention"
VERSION = 1

INPUTS = ("Q", "K", "V", "attn_mask")  # attn_mask is optional
OUTPUTS = ("Y",)

ALWAYS_EXACT = 2147483647  # exact_below value that keeps a block exact at any length


@dataclass(frozen=True)
class Attributes:
    """The op's attributes with the contract's defaults (index parameters excluded)."""

    scale: float = 0.0  # <= 0 means 1/sqrt(D)
    is_causal: int = 0
    top_k: int = 32
    exact_below: int = 1024
    seed: int = 0
    compensate: int = 1

    def resolved_scale(self, head_dim: int) -> float:
        return self.scale if self.scale > 0 else 1.0 / math.sqrt(head_dim)

    def uses_knn(self, num_keys: int) -> bool:
        """Whether the kNN path applies to `num_keys` keys (otherwise exact attention)."""
        return num_keys >= self.exact_below and self.top_k < num_keys

    @classmethod
    def from_node_attributes(cls, attrs: dict) -> "Attributes":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in attrs.items() if k in known})

    def as_node_attributes(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}
