"""The real-LLM demo: SmolLM2-135M-Instruct answers questions over a long real document.

The document is the start of a held-out text of models/smollm2/texts.py (`man bash` by
default) with a few short facts inserted at different depths; each question asks for one of
them. The prompt is SmolLM2's own chat template around the document and the question
(ice_onnx/demo/prompts.py).

The with-past model (the one a generation loop runs) is converted with `ice-onnx convert`'s
settings (its defaults unless --top-k) and kept under the SmolLM2 folder
(`converted/`, reconverted when the model, the settings or the converter change:
ice_onnx/demo/conversion.py). For
each question, original and converted in turn: prefill (the whole prompt in one pass with
an empty past), then greedy decoding on the KV cache the model returns, a fixed number of
new tokens (the same work for both; the answer is cut at the end-of-turn token). Which
attention mode each phase takes is read from the converted nodes' settings through the
contract's own rule (`Attributes.uses_knn`), not assumed.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from ice_onnx.demo.conversion import Modes, converted_model
from ice_onnx.demo.prompts import Chat, prompts
from ice_onnx.errors import IceError

DEFAULT_TOKENS, DEFAULT_QUESTIONS, DEFAULT_NEW_TOKENS = 4000, 2, 24
DEFAULT_TEXT = "bash-manual"
SCHEMA = "ice-onnx/demo-smollm2/1"
WARMUP_TOKENS = 64


# ---- where SmolLM2 is -------------------------------------------------------------------


def candidates(folder: Path | None = None) -> list[Path]:
    """Folders a SmolLM2 build may be in: `folder`, else the recipe's default ($ICE_ONNX_SMOLLM2,
    or ~/.cache/ice-onnx/smollm2 for an installed package) and ./.cache/smollm2 (a checkout)."""
    from ice_onnx.models.smollm2 import build

    if folder is not None:
        return [Path(folder)]
    return list(dict.fromkeys([build.default_dir(), Path.cwd() / ".cache" / "smollm2"]))


def locate(folder: Path | None = None):
    """The recipe's Paths of the first built candidate, or None."""
    from ice_onnx.models.smollm2 import build

    return next((build.paths(root) for root in candidates(folder) if build.is_built(root)), None)


# ---- running ----------------------------------------------------------------------------


def greedy(session, ids: np.ndarray, new_tokens: int, observe: bool = False) -> dict:
    """Prefill `ids` with an empty past, then `new_tokens` greedy tokens, each after the first
    from one decoding step on the cache the previous call returned; tokens and times. With
    `observe`, also what the kernel did in the prefill (runtime.observed_kernel)."""
    from ice_onnx.evaluation.runtime import observed_kernel
    from ice_onnx.models.smollm2.build import past_names, with_past_feeds

    names = ["logits", *past_names("present")]
    with observed_kernel("native") if observe else nullcontext({}) as kernel:
        began = time.perf_counter()
        logits, *past = session.run(names, with_past_feeds(ids))
        prefill = time.perf_counter() - began
    tokens = [int(logits[0, -1].argmax())]
    del logits
    began = time.perf_counter()
    for _ in range(new_tokens - 1):
        logits, *past = session.run(names, with_past_feeds(np.array(tokens[-1:]), past))
        tokens.append(int(logits[0, -1].argmax()))
    return {"tokens": tokens, "prefill_s": prefill, "decode_s": time.perf_counter() - began,
            "decode_steps": new_tokens - 1, **({"prefill_kernel": kernel} if kernel else {})}


def _session(path: Path, threads: int):
    """Both models alike: the op library registered (the original has no node of it), no buffers
    kept between runs, so that two sessions taking turns never hold each other's peak."""
    import onnxruntime as ort

    import ice_onnx

    try:
        options = ice_onnx.session_options(intra_op_num_threads=threads, inter_op_num_threads=1,
                                           enable_mem_pattern=False, enable_cpu_mem_arena=False)
    except FileNotFoundError as exc:
        raise IceError(str(exc)) from None
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(where, *, tokens: int = DEFAULT_TOKENS, questions: int = DEFAULT_QUESTIONS,
        new_tokens: int = DEFAULT_NEW_TOKENS, text: str = DEFAULT_TEXT, threads: int = 2, options=None,
        say=lambda message: None) -> dict:
    """The demo on the SmolLM2 build at `where` (the recipe's Paths); the report (plain JSON)."""
    from ice_onnx.models.smollm2 import texts
    from ice_onnx.rewriter import ConvertOptions

    options = options or ConvertOptions()
    chat = Chat(where.hf)
    try:
        body = texts.text(text)
    except (RuntimeError, OSError) as exc:
        raise IceError(str(exc)) from None
    asked, taken = prompts(chat, body, tokens, questions)

    say("[1/3] the converted with-past model ...")
    converted, record = converted_model(where.with_past, options, where.root / "converted", say)
    modes = Modes.of(record)
    say(f"[2/3] loading both models ({threads} thread(s)) and warming them up ...")
    sessions = {"original": _session(where.with_past, threads), "ice-onnx": _session(converted, threads)}
    for session in sessions.values():
        greedy(session, asked[0].ids[:WARMUP_TOKENS], 2)

    rows = []
    for number, prompt in enumerate(asked):
        say(f"[3/3] question {number + 1} of {len(asked)} ({len(prompt.ids)} tokens): {prompt.fact.question}")
        row = {"question": prompt.fact.question, "expected": prompt.fact.answer, "depth": prompt.fact.depth,
               "prompt_tokens": len(prompt.ids), "prompt_ids": prompt.ids.tolist()}
        order = list(sessions) if number % 2 == 0 else list(sessions)[::-1]  # load hits both alike
        for name in order:
            result = greedy(sessions[name], prompt.ids, new_tokens, observe=name == "ice-onnx")
            result["answer"] = chat.answer(result["tokens"])
            result["found"] = prompt.fact.answer.lower() in result["answer"].lower()
            row[name] = result
            say(f"      {name:8}  prefill {result['prefill_s']:.1f} s  {result['answer']!r}")
        row["same_answer"] = row["original"]["answer"] == row["ice-onnx"]["answer"]
        row["same_tokens"] = row["original"]["tokens"] == row["ice-onnx"]["tokens"]
        rows.append(row)

    length = max(len(prompt.ids) for prompt in asked)
    knn_from = modes.knn_from()
    return {
        "schema": SCHEMA, "model": str(where.with_past), "converted": str(converted),
        "text": {"name": text, "source": texts.TEXTS[text].source, "split": texts.TEXTS[text].split,
                 "tokens_taken": taken, "facts_inserted": len(asked)},
        "settings": {"tokens": tokens, "questions": questions, "new_tokens": new_tokens, "threads": threads,
                     "convert": record["key"]["options"]},
        "conversion": {"attention_blocks": record["attention_blocks"], "replaced": record["replaced"],
                       "top_k": sorted({attrs.top_k for attrs in modes.attributes}),
                       "knn_from_keys": sorted(set(knn_from), key=lambda v: (v is None, v)),
                       "prefill_knn_blocks": modes.knn_blocks(length, length),
                       "decode_knn_blocks": modes.knn_blocks(1, length + new_tokens)},
        "rows": rows,
        "summary": _summary(rows),
    }


def _summary(rows: list[dict]) -> dict:
    total = {name: {key: sum(row[name][key] for row in rows) for key in ("prefill_s", "decode_s", "decode_steps")}
             for name in ("original", "ice-onnx")}
    ratio = lambda key: total["original"][key] / total["ice-onnx"][key] if total["ice-onnx"][key] else None  # noqa: E731
    return {"questions": len(rows), "same_answer": sum(row["same_answer"] for row in rows),
            "found_original": sum(row["original"]["found"] for row in rows),
            "found_converted": sum(row["ice-onnx"]["found"] for row in rows),
            "totals": total, "prefill_speedup": ratio("prefill_s"), "decode_speedup": ratio("decode_s")}


# ---- the screen -------------------------------------------------------------------------


def _speedup(value) -> str:
    return f"{value:.2f}x" if value else "n/a"


def _modes_text(conversion: dict, length: int) -> list[str]:
    blocks, replaced, starts = conversion["attention_blocks"], conversion["replaced"], conversion["knn_from_keys"]
    threshold = ("always exact" if starts == [None] else
                 f"kNN attention from {' / '.join(str(v) if v else 'never' for v in starts)} keys, exact below")
    lines = [f"ice-onnx: {replaced} of {blocks} attention blocks -> IceKNNAttention "
             f"(top_k {', '.join(map(str, conversion['top_k']))}); {threshold}"]
    prefill, phase = conversion["prefill_knn_blocks"], f"  prefill ({length} queries over {length} keys):"
    if prefill:
        rest = f", the exact kernel in the other {replaced - prefill}" if prefill < replaced else ""
        lines.append(f"{phase} kNN in {prefill} of {replaced} blocks{rest} (a head the accuracy guard "
                     "rejects runs exactly)")
    else:
        hint = f"; --tokens {min(v for v in starts if v)} or more runs kNN" if any(starts) else ""
        lines.append(f"{phase} the exact kernel in every block (below the kNN threshold{hint})")
    decode = conversion["decode_knn_blocks"]
    lines.append("  decoding (one query per step): " + (f"kNN in {decode} of {replaced} blocks" if decode else
                                                          "the exact kernel in every block"))
    return lines


def render(report: dict) -> str:
    rows, summary, text = report["rows"], report["summary"], report["text"]
    length = max(row["prompt_tokens"] for row in rows)
    settings = report["settings"]
    lines = [f"SmolLM2-135M-Instruct answers over a long document: original vs ice-onnx "
             f"({settings['threads']} thread(s), greedy, {settings['new_tokens']} new tokens, KV cache)",
             f"document: the first {text['tokens_taken']} tokens of {text['source']} ({text['split']} text "
             f"{text['name']}) with {text['facts_inserted']} fact(s) inserted; prompts of up to {length} tokens",
             *_modes_text(report["conversion"], length), ""]
    for number, row in enumerate(rows, 1):
        lines.append(f"Q{number}  {row['question']}   (fact at {row['depth']:.0%} of the document; "
                     f"expected: {row['expected']})")
        for name in ("original", "ice-onnx"):
            result = row[name]
            lines.append(f"    {name:9} {result['answer']!r}" + ("" if result["found"] else "   [fact not found]"))
        original, converted = row["original"], row["ice-onnx"]
        kernel = converted.get("prefill_kernel")
        lines.append(f"    prefill   original {original['prefill_s']:6.1f} s   ice-onnx {converted['prefill_s']:6.1f} s"
                     f"   speed-up {_speedup(original['prefill_s'] / converted['prefill_s'])}"
                     + (f"   (kNN heads {kernel['knn_head_share']:.0%})" if kernel else ""))
        steps = original["decode_steps"]
        if steps:
            lines.append(f"    decode    original {original['decode_s']:6.1f} s   ice-onnx {converted['decode_s']:6.1f} s"
                         f"   speed-up {_speedup(original['decode_s'] / converted['decode_s'])}   ({steps} steps, "
                         f"{1000 * original['decode_s'] / steps:.0f} / {1000 * converted['decode_s'] / steps:.0f} "
                         "ms per token)")
        lines.append(f"    answers {'match' if row['same_answer'] else 'differ'}")
        lines.append("")
    totals = summary["totals"]
    lines += [f"answers match on {summary['same_answer']} of {summary['questions']} questions; fact found: "
              f"original {summary['found_original']}/{summary['questions']}, "
              f"ice-onnx {summary['found_converted']}/{summary['questions']}",
              f"prefill total: original {totals['original']['prefill_s']:.1f} s, ice-onnx "
              f"{totals['ice-onnx']['prefill_s']:.1f} s (speed-up {_speedup(summary['prefill_speedup'])}); "
              f"decoding: {totals['original']['decode_s']:.1f} s vs {totals['ice-onnx']['decode_s']:.1f} s "
              f"(speed-up {_speedup(summary['decode_speedup'])})"]
    return "\n".join(lines)
