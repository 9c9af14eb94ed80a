"""Build the examples' torchvision models (and a small BatchNorm/Dropout CNN) and export them
with PyTorch's ONNX exporters, for tests/test_torchvision_import.py and for the survey that
README's ONNX import section quotes.

Run as a script (with torch, torchvision and onnxscript installed) to print the survey:

    PYTHONPATH=$PWD python tests/torch_exports.py [MODEL ...] [--variants dynamo,...]

Each model is exported by every variant in VARIANTS, imported at -O2 and -O0, and its
outputs compared with torch's for batch 1 and 2 (the exports have a dynamic batch).
"""

from __future__ import annotations

import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torchvision

CLASSIC = [
    "alexnet",
    "vgg16",
    "googlenet",
    "squeezenet1_1",
    "densenet121",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnext50_32x4d",
    "mobilenet_v2",
]
MODERN = [
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "convnext_tiny",
    "regnet_y_400mf",
    "shufflenet_v2_x1_0",
]
SEGMENTERS = ["fcn_resnet50", "lraspp_mobilenet_v3_large"]
SMALL = "small_bn_cnn"
MODELS = CLASSIC + MODERN + SEGMENTERS + [SMALL]

# TorchScript's exporter at opset 17 with and without constant folding, and the dynamo
# exporter (torch.onnx.export's default since PyTorch 2.9) at its default opset, with its
# graph optimizer on (the default) and off.
VARIANTS = ["ts-fold", "ts-nofold", "dynamo", "dynamo-noopt"]


SIZE = 224  # the torchvision models' input size (the small CNN takes 32x32 images)


def size(name: str) -> int:
    return 32 if name == SMALL else SIZE


class SmallBnCnn(torch.nn.Module):
    """A CIFAR-sized CNN with BatchNorm2d, BatchNorm1d, Dropout and x.view(x.size(0), -1)."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(16)
        self.conv2 = torch.nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = torch.nn.BatchNorm2d(32)
        self.pool = torch.nn.MaxPool2d(2)
        self.fc1 = torch.nn.Linear(32 * 8 * 8, 64)
        self.bn3 = torch.nn.BatchNorm1d(64)
        self.drop = torch.nn.Dropout(0.3)
        self.fc2 = torch.nn.Linear(64, 10)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        x = x.view(x.size(0), -1)
        x = self.drop(torch.relu(self.bn3(self.fc1(x))))
        return self.fc2(x)


class SegmentationOutput(torch.nn.Module):
    """out['out'] of a torchvision segmentation model, its modules under their own names."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.backbone = model.backbone
        self.classifier = model.classifier
        self.features_key = None if type(model).__name__ == "LRASPP" else "out"

    def forward(self, x):
        features = self.backbone(x)
        if self.features_key is not None:
            features = features[self.features_key]
        out = self.classifier(features)
        return torch.nn.functional.interpolate(
            out, size=x.shape[-2:], mode="bilinear", align_corners=False
        )


def build(name: str) -> torch.nn.Module:
    """The model with random weights (torch.manual_seed(0)) and seeded non-trivial
    batch-norm statistics, in eval mode."""
    torch.manual_seed(0)
    if name == SMALL:
        model = SmallBnCnn()
    elif name in SEGMENTERS:
        kwargs = {"weights": None, "weights_backbone": None}
        if name == "fcn_resnet50":
            kwargs["aux_loss"] = False
        model = SegmentationOutput(getattr(torchvision.models.segmentation, name)(**kwargs))
    elif name == "googlenet":
        model = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True)
    else:
        model = getattr(torchvision.models, name)(weights=None)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model.eval()


def reference(name: str, model: torch.nn.Module) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Seeded inputs of batch 1 and 2 and torch's outputs for them."""
    rng = np.random.default_rng(0)
    data = {}
    for batch in (1, 2):
        x = rng.standard_normal((batch, 3, size(name), size(name)), dtype=np.float32)
        with torch.no_grad():
            data[batch] = (x, model(torch.from_numpy(x)).numpy())
    return data


def export(model: torch.nn.Module, x: np.ndarray, path: Path, variant: str) -> None:
    """Export with a dynamic batch named N, the input named "input" and the output "output"."""
    kwargs = {"input_names": ["input"], "output_names": ["output"]}
    if variant.startswith("dynamo"):
        kwargs |= {"dynamo": True, "dynamic_shapes": ({0: torch.export.Dim("N")},)}
        if variant == "dynamo-noopt":
            kwargs["optimize"] = False
    else:
        kwargs |= {
            "dynamo": False,
            "opset_version": 17,
            "do_constant_folding": variant == "ts-fold",
            "dynamic_axes": {"input": {0: "N"}, "output": {0: "N"}},
        }
    # Written in a folder of its own and moved when finished (with the external data file
    # the dynamo exporter writes next to it), so that a cut-off export is never reused.
    partial = path.parent / "partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.from_numpy(x),), str(partial / path.name), **kwargs)
    for f in partial.iterdir():
        f.rename(path.parent / f.name)


def survey(names: list[str], variants: list[str], directory: Path) -> None:
    """Print one row per model and variant: the export's node count, whether cnnc imports it
    at -O2, whether its outputs agree with torch's, and cnnc's -O2 node count."""
    import onnx

    import cnnc
    from cnnc.compare import RTOL, tolerance

    print("| model | exporter | nodes | -O2 imports | agrees (-O2, -O0) | -O2 nodes |")
    print("|---|---|---|---|---|---|")
    for name in names:
        model = build(name)
        data = reference(name, model)
        for variant in variants:
            path = directory / f"{name}.{variant}.onnx"
            if not path.exists():
                try:
                    export(model, data[2][0], path, variant)
                except Exception as e:  # any exporter failure is a row of the table
                    print(f"| {name} | {variant} | export fails: {type(e).__name__} | | | |")
                    continue
            nodes = len(onnx.load(str(path), load_external_data=False).graph.node)
            row = [name, variant, str(nodes)]
            agree = []
            out_nodes = ""
            for level in (2, 0):
                try:
                    m = cnnc.load(path, opt_level=level)
                except cnnc.CnncError as e:
                    row.append(f"no: {str(e).splitlines()[0][:120]}")
                    break
                if level == 2:
                    row.append("yes")
                    out_nodes = str(len(m.to_onnx().graph.node))
                ok = True
                for x, y in data.values():
                    got = m.run(x).reshape(y.shape)
                    ok &= bool(np.allclose(got, y, rtol=RTOL, atol=tolerance(y)))
                agree.append("yes" if ok else "NO")
            row += [", ".join(agree), out_nodes]
            print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    chosen = VARIANTS
    for a in sys.argv[1:]:
        if a.startswith("--variants="):
            chosen = a.split("=", 1)[1].split(",")
    out = Path("/tmp/torch_exports")
    out.mkdir(exist_ok=True)
    survey(args or MODELS, chosen, out)
