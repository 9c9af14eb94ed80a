"""Training on data: `cnnc train`, `cnnc eval`, cnnc.fit and cnnc.evaluate (README, Training)."""

from __future__ import annotations

import builtins
import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import CNNC, run_cnnc
from helpers import assert_agree

import cnnc
from cnnc.backends.interpreter import Interpreter
from cnnc.cli import main
from cnnc.data import load_digits, split
from cnnc.frontend.lower import lower
from cnnc.frontend.parser import parse
from cnnc.train.step import Optimizer, build_step
from cnnc.train.trainer import Interrupted, Trainer, initial_weights

TINY = """network tiny(image: 1x8x8) {
    c1: conv(8, 3, pad=1) -> bn -> relu -> maxpool(2)
    out: fc(10)
}
"""


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.cnn"
    path.write_text(TINY)
    return path


def small_data(n: int = 150, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` rows of the digits, in a seeded order (the file's rows are sorted by writer)."""
    digits = load_digits()
    rows = np.random.default_rng(seed).permutation(len(digits))[:n]
    return digits.x[rows], digits.y[rows]


def graph_of(text: str):
    return lower(parse(text), None)


# ---- learning ---------------------------------------------------------------------------------


def test_a_tiny_network_learns_the_digits_and_its_loss_falls(tiny):
    result = cnnc.fit(tiny, "digits", epochs=4, lr=0.01, seed=0)
    losses = [e.train_loss for e in result.history]
    assert losses == sorted(losses, reverse=True)
    assert losses[-1] < 0.5 * losses[0]
    # Ten classes: chance is 10%. Measured: 98.3% after 4 epochs (loss 0.96 to 0.10).
    assert result.history[-1].val_accuracy > 0.9
    assert len(result.split.val) == 359 and len(result.split.train) == 1438


def test_the_validation_rows_are_fixed_disjoint_and_the_same_for_every_seed():
    rows = split(1797, 0.2)
    expected = np.sort(np.random.default_rng(0).permutation(1797)[:359])
    assert np.array_equal(rows.val, expected)
    assert np.array_equal(np.sort(np.concatenate([rows.train, rows.val])), np.arange(1797))
    assert len(split(1797, 0).val) == 0


def test_the_saved_tensors_have_pytorchs_names_order_and_batch_counter(tiny, tmp_path):
    out = tmp_path / "w.npz"
    result = cnnc.fit(tiny, small_data(100), out, epochs=2, batch=32, val_split=0)
    assert list(result.weights) == [
        "c1.weight",
        "c1.bias",
        "c1.bn.weight",
        "c1.bn.bias",
        "c1.bn.running_mean",
        "c1.bn.running_var",
        "c1.bn.num_batches_tracked",
        "out.weight",
        "out.bias",
    ]
    with np.load(out, allow_pickle=False) as saved:
        assert list(saved.keys()) == list(result.weights)
        counter = saved["c1.bn.num_batches_tracked"]
        assert counter.dtype == np.int64 and counter.shape == () and int(counter) == 8
        for name, array in result.weights.items():
            assert np.array_equal(saved[name], array)
    assert result.steps == 8  # 4 steps per epoch (32, 32, 32, 4)


def test_training_starts_from_pytorchs_batch_norm_and_cnncs_seeded_weights():
    g = graph_of(TINY)
    init = initial_weights(g, seed=3)
    assert np.all(init["c1.bn.weight"] == 1) and np.all(init["c1.bn.bias"] == 0)
    assert np.all(init["c1.bn.running_mean"] == 0) and np.all(init["c1.bn.running_var"] == 1)
    # He-normal: std sqrt(2 / fan_in), fan_in 9.
    assert abs(init["c1.weight"].std() - np.sqrt(2 / 9)) < 0.15
    assert not np.array_equal(init["c1.weight"], initial_weights(g, seed=4)["c1.weight"])


# ---- reproducibility --------------------------------------------------------------------------


def test_without_shuffling_step_k_takes_rows_k_b_to_k_b_plus_b_and_runs_are_identical(tiny):
    x, y = small_data(150)
    opt = Optimizer("sgd", momentum=0.9, weight_decay=1e-3)
    kw = dict(epochs=2, batch=64, lr=0.05, optimizer=opt, shuffle=False, val_split=0, seed=5)
    first = cnnc.fit(tiny, (x, y), **kw)
    second = cnnc.fit(tiny, (x, y), **kw)
    for name in first.weights:
        assert np.array_equal(first.weights[name], second.weights[name]), name

    # The same steps by hand: rows 0-63, 64-127, then the short batch 128-149, twice.
    g = graph_of(TINY)
    step = build_step(g, loss="cross_entropy", optimizer=opt)
    state = {**initial_weights(g, 5), **step.initial_optimizer_state()}
    interpreter = Interpreter(step.graph)
    for _ in range(2):
        for lo in (0, 64, 128):
            feeds = {**state, "image": x[lo : lo + 64], "labels": y[lo : lo + 64]}
            feeds["lr"] = np.array(0.05, np.float32)
            outs = interpreter.run(*[feeds[v.name] for v in step.graph.inputs])
            state.update(zip(step.state, outs, strict=False))
    for name in g.params:
        assert np.array_equal(first.weights[name], state[name]), name
    assert int(first.weights["c1.bn.num_batches_tracked"]) == 6


def test_a_different_seed_gives_different_weights(tiny):
    a = cnnc.fit(tiny, small_data(64), epochs=1, seed=0, val_split=0)
    b = cnnc.fit(tiny, small_data(64), epochs=1, seed=1, val_split=0)
    assert not np.array_equal(a.weights["c1.weight"], b.weights["c1.weight"])


# ---- checkpoints ------------------------------------------------------------------------------


def test_an_interrupt_after_epoch_1_leaves_epoch_1s_weights_in_the_file(tiny, tmp_path):
    out = tmp_path / "w.npz"
    data = small_data(100)

    def stop(epoch):
        raise KeyboardInterrupt

    with pytest.raises(Interrupted) as caught:
        cnnc.fit(tiny, data, out, epochs=5, on_epoch=stop)
    assert (
        caught.value.message == f"interrupted after epoch 1; {out} holds the weights after epoch 1"
    )
    one_epoch = cnnc.fit(tiny, data, epochs=1)
    with np.load(out, allow_pickle=False) as saved:
        for name, array in one_epoch.weights.items():
            assert np.array_equal(saved[name], array), name
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_loss_that_becomes_nan_names_epoch_and_step_and_keeps_the_last_checkpoint(tmp_path):
    out = tmp_path / "w.npz"
    trainer = Trainer(graph_of(TINY), optimizer=Optimizer("sgd"), lr=0.01, batch=50)
    data = cnnc.data.load(small_data(100))

    def blow_up(epoch):
        trainer.lr = np.inf

    with pytest.raises(cnnc.CnncError) as caught:
        trainer.fit(data, epochs=3, val_split=0, output_path=out, on_epoch=blow_up)
    assert caught.value.message == (
        f"the update made c1.weight NaN or infinite at epoch 2, step 1 of 2 (step 3 of the "
        f"run); {out} holds the weights after epoch 1"
    )
    with np.load(out, allow_pickle=False) as saved:
        assert int(saved["c1.bn.num_batches_tracked"]) == 2
        assert np.isfinite(saved["c1.weight"]).all()


@pytest.mark.parametrize("backend", ["numpy", "onnxruntime"])
def test_a_last_batch_of_one_row_through_a_batch_norm_of_vectors_is_refused(tmp_path, backend):
    """PyTorch refuses batch norm in training on one value per channel; so does cnnc, in
    both backends, naming the layer and the step (the 33rd row makes a batch of 1)."""
    out = tmp_path / "w.npz"
    graph = graph_of("network n(x: 1x8x8) { flatten -> fc(16) -> norm: bn -> relu -> fc(10) }")
    trainer = Trainer(graph, optimizer=Optimizer("sgd"), lr=0.01, batch=32, backend=backend)
    with pytest.raises(cnnc.CnncError) as caught:
        trainer.fit(cnnc.data.load(small_data(33)), epochs=1, val_split=0, output_path=out)
    assert caught.value.message.startswith(
        "batch norm norm would normalize one value per channel (a batch of 1 of f32[N,16])"
    )
    assert "at epoch 1, step 2 of 2" in caught.value.message
    assert caught.value.hint == "pick a --batch that leaves no last batch of a single row"
    assert not out.exists()


def test_ctrl_c_in_the_command_exits_130_and_keeps_the_last_whole_epoch(tiny, tmp_path):
    out = tmp_path / "w.npz"
    proc = subprocess.Popen(
        [str(CNNC), "train", str(tiny), "--data", "digits", "-o", str(out), "--epochs", "500"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = []
        while not any(line.startswith("epoch   2/500") for line in lines):
            lines.append(proc.stdout.readline())
            assert lines[-1], proc.stderr.read()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    (message,) = err.splitlines()
    assert message.startswith("cnnc: interrupted ")
    epochs = int(message.rsplit(" ", 1)[1])  # "... holds the weights after epoch E"
    assert epochs >= 2
    with np.load(out, allow_pickle=False) as saved:
        assert int(saved["c1.bn.num_batches_tracked"]) == 45 * epochs
    assert not list(tmp_path.glob(".*.tmp"))


# ---- the commands -----------------------------------------------------------------------------


def test_train_then_run_gives_the_trainers_predictions_and_eval_its_accuracy(tiny, tmp_path):
    out = tmp_path / "w.npz"
    proc = run_cnnc("train", tiny, "--data", "digits", "-o", out, "--epochs", "2", "--lr", "0.01")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == (
        "training tiny on digits: 1,438 training rows, 359 validation rows (--val-split 0.2); "
        "45 steps of 32 per epoch; adam lr 0.01; numpy; seed 0"
    )
    assert lines[1].startswith("epoch 1/2  train loss ")
    assert lines[3] == f"wrote {out} (9 tensors, after 2 epochs, 90 steps)"
    val_accuracy = lines[2].split(" acc ")[2].split("%")[0].strip()

    # The same run in Python gives the same weights, and its forward pass is cnnc run's.
    result = cnnc.fit(tiny, "digits", epochs=2, lr=0.01)
    with np.load(out, allow_pickle=False) as saved:
        for name, array in result.weights.items():
            assert np.array_equal(saved[name], array), name
    x = load_digits().x[result.split.val[:50]]
    np.save(tmp_path / "x.npy", x)
    proc = run_cnnc(
        "run", tiny, "--weights", out, "--input", tmp_path / "x.npy", "-o", tmp_path / "y.npy"
    )
    assert proc.returncode == 0, proc.stderr
    ran = np.load(tmp_path / "y.npy")
    mine = result.predict(x)
    np.testing.assert_allclose(ran, mine, rtol=1e-4, atol=1e-4)
    assert np.array_equal(ran.argmax(1), mine.argmax(1))

    proc = run_cnnc("eval", tiny, "--weights", out, "--data", "digits")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"accuracy {val_accuracy}% (")
    assert " of 359 validation items of digits)" in proc.stdout.splitlines()[0]
    assert "confusion matrix (rows: true class, columns: predicted class):" in proc.stdout


def test_both_backends_train_to_the_same_weights():
    # No conv bias before the bn: its true gradient is 0, and Adam turns each backend's
    # rounding noise in it into steps of the size of lr (README, Training).
    program = TINY.replace("pad=1)", "pad=1, bias=false)")
    ours = cnnc.fit(program, "digits", epochs=2, lr=0.01, backend="numpy")
    theirs = cnnc.fit(program, "digits", epochs=2, lr=0.01, backend="onnxruntime")
    for name, array in ours.weights.items():
        assert_agree(theirs.weights[name], array, name)  # measured: within 2e-7 after 90 steps
    for a, b in zip(ours.history, theirs.history, strict=True):
        assert a.train_accuracy == b.train_accuracy and a.val_accuracy == b.val_accuracy
        assert a.val_loss == pytest.approx(b.val_loss, rel=1e-5)


def test_evaluate_counts_the_confusion_of_each_class(tiny, tmp_path):
    out = tmp_path / "w.npz"
    result = cnnc.fit(tiny, "digits", out, epochs=1, lr=0.01)
    report = cnnc.evaluate(tiny, "digits", weights=out, split="all")
    assert report.count == 1797 and report.confusion.shape == (10, 10)
    digits = load_digits()
    predicted = result.predict(digits.x).argmax(1)
    assert report.accuracy == pytest.approx(np.mean(predicted == digits.y))
    for c in range(10):
        assert report.confusion[c].sum() == np.sum(digits.y == c)
        assert report.confusion[c, c] == np.sum((predicted == c) & (digits.y == c))


# ---- bad input ---------------------------------------------------------------------------------


def write_data(path, x, y):
    np.savez(path, x=x, y=y)
    return path


def bad_cases(tmp_path):
    x, y = small_data(40)
    d = tmp_path
    rows = np.arange(40)[:, None, None, None]
    return {
        "label out of range": (
            write_data(d / "a.npz", x, np.where(np.arange(40) == 7, 10, y)),
            "a.npz: error: y holds label 10 at row 7, but network tiny has 10 classes "
            "(labels 0 to 9)",
        ),
        "negative label": (
            write_data(d / "b.npz", x, np.where(np.arange(40) == 3, -1, y)),
            "b.npz: error: y holds a negative label, -1 at row 3",
        ),
        "wrong item shape": (
            write_data(d / "c.npz", x[:, :, :4, :], y),
            "c.npz: error: x holds items of 1×4×8, but network tiny takes 1×8×8",
        ),
        "float64 inputs": (
            write_data(d / "e.npz", x.astype(np.float64), y),
            "e.npz: error: x has dtype float64; cnnc trains on float32 "
            "(convert it: x.astype(numpy.float32))",
        ),
        "float labels": (
            write_data(d / "f.npz", x, y.astype(np.float32)),
            "f.npz: error: y has dtype float32; labels are integers (class numbers 0, 1, ...)",
        ),
        "one-hot labels": (
            write_data(d / "g.npz", x, np.eye(10, dtype=np.int64)[y]),
            "g.npz: error: y has shape [40, 10]; labels are one integer per item, shape [N]",
        ),
        "rows that do not pair": (
            write_data(d / "h.npz", x, y[:30]),
            "h.npz: error: x holds 40 items but y 30 labels; they pair row by row",
        ),
        "no labels": (
            _savez(d / "i.npz", inputs=x),
            "i.npz: error: the data file has no array x and no array y (it holds inputs)",
        ),
        "a header that claims more than the file holds": (
            _lying_header(d / "k.npz", y),
            "k.npz: error: cannot read the data file: x cannot be read: its header declares "
            "shape [1000000000, 1, 8, 8] of float32 (256,000,000,000 bytes), but only 256 "
            "bytes of data follow",
        ),
        "non-finite inputs": (
            write_data(d / "j.npz", np.where(rows == 2, np.float32(np.nan), x), y),
            "j.npz: error: x holds 64 NaN or infinite values",
        ),
    }


def _lying_header(path, y):
    """An .npz whose x claims 10⁹ images of 1×8×8 in 256 bytes of data."""
    import io
    import zipfile

    member = io.BytesIO()
    header = {"descr": "<f4", "fortran_order": False, "shape": (10**9, 1, 8, 8)}
    np.lib.format.write_array_header_1_0(member, header)
    member.write(b"\0" * 256)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", member.getvalue())
        buffer = io.BytesIO()
        np.save(buffer, y)
        archive.writestr("y.npy", buffer.getvalue())
    return path


def _savez(path, **arrays):
    np.savez(path, **arrays)
    return path


CASES = [
    "label out of range",
    "negative label",
    "wrong item shape",
    "float64 inputs",
    "float labels",
    "one-hot labels",
    "rows that do not pair",
    "no labels",
    "a header that claims more than the file holds",
    "non-finite inputs",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_data_is_one_clear_error_and_writes_nothing(case, tiny, tmp_path, capsys):
    data, message = bad_cases(tmp_path)[case]
    out = tmp_path / "w.npz"
    status = main(["train", str(tiny), "--data", str(data), "-o", str(out), "--epochs", "1"])
    err = capsys.readouterr().err
    assert status == 1
    assert err.splitlines()[0] == f"{tmp_path}/{message}"
    assert "Traceback" not in err
    assert not out.exists()


def test_a_network_without_parameters_is_a_clear_error(tmp_path, capsys):
    program = tmp_path / "none.cnn"
    program.write_text("network none(image: 10x1x1) {\n    flatten -> softmax\n}\n")
    out = tmp_path / "w.npz"
    x = np.zeros((4, 10, 1, 1), np.float32)
    data = write_data(tmp_path / "d.npz", x, np.arange(4))
    assert main(["train", str(program), "--data", str(data), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[0] == "error: network none has no parameters to train"
    assert not out.exists()


def test_a_loss_that_is_nan_from_the_start_writes_nothing(tiny, tmp_path, capsys):
    out = tmp_path / "w.npz"
    status = main(["train", str(tiny), "--data", "digits", "-o", str(out), "--lr", "1e30"])
    assert status == 1
    assert capsys.readouterr().err.splitlines()[0] == (
        "error: the loss became NaN at epoch 1, step 2 of 45 (step 2 of the run); "
        f"{out} was not written"
    )
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--momentum", "0.9"], "error: --momentum does not apply to --optimizer adam"),
        (
            ["--optimizer", "sgd", "--betas", "0.9,0.99", "--eps", "1e-6"],
            "error: --betas, --eps do not apply to --optimizer sgd",
        ),
        (
            ["--optimizer", "sgd", "--nesterov"],
            "error: Nesterov momentum needs sgd with a momentum and no dampening",
        ),
        (["--epochs", "0"], "error: --epochs must be at least 1, got 0"),
        (["--batch", "0"], "error: --batch must be at least 1, got 0"),
        (["--lr", "-1"], "error: --lr must be a positive number, got -1.0"),
        (["--val-split", "1"], "error: --val-split must be in [0, 1), got 1.0"),
    ],
)
def test_bad_options_are_one_clear_error(args, message, tiny, tmp_path, capsys):
    out = tmp_path / "w.npz"
    assert main(["train", str(tiny), "--data", "digits", "-o", str(out), *args]) == 1
    assert capsys.readouterr().err.splitlines()[0] == message
    assert not out.exists()


def test_training_refuses_standard_output(tiny, capsys):
    assert main(["train", str(tiny), "--data", "digits", "-o", "-"]) == 1
    assert capsys.readouterr().err.splitlines()[0] == (
        "error: training writes its weights after every epoch; -o - cannot hold them"
    )


def test_digits_without_scikit_learn_names_the_extra(tiny, tmp_path, capsys, monkeypatch):
    real_import = builtins.__import__

    def no_sklearn(name, *args, **kwargs):
        if name.startswith("sklearn"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    monkeypatch.delitem(sys.modules, "sklearn.datasets", raising=False)
    assert main(["train", str(tiny), "--data", "digits", "-o", str(tmp_path / "w.npz")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "error: the data set digits needs scikit-learn, which is not installed",
        "hint: pip install 'cnnc[data]' (or pip install scikit-learn)",
    ]


def test_eval_needs_weights(tiny, capsys):
    assert main(["eval", str(tiny), "--data", "digits"]) == 1
    assert capsys.readouterr().err.splitlines()[0] == "error: evaluation needs trained weights"


def test_training_from_a_weights_file_continues_its_batch_counters(tiny, tmp_path):
    first, second = tmp_path / "1.npz", tmp_path / "2.npz"
    data = small_data(100)
    a = cnnc.fit(tiny, data, first, epochs=1, batch=25, val_split=0)
    b = cnnc.fit(tiny, data, second, epochs=1, batch=25, val_split=0, weights=first)
    assert int(a.weights["c1.bn.num_batches_tracked"]) == 4
    assert int(b.weights["c1.bn.num_batches_tracked"]) == 8
    assert not np.array_equal(a.weights["c1.weight"], b.weights["c1.weight"])


def test_eval_gives_the_same_confusion_in_both_backends(tiny, tmp_path):
    out = tmp_path / "w.npz"
    cnnc.fit(tiny, "digits", out, epochs=1, lr=0.01)
    ours = cnnc.evaluate(tiny, "digits", weights=out, backend="numpy")
    theirs = cnnc.evaluate(tiny, "digits", weights=out, backend="onnxruntime")
    assert ours.count == 359
    assert np.array_equal(ours.confusion, theirs.confusion)


@pytest.mark.parametrize("command", ["train", "eval"])
def test_train_and_eval_have_help_with_examples(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    assert f"examples:\n  cnnc {command} " in capsys.readouterr().out


def test_the_progress_bar_redraws_one_line_and_clears_it():
    import io

    from cnnc.cli import _Bar
    from cnnc.train.trainer import Progress

    stream = io.StringIO()
    bar = _Bar(stream)
    bar(Progress(2, 10, 45, 45, 0.12345, 0.9712, 1234.5))
    assert stream.getvalue() == (
        "\repoch 2/10 [####################] 45/45  loss 0.1235  acc 97.12%  1,234 img/s"
    )
    bar.clear()
    assert stream.getvalue().endswith("\r" + " " * 77 + "\r")


def test_an_onnx_model_is_refused_with_the_way_to_train_it(tmp_path, capsys):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"not read")
    assert main(["train", str(model), "--data", "digits", "-o", str(tmp_path / "w.npz")]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"{model}: error: cnnc trains a program (.cnn), not an ONNX model",
        "hint: write the network as a program and its weights as a file (cnnc import "
        "MODEL.onnx does), then train it with --weights",
    ]
