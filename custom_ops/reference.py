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

from ice_onnx.custom_ops.contract import DOMAIN, OP_TYPE, Attributes, is_key_padding_mask

EXTENSIONS_DOMAIN = "ai.onnx.contrib"
_VARIANTS = {None: OP_TYPE, "bool": OP_TYPE + "BoolMask", "float": OP_TYPE + "FloatMask"}


def allowed_keys(mask, is_causal: bool, shape: tuple[int, int, int, int]) -> np.ndarray:
    """Bool [B, Hq, Sq, Sk]: which key each query may attend (the contract's mask semantics)."""
    _, _, sq, sk = shape
    allowed = np.ones(shape, dtype=bool)
    if mask is not None:
        mask = np.asarray(mask)
        allowed = allowed & (np.broadcast_to(mask, shape) if mask.dtype == bool
                             else np.broadcast_to(mask != -np.inf, shape))
    if is_causal:
        rows = np.arange(sq)[:, None] + (sk - sq)
        allowed = allowed & (np.arange(sk)[None, :] <= rows)
    return allowed


def attention(q, k, v, attn_mask=None, attrs: Attributes = Attributes(), dense: bool = False):
    """The contract in float64: exact attention, or top-k attention with a perfect index.

    `dense=True` forces exact mode whatever the attributes say.
    """
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"Hq={hq} is not a multiple of Hkv={hkv}")
    group = hq // hkv
    k = np.repeat(k, group, axis=1)
    v = np.repeat(v, group, axis=1)

    scores = np.einsum("bhqd,bhkd->bhqk", q, k) * attrs.resolved_scale(d)
    if attn_mask is not None and np.asarray(attn_mask).dtype != bool:
        scores = scores + np.broadcast_to(np.asarray(attn_mask, dtype=np.float64), scores.shape)
    allowed = allowed_keys(attn_mask, bool(attrs.is_causal), scores.shape)

    padding_only = attn_mask is None or is_key_padding_mask(np.asarray(attn_mask), b, sk)
    if not dense and not attrs.compensate and attrs.uses_knn(sk, sq * group, padding_only):
        always = attrs.always_attended(sq, sk, bool(attrs.is_causal))
        searched = allowed & ~always
        allowed = allowed & (always | _top_k_by_inner_product(q, k, searched, attrs.top_k))

    scores = np.where(allowed, scores, -np.inf)
    row_max = scores.max(axis=-1, keepdims=True)
    # NaN scores (from NaN inputs) must propagate as in dense attention.
    weights = np.exp(scores - np.where(np.isfinite(row_max), row_max, 0.0))
    weights = weights / weights.sum(axis=-1, keepdims=True)
    y = weights @ v
    # The contract: a row with no allowed key outputs the mean of V over all keys.
    empty = ~allowed.any(axis=-1)
    y = np.where(empty[..., None], v.mean(axis=2, keepdims=True), y)
    return y


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

    for kind, op_type in _VARIANTS.items():
        def kernel(q, k, v, mask=None, **attrs):
            return attention(q, k, v, mask, Attributes(**attrs)).astype(np.float32)

        onnx_op(op_type=op_type, inputs=qkv + mask_types[kind], outputs=[PyCustomOpDef.dt_float],
                attrs=attr_types)(kernel)


def to_reference_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose IceKNNAttention nodes run on the numpy reference."""
    model = copy.deepcopy(model)
    dtypes = _value_types(model)
    defaults = Attributes().as_node_attributes()
    for graph in _graphs(model.graph):
        for node in graph.node:
            if node.domain != DOMAIN or node.op_type != OP_TYPE:
                continue
            has_mask = len(node.input) > 3 and node.input[3] != ""
            kind = None
            if has_mask:
                kind = "bool" if dtypes.get(node.input[3]) == onnx.TensorProto.BOOL else "float"
            else:
                del node.input[3:]
            node.domain, node.op_type = EXTENSIONS_DOMAIN, _VARIANTS[kind]
            given = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            del node.attribute[:]
            for name, default in defaults.items():
                node.attribute.append(onnx.helper.make_attribute(name, given.get(name, default)))
    if not any(op.domain == EXTENSIONS_DOMAIN for op in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(EXTENSIONS_DOMAIN, 1))
    return model


def session_options(**options):
    """SessionOptions with onnxruntime-extensions (and so the reference variants) registered."""
    import onnxruntime as ort
    from onnxruntime_extensions import get_library_path

    _register_variants()
    so = ort.SessionOptions()
    so.register_custom_ops_library(get_library_path())
    for name, value in options.items():
        setattr(so, name, value)
    return so


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
