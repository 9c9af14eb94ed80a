"""How an image becomes a network's input: the normalization a program declares on its input
(``image: 3x224x224 [normalize=imagenet]``) or ``--normalize`` gives. No Pillow here: the
compiler reads these settings, and only cnnc.viz.images reads pictures."""

from __future__ import annotations

import math
from dataclasses import dataclass

from cnnc.errors import CnncError, Location, UsageError

# torchvision's ImageNet weights expect these (transforms.Normalize in their presets).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Normalization:
    """``x = (pixel / 255 - mean) / std`` per channel; ``mean`` and ``std`` hold one number
    (every channel) or one per channel. ``name`` is how it is shown: imagenet, none, or
    the numbers."""

    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    name: str = "none"

    def check_channels(self, channels: int, where: Location | str | None = None) -> None:
        """Raise if the numbers cannot apply to an input of ``channels`` channels."""
        for what, numbers in (("mean", self.mean), ("std", self.std)):
            if len(numbers) not in (1, channels):
                raise CnncError(
                    f"normalization {self.name} has {len(numbers)} {what} values for an input "
                    f"of {channels} channel{'s' if channels != 1 else ''}",
                    where,
                    hint=f"give one {what} for every channel, or a single one for all",
                )

    def describe(self) -> str:
        return self.name

    def option_text(self) -> str:
        """The text :func:`parse_option` reads back to this normalization, exactly (an ONNX
        model carries it in its metadata)."""
        if self.name in NAMED:
            return self.name
        return ",".join("/".join(repr(v) for v in numbers) for numbers in (self.mean, self.std))


# The ONNX metadata key that carries an input's normalization: cnnc.normalize.<input>.
METADATA_PREFIX = "cnnc.normalize."

NONE = Normalization()
IMAGENET = Normalization(IMAGENET_MEAN, IMAGENET_STD, "imagenet")
NAMED = {"imagenet": IMAGENET, "none": NONE}


def _numbers_text(numbers: tuple[float, ...]) -> str:
    return "/".join(f"{v:g}" for v in numbers)


def make(
    mean: tuple[float, ...], std: tuple[float, ...], where: Location | str | None = None
) -> Normalization:
    """A normalization from numbers, checked: finite, and every std above zero."""
    for what, numbers in (("mean", mean), ("std", std)):
        if not numbers or not all(math.isfinite(v) for v in numbers):
            raise CnncError(f"the {what} of a normalization must be finite numbers", where)
    if any(v <= 0 for v in std):
        raise CnncError(
            f"the std of a normalization must be above zero, got {_numbers_text(std)}", where
        )
    return Normalization(tuple(mean), tuple(std), f"{_numbers_text(mean)},{_numbers_text(std)}")


def parse_option(text: str) -> Normalization:
    """The value of ``--normalize``: ``imagenet``, ``none``, or ``MEAN,STD`` where each is a
    number or numbers joined by ``/`` (one per channel): ``0.5,0.25`` or
    ``0.485/0.456/0.406,0.229/0.224/0.225``."""
    word = text.strip().lower()
    if word in NAMED:
        return NAMED[word]
    hint = "--normalize imagenet, none, or MEAN,STD such as 0.5,0.25 or 0.1/0.2/0.3,0.5/0.5/0.5"
    parts = text.split(",")
    if len(parts) != 2:
        raise UsageError(f"--normalize {text!r} is not a normalization", hint=hint)
    try:
        mean, std = (tuple(float(v) for v in part.split("/")) for part in parts)
    except ValueError:
        raise UsageError(f"--normalize {text!r}: not numbers", hint=hint) from None
    try:
        return make(mean, std)
    except CnncError as e:
        raise UsageError(f"--normalize {text!r}: {e.message}", hint=hint) from None
