"""The non-Python consumer (examples/cpp), built with README's commands from a shell where no
virtual environment is active, runs a model with the library registered and gives the same
outputs as the Python run."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import ice_onnx
from test_package import one_attention_model

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
VENV = REPO / ".venv"


def readme_build_commands() -> list[str]:
    section = README[README.index("### From C and C++"):]
    block = re.search(r"^```sh\n(.*?)^```$", section, flags=re.DOTALL | re.MULTILINE).group(1)
    return [line for line in block.splitlines() if line.startswith("cmake ")]


def inactive_environment() -> dict:
    """This environment as a fresh shell has it: no VIRTUAL_ENV, no venv's bin on PATH."""
    prefixes = {Path(sys.prefix).resolve(), VENV.resolve()}
    path = [entry for entry in os.environ.get("PATH", "").split(os.pathsep)
            if entry and not any(Path(entry).resolve().is_relative_to(prefix) for prefix in prefixes)]
    env = {key: value for key, value in os.environ.items() if key not in ("VIRTUAL_ENV", "PYTHONHOME")}
    return {**env, "PATH": os.pathsep.join(path)}


@pytest.fixture(scope="module")
def configured(tmp_path_factory) -> tuple[Path, str]:
    """README's build, its folder moved to a scratch one: the build folder and CMake's log."""
    build = tmp_path_factory.mktemp("cpp-example")
    cmake = shutil.which("cmake") or str(Path(sys.executable).with_name("cmake"))
    log = ""
    for command in readme_build_commands():
        command = command.replace("build/example", str(build)).replace("cmake ", f"{cmake} ")
        result = subprocess.run(["bash", "-c", command], cwd=REPO, capture_output=True, text=True,
                                env=inactive_environment())
        assert result.returncode == 0, result.stdout + result.stderr
        log += result.stdout
    return build, log


@pytest.fixture(scope="module")
def ice_run(configured) -> Path:
    return configured[0] / "ice_run"


def test_readme_build_links_the_venvs_onnxruntime_without_activating_it(configured):
    if not (VENV / "bin/python").exists():
        pytest.skip("no .venv in this checkout (make install creates it)")
    linked = re.search(r"Linking (\S+)", configured[1]).group(1)
    venv_ort = subprocess.run([str(VENV / "bin/python"), "-c", "import onnxruntime; print(onnxruntime.__file__)"],
                              capture_output=True, text=True, check=True).stdout.strip()
    assert Path(linked).parent == Path(venv_ort).parent / "capi"


def test_cpp_program_matches_python(ice_run, tmp_path):
    model_path = tmp_path / "model.onnx"
    model_path.write_bytes(one_attention_model().SerializeToString())
    rng = np.random.default_rng(1)
    feeds = {"Q": rng.standard_normal((2, 4, 5, 8), dtype=np.float32),
             "K": rng.standard_normal((2, 4, 7, 8), dtype=np.float32),
             "V": rng.standard_normal((2, 4, 7, 3), dtype=np.float32)}
    args = []
    for name, array in feeds.items():
        np.save(tmp_path / f"{name}.npy", array)
        args.append(f"{name}={tmp_path / f'{name}.npy'}")

    result = subprocess.run([str(ice_run), ice_onnx.library_path(), str(model_path), "--out", str(tmp_path), *args],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Y [2, 4, 5, 3]")

    session = ort.InferenceSession(str(model_path), ice_onnx.session_options(), providers=["CPUExecutionProvider"])
    (expected,) = session.run(None, feeds)
    np.testing.assert_array_equal(np.load(tmp_path / "Y.npy"), expected)


def test_cpp_program_reports_a_missing_model_as_an_error(ice_run, tmp_path):
    result = subprocess.run([str(ice_run), ice_onnx.library_path(), str(tmp_path / "missing.onnx")],
                            capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.startswith("ice_run: ")
