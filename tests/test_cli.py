"""The ``cnnc`` command end to end, through a subprocess, as a user runs it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import EXAMPLES, run_cnnc

LENET = EXAMPLES / "lenet5.cnn"


def assert_clean_failure(proc, first_line: str) -> None:
    """Exit status 1, one report on stderr starting with ``first_line``, no traceback."""
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines()[0] == first_line
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_compile_writes_the_onnx_file_beside_the_program_by_default(tmp_path):
    program = tmp_path / "lenet5.cnn"
    program.write_text(LENET.read_text())
    proc = run_cnnc("compile", program)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"wrote {tmp_path / 'lenet5.onnx'} (0.2 MB, 61,706 parameters)")
    assert "random He-normal weights (seed 0)" in proc.stderr
    onnx.checker.check_model(str(tmp_path / "lenet5.onnx"), full_check=True)


def test_compile_reports_the_size_of_what_it_wrote_not_of_a_stale_data_file(tmp_path):
    (tmp_path / "out.onnx.data").write_bytes(b"\0" * 5_000_000)  # left by an earlier compile
    proc = run_cnnc("compile", LENET, "-o", tmp_path / "out.onnx")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"wrote {tmp_path / 'out.onnx'} (0.2 MB, 61,706 parameters)")


def test_compile_with_output_and_opset(tmp_path):
    out = tmp_path / "out.onnx"
    proc = run_cnnc("compile", LENET, "-o", out, "--opset", "13")
    assert proc.returncode == 0, proc.stderr
    assert onnx.load(str(out)).opset_import[0].version == 13


def test_compile_with_an_unsupported_opset_fails_and_writes_nothing(tmp_path):
    out = tmp_path / "out.onnx"
    proc = run_cnnc("compile", LENET, "-o", out, "--opset", "7")
    assert_clean_failure(proc, proc.stderr.splitlines()[0])
    assert "error: opset 7 is not supported: cnnc emits opsets 13 to" in proc.stderr
    assert not out.exists()


def test_a_program_with_a_mistake_fails_cleanly_and_writes_nothing(tmp_path):
    program = tmp_path / "bad.cnn"
    program.write_text("network n(x: 16x4x4) {\n  conv(8, 3, pad=1) -> relu\n  maxpool(5)\n}\n")
    proc = run_cnnc("compile", program)
    assert_clean_failure(
        proc,
        f"{program}:3:3: error: maxpool kernel 5x5 is larger than its input 4x4 "
        "(N,8,4,4): its output would be 0x0",
    )
    assert proc.stderr.splitlines()[1:] == [
        "      maxpool(5)",
        "      ^~~~~~~~~~",
        "hint: drop this maxpool, use a smaller kernel, or pad its input",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.cnn"]


def test_a_failed_compile_keeps_an_existing_output_file_intact(tmp_path):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"previous")
    program = tmp_path / "bad.cnn"
    program.write_text("network n(x: 1x4x4) { conv(8, 3, groups=2) }")
    assert run_cnnc("compile", program, "-o", out).returncode == 1
    assert out.read_bytes() == b"previous"


def test_a_missing_program_file_is_one_clean_error(tmp_path):
    proc = run_cnnc("compile", tmp_path / "absent.cnn")
    assert_clean_failure(proc, f"{tmp_path / 'absent.cnn'}: error: file not found")


def test_debug_shows_the_traceback(tmp_path):
    proc = run_cnnc("--debug", "compile", tmp_path / "absent.cnn")
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr


def test_a_usage_mistake_exits_1():
    proc = run_cnnc("compile")
    assert proc.returncode == 1
    assert "error: the following arguments are required: MODEL" in proc.stderr


def test_run_prints_the_output_shape_and_top_classes():
    proc = run_cnnc("run", LENET, "--batch", "2", "--top", "3")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:2] == ["lenet5 on input [2, 1, 28, 28] (numpy)", "output shape [2, 10]"]
    assert lines[2].startswith("  item 0: class ") and lines[2].count("class") == 3
    assert len(lines) == 4


def test_run_compares_both_backends_on_a_compiled_onnx_file(tmp_path):
    out = tmp_path / "lenet5.onnx"
    assert run_cnnc("compile", LENET, "-o", out).returncode == 0
    proc = run_cnnc("run", out, "--compare", "--batch", "3")
    assert proc.returncode == 0, proc.stderr
    assert "numpy interpreter and onnxruntime agree: max |difference|" in proc.stdout
    assert "random" not in proc.stderr  # the ONNX file carries its weights


@pytest.mark.parametrize("backend", ["numpy", "onnxruntime"])
def test_run_reads_an_input_and_saves_the_output(tmp_path, backend):
    x = np.random.default_rng(0).standard_normal((4, 1, 28, 28)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "y.npy"
    proc = run_cnnc("run", LENET, "--input", tmp_path / "x.npy", "--backend", backend, "-o", out)
    assert proc.returncode == 0, proc.stderr
    y = np.load(out)
    assert y.shape == (4, 10)
    np.testing.assert_allclose(y.sum(axis=1), 1, rtol=1e-5)


def test_the_same_seed_gives_the_same_output_in_both_backends(tmp_path):
    outs = []
    for backend in ("numpy", "onnxruntime"):
        out = tmp_path / f"{backend}.npy"
        assert (
            run_cnnc("run", LENET, "--backend", backend, "--seed", "3", "-o", out).returncode == 0
        )
        outs.append(np.load(out))
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("array", "found"),
    [
        (np.zeros((2, 3, 28, 28), np.float32), "float32 [2, 3, 28, 28]"),
        (np.zeros((2, 1, 28, 28), np.float64), "float64 [2, 1, 28, 28]"),
        (np.zeros((1, 28, 28), np.float32), "float32 [1, 28, 28]"),
    ],
    ids=["channels", "dtype", "rank"],
)
def test_an_input_that_does_not_fit_shows_both_shapes(tmp_path, array, found):
    np.save(tmp_path / "x.npy", array)
    proc = run_cnnc("run", LENET, "--input", tmp_path / "x.npy")
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[1] == (
        f"{tmp_path / 'x.npy'}: error: input %image expects f32[N,1,28,28], got {found}"
    )
    assert "Traceback" not in proc.stderr


def test_an_input_file_that_is_not_npy_is_an_error(tmp_path):
    (tmp_path / "x.npy").write_text("hello")
    proc = run_cnnc("run", LENET, "--input", tmp_path / "x.npy")
    assert proc.returncode == 1
    assert f"{tmp_path / 'x.npy'}: error: not a NumPy array file (.npy or .npz)" in proc.stderr


def test_run_with_weights(tmp_path):
    model = run_cnnc("run", EXAMPLES / "tutorial_conv.cnn", "-o", tmp_path / "y.npy")
    assert model.returncode == 0
    np.savez(
        tmp_path / "w.npz",
        **{
            "demo.weight": np.ones((2, 3, 3, 3), np.float32),
            "demo.bias": np.array([0, 1], np.float32),
        },
    )
    x = np.ones((1, 3, 7, 7), np.float32)
    np.save(tmp_path / "x.npy", x)
    proc = run_cnnc(
        "run",
        EXAMPLES / "tutorial_conv.cnn",
        "--weights",
        tmp_path / "w.npz",
        "--input",
        tmp_path / "x.npy",
        "-o",
        tmp_path / "y.npy",
    )
    assert proc.returncode == 0, proc.stderr
    assert "random" not in proc.stderr
    y = np.load(tmp_path / "y.npy")
    np.testing.assert_array_equal(y[0, 0], np.full((3, 3), 27.0))
    np.testing.assert_array_equal(y[0, 1], np.full((3, 3), 28.0))


def test_a_weights_file_that_does_not_fit_names_the_tensor(tmp_path):
    np.savez(
        tmp_path / "w.npz",
        **{"demo.weight": np.ones((2, 3, 5, 5), np.float32), "demo.bias": np.zeros(2, np.float32)},
    )
    proc = run_cnnc(
        "compile",
        EXAMPLES / "tutorial_conv.cnn",
        "--weights",
        tmp_path / "w.npz",
        "-o",
        tmp_path / "m.onnx",
    )
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[:2] == [
        f"{tmp_path / 'w.npz'}: error: weights do not fit network tutorial_conv:",
        "  demo.weight has shape [2,3,5,5], expected [2,3,3,3]",
    ]
    assert not (tmp_path / "m.onnx").exists()


def test_dump_is_the_same_from_run_to_run():
    first, second = run_cnnc("dump", LENET), run_cnnc("dump", LENET)
    assert first.returncode == 0
    assert first.stdout == second.stdout
    assert first.stdout.startswith(
        "network lenet5  (-O2: remove-identity, channels-first, fuse-transpose-reshape, "
        "fuse-pad, merge-affine, fold-bn, fold-affine, fc-to-conv, fuse-conv-act, cse, dce)\n"
        "  input  %image : f32[N,1,28,28]\n"
    )


def test_dump_of_an_onnx_file(tmp_path):
    assert run_cnnc("compile", LENET, "-O0", "-o", tmp_path / "l.onnx").returncode == 0
    proc = run_cnnc("dump", tmp_path / "l.onnx", "-O0")
    assert proc.returncode == 0
    assert "%c1         : f32[N,6,28,28]  = conv2d(%image, c1.weight, c1.bias)" in proc.stdout


def test_summary_prints_the_parameter_table():
    proc = run_cnnc("summary", EXAMPLES / "alexnet.cnn")
    assert proc.returncode == 0
    assert "parameters: 61,100,840 (244.4 MB as float32)" in proc.stdout
    header = ["layer", "op", "kernel", "input", "output", "params", "MACs", "memory", "field"]
    assert proc.stdout.splitlines()[3].split() == [*header, "connected", "to"]


def test_an_onnx_file_that_is_not_onnx_is_one_clean_error(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"\x08\x07garbage")
    proc = run_cnnc("run", tmp_path / "m.onnx")
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"{tmp_path / 'm.onnx'}: error: ")
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "command", ["compile", "run", "dump", "summary", "bench", "import", "graph"]
)
def test_every_command_has_help_with_an_example(command):
    proc = run_cnnc(command, "--help")
    assert proc.returncode == 0
    assert f"examples:\n  cnnc {command} " in proc.stdout


# ---- optimization options ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "heading"),
    [
        (
            [],
            "network lenet5  (-O2: remove-identity, channels-first, fuse-transpose-reshape, "
            "fuse-pad, merge-affine, fold-bn, fold-affine, fc-to-conv, fuse-conv-act, cse, dce)",
        ),
        (["-O1"], "network lenet5  (-O1: remove-identity, dce)"),
        (["-O0"], "network lenet5  (-O0)"),
        (["--passes", "fc-to-conv,dce"], "network lenet5  (--passes: fc-to-conv, dce)"),
    ],
    ids=["default", "O1", "O0", "passes"],
)
def test_dump_heads_with_the_pipeline(flags, heading):
    proc = run_cnnc("dump", LENET, *flags)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == heading


def test_an_unknown_pass_is_one_clean_error():
    proc = run_cnnc("compile", LENET, "--passes", "fold-bn,fusion")
    assert_clean_failure(
        proc,
        "error: unknown pass 'fusion'; known passes: remove-identity, dce, channels-first, "
        "merge-affine, fold-bn, fold-affine, fc-to-conv, fuse-conv-act, convolutionalize, "
        "fuse-transpose-reshape, fuse-pad, cse",
    )


def test_dump_after_stops_the_pipeline_there():
    proc = run_cnnc("dump", LENET, "--after", "fc-to-conv")
    assert proc.stdout.splitlines()[0] == (
        "network lenet5  (-O2: remove-identity, channels-first, fuse-transpose-reshape, "
        "fuse-pad, merge-affine, fold-bn, fold-affine, fc-to-conv)"
    )
    assert "= relu(%f1)" in proc.stdout


def test_print_ir_after_all_goes_to_stderr(tmp_path):
    proc = run_cnnc("compile", LENET, "-o", tmp_path / "m.onnx", "--print-ir-after-all")
    assert proc.returncode == 0
    headings = [line for line in proc.stderr.splitlines() if line.startswith("# IR after")]
    assert headings == [
        f"# IR after {p}"
        for p in (
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
        )
    ]
    assert proc.stdout.startswith("wrote ")


def test_print_ir_after_one_pass(tmp_path):
    proc = run_cnnc("run", LENET, "--print-ir-after", "fuse-conv-act")
    assert proc.returncode == 0
    assert proc.stderr.count("# IR after") == 1
    assert "conv2d+relu(%image, c1.weight, c1.bias)" in proc.stderr


def test_verify_each_passes_on_an_example():
    proc = run_cnnc("run", EXAMPLES / "cifar_bn.cnn", "--verify-each", "--compare")
    assert proc.returncode == 0, proc.stderr
    assert "agree" in proc.stdout


def test_inline_functions_writes_plain_ops(tmp_path):
    out = tmp_path / "m.onnx"
    assert run_cnnc("compile", LENET, "-o", out, "--inline-functions").returncode == 0
    assert not onnx.load(str(out)).functions


def test_a_fully_convolutional_model_runs_on_a_larger_image(tmp_path):
    out = tmp_path / "fcn.onnx"
    assert run_cnnc("compile", LENET, "--fully-conv", "-o", out).returncode == 0
    image = np.random.default_rng(0).standard_normal((1, 1, 60, 44)).astype(np.float32)
    np.save(tmp_path / "x.npy", image)
    proc = run_cnnc("run", out, "--input", tmp_path / "x.npy", "--compare")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1] == "output shape [1, 10, 9, 5]"


def test_summary_fully_conv_reports_the_window_and_the_map():
    proc = run_cnnc("summary", LENET, "--fully-conv", "--input-size", "60x44")
    assert proc.returncode == 0, proc.stderr
    assert "fully convolutional: output stride 4x4, receptive field 32x32" in proc.stdout
    assert "an input of 60x44 gives a score map [N,10,9,5]" in proc.stdout


def test_summary_input_size_needs_fully_conv():
    proc = run_cnnc("summary", LENET, "--input-size", "60x44")
    assert proc.returncode == 1
    assert "--input-size applies with --fully-conv" in proc.stderr
