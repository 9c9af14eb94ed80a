"""The graph of one training step, built from a network by transforming its graph.

Inputs, in order: the trained parameters, the state (batch-norm running statistics, then
the optimizer's buffers), the batch, its labels (or regression targets), the learning rate,
and one mask per active dropout. Outputs: the new parameters, the new state (same order,
each named ``<input>.new``), the loss, and the network's outputs on the batch (for the
accuracy). The forward part runs in training mode: ``bn`` normalises by the batch's
statistics and updates the running ones as torch.nn.BatchNorm does; a dropout multiplies
by its mask (0, or 1/(1 − p), drawn by the caller from a seed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cnnc.errors import CnncError, InternalError, UsageError
from cnnc.ir.graph import Graph, Node, Value, is_statistic
from cnnc.ir.types import TensorType
from cnnc.train import rules  # noqa: F401 (registers the gradient rules)
from cnnc.train.autodiff import backward, constant

BN_MOMENTUM = 0.1  # torch.nn.BatchNorm's default


@dataclass(frozen=True)
class Optimizer:
    """An optimizer with torch.optim's meaning: ``sgd`` (momentum, dampening, nesterov,
    weight_decay), ``adam`` or ``adamw`` (betas, eps, weight_decay)."""

    kind: str = "sgd"
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self):
        if self.kind not in ("sgd", "adam", "adamw"):
            raise UsageError(f"unknown optimizer {self.kind!r}", hint="sgd, adam or adamw")
        if self.nesterov and (self.kind != "sgd" or self.momentum <= 0 or self.dampening):
            raise UsageError("Nesterov momentum needs sgd with a momentum and no dampening")
        if self.momentum < 0 or self.weight_decay < 0 or self.eps <= 0:
            raise UsageError("momentum and weight decay must be at least 0, eps above 0")
        if not all(0 <= b < 1 for b in self.betas):
            raise UsageError(f"Adam's betas must be in [0, 1), got {self.betas}")

    def state_names(self, param: str) -> list[str]:
        """The names of a parameter's optimizer state (torch.optim's)."""
        if self.kind == "sgd":
            return [f"{param}.momentum_buffer"] if self.momentum else []
        return [f"{param}.exp_avg", f"{param}.exp_avg_sq"]


@dataclass
class Mask:
    """A dropout's mask input: ``shape`` per batch item (1s after the channel axis for a
    drop_path), values 0 or 1 / (1 − p)."""

    name: str
    p: float
    per_item: tuple[int, ...]


@dataclass
class TrainingStep:
    """The graph of one training step and what its inputs and outputs hold."""

    graph: Graph
    forward: Graph
    loss: str  # "cross_entropy" or "mse"
    optimizer: Optimizer
    params: list[str]  # trained parameters, in input order
    statistics: list[str]  # batch-norm running statistics
    optimizer_state: list[str]  # optimizer buffers (and "optimizer.step" for Adam)
    data: list[str]  # the network's inputs
    target: str  # labels or targets
    lr: str
    masks: list[Mask] = field(default_factory=list)

    @property
    def state(self) -> list[str]:
        """Everything that goes in and comes back updated, in input order."""
        return [*self.params, *self.statistics, *self.optimizer_state]

    def initial_optimizer_state(self) -> dict[str, np.ndarray]:
        """Zeros for every buffer (torch.optim's first step gives the same result)."""
        by_name = {v.name: v for v in self.graph.inputs}
        return {
            name: np.zeros(by_name[name].shape, by_name[name].type.numpy_dtype)
            for name in self.optimizer_state
        }

    def initial_state(self, seed: int = 0) -> dict[str, np.ndarray]:
        """Every state input's starting value by name: the forward graph's parameters where
        they have data (loaded weights), else the seeded initial ones of
        :func:`cnnc.weights.initial_weights` (what ``cnnc train`` starts from); zero
        optimizer state."""
        from cnnc.weights import initial_weights

        fresh: dict[str, np.ndarray] | None = None
        state = {}
        for name in [*self.params, *self.statistics]:
            p = self.forward.params[name]
            if p.has_data:
                state[name] = np.asarray(p.data)
            else:
                fresh = fresh if fresh is not None else initial_weights(self.forward, seed)
                state[name] = fresh[name]
        state.update(self.initial_optimizer_state())
        return state

    def to_onnx(self, path=None, opset: int | None = None, inline_functions: bool = False):
        """The step as an ONNX model of standard ops (opset 16 or newer, 17 by default);
        with ``path``, also check it and write it there atomically."""
        from cnnc.backends.train_export import step_to_onnx, write_step

        if path is not None:
            write_step(self, path, opset, inline_functions)
        return step_to_onnx(self, opset, inline_functions)

    def write_onnx(self, path, opset: int | None = None, inline_functions: bool = False):
        """Check the step's ONNX model and write it to ``path`` atomically; returns the
        files written."""
        from cnnc.backends.train_export import write_step

        return write_step(self, path, opset, inline_functions)

    def dump(self) -> str:
        """The IR listing of the step's graph."""
        from cnnc.ir.printer import dump

        return dump(self.graph)

    def draw_masks(self, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """One dropout mask per active dropout for a batch of ``batch`` items."""
        out = {}
        for m in self.masks:
            keep = rng.random((batch, *m.per_item)) >= m.p
            # p = 1 (a drop_path may drop always) gives zeros, as torchvision's StochasticDepth
            scale = 1.0 / (1.0 - m.p) if m.p < 1 else 0.0
            out[m.name] = (keep * scale).astype(np.float32)
        return out


def training_mode_ops(forward: Graph) -> None:
    """Raise CnncError if ``forward`` holds an op that training cannot go through."""
    for node in forward.nodes:
        if node.attrs.get("activation"):
            raise InternalError(f"node {node.name}: train from the graph before fuse-conv-act")


def build_step(
    forward: Graph,
    *,
    loss: str | None = None,
    optimizer: Optimizer | None = None,
) -> TrainingStep:
    """The training step of ``forward`` (a lowered graph, before optimization passes)."""
    optimizer = optimizer or Optimizer()
    training_mode_ops(forward)
    if len(forward.outputs) != 1:
        raise CnncError(
            f"network {forward.name} has {len(forward.outputs)} outputs; training needs one",
            hint="train a network with one output (a classifier or a regression)",
        )
    trained = [p for p in forward.params.values() if not is_statistic(p)]
    statistics = [p for p in forward.params.values() if is_statistic(p)]
    if not trained:
        raise CnncError(
            f"network {forward.name} has no parameters to train",
            hint="add a layer with weights (conv, fc, bn, ...)",
        )
    out = forward.outputs[0]
    if loss is None:
        loss = "cross_entropy" if _classifier_logits(out) is not None else "mse"
    if loss not in ("cross_entropy", "mse"):
        raise UsageError(f"unknown loss {loss!r}", hint="cross_entropy or mse")

    step = Graph(f"{forward.name}_train")
    step.opt_level = "-O0"
    vmap: dict[int, Value] = {}
    for p in trained + statistics:
        vmap[id(p)] = step.add_input(p.name, p.type)
    opt_inputs: dict[str, list[Value]] = {}
    for p in trained:
        opt_inputs[p.name] = [step.add_input(n, p.type) for n in optimizer.state_names(p.name)]
    step_count = None
    if optimizer.kind != "sgd":
        step_count = step.add_input("optimizer.step", TensorType("f32", ()))
    for v in forward.inputs:
        vmap[id(v)] = step.add_input(v.name, v.type)
    if loss == "cross_entropy":
        target = step.add_input("labels", TensorType("i64", (out.shape[0],)))
    else:
        target = step.add_input("targets", out.type)
    lr = step.add_input("lr", TensorType("f32", ()))

    forward_nodes, running, masks = training_forward(forward, step, vmap)
    prediction = vmap[id(out)]

    # ---- loss ---------------------------------------------------------------------------
    unflatten: tuple[int, ...] | None = None
    if loss == "cross_entropy":
        scores = _classifier_logits(out)
        if scores is None:
            raise CnncError(
                f"the output %{out.name} {out.type} of network {forward.name} is not one "
                "score per class",
                hint="a classifier ends in fc(K) or in a K-channel 1×1 map (then softmax)",
            )
        logits = vmap[id(scores)]
        loc = logits.producer.loc if logits.producer else None
        flat = logits
        if logits.type.rank > 2:
            unflatten = tuple(logits.shape[1:])
            flat = step.add_node(
                "flatten", [logits], name=step.unique_name("loss.logits"), loc=loc
            ).output
        loss_value = step.add_node(
            "softmax_cross_entropy", [flat, target], name="loss", loc=loc
        ).output
        seed = step.add_node(
            "softmax_cross_entropy_grad",
            [flat, target],
            name="loss.grad",
            loc=loc,
            note="autodiff",
        ).output
    else:
        logits = prediction
        loc = prediction.producer.loc if prediction.producer else None
        loss_value = step.add_node("mse_loss", [prediction, target], name="loss", loc=loc).output
        seed = step.add_node(
            "mse_loss_grad", [prediction, target], name="loss.grad", loc=loc, note="autodiff"
        ).output
    if unflatten is not None:
        seed = step.add_node(
            "reshape",
            [seed],
            {"shape": unflatten},
            name="loss.grad.unflatten",
            loc=loc,
            note="autodiff",
        ).output

    # ---- backward -----------------------------------------------------------------------
    wrt = [vmap[id(p)] for p in trained]
    grads = backward(step, forward_nodes, {id(logits): seed}, wrt)

    # ---- optimizer ----------------------------------------------------------------------
    outputs: list[Value] = []
    new_state: list[Value] = []
    if step_count is not None:
        one = constant(step, "optimizer.one", np.array(1.0, np.float32))
        step_new = step.add_node(
            "add", [step_count, one], name="optimizer.step.new", note="optimizer"
        ).output
    for p in trained:
        value = vmap[id(p)]
        grad = grads.get(id(value))
        if grad is None:
            grad = constant(step, f"{p.name}.zero_grad", np.zeros(p.shape, p.type.numpy_dtype))
        buffers = opt_inputs[p.name]
        name = f"{p.name}.new"
        names = [name] + [f"{b.name}.new" for b in buffers]
        if optimizer.kind == "sgd":
            attrs = {
                "momentum": optimizer.momentum,
                "dampening": optimizer.dampening,
                "nesterov": optimizer.nesterov,
                "weight_decay": optimizer.weight_decay,
            }
            made = step.add_node(
                "sgd_update",
                [value, grad, lr, *buffers],
                attrs,
                name=name,
                loc=_param_loc(p),
                note="optimizer",
                output_names=names,
            )
        else:
            attrs = {
                "beta1": optimizer.betas[0],
                "beta2": optimizer.betas[1],
                "eps": optimizer.eps,
                "weight_decay": optimizer.weight_decay,
                "decoupled": optimizer.kind == "adamw",
            }
            made = step.add_node(
                "adam_update",
                [value, grad, *buffers, step_new, lr],
                attrs,
                name=name,
                loc=_param_loc(p),
                note="optimizer",
                output_names=names,
            )
        outputs.append(made.outputs[0])
        new_state.extend(made.outputs[1:])
    for s in statistics:
        new = running.get(s.name)
        if new is None:
            raise InternalError(f"statistic {s.name} is not a batch norm's running statistic")
        step.rename(new, f"{s.name}.new")
        outputs.append(new)
    outputs.extend(new_state)
    if step_count is not None:
        outputs.append(step_new)
    step.outputs = [*outputs, loss_value, prediction]
    optimizer_state = [b.name for p in trained for b in opt_inputs[p.name]]
    if step_count is not None:
        optimizer_state.append(step_count.name)
    return TrainingStep(
        graph=step,
        forward=forward,
        loss=loss,
        optimizer=optimizer,
        params=[p.name for p in trained],
        statistics=[s.name for s in statistics],
        optimizer_state=optimizer_state,
        data=[v.name for v in forward.inputs],
        target=target.name,
        lr=lr.name,
        masks=masks,
    )


def _drop_probability(node: Node) -> float:
    """A dropout's probability (attribute ratio) or a drop_path's (attribute p)."""
    return node.attrs["ratio"] if node.op == "dropout" else node.attrs["p"]


def training_forward(
    forward: Graph, step: Graph, vmap: dict[int, Value]
) -> tuple[list[Node], dict[str, Value], list[Mask]]:
    """Add ``forward``'s nodes to ``step`` in training mode, reading ``vmap[id(v)]`` for each
    of its inputs and parameters (filled in with each node output). Returns the nodes made,
    each running statistic's new value by name, and the dropout masks (new inputs)."""
    forward_nodes: list[Node] = []
    running: dict[str, Value] = {}
    masks: list[Mask] = []
    pooled_first = _relus_before_maxpools(forward)
    for node in forward.nodes:
        inputs = [vmap[id(v)] for v in node.inputs]
        if id(node) in pooled_first:
            # The maxpool reading it reads its input and this relu follows the maxpool.
            vmap[id(node.output)] = inputs[0]
            continue
        relu = node.inputs[0].producer if node.op == "maxpool" else None
        if relu is not None and id(relu) in pooled_first:
            # maxpool then relu, the relu's output keeping the maxpool's name for its users
            pooled = step.add_node(
                node.op, inputs, node.attrs, name=step.unique_name(f"{node.name}.max"), loc=node.loc
            )
            made = step.add_node(
                "relu",
                [pooled.output],
                name=relu.name,
                loc=relu.loc,
                output_names=[node.output.name],
            )
            forward_nodes += [pooled, made]
            vmap[id(node.output)] = made.output
            continue
        if node.op == "bn":
            made = step.add_node(
                "bn_train",
                inputs,
                {"epsilon": node.attrs["epsilon"], "momentum": BN_MOMENTUM},
                name=node.name,
                loc=node.loc,
                output_names=[node.output.name]
                + [f"{node.name}.{s}" for s in ("mean", "invstd", "rm", "rv")],
            )
            running[node.inputs[3].name] = made.outputs[3]
            running[node.inputs[4].name] = made.outputs[4]
        elif node.op in ("dropout", "drop_path") and _drop_probability(node) > 0:
            x = inputs[0]
            per_item = tuple(x.shape[1:]) if node.op == "dropout" else (1,) * (x.type.rank - 1)
            mask_name = step.unique_name(f"{node.name}.mask")
            mask = step.add_input(mask_name, x.type.with_shape((x.shape[0], *per_item)))
            masks.append(Mask(mask_name, _drop_probability(node), per_item))
            made = step.add_node(
                "mul", [x, mask], name=node.name, loc=node.loc, output_names=[node.output.name]
            )
        else:
            made = step.add_node(
                node.op,
                inputs,
                node.attrs,
                name=node.name,
                loc=node.loc,
                output_names=[o.name for o in node.outputs],
            )
        forward_nodes.append(made)
        for old, new in zip(node.outputs, made.outputs, strict=False):
            vmap[id(old)] = new
    return forward_nodes, running, masks


def _relus_before_maxpools(forward: Graph) -> set[int]:
    """The relu nodes (by id) whose one use is a maxpool, which the training step computes
    after it: relu(maxpool(x)) is maxpool(relu(x)), and its gradient too — where a
    window's largest x is positive, both send the gradient to the first largest x; where
    it is not, relu's derivative makes it 0 in both (PyTorch's ties included). The relu
    and its gradient then run on the pooled map, a quarter of the input's size for 2×2
    windows."""
    outputs = {id(v) for v in forward.outputs}
    return {
        id(node)
        for node in forward.nodes
        if node.op == "relu"
        and id(node.output) not in outputs
        and len(node.output.users) == 1
        and node.output.users[0].op == "maxpool"
    }


def inference_forward(forward: Graph, graph: Graph, vmap: dict[int, Value]) -> list[Node]:
    """Add ``forward``'s nodes to ``graph`` as they are, reading ``vmap`` as
    :func:`training_forward` does, but in inference mode: bn with its running statistics,
    dropout and drop_path the identity (PyTorch's eval() mode, in which a network may be
    fine-tuned with frozen statistics). Returns the nodes made."""
    nodes = []
    for node in forward.nodes:
        made = graph.add_node(
            node.op,
            [vmap[id(v)] for v in node.inputs],
            node.attrs,
            name=node.name,
            loc=node.loc,
            output_names=[o.name for o in node.outputs],
        )
        nodes.append(made)
        vmap.update({id(old): new for old, new in zip(node.outputs, made.outputs, strict=True)})
    return nodes


@dataclass
class GradientGraph:
    """A graph computing a loss and its gradients (see :func:`gradient_graph`)."""

    graph: Graph
    params: list[str]  # trained parameters (inputs)
    statistics: list[str]  # running statistics (inputs)
    data: list[str]  # the network's inputs
    target: str
    masks: list[Mask]
    gradients: dict[str, str]  # input name -> output name of its gradient


def gradient_graph(
    forward: Graph, *, dtype: str = "f32", data_gradients: bool = True, training: bool = True
) -> GradientGraph:
    """The graph of the mean squared error between ``forward``'s (single) output and a
    target, and of its gradient with respect to every parameter and, with
    ``data_gradients``, every float input, in training mode (or, without ``training``, in
    inference mode: see :func:`inference_forward`), all in ``dtype``: what the
    finite-difference checks of every gradient rule run. Inputs: parameters, statistics,
    the network's inputs, ``targets``, dropout masks. Outputs: ``loss``, then one gradient
    per parameter and per input, named ``<input>.grad``."""

    def typed(t: TensorType) -> TensorType:
        return TensorType(dtype, t.shape) if t.dtype in ("f32", "f64") else t

    graph = Graph(f"{forward.name}_grad")
    vmap: dict[int, Value] = {}
    trained = [p for p in forward.params.values() if not is_statistic(p)]
    statistics = [p for p in forward.params.values() if is_statistic(p)]
    for p in trained + statistics:
        vmap[id(p)] = graph.add_input(p.name, typed(p.type))
    for v in forward.inputs:
        vmap[id(v)] = graph.add_input(v.name, typed(v.type))
    out = forward.outputs[0]
    target = graph.add_input("targets", typed(out.type))
    if training:
        nodes, _, masks = training_forward(forward, graph, vmap)
    else:
        nodes, masks = inference_forward(forward, graph, vmap), []
    prediction = vmap[id(out)]
    loss = graph.add_node("mse_loss", [prediction, target], name="loss").output
    seed = graph.add_node("mse_loss_grad", [prediction, target], name="loss.grad").output
    wrt = [vmap[id(p)] for p in trained]
    if data_gradients:
        wrt += [vmap[id(v)] for v in forward.inputs if v.type.dtype in ("f32", "f64")]
    grads = backward(graph, nodes, {id(prediction): seed}, wrt)
    outputs, names = [loss], {}
    for v in wrt:
        g = grads.get(id(v))
        if g is None:
            g = constant(graph, f"{v.name}.zero_grad", np.zeros(v.shape, v.type.numpy_dtype))
        if g.kind == "node" and g not in outputs:
            graph.rename(g, graph.unique_name(f"{v.name}.grad"))
        outputs.append(g)
        names[v.name] = g.name
    graph.outputs = outputs
    return GradientGraph(
        graph,
        [p.name for p in trained],
        [p.name for p in statistics],
        [v.name for v in forward.inputs],
        target.name,
        masks,
        names,
    )


def _classifier_logits(out: Value) -> Value | None:
    """The class scores of a classifier's output: the input of a final softmax over the
    channels, or the output itself, if it is N×K (or N×K×1×1); None otherwise."""
    value = out
    if out.producer is not None and out.producer.op == "softmax":
        if out.producer.attrs["axis"] % out.type.rank != 1:
            return None
        value = out.producer.inputs[0]
    shape = value.shape
    if len(shape) >= 2 and all(d == 1 for d in shape[2:]):
        return value
    return None


def _param_loc(p: Value) -> Any:
    return p.users[0].loc if p.users else None
