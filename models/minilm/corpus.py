"""Real English passages that exist on any machine with Python (and on Debian):
the Python documentation topics (`pydoc_data.topics`), long standard-library module
docstrings and the license texts in /usr/share/common-licenses.

Each document is tokenized with the model's tokenizer and cut into passages of exactly
`tokens` tokens ([CLS] … [SEP], no padding). Passages are taken round-robin over the
documents (first chunk of every document, then the second, …) so that a small corpus
still covers many documents. Deterministic: the same arguments give the same passages.

    python -m models.minilm.corpus --passages 8 --tokens 128   # previews
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import itertools
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LICENSES_DIR = Path("/usr/share/common-licenses")
# Pure-Python standard-library modules with long docstrings (absent ones are skipped).
STDLIB_MODULES = ("argparse", "asyncio", "collections", "contextlib", "csv", "dataclasses",
                  "decimal", "doctest", "email", "enum", "functools", "heapq", "inspect",
                  "json", "logging", "optparse", "pickle", "pickletools", "pydoc", "re",
                  "shlex", "string", "subprocess", "tarfile", "threading", "typing", "unittest",
                  "urllib.parse", "uuid", "zipfile")
MIN_DOCSTRING_CHARS = 1500


@dataclass(frozen=True)
class Document:
    source: str  # "pydoc", "docstring" or "license"
    name: str
    text: str


@dataclass
class Corpus:
    input_ids: np.ndarray  # int64 [N, tokens]
    attention_mask: np.ndarray  # int64 [N, tokens], all ones
    token_type_ids: np.ndarray  # int64 [N, tokens], all zeros
    labels: list[str]  # "<source>:<document>#<chunk>" per passage
    previews: list[str]  # the first words of each passage

    def feeds(self, rows=slice(None)) -> dict[str, np.ndarray]:
        return {"input_ids": self.input_ids[rows], "attention_mask": self.attention_mask[rows],
                "token_type_ids": self.token_type_ids[rows]}


def documents() -> list[Document]:
    """Every source document, in a fixed order, exact duplicates removed."""
    import pydoc_data.topics

    docs = [Document("pydoc", name, text) for name, text in sorted(pydoc_data.topics.topics.items())]
    for name in STDLIB_MODULES:
        try:
            text = importlib.import_module(name).__doc__ or ""
        except ImportError:
            continue
        if len(text) >= MIN_DOCSTRING_CHARS:
            docs.append(Document("docstring", name, text))
    if LICENSES_DIR.is_dir():
        docs += [Document("license", path.name, path.read_text(errors="replace"))
                 for path in sorted(LICENSES_DIR.iterdir()) if path.is_file()]
    seen, unique = set(), []
    for doc in docs:  # GPL is GPL-3, LGPL is LGPL-3, GFDL is GFDL-1.3: keep the first
        digest = hashlib.sha256(doc.text.encode()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            unique.append(doc)
    return unique


def build(tokenizer, passages: int, tokens: int) -> Corpus:
    """`passages` passages of exactly `tokens` tokens each."""
    if tokens < 3:
        raise ValueError("a passage needs at least 3 tokens ([CLS], text, [SEP])")
    body = tokens - 2
    chunked = []
    for doc in documents():
        ids = tokenizer(_normalise(doc.text), add_special_tokens=False, verbose=False)["input_ids"]
        chunks = [ids[i:i + body] for i in range(0, len(ids) - body + 1, body)]
        chunked.append([(f"{doc.source}:{doc.name}#{n}", chunk) for n, chunk in enumerate(chunks)])
    picked = [item for item in itertools.chain.from_iterable(itertools.zip_longest(*chunked))
              if item is not None][:passages]
    if len(picked) < passages:
        raise ValueError(f"only {len(picked)} passages of {tokens} tokens exist offline, "
                         f"{passages} were asked for")
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    input_ids = np.array([[cls, *chunk, sep] for _, chunk in picked], dtype=np.int64)
    previews = [" ".join(tokenizer.decode(chunk[:24]).split()[:12]) for _, chunk in picked]
    return Corpus(input_ids=input_ids, attention_mask=np.ones_like(input_ids),
                  token_type_ids=np.zeros_like(input_ids), labels=[label for label, _ in picked],
                  previews=previews)


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def main(argv=None) -> None:
    from .export import load_tokenizer

    parser = argparse.ArgumentParser(description="Print the passages the MiniLM evaluation uses.")
    parser.add_argument("--passages", type=int, default=96)
    parser.add_argument("--tokens", type=int, default=512)
    args = parser.parse_args(argv)
    corpus = build(load_tokenizer(), args.passages, args.tokens)
    for label, preview in zip(corpus.labels, corpus.previews):
        print(f"{label:40s} {preview}")


if __name__ == "__main__":
    main()
