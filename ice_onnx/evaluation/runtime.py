"""Opening sessions for original and converted models, and converting on the fly.

A converted model runs on the native kernel when the library is installed
(`backend="native"`), or on the numpy reference (`"reference"`: float64, perfect
index, slow, for checking); `"auto"` picks the native one when it exists.
"""

from __future__ import annotations

import copy
import platform
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, fields
from pathlib import Path
from typing import Iterator

import onnx
import onnxruntime as ort

from ice_onnx.custom_ops.contract import (DOMAIN, OP_TYPE, Attributes, refuse_unknown_attributes,
                                          refuse_unknown_node_attributes)
from ice_onnx.errors import first_line

BACKENDS = ("auto", "native", "reference")


def attention_nodes(model: onnx.ModelProto, inside_subgraphs: bool = True) -> list[onnx.NodeProto]:
    """The IceKNNAttention nodes in graph order, with those inside If / Loop / Scan branches
    (a fused op with a KV cache becomes If(kNN may pay: the new node, else: the original op)).
    `inside_subgraphs=False`: the main graph's only, whose values can be made graph outputs."""
    found = []

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            if node.domain == DOMAIN and node.op_type == OP_TYPE:
                found.append(node)
            if inside_subgraphs:
                for attribute in node.attribute:
                    for subgraph in [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs:
                        visit(subgraph)

    visit(model.graph)
    return found


def refuse_unknown_model_attributes(model: onnx.ModelProto) -> None:
    """UnknownAttributeError (a ValueError) for the first IceKNNAttention node carrying an
    attribute the contract does not define: ONNX Runtime would run it, ignoring the name."""
    for node in attention_nodes(model):
        refuse_unknown_node_attributes(node)


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    if backend != "auto":
        return backend
    from ice_onnx.custom_ops.loader import library_path

    try:
        library_path()
        return "native"
    except FileNotFoundError:
        return "reference"


def open_session(model: onnx.ModelProto, threads: int, backend: str = "auto",
                 memory_pattern: bool = True) -> ort.InferenceSession:
    """An InferenceSession for `model`, with the op library it needs registered. Without
    `memory_pattern` the session neither plans its buffers nor keeps them in its CPU arena
    after a run, so that two sessions taking turns never hold each other's peak."""
    from ice_onnx.custom_ops.loader import build_session_options, library_path

    options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1, "enable_mem_pattern": memory_pattern,
               "enable_cpu_mem_arena": memory_pattern}
    if not attention_nodes(model):
        so = build_session_options(**options)
    elif resolve_backend(backend) == "reference":
        from ice_onnx.custom_ops.reference import inference_session

        return inference_session(model, **options)
    else:
        refuse_unknown_model_attributes(model)
        so = build_session_options([library_path()], **options)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def environment() -> dict:
    """Where a timing was taken: the ONNX Runtime and Python versions, the machine."""
    return {"onnxruntime": ort.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "processor": platform.processor() or None}


def with_attributes(model: onnx.ModelProto, **attributes) -> onnx.ModelProto:
    """A copy of `model` with `attributes` (e.g. compensate=0) set on every IceKNNAttention
    node; a name the contract does not define is an UnknownAttributeError (a ValueError)."""
    refuse_unknown_attributes(attributes)
    model = copy.deepcopy(model)
    for node in attention_nodes(model):
        set_attributes(node, attributes)
    return model


def parse_attributes(specs) -> dict:
    """NAME=VALUE kernel attributes (CONTRACT.md), each cast to the type of its contract default."""
    known = {f.name: type(f.default) for f in fields(Attributes)}
    attributes = {}
    for spec in specs:
        name, equals, value = spec.partition("=")
        if not equals:
            raise ValueError(f"bad --attribute {spec!r}: give NAME=VALUE")
        name = name.strip()
        refuse_unknown_attributes([name], f"bad --attribute {spec!r}")
        kind = known[name]
        try:
            attributes[name] = kind(value.strip())
        except ValueError:
            wants = {int: "an integer", float: "a number"}.get(kind, kind.__name__)
            raise ValueError(f"bad --attribute {spec!r}: {name} takes {wants}") from None
    return attributes


# What the kernel did, as report keys and table columns: the converted model's settings
# say which calls may take the kNN path; the guard and the kernel's other checks decide
# per call and head, so a report must say what they decided.
KERNEL_COLUMNS = [("knn_head_share", "kNN heads", ".0%"), ("keys_per_knn_row", "keys/row", ".0f")]


@contextmanager
def observed_kernel(backend: str) -> Iterator[dict]:
    """Yields a dict that, when the block ends, holds what the native kernel did inside it:
    `kernel` (its run counters, custom_ops.run_stats) and the shares `kernel_paths` derives.
    It stays empty on the reference backend, which keeps no counters. The counters are
    process-wide: nothing else may run the kernel meanwhile."""
    observed: dict = {}
    if resolve_backend(backend) != "native":
        yield observed
        return
    from ice_onnx.custom_ops.run_stats import run_stats

    with run_stats() as stats:
        yield observed
    observed.update(kernel_paths(asdict(stats.current())))


def kernel_paths(counts: dict) -> dict:
    """`counts` (run counters, summed over any number of runs) and what they say:
    knn_head_share, the share of (batch, head) attention calls that went through the index
    (the rest ran exactly: calls the settings or the kernel's checks kept exact, and heads
    the guard sent there); guard_exact_share, the share of kNN calls' heads the guard sent
    to exact attention; keys_per_knn_row, the keys the index gave a query row on average;
    scored_fraction, those keys as a share of the keys the rows could see."""
    heads = counts["exact_heads"] + counts["knn_heads"]
    guarded = counts["knn_heads"] + counts["guarded_heads"]
    return {"kernel": counts,
            "knn_head_share": counts["knn_heads"] / heads if heads else 0.0,
            "guard_exact_share": counts["guarded_heads"] / guarded if guarded else 0.0,
            "keys_per_knn_row": counts["keys_scored"] / counts["knn_rows"] if counts["knn_rows"] else 0.0,
            "scored_fraction": counts["keys_scored"] / counts["keys_visible"] if counts["keys_visible"] else 0.0}


def pooled_kernel_paths(rows: list[dict]) -> dict:
    """kernel_paths over rows that each carry `kernel` counts (none: {})."""
    counted = [row["kernel"] for row in rows if "kernel" in row]
    if not counted:
        return {}
    summed = {name: sum(c[name] for c in counted) for name in counted[0]}
    summed["keys_scored_max"] = max(c["keys_scored_max"] for c in counted)
    return kernel_paths(summed)


def set_attributes(node: onnx.NodeProto, values: dict) -> None:
    """Set `values` (name -> value) on `node`, replacing attributes of those names."""
    refuse_unknown_attributes(values)
    kept = [a for a in node.attribute if a.name not in values]
    del node.attribute[:]
    node.attribute.extend(kept)
    node.attribute.extend(onnx.helper.make_attribute(name, value) for name, value in values.items())


def convert(original: Path, *, top_k: int | None = None, exact_below: int | None = None,
            compensate: int | None = None, options=None, log=lambda message: None) -> onnx.ModelProto:
    """Convert `original` with the rewriter: with `options` (a ConvertOptions) when given,
    else with top_k / exact_below / compensate (unset ones keep its defaults)."""
    from ice_onnx.rewriter import ConvertOptions, ModelFileError, NoAttentionError, convert_file

    if options is None:
        given = {"top_k": top_k, "exact_below": exact_below, "compensate": compensate}
        options = ConvertOptions(**{name: value for name, value in given.items() if value is not None})
    log(f"converting {Path(original).name} ...")
    with tempfile.TemporaryDirectory(prefix="ice-onnx-eval-") as tmp:
        out = Path(tmp) / "converted.onnx"
        try:
            report = convert_file(original, out, options)
        except (ModelFileError, NoAttentionError) as exc:
            raise RuntimeError(str(exc)) from None
        except Exception as exc:  # a converter bug: report it in one line, not a traceback
            raise RuntimeError(f"converting {Path(original).name} failed: {first_line(exc)}") from exc
        log(f"converted {report.replaced} attention block(s)")
        return onnx.load(str(out))
