"""`ice-onnx demo` runs end to end on the shipped model and reports what it ran."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from ice_onnx.models.line_retrieval.evaluate import ONNX_FILE

CLI = str(Path(sys.executable).with_name("ice-onnx"))


@pytest.mark.skipif(not ONNX_FILE.is_file(), reason="line_retrieval.onnx is not shipped yet")
def test_demo_answers_questions_with_both_models():
    result = subprocess.run([CLI, "demo", "--tokens", "512", "--questions", "2", "--threads", "1"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "converted" in result.stderr  # progress names the conversion it ran
    # one row per question: "line <key> : REGISTER_CONTENT is  <expected> <original> <ice-onnx>"
    rows = [line.split() for line in result.stdout.splitlines() if "REGISTER_CONTENT is" in line]
    assert len(rows) == 2
    for words in rows:
        assert words[4] == "is" and len(words) == 8
        assert re.fullmatch(r"\d+", words[5])  # the expected answer is a number; the models may answer anything
    assert re.search(r"speed-up \d+\.\d\dx", result.stdout)
    assert re.search(r"accuracy\s+original \d+%\s+ice-onnx \d+%", result.stdout)
