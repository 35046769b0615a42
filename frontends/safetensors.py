"""Hugging Face checkpoint folders (``config.json`` + safetensors shards) read one tensor at a time.

A folder holds ``config.json`` and either ``model.safetensors`` or shards listed by
``model.safetensors.index.json`` (``{"weight_map": {tensor name: shard file}}``). Nothing is loaded up
front: :func:`open_checkpoint` reads the headers (names, shapes, dtypes), :meth:`Checkpoint.read`
opens the tensor's shard, copies that one tensor and closes the file, so a process holds one tensor of
the checkpoint at a time.

Which tensors are Linear weights is read from the model class ``config.json`` names
(``architectures[0]``), built by transformers on the ``meta`` device (no memory for weights) and
lowered by the torch frontend's own rules: the same layer nodes, names and reasons to leave a layer
alone (tied, shared, overridden forward) as for the model in memory.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from frontends.torch import lock_reasons, lowering_for, read_only_array, transposed_weights
from lowrank_ir._ir import Graph, Node, Op, verify

__all__ = ["INDEX_FILE", "SINGLE_FILE", "STORED_TRANSPOSED", "Checkpoint", "TensorInfo", "is_checkpoint_dir",
           "layer_graph", "linear_layers", "model_class", "open_checkpoint", "read_header", "skeleton",
           "stored_tensors"]

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

#: Node attribute of a Linear layer whose checkpoint tensor is its weight transposed (``[in, out]``, as
#: transformers' ``Conv1D`` stores it): :func:`layer_graph` gives the engine the ``[out, in]`` view.
STORED_TRANSPOSED = "stored_transposed"


def is_checkpoint_dir(path: str | Path) -> bool:
    """Whether ``path`` is a folder that looks like a Hugging Face checkpoint (it has ``config.json``)."""
    folder = Path(path)
    return folder.is_dir() and (folder / "config.json").is_file()


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Where a tensor is and what it is, from its shard's header."""

    name: str
    shard: str
    dtype: str  # safetensors spelling: F32, BF16, ...
    shape: tuple[int, ...]
    start: int = 0  # where its bytes are in the shard file: from ``start`` to ``end`` (offsets in the file)
    end: int = 0


@dataclass(slots=True)
class Checkpoint:
    """A checkpoint folder's layout: its config, its shards in order and every tensor's header entry."""

    folder: Path
    config: dict[str, Any]
    shards: list[str]
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    sharded: bool = False  # an index file lists the shards

    def in_shard(self, shard: str) -> list[TensorInfo]:
        """The tensors stored in ``shard``, in the order of its header."""
        return [info for info in self.tensors.values() if info.shard == shard]

    def read(self, name: str) -> torch.Tensor:
        """Tensor ``name``, copied out of its shard (the file is closed again before returning)."""
        from safetensors import safe_open

        info = self.tensors[name]
        with safe_open(self.folder / info.shard, framework="pt") as handle:
            return handle.get_tensor(name)

    @property
    def largest_shard_bytes(self) -> int:
        return max((self.folder / shard).stat().st_size for shard in self.shards)


def read_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (8-byte little-endian length, then the JSON)."""
    return _header_and_data_start(path)[0]


def stored_tensors(path: Path) -> list[TensorInfo]:
    """The tensors of safetensors file ``path`` in the order of its header, with their bytes' place in the file."""
    header, data_start = _header_and_data_start(path)
    return [TensorInfo(name, path.name, str(entry["dtype"]), tuple(int(dim) for dim in entry["shape"]),
                       data_start + int(entry["data_offsets"][0]), data_start + int(entry["data_offsets"][1]))
            for name, entry in header.items() if name != "__metadata__"]


def _header_and_data_start(path: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's JSON header and the offset in the file where the tensors' bytes begin."""
    with open(path, "rb") as stream:
        prefix = stream.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{str(path)!r} is not a safetensors file: it has {len(prefix)} bytes")
        length = int.from_bytes(prefix, "little")
        size = path.stat().st_size
        if length > size - 8:
            raise ValueError(f"{str(path)!r} is not a safetensors file: its header length {length} exceeds "
                             f"the file's {size} bytes")
        try:
            header = json.loads(stream.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{str(path)!r} is not a safetensors file: its header is not JSON ({err})") from err
    if not isinstance(header, dict):
        raise ValueError(f"{str(path)!r} is not a safetensors file: its header is not a JSON object")
    return header, 8 + length


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read a checkpoint folder's config, index and shard headers (no tensor data).

    Raises:
        FileNotFoundError: When the folder, ``config.json``, the weights or a listed shard is missing.
        ValueError: When a file is not what its name says, or the index names tensors its shards lack.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {str(folder)!r} does not exist")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no config.json: a Hugging Face checkpoint folder holds "
                                f"config.json and {SINGLE_FILE} (or shards with {INDEX_FILE})")
    from lowrank_ir._files import read_json

    config = read_json(config_path)
    if not isinstance(config, dict):
        raise ValueError(f"{str(config_path)!r} must hold a JSON object, got {type(config).__name__}")
    index_path = folder / INDEX_FILE
    weight_map: dict[str, str] | None = None
    if index_path.is_file():
        index = read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{str(index_path)!r} must hold {{'weight_map': {{tensor name: shard file}}}}")
        shards = list(dict.fromkeys(weight_map.values()))
    elif (folder / SINGLE_FILE).is_file():
        shards = [SINGLE_FILE]
    else:
        raise FileNotFoundError(f"{str(folder)!r} has neither {SINGLE_FILE} nor {INDEX_FILE}")
    checkpoint = Checkpoint(folder, config, shards, sharded=weight_map is not None)
    for shard in shards:
        shard_path = folder / shard
        if Path(shard).name != shard or not shard_path.is_file():
            raise FileNotFoundError(f"shard {shard!r} listed in {INDEX_FILE} is not a file in {str(folder)!r}")
        for info in stored_tensors(shard_path):
            if weight_map is not None and weight_map.get(info.name) != shard:
                continue  # the index decides where a tensor lives
            checkpoint.tensors[info.name] = info
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(checkpoint.tensors))
        if missing:
            raise ValueError(f"{INDEX_FILE} lists tensors its shards do not hold: {missing[:5]}"
                             + (" ..." if len(missing) > 5 else ""))
    return checkpoint


def model_class(config: dict[str, Any], folder: Path) -> Any:
    """The transformers model class ``config.json`` (``config``, read from ``folder``) names in ``architectures``."""
    import transformers

    architectures = config.get("architectures")
    if not isinstance(architectures, list) or not architectures or not isinstance(architectures[0], str):
        raise ValueError(f"config.json of {str(folder)!r} names no model class ('architectures': "
                         f"{architectures!r}); it is needed to tell Linear weights from embeddings")
    cls = getattr(transformers, architectures[0], None)
    if cls is None:
        raise ValueError(f"config.json of {str(folder)!r} names model class {architectures[0]!r}, which "
                         f"transformers {transformers.__version__} does not have")
    return cls


def _meta_model(config: dict[str, Any], folder: Path) -> nn.Module:
    """The model class ``config.json`` names, built on the meta device (structure only, no weight memory)."""
    import transformers

    cls = model_class(config, folder)
    hf_config = transformers.AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = cls(hf_config)
    return model


def linear_layers(checkpoint: Checkpoint) -> dict[str, Node]:
    """The checkpoint's Linear layers as IR nodes (``locked`` where the torch frontend would keep them).

    Linear layers are those the torch frontend lowers as ``Linear``: ``nn.Linear`` and transformers'
    ``Conv1D`` (GPT-2), whose tensor holds the weight transposed (the node has :data:`STORED_TRANSPOSED`).
    Only layers whose weight the checkpoint stores are listed (a tied ``lm_head`` usually is not).
    """
    model = _meta_model(checkpoint.config, checkpoint.folder)
    locks = lock_reasons(model)
    transposed = set(transposed_weights(model))
    nodes: dict[str, Node] = {}
    for name, module in model.named_modules():
        found = lowering_for(module)
        if found is None:
            continue
        node = found[1](name, module)
        if node.op is not Op.LINEAR:
            continue
        node.attrs["module_type"] = type(module).__qualname__
        if name in locks:
            node.attrs["locked"] = locks[name]
        info = checkpoint.tensors.get(node.params["weight"])
        if info is None:
            continue
        stored = (node.attrs["out_features"], node.attrs["in_features"])
        if info.name in transposed:
            node.attrs[STORED_TRANSPOSED] = True
            stored = stored[::-1]
        if info.shape != stored:
            raise ValueError(f"checkpoint tensor {info.name!r} has shape {list(info.shape)}, but layer {name!r} "
                             f"of {type(model).__name__} ({type(module).__name__}, in {node.attrs['in_features']}, "
                             f"out {node.attrs['out_features']}) stores shape {list(stored)}")
        if "bias" in node.params and node.params["bias"] not in checkpoint.tensors:
            raise ValueError(f"layer {name!r} has a bias that the checkpoint does not store "
                             f"({node.params['bias']!r})")
        nodes[name] = node
    if not nodes:
        raise ValueError(f"no Linear weight of {type(model).__name__} is stored in {str(checkpoint.folder)!r} "
                         f"(are the tensor names those of config.json's model class?)")
    return nodes


def layer_graph(checkpoint: Checkpoint, node: Node) -> Graph:
    """A one-layer graph holding ``node`` with its weight and bias read from the checkpoint.

    Arrays are read-only numpy views of the tensors (bfloat16 and other dtypes numpy lacks: float32
    copies), a :data:`STORED_TRANSPOSED` weight as its ``[out, in]`` view (named in
    ``meta["transposed_params"]``, as the torch frontend does); ``meta["tensors"]`` keeps the tensors
    themselves (param name -> tensor), so that what is written back unchanged keeps its exact bits and dtype.
    """
    tensors = {param: checkpoint.read(param) for param in node.params.values()}
    params = {param: read_only_array(tensor) for param, tensor in tensors.items()}
    meta: dict[str, Any] = {"source": "safetensors", "tensors": tensors}
    if node.attrs.get(STORED_TRANSPOSED):
        weight = node.params["weight"]
        params[weight] = params[weight].T
        meta["transposed_params"] = [weight]
    graph = Graph([Node(node.op, node.name, dict(node.attrs), dict(node.params))], params, meta=meta)
    verify(graph)
    return graph


def skeleton(nodes: dict[str, Node], checkpoint: Checkpoint) -> Graph:
    """All layers with zero-size placeholder arrays of their shapes: what a report needs, no memory."""
    params: dict[str, np.ndarray] = {}
    for node in nodes.values():
        for param in node.params.values():
            shape = checkpoint.tensors[param].shape
            if node.attrs.get(STORED_TRANSPOSED) and param == node.params["weight"]:
                shape = shape[::-1]
            params[param] = np.broadcast_to(np.zeros((), np.float32), shape)
    return Graph([Node(Op.LINEAR, n.name, dict(n.attrs), dict(n.params)) for n in nodes.values()], params,
                 meta={"source": "safetensors"})
