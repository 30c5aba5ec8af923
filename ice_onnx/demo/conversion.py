"""The demo's converted model: converted once with given settings and reused while the source
model, the settings and the installed converter stay the same (converting SmolLM2 takes longer
than a short demo run), and which attention path its blocks take, read from their settings."""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path


def _converter_fingerprint() -> str:
    """A hash of the installed converter (rewriter and contract sources) and the package version."""
    import ice_onnx
    from ice_onnx import rewriter
    from ice_onnx.custom_ops import contract

    digest = hashlib.sha256(ice_onnx.__version__.encode())
    for path in sorted(Path(rewriter.__file__).parent.rglob("*.py")) + [Path(contract.__file__)]:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _cache_key(source: Path, options) -> dict:
    stat = source.stat()
    return {"source": str(source), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "options": json.loads(json.dumps(dataclasses.asdict(options), default=str)),
            "converter": _converter_fingerprint()}


def converted_model(source: Path, options, folder: Path, say) -> tuple[Path, dict]:
    """`source` converted with `options` (a ConvertOptions) into `folder`, reused while the source,
    the options and the converter are the same. Returns its path and a record: the key, the
    blocks replaced, each block's heads and its IceKNNAttention settings."""
    import onnx

    from ice_onnx.commands.convert import report_errors
    from ice_onnx.evaluation.causal_lm import block_attributes
    from ice_onnx.rewriter import convert_file

    output = folder / f"{source.stem}.ice.onnx"
    record_file = output.with_suffix(".json")
    key = _cache_key(source, options)
    try:
        record = json.loads(record_file.read_text(encoding="utf-8"))
        if record.get("key") == key and output.is_file():
            say(f"converted model: {output} (cached)")
            return output, record
    except (OSError, ValueError):
        pass
    say(f"converting {source.name} -> {output} ...")
    folder.mkdir(parents=True, exist_ok=True)
    record_file.unlink(missing_ok=True)
    with report_errors():
        report = convert_file(source, output, options)
    attributes = block_attributes(onnx.load(str(output)))
    record = {"key": key, "attention_blocks": len(report.blocks), "replaced": report.replaced,
              "blocks": [{"index": block.index, "q_heads": block.q_heads, "kv_heads": block.kv_heads}
                         for block in report.blocks if block.replaced],
              "attributes": [dataclasses.asdict(attrs) for attrs in attributes]}
    staging = record_file.with_suffix(f".{os.getpid()}.tmp")
    staging.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    staging.replace(record_file)
    say(f"converted {report.replaced} of {len(report.blocks)} attention blocks")
    return output, record


@dataclass
class Modes:
    """Which attention path the converted blocks take, by the contract's rule."""

    attributes: list  # custom_ops.contract.Attributes per converted block
    groups: list[int]  # query heads per kv head, per block

    @classmethod
    def of(cls, record: dict) -> "Modes":
        from ice_onnx.custom_ops.contract import Attributes

        return cls([Attributes(**attrs) for attrs in record["attributes"]],
                   [block["q_heads"] // block["kv_heads"] for block in record["blocks"]])

    def knn_from(self) -> list[int | None]:
        """Per block, the fewest keys that take the kNN path given enough queries (None: never)."""
        from ice_onnx.custom_ops.contract import ALWAYS_EXACT

        keys = range(ALWAYS_EXACT)
        least = [bisect.bisect_left(keys, True, key=attrs.uses_knn) for attrs in self.attributes]
        return [value if value < ALWAYS_EXACT else None for value in least]

    def knn_blocks(self, queries: int, keys: int) -> int:
        """Blocks whose call with `queries` new tokens over `keys` keys runs kNN."""
        return sum(attrs.uses_knn(keys, queries * groups) for attrs, groups in zip(self.attributes, self.groups))
