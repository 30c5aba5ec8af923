"""The non-Python consumer (examples/cpp) runs a model with the library registered,
and gives the same outputs as the Python run."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import ice_onnx
from test_package import one_attention_model

REPO = Path(__file__).resolve().parents[1]


def ort_include_dir() -> str:
    if os.environ.get("ORT_INCLUDE_DIR"):
        return os.environ["ORT_INCLUDE_DIR"]
    fetched = subprocess.run([str(REPO / "custom_ops/fetch_ort_headers.sh")], capture_output=True, text=True, check=True)
    return fetched.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def ice_run(tmp_path_factory) -> Path:
    build = tmp_path_factory.mktemp("cpp-example")
    subprocess.run(["cmake", "-S", str(REPO / "examples/cpp"), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                    f"-DORT_INCLUDE_DIR={ort_include_dir()}", f"-DPython3_EXECUTABLE={sys.executable}"],
                   check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build)], check=True, capture_output=True)
    return build / "ice_run"


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
