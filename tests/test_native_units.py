"""The C++ unit tests of the native pieces that need no ONNX Runtime
(custom_ops/tests: the Prioritized-DCI index), built and run as part of the suite."""

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_native_unit_tests_pass(tmp_path):
    build = tmp_path / "native-tests"
    for step in (["cmake", "-S", str(REPO / "custom_ops/tests"), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"],
                 ["cmake", "--build", str(build), "-j", "2"]):
        done = subprocess.run(step, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
    run = subprocess.run(["ctest", "--output-on-failure"], cwd=build, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
