"""The causal-LM task: does a converted language model still predict real text?

For a user's ONNX causal LM (any exporter: `input_ids`, plus `attention_mask`,
`position_ids`, token types or empty past key/values when the graph has them ->
`[batch, seq, vocab]` logits), its tokenizer (`tokenizers` JSON) and one or more text
files: per length L, one forward pass over the first L tokens of each text, by the
original model and by the same model converted in-process, both in ONNX Runtime with the
same threads. Per (text, L):

- next-token perplexity of each model over the L - 1 predicted tokens (exp of the mean
  negative log-likelihood; log-softmax in float64, computed in blocks of rows so that
  the [L, vocab] logits are never held twice) and their ratio (converted / original);
- next-token argmax agreement (the share of those positions where both models' top
  token is the same) and each model's next-token accuracy;
- the time of each forward pass (median of `repeats` timed runs, measured interleaved
  so that machine noise hits both alike) and the speed-up.

With several texts each length also gets a pooled row over all of them. A text shorter
than L is skipped at that length (`skipped` in the report); if no text is long enough for
any length the task fails. The report (`run`) is plain JSON:

    schema        "ice-onnx/eval-causal-lm/1"
    model, tokenizer, texts[] {path, name, tokens}
    interface     the token input, the logits output and the role of every input fed
    settings      lengths, threads, repeats, warmup, backend, memory_pattern,
                  special_tokens, convert {top_k, exact_below, seed, compensate, probe_rows,
                  max_error (null: the kernel's), layers, plan}, attributes (set on every node after
                  conversion), convert_label
    attention_nodes, environment
    rows[]        text, length, ppl_original, ppl_converted, ppl_ratio, nll_original,
                  nll_converted, accuracy_original, accuracy_converted, agreement,
                  time_original_s, time_converted_s, speedup, times_original_s,
                  times_converted_s, predicted (tokens scored), knn_blocks (blocks whose
                  settings route L keys to the kNN path; the kernel may still run a call
                  exactly, e.g. for a mask that is not a key padding mask), and with the
                  native kernel what it did over the converted model's runs of the row:
                  kernel (its run counters), knn_head_share, guard_exact_share,
                  keys_per_knn_row, scored_fraction (evaluation/runtime.py kernel_paths)
    skipped[]     text, length, text_tokens
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from ice_onnx.custom_ops.contract import Attributes
from ice_onnx.errors import first_line
from ice_onnx.evaluation.lm_inputs import detect_interface, load_tokenizer, tokenize
from ice_onnx.evaluation.runtime import (KERNEL_COLUMNS, attention_nodes, convert, environment, observed_kernel,
                                         open_session, pooled_kernel_paths, resolve_backend, with_attributes)

SCHEMA = "ice-onnx/eval-causal-lm/1"
DEFAULT_LENGTHS = (2048, 4096, 8192)
SCORE_ROWS = 256  # positions per float64 log-softmax block
POOLED = "all texts"


# ---- scoring ----------------------------------------------------------------------------


def next_token_scores(logits: np.ndarray, targets: np.ndarray, rows: int = SCORE_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """For positions t < len(targets): -log softmax(logits[t])[targets[t]] in float64, and argmax(logits[t]).

    `logits` is [seq, vocab]; it is read `rows` positions at a time, so that only one
    float64 block of [rows, vocab] exists besides it."""
    count = len(targets)
    nll = np.empty(count, dtype=np.float64)
    argmax = np.empty(count, dtype=np.int64)
    for start in range(0, count, rows):
        stop = min(count, start + rows)
        block = logits[start:stop].astype(np.float64)
        peak = block.max(axis=-1)
        log_total = peak + np.log(np.exp(block - peak[:, None]).sum(axis=-1))
        nll[start:stop] = log_total - block[np.arange(stop - start), targets[start:stop]]
        argmax[start:stop] = block.argmax(axis=-1)
    return nll, argmax


def compare_on(sessions, feeds: dict, output: str, targets: np.ndarray, *, repeats: int, warmup: int,
               backend: str = "auto", log=lambda message: None) -> dict:
    """Time both sessions on `feeds` (interleaved: original first on even rounds, converted
    first on odd ones), score each model's first run against `targets` and observe what the
    kernel did (the original has no IceKNNAttention node to count)."""
    scores: list = [None, None]
    times: tuple[list, list] = ([], [])
    rounds = warmup + repeats
    with observed_kernel(backend) as kernel:
        for round_ in range(rounds):
            for which in ((0, 1) if round_ % 2 == 0 else (1, 0)):
                began = time.perf_counter()
                logits = sessions[which].run([output], feeds)[0]
                seconds = time.perf_counter() - began
                if round_ >= warmup:
                    times[which].append(seconds)
                if scores[which] is None:
                    scores[which] = next_token_scores(logits[0], targets)
                del logits  # before the next run allocates its own
                log(f"  {('original', 'converted')[which]}: run {round_ + 1}/{rounds} {seconds:.2f} s")
    (nll_o, top_o), (nll_c, top_c) = scores
    return {"predicted": len(targets), **_perplexities(nll_o.mean(), nll_c.mean()),
            "accuracy_original": float(np.mean(top_o == targets)),
            "accuracy_converted": float(np.mean(top_c == targets)),
            "agreement": float(np.mean(top_o == top_c)), **_timing(*times), **kernel}


def _perplexities(nll_original: float, nll_converted: float) -> dict:
    return {"nll_original": float(nll_original), "nll_converted": float(nll_converted),
            "ppl_original": math.exp(nll_original), "ppl_converted": math.exp(nll_converted),
            "ppl_ratio": math.exp(nll_converted - nll_original)}


def _timing(times_original: list[float], times_converted: list[float]) -> dict:
    original, converted = statistics.median(times_original), statistics.median(times_converted)
    return {"time_original_s": original, "time_converted_s": converted, "speedup": original / converted,
            "times_original_s": times_original, "times_converted_s": times_converted}


def pooled(rows: list[dict]) -> dict:
    """One row over several texts at one length: token-weighted NLL, accuracy and agreement;
    the summed times of each model's runs."""
    weights = np.array([row["predicted"] for row in rows], dtype=np.float64)

    def mean(key):
        return float(np.dot(weights, [row[key] for row in rows]) / weights.sum())

    totals = [[sum(run) for run in zip(*(row[key] for row in rows))] for key in ("times_original_s",
                                                                              "times_converted_s")]
    return {"text": POOLED, "length": rows[0]["length"], "predicted": int(weights.sum()),
            **_perplexities(mean("nll_original"), mean("nll_converted")),
            **{key: mean(key) for key in ("accuracy_original", "accuracy_converted", "agreement")},
            **_timing(*totals), "knn_blocks": rows[0]["knn_blocks"], **pooled_kernel_paths(rows)}


# ---- the task ---------------------------------------------------------------------------


def block_attributes(model: onnx.ModelProto) -> list[Attributes]:
    """The settings of each IceKNNAttention node, in graph order."""
    return [Attributes.from_node_attributes({a.name: helper.get_attribute_value(a) for a in node.attribute})
            for node in attention_nodes(model)]


def knn_blocks(blocks: list[Attributes], length: int) -> int:
    """Blocks whose settings send a call with `length` queries and keys to the kNN path."""
    return sum(block.uses_knn(length, length) for block in blocks)


def convert_label(options, attributes: dict | None = None) -> str:
    """One line for a ConvertOptions (and attributes set after it): the settings that differ between runs."""
    label = (f"top_k={options.top_k} exact_below={options.exact_below} "
             f"compensate={'on' if options.compensate else 'off'}")
    if options.seed:
        label += f" seed={options.seed}"
    for guard in ("probe_rows", "max_error"):  # the kernel's defaults unless set
        if getattr(options, guard) is not None:
            label += f" {guard}={getattr(options, guard)}"
    if options.layers is not None:
        label += f" layers={','.join(map(str, sorted(options.layers)))}"
    if options.plan:
        label += f" plan={len(options.plan)} block(s)"
    return " ".join([label, *(f"{name}={value}" for name, value in (attributes or {}).items())])


def load_model(path: Path) -> onnx.ModelProto:
    from ice_onnx.rewriter import ModelFileError

    if not Path(path).is_file():
        raise ModelFileError(f"{path}: no such model file")
    try:
        return onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - protobuf decode errors, missing external data, ...
        raise ModelFileError(f"{path}: not a readable ONNX model ({first_line(exc)})") from None


def run(model_path: Path, tokenizer_path: Path, texts: list[Path], options, *, lengths=DEFAULT_LENGTHS,
        threads: int = 2, repeats: int = 3, warmup: int = 1, backend: str = "auto", memory_pattern: bool = True,
        special_tokens: bool = True, attributes: dict | None = None, log=lambda message: None) -> dict:
    """Score MODEL and MODEL converted with `options` (a ConvertOptions) on every text at every length;
    `attributes` (NAME -> value) are then set on every IceKNNAttention node."""
    tokenizer = load_tokenizer(tokenizer_path)
    tokens = [tokenize(tokenizer, path, special_tokens) for path in texts]
    lengths = sorted(set(lengths))
    if lengths[0] < 2:
        raise ValueError("every length must be at least 2 tokens (one token predicted)")
    if not any(len(ids) >= length for ids in tokens for length in lengths):
        longest = max(range(len(texts)), key=lambda i: len(tokens[i]))
        raise ValueError(f"{texts[longest]}: {len(tokens[longest])} tokens, fewer than the shortest length "
                         f"{lengths[0]}: give a longer text or --lengths")
    original = load_model(model_path)
    interface = detect_interface(original, str(model_path))
    largest = max(int(ids.max(initial=0)) for ids in tokens)
    if interface.vocab is not None and largest >= interface.vocab:
        raise ValueError(f"{tokenizer_path}: gives token id {largest}, but {Path(model_path).name} scores "
                         f"{interface.vocab} tokens: not this model's tokenizer")
    converted = convert(model_path, options=options, log=log)
    if attributes:
        converted = with_attributes(converted, **attributes)
    backend = resolve_backend(backend)
    log(f"opening sessions ({threads} thread(s), kernel: {backend}) ...")
    sessions = (open_session(original, threads, memory_pattern=memory_pattern),
                open_session(converted, threads, backend, memory_pattern=memory_pattern))
    blocks = block_attributes(converted)
    del original, converted  # the sessions hold the weights: no protobuf copies during the long runs
    names = [Path(path).name for path in texts]
    rows, skipped = [], []
    for length in lengths:
        measured = []
        for name, ids in zip(names, tokens):
            if len(ids) < length:
                log(f"{name}: {len(ids)} tokens, fewer than {length}: skipped at that length")
                skipped.append({"text": name, "length": length, "text_tokens": int(len(ids))})
                continue
            log(f"{name}, {length} tokens: {warmup} warm-up and {repeats} timed run(s) of each model ...")
            window = ids[:length]
            row = compare_on(sessions, interface.feeds(window), interface.logits, window[1:], repeats=repeats,
                             warmup=warmup, backend=backend, log=log)
            measured.append({"text": name, "length": length, **row, "knn_blocks": knn_blocks(blocks, length)})
        rows += measured
        if len(measured) > 1:
            rows.append(pooled(measured))
    return {
        "schema": SCHEMA,
        "model": str(model_path),
        "tokenizer": str(tokenizer_path),
        "texts": [{"path": str(path), "name": name, "tokens": int(len(ids))}
                  for path, name, ids in zip(texts, names, tokens)],
        "interface": {"token_input": interface.tokens, "logits_output": interface.logits,
                      "inputs": interface.roles},
        "settings": {"lengths": lengths, "threads": threads, "repeats": repeats, "warmup": warmup,
                     "backend": backend, "memory_pattern": memory_pattern, "special_tokens": special_tokens,
                     "convert": {"top_k": options.top_k, "exact_below": options.exact_below, "seed": options.seed,
                                 "compensate": options.compensate,
                                 "probe_rows": options.probe_rows, "max_error": options.max_error,
                                 "layers": None if options.layers is None else sorted(options.layers),
                                 "plan": {str(index): block for index, block in sorted(options.plan.items())}},
                     "attributes": attributes or {},
                     "convert_label": convert_label(options, attributes)},
        "attention_nodes": len(blocks),
        "environment": environment(),
        "rows": rows,
        "skipped": skipped,
    }


COLUMNS = [("text", "text", "s"), ("length", "tokens", "d"), ("ppl_original", "ppl orig", ".3f"),
           ("ppl_converted", "ppl conv", ".3f"), ("ppl_ratio", "ratio", ".4f"), ("agreement", "agree", ".1%"),
           ("time_original_s", "orig s", ".2f"), ("time_converted_s", "conv s", ".2f"),
           ("speedup", "speed-up", ".2f"), ("knn_blocks", "kNN blocks", "d"), *KERNEL_COLUMNS]


def render(report: dict) -> str:
    """The stdout summary: a title, the table and the skipped (text, length) pairs."""
    from ice_onnx.evaluation.tasks import side_by_side

    settings = report["settings"]
    lines = [f"{Path(report['model']).name}, converted with {settings['convert_label']}; {settings['threads']} "
             f"thread(s), kernel: {settings['backend']}, median of {settings['repeats']} interleaved run(s)",
             side_by_side(report["rows"], COLUMNS)]
    lines += [f"skipped: {s['text']} has {s['text_tokens']} tokens, fewer than {s['length']}"
              for s in report["skipped"]]
    return "\n".join(lines)
