"""Attribute names the IceKNNAttention contract does not define are refused on the Python side.

ONNX Runtime cannot refuse them (custom ops get unchecked attributes and the kernel only
asks for the names it knows), so a misspelt `is_casual=1` would run non-causal attention
without a word. Every place where ice-onnx takes attribute names from a user, and every
session it opens on a converted model, refuses them in one line naming the attribute and
the names the contract defines. The oracle for "known" is the contract's dataclass.
"""

from __future__ import annotations

from dataclasses import fields

import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

from ice_onnx.cli import main
from ice_onnx.custom_ops.contract import Attributes, UnknownAttributeError
from ice_onnx.errors import EXIT_BAD_MODEL
from ice_onnx.evaluation.runtime import attention_nodes, open_session, set_attributes, with_attributes
from test_evaluation import BACKENDS, tiny_models

CONTRACT_NAMES = [f.name for f in fields(Attributes)]


def misspelt(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with `is_casual=1` (for is_causal) on its attention node."""
    (node,) = attention_nodes(model)
    node.attribute.append(helper.make_attribute("is_casual", 1))
    return model


def test_with_attributes_refuses_unknown_names_and_leaves_the_model_alone():
    _, converted = tiny_models(top_k=4)
    before = converted.SerializeToString()
    with pytest.raises(UnknownAttributeError) as raised:
        with_attributes(converted, is_casual=1, top_k=8)
    message = str(raised.value)
    assert "unknown attribute is_casual" in message and ", ".join(CONTRACT_NAMES) in message
    assert "top_k" not in message.split("(")[0]  # only the unknown name is blamed
    assert converted.SerializeToString() == before

    (node,) = attention_nodes(converted)
    with pytest.raises(UnknownAttributeError, match="unknown attributes is_casual, windw"):
        set_attributes(node, {"windw": 3, "is_casual": 1})
    assert converted.SerializeToString() == before

    # Known names still go through, replacing the node's value.
    (node,) = attention_nodes(with_attributes(converted, top_k=8))
    assert [helper.get_attribute_value(a) for a in node.attribute if a.name == "top_k"] == [8]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_session_on_a_node_with_an_unknown_attribute_is_refused(backend):
    _, converted = tiny_models(top_k=4)
    open_session(converted, 1, backend)  # the same model without the misspelling opens
    with pytest.raises(UnknownAttributeError, match="IceKNNAttention node 'layer0': unknown attribute is_casual"):
        open_session(misspelt(converted), 1, backend)


def test_bench_refuses_a_converted_model_with_an_unknown_attribute(tmp_path):
    original, converted = tiny_models(top_k=4)
    paths = tmp_path / "tiny.onnx", tmp_path / "tiny.ice.onnx"
    onnx.save(original, paths[0])
    onnx.save(misspelt(converted), paths[1])
    result = CliRunner().invoke(main, ["bench", str(paths[0]), str(paths[1]), "--seq-len", "8", "--threads", "1",
                                       "--repeat", "1", "--no-layers"])
    assert result.exit_code == EXIT_BAD_MODEL, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ice-onnx: error: {paths[1]}: "), result.stderr
    assert "unknown attribute is_casual" in lines[0] and "is_causal" in lines[0]
    assert "Traceback" not in result.output


@pytest.mark.parametrize("given", [
    ["convert", "{model}", "-o", "{out}", "--plan", "{plan}"],
    ["tune", "{model}", "--calib", "random:8", "--candidates", "top_k=4;is_casual=1", "-o", "{out}.plan.json"],
], ids=["convert --plan", "tune --candidates"])
def test_plans_and_candidates_refuse_names_they_cannot_set(tmp_path, given):
    from cli_support import assert_clean_error, attention_model, run

    from ice_onnx.errors import EXIT_USAGE

    model, out, plan = tmp_path / "model.onnx", tmp_path / "out.onnx", tmp_path / "plan.json"
    onnx.save(attention_model(), model)
    plan.write_text('{"blocks": [{"index": 0, "top_k": 4, "is_casual": 1}]}')
    result = run(*(arg.format(model=model, out=out, plan=plan) for arg in given))
    assert_clean_error(result, EXIT_USAGE)
    assert "is_casual" in result.stderr
    assert not out.exists()
