"""The word-list vocabulary of the trained recipes: token ids are positions in a fixed
word list, which the recipe's task builds (`build`) and ships as `vocab.json` beside the
module that defines it."""

from __future__ import annotations

import functools
import json
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class WordVocab:
    """A subclass builds its word list in `build()`."""

    words: tuple[str, ...]

    @classmethod
    def build(cls) -> "WordVocab":
        raise NotImplementedError

    @classmethod
    def shipped_file(cls) -> Path:
        return Path(sys.modules[cls.__module__].__file__).with_name("vocab.json")

    @classmethod
    def load(cls, path: Path | None = None) -> "WordVocab":
        return cls(tuple(json.loads(Path(path or cls.shipped_file()).read_text())["words"]))

    def save(self, path: Path | None = None) -> None:
        Path(path or self.shipped_file()).write_text(json.dumps({"words": list(self.words)}, indent=0) + "\n")

    def __len__(self) -> int:
        return len(self.words)

    @functools.cached_property
    def _index(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.words)}

    def id(self, word: str) -> int:
        return self._index[word]

    def ids(self, words) -> list[int]:
        return [self._index[w] for w in words]

    def words_of(self, ids) -> list[str]:
        return [self.words[int(i)] for i in ids]
