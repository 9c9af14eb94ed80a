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
from cnnc.train.step import Optimizer, TrainingStep

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
