"""The data-movement layers of today's networks (pad, split, slice, crop, drop_path): their
arguments, shapes and errors, the interpreter against NumPy, onnxruntime and
onnx.reference, views that must not be written over, and their ONNX and program forms."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from helpers import assert_agree, ort_session
from onnx.reference import ReferenceEvaluator

import cnnc
from cnnc.backends.interpreter import Interpreter
from cnnc.errors import LayerError
from cnnc.frontend.onnx_import import load_onnx
from cnnc.ops.tensor import chunk_sizes

BATCHES = pytest.mark.parametrize("batch", [1, 3], ids=["batch1", "batch3"])


def compile0(text: str, **kw) -> cnnc.Model:
    return cnnc.compile(text, opt_level=kw.pop("opt_level", 0), **kw)


def inputs(model: cnnc.Model, batch: int, spatial: tuple[int, ...] | None = None):
    """A seeded input per network input (with other spatial sizes if given)."""
    rng = np.random.default_rng(batch)
    arrays = []
    for v in model.graph.inputs:
        shape = (batch, *v.type.shape[1:2], *(spatial or v.type.shape[2:]))
        arrays.append(rng.standard_normal(shape, dtype=np.float32))
    return arrays


def run_everywhere(model: cnnc.Model, xs, reference: bool = True) -> list[np.ndarray]:
    """The interpreter's outputs, checked against onnxruntime (and onnx.reference)."""
    ours = model.run_all_outputs(*xs)
    proto = model.to_onnx()
    onnx.checker.check_model(proto, full_check=True)
    feeds = dict(zip(model.input_names, xs, strict=True))
    for a, b in zip(ours, ort_session(proto).run(None, feeds), strict=True):
        assert_agree(a, b, "onnxruntime")
    if reference:
        for a, b in zip(ours, ReferenceEvaluator(proto).run(None, feeds), strict=True):
            assert_agree(a, b, "onnx.reference")
    return ours


def error_of(text: str) -> LayerError:
    with pytest.raises(LayerError) as info:
        compile0(text)
    return info.value


# ---- pad -------------------------------------------------------------------------------------

PAD_FORMS = [
    ("1", ((1, 1), (1, 1))),
    ("(1, 2)", ((1, 1), (2, 2))),
    ("(0, 1, 2, 3)", ((0, 2), (1, 3))),
    ("(3, 0, 0, 4)", ((3, 0), (0, 4))),
]
NUMPY_MODES = {"constant": "constant", "reflect": "reflect", "edge": "edge"}


@BATCHES
@pytest.mark.parametrize("mode", ["constant", "reflect", "edge"])
@pytest.mark.parametrize(("amount", "width"), PAD_FORMS, ids=[f[0] for f in PAD_FORMS])
def test_pad_2d_matches_numpy_onnxruntime_and_the_reference(mode, amount, width, batch):
    model = compile0(f"network n(x: 3x5x6) {{ pad({amount}, {mode}) }}")
    (x,) = inputs(model, batch)
    (y,) = run_everywhere(model, [x])
    expected = np.pad(x, ((0, 0), (0, 0), *width), mode=NUMPY_MODES[mode])
    np.testing.assert_array_equal(y, expected)


@BATCHES
@pytest.mark.parametrize("mode", ["constant", "reflect", "edge"])
def test_pad_1d_takes_begin_and_end(mode, batch):
    model = compile0(f"network n(x: 2x7) {{ pad((2, 5), {mode}) }}")
    (x,) = inputs(model, batch)
    (y,) = run_everywhere(model, [x])
    np.testing.assert_array_equal(y, np.pad(x, ((0, 0), (0, 0), (2, 5)), mode=mode))


def test_reflect_padding_may_reach_one_less_than_the_size():
    model = compile0("network n(x: 2x4x5) { pad((3, 4), reflect) }")
    (x,) = inputs(model, 2)
    (y,) = run_everywhere(model, [x])
    np.testing.assert_array_equal(y, np.pad(x, ((0, 0), (0, 0), (3, 3), (4, 4)), "reflect"))


def test_reflect_padding_as_large_as_the_input_is_an_error_at_the_amount():
    err = error_of("network n(x: 2x4x5) {\n    pad((4, 1), reflect)\n}")
    assert (err.where.line, err.where.col) == (2, 9)
    assert err.message == (
        "reflect padding by 4 on the height must be smaller than the input's height 4 "
        "(f32[N,2,4,5]): reflection repeats no edge row, so it pads at most 3"
    )


def test_constant_padding_fills_with_its_value():
    model = compile0("network n(x: 2x3x3) { pad((1, 0, 0, 2), value=-1.5) }")
    (x,) = inputs(model, 2)
    (y,) = run_everywhere(model, [x])
    expected = np.pad(x, ((0, 0), (0, 0), (1, 0), (0, 2)), constant_values=-1.5)
    np.testing.assert_array_equal(y, expected)


@BATCHES
def test_negative_constant_amounts_crop_as_onnxruntime_does(batch):
    model = compile0("network n(x: 2x6x7) { pad((-1, 2, 3, -2), value=0.5) }")
    (x,) = inputs(model, batch)
    # onnx.reference does not take negative pads; onnxruntime does.
    (y,) = run_everywhere(model, [x], reference=False)
    expected = np.pad(x[:, :, 1:, :-2], ((0, 0), (0, 0), (0, 3), (2, 0)), constant_values=0.5)
    np.testing.assert_array_equal(y, expected)


def test_replicate_is_pytorchs_word_for_edge():
    model = compile0("network n(x: 2x3x3) { pad(2, replicate) }")
    (node,) = model.graph.nodes
    assert node.attrs["mode"] == "edge"
    assert "p=2,2,2,2 edge" in model.dump()


@pytest.mark.parametrize(
    ("layer", "col", "message"),
    [
        (
            "pad(-1, reflect)",
            9,
            "reflect padding by -1 and -1 on the height: negative amounts crop, and only "
            "constant padding crops",
        ),
        ("pad((1, -1), edge)", 9, "edge padding by -1 and -1 on the width: negative amounts crop"),
        ("pad(1, reflect, value=2)", 21, "value is the fill of constant padding; reflect"),
        ("pad((1, 2, 3), reflect)", 9, "amount has 3 values; a 2-D layer takes an int, (h, w)"),
        ("pad((-2, 0, -2, 0))", 9, "padding by -2 and -2 leaves nothing of the height 4"),
        (
            "pad(1, wrap)",
            12,
            "pad mode must be one of constant, reflect, edge, replicate, got wrap",
        ),
    ],
)
def test_pad_mistakes_are_errors_at_the_argument(layer, col, message):
    err = error_of(f"network n(x: 2x4x5) {{\n    {layer}\n}}")
    assert (err.where.line, err.where.col) == (2, col)
    assert message in err.message


def test_pad_needs_a_feature_map():
    err = error_of("network n(x: 2x4x5) { fc(4) -> pad(1) }")
    assert "pad needs a feature map N×C×L or N×C×H×W, got f32[N,4]" in err.message


# ---- split -----------------------------------------------------------------------------------

# torch.chunk(torch.empty(1, C), n, dim=1) gives chunks of these sizes (checked with PyTorch 2.14).
TORCH_CHUNKS = [
    (6, 2, (3, 3)),
    (7, 3, (3, 3, 1)),
    (5, 2, (3, 2)),
    (5, 5, (1, 1, 1, 1, 1)),
    (10, 4, (3, 3, 3, 1)),
    (6, 4, (2, 2, 2)),
    (5, 6, (1, 1, 1, 1, 1)),
]


@pytest.mark.parametrize(("channels", "chunks", "sizes"), TORCH_CHUNKS)
def test_chunk_sizes_are_torch_chunks(channels, chunks, sizes):
    assert chunk_sizes(channels, chunks) == sizes


@BATCHES
def test_split_into_uneven_chunks_binds_each_and_uses_them(batch):
    model = compile0("network n(x: 7x3x3) -> (a, b, c) { a, b, c = x -> split(3) }")
    (x,) = inputs(model, batch)
    a, b, c = run_everywhere(model, [x])
    for part, expected in zip((a, b, c), np.split(x, [3, 6], axis=1), strict=True):
        np.testing.assert_array_equal(part, expected)


@BATCHES
def test_split_by_sizes_feeds_later_statements(batch):
    model = compile0(
        "network n(x: 6x4x4) { a, b, c = x -> split((1, 2, 3))  r = b -> relu  concat(c, a, r) }"
    )
    (x,) = inputs(model, batch)
    (y,) = run_everywhere(model, [x])
    expected = np.concatenate([x[:, 3:], x[:, :1], np.maximum(x[:, 1:3], 0)], axis=1)
    np.testing.assert_array_equal(y, expected)


def test_split_of_an_fc_output_splits_its_features():
    model = compile0("network n(x: 3x4x4) -> (a, b) { f = x -> fc(10)  a, b = f -> split(2) }")
    (x,) = inputs(model, 2)
    a, b = run_everywhere(model, [x])
    assert a.shape == b.shape == (2, 5)


def test_the_dump_lists_every_output_of_a_split():
    model = compile0("network n(x: 4x2x2) { a, b = x -> s: split(2)  concat(b, a) }")
    assert "%s, %s.1 : f32[N,2,2,2], f32[N,2,2,2] = split(%x)" in model.dump()


@pytest.mark.parametrize(
    ("statement", "line", "col", "message"),
    [
        (
            "a, b, c, d = x -> split(4)",
            2,
            29,
            "split(4) of 6 channels: torch.chunk's chunks of ceil(6 / 4) = 2 make 3 chunks, not 4",
        ),
        (
            "a, b = x -> split((2, 3))",
            2,
            23,
            "split sizes (2, 3) sum to 5, but f32[N,6,3,3] has 6 channels",
        ),
        ("a, b = x -> split((2, 0, 4))", 2, 23, "split sections must be positive"),
        ("a, b = x -> split(3)", 2, 5, "the chain gives 3 values, but 2 names are bound to it"),
        ("x -> split(2) -> relu", 2, 22, "relu follows a layer that gives 2 values"),
    ],
)
def test_split_mistakes_are_errors_at_their_place(statement, line, col, message):
    err = error_of(f"network n(x: 6x3x3) {{\n    {statement}\n}}")
    assert (err.where.line, err.where.col) == (line, col)
    assert message in err.message


def test_random_weights_measure_the_statistics_of_a_bn_after_a_split():
    model = cnnc.compile(
        "network n(x: 4x5x5) { a, b = x -> split(2)  c = b -> conv(2, 1) -> bn  concat(a, c) }"
    )
    assert "bn" not in {n.op for n in model.graph.nodes}  # folded into the conv at -O2
    (x,) = inputs(model, 2)
    run_everywhere(model, [x])


def test_the_summary_lists_the_shape_of_every_part_of_a_split():
    model = compile0("network n(x: 6x4x4) { a, b = x -> split((2, 4))  concat(b, a) }")
    assert re.search(r"split1 +split +\[N,6,4,4\] +\[N,2,4,4\] \[N,4,4,4\]", model.summary())


def test_a_split_into_more_chunks_than_torch_gives_suggests_sizes():
    err = error_of("network n(x: 6x3x3) { a, b, c, d = x -> split(4) }")
    assert err.hint == "give the sizes, for example split((2, 2, 1, 1))"


def test_a_split_decompiles_to_a_binding_of_its_values():
    model = compile0(
        "network n(x: 6x4x4) { a, b, c = x -> split((1, 2, 3))  r = b -> relu  concat(c, a, r) }"
    )
    text, _ = model.to_program()
    assert "split1_out, split1_1_out, split1_2_out = split1: split((1, 2, 3))" in text
    assert "relu1_out = split1_1_out -> relu1: relu" in text
    back = cnnc.compile(text, opt_level=0)
    (x,) = inputs(model, 2)
    np.testing.assert_array_equal(back.run(x), model.run(x))


def test_the_program_of_a_reshape_and_a_transpose_of_one_axis_writes_the_number_itself():
    # Found by the fuzzer: to_program wrote reshape((48,)), which the grammar refuses.
    model = compile0("network n(x: 3x4x4) { flatten -> reshape(48) -> transpose(1) -> relu }")
    text, _ = model.to_program()
    assert "reshape1: reshape(48)" in text
    assert "transpose1: transpose(1)" in text
    back = cnnc.compile(text, opt_level=0)
    (x,) = inputs(model, 2)
    np.testing.assert_array_equal(back.run(x), model.run(x))


# ---- views are never written over while another value lives on them --------------------------

ALIASES = {
    # relu of a split's first part may not run in place: y is read again afterwards.
    "split": """
        y = x -> conv(4, 1)
        a, b = y -> split(2)
        r = a -> relu
        s = y -> sigmoid
        t = concat(r, b)
        add(t, s)
    """,
    # Two slices share rows: relu over the first may not write over the second.
    "slice": """
        y = x -> conv(4, 1)
        p = y -> slice(0, 3)
        q = y -> slice(1, 4)
        r = p -> relu
        concat(r, q)
    """,
    "crop": """
        y = x -> conv(4, 1) -> pad(1)
        c = y -> crop(x, offset=1)
        r = c -> relu
        s = y -> slice(1, -1, axis=2) -> slice(1, -1, axis=3)
        add(r, s)
    """,
}


@pytest.mark.parametrize("op", sorted(ALIASES))
def test_an_in_place_op_never_writes_over_a_view_another_value_still_reads(op):
    model = compile0(f"network n(x: 4x5x5) {{ {ALIASES[op]} }}")
    (x,) = inputs(model, 2)
    interpreter = Interpreter(model.graph, threads=1)
    expected = Interpreter(model.graph, threads=1).run_all(x)[0][0]  # no memory reused
    np.testing.assert_array_equal(interpreter.run(x)[0], expected)
    assert_agree(interpreter.run(x)[0], ort_session(model.to_onnx()).run(None, {"x": x})[0])
    relu = next(s for s in interpreter.steps if s.node.op == "relu")
    assert not relu.in_place


def test_an_in_place_op_may_write_over_a_split_part_whose_whole_is_dead():
    model = compile0(
        "network n(x: 4x5x5) { y = x -> conv(4, 1)  a, b = y -> split(2)  "
        "r = a -> relu  s = b -> sigmoid  concat(r, s) }"
    )
    interpreter = Interpreter(model.graph, threads=1)
    steps = {s.node.op: s for s in interpreter.steps}
    assert not steps["relu"].in_place  # b, on the same memory, is read after it
    assert steps["sigmoid"].in_place
    (x,) = inputs(model, 3)
    assert_agree(interpreter.run(x)[0], ort_session(model.to_onnx()).run(None, {"x": x})[0])


# ---- slice -----------------------------------------------------------------------------------

SLICES = [
    ("slice(1, 3)", (slice(None), slice(1, 3))),
    ("slice(-3, -1)", (slice(None), slice(-3, -1))),
    ("slice(2, 100)", (slice(None), slice(2, 100))),
    ("slice(-100, 2)", (slice(None), slice(-100, 2))),
    ("slice(1, -1, axis=2)", (slice(None), slice(None), slice(1, -1))),
    ("slice(-2, 7, axis=3)", (slice(None), slice(None), slice(None), slice(-2, 7))),
    ("slice(0, 1, axis=-1)", (slice(None), slice(None), slice(None), slice(0, 1))),
]


@BATCHES
@pytest.mark.parametrize(("layer", "index"), SLICES, ids=[s[0] for s in SLICES])
def test_slice_takes_python_bounds(layer, index, batch):
    model = compile0(f"network n(x: 5x4x6) {{ {layer} }}")
    (x,) = inputs(model, batch)
    (y,) = run_everywhere(model, [x])
    np.testing.assert_array_equal(y, x[index])


def test_slice_of_a_1d_map_along_its_length():
    model = compile0("network n(x: 3x9) { slice(2, -3, axis=2) }")
    (x,) = inputs(model, 2)
    (y,) = run_everywhere(model, [x])
    np.testing.assert_array_equal(y, x[:, :, 2:-3])


@pytest.mark.parametrize(
    ("layer", "col", "message", "hint"),
    [
        (
            "slice(0, 2, axis=0)",
            17,
            "slice axis 0 is not an axis of f32[N,5,4,6] after the batch: 1 (channels) to 3",
            "the batch axis 0 is never sliced",
        ),
        ("slice(0, 2, axis=4)", 17, "slice axis 4 is not an axis", None),
        (
            "slice(3, 3)",
            14,
            "slice 3:3 of the channels of f32[N,5,4,6] (size 5) is empty",
            "negative bounds count from the end; the end is not included",
        ),
        (
            "slice(5, 9, axis=2)",
            14,
            "slice 5:9 of the height of f32[N,5,4,6] (size 4) is empty",
            None,
        ),
    ],
)
def test_slice_mistakes_are_errors_at_the_argument(layer, col, message, hint):
    err = error_of(f"network n(x: 5x4x6) {{\n    {layer}\n}}")
    assert (err.where.line, err.where.col) == (2, col)
    assert message in err.message
    if hint:
        assert err.hint == hint


# ---- crop ------------------------------------------------------------------------------------

CROP = "network n(x: 3x6x7) { y = x -> conv(4, 3, pad=4)  y -> crop(x, offset=OFFSET) }"


@BATCHES
@pytest.mark.parametrize(("offset", "start"), [("0", (0, 0)), ("3", (3, 3)), ("(1, 4)", (1, 4))])
def test_crop_takes_the_window_of_the_reference_size_at_the_offset(offset, start, batch):
    model = compile0(CROP.replace("OFFSET", offset))
    (x,) = inputs(model, batch)
    (y,) = run_everywhere(model, [x])
    full = model.graph.nodes[0].output.name
    conv = Interpreter(model.graph).run_all(x)[1][full]
    np.testing.assert_array_equal(y, conv[:, :, start[0] : start[0] + 6, start[1] : start[1] + 7])


def test_crop_of_a_1d_map():
    model = compile0("network n(x: 2x9) { y = x -> pad((2, 5))  y -> crop(x, offset=3) }")
    (x,) = inputs(model, 2)
    (y,) = run_everywhere(model, [x])
    np.testing.assert_array_equal(y, np.pad(x, ((0, 0), (0, 0), (2, 5)))[:, :, 3:12])


@pytest.mark.parametrize(
    ("layer", "col", "message"),
    [
        (
            "crop(x, offset=(5, 1))",
            13,
            "crop of 6 from offset 5 on the height reaches 11, but the input f32[N,4,8,9] has 8",
        ),
        ("crop(x, offset=(1, 2, 3))", 13, "offset has 3 values but the input has 2 spatial axes"),
        ("crop(f)", 10, "crop needs a reference map like its input f32[N,4,8,9], got f32[N,5]"),
        ("crop(x, offset=-1)", 13, "crop offset must be at least 0, got -1"),
        ("crop(3)", 10, "crop ref must be the name of a value, got 3"),
    ],
)
def test_crop_mistakes_are_errors_at_the_argument(layer, col, message):
    err = error_of(
        "network n(x: 3x6x7) -> (f, c) {\n    f = x -> fc(5)\n    c = x -> conv(4, 3, pad=2) ->\n"
        f"    {layer}\n}}"
    )
    assert (err.where.line, err.where.col) == (4, col)
    assert message in err.message


FCN = """network fcn(image: 3x16x16) {
    image -> pad(4) -> conv(4, 3, pad=1) -> relu -> slice(0, -1, axis=3)
    crop(image, offset=(3, 2))
}"""


@BATCHES
@pytest.mark.parametrize("size", [(16, 16), (21, 30)])
def test_a_fully_convolutional_crop_takes_the_size_of_its_reference_at_run_time(size, batch):
    model = cnnc.compile(FCN, fully_conv=True)
    (x,) = inputs(model, batch, size)
    (y,) = run_everywhere(model, [x], reference=False)
    assert y.shape == (batch, 4, *size)
    ops = [n.op_type for n in model.to_onnx().graph.node]
    assert ops.count("Shape") == 1  # the ends come from the reference's shape


def test_a_fully_convolutional_crop_imports_back_as_a_crop():
    model = cnnc.compile(FCN, fully_conv=True)
    graph = load_onnx(model.to_onnx())
    assert [n.op for n in graph.nodes] == [n.op for n in model.graph.nodes]
    (x,) = inputs(model, 2, (20, 25))
    np.testing.assert_array_equal(Interpreter(graph).run(x)[0], model.run(x))


def test_a_crop_that_does_not_fit_at_run_time_is_an_error_naming_the_node():
    model = cnnc.compile("network n(x: 3x8x8, r: 1x6x6) { crop(r, offset=1) }", opt_level=0)
    # Inputs larger than declared, as a fully convolutional graph takes them.
    model.graph.flexible_spatial = True
    x = np.zeros((1, 3, 8, 8), np.float32)
    with pytest.raises(cnnc.CnncError, match=r"running node crop1 \(crop\) failed: crop of 8x6"):
        model.run(x, np.zeros((1, 1, 8, 6), np.float32))


# ---- drop_path -------------------------------------------------------------------------------

RESIDUAL = "network n(x: 4x5x5) { y = x -> conv(4, 3, pad=1) -> drop_path(0.2)  add(x, y) }"


def test_drop_path_is_the_identity_kept_in_the_dump():
    model = compile0(RESIDUAL)
    assert re.search(r"= drop_path\(%conv1\) +p=0.2 ", model.dump())
    (x,) = inputs(model, 3)
    conv = Interpreter(model.graph).run_all(x)[1]["conv1"]
    np.testing.assert_array_equal(model.run(x), x + conv)


@pytest.mark.parametrize("level", [1, 2])
def test_remove_identity_drops_drop_path(level):
    model = cnnc.compile(RESIDUAL, opt_level=level)
    assert "drop_path" not in {n.op for n in model.graph.nodes}
    (x,) = inputs(model, 2)
    np.testing.assert_array_equal(model.run(x), compile0(RESIDUAL).run(x))


def test_drop_path_exports_as_a_function_carrying_p_and_imports_back():
    model = compile0(RESIDUAL)
    proto = model.to_onnx()
    (function,) = proto.functions
    assert (function.domain, function.name, list(function.attribute)) == ("cnnc", "DropPath", ["p"])
    assert [n.op_type for n in function.node] == ["Identity"]
    call = next(n for n in proto.graph.node if n.op_type == "DropPath")
    assert onnx.helper.get_attribute_value(call.attribute[0]) == pytest.approx(0.2)
    (x,) = inputs(model, 2)
    run_everywhere(model, [x])
    back = load_onnx(proto)
    assert [(n.op, n.attrs) for n in back.nodes if n.op == "drop_path"] == [
        ("drop_path", {"p": pytest.approx(0.2)})
    ]


def test_drop_path_with_inlined_functions_is_an_identity_node():
    proto = compile0(RESIDUAL).to_onnx(inline_functions=True)
    assert not proto.functions
    assert "Identity" in [n.op_type for n in proto.graph.node]


@pytest.mark.parametrize("p", ["-0.1", "1.5"])
def test_drop_path_probability_must_be_in_0_1(p):
    err = error_of(f"network n(x: 4x5x5) {{ drop_path({p}) }}")
    assert f"drop_path probability must be in [0, 1], got {float(p)}" in err.message


# ---- remove-identity --------------------------------------------------------------------------

IDENTITIES = ["pad(0)", "slice(0, 4)", "slice(-100, 100)", "split(1)", "drop_path"]


@pytest.mark.parametrize("layer", IDENTITIES)
def test_remove_identity_drops_layers_that_change_nothing(layer):
    text = f"network n(x: 4x5x5) {{ relu -> {layer} -> sigmoid }}"
    model = cnnc.compile(text, opt_level=1)
    assert [n.op for n in model.graph.nodes] == ["relu", "sigmoid"]
    (x,) = inputs(model, 2)
    np.testing.assert_array_equal(model.run(x), compile0(text).run(x))


@pytest.mark.parametrize("layer", ["crop(x)", "slice(0, 5, axis=2)"])
def test_remove_identity_keeps_spatial_slices_and_crops_that_change_nothing_yet(layer):
    # Made fully convolutional, the network runs on larger maps, which the same bounds cut.
    text = f"network n(x: 3x5x5) {{ c = x -> conv(3, 3, pad=1)  c -> {layer} }}"
    model = cnnc.compile(text, opt_level=2, fully_conv=True)
    assert layer.split("(")[0] in {n.op for n in model.graph.nodes}
    (x,) = inputs(model, 2, (7, 9))
    (y,) = run_everywhere(model, [x], reference=False)
    assert y.shape[2:] == ((7, 9) if layer == "crop(x)" else (5, 9))
