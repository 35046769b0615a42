"""A dataflow IR graph rebuilt as one trainable PyTorch module: :class:`GraphModule`, :func:`rebuild`.

``rebuild(graph)`` takes a graph lowered from ONNX (``frontends.onnx.lower``), decomposed or not, and
returns an ``nn.Module`` whose ``forward`` runs the graph with PyTorch's own ops, node by node, in the
graph's order (``backends/_dataflow.py`` reads the nodes as calls):

- a *layer* node (``Linear``, ``Conv``, ``ConvTranspose``, ``Embedding``, ``MatMul``) runs from its IR
  attributes (``lowrank_ir/_ir.py`` documents them: Gemm ``alpha``/``beta``, MatMul ``weight_side``,
  every Conv ``padding`` form, ``output_padding``, ...);
- an *opaque* node runs as its ONNX operator, one function per operator in :data:`OPS` (``@onnx_op``
  fills it), with the attribute and input forms of every opset the exporters emit (Split/Squeeze/
  Unsqueeze/Reduce* axes as attribute or input, Clip bounds as attributes or inputs, Softmax's 2-D
  coercion below opset 13, ...). Integer shape arithmetic (Shape -> Gather -> Concat -> Reshape) runs
  eagerly on tensors.

Parameters and names. Every graph param a node reads is registered on the module:

- as an ``nn.Parameter`` when it is trainable (``_dataflow.trainable_params``: layer weights and
  biases, floating-point initializers, but not the running mean and variance of a
  ``BatchNormalization``: inference-mode statistics, not weights);
- as a persistent buffer otherwise (integer shapes and indices, ``Constant``-node outputs, BN
  statistics), so the state dict holds everything a rebuilt structure needs.

The state-dict key is the IR param name itself wherever that name is a dotted module path (each part
a Python identifier or a decimal number, none shadowing an ``nn.Module`` attribute, no name a prefix
path of another): ``encoder.layer.0.attention.self.query.weight`` lives in nested submodules, as in
the source model. Other names (``onnx::MatMul_123``, ``/encoder/Constant_output_0``) are stored
under ``_escaped.<code>``, see :func:`escape_name`. ``GraphModule.param_names`` maps state-dict key
-> IR name; :func:`graph_params` gives the module's current values by IR name, for ``graph.set_param``.

``weights=False`` builds the structure only: trainable parameters get PyTorch's default
initialisation for their layer type (layer weights and biases) or zeros (other float initializers),
ready for ``load_state_dict``; buffers (shapes, indices, constants, BN statistics) are structure and
are always taken from the graph.

The ONNX ``Constant`` nodes the frontend keeps as nodes (``value_float``, ``value_ints`` ...) are
evaluated once, at build time, into non-persistent buffers under ``_constants`` (they follow
``.to(device)`` and are not state). Inputs may be given as any floating dtype for a float input
(a ``.double()`` module runs in float64); other dtypes must be the graph's.

Adding an op: write ``function(step, *inputs) -> Tensor | tuple[Tensor, ...]`` and decorate it with
``@onnx_op("OpType")``; ``step.attrs`` holds the ONNX attributes (TENSOR attributes decoded to numpy),
``step.opset`` the model's opset, ``step.outputs`` the output names (an empty name: not read).

The module runs ONNX inference semantics in training mode too: ``BatchNormalization`` normalises
with its running statistics and ``Dropout`` is the identity (wrap the module to add training-time
behaviour); gradients reach every parameter.

Errors: a graph without dataflow (lowered from a module tree), or using an op missing from
:data:`OPS`, is a ``ValueError`` listing what is wrong, raised before anything is built; inputs whose
rank or fixed dims differ from ``graph.inputs`` are a ``ValueError`` naming the input; an error inside
a node is a ``RuntimeError`` ``while running node 'X' (Op): ...`` chained to the cause.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the usual name
from torch import Tensor, nn

from backends import _dataflow
from lowrank_ir import Graph, Op, verify

__all__ = ["ESCAPED", "OPS", "GraphModule", "escape_name", "graph_params", "onnx_op", "rebuild"]

logger = logging.getLogger(__name__)

#: The submodule holding params whose IR names are not module paths.
ESCAPED = "_escaped"
#: The submodule holding the outputs of ``Constant`` nodes (non-persistent buffers, not state).
CONSTANTS = "_constants"
#: The opset assumed for a graph that records none (built by hand).
DEFAULT_OPSET = 18

Result = Tensor | Sequence[Tensor]
OpFunction = Callable[..., Result]

#: ONNX op type -> the function running it: ``function(step, *inputs)`` (inputs in operator order, ``None``
#: for a skipped optional input; ``step.attrs`` the ONNX attributes, ``step.opset`` the model's opset).
OPS: dict[str, OpFunction] = {}


def onnx_op(*names: str) -> Callable[[OpFunction], OpFunction]:
    """Register ``function`` as the runner of the ONNX ops ``names``."""

    def register(function: OpFunction) -> OpFunction:
        for name in names:
            OPS[name] = function
        return function

    return register


# --------------------------------------------------------------------------------------- steps

@dataclass(slots=True)
class _Step:
    """One node as the module runs it (picklable: the op is looked up by name at run time)."""

    name: str
    op: str
    layer: bool
    attrs: dict[str, Any]
    args: list[tuple[str, str] | None]  # ("value" | "param", name), None for a skipped optional input
    outputs: list[str]
    opset: int
    params: dict[str, str] = field(default_factory=dict)  # layers: role -> IR param name
    free: list[str] = field(default_factory=list)  # values no later step reads


#: ONNX ``TensorProto.DataType`` -> torch dtype.
ONNX_DTYPES: dict[int, torch.dtype] = {
    1: torch.float32, 2: torch.uint8, 3: torch.int8, 4: torch.uint16, 5: torch.int16, 6: torch.int32,
    7: torch.int64, 9: torch.bool, 10: torch.float16, 11: torch.float64, 12: torch.uint32, 13: torch.uint64,
    16: torch.bfloat16,
}


def _text(value: Any) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else str(value)


def _decode_tensor(data: Any) -> np.ndarray:
    """A TENSOR attribute (kept by the IR as the serialized ``TensorProto``) as a numpy array."""
    if isinstance(data, np.ndarray):
        return data
    from onnx import TensorProto, numpy_helper

    return np.asarray(numpy_helper.to_array(TensorProto.FromString(data)))


def _prepared_attrs(call: _dataflow.Call) -> dict[str, Any]:
    """The call's attributes with TENSOR attributes decoded (done once, at build time)."""
    record = call.node.attrs.get("onnx")
    types = record.get("types", {}) if isinstance(record, dict) else {}
    attrs = dict(call.attrs)
    for key, kind in types.items():
        if key in attrs and kind == "TENSOR" and not call.is_layer:
            attrs[key] = _decode_tensor(attrs[key])
        elif key in attrs and kind in ("SPARSE_TENSOR", "GRAPH", "GRAPHS", "TENSORS", "SPARSE_TENSORS"):
            raise ValueError(f"node {call.node.name!r} ({call.op}): attribute {key!r} of type {kind} is not "
                             f"supported by the PyTorch rebuilder")
    return attrs


def _opset(graph: Graph) -> int:
    record = graph.meta.get("onnx") or {}
    for domain, version in record.get("opset_import", []):
        if domain in _dataflow.DEFAULT_DOMAINS:
            return int(version)
    return DEFAULT_OPSET


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
_OWN_ATTRIBUTES = ("param_names", "input_specs", "output_names", "opset", "_steps", "_keys", "_constant_keys")


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
            raise TypeError(f"rebuild takes a lowrank_ir.Graph, got {type(graph).__name__}")
        calls = _dataflow.calls(graph)  # ValueError for a graph without dataflow
        _dataflow.check_supported(graph, OPS, "the PyTorch backend")
        verify(graph)
        opset = _opset(graph)
        self.opset = opset
        self.input_specs = [(value.name, value.dtype, value.shape) for value in graph.inputs]
        self.output_names = [value.name for value in graph.outputs]
        steps, constants = [], []
        for call in calls:
            step = _Step(call.node.name, call.op, call.is_layer, _prepared_attrs(call),
                         [None if arg is None else (arg.kind, arg.name) for arg in call.args], list(call.outputs),
                         opset, dict(call.node.params) if call.is_layer else {})
            if step.layer:
                _check_layer(step)
            if step.op == "Constant" and not step.layer:
                constants.append(step)
            else:
                steps.append(step)
        self._register_params(graph, steps, weights)
        self._register_constants(constants)
        _plan_frees(steps, set(self.output_names))
        self._steps = steps
        logger.debug("rebuilt %d nodes with %d parameters and %d buffers (opset %d)", len(steps),
                     len(list(self.parameters())), len(list(self.buffers())), opset)

    # -------------------------------------------------------------------------------- params

    def _register_params(self, graph: Graph, steps: list[_Step], weights: bool) -> None:
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

    def _register_constants(self, constants: list[_Step]) -> None:
        self._constant_keys: dict[str, str] = {}
        for step in constants:
            try:
                value = _constant(step)
            except Exception as err:
                raise ValueError(f"while building node {step.name!r} (Constant): {err}") from err
            if step.outputs and step.outputs[0]:
                key = escape_name(step.outputs[0])
                self._constant_keys[step.outputs[0]] = f"{CONSTANTS}.{key}"
                self._attach(f"{CONSTANTS}.{key}", value, persistent=False)

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

    def _bind(self, inputs: tuple[Any, ...], named: dict[str, Any]) -> dict[str, Tensor]:
        names = [spec[0] for spec in self.input_specs]
        if len(inputs) > len(names):
            raise TypeError(f"the graph takes {len(names)} inputs {names}, {len(inputs)} were given")
        bound = dict(zip(names, inputs, strict=False))
        for key, value in named.items():
            if key not in names:
                raise TypeError(f"unknown input {key!r}; the graph takes {names}")
            if key in bound:
                raise TypeError(f"input {key!r} given twice (by position and by name)")
            bound[key] = value
        missing = [name for name in names if name not in bound]
        if missing:
            raise TypeError(f"missing inputs {missing}; the graph takes {names}")
        feeds = {}
        for name, dtype, shape in self.input_specs:
            value = bound[name]
            if isinstance(value, np.ndarray):
                value = torch.from_numpy(value)
            if not isinstance(value, Tensor):
                raise TypeError(f"input {name!r} must be a torch.Tensor, got {type(value).__name__}")
            _check_input(name, value, dtype, shape)
            feeds[name] = value
        return feeds

    def forward(self, *inputs: Any, **named: Any) -> Tensor | tuple[Tensor, ...]:
        """Run the graph on its data inputs (by position in ``input_specs`` order, or by name)."""
        env: dict[str, Tensor] = self._bind(inputs, named)
        tensors = self._tensors()
        for step in self._steps:
            try:
                args = [None if arg is None else env[arg[1]] if arg[1] in env else tensors[arg[1]]
                        for arg in step.args]
                if step.layer:
                    results: Result = LAYERS[step.op](step, args[0], tensors)  # type: ignore[arg-type]
                else:
                    results = OPS[step.op](step, *args)
                if isinstance(results, Tensor):
                    results = (results,)
                wanted = [index for index, name in enumerate(step.outputs) if name]
                if wanted and wanted[-1] >= len(results):
                    raise ValueError(f"the node has {len(step.outputs)} outputs, only {len(results)} are computed")
            except Exception as err:
                raise RuntimeError(f"while running node {step.name!r} ({step.op}): {err}") from err
            for index in wanted:
                env[step.outputs[index]] = results[index]
            for name in step.free:
                env.pop(name, None)
        outputs = tuple(env[name] if name in env else tensors[name] for name in self.output_names)
        return outputs[0] if len(outputs) == 1 else outputs

    def extra_repr(self) -> str:
        ops: dict[str, int] = {}
        for step in self._steps:
            ops[step.op] = ops.get(step.op, 0) + 1
        listed = ", ".join(f"{op}: {count}" for op, count in sorted(ops.items()))
        return f"inputs={[spec[0] for spec in self.input_specs]}, outputs={self.output_names}, nodes={{{listed}}}"


def _check_input(name: str, value: Tensor, dtype: str | None, shape: Sequence[Any] | None) -> None:
    got = str(value.dtype).removeprefix("torch.")
    if dtype is not None and got != dtype:
        floating = value.is_floating_point() and dtype.startswith(("float", "bfloat"))  # .double() models are fine
        if not floating:
            raise ValueError(f"input {name!r} has dtype {got}, the graph expects {dtype}")
    if shape is None:
        return
    expected = "[" + ", ".join(str(dim) if isinstance(dim, int) and dim > 0 else "?" if dim is None else str(dim)
                               for dim in shape) + "]"
    if value.dim() != len(shape):
        raise ValueError(f"input {name!r} has shape {list(value.shape)} ({value.dim()} dimensions), the graph "
                         f"expects {len(shape)} dimensions {expected}")
    for axis, (got_dim, want) in enumerate(zip(value.shape, shape, strict=True)):
        if isinstance(want, int) and want > 0 and got_dim != want:
            raise ValueError(f"input {name!r} has shape {list(value.shape)}, the graph expects {expected} "
                             f"(dimension {axis} must be {want})")


def _plan_frees(steps: list[_Step], keep: set[str]) -> None:
    """Mark each value to be dropped after the last step that reads it (graph outputs are kept)."""
    last: dict[str, int] = {}
    for index, step in enumerate(steps):
        for arg in step.args:
            if arg is not None and arg[0] == "value":
                last[arg[1]] = index
    for name, index in last.items():
        if name not in keep:
            steps[index].free.append(name)


def _initial(array: np.ndarray, use: tuple[_Step, str] | None) -> Tensor:
    """A structure-only parameter: PyTorch's default initialisation for a layer's weight/bias, else zeros."""
    tensor = torch.zeros(array.shape, dtype=torch.from_numpy(np.zeros(0, array.dtype)).dtype)
    if use is None or tensor.dim() == 0:
        return tensor
    step, role = use
    weight_shape = _layer_weight_shape(step)
    fan_in = 1
    if step.op in (Op.LINEAR.value, Op.CONV.value):
        fan_in = math.prod(weight_shape[1:])
    elif step.op == Op.CONV_TRANSPOSE.value:
        fan_in = math.prod(weight_shape[1:])
    elif step.op == Op.MATMUL.value:
        fan_in = int(step.attrs["in_features"])
    with torch.no_grad():
        if role == "weight" and step.op == Op.EMBEDDING.value:
            nn.init.normal_(tensor)
        elif role == "weight":
            matrix = tensor.T if step.op == Op.MATMUL.value and step.attrs.get("weight_side", "right") == "right" \
                else tensor
            nn.init.kaiming_uniform_(matrix, a=math.sqrt(5))
        else:
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            nn.init.uniform_(tensor, -bound, bound)
    return tensor


def _layer_weight_shape(step: _Step) -> tuple[int, ...]:
    attrs = step.attrs
    if step.op == Op.LINEAR.value:
        return (attrs["out_features"], attrs["in_features"])
    if step.op == Op.CONV.value:
        return (attrs["out_channels"], attrs["in_channels"] // attrs["groups"], *attrs["kernel_size"])
    if step.op == Op.CONV_TRANSPOSE.value:
        return (attrs["in_channels"], attrs["out_channels"] // attrs["groups"], *attrs["kernel_size"])
    return (attrs.get("in_features", 1), attrs.get("out_features", 1))


def rebuild(graph: Graph, *, weights: bool = True) -> GraphModule:
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
        raise TypeError(f"graph_params takes a GraphModule (from rebuild), got {type(module).__name__}")
    named: dict[str, Tensor] = dict(module.named_parameters(remove_duplicate=False))
    named.update(module.named_buffers(remove_duplicate=False))
    result = {}
    for key, name in module.param_names.items():
        tensor = named[key].detach().cpu()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        result[name] = tensor.numpy().copy()
    return result


# ---------------------------------------------------------------------------------------- layers

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": torch.relu, "gelu": F.gelu, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu6": F.relu6,
    "hswish": F.hardswish, "hsigmoid": F.hardsigmoid, "leakyrelu": F.leaky_relu, "elu": F.elu, "silu": F.silu,
    "softmax": lambda x: torch.softmax(x, dim=-1),
}


def _check_layer(step: _Step) -> None:
    """Layer attributes the builder cannot honour are an error at build time, naming the node."""
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
        if attrs.get("padding_mode", "zeros") not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(f"{where}: padding_mode {attrs['padding_mode']!r} is unknown")


def _activate(step: _Step, y: Tensor) -> Tensor:
    activation = step.attrs.get("activation")
    return _ACTIVATIONS[str(activation).lower()](y) if activation else y


def _scaled(step: _Step, product: Tensor, bias: Tensor | None) -> Tensor:
    """``alpha * product + beta * bias`` (Gemm's scales, as the IR keeps them)."""
    alpha, beta = float(step.attrs.get("alpha", 1.0)), float(step.attrs.get("beta", 1.0))
    if alpha != 1.0:
        product = product * alpha
    if bias is not None:
        product = product + (bias * beta if beta != 1.0 else bias)
    return product


def _linear(step: _Step, x: Tensor, tensors: dict[str, Tensor]) -> Tensor:
    weight = tensors[step.params["weight"]]
    bias = tensors[step.params["bias"]] if "bias" in step.params else None
    alpha, beta = float(step.attrs.get("alpha", 1.0)), float(step.attrs.get("beta", 1.0))
    if alpha == 1.0 and beta == 1.0:
        return _activate(step, F.linear(x, weight, bias))
    return _activate(step, _scaled(step, F.linear(x, weight), bias))


def _matmul_layer(step: _Step, x: Tensor, tensors: dict[str, Tensor]) -> Tensor:
    weight = tensors[step.params["weight"]]
    bias = tensors[step.params["bias"]] if "bias" in step.params else None
    if step.attrs.get("weight_side", "right") == "left":
        product = torch.matmul(weight, x)
    else:
        product = torch.matmul(x, weight)
    return _activate(step, _scaled(step, product, bias))


def _embedding(step: _Step, ids: Tensor, tensors: dict[str, Tensor]) -> Tensor:
    weight = tensors[step.params["weight"]]
    attrs = step.attrs
    ids = ids.long()
    ids = torch.where(ids < 0, ids + weight.shape[0], ids)  # ONNX Gather takes negative indices
    return F.embedding(ids, weight, padding_idx=attrs.get("padding_idx"), max_norm=attrs.get("max_norm"),
                       norm_type=float(attrs.get("norm_type", 2.0) or 2.0),
                       scale_grad_by_freq=bool(attrs.get("scale_grad_by_freq", False)),
                       sparse=bool(attrs.get("sparse", False)))


def _conv_layer(step: _Step, x: Tensor, tensors: dict[str, Tensor]) -> Tensor:
    attrs = step.attrs
    weight = tensors[step.params["weight"]]
    bias = tensors[step.params["bias"]] if "bias" in step.params else None
    return _convolve(x, weight, bias, attrs["stride"], attrs["padding"], attrs["dilation"], attrs["groups"],
                     attrs.get("padding_mode", "zeros"))


def _conv_transpose_layer(step: _Step, x: Tensor, tensors: dict[str, Tensor]) -> Tensor:
    attrs = step.attrs
    weight = tensors[step.params["weight"]]
    bias = tensors[step.params["bias"]] if "bias" in step.params else None
    ndim = weight.dim() - 2
    return _convolve_transpose(x, weight, bias, attrs["stride"], attrs["padding"], attrs["dilation"],
                               attrs["groups"], attrs.get("output_padding", (0,) * ndim))


#: IR layer op -> the function running it: ``function(step, x, tensors)``.
LAYERS: dict[str, Callable[[_Step, Tensor, dict[str, Tensor]], Tensor]] = {
    Op.LINEAR.value: _linear,
    Op.MATMUL.value: _matmul_layer,
    Op.EMBEDDING.value: _embedding,
    Op.CONV.value: _conv_layer,
    Op.CONV_TRANSPOSE.value: _conv_transpose_layer,
}


# ------------------------------------------------------------------------------- convolutions

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _torch_pads(begin: Sequence[int], end: Sequence[int]) -> list[int]:
    """(begin..., end...) per dimension in ONNX order -> ``F.pad``'s (last dim first) list."""
    return [int(value) for axis in reversed(range(len(begin))) for value in (begin[axis], end[axis])]


def _same_pads(sizes: Sequence[int], kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int],
               lower: bool) -> tuple[list[int], list[int]]:
    """ONNX SAME_UPPER/SAME_LOWER pads: output size ceil(input / stride), the odd extra at the end/beginning."""
    begin, end = [], []
    for size, k, s, d in zip(sizes, kernel, stride, dilation, strict=True):
        out = -(-int(size) // int(s))
        total = max(0, (out - 1) * int(s) + (int(k) - 1) * int(d) + 1 - int(size))
        small, big = total // 2, total - total // 2
        begin.append(big if lower else small)
        end.append(small if lower else big)
    return begin, end


def _explicit_pads(padding: Any, sizes: Sequence[int], kernel: Sequence[int], stride: Sequence[int],
                   dilation: Sequence[int]) -> tuple[list[int], list[int]]:
    """Any IR ``padding`` form as (begin, end) lists for the spatial sizes ``sizes``."""
    ndim = len(kernel)
    if isinstance(padding, str):
        if padding == "valid":
            return [0] * ndim, [0] * ndim
        if padding in ("same", "same_lower"):
            return _same_pads(sizes, kernel, stride, dilation, padding == "same_lower")
        raise ValueError(f"padding {padding!r} is unknown")
    padding = [int(value) for value in padding]
    if len(padding) == ndim:
        return padding, padding
    if len(padding) == 2 * ndim:
        return padding[:ndim], padding[ndim:]
    raise ValueError(f"padding {padding!r} has not {ndim} or {2 * ndim} entries")


def _convolve(x: Tensor, weight: Tensor, bias: Tensor | None, stride: Sequence[int], padding: Any,
              dilation: Sequence[int], groups: int, padding_mode: str = "zeros") -> Tensor:
    ndim = weight.dim() - 2
    if ndim not in _CONV:
        raise ValueError(f"a {ndim}-D convolution; 1-D, 2-D and 3-D are supported")
    stride, dilation = [int(s) for s in stride], [int(d) for d in dilation]
    begin, end = _explicit_pads(padding, x.shape[2:], weight.shape[2:], stride, dilation)
    if padding_mode != "zeros":
        x = F.pad(x, _torch_pads(begin, end), mode=padding_mode)
        begin = end = [0] * ndim
    elif begin != end:
        x = F.pad(x, _torch_pads(begin, end))
        begin = [0] * ndim
    return _CONV[ndim](x, weight, bias, stride, begin, dilation, int(groups))


def _convolve_transpose(x: Tensor, weight: Tensor, bias: Tensor | None, stride: Sequence[int], padding: Any,
                        dilation: Sequence[int], groups: int, output_padding: Sequence[int],
                        output_shape: Sequence[int] | None = None, auto_pad: str = "NOTSET") -> Tensor:
    """ONNX ConvTranspose: the full transposed convolution, ``output_padding`` added at the end, ``pads`` cropped.

    ``padding`` takes the IR forms; "same"/"same_lower" (and ``output_shape``) derive the pads from
    ``total = stride (in - 1) + output_padding + (k - 1) dilation + 1 - out`` as the ONNX spec does.
    """
    ndim = weight.dim() - 2
    if ndim not in _CONV_T:
        raise ValueError(f"a {ndim}-D transposed convolution; 1-D, 2-D and 3-D are supported")
    stride, dilation = [int(s) for s in stride], [int(d) for d in dilation]
    output_padding = [int(p) for p in output_padding] or [0] * ndim
    kernel = weight.shape[2:]
    sizes = x.shape[2:]
    if output_shape is not None or (isinstance(padding, str) and padding in ("same", "same_lower")):
        if output_shape is not None:
            target = [int(v) for v in output_shape][-ndim:]
        else:
            target = [int(size) * s for size, s in zip(sizes, stride, strict=True)]
        begin, end = [], []
        for axis in range(ndim):
            full = stride[axis] * (int(sizes[axis]) - 1) + output_padding[axis] + (int(kernel[axis]) - 1) * \
                dilation[axis] + 1
            total = full - target[axis]
            upper = padding == "same" if output_shape is None else auto_pad == "SAME_UPPER"
            small, big = total // 2, total - total // 2
            begin.append(small if upper else big)
            end.append(big if upper else small)
    elif isinstance(padding, str):
        if padding != "valid":
            raise ValueError(f"padding {padding!r} is unknown")
        begin, end = [0] * ndim, [0] * ndim
    else:
        values = [int(v) for v in padding]
        begin, end = (values, values) if len(values) == ndim else (values[:ndim], values[ndim:])
    fits = all(p < max(s, d) for p, s, d in zip(output_padding, stride, dilation, strict=True))
    if begin == end and fits and min(begin, default=0) >= 0:
        return _CONV_T[ndim](x, weight, bias, stride, begin, output_padding, int(groups), dilation)
    y = _CONV_T[ndim](x, weight, None, stride, 0, 0, int(groups), dilation)
    y = F.pad(y, _torch_pads([-b for b in begin], [op - e for op, e in zip(output_padding, end, strict=True)]))
    if bias is not None:
        y = y + bias.reshape(1, -1, *([1] * ndim))
    return y


def _onnx_padding(attrs: dict[str, Any], ndim: int) -> Any:
    """An ONNX node's ``auto_pad``/``pads`` as an IR ``padding`` form."""
    auto_pad = _text(attrs.get("auto_pad", "NOTSET"))
    if auto_pad in ("", "NOTSET"):
        pads = [int(p) for p in attrs.get("pads", [0] * (2 * ndim))]
        return pads
    forms = {"SAME_UPPER": "same", "SAME_LOWER": "same_lower", "VALID": "valid"}
    if auto_pad not in forms:
        raise ValueError(f"auto_pad {auto_pad!r} is unknown")
    return forms[auto_pad]


@onnx_op("Conv")
def _conv(step: _Step, x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    attrs, ndim = step.attrs, w.dim() - 2
    return _convolve(x, w, b, attrs.get("strides", [1] * ndim), _onnx_padding(attrs, ndim),
                     attrs.get("dilations", [1] * ndim), int(attrs.get("group", 1)))


@onnx_op("ConvTranspose")
def _conv_transpose(step: _Step, x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    attrs, ndim = step.attrs, w.dim() - 2
    padding = _onnx_padding(attrs, ndim)
    output_shape = attrs.get("output_shape")
    auto_pad = _text(attrs.get("auto_pad", "NOTSET"))
    return _convolve_transpose(x, w, b, attrs.get("strides", [1] * ndim), padding, attrs.get("dilations", [1] * ndim),
                               int(attrs.get("group", 1)), attrs.get("output_padding", [0] * ndim),
                               output_shape if output_shape else None, auto_pad)


@onnx_op("Gemm")
def _gemm(step: _Step, a: Tensor, b: Tensor, c: Tensor | None = None) -> Tensor:
    attrs = step.attrs
    if attrs.get("transA", 0):
        a = a.transpose(0, 1)
    if attrs.get("transB", 0):
        b = b.transpose(0, 1)
    return _scaled(step, torch.matmul(a, b), c)


@onnx_op("MatMul")
def _matmul(step: _Step, a: Tensor, b: Tensor) -> Tensor:
    return torch.matmul(a, b)


@onnx_op("Einsum")
def _einsum(step: _Step, *inputs: Tensor) -> Tensor:
    return torch.einsum(_text(step.attrs["equation"]), *inputs)


# ------------------------------------------------------------------------------- elementwise

def _ints(value: Any) -> list[int]:
    """An ONNX integer list given as a tensor (input form) or a sequence (attribute form)."""
    if isinstance(value, Tensor):
        return [int(v) for v in value.reshape(-1).tolist()]
    if isinstance(value, np.ndarray):
        return [int(v) for v in value.reshape(-1).tolist()]
    return [int(v) for v in value]


def _scalar(value: Tensor) -> Any:
    return value.reshape(-1)[0].item()


def _axis(axis: int, rank: int) -> int:
    axis = int(axis)
    if not -rank <= axis < max(rank, 1):
        raise ValueError(f"axis {axis} is out of range for a tensor of rank {rank}")
    return axis + rank if axis < 0 else axis


def _binary(function: Callable[..., Tensor]) -> OpFunction:
    def run(step: _Step, a: Tensor, b: Tensor) -> Tensor:
        return function(a, b)
    return run


_BINARY: dict[str, Callable[..., Tensor]] = {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "And": torch.logical_and, "Or": torch.logical_or,
    "Xor": torch.logical_xor, "Equal": torch.eq, "Less": torch.lt, "Greater": torch.gt, "LessOrEqual": torch.le,
    "GreaterOrEqual": torch.ge, "BitwiseAnd": torch.bitwise_and, "BitwiseOr": torch.bitwise_or,
    "BitwiseXor": torch.bitwise_xor,
}
for _name, _function in _BINARY.items():
    onnx_op(_name)(_binary(_function))


@onnx_op("Div")
def _div(step: _Step, a: Tensor, b: Tensor) -> Tensor:
    if a.is_floating_point() or b.is_floating_point():
        return torch.div(a, b)
    return torch.div(a, b, rounding_mode="trunc")  # ONNX integer division truncates toward zero


@onnx_op("Pow")
def _pow(step: _Step, base: Tensor, exponent: Tensor) -> Tensor:
    return torch.pow(base, exponent).to(base.dtype)  # ONNX: the result has the base's type


@onnx_op("Mod")
def _mod(step: _Step, a: Tensor, b: Tensor) -> Tensor:
    return torch.fmod(a, b) if step.attrs.get("fmod", 0) else torch.remainder(a, b)


def _variadic(function: Callable[[Tensor, Tensor], Tensor]) -> OpFunction:
    def run(step: _Step, *inputs: Tensor) -> Tensor:
        return functools.reduce(function, inputs)
    return run


onnx_op("Sum")(_variadic(torch.add))
onnx_op("Max")(_variadic(torch.maximum))
onnx_op("Min")(_variadic(torch.minimum))


@onnx_op("Mean")
def _mean(step: _Step, *inputs: Tensor) -> Tensor:
    return functools.reduce(torch.add, inputs) / len(inputs)


def _unary(function: Callable[..., Tensor]) -> OpFunction:
    def run(step: _Step, x: Tensor) -> Tensor:
        return function(x)
    return run


_UNARY: dict[str, Callable[..., Tensor]] = {
    "Sqrt": torch.sqrt, "Exp": torch.exp, "Log": torch.log, "Erf": torch.erf, "Relu": torch.relu,
    "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Neg": torch.neg, "Abs": torch.abs, "Reciprocal": torch.reciprocal,
    "Floor": torch.floor, "Ceil": torch.ceil, "Round": torch.round, "Sign": torch.sign, "Sin": torch.sin,
    "Cos": torch.cos, "Tan": torch.tan, "Atan": torch.atan, "Asin": torch.asin, "Acos": torch.acos,
    "Sinh": torch.sinh, "Cosh": torch.cosh, "Softplus": F.softplus, "Softsign": F.softsign,
    "HardSwish": F.hardswish, "Mish": F.mish, "Not": torch.logical_not, "IsNaN": torch.isnan,
    "BitwiseNot": torch.bitwise_not,
}
for _name, _function in _UNARY.items():
    onnx_op(_name)(_unary(_function))


@onnx_op("Identity")
def _identity(step: _Step, x: Tensor) -> Tensor:
    return x


@onnx_op("Dropout")
def _dropout(step: _Step, x: Tensor, ratio: Tensor | None = None, training_mode: Tensor | None = None) -> Result:
    if training_mode is not None and bool(_scalar(training_mode)):
        raise ValueError("training-mode Dropout is not supported (the rebuilt graph runs ONNX inference semantics; "
                         "use torch.nn.Dropout around the module to train with dropout)")
    if len(step.outputs) > 1 and step.outputs[1]:
        return x, torch.ones_like(x, dtype=torch.bool)
    return x


@onnx_op("IsInf")
def _isinf(step: _Step, x: Tensor) -> Tensor:
    positive, negative = step.attrs.get("detect_positive", 1), step.attrs.get("detect_negative", 1)
    if positive and negative:
        return torch.isinf(x)
    if positive:
        return torch.isposinf(x)
    return torch.isneginf(x) if negative else torch.zeros_like(x, dtype=torch.bool)


@onnx_op("LeakyRelu")
def _leaky_relu(step: _Step, x: Tensor) -> Tensor:
    return F.leaky_relu(x, float(step.attrs.get("alpha", 0.01)))


@onnx_op("Elu")
def _elu(step: _Step, x: Tensor) -> Tensor:
    return F.elu(x, float(step.attrs.get("alpha", 1.0)))


@onnx_op("Celu")
def _celu(step: _Step, x: Tensor) -> Tensor:
    return F.celu(x, float(step.attrs.get("alpha", 1.0)))


@onnx_op("Selu")
def _selu(step: _Step, x: Tensor) -> Tensor:
    alpha = float(step.attrs.get("alpha", 1.67326319217681884765625))
    gamma = float(step.attrs.get("gamma", 1.05070102214813232421875))
    return gamma * torch.where(x > 0, x, alpha * torch.expm1(x))


@onnx_op("ThresholdedRelu")
def _thresholded_relu(step: _Step, x: Tensor) -> Tensor:
    return torch.where(x > float(step.attrs.get("alpha", 1.0)), x, torch.zeros_like(x))


@onnx_op("HardSigmoid")
def _hard_sigmoid(step: _Step, x: Tensor) -> Tensor:
    alpha, beta = float(step.attrs.get("alpha", 0.2)), float(step.attrs.get("beta", 0.5))
    return torch.clamp(x * alpha + beta, 0.0, 1.0)


@onnx_op("Gelu")
def _gelu(step: _Step, x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh" if _text(step.attrs.get("approximate", "none")) == "tanh" else "none")


@onnx_op("PRelu")
def _prelu(step: _Step, x: Tensor, slope: Tensor) -> Tensor:
    return torch.where(x < 0, x * slope, x)


@onnx_op("Clip")
def _clip(step: _Step, x: Tensor, low: Tensor | None = None, high: Tensor | None = None) -> Tensor:
    if step.opset < 11:
        low_value, high_value = step.attrs.get("min"), step.attrs.get("max")
        return torch.clamp(x, min=low_value, max=high_value) if low_value is not None or high_value is not None \
            else x
    if low is None and high is None:
        return x
    return torch.clamp(x, min=low, max=high)


@onnx_op("Where")
def _where(step: _Step, condition: Tensor, a: Tensor, b: Tensor) -> Tensor:
    return torch.where(condition.bool(), a, b)


@onnx_op("Cast")
def _cast(step: _Step, x: Tensor) -> Tensor:
    to = int(step.attrs["to"])
    if to not in ONNX_DTYPES:
        raise ValueError(f"Cast to ONNX type {to} is not supported (supported: {sorted(ONNX_DTYPES)})")
    return x.to(ONNX_DTYPES[to])


@onnx_op("CastLike")
def _cast_like(step: _Step, x: Tensor, like: Tensor) -> Tensor:
    return x.to(like.dtype)


# ---------------------------------------------------------------------------- normalisations

def _coerced(function: Callable[..., Tensor]) -> OpFunction:
    """Softmax/LogSoftmax: below opset 13 the input is coerced to 2-D at ``axis`` (default 1)."""

    def run(step: _Step, x: Tensor) -> Tensor:
        if step.opset >= 13:
            return function(x, dim=int(step.attrs.get("axis", -1)))
        axis = _axis(step.attrs.get("axis", 1), x.dim())
        shape = x.shape
        flat = x.reshape(math.prod(shape[:axis]), math.prod(shape[axis:]))
        return function(flat, dim=1).reshape(shape)

    return run


onnx_op("Softmax")(_coerced(torch.softmax))
onnx_op("LogSoftmax")(_coerced(torch.log_softmax))


@onnx_op("LayerNormalization")
def _layer_normalization(step: _Step, x: Tensor, scale: Tensor, bias: Tensor | None = None) -> Result:
    axis = _axis(step.attrs.get("axis", -1), x.dim())
    epsilon = float(step.attrs.get("epsilon", 1e-5))
    shape = tuple(x.shape[axis:])
    source = x
    if x.dtype in (torch.float16, torch.bfloat16):
        source = x.float()
    if tuple(scale.shape) == shape and (bias is None or tuple(bias.shape) == shape):
        y = F.layer_norm(source, shape, scale.to(source.dtype),
                         None if bias is None else bias.to(source.dtype), epsilon)
    else:
        y = F.layer_norm(source, shape, None, None, epsilon) * scale
        y = y if bias is None else y + bias
    y = y.to(x.dtype)
    if len(step.outputs) == 1:
        return y
    dims = tuple(range(axis, x.dim()))
    mean = source.mean(dim=dims, keepdim=True)
    inv_std = torch.rsqrt(source.var(dim=dims, keepdim=True, unbiased=False) + epsilon)
    return y, mean, inv_std


@onnx_op("BatchNormalization")
def _batch_normalization(step: _Step, x: Tensor, scale: Tensor, bias: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    if step.attrs.get("training_mode", 0):
        raise ValueError("training-mode BatchNormalization is not supported (inference mode only)")
    if not step.attrs.get("spatial", 1):
        raise ValueError("BatchNormalization with spatial=0 is not supported")
    return F.batch_norm(x, mean, var, scale, bias, training=False, eps=float(step.attrs.get("epsilon", 1e-5)))


@onnx_op("InstanceNormalization")
def _instance_normalization(step: _Step, x: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    return F.instance_norm(x, weight=scale, bias=bias, eps=float(step.attrs.get("epsilon", 1e-5)))


# ------------------------------------------------------------------------------------ pooling

_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


@dataclass(slots=True)
class _Window:
    """A pooling window in ONNX terms, resolved for one input: pads, output sizes, the padding needed."""

    kernel: list[int]
    stride: list[int]
    dilation: list[int]
    begin: list[int]
    end: list[int]  # the explicit end pads
    extra: list[int]  # end padding needed beyond ``end`` for ceil_mode's last window
    out: list[int]


def _window(step: _Step, x: Tensor) -> _Window:
    attrs = step.attrs
    kernel = [int(k) for k in attrs["kernel_shape"]]
    ndim = len(kernel)
    stride = [int(s) for s in attrs.get("strides", [1] * ndim)]
    dilation = [int(d) for d in attrs.get("dilations", [1] * ndim)]
    sizes = [int(s) for s in x.shape[2:]]
    if len(sizes) != ndim:
        raise ValueError(f"kernel_shape {kernel} needs a {ndim + 2}-D input, got shape {list(x.shape)}")
    padding = _onnx_padding(attrs, ndim)
    if isinstance(padding, str):
        begin, end = _explicit_pads(padding, sizes, kernel, stride, dilation)
    else:
        begin, end = padding[:ndim], padding[ndim:]
    ceil = bool(attrs.get("ceil_mode", 0))
    out, extra = [], []
    for size, k, s, d, b, e in zip(sizes, kernel, stride, dilation, begin, end, strict=True):
        span = (k - 1) * d + 1
        length = size + b + e - span
        count = (-(-length // s) if ceil else length // s) + 1
        if ceil and (count - 1) * s >= size + b:  # the last window may not start in the end padding
            count -= 1
        out.append(count)
        extra.append(max(0, (count - 1) * s + span - (size + b + e)))
    return _Window(kernel, stride, dilation, list(begin), list(end), extra, out)


def _crop_to(y: Tensor, out: Sequence[int]) -> Tensor:
    for axis, count in enumerate(out):
        if y.shape[2 + axis] != count:
            y = y.narrow(2 + axis, 0, count)
    return y


@onnx_op("MaxPool")
def _max_pool(step: _Step, x: Tensor) -> Result:
    window = _window(step, x)
    ndim = len(window.kernel)
    if ndim not in _MAX_POOL:
        raise ValueError(f"a {ndim}-D MaxPool; 1-D, 2-D and 3-D are supported")
    want_indices = len(step.outputs) > 1 and bool(step.outputs[1])
    if want_indices and step.attrs.get("storage_order", 0):
        raise ValueError("MaxPool indices in column-major storage_order are not supported")
    ends = [e + extra for e, extra in zip(window.end, window.extra, strict=True)]
    padded = F.pad(x, _torch_pads(window.begin, ends), value=-math.inf) if any(window.begin) or any(ends) else x
    pool: Callable[..., Any] = _MAX_POOL[ndim]
    result = pool(padded, window.kernel, window.stride, 0, window.dilation, False, want_indices)
    if not want_indices:
        return _crop_to(result, window.out)
    values, flat = result
    values, flat = _crop_to(values, window.out), _crop_to(flat, window.out)
    # torch indexes the padded plane; ONNX indexes the whole unpadded tensor in row-major order
    padded_sizes, sizes = padded.shape[2:], x.shape[2:]
    index = torch.zeros_like(flat)
    remainder = flat
    coordinates = []
    for axis in reversed(range(ndim)):
        coordinates.append(remainder % padded_sizes[axis] - window.begin[axis])
        remainder = torch.div(remainder, padded_sizes[axis], rounding_mode="floor")
    for axis, coordinate in zip(range(ndim), reversed(coordinates), strict=True):
        index = index * sizes[axis] + coordinate
    planes = torch.arange(x.shape[0] * x.shape[1], device=x.device).reshape(x.shape[0], x.shape[1],
                                                                             *([1] * ndim))
    return values, index + planes * math.prod(sizes)


@onnx_op("AveragePool")
def _average_pool(step: _Step, x: Tensor) -> Tensor:
    window = _window(step, x)
    ndim = len(window.kernel)
    if ndim not in _AVG_POOL:
        raise ValueError(f"a {ndim}-D AveragePool; 1-D, 2-D and 3-D are supported")
    if any(d != 1 for d in window.dilation):
        raise ValueError(f"AveragePool with dilations {window.dilation} is not supported")
    ends = [e + extra for e, extra in zip(window.end, window.extra, strict=True)]
    if not any(window.begin) and not any(ends):
        return _crop_to(_AVG_POOL[ndim](x, window.kernel, window.stride), window.out)
    padded = F.pad(x, _torch_pads(window.begin, ends))
    # the divisor: input elements only (count_include_pad=0) or also the explicit pads, never ceil's overhang
    mask = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
    if step.attrs.get("count_include_pad", 0):
        mask = F.pad(mask, _torch_pads(window.begin, window.end), value=1.0)
        mask = F.pad(mask, _torch_pads([0] * ndim, window.extra))
    else:
        mask = F.pad(mask, _torch_pads(window.begin, ends))
    total = _AVG_POOL[ndim](padded, window.kernel, window.stride)
    count = _AVG_POOL[ndim](mask, window.kernel, window.stride)
    return _crop_to(total / count, window.out)


@onnx_op("GlobalAveragePool")
def _global_average_pool(step: _Step, x: Tensor) -> Tensor:
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


@onnx_op("GlobalMaxPool")
def _global_max_pool(step: _Step, x: Tensor) -> Tensor:
    return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


# ------------------------------------------------------------------------------------- shapes

@onnx_op("Flatten")
def _flatten(step: _Step, x: Tensor) -> Tensor:
    axis = int(step.attrs.get("axis", 1))
    axis = axis + x.dim() if axis < 0 else axis
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


@onnx_op("Reshape")
def _reshape(step: _Step, x: Tensor, shape: Tensor | None = None) -> Tensor:
    values = _ints(shape) if shape is not None else _ints(step.attrs["shape"])
    return x.reshape(_dataflow.onnx_shape(values, x.shape, bool(step.attrs.get("allowzero", 0))))


@onnx_op("Transpose")
def _transpose(step: _Step, x: Tensor) -> Tensor:
    perm = step.attrs.get("perm")
    return x.permute(*(_ints(perm) if perm is not None else reversed(range(x.dim()))))


@onnx_op("Concat")
def _concat(step: _Step, *inputs: Tensor | None) -> Tensor:
    tensors = [tensor for tensor in inputs if tensor is not None]
    return torch.cat(tensors, dim=_axis(step.attrs["axis"], tensors[0].dim()))


@onnx_op("Split")
def _split(step: _Step, x: Tensor, split: Tensor | None = None) -> Result:
    axis = _axis(step.attrs.get("axis", 0), x.dim())
    sizes = _ints(split) if split is not None else step.attrs.get("split")
    if sizes is not None and len(sizes):
        return torch.split(x, _ints(sizes), dim=axis)
    count = int(step.attrs.get("num_outputs", len(step.outputs)))
    length = x.shape[axis]
    if "num_outputs" in step.attrs:  # opset 18: equal chunks, the last one smaller
        chunk = -(-length // count)
        return torch.split(x, [chunk] * (count - 1) + [length - chunk * (count - 1)], dim=axis)
    if length % count:
        raise ValueError(f"cannot split {length} elements of axis {axis} into {count} equal parts")
    return torch.split(x, length // count, dim=axis)


def _slice_axis(x: Tensor, axis: int, start: int, end: int, step: int) -> Tensor:
    """``x[start:end:step]`` on ``axis`` with ONNX's clamping (negative steps included)."""
    if step == 0:
        raise ValueError("Slice step 0")
    size = x.shape[axis]
    start = start + size if start < 0 else start
    end = end + size if end < 0 else end
    if step > 0:
        start, end = min(max(start, 0), size), min(max(end, 0), size)
        if start == 0 and end == size and step == 1:
            return x
        return x.narrow(axis, start, max(end - start, 0)) if step == 1 else \
            x.index_select(axis, torch.arange(start, end, step, device=x.device))
    start, end = min(max(start, 0), size - 1), min(max(end, -1), size - 1)
    return x.index_select(axis, torch.arange(start, end, step, device=x.device))


@onnx_op("Slice")
def _slice(step: _Step, x: Tensor, starts: Tensor | None = None, ends: Tensor | None = None,
           axes: Tensor | None = None, steps: Tensor | None = None) -> Tensor:
    if step.opset < 10:
        begin, finish = _ints(step.attrs["starts"]), _ints(step.attrs["ends"])
        axes_list = _ints(step.attrs["axes"]) if "axes" in step.attrs else list(range(len(begin)))
        strides = [1] * len(begin)
    else:
        assert starts is not None and ends is not None
        begin, finish = _ints(starts), _ints(ends)
        axes_list = _ints(axes) if axes is not None else list(range(len(begin)))
        strides = _ints(steps) if steps is not None else [1] * len(begin)
    for axis, start, end, stride in zip(axes_list, begin, finish, strides, strict=True):
        x = _slice_axis(x, _axis(axis, x.dim()), start, end, stride)
    return x


def _positive(indices: Tensor, size: int) -> Tensor:
    indices = indices.long()
    return torch.where(indices < 0, indices + size, indices)


@onnx_op("Gather")
def _gather(step: _Step, x: Tensor, indices: Tensor) -> Tensor:
    axis = _axis(step.attrs.get("axis", 0), x.dim())
    flat = _positive(indices, x.shape[axis]).reshape(-1)
    picked = torch.index_select(x, axis, flat)
    return picked.reshape((*x.shape[:axis], *indices.shape, *x.shape[axis + 1:]))


@onnx_op("GatherElements")
def _gather_elements(step: _Step, x: Tensor, indices: Tensor) -> Tensor:
    axis = _axis(step.attrs.get("axis", 0), x.dim())
    return torch.gather(x, axis, _positive(indices, x.shape[axis]))


def _nd_index(x: Tensor, indices: Tensor, batch_dims: int) -> tuple[Tensor, tuple[Tensor, ...], list[int]]:
    """GatherND/ScatterND addressing: ``x`` with its batch dims flattened, the index tuple, the index shape."""
    depth = indices.shape[-1]
    batch = math.prod(x.shape[:batch_dims])
    data = x.reshape(batch, *x.shape[batch_dims:])
    rows = indices.long().reshape(batch, -1, depth)
    columns = tuple(_positive(rows[..., j], data.shape[1 + j]) for j in range(depth))
    batch_index = torch.arange(batch, device=x.device).reshape(batch, 1).expand(batch, rows.shape[1])
    return data, (batch_index, *columns), list(indices.shape[:-1])


@onnx_op("GatherND")
def _gather_nd(step: _Step, x: Tensor, indices: Tensor) -> Tensor:
    batch_dims = int(step.attrs.get("batch_dims", 0))
    data, index, shape = _nd_index(x, indices, batch_dims)
    return data[index].reshape((*shape, *x.shape[batch_dims + indices.shape[-1]:]))


@onnx_op("ScatterND")
def _scatter_nd(step: _Step, x: Tensor, indices: Tensor, updates: Tensor) -> Tensor:
    reduction = _text(step.attrs.get("reduction", "none"))
    if reduction not in ("none", "add"):
        raise ValueError(f"ScatterND reduction {reduction!r} is not supported ('none', 'add')")
    data, index, _ = _nd_index(x, indices, 0)
    data = data.clone()
    values = updates.reshape(1, -1, *x.shape[indices.shape[-1]:])
    data.index_put_(index, values, accumulate=reduction == "add")
    return data.reshape(x.shape)


@onnx_op("ScatterElements")
def _scatter_elements(step: _Step, x: Tensor, indices: Tensor, updates: Tensor) -> Tensor:
    axis = _axis(step.attrs.get("axis", 0), x.dim())
    indices = _positive(indices, x.shape[axis])
    reduction = _text(step.attrs.get("reduction", "none"))
    if reduction == "none":
        return torch.scatter(x, axis, indices, updates)
    reduce = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}.get(reduction)
    if reduce is None:
        raise ValueError(f"ScatterElements reduction {reduction!r} is unknown")
    return torch.scatter_reduce(x, axis, indices, updates, reduce, include_self=True)


def _axes(step: _Step, axes: Tensor | None) -> list[int] | None:
    """Axes given as an input (newer opsets) or an attribute (older ones); None when absent."""
    if axes is not None:
        return _ints(axes)
    value = step.attrs.get("axes")
    return None if value is None else _ints(value)


@onnx_op("Unsqueeze")
def _unsqueeze(step: _Step, x: Tensor, axes: Tensor | None = None) -> Tensor:
    listed = _axes(step, axes) or []
    rank = x.dim() + len(listed)
    for axis in sorted(_axis(axis, rank) for axis in listed):
        x = x.unsqueeze(axis)
    return x


@onnx_op("Squeeze")
def _squeeze(step: _Step, x: Tensor, axes: Tensor | None = None) -> Tensor:
    listed = _axes(step, axes)
    if not listed:
        return x.squeeze()
    dims = tuple(_axis(axis, x.dim()) for axis in listed)
    wrong = [dim for dim in dims if x.shape[dim] != 1]
    if wrong:
        raise ValueError(f"cannot squeeze axes {wrong} of shape {list(x.shape)}: their size is not 1")
    return x.squeeze(dims)


@onnx_op("Shape")
def _shape(step: _Step, x: Tensor) -> Tensor:
    start, end = step.attrs.get("start", 0), step.attrs.get("end")
    dims = list(x.shape)[int(start):None if end is None else int(end)]
    return torch.tensor(dims, dtype=torch.int64, device=x.device)


@onnx_op("Size")
def _size(step: _Step, x: Tensor) -> Tensor:
    return torch.tensor(x.numel(), dtype=torch.int64, device=x.device)


@onnx_op("Expand")
def _expand(step: _Step, x: Tensor, shape: Tensor) -> Tensor:
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(_ints(shape))))


@onnx_op("Tile")
def _tile(step: _Step, x: Tensor, repeats: Tensor) -> Tensor:
    return x.repeat(*_ints(repeats))


@onnx_op("Range")
def _range(step: _Step, start: Tensor, limit: Tensor, delta: Tensor) -> Tensor:
    first, last, stride = _scalar(start), _scalar(limit), _scalar(delta)
    count = max(math.ceil((last - first) / stride), 0)
    return (torch.arange(count, device=start.device, dtype=torch.float64 if start.is_floating_point()
                         else torch.int64) * stride + first).to(start.dtype)


@onnx_op("ConstantOfShape")
def _constant_of_shape(step: _Step, shape: Tensor) -> Tensor:
    value = step.attrs.get("value")
    array = np.zeros(1, np.float32) if value is None else np.asarray(value).reshape(-1)
    fill = torch.from_numpy(array.copy())
    return torch.full(_ints(shape), fill[0].item(), dtype=fill.dtype, device=shape.device)


def _constant(step: _Step) -> Tensor:
    """The value of an ONNX ``Constant`` node the frontend kept as a node (evaluated once, at build time)."""
    attrs = step.attrs
    if "value" in attrs:
        return torch.from_numpy(np.array(attrs["value"], copy=True))
    if "value_float" in attrs:
        return torch.tensor(float(attrs["value_float"]), dtype=torch.float32)
    if "value_floats" in attrs:
        return torch.tensor([float(v) for v in attrs["value_floats"]], dtype=torch.float32)
    if "value_int" in attrs:
        return torch.tensor(int(attrs["value_int"]), dtype=torch.int64)
    if "value_ints" in attrs:
        return torch.tensor([int(v) for v in attrs["value_ints"]], dtype=torch.int64)
    raise ValueError(f"a Constant with attributes {sorted(attrs)} (strings, sparse tensors) has no tensor value")


@onnx_op("Constant")
def _constant_op(step: _Step) -> Tensor:
    return _constant(step)


@onnx_op("Pad")
def _pad(step: _Step, x: Tensor, pads: Tensor | None = None, value: Tensor | None = None,
         axes: Tensor | None = None) -> Tensor:
    if step.opset < 11:
        amounts, fill = _ints(step.attrs["pads"]), float(step.attrs.get("value", 0.0))
    else:
        assert pads is not None
        amounts, fill = _ints(pads), (_scalar(value) if value is not None and value.numel() else 0)
    mode = _text(step.attrs.get("mode", "constant"))
    listed = [_axis(axis, x.dim()) for axis in _ints(axes)] if axes is not None else list(range(x.dim()))
    count = len(listed)
    if len(amounts) != 2 * count:
        raise ValueError(f"pads {amounts} do not have 2 x {count} entries")
    begin, end = [0] * x.dim(), [0] * x.dim()
    for position, axis in enumerate(listed):
        begin[axis], end[axis] = amounts[position], amounts[count + position]
    if mode == "constant":
        if not x.is_floating_point():
            fill = int(fill)
        return F.pad(x, _torch_pads(begin, end), value=fill)
    if mode not in ("reflect", "edge", "wrap"):
        raise ValueError(f"Pad mode {mode!r} is unknown (constant, reflect, edge, wrap)")
    for axis in range(x.dim()):
        if begin[axis] == 0 and end[axis] == 0:
            continue
        size = x.shape[axis]
        position_index = torch.arange(-begin[axis], size + end[axis], device=x.device)
        if mode == "edge":
            index = position_index.clamp(0, size - 1)
        elif mode == "wrap":
            index = torch.remainder(position_index, size)
        elif size == 1:
            index = torch.zeros_like(position_index)
        else:
            period = 2 * (size - 1)
            folded = torch.remainder(position_index.abs(), period)
            index = torch.where(folded >= size, period - folded, folded)
        x = x.index_select(axis, index)
    return x


# ---------------------------------------------------------------------------------- reductions

def _reduction(function: Callable[[Tensor, tuple[int, ...], bool], Tensor]) -> OpFunction:
    """ReduceX: axes as attribute (old opsets) or input (ReduceSum 13+, the others 18+), keepdims, noop."""

    def run(step: _Step, x: Tensor, axes: Tensor | None = None) -> Tensor:
        listed = _axes(step, axes)
        keep = bool(step.attrs.get("keepdims", 1))
        if not listed:
            if step.attrs.get("noop_with_empty_axes", 0):
                return x
            listed = list(range(x.dim()))
        dims = tuple(sorted({_axis(axis, x.dim()) for axis in listed}))
        return function(x, dims, keep)

    return run


def _prod(x: Tensor, dims: tuple[int, ...], keep: bool) -> Tensor:
    for dim in sorted(dims, reverse=True):
        x = torch.prod(x, dim=dim, keepdim=keep)
    return x


for _name, _reduce in {
    "ReduceMean": lambda x, dims, keep: torch.mean(x, dim=dims, keepdim=keep),
    "ReduceSum": lambda x, dims, keep: torch.sum(x, dim=dims, keepdim=keep),
    "ReduceMax": lambda x, dims, keep: torch.amax(x, dim=dims, keepdim=keep),
    "ReduceMin": lambda x, dims, keep: torch.amin(x, dim=dims, keepdim=keep),
    "ReduceProd": _prod,
    "ReduceL1": lambda x, dims, keep: torch.sum(x.abs(), dim=dims, keepdim=keep),
    "ReduceL2": lambda x, dims, keep: torch.sqrt(torch.sum(x * x, dim=dims, keepdim=keep)),
    "ReduceSumSquare": lambda x, dims, keep: torch.sum(x * x, dim=dims, keepdim=keep),
    "ReduceLogSum": lambda x, dims, keep: torch.log(torch.sum(x, dim=dims, keepdim=keep)),
    "ReduceLogSumExp": lambda x, dims, keep: torch.logsumexp(x, dim=dims, keepdim=keep),
}.items():
    onnx_op(_name)(_reduction(_reduce))


def _arg(function: Callable[..., Tensor]) -> OpFunction:
    def run(step: _Step, x: Tensor) -> Tensor:
        axis = _axis(step.attrs.get("axis", 0), x.dim())
        keep = bool(step.attrs.get("keepdims", 1))
        if step.attrs.get("select_last_index", 0):
            flipped = function(torch.flip(x, dims=(axis,)), dim=axis, keepdim=keep)
            return x.shape[axis] - 1 - flipped
        return function(x, dim=axis, keepdim=keep)
    return run


onnx_op("ArgMax")(_arg(torch.argmax))
onnx_op("ArgMin")(_arg(torch.argmin))


@onnx_op("CumSum")
def _cumsum(step: _Step, x: Tensor, axis: Tensor) -> Tensor:
    dim = _axis(_scalar(axis), x.dim())
    reverse, exclusive = step.attrs.get("reverse", 0), step.attrs.get("exclusive", 0)
    if reverse:
        x = torch.flip(x, dims=(dim,))
    y = torch.cumsum(x, dim=dim)
    if exclusive:
        y = torch.cat([torch.zeros_like(y.narrow(dim, 0, 1)), y.narrow(dim, 0, y.shape[dim] - 1)], dim=dim)
    return torch.flip(y, dims=(dim,)) if reverse else y


@onnx_op("Trilu")
def _trilu(step: _Step, x: Tensor, k: Tensor | None = None) -> Tensor:
    diagonal = int(_scalar(k)) if k is not None else 0
    return torch.triu(x, diagonal) if step.attrs.get("upper", 1) else torch.tril(x, diagonal)


@onnx_op("TopK")
def _topk(step: _Step, x: Tensor, k: Tensor) -> Result:
    axis = _axis(step.attrs.get("axis", -1), x.dim())
    values, indices = torch.topk(x, int(_scalar(k)), dim=axis, largest=bool(step.attrs.get("largest", 1)),
                                 sorted=True)
    return values, indices


@onnx_op("OneHot")
def _one_hot(step: _Step, indices: Tensor, depth: Tensor, values: Tensor) -> Tensor:
    size = int(_scalar(depth))
    positions = _positive(indices, size)
    hot = positions.unsqueeze(-1) == torch.arange(size, device=indices.device)
    result = torch.where(hot, values[1], values[0])
    axis = _axis(step.attrs.get("axis", -1), indices.dim() + 1)
    return result.movedim(-1, axis)


@onnx_op("NonZero")
def _non_zero(step: _Step, x: Tensor) -> Tensor:
    return torch.nonzero(x).T.contiguous()


@onnx_op("DepthToSpace")
def _depth_to_space(step: _Step, x: Tensor) -> Tensor:
    block = int(step.attrs["blocksize"])
    n, c, h, w = x.shape
    if _text(step.attrs.get("mode", "DCR")) == "CRD":
        y = x.reshape(n, c // (block * block), block, block, h, w).permute(0, 1, 4, 2, 5, 3)
    else:
        y = x.reshape(n, block, block, c // (block * block), h, w).permute(0, 3, 4, 1, 5, 2)
    return y.reshape(n, c // (block * block), h * block, w * block)


@onnx_op("SpaceToDepth")
def _space_to_depth(step: _Step, x: Tensor) -> Tensor:
    block = int(step.attrs["blocksize"])
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // block, block, w // block, block).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * block * block, h // block, w // block)


# -------------------------------------------------------------------------------------- Resize

_NEAREST: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "round_prefer_floor": lambda src: np.ceil(src - np.float32(0.5)),
    "round_prefer_ceil": lambda src: np.floor(src + np.float32(0.5)),
    "floor": np.floor,
    "ceil": np.ceil,
}


def _source_coordinates(mode: str, out_len: int, in_len: int, scale: np.float32, roi: tuple[float, float],
                        ) -> np.ndarray:
    """Where each output position samples the input (float32, onnxruntime's formulas)."""
    dst = np.arange(out_len, dtype=np.float32)
    half = np.float32(0.5)
    if mode == "half_pixel":
        return (dst + half) / scale - half
    if mode == "half_pixel_symmetric":
        adjustment = np.float32(out_len) / (scale * np.float32(in_len))
        offset = np.float32(in_len) / np.float32(2) * (np.float32(1) - adjustment)
        return offset + (dst + half) / scale - half
    if mode == "pytorch_half_pixel":
        return (dst + half) / scale - half if out_len > 1 else np.zeros(out_len, np.float32)
    if mode == "align_corners":
        if out_len == 1:
            return np.zeros(1, np.float32)
        return dst * np.float32(in_len - 1) / np.float32(out_len - 1)
    if mode == "asymmetric":
        return dst / scale
    if mode == "tf_crop_and_resize":
        start, end = np.float32(roi[0]), np.float32(roi[1])
        if out_len == 1:
            return np.full(1, (end - start) * np.float32(in_len - 1) * half + start * np.float32(in_len - 1),
                           np.float32)
        return start * np.float32(in_len - 1) + dst * (end - start) * np.float32(in_len - 1) / np.float32(out_len - 1)
    raise ValueError(f"coordinate_transformation_mode {mode!r} is unknown")


def _cubic_weights(t: np.ndarray, a: float) -> np.ndarray:
    """Keys cubic weights of the taps at offsets -1, 0, 1, 2 for fractional positions ``t``."""
    def near(d: np.ndarray) -> np.ndarray:
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d: np.ndarray) -> np.ndarray:
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)


def _resize_axis(x: Tensor, axis: int, out_len: int, scale: np.float32, attrs: dict[str, Any], opset: int,
                 roi: tuple[float, float]) -> Tensor:
    in_len = x.shape[axis]
    mode = _text(attrs.get("mode", "nearest"))
    transform = _text(attrs.get("coordinate_transformation_mode", "half_pixel" if opset >= 11 else "asymmetric"))
    src = _source_coordinates(transform, out_len, in_len, scale, roi).astype(np.float64)
    outside = (src < 0) | (src > in_len - 1) if transform == "tf_crop_and_resize" else None

    def taps(index: np.ndarray) -> Tensor:
        return x.index_select(axis, torch.from_numpy(np.clip(index, 0, in_len - 1).astype(np.int64)).to(x.device))

    def weighted(weights: np.ndarray) -> Tensor:
        shape = [1] * x.dim()
        shape[axis] = out_len
        return torch.from_numpy(weights.astype(np.float32)).to(device=x.device, dtype=x.dtype).reshape(shape)

    if mode == "nearest":
        if opset < 11:  # Resize-10 rounds like Upsample: down-scaling rounds up, up-scaling truncates
            index = np.ceil(src) if scale < 1 else np.trunc(src)
        else:
            rounding = _NEAREST.get(_text(attrs.get("nearest_mode", "round_prefer_floor")))
            if rounding is None:
                raise ValueError(f"nearest_mode {attrs.get('nearest_mode')!r} is unknown")
            index = rounding(src.astype(np.float32)).astype(np.float64)
        y = taps(index.astype(np.int64))
    elif mode == "linear":
        clamped = np.clip(src, 0, in_len - 1)
        low = np.floor(clamped).astype(np.int64)
        high = np.minimum(low + 1, in_len - 1)
        fraction = clamped - low
        y = taps(low) * weighted(1 - fraction) + taps(high) * weighted(fraction)
    elif mode == "cubic":
        base = np.floor(src).astype(np.int64)
        weights = _cubic_weights(src - base, float(attrs.get("cubic_coeff_a", -0.75)))
        offsets = np.arange(-1, 3)
        indices = base[:, None] + offsets[None, :]
        if attrs.get("exclude_outside", 0):
            weights = np.where((indices < 0) | (indices > in_len - 1), 0.0, weights)
            weights = weights / weights.sum(axis=1, keepdims=True)
        y = taps(indices[:, 0]) * weighted(weights[:, 0])
        for tap in range(1, 4):
            y = y + taps(indices[:, tap]) * weighted(weights[:, tap])
    else:
        raise ValueError(f"Resize mode {mode!r} is unknown (nearest, linear, cubic)")
    if outside is not None and outside.any():
        fill = float(attrs.get("extrapolation_value", 0.0))
        y = torch.where(weighted(outside.astype(np.float32)) > 0, torch.full_like(y, fill), y)
    return y


@onnx_op("Resize", "Upsample")
def _resize(step: _Step, x: Tensor, roi: Tensor | None = None, scales: Tensor | None = None,
            sizes: Tensor | None = None) -> Tensor:
    attrs, opset = step.attrs, step.opset
    if step.op == "Upsample" or opset < 11:  # (X, scales)
        roi, scales = None, roi if roi is not None else (torch.tensor(attrs["scales"]) if "scales" in attrs
                                                         else None)
    rank = x.dim()
    axes = [_axis(axis, rank) for axis in _ints(attrs["axes"])] if "axes" in attrs else list(range(rank))
    in_sizes = [int(x.shape[axis]) for axis in axes]
    if sizes is not None and sizes.numel():
        targets = _ints(sizes)
        policy = _text(attrs.get("keep_aspect_ratio_policy", "stretch"))
        if policy == "stretch":
            factors = [np.float32(out) / np.float32(size) for out, size in zip(targets, in_sizes, strict=True)]
        else:
            ratios = [np.float32(out) / np.float32(size) for out, size in zip(targets, in_sizes, strict=True)]
            common = min(ratios) if policy == "not_larger" else max(ratios)
            factors = [np.float32(common)] * len(axes)
            targets = [int(np.floor(np.float32(common) * np.float32(size) + np.float32(0.5))) for size in in_sizes]
    elif scales is not None and scales.numel():
        factors = [np.float32(value) for value in scales.reshape(-1).tolist()]
        targets = [int(np.float32(factor) * np.float32(size)) for factor, size in zip(factors, in_sizes, strict=True)]
    else:
        raise ValueError("Resize needs scales or sizes")
    if len(factors) != len(axes):
        raise ValueError(f"Resize has {len(factors)} scales/sizes for {len(axes)} axes")
    if attrs.get("antialias", 0) and any(factor < 1 for factor in factors) and \
            _text(attrs.get("mode", "nearest")) != "nearest":
        raise ValueError("Resize with antialias=1 while down-scaling is not supported")
    roi_values = [float(v) for v in roi.reshape(-1).tolist()] if roi is not None and roi.numel() else []
    transform = _text(attrs.get("coordinate_transformation_mode", "half_pixel" if opset >= 11 else "asymmetric"))
    for position, axis in enumerate(axes):
        out_len, factor = targets[position], factors[position]
        if transform != "tf_crop_and_resize" and out_len == in_sizes[position] and factor == 1:
            continue
        if roi_values:
            count = len(roi_values) // 2
            index = position if count == len(axes) else axis
            bounds = (roi_values[index], roi_values[count + index])
        else:
            bounds = (0.0, 1.0)
        x = _resize_axis(x, axis, out_len, np.float32(factor), attrs, opset, bounds)
    return x
