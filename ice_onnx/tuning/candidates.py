"""The settings the tuner may give a block: exact attention, or a kNN setting.

A candidate spec is a `;`-separated list of terms: `exact` and `key=v1,v2,...` lists,
e.g. "exact;top_k=256,512,1024,2048;compensate=on,off". The kNN candidates are every
combination of the listed values. Exact is always a candidate (the back-off of last
resort), whether the spec names it or not. Keys are the per-block settings of a kNN
block the tuner measures (TUNABLE); `exact_below` it sets itself, and the accuracy guard
(`probe_rows`, `max_error`, which a plan may also set) it leaves to the kernel.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from ice_onnx.custom_ops.contract import ALWAYS_EXACT, Attributes

TUNABLE = ("top_k", "compensate")

DEFAULT_SPEC = "exact;top_k=256,512,1024,2048;compensate=on,off"
SWITCHES = {"on": 1, "off": 0, "1": 1, "0": 0, "true": 1, "false": 0}


@dataclass(frozen=True, order=True)
class Candidate:
    """One setting of a block: `settings` is empty for exact attention."""

    settings: tuple[tuple[str, int | float], ...] = ()

    @property
    def is_exact(self) -> bool:
        return not self.settings

    @property
    def label(self) -> str:
        if self.is_exact:
            return "exact"
        return " ".join(f"{key}={_show(key, value)}" for key, value in self.settings)

    def plan_settings(self, knn_from: int) -> dict[str, int | float]:
        """The block's entry in a plan (without its index): kNN from `knn_from` keys up."""
        if self.is_exact:
            return {"exact_below": ALWAYS_EXACT}
        return {**dict(self.settings), "exact_below": knn_from}

    def attributes(self, base: Attributes, knn_from: int) -> Attributes:
        """`base` (a node's attributes) with this candidate applied, as the tuner measures
        it: without the run-time guard. The guard only ever adds work to a failing head (it
        retrieves twice the keys, then runs the head exactly), so a plan measured unguarded
        keeps its fidelity when the guard runs."""
        fields = base.as_node_attributes()
        fields.update(self.plan_settings(knn_from), probe_rows=0)
        return Attributes(**fields)


EXACT = Candidate()


def parse_candidates(spec: str) -> list[Candidate]:
    """Exact first, then the kNN candidates in the spec's order (ValueError on a bad spec)."""
    tunable = list(TUNABLE)
    lists: dict[str, list[int | float]] = {}
    for term in (part.strip() for part in spec.split(";")):
        if not term or term == "exact":
            continue
        key, sep, values = term.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"bad candidate term {term!r}: expected 'exact' or KEY=V1,V2,...")
        if key not in tunable:
            raise ValueError(f"cannot tune {key!r}: the tuner tunes only {', '.join(tunable)}")
        if key in lists:
            raise ValueError(f"{key} is listed twice")
        lists[key] = [_value(key, text.strip()) for text in values.split(",") if text.strip()]
        if not lists[key]:
            raise ValueError(f"{key} has no values")
    if lists and "top_k" not in lists:
        raise ValueError("kNN candidates need top_k=...")
    if lists and "compensate" not in lists:  # explicit, so the plan does not depend on convert's flags
        lists["compensate"] = [Attributes.compensate]
    keys = sorted(lists, key=tunable.index)
    knn = [Candidate(tuple(zip(keys, combo))) for combo in itertools.product(*(lists[k] for k in keys))]
    return [EXACT, *dict.fromkeys(knn)]


def _value(key: str, text: str) -> int | float:
    """A value of the type of the contract's default for `key` (compensate also takes on/off)."""
    if key == "compensate":
        if text.lower() not in SWITCHES:
            raise ValueError(f"compensate takes on/off, not {text!r}")
        return SWITCHES[text.lower()]
    kind = type(getattr(Attributes, key))
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"{key} takes {'integers' if kind is int else 'numbers'}, not {text!r}") from None
    if key == "top_k" and value < 1:
        raise ValueError("top_k must be >= 1")
    return value


def _show(key: str, value: int | float) -> str:
    return ("on" if value else "off") if key == "compensate" else str(value)
