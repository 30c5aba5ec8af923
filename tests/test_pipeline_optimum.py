"""optimum's ORTModelForCausalLM on converted with-past exports (docs/serving.md).

Tiny random-weight models go through optimum's own exporter (task text-generation-with-past):
a Llama, and a Qwen2 whose every layer has a sliding window of 64 keys that the prompt
passes. `ice-onnx convert` converts each model.onnx; the folder's other files are copied.
Oracle: optimum on the unconverted export. Greedy tokens must be identical below the kNN
threshold and, from a model converted always exact, above it; there the kNN conversion must
have run the prompt through kNN (the kernel's run statistics), its decoding steps exact.

optimum runs in a child process: its newest release needs transformers < 4.58, which
`make optimum` installs into a folder of its own (requirements-optimum.txt) that the child
puts first on its path, beside the venv's torch, onnxruntime and ice_onnx.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from cli_support import CLI

LAYERS, VOCAB, NEW_TOKENS, WINDOW = 2, 256, 20, 64
EXACT_BELOW = 512  # the kNN conversion's threshold, so kNN is reached at a length the test can afford
SHORT, LONG, PAST_WINDOW = 100, 1500, 300  # prompt lengths: below EXACT_BELOW, above it, past WINDOW
# The venv's optimum folder (`make optimum`); ICE_ONNX_OPTIMUM_PATH names another.
OPTIMUM_PATH = Path(os.environ.get("ICE_ONNX_OPTIMUM_PATH", Path(sys.prefix) / "optimum"))


def optimum_env() -> dict[str, str]:
    """The environment a child needs to import optimum.onnxruntime: this one, with the
    optimum folder first on PYTHONPATH when there is one."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if OPTIMUM_PATH.is_dir():
        env["PYTHONPATH"] = os.pathsep.join([str(OPTIMUM_PATH), *filter(None, [env.get("PYTHONPATH")])])
    return env


def in_optimum(command: str, *args: str, timeout: float = 300) -> dict:
    """This file's `command` run by a child that has optimum; its JSON answer."""
    run = subprocess.run([sys.executable, __file__, command, *args], capture_output=True, text=True,
                         env=optimum_env(), timeout=timeout)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> Path:
    probe = subprocess.run([sys.executable, "-c", "import optimum.onnxruntime"], capture_output=True, text=True,
                           env=optimum_env())
    if probe.returncode != 0:
        pytest.skip(f"optimum is not installed (make optimum; {OPTIMUM_PATH} holds none): "
                    f"{probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else ''}")
    root = tmp_path_factory.mktemp("optimum")
    in_optimum("export", str(root))
    return root


def convert(export: Path, out: Path, *options: str) -> subprocess.Popen:
    """`ice-onnx convert` on the export's model.onnx into `out`, beside copies of its other files."""
    out.mkdir()
    for path in export.iterdir():
        if path.name != "model.onnx":
            shutil.copy(path, out / path.name)
    return subprocess.Popen([*CLI, "convert", str(export / "model.onnx"), "-o", str(out / "model.onnx"), *options],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def folders(exports) -> dict[str, Path]:
    """The unconverted exports and their conversions, converted two at a time."""
    plan = {"llama-knn": ("llama", "--top-k", "16", "--exact-below", str(EXACT_BELOW)),
            "llama-exact": ("llama", "--exact-below", "2147483647"),
            "qwen2-converted": ("qwen2",)}
    runs = {name: convert(exports / arch, exports / name, *options) for name, (arch, *options) in plan.items()}
    for name, run in runs.items():
        stdout, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr
        assert f"{LAYERS} replaced" in stdout, stdout
    return {"llama": exports / "llama", "qwen2": exports / "qwen2", **{name: exports / name for name in plan}}


@pytest.fixture(scope="module")
def generated(folders) -> dict:
    """Every run the tests compare, done by one child: (folder, prompt length) -> tokens and
    the kernel's statistics of the whole generation."""
    runs = [("llama", SHORT), ("llama-knn", SHORT), ("llama", LONG), ("llama-knn", LONG), ("llama-exact", LONG),
            ("qwen2", PAST_WINDOW), ("qwen2-converted", PAST_WINDOW)]
    plan = [{"folder": str(folders[name]), "library": name not in ("llama", "qwen2"), "length": length}
            for name, length in runs]
    answers = in_optimum("generate", json.dumps(plan))
    return {run: answer for run, answer in zip(runs, answers)}


def test_below_the_threshold_the_tokens_are_the_originals(generated):
    assert len(generated["llama", SHORT]["tokens"]) == NEW_TOKENS
    assert generated["llama-knn", SHORT]["tokens"] == generated["llama", SHORT]["tokens"]
    assert generated["llama-knn", SHORT]["knn_calls"] == 0
    assert generated["llama-knn", SHORT]["exact_calls"] == NEW_TOKENS * LAYERS  # the op ran, one call a layer a pass


def test_above_the_threshold_the_prompt_runs_knn_and_each_step_exact(generated):
    stats = generated["llama-knn", LONG]
    assert stats["knn_calls"] == LAYERS  # the prompt's one pass
    assert stats["exact_calls"] == (NEW_TOKENS - 1) * LAYERS  # one new token over the cache: exact
    assert len(stats["tokens"]) == NEW_TOKENS


def test_above_the_threshold_an_always_exact_conversion_gives_the_originals_tokens(generated):
    assert generated["llama-exact", LONG]["tokens"] == generated["llama", LONG]["tokens"]
    assert generated["llama-exact", LONG]["knn_calls"] == 0
    assert generated["llama-exact", LONG]["exact_calls"] == NEW_TOKENS * LAYERS


def test_a_sliding_window_is_kept_past_the_window(folders, generated):
    model = onnx.load(folders["qwen2-converted"] / "model.onnx")
    windows = [next((a.i for a in node.attribute if a.name == "sliding_window"), 0)
               for node in model.graph.node if node.op_type == "IceKNNAttention"]
    assert windows == [WINDOW] * LAYERS
    assert generated["qwen2-converted", PAST_WINDOW]["tokens"] == generated["qwen2", PAST_WINDOW]["tokens"]
    assert generated["qwen2-converted", PAST_WINDOW]["exact_calls"] == NEW_TOKENS * LAYERS


def test_optimum_needs_the_library_in_its_session_options(folders):
    answer = in_optimum("load-without-library", str(folders["llama-knn"]))
    assert "IceKNNAttention" in answer["error"] or "ai.iceformer" in answer["error"]


# What the child runs, with optimum importable.

def export_models(root: Path) -> dict:
    """Random-weight Llama and sliding-window Qwen2, saved and exported by optimum to root/<arch>."""
    import torch
    import transformers
    from optimum.exporters.onnx import main_export

    shape = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    models = {"llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape)),
              "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
                  **shape, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=0))}
    for arch, build in models.items():
        torch.manual_seed(0)
        build().eval().save_pretrained(root / f"{arch}-hf")
        main_export(str(root / f"{arch}-hf"), output=root / arch, task="text-generation-with-past",
                    do_validation=False)
    return {"exported": sorted(models)}


def generate(plan: list[dict]) -> list[dict]:
    """Greedy NEW_TOKENS tokens after a seeded random prompt, per planned run."""
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    import ice_onnx
    from ice_onnx.custom_ops.run_stats import run_stats

    answers = []
    for run in plan:
        options = ice_onnx.session_options() if run["library"] else ort.SessionOptions()
        model = ORTModelForCausalLM.from_pretrained(run["folder"], session_options=options)
        prompt = torch.from_numpy(np.random.default_rng(run["length"]).integers(3, VOCAB, (1, run["length"])))
        with run_stats() as stats:
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                 max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0)
        answers.append({"tokens": out[0, run["length"]:].tolist(), "knn_calls": stats.knn_calls,
                        "exact_calls": stats.exact_calls})
    return answers


def load_without_library(folder: str) -> dict:
    from optimum.onnxruntime import ORTModelForCausalLM

    try:
        ORTModelForCausalLM.from_pretrained(folder)
    except Exception as error:  # ORT's failure to resolve the op, whatever optimum wraps it in
        return {"error": str(error)}
    return {"error": ""}


if __name__ == "__main__":
    command, *arguments = sys.argv[1:]
    if command == "export":
        answer = export_models(Path(arguments[0]))
    elif command == "generate":
        answer = generate(json.loads(arguments[0]))
    else:
        answer = load_without_library(arguments[0])
    print(json.dumps(answer))
