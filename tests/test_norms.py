"""layernorm, groupnorm, linear and scale (what ConvNeXt and GroupNorm users need): their
arithmetic, their ONNX forms at every opset range checked in onnxruntime and onnx.reference,
their names and errors, what import makes of the ways exporters write them, and a
ConvNeXt block written as a program and as PyTorch exports it, which come to one network."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import onnx
import pytest
from helpers import assert_agree, ort_session
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import cnnc
from cnnc.api import optimize
from cnnc.backends.interpreter import Interpreter
from cnnc.backends.onnx_export import max_opset
from cnnc.errors import LayerError, ModelFileError
from cnnc.frontend.onnx_import import load_onnx
from cnnc.ops import get_op
from cnnc.passes.manager import pipeline

BATCHES = pytest.mark.parametrize("batch", [1, 3], ids=["batch1", "batch3"])
# The opset ranges of each ONNX form: LayerNorm and GroupNorm functions (13-16),
# LayerNormalization (17-20), GroupNormalization (21 on), and the newest.
OPSETS = sorted({13, 16, 17, 20, 21, max_opset()})


def labels(model: cnnc.Model) -> list[str]:
    return [get_op(n.op).label(n) for n in model.graph.nodes]


def param(model: cnnc.Model, name: str) -> np.ndarray:
    return model.graph.params[name].data.astype(np.float64)


def normalized(x: np.ndarray, axes: tuple[int, ...], eps: float) -> np.ndarray:
    x = x.astype(np.float64)
    mean = x.mean(axis=axes, keepdims=True)
    return (x - mean) / np.sqrt(x.var(axis=axes, keepdims=True) + eps)


def per_channel(v: np.ndarray, rank: int) -> np.ndarray:
    return v.reshape(-1, *(1,) * (rank - 2))


# ---- what each layer computes -----------------------------------------------------------------

MAPS = {"2-D": "6x5x7", "1-D": "6x9"}


@BATCHES
@pytest.mark.parametrize("shape", MAPS.values(), ids=MAPS.keys())
def test_layernorm_normalizes_the_channels_at_each_position(shape, batch):
    model = cnnc.compile(f"network n(x: {shape}) {{ ln: layernorm(eps=0.01) }}", opt_level=0)
    x = model.random_input(batch, seed=1) * 3 + 1
    rank = x.ndim
    expected = normalized(x, (1,), 0.01) * per_channel(param(model, "ln.weight"), rank)
    expected += per_channel(param(model, "ln.bias"), rank)
    np.testing.assert_allclose(model.run(x), expected, rtol=1e-5, atol=1e-5)


def test_layernorm_over_the_last_axis_normalizes_each_row():
    model = cnnc.compile("network n(x: 6x5x7) { ln: layernorm(axis=-1) }", opt_level=0)
    x = model.random_input(2, seed=2)
    assert model.graph.nodes[0].attrs["axis"] == 3
    expected = normalized(x, (3,), 1e-5) * param(model, "ln.weight") + param(model, "ln.bias")
    np.testing.assert_allclose(model.run(x), expected, rtol=1e-5, atol=1e-5)


def test_layernorm_on_features_normalizes_each_item():
    model = cnnc.compile("network n(x: 6x4x4) { gap -> flatten -> ln: layernorm }", opt_level=0)
    x = model.random_input(3, seed=3)
    features = x.astype(np.float64).mean(axis=(2, 3))
    expected = normalized(features, (1,), 1e-5) * param(model, "ln.weight")
    np.testing.assert_allclose(model.run(x), expected + param(model, "ln.bias"), atol=1e-5)


def test_layernorm_eps_keeps_a_constant_position_finite():
    # Every channel equal: the variance is 0, so the output is the bias exactly.
    model = cnnc.compile("network n(x: 4x3x3) { ln: layernorm(eps=1e-6) }", opt_level=0)
    x = np.full((2, 4, 3, 3), 2.5, np.float32)
    expected = np.broadcast_to(per_channel(param(model, "ln.bias"), 4), x.shape)
    np.testing.assert_allclose(model.run(x), expected, atol=1e-6)


@BATCHES
@pytest.mark.parametrize("groups", [1, 3, 6])
@pytest.mark.parametrize("shape", MAPS.values(), ids=MAPS.keys())
def test_groupnorm_normalizes_each_group_of_channels(shape, groups, batch):
    model = cnnc.compile(f"network n(x: {shape}) {{ gn: groupnorm({groups}) }}", opt_level=0)
    x = model.random_input(batch, seed=groups) * 2 - 1
    grouped = x.reshape(batch, groups, -1)
    expected = normalized(grouped, (2,), 1e-5).reshape(x.shape)
    expected = expected * per_channel(param(model, "gn.weight"), x.ndim)
    expected += per_channel(param(model, "gn.bias"), x.ndim)
    np.testing.assert_allclose(model.run(x), expected, rtol=1e-5, atol=1e-5)


@BATCHES
@pytest.mark.parametrize("shape", MAPS.values(), ids=MAPS.keys())
def test_linear_maps_the_channels_of_each_position(shape, batch):
    model = cnnc.compile(f"network n(x: {shape}) {{ l: linear(4) }}", opt_level=0)
    x = model.random_input(batch, seed=4)
    expected = np.einsum("oc,nc...->no...", param(model, "l.weight"), x.astype(np.float64))
    expected += per_channel(param(model, "l.bias"), x.ndim)
    np.testing.assert_allclose(model.run(x), expected, rtol=1e-5, atol=1e-5)
    assert model.graph.params["l.weight"].shape == (4, 6)  # torch.nn.Linear's [out, in]


def test_linear_over_the_last_axis_without_bias():
    model = cnnc.compile("network n(x: 6x5x7) { l: linear(3, axis=-1, bias=false) }", opt_level=0)
    x = model.random_input(2, seed=5)
    assert "l.bias" not in model.graph.params
    assert model.graph.outputs[0].shape == ("N", 6, 5, 3)
    np.testing.assert_allclose(model.run(x), x @ param(model, "l.weight").T, atol=1e-5)


def test_linear_on_features_is_an_fc_layer():
    model = cnnc.compile("network n(x: 6x4x4) { gap -> flatten -> l: linear(5) }", opt_level=0)
    assert [n.op for n in model.graph.nodes] == ["gap", "flatten", "fc"]
    assert model.graph.params["l.weight"].shape == (5, 6)


def test_scale_multiplies_each_channel_by_the_tensor_named_as_the_layer():
    model = cnnc.compile("network n(x: 6x5x5) { layer_scale: scale }", opt_level=0)
    (node,) = model.graph.nodes
    assert (node.name, node.inputs[1].name, node.inputs[1].shape) == (
        "layer_scale.mul",
        "layer_scale",
        (6, 1, 1),
    )
    x = model.random_input(2, seed=6)
    np.testing.assert_allclose(model.run(x), x * param(model, "layer_scale"), rtol=1e-6)


def test_scale_starts_from_the_batch_norm_scale_rule_not_pytorch_s_1e6():
    # U(0.5, 1.5), as bn's weights, so that tests see the branch it scales.
    model = cnnc.compile("network n(x: 64x9) { s: scale }", opt_level=0)
    weight = model.graph.params["s"].data
    assert weight.shape == (64, 1)
    assert weight.min() >= 0.5 and weight.max() <= 1.5 and weight.std() > 0.1


# ---- ONNX: every form, every opset range, two runtimes ------------------------------------------

PROGRAMS = {
    "2-D": "network n(x: 6x5x7) { a: layernorm(eps=0.001) -> b: linear(8) -> gelu "
    "-> c: groupnorm(2) -> d: linear(6, bias=false) -> layer_scale: scale -> e: groupnorm(6) }",
    "channels-last": "network n(x: 6x5x7) { a: layernorm(axis=-1) -> b: linear(4, axis=-1) "
    "-> c: linear(3, axis=2) -> groupnorm(1) }",
    "1-D": "network n(x: 6x9) { a: layernorm -> b: linear(8) -> c: groupnorm(4) "
    "-> layer_scale: scale -> groupnorm(8) }",
    "features": "network n(x: 6x9) { gap -> flatten -> a: layernorm -> b: linear(8) "
    "-> c: groupnorm(4) -> layer_scale: scale -> groupnorm(8) }",
}


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("program", PROGRAMS.values(), ids=PROGRAMS.keys())
def test_exports_agree_with_onnxruntime_and_onnx_reference(program, opset):
    model = cnnc.compile(program, opt_level=0)
    proto = model.to_onnx(opset=opset)
    onnx.checker.check_model(proto, full_check=True)
    session, reference = ort_session(proto), ReferenceEvaluator(proto)
    for batch in (1, 3):
        x = model.random_input(batch, seed=batch)
        ours = model.run(x)
        assert_agree(ours, session.run(None, {"x": x})[0], f"onnxruntime, batch {batch}")
        assert_agree(ours, reference.run(None, {"x": x})[0], f"onnx.reference, batch {batch}")


def _ops(proto: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in proto.graph.node]


@pytest.mark.parametrize(
    ("opset", "expected"),
    [
        (16, ["Transpose", "LayerNorm", "Transpose"]),
        (17, ["Transpose", "LayerNormalization", "Transpose"]),
    ],
)
def test_layernorm_over_the_channels_exports_between_two_transposes(opset, expected):
    model = cnnc.compile("network n(x: 6x5x7) { ln: layernorm }", opt_level=0)
    proto = model.to_onnx(opset=opset)
    assert _ops(proto) == expected
    assert list(proto.graph.node[0].attribute[0].ints) == [0, 2, 3, 1]
    over_last = cnnc.compile("network n(x: 6x5x7) { ln: layernorm(axis=-1) }", opt_level=0)
    assert _ops(over_last.to_onnx(opset=opset)) == expected[1:2]


@pytest.mark.parametrize(
    ("groups", "opset", "expected"),
    [(2, 20, "GroupNorm"), (2, 21, "GroupNormalization"), (6, 13, "InstanceNormalization")],
)
def test_groupnorm_exports_to_the_op_the_opset_has(groups, opset, expected):
    model = cnnc.compile(f"network n(x: 6x5x7) {{ gn: groupnorm({groups}) }}", opt_level=0)
    proto = model.to_onnx(opset=opset)
    assert _ops(proto) == [expected]
    if expected == "GroupNorm":
        assert {f.name for f in proto.functions} == {"GroupNorm"}


def test_linear_and_scale_export_the_state_dict_tensors_as_they_are():
    model = cnnc.compile(
        "network n(x: 6x5x7) { b: linear(8) -> c: linear(5, axis=-1) -> s: scale }", opt_level=0
    )
    proto = model.to_onnx()
    shapes = {i.name: tuple(i.dims) for i in proto.graph.initializer}
    assert (shapes["b.weight"], shapes["c.weight"], shapes["s"]) == ((8, 6), (5, 7), (8, 1, 1))
    assert _ops(proto) == ["Unsqueeze", "Conv", "Transpose", "MatMul", "Add", "Mul"]


def imported(proto: onnx.ModelProto, passes: list[str] | None = None) -> cnnc.Model:
    graph = load_onnx(proto)
    optimize(graph, 0, passes)
    return cnnc.Model(graph)


@pytest.mark.parametrize("opset", [13, 17, max_opset()])
@pytest.mark.parametrize("program", PROGRAMS.values(), ids=PROGRAMS.keys())
def test_every_form_imports_back_as_the_op_it_was_with_its_tensors(program, opset):
    # A layernorm over the channels comes back between its two transposes, which
    # channels-first takes away.
    model = cnnc.compile(program, opt_level=0)
    back = imported(model.to_onnx(opset=opset), ["channels-first"])
    assert Counter(n.op for n in back.graph.nodes) == Counter(n.op for n in model.graph.nodes)
    assert {n: p.shape for n, p in back.graph.params.items()} == {
        n: p.shape for n, p in model.graph.params.items()
    }
    x = model.random_input(2, seed=7)
    assert_agree(back.run(x), model.run(x))


@pytest.mark.parametrize("opset", [13, max_opset()])
def test_inlined_functions_import_back(opset):
    # Inlined, the LayerNorm function is the older exporters' pattern. (The GroupNorm
    # function's body reshapes by Shape(x), which import does not take: below opset 21,
    # --inline-functions writes a groupnorm that does not come back.)
    program = PROGRAMS["2-D"] if opset >= 21 else PROGRAMS["2-D"].replace("groupnorm(2)", "relu")
    model = cnnc.compile(program, opt_level=0)
    proto = model.to_onnx(opset=opset, inline_functions=True)
    assert not proto.functions
    back = imported(proto, ["channels-first"])
    assert Counter(n.op for n in back.graph.nodes) == Counter(n.op for n in model.graph.nodes)
    x = model.random_input(2, seed=8)
    assert_agree(back.run(x), model.run(x))


# ---- names and mistakes -----------------------------------------------------------------------


def test_groups_that_do_not_divide_the_channels_is_an_error_at_the_argument():
    with pytest.raises(LayerError) as info:
        cnnc.compile("network n(x: 6x5x5) {\n  conv(12, 1) -> groupnorm(5)\n}")
    error = info.value
    assert error.message == "groupnorm groups=5 does not divide the 12 channels"
    assert (error.location.line, error.location.col) == (2, 28)
    assert error.hint == "use a divisor of 12: 1, 2, 3, 4, 6, 12"


@pytest.mark.parametrize("layer", ["layernorm(axis=0)", "linear(4, axis=4)", "layernorm(axis=-4)"])
def test_an_axis_that_is_not_after_the_batch_is_an_error(layer):
    with pytest.raises(LayerError, match=r"axis -?\d is not an axis after the batch"):
        cnnc.compile(f"network n(x: 6x5x5) {{ {layer} }}")


def test_a_scale_whose_name_is_taken_is_an_error():
    with pytest.raises(LayerError, match=r"scale names its tensor 'c\.weight' after the layer"):
        cnnc.compile("network n(x: 6x5x5) { c: conv(4, 1) -> c.weight: scale }")


CNBLOCK = """
block cnblock(c) {
    y = in -> block.0: conv(c, 7, pad=3, groups=c) -> block.2: layernorm(eps=1e-6)
           -> block.3: linear(4 * c) -> gelu -> block.5: linear(c) -> layer_scale: scale
    add(y, in)
}
network convnext_block(x: 8x9x9) { features.1.0: cnblock(8) }
"""

# torchvision's convnext state_dict entries of one CNBlock (features.1.0 of convnext_tiny,
# with 8 channels here): block.1 and block.6 are its Permutes, which hold nothing.
CNBLOCK_STATE = {
    "features.1.0.layer_scale": (8, 1, 1),
    "features.1.0.block.0.weight": (8, 1, 7, 7),
    "features.1.0.block.0.bias": (8,),
    "features.1.0.block.2.weight": (8,),
    "features.1.0.block.2.bias": (8,),
    "features.1.0.block.3.weight": (32, 8),
    "features.1.0.block.3.bias": (32,),
    "features.1.0.block.5.weight": (8, 32),
    "features.1.0.block.5.bias": (8,),
}


def test_a_convnext_block_has_torchvision_s_state_dict_names_and_loads_one(tmp_path):
    model = cnnc.compile(CNBLOCK, opt_level=0)
    assert {n: p.shape for n, p in model.graph.params.items()} == CNBLOCK_STATE
    rng = np.random.default_rng(0)
    state = {n: rng.standard_normal(s).astype(np.float32) for n, s in CNBLOCK_STATE.items()}
    np.savez(tmp_path / "w.npz", **state)
    loaded = cnnc.compile(CNBLOCK, weights=tmp_path / "w.npz", opt_level=0)
    x = loaded.random_input(2)
    # torchvision's CNBlock, written out after its depthwise conv: channels last for
    # LayerNorm, Linear, GELU, Linear, then back, times layer_scale, plus the input.
    _, values = Interpreter(loaded.graph).run_all(x)
    h = values["features.1.0.block.0"].astype(np.float64).transpose(0, 2, 3, 1)
    h = normalized(h, (3,), 1e-6) * state["features.1.0.block.2.weight"]
    h += state["features.1.0.block.2.bias"]
    h = h @ state["features.1.0.block.3.weight"].T + state["features.1.0.block.3.bias"]
    h = 0.5 * h * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))
    h = h @ state["features.1.0.block.5.weight"].T + state["features.1.0.block.5.bias"]
    expected = state["features.1.0.layer_scale"] * h.transpose(0, 3, 1, 2) + x
    assert_agree(loaded.run(x), expected)
    optimized = cnnc.compile(CNBLOCK, weights=tmp_path / "w.npz")
    assert_agree(optimized.run(x), expected)


# ---- import: what other exporters write ---------------------------------------------------------


def onnx_model(
    nodes, x_shape, initializers=None, opset=17, out_rank=None, check=True
) -> onnx.ModelProto:
    """A hand-built model of input ``x`` [N, *x_shape] whose output is the last node's."""
    graph = helper.make_graph(
        nodes,
        "t",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *x_shape])],
        [
            helper.make_tensor_value_info(
                nodes[-1].output[0], TensorProto.FLOAT, [None] * (out_rank or len(x_shape) + 1)
            )
        ],
        initializer=[numpy_helper.from_array(a, n) for n, a in (initializers or {}).items()],
    )
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(
        graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets)
    )
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model


def agrees_with_runtimes(proto: onnx.ModelProto, x_shape, passes=None) -> cnnc.Model:
    """Import ``proto`` and check it against onnxruntime and onnx.reference at batch 1 and 3."""
    model = imported(proto, passes)
    session, reference = ort_session(proto), ReferenceEvaluator(proto)
    for batch in (1, 3):
        x = np.random.default_rng(batch).standard_normal((batch, *x_shape), dtype=np.float32)
        ours = model.run(x)
        assert_agree(ours, session.run(None, {"x": x})[0], f"onnxruntime, batch {batch}")
        assert_agree(ours, reference.run(None, {"x": x})[0], f"onnx.reference, batch {batch}")
    return model


RNG = np.random.default_rng(42)


def rand(*shape: int, low: float | None = None) -> np.ndarray:
    if low is not None:
        return RNG.uniform(low, low + 1, shape).astype(np.float32)
    return RNG.standard_normal(shape).astype(np.float32)


def test_layer_normalization_over_the_last_axis_is_a_layernorm_keeping_its_tensors():
    node = helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1, epsilon=1e-6)
    proto = onnx_model([node], (5, 5, 6), {"g": rand(6, low=0.5), "b": rand(6)})
    model = agrees_with_runtimes(proto, (5, 5, 6))
    (ln,) = model.graph.nodes
    assert (ln.op, ln.attrs, [v.name for v in ln.params]) == (
        "layernorm",
        {"axis": 3, "epsilon": pytest.approx(1e-6)},
        ["g", "b"],
    )


def test_layer_normalization_without_a_bias_gets_a_zero_one():
    node = helper.make_node("LayerNormalization", ["x", "g"], ["y"], axis=2)
    model = agrees_with_runtimes(onnx_model([node], (4, 6), {"g": rand(6)}), (4, 6))
    assert model.graph.nodes[0].op == "layernorm"
    np.testing.assert_array_equal(model.graph.nodes[0].inputs[2].data, np.zeros(6))


def test_layer_normalization_of_a_whole_item_with_per_channel_scale_is_one_group():
    node = helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=1)
    inits = {"g": rand(6, 1, 1, low=0.5), "b": rand(6, 1, 1)}
    model = agrees_with_runtimes(onnx_model([node], (6, 4, 5), inits), (6, 4, 5))
    assert labels(model) == ["groupnorm"] and model.graph.nodes[0].attrs["groups"] == 1


def test_layer_normalization_of_each_channel_with_one_scale_is_a_group_per_channel():
    node = helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=2)
    inits = {"g": np.full((1, 1), 1.5, np.float32), "b": np.full(1, 0.25, np.float32)}
    model = agrees_with_runtimes(onnx_model([node], (6, 4, 5), inits), (6, 4, 5))
    assert labels(model) == ["groupnorm"] and model.graph.nodes[0].attrs["groups"] == 6


def test_layer_normalization_over_several_axes_with_an_elementwise_scale_is_refused():
    node = helper.make_node("LayerNormalization", ["x", "g"], ["y"], axis=2)
    with pytest.raises(ModelFileError) as info:
        load_onnx(onnx_model([node], (6, 4, 5), {"g": rand(4, 5)}), "m.onnx")
    assert info.value.where == "m.onnx: node y (LayerNormalization)"
    assert "normalizes over one axis, or over each item or channel" in info.value.message


def test_layer_normalization_s_statistics_outputs_are_refused():
    node = helper.make_node("LayerNormalization", ["x", "g"], ["y", "mean"], axis=-1)
    used = helper.make_node("Add", ["y", "mean"], ["z"])
    with pytest.raises(ModelFileError, match="Mean and InvStdDev outputs are not supported"):
        load_onnx(onnx_model([node, used], (4, 6), {"g": rand(6)}))


def old_layernorm(axes: list[int], opset: int, gamma_shape, affine: bool = True, square="Pow"):
    """What older exporters write for LayerNorm: ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt,
    Div, Mul, Add (the axes an attribute before opset 18, an input after)."""

    def mean(x: str, y: str) -> onnx.NodeProto:
        if opset >= 18:
            return helper.make_node("ReduceMean", [x, "axes"], [y])
        return helper.make_node("ReduceMean", [x], [y], axes=axes)

    nodes = [
        mean("x", "m"),
        helper.make_node("Sub", ["x", "m"], ["d"]),
        helper.make_node("Pow", ["d", "two"], ["d2"])
        if square == "Pow"
        else helper.make_node("Mul", ["d", "d"], ["d2"]),
        mean("d2", "v"),
        helper.make_node("Add", ["v", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["s"]),
        helper.make_node("Div", ["d", "s"], ["n" if affine else "y"]),
    ]
    inits = {"two": np.array(2.0, np.float32), "eps": np.array(1e-5, np.float32)}
    if affine:
        nodes += [
            helper.make_node("Mul", ["gamma", "n"], ["ng"]),
            helper.make_node("Add", ["ng", "beta"], ["y"]),
        ]
        inits |= {"gamma": rand(*gamma_shape, low=0.5), "beta": rand(*gamma_shape)}
    if opset >= 18:
        inits["axes"] = np.array(axes, np.int64)
    return nodes, inits


@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize(
    ("axes", "gamma_shape", "axis"),
    [([-1], (5,), 3), ([1], (6, 1, 1), 1)],
    ids=["last", "channels"],
)
def test_the_older_exporters_layernorm_pattern_is_one_layernorm(opset, axes, gamma_shape, axis):
    nodes, inits = old_layernorm(axes, opset, gamma_shape)
    model = agrees_with_runtimes(onnx_model(nodes, (6, 4, 5), inits, opset), (6, 4, 5))
    assert [(n.op, n.attrs["axis"]) for n in model.graph.nodes] == [("layernorm", axis)]
    assert model.graph.nodes[0].inputs[1].name == ("gamma" if axis == 3 else "y.weight")


@pytest.mark.parametrize("square", ["Pow", "Mul"])
def test_the_older_exporters_layernorm_pattern_without_scale_and_shift(square):
    nodes, inits = old_layernorm([-1], 13, (5,), affine=False, square=square)
    model = agrees_with_runtimes(onnx_model(nodes, (6, 4, 5), inits, 13), (6, 4, 5))
    assert labels(model) == ["layernorm"]


def test_a_layernorm_pattern_whose_deviation_is_read_elsewhere_is_left_alone():
    nodes, inits = old_layernorm([-1], 13, (5,))
    nodes.append(helper.make_node("Add", ["y", "d"], ["z"]))
    with pytest.raises(ModelFileError, match="ReduceMean"):
        load_onnx(onnx_model(nodes, (6, 4, 5), inits, 13))


@pytest.mark.parametrize("opset", [18, 21])
def test_group_normalization_scale_is_per_group_at_18_and_per_channel_from_21(opset):
    size = 6 if opset >= 21 else 3
    inits = {"g": rand(size, low=0.5), "b": rand(size)}
    node = helper.make_node("GroupNormalization", ["x", "g", "b"], ["y"], num_groups=3)
    # onnx's checker calls opset 18's form deprecated (its meaning changed at 21).
    proto = onnx_model([node], (6, 4, 5), inits, opset, check=opset >= 21)
    model = imported(proto)
    assert labels(model) == ["groupnorm"]
    weight = model.graph.nodes[0].inputs[1].data
    expected = inits["g"] if opset >= 21 else np.repeat(inits["g"], 2)
    np.testing.assert_array_equal(weight, expected)
    x = np.random.default_rng(0).standard_normal((2, 6, 4, 5), dtype=np.float32)
    # onnxruntime runs opset 18's form; onnx.reference's has the opset 21 meaning only.
    assert_agree(model.run(x), ort_session(proto).run(None, {"x": x})[0])


@pytest.mark.parametrize("shape", [(6, 4, 5), (6, 9)], ids=["2-D", "1-D"])
def test_instance_normalization_is_a_group_per_channel(shape):
    node = helper.make_node("InstanceNormalization", ["x", "g", "b"], ["y"], epsilon=1e-3)
    model = agrees_with_runtimes(onnx_model([node], shape, {"g": rand(6), "b": rand(6)}), shape)
    assert labels(model) == ["groupnorm"] and model.graph.nodes[0].attrs["groups"] == 6


def torch_groupnorm(groups: int, affine: bool = True, channels: int = 6, **shape_attrs):
    """What torch writes for nn.GroupNorm: Reshape to [0, G, -1], InstanceNormalization with
    ones and zeros, Reshape back by Shape(x), Mul and Add by the unsqueezed weight and bias."""
    nodes = [
        helper.make_node("Reshape", ["x", "grouped"], ["r"]),
        helper.make_node("InstanceNormalization", ["r", "ones", "zeros"], ["i"], epsilon=1e-5),
        helper.make_node("Shape", ["x"], ["shape"], **shape_attrs),
        helper.make_node("Reshape", ["i", "shape"], ["back" if affine else "y"]),
    ]
    inits = {
        "grouped": np.array([0, groups, -1], np.int64),
        "ones": np.ones(groups, np.float32),
        "zeros": np.zeros(groups, np.float32),
    }
    if affine:
        nodes += [
            helper.make_node("Mul", ["back", "weight"], ["scaled"]),
            helper.make_node("Add", ["scaled", "bias"], ["y"]),
        ]
        inits |= {"weight": rand(channels, 1, 1, low=0.5), "bias": rand(channels, 1, 1)}
    return nodes, inits


@pytest.mark.parametrize(
    ("affine", "shape_attrs"),
    [(True, {}), (False, {}), (True, {"start": 0})],
    ids=["affine", "plain", "dynamo"],  # torch's dynamo exporter writes Shape(x, start=0)
)
def test_torch_s_groupnorm_pattern_is_one_groupnorm(affine, shape_attrs):
    nodes, inits = torch_groupnorm(3, affine, **shape_attrs)
    model = agrees_with_runtimes(onnx_model(nodes, (6, 4, 5), inits), (6, 4, 5))
    assert labels(model) == ["groupnorm"] and model.graph.nodes[0].attrs["groups"] == 3


def test_a_matmul_on_a_map_then_a_bias_is_a_linear_over_the_last_axis():
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"]),
        helper.make_node("Add", ["b", "m"], ["y"]),
    ]
    inits = {"w": rand(6, 8), "b": rand(8)}
    model = agrees_with_runtimes(onnx_model(nodes, (4, 5, 6), inits), (4, 5, 6))
    (linear,) = model.graph.nodes
    assert (linear.op, linear.attrs["axis"], linear.inputs[1].shape) == ("linear", 3, (8, 6))
    assert linear.inputs[2].name == "b"


def test_a_mul_by_a_per_channel_constant_after_a_map_is_a_scale_folded_into_the_conv():
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("Mul", ["s", "c"], ["y"]),
    ]
    inits = {"w": rand(4, 6, 3, 3), "s": rand(4, 1, 1)}
    proto = onnx_model(nodes, (6, 5, 5), inits)
    assert labels(imported(proto)) == ["conv2d", "scale"]
    assert labels(agrees_with_runtimes(proto, (6, 5, 5), manager_pipeline(2))) == ["conv2d"]


def manager_pipeline(level: int) -> list[str]:
    from cnnc.passes.manager import pipeline

    return pipeline(level)


# ---- passes -----------------------------------------------------------------------------------


def same_outputs_in_both_backends(before: cnnc.Model, after: cnnc.Model, batch: int = 2) -> None:
    x = before.random_input(batch, seed=11)
    reference = before.run(x)
    assert_agree(after.run(x), reference, "interpreter")
    session = ort_session(after.to_onnx())
    assert_agree(session.run(None, {after.input_names[0]: x})[0], reference, "onnxruntime")


CHANNELS_LAST = """network n(x: 6x5x7) {
    t = x -> transpose((2, 3, 1)) -> a: layernorm(axis=-1) -> b: linear(12, axis=-1)
    u = t -> gelu -> c: linear(6, axis=-1)
    v = t -> d: linear(6, axis=-1, bias=false) -> sigmoid
    add(u, v) -> transpose((3, 1, 2)) -> layer_scale: scale
}"""


@BATCHES
def test_channels_first_runs_a_channels_last_stretch_over_axis_1(batch):
    before = cnnc.compile(CHANNELS_LAST, opt_level=0)
    after = cnnc.compile(CHANNELS_LAST, passes=["channels-first"])
    assert labels(after) == [
        "layernorm",
        "linear",
        "gelu",
        "linear",
        "linear",
        "sigmoid",
        "add",
        "scale",
    ]
    assert {n.attrs["axis"] for n in after.graph.nodes if "axis" in n.attrs} == {1}
    same_outputs_in_both_backends(before, after, batch)


def test_channels_first_turns_a_1d_map_around():
    program = "network n(x: 6x9) { transpose((2, 1)) -> layernorm(axis=-1) -> transpose((2, 1)) }"
    after = cnnc.compile(program, passes=["channels-first"])
    assert [(n.op, n.attrs["axis"]) for n in after.graph.nodes] == [("layernorm", 1)]
    same_outputs_in_both_backends(cnnc.compile(program, opt_level=0), after)


def test_channels_first_drops_a_transpose_and_its_inverse():
    program = "network n(x: 6x5x7) { relu -> transpose((2, 3, 1)) -> transpose((3, 1, 2)) -> tanh }"
    assert labels(cnnc.compile(program, passes=["channels-first"])) == ["relu", "tanh"]


@pytest.mark.parametrize(
    "program",
    [
        # the channels-last value is an output
        "network n(x: 6x5x7) -> (a, b) { a = x -> transpose((2, 3, 1)) -> layernorm(axis=-1)"
        "  b = a -> transpose((3, 1, 2)) }",
        # a layernorm over the width of the channels-last map
        "network n(x: 6x5x7) { transpose((2, 3, 1)) -> layernorm(axis=2) -> transpose((3, 1, 2)) }",
        # a scale over axis 1, which is the height there
        "network n(x: 6x6x7) { transpose((2, 3, 1)) -> scale -> transpose((3, 1, 2)) }",
        # a merge with a channels-first value
        "network n(x: 6x6x6) { t = x -> transpose((2, 3, 1))  add(t, x) -> transpose((3, 1, 2)) }",
        # no way back
        "network n(x: 6x5x7) { transpose((2, 3, 1)) -> layernorm(axis=-1) -> flatten }",
    ],
    ids=["output", "other-axis", "per-channel", "outside-merge", "no-exit"],
)
def test_channels_first_leaves_alone_what_depends_on_the_layout(program):
    before = cnnc.compile(program, opt_level=0)
    after = cnnc.compile(program, passes=["channels-first"])
    assert labels(after) == labels(before)


def test_fold_bn_folds_a_scale_into_the_linear_layer_before_it_and_keeps_no_bias_absent():
    program = (
        "network n(x: 6x5x5) { a: linear(8, bias=false) -> s: scale -> b: linear(4) -> t: scale }"
    )
    before = cnnc.compile(program, opt_level=0)
    after = cnnc.compile(program, passes=["fold-bn", "dce"])
    assert labels(after) == ["linear", "linear"]
    assert sorted(after.graph.params) == ["a.weight", "b.bias", "b.weight"]
    same_outputs_in_both_backends(before, after)


def test_fold_bn_leaves_a_scale_after_a_linear_over_another_axis():
    program = "network n(x: 6x5x5) { linear(8, axis=-1) -> scale }"
    assert labels(cnnc.compile(program, passes=["fold-bn"])) == ["linear", "scale"]


def test_fc_to_conv_makes_a_linear_over_the_channels_a_1x1_convolution_exactly():
    program = "network n(x: 6x5x7) { l: linear(8) -> linear(3, axis=-1) }"
    before = cnnc.compile(program, opt_level=0)
    weight = before.graph.params["l.weight"].data.copy()
    after = cnnc.compile(program, passes=["fc-to-conv"])
    assert labels(after) == ["conv2d", "linear"]
    assert after.graph.nodes[0].note == "linear→conv"
    np.testing.assert_array_equal(after.graph.params["l.weight"].data, weight[:, :, None, None])
    same_outputs_in_both_backends(before, after)


def test_every_example_and_the_new_layers_keep_their_outputs_through_each_pass():
    program = CHANNELS_LAST.replace(
        "-> layer_scale: scale", "-> layer_scale: scale -> groupnorm(3)"
    )
    before = cnnc.compile(program, opt_level=0)
    for name in pipeline(2):
        after = cnnc.compile(program, passes=[name])
        same_outputs_in_both_backends(before, after)


# ---- a ConvNeXt block, written both ways -------------------------------------------------------


def exported_cnblock(state: dict[str, np.ndarray], opset: int) -> onnx.ModelProto:
    """torchvision's CNBlock (features.1.0) the way PyTorch exports it: the depthwise Conv,
    Transpose, LayerNormalization over the last axis, MatMul by the transposed Linear
    weight and Add of its bias, GELU (erf's form before opset 20), MatMul, Add, Transpose
    back, Mul by layer_scale, Add of the input."""
    p = "features.1.0."
    gelu = (
        [helper.make_node("Gelu", ["h1"], ["g"])]
        if opset >= 20
        else [
            helper.make_node("Div", ["h1", "sqrt2"], ["e0"]),
            helper.make_node("Erf", ["e0"], ["e1"]),
            helper.make_node("Add", ["e1", "one"], ["e2"]),
            helper.make_node("Mul", ["h1", "e2"], ["e3"]),
            helper.make_node("Mul", ["e3", "half"], ["g"]),
        ]
    )
    nodes = [
        helper.make_node(
            "Conv", ["x", p + "block.0.weight", p + "block.0.bias"], ["c"],
            group=8, kernel_shape=[7, 7], pads=[3, 3, 3, 3],
        ),
        helper.make_node("Transpose", ["c"], ["t"], perm=[0, 2, 3, 1]),
        helper.make_node(
            "LayerNormalization", ["t", p + "block.2.weight", p + "block.2.bias"], ["l"],
            axis=-1, epsilon=1e-6,
        ),
        helper.make_node("MatMul", ["l", "onnx::MatMul_1"], ["m1"]),
        helper.make_node("Add", [p + "block.3.bias", "m1"], ["h1"]),
        *gelu,
        helper.make_node("MatMul", ["g", "onnx::MatMul_2"], ["m2"]),
        helper.make_node("Add", [p + "block.5.bias", "m2"], ["h2"]),
        helper.make_node("Transpose", ["h2"], ["u"], perm=[0, 3, 1, 2]),
        helper.make_node("Mul", [p + "layer_scale", "u"], ["s"]),
        helper.make_node("Add", ["s", "x"], ["y"]),
    ]  # fmt: skip
    inits = {
        **{n: a for n, a in state.items() if not n.endswith(("block.3.weight", "block.5.weight"))},
        "onnx::MatMul_1": np.ascontiguousarray(state[p + "block.3.weight"].T),
        "onnx::MatMul_2": np.ascontiguousarray(state[p + "block.5.weight"].T),
        "sqrt2": np.array(math.sqrt(2), np.float32),
        "one": np.array(1.0, np.float32),
        "half": np.array(0.5, np.float32),
    }
    return onnx_model(nodes, (8, 9, 9), inits, opset)


@pytest.mark.parametrize("opset", [17, 20])
def test_a_convnext_block_imports_to_the_program_s_computation_and_structure(opset):
    program = cnnc.compile(CNBLOCK, opt_level=0)
    state = {n: p.data for n, p in program.graph.params.items()}
    proto = exported_cnblock(state, opset)
    # As imported: channels last between two transposes, computing what the program does.
    model = agrees_with_runtimes(proto, (8, 9, 9))
    assert labels(model) == [
        "conv2d", "transpose", "layernorm", "linear", "gelu", "linear", "transpose", "scale",
        "add",
    ]  # fmt: skip
    x = program.random_input(3, seed=12)
    assert_agree(model.run(x), program.run(x))
    # At -O2 both are one network: no transposes, the same layers, the same outputs.
    optimized, program_o2 = imported(proto, pipeline(2)), cnnc.compile(CNBLOCK)
    assert labels(optimized) == labels(program_o2) == [
        "conv2d", "layernorm", "conv2d+gelu", "conv2d", "add"
    ]  # fmt: skip
    for a, b in zip(optimized.graph.nodes, program_o2.graph.nodes, strict=True):
        assert [v.shape for v in a.inputs] == [v.shape for v in b.inputs]
    assert_agree(optimized.run(x), program.run(x))
    assert_agree(ort_session(optimized.to_onnx()).run(None, {"x": x})[0], program.run(x))


def test_an_imported_convnext_block_decompiles_to_a_program_that_computes_it(tmp_path):
    program = cnnc.compile(CNBLOCK, opt_level=0)
    state = {n: p.data for n, p in program.graph.params.items()}
    model = imported(exported_cnblock(state, 17))
    text, weights = model.to_program()
    assert "transpose((2, 3, 1))" in text and "layernorm(eps=1e-06, axis=3)" in text
    assert "features.1.0.layer_scale: scale" in text
    assert weights["features.1.0.layer_scale"].shape == (8, 1, 1)
    np.savez(tmp_path / "w.npz", **weights)
    back = cnnc.compile(text, weights=tmp_path / "w.npz", opt_level=0)
    x = program.random_input(2, seed=13)
    np.testing.assert_array_equal(back.run(x), model.run(x))
