"""cnnc summary against torchinfo and PyTorch on torchvision's ResNet-18, ResNet-50 and
VGG-16. Not part of the suite (it needs torch, torchvision and torchinfo, never
dependencies); run it from the repository with a Python that has them:

    python tests/compare_summary_torch.py

Prints, for ResNet-18, the layers whose parameters or MACs differ from torchinfo's (by
module name), the totals, and the bytes of the layer outputs; then for each network the
receptive field of layer4 (features, for VGG-16) in cnnc and measured in PyTorch: the
extent of the input gradient of one centre cell, weights made positive and max pools made
average pools (a max passes its gradient to one cell only)."""

import math
import sys
from pathlib import Path

import torch
import torchvision
from torchinfo import summary as torchinfo_summary

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cnnc  # noqa: E402
from cnnc.ir.printer import summary_rows  # noqa: E402


def compare_torchinfo() -> None:
    net = torchvision.models.resnet18()
    info = torchinfo_summary(net, input_size=(1, 3, 224, 224), depth=10, verbose=0)
    modules = {m: n for n, m in net.named_modules()}
    theirs = {modules[layer.module]: layer for layer in info.summary_list if layer.is_leaf_layer}
    model = cnnc.compile(ROOT / "examples" / "resnet18.cnn", opt_level=0)
    ours = {r["name"]: r for r in summary_rows(model.graph) if r["kind"] == "layer"}
    both = [name for name in theirs if name in ours]
    for name in both:
        r, t = ours[name], theirs[name]
        if (r["params"], r["macs"]) != (t.num_params, t.macs):
            print(
                f"{name:24} {r['op']:8} params {r['params']:>9,} vs {t.num_params:>9,}"
                f"   MACs {r['macs']:>12,} vs {t.macs:>12,}"
            )
    same_shapes = sum([1, *ours[n]["outputs"][0][1:]] == list(theirs[n].output_size) for n in both)
    print(f"{len(both)} layers named in both; output shapes equal on {same_shapes}")
    print(
        f"parameters: cnnc {sum(r['params'] for r in ours.values()):,}, "
        f"torchinfo {info.total_params:,}"
    )
    print(
        f"MACs: cnnc {sum(r['macs'] for r in ours.values()):,}, torchinfo {info.total_mult_adds:,}"
    )
    leaf_bytes = sum(4 * math.prod(t.output_size) for t in info.summary_list if t.is_leaf_layer)
    kinds = sum(r["bytes"] for r in ours.values() if r["op"] not in ("add", "flatten"))
    print(
        f"bytes of layer outputs: torchinfo's leaf calls {leaf_bytes:,}; cnnc's layers "
        f"but add and flatten {kinds:,}, all {sum(r['bytes'] for r in ours.values()):,}"
    )


def _average_pools(module: torch.nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, torch.nn.MaxPool2d):
            setattr(
                module, name, torch.nn.AvgPool2d(child.kernel_size, child.stride, child.padding)
            )
        else:
            _average_pools(child)


def measured_field(name: str, size: int) -> int:
    net = getattr(torchvision.models, name)().eval()
    _average_pools(net)
    with torch.no_grad():
        for p in net.parameters():
            p.abs_()
    body = net.features if name == "vgg16" else torch.nn.Sequential(*list(net.children())[:-2])
    x = torch.ones(1, 3, size, size, requires_grad=True)
    y = body(x)
    y[0, :, y.shape[2] // 2, y.shape[3] // 2].sum().backward()
    rows = (x.grad[0].abs().sum(0) > 0).nonzero()[:, 0]
    return int(rows.max() - rows.min() + 1)


def compare_fields() -> None:
    for name, layer, size in (
        ("resnet18", "layer4", 800),
        ("resnet50", "layer4", 800),
        ("vgg16", "conv5_3.maxpool", 512),
    ):
        model = cnnc.compile(ROOT / "examples" / f"{name}.cnn")
        rows = {r["name"]: r for r in summary_rows(model.graph)}
        print(
            f"{name} {layer}: cnnc {rows[layer]['receptive_field']} "
            f"/{rows[layer]['output_stride']}, PyTorch {measured_field(name, size)}"
        )


if __name__ == "__main__":
    compare_torchinfo()
    compare_fields()
