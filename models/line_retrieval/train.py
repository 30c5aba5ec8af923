"""Train the line-retrieval model from scratch; resumable; one command:

    nice -n 10 python -m models.line_retrieval.train            # starts or resumes
    python -m models.line_retrieval.train --fresh               # ignores the checkpoint

Curriculum: each step draws a context length log-uniformly between MIN_LENGTH and the
current stage's maximum; a stage ends when recent accuracy on its longest contexts
reaches ADVANCE_ACCURACY. Each training sequence asks many questions (one supervised
answer each). The data of step s depends only on (seed, s), so a resumed run sees the
same batches as an uninterrupted one.

Auxiliary attention losses seed the retrieval circuit, which plain training did not find
in the time we had (loss stuck at ln 1000, accuracy 0 after 210 steps):
- retrieval (--aux-weight, --aux-layer): head 0 of a middle layer attends from each
  question's "is" to the queried line's number;
- key tag (--tag-weight, --tag-layer): head 0 of the first layer attends from each
  number and each question's "is" to the key of its own line, so that the number and
  the question carry the key that the retrieval head matches;
- copy (--copy-weight): what the retrieval head writes, read through the (tied) output
  embedding, must already predict the answer. Without it the model attended to the
  right number (~60 % of the head's weight) yet did not copy it for 200 steps.
"""
from __future__ import annotations

import argparse
import math
from collections import deque

import numpy as np
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .. import training
from . import RECIPE
from .model import EMBEDDING_INIT_STD, build_model, initialize_embeddings
from .task import QUESTION_HEADER, RECORD_HEADER, TOKENS_PER_LINE, Vocab, lines_for_length, make_prompt

STAGES = (128, 256, 512, 1024, 2048, 4096, 8192)  # maximum context length of each stage
MIN_LENGTH = 64
ADVANCE_ACCURACY = 0.9
ADVANCE_WINDOW = 40  # recent long-context steps averaged for the stage decision
EVAL_LENGTHS = (256, 1024, 2048, 4096)


def questions_for_length(length: int) -> int:
    return int(np.clip(length // 32, 2, 32))


def value_position(line: int) -> int:
    return len(RECORD_HEADER) + TOKENS_PER_LINE * line + 5


def make_training_batch(vocab: Vocab, seed: int, length: int, tokens_per_step: int):
    """Token ids (B, L), answer positions (B, Q), answers (B, Q), queried value positions (B, Q)."""
    rng = np.random.default_rng(seed)
    num_questions = questions_for_length(length)
    num_lines = lines_for_length(length, num_questions)
    prompts = [
        make_prompt(vocab, rng, num_lines, num_questions) for _ in range(max(1, tokens_per_step // length))
    ]
    stack = lambda name: torch.from_numpy(np.stack([getattr(p, name) for p in prompts]))  # noqa: E731
    return stack("ids"), stack("answer_positions"), stack("answers"), value_position(stack("queried_lines"))


class AttentionProbe:
    """Captures one layer's queries and keys so the loss can read one head's attention
    rows at a few positions without materialising the full attention matrix."""

    def __init__(self, model, layer: int):
        attn = model.model.layers[layer].self_attn
        self.head_dim = attn.head_dim
        self.groups = model.config.num_attention_heads // model.config.num_key_value_heads
        self.rotary = model.model.rotary_emb
        self.output_projection = attn.o_proj
        self.captured = {}
        attn.q_proj.register_forward_hook(lambda m, i, o: self.captured.__setitem__("q", o))
        attn.k_proj.register_forward_hook(lambda m, i, o: self.captured.__setitem__("k", o))
        attn.o_proj.register_forward_pre_hook(lambda m, i: self.captured.__setitem__("heads", i[0]))

    def head_output(self, head: int, rows: torch.Tensor) -> torch.Tensor:
        """What `head` adds to the residual stream at positions rows (B, Q): (B, Q, hidden)."""
        heads = self.captured["heads"]
        width = slice(head * self.head_dim, (head + 1) * self.head_dim)
        picked = heads[..., width].gather(1, rows.unsqueeze(-1).expand(-1, -1, self.head_dim))
        return picked @ self.output_projection.weight[:, width].T

    def log_attention(self, head: int, rows: torch.Tensor) -> torch.Tensor:
        """log softmax attention of `head` from positions rows (B, Q) to all keys: (B, Q, L)."""
        q, k = self.captured["q"], self.captured["k"]
        batch, length, _ = q.shape
        q = q.view(batch, length, -1, self.head_dim)[:, :, head].unsqueeze(1)  # (B, 1, L, d)
        k = k.view(batch, length, -1, self.head_dim)[:, :, head // self.groups].unsqueeze(1)
        positions = torch.arange(length).unsqueeze(0)
        cos, sin = self.rotary(q, positions)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        q_rows = q[:, 0].gather(1, rows.unsqueeze(-1).expand(-1, -1, self.head_dim))  # (B, Q, d)
        scores = q_rows @ k[:, 0].transpose(1, 2) / math.sqrt(self.head_dim)  # (B, Q, L)
        causal = torch.arange(length).view(1, 1, -1) > rows.unsqueeze(-1)
        return scores.masked_fill(causal, float("-inf")).log_softmax(-1)


def key_tag_rows(answer_positions: torch.Tensor, seed) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows for the key-tag loss and their targets (B, 2Q): the numbers of as many random
    record lines as there are questions, and the questions' "is", each pointing at its
    own line's key (4 and 3 tokens back)."""
    batch, questions = answer_positions.shape
    # The first question's line starts 4 tokens before its "is", after the record header,
    # the record lines and the question header.
    record_lines = (answer_positions[:, :1] - 4 - len(RECORD_HEADER) - len(QUESTION_HEADER)) // TOKENS_PER_LINE
    rng = np.random.default_rng(seed)
    lines = torch.from_numpy(rng.integers(0, 1 << 30, size=(batch, questions))) % record_lines
    numbers = value_position(lines)
    return torch.cat([numbers, answer_positions], 1), torch.cat([numbers - 4, answer_positions - 3], 1)


def answer_logits(model, ids: torch.Tensor, answer_positions: torch.Tensor) -> torch.Tensor:
    hidden = model.model(input_ids=ids).last_hidden_state
    rows = hidden.gather(1, answer_positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    return model.lm_head(rows)  # (B, Q, vocab)


@torch.no_grad()
def evaluate_torch(model, vocab: Vocab, lengths, sequences: int = 4, seed: int = 10_000) -> dict[int, float]:
    """Accuracy over all questions of a fixed set of multi-question prompts per length."""
    model.eval()
    accuracy = {}
    for length in lengths:
        correct = total = 0
        for i in range(sequences):
            ids, positions, answers, _ = make_training_batch(vocab, seed + 7919 * length + i, length, length)
            predicted = answer_logits(model, ids, positions).argmax(-1)
            correct += (predicted == answers).sum().item()
            total += answers.numel()
        accuracy[length] = correct / total
    model.train()
    return accuracy


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    training.add_schedule_options(parser, lr=1e-3, warmup=100, tokens_per_step=2048)
    parser.add_argument("--aux-weight", type=float, default=1.0)
    parser.add_argument("--aux-layer", type=int, default=2)
    parser.add_argument("--copy-weight", type=float, default=1.0)
    parser.add_argument("--tag-weight", type=float, default=1.0)
    parser.add_argument("--tag-layer", type=int, default=0)
    parser.add_argument("--embedding-std", type=float, default=EMBEDDING_INIT_STD)
    parser.add_argument("--class-std", type=float, default=None, help="shared class vector scale (default: as --embedding-std)")
    training.add_run_options(parser, eval_every=200, checkpoint=RECIPE.checkpoint, log=RECIPE.training_log)
    args = parser.parse_args(argv)

    run = training.Run(args)
    vocab = Vocab.build()
    model = build_model(len(vocab))
    initialize_embeddings(model, vocab.token_classes(), args.embedding_std, args.class_std)
    optimizer = run.optimizer(model)
    step, stage = 0, 0
    state = run.resume(model, optimizer, stages=STAGES)
    if state is not None:
        step, stage = state["step"], state["stage"]
        run.log({"event": "resume", "step": step, "stage": stage, "max_length": STAGES[stage]})
    retrieval_probe = AttentionProbe(model, args.aux_layer) if args.aux_weight + args.copy_weight > 0 else None
    tag_probe = AttentionProbe(model, args.tag_layer) if args.tag_weight > 0 else None

    recent_long = deque(maxlen=ADVANCE_WINDOW)
    model.train()
    while step < args.max_steps:
        rng = np.random.default_rng((args.seed, step))
        max_length = STAGES[stage]
        length = int(round(math.exp(rng.uniform(math.log(MIN_LENGTH), math.log(max_length)))))
        ids, positions, answers, targets = make_training_batch(vocab, (args.seed, step, 1), length, args.tokens_per_step)

        logits = answer_logits(model, ids, positions)
        loss = F.cross_entropy(logits.flatten(0, 1), answers.flatten())
        total, aux, tag, copy = loss, None, None, None
        if args.aux_weight > 0:
            aux = -retrieval_probe.log_attention(0, positions).gather(2, targets.unsqueeze(-1)).mean()
            total = total + args.aux_weight * aux
        if args.copy_weight > 0:
            copied = model.lm_head(retrieval_probe.head_output(0, positions))
            copy = F.cross_entropy(copied.flatten(0, 1), answers.flatten())
            total = total + args.copy_weight * copy
        if tag_probe is not None:
            rows, keys = key_tag_rows(positions, (args.seed, step, 2))
            tag = -tag_probe.log_attention(0, rows).gather(2, keys.unsqueeze(-1)).mean()
            total = total + args.tag_weight * tag
        run.optimize(model, optimizer, total, step)
        step += 1

        accuracy = (logits.argmax(-1) == answers).float().mean().item()
        if length >= max_length / 2:
            recent_long.append(accuracy)
        if step % 10 == 0:
            entry = {"step": step, "time_s": round(run.seconds()), "max_length": max_length,
                      "length": length, "loss": round(loss.item(), 4), "accuracy": round(accuracy, 3),
                      "recent_long_accuracy": round(float(np.mean(recent_long)), 3) if recent_long else None}
            if aux is not None:
                entry["aux_loss"] = round(aux.item(), 4)
            if copy is not None:
                entry["copy_loss"] = round(copy.item(), 4)
            if tag is not None:
                entry["tag_loss"] = round(tag.item(), 4)
            run.log(entry)
        if (len(recent_long) == ADVANCE_WINDOW and np.mean(recent_long) >= ADVANCE_ACCURACY
                and stage + 1 < len(STAGES)):
            stage += 1
            recent_long.clear()
            run.log({"event": "advance", "step": step, "max_length": STAGES[stage]})
        if step % args.eval_every == 0:
            run.log({"event": "eval", "step": step, "accuracy": evaluate_torch(model, vocab, EVAL_LENGTHS)})
        if run.end_step(step, model, optimizer, stage=stage):
            break


if __name__ == "__main__":
    main()
