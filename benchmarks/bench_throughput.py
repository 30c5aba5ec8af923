"""Throughput under load: concurrent requests against one converted model vs the original.

    python benchmarks/bench_throughput.py --model smollm2 --tokens 2048 --requests 8 --concurrency 2
    python benchmarks/bench_throughput.py --model line-retrieval --tokens 8192

A request is one long document through the model (prompt processing: SmolLM2's prefill
scorer, logits at every position; or the line-retrieval Llama, next-token logits).
`--concurrency` client threads share one ONNX Runtime session per model (Run is
thread-safe; each call uses `--intra-threads` of the session's pool), every thread
taking the next request as soon as its last one is answered. The two models take turns,
`--rounds` times, on the same documents, so machine load hits both alike; the table
gives requests/s (median round) and p50 / p99 latency over every request of every round,
and their ratios converted / original, which are what to compare on a shared machine.

The converted model is written once under .cache/bench-throughput/ (with `--top-k`).
The kernel's run statistics of one converted request tell how much really ran kNN: a
block whose call takes the kNN route may still have heads that the accuracy guard sends
to exact attention. The JSON (benchmarks/results/throughput_<model>_<tokens>.json by
default) records that, the agreement of the two models' last-position answers, the
machine's load average and the library file. Timings never gate tests.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

import ice_onnx
from ice_onnx.custom_ops.run_stats import run_stats
from ice_onnx.rewriter import ConvertOptions, convert_file

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "bench-throughput"
RESULTS = REPO / "benchmarks" / "results"


def smollm2_documents(tokens: int, count: int) -> tuple[str, list[np.ndarray]]:
    """`count` windows of `tokens` tokens from SmolLM2's tuning texts, in turn."""
    sys.path.append(str(REPO))  # models/ is the checkout's recipes
    from models.smollm2 import build, texts

    tokenizer = build.load_tokenizer()
    names = texts.names("tune")
    per_text = -(-count // len(names))
    streams = {name: texts.token_ids(name, tokenizer, tokens * per_text) for name in names}
    documents = [streams[names[i % len(names)]][tokens * (i // len(names)):][:tokens] for i in range(count)]
    return str(build.paths().prefill), documents


def line_retrieval_documents(tokens: int, count: int) -> tuple[str, list[np.ndarray]]:
    from ice_onnx.models.line_retrieval.evaluate import ONNX_FILE, evaluation_prompts
    from ice_onnx.models.line_retrieval.task import Vocab

    return str(ONNX_FILE), [p.ids for p in evaluation_prompts(Vocab.load(), tokens, count)]


MODELS = {"smollm2": smollm2_documents, "line-retrieval": line_retrieval_documents}


def converted_model(original: str, top_k: int) -> str:
    CACHE.mkdir(parents=True, exist_ok=True)
    output = CACHE / f"{Path(original).stem}.k{top_k}.ice.onnx"
    if not output.exists() or output.stat().st_mtime < Path(original).stat().st_mtime:
        convert_file(original, output, ConvertOptions(top_k=top_k))
    return str(output)


def session(path: str, intra_threads: int, ice_ops: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_threads
    if ice_ops:
        options.register_custom_ops_library(ice_onnx.library_path())
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def answer(sess: ort.InferenceSession, ids: np.ndarray) -> np.ndarray:
    """One request: the document's logits; only the last position's are kept."""
    (logits,) = sess.run(["logits"], {"input_ids": ids[None]})
    return logits[0, -1].copy()


def load_round(request, documents: list[np.ndarray], concurrency: int):
    """All documents through `request` (a document -> its last logits) from `concurrency`
    client threads: (seconds, latencies, last logits)."""
    def timed(ids):
        begin = time.perf_counter()
        result = request(ids)
        return time.perf_counter() - begin, result

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        done = list(pool.map(timed, documents))
    return time.perf_counter() - start, [d[0] for d in done], [d[1] for d in done]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--requests", type=int, default=8, help="requests per round")
    parser.add_argument("--concurrency", type=int, default=2, help="client threads")
    parser.add_argument("--intra-threads", type=int, default=1, help="ONNX Runtime threads per request")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--top-k", type=int, default=256)
    parser.add_argument("--ray-replicas", type=int, default=0,
                        help="serve each model from this many Ray Serve replicas (one CPU, one session each) "
                             "instead of one in-process session")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()

    original_path, documents = MODELS[args.model](args.tokens, args.requests)
    converted_path = converted_model(original_path, args.top_k)
    with run_stats() as stats:
        answer(session(converted_path, args.intra_threads, ice_ops=True), documents[0])
    kernel = {name: getattr(stats, name) for name in ("knn_calls", "exact_calls", "knn_heads", "guarded_heads")}
    print(f"one converted request: {kernel}", flush=True)
    if args.ray_replicas:
        requests = ray_serve_requests(original_path, converted_path, args.ray_replicas, args.intra_threads)
    else:
        sessions = {"original": session(original_path, args.intra_threads, ice_ops=False),
                    "converted": session(converted_path, args.intra_threads, ice_ops=True)}
        requests = {name: functools.partial(answer, sess) for name, sess in sessions.items()}

    # A session's first runs allocate and plan: every session (every replica) runs once untimed.
    for request in requests.values():
        load_round(request, documents[:max(args.concurrency, args.ray_replicas)], args.concurrency)
    rounds = {name: [] for name in requests}
    latencies = {name: [] for name in requests}
    last = {}
    for round_index in range(args.rounds):
        order = list(requests) if round_index % 2 == 0 else list(reversed(requests))
        for name in order:
            seconds, latency, outputs = load_round(requests[name], documents, args.concurrency)
            rounds[name].append(seconds)
            latencies[name].extend(latency)
            last[name] = outputs
            print(f"round {round_index} {name}: {len(documents) / seconds:.3f} requests/s", flush=True)

    table = {}
    for name in requests:
        table[name] = {"requests_per_s": len(documents) / statistics.median(rounds[name]),
                       "p50_latency_s": percentile(latencies[name], 50),
                       "p99_latency_s": percentile(latencies[name], 99),
                       "round_seconds": rounds[name]}
    ratio = {"throughput": table["converted"]["requests_per_s"] / table["original"]["requests_per_s"],
             "p50_latency": table["converted"]["p50_latency_s"] / table["original"]["p50_latency_s"],
             "p99_latency": table["converted"]["p99_latency_s"] / table["original"]["p99_latency_s"]}
    agreement = float(np.mean([a.argmax() == b.argmax() for a, b in zip(last["converted"], last["original"])]))
    largest_difference = float(max(np.abs(a - b).max() for a, b in zip(last["converted"], last["original"])))
    result = {
        "model": args.model, "original": original_path, "converted": converted_path, "top_k": args.top_k,
        "tokens": int(len(documents[0])), "requests_per_round": len(documents), "rounds": args.rounds,
        "concurrency": args.concurrency, "intra_threads": args.intra_threads, "ray_replicas": args.ray_replicas,
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(), "library": ice_onnx.library_path(), "commit": _commit(),
        "machine": platform.platform(), "kernel_one_request": kernel, "table": table, "ratio": ratio,
        "last_position_agreement": agreement, "last_position_max_abs_difference": largest_difference,
    }
    engine = f"_ray{args.ray_replicas}" if args.ray_replicas else ""
    output = args.output or RESULTS / f"throughput_{args.model}_{args.tokens}{engine}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1) + "\n")
    for name, row in table.items():
        print(f"{name:9s} {row['requests_per_s']:.3f} req/s  p50 {row['p50_latency_s']:.2f} s  "
              f"p99 {row['p99_latency_s']:.2f} s")
    print(f"converted / original: throughput {ratio['throughput']:.2f}x, p50 latency {ratio['p50_latency']:.2f}x, "
          f"p99 latency {ratio['p99_latency']:.2f}x; last-position answers agree on {agreement:.0%}; -> {output}")


def ray_serve_requests(original: str, converted: str, replicas: int, intra_threads: int) -> dict:
    """Each model as a Ray Serve deployment of `replicas` replicas on a local cluster (one
    CPU each); a request goes through the deployment's handle and waits for its answer."""
    import ray
    from ray import serve

    # Both models' replicas stay up; only one model is under load at a time, so the
    # cluster may count each replica's CPU although the machine has half as many.
    ray.init(num_cpus=2 * replicas, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {name: value for name, value in os.environ.items()
                                       if name == "ICE_ONNX_KERNEL_LIBRARY"}})

    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": 1}, max_ongoing_requests=1)
    class Model:
        def __init__(self, path: str, ice_ops: bool):
            self.session = session(path, intra_threads, ice_ops)

        def score(self, ids: np.ndarray) -> np.ndarray:
            return answer(self.session, ids)

    handles = {"original": serve.run(Model.bind(original, False), name="original", route_prefix=None),
               "converted": serve.run(Model.bind(converted, True), name="converted", route_prefix=None)}
    return {name: (lambda ids, handle=handle: handle.score.remote(ids).result()) for name, handle in handles.items()}


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


if __name__ == "__main__":
    main()
