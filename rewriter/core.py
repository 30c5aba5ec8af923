"""The canonical attention core every rule produces, whatever shape it matched.

A rule recognises one family of graphs and describes what it found as an
`AttentionCore`: which values are Q, K and V and how they reach the contract's
[B, H, S, D] layout (`Layout`), what the op does to the scores (`Scores`), which keys
each query may see (`Masking`), the KV cache a fused op carries, and which nodes the
block covers. Everything after matching (mask analysis, emission, the report) works on
this one form.
"""

from __future__ import annotations

import dataclasses
import enum

import onnx_ir as ir


class MaskTermKind(enum.Enum):
    ADDITIVE = "additive"  # float tensor added to the scaled scores
    KEEP = "keep"  # bool tensor: true = the key may be attended to
    DROP = "drop"  # bool tensor: true = the key is blocked
    KEY_LENGTHS = "key_lengths"  # int [B]: keys at positions >= length are blocked (right padding)
    # Keys around each query's position the contract's attributes cannot say (a causal or windowed
    # pattern aligned top-left, a window over later keys): query i at position p = i + offset sees
    # key j iff p - left <= j <= p + right (`band`, None = unbounded), offset 0 ("top-left"),
    # Sk - Sq ("bottom-right") or lengths[b] - Sq ("lengths": value holds the int [B] lengths).
    BAND = "band"


# Defined by the op from its inputs (not a mask tensor of the graph): nothing to probe.
OP_DEFINED_TERMS = (MaskTermKind.KEY_LENGTHS, MaskTermKind.BAND)


@dataclasses.dataclass
class MaskTerm:
    kind: MaskTermKind
    value: ir.Value | None
    key_padding_2d: bool = False  # a [B, Sk] 0/1 key mask (com.microsoft ops), not broadcastable to scores
    band: tuple[int | None, int | None] | None = None  # BAND: (left, right)
    aligned: str = "top-left"  # BAND: where position 0 of the queries is (see BAND)


@dataclasses.dataclass
class ScaleFactor:
    """One factor of the score scale: `value` multiplies (or divides) the scores."""

    value: ir.Value
    divides: bool = False

    @property
    def runtime(self) -> bool:
        """A graph input (an initializer listed as an input is only a default): read when the model runs."""
        return self.value.is_graph_input()


@dataclasses.dataclass
class Projection:
    """Packed input projection (com.microsoft.Attention, GQA's packed QKV): Q, K, V =
    split(hidden · weights [+ bias], sizes) along the last axis; no weights: already projected."""

    weights: ir.Value | None
    bias: ir.Value | None
    sizes: list[int]


@dataclasses.dataclass
class Layout:
    """How Q, K and V reach the contract's [B, H, S, D], and the output leaves it."""

    # Permutations bringing query/key/value to [B, H, S, D] (None: already there).
    query_perm: list[int] | None = None
    key_perm: list[int] | None = None
    value_perm: list[int] | None = None
    # Q/K/V given as [B, S, heads·D] (fused ops): (q heads, kv heads) to split them into,
    # and the output merged back to [B, Sq, Hq·Dv].
    packed_heads: tuple[int, int] | None = None
    projection: Projection | None = None  # `query` is then the hidden state
    # One bias vector added to the Q, K and V inputs (com.microsoft.MultiHeadAttention): split by sizes.
    input_bias: tuple[ir.Value, list[int]] | None = None


@dataclasses.dataclass
class Scores:
    """What happens to q·k before the mask."""

    factors: list[ScaleFactor] = dataclasses.field(default_factory=list)
    # A known scale (fused ops carry it as an attribute); None: the product of `factors`.
    scale: float | None = None
    # Applied by a fused op itself, in the contract's terms: s -> softcap·tanh(s / softcap).
    softcap: float = 0.0


@dataclasses.dataclass
class Masking:
    """Which keys each query may see, and what a query that may see none outputs."""

    terms: list[MaskTerm] = dataclasses.field(default_factory=list)
    is_causal: bool = False
    # Each query limited to its `sliding_window` latest keys (a fused op's attribute).
    sliding_window: int = 0
    # The contract's key_lengths input: [B] keys that exist (an external cache), causality and the
    # window aligned at key_lengths[b] - Sq.
    key_lengths: ir.Value | None = None
    # A query row that may see no key outputs 0 (the ONNX Attention spec), not the contract's mean of V.
    empty_rows_zero: bool = False
    # A mask shorter than the keys is padded with blocked keys (the ONNX Attention spec).
    padded_to_keys: bool = False
    # Q reshaped from another [B, H, S, D] layout (GQA folded onto the kv heads: [B, Hkv, n_rep·S, D]):
    # its rows are not positions, so a mask varying along them is never causal or a window.
    rows_are_positions: bool = True


@dataclasses.dataclass
class KVCache:
    """The KV cache a fused op carries: past K/V ([B, Hkv, P, D]) the new ones are appended to, and
    the op's present outputs, which become the emitted concatenation."""

    past_key: ir.Value | None  # None: no past input, the present outputs are the new K/V
    past_value: ir.Value | None  # None when `stacked`
    present_key: ir.Value | None  # outputs of the replaced op, redirected to the emitted cache
    present_value: ir.Value | None
    # com.microsoft.Attention: past and present are one [2, B, H, S, D] tensor each (in past_key / present_key).
    stacked: bool = False
    # com.microsoft.GroupQueryAttention: per-batch lengths place the new tokens inside a (possibly
    # shared, max-length) buffer: seqlens_k [B] = total length - 1, total_length the batch's maximum.
    seqlens_k: ir.Value | None = None
    total_length: ir.Value | None = None
    # Rotary embedding inside the op (GQA do_rotary): cos cache, sin cache, interleaved.
    rotary: tuple[ir.Value, ir.Value, bool] | None = None


@dataclasses.dataclass
class AttentionCore:
    family: str
    output: ir.Value  # the value the IceKNNAttention output replaces
    query: ir.Value
    key: ir.Value
    value: ir.Value
    nodes: list[ir.Node]
    layout: Layout = dataclasses.field(default_factory=Layout)
    scores: Scores = dataclasses.field(default_factory=Scores)
    masking: Masking = dataclasses.field(default_factory=Masking)
    kv_cache: KVCache | None = None
    q_heads: int | None = None  # known from a fused op's attributes
    kv_heads: int | None = None
    # Set by a rule when it recognised the block but cannot convert it.
    unsupported: str | None = None

    @property
    def anchor(self) -> ir.Node:
        """The node the replacement is inserted before (the node producing `output`)."""
        producer = self.output.producer()
        assert producer is not None
        return producer
