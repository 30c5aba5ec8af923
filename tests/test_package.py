"""The installed package: native library, Python API, CLI basics."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import ice_onnx
from ice_onnx.custom_ops import contract, reference

# The installed console script (run from the venv, so the source tree cannot shadow the package).
CLI = [str(Path(sys.executable).with_name("ice-onnx"))]


def one_attention_model() -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in "QKV"]
    node = helper.make_node(contract.OP_TYPE, ["Q", "K", "V"], ["Y"], domain=contract.DOMAIN,
                            is_causal=1, exact_below=contract.ALWAYS_EXACT)
    graph = helper.make_graph([node], "one_attention", inputs,
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid(contract.DOMAIN, contract.VERSION)])


def test_library_path_is_an_absolute_shared_library():
    path = Path(ice_onnx.library_path())
    assert path.is_absolute() and path.is_file() and path.suffix == ".so"


def test_built_library_runs_an_op_in_the_installed_onnxruntime():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 2, 6, 8), dtype=np.float32)
    k = rng.standard_normal((1, 2, 9, 8), dtype=np.float32)
    v = rng.standard_normal((1, 2, 9, 4), dtype=np.float32)
    session = ort.InferenceSession(one_attention_model().SerializeToString(),
                                   ice_onnx.session_options(intra_op_num_threads=1),
                                   providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"Q": q, "K": k, "V": v})
    expected = reference.attention(q, k, v, attrs=contract.Attributes(is_causal=1), dense=True)
    assert y.shape == (1, 2, 6, 4)
    np.testing.assert_allclose(y, expected, atol=1e-5)


def test_session_options_applies_keywords_and_rejects_unknown_ones():
    assert ice_onnx.session_options(intra_op_num_threads=3).intra_op_num_threads == 3
    with pytest.raises(AttributeError, match="no_such_option"):
        ice_onnx.session_options(no_such_option=1)


def run_cli(*args):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env={**os.environ, "NO_COLOR": "1"})


def test_cli_help_lists_commands_with_descriptions():
    from ice_onnx.cli import COMMANDS

    result = run_cli("--help")
    assert result.returncode == 0
    listed = result.stdout.split("Commands:")[1].split()
    assert all(name in listed for name in COMMANDS)
    assert "library-path" in result.stdout and "Print the path" in result.stdout


def test_cli_version_is_the_package_version():
    result = run_cli("--version")
    assert result.returncode == 0 and ice_onnx.__version__ in result.stdout


def test_cli_library_path_prints_the_library():
    result = run_cli("library-path")
    assert result.returncode == 0 and result.stdout.strip() == ice_onnx.library_path()


def test_checkout_mapping_is_the_wheels():
    tomllib = pytest.importorskip("tomllib")
    from ice_onnx import _checkout

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    mapped = pyproject["tool"]["scikit-build"]["wheel"]["packages"]
    assert {target: source for target, source in mapped.items() if target != "ice_onnx"} == {
        f"ice_onnx/{name}": name for name in _checkout.SUBPACKAGES}


def test_checkout_folders_are_mapped_only_where_the_package_lacks_them(tmp_path):
    from ice_onnx import _checkout

    (tmp_path / "pyproject.toml").write_text("")
    for name in ("ice_onnx", *_checkout.SUBPACKAGES):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
    assert _checkout.checkout_folders(tmp_path / "ice_onnx") == {
        f"ice_onnx.{name}": tmp_path / name for name in _checkout.SUBPACKAGES}
    (tmp_path / "ice_onnx" / "rewriter").mkdir()  # as installed: the subpackage is a real folder
    assert "ice_onnx.rewriter" not in _checkout.checkout_folders(tmp_path / "ice_onnx")
    (tmp_path / "pyproject.toml").unlink()  # not a checkout: folders named alike are not ours
    assert _checkout.checkout_folders(tmp_path / "ice_onnx") == {}


def test_kernel_library_variable_is_used_and_never_silently_replaced(monkeypatch, tmp_path):
    from ice_onnx.custom_ops import loader

    installed = loader.library_path()
    copy = tmp_path / "libcopy.so"
    copy.write_bytes(Path(installed).read_bytes())
    monkeypatch.setenv(loader.LIBRARY_ENV, str(copy))
    assert loader.library_path() == str(copy)
    monkeypatch.setenv(loader.LIBRARY_ENV, str(tmp_path / "missing.so"))
    with pytest.raises(RuntimeError, match="missing.so: no such file"):
        loader.library_path()


def test_a_checkout_without_any_build_says_so_in_one_line(monkeypatch, tmp_path):
    from ice_onnx.custom_ops import loader

    checkout = tmp_path / "custom_ops"
    checkout.mkdir()
    (checkout / "CMakeLists.txt").write_text("")
    monkeypatch.delenv(loader.LIBRARY_ENV, raising=False)
    monkeypatch.setattr(loader, "__file__", str(checkout / "loader.py"))
    monkeypatch.setattr(loader, "DISTRIBUTION", "ice-onnx-not-installed-anywhere")
    with pytest.raises(FileNotFoundError) as failure:
        loader.library_path()
    assert "\n" not in str(failure.value) and loader.LIBRARY_ENV in str(failure.value)
    built = tmp_path / "build/py3-none-linux_x86_64/custom_ops" / loader.LIBRARY_NAME
    built.parent.mkdir(parents=True)
    built.write_bytes(b"")
    assert loader.library_path() == str(built)


def test_cli_library_path_with_a_wrong_variable_is_one_line():
    result = subprocess.run([*CLI, "library-path"], capture_output=True, text=True,
                            env={**os.environ, "ICE_ONNX_KERNEL_LIBRARY": "/nonexistent/lib.so"})
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "ICE_ONNX_KERNEL_LIBRARY" in result.stderr
