"""PyTorch backend: layer IR -> native ``nn.Module`` and state dict.

Mirrors ``frontends/torch.py``. ``build(graph, like=model)`` returns a deep copy of ``model`` (the
layers it replaces are not copied) in which every layer the engine factorized is an ``nn.Sequential``
of its parts, so the state-dict keys are
``fc.0.weight``, ``fc.1.weight``, ``fc.1.bias``, ``conv.0.weight`` ... The new weights take the
replaced layer's dtype and device, and its ``requires_grad`` and training mode. ``like`` is not changed.

Native weights and runs, mirrored by ``backends/mindspore.py`` (same names and arguments), so that
framework-agnostic code (``lowrank_ir.convert`` / ``parity``) reaches PyTorch only through here:
:func:`save_weights` / :func:`load_weights` (a state dict file, loaded strictly), :func:`for_inference`,
:func:`as_tensors` / :func:`numpy_copy` and :func:`run_numpy`.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from backends._dataflow import NativeOutputs, check_weights_fit, native_outputs, weights_file
from backends._torch_graph import GraphModule, from_dataflow, graph_params
from lowrank_ir import Graph, Node, Op
from lowrank_ir._protocols import NativeBackend

__all__ = ["BUILDERS", "ConstantMatMul", "DATAFLOW_CLASS", "DEFAULT_LAYOUT", "GraphModule", "NativeOutputs",
           "as_tensors", "build", "build_layer", "export_onnx", "for_inference", "from_dataflow", "graph_params",
           "load_layers", "load_weights", "numpy_copy", "register_builder", "run_numpy", "save_weights", "state_dict"]

#: The class of the models :func:`from_dataflow` returns.
DATAFLOW_CLASS = GraphModule

#: How factorized layers are laid out unless the caller says (``lowrank_ir.LAYOUTS``): the reference tool's,
#: so that its checkpoints load.
DEFAULT_LAYOUT = "reference"

Builder = Callable[[Node, Graph], nn.Module]

#: IR op -> function building the module for one node.
BUILDERS: dict[Op, Builder] = {}


def register_builder(op: Op) -> Callable[[Builder], Builder]:
    def decorate(function: Builder) -> Builder:
        BUILDERS[op] = function
        return function
    return decorate


class ConstantMatMul(nn.Module):
    """``y = x @ weight`` with a trainable ``weight`` of shape ``[in_features, out_features]``."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        nn.init.kaiming_uniform_(self.weight.T, a=5 ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


@register_builder(Op.LINEAR)
def _build_linear(node: Node, graph: Graph) -> nn.Module:
    if node.attrs.get("activation"):
        raise ValueError(f"a Linear with activation {node.attrs['activation']!r} has no PyTorch equivalent layer")
    return nn.Linear(node.attrs["in_features"], node.attrs["out_features"], bias="bias" in node.params)


_CONV_TYPES: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


@register_builder(Op.CONV)
def _build_conv(node: Node, graph: Graph) -> nn.Module:
    attrs = node.attrs
    spatial = len(attrs["kernel_size"])
    if spatial not in _CONV_TYPES:
        raise ValueError(f"a {spatial}-D convolution has no PyTorch layer (1-D, 2-D and 3-D exist)")
    padding = attrs["padding"]
    if not isinstance(padding, str) and len(padding) != spatial:
        raise ValueError(f"padding {padding!r} is asymmetric; PyTorch convolutions take one padding per dimension")
    return _CONV_TYPES[spatial](
        attrs["in_channels"], attrs["out_channels"], tuple(attrs["kernel_size"]), stride=tuple(attrs["stride"]),
        padding=padding if isinstance(padding, str) else tuple(padding), dilation=tuple(attrs["dilation"]),
        groups=attrs["groups"], bias="bias" in node.params, padding_mode=attrs.get("padding_mode", "zeros"),
    )


@register_builder(Op.EMBEDDING)
def _build_embedding(node: Node, graph: Graph) -> nn.Module:
    attrs = node.attrs
    return nn.Embedding(attrs["num_embeddings"], attrs["embedding_dim"], padding_idx=attrs.get("padding_idx"),
                        max_norm=attrs.get("max_norm"), norm_type=attrs.get("norm_type", 2.0),
                        scale_grad_by_freq=attrs.get("scale_grad_by_freq", False),
                        sparse=attrs.get("sparse", False))


@register_builder(Op.MATMUL)
def _build_matmul(node: Node, graph: Graph) -> nn.Module:
    return ConstantMatMul(node.attrs["in_features"], node.attrs["out_features"])


def build_layer(node: Node, graph: Graph) -> nn.Module:
    """The PyTorch module for one layer node; ``ValueError`` naming the node if its op can't be built."""
    builder = BUILDERS.get(node.op)
    if builder is None:
        supported = ", ".join(op.value for op in BUILDERS)
        raise ValueError(f"node {node.name!r}: op {node.op.value} cannot be built as a PyTorch layer "
                         f"(supported: {supported})")
    try:
        return builder(node, graph)
    except Exception as err:
        raise ValueError(f"while building {node.name!r} ({node.op.value}): {err}") from err


def tensor_of(array: np.ndarray) -> torch.Tensor:
    """``array`` as a CPU tensor sharing its memory; a numpy bfloat16 array (``ml_dtypes``) as a bfloat16 tensor."""
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def _tensor(array: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return tensor_of(np.array(array, copy=True)).to(dtype=like.dtype, device=like.device)


def _fill(module: nn.Module, node: Node, graph: Graph, like: torch.Tensor) -> None:
    for role, param_name in node.params.items():
        target = getattr(module, role)
        array = graph.params[param_name]
        if tuple(target.shape) != tuple(array.shape):
            raise ValueError(f"node {node.name!r}: {role} {param_name!r} has shape {tuple(array.shape)}, the "
                             f"module expects {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(_tensor(array, like))


def _taken(array: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """``array`` as a tensor of ``like``'s dtype and device, sharing its memory where it can.

    Only a writable, C-contiguous float array already of ``like``'s dtype and device is shared. The
    graph's arrays that share a user's model's memory are read-only views (``frontends/torch.py``):
    they are always copied.
    """
    if not (array.flags.writeable and array.flags.c_contiguous and (array.dtype.kind == "f" or
                                                                    array.dtype.name == "bfloat16")):
        return _tensor(array, like)
    tensor = tensor_of(array)
    if tensor.dtype != like.dtype or tensor.device != like.device:
        return tensor.to(dtype=like.dtype, device=like.device)
    return tensor


def _filled_layer(node: Node, graph: Graph, like: torch.Tensor, take_arrays: bool) -> nn.Module:
    """The layer for ``node`` holding the graph's arrays (copies, or with ``take_arrays`` the arrays' memory).

    It is built on the meta device: no weight is allocated or initialised only to be replaced.
    """
    with torch.device("meta"):
        layer = build_layer(node, graph)
    for role, param_name in node.params.items():
        array = graph.params[param_name]
        expected = tuple(getattr(layer, role).shape)
        if expected != tuple(array.shape):
            raise ValueError(f"node {node.name!r}: {role} {param_name!r} has shape {tuple(array.shape)}, the "
                             f"module expects {expected}")
        tensor = _taken(array, like) if take_arrays else _tensor(array, like)
        setattr(layer, role, nn.Parameter(tensor, requires_grad=like.requires_grad))
    stale = [name for name, tensor in layer.named_parameters() if tensor.is_meta]
    stale += [name for name, tensor in layer.named_buffers() if tensor.is_meta]
    if stale:
        raise ValueError(f"node {node.name!r}: the graph gives no array for {stale}")
    return layer


def _chain(original: str, old: nn.Module, part_names: list[str], graph: Graph, weights: bool,
           take_arrays: bool) -> nn.Sequential:
    """The ``nn.Sequential`` of ``original``'s parts, in the replaced layer's dtype, device and modes."""
    reference = getattr(old, "weight", None)
    if not isinstance(reference, torch.Tensor):
        raise ValueError(f"{original!r} ({type(old).__name__}) has no weight tensor to take dtype/device from")
    chain = nn.Sequential()
    for part_name in part_names:
        node = graph.node(part_name)
        if weights:
            layer = _filled_layer(node, graph, reference, take_arrays)
        else:
            layer = build_layer(node, graph).to(device=reference.device, dtype=reference.dtype)
        chain.append(layer)
    chain.train(old.training)
    chain.requires_grad_(reference.requires_grad)
    return chain


def build(graph: Graph, like: nn.Module, weights: bool = True, *, take_arrays: bool = False) -> nn.Module:
    """A copy of ``like`` with the layers ``graph`` factorized replaced by ``nn.Sequential`` chains.

    With ``weights=False`` the new layers keep their initialisation (structure only).

    Memory: the replaced layers are never copied (their chains stand in for them during the copy).
    With ``take_arrays`` the new weights use the memory of the graph's factor arrays where dtype and
    device allow (no copy): the graph must not be used afterwards, since its arrays then change with
    the model's weights (``Decompose`` passes its own graph, which nothing else sees). Everything taken
    from ``like`` is a copy: the returned model shares no tensor with it, so training the returned
    model never changes ``like``.
    """
    if not isinstance(like, nn.Module):
        raise TypeError(f"like must be the torch.nn.Module the graph was lowered from, got {type(like).__name__}")
    factorized: dict[str, list[str]] = graph.meta.get("factorized", {})
    chains: dict[str, nn.Sequential] = {}
    for original, part_names in factorized.items():
        try:
            old = like.get_submodule(original)
        except AttributeError as err:
            raise ValueError(f"the graph factorized {original!r}, which the model does not have") from err
        chains[original] = _chain(original, old, part_names, graph, weights, take_arrays)
    if "" in chains:  # the model itself is the layer
        return chains[""]
    # deepcopy's memo maps each replaced layer to its chain: the copy takes the chain in its place.
    memo: dict[int, Any] = {id(like.get_submodule(original)): chain for original, chain in chains.items()}
    return copy.deepcopy(like, memo)


def load_layers(model: nn.Module, graph: Graph, names: list[str]) -> None:
    """Copy the factors of the factorized layers ``names`` from ``graph`` into ``model``, in place.

    ``model`` must be one :func:`build` returned for a graph with the same structure (the sequential
    mode refines layers one group at a time in its own copy; never call this on a user's model).
    """
    factorized: dict[str, list[str]] = graph.meta.get("factorized", {})
    for original in names:
        chain = model.get_submodule(original) if original else model
        for index, part_name in enumerate(factorized[original]):
            layer = chain[index] if isinstance(chain, nn.Sequential) else chain
            reference = layer.weight
            assert isinstance(reference, torch.Tensor)
            _fill(layer, graph.node(part_name), graph, reference)


def state_dict(graph: Graph) -> dict[str, torch.Tensor]:
    """The graph's arrays as a PyTorch state dict (tensors copied from the numpy arrays).

    Weights a layer computes in its forward (``meta["computed_params"]``) are not state: they are left out.
    Weights the module stores transposed against the IR (``meta["transposed_params"]``: transformers'
    ``Conv1D``) are transposed back.
    """
    computed = set(graph.meta.get("computed_params", ()))
    transposed = set(graph.meta.get("transposed_params", ()))
    return {name: tensor_of(np.array(array.T if name in transposed else array, copy=True))
            for name, array in graph.params.items() if name not in computed}


# ------------------------------------------------------------------------ native weights and runs

#: The suffix that makes :func:`save_weights` write safetensors (no pickle) instead of ``torch.save``.
SAFETENSORS_SUFFIX = ".safetensors"


def save_weights(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Write ``model``'s state dict to ``path``; :func:`load_weights` reads it back.

    A path ending in ``.safetensors`` gets safetensors (tied tensors stored once each name, as
    ``load_state_dict`` takes them); any other gets ``torch.save``.
    """
    state = model.state_dict()
    if os.fspath(path).endswith(SAFETENSORS_SUFFIX):
        from safetensors.torch import save_file

        save_file({name: tensor.detach().contiguous().clone() for name, tensor in state.items()}, os.fspath(path))
    else:
        torch.save(state, path)


def _read_state_dict(file: os.PathLike[str]) -> dict[str, torch.Tensor]:
    if os.fspath(file).endswith(SAFETENSORS_SUFFIX):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(os.fspath(file))
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"cannot read {os.fspath(file)!r} as a safetensors state dict: {err}") from err
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and torch errors alike: not a state dict (details chained)
        raise ValueError(f"cannot read {os.fspath(file)!r} as a PyTorch state dict (torch.load with "
                         f"weights_only=True failed: {type(err).__name__}); save one with "
                         f"torch.save(model.state_dict(), path)") from err
    if not isinstance(state, Mapping) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ValueError(f"{os.fspath(file)!r} is not a PyTorch state dict (a dict of name -> tensor); save one "
                         f"with torch.save(model.state_dict(), path)")
    return dict(state)


def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load the state dict file ``path`` into ``model``, strictly, in place; returns ``model``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is not a state dict, or it was saved from another model: every missing and
            unexpected key and every shape mismatch is named, and nothing is loaded.
    """
    file = weights_file(path)
    state = _read_state_dict(file)
    check_weights_fit(model, file, {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()},
                      {name: tuple(tensor.shape) for name, tensor in state.items()})
    model.load_state_dict(state, strict=True)
    return model


def for_inference(model: nn.Module, weights: str | os.PathLike[str] | None = None) -> nn.Module:
    """``model`` in eval mode with ``weights`` (a state dict file) loaded, strictly.

    ``model`` itself when it is already in eval mode and no weights are given; otherwise a deep copy
    (``model`` is never changed).
    """
    if weights is None and not any(module.training for module in model.modules()):
        return model
    ready = copy.deepcopy(model)
    if weights is not None:
        load_weights(ready, weights)
    return ready.eval()


def as_tensors(arrays: Iterable[np.ndarray]) -> tuple[torch.Tensor, ...]:
    """The arrays as CPU tensors (copies), e.g. a model's positional arguments for an ONNX export."""
    return tuple(torch.from_numpy(np.array(array, copy=True)) for array in arrays)


def numpy_copy(value: Any) -> np.ndarray:
    """A tensor (or anything numpy takes) as a new numpy array of its own: detached, bfloat16 as float32."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
        return np.array((tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy(), copy=True)
    return np.array(value, copy=True)


def run_numpy(model: nn.Module, arrays: Sequence[np.ndarray]) -> NativeOutputs:
    """Run ``model`` on positional numpy inputs without gradients; its outputs as numpy arrays, in order.

    A result of tuples, lists and dicts (a ``transformers`` ``ModelOutput``) is flattened; the names
    are a flat dict-like result's keys, else None.
    """
    with torch.no_grad():
        result = model(*as_tensors(arrays))
    return native_outputs(result, numpy_copy)


def export_onnx(model: nn.Module, arguments: tuple[Any, ...], input_names: Sequence[str] | None = None,
                output_names: Sequence[str] | None = None, opset: int | None = None) -> Any:
    """``model`` exported to ONNX (an ``onnx.ModelProto``) by ``torch.onnx.export(..., dynamo=True)``.

    Needs ``onnxscript``. ``arguments`` are the model's positional tensors; the model is exported in
    the mode it is in. ``ValueError`` with the exporter's first line when it fails.
    """
    try:
        with warnings.catch_warnings():  # torch's own deprecations, raised inside its exporter
            warnings.filterwarnings("ignore", category=FutureWarning, module="copyreg")
            program = torch.onnx.export(model, arguments, dynamo=True, input_names=input_names,
                                        output_names=output_names, opset_version=opset, verbose=False)
    except Exception as err:
        raise ValueError(f"torch.onnx.export failed: {str(err).strip().splitlines()[0]}") from err
    if program is None or program.model_proto is None:
        raise ValueError("torch.onnx.export returned no model")
    return program.model_proto


if TYPE_CHECKING:  # the registry hands this module out as a NativeBackend: mypy checks that it is one
    import backends.torch as _this_module

    _AS_PROTOCOL: NativeBackend = _this_module
