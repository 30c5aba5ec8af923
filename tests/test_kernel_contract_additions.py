"""The contract's additions for real pipelines — `softcap`, `sliding_window`,
`key_lengths` (a shared KV buffer), `empty_rows` — and its bounds on hostile inputs
(large finite values, attribute budgets), each checked against a float64 dense
attention written here from the definitions (transformers' window, ONNX Attention's
softcap order) and, where the ONNX package has it, against ONNX's own reference of
the Attention operator."""

import os
import re

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import kernel_oracle as ko
from ice_onnx.custom_ops import contract, reference
from ice_onnx.custom_ops.run_stats import run_stats

ALWAYS_EXACT = contract.ALWAYS_EXACT


# --- the oracle ------------------------------------------------------------------

def dense(q, k, v, mask=None, scale=0.0, is_causal=False, softcap=0.0, sliding_window=0, key_lengths=None,
          empty_rows="mean"):
    """softmax(cap(scale q.k) + mask) v in float64, batch element by batch element over
    its key_lengths[b] keys: causal alignment j <= i + L - Sq, the window j > i + L - Sq - W
    (transformers' `kv_idx > q_idx - sliding_window`), empty rows the mean of V or 0."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    scale = scale if scale > 0 else 1.0 / np.sqrt(d)
    lengths = [sk] * b if key_lengths is None else [int(n) for n in key_lengths]
    out = np.zeros((b, hq, sq, v.shape[-1]))
    full_mask = None if mask is None else np.broadcast_to(mask, (b, hq, sq, sk))
    for e, n in enumerate(lengths):
        kk = np.repeat(k[e, :, :n], hq // hkv, axis=0)
        vv = np.repeat(v[e, :, :n], hq // hkv, axis=0)
        s = scale * np.einsum("hid,hjd->hij", q[e], kk)
        if softcap > 0:
            s = softcap * np.tanh(s / softcap)
        allowed = np.ones(s.shape, bool)
        if full_mask is not None:
            m = full_mask[e, :, :, :n]
            if m.dtype == np.bool_:
                allowed &= m
            else:
                s = s + m.astype(np.float64)
                allowed &= m != -np.inf
        position = np.arange(sq)[:, None] + n - sq
        j = np.arange(n)[None, :]
        if is_causal:
            allowed &= j <= position
        if sliding_window > 0:
            allowed &= j > position - sliding_window
        any_key = allowed.any(-1, keepdims=True)
        s = np.where(allowed, s, -np.inf)
        top = np.where(any_key, s.max(-1, keepdims=True, initial=-np.inf), 0.0)
        w = np.where(allowed, np.exp(s - top), 0.0)
        w = w / np.where(any_key, w.sum(-1, keepdims=True), 1.0)
        y = np.einsum("hij,hjd->hid", w, vv)
        empty = vv.mean(axis=1, keepdims=True) if (empty_rows == "mean" and n > 0) else np.zeros_like(y[:, :1])
        out[e] = np.where(any_key, y, np.broadcast_to(empty, y.shape))
    return out


# --- models ----------------------------------------------------------------------

def model(mask_type=None, lengths_type=None, **attributes) -> bytes:
    """One IceKNNAttention node over Q, K, V, an optional mask M and optional key lengths L."""
    names = ["Q", "K", "V", "M" if mask_type is not None else ""]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names[:3]]
    if mask_type is not None:
        inputs.append(helper.make_tensor_value_info("M", mask_type, None))
    if lengths_type is not None:
        names.append("L")
        inputs.append(helper.make_tensor_value_info("L", lengths_type, None))
    while names and names[-1] == "":
        names.pop()
    node = helper.make_node(contract.OP_TYPE, names, ["Y"], domain=contract.DOMAIN, **attributes)
    graph = helper.make_graph([node], "attention", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(contract.DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def run(q, k, v, mask=None, key_lengths=None, threads=1, **attributes):
    mask_type = None if mask is None else (TensorProto.BOOL if mask.dtype == np.bool_ else TensorProto.FLOAT)
    lengths_type = None
    feeds = {"Q": q, "K": k, "V": v}
    if mask is not None:
        feeds["M"] = mask
    if key_lengths is not None:
        lengths_type = TensorProto.INT32 if key_lengths.dtype == np.int32 else TensorProto.INT64
        feeds["L"] = key_lengths
    return ko.session(model(mask_type, lengths_type, **attributes), threads).run(None, feeds)[0]


def qkv(seed, b=1, hq=4, hkv=2, sq=40, sk=40, d=16, dv=8, spread=1.0):
    return ko.random_qkv(np.random.default_rng(seed), b, hq, hkv, sq, sk, d, dv, scale=spread)


# --- softcap ---------------------------------------------------------------------

@pytest.mark.parametrize("causal", [0, 1])
@pytest.mark.parametrize("cap", [0.5, 3.0, 50.0])
def test_softcap_caps_scores_before_the_mask(causal, cap):
    q, k, v = qkv(1, sq=33, sk=70, spread=3.0)  # scores well past the cap
    bias = np.random.default_rng(2).standard_normal((1, 1, 33, 70)).astype(np.float32)
    bias[..., ::7] = -np.inf
    y = run(q, k, v, bias, is_causal=causal, softcap=cap)
    np.testing.assert_allclose(y, dense(q, k, v, bias, is_causal=causal, softcap=cap), atol=2e-5)
    # Capping after the mask would turn -inf into -cap; capping before scale would differ too.
    assert not np.allclose(y, dense(q, k, v, bias, is_causal=causal), atol=1e-3)


def test_softcap_matches_onnx_attention_reference():
    op_attention = pytest.importorskip("onnx.reference.ops.op_attention")
    q, k, v = qkv(3, hq=4, hkv=4, sq=20, sk=20, spread=2.0)  # without a past, ONNX aligns causality top-left
    for causal in (False, True):
        expected = op_attention._compute_attention(q, k, v, is_causal=causal, softcap=2.0, scale=0.3)[0]
        y = run(q, k, v, is_causal=int(causal), softcap=2.0, scale=0.3, empty_rows="zero")
        np.testing.assert_allclose(y, expected, atol=2e-5)


# --- sliding window --------------------------------------------------------------

@pytest.mark.parametrize("window", [1, 5, 16, 37, 300])
@pytest.mark.parametrize("sq,sk", [(70, 70), (3, 90), (1, 200), (150, 150)])
def test_sliding_window_counts_the_own_key_as_transformers_does(window, sq, sk):
    q, k, v = qkv(4, sq=sq, sk=sk)
    y = run(q, k, v, is_causal=1, sliding_window=window)
    np.testing.assert_allclose(y, dense(q, k, v, is_causal=True, sliding_window=window), atol=2e-5)
    if window < sk:  # the window matters
        assert not np.allclose(y, dense(q, k, v, is_causal=True), atol=1e-3)
        assert not np.allclose(y, dense(q, k, v, is_causal=True, sliding_window=window + 1), atol=1e-4)


def test_sliding_window_matches_onnx_left_window_size():
    op_attention = pytest.importorskip("onnx.reference.ops.op_attention")
    q, k, v = qkv(5, hq=2, hkv=2, sq=30, sk=30)
    for window in (1, 4, 9):
        try:
            expected = op_attention._compute_attention(q, k, v, is_causal=True, left_window_size=window - 1)[0]
        except TypeError:
            pytest.skip("this onnx has no window attributes on Attention")
        np.testing.assert_allclose(run(q, k, v, is_causal=1, sliding_window=window), expected, atol=2e-5)


def test_sliding_window_without_causality_bounds_only_the_past_and_ands_with_the_mask():
    q, k, v = qkv(6, sq=50, sk=50)
    mask = np.random.default_rng(7).random((1, 4, 50, 50)) > 0.3
    for m in (None, mask):
        y = run(q, k, v, m, sliding_window=8)
        np.testing.assert_allclose(y, dense(q, k, v, m, sliding_window=8), atol=2e-5)
        y = run(q, k, v, m, sliding_window=8, is_causal=1)
        np.testing.assert_allclose(y, dense(q, k, v, m, sliding_window=8, is_causal=True), atol=2e-5)


def test_sliding_window_routes_a_knn_call_to_exact_and_bounds_its_work():
    q, k, v = ko.clustered_qkv(np.random.default_rng(8), 1, 4, 2, 1024, 32)
    knn = dict(top_k=32, scan_min=64, exact_below=0, probe_rows=0, is_causal=1)
    with run_stats() as stats:
        y = run(q, k, v, sliding_window=100, **knn)
    assert stats.exact_calls == 1 and stats.knn_calls == 0
    np.testing.assert_allclose(y, dense(q, k, v, is_causal=True, sliding_window=100), atol=2e-5)
    with run_stats() as stats:  # the control: without the window the same call runs kNN
        run(q, k, v, **knn)
    assert stats.knn_calls == 1


# --- key_lengths: a shared KV buffer --------------------------------------------------

def buffer_with_garbage(k, v, lengths):
    """K and V whose slots past each batch element's length hold NaN, +inf and huge values."""
    k, v = k.copy(), v.copy()
    for e, n in enumerate(lengths):
        k[e, :, n:] = np.nan
        v[e, :, n:] = np.inf
        v[e, :, n + 1:n + 3] = -3e38
    return k, v


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
@pytest.mark.parametrize("sq", [1, 5, 24])
def test_key_lengths_read_only_the_real_keys_and_align_causality_on_them(dtype, sq):
    q, k, v = qkv(9, b=3, sq=sq, sk=64)
    lengths = np.array([24, 64, 40], dtype)
    k, v = buffer_with_garbage(k, v, lengths)
    for causal in (0, 1):
        y = run(q, k, v, key_lengths=lengths, is_causal=causal)
        expected = dense(q, k, v, is_causal=bool(causal), key_lengths=lengths)
        assert np.isfinite(expected).all()
        np.testing.assert_allclose(y, expected, atol=2e-5)


def test_key_lengths_combine_with_mask_window_and_softcap():
    q, k, v = qkv(10, b=2, sq=8, sk=96, spread=2.0)
    lengths = np.array([57, 96], np.int64)
    k, v = buffer_with_garbage(k, v, lengths)
    mask = np.zeros((2, 1, 1, 96), np.float32)
    mask[0, ..., :5] = -np.inf  # left padding of the first element
    attrs = dict(is_causal=1, sliding_window=20, softcap=5.0)
    y = run(q, k, v, mask, key_lengths=lengths, **attrs)
    np.testing.assert_allclose(y, dense(q, k, v, mask, key_lengths=lengths, **attrs), atol=2e-5)


def test_zero_key_lengths_give_the_empty_row_output():
    q, k, v = qkv(11, b=2, sq=3, sk=16)
    lengths = np.array([0, 16], np.int32)
    k, v = buffer_with_garbage(k, v, lengths)
    for empty_rows in ("mean", "zero"):
        y = run(q, k, v, key_lengths=lengths, is_causal=1, empty_rows=empty_rows)
        np.testing.assert_allclose(y[0], 0.0)  # no key at all: nothing to average
        np.testing.assert_allclose(y, dense(q, k, v, is_causal=True, key_lengths=lengths, empty_rows=empty_rows),
                                   atol=2e-5)


def test_key_lengths_decide_knn_on_the_real_keys_not_the_buffer():
    """genai's 8192-slot buffer holding a 1500-token prompt: exact (as a 1500-key call
    would be); the same buffer full: kNN."""
    rng = np.random.default_rng(12)
    q, k, v = ko.clustered_qkv(rng, 1, 2, 1, 8192, 16)
    q = q[:, :, -512:]
    attrs = dict(top_k=128, exact_below=2048, probe_rows=0)
    short = np.array([1500], np.int64)
    with run_stats() as stats:
        y = run(q, k, v, key_lengths=short, **attrs)
    assert stats.exact_calls == 1 and stats.knn_calls == 0
    np.testing.assert_allclose(y, dense(q, k, v, key_lengths=short), atol=2e-5)
    with run_stats() as stats:
        run(q, k, v, key_lengths=np.array([8192], np.int64), **attrs)
    assert stats.knn_calls == 1


def test_key_lengths_differing_across_the_batch_decide_per_element():
    rng = np.random.default_rng(13)
    q, k, v = ko.clustered_qkv(rng, 2, 2, 1, 4096, 16)
    lengths = np.array([4096, 700], np.int64)
    attrs = dict(top_k=64, scan_min=256, exact_below=1024, probe_rows=0, compensate=1)
    with run_stats() as stats:
        y = run(q, k, v, key_lengths=lengths, is_causal=1, **attrs)
    assert stats.knn_calls == 1 and stats.exact_calls == 1
    reference_y = dense(q, k, v, key_lengths=lengths, is_causal=True)
    np.testing.assert_allclose(y[1], reference_y[1], atol=2e-5)  # the exact element
    assert ko.relative_error(y[0], reference_y[0]) < 0.2  # the kNN element: approximate, not garbage


@pytest.mark.parametrize("lengths, message", [
    (np.array([-1], np.int64), r"key_lengths\[0\] = -1 is outside \[0, 16\]"),
    (np.array([17], np.int32), r"key_lengths\[0\] = 17 is outside \[0, 16\]"),
    (np.array([3, 3], np.int64), r"key_lengths must have shape \[1\]"),
    (np.array([[3]], np.int64), r"key_lengths must have shape \[1\]"),
])
def test_bad_key_lengths_are_clear_errors(lengths, message):
    q, k, v = qkv(14, sq=4, sk=16)
    with pytest.raises(Exception, match=message):
        run(q, k, v, key_lengths=lengths)


def test_key_lengths_of_another_type_are_refused():
    q, k, v = qkv(15, sq=4, sk=16)
    names = ["Q", "K", "V", "", "L"]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("Q", "K", "V", "L")]
    node = helper.make_node(contract.OP_TYPE, names, ["Y"], domain=contract.DOMAIN)
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(contract.DOMAIN, 1)])
    with pytest.raises(Exception, match="key_lengths must be int32 or int64"):
        ko.session(m.SerializeToString()).run(None, {"Q": q, "K": k, "V": v, "L": np.array([4.0], np.float32)})


# --- empty rows -------------------------------------------------------------------

def test_empty_rows_zero_is_onnx_attentions_fully_masked_row():
    q, k, v = qkv(16, sq=10, sk=12)
    mask = np.ones((1, 1, 10, 12), bool)
    mask[..., 3, :] = False
    for mode in ("mean", "zero"):
        y = run(q, k, v, mask, empty_rows=mode)
        np.testing.assert_allclose(y, dense(q, k, v, mask, empty_rows=mode), atol=2e-5)
    assert np.all(run(q, k, v, mask, empty_rows="zero")[:, :, 3] == 0)
    op_attention = pytest.importorskip("onnx.reference.ops.op_attention")
    qm, km, vm = qkv(16, hq=2, hkv=2, sq=10, sk=12)
    expected = op_attention._compute_attention(qm, km, vm, attn_mask=mask[0, 0], scale=0.25)[0]
    np.testing.assert_allclose(run(qm, km, vm, mask, empty_rows="zero", scale=0.25), expected, atol=2e-5)


def test_empty_rows_zero_in_knn_mode():
    q, k, v = ko.clustered_qkv(np.random.default_rng(17), 1, 4, 2, 1024, 32)
    mask = np.ones((1, 1, 1, 1024), bool)
    mask[..., :100] = False  # left padding: causal rows before key 100 see nothing
    knn = dict(top_k=32, scan_min=64, exact_below=0, probe_rows=0, is_causal=1)
    with run_stats() as stats:
        y = run(q, k, v, mask, empty_rows="zero", **knn)
    assert stats.knn_calls == 1
    assert np.all(y[:, :, :100] == 0)
    mean_y = run(q, k, v, mask, **knn)
    np.testing.assert_allclose(mean_y[:, :, :100], np.broadcast_to(v.mean(2, keepdims=True).repeat(2, 1), (1, 4, 100, 32)),
                               atol=1e-5)
    np.testing.assert_array_equal(y[:, :, 100:], mean_y[:, :, 100:])


# --- large finite values ------------------------------------------------------------

@pytest.mark.parametrize("keys", [64, 300, 5000])
def test_values_near_the_float_limit_stay_finite_in_exact_mode(keys):
    q, k, v = qkv(18, sq=8, sk=keys)
    v = np.full_like(v, 1e37)
    v[..., 1] = -3e38
    y = run(q, k, v, is_causal=1)
    expected = dense(q, k, v, is_causal=True)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, expected, rtol=1e-5)


def test_scores_beyond_the_float_limit_stay_finite_in_exact_mode():
    q, k, v = qkv(19, sq=6, sk=50)
    q = q * np.float32(1e19)
    k = k * np.float32(1e19)  # q.k ~ 1e39: inf in float32, finite in float64
    y = run(q, k, v)
    expected = dense(q, k, v)
    assert np.isfinite(expected).all() and np.isfinite(y).all()
    np.testing.assert_allclose(y, expected, atol=1e-5)


def test_nan_still_propagates_as_in_dense_attention():
    q, k, v = qkv(20, sq=6, sk=50)
    v[0, 0, 7, 2] = np.nan
    y = run(q, k, v)
    assert np.isnan(y[0, :2, :, 2]).all() and np.isfinite(y[0, 2:]).all()


def test_huge_values_route_a_knn_call_to_exact():
    q, k, v = ko.clustered_qkv(np.random.default_rng(21), 1, 4, 2, 1024, 32)
    v = np.where(v > 0, 3e38, -3e38).astype(np.float32)
    knn = dict(top_k=32, scan_min=64, exact_below=0, probe_rows=0)
    with run_stats() as stats:
        y = run(q, k, v, **knn)
    assert stats.exact_calls == 1 and stats.knn_calls == 0
    expected = dense(q, k, v)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e33)


# --- attribute budgets --------------------------------------------------------------

KNN_CALL = dict(top_k=32, scan_min=64, exact_below=0, probe_rows=0)


@pytest.mark.parametrize("attrs, knn", [
    (dict(), True),
    (dict(clusters=16), True),
    (dict(clusters=200), False),  # every query scores 200 centroids of 1024 keys
    (dict(scan_fraction=0.1), True),
    (dict(scan_fraction=0.5), False),
    (dict(scan_min=512), False),
    (dict(sinks=1000, is_causal=1, window=24), False),  # every key attended exactly
    (dict(softcap=30.0), False),
    (dict(index="dci", top_k=200), False),
])
def test_budgets_no_cheaper_than_exact_route_to_exact(attrs, knn):
    q, k, v = ko.clustered_qkv(np.random.default_rng(22), 1, 4, 2, 1024, 32)
    with run_stats() as stats:
        run(q, k, v, **{**KNN_CALL, **attrs})
    assert (stats.knn_calls, stats.exact_calls) == ((1, 0) if knn else (0, 1))
    mirror = contract.Attributes(**{**KNN_CALL, **attrs})
    assert mirror.uses_knn(1024, 1024 * 2) == knn


@pytest.mark.parametrize("attrs, name", [
    (dict(clusters=contract.MAX_CLUSTERS + 1), "clusters"),
    (dict(softcap=-1.0), "softcap"),
    (dict(softcap=float("inf")), "softcap"),
    (dict(sliding_window=-1), "sliding_window"),
    (dict(empty_rows="none"), "empty_rows"),
    (dict(softcap=2), "softcap"),  # an int where a float belongs
    (dict(sliding_window=4.0), "sliding_window"),
])
def test_bad_new_attributes_are_refused_at_session_creation(attrs, name):
    with pytest.raises(Exception, match=re.escape(f"'{name}'")):
        ko.session(model(**attrs))


# --- resources -----------------------------------------------------------------

def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
@pytest.mark.skipif("ASAN_OPTIONS" in os.environ, reason="AddressSanitizer's quarantine keeps freed memory resident")
def test_per_thread_scratch_is_released_after_a_huge_head():
    q, k, v = qkv(23, hq=1, hkv=1, sq=64, sk=16, d=1 << 18, dv=4)  # 64 queries x 262144 dims = 64 MiB of scratch
    session = ko.session(model())
    session.run(None, {"Q": q, "K": k, "V": v})
    before = resident_bytes()
    session.run(None, {"Q": q, "K": k, "V": v})
    assert resident_bytes() - before < 16 << 20
    del session
    import gc
    gc.collect()
    after = resident_bytes()
    assert after - before < 16 << 20, (after - before) / 2**20


def test_registering_the_library_many_times_works():
    q, k, v = qkv(24, sq=5, sk=9)
    expected = dense(q, k, v)
    for _ in range(200):
        options = ko.session_options()
        session = ort.InferenceSession(model(), options, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"Q": q, "K": k, "V": v})[0], expected, atol=2e-5)


# --- the numpy reference implements the same contract ------------------------------

@pytest.mark.parametrize("attrs", [
    dict(softcap=1.5),
    dict(is_causal=1, sliding_window=7),
    dict(sliding_window=3),
    dict(is_causal=1, empty_rows="zero"),
])
def test_numpy_reference_matches_the_oracle(attrs):
    q, k, v = qkv(25, b=2, sq=6, sk=30)
    lengths = np.array([30, 12], np.int64)
    mask = np.ones((2, 1, 1, 30), bool)
    mask[1, ..., :4] = False
    full = dict(scale=0.0, is_causal=False, softcap=0.0, sliding_window=0, empty_rows="mean")
    full.update({k_: (bool(v_) if k_ == "is_causal" else v_) for k_, v_ in attrs.items()})
    expected = dense(q, k, v, mask, key_lengths=lengths, **full)
    got = reference.attention(q, k, v, mask, contract.Attributes(**attrs), key_lengths=lengths)
    np.testing.assert_allclose(got, expected, atol=1e-10)
    np.testing.assert_allclose(run(q, k, v, mask, key_lengths=lengths, **attrs), expected, atol=2e-5)


@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
@pytest.mark.parametrize("lengths_dtype", [None, np.int32, np.int64])
def test_converted_models_run_on_the_reference_with_every_input_combination(mask_kind, lengths_dtype):
    pytest.importorskip("onnxruntime_extensions")
    import onnx

    q, k, v = qkv(26, b=2, sq=5, sk=24)
    mask = None
    if mask_kind is not None:
        mask = np.ones((2, 1, 1, 24), bool)
        mask[0, ..., :3] = False
        if mask_kind == "float":
            mask = np.where(mask, 0.0, -np.inf).astype(np.float32)
    lengths = None if lengths_dtype is None else np.array([24, 10], lengths_dtype)
    attrs = dict(is_causal=1, sliding_window=6, softcap=4.0)
    mask_type = None if mask is None else (TensorProto.BOOL if mask.dtype == np.bool_ else TensorProto.FLOAT)
    lengths_type = None if lengths is None else (TensorProto.INT32 if lengths.dtype == np.int32 else TensorProto.INT64)
    graph_model = onnx.load_from_string(model(mask_type, lengths_type, **attrs))
    feeds = {"Q": q, "K": k, "V": v}
    if mask is not None:
        feeds["M"] = mask
    if lengths is not None:
        feeds["L"] = lengths
    y = reference.inference_session(graph_model).run(None, feeds)[0]
    np.testing.assert_allclose(y, dense(q, k, v, mask, key_lengths=lengths, **{**attrs, "is_causal": True}), atol=1e-5)
