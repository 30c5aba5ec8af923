"""`ice-onnx demo` runs end to end and reports what it ran: SmolLM2 answering over a long
document (when `make smollm2` has built it), the shipped line-retrieval model otherwise."""

import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from cli_support import CLI
from ice_onnx.custom_ops.contract import Attributes
from ice_onnx.demo import prompts
from ice_onnx.demo import smollm2 as demo
from ice_onnx.models.line_retrieval.evaluate import ONNX_FILE
from models.smollm2 import build, texts

needs_line_retrieval = pytest.mark.skipif(not ONNX_FILE.is_file(), reason="line_retrieval.onnx is not shipped yet")
needs_smollm2 = pytest.mark.skipif(not build.is_built(), reason="SmolLM2 is not built: make smollm2")


def _demo(*args, cwd=None, env=None):
    return subprocess.run([*CLI, "demo", *args], capture_output=True, text=True, timeout=900, cwd=cwd, env=env)


@needs_line_retrieval
def test_without_smollm2_the_demo_falls_back_to_line_retrieval(tmp_path):
    env = {**os.environ, build.DIR_ENV: str(tmp_path / "nothing")}
    result = _demo("--tokens", "600", "--questions", "2", "--threads", "1", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert "SmolLM2 is not built" in result.stderr
    assert "converted" in result.stderr  # progress names the conversion it ran
    # one row per question: "line <key> : REGISTER_CONTENT is  <expected> <original> <ice-onnx>"
    rows = [line.split() for line in result.stdout.splitlines() if "REGISTER_CONTENT is" in line]
    assert len(rows) == 2
    for words in rows:
        assert words[4] == "is" and len(words) == 8
        assert re.fullmatch(r"\d+", words[5])  # the expected answer is a number; the models may answer anything
    assert re.search(r"speed-up \d+\.\d\dx", result.stdout)
    assert re.search(r"accuracy\s+original \d+%\s+ice-onnx \d+%", result.stdout)


def test_smollm2_asked_for_but_not_built_is_one_line(tmp_path):
    result = _demo("--model", "smollm2", "--smollm2-dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "SmolLM2 is not built" in result.stderr and "make smollm2" in result.stderr


def test_modes_follow_the_contract():
    """At the contract's defaults: kNN from the first key count the contract sends to kNN;
    a prompt that long runs kNN in every block, one decoding step over it never does."""
    attributes = Attributes()
    modes = demo.Modes([attributes] * 30, [3] * 30)
    (start,) = set(modes.knn_from())
    assert attributes.uses_knn(start) and not attributes.uses_knn(start - 1)
    assert modes.knn_blocks(start, start) == 30
    assert modes.knn_blocks(start - 1, start - 1) == 0
    assert modes.knn_blocks(1, start + 24) == 0
    assert demo.Modes([Attributes(exact_below=2147483647)], [3]).knn_from() == [None]


@needs_smollm2
def test_smollm2_prompts_use_the_models_chat_template():
    transformers = pytest.importorskip("transformers")
    where = build.paths()
    chat = prompts.Chat(where.hf)
    messages = [{"role": "user", "content": "Some document.\n\nQuestion: what?"}]
    expected = transformers.AutoTokenizer.from_pretrained(where.hf).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    assert chat.render(messages[0]["content"]) == expected
    asked, taken = prompts.prompts(chat, texts.text(demo.DEFAULT_TEXT), 900, 3)
    assert [prompt.fact for prompt in asked] == list(prompts.FACTS[:3])
    assert all(abs(len(prompt.ids) - 900) <= 4 for prompt in asked)
    text = chat.tokenizer.decode(asked[0].ids.tolist(), skip_special_tokens=False)
    assert text.endswith(f"Question: {prompts.FACTS[0].question}<|im_end|>\n<|im_start|>assistant\n")
    assert all(fact.sentence in text for fact in prompts.FACTS[:3])
    assert 700 < taken < 900


def _greedy_uncached(session, ids, steps):
    """Greedy tokens by the scorer, the whole sequence again at every step (no KV cache)."""
    sequence, tokens = list(ids), []
    for _ in range(steps):
        (logits,) = session.run(["logits"], {"input_ids": np.array([sequence], np.int64)})
        tokens.append(int(logits[0, -1].argmax()))
        sequence.append(tokens[-1])
    return tokens


@needs_smollm2
def test_smollm2_demo_answers_with_both_models(tmp_path):
    import onnxruntime as ort

    where, report_file, new_tokens = build.paths(), tmp_path / "demo.json", 6
    result = _demo("--tokens", "400", "--questions", "1", "--new-tokens", str(new_tokens), "--smollm2-dir",
                   str(where.root), "--json", str(report_file))
    assert result.returncode == 0, result.stderr
    report = json.loads(report_file.read_text())
    (row,) = report["rows"]
    conversion = report["conversion"]
    assert conversion["replaced"] == conversion["attention_blocks"] == build.LAYERS

    # The original's answer is greedy decoding, computed here without the cache (the scorer form).
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    scorer = ort.InferenceSession(str(where.prefill), options, providers=["CPUExecutionProvider"])
    ids = np.array(row["prompt_ids"], np.int64)
    assert len(ids) == row["prompt_tokens"] and abs(len(ids) - 400) <= 4
    assert row["original"]["tokens"] == _greedy_uncached(scorer, ids, new_tokens)

    # The converted model answered too; below its kNN threshold it runs the exact kernel (the
    # screen says so), so its tokens are the original's.
    assert len(row["ice-onnx"]["tokens"]) == new_tokens
    assert conversion["prefill_knn_blocks"] == 0 and conversion["decode_knn_blocks"] == 0
    assert "the exact kernel in every block" in result.stdout
    assert row["ice-onnx"]["tokens"] == row["original"]["tokens"] and row["same_answer"]
    # The kernel's own account of the converted prefill: every block's call ran exactly.
    kernel = row["ice-onnx"]["prefill_kernel"]
    assert kernel["kernel"]["exact_calls"] == build.LAYERS and kernel["kernel"]["knn_calls"] == 0
    assert kernel["knn_head_share"] == 0.0 and "prefill_kernel" not in row["original"]
    assert "(kNN heads 0%)" in result.stdout
    for name in ("original", "ice-onnx"):
        assert row[name]["prefill_s"] > 0 and row[name]["decode_s"] > 0
        assert row[name]["decode_steps"] == new_tokens - 1
        assert repr(row[name]["answer"]) in result.stdout
    assert re.search(r"prefill\s+original\s+\d+\.\d s\s+ice-onnx\s+\d+\.\d s\s+speed-up \d+\.\d\dx", result.stdout)
    assert re.search(r"decode\s+original\s+\d+\.\d s\s+ice-onnx\s+\d+\.\d s\s+speed-up \d+\.\d\dx", result.stdout)
    assert "answers match on 1 of 1 questions" in result.stdout
