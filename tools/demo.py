"""``lowrank demo``: the main job on a built-in model, end to end, in a few seconds.

Builds a small CNN + MLP (seeded, no downloads), decomposes it at ratio 0.5 data-free and data-aware,
prints the per-layer table and totals and how closely each decomposed model follows the original,
and saves the decomposed state dict, the config and the report in ``--out``.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, TextIO

__all__ = ["demo_model", "run_demo"]

logger = logging.getLogger(__name__)


def demo_model(seed: int = 0) -> Any:
    """A small CNN + MLP classifier for 1x28x28 images (a ResNet-style stem, two convs, two Linear)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    model = nn.Sequential()
    model.add_module("stem", nn.Conv2d(1, 32, 3, padding=1))
    model.add_module("act0", nn.ReLU())
    model.add_module("conv1", nn.Conv2d(32, 64, 3, stride=2, padding=1))
    model.add_module("act1", nn.ReLU())
    model.add_module("conv2", nn.Conv2d(64, 128, 3, stride=2, padding=1))
    model.add_module("act2", nn.ReLU())
    model.add_module("pool", nn.AdaptiveAvgPool2d(2))
    model.add_module("flatten", nn.Flatten())
    model.add_module("fc1", nn.Linear(512, 256))
    model.add_module("act3", nn.ReLU())
    model.add_module("fc2", nn.Linear(256, 10))
    return model.eval()


def _inputs(count: int, seed: int) -> Any:
    """Smooth, correlated images: what real images look like to a first conv, unlike white noise."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(count, 1, 28, 28, generator=generator)
    kernel = torch.ones(1, 1, 5, 5) / 25
    return torch.nn.functional.conv2d(noise, kernel, padding=2)


def _agreement(original: Any, decomposed: Any, inputs: Any) -> dict[str, float]:
    import torch

    with torch.no_grad():
        reference, output = original(inputs), decomposed(inputs)
    relative = float((output - reference).norm() / reference.norm())
    cosine = float(torch.nn.functional.cosine_similarity(output, reference, dim=1).mean())
    top1 = float((output.argmax(1) == reference.argmax(1)).float().mean())
    return {"relative_error": relative, "cosine": cosine, "top1_agreement": top1}


def run_demo(out: str | None = None, ratio: float = 0.5, framework: str = "torch", divisor: int = 16,
             stream: TextIO | None = None) -> Path:
    """Run the demo; return the folder holding ``state_dict.pt``, ``decompose_config.json``, ``report.json``."""
    import sys

    import torch

    from lowrank_ir import Decompose, SafeWriteUmask, count_parameters, write_json

    if framework != "torch":
        raise ValueError(f"unknown framework {framework!r}; the demo runs with: torch")
    stream = stream or sys.stdout
    folder = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="lowrank-demo-"))
    folder.mkdir(parents=True, exist_ok=True)
    model = demo_model()
    calibration = [_inputs(64, seed) for seed in range(8)]
    held_out = _inputs(256, seed=100)

    decomposer = Decompose(model, config_file=folder / "decompose_config.json").from_ratio(ratio, divisor=divisor)
    data_free = decomposer.decompose_network()
    free_report = decomposer.report
    data_aware = decomposer.decompose_network(datasets=calibration)
    assert decomposer.report is not None and free_report is not None
    print(f"lowrank demo: a small CNN + MLP, decomposed at ratio {ratio} (ranks rounded to multiples of "
          f"{divisor})\n", file=stream)
    print(decomposer.report.table(), file=stream)
    print(f"\nparameters: {count_parameters(model):,} -> {count_parameters(data_aware):,}", file=stream)
    print("\nagreement with the original on 256 held-out inputs:", file=stream)
    rows = {"data-free": _agreement(model, data_free, held_out),
            "data-aware": _agreement(model, data_aware, held_out)}
    for mode, figures in rows.items():
        print(f"  {mode:<10}  relative error {figures['relative_error']:.4f}   cosine {figures['cosine']:.4f}"
              f"   top-1 agreement {figures['top1_agreement']:.1%}", file=stream)
    with SafeWriteUmask():
        torch.save(data_aware.state_dict(), folder / "state_dict.pt")
    write_json(folder / "report.json", {"ratio": ratio, "agreement": rows, **decomposer.report.to_dict()})
    print(f"\nsaved state_dict.pt, decompose_config.json and report.json in {folder}", file=stream)
    print("rebuild it with Decompose(model, config_file=...).from_file()"
          ".decompose_network(do_decompose_weight=False), then load_state_dict", file=stream)
    return folder
