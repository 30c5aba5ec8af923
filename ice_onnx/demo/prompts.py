"""The SmolLM2 demo's prompts: a long real document with a few short facts inserted at
different depths, one question for each, in SmolLM2's own chat template (the HF folder's
`chat_template.jinja`, rendered with Jinja2 as transformers renders it)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ice_onnx.errors import EXIT_USAGE, IceError

INSTRUCTION = "Answer the question from the document above in a few words."
MIN_DOCUMENT_TOKENS = 32


@dataclass(frozen=True)
class Fact:
    sentence: str  # inserted into the document as a paragraph of its own
    question: str
    answer: str  # what a right answer contains
    depth: float  # where in the document, 0 (start) to 1 (end)


FACTS = (
    Fact("The secret code for the server room is 4817.", "What is the secret code for the server room?",
         "4817", 0.1),
    Fact("The release party is held in the city of Lisbon.", "In which city is the release party held?",
         "Lisbon", 0.5),
    Fact("The maintainer of this manual owns a cat named Pickles.", "What is the name of the maintainer's cat?",
         "Pickles", 0.3),
    Fact("The backup tapes are kept in a blue cabinet.", "What colour is the cabinet that holds the backup tapes?",
         "blue", 0.7),
    Fact("The project's mascot is an orange octopus called Otto.", "What is the name of the project's mascot?",
         "Otto", 0.9),
)


@dataclass
class Prompt:
    fact: Fact
    ids: np.ndarray  # int64 token ids of the whole chat prompt


class Chat:
    """SmolLM2's tokenizer and chat template, from the built HF folder."""

    def __init__(self, hf: Path):
        from ice_onnx.evaluation.lm_inputs import load_tokenizer

        try:
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise IceError("the SmolLM2 demo renders the chat template with Jinja2: pip install jinja2") from None
        try:
            self.tokenizer = load_tokenizer(hf)
        except (RuntimeError, OSError, ValueError) as exc:
            raise IceError(str(exc)) from None
        config = json.loads((hf / "tokenizer_config.json").read_text(encoding="utf-8"))
        file = hf / "chat_template.jinja"
        source = file.read_text(encoding="utf-8") if file.is_file() else config.get("chat_template")
        if not source:
            raise IceError(f"{hf}: no chat template (chat_template.jinja or tokenizer_config.json)")
        # transformers' settings for chat templates
        self.template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(source)
        self.end_of_turn = self.tokenizer.token_to_id(config["eos_token"])

    def render(self, user: str) -> str:
        """The prompt for one user message, up to the assistant's turn."""
        return self.template.render(messages=[{"role": "user", "content": user}], add_generation_prompt=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def answer(self, tokens: list[int]) -> str:
        """The text of generated tokens up to the end of the turn."""
        if self.end_of_turn in tokens:
            tokens = tokens[:tokens.index(self.end_of_turn)]
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()


def user_message(document: str, question: str) -> str:
    return f"{document}\n\n{INSTRUCTION}\nQuestion: {question}"


def _excerpt(chat: Chat, body: str, budget: int) -> str:
    """The start of `body` cut at a word, about `budget` tokens."""
    encoding = chat.tokenizer.encode(body[:budget * 16], add_special_tokens=False)
    if len(encoding.ids) <= budget:
        raise IceError(f"the text has only {len(encoding.ids)} tokens, fewer than the {budget} asked", EXIT_USAGE)
    cut = encoding.offsets[budget][0]
    return body[:max(body.rfind(" ", 0, cut), body.rfind("\n", 0, cut), 1)].rstrip()


def _with_facts(excerpt: str, asked: list[Fact]) -> str:
    """`excerpt` with each fact a paragraph of its own, at its depth (by lines)."""
    lines = excerpt.split("\n")
    for fact in sorted(asked, key=lambda fact: -fact.depth):
        lines.insert(round(fact.depth * len(lines)), f"\n{fact.sentence}\n")
    return "\n".join(lines)


def prompts(chat: Chat, body: str, tokens: int, questions: int) -> tuple[list[Prompt], int]:
    """One prompt per asked fact (the first `questions` of FACTS), all over the same document:
    the start of `body` with those facts inserted, as long as makes the shortest prompt about
    `tokens` tokens; and how many tokens of `body` the document took."""
    asked = list(FACTS[:questions])
    overhead = max(len(chat.encode(chat.render(user_message("", fact.question)))) for fact in asked)
    budget = tokens - overhead - sum(len(chat.encode(f"\n{fact.sentence}\n\n")) for fact in asked)
    if budget < MIN_DOCUMENT_TOKENS:
        raise IceError(f"--tokens {tokens} leaves no room for a document (at least "
                       f"{tokens - budget + MIN_DOCUMENT_TOKENS})", EXIT_USAGE)
    for _ in range(4):  # the cut and the joins shift the count by a few tokens: correct the budget
        excerpt = _excerpt(chat, body, budget)
        text = _with_facts(excerpt, asked)
        result = [Prompt(fact, np.asarray(chat.encode(chat.render(user_message(text, fact.question))), np.int64))
                  for fact in asked]
        short = tokens - min(len(prompt.ids) for prompt in result)
        if short <= 0:
            break
        budget += short
    return result, len(chat.encode(excerpt))
