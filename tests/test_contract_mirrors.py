"""The op contract is written three times — CONTRACT.md (the source of truth), the C++
mirror (custom_ops/src/contract.h) and the Python mirror (custom_ops/contract.py): their
attribute names and defaults must agree, and so must the constants both kernels share."""

import re
from pathlib import Path

import pytest

from ice_onnx.custom_ops import contract

SOURCES = Path(__file__).resolve().parents[1] / "custom_ops"
# C++ field names that differ from the attribute's name.
CPP_FIELD = {"is_causal": "causal"}


def cpp_defaults() -> dict[str, str]:
    header = (SOURCES / "src" / "contract.h").read_text()
    body = header[header.index("struct AttentionParams"):]
    body = body[:body.index("\n};")]
    fields = re.findall(r"^\s+(?:int64_t|float|bool|std::string) (\w+) = ([^;]+);", body, re.M)
    return dict(fields)


def markdown_defaults() -> dict[str, str]:
    text = (SOURCES / "CONTRACT.md").read_text()
    table = text[text.index("## Attributes"):text.index("## Semantics")]
    return {name: default for name, default in re.findall(r"^\| `(\w+)` \| \w+ \| ([^|]+?) \|", table, re.M)}


def as_number(text: str):
    text = text.strip().strip('`"')
    if text in ("true", "false"):
        return int(text == "true")
    if text in ("kIndexCluster", "cluster"):
        return "cluster"
    try:
        return int(text)
    except ValueError:
        return float(text.rstrip("f"))


PYTHON = contract.Attributes().as_node_attributes()


@pytest.mark.parametrize("name", sorted(PYTHON))
def test_cpp_default_matches_python(name):
    cpp = cpp_defaults()
    field = CPP_FIELD.get(name, name)
    assert field in cpp, f"contract.h has no field {field}"
    assert as_number(cpp[field]) == PYTHON[name]


@pytest.mark.parametrize("name", sorted(PYTHON))
def test_markdown_default_matches_python(name):
    documented = markdown_defaults()
    assert name in documented, f"CONTRACT.md does not document {name}"
    if name == "scale":  # documented as 1/sqrt(D), stored as 0 (= 'resolve from D')
        assert documented[name] == "1/√D" and PYTHON[name] == 0.0
        return
    assert as_number(documented[name].strip("`")) == PYTHON[name]


def test_no_attribute_is_documented_or_compiled_without_a_python_mirror():
    assert set(markdown_defaults()) == set(PYTHON)
    assert {CPP_FIELD.get(n, n) for n in PYTHON} == set(cpp_defaults())


def test_shared_constants_agree():
    kernel = (SOURCES / "src" / "knn_attention.cc").read_text()
    assert int(re.search(r"kTailTile = (\d+);", kernel).group(1)) == contract.TAIL_TILE
    header = (SOURCES / "src" / "knn_attention.h").read_text()
    assert int(re.search(r"kMinKeysPerScanned = (\d+);", header).group(1)) == contract.MIN_KEYS_PER_SCANNED
    assert float(re.search(r"kBlockingBias = (-?[\d.e]+)f;", kernel).group(1)) == contract.BLOCKING_BIAS
