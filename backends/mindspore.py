"""MindSpore backend: layer IR -> native ``nn.Cell`` and checkpoint parameters.

Mirrors ``frontends/mindspore.py``. ``build(graph, like=cell)`` returns a deep copy of ``cell`` in which
every layer the engine factorized is an ``nn.SequentialCell`` of its parts, with parameters named as
the graph names them: ``fc.0.weight``, ``fc.1.weight``, ``fc.1.bias``, ``conv.0.weight`` ... (MindSpore
fixes a parameter's name when its cell is first attached, so the names are set explicitly; a
checkpoint saved from one build loads into another with no missing or unexpected parameters).

The new parts take the replaced layer's parameter dtype, mixed-precision type (``to_float``),
``requires_grad`` and training flag. A decomposed ``Dense`` applies its activation once, after the
last factor (a copy of the original activation cell). ``like`` is not changed.

Native weights and runs, mirrored by ``backends/torch.py`` (same names and arguments), so that
framework-agnostic code (``lowrank_ir.convert`` / ``parity``) reaches MindSpore only through here:
:func:`save_weights` / :func:`load_weights` (a ``.ckpt`` checkpoint, loaded strictly),
:func:`for_inference`, :func:`as_tensors` / :func:`numpy_copy` and :func:`run_numpy`.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import mindspore as ms
import numpy as np
from mindspore import nn

from backends._dataflow import NativeOutputs, check_weights_fit, native_outputs, weights_file
from backends._mindspore_graph import GraphCell, from_dataflow, graph_params
from frontends.mindspore import copy_model
from lowrank_ir import Graph, Node, Op
from lowrank_ir._protocols import NativeBackend

__all__ = ["BUILDERS", "DATAFLOW_CLASS", "DEFAULT_LAYOUT", "GraphCell", "NativeOutputs", "as_tensors", "build",
           "build_layer", "export_onnx", "for_inference", "from_dataflow", "graph_params", "load_checkpoint",
           "load_layers", "load_weights", "native_array", "numpy_copy", "register_builder", "run_numpy", "save_weights",
           "state_dict"]

#: The class of the models :func:`from_dataflow` returns.
DATAFLOW_CLASS = GraphCell

#: How factorized layers are laid out unless the caller says (``lowrank_ir.LAYOUTS``): the reference tool's,
#: so that its checkpoints load.
DEFAULT_LAYOUT = "reference"

Builder = Callable[[Node, Graph, Any, "nn.Cell | None"], nn.Cell]

#: IR op -> function building the cell for one node (args: node, graph, parameter dtype, replaced cell).
BUILDERS: dict[Op, Builder] = {}


def register_builder(op: Op) -> Callable[[Builder], Builder]:
    def decorate(function: Builder) -> Builder:
        BUILDERS[op] = function
        return function
    return decorate


@register_builder(Op.LINEAR)
def _build_dense(node: Node, graph: Graph, dtype: Any, replaced: nn.Cell | None) -> nn.Cell:
    scales = {key: node.attrs[key] for key in ("alpha", "beta") if node.attrs.get(key, 1.0) != 1.0}
    if scales:
        raise ValueError(f"a Linear scaled by {scales} (an ONNX Gemm) has no MindSpore Dense equivalent")
    activation = node.attrs.get("activation")
    if activation and isinstance(replaced, nn.Dense) and replaced.activation_flag:
        activation = copy.deepcopy(replaced.activation)  # exactly the original's, options included
    return nn.Dense(node.attrs["in_features"], node.attrs["out_features"], has_bias="bias" in node.params,
                    activation=activation or None, dtype=dtype)


def conv2d_padding(padding: str | tuple[int, ...]) -> tuple[str, int | tuple[int, int, int, int]]:
    """MindSpore ``(pad_mode, padding)`` for an IR 2-D ``padding``; inverse of the frontend's mapping."""
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(f"padding {padding!r} has no MindSpore pad_mode (same, valid and pad exist)")
        return padding, 0
    if len(padding) == 2:
        height, width = padding
        return "pad", height if height == width else (height, height, width, width)
    if len(padding) == 4:
        top, left, bottom, right = padding
        return "pad", (top, bottom, left, right)
    raise ValueError(f"padding {padding!r} has neither 2 (per dimension) nor 4 (begin..., end...) entries")


@register_builder(Op.CONV)
def _build_conv(node: Node, graph: Graph, dtype: Any, replaced: nn.Cell | None) -> nn.Cell:
    attrs = node.attrs
    spatial = len(attrs["kernel_size"])
    if attrs.get("padding_mode", "zeros") != "zeros":
        raise ValueError(f"padding_mode {attrs['padding_mode']!r}: MindSpore convolutions pad with zeros only")
    if attrs.get("data_format") == "NHWC":
        raise ValueError("NHWC convolutions are not built: only the NCHW data format is supported")
    padding = attrs["padding"]
    common = {"group": attrs["groups"], "has_bias": "bias" in node.params, "dtype": dtype}
    if spatial == 1:
        if not isinstance(padding, str) and len(padding) != 1:
            raise ValueError(f"padding {padding!r} is asymmetric; MindSpore's Conv1d pads both ends equally")
        if isinstance(padding, str) and padding not in ("same", "valid"):
            raise ValueError(f"padding {padding!r} has no MindSpore pad_mode (same, valid and pad exist)")
        pad_mode, amount = (padding, 0) if isinstance(padding, str) else ("pad", int(padding[0]))
        return nn.Conv1d(attrs["in_channels"], attrs["out_channels"], int(attrs["kernel_size"][0]),
                         stride=int(attrs["stride"][0]), pad_mode=pad_mode, padding=amount,
                         dilation=int(attrs["dilation"][0]), **common)
    if spatial == 2:
        pad_mode, pads = conv2d_padding(padding if isinstance(padding, str) else tuple(padding))
        return nn.Conv2d(attrs["in_channels"], attrs["out_channels"], tuple(attrs["kernel_size"]),
                         stride=tuple(attrs["stride"]), pad_mode=pad_mode, padding=pads,
                         dilation=tuple(attrs["dilation"]), data_format="NCHW", **common)
    raise ValueError(f"a {spatial}-D convolution is not built for MindSpore (1-D and 2-D are)")


@register_builder(Op.EMBEDDING)
def _build_embedding(node: Node, graph: Graph, dtype: Any, replaced: nn.Cell | None) -> nn.Cell:
    attrs = node.attrs
    if attrs.get("max_norm") is not None:
        raise ValueError("an Embedding with max_norm has no MindSpore equivalent")
    lookup_dtype = getattr(ms, str(attrs.get("dtype", "Float32")).lower(), ms.float32)
    cell = nn.Embedding(attrs["num_embeddings"], attrs["embedding_dim"],
                        use_one_hot=bool(attrs.get("use_one_hot", False)), dtype=lookup_dtype,
                        padding_idx=attrs.get("padding_idx"))
    if cell.embedding_table.dtype != dtype:
        cell.embedding_table.set_dtype(dtype)
    return cell


def build_layer(node: Node, graph: Graph, dtype: Any = ms.float32, replaced: nn.Cell | None = None) -> nn.Cell:
    """The MindSpore cell for one layer node; ``ValueError`` naming the node if its op can't be built.

    ``replaced`` is the cell the node's layer came from (a ``Dense`` part copies its activation).
    """
    builder = BUILDERS.get(node.op)
    if builder is None:
        supported = ", ".join(op.value for op in BUILDERS)
        raise ValueError(f"node {node.name!r}: op {node.op.value} cannot be built as a MindSpore cell "
                         f"(supported: {supported})")
    try:
        return builder(node, graph, dtype, replaced)
    except Exception as err:
        raise ValueError(f"while building {node.name!r} ({node.op.value}): {err}") from err


#: IR role -> the attribute holding that parameter on the built cell.
_ROLE_ATTRIBUTES = {(Op.EMBEDDING, "weight"): "embedding_table"}


def _role_param(cell: nn.Cell, node: Node, role: str) -> ms.Parameter:
    param = getattr(cell, _ROLE_ATTRIBUTES.get((node.op, role), role), None)
    if not isinstance(param, ms.Parameter):
        raise ValueError(f"node {node.name!r}: the built {type(cell).__name__} has no parameter for role {role!r}")
    return param


def native_array(node: Node, role: str, array: np.ndarray) -> np.ndarray:
    """A graph array in MindSpore's layout for ``node``'s ``role`` (Conv1d weights get their height axis)."""
    if node.op is Op.CONV and role == "weight" and len(node.attrs["kernel_size"]) == 1 and array.ndim == 3:
        return array[:, :, None, :]
    if node.op is Op.CONV and role == "weight" and node.attrs.get("data_format") == "NHWC" and array.ndim == 4:
        return array.transpose(0, 2, 3, 1)
    return array


def _checkpoint_name(name: str) -> str:
    """Parts of a model that is itself the layer are named ``.0.weight`` in the graph; ``0.weight`` here."""
    return name.lstrip(".")


def _fill(cell: nn.Cell, node: Node, graph: Graph) -> None:
    for role, param_name in node.params.items():
        target = _role_param(cell, node, role)
        array = native_array(node, role, graph.params[param_name])
        if tuple(target.shape) != tuple(array.shape):
            raise ValueError(f"node {node.name!r}: {role} {param_name!r} has shape {tuple(array.shape)}, the "
                             f"cell expects {tuple(target.shape)}")
        target.set_data(ms.Tensor(np.array(array, copy=True), dtype=target.dtype))  # never share memory


def _mixed_precision(cell: nn.Cell) -> Any:
    """The type ``cell.to_float(...)`` was given, or None."""
    kind = getattr(cell.get_mixed_precision_type(), "name", "NOTSET")
    return {"FP16": ms.float16, "FP32": ms.float32, "BF16": ms.bfloat16}.get(kind)


def _replace(cells: dict[str, nn.Cell], path: str, new: nn.Cell) -> None:
    parent_name, _, child = path.rpartition(".")
    parent = cells[parent_name]
    if isinstance(parent, (nn.SequentialCell, nn.CellList)):  # they run a list of their own, not attributes
        parent[list(parent.name_cells()).index(child)] = new
    elif isinstance(parent, nn.CellDict):
        parent[child] = new
    else:
        setattr(parent, child, new)


def build(graph: Graph, like: nn.Cell, weights: bool = True, *, take_arrays: bool = False) -> nn.Cell:
    """A copy of ``like`` with the layers ``graph`` factorized replaced by ``nn.SequentialCell`` chains.

    With ``weights=False`` the new layers keep their initialisation (structure only). ``take_arrays`` is
    the PyTorch backend's option (the new weights use the graph's arrays' memory); MindSpore parameters
    always copy them, so it changes nothing here.
    """
    if not isinstance(like, nn.Cell):
        raise TypeError(f"like must be the mindspore.nn.Cell the graph was lowered from, got {type(like).__name__}")
    factorized: dict[str, list[str]] = graph.meta.get("factorized", {})
    model = copy_model(like, leave_out=factorized)  # the replaced layers' weights are not copied
    cells = dict(model.cells_and_names())
    originals = dict(like.cells_and_names())
    for original, part_names in factorized.items():
        old = originals.get(original)
        if old is None:
            raise ValueError(f"the graph factorized {original!r}, which the model does not have")
        reference = getattr(old, "embedding_table" if isinstance(old, nn.Embedding) else "weight", None)
        if not isinstance(reference, ms.Parameter):
            raise ValueError(f"{original!r} ({type(old).__name__}) has no weight parameter to take the dtype from")
        parts = []
        for part_name in part_names:
            node = graph.node(part_name)
            part = build_layer(node, graph, reference.dtype, old)
            if weights:
                _fill(part, node, graph)
            parts.append((node, part))
        chain = nn.SequentialCell([part for _, part in parts])
        precision = _mixed_precision(old)
        if precision is not None:
            chain.to_float(precision)
        chain.set_train(bool(old.training))
        if original:
            _replace(cells, original, chain)
        else:  # the model itself is the layer
            model = chain
        for node, part in parts:  # after attaching: MindSpore renames parameters when a cell is attached
            for role, param_name in node.params.items():
                param = _role_param(part, node, role)
                param.name = _checkpoint_name(param_name)
                param.requires_grad = reference.requires_grad
    return model


def load_layers(model: nn.Cell, graph: Graph, names: list[str]) -> None:
    """Copy the factors of the factorized layers ``names`` from ``graph`` into ``model``, in place.

    ``model`` must be one :func:`build` returned for a graph with the same structure (the sequential
    mode refines layers one group at a time in its own copy; never call this on a user's model).
    """
    factorized: dict[str, list[str]] = graph.meta.get("factorized", {})
    cells = dict(model.cells_and_names())
    for original in names:
        chain = cells[original]
        for index, part_name in enumerate(factorized[original]):
            layer = chain[index] if isinstance(chain, nn.SequentialCell) else chain
            _fill(layer, graph.node(part_name), graph)


def state_dict(graph: Graph) -> dict[str, ms.Parameter]:
    """The graph's arrays as MindSpore parameters in native layouts (``save_checkpoint``/``load_param_into_net``).

    Arrays are copied; bfloat16 parameters (held as float32 in the graph) are cast back.
    """
    layouts: dict[str, np.ndarray] = {}
    for node in graph.nodes:
        for role, name in node.params.items():
            layouts[name] = native_array(node, role, graph.params[name])
    dtypes = graph.meta.get("dtypes", {})
    params = {}
    for name, array in graph.params.items():
        native = layouts.get(name, array)
        dtype = ms.bfloat16 if dtypes.get(name) == "BFloat16" else None
        tensor = ms.Tensor(np.array(native, copy=True), dtype=dtype)
        params[_checkpoint_name(name)] = ms.Parameter(tensor, name=_checkpoint_name(name))
    return params


def load_checkpoint(cell: nn.Cell, checkpoint: str | os.PathLike[str] | Mapping[str, ms.Parameter]) -> nn.Cell:
    """Load a ``.ckpt`` file (or a ``load_checkpoint`` dict) into ``cell``, strictly; returns ``cell``.

    ``ValueError`` listing the missing and unexpected parameters and the shape mismatches when the
    checkpoint was saved from another structure (e.g. another ``decompose_config``): nothing is loaded then.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        if not os.path.isfile(checkpoint):
            raise ValueError(f"checkpoint {os.fspath(checkpoint)!r} does not exist")
        params = ms.load_checkpoint(os.fspath(checkpoint))
    elif isinstance(checkpoint, Mapping):
        params = dict(checkpoint)
    else:
        raise TypeError(f"checkpoint must be a .ckpt path or a dict of parameters, got {type(checkpoint).__name__}")
    targets = {param.name: param for param in cell.get_parameters()}
    missing = [name for name in targets if name not in params]
    unexpected = [name for name in params if name not in targets]
    shapes = [f"{name}: checkpoint {tuple(params[name].shape)}, model {tuple(target.shape)}"
              for name, target in targets.items()
              if name in params and tuple(params[name].shape) != tuple(target.shape)]
    if missing or unexpected or shapes:
        def shown(items: list[str]) -> str:
            return ", ".join(items[:6]) + (f" (+{len(items) - 6} more)" if len(items) > 6 else "")
        problems = [f"{label} {shown(items)}" for label, items in
                    (("missing", missing), ("unexpected", unexpected), ("shape mismatches", shapes)) if items]
        raise ValueError(f"the checkpoint does not fit this {type(cell).__name__} (saved from another structure?): "
                         + "; ".join(problems))
    not_loaded, unused = ms.load_param_into_net(cell, params, strict_load=True)
    if not_loaded or unused:  # the checks above make this unreachable; kept as a guard
        raise ValueError(f"parameters not loaded: {not_loaded}; checkpoint entries not used: {unused}")
    return cell


# ------------------------------------------------------------------------ native weights and runs

def save_weights(model: nn.Cell, path: str | os.PathLike[str]) -> None:
    """Write ``model``'s parameters to the checkpoint ``path`` (``save_checkpoint``); :func:`load_weights` reads it."""
    ms.save_checkpoint(model, os.fspath(path))


def load_weights(model: nn.Cell, path: str | os.PathLike[str]) -> nn.Cell:
    """Load the checkpoint ``path`` into ``model``, strictly, in place; returns ``model``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is not a checkpoint, or it was saved from another model: every missing and
            unexpected name and every shape mismatch is named, and nothing is loaded.
    """
    file = weights_file(path)
    try:
        params = ms.load_checkpoint(str(file))
    except Exception as err:  # MindSpore raises ValueError/RuntimeError for files that are not checkpoints
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot read {str(file)!r} as a MindSpore checkpoint: {first}") from err
    check_weights_fit(model, file, {param.name: tuple(param.shape) for param in model.get_parameters()},
                      {name: tuple(param.shape) for name, param in params.items()})
    return load_checkpoint(model, params)


def for_inference(model: nn.Cell, weights: str | os.PathLike[str] | None = None) -> nn.Cell:
    """``model`` with training off (``set_train(False)``) and ``weights`` (a checkpoint) loaded, strictly.

    ``model`` itself when no cell of it is training and no weights are given; otherwise a copy
    (:func:`copy_model`; ``model`` is never changed).
    """
    training = bool(model.training) or any(cell.training for _, cell in model.cells_and_names())
    if weights is None and not training:
        return model
    ready = copy_model(model)
    if weights is not None:
        load_weights(ready, weights)
    ready.set_train(False)
    return ready


def as_tensors(arrays: Iterable[np.ndarray]) -> tuple[ms.Tensor, ...]:
    """The arrays as MindSpore tensors (copies), e.g. a cell's positional arguments for an ONNX export."""
    return tuple(ms.Tensor(np.array(array, copy=True)) for array in arrays)


def numpy_copy(value: Any) -> np.ndarray:
    """A tensor or parameter (or anything numpy takes) as a new numpy array of its own."""
    if isinstance(value, ms.Tensor):
        return np.array(value.asnumpy(), copy=True)  # asnumpy may share memory with the tensor
    return np.array(value, copy=True)


def run_numpy(model: nn.Cell, arrays: Sequence[np.ndarray]) -> NativeOutputs:
    """Run ``model`` on positional numpy inputs; its outputs as numpy arrays, in order.

    A result of tuples, lists and dicts is flattened; the names are a flat dict-like result's keys,
    else None. (PyNative mode: nothing is recorded for gradients unless a gradient function runs it.)
    """
    return native_outputs(model(*as_tensors(arrays)), numpy_copy)


def export_onnx(model: nn.Cell, arguments: tuple[Any, ...], input_names: Sequence[str] | None = None,
                output_names: Sequence[str] | None = None, opset: int | None = None) -> Any:
    """``model`` exported to ONNX (an ``onnx.ModelProto``) by ``mindspore.export(..., file_format="ONNX")``.

    ``arguments`` are the cell's positional tensors; the cell is exported in the mode it is in.
    ``input_names`` rename the data inputs; MindSpore chooses the opset and output names itself
    (``output_names`` and ``opset`` are not used). ``ValueError`` with the exporter's first line when it fails.
    """
    from frontends.onnx import load_model

    with tempfile.TemporaryDirectory(prefix="lowrank_ms_export.") as folder:
        stem = os.path.join(folder, "model")
        try:
            ms.export(model, *arguments, file_name=stem, file_format="ONNX")
        except Exception as err:
            raise ValueError(f"mindspore.export failed: {str(err).strip().splitlines()[0]}") from err
        exported = load_model(stem + ".onnx")
    if input_names is not None:
        _rename_inputs(exported, input_names)
    return exported


def _rename_inputs(model: Any, names: Sequence[str]) -> None:
    """Rename the data inputs of the ONNX ``model`` (not its initializers) to ``names``, in order, in place."""
    inits = {tensor.name for tensor in model.graph.initializer}
    data = [value for value in model.graph.input if value.name not in inits]
    if len(names) != len(data):
        raise ValueError(f"input_names has {len(names)} names, the model has {len(data)} inputs")
    renames = {value.name: new for value, new in zip(data, names, strict=True)}
    for value in data:
        value.name = renames[value.name]
    for node in model.graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]


if TYPE_CHECKING:  # the registry hands this module out as a NativeBackend: mypy checks that it is one
    import backends.mindspore as _this_module

    _AS_PROTOCOL: NativeBackend = _this_module
