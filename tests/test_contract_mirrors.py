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


def cpp_string_constants() -> dict[str, str]:
    header = (SOURCES / "src" / "contract.h").read_text()
    return dict(re.findall(r'constexpr const char\* (\w+) = "([^"]*)";', header))


def cpp_number(name: str) -> float:
    header = (SOURCES / "src" / "contract.h").read_text()
    return float(re.search(rf"\b{name} = (-?[\d.e]+)f?;", header).group(1))


def as_number(text: str):
    text = text.strip().strip('`"')
    if text in ("true", "false"):
        return int(text == "true")
    text = cpp_string_constants().get(text, text)  # a default named by a constant
    try:
        return int(text)
    except ValueError:
        try:
            return float(text.rstrip("f"))
        except ValueError:
            return text


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
    header = (SOURCES / "src" / "contract.h").read_text()
    assert int(re.search(r"kMinKeysPerScanned = (\d+);", header).group(1)) == contract.MIN_KEYS_PER_SCANNED
    assert float(re.search(r"kBlockingBias = (-?[\d.e]+)f;", kernel).group(1)) == contract.BLOCKING_BIAS
    assert int(re.search(r"kMinScannedClusters = (\d+);", header).group(1)) == contract.MIN_SCANNED_CLUSTERS


def test_inputs_and_bounds_agree():
    header = (SOURCES / "src" / "contract.h").read_text()
    assert int(re.search(r"kInputCount = (\d+);", header).group(1)) == len(contract.INPUTS)
    assert int(re.search(r"kInputKeyLengths = (\d+)", header).group(1)) == contract.INPUTS.index("key_lengths")
    assert int(re.search(r"kInputMask = (\d+)", header).group(1)) == contract.INPUTS.index("attn_mask")
    assert cpp_number("kMaxClusters") == contract.MAX_CLUSTERS
    assert cpp_number("kMaxTailClusters") == contract.MAX_TAIL_CLUSTERS
    assert cpp_number("kMaxProbeRows") == contract.MAX_PROBE_ROWS
    assert cpp_number("kMaxKnnQkMagnitude") == contract.MAX_KNN_QK_MAGNITUDE
    assert cpp_number("kValueMagnitudeBudget") == contract.VALUE_MAGNITUDE_BUDGET
    strings = cpp_string_constants()
    assert (strings["kEmptyRowsMean"], strings["kEmptyRowsZero"]) == contract.EMPTY_ROWS
    assert (strings["kIndexCluster"], strings["kIndexDci"]) == contract.INDEXES


def test_markdown_documents_every_input():
    text = (SOURCES / "CONTRACT.md").read_text()
    table = text[text.index("## Inputs"):text.index("## Output")]
    assert re.findall(r"^\| `(\w+)`", table, re.M) == list(contract.INPUTS)


def test_unknown_attributes_are_listed():
    from onnx import helper

    node = helper.make_node(contract.OP_TYPE, ["Q", "K", "V"], ["Y"], domain=contract.DOMAIN,
                            is_casual=1, top_k=8, sliding_window=4, windw=3)
    assert contract.unknown_attributes(node) == ["is_casual", "windw"]
