"""Fidelity benchmark: all-MiniLM-L6-v2 (real weights), ours vs the reference tool, in one process.

Run:  python -m benchmarks.fidelity [--calibration 256] [--held-out 512] [--no-reference]
                                   [--calib-batch-size 1] [--no-mask-padding] [--only NAME ...]

Sentence embeddings of held-out English sentences (Python standard-library docstrings, see
``benchmarks/text.py``; the calibration sentences are different ones) are compared with the original
model's: mean and minimum cosine similarity, at the parameter budget the reference reaches with
``from_ratio(0.5)`` on the encoder's Linear layers (``from_dict({encoder: 0.5})``, divisor 64). Rows:
reference data-free and data-aware; ours data-free, data-aware, sequential, and budget-allocated
(``from_budget(params=<that budget>, divisor=16)``, data-aware) with the spectral estimate and with
the measured one (then also sequential). A budget row's seconds include choosing the ranks (for the
measured estimate: one model run per layer over the calibration set); the sequential budget row reuses
the measured allocation. Calibration batches hold one sentence each by default; with
``--calib-batch-size 16`` they are padded batches, whose padding tokens our rows leave out of the
statistics (``--no-mask-padding`` keeps them; the reference always counts them). The same batches go
to every method. ``--only`` runs the rows whose name contains one of the given words.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from benchmarks import minilm, text


def _weights_after(config: dict[str, Any], model: Any) -> int:
    """Weight parameters of the decomposed encoder Linear layers under ``config``."""
    modules = dict(model.named_modules())
    total = 0
    for name, rank in config.items():
        layer = modules[name]
        total += int(rank) * (layer.in_features + layer.out_features)
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", type=int, default=256, help="calibration sentences")
    parser.add_argument("--held-out", type=int, default=512, help="held-out sentences")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference tool's rows")
    parser.add_argument("--calib-batch-size", type=int, default=1,
                        help="calibration sentences per batch (padded to the longest; default 1)")
    parser.add_argument("--no-mask-padding", action="store_true",
                        help="let padding tokens into our calibration statistics (Decompose(mask_padding=False))")
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME",
                        help="run only the rows whose name contains one of these words (e.g. data-aware budget)")
    args = parser.parse_args(argv)

    import torch

    from lowrank_ir import Decompose, count_parameters

    logging.disable(logging.INFO)  # the reference logs every calibration batch

    tokenizer, model = minilm.load()
    calibration, held_out = text.split(args.calibration, args.held_out)
    calib = minilm.batches(tokenizer, calibration, batch_size=args.calib_batch_size)
    held = minilm.batches(tokenizer, held_out, batch_size=32)
    original = minilm.embed(model, held)
    config = Decompose(model).from_dict(minilm.ENCODER_RULES).decompose_config
    mask_padding = not args.no_mask_padding

    def ours() -> Decompose:
        return Decompose(model, mask_padding=mask_padding)

    assert config is not None
    budget = _weights_after(config, model)
    encoder = r"^encoder\.layer\.\d+\."

    rows: list[tuple[str, Callable[[], Any]]] = []
    if not args.no_reference:
        from msmodelslim.pytorch.low_rank_decompose import Decompose as Reference

        rows += [
            ("reference data-free", lambda: Reference(model).from_dict(minilm.ENCODER_RULES).decompose_network()),
            ("reference data-aware",
             lambda: Reference(model).from_dict(minilm.ENCODER_RULES).decompose_network(datasets=calib)),
        ]
    budgeted: dict[str, Decompose] = {}

    def budget_allocation(estimate: str) -> Decompose:
        if estimate not in budgeted:
            budgeted[estimate] = ours().from_budget(params=budget, include=encoder, divisor=16, datasets=calib,
                                                    estimate=estimate)
        return budgeted[estimate]

    rows += [
        ("ours data-free", lambda: ours().from_dict(minilm.ENCODER_RULES).decompose_network()),
        ("ours data-aware", lambda: ours().from_dict(minilm.ENCODER_RULES).decompose_network(datasets=calib)),
        ("ours sequential", lambda: ours().from_dict(minilm.ENCODER_RULES)
         .decompose_network(datasets=calib, sequential=True)),
        ("ours budget, spectral", lambda: budget_allocation("spectral").decompose_network(datasets=calib)),
        ("ours budget, measured", lambda: budget_allocation("measured").decompose_network(datasets=calib)),
        ("ours budget, measured, seq.", lambda: budget_allocation("measured")
         .decompose_network(datasets=calib, sequential=True)),
    ]
    if args.only:
        rows = [(name, make) for name, make in rows if any(word in name for word in args.only)]
    print(f"all-MiniLM-L6-v2: {len(calibration)} calibration sentences in batches of {args.calib_batch_size} "
          f"(padding {'counted' if args.no_mask_padding else 'left out'}) / {len(held_out)} held-out sentences; "
          f"encoder Linear weights after decomposition: {budget:,}; torch threads {torch.get_num_threads()}")
    print(f"{'method':<28} {'mean cos':>9} {'min cos':>9} {'params':>12} {'seconds':>9}")
    for name, make in rows:
        start = time.perf_counter()
        decomposed = make()
        seconds = time.perf_counter() - start
        cosine = (minilm.embed(decomposed, held) * original).sum(1)
        print(f"{name:<28} {float(cosine.mean()):9.4f} {float(cosine.min()):9.4f} "
              f"{count_parameters(decomposed):12,} {seconds:9.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
