"""Lowering: layer names, inserted nodes, padding forms and the shapes inferred for each layer."""

from __future__ import annotations

import pytest

import cnnc
from cnnc.errors import InternalError
from cnnc.ir.types import TensorType
from cnnc.ir.verify import verify


def graph_of(body: str, input_shape: str = "3x32x32"):
    return cnnc.compile(f"network n(x: {input_shape}) {{\n{body}\n}}", opt_level=0).graph


def output_shape(layer: str, input_shape: str = "3x32x32") -> tuple:
    return graph_of(f"  {layer}", input_shape).outputs[0].type.shape


@pytest.mark.parametrize(
    ("layer", "shape"),
    [
        ("conv(8, 3)", ("N", 8, 30, 30)),
        ("conv(8, 3, pad=1)", ("N", 8, 32, 32)),
        ("conv(8, 3, stride=2)", ("N", 8, 15, 15)),
        ("conv(8, 3, stride=2, pad=1)", ("N", 8, 16, 16)),
        ("conv(8, (3, 5))", ("N", 8, 30, 28)),
        ("conv(8, 3x5)", ("N", 8, 30, 28)),
        ("conv(8, 3, pad=(1, 2))", ("N", 8, 32, 34)),
        ("conv(8, 3, pad=(0, 1, 2, 3))", ("N", 8, 32, 34)),
        ("conv(8, 3, dilation=2)", ("N", 8, 28, 28)),
        ("conv(8, 3, stride=5)", ("N", 8, 6, 6)),
        ("conv(8, 4, pad=same)", ("N", 8, 32, 32)),
        ("conv(8, 3, stride=2, pad=same)", ("N", 8, 16, 16)),
        ("conv(8, 3, stride=3, pad=valid)", ("N", 8, 10, 10)),
        ("conv(6, 3, groups=3)", ("N", 6, 30, 30)),
        ("maxpool(2)", ("N", 3, 16, 16)),
        ("maxpool(3, stride=2)", ("N", 3, 15, 15)),
        ("maxpool(3, stride=2, ceil=true)", ("N", 3, 16, 16)),
        ("maxpool(2, stride=3)", ("N", 3, 11, 11)),
        ("avgpool(3, stride=2, pad=1)", ("N", 3, 16, 16)),
        ("avgpool(5, ceil=true)", ("N", 3, 7, 7)),
        ("gap", ("N", 3, 1, 1)),
        ("flatten", ("N", 3072)),
        ("fc(10)", ("N", 10)),
        ("relu", ("N", 3, 32, 32)),
        ("softmax", ("N", 3, 32, 32)),
        ("dropout(0.2)", ("N", 3, 32, 32)),
    ],
)
def test_output_shape_of_a_2d_layer(layer, shape):
    assert output_shape(layer) == shape


@pytest.mark.parametrize(
    ("layer", "shape"),
    [
        ("conv(4, 5)", ("N", 4, 96)),
        ("conv(4, 5, pad=(1, 3))", ("N", 4, 100)),
        ("conv(4, 5, stride=2, pad=same)", ("N", 4, 50)),
        ("maxpool(4)", ("N", 2, 25)),
        ("avgpool(3, stride=2, ceil=true)", ("N", 2, 50)),
        ("gap", ("N", 2, 1)),
        ("fc(7)", ("N", 7)),
    ],
)
def test_output_shape_of_a_1d_layer(layer, shape):
    assert output_shape(layer, "2x100") == shape


def test_ceil_mode_drops_a_last_window_that_would_start_in_the_padding():
    # (5 + 1 + 1 - 2) / 2 rounds up to 3 windows, but the fourth would start at
    # position 6, past the input and its leading padding, so there are 3, not 4.
    assert output_shape("maxpool(2, stride=2, pad=1, ceil=true)", "1x5x5") == ("N", 1, 3, 3)


def test_same_padding_puts_the_odd_pixel_at_the_end():
    (conv,) = graph_of("  conv(8, 4, pad=same)").nodes
    assert conv.attrs["pads"] == (1, 1, 2, 2)


def test_padding_pair_means_both_sides_of_each_axis():
    (conv,) = graph_of("  conv(8, 3, pad=(1, 2))").nodes
    assert conv.attrs["pads"] == (1, 2, 1, 2)


def test_four_paddings_are_top_left_bottom_right():
    (conv,) = graph_of("  conv(8, 3, pad=(0, 1, 2, 3))").nodes
    assert conv.attrs["pads"] == (0, 1, 2, 3)


def test_pool_stride_defaults_to_its_kernel():
    (pool,) = graph_of("  maxpool((2, 3))").nodes
    assert pool.attrs["stride"] == (2, 3)


def test_fc_after_a_feature_map_flattens_it_first():
    g = graph_of("  f: fc(10)")
    assert [(n.op, n.name) for n in g.nodes] == [("flatten", "f.flatten"), ("fc", "f")]
    assert g.params["f.weight"].shape == (10, 3072)


def test_fc_after_fc_does_not_flatten():
    g = graph_of("  fc(10) -> fc(4)")
    assert [n.op for n in g.nodes] == ["flatten", "fc", "fc"]


def test_weights_follow_pytorch_layouts():
    g = graph_of("  a: conv(8, (3, 5), groups=1) -> b: conv(4, 1, groups=2, bias=false)")
    assert g.params["a.weight"].shape == (8, 3, 3, 5)
    assert g.params["a.bias"].shape == (8,)
    assert g.params["b.weight"].shape == (4, 4, 1, 1)
    assert "b.bias" not in g.params


def test_1d_conv_weight_is_out_in_length():
    g = graph_of("  a: conv(8, 5)", "2x50")
    assert g.params["a.weight"].shape == (8, 2, 5)


def test_unlabelled_layers_are_named_after_the_label_before_them_in_their_statement():
    g = graph_of("  c1: conv(8, 3) -> relu -> maxpool(2)\n  relu -> conv(4, 1)\n  conv(2, 1)")
    assert [n.name for n in g.nodes] == ["c1", "c1.relu", "c1.maxpool", "relu2", "conv2", "conv3"]


def test_automatic_names_skip_names_the_program_gives_later():
    g = graph_of("  conv(8, 3)\n  conv1: conv(4, 3)")
    assert [n.name for n in g.nodes] == ["conv2", "conv1"]


def test_the_batch_axis_is_symbolic_and_the_dtype_float32():
    g = graph_of("  relu")
    assert g.inputs[0].type == TensorType("f32", ("N", 3, 32, 32))


def test_the_last_network_of_a_program_is_compiled_unless_one_is_named():
    text = "network a(x: 1x4) { relu }\nnetwork b(x: 1x4) { tanh }"
    assert cnnc.compile(text).name == "b"
    assert cnnc.compile(text, network="a").name == "a"


def test_verify_catches_a_broken_use_list():
    g = graph_of("  conv(8, 3) -> relu")
    g.nodes[1].inputs[0].users.clear()
    with pytest.raises(InternalError, match="use list of %conv1"):
        verify(g)


def test_verify_catches_nodes_out_of_topological_order():
    g = graph_of("  conv(8, 3) -> relu")
    g.nodes.reverse()
    with pytest.raises(InternalError, match="not defined before it"):
        verify(g)


def test_verify_catches_a_stale_output_type():
    g = graph_of("  conv(8, 3) -> relu")
    g.nodes[1].outputs[0].type = TensorType("f32", ("N", 8, 3, 3))
    with pytest.raises(InternalError, match="its shape rule gives"):
        verify(g)


def test_two_repeated_links_of_one_keyword_in_a_labelled_chain_get_their_own_names():
    # Found by the fuzzer: both took l3.linear.0 and l3.linear.1 (an internal error).
    model = cnnc.compile(
        "network n(x: 3x23) { l3: fc(34) -> linear(4) * 2 -> linear(22) * 2 -> linear(5) }",
        opt_level=0,
    )
    # (a linear over the last axis of an [N, K] value is an fc)
    names = [n.name for n in model.graph.nodes if n.op == "fc"][1:]
    assert names == ["l3.linear.0", "l3.linear.1", "l3.linear.2.0", "l3.linear.2.1", "l3.linear.3"]
    assert model.run(model.random_inputs(1)[0]).shape == (1, 5)
