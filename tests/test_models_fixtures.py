"""The fixture recipes (models/fixtures) still describe the committed files.

Oracle: tests/fixtures/models/manifest.json and the NAME.ref.npz arrays, written when the
files were exported. A recipe whose model, inputs, shapes or attention description drifts
from what was committed fails here, not at the next re-export that would silently rewrite
the files the rewriter tests read.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models.fixtures import export
from models.fixtures.manifest import recipe_description

pytest.importorskip("torch", reason="the recipes build PyTorch models")
pytest.importorskip("transformers", reason="the recipes build transformers models")

FOLDER = Path(__file__).resolve().parent / "fixtures" / "models"
MANIFEST = json.loads((FOLDER / "manifest.json").read_text())["fixtures"]
EXPORTED = [entry for entry in MANIFEST if "skipped" not in entry]
# The file's own facts (opset, fused ops, checker verdict, size) depend on the exporter's
# version as much as on the recipe.
FILE_FACTS = ("opset", "fused_ops", "onnx_checker", "size_bytes")


def _committed(entry: dict) -> dict:
    """A manifest entry as the recipes write it today: entries exported before the manifest
    recorded decode_only lack it, and its readers take the absence as False."""
    return {"decode_only": False, **entry}


def test_the_shipped_fixtures_are_the_manifest_in_its_order():
    assert [entry["name"] for entry in MANIFEST] == [f.name for f in export.FIXTURES.values() if f.ship]


def test_skipped_entries_name_their_producer():
    for entry in MANIFEST:
        if "skipped" in entry:
            fixture = export.FIXTURES[entry["name"]]
            assert (entry["exporter"], entry["fusion"], entry["attn_implementation"]) == (
                fixture.producer.exporter, fixture.producer.fusion, fixture.attn)


@pytest.mark.parametrize("entry", EXPORTED, ids=[entry["name"] for entry in EXPORTED])
def test_the_recipe_describes_the_committed_file(entry):
    fixture = export.FIXTURES[entry["name"]]
    described = recipe_description(fixture, fixture.build())
    committed = {key: value for key, value in _committed(entry).items() if key not in FILE_FACTS}
    # Through JSON, as the manifest stores it (tuples become lists).
    assert json.loads(json.dumps(described)) == committed


# An encoder and a decoder with a KV cache (TorchScript: the quicker exporter; the dynamo path runs in
# test_rewriter_more_exports.py).
@pytest.mark.parametrize("name", ["bert_ts17_eager", "llama_past_ts17_sdpa"])
def test_a_fresh_export_reproduces_the_committed_references(name, tmp_path):
    entry = json.loads(json.dumps(export.export_fixture(export.FIXTURES[name], tmp_path)))
    assert "skipped" not in entry, entry.get("skipped")
    committed = _committed(next(e for e in MANIFEST if e["name"] == name))
    assert {k: v for k, v in entry.items() if k != "size_bytes"} == {
        k: v for k, v in committed.items() if k != "size_bytes"}
    fresh, recorded = np.load(tmp_path / entry["reference"]), np.load(FOLDER / committed["reference"])
    assert sorted(fresh.files) == sorted(recorded.files)
    for key in recorded.files:
        if "/input/" in key:
            np.testing.assert_array_equal(fresh[key], recorded[key], err_msg=key)
        else:  # PyTorch's outputs: the same weights and inputs, float32 arithmetic
            np.testing.assert_allclose(fresh[key], recorded[key], rtol=0, atol=1e-6, err_msg=key)
