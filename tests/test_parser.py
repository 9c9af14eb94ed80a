"""The parser: valid programs give the expected AST; invalid ones fail at their line and column."""

from __future__ import annotations

import pytest

import cnnc
from cnnc.errors import ParseError
from cnnc.frontend.parser import BinOp, Literal, Name, Neg, TupleExpr


def plain(expr):
    """An argument expression as plain Python data, for comparisons."""
    if isinstance(expr, Literal):
        return expr.value
    if isinstance(expr, Name):
        return expr.id
    if isinstance(expr, Neg):
        return ("-", plain(expr.operand))
    if isinstance(expr, TupleExpr):
        return tuple(plain(i) for i in expr.items)
    if isinstance(expr, BinOp):
        return (expr.op, plain(expr.left), plain(expr.right))
    raise AssertionError(expr)


LENET = """\
# a comment before the network
network lenet5(image: 1x28x28) {
    c1: conv(6, kernel=5, pad=2) -> relu -> maxpool(2)   # trailing comment
    f3: fc(10) -> softmax
}
"""


def test_a_network_has_its_input_shape_and_one_statement_per_chain():
    (net,) = cnnc.parse(LENET).networks
    assert (net.name, net.input_name, net.input_shape) == ("lenet5", "image", (1, 28, 28))
    assert [[link.call.name for link in s.links] for s in net.statements] == [
        ["conv", "relu", "maxpool"],
        ["fc", "softmax"],
    ]


def test_labels_name_layers_and_unlabelled_layers_have_none():
    (net,) = cnnc.parse(LENET).networks
    assert [link.label for link in net.statements[0].links] == ["c1", None, None]


def test_arguments_keep_their_order_names_and_values():
    (net,) = cnnc.parse(LENET).networks
    args = net.statements[0].links[0].call.args
    assert [(a.name, plain(a.value)) for a in args] == [(None, 6), ("kernel", 5), ("pad", 2)]


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("3", 3),
        ("-1", ("-", 1)),
        ("0.5", 0.5),
        ("1e-5", 1e-5),
        ("(1, 2)", (1, 2)),
        ("(0, 1, 2, 3)", (0, 1, 2, 3)),
        ("3x5", (3, 5)),
        ("same", "same"),
        ("true", "true"),
    ],
)
def test_argument_values_of_every_form(text, value):
    (net,) = cnnc.parse(f"network n(x: 1x8x8) {{ layer(a={text}) }}").networks
    assert plain(net.statements[0].links[0].call.args[0].value) == value


def test_newlines_do_not_matter_so_a_chain_may_break_after_an_arrow():
    text = "network n(x: 1x8x8) {\n conv(2, 3) ->\n   relu\n maxpool(2) }"
    (net,) = cnnc.parse(text).networks
    assert [len(s.links) for s in net.statements] == [2, 1]


def test_locations_point_at_the_call_and_its_arguments():
    (net,) = cnnc.parse(LENET, "lenet5.cnn").networks
    call = net.statements[0].links[0].call
    assert (call.loc.line, call.loc.col, call.loc.end_col) == (3, 9, 33)
    assert str(call.args[1].loc) == "lenet5.cnn:3:17"


def test_a_program_may_define_several_networks():
    text = "network a(x: 1x4) { relu }\nnetwork b(x: 1x4) { tanh }"
    assert [n.name for n in cnnc.parse(text).networks] == ["a", "b"]


@pytest.mark.parametrize(
    ("text", "line", "col", "message"),
    [
        (
            "network n(x: 1x8x8) {\n  conv(8, 3 stride=1)\n}",
            2,
            13,
            "unexpected name 'stride'; expected ')' or ','",
        ),
        (
            "network n(x: 1x8x8) {\n  conv(8, 3)\n",
            2,
            13,
            "unexpected end of file; expected '->', '[', '}' or a name",
        ),
        ("network n(x 1x8x8) { relu }", 1, 13, "unexpected shape '1x8x8'; expected ':'"),
        (
            "network n(x: 1x8x8) {\n  relu -> -> relu\n}",
            2,
            11,
            "unexpected '->'; expected '[' or a name",
        ),
        ("network n(x: 1x8x8) {\n  conv(8, $)\n}", 2, 11, "unexpected character '$'"),
        ("net n(x: 1x8x8) { relu }", 1, 1, "unexpected name 'net'; expected 'block' or 'network'"),
        ("network n(x: 1x8x8) {\n  conv(8, 3,)\n}", 2, 13, "unexpected ')'"),
    ],
    ids=[
        "missing-comma",
        "missing-brace",
        "missing-colon",
        "double-arrow",
        "bad-character",
        "bad-keyword",
        "trailing-comma",
    ],
)
def test_syntax_error_is_reported_at_its_line_and_column(text, line, col, message):
    with pytest.raises(ParseError) as info:
        cnnc.parse(text, "bad.cnn")
    err = info.value
    assert (err.location.line, err.location.col) == (line, col)
    assert err.message.startswith(message)
    assert err.render().startswith(f"bad.cnn:{line}:{col}: error: {message}")


def test_syntax_error_report_shows_the_line_and_a_caret_under_the_token():
    with pytest.raises(ParseError) as info:
        cnnc.parse("network n(x: 1x8x8) {\n  conv(8, 3 stride=1)\n}", "bad.cnn")
    lines = info.value.render().splitlines()
    assert lines[1:3] == ["      conv(8, 3 stride=1)", "                ^~~~~~"]


def test_a_label_part_may_be_a_name_a_hyphen_and_a_number():
    model = cnnc.compile(
        "network n(x: 3x8x8) {\n trunk.block1.block1-0: conv(4, 3) -> b1-2: relu\n conv(8-1, 1)\n}",
        opt_level=0,
    )
    assert [n.name for n in model.graph.nodes] == ["trunk.block1.block1-0", "b1-2", "conv2"]
    assert "trunk.block1.block1-0.weight" in model.graph.params
    assert model.graph.outputs[0].shape == ("N", 7, 6, 6)  # 8-1 stays arithmetic


def test_the_built_parser_is_cached_only_in_a_folder_of_the_users_own(tmp_path, monkeypatch):
    # lark unpickles its cache file: never one in a folder that others may write.
    import os
    import stat

    from cnnc.frontend.parser import _cache_file

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = _cache_file()
    assert os.path.dirname(path) == str(tmp_path / "cnnc")
    assert not os.stat(tmp_path / "cnnc").st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    os.chmod(tmp_path / "cnnc", 0o777)
    assert _cache_file() is False
    os.chmod(tmp_path / "cnnc", 0o700)
    os.rmdir(tmp_path / "cnnc")
    (tmp_path / "cnnc").write_text("not a folder")
    assert _cache_file() is False
