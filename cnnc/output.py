"""Where cnnc writes its output files, by the conventions of compilers.

- ``-`` is standard output.
- A FIFO or a device (``/dev/null``, ``/dev/stdout``) is opened and written through:
  never replaced, never unlinked.
- A directory, or a path whose folder does not exist, is an error before anything is
  written.
- A symbolic link is followed: its target is replaced, the link stays.
- A regular file (or a new name) is written to a temporary file in the same folder and
  renamed over the target only once everything was written, with the mode a plain
  ``open`` gives (0666 less the umask). Several files written together (a program and
  its weights) are all written to temporary files first, then renamed one after the
  other; on any failure no temporary file and no new file is left behind.

Every failure to write is an :class:`~cnnc.errors.OutputError` naming the file.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cnnc.errors import OutputError

STDOUT = "-"


@dataclass(frozen=True)
class Target:
    """An output path resolved: ``shown`` as the user named it, ``path`` the file really
    written (a symlink followed; None for standard output), ``through`` whether it is
    written through (standard output, a FIFO, a device) rather than replaced."""

    shown: str
    path: Path | None
    through: bool

    @property
    def is_stdout(self) -> bool:
        return self.path is None

    @property
    def name(self) -> str:
        """How messages name it."""
        return "standard output" if self.is_stdout else self.shown


def target(path: str | Path) -> Target:
    """Resolve an output path and check that it can be written as the conventions say,
    before any work is done (raises OutputError)."""
    shown = str(path)
    if shown == STDOUT:
        return Target(shown, None, True)
    real = Path(os.path.realpath(path))
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as e:
        raise OutputError(f"cannot write: {e.strerror}", shown) from None
    if mode is not None and stat.S_ISDIR(mode):
        raise OutputError("is a directory", shown, hint=f"name a file in it, e.g. -o {shown}/NAME")
    through = mode is not None and (stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode))
    if mode is not None and not through and not stat.S_ISREG(mode):
        raise OutputError("is neither a regular file, a FIFO nor a device", shown)
    if not through and not real.parent.is_dir():
        raise OutputError(f"directory {real.parent} does not exist", shown)
    return Target(shown, real, through)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class _Stream:
    """A stream written in order, never sought (standard output, a FIFO, a device).

    It is no file object, so numpy writes it with ``write`` rather than ``tofile`` (which
    needs a file position that a FIFO does not have), and zipfile writes an archive to it
    without seeking back. Standard output is flushed, never closed.
    """

    def __init__(self, raw: BinaryIO, close: bool):
        self._raw = raw
        self._close = close

    def write(self, data) -> int:
        return self._raw.write(data)

    def flush(self) -> None:
        self._raw.flush()

    def close(self) -> None:
        if self._close:
            self._raw.close()
        else:
            self._raw.flush()


def _open(t: Target) -> tuple[BinaryIO, str | None]:
    """A file to write ``t``'s bytes to, and the temporary file's path if there is one.
    (A stream is returned as the file it stands for: it writes, flushes and closes.)"""
    if t.is_stdout:
        sys.stdout.flush()
        return _Stream(sys.stdout.buffer, close=False), None  # type: ignore[return-value]
    if t.through:
        return _Stream(open(t.path, "wb"), close=True), None  # type: ignore[return-value]
    fd, tmp = tempfile.mkstemp(prefix=f".{t.path.name}.", suffix=".tmp", dir=t.path.parent)
    try:
        # mkstemp makes the file private (0600); give it the mode a plain open would.
        os.fchmod(fd, 0o666 & ~_umask())
        return os.fdopen(fd, "wb"), tmp
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise


@contextlib.contextmanager
def open_outputs(*paths: str | Path | Target) -> Iterator[list[BinaryIO]]:
    """Binary files to write ``paths`` through, put in place together when the block
    ends without an exception (see the module's docstring); any OSError is an
    OutputError naming the file."""
    targets = [p if isinstance(p, Target) else target(p) for p in paths]
    files: list[tuple[Target, BinaryIO, str | None]] = []
    current = targets[0]
    try:
        seen = set()
        for t in targets:
            key = t.path or STDOUT
            if key in seen:
                raise OutputError("is named for two outputs at once", t.shown)
            seen.add(key)
        for t in targets:
            current = t
            f, tmp = _open(t)
            files.append((t, f, tmp))
        yield [f for _, f, _ in files]
        for t, f, _ in files:
            current = t
            f.close()
        for t, _, tmp in files:
            current = t
            if tmp is not None:
                os.replace(tmp, t.path)
    except OSError as e:
        _discard(files)
        what = e.strerror or str(e)
        raise OutputError(f"cannot write: {what}", current.name) from None
    except BaseException:
        _discard(files)
        raise


@contextlib.contextmanager
def open_output(path: str | Path | Target) -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through (see :func:`open_outputs`)."""
    with open_outputs(path) as (f,):
        yield f


def _discard(files: list[tuple[Target, BinaryIO, str | None]]) -> None:
    for _, f, tmp in files:
        with contextlib.suppress(OSError):
            f.close()
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def place(staged: Path, t: Target) -> None:
    """Put a file written elsewhere (``staged``, in ``t``'s folder for a regular file) at
    target ``t``: renamed over a regular file, copied into standard output, a FIFO or a
    device (raises OutputError)."""
    try:
        if not t.through:
            os.replace(staged, t.path)
            return
    except OSError as e:
        raise OutputError(f"cannot write: {e.strerror or e}", t.shown) from None
    import shutil

    with open(staged, "rb") as src, open_output(t) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


def staging_dir(t: Target) -> Path:
    """A new private folder to write ``t``'s files in before they are put in place: in
    its own folder for a regular file (so a rename puts them there), else the system's."""
    try:
        return Path(tempfile.mkdtemp(prefix=".cnnc-", dir=None if t.through else t.path.parent))
    except OSError as e:
        raise OutputError(f"cannot write: {e.strerror or e}", t.shown) from None
