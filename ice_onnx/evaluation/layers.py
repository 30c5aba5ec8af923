"""Per-layer fidelity of a converted model: what each IceKNNAttention node retrieved and lost.

A diagnostic copy of the converted model exposes every node's Q, K, V, mask and output
as extra graph outputs. On those captured tensors, in numpy (float64), for a sample of
query rows of every (batch, head):

- `mass_top_k`: the softmax mass on the exact top-k keys (what a perfect index keeps);
- `mass_retrieved`, `recall` and `keys_retrieved`: the mass on the keys the kernel
  actually used, the share of the exact top-k among them, and how many it used (all
  allowed keys when the kernel chose its exact path, e.g. for too few queries). The
  retrieved set is read by re-running the kernel on each kv head's captured Q/K/mask
  with V = identity, compensation off and a tiny scale: the output row is then the
  (nearly uniform) softmax weight of each key, non-zero exactly on the keys used. The
  probe runs one kv head at a time, so an index seeded per head may draw other random
  numbers than in the model run: it measures the index on that head's real keys;
- `output_cosine` / `output_max_abs_error`: the node's output against exact attention
  on the same inputs (the numpy reference's weights: the node's mask, causality,
  sliding window and softcap);
- given the native kernel's run statistics of the node's run (`observed`), `mode` is the
  path the kernel reports it took (else the contract's routing rule predicts it), and
  `keys_scored` the keys its index scored per kNN query row.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import onnx

from ice_onnx.custom_ops import reference
from ice_onnx.custom_ops.contract import DOMAIN, OP_TYPE, VERSION, Attributes, is_key_padding_mask
from ice_onnx.evaluation import fidelity
from ice_onnx.evaluation.runtime import attention_nodes, open_session

PROBE_OUTPUT_FLOATS = 1 << 24  # largest probe output per run (64 MB); wider V is split
PROBE_SCALE = 1e-6


@dataclass
class Capture:
    """One IceKNNAttention node's inputs and output on one run."""

    name: str
    attributes: Attributes
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    mask: np.ndarray | None
    y: np.ndarray


def diagnostic_copy(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[tuple[onnx.NodeProto, list[str]]]]:
    """A copy of `model` that also outputs each attention node's Q, K, V, mask and Y."""
    model = copy.deepcopy(model)
    outputs = {out.name for out in model.graph.output}
    exposed = []
    for node in attention_nodes(model, inside_subgraphs=False):
        mask = node.input[3] if len(node.input) > 3 else ""
        names = [*node.input[:3], mask, node.output[0]]
        for name in names:
            if name and name not in outputs:
                model.graph.output.append(onnx.ValueInfoProto(name=name))
                outputs.add(name)
        exposed.append((node, names))
    return model, exposed


def capture(model: onnx.ModelProto, feeds: dict, threads: int, backend: str) -> tuple[list[Capture], dict]:
    """Run the diagnostic copy once; returns the captures and the model's own outputs."""
    diagnostic, exposed = diagnostic_copy(model)
    session = open_session(diagnostic, threads, backend)
    names = [out.name for out in session.get_outputs()]
    values = dict(zip(names, session.run(names, feeds)))
    captures = []
    for node, (q, k, v, mask, y) in exposed:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        captures.append(Capture(node.name or node.output[0], Attributes.from_node_attributes(attrs),
                                values[q], values[k], values[v], values[mask] if mask else None, values[y]))
    model_outputs = {out.name: values[out.name] for out in model.graph.output}
    return captures, model_outputs


class RetrievalProbe:
    """Re-runs the kernel on one kv head (with its group of query heads) to read which
    keys it retrieved. The group keeps the kernel's queries-per-index, and the mask keeps
    its broadcast shape, so the kernel takes the same path as in the model."""

    def __init__(self, threads: int, backend: str):
        self._threads, self._backend, self._sessions = threads, backend, {}

    def weights(self, attributes: Attributes, q: np.ndarray, k: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        """q [G, Sq, D], k [Sk, D], mask [1, G|1, Sq|1, Sk] or None -> [G, Sq, Sk] weights (0 = not used)."""
        group, sq, sk = q.shape[0], q.shape[1], k.shape[0]
        session = self._session(attributes, None if mask is None else mask.dtype)
        columns = max(1, min(sk, PROBE_OUTPUT_FLOATS // max(group * sq, 1)))
        blocks = []
        for start in range(0, sk, columns):
            stop = min(sk, start + columns)
            identity = np.zeros((sk, stop - start), dtype=np.float32)
            identity[np.arange(start, stop), np.arange(stop - start)] = 1.0
            feeds = {"Q": q[None], "K": k[None, None], "V": identity[None, None]}
            if mask is not None:
                feeds["attn_mask"] = mask
            blocks.append(session.run(None, feeds)[0][0])
        return np.concatenate(blocks, axis=-1)

    def _session(self, attributes: Attributes, mask_dtype):
        key = (attributes, None if mask_dtype is None else np.dtype(mask_dtype).str)
        if key not in self._sessions:
            self._sessions[key] = open_session(_probe_model(attributes, mask_dtype), self._threads, self._backend)
        return self._sessions[key]


def _mask_for(mask: np.ndarray | None, batch: int, heads: slice) -> np.ndarray | None:
    """The slice of a broadcastable mask that one (batch, kv-head group) sees, same rank 4."""
    if mask is None:
        return None
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    rows = slice(batch, batch + 1) if mask.shape[0] > 1 else slice(0, 1)
    cols = heads if mask.shape[1] > 1 else slice(0, 1)
    return np.ascontiguousarray(mask[rows, cols])


def _probe_model(attributes: Attributes, mask_dtype) -> onnx.ModelProto:
    # The ranking is by q·k whatever the scale; a tiny scale flattens the softmax over the
    # retrieved keys so that none of their weights underflows to zero in float32.
    attrs = {**attributes.as_node_attributes(), "compensate": 0, "scale": PROBE_SCALE}
    float_type = onnx.TensorProto.FLOAT
    inputs = [onnx.helper.make_tensor_value_info(name, float_type, [1, None, None, None]) for name in "QKV"]
    if mask_dtype is not None:
        mask_type = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(mask_dtype))
        inputs.append(onnx.helper.make_tensor_value_info("attn_mask", mask_type, [1, None, None, None]))
    node = onnx.helper.make_node(OP_TYPE, [i.name for i in inputs], ["Y"], domain=DOMAIN, **attrs)
    graph = onnx.helper.make_graph([node], "retrieval_probe", inputs,
                                   [onnx.helper.make_tensor_value_info("Y", float_type, [1, None, None, None])])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17),
                                                        onnx.helper.make_opsetid(DOMAIN, VERSION)])


def layer_stats(capture: Capture, probe: RetrievalProbe | None, rows_per_head: int, seed: int = 0,
                observed=None) -> dict:
    """Fidelity statistics of one node, averaged over its (batch, head, sampled row)s.
    `observed`: the kernel's run statistics (custom_ops.run_stats.RunStats) of the run
    that produced `capture.y`, or None."""
    q, k, v, y = capture.q, capture.k, capture.v, capture.y
    b, hq, sq, _ = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    group = hq // hkv
    attrs = capture.attributes
    padding_only = capture.mask is None or is_key_padding_mask(capture.mask, b, sk)
    # What the kernel did, when it says; else what the contract's routing rule predicts.
    knn = observed.knn_heads > 0 if observed is not None else attrs.uses_knn(sk, sq * group, padding_only)
    rows = np.sort(np.random.default_rng(seed).choice(sq, size=min(rows_per_head, sq), replace=False))
    dense_mask = None if capture.mask is None else np.broadcast_to(capture.mask, (b, hq, sq, sk))
    names = ("mass_top_k", "mass_retrieved", "recall", "keys_retrieved", "cosine", "abs_error")
    collected = {name: [] for name in names}
    for bi in range(b):
        for kv in range(hkv):
            heads = slice(kv * group, (kv + 1) * group)
            weights = None
            if knn and probe is not None:
                weights = probe.weights(attrs, q[bi, heads], k[bi, kv], _mask_for(capture.mask, bi, heads))
            for g, h in enumerate(range(heads.start, heads.stop)):
                row_mask = None if dense_mask is None else dense_mask[bi, h, rows][None, None]
                p, allowed = (x[0, 0] for x in reference.attention_weights(
                    q[None, None, bi, h, rows], k[None, None, bi, kv], row_mask, attrs, positions=rows + sk - sq))
                has_key = allowed.any(axis=-1)
                empty_row = 0.0 if attrs.empty_rows == "zero" else v[bi, kv].mean(axis=0)
                exact_y = np.where(has_key[:, None], p @ v[bi, kv].astype(np.float64), empty_row)
                collected["cosine"].append(fidelity.cosine_rows(exact_y, y[bi, h, rows]))
                collected["abs_error"].append(np.abs(exact_y - y[bi, h, rows]).max(axis=-1))
                dots = np.where(allowed, q[bi, h, rows].astype(np.float64) @ k[bi, kv].astype(np.float64).T, -np.inf)
                collected["mass_top_k"].append(fidelity.softmax_mass(p, _exact_top_k(dots, attrs.top_k))[has_key])
                if not knn:
                    retrieved = allowed
                elif weights is not None:
                    retrieved = (weights[g, rows] > 0) & allowed
                else:
                    continue
                collected["mass_retrieved"].append(fidelity.softmax_mass(p, retrieved)[has_key])
                collected["recall"].append(fidelity.top_k_recall(retrieved, dots, attrs.top_k)[has_key])
                collected["keys_retrieved"].append(retrieved.sum(axis=-1)[has_key])
    joined = {name: np.concatenate(parts) if parts else None for name, parts in collected.items()}
    return {
        "node": capture.name,
        "mode": "knn" if knn else "exact",
        "top_k": attrs.top_k,
        "num_keys": int(sk),
        "compensate": attrs.compensate,
        "mass_top_k": _mean(joined["mass_top_k"]),
        "mass_retrieved": _mean(joined["mass_retrieved"]),
        "min_mass_retrieved": _min(joined["mass_retrieved"]),
        "recall": _mean(joined["recall"]),
        "keys_retrieved": _mean(joined["keys_retrieved"]),
        "keys_scored": observed.mean_keys_scored if observed is not None and observed.knn_rows else None,
        "output_cosine": _mean(joined["cosine"]),
        "min_output_cosine": _min(joined["cosine"]),
        "output_max_abs_error": float(joined["abs_error"].max()),
        "rows_sampled": int(len(rows) * b * hq),
    }


def _exact_top_k(dots, top_k: int) -> np.ndarray:
    """Bool [rows, Sk]: the top_k allowed keys by q·k (`dots`, -inf = blocked; the contract's ranking)."""
    count = min(top_k, dots.shape[1])
    chosen = np.zeros(dots.shape, dtype=bool)
    order = np.argpartition(-dots, count - 1, axis=-1)[:, :count]
    np.put_along_axis(chosen, order, True, axis=-1)
    return chosen & np.isfinite(dots)


def _mean(values):
    return None if values is None or values.size == 0 else float(values.mean())


def _min(values):
    return None if values is None or values.size == 0 else float(values.min())
