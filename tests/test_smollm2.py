"""SmolLM2-135M-Instruct, the real LLM built by `make smollm2` (models/smollm2/), at short
context on a held-out text: the ONNX exports agree with PyTorch, `ice-onnx convert`
replaces all 30 attention blocks of each, the converted files (exact mode below 2048 keys)
give the original's logits, and greedy decoding with the KV cache gives the prefill
model's tokens."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from models.smollm2 import build as smollm2  # noqa: E402
from models.smollm2 import texts  # noqa: E402

TEXT = "bash-manual"  # held out
TOKENS = 256
DECODE = 4
TORCH_TOLERANCE = 2e-3  # max abs logit difference, ONNX Runtime vs PyTorch (logits ~ +-30)
CONVERTED_TOLERANCE = 1e-3  # converted (exact kernel) vs original, both ONNX Runtime

pytestmark = pytest.mark.skipif(not smollm2.is_built(), reason="SmolLM2 is not built: make smollm2")


@pytest.fixture(scope="module")
def ids():
    assert texts.TEXTS[TEXT].split == texts.HELD_OUT
    return texts.token_ids(TEXT, smollm2.load_tokenizer(), TOKENS)


@pytest.fixture(scope="module")
def model():
    import torch

    torch.set_num_threads(2)
    return smollm2.load_model(attn="eager")


def _session(path, converted=False):
    import onnxruntime as ort

    if converted:
        import ice_onnx

        options = ice_onnx.session_options(intra_op_num_threads=2)
    else:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _convert(path: Path, output: Path) -> dict:
    cli = Path(sys.executable).with_name("ice-onnx")
    run = subprocess.run([str(cli), "convert", str(path), "-o", str(output), "--json"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Both files converted with default settings: {form: (path, report)}."""
    where, folder = smollm2.paths(), tmp_path_factory.mktemp("smollm2")
    result = {}
    for form, path in (("prefill", where.prefill), ("with_past", where.with_past)):
        output = folder / (path.stem + ".ice.onnx")
        result[form] = output, _convert(path, output)
    return result


@pytest.fixture(scope="module")
def sessions(converted):
    where = smollm2.paths()
    return {"prefill": _session(where.prefill), "with_past": _session(where.with_past),
            "prefill_ice": _session(converted["prefill"][0], converted=True),
            "with_past_ice": _session(converted["with_past"][0], converted=True)}


@pytest.fixture(scope="module")
def prefill_logits(sessions, ids):
    (logits,) = sessions["prefill"].run(["logits"], {"input_ids": ids[None]})
    return logits


@pytest.fixture(scope="module")
def torch_reference(model, ids):
    """PyTorch on the whole of `ids` with an empty cache: the logits and the cache it fills."""
    import torch
    from transformers import DynamicCache

    with torch.no_grad():
        result = model(input_ids=torch.from_numpy(ids[None]), cache=DynamicCache(), use_cache=True)
    layer = result.cache.layers[smollm2.LAYERS - 1]
    return result.logits.numpy(), layer.keys.numpy(), layer.values.numpy()


def test_prefill_onnx_matches_pytorch(torch_reference, ids, prefill_logits):
    expected = torch_reference[0]
    assert prefill_logits.shape == (1, TOKENS, smollm2.VOCAB)
    assert np.abs(prefill_logits - expected).max() < TORCH_TOLERANCE
    # A real model on real text: it mostly predicts the manual's next token.
    assert (expected[0, :-1].argmax(-1) == ids[1:]).mean() > 0.4


def test_with_past_onnx_matches_pytorch(torch_reference, sessions, ids):
    logits, keys, values = torch_reference
    outputs = sessions["with_past"].run(["logits", *smollm2.past_names("present")], smollm2.with_past_feeds(ids))
    assert np.abs(outputs[0] - logits).max() < TORCH_TOLERANCE
    assert outputs[-2].shape == (1, smollm2.KV_HEADS, TOKENS, smollm2.HEAD_DIM)
    assert np.abs(outputs[-2] - keys).max() < TORCH_TOLERANCE  # the last layer's present key / value
    assert np.abs(outputs[-1] - values).max() < TORCH_TOLERANCE


@pytest.mark.parametrize("form", ["prefill", "with_past"])
def test_convert_replaces_all_30_blocks(converted, form):
    report = converted[form][1]
    assert report["attention_blocks"] == smollm2.LAYERS
    assert report["replaced"] == smollm2.LAYERS
    block = report["blocks"][0]
    assert (block["q_heads"], block["kv_heads"], block["head_dim"]) == (smollm2.HEADS, smollm2.KV_HEADS,
                                                                         smollm2.HEAD_DIM)
    assert block["scale"] == pytest.approx(0.125)


def test_converted_prefill_matches_original(sessions, ids, prefill_logits):
    from ice_onnx.custom_ops.run_stats import run_stats

    with run_stats() as stats:
        (logits,) = sessions["prefill_ice"].run(["logits"], {"input_ids": ids[None]})
    assert np.abs(logits - prefill_logits).max() < CONVERTED_TOLERANCE
    # The op ran in every block, exactly (the prompt is below exact_below's 2048 keys).
    assert stats.exact_calls == smollm2.LAYERS and stats.knn_calls == 0


def _greedy_with_past(session, ids, steps):
    """Prompt `ids`, then `steps` greedy tokens, each decoded on the cache the last call returned."""
    names = ["logits", *smollm2.past_names("present")]
    outputs = session.run(names, smollm2.with_past_feeds(ids))
    tokens, last_logits = [], []
    for _ in range(steps):
        logits = outputs[0][0, -1]
        tokens.append(int(logits.argmax()))
        last_logits.append(logits)
        outputs = session.run(names, smollm2.with_past_feeds(np.array(tokens[-1:]), outputs[1:]))
    return tokens, np.stack(last_logits)


def _greedy_prefill(session, ids, steps):
    """The same greedy tokens, each step the whole sequence again through the scorer."""
    sequence, tokens, last_logits = list(ids), [], []
    for _ in range(steps):
        (logits,) = session.run(["logits"], {"input_ids": np.array([sequence], np.int64)})
        tokens.append(int(logits[0, -1].argmax()))
        last_logits.append(logits[0, -1])
        sequence.append(tokens[-1])
    return tokens, np.stack(last_logits)


def test_with_past_decoding_gives_the_prefill_models_tokens(sessions, ids):
    prompt = ids[:TOKENS - 64]
    expected, expected_logits = _greedy_prefill(sessions["prefill"], prompt, DECODE)
    for name in ("with_past", "with_past_ice"):
        tokens, logits = _greedy_with_past(sessions[name], prompt, DECODE)
        assert tokens == expected, name
        assert np.abs(logits - expected_logits).max() < CONVERTED_TOLERANCE, name


def test_converted_with_past_honours_padding(sessions, ids):
    """A left-padded prompt: the first 5 positions masked out in attention_mask."""
    feeds = smollm2.with_past_feeds(ids[:64])
    feeds["attention_mask"][0, :5] = 0
    (original,) = sessions["with_past"].run(["logits"], feeds)
    (converted,) = sessions["with_past_ice"].run(["logits"], feeds)
    (unpadded,) = sessions["with_past"].run(["logits"], smollm2.with_past_feeds(ids[:64]))
    assert np.abs(original[0, 5:] - unpadded[0, 5:]).max() > 1  # the mask matters
    assert np.abs(converted[0, 5:] - original[0, 5:]).max() < CONVERTED_TOLERANCE
