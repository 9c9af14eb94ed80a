"""Every mistake in a program is one error at its line and column, with what was expected."""

from __future__ import annotations

import pytest

import cnnc
from cnnc.errors import CnncError, LayerError, ParseError, ShapeError


def compile_error(body: str, input_shape: str = "16x8x8") -> CnncError:
    text = f"network n(x: {input_shape}) {{\n{body}\n}}\n"
    with pytest.raises(CnncError) as info:
        cnnc.compile(text)
    return info.value


CASES = [
    # (body, kind, line, col, message start)
    ("  convv(8, 3)", LayerError, 2, 3, "unknown layer 'convv'"),
    ("  conv(8, 3, strides=2)", LayerError, 2, 14, "conv has no attribute 'strides'"),
    ("  conv(8, 3, stride=-1)", LayerError, 2, 14, "conv stride must be positive, got -1"),
    ("  conv(8, 3, stride=0)", LayerError, 2, 14, "conv stride must be positive, got 0"),
    ("  conv(8, 3, pad=-1)", LayerError, 2, 14, "conv pad must be at least 0, got -1"),
    (
        "  conv(8, 2.5)",
        LayerError,
        2,
        11,
        "conv kernel must be an integer or a tuple of integers such as (3, 3), got 2.5",
    ),
    ("  conv(8, 3, bias=1)", LayerError, 2, 14, "conv bias must be true or false, got 1"),
    ("  conv(8, 3, bias=yes)", LayerError, 2, 19, "undefined name 'yes'"),
    (
        "  conv(8, 3, pad=(1, same))",
        LayerError,
        2,
        14,
        "conv pad must be an integer, a tuple of integers, same or valid, got (1, same)",
    ),
    (
        "  conv(8, 3, pad=(1, 2, 3))",
        LayerError,
        2,
        14,
        "pad has 3 values; a 2-D layer takes an int, (h, w) or (top, left, bottom, right)",
    ),
    ("  conv(8, 3, groups=3)", LayerError, 2, 14, "groups=3 does not divide the 16 input channels"),
    ("  conv(6, 3, groups=4)", LayerError, 2, 14, "groups=4 does not divide the 6 output channels"),
    (
        "  conv(8, (3, 3, 3))",
        LayerError,
        2,
        11,
        "kernel has 3 values but the input has 2 spatial axes",
    ),
    ("  conv(8)", LayerError, 2, 3, "conv needs kernel"),
    ("  conv(8, 3, 1)", LayerError, 2, 14, "conv takes 2 positional arguments (out, kernel)"),
    (
        "  conv(8, kernel=3, 1)",
        LayerError,
        2,
        21,
        "a positional argument cannot follow a named one",
    ),
    ("  conv(8, 3, kernel=3)", LayerError, 2, 14, "kernel is given twice"),
    (
        "  conv(8, 9)",
        ShapeError,
        2,
        3,
        "conv kernel 9x9 is larger than its input 8x8 (N,16,8,8): its output would be 0x0",
    ),
    (
        "  conv(8, 5, dilation=2)",
        ShapeError,
        2,
        3,
        "conv kernel 5x5 (dilated to 9x9) is larger than its input 8x8",
    ),
    (
        "  conv(8, 11, pad=1)",
        ShapeError,
        2,
        3,
        "conv kernel 11x11 is larger than its padded input 10x10 (N,16,8,8): "
        "its output would be 0x0",
    ),
    (
        "  maxpool(2) -> maxpool(2) -> maxpool(2)\n  maxpool(3)",
        ShapeError,
        3,
        3,
        "maxpool kernel 3x3 is larger than its input 1x1 (N,16,1,1): its output would be 0x0",
    ),
    ("  maxpool(3, pad=3)", ShapeError, 2, 3, "maxpool padding 3,3,3,3 must be smaller than"),
    (
        "  fc(10) -> conv(4, 3)",
        LayerError,
        2,
        13,
        "conv needs a feature map N×C×L or N×C×H×W, but its input is f32[N,10]",
    ),
    ("  fc(10) -> maxpool(2)", LayerError, 2, 13, "maxpool needs a feature map"),
    ("  softmax(axis=4)", LayerError, 2, 11, "softmax axis 4 is out of range for its input"),
    (
        "  softmax(axis=0)",
        LayerError,
        2,
        11,
        "softmax over the batch axis would make each item depend on the others",
    ),
    ("  dropout(1.5)", LayerError, 2, 11, "dropout probability must be in [0, 1), got 1.5"),
    ("  c1: conv(8, 3)\n  c1: relu", LayerError, 3, 3, "name 'c1' is used twice (first at line 2)"),
    ("  x: relu", LayerError, 2, 3, "name 'x' is used twice (it names a value)"),
]


@pytest.mark.parametrize(
    ("body", "kind", "line", "col", "message"), CASES, ids=[c[4][:40] for c in CASES]
)
def test_mistake_is_reported_at_its_place(body, kind, line, col, message):
    err = compile_error(body)
    assert isinstance(err, kind)
    assert (err.location.line, err.location.col) == (line, col)
    assert err.message.startswith(message), err.message


def test_unknown_layer_suggests_the_closest_and_lists_all():
    err = compile_error("  maxpol(2)")
    assert err.hint.startswith(
        "did you mean maxpool? layers: adaptive_avgpool, adaptive_maxpool, add, affine, avgpool,"
    )
    assert ", maxpool, " in err.hint


def test_unknown_attribute_hint_shows_the_signature():
    err = compile_error("  conv(8, 3, strid=2)")
    assert err.hint == (
        "did you mean stride? conv takes: conv(out, kernel, stride=1, pad=0, "
        "dilation=1, groups=1, bias=true)"
    )


def test_1d_layer_with_a_2d_padding_tuple_is_rejected():
    err = compile_error("  conv(4, 3, pad=(1, 1, 1, 1))", input_shape="2x16")
    assert err.message == ("pad has 4 values; a 1-D layer takes an int or (begin, end)")


@pytest.mark.parametrize("shape", ["1x2x3x4", "0x8x8"])
def test_input_that_is_not_cxl_or_cxhxw_is_rejected_at_the_shape(shape):
    with pytest.raises(ShapeError) as info:
        cnnc.compile(f"network n(x: {shape}) {{ relu }}")
    assert info.value.location.col == 14
    assert info.value.message.startswith(f"input x is {shape}; a network takes C×L (1-D) or C×H×W")


def test_input_without_channels_is_a_syntax_error_asking_for_a_shape():
    with pytest.raises(ParseError, match="unexpected integer '3'; expected a shape such as"):
        cnnc.compile("network n(x: 3) { relu }")


def test_a_network_without_layers_is_an_error():
    with pytest.raises(LayerError, match="network n has no layers"):
        cnnc.compile("network n(x: 1x4x4) { }")


def test_a_missing_program_file_names_the_file(tmp_path):
    with pytest.raises(CnncError) as info:
        cnnc.compile(tmp_path / "absent.cnn")
    assert info.value.render() == f"{tmp_path / 'absent.cnn'}: error: file not found"


def test_a_program_that_is_not_text_is_an_error(tmp_path):
    path = tmp_path / "binary.cnn"
    path.write_bytes(b"\xff\xfe\x00network")
    with pytest.raises(CnncError, match="cannot read the program"):
        cnnc.compile(path)


def test_error_report_has_place_source_line_caret_and_hint():
    err = compile_error("  conv(8, 3)\n  maxpool(2) -> maxpool(2) -> maxpool(3)")
    assert err.render().replace("<string>", "f") == (
        "f:3:31: error: maxpool kernel 3x3 is larger than its input 1x1 (N,8,1,1): "
        "its output would be 0x0\n"
        "      maxpool(2) -> maxpool(2) -> maxpool(3)\n" + " " * (4 + 30) + "^~~~~~~~~~\n"
        "hint: drop this maxpool, use a smaller kernel, or pad its input"
    )


@pytest.mark.parametrize(
    ("written", "suggested"),
    [("Gelu", "gelu"), ("SiLU", "silu"), ("swish", "silu"), ("h_swish", "hardswish"),
     ("BatchNorm2d", "bn"), ("Conv2d", "conv"), ("sigmod", "sigmoid"), ("LeakyReLU", "leaky_relu"),
     ("ConvTranspose2d", "conv_transpose"), ("convtranspose", "conv_transpose"),
     ("deconv", "conv_transpose"), ("Upsample", "upsample"), ("interpolate", "upsample"),
     ("resize", "upsample"), ("LayerNorm", "layernorm"), ("ln", "layernorm"),
     ("GroupNorm", "groupnorm"), ("AdaptiveAvgPool2d", "adaptive_avgpool"),
     ("StochasticDepth", "drop_path"), ("ReflectionPad2d", "pad"), ("chunk", "split")],
)  # fmt: skip
def test_an_unknown_layer_named_as_elsewhere_suggests_cnnc_s_name(written, suggested):
    err = compile_error(f"  {written}")
    assert err.hint.startswith(f"did you mean {suggested}? ")


@pytest.mark.parametrize("written", ["zzz", "pool", "norm", "activation"])
def test_an_unknown_layer_gets_no_suggestion_that_is_merely_similar(written):
    err = compile_error(f"  {written}")
    assert err.hint.startswith("layers: ")
