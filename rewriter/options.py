"""How blocks are converted: the options of one conversion, a tuning plan's per-block settings, a block selection."""

from __future__ import annotations

import dataclasses
import json
import math

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
    # Per-block settings (a tuning plan): block index -> {PLAN_KEYS key: value}.
    plan: dict[int, dict[str, int | float]] = dataclasses.field(default_factory=dict)
    # The kernel's accuracy guard (CONTRACT.md). None: the attribute stays off the node, so the
    # kernel's own default applies and a converted file follows the kernel it runs on.
    probe_rows: int | None = None
    max_error: float | None = None

    def for_block(self, index: int) -> dict[str, int | float]:
        """The block's settings: these options, overridden by the plan's entry for the block.
        The guard's keys appear only where set."""
        settings = {"top_k": self.top_k, "exact_below": self.exact_below, "compensate": self.compensate}
        settings.update({key: value for key, value in (("probe_rows", self.probe_rows), ("max_error", self.max_error))
                         if value is not None})
        settings.update(self.plan.get(index, {}))
        return settings


PLAN_KEYS = ("top_k", "exact_below", "compensate", "probe_rows", "max_error")
# Each plan key's (and a block index's) type and range; the guard's are the contract's.
PLAN_BOUNDS = {
    "index": (int, 0, INT64_MAX),
    "top_k": (int, 1, INT64_MAX),
    "exact_below": (int, 0, INT64_MAX),
    "compensate": (int, 0, 1),
    "probe_rows": (int, 0, contract.MAX_PROBE_ROWS),
    "max_error": (float, 0.0, math.inf),
}


def parse_plan(text: str) -> dict[int, dict[str, int | float]]:
    """A plan file: {"blocks": [{"index": 0, "top_k": 64}, {"index": 3, "exact_below": 2147483647}, ...]}.

    Values are JSON numbers within PLAN_BOUNDS (integers but for max_error, which is finite);
    anything else is a ValueError."""
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
        settings = {key: plan_value(key, entry[key]) for key in PLAN_KEYS if key in entry}
        plan[plan_value("index", entry["index"])] = settings
    return plan


def plan_value(key: str, value) -> int | float:
    """`value` checked against PLAN_BOUNDS[key] (ValueError, one line, if out of them)."""
    kind, least, greatest = PLAN_BOUNDS[key]
    if kind is float:
        # JSON has no NaN or infinity, but Python's parser reads them: refused as not finite.
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not least <= value < greatest:
            raise ValueError(f"bad plan: {key} must be a finite number >= {least:g}, not {str(value)[:40]}")
        return float(value)
    if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= greatest:
        raise ValueError(f"bad plan: {key} must be an integer from {least} to {greatest}, not {str(value)[:40]}")
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
