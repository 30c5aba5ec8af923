"""The MiniLM task: do sentence embeddings survive the conversion?

all-MiniLM-L6-v2 embeds real English passages (mean pooling over the attention mask,
L2-normalised). For each converted variant: the cosine similarity of each passage's
embedding to the original's, and the share of passages whose nearest neighbour among
the other passages is unchanged. Targets: mean cosine >= 0.99, nearest
neighbour unchanged for >= 95 % of passages.
"""

from __future__ import annotations

import time

import numpy as np
import onnx

from ice_onnx.evaluation import fidelity
from ice_onnx.evaluation.runtime import KERNEL_COLUMNS, observed_kernel, open_session, resolve_backend
from ice_onnx.evaluation.tasks import Variant

SCHEMA = "ice-onnx/eval-minilm/1"
TARGET_MEAN_COSINE = 0.99
TARGET_NEIGHBOURS_KEPT = 0.95


def embed(session, feeds: dict[str, np.ndarray], batch_size: int, log=lambda message: None,
          label: str = "") -> tuple[np.ndarray, float]:
    """Sentence embeddings of every passage, and the seconds spent in the model."""
    wanted = {i.name for i in session.get_inputs()}
    count = len(feeds["input_ids"])
    chunks, seconds = [], 0.0
    for start in range(0, count, batch_size):
        batch = {name: array[start:start + batch_size] for name, array in feeds.items() if name in wanted}
        began = time.perf_counter()
        hidden = session.run(None, batch)[0]
        seconds += time.perf_counter() - began
        chunks.append(fidelity.mean_pool(hidden, batch["attention_mask"]))
        log(f"{label}: {min(start + batch_size, count)}/{count} passages")
    return np.concatenate(chunks), seconds


def compare_embeddings(original: np.ndarray, converted: np.ndarray) -> dict:
    """Per-passage cosine to the original embedding and nearest-neighbour agreement."""
    cosines = fidelity.cosine_rows(original, converted)
    kept = fidelity.nearest_neighbours(original) == fidelity.nearest_neighbours(converted)
    return {"mean_cosine": float(cosines.mean()), "min_cosine": float(cosines.min()),
            "neighbours_kept": float(kept.mean()), "cosines": cosines.tolist(),
            "neighbour_changed": np.flatnonzero(~kept).tolist()}


def evaluate(original: onnx.ModelProto, variants: list[Variant], feeds: dict[str, np.ndarray], *,
             threads: int, backend: str = "auto", batch_size: int = 8, log=lambda message: None) -> dict:
    backend = resolve_backend(backend)
    reference, reference_seconds = embed(open_session(original, threads), feeds, batch_size, log, "original")
    rows = [{"model": "original", "mean_cosine": 1.0, "min_cosine": 1.0, "neighbours_kept": 1.0,
             "seconds": reference_seconds}]
    for variant in variants:
        session = open_session(variant.model, threads, backend)
        with observed_kernel(backend) as kernel:
            embeddings, seconds = embed(session, feeds, batch_size, log, variant.label)
        rows.append({"model": variant.label, **variant.settings, **compare_embeddings(reference, embeddings),
                     "seconds": seconds, **kernel})
    for row in rows[1:]:
        row["meets_target"] = (row["mean_cosine"] >= TARGET_MEAN_COSINE
                               and row["neighbours_kept"] >= TARGET_NEIGHBOURS_KEPT)
    return {"schema": SCHEMA, "passages": int(len(feeds["input_ids"])),
            "tokens": int(feeds["input_ids"].shape[1]), "threads": threads, "backend": backend,
            "targets": {"mean_cosine": TARGET_MEAN_COSINE, "neighbours_kept": TARGET_NEIGHBOURS_KEPT},
            "rows": rows}


COLUMNS = [("model", "model", "s"), ("mean_cosine", "mean cos", ".4f"), ("min_cosine", "min cos", ".4f"),
           ("neighbours_kept", "NN kept", ".1%"), ("seconds", "time s", ".1f"), *KERNEL_COLUMNS,
           ("meets_target", "target", "")]
