"""Every bad input of IceKNNAttention is an ONNX Runtime error naming the problem,
never a crash."""

import numpy as np
import pytest
from onnx import TensorProto, helper

import kernel_oracle as ko


def inputs(b=1, hq=4, hkv=2, sq=8, sk=12, d=16, dv=8):
    return ko.random_qkv(np.random.default_rng(0), b, hq, hkv, sq, sk, d, dv)


def run_with(q, k, v, mask=None, **attrs):
    return ko.run(q, k, v, mask, **attrs)


def expect_error(fragment, fn, *args, **kwargs):
    with pytest.raises(Exception) as info:
        fn(*args, **kwargs)
    assert fragment.lower() in str(info.value).lower(), str(info.value)


@pytest.mark.parametrize("which,shape", [("Q", (4, 8, 16)), ("K", (1, 2, 12, 16, 1)), ("V", (2, 12, 8))])
def test_wrong_rank(which, shape):
    q, k, v = inputs()
    feeds = dict(Q=q, K=k, V=v)
    feeds[which] = np.zeros(shape, np.float32)
    expect_error("rank 4", run_with, feeds["Q"], feeds["K"], feeds["V"])


@pytest.mark.parametrize("change,fragment", [
    (dict(k=(2, 2, 12, 16)), "batch"),
    (dict(k=(1, 2, 12, 8)), "head sizes"),
    (dict(v=(1, 2, 11, 8)), "sequence lengths"),
    (dict(v=(1, 1, 12, 8)), "head counts"),
    (dict(k=(1, 3, 12, 16), v=(1, 3, 12, 8)), "multiple"),
])
def test_mismatched_shapes(change, fragment):
    q, k, v = inputs()
    rng = np.random.default_rng(1)
    k = rng.standard_normal(change.get("k", k.shape)).astype(np.float32)
    v = rng.standard_normal(change.get("v", v.shape)).astype(np.float32)
    expect_error(fragment, run_with, q, k, v)


def test_zero_kv_heads():
    q, k, v = inputs()
    expect_error("multiple", run_with, q, k[:, :0], v[:, :0])


@pytest.mark.parametrize("mask_shape", [(12, 1, 1, 1, 12), (3, 1, 1, 12), (1, 4, 7, 12), (11,)])
def test_mask_that_does_not_broadcast(mask_shape):
    q, k, v = inputs()
    fragment = "rank" if len(mask_shape) > 4 else "broadcast"
    expect_error(fragment, run_with, q, k, v, np.ones(mask_shape, bool))


def test_mask_of_another_type():
    q, k, v = inputs()
    model = ko.attention_model(TensorProto.INT32)
    expect_error("bool or float", lambda: ko.session(model).run(None, {"Q": q, "K": k, "V": v,
                                                                       "M": np.ones((1, 12), np.int32)}))


def test_double_inputs_are_rejected():
    node = helper.make_node(ko.OP_TYPE, ["Q", "K", "V"], ["Y"], domain=ko.DOMAIN)
    io = [helper.make_tensor_value_info(n, TensorProto.DOUBLE, None) for n in "QKV"]
    graph = helper.make_graph([node], "g", io, [helper.make_tensor_value_info("Y", TensorProto.DOUBLE, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ko.DOMAIN, 1)])
    q, k, v = (x.astype(np.float64) for x in inputs())
    expect_error("type", lambda: ko.session(model.SerializeToString()).run(None, {"Q": q, "K": k, "V": v}))


@pytest.mark.parametrize("attrs,fragment", [
    (dict(top_k=0), "top_k"),
    (dict(top_k=-3), "top_k"),
    (dict(exact_below=-1), "exact_below"),
    (dict(index="faiss"), "index"),
    (dict(scan_fraction=1.5), "scan_fraction"),
    (dict(clusters=-1), "clusters"),
    (dict(kmeans_iters=1000), "kmeans_iters"),
    (dict(tail_clusters=-2), "tail_clusters"),
    (dict(tail_clusters=1025), "tail_clusters"),
    (dict(scale=float("nan")), "scale"),
    (dict(sinks=-1), "sinks"),
    (dict(window=-4), "window"),
    (dict(probe_rows=-1), "probe_rows"),
    (dict(probe_rows=100000), "probe_rows"),
    (dict(max_error=-0.1), "max_error"),
    (dict(max_error=float("inf")), "max_error"),
])
def test_bad_attributes(attrs, fragment):
    q, k, v = inputs()
    expect_error(fragment, run_with, q, k, v, **attrs)


@pytest.mark.parametrize("attrs,fragment", [
    (dict(is_causal=1.0), "'is_causal' must be an int"),
    (dict(scale=1), "'scale' must be a float"),
    (dict(top_k=0.0), "'top_k' must be an int"),
    (dict(index=7), "'index' must be a string"),
    (dict(max_error=1), "'max_error' must be a float"),
])
def test_wrongly_typed_attributes_are_refused_not_defaulted(attrs, fragment):
    q, k, v = inputs()
    expect_error(fragment, run_with, q, k, v, **attrs)


def test_empty_sequences_do_not_crash():
    q, k, v = inputs(sq=0)
    assert run_with(q, k, v).shape == (1, 4, 0, 8)
    q, k, v = inputs(sk=0)
    y = run_with(q, k, v)
    assert y.shape == (1, 4, 8, 8) and np.isfinite(y).all()
