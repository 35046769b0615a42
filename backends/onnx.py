"""ONNX backend: layer IR -> ONNX ``ModelProto``; files; opset conversion; onnxruntime validation.

Mirrors ``frontends/onnx.py``. ``build(graph, like=model)`` writes every node the frontend lowered
back exactly as it came (its op, name, attributes, input layout, and the original initializer or
``Constant`` node of every unchanged constant), so a graph that was not decomposed gives the same
model. The layers the engine factorized become plain ONNX nodes named after their parts, with
initializers named after the factorized params (``fc.0.weight``, ``fc.1.weight``, ``fc.1.bias``)::

    Linear (from Gemm)      -> Gemm(x, W, [b], transB=1) per part; alpha/beta on the part with the bias
    MatMul                  -> MatMul(x, W) per part (MatMul(W, x) when the weight is on the left);
                               Gemm(x, W, b) for the part that carries a Gemm's bias or alpha/beta
    Conv (Tucker-2)         -> Conv 1x1 -> Conv k x k (original strides, pads, dilations) -> Conv 1x1
    Conv 1x1 (compact)      -> Conv 1x1 (original strides, pads) -> Conv 1x1
    Embedding               -> Gather(table [num, r], ids) -> MatMul(., [r, dim])

A ``Linear`` part written as ``MatMul`` (the projection after an embedding, a bias-free Gemm below
opset 11) stores its initializer transposed, ``[in, out]``, under the same name.

A param the frontend folded from a chain of constant ops (``meta["onnx"]["folded"]``) is written back
as that chain, which the graph still holds; a chain that no written node reads any more (its layer was
factorized) is dropped, with the constants only it read. Everything else a factorization does not
replace stays: a chain or an initializer another node still reads is written as it was.

The result passes ``onnx.checker.check_model(full_check=True)`` (which includes strict shape
inference); a model the check rejects is an error unless the original model (``like``) already
fails the same check. ``save`` writes atomically with permissions 0640, with external data when the
model is 2 GB or more. ``validate`` runs two models in onnxruntime on the same feeds and reports, per
output, the max and mean absolute error and the relative errors ``max|d| / max|ref|`` and
``mean|d| / mean|ref|``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto, ValueInfoProto, numpy_helper

from frontends.onnx import (
    PROTOBUF_LIMIT,
    ModelSource,
    as_model,
    check_feeds,
    input_specs,
    is_constant_node,
    load_model,
    run,
    session,
    value_from_info,
)
from lowrank_ir import Graph, Node, Op, Value, verify
from lowrank_ir._files import FILE_MODE, SafeWriteUmask, atomic_write, temporary_folder
from lowrank_ir._ir import source_attrs
from lowrank_ir._limits import check_array, check_npz, limited
from lowrank_ir._protocols import Backend, NativeBackend

__all__ = [
    "DEFAULT_LAYOUT",
    "OutputError",
    "ValidationReport",
    "build",
    "convert_opset",
    "encode_attribute",
    "export",
    "load_feeds",
    "load_layers",
    "random_feeds",
    "save",
    "validate",
    "validate_native",
]

logger = logging.getLogger(__name__)

#: Size given to a dynamic input dimension when feeds are made up (the batch axis gets 1).
DEFAULT_DIM = 32

#: How factorized layers are laid out unless the caller says (``lowrank_ir.LAYOUTS``): for deployment, a
#: 1x1 conv as two convs, not the reference tool's three.
DEFAULT_LAYOUT = "compact"

#: Metadata key under which a decomposed model records which layers were factorized into which parts.
METADATA_KEY = "lowrank_ir.factorized"


# ---------------------------------------------------------------------------------------- attributes

def _infer_type(value: Any) -> str:
    if isinstance(value, bool) or isinstance(value, (int, np.integer)):
        return "INT"
    if isinstance(value, (float, np.floating)):
        return "FLOAT"
    if isinstance(value, (str, bytes)):
        return "STRING"
    if isinstance(value, (list, tuple)):
        if all(isinstance(item, (int, np.integer)) and not isinstance(item, bool) for item in value):
            return "INTS"
        if all(isinstance(item, (int, float, np.number)) for item in value):
            return "FLOATS"
        if all(isinstance(item, (str, bytes)) for item in value):
            return "STRINGS"
    raise ValueError(f"cannot tell the ONNX attribute type of {value!r}")


def encode_attribute(name: str, value: Any, kind: str | None = None, doc: str = "") -> AttributeProto:
    """The ``AttributeProto`` for ``value`` of type ``kind`` (inferred when None).

    Inverts ``frontends.onnx.decode_attribute`` exactly.
    """
    kind = kind or _infer_type(value)
    attr = AttributeProto(name=name, type=AttributeProto.AttributeType.Value(kind))
    if doc:
        attr.doc_string = doc
    text = (lambda item: item if isinstance(item, bytes) else str(item).encode("utf-8"))  # noqa: E731
    if kind == "FLOAT":
        attr.f = float(value)
    elif kind == "INT":
        attr.i = int(value)
    elif kind == "STRING":
        attr.s = text(value)
    elif kind == "FLOATS":
        attr.floats.extend(float(item) for item in value)
    elif kind == "INTS":
        attr.ints.extend(int(item) for item in value)
    elif kind == "STRINGS":
        attr.strings.extend(text(item) for item in value)
    elif kind == "TENSOR":
        attr.t.ParseFromString(value)
    elif kind == "GRAPH":
        attr.g.ParseFromString(value)
    elif kind == "SPARSE_TENSOR":
        attr.sparse_tensor.ParseFromString(value)
    elif kind == "TYPE_PROTO":
        attr.tp.ParseFromString(value)
    elif kind in ("TENSORS", "GRAPHS", "SPARSE_TENSORS", "TYPE_PROTOS"):
        field_name = {"TENSORS": "tensors", "GRAPHS": "graphs", "SPARSE_TENSORS": "sparse_tensors",
                      "TYPE_PROTOS": "type_protos"}[kind]
        for item in value:
            getattr(attr, field_name).add().ParseFromString(item)
    else:
        raise ValueError(f"attribute {name!r}: unknown ONNX attribute type {kind!r}")
    return attr


# ------------------------------------------------------------------------------------------ tensors

def _same(array: np.ndarray, other: np.ndarray) -> bool:
    """Same dtype, shape and values (NaNs at the same places count as equal)."""
    if array.dtype != other.dtype or array.shape != other.shape:
        return False
    if array.dtype.kind in "fc":
        return bool(np.array_equal(array, other, equal_nan=True))
    return bool(np.array_equal(array, other))


def _tensor(array: np.ndarray, name: str) -> TensorProto:
    try:
        return numpy_helper.from_array(np.asarray(array, order="C"), name)  # ascontiguousarray makes 0-d 1-d
    except Exception as err:
        raise ValueError(f"param {name!r} ({array.dtype}, shape {list(array.shape)}) cannot be written as an "
                         f"ONNX tensor: {err}") from err


def _elem_type(dtype: str | None) -> int:
    if dtype is None:
        return TensorProto.UNDEFINED
    try:
        return int(onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
    except (TypeError, KeyError, ValueError):
        name = dtype.upper()
        if name in TensorProto.DataType.keys():
            return int(TensorProto.DataType.Value(name))
        raise ValueError(f"dtype {dtype!r} has no ONNX element type") from None


def _value_info(value: Value) -> ValueInfoProto:
    if value.dtype is None:
        return onnx.helper.make_empty_tensor_value_info(value.name)
    shape = None if value.shape is None else list(value.shape)
    return onnx.helper.make_tensor_value_info(value.name, _elem_type(value.dtype), shape)


def _same_value(info: ValueInfoProto, value: Value) -> bool:
    stored = value_from_info(info)
    return stored.name == value.name and stored.dtype == value.dtype and stored.shape == value.shape


# ------------------------------------------------------------------------------------------- writing

@dataclass(slots=True)
class _Chain:
    """The parts one factorized layer became, and the ONNX op it came from."""

    original: str
    parts: list[str]
    source_op: str | None


@dataclass(slots=True)
class _Writer:
    """Writes one graph; ``like`` (the original model) supplies the protos of unchanged constants."""

    graph: Graph
    like: ModelProto | None
    record: dict[str, Any]
    nodes: list[NodeProto] = field(default_factory=list)
    owners: list[str] = field(default_factory=list)  # per written node: the graph node (or constant) it is
    dropped_values: set[str] = field(default_factory=set)  # outputs of the chains prune() dropped
    chains: dict[str, _Chain] = field(default_factory=dict)
    transposed: set[str] = field(default_factory=set)
    like_inits: dict[str, TensorProto] = field(default_factory=dict)
    like_constants: dict[str, NodeProto] = field(default_factory=dict)
    opset: int = 0

    def __post_init__(self) -> None:
        for original, parts in self.graph.meta.get("factorized", {}).items():
            present = [part for part in parts if part in self.graph]
            if not present:
                continue
            source = next((self.graph.node(part).attrs.get("source_op") for part in present
                           if "source_op" in self.graph.node(part).attrs), None)
            chain = _Chain(original, present, source)
            for part in present:
                self.chains[part] = chain
        if self.like is not None:
            self.like_inits = {tensor.name: tensor for tensor in self.like.graph.initializer}
            self.like_constants = {node.output[0]: node for node in self.like.graph.node if is_constant_node(node)}
        self.opset = self.default_opset()

    def default_opset(self) -> int:
        for domain, version in self.record.get("opset_import", []):
            if domain in ("", "ai.onnx"):
                return int(version)
        return 0

    # ------------------------------------------------------------------------------ params

    def array(self, name: str) -> np.ndarray:
        """Param ``name`` as it is written: the original shape restored, transposed if written so."""
        array = self.graph.params[name]
        if name in self.transposed:
            array = array.T
        shape = self.record.get("param_shapes", {}).get(name)
        if shape is not None and math.prod(shape) == array.size:
            array = array.reshape(shape)
        return array

    def initializer(self, name: str) -> TensorProto:
        array = self.array(name)
        original = self.like_inits.get(name)
        if original is not None and _same(array, numpy_helper.to_array(original)):
            return copy.copy(original)
        return _tensor(array, name)

    def constant_node(self, name: str) -> NodeProto:
        array = self.array(name)
        original = self.like_constants.get(name)
        if original is not None and _same(array, numpy_helper.to_array(original.attribute[0].t)):
            return copy.copy(original)
        info = self.record["constants"][name]
        node = _header(info, "Constant")
        node.output.append(name)
        attr = AttributeProto(name="value", type=AttributeProto.TENSOR)
        if info.get("attr_doc"):
            attr.doc_string = info["attr_doc"]
        attr.t.CopyFrom(_tensor(array, info.get("tensor_name", "")))
        node.attribute.append(attr)
        return node

    # ------------------------------------------------------------------------------ nodes

    def exact(self, node: Node) -> NodeProto:
        """A node the frontend lowered and nothing changed: written back from its record."""
        record = node.attrs["onnx"]
        proto = _header(record, node.attrs["source_op"])
        for slot in record["inputs"]:
            proto.input.append(node.inputs[slot] if isinstance(slot, int) else node.params[slot])
        proto.output.extend(node.outputs)
        types, docs = record.get("types", {}), record.get("attr_docs", {})
        if node.is_layer:
            values = record.get("attrs", {})
        else:
            values = source_attrs(node)
        for key, value in values.items():
            proto.attribute.append(encode_attribute(key, value, types.get(key), docs.get(key, "")))
        return proto

    def opaque(self, node: Node) -> NodeProto:
        """An opaque node built by hand (no record): its source op with attributes of inferred types."""
        if "source_op" not in node.attrs:
            raise ValueError("an Opaque node needs attrs['source_op'] (the ONNX op type)")
        values = source_attrs(node)
        inputs = list(node.inputs) + [name for role, name in node.params.items() if not role.startswith("outer:")]
        return onnx.helper.make_node(node.attrs["source_op"], inputs, node.outputs, name=node.name, **values)

    def emit(self, op_type: str, inputs: list[str], outputs: list[str], name: str, **attrs: Any) -> None:
        self.nodes.append(onnx.helper.make_node(op_type, inputs, outputs, name=name, **attrs))

    def linear(self, node: Node, chain: _Chain | None) -> None:
        """Linear: Gemm(transB=1) for a part of a Gemm, else MatMul by the transposed weight (+ Add)."""
        weight, bias = node.params["weight"], node.params.get("bias")
        scales = {key: float(node.attrs[key]) for key in ("alpha", "beta") if key in node.attrs}
        if chain is not None and chain.source_op == "Gemm" and (bias or scales or self.opset >= 11):
            inputs = [node.inputs[0], weight] + ([bias] if bias else [])
            self.emit("Gemm", inputs, node.outputs, node.name, transB=1, **scales)
            return
        if scales:
            raise ValueError("a Linear with alpha/beta is written as a Gemm, which needs a bias (or opset >= 11)")
        self.transposed.add(weight)
        if bias:
            product = f"{node.name}:matmul"
            self.emit("MatMul", [node.inputs[0], weight], [product], f"{node.name}/MatMul")
            self.emit("Add", [product, bias], node.outputs, node.name)
        else:
            self.emit("MatMul", [node.inputs[0], weight], node.outputs, node.name)

    def matmul(self, node: Node) -> None:
        weight, bias = node.params["weight"], node.params.get("bias")
        scales = {key: float(node.attrs[key]) for key in ("alpha", "beta") if key in node.attrs}
        if node.attrs.get("weight_side", "right") == "left":
            if bias or scales:
                raise ValueError("a left-hand MatMul takes no bias or alpha/beta")
            self.emit("MatMul", [weight, node.inputs[0]], node.outputs, node.name)
        elif bias or scales:  # the part of a Gemm(transB=0) that carries its bias and scales
            self.emit("Gemm", [node.inputs[0], weight] + ([bias] if bias else []), node.outputs, node.name, **scales)
        else:
            self.emit("MatMul", [node.inputs[0], weight], node.outputs, node.name)

    def conv(self, node: Node) -> None:
        attrs = node.attrs
        if attrs.get("padding_mode", "zeros") != "zeros":
            raise ValueError(f"padding_mode {attrs['padding_mode']!r}: ONNX Conv pads with zeros only")
        ndim = len(attrs["kernel_size"])
        padding = attrs["padding"]
        extra: dict[str, Any] = {}
        if isinstance(padding, str):
            extra["auto_pad"] = {"same": "SAME_UPPER", "same_lower": "SAME_LOWER", "valid": "VALID"}[padding]
        else:
            pads = [int(p) for p in padding]
            extra["pads"] = pads + pads if len(pads) == ndim else pads
        inputs = [node.inputs[0], node.params["weight"]] + ([node.params["bias"]] if "bias" in node.params else [])
        self.emit("Conv", inputs, node.outputs, node.name, kernel_shape=[int(k) for k in attrs["kernel_size"]],
                  strides=[int(s) for s in attrs["stride"]], dilations=[int(d) for d in attrs["dilation"]],
                  group=int(attrs["groups"]), **extra)

    def layer(self, node: Node, chain: _Chain | None) -> None:
        if node.op is Op.LINEAR:
            self.linear(node, chain)
        elif node.op is Op.MATMUL:
            self.matmul(node)
        elif node.op is Op.CONV:
            self.conv(node)
        elif node.op is Op.EMBEDDING:
            self.emit("Gather", [node.params["weight"], node.inputs[0]], node.outputs, node.name, axis=0)
        else:
            raise ValueError(f"op {node.op.value} cannot be written to ONNX (supported: Linear, MatMul, Conv, "
                             f"Embedding, Opaque)")

    def node(self, node: Node) -> None:
        chain = self.chains.get(node.name)
        if chain is None and "onnx" in node.attrs and "source_op" in node.attrs:
            self.nodes.append(self.exact(node))
        elif node.op is Op.OPAQUE:
            self.nodes.append(self.opaque(node))
        else:
            if len(node.inputs) != 1 or len(node.outputs) != 1:
                raise ValueError(f"a layer needs one data input and one output, has inputs {node.inputs} and "
                                 f"outputs {node.outputs}")
            self.layer(node, chain)

    # ------------------------------------------------------------------------------ graph

    def write_nodes(self) -> set[str]:
        """Emit every node, each lifted constant just before the node that followed it originally."""
        constants: dict[str | None, list[str]] = {}
        for name, info in self.record.get("constants", {}).items():
            if name in self.graph.params:
                constants.setdefault(info.get("before"), []).append(name)
        anchors = {node.name for node in self.graph} | {chain.original for chain in self.chains.values()}
        early = [name for key, names in constants.items() if key is not None and key not in anchors for name in names]
        emitted = set(early)
        for name in early:
            self.add_constant(name)
        for node in self.graph:
            keys = [node.name]
            chain = self.chains.get(node.name)
            if chain is not None and chain.parts[0] == node.name:
                keys.insert(0, chain.original)
            for key in keys:
                for name in constants.get(key, []):
                    self.add_constant(name)
                    emitted.add(name)
            written = len(self.nodes)
            try:
                self.node(node)
            except (ValueError, KeyError, IndexError) as err:
                raise ValueError(f"while writing node {node.name!r} ({node.op.value}): {err}") from err
            self.owners.extend([node.name] * (len(self.nodes) - written))
        for name in constants.get(None, []):
            self.add_constant(name)
            emitted.add(name)
        return emitted

    def add_constant(self, name: str) -> None:
        self.nodes.append(self.constant_node(name))
        self.owners.append(f"#constant:{name}")

    def prune(self) -> set[str]:
        """Drop the folded chains no written node reads any more; the params only they read.

        A chain node is dropped when none of its outputs is read by a node written after it, a
        subgraph, or the graph's outputs; a param is dropped when every graph node using it was.
        """
        chain_nodes = {name for names in self.record.get("folded", {}).values() for name in names}
        if not chain_nodes:
            return set()
        from frontends.onnx import outer_reads

        needed = {value.name for value in self.graph.outputs}
        dropped: set[str] = set()
        for proto, owner in zip(reversed(self.nodes), reversed(self.owners), strict=True):
            if owner in chain_nodes and not any(output in needed for output in proto.output):
                dropped.add(owner)
                continue
            needed.update(proto.input)
            needed.update(outer_reads(proto))
        users: dict[str, set[str]] = {}
        for node in self.graph:
            for param in node.params.values():
                users.setdefault(param, set()).add(node.name)
        unused = {param for param, names in users.items() if names <= dropped and param not in needed}
        kept = [(proto, owner) for proto, owner in zip(self.nodes, self.owners, strict=True)
                if owner not in dropped and owner.removeprefix("#constant:") not in unused]
        self.dropped_values = {output for proto, owner in zip(self.nodes, self.owners, strict=True)
                               if owner in dropped for output in proto.output}
        self.nodes = [proto for proto, _ in kept]
        self.owners = [owner for _, owner in kept]
        return unused

    def inputs(self, initializers: list[TensorProto]) -> list[ValueInfoProto]:
        data = {value.name: value for value in self.graph.inputs}
        written = {tensor.name for tensor in initializers}
        result, seen = [], set()
        for name, blob in self.record.get("inputs", []):
            if name not in data and name not in written:
                continue  # an initializer input whose initializer a rewrite replaced
            info = ValueInfoProto.FromString(blob)
            if name in data and not _same_value(info, data[name]):
                info = _value_info(data[name])
            result.append(info)
            seen.add(name)
        result.extend(_value_info(value) for value in self.graph.inputs if value.name not in seen)
        if self.record.get("ir_version", onnx.IR_VERSION) < 4:  # IR < 4: every initializer is a graph input
            for tensor in initializers:
                if tensor.name not in seen:
                    result.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
        return result

    def outputs(self) -> list[ValueInfoProto]:
        stored = {info.name: info for info in (ValueInfoProto.FromString(blob)
                                               for blob in self.record.get("outputs", []))}
        result = []
        for value in self.graph.outputs:
            info = stored.get(value.name)
            result.append(info if info is not None and _same_value(info, value) else _value_info(value))
        return result

    def model_header(self) -> ModelProto:
        """The model's own fields from ``model_rest``, with the readable copies applied if they changed."""
        model = ModelProto()
        model.ParseFromString(self.record.get("model_rest", b""))
        ir_version = int(self.record.get("ir_version", onnx.IR_VERSION))
        if model.ir_version != ir_version:
            model.ir_version = ir_version
        opsets = [[domain, int(version)] for domain, version in self.record.get("opset_import", [])]
        if not opsets and not model.opset_import:
            opsets = [["", onnx.defs.onnx_opset_version()]]
        if opsets and [[opset.domain, int(opset.version)] for opset in model.opset_import] != opsets:
            del model.opset_import[:]
            model.opset_import.extend(onnx.helper.make_opsetid(domain, version) for domain, version in opsets)
        for key, default in (("producer_name", "lowrank-ir"), ("producer_version", "")):
            value = self.record.get(key, default if "model_rest" not in self.record else getattr(model, key))
            if getattr(model, key) != value:
                setattr(model, key, value)
        return model

    def model(self) -> ModelProto:
        emitted = self.write_nodes()
        unused = self.prune()
        folded = set(self.record.get("folded", {}))  # written as the chains that compute them
        initializers = [self.initializer(name) for name in self.graph.params
                        if name not in emitted and name not in unused and name not in folded]
        graph = GraphProto()
        if self.record.get("graph_rest"):
            graph.ParseFromString(self.record["graph_rest"])
        if not graph.name:
            graph.name = "lowrank_ir"
        graph.node.extend(self.nodes)
        graph.initializer.extend(initializers)
        graph.input.extend(self.inputs(initializers))
        graph.output.extend(self.outputs())
        gone = (set(self.record.get("initializers", [])) | set(self.record.get("constants", {}))) \
            - set(self.graph.params)
        gone |= unused | self.dropped_values
        if gone:
            kept = [info for info in graph.value_info if info.name not in gone]
            del graph.value_info[:]
            graph.value_info.extend(kept)
        model = self.model_header()
        model.graph.CopyFrom(graph)
        factorized = self.graph.meta.get("factorized")
        if factorized:
            entry = next((prop for prop in model.metadata_props if prop.key == METADATA_KEY), None)
            if entry is None:
                entry = model.metadata_props.add(key=METADATA_KEY)
            entry.value = json.dumps(factorized)
        return model


def _header(record: Mapping[str, Any], op_type: str) -> NodeProto:
    """A node's own fields from its record's ``rest``, with the readable copies applied if they changed."""
    proto = NodeProto()
    proto.ParseFromString(record.get("rest", b""))
    if proto.op_type != op_type:
        proto.op_type = op_type
    for key in ("name", "domain"):
        if key in record and getattr(proto, key) != record[key]:
            setattr(proto, key, record[key])
    return proto


def _check(model: ModelProto, like: ModelProto | None) -> None:
    """``onnx.checker`` full check (with strict shape inference) of a model built in memory."""
    if model.ByteSize() >= PROTOBUF_LIMIT:
        return  # checked from disk by save()
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        if like is not None and _fails_check(like):
            logger.warning("the model fails the ONNX checker, as the original does: %s", str(err).splitlines()[0])
            return
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"the ONNX model written from the graph fails the ONNX checker: {first}") from err


def _fails_check(model: ModelProto) -> bool:
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError):
        return True
    return False


def build(graph: Graph, like: ModelSource | None = None, weights: bool = True, *, take_arrays: bool = False,
          check: bool = True) -> ModelProto:
    """An ONNX model from ``graph``: unchanged nodes exactly as in ``like``, factorized layers as parts.

    ``like`` is the model ``graph`` was lowered from (its unchanged constants are copied from it, so
    their storage stays as it was); without it every constant is written from the graph's arrays.
    ``weights=False`` graphs (structure only) are written with their zero placeholders. ``check``
    runs ``onnx.checker`` with the full check (shape inference included). ``take_arrays`` is the
    PyTorch backend's option; initializers are always written as copies, so it changes nothing here.
    """
    verify(graph)
    original = None if like is None else as_model(like)
    record = graph.meta.get("onnx") or {}
    model = _Writer(graph, original, record).model()
    if check:
        _check(model, original)
    return model


def load_layers(model: ModelProto, graph: Graph, names: Sequence[str]) -> None:
    """Copy the factors of the factorized layers ``names`` from ``graph`` into ``model``, in place.

    ``model`` must be one :func:`build` returned for a graph with the same structure (the sequential
    mode refines layers one group at a time in its own model; never call this on a user's model).
    Factors are initializers; a ``Linear`` part written as ``MatMul`` gets its weight transposed, as
    :func:`build` wrote it.
    """
    factorized: dict[str, list[str]] = graph.meta.get("factorized", {})
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    written = {node.name: node for node in model.graph.node}
    for original in names:
        if original not in factorized:
            raise ValueError(f"layer {original!r} was not factorized in the graph")
        for part in factorized[original]:
            node = graph.node(part)
            emitted = written.get(part)
            transposed = node.op is Op.LINEAR and (emitted is None or emitted.op_type != "Gemm")
            for role, name in node.params.items():
                array = graph.params[name]
                if role == "weight" and transposed:
                    array = array.T
                target = initializers.get(name)
                if target is None or list(target.dims) != list(array.shape):
                    raise ValueError(f"the model has no initializer {name!r} of shape {list(array.shape)} for "
                                     f"part {part!r}: it was not built from a graph of this structure")
                target.CopyFrom(_tensor(array, name))


# ------------------------------------------------------------------------------------------- opsets

def _default_opset(model: ModelProto) -> int:
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            return int(opset.version)
    return 0


def convert_opset(model: ModelProto, opset: int) -> ModelProto:
    """``model`` at default-domain opset ``opset`` (``onnx.version_converter``); itself if already there.

    ``ValueError`` when the converter cannot express the model's ops at that opset.
    """
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < 1:
        raise ValueError(f"opset must be an int >= 1, got {opset!r}")
    newest = onnx.defs.onnx_opset_version()
    if opset > newest:
        raise ValueError(f"opset {opset} is newer than this onnx package knows (up to {newest})")
    current = _default_opset(model)
    if current == opset:
        return model
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(model, opset)
        converted.ir_version = max(int(model.ir_version),
                                   int(onnx.helper.find_min_ir_version_for(list(converted.opset_import), True)))
        onnx.checker.check_model(converted)
    except Exception as err:  # the converter raises RuntimeError and its own types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot convert the model from opset {current} to opset {opset}: {first}") from err
    return converted


# --------------------------------------------------------------------------------------------- files

def save(model: ModelProto, path: str | os.PathLike[str], *, external_data: bool | None = None) -> Path:
    """Write ``model`` to ``path`` atomically (mode 0640), with external data when it is 2 GB or more.

    With external data the weights go to ``<name>.data`` beside the model; both files are written
    to a temporary folder first and checked (``onnx.checker`` full check from disk), then moved
    into place (data first). ``model`` itself is not changed.
    """
    target = Path(path)
    if external_data is None:
        external_data = model.ByteSize() >= PROTOBUF_LIMIT
    if not external_data:
        data = model.SerializeToString()
        with atomic_write(target, "wb") as stream:
            stream.write(data)
        return target
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot write {str(target)!r}: folder {str(folder)!r} does not exist")
    location = f"{target.name}.data"
    tmp = temporary_folder(target)
    try:
        with SafeWriteUmask():
            onnx.save_model(copy.deepcopy(model), tmp / target.name, save_as_external_data=True,
                            all_tensors_to_one_file=True, location=location, size_threshold=1024)
        onnx.checker.check_model(str(tmp / target.name), full_check=True)
        for name in (location, target.name):
            if (tmp / name).exists():
                os.chmod(tmp / name, FILE_MODE)
                os.replace(tmp / name, folder / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@limited
def load_feeds(path: str | os.PathLike[str], *, max_bytes: int | str | None = None) -> dict[str, np.ndarray]:
    """Feeds from an ``.npz`` file: one array per model input, keyed by the input's name.

    Each array's size is checked from its header against ``max_bytes`` (default half of physical memory)
    before it is read.
    """
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"feeds file {str(source)!r} does not exist")
    check_npz(source, f"feeds file {str(source)!r}")
    try:
        with np.load(source, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except Exception as err:  # zipfile.BadZipFile, ValueError, OSError
        raise ValueError(f"feeds file {str(source)!r} is not a readable .npz archive: {err}") from err


# ---------------------------------------------------------------------------------------- validation

def _index_bound(model: ModelProto, name: str) -> int:
    """Upper bound for random integer feeds: the rows of the constant tables ``name`` indexes."""
    tables = {tensor.name: tensor for tensor in model.graph.initializer}
    tables.update({node.output[0]: node.attribute[0].t for node in model.graph.node
                   if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value"})
    bounds = [int(tables[node.input[0]].dims[0]) for node in model.graph.node
              if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == name
              and node.input[0] in tables and tables[node.input[0]].dims]
    return max(1, min(bounds)) if bounds else 2


@limited
def random_feeds(model: ModelSource, input_shapes: Mapping[str, Sequence[int]] | None = None,
                 seed: int = 0, *, max_bytes: int | str | None = None) -> dict[str, np.ndarray]:
    """Random feeds for ``model``'s inputs: dynamic dims from ``input_shapes``, else 1 (batch) or 32.

    Floats are standard normal; integers index the tables they are gathered from (else 0 or 1);
    booleans are fair coin flips. Each feed's size is checked against ``max_bytes`` (default half of
    physical memory) before it is made: a model may declare, or ``input_shapes`` ask for, any size.
    """
    proto = as_model(model)
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for name, spec in input_specs(proto).items():
        if spec.dtype is None or spec.shape is None:
            raise ValueError(f"cannot make random feeds for input {name!r} (not a tensor of known rank); "
                             f"pass feeds")
        if input_shapes and name in input_shapes:
            dims = [int(dim) for dim in input_shapes[name]]
        else:
            dims = [dim if isinstance(dim, int) and dim > 0 else (1 if axis == 0 else DEFAULT_DIM)
                    for axis, dim in enumerate(spec.shape)]
        dtype = np.dtype(spec.dtype)
        check_array(dims, dtype, f"random feed {name!r}")
        if dtype.kind == "f":
            feeds[name] = rng.standard_normal(dims).astype(dtype)
        elif dtype.kind in "iu":
            feeds[name] = rng.integers(0, _index_bound(proto, name), dims).astype(dtype)
        elif dtype.kind == "b":
            feeds[name] = rng.random(dims) < 0.5
        else:
            raise ValueError(f"cannot make random feeds for input {name!r} of dtype {spec.dtype}; pass feeds")
    return feeds


@dataclass(slots=True)
class OutputError:
    """How far one output of a model is from the reference's."""

    name: str
    shape: list[int]
    max_abs: float
    mean_abs: float
    max_rel: float
    mean_rel: float


@dataclass(slots=True)
class ValidationReport:
    """Per-output errors of a model against a reference on the same feeds."""

    outputs: list[OutputError]
    feeds: dict[str, list[int]] = field(default_factory=dict)

    @property
    def max_rel(self) -> float:
        """The worst relative error over the outputs (``max|d| / max|ref|``)."""
        return max((output.max_rel for output in self.outputs), default=0.0)

    def passed(self, tolerance: float) -> bool:
        return self.max_rel <= tolerance

    def to_dict(self) -> dict[str, Any]:
        return {"max_rel": self.max_rel, "feeds": self.feeds, "outputs": [asdict(item) for item in self.outputs]}

    def table(self) -> str:
        header = ("output", "shape", "max abs", "mean abs", "max rel", "mean rel")
        rows = [(item.name, "x".join(str(dim) for dim in item.shape), f"{item.max_abs:.3e}", f"{item.mean_abs:.3e}",
                 f"{item.max_rel:.3e}", f"{item.mean_rel:.3e}") for item in self.outputs]
        widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
        return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                         for row in [header, *rows])


def _flat(value: Any) -> np.ndarray:
    if isinstance(value, (list, tuple)):
        parts = [_flat(item).ravel() for item in value]
        return np.concatenate(parts) if parts else np.zeros(0)
    return np.asarray(value)


def compare(name: str, reference: Any, result: Any) -> OutputError:
    """The errors of ``result`` against ``reference`` (NaNs at the same places count as equal)."""
    ref, got = _flat(reference), _flat(result)
    shape = [int(dim) for dim in ref.shape]
    if ref.shape != got.shape:
        return OutputError(name, shape, math.inf, math.inf, math.inf, math.inf)
    if ref.dtype.kind not in "biufc" or got.dtype.kind not in "biufc":
        same = float(np.array_equal(ref, got))
        bad = 0.0 if same else math.inf
        return OutputError(name, shape, bad, bad, bad, bad)
    ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
    both_nan = np.isnan(ref64) & np.isnan(got64)
    diff = np.where(both_nan, 0.0, np.abs(got64 - ref64))
    diff = np.where(np.isnan(diff), math.inf, diff)
    if diff.size == 0:
        return OutputError(name, shape, 0.0, 0.0, 0.0, 0.0)
    scale = np.abs(np.where(both_nan, 0.0, ref64))
    max_abs, mean_abs = float(diff.max()), float(diff.mean())

    def relative(error: float, size: float) -> float:
        return error / size if size > 0 else (0.0 if error == 0 else math.inf)

    return OutputError(name, shape, max_abs, mean_abs, relative(max_abs, float(scale.max())),
                       relative(mean_abs, float(scale.mean())))


def _session_for(model: ModelSource) -> tuple[Any, ModelProto]:
    """A session (from the file when given a path, so external data works) and the model proto."""
    if isinstance(model, ModelProto):
        return session(as_model(model)), model
    proto = load_model(model)
    if proto.ByteSize() < PROTOBUF_LIMIT:
        return session(proto), proto
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"]), proto


def validate(original: ModelSource, decomposed: ModelSource, feeds: Any = None, *,
             input_shapes: Mapping[str, Sequence[int]] | None = None, seed: int = 0) -> ValidationReport:
    """Run ``original`` and ``decomposed`` in onnxruntime on the same feeds and compare every output.

    ``feeds``: a dict of input name -> array, the path of an ``.npz`` holding one, or None for random
    feeds from the input specs (dynamic dims from ``input_shapes``, else small sizes).
    """
    reference, reference_proto = _session_for(original)
    candidate, candidate_proto = _session_for(decomposed)
    if feeds is None:
        feeds = random_feeds(reference_proto, input_shapes, seed)
    elif isinstance(feeds, (str, os.PathLike)):
        feeds = load_feeds(feeds)
    checked = check_feeds(reference_proto, feeds, "feeds")
    names = [value.name for value in reference_proto.graph.output]
    other = [value.name for value in candidate_proto.graph.output]
    if sorted(names) != sorted(other):
        raise ValueError(f"the models have different outputs: {names} and {other}")
    expected = run(reference, checked, names, "the feeds (original model)")
    got = run(candidate, checked, names, "the feeds (decomposed model)")
    outputs = [compare(name, ref, res) for name, ref, res in zip(names, expected, got, strict=True)]
    shapes = {name: [int(dim) for dim in np.shape(value)] for name, value in checked.items()}
    return ValidationReport(outputs, shapes)


# ------------------------------------------------------------------------------------ native export

def _arguments(example_inputs: Any) -> tuple[Any, ...]:
    return tuple(example_inputs) if isinstance(example_inputs, (list, tuple)) else (example_inputs,)


def _native_backend(model: Any) -> NativeBackend:
    """The backend of a PyTorch or MindSpore ``model``; ``TypeError`` for a model of another framework."""
    from lowrank_ir._registry import NATIVE_FRAMEWORKS, framework_of, native_backend

    framework = framework_of(model)
    if framework not in NATIVE_FRAMEWORKS:
        raise TypeError(f"export takes a PyTorch or MindSpore model, got a {framework} model")
    return native_backend(framework)


def export(model: Any, example_inputs: Any, *, input_names: Sequence[str] | None = None,
           output_names: Sequence[str] | None = None, opset: int | None = None) -> ModelProto:
    """A native PyTorch ``nn.Module`` or MindSpore ``nn.Cell`` exported to ONNX, by its backend's ``export_onnx``.

    ``example_inputs`` is one tensor or a tuple of them. The model is exported in the mode it is in
    (call ``.eval()`` / ``set_train(False)`` first).
    """
    exported: ModelProto = _native_backend(model).export_onnx(model, _arguments(example_inputs), input_names,
                                                              output_names, opset)
    return exported


def validate_native(native: Any, exported: ModelSource, example_inputs: Any) -> ValidationReport:
    """Run ``native`` (PyTorch or MindSpore) and its ONNX export on ``example_inputs``; compare outputs."""
    backend = _native_backend(native)
    arguments = _arguments(example_inputs)
    sess, proto = _session_for(exported)
    specs = list(input_specs(proto))
    if len(specs) != len(arguments):
        raise ValueError(f"the ONNX model takes {len(specs)} inputs, {len(arguments)} example inputs were given")
    feeds = {name: backend.numpy_copy(value) for name, value in zip(specs, arguments, strict=True)}
    expected = backend.run_numpy(native, list(feeds.values())).arrays
    names = [value.name for value in proto.graph.output]
    got = run(sess, check_feeds(proto, feeds), names, "the example inputs")
    if len(got) != len(expected):
        raise ValueError(f"the native model returns {len(expected)} outputs, its ONNX export {len(got)}")
    outputs = [compare(name, ref, res) for name, ref, res in zip(names, expected, got, strict=True)]
    return ValidationReport(outputs, {name: list(np.shape(value)) for name, value in feeds.items()})


if TYPE_CHECKING:  # the registry hands this module out as a Backend: mypy checks that it is one
    import backends.onnx as _this_module

    _AS_PROTOCOL: Backend = _this_module
