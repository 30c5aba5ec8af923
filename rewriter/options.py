"""How blocks are converted: the options of one conversion, a tuning plan's per-block settings, a block selection."""

from __future__ import annotations

import dataclasses
import json

from ice_onnx.commands.params import INT64_MAX  # node attributes are int64; the CLI bounds its options alike
from ice_onnx.custom_ops import contract
from ice_onnx.errors import first_line


@dataclasses.dataclass
class ConvertOptions:
    top_k: int = contract.Attributes.top_k
    exact_below: int = contract.Attributes.exact_below
    seed: int = contract.Attributes.seed
    compensate: int = contract.Attributes.compensate
    layers: BlockSelection | frozenset[int] | None = None  # block indices to convert (`in`); None = all
    # Per-block settings (a tuning plan): block index -> {"top_k", "exact_below", "compensate"}.
    plan: dict[int, dict[str, int]] = dataclasses.field(default_factory=dict)

    def for_block(self, index: int) -> dict[str, int]:
        settings = {"top_k": self.top_k, "exact_below": self.exact_below, "compensate": self.compensate}
        settings.update(self.plan.get(index, {}))
        return settings


PLAN_KEYS = ("top_k", "exact_below", "compensate")
# The smallest value of each plan key and of a block index.
PLAN_MINIMUM = {"index": 0, "top_k": 1, "exact_below": 0, "compensate": 0}


def parse_plan(text: str) -> dict[int, dict[str, int]]:
    """A plan file: {"blocks": [{"index": 0, "top_k": 64}, {"index": 3, "exact_below": 2147483647}, ...]}.

    Values are JSON integers within int64 (compensate 0 or 1); anything else is a ValueError."""
    try:
        document = json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than the parser's stack
        raise ValueError(f"bad plan: not JSON ({first_line(exc, 120)})") from None
    blocks = document.get("blocks") if isinstance(document, dict) else None
    if not isinstance(blocks, list):
        raise ValueError('bad plan: expected {"blocks": [{"index": 0, ...}, ...]}')
    plan = {}
    for entry in blocks:
        if not isinstance(entry, dict) or "index" not in entry:
            raise ValueError("bad plan: every block is an object with an index")
        unknown = set(entry) - {"index", *PLAN_KEYS}
        if unknown:
            raise ValueError(f"bad plan: unknown plan keys {sorted(unknown)}")
        settings = {key: _plan_integer(key, entry[key]) for key in PLAN_KEYS if key in entry}
        plan[_plan_integer("index", entry["index"])] = settings
    return plan


def _plan_integer(key: str, value) -> int:
    highest = 1 if key == "compensate" else INT64_MAX
    if isinstance(value, bool) or not isinstance(value, int) or not PLAN_MINIMUM[key] <= value <= highest:
        raise ValueError(f"bad plan: {key} must be an integer from {PLAN_MINIMUM[key]} to {highest}, "
                         f"not {str(value)[:40]}")
    return value


@dataclasses.dataclass(frozen=True)
class BlockSelection:
    """Block indices as ranges (first, last), last None for open-ended: membership is tested
    without building the set, so `0-100000000000` costs nothing."""

    ranges: tuple[tuple[int, int | None], ...]

    def __contains__(self, index: int) -> bool:
        return any(first <= index and (last is None or index <= last) for first, last in self.ranges)


def parse_layers(spec: str) -> BlockSelection:
    """'0-3,6,9-' style block selection (0-based, in graph order; 'N-' = N and after)."""
    ranges = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        start, dash, end = part.partition("-")
        try:
            first = int(start) if start else 0
            last = (int(end) if end else None) if dash else first
        except ValueError:
            raise ValueError(f"bad layer selection {part[:40]!r} (use e.g. 0-3,6,9-)") from None
        if first < 0 or (last is not None and last < first):
            raise ValueError(f"bad layer range {part[:40]!r}")
        ranges.append((first, last))
    return BlockSelection(tuple(ranges))
