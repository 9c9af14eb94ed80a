"""Importing ONNX models: the IR forms of ONNX's attribute variants, the real models of ONNX's
test suite, `cnnc import` back to a program, and clear errors for what cannot come in."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from conftest import EXAMPLES, run_cnnc
from helpers import assert_agree, ort_session
from onnx import TensorProto, helper, numpy_helper

import cnnc
from cnnc.errors import ModelFileError
from cnnc.ops import get_op

LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
REAL_MODELS = [
    "bvlc_alexnet", "vgg19", "resnet50", "squeezenet", "inception_v1", "inception_v2",
    "densenet121", "shufflenet", "zfnet512",
]  # fmt: skip


def one_node(node, x_shape, initializers=None, opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(
        [node], "t",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *x_shape])],
        [helper.make_value_info(node.output[0], onnx.TypeProto())],
        initializer=[numpy_helper.from_array(v, k) for k, v in (initializers or {}).items()],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def typed(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its output's type filled in by ONNX's shape inference."""
    return onnx.shape_inference.infer_shapes(model)


def load(tmp_path, model, name="m.onnx", **kw) -> cnnc.Model:
    onnx.save(typed(model), tmp_path / name)
    return cnnc.load(tmp_path / name, opt_level=kw.pop("opt_level", 0), **kw)


def agrees(tmp_path, model, x_shape, batch=2) -> cnnc.Model:
    model = typed(model)
    ours = load(tmp_path, model)
    x = np.random.default_rng(batch).standard_normal((batch, *x_shape), dtype=np.float32)
    assert_agree(ours.run(x), ort_session(model).run(None, {"x": x})[0])
    return ours


def ops(model: cnnc.Model) -> list[str]:
    return [get_op(n.op).label(n) for n in model.graph.nodes]


# ---- attribute forms become one IR form ------------------------------------------------------

W = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)


@pytest.mark.parametrize(
    ("auto_pad", "pads"),
    [("SAME_UPPER", (0, 0, 1, 1)), ("SAME_LOWER", (1, 1, 0, 0)), ("VALID", (0, 0, 0, 0))],
)
def test_auto_pad_becomes_explicit_pads(tmp_path, auto_pad, pads):
    node = helper.make_node("Conv", ["x", "w"], ["y"], auto_pad=auto_pad, strides=[2, 2])
    model = agrees(tmp_path, one_node(node, (3, 8, 8), {"w": W}), (3, 8, 8))
    assert model.graph.nodes[0].attrs["pads"] == pads


def test_gemm_alpha_beta_and_transpose_fold_into_an_fc_layer(tmp_path):
    rng = np.random.default_rng(1)
    b, c = rng.standard_normal((6, 4)).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "b", "c"], ["y"], alpha=0.5, beta=2.0, transB=0)
    model = agrees(tmp_path, one_node(node, (6,), {"b": b, "c": c}), (6,))
    fc = model.graph.nodes[0]
    assert fc.op == "fc" and fc.inputs[1].shape == (4, 6)
    np.testing.assert_allclose(fc.inputs[2].data, 2 * c)


def test_matmul_then_add_is_one_fc_layer_with_bias(tmp_path):
    rng = np.random.default_rng(2)
    w, b = rng.standard_normal((5, 3)).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])],
        "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5])],
        [helper.make_value_info("y", onnx.TypeProto())],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )  # fmt: skip
    model = agrees(tmp_path, helper.make_model(graph), (5,))
    assert [(n.op, len(n.inputs)) for n in model.graph.nodes] == [("fc", 3)]


@pytest.mark.parametrize(
    "shape", [[0, -1], [-1, 48], [2, -1]], ids=["zero", "batch-minus", "fixed"]
)
def test_reshape_to_n_by_minus_one_is_a_flatten(tmp_path, shape):
    node = helper.make_node("Reshape", ["x", "s"], ["y"])
    x_shape = (3, 4, 4)
    model = one_node(node, x_shape, {"s": np.array(shape, np.int64)})
    if shape[0] == 2:  # a batch size baked into the model: import it at that size
        model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    ours = agrees(tmp_path, model, x_shape)
    assert ops(ours) == ["flatten"]


def test_constant_subgraphs_are_folded_into_parameters(tmp_path):
    fill = numpy_helper.from_array(np.array([0.25], np.float32))
    nodes = [
        helper.make_node("ConstantOfShape", ["shape"], ["w"], value=fill),
        helper.make_node("Conv", ["x", "w"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 5, 5])],
        [helper.make_value_info("y", onnx.TypeProto())],
        initializer=[numpy_helper.from_array(np.array([2, 3, 3, 3], np.int64), "shape")],
    )  # fmt: skip
    model = agrees(tmp_path, helper.make_model(graph), (3, 5, 5))
    assert ops(model) == ["conv2d"]
    np.testing.assert_array_equal(model.graph.nodes[0].inputs[1].data, np.full((2, 3, 3, 3), 0.25))


@pytest.mark.parametrize("op", ["Add", "Sub", "Div"])
def test_arithmetic_by_a_per_channel_constant_is_an_affine(tmp_path, op):
    c = np.array([[[0.5]], [[2.0]], [[-1.5]]], np.float32)
    node = helper.make_node(op, ["x", "c"], ["y"])
    model = agrees(tmp_path, one_node(node, (3, 4, 4), {"c": c}), (3, 4, 4))
    assert ops(model) == ["affine"]


def test_mul_by_a_per_channel_constant_is_a_scale_by_that_tensor(tmp_path):
    c = np.array([[[0.5]], [[2.0]], [[-1.5]]], np.float32)
    node = helper.make_node("Mul", ["c", "x"], ["y"])
    model = agrees(tmp_path, one_node(node, (3, 4, 4), {"c": c}), (3, 4, 4))
    assert ops(model) == ["scale"]
    assert model.graph.nodes[0].inputs[1].name == "c"  # the [C, 1, 1] tensor as it is


def test_an_affine_after_a_conv_folds_into_it_at_O2(tmp_path):
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]),
             helper.make_node("Mul", ["c", "s"], ["y"])]  # fmt: skip
    graph = helper.make_graph(
        nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
        [helper.make_value_info("y", onnx.TypeProto())],
        initializer=[numpy_helper.from_array(W, "w"),
                     numpy_helper.from_array(np.full((4, 1, 1), 3.0, np.float32), "s")],
    )  # fmt: skip
    onnx.save(typed(helper.make_model(graph)), tmp_path / "m.onnx")
    model = cnnc.load(tmp_path / "m.onnx")
    assert ops(model) == ["conv2d"]
    x = np.random.default_rng(0).standard_normal((2, 3, 6, 6), dtype=np.float32)
    assert_agree(model.run(x), ort_session(helper.make_model(graph)).run(None, {"x": x})[0])


@pytest.mark.parametrize("opset", [17, 18])
@pytest.mark.parametrize(("op", "pool"), [("ReduceMean", "gap"), ("ReduceMax", "global_maxpool")])
@pytest.mark.parametrize("keepdims", [1, 0])
def test_a_reduction_over_every_spatial_axis_is_a_global_pool(tmp_path, op, pool, keepdims, opset):
    if opset >= 18:
        axes = {"axes": np.array([-1, -2], np.int64)}
        node = helper.make_node(op, ["x", "axes"], ["y"], keepdims=keepdims)
    else:
        axes = {}
        node = helper.make_node(op, ["x"], ["y"], axes=[2, 3], keepdims=keepdims)
    ours = agrees(tmp_path, one_node(node, (3, 5, 4), axes, opset=opset), (3, 5, 4))
    assert [n.op for n in ours.graph.nodes] == [pool] + ["flatten"] * (1 - keepdims)


def test_a_reduction_over_the_channels_is_refused(tmp_path):
    node = helper.make_node("ReduceMean", ["x"], ["y"], axes=[1], keepdims=1, name="r")
    with pytest.raises(ModelFileError) as info:
        load(tmp_path, one_node(node, (3, 5, 4)))
    assert info.value.message.startswith(
        "ReduceMean over axes [1] of f32[N,3,5,4] is not supported"
    )


def test_a_channel_shuffle_imports_as_reshape_transpose_reshape(tmp_path):
    nodes = [
        helper.make_node("Reshape", ["x", "s1"], ["a"]),
        helper.make_node("Transpose", ["a"], ["b"], perm=[0, 2, 1, 3, 4]),
        helper.make_node("Reshape", ["b", "s2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, 3, 3])],
        [helper.make_value_info("y", onnx.TypeProto())],
        initializer=[numpy_helper.from_array(np.array([0, 2, 3, 3, 3], np.int64), "s1"),
                     numpy_helper.from_array(np.array([0, 6, 3, 3], np.int64), "s2")],
    )  # fmt: skip
    model = agrees(tmp_path, helper.make_model(graph), (6, 3, 3))
    assert ops(model) == ["reshape", "transpose", "reshape"]


# ---- what cannot come in ---------------------------------------------------------------------


def test_an_unsupported_op_names_the_op_the_node_and_the_supported_ops(tmp_path):
    model = one_node(helper.make_node("Erf", ["x"], ["y"], name="erf1"), (3,))
    onnx.save(typed(model), tmp_path / "m.onnx")
    proc = run_cnnc("run", tmp_path / "m.onnx")
    assert proc.returncode == 1
    first, hint = proc.stderr.splitlines()[:2]
    assert first == f"{tmp_path / 'm.onnx'}: node erf1 (Erf): error: op Erf is not supported"
    assert hint.startswith(
        "hint: supported ops: Add, AveragePool, BatchNormalization, CastLike, Clip,"
    )
    assert "Traceback" not in proc.stderr


def test_a_partly_supported_attribute_is_an_error_not_an_approximation(tmp_path):
    node = helper.make_node("Flatten", ["x"], ["y"], axis=2, name="f")
    with pytest.raises(ModelFileError, match="Flatten with axis=2 is not supported"):
        load(tmp_path, one_node(node, (3, 4)))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not an onnx file at all", "not a readable ONNX model"),
        (None, "not a readable ONNX model"),  # truncated
        (b"", "not an ONNX model: the file is empty"),
    ],
    ids=["garbage", "truncated", "empty"],
)
def test_a_malformed_file_is_one_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    if content is None:
        cnnc.compile(EXAMPLES / "lenet5.cnn").to_onnx(tmp_path / "good.onnx")
        content = (tmp_path / "good.onnx").read_bytes()[:5000]
    path.write_bytes(content)
    proc = run_cnnc("dump", path)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"{path}: error: {message}")
    assert "Traceback" not in proc.stderr


def test_a_model_that_fails_the_checker_is_an_error(tmp_path):
    node = helper.make_node("Relu", ["nowhere"], ["y"])
    with pytest.raises(ModelFileError, match="the model fails the ONNX checker"):
        load(tmp_path, one_node(node, (3,)))


def test_shapes_that_do_not_agree_are_an_error_at_the_node(tmp_path):
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="c")
    with pytest.raises(ModelFileError) as info:
        load(tmp_path, one_node(node, (5, 8, 8), {"w": W}))
    assert str(info.value.where).endswith("node c (Conv)")
    assert "expects 3 input channels, but the input" in info.value.message


# ---- every command takes an ONNX model -------------------------------------------------------


def test_every_command_takes_an_onnx_model(tmp_path):
    onnx_path = tmp_path / "lenet5.onnx"
    cnnc.compile(EXAMPLES / "lenet5.cnn", opt_level=0).to_onnx(onnx_path)
    for args in (["run", onnx_path, "--compare"], ["dump", onnx_path], ["summary", onnx_path],
                 ["compile", onnx_path, "-O2", "-o", tmp_path / "small.onnx"],
                 ["bench", onnx_path, "--repeat", "1", "--warmup", "0"]):  # fmt: skip
        proc = run_cnnc(*args)
        assert proc.returncode == 0, (args, proc.stderr)
    small = onnx.load(str(tmp_path / "small.onnx"))
    assert len(small.graph.node) < len(onnx.load(str(onnx_path)).graph.node)


# ---- cnnc import: back to a program ----------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "googlenet", "squeezenet", "conv1d", "mobilenet_v2"])
def test_an_imported_program_with_its_weights_computes_the_same(tmp_path, name):
    original = tmp_path / f"{name}.onnx"
    cnnc.compile(EXAMPLES / f"{name}.cnn", opt_level=0).to_onnx(original)
    proc = run_cnnc("import", original)
    assert proc.returncode == 0, proc.stderr
    program, weights = tmp_path / f"{name}.cnn", tmp_path / f"{name}.npz"
    assert proc.stdout.startswith(f"wrote {program} (")
    model = cnnc.compile(program, weights=weights, opt_level=0)
    x = model.random_input(2)
    expected = ort_session(onnx.load(str(original))).run(None, {model.graph.inputs[0].name: x})
    assert_agree(
        ort_session(model.to_onnx()).run(None, {model.graph.inputs[0].name: x})[0], expected[0]
    )


def test_an_imported_program_keeps_the_models_layer_names(tmp_path):
    cnnc.compile(EXAMPLES / "resnet18.cnn", opt_level=0).to_onnx(tmp_path / "r.onnx")
    assert run_cnnc("import", tmp_path / "r.onnx", "-o", tmp_path / "net.cnn").returncode == 0
    text = (tmp_path / "net.cnn").read_text()
    assert " -> layer2.0.downsample.0: conv(128, 1, stride=2, bias=false)\n" in text
    assert "    fc: fc(1000)\n" in text
    assert "layer2.0.downsample.0.weight" in np.load(tmp_path / "net.npz").files


def test_import_refuses_a_file_that_is_not_onnx(tmp_path):
    proc = run_cnnc("import", EXAMPLES / "lenet5.cnn")
    assert proc.returncode == 1
    assert "cnnc import reads ONNX models (.onnx)" in proc.stderr


# ---- the real models of ONNX's test suite ----------------------------------------------------


def light_input(model: cnnc.Model) -> np.ndarray:
    """The input ONNX's runner gives the light models: arange(n) / n in the input's shape."""
    shape = tuple(model.graph.inputs[0].type.shape)
    n = int(np.prod(shape))
    return (np.arange(n).reshape(shape) / n).astype(np.float32)


@pytest.mark.parametrize("name", REAL_MODELS)
def test_a_real_model_imports_runs_optimizes_exports_and_imports_as_a_program(name, tmp_path):
    path = os.path.join(LIGHT, f"light_{name}.onnx")
    model = cnnc.load(path, opt_level=0)
    x = light_input(model)
    expected = numpy_helper.to_array(
        onnx.load_tensor(os.path.join(LIGHT, f"light_{name}_output_0.pb"))
    )
    np.testing.assert_allclose(model.run(x), expected, rtol=1e-3, atol=1e-7)
    original = ort_session(onnx.load(path)).run(None, {model.graph.inputs[0].name: x})[0]
    optimized = cnnc.load(path, opt_level=2)
    assert len(optimized.graph.nodes) < len(model.graph.nodes)
    exported = optimized.to_onnx(tmp_path / "o2.onnx")
    onnx.checker.check_model(str(tmp_path / "o2.onnx"), full_check=True)
    read = {name for node in exported.graph.node for name in node.input}
    assert [t.name for t in exported.graph.initializer if t.name not in read] == []
    assert_agree(ort_session(exported).run(None, {model.graph.inputs[0].name: x})[0], original)
    text, weights = model.to_program()
    np.savez(tmp_path / "w.npz", **weights)
    program = cnnc.compile(text, weights=tmp_path / "w.npz", opt_level=0)
    assert_agree(program.run(x.reshape(program.graph.inputs[0].type.shape[:0] + x.shape)), original)


def test_a_model_that_passes_its_input_through_has_no_program(tmp_path):
    # Found by the fuzzer: to_program read the last node of a graph with none (IndexError).
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "t",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 4, 4])],
    )  # fmt: skip
    model = load(tmp_path, helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert model.graph.nodes == []
    with pytest.raises(cnnc.CnncError) as e:
        model.to_program()
    assert e.value.message == (
        "output x is an input of the network; a program computes its outputs"
    )


def test_a_huge_whole_number_attribute_is_written_in_exponent_form():
    # Found by the fuzzer: alpha=1e30 was written as a 31-digit integer literal, which
    # the program's reader refuses as too large for 64 bits.
    model = cnnc.compile("network n(x: 2x4x4) { hardsigmoid(alpha=1e30) -> clip(-1e20, 3) }")
    text, _ = model.to_program()
    assert "hardsigmoid(alpha=1e+30" in text
    assert "clip(-1e+20, 3)" in text
    back = cnnc.compile(text)
    x = model.random_input(batch=2)
    np.testing.assert_array_equal(back.run(x), model.run(x))
