"""ListOps (Nangia & Bowman 2018) as the Long Range Arena generates it.

A sequence is a nested list of operations over the digits 0-9, for example
``[MAX 2 9 [MIN 4 7 ] 0 ]`` (= 9). Generation rules of LRA:

- operators MAX, MIN, MED (median, rounded down) and SM (sum modulo 10);
- a node below the maximum depth (10) is an operator with probability 0.25, with
  2..10 arguments drawn the same way; otherwise (and always at the maximum depth) it is
  a digit;
- trees are drawn until their token count lies in [min_length, max_length]
  (LRA: 500..2000).

The label is the value of the whole expression (10 classes). Everything is
deterministic in its seed.
"""
from __future__ import annotations

import numpy as np

from ..vocab import WordVocab

OPERATORS = ("MAX", "MIN", "MED", "SM")
MAX_DEPTH = 10
MAX_ARGS = 10
OPERATOR_PROBABILITY = 0.25
LRA_MIN_LENGTH, LRA_MAX_LENGTH = 500, 2000
NUM_CLASSES = 10


def apply(operator: str, arguments: list[int]) -> int:
    if operator == "MAX":
        return max(arguments)
    if operator == "MIN":
        return min(arguments)
    if operator == "MED":
        return int(np.median(arguments))  # an even count averages the middle two, rounded down
    if operator == "SM":
        return sum(arguments) % 10
    raise ValueError(operator)


class _TooLong(Exception):
    pass


def random_tree(rng: np.random.Generator, max_length: float = float("inf")):
    """A digit (int) or (operator, [subtrees]), drawn by the LRA rules.

    Raises _TooLong as soon as the tree exceeds max_length tokens: such a tree would be
    rejected anyway, and finishing it can take thousands of draws.
    """
    length = 0

    def draw(depth: int):
        nonlocal length
        if depth < MAX_DEPTH and rng.random() < OPERATOR_PROBABILITY:
            length += 2
            count = int(rng.integers(2, MAX_ARGS + 1))
            operator = OPERATORS[rng.integers(len(OPERATORS))]
            return operator, [draw(depth + 1) for _ in range(count)]
        length += 1
        if length > max_length:
            raise _TooLong
        return int(rng.integers(10))

    return draw(1)


def tokens(tree) -> list[str]:
    if isinstance(tree, int):
        return [str(tree)]
    operator, arguments = tree
    return ["[" + operator, *(t for argument in arguments for t in tokens(argument)), "]"]


def value(tree) -> int:
    if isinstance(tree, int):
        return tree
    operator, arguments = tree
    return apply(operator, [value(a) for a in arguments])


def tree_length(tree) -> int:
    return 1 if isinstance(tree, int) else 2 + sum(tree_length(a) for a in tree[1])


class Vocab(WordVocab):
    """<pad>, <cls>, the operators, the closing bracket and the ten digits."""

    @classmethod
    def build(cls) -> "Vocab":
        return cls(("<pad>", "<cls>", *("[" + op for op in OPERATORS), "]", *map(str, range(10))))

    def encode(self, words: list[str]) -> list[int]:
        return self.ids(words)

    def decode(self, ids) -> list[str]:
        return self.words_of(ids)


def sample(rng: np.random.Generator, min_length: int, max_length: int):
    """One tree whose token count lies in [min_length, max_length] (rejection sampling)."""
    while True:
        try:
            tree = random_tree(rng, max_length)
        except _TooLong:
            continue
        if min_length <= tree_length(tree) <= max_length:
            return tree


def make_batch(
    vocab: Vocab, seed, batch_size: int, min_length: int = LRA_MIN_LENGTH, max_length: int = LRA_MAX_LENGTH
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, attention_mask, labels): `<cls>` + the expression, right-padded to the longest."""
    rng = np.random.default_rng(seed)
    trees = [sample(rng, min_length, max_length) for _ in range(batch_size)]
    sequences = [vocab.encode(["<cls>", *tokens(t)]) for t in trees]
    width = max(map(len, sequences))
    ids = np.zeros((batch_size, width), dtype=np.int64)
    mask = np.zeros((batch_size, width), dtype=np.int64)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = sequence
        mask[row, : len(sequence)] = 1
    return ids, mask, np.array([value(t) for t in trees], dtype=np.int64)
