"""Small hand-built attention graphs, one per shape variant the rules must see through.

Each graph takes Q, K, V (and masks) as inputs; the oracle is ONNX Runtime on the
unconverted graph, and the converted one runs on the numpy reference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from ice_onnx.custom_ops import contract, reference
from ice_onnx.rewriter import convert_model, inspect_model

B, H, HKV, S, D = 2, 4, 2, 6, 8
F = TensorProto.FLOAT


class Graph:
    """A tiny builder: named nodes and constants, float inputs [B, ·, S, D] by default."""

    def __init__(self):
        self.nodes, self.inits, self.inputs = [], [], []

    def input(self, name, shape, dtype=F):
        self.inputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def const(self, value, dtype=np.float32):
        name = f"c{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type, *inputs, domain="", **attrs):
        name = f"{op_type.lower()}{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], domain=domain, **attrs))
        return name

    def model(self, output, opset=17, extra_opsets=()):
        graph = helper.make_graph(self.nodes, "g", self.inputs, [helper.make_tensor_value_info(output, F, None)],
                                  initializer=self.inits)
        opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, v) for d, v in extra_opsets)]
        return helper.make_model(graph, opset_imports=opsets)


def qkv(g: Graph, kv_heads=H, key_layout="BHSD"):
    q = g.input("q", [B, H, S, D])
    k = g.input("k", [B, S, kv_heads, D] if key_layout == "BSHD" else [B, kv_heads, S, D])
    v = g.input("v", [B, kv_heads, S, D])
    return q, k, v


def key_padding(g: Graph):
    """The float key-padding mask from an int attention_mask, [B, 1, 1, S]."""
    m = g.input("attention_mask", [B, S], TensorProto.INT64)
    inverted = g.op("Sub", g.const(1.0), g.op("Cast", m, to=F))
    return g.op("Unsqueeze", g.op("Mul", inverted, g.const(np.finfo(np.float32).min)), g.const([1, 2], np.int64))


def causal_bool(g: Graph):
    """Causal from LessOrEqual(Range, Range) as TorchScript exports it, [S, S] bool."""
    length = g.op("Gather", g.op("Shape", "q"), g.const(2, np.int64), axis=0)
    positions = g.op("Range", g.const(0, np.int64), length, g.const(1, np.int64))
    rows = g.op("Unsqueeze", positions, g.const([1], np.int64))
    return g.op("LessOrEqual", positions, rows)  # key j <= query i


def feeds_for(model: onnx.ModelProto, seed=0):
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.input:
        shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
        if value.type.tensor_type.elem_type == TensorProto.INT64:
            mask = np.ones(shape, np.int64)
            mask[1, -2:] = 0
            feeds[value.name] = mask
        else:
            feeds[value.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def convert(model: onnx.ModelProto, **options):
    ir_model = ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(model))
    report = convert_model(ir_model, "test")
    return ir.serde.serialize_model(ir_model), report


def assert_same_outputs(original: onnx.ModelProto, converted: onnx.ModelProto, atol=1e-5):
    feeds = feeds_for(original)
    expected = ort.InferenceSession(original.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = reference.inference_session(converted).run(None, feeds)[0]
    np.testing.assert_allclose(got, expected, atol=atol)


def attention_tail(g: Graph, scores, v, mask=None, where_keep=None, nan_guard=False, casts=False):
    if mask is not None:
        scores = g.op("Add", mask, scores)  # mask first: the rules must commute
    if where_keep is not None:
        scores = g.op("Where", where_keep, scores, g.const(-np.inf))
    probs = g.op("Softmax", scores, axis=-1)
    if nan_guard:
        probs = g.op("Where", g.op("IsNaN", probs), g.const([0.0]), probs)
    if casts:
        probs = g.op("Cast", g.op("Cast", probs, to=TensorProto.DOUBLE), to=F)
    return g.op("MatMul", probs, v)


def ice_node(model: onnx.ModelProto) -> dict:
    (node,) = [n for n in model.graph.node if n.op_type == contract.OP_TYPE]
    return {a.name: helper.get_attribute_value(a) for a in node.attribute} | {"inputs": list(node.input)}


def test_sqrt_scale_on_both_sides_padding_and_commuted_add():
    g = Graph()
    q, k, v = qkv(g, key_layout="BSHD")
    root = g.const(D ** -0.25)
    scores = g.op("MatMul", g.op("Mul", q, root), g.op("Mul", g.op("Transpose", k, perm=[0, 2, 3, 1]), root))
    model = g.model(attention_tail(g, scores, v, mask=key_padding(g)))
    converted, report = convert(model)
    (block,) = report.blocks
    assert block.replaced and block.mask == "padding"
    assert block.scale == pytest.approx(D ** -0.5, rel=1e-6)
    assert ice_node(converted)["is_causal"] == 0
    assert_same_outputs(model, converted)
    assert not any(n.op_type in ("Sub", "Softmax") for n in converted.graph.node)


def test_causal_where_with_nan_guard_and_cast_pair_gqa_repeat():
    g = Graph()
    q, k, v = qkv(g, kv_heads=HKV)

    def repeat(x):
        expanded = g.op("Expand", g.op("Unsqueeze", x, g.const([2], np.int64)),
                        g.const([B, HKV, H // HKV, S, D], np.int64))
        return g.op("Reshape", expanded, g.const([B, H, S, D], np.int64))

    scores = g.op("Div", g.op("MatMul", q, g.op("Transpose", repeat(k), perm=[0, 1, 3, 2])), g.const(D ** 0.5))
    out = attention_tail(g, scores, repeat(v), where_keep=causal_bool(g), nan_guard=True, casts=True)
    model = g.model(out)
    converted, report = convert(model)
    (block,) = report.blocks
    assert block.replaced and block.mask == "causal" and block.kv_heads == HKV
    attrs = ice_node(converted)
    assert attrs["is_causal"] == 1 and attrs["inputs"][1] == "k" and len(attrs["inputs"]) == 3
    assert_same_outputs(model, converted)
    assert not any(n.op_type in ("Range", "LessOrEqual", "Expand") for n in converted.graph.node)


def test_score_bias_is_passed_through_and_kept_exact():
    g = Graph()
    q, k, v = qkv(g)
    bias = g.input("position_bias", [1, H, S, S])  # T5-style relative position bias
    scores = g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2]))  # T5: no scale
    model = g.model(attention_tail(g, g.op("Add", scores, bias), v, mask=key_padding(g)))
    converted, report = convert(model)
    (block,) = report.blocks
    assert block.replaced and block.always_exact and block.mask == "bias" and block.scale == 1.0
    assert ice_node(converted)["exact_below"] == contract.ALWAYS_EXACT
    assert_same_outputs(model, converted)


def test_where_fill_of_nan_is_not_a_blocking_value():
    """Where(causal, scores, NaN) behind a NaN guard zeroes every row with a blocked key: not causal."""
    g = Graph()
    q, k, v = qkv(g)
    scores = g.op("Mul", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2])), g.const(D ** -0.5))
    scores = g.op("Where", causal_bool(g), scores, g.const(np.nan))
    probs = g.op("Softmax", scores, axis=-1)
    model = g.model(g.op("MatMul", g.op("Where", g.op("IsNaN", probs), g.const(0.0), probs), v))
    converted, report = convert(model)
    assert report.blocks and report.replaced == 0, report.to_text()
    assert_same_outputs(model, converted)


def test_general_bool_mask_is_passed_through():
    g = Graph()
    q, k, v = qkv(g)
    window = g.input("window", [S, S], TensorProto.BOOL)  # an arbitrary pattern: not causal, not padding
    scores = g.op("Mul", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2])), g.const(D ** -0.5))
    model = g.model(attention_tail(g, scores, v, where_keep=window))
    converted, report = convert(model)
    (block,) = report.blocks
    assert block.replaced and block.mask == "general" and not block.always_exact
    assert ice_node(converted)["inputs"][3] == "window"
    feeds = feeds_for(model)
    feeds["window"] = np.tril(np.ones((S, S), bool), 1) & np.triu(np.ones((S, S), bool), -2)
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_allclose(reference.inference_session(converted).run(None, feeds)[0], expected, atol=1e-5)


def test_onnx_attention_op_with_bool_padding_mask():
    g = Graph()
    q, k, v = qkv(g)
    m = g.input("attention_mask", [B, S], TensorProto.INT64)
    keep = g.op("Unsqueeze", g.op("Cast", m, to=TensorProto.BOOL), g.const([1, 2], np.int64))
    keep = g.op("Expand", keep, g.const([B, 1, S, S], np.int64))  # ORT's Attention wants Sq rows
    model = g.model(g.op("Attention", q, k, v, keep, scale=0.2), opset=23)
    converted, report = convert(model)
    (block,) = report.blocks
    assert block.family == "onnx-attention" and block.mask == "padding" and block.scale == pytest.approx(0.2)
    assert_same_outputs(model, converted)


def test_com_microsoft_mha_packed_heads():
    g = Graph()
    q = g.input("q", [B, S, H * D])
    k = g.input("k", [B, S, H * D])
    v = g.input("v", [B, S, H * D])
    model = g.model(g.op("MultiHeadAttention", q, k, v, domain="com.microsoft", num_heads=H),
                    extra_opsets=[("com.microsoft", 1)])
    converted, report = convert(model)
    (block,) = report.blocks
    assert block.replaced and block.q_heads == H and block.head_dim == D
    assert_same_outputs(model, converted)


def test_attention_probabilities_used_elsewhere_still_correct():
    """If the Softmax output is also a graph output, it stays; the block is still replaced correctly."""
    g = Graph()
    q, k, v = qkv(g)
    scores = g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2]))
    out = attention_tail(g, scores, v)
    model = g.model(out)
    (softmax,) = [n for n in model.graph.node if n.op_type == "Softmax"]
    model.graph.output.append(helper.make_tensor_value_info(softmax.output[0], F, None))
    converted, report = convert(model)
    assert report.replaced == 1
    assert any(n.op_type == "Softmax" for n in converted.graph.node)
    assert_same_outputs(model, converted)


FIXTURE = Path(__file__).parent / "fixtures" / "models" / "bert_ts17_eager.onnx"


@pytest.mark.skipif(not FIXTURE.exists(), reason="fixture not exported")
def test_ort_transformer_optimizer_output(tmp_path):
    """com.microsoft.Attention (packed QKV weights, mask_index from EmbedLayerNormalization)."""
    from onnxruntime.transformers import optimizer

    fused_path = tmp_path / "fused.onnx"
    optimizer.optimize_model(str(FIXTURE), model_type="bert", num_heads=4, hidden_size=32,
                             opt_level=0).save_model_to_file(str(fused_path))
    fused = onnx.load(str(fused_path))
    assert any(n.op_type == "Attention" and n.domain == "com.microsoft" for n in fused.graph.node)
    converted, report = convert(fused)
    assert report.replaced == len(report.blocks) == 2
    assert {b.mask for b in report.blocks} == {"padding"} and report.blocks[0].head_dim == 8
    feeds = {"input_ids": np.random.default_rng(0).integers(0, 100, (2, 7)),
             "attention_mask": np.array([[1] * 7, [1] * 4 + [0] * 3])}
    expected = ort.InferenceSession(str(fused_path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = reference.inference_session(converted).run(None, feeds)[0]
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_com_microsoft_mha_with_qkv_bias_and_key_lengths():
    """ORT's fusion of BERT: one bias vector for Q, K, V and [B] key lengths as the padding mask."""
    g = Graph()
    x = g.input("x", [B, S, H * D])
    q, k, v = (g.op("MatMul", x, g.const(np.random.default_rng(i).standard_normal((H * D, H * D)) * 0.2))
               for i in range(3))
    bias = g.const(np.random.default_rng(3).standard_normal(3 * H * D))
    lengths = g.input("lengths", [B], TensorProto.INT32)
    model = g.model(g.op("MultiHeadAttention", q, k, v, bias, lengths, domain="com.microsoft", num_heads=H),
                    extra_opsets=[("com.microsoft", 1)])
    converted, report = convert(model)
    (block,) = report.blocks
    assert block.replaced and block.mask == "padding" and block.head_dim == D
    feeds = {"x": np.random.default_rng(4).standard_normal((B, S, H * D)).astype(np.float32),
             "lengths": np.array([S, S - 2], np.int32)}
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_allclose(reference.inference_session(converted).run(None, feeds)[0], expected, atol=1e-5)


@pytest.mark.parametrize("padding", [False, True])
def test_gqa_with_query_folded_onto_kv_heads(padding):
    """GQA without repeating K/V: Q [B, H, S, D] reshaped to [B, Hkv, n_rep·S, D]. Every query row
    is its own softmax, so the folded query is plain attention over the kv heads (Hq = Hkv, Sq = n_rep·S)."""
    g = Graph()
    q, k, v = qkv(g, kv_heads=HKV)
    folded = g.op("Reshape", q, g.const([B, HKV, (H // HKV) * S, D], np.int64))
    scores = g.op("Mul", g.op("MatMul", folded, g.op("Transpose", k, perm=[0, 1, 3, 2])), g.const(D ** -0.5))
    out = attention_tail(g, scores, v, mask=key_padding(g) if padding else None)
    model = g.model(g.op("Reshape", out, g.const([B, H, S, D], np.int64)))
    converted, report = convert(model)
    (block,) = report.blocks
    assert block.replaced and block.mask == ("padding" if padding else "none"), report.to_text()
    assert_same_outputs(model, converted)


def _symbolic_causal_window(window: int | None):
    """Causal (∧ j > i − window) over a symbolic length S, as transformers' sliding-window masks
    compare positions: q, k, v are [B, H, "S", D]."""
    g = Graph()
    q, k, v = (g.input(n, [B, H, "S", D]) for n in ("q", "k", "v"))
    keep = causal_bool(g)
    if window is not None:
        length = g.op("Gather", g.op("Shape", "q"), g.const(2, np.int64), axis=0)
        positions = g.op("Range", g.const(0, np.int64), length, g.const(1, np.int64))
        rows = g.op("Unsqueeze", positions, g.const([1], np.int64))
        keep = g.op("And", keep, g.op("Greater", positions, g.op("Sub", rows, g.const(window, np.int64))))
    scores = g.op("Mul", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2])), g.const(D ** -0.5))
    return g.model(attention_tail(g, scores, v, where_keep=keep))


def _run_at(model: onnx.ModelProto, converted: onnx.ModelProto, length: int):
    rng = np.random.default_rng(length)
    feeds = {n: rng.standard_normal((B, H, length, D)).astype(np.float32) for n in ("q", "k", "v")}
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_allclose(reference.inference_session(converted).run(None, feeds)[0], expected, atol=1e-5)


def test_sliding_window_is_never_taken_for_causal():
    """causal ∧ j > i − 16 looks causal at every length up to 16: the mask is probed past its
    constants, and the window becomes the node's (no S×S mask left)."""
    model = _symbolic_causal_window(16)
    converted, report = convert(model)
    (block,) = report.blocks
    assert block.replaced and block.mask == "sliding-window" and block.reason == "sliding window 16", report.to_text()
    attributes = ice_node(converted)
    assert (attributes["sliding_window"], attributes["is_causal"], len(attributes["inputs"])) == (16, 1, 3)
    for length in (8, 17, 64):  # inside the window, just past it, far past it
        _run_at(model, converted, length)


def test_window_beyond_the_probe_range_keeps_the_mask():
    """A constant too large to probe past: not proven causal, so the mask is passed through unchanged."""
    model = _symbolic_causal_window(10 ** 6)
    converted, report = convert(model)
    (block,) = report.blocks
    assert block.replaced and block.mask == "general", report.to_text()
    assert "1000000" in block.reason
    _run_at(model, converted, 40)


def test_a_small_table_in_the_mask_does_not_hide_a_longer_window():
    """A mask reading an [8, 8] table (its pattern could end at 8) and comparing positions with a
    window of 40: the table may not shorten the probe while the mask still runs past it."""
    g = Graph()
    q, k, v = (g.input(n, [B, H, "S", D]) for n in ("q", "k", "v"))
    length = g.op("Gather", g.op("Shape", "q"), g.const(2, np.int64), axis=0)
    positions = g.op("Range", g.const(0, np.int64), length, g.const(1, np.int64))
    rows = g.op("Unsqueeze", positions, g.const([1], np.int64))
    keep = g.op("And", g.op("LessOrEqual", positions, rows),
                g.op("Greater", positions, g.op("Sub", rows, g.const(40, np.int64))))
    table_says_yes = g.op("Greater", g.op("ReduceMax", g.const(np.ones((8, 8))), keepdims=0), g.const(0.0))
    keep = g.op("And", keep, table_says_yes)
    scores = g.op("Mul", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2])), g.const(D ** -0.5))
    model = g.model(attention_tail(g, scores, v, where_keep=keep))
    converted, report = convert(model)
    (block,) = report.blocks
    assert block.mask == "sliding-window" and block.reason == "sliding window 40", report.to_text()
    _run_at(model, converted, 64)


def test_plain_causal_with_symbolic_length_is_still_causal():
    model = _symbolic_causal_window(None)
    converted, report = convert(model)
    (block,) = report.blocks
    assert block.replaced and block.mask == "causal", report.to_text()
    _run_at(model, converted, 40)


@pytest.mark.parametrize("divides", [False, True])
def test_scale_that_is_also_a_graph_input_is_read_at_run_time(divides):
    """An initializer listed as a graph input is only a default: the converted model reads the fed value."""
    g = Graph()
    q, k, v = qkv(g)
    scale = g.const(D ** 0.5 if divides else D ** -0.5)
    g.inputs.append(helper.make_tensor_value_info(scale, F, []))  # overridable
    scores = g.op("Div" if divides else "Mul", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2])), scale)
    model = g.model(attention_tail(g, scores, v, mask=key_padding(g)))
    converted, report = convert(model)
    (block,) = report.blocks
    assert block.replaced and block.mask == "padding", report.to_text()
    assert scale in block.reason
    feeds = feeds_for(model)
    original = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ice = reference.inference_session(converted)
    for value in (3.0, -0.7):  # not the initializer's value, either sign
        feeds[scale] = np.array(value, np.float32)
        np.testing.assert_allclose(ice.run(None, feeds)[0], original.run(None, feeds)[0], atol=1e-5)


def test_non_scalar_scale_input_is_reported_not_converted():
    g = Graph()
    q, k, v = qkv(g)
    scale = g.input("per_key_scale", [1, 1, 1, S])  # scales keys, not queries: no place in the op
    scores = g.op("Mul", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2])), scale)
    converted, report = convert(g.model(attention_tail(g, scores, v)))
    (block,) = report.blocks
    assert not block.replaced and "per_key_scale" in block.reason, report.to_text()


@pytest.mark.parametrize("op", ["sdpa", "Attention"])
def test_mask_fed_as_a_4d_input_is_kept(op):
    """A mask that is itself a graph input depends on what is fed: never "none" (dropped)."""
    g = Graph()
    q, k, v = qkv(g)
    keep = g.input("keep", [B, 1, S, S], TensorProto.BOOL)
    if op == "sdpa":
        scores = g.op("Mul", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2])), g.const(D ** -0.5))
        model = g.model(attention_tail(g, scores, v, where_keep=keep))
    else:
        model = g.model(g.op("Attention", q, k, v, keep), opset=23)
    converted, report = convert(model)
    (block,) = report.blocks
    assert block.replaced and block.mask == "general", report.to_text()
    feeds = feeds_for(model)
    feeds["keep"] = np.random.default_rng(5).random((B, 1, S, S)) < 0.6
    feeds["keep"][..., 0] = True  # every row sees a key (an empty row is another test)
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_allclose(reference.inference_session(converted).run(None, feeds)[0], expected, atol=1e-5)


def test_chained_unnamed_attention_nodes():
    """A block reading the previous block's output as its Q reads the new output (not the replaced
    op's); new node names stay unique (ONNX Runtime refuses duplicates) though exported nodes have none."""
    g = Graph()
    q, k, v = qkv(g)
    first = g.op("Attention", q, k, v)
    model = g.model(g.op("Attention", first, k, v), opset=23)
    for node in model.graph.node:
        node.name = ""
    converted, report = convert(model)
    assert report.replaced == 2
    assert [n.op_type for n in converted.graph.node] == [contract.OP_TYPE] * 2
    names = [n.name for n in converted.graph.node]
    assert len(names) == len(set(names))
    assert_same_outputs(model, converted)
