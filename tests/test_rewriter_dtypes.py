"""float16 / bfloat16 models: the op computes in float32, so the rewriter casts around it.

Oracles: ONNX Runtime on the unconverted float16 model (a real export converted by
ONNX Runtime's float16 tool), and float64 numpy attention for bfloat16 (which ONNX
Runtime's CPU provider cannot run).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import ice_onnx
from ice_onnx.custom_ops import reference
from ice_onnx.rewriter import convert_model
from test_rewriter_fixtures import ENTRIES, FIXTURES, inputs
from test_rewriter_graphs import B, H, S, D, Graph, convert

FP16_FIXTURES = [e for e in ENTRIES if e["name"] in ("llama_dynamo_eager", "bert_ts17_sdpa")]


def _session(model: onnx.ModelProto, converted: bool = False) -> ort.InferenceSession:
    """ONNX Runtime on one thread; converted models on the native library (else the numpy reference)."""
    if not converted:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
    else:
        try:
            options = ice_onnx.session_options(intra_op_num_threads=1)
        except FileNotFoundError:
            return reference.inference_session(model, intra_op_num_threads=1)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("entry", FP16_FIXTURES, ids=[e["name"] for e in FP16_FIXTURES])
def test_float16_export_converts_and_matches_the_float16_original(entry):
    from onnxruntime.transformers.float16 import convert_float_to_float16

    original = convert_float_to_float16(onnx.load(str(FIXTURES / entry["file"])), keep_io_types=True)
    converted, report = convert(original)
    assert report.replaced == len(report.blocks) == entry["attention_blocks"], report.to_text()
    casts_to_float = [n for n in converted.graph.node if n.op_type == "Cast"
                      and helper.get_attribute_value(n.attribute[0]) == TensorProto.FLOAT]
    assert len(casts_to_float) >= 3 * report.replaced  # Q, K and V of every block
    expected_session = _session(original)
    got_session = _session(converted, converted=True)
    for seed, dims in enumerate(entry["test_shapes"]):
        feeds = inputs.random_inputs(entry, dims, seed=seed)
        expected, got = expected_session.run(None, feeds)[0], got_session.run(None, feeds)[0]
        assert got.dtype == expected.dtype
        # float16 keeps ~3 significant digits: the float32 attention may differ from the
        # float16 one by a few units of the last place of the outputs (|y| < 4 here).
        np.testing.assert_allclose(got.astype(np.float64), expected, atol=4e-3, rtol=0)


def _attention_in(dtype: int, causal: bool):
    """float32 inputs -> Cast to `dtype` -> scaled dot-product attention -> Cast back to float32."""
    g = Graph()
    q, k, v = (g.op("Cast", g.input(n, [B, H, S, D]), to=dtype) for n in "qkv")
    scores = g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2]))
    scores = g.op("Mul", scores, g.op("Cast", g.const(D ** -0.5), to=dtype))
    if causal:
        scores = g.op("Where", _causal_on(g, q), scores, g.op("Cast", g.const(-np.inf), to=dtype))
    out = g.op("MatMul", g.op("Softmax", scores, axis=-1), v)
    return g.model(g.op("Cast", out, to=TensorProto.FLOAT))


def _causal_on(g: Graph, q: str) -> str:
    length = g.op("Gather", g.op("Shape", q), g.const(2, np.int64), axis=0)
    positions = g.op("Range", g.const(0, np.int64), length, g.const(1, np.int64))
    return g.op("LessOrEqual", positions, g.op("Unsqueeze", positions, g.const([1], np.int64)))


def _dense(q, k, v, causal: bool) -> np.ndarray:
    scores = q @ np.swapaxes(k, -1, -2) * D ** -0.5
    if causal:
        scores = np.where(np.tril(np.ones((S, S), bool)), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    return (weights / weights.sum(-1, keepdims=True)) @ v


def _rounded_to_bfloat16(x: np.ndarray) -> np.ndarray:
    bits = x.astype(np.float32).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # round to nearest even
    return rounded.view(np.float32).astype(np.float64)


@pytest.mark.parametrize("causal", [False, True])
def test_bfloat16_attention_is_computed_in_float32(causal):
    model = _attention_in(TensorProto.BFLOAT16, causal)
    converted, report = convert(model)
    (block,) = report.blocks
    assert block.replaced and block.mask == ("causal" if causal else "none")
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((B, H, S, D)).astype(np.float32) for n in "qkv"}
    got = _session(converted, converted=True).run(None, feeds)[0]
    expected = _dense(*(_rounded_to_bfloat16(feeds[n]) for n in "qkv"), causal)
    # The only rounding left is the output's to bfloat16 (8 significant bits).
    np.testing.assert_allclose(got, expected, atol=2 ** -8 * np.abs(expected).max(), rtol=0)


def test_float64_attention_is_reported_not_converted():
    g = Graph()
    q, k, v = (g.input(n, [B, H, S, D], TensorProto.DOUBLE) for n in "qkv")
    out = g.op("MatMul", g.op("Softmax", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2])), axis=-1), v)
    graph = helper.make_graph(g.nodes, "g", g.inputs, [helper.make_tensor_value_info(out, TensorProto.DOUBLE, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    ir_model = ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(model))
    report = convert_model(ir_model)
    (block,) = report.blocks
    assert not block.replaced and "double" in block.reason
    assert [n.op_type for n in ir_model.graph] == [n.op_type for n in model.graph.node]  # untouched
