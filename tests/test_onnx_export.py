"""ONNX export: checked models, the opset range, a symbolic batch axis, names from the program."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import EXAMPLES
from helpers import assert_agree, ort_session
from onnx.reference import ReferenceEvaluator

import cnnc
from cnnc.backends import onnx_export
from cnnc.errors import UsageError


@pytest.fixture(scope="module")
def lenet():
    return cnnc.compile(EXAMPLES / "lenet5.cnn", opt_level=0)


def test_the_newest_opset_is_what_both_onnx_and_onnxruntime_support():
    newest = onnx_export.max_opset()
    assert newest <= onnx.defs.onnx_opset_version()
    assert newest == onnx_export.onnxruntime_max_opset()
    assert newest >= 17


@pytest.mark.parametrize("end", ["oldest", "newest"])
def test_each_end_of_the_opset_range_checks_and_runs(lenet, tmp_path, end):
    opset = onnx_export.MIN_OPSET if end == "oldest" else onnx_export.max_opset()
    path = tmp_path / "m.onnx"
    lenet.to_onnx(path, opset=opset)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", opset)]
    x = lenet.random_input(2)
    y = ort_session(model).run(None, {"image": x})[0]
    assert_agree(y, lenet.run(x))


@pytest.mark.parametrize("opset", [12, 99])
def test_an_opset_outside_the_range_is_a_clear_error(lenet, opset):
    with pytest.raises(UsageError) as info:
        lenet.to_onnx(opset=opset)
    newest = onnx_export.max_opset()
    assert info.value.message.startswith(
        f"opset {opset} is not supported: cnnc emits opsets 13 to {newest} (the newest that "
        f"onnx {onnx.__version__} and onnxruntime {ort.__version__} support)"
    )


def test_default_opset_is_17(lenet):
    assert lenet.to_onnx().opset_import[0].version == 17


def test_the_batch_axis_is_the_symbol_n_on_inputs_and_outputs(lenet):
    g = lenet.to_onnx().graph
    for vi in (g.input[0], g.output[0]):
        assert vi.type.tensor_type.shape.dim[0].dim_param == "N"
    assert [d.dim_value for d in g.input[0].type.tensor_type.shape.dim[1:]] == [1, 28, 28]


def test_no_reshape_bakes_in_a_batch_size(lenet):
    ops = {n.op_type for n in lenet.to_onnx().graph.node}
    assert "Reshape" not in ops
    session = ort_session(lenet.to_onnx())
    for batch in (1, 5):
        assert session.run(None, {"image": lenet.random_input(batch)})[0].shape == (batch, 10)


def test_intermediate_shapes_are_recorded_as_value_info(lenet):
    g = lenet.to_onnx().graph
    shapes = {
        vi.name: [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
        for vi in g.value_info
    }
    assert shapes["c1.maxpool"] == ["N", 6, 14, 14]
    assert shapes["f1.flatten"] == ["N", 400]
    assert len(shapes) == len(lenet.graph.nodes) - 1


def test_node_and_initializer_names_follow_the_program(lenet):
    g = lenet.to_onnx().graph
    assert [n.name for n in g.node][:3] == ["c1", "c1.relu", "c1.maxpool"]
    assert [i.name for i in g.initializer] == [
        "c1.weight",
        "c1.bias",
        "c2.weight",
        "c2.bias",
        "f1.weight",
        "f1.bias",
        "f2.weight",
        "f2.bias",
        "f3.weight",
        "f3.bias",
    ]
    assert g.name == "lenet5"


@pytest.mark.parametrize("inline", [False, True])
def test_the_nodes_and_values_an_op_adds_give_way_to_the_names_the_program_gives(inline):
    # Found by the fuzzer: a 1-D lrn's inner LRN took the name l2.lrn of the next layer,
    # and onnx's checker refused the model (a value of two producers); so could a label.
    model = cnnc.compile(
        "network n(image: 1x52) { l2: lrn(3) -> lrn(1) -> a: affine -> a.scaled: relu }"
    )
    exported = model.to_onnx(inline_functions=inline)
    onnx.checker.check_model(exported, full_check=True)
    names = [n.name for n in exported.graph.node]
    assert len(set(names)) == len(names)
    assert {"l2", "l2.lrn", "a", "a.scaled"} <= set(names)
    outputs = [v for n in exported.graph.node for v in n.output]
    assert len(set(outputs)) == len(outputs)
    x = model.random_input(batch=2)
    assert_agree(ort_session(exported).run(None, {"image": x})[0], model.run(x))


def test_producer_name_and_version_are_set(lenet):
    model = lenet.to_onnx()
    assert (model.producer_name, model.producer_version) == ("cnnc", cnnc.__version__)


def test_onnx_reference_evaluator_agrees_with_the_interpreter():
    model = cnnc.compile(EXAMPLES / "conv1d.cnn")
    x = model.random_input(3)
    (y,) = ReferenceEvaluator(model.to_onnx()).run(None, {"signal": x})
    assert_agree(y, model.run(x))


def test_an_exported_model_imports_back_to_the_same_graph_and_outputs(lenet, tmp_path):
    path = tmp_path / "lenet5.onnx"
    lenet.to_onnx(path)
    back = cnnc.load(path, opt_level=0)
    assert [(n.op, n.name, n.attrs) for n in back.graph.nodes] == [
        (n.op, n.name, n.attrs) for n in lenet.graph.nodes
    ]
    x = lenet.random_input(2)
    np.testing.assert_array_equal(back.run(x), lenet.run(x))


def test_large_models_keep_their_weights_in_an_external_data_file(lenet, tmp_path):
    path = tmp_path / "big.onnx"
    written = onnx_export.save(lenet.to_onnx(), path, external_threshold=1000)
    assert written == [path, tmp_path / "big.onnx.data"]
    assert path.stat().st_size < 20_000 < (tmp_path / "big.onnx.data").stat().st_size
    x = lenet.random_input(1)
    y = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x})
    assert_agree(y[0], lenet.run(x))


def test_a_failed_export_leaves_no_file_behind(lenet, tmp_path):
    path = tmp_path / "m.onnx"
    with pytest.raises(UsageError):
        lenet.to_onnx(path, opset=5)
    assert list(tmp_path.iterdir()) == []


def test_a_model_that_fails_the_checker_is_not_written(lenet, tmp_path):
    model = lenet.to_onnx()
    model.graph.node[0].input[0] = "nowhere"
    with pytest.raises(cnnc.CnncError, match="fails the ONNX checker"):
        onnx_export.save(model, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []
