"""Train the ListOps encoder from scratch; resumable; one command:

    nice -n 10 python -m models.listops.train            # starts or resumes
    python -m models.listops.train --fresh               # ignores the checkpoint

Curriculum over expression length (token count ranges below, the last one LRA's
500..2000), a fixed number of steps per stage. Each step draws its expressions from
(seed, step) only, so a resumed run sees the batches an uninterrupted one would.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from .. import training
from . import RECIPE
from .model import build_model
from .task import LRA_MAX_LENGTH, LRA_MIN_LENGTH, Vocab, make_batch

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
    training.add_schedule_options(parser, lr=5e-4, warmup=200, tokens_per_step=4096)
    parser.add_argument("--stage-steps", type=int, default=500, help="steps per curriculum stage")
    training.add_run_options(parser, eval_every=500, checkpoint=RECIPE.checkpoint, log=RECIPE.training_log)
    args = parser.parse_args(argv)

    run = training.Run(args)
    vocab = Vocab.build()
    model = build_model(len(vocab))
    optimizer = run.optimizer(model)
    step = 0
    state = run.resume(model, optimizer, stages=STAGES)
    if state is not None:
        step = state["step"]
        run.log({"event": "resume", "step": step})

    recent = []
    model.train()
    while step < args.max_steps:
        min_length, max_length = STAGES[min(step // args.stage_steps, len(STAGES) - 1)]
        batch_size = max(1, args.tokens_per_step // max_length)
        ids, mask, labels = make_batch(vocab, (args.seed, step), batch_size, min_length, max_length)
        logits = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
        loss = F.cross_entropy(logits, torch.from_numpy(labels))
        run.optimize(model, optimizer, loss, step)
        step += 1

        recent.append((logits.argmax(-1).numpy() == labels).mean())
        if step % 20 == 0:
            run.log({"step": step, "time_s": round(run.seconds()), "lengths": [min_length, max_length],
                     "loss": round(loss.item(), 4), "recent_accuracy": round(float(np.mean(recent)), 3)})
            recent = []
        if step % args.eval_every == 0:
            run.log({"event": "eval", "step": step, "lra_length_accuracy": evaluate_torch(model, vocab)})
        if run.end_step(step, model, optimizer):
            break


if __name__ == "__main__":
    main()
