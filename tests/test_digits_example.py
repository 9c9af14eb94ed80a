"""The trained example of the README's main command: examples/digits.cnn with the weights
examples/digits.npz that `cnnc train` wrote, and the held-out digits it is shown on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import cnnc
from cnnc.data import load_digits, split

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PROGRAM, WEIGHTS = EXAMPLES / "digits.cnn", EXAMPLES / "digits.npz"


@pytest.mark.parametrize("backend", ["numpy", "onnxruntime"])
def test_the_trained_example_classifies_held_out_digits(backend):
    result = cnnc.evaluate(str(PROGRAM), "digits", weights=WEIGHTS, backend=backend)
    assert result.count == 359  # the rows cnnc train held out (--val-split 0.2)
    assert result.accuracy >= 0.98


def test_both_backends_give_the_same_predictions_on_every_held_out_digit():
    model = cnnc.compile(PROGRAM, weights=WEIGHTS)
    digits = load_digits()
    rows = split(len(digits.x), 0.2).val
    x = digits.x[rows]
    ours = model.run(x).argmax(axis=1)
    theirs = model.run(x, backend="onnxruntime").argmax(axis=1)
    np.testing.assert_array_equal(ours, theirs)
    assert (ours == digits.y[rows]).mean() >= 0.98


def test_the_readme_digits_are_held_out_and_recognised():
    digits = load_digits()
    shown = np.load(EXAMPLES / "heldout_digits.npy", allow_pickle=False)
    rows = [2, 13, 20, 28]
    np.testing.assert_array_equal(shown, digits.x[rows])
    assert set(rows) <= set(split(len(digits.x), 0.2).val.tolist())
    probabilities = cnnc.compile(PROGRAM, weights=WEIGHTS).run(shown)
    np.testing.assert_array_equal(probabilities.argmax(axis=1), digits.y[rows])
    assert digits.y[rows].tolist() == [2, 3, 0, 8]
    assert probabilities.max(axis=1).min() > 0.99
