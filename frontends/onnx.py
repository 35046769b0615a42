"""ONNX frontend: an ONNX ``ModelProto`` (or file) -> dataflow layer IR, and layer input statistics.

Mirrors ``backends/onnx.py``: every node lowered here is written back by the backend exactly as it
came, and the layers the engine factorizes are written as two MatMul/Gemm or three Conv nodes.

Layer nodes (weights must be constant: an initializer, the output of a ``Constant`` node, or a value
folded from constants, see below)::

    Gemm(x, B, C), transA=0, transB=1     -> Linear   weight = B [out, in], bias = C [out] (or [1, out])
    Gemm(x, B, C), transA=0, transB=0     -> MatMul   weight = B [in, out], bias = C; alpha/beta kept
    MatMul(x, W) / MatMul(W, x), W 2-D    -> MatMul   weight_side "right" / "left"
    Conv(x, W, B), any group/pads/strides/dilations/auto_pad, 1-D, 2-D or 3-D -> Conv
    Gather(table, ids), axis 0, table a 2-D float matrix -> Embedding

Every other node is an ``Opaque`` node with all its attributes (subgraphs of If/Loop/Scan, tensors
and type protos as their serialized bytes, so they come back byte for byte). A layer whose weight or
bias is computed at run time stays opaque too.

Constants: initializers and ``Constant`` nodes holding a dense ``value`` both become
``graph.params`` (PP-OCR exports keep every weight in ``Constant`` nodes); ``meta["onnx"]`` records
which was which so the backend writes each back in its own form and place.

Folding: a layer's weight or bias reached through a chain of :data:`FOLDABLE_OPS` on constants
(``Identity``, ``Cast``, ``Reshape``, ``Transpose``, ``Squeeze``, ``Unsqueeze``, ``DequantizeLinear``,
``Constant``; evaluated by ``onnx.reference``) is recognised: the layer's param is the chain's output
value, holding the folded array, and ``meta["onnx"]["folded"]`` maps it to the chain's nodes. The chain
stays in the graph as opaque nodes; the backend writes a folded param back as its chain, and drops a
chain (and the constants only it read) once no node reads it. So the TorchScript exporter's
de-duplicated equal weights (``Identity`` of one initializer) are split per layer. A constant that is
also a graph input a caller may override is not folded.

A layer is *locked* (reported, never decomposed) when replacing its weight would change something
else: the weight value is also read by another node (a tied weight: several layers reading one value
are left alone, as the PyTorch frontend leaves tied weights), a subgraph or a graph output; it is a
graph input a caller may override (IR version >= 4); or the model carries ``training_info``. Chains
that fold it into other layers' weights do not count as readers.

Every ``Conv``, ``ConvTranspose`` and ``Gemm``, every ``MatMul`` with a constant operand and every
``Gather`` from a constant appears in the report: a node that does not become a layer is listed in
``graph.meta["unlowered"]`` (node name -> op, weight name and shape, reason), which
``lowrank_ir.build_report`` turns into rows that say why.

Files: external data is read only from inside the model's folder (a location that is absolute or
escapes the folder, even through a symlink, is rejected); a file that is not ONNX, is truncated, or
misses its external data is a ``ValueError``/``FileNotFoundError`` naming the problem. Constructs the
backend could not write back faithfully (sparse initializers, attribute references outside
functions) are a ``ValueError`` saying so, never a silently changed model.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto, ValueInfoProto, numpy_helper

from frontends._im2col import collects_patches, patch_moment_sum
from lowrank_ir import Graph, LayerStats, Node, Op, Value, verify
from lowrank_ir._budget import first_elements, relative_output_errors
from lowrank_ir._calibration import MomentSums
from lowrank_ir._files import path_inside
from lowrank_ir._ir import DEFAULT_DOMAINS, RESERVED_ATTRS
from lowrank_ir._limits import check_array, check_bytes, format_bytes, limited
from lowrank_ir._protocols import Frontend

__all__ = [
    "MASKS_PADDING",
    "ModelSource",
    "as_model",
    "check_external_data",
    "check_feeds",
    "check_input_shapes",
    "collect_cross_stats",
    "collect_stats",
    "count_parameters",
    "decode_attribute",
    "execution_groups",
    "input_specs",
    "is_constant_node",
    "load_model",
    "lower",
    "measured_shapes",
    "output_errors",
    "parse_model",
    "tensor_bytes",
    "value_from_info",
]

logger = logging.getLogger(__name__)

#: Whether calibration can leave padded token positions out: not here, every position of every element counts.
MASKS_PADDING = False

ModelSource = ModelProto | str | os.PathLike

#: Protobuf cannot serialize a message of 2 GB or more; such models keep their weights in external data.
PROTOBUF_LIMIT = 2**31 - 1

#: Attribute types whose values the IR keeps as the serialized proto (bytes), so they come back exactly.
_PROTO_TYPES = {
    AttributeProto.TENSOR: "t",
    AttributeProto.GRAPH: "g",
    AttributeProto.SPARSE_TENSOR: "sparse_tensor",
    AttributeProto.TYPE_PROTO: "tp",
}
_PROTO_LIST_TYPES = {
    AttributeProto.TENSORS: "tensors",
    AttributeProto.GRAPHS: "graphs",
    AttributeProto.SPARSE_TENSORS: "sparse_tensors",
    AttributeProto.TYPE_PROTOS: "type_protos",
}

#: Ops whose output is constant when their inputs are: a layer's weight reached through them is folded.
FOLDABLE_OPS = frozenset({"Identity", "Cast", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "DequantizeLinear",
                          "Constant"})

#: Longest chain of foldable ops followed back from a layer's weight.
MAX_FOLD_DEPTH = 32

#: Node types that are candidate layers; each one appears in the report, lowered or with the reason.
CANDIDATE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Gather")


# ------------------------------------------------------------------------------------------- loading

def parse_model(data: bytes, what: str = "the data") -> ModelProto:
    """Parse serialized ONNX; ``ValueError`` when ``data`` is not a (complete) ONNX model."""
    from google.protobuf.message import DecodeError

    model = ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as err:
        raise ValueError(f"{what} is not an ONNX model: it cannot be parsed ({err or type(err).__name__}); "
                         f"is the file truncated or of another format?") from err
    if not model.HasField("graph") or model.ir_version <= 0 or not model.opset_import:
        missing = "graph" if not model.HasField("graph") else "IR version" if model.ir_version <= 0 else "opset"
        raise ValueError(f"{what} is not an ONNX model: it has no {missing}")
    return model


def _subgraphs(attr: AttributeProto) -> Iterator[GraphProto]:
    if attr.HasField("g"):
        yield attr.g
    yield from attr.graphs


def _graph_tensors(graph: GraphProto) -> Iterator[TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: NodeProto) -> Iterator[TensorProto]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        sparse = [attr.sparse_tensor] if attr.HasField("sparse_tensor") else []
        for tensor in [*sparse, *attr.sparse_tensors]:  # a Constant's sparse_value, for one
            yield tensor.values
            yield tensor.indices
        for sub in _subgraphs(attr):
            yield from _graph_tensors(sub)


def _model_tensors(model: ModelProto) -> Iterator[TensorProto]:
    """Every tensor of ``model``: graphs, subgraphs, functions, sparse tensors and training_info graphs."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)
    for training in model.training_info:
        yield from _graph_tensors(training.initialization)
        yield from _graph_tensors(training.algorithm)


#: Element types stored two to a byte.
_PACKED_TYPES = {getattr(TensorProto, name) for name in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(TensorProto, name)}


def tensor_bytes(tensor: TensorProto) -> int | None:
    """Bytes the raw data of ``tensor`` holds, from its dims and type (None for strings and unknown types)."""
    if tensor.data_type == TensorProto.STRING:
        return None
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return None
    count = math.prod(int(dim) for dim in tensor.dims)
    return (count + 1) // 2 if tensor.data_type in _PACKED_TYPES else count * itemsize


def _external(tensor: TensorProto) -> bool:
    return tensor.HasField("data_location") and tensor.data_location == TensorProto.EXTERNAL


def check_external_data(model: ModelProto, folder: str | os.PathLike[str]) -> None:
    """Check every external-data reference of ``model`` before anything is read.

    A location must be relative and stay inside ``folder`` (also after resolving symlinks), the file
    must exist and be long enough for the offset and length the tensor names, and the bytes read
    (``length``, or the rest of the file) must be what the tensor's dims and type need and within the
    memory limit (:mod:`lowrank_ir._limits`). Sparse tensors and ``training_info`` graphs are checked too.
    """
    base = Path(folder).resolve()
    for tensor in _model_tensors(model):
        if not _external(tensor):
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        where = f"tensor {tensor.name!r}"
        location = info.get("location", "")
        if not location:
            raise ValueError(f"{where} is stored as external data but names no file ('location' is missing)")
        target = path_inside(base, location)
        if target is None:
            raise ValueError(f"{where}: external data location {location!r} escapes the model's folder "
                             f"{str(base)!r}; only files inside that folder are read")
        if not target.is_file():
            raise FileNotFoundError(f"{where}: external data file {location!r} is missing (looked for "
                                    f"{str(target)!r})")
        try:
            offset, length = int(info.get("offset", 0)), int(info.get("length", 0))
        except ValueError as err:
            raise ValueError(f"{where}: external data offset/length are not integers: {info}") from err
        size = target.stat().st_size
        if offset < 0 or length < 0 or offset + length > size:
            raise ValueError(f"{where}: external data file {location!r} holds {size} bytes, the tensor needs "
                             f"bytes {offset}..{offset + length}")
        read = length if "length" in info else size - offset  # what onnx would read
        expected = tensor_bytes(tensor)
        if expected is not None and read != expected:
            declared = f"declares length {length}" if "length" in info else f"would read {read} bytes"
            raise ValueError(f"{where}: external data {declared}, but its dims {list(tensor.dims)} and type "
                             f"{TensorProto.DataType.Name(tensor.data_type)} need {expected} bytes")
        check_bytes(read, f"{where} (external data of dims {list(tensor.dims)})")


@limited
def load_model(path: str | os.PathLike[str], *, max_bytes: int | str | None = None) -> ModelProto:
    """Read an ONNX file and its external data (checked with :func:`check_external_data`).

    ``max_bytes``: the most the file, and each tensor of external data, may take (an int or a size such
    as ``"64G"``; default half of physical memory), checked before anything is read. A file over
    2 GB is not an ONNX file (protobuf's limit: larger models keep their weights in external data).
    """
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"ONNX model {str(source)!r} does not exist or is not a file")
    size = source.stat().st_size
    if size > PROTOBUF_LIMIT:
        raise ValueError(f"{str(source)!r} holds {format_bytes(size)}: an ONNX file holds at most 2 GB (larger "
                         f"models keep their weights in external data), so it is not an ONNX model")
    check_bytes(size, f"ONNX model {str(source)!r}")
    model = parse_model(source.read_bytes(), f"{str(source)!r}")
    check_external_data(model, source.parent)
    if any(_external(tensor) for tensor in _model_tensors(model)):
        from onnx.external_data_helper import load_external_data_for_model

        load_external_data_for_model(model, str(source.parent))
    return model


def as_model(model: ModelSource) -> ModelProto:
    """``model`` itself if it is a ``ModelProto`` with all its data, else the model read from that path."""
    if isinstance(model, ModelProto):
        if any(_external(tensor) for tensor in _model_tensors(model)):
            raise ValueError("the model's weights are in external data that is not loaded; pass the file path "
                             "(or onnx.load it with its external data)")
        return model
    if isinstance(model, (str, os.PathLike)):
        return load_model(model)
    raise TypeError(f"expected an onnx.ModelProto or the path of an .onnx file, got {type(model).__name__}")


def _check_model(model: ModelProto, what: str = "the model") -> None:
    """``onnx.checker`` on the input; models too large to serialize are checked by the backend from disk."""
    if model.ByteSize() >= PROTOBUF_LIMIT:
        logger.info("%s is larger than 2 GB: the input check is left to onnxruntime", what)
        return
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{what} is not a valid ONNX model: {first}") from err


def _check_supported(model: ModelProto) -> None:
    """Constructs the backend could not write back faithfully are an error, before anything is lowered."""
    graph = model.graph
    if graph.sparse_initializer:
        names = [sparse.values.name for sparse in graph.sparse_initializer][:5]
        raise ValueError(f"unsupported ONNX construct: sparse initializers ({names}); densify them first")
    names = [tensor.name for tensor in graph.initializer]
    if len(set(names)) != len(names):
        twice = sorted({name for name in names if names.count(name) > 1})[:5]
        raise ValueError(f"unsupported ONNX construct: initializers named twice {twice}")
    for node in graph.node:
        for attr in node.attribute:
            if attr.ref_attr_name:
                raise ValueError(f"unsupported ONNX construct: node {node.name or node.op_type!r} refers to "
                                 f"attribute {attr.ref_attr_name!r} outside a function")


# ---------------------------------------------------------------------------------------- attributes

def decode_attribute(attr: AttributeProto) -> tuple[Any, str]:
    """An ONNX attribute as ``(value, type name)``; ``backends.onnx.encode_attribute`` inverts it exactly.

    Numbers and strings become Python values (tuples for lists; strings that are not UTF-8 stay
    bytes); tensors, graphs, sparse tensors and type protos stay serialized protos (bytes).
    """
    kind = attr.type
    name = AttributeProto.AttributeType.Name(kind)
    if kind == AttributeProto.FLOAT:
        return float(attr.f), name
    if kind == AttributeProto.INT:
        return int(attr.i), name
    if kind == AttributeProto.STRING:
        return _text(attr.s), name
    if kind == AttributeProto.FLOATS:
        return tuple(float(value) for value in attr.floats), name
    if kind == AttributeProto.INTS:
        return tuple(int(value) for value in attr.ints), name
    if kind == AttributeProto.STRINGS:
        return tuple(_text(value) for value in attr.strings), name
    if kind in _PROTO_TYPES:
        return getattr(attr, _PROTO_TYPES[kind]).SerializeToString(), name
    if kind in _PROTO_LIST_TYPES:
        return tuple(item.SerializeToString() for item in getattr(attr, _PROTO_LIST_TYPES[kind])), name
    raise ValueError(f"unsupported ONNX construct: attribute {attr.name!r} has type {name}")


def _text(value: bytes) -> str | bytes:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value


def _attributes(node: NodeProto) -> tuple[dict[str, Any], dict[str, str], dict[str, str]]:
    """(values, types, doc strings) of a node's attributes, in their order."""
    values: dict[str, Any] = {}
    types: dict[str, str] = {}
    docs: dict[str, str] = {}
    for attr in node.attribute:
        values[attr.name], types[attr.name] = decode_attribute(attr)
        if attr.doc_string:
            docs[attr.name] = attr.doc_string
    return values, types, docs


def _rest(message: Any, clear: Iterable[str]) -> bytes:
    """``message`` serialized without the fields the IR holds itself (empty when nothing else is set)."""
    rest = copy.copy(message)
    for name in clear:
        rest.ClearField(name)
    return rest.SerializeToString() if rest.ByteSize() else b""


def _node_record(proto: NodeProto, layout: list[int | str], attrs: dict[str, Any] | None,
                 types: dict[str, str], docs: dict[str, str]) -> dict[str, Any]:
    """What the backend needs to write ``proto`` back exactly (kept in ``node.attrs["onnx"]``).

    ``name``/``domain`` are readable copies; ``rest`` is the node without its inputs, outputs and
    attributes, serialized (it keeps field presence, doc strings and any field a newer ONNX adds).
    """
    record: dict[str, Any] = {"name": proto.name, "domain": proto.domain, "inputs": layout, "types": types}
    if attrs is not None:
        record["attrs"] = attrs
    if docs:
        record["attr_docs"] = docs
    record["rest"] = _rest(proto, ("input", "output", "attribute"))
    return record


# ------------------------------------------------------------------------------------------- values

def _dtype_name(elem_type: int) -> str | None:
    if elem_type == TensorProto.UNDEFINED:
        return None
    try:
        return str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)))
    except (KeyError, TypeError, ValueError):
        return TensorProto.DataType.Name(elem_type).lower()


def value_from_info(info: ValueInfoProto) -> Value:
    kind = info.type.WhichOneof("value")
    if kind != "tensor_type":
        return Value(info.name)
    tensor_type = info.type.tensor_type
    shape: tuple[int | str | None, ...] | None = None
    if tensor_type.HasField("shape"):
        shape = tuple(dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or None)
                      for dim in tensor_type.shape.dim)
    return Value(info.name, _dtype_name(tensor_type.elem_type), shape)


def _is_float(array: np.ndarray) -> bool:
    return array.dtype.kind == "f" or "float" in array.dtype.name


def is_constant_node(node: NodeProto) -> bool:
    """A ``Constant`` node with a dense ``value``: its output is lifted into ``graph.params``."""
    return (node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS and len(node.output) == 1
            and bool(node.output[0]) and len(node.attribute) == 1 and node.attribute[0].name == "value"
            and node.attribute[0].type == AttributeProto.TENSOR and not _external(node.attribute[0].t))


def _outer_names(graph: GraphProto) -> set[str]:
    """Names a subgraph reads from enclosing scopes (used but not defined inside it)."""
    defined = {value.name for value in graph.input} | {tensor.name for tensor in graph.initializer}
    defined |= {sparse.values.name for sparse in graph.sparse_initializer}
    used: set[str] = set()
    for node in graph.node:
        used.update(name for name in node.input if name and name not in defined)
        for attr in node.attribute:
            for sub in _subgraphs(attr):
                used.update(_outer_names(sub) - defined)
        defined.update(node.output)
    used.update(value.name for value in graph.output if value.name not in defined)
    return used


def outer_reads(node: NodeProto) -> set[str]:
    """Names the subgraphs of ``node`` (``If``/``Loop``/``Scan`` bodies) read from the enclosing scope."""
    outer: set[str] = set()
    for attr in node.attribute:
        for sub in _subgraphs(attr):
            outer |= _outer_names(sub)
    return outer


# ------------------------------------------------------------------------------------------- lowering

@dataclass(slots=True)
class _LayerSpec:
    """A node recognised as a layer: op, IR attrs, constant roles and input layout."""

    op: Op
    attrs: dict[str, Any]
    params: dict[str, str]
    layout: list[int | str]
    data: list[str]


@dataclass(slots=True)
class _Unlowered:
    """A candidate layer node that stays opaque: its weight (name and shape, when constant) and why."""

    weight: str
    shape: list[int]
    reason: str


@dataclass(slots=True)
class _Lowering:
    """One lowering of one model; the methods read the model, ``run`` builds the graph."""

    model: ModelProto
    input_shapes: Mapping[str, Sequence[int]] | None = None
    initializers: dict[str, TensorProto] = field(default_factory=dict)
    constants: dict[str, int] = field(default_factory=dict)  # output name -> node index
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    consumers: dict[str, set[int]] = field(default_factory=dict)
    outer_reads: dict[int, set[str]] = field(default_factory=dict)
    overridable: set[str] = field(default_factory=set)
    graph_outputs: set[str] = field(default_factory=set)
    param_shapes: dict[str, list[int]] = field(default_factory=dict)
    producers: dict[str, int] = field(default_factory=dict)  # value name -> index of the node computing it
    folds: dict[str, np.ndarray | str] = field(default_factory=dict)  # value -> folded array, or why not
    layer_params: dict[int, set[str]] = field(default_factory=dict)  # layer node index -> its weight/bias names
    fold_only: dict[int, bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        graph = self.model.graph
        self.initializers = {tensor.name: tensor for tensor in graph.initializer}
        for index, node in enumerate(graph.node):
            if is_constant_node(node):
                self.constants[node.output[0]] = index
            for name in node.input:
                self.consumers.setdefault(name, set()).add(index)
            for name in node.output:
                if name:
                    self.producers.setdefault(name, index)
            outer = outer_reads(node)
            if outer:
                self.outer_reads[index] = outer
                for name in outer:
                    self.consumers.setdefault(name, set()).add(index)
        if self.model.ir_version >= 4:
            self.overridable = {value.name for value in graph.input if value.name in self.initializers}
        self.graph_outputs = {value.name for value in graph.output}

    # ---------------------------------------------------------------------------------- constants

    def is_constant(self, name: str) -> bool:
        return name in self.initializers or name in self.constants

    def is_folded(self, name: str) -> bool:
        """Whether ``name`` is not stored as a constant but computed from constants (see :meth:`fold`)."""
        return bool(name) and not self.is_constant(name) and isinstance(self.fold(name), np.ndarray)

    def constant_value(self, name: str) -> np.ndarray | None:
        """The value of ``name`` when it is a constant, stored or folded; None when computed at run time."""
        if not name:
            return None
        if self.is_constant(name):
            return self.array(name)
        value = self.fold(name)
        return value if isinstance(value, np.ndarray) else None

    def fold(self, name: str, depth: int = 0) -> np.ndarray | str:
        """The array ``name`` holds when a chain of :data:`FOLDABLE_OPS` computes it from constants; else why not.

        A stored constant folds to itself, unless it is a graph input a caller may override.
        """
        if name in self.overridable:
            return f"{name!r} is a graph input a caller may override, not a constant"
        if self.is_constant(name):
            return self.array(name)
        if name in self.folds:
            return self.folds[name]
        index = self.producers.get(name)
        if index is None:
            return f"{name!r} is a graph input, not a constant"
        proto = self.model.graph.node[index]
        where = f"{proto.op_type} node {proto.name or '#' + str(index)!r}"
        result: np.ndarray | str
        if proto.op_type not in FOLDABLE_OPS or proto.domain not in DEFAULT_DOMAINS or len(proto.output) != 1:
            result = f"{name!r} is computed at run time (by {where}), not a constant"
        elif any(attr.name == "sparse_value" for attr in proto.attribute):
            result = f"{name!r} is a sparse constant (of any declared size), not folded"
        elif depth >= MAX_FOLD_DEPTH:
            result = f"{name!r} is computed by a chain of more than {MAX_FOLD_DEPTH} constant ops"
        else:
            inputs = {value: self.fold(value, depth + 1) for value in proto.input if value}
            unknown = next((reason for reason in inputs.values() if isinstance(reason, str)), None)
            result = unknown if unknown is not None else self._evaluate(proto, where, inputs)  # type: ignore[arg-type]
        self.folds[name] = result
        return result

    def _evaluate(self, proto: NodeProto, where: str, inputs: dict[str, np.ndarray]) -> np.ndarray | str:
        """``proto`` run by ``onnx.reference`` on constant inputs (read-only result), or why it cannot run."""
        from onnx.reference import ReferenceEvaluator

        opsets = {opset.domain or "": int(opset.version) for opset in self.model.opset_import}
        try:
            outputs: Any = ReferenceEvaluator(proto, opsets=opsets).run(None, inputs)
            array = np.asarray(outputs[0])
        except Exception as err:  # the reference runtime raises many types; the node then stays as it is
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            return f"{where} could not be folded: {first}"
        array.flags.writeable = False
        return array

    def feeds_layers_only(self, index: int) -> bool:
        """Whether node ``index`` is a foldable op whose output is read only as folded layer weights/biases."""
        if index not in self.fold_only:
            self.fold_only[index] = False  # a cycle (invalid ONNX) is not followed twice
            proto = self.model.graph.node[index]
            output = proto.output[0] if len(proto.output) == 1 else ""
            readers = self.consumers.get(output, set())
            self.fold_only[index] = (
                self.is_folded(output) and output not in self.graph_outputs and bool(readers)
                and all(output in self.layer_params.get(reader, set()) or self.feeds_layers_only(reader)
                        for reader in readers))
        return self.fold_only[index]

    def array(self, name: str) -> np.ndarray:
        """The value of constant ``name`` (decoded once, read-only)."""
        if name not in self.arrays:
            if name in self.initializers:
                tensor = self.initializers[name]
            else:
                tensor = self.model.graph.node[self.constants[name]].attribute[0].t
            try:
                array = numpy_helper.to_array(tensor)
            except Exception as err:
                raise ValueError(f"constant {name!r} cannot be read: {err}") from err
            array = np.asarray(array)
            array.flags.writeable = False
            self.arrays[name] = array
        return self.arrays[name]

    def lock_reason(self, index: int, weight: str) -> str:
        """Why replacing ``weight`` (read by node ``index``) would change something else, or ""."""
        if self.model.training_info:
            return "the model has training_info, which may read or update this weight"
        if weight in self.overridable:
            return f"the weight {weight!r} is also a graph input, which a caller may override"
        if weight in self.graph_outputs:
            return f"the weight {weight!r} is also a graph output"
        others = sorted(reader for reader in self.consumers.get(weight, set()) - {index}
                        if not self.feeds_layers_only(reader))
        if others:
            node = self.model.graph.node[others[0]]
            return (f"the weight {weight!r} is also read by {node.op_type} node "
                    f"{node.name or '#' + str(others[0])!r}")
        if weight in self.outer_reads.get(index, set()):
            return f"the weight {weight!r} is also read by this node's subgraph"
        return ""

    def exclusive(self, index: int, name: str) -> bool:
        return (name not in self.overridable and name not in self.graph_outputs
                and self.consumers.get(name, set()) == {index})

    # ---------------------------------------------------------------------------------- layers

    def layer(self, index: int, proto: NodeProto, attrs: dict[str, Any]) -> _LayerSpec | _Unlowered | None:
        """The layer ``proto`` is; for a candidate layer that stays opaque, why; None for other nodes."""
        if proto.domain not in DEFAULT_DOMAINS or proto.op_type not in CANDIDATE_OPS:
            return None
        weight = self._candidate_weight(proto)
        if weight is None:
            return None  # a MatMul of two run-time values, a Gather from a run-time tensor
        if len(proto.output) != 1:
            return self._unlowered(weight, f"it has {len(proto.output)} outputs")
        lowering = {"Gemm": self._gemm, "MatMul": self._matmul, "Conv": self._conv, "Gather": self._gather}
        function = lowering.get(proto.op_type)
        if function is None:
            return self._unlowered(weight, f"{proto.op_type} layers are not decomposed yet")
        spec_or_reason = function(index, proto, attrs)
        if isinstance(spec_or_reason, str):
            logger.debug("%s node %r stays opaque: %s", proto.op_type, proto.name, spec_or_reason)
            return self._unlowered(weight, spec_or_reason)
        return spec_or_reason

    def _candidate_weight(self, proto: NodeProto) -> str | None:
        """The input that would be a candidate layer's weight; None when the node is no candidate."""
        inputs = list(proto.input) + ["", ""]
        if proto.op_type in ("Conv", "ConvTranspose", "Gemm"):
            if proto.op_type == "Gemm" and self.constant_value(inputs[0]) is not None \
                    and self.constant_value(inputs[1]) is None:
                return inputs[0]
            return inputs[1]
        if proto.op_type == "MatMul":
            return next((name for name in (inputs[1], inputs[0]) if self.constant_value(name) is not None), None)
        return inputs[0] if self.constant_value(inputs[0]) is not None else None  # Gather

    def _unlowered(self, weight: str, reason: str) -> _Unlowered:
        value = self.constant_value(weight)
        return _Unlowered(weight, [] if value is None else [int(dim) for dim in value.shape], reason)

    def _weight(self, name: str, ndim: int | None = None) -> np.ndarray | str:
        if not name:
            return "the weight input is empty"
        array = self.fold(name) if not self.is_constant(name) else self.array(name)
        if isinstance(array, str):
            return array
        if ndim is not None and array.ndim != ndim:
            return f"constant {name!r} has {array.ndim} dimensions, not {ndim}"
        if not _is_float(array):
            return f"constant {name!r} is {array.dtype}, not floating point"
        return array

    def _gemm(self, index: int, proto: NodeProto, attrs: dict[str, Any]) -> _LayerSpec | str:
        inputs = list(proto.input)
        x, b = inputs[0], inputs[1]
        c = inputs[2] if len(inputs) > 2 else ""
        if attrs.get("transA", 0):
            return "transA=1"
        if not x or self.constant_value(x) is not None:
            return "its input A is a constant"
        weight = self._weight(b, 2)
        if isinstance(weight, str):
            return weight
        trans_b = bool(attrs.get("transB", 0))
        out, inp = (weight.shape[0], weight.shape[1]) if trans_b else (weight.shape[1], weight.shape[0])
        ir_attrs: dict[str, Any] = {"in_features": int(inp), "out_features": int(out)}
        params: dict[str, str] = {"weight": b}
        layout: list[int | str] = [0, "weight"]
        if c:
            bias = self._weight(c)
            if isinstance(bias, str):
                return f"C: {bias}"
            if bias.shape == (1, out) and self.is_folded(c):  # written back as its chain: reshaped freely
                self.folds[c] = bias.reshape(out)
            elif bias.shape == (1, out) and self.exclusive(index, c):
                self.param_shapes[c] = [1, int(out)]
                self.arrays[c] = bias.reshape(out)
            elif bias.shape != (out,):
                return f"C has shape {bias.shape}, not a bias [{out}]"
            params["bias"] = c
            layout.append("bias")
        alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
        if alpha != 1.0:
            ir_attrs["alpha"] = alpha
        if c and beta != 1.0:
            ir_attrs["beta"] = beta
        return _LayerSpec(Op.LINEAR if trans_b else Op.MATMUL, ir_attrs, params, layout, [x])

    def _matmul(self, index: int, proto: NodeProto, attrs: dict[str, Any]) -> _LayerSpec | str:
        a, b = proto.input[0], proto.input[1]
        a_const, b_const = self.constant_value(a) is not None, self.constant_value(b) is not None
        if a_const == b_const:
            return "both inputs are constants" if a_const else "no input is a constant"
        weight = self._weight(b if b_const else a, 2)
        if isinstance(weight, str):
            return weight
        ir_attrs: dict[str, Any]
        if b_const:  # y = x W, W [in, out]
            ir_attrs = {"in_features": int(weight.shape[0]), "out_features": int(weight.shape[1])}
            return _LayerSpec(Op.MATMUL, ir_attrs, {"weight": b}, [0, "weight"], [a])
        ir_attrs = {"in_features": int(weight.shape[1]), "out_features": int(weight.shape[0]), "weight_side": "left"}
        return _LayerSpec(Op.MATMUL, ir_attrs, {"weight": a}, ["weight", 0], [b])

    def _conv(self, index: int, proto: NodeProto, attrs: dict[str, Any]) -> _LayerSpec | str:
        inputs = list(proto.input)
        x, w = inputs[0], inputs[1]
        b = inputs[2] if len(inputs) > 2 else ""
        if not x or self.constant_value(x) is not None:
            return "its input X is a constant"
        weight = self._weight(w)
        if isinstance(weight, str):
            return weight
        ndim = weight.ndim - 2
        if ndim < 1:
            return f"weight {w!r} has {weight.ndim} dimensions"
        kernel = tuple(int(k) for k in weight.shape[2:])
        if tuple(attrs.get("kernel_shape", kernel)) != kernel:
            return f"kernel_shape {attrs['kernel_shape']} does not match the weight {weight.shape}"
        group = int(attrs.get("group", 1))
        auto_pad = attrs.get("auto_pad", "NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        padding: tuple[int, ...] | str
        if auto_pad in ("NOTSET", ""):
            pads = tuple(int(p) for p in attrs.get("pads", (0,) * (2 * ndim)))
            if len(pads) != 2 * ndim:
                return f"pads {pads} do not have {2 * ndim} entries"
            padding = pads[:ndim] if pads[:ndim] == pads[ndim:] else pads
        else:
            padding = {"VALID": "valid", "SAME_UPPER": "same", "SAME_LOWER": "same_lower"}.get(auto_pad, "")
            if not padding:
                return f"auto_pad {auto_pad!r} is unknown"
        ir_attrs = {
            "in_channels": int(weight.shape[1]) * group, "out_channels": int(weight.shape[0]),
            "kernel_size": kernel, "stride": tuple(int(s) for s in attrs.get("strides", (1,) * ndim)),
            "padding": padding, "dilation": tuple(int(d) for d in attrs.get("dilations", (1,) * ndim)),
            "groups": group, "padding_mode": "zeros",
        }
        params: dict[str, str] = {"weight": w}
        layout: list[int | str] = [0, "weight"]
        if b:
            bias = self._weight(b, 1)
            if isinstance(bias, str):
                return f"B: {bias}"
            params["bias"] = b
            layout.append("bias")
        return _LayerSpec(Op.CONV, ir_attrs, params, layout, [x])

    def _gather(self, index: int, proto: NodeProto, attrs: dict[str, Any]) -> _LayerSpec | str:
        table, ids = proto.input[0], proto.input[1]
        if not ids or self.constant_value(ids) is not None:
            return "its indices are constants"
        weight = self._weight(table, 2)
        if isinstance(weight, str):
            return weight
        if int(attrs.get("axis", 0)) not in (0, -2):
            return f"axis={attrs['axis']}"
        ir_attrs = {"num_embeddings": int(weight.shape[0]), "embedding_dim": int(weight.shape[1]),
                    "padding_idx": None}
        return _LayerSpec(Op.EMBEDDING, ir_attrs, {"weight": table}, ["weight", 0], [ids])

    # ---------------------------------------------------------------------------------- nodes

    def opaque(self, index: int, proto: NodeProto, values: dict[str, Any], types: dict[str, str],
               docs: dict[str, str]) -> tuple[dict[str, Any], dict[str, str], list[int | str], list[str]]:
        """(attrs, params, layout, data inputs) of an opaque node."""
        clash = [key for key in values if key in RESERVED_ATTRS]
        if clash:
            raise ValueError(f"unsupported ONNX construct: node {proto.name or proto.op_type!r} has attributes "
                             f"{clash}, names the IR reserves for itself")
        params: dict[str, str] = {}
        layout: list[int | str] = []
        data: list[str] = []
        for position, name in enumerate(proto.input):
            if name and self.is_constant(name):
                role = f"input:{position}"
                params[role] = name
                layout.append(role)
            else:
                layout.append(len(data))
                data.append(name)
        for name in sorted(self.outer_reads.get(index, set())):
            if self.is_constant(name):
                params[f"outer:{name}"] = name
        attrs = {"source_op": proto.op_type, **values, "onnx": _node_record(proto, layout, None, types, docs)}
        return attrs, params, layout, data

    def run(self) -> Graph:
        model, graph_proto = self.model, self.model.graph
        built: list[tuple[int, Node]] = []
        preferred: list[str] = []
        pending: list[tuple[int, NodeProto, _LayerSpec | None, tuple[Any, ...]]] = []
        unlowered: dict[int, _Unlowered] = {}
        for index, proto in enumerate(graph_proto.node):
            if self.constants.get(proto.output[0] if proto.output else "") == index:
                continue
            where = f"{proto.op_type} node {proto.name or '#' + str(index)!r}"
            try:
                values, types, docs = _attributes(proto)
                found = self.layer(index, proto, values)
            except ValueError as err:
                raise ValueError(f"while lowering {where}: {err}") from err
            spec = found if isinstance(found, _LayerSpec) else None
            if isinstance(found, _Unlowered):
                unlowered[index] = found
            if spec is not None:
                self.layer_params[index] = set(spec.params.values())
            pending.append((index, proto, spec, (values, types, docs)))
            name = proto.name
            if spec is not None:
                weight = spec.params["weight"]
                if weight.endswith(".weight") and len(weight) > len(".weight"):
                    name = weight[: -len(".weight")]  # a module path (PyTorch exports): fc.weight -> fc
            preferred.append(name or f"{proto.op_type}_{index}")
        names = _unique(preferred, [proto.name for _, proto, _, _ in pending],
                        [spec is not None for _, _, spec, _ in pending], _part_prefixes(model))
        for (index, proto, spec, (values, types, docs)), name in zip(pending, names, strict=True):
            if spec is not None:
                attrs = {**spec.attrs, "source_op": proto.op_type,
                         "onnx": _node_record(proto, spec.layout, values, types, docs)}
                reason = self.lock_reason(index, spec.params["weight"])
                if reason:
                    attrs["locked"] = reason
                node = Node(spec.op, name, attrs, dict(spec.params), list(spec.data), list(proto.output))
            else:
                attrs, params, _, data = self.opaque(index, proto, values, types, docs)
                node = Node(Op.OPAQUE, name, attrs, params, data, list(proto.output))
            built.append((index, node))
        graph = Graph(meta={"source": "onnx", "onnx": self.meta(built)})
        for _, node in built:
            graph.add_node(node)
        for name in list(self.initializers) + list(self.constants):
            graph.set_param(name, self.array(name))
        folded = self.folded_params(built)
        for name in folded:
            graph.set_param(name, self.folds[name])  # type: ignore[arg-type]
        if folded:
            graph.meta["onnx"]["folded"] = folded
        if unlowered:
            by_index = dict(built)
            graph.meta["unlowered"] = {
                by_index[index].name: {"op": graph_proto.node[index].op_type, "weight": item.weight,
                                    "shape": item.shape, "reason": item.reason}
                for index, item in unlowered.items()}
        inits = set(self.initializers)
        graph.inputs = [value_from_info(value) for value in graph_proto.input if value.name not in inits]
        graph.outputs = [value_from_info(value) for value in graph_proto.output]
        _add_positions(graph, model, self.input_shapes)
        return verify(graph)

    def folded_params(self, built: list[tuple[int, Node]]) -> dict[str, list[str]]:
        """Folded layer params -> the names of the nodes of the chain computing each (in graph order)."""
        names = {index: node.name for index, node in built}
        folded: dict[str, list[str]] = {}
        for index in self.layer_params:
            for value in sorted(self.layer_params[index]):
                if value in folded or not self.is_folded(value):
                    continue
                chain: set[int] = set()
                stack = [value]
                while stack:
                    producer = self.producers.get(stack.pop())
                    if producer is not None and producer not in chain and producer in names:
                        chain.add(producer)
                        stack.extend(name for name in self.model.graph.node[producer].input if name)
                folded[value] = [names[producer] for producer in sorted(chain)]
        return folded

    def meta(self, built: list[tuple[int, Node]]) -> dict[str, Any]:
        """The model-level record the backend writes back (``graph.meta["onnx"]``)."""
        model, graph_proto = self.model, self.model.graph
        following: dict[int, str | None] = {}
        successor: str | None = None
        by_index = dict(built)
        for index in range(len(graph_proto.node) - 1, -1, -1):
            if index in by_index:
                successor = by_index[index].name
            following[index] = successor
        constants = {}
        for name, index in self.constants.items():
            proto = graph_proto.node[index]
            record: dict[str, Any] = {"name": proto.name, "before": following[index],
                                      "tensor_name": proto.attribute[0].t.name}
            record["rest"] = _rest(proto, ("output", "attribute"))
            if proto.attribute[0].doc_string:
                record["attr_doc"] = proto.attribute[0].doc_string
            constants[name] = record
        meta: dict[str, Any] = {
            "ir_version": int(model.ir_version),
            "opset_import": [[opset.domain, int(opset.version)] for opset in model.opset_import],
            "producer_name": model.producer_name,
            "producer_version": model.producer_version,
            "inputs": [[value.name, value.SerializeToString()] for value in graph_proto.input],
            "outputs": [value.SerializeToString() for value in graph_proto.output],
            "initializers": list(self.initializers),
            "constants": constants,
            "graph_rest": _rest(graph_proto, ("node", "initializer", "input", "output")),
            "model_rest": _rest(model, ("graph",)),
        }
        if self.param_shapes:
            meta["param_shapes"] = self.param_shapes
        return meta


def _part_prefixes(model: ModelProto) -> set[str]:
    """Every ``N`` for which the model already has a value or constant named ``N.<digit>...``.

    A layer called ``N`` would have its parts' arrays and values named ``N.0.weight``, ``N.0:output``
    ...: such a layer name would collide with the model's own names, so it is not used.
    """
    names = {value.name for value in model.graph.input} | {tensor.name for tensor in model.graph.initializer}
    names |= {output for node in model.graph.node for output in node.output}
    prefixes = set()
    for name in names:
        for match in re.finditer(r"\.\d", name):
            prefixes.add(name[:match.start()])
    return prefixes


def _unique(preferred: Sequence[str], fallbacks: Sequence[str], layers: Sequence[bool],
            forbidden: set[str]) -> list[str]:
    """Unique node names: the preferred one, else the ONNX name, else ``<preferred>_<k>``.

    A layer's name is never one of ``forbidden`` (see :func:`_part_prefixes`).
    """
    taken: set[str] = set()
    names = []
    for name, fallback, layer in zip(preferred, fallbacks, layers, strict=True):
        def free(candidate: str, layer: bool = layer) -> bool:
            return bool(candidate) and candidate not in taken and not (layer and candidate in forbidden)

        chosen = name if free(name) else fallback if free(fallback) else ""
        suffix = 1
        while not chosen:
            chosen = f"{name}_{suffix}" if free(f"{name}_{suffix}") else ""
            suffix += 1
        taken.add(chosen)
        names.append(chosen)
    return names


@limited
def lower(model: ModelSource, *, input_shapes: Mapping[str, Sequence[int]] | None = None,
          max_bytes: int | str | None = None) -> Graph:
    """Lower an ONNX model (a ``ModelProto`` or a path) to a dataflow IR graph.

    ``input_shapes`` (input name -> dims) fixes dynamic input dims for shape inference only, so that
    layers get ``out_positions``/``in_positions`` and reports count FLOPs per sample; the graph's
    inputs keep the model's own (symbolic) shapes. Raises ``ValueError`` for a file that is not a
    valid ONNX model and for unsupported constructs, naming the node, and for an input of
    ``input_shapes`` (or a file) larger than ``max_bytes`` (default half of physical memory).
    """
    proto = as_model(model)
    check_input_shapes(proto, input_shapes)
    _check_model(proto, f"{str(model)!r}" if not isinstance(model, ModelProto) else "the model")
    _check_supported(proto)
    return _Lowering(proto, input_shapes).run()


# ------------------------------------------------------------------------------------------ shapes

def check_input_shapes(model: ModelProto, input_shapes: Mapping[str, Sequence[int]] | None) -> None:
    """``ValueError`` when an input of ``input_shapes`` would take more than the memory limit."""
    specs = input_specs(model)
    for name, dims in (input_shapes or {}).items():
        spec = specs.get(name)
        dtype = spec.dtype if spec is not None and spec.dtype is not None else "float32"
        check_array(dims, dtype, f"input {name!r} of input_shapes")


def _fixed_inputs(model: ModelProto, input_shapes: Mapping[str, Sequence[int]] | None) -> ModelProto:
    if not input_shapes:
        return model
    fixed = copy.deepcopy(model)
    known = {value.name: value for value in fixed.graph.input}
    for name, dims in input_shapes.items():
        if name not in known:
            raise ValueError(f"input_shapes names {name!r}, which is not an input of the model "
                             f"(inputs: {sorted(known)})")
        shape = known[name].type.tensor_type.shape
        shape.ClearField("dim")
        for dim in dims:
            shape.dim.add().dim_value = int(dim)
    return fixed


def inferred_shapes(model: ModelProto, input_shapes: Mapping[str, Sequence[int]] | None = None,
                    ) -> dict[str, tuple[int | str | None, ...]]:
    """Shapes of the model's values from ONNX shape inference (empty when inference is impossible)."""
    if model.ByteSize() >= PROTOBUF_LIMIT:
        return {}
    try:
        inferred = onnx.shape_inference.infer_shapes(_fixed_inputs(model, input_shapes), data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, RuntimeError) as err:
        logger.debug("shape inference failed: %s", err)
        return {}
    shapes = {}
    for info in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        value = value_from_info(info)
        if value.shape is not None:
            shapes[value.name] = value.shape
    return shapes


def _static(shape: tuple[int | str | None, ...] | None) -> tuple[int, ...] | None:
    """``shape`` with every dim known except perhaps the first (the batch axis, which positions skip)."""
    if shape is None or not all(isinstance(dim, int) and dim > 0 for dim in shape[1:]):
        return None
    return tuple(dim if isinstance(dim, int) else 1 for dim in shape)


def _positions(node: Node, shapes: Mapping[str, tuple[int | str | None, ...]]) -> tuple[int, int] | None:
    """(input positions, output positions) per sample of one layer, or None when shapes are unknown."""
    out = _static(shapes.get(node.outputs[0]))
    if out is None:
        return None
    if node.op is Op.CONV:
        inp = _static(shapes.get(node.inputs[0]))
        if inp is None:
            return None
        return math.prod(inp[2:]), math.prod(out[2:])
    if node.op is Op.MATMUL and node.attrs.get("weight_side") == "left":
        count = out[-1] * math.prod(out[1:-2]) if len(out) >= 2 else 1
        return count, count
    count = math.prod(out[1:-1]) if len(out) >= 2 else 1
    return count, count


def measured_shapes(model: ModelProto, graph: Graph, input_shapes: Mapping[str, Sequence[int]],
                     layers: Sequence[Node]) -> dict[str, tuple[int | str | None, ...]]:
    """Shapes of the layers' inputs and outputs from one onnxruntime run on zeros of ``input_shapes``."""
    specs = input_specs(model)
    if any(name not in input_shapes for name in specs) or any(spec.dtype is None for spec in specs.values()):
        return {}
    feeds = {name: np.zeros([int(dim) for dim in input_shapes[name]], dtype=np.dtype(spec.dtype))
             for name, spec in specs.items()}
    values = sorted({name for node in layers for name in (node.inputs[0], node.outputs[0])})
    try:
        outputs = run(session(_probe(model, values, graph)), feeds, values, "zeros of input_shapes")
    except (ValueError, TypeError) as err:
        logger.debug("could not measure layer shapes: %s", err)
        return {}
    return {name: tuple(int(dim) for dim in np.shape(value)) for name, value in zip(values, outputs, strict=True)}


def _add_positions(graph: Graph, model: ModelProto, input_shapes: Mapping[str, Sequence[int]] | None) -> None:
    """Set ``in_positions``/``out_positions`` on every layer, or on none (the report's FLOPs unit is one)."""
    layers = graph.layers()
    if not layers:
        return
    shapes = inferred_shapes(model, input_shapes)
    found = {node.name: _positions(node, shapes) for node in layers}
    unknown = [node for node in layers if found[node.name] is None]
    if unknown and input_shapes:  # shape inference stops at data-dependent reshapes: measure instead
        shapes.update(measured_shapes(model, graph, input_shapes, unknown))
        found.update({node.name: _positions(node, shapes) for node in unknown})
    if any(value is None for value in found.values()):
        return
    for node in layers:
        in_pos, out_pos = found[node.name]  # type: ignore[misc]
        node.attrs["out_positions"] = out_pos
        if node.op is Op.CONV:
            node.attrs["in_positions"] = in_pos


# ----------------------------------------------------------------------------------------- counting

def count_parameters(model: ModelSource) -> int:
    """Elements of the model's floating-point constants: initializers and ``Constant`` node tensors.

    ONNX does not tell trained weights from other float constants (BatchNorm statistics, scales),
    so those count too.
    """
    proto = as_model(model)
    tensors = list(proto.graph.initializer)
    tensors += [node.attribute[0].t for node in proto.graph.node if is_constant_node(node)]
    total = 0
    for tensor in tensors:
        name = _dtype_name(tensor.data_type) or ""
        if "float" in name:
            total += math.prod(int(dim) for dim in tensor.dims)
    return total


# ------------------------------------------------------------------------------------------- feeds

def input_specs(model: ModelProto) -> dict[str, Value]:
    """The inputs a caller must feed (graph inputs that are not initializers), by name."""
    inits = {tensor.name for tensor in model.graph.initializer}
    return {value.name: value_from_info(value) for value in model.graph.input if value.name not in inits}


def check_feeds(model: ModelProto, feeds: object, where: str = "feeds") -> dict[str, Any]:
    """``feeds`` checked against the model's inputs, returned as numpy arrays.

    Every input must be present, no unknown name given, dtypes and fixed dims must be as the model
    declares them, and float values finite; ``where`` starts each error message.
    """
    if not isinstance(feeds, Mapping):
        raise TypeError(f"{where} must be a dict of input name -> numpy array, got {type(feeds).__name__}")
    specs = input_specs(model)
    optional = {tensor.name for tensor in model.graph.initializer} & {value.name for value in model.graph.input}
    missing = [name for name in specs if name not in feeds]
    unknown = [name for name in feeds if name not in specs and name not in optional]
    if missing or unknown:
        detail = []
        if missing:
            detail.append(f"missing {missing}")
        if unknown:
            detail.append(f"unknown {unknown}")
        raise ValueError(f"{where} do not match the model's inputs ({', '.join(detail)}); the model takes "
                         f"{list(specs)}")
    checked: dict[str, Any] = {}
    for name, value in feeds.items():
        spec = specs.get(name)
        if spec is None or spec.dtype is None:  # an overridable initializer, or a sequence/map input
            checked[name] = value
            continue
        array = np.asarray(value)
        if str(array.dtype) != spec.dtype:
            raise ValueError(f"{where}: input {name!r} has dtype {array.dtype}, the model expects {spec.dtype}")
        if spec.shape is not None:
            if array.ndim != len(spec.shape):
                raise ValueError(f"{where}: input {name!r} has shape {list(array.shape)}, the model expects "
                                 f"{len(spec.shape)} dimensions {_show(spec.shape)}")
            for axis, (got, want) in enumerate(zip(array.shape, spec.shape, strict=True)):
                if isinstance(want, int) and want > 0 and got != want:
                    raise ValueError(f"{where}: input {name!r} has shape {list(array.shape)}, the model expects "
                                     f"{_show(spec.shape)} (dimension {axis} must be {want})")
        if array.dtype.kind in "fc" and not np.isfinite(array).all():  # NaN compares false: checks would pass
            bad = int(array.size - np.count_nonzero(np.isfinite(array)))
            raise ValueError(f"{where}: input {name!r} has {bad} of {array.size} values not finite (NaN or Inf); "
                             f"feeds must be finite numbers")
        checked[name] = array
    return checked


def _show(shape: Sequence[int | str | None]) -> str:
    return "[" + ", ".join("?" if dim is None else str(dim) for dim in shape) + "]"


# -------------------------------------------------------------------------------------- statistics

def execution_groups(model: ModelSource, graph: Graph, datasets: Iterable[Any], names: Sequence[str],
                     ) -> list[list[str]]:
    """The layers ``names`` in execution (graph) order, those reading the same value in one group.

    Layers fed the same tensor (query/key/value projections) are calibrated together in the
    sequential mode. The order is the graph's topological order, so ``datasets`` is not needed.
    """
    wanted = set(names)
    groups: dict[str, list[str]] = {}
    for node in graph.layers():
        if node.name in wanted:
            groups.setdefault(node.inputs[0] if node.inputs else f"#{node.name}", []).append(node.name)
    return list(groups.values())


def session(model: ModelProto, threads: int | None = None) -> Any:
    """An onnxruntime CPU session for ``model`` (quiet: warnings are not printed)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
    if model.ByteSize() >= PROTOBUF_LIMIT:
        raise ValueError("the model is larger than 2 GB: save it with external data and run it from the file")
    try:
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"onnxruntime cannot load the model: {first}") from err


def run(sess: Any, feeds: Mapping[str, Any], outputs: Sequence[str] | None = None, where: str = "feeds") -> list[Any]:
    """``sess.run`` with onnxruntime's errors turned into one-line ``ValueError``s."""
    try:
        return list(sess.run(None if outputs is None else list(outputs), dict(feeds)))
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"onnxruntime cannot run the model on {where}: {first}") from err


def _rows(node: Node, x: np.ndarray) -> np.ndarray:
    """The layer input as rows of input features (channels last for convs)."""
    features = int(node.attrs["in_channels"] if node.op is Op.CONV else node.attrs["in_features"])
    if node.op is Op.CONV:
        return np.moveaxis(x, 1, -1).reshape(-1, features)
    if node.op is Op.MATMUL and node.attrs.get("weight_side") == "left":
        return (x.reshape(1, -1) if x.ndim == 1 else np.moveaxis(x, -2, -1)).reshape(-1, features)
    return x.reshape(-1, features)


def _probe(model: ModelProto, values: Sequence[str], graph: Graph) -> ModelProto:
    """``model`` with ``values`` added as graph outputs (types from shape inference or the weights)."""
    probe = copy.deepcopy(model)
    present = {value.name for value in probe.graph.output}
    inferred = {}
    if model.ByteSize() < PROTOBUF_LIMIT:
        try:
            done = onnx.shape_inference.infer_shapes(model)
            inferred = {info.name: info for info in [*done.graph.value_info, *done.graph.input]}
        except (onnx.shape_inference.InferenceError, RuntimeError) as err:
            logger.debug("shape inference failed while probing: %s", err)
    for name in values:
        if name in present:
            continue
        info = inferred.get(name)
        if info is not None and info.type.HasField("tensor_type") and info.type.tensor_type.elem_type:
            elem_type = info.type.tensor_type.elem_type
        else:  # a layer's input and output have its weight's type
            node = next(node for node in graph.layers() if name in (*node.inputs[:1], *node.outputs[:1]))
            weight = graph.param(node, "weight")
            assert weight is not None
            elem_type = onnx.helper.np_dtype_to_tensor_dtype(weight.dtype)
        probe.graph.output.append(onnx.helper.make_tensor_value_info(name, elem_type, None))
        present.add(name)
    return probe


def _check_feed_datasets(datasets: Any) -> None:
    if isinstance(datasets, (str, bytes, Mapping)) or not hasattr(datasets, "__iter__"):
        raise TypeError(f"datasets must be an iterable of feed dicts (input name -> numpy array), got "
                        f"{type(datasets).__name__}")


def _calibrated_layers(graph: Graph, names: Sequence[str] | None) -> list[Node]:
    """The layers among ``names`` (default: all) whose input statistics can be collected."""
    nodes = [graph.node(name) for name in (names if names is not None else [n.name for n in graph.layers()])]
    return [node for node in nodes if node.op in (Op.LINEAR, Op.MATMUL, Op.CONV) and node.inputs]


def collect_stats(model: ModelSource, graph: Graph, datasets: Iterable[Any], max_iter: int = -1,
                  names: Sequence[str] | None = None, stop_early: bool = False) -> dict[str, LayerStats]:
    """Input second moments E[x xᵀ] and means E[x] (float64) of the Linear, MatMul and Conv layers ``names``.

    Each element of ``datasets`` is a dict of input name -> numpy array (checked against the model's
    inputs); the model runs in onnxruntime with the layers' inputs exposed as extra outputs. ``model``
    may also be a decomposed model built from ``graph`` (the sequential mode): the layers' input
    values keep their names. ``stop_early`` is accepted for the facade: onnxruntime computes only
    what the requested values need, so every run stops at the layers' inputs anyway.
    """
    proto = as_model(model)
    _check_feed_datasets(datasets)
    wanted = _calibrated_layers(graph, names)
    values = sorted({node.inputs[0] for node in wanted})
    sess = session(_probe(proto, values, graph)) if wanted else None
    sums = MomentSums(node.name for node in wanted)
    seen = 0
    for index, element in enumerate(datasets):
        where = f"datasets element {index}"
        feeds = check_feeds(proto, element, where)
        if sess is not None:
            outputs = dict(zip(values, run(sess, feeds, values, where), strict=True))
            for node in wanted:
                rows = _rows(node, np.asarray(outputs[node.inputs[0]])).astype(np.float64)
                if not np.isfinite(rows).all():
                    raise ValueError(f"the input of layer {node.name!r} holds NaN or Inf values on {where}; "
                                     f"statistics need finite activations")
                sums.add(node.name, rows.shape[0], moment=rows.T @ rows, mean=rows.sum(axis=0))
                value = np.asarray(outputs[node.inputs[0]])
                if collects_patches(node) and value.ndim == 4:
                    sums.add_patches(node.name, *patch_moment_sum(node, value))
        seen += 1
        if 0 < max_iter <= seen:
            break
    if seen == 0:
        raise ValueError("datasets is empty: data-aware decomposition needs at least one element")
    return sums.stats()



def collect_cross_stats(original: ModelSource, model: ModelSource, graph: Graph, datasets: Iterable[Any],
                        max_iter: int = -1, names: Sequence[str] | None = None) -> dict[str, LayerStats]:
    """Statistics relating each layer's input in ``model`` (x̃, partly decomposed) to its input in ``original`` (x).

    Both models run in onnxruntime on every element with the layers' inputs exposed as extra outputs
    (a decomposed layer's first part reads the value the layer read, so the names match). Returned per
    layer: E[x̃ x̃ᵀ], E[x̃], E[x x̃ᵀ], E[x xᵀ], E[x] (float64), for the sequential mode to fit each layer
    to the *original* outputs. Neither model is changed.
    """
    source, target = as_model(original), as_model(model)
    _check_feed_datasets(datasets)
    wanted = _calibrated_layers(graph, names)
    values = sorted({node.inputs[0] for node in wanted})
    sessions = [session(_probe(proto, values, graph)) for proto in (source, target)] if wanted else []
    sums = MomentSums(node.name for node in wanted)
    seen = 0
    for index, element in enumerate(datasets):
        where = f"datasets element {index}"
        feeds = check_feeds(source, element, where)
        if sessions:
            first, second = (dict(zip(values, run(sess, feeds, values, where), strict=True)) for sess in sessions)
            for node in wanted:
                x = _rows(node, np.asarray(first[node.inputs[0]])).astype(np.float64)
                x_tilde = _rows(node, np.asarray(second[node.inputs[0]])).astype(np.float64)
                if x.shape != x_tilde.shape:
                    raise ValueError(f"layer {node.name!r} saw inputs of different shapes in the original and the "
                                     f"decomposed model")
                sums.add(node.name, x.shape[0], moment=x_tilde.T @ x_tilde, mean=x_tilde.sum(0), cross=x.T @ x_tilde,
                         source=x.T @ x, source_mean=x.sum(0))
        seen += 1
        if 0 < max_iter <= seen:
            break
    if seen == 0:
        raise ValueError("datasets is empty: data-aware decomposition needs at least one element")
    return sums.stats(warn_unseen=False)

# ------------------------------------------------------------------------------------------- output errors

def _float_outputs(values: Sequence[Any]) -> list[np.ndarray]:
    return [np.asarray(value, dtype=np.float64) for value in values
            if isinstance(value, np.ndarray) and value.dtype.kind == "f"]


def _weight_tensors(model: ModelProto) -> dict[str, TensorProto]:
    """Initializers and dense ``Constant`` values of the main graph, by name (the protos themselves)."""
    tensors = {tensor.name: tensor for tensor in model.graph.initializer}
    for node in model.graph.node:
        if is_constant_node(node):
            tensors[node.output[0]] = node.attribute[0].t
    return tensors


def _store_folded(model: ModelProto, names: Iterable[str]) -> None:
    """Make each of ``names`` that a chain of constant ops computes an initializer holding its value, in place.

    The chain's last node writes to a renamed value nobody reads, so replacing the initializer
    replaces the folded weight (as the decomposition does) and nothing else.
    """
    stored = _weight_tensors(model)
    wanted = [name for name in dict.fromkeys(names) if name not in stored]
    if not wanted:
        return
    lowering = _Lowering(model)
    taken = {name for node in model.graph.node for name in node.output} | set(lowering.initializers)
    for name in wanted:
        value = lowering.fold(name)
        if isinstance(value, str):
            continue  # not a folded weight: the caller reports the unknown name
        replacement = f"{name}.unfolded"
        while replacement in taken:
            replacement += "_"
        taken.add(replacement)
        producer = model.graph.node[lowering.producers[name]]
        producer.output[:] = [replacement if output == name else output for output in producer.output]
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))


def output_errors(model: ModelSource, datasets: Iterable[Any], trials: Sequence[Mapping[str, np.ndarray]],
                  max_iter: int = -1, progress: Callable[[int], None] | None = None) -> list[float]:
    """Per trial, the model's relative output error Σ‖y' − y‖² / Σ‖y‖² with some weights replaced.

    A trial maps initializer (or ``Constant``, or folded: see the module docstring) names to replacement
    arrays holding the same number of values (e.g. one layer's weight truncated to a low rank; reshaped
    to the stored tensor's shape).
    ``y`` are the floating-point outputs in onnxruntime on the first ``max_iter`` feed dicts of
    ``datasets`` (-1: all). Each trial runs a copy of the model; ``model`` is not changed.
    """
    proto = as_model(model)
    _check_feed_datasets(datasets)
    feeds = [check_feeds(proto, element, f"datasets element {index}")
             for index, element in enumerate(first_elements(datasets, max_iter))]
    work = copy.deepcopy(proto)
    _store_folded(work, [name for trial in trials for name in trial])
    tensors = _weight_tensors(work)
    for trial in trials:
        for name, array in trial.items():
            if name not in tensors:
                raise ValueError(f"no initializer or constant named {name!r} in the model")
            if math.prod(tensors[name].dims) != np.size(array):
                raise ValueError(f"the replacement for {name!r} has {np.size(array)} values, the model's tensor "
                                 f"{list(tensors[name].dims)}")
    current = [session(work)]

    def outputs(index: int) -> list[np.ndarray]:
        return _float_outputs(run(current[0], feeds[index], where=f"datasets element {index}"))

    @contextlib.contextmanager
    def applied(trial: Mapping[str, np.ndarray]) -> Iterator[None]:
        saved = {name: copy.copy(tensors[name]) for name in trial}
        try:
            for name, array in trial.items():
                original = numpy_helper.to_array(saved[name])
                replacement = np.asarray(array).reshape(original.shape).astype(original.dtype)
                tensors[name].CopyFrom(numpy_helper.from_array(replacement, name=saved[name].name))
            current[0] = session(work)  # onnxruntime keeps its own copy of the weights
        finally:
            for name, tensor in saved.items():
                tensors[name].CopyFrom(tensor)
        yield

    return relative_output_errors(outputs, len(feeds), trials, applied, progress)


if TYPE_CHECKING:  # the registry hands this module out as a Frontend: mypy checks that it is one
    import frontends.onnx as _this_module

    _AS_PROTOCOL: Frontend = _this_module
