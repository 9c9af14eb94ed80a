"""Passes: what each rewrite changes in the graph, what it refuses, and that outputs stay equal."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from conftest import EXAMPLES
from helpers import assert_agree, ort_session
from onnx.reference import ReferenceEvaluator

import cnnc
from cnnc.errors import ShapeError, UsageError
from cnnc.passes import manager
from cnnc.passes.manager import Options, PassChangedOutputs

EXAMPLE_FILES = sorted(EXAMPLES.glob("*.cnn"))
# The large networks: each pass alone is checked on the others, and --verify-each (ten
# interpreter runs) only there; the whole -O2 pipeline is checked on every example.
LARGE = {
    "vgg16", "alexnet", "resnet50", "densenet121", "googlenet", "convnext_tiny", "resnet34",
    "resnext50_32x4d", "fcn_resnet50", "fcn32s_vgg16", "unet",
}  # fmt: skip
# Networks whose outputs carry float32 rounding of 1e-4 of their magnitude in every engine
# (measured on FCN-ResNet-50 against a float64 PyTorch run: helpers.assert_every_value_agrees).
DEEP_ROUNDING = {"fcn_resnet50"}
SINGLE_PASSES = [
    "remove-identity", "dce", "channels-first", "fold-bn", "fc-to-conv", "fuse-conv-act"
]  # fmt: skip


def labels(model: cnnc.Model) -> list[str]:
    from cnnc.ops import get_op

    return [get_op(n.op).label(n) for n in model.graph.nodes]


def run_ort(model: cnnc.Model, x: np.ndarray, **export) -> np.ndarray:
    session = ort_session(model.to_onnx(**export))
    return session.run(None, {model.graph.inputs[0].name: x})[0]


def assert_same_outputs(reference: np.ndarray, *outputs: np.ndarray) -> None:
    for y in outputs:
        assert_agree(y, reference)


# ---- every pass keeps every example's outputs ------------------------------------------------


def _all_outputs(model: cnnc.Model, xs: list[np.ndarray]) -> list[list[np.ndarray]]:
    """The model's outputs in the interpreter and in onnxruntime."""
    session = ort_session(model.to_onnx())
    theirs = session.run(None, dict(zip(model.input_names, xs, strict=True)))
    return [model.run_all_outputs(*xs), theirs]


def _assert_outputs_kept(path, before: cnnc.Model, after: cnnc.Model, xs) -> None:
    reference = before.run_all_outputs(*xs)
    for outputs in _all_outputs(after, xs):
        for y, expected in zip(outputs, reference, strict=True):
            if path.stem in DEEP_ROUNDING:
                scale = float(np.abs(expected).max())
                np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5 + 1e-3 * scale)
            else:
                assert_agree(y, expected)


# Over 10 GMAC an item: their -O2 and -O0 graphs are each checked against onnxruntime on
# every value by `pytest -m slow tests/test_examples.py`, and here under the same marker.
HEAVIEST = {"vgg16", "fcn32s_vgg16", "fcn_resnet50"}


@pytest.mark.parametrize(
    "path",
    [pytest.param(p, marks=pytest.mark.slow) if p.stem in HEAVIEST else p for p in EXAMPLE_FILES],
    ids=lambda p: p.stem,
)
def test_O2_keeps_the_outputs_of_every_example_in_both_backends(path):
    before = cnnc.compile(path, opt_level=0)
    options = Options(verify_each=path.stem not in LARGE)
    after = cnnc.compile(path, opt_level=2, pass_options=options)
    _assert_outputs_kept(path, before, after, before.random_inputs(2, seed=5))
    assert [v.type for v in after.graph.outputs] == [v.type for v in before.graph.outputs]


@pytest.mark.parametrize("name", SINGLE_PASSES)
@pytest.mark.parametrize(
    "path", [p for p in EXAMPLE_FILES if p.stem not in LARGE], ids=lambda p: p.stem
)
def test_each_pass_alone_keeps_the_outputs_in_both_backends(path, name):
    before = cnnc.compile(path, opt_level=0)
    after = cnnc.compile(path, passes=[name])
    _assert_outputs_kept(path, before, after, before.random_inputs(3, seed=7))


# ---- the pass manager ------------------------------------------------------------------------


def test_the_O_levels_name_their_pipelines():
    assert manager.pipeline(0) == []
    assert manager.pipeline(1) == ["remove-identity", "dce"]
    assert manager.pipeline(2) == [
        "remove-identity",
        "channels-first",
        "fuse-transpose-reshape",
        "fuse-pad",
        "merge-affine",
        "fold-bn",
        "fold-affine",
        "fc-to-conv",
        "fuse-conv-act",
        "cse",
        "dce",
    ]
    assert manager.pipeline(2, fully_conv=True)[-2:] == ["convolutionalize", "dce"]


def test_an_unknown_pass_lists_the_known_ones():
    with pytest.raises(UsageError) as info:
        cnnc.compile(EXAMPLES / "lenet5.cnn", passes=["fold-bn", "fuse"])
    assert info.value.message == (
        "unknown pass 'fuse'; known passes: remove-identity, dce, channels-first, "
        "merge-affine, fold-bn, fold-affine, fc-to-conv, fuse-conv-act, convolutionalize, "
        "fuse-transpose-reshape, fuse-pad, cse"
    )


def test_the_dump_heads_with_the_pipeline_that_ran():
    dump = cnnc.compile(EXAMPLES / "lenet5.cnn", passes=["fc-to-conv", "dce"]).dump()
    assert dump.splitlines()[0] == "network lenet5  (--passes: fc-to-conv, dce)"


def test_print_ir_after_prints_the_dump_after_that_pass():
    printed = []
    options = Options(print_after={"fc-to-conv"}, printer=printed.append)
    cnnc.compile(EXAMPLES / "lenet5.cnn", pass_options=options)
    (text,) = printed
    assert text.startswith(
        "# IR after fc-to-conv\n"
        "network lenet5  (-O2: remove-identity, channels-first, fuse-transpose-reshape, "
        "fuse-pad, merge-affine, fold-bn, fold-affine, fc-to-conv)\n"
    )
    assert "conv2d(%c2.maxpool, f1.weight, f1.bias)" in text


def test_print_ir_after_all_prints_after_every_pass():
    printed = []
    cnnc.compile(
        EXAMPLES / "lenet5.cnn", pass_options=Options(print_after_all=True, printer=printed.append)
    )
    assert [t.splitlines()[0] for t in printed] == [
        f"# IR after {name}" for name in manager.pipeline(2)
    ]


def test_stop_after_ends_the_pipeline_there():
    model = cnnc.compile(EXAMPLES / "lenet5.cnn", pass_options=Options(stop_after="fc-to-conv"))
    assert model.graph.pipeline == [
        "remove-identity",
        "channels-first",
        "fuse-transpose-reshape",
        "fuse-pad",
        "merge-affine",
        "fold-bn",
        "fold-affine",
        "fc-to-conv",
    ]
    assert "relu" in labels(model)


def test_stopping_after_a_pass_outside_the_pipeline_is_an_error():
    with pytest.raises(UsageError, match="pass 'fold-bn' is not in the pipeline"):
        cnnc.compile(
            EXAMPLES / "lenet5.cnn", opt_level=1, pass_options=Options(stop_after="fold-bn")
        )


def test_verify_each_names_the_pass_and_the_first_node_that_differs(monkeypatch):
    def off_by_one(graph):
        conv = next(n for n in graph.nodes if n.name == "c2")
        conv.inputs[2].derive(lambda b: b + 1)
        return True

    monkeypatch.setitem(manager.PASSES, "off-by-one", off_by_one)
    with pytest.raises(PassChangedOutputs) as info:
        cnnc.compile(
            EXAMPLES / "lenet5.cnn", passes=["off-by-one"], pass_options=Options(verify_each=True)
        )
    message = info.value.message
    assert message.startswith(
        "pass off-by-one changed the network's outputs (%f3.softmax); "
        "the first node whose value differs is c2 (conv), max |difference| "
    )
    assert message.endswith("from %c2 before the pass")
    assert info.value.location.line == 5


def test_the_graph_is_verified_after_every_pass(monkeypatch):
    def breaks_use_lists(graph):
        graph.nodes[1].inputs[0].users.clear()
        return True

    monkeypatch.setitem(manager.PASSES, "breaks", breaks_use_lists)
    with pytest.raises(cnnc.CnncError, match="use list of %c1"):
        cnnc.compile(EXAMPLES / "lenet5.cnn", passes=["breaks"])


def test_outputs_keep_their_names_through_the_passes():
    for level in (0, 2):
        model = cnnc.compile(EXAMPLES / "lenet5.cnn", opt_level=level)
        assert [v.name for v in model.graph.outputs] == ["f3.softmax"]


# ---- remove-identity and dce -----------------------------------------------------------------


def test_remove_identity_drops_every_dropout_and_the_adaptive_pool_that_keeps_its_size():
    model = cnnc.compile(EXAMPLES / "alexnet.cnn", passes=["remove-identity"])
    assert "dropout" not in labels(model)
    assert "adaptive_avgpool2d" not in labels(model)
    assert (
        len(model.graph.nodes)
        == len(cnnc.compile(EXAMPLES / "alexnet.cnn", opt_level=0).graph.nodes) - 3
    )


def test_a_dropout_at_the_output_leaves_its_input_as_the_output():
    model = cnnc.compile(
        "network n(x: 2x4x4) { c: conv(2, 1) -> dropout }", passes=["remove-identity"]
    )
    assert [n.op for n in model.graph.nodes] == ["conv"]
    assert model.graph.outputs[0].name == "c.dropout"


def test_a_dropout_between_the_input_and_the_output_stays_so_that_both_keep_their_names():
    # Found by the fuzzer: bypassing it renamed the input %image to the output's name.
    model = cnnc.compile("network n(image: 2x4x4) { dropout -> drop_path }")
    assert [v.name for v in model.graph.inputs] == ["image"]
    assert [n.op for n in model.graph.nodes] == ["drop_path"]
    assert model.graph.outputs[0].name == "drop_path1"
    x = model.random_input(batch=2)
    np.testing.assert_array_equal(model.run(x), x)
    onnx.checker.check_model(model.to_onnx(), full_check=True)


def test_a_dropout_between_two_outputs_stays_so_that_each_output_keeps_its_name():
    # Found by the fuzzer: both outputs were called b, and a was lost.
    model = cnnc.compile("network n(image: 2x4x4) -> (a, b) { a = relu \n b = a -> dropout }")
    assert [v.name for v in model.graph.outputs] == ["a", "b"]
    assert [n.op for n in model.graph.nodes] == ["relu", "dropout"]
    exported = model.to_onnx()
    assert [o.name for o in exported.graph.output] == ["a", "b"]
    x = model.random_input()
    a, b = model.run(x)
    np.testing.assert_array_equal(a, b)


def test_dce_removes_unused_nodes_and_parameters():
    model = cnnc.compile("network n(x: 2x4x4) { a: conv(2, 1) -> b: conv(3, 1) }", opt_level=0)
    graph = model.graph
    graph.outputs = [graph.nodes[0].output]
    assert manager.PASSES["dce"](graph)
    assert [n.name for n in graph.nodes] == ["a"]
    assert sorted(graph.params) == ["a.bias", "a.weight"]


# ---- fold-bn ---------------------------------------------------------------------------------


def test_a_thousand_folds_into_one_weight_compute_it_without_deep_recursion():
    # Found by the fuzzer: each fold wrapped the lazy weight in one more lambda, and
    # computing it at export recursed 1,000 deep (RecursionError).
    source = "network n(x: 3x6x6) { conv(4, 3) -> affine * 1000 -> linear(5) -> scale * 1000 }"
    model = cnnc.compile(source)
    assert [n.op for n in model.graph.nodes] == ["conv", "conv"]
    exported = model.to_onnx()
    x = model.random_input(batch=2)
    expected = cnnc.compile(source, opt_level=0).run(x)
    assert_agree(model.run(x), expected)
    assert_agree(ort_session(exported).run(None, {"x": x})[0], expected)


def test_fold_bn_folds_into_convs_and_fcs_and_gives_biasless_convs_a_bias():
    model = cnnc.compile(EXAMPLES / "cifar_bn.cnn", passes=["fold-bn", "dce"])
    assert "bn" not in labels(model)
    assert model.graph.params["conv1.bias"].shape == (32,)
    assert model.graph.params["fc1.bias"].shape == (256,)
    assert not any(name.startswith("bn") for name in model.graph.params)


def test_folded_weights_are_the_scaled_weights():
    text = "network n(x: 2x5x5) { c: conv(3, 3, bias=false) -> b: bn(eps=0.01) }"
    before = cnnc.compile(text, opt_level=0).graph.params
    after = cnnc.compile(text, passes=["fold-bn"]).graph.params
    scale = before["b.weight"].data / np.sqrt(before["b.running_var"].data + 0.01)
    np.testing.assert_allclose(
        after["c.weight"].data, before["c.weight"].data * scale[:, None, None, None], rtol=1e-6
    )
    np.testing.assert_allclose(
        after["c.bias"].data,
        before["b.bias"].data - before["b.running_mean"].data * scale,
        rtol=1e-6,
        atol=1e-7,
    )


@pytest.mark.parametrize(
    "chain",
    ["conv(4, 3) -> maxpool(2) -> bn", "conv(4, 3) -> relu -> bn", "gap -> bn"],
    ids=["after-pool", "after-relu", "after-gap"],
)
def test_fold_bn_leaves_a_bn_that_does_not_follow_a_conv_or_fc(chain):
    text = f"network n(x: 2x8x8) {{ {chain} }}"
    model = cnnc.compile(text, passes=["fold-bn"])
    assert labels(model).count("bn") == 1
    x = model.random_input(2)
    assert_same_outputs(cnnc.compile(text, opt_level=0).run(x), model.run(x), run_ort(model, x))


def test_fold_bn_leaves_a_bn_whose_input_has_another_user():
    model = cnnc.compile("network n(x: 2x8x8) { c: conv(4, 3) -> bn }", opt_level=0)
    graph = model.graph
    graph.outputs.append(graph.nodes[0].output)
    assert not manager.PASSES["fold-bn"](graph)
    assert [n.op for n in graph.nodes] == ["conv", "bn"]


def test_fold_bn_leaves_a_bn_after_a_fused_conv():
    model = cnnc.compile(
        "network n(x: 2x8x8) { c: conv(4, 3) -> relu -> bn }", passes=["fuse-conv-act", "fold-bn"]
    )
    assert labels(model) == ["conv2d+relu", "bn"]


# ---- fc-to-conv ------------------------------------------------------------------------------


def test_vgg16_fc6_becomes_a_7x7_convolution_and_fc7_fc8_1x1():
    graph = cnnc.compile(EXAMPLES / "vgg16.cnn", passes=["fc-to-conv"]).graph
    fcs = {n.name: n for n in graph.nodes if n.name in ("fc6", "fc7", "fc8")}
    assert {n: (v.op, v.inputs[1].shape) for n, v in fcs.items()} == {
        "fc6": ("conv", (4096, 512, 7, 7)),
        "fc7": ("conv", (4096, 4096, 1, 1)),
        "fc8": ("conv", (1000, 4096, 1, 1)),
    }
    assert all(n.note == "fc→conv" for n in fcs.values())
    assert graph.outputs[0].type.shape == ("N", 1000)


def test_the_tutorial_3x3x5_to_4096_fc_is_a_3x3_convolution():
    graph = cnnc.compile(EXAMPLES / "fc_as_conv.cnn", passes=["fc-to-conv"]).graph
    convs = [(n.name, n.inputs[1].shape) for n in graph.nodes if n.op == "conv"]
    assert convs == [
        ("conv1", (5, 3, 3, 3)),
        ("fc1", (4096, 5, 3, 3)),
        ("fc2", (2048, 4096, 1, 1)),
        ("fc3", (10, 2048, 1, 1)),
    ]


def test_fc_weights_are_reshaped_in_flatten_order():
    text = "network n(x: 3x2x4) { f: fc(5) }"
    before = cnnc.compile(text, opt_level=0).graph.params["f.weight"].data
    after = cnnc.compile(text, passes=["fc-to-conv"]).graph.params["f.weight"].data
    assert after.shape == (5, 3, 2, 4)
    np.testing.assert_array_equal(after[4, 2, 1, 3], before[4, 2 * 8 + 1 * 4 + 3])


def test_fc_to_conv_in_1d_gives_a_length_l_convolution():
    graph = cnnc.compile(EXAMPLES / "conv1d.cnn", passes=["fc-to-conv"]).graph
    head = next(n for n in graph.nodes if n.name == "head")
    assert (head.op, head.inputs[1].shape) == ("conv", (5, 64, 1))


def test_fc_after_gap_becomes_a_1x1_convolution():
    graph = cnnc.compile("network n(x: 8x6x6) { gap -> f: fc(4) }", passes=["fc-to-conv"]).graph
    assert [n.op for n in graph.nodes] == ["gap", "conv", "flatten"]
    assert graph.nodes[1].inputs[1].shape == (4, 8, 1, 1)


def test_fc_to_conv_leaves_an_fc_whose_input_is_not_a_feature_map():
    text = "network n(x: 2x4x4) { c: conv(3, 3) -> flatten -> relu -> f: fc(4) }"
    model = cnnc.compile(text, passes=["fc-to-conv"])
    assert labels(model) == ["conv2d", "flatten", "relu", "fc"]


def test_fc_to_conv_output_is_still_n_by_k_and_flattened_last():
    model = cnnc.compile(EXAMPLES / "lenet5.cnn", passes=["fc-to-conv"])
    assert labels(model)[-3:] == ["conv2d", "softmax", "flatten"]
    assert model.graph.outputs[0].type.shape == ("N", 10)


# ---- fuse-conv-act ---------------------------------------------------------------------------


@pytest.mark.parametrize("act", ["relu", "sigmoid", "tanh"])
def test_conv_and_activation_become_one_node(act):
    model = cnnc.compile(
        f"network n(x: 2x6x6) {{ c: conv(4, 3) -> {act} }}", passes=["fuse-conv-act"]
    )
    assert labels(model) == [f"conv2d+{act}"]
    assert model.graph.outputs[0].name == f"c.{act}"


def test_converted_fc_layers_fuse_too():
    model = cnnc.compile(EXAMPLES / "vgg16.cnn")
    assert Counter(labels(model)) == Counter(
        {"conv2d+relu": 15, "maxpool2d": 5, "conv2d": 1, "softmax": 1, "flatten": 1}
    )


def test_fusion_is_refused_when_the_conv_output_has_another_user():
    model = cnnc.compile("network n(x: 2x6x6) { c: conv(4, 3) -> relu }", opt_level=0)
    graph = model.graph
    graph.outputs.append(graph.nodes[0].output)
    assert not manager.PASSES["fuse-conv-act"](graph)


def test_fusion_is_refused_after_anything_but_a_conv():
    model = cnnc.compile("network n(x: 2x6x6) { fc(4) -> relu }", passes=["fuse-conv-act"])
    assert labels(model) == ["flatten", "fc", "relu"]


def test_fused_convs_export_as_a_model_local_function_of_standard_ops():
    model = cnnc.compile(EXAMPLES / "lenet5.cnn").to_onnx()
    onnx.checker.check_model(model, full_check=True)
    assert [(f.domain, f.name) for f in model.functions] == [("cnnc", "ConvRelu")]
    assert [n.op_type for n in model.functions[0].node] == ["Conv", "Relu"]
    assert Counter(n.op_type for n in model.graph.node)["ConvRelu"] == 4
    assert {o.domain for o in model.opset_import} == {"", "cnnc"}


def test_inline_functions_writes_the_plain_op_pair():
    model = cnnc.compile(EXAMPLES / "lenet5.cnn").to_onnx(inline_functions=True)
    assert not model.functions
    assert Counter(n.op_type for n in model.graph.node)["Relu"] == 4
    assert {n.domain for n in model.graph.node} == {""}


@pytest.mark.parametrize("inline", [False, True], ids=["function", "inlined"])
def test_fused_models_run_the_same_in_onnxruntime_and_onnx_reference(inline):
    model = cnnc.compile(EXAMPLES / "conv1d.cnn")
    proto = model.to_onnx(inline_functions=inline)
    x = model.random_input(3)
    expected = cnnc.compile(EXAMPLES / "conv1d.cnn", opt_level=0).run(x)
    (reference,) = ReferenceEvaluator(proto).run(None, {"signal": x})
    assert_same_outputs(
        expected, model.run(x), run_ort(model, x, inline_functions=inline), reference
    )


def test_a_fused_model_imports_back_with_its_fusions(tmp_path):
    model = cnnc.compile(EXAMPLES / "lenet5.cnn")
    model.to_onnx(tmp_path / "m.onnx")
    back = cnnc.load(tmp_path / "m.onnx", opt_level=0)
    assert labels(back) == labels(model)
    x = model.random_input(2)
    np.testing.assert_array_equal(back.run(x), model.run(x))


# ---- convolutionalize ------------------------------------------------------------------------

SLIDING = """network sliding(image: 3x20x20) {
    c1: conv(8, 5) -> relu -> maxpool(2)         # 8x8x8
    c2: conv(16, 3, stride=2) -> relu            # 16x3x3
    f1: fc(32) -> relu
    f2: fc(6) -> softmax
}"""


def test_each_cell_of_the_score_map_is_the_classifier_on_its_window():
    classifier = cnnc.compile(SLIDING, opt_level=0)
    fcn = cnnc.compile(SLIDING, fully_conv=True)
    image = np.random.default_rng(3).standard_normal((2, 3, 36, 44), dtype=np.float32)
    scores = fcn.run(image)
    assert scores.shape == (2, 6, 5, 7)
    for i in range(5):
        for j in range(7):
            crop = np.ascontiguousarray(image[:, :, 4 * i : 4 * i + 20, 4 * j : 4 * j + 20])
            np.testing.assert_allclose(
                scores[:, :, i, j],
                classifier.run(crop),
                rtol=1e-4,
                atol=1e-6,
                err_msg=f"cell {i},{j}",
            )


def test_the_fully_convolutional_onnx_model_takes_any_larger_image():
    fcn = cnnc.compile(SLIDING, fully_conv=True)
    proto = fcn.to_onnx()
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", 3, "H", "W"]
    session = ort_session(proto)
    for size in ((20, 20), (36, 44), (64, 24)):
        image = np.random.default_rng(0).standard_normal((1, 3, *size), dtype=np.float32)
        assert_agree(session.run(None, {"image": image})[0], fcn.run(image))


def test_at_the_declared_size_the_map_is_one_cell_equal_to_the_classifier():
    classifier = cnnc.compile(EXAMPLES / "lenet5.cnn", opt_level=0)
    fcn = cnnc.compile(EXAMPLES / "lenet5.cnn", fully_conv=True)
    x = classifier.random_input(2)
    assert fcn.run(x).shape == (2, 10, 1, 1)
    assert_same_outputs(classifier.run(x), fcn.run(x), run_ort(fcn, x))


@pytest.mark.parametrize(
    ("pool", "windowed"), [("gap", "avgpool2d"), ("global_maxpool", "maxpool2d")]
)
def test_a_global_pool_becomes_a_pool_over_each_window(pool, windowed):
    text = f"network g(x: 3x8x8) {{ c: conv(4, 3) -> relu -> {pool} -> f: fc(2) }}"
    fcn = cnnc.compile(text, fully_conv=True)
    assert windowed in labels(fcn) and pool not in labels(fcn)
    image = np.random.default_rng(1).standard_normal((1, 3, 10, 9), dtype=np.float32)
    scores = fcn.run(image)
    classifier = cnnc.compile(text, opt_level=0)
    assert scores.shape == (1, 2, 3, 2)
    np.testing.assert_allclose(
        scores[0, :, 2, 1], classifier.run(image[:, :, 2:10, 1:9])[0], rtol=1e-4, atol=1e-6
    )


def test_a_smaller_image_is_refused_with_both_shapes():
    fcn = cnnc.compile(SLIDING, fully_conv=True)
    with pytest.raises(cnnc.CnncError) as info:
        fcn.run(np.zeros((1, 3, 19, 30), np.float32))
    assert info.value.message == (
        "input %image expects f32[N,3,20,20] (spatial sizes at least "
        "as large), got float32 [1, 3, 19, 30]"
    )


def test_a_network_whose_fc_has_no_map_cannot_be_convolutionalized():
    text = "network n(x: 2x4x4) {\n c: conv(3, 3) -> flatten -> relu -> f: fc(4)\n}"
    with pytest.raises(ShapeError) as info:
        cnnc.compile(text, fully_conv=True)
    assert info.value.message.startswith(
        "network n cannot be made fully convolutional: flatten c.flatten has no feature map"
    )
    assert info.value.location.line == 2


def test_fully_conv_report_gives_stride_receptive_field_and_map_size():
    report = cnnc.compile(SLIDING, fully_conv=True).fully_conv_report((36, 44))
    assert report.splitlines() == [
        "fully convolutional: output stride 4x4, receptive field 18x18 (each output cell "
        "scores one 18x18 window; windows are 4x4 apart)",
        "an input of 36x44 gives a score map [N,6,5,7]",
        "no layer pads: every cell equals the classifier run on its window",
    ]


def test_fully_conv_report_of_vgg16():
    report = cnnc.compile(EXAMPLES / "vgg16.cnn", fully_conv=True).fully_conv_report((384, 384))
    lines = report.splitlines()
    assert lines[0].startswith("fully convolutional: output stride 32x32, receptive field 404x404")
    assert lines[1] == "an input of 384x384 gives a score map [N,1000,6,6]"
    assert lines[2].startswith("note: conv1_1, conv1_2, conv2_1")


def test_a_network_with_a_fixed_size_reshape_cannot_be_made_fully_convolutional():
    text = "network n(x: 4x6x6) {\n conv(4, 3, pad=1) -> r: reshape((2, 2, 36)) -> gap\n}"
    with pytest.raises(ShapeError) as info:
        cnnc.compile(text, fully_conv=True)
    assert info.value.message == (
        "network n cannot be made fully convolutional: reshape r fixes every size of its "
        "output (2x2x36)"
    )
    assert info.value.location.line == 2


def test_a_network_of_two_inputs_cannot_be_made_fully_convolutional():
    text = "network n(a: 3x8x8, b: 3x8x8) { s = a -> conv(2, 1)  t = b -> conv(2, 1)  add(s, t) }"
    with pytest.raises(ShapeError) as info:
        cnnc.compile(text, fully_conv=True)
    assert info.value.message.startswith("network n has 2 inputs; a fully convolutional network")
