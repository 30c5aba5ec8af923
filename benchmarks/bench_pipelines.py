"""SmolLM2-135M in the pipelines people run LLMs with, original vs converted: prefill and decode.

    python benchmarks/bench_pipelines.py [--lengths 200,2000,4000] [--rounds 3] [--steps 20]
        [--pipelines ort,genai,optimum] [--profile] [--json benchmarks/results/pipelines_smollm2.json]

The model is the real one `make smollm2` builds (.cache/smollm2): its with-past export,
converted here with `ice-onnx convert` at the defaults, and an onnxruntime-genai folder
built from its weights by genai's model builder, converted by `ice-onnx convert FOLDER`.
Both are cached in .cache/pipelines. The prompts are the first N tokens of a real text
(models/smollm2/texts.py). Three pipelines:

- `ort`: plain ONNX Runtime, a greedy loop over the with-past model (present fed back as past);
- `genai`: onnxruntime-genai's Generator (prefill = append_tokens, a step = generate_next_token);
- `optimum`: ORTModelForCausalLM.generate on a folder of the with-past model and the model's
  config (each step's end stamped by a stopping criterion). optimum needs the transformers
  that `make optimum` puts in .venv/optimum; that folder goes first on the path.

Per pipeline and prompt length, original and converted alternate `--rounds` times; each
round's prefill time and median decode-step time are kept, and the reported numbers are
the medians over rounds. Ratios are speeds relative to the original (original time over
converted time: 1.0 = as fast, above = faster). `--profile` adds ORT's profile of decode
steps at the longest prompt in plain ORT, original and converted: per op type, the costliest
nodes, and the nodes only one of them has (the replaced attention subgraphs against
IceKNNAttention and its mask); `--pipelines ""` runs the profile alone. Timings are
noisy on a shared machine: the machine's load (os.getloadavg) is recorded before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = REPO / ".cache" / "smollm2"
CACHE = REPO / ".cache" / "pipelines"
OPTIMUM_PATH = Path(os.environ.get("ICE_ONNX_OPTIMUM_PATH", Path(sys.prefix) / "optimum"))
if OPTIMUM_PATH.is_dir():
    sys.path.insert(0, str(OPTIMUM_PATH))  # before anything imports transformers
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))  # the recipes in models/ (after site-packages)

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

import ice_onnx  # noqa: E402
from models.smollm2 import texts  # noqa: E402

TEXT = "python-docs"
VARIANTS = ("original", "converted")


def quiet(command: list[str], **options) -> None:
    """Run `command`; its output only if it fails."""
    run = subprocess.run(command, capture_output=True, text=True, **options)
    if run.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{run.stderr[-3000:]}")


def ice_onnx_cli(*args: str) -> None:
    quiet([str(Path(sys.executable).with_name("ice-onnx")), *args])


def prepare() -> dict[str, dict[str, Path]]:
    """The folders each pipeline loads, built once into CACHE: {pipeline: {variant: path}}."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with_past = {variant: CACHE / f"with-past-{variant}" for variant in VARIANTS}
    for folder in with_past.values():
        folder.mkdir(exist_ok=True)
        for name in ("config.json", "generation_config.json"):
            shutil.copy(SMOLLM2 / "hf" / name, folder / name)
    if not (with_past["original"] / "model.onnx").exists():
        (with_past["original"] / "model.onnx").symlink_to(SMOLLM2 / "smollm2-with-past.onnx")
    if not (with_past["converted"] / "model.onnx").exists():
        ice_onnx_cli("convert", str(with_past["original"] / "model.onnx"), "-o",
                     str(with_past["converted"] / "model.onnx"))
    genai = {variant: CACHE / f"genai-{variant}" for variant in VARIANTS}
    if not (genai["original"] / "genai_config.json").exists():
        quiet([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(SMOLLM2 / "hf"),
               "-o", str(genai["original"]), "-p", "fp32", "-e", "cpu", "-c", str(CACHE / "genai-builder")],
              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if not (genai["converted"] / "genai_config.json").exists():
        ice_onnx_cli("convert", str(genai["original"]), "-o", str(genai["converted"]))
    return {"ort": with_past, "genai": genai, "optimum": with_past}


def with_threads(folder: Path, threads: int) -> Path:
    """A genai folder whose decoder runs `threads` intra-op threads: a sibling with its own
    genai_config.json and hard links to the other files (genai refuses files outside it)."""
    copy = folder.with_name(f"{folder.name}-{threads}-threads")
    copy.mkdir(exist_ok=True)
    for path in folder.iterdir():
        if path.name != "genai_config.json" and not (copy / path.name).exists():
            os.link(path, copy / path.name)
    config = json.loads((folder / "genai_config.json").read_text())
    config["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
    (copy / "genai_config.json").write_text(json.dumps(config, indent=4))
    return copy


def session_options(variant: str, threads: int) -> ort.SessionOptions:
    options = ice_onnx.session_options() if variant == "converted" else ort.SessionOptions()
    options.intra_op_num_threads = threads
    return options


class PlainOrt:
    """A greedy loop over the with-past model: the prompt in one run, then one token a run."""

    def __init__(self, folder: Path, variant: str, threads: int, clock=time.perf_counter,
                 options: ort.SessionOptions | None = None):
        self.clock = clock
        self.session = ort.InferenceSession(str(folder / "model.onnx"), options or session_options(variant, threads),
                                            providers=["CPUExecutionProvider"])
        self.past_names = [i.name for i in self.session.get_inputs() if i.name.startswith("past_key_values")]
        self.heads, self.head_dim = (self.session.get_inputs()[3].shape[i] for i in (1, 3))

    def run(self, prompt: np.ndarray, steps: int) -> tuple[float, list[float], list[int]]:
        past = [np.zeros((1, self.heads, 0, self.head_dim), np.float32)] * len(self.past_names)
        ids, tokens, times = prompt, [], []
        for _ in range(steps + 1):
            offset = past[0].shape[2]
            feeds = {"input_ids": ids[None], "attention_mask": np.ones((1, offset + len(ids)), np.int64),
                     "position_ids": np.arange(offset, offset + len(ids), dtype=np.int64)[None],
                     **dict(zip(self.past_names, past))}
            start = self.clock()
            logits, *past = self.session.run(None, feeds)
            times.append(self.clock() - start)
            ids = np.array([int(logits[0, -1].argmax())], np.int64)
            tokens.append(int(ids[0]))
        return times[0], times[1:], tokens


class Genai:
    def __init__(self, folder: Path, variant: str, threads: int, clock=time.perf_counter):
        import onnxruntime_genai as og

        self.og, self.model, self.clock = og, og.Model(str(with_threads(folder, threads))), clock

    def run(self, prompt: np.ndarray, steps: int) -> tuple[float, list[float], list[int]]:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=len(prompt) + steps + 1)
        generator = self.og.Generator(self.model, params)
        start = self.clock()
        generator.append_tokens(prompt.astype(np.int32))
        prefill = self.clock() - start
        tokens, times = [], []
        for _ in range(steps + 1):
            start = self.clock()
            generator.generate_next_token()
            times.append(self.clock() - start)
            tokens.append(int(generator.get_next_tokens()[0]))
        # The first call only picks the token from the prompt's logits; each later one runs a step.
        return prefill + times[0], times[1:], tokens


class Optimum:
    def __init__(self, folder: Path, variant: str, threads: int, clock=time.perf_counter):
        import torch
        from optimum.onnxruntime import ORTModelForCausalLM
        from transformers import StoppingCriteria

        self.torch, self.clock = torch, clock
        self.model = ORTModelForCausalLM.from_pretrained(folder, session_options=session_options(variant, threads))

        class Stamps(StoppingCriteria):
            """Each generated token's time; never stops generation."""

            def __init__(self):
                self.times = []

            def __call__(self, input_ids, scores, **kwargs):
                self.times.append(clock())
                return torch.zeros(input_ids.shape[0], dtype=torch.bool)

        self.stamps = Stamps

    def run(self, prompt: np.ndarray, steps: int) -> tuple[float, list[float], list[int]]:
        ids = self.torch.from_numpy(prompt[None])
        stamps = self.stamps()
        start = self.clock()
        out = self.model.generate(ids, attention_mask=self.torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=steps + 1, min_new_tokens=steps + 1, pad_token_id=2,
                                  stopping_criteria=[stamps])
        return stamps.times[0] - start, list(np.diff(stamps.times)), out[0, len(prompt):].tolist()


PIPELINES = {"ort": PlainOrt, "genai": Genai, "optimum": Optimum}
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def measure(pipeline: str, folders: dict[str, Path], prompts: dict[int, np.ndarray], rounds: int, steps: int,
            threads: int, clock) -> list[dict]:
    runners = {variant: PIPELINES[pipeline](folders[variant], variant, threads, clock) for variant in VARIANTS}
    results = []
    for length, prompt in prompts.items():
        runners["original"].run(prompt[:64], 2)  # warm-up: first-run allocations stay out of the numbers
        runners["converted"].run(prompt[:64], 2)
        prefill, step, tokens = defaultdict(list), defaultdict(list), {}
        for _ in range(rounds):
            for variant in VARIANTS:
                first, steps_s, tokens[variant] = runners[variant].run(prompt, steps)
                prefill[variant].append(first)
                step[variant].append(statistics.median(steps_s))
        row = {"pipeline": pipeline, "prompt_tokens": length, "decode_steps": steps,
               "prefill_s": dict(prefill), "decode_step_s": dict(step),
               "prefill_median_s": {v: statistics.median(prefill[v]) for v in VARIANTS},
               "decode_step_median_ms": {v: 1000 * statistics.median(step[v]) for v in VARIANTS},
               "same_tokens": tokens["original"] == tokens["converted"]}
        row["prefill_speed_ratio"] = row["prefill_median_s"]["original"] / row["prefill_median_s"]["converted"]
        row["decode_speed_ratio"] = row["decode_step_median_ms"]["original"] / row["decode_step_median_ms"]["converted"]
        print(f"{pipeline:8} {length:5} tokens  prefill {row['prefill_median_s']['original']:.3f} / "
              f"{row['prefill_median_s']['converted']:.3f} s ({row['prefill_speed_ratio']:.3f}x)  decode step "
              f"{row['decode_step_median_ms']['original']:.2f} / {row['decode_step_median_ms']['converted']:.2f} ms "
              f"({row['decode_speed_ratio']:.3f}x)  same tokens {row['same_tokens']}", flush=True)
        results.append(row)
    return results


def profile_decode(folders: dict[str, Path], prompt: np.ndarray, steps: int, threads: int) -> dict:
    """ORT's profile of `steps` decode steps after `prompt` in plain ORT, per variant: the
    step's milliseconds in all, per op type, in the ten costliest nodes, and in the nodes only
    that variant has (the original's: the attention subgraphs the converter replaced; the
    converted one's: IceKNNAttention and the mask it is fed)."""
    per_node = {}
    for variant in VARIANTS:
        options = session_options(variant, threads)
        options.enable_profiling = True
        options.profile_file_prefix = str(CACHE / f"profile-{variant}")
        runner = PlainOrt(folders[variant], variant, threads, options=options)
        runner.run(prompt, steps)
        events = json.loads(Path(runner.session.end_profiling()).read_text())
        # The first run is the prompt's: only the steps after it count.
        runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
        steps_start = runs[0]["ts"] + runs[0]["dur"]
        nodes = defaultdict(lambda: [0.0, ""])
        for event in events:
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= steps_start:
                node = nodes[event["name"].removesuffix("_kernel_time")]
                node[0] += event["dur"] / 1000 / steps
                node[1] = event["args"]["op_name"]
        per_node[variant] = nodes

    def top(table: dict, n: int) -> dict:
        return {k: round(v, 3) for k, v in sorted(table.items(), key=lambda kv: -kv[1])[:n]}

    profiles = {}
    for variant, other in zip(VARIANTS, reversed(VARIANTS)):
        nodes = per_node[variant]
        by_type, own_by_type = defaultdict(float), defaultdict(float)
        for name, (ms, op) in nodes.items():
            by_type[op] += ms
            if name not in per_node[other]:
                own_by_type[op] += ms
        profiles[variant] = {"ms_per_step": round(sum(ms for ms, _ in nodes.values()), 3),
                             "ms_per_step_in_own_nodes": round(sum(own_by_type.values()), 3),
                             "own_nodes_by_op_type": top(own_by_type, 10),
                             "by_op_type": top(by_type, 15),
                             "costliest_nodes": top({name: ms for name, (ms, _) in nodes.items()}, 10)}
    return {"pipeline": "ort", "prompt_tokens": len(prompt), "steps": steps, "load_average": os.getloadavg(),
            **profiles}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="200,2000,4000", help="prompt lengths in tokens, comma-separated")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per configuration, original and converted alternating")
    parser.add_argument("--steps", type=int, default=20, help="decode steps timed after each prompt")
    parser.add_argument("--pipelines", default=",".join(PIPELINES),
                        help="comma-separated, of: " + ", ".join(PIPELINES) + " (empty: --profile only)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op threads")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall: elapsed time; cpu: the calling thread's CPU time, which a loaded machine "
                             "barely moves (needs --threads 1: ORT then works on the calling thread)")
    parser.add_argument("--profile", action="store_true", help="profile plain ORT's decode steps at the longest prompt")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu needs --threads 1 (other threads' work is not the calling thread's CPU time)")

    from tokenizers import Tokenizer

    lengths = [int(n) for n in args.lengths.split(",")]
    ids = Tokenizer.from_file(str(SMOLLM2 / "hf" / "tokenizer.json")).encode(texts.text(TEXT), add_special_tokens=False).ids
    prompts = {n: np.asarray(ids[:n], np.int64) for n in lengths}
    folders = prepare()
    load_before = os.getloadavg()
    results = []
    pipelines = [name for name in args.pipelines.split(",") if name]
    for pipeline in pipelines:
        results += measure(pipeline, folders[pipeline], prompts, args.rounds, args.steps, args.threads,
                           CLOCKS[args.clock])
    profile = profile_decode(folders["ort"], prompts[max(lengths)], args.steps, args.threads) if args.profile else None
    report = {"model": "SmolLM2-135M-Instruct (.cache/smollm2), float32", "text": TEXT, "rounds": args.rounds,
              "clock": args.clock, "threads": args.threads, "cpus": os.cpu_count(), "load_average_before": load_before,
              "load_average_after": os.getloadavg(),
              "versions": {"onnxruntime": ort.__version__, **package_versions(pipelines)},
              "results": results, "profile": profile}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")


def package_versions(pipelines: list[str]) -> dict[str, str]:
    from importlib.metadata import version

    names = {"genai": ["onnxruntime-genai"], "optimum": ["optimum-onnx", "optimum", "transformers"]}
    return {name: version(name) for pipeline in pipelines for name in names.get(pipeline, [])}


if __name__ == "__main__":
    main()
