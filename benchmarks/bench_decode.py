"""Decoding steps of converted models vs the original: fused attention ops with a KV cache.

    python benchmarks/bench_decode.py [--threads 1] [--layers 4] [--rounds 5]

One new token over a cache, for models of `--layers` identical layers of one fused op each:
com.microsoft.GroupQueryAttention (onnxruntime-genai's shape: packed QKV, rotary inside) over a
shared max-length buffer bound as genai binds it (present = past, the same memory), ONNX
`Attention` (opset 23) with past_key / past_value, com.microsoft.Attention (ORT's GPT-2 fusion)
with its stacked past. Original and converted run interleaved, `--rounds` times; each number is
the best round's median step. Timings never gate tests (tests/test_rewriter_kv_cache.py checks
the graph: a decoding step runs the original op and no node spans the buffer).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import ice_onnx
from ice_onnx.custom_ops.loader import build_session_options
from ice_onnx.rewriter import convert_model

F, I32 = TensorProto.FLOAT, TensorProto.INT32
HQ, HKV, D = 8, 2, 64
MS_HEADS = 12


def _model(nodes, inputs, outputs, initializers, opset=17):
    graph = helper.make_graph(nodes, "bench", inputs, outputs, initializer=initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)])


def gqa(layers: int, slots: int):
    """Layers of GQA over a `slots`-row shared buffer; the step's feeds for `past` real tokens."""
    width = (HQ + 2 * HKV) * D
    angles = np.outer(np.arange(slots), 1.0 / 10000 ** (np.arange(0, D, 2) / D))
    initializers = [numpy_helper.from_array(np.cos(angles).astype(np.float32), "cos"),
                    numpy_helper.from_array(np.sin(angles).astype(np.float32), "sin")]
    inputs = [helper.make_tensor_value_info("qkv", F, ["B", "S", width]),
              helper.make_tensor_value_info("seqlens_k", I32, ["B"]), helper.make_tensor_value_info("total", I32, [])]
    nodes, outputs = [], []
    for layer in range(layers):
        inputs += [helper.make_tensor_value_info(f"past_{n}_{layer}", F, ["B", HKV, "P", D]) for n in "kv"]
        nodes.append(helper.make_node(
            "GroupQueryAttention", ["qkv", "", "", f"past_k_{layer}", f"past_v_{layer}", "seqlens_k", "total", "cos", "sin"],
            [f"y_{layer}", f"present_k_{layer}", f"present_v_{layer}"], domain="com.microsoft",
            num_heads=HQ, kv_num_heads=HKV, do_rotary=1))
        outputs += [helper.make_tensor_value_info(f"y_{layer}", F, None),
                    *(helper.make_tensor_value_info(f"present_{n}_{layer}", F, None) for n in "kv")]

    def feeds(past: int):
        rng = np.random.default_rng(0)
        caches = {f"past_{n}_{layer}": rng.standard_normal((1, HKV, slots, D)).astype(np.float32)
                  for layer in range(layers) for n in "kv"}
        return {"qkv": rng.standard_normal((1, 1, width)).astype(np.float32),
                "seqlens_k": np.array([past], np.int32), "total": np.array(past + 1, np.int32), **caches}

    return _model(nodes, inputs, outputs, initializers), feeds


def onnx_attention(layers: int, _slots: int):
    inputs = [helper.make_tensor_value_info(n, F, ["B", HQ, "S", D]) for n in "qkv"]
    nodes, outputs = [], []
    for layer in range(layers):
        inputs += [helper.make_tensor_value_info(f"past_{n}_{layer}", F, ["B", HQ, "P", D]) for n in "kv"]
        nodes.append(helper.make_node("Attention", ["q", "k", "v", "", f"past_k_{layer}", f"past_v_{layer}"],
                                      [f"y_{layer}", f"present_k_{layer}", f"present_v_{layer}"], is_causal=1))
        outputs += [helper.make_tensor_value_info(x, F, None) for x in (f"y_{layer}", f"present_k_{layer}", f"present_v_{layer}")]

    def feeds(past: int):
        rng = np.random.default_rng(0)
        return {**{n: rng.standard_normal((1, HQ, 1, D)).astype(np.float32) for n in "qkv"},
                **{f"past_{n}_{layer}": rng.standard_normal((1, HQ, past, D)).astype(np.float32)
                   for layer in range(layers) for n in "kv"}}

    return _model(nodes, inputs, outputs, [], opset=23), feeds


def ms_attention(layers: int, _slots: int):
    hidden, rng = MS_HEADS * D, np.random.default_rng(0)
    initializers = [numpy_helper.from_array((rng.standard_normal((hidden, 3 * hidden)) * 0.02).astype(np.float32), "w"),
                    numpy_helper.from_array(np.zeros(3 * hidden, np.float32), "b")]
    inputs = [helper.make_tensor_value_info("x", F, ["B", "S", hidden]), helper.make_tensor_value_info("mask", I32, ["B", "T"])]
    nodes, outputs = [], []
    for layer in range(layers):
        inputs.append(helper.make_tensor_value_info(f"past_{layer}", F, [2, "B", MS_HEADS, "P", D]))
        nodes.append(helper.make_node("Attention", ["x", "w", "b", "mask", f"past_{layer}"], [f"y_{layer}", f"present_{layer}"],
                                      domain="com.microsoft", num_heads=MS_HEADS, unidirectional=1))
        outputs += [helper.make_tensor_value_info(x, F, None) for x in (f"y_{layer}", f"present_{layer}")]

    def feeds(past: int):
        return {"x": rng.standard_normal((1, 1, hidden)).astype(np.float32), "mask": np.ones((1, past + 1), np.int32),
                **{f"past_{layer}": rng.standard_normal((2, 1, MS_HEADS, past, D)).astype(np.float32) for layer in range(layers)}}

    return _model(nodes, inputs, outputs, initializers), feeds


def _converted(model: onnx.ModelProto) -> onnx.ModelProto:
    ir_model = ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(model))
    convert_model(ir_model, "bench")
    return ir.serde.serialize_model(ir_model)


def _step_time(session: ort.InferenceSession, feeds: dict, shared: bool, repeats: int = 40) -> float:
    """Median decoding step; with `shared`, every present is bound to its past's memory (genai's way)."""
    binding = session.io_binding()
    for name, value in feeds.items():
        binding.bind_cpu_input(name, value)
    for output in session.get_outputs():
        past = feeds.get(output.name.replace("present", "past"))
        if shared and past is not None:
            binding.bind_output(output.name, "cpu", 0, np.float32, list(past.shape), past.ctypes.data)
        else:
            binding.bind_output(output.name, "cpu")
    for _ in range(5):
        session.run_with_iobinding(binding)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run_with_iobinding(binding)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


CASES = [  # (name, builder, buffer slots, cached tokens, bound shared)
    ("GroupQueryAttention, 1100-slot buffer", gqa, 1100, 1000, True),
    ("GroupQueryAttention, 8192-slot buffer", gqa, 8192, 1000, True),
    ("GroupQueryAttention, 8192-slot buffer", gqa, 8192, 3000, True),
    ("ONNX Attention, past", onnx_attention, 0, 1000, False),
    ("com.microsoft.Attention, past", ms_attention, 0, 1000, False),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    for name, build, slots, past, shared in CASES:
        model, feeds = build(args.layers, slots)
        original = ort.InferenceSession(model.SerializeToString(),
                                        build_session_options(intra_op_num_threads=args.threads),
                                        providers=["CPUExecutionProvider"])
        converted = ort.InferenceSession(_converted(model).SerializeToString(),
                                         ice_onnx.session_options(intra_op_num_threads=args.threads),
                                         providers=["CPUExecutionProvider"])
        step = feeds(past)
        rounds = [(_step_time(original, step, shared), _step_time(converted, step, shared)) for _ in range(args.rounds)]
        before, after = min(r[0] for r in rounds), min(r[1] for r in rounds)
        print(f"{name}, {past} cached, {args.layers} layers: original {before * 1e3:.3f} ms, "
              f"converted {after * 1e3:.3f} ms, {before / after:.2f}x", flush=True)


if __name__ == "__main__":
    main()
