"""Where ``-o`` writes: standard output, FIFOs and devices written through, directories
refused, symlinks followed, regular files replaced atomically, and nothing left behind
when writing fails."""

from __future__ import annotations

import errno
import io
import os
import stat
import subprocess
import sys
import threading

import numpy as np
import onnx
import pytest

import cnnc
from cnnc import output
from cnnc.backends import onnx_export
from cnnc.cli import main
from cnnc.errors import OutputError

PROGRAM = """network tiny(x: 1x4x4) {
    c: conv(2, 3, pad=1) -> relu
    f: fc(3)
}
"""
TWO_OUTPUTS = """network two(x: 1x4x4) -> (a, b) {
    a = x -> conv(2, 3, pad=1)
    b = x -> relu
}
"""


@pytest.fixture
def program(tmp_path):
    path = tmp_path / "tiny.cnn"
    path.write_text(PROGRAM)
    return path


@pytest.fixture
def tiny_onnx(tmp_path, program):
    path = tmp_path / "tiny.onnx"
    cnnc.compile(program).to_onnx(path)
    return path


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def expected_array(program) -> np.ndarray:
    model = cnnc.compile(program)
    return model.run(model.random_input(1))


def assert_error(code: int, err: str, first: str) -> None:
    assert code == 1
    assert first in next(line for line in err.splitlines() if not line.startswith("note:")), err
    assert "Traceback" not in err


# ---- regular files and symlinks --------------------------------------------------------------


def test_a_regular_file_is_replaced_by_a_new_file(tmp_path, capsys, program):
    out = tmp_path / "y.npy"
    out.write_bytes(b"old contents")
    inode = out.stat().st_ino
    code, _, err = cli(capsys, "run", program, "-o", out)
    assert code == 0, err
    np.testing.assert_array_equal(np.load(out), expected_array(program))
    assert out.stat().st_ino != inode  # renamed into place, not rewritten in place
    assert sorted(os.listdir(tmp_path)) == ["tiny.cnn", "y.npy"]


@pytest.mark.parametrize("cmd", ["compile", "run", "import"])
def test_a_symlink_is_followed_and_stays_a_symlink(tmp_path, capsys, program, tiny_onnx, cmd):
    (tmp_path / "real").mkdir()
    name = {"compile": "m.onnx", "run": "y.npy", "import": "net.cnn"}[cmd]
    target = tmp_path / "real" / name
    target.write_bytes(b"old")
    link = tmp_path / name
    link.symlink_to(target)
    source = tiny_onnx if cmd == "import" else program
    code, _, err = cli(capsys, cmd, source, "-o", link)
    assert code == 0, err
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_bytes() != b"old"
    if cmd == "compile":
        onnx.checker.check_model(str(target))
    if cmd == "run":
        np.testing.assert_array_equal(np.load(target), expected_array(program))
    if cmd == "import":
        assert target.read_text().startswith("# imported by cnnc")
        assert (tmp_path / "net.npz").is_file()  # beside the name given, as documented
    assert not [n for n in os.listdir(tmp_path / "real") if n.startswith(".")]


def test_a_dangling_symlink_creates_its_target(tmp_path, capsys, program):
    link = tmp_path / "y.npy"
    link.symlink_to(tmp_path / "made.npy")
    code, _, err = cli(capsys, "run", program, "-o", link)
    assert code == 0, err
    assert link.is_symlink()
    np.testing.assert_array_equal(np.load(tmp_path / "made.npy"), expected_array(program))


# ---- directories and missing folders -----------------------------------------------------


@pytest.mark.parametrize("cmd", ["compile", "run", "import"])
def test_a_directory_is_an_error_and_nothing_is_written(tmp_path, capsys, program, tiny_onnx, cmd):
    folder = tmp_path / "D"
    folder.mkdir()
    before = sorted(os.listdir(tmp_path))
    source = tiny_onnx if cmd == "import" else program
    code, _, err = cli(capsys, cmd, source, "-o", folder)
    assert_error(code, err, f"{folder}: error: is a directory")
    assert sorted(os.listdir(tmp_path)) == before  # no D.npz, no temporary file
    assert os.listdir(folder) == []


def test_import_refuses_a_weights_path_that_is_a_directory(tmp_path, capsys, tiny_onnx):
    (tmp_path / "net.npz").mkdir()
    code, _, err = cli(capsys, "import", tiny_onnx, "-o", tmp_path / "net.cnn")
    assert_error(code, err, f"{tmp_path / 'net.npz'}: error: is a directory")
    assert not (tmp_path / "net.cnn").exists()


def test_import_refuses_one_name_for_both_files(tmp_path, capsys, tiny_onnx):
    code, _, err = cli(capsys, "import", tiny_onnx, "-o", tmp_path / "net.npz")
    assert_error(code, err, "error: is named for two outputs at once")
    assert not (tmp_path / "net.npz").exists()


def test_a_missing_folder_is_an_error(tmp_path, capsys, program):
    out = tmp_path / "nowhere" / "m.onnx"
    code, _, err = cli(capsys, "compile", program, "-o", out)
    assert_error(code, err, f"{out}: error: directory {tmp_path / 'nowhere'} does not exist")


def test_the_api_refuses_a_directory_too(tmp_path):
    with pytest.raises(OutputError, match="is a directory"):
        cnnc.compile(PROGRAM).to_onnx(tmp_path)
    assert os.listdir(tmp_path) == []


# ---- FIFOs and devices -------------------------------------------------------------------


def read_fifo(path, into: list) -> threading.Thread:
    def reader():
        with open(path, "rb") as f:
            into.append(f.read())

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    return thread


def finish(thread: threading.Thread, fifo) -> None:
    """Wait for the reader; if nothing opened the FIFO for writing, open it so the
    reader ends (and the test fails on what it read, not on a hang)."""
    thread.join(5)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(5)


@pytest.mark.parametrize("cmd", ["compile", "run"])
def test_a_fifo_is_written_through_and_stays_a_fifo(tmp_path, capsys, program, cmd):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received: list[bytes] = []
    thread = read_fifo(fifo, received)
    code, _, err = cli(capsys, cmd, program, "-o", fifo)
    finish(thread, fifo)
    assert code == 0, err
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    if cmd == "compile":
        onnx.checker.check_model(onnx.load_from_string(received[0]))
    else:
        np.testing.assert_array_equal(np.load(io.BytesIO(received[0])), expected_array(program))
    assert sorted(os.listdir(tmp_path)) == ["pipe", "tiny.cnn"]


def test_a_program_of_several_outputs_writes_an_npz_through_a_fifo(tmp_path, capsys):
    program = tmp_path / "two.cnn"
    program.write_text(TWO_OUTPUTS)
    fifo = tmp_path / "pipe.npz"
    os.mkfifo(fifo)
    received: list[bytes] = []
    thread = read_fifo(fifo, received)
    code, _, err = cli(capsys, "run", program, "-o", fifo)
    finish(thread, fifo)
    assert code == 0, err
    with np.load(io.BytesIO(received[0])) as arrays:
        assert sorted(arrays.files) == ["a", "b"]


@pytest.mark.parametrize("cmd", ["compile", "run"])
def test_dev_null_is_written_through_and_stays_a_device(capsys, program, cmd):
    code, out, err = cli(capsys, cmd, program, "-o", "/dev/null")
    assert code == 0, err
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert "wrote /dev/null" in out


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="this system has no /dev/full")
@pytest.mark.parametrize("cmd", ["compile", "run"])
def test_a_full_device_is_one_error_naming_it(capsys, program, cmd):
    code, _, err = cli(capsys, cmd, program, "-o", "/dev/full")
    assert_error(code, err, "/dev/full: error: cannot write: No space left on device")
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)


# ---- standard output ---------------------------------------------------------------------


def run_process(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(
        [sys.executable, "-m", "cnnc", *map(str, args)], capture_output=True, env=env, timeout=120
    )


def test_compile_to_standard_output_writes_the_onnx_bytes(program):
    proc = run_process("compile", program, "-o", "-")
    assert proc.returncode == 0, proc.stderr
    onnx.checker.check_model(onnx.load_from_string(proc.stdout), full_check=True)
    assert b"wrote standard output (119 parameters)" in proc.stderr


def test_run_to_standard_output_writes_the_npy_bytes_and_reports_on_stderr(program):
    proc = run_process("run", program, "-o", "-")
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(np.load(io.BytesIO(proc.stdout)), expected_array(program))
    assert b"tiny on input [1, 1, 4, 4] (numpy)" in proc.stderr


def test_import_to_standard_output_is_refused(capsys, tmp_path, tiny_onnx):
    before = sorted(os.listdir(tmp_path))
    code, out, err = cli(capsys, "import", tiny_onnx, "-o", "-")
    assert_error(
        code,
        err,
        "error: cnnc import writes two files, a program and its weights; -o - cannot hold both",
    )
    assert out == ""
    assert sorted(os.listdir(tmp_path)) == before


def test_a_model_with_external_data_cannot_go_to_standard_output(tmp_path):
    model = cnnc.compile(PROGRAM).to_onnx()
    with pytest.raises(OutputError, match="keeps them in a second file beside it"):
        onnx_export.save(model, "-", external_threshold=100)


# ---- failures leave nothing behind -------------------------------------------------------


def test_import_writes_neither_file_when_the_second_fails(tmp_path, capsys, tiny_onnx, monkeypatch):
    (tmp_path / "net.cnn").write_text("old program")

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cnnc.cli, "write_npz", full_disk)
    code, _, err = cli(capsys, "import", tiny_onnx, "-o", tmp_path / "net.cnn")
    assert_error(code, err, "error: cannot write: No space left on device")
    assert (tmp_path / "net.cnn").read_text() == "old program"
    assert sorted(os.listdir(tmp_path)) == ["net.cnn", "tiny.cnn", "tiny.onnx"]


def test_a_read_only_file_system_is_one_error_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    program = tmp_path / "tiny.cnn"
    program.write_text(PROGRAM)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(output.os, "replace", read_only)
    code, _, err = cli(capsys, "run", program, "-o", tmp_path / "y.npy")
    assert_error(code, err, f"{tmp_path / 'y.npy'}: error: cannot write: Read-only file system")
    assert os.listdir(tmp_path) == ["tiny.cnn"]


def test_an_error_inside_the_block_discards_every_temporary_file(tmp_path):
    with pytest.raises(RuntimeError), output.open_outputs(tmp_path / "a", tmp_path / "b") as fs:
        for f in fs:
            f.write(b"half")
        raise RuntimeError("stop")
    assert os.listdir(tmp_path) == []


def test_new_files_get_the_mode_the_umask_gives(tmp_path):
    old = os.umask(0o027)
    try:
        with output.open_output(tmp_path / "a") as f:
            f.write(b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o640


def test_a_folder_without_write_permission_is_one_error(tmp_path, capsys, monkeypatch):
    # Root writes anywhere, so the refusal a user would meet is made by hand here.
    program = tmp_path / "tiny.cnn"
    program.write_text(PROGRAM)

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(output.tempfile, "mkstemp", denied)
    monkeypatch.setattr(output.tempfile, "mkdtemp", denied)
    for cmd, name in (("run", "y.npy"), ("compile", "m.onnx")):
        code, _, err = cli(capsys, cmd, program, "-o", tmp_path / name)
        assert_error(code, err, f"{tmp_path / name}: error: cannot write: Permission denied")
    assert os.listdir(tmp_path) == ["tiny.cnn"]


def test_a_reader_that_stops_reading_ends_the_command_quietly():
    """`cnnc compile BIG -o - | head -c 10`: no error message, the status of a process
    ended by SIGPIPE (141), as coreutils give."""
    from conftest import CNNC

    proc = subprocess.Popen(
        [str(CNNC), "compile", "examples/alexnet.cnn", "-o", "-"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert len(proc.stdout.read(10)) == 10
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141
    assert "error" not in stderr and "Traceback" not in stderr
