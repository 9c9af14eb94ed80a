"""The ``cnnc`` command: parse arguments, call the API, print; every user mistake exits 1."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

import cnnc
from cnnc import output
from cnnc.compare import (
    DESCRIPTION,
    agree,
    first_divergence,
    max_difference,
    nonfinite_counts,
)
from cnnc.errors import CnncError, InternalError, ModelFileError, UsageError
from cnnc.limits import NAMES, check_run_memory, parse_option
from cnnc.npyfile import write_npz
from cnnc.passes.manager import PASSES
from cnnc.passes.manager import Options as PassOptions
from cnnc.passes.report import OnnxCounts, PassReport, files_line

if TYPE_CHECKING:
    from cnnc.train.step import Optimizer

EXAMPLES = {
    "compile": """examples:
  cnnc compile examples/lenet5.cnn                 # writes examples/lenet5.onnx
  cnnc compile examples/vgg16.cnn -o vgg16.onnx --opset 13
  cnnc compile model.cnn --weights trained.npz -o model.onnx
  cnnc compile examples/lenet5.cnn --train -o step.onnx --optimizer sgd --momentum 0.9""",
    "run": """examples:
  cnnc run examples/lenet5.cnn                     # random weights, random input
  cnnc run lenet5.onnx --backend onnxruntime --batch 4
  cnnc run lenet5.onnx --compare                   # both backends, check they agree
  cnnc run model.cnn --weights w.npz --input x.npy -o y.npy
  cnnc run two_inputs.cnn --input image=x.npy --input mask=m.npy -o outputs.npz
  cnnc run examples/resnet18.cnn --weights r18.npz --input cat.jpg --labels imagenet
  cnnc run examples/digits.cnn --weights examples/digits.npz --input digits/ --labels digits""",
    "viz": """examples:
  cnnc viz examples/digits.cnn --weights examples/digits.npz --input 2.png -o viz/
  cnnc viz examples/resnet18.cnn --weights r18.npz --input cat.jpg --labels imagenet \\
      --layers conv1,layer1.0.relu,layer4.1.relu -o cat/""",
    "dump": """examples:
  cnnc dump examples/lenet5.cnn
  cnnc dump lenet5.onnx
  cnnc dump examples/lenet5.cnn --train --optimizer adamw   # the graph of one training step""",
    "summary": """examples:
  cnnc summary examples/vgg16.cnn
  cnnc summary examples/resnet18.cnn --depth 2 --batch 8  # two levels of blocks
  cnnc summary examples/resnet18.cnn --json        # the rows, for scripts
  cnnc summary examples/vgg16.cnn --fully-conv --input-size 384x384
  cnnc summary examples/resnet18.cnn --tensors     # the names a weights file holds""",
    "import": """examples:
  cnnc import model.onnx                   # writes model.cnn and model.npz
  cnnc import model.onnx -o net.cnn && cnnc run net.cnn --weights net.npz""",
    "bench": """examples:
  cnnc bench examples/vgg16.cnn                    # batch 1, 10 runs
  cnnc bench examples/lenet5.cnn --batch 64 --repeat 50 --reference
  cnnc bench examples/alexnet.cnn -O0 --json > alexnet-O0.json
  cnnc bench examples/vgg16.cnn --compile --repeat 3 # compile time and memory, fresh processes
  cnnc bench --scale                               # compile 1,000 to 100,000-layer networks
  cnnc bench examples/lenet5.cnn --train --batch 64 # one training step against PyTorch
  cnnc bench --optimizers                          # cnnc -O2 against onnxsim, onnxslim, ...
  cnnc bench --optimizers model.onnx --tools cnnc,onnxsim --rounds 20""",
    "graph": """examples:
  cnnc graph examples/resnet18.cnn -o resnet18.svg   # open it in a browser; click a block's title
  cnnc graph examples/resnet50.cnn --fold 1 -o r50.svg # the stages, their blocks folded
  cnnc graph examples/googlenet.cnn -O0 -o googlenet.dot  # DOT, for Graphviz's dot
  cnnc graph model.onnx -o - > model.svg""",
    "train": """examples:
  cnnc train net.cnn --data digits -o net.npz      # Adam, lr 0.001, 10 epochs, batch 32
  cnnc train net.cnn --data digits -o net.npz --epochs 30 --lr 0.003
  cnnc train net.cnn --data train.npz -o w.npz --optimizer sgd --lr 0.1 --momentum 0.9
  cnnc train net.cnn --data train.npz -o w.npz --weights w0.npz --no-shuffle --val-split 0""",
    "report": """examples:
  cnnc report examples/vgg16.cnn -o vgg16.html      # random weights, seeded random input
  cnnc report net.cnn --weights net.npz --input photo.jpg -o net.html
  cnnc report model.onnx --input x.npy -O1 -o model.html""",
    "eval": """examples:
  cnnc eval net.cnn --weights net.npz --data digits          # the rows training held out
  cnnc eval net.cnn --weights net.npz --data test.npz --split all
  cnnc eval net.onnx --data digits --backend onnxruntime""",
}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake exits 1 like every other user mistake."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")


def _model_args(p: argparse.ArgumentParser, default_level: int = 2, optional: bool = False) -> None:
    p.add_argument(
        "model",
        metavar="MODEL",
        nargs="?" if optional else None,
        help="a program (.cnn) or an ONNX model (.onnx)",
    )
    p.add_argument(
        "--network", metavar="NAME", help="which network of the program (default: the last one)"
    )
    p.add_argument(
        "--weights",
        metavar="FILE.npz",
        help="trained weights, tensors named <layer>.weight / <layer>.bias",
    )
    p.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="accept weights that hold NaN or infinity (refused by default)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the random weights and input (default 0)"
    )
    opt = p.add_argument_group("optimization")
    levels = opt.add_mutually_exclusive_group()
    for level, what in ((0, "no passes"), (1, "clean-ups"), (2, "every optimization")):
        default = " (the default)" if level == default_level else ""
        levels.add_argument(
            f"-O{level}",
            dest="opt_level",
            action="store_const",
            const=level,
            help=f"{what}{default}",
        )
    levels.add_argument(
        "--passes", type=_names, metavar="A,B,...", help="run exactly these passes, in this order"
    )
    p.set_defaults(opt_level=default_level)
    opt.add_argument(
        "--fully-conv",
        action="store_true",
        help="make the classifier fully convolutional: any larger input gives a map of scores",
    )
    opt.add_argument(
        "--print-ir-after",
        type=_names,
        default=[],
        metavar="PASS",
        help="print the IR (on stderr) after these passes",
    )
    opt.add_argument(
        "--print-ir-after-all", action="store_true", help="print the IR after every pass"
    )
    opt.add_argument(
        "--verify-each",
        action="store_true",
        help="check on a random input that each pass leaves the outputs unchanged",
    )
    _limit_arg(p)


def _limit_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--limit",
        action="append",
        default=[],
        metavar="NAME=N",
        help="lift (or lower) a limit, such as repeat=20000 or memory=64Gi; repeatable; "
        "the limits: " + ", ".join(NAMES),
    )


def _report_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--report",
        action="store_true",
        help="print on stderr what each pass removed, added and rewrote, and the sizes of "
        "the model before and after",
    )


def _names(text: str) -> list[str]:
    return [n for n in text.split(",") if n]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = _Parser(
        prog="cnnc",
        description="cnnc compiles convolutional neural networks written in a short language "
        "to ONNX, and runs them in its own NumPy interpreter.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="run `cnnc COMMAND --help` for the options and examples of each command; "
        f"passes: {', '.join(PASSES)}",
    )
    parser.add_argument("--version", action="version", version=f"cnnc {cnnc.__version__}")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks of errors")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help,
            description=help,
            epilog=EXAMPLES[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    p = command("compile", "compile a program to an ONNX model")
    _model_args(p)
    p.add_argument(
        "-o",
        "--output",
        metavar="OUT.onnx",
        help="output file (default: the program's name with .onnx)",
    )
    p.add_argument(
        "--opset",
        type=int,
        default=None,
        help="ONNX opset to emit (default 17; 13 up to the newest supported)",
    )
    p.add_argument(
        "--inline-functions",
        action="store_true",
        help="write fused ops as their standard ONNX ops instead of model-local functions",
    )
    _report_arg(p)
    _add_train_arguments(
        p, "write the graph of one training step instead (default output MODEL.train.onnx)"
    )

    p = command("run", "run a program or an ONNX model on an input")
    _model_args(p)
    p.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="[NAME=]X.npy",
        help="input batch (default: seeded random); a network of several inputs takes one "
        "--input each, in order or as NAME=FILE, or one .npz of arrays named like its inputs",
    )
    p.add_argument("--batch", type=int, default=1, help="batch size of the random input")
    _add_backend_argument(p)
    p.add_argument(
        "--compare",
        action="store_true",
        help=f"run both backends and check that they agree ({DESCRIPTION})",
    )
    p.add_argument("--top", type=int, default=5, help="classes to print per item (default 5)")
    p.add_argument("-o", "--output", metavar="Y.npy", help="save the output array here")
    _image_args(p)

    p = command("viz", "draw each layer's feature maps, the first kernels and the prediction")
    _model_args(p, default_level=0)
    p.add_argument(
        "--input",
        action="append",
        required=True,
        metavar="IMAGE|X.npy",
        help="the input: an image (PNG, JPEG, BMP), a folder of them, or an array; the "
        "pictures show the first item",
    )
    p.add_argument(
        "--layers",
        type=_names,
        metavar="A,B,...",
        help="draw only these layers (default: every input and layer; cnnc dump -O0 lists "
        "the names)",
    )
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="folder of the PNGs")
    _image_args(p)

    p = command("dump", "print the IR of a program or an ONNX model")
    _model_args(p)
    p.add_argument("--after", metavar="PASS", help="stop the pipeline after this pass")
    _report_arg(p)
    _add_train_arguments(p, "print the graph of one training step instead")

    p = command("import", "write an ONNX model as a program and a weights file")
    p.add_argument("model", metavar="MODEL.onnx", help="the ONNX model to import")
    p.add_argument(
        "-o",
        "--output",
        metavar="OUT.cnn",
        help="the program (default: the model's name with .cnn); the weights go to "
        "the same name with .npz",
    )
    _limit_arg(p)

    p = command("bench", "time the interpreter against onnxruntime on the same input")
    _model_args(p, optional=True)
    p.add_argument(
        "--compile",
        action="store_true",
        help="time `cnnc compile MODEL` instead, against NumPy drawing and saving as many "
        "weights (and PyTorch's build and export, if installed), each in a fresh process",
    )
    p.add_argument(
        "--train",
        action="store_true",
        help="time one training step (SGD) in the interpreter, onnxruntime and PyTorch (if "
        "installed), each in a process of its own",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="with --train: fresh processes per backend, taking the best round (default 3); "
        "with --optimizers: interleaved latency rounds (default 20)",
    )
    opt = p.add_argument_group("optimizers (cnnc bench --optimizers)")
    opt.add_argument(
        "--optimizers",
        nargs="*",
        metavar="MODEL.onnx",
        default=None,
        help="compare cnnc -O2 with onnxsim, onnxslim and onnxoptimizer on these ONNX models "
        "(default: ONNX's light models, the examples at -O0 and, with torch, its exports)",
    )
    opt.add_argument(
        "--tools",
        default="cnnc,onnxsim,onnxslim,onnxoptimizer",
        help="the optimizers to compare (default: all four)",
    )
    opt.add_argument(
        "--suite",
        default="light,examples,torch",
        help="the default models to take: light, examples, torch (default: all three)",
    )
    opt.add_argument(
        "--timeout", type=float, default=600, help="seconds per tool per model (default 600)"
    )
    opt.add_argument(
        "--out",
        metavar="DIR",
        help="keep every tool's output in DIR, and the report so far (report.json)",
    )
    opt.add_argument(
        "--cache", metavar="DIR", help="where generated models are kept (~/.cache/cnnc/...)"
    )
    p.add_argument(
        "--scale",
        action="store_true",
        help="time `cnnc compile` of generated networks of 1,000 to 100,000 layers (no MODEL)",
    )
    p.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    p.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="timed runs per backend (default 10); with --compile, compiles (default 1)",
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed runs first (default 2)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads for the interpreter and onnxruntime (default: the CPUs available)",
    )
    p.add_argument(
        "--reference", action="store_true", help="also time onnx.reference.ReferenceEvaluator"
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also time every node, in the interpreter and in onnxruntime's profiler",
    )
    p.add_argument("--json", action="store_true", help="print the figures as JSON")

    p = command("graph", "draw the network as a picture (SVG) or write it as DOT")
    _model_args(p)
    p.add_argument(
        "-o",
        "--output",
        metavar="OUT.svg|OUT.dot",
        help="the picture: .svg (the default: the model's name with .svg), .dot for DOT, "
        "- for SVG on standard output",
    )
    p.add_argument(
        "--fold",
        type=int,
        metavar="DEPTH",
        help="draw the blocks nested deeper than DEPTH folded (0 folds every block)",
    )

    p = command("train", "train a network on labelled data and write its weights")
    p.add_argument("model", metavar="MODEL.cnn", help="the program of the network to train")
    p.add_argument(
        "--network", metavar="NAME", help="which network of the program (default: the last one)"
    )
    _data_args(p)
    p.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="WEIGHTS.npz",
        help="the learned weights, written (atomically) after every epoch",
    )
    p.add_argument("--epochs", type=int, default=10, help="passes over the data (default 10)")
    p.add_argument("--batch", type=int, default=32, help="items per step (default 32)")
    p.add_argument(
        "--lr", type=float, default=None, help="learning rate (default 0.01 for sgd, else 0.001)"
    )
    _add_optimizer_arguments(p)
    p.add_argument(
        "--no-shuffle",
        action="store_true",
        help="take the training rows in order: step k uses rows k·B to (k+1)·B−1",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the initial weights, the row order and dropout masks (default 0)",
    )
    p.add_argument(
        "--weights",
        metavar="INIT.npz",
        help="start from these weights (default: seeded initial weights)",
    )
    p.add_argument(
        "--backend",
        choices=cnnc.api.BACKENDS,
        default="numpy",
        help="run the training step in the NumPy interpreter (default) or onnxruntime",
    )
    _limit_arg(p)

    p = command("eval", "accuracy, per-class accuracy and confusion matrix of a classifier")
    _model_args(p)
    _data_args(p)
    p.add_argument(
        "--split",
        choices=cnnc.api.SPLITS,
        default="val",
        help="the rows to evaluate: those `cnnc train` held out with the same --val-split "
        "(val, the default), the others (train), or all",
    )
    _add_backend_argument(p)
    p.add_argument(
        "--labels",
        metavar="FILE|imagenet|digits",
        help="class names for the per-class lines: a file of one name per line, or a built-in list",
    )

    p = command("summary", "print layers, shapes, parameters and multiply-accumulates")
    _model_args(p, default_level=0)
    p.add_argument(
        "--tensors",
        action="store_true",
        help="list every parameter tensor with its shape (the names a weights file holds)",
    )
    p.add_argument(
        "--input-size",
        type=_size,
        metavar="HxW",
        help="with --fully-conv: the size of the score map for this input size",
    )
    p.add_argument(
        "--depth",
        type=int,
        metavar="D",
        help="show D levels of the tree of blocks, the blocks of the last level folded "
        "into one line each (1: the top level only; default: every layer)",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=1,
        metavar="B",
        help="the batch size of the activation memory (default 1)",
    )
    p.add_argument(
        "--json", action="store_true", help="print the table's rows and the totals as JSON"
    )

    p = command("report", "write one self-contained HTML page about a network")
    _model_args(p)
    p.add_argument(
        "--input",
        metavar="IMG|X.npy",
        help="the input whose feature maps the page shows: an image or an array "
        "(default: seeded random)",
    )
    p.add_argument(
        "-o",
        "--output",
        metavar="REPORT.html",
        help="the page (default: the model's name with .html)",
    )
    p.add_argument(
        "--layers",
        type=_names,
        metavar="A,B,...",
        help="draw the feature maps of these values only (default: every one; "
        "cnnc dump lists the names)",
    )
    _image_args(p)
    return parser


def _image_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("images (PNG, JPEG, BMP; needs cnnc[viz])")
    g.add_argument(
        "--normalize",
        metavar="imagenet|none|MEAN,STD",
        help="how pixels scaled to [0,1] are normalized: (x - mean) / std per channel "
        "(default: what the program declares on its input, else none); MEAN and STD are "
        "a number or one per channel joined by /",
    )
    g.add_argument(
        "--invert",
        action="store_true",
        help="use 1 - x for each pixel scaled to [0,1] (dark strokes on white paper become "
        "the white-on-black of scikit-learn's digits)",
    )
    g.add_argument(
        "--labels",
        metavar="FILE|imagenet|digits",
        help="class names to print with the top classes: a file of one name per line, "
        "or a built-in list",
    )


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        required=True,
        metavar="FILE.npz|digits",
        help="labelled data: an .npz of x (N×C×H×W or N×C×L float32) and y (N integer "
        "labels), or digits (scikit-learn's 1,797 8×8 digits; needs cnnc[data])",
    )
    p.add_argument(
        "--val-split",
        type=float,
        default=0.2,
        metavar="F",
        help="the fraction of rows held out for validation, the same rows on every run "
        "(default 0.2)",
    )


def _pair(text: str) -> tuple[float, float]:
    try:
        b1, b2 = (float(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers B1,B2, got {text!r}") from None
    return b1, b2


def _add_backend_argument(p) -> None:
    p.add_argument(
        "--backend",
        choices=cnnc.api.BACKENDS,
        default="numpy",
        help="the NumPy interpreter (default) or onnxruntime",
    )


def _add_optimizer_arguments(p: argparse.ArgumentParser) -> None:
    """The optimizer's options (torch.optim's meaning), for `train` and `compile --train`."""
    g = p.add_argument_group("optimizer (torch.optim's meaning)")
    g.add_argument(
        "--optimizer", choices=("sgd", "adam", "adamw"), default="adam", help="(default adam)"
    )
    g.add_argument("--momentum", type=float, default=None, help="sgd's momentum (default 0)")
    g.add_argument("--dampening", type=float, default=None, help="sgd's dampening (default 0)")
    g.add_argument(
        "--nesterov", action="store_true", help="sgd with Nesterov momentum (needs --momentum)"
    )
    g.add_argument(
        "--weight-decay",
        type=float,
        default=0.0,
        help="L2 penalty (sgd, adam) or decoupled decay (adamw) (default 0)",
    )
    g.add_argument(
        "--betas",
        type=_pair,
        default=None,
        metavar="B1,B2",
        help="Adam's moment decays (default 0.9,0.999)",
    )
    g.add_argument("--eps", type=float, default=None, help="Adam's epsilon (default 1e-8)")


def _optimizer_from_args(args) -> Optimizer:
    """The Optimizer the options name; an option of another optimizer is a UsageError."""
    from cnnc.train.step import Optimizer

    sgd = args.optimizer == "sgd"
    wrong = [
        flag
        for flag, given, applies in (
            ("--momentum", args.momentum is not None, sgd),
            ("--dampening", args.dampening is not None, sgd),
            ("--nesterov", args.nesterov, sgd),
            ("--betas", args.betas is not None, not sgd),
            ("--eps", args.eps is not None, not sgd),
        )
        if given and not applies
    ]
    if wrong:
        raise UsageError(
            f"{', '.join(wrong)} {'does' if len(wrong) == 1 else 'do'} not apply to "
            f"--optimizer {args.optimizer}",
            hint="--momentum, --dampening and --nesterov are sgd's; --betas and --eps "
            "are adam's and adamw's",
        )
    return Optimizer(
        args.optimizer,
        momentum=args.momentum or 0.0,
        dampening=args.dampening or 0.0,
        nesterov=args.nesterov,
        weight_decay=args.weight_decay,
        betas=args.betas or (0.9, 0.999),
        eps=1e-8 if args.eps is None else args.eps,
    )


def _add_train_arguments(p: argparse.ArgumentParser, what: str) -> None:
    """--train, --loss and the optimizer's options (compile --train, dump --train)."""
    p.add_argument("--train", action="store_true", help=what)
    p.add_argument(
        "--loss",
        choices=("cross_entropy", "mse"),
        default=None,
        help="with --train: the loss (default cross_entropy for a classifier, else mse)",
    )
    _add_optimizer_arguments(p)


def _refuse_train_options(args) -> None:
    """Without --train, the options of a training step are a UsageError (not ignored)."""
    given = [
        flag
        for flag, value in (
            ("--loss", args.loss is not None),
            ("--momentum", args.momentum is not None),
            ("--dampening", args.dampening is not None),
            ("--nesterov", args.nesterov),
            ("--weight-decay", args.weight_decay != 0),
            ("--betas", args.betas is not None),
            ("--eps", args.eps is not None),
        )
        if value
    ]
    if given:
        raise UsageError(f"{', '.join(given)} applies to a training step", hint="add --train")


def _training_step(args):
    """The training step of the program ``args.model`` (compile --train, dump --train):
    built from the network as lowered, then remove-identity and dce unless -O0."""
    given = [
        flag
        for flag, value in (
            ("--weights", args.weights is not None),
            ("--passes", args.passes is not None),
            ("--fully-conv", args.fully_conv),
            ("--verify-each", args.verify_each),
            ("--report", args.report),
        )
        if value
    ]
    if given:
        raise UsageError(
            f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply with --train",
            hint="the training step takes the weights as inputs at run time and is built "
            "before any optimization pass; -O0 leaves out its clean-ups (remove-identity, dce)",
        )
    options = PassOptions(
        print_after=set(args.print_ir_after),
        print_after_all=args.print_ir_after_all,
        stop_after=getattr(args, "after", None),
        printer=lambda text: print(text, file=sys.stderr),
    )
    return cnnc.training_step(
        args.model,
        optimizer=_optimizer_from_args(args),
        loss=args.loss,
        network=args.network,
        clean_up=args.opt_level > 0,
        pass_options=options,
        limits=parse_option(args.limit),
    )


def _compile_train(args) -> None:
    from cnnc.backends.train_export import check_training_opset, describe_step

    if args.opset is not None:
        check_training_opset(args.opset)
    out = output.target(args.output or Path(args.model).with_suffix(".train.onnx"))
    step = _training_step(args)
    written = step.write_onnx(out.shown, opset=args.opset, inline_functions=args.inline_functions)
    size = ""
    if not out.through:
        total = sum(path.stat().st_size for path in written)
        size = f"{total / 1e6:,.1f} MB, " if total >= 100_000 else f"{total / 1e3:,.1f} kB, "
    values = sum(step.forward.params[n].type.numel() for n in step.params)
    report = sys.stderr if out.is_stdout else sys.stdout
    print(f"wrote {out.name} ({size}{values:,} trained values)", file=report)
    print(describe_step(step), file=report)


def _size(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size such as 448x448, got {text!r}") from None
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"expected positive sizes such as 448x448, got {text!r}")
    return dims


def _load(args, notice: bool = True) -> cnnc.Model:
    options = PassOptions(
        print_after=set(args.print_ir_after),
        print_after_all=args.print_ir_after_all,
        verify_each=args.verify_each,
        stop_after=getattr(args, "after", None),
        seed=args.seed,
        printer=lambda text: print(text, file=sys.stderr),
        report=PassReport() if getattr(args, "report", False) else None,
    )
    model = cnnc.load(
        args.model,
        weights=args.weights,
        seed=args.seed,
        network=args.network,
        opt_level=args.opt_level,
        passes=args.passes,
        fully_conv=args.fully_conv,
        pass_options=options,
        allow_nonfinite=args.allow_nonfinite,
        limits=parse_option(args.limit),
    )
    for warning in model.warnings:
        print(warning.render(), file=sys.stderr)
    if notice and model.random_weights:
        stats = f"; {model.calibration.note()}" if model.calibration is not None else ""
        print(
            f"note: no --weights given; {model.name} runs with random He-normal weights "
            f"(seed {args.seed}){stats}",
            file=sys.stderr,
        )
    return model


def cmd_compile(args) -> None:
    if args.train:
        _compile_train(args)
        return
    _refuse_train_options(args)
    if Path(args.model).suffix.lower() == ".onnx" and args.output is None:
        raise UsageError("compiling an ONNX model needs -o OUT.onnx (it would overwrite its input)")
    out = output.target(args.output or Path(args.model).with_suffix(".onnx"))
    model = _load(args)
    written = model.write_onnx(out.shown, opset=args.opset, inline_functions=args.inline_functions)
    size = ""
    if not out.through:  # the files this compile wrote (not a .data left by an earlier one)
        size = f"{sum(path.stat().st_size for path in written) / 1e6:,.1f} MB, "
    print(
        f"wrote {out.name} ({size}{model.param_count():,} parameters)",
        file=sys.stderr if out.is_stdout else sys.stdout,
    )
    if args.report:
        _print_report(args, model, out)


def _print_report(args, model: cnnc.Model, out: output.Target | None = None) -> None:
    """The pass report on stderr (the output may be standard output), and for compile the
    sizes of the ONNX model read, if it was one, and written."""
    lines = [model.pass_report.render()]
    if out is not None:
        source = args.model if Path(args.model).suffix.lower() == ".onnx" else None
        before = OnnxCounts.of_file(source) if source is not None else None
        if out.through:  # nothing to read back: the model as the exporter builds it
            from cnnc.backends import onnx_export

            opset = onnx_export.DEFAULT_OPSET if args.opset is None else args.opset
            proto, tensors = onnx_export.skeleton(model.graph, opset, args.inline_functions)
            after = OnnxCounts(len(proto.graph.node), len(tensors), sum(t.nbytes for t in tensors))
        else:
            after = OnnxCounts.of_file(out.path)
        lines.append(files_line(source or "", before, out.name, after))
    print("\n".join(lines), file=sys.stderr)


def _describe_output(
    y: np.ndarray,
    top: int,
    labels: list[str] | None = None,
    items: list[str] | None = None,
) -> list[str]:
    lines = [f"output shape {list(y.shape)}"]
    if y.ndim == 2:
        k = min(top, y.shape[1])
        shown = len(y) if items else 8  # every image given is named in the report
        for i, row in enumerate(y[:shown]):
            best = np.argsort(-row, kind="stable")[:k]
            named = f" ({Path(items[i]).name})" if items and i < len(items) else ""
            lines.append(
                f"  item {i}{named}: "
                + "  ".join(
                    f"class {c}{' ' + labels[c] if labels else ''}: {row[c]:.4g}" for c in best
                )
            )
        if len(y) > shown:
            lines.append(f"  ... {len(y) - shown} more items")
    else:
        with np.errstate(invalid="ignore", over="ignore"):  # NaN and inf print as such
            lines.append(f"  min {y.min():.4g}  max {y.max():.4g}  mean {y.mean():.4g}")
    return lines


def _read_inputs(model: cnnc.Model, specs: list[str], args=None) -> list[np.ndarray]:
    """The arrays of ``--input`` options, one per network input: ``FILE.npy`` fills the
    next input in order, ``NAME=FILE.npy`` the input called NAME, and ``FILE.npz`` the
    inputs named by its arrays (any one array, for a network of one input). Images (PNG,
    JPEG, BMP, or folders of them) make one batch for the next input, or for NAME with
    ``NAME=IMAGE`` (cnnc.viz.images); ``args.image_files`` then lists them. Each array
    is checked against its input here, so that a mistake names its file."""
    from cnnc.backends.interpreter import check_batch, check_input
    from cnnc.viz import images

    names = model.input_names
    given: dict[str, np.ndarray] = {}
    in_order: list = []
    files: dict[int, str] = {}
    pictures: dict[str, list[str]] = {}  # input name (or "" for the next) -> image paths
    for spec in specs:
        name, sep, path = spec.partition("=")
        named = bool(sep) and name in names
        if images.is_image(path if named else spec):
            key = name if named else ""
            if key not in pictures:
                pictures[key] = []
                if not named:
                    in_order.append(pictures[key])
            pictures[key].append(path if named else spec)
            continue
        data = cnnc.read_input(path if named else spec)
        for array in data.values() if isinstance(data, dict) else [data]:
            files[id(array)] = path if named else spec
        if isinstance(data, dict):
            if len(names) == 1 and len(data) == 1:
                data = {names[0]: next(iter(data.values()))}
            unknown = sorted(set(data) - set(names))
            if unknown:
                raise UsageError(
                    f"{spec} holds {', '.join(unknown)}, which name no input of {model.name}",
                    hint="name the arrays after the inputs: " + ", ".join(names),
                )
            given.update(data)
        elif named:
            given[name] = data
        else:
            in_order.append(data)
    for key, paths in pictures.items():
        if key:
            given[key] = paths  # type: ignore[assignment]
    for name in names:
        if name not in given and in_order:
            given[name] = in_order.pop(0)
    if in_order:
        raise UsageError(
            f"{len(specs)} --input arrays for the {len(names)} input(s) of {model.name}"
        )
    missing = [n for n in names if n not in given]
    if missing:
        raise UsageError(
            f"no --input for {', '.join(missing)}",
            hint=f"{model.name} takes " + ", ".join(names) + "; give --input NAME=FILE.npy each",
        )
    for value in model.graph.inputs:
        x = given[value.name]
        if isinstance(x, list):
            x = given[value.name] = _read_images(model, value, x, args)
            continue
        try:
            check_input(value, x, model.graph.flexible_spatial)
            check_batch([value], [x])
        except CnncError as e:
            raise e.at(files[id(x)]) from None
    return [given[n] for n in names]


def _read_images(model: cnnc.Model, value, paths: list[str], args) -> np.ndarray:
    """The batch of images for input ``value``, normalized as --normalize says or, without
    it, as the program declares (none if it does not); the files and the normalization
    are noted on ``args`` for the report."""
    from cnnc import preprocess
    from cnnc.viz import images

    if getattr(args, "normalize", None) is not None:
        normalization, source = preprocess.parse_option(args.normalize), "--normalize"
    elif value.name in model.graph.preprocess:
        normalization = model.graph.preprocess[value.name]
        onnx = Path(args.model).suffix.lower() == ".onnx" if args is not None else False
        source = "the ONNX model's" if onnx else "the program's"
    else:
        normalization, source = preprocess.NONE, "the default"
    files = images.image_files(paths)
    model.check_memory(len(files))  # before a folder of many images is decoded
    x = images.load_images(
        files, value.type, normalization, invert=bool(getattr(args, "invert", False))
    )
    if args is not None:
        if not getattr(args, "image_files", None):
            args.image_files = [str(f) for f in files]
        args.image_notes = [
            *getattr(args, "image_notes", []),
            f"%{value.name}: {len(files)} image{'s' if len(files) != 1 else ''}, resized and "
            f"cropped to {'x'.join(map(str, value.type.shape[2:]))}, normalize "
            f"{normalization.describe()} ({source})"
            + (", inverted" if getattr(args, "invert", False) else ""),
        ]
    return x


def _labels(model: cnnc.Model, spec: str | None) -> list[str] | None:
    """The class names of --labels, checked against the classes of the model's first output
    (N×classes)."""
    if spec is None:
        return None
    from cnnc.viz.labels import check_count, load_labels

    names = load_labels(spec)
    shape = model.graph.outputs[0].type.shape
    if len(shape) != 2 or not isinstance(shape[1], int):
        raise UsageError(
            f"--labels names classes, but the output of {model.name} is "
            f"{model.graph.outputs[0].type}, not N×classes"
        )
    check_count(names, shape[1], spec)
    return names


def _shapes(arrays: list[np.ndarray]) -> str:
    return ", ".join(str(list(a.shape)) for a in arrays)


def cmd_run(args) -> None:
    out = output.target(args.output) if args.output else None
    # With -o -, the array's bytes are standard output: the report goes to standard error.
    report = sys.stderr if out is not None and out.is_stdout else sys.stdout
    model = _load(args)
    if args.batch < 1:
        raise UsageError(f"--batch must be at least 1, got {args.batch}")
    labels = _labels(model, args.labels)
    if args.input:
        xs = _read_inputs(model, args.input, args)
    else:
        if args.normalize is not None or args.invert:
            raise UsageError("--normalize and --invert apply to images given with --input")
        xs = model.random_inputs(args.batch, args.seed)
    outputs = model.output_names
    suffix = Path(args.output or "").suffix.lower()
    if out is not None and not out.is_stdout and len(outputs) > 1 and suffix != ".npz":
        raise UsageError(
            f"{model.name} has {len(outputs)} outputs; -o needs an .npz file to hold them",
            args.output,
        )
    backends = cnnc.api.BACKENDS if args.compare else (args.backend,)
    results = {b: model.run_all_outputs(*xs, backend=b) for b in backends}
    ys = results[args.backend]
    print(f"{model.name} on input {_shapes(xs)} ({args.backend})", file=report)
    for note in getattr(args, "image_notes", []):
        print(f"  {note}", file=report)
    for name, y in zip(outputs, ys, strict=True):
        lines = _describe_output(
            y, args.top, labels if y.ndim == 2 else None, getattr(args, "image_files", None)
        )
        if len(outputs) > 1:
            lines[0] = f"output %{name}: shape {list(y.shape)}"
        print("\n".join(lines), file=report)
    if args.compare:
        _compare(model, xs, results["numpy"], results["onnxruntime"], report)
    if out is not None:
        with output.open_output(out) as f:
            if len(outputs) > 1:
                write_npz(f, dict(zip(outputs, ys, strict=True)))
            else:
                np.save(f, ys[0], allow_pickle=False)
        print(f"wrote {out.name}", file=report)


def _compare(
    model, xs: list[np.ndarray], ours: list[np.ndarray], theirs: list[np.ndarray], report=None
) -> None:
    """Print whether the backends agree (NaN and ±inf at the same places, finite values
    within the tolerance); where they do not, see _explain_disagreement."""
    out = report or sys.stdout
    pairs = list(zip(ours, theirs, strict=True))
    difference = max(max_difference(a, b) for a, b in pairs)
    nan, inf = nonfinite_counts(*ours)
    special = f"; {nan:,} NaN and {inf:,} ±inf" if nan or inf else ""
    if all(a.shape == b.shape and agree(a, b) for a, b in pairs):
        print(
            f"numpy interpreter and onnxruntime agree: max |difference| {difference:.3g} "
            f"({DESCRIPTION}){special and special + ' at the same places in both'}",
            file=out,
        )
        return
    print(
        f"numpy interpreter and onnxruntime differ: max |difference| where both are finite "
        f"{difference:.3g} ({DESCRIPTION}){special and special + ' in our outputs'}",
        file=out,
    )
    _explain_disagreement(model, xs, out)


def _explain_disagreement(model, xs: list[np.ndarray], out=None) -> None:
    """Name the first node whose values differ between the backends on ``xs``. A known
    difference of op semantics on NaN or inf (cnnc.compare.NONFINITE_DIFFERENCES) is
    printed and is not an error: exit status 0 says cnnc computed what it documents. Any
    other difference may be a bug: an error, exit status 1."""
    where = ""
    try:
        divergence = first_divergence(model.graph, xs)
    except Exception:  # the per-node run is a diagnosis: without it, the verdict stands
        divergence = None
    else:
        if divergence is None:
            where = " (though no node differs when onnxruntime keeps every node's value)"
    if divergence is not None and divergence.known:
        print(
            f"they first differ at {divergence.describe()}: a known difference of op "
            f"semantics, not a bug in cnnc\n  {divergence.known}",
            file=out or sys.stdout,
        )
        return
    if divergence is not None:
        where = f", first at {divergence.describe()}"
    raise CnncError(
        f"the two backends disagree{where}; this may be a bug in cnnc, please report it"
    )


def cmd_viz(args) -> None:
    from cnnc.viz import images, maps

    folder = Path(args.output)
    if folder.exists() and not folder.is_dir():
        raise UsageError("is not a folder; -o names the folder the pictures go to", str(folder))
    model = _load(args)
    labels = _labels(model, args.labels)
    # The pictures show the first item: the others need not run.
    xs = [x[:1] for x in _read_inputs(model, args.input, args)]
    picture = None
    if getattr(args, "image_files", None):
        value = model.graph.inputs[0]
        with images.open_image(args.image_files[0]) as image:
            array = images.image_array(image, value.type.shape[1:], Path(args.image_files[0]))
        picture = maps._display(array)
    pngs = maps.layer_pngs(model, xs, args.layers, labels, picture=picture)
    layers = [name for name in pngs if name not in (maps.KERNELS, maps.PREDICTION)]
    digits = len(str(len(layers)))
    names = {name: f"{i:0{max(2, digits)}d}_{name}.png" for i, name in enumerate(layers)}
    names[maps.KERNELS] = "kernels.png"
    names[maps.PREDICTION] = "prediction.png"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CnncError(f"cannot create the folder: {e.strerror or e}", str(folder)) from None
    written = [names[key] for key in pngs]
    with output.open_outputs(*(folder / name for name in written)) as files:
        for f, data in zip(files, pngs.values(), strict=True):
            f.write(data)
    for note in getattr(args, "image_notes", []):
        print(note)
    print(f"wrote {len(written)} pictures to {folder}: {', '.join(written)}")


def cmd_dump(args) -> None:
    if args.train:
        print(_training_step(args).dump(), end="")
        return
    _refuse_train_options(args)
    model = _load(args, notice=False)
    print(model.dump(), end="")
    if args.report:
        sys.stdout.flush()
        _print_report(args, model)


def cmd_summary(args) -> None:
    if args.json and (args.tensors or args.fully_conv):
        raise UsageError("--json prints the summary's rows only, without --tensors or --fully-conv")
    if args.depth is not None and args.depth < 1:
        raise UsageError(f"--depth must be at least 1, got {args.depth}")
    if args.batch < 1:
        raise UsageError(f"--batch must be at least 1, got {args.batch}")
    model = _load(args, notice=False)
    if args.json:
        from cnnc.ir.printer import summary_json

        print(summary_json(model.graph, batch=args.batch, depth=args.depth))
        return
    print(model.summary(args.depth, args.batch), end="")
    if args.tensors:
        print()
        print(model.tensors(), end="")
    if args.fully_conv:
        print(model.fully_conv_report(args.input_size))
    elif args.input_size:
        raise UsageError("--input-size applies with --fully-conv")


def cmd_graph(args) -> None:
    from cnnc.viz.graph import to_dot, to_svg

    given = args.output or str(Path(args.model).with_suffix(".svg"))
    suffix = "" if given == output.STDOUT else Path(given).suffix.lower()
    if suffix not in ("", ".svg", ".dot", ".gv"):
        raise UsageError(
            f"cnnc graph writes SVG (.svg) or DOT (.dot), not {suffix}",
            hint="name the output OUT.svg or OUT.dot (or - for SVG on standard output)",
        )
    if args.fold is not None and args.fold < 0:
        raise UsageError(f"--fold takes a depth of 0 or more, got {args.fold}")
    if args.fold is not None and suffix in (".dot", ".gv"):
        raise UsageError("--fold applies to SVG; DOT has no folding", hint="drop --fold")
    out = output.target(given)
    model = _load(args, notice=False)
    text = to_dot(model.graph) if suffix in (".dot", ".gv") else to_svg(model.graph, fold=args.fold)
    with output.open_output(out) as f:
        f.write(text.encode())
    if not out.is_stdout:
        print(f"wrote {out.name} ({len(model.graph.nodes)} layers, {len(text) / 1e3:,.1f} kB)")


def cmd_import(args) -> None:
    source = Path(args.model)
    if source.suffix.lower() != ".onnx":
        raise UsageError(f"cnnc import reads ONNX models (.onnx), got {source}")
    if args.output == output.STDOUT:
        raise UsageError(
            "cnnc import writes two files, a program and its weights; -o - cannot hold both",
            hint="name the program file: -o NET.cnn writes NET.cnn and NET.npz",
        )
    out = Path(args.output) if args.output else source.with_suffix(".cnn")
    npz = out.with_suffix(".npz")
    targets = output.target(out), output.target(npz)
    model = cnnc.load(source, opt_level=0, limits=parse_option(args.limit))
    text, weights = model.to_program(
        source=f"imported by cnnc {cnnc.__version__} from {source.name}"
    )
    # Both files go to temporary files first and are renamed only once both are written.
    with output.open_outputs(*targets) as (program_file, weights_file):
        program_file.write(text.encode())
        write_npz(weights_file, weights)
    print(
        f"wrote {out} ({len(model.graph.nodes)} layers) and {npz} "
        f"({len(weights)} tensors, {model.param_count():,} parameters)"
    )


def cmd_bench(args) -> None:
    import json

    from cnnc import bench as bench_mod
    from cnnc.bench import bench

    if args.optimizers is not None:
        _bench_optimizers(args)
        return
    if args.rounds is None:
        args.rounds = 3
    if args.repeat is None:
        args.repeat = 1 if args.compile else 5 if args.train else 10
    for flag in ("batch", "repeat"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.scale:
        if args.model is not None or args.compile:
            raise UsageError("--scale compiles its own generated networks; give no MODEL")
        rows = bench_mod.bench_scale()
        print(json.dumps(rows, indent=2) if args.json else bench_mod.render_scale(rows))
        return
    if args.model is None:
        raise UsageError("cnnc bench needs a MODEL (or --scale)")
    if args.train:
        from cnnc import bench_train

        if args.compile or str(args.model).lower().endswith(".onnx"):
            raise UsageError("--train times the training step of a program (.cnn)")
        model = _load(args, notice=False)  # a mistake in the program is reported here
        if args.rounds < 1:
            raise UsageError(f"--rounds must be at least 1, got {args.rounds}")
        # A batch no backend could hold is refused here, not by each child's traceback; a
        # training step keeps every activation for the backward pass.
        check_run_memory(model.graph, args.batch, limits=model.limits, keep_all=True)
        report = bench_train.bench_train(
            args.model, args.batch, args.repeat, min(args.warmup, 1), args.threads, args.rounds
        )
        print(json.dumps(report.to_dict(), indent=2) if args.json else report.render())
        return
    if args.compile:
        extra = ["--seed", str(args.seed)]
        extra += ["--passes", ",".join(args.passes)] if args.passes else [f"-O{args.opt_level}"]
        if args.network:
            extra += ["--network", args.network]
        if args.weights:
            extra += ["--weights", args.weights]
        if args.fully_conv:
            extra.append("--fully-conv")
        compiled = _load(args, notice=False)  # its weights stay undrawn: sizes are read
        report = bench_mod.bench_compile(args.model, extra, args.repeat, compiled=compiled)
        print(json.dumps(report.to_dict(), indent=2) if args.json else report.render())
        return
    if args.warmup < 0 or (args.threads is not None and args.threads < 1):
        raise UsageError("--warmup must be at least 0 and --threads at least 1")
    model = _load(args, notice=False)
    report = bench(
        model,
        batch=args.batch,
        repeat=args.repeat,
        threads=args.threads,
        reference=args.reference,
        warmup=args.warmup,
        seed=args.seed,
        profile=args.profile,
    )
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.render())
    if not report.agree:
        # After --json's document, on stderr, so that the document stays one.
        xs = model.random_inputs(args.batch, args.seed)
        _explain_disagreement(model, xs, sys.stderr if args.json else sys.stdout)


def _bench_optimizers(args) -> None:
    import json

    from cnnc import bench_optimize as b

    files = [*([args.model] if args.model else []), *args.optimizers]
    rounds = 20 if args.rounds is None else args.rounds
    threads = 2 if args.threads is None else args.threads
    if rounds < 1 or threads < 1 or args.timeout <= 0:
        raise UsageError("--rounds and --threads must be at least 1, --timeout above 0")
    for f in files:
        if not Path(f).is_file():
            raise UsageError(f"no such model file: {f}")
    tools, suites = b.parse_tools(args.tools), b.parse_suites(args.suite)
    cache = Path(args.cache) if args.cache else b.default_cache()

    def say(text: str) -> None:  # progress of a run of minutes, off the report's stream
        print(text, file=sys.stderr, flush=True)

    models, notes = b.collect(files, suites, cache, args.timeout, say)
    report = b.run(
        models, tools, rounds, threads, args.seed, args.timeout, args.out, say, notes
    ).to_dict()
    print(json.dumps(report, indent=2) if args.json else b.render(report))


class _Bar:
    """A one-line progress bar on a terminal (standard error), redrawn at most 10 times
    a second."""

    def __init__(self, stream):
        self.stream = stream
        self.shown = 0.0
        self.width = 0

    def __call__(self, p) -> None:
        import time

        now = time.monotonic()
        if p.step < p.steps and now - self.shown < 0.1:
            return
        self.shown = now
        done = int(20 * p.step / p.steps)
        text = (
            f"epoch {p.epoch}/{p.epochs} [{'#' * done}{'.' * (20 - done)}] {p.step}/{p.steps}"
            f"  loss {p.loss:.4f}  acc {100 * p.accuracy:.2f}%  {p.images_per_second:,.0f} img/s"
        )
        self.width = max(self.width, len(text))
        self.stream.write("\r" + text.ljust(self.width))
        self.stream.flush()

    def clear(self) -> None:
        if self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0


def cmd_train(args) -> None:
    from cnnc.train.trainer import Interrupted

    optimizer = _optimizer_from_args(args)
    bar = _Bar(sys.stderr) if sys.stderr.isatty() else None

    def say(line: str) -> None:
        if bar is not None:
            bar.clear()
        print(line, flush=True)

    try:
        result = cnnc.fit(
            args.model,
            args.data,
            args.output,
            network=args.network,
            epochs=args.epochs,
            batch=args.batch,
            optimizer=optimizer,
            lr=args.lr,
            shuffle=not args.no_shuffle,
            seed=args.seed,
            weights=args.weights,
            backend=args.backend,
            val_split=args.val_split,
            on_start=say,
            on_epoch=lambda e: say(e.line(args.epochs)),
            on_step=bar,
            limits=parse_option(args.limit),
        )
    except Interrupted as e:
        if bar is not None:
            bar.clear()
        print(f"cnnc: {e.message}", file=sys.stderr)
        raise
    finally:
        if bar is not None:
            bar.clear()
    print(
        f"wrote {args.output} ({len(result.weights)} tensors, after {len(result.history)} "
        f"epochs, {result.steps:,} steps)"
    )


def cmd_eval(args) -> None:
    model = _load(args, notice=False)
    if model.random_weights:
        raise UsageError("evaluation needs trained weights", hint="pass --weights W.npz")
    labels = _labels(model, args.labels)
    report = cnnc.evaluate(
        model, args.data, split=args.split, val_split=args.val_split, backend=args.backend
    )
    print(report.render(labels))


def cmd_report(args) -> None:
    import time

    from cnnc.viz import report

    start = time.perf_counter()
    out = output.target(args.output or Path(args.model).with_suffix(".html"))
    if out.path is not None and out.path == Path(args.model).resolve():
        raise UsageError("-o names the model file itself", args.output)
    model = _load(args, notice=False)
    x = None
    if args.input:
        if len(model.graph.inputs) != 1:
            raise UsageError(
                f"{model.name} has {len(model.graph.inputs)} inputs; the report draws the "
                "feature maps of a network of one input",
                args.model,
                hint="leave out --input",
            )
        (x,) = _read_inputs(model, [args.input], args)
    elif args.normalize is not None or args.invert:
        raise UsageError("--normalize and --invert apply to images given with --input")
    labels = _labels(model, args.labels)
    # The table, the charts and the graph show the network as written (as cnnc summary).
    table = cnnc.load(
        args.model,
        seed=args.seed,
        network=args.network,
        opt_level=0,
        fully_conv=args.fully_conv,
        allow_nonfinite=args.allow_nonfinite,
        limits=parse_option(args.limit),
    ).graph
    weights = args.weights or (
        f"random He-normal weights (seed {args.seed})" if model.random_weights else args.model
    )
    if args.input:
        shown = "; ".join([args.input, *getattr(args, "image_notes", [])])
    else:
        shown = f"a seeded standard-normal input (seed {args.seed})"
    about = report.ReportInput(args.model, weights, shown, model.graph.opt_level)
    page = report.report(model, table, about, x, labels, args.seed, args.layers).encode()
    with output.open_output(out) as f:
        f.write(page)
    size = f"{len(page) / 1e6:,.1f} MB" if len(page) >= 100_000 else f"{len(page) / 1e3:,.1f} kB"
    print(
        f"wrote {out.name} ({size}) in {time.perf_counter() - start:.1f} s",
        file=sys.stderr if out.is_stdout else sys.stdout,
    )


COMMANDS = {
    "compile": cmd_compile,
    "run": cmd_run,
    "viz": cmd_viz,
    "dump": cmd_dump,
    "summary": cmd_summary,
    "bench": cmd_bench,
    "import": cmd_import,
    "graph": cmd_graph,
    "train": cmd_train,
    "eval": cmd_eval,
    "report": cmd_report,
}


DOING = {
    "compile": "compiling",
    "run": "running",
    "viz": "drawing",
    "dump": "dumping",
    "summary": "summarising",
    "bench": "benchmarking",
    "import": "importing",
    "graph": "drawing",
    "train": "training",
    "eval": "evaluating",
    "report": "reporting on",
}


def last_resort(e: Exception, command: str, model: str) -> CnncError:
    """The one report of an exception that no check turned into a CnncError: the kinds
    a machine or a damaged file can cause get their own message, anything else is a
    bug in cnnc to report."""
    from google.protobuf.message import DecodeError
    from onnx.checker import ValidationError

    doing = f"{DOING[command]} {model}"
    if isinstance(e, MemoryError):
        return CnncError(
            f"out of memory while {doing}",
            hint="try a smaller batch or input, or a machine with more memory",
        )
    if isinstance(e, RecursionError):
        return CnncError(
            f"the model is nested too deeply: Python's recursion limit was reached while {doing}"
        )
    if isinstance(e, OSError):
        return CnncError(e.strerror or str(e), e.filename or model)
    if isinstance(e, (ValidationError, DecodeError)):
        first = str(e).strip().splitlines()[0] if str(e).strip() else "invalid model"
        return ModelFileError(f"not a valid ONNX model: {first}", model)
    return InternalError(
        f"internal error in cnnc: please report it ({type(e).__name__} while {doing}: {e})",
        hint="run the same command with --debug to see the traceback, and add it to the report",
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cnnc`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if isinstance(e, BrokenPipeError) or isinstance(e.__context__, BrokenPipeError):
            # The reader of standard output stopped reading (`cnnc dump ... | head`): end
            # quietly, with the status of a process that SIGPIPE ended, as coreutils' do.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 128 + 13
        if args.debug:
            raise
        error = e if isinstance(e, CnncError) else last_resort(e, args.command, args.model)
        print(error.render(), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
