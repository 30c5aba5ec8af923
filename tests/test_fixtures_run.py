"""Every fixture in tests/fixtures/models/manifest.json loads in ONNX Runtime and runs at
its test shapes on random inputs built from the manifest's input specs.

Two oracles: the output shapes declared in the manifest, and the PyTorch outputs recorded
at export time (NAME.ref.npz, computed from the same seeded inputs that the manifest's
specs generate here).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from ice_onnx.models.fixtures.inputs import random_inputs, resolve_shape

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "models"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())["fixtures"]
SHIPPED = [entry for entry in MANIFEST if "skipped" not in entry]
SEED = 0  # export.py seeds test shape i with SEED + i


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_manifest_is_consistent():
    names = [entry["name"] for entry in MANIFEST]
    assert len(names) == len(set(names))
    on_disk = {path.name for path in FIXTURES.glob("*.onnx")}
    assert on_disk == {entry["file"] for entry in SHIPPED}
    for entry in SHIPPED:
        assert entry["attention_blocks"] == sum(kind["count"] for kind in entry["attention"])
        assert entry["attention_blocks"] > 0
        assert len(entry["test_shapes"]) >= 2
    assert sum(path.stat().st_size for path in FIXTURES.iterdir()) < 40e6


@pytest.mark.parametrize("entry", SHIPPED, ids=[entry["name"] for entry in SHIPPED])
def test_fixture_runs_and_matches_pytorch(entry):
    path = FIXTURES / entry["file"]
    if entry["onnx_checker"] == "ok":
        onnx.checker.check_model(str(path), full_check=True)
    session = _session(path)
    # By name: onnxruntime-genai orders the KV-cache inputs keys first, then values.
    assert sorted(i.name for i in session.get_inputs()) == sorted(spec["name"] for spec in entry["inputs"])
    reference = np.load(FIXTURES / entry["reference"])
    output_names = [spec["name"] for spec in entry["outputs"]]
    for index, dims in enumerate(entry["test_shapes"]):
        feed = random_inputs(entry, dims, seed=SEED + index)
        for name, value in feed.items():
            np.testing.assert_array_equal(value, reference[f"{index}/input/{name}"])
        outputs = session.run(output_names, feed)
        for spec, value in zip(entry["outputs"], outputs):
            assert value.shape == resolve_shape(spec["shape"], dims), (spec["name"], dims)
            assert np.all(np.isfinite(value))
            np.testing.assert_allclose(value, reference[f"{index}/output/{spec['name']}"], rtol=0, atol=1e-4)
