"""`ice-onnx convert` on an onnxruntime-genai model folder, without genai: what the folder
holds, the config's errors, the output folder's guarantees (whole or not at all, never
replacing what is not a genai folder). genai itself loads and runs the result in
tests/test_serving_genai.py, on a folder genai's own builder wrote.

Oracle for the converted decoder: ONNX Runtime on the input's model, fed the same inputs.
"""

from __future__ import annotations

import filecmp
import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from cli_support import assert_clean_error, attention_model, external_model, no_attention_model, run, run_console_script
from ice_onnx.custom_ops.loader import LIBRARY_NAME, build_session_options, library_path
from ice_onnx.errors import EXIT_BAD_MODEL, EXIT_CANNOT_WRITE, EXIT_NO_ATTENTION, EXIT_USAGE

CONFIG = {"model": {"type": "llama", "decoder": {"filename": "model.onnx", "session_options": {"log_id": "genai"},
                                                  "head_size": 8}},
          "search": {"max_length": 64}}


def genai_folder(folder: Path, config: dict | str | None = None) -> Path:
    """A genai-style folder: a decoder with external data, its config, a tokenizer and a nested file."""
    external_model(folder, "model.onnx")
    text = config if isinstance(config, str) else json.dumps(CONFIG if config is None else config)
    (folder / "genai_config.json").write_text(text)
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    (folder / "extra").mkdir()
    (folder / "extra" / "notes.txt").write_bytes(os.urandom(64))
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def outputs(model: Path | None, libraries=()) -> np.ndarray:
    """The model's output on fixed inputs; None: the unconverted decoder's weights inline (ORT
    cannot load the folder's own copy, whose shape inputs are external data too)."""
    source = attention_model().SerializeToString() if model is None else str(model)
    session = ort.InferenceSession(source, build_session_options(libraries))
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 12, 16)).astype(np.float32)
    mask = np.ones((2, 12), np.int64)
    mask[1, 9:] = 0
    return session.run(None, {"x": x, "mask": mask})[0]


def test_a_genai_folder_converts_to_a_ready_folder(tmp_path):
    source = genai_folder(tmp_path / "model")
    before = snapshot(source)
    result = run("convert", source, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    config = json.loads((out / "genai_config.json").read_text())
    expected = json.loads(json.dumps(CONFIG))
    expected["model"]["decoder"]["session_options"]["custom_ops_library"] = LIBRARY_NAME
    assert config == expected  # the entry added, every other key kept
    assert filecmp.cmp(out / LIBRARY_NAME, Path(library_path()), shallow=False)
    for name in ("tokenizer.json", "extra/notes.txt"):
        assert (out / name).read_bytes() == before[name]
    converted = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert any(node.domain == "ai.iceformer" for node in converted.graph.node)
    data = {entry.value for t in converted.graph.initializer for entry in t.external_data if entry.key == "location"}
    assert len(data) == 1 and (out / data.pop()).is_file()  # the weights in a data file inside the folder
    assert "model.onnx.data" not in os.listdir(out)  # the input's data, replaced by the converted model's
    np.testing.assert_allclose(outputs(out / "model.onnx", [str(out / LIBRARY_NAME)]), outputs(None),
                               rtol=1e-4, atol=1e-5)
    assert snapshot(source) == before  # the input untouched
    assert sorted(os.listdir(tmp_path)) == ["model", "out"]  # no staging folder left


def test_the_default_output_is_beside_the_folder_and_json_names_it(tmp_path):
    source = genai_folder(tmp_path / "model")
    result = run("convert", source, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["output"] == str(tmp_path / "model.ice" / "model.onnx")
    assert (tmp_path / "model.ice" / LIBRARY_NAME).is_file()


def test_in_place_replaces_the_folder_whole(tmp_path):
    source = genai_folder(tmp_path / "model")
    original = outputs(None)
    refused = run_console_script("convert", source, "-o", source)
    assert_clean_error(refused, EXIT_USAGE)
    assert "--in-place" in refused.stderr
    result = run("convert", source, "--in-place")
    assert result.exit_code == 0, result.output
    assert "model.onnx.data" not in os.listdir(source) and (source / LIBRARY_NAME).is_file()
    np.testing.assert_allclose(outputs(source / "model.onnx", [str(source / LIBRARY_NAME)]), original,
                               rtol=1e-4, atol=1e-5)
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_a_config_naming_our_library_already_is_converted_again(tmp_path):
    config = json.loads(json.dumps(CONFIG))
    config["model"]["decoder"]["session_options"]["custom_ops_library"] = f"./{LIBRARY_NAME}"
    source = genai_folder(tmp_path / "model", config)
    assert run("convert", source, "-o", tmp_path / "out").exit_code == 0
    written = json.loads((tmp_path / "out" / "genai_config.json").read_text())
    assert written["model"]["decoder"]["session_options"]["custom_ops_library"] == LIBRARY_NAME


def _without_decoder_filename(config):
    del config["model"]["decoder"]["filename"]


def _another_library(config):
    config["model"]["decoder"]["session_options"]["custom_ops_library"] = "libother_ops.so"


def _missing_model(config):
    config["model"]["decoder"]["filename"] = "decoder.onnx"


def _model_outside(config):
    config["model"]["decoder"]["filename"] = "../model.onnx"


def _no_model_entry(config):
    del config["model"]


BAD_CONFIGS = {
    "no model entry": (_no_model_entry, "no model.decoder entry"),
    "no decoder filename": (_without_decoder_filename, "names no model file"),
    "named model missing": (_missing_model, "'decoder.onnx' is missing"),
    "model outside the folder": (_model_outside, "points outside the folder"),
    "another library": (_another_library, "already names 'libother_ops.so'"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_a_bad_config_is_one_clean_error_and_writes_nothing(case, tmp_path):
    edit, message = BAD_CONFIGS[case]
    config = json.loads(json.dumps(CONFIG))
    edit(config)
    source = genai_folder(tmp_path / "model", config)
    (tmp_path / "model.onnx").write_bytes((source / "model.onnx").read_bytes())  # what '../model.onnx' would name
    before = snapshot(source)
    result = run_console_script("convert", source, "-o", tmp_path / "out")
    assert_clean_error(result, EXIT_BAD_MODEL)
    assert message in result.stderr
    assert snapshot(source) == before
    assert sorted(os.listdir(tmp_path)) == ["model", "model.onnx"]


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\xff\xfe", ""], ids=["broken", "a list", "not UTF-8",
                                                                             "empty"])
def test_an_unreadable_config_is_exit_4(text, tmp_path):
    source = genai_folder(tmp_path / "model")
    (source / "genai_config.json").write_bytes(text.encode("latin-1"))
    result = run_console_script("convert", source, "-o", tmp_path / "out")
    assert_clean_error(result, EXIT_BAD_MODEL)
    assert "genai_config.json" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_folder_without_a_genai_config_is_a_usage_error(tmp_path):
    external_model(tmp_path / "plain", "model.onnx")
    result = run_console_script("convert", tmp_path / "plain")
    assert_clean_error(result, EXIT_USAGE)
    assert "genai_config.json" in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["plain"]


def test_a_model_files_output_may_not_be_a_folder(tmp_path):
    model = external_model(tmp_path / "m", "model.onnx")
    (tmp_path / "out").mkdir()
    result = run_console_script("convert", model, "-o", tmp_path / "out")
    assert_clean_error(result, EXIT_USAGE)
    assert not os.listdir(tmp_path / "out")


def test_an_existing_output_is_replaced_only_if_it_is_a_genai_folder(tmp_path):
    source = genai_folder(tmp_path / "model")
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "precious.txt").write_text("mine")
    refused = run_console_script("convert", source, "-o", keep)
    assert_clean_error(refused, EXIT_CANNOT_WRITE)
    assert "not a genai model folder" in refused.stderr
    assert snapshot(keep) == {"precious.txt": b"mine"}

    file_output = tmp_path / "file"
    file_output.write_text("a file")
    assert_clean_error(run_console_script("convert", source, "-o", file_output), EXIT_CANNOT_WRITE)
    assert file_output.read_text() == "a file"

    empty = tmp_path / "empty"
    empty.mkdir()
    assert run("convert", source, "-o", empty).exit_code == 0
    assert (empty / LIBRARY_NAME).is_file()

    (empty / "stale.txt").write_text("from the last conversion")
    assert run("convert", source, "-o", empty).exit_code == 0  # a genai folder: replaced whole
    assert "stale.txt" not in os.listdir(empty) and (empty / "genai_config.json").is_file()
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".ice-onnx-")]


def test_an_output_inside_the_input_or_containing_it_is_refused(tmp_path):
    source = genai_folder(tmp_path / "model")
    before = snapshot(source)
    for output in (source / "converted", tmp_path):
        result = run_console_script("convert", source, "-o", output)
        assert_clean_error(result, EXIT_CANNOT_WRITE)
        assert "inside the input folder" in result.stderr
    assert snapshot(source) == before


def test_a_failed_conversion_leaves_no_folder_and_the_input_as_it_was(tmp_path):
    source = genai_folder(tmp_path / "model")
    onnx.save(no_attention_model(), str(source / "model.onnx"))
    before = snapshot(source)
    assert_clean_error(run_console_script("convert", source, "-o", tmp_path / "out"), EXIT_NO_ATTENTION)
    assert_clean_error(run_console_script("convert", source, "--in-place"), EXIT_NO_ATTENTION)
    assert snapshot(source) == before
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_a_failing_last_rename_keeps_the_old_folder_whole(tmp_path, monkeypatch):
    source = genai_folder(tmp_path / "model")
    out = tmp_path / "out"
    assert run("convert", source, "-o", out).exit_code == 0
    before = snapshot(out)
    rename = os.rename

    def failing_on_the_staged_folder(src, dst):
        name = Path(src).name
        if name.startswith(".ice-onnx-") and "replaced" not in name:
            raise OSError(28, "No space left on device")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_on_the_staged_folder)
    result = run("convert", source, "-o", out, "--seed", "7")
    assert result.exit_code == EXIT_CANNOT_WRITE and "No space left" in result.output
    assert snapshot(out) == before
    assert sorted(os.listdir(tmp_path)) == ["model", "out"]
