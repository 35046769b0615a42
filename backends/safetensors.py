"""Decomposed checkpoint folders: safetensors shards written tensor by tensor, an index, the other files.

:func:`write_safetensors` writes one safetensors file from tensors given in order, each in memory or as
a byte range of another safetensors file (copied by the kernel, never held): the header (names, dtypes,
shapes, data offsets) first, then the tensors' bytes. The format: an 8-byte little-endian header length,
the JSON header padded with spaces to a multiple of 8 bytes, then the tensors' bytes, contiguous, in
header order. Writing the same tensors in the same order gives the same bytes.

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
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from frontends.safetensors import (
    INDEX_FILE,
    Checkpoint,
    TensorInfo,
    layer_graph,
    linear_layers,
    open_checkpoint,
    skeleton,
    stored_tensors,
)
from lowrank_ir._engine import Plan, PlanEntry, factorization_cost, plan, rewrite
from lowrank_ir._ir import Node, Op
from lowrank_ir._policy import Policy
from lowrank_ir._report import Report, build_report

__all__ = ["DTYPE_NAMES", "PARTS_DIR", "CheckpointJob", "Decomposed", "FileTensor", "Workers", "collect_checkpoint",
           "decompose_checkpoint", "decompose_share", "finish_checkpoint", "prepare_checkpoint", "run_checkpoint",
           "split_by_cost", "write_safetensors"]

logger = logging.getLogger(__name__)

#: torch dtype -> the safetensors header's spelling.
DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}

_COPY_BLOCK = 16 << 20


def _buffer_copy(source: int, target: int, count: int, offset: int) -> int:
    """``os.copy_file_range``'s stand-in where it is missing: says to copy through a buffer."""
    return -1


_COPY_FILE_RANGE = getattr(os, "copy_file_range", _buffer_copy)


@dataclass(frozen=True, slots=True)
class FileTensor:
    """A tensor stored in a safetensors file (``path``; ``info`` from its header): written by copying its bytes."""

    path: Path
    info: TensorInfo


def write_safetensors(path: str | os.PathLike[str], tensors: Sequence[tuple[str, torch.Tensor | FileTensor]],
                      metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (name, tensor) in their order as safetensors file ``path`` (see the module docstring).

    A :class:`FileTensor`'s bytes are copied from its file by the kernel (``copy_file_range``), never held
    in memory. On any error the file is removed.

    Raises:
        ValueError: On a name given twice or a dtype safetensors cannot store (nothing is written).
    """
    target = Path(path)
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    size = 0
    for name, tensor in tensors:
        if name in header:
            raise ValueError(f"tensor {name!r} is written twice to {str(target)!r}")
        if isinstance(tensor, FileTensor):
            dtype, shape, nbytes = tensor.info.dtype, list(tensor.info.shape), tensor.info.end - tensor.info.start
        elif tensor.dtype in DTYPE_NAMES:
            dtype, shape, nbytes = DTYPE_NAMES[tensor.dtype], list(tensor.shape), tensor.numel() * tensor.element_size()
        else:
            raise ValueError(f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store")
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [size, size + nbytes]}
        size += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    try:
        with open(target, "wb", buffering=0) as out:
            _write_all(out, len(text).to_bytes(8, "little") + text)
            for _, tensor in tensors:
                if isinstance(tensor, FileTensor):
                    _copy_range(tensor.path, tensor.info.start, tensor.info.end, out)
                elif tensor.numel():
                    flat = tensor.detach().cpu().contiguous().reshape(-1)
                    _write_all(out, flat.view(torch.uint8).numpy().data)
    except BaseException:
        target.unlink(missing_ok=True)
        raise


def _write_all(out: Any, data: bytes | memoryview) -> None:
    """Write all of ``data`` to the unbuffered file ``out`` (a raw write may take part of it)."""
    view = memoryview(data).cast("B")
    while view:
        view = view[out.write(view):]


def _copy_range(source: Path, start: int, end: int, out: Any) -> None:
    """Append bytes ``start:end`` of file ``source`` to the unbuffered file ``out``: in the kernel where it can."""
    with open(source, "rb", buffering=0) as stream:
        position = start
        while position < end:
            try:
                copied = _COPY_FILE_RANGE(stream.fileno(), out.fileno(), end - position, position)
            except OSError:  # not between these file systems: through a buffer
                copied = -1
            if copied < 0:
                stream.seek(position)
                copied = len(block := stream.read(min(_COPY_BLOCK, end - position)))
                _write_all(out, block)
            if copied == 0:
                raise ValueError(f"{str(source)!r} ends at byte {position}, before the tensor data it lists "
                                 f"(to byte {end})")
            position += copied


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


@dataclass(slots=True)
class CheckpointJob:
    """One decomposition of a checkpoint folder, as every process sharing it needs it: read once, before any work.

    Made by :func:`prepare_checkpoint`; a process forked after it has everything (the model class imported,
    the layers found) and starts on its share at once.
    """

    checkpoint: Checkpoint
    nodes: dict[str, Node]
    policy: Policy
    target: Path

    @property
    def parts(self) -> Path:
        return self.target / PARTS_DIR

    def layer_costs(self) -> dict[str, float]:
        """Each Linear layer's estimated factorization cost (``factorization_cost`` of its stored shape)."""
        return {name: factorization_cost(self.checkpoint.tensors[node.params["weight"]].shape)
                for name, node in self.nodes.items()}


def prepare_checkpoint(source: str | os.PathLike[str], target: str | os.PathLike[str],
                       policy: Policy) -> CheckpointJob:
    """Check the policy, read the folder's layout and find its Linear layers; make the parts folder in ``target``.

    Raises:
        ValueError: On a policy that needs the whole model, or a checkpoint that does not fit its config.
        FileNotFoundError: When the folder or one of its files is missing.
    """
    if policy.kind not in ("ratio", "fixed", "dict", "vbmf"):
        raise ValueError(f"a checkpoint folder is decomposed layer by layer: policy {policy.kind!r} is not "
                         f"supported (use ratio, fixed, dict or vbmf)")
    checkpoint = open_checkpoint(source)
    job = CheckpointJob(checkpoint, linear_layers(checkpoint), policy, Path(target))
    job.parts.mkdir(exist_ok=True)
    return job


def decompose_share(job: CheckpointJob, workers: Workers, progress: Progress | None = None) -> None:
    """This process's share of ``job``: its layers (split by estimated cost), a barrier, its output shards.

    Shards are split by size; a shard is assembled from the input shard and the factors every process left
    in the parts folder.
    """
    layer_owner = split_by_cost(job.layer_costs(), workers.size)
    mine = [node for name, node in job.nodes.items() if layer_owner[name] == workers.rank]
    start = time.perf_counter()
    for done, node in enumerate(mine, start=1):
        _decompose_layer(job.checkpoint, node, job.policy, job.parts, workers.threads)
        if progress is not None:
            progress(done, len(mine), node.name)
    factorized = time.perf_counter()
    workers.barrier()
    waited = time.perf_counter()
    checkpoint = job.checkpoint
    shard_owner = split_by_cost({shard: (checkpoint.folder / shard).stat().st_size for shard in checkpoint.shards},
                                workers.size)
    owners = {param: node for node in job.nodes.values() for param in node.params.values()}
    shards = [shard for shard in checkpoint.shards if shard_owner[shard] == workers.rank]
    for shard in shards:
        _assemble_shard(checkpoint, shard, owners, job.parts, job.target)
    logger.info("process %d of %d: %d of %d layers in %.2f s, then %.2f s waiting for the others, %d shard(s) "
                "written in %.2f s", workers.rank, workers.size, len(mine), len(job.nodes), factorized - start,
                waited - factorized, len(shards), time.perf_counter() - waited)


def collect_checkpoint(job: CheckpointJob) -> Decomposed:
    """What the processes did, read back once every shard is written: ranks, report, the output's layout."""
    checkpoint = job.checkpoint
    entries, errors = _read_entries(job.nodes, job.parts)
    weight_map = {info.name: info.shard for info in _written(job)}
    chosen = Plan(entries)
    report = build_report(skeleton(job.nodes, checkpoint), chosen, errors)
    logger.info("decomposed %d of %d Linear layers of %s", len(chosen.decomposed_entries()), len(job.nodes),
                checkpoint.folder)
    return Decomposed(chosen.decompose_config(), report, weight_map, checkpoint.largest_shard_bytes)


def _written(job: CheckpointJob) -> list[TensorInfo]:
    """The output shards' tensors, shard by shard, from their headers."""
    return [info for shard in job.checkpoint.shards for info in stored_tensors(job.target / shard)]


def finish_checkpoint(job: CheckpointJob) -> None:
    """Write the index (for a sharded input), copy the folder's other files and remove the parts folder."""
    checkpoint = job.checkpoint
    if checkpoint.sharded:
        layout = _written(job)
        index = {"metadata": {"total_size": sum(info.end - info.start for info in layout)},
                 "weight_map": dict(sorted((info.name, info.shard) for info in layout))}
        (job.target / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    _copy_other_files(checkpoint, job.target)
    shutil.rmtree(job.parts)


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
    same). Every rank returns the result. The steps are :func:`prepare_checkpoint` (reading the folder)
    and :func:`run_checkpoint`, which is :func:`decompose_share`, :func:`collect_checkpoint` and
    :func:`finish_checkpoint`, for processes started after the folder is read (``tools/checkpoint_cli.py``
    forks them).

    Raises:
        ValueError: On a policy that needs the whole model, or a checkpoint that does not fit its config.
        FileNotFoundError: When the folder or one of its files is missing.
    """
    return run_checkpoint(prepare_checkpoint(source, target, policy), workers or Workers(), progress)


def run_checkpoint(job: CheckpointJob, workers: Workers, progress: Progress | None = None) -> Decomposed:
    """:func:`decompose_checkpoint` once the folder is read: this process's share, then the result (rank 0 finishes)."""
    decompose_share(job, workers, progress)
    workers.barrier()
    result = collect_checkpoint(job)
    workers.barrier()
    if workers.rank == 0:
        finish_checkpoint(job)
    return result


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
        factors: list[tuple[str, torch.Tensor]] = []
        for part_name in result.graph.meta["factorized"][node.name]:
            part = result.graph.node(part_name)
            for role, param in part.params.items():
                source = node.params["bias"] if role == "bias" else node.params["weight"]
                array = result.graph.params[param]
                if array is graph.params[source]:  # passed through unchanged (a bias): the exact tensor
                    factors.append((param, sources[source]))
                else:  # computed from the float view: back to the source's dtype
                    factors.append((param, torch.from_numpy(np.ascontiguousarray(array)).to(sources[source].dtype)))
        write_safetensors(parts / f"{node.name}.safetensors", factors)
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
    its bias, wherever stored, goes with them); everything else is copied as it is. Every tensor's bytes
    are copied from the file holding them.
    """
    tensors: list[tuple[str, torch.Tensor | FileTensor]] = []
    for info in checkpoint.in_shard(shard):
        node = owners.get(info.name)
        if node is not None and info.name != node.params["weight"]:
            continue  # a bias goes with its weight
        factors = None if node is None else parts / f"{node.name}.safetensors"
        if factors is None or not factors.is_file():  # not a layer, or a layer left alone
            names = [info.name] if node is None else list(node.params.values())
            tensors += [(name, FileTensor(checkpoint.folder / checkpoint.tensors[name].shard,
                                          checkpoint.tensors[name])) for name in names]
        else:
            tensors += [(stored.name, FileTensor(factors, stored)) for stored in stored_tensors(factors)]
    write_safetensors(out / shard, tensors)


def _copy_other_files(checkpoint: Checkpoint, out: Path) -> None:
    """Copy the folder's files that are not weights (config.json, tokenizer files, ...)."""
    skip = {*checkpoint.shards, INDEX_FILE}
    for path in sorted(checkpoint.folder.iterdir()):
        if path.is_file() and path.name not in skip and not path.name.endswith(".safetensors"):
            if not (out / path.name).exists():
                shutil.copyfile(path, out / path.name)
