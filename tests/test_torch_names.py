"""Models exported by PyTorch import with the names of their modules, from either exporter.

The fixtures (tests/fixtures/torch_tiny.*, made by make_torch_tiny.py there) are one tiny
CNN exported by the TorchScript exporter and by the dynamo exporter; no PyTorch is needed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import run_cnnc
from helpers import assert_agree
from onnx import helper, numpy_helper

import cnnc
from cnnc.frontend.onnx_import import load_onnx
from cnnc.frontend.onnx_names import module_scope
from cnnc.ir.graph import Graph

FIXTURES = Path(__file__).resolve().parent / "fixtures"
EXPORTERS = ["ts", "dynamo"]

LAYERS = [
    "stem.0",
    "stem.2",
    "layer1.0.conv1",
    "layer1.0.relu",
    "layer1.0.conv2",
    "layer1.0.add",
    "layer1.0.relu.2",
    "layer1.1.conv1",
    "layer1.1.relu",
    "layer1.1.conv2",
    "layer1.1.add",
    "layer1.1.relu.2",
    "norm",
    "pool",
    "flatten",
    "fc",
]
# The parameters after import: the state_dict's, less the BatchNorms folded into the conv
# before them, whose folded weights and biases take the conv's names.
PARAMS = {
    "stem.0.weight",
    "stem.0.bias",
    "layer1.0.conv1.weight",
    "layer1.0.conv1.bias",
    "layer1.0.conv2.weight",
    "layer1.0.conv2.bias",
    "layer1.1.conv1.weight",
    "layer1.1.conv1.bias",
    "layer1.1.conv2.weight",
    "layer1.1.conv2.bias",
    "norm.weight",
    "norm.bias",
    "norm.running_mean",
    "norm.running_var",
    "fc.weight",
    "fc.bias",
}


def fixture(exporter: str) -> Path:
    return FIXTURES / f"torch_tiny.{exporter}.onnx"


@pytest.fixture(scope="module")
def torch_outputs() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "torch_tiny.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_torch_export_imports_with_module_paths_as_layer_names(exporter):
    model = cnnc.load(fixture(exporter), opt_level=0)
    assert [n.name for n in model.graph.nodes] == LAYERS


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_torch_export_imports_with_state_dict_parameter_names(exporter, torch_outputs):
    model = cnnc.load(fixture(exporter), opt_level=0)
    assert set(model.graph.params) == PARAMS
    assert PARAMS - {"layer1.0.conv1.bias", "layer1.1.conv1.bias"} <= set(
        torch_outputs["state_dict"]
    )
    conv = next(n for n in model.graph.nodes if n.name == "layer1.0.conv1")
    assert [p.name for p in conv.params] == ["layer1.0.conv1.weight", "layer1.0.conv1.bias"]


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_node_outputs_are_named_after_their_nodes_and_graph_outputs_keep_theirs(exporter):
    model = cnnc.load(fixture(exporter), opt_level=0)
    assert [n.output.name for n in model.graph.nodes[:-1]] == LAYERS[:-1]
    assert model.output_names == ["output"]
    assert model.input_names == ["input"]


@pytest.mark.parametrize("opt_level", [0, 2])
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_torch_export_computes_torchs_outputs(exporter, opt_level, torch_outputs):
    model = cnnc.load(fixture(exporter), opt_level=opt_level)
    x, y = torch_outputs["x"], torch_outputs["y"]
    assert_agree(model.run(x), y, f"{exporter} -O{opt_level}, batch 2")
    assert_agree(model.run(x[:1]), y[:1], f"{exporter} -O{opt_level}, batch 1")


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_cnnc_import_writes_state_dict_labels_and_weights_that_load_back(
    exporter, tmp_path, torch_outputs
):
    out = tmp_path / "tiny.cnn"
    proc = run_cnnc("import", fixture(exporter), "-o", out)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert "    layer1.0.conv1: conv(4, 3, pad=1)\n" in text
    assert " = layer1.0.relu.2: relu\n" in text
    assert "    fc: fc(3)\n" in text
    with np.load(tmp_path / "tiny.npz") as weights:
        assert set(weights.files) == PARAMS
    model = cnnc.compile(out, weights=tmp_path / "tiny.npz", opt_level=0)
    assert [n.name for n in model.graph.nodes] == LAYERS
    assert_agree(model.run(torch_outputs["x"]), torch_outputs["y"], f"{exporter} program")


@pytest.mark.parametrize(
    ("name", "path"),
    [
        ("/conv1/Conv", ["conv1"]),
        ("/layer2/layer2.0/downsample/downsample.0/Conv", ["layer2.0", "downsample.0"]),
        (
            "/features/features.1/features.1.0/block/block.0/block.0.0/Conv",
            ["features.1.0", "block.0.0"],
        ),
        (
            "/trunk_output/block1/block1-0/f/a/a.0/Conv",
            ["trunk_output", "block1", "block1-0", "f", "a.0"],
        ),
        ("/0/Conv", ["0"]),
        ("/Flatten", []),
        ("conv1", None),
        ("node_Conv_12", None),
    ],
)
def test_module_scope_reads_torchscript_node_names(name, path):
    assert module_scope(helper.make_node("Relu", ["x"], ["y"], name=name)) == path


def test_module_scope_reads_dynamo_name_scopes():
    node = helper.make_node("Relu", ["x"], ["y"], name="node_relu_2")
    prop = node.metadata_props.add()
    prop.key = "pkg.torch.onnx.name_scopes"
    prop.value = "['', 'layer1', 'layer1.0', 'layer1.0.relu', 'relu_2']"
    assert module_scope(node) == ["layer1.0.relu"]


def _model(
    nodes: list[onnx.NodeProto], weights: dict[str, np.ndarray], out: tuple = (1, 3, 3)
) -> onnx.ModelProto:
    """A chain of nodes from x (N×1×3×3) to the last node's output (N×``out``)."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 1, 3, 3])],
        [helper.make_tensor_value_info(nodes[-1].output[0], onnx.TensorProto.FLOAT, ["N", *out])],
        [numpy_helper.from_array(w, name) for name, w in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _conv_relu(conv: str, relu: str, weight: str) -> Graph:
    return load_onnx(
        _model(
            [
                helper.make_node("Conv", ["x", weight], ["c"], name=conv),
                helper.make_node("Relu", ["c"], ["y"], name=relu),
            ],
            {weight: np.ones((2, 1, 1, 1), np.float32)},
            out=(2, 3, 3),
        )
    )


def _relus(*names: str) -> list[str]:
    values = ["x", *(f"v{i}" for i in range(len(names)))]
    nodes = [
        helper.make_node("Relu", [a], [b], name=name)
        for name, a, b in zip(names, values[:-1], values[1:], strict=True)
    ]
    return [n.name for n in load_onnx(_model(nodes, {})).nodes]


def test_nodes_of_other_producers_keep_their_onnx_names():
    graph = _conv_relu("conv_0", "relu_0", "W")
    assert [n.name for n in graph.nodes] == ["conv_0", "relu_0"]
    assert set(graph.params) == {"W"}


def test_a_weight_named_as_in_a_state_dict_names_its_node():
    graph = _conv_relu("conv_0", "relu_0", "head.0.weight")
    assert [n.name for n in graph.nodes] == ["head.0", "relu_0"]
    assert set(graph.params) == {"head.0.weight"}


def test_torchscript_scope_names_a_node_and_its_folded_weights():
    graph = _conv_relu("/head/head.0/Conv", "/head/head.1/Relu", "onnx::Conv_7")
    assert [n.name for n in graph.nodes] == ["head.0", "head.1"]
    assert set(graph.params) == {"head.0.weight"}


def test_a_module_called_again_is_numbered_after_its_first_call():
    assert _relus("/block/relu/Relu", "/block/relu_1/Relu", "/block/relu_2/Relu") == [
        "block.relu",
        "block.relu.2",
        "block.relu.3",
    ]


def test_a_module_named_like_a_second_call_keeps_its_name_without_a_first():
    assert _relus("/block/relu_1/Relu") == ["block.relu_1"]


def test_ops_of_a_module_with_inner_modules_are_named_after_the_op():
    assert _relus("/block/inner/Relu", "/block/Relu", "/block/Relu_1", "/Relu") == [
        "block.inner",
        "block.relu",
        "block.relu.2",
        "relu",
    ]


def test_the_one_layer_of_a_module_takes_its_name_and_its_other_ops_their_op():
    graph = _conv_relu("/head/Conv", "/head/Relu", "onnx::Conv_7")
    assert [n.name for n in graph.nodes] == ["head", "head.relu"]


def test_every_ir_node_of_one_onnx_node_is_named_from_its_scope():
    mean = helper.make_node(
        "ReduceMean", ["x"], ["y"], name="/head/ReduceMean", axes=[2, 3], keepdims=0
    )
    nodes = load_onnx(_model([mean], {}, out=(1,))).nodes
    assert [(n.op, n.name) for n in nodes] == [("gap", "head.gap"), ("flatten", "head.flatten")]


def test_a_bare_sequentials_layers_are_named_by_index():
    graph = _conv_relu("/0/Conv", "/1/Relu", "0.weight")
    assert [n.name for n in graph.nodes] == ["0", "1"]
    assert set(graph.params) == {"0.weight"}
