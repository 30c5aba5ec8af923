"""Every exported fixture converts completely and the converted model computes what the original does.

Oracle: ONNX Runtime on the unconverted model. The converted model runs on the
native library when it is installed, else on the numpy reference.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import ice_onnx
from ice_onnx.custom_ops import contract, reference
from ice_onnx.rewriter import NoAttentionError, convert_file, inspect_file
from cli_support import every_node

FIXTURES = Path(__file__).parent / "fixtures" / "models"
MANIFEST = FIXTURES / "manifest.json"
ENTRIES = [e for e in (json.loads(MANIFEST.read_text())["fixtures"] if MANIFEST.exists() else [])
           if not e.get("skipped")]  # the exporter could not produce a working file
# Long enough for the kNN path (Sk >= 8 x the scan of top_k keys, 4 sqrt(Sk) queries per
# kv head), which the test shapes (at most 11 tokens) never are.
KNN_SEQ = 64
# The kNN path forced and unguarded, with neither sinks nor a window (at 64 keys the
# default window alone would cover every key): each query scans about 8 keys through the
# index, and the tail estimate with one cluster per key makes the result exact, so the
# original model is the oracle for every piece of the path's bookkeeping.
FORCED_KNN = {"top_k": 4, "exact_below": 0, "probe_rows": 0, "sinks": 0, "window": 0, "compensate": 1,
              "tail_clusters": KNN_SEQ}
MASK_SIZE_PROBE = 11  # a sequence length no other dimension of the fixtures has


def _load_inputs_module():
    # models/ is not part of the installed package: load its input generator by path.
    path = Path(__file__).parents[1] / "models" / "fixtures" / "inputs.py"
    spec = importlib.util.spec_from_file_location("fixture_inputs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


inputs = _load_inputs_module() if ENTRIES else None


def _session(model: onnx.ModelProto | str, converted: bool) -> ort.InferenceSession:
    if not converted:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    try:
        options = ice_onnx.session_options(intra_op_num_threads=1)
    except FileNotFoundError:
        return reference.inference_session(onnx.load(str(model)), intra_op_num_threads=1)
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Convert each fixture once (exact and kNN-forced) for all the tests of this module."""
    cache = {}

    def get(entry, mode: str):
        key = (entry["name"], mode)
        if key not in cache:
            folder = tmp_path_factory.mktemp(entry["name"])
            if mode == "exact":
                out = folder / "exact.onnx"
                try:
                    cache[key] = (convert_file(FIXTURES / entry["file"], out), out)
                except NoAttentionError:  # nothing convertible (sliding windows only): the model stays as it is
                    cache[key] = (inspect_file(FIXTURES / entry["file"]), FIXTURES / entry["file"])
            else:  # the same graph with the kNN path forced: only the attributes differ
                report, exact = get(entry, "exact")
                model = onnx.load(str(exact))
                for node in every_node(model.graph):
                    if node.op_type == contract.OP_TYPE and not _always_exact(node):
                        kept = [a for a in node.attribute if a.name not in FORCED_KNN]
                        del node.attribute[:]
                        node.attribute.extend(kept)
                        node.attribute.extend(onnx.helper.make_attribute(k, v) for k, v in FORCED_KNN.items())
                out = folder / "knn.onnx"
                onnx.save(model, str(out))
                cache[key] = (report, out)
        return cache[key]

    return get


pytestmark = pytest.mark.skipif(not ENTRIES, reason="no fixtures exported yet")


def _windows(entry) -> dict[int, int]:
    """window -> number of blocks with that sliding window (the exports' sliding_window)."""
    found: dict[int, int] = {}
    for kind in entry["attention"]:
        if "window" in kind:
            found[kind["window"]] = found.get(kind["window"], 0) + kind["count"]
    return found


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["name"] for e in ENTRIES])
def test_every_attention_block_is_replaced(entry, converted):
    """Every block, the sliding-window ones with their window as the node's attribute."""
    report, out = converted(entry, "exact")
    assert len(report.blocks) == entry["attention_blocks"], report.to_text()
    assert report.replaced == entry["attention_blocks"], report.to_text()
    windowed = [block for block in report.blocks if block.mask == "sliding-window"]
    assert len(windowed) == sum(_windows(entry).values()), report.to_text()
    assert all(any(f"sliding window {w}" in block.reason for w in _windows(entry)) for block in windowed)
    capped = [kind for kind in entry["attention"] if "softcap" in kind]  # Gemma 2: every block
    assert sum("softcap" in (block.reason or "") for block in report.blocks) == sum(k["count"] for k in capped)
    model = onnx.load(str(out), load_external_data=False)
    nodes = [n for n in every_node(model.graph) if n.op_type == contract.OP_TYPE]  # GQA's sit in If branches
    assert len(nodes) == entry["attention_blocks"]
    node_windows: dict[int, int] = {}
    for node in nodes:
        window = next((a.i for a in node.attribute if a.name == "sliding_window"), 0)
        if window:
            node_windows[window] = node_windows.get(window, 0) + 1
    assert node_windows == _windows(entry)
    caps = sorted(a.f for n in nodes for a in n.attribute if a.name == "softcap")
    assert caps == sorted(k["softcap"] for k in capped for _ in range(k["count"]))
    assert not any(n.op_type == "Softmax" for n in every_node(model.graph))


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["name"] for e in ENTRIES])
def test_exact_mode_matches_the_original(entry, converted):
    _, out = converted(entry, "exact")
    original = _session(FIXTURES / entry["file"], converted=False)
    ice = _session(out, converted=True)
    for seed, dims in enumerate(entry["test_shapes"]):
        feeds = inputs.random_inputs(entry, dims, seed=seed)
        expected = original.run(None, feeds)
        got = ice.run(None, feeds)
        for name, e, g in zip([o.name for o in original.get_outputs()], expected, got):
            assert g.shape == e.shape, name
            error = float(np.max(np.abs(g.astype(np.float64) - e))) if e.size else 0.0
            assert error <= 1e-4, f"{name} at {dims}: max abs error {error}"


def _always_exact(node: onnx.NodeProto) -> bool:
    """A block the converter keeps exact (a score bias): forcing kNN there would change its meaning."""
    return any(a.name == "exact_below" and a.i == contract.ALWAYS_EXACT for a in node.attribute)


# Files whose sequence length is free (a ViT's 17 patches are too few for an index), with a
# prompt over no past (decode-only files have none) and a block that may run kNN (blocks the
# converter keeps exact, score biases and windows shorter than the keys, do not).
def _exact_anyway(kind: dict) -> bool:
    """Blocks the kernel runs exactly whatever the attributes say (CONTRACT.md): soft-capped scores,
    and a sliding window shorter than the keys (it already bounds the work)."""
    return "softcap" in kind or kind.get("window", KNN_SEQ) < KNN_SEQ


KNN_ENTRIES = [e for e in ENTRIES if "seq" in e["test_shapes"][-1] and not e.get("decode_only")
               and any(not _exact_anyway(a) and "bias" not in a["mask"] for a in e["attention"])]


@pytest.mark.parametrize("entry", KNN_ENTRIES, ids=[e["name"] for e in KNN_ENTRIES])
def test_knn_mode_matches_the_original(entry, converted):
    """The converted model with the kNN path forced computes the original's outputs, and
    the kernel's run statistics show that its blocks took that path."""
    from ice_onnx.custom_ops.run_stats import run_stats

    _, out = converted(entry, "knn")
    original = _session(FIXTURES / entry["file"], converted=False)
    ice = _session(out, converted=True)
    # Every sequence (encoder, decoder) of KNN_SEQ tokens, over no past.
    dims = {name: size if name == "batch" else 0 if name == "past_seq" else KNN_SEQ
            for name, size in entry["test_shapes"][-1].items()}
    feeds = inputs.random_inputs(entry, dims, seed=7)
    expected = original.run(None, feeds)
    with run_stats() as stats:
        got = ice.run(None, feeds)
    may_run_knn = sum(a["count"] for a in entry["attention"] if not _exact_anyway(a) and "bias" not in a["mask"])
    exact = sum(a["count"] for a in entry["attention"]) - may_run_knn  # score biases are kept exact too
    assert (stats.knn_calls, stats.exact_calls) == (may_run_knn, exact), stats
    assert stats.knn_heads == may_run_knn * dims["batch"] * entry["geometry"]["num_heads"], stats
    assert stats.scored_fraction < 0.5, stats  # the index, not a scan of every key
    for name, e, g in zip([o.name for o in original.get_outputs()], expected, got):
        assert g.shape == e.shape, name
        error = float(np.max(np.abs(g.astype(np.float64) - e))) if e.size else 0.0
        assert error <= 1e-3 * max(1.0, float(np.abs(e).max(initial=0.0))), f"{name} at {dims}: max abs error {error}"


# A decode-only file (traced on one new token) runs only with Sq = 1: nothing is Sq×Sk there.
STANDARD_MASKS = [e for e in ENTRIES if all(a["mask"] in ("none", "padding", "causal", "padding+causal")
                                            for a in e["attention"]) and not e.get("decode_only")]


@pytest.mark.parametrize("entry", STANDARD_MASKS, ids=[e["name"] for e in STANDARD_MASKS])
def test_no_sq_by_sk_mask_is_built(entry, converted, tmp_path):
    """Run the converted model with every intermediate value exposed: none is Sq×Sk."""
    report, out = converted(entry, "exact")
    assert {b.mask for b in report.blocks} <= {"none", "padding", "causal", "both"}, report.to_text()
    model = onnx.load(str(out))
    model.graph.output.extend(
        onnx.helper.make_empty_tensor_value_info(o) for n in model.graph.node for o in n.output
        if o and o not in {x.name for x in model.graph.output})
    exposed = tmp_path / "exposed.onnx"
    onnx.save(model, str(exposed))
    # A prompt (no past): Sq = Sk, so an Sq×Sk tensor is square (and ORT's GQA takes batch 2 only then).
    dims = dict(entry["test_shapes"][-1], seq=MASK_SIZE_PROBE, **({"past_seq": 0} if entry["has_past"] else {}))
    session = _session(exposed, converted=True)
    feeds = inputs.random_inputs(entry, dims, seed=3)
    for info, value in zip(session.get_outputs(), session.run(None, feeds)):
        square = value.ndim >= 2 and value.shape[-1] == value.shape[-2] == MASK_SIZE_PROBE
        assert not square, f"{info.name} has shape {value.shape}: an S×S tensor is still built"


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["name"] for e in ENTRIES])
def test_report_gives_the_exported_geometry(entry, converted):
    """Heads and head size in the report are the ones the model was built with (TorchScript included)."""
    report, _ = converted(entry, "exact")
    geometry = entry["geometry"]
    for block in report.blocks:
        assert (block.q_heads, block.head_dim) == (geometry["num_heads"], geometry["head_dim"]), report.to_text()
        # A fused op fed K/V already repeated to the query heads (dynamo's opset-23 Llama, ORT's MHA
        # fusion) works with that many kv heads; decomposed blocks see through the repeat.
        fused_kv_heads = {geometry["num_heads"]} if block.family != "decomposed-sdpa" else set()
        assert block.kv_heads in {geometry["kv_heads"]} | fused_kv_heads, report.to_text()
