"""SmolLM2's two ONNX files: their inputs and outputs, and their export from PyTorch.

- the scorer (prefill): input_ids [1, S] -> logits [1, S, VOCAB], causal over the S tokens;
- with past: input_ids [1, S], attention_mask [1, P + S], position_ids [1, S] and
  past_key_values.{0..LAYERS-1}.{key,value} [1, KV_HEADS, P, HEAD_DIM] -> logits and
  present.{...}.{key,value} [1, KV_HEADS, P + S, HEAD_DIM]. P = 0 is prompt processing,
  S = 1 a decoding step.

Both are exported with torch.onnx's dynamo exporter (TorchScript fails on transformers
5.x), eager attention, traced on a short example with dynamic lengths.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 30, 9, 3, 64, 49152
MAX_TOKENS = 1 << 17  # the exports' length bound (the model learned 8192 positions; more is for timing)


def past_names(kind: str) -> list[str]:
    """past_key_values.N.key/value (kind "past") or present.N.key/value (kind "present")."""
    prefix = "past_key_values" if kind == "past" else "present"
    return [f"{prefix}.{layer}.{part}" for layer in range(LAYERS) for part in ("key", "value")]


def _scorer(model):
    import torch

    class Scorer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            return self.model(input_ids=input_ids, use_cache=False).logits

    return Scorer().eval()


def _with_past(model):
    import torch
    from transformers import DynamicCache

    class WithPast(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(LAYERS)])
            result = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                cache=cache, use_cache=True)
            outputs = [result.logits]
            for layer in result.cache.layers:
                outputs += [layer.keys, layer.values]
            return tuple(outputs)

    return WithPast().eval()


def _save(program, path: Path) -> None:
    program.optimize()
    program.save(str(path), external_data=False)


def export_prefill(model, path: Path, example_ids: np.ndarray) -> None:
    import torch

    sequence = torch.export.Dim("sequence", min=2, max=MAX_TOKENS)
    with torch.no_grad():
        program = torch.onnx.export(_scorer(model), (torch.from_numpy(example_ids[None]),), dynamo=True,
                                    input_names=["input_ids"], output_names=["logits"],
                                    dynamic_shapes=({1: sequence},), verbose=False)
    _save(program, path)


def with_past_feeds(ids: np.ndarray, past: list[np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """The with-past model's inputs for new tokens `ids` after the cache `past` (60 arrays
    [1, 3, P, 64] in past_names order; None: empty, prompt processing)."""
    if past is None:
        past = [np.zeros((1, KV_HEADS, 0, HEAD_DIM), np.float32)] * (2 * LAYERS)
    offset = past[0].shape[2]
    feeds = {"input_ids": ids[None].astype(np.int64),
             "attention_mask": np.ones((1, offset + len(ids)), np.int64),
             "position_ids": np.arange(offset, offset + len(ids), dtype=np.int64)[None]}
    feeds.update(zip(past_names("past"), past))
    return feeds


def export_with_past(model, path: Path, example_ids: np.ndarray) -> None:
    import torch

    # Distinct example sizes, so that the exporter ties no two lengths together.
    past_len = len(example_ids) // 2 + 1
    with torch.no_grad():
        past = [torch.randn(1, KV_HEADS, past_len, HEAD_DIM) for _ in range(2 * LAYERS)]
        feeds = with_past_feeds(example_ids[past_len:], [p.numpy() for p in past])
    args = tuple(torch.from_numpy(value) for value in feeds.values())
    sequence = torch.export.Dim("sequence", max=MAX_TOKENS)
    past = torch.export.Dim("past_sequence", max=MAX_TOKENS)
    total = torch.export.Dim.DYNAMIC  # the mask's length, past_sequence + sequence
    shapes = ({1: sequence}, {1: total}, {1: sequence}, tuple({2: past} for _ in range(2 * LAYERS)))
    with torch.no_grad():
        program = torch.onnx.export(_with_past(model), args, dynamo=True, input_names=list(feeds),
                                    output_names=["logits", *past_names("present")],
                                    dynamic_shapes=shapes, verbose=False)
    _save(program, path)
