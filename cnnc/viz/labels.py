"""Class names: the 1,000 ImageNet classes (torchvision's names, in its order), the ten
digits, or a file of one name per line."""

from __future__ import annotations

import os
import stat
from importlib import resources
from pathlib import Path

from cnnc.errors import UsageError

BUILT_IN = ("imagenet", "digits")
# A label file is a few kilobytes; a larger one is a mistake, refused before it is read.
MAX_BYTES = 10_000_000


def load_labels(spec: str | Path) -> list[str]:
    """The class names that ``spec`` names: ``"imagenet"``, ``"digits"``, or the path of a
    UTF-8 text file of one name per line (empty lines at its end are ignored)."""
    if str(spec) in BUILT_IN:
        text = (resources.files("cnnc.viz") / "labels" / f"{spec}.txt").read_text("utf-8")
        return text.splitlines()
    path = Path(spec)
    hint = "give a text file of one class name per line, or imagenet or digits"
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise UsageError("is not a regular file of class names", str(path), hint=hint)
        if os.stat(path).st_size > MAX_BYTES:
            raise UsageError(
                f"the label file is larger than {MAX_BYTES:,} bytes", str(path), hint=hint
            )
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError("label file not found", str(path), hint=hint) from None
    except UnicodeDecodeError:
        raise UsageError("the label file is not UTF-8 text", str(path), hint=hint) from None
    except OSError as e:
        raise UsageError(f"cannot read the label file: {e.strerror or e}", str(path)) from None
    names = text.rstrip("\r\n").splitlines() if text.strip() else []
    names = [n.strip() for n in names]
    if not names:
        raise UsageError("the label file holds no class name", str(path), hint=hint)
    empty = [i + 1 for i, n in enumerate(names) if not n]
    if empty:
        raise UsageError(f"line {empty[0]} of the label file is empty", str(path), hint=hint)
    return names


def check_count(names: list[str], classes: int, spec: str | Path) -> None:
    """Raise unless there is one name for each of the network's ``classes``."""
    if len(names) != classes:
        raise UsageError(
            f"{len(names):,} class names for a network of {classes:,} classes",
            str(spec),
            hint="give one name per class, in the order of the network's outputs",
        )
