"""MindSpore graph builder: a whole model rebuilt from a dataflow IR graph, as a trainable ``nn.Cell``.

:func:`from_dataflow` turns a dataflow graph (lowered from ONNX by ``frontends.onnx.lower``, decomposed or
not) into a :class:`GraphCell`, whose ``construct`` runs it through the one ONNX interpreter
(``backends/_onnx_interpreter.py``) in PyNative mode. This module supplies MindSpore's primitives
(:data:`PRIMITIVES`) and the container.

Every graph param becomes a ``Parameter`` named exactly as the IR names it (``param_names`` maps
checkpoint names to IR names, also under a parent that prefixes them). Trainable ones
(``_dataflow.trainable_params``) have ``requires_grad=True``; the others (shapes, indices, a
``BatchNormalization``'s running statistics) ``requires_grad=False``, and checkpoints hold them all.
Strings and empty arrays (checkpoints drop them) stay numpy arrays. ``weights=False`` builds the
structure only: trainable parameters are zeros, the others come from the graph.

Inputs go by position or by name and must have the graph's dtypes. Where MindSpore's CPU kernels lack
a dtype (float64 convolutions) the primitive computes in float32 and casts back. MindSpore runs
kernels asynchronously: the interpreter waits for each node's output shapes, so an error is raised as
a ``NodeError`` naming the node that caused it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from backends import _onnx_interpreter as interpreter
from backends._dataflow import trainable_params
from lowrank_ir import Graph

__all__ = ["PRIMITIVES", "GraphCell", "MindSporePrimitives", "from_dataflow", "graph_params"]

#: numpy dtype name -> MindSpore dtype, for params, inputs and casts.
_DTYPES: dict[str, Any] = {
    "float32": ms.float32, "float16": ms.float16, "float64": ms.float64, "bfloat16": ms.bfloat16,
    "int8": ms.int8, "int16": ms.int16, "int32": ms.int32, "int64": ms.int64,
    "uint8": ms.uint8, "uint16": ms.uint16, "uint32": ms.uint32, "uint64": ms.uint64, "bool": ms.bool_,
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_FLOATS = (ms.float16, ms.float32, ms.float64, ms.bfloat16)


def _float32_kernel(function: Callable[..., ms.Tensor]) -> Callable[..., ms.Tensor]:
    """Run ``function`` in float32 when its tensor inputs are float64 (MindSpore's CPU kernels lack it)."""
    def run(self: Any, *args: Any) -> ms.Tensor:
        if not any(isinstance(a, ms.Tensor) and a.dtype == ms.float64 for a in args):
            return function(self, *args)
        narrowed = [ops.cast(a, ms.float32) if isinstance(a, ms.Tensor) and a.dtype == ms.float64 else a
                    for a in args]
        return ops.cast(function(self, *narrowed), ms.float64)
    run.__name__, run.__doc__ = function.__name__, function.__doc__
    return run


_SCATTER_ND = {"none": ops.tensor_scatter_update, "add": ops.tensor_scatter_add, "mul": ops.tensor_scatter_mul,
               "max": ops.tensor_scatter_max, "min": ops.tensor_scatter_min}

_REDUCE: dict[str, Callable[[ms.Tensor, tuple[int, ...], bool], ms.Tensor]] = {
    "sum": lambda x, axes, keep: ops.sum(x, axes, keepdim=keep),
    "mean": lambda x, axes, keep: ops.mean(x, axes, keep_dims=keep),
    "max": lambda x, axes, keep: ops.amax(x, axes, keepdims=keep),
    "min": lambda x, axes, keep: ops.amin(x, axes, keepdims=keep),
    "prod": lambda x, axes, keep: ops.prod(x, axes, keep_dims=keep),
    "logsumexp": lambda x, axes, keep: ops.logsumexp(x, axes, keep),
}


class MindSporePrimitives:
    """MindSpore's primitives for the ONNX interpreter (``_onnx_interpreter.Primitives``), PyNative mode."""

    any_float_input = False
    functions: dict[str, Callable[..., Any]] = {
        "add": ops.add, "sub": ops.sub, "mul": ops.mul, "div": ops.div,
        "trunc_div": lambda a, b: ops.div(a, b, rounding_mode="trunc"), "pow": ops.pow, "fmod": ops.fmod,
        "remainder": ops.remainder, "maximum": ops.maximum, "minimum": ops.minimum, "equal": ops.equal,
        "less": ops.less, "greater": ops.greater, "less_equal": ops.less_equal, "greater_equal": ops.greater_equal,
        "logical_and": ops.logical_and, "logical_or": ops.logical_or, "logical_xor": ops.logical_xor,
        "logical_not": ops.logical_not, "bitwise_and": ops.bitwise_and, "bitwise_or": ops.bitwise_or,
        "bitwise_xor": ops.bitwise_xor, "bitwise_not": ops.invert, "left_shift": ops.bitwise_left_shift,
        "right_shift": ops.bitwise_right_shift, "sqrt": ops.sqrt, "exp": ops.exp, "log": ops.log, "erf": ops.erf,
        "relu": ops.relu, "sigmoid": ops.sigmoid, "tanh": ops.tanh, "neg": ops.neg, "abs": ops.abs,
        "reciprocal": ops.reciprocal, "floor": ops.floor, "ceil": ops.ceil, "round": ops.round, "sign": ops.sign,
        "sin": ops.sin, "cos": ops.cos, "tan": ops.tan, "asin": ops.asin, "acos": ops.acos, "atan": ops.atan,
        "sinh": ops.sinh, "cosh": ops.cosh, "asinh": ops.asinh, "acosh": ops.acosh, "atanh": ops.atanh,
        "softplus": ops.softplus, "isnan": ops.isnan, "isinf": ops.isinf,
        "gelu": lambda x: ops.gelu(x, approximate="none"), "gelu_tanh": lambda x: ops.gelu(x, approximate="tanh"),
        "where": ops.where, "softmax": ops.softmax, "log_softmax": ops.log_softmax,
        "reshape": lambda x, shape: ops.reshape(x, tuple(int(d) for d in shape)),
        "transpose": lambda x, perm: ops.transpose(x, tuple(int(v) for v in perm)),
        "concat": lambda xs, axis: ops.concat(tuple(xs), axis),
        "split": lambda x, sizes, axis: tuple(ops.split(x, [int(s) for s in sizes], axis)),
        "strided_slice": lambda x, begin, end, step: ops.strided_slice(x, tuple(begin), tuple(end), tuple(step)),
        "take": lambda x, indices, axis: ops.gather(x, indices, axis), "gather_elements": ops.gather_elements,
        "gather_nd": ops.gather_nd, "broadcast_to": lambda x, shape: ops.broadcast_to(x, tuple(int(d) for d in shape)),
        "tile": lambda x, repeats: ops.tile(x, tuple(repeats)), "flip": lambda x, axes: ops.flip(x, tuple(axes)),
        "cumsum": ops.cumsum, "matmul": ops.matmul,
    }

    def as_input(self, value: Any) -> ms.Tensor:
        return value if isinstance(value, ms.Tensor) else ms.Tensor(np.asarray(value))

    def tensor(self, array: np.ndarray, like: Any = None) -> ms.Tensor:
        return ms.Tensor(np.array(array, copy=True))

    def array(self, x: ms.Tensor) -> np.ndarray:
        return (ops.cast(x, ms.float32) if x.dtype == ms.bfloat16 else x).asnumpy()

    def shape(self, x: ms.Tensor) -> tuple[int, ...]:
        return tuple(int(d) for d in x.shape)

    def dtype(self, x: ms.Tensor) -> str:
        return _NAMES.get(x.dtype, str(x.dtype))

    def cast(self, x: ms.Tensor, dtype: str) -> ms.Tensor:
        return ops.cast(x, _DTYPES[dtype])

    def scatter_elements(self, x: ms.Tensor, axis: int, indices: ms.Tensor, updates: ms.Tensor, reduction: str,
                         ) -> ms.Tensor:
        if reduction not in ("none", "add"):
            raise ValueError(f"ScatterElements reduction {reduction!r} is not supported (none, add are)")
        return ops.tensor_scatter_elements(x, indices, updates, axis, reduction)

    def scatter_nd(self, x: ms.Tensor, indices: ms.Tensor, updates: ms.Tensor, reduction: str) -> ms.Tensor:
        if reduction not in _SCATTER_ND:
            raise ValueError(f"ScatterND reduction {reduction!r} is not one of {sorted(_SCATTER_ND)}")
        return _SCATTER_ND[reduction](x, indices, updates)

    def pad(self, x: ms.Tensor, begins: Sequence[int], ends: Sequence[int], value: Any = 0) -> ms.Tensor:
        pairs = [(int(b), int(e)) for b, e in zip(begins, ends, strict=True)]
        while pairs and pairs[0] == (0, 0):  # ops.pad lists the axes from the last one: drop unpadded leading axes
            pairs.pop(0)
        if not pairs:
            return x
        return ops.pad(x, tuple(amount for pair in reversed(pairs) for amount in pair), mode="constant", value=value)

    def full(self, shape: Sequence[int], value: Any, dtype: str, like: Any = None) -> ms.Tensor:
        array = np.full(tuple(shape), value, dtype=np.float32 if dtype == "bfloat16" else dtype)
        return ops.cast(ms.Tensor(array), ms.bfloat16) if dtype == "bfloat16" else ms.Tensor(array)

    def reduce(self, kind: str, x: ms.Tensor, axes: Sequence[int], keep: bool) -> ms.Tensor:
        return _REDUCE[kind](x, tuple(axes), keep)

    def arg(self, kind: str, x: ms.Tensor, axis: int, keep: bool) -> ms.Tensor:
        return ops.cast((ops.argmax if kind == "argmax" else ops.argmin)(x, axis, keep), ms.int64)

    def topk(self, x: ms.Tensor, k: int, axis: int, largest: bool, ordered: bool) -> tuple[ms.Tensor, ms.Tensor]:
        values, indices = ops.topk(x, k, axis, largest, ordered)
        return values, ops.cast(indices, ms.int64)

    @_float32_kernel
    def conv(self, x: ms.Tensor, w: ms.Tensor, b: ms.Tensor | None, stride: Sequence[int], pads: Sequence[int],
             dilation: Sequence[int], groups: int) -> ms.Tensor:
        ndim = len(w.shape) - 2
        mode = "pad" if any(pads) else "valid"
        amount = tuple(int(p) for p in pads) if any(pads) else (0,) * ndim
        if ndim == 1:
            return ops.conv1d(x, w, b, int(stride[0]), mode, amount[0], int(dilation[0]), groups)
        convolve = ops.conv2d if ndim == 2 else ops.conv3d
        return convolve(x, w, b, tuple(stride), mode, amount, tuple(dilation), groups)

    @_float32_kernel
    def conv_transpose(self, x: ms.Tensor, w: ms.Tensor, stride: Sequence[int], dilation: Sequence[int],
                       groups: int) -> ms.Tensor:
        kernel, sizes = [int(k) for k in w.shape[2:]], [int(s) for s in x.shape[2:]]
        channels = int(w.shape[1]) * groups
        full = [s * (n - 1) + (k - 1) * d + 1 for s, n, k, d in zip(stride, sizes, kernel, dilation, strict=True)]
        if len(kernel) == 1:
            primitive = ops.Conv2DTranspose(channels, (1, kernel[0]), pad_mode="valid", stride=(1, stride[0]),
                                            dilation=(1, dilation[0]), group=groups)
            return ops.squeeze(primitive(ops.expand_dims(x, 2), ops.expand_dims(w, 2),
                                         (x.shape[0], channels, 1, full[0])), 2)
        if len(kernel) == 2:
            primitive = ops.Conv2DTranspose(channels, tuple(kernel), pad_mode="valid", stride=tuple(stride),
                                            dilation=tuple(dilation), group=groups)
            return primitive(x, w, (x.shape[0], channels, *full))
        primitive = ops.Conv3DTranspose(int(x.shape[1]), channels, tuple(kernel), pad_mode="valid",
                                        stride=tuple(stride), dilation=tuple(dilation), group=groups)
        return primitive(x, w)


#: The primitives every :class:`GraphCell` runs with.
PRIMITIVES = MindSporePrimitives()


# -------------------------------------------------------------------------------------- the cell

class GraphCell(nn.Cell):
    """A whole model rebuilt from a dataflow IR graph; ``construct(*inputs, **named)`` runs it (PyNative mode).

    ``param_names`` maps each parameter's checkpoint name to its IR param name; :func:`graph_params`
    reads the arrays back under the IR names.
    """

    def __init__(self, graph: Graph, weights: bool = True) -> None:
        super().__init__()
        self._program = interpreter.program(graph, "the MindSpore builder")
        self._constants = {name: PRIMITIVES.tensor(array) for name, array in self._program.constants.items()}
        trainable = trainable_params(graph)
        parameters, names, self._arrays = [], [], {}
        for name, array in graph.params.items():
            array = np.asarray(array)
            dtype = _DTYPES.get(array.dtype.name)
            if dtype is None or array.size == 0:  # strings, and empty arrays (checkpoints drop them)
                self._arrays[name] = array
                continue
            train = name in trainable and dtype in _FLOATS
            data = np.zeros(array.shape, array.dtype) if train and not weights else np.array(array, copy=True)
            parameters.append(ms.Parameter(ms.Tensor(data, dtype=dtype), name=name, requires_grad=train))
            names.append(name)
        self._ir_names: list[str] = names
        self.graph_parameters = ms.ParameterTuple(parameters)

    @property
    def param_names(self) -> dict[str, str]:
        """Checkpoint (MindSpore) parameter name -> IR param name."""
        return {param.name: name for param, name in zip(self.graph_parameters, self._ir_names, strict=True)}

    def construct(self, *inputs: Any, **named: Any) -> ms.Tensor | tuple[ms.Tensor, ...]:
        feeds = interpreter.bind_inputs(PRIMITIVES, self._program.input_specs, inputs, named)
        params: dict[str, Any] = dict(zip(self._ir_names, self.graph_parameters, strict=True))
        params.update({name: array if array.dtype.kind in "OSUV" else PRIMITIVES.tensor(array)
                       for name, array in self._arrays.items()})
        params.update(self._constants)
        outputs = self._program.run(PRIMITIVES, feeds, params)
        outputs = [value if isinstance(value, ms.Tensor) else ms.Tensor(np.asarray(value)) for value in outputs]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def from_dataflow(graph: Graph, *, weights: bool = True) -> GraphCell:
    """The MindSpore ``nn.Cell`` running dataflow ``graph``, with a parameter per graph param.

    ``weights=False`` builds the structure only (trainable parameters zero; constants and BN
    statistics from the graph). ``ValueError`` for a graph without dataflow (lowered from a module tree) or with ops the
    builder cannot run (all listed).
    """
    if not isinstance(graph, Graph):
        raise TypeError(f"from_dataflow takes a lowrank_ir.Graph, got {type(graph).__name__}")
    return GraphCell(graph, weights=weights)


def graph_params(cell: GraphCell) -> dict[str, np.ndarray]:
    """The cell's parameters as numpy arrays under their IR names (to put trained weights back in a graph)."""
    if not isinstance(cell, GraphCell):
        raise TypeError(f"graph_params takes a GraphCell (from from_dataflow), got {type(cell).__name__}")
    arrays = {name: param.asnumpy().copy() for name, param in zip(cell._ir_names, cell.graph_parameters, strict=True)}
    arrays.update({name: array.copy() for name, array in cell._arrays.items()})
    return arrays
