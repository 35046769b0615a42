r"""Decompose a trained CNN and fine-tune it, on one process or on N with torch DDP (``torchrun``).

The reference tool's training flow, on real data that ships with scikit-learn (the ``digits`` images;
``--data_path DIR`` for your own class-per-folder images):

1. build the model (a small ResNet) and print its parameters;
2. load ``--checkpoint`` if given (the trained original, or a decomposed model with its ``--config``);
3. decompose it (``--ratio R`` | ``--vbmf`` | ``--config FILE.json``; ``--no-decompose`` skips this and
   trains the original, e.g. to make the checkpoint to decompose) and print the new parameters;
4. fine-tune (``--epochs``, ``--lr``, ``--batch_size`` per process, ``--seed``);
5. print top-1 accuracy, loss, throughput (samples/s) and time per epoch, write them to ``--metrics``,
   and (rank 0) save the state dicts in ``--save DIR`` with safe permissions.

On N processes the reference's recipe is followed: rank 0 decomposes the weights once and saves
``decompose_config.json`` and ``decomposed_init.pt``; then *every* rank rebuilds the decomposed
structure with ``decompose_network(do_decompose_weight=False)`` and loads that state dict, so all ranks
start from the same weights (their checksums are in the metrics). Training uses
``DistributedDataParallel`` (gloo on CPU, NCCL on CUDA) and a ``DistributedSampler``; losses and
accuracies are summed over ranks with ``all_reduce``. Every check on the input (arguments, data,
checkpoint, decomposition options, enough data for N processes) happens before training starts, and
bad input ends with one line on stderr and exit code 2.

One process::

    python tools/train.py --no-decompose --epochs 10 --save runs/original        # train the original
    python tools/train.py --checkpoint runs/original/model.pt --ratio 0.5 --epochs 4 \
        --save runs/decomposed --metrics runs/decomposed/metrics.json

N processes on one machine (or ``bash tools/train_full_np.sh --nproc N ...``)::

    torchrun --standalone --nproc_per_node 2 tools/train.py --checkpoint runs/original/model.pt --ratio 0.5

Several machines (run on each, ``--node_rank`` 0..M-1; ``--save`` on a folder every node sees)::

    torchrun --nnodes M --node_rank K --nproc_per_node N --rdzv_backend c10d \
        --rdzv_endpoint HOST:29400 --rdzv_id job1 tools/train.py --save /shared/run ...
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: python tools/train.py, torchrun tools/train.py
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset  # noqa: E402

from lowrank_ir import Decompose, SafeWriteUmask, atomic_write, count_parameters, set_logger_level  # noqa: E402
from lowrank_ir import write_json as _write_json  # noqa: E402
from lowrank_ir._policy import split_config_document  # noqa: E402
from tools.digits import DataError, ImageData, load_data  # noqa: E402
from tools.distributed import init_process_group, process_device  # noqa: E402

__all__ = ["BasicBlock", "SmallResNet", "UsageError", "build_parser", "main", "small_resnet", "state_checksum"]

EXIT_BAD_INPUT = 2
PROG = "train.py"

#: Default parameter ratio when no decomposition option is given.
DEFAULT_RATIO = 0.5
#: Default rank divisor. The reference's 64 suits ResNet-50's 256..2048 channels; this model's layers
#: have 32..128 channels, where 64 would round most ranks up to the full width and nothing would be saved.
DEFAULT_DIVISOR = 8


class UsageError(ValueError):
    """Bad input (arguments, data, checkpoint, decomposition options): one line on stderr, exit code 2."""


# ------------------------------------------------------------------------------------------------ model

class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock (same attribute names: conv1/bn1/conv2/bn2/downsample)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class SmallResNet(nn.Module):
    """A ResNet for small images, in torchvision's layout.

    A 3x3 stem, three stages of one BasicBlock (``width``, ``2·width``, ``4·width`` channels; the last
    two halve the resolution), average pool, fc.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, stride=2))
        self.layer3 = nn.Sequential(BasicBlock(2 * width, 4 * width, stride=2))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(4 * width, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def small_resnet(num_classes: int = 10, in_channels: int = 1, width: int = 32, seed: int = 0) -> SmallResNet:
    """A :class:`SmallResNet` initialised from ``seed`` (the same weights on every process)."""
    torch.manual_seed(seed)
    return SmallResNet(num_classes, in_channels, width)


def state_checksum(model: nn.Module) -> str:
    """SHA-256 of a model's state dict (names, dtypes, shapes and bytes, in sorted key order), 16 hex digits."""
    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ processes

@dataclasses.dataclass(frozen=True)
class Processes:
    """Where this process is: its rank among ``world_size`` processes, ``local_world_size`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def multi_node(self) -> bool:
        return self.world_size != self.local_world_size


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError as err:
        raise UsageError(f"environment variable {name}={value!r} is not an int") from err


def _processes_from_env(cpu: bool) -> Processes:
    """Rank and world size as ``torchrun`` sets them (one process when not under torchrun)."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world_size = _env_int("LOCAL_WORLD_SIZE", world_size)
    return Processes(rank, world_size, local_rank, local_world_size, process_device(local_rank, cpu))


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _start(procs: Processes, threads: int | None) -> str:
    """Threads per process, and the process group when distributed; returns the backend's name."""
    torch.set_num_threads(threads or max(1, _cores() // procs.local_world_size))
    if not procs.distributed:
        return "none"
    return init_process_group(procs.device)


def _broadcast(value: Any, procs: Processes) -> Any:
    """``value`` from rank 0, on every rank (any picklable object)."""
    if not procs.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(value: Any, procs: Processes) -> list[Any]:
    """``value`` of every rank, in rank order, on every rank."""
    if not procs.distributed:
        return [value]
    values: list[Any] = [None] * procs.world_size
    dist.all_gather_object(values, value)
    return values


def _sum(values: Sequence[float], procs: Processes) -> list[float]:
    """Element-wise sum over ranks (``all_reduce``), in float64."""
    return _reduce(values, procs, dist.ReduceOp.SUM) if procs.distributed else list(values)


def _max(value: float, procs: Processes) -> float:
    return _reduce([value], procs, dist.ReduceOp.MAX)[0] if procs.distributed else value


def _reduce(values: Sequence[float], procs: Processes, op: Any) -> list[float]:
    tensor = torch.tensor(list(values), dtype=torch.float64, device=procs.device)  # NCCL reduces CUDA tensors
    dist.all_reduce(tensor, op=op)
    return [float(value) for value in tensor.cpu().tolist()]


def _sync_buffers(model: nn.Module, procs: Processes) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every rank, as DDP does before each forward."""
    if procs.distributed:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


# ------------------------------------------------------------------------------------------------ arguments

class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not argparse's usage block
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Decompose a small ResNet by low-rank factorization and fine-tune it on the digits images "
                    "(or --data_path), on one process or on N under torchrun (DDP).",
        epilog="Examples:\n"
               "  python tools/train.py --no-decompose --epochs 10 --save runs/original\n"
               "  python tools/train.py --checkpoint runs/original/model.pt --ratio 0.5 --save runs/decomposed\n"
               "  torchrun --standalone --nproc_per_node 2 tools/train.py --checkpoint runs/original/model.pt\n"
               "  bash tools/train_full_np.sh --nproc 2 --checkpoint runs/original/model.pt")
    data = parser.add_argument_group("data")
    data.add_argument("--data_path", metavar="DIR",
                      help="class-per-folder images (DIR/<class>/*.png, or DIR/train + DIR/val); "
                           "default: scikit-learn's digits")
    data.add_argument("--image_size", type=int, metavar="N",
                      help="resize images to N x N (default: 8 for the digits, 32 for --data_path)")
    data.add_argument("--channels", type=int, default=1, choices=[1, 3],
                      help="1 = grayscale, 3 = RGB (default 1)")

    model = parser.add_argument_group("model")
    model.add_argument("--width", type=int, default=32,
                       help="channels of the first stage; the others have 2x and 4x (default 32)")
    model.add_argument("--checkpoint", metavar="FILE.pt",
                       help="state dict to start from: the trained original, or a decomposed model saved by "
                            "this script (then give its decompose_config.json as --config)")

    decompose = parser.add_argument_group("decomposition (one of; default --ratio 0.5)")
    choice = decompose.add_mutually_exclusive_group()
    choice.add_argument("--ratio", type=float, help="keep this fraction of each layer's parameters, in (0, 1)")
    choice.add_argument("--vbmf", action="store_true", help="ranks estimated from the weights by EVBMF")
    choice.add_argument("--config", metavar="FILE.json",
                        help="a decompose_config saved earlier (Decompose(...).from_file())")
    choice.add_argument("--no-decompose", dest="no_decompose", action="store_true",
                        help="train the original model (to make a checkpoint to decompose)")
    decompose.add_argument("--divisor", type=int, default=DEFAULT_DIVISOR,
                           help=f"round ranks to multiples of this (default {DEFAULT_DIVISOR}: this model's "
                                f"layers are too narrow for the reference's 64; 1 disables rounding)")
    decompose.add_argument("--excludes", metavar="A,B", help="comma-separated layer names to leave alone")

    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=4, help="epochs (default 4; 0 only evaluates)")
    train.add_argument("--lr", type=float,
                       help="learning rate of SGD with momentum 0.9 and a cosine schedule (default 0.1 with "
                            "--no-decompose, 0.01 when fine-tuning a decomposed model)")
    train.add_argument("--weight_decay", type=float, default=5e-4, help="weight decay (default 5e-4)")
    train.add_argument("--batch_size", type=int, default=32, help="batch size per process (default 32)")
    train.add_argument("--seed", type=int, default=0, help="seed of the initialisation and shuffling (default 0)")
    train.add_argument("--cpu", action="store_true", help="train on the CPU even when CUDA is available")
    train.add_argument("--threads", type=int,
                       help="torch threads per process (default: CPU cores // processes on this node; on a "
                            "machine shared with other jobs 1 is often much faster)")

    out = parser.add_argument_group("output")
    out.add_argument("--save", metavar="DIR",
                     help="rank 0 saves decompose_config.json, decomposed_init.pt and model.pt here (needed "
                          "on several nodes: a folder every node sees)")
    out.add_argument("--metrics", metavar="FILE.json", help="write accuracy, loss, throughput, time per epoch here")
    out.add_argument("--log_level", help="lowrank_ir log level: debug, info, warning, error (default: unchanged)")

    check = parser.add_argument_group("checking only")
    check.add_argument("--dry_run", action="store_true",
                       help="check arguments, data, checkpoint and decomposition options for a run on "
                            "--world_size processes, then exit without training (0 = all good)")
    check.add_argument("--world_size", type=int, default=1, help="processes of the run --dry_run checks")
    return parser


def _validate(args: argparse.Namespace) -> None:
    """Checks on the arguments alone (the decomposition options are checked by ``Decompose`` itself)."""
    positive = {"--width": args.width, "--batch_size": args.batch_size, "--divisor": args.divisor,
                "--world_size": args.world_size, "--threads": 1 if args.threads is None else args.threads}
    for flag, value in positive.items():
        if value <= 0:
            raise UsageError(f"{flag} must be > 0, got {value!r}")
    if args.epochs < 0:
        raise UsageError(f"--epochs must be >= 0, got {args.epochs!r}")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise UsageError(f"--lr must be a finite number > 0, got {args.lr!r}")
    if args.image_size is not None and args.image_size < 4:
        raise UsageError(f"--image_size must be >= 4, got {args.image_size!r}")
    if args.config is not None and not Path(args.config).is_file():
        raise UsageError(f"--config file {args.config!r} does not exist")
    if args.checkpoint is not None and not Path(args.checkpoint).is_file():
        raise UsageError(f"--checkpoint file {args.checkpoint!r} does not exist")
    if args.metrics is not None and not Path(args.metrics).resolve().parent.is_dir():
        raise UsageError(f"--metrics {args.metrics!r}: folder {str(Path(args.metrics).parent)!r} does not exist")
    if args.save is not None and Path(args.save).exists() and not Path(args.save).is_dir():
        raise UsageError(f"--save {args.save!r} is a file, not a folder")
    if args.no_decompose and args.excludes:
        raise UsageError("--excludes chooses layers to leave alone when decomposing; it makes no sense with "
                         "--no-decompose")
    if args.ratio is None and not (args.vbmf or args.config or args.no_decompose):
        args.ratio = DEFAULT_RATIO
    if args.lr is None:
        args.lr = 0.1 if args.no_decompose else 0.01


def _check_world(data: ImageData, world_size: int, batch_size: int) -> None:
    """Each process must get at least one full batch of training samples."""
    train = len(data.train_y)
    if train < world_size * batch_size:
        most = train // batch_size
        fewer = f"at most {most} processes at this batch size, or " if most else ""
        raise UsageError(f"{train} training samples cannot give each of {world_size} processes a full batch of "
                         f"--batch_size {batch_size} (needs {world_size * batch_size}); use {fewer}"
                         f"--batch_size {max(1, train // world_size)} or less")
    if len(data.test_y) < world_size:
        raise UsageError(f"{len(data.test_y)} test samples cannot be shared by {world_size} processes (each needs "
                         f"at least one); use fewer processes")


# ------------------------------------------------------------------------------------------------ checkpoints

def _read_state(path: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds on a corrupt file: say which file, keep the cause
        raise UsageError(f"cannot read checkpoint {path!r}: {type(err).__name__}: "
                         f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise UsageError(f"checkpoint {path!r} is not a state dict (a dict of tensors)")
    return {key.removeprefix("module."): value for key, value in state.items()}  # saved from a DDP wrapper


def _mismatch(model: nn.Module, state: dict[str, torch.Tensor]) -> str:
    """How ``state`` fails to fit ``model`` ('' when it fits exactly)."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    shapes = [f"{key} {tuple(state[key].shape)} vs {tuple(tensor.shape)}" for key, tensor in expected.items()
              if key in state and tuple(state[key].shape) != tuple(tensor.shape)]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape (checkpoint vs model)", shapes)):
        if items:
            shown = ", ".join(items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")
            parts.append(f"{label}: {shown}")
    return "; ".join(parts)


def _save_state(model: nn.Module, path: Path) -> None:
    """``torch.save`` of the state dict, atomically and under a safe umask (not group/other-writable)."""
    with SafeWriteUmask(), atomic_write(path, "wb") as stream:
        torch.save(model.state_dict(), stream)


def _make_folder(path: Path) -> None:
    with SafeWriteUmask():
        path.mkdir(parents=True, exist_ok=True)


# ------------------------------------------------------------------------------------------------ decomposition

def _choose(decomposer: Decompose, args: argparse.Namespace) -> Decompose:
    excludes = [name for name in (args.excludes or "").split(",") if name] or None
    if args.config is not None:
        return decomposer.from_file()
    if args.vbmf:
        return decomposer.from_vbmf(excludes, args.divisor)
    return decomposer.from_ratio(args.ratio, excludes, args.divisor)


def _plan(model: nn.Module, args: argparse.Namespace) -> Decompose:
    """The decomposer with ranks chosen (no weights touched yet); ``UsageError`` for bad options."""
    try:
        return _choose(Decompose(model, config_file=args.config), args)  # --config is read, never written
    except (ValueError, TypeError) as err:
        hint = ""
        if str(err).startswith("no layer") and args.divisor > 1:
            hint = f" (ranks are rounded to multiples of --divisor {args.divisor}: try a smaller one)"
        raise UsageError(f"{err}{hint}") from err


def _structure(model: nn.Module, config: Path) -> nn.Module:
    """The decomposed structure of ``model`` under a saved config, weights at their initialisation."""
    try:
        return Decompose(model, config_file=config).from_file().decompose_network(do_decompose_weight=False)
    except (ValueError, TypeError) as err:
        raise UsageError(f"--config {str(config)!r} does not fit the model: {err}") from err


@dataclasses.dataclass
class Start:
    """What every rank starts training from: the decomposed config and state dict files (None: the original)."""

    config: str | None = None
    state: str | None = None
    layers_decomposed: int = 0
    error: str | None = None


def _decompose_once(decomposer: Decompose, folder: Path) -> Start:
    """On one process: decompose the weights as planned, save config + state dict in ``folder``."""
    config = decomposer.decompose_config
    assert config is not None
    decomposed = decomposer.decompose_network()
    _write_json(folder / "decompose_config.json", decomposer.config_document())  # with any layer's form
    _save_state(decomposed, folder / "decomposed_init.pt")
    return Start(str(folder / "decompose_config.json"), str(folder / "decomposed_init.pt"), len(config))


# ------------------------------------------------------------------------------------------------ training

def _loader(x: np.ndarray, y: np.ndarray, procs: Processes, batch_size: int, seed: int,
            shuffle: bool) -> tuple[DataLoader, DistributedSampler]:
    dataset = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    sampler: DistributedSampler = DistributedSampler(dataset, num_replicas=procs.world_size, rank=procs.rank,
                                                     shuffle=shuffle, seed=seed, drop_last=False)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=0), sampler


def evaluate(model: nn.Module, data: ImageData, procs: Processes, batch_size: int = 256) -> tuple[float, float]:
    """Top-1 accuracy and mean cross-entropy on the test set, each rank scoring a disjoint share, summed over ranks."""
    model.eval()
    x = torch.from_numpy(data.test_x[procs.rank::procs.world_size])
    y = torch.from_numpy(data.test_y[procs.rank::procs.world_size])
    loss_sum = correct = 0.0
    with torch.no_grad():
        for start in range(0, len(y), batch_size):
            inputs = x[start:start + batch_size].to(procs.device)
            labels = y[start:start + batch_size].to(procs.device)
            logits = model(inputs)
            loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
            correct += float((logits.argmax(1) == labels).sum())
    loss_sum, correct, count = _sum([loss_sum, correct, float(len(y))], procs)
    return correct / count, loss_sum / count


@contextlib.contextmanager
def _work_folder(args: argparse.Namespace, procs: Processes) -> Iterator[Path]:
    """``--save DIR`` (made by rank 0), or a temporary folder rank 0 makes and removes (one node only)."""
    if args.save is not None:
        folder = Path(args.save)
        if procs.main:
            _make_folder(folder)
        yield folder
        return
    if procs.multi_node:
        raise UsageError("on several nodes, give --save DIR on a folder every node sees: rank 0 saves the "
                         "decomposed state dict there and every rank loads it")
    name = tempfile.mkdtemp(prefix="lowrank-train-") if procs.main else None
    folder = Path(_broadcast(name, procs))
    try:
        yield folder
    except BaseException:
        if procs.main:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    if procs.distributed:  # every rank has loaded the files before rank 0 removes them
        dist.barrier()
    if procs.main:
        shutil.rmtree(folder, ignore_errors=True)


def _say(procs: Processes, message: str) -> None:
    if procs.main:
        print(message, flush=True)


def _fit_checkpoint(model: SmallResNet, args: argparse.Namespace) -> tuple[nn.Module, bool]:
    """The model with ``--checkpoint`` loaded; True when it is already decomposed (it fit ``--config``'s structure)."""
    if args.checkpoint is None:
        return model, False
    state = _read_state(args.checkpoint)
    problem = _mismatch(model, state)
    if not problem:
        model.load_state_dict(state)
        return model, False
    if args.config is not None:
        structure = _structure(model, Path(args.config))
        if not _mismatch(structure, state):
            structure.load_state_dict(state)
            return structure, True
    shape = f"width {args.width}, {model.conv1.in_channels} channel(s), {model.fc.out_features} classes"
    raise UsageError(f"--checkpoint {args.checkpoint!r} does not fit the model ({shape}"
                     f"{', nor the structure of --config' if args.config else ''}): {problem}")


def dry_run(args: argparse.Namespace) -> int:
    """Every check a run on ``--world_size`` processes makes before training, in this one process."""
    data = load_data(args.data_path, args.image_size, args.channels)
    _check_world(data, args.world_size, args.batch_size)
    model, already = _fit_checkpoint(small_resnet(data.num_classes, data.channels, args.width, args.seed), args)
    layers = 0
    if not args.no_decompose and not already:
        decomposer = _plan(model, args)
        layers = len(decomposer.decompose_config or {})
    plan = "no decomposition" if args.no_decompose else "already decomposed" if already \
        else f"{layers} layers to decompose"
    print(f"{PROG}: ok: {data.describe()}; {args.world_size} process(es) x batch {args.batch_size}; "
          f"{count_parameters(model):,} parameters; {plan}")
    return 0


def run(args: argparse.Namespace, procs: Processes) -> dict[str, Any]:
    """The whole flow on this process; returns the metrics (the same on every rank)."""
    backend = _start(procs, args.threads)
    threads = torch.get_num_threads()
    data = load_data(args.data_path, args.image_size, args.channels)
    _check_world(data, procs.world_size, args.batch_size)
    _say(procs, f"data: {data.describe()}")
    _say(procs, f"processes: {procs.world_size} (backend {backend}, device {procs.device}, "
                f"{threads} thread(s) each)")

    original = small_resnet(data.num_classes, data.channels, args.width, args.seed)
    params_original = count_parameters(original)
    _say(procs, f"model: SmallResNet width {args.width}: {params_original:,} parameters")
    model, already = _fit_checkpoint(original, args)
    if args.checkpoint is not None:
        _say(procs, f"loaded {args.checkpoint}" + (" (a decomposed model, structure from --config)" if already else ""))
    # Ranks are chosen on every rank (cheap, and the same everywhere), so a bad option stops every rank
    # here, before any work; only rank 0 then decomposes the weights.
    decomposer = None if args.no_decompose or already else _plan(model, args)
    accuracy_original, loss_original = (None, None) if already else evaluate(model.to(procs.device), data, procs)
    if accuracy_original is not None:
        _say(procs, f"original model: top-1 {accuracy_original:.2%}, loss {loss_original:.4f}")
    model = model.cpu()

    metrics: dict[str, Any] = {"framework": "torch", "world_size": procs.world_size, "backend": backend,
                               "device": str(procs.device), "threads_per_process": threads,
                               "data": data.describe(), "train_samples": len(data.train_y),
                               "test_samples": len(data.test_y), "parameters_original": params_original,
                               "accuracy_original": accuracy_original, "loss_original": loss_original}
    with _work_folder(args, procs) as folder:
        start = Start()
        if already:
            start = Start(args.config, args.checkpoint, 0)
        elif decomposer is not None:
            if procs.main:  # decompose once; every rank learns the outcome (or the error) from rank 0
                try:
                    start = _decompose_once(decomposer, folder)
                except (ValueError, TypeError, OSError) as err:  # UsageError too; told to every rank below
                    start = Start(error=str(err))
            start = _broadcast(start, procs)
            if start.error is not None:
                raise UsageError(start.error)
        if start.config is not None and start.state is not None:
            # every rank: the decomposed structure only, then the state dict rank 0 saved
            model = _structure(original, Path(start.config))
            model.load_state_dict(_read_state(start.state))
            config = json.loads(Path(start.config).read_text())
            metrics.update(decompose_config=config, layers_decomposed=len(split_config_document(config)[0]))
        metrics["decomposed"] = start.config is not None
        metrics["parameters"] = count_parameters(model)
        metrics["checksums_loaded"] = _gather(state_checksum(model), procs)
        if metrics["decomposed"]:
            _say(procs, f"decomposed: {len(metrics['decompose_config'])} layers, {params_original:,} -> "
                        f"{metrics['parameters']:,} parameters ({metrics['parameters'] / params_original:.1%})")
        model = model.to(procs.device)
        if metrics["decomposed"]:
            accuracy, loss = evaluate(model, data, procs)
            metrics.update(accuracy_decomposed=accuracy, loss_decomposed=loss)
            _say(procs, f"decomposed model before fine-tuning: top-1 {accuracy:.2%}, loss {loss:.4f}")
        metrics.update(_train(model, data, args, procs))
        if procs.main and args.save is not None:
            _save_state(model, folder / "model.pt")
            _say(procs, f"saved {folder / 'model.pt'}")
    metrics["checksums_final"] = _gather(state_checksum(model), procs)
    metrics["args"] = {key: value for key, value in vars(args).items() if key not in ("dry_run", "world_size")}
    return metrics


def _train(model: nn.Module, data: ImageData, args: argparse.Namespace, procs: Processes) -> dict[str, Any]:
    """Train for ``args.epochs``; the figures of each epoch and of the end, reduced over ranks."""
    loader, sampler = _loader(data.train_x, data.train_y, procs, args.batch_size, args.seed, shuffle=True)
    wrapped: nn.Module = model
    if procs.distributed:
        wrapped = DistributedDataParallel(model, device_ids=[procs.device.index] if procs.device.type == "cuda"
                                          else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay,
                                nesterov=True)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, args.epochs * len(loader)))
    epochs: list[dict[str, float]] = []
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        wrapped.train()
        loss_sum = correct = seen = 0.0
        started = time.perf_counter()
        for inputs, labels in loader:
            inputs, labels = inputs.to(procs.device), labels.to(procs.device)
            optimizer.zero_grad(set_to_none=True)
            logits = wrapped(inputs)
            loss = nn.functional.cross_entropy(logits, labels)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += float(loss.detach()) * len(labels)
            correct += float((logits.detach().argmax(1) == labels).sum())
            seen += len(labels)
        elapsed = _max(time.perf_counter() - started, procs)
        _sync_buffers(model, procs)
        loss_sum, correct, seen = _sum([loss_sum, correct, seen], procs)
        accuracy, test_loss = evaluate(model, data, procs)
        epochs.append({"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_accuracy": correct / seen,
                       "test_accuracy": accuracy, "test_loss": test_loss, "time": elapsed,
                       "throughput": seen / elapsed, "samples": seen})
        _say(procs, f"epoch {epoch + 1}/{args.epochs}: train loss {loss_sum / seen:.4f}, test top-1 "
                    f"{accuracy:.2%}, test loss {test_loss:.4f}, {elapsed:.2f} s, {seen / elapsed:,.0f} samples/s")
    if not epochs:
        accuracy, test_loss = evaluate(model, data, procs)
        return {"accuracy": accuracy, "loss": test_loss, "train_loss": None, "throughput": None,
                "time_per_epoch": None, "epochs": []}
    total_time = sum(item["time"] for item in epochs)
    return {"accuracy": epochs[-1]["test_accuracy"], "loss": epochs[-1]["test_loss"],
            "train_loss": epochs[-1]["train_loss"],
            "throughput": sum(item["samples"] for item in epochs) / total_time,
            "time_per_epoch": total_time / len(epochs), "epochs": epochs}


def _summary(metrics: dict[str, Any]) -> str:
    lines = [f"Final top-1 accuracy: {metrics['accuracy']:.2%}   loss: {metrics['loss']:.4f}"]
    if metrics.get("throughput") is not None:
        lines.append(f"Throughput: {metrics['throughput']:,.1f} samples/s over {metrics['world_size']} "
                     f"process(es)   time per epoch: {metrics['time_per_epoch']:.3f} s")
    lines.append(f"Parameters: {metrics['parameters_original']:,} original -> {metrics['parameters']:,}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    procs = Processes()
    threads = torch.get_num_threads()  # restored at the end: main() may run inside another program
    try:
        procs = _processes_from_env(args.cpu)
        if args.log_level is not None:
            set_logger_level(args.log_level)
        _validate(args)
        if args.dry_run:
            return dry_run(args)
        metrics = run(args, procs)
        if procs.main:
            print(_summary(metrics), flush=True)
            if args.metrics is not None:
                _write_json(args.metrics, metrics)
                print(f"metrics written to {args.metrics}", flush=True)
        if procs.distributed:
            # Every rank leaves together: a rank whose gloo peers have already closed their sockets can
            # abort in the process group's teardown ("terminate called without an active exception").
            dist.barrier()
        return 0
    except (UsageError, DataError, ValueError, TypeError, FileNotFoundError) as err:
        if procs.main or procs.local_rank == 0:  # one line per node, not one per process
            rank = f" [rank {procs.rank}]" if procs.distributed else ""
            print(f"{PROG}: error{rank}: {err}".splitlines()[0], file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())
