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

REPO = Path(__file__).resolve().parents[1]
LINE_RETRIEVAL_ONNX = REPO / "models" / "line_retrieval" / "line_retrieval.onnx"


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
    assert accuracy >= 0.5, f"accuracy {accuracy} at 512 tokens (chance is 1/{line_task.NUM_VALUES})"
