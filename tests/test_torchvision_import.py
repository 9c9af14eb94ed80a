"""torchvision's CNNs, exported by PyTorch's two ONNX exporters, import into cnnc and compute
torch's outputs, with their convolutions' weights under their state_dict names.

These tests build and export real models (seconds to a minute each), so they are marked
``torchvision`` and left out of the default run (pyproject's addopts deselect them). Run
them with a Python that has torch, torchvision and, for the dynamo exporter, onnxscript:

    pytest -m torchvision tests/test_torchvision_import.py

Without torch or torchvision they skip (the reason shows in ``pytest -ra``); without
onnxscript, only the dynamo exporter's cases skip. Every model has random weights
(torch.manual_seed(0)) and seeded non-trivial batch-norm statistics, in eval mode.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_agree

import cnnc

torch = pytest.importorskip("torch", reason="needs torch: these tests export models with it")
torchvision = pytest.importorskip(
    "torchvision", reason="needs torchvision: these tests export its models"
)

pytestmark = pytest.mark.torchvision

CLASSIFIERS = [
    "efficientnet_b0",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "convnext_tiny",
    "regnet_y_400mf",
    "shufflenet_v2_x1_0",
    "resnext50_32x4d",
    "resnet34",
]
SEGMENTERS = ["lraspp_mobilenet_v3_large", "fcn_resnet50"]
MODELS = CLASSIFIERS + SEGMENTERS
# TorchScript's exporter at opset 17 (what most ONNX files in the wild come from), and the
# dynamo exporter (torch.onnx.export's default since PyTorch 2.9) at its default opset.
EXPORTERS = ["torchscript", "dynamo"]
SIZE = 224


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
    torch.manual_seed(0)
    if name in SEGMENTERS:
        kwargs = {"weights": None, "weights_backbone": None}
        if name == "fcn_resnet50":
            kwargs["aux_loss"] = False
        model = SegmentationOutput(getattr(torchvision.models.segmentation, name)(**kwargs))
    else:
        model = getattr(torchvision.models, name)(weights=None)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model.eval()


@functools.cache
def exported(name: str, exporter: str, directory: str) -> tuple[Path, dict, set[str]]:
    """The model exported to ``directory``, torch's outputs for seeded inputs of batch 1
    and 2, and its state_dict names (built and exported once per session)."""
    if exporter == "dynamo":
        pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript")
    model = build(name)
    rng = np.random.default_rng(0)
    data = {}
    for batch in (1, 2):
        x = rng.standard_normal((batch, 3, SIZE, SIZE), dtype=np.float32)
        with torch.no_grad():
            data[batch] = (x, model(torch.from_numpy(x)).numpy())
    path = Path(directory) / f"{name}.{exporter}.onnx"
    kwargs = {"input_names": ["input"], "output_names": ["output"]}
    if exporter == "dynamo":
        kwargs |= {"dynamo": True, "dynamic_shapes": ({0: torch.export.Dim("N")},)}
    else:
        kwargs |= {
            "dynamo": False,
            "opset_version": 17,
            "dynamic_axes": {"input": {0: "N"}, "output": {0: "N"}},
        }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.from_numpy(data[2][0]),), str(path), **kwargs)
    return path, data, set(model.state_dict())


def load(path: Path, name: str, exporter: str, opt_level: int = 2) -> cnnc.Model:
    """The imported model; an import error fails the test with cnnc's message alone."""
    try:
        return cnnc.load(path, opt_level=opt_level)
    except cnnc.CnncError as e:
        error = e  # failed outside the handler, so that the report is the message alone
    pytest.fail(f"cnnc cannot import {name} ({exporter}):\n{error}", pytrace=False)


@pytest.fixture(scope="session")
def exports_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("torchvision"))


# Dynamo writes ConvNeXt's stochastic-depth identity as as_strided: a Reshape of the whole
# tensor to one axis and a Gather of every element, which cnnc refuses by name (a flat view
# of a batch-symbolic tensor is not a CNN op). TorchScript's export of it imports.
REFUSED = {("convnext_tiny", "dynamo"): "dynamo's as_strided (flat Reshape + Gather)"}
CASES = [
    pytest.param(
        name,
        exporter,
        marks=[pytest.mark.xfail(strict=True, reason=REFUSED[name, exporter])]
        if (name, exporter) in REFUSED
        else [],
    )
    for name in MODELS
    for exporter in EXPORTERS
]


@pytest.mark.parametrize(("name", "exporter"), CASES)
def test_torchvision_model_imports_and_computes_torchs_outputs(name, exporter, exports_dir):
    path, data, _ = exported(name, exporter, exports_dir)
    model = load(path, name, exporter)
    for batch, (x, y) in data.items():
        assert_agree(model.run(x), y, f"{name} ({exporter}), batch {batch}")


@pytest.mark.parametrize(("name", "exporter"), CASES)
def test_torchvision_model_conv_weights_keep_their_state_dict_names(name, exporter, exports_dir):
    path, _, state_dict = exported(name, exporter, exports_dir)
    model = load(path, name, exporter, opt_level=0)
    weights = [n.inputs[1].name for n in model.graph.nodes if n.op == "conv"]
    assert weights
    assert [w for w in weights if w not in state_dict] == []
    assert {n.name + ".weight" for n in model.graph.nodes if n.op == "conv"} == set(weights)


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("name", MODELS)
def test_example_loads_torchvisions_state_dict_and_computes_its_outputs(name, tmp_path):
    """examples/NAME.cnn takes torchvision's state_dict as it is (every name and shape) and
    computes torchvision's outputs, at -O0 and -O2. Layer norms and ConvNeXt's layer scales
    get random values too, so that a mistake in them shows in the outputs."""
    model = build(name)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            if hasattr(m, "layer_scale"):
                m.layer_scale.copy_(torch.rand(m.layer_scale.shape, generator=g) + 0.5)
    weights = tmp_path / f"{name}.npz"
    np.savez(weights, **{k: v.numpy() for k, v in model.state_dict().items()})
    x = np.random.default_rng(3).standard_normal((2, 3, SIZE, SIZE), dtype=np.float32)
    with torch.no_grad():
        y = model(torch.from_numpy(x)).numpy()
    for level in (0, 2):
        ours = cnnc.compile(EXAMPLES / f"{name}.cnn", weights=weights, opt_level=level)
        assert_agree(ours.run(x), y, f"{name} -O{level} with torchvision's state_dict")
