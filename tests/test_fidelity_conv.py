"""Data-aware Tucker-2 of k x k convs under the exact im2col output error (patch moments)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional

from frontends import torch as torch_frontend
from lowrank_ir import Decompose, Policy, plan, rewrite
from lowrank_ir import _linalg as linalg


def smooth_images(count: int, channels: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Spatially smooth images with correlated channels and a non-zero mean (neighbouring taps correlate)."""
    noise = torch.randn(count, channels, size + 4, size + 4, generator=generator)
    blur = torch.ones(channels, 1, 5, 5) / 25.0
    smooth = functional.conv2d(noise, blur, groups=channels)
    mixing = torch.randn(channels, channels, generator=generator) * torch.logspace(0, -1.5, channels)
    return torch.einsum("nchw,cd->ndhw", smooth, mixing) + 0.5


def patch_moment(images: np.ndarray, kernel: tuple[int, int], padding: int) -> np.ndarray:
    columns = functional.unfold(torch.from_numpy(images), kernel, padding=padding)
    rows = columns.transpose(1, 2).reshape(-1, columns.shape[1]).double().numpy()
    return rows.T @ rows / len(rows)


def weighted_error(kernel: np.ndarray, approx: np.ndarray, moment: np.ndarray) -> float:
    delta = (kernel - approx).reshape(kernel.shape[0], -1)
    return float(np.sum((delta @ moment) * delta))


# ------------------------------------------------------------------------------------ refit_tucker2


def test_refit_matches_the_formula() -> None:
    rng = np.random.default_rng(0)
    out, inp, taps, rank_in, rank_out = 7, 5, 9, 3, 4
    kernel = rng.standard_normal((out, inp, 3, 3))
    first = rng.standard_normal((rank_in, inp))
    samples = rng.standard_normal((400, inp * taps)) @ rng.standard_normal((inp * taps, inp * taps))
    moment = samples.T @ samples / len(samples)
    last, core = linalg.refit_tucker2(kernel, first, rank_out, moment, damping=0.0)

    projection = np.kron(first, np.eye(taps))
    gram = projection @ moment @ projection.T
    solved = kernel.reshape(out, -1) @ moment @ projection.T @ np.linalg.inv(gram)
    _, vectors = np.linalg.eigh(solved @ gram @ solved.T)
    basis = vectors[:, ::-1][:, :rank_out]
    np.testing.assert_allclose(last @ core.reshape(rank_out, -1), basis @ basis.T @ solved, atol=1e-9)
    np.testing.assert_allclose(last.T @ last, np.eye(rank_out), atol=1e-12)
    assert core.shape == (rank_out, rank_in, 3, 3)
    assert np.all(last[np.argmax(np.abs(last), axis=0), np.arange(rank_out)] > 0)
    again = linalg.refit_tucker2(kernel, first, rank_out, moment, damping=0.0)
    np.testing.assert_array_equal(again[0], last)
    np.testing.assert_array_equal(again[1], core)


@pytest.mark.parametrize("ranks", [(4, 3), (8, 2), (12, 6)])
def test_refit_never_loses_to_the_channel_whitened_tucker2(ranks: tuple[int, int]) -> None:
    generator = torch.Generator().manual_seed(1)
    images = smooth_images(16, 8, 12, generator).numpy()
    torch.manual_seed(2)
    kernel = nn.Conv2d(8, 12, 3).weight.detach().double().numpy()
    channels = np.moveaxis(images, 1, -1).reshape(-1, 8).astype(np.float64)
    moment = patch_moment(images, (3, 3), 1)
    last, core, first = linalg.tucker2(kernel, ranks[0], ranks[1], moment=channels.T @ channels / len(channels))
    refit_last, refit_core = linalg.refit_tucker2(kernel, first, ranks[0], moment)
    channel_error = weighted_error(kernel, linalg.reconstruct_tucker2(last, core, first), moment)
    refit_error = weighted_error(kernel, linalg.reconstruct_tucker2(refit_last, refit_core, first), moment)
    assert refit_error <= channel_error * (1 + 1e-9)


def test_refit_validation() -> None:
    kernel, first = np.ones((4, 3, 3, 3)), np.ones((2, 3))
    with pytest.raises(ValueError, match="patch_moment must have shape"):
        linalg.refit_tucker2(kernel, first, 2, np.eye(9))
    with pytest.raises(ValueError, match=r"first must be \[r_in, 3\]"):
        linalg.refit_tucker2(kernel, np.ones((2, 4)), 2, np.eye(27))
    with pytest.raises(ValueError, match="rank_out=5 is out of range"):
        linalg.refit_tucker2(kernel, first, 5, np.eye(27))
    with pytest.raises(ValueError, match="damping"):
        linalg.refit_tucker2(kernel, first, 2, np.eye(27), damping=-1.0)


# ------------------------------------------------------------------------------------ torch path


class Net(nn.Module):
    def __init__(self, padding: int | str = 1, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, padding=padding, stride=stride, dilation=dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _conv_output(graph, x: torch.Tensor, stride: int = 1, padding: int | str = 1, dilation: int = 1) -> torch.Tensor:
    params = graph.params
    kernel = linalg.reconstruct_tucker2(params["conv.2.weight"][:, :, 0, 0], params["conv.1.weight"],
                                        params["conv.0.weight"][:, :, 0, 0])
    return functional.conv2d(x.double(), torch.from_numpy(kernel), torch.from_numpy(params["conv.2.bias"]).double(),
                             stride=stride, padding=padding, dilation=dilation)


@pytest.mark.parametrize(("padding", "stride", "dilation"), [(1, 1, 1), (0, 2, 1), ("same", 1, 2), (2, 1, 2)])
def test_patch_moment_is_the_moment_of_what_the_conv_sees(padding, stride, dilation) -> None:
    generator = torch.Generator().manual_seed(3)
    model = Net(padding, stride, dilation).eval()
    images = smooth_images(4, 8, 11, generator)
    graph = torch_frontend.lower(model)
    stats = torch_frontend.collect_stats(model, graph, [images])["conv"]
    assert stats.patch_moment is not None
    # The conv's output from the patches equals the conv itself, so the moment is over the same patches.
    kernel = model.conv.weight.detach().double().reshape(16, -1).numpy()
    out = model(images).detach().double() - model.conv.bias.detach().double()[:, None, None]
    flat = out.permute(0, 2, 3, 1).reshape(-1, 16).numpy()
    np.testing.assert_allclose(kernel @ stats.patch_moment @ kernel.T, flat.T @ flat / len(flat), rtol=1e-4, atol=1e-6)
    assert stats.count == 4 * 11 * 11


def test_patch_moments_beat_the_channel_moment_on_held_out_outputs() -> None:
    generator = torch.Generator().manual_seed(4)
    model = Net().eval()
    calibration, held_out = smooth_images(32, 8, 12, generator), smooth_images(16, 8, 12, generator)
    graph = torch_frontend.lower(model)
    stats = torch_frontend.collect_stats(model, graph, [calibration[:16], calibration[16:]])
    channel_only = {name: dataclasses.replace(layer, patch_moment=None) for name, layer in stats.items()}
    chosen = plan(graph, Policy.config({"conv": [6, 3]}))
    with_patches = rewrite(graph, chosen, stats=stats)
    without = rewrite(graph, chosen, stats=channel_only)
    reference = model(held_out).detach().double()

    def error(result) -> float:
        return float(torch.linalg.norm(_conv_output(result.graph, held_out) - reference) / torch.linalg.norm(reference))

    assert error(with_patches) < 0.9 * error(without)
    # The engine's figure is the im2col output error on the calibration data, relative to ‖K p‖ (no bias).
    calibration_out = model(calibration).detach().double()
    bias = model.conv.bias.detach().double()[:, None, None]
    exact = float(torch.linalg.norm(_conv_output(with_patches.graph, calibration) - calibration_out)
                  / torch.linalg.norm(calibration_out - bias))
    figure, kind = with_patches.errors["conv"]
    assert kind == "output"
    assert figure == pytest.approx(exact, rel=0.2)


def test_full_rank_conv_still_reproduces_its_outputs() -> None:
    generator = torch.Generator().manual_seed(5)
    model = Net().eval()
    calibration = smooth_images(8, 8, 10, generator)
    graph = torch_frontend.lower(model)
    stats = torch_frontend.collect_stats(model, graph, [calibration])
    assert stats["conv"].patch_moment is not None
    result = rewrite(graph, plan(graph, Policy.config({"conv": [16, 8]})), stats=stats)
    x = smooth_images(4, 8, 10, generator)
    expected = model(x).detach().double()
    assert float(torch.linalg.norm(_conv_output(result.graph, x) - expected) / torch.linalg.norm(expected)) < 1e-4
    assert result.errors["conv"][0] < 1e-4


def test_decompose_uses_patch_moments_end_to_end() -> None:
    generator = torch.Generator().manual_seed(6)
    model = Net().eval()
    calibration, held_out = smooth_images(16, 8, 12, generator), smooth_images(8, 8, 12, generator)
    aware = Decompose(model).from_fixed(4, divisor=1).decompose_network(datasets=[calibration])
    free = Decompose(model).from_fixed(4, divisor=1).decompose_network()
    expected = model(held_out).detach()

    def error(decomposed: nn.Module) -> float:
        return float(torch.linalg.norm(decomposed(held_out).detach() - expected) / torch.linalg.norm(expected))

    assert error(aware) < error(free)


# ------------------------------------------------------------------------------------ ONNX path


@pytest.mark.parametrize(("pads", "strides", "dilations", "auto_pad"),
                         [(None, 1, 1, None), ([0, 1, 2, 1], 2, 1, None), (None, 1, 2, None),
                          (None, 2, 1, "SAME_UPPER"), (None, 2, 1, "SAME_LOWER"), (None, 1, 1, "VALID")])
def test_onnx_patch_moment_is_the_moment_of_what_the_conv_sees(pads, strides, dilations, auto_pad) -> None:
    from frontends import onnx as onnx_frontend
    from tests import onnx_models

    rng = np.random.default_rng(7)
    model = onnx_models.conv(rng, channels=(6, 10), pads=pads, strides=strides, dilations=dilations,
                             auto_pad=auto_pad, spatial=11)
    graph = onnx_frontend.lower(model)
    name = graph.layers()[0].name
    x = smooth_images(3, 6, 11, torch.Generator().manual_seed(8)).numpy()
    stats = onnx_frontend.collect_stats(model, graph, [{"x": x}])[name]
    assert stats.patch_moment is not None
    weight = graph.param(graph.node(name), "weight")
    assert weight is not None
    kernel = weight.astype(np.float64).reshape(10, -1)
    bias = graph.param(graph.node(name), "bias")
    assert bias is not None
    out = onnx_models.run(model, {"x": x})[0].astype(np.float64) - bias[:, None, None]
    flat = np.moveaxis(out, 1, -1).reshape(-1, 10)
    np.testing.assert_allclose(kernel @ stats.patch_moment @ kernel.T, flat.T @ flat / len(flat), rtol=1e-4, atol=1e-5)
