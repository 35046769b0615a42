"""What the native graph builders share: a dataflow IR read as a list of calls.

``backends/torch.py`` and ``backends/mindspore.py`` rebuild a whole model from a dataflow graph (one
lowered from ONNX, whose nodes name their values). Each node becomes a :class:`Call`:

- a layer node (``Linear``, ``Conv``, ``ConvTranspose``, ``Embedding``, ``MatMul``) is run from its IR
  attributes (documented in ``lowrank_ir/_ir.py``); its one data input is ``args[0]``;
- an opaque node is run as the ONNX operator ``attrs["source_op"]`` with the ONNX attributes it
  carries, its inputs in the operator's own order: a data value, a constant (a graph param), or
  ``None`` for a skipped optional input.

Params split into *trainable* ones (floating-point initializers and every layer weight and bias) and
the rest: *constants* (integer arrays such as shapes and indices, and the outputs of ``Constant``
nodes) and the running mean and variance of a ``BatchNormalization`` (inference statistics, not weights).

The native backends also share the framework-free halves of a few calls they mirror: the strict
weights check of ``load_weights`` (:func:`check_weights_fit`) and the flattening of a model's result
in ``run_numpy`` (:func:`native_outputs`). Nothing here imports a framework.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lowrank_ir import Graph, Node, Op
from lowrank_ir._ir import DEFAULT_DOMAINS, source_attrs
from lowrank_ir._protocols import NativeOutputs

__all__ = ["Arg", "Call", "DEFAULT_DOMAINS", "NativeOutputs", "batch_norm_statistics", "calls", "check_supported",
           "check_weights_fit", "native_outputs", "onnx_shape", "trainable_params", "weights_file"]


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
            attrs = source_attrs(node)
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


def batch_norm_statistics(graph: Graph) -> set[str]:
    """The params ``BatchNormalization`` nodes read as running mean and variance (inputs 3 and 4)."""
    statistics: set[str] = set()
    for node in graph.nodes:
        if node.op is Op.OPAQUE and node.attrs.get("source_op") == "BatchNormalization":
            statistics.update(arg.name for arg in _opaque_args(node)[3:5] if arg is not None and arg.kind == "param")
    return statistics


def trainable_params(graph: Graph) -> set[str]:
    """Params that become trainable parameters: layer weights/biases and floating-point initializers.

    The running mean and variance of a ``BatchNormalization`` (:func:`batch_norm_statistics`) are not
    trainable even when they are float initializers: PyTorch keeps them as buffers, MindSpore as
    ``requires_grad=False`` parameters.
    """
    record = graph.meta.get("onnx", {})
    initializers = set(record.get("initializers", graph.params))
    trainable: set[str] = set()
    for node in graph.nodes:
        if node.is_layer:
            trainable.update(name for role, name in node.params.items() if role in ("weight", "bias"))
    for name, array in graph.params.items():
        if name in initializers and np.asarray(array).dtype.kind == "f":
            trainable.add(name)
    return trainable - batch_norm_statistics(graph)


def onnx_shape(values: Sequence[int], data_shape: Sequence[int], allow_zero: bool = False) -> list[int]:
    """An ONNX ``Reshape`` target with its ``0`` (copy the input dim) resolved, ``-1`` kept."""
    if allow_zero:
        return [int(v) for v in values]
    return [int(data_shape[i]) if int(v) == 0 else int(v) for i, v in enumerate(values)]


# ------------------------------------------------------------------- native weights and native runs

def weights_file(path: str | os.PathLike[str]) -> Path:
    """``path`` as a ``Path`` if it is a file; ``FileNotFoundError`` otherwise."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"weights file {str(file)!r} does not exist")
    return file


def _shown(items: list[str], limit: int = 6) -> str:
    return ", ".join(items[:limit]) + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def check_weights_fit(model: object, file: str | os.PathLike[str], expected: Mapping[str, Sequence[int]],
                      given: Mapping[str, Sequence[int]]) -> None:
    """Raise ``ValueError`` unless the weights ``given`` (name -> shape) load strictly where ``expected`` is wanted.

    The message names ``file`` and the model's class, then every kind of problem with up to six
    names each: ``missing: a, b``, ``unexpected: c``, ``shape mismatches: d (file [1, 2], model [3, 2])``.
    """
    missing = [name for name in expected if name not in given]
    unexpected = [name for name in given if name not in expected]
    shapes = [f"{name} (file {list(given[name])}, model {list(shape)})" for name, shape in expected.items()
              if name in given and tuple(given[name]) != tuple(shape)]
    problems = [f"{label}: {_shown(items)}" for label, items in
                (("missing", missing), ("unexpected", unexpected), ("shape mismatches", shapes)) if items]
    if problems:
        raise ValueError(f"weights {os.fspath(file)!r} do not fit this {type(model).__name__} (saved from another "
                         f"model?): {'; '.join(problems)}")


def _flatten(value: Any) -> list[Any]:
    """The tensors of a model's result, in order (tuples, lists, dicts and ``ModelOutput``s flattened)."""
    if isinstance(value, Mapping):
        return [item for part in value.values() if part is not None for item in _flatten(part)]
    if isinstance(value, (list, tuple)):
        return [item for part in value for item in _flatten(part)]
    return [value]


def _result_names(result: Any) -> list[str] | None:
    if not isinstance(result, Mapping):
        return None
    entries = [(str(key), value) for key, value in result.items() if value is not None]
    if not entries or any(isinstance(value, (Mapping, list, tuple)) for _, value in entries):
        return None
    return [key for key, _ in entries]


def native_outputs(result: Any, as_numpy: Callable[[Any], np.ndarray]) -> NativeOutputs:
    """A native model's ``result`` flattened, each tensor turned into numpy by ``as_numpy``, and its names."""
    return NativeOutputs([as_numpy(item) for item in _flatten(result)], _result_names(result))
