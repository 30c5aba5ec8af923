"""Our exact kernel against com.microsoft.MultiHeadAttention on non-causal attention.

A converted encoder below the kNN threshold runs our exact kernel where the original
ran ORT's MultiHeadAttention (MLAS flash attention without a mask, its dense GEMM
path with a key-padding mask), so this is the comparison a user of such a model sees.
Per (sequence length, head size, threads, mask) it times MHA on [B, S, H*D] inputs
against our op (exact mode) on the same data as [B, H, S, D], and optionally the
causal case too (MHA `unidirectional=1`; our `is_causal=1`).

Timing: CPU time of the process (`time.process_time`, so time stolen by other
processes on a shared machine does not count) of one run of every implementation in
turn, `--rounds` rounds; the medians are compared. Thread pools do not spin after a
run (their spin would be billed to the next session timed). Ratios > 1 mean our op is faster.
Several builds of our library can be timed in the same rounds (`--library
name=path`, repeatable) to compare a change against a saved baseline:

    python benchmarks/bench_noncausal.py --json out.json
    python benchmarks/bench_noncausal.py --library base=/tmp/base.so --library new=build/x/custom_ops/libice_onnx_ops.so \\
        --sizes 512,4096 --dims 64 --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import kernel_oracle as ko  # noqa: E402

ALWAYS_EXACT = 2147483647
# (batch, heads) per sequence length: enough work per call that fixed costs do not
# dominate, little enough that a full grid runs in minutes.
WORKLOAD = {128: (16, 12), 256: (8, 12), 512: (4, 12), 1024: (2, 12), 2048: (1, 8), 4096: (1, 4)}


def mha_model(heads: int, causal: bool, padding: bool) -> bytes:
    inputs = ["q", "k", "v"] + (["", "key_padding_mask"] if padding else [])
    node = helper.make_node("MultiHeadAttention", inputs, ["y"], domain="com.microsoft",
                            num_heads=heads, unidirectional=int(causal))
    graph_inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("q", "k", "v")]
    if padding:
        graph_inputs.append(helper.make_tensor_value_info("key_padding_mask", TensorProto.INT32, None))
    graph = helper.make_graph([node], "mha", graph_inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def session_options(threads: int, library: str | None) -> ort.SessionOptions:
    if library is None:  # the installed library, or ICE_ONNX_KERNEL_LIBRARY's
        so = ko.session_options(threads)
    else:
        so = ort.SessionOptions()
        so.register_custom_ops_library(library)
        so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    # CPU time counts every thread of the process: a pool left spinning after its run
    # would bill its spin to whichever session runs next.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def to_bsh(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 1, 3).reshape(x.shape[0], x.shape[2], -1))


def key_padding(rng, batch: int, s: int) -> np.ndarray:
    """1 = a real key: each batch element keeps a different prefix (at least half)."""
    lengths = rng.integers(s // 2, s + 1, size=batch)
    return (np.arange(s)[None, :] < lengths[:, None]).astype(np.int32)


def measure(s: int, d: int, threads: int, causal: bool, padded: bool, libraries: dict, rounds: int, rng) -> dict:
    batch, heads = WORKLOAD.get(s, (1, 4))
    q, k, v = (rng.standard_normal((batch, heads, s, d)).astype(np.float32) for _ in range(3))
    mha_feeds = {"q": to_bsh(q), "k": to_bsh(k), "v": to_bsh(v)}
    ours_feeds = {"Q": q, "K": k, "V": v}
    mask_type = None
    if padded:
        padding = key_padding(rng, batch, s)
        mha_feeds["key_padding_mask"] = padding
        ours_feeds["M"] = padding.astype(bool)[:, None, None, :]
        mask_type = TensorProto.BOOL
    mha = ort.InferenceSession(mha_model(heads, causal, padded), session_options(threads, None),
                               providers=["CPUExecutionProvider"])
    runs = {"mha": (mha, mha_feeds)}
    model = ko.attention_model(mask_type, exact_below=ALWAYS_EXACT, is_causal=int(causal))
    for name, path in libraries.items():
        runs[name] = (ort.InferenceSession(model, session_options(threads, path), providers=["CPUExecutionProvider"]),
                      ours_feeds)
    outputs = {name: sess.run(None, feeds)[0] for name, (sess, feeds) in runs.items()}  # warm-up
    cpu = {name: [] for name in runs}
    for _ in range(rounds):
        for name, (sess, feeds) in runs.items():
            start = time.process_time()
            sess.run(None, feeds)
            cpu[name].append(time.process_time() - start)
    median = {name: float(np.median(t)) for name, t in cpu.items()}
    reference = outputs["mha"].reshape(batch, s, heads, d).transpose(0, 2, 1, 3)
    return dict(s=s, d=d, batch=batch, heads=heads, threads=threads, causal=int(causal), key_padding=int(padded),
                rounds=rounds, cpu_ms={n: round(t * 1e3, 3) for n, t in median.items()},
                vs_mha={n: median["mha"] / median[n] for n in libraries},
                max_diff_vs_mha={n: float(np.abs(outputs[n] - reference).max()) for n in libraries})


def ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="128,512,2048,4096")
    ap.add_argument("--dims", default="32,64,128")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--masks", default="0,1", help="0 (none), 1 (key padding) or 0,1")
    ap.add_argument("--causal", default="0", help="0, 1 or 0,1")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--library", action="append", default=[], metavar="NAME=PATH",
                    help="a build of our library to time (repeatable; default: the installed one as 'ours')")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    libraries = dict(item.split("=", 1) for item in args.library) or {"ours": None}
    rng = np.random.default_rng(0)
    rows = []
    print(f"{'S':>5} {'D':>4} {'thr':>3} {'causal':>6} {'pad':>3} {'mha ms':>9} "
          + " ".join(f"{n + ' x':>10}" for n in libraries), flush=True)
    for causal in ints(args.causal):
        for padded in ints(args.masks):
            for threads in ints(args.threads):
                for d in ints(args.dims):
                    for s in ints(args.sizes):
                        row = measure(s, d, threads, bool(causal), bool(padded), libraries, args.rounds, rng)
                        rows.append(row)
                        print(f"{s:>5} {d:>4} {threads:>3} {causal:>6} {padded:>3} {row['cpu_ms']['mha']:>9.2f} "
                              + " ".join(f"{row['vs_mha'][n]:>10.3f}" for n in libraries), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
