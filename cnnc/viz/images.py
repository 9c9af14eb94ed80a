"""Images in: PNG, JPEG and BMP files read with Pillow, converted to a network's channels,
resized and centre-cropped to its input, scaled to [0, 1] and normalized."""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path

import numpy as np

from cnnc import preprocess
from cnnc.errors import InputError
from cnnc.ir.types import TensorType
from cnnc.preprocess import Normalization
from cnnc.viz import pillow

# The formats read, by their first bytes and by their names' suffixes.
FORMATS = ("PNG", "JPEG", "BMP")
MAGIC = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"BM": "BMP"}
SUFFIXES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP"}
MODES = {1: "L", 3: "RGB"}


def is_image(path: str | Path) -> bool:
    """Whether ``--input PATH`` means images: a folder, a file named .png, .jpg, .jpeg or
    .bmp, or a file that starts as one of these formats does."""
    path = Path(path)
    if path.suffix.lower() in SUFFIXES:
        return True
    try:
        if path.is_dir():
            return True
        if not path.is_file():
            return False
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return False
    return any(head.startswith(magic) for magic in MAGIC)


def image_files(paths: list[str | Path]) -> list[Path]:
    """The image files that ``paths`` name: each file as given, and each folder's PNG, JPEG
    and BMP files (by suffix) in sorted order of their names."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(
                p for p in path.iterdir() if p.suffix.lower() in SUFFIXES and p.is_file()
            )
            if not found:
                raise InputError("holds no image (.png, .jpg, .jpeg or .bmp) to read", str(path))
            files.extend(found)
        else:
            files.append(path)
    return files


def _spatial(input_type: TensorType | tuple[int, ...]) -> tuple[int, int, int]:
    shape = input_type.shape if isinstance(input_type, TensorType) else tuple(input_type)
    if len(shape) == 4:
        shape = shape[1:]
    if len(shape) != 3 or not all(isinstance(d, int) for d in shape):
        raise InputError(
            f"images need an input of channels × height × width; this one is {list(shape)}"
        )
    return shape  # type: ignore[return-value]


def open_image(path: str | Path):
    """The decoded image at ``path`` (a PIL image, with EXIF rotation applied), or one
    InputError naming the file: missing, not PNG/JPEG/BMP, damaged, truncated, or larger
    than Pillow's limit against decompression bombs (Image.MAX_IMAGE_PIXELS)."""
    image_module = pillow()
    from PIL import ImageOps

    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise InputError("image not found", str(path)) from None
    except OSError as e:
        raise InputError(f"cannot read the image: {e.strerror or e}", str(path)) from None
    if not stat.S_ISREG(mode):
        raise InputError("is not a regular file; cnnc reads an image from a file", str(path))
    with open(path, "rb") as f:
        head = f.read(8)
    if not any(head.startswith(magic) for magic in MAGIC):
        from cnnc.npyfile import NOT_ARRAYS

        kind = next((w for magic, w in NOT_ARRAYS.items() if head.startswith(magic)), None)
        found = f"it looks like {kind}" if kind else "it does not start like one"
        raise InputError(
            f"not a PNG, JPEG or BMP image: {found}",
            str(path),
            hint="convert it to PNG, or give a NumPy array (.npy) of the input",
        )
    limit = image_module.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            # Pillow warns above MAX_IMAGE_PIXELS and refuses only above twice that.
            warnings.simplefilter("error", image_module.DecompressionBombWarning)
            with image_module.open(path, formats=FORMATS) as image:
                image.load()
                image = ImageOps.exif_transpose(image)
    except (image_module.DecompressionBombError, image_module.DecompressionBombWarning):
        raise InputError(
            f"the image is too large: more than {limit:,} pixels (Pillow's limit against "
            "decompression bombs)",
            str(path),
            hint="scale the image down first; a network needs a few hundred pixels a side",
        ) from None
    except image_module.UnidentifiedImageError:
        raise InputError(
            "cannot decode the image: its header is damaged or cut short", str(path)
        ) from None
    except MemoryError:
        raise InputError("out of memory while decoding the image", str(path)) from None
    except Exception as e:  # Pillow's decoders raise many kinds on damaged data
        reason = str(e).strip().splitlines()[0] if str(e).strip() else "damaged data"
        raise InputError(f"cannot decode the image: {reason}", str(path)) from None
    return image


def _to_mode(image, channels: int, path: Path):
    """The image as grey (L) or RGB: transparent pixels over white, as a viewer shows them."""
    image_module = pillow()
    if channels not in MODES:
        raise InputError(
            f"an image has 1 (grey) or 3 (RGB) channels; this network's input has {channels}",
            str(path),
            hint="give a NumPy array (.npy) of the input instead",
        )
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit grey PNGs: keep their precision by scaling to 8 bits only at the end.
        grey = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode != "F" else max(float(grey.max()), 1.0)
        image = image_module.fromarray(np.clip(grey / top * 255.0, 0, 255).astype(np.float32))
        return image, "F"
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = image_module.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = image_module.alpha_composite(background, rgba)
    return image.convert(MODES[channels]), MODES[channels]


def resized_size(width: int, height: int, out_h: int, out_w: int) -> tuple[int, int]:
    """The size (width, height) the image is resized to before the centre crop: the side
    that needs the larger scale becomes the network's, the other keeps the aspect ratio
    (torchvision's Resize(size) for a square input: the shorter side becomes ``size``)."""
    if out_h / height >= out_w / width:
        return max(out_w, int(out_h * width / height)), out_h
    return out_w, max(out_h, int(out_w * height / width))


def crop_box(width: int, height: int, out_h: int, out_w: int) -> tuple[int, int, int, int]:
    """The centre crop (left, top, right, bottom), rounded as torchvision's CenterCrop."""
    top = round((height - out_h) / 2.0)
    left = round((width - out_w) / 2.0)
    return left, top, left + out_w, top + out_h


def image_array(image, shape: tuple[int, int, int], path: Path = Path("<image>")) -> np.ndarray:
    """A decoded image as a C×H×W float32 array in [0, 1]: converted to the channels,
    resized (bilinear, antialiased as Pillow does when it shrinks) so that it covers H×W,
    then centre-cropped."""
    image_module = pillow()
    channels, out_h, out_w = shape
    image, mode = _to_mode(image, channels, path)
    width, height = image.size
    size = resized_size(width, height, out_h, out_w)
    if size != (width, height):
        image = image.resize(size, image_module.Resampling.BILINEAR)
    image = image.crop(crop_box(*size, out_h, out_w))
    array = np.asarray(image, dtype=np.float32) / np.float32(255.0)
    if mode == "F" and channels == 3:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim == 2:
        array = array[:, :, None]
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def normalize(
    x: np.ndarray, normalization: Normalization | str | None, invert: bool = False
) -> np.ndarray:
    """``(x - mean) / std`` per channel (axis 1 of N×C×H×W) of values in [0, 1]; with
    ``invert``, ``1 - x`` first (dark strokes on light paper become light on dark)."""
    if isinstance(normalization, str):
        normalization = preprocess.parse_option(normalization)
    normalization = normalization or preprocess.NONE
    normalization.check_channels(x.shape[1])
    if invert:
        x = 1.0 - x
    mean = np.asarray(normalization.mean, np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(normalization.std, np.float32).reshape(1, -1, 1, 1)
    return ((x - mean) / std).astype(np.float32)


def load_images(
    paths: list[str | Path] | str | Path,
    input_type: TensorType | tuple[int, ...],
    normalize: Normalization | str | None = None,
    invert: bool = False,
) -> np.ndarray:
    """A batch N×C×H×W (float32) of the images that ``paths`` name (files, and folders
    whose images are taken in sorted order), for an input of type or shape
    ``input_type``: each converted to grey or RGB, resized, centre-cropped, scaled to
    [0, 1], inverted if asked, then normalized (``normalize``: a Normalization,
    ``"imagenet"``, ``"none"``, ``"MEAN,STD"``; None is none)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    shape = _spatial(input_type)
    files = image_files(list(paths))
    batch = np.empty((len(files), *shape), np.float32)
    for i, path in enumerate(files):
        with open_image(path) as image:
            batch[i] = image_array(image, shape, path)
    return globals()["normalize"](batch, normalize, invert)
