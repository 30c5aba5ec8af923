"""What the CLI and rewriter tests share: small models, running the CLI in-process or as the
console script, the check that a failure is one clean line, and walking a graph's nodes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from ice_onnx.cli import main

CLI = [str(Path(sys.executable).with_name("ice-onnx"))]


def attention_model(seed: int = 0) -> onnx.ModelProto:
    """x [B, S, 16] -> Q, K, V projections -> 2-head attention with a padding mask -> [B, S, 16];
    `seed` draws the projection weights."""
    rng = np.random.default_rng(seed)
    heads, dim = 2, 8
    nodes, inits = [], []

    def const(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    const("head_shape", np.array([0, 0, heads, dim], np.int64))
    const("merge_shape", np.array([0, 0, heads * dim], np.int64))
    for name in "qkv":
        const(f"W{name}", rng.standard_normal((16, 16)).astype(np.float32) * 0.3)
        nodes += [helper.make_node("MatMul", ["x", f"W{name}"], [f"{name}_flat"]),
                  helper.make_node("Reshape", [f"{name}_flat", "head_shape"], [f"{name}_bshd"])]
    nodes += [
        helper.make_node("Transpose", ["q_bshd"], ["q"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["v_bshd"], ["v"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["k_bshd"], ["kT"], perm=[0, 2, 3, 1]),
        helper.make_node("MatMul", ["q", "kT"], ["scores"]),
        helper.make_node("Mul", ["scores", const("scale", np.float32(dim ** -0.5))], ["scaled"]),
        # padding mask, the pre-2020 BERT way: (1 - m) * -10000 on [B, 1, 1, S]
        helper.make_node("Cast", ["mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Sub", [const("one", np.float32(1)), "mask_f"], ["inverted"]),
        helper.make_node("Mul", ["inverted", const("big", np.float32(-10000))], ["bias2d"]),
        helper.make_node("Unsqueeze", ["bias2d", const("axes", np.array([1, 2], np.int64))], ["bias"]),
        helper.make_node("Add", ["scaled", "bias"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "v"], ["context"]),
        helper.make_node("Transpose", ["context"], ["context_bshd"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["context_bshd", "merge_shape"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "attention", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 16]),
                             helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 16])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def external_model(folder: Path, name: str = "m.onnx", data: str | None = None, seed: int = 0) -> Path:
    """`folder/name` with every weight in `folder/data` (default `<name>.data`)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    onnx.save(attention_model(seed), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=data or f"{name}.data", size_threshold=0)
    return path


def no_attention_model() -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(*args):
    """The CLI in-process (fast); `run_console_script` checks the real entry point."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # an unexpected exception would be a traceback for the user
    return result


def run_console_script(*args):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=120)


def exit_code(result) -> int:
    return result.returncode if hasattr(result, "returncode") else result.exit_code


def assert_clean_error(result, code: int):
    assert exit_code(result) == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ice-onnx: error:"), result.stderr
    assert "Traceback" not in result.stderr


def every_node(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The nodes of `graph` and of every subgraph (If / Loop / Scan branches), depth first."""
    nodes = []
    for node in graph.node:
        nodes.append(node)
        for attribute in node.attribute:
            for subgraph in [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs:
                nodes += every_node(subgraph)
    return nodes
