"""What the native graph builders share: a dataflow IR read as a list of calls.

``backends/torch.py`` and ``backends/mindspore.py`` rebuild a whole model from a dataflow graph (one
lowered from ONNX, whose nodes name their values). Each node becomes a :class:`Call`:

- a layer node (``Linear``, ``Conv``, ``ConvTranspose``, ``Embedding``, ``MatMul``) is run from its IR
  attributes (documented in ``lowrank_ir/_ir.py``); its one data input is ``args[0]``;
- an opaque node is run as the ONNX operator ``attrs["source_op"]`` with the ONNX attributes it
  carries, its inputs in the operator's own order: a data value, a constant (a graph param), or
  ``None`` for a skipped optional input.

Params split into *trainable* ones (floating-point initializers and every layer weight and bias) and
*constants* (integer arrays such as shapes and indices, and the outputs of ``Constant`` nodes).
Nothing here imports a framework.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lowrank_ir import Graph, Node, Op

__all__ = ["Arg", "Call", "DEFAULT_DOMAINS", "calls", "check_supported", "onnx_shape", "trainable_params"]

#: The ONNX domains of the standard operators.
DEFAULT_DOMAINS = ("", "ai.onnx")

#: Node attributes the IR keeps for itself (not ONNX attributes).
_RESERVED = ("source_op", "onnx", "locked", "in_positions", "out_positions")


@dataclass(frozen=True, slots=True)
class Arg:
    """One input of a call: a run-time value (``kind="value"``) or a graph param (``kind="param"``)."""

    kind: str
    name: str


@dataclass(slots=True)
class Call:
    """One node as a builder runs it.

    ``op`` is the IR op for layers and the ONNX op type for opaque nodes; ``attrs`` are the IR
    attributes of a layer or the ONNX attributes of an opaque node; ``args`` the inputs in operator
    order (``None`` for a skipped optional input); ``outputs`` the values it defines (``""`` for an
    output nobody reads).
    """

    node: Node
    op: str
    attrs: dict[str, Any]
    args: list[Arg | None]
    outputs: list[str]

    @property
    def is_layer(self) -> bool:
        return self.node.is_layer

    def param(self, role: str) -> str | None:
        """The graph param a layer uses in ``role`` (``weight``/``bias``), or None."""
        return self.node.params.get(role)


def _opaque_args(node: Node) -> list[Arg | None]:
    record = node.attrs.get("onnx")
    if record is None:  # built by hand: data inputs first, then the constants in role order
        args: list[Arg | None] = [Arg("value", name) if name else None for name in node.inputs]
        roles = sorted((role for role in node.params if role.startswith("input:")), key=lambda r: int(r[6:]))
        return args + [Arg("param", node.params[role]) for role in roles]
    args = []
    for slot in record["inputs"]:
        if isinstance(slot, int):
            name = node.inputs[slot]
            args.append(Arg("value", name) if name else None)
        else:
            args.append(Arg("param", node.params[slot]))
    return args


def _domain(node: Node) -> str:
    record = node.attrs.get("onnx")
    return record.get("domain", "") if isinstance(record, dict) else ""


def calls(graph: Graph) -> list[Call]:
    """The nodes of a dataflow ``graph`` as calls, in execution order.

    Raises ``ValueError`` for a graph lowered from a module tree (its nodes do not name their values)
    or a node from a non-standard ONNX domain.
    """
    if graph.nodes and all(not node.inputs and not node.outputs for node in graph.nodes):
        raise ValueError(f"the graph (source {graph.meta.get('source')!r}) has no dataflow: its nodes do not "
                         f"name their inputs and outputs. Rebuilding a whole model needs a graph lowered "
                         f"from ONNX (export the model to ONNX first, e.g. backends.onnx.export)")
    result = []
    for node in graph.nodes:
        if node.op is Op.OPAQUE:
            domain = _domain(node)
            if domain not in DEFAULT_DOMAINS:
                raise ValueError(f"node {node.name!r} is {node.attrs['source_op']!r} from the ONNX domain "
                                 f"{domain!r}; only standard ONNX operators can be rebuilt")
            attrs = {key: value for key, value in node.attrs.items() if key not in _RESERVED}
            result.append(Call(node, str(node.attrs["source_op"]), attrs, _opaque_args(node), list(node.outputs)))
        else:
            args: list[Arg | None] = [Arg("value", name) for name in node.inputs]
            result.append(Call(node, node.op.value, dict(node.attrs), args, list(node.outputs)))
    return result


def check_supported(graph: Graph, supported: Collection[str], target: str) -> None:
    """Raise ``ValueError`` listing every ONNX op of ``graph`` outside ``supported``."""
    missing: dict[str, list[str]] = {}
    for node in graph.nodes:
        if node.op is Op.OPAQUE and node.attrs.get("source_op") not in supported:
            missing.setdefault(str(node.attrs.get("source_op")), []).append(node.name)
    if missing:
        listed = "; ".join(f"{op} (e.g. node {names[0]!r}, {len(names)} node(s))"
                           for op, names in sorted(missing.items()))
        raise ValueError(f"the graph uses ops {target} cannot rebuild: {listed}. Supported: "
                         f"{', '.join(sorted(supported))}")


def trainable_params(graph: Graph) -> set[str]:
    """Params that become trainable parameters: layer weights/biases and floating-point initializers."""
    record = graph.meta.get("onnx", {})
    initializers = set(record.get("initializers", graph.params))
    trainable: set[str] = set()
    for node in graph.nodes:
        if node.is_layer:
            trainable.update(name for role, name in node.params.items() if role in ("weight", "bias"))
    for name, array in graph.params.items():
        if name in initializers and np.asarray(array).dtype.kind == "f":
            trainable.add(name)
    return trainable


def onnx_shape(values: Sequence[int], data_shape: Sequence[int], allow_zero: bool = False) -> list[int]:
    """An ONNX ``Reshape`` target with its ``0`` (copy the input dim) resolved, ``-1`` kept."""
    if allow_zero:
        return [int(v) for v in values]
    return [int(data_shape[i]) if int(v) == 0 else int(v) for i, v in enumerate(values)]
