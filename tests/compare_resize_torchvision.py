"""Check that cnnc reads images as torchvision's Resize(side) + CenterCrop(side) does.

Not a pytest module (torch is not a test dependency): run it where torchvision and Pillow
are installed, from the repository root:

    PYTHONPATH=. python tests/compare_resize_torchvision.py

It writes random grey and RGB PNGs of several sizes, reads each with
cnnc.viz.images.load_images and with torchvision's transforms, and prints the largest
difference (0.0 when they agree exactly)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torchvision.transforms as T
from PIL import Image

from cnnc.viz.images import load_images

CASES = [(300, 400, 224), (401, 257, 224), (64, 64, 8), (50, 37, 8), (224, 224, 224)]
CASES += [(12, 8, 8), (100, 333, 32)]


def main() -> None:
    rng = np.random.default_rng(0)
    worst = 0.0
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "image.png"
        for h, w, side in CASES:
            for mode, channels in (("RGB", 3), ("L", 1)):
                shape = (h, w, 3) if channels == 3 else (h, w)
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
                ours = load_images([path], (channels, side, side))[0]
                transform = T.Compose([T.Resize(side), T.CenterCrop(side), T.ToTensor()])
                theirs = transform(Image.open(path)).numpy()
                difference = float(np.abs(ours - theirs).max())
                worst = max(worst, difference)
                print(f"{h}x{w} {mode} -> {side}x{side}: max |difference| {difference}")
    print(f"{len(CASES) * 2} cases, largest difference {worst}")


if __name__ == "__main__":
    main()
