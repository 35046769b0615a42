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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from frontends.safetensors import (
    INDEX_FILE,
    Checkpoint,
    layer_graph,
    linear_layers,
    open_checkpoint,
    read_header,
    skeleton,
)
from lowrank_ir._engine import Plan, PlanEntry, factorization_cost, plan, rewrite
from lowrank_ir._ir import Op
from lowrank_ir._policy import Policy
from lowrank_ir._report import Report, build_report

__all__ = ["DTYPE_NAMES", "PARTS_DIR", "Decomposed", "ShardWriter", "Workers", "decompose_checkpoint",
           "split_by_cost"]

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

#: Where each process leaves its layers' factors (``<layer>.safetensors``) and plan entries
#: (``<layer>.json``) for the shards to be assembled from; removed at the end.
PARTS_DIR = ".lowrank-parts"


@dataclass(frozen=True, slots=True)
class Workers:
    """The processes sharing one decomposition: this one's ``rank`` of ``size``, and a barrier across them.

    With torch.distributed: ``Workers(dist.get_rank(), dist.get_world_size(), dist.barrier)``.
    """

    rank: int = 0
    size: int = 1
    barrier: Callable[[], object] = lambda: None
    threads: int | None = None  # BLAS threads of this process (default: one per core)


def split_by_cost(costs: Mapping[str, float], size: int) -> dict[str, int]:
    """Items -> process rank, largest first onto the least loaded process (ties: lowest rank, then name)."""
    loads = [0.0] * size
    owner: dict[str, int] = {}
    for name in sorted(costs, key=lambda item: (-costs[item], item)):
        rank = min(range(size), key=lambda index: (loads[index], index))
        owner[name] = rank
        loads[rank] += costs[name]
    return owner


def decompose_checkpoint(source: str | os.PathLike[str], target: str | os.PathLike[str], policy: Policy,
                         progress: Progress | None = None, workers: Workers | None = None) -> Decomposed:
    """Decompose the Linear layers of checkpoint folder ``source`` into the existing empty folder ``target``.

    ``target`` receives the shards under the input's file names, the index when the input has one, and a
    copy of every other file of ``source`` (config.json, tokenizer, ...). Write ``decompose_config.json``
    and the report from the result. Per-layer policies only (ratio, fixed, dict, vbmf): a whole-model
    budget needs every layer at once.

    Several processes (``workers``, all given the same arguments and ``target``) share the work: layers
    are split by their estimated cost (``factorization_cost``), each process writes its layers' factors
    beside the output, then (after a barrier) the shards, split by size, are assembled from them, and
    after a second barrier rank 0 writes the index and copies the other files. The files are the same
    bytes as one process writes (given the same BLAS threads per process, the factorizations are the
    same). Every rank returns the result.

    Raises:
        ValueError: On a policy that needs the whole model, or a checkpoint that does not fit its config.
        FileNotFoundError: When the folder or one of its files is missing.
    """
    if policy.kind not in ("ratio", "fixed", "dict", "vbmf"):
        raise ValueError(f"a checkpoint folder is decomposed layer by layer: policy {policy.kind!r} is not "
                         f"supported (use ratio, fixed, dict or vbmf)")
    workers = workers or Workers()
    checkpoint = open_checkpoint(source)
    nodes = linear_layers(checkpoint)
    out = Path(target)
    parts = out / PARTS_DIR
    parts.mkdir(exist_ok=True)
    layer_owner = split_by_cost({name: factorization_cost(checkpoint.tensors[node.params["weight"]].shape)
                                 for name, node in nodes.items()}, workers.size)
    mine = [node for name, node in nodes.items() if layer_owner[name] == workers.rank]
    for done, node in enumerate(mine, start=1):
        _decompose_layer(checkpoint, node, policy, parts, workers.threads)
        if progress is not None:
            progress(done, len(mine), node.name)
    workers.barrier()
    shard_owner = split_by_cost({shard: (checkpoint.folder / shard).stat().st_size for shard in checkpoint.shards},
                                workers.size)
    owners = {param: node for node in nodes.values() for param in node.params.values()}
    for shard in checkpoint.shards:
        if shard_owner[shard] == workers.rank:
            _assemble_shard(checkpoint, shard, owners, parts, out)
    workers.barrier()
    entries, errors = _read_entries(nodes, parts)
    weight_map, total_size = _output_layout(checkpoint, out)
    if workers.rank == 0:
        if checkpoint.sharded:
            index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
            (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        _copy_other_files(checkpoint, out)
    workers.barrier()
    if workers.rank == 0:
        shutil.rmtree(parts)
    chosen = Plan(entries)
    report = build_report(skeleton(nodes, checkpoint), chosen, errors)
    logger.info("decomposed %d of %d Linear layers of %s", len(chosen.decomposed_entries()), len(nodes),
                checkpoint.folder)
    return Decomposed(chosen.decompose_config(), report, weight_map, checkpoint.largest_shard_bytes)


def _decompose_layer(checkpoint: Checkpoint, node: Any, policy: Policy, parts: Path, threads: int | None) -> None:
    """Plan and factorize one layer, leaving the result in ``parts``.

    Its plan entry and error go to ``<layer>.json``, its factors to ``<layer>.safetensors`` (weights in the
    source weight's dtype; a bias passed through as it was).
    """
    graph = layer_graph(checkpoint, node)
    sources: dict[str, torch.Tensor] = graph.meta["tensors"]
    layer_plan = plan(graph, policy)
    entry = layer_plan.entries[node.name]
    error = None
    if entry.decomposed:
        result = rewrite(graph, layer_plan, workers=1, threads=threads)
        error = result.errors.get(node.name)
        writer = ShardWriter(parts / f"{node.name}.safetensors")
        try:
            for part_name in result.graph.meta["factorized"][node.name]:
                part = result.graph.node(part_name)
                for role, param in part.params.items():
                    source = node.params["bias"] if role == "bias" else node.params["weight"]
                    array = result.graph.params[param]
                    if array is graph.params[source]:  # passed through unchanged (a bias): the exact tensor
                        writer.add(param, sources[source])
                    else:  # computed from the float view: back to the source's dtype
                        writer.add(param, torch.from_numpy(np.ascontiguousarray(array)).to(sources[source].dtype))
        except BaseException:
            writer.abort()
            raise
        writer.close()
    record = {"op": entry.op.value, "shape": list(entry.shape), "form": entry.form,
              "rank": list(entry.rank) if isinstance(entry.rank, tuple) else entry.rank, "reason": entry.reason,
              "error": error}
    (parts / f"{node.name}.json").write_text(json.dumps(record))


def _read_entries(nodes: dict[str, Any], parts: Path) -> tuple[dict[str, PlanEntry], dict[str, tuple[float, str]]]:
    """Every layer's plan entry and error, in model order, from the processes' ``<layer>.json``."""
    entries: dict[str, PlanEntry] = {}
    errors: dict[str, tuple[float, str]] = {}
    for name in nodes:
        record = json.loads((parts / f"{name}.json").read_text())
        rank = tuple(record["rank"]) if isinstance(record["rank"], list) else record["rank"]
        entries[name] = PlanEntry(name, Op(record["op"]), tuple(record["shape"]), record["form"], rank,
                                  record["reason"])
        if record["error"] is not None:
            errors[name] = (float(record["error"][0]), str(record["error"][1]))
    return entries, errors


def _assemble_shard(checkpoint: Checkpoint, shard: str, owners: dict[str, Any], parts: Path, out: Path) -> None:
    """Write output ``shard``: the input shard's tensors in their order, the decomposed layers replaced.

    A decomposed layer's weight is replaced by its factors from ``parts`` (in the order they were written;
    its bias, wherever stored, goes with them); everything else is copied as it is.
    """
    from safetensors import safe_open

    writer = ShardWriter(out / shard)
    try:
        for info in checkpoint.in_shard(shard):
            node = owners.get(info.name)
            if node is not None and info.name != node.params["weight"]:
                continue  # a bias goes with its weight
            factors = None if node is None else parts / f"{node.name}.safetensors"
            if factors is None or not factors.is_file():  # not a layer, or a layer left alone
                names = [info.name] if node is None else list(node.params.values())
                for name in names:
                    writer.add(name, checkpoint.read(name))
                continue
            names = [name for name in read_header(factors) if name != "__metadata__"]
            with safe_open(factors, framework="pt") as handle:
                for name in names:
                    writer.add(name, handle.get_tensor(name))
    except BaseException:
        writer.abort()
        raise
    writer.close()


def _output_layout(checkpoint: Checkpoint, out: Path) -> tuple[dict[str, str], int]:
    """The written shards' tensor -> shard map and total tensor bytes, from their headers."""
    weight_map: dict[str, str] = {}
    total = 0
    for shard in checkpoint.shards:
        for name, entry in read_header(out / shard).items():
            if name != "__metadata__":
                weight_map[name] = shard
                total += entry["data_offsets"][1] - entry["data_offsets"][0]
    return weight_map, total


def _copy_other_files(checkpoint: Checkpoint, out: Path) -> None:
    """Copy the folder's files that are not weights (config.json, tokenizer files, ...)."""
    skip = {*checkpoint.shards, INDEX_FILE}
    for path in sorted(checkpoint.folder.iterdir()):
        if path.is_file() and path.name not in skip and not path.name.endswith(".safetensors"):
            if not (out / path.name).exists():
                shutil.copyfile(path, out / path.name)
