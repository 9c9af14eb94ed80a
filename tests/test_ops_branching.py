"""Merges of branches (add, concat) and the newer single-input ops (leaky_relu, clip and relu6,
lrn, global_maxpool): importing, running, fusing and exporting them, with onnxruntime and
onnx.reference as the oracles."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx.inliner
import pytest
from helpers import ATOL, RTOL, ort_session
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnxruntime.capi.onnxruntime_pybind11_state import Fail

import cnnc
from cnnc.errors import LayerError, ModelFileError, ShapeError
from cnnc.ir.graph import Graph
from cnnc.ir.types import TensorType
from cnnc.ir.verify import verify
from cnnc.ops import get_layer, get_op

BATCHES = pytest.mark.parametrize("batch", [1, 3], ids=["batch1", "batch3"])


def onnx_model(
    nodes: list[onnx.NodeProto],
    inputs: dict[str, tuple[int, ...]],
    output_rank: int,
    initializers: dict[str, np.ndarray] | None = None,
    opset: int = 17,
) -> onnx.ModelProto:
    """A hand-built model whose inputs have a symbolic batch axis and whose last node's
    first output is the model's output."""
    graph = helper.make_graph(
        nodes,
        "t",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", *s]) for n, s in inputs.items()],
        [
            helper.make_tensor_value_info(
                nodes[-1].output[0], TensorProto.FLOAT, [None] * output_rank
            )
        ],
        initializer=[numpy_helper.from_array(a, n) for n, a in (initializers or {}).items()],
    )
    opsets = [helper.make_opsetid("", opset)]
    return helper.make_model(
        graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets)
    )


def load(tmp_path, model: onnx.ModelProto, opt_level: int = 0) -> cnnc.Model:
    onnx.save(model, tmp_path / "model.onnx")
    return cnnc.load(tmp_path / "model.onnx", opt_level=opt_level)


def random_inputs(shapes: dict[str, tuple[int, ...]], batch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch)
    return {n: rng.standard_normal((batch, *s), dtype=np.float32) for n, s in shapes.items()}


def run_ours(model: cnnc.Model, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return model.interpreter.run(*(feeds[v.name] for v in model.graph.inputs))[0]


def run_onnxruntime(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return ort_session(model).run(None, feeds)[0]


def run_reference(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return ReferenceEvaluator(model).run(None, feeds)[0]


def assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL)


def assert_agrees_with_both_runtimes(
    ours: np.ndarray, model: onnx.ModelProto, feeds: dict[str, np.ndarray]
) -> None:
    assert_close(ours, run_onnxruntime(model, feeds))
    assert_close(ours, run_reference(model, feeds))


def ir_merge(op: str, shapes: dict[str, tuple[int, ...]]) -> cnnc.Model:
    """A graph built directly: one merge node ``m`` of the inputs (the language cannot yet
    name several values)."""
    graph = Graph("merge")
    values = [graph.add_input(n, TensorType("f32", ("N", *s))) for n, s in shapes.items()]
    graph.outputs = [graph.add_node(op, values, name="m").output]
    verify(graph)
    return cnnc.Model(graph)


def labels(model: cnnc.Model) -> list[str]:
    return [get_op(n.op).label(n) for n in model.graph.nodes]


def described(model: cnnc.Model) -> list[tuple[str, str, str]]:
    """Each node's name, op and attributes as the dump shows them."""
    return [(n.name, get_op(n.op).label(n), get_op(n.op).describe(n)) for n in model.graph.nodes]


# ---- add ------------------------------------------------------------------------------------

TWO_MAPS = pytest.mark.parametrize("shape", [(4, 5, 6), (4, 7)], ids=["2d", "1d"])


@BATCHES
@TWO_MAPS
def test_an_imported_add_of_two_values_matches_both_runtimes(tmp_path, shape, batch):
    shapes = {"a": shape, "b": shape}
    add = helper.make_node("Add", ["a", "b"], ["s"], name="s")
    model = onnx_model([add], shapes, 1 + len(shape))
    ours = load(tmp_path, model)
    assert labels(ours) == ["add"]
    feeds = random_inputs(shapes, batch)
    assert_agrees_with_both_runtimes(run_ours(ours, feeds), model, feeds)


@BATCHES
def test_an_add_of_a_value_and_two_branches_of_it_matches_both_runtimes(batch):
    graph = Graph("residual")
    value = graph.add_input("x", TensorType("f32", ("N", 4, 5, 5)))
    relu = graph.add_node("relu", [value], name="r").output
    tanh = graph.add_node("tanh", [value], name="t").output
    graph.outputs = [graph.add_node("add", [value, relu, tanh], name="s").output]
    model = cnnc.Model(graph)
    feeds = random_inputs({"x": (4, 5, 5)}, batch)
    x = feeds["x"]
    ours = run_ours(model, feeds)
    assert_close(ours, x + np.maximum(x, 0) + np.tanh(x))
    assert_agrees_with_both_runtimes(ours, model.to_onnx(), feeds)


def test_an_add_of_three_values_exports_as_a_chain_of_two_adds():
    model = ir_merge("add", {"a": (3, 4, 4), "b": (3, 4, 4), "c": (3, 4, 4)}).to_onnx()
    onnx.checker.check_model(model, full_check=True)
    assert [(n.op_type, n.name, list(n.input), list(n.output)) for n in model.graph.node] == [
        ("Add", "m.step2", ["a", "b"], ["m.step2"]),
        ("Add", "m", ["m.step2", "c"], ["m"]),
    ]


@BATCHES
@TWO_MAPS
def test_an_add_of_three_values_matches_both_runtimes(shape, batch):
    shapes = {"a": shape, "b": shape, "c": shape}
    model = ir_merge("add", shapes)
    feeds = random_inputs(shapes, batch)
    ours = run_ours(model, feeds)
    assert_close(ours, feeds["a"] + feeds["b"] + feeds["c"])
    assert_agrees_with_both_runtimes(ours, model.to_onnx(), feeds)


def test_an_exported_add_of_two_values_imports_back_as_one_add(tmp_path):
    model = ir_merge("add", {"a": (3, 4, 4), "b": (3, 4, 4)})
    model.to_onnx(tmp_path / "add.onnx")
    back = cnnc.load(tmp_path / "add.onnx", opt_level=0)
    assert [(n.op, n.name, [v.name for v in n.inputs]) for n in back.graph.nodes] == [
        ("add", "m", ["a", "b"])
    ]


def test_an_add_of_values_of_different_shapes_is_a_shape_error_showing_both():
    graph = Graph("bad")
    a = graph.add_input("a", TensorType("f32", ("N", 4, 5, 5)))
    b = graph.add_input("b", TensorType("f32", ("N", 3, 5, 5)))
    with pytest.raises(ShapeError) as info:
        graph.add_node("add", [a, b], name="s")
    assert info.value.message == (
        "add needs shapes that broadcast, got (N,4,5,5) and (N,3,5,5): the channels differ "
        "(4 and 3), and neither is 1"
    )


@BATCHES
def test_an_imported_add_that_broadcasts_over_the_channels_matches_both_runtimes(tmp_path, batch):
    shapes = {"a": (4, 5, 5), "b": (1, 5, 5)}
    model = onnx_model([helper.make_node("Add", ["a", "b"], ["s"], name="s")], shapes, 4)
    ours = load(tmp_path, model)
    assert [n.op for n in ours.graph.nodes] == ["add"]
    feeds = random_inputs(shapes, batch)
    assert_agrees_with_both_runtimes(run_ours(ours, feeds), model, feeds)


def test_an_imported_add_that_cannot_broadcast_is_refused_naming_the_node(tmp_path):
    shapes = {"a": (4, 5, 5), "b": (3, 5, 5)}
    model = onnx_model([helper.make_node("Add", ["a", "b"], ["s"], name="s")], shapes, 4)
    with pytest.raises(ModelFileError) as info:
        load(tmp_path, model)
    assert str(info.value.where).endswith("model.onnx: node s (Add)")
    assert info.value.message.startswith("add needs shapes that broadcast, got (N,4,5,5)")


@BATCHES
def test_an_imported_add_of_a_per_channel_constant_is_an_affine(tmp_path, batch):
    bias = np.arange(4, dtype=np.float32).reshape(4, 1, 1)
    model = onnx_model(
        [helper.make_node("Add", ["a", "bias"], ["s"], name="s")],
        {"a": (4, 5, 5)},
        4,
        {"bias": bias},
    )
    ours = load(tmp_path, model)
    assert [n.op for n in ours.graph.nodes] == ["affine"]
    feeds = random_inputs({"a": (4, 5, 5)}, batch)
    assert_agrees_with_both_runtimes(run_ours(ours, feeds), model, feeds)


def test_an_imported_add_of_a_constant_that_is_not_per_channel_is_refused(tmp_path):
    model = onnx_model(
        [helper.make_node("Add", ["a", "bias"], ["s"], name="s")],
        {"a": (4, 5, 5)},
        4,
        {"bias": np.ones((5, 5), dtype=np.float32)},
    )
    with pytest.raises(ModelFileError) as info:
        load(tmp_path, model)
    assert str(info.value.where).endswith("model.onnx: node s (Add)")
    assert info.value.message == (
        "Add by a constant of shape (5, 5) is not one value per channel of f32[N,4,5,5]"
    )


@BATCHES
def test_an_imported_sum_of_three_values_is_one_add(tmp_path, batch):
    shapes = {"a": (2, 3, 3), "b": (2, 3, 3), "c": (2, 3, 3)}
    model = onnx_model([helper.make_node("Sum", ["a", "b", "c"], ["s"], name="s")], shapes, 4)
    ours = load(tmp_path, model)
    assert [(n.op, len(n.inputs)) for n in ours.graph.nodes] == [("add", 3)]
    feeds = random_inputs(shapes, batch)
    assert_agrees_with_both_runtimes(run_ours(ours, feeds), model, feeds)


@pytest.mark.parametrize(
    ("op_type", "attrs"), [("Sum", {}), ("Concat", {"axis": 1})], ids=["sum", "concat"]
)
def test_an_imported_merge_of_one_value_is_that_value(tmp_path, op_type, attrs):
    nodes = [
        helper.make_node(op_type, ["x"], ["m"], **attrs),
        helper.make_node("Relu", ["m"], ["y"], name="y"),
    ]
    model = load(tmp_path, onnx_model(nodes, {"x": (2, 3, 3)}, 4))
    assert [(n.op, [v.name for v in n.inputs]) for n in model.graph.nodes] == [("relu", ["x"])]


# ---- concat ---------------------------------------------------------------------------------


@BATCHES
@pytest.mark.parametrize("spatial", [(5, 6), (7,)], ids=["2d", "1d"])
def test_an_imported_concat_of_two_values_matches_both_runtimes(tmp_path, spatial, batch):
    shapes = {"a": (2, *spatial), "b": (3, *spatial)}
    model = onnx_model(
        [helper.make_node("Concat", ["a", "b"], ["j"], name="j", axis=1)], shapes, 2 + len(spatial)
    )
    ours = load(tmp_path, model)
    assert [(n.op, n.output.shape) for n in ours.graph.nodes] == [("concat", ("N", 5, *spatial))]
    feeds = random_inputs(shapes, batch)
    assert_agrees_with_both_runtimes(run_ours(ours, feeds), model, feeds)


@BATCHES
@pytest.mark.parametrize("spatial", [(4, 5), (6,)], ids=["2d", "1d"])
def test_a_concat_of_three_values_with_different_channels_matches_both_runtimes(spatial, batch):
    shapes = {"a": (2, *spatial), "b": (3, *spatial), "c": (1, *spatial)}
    model = ir_merge("concat", shapes)
    assert model.graph.outputs[0].shape == ("N", 6, *spatial)
    feeds = random_inputs(shapes, batch)
    ours = run_ours(model, feeds)
    assert_close(ours, np.concatenate([feeds["a"], feeds["b"], feeds["c"]], axis=1))
    assert_agrees_with_both_runtimes(ours, model.to_onnx(), feeds)


def test_a_concat_exports_as_one_onnx_concat_along_the_channels():
    model = ir_merge("concat", {"a": (2, 4, 4), "b": (3, 4, 4), "c": (1, 4, 4)}).to_onnx()
    onnx.checker.check_model(model, full_check=True)
    (node,) = model.graph.node
    assert (node.op_type, node.name, list(node.input)) == ("Concat", "m", ["a", "b", "c"])
    assert helper.get_attribute_value(node.attribute[0]) == 1


def test_an_imported_concat_along_the_negative_channel_axis_is_a_concat(tmp_path):
    shapes = {"a": (2, 4, 4), "b": (3, 4, 4)}
    model = onnx_model([helper.make_node("Concat", ["a", "b"], ["j"], axis=-3)], shapes, 4)
    assert labels(load(tmp_path, model)) == ["concat"]


def test_an_imported_concat_along_another_axis_is_refused_naming_the_node(tmp_path):
    shapes = {"a": (2, 4, 4), "b": (2, 3, 4)}
    model = onnx_model([helper.make_node("Concat", ["a", "b"], ["j"], name="j", axis=2)], shapes, 4)
    with pytest.raises(ModelFileError) as info:
        load(tmp_path, model)
    assert str(info.value.where).endswith("model.onnx: node j (Concat)")
    assert info.value.message == (
        "Concat along axis 2 of a rank-4 tensor is not supported: cnnc joins channels only (axis 1)"
    )


def test_a_concat_of_maps_of_different_sizes_is_a_shape_error_showing_both():
    graph = Graph("bad")
    a = graph.add_input("a", TensorType("f32", ("N", 2, 4, 4)))
    b = graph.add_input("b", TensorType("f32", ("N", 3, 4, 5)))
    with pytest.raises(ShapeError) as info:
        graph.add_node("concat", [a, b], name="j")
    assert info.value.message == (
        "concat joins channels and needs equal sizes otherwise, got (N,2,4,4) and (N,3,4,5)"
    )


# ---- leaky_relu and clip ----------------------------------------------------------------------


@BATCHES
def test_an_imported_leaky_relu_without_alpha_uses_the_default_slope(tmp_path, batch):
    shapes = {"x": (3, 4, 4)}
    model = onnx_model([helper.make_node("LeakyRelu", ["x"], ["y"])], shapes, 4)
    ours = load(tmp_path, model)
    assert ours.graph.nodes[0].attrs == {"alpha": 0.01}
    feeds = random_inputs(shapes, batch)
    x = feeds["x"]
    assert_close(run_ours(ours, feeds), np.where(x < 0, np.float32(0.01) * x, x))
    assert_agrees_with_both_runtimes(run_ours(ours, feeds), model, feeds)


ONE_BOUND_CLIPS = [
    pytest.param(["x", "lo"], {"lo": np.float32(-0.3)}, (-0.3, math.inf), id="min-only"),
    pytest.param(["x", "", "hi"], {"hi": np.float32(0.4)}, (-math.inf, 0.4), id="max-only"),
    pytest.param(["x"], {}, (-math.inf, math.inf), id="no-bounds"),
]


@BATCHES
@pytest.mark.parametrize(("inputs", "bounds", "expected"), ONE_BOUND_CLIPS)
def test_an_imported_clip_without_a_bound_is_unbounded_on_that_side(
    tmp_path, inputs, bounds, expected, batch
):
    shapes = {"x": (3, 4, 4)}
    initializers = {n: np.array(v) for n, v in bounds.items()}
    model = onnx_model([helper.make_node("Clip", inputs, ["y"])], shapes, 4, initializers)
    ours = load(tmp_path, model)
    (node,) = ours.graph.nodes
    assert (node.attrs["min"], node.attrs["max"]) == pytest.approx(expected)
    feeds = random_inputs(shapes, batch)
    assert_close(run_ours(ours, feeds), np.clip(feeds["x"], *expected).astype(np.float32))
    assert_agrees_with_both_runtimes(run_ours(ours, feeds), model, feeds)
    assert_agrees_with_both_runtimes(run_ours(ours, feeds), ours.to_onnx(), feeds)


def test_an_exported_clip_gives_only_its_finite_bounds_as_initializers():
    graph = Graph("clips")
    x = graph.add_input("x", TensorType("f32", ("N", 3, 4, 4)))
    low = graph.add_node("clip", [x], {"min": -1.0, "max": math.inf}, name="low").output
    graph.outputs = [graph.add_node("clip", [low], {"min": -math.inf, "max": 2.0}, name="c").output]
    model = cnnc.Model(graph).to_onnx()
    onnx.checker.check_model(model, full_check=True)
    assert [list(n.input) for n in model.graph.node] == [["x", "low.min"], ["low", "", "c.max"]]
    assert {i.name: numpy_helper.to_array(i).item() for i in model.graph.initializer} == {
        "low.min": -1.0,
        "c.max": 2.0,
    }


@BATCHES
def test_clip_bounds_given_by_constant_nodes_are_imported(tmp_path, batch):
    shapes = {"x": (3, 4, 4)}
    nodes = [
        helper.make_node("Constant", [], ["lo"], value_float=-0.5),
        helper.make_node("Constant", [], ["hi"], value=numpy_helper.from_array(np.float32(0.5))),
        helper.make_node("Clip", ["x", "lo", "hi"], ["y"]),
    ]
    model = onnx_model(nodes, shapes, 4)
    ours = load(tmp_path, model)
    assert [(n.op, n.attrs) for n in ours.graph.nodes] == [("clip", {"min": -0.5, "max": 0.5})]
    feeds = random_inputs(shapes, batch)
    assert_agrees_with_both_runtimes(run_ours(ours, feeds), model, feeds)


@BATCHES
def test_an_opset_10_clip_takes_its_bounds_from_attributes(tmp_path, batch):
    shapes = {"x": (3, 4, 4)}
    clip = helper.make_node("Clip", ["x"], ["y"], min=-0.25, max=0.75)
    model = onnx_model([clip], shapes, 4, opset=10)
    ours = load(tmp_path, model)
    assert ours.graph.nodes[0].attrs == {"min": -0.25, "max": 0.75}
    feeds = random_inputs(shapes, batch)
    assert_agrees_with_both_runtimes(run_ours(ours, feeds), model, feeds)


@BATCHES
def test_an_imported_clip_whose_min_exceeds_its_max_gives_max_everywhere(tmp_path, batch):
    shapes = {"x": (3, 4, 4)}
    bounds = {"lo": np.array(1.0, np.float32), "hi": np.array(-1.0, np.float32)}
    model = onnx_model([helper.make_node("Clip", ["x", "lo", "hi"], ["y"])], shapes, 4, bounds)
    feeds = random_inputs(shapes, batch)
    ours = run_ours(load(tmp_path, model), feeds)
    assert_close(ours, np.full_like(feeds["x"], -1.0))
    assert_agrees_with_both_runtimes(ours, model, feeds)


def test_a_clip_whose_min_exceeds_its_max_is_an_error_at_the_max():
    with pytest.raises(LayerError) as info:
        cnnc.compile("network n(x: 3x4x4) {\n    clip(1, 0.5)\n}")
    err = info.value
    assert (err.location.line, err.location.col) == (2, 13)
    assert err.message == "clip min 1 is larger than its max 0.5"


def test_relu6_is_a_clip_from_0_to_6_that_the_dump_calls_relu6():
    model = cnnc.compile("network n(x: 3x4x4) { r: relu6 }", opt_level=0)
    (node,) = model.graph.nodes
    assert (node.op, node.attrs, labels(model)) == ("clip", {"min": 0.0, "max": 6.0}, ["relu6"])
    assert "%r : f32[N,3,4,4] = relu6(%x)  " in model.dump()


def test_the_dump_shows_each_activation_with_its_attributes():
    model = cnnc.compile(
        "network n(x: 3x4x4) { a: leaky_relu(0.2) -> b: clip(-1, 1) -> c: lrn(3) }", opt_level=0
    )
    rows = [" ".join(line.split()) for line in model.dump().splitlines()]
    assert "%a : f32[N,3,4,4] = leaky_relu(%x) alpha=0.2 <string>:1" in rows
    assert "%b : f32[N,3,4,4] = clip(%a) min=-1 max=1 <string>:1" in rows
    assert "%c : f32[N,3,4,4] = lrn(%b) size=3 alpha=0.0001 beta=0.75 k=1 <string>:1" in rows


# ---- lrn ------------------------------------------------------------------------------------


def onnx_lrn(x: np.ndarray, size: int, alpha: float, beta: float, bias: float) -> np.ndarray:
    """The ONNX LRN formula, transcribed channel by channel."""
    channels = x.shape[1]
    y = np.empty_like(x)
    for c in range(channels):
        low = max(0, c - math.floor((size - 1) / 2))
        high = min(channels - 1, c + math.ceil((size - 1) / 2))
        square_sum = (x[:, low : high + 1] ** 2).sum(axis=1)
        y[:, c] = x[:, c] / (bias + alpha / size * square_sum) ** beta
    return y


def lrn_model(size: int, shape=(4, 3, 3)) -> onnx.ModelProto:
    lrn = helper.make_node("LRN", ["x"], ["y"], size=size, alpha=0.5, beta=0.75, bias=2.0)
    return onnx_model([lrn], {"x": shape}, 4)


EVEN_SIZES = pytest.mark.parametrize("size", [2, 4, 8], ids=["size2", "size4", "size8"])


@BATCHES
@EVEN_SIZES
def test_an_imported_even_size_lrn_has_the_extra_channel_after_as_onnx_says(tmp_path, size, batch):
    feeds = random_inputs({"x": (4, 3, 3)}, batch)
    ours = run_ours(load(tmp_path, lrn_model(size)), feeds)
    assert_close(ours, onnx_lrn(feeds["x"], size, 0.5, 0.75, 2.0))


@EVEN_SIZES
def test_an_imported_even_size_lrn_matches_onnx_reference_at_a_batch_of_the_channel_count(
    tmp_path, size
):
    # onnx.reference is right for LRN only when the batch equals the channels (test_kernels).
    feeds = random_inputs({"x": (4, 3, 3)}, 4)
    model = lrn_model(size)
    assert_close(run_ours(load(tmp_path, model), feeds), run_reference(model, feeds))


def test_onnxruntime_refuses_an_lrn_of_even_size():
    with pytest.raises(Fail, match="size_ % 2 == 1"):
        ort_session(lrn_model(2))


@BATCHES
def test_an_lrn_window_wider_than_twice_the_channels_sums_every_channel(batch):
    model = cnnc.compile("network n(x: 3x2x2) { lrn(9, alpha=0.9, beta=2, k=0.5) }")
    x = model.random_input(batch, seed=batch)
    every = (x**2).sum(axis=1, keepdims=True)
    assert_close(model.run(x), x / (0.5 + 0.1 * every) ** 2)


def test_an_lrn_of_even_size_is_an_error_at_the_size():
    with pytest.raises(LayerError) as info:
        cnnc.compile("network n(x: 3x4x4) {\n    lrn(4)\n}")
    err = info.value
    assert (err.location.line, err.location.col) == (2, 9)
    assert err.message.startswith("lrn size must be odd, got 4")
    assert err.hint == "use 3 or 5"


def test_an_lrn_after_an_fc_is_an_error():
    with pytest.raises(LayerError, match="lrn needs a feature map N×C×L or N×C×H×W"):
        cnnc.compile("network n(x: 3x4x4) { fc(8) -> lrn(3) }")


def test_a_1d_lrn_exports_as_a_2d_lrn_between_unsqueeze_and_squeeze():
    model = cnnc.compile("network n(x: 3x7) { l: lrn(3) }").to_onnx()
    onnx.checker.check_model(model, full_check=True)
    assert [(n.op_type, list(n.input), list(n.output)) for n in model.graph.node] == [
        ("Unsqueeze", ["x", "l.axes"], ["l.2d"]),
        ("LRN", ["l.2d"], ["l.lrn"]),
        ("Squeeze", ["l.lrn", "l.axes"], ["l"]),
    ]


# ---- every new op survives export and import --------------------------------------------------

ROUND_TRIP = """network n(x: 6x6x6) {
    a: leaky_relu(0.2) -> b: relu6 -> c: clip(-0.5, 2) -> d: lrn(5, alpha=0.5, beta=0.5, k=2)
    e: conv(4, 3, pad=1) -> leaky_relu(0.3)
    f: conv(4, 3) -> relu6
    g: conv(4, 1) -> clip(-1, 0.5) -> global_maxpool
}"""


@pytest.mark.parametrize("opt_level", [0, 2])
def test_every_new_op_imports_back_with_its_attributes_and_outputs(tmp_path, opt_level):
    model = cnnc.compile(ROUND_TRIP, opt_level=opt_level)
    model.to_onnx(tmp_path / "m.onnx")
    back = cnnc.load(tmp_path / "m.onnx", opt_level=0)
    assert described(back) == described(model)
    x = model.random_input(2)
    assert_close(back.run(x), model.run(x))


def test_a_global_maxpool_is_the_maximum_of_each_channel():
    model = cnnc.compile("network n(x: 3x4x5) { global_maxpool }")
    x = model.random_input(2)
    np.testing.assert_array_equal(model.run(x), x.max(axis=(2, 3), keepdims=True))


# ---- fusion ---------------------------------------------------------------------------------

FUSED = [
    pytest.param("leaky_relu(0.2)", "conv2d+leaky_relu", "ConvLeakyRelu", id="leaky_relu"),
    pytest.param("relu6", "conv2d+relu6", "ConvClip", id="relu6"),
    pytest.param("clip(-0.5, 0.5)", "conv2d+clip", "ConvClip", id="clip"),
]


def fused_program(activation: str) -> str:
    return f"network n(x: 3x7x7) {{ c: conv(4, 3, pad=1) -> {activation} }}"


@pytest.mark.parametrize(("activation", "label", "function"), FUSED)
def test_a_conv_and_its_activation_become_one_node_at_O2(activation, label, function):
    model = cnnc.compile(fused_program(activation))
    assert labels(model) == [label]


def test_a_fused_conv_dump_shows_the_activation_attributes():
    model = cnnc.compile(fused_program("leaky_relu(0.2)"))
    (row,) = [line for line in model.dump().splitlines() if "conv2d+" in line]
    assert " ".join(row.split()).endswith("k=3x3 s=1 p=1,1,1,1 alpha=0.2 <string>:1")


@pytest.mark.parametrize(("activation", "label", "function"), FUSED)
def test_a_fused_conv_exports_as_a_checked_model_local_function(activation, label, function):
    model = cnnc.compile(fused_program(activation)).to_onnx()
    onnx.checker.check_model(model, full_check=True)
    assert [(f.domain, f.name) for f in model.functions] == [("cnnc", function)]
    (call,) = model.graph.node
    assert (call.domain, call.op_type, call.name) == ("cnnc", function, "c")


def test_conv_leaky_relu_reads_alpha_from_the_call_by_reference():
    model = cnnc.compile(fused_program("leaky_relu(0.2)")).to_onnx()
    (function,) = model.functions
    assert [n.op_type for n in function.node] == ["Conv", "LeakyRelu"]
    (alpha,) = function.node[1].attribute
    assert (alpha.name, alpha.ref_attr_name) == ("alpha", "alpha")
    (call,) = model.graph.node
    assert {a.name: a.f for a in call.attribute}["alpha"] == pytest.approx(0.2)


def test_conv_clip_takes_its_bounds_as_inputs_so_that_inlined_it_is_conv_and_clip():
    model = cnnc.compile(fused_program("relu6")).to_onnx()
    (function,) = model.functions
    assert list(function.input) == ["X", "W", "B", "min", "max"]
    assert [(n.op_type, list(n.input)) for n in function.node] == [
        ("Conv", ["X", "W", "B"]),
        ("Clip", ["T", "min", "max"]),
    ]
    (call,) = model.graph.node
    assert not {a.name for a in call.attribute} & {"min", "max"}
    bounds = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert [float(bounds[name]) for name in call.input[3:]] == [0.0, 6.0]
    inlined = cnnc.compile(fused_program("relu6")).to_onnx(inline_functions=True)
    assert [n.op_type for n in inlined.graph.node] == ["Conv", "Clip"]


@BATCHES
@pytest.mark.parametrize("inline", [False, True], ids=["function", "inlined"])
@pytest.mark.parametrize(("activation", "label", "function"), FUSED)
def test_a_fused_conv_agrees_with_the_unfused_one_in_both_runtimes(
    activation, label, function, inline, batch
):
    fused = cnnc.compile(fused_program(activation))
    plain = cnnc.compile(fused_program(activation), opt_level=0)
    x = fused.random_input(batch, seed=batch) * np.float32(4)
    expected = plain.run(x)
    proto = fused.to_onnx(inline_functions=inline)
    feeds = {"x": x}
    assert_close(fused.run(x), expected)
    assert_close(run_onnxruntime(proto, feeds), expected)
    # onnx.reference cannot give a LeakyRelu in a function its alpha (test_kernels pins it).
    if activation.startswith("leaky_relu") and not inline:
        proto = onnx.inliner.inline_local_functions(proto)
    assert_close(run_reference(proto, feeds), expected)


@pytest.mark.parametrize(("activation", "label", "function"), FUSED)
def test_a_fused_conv_imports_back_with_its_activation_and_attributes(
    tmp_path, activation, label, function
):
    model = cnnc.compile(fused_program(activation))
    model.to_onnx(tmp_path / "m.onnx")
    back = cnnc.load(tmp_path / "m.onnx", opt_level=0)
    assert labels(back) == [label]
    (ours,), (theirs,) = model.graph.nodes, back.graph.nodes
    assert theirs.attrs["activation_attrs"] == pytest.approx(ours.attrs["activation_attrs"])
    x = model.random_input(2) * np.float32(4)
    np.testing.assert_array_equal(back.run(x), model.run(x))


@BATCHES
def test_a_fused_clip_with_one_bound_leaves_the_other_out_of_its_call(tmp_path, batch):
    shapes = {"x": (3, 6, 6)}
    weight = np.random.default_rng(0).standard_normal((4, 3, 3, 3), dtype=np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="c"),
        helper.make_node("Clip", ["c", "", "hi"], ["y"], name="y"),
    ]
    source = onnx_model(nodes, shapes, 4, {"w": weight, "hi": np.array(0.5, np.float32)})
    fused = load(tmp_path, source, opt_level=2)
    assert labels(fused) == ["conv2d+clip"]
    proto = fused.to_onnx()
    onnx.checker.check_model(proto, full_check=True)
    (call,) = proto.graph.node
    # No lower bound: the call leaves the function's min input out.
    assert call.input[3] == ""
    assert (
        float(
            numpy_helper.to_array(
                next(t for t in proto.graph.initializer if t.name == call.input[4])
            )
        )
        == 0.5
    )
    feeds = random_inputs(shapes, batch)
    expected = run_onnxruntime(source, feeds)
    assert_close(fused.run(feeds["x"]), expected)
    assert_agrees_with_both_runtimes(expected, proto, feeds)


# ---- fc-to-conv -----------------------------------------------------------------------------


def test_flatten_sinks_past_leaky_relu_and_clip_so_every_fc_becomes_a_conv():
    source = "network n(x: 3x4x4) { fc(6) -> leaky_relu(0.1) -> fc(5) -> relu6 -> fc(2) }"
    model = cnnc.compile(source, passes=["fc-to-conv"])
    assert labels(model) == ["conv2d", "leaky_relu", "conv2d", "relu6", "conv2d", "flatten"]
    x = model.random_input(3) * np.float32(4)
    expected = cnnc.compile(source, opt_level=0).run(x)
    assert_close(model.run(x), expected)
    assert_close(model.run(x, backend="onnxruntime"), expected)


# ---- the language ---------------------------------------------------------------------------


def test_the_new_layers_have_these_signatures():
    keywords = ["leaky_relu", "clip", "relu6", "lrn", "global_maxpool"]
    assert [get_layer(k).signature for k in keywords] == [
        "leaky_relu(alpha=0.01)",
        "clip(min, max)",
        "relu6",
        "lrn(size, alpha=0.0001, beta=0.75, k=1.0)",
        "global_maxpool",
    ]
