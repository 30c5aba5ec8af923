"""LongEval-style line retrieval: the vocabulary, the tokenizer and the prompt generator.

A prompt is a record of lines, then a question that repeats the start of one line::

    record : <nl>
    line gokari : REGISTER_CONTENT is 417 <nl>
    line tesumo : REGISTER_CONTENT is 82 <nl>
    ...
    question : <nl>
    line tesumo : REGISTER_CONTENT is

and the answer is the next token, the line's number (here ``82``). Line keys are
single-token made-up words, unique within a record; numbers are single tokens 0..999.
Training prompts ask several questions in a row (each followed by its answer and
``<nl>``), which gives several supervised answers per sequence.

Everything is deterministic in its seed: the same (seed, length) gives the same prompt.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..vocab import WordVocab

NUM_KEYS = 4096  # distinct line keys: enough for unique keys in a 16K-token record
NUM_VALUES = 1000  # the numbers 0..999
LINE_WORDS = ("line", "<key>", ":", "REGISTER_CONTENT", "is", "<value>", "<nl>")
TOKENS_PER_LINE = len(LINE_WORDS)
RECORD_HEADER = ("record", ":", "<nl>")
QUESTION_HEADER = ("question", ":", "<nl>")
SPECIAL_WORDS = ("<pad>", "record", "question", "line", ":", "REGISTER_CONTENT", "is", "<nl>")


def _key_words() -> list[str]:
    """NUM_KEYS distinct pronounceable three-syllable words, in a fixed order."""
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    syllables = [c + v for c in consonants for v in vowels]  # 70 syllables
    words = []
    for i in range(NUM_KEYS):
        # A fixed bijection from i to three syllables, spread so neighbours differ early.
        j = (i * 2654435761) % (len(syllables) ** 3)
        a, rest = divmod(j, len(syllables) ** 2)
        b, c = divmod(rest, len(syllables))
        words.append(syllables[a] + syllables[b] + syllables[c])
    assert len(set(words)) == NUM_KEYS
    return words


class Vocab(WordVocab):
    """Whitespace tokenizer over a fixed word list: the structural words, the keys, the numbers."""

    @classmethod
    def build(cls) -> "Vocab":
        return cls(SPECIAL_WORDS + tuple(_key_words()) + tuple(str(v) for v in range(NUM_VALUES)))

    def encode(self, text: str) -> list[int]:
        return self.ids(text.split())

    def decode(self, ids) -> str:
        return " ".join(self.words_of(ids))

    @property
    def first_key_id(self) -> int:
        return len(SPECIAL_WORDS)

    @property
    def first_value_id(self) -> int:
        return len(SPECIAL_WORDS) + NUM_KEYS

    def token_classes(self) -> np.ndarray:
        """Class per token id: each structural word its own, then all keys, then all numbers."""
        classes = np.arange(len(self.words))
        classes[self.first_key_id:self.first_value_id] = self.first_key_id
        classes[self.first_value_id:] = self.first_key_id + 1
        return classes


def lines_for_length(num_tokens: int, num_questions: int = 1) -> int:
    """How many record lines make a prompt of about num_tokens tokens."""
    # The prompt stops two tokens before the last question's line would end.
    overhead = len(RECORD_HEADER) + len(QUESTION_HEADER) + num_questions * TOKENS_PER_LINE - 2
    return max(num_questions, (num_tokens - overhead) // TOKENS_PER_LINE)


@dataclass
class Prompt:
    ids: np.ndarray  # int64 token ids of the whole sequence
    answer_positions: np.ndarray  # positions whose *next-token* prediction is an answer
    answers: np.ndarray  # the answer token ids (the queried lines' numbers)
    queried_lines: np.ndarray  # which record line each question asks about


def make_prompt(
    vocab: Vocab,
    rng: np.random.Generator,
    num_lines: int,
    num_questions: int = 1,
    num_values: int = NUM_VALUES,
) -> Prompt:
    """One record of num_lines lines and num_questions questions about distinct lines.

    With num_questions == 1 the sequence ends right before the answer (an evaluation
    prompt); otherwise every question but the last is followed by its answer.
    """
    assert num_lines <= NUM_KEYS and num_questions <= num_lines
    keys = vocab.first_key_id + rng.choice(NUM_KEYS, size=num_lines, replace=False)
    values = vocab.first_value_id + rng.integers(0, num_values, size=num_lines)
    line_id, colon, content, is_, nl = (vocab.id(w) for w in ("line", ":", "REGISTER_CONTENT", "is", "<nl>"))

    lines = np.empty((num_lines, TOKENS_PER_LINE), dtype=np.int64)
    lines[:] = [line_id, 0, colon, content, is_, 0, nl]
    lines[:, 1], lines[:, 5] = keys, values
    header = [vocab.id(w) for w in RECORD_HEADER]
    question_header = [vocab.id(w) for w in QUESTION_HEADER]

    queried = rng.choice(num_lines, size=num_questions, replace=False)
    questions = lines[queried].copy()
    answers = questions[:, 5].copy()
    body = np.concatenate([header, lines.ravel(), question_header, questions.ravel()[:-2]])
    # Position of the last question's "is": the prompt ends there; earlier questions sit
    # TOKENS_PER_LINE apart.
    last_is = len(body) - 1
    answer_positions = last_is - TOKENS_PER_LINE * np.arange(num_questions)[::-1]
    return Prompt(body.astype(np.int64), answer_positions, answers, queried)


def make_batch(
    vocab: Vocab,
    seed: int | tuple[int, ...],
    batch_size: int,
    num_tokens: int,
    num_questions: int = 1,
    num_values: int = NUM_VALUES,
) -> list[Prompt]:
    """batch_size prompts of about num_tokens tokens, fully determined by seed."""
    rng = np.random.default_rng(seed)
    num_lines = lines_for_length(num_tokens, num_questions)
    return [make_prompt(vocab, rng, num_lines, num_questions, num_values) for _ in range(batch_size)]
