"""`ice-onnx convert` / `inspect` on good and bad input: one line on stderr, a documented exit code,
no traceback, and never a partial output file."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from cli_support import (assert_clean_error, attention_model, exit_code, external_model, no_attention_model, run,
                         run_console_script)
from ice_onnx.errors import EXIT_BAD_MODEL, EXIT_CANNOT_WRITE, EXIT_NO_ATTENTION, EXIT_USAGE


@pytest.fixture
def model_file(tmp_path) -> Path:
    path = tmp_path / "model.onnx"
    onnx.save(attention_model(), str(path))
    return path


def test_convert_writes_a_checked_model_and_reports_it(model_file, tmp_path):
    out = tmp_path / "out.onnx"
    result = run("convert", model_file, "-o", out, "--top-k", 4, "--json")
    assert exit_code(result) == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["attention_blocks"] == report["replaced"] == 1
    block = report["blocks"][0]
    assert block["mask"] == "padding" and block["q_heads"] == 2 and block["head_dim"] == 8
    assert block["scale"] == pytest.approx(8 ** -0.5)
    converted = onnx.load(str(out))
    onnx.checker.check_model(converted)
    (ice,) = [n for n in converted.graph.node if n.op_type == "IceKNNAttention"]
    assert {a.name: helper.get_attribute_value(a) for a in ice.attribute}["top_k"] == 4
    assert block["node"] == ice.name  # the report names the node that replaced the block
    assert not any(n.op_type in ("Softmax", "Sub") for n in converted.graph.node)  # mask construction gone


def test_inspect_prints_without_writing(model_file):
    before = sorted(os.listdir(model_file.parent))
    result = run("inspect", model_file)
    assert exit_code(result) == 0, result.stderr
    assert "1 attention block(s), 1 convertible" in result.stdout
    assert "padding" in result.stdout
    assert sorted(os.listdir(model_file.parent)) == before


def test_layers_selects_blocks(model_file, tmp_path):
    result = run("convert", model_file, "-o", tmp_path / "out.onnx", "--layers", "1-", "--json")
    # block 0 is the only one: nothing selected means nothing to convert
    assert_clean_error(result, EXIT_NO_ATTENTION)
    assert not (tmp_path / "out.onnx").exists()


def _truncated(tmp_path):
    data = attention_model().SerializeToString()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: len(data) // 2])
    return path


def _write(tmp_path, name, content: bytes):
    path = tmp_path / name
    path.write_bytes(content)
    return path


def _external_escape(tmp_path):
    model = attention_model()
    tensor = model.graph.initializer[-1]
    tensor.data_location = TensorProto.EXTERNAL
    tensor.ClearField("raw_data")
    for key, value in (("location", "../../etc/passwd"), ("offset", "0"), ("length", "16")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    path = tmp_path / "escape.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def _external_missing(tmp_path):
    path = external_model(tmp_path / "ext")
    (tmp_path / "ext" / "m.onnx.data").unlink()
    return path


BAD_INPUTS = {
    "missing file": lambda tmp: tmp / "nope.onnx",
    "empty file": lambda tmp: _write(tmp, "empty.onnx", b""),
    "not protobuf": lambda tmp: _write(tmp, "text.onnx", b"this is not a model\n" * 10),
    "truncated protobuf": _truncated,
    "protobuf that is not a model": lambda tmp: _write(
        tmp, "tensor.onnx", numpy_helper.from_array(np.ones(4, np.float32)).SerializeToString()),
    "external data missing": _external_missing,
    "external data escaping the folder": _external_escape,
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest.mark.parametrize("verb", ["convert", "inspect"])
def test_bad_input_is_one_clean_error(case, verb, tmp_path):
    source = BAD_INPUTS[case](tmp_path)
    out = tmp_path / "out" / "converted.onnx"
    out.parent.mkdir()
    args = ["convert", source, "-o", out] if verb == "convert" else ["inspect", source]
    assert_clean_error(run(*args), EXIT_BAD_MODEL)
    assert os.listdir(out.parent) == []


@pytest.mark.parametrize("case", ["not protobuf", "truncated protobuf"])
def test_console_script_prints_no_traceback(case, tmp_path):
    result = run_console_script("convert", BAD_INPUTS[case](tmp_path), "-o", tmp_path / "out.onnx")
    assert_clean_error(result, EXIT_BAD_MODEL)
    assert not (tmp_path / "out.onnx").exists()


def test_model_without_attention_exits_3(tmp_path):
    path = tmp_path / "relu.onnx"
    onnx.save(no_attention_model(), str(path))
    out = tmp_path / "out.onnx"
    assert_clean_error(run("convert", path, "-o", out), EXIT_NO_ATTENTION)
    assert not out.exists()


def test_output_equal_to_input_needs_in_place(model_file):
    original = model_file.read_bytes()
    assert_clean_error(run("convert", model_file, "-o", model_file), EXIT_USAGE)
    assert model_file.read_bytes() == original
    result = run("convert", model_file, "--in-place")
    assert exit_code(result) == 0, result.stderr
    assert any(n.op_type == "IceKNNAttention" for n in onnx.load(str(model_file)).graph.node)


def test_unwritable_output_folder(model_file, tmp_path):
    if os.geteuid() == 0:  # root writes anywhere on disk, but not into /proc
        assert_clean_error(run("convert", model_file, "-o", "/proc/out.onnx"), EXIT_CANNOT_WRITE)
        return
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        assert_clean_error(run("convert", model_file, "-o", folder / "out.onnx"), EXIT_CANNOT_WRITE)
        assert os.listdir(folder) == []
    finally:
        folder.chmod(0o700)


def test_missing_output_folder(model_file, tmp_path):
    assert_clean_error(run("convert", model_file, "-o", tmp_path / "no" / "such" / "out.onnx"), EXIT_CANNOT_WRITE)


def test_external_data_is_kept_external(tmp_path):
    source = external_model(tmp_path / "ext")
    out = tmp_path / "out.onnx"
    result = run("convert", source, "-o", out)
    assert exit_code(result) == 0, result.stderr
    onnx.checker.check_model(str(out))
    listing = sorted(os.listdir(tmp_path))  # no staging left behind
    assert listing[:2] == ["ext", "out.onnx"] and len(listing) == 3
    assert re.fullmatch(r"out\.onnx\.[0-9a-f]{16}\.data", listing[2])  # a name only this model references
    locations = {e.value for t in onnx.load(str(out), load_external_data=False).graph.initializer
                 for e in t.external_data if e.key == "location"}
    assert locations == {listing[2]}


def test_bad_layer_spec_is_a_usage_error(model_file, tmp_path):
    assert_clean_error(run("convert", model_file, "-o", tmp_path / "o.onnx", "--layers", "3-1"), EXIT_USAGE)


def test_converted_model_runs_like_the_original(model_file, tmp_path):
    import onnxruntime as ort
    from ice_onnx.custom_ops import reference

    out = tmp_path / "out.onnx"
    assert exit_code(run("convert", model_file, "-o", out)) == 0
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((2, 6, 16)).astype(np.float32),
             "mask": np.array([[1] * 6, [1] * 4 + [0] * 2], np.int64)}
    expected = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = reference.inference_session(onnx.load(str(out))).run(None, feeds)[0]
    np.testing.assert_allclose(got, expected, atol=1e-5)



def test_plan_sets_per_block_attributes(model_file, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"blocks": [{"index": 0, "top_k": 64, "compensate": 0}]}))
    out = tmp_path / "out.onnx"
    result = run("convert", model_file, "-o", out, "--top-k", 8, "--plan", plan)
    assert exit_code(result) == 0, result.stderr
    (ice,) = [n for n in onnx.load(str(out)).graph.node if n.op_type == "IceKNNAttention"]
    attrs = {a.name: helper.get_attribute_value(a) for a in ice.attribute}
    assert attrs["top_k"] == 64 and attrs["compensate"] == 0


def test_bad_plan_is_a_usage_error(model_file, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"blocks": [{"index": 0, "top_k": 0}]}))
    assert_clean_error(run("convert", model_file, "-o", tmp_path / "o.onnx", "--plan", plan), EXIT_USAGE)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_models_only_take_the_clean_paths(data, tmp_path):
    """Flipped and truncated bytes of a real model: converted, or one clean error; never a traceback."""
    original = bytearray(attention_model().SerializeToString())
    for _ in range(data.draw(st.integers(1, 8), label="flips")):
        position = data.draw(st.integers(0, len(original) - 1), label="position")
        original[position] = data.draw(st.integers(0, 255), label="byte")
    cut = data.draw(st.integers(len(original) // 2, len(original)), label="cut")
    source = tmp_path / "mutated.onnx"
    source.write_bytes(bytes(original[:cut]))
    out = tmp_path / "mutated.ice.onnx"
    out.unlink(missing_ok=True)
    result = run("convert", source, "-o", out)  # run() re-raises any unexpected exception
    assert exit_code(result) in (0, EXIT_BAD_MODEL, EXIT_NO_ATTENTION), result.stderr
    if exit_code(result) != 0:
        assert not out.exists()
        assert_clean_error(result, exit_code(result))
    else:
        onnx.checker.check_model(str(out))


# --- the accuracy guard: --probe-rows / --max-error and the same plan keys ----------------------


def _ice_attributes(path) -> dict:
    (ice,) = [n for n in onnx.load(str(path)).graph.node if n.op_type == "IceKNNAttention"]
    return {a.name: helper.get_attribute_value(a) for a in ice.attribute}


def test_guard_options_reach_the_node_only_when_set(model_file, tmp_path):
    plain, guarded = tmp_path / "plain.onnx", tmp_path / "guarded.onnx"
    assert exit_code(run("convert", model_file, "-o", plain)) == 0
    assert not {"probe_rows", "max_error"} & set(_ice_attributes(plain))  # the kernel's defaults apply
    result = run("convert", model_file, "-o", guarded, "--probe-rows", 7, "--max-error", "0.125")
    assert exit_code(result) == 0, result.stderr
    attrs = _ice_attributes(guarded)
    assert attrs["probe_rows"] == 7 and attrs["max_error"] == pytest.approx(0.125)
    result = run("convert", model_file, "-o", guarded, "--probe-rows", 0)  # 0 = no guard, stated on the node
    assert exit_code(result) == 0 and _ice_attributes(guarded)["probe_rows"] == 0
    assert "max_error" not in _ice_attributes(guarded)


@pytest.mark.parametrize("option, value", [("--probe-rows", -1), ("--probe-rows", 4097), ("--probe-rows", "many"),
                                           ("--max-error", "-0.01"), ("--max-error", "nan"), ("--max-error", "inf"),
                                           ("--max-error", "small")])
def test_bad_guard_option_is_a_usage_error_and_writes_nothing(model_file, tmp_path, option, value):
    out = tmp_path / "out.onnx"
    assert_clean_error(run("convert", model_file, "-o", out, option, value), EXIT_USAGE)
    assert not out.exists()


def test_plan_sets_the_guard_per_block_over_the_options(model_file, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"blocks": [{"index": 0, "probe_rows": 4096, "max_error": 0}]}))
    out = tmp_path / "out.onnx"
    result = run("convert", model_file, "-o", out, "--probe-rows", 8, "--max-error", "0.5", "--plan", plan)
    assert exit_code(result) == 0, result.stderr
    attrs = _ice_attributes(out)
    assert attrs["probe_rows"] == 4096 and attrs["max_error"] == 0.0
    assert isinstance(attrs["max_error"], float)  # the JSON integer 0 becomes the contract's float attribute


@pytest.mark.parametrize("entry", [{"probe_rows": 4097}, {"probe_rows": 1.5}, {"probe_rows": True},
                                   {"max_error": -1}, {"max_error": "0.1"}, {"max_error": float("inf")}])
def test_bad_guard_plan_key_is_a_usage_error(model_file, tmp_path, entry):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"blocks": [{"index": 0, **entry}]}))
    out = tmp_path / "out.onnx"
    assert_clean_error(run("convert", model_file, "-o", out, "--plan", plan), EXIT_USAGE)
    assert not out.exists()


def test_a_tight_max_error_sends_inexact_knn_heads_to_exact(model_file, tmp_path):
    """On random projections top-4 retrieval is far from exact: with max_error 1e-6 the guard
    sends every head to exact attention (output = the unconverted model's). With probe_rows 0,
    or a max_error no head exceeds, the same kNN call runs unguarded and its output differs."""
    import onnxruntime as ort

    import ice_onnx
    from ice_onnx.custom_ops.run_stats import run_stats

    rng = np.random.default_rng(3)
    feeds = {"x": rng.standard_normal((1, 512, 16)).astype(np.float32), "mask": np.ones((1, 512), np.int64)}
    expected = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    guards = {"tight": ("--max-error", "1e-6"), "off": ("--probe-rows", 0, "--max-error", "1e-6"),
              "loose": ("--max-error", "1000")}
    outputs, stats = {}, {}
    for name, guard in guards.items():
        out = tmp_path / f"{name}.onnx"
        assert exit_code(run("convert", model_file, "-o", out, "--exact-below", 0, "--top-k", 4, *guard)) == 0
        session = ort.InferenceSession(str(out), ice_onnx.session_options(), providers=["CPUExecutionProvider"])
        with run_stats() as recorded:
            outputs[name] = session.run(None, feeds)[0]
        stats[name] = recorded
        assert recorded.knn_calls == 1, name  # the call took the kNN path; the guard decides per head
    assert stats["tight"].guarded_heads == 2
    np.testing.assert_allclose(outputs["tight"], expected, atol=2e-5)
    for name in ("off", "loose"):
        assert stats[name].guarded_heads == 0 and stats[name].knn_heads == 2, name
        assert np.abs(outputs[name] - expected).max() > 1e-3, name
