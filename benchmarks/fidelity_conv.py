"""Fidelity on real convolutional models: PP-OCR det, rec and cls (``rapidocr-onnxruntime==1.4.4``).

Run:  python -m benchmarks.fidelity_conv [--calibration 16] [--held-out 8]

Each model is decomposed at ratio 0.5 through the ONNX path (divisor 64; 16 for the narrow cls),
data-free, data-aware and sequential (calibration on synthetic text images through PP-OCR's preprocessing; the
held-out images are different ones), and run in onnxruntime: relative output error
``‖y' − y‖ / ‖y‖`` over the held-out batch, and what PP-OCR reads from the output (text-pixel mask
for det, argmax for rec and cls).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

DIVISOR = {"det": 64, "rec": 64, "cls": 16}


def _run(model: object, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, feeds)[0])


def _reading(kind: str, reference: np.ndarray, result: np.ndarray) -> str:
    if kind == "det":
        return f"mask {float(np.mean((reference > 0.3) == (result > 0.3))):.1%}"
    return f"argmax {float(np.mean(reference.argmax(-1) == result.argmax(-1))):.1%}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", type=int, default=16, help="calibration images per model")
    parser.add_argument("--held-out", type=int, default=8, help="held-out images per model")
    args = parser.parse_args(argv)

    import onnx

    from lowrank_ir import Decompose, count_parameters
    from tests.onnx_models import ppocr_feeds, ppocr_model

    print(f"{'model':<5} {'mode':<11} {'params':>21} {'rel. error':>11} {'reading':>14} {'seconds':>8}")
    for kind in ("det", "rec", "cls"):
        path = ppocr_model(kind)
        if path is None:
            print("rapidocr-onnxruntime==1.4.4 is not installed")
            return 2
        model = onnx.load(str(path))
        held = ppocr_feeds(kind, seed=0, batch=args.held_out)
        calib = [ppocr_feeds(kind, seed=1000 + index, batch=1) for index in range(args.calibration)]
        reference = _run(model, held)
        for mode, data, sequential in (("data-free", None, False), ("data-aware", calib, False),
                                       ("sequential", calib, True)):
            start = time.perf_counter()
            decomposed = (Decompose(model).from_ratio(0.5, divisor=DIVISOR[kind])
                          .decompose_network(datasets=data, sequential=sequential))
            seconds = time.perf_counter() - start
            result = _run(decomposed, held)
            error = float(np.linalg.norm(result - reference) / np.linalg.norm(reference))
            params = f"{count_parameters(model):,} -> {count_parameters(decomposed):,}"
            print(f"{kind:<5} {mode:<11} {params:>21} {error:11.4f} {_reading(kind, reference, result):>14} "
                  f"{seconds:8.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
