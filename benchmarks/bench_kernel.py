"""IceKNNAttention against ONNX Runtime's dense attention kernels, in one run.

For each (sequence length, head size, thread count, causal or not) it times our op
in exact mode and in kNN mode against ORT's dense kernels on the same data:
com.microsoft.MultiHeadAttention (`unidirectional=1` when causal), the ONNX
`Attention` op (opset 23, `is_causal`) and the plain MatMul/Softmax/MatMul graph
(with an S x S mask when causal). The data are clustered keys with peaked queries
(tests/kernel_oracle.py). Implementations are timed round-robin (one run of each
in turn, best of `--repeat`), so load from other processes hits all of them alike.

Reported per row: milliseconds of each, the speed ratio of exact and kNN mode over
the fastest dense kernel (> 1 = we are faster), the recall of the exact top-k and
the relative output error of kNN mode against exact mode; `--json` and `--plot`
write the rows to a file and a PNG.

`--memory` measures peak resident memory instead: each of our op (kNN mode) and the
plain dense graph runs once at `--memory-size` keys in a fresh process.

    python benchmarks/bench_kernel.py --sizes 1024,4096 --threads 1,2 --dims 64,128
    python benchmarks/bench_kernel.py --causal 0,1 --json out.json --plot out.png
    python benchmarks/bench_kernel.py --memory --memory-size 32768
    ICE_ONNX_KERNEL_LIBRARY=build/.../libice_onnx_ops.so python benchmarks/bench_kernel.py  # a build in place
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from ice_onnx.custom_ops.loader import build_session_options

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import kernel_oracle as ko  # noqa: E402

ALWAYS_EXACT = 2147483647
DENSE = ("mha", "attention23", "plain")


# --- the dense competitors ---------------------------------------------------------

def _io(names):
    return [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names]


def _model(nodes, inputs, opsets, initializers=()) -> bytes:
    graph = helper.make_graph(nodes, "dense", _io(inputs), _io(["y"]), list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets]).SerializeToString()


def mha_model(heads: int, causal: bool) -> bytes:
    """com.microsoft.MultiHeadAttention on [B, S, H*D] inputs."""
    node = helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["y"], domain="com.microsoft",
                            num_heads=heads, unidirectional=int(causal))
    return _model([node], "qkv", [("", 17), ("com.microsoft", 1)])


def attention23_model(causal: bool) -> bytes:
    """The ONNX Attention op (opset 23) on [B, H, S, D] inputs."""
    node = helper.make_node("Attention", ["q", "k", "v"], ["y"], is_causal=int(causal))
    return _model([node], "qkv", [("", 23)])


def plain_model(dim: int, causal: bool) -> bytes:
    """MatMul(Q, K^T) * scale (+ S x S mask) -> Softmax -> MatMul V on [B, H, S, D]."""
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [], [1.0 / np.sqrt(dim)])
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["q", "kt"], ["s"]),
             helper.make_node("Mul", ["s", "scale"], ["ss"])]
    inputs, last = ["q", "k", "v"], "ss"
    if causal:
        inputs.append("mask")
        nodes.append(helper.make_node("Add", ["ss", "mask"], ["sm"]))
        last = "sm"
    nodes += [helper.make_node("Softmax", [last], ["p"], axis=-1), helper.make_node("MatMul", ["p", "v"], ["y"])]
    return _model(nodes, inputs, [("", 17)], [scale])


def dense_session(name: str, heads: int, dim: int, causal: bool, threads: int) -> ort.InferenceSession:
    model = {"mha": lambda: mha_model(heads, causal), "attention23": lambda: attention23_model(causal),
             "plain": lambda: plain_model(dim, causal)}[name]()
    so = build_session_options(intra_op_num_threads=threads, inter_op_num_threads=1)
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def dense_feeds(name: str, q, k, v, causal: bool) -> dict:
    if name == "mha":
        to3d = lambda x: np.ascontiguousarray(x.transpose(0, 2, 1, 3).reshape(x.shape[0], x.shape[2], -1))  # noqa: E731
        return {"q": to3d(q), "k": to3d(k), "v": to3d(v)}
    feeds = {"q": q, "k": k, "v": v}
    if name == "plain" and causal:
        s = q.shape[2]
        feeds["mask"] = np.triu(np.full((s, s), -np.inf, np.float32), 1)
    return feeds


def our_session(attrs: dict, threads: int) -> ort.InferenceSession:
    so = ko.session_options(threads)
    so.inter_op_num_threads = 1
    return ort.InferenceSession(ko.attention_model(**attrs), so, providers=["CPUExecutionProvider"])


# --- measuring ---------------------------------------------------------------------

def time_round_robin(runs: dict, repeat: int, budget: float = 1.5) -> tuple[dict, dict]:
    """runs: name -> (session, feeds). Best time of each over at least `repeat` rounds
    (more for fast cases, up to about `budget` seconds), one run of every
    implementation per round; plus each one's output."""
    start = time.perf_counter()
    outputs = {name: sess.run(None, feeds)[0] for name, (sess, feeds) in runs.items()}  # warm-up
    round_time = time.perf_counter() - start
    rounds = max(repeat, min(40, int(budget / max(round_time, 1e-6))))
    best = {name: float("inf") for name in runs}
    for _ in range(rounds):
        for name, (sess, feeds) in runs.items():
            t = time.perf_counter()
            sess.run(None, feeds)
            best[name] = min(best[name], time.perf_counter() - t)
    return best, outputs


def knn_recall(q, k, attrs: dict, threads: int, queries: int) -> float:
    """Recall of the exact top-k on the first head for `queries` query rows: one-hot
    values and a tiny scale turn the output into the retrieved set (the index ranks
    by q.k, whatever the scale). Causal: the last rows, which under the bottom-right
    alignment see exactly the keys they see in the full call."""
    top_k, causal = attrs["top_k"], bool(attrs.get("is_causal"))
    rows = slice(q.shape[2] - queries, None) if causal else slice(0, queries)
    q1, k1 = np.ascontiguousarray(q[:, :1, rows]), k[:, :1]
    eye = np.eye(k.shape[2], dtype=np.float32)[None, None]
    sess = our_session(dict(attrs, compensate=0, scale=1e-6), threads)
    w = sess.run(None, {"Q": q1, "K": k1, "V": eye})[0]
    retrieved = np.argsort(-w, axis=-1)[..., :top_k]
    exact = ko.exact_top_k(q1, k1, top_k, is_causal=causal)
    hits = sum(len(set(a) & set(b)) for a, b in zip(exact.reshape(-1, top_k), retrieved.reshape(-1, top_k)))
    return hits / exact.size


def measure(s: int, d: int, threads: int, causal: bool, args, rng) -> dict:
    h = args.heads
    q, k, v = ko.clustered_qkv(rng, 1, h, h, s, d, peak=args.peak)
    feeds = {"Q": q, "K": k, "V": v}
    knn_attrs = dict(top_k=args.top_k, exact_below=0, is_causal=int(causal), **args.extra)
    runs = {"exact": (our_session(dict(exact_below=ALWAYS_EXACT, is_causal=int(causal)), threads), feeds)}
    with_knn = s >= args.knn_min
    if with_knn:
        runs["knn"] = (our_session(knn_attrs, threads), feeds)
        if args.compensation_cost:
            runs["knn_pure"] = (our_session(dict(knn_attrs, compensate=0), threads), feeds)
    for name in DENSE:
        if name == "plain" and s > args.plain_max:
            continue
        runs[name] = (dense_session(name, h, d, causal, threads), dense_feeds(name, q, k, v, causal))
    times, outputs = time_round_robin(runs, args.repeat)
    best_dense = min(times[n] for n in DENSE if n in times)
    row = dict(s=s, d=d, heads=h, threads=threads, causal=int(causal), top_k=args.top_k,
               ms={n: round(t * 1e3, 3) for n, t in times.items()},
               best_dense=min((n for n in DENSE if n in times), key=times.get),
               exact_speedup=best_dense / times["exact"],
               exact_vs_mha=times["mha"] / times["exact"])
    if with_knn:
        y_exact = outputs["exact"].astype(np.float64)
        row.update(knn_speedup=best_dense / times["knn"],
                   recall=knn_recall(q, k, knn_attrs, threads, queries=min(s, 1024)),
                   rel_error=ko.relative_error(outputs["knn"], y_exact))
        if args.compensation_cost:
            row["compensation_cost"] = times["knn"] / times["knn_pure"] - 1.0
    return row


def print_row(row: dict) -> None:
    ms = row["ms"]
    cell = lambda name: f"{ms[name]:9.1f}" if name in ms else f"{'-':>9}"  # noqa: E731
    knn = (f"{row['knn_speedup']:7.2f} {row['recall']:6.3f} {row['rel_error']:7.4f}"
           if "knn_speedup" in row else f"{'-':>7} {'-':>6} {'-':>7}")
    extra = f" comp+{row['compensation_cost'] * 100:.0f}%" if "compensation_cost" in row else ""
    print(f"{row['s']:>6} {row['d']:>4} {row['threads']:>2} {row['causal']:>2} "
          f"{cell('exact')} {cell('knn')} {cell('mha')} {cell('attention23')} {cell('plain')} | "
          f"{row['exact_vs_mha']:7.2f} {row['exact_speedup']:7.2f} {knn}{extra}", flush=True)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["d"], r["threads"], r["causal"]) for r in rows})
    fig, ax = plt.subplots(figsize=(8, 5))
    for d, threads, causal in groups:
        sel = sorted((r for r in rows if (r["d"], r["threads"], r["causal"]) == (d, threads, causal)),
                     key=lambda r: r["s"])
        label = f"D={d}, {threads} thr{', causal' if causal else ''}"
        line, = ax.plot([r["s"] for r in sel], [r["exact_speedup"] for r in sel], "--", marker="o",
                        label=f"exact, {label}")
        knn = [r for r in sel if "knn_speedup" in r]
        if knn:
            ax.plot([r["s"] for r in knn], [r["knn_speedup"] for r in knn], "-", marker="s",
                    color=line.get_color(), label=f"kNN, {label}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("sequence length S")
    ax.set_ylabel("speed-up over the fastest ORT dense kernel")
    ax.set_title("IceKNNAttention vs ONNX Runtime dense attention")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# --- memory ------------------------------------------------------------------------

def _status_mib(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory_child(impl: str, s: int, args) -> None:
    """Runs one implementation once at S = s; prints the process's resident memory
    before the run (inputs, runtime) and its peak during the run (MiB)."""
    h, d = args.heads, args.dim_for_memory
    rng = np.random.default_rng(0)
    q, k, v = ko.clustered_qkv(rng, 1, h, h, s, d, peak=args.peak)
    if impl == "knn":
        sess = our_session(dict(top_k=args.top_k, exact_below=0, **args.extra), 1)
        feeds = {"Q": q, "K": k, "V": v}
    else:
        sess = dense_session(impl, h, d, False, 1)
        feeds = dense_feeds(impl, q, k, v, False)
    # The peak so far belongs to making the data: hand freed memory back to the system
    # (else the run reuses it unseen) and reset the peak (Linux: clear_refs 5).
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_mib("VmRSS")
    sess.run(None, feeds)
    print(json.dumps(dict(impl=impl, s=s, heads=h, dim=d, before_mib=round(before, 1),
                          peak_mib=round(_status_mib("VmHWM"), 1),
                          extra_mib=round(_status_mib("VmHWM") - before, 1))))


def measure_memory(args) -> list[dict]:
    rows = []
    for impl in ("knn", "plain"):
        cmd = [sys.executable, __file__, "--memory-child", impl, "--memory-size", str(args.memory_size),
               "--heads", str(args.heads), "--dims", str(args.dim_for_memory), "--top-k", str(args.top_k)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            row = dict(impl=impl, s=args.memory_size, error=done.stderr.strip().splitlines()[-1:])
        else:
            row = json.loads(done.stdout.strip().splitlines()[-1])
        print(row, flush=True)
        rows.append(row)
    return rows


# --- main --------------------------------------------------------------------------

def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="256,512,1024,2048,4096,8192,16384")
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--causal", default="0", help="0, 1 or 0,1")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--peak", type=float, default=12.0, help="softmax temperature of the data (12 = peaked)")
    ap.add_argument("--knn-min", type=int, default=1024, help="time kNN mode from this length")
    ap.add_argument("--plain-max", type=int, default=8192, help="skip the plain graph above (S x S memory)")
    ap.add_argument("--compensation-cost", action="store_true", help="also time kNN with compensate=0")
    ap.add_argument("--attr", action="append", default=[], help="extra kNN attribute name=value")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--plot", help="write a PNG of the speed-ups here")
    ap.add_argument("--memory", action="store_true", help="peak memory of kNN vs the plain graph instead")
    ap.add_argument("--memory-size", type=int, default=32768)
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.extra = {}
    for item in args.attr:
        name, value = item.split("=")
        args.extra[name] = float(value) if "." in value else int(value)
    args.dim_for_memory = ints(args.dims)[0]

    if args.memory_child:
        memory_child(args.memory_child, args.memory_size, args)
        return
    if args.memory:
        rows = measure_memory(args)
    else:
        print(f"B=1 H={args.heads} top_k={args.top_k} peak={args.peak} {args.extra}  "
              "(ratios: > 1 means ours is faster)")
        print(f"{'S':>6} {'D':>4} {'th':>2} {'c':>2} {'exact':>9} {'knn':>9} {'mha':>9} {'attn23':>9} {'plain':>9} | "
              f"{'ex/mha':>7} {'ex/best':>7} {'knn/bst':>7} {'recall':>6} {'relerr':>7}")
        rng = np.random.default_rng(0)
        rows = []
        for causal in ints(args.causal):
            for d in ints(args.dims):
                for threads in ints(args.threads):
                    for s in ints(args.sizes):
                        row = measure(s, d, threads, bool(causal), args, rng)
                        print_row(row)
                        rows.append(row)
        if args.plot:
            plot(rows, args.plot)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
