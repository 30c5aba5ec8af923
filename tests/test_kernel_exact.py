"""Exact mode of IceKNNAttention against numpy float64 dense attention."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from onnx import TensorProto

import kernel_oracle as ko

ALWAYS_EXACT = 2147483647
TOLERANCE = 1e-5


def check(q, k, v, mask=None, **attrs):
    y = ko.run(q, k, v, mask, exact_below=ALWAYS_EXACT, **attrs)
    expected = ko.dense_attention(q, k, v, mask, scale=attrs.get("scale", 0.0),
                                  is_causal=bool(attrs.get("is_causal", 0)))
    assert y.shape == expected.shape
    np.testing.assert_allclose(y, expected, rtol=0, atol=TOLERANCE)
    return y


# (B, Hq, Hkv, Sq, Sk, D, Dv): MHA, GQA, MQA, Sq != Sk, D != Dv, tile edges (64 queries, 128 keys)
SHAPES = [
    (1, 1, 1, 1, 1, 8, 8),
    (1, 2, 2, 5, 7, 16, 16),
    (2, 4, 2, 33, 70, 16, 24),
    (1, 8, 1, 17, 129, 32, 40),
    (1, 3, 3, 65, 257, 64, 64),
    (2, 6, 2, 130, 200, 20, 7),
    (1, 2, 1, 1, 300, 128, 96),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("is_causal", [0, 1])
def test_matches_dense_attention(shape, is_causal):
    rng = np.random.default_rng(sum(shape) + is_causal)
    check(*ko.random_qkv(rng, *shape), is_causal=is_causal)


def test_scale_attribute_and_large_scores():
    rng = np.random.default_rng(1)
    q, k, v = ko.random_qkv(rng, 1, 2, 1, 40, 90, 16, 16, scale=3.0)
    check(q, k, v, scale=0.7)


@pytest.mark.parametrize("mask_shape", [
    (90,), (1, 90), (40, 90), (1, 1, 1, 90), (2, 1, 1, 90), (2, 4, 40, 90), (2, 1, 40, 1), (4, 1, 90),
])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_masks_of_every_broadcast_shape(mask_shape, kind):
    rng = np.random.default_rng(len(mask_shape))
    q, k, v = ko.random_qkv(rng, 2, 4, 2, 40, 90, 16, 12)
    allowed = rng.random(mask_shape) > 0.3
    if kind == "bool":
        mask = allowed
    else:  # biases, with -inf on blocked keys
        mask = np.where(allowed, rng.standard_normal(mask_shape), -np.inf).astype(np.float32)
    check(q, k, v, mask)


@pytest.mark.parametrize("sq,sk", [(10, 30), (30, 30), (30, 10)])
def test_causal_is_bottom_right_aligned(sq, sk):
    rng = np.random.default_rng(sq * sk)
    check(*ko.random_qkv(rng, 1, 2, 1, sq, sk, 8, 8), is_causal=1)  # Sq > Sk: first rows see nothing


def test_causal_combines_with_a_mask():
    rng = np.random.default_rng(5)
    q, k, v = ko.random_qkv(rng, 2, 2, 2, 50, 80, 16, 16)
    check(q, k, v, rng.random((2, 1, 1, 80)) > 0.5, is_causal=1)


def test_rows_without_allowed_keys_output_the_mean_of_values():
    rng = np.random.default_rng(6)
    q, k, v = ko.random_qkv(rng, 1, 2, 2, 6, 20, 8, 8)
    mask = rng.random((1, 2, 6, 20)) > 0.5
    mask[0, 1, 3] = False
    fmask = np.where(mask, 0.0, -np.inf).astype(np.float32)
    for m in (mask, fmask):
        y = check(q, k, v, m)
        np.testing.assert_allclose(y[0, 1, 3], v[0, 1].mean(0), atol=TOLERANCE)
    # a very negative finite bias on every key (exporters' finfo.min masks) gives the same
    y = ko.run(q, k, v, np.full((1, 1, 1, 20), np.finfo(np.float32).min, np.float32), exact_below=ALWAYS_EXACT)
    np.testing.assert_allclose(y[0, 0], np.broadcast_to(v[0, 0].mean(0), (6, 8)), atol=TOLERANCE)


def test_float_mask_biases_near_the_float_limits_stay_finite():
    """(1 - m) * -finfo.min masks give +3.4e38 biases: finite in dense attention, so here too."""
    rng = np.random.default_rng(21)
    q, k, v = ko.random_qkv(rng, 1, 2, 2, 5, 6, 4, 4)
    top = np.finfo(np.float32).max
    mask = np.array([0.0, top, top, np.finfo(np.float32).min, 1.0, top], np.float32).reshape(1, 1, 1, 6)
    y = ko.run(q, k, v, mask, exact_below=ALWAYS_EXACT)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, ko.dense_attention(q, k, v, mask), atol=1e-5)


def test_nan_in_a_query_stays_in_its_row():
    rng = np.random.default_rng(7)
    q, k, v = ko.random_qkv(rng, 1, 1, 1, 4, 30, 8, 8)
    q[0, 0, 2, 3] = np.nan
    y = ko.run(q, k, v, exact_below=ALWAYS_EXACT)
    assert np.isnan(y[0, 0, 2]).all()
    np.testing.assert_allclose(np.delete(y[0, 0], 2, 0), np.delete(ko.dense_attention(q, k, v)[0, 0], 2, 0),
                               atol=TOLERANCE)


@pytest.mark.parametrize("fourth", ["missing", "empty-name"])
def test_three_inputs_or_an_empty_fourth(fourth):
    rng = np.random.default_rng(8)
    q, k, v = ko.random_qkv(rng, 1, 2, 1, 9, 33, 8, 8)
    model = ko.attention_model(None, mask_input_name="" if fourth == "empty-name" else "M", exact_below=ALWAYS_EXACT)
    y = ko.session(model).run(None, {"Q": q, "K": k, "V": v})[0]
    np.testing.assert_allclose(y, ko.dense_attention(q, k, v), atol=TOLERANCE)


def test_one_and_two_threads_agree_exactly():
    rng = np.random.default_rng(9)
    q, k, v = ko.random_qkv(rng, 2, 4, 2, 200, 300, 32, 32)
    model = ko.attention_model(TensorProto.BOOL, exact_below=ALWAYS_EXACT, is_causal=1)
    feeds = {"Q": q, "K": k, "V": v, "M": rng.random((2, 1, 1, 300)) > 0.2}
    one = ko.session(model, threads=1).run(None, feeds)[0]
    two = ko.session(model, threads=2).run(None, feeds)[0]
    np.testing.assert_array_equal(one, two)


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 2), kv_heads=st.integers(1, 3), group=st.integers(1, 3), sq=st.integers(1, 70),
       sk=st.integers(1, 140), d=st.integers(1, 40), dv=st.integers(1, 40), causal=st.integers(0, 1),
       mask_kind=st.sampled_from(["none", "bool-keys", "float-full"]), seed=st.integers(0, 2**16))
def test_property_random_shapes(b, kv_heads, group, sq, sk, d, dv, causal, mask_kind, seed):
    rng = np.random.default_rng(seed)
    q, k, v = ko.random_qkv(rng, b, kv_heads * group, kv_heads, sq, sk, d, dv)
    mask = None
    if mask_kind == "bool-keys":
        mask = rng.random((b, 1, 1, sk)) > 0.3
    elif mask_kind == "float-full":
        mask = np.where(rng.random((b, kv_heads * group, sq, sk)) > 0.3,
                        rng.standard_normal((b, kv_heads * group, sq, sk)), -np.inf).astype(np.float32)
    check(q, k, v, mask, is_causal=causal)
