"""Exact mode with a key-padding mask ([B, 1, 1, Sk]) against numpy float64 dense attention.

Without causality, a window or a softcap the kernel packs only the keys such a mask
allows (per batch element) and skips the mask afterwards; these cases pin down that
this is exact: long rows over several key blocks, kept counts off the panel width,
different padding per batch element, float masks of 0 / -inf, and the cases where
the mask must not be folded (other biases, non-finite values behind the mask).
"""

import numpy as np
import pytest

import kernel_oracle as ko

ALWAYS_EXACT = 2147483647
TOLERANCE = 1e-5


def check(q, k, v, mask, **attrs):
    y = ko.run(q, k, v, mask, exact_below=ALWAYS_EXACT, **attrs)
    expected = ko.dense_attention(q, k, v, mask, is_causal=bool(attrs.get("is_causal", 0)))
    np.testing.assert_allclose(y, expected, rtol=0, atol=TOLERANCE, equal_nan=True)
    return y, expected


def padding(sk: int, kept: list[tuple[int, int]]) -> np.ndarray:
    """[B, 1, 1, Sk] bool: batch element b may attend keys [begin, end) of kept[b]."""
    keys = np.arange(sk)
    return np.stack([(keys >= begin) & (keys < end) for begin, end in kept])[:, None, None, :]


# (B, Hq, Hkv, Sq, Sk, D, Dv, kept key ranges per batch element)
CASES = [
    (2, 4, 2, 70, 1300, 64, 64, [(0, 1300), (0, 917)]),    # right padding past two 512-key blocks
    (2, 2, 1, 33, 1100, 32, 40, [(183, 1100), (1, 1099)]),  # left padding; Dv off the strip width
    (3, 3, 3, 65, 600, 16, 16, [(0, 1), (599, 600), (0, 0)]),  # one key, the last key, none
    (1, 6, 2, 130, 515, 128, 96, [(3, 515)]),                  # GQA, kept count off the panel width
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-Sk{c[4]}-D{c[5]}")
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_key_padding_matches_dense_attention(case, kind):
    b, hq, hkv, sq, sk, d, dv, kept = case
    rng = np.random.default_rng(sk + d)
    q, k, v = ko.random_qkv(rng, b, hq, hkv, sq, sk, d, dv)
    mask = padding(sk, kept)
    if kind == "float":
        mask = np.where(mask, 0.0, -np.inf).astype(np.float32)
    check(q, k, v, mask)


def test_scattered_padding_over_several_blocks():
    rng = np.random.default_rng(5)
    q, k, v = ko.random_qkv(rng, 2, 2, 2, 64, 2100, 64, 64)
    check(q, k, v, rng.random((2, 1, 1, 2100)) > 0.6)


def test_float_mask_with_other_biases_is_applied_as_biases():
    """Biases besides 0 and -inf (here finfo.min on padding and small ones elsewhere)
    are added to the scores: the keys cannot simply be dropped."""
    rng = np.random.default_rng(6)
    q, k, v = ko.random_qkv(rng, 2, 2, 1, 40, 700, 32, 32)
    allowed = padding(700, [(0, 650), (20, 700)])
    bias = np.where(allowed, 0.5 * rng.standard_normal(allowed.shape), np.finfo(np.float32).min)
    check(q, k, v, bias.astype(np.float32))


@pytest.mark.parametrize("special", [np.nan, np.inf])
def test_a_non_finite_value_behind_the_mask_reaches_the_output_as_in_dense_attention(special):
    """Dense attention multiplies a blocked key's value by a weight of 0: NaN for NaN
    or Inf. Only batch element 0 holds one; element 1 stays finite."""
    rng = np.random.default_rng(7)
    q, k, v = ko.random_qkv(rng, 2, 2, 2, 20, 600, 16, 16)
    mask = padding(600, [(0, 550), (0, 550)])
    v[0, 1, 580, 3] = special
    y, expected = check(q, k, v, mask)
    assert np.isnan(expected[0, 1, :, 3]).all() and np.isnan(y[0, 1, :, 3]).all()
    assert np.isfinite(y[1]).all() and np.isfinite(y[0, 0]).all()


def test_a_batch_element_without_keys_outputs_the_mean_of_its_values():
    rng = np.random.default_rng(8)
    q, k, v = ko.random_qkv(rng, 2, 4, 2, 30, 800, 32, 32)
    y, _ = check(q, k, v, padding(800, [(0, 0), (100, 800)]))
    means = np.repeat(v[:1].mean(axis=2, keepdims=True), 2, axis=1)
    np.testing.assert_allclose(y[:1], np.broadcast_to(means, y[:1].shape), atol=1e-5)


def test_causal_with_key_padding_matches_dense_attention():
    """Causality refers to keys by position: the mask stays a mask there."""
    rng = np.random.default_rng(9)
    q, k, v = ko.random_qkv(rng, 2, 2, 1, 600, 600, 32, 32)
    check(q, k, v, padding(600, [(40, 600), (0, 560)]), is_causal=1)
