"""Attention blocks of more architectures, freshly exported: converted exactly, or listed with a reason.

The models (transformers from small configs, random weights: models/fixtures/export.py,
MORE_EXPORTS) are exported into a temporary folder for the session (not committed: the
fixture folder is near its size budget), each checked against PyTorch by the exporter.
Oracle: ONNX Runtime on the unconverted export. Every Softmax feeding a MatMul is a block the
report lists, converted or not, with a reason when not.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import ice_onnx
from ice_onnx.custom_ops import contract
from ice_onnx.rewriter import NoAttentionError, convert_file, inspect_file, inspect_model
from test_rewriter_fixtures import inputs

pytest.importorskip("torch", reason="the exports need PyTorch")
pytest.importorskip("transformers", reason="the exports need transformers")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from models.fixtures import export

    folder = tmp_path_factory.mktemp("more_exports")
    cache = {}

    def get(name: str):
        if name not in cache:
            entry = export.export_fixture(export.FIXTURES[name], folder)
            if "skipped" in entry:
                pytest.fail(f"{name} did not export: {entry['skipped']}")
            cache[name] = (entry, folder / entry["file"])
        return cache[name]

    return get


def _run(path, converted: bool, feeds):
    options = ice_onnx.session_options(intra_op_num_threads=1) if converted else ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def _assert_exact(entry, original, converted):
    for seed, dims in enumerate(entry["test_shapes"]):
        feeds = inputs.random_inputs(entry, dims, seed=seed)
        for e, g in zip(_run(original, False, feeds), _run(converted, True, feeds)):
            assert g.shape == e.shape
            np.testing.assert_allclose(g, e, atol=1e-4, err_msg=f"at {dims}")


@pytest.mark.parametrize("name", ["gpt_neo_ts17_eager", "gpt_neo_dynamo_eager"])
def test_gpt_neo_global_and_local_layers(name, exported, tmp_path):
    """Q/K cast before the product, scale 1, a Where on the registered causal buffer before the mask
    is added; the local layer's window (8) is read from that [1, 1, 64, 64] buffer, so the mask is
    probed at the buffer's extent. Run at 23 tokens, past the window."""
    entry, path = exported(name)
    report = convert_file(path, tmp_path / "converted.onnx")
    assert [(b.replaced, b.mask, b.scale) for b in report.blocks] == [(True, "both", 1.0),
                                                                     (True, "sliding-window", 1.0)], report.to_text()
    assert report.blocks[1].reason == "sliding window 8"
    _assert_exact(entry, path, tmp_path / "converted.onnx")


def test_pooling_head_with_one_learned_probe_query(exported, tmp_path):
    """torch.nn.MultiheadAttention pooling (SigLIP's head): one query, key padding from the mask."""
    entry, path = exported("probe_pooling_dynamo_eager")
    report = convert_file(path, tmp_path / "converted.onnx")
    (block,) = report.blocks
    assert block.replaced and block.mask == "padding" and (block.q_heads, block.head_dim) == (4, 8), report.to_text()
    _assert_exact(entry, path, tmp_path / "converted.onnx")


@pytest.mark.parametrize("name, converted", [("bloom_ts17_eager", 0), ("deberta_v2_ts17_eager", 0),
                                             ("squeezebert_ts17_eager", 2), ("squeezebert_dynamo_eager", 2)])
def test_every_block_is_listed_converted_or_with_a_reason(name, converted, exported, tmp_path):
    """BLOOM (Softmax -> Cast -> Reshape -> 3-D MatMul, ALiBi) and DeBERTa-v2 (Softmax -> Reshape ->
    MatMul, relative positions) are listed with their reasons; SqueezeBERT (Kᵀ laid out [B, H, D, S]
    by a Reshape of its Conv, no Transpose) converts, and computes what the export does."""
    entry, path = exported(name)
    report = inspect_file(path)
    assert len(report.blocks) == entry["attention_blocks"] and report.replaced == converted, report.to_text()
    assert all(block.replaced or block.reason for block in report.blocks), report.to_text()
    if report.replaced:
        convert_file(path, tmp_path / "converted.onnx")
        _assert_exact(entry, path, tmp_path / "converted.onnx")
    else:
        with pytest.raises(NoAttentionError):
            convert_file(path, tmp_path / "converted.onnx")


def _attention_body(prefix: str, q: str, k: str, v: str) -> list[onnx.NodeProto]:
    """softmax(q·kᵀ)·v as plain nodes (4-D inputs)."""
    return [helper.make_node("Transpose", [k], [f"{prefix}kt"], perm=[0, 1, 3, 2]),
            helper.make_node("MatMul", [q, f"{prefix}kt"], [f"{prefix}s"]),
            helper.make_node("Softmax", [f"{prefix}s"], [f"{prefix}p"], axis=-1),
            helper.make_node("MatMul", [f"{prefix}p", v], [f"{prefix}y"])]


def _qkv_inputs():
    return [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2, 4, 8]) for n in ("q", "k", "v")]


def test_attention_inside_an_if_branch_is_listed():
    branch = helper.make_graph(_attention_body("b/", "q", "k", "v"), "then", [],
                               [helper.make_tensor_value_info("b/y", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Identity", ["v"], ["e/y"])], "else", [],
                              [helper.make_tensor_value_info("e/y", TensorProto.FLOAT, None)])
    node = helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=other, name="gate")
    graph = helper.make_graph([node], "g", [*_qkv_inputs(), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    import onnx_ir as ir

    report = inspect_model(ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])))
    (block,) = report.blocks
    assert not block.replaced and block.reason == "inside a If branch (gate): not converted", report.to_text()


def test_attention_inside_a_local_function_is_listed():
    import onnx_ir as ir

    function = helper.make_function("custom.attention", "Attend", ["q", "k", "v"], ["f/y"],
                                    _attention_body("f/", "q", "k", "v"), [helper.make_opsetid("", 17)])
    call = helper.make_node("Attend", ["q", "k", "v"], ["y"], domain="custom.attention")
    graph = helper.make_graph([call], "g", _qkv_inputs(), [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, functions=[function],
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom.attention", 1)])
    report = inspect_model(ir.serde.deserialize_model(model))
    (block,) = report.blocks
    assert not block.replaced and block.reason == "inside local function custom.attention.Attend: not converted"


def test_three_d_scores_say_why():
    """Heads folded into the batch ([B·H, S, S] scores, BLOOM's baddbmm): the reason says so."""
    import onnx_ir as ir

    inputs_3d = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [8, 4, 8]) for n in ("q", "k", "v")]
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]), helper.make_node("MatMul", ["q", "kt"], ["s"]),
             helper.make_node("Softmax", ["s"], ["p"], axis=-1), helper.make_node("Cast", ["p"], ["pc"], to=TensorProto.FLOAT),
             helper.make_node("Reshape", ["pc", "shape"], ["pr"]), helper.make_node("MatMul", ["pr", "v"], ["y"])]
    graph = helper.make_graph(nodes, "g", inputs_3d, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(np.array([8, 4, 4], np.int64), "shape")])
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    report = inspect_model(ir.serde.deserialize_model(model))
    (block,) = report.blocks
    assert block.family == "unknown" and "3-D scores" in block.reason
    assert contract.OP_TYPE not in {n.op_type for n in model.graph.node}


def test_a_softmax_over_another_axis_says_why():
    """The decomposed form with its Softmax over the query axis (as Cohere's TorchScript export
    writes it): the rule's check refuses it, and the listed reason is the check's."""
    import onnx_ir as ir

    def block_over(axis: int):
        nodes = _attention_body("", "q", "k", "v")
        next(n for n in nodes if n.op_type == "Softmax").attribute[0].i = axis
        graph = helper.make_graph(nodes, "g", _qkv_inputs(), [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
        model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
        (block,) = inspect_model(ir.serde.deserialize_model(model)).blocks
        return block

    refused = block_over(2)
    assert refused.family == "unknown" and "Softmax over axis 2, not the key axis" in refused.reason, refused.reason
    converted = block_over(-1)  # the same block over the key axis
    assert converted.family == "decomposed-sdpa" and converted.replaced, converted
