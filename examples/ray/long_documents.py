"""A converted model on Ray: batch scoring of long documents with Ray Data, and online
answers with Ray Serve.

The model is the line-retrieval Llama that ships with ice-onnx (4 layers, trained here
to 8K tokens, `ice_onnx/models/line_retrieval`): a document is a record of numbered
lines followed by a question naming one line, and the model's score is its next-token
logits, whose arg-max is the number on that line. From 2K tokens on, every converted block
takes the kernel's kNN route (converted with top_k 32, as the model's README measures it);
the kernel's accuracy guard then keeps most of this model's heads exact, which the
converted model still runs several times faster than the original's graph does.

    python examples/ray/long_documents.py                      # convert, then both demos
    python examples/ray/long_documents.py --tokens 4096 --documents 16

Everything a worker needs is the installed `ice-onnx` package (the op library is in its
wheel): each actor's constructor registers the library and builds its own session.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

DEFAULT_TOP_K = 32


class DocumentScorer:
    """One ONNX Runtime session per Ray actor. Ray Data calls an instance with a batch
    ({"input_ids": array of documents, ...}); each document runs on its own, so documents
    of different lengths may share a batch (the model has no padding mask)."""

    def __init__(self, model_path: str, threads: int = 1, ice_ops: bool = True):
        import onnxruntime as ort

        import ice_onnx

        options = ort.SessionOptions()
        # ONNX Runtime's pool is the actor's own: size it to the CPUs Ray gives the actor.
        options.intra_op_num_threads = threads
        if ice_ops:  # the converted model's IceKNNAttention nodes come from this library
            options.register_custom_ops_library(ice_onnx.library_path())
        self.session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])

    def score(self, input_ids) -> np.ndarray:
        """The next-token logits after one document: [vocabulary]."""
        ids = np.asarray(input_ids, dtype=np.int64)[None, :]
        (logits,) = self.session.run(["logits"], {"input_ids": ids})
        return logits[0, -1]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        logits = np.stack([self.score(ids) for ids in batch["input_ids"]])
        return {"document": batch["document"], "prediction": logits.argmax(-1), "logits": logits}


def documents(tokens: int, count: int):
    """`count` line-retrieval documents of `tokens` tokens (deterministic) and their true answers."""
    from ice_onnx.models.line_retrieval.evaluate import evaluation_prompts
    from ice_onnx.models.line_retrieval.task import Vocab

    prompts = evaluation_prompts(Vocab.load(), tokens, count)
    return [p.ids for p in prompts], [int(p.answers[-1]) for p in prompts]


def convert(model: str, output: Path, top_k: int = DEFAULT_TOP_K) -> Path:
    """The converted model (written once; reused while it is newer than `model`)."""
    from ice_onnx.rewriter import ConvertOptions, convert_file

    if not output.exists() or output.stat().st_mtime < Path(model).stat().st_mtime:
        convert_file(model, output, ConvertOptions(top_k=top_k))
    return output


def score_dataset(model_path: str, document_ids: list[np.ndarray], actors: int = 2, batch_size: int = 2):
    """Ray Data: one DocumentScorer per actor, `actors` of them, each on one CPU. Returns
    the rows in document order."""
    import ray.data

    dataset = ray.data.from_items([{"document": i, "input_ids": ids} for i, ids in enumerate(document_ids)])
    scored = dataset.map_batches(DocumentScorer, fn_constructor_kwargs={"model_path": model_path},
                                 batch_size=batch_size, concurrency=actors, num_cpus=1)
    return sorted(scored.take_all(), key=lambda row: row["document"])


def service(model_path: str, replicas: int = 1):
    """A Ray Serve application: one DocumentScorer per replica, answering
    `POST /` with {"input_ids": [...]} by {"prediction": n, "logits": [...]}."""
    from ray import serve

    # One document at a time per replica: a long document keeps its CPU busy, so a second
    # one is better queued for a free replica than run beside it.
    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": 1}, max_ongoing_requests=1)
    class DocumentService:
        def __init__(self, path: str):
            self.scorer = DocumentScorer(path)

        def score(self, input_ids: list[int]) -> dict:
            logits = self.scorer.score(input_ids)
            return {"prediction": int(logits.argmax()), "logits": logits.tolist()}

        async def __call__(self, request) -> dict:
            return self.score((await request.json())["input_ids"])

    return DocumentService.bind(model_path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="An unconverted ONNX model (default: the shipped line-retrieval model).")
    parser.add_argument("--work", default="ray-example", help="Folder for the converted model.")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--documents", type=int, default=8)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()

    import ray
    from ray import serve

    from ice_onnx.models.line_retrieval.evaluate import ONNX_FILE

    work = Path(args.work)
    work.mkdir(exist_ok=True)
    converted = str(convert(args.model or str(ONNX_FILE), work / "model.ice.onnx"))
    ids, answers = documents(args.tokens, args.documents)

    ray.init(num_cpus=args.cpus)
    start = time.perf_counter()
    rows = score_dataset(converted, ids, actors=args.cpus)
    seconds = time.perf_counter() - start
    right = sum(int(row["prediction"]) == answer for row, answer in zip(rows, answers))
    print(f"Ray Data: {len(rows)} documents of {args.tokens} tokens in {seconds:.1f} s, {right} answered right")

    handle = serve.run(service(converted))
    answer = handle.score.remote(ids[0].tolist()).result()
    print("Ray Serve:", json.dumps({"prediction": answer["prediction"], "true answer": answers[0]}))
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
