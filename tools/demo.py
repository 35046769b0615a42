"""``lowrank demo``: the main job on a built-in model, end to end, in a few seconds.

Builds a small CNN + MLP (seeded, no downloads) in PyTorch or MindSpore (``--framework``; the same
weights and inputs in both, drawn with numpy), decomposes it at ratio 0.5 data-free and data-aware,
prints the per-layer table and totals and how closely each decomposed model follows the original,
and saves the decomposed weights (state dict / ``.ckpt``), the config and the report in ``--out``.
"""

from __future__ import annotations

import logging
import secrets
import tempfile
from pathlib import Path
from typing import Any, TextIO

import numpy as np

__all__ = ["demo_inputs", "demo_model", "demo_weights", "ms_demo_model", "run_demo"]

logger = logging.getLogger(__name__)


#: The demo model's layers: name -> (kind, in, out); ReLUs follow every layer but the last.
LAYERS = {"stem": ("conv", 1, 32), "conv1": ("conv", 32, 64), "conv2": ("conv", 64, 128),
          "fc1": ("linear", 512, 256), "fc2": ("linear", 256, 10)}


def demo_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """The demo model's weights, drawn with numpy so that every framework's twin holds the same ones.

    PyTorch's default initialisation: uniform in +-1/sqrt(fan_in) for weights and biases.
    """
    rng = np.random.default_rng(seed)
    weights = {}
    for name, (kind, fan_in_channels, out) in LAYERS.items():
        shape = (out, fan_in_channels, 3, 3) if kind == "conv" else (out, fan_in_channels)
        bound = 1 / np.sqrt(np.prod(shape[1:]))
        weights[f"{name}.weight"] = rng.uniform(-bound, bound, shape).astype(np.float32)
        weights[f"{name}.bias"] = rng.uniform(-bound, bound, out).astype(np.float32)
    return weights


def demo_model(seed: int = 0) -> Any:
    """A small CNN + MLP classifier for 1x28x28 images (a ResNet-style stem, two convs, two Linear)."""
    import torch
    from torch import nn

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
    model.load_state_dict({name: torch.from_numpy(array) for name, array in demo_weights(seed).items()})
    return model.eval()


def ms_demo_model(seed: int = 0) -> Any:
    """The MindSpore twin of :func:`demo_model`: same cell names, same weights, same outputs."""
    from collections import OrderedDict

    import mindspore as ms
    from mindspore import nn

    model = nn.SequentialCell(OrderedDict([
        ("stem", nn.Conv2d(1, 32, 3, pad_mode="pad", padding=1, has_bias=True)),
        ("act0", nn.ReLU()),
        ("conv1", nn.Conv2d(32, 64, 3, stride=2, pad_mode="pad", padding=1, has_bias=True)),
        ("act1", nn.ReLU()),
        ("conv2", nn.Conv2d(64, 128, 3, stride=2, pad_mode="pad", padding=1, has_bias=True)),
        ("act2", nn.ReLU()),
        ("pool", nn.AdaptiveAvgPool2d(2)),
        ("flatten", nn.Flatten()),
        ("fc1", nn.Dense(512, 256)),
        ("act3", nn.ReLU()),
        ("fc2", nn.Dense(256, 10)),
    ]))
    weights = demo_weights(seed)
    for param in model.get_parameters():
        param.set_data(ms.Tensor(weights[param.name]))
    model.set_train(False)
    return model


def demo_inputs(count: int, seed: int) -> np.ndarray:
    """Smooth, correlated ``[count, 1, 28, 28]`` float32 images (white noise through a 5x5 box filter).

    What real images look like to a first conv, unlike white noise.
    """
    noise = np.random.default_rng(seed).standard_normal((count, 1, 28, 28))
    padded = np.pad(noise, ((0, 0), (0, 0), (2, 2), (2, 2)))
    smooth = sum(padded[:, :, i:i + 28, j:j + 28] for i in range(5) for j in range(5)) / 25
    return np.asarray(smooth, dtype=np.float32)


class _Native:
    """What the demo needs from a framework: the model, tensors, a forward pass to numpy, saving."""

    name = saved = recipe = ""

    def model(self) -> Any:
        raise NotImplementedError

    def tensor(self, array: np.ndarray) -> Any:
        raise NotImplementedError

    def run(self, model: Any, array: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def save(self, model: Any, path: Path) -> None:
        raise NotImplementedError


class _Torch(_Native):
    """What the demo needs from PyTorch."""

    name, saved = "torch", "state_dict.safetensors"
    recipe = "then load_state_dict(safetensors.torch.load_file('state_dict.safetensors'))"

    def __init__(self) -> None:
        import torch

        self.torch = torch

    def model(self) -> Any:
        return demo_model()

    def tensor(self, array: np.ndarray) -> Any:
        return self.torch.from_numpy(array)

    def run(self, model: Any, array: np.ndarray) -> np.ndarray:
        with self.torch.no_grad():
            return model(self.tensor(array)).numpy().astype(np.float64)

    def save(self, model: Any, path: Path) -> None:
        from backends.torch import save_weights

        save_weights(model, path)


class _MindSpore(_Native):
    """What the demo needs from MindSpore (PyNative mode)."""

    name, saved = "mindspore", "decomposed.ckpt"
    recipe = "then load_param_into_net(model, load_checkpoint('decomposed.ckpt'))"

    def __init__(self) -> None:
        import mindspore

        self.ms = mindspore

    def model(self) -> Any:
        return ms_demo_model()

    def tensor(self, array: np.ndarray) -> Any:
        return self.ms.Tensor(array)

    def run(self, model: Any, array: np.ndarray) -> np.ndarray:
        return model(self.tensor(array)).asnumpy().astype(np.float64)

    def save(self, model: Any, path: Path) -> None:
        self.ms.save_checkpoint(model, str(path))


FRAMEWORKS: dict[str, type[_Native]] = {"torch": _Torch, "mindspore": _MindSpore}


def _agreement(reference: np.ndarray, output: np.ndarray) -> dict[str, float]:
    relative = float(np.linalg.norm(output - reference) / np.linalg.norm(reference))
    norms = np.linalg.norm(output, axis=1) * np.linalg.norm(reference, axis=1)
    cosine = float(np.mean(np.sum(output * reference, axis=1) / np.maximum(norms, 1e-12)))
    top1 = float(np.mean(output.argmax(1) == reference.argmax(1)))
    return {"relative_error": relative, "cosine": cosine, "top1_agreement": top1}


def run_demo(out: str | None = None, ratio: float = 0.5, framework: str = "torch", divisor: int = 16,
             stream: TextIO | None = None, force: bool = False) -> Path:
    """Run the demo; return the folder holding the decomposed weights, the config and the report.

    The weights are ``state_dict.safetensors`` for PyTorch, ``decomposed.ckpt`` for MindSpore. Both frameworks run
    the same model with the same weights and inputs, so they print the same table. ``out`` is created, or
    an existing folder receives the three files (files of those names are replaced only with ``force``);
    they appear together when the demo has finished, or not at all.
    """
    import sys

    from lowrank_ir import Decompose, SafeWriteUmask, count_parameters, write_json
    from lowrank_ir._files import Outputs
    from lowrank_ir._report import report_document

    if framework not in FRAMEWORKS:
        raise ValueError(f"unknown framework {framework!r}; the demo runs with: {', '.join(FRAMEWORKS)}")
    native = FRAMEWORKS[framework]()
    stream = stream or sys.stdout
    outputs = Outputs(force=force)
    given = out if out is not None else Path(tempfile.gettempdir()) / f"lowrank-demo-{secrets.token_hex(4)}"
    folder = outputs.folder(given, [native.saved, "decompose_config.json", "report.json"], "--out")
    outputs.check()
    model = native.model()
    calibration = [native.tensor(demo_inputs(64, seed)) for seed in range(8)]
    held_out = demo_inputs(256, seed=100)

    with outputs.writing() as stage:
        decomposer = Decompose(model, config_file=stage.path(folder / "decompose_config.json"))
        decomposer.from_ratio(ratio, divisor=divisor)
        data_free = decomposer.decompose_network()
        free_report = decomposer.report
        data_aware = decomposer.decompose_network(datasets=calibration)
        assert decomposer.report is not None and free_report is not None
        print(f"lowrank demo ({native.name}): a small CNN + MLP, decomposed at ratio {ratio} (ranks rounded to "
              f"multiples of {divisor})\n", file=stream)
        print(decomposer.report.table(), file=stream)
        print(f"\nparameters: {count_parameters(model):,} -> {count_parameters(data_aware):,}", file=stream)
        print("\nagreement with the original on 256 held-out inputs:", file=stream)
        reference = native.run(model, held_out)
        rows = {"data-free": _agreement(reference, native.run(data_free, held_out)),
                "data-aware": _agreement(reference, native.run(data_aware, held_out))}
        for mode, figures in rows.items():
            print(f"  {mode:<10}  relative error {figures['relative_error']:.4f}   cosine {figures['cosine']:.4f}"
                  f"   top-1 agreement {figures['top1_agreement']:.1%}", file=stream)
        with SafeWriteUmask():
            native.save(data_aware, stage.path(folder / native.saved))
        document = report_document(decomposer.report, spectra=decomposer.spectra(),
                                   policy={"kind": "ratio", "value": ratio, "divisor": divisor},
                                   model=f"the demo's small CNN + MLP ({native.name})", framework=native.name,
                                   data_aware=True, agreement=rows)
        write_json(stage.path(folder / "report.json"), document)
    print(f"\nsaved {native.saved}, decompose_config.json and report.json in {given}", file=stream)
    print("rebuild it with Decompose(model, config_file=...).from_file()"
          f".decompose_network(do_decompose_weight=False), {native.recipe}", file=stream)
    return folder
