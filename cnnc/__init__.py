"""cnnc: a compiler for convolutional neural networks.

>>> import cnnc
>>> model = cnnc.compile("examples/lenet5.cnn")
>>> y = model.run(model.random_input(batch=2))
>>> model.to_onnx("lenet5.onnx")
"""

__version__ = "0.1.0"

from cnnc.api import Model, compile, evaluate, fit, load, parse, read_input, training_step
from cnnc.errors import CnncError
from cnnc.limits import Limits


def __getattr__(name: str):
    # The training classes load with the gradient rules, which a compile or a run never
    # needs: imported when first asked for (every command starts a little sooner).
    if name in ("Optimizer", "TrainingStep"):
        from cnnc.train import step

        return getattr(step, name)
    raise AttributeError(f"module 'cnnc' has no attribute {name!r}")


__all__ = [
    "CnncError",
    "Limits",
    "Model",
    "Optimizer",
    "TrainingStep",
    "__version__",
    "compile",
    "evaluate",
    "fit",
    "load",
    "parse",
    "read_input",
    "training_step",
]
