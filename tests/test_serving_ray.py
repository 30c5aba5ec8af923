"""The Ray example (examples/ray/long_documents.py) on a local 2-CPU Ray cluster.

Ray Data scores long documents with one session per actor, and a Ray Serve deployment
answers requests (through its handle and over HTTP); both must give what a plain ONNX
Runtime session of the converted model gives in this process, and that must be the
original model's answers. At 2K tokens every converted block takes the kernel's kNN
route; the kernel's accuracy guard then decides head by head (for this model it keeps
nearly every head exact, which the run statistics show).
"""

from __future__ import annotations

import json
import socket
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'ice-onnx[serve]')")
serve = pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'ice-onnx[serve]')")
pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'ice-onnx[serve]')")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ray"
sys.path.insert(0, str(EXAMPLE))
import long_documents  # noqa: E402

from ice_onnx.models.line_retrieval.evaluate import ONNX_FILE  # noqa: E402

TOKENS = 2048  # from here the converted attention (top_k 32) runs kNN
DOCUMENTS = 4


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> str:
    return str(long_documents.convert(str(ONNX_FILE), tmp_path_factory.mktemp("ray") / "model.ice.onnx"))


@pytest.fixture(scope="module")
def corpus():
    return long_documents.documents(TOKENS, DOCUMENTS)


@pytest.fixture(scope="module")
def plain_logits(converted, corpus):
    """The oracle for what Ray runs: the converted model in a plain session in this process."""
    scorer = long_documents.DocumentScorer(converted)
    return np.stack([scorer.score(ids) for ids in corpus[0]])


@pytest.fixture(scope="module")
def original_logits(corpus):
    scorer = long_documents.DocumentScorer(str(ONNX_FILE), ice_ops=False)
    return np.stack([scorer.score(ids) for ids in corpus[0]])


@pytest.fixture(scope="module")
def cluster():
    # Workers import the example's module by name, as a cluster's would from a runtime_env.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(EXAMPLE)}})
    yield
    serve.shutdown()
    ray.shutdown()


def test_the_converted_model_takes_the_knn_route_and_keeps_the_answers(converted, corpus, plain_logits,
                                                                       original_logits):
    from ice_onnx.custom_ops.run_stats import run_stats

    ids, answers = corpus
    scorer = long_documents.DocumentScorer(converted)
    with run_stats() as stats:
        scorer.score(ids[0])
    layers, heads = 4, 4
    assert stats.knn_calls == layers and stats.exact_calls == 0
    assert stats.knn_heads + stats.guarded_heads == layers * heads
    np.testing.assert_allclose(plain_logits, original_logits, rtol=0, atol=0.5)
    assert (plain_logits.argmax(-1) == original_logits.argmax(-1)).mean() >= 0.75
    assert (original_logits.argmax(-1) == np.array(answers)).mean() >= 0.75  # the task is solved at all


def test_ray_data_scores_documents_like_a_plain_session(cluster, converted, corpus, plain_logits):
    ids, _ = corpus
    rows = long_documents.score_dataset(converted, ids, actors=2, batch_size=1)
    assert [int(row["document"]) for row in rows] == list(range(DOCUMENTS))
    logits = np.stack([row["logits"] for row in rows])
    np.testing.assert_allclose(logits, plain_logits, rtol=0, atol=1e-5)  # same seed, one thread: the same kNN
    assert [int(row["prediction"]) for row in rows] == plain_logits.argmax(-1).tolist()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_ray_serve_answers_like_a_plain_session(cluster, converted, corpus, plain_logits):
    ids, _ = corpus
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    handle = serve.run(long_documents.service(converted), route_prefix="/score")
    answer = handle.score.remote(ids[1].tolist()).result(timeout_s=120)
    np.testing.assert_allclose(answer["logits"], plain_logits[1], rtol=0, atol=1e-5)
    assert answer["prediction"] == int(plain_logits[1].argmax())

    request = urllib.request.Request(f"http://127.0.0.1:{port}/score", method="POST",
                                     data=json.dumps({"input_ids": ids[2].tolist()}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        answer = json.loads(response.read())
    np.testing.assert_allclose(answer["logits"], plain_logits[2], rtol=0, atol=1e-5)
    assert answer["prediction"] == int(plain_logits[2].argmax())
