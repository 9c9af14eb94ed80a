"""Every example compiles, passes the ONNX checker, and runs the same in both backends."""

from __future__ import annotations

import re

import onnx
import pytest
from conftest import EXAMPLES
from helpers import assert_every_value_agrees

import cnnc

EXAMPLE_FILES = sorted(EXAMPLES.glob("*.cnn"))


def test_the_examples_directory_holds_the_tutorial_networks():
    names = {p.stem for p in EXAMPLE_FILES}
    assert {
        "tutorial_conv",
        "conv1d",
        "lenet5",
        "alexnet",
        "vgg16",
        "fc_as_conv",
        "gap_classifier",
        "cifar_bn",
        "resnet18",
        "resnet50",
        "googlenet",
        "squeezenet",
        "mobilenet_v2",
        "densenet121",
        "shufflenet_v2",
        "convnext_tiny",
    } <= names


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.stem)
def test_example_compiles_to_a_model_that_passes_the_full_onnx_check(path, tmp_path):
    out = tmp_path / f"{path.stem}.onnx"
    cnnc.compile(path).to_onnx(out)
    onnx.checker.check_model(str(out), full_check=True)


@pytest.mark.parametrize("level", [0, 2], ids=["O0", "O2"])
@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.stem)
def test_example_agrees_with_onnxruntime_on_every_value_at_batch_1_and_2(path, level):
    model = cnnc.compile(path, opt_level=level)
    compared = assert_every_value_agrees(
        model, model.random_input(1, seed=1), model.random_input(2, seed=2)
    )
    assert compared == sum(len(node.outputs) for node in model.graph.nodes)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("vgg16", 138_357_544),
        ("alexnet", 61_100_840),
        ("lenet5", 61_706),
        ("resnet18", 11_689_512),
        ("resnet50", 25_557_032),
        ("googlenet", 6_624_904),
        ("squeezenet", 1_235_496),
        ("mobilenet_v2", 3_504_872),
        ("densenet121", 7_978_856),
        ("shufflenet_v2", 1_366_792),
        ("convnext_tiny", 28_589_128),
    ],
)
def test_parameter_count_matches_the_reference_implementation(name, params):
    model = cnnc.compile(EXAMPLES / f"{name}.cnn", opt_level=0)
    assert model.param_count() == params
    assert f"parameters: {params:,} " in model.summary()


def test_tutorial_demo_gives_two_3x3_feature_maps():
    model = cnnc.compile(EXAMPLES / "tutorial_conv.cnn")
    assert model.run(model.random_input(1)).shape == (1, 2, 3, 3)
    assert model.graph.params["demo.weight"].shape == (2, 3, 3, 3)


def test_vgg16_summary_shows_the_fc_layers_hold_most_parameters():
    text = cnnc.compile(EXAMPLES / "vgg16.cnn", opt_level=0).summary()
    assert "parameters by op: fc 89.4% (123,642,856), conv2d 10.6% (14,714,688)" in text
    assert re.search(r"^fc6 +fc +\[N,4096\] +102,764,544 +102,760,448$", text, re.M)
