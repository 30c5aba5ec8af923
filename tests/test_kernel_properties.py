"""Property-based tests of IceKNNAttention against the numpy reference of the contract
(`ice_onnx.custom_ops.reference.attention`, float64): shapes (Sq or Sk of 0 or 1, GQA
and MQA, D != Dv), masks of every broadcast shape (bool and float), attribute values
(scale, causal, top_k up to past Sk, compensation) and special values (NaN, +-Inf,
huge magnitudes, every key masked).

The native kNN path is compared with the reference where its result is defined
exactly: with one tail cluster per key, the tail estimate counts every visible key the
index did not scan exactly, so kNN mode must match exact attention whatever the index
found. The kernel's run statistics must show that such a call took the kNN path (the
contract's routing rule, mirrored in `Attributes.uses_knn`, says it must). Hypothesis
runs derandomised, so the examples are the same every run.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

import kernel_oracle as ko
from ice_onnx.custom_ops.contract import ALWAYS_EXACT, Attributes
from ice_onnx.custom_ops.reference import attention as reference_attention

# The reference computes 0/0 and inf - inf on purpose (rows it then replaces, NaN inputs).
pytestmark = pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def tolerance(v) -> float:
    """An output is a weighted mean of V rows: float32 error scales with |V|."""
    return 2e-5 * max(1.0, float(np.abs(v).max(initial=0.0)))


@st.composite
def problems(draw, max_sq=24, max_sk=40, min_sk=0, min_sq=0):
    """(q, k, v) of a random attention shape, with values of a random magnitude."""
    b = draw(st.integers(1, 2))
    kv_heads = draw(st.integers(1, 3))
    group = draw(st.sampled_from([1, 2, 3]))
    sq = draw(st.integers(min_sq, max_sq))
    sk = draw(st.integers(min_sk, max_sk))
    d = draw(st.sampled_from([1, 3, 8, 16, 33]))
    dv = draw(st.sampled_from([1, 5, 8, 16]))
    magnitude = draw(st.sampled_from([1e-3, 0.3, 1.0, 3.0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    q, k, v = ko.random_qkv(rng, b, kv_heads * group, kv_heads, sq, sk, d, dv, scale=magnitude)
    return q, k, v, rng


@st.composite
def masks(draw, shape, kinds=("none", "bool", "float"), key_padding_only=False):
    """None, or a bool / float mask of a random shape that broadcasts to `shape`
    ([B, Hq, Sq, Sk]); float masks mix biases, zeros and -inf."""
    kind = draw(st.sampled_from(kinds))
    if kind == "none":
        return None
    b, hq, sq, sk = shape
    if key_padding_only:
        full = (draw(st.sampled_from([1, b])), 1, 1, sk)
    else:
        full = tuple(draw(st.sampled_from([1, n])) for n in shape)
    rank = draw(st.integers(1, 4))
    assume(all(n == 1 for n in full[: 4 - rank]))  # dropped leading axes must be 1
    mask_shape = full[4 - rank:]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    keep = rng.random(mask_shape) < draw(st.sampled_from([0.0, 0.5, 0.9, 1.0]))  # 0.0: every key masked
    if kind == "bool":
        return keep
    values = np.zeros(mask_shape) if key_padding_only else rng.standard_normal(mask_shape)
    return np.where(keep, values, -np.inf).astype(np.float32)


def expected(q, k, v, mask, dense=True, **attrs):
    if k.shape[2] == 0:  # no key at all: the contract's mean of V over zero keys is zeros
        return np.zeros(q.shape[:3] + (v.shape[3],))
    return reference_attention(q, k, v, mask, Attributes(**attrs), dense=dense)


# --- exact mode ------------------------------------------------------------------

@settings(max_examples=80, **SETTINGS)
@given(data=st.data(), causal=st.integers(0, 1), scale=st.sampled_from([0.0, 0.05, 0.5, 2.0]))
def test_exact_mode_matches_the_reference(data, causal, scale):
    q, k, v, _ = data.draw(problems())
    mask = data.draw(masks((q.shape[0], q.shape[1], q.shape[2], k.shape[2])))
    attrs = dict(is_causal=causal, scale=scale, exact_below=ALWAYS_EXACT)
    y = ko.run(q, k, v, mask, **attrs)
    want = expected(q, k, v, mask, **attrs)
    assert y.shape == want.shape
    np.testing.assert_allclose(y, want, rtol=0, atol=tolerance(v))


# --- kNN mode where it is exact ------------------------------------------------------

@settings(max_examples=60, **SETTINGS)
@given(data=st.data(), causal=st.integers(0, 1), sinks=st.sampled_from([0, 1, 4]), window=st.sampled_from([0, 8]))
def test_knn_mode_with_one_tail_cluster_per_key_matches_the_reference(data, causal, sinks, window):
    # 28+ queries per kv head and 16+ keys: enough for an index (4 sqrt(Sk) queries,
    # Sk >= 8 x the scan of top_k keys).
    q, k, v, _ = data.draw(problems(max_sq=40, max_sk=48, min_sk=16, min_sq=28))
    b, hq, sq, _ = q.shape
    sk = k.shape[2]
    mask = data.draw(masks((b, hq, sq, sk), key_padding_only=True))
    top_k = data.draw(st.integers(1, sk // 8))
    attrs = dict(is_causal=causal, top_k=top_k, exact_below=0, compensate=1, probe_rows=0, sinks=sinks,
                 window=window, tail_clusters=sk)
    assert Attributes(**attrs).uses_knn(sk, sq * hq // k.shape[1])  # the problem is one for kNN mode
    y, stats = ko.run_counted(q, k, v, mask, **attrs)
    ko.assert_knn_ran(stats, heads=b * hq, scored_below=1.0)
    want = expected(q, k, v, mask, dense=True, **attrs)
    np.testing.assert_allclose(y, want, rtol=0, atol=tolerance(v))


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("exact_below", [0, ALWAYS_EXACT])
def test_every_key_masked_gives_the_mean_of_values(kind, exact_below):
    rng = np.random.default_rng(11)
    q, k, v = ko.random_qkv(rng, 2, 4, 2, 40, 48, 8, 6)
    blocked = np.zeros((2, 1, 1, 48), bool)
    mask = blocked if kind == "bool" else np.where(blocked, 0.0, -np.inf).astype(np.float32)
    for causal in (0, 1):
        # (window 0: the default 64 would cover the 48 keys, which routes a causal call to exact)
        y, stats = ko.run_counted(q, k, v, mask, is_causal=causal, top_k=4, exact_below=exact_below, window=0)
        if exact_below == 0:  # 48 keys, 80 queries per kv head: kNN
            ko.assert_knn_ran(stats, heads=8)
        means = np.repeat(v.mean(axis=2, keepdims=True), 2, axis=1)  # query head h uses kv head h // 2
        np.testing.assert_allclose(y, np.broadcast_to(means, y.shape), atol=1e-5)


# --- special values ----------------------------------------------------------------

SPECIALS = [np.nan, np.inf, -np.inf]


@settings(max_examples=60, **SETTINGS)
@given(data=st.data(), where=st.sampled_from(["Q", "K", "V"]), special=st.sampled_from(SPECIALS),
       knn=st.booleans(), causal=st.integers(0, 1))
def test_nan_and_inf_propagate_as_in_dense_attention(data, where, special, knn, causal):
    q, k, v, rng = data.draw(problems(max_sq=40, max_sk=40, min_sk=1))
    if where == "V":
        # A weight of exactly 0 times Inf is NaN: dense math poisons rows through
        # masked and future keys alike, which only an unmasked, non-causal call shares.
        mask, causal = None, 0
    else:
        mask = data.draw(masks((q.shape[0], q.shape[1], q.shape[2], k.shape[2]), kinds=("none", "bool", "float")))
    target = {"Q": q, "K": k, "V": v}[where]
    assume(target.size > 0)
    count = data.draw(st.integers(1, 3))
    target.reshape(-1)[rng.choice(target.size, size=min(count, target.size), replace=False)] = special
    # kNN mode forced with compensation (reference: exact); the kernel must fall back
    # to dense math wherever a special value is involved.
    attrs = dict(is_causal=causal, exact_below=0 if knn else ALWAYS_EXACT, top_k=2, compensate=1)
    y = ko.run(q, k, v, mask, **attrs)
    want = expected(q, k, v, mask, dense=True, is_causal=causal)
    np.testing.assert_allclose(y, want, rtol=0, atol=tolerance(np.nan_to_num(v, posinf=0, neginf=0)),
                               equal_nan=True)


@settings(max_examples=30, **SETTINGS)
@given(data=st.data(), knn=st.booleans(), magnitude=st.sampled_from([1e15, 1e18]))
def test_huge_magnitudes_give_a_weighted_mean_of_values(data, knn, magnitude):
    """Scores near the float range: the softmax saturates, but every output is still a
    convex combination of V rows (finite, within V's column range)."""
    q, k, v, _ = data.draw(problems(max_sq=40, max_sk=40, min_sk=1))
    q = q / np.abs(q).max(initial=1.0) * np.float32(magnitude)
    k = k / np.abs(k).max(initial=1.0) * np.float32(magnitude)
    y = ko.run(q.astype(np.float32), k.astype(np.float32), v, exact_below=0 if knn else ALWAYS_EXACT, top_k=4)
    assert np.isfinite(y).all()
    group = q.shape[1] // k.shape[1]
    vq = np.repeat(v, group, axis=1)
    slack = tolerance(v)
    assert (y >= vq.min(axis=2, keepdims=True) - slack).all() and (y <= vq.max(axis=2, keepdims=True) + slack).all()


def test_a_finite_mask_at_the_float_minimum_on_every_key_gives_the_mean_of_values():
    """What exporters emit for padding (finfo.min): the same as every key blocked."""
    rng = np.random.default_rng(12)
    q, k, v = ko.random_qkv(rng, 1, 2, 1, 70, 80, 16, 8)
    mask = np.full((1, 1, 1, 80), np.finfo(np.float32).min, np.float32)
    for exact_below in (0, ALWAYS_EXACT):
        y, stats = ko.run_counted(q, k, v, mask, exact_below=exact_below, top_k=8)
        if exact_below == 0:  # 80 keys, 140 queries per kv head: kNN
            ko.assert_knn_ran(stats, heads=2)
        np.testing.assert_allclose(y, np.broadcast_to(v.mean(axis=2, keepdims=True), y.shape), atol=1e-5)
