"""Reading untrusted .npy and .npz files: no array is allocated before its size is known true.

``numpy.load`` trusts a file's header: a 1 KB file whose header claims a shape of
150 TiB makes it allocate 150 TiB, an empty file raises EOFError, and an .npz member
that is not an .npy file comes back as bytes. Here every header is read first, its
dtype must be a plain number (no objects, strings, records, dates), and the bytes its
shape needs must be there (in the file, or in the zip member, whose stored size must
be one that its compressed bytes can really hold) before any array is made.
Nothing is ever unpickled.
"""

from __future__ import annotations

import os
import stat
import zipfile
import zlib
from math import prod
from pathlib import Path

import numpy as np

from cnnc.errors import CnncError, first_line

NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK\x03\x04"
# Deflate's largest ratio is 1032:1; a member claiming more than this is lying.
DEFLATE_MAX_RATIO = 1032
# Number kinds an array may have: bool, signed and unsigned integers, floats, complex.
NUMERIC_KINDS = "biufc"


class ArrayFileError(ValueError):
    """Why a file is not a readable array file (the caller names the file and the kind)."""


def _header(f, available: int) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype that an .npy stream's header declares, checked against the
    ``available`` bytes of the whole stream."""
    fmt = np.lib.format
    if available == 0:
        raise ArrayFileError("the file is empty")
    try:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = fmt.read_array_header_1_0(f)
        elif version in ((2, 0), (3, 0)):
            shape, _, dtype = fmt.read_array_header_2_0(f)
        else:
            raise ArrayFileError(f"unknown .npy format version {version[0]}.{version[1]}")
    except ArrayFileError:
        raise
    except Exception as e:  # numpy parses the header text with ast and tokenize: any failure
        raise ArrayFileError(f"not a valid .npy header ({first_line(e)})") from None
    if dtype.hasobject:
        raise ArrayFileError("it holds Python objects, which cnnc never unpickles")
    if dtype.names is not None or dtype.subdtype is not None or dtype.kind not in NUMERIC_KINDS:
        raise ArrayFileError(f"its dtype {dtype} is not a plain number type")
    if any(not isinstance(d, int) or d < 0 for d in shape):
        raise ArrayFileError(f"its header declares an invalid shape {shape}")
    needed = prod(shape) * dtype.itemsize
    have = available - f.tell()
    if needed > have:
        raise ArrayFileError(
            f"its header declares shape {list(shape)} of {dtype} ({needed:,} bytes), "
            f"but only {max(have, 0):,} bytes of data follow"
        )
    return shape, dtype


def _read_data(f) -> np.ndarray:
    # The header has been checked, so read_array allocates what the file really holds.
    try:
        f.seek(0)
        return np.lib.format.read_array(f, allow_pickle=False)
    except (ValueError, EOFError, OSError, zipfile.BadZipFile, zlib.error) as e:
        raise ArrayFileError(f"its data cannot be read ({first_line(e)})") from None


def read_npy(path: Path) -> np.ndarray:
    """The array of an .npy file (raises ArrayFileError, OSError)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        _header(f, size)
        return _read_data(f)


class NpzArchive:
    """The arrays of an .npz file, read one by one: names first, then each header, then data."""

    def __init__(self, path: Path):
        self.path = path
        self._size = os.path.getsize(path)
        if self._size == 0:
            raise ArrayFileError("the file is empty")
        try:
            self._zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, ValueError, EOFError, OSError, NotImplementedError) as e:
            raise ArrayFileError(f"not a valid .npz (zip) archive ({first_line(e)})") from None
        self.members: dict[str, zipfile.ZipInfo] = {}
        for info in self._zip.infolist():
            if info.is_dir():
                continue
            if not info.filename.endswith(".npy"):
                self.close()
                raise ArrayFileError(f"member {info.filename!r} is not an .npy array")
            name = info.filename[: -len(".npy")]
            if name in self.members:
                self.close()
                raise ArrayFileError(f"it holds two arrays named {name!r}")
            self.members[name] = info

    @property
    def names(self) -> list[str]:
        """The arrays' names, in the archive's order."""
        return list(self.members)

    def _check_sizes(self, name: str, info: zipfile.ZipInfo) -> None:
        if info.header_offset + info.compress_size > self._size:
            raise ArrayFileError(f"{name} cannot be read: the archive is cut short")
        if info.flag_bits & 0x1:
            raise ArrayFileError(f"{name} cannot be read: it is encrypted")
        if info.compress_type == zipfile.ZIP_STORED:
            if info.file_size != info.compress_size:
                raise ArrayFileError(f"{name} cannot be read: the archive's sizes disagree")
        elif info.compress_type == zipfile.ZIP_DEFLATED:
            if info.file_size > DEFLATE_MAX_RATIO * info.compress_size + 1024:
                raise ArrayFileError(
                    f"{name} cannot be read: it claims {info.file_size:,} bytes, more than "
                    f"its {info.compress_size:,} compressed bytes can hold"
                )
        else:
            raise ArrayFileError(
                f"{name} cannot be read: it is compressed with a method cnnc does not read "
                "(numpy.savez and savez_compressed store or deflate)"
            )

    def header(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        """The shape and dtype that array ``name`` declares (its size checked)."""
        return self._member(name, lambda f, size: _header(f, size))

    def read(self, name: str) -> np.ndarray:
        """Array ``name`` (its header checked first)."""
        return self._member(name, lambda f, size: (_header(f, size), _read_data(f))[1])

    def _member(self, name: str, read):
        """``read(file, size)`` of member ``name``, its sizes checked first; whatever goes
        wrong inside the archive is one ArrayFileError naming the member."""
        info = self.members[name]
        self._check_sizes(name, info)
        try:
            with self._zip.open(info) as f:
                return read(f, info.file_size)
        except ArrayFileError as e:
            raise ArrayFileError(f"{name} cannot be read: {e}") from None
        except (
            OSError,
            zipfile.BadZipFile,
            zlib.error,
            EOFError,
            NotImplementedError,
            RuntimeError,
        ) as e:
            raise ArrayFileError(f"{name} cannot be read: {first_line(e)}") from None

    def close(self) -> None:
        self._zip.close()

    def __enter__(self) -> NpzArchive:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# How files that are not NumPy arrays begin, to name them in the error.
NOT_ARRAYS = {
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"BM": "a BMP image",
    b"GIF8": "a GIF image",
    b"P6": "a PPM image",
    b"\x08\x01\x12": "an ONNX model",
}


def open_array_file(
    path: str | Path, error: type[CnncError], what: str, hint: str
) -> np.ndarray | NpzArchive:
    """An .npy file's array or an .npz file's archive; anything else is ``error`` naming
    the file (``what`` says what the file was meant to be: "input", "weights file")."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
            # A pipe cannot be read twice (head, then data) and has no size to check.
            raise error(f"is not a regular file; cnnc reads a {what} from a file", str(path))
        with open(path, "rb") as f:
            head = f.read(len(NPY_MAGIC))
        if head.startswith(ZIP_MAGIC) or (not head and path.suffix.lower() == ".npz"):
            return NpzArchive(path)
        if head.startswith(NPY_MAGIC) or not head:
            return read_npy(path)
    except FileNotFoundError:
        raise error(f"{what} not found", str(path)) from None
    except IsADirectoryError:
        raise error(f"is a directory, not a {what}", str(path)) from None
    except OSError as e:
        raise error(f"cannot read the {what}: {e.strerror or e}", str(path)) from None
    except ArrayFileError as e:
        raise error(f"cannot read the {what}: {e}", str(path), hint=hint) from None
    except MemoryError:
        raise error(f"out of memory while reading the {what}", str(path)) from None
    kind = next((w for magic, w in NOT_ARRAYS.items() if head.startswith(magic)), None)
    found = f"it looks like {kind}" if kind else "it does not start like one"
    raise error(f"not a NumPy array file (.npy or .npz): {found}", str(path), hint=hint)


def write_npz(f, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` as an .npz archive (as numpy.savez does) to a binary stream,
    which may be one that cannot seek (standard output, a FIFO)."""
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


def nonfinite_count(array: np.ndarray) -> int:
    """How many values of a floating-point array are NaN or infinite."""
    if array.dtype.kind not in "fc":
        return 0
    return int(array.size - np.count_nonzero(np.isfinite(array)))
