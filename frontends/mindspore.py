"""MindSpore frontend: ``nn.Cell`` -> layer IR, and layer input statistics from calibration data.

Mirrors ``backends/mindspore.py``: what is lowered here as a layer node, the backend can build.
Lowered layers (subclasses too, unless they override ``construct``):

* ``nn.Dense`` -> ``Linear`` (``has_bias``; ``activation`` as ``attrs["activation"]``, its name).
* ``nn.Conv1d`` -> a 1-D ``Conv``. MindSpore runs it as a 2-D convolution over a height of 1 and stores
  the weight as ``[out, in / group, 1, k]``; the graph holds it as ``[out, in / group, k]`` under the
  same name (the backend puts the axis back).
* ``nn.Conv2d`` -> a 2-D ``Conv``. ``pad_mode="same"``/``"valid"`` become ``padding="same"``/``"valid"``;
  ``pad_mode="pad"`` becomes ``(top, left)``, or ``(top, left, bottom, right)`` when the 4-tuple
  ``padding=(top, bottom, left, right)`` is asymmetric (the IR's begin..., end... form).
  NHWC convolutions (GPU only) are lowered but locked: the engine leaves them alone with the reason.
* ``nn.Embedding`` -> ``Embedding``; its ``embedding_table`` plays the ``weight`` role.

Every other cell that owns parameters becomes an ``Opaque`` node carrying them, so the graph holds the
whole checkpoint. Parameters are named as MindSpore names them (``Parameter.name``, the checkpoint
key). The graph's arrays are read-only copies of the parameters.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import mindspore as ms
import numpy as np
from mindspore import nn

from frontends._im2col import collects_patches, patch_moment_sum
from lowrank_ir import Graph, LayerStats, Node, Op, verify
from lowrank_ir._budget import first_elements, relative_output_errors
from lowrank_ir._calibration import MomentSums
from lowrank_ir._protocols import Frontend

__all__ = ["LOWERINGS", "MASKS_PADDING", "collect_cross_stats", "collect_stats", "copy_model", "count_parameters",
           "execution_groups", "lower", "output_errors", "read_only_array", "register_lowering"]

logger = logging.getLogger(__name__)

#: Whether calibration can leave padded token positions out: not here, every position of every element counts.
MASKS_PADDING = False

Lowering = Callable[[str, nn.Cell], Node]

#: Cell type -> function lowering one cell of that type to a layer node.
LOWERINGS: dict[type[nn.Cell], Lowering] = {}

#: Parameters of these cells that are running statistics, not weights (PyTorch keeps them as buffers).
STATISTICS: dict[str, tuple[str, ...]] = {"_BatchNorm": ("moving_mean", "moving_variance")}


def register_lowering(*cell_types: type[nn.Cell]) -> Callable[[Lowering], Lowering]:
    def decorate(function: Lowering) -> Lowering:
        for cell_type in cell_types:
            LOWERINGS[cell_type] = function
        return function
    return decorate


def _params(cell: nn.Cell, **roles: str) -> dict[str, str]:
    """Role -> parameter name for the cell attributes ``roles`` maps to (absent ones skipped)."""
    found = {}
    for role, attribute in roles.items():
        param = getattr(cell, attribute, None)
        if isinstance(param, ms.Parameter):
            found[role] = param.name
    return found


def _activation_name(activation: Any) -> str:
    """The name ``nn.Dense(activation=...)`` knows ``activation`` by (``"relu"``), else its type name."""
    try:
        from mindspore.nn.layer.activation import _activation as known
    except ImportError:  # a private table; without it the type name is as good
        known = {}
    for name, cls in known.items():
        if type(activation) is cls:
            return str(name)
    return type(activation).__name__


@register_lowering(nn.Dense)
def _lower_dense(name: str, cell: nn.Cell) -> Node:
    assert isinstance(cell, nn.Dense)
    attrs: dict[str, Any] = {"in_features": cell.in_channels, "out_features": cell.out_channels}
    if cell.activation_flag:
        attrs["activation"] = _activation_name(cell.activation)
    roles = _params(cell, weight="weight", bias="bias")  # no bias: the attribute is None
    return Node(Op.LINEAR, name, attrs, roles)


def conv2d_padding(pad_mode: str, padding: int | Sequence[int]) -> str | tuple[int, ...]:
    """The IR ``padding`` of a MindSpore ``Conv2d``: ``"same"``/``"valid"``, ``(h, w)`` or ``(t, l, b, r)``."""
    if pad_mode in ("same", "valid"):
        return pad_mode
    if pad_mode != "pad":
        raise ValueError(f"unknown pad_mode {pad_mode!r}; MindSpore convolutions take 'same', 'valid' or 'pad'")
    if isinstance(padding, int):
        return (padding, padding)
    top, bottom, left, right = (int(value) for value in padding)
    return (top, left) if (top, left) == (bottom, right) else (top, left, bottom, right)


@register_lowering(nn.Conv2d)
def _lower_conv2d(name: str, cell: nn.Cell) -> Node:
    assert isinstance(cell, nn.Conv2d)
    attrs = {
        "in_channels": cell.in_channels,
        "out_channels": cell.out_channels,
        "kernel_size": tuple(cell.kernel_size),
        "stride": tuple(cell.stride),
        "padding": conv2d_padding(cell.pad_mode, cell.padding),
        "dilation": tuple(cell.dilation),
        "groups": cell.group,
        "padding_mode": "zeros",
        "data_format": cell.data_format,
    }
    roles = _params(cell, weight="weight", bias="bias")  # no bias: the attribute is None
    return Node(Op.CONV, name, attrs, roles)


@register_lowering(nn.Conv1d)
def _lower_conv1d(name: str, cell: nn.Cell) -> Node:
    assert isinstance(cell, nn.Conv1d)
    # MindSpore keeps the 2-D form: kernel (1, k), stride (1, s), dilation (1, d), padding (0, 0, p, p).
    padding = cell.pad_mode if cell.pad_mode in ("same", "valid") else (int(cell.padding[2]),)
    attrs = {
        "in_channels": cell.in_channels,
        "out_channels": cell.out_channels,
        "kernel_size": (int(cell.kernel_size[1]),),
        "stride": (int(cell.stride[1]),),
        "padding": padding,
        "dilation": (int(cell.dilation[1]),),
        "groups": cell.group,
        "padding_mode": "zeros",
        "data_format": "NCW",
    }
    roles = _params(cell, weight="weight", bias="bias")  # no bias: the attribute is None
    return Node(Op.CONV, name, attrs, roles)


@register_lowering(nn.Embedding)
def _lower_embedding(name: str, cell: nn.Cell) -> Node:
    assert isinstance(cell, nn.Embedding)
    attrs = {
        "num_embeddings": cell.vocab_size,
        "embedding_dim": cell.embedding_size,
        "padding_idx": cell.padding_idx,
        "use_one_hot": cell.use_one_hot,
        "dtype": str(cell.dtype),
    }
    return Node(Op.EMBEDDING, name, attrs, _params(cell, weight="embedding_table"))


def _lowering_for(cell: nn.Cell) -> tuple[type[nn.Cell], Lowering] | None:
    for cls in type(cell).__mro__:
        if cls in LOWERINGS:
            return cls, LOWERINGS[cls]
    return None


def read_only_array(param: ms.Tensor) -> np.ndarray:
    """A read-only numpy copy of a tensor (float32 for dtypes numpy lacks, e.g. bfloat16)."""
    if param.dtype == ms.bfloat16:
        param = param.astype(ms.float32)
    array = np.array(param.asnumpy(), copy=True)  # asnumpy may share memory with the parameter
    array.flags.writeable = False
    return array


def copy_model(like: nn.Cell, leave_out: Iterable[str] = ()) -> nn.Cell:
    """``copy.deepcopy(like)`` with each cell's ``to_float`` type, which MindSpore's deepcopy drops.

    The cells at the paths ``leave_out`` (the layers a backend replaces) are not copied: an empty ``nn.Cell``
    holds each place, so their weights are never copied only to be dropped. A cell also held at a path not
    left out is copied as usual.
    """
    leave_out = set(leave_out)
    kept = {id(cell) for path, cell in _walk(like) if path not in leave_out}
    placeholders = {id(cell): nn.Cell() for path, cell in _walk(like) if path in leave_out and id(cell) not in kept}
    model = copy.deepcopy(like, dict(placeholders))  # deepcopy's memo: a cell found there is taken as its copy
    copies = dict(model.cells_and_names())
    for name, original in like.cells_and_names():
        copied = copies.get(name)
        if copied is None or id(original) in placeholders:
            continue
        kind = original.get_mixed_precision_type()
        if copied.get_mixed_precision_type() != kind:
            name = getattr(kind, "name", "NOTSET")
            copied.add_flags(fp16=name == "FP16", fp32=name == "FP32", bf16=name == "BF16")
    return model


def _children(cell: nn.Cell) -> dict[str, nn.Cell]:
    """A cell's children by name; one held under two names is listed twice (``name_cells`` lists it once)."""
    cells = getattr(cell, "_cells", None)
    return dict(cells) if isinstance(cells, Mapping) else dict(cell.name_cells())


def _walk(cell: nn.Cell, prefix: str = "") -> Iterator[tuple[str, nn.Cell]]:
    """Every (path, cell) of the tree, a cell shared under several paths once per path."""
    yield prefix, cell
    for child_name, child in _children(cell).items():
        if child is not None:
            yield from _walk(child, f"{prefix}.{child_name}" if prefix else child_name)


def _has_hooks(cell: nn.Cell) -> bool:
    """Whether ``cell`` has forward (pre-)hooks; read without creating the tables MindSpore makes lazily."""
    attributes = vars(cell)
    for table in ("_forward_pre_hook", "_forward_hook", "_forward_pre_hook_with_kwargs", "_forward_hook_with_kwargs"):
        hooks = attributes[f"_lazy{table}"] if f"_lazy{table}" in attributes else getattr(cell, table, None)
        if hooks:
            return True
    return False


def _lock_reasons(model: nn.Cell) -> dict[str, str]:
    """Layers the backend must not replace, with the reason (reported to the user)."""
    paths_by_id: dict[int, list[str]] = {}
    owners_by_param: dict[int, list[str]] = {}
    for path, cell in _walk(model):
        paths_by_id.setdefault(id(cell), []).append(path)
        for attribute, param in cell.parameters_and_names(expand=False):
            owners_by_param.setdefault(id(param), []).append(f"{path}.{attribute}" if path else attribute)
    reasons: dict[str, str] = {}
    for name, cell in model.cells_and_names():
        found = _lowering_for(cell)
        if found is None:
            continue
        base, _ = found
        paths = paths_by_id[id(cell)]
        if len(paths) > 1:
            reasons.setdefault(name, f"the cell is shared under several names {paths}")
        if type(cell).construct is not base.construct:
            reasons.setdefault(name, f"{type(cell).__name__} overrides {base.__name__}.construct")
        if _has_hooks(cell):
            reasons.setdefault(name, "the cell has forward hooks that a replacement would drop")
        if getattr(cell, "data_format", "NCHW") == "NHWC":
            reasons.setdefault(name, "NHWC convolution: only the NCHW data format is decomposed")
        for attribute, param in cell.parameters_and_names(expand=False):
            owners = owners_by_param[id(param)]
            if len(owners) > 1:
                reasons.setdefault(name, f"its {attribute} is tied to {owners}")
        activation = getattr(cell, "activation", None) if isinstance(cell, nn.Dense) else None
        if isinstance(activation, nn.Cell):
            owned = [param.name for param in activation.get_parameters()]
            if owned:
                reasons.setdefault(name, f"its activation {type(activation).__name__} holds parameters {owned}, "
                                         f"which a rebuilt layer would rename")
    return reasons


def _weight_to_ir(node: Node, array: np.ndarray) -> np.ndarray:
    """A layer weight in the IR's layout (Conv1d drops MindSpore's height axis; NHWC goes channels first)."""
    if node.op is Op.CONV and node.attrs.get("data_format") == "NCW" and array.ndim == 4:
        view = array.reshape(array.shape[0], array.shape[1], array.shape[3])
    elif node.op is Op.CONV and node.attrs.get("data_format") == "NHWC" and array.ndim == 4:
        view = array.transpose(0, 3, 1, 2)
    else:
        return array
    view.flags.writeable = False
    return view


def lower(model: nn.Cell) -> Graph:
    """Lower ``model`` to a module-tree graph (nodes in ``cells_and_names`` order, no dataflow).

    Layer nodes are named by the cell path (``layer1.0.conv1``); arrays by the parameter name.
    """
    if not isinstance(model, nn.Cell):
        raise TypeError(f"expected a mindspore.nn.Cell, got {type(model).__name__}")
    params: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    seen: dict[str, int] = {}
    for path, param in model.parameters_and_names():
        if param.name in seen and seen[param.name] != id(param):
            raise ValueError(f"two different parameters are both named {param.name!r} (the second at {path!r}); "
                             f"MindSpore checkpoints need unique parameter names")
        seen[param.name] = id(param)
        params[param.name] = read_only_array(param)
        dtypes[param.name] = str(param.dtype)
    locks = _lock_reasons(model)
    graph = Graph(meta={"source": "mindspore", "model_type": type(model).__qualname__, "dtypes": dtypes})
    for name, cell in model.cells_and_names():
        found = _lowering_for(cell)
        try:
            if found is not None:
                node = found[1](name, cell)
                node.attrs["module_type"] = type(cell).__qualname__
                if name in locks:
                    node.attrs["locked"] = locks[name]
                if "weight" in node.params:
                    weight = node.params["weight"]
                    params[weight] = _weight_to_ir(node, params[weight])
            else:
                roles = {attribute: param.name for attribute, param in cell.parameters_and_names(expand=False)}
                if not roles:
                    continue
                node = Node(Op.OPAQUE, name or type(cell).__name__, {"source_op": type(cell).__qualname__}, roles)
            graph.add_node(node)
        except Exception as err:
            raise ValueError(f"while lowering {name!r} ({type(cell).__name__}): {err}") from err
    graph.params.update(params)
    return verify(graph)


def _is_statistic(cell: nn.Cell, attribute: str) -> bool:
    return any(cls.__name__ in STATISTICS and attribute in STATISTICS[cls.__name__] for cls in type(cell).__mro__)


def count_parameters(model: nn.Cell) -> int:
    """Parameters of ``model``, counted as PyTorch counts the same architecture's ``nn.Parameter``.

    Counted: every weight ``Parameter`` (frozen ones too, as PyTorch counts parameters with
    ``requires_grad=False``), shared ones once. Not counted: BatchNorm's ``moving_mean`` and
    ``moving_variance``, which MindSpore keeps as non-trainable parameters where PyTorch keeps
    ``running_mean``/``running_var`` buffers.
    """
    statistics = {id(param) for _, cell in model.cells_and_names()
                  for attribute, param in cell.parameters_and_names(expand=False) if _is_statistic(cell, attribute)}
    unique = {id(param): param for param in model.get_parameters() if id(param) not in statistics}
    return sum(math.prod(param.shape) for param in unique.values())


# ------------------------------------------------------------------------------------ statistics

def _as_tensor(value: Any) -> Any:
    return ms.Tensor(value) if isinstance(value, np.ndarray) else value


class _StatsError(ValueError):
    """Bad activations seen while collecting statistics."""


class _Enough(Exception):
    """Raised by a hook to end a forward pass once every wanted layer has seen its input."""


def _run_element(model: nn.Cell, element: Any, index: int) -> Any:
    """Run the model on one datasets element; its output (None when a hook ended the pass early)."""
    if isinstance(element, Mapping):
        call = lambda: model(**{key: _as_tensor(value) for key, value in element.items()})  # noqa: E731
    elif isinstance(element, (list, tuple)):
        call = lambda: model(*[_as_tensor(value) for value in element])  # noqa: E731
    elif isinstance(element, (ms.Tensor, np.ndarray)):
        call = lambda: model(_as_tensor(element))  # noqa: E731
    else:
        raise TypeError(f"datasets element {index} is a {type(element).__name__}; each element must be a dict "
                        f"(keyword arguments), a list or tuple (positional arguments), a mindspore.Tensor or a "
                        f"numpy array")
    try:
        return call()
    except _Enough:
        return None
    except _StatsError:
        raise
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(f"datasets element {index} does not fit the model: {type(err).__name__}: {first}") from err


def _check_datasets(datasets: Any) -> None:
    if isinstance(datasets, (str, bytes)) or not hasattr(datasets, "__iter__"):
        raise TypeError(f"datasets must be an iterable of model inputs, got {type(datasets).__name__}")


def _rows(node: Node, x: ms.Tensor) -> np.ndarray:
    """The layer input as float64 rows of input features (channels last for convs), by the layer's IR node."""
    if x.dtype == ms.bfloat16:  # numpy has no bfloat16
        x = x.astype(ms.float32)
    array = x.asnumpy()
    if node.op is Op.LINEAR:
        return array.reshape(-1, node.attrs["in_features"]).astype(np.float64)
    return np.moveaxis(array, 1, -1).reshape(-1, node.attrs["in_channels"]).astype(np.float64)


class _TrainingState:
    """Every cell's training flag, phase and graph flags, restored exactly by :meth:`restore`."""

    def __init__(self, model: nn.Cell) -> None:
        self.cells = [(cell, cell.training, cell.phase, dict(cell.get_flags())) for _, cell in _walk(model)]

    def restore(self) -> None:
        for cell, training, phase, flags in self.cells:
            cell.training = training
            cell.phase = phase
            current = cell.get_flags()
            current.clear()
            current.update(flags)


class _Calibration:
    """Hooks on ``names`` for the duration of a ``with`` block, with the model in PyNative eval mode.

    On exit the hooks are removed, every cell's training flags restored and the context mode put back.
    """

    def __init__(self, model: nn.Cell, hooks: Mapping[str, Callable[..., None]]) -> None:
        self.model, self.hooks = model, hooks
        self.handles: list[Any] = []

    def __enter__(self) -> _Calibration:
        self.state = _TrainingState(self.model)
        self.mode = ms.get_context("mode")
        try:
            if self.mode != ms.PYNATIVE_MODE:  # forward hooks run in PyNative mode only
                ms.set_context(mode=ms.PYNATIVE_MODE)
            cells = dict(self.model.cells_and_names())
            self.handles = [cells[name].register_forward_pre_hook(hook) for name, hook in self.hooks.items()]
            self.model.set_train(False)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.state.restore()
        if self.mode != ms.PYNATIVE_MODE:
            ms.set_context(mode=self.mode)


def collect_stats(model: nn.Cell, graph: Graph, datasets: Iterable[Any], max_iter: int = -1,
                  names: Sequence[str] | None = None, stop_early: bool = False) -> dict[str, LayerStats]:
    """Input statistics (E[x xᵀ] in float64, and E[x]) of the Dense and Conv layers ``names``.

    ``graph`` is the graph lowered from the *original* model: the layers are found by name, so
    ``model`` may be a decomposed version of it (a factorized layer's chain sees the layer's input).
    The model runs in PyNative mode (switched to, then back, if the context is in graph mode) with
    ``set_train(False)``; its training flags are restored and its hooks removed afterwards, so the
    model is left as it was. ``stop_early`` ends each forward pass as soon as every wanted layer has
    seen its input (for layers run once per pass).
    """
    _check_datasets(datasets)
    cells = dict(model.cells_and_names())
    candidates = names if names is not None else [node.name for node in graph.layers()]
    wanted = [name for name in candidates
              if name in graph and graph.node(name).op in (Op.LINEAR, Op.CONV) and name in cells]
    sums = MomentSums(wanted)
    pending: set[str] = set()

    def make_hook(name: str) -> Callable[..., None]:
        node = graph.node(name)
        patches_wanted = collects_patches(node)

        def hook(cell: nn.Cell, args: tuple[Any, ...]) -> None:
            if not args or not isinstance(args[0], ms.Tensor):
                return
            rows = _rows(node, args[0])
            if not np.isfinite(rows).all():
                raise _StatsError(f"the input of layer {name!r} holds NaN or Inf values; statistics need "
                                  f"finite activations")
            sums.add(name, rows.shape[0], moment=rows.T @ rows, mean=rows.sum(axis=0))
            if patches_wanted and args[0].ndim == 4:
                value = args[0].astype(ms.float32) if args[0].dtype == ms.bfloat16 else args[0]
                sums.add_patches(name, *patch_moment_sum(node, value.asnumpy()))
            pending.discard(name)
            if stop_early and not pending:
                raise _Enough
        return hook

    seen = 0
    with _Calibration(model, {name: make_hook(name) for name in wanted}):
        for index, element in enumerate(datasets):
            pending.update(wanted)
            _run_element(model, element, index)
            seen += 1
            if 0 < max_iter <= seen:  # stop before drawing another element
                break
    if seen == 0:
        raise ValueError("datasets is empty: data-aware decomposition needs at least one element")
    return sums.stats()


def execution_groups(model: nn.Cell, graph: Graph, datasets: Iterable[Any], names: Sequence[str]) -> list[list[str]]:
    """The layers ``names`` in the order the model runs them on the first element, grouped by shared input.

    Layers fed the very same tensor (an attention block's query, key and value) form one group: their
    statistics can be collected in one pass. Layers never run come last, each alone.
    """
    _check_datasets(datasets)
    cells = dict(model.cells_and_names())
    # The input tensors themselves are kept until the grouping is done: compared by id() alone, a
    # temporary freed after one layer could share its id with the next layer's input.
    order: list[tuple[str, ms.Tensor]] = []

    def make_hook(name: str) -> Callable[..., None]:
        def hook(cell: nn.Cell, args: tuple[Any, ...]) -> None:
            if args and isinstance(args[0], ms.Tensor) and name not in {seen for seen, _ in order}:
                order.append((name, args[0]))
        return hook

    with _Calibration(model, {name: make_hook(name) for name in names if name in cells}):
        for index, element in enumerate(datasets):
            _run_element(model, element, index)
            break
    groups: list[list[str]] = []
    last_input = None
    for name, layer_input in order:
        if groups and layer_input is last_input:
            groups[-1].append(name)
        else:
            groups.append([name])
        last_input = layer_input
    ran = {name for name, _ in order}
    groups.extend([name] for name in names if name not in ran)
    return groups


def collect_cross_stats(original: nn.Cell, model: nn.Cell, graph: Graph, datasets: Iterable[Any],
                        max_iter: int = -1, names: Sequence[str] | None = None) -> dict[str, LayerStats]:
    """Statistics relating each layer's input in ``model`` (x̃, partly decomposed) to its input in ``original`` (x).

    The MindSpore mirror of ``frontends.torch.collect_cross_stats``: every element runs through both
    cells (each pass ends once the wanted layers have their input); per layer E[x̃ x̃ᵀ], E[x̃], E[x x̃ᵀ],
    E[x xᵀ] and E[x] in float64, for the sequential mode's error compensation. Neither cell is changed.
    """
    _check_datasets(datasets)
    candidates = names if names is not None else [node.name for node in graph.layers()]
    wanted = [name for name in candidates if name in graph and graph.node(name).op in (Op.LINEAR, Op.CONV)]
    sums = MomentSums(wanted)
    captured: dict[str, np.ndarray] = {}
    pending: set[str] = set()

    def make_hook(name: str, source: bool) -> Callable[..., None]:
        node = graph.node(name)

        def hook(cell: nn.Cell, args: tuple[Any, ...]) -> None:
            if not args or not isinstance(args[0], ms.Tensor) or name not in pending:
                return
            rows = _rows(node, args[0])
            if source:
                captured[name] = rows
            else:
                first = captured.get(name)
                if first is None or first.shape != rows.shape:
                    raise ValueError(f"layer {name!r} saw inputs of different shapes in the original and the "
                                     f"decomposed model")
                sums.add(name, rows.shape[0], moment=rows.T @ rows, mean=rows.sum(axis=0), cross=first.T @ rows,
                         source=first.T @ first, source_mean=first.sum(axis=0))
            pending.discard(name)
            if not pending:
                raise _Enough
        return hook

    seen = 0
    with _Calibration(original, {name: make_hook(name, True) for name in wanted}), \
            _Calibration(model, {name: make_hook(name, False) for name in wanted}):
        for index, element in enumerate(datasets):
            captured.clear()
            for cell in (original, model):
                pending.clear()
                pending.update(wanted)
                _run_element(cell, element, index)
            seen += 1
            if 0 < max_iter <= seen:
                break
    if seen == 0:
        raise ValueError("datasets is empty: data-aware decomposition needs at least one element")
    return sums.stats(warn_unseen=False)


# ------------------------------------------------------------------------------------ output errors

def _float_outputs(value: Any) -> list[np.ndarray]:
    """The floating-point tensors of a model output (tensors, tuples/lists, dicts), as float64 arrays."""
    if isinstance(value, ms.Tensor):
        if not ms.ops.is_floating_point(value):
            return []
        if value.dtype == ms.bfloat16:
            value = value.astype(ms.float32)
        return [value.asnumpy().astype(np.float64)]
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [array for item in value for array in _float_outputs(item)]
    return []


def output_errors(model: nn.Cell, datasets: Iterable[Any], trials: Sequence[Mapping[str, np.ndarray]],
                  max_iter: int = -1, progress: Callable[[int], None] | None = None) -> list[float]:
    """Per trial, the model's relative output error Σ‖y' − y‖² / Σ‖y‖² when its params are replaced.

    A trial maps parameter names to replacement arrays in the IR's layout (e.g. one layer's weight
    truncated to a low rank; a Conv1d weight is reshaped back to MindSpore's). ``y`` are the
    floating-point outputs on the first ``max_iter`` elements of ``datasets`` (-1: all), ``y'`` the same
    with the trial's arrays. Trials run on a copy of the model; ``model`` is not changed.
    """
    _check_datasets(datasets)
    elements = first_elements(datasets, max_iter)
    work = copy_model(model)
    params = {param.name: param for param in work.get_parameters()}
    for trial in trials:
        for name, array in trial.items():
            if name not in params:
                raise ValueError(f"no parameter named {name!r} in the {type(model).__name__}")
            if math.prod(params[name].shape) != np.size(array):
                raise ValueError(f"the replacement for {name!r} has {np.size(array)} values, the model's "
                                 f"parameter {list(params[name].shape)}")

    def outputs(index: int) -> list[np.ndarray]:
        return _float_outputs(_run_element(work, elements[index], index))

    @contextlib.contextmanager
    def applied(trial: Mapping[str, np.ndarray]) -> Iterator[None]:
        saved = {name: params[name].asnumpy().copy() for name in trial}
        try:
            for name, array in trial.items():
                native = np.asarray(array).reshape(params[name].shape)
                params[name].set_data(ms.Tensor(native, dtype=params[name].dtype))
            yield
        finally:
            for name, array in saved.items():
                params[name].set_data(ms.Tensor(array, dtype=params[name].dtype))

    with _Calibration(work, {}):
        return relative_output_errors(outputs, len(elements), trials, applied, progress)


if TYPE_CHECKING:  # the registry hands this module out as a Frontend: mypy checks that it is one
    import frontends.mindspore as _this_module

    _AS_PROTOCOL: Frontend = _this_module
