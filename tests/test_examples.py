"""Every example compiles, passes the ONNX checker, and runs the same in both backends;
the examples built as torchvision builds them have exactly its state_dict names, shapes
and parameter counts.

tests/fixtures/torchvision_state_dicts.json.gz holds, for ten torchvision models, the
parameter count, output shape and every state_dict name with its shape, as read from
torchvision 0.28 (it is the project's reference, shared/reference/torchvision, gathered
into one file).
"""

from __future__ import annotations

import gzip
import json
import re

import numpy as np
import onnx
import pytest
from conftest import EXAMPLES, ROOT
from helpers import assert_agree, assert_every_value_agrees, ort_session

import cnnc

EXAMPLE_FILES = sorted(EXAMPLES.glob("*.cnn"))
TORCHVISION = json.loads(
    gzip.decompress((ROOT / "tests/fixtures/torchvision_state_dicts.json.gz").read_bytes())
)
# The examples whose every-value check at batch 1 and 2, -O0 and -O2 takes minutes (over
# 10 GMAC an item): the default suite checks every value of a batch of 1 at -O2, and
# `pytest -m slow` runs the whole matrix.
LARGE = {"vgg16", "fcn32s_vgg16", "fcn_resnet50", "unet"}


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
        "efficientnet_b0",
        "mobilenet_v3_small",
        "mobilenet_v3_large",
        "convnext_tiny",
        "regnet_y_400mf",
        "shufflenet_v2_x1_0",
        "resnext50_32x4d",
        "resnet34",
        "lraspp_mobilenet_v3_large",
        "fcn_resnet50",
        "fcn32s_vgg16",
        "unet",
        "yolo",
    } <= names


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.stem)
def test_example_compiles_to_a_model_that_passes_the_full_onnx_check(path, tmp_path):
    out = tmp_path / f"{path.stem}.onnx"
    cnnc.compile(path).to_onnx(out)
    onnx.checker.check_model(str(out), full_check=True)


# Networks whose outputs carry float32 rounding of 1e-4 of their magnitude in both engines
# (see assert_every_value_agrees).
DEEP_ROUNDING = {"fcn_resnet50"}


def _every_value_agrees(path, level: int, batches: tuple[int, ...]) -> None:
    model = cnnc.compile(path, opt_level=level)
    runs = [model.random_inputs(batch, seed=batch) for batch in batches]
    loose = path.stem in DEEP_ROUNDING
    compared = assert_every_value_agrees(model, *runs, outputs_as_intermediates=loose)
    assert compared == sum(len(node.outputs) for node in model.graph.nodes)


def _matrix(large: bool):
    return [
        pytest.param(path, level, id=f"{path.stem}-O{level}")
        for path in EXAMPLE_FILES
        if (path.stem in LARGE) == large
        for level in (0, 2)
    ]


@pytest.mark.parametrize(("path", "level"), _matrix(large=False))
def test_example_agrees_with_onnxruntime_on_every_value_at_batch_1_and_2(path, level):
    _every_value_agrees(path, level, (1, 2))


@pytest.mark.parametrize("path", [EXAMPLES / f"{name}.cnn" for name in sorted(LARGE)],
                         ids=sorted(LARGE))  # fmt: skip
def test_large_example_agrees_with_onnxruntime_on_every_value_at_O2(path):
    _every_value_agrees(path, 2, (1,))


@pytest.mark.slow
@pytest.mark.parametrize(("path", "level"), _matrix(large=True))
def test_large_example_agrees_with_onnxruntime_on_every_value_at_batch_1_and_2(path, level):
    _every_value_agrees(path, level, (1, 2))


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
        ("fcn32s_vgg16", 136_152_917),
        ("unet", 31_030_658),
        ("yolo", 3_157_184),
        *((name, reference["parameters"]) for name, reference in sorted(TORCHVISION.items())),
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
    fc6 = r"^fc6 +fc +\[N,25088\] +\[N,4096\] +102,764,544 +102,760,448 +16.4 kB$"
    assert re.search(fc6, text, re.M)


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_example_has_torchvision_s_state_dict_names_shapes_and_output(name):
    reference = TORCHVISION[name]
    model = cnnc.compile(EXAMPLES / f"{name}.cnn", opt_level=0)
    expected = {
        key: tuple(shape)
        for key, shape in reference["state_dict"].items()
        if not key.endswith(".num_batches_tracked")
    }
    assert {key: p.shape for key, p in model.graph.params.items()} == expected
    (output,) = model.graph.outputs
    assert (1, *output.shape[1:]) == tuple(reference["output"])


def test_a_torchvision_state_dict_loads_into_its_example_by_name(tmp_path):
    # What `torch.save`-free users do: np.savez(path, **state_dict) (with PyTorch's BN
    # counters), then --weights.
    shapes = TORCHVISION["efficientnet_b0"]["state_dict"]
    rng = np.random.default_rng(0)
    tensors = {key: rng.standard_normal(shape).astype(np.float32) for key, shape in shapes.items()}
    for key in tensors:
        if key.endswith("running_var"):
            tensors[key] = np.abs(tensors[key]) + 0.5
    np.savez(tmp_path / "w.npz", **tensors)
    model = cnnc.compile(EXAMPLES / "efficientnet_b0.cnn", weights=tmp_path / "w.npz")
    np.testing.assert_array_equal(
        model.graph.params["features.1.0.block.1.fc1.weight"].data,
        tensors["features.1.0.block.1.fc1.weight"],
    )


@pytest.mark.parametrize("size", [(1, 1), (37, 53), (500, 375)])
def test_fcn32s_labels_every_pixel_of_an_input_of_any_size(size):
    # The shapes only: every value at the declared size is checked above, and at other
    # sizes in the fully convolutional test below.
    text = (EXAMPLES / "fcn32s_vgg16.cnn").read_text().replace("3x64x64", "3x{}x{}".format(*size))
    (output,) = cnnc.compile(text, opt_level=0).graph.outputs
    assert output.shape == ("N", 21, *size)


def test_fully_convolutional_fcn32s_crops_to_each_input_s_size_at_run_time():
    model = cnnc.compile(EXAMPLES / "fcn32s_vgg16.cnn", fully_conv=True)
    session = ort_session(model.to_onnx())
    x = np.random.default_rng(0).standard_normal((1, 3, 70, 81), dtype=np.float32)
    ours = model.run(x)
    assert ours.shape == (1, 21, 70, 81)
    assert_agree(ours, session.run(None, {"image": x})[0])


def test_unet_gives_a_map_of_the_input_s_size_and_reports_a_dense_prediction():
    model = cnnc.compile(EXAMPLES / "unet.cnn", fully_conv=True)
    assert model.graph.outputs[0].shape == ("N", 2, 128, 128)
    report = model.fully_conv_report((192, 160)).splitlines()
    assert report[0].startswith(
        "fully convolutional: output stride 1 (the output has the input's resolution"
    )
    assert report[1] == "an input of 192x160 gives a map [N,2,192,160]"


def test_yolo_has_three_heads_at_strides_8_16_and_32():
    model = cnnc.compile(EXAMPLES / "yolo.cnn")
    assert model.output_names == ["p3", "p4", "p5"]
    assert [v.shape for v in model.graph.outputs] == [
        ("N", 144, 32, 32), ("N", 144, 16, 16), ("N", 144, 8, 8)
    ]  # fmt: skip
    proto = model.to_onnx()
    assert [o.name for o in proto.graph.output] == ["p3", "p4", "p5"]


def test_shufflenet_cannot_slide_because_its_channel_shuffle_fixes_the_sizes():
    with pytest.raises(cnnc.CnncError) as info:
        cnnc.compile(EXAMPLES / "shufflenet_v2_x1_0.cnn", fully_conv=True)
    assert "reshape" in info.value.message and "fixes every size" in info.value.message
