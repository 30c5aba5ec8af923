"""`ice-onnx eval causal-lm`: perplexity, agreement and time of a causal LM, original vs converted.

The oracle is independent of the task: the model run in ONNX Runtime on explicitly built
inputs, its logits turned into next-token log-likelihoods in float64 numpy. The quick tests
use the tiny random-weight Llama fixture (2 layers, vocabulary 160) with a character-level
tokenizer built here; the real SmolLM2-135M runs at 512 tokens when models/smollm2 has
built it.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from ice_onnx.cli import main
from ice_onnx.errors import EXIT_BAD_MODEL, EXIT_USAGE

pytest.importorskip("tokenizers")

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "models"
TINY = FIXTURES / "llama_dynamo_eager.onnx"  # input_ids, attention_mask, position_ids -> logits [B, S, 160]
TINY_WITH_PAST = FIXTURES / "llama_past_dynamo_eager.onnx"
NO_LOGITS = FIXTURES / "bert_ts17_sdpa.onnx"  # -> last_hidden_state
ALWAYS_EXACT = "2147483647"
WORDS = ("the model reads a long text and predicts every next token from the ones before it; attention "
         "looks back over all of them, which is what the kernel approximates").split()


def invoke(*args):
    return CliRunner().invoke(main, ["eval", "causal-lm", *map(str, args)])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A character-level tokenizer.json (ids < 160) and two texts: 1200 and 100 characters."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path_factory.mktemp("causal_lm")
    chars = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?'-\n"))
    tokenizer = Tokenizer(models.WordLevel({"<unk>": 0, **{c: i + 1 for i, c in enumerate(chars)}}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer.save(str(folder / "tokenizer.json"))
    rng = np.random.default_rng(0)
    prose = " ".join(rng.choice(WORDS, size=400)) + "."
    (folder / "long.txt").write_text(prose[:1200])
    (folder / "short.txt").write_text(prose[1000:1100])
    return folder


def token_ids(files: Path, name: str) -> np.ndarray:
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(files / "tokenizer.json")).encode((files / name).read_text()).ids
    return np.asarray(ids, dtype=np.int64)


def oracle(session: ort.InferenceSession, ids: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Mean next-token NLL, next-token accuracy and argmax of `session` on `ids`, in float64."""
    feeds = {"input_ids": ids[None], "attention_mask": np.ones((1, len(ids)), np.int64),
             "position_ids": np.arange(len(ids), dtype=np.int64)[None]}
    feeds = {name: value for name, value in feeds.items() if name in {i.name for i in session.get_inputs()}}
    logits = session.run(["logits"], feeds)[0][0, :-1].astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    targets = ids[1:]
    nll = -log_probs[np.arange(len(targets)), targets]
    return float(nll.mean()), float(np.mean(logits.argmax(-1) == targets)), logits.argmax(-1)


def plain_session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_perplexity_matches_the_numpy_oracle_and_exact_conversion_keeps_it(files, tmp_path):
    report_file, plot_file = tmp_path / "report.json", tmp_path / "report.png"
    result = invoke(TINY, "--tokenizer", files / "tokenizer.json", "--text", files / "long.txt",
                    "--text", files / "short.txt", "--lengths", "300,64", "--exact-below", ALWAYS_EXACT,
                    "--threads", 1, "--repeats", 2, "--warmup", 0, "--json", report_file, "--plot", plot_file)
    assert result.exit_code == 0, result.output
    report = json.loads(report_file.read_text())
    assert report["schema"] == "ice-onnx/eval-causal-lm/1"
    assert report["interface"] == {"token_input": "input_ids", "logits_output": "logits", "inputs": {
        "input_ids": "tokens", "attention_mask": "attention_mask", "position_ids": "position_ids"}}
    assert report["settings"]["lengths"] == [64, 300] and report["settings"]["convert"]["exact_below"] == 2**31 - 1
    assert report["attention_nodes"] == 2
    assert [(row["text"], row["length"]) for row in report["rows"]] == [
        ("long.txt", 64), ("short.txt", 64), ("all texts", 64), ("long.txt", 300)]
    assert report["skipped"] == [{"text": "short.txt", "length": 300, "text_tokens": 100}]

    session = plain_session(TINY)
    for row in report["rows"][:2] + report["rows"][3:]:
        ids = token_ids(files, row["text"])[:row["length"]]
        nll, accuracy, _ = oracle(session, ids)
        assert row["predicted"] == row["length"] - 1
        assert row["nll_original"] == pytest.approx(nll, rel=1e-6)
        assert row["ppl_original"] == pytest.approx(np.exp(nll), rel=1e-6)
        assert row["accuracy_original"] == pytest.approx(accuracy)
        # Exact kernel: the converted model predicts as the original does.
        assert row["ppl_ratio"] == pytest.approx(1.0, abs=1e-5)
        assert row["agreement"] == 1.0 and row["knn_blocks"] == 0
        if report["settings"]["backend"] == "native":  # what the kernel did: every call exactly
            assert row["kernel"]["exact_calls"] > 0 and row["kernel"]["knn_calls"] == 0
            assert row["knn_head_share"] == 0.0 and row["keys_per_knn_row"] == 0.0
        assert len(row["times_original_s"]) == len(row["times_converted_s"]) == 2
        assert row["speedup"] == pytest.approx(statistics.median(row["times_original_s"])
                                               / statistics.median(row["times_converted_s"]))
    first, second, both = report["rows"][:3]
    assert both["nll_original"] == pytest.approx((first["nll_original"] + second["nll_original"]) / 2)
    assert both["predicted"] == 126

    assert "ppl orig" in result.stdout and "skipped: short.txt has 100 tokens, fewer than 300" in result.stdout
    if plot_file.exists() or _has_matplotlib():
        assert plot_file.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def forced_knn_attributes(scan: int) -> dict:
    """Kernel attributes that leave (nearly) every query to the index: `scan` keys scanned per
    query, no accuracy guard, no sink or window keys attended exactly (those the installed
    contract has)."""
    from dataclasses import fields

    from ice_onnx.custom_ops.contract import Attributes

    wanted = {"scan_min": scan, "scan_fraction": 0.0, "probe_rows": 0, "sinks": 0, "window": 0}
    return {name: value for name, value in wanted.items() if name in {f.name for f in fields(Attributes)}}


def attribute_args(attributes: dict) -> list[str]:
    return [arg for name, value in attributes.items() for arg in ("--attribute", f"{name}={value}")]


def test_forced_knn_runs_the_knn_path_and_changes_the_numbers(files, tmp_path):
    from ice_onnx.custom_ops.run_stats import run_stats
    from ice_onnx.evaluation.runtime import convert, open_session, resolve_backend, with_attributes
    from ice_onnx.rewriter import ConvertOptions

    report_file, attributes = tmp_path / "report.json", forced_knn_attributes(scan=8)
    with run_stats() as stats:
        result = invoke(TINY, "--tokenizer", files / "tokenizer.json", "--text", files / "long.txt", "--lengths",
                        256, "--top-k", 4, "--exact-below", 0, "--no-compensate", "--threads", 1, "--repeats", 1,
                        *attribute_args(attributes), "--json", report_file)
    assert result.exit_code == 0, result.output
    # What the kernel says it did: both blocks, on the warm-up and the timed pass, through
    # the index on every head (no guard), each query row scoring few of the keys it sees.
    assert stats.knn_calls == 2 * 2 and stats.exact_calls == 0
    assert stats.knn_heads > 0 and stats.exact_heads == 0 and stats.guarded_heads == 0
    assert stats.scored_fraction < 0.25
    report = json.loads(report_file.read_text())
    assert report["settings"]["attributes"] == attributes
    (row,) = report["rows"]
    assert row["knn_blocks"] == 2
    # The report carries that account: the row's runs are the ones counted.
    assert row["kernel"] == dataclasses.asdict(stats.current())
    assert row["knn_head_share"] == 1.0 and row["guard_exact_share"] == 0.0
    assert row["keys_per_knn_row"] == pytest.approx(stats.mean_keys_scored) and 0 < row["keys_per_knn_row"] < 256
    ids = token_ids(files, "long.txt")[:256]
    nll_original, _, top_original = oracle(plain_session(TINY), ids)
    assert row["nll_original"] == pytest.approx(nll_original, rel=1e-6)
    assert abs(row["nll_converted"] - row["nll_original"]) > 1e-4  # a few of up to 256 keys (exact: ~1e-8)
    assert row["agreement"] < 1.0

    # The converted numbers are the converted model's own: the same conversion, run here.
    backend = resolve_backend("auto")
    converted = with_attributes(convert(TINY, options=ConvertOptions(top_k=4, exact_below=0, compensate=0)),
                                **attributes)
    nll_converted, accuracy, top_converted = oracle(open_session(converted, 1, backend), ids)
    assert row["nll_converted"] == pytest.approx(nll_converted, rel=1e-6)
    assert row["accuracy_converted"] == pytest.approx(accuracy)
    assert row["agreement"] == pytest.approx(np.mean(top_original == top_converted))


def test_the_report_says_when_the_guard_sent_every_head_to_exact_attention(files, tmp_path):
    """Settings that route every block to kNN, and a guard no approximation can pass
    (max_error 0): the kernel runs every head exactly, the report says so, and the
    numbers are the exact ones."""
    report_file = tmp_path / "report.json"
    attributes = {name: value for name, value in forced_knn_attributes(scan=8).items() if name != "probe_rows"}
    result = invoke(TINY, "--tokenizer", files / "tokenizer.json", "--text", files / "long.txt", "--lengths", 256,
                    "--top-k", 4, "--exact-below", 0, "--probe-rows", 8, "--max-error", 0, "--threads", 1,
                    "--repeats", 1, "--warmup", 0, *attribute_args(attributes), "--json", report_file)
    assert result.exit_code == 0, result.output
    report = json.loads(report_file.read_text())
    if report["settings"]["backend"] != "native":
        pytest.skip("the reference backend keeps no run counters")
    (row,) = report["rows"]
    assert row["knn_blocks"] == 2 and row["kernel"]["knn_calls"] == 2
    assert row["guard_exact_share"] == 1.0 and row["knn_head_share"] == 0.0 and row["kernel"]["knn_rows"] == 0
    assert row["ppl_ratio"] == pytest.approx(1.0, abs=1e-5) and row["agreement"] == 1.0
    assert "  0%" in result.stdout.splitlines()[-1]  # the kNN heads column


def test_the_guard_options_reach_the_report(files, tmp_path):
    report_file = tmp_path / "report.json"
    result = invoke(TINY, "--tokenizer", files / "tokenizer.json", "--text", files / "short.txt", "--lengths", 64,
                    "--probe-rows", 8, "--max-error", 0.5, "--threads", 1, "--repeats", 1, "--warmup", 0,
                    "--json", report_file)
    assert result.exit_code == 0, result.output
    settings = json.loads(report_file.read_text())["settings"]
    assert (settings["convert"]["probe_rows"], settings["convert"]["max_error"]) == (8, 0.5)
    assert "probe_rows=8 max_error=0.5" in settings["convert_label"]


def test_a_model_with_past_inputs_gets_empty_pasts(files):
    from ice_onnx.evaluation.lm_inputs import detect_interface

    interface = detect_interface(onnx.load(str(TINY_WITH_PAST)))
    feeds = interface.feeds(np.arange(10))
    assert feeds["past_key_values.0.key"].shape == (1, 2, 0, 16) and feeds["attention_mask"].shape == (1, 10)
    result = invoke(TINY_WITH_PAST, "--tokenizer", files / "tokenizer.json", "--text", files / "long.txt",
                    "--lengths", 48, "--exact-below", ALWAYS_EXACT, "--threads", 1, "--repeats", 1, "--warmup", 0)
    assert result.exit_code == 0, result.output
    assert " 1.0000  100.0%" in result.stdout


def test_log_softmax_in_blocks_equals_the_whole():
    from ice_onnx.evaluation.causal_lm import next_token_scores

    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((20, 50)) * 5).astype(np.float32)
    targets = rng.integers(0, 50, size=19)
    nll, top = next_token_scores(logits, targets, rows=3)
    whole = logits[:19].astype(np.float64)
    expected = np.log(np.exp(whole).sum(axis=-1)) - whole[np.arange(19), targets]
    np.testing.assert_allclose(nll, expected, rtol=1e-12)
    np.testing.assert_array_equal(top, whole.argmax(-1))


@pytest.mark.parametrize("case", ["missing model", "missing text", "missing tokenizer", "tokenizer folder",
                                  "no logits", "text too short", "not onnx", "bad attribute",
                                  "unknown attribute"])
def test_bad_inputs_fail_in_one_line(files, tmp_path, case):
    tokenizer, text = files / "tokenizer.json", files / "long.txt"
    model, lengths, code, says = TINY, "64", 1, None
    if case == "missing model":
        model, code, says = tmp_path / "absent.onnx", EXIT_BAD_MODEL, "no such model file"
    elif case == "missing text":
        text, code, says = tmp_path / "absent.txt", EXIT_USAGE, "no such file"
    elif case == "missing tokenizer":
        tokenizer, code, says = tmp_path / "absent.json", EXIT_USAGE, "no such file"
    elif case == "tokenizer folder":
        tokenizer, says = tmp_path, "no tokenizer.json"
    elif case == "no logits":
        model, says = NO_LOGITS, "no [batch, seq, vocab] logits output"
    elif case == "text too short":
        text, lengths, says = files / "short.txt", "128,512", "100 tokens, fewer than the shortest length 128"
    elif case == "not onnx":
        model, code, says = text, EXIT_BAD_MODEL, "not a readable ONNX model"
    extra = []
    if case == "bad attribute":
        extra, code, says = ["--attribute", "top_k=many"], EXIT_USAGE, "top_k takes an integer"
    if case == "unknown attribute":  # the kernel cannot refuse a misspelt name: it would run with the default
        extra, code, says = ["--attribute", "is_casual=1"], EXIT_USAGE, "unknown attribute is_casual (the contract "
    result = invoke(model, "--tokenizer", tokenizer, "--text", text, "--lengths", lengths, *extra)
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ice-onnx: error:") and says in lines[0], result.stderr
    assert "Traceback" not in result.output


# ---- the real SmolLM2-135M-Instruct (models/smollm2), at a short context ------------------

SMOLLM2_TOKENS = 512


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The built prefill model, its tokenizer folder, a real text (licenses) and the oracle's
    numbers on its first SMOLLM2_TOKENS tokens; skipped until models/smollm2 has built it."""
    build = pytest.importorskip("models.smollm2.build")
    texts = pytest.importorskip("models.smollm2.texts")
    paths = build.paths()
    manifest = json.loads(paths.manifest.read_text()) if paths.manifest.is_file() else {}
    if "prefill" not in manifest.get("checks", {}) or not paths.prefill.is_file():
        pytest.skip("SmolLM2 not built: python -m models.smollm2.build")
    text = tmp_path_factory.mktemp("smollm2") / "licenses.txt"
    text.write_text(texts.text("licenses"))
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(paths.hf / "tokenizer.json"))
    ids = np.asarray(tokenizer.encode(text.read_text()).ids[:SMOLLM2_TOKENS])
    return paths, text, oracle(plain_session(paths.prefill), ids)


def smollm2_row(smollm2, tmp_path, *args):
    paths, text, _ = smollm2
    report_file = tmp_path / "report.json"
    result = invoke(paths.prefill, "--tokenizer", paths.hf, "--text", text, "--lengths", SMOLLM2_TOKENS,
                    "--repeats", 1, "--warmup", 0, "--json", report_file, *args)
    assert result.exit_code == 0, result.output
    (row,) = json.loads(report_file.read_text())["rows"]
    return row


def test_smollm2_perplexity_matches_the_oracle_and_the_exact_kernel_keeps_it(smollm2, tmp_path):
    _, _, (nll, accuracy, _) = smollm2
    row = smollm2_row(smollm2, tmp_path, "--exact-below", ALWAYS_EXACT)
    assert row["nll_original"] == pytest.approx(nll, rel=1e-6)
    assert row["accuracy_original"] == pytest.approx(accuracy)
    assert 2.0 < row["ppl_original"] < 50.0  # a real LM on real English
    assert row["ppl_ratio"] == pytest.approx(1.0, abs=1e-4) and row["agreement"] == 1.0
    assert row["knn_blocks"] == 0


def test_smollm2_forced_knn_changes_the_numbers(smollm2, tmp_path):
    _, _, (nll, _, _) = smollm2
    from ice_onnx.custom_ops.run_stats import run_stats

    with run_stats() as stats:
        row = smollm2_row(smollm2, tmp_path, "--top-k", 8, "--exact-below", 0, "--no-compensate",
                          *attribute_args(forced_knn_attributes(scan=16)))
    assert row["nll_original"] == pytest.approx(nll, rel=1e-6)
    assert row["knn_blocks"] == 30
    # The kernel's own account: all 30 blocks of the one timed pass went through the index,
    # on every head, each query row scoring a small share of the keys it sees.
    assert stats.knn_calls == 30 and stats.exact_calls == 0 and stats.exact_heads == 0
    assert stats.scored_fraction < 0.25
    assert abs(row["nll_converted"] - row["nll_original"]) > 1e-3 and row["agreement"] < 1.0
