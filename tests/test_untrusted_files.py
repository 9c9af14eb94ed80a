"""Malformed, lying and hostile files: every command that reads one ends in one message.

Each corpus is made here from code (nothing binary is committed): weights files, input
arrays and images, and ONNX models, each damaged in one way. Every command that reads
the file must exit 1 with one error naming the file, no traceback, no Python exception
name, and no output file left behind.
"""

from __future__ import annotations

import io
import os
import re
import struct
import subprocess
import sys
import zipfile
import zlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import cnnc
from cnnc.cli import main
from cnnc.errors import ModelFileError, WeightsError

PROGRAM = """network tiny(x: 1x4x4) {
    c: conv(2, 3, pad=1) -> relu
    f: fc(3)
}
"""
# An exception's class name (ValueError, DecodeError, BadZipFile ...) never reaches a user.
CLASS_NAME = re.compile(r"\b[A-Z][A-Za-z]*(Error|Exception|Warning|ZipFile)\b")


def weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "c.weight": rng.standard_normal((2, 1, 3, 3)).astype(np.float32),
        "c.bias": np.zeros(2, np.float32),
        "f.weight": rng.standard_normal((3, 32)).astype(np.float32),
        "f.bias": np.zeros(3, np.float32),
    }


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def lying_npy(shape: tuple[int, ...], data: bytes = b"\0" * 64, descr: str = "<f4") -> bytes:
    """An .npy file of a few bytes whose header claims ``shape``."""
    buf = io.BytesIO()
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue() + data


def npz_bytes(members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def good_npz(**changes: np.ndarray) -> bytes:
    tensors = {**weights(), **changes}
    return npz_bytes({f"{n}.npy": npy_bytes(a) for n, a in tensors.items()})


def patched_central_directory(offset: int, value: int, size: int = 1) -> bytes:
    """A good weights file whose first central-directory entry has ``value`` at ``offset``."""
    packed = bytearray(good_npz())
    central = packed.find(b"PK\x01\x02")
    packed[central + offset : central + offset + size] = value.to_bytes(size, "little")
    return bytes(packed)


def untokenizable_npy() -> bytes:
    """An .npy whose header text neither ast nor tokenize can read (numpy's two tries)."""
    text = b"{'descr': '<f4', 'fortran_order': False, 'shape': (2,\x94 }"
    text += b" " * (64 - 10 - len(text) - 1) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + b"\0" * 8


def inflated_npz() -> bytes:
    """A deflated member whose stored size claims 150 TiB: a zip bomb's lie."""
    payload = lying_npy((2**44, 10))
    packed = npz_bytes({"c.weight.npy": payload}, zipfile.ZIP_DEFLATED)
    # The uncompressed size, in the local header (offset 22) and in the central
    # directory's entry (offset 24), becomes 4 GiB - 2.
    packed = bytearray(packed)
    packed[22:26] = struct.pack("<I", 0xFFFFFFFE)
    central = packed.rfind(b"PK\x01\x02")
    packed[central + 24 : central + 28] = struct.pack("<I", 0xFFFFFFFE)
    return bytes(packed)


WEIGHTS_CORPUS = {
    "empty": b"",
    "text": b"these are not weights\n",
    "png": b"\x89PNG\r\n\x1a\n" + b"\0" * 40,
    "truncated zip": good_npz()[:300],
    "member not npy": npz_bytes({"c.weight": b"hello", "c.bias.npy": npy_bytes(np.zeros(2))}),
    "member garbage npy": npz_bytes({"c.weight.npy": b"hello"}),
    "lying header 150 TiB": npz_bytes({"c.weight.npy": lying_npy((2**22, 2**22, 10))}),
    "lying zip size": inflated_npz(),
    "object dtype": npz_bytes({"c.weight.npy": lying_npy((2,), b"\0" * 16, "|O")}),
    "string dtype": npz_bytes({"c.weight.npy": npy_bytes(np.array(["ab", "cd"]))}),
    "record dtype": npz_bytes({"c.weight.npy": lying_npy((2,), b"\0" * 16, [("a", "<f4")])}),
    "encrypted member": patched_central_directory(8, 0x1, 2),
    "zip version from the future": patched_central_directory(6, 200),
    "crc damaged": good_npz()[:200] + bytes([good_npz()[200] ^ 0xFF]) + good_npz()[201:],
    "single array": npy_bytes(np.zeros(3, np.float32)),
    "nan": good_npz(**{"c.bias": np.array([np.nan, 0], np.float32)}),
    "inf after float32": good_npz(**{"f.bias": np.array([1e39, 0, 0], np.float64)}),
}


def png(width: int = 4, height: int = 4) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    rows = b"".join(b"\0" + b"\x80" * width for _ in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def lying_png(width: int, height: int) -> bytes:
    """A PNG of a few bytes whose header claims ``width`` × ``height`` pixels."""
    good = png()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = b"IHDR" + ihdr
    chunk = struct.pack(">I", len(ihdr)) + body + struct.pack(">I", zlib.crc32(body))
    return good[:8] + chunk + good[8 + len(chunk) :]


def lying_bmp(width: int, height: int) -> bytes:
    """A BMP of a few bytes whose header claims ``width`` × ``height`` 24-bit pixels."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40 + 48, 0, 0, 54) + info + b"\x80" * 48


def jpeg(size: int = 32) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    pixels = np.random.default_rng(2).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def damaged(data: bytes, at: int) -> bytes:
    changed = bytearray(data)
    changed[at] ^= 0xFF
    return bytes(changed)


INPUT_CORPUS = {
    "empty.npy": b"",
    "empty.npz": b"",
    "lying header.npy": lying_npy((2**22, 2**22, 10)),
    "lying header.npz": npz_bytes({"x.npy": lying_npy((2**40, 1, 4, 4))}),
    "truncated.npy": npy_bytes(np.zeros((1, 1, 4, 4), np.float32))[:-10],
    "batch of 0.npy": npy_bytes(np.zeros((0, 1, 4, 4), np.float32)),
    "object.npy": lying_npy((1, 1, 4, 4), b"\0" * 128, "|O"),
    "complex.npy": npy_bytes(np.zeros((1, 1, 4, 4), np.complex64)),
    "strings.npy": npy_bytes(np.full((1, 1, 4, 4), "x")),
    "bad version.npy": b"\x93NUMPY\x09\x00" + b"\0" * 40,
    "bad header.npy": b"\x93NUMPY\x01\x00\x10\x00{'descr': ..., }\n",
    "untokenizable header.npy": untokenizable_npy(),
    "truncated image.png": png()[:30],
    "truncated data.png": png(64, 64)[:-20],
    "bad checksum.png": damaged(png(), 40),
    "bomb.png": lying_png(100_000, 100_000),
    "bomb.bmp": lying_bmp(60_000, 60_000),
    "lying size.bmp": lying_bmp(64, 64),
    "truncated photo.jpg": jpeg()[:300],
    "random bytes named.png": np.random.default_rng(1).bytes(200),
    "image.jpg": b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\0" * 50,
    "image.ppm": b"P6\n4 4\n255\n" + b"\x80" * 48,
    "image.gif": b"GIF89a" + b"\0" * 30,
    "member not npy.npz": npz_bytes({"x": b"hello"}),
}


def tiny_onnx() -> onnx.ModelProto:
    return cnnc.compile(PROGRAM).to_onnx()


def external(model: onnx.ModelProto, location: str, **fields: str) -> onnx.ModelProto:
    init = model.graph.initializer[0]
    init.ClearField("raw_data")
    init.data_location = TensorProto.EXTERNAL
    for key, value in {"location": location, **fields}.items():
        entry = init.external_data.add()
        entry.key, entry.value = key, value
    return model


def onnx_corpus() -> dict[str, bytes]:
    good = tiny_onnx()

    def edited(edit) -> bytes:
        model = onnx.ModelProto()
        model.CopyFrom(good)
        edit(model)
        return model.SerializeToString()

    def short_raw(m):
        m.graph.initializer[0].raw_data = m.graph.initializer[0].raw_data[:-4]

    def huge_dims(m):
        del m.graph.initializer[0].dims[:]
        m.graph.initializer[0].dims.extend([2**20, 2**20, 2**10])

    def nan_weight(m):
        a = numpy_helper.to_array(m.graph.initializer[0]).copy()
        a.flat[3] = np.inf
        m.graph.initializer[0].CopyFrom(numpy_helper.from_array(a, m.graph.initializer[0].name))

    def no_inputs(m):
        del m.graph.input[:]

    def dangling(m):
        m.graph.node[0].input[0] = "nowhere"

    def cycle(m):
        m.graph.node[0].input[0] = m.graph.node[-1].output[0]

    def metadata(m):
        m.metadata_props.add(key="cnnc.min_input_shape", value="abc")

    def no_graph(m):
        m.ClearField("graph")

    def attribute(name: str, value):
        def edit(m):
            node = m.graph.node[0]
            old = next(a for a in node.attribute if a.name == name)
            node.attribute.remove(old)
            node.attribute.append(helper.make_attribute(name, value))

        return edit

    data = good.SerializeToString()
    return {
        "empty": b"",
        "truncated": data[: len(data) // 2],
        "random bytes": np.random.default_rng(0).bytes(500),
        "wrong message": helper.make_tensor(
            "t", TensorProto.FLOAT, [2], [1, 2]
        ).SerializeToString(),
        "no graph": edited(no_graph),
        "no inputs": edited(no_inputs),
        "dangling input": edited(dangling),
        "cycle": edited(cycle),
        "raw_data too short": edited(short_raw),
        "huge dims": edited(huge_dims),
        "infinite weight": edited(nan_weight),
        "bad metadata": edited(metadata),
        "pads of 3 values": edited(attribute("pads", [1, 1, 1])),
        "strides of the wrong type": edited(attribute("strides", 1.5)),
        "external data outside": edited(lambda m: external(m, "../../etc/passwd")),
        "external data absolute": edited(lambda m: external(m, "/etc/passwd")),
        "external data missing": edited(lambda m: external(m, "missing.bin")),
        "external data too short": edited(lambda m: external(m, "short.bin")),
        "external data lying length": edited(lambda m: external(m, "short.bin", length=str(2**40))),
        "external data FIFO": edited(lambda m: external(m, "fifo.bin")),
    }


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_error_naming(code: int, err: str, path) -> None:
    """Exit 1; exactly one error, at ``path``; no traceback, no exception class name."""
    assert code == 1, err
    errors = [line for line in err.splitlines() if ": error: " in line or line.startswith("error")]
    assert len(errors) == 1, err
    # The file first; a damaged node of an ONNX model is named after it.
    assert errors[0].startswith((f"{path}: error: ", f"{path}: node ")), err
    assert "Traceback" not in err
    assert not CLASS_NAME.search(err), err


def listing(folder) -> set[str]:
    return set(os.listdir(folder))


MODEL_COMMANDS = {
    "compile": ["compile", "{model}", "-o", "{out}/out.onnx"],
    "run": ["run", "{model}", "-o", "{out}/y.npy"],
    "dump": ["dump", "{model}"],
    "summary": ["summary", "{model}"],
    "graph": ["graph", "{model}", "-o", "{out}/net.svg"],
    "bench": ["bench", "{model}", "--repeat", "1", "--warmup", "0"],
}


def command(name: str, model, out) -> list[str]:
    return [a.format(model=model, out=out) for a in MODEL_COMMANDS[name]]


@pytest.mark.parametrize("case", WEIGHTS_CORPUS)
@pytest.mark.parametrize("cmd", MODEL_COMMANDS)
def test_a_malformed_weights_file_is_one_error_in_every_command(tmp_path, capsys, cmd, case):
    program = tmp_path / "tiny.cnn"
    program.write_text(PROGRAM)
    path = tmp_path / "w.npz"
    path.write_bytes(WEIGHTS_CORPUS[case])
    before = listing(tmp_path)
    code, _out, err = cli(capsys, *command(cmd, program, tmp_path), "--weights", path)
    assert_one_error_naming(code, err, path)
    assert listing(tmp_path) == before


def test_the_weights_corpus_is_read_without_allocating_what_headers_claim(tmp_path):
    import tracemalloc

    for case in ("lying header 150 TiB", "lying zip size"):
        path = tmp_path / "w.npz"
        path.write_bytes(WEIGHTS_CORPUS[case])
        tracemalloc.start()
        with pytest.raises(WeightsError, match="cannot be read"):
            cnnc.compile(PROGRAM, weights=path)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 50_000_000, case


def test_a_lying_header_names_the_sizes_it_claims_and_finds(tmp_path):
    path = tmp_path / "w.npz"
    path.write_bytes(WEIGHTS_CORPUS["lying header 150 TiB"])
    with pytest.raises(WeightsError) as e:
        cnnc.compile(PROGRAM, weights=path)
    assert (
        "c.weight cannot be read: its header declares shape [4194304, 4194304, 10] of float32 "
        "(703,687,441,776,640 bytes), but only 64 bytes of data follow"
    ) in e.value.message


def test_a_member_that_is_not_an_npy_array_is_named(tmp_path):
    path = tmp_path / "w.npz"
    path.write_bytes(WEIGHTS_CORPUS["member not npy"])
    with pytest.raises(WeightsError, match=r"member 'c\.weight' is not an \.npy array"):
        cnnc.compile(PROGRAM, weights=path)


def test_a_zip_member_claiming_more_than_deflate_can_hold_is_refused(tmp_path):
    path = tmp_path / "w.npz"
    path.write_bytes(WEIGHTS_CORPUS["lying zip size"])
    with pytest.raises(WeightsError, match=r"more than its .* compressed bytes can hold"):
        cnnc.compile(PROGRAM, weights=path)


def test_weights_with_nan_or_inf_name_the_tensor_and_the_count(tmp_path):
    tensors = weights()
    tensors["c.weight"][0, 0, :2, 0] = [np.nan, -np.inf]
    np.savez(tmp_path / "w.npz", **tensors)
    with pytest.raises(WeightsError) as e:
        cnnc.compile(PROGRAM, weights=tmp_path / "w.npz")
    assert "c.weight holds 2 NaN or infinite values (in float32)" in e.value.message
    assert "--allow-nonfinite" in e.value.hint


def test_allow_nonfinite_loads_nan_weights_as_they_are(tmp_path, capsys):
    tensors = weights()
    tensors["c.bias"][1] = np.nan
    np.savez(tmp_path / "w.npz", **tensors)
    model = cnnc.compile(PROGRAM, weights=tmp_path / "w.npz", allow_nonfinite=True)
    assert np.isnan(model.graph.params["c.bias"].data[1])
    program = tmp_path / "tiny.cnn"
    program.write_text(PROGRAM)
    code, out, err = cli(
        capsys, "run", program, "--weights", tmp_path / "w.npz", "--allow-nonfinite"
    )
    assert code == 0, err
    assert "nan" in out


def test_a_float64_weight_beyond_float32_is_infinite_once_loaded(tmp_path):
    path = tmp_path / "w.npz"
    path.write_bytes(WEIGHTS_CORPUS["inf after float32"])
    with pytest.raises(WeightsError, match=r"f\.bias holds 1 NaN or infinite value"):
        cnnc.compile(PROGRAM, weights=path)


@pytest.mark.parametrize("case", INPUT_CORPUS)
def test_a_malformed_input_file_is_one_error(tmp_path, capsys, case):
    program = tmp_path / "tiny.cnn"
    program.write_text(PROGRAM)
    path = tmp_path / case
    path.write_bytes(INPUT_CORPUS[case])
    before = listing(tmp_path)
    code, _out, err = cli(capsys, "run", program, "--input", path, "-o", tmp_path / "y.npy")
    assert_one_error_naming(code, err, path)
    assert listing(tmp_path) == before


def test_an_input_that_is_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    os.mkfifo(tmp_path / "x.npy")
    with pytest.raises(cnnc.errors.InputError, match="is not a regular file"):
        cnnc.read_input(tmp_path / "x.npy")


def test_an_input_header_is_checked_before_anything_is_allocated(tmp_path):
    path = tmp_path / "x.npy"
    path.write_bytes(INPUT_CORPUS["lying header.npy"])
    with pytest.raises(cnnc.errors.InputError, match="but only 64 bytes of data follow"):
        cnnc.read_input(path)


def test_an_image_of_a_format_not_read_is_named_as_what_it_is(tmp_path, capsys):
    program = tmp_path / "tiny.cnn"
    program.write_text(PROGRAM)
    for name, kind in (("image.gif", "a GIF image"), ("image.ppm", "a PPM image")):
        (tmp_path / name).write_bytes(INPUT_CORPUS[name])
        _code, _, err = cli(capsys, "run", program, "--input", tmp_path / name)
        assert f"not a NumPy array file (.npy or .npz): it looks like {kind}" in err


def test_a_decompression_bomb_is_refused_before_it_is_decoded(tmp_path, capsys):
    program = tmp_path / "tiny.cnn"
    program.write_text(PROGRAM)
    (tmp_path / "bomb.png").write_bytes(INPUT_CORPUS["bomb.png"])
    _code, _, err = cli(capsys, "run", program, "--input", tmp_path / "bomb.png")
    assert "the image is too large: more than 89,478,485 pixels" in err


def test_a_batch_of_zero_items_is_refused_naming_its_file(tmp_path, capsys):
    program = tmp_path / "tiny.cnn"
    program.write_text(PROGRAM)
    np.save(tmp_path / "x.npy", np.zeros((0, 1, 4, 4), np.float32))
    code, _, err = cli(capsys, "run", program, "--input", tmp_path / "x.npy")
    assert code == 1
    assert err.splitlines()[-1] == (
        f"{tmp_path / 'x.npy'}: error: input %x is a batch of 0 items; a run needs at least one"
    )


def test_a_batch_of_zero_items_is_refused_by_the_api():
    model = cnnc.compile(PROGRAM)
    with pytest.raises(cnnc.errors.InputError, match="batch of 0 items"):
        model.run(np.zeros((0, 1, 4, 4), np.float32))


ONNX_COMMANDS = {**MODEL_COMMANDS, "import": ["import", "{model}", "-o", "{out}/net.cnn"]}


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    for name, data in onnx_corpus().items():
        (folder / f"{name}.onnx").write_bytes(data)
    (folder / "short.bin").write_bytes(b"\0" * 8)
    os.mkfifo(folder / "fifo.bin")
    return folder


ONNX_CASES = [
    "empty",
    "truncated",
    "random bytes",
    "wrong message",
    "no graph",
    "no inputs",
    "dangling input",
    "cycle",
    "raw_data too short",
    "huge dims",
    "infinite weight",
    "bad metadata",
    "pads of 3 values",
    "strides of the wrong type",
    "external data outside",
    "external data absolute",
    "external data missing",
    "external data too short",
    "external data lying length",
    "external data FIFO",
]


@pytest.mark.parametrize("case", ONNX_CASES)
@pytest.mark.parametrize("cmd", ONNX_COMMANDS)
def test_a_malformed_onnx_file_is_one_error_in_every_command(
    onnx_files, tmp_path, capsys, cmd, case
):
    path = onnx_files / f"{case}.onnx"
    args = [a.format(model=path, out=tmp_path) for a in ONNX_COMMANDS[cmd]]
    before, corpus = listing(tmp_path), listing(onnx_files)
    code, _out, err = cli(capsys, *args)
    assert_one_error_naming(code, err, path)
    assert listing(tmp_path) == before
    assert listing(onnx_files) == corpus


def test_the_onnx_corpus_covers_every_case():
    assert sorted(onnx_corpus()) == sorted(ONNX_CASES)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("empty", "not an ONNX model: the file is empty"),
        ("wrong message", "not a readable ONNX model: Error parsing message"),
        ("no graph", "not an ONNX model: it has no graph"),
        (
            "cycle",
            "the model fails the ONNX checker: Nodes in a graph must be topologically sorted, "
            "however input 'f' of node: name: c OpType: ConvRelu",
        ),
        ("bad metadata", "metadata cnnc.min_input_shape is 'abc', expected positive sizes"),
        ("pads of 3 values", "cannot import this node: "),
        (
            "external data outside",
            "initializer c.weight keeps its data in '../../etc/passwd', outside the model's folder",
        ),
        (
            "external data too short",
            "initializer c.weight: its shape [2, 1, 3, 3] needs 72 bytes at offset 0 of "
            "short.bin, which holds 8",
        ),
        (
            "external data lying length",
            "initializer c.weight: its external data length 1,099,511,627,776 bytes does not "
            "match its shape [2, 1, 3, 3] (72 bytes)",
        ),
        ("external data FIFO", "initializer c.weight: its data file fifo.bin is not a regular"),
        ("infinite weight", "the model's weights are not all finite:\n  c.weight holds 1 NaN"),
    ],
)
def test_each_malformed_onnx_file_says_what_is_wrong(onnx_files, case, message):
    with pytest.raises(cnnc.CnncError) as e:
        cnnc.load(onnx_files / f"{case}.onnx")
    assert message in e.value.message


def test_onnx_initializers_with_inf_load_with_allow_nonfinite(onnx_files):
    model = cnnc.load(onnx_files / "infinite weight.onnx", opt_level=0, allow_nonfinite=True)
    assert np.isinf(model.graph.params["c.weight"].data).sum() == 1


def test_external_data_inside_the_folder_still_loads(tmp_path):
    model = cnnc.compile(PROGRAM)
    proto = model.to_onnx()
    onnx.save_model(
        proto, tmp_path / "m.onnx", save_as_external_data=True, location="m.bin", size_threshold=0
    )
    back = cnnc.load(tmp_path / "m.onnx", opt_level=0)
    x = model.random_input(2)
    np.testing.assert_allclose(back.run(x), model.run(x), rtol=1e-6, atol=1e-6)


def test_a_symlink_leading_out_of_the_folder_is_outside(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "secret.bin").write_bytes(b"\0" * 72)
    os.symlink(tmp_path / "secret.bin", tmp_path / "m" / "w.bin")
    (tmp_path / "m" / "m.onnx").write_bytes(external(tiny_onnx(), "w.bin").SerializeToString())
    with pytest.raises(ModelFileError, match="outside the model's folder"):
        cnnc.load(tmp_path / "m" / "m.onnx")


# ---- the last-resort handler ---------------------------------------------------------------


def boom(exc: BaseException):
    def command(args):
        raise exc

    return command


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (MemoryError(), "error: out of memory while dumping {model}"),
        (
            RecursionError("maximum recursion depth exceeded"),
            "error: the model is nested too deeply: Python's recursion limit was reached "
            "while dumping {model}",
        ),
        (
            PermissionError(13, "Permission denied", "/some/file"),
            "/some/file: error: Permission denied",
        ),
        (
            onnx.checker.ValidationError("Field 'type' of 'value_info' is required"),
            "{model}: error: not a valid ONNX model: Field 'type' of 'value_info' is required",
        ),
        (
            KeyError("x"),
            "error: internal error in cnnc: please report it (KeyError while dumping {model}: 'x')",
        ),
    ],
    ids=["memory", "recursion", "oserror", "onnx", "internal"],
)
def test_the_last_resort_handler_turns_an_escaped_exception_into_one_message(
    monkeypatch, capsys, tmp_path, exc, expected
):
    model = tmp_path / "tiny.cnn"
    monkeypatch.setitem(cnnc.cli.COMMANDS, "dump", boom(exc))
    code, _out, err = cli(capsys, "dump", model)
    assert code == 1
    assert err.splitlines()[0] == expected.format(model=model)
    assert "Traceback" not in err


def test_an_internal_error_says_how_to_see_its_traceback(monkeypatch, capsys):
    monkeypatch.setitem(cnnc.cli.COMMANDS, "dump", boom(KeyError("x")))
    _code, _out, err = cli(capsys, "dump", "m.cnn")
    assert err.splitlines()[1] == (
        "hint: run the same command with --debug to see the traceback, and add it to the report"
    )


def test_debug_shows_the_traceback_of_an_internal_error_in_a_real_process(tmp_path):
    script = (
        "import sys, cnnc.cli\n"
        "def boom(args): raise KeyError('x')\n"
        "cnnc.cli.COMMANDS['dump'] = boom\n"
        "sys.exit(cnnc.cli.main(sys.argv[1:]))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    plain = subprocess.run(
        [sys.executable, "-c", script, "dump", "m.cnn"], capture_output=True, text=True, env=env
    )
    assert plain.returncode == 1
    assert plain.stderr.startswith("error: internal error in cnnc: please report it")
    assert "Traceback" not in plain.stderr
    debug = subprocess.run(
        [sys.executable, "-c", script, "--debug", "dump", "m.cnn"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert debug.returncode == 1
    assert "Traceback" in debug.stderr and "KeyError: 'x'" in debug.stderr


def test_a_malformed_file_in_a_real_process_exits_1_with_one_line(tmp_path):
    bad = tmp_path / "m.onnx"
    bad.write_bytes(np.random.default_rng(0).bytes(300))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-m", "cnnc", "import", str(bad)], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"{bad}: error: not a readable ONNX model: ")
    assert "Traceback" not in proc.stderr
    assert listing(tmp_path) == {"m.onnx"}


# ---- constants that would be made at import ------------------------------------------------


def folding_bomb(kind: str) -> onnx.ModelProto:
    """A model of a few hundred bytes whose constant folding would make 6.4 GB."""
    shape = numpy_helper.from_array(np.array([1, 1, 40000, 40000], np.int64), "s")
    ones = {
        "ConstantOfShape": [],
        "Expand": [numpy_helper.from_array(np.ones(1, np.float32), "a")],
        "Tile": [numpy_helper.from_array(np.ones((1, 1, 1, 1), np.float32), "a")],
        "MatMul": [
            numpy_helper.from_array(np.ones((1, 1, 40000, 1), np.float32), "a"),
            numpy_helper.from_array(np.ones((1, 1, 1, 40000), np.float32), "b"),
        ],
    }[kind]
    inputs = {"ConstantOfShape": ["s"], "Expand": ["a", "s"], "Tile": ["a", "s"]}
    attrs = {"value": helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])}
    make = helper.make_node(
        kind, inputs.get(kind, ["a", "b"]), ["c"], **(attrs if kind == "ConstantOfShape" else {})
    )
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 40000, 40000])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 40000, 40000])
    graph = helper.make_graph(
        [make, helper.make_node("Add", ["x", "c"], ["y"])],
        "bomb",
        [x],
        [y],
        [shape, *ones] if kind != "MatMul" else ones,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("kind", ["ConstantOfShape", "Expand", "Tile", "MatMul"])
def test_a_constant_that_folding_would_make_huge_is_refused_before_it_is_made(tmp_path, kind):
    import tracemalloc

    path = tmp_path / "bomb.onnx"
    onnx.save(folding_bomb(kind), path)
    tracemalloc.start()
    with pytest.raises(ModelFileError) as e:
        cnnc.load(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert e.value.where == f"{path}: node c ({kind})"
    assert e.value.message == (
        "this constant node would make a tensor of shape [1, 1, 40000, 40000] "
        "(6,400,000,000 bytes) at import; cnnc folds constants of at most 1,073,741,824 bytes"
    )
    assert peak < 50_000_000
