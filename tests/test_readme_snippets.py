"""README's examples run as printed: its Python snippets and its cheap command lines, from the
repository's root (where `import ice_onnx` finds the source folder, not the installed package)
and from a folder elsewhere. Each runs in a fresh interpreter, the files it names (model.onnx)
in a scratch folder."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from cli_support import attention_model

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
CLI = str(Path(sys.executable).with_name("ice-onnx"))
# Commands too slow for a snippet check (they have their own tests).
EXPENSIVE = {"eval", "bench", "tune", "demo"}


def fenced_blocks(language: str, text: str = README) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", text, flags=re.DOTALL | re.MULTILINE)


def section(heading: str) -> str:
    start = README.index(heading)
    following = README.find("\n#", start + len(heading))
    return README[start:following if following != -1 else len(README)]


def command_lines(block: str) -> list[str]:
    """The `ice-onnx ...` lines of a shell block, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line.split(" #")[0].strip() for line in joined.splitlines() if line.startswith("ice-onnx ")]


def variants(line: str) -> list[list[str]]:
    """A command line with its [optional parts] left out, and with all of them given."""
    bare = re.sub(r"\s*\[[^\]]*\]", "", line).split()[1:]
    full = re.sub(r"[\[\]]", "", line).split()[1:]
    return [bare] if bare == full else [bare, full]


PYTHON_SNIPPETS = fenced_blocks("python")
CLI_RUNS = [args for line in command_lines(fenced_blocks("sh", section("### From the command line"))[0])
            if line.split()[1] not in EXPENSIVE for args in variants(line)]


def environment() -> dict:
    return {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}


def run_python(code: str, where: str, scratch: Path) -> subprocess.CompletedProcess:
    """`python -c code` started in the repository root (its first import path the root, as
    for a script there; then working in `scratch`) or started in `scratch` itself."""
    if where == "root":
        code = f"import os, sys; sys.path[0] = os.getcwd(); os.chdir({str(scratch)!r})\n" + code
    return subprocess.run([sys.executable, "-c", code], cwd=REPO if where == "root" else scratch,
                          capture_output=True, text=True, env=environment(), timeout=300)


@pytest.fixture
def scratch(tmp_path) -> Path:
    onnx.save(attention_model(), tmp_path / "model.onnx")
    return tmp_path


def test_readme_has_the_examples_this_file_runs():
    assert len(PYTHON_SNIPPETS) >= 2
    assert {args[0] for args in CLI_RUNS} >= {"--help", "inspect", "convert", "library-path"}


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_python_snippets_run(where, scratch):
    for snippet in PYTHON_SNIPPETS:
        # Also print which ice_onnx ran, so that the root case cannot pass on the installed copy.
        result = run_python(snippet + "\nimport ice_onnx; print('ice_onnx from', ice_onnx.__file__)", where, scratch)
        assert result.returncode == 0, f"README snippet failed ({where}):\n{snippet}\n{result.stderr}"
        imported = Path(result.stdout.rsplit("ice_onnx from ", 1)[1].strip())
        assert (imported.parent == REPO / "ice_onnx") == (where == "root"), imported
    converted = onnx.load(scratch / "model.ice.onnx")
    assert any(node.domain == "ai.iceformer" for node in converted.graph.node)


def test_from_the_root_import_finds_the_folders_seen_there(scratch):
    code = ("import ice_onnx, ice_onnx.rewriter, ice_onnx.custom_ops.loader, ice_onnx.models\n"
            "for module in (ice_onnx.rewriter, ice_onnx.custom_ops.loader, ice_onnx.models):\n"
            "    print(module.__file__)\n"
            "print(ice_onnx.library_path())")
    result = run_python(code, "root", scratch)
    assert result.returncode == 0, result.stderr
    *modules, library = result.stdout.split()
    assert modules == [str(REPO / "rewriter/__init__.py"), str(REPO / "custom_ops/loader.py"),
                       str(REPO / "models/__init__.py")]
    assert Path(library).name == "libice_onnx_ops.so" and Path(library).is_file()


@pytest.mark.parametrize("args", CLI_RUNS, ids=" ".join)
def test_cli_lines_run(args, scratch):
    result = subprocess.run([CLI, *args], cwd=scratch, capture_output=True, text=True, env=environment(),
                            timeout=300)
    assert result.returncode == 0, result.stderr
    if args[0] == "convert":
        assert any(node.domain == "ai.iceformer" for node in onnx.load(scratch / args[3]).graph.node)
    if args[0] == "inspect":
        assert "attention" in result.stdout.lower()


@pytest.mark.parametrize("args", [args for args in CLI_RUNS if args[0] in ("convert", "library-path")], ids=" ".join)
def test_cli_lines_run_from_the_source_folder(args, scratch):
    result = run_python(f"from ice_onnx.cli import main; main({args!r}, prog_name='ice-onnx')", "root", scratch)
    assert result.returncode == 0, result.stderr
