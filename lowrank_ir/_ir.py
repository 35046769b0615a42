"""The layer IR: a closed set of ops, nodes, graphs, and ``verify``.

A :class:`Graph` is a list of :class:`Node` in topological order plus the arrays they use
(``params``, name -> numpy array, named as the source framework names them). A node refers to its
arrays by *role* (``{"weight": "fc.weight", "bias": "fc.bias"}``), so a rewrite can rename arrays
without touching the node's meaning.

The op set is closed (:class:`Op`). Each op's attributes are documented once, here:

``Linear``      y = x Wᵀ + b.  weight ``[out_features, in_features]``, optional bias ``[out_features]``.
                attrs: ``in_features``, ``out_features``; optional ``activation`` (a name applied after
                the layer, e.g. MindSpore ``Dense(activation=...)``); optional ``alpha``, ``beta``
                (floats, from an ONNX ``Gemm``): y = alpha · x Wᵀ + beta · b. A rewrite keeps every
                optional attr on the part that carries the bias.
``Conv``        N-d convolution.  weight ``[out_channels, in_channels // groups, *kernel_size]``,
                optional bias ``[out_channels]``. attrs: ``in_channels``, ``out_channels``,
                ``kernel_size`` (tuple), ``stride`` (tuple), ``padding``, ``dilation`` (tuple),
                ``groups`` (int), ``padding_mode`` (``"zeros"``, ``"reflect"``, ``"replicate"``,
                ``"circular"``). ``padding`` is one of: a tuple of ``ndim`` ints (the same at both ends
                of each dimension); a tuple of ``2 * ndim`` ints ``(begin..., end...)`` in ONNX
                ``pads`` order when the ends differ (2-D: top, left, bottom, right); ``"valid"`` (none);
                ``"same"`` (output size ceil(input / stride), the total padding split with any odd
                extra at the end: ONNX ``SAME_UPPER``, MindSpore ``pad_mode="same"``, PyTorch
                ``padding="same"`` at stride 1); ``"same_lower"`` (the same with the odd extra at the
                beginning: ONNX ``SAME_LOWER``); :func:`conv_pads` turns any form into explicit pads,
                :func:`onnx_padding` an ONNX ``auto_pad``/``pads`` pair into a form.
                Optional ``data_format`` (``"NCW"``, ``"NCHW"``; MindSpore ``"NHWC"`` layers are lowered
                locked, with the weight in the IR's channels-first layout).
``ConvTranspose`` weight ``[in_channels, out_channels // groups, *kernel_size]``; attrs as ``Conv``
                plus ``output_padding`` (tuple).
``Embedding``   row lookup.  weight ``[num_embeddings, embedding_dim]``. attrs: ``num_embeddings``,
                ``embedding_dim``, ``padding_idx`` (int or None), plus the source's lookup options
                (``max_norm``, ``norm_type``, ``scale_grad_by_freq``, ``sparse``).
``MatMul``      y = x W by a constant.  weight ``[in_features, out_features]``. attrs: ``in_features``,
                ``out_features``; optional ``weight_side``: ``"right"`` (the default, y = x W) or
                ``"left"`` (y = W x, weight ``[out_features, in_features]``, the features are x's
                second-to-last axis; both parts of a rewrite keep it). Optional bias ``[out_features]``
                and ``alpha``/``beta`` as ``Linear`` (ONNX ``Gemm`` with ``transB=0``).
``Opaque``      anything else, carried untouched. attrs: ``source_op`` (the ONNX op type or module type
                name) and the source's own attributes.

Some attribute keys belong to the IR on every op, never to the source (:data:`RESERVED_ATTRS`):
``source_op`` (above), ``onnx`` (the ONNX write-back record, below), ``locked`` (why the engine must
leave a layer alone), ``in_positions``/``out_positions`` (below). :func:`source_attrs` is what is left:
an opaque node's own attributes. Opaque nodes from ONNX keep their operator's domain in the record;
``DEFAULT_DOMAINS`` are the spellings of the standard operators' domain.

Nodes lowered from a module tree (PyTorch, MindSpore) have empty ``inputs``/``outputs``: the tree,
not the IR, knows the dataflow. Nodes from a dataflow source (ONNX) name their values.

Dataflow graphs (ONNX, ``frontends/onnx.py``): ``node.inputs`` lists only the *data* inputs (values
computed at run time, ``""`` for a skipped optional input); constant inputs (initializers, ``Constant``
nodes) are ``node.params``: ``weight``/``bias`` for layers, ``input:<position>`` for an opaque node,
and ``outer:<name>`` for a constant that a subgraph (``If``/``Loop``/``Scan`` body) reads from the outer
scope. ``graph.inputs``/``graph.outputs`` are the data inputs and the outputs (``dtype`` a numpy
dtype name, ``shape`` ints for fixed dims and strings for symbolic ones). Each node carries
``attrs["onnx"]``, the record the ONNX backend needs to write it back exactly (original node name,
domain, attribute types, input layout; for layers, the original attributes); ``graph.meta["onnx"]``
holds the model-level record (opsets, IR version, producer, value_info, functions ...). Layers may
carry ``out_positions``/``in_positions`` (output/input positions per sample) for per-sample FLOPs.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["AUTO_PAD", "DEFAULT_DOMAINS", "RESERVED_ATTRS", "Graph", "GraphError", "LazyArray", "Node", "Op", "Params",
           "Value", "conv_pads", "onnx_padding", "padding_halves", "source_attrs", "verify"]


def conv_pads(padding: Any, sizes: Sequence[int], kernel: Sequence[int], stride: Sequence[int],
              dilation: Sequence[int]) -> tuple[list[int], list[int]]:
    """A ``Conv`` ``padding`` (any form the module docstring lists) as explicit ``(begins, ends)`` per axis.

    ``sizes`` are the input's spatial sizes (only ``"same"``/``"same_lower"`` read them): the output
    is ``ceil(size / stride)`` long, the total padding ``(out - 1) stride + (k - 1) dilation + 1 - size``
    (at least 0) is split in halves, and the odd extra goes at the end (``"same"``) or the
    beginning (``"same_lower"``). ``ValueError`` for a form that is none of these.
    """
    ndim = len(kernel)
    if isinstance(padding, str):
        if padding == "valid":
            return [0] * ndim, [0] * ndim
        if padding not in ("same", "same_lower"):
            raise ValueError(f"padding {padding!r} is not 'valid', 'same', 'same_lower' or a tuple of ints")
        begins, ends = [], []
        for size, k, s, d in zip(sizes, kernel, stride, dilation, strict=True):
            out = -(-int(size) // int(s))
            total = max((out - 1) * int(s) + (int(k) - 1) * int(d) + 1 - int(size), 0)
            begin, end = padding_halves(total, odd_at_end=padding == "same")
            begins.append(begin)
            ends.append(end)
        return begins, ends
    pads = [int(p) for p in padding]
    if len(pads) == ndim:
        return pads, list(pads)
    if len(pads) == 2 * ndim:
        return pads[:ndim], pads[ndim:]
    raise ValueError(f"padding {tuple(pads)!r} has neither {ndim} (per axis) nor {2 * ndim} (begin..., end...) entries")


def padding_halves(total: int, odd_at_end: bool) -> tuple[int, int]:
    """``total`` padding of one axis split into ``(begin, end)`` halves; an odd extra goes to the end if ``odd_at_end``.

    The rule of ``"same"`` (``SAME_UPPER``: extra at the end) and ``"same_lower"`` (at the beginning), for
    convolutions and transposed convolutions alike.
    """
    small, large = total // 2, total - total // 2
    return (small, large) if odd_at_end else (large, small)


#: ONNX ``auto_pad`` -> the ``Conv`` ``padding`` form it means (``NOTSET`` means the explicit ``pads``).
AUTO_PAD = {"VALID": "valid", "SAME_UPPER": "same", "SAME_LOWER": "same_lower"}


def onnx_padding(attrs: Mapping[str, Any], ndim: int) -> tuple[int, ...] | str:
    """An ONNX node's ``auto_pad`` and ``pads`` attributes (``attrs``) as an ``ndim``-D ``Conv`` ``padding``.

    ``NOTSET`` (the default) takes ``pads`` (``2 * ndim`` ints, zeros when absent), written as ``ndim``
    ints when both ends agree; the other ``auto_pad`` values map through :data:`AUTO_PAD`. ``ValueError``
    for an unknown ``auto_pad`` or ``pads`` of the wrong length.
    """
    auto_pad, pads = attrs.get("auto_pad", "NOTSET"), attrs.get("pads")
    if auto_pad in ("NOTSET", ""):
        values = tuple(int(p) for p in (pads if pads is not None else (0,) * (2 * ndim)))
        if len(values) != 2 * ndim:
            raise ValueError(f"pads {values!r} do not have {2 * ndim} entries (begin..., end...)")
        return values[:ndim] if values[:ndim] == values[ndim:] else values
    if auto_pad not in AUTO_PAD:
        raise ValueError(f"auto_pad {auto_pad!r} is not one of NOTSET, {', '.join(AUTO_PAD)}")
    return AUTO_PAD[auto_pad]


class Op(str, enum.Enum):
    """The closed set of node ops; see the module docstring for each op's attributes."""

    LINEAR = "Linear"
    CONV = "Conv"
    CONV_TRANSPOSE = "ConvTranspose"
    EMBEDDING = "Embedding"
    MATMUL = "MatMul"
    OPAQUE = "Opaque"

    def __str__(self) -> str:
        return self.value


#: Attributes every node of an op must carry.
REQUIRED_ATTRS: dict[Op, tuple[str, ...]] = {
    Op.LINEAR: ("in_features", "out_features"),
    Op.CONV: ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"),
    Op.CONV_TRANSPOSE: ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                        "groups"),
    Op.EMBEDDING: ("num_embeddings", "embedding_dim"),
    Op.MATMUL: ("in_features", "out_features"),
    Op.OPAQUE: ("source_op",),
}

#: Ops whose weight the engine can factorize.
LAYER_OPS = frozenset({Op.LINEAR, Op.CONV, Op.CONV_TRANSPOSE, Op.EMBEDDING, Op.MATMUL})

#: Node attribute keys the IR keeps for itself (see the module docstring); a source op may not use them.
RESERVED_ATTRS = ("source_op", "onnx", "locked", "in_positions", "out_positions")

#: The ONNX domains of the standard operators (the empty string and its long spelling).
DEFAULT_DOMAINS = ("", "ai.onnx")


def source_attrs(node: Node) -> dict[str, Any]:
    """The attributes of ``node`` that belong to its source op: every one but :data:`RESERVED_ATTRS`."""
    return {key: value for key, value in node.attrs.items() if key not in RESERVED_ATTRS}


class GraphError(ValueError):
    """A graph failed :func:`verify`; the message lists every problem found, on one line."""


@dataclass(slots=True, eq=False)
class Value:
    """A graph input or output: name, element type (numpy dtype name) and shape (dims or symbols)."""

    name: str
    dtype: str | None = None
    shape: tuple[int | str | None, ...] | None = None

    def mismatch(self, dtype: str, shape: Sequence[int], holder: str = "graph", any_float: bool = False,
                 ) -> str | None:
        """Why an array of ``dtype`` and ``shape`` cannot feed this input (``input 'x' has ...``), or None.

        The dtype must be this one (any float dtype for a float input when ``any_float``); the rank and
        every fixed (positive) dim must be this shape's. An unknown dtype or shape accepts any; ``holder``
        names what declares the input (``graph``, ``model``).
        """
        floats = ("float", "bfloat")
        if self.dtype is not None and dtype != self.dtype and not (
                any_float and dtype.startswith(floats) and self.dtype.startswith(floats)):
            return f"input {self.name!r} has dtype {dtype}, the {holder} expects {self.dtype}"
        if self.shape is None:
            return None
        given, shown = list(shape), "[" + ", ".join("?" if dim is None else str(dim) for dim in self.shape) + "]"
        if len(given) != len(self.shape):
            return (f"input {self.name!r} has shape {given} ({len(given)} dimensions), the {holder} expects "
                    f"{len(self.shape)} dimensions {shown}")
        for axis, (size, want) in enumerate(zip(given, self.shape, strict=True)):
            if isinstance(want, int) and want > 0 and size != want:
                return (f"input {self.name!r} has shape {given}, the {holder} expects {shown} "
                        f"(dimension {axis} must be {want})")
        return None


@dataclass(slots=True, eq=False)
class Node:
    """One layer or opaque operation. Compared by identity, like every IR object."""

    op: Op
    name: str
    attrs: dict[str, Any] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.op, Op):
            try:
                self.op = Op(self.op)
            except ValueError as err:
                known = ", ".join(op.value for op in Op)
                raise ValueError(f"unknown op {self.op!r} for node {self.name!r}; known ops: {known}") from err

    @property
    def is_layer(self) -> bool:
        """Whether the engine can factorize this node's weight."""
        return self.op in LAYER_OPS


class LazyArray:
    """A parameter read when it is used: ``load()`` returns it as a new numpy array each time.

    For arrays a framework holds in a dtype numpy computes poorly in (bfloat16): the graph keeps the
    framework's tensor, and each use reads the one parameter in ``dtype`` (float32), so a model is never
    copied whole. ``source_dtype`` is the dtype the source holds it in (default ``dtype``): what a
    rewrite writes the layer's factors in (for bfloat16, ``ml_dtypes.bfloat16``). ``origin``, when given,
    names the source's memory (two lazy arrays with the same origin are one tensor under two names).
    """

    __slots__ = ("shape", "dtype", "source_dtype", "origin", "_load")

    def __init__(self, shape: Sequence[int], dtype: np.dtype | type, load: Callable[[], np.ndarray],
                 source_dtype: np.dtype | type | None = None, origin: Hashable | None = None) -> None:
        self.shape = tuple(int(dim) for dim in shape)
        self.dtype = np.dtype(dtype)
        self.source_dtype = self.dtype if source_dtype is None else np.dtype(source_dtype)
        self.origin = origin
        self._load = load

    def __repr__(self) -> str:
        return f"LazyArray(shape={self.shape}, dtype={self.dtype})"

    def load(self) -> np.ndarray:
        """The array, read now (read-only)."""
        array = self._load()
        if array.shape != self.shape or array.dtype != self.dtype:
            raise GraphError(f"a lazy parameter of shape {self.shape} and dtype {self.dtype} read as "
                             f"{array.shape} {array.dtype}")
        array.flags.writeable = False
        return array


class Params(dict[str, np.ndarray]):
    """A graph's arrays by name; a :class:`LazyArray` among them is read each time it is looked up.

    Every read (``params[name]``, ``get``, ``values``, ``items``) gives numpy arrays, so code that reads a
    graph need not know which of its arrays are lazy; :meth:`set_lazy` adds one, :meth:`is_lazy` tells.
    Copies (``dict(params)``, ``Graph.copy``) keep lazy arrays lazy.
    """

    def __getitem__(self, name: str) -> np.ndarray:
        value: Any = super().__getitem__(name)
        return value.load() if isinstance(value, LazyArray) else value

    def get(self, name: str, default: Any = None) -> Any:
        return self[name] if name in self else default

    def values(self) -> Iterator[np.ndarray]:  # type: ignore[override]
        return (self[name] for name in self)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:  # type: ignore[override]
        return ((name, self[name]) for name in self)

    def set_lazy(self, name: str, lazy: LazyArray) -> None:
        """Add ``lazy`` under ``name``: read when it is looked up."""
        super().__setitem__(name, lazy)  # type: ignore[assignment]

    def is_lazy(self, name: str) -> bool:
        return isinstance(super().__getitem__(name), LazyArray)

    def shape(self, name: str) -> tuple[int, ...]:
        """The array's shape, without reading a lazy one."""
        return tuple(super().__getitem__(name).shape)

    def dtype(self, name: str) -> np.dtype:
        """The array's dtype, without reading a lazy one."""
        return np.dtype(super().__getitem__(name).dtype)

    def storage_key(self, name: str) -> Hashable | None:
        """Equal for names holding one array (tied weights), without reading a lazy one; None if unknown.

        A numpy array's: its memory address, shape and strides (None when empty or broadcast); a lazy
        array's: its ``origin``.
        """
        value = super().__getitem__(name)
        if isinstance(value, LazyArray):
            return value.origin
        if not value.size or 0 in value.strides:
            return None
        return (value.__array_interface__["data"][0], value.shape, value.strides)

    def source_dtype(self, name: str) -> np.dtype:
        """The dtype the source holds the array in: a lazy array's ``source_dtype``, else its dtype."""
        value = super().__getitem__(name)
        return value.source_dtype if isinstance(value, LazyArray) else np.dtype(value.dtype)


class Graph:
    """Nodes in topological order, their arrays, graph inputs/outputs and metadata.

    Change a graph through its methods (:meth:`add_node`, :meth:`replace_node`, :meth:`set_param`) so
    that node names stay unique and every referenced array stays present.
    """

    __slots__ = ("_nodes", "_index", "params", "inputs", "outputs", "meta")

    def __init__(
        self,
        nodes: Iterable[Node] = (),
        params: Mapping[str, np.ndarray] | None = None,
        inputs: Iterable[Value] = (),
        outputs: Iterable[Value] = (),
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        self._nodes: list[Node] = []
        self._index: dict[str, Node] = {}
        self.params = Params(params or {})
        self.inputs: list[Value] = list(inputs)
        self.outputs: list[Value] = list(outputs)
        self.meta: dict[str, Any] = dict(meta or {})
        for node in nodes:
            self.add_node(node)

    def __repr__(self) -> str:
        layers = sum(1 for node in self._nodes if node.is_layer)
        return (f"Graph({len(self._nodes)} nodes, {layers} layers, {len(self.params)} params, "
                f"source={self.meta.get('source')!r})")

    @property
    def nodes(self) -> tuple[Node, ...]:
        """The nodes, in topological order (read-only view)."""
        return tuple(self._nodes)

    def __iter__(self) -> Iterator[Node]:
        return iter(self._nodes)

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def node(self, name: str) -> Node:
        """The node called ``name``; ``KeyError`` names close matches when there is none."""
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"no node named {name!r} in the graph") from None

    def layers(self) -> list[Node]:
        """The nodes whose weight the engine can factorize."""
        return [node for node in self._nodes if node.is_layer]

    def param(self, node: Node, role: str) -> np.ndarray | None:
        """The array ``node`` uses in ``role``, or None if it has none in that role."""
        name = node.params.get(role)
        return None if name is None else self.params[name]

    def add_node(self, node: Node) -> None:
        if node.name in self._index:
            raise GraphError(f"a node named {node.name!r} is already in the graph")
        self._nodes.append(node)
        self._index[node.name] = node

    def set_param(self, name: str, array: np.ndarray) -> None:
        self.params[name] = array

    def replace_node(self, name: str, new_nodes: list[Node], new_params: Mapping[str, np.ndarray],
                     drop_params: Iterable[str] = ()) -> None:
        """Put ``new_nodes`` where node ``name`` was, add ``new_params`` and drop ``drop_params``.

        Dropped arrays still used by another node are kept. A new array may not take the name of an
        array the graph keeps (it would silently replace another node's weight).
        """
        old = self.node(name)
        position = self._nodes.index(old)
        clash = [node.name for node in new_nodes if node.name in self._index and node.name != name]
        if clash:
            raise GraphError(f"replacing {name!r}: node names already in the graph: {clash}")
        drop_params = list(drop_params)
        taken = [param for param in new_params if param in self.params and param not in drop_params]
        if taken:
            raise GraphError(f"replacing {name!r}: param names already in the graph: {taken}")
        del self._index[name]
        self._nodes[position:position + 1] = new_nodes
        for node in new_nodes:
            self._index[node.name] = node
        self.params.update(new_params)
        still_used = {param for node in self._nodes for param in node.params.values()}
        for param in drop_params:
            if param not in still_used:
                self.params.pop(param, None)

    def copy(self) -> Graph:
        """A graph with copied nodes and containers; the arrays themselves are shared (treat them as immutable)."""
        nodes = [Node(node.op, node.name, dict(node.attrs), dict(node.params), list(node.inputs),
                      list(node.outputs)) for node in self._nodes]
        return Graph(nodes, Params(self.params),
                     [Value(v.name, v.dtype, v.shape) for v in self.inputs],
                     [Value(v.name, v.dtype, v.shape) for v in self.outputs], dict(self.meta))


def _expected_weight_shape(node: Node) -> tuple[int, ...] | None:
    """The weight shape a layer's attributes imply (None when the op has no fixed weight shape)."""
    attrs = node.attrs
    if node.op is Op.LINEAR:
        return (attrs["out_features"], attrs["in_features"])
    if node.op is Op.MATMUL:
        if attrs.get("weight_side", "right") == "left":
            return (attrs["out_features"], attrs["in_features"])
        return (attrs["in_features"], attrs["out_features"])
    if node.op is Op.EMBEDDING:
        return (attrs["num_embeddings"], attrs["embedding_dim"])
    if node.op is Op.CONV:
        return (attrs["out_channels"], attrs["in_channels"] // attrs["groups"], *attrs["kernel_size"])
    if node.op is Op.CONV_TRANSPOSE:
        return (attrs["in_channels"], attrs["out_channels"] // attrs["groups"], *attrs["kernel_size"])
    return None


def _layer_problems(node: Node, graph: Graph) -> list[str]:
    """Problems with one layer's attributes and weight shapes."""
    where = f"node {node.name!r} ({node.op})"
    problems = []
    if "weight" not in node.params:
        return [f"{where}: a layer needs a 'weight' param, has roles {sorted(node.params)}"]
    if node.op in (Op.CONV, Op.CONV_TRANSPOSE):
        attrs = node.attrs
        ndim = len(attrs["kernel_size"])
        for key in ("stride", "dilation"):
            if len(attrs[key]) != ndim:
                problems.append(f"{where}: {key}={attrs[key]!r} has not {ndim} entries like kernel_size")
        padding = attrs["padding"]
        if isinstance(padding, str):
            if padding not in ("same", "same_lower", "valid"):
                problems.append(f"{where}: padding={padding!r} must be 'same', 'same_lower', 'valid' or a "
                                f"tuple of ints")
        elif len(padding) not in (ndim, 2 * ndim) or any(int(pad) < 0 for pad in padding):
            problems.append(f"{where}: padding={padding!r} must hold {ndim} (per dimension) or {2 * ndim} "
                            f"(begin..., end...) non-negative ints")
        groups = attrs["groups"]
        if groups < 1 or attrs["in_channels"] % groups or attrs["out_channels"] % groups:
            problems.append(f"{where}: groups={groups} must divide in_channels={attrs['in_channels']} "
                            f"and out_channels={attrs['out_channels']}")
            return problems
    if node.op is Op.MATMUL and node.attrs.get("weight_side", "right") not in ("right", "left"):
        problems.append(f"{where}: weight_side={node.attrs['weight_side']!r} must be 'right' or 'left'")
        return problems
    weight = node.params["weight"]
    expected = _expected_weight_shape(node)
    if weight in graph.params and expected is not None and graph.params.shape(weight) != expected:
        problems.append(f"{where}: weight {weight!r} has shape {graph.params.shape(weight)}, "
                        f"its attributes imply {expected}")
    bias_name = node.params.get("bias")
    if bias_name is not None and bias_name in graph.params and expected is not None:
        out = node.attrs.get("out_features", node.attrs.get("out_channels"))
        if graph.params.shape(bias_name) != (out,):
            problems.append(f"{where}: bias {bias_name!r} has shape {graph.params.shape(bias_name)}, "
                            f"expected ({out},)")
    return problems


def verify(graph: Graph) -> Graph:
    """Check that ``graph`` is consistent; raise :class:`GraphError` listing every problem.

    Checks: node names unique; each node's required attributes present; every param a node refers to
    is in ``graph.params``; layer weight (and bias) shapes agree with the attributes; on dataflow
    graphs, every node input is produced earlier (a graph input, a param, or an earlier output).
    Returns the graph, so it can end a pipeline.
    """
    problems: list[str] = []
    seen: set[str] = set()
    defined = {value.name for value in graph.inputs} | set(graph.params) | {""}
    for node in graph.nodes:
        where = f"node {node.name!r} ({node.op})"
        if node.name in seen:
            problems.append(f"{where}: name used twice")
        seen.add(node.name)
        missing_attrs = [key for key in REQUIRED_ATTRS[node.op] if key not in node.attrs]
        if missing_attrs:
            problems.append(f"{where}: missing attributes {missing_attrs}")
            continue
        missing_params = [name for name in node.params.values() if name not in graph.params]
        if missing_params:
            problems.append(f"{where}: refers to params not in the graph: {missing_params}")
        for name in node.params.values():
            array = dict.get(graph.params, name)  # as stored: a lazy array is not read here
            if array is not None and not isinstance(array, (np.ndarray, LazyArray)):
                problems.append(f"{where}: param {name!r} is a {type(array).__name__}, not a numpy array")
        if node.is_layer:
            problems.extend(_layer_problems(node, graph))
        undefined = [value for value in node.inputs if value not in defined]
        if undefined:
            problems.append(f"{where}: inputs {undefined} are not produced before it (not topologically "
                            f"ordered, or missing)")
        defined.update(node.outputs)
    produced = defined
    for value in graph.outputs:
        if graph.nodes and any(node.outputs for node in graph.nodes) and value.name not in produced:
            problems.append(f"graph output {value.name!r} is produced by no node")
    if problems:
        raise GraphError(f"invalid graph ({len(problems)} problem{'s' if len(problems) > 1 else ''}): "
                         + "; ".join(problems))
    return graph


def num_elements(shape: Iterable[int]) -> int:
    """Number of elements of an array of ``shape``."""
    return math.prod(int(dim) for dim in shape)
