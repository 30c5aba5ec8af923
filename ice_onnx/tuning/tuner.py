"""`tune`: the cheapest per-block plan that keeps a model's final outputs within a budget.

1. Convert the model once (every block exact) and run the calibration inputs through
   the original: its outputs are the reference. The all-exact conversion must already
   meet the budget.
2. Capture every attention node's Q, K, V and mask on the first calibration samples.
   Per block and candidate setting: its cost (`cost.py`) — settings the kernel would run
   exactly at this length, or that cost at least what exact costs, are dropped — its
   layer fidelity (`evaluation.layers.layer_stats` on the captured tensors: softmax mass
   on the keys used, recall of the exact top-k, output cosine against exact attention),
   and its damage end to end: the whole model run with this block alone changed.
3. `search.py` orders the plans from cheapest to all exact and bisects along them,
   running the whole model with each plan it tries (the only ground truth).

The result is a plain dict (`ice-onnx/tune/1`); `plan_document` wraps it as the
PLAN.json that `ice-onnx convert --plan` applies.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from ice_onnx.custom_ops.contract import ALWAYS_EXACT, DOMAIN, OP_TYPE, VERSION, Attributes
from ice_onnx.evaluation import layers
from ice_onnx.evaluation.runtime import attention_nodes, open_session, resolve_backend, set_attributes
from ice_onnx.tuning import calibration, cost, search
from ice_onnx.tuning.candidates import DEFAULT_SPEC, EXACT, Candidate, parse_candidates
from ice_onnx.tuning.metrics import DEFAULT_BUDGETS, METRICS, Metric

SCHEMA = "ice-onnx/tune/1"
PLAN_SCHEMA = "ice-onnx/plan/1"


class BudgetError(ValueError):
    """Even exact attention in every block misses the budget."""


@dataclass
class TuneSettings:
    budget: float | None = None  # None: the metric's default (cosine 0.99)
    metric: str = "cosine"
    candidates: str = DEFAULT_SPEC
    exact_below: int | None = None  # kNN blocks' exact_below; None: the calibrated key count
    outputs: tuple[str, ...] = ()  # outputs judged; () = all
    batch_size: int = 4
    diagnostic_samples: int = 1  # samples whose attention tensors feed the per-layer statistics
    rows_per_head: int = 32
    threads: int = 1
    backend: str = "auto"
    seed: int = 0  # the index seed written into the converted nodes

    def resolved(self) -> tuple[Metric, float, list[Candidate]]:
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r} (choose from {', '.join(METRICS)})")
        metric = METRICS[self.metric]
        budget = self.budget if self.budget is not None else DEFAULT_BUDGETS.get(self.metric)
        if budget is None:
            raise ValueError(f"--metric {self.metric} needs an explicit --budget")
        metric.check_budget(budget)
        return metric, budget, parse_candidates(self.candidates)


def tune(model_path: Path, feeds: dict[str, np.ndarray], settings: TuneSettings,
         log=lambda message: None) -> dict:
    """Tune `model_path` on calibration `feeds` (checked against the model's inputs)."""
    return _Tuner(Path(model_path), feeds, settings, log).run()


class _Tuner:
    def __init__(self, model_path: Path, feeds: dict, settings: TuneSettings, log):
        self.metric, self.budget, self.candidates = settings.resolved()
        self.settings, self.log, self.model_path = settings, log, model_path
        self.backend = resolve_backend(settings.backend)
        graph = onnx.load(str(model_path), load_external_data=False)  # checks first, then the slow work
        self.chunks = calibration.batches(calibration.check_inputs(feeds, graph), settings.batch_size)
        names = [out.name for out in graph.graph.output]
        unknown = [name for name in settings.outputs if name not in names]
        if unknown:
            raise ValueError(f"no output named {', '.join(unknown)} (the model has {', '.join(names)})")
        self.judged = list(settings.outputs) or names
        self.converted, self.block_of_node, self.tunable = _convert_exact(model_path, settings.seed, log)
        self.original = onnx.load(str(model_path))
        log(f"reference: running the original on {calibration.sample_count(feeds)} calibration sample(s) ...")
        session = open_session(self.original, settings.threads)
        self.reference = [dict(zip(names, session.run(names, chunk))) for chunk in self.chunks]
        self.knn_from: dict[int, int] = {}
        self.scores: dict[tuple, float] = {}

    # ---- end-to-end runs ---------------------------------------------------------------

    def score(self, plan: dict[int, Candidate]) -> float:
        """The metric's worst sample with `plan` (blocks not in it exact), memoised."""
        key = tuple(sorted((block, c) for block, c in plan.items() if not c.is_exact))
        if key not in self.scores:
            self._apply(plan)
            session = open_session(self.converted, self.settings.threads, self.backend)
            per_chunk = []
            for chunk, reference in zip(self.chunks, self.reference):
                got = dict(zip(self.judged, session.run(self.judged, chunk)))
                samples = calibration.sample_count(chunk)
                per_chunk += [self.metric.combine(self.metric.sample_scores(reference[n], got[n], samples))
                              for n in self.judged]
            self.scores[key] = self.metric.combine(per_chunk)
        return self.scores[key]

    def _apply(self, plan: dict[int, Candidate]) -> None:
        for node in attention_nodes(self.converted):
            block = self.block_of_node[node.name]
            if block in self.tunable:
                chosen = plan.get(block, EXACT)
                set_attributes(node, chosen.plan_settings(self.knn_from.get(block, ALWAYS_EXACT)))

    # ---- the tuning ----------------------------------------------------------------------

    def run(self) -> dict:
        baseline = self.score({})
        self.log(f"all exact: {self.metric.name} {baseline:.6g}")
        if not self.metric.meets(baseline, self.budget):
            raise BudgetError(f"even exact attention in every block misses the budget: {self.metric.name} "
                              f"{baseline:.6g} vs {self.budget} (float32 rounding; loosen the budget)")
        blocks = self._measure_blocks(baseline)
        frontiers = {}
        for block in blocks:
            exact = search.Option(EXACT, block["exact_cost"], self.metric.damage(baseline))
            options = [search.Option(m["candidate"], m["cost"], self.metric.damage(m["score_alone"]))
                       for m in block["measured"] if not m["candidate"].is_exact and "skipped" not in m]
            frontiers[block["index"]] = search.frontier(options, exact)
        path = search.plan_path(frontiers)
        exact_total = sum(block["exact_cost"] for block in blocks)
        validated = []

        def passes(position: int) -> bool:
            plan = {b: option.setting for b, option in path[position].items()}
            score = self.score(plan)
            ratio = sum(option.cost for option in path[position].values()) / exact_total
            ok = self.metric.meets(score, self.budget)
            validated.append({"position": position, "cost_ratio": ratio, "score": score, "passes": ok})
            self.log(f"plan {position + 1}/{len(path)} (cost {ratio:.3f} of exact): "
                     f"{self.metric.name} {score:.6g} -> {'meets' if ok else 'misses'} the budget")
            return ok

        self.log(f"searching {len(path)} plans (cheapest first, all exact last) ...")
        position = search.first_passing(len(path), passes)
        chosen = {b: option.setting for b, option in path[position].items()}
        final_score = self.score(chosen)
        return self._result(blocks, chosen, path, position, baseline, final_score, validated)

    def _measure_blocks(self, baseline: float) -> list[dict]:
        self._apply({})
        first = {name: array[:self.settings.diagnostic_samples] for name, array in self.chunks[0].items()}
        captures, _ = layers.capture(self.converted, first, self.settings.threads, self.backend)
        probe = layers.RetrievalProbe(self.settings.threads, self.backend)
        by_block = {self.block_of_node[node.name]: capture
                    for node, capture in zip(attention_nodes(self.converted), captures)}
        blocks = []
        for index in sorted(self.tunable):
            captured = by_block[index]
            geometry = cost.BlockGeometry.from_tensors(captured.q, captured.k, captured.mask,
                                                       captured.attributes.is_causal)
            knn_from = self.settings.exact_below if self.settings.exact_below is not None else geometry.k_len
            self.knn_from[index] = knn_from
            exact_cost = cost.exact_cost(geometry)
            measured = []
            for candidate in self.candidates:
                attributes = candidate.attributes(captured.attributes, knn_from)
                row = {"candidate": candidate, "choice": candidate.label,
                       "cost": cost.attention_cost(geometry, attributes)}
                row["cost_ratio"] = row["cost"] / exact_cost
                if not candidate.is_exact:
                    skipped = ("runs exact at this length" if not geometry.runs_knn(attributes)
                               else "costs at least exact" if row["cost"] >= exact_cost else None)
                    if skipped:
                        measured.append({**row, "skipped": skipped})
                        continue
                self.log(f"block {index} ({geometry.k_len} keys): {candidate.label} ...")
                row.update(self._layer_stats(captured, attributes, probe))
                row["score_alone"] = baseline if candidate.is_exact else self.score({index: candidate})
                measured.append(row)
            blocks.append({"index": index, "node": captured.name, "batch": geometry.batch,
                           "q_heads": geometry.q_heads, "kv_heads": geometry.kv_heads,
                           "q_len": geometry.q_len, "k_len": geometry.k_len, "causal": geometry.causal,
                           "exact_cost": exact_cost, "knn_from": knn_from, "measured": measured})
        return blocks

    def _layer_stats(self, captured: layers.Capture, attributes: Attributes, probe) -> dict:
        """Mass, recall and output error of one setting on the captured inputs (upstream exact)."""
        y, observed = self._run_node(attributes, captured)
        stats = layers.layer_stats(layers.Capture(captured.name, attributes, captured.q, captured.k, captured.v,
                                                  captured.mask, y), probe, self.settings.rows_per_head,
                                   observed=observed)
        keep = ("mode", "mass_top_k", "mass_retrieved", "min_mass_retrieved", "recall", "keys_retrieved",
                "keys_scored", "output_cosine", "min_output_cosine", "output_max_abs_error")
        return {name: stats[name] for name in keep}

    def _run_node(self, attributes: Attributes, captured: layers.Capture):
        """One IceKNNAttention node with `attributes` on the captured inputs: its output, and
        what the native kernel reports it did (None on the numpy reference)."""
        feeds = {"Q": captured.q, "K": captured.k, "V": captured.v}
        if captured.mask is not None:
            feeds["attn_mask"] = captured.mask
        session = open_session(_node_model(attributes, captured.mask), self.settings.threads, self.backend)
        if self.backend != "native":
            return session.run(None, feeds)[0], None
        from ice_onnx.custom_ops.run_stats import run_stats

        with run_stats() as observed:
            y = session.run(None, feeds)[0]
        return y, observed.current()

    def _result(self, blocks, chosen, path, position, baseline, final_score, validated) -> dict:
        exact_total = sum(block["exact_cost"] for block in blocks)
        rows = []
        for block in blocks:
            candidate = chosen[block["index"]]
            row = next(m for m in block["measured"] if m["candidate"] == candidate)
            rows.append({**{k: v for k, v in block.items() if k != "measured"},
                         "choice": candidate.label,
                         "settings": candidate.plan_settings(block["knn_from"]),
                         "cost": row["cost"], "cost_ratio": row["cost_ratio"],
                         "chosen": _public(row),
                         "candidates": [_public(m) for m in block["measured"]]})
        plan_cost = sum(row["cost"] for row in rows)
        uniform = {}
        for candidate in self.candidates[1:]:
            total = sum(next(m["cost"] for m in b["measured"] if m["candidate"] == candidate) for b in blocks)
            uniform[candidate.label] = total / exact_total
        return {
            "schema": SCHEMA,
            "model": str(self.model_path),
            "metric": self.metric.name, "budget": self.budget,
            "outputs": self.judged,
            "calibration": {"samples": sum(calibration.sample_count(c) for c in self.chunks),
                            "shapes": {n: list(a.shape[1:]) for n, a in self.chunks[0].items()}},
            "candidates": [c.label for c in self.candidates],
            "threads": self.settings.threads, "backend": self.backend,
            "score": final_score, "meets_budget": self.metric.meets(final_score, self.budget),
            "all_exact_score": baseline,
            "cost": plan_cost, "exact_cost": exact_total, "cost_ratio": plan_cost / exact_total,
            "uniform_cost_ratio": uniform,
            "search": {"path_length": len(path), "position": position, "validated": validated},
            "blocks": rows,
        }


def plan_document(result: dict) -> dict:
    """PLAN.json: `blocks` is what `ice-onnx convert --plan` applies; `tuning` how it was chosen."""
    entries = [{"index": row["index"], **row["settings"]} for row in result["blocks"]]
    return {"schema": PLAN_SCHEMA, "blocks": entries, "tuning": result}


def _public(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "candidate"}


def _convert_exact(model_path: Path, seed: int, log) -> tuple[onnx.ModelProto, dict[str, int], set[int]]:
    """The model converted with every block exact; node name -> block index; tunable blocks."""
    from ice_onnx.rewriter import ConvertOptions, NoAttentionError, convert_file, inspect_file

    log(f"converting {model_path.name} (every block exact) ...")
    records = inspect_file(model_path).blocks
    exact = {r.index: {"exact_below": ALWAYS_EXACT} for r in records if r.replaced}
    if not exact:
        raise NoAttentionError(f"{model_path.name}: no convertible attention block")
    with tempfile.TemporaryDirectory(prefix="ice-onnx-tune-") as folder:
        out = Path(folder) / "exact.onnx"
        report = convert_file(model_path, out, ConvertOptions(seed=seed, plan=exact))
        model = onnx.load(str(out))
    # The report names each block's node: nodes map to the block indices a plan uses.
    block_of_node = {r.node: r.index for r in report.blocks if r.replaced}
    # Blocks the converter made always exact (a score bias) have nothing to tune.
    tunable = {r.index for r in report.blocks if r.replaced and not r.always_exact}
    if not tunable:
        raise NoAttentionError(f"{model_path.name}: every attention block must stay exact (nothing to tune)")
    return model, block_of_node, tunable


def _node_model(attributes: Attributes, mask: np.ndarray | None) -> onnx.ModelProto:
    float_type = onnx.TensorProto.FLOAT
    inputs = [onnx.helper.make_tensor_value_info(name, float_type, [None] * 4) for name in "QKV"]
    if mask is not None:
        mask_type = onnx.helper.np_dtype_to_tensor_dtype(mask.dtype)
        inputs.append(onnx.helper.make_tensor_value_info("attn_mask", mask_type, [None] * mask.ndim))
    node = onnx.helper.make_node(OP_TYPE, [i.name for i in inputs], ["Y"], domain=DOMAIN,
                                 **attributes.as_node_attributes())
    graph = onnx.helper.make_graph([node], "tune_node", inputs,
                                   [onnx.helper.make_tensor_value_info("Y", float_type, [None] * 4)])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17),
                                                        onnx.helper.make_opsetid(DOMAIN, VERSION)])


# ---- rendering ---------------------------------------------------------------------------


def render_table(result: dict) -> str:
    """Per block the choice, its cost and what it measured; then the plan's totals."""
    from ice_onnx.evaluation.bench import _short_names  # node names without their shared parts

    headings = ("block", "node", "keys", "choice", "cost", "mass", "recall", "layer cos", "alone")
    rows = [headings]
    for name, block in zip(_short_names([b["node"] for b in result["blocks"]]), result["blocks"]):
        chosen = block["chosen"]
        rows.append((str(block["index"]), name[-32:], str(block["k_len"]), block["choice"],
                     f"{block['cost_ratio']:.3f}", _fmt(chosen.get("mass_retrieved"), ".3f"),
                     _fmt(chosen.get("recall"), ".3f"), _fmt(chosen.get("output_cosine"), ".5f"),
                     _fmt(chosen.get("score_alone"), ".6g")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(headings))]
    lines = ["  ".join(cell.ljust(w) if i < 4 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    metric, budget = result["metric"], result["budget"]
    relation = ">=" if METRICS[metric].higher_is_better else "<="
    lines += [
        "",
        "cost: attention work relative to exact in the same block (docs/tuning.md); mass / recall: softmax mass on "
        "the keys used and recall of the exact top-k; layer cos: the block's output against exact attention; "
        f"alone: the model's {metric} with only this block changed",
        f"plan: attention cost {result['cost_ratio']:.3f} of all-exact (saves {1 - result['cost_ratio']:.1%}); "
        f"{metric} {result['score']:.6g} {relation} {budget}: "
        f"{'meets' if result['meets_budget'] else 'MISSES'} the budget on {result['calibration']['samples']} "
        f"calibration sample(s) (all-exact, then {len(result['search']['validated'])} plan(s) of the search, "
        "run end to end)",
    ]
    if result["uniform_cost_ratio"]:
        lines.append("one setting in every block (cost only, not run): " + ", ".join(
            f"{label} {ratio:.3f}" for label, ratio in result["uniform_cost_ratio"].items()))
    return "\n".join(lines)


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)
