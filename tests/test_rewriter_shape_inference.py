"""ONNX Runtime's own tools on converted models: symbolic shape inference and int8 quantization.

`ice_onnx.shape_inference` gives ORT's SymbolicShapeInference a handler for IceKNNAttention.
Oracles: the contract's output shape [B, Hq, Sq, Dv] at run time, ORT on the unconverted model,
and ORT's own quantization of the unconverted model.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import ice_onnx
from ice_onnx import shape_inference
from ice_onnx.custom_ops import contract
from ice_onnx.rewriter import convert_file
from cli_support import every_node
from test_rewriter_fixtures import ENTRIES, FIXTURES, inputs

# A plain encoder, a decoder with a KV cache and an empty-row guard (a padded batch), and
# genai's GroupQueryAttention model (the node inside an If branch).
SHAPED = [e for e in ENTRIES if e["name"] in ("bert_ts14_eager", "gpt2_past_dynamo_sdpa", "llama_past_genai_gqa")]
pytestmark = pytest.mark.skipif(not SHAPED, reason="fixtures not exported")


def _session(path, converted: bool) -> ort.InferenceSession:
    options = ice_onnx.session_options(intra_op_num_threads=1) if converted else ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _dims(value_info: onnx.ValueInfoProto) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("converted")
    paths = {}
    for entry in SHAPED:
        paths[entry["name"]] = folder / f"{entry['name']}.onnx"
        convert_file(FIXTURES / entry["file"], paths[entry["name"]])
    return paths


@pytest.mark.parametrize("entry", SHAPED, ids=[e["name"] for e in SHAPED])
def test_symbolic_shape_inference_gives_the_contract_shape(entry, converted, tmp_path):
    """Every value gets a shape, Y's is [B, Hq, Sq, Dv] as the kernel returns it, and the shaped
    model still computes what the original does."""
    shaped = shape_inference.infer_shapes(onnx.load(str(converted[entry["name"]])), auto_merge=True)
    value_infos = {}

    def collect(graph):
        value_infos.update({v.name: v for v in [*graph.value_info, *graph.output]})
        for node in graph.node:
            for attribute in node.attribute:
                for subgraph in [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs:
                    collect(subgraph)

    collect(shaped.graph)
    nodes = [n for n in every_node(shaped.graph) if n.op_type == contract.OP_TYPE]
    assert nodes
    # Run with every attention output exposed, to compare the inferred dims with the real ones.
    exposed = onnx.load(str(converted[entry["name"]]))
    main_graph = [n for n in exposed.graph.node if n.op_type == contract.OP_TYPE]
    exposed.graph.output.extend(onnx.ValueInfoProto(name=n.output[0]) for n in main_graph)
    onnx.save(exposed, str(tmp_path / "exposed.onnx"))
    feeds = inputs.random_inputs(entry, entry["test_shapes"][-1], seed=1)
    session = _session(tmp_path / "exposed.onnx", converted=True)
    results = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    for node in nodes:
        dims = _dims(value_infos[node.output[0]])
        assert len(dims) == 4 and all(dims), (node.name, dims)
        if node.output[0] in results:
            known = [d for d in dims if isinstance(d, int)]
            assert known == [s for s, d in zip(results[node.output[0]].shape, dims) if isinstance(d, int)]
            assert dims[3] == results[node.output[0]].shape[3]  # Dv is a static head size
    onnx.save(shaped, str(tmp_path / "shaped.onnx"))
    expected = _session(FIXTURES / entry["file"], converted=False).run(None, feeds)
    got = _session(tmp_path / "shaped.onnx", converted=True).run(None, feeds)
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, atol=1e-4)


def test_symbolic_shape_inference_command(converted, tmp_path):
    """`python -m ice_onnx.shape_inference`: ORT's command line, the op registered."""
    source, shaped = converted["bert_ts14_eager"], tmp_path / "shaped.onnx"
    done = subprocess.run([sys.executable, "-m", "ice_onnx.shape_inference", "--auto_merge", "--input", str(source),
                           "--output", str(shaped)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    model = onnx.load(str(shaped))
    (node,) = [n for n in model.graph.node if n.op_type == contract.OP_TYPE][:1]
    assert any(v.name == node.output[0] and len(_dims(v)) == 4 for v in model.graph.value_info)


def test_register_is_idempotent():
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    shape_inference.register()
    init = SymbolicShapeInference.__init__
    shape_inference.register()
    assert SymbolicShapeInference.__init__ is init
    assert contract.OP_TYPE in SymbolicShapeInference(2**31 - 1, False, False, 0).dispatcher_


@pytest.mark.parametrize("name", ["bert_ts14_eager", "gpt2_past_dynamo_sdpa"])
def test_int8_dynamic_quantization_after_conversion(name, converted, tmp_path):
    """quant_pre_process + quantize_dynamic on the converted model give ORT's int8 model of the
    original: its weight MatMuls quantized, the attention node kept."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    (entry,) = [e for e in SHAPED if e["name"] == name]
    quant_pre_process(str(FIXTURES / entry["file"]), str(tmp_path / "original.pre.onnx"), auto_merge=True)
    shape_inference.quant_pre_process(converted[name], tmp_path / "converted.pre.onnx", auto_merge=True)
    for which in ("original", "converted"):
        quantize_dynamic(str(tmp_path / f"{which}.pre.onnx"), str(tmp_path / f"{which}.int8.onnx"),
                         weight_type=QuantType.QInt8)
    ops = [n.op_type for n in onnx.load(str(tmp_path / "converted.int8.onnx")).graph.node]
    assert "MatMulInteger" in ops and contract.OP_TYPE in ops and "Softmax" not in ops
    feeds = inputs.random_inputs(entry, entry["test_shapes"][-1], seed=2)
    full = _session(FIXTURES / entry["file"], converted=False).run(None, feeds)
    expected = _session(tmp_path / "original.int8.onnx", converted=False).run(None, feeds)
    got = _session(tmp_path / "converted.int8.onnx", converted=True).run(None, feeds)
    for f, e, g in zip(full, expected, got):
        quantization_error = float(np.abs(e - f).max())
        assert quantization_error > 0  # the weights were quantized
        # Activations are re-quantized after attention: float rounding inside it may flip a step.
        assert float(np.abs(g - e).max()) <= max(0.25 * quantization_error, 1e-5)
