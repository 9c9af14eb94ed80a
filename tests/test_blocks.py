"""Branching networks: named values, merges, blocks, repetition, sequences, and their errors."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import EXAMPLES, run_cnnc
from helpers import assert_agree, ort_session

import cnnc
from cnnc.errors import CnncError, LayerError, ShapeError
from cnnc.ops import get_op
from cnnc.passes import manager

RESIDUAL = """
block basic(c, stride=1) {
    y = in -> conv1: conv(c, 3, stride=stride, pad=1) -> bn1: bn -> relu
           -> conv2: conv(c, 3, pad=1) -> bn2: bn
    add(y, in) -> relu
}
network net(image: 4x8x8) {
    stem: conv(4, 3, pad=1) -> relu
    layer1: basic(4) * 2
    gap -> fc: fc(3)
}
"""


def compile0(text: str, **kw) -> cnnc.Model:
    return cnnc.compile(text, opt_level=0, **kw)


def names(model: cnnc.Model) -> list[str]:
    return [n.name for n in model.graph.nodes]


def labels(model: cnnc.Model) -> list[str]:
    return [get_op(n.op).label(n) for n in model.graph.nodes]


def error_of(text: str) -> CnncError:
    with pytest.raises(CnncError) as info:
        compile0(text)
    return info.value


# ---- values and merges -----------------------------------------------------------------------


def test_a_statement_can_bind_a_value_and_a_later_one_start_from_it():
    model = compile0("""network n(x: 2x6x6) {
        a = conv(4, 1) -> relu
        b = x -> conv(4, 3, pad=1)
        add(a, b)
    }""")
    add = model.graph.nodes[-1]
    assert add.op == "add"
    assert [v.producer.op for v in add.inputs] == ["relu", "conv"]
    assert model.graph.nodes[2].inputs[0] is model.graph.inputs[0]


def test_a_statement_without_a_source_continues_from_the_previous_value():
    model = compile0("network n(x: 2x6x6) {\n y = conv(4, 1)\n relu\n}")
    assert model.graph.nodes[1].inputs[0].name == "conv1"


def test_concat_joins_channels():
    model = compile0(
        "network n(x: 2x6x6) { a = conv(3, 1)\n b = x -> conv(5, 1)\n concat(a, b, x) }"
    )
    assert model.graph.outputs[0].type.shape == ("N", 10, 6, 6)


def test_add_of_different_shapes_shows_both_shapes():
    err = error_of("network n(x: 2x6x6) {\n a = conv(3, 1)\n add(a, x)\n}")
    assert isinstance(err, ShapeError)
    assert (err.location.line, err.location.col) == (3, 2)
    assert err.message == (
        "add needs shapes that broadcast, got (N,3,6,6) and (N,2,6,6): the channels differ "
        "(3 and 2), and neither is 1"
    )


def test_concat_of_different_sizes_shows_both_shapes():
    err = error_of("network n(x: 2x6x6) {\n a = conv(3, 3)\n concat(x, a)\n}")
    assert err.message == (
        "concat joins channels and needs equal sizes otherwise, got (N,2,6,6) and (N,3,4,4)"
    )


def test_a_merge_needs_two_values():
    err = error_of("network n(x: 2x6x6) { add(x) }")
    assert err.message == "add needs at least two values, got 1"


def test_a_merge_takes_values_not_numbers():
    err = error_of("network n(x: 2x6x6) { add(x, 3) }")
    assert err.message == "add takes names of values, got 3"


# ---- blocks ----------------------------------------------------------------------------------


def test_layers_in_blocks_get_dotted_names_and_repetition_numbers_instances():
    model = compile0(RESIDUAL)
    params = list(model.graph.params)
    assert "layer1.0.conv1.weight" in params and "layer1.1.bn2.running_var" in params
    assert names(model)[:4] == ["stem", "stem.relu", "layer1.0.conv1", "layer1.0.bn1"]
    assert "layer1.1.add1" in names(model)


def test_a_sequence_numbers_its_steps_like_torch_sequential():
    model = compile0(
        RESIDUAL.replace("layer1: basic(4) * 2", "layer1: [basic(4), relu, basic(4) * 2]")
    )
    instances = sorted(
        {n.name.split(".")[1] for n in model.graph.nodes if n.name.startswith("layer1.")}
    )
    assert instances == ["0", "1", "2", "3"]
    assert model.graph.nodes[[n.name for n in model.graph.nodes].index("layer1.1")].op == "relu"


def test_block_defaults_may_use_earlier_parameters():
    model = compile0("""block b(c, mid=c // 2) { m: conv(mid, 1) -> o: conv(c, 1) }
    network n(x: 8x4x4) { blk: b(8) }""")
    assert model.graph.params["blk.m.weight"].shape == (4, 8, 1, 1)


def test_arguments_are_integer_expressions_of_parameters():
    model = compile0("""block b(c, t) { e: conv(c * t + 1, 1) -> p: conv((c - 1) // 2, 1) }
    network n(x: 8x4x4) { blk: b(4, t=3) }""")
    assert model.graph.params["blk.e.weight"].shape == (13, 8, 1, 1)
    assert model.graph.params["blk.p.weight"].shape == (1, 13, 1, 1)


def test_blocks_may_call_blocks():
    model = compile0("""block unit(c) { conv: conv(c, 1) -> relu }
    block pair(c) { a: unit(c) -> b: unit(2 * c) }
    network n(x: 3x4x4) { p: pair(4) }""")
    assert [k for k in model.graph.params if k.endswith("weight")] == [
        "p.a.conv.weight",
        "p.b.conv.weight",
    ]


def test_a_block_may_take_a_value():
    model = compile0("""block plus(other) { add(in, other) }
    network n(x: 3x4x4) { s = conv(3, 1)\n relu -> plus(s) }""")
    assert labels(model) == ["conv2d", "relu", "add"]


def test_unlabelled_block_calls_are_counted():
    model = compile0("block u() { c: conv(2, 1) }\nnetwork n(x: 2x4x4) { u -> u }")
    assert list(model.graph.params)[::2] == ["u1.c.weight", "u2.c.weight"]


# ---- mistakes at their place -----------------------------------------------------------------

MISTAKES = [
    ("network n(x: 2x4x4) {\n add(x, y)\n}", 2, 9, "undefined name 'y'"),
    (
        "network n(x: 2x4x4) {\n y = relu\n y = tanh\n}",
        3,
        2,
        "value 'y' is defined twice (first at line 2)",
    ),
    (
        "network n(x: 2x4x4) {\n relu = tanh\n}",
        2,
        2,
        "'relu' is the name of a layer; a value needs another name",
    ),
    (
        "network n(x: 2x4x4) {\n y = relu\n tanh -> y\n}",
        3,
        10,
        "'y' is a value; a value can only start a chain",
    ),
    (
        "block b(c) { conv(c, 1) }\nnetwork n(x: 2x4x4) {\n b(2, 3)\n}",
        3,
        7,
        "block b takes 1 parameter, got more",
    ),
    (
        "block b(c) { conv(c, 1) }\nnetwork n(x: 2x4x4) {\n b(k=2)\n}",
        3,
        4,
        "block b has no parameter 'k'",
    ),
    ("block b(c) { conv(c, 1) }\nnetwork n(x: 2x4x4) {\n b\n}", 3, 2, "block b needs parameter c"),
    (
        "block b(c) { b(c) }\nnetwork n(x: 2x4x4) {\n b(1)\n}",
        1,
        14,
        "block b calls itself (b -> b)",
    ),
    (
        "block a() { b }\nblock b() { a }\nnetwork n(x: 2x4x4) {\n a\n}",
        2,
        13,
        "block a calls itself (a -> b -> a)",
    ),
    (
        "network n(x: 2x4x4) {\n relu * 0\n}",
        2,
        9,
        "a repetition count must be a positive integer, got 0",
    ),
    ("block b(c) { conv(c // 0, 1) }\nnetwork n(x: 2x4x4) {\n b(2)\n}", 1, 19, "division by zero"),
    (
        "block b(c) { conv(c * same, 1) }\nnetwork n(x: 2x4x4) {\n b(2)\n}",
        1,
        19,
        "* needs numbers, got 2 and 'same'",
    ),
    (
        "block b(c) { conv(c, 1) }\nblock b(d) { relu }\nnetwork n(x: 2x4x4) { b(1) }",
        2,
        7,
        "block 'b' is defined twice (first at line 1)",
    ),
    (
        "block conv(c) { relu }\nnetwork n(x: 2x4x4) { relu }",
        1,
        7,
        "block 'conv' has the name of a layer",
    ),
]


@pytest.mark.parametrize(
    ("text", "line", "col", "message"), MISTAKES, ids=[m[3][:40] for m in MISTAKES]
)
def test_mistake_in_a_branching_program_is_reported_at_its_place(text, line, col, message):
    err = error_of(text)
    assert isinstance(err, LayerError | ShapeError)
    assert err.message.startswith(message), err.message
    assert (err.location.line, err.location.col) == (line, col)


def test_an_error_inside_a_block_says_where_the_block_was_called():
    err = error_of("""block b(c) {\n  conv(c, 9)\n}
network n(x: 2x4x4) {\n  blk: b(3)\n}""")
    assert err.location.line == 2
    assert err.notes == ["in blk: b(3), called at <string>:5:8"]
    assert err.render().endswith("note: in blk: b(3), called at <string>:5:8")


def test_an_unused_value_is_a_warning_at_its_place():
    model = compile0("network n(x: 2x4x4) {\n  y = conv(2, 1)\n  x -> relu\n}")
    (warning,) = model.warnings
    assert warning.render().splitlines()[0] == "<string>:2:3: warning: value 'y' is never used"


def test_an_unused_value_in_a_block_warns_once_for_all_its_instances():
    model = compile0("block b() { y = relu\n in -> tanh }\nnetwork n(x: 2x4x4) { b * 3 }")
    assert len(model.warnings) == 1


def test_the_command_line_prints_warnings_and_still_succeeds(write_program):
    path = write_program("network n(x: 2x4x4) {\n  y = conv(2, 1)\n  x -> relu\n}")
    proc = run_cnnc("dump", path)
    assert proc.returncode == 0
    assert f"{path}:2:3: warning: value 'y' is never used" in proc.stderr


# ---- passes on branching graphs --------------------------------------------------------------


def test_fold_bn_and_fusion_work_inside_blocks_and_before_merges():
    model = cnnc.compile(RESIDUAL)
    assert "bn" not in labels(model)
    assert labels(model).count("conv2d+relu") == 3  # stem and both blocks' conv1
    assert labels(model).count("add") == 2


def test_a_conv_whose_output_is_shared_is_not_fused():
    text = """network n(x: 2x6x6) {
        y = conv(2, 1)
        r = y -> relu
        add(r, y)
    }"""
    assert labels(cnnc.compile(text)) == ["conv2d", "relu", "add"]


def test_a_bn_after_an_add_is_not_folded():
    text = "network n(x: 2x6x6) {\n y = conv(2, 1)\n add(y, x) -> bn\n}"
    model = cnnc.compile(text, passes=["fold-bn"])
    assert labels(model) == ["conv2d", "add", "bn"]


def test_a_bn_whose_conv_output_is_shared_is_not_folded():
    text = "network n(x: 2x6x6) {\n y = conv(2, 1)\n z = y -> bn\n add(y, z)\n}"
    assert labels(cnnc.compile(text)) == ["conv2d", "bn", "add"]


@pytest.mark.parametrize("level", [0, 2])
def test_branching_programs_agree_with_onnxruntime(level):
    model = cnnc.compile(RESIDUAL, opt_level=level)
    x = model.random_input(2)
    y = ort_session(model.to_onnx()).run(None, {"image": x})[0]
    assert_agree(model.run(x), y)
    assert_agree(cnnc.compile(RESIDUAL, opt_level=0).run(x), y)


def test_verify_each_holds_on_every_branching_example():
    for name in ("resnet18", "squeezenet", "mobilenet_v2"):
        cnnc.compile(EXAMPLES / f"{name}.cnn", pass_options=manager.Options(verify_each=True))


# ---- weights by PyTorch's names --------------------------------------------------------------


def torchvision_resnet18_state_dict(rng) -> dict[str, np.ndarray]:
    """Every tensor of torchvision's resnet18().state_dict(), by name and shape."""
    tensors = {"conv1.weight": (64, 3, 7, 7)}

    def bn(prefix, c):
        for t in ("weight", "bias", "running_mean", "running_var"):
            tensors[f"{prefix}.{t}"] = (c,)
        tensors[f"{prefix}.num_batches_tracked"] = ()

    bn("bn1", 64)
    cin = 64
    for layer, c in enumerate((64, 128, 256, 512), start=1):
        for block in (0, 1):
            p = f"layer{layer}.{block}"
            tensors[f"{p}.conv1.weight"] = (c, cin if block == 0 else c, 3, 3)
            bn(f"{p}.bn1", c)
            tensors[f"{p}.conv2.weight"] = (c, c, 3, 3)
            bn(f"{p}.bn2", c)
            if block == 0 and layer > 1:
                tensors[f"{p}.downsample.0.weight"] = (c, cin, 1, 1)
                bn(f"{p}.downsample.1", c)
        cin = c
    tensors["fc.weight"] = (1000, 512)
    tensors["fc.bias"] = (1000,)
    out = {}
    for name, shape in tensors.items():
        if name.endswith("num_batches_tracked"):
            out[name] = np.array(10, np.int64)
        elif name.endswith("running_var"):
            out[name] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
        else:
            out[name] = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    return out


def test_a_torchvision_resnet18_state_dict_loads_by_name(tmp_path):
    tensors = torchvision_resnet18_state_dict(np.random.default_rng(0))
    assert len(tensors) == 122
    np.savez(tmp_path / "resnet18.npz", **tensors)
    model = cnnc.compile(EXAMPLES / "resnet18.cnn", weights=tmp_path / "resnet18.npz", opt_level=0)
    learned = {k: v for k, v in tensors.items() if not k.endswith("num_batches_tracked")}
    assert set(model.graph.params) == set(learned)
    for name, array in learned.items():
        np.testing.assert_array_equal(model.graph.params[name].data, array)
    node = next(n for n in model.graph.nodes if n.name == "layer2.0.downsample.0")
    assert node.op == "conv" and node.inputs[1].name == "layer2.0.downsample.0.weight"
    assert node.attrs["stride"] == (2, 2)


def test_loaded_resnet18_runs_the_same_in_both_backends_after_optimization(tmp_path):
    np.savez(tmp_path / "w.npz", **torchvision_resnet18_state_dict(np.random.default_rng(1)))
    model = cnnc.compile(EXAMPLES / "resnet18.cnn", weights=tmp_path / "w.npz")
    x = model.random_input(1)
    reference = cnnc.compile(
        EXAMPLES / "resnet18.cnn", weights=tmp_path / "w.npz", opt_level=0
    ).run(x)
    assert_agree(model.run(x), reference)
    assert_agree(ort_session(model.to_onnx()).run(None, {"image": x})[0], reference)
