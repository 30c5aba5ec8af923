"""ONNX Runtime's fused attention ops (com.microsoft): MultiHeadAttention, Attention, GroupQueryAttention.

Each is one node; the rule maps its inputs and attributes onto the canonical core.
Inputs and attributes the contract has no place for (GQA's attention_bias, a shared
past/present buffer, rotary inside com.microsoft.Attention ...) make the block
`unsupported` with the reason, so the report still lists it. The KV cache these ops
carry (and GQA's rotary) is written out in standard ops by the emitter (kv_cache.py).
"""

from __future__ import annotations

import onnx_ir as ir

from ice_onnx.rewriter.core import AttentionCore, KVCache, Layout, Masking, MaskTerm, MaskTermKind, Projection, Scores
from ice_onnx.rewriter.rules.fused_node import (attribute, default_scale, hidden_size, input_at, output_if_read,
                                                output_is_read, same_length)

MS_DOMAIN = "com.microsoft"


def match(model: ir.Model, node: ir.Node) -> AttentionCore | None:
    if node.domain != MS_DOMAIN:
        return None
    if node.op_type == "MultiHeadAttention":
        return _ms_multi_head_attention(node)
    if node.op_type == "Attention":
        return _ms_attention(node)
    if node.op_type == "GroupQueryAttention":
        return _group_query_attention(node)
    if node.op_type == "PackedMultiHeadAttention":
        return _listed_only(node, "com.microsoft.PackedMultiHeadAttention (ragged batches): not converted")
    return None


def _ms_multi_head_attention(node: ir.Node) -> AttentionCore:
    q, k, v = (input_at(node, i) for i in range(3))
    heads = attribute(node, "num_heads", 0)
    core = AttentionCore(
        family="com.microsoft-mha",
        output=node.outputs[0],
        query=q,
        key=k,
        value=v,
        nodes=[node],
        layout=Layout(packed_heads=(heads, heads)),
        scores=Scores(scale=default_scale(attribute(node, "scale", None))),
        masking=Masking(is_causal=bool(attribute(node, "unidirectional", 0))),
        q_heads=heads,
        kv_heads=heads,
    )
    padding, bias = input_at(node, 4), input_at(node, 5)
    rank = padding.shape.rank() if padding is not None and padding.shape is not None else None
    if padding is not None:
        if rank == 2 and padding.dtype in (ir.DataType.INT32, ir.DataType.INT64):
            core.masking.terms.append(MaskTerm(MaskTermKind.KEEP, padding, key_padding_2d=True))  # 1 = real key
        elif (rank == 1 and _same_batch(padding, q)) or _is_embed_mask_index(padding):
            core.masking.terms.append(MaskTerm(MaskTermKind.KEY_LENGTHS, padding))
        else:
            core.unsupported = "key_padding_mask that is not [B] lengths or a [B, Sk] 0/1 mask"
    if bias is not None:
        core.masking.terms.append(MaskTerm(MaskTermKind.ADDITIVE, bias))
    if input_at(node, 3) is not None:  # one bias vector for the Q, K and V projections, in that order
        sizes = [hidden_size(x) for x in (q, k, v)]
        core.layout.input_bias = (input_at(node, 3), sizes)
    if k is None or v is None or (k.shape is not None and k.shape.rank() != 3):
        core.unsupported = "packed QKV or 4-D key/value: not converted"
    elif core.layout.input_bias is not None and None in core.layout.input_bias[1]:
        core.unsupported = "projection bias with Q/K/V hidden sizes unknown"
    elif any(input_at(node, i) is not None for i in range(6, len(node.inputs))):
        core.unsupported = "past key/value inputs: not converted"
    elif any(output_is_read(node, i) for i in (1, 2, 3)):
        core.unsupported = "present key/value outputs are used"
    elif core.masking.is_causal and not same_length(q, k, True):
        core.unsupported = "unidirectional with query and key lengths not provably equal"
    return core


def _ms_attention(node: ir.Node) -> AttentionCore:
    """com.microsoft.Attention: packed QKV weights, mask_index in one of several formats."""
    hidden, weights, bias, mask_index = (input_at(node, i) for i in range(4))
    heads = attribute(node, "num_heads", 0)
    sizes = attribute(node, "qkv_hidden_sizes", None)
    if sizes is None and weights is not None and weights.shape is not None and isinstance(weights.shape[-1], int):
        sizes = [weights.shape[-1] // 3] * 3
    core = AttentionCore(
        family="com.microsoft-attention",
        output=node.outputs[0],
        query=hidden,
        key=hidden,
        value=hidden,
        nodes=[node],
        layout=Layout(packed_heads=(heads, heads),
                      projection=Projection(weights, bias, list(sizes)) if sizes else None),
        scores=Scores(scale=default_scale(attribute(node, "scale", None))),
        masking=Masking(is_causal=bool(attribute(node, "unidirectional", 0))),  # no past (checked below): Sq == Sk
        q_heads=heads,
        kv_heads=heads,
    )
    rank = mask_index.shape.rank() if mask_index is not None and mask_index.shape is not None else None
    if mask_index is not None:
        if rank == 2:
            core.masking.terms.append(MaskTerm(MaskTermKind.KEEP, mask_index, key_padding_2d=True))
        elif (rank == 1 and _same_batch(mask_index, hidden)) or _is_embed_mask_index(mask_index):
            core.masking.terms.append(MaskTerm(MaskTermKind.KEY_LENGTHS, mask_index))
        else:
            core.unsupported = "mask_index format other than [B] lengths or [B, S] 0/1: not converted"
    if input_at(node, 5) is not None:
        core.masking.terms.append(MaskTerm(MaskTermKind.ADDITIVE, input_at(node, 5)))
    past = input_at(node, 4)
    if past is not None or output_is_read(node, 1):  # [2, B, H, P, D]: present = past ++ new on axis 3
        core.kv_cache = KVCache(past, None, output_if_read(node, 1), None, stacked=True)
    if sizes is None:
        core.unsupported = "QKV hidden sizes unknown"
    elif attribute(node, "past_present_share_buffer", 0) or input_at(node, 6) is not None:
        core.unsupported = "past and present share one buffer (past_sequence_length): not converted"
    elif len(set(sizes)) != 1 and core.kv_cache is not None:
        core.unsupported = "KV cache with different Q/K/V hidden sizes"
    elif attribute(node, "do_rotary", 0):
        core.unsupported = "rotary embedding inside the op: not converted"
    return core


# GroupQueryAttention inputs beyond the ones converted (index: what it is).
GQA_UNSUPPORTED_INPUTS = {9: "position_ids", 10: "attention_bias", 11: "head_sink", 12: "k_scale (quantized cache)",
                          13: "v_scale (quantized cache)", 14: "q_norm_weight", 15: "k_norm_weight",
                          16: "query_seqlens (chunked prefill)"}
GQA_NEUTRAL_ATTRIBUTES = {"smooth_softmax": 0, "qk_output": 0,
                          "sliding_window_cache": 0, "causal": 1, "k_quant_type": "NONE", "v_quant_type": "NONE"}


def _group_query_attention(node: ir.Node) -> AttentionCore:
    """com.microsoft.GroupQueryAttention (onnxruntime-genai's model builder, ORT's fusions): BSNH
    Q/K/V (or one packed QKV), a BNSH KV cache placed by seqlens_k, rotary optionally inside."""
    query, key, value, past_key, past_value, seqlens_k, total_length, cos, sin = (input_at(node, i) for i in range(9))
    q_heads, kv_heads = attribute(node, "num_heads", 0), attribute(node, "kv_num_heads", 0)
    core = AttentionCore(
        family="com.microsoft-gqa",
        output=node.outputs[0],
        query=query,
        key=key if key is not None else query,
        value=value if value is not None else query,
        nodes=[node],
        layout=Layout(packed_heads=(q_heads, kv_heads)),
        scores=Scores(scale=default_scale(attribute(node, "scale", None))),
        # The emitter builds the mask from seqlens_k; listed so the report says "both".
        masking=Masking(terms=[MaskTerm(MaskTermKind.KEY_LENGTHS, seqlens_k)] if seqlens_k is not None else [],
                        is_causal=True),
        q_heads=q_heads,
        kv_heads=kv_heads,
    )
    core.scores.softcap = float(attribute(node, "softcap", 0.0) or 0.0)
    window = attribute(node, "local_window_size", -1)
    if window > 0:  # ONNX Runtime's op attends the local_window_size latest keys, its own counted
        core.masking.sliding_window = window
    rotary = (cos, sin, bool(attribute(node, "rotary_interleaved", 0))) if attribute(node, "do_rotary", 0) else None
    core.kv_cache = KVCache(past_key, past_value, output_if_read(node, 1), output_if_read(node, 2),
                            seqlens_k=seqlens_k, total_length=total_length, rotary=rotary)
    q_hidden = hidden_size(query)
    if key is None and q_hidden is not None and q_heads and kv_heads:  # packed QKV: [Q | K | V] on the last axis
        head_dim = q_hidden // (q_heads + 2 * kv_heads)
        core.layout.projection = Projection(None, None, [q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim])
    extra = [name for index, name in GQA_UNSUPPORTED_INPUTS.items() if input_at(node, index) is not None]
    changed = [name for name, neutral in GQA_NEUTRAL_ATTRIBUTES.items() if attribute(node, name, neutral) != neutral]
    if not q_heads or not kv_heads or q_heads % kv_heads:
        core.unsupported = "num_heads / kv_num_heads missing or not a multiple"
    elif key is None and core.layout.projection is None:
        core.unsupported = "packed QKV with an unknown hidden size"
    elif past_key is None or past_value is None or seqlens_k is None or total_length is None:
        core.unsupported = "GroupQueryAttention without past_key/past_value/seqlens_k/total_sequence_length"
    elif extra:
        core.unsupported = f"GroupQueryAttention input_at(s) {', '.join(extra)}: not converted"
    elif changed:
        core.unsupported = f"GroupQueryAttention attribute(s) {', '.join(changed)}: not in the IceKNNAttention contract"
    elif core.scores.softcap < 0:
        core.unsupported = f"softcap {core.scores.softcap:g}: below 0"
    elif window == 0 or window < -1:
        core.unsupported = f"local_window_size {window}"
    elif rotary is not None and (cos is None or sin is None):
        core.unsupported = "do_rotary without cos/sin caches"
    elif output_is_read(node, 3):
        core.unsupported = "output_qk is used"
    return core


def _is_embed_mask_index(value: ir.Value) -> bool:
    """EmbedLayerNormalization's mask_index output: [B] int32 real-token counts (ORT's fusion)."""
    producer = value.producer()
    return (producer is not None and producer.domain == MS_DOMAIN and producer.op_type == "EmbedLayerNormalization"
            and len(producer.outputs) > 1 and producer.outputs[1] is value)


def _same_batch(lengths: ir.Value, hidden: ir.Value) -> bool:
    """A 1-D mask_index is [B] lengths (right padding) or [2B] ends and starts: tell which from the shapes."""
    if lengths.shape is None or hidden.shape is None or hidden.shape.rank() != 3:
        return False
    n, batch = lengths.shape[0], hidden.shape[0]
    if isinstance(n, int) or isinstance(batch, int):
        return n == batch
    return n.value is not None and n.value == batch.value


def _listed_only(node: ir.Node, reason: str) -> AttentionCore:
    q = node.inputs[0]
    return AttentionCore(family=f"{node.domain}.{node.op_type}", output=node.outputs[0], query=q, key=q, value=q,
                         nodes=[node], scores=Scores(scale=0.0), unsupported=reason, q_heads=attribute(node, "num_heads", None),
                         kv_heads=attribute(node, "kv_num_heads", None) or attribute(node, "num_heads", None))
