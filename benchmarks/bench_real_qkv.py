"""IceKNNAttention on a real LLM's attention inputs, against ONNX Runtime's dense kernels.

The inputs are SmolLM2-135M-Instruct's post-RoPE Q, K, V captured on real text by
benchmarks/capture_qkv.py (.cache/qkv/<text>_<S>/layer<L>_{q,k,v}.npy: causal, GQA 9/3,
D 64). For each capture and layer, in one run (round-robin timing, best of --repeat):

- `dense`: com.microsoft.GroupQueryAttention, ORT's fastest dense causal CPU kernel (the
  baseline for decoder prefill) — or with --noncausal, every query seeing every key (as
  an encoder does), com.microsoft.MultiHeadAttention, the kv heads repeated to the
  query heads — and `exact`: our op in exact mode;
- each kNN variant (`default`: the contract's defaults; more with --variant NAME:attr=v,...):
  speed-up over the dense baseline, relative output error against float64 dense attention on sampled
  rows, and with --mass (costly: the op runs once per chunk of one-hot values) the share
  of the softmax mass on the keys kNN attends exactly, and the recall of the exact top-32
  among them, per layer.

    python benchmarks/bench_real_qkv.py --capture .cache/qkv/python-docs_8192
    python benchmarks/bench_real_qkv.py --variant k512:top_k=512 --variant unguarded:probe_rows=0 \
        --json out.json --plot out.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_kernel import ALWAYS_EXACT, our_session, time_round_robin  # noqa: E402

TOP = 32  # recall is measured for this many exact top keys


def contrib_session(node, inputs: list, outputs: list, threads: int) -> ort.InferenceSession:
    """A session running one com.microsoft `node` (float inputs unless given as (name, type))."""
    io = lambda x: helper.make_tensor_value_info(*(x if isinstance(x, tuple) else (x, TensorProto.FLOAT)), None)  # noqa: E731
    graph = helper.make_graph([node], node.op_type, [io(x) for x in inputs], [io(x) for x in outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def gqa_session(q_heads: int, kv_heads: int, threads: int) -> ort.InferenceSession:
    node = helper.make_node("GroupQueryAttention", ["q", "k", "v", "", "", "seqlens_k", "total_seq"],
                            ["y", "present_k", "present_v"], domain="com.microsoft",
                            num_heads=q_heads, kv_num_heads=kv_heads)
    return contrib_session(node, ["q", "k", "v", ("seqlens_k", TensorProto.INT32), ("total_seq", TensorProto.INT32)],
                           ["y", "present_k", "present_v"], threads)


def mha_session(heads: int, threads: int) -> ort.InferenceSession:
    node = helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["y"], domain="com.microsoft", num_heads=heads)
    return contrib_session(node, ["q", "k", "v"], ["y"], threads)


def mha_feeds(q, k, v) -> dict:
    """MultiHeadAttention's [B, S, H*D] inputs, the kv heads repeated for the query heads."""
    s, group = q.shape[2], q.shape[1] // k.shape[1]
    packed = lambda x: np.ascontiguousarray(x.transpose(0, 2, 1, 3).reshape(1, s, -1))  # noqa: E731
    return {"q": packed(q), "k": packed(np.repeat(k, group, axis=1)), "v": packed(np.repeat(v, group, axis=1))}


def gqa_feeds(q, k, v) -> dict:
    s = q.shape[2]
    packed = lambda x: np.ascontiguousarray(x.transpose(0, 2, 1, 3).reshape(1, s, -1))  # noqa: E731
    return {"q": packed(q), "k": packed(k), "v": packed(v), "seqlens_k": np.array([s - 1], np.int32),
            "total_seq": np.array([s], np.int32)}


def dense_rows(q, k, v, rows, scale, causal: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """float64 attention (causal or not) for query rows `rows` of every head: outputs
    [H, rows, Dv] and the softmax probabilities [H, rows, S] (0 past the row if causal)."""
    heads, s = q.shape[1], k.shape[2]
    group = heads // k.shape[1]
    out = np.zeros((heads, len(rows), v.shape[3]))
    probs = np.zeros((heads, len(rows), s))
    for h in range(heads):
        keys, values = k[0, h // group].astype(np.float64), v[0, h // group].astype(np.float64)
        scores = scale * (q[0, h, rows].astype(np.float64) @ keys.T)
        if causal:
            scores[np.arange(s)[None, :] > np.asarray(rows)[:, None]] = -np.inf
        w = np.exp(scores - scores.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        probs[h], out[h] = w, w @ values
    return out, probs


def attended_sets(q, k, attrs: dict, threads: int, rows, chunk: int, causal: bool = True) -> np.ndarray:
    """Bool [H, rows, S]: the keys kNN mode attends exactly (sinks, window, scanned
    clusters), read from its weights on one-hot values, compensate=0 and no guard so
    that nothing else gets weight."""
    s, kv_heads = k.shape[2], k.shape[1]
    sess = our_session(dict(attrs, compensate=0, probe_rows=0, is_causal=int(causal)), threads)
    seen = np.zeros((q.shape[1], len(rows), s), bool)
    for first in range(0, s, chunk):
        width = min(chunk, s - first)
        onehot = np.zeros((1, kv_heads, s, width), np.float32)
        onehot[:, :, first:first + width] = np.eye(width, dtype=np.float32)
        y = sess.run(None, {"Q": q, "K": k, "V": onehot})[0]
        seen[:, :, first:first + width] = y[0][:, rows] > 0
    return seen


def measure(folder: Path, layer: int, variants: dict, args) -> dict:
    meta = json.loads((folder / "meta.json").read_text())
    q, k, v = (np.load(folder / f"layer{layer}_{x}.npy") for x in "qkv")
    s, scale = q.shape[2], float(meta["scale"])
    rng = np.random.default_rng(layer)
    rows = np.sort(rng.choice(np.arange(s // 8, s), min(args.rows, s - s // 8), replace=False))
    feeds = {"Q": q, "K": k, "V": v}
    causal = not args.noncausal
    dense = ((gqa_session(q.shape[1], k.shape[1], args.threads), gqa_feeds(q, k, v)) if causal
             else (mha_session(q.shape[1], args.threads), mha_feeds(q, k, v)))
    runs = {"dense": dense,
            "exact": (our_session(dict(is_causal=int(causal), exact_below=ALWAYS_EXACT), args.threads), feeds)}
    for name, attrs in variants.items():
        runs[name] = (our_session(dict(attrs, is_causal=int(causal)), args.threads), feeds)
    times, outputs = time_round_robin(runs, args.repeat)
    reference, probs = dense_rows(q, k, v, rows, scale, causal)
    row = dict(text=meta["text"], split=meta.get("split"), tokens=s, layer=layer, threads=args.threads,
               causal=causal, baseline="GroupQueryAttention" if causal else "MultiHeadAttention",
               ms={name: round(t * 1e3, 2) for name, t in times.items()},
               exact_vs_dense=times["dense"] / times["exact"], variants={})
    for name, attrs in variants.items():
        y = outputs[name][0][:, rows].astype(np.float64)
        entry = dict(attributes=attrs, speedup_vs_dense=times["dense"] / times[name],
                     rel_error=float(np.linalg.norm(y - reference) / np.linalg.norm(reference)))
        if args.mass:
            seen = attended_sets(q, k, attrs, args.threads, rows, args.chunk, causal)
            top = np.argsort(-probs, axis=-1)[..., :TOP]
            entry.update(mass=float((probs * seen).sum(-1).mean()),
                         recall_top32=float(np.take_along_axis(seen, top, -1).mean()),
                         keys_attended=float(seen.sum(-1).mean()))
        row["variants"][name] = entry
    return row


def print_row(row: dict) -> None:
    cells = " | ".join(f"{name} x{e['speedup_vs_dense']:.2f} err {e['rel_error']:.3f}"
                       + (f" mass {e['mass']:.3f} recall {e['recall_top32']:.3f} keys {e['keys_attended']:.0f}"
                          if "mass" in e else "")
                       for name, e in row["variants"].items())
    dense = "gqa" if row["causal"] else "mha"
    print(f"{row['text']:>12} {row['tokens']:>6} L{row['layer']:<2} {dense} {row['ms']['dense']:8.1f} ms  "
          f"exact x{row['exact_vs_dense']:.2f} | {cells}", flush=True)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, error) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name in rows[0]["variants"]:
        for tokens in sorted({r["tokens"] for r in rows}):
            sel = sorted((r for r in rows if r["tokens"] == tokens), key=lambda r: r["layer"])
            layers = [r["layer"] for r in sel]
            speed.plot(layers, [r["variants"][name]["speedup_vs_dense"] for r in sel], marker="o",
                       label=f"{name}, {tokens} tokens")
            error.plot(layers, [r["variants"][name]["rel_error"] for r in sel], marker="o",
                       label=f"{name}, {tokens} tokens")
    speed.axhline(1.0, color="grey", lw=0.8)
    speed.set(xlabel="layer", ylabel=f"speed-up over {rows[0]['baseline']}", title="time")
    error.axhline(0.05, color="grey", lw=0.8, ls="--")
    error.set(xlabel="layer", ylabel="relative output error", title="error vs float64 dense", yscale="log")
    speed.legend(fontsize=7)
    fig.suptitle(f"IceKNNAttention on SmolLM2's real Q/K/V ({'causal' if rows[0]['causal'] else 'non-causal'}, GQA 9/3)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, spec = text.partition(":")
    attrs = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        attrs[key] = float(value) if "." in value else int(value)
    return name, attrs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--capture", action="append", type=Path,
                    help="a capture folder (default: every one under .cache/qkv)")
    ap.add_argument("--layers", help="e.g. 0,3,10 (default: every layer captured)")
    ap.add_argument("--variant", action="append", default=[], help="NAME:attr=value,... (kNN attributes)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rows", type=int, default=256, help="query rows the error is measured on")
    ap.add_argument("--noncausal", action="store_true",
                    help="every query sees every key; baseline MultiHeadAttention instead of GroupQueryAttention")
    ap.add_argument("--mass", action="store_true", help="also the mass and top-32 recall of what kNN attends")
    ap.add_argument("--chunk", type=int, default=1024, help="one-hot value columns per run for --mass")
    ap.add_argument("--json")
    ap.add_argument("--plot")
    args = ap.parse_args()
    folders = args.capture or sorted(p.parent for p in (REPO / ".cache" / "qkv").glob("*/meta.json"))
    variants = dict([("default", {"exact_below": 0})] + [parse_variant(t) for t in args.variant])
    for attrs in variants.values():
        attrs.setdefault("exact_below", 0)
    rows = []
    for folder in folders:
        meta = json.loads((folder / "meta.json").read_text())
        layers = [int(x) for x in args.layers.split(",")] if args.layers else meta["layers"]
        for layer in layers:
            row = measure(folder, layer, variants, args)
            print_row(row)
            rows.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.plot and rows:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
