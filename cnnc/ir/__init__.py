"""The typed graph IR that every pass and backend works on."""

from cnnc.ir.graph import Graph, Node, Value
from cnnc.ir.types import Dim, TensorType

__all__ = ["Dim", "Graph", "Node", "TensorType", "Value"]
