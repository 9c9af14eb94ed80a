"""The names of imported layers: PyTorch's module paths where the ONNX file carries them.

PyTorch's exporters name nodes after where they run, not after what they are:

- the TorchScript exporter (``dynamo=False``) names a node by its module scope,
  ``/layer1/layer1.0/conv1/Conv``, each module given by its name unqualified up to its last
  non-numeric part (``layer1.0``, ``conv1``, ``downsample.0``); a module called again is
  ``relu_1``; it folds BatchNorm into the Conv before it and names the folded weights
  ``onnx::Conv_193``;
- the dynamo exporter names nodes ``node_Conv_12`` and keeps the module path in the
  metadata ``pkg.torch.onnx.name_scopes`` (``['', 'layer1', 'layer1.0', 'layer1.0.relu',
  'relu_2']``), and its initializers have their state_dict names (``layer1.0.conv1.weight``,
  a folded bias ``layer1.0.conv1.weight_bias``).

An imported node is named, in this order of preference:

1. after its weight: a node with parameters whose ONNX node reads ``<path>.weight`` is
   ``<path>`` (the state_dict name of its module);
2. after its module scope ``<path>``: ``<path>`` itself if the module is a leaf (no other
   node lies inside it), no weight named a node ``<path>``, and either the node is the one
   node with parameters in it, or every node in it is the same op (a ReLU module called
   twice gives ``layer1.0.relu`` and ``layer1.0.relu.2``, TorchScript's ``relu_1`` being
   ``relu`` called again where ``relu`` exists); else ``<path>.<op>``
   (``layer1.0.add``, ``layer1.0.conv1.pad``, ``flatten`` at the top);
3. as ONNX names it, where the node carries no weight name and no scope (models of
   other producers, cnnc's own).

Repeats get ``.2``, ``.3``, ... The parameters of a node named by 1 or 2 are named
``<node>.<name>`` after the layer's parameter names (``layer1.0.conv1.weight``,
``layer1.0.conv1.bias``), as a program written by ``cnnc import`` names them, unless
another node reads them too. Node outputs take their node's name; graph inputs and
outputs keep theirs.
"""

from __future__ import annotations

import ast
import re

import onnx

from cnnc.ir.graph import Graph, Node

_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
# A module path: names and indices joined by dots (a bare Sequential's start with an
# index); a name may have a hyphen (RegNet's block1-0), never a colon or a slash
# (onnx::Conv_193 is no module's).
_PATH = re.compile(r"[\w-]+(\.[\w-]+)*")
_WEIGHT = re.compile(r"(?P<path>[\w-]+(\.[\w-]+)*)\.weight")
_CALL_AGAIN = re.compile(r"(?P<base>.+)_(?P<n>\d+)")


def weight_path(node: onnx.NodeProto, constants) -> str | None:
    """``<path>`` if the first constant input of ``node`` is named ``<path>.weight``."""
    name = next((n for n in node.input if n in constants), None)
    match = _WEIGHT.fullmatch(name) if name else None
    return match["path"] if match else None


def _torchscript_scope(name: str) -> list[str] | None:
    """The module path of a TorchScript exporter's node name, as parts, or None."""
    if not name.startswith("/") or name.count("/") < 1:
        return None
    parts: list[str] = []
    for part in name.split("/")[1:-1]:
        # A module in a Sequential or ModuleList is given as <list>.<index>, its list's name
        # having come just before: layer1 then layer1.0 is the one module layer1.0.
        if parts and part.startswith(parts[-1] + "."):
            parts[-1] = part
        else:
            parts.append(part)
    if not all(_PATH.fullmatch(p) for p in parts):
        return None
    return parts


def _dynamo_scope(node: onnx.NodeProto) -> list[str] | None:
    """The module path of a dynamo exporter's node, from its name_scopes metadata, or None."""
    for prop in node.metadata_props:
        if prop.key == _SCOPES_KEY:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            # ['', module, submodule, ..., the fx node's own name]; each module given whole.
            modules = [s for s in scopes[1:-1] if isinstance(s, str)]
            if not modules or not _PATH.fullmatch(modules[-1]):
                return [] if not modules else None
            return [modules[-1]]
    return None


def module_scope(node: onnx.NodeProto) -> list[str] | None:
    """The module path a PyTorch exporter gives a node, as parts ([] at the top), or None
    if the node carries none."""
    scope = _dynamo_scope(node)
    if scope is None and node.name:
        scope = _torchscript_scope(node.name)
    return scope


def _prefixes(path: str) -> list[str]:
    atoms = path.split(".")
    return [".".join(atoms[:k]) for k in range(1, len(atoms))]


def name_layers(graph: Graph, origins: dict[str, onnx.NodeProto], constants) -> None:
    """Rename the IR nodes made from PyTorch-exported ONNX nodes (``origins``: IR node name
    -> the ONNX node it came from) after their modules, and their parameters after them."""
    from cnnc.backends.program import PARAM_NAMES

    by_weight: dict[Node, str] = {}
    scoped: dict[Node, list[str]] = {}
    for node in graph.nodes:
        origin = origins.get(node.name)
        if origin is None:
            continue
        path = weight_path(origin, constants) if node.params else None
        if path is not None:
            by_weight[node] = path
        elif (scope := module_scope(origin)) is not None:
            scoped[node] = scope
    if not by_weight and not scoped:
        return
    groups: dict[str, list[Node]] = {}
    for node, scope in _calls_again(scoped).items():
        groups.setdefault(".".join(scope), []).append(node)
    inner = {p for path in [*groups, *by_weight.values()] for p in _prefixes(path)}
    names = dict(by_weight)
    for path, nodes in groups.items():
        leaf = path and path not in inner and path not in by_weight.values()
        layers = [n for n in nodes if n.params]
        if leaf and len(layers) == 1:
            # The one node with parameters in a leaf module is that module's layer.
            names[layers[0]] = path
            leaf = False
        for node in nodes:
            if node not in names:
                alone = leaf and len({n.op for n in nodes}) == 1
                names[node] = path if alone else f"{path}.{node.op}" if path else node.op
    graph.rename_nodes({node: name for node, name in names.items() if name != node.name})
    for node in names:
        # A layer named after its weight keeps that weight's path for its parameters even
        # where its node took another name (the path named another node already).
        base = by_weight.get(node, node.name)
        for suffix, param in zip(PARAM_NAMES.get(node.op, ()), node.params, strict=False):
            wish = f"{base}.{suffix}"
            # A parameter other nodes read too keeps its name, as does one whose name is taken.
            free = param.name != wish and graph.unique_name(wish) == wish
            if suffix and param.users == [node] and free:
                graph.rename(param, wish)


def _calls_again(scoped: dict[Node, list[str]]) -> dict[Node, list[str]]:
    """TorchScript names the second call of a module ``relu_1``: the module is ``relu``
    where a module of that name exists beside it."""
    known = {tuple(s) for s in scoped.values()}
    result = {}
    for node, scope in scoped.items():
        if scope and (m := _CALL_AGAIN.fullmatch(scope[-1])):
            again = [*scope[:-1], m["base"]]
            if tuple(again) in known:
                scope = again
        result[node] = scope
    return result
