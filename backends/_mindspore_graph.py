"""MindSpore graph builder: a whole model rebuilt from a dataflow IR graph, as a trainable ``nn.Cell``.

:func:`rebuild` turns a dataflow graph (one lowered from ONNX by ``frontends.onnx.lower``, possibly
decomposed by the engine) into a :class:`GraphCell`. The cell holds one ``mindspore.Parameter`` per
graph param and its ``construct`` interprets the graph node by node in PyNative mode (see
``backends/_dataflow.py`` for how nodes are read as calls):

- a layer node (``Linear``, ``MatMul``, ``Conv``, ``ConvTranspose``, ``Embedding``) runs from its IR
  attributes (``lowrank_ir/_ir.py``) through :data:`LAYER_RUNNERS`, one function per op;
- an opaque node runs as its ONNX operator through :data:`ONNX_OPS`, one small function per op type,
  written with MindSpore's own functional ops (``mindspore.ops``).

Parameters. Every graph param becomes a ``Parameter`` named exactly as the IR names it (MindSpore
accepts any string, ``onnx::MatMul_123`` included, so no escaping is needed; ``GraphCell.param_names``
maps checkpoint names to IR names all the same, and keeps working when the cell is attached under a
parent that prefixes its names). The params of ``_dataflow.trainable_params`` (layer weights and
biases, floating-point initializers) have ``requires_grad=True``; the others (integer shapes and
indices, ``Constant`` node outputs, and the running mean and variance of a ``BatchNormalization``,
which PyTorch's ``GraphModule`` keeps as buffers) are ``requires_grad=False`` parameters, saved in
checkpoints like the rest, so ``save_checkpoint`` / ``load_param_into_net`` restore a whole model.
Params of a dtype MindSpore has no tensor type for (strings) and empty arrays (an empty ``Resize``
``roi``; checkpoints drop empty parameters) stay numpy arrays.

``weights=False`` builds the structure only: trainable parameters are zeros of the right shape and
dtype (the graph's arrays may be placeholders); the others still come from the graph (they are part
of the structure: shapes, indices, BN statistics), and a checkpoint loaded afterwards overwrites both.

Run-time semantics follow the ONNX operators (numpy broadcasting, negative indices, ``Slice`` ends
clamped like Python slices, ``Reshape``'s ``0``, integer ``Div`` truncating toward zero, ``Softmax``
over the flattened trailing axes before opset 13, ...). Values whose contents decide a shape
(``Reshape`` targets, ``Slice`` bounds, ``Resize`` scales, ``Pad`` amounts ...) are read eagerly
(``Tensor.asnumpy``): the cell runs in PyNative mode only. ``BatchNormalization`` always uses its
running statistics and ``Dropout`` is the identity (the graph is run as the inference graph it is;
training a rebuilt model trains its parameters through those inference semantics).

Where MindSpore's CPU kernels lack a dtype (float64 convolutions) the op computes in float32 and casts
back; where a MindSpore kernel is silently lenient (an out-of-range ``Gather`` index returns zeros) the
op checks its input first. Failures inside a node are re-raised as :class:`NodeError` naming the node
and its op (``while running node 'X' (Reshape): ...``) with the cause chained. MindSpore infers shapes
and runs kernels asynchronously: each node waits for its outputs' shapes so that shape errors are
raised by the node that caused them (a kernel failing later at run time would surface further on).

Ops: the layers above, and the ONNX ops listed by :func:`supported_ops` (every op of issue 7 and the
other standard ops torch's exporter, MindSpore's exporter and the PP-OCR models use).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from backends._dataflow import Call, calls, check_supported, onnx_shape, trainable_params
from lowrank_ir import Graph

__all__ = ["LAYER_RUNNERS", "ONNX_OPS", "GraphCell", "NodeError", "graph_params", "rebuild", "supported_ops"]

# ------------------------------------------------------------------------------------------- dtypes

#: ONNX ``TensorProto.DataType`` -> MindSpore dtype (``Cast``'s ``to``, ``ConstantOfShape``'s value).
ONNX_DTYPES: dict[int, Any] = {
    1: ms.float32, 2: ms.uint8, 3: ms.int8, 4: ms.uint16, 5: ms.int16, 6: ms.int32, 7: ms.int64, 9: ms.bool_,
    10: ms.float16, 11: ms.float64, 12: ms.uint32, 13: ms.uint64, 16: ms.bfloat16,
}

#: numpy dtype name -> MindSpore dtype, for params and inputs.
_NUMPY_DTYPES: dict[str, Any] = {
    "float32": ms.float32, "float16": ms.float16, "float64": ms.float64, "bfloat16": ms.bfloat16,
    "int8": ms.int8, "int16": ms.int16, "int32": ms.int32, "int64": ms.int64,
    "uint8": ms.uint8, "uint16": ms.uint16, "uint32": ms.uint32, "uint64": ms.uint64, "bool": ms.bool_,
}

_FLOATS = (ms.float16, ms.float32, ms.float64, ms.bfloat16)


def _is_float(tensor: ms.Tensor) -> bool:
    return tensor.dtype in _FLOATS


def _is_int(tensor: ms.Tensor) -> bool:
    return tensor.dtype in (ms.int8, ms.int16, ms.int32, ms.int64, ms.uint8, ms.uint16, ms.uint32, ms.uint64)


# ------------------------------------------------------------------------------------------ errors

class NodeError(RuntimeError):
    """A node failed while the graph ran; the message names the node and its op, the cause is chained."""


# ---------------------------------------------------------------------------------------- values

def _tensor(value: Any) -> ms.Tensor:
    """``value`` as a Tensor (numpy arrays and Python numbers are converted)."""
    if isinstance(value, ms.Tensor):
        return value
    return ms.Tensor(np.asarray(value))


def _array(value: Any) -> np.ndarray:
    """The contents of ``value`` as numpy (read eagerly: shape computations run in PyNative)."""
    if isinstance(value, ms.Tensor):
        return value.asnumpy()
    return np.asarray(value)


def _ints(value: Any) -> list[int]:
    return [int(v) for v in _array(value).reshape(-1)]


def _scalar(value: Any) -> Any:
    return _array(value).reshape(-1)[0].item()


def _arg(args: Sequence[Any], index: int) -> Any:
    """Optional input ``index`` (None when absent or skipped)."""
    return args[index] if index < len(args) else None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _axis(axis: int, rank: int) -> int:
    if not -rank <= axis < max(rank, 1):
        raise ValueError(f"axis {axis} is out of range for a tensor of rank {rank}")
    return axis % rank if rank else 0


def _pad_constant(x: ms.Tensor, begins: Sequence[int], ends: Sequence[int], value: Any = 0) -> ms.Tensor:
    """``x`` padded (negative amounts crop) by ``begins``/``ends`` per axis, with ``value``."""
    pairs = list(zip(begins, ends, strict=True))
    while pairs and pairs[0] == (0, 0):  # ops.pad lists the axes from the last one: drop unpadded leading axes
        pairs.pop(0)
    if not pairs:
        return x
    paddings = tuple(amount for pair in reversed(pairs) for amount in pair)
    return ops.pad(x, paddings, mode="constant", value=value)


def _pad_indices(length: int, begin: int, end: int, mode: str) -> np.ndarray:
    """Source indices of a ``reflect``/``edge``/``wrap`` padded axis (ONNX ``Pad`` modes)."""
    positions = np.arange(-begin, length + end)
    if mode == "edge":
        return np.clip(positions, 0, length - 1)
    if mode == "wrap":
        return np.mod(positions, length)
    if length == 1:
        return np.zeros_like(positions)
    period = 2 * (length - 1)
    folded = np.mod(positions, period)
    return np.where(folded < length, folded, period - folded)


def _pad(x: ms.Tensor, begins: Sequence[int], ends: Sequence[int], mode: str = "constant", value: Any = 0,
         ) -> ms.Tensor:
    """ONNX ``Pad`` of every axis of ``x`` (modes constant, reflect, edge, wrap; negative amounts crop)."""
    if mode == "constant":
        return _pad_constant(x, begins, ends, value)
    if mode not in ("reflect", "edge", "wrap"):
        raise ValueError(f"Pad mode {mode!r} is not one of constant, reflect, edge, wrap")
    crops = [min(b, 0) for b in begins], [min(e, 0) for e in ends]
    x = _pad_constant(x, *crops)
    for axis, (begin, end) in enumerate(zip(begins, ends, strict=True)):
        begin, end = max(begin, 0), max(end, 0)
        if begin or end:
            length = x.shape[axis]
            if mode == "reflect" and (begin >= length or end >= length):
                raise ValueError(f"reflect padding of {max(begin, end)} needs an axis longer than {length}")
            x = ops.gather(x, ms.Tensor(_pad_indices(length, begin, end, mode)), axis)
    return x


def _float32_kernel(function: Callable[..., ms.Tensor]) -> Callable[..., ms.Tensor]:
    """Run ``function`` in float32 when its tensor inputs are float64 (MindSpore's CPU kernels lack it)."""
    def run(*args: Any, **kwargs: Any) -> ms.Tensor:
        wide = any(isinstance(a, ms.Tensor) and a.dtype == ms.float64 for a in args)
        if not wide:
            return function(*args, **kwargs)
        narrowed = [ops.cast(a, ms.float32) if isinstance(a, ms.Tensor) and a.dtype == ms.float64 else a
                    for a in args]
        return ops.cast(function(*narrowed, **kwargs), ms.float64)
    run.__name__ = function.__name__
    run.__doc__ = function.__doc__
    return run


# ------------------------------------------------------------------------------------ convolutions

def _same_pads(sizes: Sequence[int], kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int],
               lower: bool) -> tuple[list[int], list[int]]:
    """ONNX ``SAME_UPPER``/``SAME_LOWER`` pads: output ceil(size / stride), odd extra at the end / beginning."""
    begins, ends = [], []
    for size, k, s, d in zip(sizes, kernel, strides, dilations, strict=True):
        out = -(-size // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        small, large = total // 2, total - total // 2
        begins.append(large if lower else small)
        ends.append(small if lower else large)
    return begins, ends


def _conv_pads(padding: Any, sizes: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
               dilations: Sequence[int]) -> tuple[list[int], list[int]]:
    """(begins, ends) of an IR ``padding``: ndim ints, 2*ndim ints (begin..., end...), or a mode name."""
    ndim = len(kernel)
    if isinstance(padding, str):
        if padding == "valid":
            return [0] * ndim, [0] * ndim
        if padding in ("same", "same_lower"):
            return _same_pads(sizes, kernel, strides, dilations, padding == "same_lower")
        raise ValueError(f"padding {padding!r} is not 'valid', 'same' or 'same_lower'")
    pads = [int(p) for p in padding]
    if len(pads) == ndim:
        return pads, list(pads)
    if len(pads) == 2 * ndim:
        return pads[:ndim], pads[ndim:]
    raise ValueError(f"padding {tuple(padding)!r} has neither {ndim} nor {2 * ndim} entries")


def _onnx_padding(attrs: dict[str, Any], ndim: int) -> Any:
    """The IR form of an ONNX node's ``auto_pad``/``pads``."""
    auto_pad = _text(attrs.get("auto_pad", "NOTSET"))
    if auto_pad in ("NOTSET", ""):
        return tuple(attrs.get("pads", (0,) * (2 * ndim)))
    forms = {"VALID": "valid", "SAME_UPPER": "same", "SAME_LOWER": "same_lower"}
    if auto_pad not in forms:
        raise ValueError(f"auto_pad {auto_pad!r} is not one of NOTSET, VALID, SAME_UPPER, SAME_LOWER")
    return forms[auto_pad]


@_float32_kernel
def convolution(x: ms.Tensor, weight: ms.Tensor, bias: ms.Tensor | None, strides: Sequence[int], padding: Any,
                dilations: Sequence[int], groups: int, padding_mode: str = "zeros") -> ms.Tensor:
    """N-d (1, 2, 3) convolution; ``weight [out, in // groups, *kernel]``, ``padding`` in any IR form."""
    kernel = [int(k) for k in weight.shape[2:]]
    ndim = len(kernel)
    if x.ndim != ndim + 2:
        raise ValueError(f"a {ndim}-D convolution needs a rank-{ndim + 2} input, got shape {tuple(x.shape)}")
    strides, dilations = [int(s) for s in strides], [int(d) for d in dilations]
    begins, ends = _conv_pads(padding, x.shape[2:], kernel, strides, dilations)
    symmetric = begins == ends and padding_mode == "zeros"
    if not symmetric:
        modes = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}
        if padding_mode not in modes:
            raise ValueError(f"padding_mode {padding_mode!r} is not one of {sorted(modes)}")
        x = _pad(x, [0, 0, *begins], [0, 0, *ends], modes[padding_mode])
    amount = tuple(begins) if symmetric else (0,) * ndim
    pad_mode = "pad" if any(amount) else "valid"
    if ndim == 1:
        return ops.conv1d(x, weight, bias, strides[0], pad_mode, amount[0], dilations[0], groups)
    if ndim == 2:
        return ops.conv2d(x, weight, bias, tuple(strides), pad_mode, amount, tuple(dilations), groups)
    if ndim == 3:
        return ops.conv3d(x, weight, bias, tuple(strides), pad_mode, amount, tuple(dilations), groups)
    raise ValueError(f"a {ndim}-D convolution is not supported (1-D, 2-D and 3-D are)")


def _transposed_pads(padding: Any, sizes: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
                     dilations: Sequence[int], output_padding: Sequence[int],
                     output_shape: Sequence[int] | None) -> tuple[list[int], list[int]]:
    """(begins, ends) cropped from a transposed convolution's full output (ONNX ``ConvTranspose`` rules)."""
    if output_shape is None and padding not in ("same", "same_lower"):
        return _conv_pads(padding, sizes, kernel, strides, dilations)
    if output_shape is None:  # SAME: the output is input * stride
        output_shape = [size * s for size, s in zip(sizes, strides, strict=True)]
    upper = padding == "same"  # the odd extra at the end; at the beginning otherwise (the spec's rule)
    begins, ends = [], []
    for i in range(len(kernel)):
        full = strides[i] * (sizes[i] - 1) + output_padding[i] + (kernel[i] - 1) * dilations[i] + 1
        total = full - int(output_shape[i])
        small, large = total // 2, total - total // 2
        begins.append(small if upper else large)
        ends.append(large if upper else small)
    return begins, ends


@_float32_kernel
def transposed_convolution(x: ms.Tensor, weight: ms.Tensor, bias: ms.Tensor | None, strides: Sequence[int],
                           padding: Any, dilations: Sequence[int], groups: int, output_padding: Sequence[int],
                           output_shape: Sequence[int] | None = None) -> ms.Tensor:
    """N-d (1, 2, 3) transposed convolution; ``weight [in, out // groups, *kernel]``.

    The full output (no padding) is computed, then ``pads`` are cropped and ``output_padding`` added
    at the end: those positions receive no input, only the bias.
    """
    kernel = [int(k) for k in weight.shape[2:]]
    ndim = len(kernel)
    if x.ndim != ndim + 2:
        raise ValueError(f"a {ndim}-D transposed convolution needs a rank-{ndim + 2} input, got {tuple(x.shape)}")
    strides, dilations = [int(s) for s in strides], [int(d) for d in dilations]
    output_padding = [int(p) for p in output_padding] or [0] * ndim
    sizes = [int(s) for s in x.shape[2:]]
    begins, ends = _transposed_pads(padding, sizes, kernel, strides, dilations, output_padding, output_shape)
    channels = int(weight.shape[1]) * groups
    full = [s * (n - 1) + (k - 1) * d + 1 for s, n, k, d in zip(strides, sizes, kernel, dilations, strict=True)]
    if ndim == 1:
        primitive = ops.Conv2DTranspose(channels, (1, kernel[0]), pad_mode="valid", stride=(1, strides[0]),
                                        dilation=(1, dilations[0]), group=groups)
        y = primitive(ops.expand_dims(x, 2), ops.expand_dims(weight, 2), (x.shape[0], channels, 1, full[0]))
        y = ops.squeeze(y, 2)
    elif ndim == 2:
        primitive = ops.Conv2DTranspose(channels, tuple(kernel), pad_mode="valid", stride=tuple(strides),
                                        dilation=tuple(dilations), group=groups)
        y = primitive(x, weight, (x.shape[0], channels, *full))
    elif ndim == 3:
        primitive = ops.Conv3DTranspose(int(x.shape[1]), channels, tuple(kernel), pad_mode="valid",
                                        stride=tuple(strides), dilation=tuple(dilations), group=groups)
        y = primitive(x, weight)
    else:
        raise ValueError(f"a {ndim}-D transposed convolution is not supported (1-D, 2-D and 3-D are)")
    tails = [extra - end for extra, end in zip(output_padding, ends, strict=True)]
    y = _pad_constant(y, [0, 0, *(-b for b in begins)], [0, 0, *tails])
    return y if bias is None else ops.bias_add(y, bias)


# -------------------------------------------------------------------------------------- registries

@dataclass(slots=True)
class Context:
    """What an op function may need beyond its attributes and inputs."""

    opset: int
    outputs: list[str]


OpFunction = Callable[[Context, dict[str, Any], list[Any]], Any]
LayerFunction = Callable[[Context, dict[str, Any], ms.Tensor, ms.Tensor, "ms.Tensor | None"], ms.Tensor]

#: ONNX op type -> the function running it: ``(context, ONNX attrs, inputs in operator order)``.
ONNX_OPS: dict[str, OpFunction] = {}

#: IR layer op -> the function running it: ``(context, IR attrs, x, weight, bias)``.
LAYER_RUNNERS: dict[str, LayerFunction] = {}


def onnx_op(*names: str) -> Callable[[OpFunction], OpFunction]:
    def register(function: OpFunction) -> OpFunction:
        for name in names:
            ONNX_OPS[name] = function
        return function
    return register


def layer(name: str) -> Callable[[LayerFunction], LayerFunction]:
    def register(function: LayerFunction) -> LayerFunction:
        LAYER_RUNNERS[name] = function
        return function
    return register


def supported_ops() -> list[str]:
    """The ONNX op types a :class:`GraphCell` can run, sorted."""
    return sorted(ONNX_OPS)


# ------------------------------------------------------------------------------------------ layers

def _scaled(y: ms.Tensor, attrs: dict[str, Any], bias: ms.Tensor | None) -> ms.Tensor:
    """The layer output ``alpha · y + beta · bias`` (ONNX ``Gemm``), then its activation if any."""
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    if alpha != 1.0:
        y = y * alpha
    if bias is not None:
        y = y + (bias * beta if beta != 1.0 else bias)
    activation = attrs.get("activation")
    if activation:
        functions = {"relu": ops.relu, "sigmoid": ops.sigmoid, "tanh": ops.tanh, "gelu": ops.gelu,
                     "relu6": ops.relu6}
        if str(activation).lower() not in functions:
            raise ValueError(f"activation {activation!r} is not one of {sorted(functions)}")
        y = functions[str(activation).lower()](y)
    return y


@layer("Linear")
def _linear(context: Context, attrs: dict[str, Any], x: ms.Tensor, weight: ms.Tensor,
            bias: ms.Tensor | None) -> ms.Tensor:
    return _scaled(ops.matmul(x, ops.transpose(weight, (1, 0))), attrs, bias)


@layer("MatMul")
def _matmul_layer(context: Context, attrs: dict[str, Any], x: ms.Tensor, weight: ms.Tensor,
                  bias: ms.Tensor | None) -> ms.Tensor:
    side = attrs.get("weight_side", "right")
    if side not in ("right", "left"):
        raise ValueError(f"weight_side {side!r} is not 'right' or 'left'")
    y = ops.matmul(x, weight) if side == "right" else ops.matmul(weight, x)
    if bias is not None and side == "left":  # the features are the second-to-last axis
        bias = ops.reshape(bias, (-1, 1))
    return _scaled(y, attrs, bias)


@layer("Conv")
def _conv_layer(context: Context, attrs: dict[str, Any], x: ms.Tensor, weight: ms.Tensor,
                bias: ms.Tensor | None) -> ms.Tensor:
    if attrs.get("data_format", "NCHW") not in ("NCW", "NCHW", "NCDHW"):
        raise ValueError(f"data_format {attrs['data_format']!r}: only channels-first convolutions are rebuilt")
    return convolution(x, weight, bias, attrs["stride"], attrs["padding"], attrs["dilation"], int(attrs["groups"]),
                       attrs.get("padding_mode", "zeros"))


@layer("ConvTranspose")
def _conv_transpose_layer(context: Context, attrs: dict[str, Any], x: ms.Tensor, weight: ms.Tensor,
                          bias: ms.Tensor | None) -> ms.Tensor:
    if attrs.get("padding_mode", "zeros") != "zeros":
        raise ValueError(f"padding_mode {attrs['padding_mode']!r}: transposed convolutions pad with zeros only")
    output_padding = attrs.get("output_padding") or (0,) * len(attrs["kernel_size"])
    return transposed_convolution(x, weight, bias, attrs["stride"], attrs["padding"], attrs["dilation"],
                                  int(attrs["groups"]), output_padding)


def _normalized_indices(indices: Any, size: int) -> ms.Tensor:
    """Indices checked against ``size`` and with negative ones counted from the end (ONNX ``Gather``).

    Read eagerly: MindSpore's CPU gather returns zeros for an index out of range, where ONNX fails.
    """
    array = _array(indices)
    if array.size and (int(array.min()) < -size or int(array.max()) >= size):
        raise ValueError(f"indices range over [{int(array.min())}, {int(array.max())}], out of [{-size}, {size - 1}] "
                         f"for an axis of {size}")
    return ms.Tensor(np.where(array < 0, array + size, array).astype(array.dtype))


@layer("Embedding")
def _embedding(context: Context, attrs: dict[str, Any], ids: ms.Tensor, weight: ms.Tensor,
               bias: ms.Tensor | None) -> ms.Tensor:
    return ops.gather(weight, _normalized_indices(ids, int(weight.shape[0])), 0)


# ------------------------------------------------------------------------------ ONNX: elementwise

def _binary(function: Callable[[ms.Tensor, ms.Tensor], ms.Tensor]) -> OpFunction:
    def run(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
        return function(_tensor(args[0]), _tensor(args[1]))
    return run


def _unary(function: Callable[[ms.Tensor], ms.Tensor]) -> OpFunction:
    def run(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
        return function(_tensor(args[0]))
    return run


for _name, _function in {"Add": ops.add, "Sub": ops.sub, "Mul": ops.mul, "Equal": ops.equal, "Less": ops.less,
                         "Greater": ops.greater, "LessOrEqual": ops.less_equal, "GreaterOrEqual": ops.greater_equal,
                         "And": ops.logical_and, "Or": ops.logical_or, "Xor": ops.logical_xor,
                         "BitwiseAnd": ops.bitwise_and, "BitwiseOr": ops.bitwise_or,
                         "BitwiseXor": ops.bitwise_xor}.items():
    ONNX_OPS[_name] = _binary(_function)

for _name, _function in {"Sqrt": ops.sqrt, "Exp": ops.exp, "Log": ops.log, "Erf": ops.erf, "Relu": ops.relu,
                         "Sigmoid": ops.sigmoid, "Tanh": ops.tanh, "Abs": ops.abs, "Neg": ops.neg,
                         "Floor": ops.floor, "Ceil": ops.ceil, "Round": ops.round, "Sign": ops.sign,
                         "Reciprocal": ops.reciprocal, "Sin": ops.sin, "Cos": ops.cos, "Not": ops.logical_not,
                         "IsNaN": ops.isnan, "Softplus": ops.softplus, "Tan": ops.tan, "Asin": ops.asin,
                         "Acos": ops.acos, "Atan": ops.atan, "Sinh": ops.sinh, "Cosh": ops.cosh, "Asinh": ops.asinh,
                         "Acosh": ops.acosh, "Atanh": ops.atanh, "BitwiseNot": ops.invert}.items():
    ONNX_OPS[_name] = _unary(_function)
del _name, _function


@onnx_op("Div")
def _div(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    a, b = _tensor(args[0]), _tensor(args[1])
    if _is_int(a):  # ONNX integer division truncates toward zero
        return ops.div(a, b, rounding_mode="trunc")
    return ops.div(a, b)


@onnx_op("Pow")
def _pow(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    base, exponent = _tensor(args[0]), _tensor(args[1])
    if exponent.dtype != base.dtype:  # the output has the base's type
        exponent = ops.cast(exponent, base.dtype)
    return ops.pow(base, exponent)


@onnx_op("Mod")
def _mod(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    a, b = _tensor(args[0]), _tensor(args[1])
    return ops.fmod(a, b) if int(attrs.get("fmod", 0)) else ops.remainder(a, b)


def _variadic(function: Callable[[ms.Tensor, ms.Tensor], ms.Tensor]) -> OpFunction:
    def run(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
        result = _tensor(args[0])
        for other in args[1:]:
            result = function(result, _tensor(other))
        return result
    return run


ONNX_OPS["Sum"] = _variadic(ops.add)
ONNX_OPS["Max"] = _variadic(ops.maximum)
ONNX_OPS["Min"] = _variadic(ops.minimum)


@onnx_op("Mean")
def _mean(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    return ONNX_OPS["Sum"](context, attrs, args) / len(args)


@onnx_op("IsInf")
def _is_inf(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    x = _tensor(args[0])
    positive, negative = int(attrs.get("detect_positive", 1)), int(attrs.get("detect_negative", 1))
    infinite = ops.isinf(x)
    if positive and negative:
        return infinite
    if positive:
        return ops.logical_and(infinite, x > 0)
    if negative:
        return ops.logical_and(infinite, x < 0)
    return ops.zeros_like(infinite)


@onnx_op("Identity")
def _identity(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    return _tensor(args[0])


@onnx_op("Dropout")
def _dropout(context: Context, attrs: dict[str, Any], args: list[Any]) -> tuple[ms.Tensor, ...]:
    """Inference: the identity, and an all-true mask if the node asks for one."""
    x = _tensor(args[0])
    if len(context.outputs) > 1 and context.outputs[1]:
        return x, ops.ones(x.shape, ms.bool_)
    return (x,)


@onnx_op("LeakyRelu")
def _leaky_relu(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    return ops.leaky_relu(_tensor(args[0]), float(attrs.get("alpha", 0.01)))


@onnx_op("PRelu")
def _prelu(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    x, slope = _tensor(args[0]), _tensor(args[1])
    return ops.where(x < 0, x * slope, x)


@onnx_op("Elu")
def _elu(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    x = _tensor(args[0])
    alpha = float(attrs.get("alpha", 1.0))
    return ops.where(x < 0, (ops.exp(ops.minimum(x, ops.zeros_like(x))) - 1) * alpha, x)


@onnx_op("Selu")
def _selu(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    x = _tensor(args[0])
    alpha = float(attrs.get("alpha", 1.67326319217681884765625))
    gamma = float(attrs.get("gamma", 1.05070102214813232421875))
    return ops.where(x > 0, x, (ops.exp(ops.minimum(x, ops.zeros_like(x))) - 1) * alpha) * gamma


@onnx_op("Celu")
def _celu(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    x = _tensor(args[0])
    alpha = float(attrs.get("alpha", 1.0))
    negative = (ops.exp(ops.minimum(x, ops.zeros_like(x)) / alpha) - 1) * alpha
    return ops.where(x > 0, x, negative)


@onnx_op("BitShift")
def _bit_shift(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    x, y = _tensor(args[0]), _tensor(args[1])
    if _text(attrs["direction"]) == "LEFT":
        return ops.bitwise_left_shift(x, y)
    return ops.bitwise_right_shift(x, y)


@onnx_op("ThresholdedRelu")
def _thresholded_relu(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    x = _tensor(args[0])
    return ops.where(x > float(attrs.get("alpha", 1.0)), x, ops.zeros_like(x))


@onnx_op("Softsign")
def _softsign(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    x = _tensor(args[0])
    return x / (ops.abs(x) + 1)


@onnx_op("Mish")
def _mish(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    x = _tensor(args[0])
    return x * ops.tanh(ops.softplus(x))


@onnx_op("HardSigmoid")
def _hard_sigmoid(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    x = _tensor(args[0])
    return ops.clamp(x * float(attrs.get("alpha", 0.2)) + float(attrs.get("beta", 0.5)), 0.0, 1.0)


@onnx_op("HardSwish")
def _hard_swish(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    x = _tensor(args[0])
    return x * ops.clamp(x * (1.0 / 6.0) + 0.5, 0.0, 1.0)


@onnx_op("Gelu")
def _gelu(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    approximate = _text(attrs.get("approximate", "none"))
    if approximate not in ("none", "tanh"):
        raise ValueError(f"Gelu approximate={approximate!r} is not 'none' or 'tanh'")
    return ops.gelu(_tensor(args[0]), approximate=approximate)


@onnx_op("Clip")
def _clip(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    """Bounds as attributes (opset < 11) or optional inputs (11+)."""
    x = _tensor(args[0])
    low, high = _arg(args, 1), _arg(args, 2)
    if "min" in attrs or "max" in attrs:
        low, high = attrs.get("min"), attrs.get("max")
    if low is not None:
        x = ops.maximum(x, ops.cast(_tensor(low), x.dtype))
    if high is not None:
        x = ops.minimum(x, ops.cast(_tensor(high), x.dtype))
    return x


def _softmax_like(function: Callable[[ms.Tensor, int], ms.Tensor]) -> OpFunction:
    """Softmax/LogSoftmax: over ``axis`` (opset 13+), over the flattened axes from ``axis`` before."""
    def run(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
        x = _tensor(args[0])
        if context.opset >= 13:
            return function(x, _axis(int(attrs.get("axis", -1)), x.ndim))
        axis = _axis(int(attrs.get("axis", 1)), x.ndim)
        shape = x.shape
        flat = ops.reshape(x, (math.prod(shape[:axis]), math.prod(shape[axis:])))
        return ops.reshape(function(flat, 1), shape)
    return run


def _hardmax(x: ms.Tensor, axis: int) -> ms.Tensor:
    """1 at the first maximum along ``axis``, 0 elsewhere."""
    shape = [1] * x.ndim
    shape[axis] = int(x.shape[axis])
    positions = ms.Tensor(np.arange(shape[axis], dtype=np.int64).reshape(shape))
    first = ops.cast(ops.argmax(x, axis, True), ms.int64)
    return ops.cast(ops.equal(positions, first), x.dtype)


ONNX_OPS["Softmax"] = _softmax_like(lambda x, axis: ops.softmax(x, axis))
ONNX_OPS["LogSoftmax"] = _softmax_like(lambda x, axis: ops.log_softmax(x, axis))
ONNX_OPS["Hardmax"] = _softmax_like(_hardmax)


@onnx_op("Shrink")
def _shrink(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    x = _tensor(args[0])
    bias, lambd = float(attrs.get("bias", 0.0)), float(attrs.get("lambd", 0.5))
    zeros = ops.zeros_like(x)
    return ops.where(x < -lambd, x + bias, ops.where(x > lambd, x - bias, zeros))


@onnx_op("Where")
def _where(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    condition = _tensor(args[0])
    if condition.dtype != ms.bool_:
        condition = ops.cast(condition, ms.bool_)
    return ops.where(condition, _tensor(args[1]), _tensor(args[2]))


@onnx_op("Cast")
def _cast(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    to = int(attrs["to"])
    if to not in ONNX_DTYPES:
        raise ValueError(f"Cast to ONNX type {to} has no MindSpore dtype (supported: {sorted(ONNX_DTYPES)})")
    x = _tensor(args[0])
    return x if x.dtype == ONNX_DTYPES[to] else ops.cast(x, ONNX_DTYPES[to])


@onnx_op("CastLike")
def _cast_like(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    x, like = _tensor(args[0]), _tensor(args[1])
    return x if x.dtype == like.dtype else ops.cast(x, like.dtype)


# ---------------------------------------------------------------------------------- ONNX: linear

@onnx_op("MatMul")
def _matmul(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    return ops.matmul(_tensor(args[0]), _tensor(args[1]))


@onnx_op("Gemm")
def _gemm(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    a, b, c = _tensor(args[0]), _tensor(args[1]), _arg(args, 2)
    if int(attrs.get("transA", 0)):
        a = ops.transpose(a, (1, 0))
    if int(attrs.get("transB", 0)):
        b = ops.transpose(b, (1, 0))
    return _scaled(ops.matmul(a, b), attrs, None if c is None else _tensor(c))


@onnx_op("Conv")
def _conv(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    x, weight, bias = _tensor(args[0]), _tensor(args[1]), _arg(args, 2)
    ndim = weight.ndim - 2
    return convolution(x, weight, None if bias is None else _tensor(bias), attrs.get("strides", (1,) * ndim),
                       _onnx_padding(attrs, ndim), attrs.get("dilations", (1,) * ndim), int(attrs.get("group", 1)))


@onnx_op("ConvTranspose")
def _conv_transpose(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    x, weight, bias = _tensor(args[0]), _tensor(args[1]), _arg(args, 2)
    ndim = weight.ndim - 2
    output_shape = attrs.get("output_shape")
    if output_shape is not None and len(output_shape) == ndim + 2:
        output_shape = output_shape[2:]
    padding = _onnx_padding(attrs, ndim)
    if output_shape is not None and not isinstance(padding, str):
        padding = "same_lower"  # pads are ignored; the split follows the spec's non-SAME_UPPER rule
    return transposed_convolution(x, weight, None if bias is None else _tensor(bias), attrs.get("strides", (1,) * ndim),
                                  padding, attrs.get("dilations", (1,) * ndim), int(attrs.get("group", 1)),
                                  attrs.get("output_padding", (0,) * ndim), output_shape)


# ----------------------------------------------------------------------------- ONNX: normalization

@onnx_op("BatchNormalization")
def _batch_norm(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    """Inference mode: the running statistics normalize (``training_mode`` is not honoured)."""
    x = _tensor(args[0])
    scale, offset, mean, var = (_tensor(a) for a in args[1:5])
    epsilon = float(attrs.get("epsilon", 1e-5))
    if 2 <= x.ndim <= 4 and x.dtype in (ms.float16, ms.float32):  # MindSpore's kernel (ranks 2 to 4)
        return ops.batch_norm(x, mean, var, scale, offset, False, 0.9, epsilon)
    shape = (-1,) + (1,) * (x.ndim - 2)
    factor = ops.reshape(scale / ops.sqrt(var + epsilon), shape)
    return (x - ops.reshape(mean, shape)) * factor + ops.reshape(offset, shape)


@onnx_op("LayerNormalization")
def _layer_norm(context: Context, attrs: dict[str, Any], args: list[Any]) -> tuple[ms.Tensor, ...]:
    """Normalize over the axes from ``axis`` on; computed in float32 for half inputs (``stash_type``)."""
    x, scale, bias = _tensor(args[0]), _tensor(args[1]), _arg(args, 2)
    dtype = x.dtype
    if dtype in (ms.float16, ms.bfloat16):
        x, scale = ops.cast(x, ms.float32), ops.cast(scale, ms.float32)
        bias = None if bias is None else ops.cast(_tensor(bias), ms.float32)
    axis = _axis(int(attrs.get("axis", -1)), x.ndim)
    axes = tuple(range(axis, x.ndim))
    mean = ops.mean(x, axes, keep_dims=True)
    centered = x - mean
    inverse = ops.rsqrt(ops.mean(centered * centered, axes, keep_dims=True) + float(attrs.get("epsilon", 1e-5)))
    y = centered * inverse * scale
    if bias is not None:
        y = y + _tensor(bias)
    return (y if y.dtype == dtype else ops.cast(y, dtype)), mean, inverse


@onnx_op("LRN")
def _lrn(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    """Local response normalization: ``x / (bias + alpha / size * window sum of x²) ** beta`` over channels."""
    x = _tensor(args[0])
    size = int(attrs["size"])
    alpha, beta, bias = float(attrs.get("alpha", 1e-4)), float(attrs.get("beta", 0.75)), float(attrs.get("bias", 1.0))
    squares = _pad_constant(x * x, [0, (size - 1) // 2] + [0] * (x.ndim - 2),
                            [0, size - 1 - (size - 1) // 2] + [0] * (x.ndim - 2))
    shape = tuple(int(s) for s in x.shape)
    pieces = [ops.strided_slice(squares, (0, offset) + (0,) * (x.ndim - 2), (shape[0], offset + shape[1], *shape[2:]),
                                (1,) * x.ndim) for offset in range(size)]
    total = pieces[0]
    for piece in pieces[1:]:
        total = total + piece
    return x / ops.pow(total * (alpha / size) + bias, beta)


@onnx_op("InstanceNormalization")
def _instance_norm(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    x, scale, bias = _tensor(args[0]), _tensor(args[1]), _tensor(args[2])
    axes = tuple(range(2, x.ndim))
    shape = (-1,) + (1,) * (x.ndim - 2)
    centered = x - ops.mean(x, axes, keep_dims=True)
    inverse = ops.rsqrt(ops.mean(centered * centered, axes, keep_dims=True) + float(attrs.get("epsilon", 1e-5)))
    return centered * inverse * ops.reshape(scale, shape) + ops.reshape(bias, shape)


# ---------------------------------------------------------------------------------- ONNX: pooling

@dataclass(slots=True)
class _Windows:
    """Where the windows of an ONNX pool fall: output sizes, pads, and the ceil-mode overhang per axis."""

    outputs: list[int]
    begins: list[int]
    ends: list[int]
    overhang: list[int]


def _pool_windows(attrs: dict[str, Any], sizes: Sequence[int]) -> _Windows:
    kernel = [int(k) for k in attrs["kernel_shape"]]
    ndim = len(kernel)
    strides = [int(s) for s in attrs.get("strides", (1,) * ndim)]
    dilations = [int(d) for d in attrs.get("dilations", (1,) * ndim)]
    padding = _onnx_padding(attrs, ndim)
    if isinstance(padding, str) and padding != "valid":
        begins, ends = _same_pads(sizes, kernel, strides, dilations, padding == "same_lower")
    else:
        begins, ends = _conv_pads(padding, sizes, kernel, strides, dilations)
    ceil = bool(int(attrs.get("ceil_mode", 0)))
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
    return _Windows(outputs, begins, ends, overhang)


def _window_ranges(attrs: dict[str, Any], windows: _Windows) -> list[list[tuple[int, int, int]]]:
    """For each kernel offset, the (start, stop, step) per spatial axis of the positions its windows read."""
    kernel = [int(k) for k in attrs["kernel_shape"]]
    ndim = len(kernel)
    strides = [int(s) for s in attrs.get("strides", (1,) * ndim)]
    dilations = [int(d) for d in attrs.get("dilations", (1,) * ndim)]
    ranges = []
    for offsets in itertools.product(*(range(k) for k in kernel)):
        starts = [o * d for o, d in zip(offsets, dilations, strict=True)]
        ranges.append([(start, start + (n - 1) * s + 1, s)
                       for start, n, s in zip(starts, windows.outputs, strides, strict=True)])
    return ranges


def _window_slices(x: ms.Tensor, attrs: dict[str, Any], windows: _Windows) -> list[ms.Tensor]:
    """For each kernel offset, the strided slice of (padded) ``x`` its windows read."""
    lead = tuple(int(s) for s in x.shape[:2])
    slices = []
    for axes in _window_ranges(attrs, windows):
        begin, end, step = zip(*axes, strict=True)
        slices.append(ops.strided_slice(x, (0, 0, *begin), (*lead, *end), (1, 1, *step)))
    return slices


def _lowest(dtype: Any) -> float | int:
    return -math.inf if dtype in _FLOATS else int(np.iinfo(ms.dtype_to_nptype(dtype)).min)


def _flat_positions(shape: Sequence[int], column_major: bool) -> np.ndarray:
    """Each element's index in the flattened tensor (spatial axes in column-major order if asked): MaxPool's Indices."""
    spatial = [int(s) for s in shape[2:]]
    count = math.prod(spatial)
    if column_major:
        inner = np.arange(count, dtype=np.int64).reshape(spatial[::-1]).transpose(tuple(reversed(range(len(spatial)))))
    else:
        inner = np.arange(count, dtype=np.int64).reshape(spatial)
    outer = np.arange(int(shape[0]) * int(shape[1]), dtype=np.int64).reshape(int(shape[0]), int(shape[1]))
    return outer.reshape(outer.shape + (1,) * len(spatial)) * count + inner


@onnx_op("MaxPool")
def _max_pool(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor | tuple[ms.Tensor, ms.Tensor]:
    """The maximum over each window; the optional Indices output holds the first maximum's flat position."""
    x = _tensor(args[0])
    windows = _pool_windows(attrs, x.shape[2:])
    ends = [e + o for e, o in zip(windows.ends, windows.overhang, strict=True)]
    padded = _pad_constant(x, [0, 0, *windows.begins], [0, 0, *ends], _lowest(x.dtype))
    slices = _window_slices(padded, attrs, windows)
    result = slices[0]
    if not (len(context.outputs) > 1 and context.outputs[1]):
        for other in slices[1:]:
            result = ops.maximum(result, other)
        return result
    positions = np.pad(_flat_positions(x.shape, bool(int(attrs.get("storage_order", 0)))),
                       [(0, 0), (0, 0), *zip(windows.begins, ends, strict=True)], constant_values=-1)
    ranges = _window_ranges(attrs, windows)
    found = None
    for piece, axes in zip(slices, ranges, strict=True):
        where = ms.Tensor(positions[(slice(None), slice(None), *(slice(*axis) for axis in axes))])
        if found is None:
            found = where
            continue
        better = piece > result  # strictly: the first maximum in scan order wins
        found = ops.where(better, where, found)
        result = ops.where(better, piece, result)
    return result, found


@onnx_op("AveragePool")
def _average_pool(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    """Window sums divided by the number of elements counted (pads only with ``count_include_pad``)."""
    x = _tensor(args[0])
    sizes = list(x.shape[2:])
    windows = _pool_windows(attrs, sizes)
    ends = [e + o for e, o in zip(windows.ends, windows.overhang, strict=True)]
    padded = _pad_constant(x, [0, 0, *windows.begins], [0, 0, *ends], 0)
    slices = _window_slices(padded, attrs, windows)
    total = slices[0]
    for other in slices[1:]:
        total = total + other
    if int(attrs.get("count_include_pad", 0)):
        counted = np.pad(np.ones([s + b + e for s, b, e in zip(sizes, windows.begins, windows.ends, strict=True)]),
                         [(0, o) for o in windows.overhang])
    else:
        counted = np.pad(np.ones(sizes), list(zip(windows.begins, ends, strict=True)))
    counts = sum(counted[tuple(slice(*axis) for axis in axes)] for axes in _window_ranges(attrs, windows))
    return total / ms.Tensor(np.asarray(counts, dtype=ms.dtype_to_nptype(x.dtype)))


@onnx_op("GlobalAveragePool")
def _global_average_pool(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    x = _tensor(args[0])
    return ops.mean(x, tuple(range(2, x.ndim)), keep_dims=True)


@onnx_op("GlobalMaxPool")
def _global_max_pool(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    x = _tensor(args[0])
    return ops.amax(x, tuple(range(2, x.ndim)), keepdims=True)


# --------------------------------------------------------------------------------- ONNX: reductions

def _reduce_axes(context: Context, attrs: dict[str, Any], args: list[Any], rank: int) -> tuple[int, ...] | None:
    """The axes to reduce (attribute or input form); None means no reduction (``noop_with_empty_axes``)."""
    axes = attrs.get("axes")
    if axes is None and _arg(args, 1) is not None:
        axes = _ints(args[1])
    if not axes:
        return None if int(attrs.get("noop_with_empty_axes", 0)) else tuple(range(rank))
    return tuple(sorted({_axis(int(a), rank) for a in axes}))


def _reduction(function: Callable[[ms.Tensor, tuple[int, ...], bool], ms.Tensor]) -> OpFunction:
    def run(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
        x = _tensor(args[0])
        axes = _reduce_axes(context, attrs, args, x.ndim)
        if axes is None:
            return x
        return function(x, axes, bool(int(attrs.get("keepdims", 1))))
    return run


ONNX_OPS["ReduceMean"] = _reduction(lambda x, axes, keep: ops.mean(x, axes, keep_dims=keep))
ONNX_OPS["ReduceSum"] = _reduction(lambda x, axes, keep: ops.sum(x, axes, keepdim=keep))
ONNX_OPS["ReduceMax"] = _reduction(lambda x, axes, keep: ops.amax(x, axes, keepdims=keep))
ONNX_OPS["ReduceMin"] = _reduction(lambda x, axes, keep: ops.amin(x, axes, keepdims=keep))
ONNX_OPS["ReduceProd"] = _reduction(lambda x, axes, keep: ops.prod(x, axes, keep_dims=keep))
ONNX_OPS["ReduceSumSquare"] = _reduction(lambda x, axes, keep: ops.sum(x * x, axes, keepdim=keep))
ONNX_OPS["ReduceL1"] = _reduction(lambda x, axes, keep: ops.sum(ops.abs(x), axes, keepdim=keep))
ONNX_OPS["ReduceL2"] = _reduction(lambda x, axes, keep: ops.sqrt(ops.sum(x * x, axes, keepdim=keep)))
ONNX_OPS["ReduceLogSumExp"] = _reduction(lambda x, axes, keep: ops.logsumexp(x, axes, keep))
ONNX_OPS["ReduceLogSum"] = _reduction(lambda x, axes, keep: ops.log(ops.sum(x, axes, keepdim=keep)))


def _arg_reduction(function: Callable[..., ms.Tensor]) -> OpFunction:
    def run(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
        x = _tensor(args[0])
        axis = _axis(int(attrs.get("axis", 0)), x.ndim)
        keep = bool(int(attrs.get("keepdims", 1)))
        if int(attrs.get("select_last_index", 0)):  # the first extreme of the reversed axis
            found = ops.cast(function(ops.flip(x, (axis,)), axis, keep), ms.int64)
            return (x.shape[axis] - 1) - found
        return ops.cast(function(x, axis, keep), ms.int64)
    return run


ONNX_OPS["ArgMax"] = _arg_reduction(lambda x, axis, keep: ops.argmax(x, axis, keep))
ONNX_OPS["ArgMin"] = _arg_reduction(lambda x, axis, keep: ops.argmin(x, axis, keep))


@onnx_op("CumSum")
def _cumsum(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    x = _tensor(args[0])
    axis = _axis(_ints(args[1])[0], x.ndim)
    reverse = bool(int(attrs.get("reverse", 0)))
    if reverse:
        x = ops.flip(x, (axis,))
    y = ops.cumsum(x, axis)
    if int(attrs.get("exclusive", 0)):
        y = y - x
    return ops.flip(y, (axis,)) if reverse else y


# ---------------------------------------------------------------------------------- ONNX: shapes

@onnx_op("Shape")
def _shape(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    shape = list(_tensor(args[0]).shape)
    start, end = attrs.get("start", 0), attrs.get("end")
    return ms.Tensor(np.array(shape[slice(int(start), None if end is None else int(end))], dtype=np.int64))


@onnx_op("Size")
def _size(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    return ms.Tensor(np.array(math.prod(_tensor(args[0]).shape), dtype=np.int64))


def _reshape_target(shape: Sequence[int], target: Sequence[int]) -> tuple[int, ...]:
    """``target`` (``0`` already resolved) with its ``-1`` inferred; ``ValueError`` when it cannot hold ``shape``."""
    count = math.prod(shape)
    known = math.prod(d for d in target if d != -1)
    unknown = [i for i, d in enumerate(target) if d == -1]
    if len(unknown) > 1 or any(d < -1 for d in target):
        raise ValueError(f"reshape target {list(target)} has more than one -1 or a negative size")
    if unknown and known and count % known == 0:
        target = [count // known if d == -1 else d for d in target]
    if math.prod(target) != count or (unknown and not known):
        raise ValueError(f"cannot reshape a tensor of shape {list(shape)} ({count} elements) to {list(target)}")
    return tuple(int(d) for d in target)


@onnx_op("Reshape")
def _reshape(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    x = _tensor(args[0])
    target = onnx_shape(_ints(args[1]), x.shape, allow_zero=bool(int(attrs.get("allowzero", 0))))
    return ops.reshape(x, _reshape_target(tuple(x.shape), target))


@onnx_op("Flatten")
def _flatten(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    x = _tensor(args[0])
    axis = int(attrs.get("axis", 1))
    axis = axis + x.ndim if axis < 0 else axis
    return ops.reshape(x, (math.prod(x.shape[:axis]), math.prod(x.shape[axis:])))


@onnx_op("Transpose")
def _transpose(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    x = _tensor(args[0])
    perm = attrs.get("perm") or tuple(reversed(range(x.ndim)))
    return ops.transpose(x, tuple(int(p) for p in perm))


@onnx_op("Squeeze")
def _squeeze(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    """Axes as an attribute (opset < 13) or an optional input; none: every axis of size 1."""
    x = _tensor(args[0])
    axes = attrs.get("axes")
    if axes is None and _arg(args, 1) is not None:
        axes = _ints(args[1])
    if axes is None:
        drop = {i for i, size in enumerate(x.shape) if size == 1}
    else:
        drop = {_axis(int(a), x.ndim) for a in axes}
    wrong = [i for i in drop if x.shape[i] != 1]
    if wrong:
        raise ValueError(f"cannot squeeze axes {wrong} of shape {tuple(x.shape)}: their size is not 1")
    return ops.reshape(x, tuple(size for i, size in enumerate(x.shape) if i not in drop))


@onnx_op("Unsqueeze")
def _unsqueeze(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    """Axes as an attribute (opset < 13) or an input, counted in the output's rank."""
    x = _tensor(args[0])
    axes = attrs.get("axes")
    if axes is None:
        axes = _ints(args[1])
    rank = x.ndim + len(axes)
    inserted = {_axis(int(a), rank) for a in axes}
    sizes = iter(x.shape)
    return ops.reshape(x, tuple(1 if i in inserted else next(sizes) for i in range(rank)))


@onnx_op("Concat")
def _concat(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    tensors = [_tensor(a) for a in args if a is not None]
    axis = _axis(int(attrs["axis"]), tensors[0].ndim)
    tensors = [t for t in tensors if t.shape[axis] != 0] or tensors[:1]
    return tensors[0] if len(tensors) == 1 else ops.concat(tensors, axis)


@onnx_op("Split")
def _split(context: Context, attrs: dict[str, Any], args: list[Any]) -> tuple[ms.Tensor, ...]:
    """Sizes from the ``split`` attribute (< 13) or input, else equal parts (``num_outputs`` from 18)."""
    x = _tensor(args[0])
    axis = _axis(int(attrs.get("axis", 0)), x.ndim)
    sizes = attrs.get("split")
    if sizes is None and _arg(args, 1) is not None:
        sizes = _ints(args[1])
    length = int(x.shape[axis])
    if not sizes:
        parts = int(attrs.get("num_outputs", len(context.outputs)))
        if "num_outputs" in attrs:
            chunk = -(-length // parts)
            sizes = [min(chunk, length - i * chunk) for i in range(parts)]
        else:
            if length % parts:
                raise ValueError(f"an axis of {length} does not split into {parts} equal parts")
            sizes = [length // parts] * parts
    sizes = [int(s) for s in sizes]
    if sum(sizes) != length:
        raise ValueError(f"split sizes {sizes} do not add up to the axis length {length}")
    return tuple(ops.split(x, sizes, axis))


def _slice_bounds(length: int, start: int, end: int, step: int) -> tuple[int, int, int]:
    """ONNX ``Slice`` clamping, which is Python's slice clamping (INT64 max/min ends included)."""
    if step == 0:
        raise ValueError("Slice steps cannot be 0")
    return slice(start, end, step).indices(length)


@onnx_op("Slice")
def _slice(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    """Bounds as attributes (opset < 10) or inputs (starts, ends, axes, steps)."""
    x = _tensor(args[0])
    if "starts" in attrs:
        starts, ends, axes = list(attrs["starts"]), list(attrs["ends"]), attrs.get("axes")
        steps = None
    else:
        starts, ends = _ints(args[1]), _ints(args[2])
        axes = None if _arg(args, 3) is None else _ints(args[3])
        steps = None if _arg(args, 4) is None else _ints(args[4])
    axes = list(range(len(starts))) if axes is None else [_axis(int(a), x.ndim) for a in axes]
    steps = [1] * len(starts) if steps is None else steps
    begin, stop, stride = [0] * x.ndim, list(x.shape), [1] * x.ndim
    backwards = []
    for axis, start, end, step in zip(axes, starts, ends, steps, strict=True):
        begin[axis], stop[axis], stride[axis] = _slice_bounds(int(x.shape[axis]), int(start), int(end), int(step))
        if stride[axis] < 0:
            backwards.append(axis)
    for axis in backwards:  # negative steps: gather the explicit positions
        positions = np.arange(begin[axis], stop[axis], stride[axis], dtype=np.int64)
        x = ops.gather(x, ms.Tensor(positions), axis)
        begin[axis], stop[axis], stride[axis] = 0, len(positions), 1
    if begin == [0] * x.ndim and stop == list(x.shape) and stride == [1] * x.ndim:
        return x
    if any(b >= e for b, e in zip(begin, stop, strict=True)):
        shape = tuple(max(len(range(b, e, s)), 0) for b, e, s in zip(begin, stop, stride, strict=True))
        return ops.zeros(shape, x.dtype)
    return ops.strided_slice(x, tuple(begin), tuple(stop), tuple(stride))


@onnx_op("Gather")
def _gather(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    x = _tensor(args[0])
    axis = _axis(int(attrs.get("axis", 0)), x.ndim)
    return ops.gather(x, _normalized_indices(args[1], int(x.shape[axis])), axis)


@onnx_op("GatherElements")
def _gather_elements(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    x = _tensor(args[0])
    axis = _axis(int(attrs.get("axis", 0)), x.ndim)
    return ops.gather_elements(x, axis, _normalized_indices(args[1], int(x.shape[axis])))


@onnx_op("GatherND")
def _gather_nd(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    """``batch_dims`` leading axes are shared: their coordinates are prepended to every index."""
    x, indices = _tensor(args[0]), _tensor(args[1])
    batch = int(attrs.get("batch_dims", 0))
    depth = int(indices.shape[-1])
    sizes = ms.Tensor(np.array(x.shape[batch:batch + depth], dtype=np.int64))
    indices = ops.cast(indices, ms.int64)
    indices = ops.where(indices < 0, indices + sizes, indices)
    if batch:
        lead = indices.shape[:-1]
        grids = np.meshgrid(*(np.arange(n) for n in lead[:batch]), indexing="ij")
        coordinates = np.stack([np.broadcast_to(g.reshape(g.shape + (1,) * (len(lead) - batch)), lead)
                                for g in grids], axis=-1).astype(np.int64)
        indices = ops.concat((ms.Tensor(coordinates), indices), -1)
    return ops.gather_nd(x, indices)


@onnx_op("Expand")
def _expand(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    x = _tensor(args[0])
    target = tuple(int(d) for d in np.broadcast_shapes(tuple(x.shape), tuple(_ints(args[1]))))
    return x if target == tuple(x.shape) else ops.broadcast_to(x, target)


@onnx_op("Tile")
def _tile(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    return ops.tile(_tensor(args[0]), tuple(_ints(args[1])))


def _tensor_attribute(value: Any) -> np.ndarray:
    """A ``TENSOR`` attribute (kept by the frontend as serialized bytes) as numpy."""
    from onnx import TensorProto, numpy_helper

    proto = TensorProto()
    proto.ParseFromString(value)
    return numpy_helper.to_array(proto)


@onnx_op("ConstantOfShape")
def _constant_of_shape(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    value = _tensor_attribute(attrs["value"]) if "value" in attrs else np.zeros(1, np.float32)
    shape = tuple(_ints(args[0]))
    return ms.Tensor(np.full(shape, value.reshape(-1)[0], dtype=value.dtype))


@onnx_op("Constant")
def _constant(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    """A ``Constant`` the frontend kept as a node (its dense ``value`` ones are graph params)."""
    if "value" in attrs:
        return ms.Tensor(_tensor_attribute(attrs["value"]))
    forms = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64, "value_ints": np.int64}
    for key, dtype in forms.items():
        if key in attrs:
            return ms.Tensor(np.array(attrs[key], dtype=dtype))
    raise ValueError(f"Constant with attributes {sorted(attrs)} is not supported (value, value_float(s), "
                     f"value_int(s) are)")


@onnx_op("Range")
def _range(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    start, limit, delta = (_array(a).reshape(()) for a in args[:3])
    return ms.Tensor(np.arange(start, limit, delta, dtype=start.dtype))


@onnx_op("Pad")
def _pad_op(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    """Pads as an attribute (opset < 11) or input, optional constant value and ``axes`` (18) inputs."""
    x = _tensor(args[0])
    mode = _text(attrs.get("mode", "constant"))
    if "pads" in attrs:
        pads, value, axes = [int(p) for p in attrs["pads"]], attrs.get("value", 0.0), None
    else:
        pads = _ints(args[1])
        value = 0 if _arg(args, 2) is None else _scalar(args[2])
        axes = None if _arg(args, 3) is None else [_axis(a, x.ndim) for a in _ints(args[3])]
    axes = list(range(x.ndim)) if axes is None else axes
    count = len(axes)
    if len(pads) != 2 * count:
        raise ValueError(f"pads {pads} do not hold 2 x {count} entries")
    begins, ends = [0] * x.ndim, [0] * x.ndim
    for index, axis in enumerate(axes):
        begins[axis], ends[axis] = pads[index], pads[count + index]
    if _is_float(x):
        value = float(value)
    elif x.dtype == ms.bool_:
        value = bool(value)
    else:
        value = int(value)
    return _pad(x, begins, ends, mode, value)


@onnx_op("Trilu")
def _trilu(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    x = _tensor(args[0])
    k = 0 if _arg(args, 1) is None else _ints(args[1])[0]
    rows, columns = int(x.shape[-2]), int(x.shape[-1])
    keep = np.triu(np.ones((rows, columns), bool), k) if int(attrs.get("upper", 1)) else \
        np.tril(np.ones((rows, columns), bool), k)
    return ops.where(ms.Tensor(keep), x, ops.zeros_like(x))


@onnx_op("DepthToSpace")
def _depth_to_space(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    x = _tensor(args[0])
    b = int(attrs["blocksize"])
    n, c, h, w = (int(s) for s in x.shape)
    if _text(attrs.get("mode", "DCR")) == "CRD":
        y = ops.transpose(ops.reshape(x, (n, c // (b * b), b, b, h, w)), (0, 1, 4, 2, 5, 3))
    else:
        y = ops.transpose(ops.reshape(x, (n, b, b, c // (b * b), h, w)), (0, 3, 4, 1, 5, 2))
    return ops.reshape(y, (n, c // (b * b), h * b, w * b))


@onnx_op("SpaceToDepth")
def _space_to_depth(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    x = _tensor(args[0])
    b = int(attrs["blocksize"])
    n, c, h, w = (int(s) for s in x.shape)
    y = ops.transpose(ops.reshape(x, (n, c, h // b, b, w // b, b)), (0, 3, 5, 1, 2, 4))
    return ops.reshape(y, (n, c * b * b, h // b, w // b))


@onnx_op("TopK")
def _topk(context: Context, attrs: dict[str, Any], args: list[Any]) -> tuple[ms.Tensor, ms.Tensor]:
    x = _tensor(args[0])
    k = _ints(args[1])[0] if _arg(args, 1) is not None else int(attrs["k"])  # the attribute before opset 10
    axis = _axis(int(attrs.get("axis", -1)), x.ndim)
    values, indices = ops.topk(x, k, axis, bool(int(attrs.get("largest", 1))), bool(int(attrs.get("sorted", 1))))
    return values, ops.cast(indices, ms.int64)


@onnx_op("OneHot")
def _one_hot(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    indices, values = ops.cast(_tensor(args[0]), ms.int64), _tensor(args[2])
    depth = int(_scalar(args[1]))
    axis = _axis(int(attrs.get("axis", -1)), indices.ndim + 1)
    indices = ops.where(indices < 0, indices + depth, indices)
    shape = [1] * (indices.ndim + 1)
    shape[axis] = depth
    classes = ms.Tensor(np.arange(depth, dtype=np.int64).reshape(shape))
    hot = ops.equal(ops.expand_dims(indices, axis), classes)
    return ops.where(hot, values[1], values[0])


@onnx_op("NonZero")
def _non_zero(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    """Data-dependent shape: computed eagerly."""
    array = _array(args[0])
    return ms.Tensor(np.stack(np.nonzero(array)).astype(np.int64).reshape(array.ndim, -1))


@onnx_op("ScatterND")
def _scatter_nd(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    x, updates = _tensor(args[0]), _tensor(args[2])
    indices = ops.cast(_tensor(args[1]), ms.int64)
    sizes = ms.Tensor(np.array(x.shape[:int(indices.shape[-1])], dtype=np.int64))
    indices = ops.where(indices < 0, indices + sizes, indices)
    functions = {"none": ops.tensor_scatter_update, "add": ops.tensor_scatter_add, "mul": ops.tensor_scatter_mul,
                 "max": ops.tensor_scatter_max, "min": ops.tensor_scatter_min}
    reduction = _text(attrs.get("reduction", "none"))
    if reduction not in functions:
        raise ValueError(f"ScatterND reduction {reduction!r} is not one of {sorted(functions)}")
    return functions[reduction](x, indices, updates)


@onnx_op("ScatterElements", "Scatter")
def _scatter_elements(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    x, updates = _tensor(args[0]), _tensor(args[2])
    axis = _axis(int(attrs.get("axis", 0)), x.ndim)
    indices = _normalized_indices(args[1], int(x.shape[axis]))
    reduction = _text(attrs.get("reduction", "none"))
    if reduction not in ("none", "add"):
        raise ValueError(f"ScatterElements reduction {reduction!r} is not supported (none, add are)")
    return ops.tensor_scatter_elements(x, indices, updates, axis, reduction)


# ---------------------------------------------------------------------------------- ONNX: einsum

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
        result = list(head) + (ellipsis if dots else []) + list(tail)
    else:  # implicit output: the broadcast axes, then the letters used once, in alphabetical order
        counts: dict[str, int] = {}
        for letters in expanded:
            for letter in letters:
                counts[letter] = counts.get(letter, 0) + 1
        result = ellipsis + sorted(c for c, n in counts.items() if n == 1 and c not in ellipsis)
    return expanded, result


def _sum_out(x: ms.Tensor, letters: list[str], keep: set[str]) -> tuple[ms.Tensor, list[str]]:
    drop = [i for i, letter in enumerate(letters) if letter not in keep]
    if not drop:
        return x, letters
    return ops.sum(x, tuple(drop)), [letter for letter in letters if letter in keep]


def _contract(a: ms.Tensor, left: list[str], b: ms.Tensor, right: list[str], keep: set[str],
              ) -> tuple[ms.Tensor, list[str]]:
    """Two operands contracted as one batched matmul: [batch, only-a, shared] x [batch, shared, only-b]."""
    a, left = _sum_out(a, left, keep | set(right))
    b, right = _sum_out(b, right, keep | set(left))
    batch = [c for c in left if c in right and c in keep]
    shared = [c for c in left if c in right and c not in keep]
    only_a = [c for c in left if c not in right]
    only_b = [c for c in right if c not in left]
    size = {c: int(n) for c, n in zip(left, a.shape, strict=True)}
    for c, n in zip(right, b.shape, strict=True):
        size[c] = max(size.get(c, 1), int(n))
    a = ops.transpose(a, tuple(left.index(c) for c in batch + only_a + shared))
    b = ops.transpose(b, tuple(right.index(c) for c in batch + shared + only_b))
    a = ops.broadcast_to(a, tuple(size[c] for c in batch + only_a + shared))
    b = ops.broadcast_to(b, tuple(size[c] for c in batch + shared + only_b))
    batch_size = math.prod(size[c] for c in batch)
    product = ops.matmul(ops.reshape(a, (batch_size, math.prod(size[c] for c in only_a), -1)),
                         ops.reshape(b, (batch_size, math.prod(size[c] for c in shared), -1)))
    letters = batch + only_a + only_b
    return ops.reshape(product, tuple(size[c] for c in letters)), letters


@onnx_op("Einsum")
def _einsum(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    """Operands summed over private axes, then contracted left to right by batched matmuls."""
    operands = [_tensor(a) for a in args]
    terms, output = _einsum_terms(_text(attrs["equation"]), [x.ndim for x in operands])
    result, letters = operands[0], terms[0]
    for index in range(1, len(operands)):
        later = set(output).union(*terms[index + 1:])
        result, letters = _contract(result, letters, operands[index], terms[index], later)
    result, letters = _sum_out(result, letters, set(output))
    if letters != output:
        result = ops.transpose(result, tuple(letters.index(c) for c in output))
    return result


# ---------------------------------------------------------------------------------- ONNX: resize

@dataclass(slots=True)
class _ResizeAxis:
    """How one axis is resampled: output length, the scale of the coordinate transform, roi bounds."""

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
        adjustment = f32(axis.out) / (scale * size)
        offset = size / 2 * (1 - adjustment)
        return offset + (out + f32(0.5)) / scale - f32(0.5)
    if mode == "tf_crop_and_resize":
        start, end = f32(axis.roi[0]), f32(axis.roi[1])
        if axis.out > 1:
            return start * (size - 1) + out * (end - start) * (size - 1) / f32(axis.out - 1)
        return np.full(axis.out, f32(0.5) * (start + end) * (size - 1), f32)
    raise ValueError(f"coordinate_transformation_mode {mode!r} is not supported")


def _nearest(x: np.ndarray, mode: str, scale: float) -> np.ndarray:
    """Source indices of nearest resampling; ``simple`` (opset < 11, ``Upsample``) rounds down, up when shrinking."""
    floor = np.floor(x)
    if mode == "simple":
        return np.ceil(x) if scale < 1 else floor
    if mode == "round_prefer_floor":
        return np.where(x - floor == 0.5, floor, np.floor(x + 0.5))
    if mode == "round_prefer_ceil":
        return np.floor(x + 0.5)
    if mode == "floor":
        return floor
    if mode == "ceil":
        return np.ceil(x)
    raise ValueError(f"nearest_mode {mode!r} is not supported")


def _cubic_weights(ratio: np.ndarray, a: float) -> np.ndarray:
    """Keys cubic convolution weights of the 4 taps at floor(x) - 1 .. floor(x) + 2."""
    def near(t: np.ndarray) -> np.ndarray:
        return ((a + 2) * t - (a + 3)) * t * t + 1

    def far(t: np.ndarray) -> np.ndarray:
        return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a

    return np.stack([far(ratio + 1), near(ratio), near(1 - ratio), far(2 - ratio)], axis=-1)


def _interpolation_matrix(axis: _ResizeAxis, attrs: dict[str, Any], mode: str) -> tuple[np.ndarray, np.ndarray]:
    """([out, size] weights, [out] inside-roi mask) of a linear or cubic resampling of one axis."""
    transform = _text(attrs.get("coordinate_transformation_mode", "half_pixel"))
    x = _source_coordinates(axis, transform).astype(np.float64)
    inside = (x >= 0) & (x <= axis.size - 1) if transform == "tf_crop_and_resize" else np.ones(axis.out, bool)
    matrix = np.zeros((axis.out, axis.size))
    rows = np.arange(axis.out)
    if mode == "linear":
        x = np.clip(x, 0, axis.size - 1)
        low = np.floor(x).astype(np.int64)
        high = np.minimum(low + 1, axis.size - 1)
        ratio = x - low
        np.add.at(matrix, (rows, low), 1 - ratio)
        np.add.at(matrix, (rows, high), ratio)
    else:
        low = np.floor(x).astype(np.int64)
        weights = _cubic_weights(x - low, float(attrs.get("cubic_coeff_a", -0.75)))
        taps = low[:, None] + np.arange(-1, 3)[None, :]
        if int(attrs.get("exclude_outside", 0)):
            weights = np.where((taps >= 0) & (taps < axis.size), weights, 0.0)
            weights = weights / weights.sum(axis=1, keepdims=True)
        np.add.at(matrix, (np.repeat(rows, 4), np.clip(taps, 0, axis.size - 1).reshape(-1)), weights.reshape(-1))
    matrix[~inside] = 0.0
    return matrix, inside


def _resize_axes(x: ms.Tensor, attrs: dict[str, Any], args: list[Any], opset: int) -> dict[int, _ResizeAxis]:
    """The resampled axes (opset 10: scales; 11+: roi, scales, sizes; 18: ``axes``, aspect-ratio policy)."""
    rank = x.ndim
    axes = [_axis(int(a), rank) for a in attrs.get("axes", range(rank))]
    if opset < 11:
        roi, scales, sizes = None, _arg(args, 1), None
    else:
        roi, scales, sizes = _arg(args, 1), _arg(args, 2), _arg(args, 3)
    scales = None if scales is None or _array(scales).size == 0 else _array(scales).astype(np.float32)
    sizes = None if sizes is None or _array(sizes).size == 0 else _ints(sizes)
    roi_values = None if roi is None or _array(roi).size == 0 else _array(roi).astype(np.float64)
    shape = [int(s) for s in x.shape]
    if sizes is not None:
        policy = _text(attrs.get("keep_aspect_ratio_policy", "stretch"))
        ratios = np.array([sizes[i] / shape[a] for i, a in enumerate(axes)], np.float32)
        if policy != "stretch":
            pick = np.min if policy == "not_larger" else np.max
            ratios = np.full(len(axes), pick(ratios), np.float32)
            sizes = [int(np.round(np.float32(shape[a]) * ratios[i])) for i, a in enumerate(axes)]
        scales = ratios
    if scales is None:
        raise ValueError("Resize needs scales or sizes")
    result = {}
    for index, axis in enumerate(axes):
        scale = float(scales[index])
        out = sizes[index] if sizes is not None else int(np.floor(np.float32(shape[axis]) * np.float32(scale)))
        bounds = (0.0, 1.0)
        if roi_values is not None and len(roi_values) == 2 * len(axes):
            bounds = (float(roi_values[index]), float(roi_values[len(axes) + index]))
        if out != shape[axis] or scale != 1.0:
            result[axis] = _ResizeAxis(shape[axis], int(out), scale, bounds)
    return result


def _resample(x: ms.Tensor, axis: int, matrix: np.ndarray) -> ms.Tensor:
    """``matrix [out, size]`` applied along ``axis`` of ``x`` (a matmul on the last two axes)."""
    weights = ms.Tensor(matrix.astype(ms.dtype_to_nptype(x.dtype)))
    if axis == x.ndim - 1:
        return ops.matmul(x, ops.transpose(weights, (1, 0)))
    if axis == x.ndim - 2:
        return ops.matmul(weights, x)
    moved = ops.moveaxis(x, axis, -1)
    return ops.moveaxis(ops.matmul(moved, ops.transpose(weights, (1, 0))), -1, axis)


@onnx_op("Resize")
def _resize(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    """Separable resampling: nearest by gathering source indices, linear/cubic by weight matrices."""
    if int(attrs.get("antialias", 0)):
        raise ValueError("Resize with antialias=1 is not supported")
    x = _tensor(args[0])
    mode = _text(attrs.get("mode", "nearest"))
    if mode not in ("nearest", "linear", "cubic"):
        raise ValueError(f"Resize mode {mode!r} is not nearest, linear or cubic")
    if context.opset < 11:  # Resize-10 resamples like Upsample
        attrs = {**attrs, "coordinate_transformation_mode": "asymmetric", "nearest_mode": "simple"}
    transform = _text(attrs.get("coordinate_transformation_mode", "half_pixel"))
    dtype = x.dtype
    if mode != "nearest" and not _is_float(x):
        x = ops.cast(x, ms.float32)
    inside_all: np.ndarray | None = None
    for axis, spec in _resize_axes(x, attrs, args, context.opset).items():
        if mode == "nearest":
            source = _source_coordinates(spec, transform)
            inside = (source >= 0) & (source <= spec.size - 1)
            rounded = _nearest(source, _text(attrs.get("nearest_mode", "round_prefer_floor")), spec.scale)
            index = np.clip(rounded, 0, spec.size - 1)
            x = ops.gather(x, ms.Tensor(index.astype(np.int64)), axis)
        else:
            matrix, inside = _interpolation_matrix(spec, attrs, mode)
            x = _resample(x, axis, matrix)
        if transform == "tf_crop_and_resize":
            shape = [1] * x.ndim
            shape[axis] = spec.out
            mask = inside.reshape(shape)
            inside_all = mask if inside_all is None else inside_all & mask
    if inside_all is not None and not inside_all.all():
        value = float(attrs.get("extrapolation_value", 0.0))
        x = ops.where(ms.Tensor(np.broadcast_to(inside_all, x.shape).copy()), x, ops.full_like(x, value))
    if x.dtype != dtype:
        x = ops.cast(ops.round(x), dtype)
    return x


@onnx_op("Upsample")
def _upsample(context: Context, attrs: dict[str, Any], args: list[Any]) -> ms.Tensor:
    """Opsets 7-9: scales as an attribute or input, asymmetric coordinates (nearest rounds down)."""
    scales = attrs.get("scales")
    scales = np.asarray(scales if scales is not None else _array(args[1]), np.float32)
    mode = _text(attrs.get("mode", "nearest"))
    resize_attrs = {"mode": "linear" if mode in ("linear", "bilinear") else mode}
    return _resize(Context(min(context.opset, 10), context.outputs), resize_attrs, [args[0], scales])


# -------------------------------------------------------------------------------------- the cell

def _opset(graph: Graph) -> int:
    """The default-domain opset of the graph (the newest semantics when the graph does not say)."""
    record = graph.meta.get("onnx", {})
    for domain, version in record.get("opset_import", []):
        if domain in ("", "ai.onnx"):
            return int(version)
    return 21


def _settled(value: Any) -> tuple[int, ...] | None:
    """``value``'s shape, which waits for MindSpore to have inferred it (raising the op's error if any)."""
    return tuple(value.shape) if isinstance(value, ms.Tensor) else None


def _show(shape: Sequence[Any] | None) -> str:
    if shape is None:
        return "(any shape)"
    return "[" + ", ".join("?" if dim is None else str(dim) for dim in shape) + "]"


class GraphCell(nn.Cell):
    """A whole model rebuilt from a dataflow IR graph; ``construct(*inputs)`` runs it (PyNative mode).

    ``param_names`` maps each parameter's checkpoint name to its IR param name; :func:`graph_params`
    reads the arrays back under the IR names.
    """

    def __init__(self, graph: Graph, weights: bool = True) -> None:
        super().__init__()
        program = calls(graph)  # a module-tree graph is an error here
        check_supported(graph, ONNX_OPS, "the MindSpore builder")
        unknown = sorted({call.op for call in program if call.is_layer and call.op not in LAYER_RUNNERS})
        if unknown:
            raise ValueError(f"the graph uses layer ops the MindSpore builder cannot run: {unknown}")
        self._program: list[Call] = program
        self._opset = _opset(graph)
        self._inputs = [(value.name, value.dtype, value.shape) for value in graph.inputs]
        self._outputs = [value.name for value in graph.outputs]
        trainable = trainable_params(graph)
        parameters, names, self._arrays = [], [], {}
        for name, array in graph.params.items():
            array = np.asarray(array)
            dtype = _NUMPY_DTYPES.get(array.dtype.name)
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

    def _check_inputs(self, inputs: tuple[Any, ...]) -> list[ms.Tensor]:
        if len(inputs) != len(self._inputs):
            names = [name for name, _, _ in self._inputs]
            raise ValueError(f"the graph takes {len(names)} inputs {names}, {len(inputs)} were given")
        checked: list[ms.Tensor] = []
        for (name, dtype, shape), value in zip(self._inputs, inputs, strict=True):
            tensor = value if isinstance(value, ms.Tensor) else ms.Tensor(np.asarray(value))
            given = tuple(int(d) for d in tensor.shape)
            if shape is not None:
                if len(given) != len(shape):
                    raise ValueError(f"input {name!r} has shape {list(given)} (rank {len(given)}), the graph expects "
                                     f"{_show(shape)} (rank {len(shape)})")
                for axis, (got, want) in enumerate(zip(given, shape, strict=True)):
                    if isinstance(want, int) and want > 0 and got != want:
                        raise ValueError(f"input {name!r} has shape {list(given)}, the graph expects {_show(shape)} "
                                         f"(dimension {axis} must be {want})")
            expected = _NUMPY_DTYPES.get(dtype or "")
            if expected is not None and tensor.dtype != expected:
                raise ValueError(f"input {name!r} has dtype {tensor.dtype}, the graph expects {dtype}")
            checked.append(tensor)
        return checked

    def _run(self, call: Call, args: list[Any], params: dict[str, Any]) -> list[Any]:
        """One node's outputs, their shapes settled (MindSpore infers asynchronously: errors surface here)."""
        context = Context(self._opset, call.outputs)
        if call.is_layer:
            weight, bias = call.node.params["weight"], call.param("bias")
            result = LAYER_RUNNERS[call.op](context, call.attrs, _tensor(args[0]), params[weight],
                                            None if bias is None else params[bias])
        else:
            result = ONNX_OPS[call.op](context, call.attrs, args)
        results = list(result) if isinstance(result, (tuple, list)) else [result]
        for value in results:
            _settled(value)
        return results

    def construct(self, *inputs: Any) -> ms.Tensor | tuple[ms.Tensor, ...]:
        names = [name for name, _, _ in self._inputs]
        values: dict[str, Any] = dict(zip(names, self._check_inputs(inputs), strict=True))
        params: dict[str, Any] = dict(zip(self._ir_names, self.graph_parameters, strict=True))
        params.update(self._arrays)
        for call in self._program:
            args = [None if arg is None else params[arg.name] if arg.kind == "param" else values[arg.name]
                    for arg in call.args]
            try:
                results = self._run(call, args, params)
            except Exception as err:
                raise NodeError(f"while running node {call.node.name!r} ({call.op}): "
                                f"{str(err).strip() or type(err).__name__}") from err
            for name, value in zip(call.outputs, results, strict=False):
                if name:
                    values[name] = value
        outputs = [_tensor(values[name] if name in values else params[name]) for name in self._outputs]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def rebuild(graph: Graph, *, weights: bool = True) -> GraphCell:
    """The MindSpore ``nn.Cell`` running dataflow ``graph``, with a parameter per graph param.

    ``weights=False`` builds the structure only (trainable parameters zero; constants and BN
    statistics from the graph). ``ValueError`` for a graph without dataflow (lowered from a module tree) or with ops the
    builder cannot run (all listed).
    """
    if not isinstance(graph, Graph):
        raise TypeError(f"rebuild takes a lowrank_ir.Graph, got {type(graph).__name__}")
    return GraphCell(graph, weights=weights)


def graph_params(cell: GraphCell) -> dict[str, np.ndarray]:
    """The cell's parameters as numpy arrays under their IR names (to put trained weights back in a graph)."""
    if not isinstance(cell, GraphCell):
        raise TypeError(f"graph_params takes a GraphCell (from rebuild), got {type(cell).__name__}")
    arrays = {name: param.asnumpy().copy() for name, param in zip(cell._ir_names, cell.graph_parameters, strict=True)}
    arrays.update({name: array.copy() for name, array in cell._arrays.items()})
    return arrays
