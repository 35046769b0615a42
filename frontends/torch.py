"""PyTorch frontend: ``nn.Module`` -> layer IR, and layer input statistics from calibration data.

Mirrors ``backends/torch.py``: what is lowered here as a layer node, the backend can build.
Lowered layers: ``nn.Linear``, ``nn.Conv1d``/``Conv2d``/``Conv3d`` and ``nn.Embedding`` (subclasses
too, unless they override ``forward``), and transformers' ``Conv1D`` (GPT-2's projections: ``y = x W + b``
with ``W`` stored ``[in, out]``), which is lowered as a ``Linear`` whose weight is ``W`` transposed. Its
parts are built as ``nn.Linear`` layers, so a decomposed ``c_attn`` is an ``nn.Sequential`` of two
``nn.Linear`` (``c_attn.0.weight`` ``[r, in]``, ``c_attn.1.weight`` ``[out, r]``), like every other
decomposed Linear. Layers of other libraries are registered by class path (:data:`LOWERINGS_BY_PATH`),
so the library is never imported here. Every other module that owns parameters or buffers becomes an
``Opaque`` node carrying them, so the graph holds the whole state dict.

The graph's arrays share memory with the model's CPU tensors (no copy) and are marked read-only. A
weight the model stores transposed is held in the graph in the layer's IR layout (a transposed view);
``graph.meta["transposed_params"]`` names such params, whose state-dict tensor is the transpose.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from frontends._im2col import collects_patches
from lowrank_ir import Graph, LayerStats, LazyArray, Node, Op, conv_pads, verify
from lowrank_ir._budget import first_elements, relative_output_errors
from lowrank_ir._calibration import MomentSums
from lowrank_ir._protocols import Frontend

__all__ = ["LOWERINGS", "LOWERINGS_BY_PATH", "MASKS_PADDING", "TRANSPOSED_WEIGHTS", "collect_cross_stats",
           "collect_stats", "count_parameters", "drop_padding", "execution_groups", "lazy_array", "lock_reasons",
           "lower", "lowering_for", "output_errors", "read_only_array", "register_lowering", "token_mask",
           "transposed_weights"]

logger = logging.getLogger(__name__)

#: Whether calibration can leave padded token positions out (``collect_stats(mask_padding=...)``, on by default).
MASKS_PADDING = True

Lowering = Callable[[str, nn.Module], Node]

#: Module type -> function lowering one module of that type to a layer node.
LOWERINGS: dict[type[nn.Module], Lowering] = {}


#: ``"module.QualName"`` of a layer class of another library -> its lowering (the library is not imported).
LOWERINGS_BY_PATH: dict[str, Lowering] = {}

#: transformers' GPT-2 projection layer (``y = x W + b``, ``W`` stored ``[in, out]``).
_CONV1D = "transformers.pytorch_utils.Conv1D"

#: Class paths of layers that store their weight transposed (``[in, out]``) against their IR layout.
TRANSPOSED_WEIGHTS: set[str] = {_CONV1D}


def register_lowering(*module_types: type[nn.Module] | str) -> Callable[[Lowering], Lowering]:
    """Register a lowering for module classes, or for class paths (``"transformers.pytorch_utils.Conv1D"``)."""
    def decorate(function: Lowering) -> Lowering:
        for module_type in module_types:
            if isinstance(module_type, str):
                LOWERINGS_BY_PATH[module_type] = function
            else:
                LOWERINGS[module_type] = function
        return function
    return decorate


def _params(name: str, module: nn.Module) -> dict[str, str]:
    prefix = f"{name}." if name else ""
    roles = {"weight": f"{prefix}weight"}
    if getattr(module, "bias", None) is not None:
        roles["bias"] = f"{prefix}bias"
    return roles


@register_lowering(nn.Linear)
def _lower_linear(name: str, module: nn.Module) -> Node:
    assert isinstance(module, nn.Linear)
    return Node(Op.LINEAR, name, {"in_features": module.in_features, "out_features": module.out_features},
                _params(name, module))


@register_lowering(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _lower_conv(name: str, module: nn.Module) -> Node:
    assert isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    padding = module.padding if isinstance(module.padding, str) else tuple(module.padding)
    attrs = {
        "in_channels": module.in_channels,
        "out_channels": module.out_channels,
        "kernel_size": tuple(module.kernel_size),
        "stride": tuple(module.stride),
        "padding": padding,
        "dilation": tuple(module.dilation),
        "groups": module.groups,
        "padding_mode": module.padding_mode,
    }
    return Node(Op.CONV, name, attrs, _params(name, module))


@register_lowering(nn.Embedding)
def _lower_embedding(name: str, module: nn.Module) -> Node:
    assert isinstance(module, nn.Embedding)
    attrs = {
        "num_embeddings": module.num_embeddings,
        "embedding_dim": module.embedding_dim,
        "padding_idx": module.padding_idx,
        "max_norm": module.max_norm,
        "norm_type": module.norm_type,
        "scale_grad_by_freq": module.scale_grad_by_freq,
        "sparse": module.sparse,
    }
    return Node(Op.EMBEDDING, name, attrs, {"weight": f"{name}.weight" if name else "weight"})


@register_lowering(_CONV1D)
def _lower_transposed_linear(name: str, module: nn.Module) -> Node:
    """The ``Conv1D`` of transformers: ``y = x W + b``, ``W`` stored ``[in, out]``; a Linear of weight ``Wᵀ``."""
    weight = module.weight
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"{type(module).__name__} should hold a 2-D weight, has {type(weight).__name__}")
    return Node(Op.LINEAR, name, {"in_features": int(weight.shape[0]), "out_features": int(weight.shape[1])},
                _params(name, module))


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def lowering_for(module: nn.Module) -> tuple[type[nn.Module], Lowering] | None:
    """The registered class in ``module``'s class hierarchy and its lowering; None for a non-layer."""
    for cls in type(module).__mro__:
        if cls in LOWERINGS:
            return cls, LOWERINGS[cls]
        by_path = LOWERINGS_BY_PATH.get(_class_path(cls))
        if by_path is not None:
            return cls, by_path
    return None


def transposed_weights(model: nn.Module) -> list[str]:
    """State-dict names of the weights ``model`` stores transposed against their IR layout (``Conv1D``'s)."""
    names = []
    for name, module in model.named_modules():
        found = lowering_for(module)
        if found is not None and _class_path(found[0]) in TRANSPOSED_WEIGHTS:
            names.append(f"{name}.weight" if name else "weight")
    return names


def read_only_array(tensor: torch.Tensor) -> np.ndarray:
    """A read-only numpy view of a tensor (a float32 copy for dtypes numpy lacks, e.g. bfloat16)."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16
        tensor = tensor.float()
    array = tensor.numpy()
    view = array.view()
    view.flags.writeable = False
    return view


def lazy_array(tensor: torch.Tensor) -> LazyArray:
    """A bfloat16 tensor, read as float32 each time it is used (never copied whole); its factors are bfloat16."""
    import ml_dtypes

    tensor = tensor.detach()
    origin = (tensor.device.type, tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
    return LazyArray(tuple(tensor.shape), np.float32, lambda: tensor.float().cpu().numpy(),
                     ml_dtypes.bfloat16, origin if tensor.numel() else None)


def _transposed_lazy(lazy: LazyArray) -> LazyArray:
    origin = None if lazy.origin is None else ("transposed", lazy.origin)
    return LazyArray(lazy.shape[::-1], lazy.dtype, lambda: lazy.load().T, lazy.source_dtype, origin)


def lock_reasons(model: nn.Module) -> dict[str, str]:
    """Layers the backend must not replace, with the reason (reported to the user)."""
    reasons: dict[str, str] = {}
    for name, module in model.named_modules():
        for child_name in ("out_proj",) if isinstance(module, nn.MultiheadAttention) else ():
            path = f"{name}.{child_name}" if name else child_name
            reasons[path] = (f"{type(module).__name__} {name!r} reads {child_name}.weight directly in its "
                             f"forward, so a replaced {child_name} would be ignored")
    modules_by_id: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        modules_by_id.setdefault(id(module), []).append(name)
    params_by_id: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        params_by_id.setdefault(id(param), []).append(name)
    for name, module in model.named_modules():
        found = lowering_for(module)
        if found is None:
            continue
        base, _ = found
        if len(modules_by_id[id(module)]) > 1:
            reasons.setdefault(name, f"the module is shared under several names {modules_by_id[id(module)]}")
        if type(module).forward is not base.forward:
            reasons.setdefault(name, f"{type(module).__name__} overrides {base.__name__}.forward")
        if module._forward_hooks or module._forward_pre_hooks:
            reasons.setdefault(name, "the module has forward hooks that a replacement would drop")
        if torch.nn.utils.parametrize.is_parametrized(module):
            reasons.setdefault(name, "the weight is parametrized (torch.nn.utils.parametrize)")
        weight = module._parameters.get("weight")  # not getattr: a parametrized weight would be computed
        if isinstance(weight, torch.Tensor) and len(params_by_id.get(id(weight), [])) > 1:
            reasons.setdefault(name, f"the weight is tied to {params_by_id[id(weight)]}")
    return reasons


def _computed_tensor(module: nn.Module, role: str) -> torch.Tensor:
    """A layer's ``weight``/``bias`` that is computed rather than stored (parametrized, old weight_norm).

    A parametrization is evaluated on a copy in eval mode: evaluating it on the module itself may
    update its state (spectral norm's power iteration in training mode).
    """
    if torch.nn.utils.parametrize.is_parametrized(module, role):
        module = copy.deepcopy(module).eval()
    with torch.no_grad():
        tensor = getattr(module, role)
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"its {role} is a {type(tensor).__name__}, not a tensor")
    return tensor


def lower(model: nn.Module) -> Graph:
    """Lower ``model`` to a module-tree graph (nodes in ``named_modules`` order, no dataflow).

    A layer whose weight is computed in its forward (a parametrization, the old ``weight_norm``) is
    left alone; the graph holds its current weight under ``layer.weight`` so that it can be reported,
    and ``meta["computed_params"]`` lists such names (they are not state-dict keys).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    state = model.state_dict()
    # A bfloat16 model stays as it is: each weight is read as float32 when its layer is decomposed.
    params: dict[str, np.ndarray | LazyArray] = {
        name: lazy_array(tensor) if tensor.dtype == torch.bfloat16 else read_only_array(tensor)
        for name, tensor in state.items() if isinstance(tensor, torch.Tensor)}
    dtypes = {name: str(tensor.dtype).replace("torch.", "") for name, tensor in state.items()
              if isinstance(tensor, torch.Tensor)}
    locks = lock_reasons(model)
    computed: dict[str, np.ndarray] = {}
    graph = Graph(meta={"source": "torch", "model_type": type(model).__qualname__, "dtypes": dtypes})
    for name, module in model.named_modules():
        found = lowering_for(module)
        try:
            if found is not None:
                node = found[1](name, module)
                node.attrs["module_type"] = type(module).__qualname__
                if name in locks:
                    node.attrs["locked"] = locks[name]
                missing = [role for role, key in node.params.items() if key not in params]
                if missing:
                    node.attrs.setdefault("locked", f"its {' and '.join(missing)} is computed in the forward, "
                                                    f"not stored as a parameter")
                    for role in missing:
                        computed[node.params[role]] = read_only_array(_computed_tensor(module, role))
            else:
                own = [key for key, _ in module.named_parameters(recurse=False)]
                own += [key for key, _ in module.named_buffers(recurse=False)]
                prefix = f"{name}." if name else ""
                roles = {key: f"{prefix}{key}" for key in own if f"{prefix}{key}" in params}
                if not roles:
                    continue
                node = Node(Op.OPAQUE, name or type(module).__name__,
                            {"source_op": type(module).__qualname__}, roles)
            graph.add_node(node)
        except Exception as err:
            raise ValueError(f"while lowering {name!r} ({type(module).__name__}): {err}") from err
    transposed = [key for key in transposed_weights(model) if key in params]
    for key in transposed:
        value = params[key]
        params[key] = _transposed_lazy(value) if isinstance(value, LazyArray) else value.T
    if transposed:
        graph.meta["transposed_params"] = transposed
    for name, value in params.items():
        if isinstance(value, LazyArray):
            graph.params.set_lazy(name, value)
        else:
            graph.params[name] = value
    if computed:
        graph.params.update(computed)
        graph.meta["computed_params"] = sorted(computed)
    return verify(graph)


def count_parameters(model: nn.Module) -> int:
    """Parameters (``nn.Parameter``, shared ones once); buffers such as BatchNorm statistics excluded."""
    return sum(param.numel() for param in model.parameters())


# ------------------------------------------------------------------------------------ statistics

def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    return value


def _run_element(model: nn.Module, element: Any, index: int, device: torch.device) -> Any:
    """Run the model on one datasets element; its output (None when a hook ended the pass early)."""
    if isinstance(element, Mapping):
        call = lambda: model(**{key: _to_device(value, device) for key, value in element.items()})  # noqa: E731
    elif isinstance(element, (list, tuple)):
        call = lambda: model(*[_to_device(value, device) for value in element])  # noqa: E731
    elif isinstance(element, torch.Tensor):
        call = lambda: model(element.to(device))  # noqa: E731
    else:
        raise TypeError(f"datasets element {index} is a {type(element).__name__}; each element must be a dict "
                        f"(keyword arguments), a list or tuple (positional arguments) or a torch.Tensor")
    try:
        return call()
    except _Enough:
        return None
    except Exception as err:
        raise ValueError(f"datasets element {index} does not fit the model: {type(err).__name__}: {err}") from err


def _rows(node: Node, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The layer input as rows of input features (channels last for convs), by the layer's IR node.

    A Linear's token-aligned input loses its padded positions (``mask``, see :func:`drop_padding`).
    """
    if node.op is Op.LINEAR:
        return drop_padding(x, mask).reshape(-1, node.attrs["in_features"])
    spatial = len(node.attrs["kernel_size"])
    channel_axis = 0 if x.dim() == spatial + 1 else 1  # unbatched input has no batch axis
    return x.movedim(channel_axis, -1).reshape(-1, node.attrs["in_channels"])


def _patch_rows(node: Node, x: torch.Tensor) -> torch.Tensor:
    """The im2col patches the conv sees, one per row, ordered (in, kh, kw) like ``kernel.reshape(out, -1)``."""
    if x.dim() == 3:  # unbatched
        x = x.unsqueeze(0)
    attrs = node.attrs
    begins, ends = conv_pads(attrs["padding"], x.shape[2:], attrs["kernel_size"], attrs["stride"], attrs["dilation"])
    if any(begins) or any(ends):
        x = functional.pad(x, (begins[1], ends[1], begins[0], ends[0]))
    columns = functional.unfold(x, tuple(node.attrs["kernel_size"]), dilation=tuple(node.attrs["dilation"]),
                       stride=tuple(node.attrs["stride"]))
    return columns.transpose(1, 2).reshape(-1, columns.shape[1])


def token_mask(element: Any, enabled: bool = True) -> torch.Tensor | None:
    """The ``attention_mask`` of a dict element as a bool ``[batch, sequence]`` tensor (True: a real token).

    None when masking is off (``enabled=False``), or the element holds no 2-D ``attention_mask`` tensor.
    """
    if not enabled or not isinstance(element, Mapping):
        return None
    mask = element.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    return mask.to(torch.bool)


def drop_padding(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``x`` without its padded positions when it is token-aligned (``[batch, sequence, ...]`` as ``mask``).

    The kept positions come first, flattened (``[real tokens, ...]``); any other ``x`` is returned as is.
    """
    if mask is None or x.dim() < 3 or tuple(x.shape[:2]) != tuple(mask.shape):
        return x
    return x[mask.to(x.device)]


class _Enough(Exception):
    """Raised by a hook to end a forward pass once every wanted layer has seen its input."""


def _check_datasets(datasets: Any) -> None:
    if isinstance(datasets, (str, bytes)) or not hasattr(datasets, "__iter__"):
        raise TypeError(f"datasets must be an iterable of model inputs, got {type(datasets).__name__}")


@contextlib.contextmanager
def _calibrating(models: Sequence[nn.Module], hooks: Sequence[Mapping[str, Callable[..., None]]]) -> Iterator[None]:
    """Forward pre-hooks on the named layers of each model, eval mode, ``torch.no_grad()``.

    On exit, also on error, every hook is removed and every module's training flag restored: the
    models are left as they were. (The mirror of MindSpore's ``_Calibration``.)
    """
    modes = {module: module.training for model in models for module in model.modules()}
    handles = []
    try:
        for model, layer_hooks in zip(models, hooks, strict=True):
            modules = dict(model.named_modules())
            handles += [modules[name].register_forward_pre_hook(hook) for name, hook in layer_hooks.items()]
            model.eval()
        with torch.no_grad():
            yield
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training


def collect_stats(model: nn.Module, graph: Graph, datasets: Iterable[Any], max_iter: int = -1,
                  names: Sequence[str] | None = None, stop_early: bool = False,
                  mask_padding: bool = True) -> dict[str, LayerStats]:
    """Input statistics (E[x xᵀ] in float64, and E[x]) of the Linear and Conv layers ``names``.

    With ``mask_padding`` (the default), when an element is a dict holding an ``attention_mask``
    (a tokenizer's output), a Linear layer whose input is token-aligned (``[batch, sequence, features]``)
    counts only the positions whose mask is 1: padding tokens do not enter its statistics, so a padded
    batch gives the statistics of its sentences run one by one.

    ``graph`` is the graph lowered from the *original* model: the layers are found by name, so
    ``model`` may be a decomposed version of it (a factorized layer's chain sees the layer's input).
    The model runs under ``torch.no_grad()`` in eval mode; its modes are restored and its hooks
    removed afterwards, so the model is left as it was. ``stop_early`` ends each forward pass as
    soon as every wanted layer has seen its input (for layers run once per pass).
    """
    _check_datasets(datasets)
    modules = dict(model.named_modules())
    candidates = names if names is not None else [node.name for node in graph.layers()]
    wanted = [name for name in candidates
              if name in graph and graph.node(name).op in (Op.LINEAR, Op.CONV) and name in modules]
    sums = MomentSums(wanted)
    pending: set[str] = set()
    masks: list[torch.Tensor | None] = [None]  # the current element's

    def make_hook(name: str) -> Callable[..., None]:
        node = graph.node(name)
        patches_wanted = collects_patches(node)

        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if not args or not isinstance(args[0], torch.Tensor):
                return
            rows = _rows(node, args[0].detach(), masks[0])
            # Each batch's product in at least float32 (float64 inputs stay float64), summed in float64:
            # float64 products would cost 2-4x the time for no gain at batch sizes' worth of rows.
            rows = rows.to(torch.promote_types(rows.dtype, torch.float32))
            # NaN/Inf inputs make the sums non-finite: checked at the end
            sums.add(name, rows.shape[0], moment=(rows.T @ rows).to(torch.float64),
                     mean=rows.sum(0, dtype=torch.float64))
            if patches_wanted:
                patches = _patch_rows(node, args[0].detach())
                patches = patches.to(torch.promote_types(patches.dtype, torch.float32))
                sums.add_patches(name, (patches.T @ patches).to(torch.float64), patches.shape[0])
            pending.discard(name)
            if stop_early and not pending:
                raise _Enough
        return hook

    device = _model_device(model)
    seen = 0
    with _calibrating([model], [{name: make_hook(name) for name in wanted}]):
        for index, element in enumerate(datasets):
            pending.update(wanted)
            masks[0] = token_mask(element, mask_padding)
            _run_element(model, element, index, device)
            seen += 1
            if 0 < max_iter <= seen:  # stop before drawing another element (a DataLoader batch)
                break
    if seen == 0:
        raise ValueError("datasets is empty: data-aware decomposition needs at least one element")
    return sums.stats(read_only_array)


def collect_cross_stats(original: nn.Module, model: nn.Module, graph: Graph, datasets: Iterable[Any],
                        max_iter: int = -1, names: Sequence[str] | None = None,
                        mask_padding: bool = True) -> dict[str, LayerStats]:
    """Statistics relating each layer's input in ``model`` (x̃, partly decomposed) to its input in ``original`` (x).

    Every element runs through both models (each pass ends once the wanted layers have their input);
    returned per layer: E[x̃ x̃ᵀ], E[x̃], E[x x̃ᵀ], E[x xᵀ], E[x] (float64). The sequential mode uses them
    to fit each layer to the *original* outputs, compensating the error of the layers before it.
    Neither model is changed. Padding positions are left out as in :func:`collect_stats`.
    """
    _check_datasets(datasets)
    candidates = names if names is not None else [node.name for node in graph.layers()]
    wanted = [name for name in candidates if name in graph and graph.node(name).op in (Op.LINEAR, Op.CONV)]
    sums = MomentSums(wanted)
    captured: dict[str, torch.Tensor] = {}
    pending: set[str] = set()
    masks: list[torch.Tensor | None] = [None]  # the current element's

    def make_hook(name: str, source: bool) -> Callable[..., None]:
        node = graph.node(name)

        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if not args or not isinstance(args[0], torch.Tensor) or name not in pending:
                return
            rows = _rows(node, args[0].detach(), masks[0])
            rows = rows.to(torch.promote_types(rows.dtype, torch.float32))
            if source:
                captured[name] = rows
            else:
                first = captured.get(name)
                if first is None or first.shape != rows.shape:
                    raise ValueError(f"layer {name!r} saw inputs of different shapes in the original and the "
                                     f"decomposed model")
                products = {"moment": rows.T @ rows, "mean": rows.sum(0), "cross": first.T @ rows,
                            "source": first.T @ first, "source_mean": first.sum(0)}
                sums.add(name, rows.shape[0], **{key: value.to(torch.float64) for key, value in products.items()})
            pending.discard(name)
            if not pending:
                raise _Enough
        return hook

    seen = 0
    hooks = [{name: make_hook(name, source) for name in wanted} for source in (True, False)]
    with _calibrating([original, model], hooks):
        for index, element in enumerate(datasets):
            captured.clear()
            masks[0] = token_mask(element, mask_padding)
            for net in (original, model):
                pending.clear()
                pending.update(wanted)
                _run_element(net, element, index, _model_device(net))
            seen += 1
            if 0 < max_iter <= seen:
                break
    if seen == 0:
        raise ValueError("datasets is empty: data-aware decomposition needs at least one element")
    return sums.stats(read_only_array, warn_unseen=False)


def execution_groups(model: nn.Module, graph: Graph, datasets: Iterable[Any], names: Sequence[str]) -> list[list[str]]:
    """The layers ``names`` in the order the model runs them on the first element, grouped by shared input.

    Layers fed the very same tensor (an attention block's query, key and value) form one group: their
    statistics can be collected in one pass. Layers never run come last, each alone.
    """
    _check_datasets(datasets)
    modules = dict(model.named_modules())
    order: list[tuple[str, int]] = []
    alive: list[torch.Tensor] = []  # keep inputs alive during the pass: a freed tensor's id can be reused

    def make_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if args and isinstance(args[0], torch.Tensor) and name not in {seen for seen, _ in order}:
                alive.append(args[0])
                order.append((name, id(args[0])))
        return hook

    with _calibrating([model], [{name: make_hook(name) for name in names if name in modules}]):
        for index, element in enumerate(datasets):
            _run_element(model, element, index, _model_device(model))
            break
    groups: list[list[str]] = []
    last_input = None
    for name, input_id in order:
        if groups and input_id == last_input:
            groups[-1].append(name)
        else:
            groups.append([name])
        last_input = input_id
    ran = {name for name, _ in order}
    groups.extend([name] for name in names if name not in ran)
    return groups


# ------------------------------------------------------------------------------------ output errors

def _float_outputs(value: Any) -> list[torch.Tensor]:
    """The floating-point tensors of a model output (tensors, tuples/lists, dicts such as transformers' outputs)."""
    if isinstance(value, torch.Tensor):
        return [value.detach().to(torch.float64)] if value.is_floating_point() else []
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [tensor for item in value for tensor in _float_outputs(item)]
    return []


def output_errors(model: nn.Module, datasets: Iterable[Any], trials: Sequence[Mapping[str, np.ndarray]],
                  max_iter: int = -1, progress: Callable[[int], None] | None = None,
                  mask_padding: bool = True) -> list[float]:
    """Per trial, the model's relative output error Σ‖y' − y‖² / Σ‖y‖² when its params are replaced.

    A trial maps state-dict names to replacement arrays in the layout of :func:`lower`'s graph (e.g. one
    layer's weight truncated to a low rank; a weight stored transposed, such as ``Conv1D``'s, is given
    in its IR layout and transposed back here). ``y`` are the floating-point outputs on the first
    ``max_iter`` elements of ``datasets`` (-1: all), ``y'`` the same with the trial's arrays. Trials run
    one at a time on a copy of the model; ``model`` is not changed. With ``mask_padding``, token-aligned
    outputs of dict elements holding an ``attention_mask`` count only their real tokens (as in
    :func:`collect_stats`). ``progress(trials done)`` is called as each trial ends.
    """
    _check_datasets(datasets)
    elements = first_elements(datasets, max_iter)
    work = copy.deepcopy(model)
    tensors = dict(work.named_parameters(remove_duplicate=False)) | dict(work.named_buffers(remove_duplicate=False))
    transposed = set(transposed_weights(model))  # trials hold the graph's layout
    trials = [{name: (np.asarray(array).T if name in transposed else array) for name, array in trial.items()}
              for trial in trials]
    for trial in trials:
        for name, array in trial.items():
            if name not in tensors:
                raise ValueError(f"no parameter named {name!r} in the {type(model).__name__}")
            if tuple(tensors[name].shape) != tuple(np.shape(array)):
                raise ValueError(f"the replacement for {name!r} has shape {list(np.shape(array))}, the model's "
                                 f"parameter {list(tensors[name].shape)}")
    device = _model_device(work)

    def outputs(index: int) -> list[torch.Tensor]:
        mask = token_mask(elements[index], mask_padding)
        result = _run_element(work, elements[index], index, device)
        return [drop_padding(tensor, mask) for tensor in _float_outputs(result)]

    @contextlib.contextmanager
    def applied(trial: Mapping[str, np.ndarray]) -> Iterator[None]:
        saved = {name: tensors[name].detach().clone() for name in trial}
        try:
            for name, array in trial.items():
                tensors[name].data.copy_(torch.from_numpy(np.asarray(array)))
            yield
        finally:
            for name, tensor in saved.items():
                tensors[name].data.copy_(tensor)

    with _calibrating([work], [{}]):
        return relative_output_errors(outputs, len(elements), trials, applied, progress)


if TYPE_CHECKING:  # the registry hands this module out as a Frontend: mypy checks that it is one
    import frontends.torch as _this_module

    _AS_PROTOCOL: Frontend = _this_module
