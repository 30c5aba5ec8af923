"""kNN mode of IceKNNAttention: retrieval quality and output error on structured data,
causality, key padding, compensation, determinism and the routing rules.

Every kNN-mode check also asserts, through the kernel's run statistics, that the call
took the kNN path on the heads it names (a kernel that quietly ran exact attention would
pass an accuracy check), against numpy float64 dense attention as the oracle."""

import numpy as np
import pytest
from onnx import TensorProto

import kernel_oracle as ko
from ice_onnx.custom_ops.contract import Attributes
from ice_onnx.custom_ops.run_stats import run_stats

S = 1024  # long enough for kNN (exact_below=0 forces it), short enough to test fast
# The kNN path itself: forced (exact_below=0) and unguarded (the guard would send
# the diffuse cases below to the exact path).
# A scan budget of 128 keys (an eighth of S, the most kNN mode takes) leaves most keys to the tail estimate.
KNN = dict(top_k=32, exact_below=0, probe_rows=0, scan_min=128)
DCI_ERROR = 0.02  # peaked queries: their top 32 keys hold nearly all the mass (measured 0.001)


def retrieved_weights(q, k, mask=None, **attrs):
    """The softmax weight each query puts on every key: one-hot values make Y the
    weight matrix; a tiny scale makes every retrieved key's weight visibly > 0.
    The call must have run kNN on every head."""
    eye = np.eye(k.shape[2], dtype=np.float32)[None, None].repeat(k.shape[1], axis=1).repeat(k.shape[0], axis=0)
    w, stats = ko.run_counted(q, k, eye, mask, **{**KNN, "scale": 1e-6, "sinks": 0, "window": 0, **attrs})
    ko.assert_knn_ran(stats, heads=q.shape[0] * q.shape[1])
    return w


def knn_run(q, k, v, mask=None, scored_below=0.5, **attrs):
    """Y of a call that must run kNN on every head."""
    y, stats = ko.run_counted(q, k, v, mask, **attrs)
    ko.assert_knn_ran(stats, heads=q.shape[0] * q.shape[1], scored_below=scored_below)
    return y


def exact_run(q, k, v, mask=None, **attrs):
    """Y of a call the routing rule must send to exact attention."""
    y, stats = ko.run_counted(q, k, v, mask, **attrs)
    ko.assert_exact_ran(stats, heads=q.shape[0] * q.shape[1])
    return y


def recall(weights, exact_ids, top_k=32):
    """Share of the exact top-k keys that received weight."""
    got = np.take_along_axis(weights, exact_ids, axis=-1) > 0
    return got.mean()


@pytest.fixture(scope="module")
def clustered():
    return ko.clustered_qkv(np.random.default_rng(0), 1, 4, 2, S, 64, clusters=16)  # 64 keys per cluster


def test_recall_and_error_on_clustered_keys_with_peaked_queries(clustered):
    q, k, v = clustered
    weights = retrieved_weights(q[:, :, :256], k, compensate=0)
    attended = np.count_nonzero(weights, axis=-1)  # every key of the clusters scanned
    assert (attended >= 128).all() and attended.mean() < 0.25 * S, attended.mean()
    r = recall(weights, ko.exact_top_k(q[:, :, :256], k, 32))
    assert r >= 0.95, f"recall {r:.3f}"
    err = ko.relative_error(knn_run(q, k, v, scored_below=0.25, **KNN), ko.dense_attention(q, k, v))
    assert err <= 0.08, f"relative error {err:.4f}"


def test_causal_knn_never_looks_ahead_and_stays_accurate(clustered):
    q, k, v = clustered
    for compensate in (0, 1):
        w = retrieved_weights(q, k, is_causal=1, compensate=compensate)
        future = np.triu(np.ones((S, S), bool), 1)
        assert not w[..., future].any(), "a query attended to a later key"
    exact_ids = ko.exact_top_k(q, k, 32, is_causal=True)
    w = retrieved_weights(q, k, is_causal=1, compensate=0)
    rows = np.arange(32, S)  # rows with at least top_k visible keys
    assert recall(w[:, :, rows], exact_ids[:, :, rows]) >= 0.95
    late = np.arange(S // 2, S)  # kNN ran: late rows attend far fewer keys than they see
    assert ((w[:, :, late] > 0).sum(-1) < 0.5 * (late + 1)).all()
    err = ko.relative_error(knn_run(q, k, v, is_causal=1, **KNN), ko.dense_attention(q, k, v, is_causal=True))
    assert err <= 0.08, f"relative error {err:.4f}"


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_key_padding_removes_keys_per_batch_element(kind):
    rng = np.random.default_rng(3)
    q, k, v = ko.clustered_qkv(rng, 2, 2, 2, S, 32)
    allowed = np.ones((2, 1, 1, S), bool)
    allowed[0, ..., 700:] = False          # batch 0: right padding
    allowed[1, ..., rng.random(S) < 0.3] = False  # batch 1: scattered
    mask = allowed if kind == "bool" else np.where(allowed, 0.0, np.finfo(np.float32).min).astype(np.float32)
    for compensate in (0, 1):
        w = retrieved_weights(q, k, mask, compensate=compensate)
        blocked = np.broadcast_to(~allowed, w.shape)
        assert not w[blocked].any(), "a removed key received weight"
        if not compensate:  # (the estimate spreads weight over every key it summarises)
            kept = allowed.reshape(2, S).sum(-1)[:, None, None]
            assert ((w > 0).sum(-1) < 0.5 * kept).all(), "kNN did not run"
    err = ko.relative_error(knn_run(q, k, v, mask, **KNN), ko.dense_attention(q, k, v, mask))
    assert err <= 0.2, f"relative error {err:.4f}"  # (a scan of 128 keys; about 0.14 here)


def test_rows_without_allowed_keys_output_the_mean_of_values():
    rng = np.random.default_rng(4)
    q, k, v = ko.clustered_qkv(rng, 2, 2, 1, S, 16)
    allowed = np.ones((2, 1, 1, S), bool)
    allowed[1] = False
    y = knn_run(q, k, v, allowed, **KNN)
    np.testing.assert_allclose(y[1], np.broadcast_to(v[1, 0].mean(0), y[1].shape), atol=1e-5)
    assert ko.relative_error(y[0], ko.dense_attention(q, k, v, allowed)[0]) < 0.2  # (0.12 here: D 16, a scan of 128)


@pytest.mark.parametrize("causal, past", [(0, 0), (1, 0), (1, 333)])
def test_compensation_cuts_the_error_of_diffuse_attention(causal, past):
    """past > 0: fewer queries than keys (a prompt after a cache), so causal tile
    boundaries fall between the summary's snapshots."""
    q, k, v = ko.clustered_qkv(np.random.default_rng(5), 1, 2, 2, S, 64, peak=2.0)
    q = np.ascontiguousarray(q[:, :, past:])
    reference = ko.dense_attention(q, k, v, is_causal=causal)
    pure = ko.relative_error(knn_run(q, k, v, compensate=0, is_causal=causal, **KNN), reference)
    compensated = ko.relative_error(knn_run(q, k, v, compensate=1, is_causal=causal, **KNN), reference)
    assert compensated < 0.5 * pure, f"compensated {compensated:.3f} vs pure top-k {pure:.3f}"
    assert compensated < 0.35


@pytest.mark.parametrize("sq", [600, 1024])
def test_causal_compensation_is_exact_with_one_key_per_summary_cluster(sq):
    """Singleton clusters make the tail estimate exact: what remains is the running
    summary's bookkeeping (snapshots, tiles, keys from the tile start), which must
    count every visible key once and no later key."""
    rng = np.random.default_rng(7)
    q, k, v = ko.random_qkv(rng, 1, 2, 1, sq, S, 16, 8)
    mask = np.ones((1, 1, 1, S), np.bool_)
    mask[..., 100:140] = False  # removed keys must stay out of the summaries too
    y = knn_run(q, k, v, mask, is_causal=1, top_k=8, exact_below=0, tail_clusters=S, probe_rows=0)
    np.testing.assert_allclose(y, ko.dense_attention(q, k, v, mask, is_causal=True), atol=2e-4)


def test_a_scan_of_more_than_an_eighth_of_the_keys_runs_exactly():
    """top_k just below Sk, or a scan budget past Sk / 8: no faster than exact, so exact."""
    rng = np.random.default_rng(6)
    q, k, v = ko.random_qkv(rng, 1, 2, 1, 64, 40, 16, 16)
    for attrs in (dict(top_k=39), dict(top_k=4, scan_min=6)):
        y = exact_run(q, k, v, exact_below=0, **attrs)
        np.testing.assert_allclose(y, ko.dense_attention(q, k, v), atol=1e-5)
    knn_run(q, k, v, exact_below=0, top_k=4, scan_min=5, probe_rows=0)  # 40 keys = 8 x 5: kNN


def test_threads_and_seed_give_identical_results(clustered):
    q, k, v = clustered
    feeds = {"Q": q, "K": k, "V": v}
    for causal in (0, 1):
        model = ko.attention_model(is_causal=causal, seed=7, **KNN)
        with run_stats(ko.library_file()) as stats:
            one = ko.session(model, threads=1).run(None, feeds)[0]
            two = ko.session(model, threads=2).run(None, feeds)[0]
            again = ko.session(model, threads=2).run(None, feeds)[0]
        assert (stats.knn_calls, stats.exact_calls, stats.knn_heads) == (3, 0, 3 * 4), stats
        np.testing.assert_array_equal(one, two)
        np.testing.assert_array_equal(two, again)
        assert ko.relative_error(one, ko.dense_attention(q, k, v, is_causal=bool(causal))) < 0.08


def test_one_kv_head_spreads_its_build_over_threads_with_the_same_result():
    """MQA at batch 1: one index, built with the pool's threads (in fixed chunks)."""
    q, k, v = ko.clustered_qkv(np.random.default_rng(10), 1, 4, 1, 2500, 32)
    feeds = {"Q": q, "K": k, "V": v}
    model = ko.attention_model(**KNN)
    with run_stats(ko.library_file()) as stats:
        one = ko.session(model, threads=1).run(None, feeds)[0]
        two = ko.session(model, threads=2).run(None, feeds)[0]
    assert (stats.knn_calls, stats.exact_calls, stats.knn_heads) == (2, 0, 2 * 4), stats
    np.testing.assert_array_equal(one, two)
    assert ko.relative_error(two, ko.dense_attention(q, k, v)) < 0.15  # (0.11: a scan of 128 of 2500 keys)


def test_leading_causal_rows_that_see_little_more_than_their_scan_run_exactly():
    """A causal row that sees at most its scan plus min(scan, 1024) keys is cheaper to
    attend exactly: with a 256-key scan the first query block (rows 0-511, at most 512
    keys each) runs exactly, the rest through the index."""
    s = 2048
    q, k, v = ko.clustered_qkv(np.random.default_rng(21), 1, 2, 1, s, 32)
    y, stats = ko.run_counted(q, k, v, is_causal=1, top_k=32, exact_below=0, probe_rows=0, scan_min=256)
    assert stats.knn_calls == 1 and stats.knn_heads == 2 and stats.knn_rows == 2 * (s - 512), stats
    dense = ko.dense_attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(y[:, :, :512], dense[:, :, :512], atol=1e-5)
    assert ko.relative_error(y[:, :, 512:], dense[:, :, 512:]) > 1e-4  # the index's approximation
    # A chunk after a cache (every row sees more than 512 keys): no row runs exactly.
    _, stats = ko.run_counted(q[:, :, s // 2:], k, v, is_causal=1, top_k=32, exact_below=0, probe_rows=0,
                              scan_min=256)
    assert stats.knn_rows == 2 * (s // 2), stats


def test_rows_whose_index_holds_no_visible_key_attend_their_sinks_and_window_exactly():
    """Causal, with keys 4..599 removed: a query before position ~680 finds nothing in
    the index (every key before its tile's window is a sink or removed), so only its
    sinks and window count: exactly, like dense attention over the same keys."""
    rng = np.random.default_rng(11)
    q, k, v = ko.clustered_qkv(rng, 1, 2, 1, S, 32)
    allowed = np.ones((1, 1, 1, S), bool)
    allowed[..., 4:600] = False
    y = knn_run(q, k, v, allowed, is_causal=1, **KNN)
    want = ko.dense_attention(q, k, v, allowed, is_causal=True)
    np.testing.assert_allclose(y[:, :, :680], want[:, :, :680], atol=1e-5)
    assert ko.relative_error(y, want) < 0.2


def test_masks_that_are_not_key_padding_fall_back_to_exact(clustered):
    q, k, v = clustered
    rng = np.random.default_rng(8)
    for mask in (rng.random((1, 1, S, S)) > 0.5,                       # per query
                 rng.standard_normal((1, 1, 1, S)).astype(np.float32)):  # real biases
        np.testing.assert_allclose(exact_run(q, k, v, mask, **KNN), ko.dense_attention(q, k, v, mask), atol=1e-5)


def test_few_queries_run_exactly(clustered):
    """A decoding step (Sq = 1) or a short chunk never pays for an index."""
    q, k, v = clustered
    for sq in (1, 16):
        qs = q[:, :, :sq]
        np.testing.assert_allclose(exact_run(qs, k, v, **KNN), ko.dense_attention(qs, k, v), atol=1e-5)


def test_default_exact_below_keeps_short_sequences_exact():
    rng = np.random.default_rng(9)
    q, k, v = ko.clustered_qkv(rng, 1, 2, 2, 512, 32)
    np.testing.assert_allclose(exact_run(q, k, v), ko.dense_attention(q, k, v), atol=1e-5)


def test_dci_index_runs_when_built(clustered):
    q, k, v = clustered
    try:
        y, stats = ko.run_counted(q, k, v, index="dci", **KNN)
    except Exception as e:  # not built into this library
        assert "dci" in str(e)
        return
    ko.assert_knn_ran(stats, heads=4)
    assert y.shape == (1, 4, S, 64)
    assert ko.relative_error(y, ko.dense_attention(q, k, v)) < DCI_ERROR


def test_sinks_and_the_window_are_always_attended():
    """Causal, with a scan budget far below the keys: every row still attends the
    first `sinks` keys and every key from its tile's boundary (`window` keys before
    its tile of 16) up to itself — the contract's mirror says which — and no later key."""
    q, k, _ = ko.clustered_qkv(np.random.default_rng(12), 1, 2, 1, S, 32)
    attrs = dict(is_causal=1, sinks=4, window=64, scan_min=64, compensate=0)
    w = retrieved_weights(q, k, **attrs)  # (sinks and window as given override the helper's zeros)
    always = Attributes(**attrs).always_attended(S, S, causal=True)
    visible = np.tril(np.ones((S, S), bool))
    assert (w[:, :, always & visible] > 0).all(), "a sink or window key got no weight"
    assert not w[:, :, ~visible].any(), "a later key got weight"
    late = np.arange(S // 2, S)  # kNN ran: late rows attend far fewer keys than they see
    assert ((w[:, :, late] > 0).sum(-1) < 0.5 * visible.sum(-1)[late]).all()


def _two_heads(peaked_head_scale=1.0, diffuse_head_scale=0.02):
    """Head 0 peaked (kNN is accurate), head 1 nearly uniform (a small scan misses most of its mass)."""
    q, k, v = ko.clustered_qkv(np.random.default_rng(13), 1, 2, 2, S, 32)
    q = q.copy()
    q[:, 0] *= peaked_head_scale
    q[:, 1] *= diffuse_head_scale
    return q, k, v


def test_the_guard_sends_an_inaccurate_head_to_the_exact_path():
    q, k, v = _two_heads()
    small_scan = dict(top_k=8, exact_below=0, scan_min=128, compensate=0, sinks=0, window=0)
    dense = ko.dense_attention(q, k, v)
    unguarded = knn_run(q, k, v, probe_rows=0, **small_scan)
    guarded, stats = ko.run_counted(q, k, v, probe_rows=32, max_error=0.1, **small_scan)
    assert (stats.knn_calls, stats.knn_heads, stats.guarded_heads) == (1, 1, 1), stats
    # Without the guard both heads run kNN: the diffuse one is far off.
    assert ko.relative_error(unguarded[:, 1], dense[:, 1]) > 0.1
    # With it, the diffuse head is exact and the peaked one still runs kNN (not exact).
    np.testing.assert_allclose(guarded[:, 1], dense[:, 1], atol=1e-5)
    np.testing.assert_array_equal(guarded[:, 0], unguarded[:, 0])
    assert ko.relative_error(guarded[:, 0], dense[:, 0]) > 1e-6


def test_the_guard_keeps_its_probed_rows_within_max_error():
    """What the guard promises (CONTRACT.md): each head's probed rows, spread over the
    sequence at tile starts, are within max_error of exact attention. The probe is a
    sample: the head's other rows may be further off (here up to ~4x, a few rows holding
    most of the error)."""
    q, k, v = _two_heads(diffuse_head_scale=0.3)
    attrs = dict(top_k=8, exact_below=0, scan_min=128, probe_rows=64, max_error=0.02)
    y, stats = ko.run_counted(q, k, v, **attrs)
    assert stats.knn_calls == 1 and stats.knn_heads >= 1, stats  # the peaked head passes the guard
    dense = ko.dense_attention(q, k, v)
    probed = [(2 * j + 1) * S // 128 // 16 * 16 for j in range(64)]  # the guard's rows, non-causal
    unguarded = knn_run(q, k, v, probe_rows=0, **{n: a for n, a in attrs.items() if n != "probe_rows"})
    assert max(ko.relative_error(unguarded[:, h, probed], dense[:, h, probed]) for h in range(2)) > 0.02
    for h in range(2):
        assert ko.relative_error(y[:, h, probed], dense[:, h, probed]) <= 0.02
        assert ko.relative_error(y[:, h], dense[:, h]) < 5 * 0.02


def test_the_guard_doubles_the_scan_of_a_head_the_default_budget_misses():
    """A head off by more than max_error at the default scan is probed again with twice
    the keys and keeps that budget when it meets the bound: its output is bit for bit the
    unguarded output at twice the scan floor. A head no budget within a quarter of the
    keys can serve runs exactly."""
    s = 2048
    q, k, v = ko.clustered_qkv(np.random.default_rng(13), 1, 2, 2, s, 32)
    q = q.copy()
    q[:, 1] *= 0.05  # nearly uniform: no scan of a quarter of the keys gets it right
    attrs = dict(top_k=8, exact_below=0, compensate=0, sinks=0, window=0)
    dense = ko.dense_attention(q, k, v)
    y_base = knn_run(q, k, v, probe_rows=0, scan_min=128, scored_below=0.2, **attrs)
    y_double = knn_run(q, k, v, probe_rows=0, scan_min=256, scored_below=0.3, **attrs)
    # With as many probe rows as tiles the guard probes every tile start (rows 0, 16, ...).
    probed = slice(0, s, 16)
    e_base, e_double = (ko.relative_error(y[:, 0, probed], dense[:, 0, probed]) for y in (y_base, y_double))
    assert e_base > 1.3 * e_double, (e_base, e_double)  # the case: twice the scan is clearly better

    guarded, stats = ko.run_counted(q, k, v, probe_rows=s // 16, max_error=float(np.sqrt(e_base * e_double)),
                                    scan_min=128, **attrs)
    assert (stats.knn_calls, stats.knn_heads, stats.guarded_heads) == (1, 1, 1), stats
    assert stats.mean_keys_scored >= 256, stats
    np.testing.assert_array_equal(guarded[:, 0], y_double[:, 0])
    np.testing.assert_allclose(guarded[:, 1], dense[:, 1], atol=1e-5)


def test_the_default_scan_covers_two_clusters_worth_of_keys():
    """A query's best keys spread over several clusters: by default the cluster index scans
    at least two clusters' worth (2 sqrt(Sk) keys) even for a top_k below a cluster's
    size; an explicit scan_min is taken as it is."""
    q, k, v = ko.clustered_qkv(np.random.default_rng(5), 1, 2, 2, S, 32, peak=4.0)
    attrs = dict(top_k=8, exact_below=0, probe_rows=0, compensate=0, sinks=0)
    assert Attributes(top_k=8).scan_floor(S) == 64 and Attributes(top_k=8, scan_min=8).scan_floor(S) == 8
    dense = ko.dense_attention(q, k, v)
    y_default, default = ko.run_counted(q, k, v, **attrs)
    y_one, one = ko.run_counted(q, k, v, scan_min=8, **attrs)
    ko.assert_knn_ran(default, heads=2, scored_below=0.2)
    ko.assert_knn_ran(one, heads=2, scored_below=0.2)
    assert default.mean_keys_scored >= 64 > one.mean_keys_scored, (default, one)
    assert ko.relative_error(y_default, dense) < 0.8 * ko.relative_error(y_one, dense)
