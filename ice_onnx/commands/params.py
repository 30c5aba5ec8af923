"""Option types shared by the commands: bounded, so that a value the runtime cannot
hold is a usage error (exit 2) when the command line is parsed, not a failure deep inside."""

from __future__ import annotations

import math

import click

INT64_MAX = 2**63 - 1  # node attributes (top_k, exact_below, seed) are int64
INT32_MAX = 2**31 - 1  # onnxruntime's thread counts and numpy shapes built from lengths and counts


def attribute(min: int | None = None) -> click.IntRange:  # noqa: A002 - Click's own keyword
    """An option that becomes an int64 attribute of the IceKNNAttention nodes."""
    return click.IntRange(min=-INT64_MAX - 1 if min is None else min, max=INT64_MAX)


def count(min: int = 1) -> click.IntRange:  # noqa: A002
    """A count or length (threads, samples, tokens, batch size)."""
    return click.IntRange(min=min, max=INT32_MAX)


class FiniteFloat(click.ParamType):
    """A float at least `min`, and finite: Click's FloatRange lets `inf` and `nan` through, which
    the kernel would refuse only when the model runs."""

    name = "float"

    def __init__(self, min: float = 0.0):  # noqa: A002
        self.min = min

    def convert(self, value, param, ctx):
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{str(value)[:40]!r} is not a number", param, ctx)
        if not math.isfinite(number) or number < self.min:
            self.fail(f"{str(value)[:40]} is not a finite number >= {self.min:g}", param, ctx)
        return number


def kernel_attributes(example: str):
    """`--attribute NAME=VALUE` (repeatable): kernel attributes set on every converted block,
    parsed against the contract into {name: value}; a bad one is a one-line usage error."""

    def parse(ctx, param, specs) -> dict:
        from ice_onnx.errors import EXIT_USAGE, IceError
        from ice_onnx.evaluation.runtime import parse_attributes

        try:
            return parse_attributes(specs)
        except ValueError as exc:
            raise IceError(str(exc), EXIT_USAGE) from None

    return click.option("--attribute", "attributes", multiple=True, metavar="NAME=VALUE", callback=parse,
                        help=f"then set this kernel attribute on every converted block, e.g. {example} "
                             "(custom_ops/CONTRACT.md; repeatable).")
