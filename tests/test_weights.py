"""Weights: seeded He-normal initialisation, and .npz files checked tensor by tensor."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

import cnnc
from cnnc import weights
from cnnc.errors import WeightsError

PROGRAM = """network small(x: 2x8x8) {
    c1: conv(4, 3, pad=1) -> relu -> maxpool(2)
    f1: fc(3)
}"""
SHAPES = {"c1.weight": (4, 2, 3, 3), "c1.bias": (4,), "f1.weight": (3, 64), "f1.bias": (3,)}


def weights_file(tmp_path, **tensors):
    path = tmp_path / "w.npz"
    np.savez(path, **tensors)
    return path


def full_weights(seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


def test_random_weights_are_the_same_for_the_same_seed():
    a, b = cnnc.compile(PROGRAM, seed=7), cnnc.compile(PROGRAM, seed=7)
    for name in SHAPES:
        np.testing.assert_array_equal(a.graph.params[name].data, b.graph.params[name].data)


def test_random_weights_differ_between_seeds():
    a, b = cnnc.compile(PROGRAM, seed=1), cnnc.compile(PROGRAM, seed=2)
    assert not np.array_equal(a.graph.params["c1.weight"].data, b.graph.params["c1.weight"].data)


def test_random_weights_are_he_normal_with_the_layers_fan_in():
    model = cnnc.compile("network n(x: 64x8x8) { big: conv(256, 3) }")
    w = model.graph.params["big.weight"].data
    assert w.dtype == np.float32
    assert abs(w.mean()) < 0.01
    assert w.std() == pytest.approx(np.sqrt(2 / (64 * 9)), rel=0.01)


def test_random_biases_are_small_and_uniform_like_pytorch():
    b = cnnc.compile("network n(x: 64x8x8) { big: conv(4096, 1) }").graph.params["big.bias"].data
    assert np.abs(b).max() <= 1 / np.sqrt(64)
    assert np.abs(b).max() > 0.9 / np.sqrt(64)


def test_each_tensor_is_drawn_from_a_generator_seeded_by_its_name():
    model = cnnc.compile(PROGRAM, seed=3, opt_level=0)
    for name, shape in SHAPES.items():
        rng = np.random.default_rng([3, zlib.crc32(name.encode())])
        fan_in = 18 if name.startswith("c1") else 64
        if name.endswith("weight"):
            expected = rng.standard_normal(shape, dtype=np.float32)
            expected *= np.float32(np.sqrt(2 / fan_in))
        else:
            bound = 1 / np.sqrt(fan_in)
            expected = rng.uniform(-bound, bound, shape).astype(np.float32)
        np.testing.assert_array_equal(model.graph.params[name].data, expected)


def test_the_seeds_hashed_on_arrays_are_numpy_s_seed_sequence():
    names = ["", "c1.weight", *(f"layer{i}.bias" for i in range(40))]
    crcs = np.array([0, 1, 2**32 - 1, *(zlib.crc32(n.encode()) for n in names)], np.uint32)
    for seed in (0, 1, 7, 123_456_789, 2**32 - 1):
        rows = weights._seed_words(seed, crcs)
        for crc, row in zip(crcs, rows, strict=True):
            expected = np.random.SeedSequence([seed, int(crc)]).generate_state(4, np.uint64)
            np.testing.assert_array_equal(row, expected)


def test_seeds_past_32_bits_give_numpy_s_values_too():
    seed = 2**40 + 5
    w = cnnc.compile(PROGRAM, seed=seed).graph.params["c1.weight"].data
    rng = np.random.default_rng([seed, zlib.crc32(b"c1.weight")])
    np.testing.assert_array_equal(
        w, rng.standard_normal((4, 2, 3, 3), dtype=np.float32) * np.float32(np.sqrt(2 / 18))
    )


def test_a_big_tensor_comes_in_chunks_the_same_on_any_number_of_threads(monkeypatch):
    monkeypatch.setattr(weights, "CHUNK", 1000)
    drawn = {}
    for threads in (1, 2):
        monkeypatch.setattr(weights, "DRAW_THREADS", threads)
        monkeypatch.setattr(weights, "_POOL", None)
        drawn[threads] = weights.draw("f.weight", (25, 100), ("he_normal", 100), 5)
        drawn[threads, "bias"] = weights.draw("f.bias", (2500,), ("uniform", 100), 5)
    np.testing.assert_array_equal(drawn[1], drawn[2])
    np.testing.assert_array_equal(drawn[1, "bias"], drawn[2, "bias"])
    # 2,500 values: chunk 0 from the tensor's own generator (the values a tensor of at
    # most a chunk has), chunks 1 and 2 from generators of their own.
    crc = zlib.crc32(b"f.weight")
    flat, scale = drawn[1].reshape(-1), np.float32(np.sqrt(2 / 100))
    for k, (start, n) in enumerate([(0, 1000), (1000, 1000), (2000, 500)]):
        rng = np.random.default_rng([5, crc, k] if k else [5, crc])
        expected = rng.standard_normal(n, dtype=np.float32) * scale
        np.testing.assert_array_equal(flat[start : start + n], expected)
    bias = drawn[1, "bias"]
    assert np.abs(bias).max() <= 0.1
    assert not np.array_equal(bias[:500], bias[1000:1500])  # no chunk repeats another
    assert not np.array_equal(bias[:500], bias[2000:])


def test_a_compiled_model_says_its_weights_are_random():
    assert cnnc.compile(PROGRAM).random_weights


def test_loaded_weights_are_used_exactly(tmp_path):
    tensors = full_weights()
    model = cnnc.compile(PROGRAM, weights=weights_file(tmp_path, **tensors), opt_level=0)
    assert not model.random_weights
    for name, array in tensors.items():
        np.testing.assert_array_equal(model.graph.params[name].data, array)


def test_loaded_weights_decide_the_output(tmp_path):
    tensors = full_weights()
    model = cnnc.compile(PROGRAM, weights=weights_file(tmp_path, **tensors))
    x = model.random_input(2)
    conv = np.zeros((2, 4, 8, 8), np.float32)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    for i in range(3):
        for j in range(3):
            conv += np.einsum(
                "ncij,oc->noij", xp[:, :, i : i + 8, j : j + 8], tensors["c1.weight"][:, :, i, j]
            )
    conv += tensors["c1.bias"][None, :, None, None]
    pooled = np.maximum(conv, 0).reshape(2, 4, 4, 2, 4, 2).max(axis=(3, 5))
    expected = pooled.reshape(2, -1) @ tensors["f1.weight"].T + tensors["f1.bias"]
    np.testing.assert_allclose(model.run(x), expected, rtol=1e-5, atol=1e-5)


def test_float64_weights_are_converted_to_float32(tmp_path):
    tensors = {k: v.astype(np.float64) for k, v in full_weights().items()}
    model = cnnc.compile(PROGRAM, weights=weights_file(tmp_path, **tensors))
    assert model.graph.params["f1.weight"].data.dtype == np.float32


def test_pytorch_batchnorm_counters_are_ignored(tmp_path):
    tensors = full_weights() | {"c1.num_batches_tracked": np.array(3)}
    cnnc.compile(PROGRAM, weights=weights_file(tmp_path, **tensors))


def test_every_problem_of_a_weights_file_is_named_with_shapes(tmp_path):
    tensors = full_weights()
    del tensors["c1.bias"]
    tensors["f1.weight"] = np.zeros((3, 65), np.float32)
    tensors["f2.weight"] = np.zeros((1,), np.float32)
    with pytest.raises(WeightsError) as info:
        cnnc.compile(PROGRAM, weights=weights_file(tmp_path, **tensors))
    assert info.value.message.splitlines() == [
        "weights do not fit network small:",
        "  missing c1.bias [4]",
        "  unexpected f2.weight (the network has no such parameter)",
        "  f1.weight has shape [3,65], expected [3,64]",
    ]
    assert info.value.where == str(tmp_path / "w.npz")


def test_integer_weights_are_refused(tmp_path):
    tensors = full_weights() | {"c1.bias": np.zeros(4, np.int64)}
    with pytest.raises(WeightsError, match=r"c1\.bias has dtype int64, expected floating point"):
        cnnc.compile(PROGRAM, weights=weights_file(tmp_path, **tensors))


def test_pickled_object_arrays_are_never_unpickled(tmp_path):
    tensors = full_weights()
    tensors["c1.bias"] = np.array([object()] * 4, dtype=object)
    with pytest.raises(WeightsError, match=r"c1\.bias cannot be read"):
        cnnc.compile(PROGRAM, weights=weights_file(tmp_path, **tensors))


def test_a_missing_weights_file_is_an_error(tmp_path):
    with pytest.raises(WeightsError, match="weights file not found"):
        cnnc.compile(PROGRAM, weights=tmp_path / "none.npz")


def test_a_file_that_is_not_npz_is_an_error(tmp_path):
    path = tmp_path / "w.npz"
    path.write_text("not a zip file")
    with pytest.raises(WeightsError, match=r"not a NumPy array file \(.npy or .npz\)"):
        cnnc.compile(PROGRAM, weights=path)


def test_a_single_npy_array_is_not_a_weights_file(tmp_path):
    path = tmp_path / "w.npy"
    np.save(path, np.zeros(3))
    with pytest.raises(WeightsError, match="holds a single array, not named tensors"):
        cnnc.compile(PROGRAM, weights=path)
