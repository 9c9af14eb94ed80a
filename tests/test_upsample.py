"""upsample: PyTorch's interpolation (values computed with torch.nn.functional.interpolate,
written here), onnxruntime and onnx.reference on the exported model for many sizes, the
ONNX forms it exports and imports, and the forms it refuses."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import assert_agree, ort_session
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import cnnc
from cnnc.backends.interpreter import Interpreter
from cnnc.backends.onnx_export import max_opset
from cnnc.errors import CnncError, LayerError, ModelFileError, UsageError
from cnnc.frontend.onnx_import import load_onnx


def net(shape: str, layer: str) -> str:
    return f"network n(x: {shape}) {{ {layer} }}"


def run(shape: str, layer: str, x: np.ndarray) -> np.ndarray:
    return cnnc.compile(net(shape, layer), opt_level=0).run(x)


def ramp(*shape: int) -> np.ndarray:
    return np.arange(np.prod(shape), dtype=np.float32).reshape(1, 1, *shape)


def upsample_node(model: cnnc.Model):
    (node,) = [n for n in model.graph.nodes if n.op == "upsample"]
    return node


# ---- PyTorch's values ------------------------------------------------------------------------


def test_nearest_by_a_scale_samples_at_i_over_the_scale_not_at_i_times_in_over_out():
    # F.interpolate(arange(5), scale_factor=1.1): the ratio is 1/1.1, although the output
    # has the input's length.
    np.testing.assert_array_equal(run("1x5", "upsample(scale=1.1)", ramp(5)), [[[0, 0, 1, 2, 3]]])


def test_2d_nearest_copies_an_axis_that_keeps_its_size_and_halves_one_that_doubles():
    # PyTorch's 2-D kernel (not its 1-D one) has both shortcuts.
    same = run("1x1x5", "upsample(scale=(1, 1.1))", ramp(1, 5))
    np.testing.assert_array_equal(same.ravel(), [0, 1, 2, 3, 4])
    twice = run("1x1x5", "upsample(scale=(1, 2.1))", ramp(1, 5))
    np.testing.assert_array_equal(twice.ravel(), [0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    one_d = run("1x5", "upsample(scale=2.1)", ramp(5))
    np.testing.assert_array_equal(one_d.ravel(), [0, 0, 0, 1, 1, 2, 2, 3, 3, 4])


def test_1d_and_2d_nearest_exact_round_as_their_pytorch_kernels_do():
    # Output 20 of 41 from 2: (20.5 · 2/41) is 1 exactly; the 1-D kernel rounds
    # (i + 0.5) · ratio - 0.5 to float32 first and samples 1, the 2-D kernel samples 0.
    one_d = run("1x2", "upsample(size=41, mode=nearest_exact)", ramp(2))
    two_d = run("1x1x2", "upsample(size=(1, 41), mode=nearest_exact)", ramp(1, 2))
    assert one_d.ravel()[20] == 1 and two_d.ravel()[20] == 0


def test_linear_by_a_scale_and_to_the_same_size_differ_as_in_pytorch():
    x = ramp(5) ** 2
    by_scale = run("1x5", "upsample(scale=1.9, mode=linear)", x).ravel()
    to_size = run("1x5", "upsample(size=9, mode=linear)", x).ravel()
    torch_scale = [0.0, 0.28947371, 0.81578952, 2.02631617, 3.60526323, 5.97368526, 8.60526371]
    torch_size = [0.0, 0.33333337, 0.88888896, 2.33333349, 4.0, 6.77777910, 9.77777863]
    np.testing.assert_allclose(by_scale[:7], torch_scale, rtol=1e-6)
    np.testing.assert_allclose(to_size[:7], torch_size, rtol=1e-6)
    np.testing.assert_allclose(by_scale[7:], [12.13158035, 15.81579018], rtol=1e-6)


def test_an_output_of_one_takes_the_middle_or_with_align_corners_the_first_pixel():
    x = np.array([[[1, 2, 4, 8]]], np.float32)
    assert run("1x4", "upsample(size=1, mode=linear)", x).item() == 3.0  # source 1.5
    assert run("1x4", "upsample(size=1, mode=linear, align_corners=true)", x).item() == 1.0
    assert run("1x4", "upsample(size=1, mode=nearest_exact)", x).item() == 4.0  # pixel 2
    assert run("1x4", "upsample(size=1)", x).item() == 1.0


def test_linear_clamps_negative_source_coordinates_to_the_first_pixel():
    x = np.array([[[3, 7]]], np.float32)
    y = run("1x2", "upsample(scale=2, mode=linear)", x).ravel()
    np.testing.assert_array_equal(y, [3, 4, 6, 7])


def test_the_output_size_is_the_floor_of_size_times_scale():
    model = cnnc.compile(net("1x10x7", "upsample(scale=(0.7, 1.5))"), opt_level=0)
    assert model.graph.outputs[0].type.shape[2:] == (7, 10)


# ---- against onnxruntime and onnx.reference --------------------------------------------------

CASES = [
    ("2x5", "upsample(scale=2)"),
    ("2x5", "upsample(scale=1.1)"),
    ("2x5", "upsample(scale=2.1)"),
    ("2x7", "upsample(scale=0.45, mode=nearest_exact)"),
    ("2x2", "upsample(size=41, mode=nearest_exact)"),
    ("2x14", "upsample(size=2)"),
    ("2x9", "upsample(scale=1.7, mode=linear)"),
    ("2x6", "upsample(scale=2.5, mode=linear)"),
    ("2x9", "upsample(size=4, mode=linear, align_corners=true)"),
    ("2x9", "upsample(size=1, mode=linear)"),
    ("2x9", "upsample(size=1, mode=linear, align_corners=true)"),
    ("2x9", "upsample(scale=0.6, mode=linear, align_corners=true)"),
    ("2x5x7", "upsample(scale=2)"),
    ("2x5x7", "upsample(scale=(2.1, 1.1))"),
    ("2x5x7", "upsample(scale=1.1)"),
    ("2x6x9", "upsample(scale=(0.3, 0.7))"),
    ("2x20x14", "upsample(size=(12, 2))"),
    ("2x14x21", "upsample(size=(2, 3))"),
    ("2x8x8", "upsample(scale=1.5, mode=nearest_exact)"),
    ("2x5x7", "upsample(size=(9, 4), mode=nearest_exact)"),
    ("2x5x7", "upsample(scale=(2, 1.5), mode=bilinear)"),
    ("2x5x7", "upsample(scale=(0.5, 0.3), mode=bilinear)"),
    ("2x5x7", "upsample(scale=(1.1, 2), mode=bilinear)"),
    ("2x5x7", "upsample(size=(11, 3), mode=bilinear, align_corners=true)"),
    ("2x5x7", "upsample(scale=(0.6, 1.7), mode=bilinear, align_corners=true)"),
    ("2x5x7", "upsample(size=1, mode=bilinear)"),
    ("2x5x7", "upsample(size=(1, 4), mode=bilinear, align_corners=true)"),
    ("2x1x1", "upsample(scale=3, mode=bilinear)"),
    ("2x3x4", "upsample(size=(3, 4), mode=bilinear)"),
]
OPSETS = sorted({13, 17, max_opset()})


def _agree(ours: np.ndarray, theirs: np.ndarray, layer: str, what: str) -> None:
    if "linear" in layer:
        assert_agree(ours, theirs, what)
    else:  # nearest modes copy pixels: exactly
        np.testing.assert_array_equal(ours, theirs, err_msg=what)


@pytest.mark.parametrize(("shape", "layer"), CASES, ids=[f"{s}-{layer}" for s, layer in CASES])
def test_the_export_computes_what_the_interpreter_does_in_onnxruntime(shape, layer):
    model = cnnc.compile(net(shape, layer), opt_level=0)
    for batch in (1, 3):
        x = model.random_input(batch, seed=batch)
        ours = model.run(x)
        for opset in OPSETS:
            proto = model.to_onnx(opset=opset)
            onnx.checker.check_model(proto, full_check=True)
            theirs = ort_session(proto).run(None, {"x": x})[0]
            _agree(ours, theirs, layer, f"{layer} on {list(x.shape)} at opset {opset}")


# onnx.reference computes Resize in double precision from the float32 scale; these cases
# sample pixels whose coordinates are not within float32 rounding of a whole number.
REFERENCE_CASES = [c for c in CASES if c[1] not in ("upsample(size=2)", "upsample(size=(2, 3))")]


@pytest.mark.parametrize(
    ("shape", "layer"), REFERENCE_CASES, ids=[f"{s}-{layer}" for s, layer in REFERENCE_CASES]
)
def test_the_export_computes_what_the_interpreter_does_in_onnx_reference(shape, layer):
    model = cnnc.compile(net(shape, layer), opt_level=0)
    x = model.random_input(3, seed=5)
    proto = model.to_onnx(opset=max_opset())
    theirs = ReferenceEvaluator(proto).run(None, {"x": x})[0]
    _agree(model.run(x), theirs, layer, layer)


def test_threads_share_a_large_map_by_channels_with_the_same_result():
    model = cnnc.compile(net("64x96x96", "upsample(scale=2, mode=bilinear)"), opt_level=0)
    x = model.random_input(2)
    one = Interpreter(model.graph, threads=1).run(x)[0]
    two = Interpreter(model.graph, threads=2).run(x)[0]
    np.testing.assert_array_equal(one, two)


# ---- the ONNX it writes, and reads back ------------------------------------------------------


def _nodes(proto: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in proto.graph.node]


def test_a_scale_is_a_resize_by_scales_and_a_size_a_resize_to_sizes():
    by_scale = cnnc.compile(net("2x5x7", "upsample(scale=2, mode=bilinear)"), opt_level=0)
    proto = by_scale.to_onnx()
    (resize,) = proto.graph.node
    attrs = {a.name: helper.get_attribute_value(a) for a in resize.attribute}
    assert attrs == {"mode": b"linear", "coordinate_transformation_mode": b"half_pixel"}
    scales = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    np.testing.assert_array_equal(scales[resize.input[2]], [1, 1, 2, 2])
    to_size = cnnc.compile(net("2x5x7", "upsample(size=(9, 4))"), opt_level=0)
    # Before opset 18 the batch and channels come from Shape, as PyTorch writes it.
    assert _nodes(to_size.to_onnx(opset=17)) == ["Shape", "Concat", "Resize"]
    assert _nodes(to_size.to_onnx(opset=13)) == ["Shape", "Slice", "Concat", "Resize"]
    (resize,) = to_size.to_onnx(opset=18).graph.node
    attrs = {a.name: helper.get_attribute_value(a) for a in resize.attribute}
    assert attrs["axes"] == [2, 3] and attrs["nearest_mode"] == b"floor"


def test_a_sampling_onnxruntime_cannot_reproduce_is_a_gather_function():
    # 1-D nearest by 1.1 keeps the length; onnxruntime copies such a tensor.
    model = cnnc.compile(net("2x5", "upsample(scale=1.1)"), opt_level=0)
    proto = model.to_onnx()
    ((call,), (function,)) = proto.graph.node, proto.functions
    assert (call.domain, call.op_type) == ("cnnc", "UpsampleScale1d")
    assert [n.op_type for n in function.node] == ["Gather"]
    inlined = model.to_onnx(inline_functions=True)
    assert _nodes(inlined) == ["Gather"]
    x = model.random_input(2)
    np.testing.assert_array_equal(ort_session(inlined).run(None, {"x": x})[0], model.run(x))


@pytest.mark.parametrize(
    ("shape", "layer"),
    [
        ("2x5x7", "upsample(scale=(2, 1.5), mode=bilinear)"),
        ("2x5x7", "upsample(size=(9, 4), mode=nearest_exact)"),
        ("2x9", "upsample(size=4, mode=linear, align_corners=true)"),
        ("2x5", "upsample(scale=1.1)"),
        ("2x14x21", "upsample(size=(2, 3))"),
        ("2x6x9", "upsample(scale=(0.3, 0.7))"),
    ],
)
def test_an_exported_upsample_imports_back_as_itself(shape, layer):
    model = cnnc.compile(net(shape, layer), opt_level=0)
    for opset in OPSETS:
        back = cnnc.Model(load_onnx(model.to_onnx(opset=opset)))
        assert upsample_node(back).attrs == upsample_node(model).attrs, f"opset {opset}"


def test_a_decompiled_upsample_compiles_to_the_same_network():
    text = net("2x5x7", "upsample(scale=(2, 0.3), mode=bilinear, align_corners=true)")
    model = cnnc.compile(text, opt_level=0)
    program, _ = cnnc.Model(load_onnx(model.to_onnx())).to_program()
    assert "upsample(size=(10, 2), mode=bilinear, align_corners=true)" in program
    back = cnnc.compile(program, opt_level=0)
    x = model.random_input(2)
    np.testing.assert_array_equal(back.run(x), model.run(x))


def test_the_dump_shows_the_mode_and_the_scale_or_size():
    model = cnnc.compile(net("2x5x7", "upsample(scale=(2, 1.5), mode=bilinear)"), opt_level=0)
    assert "upsample2d(%x)  bilinear scale=2x1.5" in model.dump()
    model = cnnc.compile(net("2x5", "upsample(size=9, mode=linear, align_corners=true)"))
    assert "upsample1d(%x)  linear size=9 align_corners" in model.dump()


def test_remove_identity_drops_an_upsample_that_keeps_every_pixel():
    keeps = cnnc.compile(net("2x5x7", "upsample(scale=1.1) -> relu"), opt_level=1)
    assert [n.op for n in keeps.graph.nodes] == ["relu"]
    moves = cnnc.compile(net("2x5", "upsample(scale=1.1) -> relu"), opt_level=1)
    assert [n.op for n in moves.graph.nodes] == ["upsample", "relu"]


# ---- importing Resize and Upsample -----------------------------------------------------------


def resize_model(
    x_shape, scales=None, sizes=None, opset=17, inputs_as_constants=False, **attrs
) -> onnx.ModelProto:
    initializers, names = [], ["x", ""]
    for name, value, dtype in (("scales", scales, np.float32), ("sizes", sizes, np.int64)):
        if value is None:
            names.append("")
        else:
            initializers.append(numpy_helper.from_array(np.array(value, dtype), name))
            names.append(name)
    while names[-1] == "":
        names.pop()
    node = helper.make_node("Resize", names, ["y"], name="resize", **attrs)
    nodes = [node]
    if inputs_as_constants:
        nodes = [helper.make_node("Constant", [], [t.name], value=t) for t in initializers]
        nodes.append(node)
        initializers = []
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *x_shape])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * (len(x_shape) + 1))],
        initializer=initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def imported(model: onnx.ModelProto) -> cnnc.Model:
    return cnnc.Model(load_onnx(model))


def agrees_with_onnxruntime(model: onnx.ModelProto, x_shape) -> cnnc.Model:
    ours = imported(model)
    x = np.random.default_rng(0).standard_normal((2, *x_shape), dtype=np.float32)
    assert_agree(ours.run(x), ort_session(model).run(None, {"x": x})[0])
    return ours


@pytest.mark.parametrize(
    ("kwargs", "mode", "align_corners"),
    [
        ({"mode": "nearest", "coordinate_transformation_mode": "asymmetric",
          "nearest_mode": "floor"}, "nearest", False),
        ({"mode": "nearest", "coordinate_transformation_mode": "half_pixel",
          "nearest_mode": "round_prefer_ceil"}, "nearest_exact", False),
        ({"mode": "linear"}, "bilinear", False),
        ({"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"},
         "bilinear", False),
        ({"mode": "linear", "coordinate_transformation_mode": "align_corners"}, "bilinear", True),
    ],
)  # fmt: skip
def test_resize_imports_as_the_upsample_it_equals(kwargs, mode, align_corners):
    ours = agrees_with_onnxruntime(
        resize_model((3, 4, 6), scales=[1, 1, 2, 1.5], **kwargs), (3, 4, 6)
    )
    node = upsample_node(ours)
    assert (node.attrs["mode"], node.attrs["align_corners"]) == (mode, align_corners)
    assert node.attrs["scales"] == (2, 1.5)


def test_resize_by_float32_scales_reads_back_the_scale_that_was_written():
    ours = imported(resize_model((3, 10), scales=[1, 1, 0.7], mode="linear"))
    assert upsample_node(ours).attrs["scales"] == (0.7,)
    assert ours.graph.outputs[0].type.shape[2:] == (7,)  # floor(10 · 0.7), as PyTorch


def test_resize_of_a_1d_map_to_sizes_is_a_linear_upsample():
    model = resize_model((3, 7), sizes=[12], axes=[2], opset=18, mode="linear")
    ours = agrees_with_onnxruntime(model, (3, 7))
    node = upsample_node(ours)
    assert (node.attrs["mode"], node.attrs["size"]) == ("linear", (12,))


def test_resize_with_scales_and_sizes_given_as_constant_nodes_imports():
    model = resize_model((3, 4, 4), scales=[1, 1, 2, 2], inputs_as_constants=True)
    assert upsample_node(agrees_with_onnxruntime(model, (3, 4, 4))).attrs["scales"] == (2, 2)


def test_resize_with_axes_of_the_spatial_axes_imports():
    model = resize_model((3, 4, 6), sizes=[5], axes=[-1], opset=18, mode="linear")
    assert upsample_node(agrees_with_onnxruntime(model, (3, 4, 6))).attrs["size"] == (4, 5)


def test_onnx_default_nearest_imports_where_it_samples_what_pytorch_does():
    # half_pixel + round_prefer_floor (ONNX's defaults) by whole scales repeats each pixel.
    model = resize_model((3, 4, 5), scales=[1, 1, 2, 3], mode="nearest")
    assert upsample_node(agrees_with_onnxruntime(model, (3, 4, 5))).attrs["mode"] == "nearest"


def test_pytorch_style_sizes_from_the_input_shape_import(tmp_path):
    # What torch.onnx.export writes for interpolate(size=...) with a dynamic batch.
    for opset in (13, 17):
        model = cnnc.compile(net("3x5x7", "upsample(size=(9, 4))"), opt_level=0)
        back = imported(model.to_onnx(opset=opset))
        assert upsample_node(back).attrs["size"] == (9, 4)


@pytest.mark.parametrize("op_type", ["Upsample", "Resize"])
def test_the_old_upsample_and_resize_10_import_nearest_by_whole_scales(op_type):
    opset = 9 if op_type == "Upsample" else 10
    scales = numpy_helper.from_array(np.array([1, 1, 2, 3], np.float32), "scales")
    node = helper.make_node(op_type, ["x", "scales"], ["y"], mode="nearest")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 4)],
        initializer=[scales],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    ours = imported(model)
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 5), dtype=np.float32)
    np.testing.assert_array_equal(ours.run(x), x.repeat(2, axis=2).repeat(3, axis=3))


REFUSED = [
    ({"mode": "cubic"}, [1, 1, 2, 2], None, "Resize mode cubic is not supported"),
    ({"mode": "linear", "antialias": 1}, [1, 1, 0.5, 0.5], None, "Resize with antialias=1"),
    (
        {"mode": "linear", "coordinate_transformation_mode": "tf_crop_and_resize"},
        [1, 1, 2, 2],
        None,
        "Resize with tf_crop_and_resize",
    ),
    (
        {"mode": "nearest", "keep_aspect_ratio_policy": "not_larger"},
        None,
        [1, 3, 8, 8],
        "Resize with keep_aspect_ratio_policy=not_larger",
    ),
    ({"mode": "nearest"}, [1, 2, 2, 2], None, "Resize scales [1.0, 2.0, 2.0, 2.0] resize"),
    ({"mode": "nearest"}, None, [1, 6, 8, 8], "Resize sizes [1, 6, 8, 8] change the batch"),
    (
        {"mode": "linear", "coordinate_transformation_mode": "asymmetric"},
        [1, 1, 2, 2],
        None,
        "Resize linear with coordinate_transformation_mode=asymmetric",
    ),
    (
        {"mode": "linear", "coordinate_transformation_mode": "half_pixel_symmetric"},
        [1, 1, 2, 2],
        None,
        "Resize linear with coordinate_transformation_mode=half_pixel_symmetric",
    ),
    (
        {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"},
        None,
        ["N", 3, 1, 3],
        "Resize linear with pytorch_half_pixel and an output size of 1",
    ),
    (
        {"mode": "linear", "coordinate_transformation_mode": "align_corners"},
        [1, 1, 0.6, 0.6],
        None,
        "Resize linear with align_corners by scales whose products",
    ),
    (
        {"mode": "nearest", "coordinate_transformation_mode": "asymmetric",
         "nearest_mode": "ceil"},
        [1, 1, 1.5, 1.5],
        None,
        "Resize nearest with coordinate_transformation_mode=asymmetric and nearest_mode=ceil",
    ),
]  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "scales", "sizes", "message"), REFUSED, ids=[r[3][:50] for r in REFUSED]
)
def test_a_resize_pytorch_does_not_compute_is_refused_with_one_clear_error(
    kwargs, scales, sizes, message
):
    opset = 18 if {"antialias", "keep_aspect_ratio_policy"} & set(kwargs) else 17
    if sizes and sizes[0] == "N":  # sizes of a fixed batch of 1
        model = resize_model((3, 4, 6), sizes=[1, *sizes[1:]], opset=opset, **kwargs)
        model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    else:
        model = resize_model((3, 4, 6), scales=scales, sizes=sizes, opset=opset, **kwargs)
    with pytest.raises(ModelFileError) as info:
        load_onnx(model)
    assert info.value.message.startswith(message), info.value.message
    assert "node resize (Resize)" in info.value.render()


def test_resize_axes_that_touch_the_channels_are_refused():
    model = resize_model((3, 4, 6), scales=[2, 2], axes=[1, 2], opset=18, mode="nearest")
    with pytest.raises(ModelFileError, match="resize the batch or channel axis"):
        load_onnx(model)


def test_resize_by_computed_scales_is_refused():
    model = resize_model((3, 4, 6), scales=[1, 1, 2, 2])
    model.graph.initializer.pop()
    model.graph.input.append(helper.make_tensor_value_info("scales", TensorProto.FLOAT, [4]))
    with pytest.raises(CnncError, match="input 'scales' must be a constant"):
        load_onnx(model)


@pytest.mark.parametrize(
    ("mode", "scales", "message"),
    [
        ("linear", [1, 1, 2, 2], "Upsample mode linear is not supported"),
        ("nearest", [1, 1, 1.5, 2], "Upsample nearest by [1.5, 2.0] is not supported"),
    ],
)
def test_the_old_upsample_is_refused_where_readings_of_it_differ(mode, scales, message):
    node = helper.make_node("Upsample", ["x", "scales"], ["y"], mode=mode)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 4)],
        initializer=[numpy_helper.from_array(np.array(scales, np.float32), "scales")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    with pytest.raises(ModelFileError) as info:
        load_onnx(model)
    assert info.value.message.startswith(message), info.value.message


def test_an_upsample_function_whose_indices_were_changed_is_refused():
    proto = cnnc.compile(net("2x5", "upsample(scale=1.1)"), opt_level=0).to_onnx()
    indices = proto.graph.initializer[0]
    indices.CopyFrom(numpy_helper.from_array(np.array([0, 1, 2, 3, 4]), indices.name))
    with pytest.raises(ModelFileError, match="are not the ones cnnc writes"):
        load_onnx(proto)


# ---- mistakes in programs ---------------------------------------------------------------------

ERRORS = [
    ("upsample", 3, "upsample needs a scale or a size"),
    ("upsample(scale=2, size=4)", 21, "upsample takes a scale or a size, not both"),
    ("upsample(scale=0)", 12, "upsample scale must be positive, got 0"),
    ("upsample(scale=-2)", 12, "upsample scale must be positive, got -2"),
    ("upsample(scale=(2, 2, 2))", 12, "scale has 3 values but the input has 2 spatial axes"),
    ("upsample(size=0)", 12, "upsample size must be positive, got 0"),
    ("upsample(size=2.5)", 12, "upsample size must be an integer or a tuple of integers"),
    ("upsample(scale=two)", 18, "undefined name 'two'"),
    ("upsample(scale=0.1)", 12, "upsample scale 0.1 of 8x8 gives 0x0: every output size"),
    ("upsample(scale=2, mode=linear)", 21, "upsample mode linear interpolates 1-D maps"),
    ("upsample(scale=2, mode=cubic)", 21, "upsample mode must be one of nearest, nearest_exact"),
    (
        "upsample(scale=2, align_corners=true)",
        21,
        "align_corners applies to the interpolating modes (linear, bilinear), not nearest",
    ),
    (
        "upsample(scale=2, mode=nearest_exact, align_corners=false)",
        41,
        "align_corners applies to the interpolating modes",
    ),
    ("upsample(2)", 12, "upsample takes 0 positional arguments"),
    ("fc(10) -> upsample(scale=2)", 13, "upsample needs a feature map N×C×L or N×C×H×W"),
]


@pytest.mark.parametrize(("layer", "col", "message"), ERRORS, ids=[e[2][:40] for e in ERRORS])
def test_a_mistake_in_an_upsample_is_one_error_at_its_place(layer, col, message):
    with pytest.raises(LayerError) as info:
        cnnc.compile(f"network n(x: 4x8x8) {{\n  {layer}\n}}\n")
    assert (info.value.location.line, info.value.location.col) == (2, col)
    assert info.value.message.startswith(message), info.value.message


def test_bilinear_on_a_1d_map_points_at_linear():
    with pytest.raises(LayerError) as info:
        cnnc.compile("network n(x: 4x8) {\n  upsample(scale=2, mode=bilinear)\n}\n")
    assert info.value.message.startswith("upsample mode bilinear interpolates 2-D maps")
    assert info.value.hint == "use mode=linear (or nearest)"


def test_an_upsample_to_a_size_cannot_be_made_fully_convolutional():
    text = net("3x32x32", "conv(8, 3) -> upsample(size=(16, 16)) -> gap -> fc(10)")
    with pytest.raises(CnncError, match="upsample upsample1 upsamples to a fixed size"):
        cnnc.compile(text, fully_conv=True)
    with pytest.raises(UsageError):
        model = cnnc.compile(net("3x8x8", "upsample(size=4)"), opt_level=0)
        model.graph.flexible_spatial = True
        model.to_onnx()


def test_a_2d_nearest_resize_pytorch_would_copy_but_the_formula_samples_is_refused():
    # 5 by 1.1 stays 5: PyTorch's 2-D nearest copies it, Resize samples 0, 0, 1, 2, 3.
    model = resize_model(
        (3, 5, 6), scales=[1, 1, 1.1, 2], mode="nearest",
        coordinate_transformation_mode="asymmetric", nearest_mode="floor",
    )  # fmt: skip
    with pytest.raises(ModelFileError, match=r"Resize nearest by 1\.1 from 5 to 5 samples"):
        load_onnx(model)


def test_a_resize_to_another_value_s_sizes_as_torchscript_computes_them_imports(tmp_path):
    # fcn_resnet50's last Resize as PyTorch's TorchScript exporter writes it: the batch and
    # channels from Shape(y)[0:2], the spatial sizes gathered from Shape(image) and cast.
    weight = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
    constants = {"w": weight, "zero": i64(0), "two": np.array(2), "three": np.array(3),
                 "axis0": i64(0), "start": i64(0), "end": i64(2)}  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["image", "w"], ["y"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Shape", ["image"], ["s"]),
        helper.make_node("Gather", ["s", "two"], ["h"], axis=0),
        helper.make_node("Gather", ["s", "three"], ["w_"], axis=0),
        helper.make_node("Unsqueeze", ["h", "axis0"], ["h1"]),
        helper.make_node("Unsqueeze", ["w_", "axis0"], ["w1"]),
        helper.make_node("Concat", ["h1", "w1"], ["hw"], axis=0),
        helper.make_node("Shape", ["y"], ["sy"]),
        helper.make_node("Slice", ["sy", "start", "end", "zero"], ["nc"]),
        helper.make_node("Cast", ["hw"], ["hw64"], to=TensorProto.INT64),
        helper.make_node("Concat", ["nc", "hw64"], ["sizes"], axis=0),
        helper.make_node(
            "Resize", ["y", "", "", "sizes"], ["out"], name="up", mode="linear",
            coordinate_transformation_mode="half_pixel",
        ),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 9, 10])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4, 9, 10])],
        [numpy_helper.from_array(v, k) for k, v in constants.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    ours = cnnc.Model(load_onnx(model))
    assert [n.op for n in ours.graph.nodes] == ["conv", "upsample"]
    assert ours.graph.nodes[1].attrs["size"] == (9, 10)
    x = np.random.default_rng(1).standard_normal((2, 3, 9, 10)).astype(np.float32)
    assert_agree(ours.run(x), ort_session(model).run(None, {"image": x})[0])
