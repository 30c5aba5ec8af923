"""What the trained models' training scripts share: the common command-line options,
the resumable checkpoint, the JSONL log and a clean stop on SIGTERM.

A task script adds its own options between `add_schedule_options` and
`add_run_options`, builds its model, then drives a `Run`:

    run = Run(args)                                  # threads, seed, SIGTERM
    optimizer = run.optimizer(model)
    state = run.resume(model, optimizer)             # None: fresh start
    while step < args.max_steps:
        ...
        run.optimize(model, optimizer, loss, step)
        step += 1
        if run.end_step(step, model, optimizer, stage=stage):
            break
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path

import torch


def add_schedule_options(parser: argparse.ArgumentParser, *, lr: float, warmup: int, tokens_per_step: int,
                         max_steps: int = 40_000) -> None:
    """--seed --lr --warmup --tokens-per-step --max-steps, with the task's defaults."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--tokens-per-step", type=int, default=tokens_per_step)
    parser.add_argument("--max-steps", type=int, default=max_steps)


def add_run_options(parser: argparse.ArgumentParser, *, eval_every: int, checkpoint: Path, log: Path) -> None:
    """--eval-every --checkpoint-minutes --threads --checkpoint --log --fresh."""
    parser.add_argument("--eval-every", type=int, default=eval_every)
    parser.add_argument("--checkpoint-minutes", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--checkpoint", type=Path, default=checkpoint)
    parser.add_argument("--log", type=Path, default=log)
    parser.add_argument("--fresh", action="store_true", help="start over even if a checkpoint exists")


def save_checkpoint(path: Path, **state) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a kill mid-write leaves the previous checkpoint


def log(entry: dict, path: Path) -> None:
    """Print `entry` as one JSON line and append it to `path`."""
    print(json.dumps(entry), flush=True)
    with path.open("a") as f:
        f.write(json.dumps(entry) + "\n")


class Run:
    """One training run's bookkeeping. Creating it sets the thread count and the torch
    seed (before the model is built, so initialisation is seeded) and makes SIGTERM end
    the run after the current step, with a checkpoint."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        torch.set_num_threads(args.threads)
        torch.manual_seed(args.seed)
        self.stop_requested = False
        signal.signal(signal.SIGTERM, self._request_stop)
        self.started = self.last_save = time.time()

    def _request_stop(self, *_) -> None:
        self.stop_requested = True

    def log(self, entry: dict) -> None:
        log(entry, self.args.log)

    def optimizer(self, model) -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=self.args.lr, betas=(0.9, 0.98), weight_decay=0.01)

    def resume(self, model, optimizer, **start_info) -> dict | None:
        """Load model and optimizer from the checkpoint and return its whole state (the
        caller logs its own "resume" entry); with --fresh or no checkpoint, log the
        start (the arguments and `start_info`) and return None."""
        if self.args.checkpoint.exists() and not self.args.fresh:
            state = torch.load(self.args.checkpoint, weights_only=False)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            self.started = time.time() - state["elapsed"]  # the clock continues across sittings
            return state
        self.log({"event": "start", "args": {k: str(v) for k, v in vars(self.args).items()}, **start_info})
        return None

    def seconds(self) -> float:
        """Training time so far, over all sittings."""
        return time.time() - self.started

    def optimize(self, model, optimizer, loss: torch.Tensor, step: int) -> None:
        """One update from `loss`: linear warm-up of the learning rate, gradients clipped to norm 1."""
        for group in optimizer.param_groups:
            group["lr"] = self.args.lr * min(1.0, (step + 1) / self.args.warmup)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    def end_step(self, step: int, model, optimizer, **extra) -> bool:
        """After step `step`: checkpoint when it is time (every --checkpoint-minutes, at the
        last step, on a stop request), with `extra` saved beside step and elapsed time.
        True when the run should stop now (a SIGTERM came; logged)."""
        args = self.args
        stopping = self.stop_requested  # read once: a SIGTERM arriving in between still gets its checkpoint
        if time.time() - self.last_save > 60 * args.checkpoint_minutes or step == args.max_steps or stopping:
            save_checkpoint(args.checkpoint, model=model.state_dict(), optimizer=optimizer.state_dict(),
                            step=step, **extra, elapsed=self.seconds(), args=vars(args))
            self.last_save = time.time()
        if stopping:
            self.log({"event": "stopped", "step": step})
        return stopping
