"""Decomposed checkpoint folders: safetensors shards written tensor by tensor, an index, the other files.

:class:`ShardWriter` writes one safetensors file without holding its tensors: each tensor's bytes go to
a side file as they come, and :meth:`ShardWriter.close` writes the header (names, dtypes, shapes, data
offsets) followed by the side file's bytes, copied in blocks. The format: an 8-byte little-endian
header length, the JSON header padded with spaces to a multiple of 8 bytes, then the tensors' bytes,
contiguous, in header order. Writing the same tensors in the same order gives the same bytes.

:func:`decompose_checkpoint` streams a Hugging Face folder (``frontends/safetensors.py``) through the
engine one Linear layer at a time: a layer's weight (and bias) is read, planned and factorized in a
one-layer graph, and its factors (``x.0.weight``, ``x.1.weight``, ``x.1.bias``: the reference tool's
names) are written to the output shard that held the weight, in the weight's dtype. Every other tensor
is copied as it is. Memory: one layer's arrays and the engine's workspace for it, never a shard.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from frontends.safetensors import INDEX_FILE, Checkpoint, layer_graph, linear_layers, open_checkpoint, skeleton
from lowrank_ir._engine import Plan, plan, rewrite
from lowrank_ir._policy import Policy
from lowrank_ir._report import Report, build_report

__all__ = ["DTYPE_NAMES", "Decomposed", "ShardWriter", "decompose_checkpoint"]

logger = logging.getLogger(__name__)

#: torch dtype -> the safetensors header's spelling.
DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}

_COPY_BLOCK = 16 << 20


class ShardWriter:
    """One safetensors file, written tensor by tensor (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._data_path = self.path.with_name(f".{self.path.name}.data")
        self._data = open(self._data_path, "wb")  # noqa: SIM115 - closed in close()/abort()
        self._header: dict[str, Any] = {}
        self.size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` under ``name`` (names must be unique)."""
        if name in self._header:
            raise ValueError(f"tensor {name!r} is written twice to {str(self.path)!r}")
        if tensor.dtype not in DTYPE_NAMES:
            raise ValueError(f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store")
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        data = flat.view(torch.uint8).numpy() if flat.numel() else np.zeros(0, np.uint8)
        self._data.write(data.data)
        self._header[name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                              "data_offsets": [self.size, self.size + data.nbytes]}
        self.size += data.nbytes

    def close(self, metadata: dict[str, str] | None = None) -> None:
        """Write the file: header, then the tensors' bytes; the side file is removed."""
        self._data.close()
        header = {"__metadata__": dict(metadata or {"format": "pt"}), **self._header}
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        try:
            with open(self.path, "wb") as out, open(self._data_path, "rb") as data:
                out.write(len(text).to_bytes(8, "little"))
                out.write(text)
                shutil.copyfileobj(data, out, _COPY_BLOCK)
        finally:
            self._data_path.unlink(missing_ok=True)

    def abort(self) -> None:
        """Drop what was written (the side file)."""
        self._data.close()
        self._data_path.unlink(missing_ok=True)


@dataclass(slots=True)
class Decomposed:
    """What :func:`decompose_checkpoint` did: the ranks, the report, and the output's tensor -> shard map."""

    decompose_config: dict[str, int | list[int]]
    report: Report
    weight_map: dict[str, str]
    largest_input_shard: int


#: Called after each Linear layer with (layers done, layers in all, name of the layer just done).
Progress = Callable[[int, int, str], None]


def decompose_checkpoint(source: str | os.PathLike[str], target: str | os.PathLike[str], policy: Policy,
                         progress: Progress | None = None) -> Decomposed:
    """Decompose the Linear layers of checkpoint folder ``source`` into the existing empty folder ``target``.

    ``target`` receives the shards under the input's file names, the index when the input has one, and a
    copy of every other file of ``source`` (config.json, tokenizer, ...). Write ``decompose_config.json``
    and the report from the result. Per-layer policies only (ratio, fixed, dict, vbmf): a whole-model
    budget needs every layer at once.

    Raises:
        ValueError: On a policy that needs the whole model, or a checkpoint that does not fit its config.
        FileNotFoundError: When the folder or one of its files is missing.
    """
    if policy.kind not in ("ratio", "fixed", "dict", "vbmf"):
        raise ValueError(f"a checkpoint folder is decomposed layer by layer: policy {policy.kind!r} is not "
                         f"supported (use ratio, fixed, dict or vbmf)")
    checkpoint = open_checkpoint(source)
    nodes = linear_layers(checkpoint)
    owners = {param: node for node in nodes.values() for param in node.params.values()}
    out = Path(target)
    chosen = Plan()
    errors: dict[str, tuple[float, str]] = {}
    weight_map: dict[str, str] = {}
    total_size = 0
    done = 0
    for shard in checkpoint.shards:
        writer = ShardWriter(out / shard)
        try:
            for info in checkpoint.in_shard(shard):
                node = owners.get(info.name)
                if node is None:
                    writer.add(info.name, checkpoint.read(info.name))
                    weight_map[info.name] = shard
                elif info.name == node.params["weight"]:  # a bias is written with its weight
                    for name, tensor in _decompose_layer(checkpoint, node, policy, chosen, errors):
                        writer.add(name, tensor)
                        weight_map[name] = shard
                    done += 1
                    if progress is not None:
                        progress(done, len(nodes), node.name)
        except BaseException:
            writer.abort()
            raise
        writer.close()
        total_size += writer.size
    if checkpoint.sharded:
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    _copy_other_files(checkpoint, out)
    chosen = Plan({name: chosen.entries[name] for name in nodes if name in chosen.entries})  # model order
    report = build_report(skeleton(nodes, checkpoint), chosen, errors)
    logger.info("decomposed %d of %d Linear layers of %s", len(chosen.decomposed()), len(nodes), checkpoint.folder)
    return Decomposed(chosen.decompose_config(), report, weight_map, checkpoint.largest_shard_bytes)


def _decompose_layer(checkpoint: Checkpoint, node: Any, policy: Policy, chosen: Plan,
                     errors: dict[str, tuple[float, str]]) -> list[tuple[str, torch.Tensor]]:
    """The tensors that replace one layer's weight and bias (the originals when it is left alone)."""
    graph = layer_graph(checkpoint, node)
    sources: dict[str, torch.Tensor] = graph.meta["tensors"]
    layer_plan = plan(graph, policy)
    entry = layer_plan.entries[node.name]
    chosen.entries[node.name] = entry
    if not entry.decomposed:
        return list(sources.items())
    result = rewrite(graph, layer_plan, workers=1)
    errors.update(result.errors)
    tensors = []
    for part_name in result.graph.meta["factorized"][node.name]:
        part = result.graph.node(part_name)
        for role, param in part.params.items():
            source = node.params["bias"] if role == "bias" else node.params["weight"]
            array = result.graph.params[param]
            if array is graph.params[source]:  # passed through unchanged (a bias): the exact tensor
                tensors.append((param, sources[source]))
            else:  # computed from the float view: back to the source's dtype
                tensors.append((param, torch.from_numpy(np.ascontiguousarray(array)).to(sources[source].dtype)))
    return tensors


def _copy_other_files(checkpoint: Checkpoint, out: Path) -> None:
    """Copy the folder's files that are not weights (config.json, tokenizer files, ...)."""
    skip = {*checkpoint.shards, INDEX_FILE}
    for path in sorted(checkpoint.folder.iterdir()):
        if path.is_file() and path.name not in skip and not path.name.endswith(".safetensors"):
            if not (out / path.name).exists():
                shutil.copyfile(path, out / path.name)
