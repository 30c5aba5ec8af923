"""One record per attention block, rendered as a text table or JSON at the edge."""

from __future__ import annotations

import dataclasses
import json


@dataclasses.dataclass
class BlockRecord:
    index: int
    family: str
    output: str  # name of the value the block computes
    nodes: list[str]
    q_heads: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    scale: float | None = None
    mask: str = "none"  # none / padding / causal / both / sliding-window / not-finite / general / bias
    replaced: bool = False
    always_exact: bool = False
    reason: str | None = None  # why not replaced, or a note on how it was
    node: str | None = None  # the name of the IceKNNAttention node that replaced it


@dataclasses.dataclass
class ConversionReport:
    model: str
    blocks: list[BlockRecord] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    output: str | None = None
    dry_run: bool = False  # inspect: "replaced" means "would be replaced"

    @property
    def replaced(self) -> int:
        return sum(block.replaced for block in self.blocks)

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "output": self.output,
            "attention_blocks": len(self.blocks),
            "replaced": self.replaced,
            "dry_run": self.dry_run,
            "notes": self.notes,
            "blocks": [dataclasses.asdict(block) for block in self.blocks],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_text(self) -> str:
        header = ("#", "family", "heads q/kv", "head dim", "scale", "mask", "status")
        rows = [header]
        for block in self.blocks:
            done = "convertible" if self.dry_run else "replaced"
            status = done + (" (always exact)" if block.always_exact else "") if block.replaced else "kept"
            if block.reason:
                status += f": {block.reason}"
            rows.append((
                str(block.index),
                block.family,
                f"{_maybe(block.q_heads)}/{_maybe(block.kv_heads)}",
                _maybe(block.head_dim),
                _scale_text(block.scale),
                block.mask,
                status,
            ))
        widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths)) + "  " + row[-1] for row in rows]
        done = "convertible" if self.dry_run else "replaced"
        summary = f"{self.model}: {len(self.blocks)} attention block(s), {self.replaced} {done}"
        if self.output:
            summary += f" -> {self.output}"
        return "\n".join([summary, *lines, *(f"note: {n}" for n in self.notes)])


def _scale_text(scale: float | None) -> str:
    if scale is None:
        return "?"
    return "1/sqrt(D)" if scale == 0 else f"{scale:.6g}"  # 0: the op's default, as in the contract


def _maybe(value) -> str:
    return "?" if value is None else str(value)
