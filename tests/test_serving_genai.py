"""onnxruntime-genai serving a model folder converted by one `ice-onnx convert` (docs/serving.md).

A tiny random-weight Llama goes through genai's own model builder (GroupQueryAttention
over genai's shared KV buffer); `ice-onnx convert FOLDER -o OUT` then writes the folder
genai loads (the converted decoder, the op library inside, genai_config.json naming it).
Oracle: genai on the builder's folder as it is. Greedy tokens must be identical below the
kNN threshold and on a prompt long enough for kNN, where the kernel's run statistics
(read from the folder's copy of the library, the one genai loaded) must show the
prompt's calls ran kNN and the decoding steps never reached the op.
"""

from __future__ import annotations

import contextlib
import filecmp
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (pip install "
                                                      "'ice-onnx[serve]')")
torch = pytest.importorskip("torch", reason="the genai model builder needs PyTorch")
transformers = pytest.importorskip("transformers", reason="the genai model builder needs transformers")

from cli_support import CLI  # noqa: E402
from ice_onnx.custom_ops.loader import LIBRARY_NAME, library_path  # noqa: E402
from ice_onnx.custom_ops.run_stats import run_stats  # noqa: E402

LAYERS, VOCAB = 2, 256
EXACT_BELOW = 512  # a long prompt below, so kNN is reached at a length the test can afford


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """genai's model builder on a tiny random-weight Llama (and a word-level tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    root = tmp_path_factory.mktemp("genai")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=4096)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(root / "hf")
    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="t0", pad_token="t0", bos_token="t1",
                                         eos_token="t2").save_pretrained(root / "hf")
    run = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(root / "hf"),
                          "-o", str(root / "built"), "-p", "fp32", "-e", "cpu", "-c", str(root / "cache")],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return root / "built"


@pytest.fixture(scope="module")
def converted(built, tmp_path_factory) -> Path:
    """The CLI on the builder's folder: one command, no step by hand."""
    folder = tmp_path_factory.mktemp("converted") / "model"
    run = subprocess.run([*CLI, "convert", str(built), "-o", str(folder), "--top-k", "16",
                          "--exact-below", str(EXACT_BELOW)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert f"{LAYERS} replaced" in run.stdout
    return folder


def test_the_folder_holds_the_library_and_the_builders_other_files(built, converted):
    config = json.loads((converted / "genai_config.json").read_text())
    assert config["model"]["decoder"]["session_options"]["custom_ops_library"] == LIBRARY_NAME
    assert filecmp.cmp(converted / LIBRARY_NAME, library_path(), shallow=False)
    original = json.loads((built / "genai_config.json").read_text())
    original["model"]["decoder"].setdefault("session_options", {})["custom_ops_library"] = LIBRARY_NAME
    assert config == original  # the one entry added, nothing else changed
    decoder = original["model"]["decoder"]["filename"]
    replaced = {"genai_config.json", decoder, *(p.name for p in built.iterdir() if p.name.startswith(decoder + "."))}
    for path in built.rglob("*"):
        if path.is_file() and path.relative_to(built).as_posix() not in replaced:
            assert filecmp.cmp(path, converted / path.relative_to(built), shallow=False), path


def greedy(folder: Path, prompt: np.ndarray, library: str | None = None, steps: int = 8):
    """Greedy tokens after `prompt`, and the kernel's statistics of the prompt and of the
    steps from `library` (None for the original model, which loads none)."""
    def counted():
        return run_stats(library) if library else contextlib.nullcontext()

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + steps)
    generator = og.Generator(model, params)
    with counted() as prompt_stats:
        generator.append_tokens(prompt)
    tokens = []
    with counted() as step_stats:
        while not generator.is_done():
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
    return tokens, prompt_stats, step_stats


def test_genai_needs_the_library_named_in_its_config(converted, tmp_path):
    folder = tmp_path / "unnamed"
    shutil.copytree(converted, folder)
    config = json.loads((folder / "genai_config.json").read_text())
    del config["model"]["decoder"]["session_options"]["custom_ops_library"]
    (folder / "genai_config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="IceKNNAttention|ai.iceformer"):
        og.Model(str(folder))


@pytest.mark.parametrize("length", [100, 1500])
def test_genai_generates_the_originals_tokens(built, converted, length):
    prompt = np.random.default_rng(length).integers(3, VOCAB, length).astype(np.int32)
    expected, _, _ = greedy(built, prompt)
    tokens, prompt_stats, step_stats = greedy(converted, prompt, library=str(converted / LIBRARY_NAME))
    assert tokens == expected
    assert step_stats.calls == 0  # decoding steps keep genai's own GQA on its buffer
    if length < EXACT_BELOW:
        assert prompt_stats.calls == 0  # a short prompt never leaves the original op either
    else:
        assert prompt_stats.knn_calls == LAYERS and prompt_stats.knn_heads > 0
