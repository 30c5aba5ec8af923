"""Helpers for the kernel tests: a numpy float64 dense-attention oracle, one-node
IceKNNAttention models, and data with realistic structure (clustered keys, peaked
queries)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

import ice_onnx

DOMAIN = "ai.iceformer"
OP_TYPE = "IceKNNAttention"


# --- the oracle ------------------------------------------------------------------

def _scores(q, k, scale, mask, is_causal):
    """Scaled scores [B, Hq, Sq, Sk] in float64 with the mask and causality applied
    (-inf where blocked), plus the matching 'allowed' flags."""
    q = np.asarray(q, np.float64)
    k = np.asarray(k, np.float64)
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    scale = scale if scale and scale > 0 else 1.0 / np.sqrt(d)
    k = np.repeat(k, hq // hkv, axis=1)
    s = scale * np.einsum("bhid,bhjd->bhij", q, k)
    allowed = np.ones((b, hq, sq, sk), bool)
    if mask is not None:
        if mask.dtype == np.bool_:
            allowed &= np.broadcast_to(mask, allowed.shape)
        else:
            s = s + np.broadcast_to(mask.astype(np.float64), s.shape)
            allowed &= np.broadcast_to(mask != -np.inf, allowed.shape)
    if is_causal:
        i = np.arange(sq)[:, None]
        j = np.arange(sk)[None, :]
        allowed &= j <= i + sk - sq
    return np.where(allowed, s, -np.inf), allowed


def dense_attention(q, k, v, mask=None, scale=0.0, is_causal=False):
    """softmax(scale * Q K^T + mask) V in float64; rows with no allowed key output
    the mean of V (the contract)."""
    s, allowed = _scores(q, k, scale, mask, is_causal)
    hq, hkv = q.shape[1], k.shape[1]
    v = np.repeat(np.asarray(v, np.float64), hq // hkv, axis=1)
    any_allowed = allowed.any(-1, keepdims=True)
    top = np.where(any_allowed, s.max(-1, keepdims=True), 0.0)
    w = np.where(allowed, np.exp(s - top), 0.0)
    w = np.where(any_allowed, w / np.where(any_allowed, w.sum(-1, keepdims=True), 1.0), 1.0 / s.shape[-1])
    return np.einsum("bhij,bhjd->bhid", w, v)


def exact_top_k(q, k, top_k, mask=None, is_causal=False):
    """Indices [B, Hq, Sq, top_k] of the keys with the largest q.k among the allowed
    ones (by scaled score, which ranks like q.k)."""
    s, _ = _scores(q, k, 1.0, mask, is_causal)
    return np.argsort(-s, axis=-1, kind="stable")[..., :top_k]


def recall_of_top_k(q, k, y_knn_ids_unused=None, *, top_k, retrieved):
    """Share of the exact top-k found in `retrieved` (same shape of index lists)."""
    exact = exact_top_k(q, k, top_k)
    hits = sum(len(set(a) & set(b)) for a, b in zip(exact.reshape(-1, top_k), retrieved.reshape(-1, top_k)))
    return hits / exact.size


def relative_error(y, reference):
    """||y - ref|| / ||ref|| over the whole output."""
    return float(np.linalg.norm(np.asarray(y, np.float64) - reference) / np.linalg.norm(reference))


# --- models and sessions ---------------------------------------------------------

def attention_model(mask_type=None, mask_input_name="M", **attributes) -> bytes:
    """A model with a single IceKNNAttention node: inputs Q, K, V (and the mask when
    mask_type is TensorProto.BOOL / FLOAT, or an empty 4th input name when
    mask_type is None and mask_input_name == '')."""
    names = ["Q", "K", "V"]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names]
    if mask_type is not None:
        names.append(mask_input_name)
        inputs.append(helper.make_tensor_value_info(mask_input_name, mask_type, None))
    elif mask_input_name == "":
        names.append("")
    node = helper.make_node(OP_TYPE, names, ["Y"], domain=DOMAIN, **attributes)
    graph = helper.make_graph([node], "attention", inputs,
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    return model.SerializeToString()


def session_options(threads: int = 1) -> ort.SessionOptions:
    """Options with the op library registered: the installed one, or the build named by
    the environment variable ICE_ONNX_KERNEL_LIBRARY (to test or time a build in place)."""
    return ice_onnx.session_options(intra_op_num_threads=threads)


def session(model: bytes, threads: int = 1) -> ort.InferenceSession:
    return ort.InferenceSession(model, session_options(threads), providers=["CPUExecutionProvider"])


def run(q, k, v, mask=None, threads=1, **attributes):
    """Runs the op once on numpy inputs; returns Y."""
    mask_type = None
    feeds = {"Q": q, "K": k, "V": v}
    if mask is not None:
        mask_type = TensorProto.BOOL if mask.dtype == np.bool_ else TensorProto.FLOAT
        feeds["M"] = mask
    return session(attention_model(mask_type, **attributes), threads).run(None, feeds)[0]


def run_counted(q, k, v, mask=None, threads=1, **attributes):
    """Runs the op once; returns Y and the kernel's run statistics of that call (which
    path it took, per head, and how many keys its index scored)."""
    from ice_onnx.custom_ops.run_stats import run_stats

    with run_stats(library_file()) as stats:
        y = run(q, k, v, mask, threads, **attributes)
    return y, stats.current()


def library_file() -> str:
    """The op library these helpers register."""
    return ice_onnx.library_path()


def assert_knn_ran(stats, heads: int, scored_below: float = 0.5):
    """The call took the kNN path with `heads` (batch, query-head) pairs on it (none
    guarded to exact unless counted apart), and its index scored under `scored_below`
    of the keys the rows could see."""
    assert stats.knn_calls == 1 and stats.exact_calls == 0, stats
    assert stats.knn_heads == heads, stats
    assert stats.knn_rows > 0 and stats.scored_fraction < scored_below, stats


def assert_exact_ran(stats, heads: int):
    assert (stats.exact_calls, stats.knn_calls, stats.exact_heads) == (1, 0, heads), stats


# --- data ------------------------------------------------------------------------

def random_qkv(rng, b, hq, hkv, sq, sk, d, dv, scale=1.0):
    q = (rng.standard_normal((b, hq, sq, d)) * scale).astype(np.float32)
    k = (rng.standard_normal((b, hkv, sk, d)) * scale).astype(np.float32)
    v = rng.standard_normal((b, hkv, sk, dv)).astype(np.float32)
    return q, k, v


def clustered_qkv(rng, b, hq, hkv, s, d, dv=None, clusters=64, spread=1.0, peak=12.0):
    """Keys around `clusters` random unit directions (within-cluster spread `spread`);
    each query aims at one random key (plus a little noise), so its nearest keys are
    that key's cluster mates. With the op's default scale 1/sqrt(d), `peak` is the
    softmax temperature: 12 puts ~99 % of the mass in the top 32 keys, 2 is diffuse."""
    dv = dv or d
    centres = rng.standard_normal((b, hkv, clusters, d))
    centres /= np.linalg.norm(centres, axis=-1, keepdims=True)
    pick = rng.integers(0, clusters, (b, hkv, s))
    k = np.take_along_axis(centres, pick[..., None], axis=2) + spread * rng.standard_normal((b, hkv, s, d)) / np.sqrt(d)
    target = rng.integers(0, s, (b, hq, s))
    kq = np.repeat(k, hq // hkv, axis=1)
    q = np.take_along_axis(kq, target[..., None], axis=2) + 0.3 * rng.standard_normal((b, hq, s, d)) / np.sqrt(d)
    q *= peak * np.sqrt(d)
    v = rng.standard_normal((b, hkv, s, dv))
    return q.astype(np.float32), k.astype(np.float32), v.astype(np.float32)
