"""Limits on programs, models and runs: each bomb and each size no array can hold is refused
with one positioned message (README, "Limits"), and each liftable limit lifts."""

from __future__ import annotations

import re

import onnx
import pytest
from onnx import TensorProto, helper

import cnnc
from cnnc.cli import main
from cnnc.errors import LayerError, ModelFileError, ParseError, ShapeError, UsageError
from cnnc.limits import Limits, run_memory

NET = "network n(x: 1x8x8) {{ {} }}"


def refused(kind, text: str, **kwargs):
    """The error compiling ``text`` raises (it must be of ``kind``)."""
    with pytest.raises(kind) as info:
        cnnc.compile(text, **kwargs)
    return info.value


def column_of(text: str, part: str) -> int:
    return text.index(part) + 1


# ---- repetition and expansion ---------------------------------------------------------------


def test_a_huge_repetition_count_is_refused_at_the_count():
    text = NET.format("relu * 1000000000000")
    e = refused(LayerError, text)
    assert e.message == (
        "the repetition count is 1,000,000,000,000, more than the limit of 10,000 (repeat)"
    )
    assert (e.location.line, e.location.col) == (1, column_of(text, "1000000000000"))
    assert "--limit repeat=1000000000000" in e.hint


def test_a_repeated_block_and_a_repeated_conv_are_refused_at_the_count():
    e = refused(LayerError, "block b(c) { relu }\n" + NET.format("b(3) * 1000000"))
    assert "repetition count is 1,000,000" in e.message and e.location.line == 2
    e = refused(LayerError, NET.format("conv(8, 3, pad=1) * 100000"))
    assert "repetition count is 100,000" in e.message


def test_nested_repetitions_are_refused_after_their_first_instances():
    text = "block a() { relu * 1000 }\nblock b() { a * 1000 }\nnetwork n(x: 1x8x8) { b * 1000 }"
    e = refused(LayerError, text)
    # Two instances of a (1,000 layers each) show that a * 1000 would make 1,000,000.
    assert e.message == (
        "its repetitions would give the network 1,000,000 layers (IR nodes), more than the "
        "limit of 100,000 layers (IR nodes) (layers)"
    )
    assert (e.location.line, e.location.col) == (2, column_of("block b() { a * 1000 }", "1000"))
    assert "--limit layers=1000000" in e.hint


def test_the_layers_estimate_of_a_repetition_is_made_on_its_second_instance():
    # The first fc after a feature map adds a flatten (2 nodes), the others 1 each: fc(10)
    # * 6 has 7 nodes, not the 12 its first instance would predict.
    text = "network n(x: 3x4x4) {{ fc(10) * {} }}"
    assert len(cnnc.compile(text.format(6), opt_level=0, limits={"layers": 7}).graph.nodes) == 7
    e = refused(LayerError, text.format(7), opt_level=0, limits={"layers": 7})
    assert e.message.startswith("its repetitions would give the network 8 layers (IR nodes)")


def test_the_layers_limit_counts_every_layer_and_lifts():
    text = NET.format(" -> ".join(["relu"] * 10))
    e = refused(LayerError, text, limits={"layers": 9})
    assert e.message == (
        "the network has 10 layers (IR nodes), more than the limit of 9 layers (IR nodes) (layers)"
    )
    assert e.location.col == text.rindex("relu") + 1
    assert len(cnnc.compile(text, opt_level=0, limits={"layers": 10}).graph.nodes) == 10


def test_the_repeat_limit_lifts_in_the_api():
    text = NET.format("relu * 12")
    refused(LayerError, text, limits=Limits(repeat=11))
    assert len(cnnc.compile(text, opt_level=0, limits=Limits(repeat=12)).graph.nodes) == 12


# ---- operands ---------------------------------------------------------------------------------


def test_a_merge_of_10000_operands_compiles():
    # Binding its arguments was quadratic: 8,000 took 3.4 s.
    many = "y = relu\n    add(" + ", ".join(["y"] * 10_000) + ")"
    model = cnnc.compile(NET.format(many), opt_level=0)
    assert len(model.graph.nodes[-1].inputs) == 10_000


def test_a_merge_of_100000_operands_is_refused_at_the_10001st_while_parsing():
    text = NET.format("y = relu\n    add(" + ", ".join(["y"] * 100_000) + ")")
    e = refused(ParseError, text)
    assert e.message == (
        "this call has at least 10,001 arguments, more than the limit of 10,000 arguments "
        "(operands)"
    )
    assert (e.location.line, e.location.col) == (2, len("    add(") + 10_000 * 3 + 1)


def test_the_operands_limit_refuses_at_the_first_operand_past_it_and_lifts():
    text = NET.format("y = relu\n    add(y, y, y, y)")
    e = refused(ParseError, text, limits={"operands": 3})
    assert e.message == (
        "this call has at least 4 arguments, more than the limit of 3 arguments (operands)"
    )
    assert (e.location.line, e.location.col) == (2, len("    add(y, y, y, ") + 1)
    assert "--limit operands=4" in e.hint
    assert cnnc.compile(text, limits={"operands": 4}).graph.nodes[-1].op == "add"


# ---- the parser -----------------------------------------------------------------------------


def test_an_integer_of_4301_digits_is_a_parse_error_at_it():
    text = NET.format("conv(" + "9" * 4301 + ", 3)")
    e = refused(ParseError, text)
    assert e.message == "integer 99999999999999999999... (4,301 digits) does not fit in 64 bits"
    assert e.location.col == column_of(text, "999")


def test_integers_are_int64():
    e = refused(ParseError, NET.format(f"conv(8, 3, stride={2**63})"))
    assert e.message == "integer 9223372036854775808 does not fit in 64 bits"
    refused(ParseError, NET.format(f"conv({2**63}, 3)"))
    refused(ParseError, f"network n(x: 1x{2**63}) {{ relu }}")
    # The largest int64 is a legal stride: one window.
    model = cnnc.compile(NET.format(f"conv(8, 3, stride={2**63 - 1})"))
    assert model.run(model.random_input()).shape == (1, 8, 1, 1)


def test_arithmetic_past_int64_is_refused_at_the_expression():
    text = NET.format("conv(4611686018427387904 * 2, 3)")
    e = refused(LayerError, text)
    assert (
        e.message
        == "the value of this expression does not fit in 64 bits (it is about 2**63 in size)"
    )
    assert e.location.col == column_of(text, "4611")


def test_a_float_literal_past_float64_is_a_parse_error():
    e = refused(ParseError, NET.format("leaky_relu(1e999)"))
    assert e.message == "number 1e999 is too large for a 64-bit float"


def test_485_nested_minus_signs_are_refused_and_the_limit_lifts():
    text = NET.format("conv(" + "-" * 484 + "3, 3)")
    e = refused(ParseError, text)
    assert e.message == (
        "this expression is nested 101 levels deep, more than the limit of 100 levels deep "
        "(expr_depth)"
    )
    assert "--limit expr_depth=" in e.hint
    # An even count of minus signs is 3; past the default, lifted.
    assert cnnc.compile(text, limits={"expr_depth": 500}).graph.nodes[0].output.shape[1] == 3


def test_a_sum_of_100000_terms_is_refused_at_its_101st_term():
    text = NET.format("conv(" + "+".join(["1"] * 100_000) + ", 3)")
    e = refused(ParseError, text)
    assert "nested 101 levels deep" in e.message
    assert e.location.col == column_of(text, "1+")
    assert e.location.end_col == e.location.col + len("+".join(["1"] * 101))


def test_100_nested_expressions_are_fine():
    text = NET.format("conv(" + "(" * 99 + "8" + " + 0)" * 99 + ", 3)")
    assert cnnc.compile(text).graph.nodes[0].output.shape[1] == 8


def test_the_program_size_limit():
    text = NET.format("relu")
    e = refused(ParseError, text, limits={"program_bytes": 20})
    assert e.message == (
        f"the program text is {len(text)} bytes, more than the limit of 20 bytes (program_bytes)"
    )


def test_a_program_file_past_the_size_limit_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "big.cnn"
    path.write_text(NET.format("relu") + "#" * 1000)
    with pytest.raises(cnnc.CnncError) as info:
        cnnc.compile(path, limits={"program_bytes": 1000})
    assert info.value.where == str(path) and "program_bytes" in info.value.message


# ---- blocks -----------------------------------------------------------------------------------


def chain_of_blocks(depth: int) -> str:
    blocks = [f"block b{i}() {{ b{i + 1} }}" for i in range(depth - 1)]
    return "\n".join([*blocks, f"block b{depth - 1}() {{ relu }}", "network n(x: 1x8x8) { b0 }"])


def test_blocks_nested_198_deep_are_refused_at_depth_101():
    e = refused(LayerError, chain_of_blocks(198))
    assert e.message == (
        "blocks calling blocks reach b100 at depth 101, more than the limit of 100 (block_depth)"
    )
    assert e.location.line == 100
    # The notes say where the innermost and outermost calls are, not all hundred.
    notes = [line for line in e.render().splitlines() if line.startswith("note:")]
    assert len(notes) == 6 and notes[3] == "note: ... 95 more calls ..."
    assert notes[-1] == "note: in b0_1: b0(), called at <string>:199:23"


def test_blocks_nested_100_deep_compile_and_the_limit_lifts_without_recursion_errors():
    (node,) = cnnc.compile(chain_of_blocks(100)).graph.nodes
    assert node.name.count(".") == 100 and node.name.endswith("b98_1.b99_1.relu1")
    graph = cnnc.compile(chain_of_blocks(600), limits={"block_depth": 600}).graph
    assert len(graph.nodes) == 1


# ---- sizes ------------------------------------------------------------------------------------


def test_parameter_bytes_are_refused_at_the_layer_that_passes_the_limit():
    text = NET.format("conv(1000000, 3) -> conv(1000000, 3)")
    e = refused(LayerError, text)
    assert e.message == (
        "with conv2.weight f32[1000000,1000000,3,3], the parameters of network n would take "
        "36,000,040,000,000 bytes (32.7 TiB), more than the limit of 17,179,869,184 bytes "
        "(16.0 GiB) (param_bytes)"
    )
    assert e.location.col == column_of(text, "conv(1000000, 3) ->") + len("conv(1000000, 3) -> ")


def test_the_parameter_bytes_limit_lifts():
    text = NET.format("conv(100, 3) -> conv(100, 3)")
    refused(LayerError, text, limits={"param_bytes": 300_000})
    assert (
        cnnc.compile(text, limits={"param_bytes": 400_000}).param_count()
        == 100 * 9 + 100 + 100 * 100 * 9 + 100
    )


def test_a_padding_past_int64_sizes_is_a_shape_error_at_the_layer():
    text = NET.format("conv(8, 3, pad=1000000000000)")
    e = refused(ShapeError, text)
    assert e.message == (
        "a tensor f32[N,8,2000000000006,2000000000006] would take "
        "128,000,000,000,768,000,000,001,152 bytes per batch item, more than 2**63-1, the "
        "most NumPy and ONNX can address"
    )
    assert e.location.col == column_of(text, "conv")


def test_channels_past_int64_sizes_are_refused():
    e = refused(ShapeError, NET.format(f"conv({2**63 - 1}, 3)"))
    assert "f32[9223372036854775807,1,3,3]" in e.message


def test_an_input_larger_than_numpy_can_hold_is_refused_at_its_shape():
    text = "network n(x: 10000000x10000000x1000000) { flatten -> fc(2) }"
    e = refused(ShapeError, text)
    assert e.message.startswith("a tensor f32[N,10000000,10000000,1000000] would take")
    assert e.location.col == column_of(text, "10000000x")


def test_a_dump_of_a_huge_legal_network_shows_exact_counts():
    text = "network n(x: 1000000x1000000x1000) { flatten -> fc(2) }"
    model = cnnc.compile(text, limits={"param_bytes": 2**62})
    assert "params 2 tensors, 2,000,000,000,000,002 values" in model.dump()
    total = r"^total +2,000,000,000,000,002 +2,000,000,000,000,000 +16 B$"
    assert re.search(total, model.summary(), re.M)


def test_an_upsample_scale_past_float_range_is_a_shape_error():
    e = refused(ShapeError, NET.format("upsample(scale=1e308)"))
    assert e.message == "scale 1e+308 makes an output size past any float (inf)"


# ---- ONNX -------------------------------------------------------------------------------------


def onnx_relu(path, shape):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="r")], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_an_onnx_input_dimension_of_2_62_is_refused_by_load(tmp_path):
    path = onnx_relu(tmp_path / "big.onnx", [1, 1, 2**62, 1])
    with pytest.raises(ModelFileError) as info:
        cnnc.load(path)
    assert info.value.where == str(path)
    assert info.value.message == (
        "input x: a tensor f32[1,1,4611686018427387904,1] would take "
        "18,446,744,073,709,551,616 bytes, more than 2**63-1, the most NumPy and ONNX can "
        "address"
    )


def test_an_onnx_attribute_making_a_size_past_int64_is_refused_at_its_node(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 8, 8])
    w = helper.make_tensor("w", TensorProto.FLOAT, [2, 1, 3, 3], [0.5] * 18)
    conv = helper.make_node("Conv", ["x", "w"], ["y"], name="c1", pads=[2**62] * 4)
    graph = helper.make_graph([conv], "g", [x], [y], [w])
    path = tmp_path / "pads.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(ModelFileError) as info:
        cnnc.load(path)
    assert info.value.where == f"{path}: node c1 (Conv)"
    assert "is larger than 2**63-1" in info.value.message


def test_onnx_initializers_past_the_parameter_limit_are_refused_before_they_are_read(
    tmp_path,
):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    w = helper.make_tensor("w", TensorProto.FLOAT, [2, 4], [1.0] * 8)
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g", [x], [y], [w])
    path = tmp_path / "w.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(ModelFileError) as info:
        cnnc.load(path, limits={"param_bytes": 16})
    assert info.value.where == str(path)
    assert info.value.message == (
        "with initializer w [2x4], the model's initializers take 32 bytes, more than the "
        "limit of 16 bytes (param_bytes)"
    )


# ---- running ----------------------------------------------------------------------------------


def test_a_run_that_cannot_fit_in_memory_is_refused_before_anything_is_made():
    model = cnnc.compile("network n(x: 3x100000x100000) { conv(8, 3) -> relu }")
    need, where = run_memory(model.graph, 1)
    # The input, the conv's output and its padded-copy workspace, and the weights.
    assert need == 3 * 10**10 * 4 * 2 + 8 * 99998**2 * 4 + (8 * 27 + 8) * 4
    assert where == "node conv1 (conv)"
    with pytest.raises(UsageError) as info:
        model.random_input()
    assert info.value.message.startswith(f"running n on a batch of 1 needs about {need:,} bytes")


def test_the_memory_limit_refuses_a_run_and_lifts():
    text = NET.format("conv(8, 3) -> relu")
    model = cnnc.compile(text, limits={"memory": 1000})
    x = cnnc.compile(text).random_input(batch=2)
    for backend in cnnc.api.BACKENDS:
        with pytest.raises(UsageError) as info:
            model.run(x, backend=backend)
        assert "more than the limit of 1,000 bytes (memory)" in info.value.message
    assert cnnc.compile(text, limits={"memory": 10**6}).run(x).shape == (2, 8, 6, 6)


def test_an_unknown_limit_is_a_usage_error_listing_the_names():
    with pytest.raises(UsageError) as info:
        cnnc.compile(NET.format("relu"), limits={"repeats": 5})
    assert info.value.message == "unknown limit 'repeats'"
    assert info.value.hint == (
        "the limits are: repeat, layers, operands, expr_depth, block_depth, program_bytes, "
        "param_bytes, memory"
    )


# ---- the command line -------------------------------------------------------------------------


def test_the_cli_refuses_a_bomb_with_one_message_and_lifts_the_limit(write_program, capsys):
    path = write_program(NET.format("relu * 10001"))
    assert main(["summary", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{path}:1:30: error: the repetition count is 10,001, more than")
    assert err.count("error:") == 1 and "Traceback" not in err
    assert "hint: lift it with --limit repeat=11000" in err
    assert main(["summary", str(path), "--limit", "repeat=20000", "-O0"]) == 0
    # the 10,001 relus are block relu1 of layers 0 to 10000
    assert re.search(r"^  10000 +relu ", capsys.readouterr().out, re.M)


def test_the_cli_takes_sizes_with_suffixes_and_refuses_unknown_names(write_program, capsys):
    path = write_program(NET.format("relu"))
    assert main(["dump", str(path), "--limit", "param_bytes=1Gi", "--limit", "memory=2G"]) == 0
    capsys.readouterr()
    assert main(["dump", str(path), "--limit", "bogus=1"]) == 1
    assert capsys.readouterr().err.startswith("error: unknown limit 'bogus'\nhint: the limits")
    assert main(["dump", str(path), "--limit", "repeat"]) == 1
    assert "--limit takes NAME=N" in capsys.readouterr().err


def test_the_cli_refuses_a_run_past_the_memory_limit(capsys):
    from conftest import EXAMPLES

    assert main(["run", str(EXAMPLES / "lenet5.cnn"), "--limit", "memory=100K"]) == 1
    err = capsys.readouterr().err
    assert "error: running lenet5 on a batch of 1 needs about" in err
    assert "more than the limit of 100,000 bytes (memory)" in err and "Traceback" not in err


def test_the_cli_refuses_deep_expressions_with_one_message(write_program, capsys):
    path = write_program(NET.format("conv(" + "-" * 485 + "3, 3)"))
    assert main(["dump", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{path}:1:") and "(expr_depth)" in err
    assert err.count("error:") == 1 and "Traceback" not in err


def test_the_installed_command_refuses_a_huge_onnx_input(cnnc_cli, tmp_path):
    big = onnx_relu(tmp_path / "big.onnx", [1, 1, 2**62, 1])
    done = cnnc_cli("import", big)
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith(f"{big}: error: input x: a tensor f32[1,1,4611686018427387904")
    assert done.stderr.count("error:") == 1 and "Traceback" not in done.stderr
    assert not (tmp_path / "big.cnn").exists() and not (tmp_path / "big.npz").exists()


def test_parentheses_nested_past_the_limit_are_refused_while_parsing():
    text = NET.format("conv(" + "(" * 100_000 + "8" + ")" * 100_000 + ", 3)")
    e = refused(ParseError, text)
    assert e.message == (
        "parentheses are nested 101 levels deep, more than the limit of 100 levels deep "
        "(expr_depth)"
    )
    # Refused as the lexer reads the 102nd "(" (the call's own and 101 more).
    assert e.location.col == len("network n(x: 3x8x8) { conv(") + 101
    # Parentheses alone add no level of evaluation: (a + b) is as deep as a + b.
    assert cnnc.compile(NET.format("conv(" + "(" * 100 + "8" + ")" * 100 + ", 3)"))
