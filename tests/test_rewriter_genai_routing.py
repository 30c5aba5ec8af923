"""Stacked GroupQueryAttention layers under onnxruntime-genai's shared KV buffers.

Each converted layer is an If: the new nodes where kNN may pay, else the original op, which
writes the shared buffer in place. The condition is computed once for the layers that share
it. The oracle is ONNX Runtime on the unconverted model, the KV buffers bound as genai binds
them (past and present one buffer of max-length slots), so what ORT does with an If's outputs
bound to its inputs' buffers is checked on every step.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import ice_onnx
from ice_onnx.custom_ops import contract
from ice_onnx.custom_ops.run_stats import run_stats
from ice_onnx.rewriter import ConvertOptions, convert_model
from cli_support import every_node

F, I32 = TensorProto.FLOAT, TensorProto.INT32
LAYERS, HQ, HKV, D, HIDDEN = 3, 4, 2, 16, 32
SLOTS = 37  # the shared buffer's max length: no other dim of the model
# exact_below 0: a prompt (6 queries x 2 per kv head over 6 keys) takes the new nodes, a decode step the original ops.
KNN_MAY_PAY = {"exact_below": 0}


def stacked_gqa_model(seed: int = 0) -> onnx.ModelProto:
    """LAYERS GroupQueryAttention blocks, each one's projected output the next one's input."""
    rng = np.random.default_rng(seed)
    inputs = [helper.make_tensor_value_info("hidden", F, ["B", "S", HIDDEN]),
              helper.make_tensor_value_info("seqlens_k", I32, ["B"]),
              helper.make_tensor_value_info("total_sequence_length", I32, [])]
    outputs, nodes, weights, x = [], [], [], "hidden"
    for layer in range(LAYERS):
        inputs += [helper.make_tensor_value_info(f"past_{kind}_{layer}", F, ["B", HKV, "P", D])
                   for kind in ("key", "value")]
        outputs += [helper.make_tensor_value_info(f"present_{kind}_{layer}", F, ["B", HKV, "L", D])
                    for kind in ("key", "value")]
        projected = []
        for name, width in (("q", HQ * D), ("k", HKV * D), ("v", HKV * D)):
            weight = f"w{name}_{layer}"
            weights.append(numpy_helper.from_array(_weight(rng, HIDDEN, width, 4), weight))
            nodes.append(helper.make_node("MatMul", [x, weight], [f"{name}_{layer}"]))
            projected.append(f"{name}_{layer}")
        nodes.append(helper.make_node(
            "GroupQueryAttention", [*projected, f"past_key_{layer}", f"past_value_{layer}", "seqlens_k",
                                    "total_sequence_length"],
            [f"attention_{layer}", f"present_key_{layer}", f"present_value_{layer}"],
            domain="com.microsoft", num_heads=HQ, kv_num_heads=HKV, name=f"layer{layer}/GroupQueryAttention"))
        weights.append(numpy_helper.from_array(_weight(rng, HQ * D, HIDDEN, 8), f"wo_{layer}"))
        nodes.append(helper.make_node("MatMul", [f"attention_{layer}", f"wo_{layer}"], [f"out_{layer}"]))
        x = f"out_{layer}"
    outputs.insert(0, helper.make_tensor_value_info(x, F, ["B", "S", HIDDEN]))
    # What an exporter declares past the com.microsoft ops (ONNX's own inference stops there).
    declared = [helper.make_tensor_value_info(f"{name}_{layer}", F, ["B", "S", width]) for layer in range(LAYERS)
                for name, width in (("attention", HQ * D), ("out", HIDDEN), ("q", HQ * D), ("k", HKV * D),
                                    ("v", HKV * D))]
    graph = helper.make_graph(nodes, "stacked_gqa", inputs, outputs, initializer=weights,
                              value_info=[v for v in declared if v.name != x])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("com.microsoft", 1)])


def _weight(rng: np.random.Generator, rows: int, columns: int, scale: float) -> np.ndarray:
    return (rng.standard_normal((rows, columns)) / scale).astype(np.float32)


def _convert(model: onnx.ModelProto, **options) -> onnx.ModelProto:
    ir_model = ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(model))
    report = convert_model(ir_model, "test", ConvertOptions(**options))
    assert report.replaced == LAYERS, report.to_text()
    converted = ir.serde.serialize_model(ir_model)
    onnx.checker.check_model(converted, full_check=True)
    return converted


def _session(model: onnx.ModelProto, converted: bool, **options) -> ort.InferenceSession:
    session_options = ice_onnx.session_options(intra_op_num_threads=1) if converted else ort.SessionOptions()
    session_options.intra_op_num_threads = 1
    for name, value in options.items():
        setattr(session_options, name, value)
    return ort.InferenceSession(model.SerializeToString(), session_options, providers=["CPUExecutionProvider"])


class SharedBuffers:
    """genai's way: one [B, HKV, SLOTS, D] buffer per cache, bound as both past and present."""

    def __init__(self, session: ort.InferenceSession, batch: int):
        self.session = session
        empty = np.zeros((batch, HKV, SLOTS, D), np.float32)
        self.buffers = {f"{kind}_{layer}": ort.OrtValue.ortvalue_from_numpy(empty.copy())
                        for layer in range(LAYERS) for kind in ("key", "value")}

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for name, buffer in self.buffers.items():
            binding.bind_ortvalue_input(f"past_{name}", buffer)
            binding.bind_ortvalue_output(f"present_{name}", buffer)
        binding.bind_output(self.session.get_outputs()[0].name)
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()

    def rows(self, name: str, batch: int, total: int) -> np.ndarray:
        """The rows [0, total) of batch `batch` in the bound buffer: what the run wrote into it."""
        return self.buffers[name].numpy()[batch, :, :total]


def _steps(lengths=(6, 4), decode_steps=3, seed=1):
    """(feeds, T_b) for a right-padded prompt, then one token a step."""
    rng = np.random.default_rng(seed)
    totals = np.array(lengths)
    for step in range(decode_steps + 1):
        seq = max(lengths) if step == 0 else 1
        totals = totals + (step > 0)
        yield {"hidden": rng.standard_normal((len(lengths), seq, HIDDEN)).astype(np.float32),
               "seqlens_k": (totals - 1).astype(np.int32),
               "total_sequence_length": np.array(max(lengths) if step == 0 else totals.max(), np.int32)}, totals


def _top_level(model: onnx.ModelProto, op_type: str) -> int:
    return sum(node.op_type == op_type for node in model.graph.node)


def _conditions(model: onnx.ModelProto) -> set[str]:
    return {node.input[0] for node in model.graph.node if node.op_type == "If"}


def test_each_layer_is_an_if_reading_the_weights_from_the_outer_scope():
    model = stacked_gqa_model()
    converted = _convert(model, **KNN_MAY_PAY)
    ifs = [node for node in converted.graph.node if node.op_type == "If"]
    assert len(ifs) == LAYERS and len(_conditions(converted)) == 1  # one condition, computed once
    assert _top_level(converted, "GroupQueryAttention") == _top_level(converted, contract.OP_TYPE) == 0
    for node in ifs:
        branches = {a.name: a.g for a in node.attribute}
        assert [n.op_type for n in every_node(branches["then_branch"])].count(contract.OP_TYPE) == 1
        assert [n.op_type for n in branches["else_branch"].node] == ["GroupQueryAttention"]
        assert not branches["then_branch"].initializer and not branches["else_branch"].initializer
    assert {t.name for t in converted.graph.initializer} >= {t.name for t in model.graph.initializer}


@pytest.mark.parametrize("plan", [{}, {1: {"exact_below": 3}}], ids=["one condition", "per-layer conditions"])
def test_shared_buffer_steps_give_the_original_outputs(plan):
    """Prompt (the new nodes: kNN may pay) then decoding (the original ops), each cache one buffer bound as
    past and present: outputs and the rows written into the buffers match the original's, with one
    condition for all layers or (a plan's per-layer exact_below) two."""
    model = stacked_gqa_model()
    converted = _convert(model, plan=plan, **KNN_MAY_PAY)
    assert _top_level(converted, "If") == LAYERS and len(_conditions(converted)) == (2 if plan else 1)
    runs = {"original": SharedBuffers(_session(model, False), 2),
            "converted": SharedBuffers(_session(converted, True), 2)}
    for step, (feeds, totals) in enumerate(_steps()):
        with run_stats() as stats:
            got = runs["converted"].run(feeds)
        assert stats.knn_calls + stats.exact_calls == (LAYERS if step == 0 else 0), (step, stats)
        expected = runs["original"].run(feeds)
        for b, total in enumerate(totals):
            valid = min(feeds["hidden"].shape[1], total)  # rows past a prompt's length are padding: undefined
            np.testing.assert_allclose(got[b, :valid], expected[b, :valid], atol=1e-4)
            for name in runs["original"].buffers:
                np.testing.assert_allclose(runs["converted"].rows(name, b, total),
                                           runs["original"].rows(name, b, total), atol=1e-4)


def test_a_decode_step_runs_the_original_ops(tmp_path):
    """The step's cost over the original: an If per layer, no node over the buffer's slots but the ops' own."""
    converted = _convert(stacked_gqa_model(), **KNN_MAY_PAY)
    session = _session(converted, True, enable_profiling=True, profile_file_prefix=str(tmp_path / "profile"))
    runner = SharedBuffers(session, 1)
    feeds, _ = next(_steps(lengths=(5,)))
    runner.run(dict(feeds, hidden=feeds["hidden"][:, :1], total_sequence_length=np.array(6, np.int32),
                    seqlens_k=np.array([5], np.int32)))
    with open(session.end_profiling()) as file:
        events = [e for e in json.load(file) if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    ops = [e["args"]["op_name"] for e in events]
    assert (ops.count("If"), ops.count("GroupQueryAttention"), ops.count(contract.OP_TYPE)) == (LAYERS, LAYERS, 0), ops
    over_buffer = [e["args"]["op_name"] for e in events if e["args"]["op_name"] not in ("GroupQueryAttention", "If")
                   and any(SLOTS in next(iter(o.values())) for o in e["args"].get("output_type_shape", []))]
    assert not over_buffer, over_buffer
