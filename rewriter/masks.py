"""What a block's mask means, found by evaluating it rather than by reading its graph.

Exporters build masks in dozens of ways (LessOrEqual on Ranges, triangular
constants, Trilu, vmapped index functions, Gather/Expand of `attention_mask`,
`Where(m, 0, -inf)`, `(1 - m) * -10000` ...). Instead of a pattern per spelling,
the subgraph that computes each block's mask terms (and any scale built from
shapes) is cut out of the model and run in ONNX Runtime on a few probe inputs (probes.py):
small shapes, two batches, contiguous left and right padding. The values are then
compared with the two standard meanings:

- causal: query i sees key j iff j <= i + Sk - Sq (bottom-right aligned);
- key padding: key j of batch b is visible iff `P[b, j] != 0` for a 2-D graph
  input P (the attention mask).

A block whose mask is exactly "causal", "padding" or "both" on every probe gets
`is_causal=1` and a compact [B, 1, 1, Sk] bool mask made from P, so its S×S mask
construction becomes dead and is removed.

Small probes cannot see a pattern that changes only past a larger length: a sliding
window of 4096 keys is plain causal up to 4096 tokens. Every integer constant the mask
subgraph compares or computes positions with is such a possible threshold, so the mask
is also probed just past the largest one (a "long" probe). A causal mask limited to the
last W keys there is a "sliding-window" mask (the contract's `sliding_window` attribute);
a threshold too large to probe past leaves the mask unproven: "general". Anything else is passed through
unchanged ("general"); a float term that is not just 0 / blocking is a score
bias ("bias"): the ranking by q·k is not the ranking by score, so the block is
made always-exact.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from ice_onnx.rewriter.cone import cone
from ice_onnx.rewriter.core import OP_DEFINED_TERMS, AttentionCore, MaskTermKind
from ice_onnx.rewriter.probes import BLOCKING, LONG_PROBE_LIMIT, Probe, position_limits, run_probes
from ice_onnx.rewriter.static_values import constant_scalar


class MaskKind:
    NONE = "none"
    PADDING = "padding"
    CAUSAL = "causal"
    BOTH = "both"
    GENERAL = "general"
    BIAS = "bias"
    WINDOW = "sliding-window"  # causal, limited to the last `window` keys (and padding)
    # A float term adds NaN or +inf to some scores: those softmax rows are NaN (0 behind a NaN
    # guard), which no mask of the contract reproduces. Left unconverted.
    NOT_FINITE = "not-finite"


@dataclasses.dataclass
class MaskPlan:
    kind: str
    padding_input: str | None = None  # graph input P of a compact key-padding mask
    note: str | None = None  # why a mask could not be analysed
    window: int | None = None  # WINDOW: keys j with i + Sk - Sq - window < j are visible


@dataclasses.dataclass
class Analysis:
    masks: list[MaskPlan]
    scales: list[float | None]  # product of the scale factors; None if not a constant
    note: str | None = None


def analyze(model: ir.Model, cores: list[AttentionCore]) -> Analysis:
    """The mask plan and scale of every core, probing the model once for all of them."""
    targets = _probe_targets(cores)
    limits = [position_limits(_probed_terms(core)) for core in cores]
    long_length = min(max((threshold for threshold, _ in limits), default=0) + 2, LONG_PROBE_LIMIT)
    probes, note = run_probes(model, targets, long_length) if targets else ([], None)
    masks, shorter = [], {}
    for core, (threshold, table_limit) in zip(cores, limits):
        core_probes = probes
        if table_limit is not None and table_limit + 2 < long_length and not _terms_broadcast(core, probes):
            # Past a table the mask reads, its own terms disagree in shape (GPT-Neo's [1, 1, 64, 64]
            # causal buffer sliced to the keys): the model cannot run there either. Probed at the
            # table's extent instead, the longest it runs.
            if table_limit not in shorter:
                shorter[table_limit] = run_probes(model, targets, table_limit + 2)[0]
            core_probes, threshold = shorter[table_limit], min(threshold, table_limit)
        masks.append(_classify(core, core_probes, note, threshold))
    scales = [_scale(core, probes) for core in cores]
    return Analysis(masks, scales, note)


def _terms_broadcast(core: AttentionCore, probes: list[Probe]) -> bool:
    return all(_allowed(core, probe)[0] is not None for probe in probes if core.masking.terms)


def _probed_terms(core: AttentionCore) -> list[ir.Value]:
    return [term.value for term in core.masking.terms if term.kind not in OP_DEFINED_TERMS]


def _probe_targets(cores: list[AttentionCore]) -> list[ir.Value]:
    targets: dict[str, ir.Value] = {}
    for core in cores:
        for value in _probed_terms(core):
            targets[value.name] = value
        for factor in core.scores.factors:
            if constant_scalar(factor.value) is None and not factor.runtime:
                targets[factor.value.name] = factor.value
    return list(targets.values())


# --- classification ----------------------------------------------------------------------


def _allowed(core: AttentionCore, probe: Probe) -> tuple[np.ndarray | None, bool]:
    """(which keys each query may see, whether a term is a score bias) for one probe."""
    allowed = None
    is_bias = False
    for term in core.masking.terms:
        if term.kind in OP_DEFINED_TERMS:
            continue  # key lengths are [B, 1, 1, Sk] by definition: cannot make a padding mask anything else
        values = np.asarray(probe.values[term.value.name])
        if term.key_padding_2d:
            values = values[:, None, None, :]
        if term.kind is MaskTermKind.ADDITIVE:
            blocked = values <= BLOCKING
            if not np.all(blocked | (values == 0)):
                is_bias = True
            keep = ~blocked
        else:
            keep = values.astype(bool) if term.kind is MaskTermKind.KEEP else ~values.astype(bool)
        if allowed is not None:
            try:
                np.broadcast_shapes(allowed.shape, keep.shape)
            except ValueError:  # the terms disagree on this probe (a table shorter than the keys)
                return None, is_bias
        allowed = keep if allowed is None else allowed & keep
    return allowed, is_bias


def _adds_nan_or_inf(core: AttentionCore, probe: Probe) -> bool:
    """Whether a float term adds NaN or +inf to a score on this probe (-inf is a blocking value)."""
    for term in core.masking.terms:
        if term.kind is MaskTermKind.ADDITIVE:
            values = np.asarray(probe.values[term.value.name])
            if np.issubdtype(values.dtype, np.floating) and (np.isnan(values).any() or np.isposinf(values).any()):
                return True
    return False


def _classify(core: AttentionCore, probes: list[Probe], note: str | None, threshold: int) -> MaskPlan:
    if not core.masking.terms:
        return MaskPlan(MaskKind.CAUSAL if core.masking.is_causal else MaskKind.NONE)
    if any(term.kind is MaskTermKind.BAND for term in core.masking.terms):
        return MaskPlan(MaskKind.GENERAL)  # a pattern the attributes cannot say: an explicit mask
    if all(term.kind is MaskTermKind.KEY_LENGTHS for term in core.masking.terms):
        return MaskPlan(MaskKind.BOTH if core.masking.is_causal else MaskKind.PADDING)
    if not probes:
        return MaskPlan(MaskKind.GENERAL, note=note)
    if any(_adds_nan_or_inf(core, probe) for probe in probes):
        return MaskPlan(MaskKind.NOT_FINITE)
    per_probe = [_allowed(core, probe) for probe in probes]
    if any(allowed is None for allowed, _ in per_probe):
        return MaskPlan(MaskKind.GENERAL, note="the mask's terms do not broadcast together on a probe: "
                                               "passed through unchanged")
    if any(is_bias for _, is_bias in per_probe):
        return MaskPlan(MaskKind.BIAS)
    if any(term.kind is MaskTermKind.KEY_LENGTHS for term in core.masking.terms):
        return MaskPlan(MaskKind.GENERAL)  # the lengths are not probed: keep every term as is
    key_lengths = {allowed.shape[-1] for allowed, _ in per_probe}
    if max(key_lengths) < threshold + 2 and len(key_lengths) > 1:  # a static length is seen whole
        return MaskPlan(MaskKind.GENERAL, note=f"the mask compares positions with {threshold}: not probed "
                                               f"that far (limit {LONG_PROBE_LIMIT}), passed through unchanged")
    windows = [None, *sorted({w for allowed, _ in per_probe if (w := _window(allowed)) is not None})]
    for causal, source in _hypotheses(core, probes[0]):
        for window in windows if (causal or core.masking.is_causal) and core.masking.rows_are_positions else [None]:
            if all(_fits(allowed, probe, causal, source, window) for (allowed, _), probe in zip(per_probe, probes)):
                causal = causal or core.masking.is_causal
                if window is not None:
                    return MaskPlan(MaskKind.WINDOW, padding_input=source, window=window)
                if source is None:
                    return MaskPlan(MaskKind.CAUSAL if causal else MaskKind.NONE)
                return MaskPlan(MaskKind.BOTH if causal else MaskKind.PADDING, padding_input=source)
    return MaskPlan(MaskKind.GENERAL)


def _hypotheses(core: AttentionCore, probe: Probe):
    """(causal, padding source) forms to test. A compact form from input P claims the mask reads no
    other input's values (and none at all without P): a mask input itself is never "none"."""
    read = cone(_probed_terms(core), through_shapes=False).inputs
    if not read:
        sources = [None]
    elif len(read) == 1 and probe.inputs[next(iter(read))].ndim == 2:
        sources = list(read)
    else:
        return
    # A causal op may still carry a causal mask (And is idempotent); folded query rows are not positions.
    causal_forms = (False, True) if core.masking.rows_are_positions else (False,)
    for source in sources:
        for causal in causal_forms:
            yield causal, source


def _as_4d(allowed: np.ndarray) -> np.ndarray | None:
    return allowed.reshape((1,) * (4 - allowed.ndim) + allowed.shape) if allowed.ndim <= 4 else None


def _window(allowed: np.ndarray) -> int | None:
    """W when the last query of the first batch row (never padded) sees only its W latest keys."""
    allowed = _as_4d(allowed)
    if allowed is None or allowed.size == 0:
        return None
    last_row = allowed[0, 0, -1]
    visible = int(last_row.sum())
    return visible if 0 < visible < last_row.shape[-1] else None


def _fits(allowed: np.ndarray, probe: Probe, causal: bool, source: str | None, window: int | None = None) -> bool:
    allowed = _as_4d(allowed)
    if allowed is None:
        return False
    sq, sk = allowed.shape[2], allowed.shape[3]
    expected = np.ones((1, 1, sq, sk), dtype=bool)
    if causal or window is not None:
        if sq == 1 and sk > 1:
            return False  # the probe cannot tell which query row this is
        newest = np.arange(sq)[:, None] + (sk - sq)  # the latest key query i may see (bottom-right)
        keys = np.arange(sk)[None, :]
        if causal:
            expected = expected & (keys <= newest)
        if window is not None:
            expected = expected & (keys > newest - window)
    if source is not None:
        padding = probe.inputs[source] != 0
        if padding.shape[1] != sk or allowed.shape[0] not in (1, padding.shape[0]):
            return False
        expected = expected & padding[:, None, None, :]
    try:
        shape = np.broadcast_shapes(allowed.shape, expected.shape)
    except ValueError:
        return False
    return bool(np.array_equal(np.broadcast_to(allowed, shape), np.broadcast_to(expected, shape)))


def _scale(core: AttentionCore, probes: list[Probe]) -> float | None:
    """The product of the scale factors known before the model runs (runtime ones are applied by the graph)."""
    if core.scores.scale is not None:
        return core.scores.scale
    scale = 1.0
    for factor in core.scores.factors:
        if factor.runtime:
            continue
        value = constant_scalar(factor.value)
        if value is None:
            seen = {float(np.asarray(p.values[factor.value.name]).reshape(-1)[0]) for p in probes
                    if np.asarray(p.values[factor.value.name]).size == 1}
            if len(seen) != 1 or len(probes) < 2:
                return None
            value = seen.pop()
        scale = scale / value if factor.divides else scale * value
    return scale
