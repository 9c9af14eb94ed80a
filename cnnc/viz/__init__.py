"""Seeing inside a network: images in (images.py), class names (labels.py), pictures of
its feature maps and kernels (maps.py), the graph drawn (graph.py) and the HTML report
(report.py). Pillow, the optional extra ``cnnc[viz]``, is imported
only when an image is read or drawn, so that compiling and running never need it."""

from __future__ import annotations

from cnnc.errors import UsageError


def pillow():
    """The PIL.Image module, or the one error that names the extra to install."""
    try:
        from PIL import Image
    except ImportError:
        raise UsageError(
            "reading and drawing images needs Pillow, which is not installed",
            hint="pip install 'cnnc[viz]'",
        ) from None
    return Image
