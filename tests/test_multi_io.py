"""Networks of several inputs and outputs, values bound from a layer's several outputs, and
the sizes of values in argument expressions."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from conftest import EXAMPLES, run_cnnc
from helpers import assert_agree, ort_session

import cnnc
from cnnc.errors import LayerError

TWO_IN_TWO_OUT = """
block project(c=in.channels * 2) { conv(c, 3, pad=1) -> relu }
network pair(image: 3x8x8, mask: 1x8x8) -> (features, gated) {
    features = image -> project
    m = mask -> conv(features.channels, 1) -> sigmoid
    gated = mul(features, m)
}
"""


def test_a_network_takes_several_inputs_and_gives_the_declared_outputs():
    model = cnnc.compile(TWO_IN_TWO_OUT, opt_level=0)
    assert model.input_names == ["image", "mask"]
    assert model.output_names == ["features", "gated"]
    assert [v.type.shape for v in model.graph.outputs] == [("N", 6, 8, 8), ("N", 6, 8, 8)]


@pytest.mark.parametrize("level", [0, 2])
def test_several_inputs_and_outputs_agree_with_onnxruntime(level):
    model = cnnc.compile(TWO_IN_TWO_OUT, opt_level=level)
    image, mask = model.random_inputs(3, seed=1)
    features, gated = model.run(image, mask)
    proto = model.to_onnx()
    onnx.checker.check_model(proto, full_check=True)
    assert [o.name for o in proto.graph.output] == ["features", "gated"]
    theirs = ort_session(proto).run(None, {"image": image, "mask": mask})
    assert_agree(features, theirs[0])
    assert_agree(gated, theirs[1])
    # features come out of a relu; gated scales each of them by a sigmoid in (0, 1)
    assert (features >= 0).all()
    positive = features > 1e-3
    ratio = gated[positive] / features[positive]
    assert ((ratio > 0) & (ratio < 1)).all()
    named = model.run_named(image, mask, backend="onnxruntime")
    assert list(named) == ["features", "gated"]


def test_the_first_input_has_the_same_random_values_with_or_without_others():
    one = cnnc.compile("network n(image: 3x8x8) { relu }")
    two = cnnc.compile(TWO_IN_TWO_OUT)
    np.testing.assert_array_equal(one.random_input(2, seed=4), two.random_inputs(2, seed=4)[0])


def test_random_input_of_a_network_of_two_inputs_says_to_use_random_inputs():
    with pytest.raises(cnnc.CnncError) as info:
        cnnc.compile(TWO_IN_TWO_OUT).random_input()
    assert "has 2 inputs (%image, %mask)" in info.value.message
    assert "random_inputs()" in info.value.hint


def test_inputs_of_different_batch_sizes_are_refused():
    model = cnnc.compile(TWO_IN_TWO_OUT)
    image = model.random_inputs(2)[0]
    mask = model.random_inputs(3)[1]
    with pytest.raises(cnnc.CnncError) as info:
        model.run(image, mask)
    assert info.value.message == (
        "the inputs of one run need one batch size, got %image 2, %mask 3"
    )


def test_a_decompiled_network_of_two_inputs_and_outputs_compiles_back_the_same():
    model = cnnc.compile(TWO_IN_TWO_OUT, opt_level=0)
    text, weights = model.to_program()
    assert "network pair(image: 3x8x8, mask: 1x8x8) -> (features, gated) {" in text
    back = cnnc.compile(text, opt_level=0)
    for name, array in weights.items():
        back.graph.params[name].set_data(array)
    xs = model.random_inputs(2)
    for a, b in zip(back.run(*xs), model.run(*xs), strict=True):
        np.testing.assert_array_equal(a, b)


def error(text: str) -> cnnc.CnncError:
    with pytest.raises(cnnc.CnncError) as info:
        cnnc.compile(text)
    return info.value


def test_an_output_that_is_not_a_value_is_an_error_with_the_closest_name():
    err = error("network n(x: 3x8x8) -> (y, zz) {\n y = x -> relu\n z = y -> tanh\n}")
    assert isinstance(err, LayerError)
    assert err.message == "output 'zz' is not a value of network n"
    assert err.hint == "did you mean z?"
    assert (err.location.line, err.location.col) == (1, 28)


def test_an_output_listed_twice_is_an_error():
    err = error("network n(x: 3x8x8) -> (y, y) { y = x -> relu }")
    assert err.message == "output 'y' is listed twice"


def test_an_input_cannot_be_an_output():
    err = error("network n(x: 3x8x8) -> (y, x) { y = x -> relu }")
    assert err.message == "output 'x' is an input; outputs are computed"


def test_an_unused_second_input_is_a_warning():
    model = cnnc.compile("network n(x: 3x8x8, extra: 3x8x8) { relu }")
    assert [w.message for w in model.warnings] == ["value 'extra' is never used"]


def test_binding_two_names_to_one_value_is_an_error_that_counts_them():
    err = error("network n(x: 3x8x8) {\n a, b = x -> relu\n add(a, b)\n}")
    assert err.message == "the chain gives one value, but 2 names are bound to it"
    assert err.location.line == 2


def test_sizes_of_values_are_read_in_argument_expressions():
    model = cnnc.compile(
        "block half(c=in.channels // 2) { conv(c, 1) }\n"
        "network n(x: 8x6x4) { y = x -> half  conv(y.channels + x.height + x.width, 1) }",
        opt_level=0,
    )
    assert model.graph.outputs[0].shape == ("N", 4 + 6 + 4, 6, 4)


def test_a_size_a_value_does_not_have_is_an_error_naming_those_it_has():
    err = error("network n(x: 8x16) {\n conv(x.height, 1)\n}")
    assert err.message == "x (f32[N,8,16]) has no size 'height'; it has channels, length"
    assert (err.location.line, err.location.col) == (2, 7)


def test_the_size_of_an_undefined_value_is_an_error():
    err = error("network n(x: 8x6x6) { conv(y.channels, 1) }")
    assert err.message == "undefined value 'y'"


def test_run_takes_one_input_file_per_input_by_name_and_writes_an_npz(tmp_path):
    program = tmp_path / "pair.cnn"
    program.write_text(TWO_IN_TWO_OUT)
    model = cnnc.compile(program)
    image, mask = model.random_inputs(2, seed=7)
    np.save(tmp_path / "image.npy", image)
    np.save(tmp_path / "mask.npy", mask)
    out = tmp_path / "out.npz"
    proc = run_cnnc(
        "run", program, "--input", f"mask={tmp_path / 'mask.npy'}",
        "--input", f"image={tmp_path / 'image.npy'}", "-o", out, "--compare",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "output %gated: shape [2, 6, 8, 8]" in proc.stdout
    with np.load(out) as saved:
        assert sorted(saved.files) == ["features", "gated"]
        np.testing.assert_array_equal(saved["gated"], model.run(image, mask)[1])


def test_run_reads_the_inputs_of_a_network_from_one_npz(tmp_path):
    program = tmp_path / "pair.cnn"
    program.write_text(TWO_IN_TWO_OUT)
    image, mask = cnnc.compile(program).random_inputs(1)
    np.savez(tmp_path / "x.npz", image=image, mask=mask)
    proc = run_cnnc("run", program, "--input", tmp_path / "x.npz")
    assert proc.returncode == 0, proc.stderr
    assert "pair on input [1, 3, 8, 8], [1, 1, 8, 8] (numpy)" in proc.stdout


def test_run_without_an_input_for_each_input_says_which_is_missing(tmp_path):
    program = tmp_path / "pair.cnn"
    program.write_text(TWO_IN_TWO_OUT)
    np.save(tmp_path / "image.npy", cnnc.compile(program).random_inputs(1)[0])
    proc = run_cnnc("run", program, "--input", tmp_path / "image.npy")
    assert proc.returncode == 1
    assert "error: no --input for mask" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_several_outputs_need_an_npz_to_be_saved(tmp_path):
    program = tmp_path / "pair.cnn"
    program.write_text(TWO_IN_TWO_OUT)
    proc = run_cnnc("run", program, "-o", tmp_path / "y.npy")
    assert proc.returncode == 1
    assert "pair has 2 outputs; -o needs an .npz file to hold them" in proc.stderr
    assert not (tmp_path / "y.npy").exists()


def test_a_damaged_image_given_as_input_is_named_in_the_error(tmp_path):
    """A PNG is read as an image (README, Seeing inside a network); one whose header is cut
    short is one error naming the file."""
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(32))
    proc = run_cnnc("run", EXAMPLES / "lenet5.cnn", "--input", tmp_path / "x.png")
    assert proc.returncode == 1
    assert f"{tmp_path / 'x.png'}: error: cannot decode the image" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_single_input_network_takes_an_npz_of_one_array(tmp_path):
    x = cnnc.compile(EXAMPLES / "lenet5.cnn").random_input(2)
    np.savez(tmp_path / "x.npz", batch=x)
    proc = run_cnnc("run", EXAMPLES / "lenet5.cnn", "--input", tmp_path / "x.npz")
    assert proc.returncode == 0, proc.stderr
    assert "lenet5 on input [2, 1, 28, 28]" in proc.stdout


def test_every_file_cnnc_writes_has_the_mode_the_umask_gives(tmp_path):
    mask = os.umask(0)
    os.umask(mask)
    expected = 0o666 & ~mask
    onnx_file = tmp_path / "m.onnx"
    assert run_cnnc("compile", EXAMPLES / "lenet5.cnn", "-o", onnx_file).returncode == 0
    assert run_cnnc("run", onnx_file, "-o", tmp_path / "y.npy").returncode == 0
    assert run_cnnc("import", onnx_file, "-o", tmp_path / "m.cnn").returncode == 0
    for name in ("m.onnx", "y.npy", "m.cnn", "m.npz"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, name


def test_summary_lists_the_tensors_a_weights_file_holds():
    proc = run_cnnc("summary", EXAMPLES / "lenet5.cnn", "--tensors")
    assert proc.returncode == 0
    assert "network lenet5: 10 parameter tensors" in proc.stdout
    assert any(
        line.split() == ["f1.weight", "[120,400]", "48,000", "learned"]
        for line in proc.stdout.splitlines()
    )
