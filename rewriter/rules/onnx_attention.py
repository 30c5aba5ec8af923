"""Already-fused attention ops: ONNX `Attention` (opset 23+) and com.microsoft `MultiHeadAttention`.

Each is one node; the rule maps its inputs and attributes onto the canonical core.
Inputs and attributes the contract has no place for (an exposed qk_matmul_output, a
window over later keys, GQA's attention_bias ...) make the block `unsupported` with the
reason, so the report still lists it. A KV cache (and GQA's rotary) the op carries inside
is written out in standard ops by the emitter (kv_cache.py).
"""

from __future__ import annotations

import onnx_ir as ir

from ice_onnx.rewriter.core import AttentionCore, KVCache, MaskTerm, MaskTermKind

FAMILY = "onnx-attention"
MS_DOMAIN = "com.microsoft"


def match(model: ir.Model, node: ir.Node) -> AttentionCore | None:
    if node.op_type == "Attention" and node.domain in ("", "ai.onnx"):
        return _onnx_attention(node)
    if node.domain == MS_DOMAIN and node.op_type == "MultiHeadAttention":
        return _ms_multi_head_attention(node)
    if node.domain == MS_DOMAIN and node.op_type == "Attention":
        return _ms_attention(node)
    if node.domain == MS_DOMAIN and node.op_type == "GroupQueryAttention":
        return _group_query_attention(node)
    if node.domain == MS_DOMAIN and node.op_type == "PackedMultiHeadAttention":
        return _listed_only(node, "com.microsoft.PackedMultiHeadAttention (ragged batches): not converted")
    return None


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


def _used(node: ir.Node, index: int) -> bool:
    """Whether output `index` is read, by a node or as a graph output."""
    if len(node.outputs) <= index:
        return False
    output = node.outputs[index]
    return bool(output.uses()) or output.is_graph_output()


def _attr(node: ir.Node, name: str, default):
    attr = node.attributes.get(name)
    if attr is None:
        return default
    return attr.value


def _onnx_attention(node: ir.Node) -> AttentionCore:
    q, k, v, mask = (_input(node, i) for i in range(4))
    core = AttentionCore(
        family=FAMILY,
        output=node.outputs[0],
        query=q,
        key=k,
        value=v,
        nodes=[node],
        is_causal=bool(_attr(node, "is_causal", 0)),
        scale=_attr(node, "scale", None),
        empty_rows_zero=True,
        mask_padded_to_keys=True,
    )
    if mask is not None:
        core.mask_terms.append(_mask_term(mask))
    q_heads, kv_heads = _attr(node, "q_num_heads", 0), _attr(node, "kv_num_heads", 0)
    if q_heads and kv_heads:
        core.packed_heads = (q_heads, kv_heads)
        core.q_heads, core.kv_heads = q_heads, kv_heads
    core.scale = _default_scale(core)
    past_key, past_value = _input(node, 4), _input(node, 5)
    if past_key is not None or _used(node, 1) or _used(node, 2):
        # present = Concat(past, new) on the sequence axis; ONNX Runtime aligns is_causal
        # bottom-right when there is a past, as the contract does.
        core.kv_cache = KVCache(past_key, past_value, _output_if_used(node, 1), _output_if_used(node, 2))
    # An external cache: only keys j < nonpad_kv_seqlen[b] exist, and causality and the window are
    # aligned at nonpad_kv_seqlen[b] - Sq: the contract's key_lengths, with which it aligns alike.
    core.key_lengths = _input(node, 6)
    # Without a past or key lengths the op aligns causality (and a window) top-left (offset 0); the
    # contract's is bottom-right (Sk - Sq): the same only when Sq == Sk is visible from the shapes.
    top_left = past_key is None and core.key_lengths is None and not _same_length(q, k, core.packed_heads is not None)
    core.softcap = float(_attr(node, "softcap", 0.0) or 0.0)
    left, right = _attr(node, "left_window_size", -1), _attr(node, "right_window_size", -1)
    # The keys each query may see, around its position p: p - left .. p + right (None: unbounded).
    band = (left if left >= 0 else None, 0 if core.is_causal else right if right >= 0 else None)
    if band[1] is not None and (top_left or band[1] > 0) or band[0] is not None and top_left:
        # Not what the contract's is_causal / sliding_window say (bottom-right aligned, the past
        # only): an explicit mask.
        aligned = "top-left" if top_left else "lengths" if core.key_lengths is not None else "bottom-right"
        core.mask_terms.append(MaskTerm(MaskTermKind.BAND, core.key_lengths, band=band, aligned=aligned))
        core.is_causal = False
    else:
        core.is_causal = band[1] == 0
        if band[0] is not None:  # keys p - left .. p: the contract's window counts the query's own key
            core.sliding_window = band[0] + 1
    if (past_key is None) != (past_value is None):
        core.unsupported = "only one of past_key / past_value is given"
    elif core.key_lengths is not None and past_key is not None:
        core.unsupported = "nonpad_kv_seqlen with past_key / past_value (the spec forbids it)"
    elif core.softcap < 0:
        core.unsupported = f"softcap {core.softcap:g}: the spec takes none below 0"
    elif _used(node, 3):
        core.unsupported = "qk_matmul_output is used"
    return core


def _ms_multi_head_attention(node: ir.Node) -> AttentionCore:
    q, k, v = (_input(node, i) for i in range(3))
    heads = _attr(node, "num_heads", 0)
    core = AttentionCore(
        family="com.microsoft-mha",
        output=node.outputs[0],
        query=q,
        key=k,
        value=v,
        nodes=[node],
        is_causal=bool(_attr(node, "unidirectional", 0)),
        scale=_attr(node, "scale", None),
        packed_heads=(heads, heads),
        q_heads=heads,
        kv_heads=heads,
    )
    core.scale = _default_scale(core)
    padding, bias = _input(node, 4), _input(node, 5)
    rank = padding.shape.rank() if padding is not None and padding.shape is not None else None
    if padding is not None:
        if rank == 2 and padding.dtype in (ir.DataType.INT32, ir.DataType.INT64):
            core.mask_terms.append(MaskTerm(MaskTermKind.KEEP, padding, key_padding_2d=True))  # 1 = real key
        elif (rank == 1 and _same_batch(padding, q)) or _is_embed_mask_index(padding):
            core.mask_terms.append(MaskTerm(MaskTermKind.KEY_LENGTHS, padding))
        else:
            core.unsupported = "key_padding_mask that is not [B] lengths or a [B, Sk] 0/1 mask"
    if bias is not None:
        core.mask_terms.append(MaskTerm(MaskTermKind.ADDITIVE, bias))
    if _input(node, 3) is not None:  # one bias vector for the Q, K and V projections, in that order
        sizes = [hidden_size(x) for x in (q, k, v)]
        core.input_bias = (_input(node, 3), sizes)
    if k is None or v is None or (k.shape is not None and k.shape.rank() != 3):
        core.unsupported = "packed QKV or 4-D key/value: not converted"
    elif core.input_bias is not None and None in core.input_bias[1]:
        core.unsupported = "projection bias with Q/K/V hidden sizes unknown"
    elif any(_input(node, i) is not None for i in range(6, len(node.inputs))):
        core.unsupported = "past key/value inputs: not converted"
    elif any(_used(node, i) for i in (1, 2, 3)):
        core.unsupported = "present key/value outputs are used"
    elif core.is_causal and not _same_length(q, k, True):
        core.unsupported = "unidirectional with query and key lengths not provably equal"
    return core


def _ms_attention(node: ir.Node) -> AttentionCore:
    """com.microsoft.Attention: packed QKV weights, mask_index in one of several formats."""
    hidden, weights, bias, mask_index = (_input(node, i) for i in range(4))
    heads = _attr(node, "num_heads", 0)
    sizes = _attr(node, "qkv_hidden_sizes", None)
    if sizes is None and weights is not None and weights.shape is not None and isinstance(weights.shape[-1], int):
        sizes = [weights.shape[-1] // 3] * 3
    core = AttentionCore(
        family="com.microsoft-attention",
        output=node.outputs[0],
        query=hidden,
        key=hidden,
        value=hidden,
        nodes=[node],
        is_causal=bool(_attr(node, "unidirectional", 0)),  # no past (checked below): Sq == Sk
        scale=_attr(node, "scale", None),
        packed_heads=(heads, heads),
        q_heads=heads,
        kv_heads=heads,
        projection=(weights, bias, list(sizes)) if sizes else None,
    )
    core.scale = _default_scale(core)
    rank = mask_index.shape.rank() if mask_index is not None and mask_index.shape is not None else None
    if mask_index is not None:
        if rank == 2:
            core.mask_terms.append(MaskTerm(MaskTermKind.KEEP, mask_index, key_padding_2d=True))
        elif (rank == 1 and _same_batch(mask_index, hidden)) or _is_embed_mask_index(mask_index):
            core.mask_terms.append(MaskTerm(MaskTermKind.KEY_LENGTHS, mask_index))
        else:
            core.unsupported = "mask_index format other than [B] lengths or [B, S] 0/1: not converted"
    if _input(node, 5) is not None:
        core.mask_terms.append(MaskTerm(MaskTermKind.ADDITIVE, _input(node, 5)))
    past = _input(node, 4)
    if past is not None or _used(node, 1):  # [2, B, H, P, D]: present = past ++ new on axis 3
        core.kv_cache = KVCache(past, None, _output_if_used(node, 1), None, stacked=True)
    if sizes is None:
        core.unsupported = "QKV hidden sizes unknown"
    elif _attr(node, "past_present_share_buffer", 0) or _input(node, 6) is not None:
        core.unsupported = "past and present share one buffer (past_sequence_length): not converted"
    elif len(set(sizes)) != 1 and core.kv_cache is not None:
        core.unsupported = "KV cache with different Q/K/V hidden sizes"
    elif _attr(node, "do_rotary", 0):
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
    query, key, value, past_key, past_value, seqlens_k, total_length, cos, sin = (_input(node, i) for i in range(9))
    q_heads, kv_heads = _attr(node, "num_heads", 0), _attr(node, "kv_num_heads", 0)
    core = AttentionCore(
        family="com.microsoft-gqa",
        output=node.outputs[0],
        query=query,
        key=key if key is not None else query,
        value=value if value is not None else query,
        nodes=[node],
        is_causal=True,
        scale=_attr(node, "scale", None),
        packed_heads=(q_heads, kv_heads),
        q_heads=q_heads,
        kv_heads=kv_heads,
        # The emitter builds the mask from seqlens_k; listed so the report says "both".
        mask_terms=[MaskTerm(MaskTermKind.KEY_LENGTHS, seqlens_k)] if seqlens_k is not None else [],
    )
    core.scale = _default_scale(core)
    core.softcap = float(_attr(node, "softcap", 0.0) or 0.0)
    window = _attr(node, "local_window_size", -1)
    if window > 0:  # ONNX Runtime's op attends the local_window_size latest keys, its own counted
        core.sliding_window = window
    rotary = (cos, sin, bool(_attr(node, "rotary_interleaved", 0))) if _attr(node, "do_rotary", 0) else None
    core.kv_cache = KVCache(past_key, past_value, _output_if_used(node, 1), _output_if_used(node, 2),
                            seqlens_k=seqlens_k, total_length=total_length, rotary=rotary)
    q_hidden = hidden_size(query)
    if key is None and q_hidden is not None and q_heads and kv_heads:  # packed QKV: [Q | K | V] on the last axis
        head_dim = q_hidden // (q_heads + 2 * kv_heads)
        core.projection = (None, None, [q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim])
    extra = [name for index, name in GQA_UNSUPPORTED_INPUTS.items() if _input(node, index) is not None]
    changed = [name for name, neutral in GQA_NEUTRAL_ATTRIBUTES.items() if _attr(node, name, neutral) != neutral]
    if not q_heads or not kv_heads or q_heads % kv_heads:
        core.unsupported = "num_heads / kv_num_heads missing or not a multiple"
    elif key is None and core.projection is None:
        core.unsupported = "packed QKV with an unknown hidden size"
    elif past_key is None or past_value is None or seqlens_k is None or total_length is None:
        core.unsupported = "GroupQueryAttention without past_key/past_value/seqlens_k/total_sequence_length"
    elif extra:
        core.unsupported = f"GroupQueryAttention input(s) {', '.join(extra)}: not converted"
    elif changed:
        core.unsupported = f"GroupQueryAttention attribute(s) {', '.join(changed)}: not in the IceKNNAttention contract"
    elif core.softcap < 0:
        core.unsupported = f"softcap {core.softcap:g}: below 0"
    elif window == 0 or window < -1:
        core.unsupported = f"local_window_size {window}"
    elif rotary is not None and (cos is None or sin is None):
        core.unsupported = "do_rotary without cos/sin caches"
    elif _used(node, 3):
        core.unsupported = "output_qk is used"
    return core


def _output_if_used(node: ir.Node, index: int) -> ir.Value | None:
    return node.outputs[index] if _used(node, index) else None


def hidden_size(value: ir.Value | None) -> int | None:
    """The static last dim of a [B, S, hidden] value, from its shape or its projection's weights."""
    if value is None:
        return None
    if value.shape is not None and value.shape.rank() and isinstance(value.shape[-1], int):
        return value.shape[-1]
    producer = value.producer()
    if producer is not None and producer.op_type in ("MatMul", "Add") and producer.domain in ("", "ai.onnx"):
        for operand in producer.inputs:
            if operand is not None and operand.const_value is not None and operand.shape.rank() >= 1:
                return operand.shape[-1]
    return None


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
                         nodes=[node], scale=0.0, unsupported=reason, q_heads=_attr(node, "num_heads", None),
                         kv_heads=_attr(node, "kv_num_heads", None) or _attr(node, "num_heads", None))


def _mask_term(mask: ir.Value) -> MaskTerm:
    kind = MaskTermKind.KEEP if mask.dtype == ir.DataType.BOOL else MaskTermKind.ADDITIVE
    return MaskTerm(kind, mask)


def _default_scale(core: AttentionCore) -> float:
    """The op's scale, or 0 (the contract's 'use 1/√D') when the op leaves it to the default."""
    if core.scale is not None and core.scale > 0:
        return float(core.scale)
    return 0.0


def _same_length(q: ir.Value, k: ir.Value, packed: bool) -> bool:
    axis = 1 if packed else 2
    if q.shape is None or k.shape is None or q.shape.rank() <= axis or k.shape.rank() <= axis:
        return q is k
    dq, dk = q.shape[axis], k.shape[axis]
    if isinstance(dq, int) or isinstance(dk, int):
        return dq == dk
    return dq.value is not None and dq.value == dk.value

