"""A dataflow IR graph rebuilt as one trainable PyTorch module: :class:`GraphModule`, :func:`from_dataflow`.

``from_dataflow(graph)`` takes a graph lowered from ONNX (``frontends.onnx.lower``), decomposed or not; its
``forward`` runs the graph through the one ONNX interpreter (``backends/_onnx_interpreter.py``). This
module supplies PyTorch's primitives (:data:`PRIMITIVES`) and the container.

Every graph param a node reads is registered on the module: as an ``nn.Parameter`` when it is
trainable (``_dataflow.trainable_params``: layer weights and biases, float initializers, not a
``BatchNormalization``'s running statistics), else as a persistent buffer (shapes, indices, BN
statistics), so the state dict holds everything a rebuilt structure needs. The state-dict key is the
IR param name wherever it is a dotted module path (parts that are identifiers or numbers, none
shadowing an ``nn.Module`` attribute, none a prefix path of another); other names
(``onnx::MatMul_123``) live under ``_escaped.<code>`` (:func:`escape_name`). ``param_names`` maps
state-dict key -> IR name; :func:`graph_params` gives the current values by IR name.

``weights=False`` builds the structure only: trainable parameters get PyTorch's default
initialisation for their layer type, or zeros, ready for ``load_state_dict``; buffers always come
from the graph. ``Constant`` node outputs are non-persistent buffers under ``_constants``. Inputs go
by position or by name; any float dtype is accepted for a float input (a ``.double()`` module runs in
float64). Errors are the interpreter's: ``ValueError`` before anything is built, ``InputError``,
``NodeError`` (a ``RuntimeError``) naming the node.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the usual name
from torch import Tensor, nn

from backends import _dataflow
from backends import _onnx_interpreter as interpreter
from lowrank_ir import Graph, Op

__all__ = ["ESCAPED", "PRIMITIVES", "GraphModule", "TorchPrimitives", "escape_name", "from_dataflow", "graph_params"]

logger = logging.getLogger(__name__)

#: The submodule holding params whose IR names are not module paths.
ESCAPED = "_escaped"
#: The submodule holding the outputs of ``Constant`` nodes (non-persistent buffers, not state).
CONSTANTS = "_constants"

# ---------------------------------------------------------------------------------- primitives

_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in (
    "float32", "float16", "float64", "bfloat16", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
    "uint64", "bool")}
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_SCATTER_REDUCE = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}


def _prod(x: Tensor, dims: Sequence[int], keep: bool) -> Tensor:
    for dim in sorted(dims, reverse=True):
        x = torch.prod(x, dim=dim, keepdim=keep)
    return x


_REDUCE: dict[str, Callable[[Tensor, Sequence[int], bool], Tensor]] = {
    "sum": lambda x, dims, keep: torch.sum(x, dim=tuple(dims), keepdim=keep),
    "mean": lambda x, dims, keep: torch.mean(x, dim=tuple(dims), keepdim=keep),
    "max": lambda x, dims, keep: torch.amax(x, dim=tuple(dims), keepdim=keep),
    "min": lambda x, dims, keep: torch.amin(x, dim=tuple(dims), keepdim=keep),
    "prod": _prod,
    "logsumexp": lambda x, dims, keep: torch.logsumexp(x, dim=tuple(dims), keepdim=keep),
}


class TorchPrimitives:
    """PyTorch's primitives for the ONNX interpreter (``_onnx_interpreter.Primitives``)."""

    any_float_input = True
    functions: dict[str, Callable[..., Any]] = {
        "add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div,
        "trunc_div": lambda a, b: torch.div(a, b, rounding_mode="trunc"), "pow": torch.pow, "fmod": torch.fmod,
        "remainder": torch.remainder, "maximum": torch.maximum, "minimum": torch.minimum, "equal": torch.eq,
        "less": torch.lt, "greater": torch.gt, "less_equal": torch.le, "greater_equal": torch.ge,
        "logical_and": torch.logical_and, "logical_or": torch.logical_or, "logical_xor": torch.logical_xor,
        "logical_not": torch.logical_not, "bitwise_and": torch.bitwise_and, "bitwise_or": torch.bitwise_or,
        "bitwise_xor": torch.bitwise_xor, "bitwise_not": torch.bitwise_not,
        "left_shift": torch.bitwise_left_shift, "right_shift": torch.bitwise_right_shift,
        "sqrt": torch.sqrt, "exp": torch.exp, "log": torch.log, "erf": torch.erf, "relu": torch.relu,
        "sigmoid": torch.sigmoid, "tanh": torch.tanh, "neg": torch.neg, "abs": torch.abs,
        "reciprocal": torch.reciprocal, "floor": torch.floor, "ceil": torch.ceil, "round": torch.round,
        "sign": torch.sign, "sin": torch.sin, "cos": torch.cos, "tan": torch.tan, "asin": torch.asin,
        "acos": torch.acos, "atan": torch.atan, "sinh": torch.sinh, "cosh": torch.cosh, "asinh": torch.asinh,
        "acosh": torch.acosh, "atanh": torch.atanh, "softplus": F.softplus, "isnan": torch.isnan,
        "isinf": torch.isinf, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "where": torch.where, "softmax": torch.softmax, "log_softmax": torch.log_softmax,
        "reshape": lambda x, shape: x.reshape(tuple(shape)), "transpose": lambda x, perm: x.permute(*perm),
        "concat": lambda xs, axis: torch.cat(list(xs), dim=axis),
        "split": lambda x, sizes, axis: torch.split(x, list(sizes), dim=axis),
        "strided_slice": lambda x, begin, end, step: x[tuple(map(slice, begin, end, step))],
        "take": lambda x, indices, axis: torch.index_select(x, axis, indices),
        "gather_elements": lambda x, axis, indices: torch.gather(x, axis, indices),
        "gather_nd": lambda x, indices: x[tuple(indices.unbind(-1))],
        "broadcast_to": lambda x, shape: x.expand(tuple(shape)), "tile": lambda x, repeats: x.repeat(*repeats),
        "flip": lambda x, axes: torch.flip(x, dims=tuple(axes)), "cumsum": lambda x, axis: torch.cumsum(x, dim=axis),
        "matmul": torch.matmul,
    }

    def as_input(self, value: Any) -> Tensor | None:
        if isinstance(value, np.ndarray):
            return torch.from_numpy(value)
        return value if isinstance(value, Tensor) else None

    def tensor(self, array: np.ndarray, like: Any = None) -> Tensor:
        tensor = torch.from_numpy(np.array(array, copy=True))
        return tensor.to(like.device) if isinstance(like, Tensor) else tensor

    def array(self, x: Tensor) -> np.ndarray:
        x = x.detach().cpu()
        return (x.float() if x.dtype == torch.bfloat16 else x).numpy()

    def shape(self, x: Tensor) -> tuple[int, ...]:
        return tuple(int(d) for d in x.shape)

    def dtype(self, x: Tensor) -> str:
        return str(x.dtype).removeprefix("torch.")

    def cast(self, x: Tensor, dtype: str) -> Tensor:
        return x.to(_DTYPES[dtype])

    def scatter_elements(self, x: Tensor, axis: int, indices: Tensor, updates: Tensor, reduction: str) -> Tensor:
        if reduction == "none":
            return torch.scatter(x, axis, indices, updates)
        if reduction not in _SCATTER_REDUCE:
            raise ValueError(f"ScatterElements reduction {reduction!r} is not one of none, {sorted(_SCATTER_REDUCE)}")
        return torch.scatter_reduce(x, axis, indices, updates, _SCATTER_REDUCE[reduction], include_self=True)

    def scatter_nd(self, x: Tensor, indices: Tensor, updates: Tensor, reduction: str) -> Tensor:
        if reduction not in ("none", "add"):
            raise ValueError(f"ScatterND reduction {reduction!r} is not supported ('none', 'add')")
        return x.clone().index_put_(tuple(indices.unbind(-1)), updates, accumulate=reduction == "add")

    def pad(self, x: Tensor, begins: Sequence[int], ends: Sequence[int], value: Any = 0) -> Tensor:
        amounts = [int(v) for axis in reversed(range(len(begins))) for v in (begins[axis], ends[axis])]
        return F.pad(x, amounts, value=value)

    def full(self, shape: Sequence[int], value: Any, dtype: str, like: Any = None) -> Tensor:
        return torch.full(tuple(shape), value, dtype=_DTYPES[dtype],
                          device=like.device if isinstance(like, Tensor) else None)

    def reduce(self, kind: str, x: Tensor, axes: Sequence[int], keep: bool) -> Tensor:
        return _REDUCE[kind](x, axes, keep)

    def arg(self, kind: str, x: Tensor, axis: int, keep: bool) -> Tensor:
        return (torch.argmax if kind == "argmax" else torch.argmin)(x, dim=axis, keepdim=keep)

    def topk(self, x: Tensor, k: int, axis: int, largest: bool, ordered: bool) -> tuple[Tensor, Tensor]:
        values, indices = torch.topk(x, k, dim=axis, largest=largest, sorted=ordered)
        return values, indices

    def conv(self, x: Tensor, w: Tensor, b: Tensor | None, stride: Sequence[int], pads: Sequence[int],
             dilation: Sequence[int], groups: int) -> Tensor:
        return _CONV[w.dim() - 2](x, w, b, list(stride), list(pads), list(dilation), groups)

    def conv_transpose(self, x: Tensor, w: Tensor, stride: Sequence[int], dilation: Sequence[int],
                       groups: int) -> Tensor:
        return _CONV_T[w.dim() - 2](x, w, None, list(stride), 0, 0, groups, list(dilation))


#: The primitives every :class:`GraphModule` runs with.
PRIMITIVES = TorchPrimitives()

# -------------------------------------------------------------------------------------- naming

_PART = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9]+")


@functools.cache
def _reserved() -> frozenset[str]:
    """Attribute names a param or submodule may not take (they would shadow ``nn.Module``'s own)."""
    return frozenset(dir(GraphModule)) | frozenset(vars(nn.Module())) | frozenset(_OWN_ATTRIBUTES)


def escape_name(name: str) -> str:
    """An IR param name as one attribute name, injectively.

    ASCII letters and digits stay; ``_`` becomes ``__``; any other character ``c`` becomes
    ``_<hex of ord(c)>_`` (``onnx::MatMul_123`` -> ``onnx_3a__3a_MatMul__123``, ``/enc/Constant`` ->
    ``_2f_enc_2f_Constant``). A code that would shadow an ``nn.Module`` attribute (``training``) has its
    first character written in hex too (``_74_raining``). Decoding reads ``__`` as ``_`` and
    ``_<hex>_`` as that character, so no two names share a code.
    """
    def code(character: str) -> str:
        return f"_{ord(character):x}_"

    parts = [c if c.isascii() and c.isalnum() else "__" if c == "_" else code(c) for c in name]
    escaped = "".join(parts)
    if not escaped or escaped in _reserved():
        escaped = (code(name[0]) + "".join(parts[1:])) if name else "_"
    return escaped


def _is_path(name: str) -> bool:
    parts = name.split(".")
    if parts[0] in (ESCAPED, CONSTANTS):
        return False
    return all(_PART.fullmatch(part) and part not in _reserved() for part in parts)


def state_keys(names: Iterable[str]) -> dict[str, str]:
    """IR param name -> state-dict key (the name itself where it can be a module path, else escaped)."""
    names = list(names)
    paths = [name for name in names if _is_path(name)]
    prefixes = {".".join(name.split(".")[:end]) for name in paths for end in range(1, name.count(".") + 1)}
    kept = {name for name in paths if name not in prefixes}
    return {name: name if name in kept else f"{ESCAPED}.{escape_name(name)}" for name in names}


# ---------------------------------------------------------------------------------------- module

#: Attributes GraphModule sets on itself (reserved: no param may take these names).
_OWN_ATTRIBUTES = ("param_names", "input_specs", "output_names", "opset", "_program", "_keys", "_constant_keys")


class GraphModule(nn.Module):
    """A dataflow IR graph as a trainable PyTorch module (see the module docstring).

    Attributes:
        param_names: state-dict key -> IR param name, for every parameter and persistent buffer.
        input_specs: the graph inputs ``(name, dtype, shape)`` ``forward`` takes, in order.
        output_names: the graph outputs ``forward`` returns, in order.
        opset: the ONNX opset the opaque nodes are run at.
    """

    def __init__(self, graph: Graph, *, weights: bool = True) -> None:
        super().__init__()
        if not isinstance(graph, Graph):
            raise TypeError(f"from_dataflow takes a lowrank_ir.Graph, got {type(graph).__name__}")
        program = interpreter.program(graph, "the PyTorch backend")
        self.opset = program.opset
        self.input_specs = program.input_specs
        self.output_names = program.output_names
        self._register_params(graph, program.steps, weights)
        self._register_constants(program.constants)
        self._program = program
        logger.debug("rebuilt %d nodes with %d parameters and %d buffers (opset %d)", len(program.steps),
                     len(list(self.parameters())), len(list(self.buffers())), program.opset)

    # -------------------------------------------------------------------------------- params

    def _register_params(self, graph: Graph, steps: list[interpreter.Step], weights: bool) -> None:
        used = {arg[1] for step in steps for arg in step.args if arg is not None and arg[0] == "param"}
        used |= {name for step in steps for name in step.params.values()}
        used |= {name for name in self.output_names if name in graph.params}
        ordered = [name for name in graph.params if name in used]
        trainable = _dataflow.trainable_params(graph)  # BN running statistics excluded: buffers
        layer_roles = {name: (step, role) for step in reversed(steps) if step.layer
                       for role, name in step.params.items()}
        keys = state_keys(ordered)
        self._keys = keys
        self.param_names = {key: name for name, key in keys.items()}
        for name in ordered:
            array = np.asarray(graph.params[name])
            if array.dtype.kind in "OSUV":
                raise ValueError(f"param {name!r} has dtype {array.dtype}, which PyTorch cannot hold")
            is_param = name in trainable and array.dtype.kind == "f"
            if weights or not is_param:
                tensor = torch.from_numpy(np.array(array, copy=True))
            else:
                tensor = _initial(array, layer_roles.get(name))
            self._attach(keys[name], nn.Parameter(tensor) if is_param else tensor, persistent=True)
        self.param_names = {key: self.param_names[key] for key in self.state_dict(keep_vars=True)}  # state order

    def _register_constants(self, constants: dict[str, np.ndarray]) -> None:
        self._constant_keys: dict[str, str] = {}
        for name, array in constants.items():
            key = f"{CONSTANTS}.{escape_name(name)}"
            self._constant_keys[name] = key
            self._attach(key, torch.from_numpy(np.array(array, copy=True)), persistent=False)

    def _attach(self, key: str, tensor: Tensor, persistent: bool) -> None:
        *path, leaf = key.split(".")
        module: nn.Module = self
        for part in path:
            child = module._modules.get(part)
            if child is None:
                child = nn.Module()
                module.add_module(part, child)
            module = child
        if isinstance(tensor, nn.Parameter):
            module.register_parameter(leaf, tensor)
        else:
            module.register_buffer(leaf, tensor, persistent=persistent)

    def _tensors(self) -> dict[str, Tensor]:
        """IR param name -> its current tensor; Constant output name -> its tensor."""
        named: dict[str, Tensor] = dict(self.named_parameters(remove_duplicate=False))
        named.update(self.named_buffers(remove_duplicate=False))
        tensors = {self.param_names[key]: tensor for key, tensor in named.items() if key in self.param_names}
        for value, key in self._constant_keys.items():
            tensors[value] = named[key]
        return tensors

    # ------------------------------------------------------------------------------- forward

    def forward(self, *inputs: Any, **named: Any) -> Tensor | tuple[Tensor, ...]:
        """Run the graph on its data inputs (by position in ``input_specs`` order, or by name)."""
        feeds = interpreter.bind_inputs(PRIMITIVES, self.input_specs, inputs, named)
        outputs = self._program.run(PRIMITIVES, feeds, self._tensors())
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def extra_repr(self) -> str:
        ops: dict[str, int] = {}
        for step in self._program.steps:
            ops[step.op] = ops.get(step.op, 0) + 1
        listed = ", ".join(f"{op}: {count}" for op, count in sorted(ops.items()))
        return f"inputs={[spec[0] for spec in self.input_specs]}, outputs={self.output_names}, nodes={{{listed}}}"


def _initial(array: np.ndarray, use: tuple[interpreter.Step, str] | None) -> Tensor:
    """A structure-only parameter: PyTorch's default initialisation for a layer's weight/bias, else zeros."""
    tensor = torch.zeros(array.shape, dtype=torch.from_numpy(np.zeros(0, array.dtype)).dtype)
    if use is None or tensor.dim() == 0:
        return tensor
    step, role = use
    attrs = step.attrs
    if step.op in (Op.CONV.value, Op.CONV_TRANSPOSE.value):
        channels = attrs["in_channels" if step.op == Op.CONV.value else "out_channels"] // attrs["groups"]
        fan_in = channels * math.prod(attrs["kernel_size"])
    else:
        fan_in = int(attrs.get("in_features", 1))
    with torch.no_grad():
        if role == "weight" and step.op == Op.EMBEDDING.value:
            nn.init.normal_(tensor)
        elif role == "weight":
            right = step.op == Op.MATMUL.value and attrs.get("weight_side", "right") == "right"
            nn.init.kaiming_uniform_(tensor.T if right else tensor, a=math.sqrt(5))
        else:
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            nn.init.uniform_(tensor, -bound, bound)
    return tensor


def from_dataflow(graph: Graph, *, weights: bool = True) -> GraphModule:
    """The whole model of a dataflow ``graph`` as a trainable :class:`GraphModule`.

    Args:
        graph: a graph lowered from ONNX (``frontends.onnx.lower``), possibly decomposed by the engine.
        weights: fill the parameters from the graph; ``False`` builds the structure only (see the module
            docstring), for a state dict to be loaded.

    Raises:
        ValueError: the graph has no dataflow, uses ops this backend cannot run (all listed), or is
            inconsistent (``lowrank_ir.verify``).
    """
    return GraphModule(graph, weights=weights)


def graph_params(module: GraphModule) -> dict[str, np.ndarray]:
    """The module's parameters and buffers by IR param name, as numpy arrays (copies, on the CPU)."""
    if not isinstance(module, GraphModule):
        raise TypeError(f"graph_params takes a GraphModule (from from_dataflow), got {type(module).__name__}")
    named: dict[str, Tensor] = dict(module.named_parameters(remove_duplicate=False))
    named.update(module.named_buffers(remove_duplicate=False))
    result = {}
    for key, name in module.param_names.items():
        tensor = named[key].detach().cpu()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        result[name] = tensor.numpy().copy()
    return result


