"""Train the ListOps encoder from scratch; resumable; one command:

    nice -n 10 python -m models.listops.train            # starts or resumes
    python -m models.listops.train --fresh               # ignores the checkpoint

Curriculum over expression length (token count ranges below, the last one LRA's
500..2000), a fixed number of steps per stage. Each step draws its expressions from
(seed, step) only, so a resumed run sees the batches an uninterrupted one would.
"""
from __future__ import annotations

import argparse
import functools
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..line_retrieval.train import log, save_checkpoint
from .model import build_model
from .task import LRA_MAX_LENGTH, LRA_MIN_LENGTH, Vocab, make_batch

HERE = Path(__file__).resolve().parent
CHECKPOINT = HERE / "checkpoints" / "last.pt"
LOG = HERE / "train_log.jsonl"

STAGES = ((10, 100), (50, 300), (150, 800), (LRA_MIN_LENGTH, LRA_MAX_LENGTH))  # token-count ranges
EVAL_SEED = 30_000


@torch.no_grad()
def evaluate_torch(model, vocab: Vocab, samples: int = 64, batch_size: int = 8) -> float:
    """Accuracy on fixed LRA-length expressions (500..2000 tokens)."""
    model.eval()
    correct = 0
    for start in range(0, samples, batch_size):
        ids, mask, labels = make_batch(vocab, (EVAL_SEED, start), batch_size)
        logits = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
        correct += (logits.argmax(-1).numpy() == labels).sum()
    model.train()
    return float(correct / samples)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--tokens-per-step", type=int, default=4096)
    parser.add_argument("--stage-steps", type=int, default=500, help="steps per curriculum stage")
    parser.add_argument("--max-steps", type=int, default=40_000)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--checkpoint-minutes", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    parser.add_argument("--log", type=Path, default=LOG)
    parser.add_argument("--fresh", action="store_true", help="start over even if a checkpoint exists")
    args = parser.parse_args(argv)
    record = functools.partial(log, path=args.log)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    vocab = Vocab.build()
    model = build_model(len(vocab))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    step, elapsed = 0, 0.0
    if args.checkpoint.exists() and not args.fresh:
        state = torch.load(args.checkpoint, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed = state["step"], state["elapsed"]
        record({"event": "resume", "step": step})
    else:
        record({"event": "start", "args": {k: str(v) for k, v in vars(args).items()}, "stages": STAGES})

    last_save = time.time()
    started = time.time() - elapsed
    recent = []
    stop = []  # SIGTERM ends the run after the current step, with a checkpoint
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    model.train()
    while step < args.max_steps:
        min_length, max_length = STAGES[min(step // args.stage_steps, len(STAGES) - 1)]
        batch_size = max(1, args.tokens_per_step // max_length)
        ids, mask, labels = make_batch(vocab, (args.seed, step), batch_size, min_length, max_length)
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
        logits = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
        loss = F.cross_entropy(logits, torch.from_numpy(labels))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1

        recent.append((logits.argmax(-1).numpy() == labels).mean())
        if step % 20 == 0:
            record({"step": step, "time_s": round(time.time() - started), "lengths": [min_length, max_length],
                    "loss": round(loss.item(), 4), "recent_accuracy": round(float(np.mean(recent)), 3)})
            recent = []
        if step % args.eval_every == 0:
            record({"event": "eval", "step": step, "lra_length_accuracy": evaluate_torch(model, vocab)})
        if time.time() - last_save > 60 * args.checkpoint_minutes or step == args.max_steps or stop:
            save_checkpoint(args.checkpoint, model=model.state_dict(), optimizer=optimizer.state_dict(),
                            step=step, elapsed=time.time() - started, args=vars(args))
            last_save = time.time()
        if stop:
            record({"event": "stopped", "step": step})
            break


if __name__ == "__main__":
    main()
