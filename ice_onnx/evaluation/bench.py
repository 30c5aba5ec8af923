"""`ice-onnx bench`: end-to-end time and fidelity of a converted model against its original.

Both models run in ONNX Runtime with the same thread count on the same generated inputs.
Per sequence length: the median of `repeat` timed runs of each model, measured
interleaved (original, converted, converted, original, …) so that machine noise hits
both alike; output fidelity; and, optionally, per-layer statistics (see `layers`).
The result is a plain dict (the JSON file), rendered by `render_table`:

    schema               "ice-onnx/bench/1"
    original, converted  paths (converted null when converted on the fly)
    settings             seq_lens, batch, threads, repeat, top_k, exact_below, compensate
                         (null: as converted), backend, layer_stats, rows_per_head, seed, warmup
    attention_nodes      IceKNNAttention nodes in the converted model
    environment          onnxruntime, python, machine, processor
    results[]            per length: seq_len, batch, and either error (one line) or
      time_original_s, time_converted_s   medians (seconds); speedup = their ratio
      times_original_s, times_converted_s every timed run
      outputs{name}      max_abs_error, mean_abs_error, cosine, min_row_cosine,
                         top1_agreement (outputs named *logit*, else null)
      kernel, knn_head_share, guard_exact_share, keys_per_knn_row, scored_fraction
                         what the native kernel did over the converted runs (warm-up
                         included; runtime.kernel_paths); absent on the reference backend
      layers[]           per node (see `layers.layer_stats`): node, mode, top_k, num_keys,
                         compensate, mass_top_k, mass_retrieved, min_mass_retrieved, recall,
                         keys_retrieved, output_cosine, min_output_cosine,
                         output_max_abs_error, rows_sampled
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx

from ice_onnx.errors import first_line
from ice_onnx.evaluation import fidelity, layers
from ice_onnx.evaluation.inputs import input_feeds
from ice_onnx.evaluation.runtime import (attention_nodes, convert, environment, observed_kernel, open_session,
                                         refuse_unknown_model_attributes, resolve_backend, with_attributes)

SCHEMA = "ice-onnx/bench/1"


@dataclass
class BenchSettings:
    seq_lens: list[int]
    batch: int = 1
    threads: int = 2
    repeat: int = 5
    top_k: int | None = None  # None: the converter's default / the converted file's value
    exact_below: int | None = None
    compensate: int | None = None
    backend: str = "auto"
    layer_stats: bool = True
    rows_per_head: int = 64
    memory_pattern: bool = True  # ORT's planned activation buffers (off: a dense 16K model fits in 24 GiB)
    seed: int = 0
    warmup: int = 1
    overrides: dict = field(default_factory=dict, init=False)

    def __post_init__(self):
        self.overrides = {name: value for name, value in (("top_k", self.top_k), (
            "exact_below", self.exact_below), ("compensate", self.compensate)) if value is not None}


def run(original: Path, converted: Path | None, settings: BenchSettings, log=lambda message: None) -> dict:
    original_model = onnx.load(str(original))
    if converted is None:
        converted_model = convert(original, top_k=settings.top_k, exact_below=settings.exact_below,
                                  compensate=settings.compensate, log=log)
    else:
        converted_model = onnx.load(str(converted))
        refuse_unknown_model_attributes(converted_model)  # before the original's session and the timing
    if settings.overrides:
        converted_model = with_attributes(converted_model, **settings.overrides)
    if not attention_nodes(converted_model):
        raise ValueError("the converted model has no IceKNNAttention node")
    backend = resolve_backend(settings.backend)

    log(f"opening sessions ({settings.threads} thread(s), kernel: {backend}) ...")
    sessions = (open_session(original_model, settings.threads, memory_pattern=settings.memory_pattern),
                open_session(converted_model, settings.threads, backend, memory_pattern=settings.memory_pattern))
    results = []
    for seq_len in settings.seq_lens:
        log(f"seq_len {seq_len}: timing {settings.repeat} interleaved run(s) of each model ...")
        feeds = input_feeds(original_model, settings.batch, seq_len, seed=settings.seed)
        try:
            with observed_kernel(backend) as kernel:
                result = _measure(sessions, feeds, settings)
            result.update(kernel)
        except Exception as exc:  # e.g. a length past the model's position table
            log(f"seq_len {seq_len}: failed: {first_line(exc)}")
            results.append({"seq_len": seq_len, "batch": settings.batch, "error": first_line(exc)})
            continue
        if settings.layer_stats:
            log(f"seq_len {seq_len}: per-layer statistics ...")
            captures, _ = layers.capture(converted_model, feeds, settings.threads, backend)
            probe = layers.RetrievalProbe(settings.threads, backend)
            result["layers"] = [layers.layer_stats(c, probe, settings.rows_per_head, settings.seed)
                                for c in captures]
        results.append({"seq_len": seq_len, "batch": settings.batch, **result})

    return {
        "schema": SCHEMA,
        "original": str(original),
        "converted": str(converted) if converted else None,
        "converted_on_the_fly": converted is None,
        "settings": {**{k: v for k, v in asdict(settings).items() if k != "overrides"}, "backend": backend},
        "attention_nodes": len(attention_nodes(converted_model)),
        "environment": environment(),
        "results": results,
    }


def _measure(sessions, feeds, settings: BenchSettings) -> dict:
    original, converted = sessions
    for _ in range(settings.warmup):
        reference_outputs = original.run(None, feeds)
        converted_outputs = converted.run(None, feeds)
    times = ([], [])
    for repeat in range(settings.repeat):
        order = (0, 1) if repeat % 2 == 0 else (1, 0)
        for which in order:
            start = time.perf_counter()
            outputs = sessions[which].run(None, feeds)
            times[which].append(time.perf_counter() - start)
            if which == 0:
                reference_outputs = outputs
            else:
                converted_outputs = outputs
    converted_by_name = dict(zip([out.name for out in converted.get_outputs()], converted_outputs))
    compared = [(out.name, value, converted_by_name[out.name])
                for out, value in zip(original.get_outputs(), reference_outputs) if out.name in converted_by_name]
    median_original, median_converted = (statistics.median(t) for t in times)
    return {
        "time_original_s": median_original,
        "time_converted_s": median_converted,
        "speedup": median_original / median_converted,
        "times_original_s": times[0],
        "times_converted_s": times[1],
        "outputs": {name: fidelity.compare(ref, got, logits=fidelity.looks_like_logits(name))
                    for name, ref, got in compared},
    }


# ---- rendering --------------------------------------------------------------------------


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render_table(report: dict) -> str:
    """The human-readable summary: one row per length, then per-layer rows."""
    header = (f"{'seq_len':>7} {'orig ms':>9} {'conv ms':>9} {'speed-up':>8} {'max|err|':>9} "
              f"{'mean|err|':>9} {'cosine':>8} {'top-1':>6} {'mass':>6} {'recall':>6} {'kNN heads':>9}")
    lines = [header, "-" * len(header)]
    for row in report["results"]:
        if "error" in row:
            lines.append(f"{row['seq_len']:>7}  failed: {row['error']}")
            continue
        first = next(iter(row["outputs"].values()))
        layer_rows = row.get("layers") or []
        mass = _average(layer_rows, "mass_retrieved")
        recall = _average(layer_rows, "recall")
        lines.append(
            f"{row['seq_len']:>7} {row['time_original_s'] * 1e3:>9.1f} {row['time_converted_s'] * 1e3:>9.1f} "
            f"{row['speedup']:>7.2f}x {first['max_abs_error']:>9.2e} {first['mean_abs_error']:>9.2e} "
            f"{first['cosine']:>8.5f} {_fmt(first['top1_agreement'], '6.3f'):>6} "
            f"{_fmt(mass, '6.3f'):>6} {_fmt(recall, '6.3f'):>6} {_fmt(row.get('knn_head_share'), '9.0%'):>9}")
    for row in report["results"]:
        if row.get("layers"):
            lines += ["", f"per layer at seq_len {row['seq_len']} (keys used per query, softmax mass on them "
                      "and on the exact top-k, recall of the exact top-k; sampled query rows)",
                      f"  {'node':<28} {'mode':<5} {'top_k':>5} {'keys':>6} {'mass@top-k':>10} {'mass':>6} "
                      f"{'min mass':>8} {'recall':>6} {'out cos':>8} {'min cos':>8} {'max|err|':>9}"]
            for name, layer in zip(_short_names([layer["node"] for layer in row["layers"]]), row["layers"]):
                lines.append(
                    f"  {name[-28:]:<28} {layer['mode']:<5} {layer['top_k']:>5} {_fmt(layer['keys_retrieved'], '6.1f')} "
                    f"{_fmt(layer['mass_top_k'], '10.4f')} {_fmt(layer['mass_retrieved'], '6.3f')} "
                    f"{_fmt(layer['min_mass_retrieved'], '8.3f')} {_fmt(layer['recall'], '6.3f')} "
                    f"{_fmt(layer['output_cosine'], '8.5f')} {_fmt(layer['min_output_cosine'], '8.5f')} "
                    f"{layer['output_max_abs_error']:>9.2e}")
    return "\n".join(lines)


def _short_names(names: list[str]) -> list[str]:
    """Node names without the '/'-separated parts they all share ('layer.3' for BERT's)."""
    if len(names) < 2:
        return names
    first = names[0]
    prefix = first.rfind("/", 0, len(os.path.commonprefix(names))) + 1
    suffix = len(os.path.commonprefix([name[::-1] for name in names]))
    cut = first.find("/", len(first) - suffix)
    suffix = len(first) - cut if cut >= 0 else 0
    if any(len(name) <= prefix + suffix for name in names):
        return names
    return [name[prefix:len(name) - suffix] for name in names]


def _average(rows: list[dict], key: str):
    values = [row[key] for row in rows if row.get(key) is not None]
    return sum(values) / len(values) if values else None
