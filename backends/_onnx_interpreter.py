"""One interpreter for a dataflow IR graph, whatever framework runs it: every ONNX op's meaning, once.

A graph lowered from ONNX (``frontends.onnx.lower``), decomposed or not, runs node by node in its order
(``backends/_dataflow.py`` reads each node as a ``Step``). ``backends/_torch_graph.py`` and
``backends/_mindspore_graph.py`` supply only a :class:`Primitives` and a container (``nn.Module`` /
``nn.Cell``), as tensorly's backends and torch.fx's ``Interpreter`` do. A layer node runs from its IR
attributes (``lowrank_ir/_ir.py``), an opaque node as its ONNX operator: :data:`OPS` maps each op type
to ``function(step, p, *inputs)`` (``step.attrs`` the ONNX attributes, ``p`` the primitives, inputs in
operator order, ``None`` for a skipped optional one).

Forms are resolved once, when the :func:`program` is built: an attribute that later opsets made an input
(``axes`` of Squeeze/Unsqueeze/Reduce*, ``split``, Slice's bounds, Clip's bounds, Pad's pads and value,
TopK's ``k``, Upsample's and Resize-10's ``scales``) becomes that input; Resize-10 and Upsample become
the Resize they mean; TENSOR attributes are decoded to numpy, text to ``str``; ``Constant`` nodes are
evaluated. Values whose contents decide a shape (Reshape targets, Slice bounds, indices) are read
eagerly. ``BatchNormalization`` uses its running statistics and ``Dropout`` is the identity, in
training too. An error inside a node is a :class:`NodeError` ``while running node 'X' (Op): ...``
chained to the cause; inputs that do not fit ``graph.inputs`` are an :class:`InputError`.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from backends import _dataflow
from backends._dataflow import Step
from lowrank_ir import Graph, Op, Value, conv_pads, verify
from lowrank_ir._ir import onnx_padding, padding_halves

__all__ = ["COMMON_FUNCTIONS", "DEFAULT_OPSET", "LAYERS", "ONNX_DTYPES", "OPS", "InputError", "NodeError",
           "Primitives", "Program", "Step", "bind_inputs", "onnx_op", "program"]

logger = logging.getLogger(__name__)

#: The opset assumed for a graph that records none (built by hand).
DEFAULT_OPSET = 18

#: ONNX ``TensorProto.DataType`` -> dtype name (numpy's spelling; ``bfloat16`` too).
ONNX_DTYPES: dict[int, str] = {
    1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 9: "bool",
    10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 16: "bfloat16",
}


class NodeError(RuntimeError):
    """A node failed while the graph ran; the message names the node and its op, the cause is chained."""


class InputError(TypeError, ValueError):
    """The inputs given to a rebuilt model do not fit the graph's (count, names, rank, dims or dtype)."""


#: Functions PyTorch (``torch``) and MindSpore (``mindspore.ops``) both name so, with the same meaning
#: (``softmax``, ``log_softmax`` and ``cumsum`` take ``(x, axis)``): a framework may look them up by name.
COMMON_FUNCTIONS = (
    "add", "sub", "mul", "div", "pow", "fmod", "remainder", "maximum", "minimum", "less", "greater", "less_equal",
    "greater_equal", "logical_and", "logical_or", "logical_xor", "logical_not", "bitwise_and", "bitwise_or",
    "bitwise_xor", "sqrt", "exp", "log", "erf", "relu", "sigmoid", "tanh", "neg", "abs", "reciprocal", "floor",
    "ceil", "round", "sign", "sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "asinh", "acosh", "atanh",
    "isnan", "isinf", "where", "softmax", "log_softmax", "cumsum", "matmul",
)


class Primitives(Protocol):
    """What a framework supplies to run the ONNX ops (tensors ``T`` are the framework's own).

    ``functions`` maps names to functions of tensors: :data:`COMMON_FUNCTIONS`, the elementwise ``equal``,
    ``trunc_div``, ``bitwise_not``, ``left_shift``, ``right_shift``, ``softplus``,
    ``gelu`` and ``gelu_tanh``, and the tensor functions ``reshape(x, shape)``, ``transpose(x, perm)``,
    ``concat(xs, axis)``, ``split(x, sizes, axis)``, ``strided_slice(x, begins, ends, steps)`` (steps > 0),
    ``take(x, indices, axis)`` (1-D int64 indices), ``gather_elements(x, axis, indices)``,
    ``gather_nd(x, indices)`` (indices ``[..., depth]``), ``broadcast_to(x, shape)``, ``tile(x, repeats)``,
    ``flip(x, axes)``. ``scatter_rows(x, rows, updates, reduction)``: ``x`` a table ``[n, ...]``, ``rows``
    1-D int64, ``updates [len(rows), ...]``; each update replaces its row (``none``) or combines with it
    (``add``, ``mul``, ``max``, ``min``; repeated rows accumulate).
    """

    @property
    def functions(self) -> Mapping[str, Callable[..., Any]]: ...

    @property
    def any_float_input(self) -> bool: ...  # any float dtype is accepted for a float input (widened models)

    def as_input(self, value: Any) -> Any: ...  # a model input as a tensor, None if it cannot be one
    def tensor(self, array: np.ndarray, like: Any = None) -> Any: ...  # on ``like``'s device
    def array(self, x: Any) -> np.ndarray: ...
    def shape(self, x: Any) -> tuple[int, ...]: ...  # waits for an asynchronous framework's shape
    def dtype(self, x: Any) -> str: ...  # numpy's name: float32, int64, bool, bfloat16 ...
    def cast(self, x: Any, dtype: str) -> Any: ...
    def scatter_rows(self, x: Any, rows: Any, updates: Any, reduction: str) -> Any: ...  # none add mul max min
    def pad(self, x: Any, begins: Sequence[int], ends: Sequence[int], value: Any = 0) -> Any: ...  # < 0 crops
    def full(self, shape: Sequence[int], value: Any, dtype: str, like: Any = None) -> Any: ...
    def reduce(self, kind: str, x: Any, axes: Sequence[int], keep: bool) -> Any: ...  # sum mean max min prod logsumexp
    def arg(self, kind: str, x: Any, axis: int, keep: bool) -> Any: ...  # argmax, argmin (int64)
    def topk(self, x: Any, k: int, axis: int, largest: bool, ordered: bool) -> tuple[Any, Any]: ...
    def conv(self, x: Any, w: Any, b: Any, stride: Sequence[int], pads: Sequence[int], dilation: Sequence[int],
             groups: int) -> Any: ...  # 1-3-D, the same pads at both ends
    def conv_transpose(self, x: Any, w: Any, stride: Sequence[int], dilation: Sequence[int], groups: int) -> Any: ...


# ------------------------------------------------------------------------------------------ program

@dataclass(slots=True)
class Program:
    """A graph ready to run: its steps, the evaluated ``Constant`` outputs, inputs and outputs."""

    steps: list[Step]
    constants: dict[str, np.ndarray]
    input_specs: list[Value]
    output_names: list[str]
    opset: int

    def run(self, p: Primitives, feeds: dict[str, Any], params: Mapping[str, Any]) -> list[Any]:
        """The graph's outputs for ``feeds`` (input name -> tensor), ``params`` IR/Constant name -> tensor."""
        env = dict(feeds)
        for step in self.steps:
            try:
                args = [None if arg is None else arg[1] if arg[0] == "const" else
                        env[arg[1]] if arg[1] in env else params[arg[1]] for arg in step.args]
                if step.layer:
                    result = LAYERS[step.op](step, p, args[0], params[step.params["weight"]],
                                             params[step.params["bias"]] if "bias" in step.params else None)
                else:
                    result = OPS[step.op](step, p, *args)
                results = list(result) if isinstance(result, (tuple, list)) else [result]
                wanted = [index for index, name in enumerate(step.outputs) if name]
                if wanted and wanted[-1] >= len(results):
                    raise ValueError(f"the node has {len(step.outputs)} outputs, only {len(results)} are computed")
                for index in wanted:
                    p.shape(results[index])  # an asynchronous framework raises this node's errors here
            except Exception as err:
                raise NodeError(f"while running node {step.name!r} ({step.op}): "
                                f"{str(err).strip() or type(err).__name__}") from err
            for index in wanted:
                env[step.outputs[index]] = results[index]
            for name in step.free:
                env.pop(name, None)
        return [env[name] if name in env else params[name] for name in self.output_names]


def _opset(graph: Graph) -> int:
    record = graph.meta.get("onnx") or {}
    for domain, version in record.get("opset_import", []):
        if domain in _dataflow.DEFAULT_DOMAINS:
            return int(version)
    return DEFAULT_OPSET


def _text(value: Any) -> str:
    """A text attribute as ``str`` (the frontend keeps text that is not UTF-8 as bytes)."""
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _decode_tensor(data: Any) -> np.ndarray:
    """A TENSOR attribute (kept by the IR as the serialized ``TensorProto``) as a numpy array."""
    if isinstance(data, np.ndarray):
        return data
    from onnx import TensorProto, numpy_helper

    return np.asarray(numpy_helper.to_array(TensorProto.FromString(data)))


def _decoded(step: Step, target: str) -> dict[str, Any]:
    """The step's attributes with TENSOR attributes as numpy and text as ``str``."""
    attrs = dict(step.attrs)
    for key, kind in step.types.items():
        if key not in attrs:
            continue
        if kind == "TENSOR":
            attrs[key] = _decode_tensor(attrs[key])
        elif kind == "STRING":
            attrs[key] = _text(attrs[key])
        elif kind in ("SPARSE_TENSOR", "GRAPH", "GRAPHS", "TENSORS", "SPARSE_TENSORS"):
            raise ValueError(f"node {step.name!r} ({step.op}): attribute {key!r} of type {kind} is not "
                             f"supported by {target}")
    return attrs


#: op -> (input position, attribute) pairs: attributes older opsets used for what is now an input.
_INPUT_FORMS: dict[str, tuple[tuple[int, str], ...]] = {
    "Squeeze": ((1, "axes"),), "Unsqueeze": ((1, "axes"),), "Split": ((1, "split"),),
    "Slice": ((1, "starts"), (2, "ends"), (3, "axes")), "Clip": ((1, "min"), (2, "max")),
    "Pad": ((1, "pads"), (2, "value")), "TopK": ((1, "k"),), "Resize": ((2, "scales"),),
    "Upsample": ((2, "scales"),),  # and every ReduceX: ((1, "axes"),), where the reductions are registered
}


def _resolve_forms(step: Step) -> None:
    """Rewrite ``step`` to the newest form of its op (see the module docstring): done once, at build."""
    attrs = step.attrs
    if step.op == "Upsample":  # opsets 7-9: Resize-10 with scales as attribute or input
        step.opset = min(step.opset, 10)
        mode = attrs.get("mode", "nearest")
        attrs["mode"] = "linear" if mode in ("linear", "bilinear") else mode
    if step.op in ("Resize", "Upsample") and step.opset < 11:  # (X, scales), asymmetric, Upsample's rounding
        step.args = [step.args[0], None, *step.args[1:2]]
        attrs.update(coordinate_transformation_mode="asymmetric", nearest_mode="simple")
    if step.op in ("Softmax", "LogSoftmax", "Hardmax") and step.opset < 13:
        attrs["coerce_2d"] = True
        attrs.setdefault("axis", 1)
    for position, key in _INPUT_FORMS.get(step.op, ()):
        if key in attrs:
            while len(step.args) <= position:
                step.args.append(None)
            step.args[position] = ("const", np.asarray(attrs.pop(key)))


def _plan_frees(steps: list[Step], keep: set[str]) -> None:
    """Mark each value to be dropped after the last step that reads it (graph outputs are kept)."""
    last: dict[str, int] = {}
    for index, step in enumerate(steps):
        for arg in step.args:
            if arg is not None and arg[0] == "value":
                last[arg[1]] = index
    for name, index in last.items():
        if name not in keep:
            steps[index].free.append(name)


def program(graph: Graph, target: str) -> Program:
    """The program running dataflow ``graph``; ``target`` names the backend in errors.

    ``TypeError`` for what is not a ``Graph``; ``ValueError`` for a graph without dataflow, with ops or layer
    attributes this interpreter cannot run (all listed), or inconsistent (``lowrank_ir.verify``).
    """
    if not isinstance(graph, Graph):
        raise TypeError(f"from_dataflow takes a lowrank_ir.Graph, got {type(graph).__name__}")
    read = _dataflow.steps(graph)  # ValueError for a graph without dataflow
    _dataflow.check_supported(graph, OPS, target)
    verify(graph)
    opset = _opset(graph)
    steps, constants = [], {}
    for step in read:
        step.opset, step.attrs = opset, _decoded(step, target)
        if step.layer:
            _check_layer(step)
        elif step.op == "Constant":
            try:
                value = _constant_array(step.attrs)
            except Exception as err:
                raise ValueError(f"while building node {step.name!r} (Constant): {err}") from err
            if step.outputs and step.outputs[0]:
                constants[step.outputs[0]] = value
            continue
        else:
            _resolve_forms(step)
        steps.append(step)
    outputs = [value.name for value in graph.outputs]
    _plan_frees(steps, set(outputs))
    logger.debug("%s: %d steps, %d constants (opset %d)", target, len(steps), len(constants), opset)
    return Program(steps, constants, [Value(value.name, value.dtype, value.shape) for value in graph.inputs],
                   outputs, opset)


# -------------------------------------------------------------------------------------------- inputs

def bind_inputs(p: Primitives, specs: Sequence[Value], inputs: Sequence[Any], named: Mapping[str, Any],
                ) -> dict[str, Any]:
    """The graph inputs given by position (``specs`` order) and by name, checked: name -> tensor."""
    names = [spec.name for spec in specs]
    if len(inputs) > len(names):
        raise InputError(f"the graph takes {len(names)} inputs {names}, {len(inputs)} were given")
    bound = dict(zip(names, inputs, strict=False))
    for key, value in named.items():
        if key not in names:
            raise InputError(f"unknown input {key!r}; the graph takes {names}")
        if key in bound:
            raise InputError(f"input {key!r} given twice (by position and by name)")
        bound[key] = value
    missing = [name for name in names if name not in bound]
    if missing:
        raise InputError(f"missing inputs {missing}; the graph takes {names}")
    feeds = {}
    for spec in specs:
        value = p.as_input(bound[spec.name])
        if value is None:
            raise InputError(f"input {spec.name!r} must be a tensor or numpy array, got "
                             f"{type(bound[spec.name]).__name__}")
        problem = spec.mismatch(p.dtype(value), p.shape(value), any_float=p.any_float_input)
        if problem:
            raise InputError(problem)
        feeds[spec.name] = value
    return feeds


# ------------------------------------------------------------------------------------------ helpers

OpFunction = Callable[..., Any]

#: ONNX op type -> ``function(step, p, *inputs)``.
OPS: dict[str, OpFunction] = {}


def onnx_op(*names: str) -> Callable[[OpFunction], OpFunction]:
    """Register ``function`` as the meaning of the ONNX ops ``names``."""

    def register(function: OpFunction) -> OpFunction:
        for name in names:
            OPS[name] = function
        return function

    return register


def _array(p: Primitives, value: Any) -> np.ndarray:
    return value if isinstance(value, np.ndarray) else p.array(value)


def _ints(p: Primitives, value: Any) -> list[int]:
    return [int(v) for v in _array(p, value).reshape(-1)]


def _scalar(p: Primitives, value: Any) -> Any:
    return _array(p, value).reshape(-1)[0].item()


def _tensor(p: Primitives, value: Any, like: Any = None) -> Any:
    """``value`` as a tensor (a numpy array or number converted)."""
    if isinstance(value, (np.ndarray, np.generic, int, float, bool)):
        return p.tensor(np.asarray(value), like)
    return value


def _axis(axis: Any, rank: int) -> int:
    axis = int(axis)
    if not -rank <= axis < max(rank, 1):
        raise ValueError(f"axis {axis} is out of range for a tensor of rank {rank}")
    return axis % rank if rank else 0


def _is_float(p: Primitives, x: Any) -> bool:
    return p.dtype(x).startswith(("float", "bfloat"))


def _fn(p: Primitives, name: str, *args: Any) -> Any:
    return p.functions[name](*args)


def _positions(p: Primitives, indices: Any, size: int) -> np.ndarray:
    """Indices checked against an axis of ``size``, negative ones counted from the end, as int64 (eager)."""
    array = np.asarray(_array(p, indices), dtype=np.int64)
    if array.size and (int(array.min()) < -size or int(array.max()) >= size):
        raise ValueError(f"indices range over [{int(array.min())}, {int(array.max())}], out of [{-size}, {size - 1}] "
                         f"for an axis of {size}")
    return np.where(array < 0, array + size, array)


def _positive(p: Primitives, indices: Any, size: int, like: Any) -> Any:
    """:func:`_positions` as a tensor on ``like``'s device."""
    return p.tensor(_positions(p, indices, size), like)


def _pad(p: Primitives, x: Any, begins: Sequence[int], ends: Sequence[int], mode: str = "constant",
         value: Any = 0) -> Any:
    """ONNX ``Pad`` of every axis (constant, reflect, edge, wrap; negative amounts crop)."""
    if mode == "constant":
        return p.pad(x, begins, ends, value) if any(begins) or any(ends) else x
    if mode not in ("reflect", "edge", "wrap"):
        raise ValueError(f"Pad mode {mode!r} is not one of constant, reflect, edge, wrap")
    x = p.pad(x, [min(b, 0) for b in begins], [min(e, 0) for e in ends])
    for axis, (begin, end) in enumerate(zip(begins, ends, strict=True)):
        begin, end = max(begin, 0), max(end, 0)
        if not begin and not end:
            continue
        length = p.shape(x)[axis]
        if mode == "reflect" and (begin >= length or end >= length):
            raise ValueError(f"reflect padding of {max(begin, end)} needs an axis longer than {length}")
        positions = np.arange(-begin, length + end)
        if mode == "edge":
            index = np.clip(positions, 0, length - 1)
        elif mode == "wrap":
            index = np.mod(positions, length)
        elif length == 1:
            index = np.zeros_like(positions)
        else:
            period = 2 * (length - 1)
            folded = np.mod(positions, period)
            index = np.where(folded < length, folded, period - folded)
        x = _fn(p, "take", x, p.tensor(index.astype(np.int64), x), axis)
    return x


# -------------------------------------------------------------------------------------------- layers

def _scaled(p: Primitives, attrs: dict[str, Any], y: Any, bias: Any) -> Any:
    """``alpha · y + beta · bias`` (Gemm's scales, as the IR keeps them), then the layer's activation."""
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    if alpha != 1.0:
        y = y * alpha
    if bias is not None:
        y = y + (bias * beta if beta != 1.0 else bias)
    activation = attrs.get("activation")
    return _ACTIVATIONS[str(activation).lower()](p, y) if activation else y


def _hard_sigmoid(p: Primitives, x: Any, alpha: float, beta: float) -> Any:
    return _fn(p, "maximum", _fn(p, "minimum", x * alpha + beta, p.full((), 1, p.dtype(x), x)), _zero(p, x))


#: A layer's ``activation`` attribute -> ``function(p, y)``.
_ACTIVATIONS: dict[str, Callable[[Primitives, Any], Any]] = {
    "relu": lambda p, x: _fn(p, "relu", x), "gelu": lambda p, x: _fn(p, "gelu", x),
    "sigmoid": lambda p, x: _fn(p, "sigmoid", x), "tanh": lambda p, x: _fn(p, "tanh", x),
    "relu6": lambda p, x: _hard_sigmoid(p, x, 1 / 6, 0.0) * 6, "elu": lambda p, x: _elu(p, x, 1.0),
    "hswish": lambda p, x: x * _hard_sigmoid(p, x, 1 / 6, 0.5),
    "hsigmoid": lambda p, x: _hard_sigmoid(p, x, 1 / 6, 0.5),
    "leakyrelu": lambda p, x: _fn(p, "where", x >= 0, x, x * 0.01), "silu": lambda p, x: x * _fn(p, "sigmoid", x),
    "softmax": lambda p, x: _fn(p, "softmax", x, -1),
}


def _check_layer(step: Step) -> None:
    """Layer attributes the interpreter cannot honour are an error at build time, naming the node."""
    attrs = step.attrs
    where = f"node {step.name!r} ({step.op})"
    activation = attrs.get("activation")
    if activation and str(activation).lower() not in _ACTIVATIONS:
        raise ValueError(f"{where}: activation {activation!r} is not supported (supported: {sorted(_ACTIVATIONS)})")
    if step.op in (Op.CONV.value, Op.CONV_TRANSPOSE.value):
        if len(attrs["kernel_size"]) not in (1, 2, 3):
            raise ValueError(f"{where}: a {len(attrs['kernel_size'])}-D convolution; 1-D, 2-D and 3-D are supported")
        if not str(attrs.get("data_format", "NCHW")).startswith("NC"):
            raise ValueError(f"{where}: data_format {attrs['data_format']!r} is not channels-first")
        modes = tuple(_PAD_MODES) if step.op == Op.CONV.value else ("zeros",)
        if attrs.get("padding_mode", "zeros") not in modes:
            raise ValueError(f"{where}: padding_mode {attrs['padding_mode']!r} is not one of {modes}")
    if step.op == Op.MATMUL.value and attrs.get("weight_side", "right") not in ("right", "left"):
        raise ValueError(f"{where}: weight_side {attrs['weight_side']!r} is not 'right' or 'left'")


def _linear(step: Step, p: Primitives, x: Any, weight: Any, bias: Any) -> Any:
    return _scaled(p, step.attrs, _fn(p, "matmul", x, _fn(p, "transpose", weight, (1, 0))), bias)


def _matmul_layer(step: Step, p: Primitives, x: Any, weight: Any, bias: Any) -> Any:
    if step.attrs.get("weight_side", "right") == "left":  # the features are the second-to-last axis
        bias = None if bias is None else _fn(p, "reshape", bias, (-1, 1))
        return _scaled(p, step.attrs, _fn(p, "matmul", weight, x), bias)
    return _scaled(p, step.attrs, _fn(p, "matmul", x, weight), bias)


def _embedding(step: Step, p: Primitives, ids: Any, weight: Any, bias: Any) -> Any:
    rows = p.shape(weight)[0]
    flat = _fn(p, "take", weight, _fn(p, "reshape", _positive(p, ids, rows, weight), (-1,)), 0)
    return _fn(p, "reshape", flat, (*p.shape(ids), *p.shape(weight)[1:]))


#: IR layer op -> ``function(step, p, x, weight, bias)``.
LAYERS: dict[str, Callable[..., Any]] = {
    Op.LINEAR.value: _linear, Op.MATMUL.value: _matmul_layer, Op.EMBEDDING.value: _embedding,
    Op.CONV.value: lambda step, p, x, weight, bias: _convolve(
        p, x, weight, bias, step.attrs["stride"], step.attrs["padding"], step.attrs["dilation"],
        int(step.attrs["groups"]), step.attrs.get("padding_mode", "zeros")),
    Op.CONV_TRANSPOSE.value: lambda step, p, x, weight, bias: _convolve_transpose(
        p, x, weight, bias, step.attrs["stride"], step.attrs["padding"], step.attrs["dilation"],
        int(step.attrs["groups"]), step.attrs.get("output_padding") or ()),
}


# -------------------------------------------------------------------------------------- convolutions

#: A ``Conv`` layer's ``padding_mode`` -> the ``Pad`` mode that means it.
_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}


def _convolve(p: Primitives, x: Any, weight: Any, bias: Any, stride: Sequence[int], padding: Any,
              dilation: Sequence[int], groups: int, padding_mode: str = "zeros") -> Any:
    """N-d (1-3) convolution; ``weight [out, in // groups, *kernel]``, ``padding`` in any IR form."""
    kernel = list(p.shape(weight)[2:])
    ndim = len(kernel)
    if len(p.shape(x)) != ndim + 2 or ndim not in (1, 2, 3):
        raise ValueError(f"a {ndim}-D convolution needs a rank-{ndim + 2} input (1-D, 2-D and 3-D), "
                         f"got shape {list(p.shape(x))}")
    stride, dilation = [int(s) for s in stride], [int(d) for d in dilation]
    begins, ends = conv_pads(padding, p.shape(x)[2:], kernel, stride, dilation)
    if begins != ends or padding_mode != "zeros":  # the mode is checked when the program is built
        x = _pad(p, x, [0, 0, *begins], [0, 0, *ends], _PAD_MODES[padding_mode])
        begins = [0] * ndim
    return p.conv(x, weight, bias, stride, begins, dilation, int(groups))


def _transposed_pads(padding: Any, sizes: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
                     dilations: Sequence[int], output_padding: Sequence[int], output_shape: Sequence[int] | None,
                     upper: bool) -> tuple[list[int], list[int]]:
    """(begins, ends) cropped from a transposed convolution's full output (ONNX ``ConvTranspose`` rules).

    ``"same"``/``"same_lower"`` (output = input · stride) and ``output_shape`` derive the pads from
    ``total = stride (in - 1) + output_padding + (k - 1) dilation + 1 - out``, the odd extra at the end
    when ``upper``.
    """
    if output_shape is None and padding not in ("same", "same_lower"):
        return conv_pads(padding, sizes, kernel, strides, dilations)
    if output_shape is None:
        output_shape = [size * s for size, s in zip(sizes, strides, strict=True)]
        upper = padding == "same"
    begins, ends = [], []
    for i in range(len(kernel)):
        full = strides[i] * (sizes[i] - 1) + output_padding[i] + (kernel[i] - 1) * dilations[i] + 1
        total = full - int(output_shape[i])
        begin, end = padding_halves(total, odd_at_end=upper)
        begins.append(begin)
        ends.append(end)
    return begins, ends


def _convolve_transpose(p: Primitives, x: Any, weight: Any, bias: Any, strides: Sequence[int], padding: Any,
                        dilations: Sequence[int], groups: int, output_padding: Sequence[int],
                        output_shape: Sequence[int] | None = None, upper: bool = False) -> Any:
    """N-d transposed convolution, ``weight [in, out // groups, *kernel]``.

    The full output is computed, the pads cropped and ``output_padding`` added at the end (those
    positions receive only the bias).
    """
    kernel = list(p.shape(weight)[2:])
    ndim = len(kernel)
    if len(p.shape(x)) != ndim + 2 or ndim not in (1, 2, 3):
        raise ValueError(f"a {ndim}-D transposed convolution needs a rank-{ndim + 2} input (1-D, 2-D and 3-D), "
                         f"got shape {list(p.shape(x))}")
    strides, dilations = [int(s) for s in strides], [int(d) for d in dilations]
    output_padding = [int(v) for v in output_padding] or [0] * ndim
    begins, ends = _transposed_pads(padding, p.shape(x)[2:], kernel, strides, dilations, output_padding,
                                    output_shape, upper)
    y = p.conv_transpose(x, weight, strides, dilations, int(groups))
    tails = [extra - end for extra, end in zip(output_padding, ends, strict=True)]
    y = _pad(p, y, [0, 0, *(-b for b in begins)], [0, 0, *tails])
    return y if bias is None else y + _fn(p, "reshape", bias, (1, -1, *([1] * ndim)))


@onnx_op("Conv")
def _conv(step: Step, p: Primitives, x: Any, w: Any, b: Any = None) -> Any:
    attrs, ndim = step.attrs, len(p.shape(w)) - 2
    return _convolve(p, x, w, b, attrs.get("strides", (1,) * ndim), onnx_padding(attrs, ndim),
                     attrs.get("dilations", (1,) * ndim), int(attrs.get("group", 1)))


@onnx_op("ConvTranspose")
def _conv_transpose(step: Step, p: Primitives, x: Any, w: Any, b: Any = None) -> Any:
    attrs, ndim = step.attrs, len(p.shape(w)) - 2
    output_shape = attrs.get("output_shape")
    return _convolve_transpose(p, x, w, b, attrs.get("strides", (1,) * ndim), onnx_padding(attrs, ndim),
                               attrs.get("dilations", (1,) * ndim), int(attrs.get("group", 1)),
                               attrs.get("output_padding", (0,) * ndim),
                               [int(v) for v in output_shape][-ndim:] if output_shape else None,
                               attrs.get("auto_pad") == "SAME_UPPER")


@onnx_op("Gemm")
def _gemm(step: Step, p: Primitives, a: Any, b: Any, c: Any = None) -> Any:
    if step.attrs.get("transA", 0):
        a = _fn(p, "transpose", a, (1, 0))
    if step.attrs.get("transB", 0):
        b = _fn(p, "transpose", b, (1, 0))
    return _scaled(p, step.attrs, _fn(p, "matmul", a, b), c)


# --------------------------------------------------------------------------------------- elementwise

#: ONNX elementwise op -> the primitive function it is (the op's name in lower case where not listed).
_UNARY = {name: name.lower() for name in (
    "Sqrt", "Exp", "Log", "Erf", "Relu", "Sigmoid", "Tanh", "Neg", "Abs", "Reciprocal", "Floor", "Ceil", "Round",
    "Sign", "Sin", "Cos", "Tan", "Atan", "Asin", "Acos", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh", "Softplus",
)} | {"Not": "logical_not", "IsNaN": "isnan", "BitwiseNot": "bitwise_not"}
_BINARY = {
    "Add": "add", "Sub": "sub", "Mul": "mul", "And": "logical_and", "Or": "logical_or", "Xor": "logical_xor",
    "Equal": "equal", "Less": "less", "Greater": "greater", "LessOrEqual": "less_equal",
    "GreaterOrEqual": "greater_equal", "BitwiseAnd": "bitwise_and", "BitwiseOr": "bitwise_or",
    "BitwiseXor": "bitwise_xor",
}
_VARIADIC = {"Sum": "add", "Max": "maximum", "Min": "minimum"}


def _elementwise(function: str, arity: int | None) -> OpFunction:
    def run(step: Step, p: Primitives, *inputs: Any) -> Any:
        tensors = [_tensor(p, x) for x in inputs]
        if arity is not None:
            return _fn(p, function, *tensors[:arity])
        return functools.reduce(p.functions[function], tensors)
    return run


for _table, _arity in ((_UNARY, 1), (_BINARY, 2), (_VARIADIC, None)):
    OPS.update({name: _elementwise(function, _arity) for name, function in _table.items()})


def _zero(p: Primitives, x: Any) -> Any:
    return p.full((), 0, p.dtype(x), x)


def _elu(p: Primitives, x: Any, alpha: float) -> Any:
    return _fn(p, "where", x < 0, (_fn(p, "exp", _fn(p, "minimum", x, _zero(p, x))) - 1) * alpha, x)


def _attr(step: Step, key: str, default: float) -> float:
    return float(step.attrs.get(key, default))


#: ONNX ops whose meaning is one expression: ``function(step, p, *inputs)``.
OPS.update({
    "Mean": lambda step, p, *inputs: OPS["Sum"](step, p, *inputs) / len(inputs),
    "Div": lambda step, p, a, b: _fn(p, "div" if _is_float(p, a) else "trunc_div", a, b),  # ints truncate
    "Mod": lambda step, p, a, b: _fn(p, "fmod" if step.attrs.get("fmod", 0) else "remainder", a, b),
    "BitShift": lambda step, p, x, y: _fn(p, "left_shift" if step.attrs["direction"] == "LEFT" else "right_shift",
                                          x, y),
    "Identity": lambda step, p, x: x,
    "LeakyRelu": lambda step, p, x: _fn(p, "where", x >= 0, x, x * _attr(step, "alpha", 0.01)),
    "PRelu": lambda step, p, x, slope: _fn(p, "where", x < 0, x * slope, x),
    "Elu": lambda step, p, x: _elu(p, x, _attr(step, "alpha", 1.0)),
    "Selu": lambda step, p, x: _elu(p, x, _attr(step, "alpha", 1.67326319217681884765625))
    * _attr(step, "gamma", 1.05070102214813232421875),
    "Celu": lambda step, p, x: _fn(p, "where", x > 0, x, _elu(p, x / _attr(step, "alpha", 1.0), 1.0)
                                   * _attr(step, "alpha", 1.0)),
    "ThresholdedRelu": lambda step, p, x: _fn(p, "where", x > _attr(step, "alpha", 1.0), x, _zero(p, x)),
    "Shrink": lambda step, p, x: _fn(p, "where", x < -_attr(step, "lambd", 0.5), x + _attr(step, "bias", 0.0),
                                     _fn(p, "where", x > _attr(step, "lambd", 0.5), x - _attr(step, "bias", 0.0),
                                         _zero(p, x))),
    "Softsign": lambda step, p, x: x / (_fn(p, "abs", x) + 1),
    "Mish": lambda step, p, x: x * _fn(p, "tanh", _fn(p, "softplus", x)),
    "HardSigmoid": lambda step, p, x: _hard_sigmoid(p, x, _attr(step, "alpha", 0.2), _attr(step, "beta", 0.5)),
    "HardSwish": lambda step, p, x: x * _hard_sigmoid(p, x, 1 / 6, 0.5),
    "MatMul": lambda step, p, a, b: _fn(p, "matmul", a, b),
    "GlobalAveragePool": lambda step, p, x: p.reduce("mean", x, tuple(range(2, len(p.shape(x)))), True),
    "GlobalMaxPool": lambda step, p, x: p.reduce("max", x, tuple(range(2, len(p.shape(x)))), True),
    "Size": lambda step, p, x: p.tensor(np.array(math.prod(p.shape(x)), dtype=np.int64), x),
    "Tile": lambda step, p, x, repeats: _fn(p, "tile", x, _ints(p, repeats)),
    "CastLike": lambda step, p, x, like: x if p.dtype(x) == p.dtype(like) else p.cast(x, p.dtype(like)),
})


@onnx_op("Pow")
def _pow(step: Step, p: Primitives, base: Any, exponent: Any) -> Any:
    if p.dtype(exponent) != p.dtype(base):  # the output has the base's type
        exponent = p.cast(exponent, p.dtype(base))
    return _fn(p, "pow", base, exponent)


@onnx_op("IsInf")
def _is_inf(step: Step, p: Primitives, x: Any) -> Any:
    positive, negative = step.attrs.get("detect_positive", 1), step.attrs.get("detect_negative", 1)
    infinite = _fn(p, "isinf", x)
    if positive and negative:
        return infinite
    if positive or negative:
        return _fn(p, "logical_and", infinite, x > 0 if positive else x < 0)
    return _fn(p, "logical_and", infinite, _fn(p, "logical_not", infinite))


@onnx_op("Dropout")
def _dropout(step: Step, p: Primitives, x: Any, ratio: Any = None, training_mode: Any = None) -> Any:
    """Inference: the identity, and an all-true mask if the node asks for one."""
    if training_mode is not None and bool(_scalar(p, training_mode)):
        raise ValueError("training-mode Dropout is not supported (the rebuilt graph runs ONNX inference semantics; "
                         "wrap the model in the framework's dropout to train with it)")
    if len(step.outputs) > 1 and step.outputs[1]:
        return x, p.full(p.shape(x), True, "bool", x)
    return x


@onnx_op("Gelu")
def _gelu(step: Step, p: Primitives, x: Any) -> Any:
    approximate = step.attrs.get("approximate", "none")
    if approximate not in ("none", "tanh"):
        raise ValueError(f"Gelu approximate={approximate!r} is not 'none' or 'tanh'")
    return _fn(p, "gelu_tanh" if approximate == "tanh" else "gelu", x)


@onnx_op("Clip")
def _clip(step: Step, p: Primitives, x: Any, low: Any = None, high: Any = None) -> Any:
    if low is not None:
        x = _fn(p, "maximum", x, p.cast(_tensor(p, low, x), p.dtype(x)))
    if high is not None:
        x = _fn(p, "minimum", x, p.cast(_tensor(p, high, x), p.dtype(x)))
    return x


@onnx_op("Where")
def _where(step: Step, p: Primitives, condition: Any, a: Any, b: Any) -> Any:
    if p.dtype(condition) != "bool":
        condition = p.cast(condition, "bool")
    return _fn(p, "where", condition, a, b)


@onnx_op("Cast")
def _cast(step: Step, p: Primitives, x: Any) -> Any:
    to = int(step.attrs["to"])
    if to not in ONNX_DTYPES:
        raise ValueError(f"Cast to ONNX type {to} is not supported (supported: {sorted(ONNX_DTYPES)})")
    return x if p.dtype(x) == ONNX_DTYPES[to] else p.cast(x, ONNX_DTYPES[to])


# ------------------------------------------------------------------------------------ normalizations

def _hardmax(p: Primitives, x: Any, axis: int) -> Any:
    """1 at the first maximum along ``axis``, 0 elsewhere."""
    shape = [1] * len(p.shape(x))
    shape[axis] = p.shape(x)[axis]
    positions = p.tensor(np.arange(shape[axis], dtype=np.int64).reshape(shape), x)
    return p.cast(_fn(p, "equal", positions, p.arg("argmax", x, axis, True)), p.dtype(x))


def _softmax_like(function: Callable[[Primitives, Any, int], Any]) -> OpFunction:
    """Softmax/LogSoftmax/Hardmax over ``axis``; below opset 13 over the flattened axes from ``axis`` on."""
    def run(step: Step, p: Primitives, x: Any) -> Any:
        shape = p.shape(x)
        axis = _axis(step.attrs.get("axis", -1), len(shape))
        if not step.attrs.get("coerce_2d"):
            return function(p, x, axis)
        flat = _fn(p, "reshape", x, (math.prod(shape[:axis]), math.prod(shape[axis:])))
        return _fn(p, "reshape", function(p, flat, 1), shape)
    return run


OPS["Softmax"] = _softmax_like(lambda p, x, axis: _fn(p, "softmax", x, axis))
OPS["LogSoftmax"] = _softmax_like(lambda p, x, axis: _fn(p, "log_softmax", x, axis))
OPS["Hardmax"] = _softmax_like(_hardmax)


def _normalized(p: Primitives, x: Any, axes: tuple[int, ...], epsilon: float) -> tuple[Any, Any, Any]:
    """(x - mean) / sqrt(var + epsilon) over ``axes``, the mean and the inverse deviation."""
    mean = p.reduce("mean", x, axes, True)
    centered = x - mean
    inverse = _fn(p, "reciprocal", _fn(p, "sqrt", p.reduce("mean", centered * centered, axes, True) + epsilon))
    return centered * inverse, mean, inverse


@onnx_op("LayerNormalization")
def _layer_norm(step: Step, p: Primitives, x: Any, scale: Any, bias: Any = None) -> tuple[Any, ...]:
    """Normalize over the axes from ``axis`` on; computed in float32 for half inputs (``stash_type``)."""
    dtype = p.dtype(x)
    if dtype in ("float16", "bfloat16"):
        x, scale = p.cast(x, "float32"), p.cast(scale, "float32")
        bias = None if bias is None else p.cast(bias, "float32")
    rank = len(p.shape(x))
    axes = tuple(range(_axis(step.attrs.get("axis", -1), rank), rank))
    y, mean, inverse = _normalized(p, x, axes, float(step.attrs.get("epsilon", 1e-5)))
    y = y * scale if bias is None else y * scale + bias
    return (y if p.dtype(y) == dtype else p.cast(y, dtype)), mean, inverse


@onnx_op("BatchNormalization")
def _batch_norm(step: Step, p: Primitives, x: Any, scale: Any, bias: Any, mean: Any, var: Any) -> Any:
    """Inference mode: the running statistics normalize."""
    if step.attrs.get("training_mode", 0):
        raise ValueError("training-mode BatchNormalization is not supported (inference mode only)")
    if not step.attrs.get("spatial", 1):
        raise ValueError("BatchNormalization with spatial=0 is not supported")
    shape = (-1,) + (1,) * (len(p.shape(x)) - 2)
    factor = _fn(p, "reshape", scale / _fn(p, "sqrt", var + float(step.attrs.get("epsilon", 1e-5))), shape)
    return (x - _fn(p, "reshape", mean, shape)) * factor + _fn(p, "reshape", bias, shape)


@onnx_op("InstanceNormalization")
def _instance_norm(step: Step, p: Primitives, x: Any, scale: Any, bias: Any) -> Any:
    shape = (-1,) + (1,) * (len(p.shape(x)) - 2)
    y, _, _ = _normalized(p, x, tuple(range(2, len(p.shape(x)))), float(step.attrs.get("epsilon", 1e-5)))
    return y * _fn(p, "reshape", scale, shape) + _fn(p, "reshape", bias, shape)


@onnx_op("LRN")
def _lrn(step: Step, p: Primitives, x: Any) -> Any:
    """Local response normalization: ``x / (bias + alpha / size * window sum of x²) ** beta`` over channels."""
    attrs = step.attrs
    size = int(attrs["size"])
    alpha, beta, bias = float(attrs.get("alpha", 1e-4)), float(attrs.get("beta", 0.75)), float(attrs.get("bias", 1.0))
    shape = p.shape(x)
    rest = [0] * (len(shape) - 2)
    squares = p.pad(x * x, [0, (size - 1) // 2, *rest], [0, size - 1 - (size - 1) // 2, *rest])
    total = functools.reduce(operator.add, (
        _fn(p, "strided_slice", squares, [0, offset, *rest], [shape[0], offset + shape[1], *shape[2:]],
            [1] * len(shape)) for offset in range(size)))
    return x / (total * (alpha / size) + bias) ** beta


# ------------------------------------------------------------------------------------------- pooling

@dataclass(slots=True)
class _Windows:
    """Where the windows of an ONNX pool fall: kernel, strides, dilations, output sizes, pads, ceil overhang."""

    kernel: list[int]
    strides: list[int]
    dilations: list[int]
    outputs: list[int]
    begins: list[int]
    ends: list[int]  # the pads at the end, and past them the overhang of ``ceil_mode``'s last window
    overhang: list[int]

    def ranges(self) -> list[list[tuple[int, int, int]]]:
        """For each kernel offset, the (start, stop, step) per spatial axis of the positions its windows read."""
        result = []
        for offsets in itertools.product(*(range(k) for k in self.kernel)):
            starts = [o * d for o, d in zip(offsets, self.dilations, strict=True)]
            result.append([(start, start + (n - 1) * s + 1, s)
                           for start, n, s in zip(starts, self.outputs, self.strides, strict=True)])
        return result


def _pool_windows(attrs: dict[str, Any], sizes: Sequence[int]) -> _Windows:
    kernel = [int(k) for k in attrs["kernel_shape"]]
    ndim = len(kernel)
    if len(sizes) != ndim:
        raise ValueError(f"kernel_shape {kernel} needs a {ndim + 2}-D input, got {len(sizes) + 2} dimensions")
    strides = [int(s) for s in attrs.get("strides", (1,) * ndim)]
    dilations = [int(d) for d in attrs.get("dilations", (1,) * ndim)]
    begins, ends = conv_pads(onnx_padding(attrs, ndim), sizes, kernel, strides, dilations)
    ceil = bool(attrs.get("ceil_mode", 0))
    outputs, overhang = [], []
    for size, k, s, d, begin, end in zip(sizes, kernel, strides, dilations, begins, ends, strict=True):
        span = (k - 1) * d + 1
        room = size + begin + end - span
        if room < 0:
            raise ValueError(f"a pooling window of {span} does not fit an axis of {size} padded by {begin}+{end}")
        count = (-(-room // s) if ceil else room // s) + 1
        if ceil and (count - 1) * s >= size + begin:  # the last window must start inside the input or its pad
            count -= 1
        outputs.append(count)
        overhang.append(max((count - 1) * s + span - (size + begin + end), 0))
    ends = [end + extra for end, extra in zip(ends, overhang, strict=True)]
    return _Windows(kernel, strides, dilations, outputs, begins, ends, overhang)


def _window_slices(p: Primitives, x: Any, windows: _Windows, fill: Any = 0) -> list[Any]:
    """For each kernel offset, the strided slice its windows read of ``x`` padded with ``fill``."""
    x = _pad(p, x, [0, 0, *windows.begins], [0, 0, *windows.ends], value=fill)
    lead = list(p.shape(x)[:2])
    return [_fn(p, "strided_slice", x, [0, 0, *begin], [*lead, *end], [1, 1, *step])
            for begin, end, step in (zip(*axes, strict=True) for axes in windows.ranges())]


def _flat_positions(shape: Sequence[int], column_major: bool) -> np.ndarray:
    """Each element's index in the flattened tensor (spatial axes column-major if asked): MaxPool's Indices."""
    spatial = [int(s) for s in shape[2:]]
    count = math.prod(spatial)
    inner = np.arange(count, dtype=np.int64).reshape(spatial[::-1] if column_major else spatial)
    if column_major:
        inner = inner.transpose(tuple(reversed(range(len(spatial)))))
    outer = np.arange(int(shape[0]) * int(shape[1]), dtype=np.int64).reshape(int(shape[0]), int(shape[1]))
    return outer.reshape(outer.shape + (1,) * len(spatial)) * count + inner


@onnx_op("MaxPool")
def _max_pool(step: Step, p: Primitives, x: Any) -> Any:
    """The maximum over each window; the optional Indices output holds the first maximum's flat position."""
    shape = p.shape(x)
    windows = _pool_windows(step.attrs, shape[2:])
    lowest = -math.inf if _is_float(p, x) else int(np.iinfo(np.dtype(p.dtype(x))).min)
    slices = _window_slices(p, x, windows, lowest)
    if not (len(step.outputs) > 1 and step.outputs[1]):
        return functools.reduce(p.functions["maximum"], slices)
    result = slices[0]
    positions = np.pad(_flat_positions(shape, bool(step.attrs.get("storage_order", 0))),
                       [(0, 0), (0, 0), *zip(windows.begins, windows.ends, strict=True)], constant_values=-1)
    found = None
    for piece, axes in zip(slices, windows.ranges(), strict=True):
        where = p.tensor(positions[(slice(None), slice(None), *(slice(*axis) for axis in axes))], x)
        if found is None:
            found = where
            continue
        better = piece > result  # strictly: the first maximum in scan order wins
        found = _fn(p, "where", better, where, found)
        result = _fn(p, "where", better, piece, result)
    return result, found


@onnx_op("AveragePool")
def _average_pool(step: Step, p: Primitives, x: Any) -> Any:
    """Window sums divided by the number of elements counted (pads only with ``count_include_pad``)."""
    sizes = list(p.shape(x)[2:])
    windows = _pool_windows(step.attrs, sizes)
    total = functools.reduce(operator.add, _window_slices(p, x, windows))
    pads = list(zip(windows.begins, windows.ends, strict=True))
    if step.attrs.get("count_include_pad", 0):  # the pads count, the overhang does not
        counted = np.pad(np.ones([s + b + e - o for s, (b, e), o in zip(sizes, pads, windows.overhang, strict=True)]),
                         [(0, o) for o in windows.overhang])
    else:
        counted = np.pad(np.ones(sizes), pads)
    counts = sum(counted[tuple(slice(*axis) for axis in axes)] for axes in windows.ranges())
    return total / p.tensor(np.asarray(counts, dtype=p.dtype(x) if p.dtype(x) != "bfloat16" else "float32"), x)


# ---------------------------------------------------------------------------------------- reductions

_REDUCTIONS: dict[str, Callable[[Primitives, Any, tuple[int, ...], bool], Any]] = {
    "ReduceMean": lambda p, x, axes, keep: p.reduce("mean", x, axes, keep),
    "ReduceSum": lambda p, x, axes, keep: p.reduce("sum", x, axes, keep),
    "ReduceMax": lambda p, x, axes, keep: p.reduce("max", x, axes, keep),
    "ReduceMin": lambda p, x, axes, keep: p.reduce("min", x, axes, keep),
    "ReduceProd": lambda p, x, axes, keep: p.reduce("prod", x, axes, keep),
    "ReduceSumSquare": lambda p, x, axes, keep: p.reduce("sum", x * x, axes, keep),
    "ReduceL1": lambda p, x, axes, keep: p.reduce("sum", _fn(p, "abs", x), axes, keep),
    "ReduceL2": lambda p, x, axes, keep: _fn(p, "sqrt", p.reduce("sum", x * x, axes, keep)),
    "ReduceLogSum": lambda p, x, axes, keep: _fn(p, "log", p.reduce("sum", x, axes, keep)),
    "ReduceLogSumExp": lambda p, x, axes, keep: p.reduce("logsumexp", x, axes, keep),
}


def _reduction(name: str) -> OpFunction:
    """ReduceX: axes (an input once resolved), keepdims, noop_with_empty_axes."""
    def run(step: Step, p: Primitives, x: Any, axes: Any = None) -> Any:
        rank = len(p.shape(x))
        listed = [] if axes is None else _ints(p, axes)
        if not listed:
            if step.attrs.get("noop_with_empty_axes", 0):
                return x
            listed = list(range(rank))
        dims = tuple(sorted({_axis(axis, rank) for axis in listed}))
        return _REDUCTIONS[name](p, x, dims, bool(step.attrs.get("keepdims", 1)))
    return run


for _name in _REDUCTIONS:
    OPS[_name] = _reduction(_name)
    _INPUT_FORMS[_name] = ((1, "axes"),)


def _arg_reduction(kind: str) -> OpFunction:
    def run(step: Step, p: Primitives, x: Any) -> Any:
        axis = _axis(step.attrs.get("axis", 0), len(p.shape(x)))
        keep = bool(step.attrs.get("keepdims", 1))
        if step.attrs.get("select_last_index", 0):  # the first extreme of the reversed axis
            return (p.shape(x)[axis] - 1) - p.arg(kind, _fn(p, "flip", x, (axis,)), axis, keep)
        return p.arg(kind, x, axis, keep)
    return run


OPS["ArgMax"] = _arg_reduction("argmax")
OPS["ArgMin"] = _arg_reduction("argmin")


@onnx_op("CumSum")
def _cumsum(step: Step, p: Primitives, x: Any, axis: Any) -> Any:
    dim = _axis(_scalar(p, axis), len(p.shape(x)))
    reverse = bool(step.attrs.get("reverse", 0))
    if reverse:
        x = _fn(p, "flip", x, (dim,))
    y = _fn(p, "cumsum", x, dim)
    if step.attrs.get("exclusive", 0):
        y = y - x
    return _fn(p, "flip", y, (dim,)) if reverse else y


@onnx_op("TopK")
def _topk(step: Step, p: Primitives, x: Any, k: Any) -> tuple[Any, Any]:
    axis = _axis(step.attrs.get("axis", -1), len(p.shape(x)))
    return p.topk(x, int(_scalar(p, k)), axis, bool(step.attrs.get("largest", 1)), bool(step.attrs.get("sorted", 1)))


# -------------------------------------------------------------------------------------------- shapes

@onnx_op("Shape")
def _shape(step: Step, p: Primitives, x: Any) -> Any:
    start, end = step.attrs.get("start", 0), step.attrs.get("end")
    dims = list(p.shape(x))[int(start):None if end is None else int(end)]
    return p.tensor(np.array(dims, dtype=np.int64), x)


def _reshape_target(shape: Sequence[int], target: Sequence[int]) -> tuple[int, ...]:
    """``target`` (``0`` already resolved) with its ``-1`` inferred; ``ValueError`` when it cannot hold ``shape``."""
    count, known = math.prod(shape), math.prod(d for d in target if d != -1)
    if list(target).count(-1) == 1 and known > 0 and count % known == 0:
        target = [count // known if d == -1 else d for d in target]
    if any(d < 0 for d in target) or math.prod(target) != count:
        raise ValueError(f"shape {list(target)} is invalid for a tensor of shape {list(shape)} ({count} elements)")
    return tuple(int(d) for d in target)


@onnx_op("Reshape")
def _reshape(step: Step, p: Primitives, x: Any, shape: Any) -> Any:
    target = _dataflow.onnx_shape(_ints(p, shape), p.shape(x), allow_zero=bool(step.attrs.get("allowzero", 0)))
    return _fn(p, "reshape", x, _reshape_target(p.shape(x), target))


@onnx_op("Squeeze")
def _squeeze(step: Step, p: Primitives, x: Any, axes: Any = None) -> Any:
    """No axes: every axis of size 1."""
    shape = p.shape(x)
    listed = None if axes is None else _ints(p, axes)
    drop = {i for i, size in enumerate(shape) if size == 1} if not listed else {_axis(a, len(shape)) for a in listed}
    wrong = sorted(i for i in drop if shape[i] != 1)
    if wrong:
        raise ValueError(f"cannot squeeze axes {wrong} of shape {list(shape)}: their size is not 1")
    return _fn(p, "reshape", x, tuple(size for i, size in enumerate(shape) if i not in drop))


@onnx_op("Unsqueeze")
def _unsqueeze(step: Step, p: Primitives, x: Any, axes: Any) -> Any:
    """Axes counted in the output's rank."""
    listed = _ints(p, axes)
    rank = len(p.shape(x)) + len(listed)
    inserted = {_axis(a, rank) for a in listed}
    sizes = iter(p.shape(x))
    return _fn(p, "reshape", x, tuple(1 if i in inserted else next(sizes) for i in range(rank)))


@onnx_op("Concat")
def _concat(step: Step, p: Primitives, *inputs: Any) -> Any:
    tensors = [_tensor(p, x) for x in inputs if x is not None]
    axis = _axis(step.attrs["axis"], len(p.shape(tensors[0])))
    tensors = [x for x in tensors if p.shape(x)[axis] != 0] or tensors[:1]
    return tensors[0] if len(tensors) == 1 else _fn(p, "concat", tensors, axis)


@onnx_op("Split")
def _split(step: Step, p: Primitives, x: Any, split: Any = None) -> tuple[Any, ...]:
    """Sizes from the ``split`` input, else equal parts (the last one smaller with ``num_outputs``, opset 18)."""
    axis = _axis(step.attrs.get("axis", 0), len(p.shape(x)))
    length = p.shape(x)[axis]
    sizes = [] if split is None else _ints(p, split)
    if not sizes:
        parts = int(step.attrs.get("num_outputs", len(step.outputs)))
        if "num_outputs" in step.attrs:
            chunk = -(-length // parts)
            sizes = [min(chunk, length - i * chunk) for i in range(parts)]
        elif length % parts:
            raise ValueError(f"an axis of {length} does not split into {parts} equal parts")
        else:
            sizes = [length // parts] * parts
    if sum(sizes) != length:
        raise ValueError(f"split sizes {sizes} do not add up to the axis length {length}")
    return tuple(_fn(p, "split", x, sizes, axis))


@onnx_op("Slice")
def _slice(step: Step, p: Primitives, x: Any, starts: Any, ends: Any, axes: Any = None, steps: Any = None) -> Any:
    """Bounds clamped like Python slices (INT64 max/min ends included); negative steps gather positions."""
    shape = list(p.shape(x))
    begin_list, end_list = _ints(p, starts), _ints(p, ends)
    axis_list = list(range(len(begin_list))) if axes is None else [_axis(a, len(shape)) for a in _ints(p, axes)]
    step_list = [1] * len(begin_list) if steps is None else _ints(p, steps)
    begin, stop, stride = [0] * len(shape), list(shape), [1] * len(shape)
    for axis, start, end, step_size in zip(axis_list, begin_list, end_list, step_list, strict=True):
        if step_size == 0:
            raise ValueError("Slice steps cannot be 0")
        begin[axis], stop[axis], stride[axis] = slice(start, end, step_size).indices(shape[axis])
        if stride[axis] < 0:  # gather the explicit positions
            positions = np.arange(begin[axis], stop[axis], stride[axis], dtype=np.int64)
            x = _fn(p, "take", x, p.tensor(positions, x), axis)
            begin[axis], stop[axis], stride[axis] = 0, len(positions), 1
            shape[axis] = len(positions)
    if begin == [0] * len(shape) and stop == shape and stride == [1] * len(shape):
        return x
    if any(b >= e for b, e in zip(begin, stop, strict=True)):
        sizes = [max(len(range(b, e, s)), 0) for b, e, s in zip(begin, stop, stride, strict=True)]
        return p.full(sizes, 0, p.dtype(x), x)
    return _fn(p, "strided_slice", x, begin, stop, stride)


@onnx_op("Gather")
def _gather(step: Step, p: Primitives, x: Any, indices: Any) -> Any:
    shape = p.shape(x)
    axis = _axis(step.attrs.get("axis", 0), len(shape))
    indices = _array(p, indices)
    flat = _fn(p, "reshape", _positive(p, indices, shape[axis], x), (-1,))
    return _fn(p, "reshape", _fn(p, "take", x, flat, axis), (*shape[:axis], *indices.shape, *shape[axis + 1:]))


def _nd_indices(p: Primitives, x: Any, indices: Any, batch: int) -> np.ndarray:
    """GatherND/ScatterND indices counted from the start, ``batch`` leading coordinates prepended (eager)."""
    array = _array(p, indices).astype(np.int64)
    sizes = np.array(p.shape(x)[batch:batch + array.shape[-1]], dtype=np.int64)
    array = np.where(array < 0, array + sizes, array)
    if batch:
        lead = array.shape[:-1]
        grids = np.meshgrid(*(np.arange(n) for n in lead[:batch]), indexing="ij")
        coordinates = [np.broadcast_to(g.reshape(g.shape + (1,) * (len(lead) - batch)), lead) for g in grids]
        array = np.concatenate([np.stack(coordinates, axis=-1), array], axis=-1)
    return array.astype(np.int64)


def _constant_array(attrs: dict[str, Any]) -> np.ndarray:
    """The value of an ONNX ``Constant`` node the frontend kept as a node (its dense ones are graph params)."""
    if "value" in attrs:
        return np.array(_decode_tensor(attrs["value"]), copy=True)
    forms = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64, "value_ints": np.int64}
    for key, dtype in forms.items():
        if key in attrs:
            return np.array(attrs[key], dtype=dtype)
    raise ValueError(f"a Constant with attributes {sorted(attrs)} (strings, sparse tensors) has no tensor value")


def _broadcast(p: Primitives, x: Any, shape: Any) -> Any:
    target = tuple(int(d) for d in np.broadcast_shapes(p.shape(x), tuple(_ints(p, shape))))
    return x if target == p.shape(x) else _fn(p, "broadcast_to", x, target)


#: ONNX scatter ``reduction``s: how an update combines with the value it lands on.
SCATTER_REDUCTIONS = ("none", "add", "mul", "max", "min")


def _scatter_rows(p: Primitives, x: Any, rows: np.ndarray, updates: Any, rest: Sequence[int], reduction: Any) -> Any:
    """``x`` seen as a table ``[-1, *rest]`` whose ``rows`` (flat int64) take ``updates`` by ``reduction``.

    ``p.scatter_rows(table, rows, updates [len(rows), *rest], reduction)`` replaces the rows (``none``) or
    combines each update with its row (``add``, ``mul``, ``max``, ``min``; repeated rows accumulate).
    """
    if reduction not in SCATTER_REDUCTIONS:
        raise ValueError(f"reduction {reduction!r} is not one of {', '.join(SCATTER_REDUCTIONS)}")
    table = _fn(p, "reshape", x, (-1, *rest))
    flat_rows = p.tensor(rows.reshape(-1), x)
    changed = p.scatter_rows(table, flat_rows, _fn(p, "reshape", updates, (rows.size, *rest)), reduction)
    return _fn(p, "reshape", changed, p.shape(x))


@onnx_op("ScatterND")
def _scatter_nd(step: Step, p: Primitives, x: Any, indices: Any, updates: Any) -> Any:
    """Each index ``[..., k]`` names a row of ``x`` seen as ``[positions of its first k axes, rest]``."""
    shape = p.shape(x)
    coordinates = _nd_indices(p, x, indices, 0)
    depth = coordinates.shape[-1]
    rows = np.ravel_multi_index(tuple(np.moveaxis(coordinates, -1, 0)), shape[:depth])
    return _scatter_rows(p, x, rows, updates, shape[depth:], step.attrs.get("reduction", "none"))


@onnx_op("ScatterElements", "Scatter")
def _scatter_elements(step: Step, p: Primitives, x: Any, indices: Any, updates: Any) -> Any:
    """Each update lands at its own position, but for its index along ``axis``."""
    shape = p.shape(x)
    axis = _axis(step.attrs.get("axis", 0), len(shape))
    coordinates = list(np.indices(_array(p, indices).shape))
    coordinates[axis] = _positions(p, indices, shape[axis])
    rows = np.ravel_multi_index(tuple(coordinates), shape)
    return _scatter_rows(p, x, rows, updates, (), step.attrs.get("reduction", "none"))


OPS.update({
    "Flatten": lambda step, p, x: _fn(p, "reshape", x, (math.prod(p.shape(x)[:int(step.attrs.get("axis", 1))]),
                                                        math.prod(p.shape(x)[int(step.attrs.get("axis", 1)):]))),
    "Transpose": lambda step, p, x: _fn(p, "transpose", x, step.attrs.get("perm") or
                                        tuple(reversed(range(len(p.shape(x)))))),
    "GatherElements": lambda step, p, x, indices: _fn(
        p, "gather_elements", x, _axis(step.attrs.get("axis", 0), len(p.shape(x))),
        _positive(p, indices, p.shape(x)[_axis(step.attrs.get("axis", 0), len(p.shape(x)))], x)),
    "GatherND": lambda step, p, x, indices: _fn(p, "gather_nd", x, p.tensor(
        _nd_indices(p, x, indices, int(step.attrs.get("batch_dims", 0))), x)),
    "Expand": lambda step, p, x, shape: _broadcast(p, x, shape),
    "Constant": lambda step, p: p.tensor(_constant_array(step.attrs)),
    "Range": lambda step, p, start, limit, delta: p.tensor(np.arange(
        *(_array(p, v).reshape(()) for v in (start, limit, delta)), dtype=_array(p, start).dtype), start),
    "NonZero": lambda step, p, x: p.tensor(np.stack(np.nonzero(_array(p, x))).astype(np.int64)
                                           .reshape(len(p.shape(x)), -1), x),  # a data-dependent shape: eager
})


@onnx_op("ConstantOfShape")
def _constant_of_shape(step: Step, p: Primitives, shape: Any) -> Any:
    value = step.attrs.get("value")
    array = np.zeros(1, np.float32) if value is None else np.asarray(value).reshape(-1)
    return p.tensor(np.full(_ints(p, shape), array[0], dtype=array.dtype), shape)


@onnx_op("Pad")
def _pad_op(step: Step, p: Primitives, x: Any, pads: Any, value: Any = None, axes: Any = None) -> Any:
    """Pads, an optional constant value and optional ``axes`` (opset 18) inputs; modes as :func:`_pad`."""
    rank = len(p.shape(x))
    amounts = _ints(p, pads)
    listed = list(range(rank)) if axes is None else [_axis(a, rank) for a in _ints(p, axes)]
    count = len(listed)
    if len(amounts) != 2 * count:
        raise ValueError(f"pads {amounts} do not hold 2 x {count} entries")
    begins, ends = [0] * rank, [0] * rank
    for index, axis in enumerate(listed):
        begins[axis], ends[axis] = amounts[index], amounts[count + index]
    fill = 0 if value is None or _array(p, value).size == 0 else _scalar(p, value)
    kind = p.dtype(x)
    fill = float(fill) if _is_float(p, x) else bool(fill) if kind == "bool" else int(fill)
    return _pad(p, x, begins, ends, step.attrs.get("mode", "constant"), fill)


@onnx_op("Trilu")
def _trilu(step: Step, p: Primitives, x: Any, k: Any = None) -> Any:
    diagonal = 0 if k is None else int(_scalar(p, k))
    rows, columns = p.shape(x)[-2:]
    ones = np.ones((rows, columns), bool)
    keep = np.triu(ones, diagonal) if step.attrs.get("upper", 1) else np.tril(ones, diagonal)
    return _fn(p, "where", p.tensor(keep, x), x, _zero(p, x))


@onnx_op("DepthToSpace")
def _depth_to_space(step: Step, p: Primitives, x: Any) -> Any:
    b = int(step.attrs["blocksize"])
    n, c, h, w = p.shape(x)
    if step.attrs.get("mode", "DCR") == "CRD":
        y = _fn(p, "transpose", _fn(p, "reshape", x, (n, c // (b * b), b, b, h, w)), (0, 1, 4, 2, 5, 3))
    else:
        y = _fn(p, "transpose", _fn(p, "reshape", x, (n, b, b, c // (b * b), h, w)), (0, 3, 4, 1, 5, 2))
    return _fn(p, "reshape", y, (n, c // (b * b), h * b, w * b))


@onnx_op("SpaceToDepth")
def _space_to_depth(step: Step, p: Primitives, x: Any) -> Any:
    b = int(step.attrs["blocksize"])
    n, c, h, w = p.shape(x)
    y = _fn(p, "transpose", _fn(p, "reshape", x, (n, c, h // b, b, w // b, b)), (0, 3, 5, 1, 2, 4))
    return _fn(p, "reshape", y, (n, c * b * b, h // b, w // b))


@onnx_op("OneHot")
def _one_hot(step: Step, p: Primitives, indices: Any, depth: Any, values: Any) -> Any:
    size = int(_scalar(p, depth))
    array = _array(p, indices).astype(np.int64)
    array = np.where(array < 0, array + size, array)
    axis = _axis(step.attrs.get("axis", -1), array.ndim + 1)
    hot = np.moveaxis(array[..., None] == np.arange(size), -1, axis)
    off, on = _fn(p, "split", _fn(p, "reshape", values, (2,)), [1, 1], 0)
    return _fn(p, "where", p.tensor(hot, values), _fn(p, "reshape", on, ()), _fn(p, "reshape", off, ()))


# -------------------------------------------------------------------------------------------- einsum

def _einsum_terms(equation: str, ranks: Sequence[int]) -> tuple[list[list[str]], list[str]]:
    """The subscripts of each operand and of the output, ``...`` expanded into private symbols."""
    equation = equation.replace(" ", "")
    inputs, arrow, output = equation.partition("->")
    terms = inputs.split(",")
    if len(terms) != len(ranks):
        raise ValueError(f"equation {equation!r} names {len(terms)} operands, {len(ranks)} were given")
    widest = max((rank - len(term.replace("...", "")) for term, rank in zip(terms, ranks, strict=True)
                  if "..." in term), default=0)
    ellipsis = [chr(0x100 + i) for i in range(widest)]
    expanded = []
    for term, rank in zip(terms, ranks, strict=True):
        head, dots, tail = term.partition("...")
        width = rank - len(head) - len(tail)
        letters = list(head) + (ellipsis[widest - width:] if dots else []) + list(tail)
        if len(letters) != rank:
            raise ValueError(f"subscripts {term!r} do not fit an operand of rank {rank}")
        if len(set(letters)) != len(letters):
            raise ValueError(f"repeated subscripts in {term!r} (diagonals) are not supported")
        expanded.append(letters)
    if arrow:
        head, dots, tail = output.partition("...")
        return expanded, list(head) + (ellipsis if dots else []) + list(tail)
    counts: dict[str, int] = {}  # implicit output: the broadcast axes, then the letters used once, sorted
    for letters in expanded:
        for letter in letters:
            counts[letter] = counts.get(letter, 0) + 1
    return expanded, ellipsis + sorted(c for c, n in counts.items() if n == 1 and c not in ellipsis)


def _sum_out(p: Primitives, x: Any, letters: list[str], keep: set[str]) -> tuple[Any, list[str]]:
    drop = tuple(i for i, letter in enumerate(letters) if letter not in keep)
    if not drop:
        return x, letters
    return p.reduce("sum", x, drop, False), [letter for letter in letters if letter in keep]


def _contract(p: Primitives, a: Any, left: list[str], b: Any, right: list[str], keep: set[str],
              ) -> tuple[Any, list[str]]:
    """Two operands contracted as one batched matmul: [batch, only-a, shared] x [batch, shared, only-b]."""
    a, left = _sum_out(p, a, left, keep | set(right))
    b, right = _sum_out(p, b, right, keep | set(left))
    batch = [c for c in left if c in right and c in keep]
    shared = [c for c in left if c in right and c not in keep]
    only_a = [c for c in left if c not in right]
    only_b = [c for c in right if c not in left]
    size = dict(zip(left, p.shape(a), strict=True))
    for c, n in zip(right, p.shape(b), strict=True):
        size[c] = max(size.get(c, 1), n)
    a = _fn(p, "broadcast_to", _fn(p, "transpose", a, [left.index(c) for c in batch + only_a + shared]),
                       [size[c] for c in batch + only_a + shared])
    b = _fn(p, "broadcast_to", _fn(p, "transpose", b, [right.index(c) for c in batch + shared + only_b]),
                       [size[c] for c in batch + shared + only_b])
    batch_size = math.prod(size[c] for c in batch)
    product = _fn(p, "matmul", _fn(p, "reshape", a, (batch_size, math.prod(size[c] for c in only_a), -1)),
                       _fn(p, "reshape", b, (batch_size, math.prod(size[c] for c in shared), -1)))
    letters = batch + only_a + only_b
    return _fn(p, "reshape", product, [size[c] for c in letters]), letters


@onnx_op("Einsum")
def _einsum(step: Step, p: Primitives, *operands: Any) -> Any:
    """Operands summed over private axes, then contracted left to right by batched matmuls."""
    terms, output = _einsum_terms(step.attrs["equation"], [len(p.shape(x)) for x in operands])
    result, letters = operands[0], terms[0]
    for index in range(1, len(operands)):
        later = set(output).union(*terms[index + 1:])
        result, letters = _contract(p, result, letters, operands[index], terms[index], later)
    result, letters = _sum_out(p, result, letters, set(output))
    return result if letters == output else _fn(p, "transpose", result, [letters.index(c) for c in output])


# -------------------------------------------------------------------------------------------- resize

@dataclass(slots=True)
class _ResizeAxis:
    """How one axis is resampled: input and output length, the scale of the coordinate transform, roi."""

    size: int
    out: int
    scale: float
    roi: tuple[float, float] = (0.0, 1.0)


def _source_coordinates(axis: _ResizeAxis, mode: str) -> np.ndarray:
    """x_original for every output position (float32, as onnxruntime computes it)."""
    f32 = np.float32
    out = np.arange(axis.out, dtype=f32)
    scale, size = f32(axis.scale), f32(axis.size)
    if mode == "half_pixel":
        return (out + f32(0.5)) / scale - f32(0.5)
    if mode == "pytorch_half_pixel":
        return (out + f32(0.5)) / scale - f32(0.5) if axis.out > 1 else np.zeros(axis.out, f32)
    if mode == "align_corners":
        return out * (size - 1) / f32(axis.out - 1) if axis.out > 1 else np.zeros(axis.out, f32)
    if mode == "asymmetric":
        return out / scale
    if mode == "half_pixel_symmetric":
        offset = size / 2 * (1 - f32(axis.out) / (scale * size))
        return offset + (out + f32(0.5)) / scale - f32(0.5)
    if mode == "tf_crop_and_resize":
        start, end = f32(axis.roi[0]), f32(axis.roi[1])
        if axis.out > 1:
            return start * (size - 1) + out * (end - start) * (size - 1) / f32(axis.out - 1)
        return np.full(axis.out, f32(0.5) * (start + end) * (size - 1), f32)
    raise ValueError(f"coordinate_transformation_mode {mode!r} is not supported")


#: ``nearest_mode`` -> source index of each coordinate; ``simple`` (Resize-10, Upsample) is chosen by the scale.
_NEAREST: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "round_prefer_floor": lambda x: np.where(x - np.floor(x) == 0.5, np.floor(x), np.floor(x + 0.5)),
    "round_prefer_ceil": lambda x: np.floor(x + 0.5), "floor": np.floor, "ceil": np.ceil,
}


def _nearest(x: np.ndarray, mode: str, scale: float) -> np.ndarray:
    """Source indices of nearest resampling; ``simple`` rounds down, up when shrinking."""
    if mode == "simple":
        return np.ceil(x) if scale < 1 else np.floor(x)
    if mode not in _NEAREST:
        raise ValueError(f"nearest_mode {mode!r} is not supported")
    return _NEAREST[mode](x)


def _cubic_weights(ratio: np.ndarray, a: float) -> np.ndarray:
    """Keys cubic convolution weights of the 4 taps at floor(x) - 1 .. floor(x) + 2."""
    def near(t: np.ndarray) -> np.ndarray:
        return ((a + 2) * t - (a + 3)) * t * t + 1

    def far(t: np.ndarray) -> np.ndarray:
        return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a

    return np.stack([far(ratio + 1), near(ratio), near(1 - ratio), far(2 - ratio)], axis=-1)


def _interpolation_matrix(axis: _ResizeAxis, attrs: dict[str, Any], mode: str, transform: str,
                          ) -> tuple[np.ndarray, np.ndarray]:
    """([out, size] weights, [out] inside-roi mask) of a linear or cubic resampling of one axis."""
    x = _source_coordinates(axis, transform).astype(np.float64)
    inside = (x >= 0) & (x <= axis.size - 1) if transform == "tf_crop_and_resize" else np.ones(axis.out, bool)
    matrix = np.zeros((axis.out, axis.size))
    rows = np.arange(axis.out)
    if mode == "linear":
        x = np.clip(x, 0, axis.size - 1)
        low = np.floor(x).astype(np.int64)
        high = np.minimum(low + 1, axis.size - 1)
        np.add.at(matrix, (rows, low), 1 - (x - low))
        np.add.at(matrix, (rows, high), x - low)
    else:
        low = np.floor(x).astype(np.int64)
        weights = _cubic_weights(x - low, float(attrs.get("cubic_coeff_a", -0.75)))
        taps = low[:, None] + np.arange(-1, 3)[None, :]
        if attrs.get("exclude_outside", 0):
            weights = np.where((taps >= 0) & (taps < axis.size), weights, 0.0)
            weights = weights / weights.sum(axis=1, keepdims=True)
        np.add.at(matrix, (np.repeat(rows, 4), np.clip(taps, 0, axis.size - 1).reshape(-1)), weights.reshape(-1))
    matrix[~inside] = 0.0
    return matrix, inside


def _resize_axes(p: Primitives, shape: Sequence[int], attrs: dict[str, Any], roi: Any, scales: Any, sizes: Any,
                 ) -> dict[int, _ResizeAxis]:
    """The resampled axes (roi, scales, sizes inputs; ``axes`` and the aspect-ratio policy of opset 18)."""
    rank = len(shape)
    axes = [_axis(a, rank) for a in attrs.get("axes", range(rank))]
    scale_values = None if scales is None or _array(p, scales).size == 0 else _array(p, scales).astype(np.float32)
    targets = None if sizes is None or _array(p, sizes).size == 0 else _ints(p, sizes)
    roi_values = None if roi is None or _array(p, roi).size == 0 else _array(p, roi).astype(np.float64).reshape(-1)
    if targets is not None:
        policy = attrs.get("keep_aspect_ratio_policy", "stretch")
        ratios = np.array([targets[i] / shape[a] for i, a in enumerate(axes)], np.float32)
        if policy != "stretch":
            common = np.min(ratios) if policy == "not_larger" else np.max(ratios)
            ratios = np.full(len(axes), common, np.float32)
            targets = [int(np.floor(np.float32(shape[a]) * common + np.float32(0.5))) for a in axes]
        scale_values = ratios
    if scale_values is None:
        raise ValueError("Resize needs scales or sizes")
    if len(scale_values) != len(axes):
        raise ValueError(f"Resize has {len(scale_values)} scales/sizes for {len(axes)} axes")
    result = {}
    for index, axis in enumerate(axes):
        scale = float(scale_values[index])
        out = targets[index] if targets is not None else int(np.floor(np.float32(shape[axis]) * np.float32(scale)))
        bounds = (0.0, 1.0)
        if roi_values is not None:
            count = len(roi_values) // 2
            at = index if count == len(axes) else axis
            bounds = (float(roi_values[at]), float(roi_values[count + at]))
        if out != shape[axis] or scale != 1.0 or attrs.get("coordinate_transformation_mode") == "tf_crop_and_resize":
            result[axis] = _ResizeAxis(shape[axis], int(out), scale, bounds)
    return result


@onnx_op("Resize", "Upsample")
def _resize(step: Step, p: Primitives, x: Any, roi: Any = None, scales: Any = None, sizes: Any = None) -> Any:
    """Separable resampling: nearest by gathering source indices, linear/cubic by weight matrices."""
    attrs = step.attrs
    mode = attrs.get("mode", "nearest")
    if mode not in ("nearest", "linear", "cubic"):
        raise ValueError(f"Resize mode {mode!r} is not nearest, linear or cubic")
    if attrs.get("antialias", 0) and mode != "nearest":
        raise ValueError("Resize with antialias=1 is not supported")
    transform = attrs.get("coordinate_transformation_mode", "half_pixel")
    dtype = p.dtype(x)
    if mode != "nearest" and not _is_float(p, x):
        x = p.cast(x, "float32")
    inside_all: np.ndarray | None = None
    for axis, spec in _resize_axes(p, p.shape(x), attrs, roi, scales, sizes).items():
        if mode == "nearest":
            source = _source_coordinates(spec, transform)
            inside = (source >= 0) & (source <= spec.size - 1)
            rounded = _nearest(source, attrs.get("nearest_mode", "round_prefer_floor"), spec.scale)
            x = _fn(p, "take", x, p.tensor(np.clip(rounded, 0, spec.size - 1).astype(np.int64), x), axis)
        else:
            matrix, inside = _interpolation_matrix(spec, attrs, mode, transform)
            weights = p.tensor(matrix.astype(p.dtype(x) if p.dtype(x) != "bfloat16" else "float32"), x)
            moved = _fn(p, "transpose", x, [*(i for i in range(len(p.shape(x))) if i != axis), axis])
            y = _fn(p, "matmul", moved, _fn(p, "transpose", weights, (1, 0)))
            rank = len(p.shape(y))
            x = _fn(p, "transpose", y, [*range(axis), rank - 1, *range(axis, rank - 1)])
        if transform == "tf_crop_and_resize":
            shape = [1] * len(p.shape(x))
            shape[axis] = spec.out
            mask = inside.reshape(shape)
            inside_all = mask if inside_all is None else inside_all & mask
    if inside_all is not None and not inside_all.all():
        fill = p.full(p.shape(x), float(attrs.get("extrapolation_value", 0.0)), p.dtype(x), x)
        x = _fn(p, "where", p.tensor(np.broadcast_to(inside_all, p.shape(x)).copy(), x), x, fill)
    if p.dtype(x) != dtype:
        x = p.cast(_fn(p, "round", x), dtype)
    return x
