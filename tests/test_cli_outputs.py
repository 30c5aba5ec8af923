"""The commands' small outputs (tune's plan, bench's and eval's JSON reports and plots): an output
that is not a regular file is refused before any work, with exit 5, and left as it was; a
report is written whole, through a symlink to its target."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import onnx
import pytest

from cli_support import assert_clean_error, attention_model, run, run_console_script
from ice_onnx.errors import EXIT_CANNOT_WRITE, EXIT_FAILURE, EXIT_USAGE, IceError
from ice_onnx.outputs import refuse_unwritable, write_text
from test_cli_files import _device, _fifo, _socket


def _directory(path: Path) -> None:
    path.mkdir()


@pytest.fixture
def model(tmp_path) -> Path:
    """A model with an attention block, and the text the eval commands read beside it."""
    onnx.save(attention_model(), tmp_path / "model.onnx")
    (tmp_path / "text.txt").write_text("some text")
    return tmp_path / "model.onnx"


def commands(model: Path, out: Path) -> dict[str, list]:
    """Each command with `out` as its output; what else they read is `model` and a text beside it."""
    text = model.with_name("text.txt")
    return {
        "tune -o": ["tune", model, "--calib", "random:8", "-o", out],
        "bench --json": ["bench", model, "--seq-len", "8", "--json", out],
        "bench --plot": ["bench", model, "--seq-len", "8", "--plot", out],
        "eval causal-lm --json": ["eval", "causal-lm", model, "--tokenizer", text, "--text", text, "--json", out],
        "eval causal-lm --plot": ["eval", "causal-lm", model, "--tokenizer", text, "--text", text, "--plot", out],
    }


COMMANDS = list(commands(Path("m"), Path("o")))
# Every command with a FIFO (the case that would hang), the other kinds with one command: the
# check is one function.
NON_REGULAR = [*((command, _fifo) for command in COMMANDS), ("tune -o", _socket), ("tune -o", _device)]


@pytest.mark.parametrize("command, make", NON_REGULAR, ids=[f"{c}-{m.__name__[1:]}" for c, m in NON_REGULAR])
def test_a_non_regular_output_is_refused_before_the_work(command, make, model, tmp_path):
    out = tmp_path / "out"
    make(out)
    args = commands(model, out)[command]
    kind = stat.S_IFMT(out.lstat().st_mode)
    before = sorted(os.listdir(tmp_path))
    # The console script, with a timeout: a FIFO opened for writing would block for ever.
    result = run_console_script(*args)
    assert_clean_error(result, EXIT_CANNOT_WRITE)
    assert "not a regular file" in result.stderr
    assert stat.S_IFMT(out.lstat().st_mode) == kind
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize("command", ["tune -o", "bench --json"])
def test_a_directory_as_the_output_is_a_usage_error(command, model, tmp_path):
    out = tmp_path / "out"
    _directory(out)
    result = run_console_script(*commands(model, out)[command])
    assert_clean_error(result, EXIT_USAGE)
    assert out.is_dir() and not os.listdir(out)


def test_a_missing_output_folder_is_refused_before_the_work(model, tmp_path):
    result = run_console_script(*commands(model, tmp_path / "absent" / "plan.json")["tune -o"])
    assert_clean_error(result, EXIT_CANNOT_WRITE)


def test_write_text_replaces_whole_and_keeps_a_symlink(tmp_path):
    target, link = tmp_path / "report.json", tmp_path / "link.json"
    target.write_text("old")
    link.symlink_to(target)
    write_text(link, "new")
    assert link.is_symlink() and target.read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["link.json", "report.json"]


def test_write_text_that_fails_leaves_the_old_file_and_no_scratch(tmp_path, monkeypatch):
    target = tmp_path / "report.json"
    target.write_text("old")

    def failing_replace(source, destination):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(IceError) as failure:
        write_text(target, "new")
    assert failure.value.exit_code == EXIT_CANNOT_WRITE and "No space left" in failure.value.message
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["report.json"]


def test_refuse_unwritable_accepts_a_new_file_and_a_regular_one(tmp_path):
    refuse_unwritable(None)
    refuse_unwritable(tmp_path / "new.json")
    (tmp_path / "old.json").write_text("{}")
    refuse_unwritable(tmp_path / "old.json")


@pytest.mark.parametrize("command", ["bench --plot", "eval causal-lm --plot"])
def test_plot_without_matplotlib_fails_before_the_work_naming_the_extra(command, monkeypatch, model, tmp_path):
    out = tmp_path / "plot.png"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    result = run(*commands(model, out)[command])
    assert_clean_error(result, EXIT_FAILURE)
    assert "ice-onnx[plot]" in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "text.txt"]
