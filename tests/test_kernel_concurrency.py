"""The op under concurrency and repetition: threads sharing one session, sessions
side by side, and many runs in a loop must give results identical to serial runs
and leave resident memory flat."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import ice_onnx
from ice_onnx.custom_ops import contract


def knn_model(mask: bool) -> bytes:
    names = ["Q", "K", "V"] + (["M"] if mask else [])
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "QKV"]
    if mask:
        inputs.append(helper.make_tensor_value_info("M", TensorProto.BOOL, None))
    node = helper.make_node(contract.OP_TYPE, names, ["Y"], domain=contract.DOMAIN,
                            top_k=8, exact_below=0, seed=3)
    graph = helper.make_graph([node], "knn", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid(contract.DOMAIN, contract.VERSION)])
    return model.SerializeToString()


def clustered_inputs(seed: int, seq: int = 512, dim: int = 32):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((16, dim)) * 3
    keys = centres[rng.integers(0, 16, (1, 2, seq))] + rng.standard_normal((1, 2, seq, dim))
    queries = centres[rng.integers(0, 16, (1, 4, seq))] + rng.standard_normal((1, 4, seq, dim))
    values = rng.standard_normal((1, 2, seq, dim))
    mask = rng.random((1, 1, 1, seq)) > 0.1
    return {"Q": queries.astype(np.float32), "K": keys.astype(np.float32),
            "V": values.astype(np.float32), "M": mask}


def session(threads: int = 2) -> ort.InferenceSession:
    return ort.InferenceSession(knn_model(mask=True), ice_onnx.session_options(intra_op_num_threads=threads),
                                providers=["CPUExecutionProvider"])


def test_one_session_run_from_eight_threads_matches_serial_runs():
    shared = session()
    feeds = [clustered_inputs(seed) for seed in range(8)]
    serial = [shared.run(None, f)[0] for f in feeds]
    with ThreadPoolExecutor(max_workers=8) as pool:
        parallel = list(pool.map(lambda f: shared.run(None, f)[0], feeds * 3))
    for i, y in enumerate(parallel):
        np.testing.assert_array_equal(y, serial[i % 8])


def test_four_sessions_in_parallel_match_serial_runs():
    sessions = [session(threads) for threads in (1, 2, 1, 2)]
    feeds = clustered_inputs(11)
    expected = sessions[0].run(None, feeds)[0]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda s: s.run(None, feeds)[0], sessions * 2))
    for y in results:
        np.testing.assert_array_equal(y, expected)


def resident_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="needs /proc")
def test_a_thousand_runs_leave_resident_memory_flat():
    s = session(1)
    feeds = clustered_inputs(5, seq=256)
    for _ in range(100):  # warm-up: arenas, caches and allocator pools reach their size
        s.run(None, feeds)
    before = resident_kib()
    for _ in range(1000):
        s.run(None, feeds)
    grown = resident_kib() - before
    assert grown < 8 * 1024, f"resident memory grew by {grown} KiB over 1000 runs"
