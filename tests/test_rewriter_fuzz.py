"""Fuzzing the rewriter with mutated REAL exports: nothing but a clean error or a correct conversion.

Mutations of the fixture files: byte flips and truncation of the file, and protobuf
field mutations a broken exporter could write (a wrong Transpose perm, a dropped node
input, a bad Softmax/Concat/Gather axis, a changed constant). For each mutant,
`convert_file` must either raise one of the rewriter's documented errors (bad model,
no attention) or write a model that computes what the mutant computes (ONNX Runtime
on the mutant is the oracle, when it runs at all).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

import ice_onnx
from ice_onnx.custom_ops import reference
from ice_onnx.rewriter import ModelFileError, NoAttentionError, convert_file, inspect_file
from test_rewriter_fixtures import ENTRIES, FIXTURES, inputs

FUZZED = [e for e in ENTRIES if e["name"] in ("bert_ts14_eager", "gpt2_past_dynamo_sdpa", "llama_ts17_eager")]
pytestmark = pytest.mark.skipif(not FUZZED, reason="fixtures not exported")
AXIS_ATTRIBUTES = {"Softmax": "axis", "Concat": "axis", "Gather": "axis", "Transpose": "perm"}


def _mutate_fields(model: onnx.ModelProto, data) -> str:
    """One protobuf-level mutation, in place; returns what it did (for the failure message)."""
    nodes = list(model.graph.node)
    kind = data.draw(st.sampled_from(["perm", "axis", "drop_input", "constant"]))
    if kind == "perm":
        candidates = [n for n in nodes if n.op_type == "Transpose"]
        if candidates:
            node = data.draw(st.sampled_from(candidates))
            rank = len(helper.get_attribute_value(node.attribute[0])) if node.attribute else 4
            perm = data.draw(st.permutations(list(range(rank))))
            del node.attribute[:]
            node.attribute.append(helper.make_attribute("perm", list(perm)))
            return f"{node.name}: perm {list(perm)}"
    if kind == "axis":
        candidates = [n for n in nodes if n.op_type in ("Softmax", "Concat", "Gather")]
        if candidates:
            node = data.draw(st.sampled_from(candidates))
            axis = data.draw(st.integers(-5, 4))
            kept = [a for a in node.attribute if a.name != "axis"]
            del node.attribute[:]
            node.attribute.extend([*kept, helper.make_attribute("axis", axis)])
            return f"{node.name}: axis {axis}"
    if kind == "drop_input":
        candidates = [n for n in nodes if len(n.input) > 0]
        node = data.draw(st.sampled_from(candidates))
        index = data.draw(st.integers(0, len(node.input) - 1))
        del node.input[index]
        return f"{node.name}: input {index} dropped"
    constants = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and 0 < np.prod(t.dims) <= 4]
    constants += [a.t for n in nodes if n.op_type == "Constant" for a in n.attribute
                  if a.name == "value" and a.t.data_type == onnx.TensorProto.FLOAT]
    if constants:
        tensor = data.draw(st.sampled_from(constants))
        array = numpy_helper.to_array(tensor)
        factor = data.draw(st.sampled_from([0.0, -1.0, 2.0, np.inf, np.nan]))
        tensor.CopyFrom(numpy_helper.from_array((array * factor).astype(array.dtype), tensor.name))
        return f"constant {tensor.name} x {factor}"
    return "unchanged"


def _mutate_bytes(blob: bytes, data) -> tuple[bytes, str]:
    if data.draw(st.booleans()):
        cut = data.draw(st.integers(0, len(blob) - 1))
        return blob[:cut], f"truncated at {cut}"
    flipped = bytearray(blob)
    positions = data.draw(st.lists(st.integers(0, len(blob) - 1), min_size=1, max_size=8))
    for position in positions:
        flipped[position] ^= data.draw(st.integers(1, 255))
    return bytes(flipped), f"bytes flipped at {positions}"


def _run(path, converted: bool, feeds):
    if converted:
        try:
            session = ort.InferenceSession(str(path), ice_onnx.session_options(intra_op_num_threads=1),
                                           providers=["CPUExecutionProvider"])
        except FileNotFoundError:
            session = reference.inference_session(onnx.load(str(path)), intra_op_num_threads=1)
    else:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.log_severity_level = 4
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


# Derandomized: CI sees the same 60 mutants every run (a random failure there would be noise,
# not news); the open case of a NaN mask-fill constant is in the issue notes.
@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_exports_convert_correctly_or_fail_cleanly(data, tmp_path):
    entry = data.draw(st.sampled_from(FUZZED))
    original = FIXTURES / entry["file"]
    if data.draw(st.booleans()):
        model = onnx.load(str(original))
        what = _mutate_fields(model, data)
        blob = model.SerializeToString()
    else:
        blob, what = _mutate_bytes(original.read_bytes(), data)
    mutant, out = tmp_path / "mutant.onnx", tmp_path / "out.onnx"
    mutant.write_bytes(blob)
    out.unlink(missing_ok=True)
    try:
        convert_file(mutant, out)
    except (ModelFileError, NoAttentionError):
        assert not out.exists(), what  # the clean error path writes nothing
        return
    feeds = inputs.random_inputs(entry, entry["test_shapes"][-1], seed=0)
    try:
        expected = _run(mutant, False, feeds)
    except Exception:  # noqa: BLE001 - the mutant itself does not run: nothing to compare with
        return
    got = _run(out, True, feeds)
    for e, g in zip(expected, got):
        assert g.shape == e.shape, what
        np.testing.assert_allclose(g, e, atol=1e-4, err_msg=what)


# A finfo.min mask fill times NaN (or -inf) makes the mask add NaN (+inf) to the blocked scores:
# every softmax row with a blocked key is NaN, and the export's IsNaN guard turns it into 0. No
# contract mask says that, so the blocks must be left (the fuzz found a NaN-for-finite conversion).
@pytest.mark.parametrize("factor", [np.nan, -np.inf], ids=["nan", "plus_inf"])
def test_mask_fill_times_nan_or_inf_is_left_with_a_reason(factor, tmp_path):
    (entry,) = [e for e in FUZZED if e["name"] == "gpt2_past_dynamo_sdpa"]
    model = onnx.load(str(FIXTURES / entry["file"]))
    fills = [t for t in model.graph.initializer
             if t.data_type == onnx.TensorProto.FLOAT and np.prod(t.dims) == 1 and numpy_helper.to_array(t).item() <= -1e30]
    assert fills, "the fixture's causal mask has no finfo.min fill any more"
    for tensor in fills:
        with np.errstate(invalid="ignore"):
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * np.float32(factor), tensor.name))
    mutant, out = tmp_path / "mutant.onnx", tmp_path / "out.onnx"
    onnx.save(model, str(mutant))
    feeds = inputs.random_inputs(entry, entry["test_shapes"][-1], seed=0)
    expected = _run(mutant, False, feeds)
    assert all(np.isfinite(e).all() for e in expected)  # the guard: the original stays finite
    report = inspect_file(mutant)
    assert report.blocks and all(not b.replaced and b.mask == "not-finite" and "NaN or +inf" in b.reason
                                 for b in report.blocks), report.to_text()
    with pytest.raises(NoAttentionError):
        convert_file(mutant, out)
    assert not out.exists()
