"""What a causal LM is fed: a text's tokens, and the graph's inputs given roles (tokens, mask,
positions, token types, empty past key/values) so that any exporter's model can be run on
them, plus where its [batch, seq, vocab] logits come out."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from ice_onnx.errors import first_line

PAST_AXIS = 2  # [batch, heads, past, head_dim] caches


# ---- the tokenizer and the texts --------------------------------------------------------


def load_tokenizer(path: Path):
    """A `tokenizers.Tokenizer` from a tokenizer.json file or a folder holding one (no truncation, no padding)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise RuntimeError("the causal-lm task needs the Python module 'tokenizers': "
                           "pip install tokenizers (or 'ice-onnx[eval]')") from None
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json there (give the file or a Hugging Face tokenizer folder "
                                "holding one)" if path.is_dir() else f"{path}: no such tokenizer file")
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as exc:  # noqa: BLE001 - the library raises plain Exceptions
        raise ValueError(f"{file}: not a tokenizers JSON file ({first_line(exc)})") from None
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def tokenize(tokenizer, path: Path, special_tokens: bool = True) -> np.ndarray:
    """The token ids of a UTF-8 text file (with the tokenizer's special tokens, e.g. BOS, if asked)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such text file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read it as UTF-8 text ({first_line(exc)})") from None
    return np.asarray(tokenizer.encode(text, add_special_tokens=special_tokens).ids, dtype=np.int64)


# ---- the model's inputs and logits ------------------------------------------------------


@dataclass
class Interface:
    """How to feed a causal LM `L` tokens and where its logits come out."""

    roles: dict[str, str]  # graph input -> tokens | attention_mask | position_ids | token_type_ids | past
    infos: dict[str, onnx.ValueInfoProto]
    logits: str
    vocab: int | None  # the logits' static last dimension

    @property
    def tokens(self) -> str:
        return next(name for name, role in self.roles.items() if role == "tokens")

    def feeds(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        """Batch 1: the tokens, an all-ones mask, positions 0..L-1, zero token types, empty pasts."""
        length = len(tokens)
        feeds = {}
        for name, role in self.roles.items():
            tensor = self.infos[name].type.tensor_type
            dtype = helper.tensor_dtype_to_np_dtype(tensor.elem_type)
            if role == "past":
                shape = [0 if axis == PAST_AXIS else (dim.dim_value or 1) for axis, dim in enumerate(tensor.shape.dim)]
                feeds[name] = np.zeros(shape, dtype=dtype)
                continue
            values = {"tokens": tokens, "attention_mask": np.ones(length), "position_ids": np.arange(length),
                      "token_type_ids": np.zeros(length)}[role]
            feeds[name] = np.asarray(values).astype(dtype)[None, :]
        return feeds


def detect_interface(model: onnx.ModelProto, label: str = "the model") -> Interface:
    """The roles of the graph inputs (by name and type) and the logits output, or a ValueError."""
    initializers = {init.name for init in model.graph.initializer}
    infos = {info.name: info for info in model.graph.input if info.name not in initializers}
    roles = {name: _input_role(info, label) for name, info in infos.items()}
    token_inputs = [name for name, role in roles.items() if role == "tokens"]
    if len(token_inputs) != 1:
        raise ValueError(f"{label}: needs exactly one token-id input such as input_ids, found "
                         f"{token_inputs or 'none'} among its inputs {list(infos)}")
    outputs = list(model.graph.output)
    named = [out for out in outputs if "logit" in out.name.lower()]
    if not named or len(named[0].type.tensor_type.shape.dim) != 3:
        raise ValueError(f"{label}: no [batch, seq, vocab] logits output (outputs: "
                         f"{', '.join(out.name for out in outputs)}); the causal-lm task needs next-token logits")
    vocab = named[0].type.tensor_type.shape.dim[2].dim_value or None
    return Interface(roles, infos, named[0].name, vocab)


def _input_role(info: onnx.ValueInfoProto, label: str) -> str:
    name = info.name.lower()
    tensor = info.type.tensor_type
    integer = np.issubdtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type), np.integer)
    rank = len(tensor.shape.dim)
    if "past" in name or "cache" in name:
        dims = tensor.shape.dim
        if rank != 4 or any(not dim.dim_value for axis, dim in enumerate(dims) if axis not in (0, PAST_AXIS)):
            raise ValueError(f"{label}: cannot tell the shape of an empty {info.name!r} (wanted [batch, heads, past, "
                             "head_dim] with fixed heads and head_dim); export the model without past inputs")
        return "past"
    role = ("attention_mask" if "mask" in name else "position_ids" if "position" in name
            else "token_type_ids" if "type" in name and integer
            else "tokens" if integer and ("ids" in name or "token" in name) else None)
    if role is None or rank != 2:
        raise ValueError(f"{label}: cannot feed input {info.name!r}: the causal-lm task feeds input_ids, "
                         "attention_mask, position_ids, token_type_ids ([batch, seq]) and empty past key/values")
    return role
