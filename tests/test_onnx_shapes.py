"""Importing ONNX's data-movement ops (Pad, Split, Slice, cnnc's DropPath) and the shapes
models compute at run time (Shape -> Gather -> Concat -> Reshape, as torch writes
ShuffleNet v2), checked against onnxruntime and onnx.reference; and the clear errors for
what cnnc cannot represent."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import assert_agree, ort_session
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import cnnc
from cnnc.errors import ModelFileError

BATCHES = pytest.mark.parametrize("batch", [1, 3], ids=["batch1", "batch3"])
INT64_MAX = np.iinfo(np.int64).max


def i64(*values) -> np.ndarray:
    return np.array(values, np.int64)


def model_of(
    nodes: list[onnx.NodeProto],
    shape: tuple[int, ...],
    constants: dict[str, np.ndarray] | None = None,
    opset: int = 17,
    outputs: list[str] | None = None,
    output_rank: int | None = None,
) -> onnx.ModelProto:
    """A model of input x [N, *shape] whose outputs (the last node's first, by default)
    are float tensors of x's rank (or ``output_rank``)."""
    rank = output_rank or len(shape) + 1
    graph = helper.make_graph(
        nodes,
        "t",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *shape])],
        [
            helper.make_tensor_value_info(o, TensorProto.FLOAT, [None] * rank)
            for o in outputs or [nodes[-1].output[0]]
        ],
        initializer=[numpy_helper.from_array(a, n) for n, a in (constants or {}).items()],
    )
    opsets = [helper.make_opsetid("", opset)]
    return helper.make_model(
        graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets)
    )


def imported(tmp_path, model: onnx.ModelProto) -> cnnc.Model:
    onnx.save(model, tmp_path / "m.onnx")
    return cnnc.load(tmp_path / "m.onnx", opt_level=0)


def ops(model: cnnc.Model) -> list[str]:
    return [n.op for n in model.graph.nodes]


def feeds_for(model: onnx.ModelProto, batch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch)
    feeds = {}
    for vi in model.graph.input:
        dims = [batch, *(d.dim_value for d in vi.type.tensor_type.shape.dim[1:])]
        feeds[vi.name] = rng.standard_normal(dims, dtype=np.float32)
    return feeds


def agrees(tmp_path, model: onnx.ModelProto, batch: int, reference: bool = True) -> cnnc.Model:
    """Import the model, and check every output against onnxruntime and onnx.reference."""
    ours = imported(tmp_path, model)
    feeds = feeds_for(model, batch)
    results = ours.run_all_outputs(*(feeds[n] for n in ours.input_names))
    for a, b in zip(results, ort_session(model).run(None, feeds), strict=True):
        assert_agree(a, b, "onnxruntime")
    if reference:
        for a, b in zip(results, ReferenceEvaluator(model).run(None, feeds), strict=True):
            assert_agree(a, b, "onnx.reference")
    return ours


def refused(tmp_path, model: onnx.ModelProto) -> ModelFileError:
    with pytest.raises(ModelFileError) as info:
        imported(tmp_path, model)
    return info.value


# ---- Pad ---------------------------------------------------------------------------------------


@BATCHES
@pytest.mark.parametrize("mode", ["constant", "reflect", "edge"])
@pytest.mark.parametrize("opset", [11, 13, 18])
def test_pad_imports_in_each_mode(tmp_path, mode, opset, batch):
    pads = i64(0, 0, 1, 3, 0, 0, 2, 0)
    nodes = [helper.make_node("Pad", ["x", "pads", "value"], ["y"], mode=mode)]
    value = np.array(0.25 if mode == "constant" else 0.0, np.float32)
    model = model_of(nodes, (2, 4, 5), {"pads": pads, "value": value}, opset)
    ours = agrees(tmp_path, model, batch)
    (node,) = ours.graph.nodes
    assert (node.op, node.attrs["pads"], node.attrs["mode"]) == ("pad", (1, 3, 2, 0), mode)


@BATCHES
def test_an_opset_10_pad_takes_its_pads_from_attributes(tmp_path, batch):
    nodes = [helper.make_node("Pad", ["x"], ["y"], mode="reflect", pads=[0, 0, 2, 0, 0, 1])]
    agrees(tmp_path, model_of(nodes, (2, 5), opset=10), batch)


@pytest.mark.parametrize("axes", [(2, 3), (-2, -1)])
def test_an_opset_18_pad_of_some_axes_pads_those(tmp_path, axes):
    nodes = [helper.make_node("Pad", ["x", "pads", "", "axes"], ["y"], mode="edge")]
    model = model_of(nodes, (2, 4, 5), {"pads": i64(1, 0, 2, 3), "axes": i64(*axes)}, 18)
    ours = agrees(tmp_path, model, 2)
    assert ours.graph.nodes[0].attrs["pads"] == (1, 0, 2, 3)


def test_a_negative_constant_pad_crops(tmp_path):
    nodes = [helper.make_node("Pad", ["x", "pads"], ["y"])]
    model = model_of(nodes, (2, 6, 6), {"pads": i64(0, 0, -1, 2, 0, 0, 1, -3)})
    agrees(tmp_path, model, 3, reference=False)  # onnx.reference takes no negative pads


@pytest.mark.parametrize(
    ("mode", "pads", "opset", "message"),
    [
        (
            "wrap",
            (0, 0, 1, 1, 0, 0, 1, 1),
            19,
            "Pad mode wrap is not supported: cnnc pads with constant, reflect, edge",
        ),
        (
            "constant",
            (0, 1, 0, 0, 0, 0, 0, 0),
            17,
            "Pad of the batch or channel axis (pads [0, 1, 0, 0, 0, 0, 0, 0]) is not supported",
        ),
        (
            "reflect",
            (0, 0, 4, 0, 0, 0, 0, 0),
            17,
            "reflect padding by 4 on the height must be smaller than the input's height 4",
        ),
        (
            "edge",
            (0, 0, -1, 0, 0, 0, 0, 0),
            17,
            "edge padding by -1 and 0 on the height: negative amounts crop",
        ),
    ],
)
def test_a_pad_cnnc_cannot_represent_is_refused_at_the_node(tmp_path, mode, pads, opset, message):
    nodes = [helper.make_node("Pad", ["x", "pads"], ["y"], name="p", mode=mode)]
    err = refused(tmp_path, model_of(nodes, (2, 4, 5), {"pads": i64(*pads)}, opset))
    assert "node p (Pad)" in err.render()
    assert message in err.message


# ---- Split -------------------------------------------------------------------------------------


def _split(opset: int, outputs: int, **attrs) -> onnx.NodeProto:
    inputs = ["x", "sizes"] if opset >= 13 and "sizes" in attrs else ["x"]
    if opset >= 13:
        attrs.pop("sizes", None)
    else:
        attrs["split"] = attrs.pop("sizes")
    return helper.make_node("Split", inputs, [f"y{i}" for i in range(outputs)], name="s", **attrs)


@BATCHES
@pytest.mark.parametrize("opset", [11, 13, 18])
def test_split_by_sizes_imports_as_a_split_of_several_values(tmp_path, opset, batch):
    node = _split(opset, 3, axis=1, sizes=[1, 4, 2])
    model = model_of([node], (7, 3, 2), {"sizes": i64(1, 4, 2)}, opset, ["y0", "y1", "y2"])
    ours = agrees(tmp_path, model, batch)
    assert ops(ours) == ["split"]
    assert ours.output_names == ["y0", "y1", "y2"]
    assert ours.graph.nodes[0].attrs["sizes"] == (1, 4, 2)


@pytest.mark.parametrize(("channels", "parts", "sizes"), [(7, 3, (3, 3, 1)), (6, 3, (2, 2, 2))])
def test_opset_18_num_outputs_rounds_as_torch_chunk(tmp_path, channels, parts, sizes):
    node = _split(18, parts, axis=-3, num_outputs=parts)
    model = model_of([node], (channels, 2, 2), opset=18, outputs=[f"y{i}" for i in range(parts)])
    ours = agrees(tmp_path, model, 2)
    assert ours.graph.nodes[0].attrs["sizes"] == sizes


def test_split_without_sizes_is_into_equal_parts(tmp_path):
    node = helper.make_node("Split", ["x"], ["a", "b"], axis=1)
    ours = agrees(tmp_path, model_of([node], (6, 5), outputs=["a", "b"]), 3)
    assert ours.graph.nodes[0].attrs["sizes"] == (3, 3)


@pytest.mark.parametrize(
    ("node", "shape", "message"),
    [
        (
            helper.make_node("Split", ["x"], ["a", "b"], name="s", axis=2),
            (4, 6),
            "Split along axis 2 of f32[N,4,6] is not supported: cnnc splits the channels (axis 1)",
        ),
        (
            helper.make_node("Split", ["x"], ["a", "b"], name="s"),
            (4, 6),
            "Split along axis 0 of f32[N,4,6] is not supported",
        ),
        (
            helper.make_node("Split", ["x"], ["a", "b", "c", "d"], name="s", axis=1, num_outputs=4),
            (6, 2),
            "Split into sizes [2, 2, 2, 0] for 4 outputs",
        ),
        (
            helper.make_node("Split", ["x"], ["a", "b"], name="s", axis=1),
            (5, 2),
            "Split of 5 channels into 2 equal parts",
        ),
    ],
)
def test_a_split_cnnc_cannot_represent_is_refused_at_the_node(tmp_path, node, shape, message):
    outputs = list(node.output)
    err = refused(tmp_path, model_of([node], shape, opset=18, outputs=outputs))
    assert "node s (Split)" in err.render()
    assert message in err.message


# ---- Slice -------------------------------------------------------------------------------------


def _slice(starts, ends, axes=None, steps=None, name="s") -> tuple[onnx.NodeProto, dict]:
    constants = {"starts": i64(*starts), "ends": i64(*ends)}
    inputs = ["x", "starts", "ends"]
    if axes is not None:
        constants["axes"] = i64(*axes)
        inputs.append("axes")
    if steps is not None:
        constants["steps"] = i64(*steps)
        inputs.append("steps")
    return helper.make_node("Slice", inputs, ["y"], name=name), constants


SLICES = [
    ((1,), (3,), (1,), [("slice", 1, 1, 3)]),
    ((-3,), (INT64_MAX,), (-3,), [("slice", 1, 3, 6)]),
    ((1, -4), (-1, 100), (2, 3), [("slice", 2, 1, 4), ("slice", 3, 3, 7)]),
    ((0, 2), (INT64_MAX, 5), (0, 1), [("slice", 1, 2, 5)]),
    ((0,), (INT64_MAX,), (2,), []),
]


@BATCHES
@pytest.mark.parametrize(("starts", "ends", "axes", "expected"), SLICES)
def test_slice_imports_as_one_slice_per_axis_it_narrows(
    tmp_path, starts, ends, axes, expected, batch
):
    node, constants = _slice(starts, ends, axes, [1] * len(starts))
    ours = agrees(tmp_path, model_of([node], (6, 5, 7), constants), batch)
    found = [(n.op, n.attrs["axis"], n.attrs["start"], n.attrs["end"]) for n in ours.graph.nodes]
    assert found == expected
    if expected:
        assert ours.graph.nodes[-1].name == "s"


def test_an_opset_9_slice_takes_its_bounds_from_attributes(tmp_path):
    node = helper.make_node("Slice", ["x"], ["y"], starts=[1, 2], ends=[-1, 9], axes=[1, 2])
    agrees(tmp_path, model_of([node], (5, 6), opset=9), 2)


@pytest.mark.parametrize(
    ("starts", "ends", "axes", "steps", "message"),
    [
        ((0,), (4,), (1,), (2,), "Slice with steps [2] is not supported: cnnc slices with step 1"),
        ((1,), (INT64_MAX,), (0,), None, "Slice 1:9223372036854775807 of the batch axis"),
        ((4,), (4,), (1,), None, "slice 4:4 of the channels of f32[N,6,5,7] (size 6) is empty"),
    ],
)
def test_a_slice_cnnc_cannot_represent_is_refused_at_the_node(
    tmp_path, starts, ends, axes, steps, message
):
    node, constants = _slice(starts, ends, axes, steps)
    err = refused(tmp_path, model_of([node], (6, 5, 7), constants))
    assert "node s (Slice)" in err.render()
    assert message in err.message


# ---- crop: a Slice whose ends are another value's sizes ------------------------------------------


def _crop_nodes(per_axis: bool, offset=(3, 2)) -> tuple[list[onnx.NodeProto], dict]:
    """conv (pad 4) then the crop to the input's size at ``offset``: one Slice over both
    spatial axes, or one per axis as torch writes x[:, :, 3:3+h, 2:2+w]."""
    conv = helper.make_node("Conv", ["x", "w"], ["big"], pads=[4, 4, 4, 4])
    shape = helper.make_node("Shape", ["x"], ["shape"])
    constants = {"w": np.full((4, 3, 3, 3), 0.1, np.float32), "offset": i64(*offset)}
    if not per_axis:
        constants.update(two=i64(2), four=i64(4), axes=i64(2, 3))
        return [
            conv,
            shape,
            helper.make_node("Slice", ["shape", "two", "four"], ["hw"]),
            helper.make_node("Add", ["hw", "offset"], ["ends"]),
            helper.make_node("Slice", ["big", "offset", "ends", "axes"], ["y"], name="crop"),
        ], constants
    nodes, x = [conv, shape], "big"
    for i, axis in enumerate((2, 3)):
        constants[f"axis{axis}"], constants[f"at{axis}"] = i64(axis), i64(offset[i])
        constants[f"i{axis}"] = np.array(axis, np.int64)
        constants[f"off{axis}"] = np.array(offset[i], np.int64)
        out = "y" if axis == 3 else "rows"
        nodes += [
            helper.make_node("Gather", ["shape", f"i{axis}"], [f"size{axis}"]),
            helper.make_node("Add", [f"size{axis}", f"off{axis}"], [f"end{axis}"]),
            helper.make_node("Unsqueeze", [f"end{axis}", "zero"], [f"ends{axis}"]),
            helper.make_node(
                "Slice", [x, f"at{axis}", f"ends{axis}", f"axis{axis}"], [out], name=out
            ),
        ]
        x = out
    constants["zero"] = i64(0)
    return nodes, constants


@BATCHES
@pytest.mark.parametrize("per_axis", [False, True], ids=["one-slice", "slice-per-axis"])
def test_a_slice_to_the_shape_of_another_value_imports_as_a_crop(tmp_path, per_axis, batch):
    nodes, constants = _crop_nodes(per_axis)
    ours = agrees(tmp_path, model_of(nodes, (3, 6, 7), constants), batch)
    assert ops(ours) == ["conv", "crop"]
    crop = ours.graph.nodes[1]
    assert crop.attrs["offset"] == (3, 2)
    assert crop.inputs[1] is ours.graph.inputs[0]


def test_a_slice_whose_start_is_not_the_ends_offset_is_a_plain_slice(tmp_path):
    nodes, constants = _crop_nodes(per_axis=False)
    nodes[-1].input[1] = "starts"
    constants["starts"] = i64(1, 1)
    ours = agrees(tmp_path, model_of(nodes, (3, 6, 7), constants), 2)
    assert ops(ours) == ["conv", "slice", "slice"]


# ---- shapes computed at run time ---------------------------------------------------------------


def _scalar(value: int) -> np.ndarray:
    return np.array(value, np.int64)


def shufflenet_unit(chunk: str = "slice") -> tuple[list[onnx.NodeProto], dict]:
    """A ShuffleNet v2 unit (stride 1, 8 channels) as torch.onnx.export writes it with a
    dynamic batch: x.chunk(2, dim=1) as Slices whose bounds come from Shape (or, with
    chunk="split", opset 13's Split of sizes computed from Shape), the right half through
    conv-dwconv-conv, cat, then channel_shuffle(x, 2), whose view() sizes are Shape(x)
    -> Gather -> Div -> Cast -> Unsqueeze -> Concat, the batch size among them."""
    rng = np.random.default_rng(0)
    constants = {
        "w1": rng.standard_normal((4, 4, 1, 1), dtype=np.float32),
        "dw": rng.standard_normal((4, 1, 3, 3), dtype=np.float32),
        "w2": rng.standard_normal((4, 4, 1, 1), dtype=np.float32),
        "one": i64(1),
        "two": i64(2),
        "ax1": i64(1),
        "zero": i64(0),
        "groups": i64(2),
        **{f"i{k}": _scalar(k) for k in range(4)},
        "two_scalar": _scalar(2),
    }
    n = helper.make_node
    nodes = [n("Shape", ["x"], ["s0"]), n("Gather", ["s0", "ax1"], ["c"])]
    if chunk == "slice":
        nodes += [
            n("Add", ["c", "one"], ["c1"]),
            n("Div", ["c1", "two"], ["half"]),
            n("Mul", ["half", "one"], ["e1"]),
            n("Slice", ["x", "zero", "e1", "ax1"], ["x1"]),
            n("Mul", ["half", "two"], ["e2"]),
            n("Slice", ["x", "e1", "e2", "ax1"], ["x2"]),
        ]
    else:
        nodes += [
            n("Sub", ["two", "one"], ["k"]),
            n("Add", ["c", "k"], ["c1"]),
            n("Div", ["c1", "two"], ["size"]),
            n("Expand", ["size", "k"], ["sizes_head"]),
            n("Mul", ["size", "k"], ["taken"]),
            n("Sub", ["c", "taken"], ["rest"]),
            n("Concat", ["sizes_head", "rest"], ["sizes"], axis=0),
            n("Split", ["x", "sizes"], ["x1", "x2"], axis=1),
        ]
    nodes += [
        n("Conv", ["x2", "w1"], ["b1"]),
        n("Relu", ["b1"], ["b2"]),
        n("Conv", ["b2", "dw"], ["b3"], group=4, pads=[1, 1, 1, 1]),
        n("Conv", ["b3", "w2"], ["b4"]),
        n("Relu", ["b4"], ["b5"]),
        n("Concat", ["x1", "b5"], ["cat"], axis=1),
        n("Shape", ["cat"], ["s"]),
        *(n("Gather", ["s", f"i{k}"], [f"d{k}"], axis=0) for k in range(4)),
        n("Div", ["d1", "two_scalar"], ["per_group"]),
        n("Cast", ["per_group"], ["per_group64"], to=TensorProto.INT64),
        *(n("Unsqueeze", [v, "zero"], [f"u_{v}"]) for v in ("d0", "per_group64", "d2", "d3")),
        n("Concat", ["u_d0", "groups", "u_per_group64", "u_d2", "u_d3"], ["shape5"], axis=0),
        n("Reshape", ["cat", "shape5"], ["grouped"]),
        n("Transpose", ["grouped"], ["swapped"], perm=[0, 2, 1, 3, 4]),
        n("Unsqueeze", ["d1", "zero"], ["u_d1"]),
        n("Concat", ["u_d0", "u_d1", "u_d2", "u_d3"], ["shape4"], axis=0),
        n("Reshape", ["swapped", "shape4"], ["y"]),
    ]
    return nodes, constants


@BATCHES
@pytest.mark.parametrize("chunk", ["slice", "split"])
def test_a_shufflenet_v2_unit_as_torch_exports_it_imports_and_runs_as_onnxruntime(
    tmp_path, chunk, batch
):
    nodes, constants = shufflenet_unit(chunk)
    model = model_of(nodes, (8, 6, 6), constants, opset=13)
    ours = agrees(tmp_path, model, batch)
    halves = ["slice", "slice"] if chunk == "slice" else ["split"]
    assert ops(ours) == [
        *halves, "conv", "relu", "conv", "conv", "relu", "concat", "reshape", "transpose",
        "reshape",
    ]  # fmt: skip
    reshapes = [n.attrs["shape"] for n in ours.graph.nodes if n.op == "reshape"]
    assert reshapes == [(2, 4, 6, 6), (8, 6, 6)]


def test_an_imported_shufflenet_unit_optimizes_exports_and_decompiles(tmp_path):
    nodes, constants = shufflenet_unit("split")
    model = model_of(nodes, (8, 6, 6), constants, opset=13)
    onnx.save(model, tmp_path / "m.onnx")
    ours = cnnc.load(tmp_path / "m.onnx", opt_level=2)
    x = feeds_for(model, 3)["x"]
    expected = ort_session(model).run(None, {"x": x})[0]
    assert_agree(ort_session(ours.to_onnx()).run(None, {"x": x})[0], expected)
    text, weights = ours.to_program()
    assert "x1_out, x2_out = x1: split(2)" in text
    back = cnnc.compile(text, opt_level=0)
    for name, array in weights.items():
        back.graph.params[name].set_data(array)
    assert_agree(back.run(x), expected)


@pytest.mark.parametrize(
    ("start", "end", "expected"), [(2, None, (4, 5, 6)), (-2, None, (4, 5, 6)), (1, 2, (6, 20))]
)
def test_a_shape_with_start_and_end_reads_those_axes(tmp_path, start, end, expected):
    bounds = {"start": start} if end is None else {"start": start, "end": end}
    nodes = [
        helper.make_node("Shape", ["x"], ["sizes"], **bounds),
        helper.make_node("Concat", ["keep", "sizes", "rest"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["y"]),
    ]
    constants = {"keep": i64(0), "rest": i64(-1)}
    model = model_of(nodes, (6, 4, 5), constants, opset=15, output_rank=len(expected) + 1)
    ours = agrees(tmp_path, model, 2)
    assert [n.attrs["shape"] for n in ours.graph.nodes] == [expected]


def _batch_nodes() -> list[onnx.NodeProto]:
    return [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"]),
    ]


@pytest.mark.parametrize(
    ("nodes", "message"),
    [
        (
            [
                helper.make_node("Mul", ["n", "two"], ["n2"]),
                helper.make_node("Concat", ["n2", "minus_one"], ["shape"], axis=0),
                helper.make_node("Reshape", ["x", "shape"], ["y"], name="bad"),
            ],
            "Mul computes with the batch size, which is known only at run time",
        ),
        (
            [
                helper.make_node("Concat", ["two", "n", "minus_one"], ["shape"], axis=0),
                helper.make_node("Reshape", ["x", "shape"], ["y"], name="bad"),
            ],
            "Reshape computes with the batch size, which is known only at run time",
        ),
        (
            [
                helper.make_node("ConstantOfShape", ["s"], ["zeros"]),
                helper.make_node("Add", ["x", "zeros"], ["y"], name="bad"),
            ],
            "ConstantOfShape computes with the batch size, which is known only at run time",
        ),
        (
            [helper.make_node("Slice", ["x", "zero", "n", "two"], ["y"], name="bad")],
            "Slice computes with the batch size, which is known only at run time",
        ),
    ],
)
def test_a_computed_shape_that_needs_the_batch_size_as_a_number_is_refused(
    tmp_path, nodes, message
):
    constants = {"zero": i64(0), "two": i64(2), "minus_one": i64(-1)}
    err = refused(tmp_path, model_of(_batch_nodes() + nodes, (4, 3, 3), constants))
    assert message in err.message
    assert "the batch size only to position 0 of a Reshape's shape" in err.hint


def test_a_computed_shape_used_as_data_is_refused(tmp_path):
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Mul", ["x", "s"], ["y"], name="bad"),
    ]
    err = refused(tmp_path, model_of(nodes, (4, 3, 3)))
    assert "node bad (Mul)" in err.render()
    assert "input 's' is a shape computed from the batch size" in err.message


def test_a_shape_as_an_output_is_refused(tmp_path):
    nodes = [helper.make_node("Shape", ["x"], ["y"])]
    err = refused(tmp_path, model_of(nodes, (4, 3, 3)))
    assert "output y is a shape; cnnc computes outputs from inputs" in err.message


def test_a_known_shape_feeds_nodes_cnnc_folds(tmp_path):
    # ConstantOfShape of the channel count: a constant computed at import.
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Slice", ["s", "one", "two"], ["c"]),
        helper.make_node(
            "ConstantOfShape",
            ["c"],
            ["ones"],
            value=numpy_helper.from_array(np.array([0.5], np.float32)),
        ),
        helper.make_node("Unsqueeze", ["ones", "axes"], ["scale"]),
        helper.make_node("Mul", ["x", "scale"], ["y"]),
    ]
    constants = {"one": i64(1), "two": i64(2), "axes": i64(1, 2)}
    ours = agrees(tmp_path, model_of(nodes, (4, 3, 3), constants), 2)
    assert ops(ours) == ["scale"]  # a Mul by a per-channel constant


# ---- DropPath ------------------------------------------------------------------------------------


def test_cnncs_drop_path_function_imports_as_drop_path(tmp_path):
    model = cnnc.compile("network n(x: 3x4x4) { conv(3, 1) -> drop_path(0.3) }", opt_level=0)
    onnx.save(model.to_onnx(), tmp_path / "m.onnx")
    back = cnnc.load(tmp_path / "m.onnx", opt_level=0)
    assert [(n.op, n.attrs) for n in back.graph.nodes][1] == (
        "drop_path",
        {"p": pytest.approx(0.3)},
    )
    assert cnnc.load(tmp_path / "m.onnx", opt_level=1).graph.nodes[-1].op == "conv"


# ---- what PyTorch's dynamo exporter writes ------------------------------------------------------


def _as_strided(base: np.ndarray, folded: bool = True) -> tuple[list[onnx.NodeProto], dict]:
    """ConvNeXt's pooling as torch 2.14's dynamo exporter writes it: the mean over the
    spatial axes, flattened batch included, then a Gather of every element by indices
    computed from Range(0, batch size, 1) (its as_strided of the tensor's own strides).
    Without its optimizer (``folded=False``) Range's bounds are Constant nodes."""
    channels = base.shape[1]
    nodes = [
        helper.make_node("ReduceMean", ["x", "axes"], ["mean"], keepdims=1),
        helper.make_node("Reshape", ["mean", "minus_one"], ["flat"]),
        helper.make_node("Shape", ["x"], ["s"], start=0, end=1),
        helper.make_node("Squeeze", ["s"], ["n"]),
    ]
    constants = {"axes": i64(2, 3), "minus_one": i64(-1), "stride": np.int64(channels)}
    if folded:
        constants |= {"zero": np.int64(0), "one": np.int64(1)}
    else:
        for name, v in (("zero", 0), ("one", 1)):
            tensor = numpy_helper.from_array(np.int64(v))
            nodes.append(helper.make_node("Constant", [], [name], value=tensor))
    nodes += [
        helper.make_node("Range", ["zero", "n", "one"], ["r"]),
        helper.make_node("Mul", ["r", "stride"], ["rs"]),
        helper.make_node("Unsqueeze", ["rs", "unsqueeze_axes"], ["ru"]),
        helper.make_node("Add", ["ru", "base"], ["i1"]),
        helper.make_node("Add", ["i1", "zeros"], ["i2"]),
        helper.make_node("Gather", ["flat", "i2"], ["y"], axis=0, name="gather"),
    ]
    constants |= {
        "unsqueeze_axes": i64(1, 2, 3),
        "base": base,
        "zeros": np.zeros((1, 1, 1, 1), np.int64),
    }
    return nodes, constants


@BATCHES
@pytest.mark.parametrize("folded", [True, False], ids=["optimized", "unoptimized"])
def test_dynamos_as_strided_of_the_tensors_own_strides_is_the_tensor(tmp_path, batch, folded):
    nodes, constants = _as_strided(np.arange(6, dtype=np.int64).reshape(1, 6, 1, 1), folded)
    ours = agrees(tmp_path, model_of(nodes, (6, 5, 4), constants, opset=20), batch)
    assert ops(ours) == ["gap"]


def test_an_as_strided_of_a_fixed_batch_is_the_tensor(tmp_path):
    """With a fixed batch size, Range's indices are constants folded at import."""
    nodes, constants = _as_strided(np.arange(6, dtype=np.int64).reshape(1, 6, 1, 1))
    model = model_of(nodes, (6, 5, 4), constants, opset=20)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    ours = agrees(tmp_path, model, 2)
    assert ops(ours) == ["gap"]


def test_an_as_strided_that_reorders_elements_is_refused(tmp_path):
    nodes, constants = _as_strided(np.arange(6, dtype=np.int64)[::-1].reshape(1, 6, 1, 1))
    err = refused(tmp_path, model_of(nodes, (6, 5, 4), constants, opset=20))
    assert "node gather (Gather)" in err.render()
    assert "picks elements of %mean (f32[N,6,1,1]) flattened to one axis in another" in err.message


def test_a_tensor_flattened_with_its_batch_is_refused_where_it_is_used(tmp_path):
    nodes = [
        helper.make_node("Reshape", ["x", "minus_one"], ["flat"]),
        helper.make_node("Relu", ["flat"], ["y"], name="relu"),
    ]
    err = refused(tmp_path, model_of(nodes, (6, 5), {"minus_one": i64(-1)}, output_rank=1))
    assert "node relu (Relu)" in err.render()
    assert "input 'flat' is %x flattened to one axis, batch included" in err.message


@BATCHES
def test_dynamos_unoptimized_conv_bias_and_view_of_the_batch_size_import(tmp_path, batch):
    """Without its optimizer the dynamo exporter writes a conv without bias as one with a
    zero bias, Expand(CastLike(0, input), Shape(weight)[:1]), and x.view(x.size(0), -1) as a
    Reshape to Concat(Reshape(Squeeze(Shape(x)[:1]), [-1]), [-1]) with allowzero=1."""
    w = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    zero = numpy_helper.from_array(np.array(0.0, np.float32))
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], start=0, end=1),
        helper.make_node("Squeeze", ["s"], ["n"]),
        helper.make_node("Shape", ["w"], ["ws"], start=0, end=1),
        helper.make_node("Constant", [], ["one"], value_ints=[1]),
        helper.make_node("Expand", ["ws", "one"], ["bias_shape"]),
        helper.make_node("Constant", [], ["zero"], value=zero),
        helper.make_node("CastLike", ["zero", "x"], ["zero_like"]),
        helper.make_node("Expand", ["zero_like", "bias_shape"], ["bias"]),
        helper.make_node("Conv", ["x", "w", "bias"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["n", "minus_one"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus_one"], ["shape"], axis=0),
        helper.make_node("Reshape", ["c", "shape"], ["y"], allowzero=1),
    ]
    constants = {"w": w, "minus_one": i64(-1)}
    ours = agrees(tmp_path, model_of(nodes, (3, 5, 4), constants, opset=20, output_rank=2), batch)
    assert ops(ours) == ["conv", "flatten"]


@pytest.mark.parametrize("shape", [(1, 1), (4, 1, 1), (-1,)], ids=["ones", "own", "batch"])
def test_an_expand_that_keeps_the_shape_is_the_tensor(tmp_path, shape):
    nodes = [helper.make_node("Expand", ["x", "shape"], ["y"])]
    if shape == (-1,):  # the input's own shape, batch size included
        nodes.insert(0, helper.make_node("Shape", ["x"], ["shape"]))
        constants = {}
    else:
        constants = {"shape": i64(*shape)}
    nodes.append(helper.make_node("Relu", ["y"], ["z"]))
    ours = agrees(tmp_path, model_of(nodes, (4, 3, 3), constants), 2)
    assert ops(ours) == ["relu"]


def test_an_expand_that_repeats_elements_is_refused(tmp_path):
    nodes = [helper.make_node("Expand", ["x", "shape"], ["y"], name="e")]
    err = refused(tmp_path, model_of(nodes, (4, 1, 3), {"shape": i64(4, 5, 3)}))
    assert "node e (Expand)" in err.render()
    assert "Expand of f32[N,4,1,3] to [4, 5, 3] repeats elements" in err.message


def test_a_sparse_constant_and_a_reduction_with_no_axes_as_the_identity_import(tmp_path):
    sparse = helper.make_sparse_tensor(
        numpy_helper.from_array(np.array([2.0, -1.0], np.float32), "v"),
        numpy_helper.from_array(i64(0, 2), "i"),
        [3, 1, 1],
    )
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["m"], noop_with_empty_axes=1),
        helper.make_node("Constant", [], ["c"], sparse_value=sparse),
        helper.make_node("Mul", ["m", "c"], ["y"]),
    ]
    ours = agrees(tmp_path, model_of(nodes, (3, 2, 2), opset=18), 2, reference=False)
    assert ops(ours) == ["scale"]
    assert ours.graph.nodes[0].inputs[1].data.reshape(-1).tolist() == [2.0, 0.0, -1.0]


def test_folded_constants_count_against_the_limit_on_constants(tmp_path):
    fill = numpy_helper.from_array(np.array([1.0], np.float32))
    nodes = [
        helper.make_node("ConstantOfShape", ["size"], ["ones"], value=fill, name="big"),
        helper.make_node("Add", ["x", "ones"], ["y"]),
    ]
    onnx.save(model_of(nodes, (4, 16, 16), {"size": i64(4, 16, 16)}), tmp_path / "m.onnx")
    with pytest.raises(ModelFileError) as info:
        cnnc.load(tmp_path / "m.onnx", limits={"param_bytes": 4000})
    assert "node big (ConstantOfShape)" in info.value.render()
    assert "the model's constants take 4,120 bytes" in info.value.message
    assert "(param_bytes)" in info.value.message


@pytest.mark.parametrize("split", [np.int64(2), i64(2, 2)], ids=["chunk", "sizes"])
def test_split_to_sequence_and_sequence_at_import_as_a_split(tmp_path, split):
    """torch.chunk as the dynamo exporter writes it without its optimizer (ShuffleNet v2)."""
    nodes = [
        helper.make_node("SplitToSequence", ["x", "split"], ["seq"], axis=1, keepdims=1),
        helper.make_node("Constant", [], ["one"], value=numpy_helper.from_array(np.int64(1))),
        helper.make_node("SequenceAt", ["seq", "one"], ["b"]),
        helper.make_node("SequenceAt", ["seq", "zero"], ["a"]),
        helper.make_node("Sub", ["a", "b"], ["y"]),
    ]
    ours = agrees(tmp_path, model_of(nodes, (4, 3, 3), {"split": split, "zero": np.int64(0)}), 2)
    assert ops(ours) == ["split", "sub"]


def test_a_sequence_used_as_a_tensor_is_refused(tmp_path):
    nodes = [
        helper.make_node("SplitToSequence", ["x", "split"], ["seq"], axis=1),
        helper.make_node("Relu", ["seq"], ["y"], name="relu"),
    ]
    err = refused(tmp_path, model_of(nodes, (4, 3, 3), {"split": np.int64(2)}))
    assert "node relu (Relu)" in err.render()
    assert "input 'seq' is a sequence of tensors (SplitToSequence)" in err.message
