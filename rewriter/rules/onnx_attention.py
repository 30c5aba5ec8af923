"""ONNX's own `Attention` op (opset 23+): one node, mapped onto the canonical core.

Inputs and attributes the contract has no place for (an exposed qk_matmul_output, a
window over later keys with no past ...) make the block `unsupported` with the reason,
so the report still lists it. A KV cache (past_key / past_value, present outputs) is
written out in standard ops by the emitter (kv_cache.py); a window or causal pattern the
contract's attributes cannot say becomes an explicit BAND mask term.
"""

from __future__ import annotations

import onnx_ir as ir

from ice_onnx.rewriter.core import AttentionCore, KVCache, Masking, MaskTerm, MaskTermKind, Scores
from ice_onnx.rewriter.rules.fused_node import (attribute, default_scale, input_at, output_if_read, output_is_read,
                                                same_length)

FAMILY = "onnx-attention"


def match(model: ir.Model, node: ir.Node) -> AttentionCore | None:
    if node.op_type == "Attention" and node.domain in ("", "ai.onnx"):
        return _onnx_attention(node)
    return None


def _onnx_attention(node: ir.Node) -> AttentionCore:
    q, k, v, mask = (input_at(node, i) for i in range(4))
    core = AttentionCore(
        family=FAMILY,
        output=node.outputs[0],
        query=q,
        key=k,
        value=v,
        nodes=[node],
        scores=Scores(scale=default_scale(attribute(node, "scale", None))),
        masking=Masking(is_causal=bool(attribute(node, "is_causal", 0)), empty_rows_zero=True, padded_to_keys=True),
    )
    if mask is not None:
        core.masking.terms.append(_mask_term(mask))
    q_heads, kv_heads = attribute(node, "q_num_heads", 0), attribute(node, "kv_num_heads", 0)
    if q_heads and kv_heads:
        core.layout.packed_heads = (q_heads, kv_heads)
        core.q_heads, core.kv_heads = q_heads, kv_heads
    past_key, past_value = input_at(node, 4), input_at(node, 5)
    if past_key is not None or output_is_read(node, 1) or output_is_read(node, 2):
        # present = Concat(past, new) on the sequence axis; ONNX Runtime aligns is_causal
        # bottom-right when there is a past, as the contract does.
        core.kv_cache = KVCache(past_key, past_value, output_if_read(node, 1), output_if_read(node, 2))
    # An external cache: only keys j < nonpad_kv_seqlen[b] exist, and causality and the window are
    # aligned at nonpad_kv_seqlen[b] - Sq: the contract's key_lengths, with which it aligns alike.
    core.masking.key_lengths = input_at(node, 6)
    # Without a past or key lengths the op aligns causality (and a window) top-left (offset 0); the
    # contract's is bottom-right (Sk - Sq): the same only when Sq == Sk is visible from the shapes.
    top_left = past_key is None and core.masking.key_lengths is None and not same_length(q, k, core.layout.packed_heads is not None)
    core.scores.softcap = float(attribute(node, "softcap", 0.0) or 0.0)
    left, right = attribute(node, "left_window_size", -1), attribute(node, "right_window_size", -1)
    # The keys each query may see, around its position p: p - left .. p + right (None: unbounded).
    band = (left if left >= 0 else None, 0 if core.masking.is_causal else right if right >= 0 else None)
    if band[1] is not None and (top_left or band[1] > 0) or band[0] is not None and top_left:
        # Not what the contract's is_causal / sliding_window say (bottom-right aligned, the past
        # only): an explicit mask.
        aligned = "top-left" if top_left else "lengths" if core.masking.key_lengths is not None else "bottom-right"
        core.masking.terms.append(MaskTerm(MaskTermKind.BAND, core.masking.key_lengths, band=band, aligned=aligned))
        core.masking.is_causal = False
    else:
        core.masking.is_causal = band[1] == 0
        if band[0] is not None:  # keys p - left .. p: the contract's window counts the query's own key
            core.masking.sliding_window = band[0] + 1
    if (past_key is None) != (past_value is None):
        core.unsupported = "only one of past_key / past_value is given"
    elif core.masking.key_lengths is not None and past_key is not None:
        core.unsupported = "nonpad_kv_seqlen with past_key / past_value (the spec forbids it)"
    elif core.scores.softcap < 0:
        core.unsupported = f"softcap {core.scores.softcap:g}: the spec takes none below 0"
    elif output_is_read(node, 3):
        core.unsupported = "qk_matmul_output is used"
    return core


def _mask_term(mask: ir.Value) -> MaskTerm:
    kind = MaskTermKind.KEEP if mask.dtype == ir.DataType.BOOL else MaskTermKind.ADDITIVE
    return MaskTerm(kind, mask)
