"""`ice-onnx triton`: the model repository it writes, read back as Triton would.

Triton cannot run here, and its ModelConfig protobuf schema is not available offline, so
config.pbtxt is read by a strict text-format parser below against the subset of Triton's
ModelConfig schema the command may write (an unknown field, a repeated singular field, a
wrong value kind or an unknown enum value fails the test). What the onnxruntime backend
then does with the config is redone with ONNX Runtime itself: register the library named
by `op_library_filename`, load `1/model.onnx`, feed tensors shaped as the config says;
the oracle is ONNX Runtime on the unconverted model.
"""

from __future__ import annotations

import filecmp
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from cli_support import assert_clean_error, attention_model, exit_code, no_attention_model, run, run_console_script
from ice_onnx.custom_ops.loader import LIBRARY_NAME, library_path
from ice_onnx.errors import EXIT_BAD_MODEL, EXIT_CANNOT_WRITE, EXIT_NO_ATTENTION, EXIT_USAGE

# --- a strict reader of protobuf text format, for the ModelConfig fields Triton defines ---

DATA_TYPES = frozenset({"TYPE_BOOL", "TYPE_UINT8", "TYPE_UINT16", "TYPE_UINT32", "TYPE_UINT64", "TYPE_INT8",
                        "TYPE_INT16", "TYPE_INT32", "TYPE_INT64", "TYPE_FP16", "TYPE_FP32", "TYPE_FP64", "TYPE_STRING",
                        "TYPE_BF16"})
# message -> field -> (kind, repeated); a kind is "string", "int", "bool", a set of enum names or a message name
SCHEMA = {
    "ModelConfig": {
        "name": ("string", False), "platform": ("string", False), "backend": ("string", False),
        "max_batch_size": ("int", False), "input": ("ModelInput", True), "output": ("ModelOutput", True),
        "dynamic_batching": ("ModelDynamicBatching", False), "instance_group": ("ModelInstanceGroup", True),
        "default_model_filename": ("string", False), "parameters": ("ParametersEntry", True),
        "model_operations": ("ModelOperations", False),
    },
    "ModelInput": {"name": ("string", False), "data_type": (DATA_TYPES, False), "dims": ("int", True),
                   "reshape": ("ModelTensorReshape", False), "optional": ("bool", False)},
    "ModelOutput": {"name": ("string", False), "data_type": (DATA_TYPES, False), "dims": ("int", True),
                    "reshape": ("ModelTensorReshape", False)},
    "ModelTensorReshape": {"shape": ("int", True)},
    "ModelDynamicBatching": {"preferred_batch_size": ("int", True), "max_queue_delay_microseconds": ("int", False)},
    "ModelInstanceGroup": {"name": ("string", False), "count": ("int", False),
                           "kind": (frozenset({"KIND_AUTO", "KIND_GPU", "KIND_CPU", "KIND_MODEL"}), False)},
    "ModelOperations": {"op_library_filename": ("string", True)},
    "ParametersEntry": {"key": ("string", False), "value": ("ModelParameter", False)},
    "ModelParameter": {"string_value": ("string", False)},
}
TOKEN = re.compile(r'\s+|#[^\n]*|(?P<string>"(?:[^"\\\n]|\\.)*")|(?P<number>-?\d+)|(?P<word>[A-Za-z_]\w*)'
                   r"|(?P<punct>[{}\[\]:,])")
ESCAPE = re.compile(r'\\([0-7]{3}|["\\n])')


def tokens(text: str) -> list[tuple[str, str]]:
    found, position = [], 0
    while position < len(text):
        match = TOKEN.match(text, position)
        assert match, f"cannot read the config at {text[position:position + 30]!r}"
        position = match.end()
        if match.lastgroup:
            found.append((match.lastgroup, match.group()))
    return found


def unquote(literal: str) -> str:
    def replace(match):
        code = match.group(1)
        return "\n" if code == "n" else code if code in '"\\' else chr(int(code, 8))
    body = literal[1:-1]
    assert re.fullmatch(r'(?:[^\\]|\\(?:[0-7]{3}|["\\n]))*', body), f"bad escape in {literal}"
    return ESCAPE.sub(replace, body)


def parse_config(text: str) -> dict:
    """The config as nested dicts (repeated fields as lists); asserts it fits SCHEMA."""
    stream = tokens(text)
    message, end = _message(stream, 0, "ModelConfig", closing=None)
    assert end == len(stream)
    return message


def _message(stream, at, kind, closing):
    fields = SCHEMA[kind]
    message = {}
    while at < len(stream) and stream[at][1] != closing:
        tag, field = stream[at]
        assert tag == "word" and field in fields, f"{kind} has no field {field!r}"
        value_kind, repeated = fields[field]
        at += 1
        colon = stream[at][1] == ":"
        at += colon
        if stream[at][1] == "[":
            assert repeated, f"{kind}.{field} is not repeated"
            at += 1
            values = []
            while stream[at][1] != "]":
                value, at = _value(stream, at, value_kind, colon)
                values.append(value)
                if stream[at][1] == ",":
                    at += 1
            at += 1
        else:
            value, at = _value(stream, at, value_kind, colon)
            values = [value]
        if repeated:
            message.setdefault(field, []).extend(values)
        else:
            assert field not in message, f"{kind}.{field} set twice"
            message[field] = values[0]
    assert closing is None or at < len(stream), f"{kind} is not closed"
    return message, at + (closing is not None)


def _value(stream, at, kind, colon):
    tag, text = stream[at]
    if isinstance(kind, str) and kind in SCHEMA:
        assert text == "{", f"{kind} must be a {{ }} block, got {text!r}"
        return _message(stream, at + 1, kind, closing="}")
    assert colon, f"a scalar field needs ':' before {text!r}"
    if kind == "string":
        assert tag == "string", text
        return unquote(text), at + 1
    if kind == "int":
        assert tag == "number", text
        return int(text), at + 1
    if kind == "bool":
        assert text in ("true", "false"), text
        return text == "true", at + 1
    assert tag == "word" and text in kind, f"{text!r} is not one of {sorted(kind)}"
    return text, at + 1


def test_the_reader_is_strict():
    good = 'name: "a\\"b\\\\c\\012"\nmax_batch_size: 4\ninput [ { name: "x" data_type: TYPE_FP32 dims: [ -1, 3 ] } ]'
    assert parse_config(good) == {"name": 'a"b\\c\n', "max_batch_size": 4,
                                  "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [-1, 3]}]}
    for bad in ['nam: "a"', 'name: "a"\nname: "b"', "max_batch_size: 1.5", 'max_batch_size: "4"',
                "input [ { data_type: TYPE_FLOAT32 } ]", "input { dims: 3", 'name "a"',
                "dynamic_batching { preferred_batch_size: [ 2, 4 ] } max_batch_size: [ 1 ]"]:
        with pytest.raises(AssertionError):
            parse_config(bad)


# --- the command ---

@pytest.fixture(scope="module")
def original(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("original") / "attention.onnx"
    onnx.save(attention_model(seed=3), path)
    return path


@pytest.fixture(scope="module")
def converted(original) -> Path:
    path = original.with_name("attention.ice.onnx")
    assert exit_code(run("convert", original, "-o", path)) == 0
    return path


def served_outputs(folder: Path, feeds: dict) -> list[np.ndarray]:
    """What Triton's onnxruntime backend computes for `feeds`: the library from the config, 1/model.onnx."""
    config = parse_config((folder / "config.pbtxt").read_text(encoding="utf-8"))
    options = ort.SessionOptions()
    for library in config["model_operations"]["op_library_filename"]:
        options.register_custom_ops_library(library)
    session = ort.InferenceSession(str(folder / "1" / "model.onnx"), options, providers=["CPUExecutionProvider"])
    return session.run([o["name"] for o in config["output"]], feeds)


def feeds_for(batch: int, length: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, length), np.int64)
    mask[0, length - 5:] = 0  # padding, so the converted mask path is exercised
    return {"x": rng.standard_normal((batch, length, 16)).astype(np.float32), "mask": mask}


def test_the_repository_holds_config_model_and_library(converted, original, tmp_path):
    repository = tmp_path / "repo"
    result = run("triton", converted, "-o", repository)
    assert exit_code(result) == 0, result.output
    folder = repository / "attention"
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) == \
        ["1", "1/model.onnx", "config.pbtxt", LIBRARY_NAME]
    assert filecmp.cmp(folder / LIBRARY_NAME, library_path(), shallow=False)

    config = parse_config((folder / "config.pbtxt").read_text(encoding="utf-8"))
    assert config == {
        "name": "attention", "backend": "onnxruntime", "max_batch_size": 8,
        # the batch dimension is left out of dims when the model batches
        "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [-1, 16]},
                  {"name": "mask", "data_type": "TYPE_INT64", "dims": [-1]}],
        "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [-1, 16]}],
        "dynamic_batching": {},
        "instance_group": [{"count": 1, "kind": "KIND_CPU"}],
        "model_operations": {"op_library_filename": [str((folder / LIBRARY_NAME).resolve())]},
    }

    feeds = feeds_for(batch=3, length=40)
    expected = ort.InferenceSession(str(original), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    (served,) = served_outputs(folder, feeds)
    np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-5)


def test_settings_reach_the_config(converted, tmp_path):
    result = run("triton", converted, "-o", tmp_path / "repo", "--name", "ice attention", "--max-batch", "32",
                 "--instances", "3", "--threads", "2", "--mount", "/models")
    assert exit_code(result) == 0, result.output
    config = parse_config((tmp_path / "repo" / "ice attention" / "config.pbtxt").read_text(encoding="utf-8"))
    assert config["name"] == "ice attention" and config["max_batch_size"] == 32
    assert config["instance_group"] == [{"count": 3, "kind": "KIND_CPU"}]
    assert config["model_operations"]["op_library_filename"] == [f"/models/ice attention/{LIBRARY_NAME}"]
    assert config["parameters"] == [{"key": "intra_op_thread_count", "value": {"string_value": "2"}}]


def test_no_batching_gives_full_shapes(converted, tmp_path):
    assert exit_code(run("triton", converted, "-o", tmp_path / "repo", "--max-batch", "0")) == 0
    config = parse_config((tmp_path / "repo" / "attention" / "config.pbtxt").read_text(encoding="utf-8"))
    assert config["max_batch_size"] == 0 and "dynamic_batching" not in config
    assert [i["dims"] for i in config["input"]] == [[-1, -1, 16], [-1, -1]]
    assert config["output"][0]["dims"] == [-1, -1, 16]


def fixed_batch_model(converted: Path, path: Path, input_name: str = "x") -> Path:
    """The converted model with batch 1 fixed in its signature (and an input renamed)."""
    model = onnx.load(converted)
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_value = 1
    for value in model.graph.input:
        if value.name == "x":
            value.name = input_name
    for node in model.graph.node:
        node.input[:] = [input_name if name == "x" else name for name in node.input]
    onnx.save(model, path)
    return path


def test_a_fixed_batch_is_not_batched_and_odd_names_survive_quoting(converted, original, tmp_path):
    odd = 'in "x" \\ \t é'
    model = fixed_batch_model(converted, tmp_path / "fixed.ice.onnx", input_name=odd)
    assert exit_code(run("triton", model, "-o", tmp_path / "repo")) == 0
    folder = tmp_path / "repo" / "fixed"
    config = parse_config((folder / "config.pbtxt").read_text(encoding="utf-8"))
    assert config["max_batch_size"] == 0 and "dynamic_batching" not in config
    assert config["input"] == [{"name": odd, "data_type": "TYPE_FP32", "dims": [1, -1, 16]},
                               {"name": "mask", "data_type": "TYPE_INT64", "dims": [1, -1]}]
    feeds = feeds_for(batch=1, length=24, seed=1)
    expected = ort.InferenceSession(str(original), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    (served,) = served_outputs(folder, {odd: feeds["x"], "mask": feeds["mask"]})
    np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-5)
    # asking to batch a model that cannot is a usage error, and writes nothing
    result = run("triton", model, "-o", tmp_path / "other", "--max-batch", "4")
    assert exit_code(result) == EXIT_USAGE and not (tmp_path / "other").exists()


def test_external_data_moves_with_the_model(converted, original, tmp_path):
    model = onnx.load(converted)
    source = tmp_path / "src" / "big.ice.onnx"
    source.parent.mkdir()
    onnx.save(model, source, save_as_external_data=True, all_tensors_to_one_file=True, location="big.weights",
              size_threshold=0)
    assert exit_code(run("triton", source, "-o", tmp_path / "repo")) == 0
    version = tmp_path / "repo" / "big" / "1"
    data = [p.name for p in version.iterdir() if p.name != "model.onnx"]
    assert len(data) == 1 and re.fullmatch(r"model\.onnx\.[0-9a-f]{16}\.data", data[0])
    feeds = feeds_for(batch=2, length=30, seed=2)
    expected = ort.InferenceSession(str(original), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    (served,) = served_outputs(tmp_path / "repo" / "big", feeds)
    np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-5)


def test_an_existing_model_folder_is_kept_unless_replaced_whole(converted, tmp_path):
    repository = tmp_path / "repo"
    (repository / "attention" / "7").mkdir(parents=True)
    (repository / "attention" / "7" / "old.onnx").write_bytes(b"old")
    (repository / "neighbour").mkdir()
    result = run_console_script("triton", converted, "-o", repository)
    assert_clean_error(result, EXIT_CANNOT_WRITE)
    assert [p.name for p in (repository / "attention").rglob("*")] == ["7", "old.onnx"]

    assert exit_code(run("triton", converted, "-o", repository, "--replace")) == 0
    assert sorted(p.name for p in (repository / "attention").iterdir()) == ["1", "config.pbtxt", LIBRARY_NAME]
    assert sorted(p.name for p in repository.iterdir()) == ["attention", "neighbour"]  # no staging left


def test_a_failure_while_writing_leaves_nothing(converted, tmp_path, monkeypatch):
    from ice_onnx.serving import triton

    def broken_copy(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(triton.shutil, "copyfile", broken_copy)
    fresh = tmp_path / "fresh"
    result = run("triton", converted, "-o", fresh)
    assert exit_code(result) == EXIT_CANNOT_WRITE and "No space left" in result.output
    assert not fresh.exists()  # the repository it had created is gone too

    existing = tmp_path / "repo"
    (existing / "attention" / "1").mkdir(parents=True)
    (existing / "attention" / "config.pbtxt").write_text("old")
    result = run("triton", converted, "-o", existing, "--replace")
    assert exit_code(result) == EXIT_CANNOT_WRITE
    assert sorted(p.name for p in existing.iterdir()) == ["attention"]
    assert (existing / "attention" / "config.pbtxt").read_text() == "old"


@pytest.mark.parametrize("case, code", [
    ("missing model", EXIT_BAD_MODEL), ("not a model", EXIT_BAD_MODEL), ("not converted", EXIT_NO_ATTENTION),
    ("name with a slash", EXIT_USAGE), ("hidden name", EXIT_USAGE), ("relative mount", EXIT_USAGE),
    ("repository's parent missing", EXIT_CANNOT_WRITE), ("repository is a file", EXIT_CANNOT_WRITE),
])
def test_bad_input_is_one_clean_error_and_writes_nothing(case, code, converted, tmp_path):
    model, repository, extra = converted, tmp_path / "repo", []
    if case == "missing model":
        model = tmp_path / "missing.onnx"
    elif case == "not a model":
        model = tmp_path / "text.onnx"
        model.write_text("not protobuf")
    elif case == "not converted":
        model = tmp_path / "relu.onnx"
        onnx.save(no_attention_model(), model)
    elif case == "name with a slash":
        extra = ["--name", "../escape"]
    elif case == "hidden name":
        extra = ["--name", ".hidden"]
    elif case == "relative mount":
        extra = ["--mount", "models"]
    elif case == "repository's parent missing":
        repository = tmp_path / "no" / "repo"
    elif case == "repository is a file":
        repository.write_text("")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    result = run_console_script("triton", model, "-o", repository, *extra)
    assert_clean_error(result, code)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def with_extra_input(converted: Path, path: Path, element_type: int, shape: list) -> Path:
    """The converted model with one more (unused) input: a knob a client may send."""
    model = onnx.load(converted)
    model.graph.input.append(onnx.helper.make_tensor_value_info("knob", element_type, shape))
    onnx.save(model, path)
    return path


def test_a_scalar_input_is_reshaped_and_stops_batching(converted, tmp_path):
    model = with_extra_input(converted, tmp_path / "scalar.ice.onnx", onnx.TensorProto.INT64, [])
    assert exit_code(run("triton", model, "-o", tmp_path / "repo")) == 0
    config = parse_config((tmp_path / "repo" / "scalar" / "config.pbtxt").read_text(encoding="utf-8"))
    assert config["max_batch_size"] == 0  # a scalar has no batch dimension
    assert config["input"][-1] == {"name": "knob", "data_type": "TYPE_INT64", "dims": [1], "reshape": {"shape": []}}


def test_an_element_type_triton_cannot_name_is_one_clean_error(converted, tmp_path):
    model = with_extra_input(converted, tmp_path / "fp8.ice.onnx", onnx.TensorProto.FLOAT8E4M3FN, ["batch"])
    result = run_console_script("triton", model, "-o", tmp_path / "repo")
    assert_clean_error(result, 1)
    assert "knob" in result.stderr and not (tmp_path / "repo").exists()


def test_a_kv_cache_model_whose_op_sits_in_if_branches_is_served(tmp_path):
    """genai's GQA export with past: the converter puts IceKNNAttention inside If branches."""
    source = Path(__file__).resolve().parent / "fixtures" / "models" / "llama_past_genai_gqa.onnx"
    converted = tmp_path / "llama.ice.onnx"
    assert exit_code(run("convert", source, "-o", converted)) == 0
    main_graph = onnx.load(converted).graph.node
    assert not any(n.op_type == "IceKNNAttention" for n in main_graph) and any(n.op_type == "If" for n in main_graph)
    assert exit_code(run("triton", converted, "-o", tmp_path / "repo")) == 0
    config = parse_config((tmp_path / "repo" / "llama" / "config.pbtxt").read_text(encoding="utf-8"))
    assert config["max_batch_size"] == 8 and config["dynamic_batching"] == {}
    pasts = ["past_key_values.0.key", "past_key_values.1.key", "past_key_values.0.value", "past_key_values.1.value"]
    assert [(i["name"], i["dims"]) for i in config["input"]] == \
        [("input_ids", [-1]), ("attention_mask", [-1])] + [(name, [2, -1, -1]) for name in pasts]
    assert [(o["name"], o["dims"]) for o in config["output"]] == \
        [("logits", [-1, 160])] + [(name.replace("past_key_values", "present"), [2, -1, -1]) for name in pasts]


@pytest.mark.parametrize("replace", [False, True])
def test_a_writer_overtaken_by_another_replaces_only_when_allowed(converted, tmp_path, monkeypatch, replace):
    """Writer A is staging when writer B writes the same model folder and finishes first."""
    from ice_onnx.rewriter import ModelWriteError
    from ice_onnx.serving import triton

    repository = tmp_path / "repo"
    copy = triton.shutil.copyfile
    overtaken = []

    def copy_while_another_writer_finishes(*args, **kwargs):
        copy(*args, **kwargs)
        if not overtaken:
            overtaken.append(True)
            triton.write_repository(converted, repository, triton.TritonSettings(name="m", max_batch=0))

    monkeypatch.setattr(triton.shutil, "copyfile", copy_while_another_writer_finishes)
    settings = triton.TritonSettings(name="m", max_batch=4, replace=replace)
    if replace:
        triton.write_repository(converted, repository, settings)
    else:
        with pytest.raises(ModelWriteError, match="exists"):
            triton.write_repository(converted, repository, settings)
    assert [p.name for p in repository.iterdir()] == ["m"]  # no staging or replaced folder left
    config = parse_config((repository / "m" / "config.pbtxt").read_text(encoding="utf-8"))
    assert config["max_batch_size"] == (4 if replace else 0)  # A's folder only when it may replace
    assert sorted(p.name for p in (repository / "m").iterdir()) == ["1", "config.pbtxt", LIBRARY_NAME]
