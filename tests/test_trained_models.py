"""Fast checks of the small trained models in models/ (no training here).

The data generators are checked against an independent parse of the text they emit,
and the shipped ONNX files must load, run with dynamic batch/sequence and retrieve
well above chance on short prompts in ONNX Runtime.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from models.line_retrieval import task as line_task
from models.line_retrieval.evaluate import evaluate_session
from models.listops import task as listops_task

REPO = Path(__file__).resolve().parents[1]
LINE_RETRIEVAL_ONNX = REPO / "models" / "line_retrieval" / "line_retrieval.onnx"
LISTOPS_ONNX = REPO / "models" / "listops" / "listops.onnx"


@pytest.fixture(scope="module")
def vocab():
    return line_task.Vocab.load()


def test_shipped_vocab_matches_the_generator(vocab):
    assert vocab == line_task.Vocab.build()
    assert len(set(vocab.words)) == len(vocab)


def test_vocab_round_trips_a_prompt(vocab):
    prompt = line_task.make_batch(vocab, 3, 1, 400, num_questions=4)[0]
    text = vocab.decode(prompt.ids)
    assert vocab.encode(text) == prompt.ids.tolist()


def test_line_prompts_are_deterministic_in_their_seed(vocab):
    first = line_task.make_batch(vocab, (7, 1), 3, 500, num_questions=2)
    again = line_task.make_batch(vocab, (7, 1), 3, 500, num_questions=2)
    other = line_task.make_batch(vocab, (7, 2), 3, 500, num_questions=2)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.answers, b.answers)
    assert any(not np.array_equal(a.ids, c.ids) for a, c in zip(first, other))


@pytest.mark.parametrize("length, questions", [(64, 1), (1000, 1), (1000, 8), (16384, 1)])
def test_line_prompt_answers_agree_with_a_parse_of_the_text(vocab, length, questions):
    prompt = line_task.make_batch(vocab, 11, 1, length, num_questions=questions)[0]
    text = vocab.decode(prompt.ids)
    record, question = text.split(" question : <nl> ")
    table = dict(re.findall(r"line (\S+) : REGISTER_CONTENT is (\d+) <nl>", record))
    assert len(table) == record.split().count("line")  # keys are unique within a record
    asked = re.findall(r"line (\S+) : REGISTER_CONTENT is", question)
    assert [table[k] for k in asked] == vocab.decode(prompt.answers).split()
    assert text.endswith("REGISTER_CONTENT is")  # the prompt stops right before the answer
    # Every answer position is the "is" that precedes the answer.
    assert all(vocab.words[prompt.ids[p]] == "is" for p in prompt.answer_positions)
    assert prompt.answer_positions[-1] == len(prompt.ids) - 1
    assert length - line_task.TOKENS_PER_LINE < len(prompt.ids) <= length


@pytest.fixture(scope="module")
def line_session():
    if not LINE_RETRIEVAL_ONNX.exists():
        pytest.skip("line_retrieval.onnx not exported yet")
    return ort.InferenceSession(str(LINE_RETRIEVAL_ONNX), providers=["CPUExecutionProvider"])


def test_line_retrieval_onnx_runs_with_dynamic_batch_and_length(line_session, vocab):
    for batch, length in ((1, 100), (3, 700)):
        ids = np.stack([p.ids for p in line_task.make_batch(vocab, 5, batch, length)])
        (logits,) = line_session.run(["logits"], {"input_ids": ids})
        assert logits.shape == (batch, 1, len(vocab))
        assert np.isfinite(logits).all()


def test_line_retrieval_onnx_retrieves_far_above_chance(line_session, vocab):
    metrics = evaluate_session(line_session, lengths=(512,), samples=30, batch_size=10, vocab=vocab)
    accuracy = metrics["lengths"][512]["accuracy"]
    assert accuracy >= 0.8, f"accuracy {accuracy} at 512 tokens (chance is 1/{line_task.NUM_VALUES})"


def evaluate_listops_text(words: list[str]) -> int:
    """An independent ListOps evaluator: a stack machine over the token strings."""
    stack: list[list] = []
    result = None
    for word in words:
        if word.startswith("["):
            stack.append([word[1:]])
            continue
        if word == "]":
            operator, *arguments = stack.pop()
            ordered = sorted(arguments)
            middle = len(ordered) // 2
            number = {"MAX": max(arguments), "MIN": min(arguments), "SM": sum(arguments) % 10,
                      "MED": ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) // 2}[operator]
        else:
            number = int(word)
        if stack:
            stack[-1].append(number)
        else:
            result = number
    assert not stack
    return result


def test_listops_vocab_round_trips():
    vocab = listops_task.Vocab.load()
    assert vocab == listops_task.Vocab.build()
    ids, mask, _ = listops_task.make_batch(vocab, 2, 2, 20, 300)
    words = vocab.decode(ids[0][mask[0] == 1])
    assert vocab.encode(words) == ids[0][mask[0] == 1].tolist()


def test_listops_is_deterministic_in_its_seed():
    vocab = listops_task.Vocab.build()
    first, again, other = (listops_task.make_batch(vocab, seed, 4, 20, 300) for seed in (5, 5, 6))
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert not (first[0].shape == other[0].shape and np.array_equal(first[0], other[0]))


@pytest.mark.parametrize("low, high", [(10, 100), (listops_task.LRA_MIN_LENGTH, listops_task.LRA_MAX_LENGTH)])
def test_listops_labels_lengths_and_depth_follow_the_lra_rules(low, high):
    vocab = listops_task.Vocab.build()
    ids, mask, labels = listops_task.make_batch(vocab, 9, 16, low, high)
    for row, label in zip(range(len(ids)), labels):
        words = vocab.decode(ids[row][mask[row] == 1])
        assert words[0] == "<cls>" and (ids[row][mask[row] == 0] == 0).all()
        expression = words[1:]
        assert low <= len(expression) <= high
        assert evaluate_listops_text(expression) == label
        depth = deepest = 0
        for word in expression:
            depth += word.startswith("[") - (word == "]")
            deepest = max(deepest, depth)
        assert deepest <= listops_task.MAX_DEPTH


@pytest.fixture(scope="module")
def listops_session():
    if not LISTOPS_ONNX.exists():
        pytest.skip("listops.onnx not exported yet")
    return ort.InferenceSession(str(LISTOPS_ONNX), providers=["CPUExecutionProvider"])


def test_listops_onnx_runs_and_padding_does_not_change_a_prediction(listops_session):
    vocab = listops_task.Vocab.load()
    ids, mask, _ = listops_task.make_batch(vocab, 3, 3, 50, 400)
    (batched,) = listops_session.run(["logits"], {"input_ids": ids, "attention_mask": mask})
    assert batched.shape == (3, listops_task.NUM_CLASSES) and np.isfinite(batched).all()
    shortest = int(mask.sum(1).argmin())
    alone = mask[shortest] == 1
    (single,) = listops_session.run(["logits"], {"input_ids": ids[shortest][alone][None],
                                                 "attention_mask": mask[shortest][alone][None]})
    np.testing.assert_allclose(single[0], batched[shortest], atol=1e-4)


def test_eval_line_retrieval_compares_original_and_converted(tmp_path):
    """The `ice-onnx eval line-retrieval` command end to end on short prompts: the
    converted model (kNN from 0 keys, compensation on, the accuracy guard on) answers as
    the original does."""
    import json

    from click.testing import CliRunner

    from ice_onnx.cli import main
    from ice_onnx.custom_ops.run_stats import run_stats

    if not LINE_RETRIEVAL_ONNX.exists():
        pytest.skip("line_retrieval.onnx not exported yet")
    report_file = tmp_path / "eval.json"
    with run_stats() as stats:
        result = CliRunner().invoke(main, ["eval", "line-retrieval", str(LINE_RETRIEVAL_ONNX), "--lengths", "512",
                                           "--samples", "6", "--threads", "1", "--exact-below", "0",
                                           "--no-memory-pattern", "--json", str(report_file)])
    assert result.exit_code == 0, result.output
    # The kernel's own account of the converted runs: every call took the kNN path; the
    # accuracy guard sends many of this model's heads to exact attention (measured: 65 of
    # 96), the rest go through the index, whose rows score under half of their keys.
    assert stats.knn_calls > 0 and stats.exact_calls == 0
    assert stats.knn_heads > 0 and stats.guarded_heads == stats.exact_heads
    assert stats.scored_fraction < 0.5
    report = json.loads(report_file.read_text())
    original = report["original"]["lengths"]["512"]
    (converted,) = report["converted"]
    assert converted["settings"]["compensate"] == 1 and converted["settings"]["exact_below"] == 0
    assert original["accuracy"] >= 0.8
    assert converted["lengths"]["512"]["predictions"] == original["predictions"]
    # The report says the same as the counters: its converted runs are the only ones counted.
    assert converted["kernel"]["knn_heads"] == stats.knn_heads
    assert converted["knn_head_share"] == pytest.approx(stats.knn_heads / (stats.knn_heads + stats.exact_heads))
    assert converted["guard_exact_share"] == pytest.approx(stats.guarded_heads / (stats.knn_heads
                                                                                  + stats.guarded_heads))
    assert converted["keys_per_knn_row"] == pytest.approx(stats.mean_keys_scored)
    assert "kNN heads" in result.output
