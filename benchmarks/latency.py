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
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

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


def layer_share(profiled: Sequence[LayerTime], layers: Collection[str]) -> float:
    """The fraction of the original model's kernel time (onnxruntime's profiler) spent in ``layers``.

    Low rank changes only these layers' time: if it scaled with their multiply-adds, the latency
    ratio would be ``1 - share + share · MAC ratio`` (Amdahl's law; the ``bound`` column).
    """
    total = sum(row.original_ms or 0.0 for row in profiled)
    inside = sum(row.original_ms or 0.0 for row in profiled if row.name in layers)
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
    macs = mac_ratio(onnx.load(str(original_path)), decomposer.plan, shapes)  # type: ignore[attr-defined]
    timed = bench(original_path, path, feeds=feeds, threads=threads, runs=runs, per_layer=True)
    layers = {row.name for row in decomposer.report}  # type: ignore[attr-defined]
    share = layer_share(timed.layers, layers)
    output = np.asarray(run(session(decomposed), feeds)[0], dtype=np.float64)  # type: ignore[arg-type]
    error = float(np.linalg.norm(output - reference) / np.linalg.norm(reference))
    return (f"{label:<13} {totals['decomposed']:>3}/{totals['layers']:<3} {macs:>9.3f} {share:>11.3f} "
            f"{1.0 - share + share * macs:>7.3f} {timed.paired_ratio:>13.3f} "
            f"{timed.original.median_ms:>10.1f} {timed.decomposed.median_ms:>10.1f} {error:>10.4f} {seconds:>8.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="rec,det", help="comma-separated: rec, det (default both)")
    parser.add_argument("--budgets", default="0.9", help="comma-separated latency targets (default 0.9)")
    parser.add_argument("--runs", type=int, default=20, help="interleaved timed runs per comparison")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    parser.add_argument("--calibration", type=int, default=0,
                        help="calibration images for the latency budgets (their layers weighed by measured "
                             "sensitivities; default 0: data-free)")
    args = parser.parse_args(argv)

    import os

    import onnx

    from frontends.onnx import run, session
    from lowrank_ir import Decompose
    from tests.onnx_models import ppocr_feeds, ppocr_model

    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; {args.threads} thread(s)")
    print(f"{'row':<13} {'layers':>7} {'MAC ratio':>9} {'layer share':>11} "
          f"{'bound':>7} {'latency ratio':>13} {'orig. ms':>10} {'decomp. ms':>10} "
          f"{'rel. error':>10} {'seconds':>8}")
    with tempfile.TemporaryDirectory(prefix="lowrank-latency-") as tmp:
        folder = Path(tmp)
        for kind in [name.strip() for name in args.models.split(",") if name.strip()]:
            source = ppocr_model(kind)
            if source is None or kind not in SHAPES:
                print(f"{kind}: not available (rapidocr-onnxruntime==1.4.4 ships det and rec)")
                return 2
            model = onnx.load(str(source))
            feeds = _images(kind)
            shapes = {"x": list(SHAPES[kind])}
            reference = np.asarray(run(session(model), feeds)[0], dtype=np.float64)
            print(f"PP-OCRv4 {kind} {'x'.join(str(dim) for dim in SHAPES[kind])}")
            start = time.perf_counter()
            decomposer = Decompose(model).from_ratio(0.5)
            decomposed = decomposer.decompose_network()
            print(_row("ratio 0.5", decomposer, decomposed, Path(source), feeds, reference, folder, args.runs,
                       args.threads, time.perf_counter() - start), flush=True)
            calib = [ppocr_feeds(kind, seed=1000 + index) for index in range(args.calibration)] or None
            for target in [float(value) for value in args.budgets.split(",") if value.strip()]:
                start = time.perf_counter()
                decomposer = Decompose(model).from_budget(latency=target, divisor=16, input_shapes=shapes,
                                                          threads=args.threads, datasets=calib)
                decomposed = decomposer.decompose_network(datasets=calib)
                print(_row(f"latency {target:g}", decomposer, decomposed, Path(source), feeds, reference, folder,
                           args.runs, args.threads, time.perf_counter() - start), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
