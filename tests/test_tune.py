"""`ice-onnx tune`: per-block plans within a fidelity budget.

Oracles: ONNX Runtime on the unconverted model against the model that `ice-onnx convert
--plan` writes (compared here in float64, per calibration sample), a dense mask for the
cost model's key counts, and brute force for the search's frontier and bisection.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from ice_onnx.cli import main
from ice_onnx.custom_ops.contract import ALWAYS_EXACT, Attributes
from ice_onnx.evaluation.inputs import input_feeds
from ice_onnx.tuning import CalibrationError, TuneSettings, load_calibration, parse_candidates, tune
from ice_onnx.tuning import cost, search
from ice_onnx.tuning.calibration import check_inputs

FIXTURES = Path(__file__).parent / "fixtures" / "models"
BERT = FIXTURES / "bert_ts17_eager.onnx"  # 2 layers, 4 heads of 8, key padding; 64 positions
LLAMA = FIXTURES / "llama_ts17_eager.onnx"  # 2 layers, GQA, causal, rotary (any length)
# At BERT's 64 keys only pure top-k is cheaper than exact (compensation's 32 tail clusters
# cost more than scanning the 64 keys), so the tuner has three settings per block to weigh.
BERT_CANDIDATES = "exact;top_k=2,4,8;compensate=off"


def _native_session_options():
    try:
        from ice_onnx import session_options

        return session_options(intra_op_num_threads=1)
    except FileNotFoundError:
        pytest.skip("the native kernel library is not built")


def run_cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def assert_clean_error(result, code: int, mentions: str = ""):
    assert result.exit_code == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ice-onnx: error:"), result.stderr
    assert mentions in lines[0]


def per_sample_cosine(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    a = reference.reshape(len(reference), -1).astype(np.float64)
    b = candidate.reshape(len(candidate), -1).astype(np.float64)
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def end_to_end_cosine(original: Path, plan_file: Path, feeds: dict, tmp_path: Path) -> tuple[np.ndarray, onnx.ModelProto]:
    """Convert with the plan (the CLI), run both models in ONNX Runtime, per-sample cosine."""
    converted = tmp_path / "planned.onnx"
    result = run_cli("convert", original, "--plan", plan_file, "-o", converted)
    assert result.exit_code == 0, result.stderr
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    reference = ort.InferenceSession(str(original), so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = ort.InferenceSession(str(converted), _native_session_options(),
                               providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    return per_sample_cosine(reference, got), onnx.load(str(converted))


def node_settings(model: onnx.ModelProto) -> list[dict]:
    return [{a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            for node in model.graph.node if node.op_type == "IceKNNAttention"]


@pytest.fixture(scope="module")
def bert_feeds():
    # Four samples, the last two padded, so that the key-padding path is part of the plan.
    feeds = input_feeds(onnx.load(str(BERT)), 4, 64, seed=3)
    feeds["attention_mask"][2, 50:] = 0
    feeds["attention_mask"][3, 40:] = 0
    return feeds


@pytest.fixture(scope="module")
def bert_cheapest(bert_feeds):
    """The plan of a budget anything meets: the cheapest plan on the search path."""
    _native_session_options()
    return tune(BERT, bert_feeds, TuneSettings(budget=-1.0, candidates=BERT_CANDIDATES))


# ---- end to end ------------------------------------------------------------------------


def test_plan_meets_the_budget_when_applied_by_convert(tmp_path, bert_feeds, bert_cheapest):
    # A budget between the cheapest plan's fidelity and exact's: the search must decide.
    budget = (bert_cheapest["score"] + bert_cheapest["all_exact_score"]) / 2
    calib = tmp_path / "calib.npz"
    np.savez(calib, **bert_feeds)
    plan_file = tmp_path / "bert.plan.json"
    result = run_cli("tune", BERT, "--calib", calib, "--budget", budget, "--candidates", BERT_CANDIDATES,
                     "--exact-below", 48, "-o", plan_file)
    assert result.exit_code == 0, result.stderr
    document = json.loads(plan_file.read_text())
    assert all(entry["exact_below"] == (48 if "top_k" in entry else ALWAYS_EXACT) for entry in document["blocks"])
    cosines, converted = end_to_end_cosine(BERT, plan_file, bert_feeds, tmp_path)
    assert cosines.min() >= budget
    # The plan the tuner reports is the plan convert applied, block by block.
    applied = node_settings(converted)
    assert len(applied) == len(document["blocks"]) == 2
    for entry, node in zip(sorted(document["blocks"], key=lambda e: e["index"]), applied):
        assert all(node[key] == value for key, value in entry.items() if key != "index")
    assert document["tuning"]["score"] == pytest.approx(cosines.min(), abs=1e-9)
    for row in document["tuning"]["blocks"]:  # the table shows every block's choice
        assert row["choice"] in result.stdout


def test_cheapest_plan_is_cheaper_than_exact_and_measured(bert_cheapest):
    assert bert_cheapest["search"]["position"] == 0
    assert bert_cheapest["cost_ratio"] < 1.0
    for row in bert_cheapest["blocks"]:
        assert row["choice"] != "exact"
        chosen = row["chosen"]
        assert chosen["mode"] == "knn" and 0 < chosen["mass_retrieved"] < 1 and 0 < chosen["recall"] <= 1
        assert row["settings"]["exact_below"] == 64  # kNN from the calibrated length up


@pytest.mark.parametrize("metric", ["cosine", "max-abs"])
def test_looser_budget_never_yields_a_more_expensive_plan(bert_feeds, bert_cheapest, metric):
    loose = tune(BERT, bert_feeds, TuneSettings(budget=1e9 if metric == "max-abs" else -1.0, metric=metric,
                                                   candidates=BERT_CANDIDATES))
    exact_score = loose["all_exact_score"]
    spread = np.linspace(loose["score"], exact_score, 6)  # loosest first
    costs = []
    for budget in spread:
        result = tune(BERT, bert_feeds, TuneSettings(budget=float(budget), metric=metric, candidates=BERT_CANDIDATES))
        assert result["meets_budget"]
        costs.append(result["cost"])
    assert costs == sorted(costs), costs  # tightening never makes the plan cheaper
    assert costs[0] == loose["cost"] < loose["exact_cost"]


def test_causal_gqa_model_with_compensation(tmp_path):
    feeds = input_feeds(onnx.load(str(LLAMA)), 1, 1024, seed=1)
    calib = tmp_path / "llama.npz"
    np.savez(calib, **feeds)
    plan_file = tmp_path / "llama.plan.json"
    result = run_cli("tune", LLAMA, "--calib", calib, "--budget", 0.9999, "--candidates",
                     "top_k=8,32;compensate=on,off", "-o", plan_file, "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document == json.loads(plan_file.read_text())
    rows = document["tuning"]["blocks"]
    assert all(row["causal"] and row["q_heads"] > row["kv_heads"] for row in rows)
    measured = [m for row in rows for m in row["candidates"] if "skipped" not in m]
    assert any("compensate=on" in m["choice"] for m in measured)  # cheaper than exact at 1024 causal keys
    cosines, _ = end_to_end_cosine(LLAMA, plan_file, feeds, tmp_path)
    assert cosines.min() >= 0.9999


def test_an_unreachable_budget_is_one_error(tmp_path):
    result = run_cli("tune", BERT, "--calib", "random:16", "--metric", "max-abs", "--budget", 0,
                     "--candidates", "top_k=2;compensate=off", "-o", tmp_path / "p.json")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1].startswith("ice-onnx: error: even exact attention")
    assert not (tmp_path / "p.json").exists()


# ---- bad input: one line, no traceback -------------------------------------------------


def test_missing_calibration_file(tmp_path):
    assert_clean_error(run_cli("tune", BERT, "--calib", tmp_path / "nope.npz"), 2, "no calibration inputs")


def test_calibration_names_must_match_the_model(tmp_path):
    calib = tmp_path / "calib.npz"
    np.savez(calib, input_ids=np.zeros((1, 8), np.int64), token_type_ids=np.zeros((1, 8), np.int64))
    result = run_cli("tune", BERT, "--calib", calib)
    assert_clean_error(result, 2, "missing attention_mask; not model inputs: token_type_ids")


def test_calibration_folder_with_a_wrong_name(tmp_path):
    np.save(tmp_path / "input_ids.npy", np.zeros((1, 8), np.int64))
    np.save(tmp_path / "mask.npy", np.ones((1, 8), np.int64))
    assert_clean_error(run_cli("tune", BERT, "--calib", tmp_path), 2, "not model inputs: mask")


@pytest.mark.parametrize("args, code, mentions", [
    (["--calib", "random:8", "--candidates", "scan_fraction=0.1"], 2, "cannot tune 'scan_fraction'"),
    (["--calib", "random:8", "--candidates", "top_k=0"], 2, "top_k must be >= 1"),
    (["--calib", "random:8", "--metric", "max-abs"], 2, "needs an explicit --budget"),
    (["--calib", "random:8", "--budget", "1.5"], 2, "floor in [-1, 1]"),
    (["--calib", "random:x"], 2, "random:SEQ_LEN"),
    (["--calib", "random:8", "--output-name", "logits"], 2, "no output named logits"),
])
def test_bad_options(args, code, mentions):
    assert_clean_error(run_cli("tune", BERT, *args), code, mentions)


def test_unwritable_plan_folder_fails_before_tuning(tmp_path):
    result = run_cli("tune", BERT, "--calib", "random:8", "-o", tmp_path / "missing" / "p.json")
    assert_clean_error(result, 5, "cannot write")


def test_missing_or_broken_model(tmp_path):
    assert_clean_error(run_cli("tune", tmp_path / "absent.onnx", "--calib", "random:8"), 4, "no such model")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x07garbage")
    assert_clean_error(run_cli("tune", broken, "--calib", "random:8"), 4)


# ---- calibration inputs ----------------------------------------------------------------


def test_calibration_sources_agree(tmp_path):
    model = onnx.load(str(BERT))
    generated = load_calibration("random:12", model, samples=3, seed=5)
    assert {name: a.shape for name, a in generated.items()} == {"input_ids": (3, 12), "attention_mask": (3, 12)}
    assert np.array_equal(load_calibration("random", model, seq_len=12, samples=3, seed=5)["input_ids"],
                          generated["input_ids"])
    np.savez(tmp_path / "c.npz", **generated)
    folder = tmp_path / "arrays"
    folder.mkdir()
    for name, array in generated.items():
        np.save(folder / f"{name}.npy", array.astype(np.int32))  # converted back to the model's int64
    for source in (tmp_path / "c.npz", folder):
        loaded = load_calibration(str(source), model)
        assert all(loaded[n].dtype == np.int64 and np.array_equal(loaded[n], generated[n]) for n in generated)


def test_calibration_rejects_mixed_sample_counts_and_kinds():
    model = onnx.load(str(BERT))
    with pytest.raises(CalibrationError, match="sample count"):
        check_inputs({"input_ids": np.zeros((2, 8), np.int64), "attention_mask": np.ones((3, 8), np.int64)}, model)
    with pytest.raises(CalibrationError, match="float32"):
        check_inputs({"input_ids": np.zeros((2, 8), np.float32), "attention_mask": np.ones((2, 8), np.int64)}, model)


# ---- candidates --------------------------------------------------------------------------


def test_candidate_spec():
    candidates = parse_candidates("exact;top_k=16,32;compensate=on,off")
    assert [c.label for c in candidates] == ["exact", "top_k=16 compensate=on", "top_k=16 compensate=off",
                                             "top_k=32 compensate=on", "top_k=32 compensate=off"]
    # exact is always there; compensation defaults to the contract's
    assert [c.label for c in parse_candidates("top_k=8")] == ["exact", "top_k=8 compensate=on"]
    assert candidates[0].plan_settings(64) == {"exact_below": ALWAYS_EXACT}
    assert candidates[2].plan_settings(64) == {"top_k": 16, "compensate": 0, "exact_below": 64}
    for bad in ("top_k", "compensate=on", "top_k=4;top_k=8", "compensate=maybe;top_k=4", "top_k=x"):
        with pytest.raises(ValueError):
            parse_candidates(bad)


# ---- the cost model ----------------------------------------------------------------------


@pytest.mark.parametrize("causal, lengths", [(False, [40, 25]), (True, [40, 40])])
@pytest.mark.parametrize("q_len", [16, 40])
def test_exact_cost_counts_the_visible_query_key_pairs(causal, lengths, q_len):
    batch, q_heads, kv_heads, k_len = 2, 4, 2, 40
    mask = np.zeros((batch, 1, 1, k_len), dtype=bool)
    for b, n in enumerate(lengths):
        mask[b, ..., :n] = True
    q = np.zeros((batch, q_heads, q_len, 8), np.float32)
    k = np.zeros((batch, kv_heads, k_len, 8), np.float32)
    geometry = cost.BlockGeometry.from_tensors(q, k, mask, causal)
    # Oracle: the allowed (query, key) pairs of the dense mask; causal is bottom-right aligned.
    allowed = np.broadcast_to(mask, (batch, q_heads, q_len, k_len)).copy()
    if causal:
        allowed &= np.tril(np.ones((q_len, k_len), bool), k_len - q_len)
    assert cost.exact_cost(geometry) == 2 * allowed.sum()  # a score and a value row per pair


def test_knn_cost_follows_the_kernels_routing_and_grows_with_its_work():
    q = np.zeros((1, 4, 1024, 16), np.float32)
    k = np.zeros((1, 4, 1024, 16), np.float32)
    geometry = cost.BlockGeometry.from_tensors(q, k, None, False)
    exact = cost.exact_cost(geometry)
    routed_exact = [Attributes(top_k=32, exact_below=2048), Attributes(top_k=2000, exact_below=0)]
    assert all(cost.attention_cost(geometry, a) == exact for a in routed_exact)
    general = cost.BlockGeometry.from_tensors(q, k, np.zeros((1, 1, 1024, 1024), np.float32), False)
    assert cost.attention_cost(general, Attributes(top_k=8, exact_below=0)) == cost.exact_cost(general)
    # The cluster index scans (and attends) at least scan_min keys per query; it is
    # routed to exact where that is more than an eighth of the keys.
    assert cost.attention_cost(geometry, Attributes(top_k=256, exact_below=0)) == exact
    costs = [cost.attention_cost(geometry, Attributes(top_k=t, exact_below=0, compensate=c))
             for c in (0, 1) for t in (32, 64, 128)]
    assert costs[:3] == sorted(costs[:3]) and costs[3:] == sorted(costs[3:])
    assert all(on > off for off, on in zip(costs[:3], costs[3:]))
    assert max(costs) < exact  # at 1024 keys every one of these is cheaper than exact


# ---- the search --------------------------------------------------------------------------

# (No subnormals: the test's own gain arithmetic underflows on them, e.g. 5e-324 / 2.)
options_strategy = st.lists(st.tuples(st.integers(1, 99), st.floats(0.0, 1.0, allow_subnormal=False)),
                            min_size=0, max_size=8)


@settings(max_examples=200, deadline=None)
@given(options_strategy, st.floats(0.0, 0.01, allow_subnormal=False))
def test_frontier_is_the_lower_convex_hull_ending_at_exact(points, exact_damage):
    exact = search.Option("exact", 100.0, exact_damage)
    options = [search.Option(i, float(c), exact_damage + d) for i, (c, d) in enumerate(points)]
    hull = search.frontier(options, exact)
    assert hull[-1] is exact
    costs = [o.cost for o in hull]
    assert costs == sorted(set(costs))
    gains = [(a.damage - b.damage) / (b.cost - a.cost) for a, b in zip(hull, hull[1:])]
    assert all(g1 > g2 for g1, g2 in zip(gains, gains[1:]))  # strictly convex
    # Every option lies on or above the hull's piecewise-linear curve (brute force).
    for option in options:
        if option.cost < hull[0].cost:
            assert False, "an option cheaper than the hull's start was dropped"
        for a, b in zip(hull, hull[1:]):
            if a.cost <= option.cost <= b.cost:
                on_curve = a.damage + (b.damage - a.damage) * (option.cost - a.cost) / (b.cost - a.cost)
                assert option.damage >= on_curve - 1e-12


def test_exact_ends_the_frontier_even_when_measured_noise_makes_it_look_worse():
    exact = search.Option("exact", 100.0, 1e-6)
    hull = search.frontier([search.Option("knn", 10.0, 0.0), search.Option("pricier", 50.0, 0.0)], exact)
    assert [o.setting for o in hull] == ["knn", "exact"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 2), min_size=1, max_size=20))
def test_bisection_never_ends_later_for_a_looser_budget(levels):
    # levels[i]: the loosest budget class plan i passes (0 = only the loosest, 2 = all).
    levels[-1] = 2  # the all-exact end passes every budget
    results = [search.first_passing(len(levels), lambda i, need=need: levels[i] >= need) for need in (2, 1, 0)]
    assert results == sorted(results, reverse=True)
    assert all(levels[r] >= need for r, need in zip(results, (2, 1, 0)))


def test_path_runs_from_cheapest_to_exact_with_rising_cost():
    frontiers = {
        0: [search.Option("a0", 1.0, 0.5), search.Option("b0", 3.0, 0.1), search.Option("exact", 10.0, 0.0)],
        1: [search.Option("a1", 2.0, 0.2), search.Option("exact", 10.0, 0.0)],
    }
    path = search.plan_path(frontiers)
    assert [o.setting for o in path[0].values()] == ["a0", "a1"]
    assert [o.setting for o in path[-1].values()] == ["exact", "exact"]
    totals = [sum(o.cost for o in plan.values()) for plan in path]
    assert totals == sorted(totals) and len(path) == 4
    # the best damage removed per added cost goes first: 0.4/2 (block 0 to b0) before 0.2/8
    assert path[1][0].setting == "b0" and path[1][1].setting == "a1"
