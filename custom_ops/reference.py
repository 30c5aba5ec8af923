"""A numpy implementation of the IceKNNAttention contract, runnable in ONNX Runtime
through onnxruntime-extensions where the native library is not available.

It is the contract with a perfect index: in kNN mode the retrieved keys are the
exact top-k by q·k (the oracle the native kernel's recall is measured against),
and with `compensate = 1` the estimate of the other keys is perfect too, so the
result equals exact attention; with `compensate = 0` it is pure top-k attention.
It routes between exact and kNN mode by the contract's rule
(`Attributes.uses_knn`). It computes in float64.

onnxruntime-extensions registers Python ops in its own domain (`ai.onnx.contrib`)
with a fixed input signature, so `to_reference_model` retargets each node to one
of three registered variants: no mask, bool mask, float mask.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import fields

import numpy as np
import onnx

from ice_onnx.custom_ops.contract import (DOMAIN, OP_TYPE, Attributes, is_key_padding_mask,
                                          refuse_unknown_node_attributes)

EXTENSIONS_DOMAIN = "ai.onnx.contrib"
_MASK_KINDS = {None: "", "bool": "BoolMask", "float": "FloatMask"}
_LENGTH_KINDS = {None: "", "int32": "Int32Lengths", "int64": "Int64Lengths"}
# One registered op per (mask kind, key_lengths kind): the extensions' signatures are fixed.
_VARIANTS = {(mask, lengths): OP_TYPE + mask_name + length_name
             for mask, mask_name in _MASK_KINDS.items() for lengths, length_name in _LENGTH_KINDS.items()}


def allowed_keys(mask, is_causal: bool, shape: tuple[int, int, int, int], sliding_window: int = 0,
                 positions=None) -> np.ndarray:
    """Bool [B, Hq, Sq, Sk]: which key each query may attend (the contract's mask semantics:
    the mask, causality j <= p, the window j > p - sliding_window, p = i + Sk - Sq the query's
    aligned position, or `positions[i]` when given: rows sampled from a longer query sequence)."""
    _, _, sq, sk = shape
    allowed = np.ones(shape, dtype=bool)
    if mask is not None:
        mask = np.asarray(mask)
        allowed = allowed & (np.broadcast_to(mask, shape) if mask.dtype == bool
                             else np.broadcast_to(mask != -np.inf, shape))
    position = (np.arange(sq) + (sk - sq) if positions is None else np.asarray(positions))[:, None]
    keys = np.arange(sk)[None, :]
    if is_causal:
        allowed = allowed & (keys <= position)
    if sliding_window > 0:
        allowed = allowed & (keys > position - sliding_window)
    return allowed


def attention(q, k, v, attn_mask=None, attrs: Attributes = Attributes(), dense: bool = False, key_lengths=None):
    """The contract in float64: exact attention, or top-k attention with a perfect index.

    `dense=True` forces exact mode whatever the attributes say. `key_lengths` ([B] ints):
    batch element b has only its first key_lengths[b] keys (a shared KV buffer); the
    rest of K and V is never read.
    """
    if key_lengths is not None:
        return _attention_on_real_keys(q, k, v, attn_mask, attrs, dense, np.asarray(key_lengths))
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    b, hq, sq, _ = q.shape
    sk = k.shape[2]
    scores, allowed = _scores(q, k, attn_mask, attrs)
    group = hq // k.shape[1]
    padding_only = attn_mask is None or is_key_padding_mask(np.asarray(attn_mask), b, sk)
    if not dense and not attrs.compensate and attrs.uses_knn(sk, sq * group, padding_only):
        always = attrs.always_attended(sq, sk, bool(attrs.is_causal))
        searched = allowed & ~always
        allowed = allowed & (always | _top_k_by_inner_product(q, np.repeat(k, group, axis=1), searched, attrs.top_k))
    v = np.repeat(v, group, axis=1)
    y = _softmax(scores, allowed) @ v
    # The contract: a row with no allowed key outputs the mean of V over the keys (0
    # without keys), or 0 with empty_rows = "zero".
    empty = ~allowed.any(axis=-1)
    if attrs.empty_rows == "zero" or sk == 0:
        fill = np.zeros_like(y[..., :1, :])
    else:
        fill = v.mean(axis=2, keepdims=True)
    return np.where(empty[..., None], fill, y)


def attention_weights(q, k, attn_mask=None, attrs: Attributes = Attributes(), positions=None):
    """Exact attention's softmax weights in float64, [B, Hq, Sq, Sk] (rows with no allowed
    key all 0), and the allowed keys (bool, the same shape). `positions`: each query row's
    aligned position when the rows are a sample of a longer query sequence."""
    q, k = (np.asarray(x, dtype=np.float64) for x in (q, k))
    scores, allowed = _scores(q, k, attn_mask, attrs, positions)
    return np.where(allowed.any(axis=-1, keepdims=True), _softmax(scores, allowed), 0.0), allowed


def _scores(q, k, attn_mask, attrs: Attributes, positions=None):
    """Scaled, soft-capped, mask-biased scores [B, Hq, Sq, Sk] (float64 inputs; K shared by
    each group of Hq / Hkv query heads) and the keys each query may attend."""
    hq, d = q.shape[1], q.shape[3]
    hkv = k.shape[1]
    if hq % hkv:
        raise ValueError(f"Hq={hq} is not a multiple of Hkv={hkv}")
    k = np.repeat(k, hq // hkv, axis=1)
    scores = np.einsum("bhqd,bhkd->bhqk", q, k) * attrs.resolved_scale(d)
    if attrs.softcap > 0:  # before the mask, as in ONNX Attention
        scores = attrs.softcap * np.tanh(scores / attrs.softcap)
    if attn_mask is not None and np.asarray(attn_mask).dtype != bool:
        scores = scores + np.broadcast_to(np.asarray(attn_mask, dtype=np.float64), scores.shape)
    return scores, allowed_keys(attn_mask, bool(attrs.is_causal), scores.shape, attrs.sliding_window, positions)


def _softmax(scores, allowed):
    """Softmax over the allowed keys; NaN scores (from NaN inputs) propagate as in dense
    attention, and rows with no allowed key are NaN (the caller fills them)."""
    scores = np.where(allowed, scores, -np.inf)
    row_max = scores.max(axis=-1, keepdims=True, initial=-np.inf)
    weights = np.exp(scores - np.where(np.isfinite(row_max), row_max, 0.0))
    with np.errstate(invalid="ignore"):
        return weights / weights.sum(axis=-1, keepdims=True)


def _attention_on_real_keys(q, k, v, attn_mask, attrs, dense, key_lengths):
    """`attention` batch element by batch element over the keys each one has."""
    b, sk = np.shape(q)[0], np.shape(k)[2]
    lengths = key_lengths.reshape(-1)
    if key_lengths.shape != (b,) or (lengths < 0).any() or (lengths > sk).any():
        raise ValueError(f"key_lengths must be [B={b}] values in [0, {sk}], got {key_lengths!r}")
    mask = None if attn_mask is None else np.asarray(attn_mask)
    if mask is not None:
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    parts = []
    for e, n in enumerate(int(x) for x in lengths):
        element_mask = None
        if mask is not None:  # keep its broadcast shape (a key-padding mask stays one)
            element_mask = mask[e:e + 1] if mask.shape[0] == b else mask
            element_mask = element_mask[..., :n] if mask.shape[3] == sk else element_mask
        parts.append(attention(q[e:e + 1], k[e:e + 1, :, :n], v[e:e + 1, :, :n], element_mask, attrs, dense))
    return np.concatenate(parts)


def _top_k_by_inner_product(q, k, allowed, top_k: int) -> np.ndarray:
    """Bool mask of the top_k allowed keys per query by q·k (ties broken by lower index)."""
    dots = np.where(allowed, np.einsum("bhqd,bhkd->bhqk", q, k), -np.inf)
    order = np.argsort(-dots, axis=-1, kind="stable")[..., :top_k]
    chosen = np.zeros_like(allowed)
    np.put_along_axis(chosen, order, True, axis=-1)
    return chosen & allowed


# ---- running converted models through onnxruntime-extensions -------------------------


@functools.cache
def _register_variants() -> None:
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    python_to_onnx = {int: PyCustomOpDef.dt_int64, float: PyCustomOpDef.dt_float, str: PyCustomOpDef.dt_string}
    attr_types = {f.name: python_to_onnx[type(f.default)] for f in fields(Attributes)}
    qkv = [PyCustomOpDef.dt_float] * 3
    mask_types = {None: [], "bool": [PyCustomOpDef.dt_bool], "float": [PyCustomOpDef.dt_float]}
    length_types = {None: [], "int32": [PyCustomOpDef.dt_int32], "int64": [PyCustomOpDef.dt_int64]}

    for (mask_kind, lengths_kind), op_type in _VARIANTS.items():
        def kernel(q, k, v, *extra, _with_mask=mask_kind is not None, **attrs):
            mask = extra[0] if _with_mask else None
            lengths = extra[-1] if len(extra) > int(_with_mask) else None
            return attention(q, k, v, mask, Attributes(**attrs), key_lengths=lengths).astype(np.float32)

        onnx_op(op_type=op_type, inputs=qkv + mask_types[mask_kind] + length_types[lengths_kind],
                outputs=[PyCustomOpDef.dt_float], attrs=attr_types)(kernel)


def to_reference_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose IceKNNAttention nodes run on the numpy reference; a node
    attribute the contract does not define is an UnknownAttributeError, as the native
    kernel would ignore it."""
    model = copy.deepcopy(model)
    dtypes = _value_types(model)
    defaults = Attributes().as_node_attributes()
    for graph in _graphs(model.graph):
        for node in graph.node:
            if node.domain != DOMAIN or node.op_type != OP_TYPE:
                continue
            inputs = list(node.input) + [""] * (5 - len(node.input))
            mask_kind = lengths_kind = None
            if inputs[3]:
                mask_kind = "bool" if dtypes.get(inputs[3]) == onnx.TensorProto.BOOL else "float"
            if inputs[4]:
                lengths_kind = "int32" if dtypes.get(inputs[4]) == onnx.TensorProto.INT32 else "int64"
            del node.input[:]
            node.input.extend(name for name in inputs if name)
            node.domain, node.op_type = EXTENSIONS_DOMAIN, _VARIANTS[(mask_kind, lengths_kind)]
            refuse_unknown_node_attributes(node)
            given = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            del node.attribute[:]
            for name, default in defaults.items():
                node.attribute.append(onnx.helper.make_attribute(name, given.get(name, default)))
    if not any(op.domain == EXTENSIONS_DOMAIN for op in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(EXTENSIONS_DOMAIN, 1))
    return model


def session_options(**options):
    """SessionOptions with onnxruntime-extensions (and so the reference variants) registered."""
    from onnxruntime_extensions import get_library_path

    from ice_onnx.custom_ops.loader import build_session_options

    _register_variants()
    return build_session_options([get_library_path()], **options)


def inference_session(model: onnx.ModelProto, **options):
    """An onnxruntime.InferenceSession running a converted model on the reference."""
    import onnxruntime as ort

    return ort.InferenceSession(to_reference_model(model).SerializeToString(),
                                session_options(**options), providers=["CPUExecutionProvider"])


def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            for sub in attr.graphs:
                yield from _graphs(sub)


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every value that has one, after shape inference."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # unknown custom domains can stop inference: use what is declared
        inferred = model
    types = {}
    for graph in _graphs(inferred.graph):
        for info in [*graph.input, *graph.output, *graph.value_info]:
            if info.type.HasField("tensor_type"):
                types[info.name] = info.type.tensor_type.elem_type
        for init in graph.initializer:
            types[init.name] = init.data_type
    return types
