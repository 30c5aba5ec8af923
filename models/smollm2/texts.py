"""Long real English texts of different kinds, for SmolLM2 at long context.

Every text is extracted at run time from files of this machine (nothing large is
committed); where the files come from a Debian package, that package is named and
`apt-get install -y <package>` brings it (the list: apt-packages.txt beside this file).

| name | kind | split | source (Debian package) |
|---|---|---|---|
| licenses | legal | tune | /usr/share/common-licenses, every licence (base-files) |
| python-docs | technical reference | tune | the running Python's `pydoc_data.topics` (the interpreter itself) |
| kjv-torah | narrative | tune | King James Bible, Genesis to Deuteronomy (bible-kjv) |
| bash-manual | manual page | held out | `man bash` (bash, man-db, groff-base) |
| jargon | lexicon and folklore essays | held out | The Jargon File 4.4.7 (jargon-text) |
| kjv-gospels | narrative | held out | King James Bible, Matthew to Acts (bible-kjv) |

`TUNE` texts may be used for tuning and calibration (choosing top_k, plans, thresholds);
`HELD_OUT` texts are for evaluation only: nothing may be fitted on them. Each text is
well over 32K SmolLM2 tokens (`python -m models.smollm2.texts` prints the counts).

    python -m models.smollm2.texts                     # names, kinds, splits, sizes
    python -m models.smollm2.texts --show jargon      # print one text
"""

from __future__ import annotations

import argparse
import functools
import gzip
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

LICENSES_DIR = Path("/usr/share/common-licenses")
JARGON_FILE = Path("/usr/share/doc/jargon-text/jargon.txt.gz")
BIBLE = "bible"  # the bible-kjv program: decodes its compressed text

TUNE, HELD_OUT = "tune", "held-out"


def _missing(package: str, what: str) -> RuntimeError:
    return RuntimeError(f"{what} is missing: apt-get install -y {package}")


def _licenses() -> str:
    if not LICENSES_DIR.is_dir():
        raise _missing("base-files", str(LICENSES_DIR))
    parts = []
    seen = set()
    for path in sorted(LICENSES_DIR.iterdir()):
        if path.is_symlink() or not path.is_file():
            continue  # GPL -> GPL-3 and the like: each licence once
        body = path.read_text(encoding="utf-8", errors="replace").strip()
        if body not in seen:
            seen.add(body)
            parts.append(body)
    return "\n\n\n".join(parts) + "\n"


def _python_docs() -> str:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return "\n\n".join(topics[name].strip() for name in sorted(topics)) + "\n"


def _bible(spec: str) -> str:
    """Chapters as paragraphs under a "Book N" heading, verse numbers dropped."""
    if shutil.which(BIBLE) is None:
        raise _missing("bible-kjv", "the `bible` program")
    raw = subprocess.run([BIBLE, "-l100000", spec], capture_output=True, text=True, check=True).stdout
    chapters, verses = [], []
    heading = None
    for line in raw.splitlines():
        verse = re.match(r"\s+\d+\s+(.*)", line)
        if verse:
            verses.append(verse.group(1).strip())
        elif line.strip():
            if heading is not None:
                chapters.append(f"{heading}\n\n{' '.join(verses)}")
            heading, verses = line.strip(), []
    if heading is not None:
        chapters.append(f"{heading}\n\n{' '.join(verses)}")
    if not chapters:
        raise RuntimeError(f"`bible {spec}` printed no verse")
    return "\n\n".join(chapters) + "\n"


def _bash_manual() -> str:
    if shutil.which("man") is None:
        raise _missing("man-db", "the `man` program")
    env = {**os.environ, "MANWIDTH": "100000", "MAN_KEEP_FORMATTING": "", "LC_ALL": "C.UTF-8"}
    run = subprocess.run(["man", "--no-hyphenation", "--no-justification", "-P", "cat", "bash"],
                         capture_output=True, text=True, env=env)
    if run.returncode != 0 or len(run.stdout) < 100_000:
        raise _missing("bash man-db groff-base", "the bash manual page")
    lines = [line.rstrip() for line in run.stdout.splitlines()]
    # The running header and footer lines (BASH(1) ... BASH(1), GNU Bash 5.x ... date).
    lines = [line for line in lines if not re.match(r"(BASH\(1\)|GNU Bash)\s", line)]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def _jargon() -> str:
    """The Jargon File without its tables of contents and glossary index: every paragraph
    that is prose (60 characters or more) or an entry's headword line (":term: ...")."""
    if not JARGON_FILE.is_file():
        raise _missing("jargon-text", str(JARGON_FILE))
    with gzip.open(JARGON_FILE, "rt", encoding="utf-8") as handle:
        raw = handle.read()
    start = raw.find("Welcome to the Jargon File", raw.find("Welcome to the Jargon File") + 1)
    kept = []
    for block in re.split(r"\n\s*\n", raw[max(start, 0):]):
        lines = [line.strip() for line in block.strip().splitlines()]
        paragraph = "\n".join(line for line in lines if line)
        if len(paragraph) >= 60 or paragraph.startswith(":"):
            kept.append(paragraph)
    return "\n\n".join(kept) + "\n"


@dataclass(frozen=True)
class Text:
    name: str
    kind: str
    split: str  # TUNE or HELD_OUT
    packages: tuple[str, ...]  # the Debian packages it comes from (apt-packages.txt)
    source: str
    load: Callable[[], str]


TEXTS = {text.name: text for text in [
    Text("licenses", "legal", TUNE, ("base-files",), "/usr/share/common-licenses, every licence once",
         _licenses),
    Text("python-docs", "technical reference", TUNE, (), "pydoc_data.topics of the running Python",
         _python_docs),
    Text("kjv-torah", "narrative", TUNE, ("bible-kjv",), "King James Bible, Genesis to Deuteronomy",
         functools.partial(_bible, "gen1:1-deu34:12")),
    Text("bash-manual", "manual page", HELD_OUT, ("bash", "man-db", "groff-base"), "man bash", _bash_manual),
    Text("jargon", "lexicon and folklore essays", HELD_OUT, ("jargon-text",), "The Jargon File 4.4.7",
         _jargon),
    Text("kjv-gospels", "narrative", HELD_OUT, ("bible-kjv",), "King James Bible, Matthew to Acts",
         functools.partial(_bible, "mat1:1-act28:31")),
]}


def names(split: str | None = None) -> list[str]:
    """The texts' names, all or those of one split (TUNE or HELD_OUT)."""
    if split not in (None, TUNE, HELD_OUT):
        raise ValueError(f"split must be {TUNE!r} or {HELD_OUT!r}, not {split!r}")
    return [name for name, text in TEXTS.items() if split is None or text.split == split]


@functools.lru_cache(maxsize=None)
def text(name: str) -> str:
    """The whole text called `name` (KeyError for an unknown name)."""
    if name not in TEXTS:
        raise KeyError(f"unknown text {name!r}; known: {', '.join(TEXTS)}")
    return TEXTS[name].load()


def token_ids(name: str, tokenizer, count: int):
    """The first `count` token ids (int64 numpy array) of text `name` under `tokenizer`
    (a transformers tokenizer); ValueError when the text is shorter."""
    import numpy as np

    ids = tokenizer(text(name), add_special_tokens=False)["input_ids"]
    if len(ids) < count:
        raise ValueError(f"text {name!r} has {len(ids)} tokens, fewer than {count}")
    return np.asarray(ids[:count], dtype=np.int64)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--show", metavar="NAME", help="print the text NAME and stop")
    parser.add_argument("--no-tokens", action="store_true", help="skip the token counts (no tokenizer needed)")
    args = parser.parse_args(argv)
    if args.show:
        print(text(args.show), end="")
        return
    tokenizer = None
    if not args.no_tokens:
        from .build import load_tokenizer

        tokenizer = load_tokenizer()
    for name, entry in TEXTS.items():
        body = text(name)
        tokens = len(tokenizer(body, add_special_tokens=False)["input_ids"]) if tokenizer else None
        print(f"{name:12} {entry.split:9} {entry.kind:28} {len(body):>9,} chars"
              + (f" {tokens:>9,} tokens" if tokens is not None else "")
              + f"  [{', '.join(entry.packages) or 'python'}] {entry.source}")


if __name__ == "__main__":
    main()
