"""Fused attention ops with a KV cache: one converted file serves prompt processing and decoding.

Each test builds the fused op as exporters and ONNX Runtime's tools emit it, then
runs a prompt (batch 2, right padded where the op allows it) and decoding steps,
each model fed its OWN present outputs as the next past. The oracle is ONNX Runtime
on the unconverted model: outputs and present caches agree to <= 1e-4 on every row
the op defines.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import ice_onnx
from ice_onnx.custom_ops import contract, reference
from ice_onnx.rewriter import ConvertOptions, convert_model
from cli_support import every_node

F, I32 = TensorProto.FLOAT, TensorProto.INT32
HQ, HKV, D = 4, 2, 16
MAX_LENGTH = 16


def _session(model: onnx.ModelProto, converted: bool) -> ort.InferenceSession:
    if converted:
        try:
            options = ice_onnx.session_options(intra_op_num_threads=1)
        except FileNotFoundError:
            return reference.inference_session(model, intra_op_num_threads=1)
    else:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _convert(model: onnx.ModelProto, **options):
    ir_model = ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(model))
    report = convert_model(ir_model, "test", ConvertOptions(**options))
    converted = ir.serde.serialize_model(ir_model)
    onnx.checker.check_model(converted)
    return converted, report


def _rotary_caches(rotary_dim: int):
    inverse = 1.0 / 10000 ** (np.arange(0, rotary_dim, 2) / rotary_dim)
    angles = np.outer(np.arange(MAX_LENGTH), inverse)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def gqa_model(packed: bool, rotary: bool, interleaved: bool = False) -> onnx.ModelProto:
    hidden_q, hidden_kv = HQ * D, HKV * D
    inputs = [helper.make_tensor_value_info("query", F, ["B", "S", hidden_q + 2 * hidden_kv if packed else hidden_q])]
    if not packed:
        inputs += [helper.make_tensor_value_info(n, F, ["B", "S", hidden_kv]) for n in ("key", "value")]
    inputs += [helper.make_tensor_value_info(n, F, ["B", HKV, "P", D]) for n in ("past_key", "past_value")]
    inputs += [helper.make_tensor_value_info("seqlens_k", I32, ["B"]),
               helper.make_tensor_value_info("total_sequence_length", I32, [])]
    initializers, rotary_inputs, attributes = [], [], {}
    if rotary:
        cos, sin = _rotary_caches(D)
        initializers = [numpy_helper.from_array(cos, "cos_cache"), numpy_helper.from_array(sin, "sin_cache")]
        rotary_inputs = ["cos_cache", "sin_cache"]
        attributes = {"do_rotary": 1, "rotary_interleaved": int(interleaved)}
    qkv = ["query", "", ""] if packed else ["query", "key", "value"]
    node = helper.make_node("GroupQueryAttention", [*qkv, "past_key", "past_value", "seqlens_k", "total_sequence_length",
                                                    *rotary_inputs], ["output", "present_key", "present_value"],
                            domain="com.microsoft", num_heads=HQ, kv_num_heads=HKV, **attributes)
    outputs = [helper.make_tensor_value_info("output", F, ["B", "S", hidden_q]),
               *(helper.make_tensor_value_info(n, F, ["B", HKV, "L", D]) for n in ("present_key", "present_value"))]
    graph = helper.make_graph([node], "gqa", inputs, outputs, initializer=initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def _gqa_steps(packed: bool, shared_buffer: bool, lengths=(6, 4), decode_steps=2, seed=0):
    """Feeds for a right-padded prompt then `decode_steps` tokens; yields (feeds, T_b per batch)."""
    rng = np.random.default_rng(seed)
    batch, prompt = len(lengths), max(lengths)
    totals = np.array(lengths)
    for step in range(decode_steps + 1):
        seq = prompt if step == 0 else 1
        if step:
            totals = totals + 1
        width = (HQ + 2 * HKV) * D if packed else HQ * D
        feeds = {"query": rng.standard_normal((batch, seq, width)).astype(np.float32)}
        if not packed:
            feeds.update({n: rng.standard_normal((batch, seq, HKV * D)).astype(np.float32) for n in ("key", "value")})
        feeds["seqlens_k"] = (totals - 1).astype(np.int32)
        feeds["total_sequence_length"] = np.array(prompt if step == 0 else totals.max(), np.int32)
        yield feeds, totals, shared_buffer


def _run_gqa(model: onnx.ModelProto, converted: onnx.ModelProto, packed: bool, shared_buffer: bool):
    sessions = {"original": _session(model, False), "converted": _session(converted, True)}
    batch = 2
    empty = np.zeros((batch, HKV, MAX_LENGTH if shared_buffer else 0, D), np.float32)
    caches = {name: (empty, empty) for name in sessions}
    for feeds, totals, _ in _gqa_steps(packed, shared_buffer):
        results = {}
        for name, session in sessions.items():
            past_key, past_value = caches[name]
            results[name] = session.run(None, {**feeds, "past_key": past_key, "past_value": past_value})
            caches[name] = tuple(results[name][1:3])
        (expected, *expected_cache), (got, *got_cache) = results["original"], results["converted"]
        seq = expected.shape[1]
        for b, total in enumerate(totals):
            valid_queries = min(seq, total)  # rows past a prompt's length are padding: undefined
            np.testing.assert_allclose(got[b, :valid_queries], expected[b, :valid_queries], atol=1e-4)
            for g, e in zip(got_cache, expected_cache):  # rows at or beyond T_b are undefined
                np.testing.assert_allclose(g[b, :, :total], e[b, :, :total], atol=1e-4)


# exact_below 0: the prompt (6 queries x 2 per kv head over 6 keys) takes the new node, decoding the original op.
KNN_MAY_PAY = {"exact_below": 0}


@pytest.mark.parametrize("packed, rotary, shared_buffer", [
    (False, False, False), (False, True, False), (True, True, True), (False, True, True), (True, False, False)])
def test_group_query_attention_prompt_then_decoding(packed, rotary, shared_buffer):
    model = gqa_model(packed, rotary)
    converted, report = _convert(model, **KNN_MAY_PAY)
    (block,) = report.blocks
    assert block.replaced, report.to_text()
    assert (block.q_heads, block.kv_heads, block.mask) == (HQ, HKV, "both")
    assert [n.op_type for n in converted.graph.node if n.op_type in ("If", "GroupQueryAttention")] == ["If"]
    _run_gqa(model, converted, packed, shared_buffer)


def _executed_nodes(model: onnx.ModelProto, feeds, folder) -> list[tuple[str, list]]:
    """(op type, output shapes) of every node ONNX Runtime ran, from its profile (written in `folder`)."""
    import json

    options = ice_onnx.session_options(intra_op_num_threads=1)
    options.enable_profiling = True
    options.profile_file_prefix = str(folder / "profile")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    session.run(None, feeds)
    with open(session.end_profiling()) as file:
        events = json.load(file)
    return [(e["args"]["op_name"], [next(iter(o.values())) for o in e["args"].get("output_type_shape", [])])
            for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]


def test_group_query_attention_decoding_touches_no_whole_buffer(tmp_path):
    """GQA writes its shared max-length buffer in place; no standard op can. A decoding step (where
    the contract runs exactly anyway) runs the original op, so no node spans the buffer's slots."""
    slots = 4 * MAX_LENGTH + 3  # no other dim of the model
    model = gqa_model(packed=True, rotary=True)
    converted, _ = _convert(model, **KNN_MAY_PAY)
    feeds = {"query": np.ones((1, 1, (HQ + 2 * HKV) * D), np.float32), "seqlens_k": np.array([6], np.int32),
             "total_sequence_length": np.array(7, np.int32),
             **{n: np.zeros((1, HKV, slots, D), np.float32) for n in ("past_key", "past_value")}}
    executed = _executed_nodes(converted, feeds, tmp_path)
    # The If returns what its branch (the original op) wrote.
    over_buffer = [op for op, shapes in executed if op not in ("GroupQueryAttention", "If") and
                   any(slots in s for s in shapes)]
    assert not over_buffer, executed
    assert "GroupQueryAttention" in [op for op, _ in executed] and "IceKNNAttention" not in [op for op, _ in executed]
    prompt = dict(feeds, query=np.ones((1, 6, (HQ + 2 * HKV) * D), np.float32), seqlens_k=np.array([5], np.int32),
                  total_sequence_length=np.array(6, np.int32))
    assert "IceKNNAttention" in [op for op, _ in _executed_nodes(converted, prompt, tmp_path)]


def test_group_query_attention_interleaved_rotary():
    model = gqa_model(packed=False, rotary=True, interleaved=True)
    converted, report = _convert(model, **KNN_MAY_PAY)
    assert report.replaced == 1, report.to_text()
    _run_gqa(model, converted, packed=False, shared_buffer=False)


@pytest.mark.parametrize("attribute, value, contract_attribute", [
    ("softcap", 1.0, ("softcap", 1.0)),  # 1: most scores are capped (q·k/√D is about N(0, 1) here)
    # ONNX Runtime's op attends the local_window_size latest keys (measured: 2 of the causal keys
    # of row 2 and later are seen, not 3); the 6-token prompt and decoding pass the window.
    ("local_window_size", 2, ("sliding_window", 2)),
])
@pytest.mark.parametrize("shared_buffer", [False, True])
def test_group_query_attention_softcap_and_local_window(attribute, value, contract_attribute, shared_buffer):
    model = gqa_model(packed=False, rotary=True)
    model.graph.node[0].attribute.append(helper.make_attribute(attribute, value))
    converted, report = _convert(model, **KNN_MAY_PAY)
    assert report.replaced == 1, report.to_text()
    (node,) = [n for n in every_node(converted.graph) if n.op_type == contract.OP_TYPE]
    assert {a.name: helper.get_attribute_value(a) for a in node.attribute}[contract_attribute[0]] == pytest.approx(
        contract_attribute[1])
    _run_gqa(model, converted, packed=False, shared_buffer=shared_buffer)


def test_group_query_attention_outside_the_contract_is_reported():
    model = gqa_model(packed=False, rotary=False)
    model.graph.node[0].attribute.append(helper.make_attribute("smooth_softmax", 1))
    ir_model = ir.serde.deserialize_model(model)
    report = convert_model(ir_model, "test")
    (block,) = report.blocks
    assert not block.replaced and "smooth_softmax" in block.reason
    assert [n.op_type for n in ir_model.graph] == ["GroupQueryAttention"]  # untouched


def _decode(model: onnx.ModelProto, converted: onnx.ModelProto, step_feeds, cache_names, present_names, empty_cache,
            query_rows=None):
    """Prompt then decoding steps, each model fed its own presents; every output must agree
    (the first output on the [B, S] query rows `query_rows(feeds)` selects, when given)."""
    sessions = {"original": _session(model, False), "converted": _session(converted, True)}
    caches = {name: dict(zip(cache_names, empty_cache)) for name in sessions}
    output_names = [o.name for o in model.graph.output]
    for feeds in step_feeds:
        results = {}
        for name, session in sessions.items():
            results[name] = dict(zip(output_names, session.run(None, {**feeds, **caches[name]})))
            caches[name] = {past: results[name][present] for past, present in zip(cache_names, present_names)}
        for index, output in enumerate(output_names):
            got, expected = results["converted"][output], results["original"][output]
            if index == 0 and query_rows is not None:  # the query axis next to the batch axis, then select
                rows = query_rows(feeds)
                got, expected = (np.moveaxis(x, -2 if x.ndim == 4 else 1, 1)[rows] for x in (got, expected))
            np.testing.assert_allclose(got, expected, atol=1e-4, err_msg=output)


def onnx_attention_model(packed_heads: bool, padding_mask: bool) -> onnx.ModelProto:
    """ONNX Attention (opset 23), causal, with past_key/past_value and present outputs."""
    if packed_heads:
        q, k, v = ([f"B", "S", h * D] for h in (HQ, HKV, HKV))
    else:
        q, k, v = (["B", h, "S", D] for h in (HQ, HKV, HKV))
    inputs = [helper.make_tensor_value_info(n, F, s) for n, s in (("q", q), ("k", k), ("v", v))]
    inputs += [helper.make_tensor_value_info(n, F, ["B", HKV, "P", D]) for n in ("past_key", "past_value")]
    nodes, mask = [], ""
    if padding_mask:  # [B, P + S] 0/1 -> bool [B, 1, 1, P + S]
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "T"]))
        nodes += [helper.make_node("Cast", ["attention_mask"], ["keep"], to=TensorProto.BOOL),
                  helper.make_node("Constant", [], ["axes"], value=numpy_helper.from_array(np.array([1, 2]))),
                  helper.make_node("Unsqueeze", ["keep", "axes"], ["key_mask"]),
                  # ONNX Runtime wants the mask's query axis to be Sq: [B, 1, Sq, P + S]
                  helper.make_node("Shape", ["q"], ["sq"], start=2, end=3),
                  helper.make_node("Constant", [], ["ones"], value=numpy_helper.from_array(np.array([1, 1]))),
                  helper.make_node("Constant", [], ["one"], value=numpy_helper.from_array(np.array([1]))),
                  helper.make_node("Concat", ["ones", "sq", "one"], ["rows"], axis=0),
                  helper.make_node("Expand", ["key_mask", "rows"], ["mask"])]
        mask = "mask"
    heads = {"q_num_heads": HQ, "kv_num_heads": HKV} if packed_heads else {}
    nodes.append(helper.make_node("Attention", ["q", "k", "v", mask, "past_key", "past_value"],
                                  ["y", "present_key", "present_value"], is_causal=1, **heads))
    outputs = [helper.make_tensor_value_info("y", F, q),
               *(helper.make_tensor_value_info(n, F, ["B", HKV, "T", D]) for n in ("present_key", "present_value"))]
    graph = helper.make_graph(nodes, "attention", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


@pytest.mark.parametrize("packed_heads, padding_mask", [(False, False), (True, False), (False, True)])
def test_onnx_attention_with_past_prompt_then_decoding(packed_heads, padding_mask):
    """Prompt, a chunk of 8 over it (the new node with a past: (8·2)² >= 16·13 keys), then decoding
    (the original op: a single query runs exactly anyway)."""
    model = onnx_attention_model(packed_heads, padding_mask)
    converted, report = _convert(model, **KNN_MAY_PAY)
    (block,) = report.blocks
    assert block.replaced and block.mask == ("both" if padding_mask else "causal"), report.to_text()
    rng = np.random.default_rng(1)
    batch, prompt = 2, 5

    def steps():
        past = 0
        for seq in (prompt, 8, 1, 1):
            shapes = ({"q": (batch, seq, HQ * D), "k": (batch, seq, HKV * D), "v": (batch, seq, HKV * D)}
                      if packed_heads else {n: (batch, h, seq, D) for n, h in (("q", HQ), ("k", HKV), ("v", HKV))})
            feeds = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
            if padding_mask:  # the second sequence is left padded by 2
                feeds["attention_mask"] = np.ones((batch, past + seq), np.int64)
                feeds["attention_mask"][1, :2] = 0
            past += seq
            yield feeds

    # Every row, the padding queries too: they see no key, and give 0 as the spec (and ORT) say.
    empty = np.zeros((batch, HKV, 0, D), np.float32)
    _decode(model, converted, steps(), ["past_key", "past_value"], ["present_key", "present_value"], [empty, empty])


def test_com_microsoft_attention_with_past_prompt_then_decoding():
    """ORT's GPT-2 fusion: packed QKV weights, unidirectional, past/present as [2, B, H, S, D]."""
    heads, hidden = 2, 2 * D
    rng = np.random.default_rng(2)
    weights = numpy_helper.from_array((rng.standard_normal((hidden, 3 * hidden)) * 0.2).astype(np.float32), "w")
    bias = numpy_helper.from_array(rng.standard_normal(3 * hidden).astype(np.float32), "b")
    node = helper.make_node("Attention", ["x", "w", "b", "mask_index", "past"], ["y", "present"],
                            domain="com.microsoft", num_heads=heads, unidirectional=1)
    graph = helper.make_graph(
        [node], "gpt2_attention",
        [helper.make_tensor_value_info("x", F, ["B", "S", hidden]),
         helper.make_tensor_value_info("mask_index", I32, ["B", "T"]),
         helper.make_tensor_value_info("past", F, [2, "B", heads, "P", D])],
        [helper.make_tensor_value_info("y", F, ["B", "S", hidden]),
         helper.make_tensor_value_info("present", F, [2, "B", heads, "T", D])],
        initializer=[weights, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    converted, report = _convert(model, **KNN_MAY_PAY)
    (block,) = report.blocks
    assert block.replaced, report.to_text()
    batch = 2

    def steps():  # a chunk of 20 over the prompt takes the new node with a past: (20·1)² >= 16·25 keys
        past = 0
        for seq in (5, 20, 1, 1):
            mask = np.ones((batch, past + seq), np.int32)
            mask[1, :2] = 0  # left padding, as GPT-2 generation pads
            past += seq
            yield {"x": rng.standard_normal((batch, seq, hidden)).astype(np.float32), "mask_index": mask}

    def real_queries(feeds):
        # A padding query sees no key at all: the contract gives it the mean of V, ORT's -10000
        # filter a softmax over every key. Such rows are padding, discarded by the model.
        return feeds["mask_index"][:, -feeds["x"].shape[1]:].astype(bool)

    empty = np.zeros((2, batch, heads, 0, D), np.float32)
    _decode(model, converted, steps(), ["past"], ["present"], [empty], query_rows=real_queries)


def test_onnx_attention_decoding_runs_the_original_op(tmp_path):
    """A one-token step over a cache: the original op (exact anyway), no Concat of the cache around a new node."""
    past = 4 * MAX_LENGTH + 3  # no other dim of the model
    converted, _ = _convert(onnx_attention_model(packed_heads=False, padding_mask=False))
    rng = np.random.default_rng(3)
    feeds = {**{n: rng.standard_normal((2, h, 1, D)).astype(np.float32) for n, h in (("q", HQ), ("k", HKV), ("v", HKV))},
             **{n: rng.standard_normal((2, HKV, past, D)).astype(np.float32) for n in ("past_key", "past_value")}}
    executed = _executed_nodes(converted, feeds, tmp_path)
    assert "Attention" in [op for op, _ in executed] and "IceKNNAttention" not in [op for op, _ in executed]
    assert not [op for op, shapes in executed if op not in ("Attention", "If") and
                any(past in s or past + 1 in s for s in shapes)], executed


def test_evaluation_runtime_sees_the_node_inside_the_if():
    """`ice-onnx eval`/`bench` open sessions and set attributes through `attention_nodes`: the node a
    fused op with a cache becomes sits in an If branch, and a session opened without the op library fails."""
    from ice_onnx.evaluation import runtime

    model = gqa_model(packed=False, rotary=True)
    converted, report = _convert(model)
    assert report.replaced == 1 and not any(n.op_type == contract.OP_TYPE for n in converted.graph.node)
    (node,) = runtime.attention_nodes(converted)
    assert runtime.attention_nodes(converted, inside_subgraphs=False) == []
    changed = runtime.with_attributes(converted, top_k=3, compensate=0)
    (changed_node,) = runtime.attention_nodes(changed)
    attributes = {a.name: helper.get_attribute_value(a) for a in changed_node.attribute}
    assert attributes["top_k"] == 3 and attributes["compensate"] == 0
    assert {a.name: helper.get_attribute_value(a) for a in node.attribute}["top_k"] != 3  # a copy was changed
    feeds, totals, _ = next(_gqa_steps(packed=False, shared_buffer=False))
    empty = np.zeros((len(totals), HKV, 0, D), np.float32)  # a prompt: the If takes the new node
    feeds.update(past_key=empty, past_value=empty)
    expected = _session(model, False).run(None, feeds)
    got = runtime.open_session(converted, threads=1).run(None, feeds)
    for b, total in enumerate(totals):
        np.testing.assert_allclose(got[0][b, :total], expected[0][b, :total], atol=1e-4)


def _always_new_nodes(converted: onnx.ModelProto) -> onnx.ModelProto:
    """The converted model with every If taking its new-nodes branch (decoding included)."""
    forced = onnx.ModelProto()
    forced.CopyFrom(converted)
    forced.graph.initializer.append(numpy_helper.from_array(np.array(True), "ice_test_always"))
    for node in forced.graph.node:
        if node.op_type == "If":
            node.input[0] = "ice_test_always"
    return forced


@pytest.mark.parametrize("shared_buffer", [False, True])
@pytest.mark.parametrize("lengths", [(6, 4), (3, 6)])
def test_group_query_attention_new_nodes_decode_from_the_real_lengths(shared_buffer, lengths):
    """The new nodes on every step, prompts right padded either way round and decoding: K/V are the
    buffers as they are, with key lengths (P_b + S) and a [B, 1, 1, L] key mask."""
    model = gqa_model(packed=False, rotary=True)
    converted, _ = _convert(model)
    forced = _always_new_nodes(converted)
    (node,) = [n for n in every_node(forced.graph) if n.op_type == contract.OP_TYPE]
    assert len(node.input) == 5 and node.input[3] and node.input[4]  # the key mask and key_lengths
    sessions = {"original": _session(model, False), "converted": _session(forced, True)}
    empty = np.zeros((len(lengths), HKV, MAX_LENGTH if shared_buffer else 0, D), np.float32)
    caches = {name: (empty, empty) for name in sessions}
    for feeds, totals, _ in _gqa_steps(False, shared_buffer, lengths=lengths, decode_steps=3, seed=5):
        results = {}
        for name, session in sessions.items():
            results[name] = session.run(None, {**feeds, "past_key": caches[name][0], "past_value": caches[name][1]})
            caches[name] = tuple(results[name][1:3])
        (expected, *expected_cache), (got, *got_cache) = results["original"], results["converted"]
        for b, total in enumerate(totals):
            rows = min(expected.shape[1], total)
            np.testing.assert_allclose(got[b, :rows], expected[b, :rows], atol=1e-4)
            for g, e in zip(got_cache, expected_cache):
                np.testing.assert_allclose(g[b, :, :total], e[b, :, :total], atol=1e-4)


@pytest.mark.parametrize("prompt, expect_knn", [(20, False), (40, True)])
def test_group_query_attention_decides_knn_from_the_real_keys(prompt, expect_knn):
    """genai's shared buffer has max_length slots: the kernel's kNN rule reads the prompt's keys
    (key_lengths), not the slots. Settings where kNN takes 32 keys and 4·√keys queries per kv head:
    a 20-token prompt in a 64-slot buffer runs exactly (64 slots alone would have passed), 40 kNN."""
    from ice_onnx.custom_ops.run_stats import run_stats

    model = gqa_model(packed=False, rotary=False)
    converted = _always_new_nodes(_convert(model)[0])
    (node,) = [n for n in every_node(converted.graph) if n.op_type == contract.OP_TYPE]
    # The tail summarised with a cluster per key: kNN's result is then exact, so ORT on the
    # original stays the oracle on both paths.
    forced = {"top_k": 4, "exact_below": 0, "sinks": 0, "window": 0, "probe_rows": 0, "compensate": 1,
              "tail_clusters": 64}
    kept = [a for a in node.attribute if a.name not in forced]
    del node.attribute[:]
    node.attribute.extend([*kept, *(helper.make_attribute(k, v) for k, v in forced.items())])
    rng = np.random.default_rng(3)
    feeds = {name: rng.standard_normal((1, prompt, width)).astype(np.float32)
             for name, width in (("query", HQ * D), ("key", HKV * D), ("value", HKV * D))}
    buffer = np.zeros((1, HKV, 64, D), np.float32)
    feeds.update(past_key=buffer, past_value=buffer, seqlens_k=np.array([prompt - 1], np.int32),
                 total_sequence_length=np.array(prompt, np.int32))
    expected = _session(model, False).run(None, feeds)[0]
    session = _session(converted, True)
    with run_stats() as stats:
        got = session.run(None, feeds)[0]
    assert (stats.knn_calls, stats.exact_calls) == ((1, 0) if expect_knn else (0, 1)), stats
    np.testing.assert_allclose(got, expected, atol=1e-4)
