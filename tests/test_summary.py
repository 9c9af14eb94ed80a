"""cnnc summary (README, `cnnc summary`): multiply-accumulates of every op counted by hand,
the tree of blocks and its subtotals, receptive fields, what a layer reads where values
branch or merge, activation memory, and the API and the command line printing the same."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import cnnc
from cnnc.cli import main
from cnnc.ir.printer import activation_peak, summary_data, summary_rows

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

EVERY_OP = """network n(x: 4x8x8) {
    c: conv(6, 3, pad=1)
    b: bn
    r: relu
    a: affine
    s: scale
    ln: layernorm
    gn: groupnorm(2)
    l: lrn(3)
    u: upsample(scale=2, mode=bilinear)
    un: upsample(scale=1)
    m: maxpool(2)
    p: avgpool(2)
    g: gap
    f: fc(5)
    sm: softmax
}"""


def layers(model, batch: int = 1) -> dict[str, dict]:
    return {r["name"]: r for r in summary_rows(model.graph, batch) if r["kind"] == "layer"}


def test_each_op_counts_the_multiply_accumulates_worked_out_by_hand():
    rows = layers(cnnc.compile(EVERY_OP, opt_level=0))
    elements = 6 * 8 * 8  # of every map before the upsample
    expected = {
        "c": 6 * 8 * 8 * 4 * 3 * 3,  # each output: its 4×3×3 window (the bias adds)
        "b": elements,  # x·s + t
        "r": 0,
        "a": elements,  # x·weight + bias
        "s.mul": elements,  # x·weight
        "ln": 3 * elements,  # square, times 1/σ, times weight plus bias
        "gn": 3 * elements,
        "l": 3 * elements,  # square, times alpha/size, division
        "u": 4 * 6 * 16 * 16,  # bilinear: 4 weighted neighbours per output
        "un": 0,  # nearest copies
        "m": 0,  # comparisons
        "p": 6 * 4 * 4,  # one division per window
        "g": 6,
        "f.flatten": 0,
        "f": 6 * 5,
        "sm": 5,  # the division by the sum
    }
    assert {name: r["macs"] for name, r in rows.items()} == expected


def test_merges_count_products_and_quotients_not_sums():
    rows = layers(
        cnnc.compile(
            "network n(x: 2x4x4) { a = x -> relu  b = x -> sigmoid  m = mul(a, b)  "
            "d = div(a, b)  s = add(a, b, m)  sub(s, d) }",
            opt_level=0,
        )
    )
    assert {name: r["macs"] for name, r in rows.items()} == {
        "relu1": 0,
        "sigmoid1": 0,
        "mul1": 32,
        "div1": 32,
        "add1": 0,
        "sub1": 0,
    }


def test_conv_and_fc_counts_are_the_products_of_their_weights():
    model = cnnc.compile(EXAMPLES / "vgg16.cnn", opt_level=0)
    rows = layers(model)
    for node in model.graph.nodes:
        if node.op == "conv":
            out, weight = node.output.type.shape, node.inputs[1].shape
            assert rows[node.name]["macs"] == out[1] * out[2] * out[3] * weight[1] * 9
        if node.op == "fc":
            assert rows[node.name]["macs"] == node.inputs[1].shape[0] * node.inputs[1].shape[1]
    text = model.summary()
    assert "multiply-accumulates per item: 15,470,290,408 (15.47 GMAC)" in text


def test_block_subtotals_sum_their_layers_and_the_top_level_sums_to_the_totals():
    model = cnnc.compile(EXAMPLES / "resnet18.cnn", opt_level=0)
    rows = summary_rows(model.graph)
    data = summary_data(model.graph)
    by_name = {r["name"]: r for r in rows}
    blocks = [r for r in rows if r["kind"] == "block"]
    assert {r["name"]: r["op"] for r in blocks if r["depth"] == 0} == {
        "layer1": "2×basic",
        "layer2": "block",
        "layer3": "block",
        "layer4": "block",
    }
    assert by_name["layer2.0"]["op"] == "basic_down"
    assert by_name["layer2.0.downsample"]["layers"] == 2
    for block in blocks:
        inside = [
            r for r in rows if r["kind"] == "layer" and r["name"].startswith(block["name"] + ".")
        ]
        assert block["layers"] == len(inside)
        for key in ("params", "macs", "bytes"):
            assert block[key] == sum(r[key] for r in inside), (block["name"], key)
    top = [r for r in rows if r["depth"] == 0]
    for key in ("params", "macs", "bytes"):
        assert sum(r[key] for r in top) == data["totals"][key]
    assert data["totals"]["params"] == 11_689_512 == model.param_count()
    # Folded at depth 2: layer1's two instances show, their layers do not.
    text = model.summary(depth=2)
    assert re.search(r"^  0 +basic +\[N,64,56,56\] +\[N,64,56,56\] +73,984 ", text, re.M)
    assert not re.search(r"^    \S", text, re.M)  # nothing at depth 2
    assert re.search(r"^total +11,689,512 +1,816,557,568 +32.9 MB$", text, re.M)


def test_three_3x3_convolutions_see_7x7_and_strides_multiply():
    rows = summary_rows(
        cnnc.compile(
            "network n(x: 1x32x32) { conv(1, 3) -> conv(1, 3) -> conv(1, 3) "
            "-> conv(1, 3, stride=2) -> maxpool(2) -> conv(1, 3, dilation=2) -> flatten }",
            opt_level=0,
        ).graph
    )
    fields = [(r["receptive_field"], r["output_stride"]) for r in rows]
    assert fields == [
        ([3, 3], [1, 1]),
        ([5, 5], [1, 1]),
        ([7, 7], [1, 1]),
        ([9, 9], [2, 2]),
        ([11, 11], [4, 4]),  # + (2 - 1) · 2
        ([27, 27], [4, 4]),  # + (3 - 1) · 2 · 4
        (None, None),  # a flattened map has no cells
    ]


def test_known_networks_have_their_receptive_fields():
    # VGG-16's 212 is the published one (Araujo et al., Distill 2019). For torchvision's
    # ResNets, measured in PyTorch as the extent of the input gradient of one centre cell
    # of layer4, weights made positive and max pools made average pools (a max passes its
    # gradient to one cell): 435 and 427 (Distill's 483 is ResNet-50 v1, which strides
    # elsewhere in its blocks). VGG-16 measures 212 the same way.
    cases = (("vgg16", "conv5_3.maxpool", 212), ("resnet18", "layer4", 435))
    for name, layer, field in (*cases, ("resnet50", "layer4", 427)):
        rows = {r["name"]: r for r in summary_rows(cnnc.compile(EXAMPLES / f"{name}.cnn").graph)}
        assert rows[layer]["receptive_field"] == [field, field]
        assert rows[layer]["output_stride"] == [32, 32]


def test_the_fully_conv_report_and_the_field_column_agree():
    model = cnnc.compile(EXAMPLES / "lenet5.cnn", fully_conv=True)
    last = summary_rows(model.graph)[-1]
    assert (last["receptive_field"], last["output_stride"]) == ([32, 32], [4, 4])
    assert "output stride 4x4, receptive field 32x32" in model.fully_conv_report()


RESIDUAL = """block res(c) {
    y = in -> conv(c, 3, pad=1) -> relu -> conv(c, 3, pad=1)
    add(y, in) -> relu
}
network n(x: 4x8x8) { stem: conv(4, 1) -> res(4) -> res(4) }"""


def test_connected_to_lists_what_a_merge_reads_and_nothing_for_a_chain():
    model = cnnc.compile(RESIDUAL, opt_level=0)
    rows = summary_rows(model.graph)
    reads = {r["name"]: r["connected_to"] for r in rows if r["connected_to"]}
    assert reads == {
        "stem.res.add1": ["stem.res.conv2", "stem"],
        "stem.res.2.add1": ["stem.res.2.conv2", "stem.res.relu2"],
    }
    # Two instances after a labelled layer are side by side (their names once clashed).
    assert [(r["name"], r["depth"]) for r in rows if r["kind"] == "block"] == [
        ("stem.res", 0),
        ("stem.res.2", 0),
    ]
    # The table names a value of the same block relative to it, others in full.
    text = model.summary()
    assert re.search(r"^  add1 +add .* conv2, stem$", text, re.M)
    assert re.search(r"^  add1 +add .* conv2, stem\.res\.relu2$", text, re.M)


def test_activation_memory_is_the_sum_of_output_bytes_and_the_peak_follows_last_uses():
    source = "network n(x: 1x8x8) { conv(4, 3, pad=1) -> relu -> conv(2, 3, pad=1) }"
    for level in (0, 2):
        model = cnnc.compile(source, opt_level=level)
        rows = layers(model, batch=3)
        for node in model.graph.nodes:
            (out,) = node.outputs
            assert rows[node.name]["bytes"] == 3 * out.type.numel_per_item() * 4
        # The input (256 B), the first conv's map (1,024 B; the relu runs in its buffer),
        # and the second conv's (512 B), at once when the second conv runs.
        assert activation_peak(model.graph, 1) == 256 + 1024 + 512
        total = sum(r["bytes"] for r in rows.values())
        assert f"activation memory at batch 3: {total / 1e3:.1f} kB of layer outputs" in (
            model.summary(batch=3)
        )
    # A value read by two branches lives until the second reads it.
    branch = "network n(x: 1x8x8) { a = x -> conv(4, 1)  b = a -> conv(4, 1)  add(a, b) }"
    assert activation_peak(cnnc.compile(branch, opt_level=0).graph) == 256 + 1024 + 1024


def test_the_api_and_the_command_line_print_the_same(capsys):
    path = EXAMPLES / "resnet18.cnn"
    model = cnnc.compile(path, opt_level=0)
    assert main(["summary", str(path), "--depth", "2", "--batch", "4"]) == 0
    assert capsys.readouterr().out == model.summary(depth=2, batch=4)
    assert main(["summary", str(path)]) == 0
    assert capsys.readouterr().out == model.summary()
    assert main(["summary", str(path), "--depth", "1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data == summary_data(model.graph, batch=1, depth=1)
    assert [r["name"] for r in data["rows"] if r["folded"]] == [f"layer{i}" for i in range(1, 5)]
    assert data["rows"] == model.summary_rows(depth=1)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--depth", "0"], "--depth must be at least 1, got 0"),
        (["--batch", "0"], "--batch must be at least 1, got 0"),
        (["--json", "--tensors"], "--json prints the summary's rows only"),
    ],
)
def test_bad_summary_options_are_one_error(args, message, capsys):
    assert main(["summary", str(EXAMPLES / "lenet5.cnn"), *args]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_the_api_refuses_a_depth_or_batch_below_one():
    model = cnnc.compile(EXAMPLES / "lenet5.cnn")
    for kwargs in ({"depth": 0}, {"batch": 0}, {"batch": True}):
        with pytest.raises(cnnc.errors.UsageError):
            model.summary(**kwargs)


def test_the_readme_example_is_the_output_trimmed():
    readme = (EXAMPLES.parent / "README.md").read_text()
    block = readme.split("$ cnnc summary examples/resnet18.cnn --depth 2\n", 1)[1]
    shown = [line for line in block.split("\n```", 1)[0].splitlines() if line != "..."]
    text = cnnc.compile(EXAMPLES / "resnet18.cnn", opt_level=0).summary(depth=2)
    lines = iter(text.splitlines())
    assert len(shown) > 20
    for line in shown:  # each in order, some skipped where the README has "..."
        assert line in lines, line
