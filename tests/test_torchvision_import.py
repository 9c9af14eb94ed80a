"""torchvision's CNNs, exported by PyTorch's two ONNX exporters, import into cnnc and compute
torch's outputs, with their convolutions' weights under their state_dict names.

The models are those of the examples (classic and modern classifiers, two segmenters) and a
small CNN with BatchNorm1d/2d, Dropout and x.view(x.size(0), -1); tests/torch_exports.py
builds and exports them. Each is exported four ways: TorchScript's exporter at opset 17
with constant folding on and off, and the dynamo exporter (torch.onnx.export's default
since PyTorch 2.9) at its default opset with its optimizer on and off; each export has a
dynamic batch, and is imported at -O0 and -O2 and run at batch 1 and 2.

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
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_agree

import cnnc

torch = pytest.importorskip("torch", reason="needs torch: these tests export models with it")
torchvision = pytest.importorskip(
    "torchvision", reason="needs torchvision: these tests export its models"
)

from torch_exports import MODELS, SIZE, VARIANTS, build, export, reference  # noqa: E402

pytestmark = pytest.mark.torchvision


@functools.cache
def exported(name: str, variant: str, directory: str) -> tuple[Path, dict, set[str]]:
    """The model exported to ``directory``, torch's outputs for seeded inputs of batch 1
    and 2, and its state_dict names (built and exported once per session)."""
    if variant.startswith("dynamo"):
        pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript")
    model = build(name)
    data = reference(name, model)
    path = Path(directory) / f"{name}.{variant}.onnx"
    export(model, data[2][0], path, variant)
    return path, data, set(model.state_dict())


def load(path: Path, name: str, variant: str, opt_level: int = 2) -> cnnc.Model:
    """The imported model; an import error fails the test with cnnc's message alone."""
    try:
        return cnnc.load(path, opt_level=opt_level)
    except cnnc.CnncError as e:
        error = e  # failed outside the handler, so that the report is the message alone
    pytest.fail(f"cnnc cannot import {name} ({variant}):\n{error}", pytrace=False)


@pytest.fixture(scope="session")
def exports_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("torchvision"))


CASES = [(name, variant) for name in MODELS for variant in VARIANTS]


@pytest.mark.parametrize("level", [2, 0])
@pytest.mark.parametrize(("name", "variant"), CASES)
def test_torchvision_model_imports_and_computes_torchs_outputs(name, variant, level, exports_dir):
    path, data, _ = exported(name, variant, exports_dir)
    model = load(path, name, variant, opt_level=level)
    for batch, (x, y) in data.items():
        assert_agree(model.run(x), y, f"{name} ({variant}) -O{level}, batch {batch}")


@pytest.mark.parametrize(("name", "variant"), CASES)
def test_torchvision_model_conv_weights_keep_their_state_dict_names(name, variant, exports_dir):
    path, _, state_dict = exported(name, variant, exports_dir)
    model = load(path, name, variant, opt_level=0)
    weights = [n.inputs[1].name for n in model.graph.nodes if n.op == "conv"]
    assert weights
    assert [w for w in weights if w not in state_dict] == []
    assert {n.name + ".weight" for n in model.graph.nodes if n.op == "conv"} == set(weights)


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


# The examples whose programs are checked here against torchvision's state_dict and outputs.
EXAMPLE_MODELS = [
    "efficientnet_b0",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "convnext_tiny",
    "regnet_y_400mf",
    "shufflenet_v2_x1_0",
    "resnext50_32x4d",
    "resnet34",
    "lraspp_mobilenet_v3_large",
    "fcn_resnet50",
]


@pytest.mark.parametrize("name", EXAMPLE_MODELS)
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
