"""IceKNNAttention against ONNX Runtime's dense attention, in one run.

For each sequence length: our op in exact mode, our op in kNN mode, ORT's
com.microsoft.MultiHeadAttention and the plain MatMul/Softmax/MatMul graph, on
clustered keys with peaked queries (tests/kernel_oracle.py). Prints the time of
each, the speed-up of kNN mode over the fastest dense ORT kernel, the recall of
the exact top-k and the relative output error of kNN mode against exact mode.

    python benchmarks/bench_kernel.py --sizes 1024,4096 --threads 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import kernel_oracle as ko  # noqa: E402

import ice_onnx  # noqa: E402


def options(threads: int, custom: bool) -> ort.SessionOptions:
    so = ice_onnx.session_options() if custom else ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return so


def mha_model(heads: int) -> bytes:
    """com.microsoft.MultiHeadAttention on [B, S, H*D] inputs."""
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("q", "k", "v")]
    node = helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["y"], domain="com.microsoft", num_heads=heads)
    graph = helper.make_graph([node], "mha", io, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("com.microsoft", 1)]).SerializeToString()


def plain_model(dim: int, causal_mask: bool) -> bytes:
    """MatMul(Q, K^T) * scale (+ mask) -> Softmax -> MatMul V on [B, H, S, D]."""
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("q", "k", "v")]
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [], [1.0 / np.sqrt(dim)])
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["q", "kt"], ["s"]),
             helper.make_node("Mul", ["s", "scale"], ["ss"])]
    inits = [scale]
    last = "ss"
    if causal_mask:
        io.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, None))
        nodes.append(helper.make_node("Add", ["ss", "mask"], ["sm"]))
        last = "sm"
    nodes += [helper.make_node("Softmax", [last], ["p"], axis=-1), helper.make_node("MatMul", ["p", "v"], ["y"])]
    graph = helper.make_graph(nodes, "plain", io, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def best_time(sess: ort.InferenceSession, feeds: dict, repeat: int) -> tuple[float, np.ndarray]:
    out = sess.run(None, feeds)[0]  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = sess.run(None, feeds)[0]
        times.append(time.perf_counter() - t)
    return min(times), out


def knn_recall(q, k, top_k: int, attrs: dict, threads: int, queries: int) -> float:
    """Recall of the exact top-k on the first head: one-hot values and a tiny scale
    turn the output into the retrieved set (the index ranks by q.k, whatever the scale)."""
    s = k.shape[2]
    q1, k1 = q[:, :1, :queries], k[:, :1]
    eye = np.eye(s, dtype=np.float32)[None, None]
    retrieved_attrs = dict(attrs, compensate=0, scale=1e-6)
    w = ko.run(q1, k1, eye, threads=threads, **retrieved_attrs)
    retrieved = np.argsort(-w, axis=-1)[..., :top_k]
    exact = ko.exact_top_k(q1, k1, top_k, is_causal=bool(attrs.get("is_causal")))
    hits = sum(len(set(a) & set(b)) for a, b in zip(exact.reshape(-1, top_k), retrieved.reshape(-1, top_k)))
    return hits / exact.size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1024,2048,4096,8192,16384")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--peak", type=float, default=12.0, help="softmax temperature of the data (12 = peaked)")
    ap.add_argument("--plain-max", type=int, default=8192, help="skip the plain graph above (S x S memory)")
    ap.add_argument("--compensate", type=int, default=1)
    ap.add_argument("--attr", action="append", default=[], help="extra kNN attribute name=value")
    args = ap.parse_args()

    h, d, causal = args.heads, args.dim, int(args.causal)
    extra = {}
    for item in args.attr:
        name, value = item.split("=")
        extra[name] = float(value) if "." in value else int(value)
    knn_attrs = dict(top_k=args.top_k, exact_below=0, is_causal=causal, compensate=args.compensate, **extra)
    exact_attrs = dict(exact_below=2147483647, is_causal=causal)
    print(f"B=1 H={h} D={d} top_k={args.top_k} threads={args.threads} causal={causal} peak={args.peak} {extra}")
    print(f"{'S':>6} {'exact':>8} {'knn':>8} {'mha':>8} {'plain':>8} | {'knn/best':>8} {'exact/best':>10} "
          f"{'recall':>6} {'relerr':>7}")
    rng = np.random.default_rng(0)
    for s in (int(x) for x in args.sizes.split(",")):
        q, k, v = ko.clustered_qkv(rng, 1, h, h, s, d, peak=args.peak)
        feeds = {"Q": q, "K": k, "V": v}
        ours = lambda attrs: ort.InferenceSession(ko.attention_model(**attrs), options(args.threads, True))  # noqa: E731
        t_exact, y_exact = best_time(ours(exact_attrs), feeds, args.repeat)
        t_knn, y_knn = best_time(ours(knn_attrs), feeds, args.repeat)
        dense = {}
        if not causal:  # MHA's causal form needs a mask input of its own; compare non-causal only
            to3d = lambda x: x.transpose(0, 2, 1, 3).reshape(1, s, h * d)  # noqa: E731
            mha = ort.InferenceSession(mha_model(h), options(args.threads, False))
            dense["mha"], _ = best_time(mha, {"q": to3d(q), "k": to3d(k), "v": to3d(v)}, args.repeat)
        if s <= args.plain_max:
            plain_feeds = {"q": q, "k": k, "v": v}
            if causal:
                plain_feeds["mask"] = np.triu(np.full((s, s), -np.inf, np.float32), 1)
            plain = ort.InferenceSession(plain_model(d, causal), options(args.threads, False))
            dense["plain"], _ = best_time(plain, plain_feeds, args.repeat)
        best = min(dense.values()) if dense else float("nan")
        recall = knn_recall(q, k, args.top_k, knn_attrs, args.threads, queries=min(s, 1024))
        err = ko.relative_error(y_knn, y_exact.astype(np.float64))
        fmt = lambda t: f"{t * 1e3:8.1f}" if t is not None else f"{'-':>8}"  # noqa: E731
        print(f"{s:>6} {fmt(t_exact)} {fmt(t_knn)} {fmt(dense.get('mha'))} {fmt(dense.get('plain'))} | "
              f"{best / t_knn:8.2f} {best / t_exact:10.2f} {recall:6.3f} {err:7.4f}", flush=True)


if __name__ == "__main__":
    main()
