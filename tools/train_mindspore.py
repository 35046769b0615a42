r"""Decompose a MindSpore ``nn.Cell`` and fine-tune it, then save and reload the ``.ckpt`` (one process).

The same flow as ``tools/train.py``, for MindSpore (CPU, PyNative mode), on the digits images:

1. build the Cell (a small ResNet in torchvision's layout) and print its parameters;
2. load ``--checkpoint FILE.ckpt`` if given (the trained original, or a decomposed Cell with its ``--config``);
3. decompose it (``--ratio R`` | ``--vbmf`` | ``--config FILE.json``; ``--no-decompose`` trains the original),
   save ``decompose_config.json`` and ``decomposed_init.ckpt``, then -- the multi-card recipe -- rebuild the
   decomposed *structure* with ``decompose_network(do_decompose_weight=False)`` and load that checkpoint
   into it with ``load_checkpoint`` + ``load_param_into_net``;
4. fine-tune (``--epochs``, ``--lr``, ``--batch_size``, ``--seed``);
5. save ``model.ckpt``, reload it into a fresh structure-only rebuild, and print the top-1 accuracy of the
   reloaded Cell (it must equal the fine-tuned one), loss, throughput and time per epoch; ``--metrics``
   writes them as JSON. Files are written atomically under ``SafeWriteUmask``.

Examples::

    python tools/train_mindspore.py --no-decompose --epochs 10 --save runs/ms_original
    python tools/train_mindspore.py --checkpoint runs/ms_original/model.ckpt --ratio 0.5 --epochs 3 \
        --save runs/ms_decomposed --metrics runs/ms_decomposed/metrics.json

Distributed launch (not run here: this script trains on one process). MindSpore's launcher ``msrun``
plays torchrun's part: ``msrun --worker_num=8 --local_worker_num=8 --master_port=8118
--log_dir=msrun_log --join=True tools/train_mindspore.py ...`` starts 8 workers on one machine
(``--worker_num`` = all workers, ``--local_worker_num`` = this machine's, ``--master_addr`` and
``--node_rank`` for several machines). A data-parallel version of this script would call
``mindspore.communication.init()`` and ``mindspore.set_auto_parallel_context(parallel_mode=
ParallelMode.DATA_PARALLEL, gradients_mean=True)``, shard the data by ``get_rank()``/``get_group_size()``
(``mindspore.dataset`` ``num_shards``/``shard_id``), and follow the same recipe as here: rank 0 decomposes
and saves ``decomposed_init.ckpt``; every rank rebuilds the structure with ``do_decompose_weight=False``
and loads it with ``load_checkpoint`` + ``load_param_into_net`` before training.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

os.environ.setdefault("GLOG_v", "3")  # MindSpore's C++ logs: errors only

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: python tools/train_mindspore.py
    sys.path.insert(0, str(ROOT))

import mindspore as ms  # noqa: E402
import numpy as np  # noqa: E402
from mindspore import nn, ops  # noqa: E402
from mindspore.common.initializer import HeNormal  # noqa: E402

from lowrank_ir import Decompose, SafeWriteUmask, count_parameters, set_logger_level  # noqa: E402
from lowrank_ir import write_json as _write_json  # noqa: E402
from lowrank_ir._policy import split_config_document  # noqa: E402
from tools.digits import DataError, ImageData, load_data  # noqa: E402

__all__ = ["BasicBlock", "SmallResNet", "UsageError", "build_parser", "cell_checksum", "main", "small_resnet"]

EXIT_BAD_INPUT = 2
PROG = "train_mindspore.py"
DEFAULT_RATIO = 0.5
DEFAULT_DIVISOR = 8  # as in tools/train.py: the reference's 64 would leave this narrow model undecomposed


class UsageError(ValueError):
    """Bad input (arguments, data, checkpoint, decomposition options): one line on stderr, exit code 2."""


# ------------------------------------------------------------------------------------------------ model

def _conv(inplanes: int, planes: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    padding = {"pad_mode": "pad", "padding": kernel // 2} if kernel > 1 else {"pad_mode": "valid"}
    return nn.Conv2d(inplanes, planes, kernel, stride=stride, has_bias=False,
                     weight_init=HeNormal(mode="fan_out", nonlinearity="relu"), **padding)


class BasicBlock(nn.Cell):
    """torchvision's ResNet BasicBlock as a Cell (conv1/bn1/conv2/bn2/downsample)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv(inplanes, planes, 3, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = _conv(planes, planes, 3)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Cell | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.SequentialCell([_conv(inplanes, planes, 1, stride), nn.BatchNorm2d(planes)])

    def construct(self, x: ms.Tensor) -> ms.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class SmallResNet(nn.Cell):
    """The Cell twin of ``tools/train.py``'s SmallResNet (same paths, so the same decompose_config)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        self.conv1 = _conv(in_channels, width, 3)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.layer1 = nn.SequentialCell([BasicBlock(width, width)])
        self.layer2 = nn.SequentialCell([BasicBlock(width, 2 * width, stride=2)])
        self.layer3 = nn.SequentialCell([BasicBlock(2 * width, 4 * width, stride=2)])
        self.fc = nn.Dense(4 * width, num_classes)

    def construct(self, x: ms.Tensor) -> ms.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(ops.mean(x, (2, 3)))


def small_resnet(num_classes: int = 10, in_channels: int = 1, width: int = 32, seed: int = 0) -> SmallResNet:
    ms.set_seed(seed)
    return SmallResNet(num_classes, in_channels, width)


def cell_checksum(cell: nn.Cell) -> str:
    """SHA-256 of a Cell's parameters (names, shapes and bytes, sorted by name), 16 hex digits."""
    digest = hashlib.sha256()
    params = {param.name: param.asnumpy() for param in cell.get_parameters()}
    for name in sorted(params):
        array = np.ascontiguousarray(params[name])
        digest.update(f"{name}|{array.dtype}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ arguments

class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not argparse's usage block
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Decompose a MindSpore Cell (a small ResNet) by low-rank factorization, "
                                            "fine-tune it on the digits images, save and reload the .ckpt.")
    parser.add_argument("--data_path", metavar="DIR", help="class-per-folder images (default: the digits)")
    parser.add_argument("--image_size", type=int, metavar="N", help="resize images to N x N")
    parser.add_argument("--channels", type=int, default=1, choices=[1, 3], help="1 = grayscale, 3 = RGB")
    parser.add_argument("--width", type=int, default=32, help="channels of the first stage (default 32)")
    parser.add_argument("--checkpoint", metavar="FILE.ckpt",
                        help="checkpoint to start from: the trained original, or a decomposed Cell with --config")
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--ratio", type=float, help=f"parameter ratio per layer (default {DEFAULT_RATIO})")
    choice.add_argument("--vbmf", action="store_true", help="ranks estimated by EVBMF")
    choice.add_argument("--config", metavar="FILE.json", help="a saved decompose_config (from_file)")
    choice.add_argument("--no-decompose", dest="no_decompose", action="store_true", help="train the original")
    parser.add_argument("--divisor", type=int, default=DEFAULT_DIVISOR,
                        help=f"round ranks to multiples of this (default {DEFAULT_DIVISOR})")
    parser.add_argument("--epochs", type=int, default=3, help="epochs (default 3; 0 only evaluates)")
    parser.add_argument("--lr", type=float, help="learning rate of Momentum(0.9) with a cosine schedule "
                                                 "(default 0.1 with --no-decompose, else 0.01)")
    parser.add_argument("--weight_decay", type=float, default=5e-4, help="weight decay (default 5e-4)")
    parser.add_argument("--batch_size", type=int, default=32, help="batch size (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    parser.add_argument("--save", metavar="DIR", help="save decompose_config.json, decomposed_init.ckpt, model.ckpt")
    parser.add_argument("--metrics", metavar="FILE.json", help="write accuracy, loss, throughput here")
    parser.add_argument("--log_level", help="lowrank_ir log level (default: unchanged)")
    return parser


def _validate(args: argparse.Namespace) -> None:
    for flag, value in {"--width": args.width, "--batch_size": args.batch_size, "--divisor": args.divisor}.items():
        if value <= 0:
            raise UsageError(f"{flag} must be > 0, got {value!r}")
    if args.epochs < 0:
        raise UsageError(f"--epochs must be >= 0, got {args.epochs!r}")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise UsageError(f"--lr must be a finite number > 0, got {args.lr!r}")
    for flag, value in (("--checkpoint", args.checkpoint), ("--config", args.config)):
        if value is not None and not Path(value).is_file():
            raise UsageError(f"{flag} file {value!r} does not exist")
    if args.metrics is not None and not Path(args.metrics).resolve().parent.is_dir():
        raise UsageError(f"--metrics {args.metrics!r}: folder {str(Path(args.metrics).parent)!r} does not exist")
    if args.save is not None and Path(args.save).exists() and not Path(args.save).is_dir():
        raise UsageError(f"--save {args.save!r} is a file, not a folder")
    if args.ratio is None and not (args.vbmf or args.config or args.no_decompose):
        args.ratio = DEFAULT_RATIO
    if args.lr is None:
        args.lr = 0.1 if args.no_decompose else 0.01


# ------------------------------------------------------------------------------------------------ checkpoints

def save_ckpt(cell: nn.Cell, path: Path) -> None:
    """``save_checkpoint`` under ``SafeWriteUmask``, to a temporary name then renamed: never half-written."""
    partial = path.with_name(f".{path.stem}.partial.ckpt")
    try:
        with SafeWriteUmask():
            ms.save_checkpoint(cell, str(partial))
        os.replace(partial, path)
    finally:
        if partial.exists():
            partial.unlink()


def read_ckpt(path: str | Path) -> dict[str, Any]:
    try:
        params = ms.load_checkpoint(str(path))
    except Exception as err:  # MindSpore raises several kinds on a corrupt file: say which file, keep the cause
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise UsageError(f"cannot read checkpoint {str(path)!r}: {type(err).__name__}: {first}") from err
    if not params:
        raise UsageError(f"checkpoint {str(path)!r} holds no parameters")
    return params


def _mismatch(cell: nn.Cell, params: dict[str, Any]) -> str:
    """How ``params`` fails to fit ``cell`` ('' when every parameter is there with its shape, nothing extra)."""
    expected = {param.name: tuple(param.shape) for param in cell.get_parameters()}
    missing = [name for name in expected if name not in params]
    unexpected = [name for name in params if name not in expected]
    shapes = [f"{name} {tuple(params[name].shape)} vs {shape}" for name, shape in expected.items()
              if name in params and tuple(params[name].shape) != shape]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape (checkpoint vs model)", shapes)):
        if items:
            more = f" and {len(items) - 3} more" if len(items) > 3 else ""
            parts.append(f"{label}: {', '.join(items[:3])}{more}")
    return "; ".join(parts)


def load_into(cell: nn.Cell, params: dict[str, Any]) -> nn.Cell:
    """``load_param_into_net`` strictly (the fit was checked first, so nothing is silently skipped)."""
    not_loaded, _ = ms.load_param_into_net(cell, params, strict_load=True)
    if not_loaded:
        raise UsageError(f"parameters not loaded: {not_loaded}")
    return cell


def _structure(cell: nn.Cell, config: Path) -> nn.Cell:
    """The decomposed structure of ``cell`` under a saved config, parameters at their initialisation."""
    try:
        return Decompose(cell, config_file=config).from_file().decompose_network(do_decompose_weight=False)
    except (ValueError, TypeError) as err:
        raise UsageError(f"--config {str(config)!r} does not fit the model: {err}") from err


def _fit_checkpoint(cell: SmallResNet, args: argparse.Namespace) -> tuple[nn.Cell, bool]:
    """The Cell with ``--checkpoint`` loaded; True when it is already decomposed (it fit ``--config``'s structure)."""
    if args.checkpoint is None:
        return cell, False
    params = read_ckpt(args.checkpoint)
    problem = _mismatch(cell, params)
    if not problem:
        return load_into(cell, params), False
    if args.config is not None:
        structure = _structure(cell, Path(args.config))
        if not _mismatch(structure, params):
            return load_into(structure, params), True
    raise UsageError(f"--checkpoint {args.checkpoint!r} does not fit the model (width {args.width}"
                     f"{', nor the structure of --config' if args.config else ''}): {problem}")


def _plan(cell: nn.Cell, args: argparse.Namespace) -> Decompose:
    try:
        decomposer = Decompose(cell, config_file=args.config)
        if args.config is not None:
            return decomposer.from_file()
        if args.vbmf:
            return decomposer.from_vbmf(divisor=args.divisor)
        return decomposer.from_ratio(args.ratio, divisor=args.divisor)
    except (ValueError, TypeError) as err:
        hint = ""
        if str(err).startswith("no layer") and args.divisor > 1:
            hint = f" (ranks are rounded to multiples of --divisor {args.divisor}: try a smaller one)"
        raise UsageError(f"{err}{hint}") from err


# ------------------------------------------------------------------------------------------------ training

def evaluate(cell: nn.Cell, data: ImageData, batch_size: int = 512) -> tuple[float, float]:
    """Top-1 accuracy and mean cross-entropy on the test set."""
    cell.set_train(False)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    correct = loss_sum = 0.0
    for start in range(0, len(data.test_y), batch_size):
        inputs = ms.Tensor(data.test_x[start:start + batch_size])
        labels = ms.Tensor(data.test_y[start:start + batch_size].astype(np.int32))
        logits = cell(inputs)
        loss_sum += float(loss_fn(logits, labels).asnumpy())
        correct += float((logits.argmax(1) == labels).sum().asnumpy())
    return correct / len(data.test_y), loss_sum / len(data.test_y)


def train(cell: nn.Cell, data: ImageData, args: argparse.Namespace) -> dict[str, Any]:
    """Fine-tune ``cell`` for ``args.epochs``; per-epoch and final figures."""
    steps_per_epoch = math.ceil(len(data.train_y) / args.batch_size)
    total = max(1, args.epochs * steps_per_epoch)
    schedule = [args.lr * 0.5 * (1 + math.cos(math.pi * step / total)) for step in range(total)]
    optimizer = nn.Momentum(cell.trainable_params(), learning_rate=schedule, momentum=0.9,
                            weight_decay=args.weight_decay, use_nesterov=True)
    loss_fn = nn.CrossEntropyLoss()

    def forward(inputs: ms.Tensor, labels: ms.Tensor) -> tuple[ms.Tensor, ms.Tensor]:
        logits = cell(inputs)
        return loss_fn(logits, labels), logits

    grad_fn = ms.value_and_grad(forward, None, optimizer.parameters, has_aux=True)
    rng = np.random.default_rng(args.seed)
    epochs: list[dict[str, float]] = []
    for epoch in range(args.epochs):
        cell.set_train(True)
        order = rng.permutation(len(data.train_y))
        loss_sum = correct = seen = 0.0
        started = time.perf_counter()
        for start in range(0, len(order), args.batch_size):
            batch = order[start:start + args.batch_size]
            inputs = ms.Tensor(data.train_x[batch])
            labels = ms.Tensor(data.train_y[batch].astype(np.int32))
            (loss, logits), grads = grad_fn(inputs, labels)
            optimizer(grads)
            loss_sum += float(loss.asnumpy()) * len(batch)
            correct += float((logits.argmax(1) == labels).sum().asnumpy())
            seen += len(batch)
        elapsed = time.perf_counter() - started
        accuracy, test_loss = evaluate(cell, data)
        epochs.append({"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_accuracy": correct / seen,
                       "test_accuracy": accuracy, "test_loss": test_loss, "time": elapsed,
                       "throughput": seen / elapsed, "samples": seen})
        print(f"epoch {epoch + 1}/{args.epochs}: train loss {loss_sum / seen:.4f}, test top-1 {accuracy:.2%}, "
              f"test loss {test_loss:.4f}, {elapsed:.2f} s, {seen / elapsed:,.0f} samples/s", flush=True)
    if not epochs:
        accuracy, test_loss = evaluate(cell, data)
        return {"accuracy": accuracy, "loss": test_loss, "train_loss": None, "throughput": None,
                "time_per_epoch": None, "epochs": []}
    total_time = sum(item["time"] for item in epochs)
    return {"accuracy": epochs[-1]["test_accuracy"], "loss": epochs[-1]["test_loss"],
            "train_loss": epochs[-1]["train_loss"], "throughput": sum(item["samples"] for item in epochs) / total_time,
            "time_per_epoch": total_time / len(epochs), "epochs": epochs}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole flow; returns the metrics."""
    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
    data = load_data(args.data_path, args.image_size, args.channels)
    if len(data.train_y) < args.batch_size:
        raise UsageError(f"{len(data.train_y)} training samples are fewer than one --batch_size {args.batch_size}")
    print(f"data: {data.describe()}", flush=True)
    original = small_resnet(data.num_classes, data.channels, args.width, args.seed)
    params_original = count_parameters(original)
    print(f"model: SmallResNet (MindSpore Cell) width {args.width}: {params_original:,} parameters", flush=True)
    cell, already = _fit_checkpoint(original, args)
    decomposer = None if args.no_decompose or already else _plan(cell, args)  # bad options stop here
    metrics: dict[str, Any] = {"framework": "mindspore", "world_size": 1, "device": "CPU", "data": data.describe(),
                               "train_samples": len(data.train_y), "test_samples": len(data.test_y),
                               "parameters_original": params_original, "accuracy_original": None,
                               "loss_original": None}
    if not already:
        accuracy, loss = evaluate(cell, data)
        metrics.update(accuracy_original=accuracy, loss_original=loss)
        print(f"original model: top-1 {accuracy:.2%}, loss {loss:.4f}", flush=True)

    with tempfile.TemporaryDirectory(prefix="lowrank-ms-") as scratch:
        folder = Path(args.save) if args.save is not None else Path(scratch)
        with SafeWriteUmask():
            folder.mkdir(parents=True, exist_ok=True)
        config_path: Path | None = Path(args.config) if already else None
        if decomposer is not None:
            assert decomposer.decompose_config is not None
            decomposed = decomposer.decompose_network()
            config_path = folder / "decompose_config.json"
            _write_json(config_path, decomposer.config_document())  # with any layer's form
            save_ckpt(decomposed, folder / "decomposed_init.ckpt")
            # the multi-card recipe: structure only, then the checkpoint saved above
            cell = load_into(_structure(original, config_path), read_ckpt(folder / "decomposed_init.ckpt"))
            if cell_checksum(cell) != cell_checksum(decomposed):
                raise RuntimeError("the reloaded decomposed checkpoint differs from the decomposed Cell")
        if config_path is not None:
            config = json.loads(config_path.read_text())
            layers = len(split_config_document(config)[0])
            metrics.update(decompose_config=config, layers_decomposed=layers)
            print(f"decomposed: {layers} layers, {params_original:,} -> {count_parameters(cell):,} parameters "
                  f"({count_parameters(cell) / params_original:.1%})", flush=True)
            accuracy, loss = evaluate(cell, data)
            metrics.update(accuracy_decomposed=accuracy, loss_decomposed=loss)
            print(f"decomposed model before fine-tuning: top-1 {accuracy:.2%}, loss {loss:.4f}", flush=True)
        metrics["decomposed"] = config_path is not None
        metrics["parameters"] = count_parameters(cell)
        metrics["checksum_loaded"] = cell_checksum(cell)
        metrics.update(train(cell, data, args))

        save_ckpt(cell, folder / "model.ckpt")
        fresh = small_resnet(data.num_classes, data.channels, args.width, args.seed + 1)  # other initial weights
        reloaded = fresh if config_path is None else _structure(fresh, config_path)
        reloaded = load_into(reloaded, read_ckpt(folder / "model.ckpt"))
        accuracy, loss = evaluate(reloaded, data)
        metrics.update(checksum_final=cell_checksum(cell), checksum_reloaded=cell_checksum(reloaded),
                       accuracy_reloaded=accuracy, loss_reloaded=loss)
        print(f"reloaded {'model.ckpt' if args.save is None else folder / 'model.ckpt'} into "
              f"{'a structure-only rebuild' if config_path is not None else 'the model'}: top-1 {accuracy:.2%}",
              flush=True)
    metrics["args"] = vars(args)
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.log_level is not None:
            set_logger_level(args.log_level)
        _validate(args)
        metrics = run(args)
    except (UsageError, DataError, ValueError, TypeError, FileNotFoundError) as err:
        print(f"{PROG}: error: {err}".splitlines()[0], file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    print(f"Final top-1 accuracy: {metrics['accuracy']:.2%}   loss: {metrics['loss']:.4f}")
    if metrics["throughput"] is not None:
        print(f"Throughput: {metrics['throughput']:,.1f} samples/s   time per epoch: {metrics['time_per_epoch']:.3f} s")
    print(f"Parameters: {metrics['parameters_original']:,} original -> {metrics['parameters']:,}")
    if args.metrics is not None:
        _write_json(args.metrics, metrics)
        print(f"metrics written to {args.metrics}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
