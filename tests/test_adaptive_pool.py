"""adaptive_avgpool and adaptive_maxpool: PyTorch's windows (values computed with
torch.nn.functional.adaptive_avg_pool1d, written here), onnxruntime and onnx.reference on the
exported model for many sizes, the ONNX forms they export and import, and their errors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import assert_agree, ort_session
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

import cnnc
from cnnc.backends.interpreter import Interpreter
from cnnc.backends.onnx_export import max_opset
from cnnc.errors import CnncError, LayerError, ModelFileError
from cnnc.frontend.onnx_import import load_onnx
from cnnc.ops.pool import adaptive_windows

OPS = ("adaptive_avgpool", "adaptive_maxpool")


def net(shape: str, layer: str) -> str:
    return f"network n(x: {shape}) {{ {layer} }}"


def compiled(shape: str, layer: str, opt_level: int = 0) -> cnnc.Model:
    return cnnc.compile(net(shape, layer), opt_level=opt_level)


def test_windows_run_from_floor_of_i_in_over_out_to_ceil_of_the_next():
    starts, stops = adaptive_windows(6, 4)
    assert (starts.tolist(), stops.tolist()) == ([0, 1, 3, 4], [2, 3, 5, 6])
    # A larger output than input: windows of one or two pixels that overlap.
    starts, stops = adaptive_windows(6, 7)
    assert (starts.tolist(), stops.tolist()) == ([0, 0, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6, 6])


def test_the_pools_compute_pytorchs_values():
    x = (np.arange(6, dtype=np.float32) ** 2).reshape(1, 1, 6)
    avg = compiled("1x6", "adaptive_avgpool(4)").run(x)
    np.testing.assert_array_equal(avg.ravel(), [0.5, 2.5, 12.5, 20.5])
    larger = compiled("1x6", "adaptive_avgpool(7)").run(x)
    np.testing.assert_array_equal(larger.ravel(), [0, 0.5, 2.5, 6.5, 12.5, 20.5, 25])
    top = compiled("1x6", "adaptive_maxpool(4)").run(-x)
    np.testing.assert_array_equal(top.ravel(), [-0.0, -1, -9, -16])


def test_adaptive_avgpool_of_one_is_gap():
    x = compiled("3x5x7", "gap").random_input(2)
    np.testing.assert_allclose(
        compiled("3x5x7", "adaptive_avgpool(1)").run(x), compiled("3x5x7", "gap").run(x), atol=1e-6
    )


def test_a_2d_window_is_the_product_of_the_windows_of_its_axes():
    x = np.random.default_rng(0).standard_normal((2, 3, 7, 5), dtype=np.float32)
    (rows, row_ends), (cols, col_ends) = adaptive_windows(7, 3), adaptive_windows(5, 4)
    expected_avg = np.empty((2, 3, 3, 4), np.float32)
    expected_max = np.empty((2, 3, 3, 4), np.float32)
    for i in range(3):
        for j in range(4):
            window = x[:, :, rows[i] : row_ends[i], cols[j] : col_ends[j]]
            expected_avg[:, :, i, j] = window.mean(axis=(2, 3))
            expected_max[:, :, i, j] = window.max(axis=(2, 3))
    np.testing.assert_allclose(
        compiled("3x7x5", "adaptive_avgpool((3, 4))").run(x), expected_avg, atol=1e-6
    )
    np.testing.assert_array_equal(
        compiled("3x7x5", "adaptive_maxpool((3, 4))").run(x), expected_max
    )


def test_nan_wins_the_maximum_as_in_pytorch():
    x = np.zeros((1, 1, 5), np.float32)
    x[0, 0, 2] = np.nan
    y = compiled("1x5", "adaptive_maxpool(3)").run(x).ravel()
    assert np.isnan(y[1]) and not np.isnan(y[0])


# ---- against onnxruntime and onnx.reference --------------------------------------------------

SIZES = [
    ("2x9", "5"),
    ("2x9", "3"),
    ("2x5", "8"),
    ("2x5", "1"),
    ("2x1", "4"),
    ("2x6x6", "6"),
    ("2x7x7", "7"),
    ("2x6x6", "7"),
    ("2x7x5", "(3, 4)"),
    ("2x12x8", "(4, 2)"),
    ("2x12x8", "1"),
    ("2x13x11", "(5, 11)"),
    ("2x3x4", "(9, 2)"),
    ("2x224x224", "7"),
]
CASES = [(shape, f"{op}({size})") for op in OPS for shape, size in SIZES]
OPSETS = sorted({13, 17, max_opset()})


@pytest.mark.parametrize(("shape", "layer"), CASES, ids=[f"{s}-{layer}" for s, layer in CASES])
def test_the_export_computes_what_the_interpreter_does(shape, layer):
    model = compiled(shape, layer)
    for batch in (1, 3):
        x = model.random_input(batch, seed=batch)
        ours = model.run(x)
        for opset in OPSETS:
            proto = model.to_onnx(opset=opset)
            onnx.checker.check_model(proto, full_check=True)
            what = f"{layer} on {list(x.shape)} at opset {opset}"
            assert_agree(ours, ort_session(proto).run(None, {"x": x})[0], what)
        if layer == "adaptive_maxpool(1)" and x.ndim == 3:
            continue  # onnx.reference's GlobalMaxPool reduces the channels of an N×C×L map
        reference = ReferenceEvaluator(model.to_onnx(opset=max_opset()))
        assert_agree(ours, reference.run(None, {"x": x})[0], f"{layer} in onnx.reference")


def test_threads_share_a_large_map_by_channels_with_the_same_result():
    for op in OPS:
        model = compiled("64x97x97", f"{op}((7, 6))")
        x = model.random_input(2)
        one = Interpreter(model.graph, threads=1).run(x)[0]
        np.testing.assert_array_equal(one, Interpreter(model.graph, threads=2).run(x)[0])


# ---- the ONNX they write, and read back ------------------------------------------------------


def _ops(proto: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in proto.graph.node]


@pytest.mark.parametrize(
    ("shape", "layer", "nodes"),
    [
        ("3x12x8", "adaptive_avgpool((4, 2))", ["AveragePool"]),
        ("3x12x8", "adaptive_maxpool((4, 2))", ["MaxPool"]),
        ("3x12x8", "adaptive_avgpool(1)", ["GlobalAveragePool"]),
        ("3x12x8", "adaptive_maxpool(1)", ["GlobalMaxPool"]),
        ("3x12", "adaptive_avgpool(3)", ["AveragePool"]),
        ("3x7x5", "adaptive_avgpool((3, 4))", ["AdaptiveAvgPool2d"]),
        ("3x7x5", "adaptive_maxpool((3, 4))", ["AdaptiveMaxPool2d"]),
        ("3x7", "adaptive_avgpool(3)", ["AdaptiveAvgPool1d"]),
        ("3x7", "adaptive_maxpool(9)", ["AdaptiveMaxPool1d"]),
    ],
)
def test_uniform_windows_are_the_standard_pool_others_a_cnnc_function(shape, layer, nodes):
    proto = compiled(shape, layer).to_onnx()
    assert _ops(proto) == nodes
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in proto.graph.node[0].attribute}
    if nodes[0] in ("AveragePool", "MaxPool"):
        assert attrs["kernel_shape"] == attrs["strides"]


def test_the_functions_bodies_are_matmuls_and_gathers_with_reductions():
    avg = compiled("3x7x5", "adaptive_avgpool((3, 4))").to_onnx(opset=17)
    assert [n.op_type for n in avg.functions[0].node] == ["MatMul", "MatMul"]
    pools = {i.name: numpy_helper.to_array(i) for i in avg.graph.initializer}
    rows = pools["adaptive_avgpool1.pool_rows"]
    assert rows.shape == (3, 7)
    np.testing.assert_allclose(rows.sum(axis=1), 1, rtol=1e-6)
    top = compiled("3x7x5", "adaptive_maxpool((3, 4))").to_onnx(opset=18)
    body = [n.op_type for n in top.functions[0].node]
    assert body == ["Gather", "Constant", "ReduceMax", "Gather", "Constant", "ReduceMax"]
    windows = {i.name: numpy_helper.to_array(i) for i in top.graph.initializer}
    # Window 1 of 7 into 3 is 2..5; a shorter window repeats its last index.
    assert windows["adaptive_maxpool1.windows_rows"].tolist() == [[0, 1, 2], [2, 3, 4], [4, 5, 6]]
    inlined = compiled("3x7x5", "adaptive_maxpool((3, 4))").to_onnx(inline_functions=True)
    assert "Gather" in _ops(inlined)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(("shape", "size"), [("3x7x5", (3, 4)), ("3x6x6", (7, 7)), ("3x7", (3,))])
def test_a_cnnc_function_imports_back_as_the_adaptive_pool_with_its_size(op, shape, size):
    model = compiled(shape, f"{op}({size if len(size) > 1 else size[0]})")
    for opset in OPSETS:
        back = load_onnx(model.to_onnx(opset=opset))
        assert [(n.op, n.attrs) for n in back.nodes] == [(op, {"size": size})]


def test_uniform_windows_import_back_as_the_windowed_pool_they_are():
    back = load_onnx(compiled("3x12x8", "adaptive_avgpool((4, 2))").to_onnx())
    ((node,),) = [back.nodes]
    assert (node.op, node.attrs["kernel"], node.attrs["stride"]) == ("avgpool", (3, 4), (3, 4))


def test_a_function_whose_tables_were_changed_is_refused():
    proto = compiled("3x7x5", "adaptive_avgpool((3, 4))").to_onnx()
    table = proto.graph.initializer[0]
    table.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(table) * 2, table.name))
    with pytest.raises(ModelFileError, match="are not the ones cnnc writes for its sizes"):
        load_onnx(proto)


def test_a_decompiled_adaptive_pool_compiles_to_the_same_network():
    model = compiled("3x7x5", "adaptive_maxpool((3, 4)) -> adaptive_avgpool(2)")
    text, _ = cnnc.Model(load_onnx(model.to_onnx())).to_program()
    assert "adaptive_maxpool((3, 4))" in text and "adaptive_avgpool(2)" in text
    x = model.random_input(2)
    np.testing.assert_array_equal(cnnc.compile(text, opt_level=0).run(x), model.run(x))


def test_the_dump_shows_the_output_size():
    assert "adaptive_avgpool2d(%x)  size=7x7" in compiled("3x9x9", "adaptive_avgpool(7)").dump()
    assert "adaptive_maxpool1d(%x)  size=3" in compiled("3x9", "adaptive_maxpool(3)").dump()


# ---- passes ----------------------------------------------------------------------------------


def test_an_adaptive_pool_to_its_input_size_is_removed_at_O1():
    # AlexNet's AdaptiveAvgPool2d(6) on its 6x6 map, VGG's (7) on 7x7.
    for shape, size in (("256x6x6", 6), ("512x7x7", 7)):
        model = compiled(shape, f"adaptive_avgpool({size}) -> relu", opt_level=1)
        assert [n.op for n in model.graph.nodes] == ["relu"]


def test_convolutionalize_makes_uniform_adaptive_pools_windowed_pools():
    text = net("3x16x16", "conv(8, 3, pad=1) -> adaptive_maxpool(4) -> fc(10)")
    model = cnnc.compile(text, fully_conv=True)
    pools = [n for n in model.graph.nodes if n.op == "maxpool"]
    assert [(p.attrs["kernel"], p.attrs["stride"]) for p in pools] == [((4, 4), (4, 4))]
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32), dtype=np.float32)
    assert model.run(x).shape == (1, 10, 5, 5)


def test_convolutionalize_refuses_windows_of_different_sizes():
    text = net("3x14x14", "conv(8, 3, pad=1) -> adaptive_avgpool(4) -> fc(10)")
    with pytest.raises(CnncError, match="pools 14x14 into 4x4 by windows of different sizes"):
        cnnc.compile(text, fully_conv=True)


# ---- mistakes in programs ---------------------------------------------------------------------

ERRORS = [
    ("adaptive_avgpool", 3, "adaptive_avgpool needs size"),
    ("adaptive_avgpool(0)", 20, "adaptive_avgpool size must be positive, got 0"),
    ("adaptive_maxpool((2, 2, 2))", 20, "size has 3 values but the input has 2 spatial axes"),
    ("adaptive_maxpool(2.5)", 20, "adaptive_maxpool size must be an integer"),
    ("adaptive_avgpool(size=-1)", 20, "adaptive_avgpool size must be positive, got -1"),
    ("fc(4) -> adaptive_avgpool(2)", 12, "adaptive_avgpool needs a feature map N×C×L"),
]


@pytest.mark.parametrize(("layer", "col", "message"), ERRORS, ids=[e[2][:40] for e in ERRORS])
def test_a_mistake_in_an_adaptive_pool_is_one_error_at_its_place(layer, col, message):
    with pytest.raises(LayerError) as info:
        cnnc.compile(f"network n(x: 4x8x8) {{\n  {layer}\n}}\n")
    assert (info.value.location.line, info.value.location.col) == (2, col)
    assert info.value.message.startswith(message), info.value.message
