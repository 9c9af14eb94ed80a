"""The IR dump: its exact text for LeNet-5, and its layout rules."""

from __future__ import annotations

import os

import pytest
from conftest import EXAMPLES

import cnnc

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")


def golden(name: str, text: str) -> str:
    """The stored dump ``name``; CNNC_UPDATE_GOLDEN=1 rewrites it from ``text`` first."""
    path = os.path.join(GOLDEN, name)
    if os.environ.get("CNNC_UPDATE_GOLDEN") == "1":
        with open(path, "w") as f:
            f.write(text)
    with open(path) as f:
        return f.read()


def test_lenet5_dump_at_O0_matches_the_golden_file():
    text = cnnc.compile(EXAMPLES / "lenet5.cnn", opt_level=0).dump()
    assert text == golden("lenet5.O0.dump", text)


def test_lenet5_dump_at_O2_matches_the_golden_file():
    text = cnnc.compile(EXAMPLES / "lenet5.cnn", opt_level=2).dump()
    assert text == golden("lenet5.O2.dump", text)


def test_dump_lines_are_aligned_in_columns():
    lines = cnnc.compile(EXAMPLES / "lenet5.cnn").dump().splitlines()
    body = [line for line in lines if line.startswith("  %")]
    assert len({line.index(": f32") for line in body}) == 1
    assert len({line.index(" = ") for line in body}) == 1


def test_dump_shows_params_without_percent_and_values_with_it():
    text = cnnc.compile("network n(x: 2x8x8) { k: conv(4, 3, bias=false) }").dump()
    assert "= conv2d(%x, k.weight)" in text


@pytest.mark.parametrize(
    ("layer", "attrs"),
    [
        (
            "conv(4, 3, stride=2, pad=(0, 1, 2, 3), dilation=2, groups=2)",
            "k=3x3 s=2 p=0,1,2,3 d=2x2 g=2",
        ),
        ("conv(4, (1, 3))", "k=1x3 s=1"),
        ("maxpool(3, stride=2, ceil=true)", "k=3x3 s=2 ceil"),
        ("avgpool(3, pad=1, count_include_pad=false)", "k=3x3 s=3 p=1,1,1,1 exclude-pad"),
        ("dropout(0.25)", "p=0.25"),
    ],
)
def test_dump_shows_the_attributes_that_differ_from_defaults(layer, attrs):
    text = cnnc.compile(f"network n(x: 2x9x9) {{ {layer} }}", opt_level=0).dump()
    assert text.splitlines()[4].rstrip().endswith(f"{attrs}  <string>:1")


def test_dump_heading_names_the_network_and_counts_parameters():
    lines = cnnc.compile(EXAMPLES / "vgg16.cnn", opt_level=0).dump().splitlines()
    assert lines[:3] == [
        "network vgg16  (-O0)",
        "  input  %image : f32[N,3,224,224]",
        "  params 32 tensors, 138,357,544 values",
    ]
