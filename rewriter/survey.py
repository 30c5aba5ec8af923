"""What each attention block of a model becomes, decided before anything changes: the report.

One BlockRecord per block (converted or kept, and why), and for each the core, mask plan
and scale the emitter needs. `inspect` stops here; `convert` emits what it decided.
"""

from __future__ import annotations

import dataclasses
import math

import onnx_ir as ir

from ice_onnx.rewriter import dtypes, static_values
from ice_onnx.rewriter.core import AttentionCore
from ice_onnx.rewriter.masks import MaskKind, MaskPlan, analyze
from ice_onnx.rewriter.matching import find_cores, unmatched_softmax_blocks
from ice_onnx.rewriter.options import ConvertOptions
from ice_onnx.rewriter.report import BlockRecord, ConversionReport
from ice_onnx.rewriter.rules.fused_node import hidden_size


@dataclasses.dataclass
class BlockPlan:
    """What the emitter needs for one block: None everywhere for a block no rule matched."""

    core: AttentionCore | None
    mask: MaskPlan | None
    scale: float | None


def survey(model: ir.Model, name: str, options: ConvertOptions) -> tuple[ConversionReport, list[BlockPlan]]:
    """The report and, in the report's block order, each block's plan."""
    cores = find_cores(model)
    analysis = analyze(model, cores)
    report = ConversionReport(model=name)
    if analysis.note:
        report.notes.append(f"masks not analysed: {analysis.note}")
    plans = []
    for index, (core, mask, scale) in enumerate(zip(cores, analysis.masks, analysis.scales)):
        record = _record(index, core, mask, scale)
        reason = core.unsupported or _unsupported(core, mask, scale, model.opset_imports.get("", 1))
        if reason:
            record.reason = reason
        elif options.layers is not None and index not in options.layers:
            record.reason = "not selected (--layers)"
        else:
            record.replaced = True
            record.always_exact = mask.kind == MaskKind.BIAS
            record.reason = "; ".join(_conversion_notes(core, mask, record.always_exact)) or None
        report.blocks.append(record)
        plans.append(BlockPlan(core, mask, scale))
    for softmax, reason in unmatched_softmax_blocks(model, cores):
        report.blocks.append(BlockRecord(
            index=len(report.blocks), family="unknown", output=softmax.outputs[0].name or "",
            nodes=[softmax.name or ""], reason=reason,
        ))
        plans.append(BlockPlan(None, None, None))
    return report, plans


def _conversion_notes(core: AttentionCore, mask: MaskPlan, always_exact: bool) -> list[str]:
    """How a converted block was converted, where that is worth a reader's attention."""
    notes = ["score bias: ranking by q·k is not ranking by score, kept exact"] if always_exact else []
    notes += [mask.note] if mask.note else []
    notes += [f"sliding window {mask.window}"] if mask.kind == MaskKind.WINDOW else []
    notes += [f"sliding window {core.masking.sliding_window}"] if core.masking.sliding_window else []
    notes += [f"softcap {core.scores.softcap:g}"] if core.scores.softcap else []
    notes += [f"scores {'divided' if f.divides else 'multiplied'} by graph input {f.value.name!r} "
              "at run time" for f in core.scores.factors if f.runtime]
    return notes


def _record(index: int, core: AttentionCore, mask: MaskPlan, scale: float | None) -> BlockRecord:
    # A folded query ([B, Hkv, n_rep·S, D]) has the model's query heads before its Reshape.
    query = core.query if core.masking.rows_are_positions else core.query.producer().inputs[0]
    q_shape = static_values.bhsd_dims(query, core.layout.query_perm)
    k_shape = static_values.bhsd_dims(core.key, core.layout.key_perm)
    head_dim = static_values.static_dim(q_shape, 3)
    if core.layout.packed_heads and core.layout.projection is not None:
        head_dim = core.layout.projection.sizes[0] // core.layout.packed_heads[0]
    elif core.layout.packed_heads and hidden_size(core.query):
        head_dim = hidden_size(core.query) // core.layout.packed_heads[0]
    return BlockRecord(
        index=index,
        family=core.family,
        output=core.output.name or "",
        nodes=[n.name or n.op_type for n in core.nodes],
        q_heads=core.q_heads or static_values.static_dim(q_shape, 1),
        kv_heads=core.kv_heads or static_values.static_dim(k_shape, 1),
        head_dim=head_dim,
        scale=scale,
        mask=mask.kind,
    )


def _unsupported(core: AttentionCore, mask: MaskPlan, scale: float | None, opset: int) -> str | None:
    if mask.kind == MaskKind.NOT_FINITE:
        return "the mask adds NaN or +inf to scores (their softmax rows are NaN): not expressible as a contract mask"
    for role, value in (("query", core.query), ("key", core.key), ("value", core.value), ("output", core.output)):
        problem = dtypes.unconvertible_type(role, value)
        if problem:
            return problem
    for factor in core.scores.factors:
        if factor.runtime and not _is_scalar(factor.value):
            return f"the score scale from graph input {factor.value.name!r} is not one number"
    if scale is None:
        return "the score scale is not a constant"
    if not math.isfinite(scale):
        return f"the score scale is {scale}"
    if core.scores.scale is None and scale <= 0:  # computed from the graph; the contract reads <= 0 as 1/√D
        return f"the score scale is {scale:g} (the contract takes only positive scales)"
    if core.kv_cache is not None and opset < 13:
        return "KV cache emission needs opset 13 or later"
    return None


def _is_scalar(value: ir.Value) -> bool:
    return value.shape is not None and all(dim == 1 for dim in value.shape)
