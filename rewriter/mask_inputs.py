"""The attn_mask input of each emitted node, from the block's mask plan and mask terms.

A mask the analysis proved causal / padding / windowed becomes attributes and, for
padding, one compact [B, 1, 1, Sk] bool mask per attention-mask input, shared by every
block (its S×S construction in the graph then becomes dead). Any other mask is rebuilt
from its terms: bool terms combined with And, additive ones with Add, then one Where.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ice_onnx.rewriter.core import AttentionCore, MaskTerm, MaskTermKind
from ice_onnx.rewriter.dtypes import as_float, element_type
from ice_onnx.rewriter.masks import MaskKind, MaskPlan
from ice_onnx.rewriter.node_builder import Add, dim, fold, int64, positions, typed

COMPACT_MASK_KINDS = (MaskKind.PADDING, MaskKind.BOTH, MaskKind.WINDOW)


class MaskInputs:
    """Builds attn_mask inputs; shares one compact mask per padding input."""

    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self.inputs = {v.name: v for v in graph.inputs}
        self.compact_masks: dict[str, ir.Value] = {}

    def build(self, add: Add, core: AttentionCore, mask: MaskPlan, query: ir.Value, key: ir.Value) -> ir.Value | None:
        """The node's mask (bool or float, typed), or None where attributes say it all."""
        if mask.kind in (MaskKind.NONE, MaskKind.CAUSAL) or (mask.kind == MaskKind.WINDOW and mask.padding_input is None):
            return None  # causality and the window are attributes
        if mask.kind in COMPACT_MASK_KINDS and mask.padding_input is not None:
            return self._compact(mask.padding_input)

        def given(term: MaskTerm, blocked):  # the graph's mask tensor, padded to the keys when the op pads it
            value = as_float(add, term.value, element_type(term.value)) if blocked == -np.inf else term.value
            rank = term.value.shape.rank() if term.value.shape is not None else None
            if core.masking.padded_to_keys and rank and not _same_last_dim(term.value, core.key, core.kv_cache):
                value = _padded_to_keys(add, value, rank, key, blocked)
            return value

        keep = [_key_padding(add, t.value) if t.key_padding_2d else given(t, False)
                for t in core.masking.terms if t.kind is MaskTermKind.KEEP]
        keep += [_from_lengths(add, t.value, key) for t in core.masking.terms if t.kind is MaskTermKind.KEY_LENGTHS]
        keep += [_band(add, t, query, key) for t in core.masking.terms if t.kind is MaskTermKind.BAND]
        keep += [add("Not", [t.value]) for t in core.masking.terms if t.kind is MaskTermKind.DROP]
        additive = [given(t, -np.inf) for t in core.masking.terms if t.kind is MaskTermKind.ADDITIVE]
        combined_keep = fold(add, "And", keep)
        combined_add = fold(add, "Add", additive)
        if combined_add is None:  # typed: what reads the mask (the empty-row guard) tells bool from float
            return typed(combined_keep, ir.DataType.BOOL)
        if combined_keep is None:
            return typed(combined_add, ir.DataType.FLOAT)
        blocked = add("Constant", [], value=ir.tensor([float("-inf")], dtype=ir.DataType.FLOAT))
        return typed(add("Where", [combined_keep, combined_add, blocked]), ir.DataType.FLOAT)

    def _compact(self, source: str) -> ir.Value:
        """[B, 1, 1, Sk] bool from the 2-D attention-mask input: built once, before its first user."""
        if source not in self.compact_masks:
            as_bool = ir.node("Cast", [self.inputs[source]], {"to": ir.DataType.BOOL}, name=f"ice/key_padding/{source}/Cast")
            axes = ir.node("Constant", [], {"value": ir.tensor([1, 2], dtype=ir.DataType.INT64)}, name=f"ice/key_padding/{source}/axes")
            unsqueeze = ir.node("Unsqueeze", [as_bool.outputs[0], axes.outputs[0]], name=f"ice/key_padding/{source}/Unsqueeze")
            nodes = [as_bool, axes, unsqueeze]
            unsqueeze.outputs[0].name = f"ice_key_padding_{source}"
            unsqueeze.outputs[0].dtype = ir.DataType.BOOL
            self.graph.insert_before(next(iter(self.graph)), nodes)
            self.compact_masks[source] = unsqueeze.outputs[0]
        return self.compact_masks[source]


def rows_with_a_key(add: Add, mask: ir.Value, causal: bool, query: ir.Value, key: ir.Value, opset: int) -> ir.Value:
    """[..., Sq, 1] bool: whether query i may see any key under `mask` (bool, or float with -inf
    blocking) and, when causal, j <= i + Sk - Sq. Reads the mask once; no Sq×Sk tensor is built."""
    allowed = mask if mask.dtype == ir.DataType.BOOL else add("Not", [add("IsInf", [mask], detect_positive=0)])
    allowed = add("Cast", [allowed], to=ir.DataType.FLOAT)
    # A count, not ReduceMax: ONNX Runtime's symbolic shape inference derives ReduceSum's shape from
    # its axes input, not ReduceMax's (axes an input since opset 18).
    allowed_keys = (add("ReduceSum", [allowed, int64(add, [-1])], keepdims=1) if opset >= 13
                    else add("ReduceSum", [allowed], axes=[-1], keepdims=1))
    rows = add("Greater", [allowed_keys,
                           add("Constant", [], value=ir.tensor(0.0, dtype=ir.DataType.FLOAT))])
    if not causal:
        return rows
    first = add("ArgMax", [allowed], axis=-1, keepdims=1)  # the first allowed key of each mask row
    lengths = [add("Gather", [add("Shape", [x]), int64(add, 2)], axis=0) for x in (query, key)]
    newest = add("Add", [positions(add, query), add("Sub", [lengths[1], lengths[0]])])  # i + Sk - Sq
    return add("And", [rows, add("LessOrEqual", [first, add("Unsqueeze", [newest, int64(add, [1])])])])


def _key_padding(add: Add, mask: ir.Value) -> ir.Value:
    axes = add("Constant", [], value=ir.tensor([1, 2], dtype=ir.DataType.INT64))
    return add("Unsqueeze", [add("Cast", [mask], to=ir.DataType.BOOL), axes])


def _from_lengths(add: Add, lengths: ir.Value, key: ir.Value) -> ir.Value:
    """[B, 1, 1, Sk] bool: key j of batch b is real iff j < lengths[b]."""
    limits = add("Unsqueeze", [add("Cast", [lengths], to=ir.DataType.INT64), int64(add, [1])])
    return _key_padding(add, add("Less", [positions(add, key), limits]))


def _same_last_dim(mask: ir.Value, key: ir.Value, cache) -> bool:
    """Whether the mask's last dim is visibly the keys' length (no cache, equal dims or symbols)."""
    if cache is not None or mask.shape is None or key.shape is None or key.shape.rank() < 2:
        return False
    ours, theirs = mask.shape[-1], key.shape[2 if key.shape.rank() == 4 else 1]
    return ours == theirs if isinstance(ours, int) or isinstance(theirs, int) else (ours.value is not None and ours.value == theirs.value)


def _padded_to_keys(add: Add, mask: ir.Value, rank: int, key: ir.Value, blocked) -> ir.Value:
    """`mask` (of `rank`) padded at the end of its last axis to the keys' length with `blocked` (False / -inf)."""
    missing = add("Sub", [dim(add, key, 2), dim(add, mask, rank - 1)])
    pads = add("Concat", [int64(add, [0] * (2 * rank - 1)), missing], axis=0)
    fill = ir.tensor(np.array(blocked, dtype=bool if blocked is False else np.float32))
    return add("Pad", [mask, pads, add("Constant", [], value=fill)])


def _band(add: Add, term: MaskTerm, query: ir.Value, key: ir.Value) -> ir.Value:
    """Bool [Sq, Sk] (or [B, 1, Sq, Sk] with lengths): key j within `term.band` of query i's position."""
    position = add("Unsqueeze", [positions(add, query), int64(add, [1])])  # [Sq, 1]
    if term.aligned != "top-left":
        queries = dim(add, query, 2)
        if term.aligned == "lengths":
            ends = add("Reshape", [add("Cast", [term.value], to=ir.DataType.INT64), int64(add, [-1, 1, 1, 1])])
        else:
            ends = dim(add, key, 2)
        position = add("Add", [position, add("Sub", [ends, queries])])
    keys, (left, right) = positions(add, key), term.band
    bounds = []
    if right is not None:
        bounds.append(add("LessOrEqual", [keys, add("Add", [position, int64(add, right)])]))
    if left is not None:
        bounds.append(add("GreaterOrEqual", [keys, add("Sub", [position, int64(add, left)])]))
    return fold(add, "And", bounds)
