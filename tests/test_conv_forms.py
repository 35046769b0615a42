"""Two-factor forms of a k x k conv: spatial SVD (kh x 1 then 1 x kw) and channel SVD (k x k to r, then 1x1).

The math (``lowrank_ir._conv_forms``) is checked against its formulas; the forms are then written by the
engine (``with_forms`` + ``rewrite``) and built by every backend, whose outputs must equal the original at
full rank and the model holding the multiplied-out kernel at a truncated rank.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from onnx import numpy_helper

from lowrank_ir import Policy, plan, rewrite, with_forms
from lowrank_ir._conv_forms import (
    channel_factors,
    channel_kernel,
    channel_matrix,
    channel_params,
    spatial_column_moment,
    spatial_factors,
    spatial_kernel,
    spatial_matrix,
    spatial_params,
    spatial_refit_horizontal,
    spatial_row_moment,
    whitened_spatial_factors,
)
from lowrank_ir._engine import SPATIAL_SVD, SVD, approximations
from tests import onnx_models as om

FORMS = [SVD, SPATIAL_SVD]


def _kernel(seed: int, shape: tuple[int, ...] = (12, 8, 3, 5)) -> np.ndarray:
    return om.decaying(np.random.default_rng(seed), shape).astype(np.float64)


def _assert_truncated_svd_error(kernel: np.ndarray, approx: np.ndarray, matrix: np.ndarray, rank: int,
                                error: float) -> None:
    """The reported and the actual error of ``approx`` are ``sqrt(Σ_{i>r} s_i² / Σ s_i²)`` of ``matrix``."""
    values = np.linalg.svd(matrix, compute_uv=False)
    expected = np.sqrt(np.sum(values[rank:] ** 2) / np.sum(values ** 2))
    assert error == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert np.linalg.norm(kernel - approx) / np.linalg.norm(kernel) == pytest.approx(expected, rel=1e-6, abs=1e-9)


# ------------------------------------------------------------------------------------------ the formulas

def test_spatial_matrix_places_each_entry_as_the_formula_says() -> None:
    kernel = _kernel(0)
    matrix = spatial_matrix(kernel)
    out, inp, height, width = kernel.shape
    assert matrix.shape == (inp * height, out * width)
    for o, c, i, j in [(0, 0, 0, 0), (11, 7, 2, 4), (5, 3, 1, 2)]:
        assert matrix[c * height + i, o * width + j] == kernel[o, c, i, j]
    assert channel_matrix(kernel)[7, 3 * height * width + 1 * width + 2] == kernel[7, 3, 1, 2]


def _spatial_term_by_term(vertical: np.ndarray, horizontal: np.ndarray) -> np.ndarray:
    """K'[o, c, i, j] = Σ_s vertical[s, c, i] horizontal[o, s, j], one s at a time."""
    explicit = np.zeros((horizontal.shape[0], vertical.shape[1], vertical.shape[2], horizontal.shape[3]))
    for s in range(vertical.shape[0]):
        explicit += np.einsum("ci,oj->ocij", vertical[s, :, :, 0], horizontal[:, s, 0, :])
    return explicit


def _channel_term_by_term(first: np.ndarray, last: np.ndarray) -> np.ndarray:
    """K'[o, c, i, j] = Σ_s last[o, s] first[s, c, i, j]."""
    return np.einsum("os,scij->ocij", last[:, :, 0, 0], first)


@pytest.mark.parametrize(("factors", "product", "formula", "matrix", "shapes"), [
    (spatial_factors, spatial_kernel, _spatial_term_by_term, spatial_matrix, ((8, 3, 1), (12, 1, 5))),
    (channel_factors, channel_kernel, _channel_term_by_term, channel_matrix, ((8, 3, 5), (12, 1, 1))),
], ids=["spatial", "channel"])
@pytest.mark.parametrize("rank", [1, 4, 10])
def test_form_factors_reach_the_truncated_svd_error_of_their_matrix(factors, product, formula, matrix, shapes,
                                                                    rank) -> None:
    kernel = _kernel(rank)
    first, second, error = factors(kernel, rank)
    assert first.shape == (rank, *shapes[0]) and second.shape == (shapes[1][0], rank, *shapes[1][1:])
    approx = product(first, second)
    np.testing.assert_allclose(approx, formula(first, second), rtol=1e-12, atol=1e-12)
    _assert_truncated_svd_error(kernel, approx, matrix(kernel), rank, error)


def test_full_rank_forms_are_exact_and_the_factors_deterministic() -> None:
    kernel = _kernel(3)
    np.testing.assert_allclose(spatial_kernel(*spatial_factors(kernel, 24)[:2]), kernel, atol=1e-10)
    np.testing.assert_allclose(channel_kernel(*channel_factors(kernel, 12)[:2]), kernel, atol=1e-10)
    for first, second in zip(spatial_factors(kernel, 5), spatial_factors(kernel.copy(), 5), strict=True):
        np.testing.assert_array_equal(first, second)


def test_parameter_counts_follow_the_formulas() -> None:
    assert spatial_params((12, 8, 3, 5), 4) == 4 * (8 * 3 + 12 * 5)
    assert channel_params((12, 8, 3, 5), 4) == 4 * (8 * 15 + 12)
    assert channel_params((12, 8, 3), 4) == 4 * (8 * 3 + 12)


def test_spatial_svd_refuses_a_kernel_that_is_not_2d() -> None:
    with pytest.raises(ValueError, match=r"4-D \[out, in, kh, kw\], got shape \[12, 8, 3\]"):
        spatial_matrix(np.zeros((12, 8, 3)))


# ------------------------------------------------------------------------------------------ the engine

def _onnx_model(pads: list[int] | None = None, auto_pad: str | None = None) -> object:
    return om.conv(np.random.default_rng(4), channels=(8, 12), kernel=3, pads=pads, strides=2, auto_pad=auto_pad,
                   spatial=11)


def test_with_forms_refuses_what_a_layer_cannot_take() -> None:
    from frontends.onnx import lower

    graph = lower(_onnx_model())
    chosen = plan(graph, Policy.fixed(4, divisor=1))
    with pytest.raises(ValueError, match=r"'conv' \(weight \[12, 8, 3, 3\]\) takes 'spatial_svd' ranks 1 \.\. 24, "
                                         r"got 25"):
        with_forms(chosen, {"conv": (SPATIAL_SVD, 25)})
    with pytest.raises(ValueError, match=r"cannot take form 'cp': conv layers take one of 'svd', 'spatial_svd'"):
        with_forms(chosen, {"conv": ("cp", 4)})
    with pytest.raises(ValueError, match=r"names 'fc', which the plan does not decompose"):
        with_forms(chosen, {"fc": (SVD, 4)})
    assert chosen.entries["conv"].form == "tucker2"  # the plan given is not changed


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("padding", [{"pads": [0, 1, 2, 1]}, {"auto_pad": "SAME_UPPER"}, {}])
def test_onnx_forms_compute_the_multiplied_out_kernel(form, padding) -> None:
    from backends.onnx import build
    from frontends.onnx import lower

    model = _onnx_model(**padding)
    graph = lower(model)
    feeds = {"x": np.random.default_rng(5).standard_normal((2, 8, 11, 11)).astype(np.float32)}
    for rank, exact in ((24 if form == SPATIAL_SVD else 12, True), (3, False)):
        chosen = with_forms(plan(graph, Policy.fixed(4, divisor=1)), {"conv": (form, rank)})
        result = rewrite(graph, chosen)
        assert [node.name for node in result.graph.nodes] == ["conv.0", "conv.1"]
        decomposed = build(result.graph, like=model)
        reference = copy.deepcopy(model)
        if not exact:  # the original model holding the kernel the factors multiply out to
            arrays = approximations(graph, chosen)["conv"]
            for init in reference.graph.initializer:
                if init.name in arrays:
                    init.CopyFrom(numpy_helper.from_array(arrays[init.name].astype(np.float32), init.name))
        np.testing.assert_allclose(om.run(decomposed, feeds)[0], om.run(reference, feeds)[0], rtol=1e-4, atol=1e-4)
        error = result.errors["conv"][0]
        assert (error < 1e-5) if exact else (error > 1e-3)


def _torch_model():
    torch = pytest.importorskip("torch")
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(8, 16, 3, stride=(2, 1), padding=1), nn.ReLU(),
                         nn.Conv2d(16, 12, (5, 3), padding=(2, 2), dilation=(1, 2), bias=False)).eval()


@pytest.mark.parametrize("form", FORMS)
def test_torch_forms_are_sequential_chains_computing_the_multiplied_out_kernels(form) -> None:
    torch = pytest.importorskip("torch")
    from backends import torch as torch_backend
    from frontends import torch as torch_frontend

    model = _torch_model()
    graph = torch_frontend.lower(model)
    chosen = with_forms(plan(graph, Policy.fixed(4, divisor=1)), {"0": (form, 5), "2": (form, 6)})
    decomposed = torch_backend.build(rewrite(graph, chosen).graph, like=model)
    assert isinstance(decomposed[0], torch.nn.Sequential) and len(decomposed[0]) == 2
    kernels = [tuple(part.kernel_size) for part in decomposed[2]]
    assert kernels == ([(5, 1), (1, 3)] if form == SPATIAL_SVD else [(5, 3), (1, 1)])
    reference = copy.deepcopy(model)
    arrays = {name: array for layer in approximations(graph, chosen).values() for name, array in layer.items()}
    reference.load_state_dict({**reference.state_dict(), **{name: torch.from_numpy(np.ascontiguousarray(array))
                                                            for name, array in arrays.items()}})
    x = torch.randn(2, 8, 13, 11, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        np.testing.assert_allclose(decomposed(x).numpy(), reference(x).numpy(), rtol=1e-4, atol=1e-5)
    assert model[0].weight.shape == (16, 8, 3, 3)  # the user's model is not changed


@pytest.mark.parametrize("form", FORMS)
def test_mindspore_forms_compute_the_multiplied_out_kernels(form) -> None:
    ms = pytest.importorskip("mindspore")
    from mindspore import nn

    from backends import mindspore as ms_backend
    from frontends import mindspore as ms_frontend

    ms.set_seed(0)
    model = nn.SequentialCell([nn.Conv2d(8, 16, 3, stride=2, pad_mode="pad", padding=1, has_bias=True), nn.ReLU(),
                               nn.Conv2d(16, 12, 5, pad_mode="same")])
    model.set_train(False)
    graph = ms_frontend.lower(model)
    names = [node.name for node in graph.layers()]
    chosen = with_forms(plan(graph, Policy.fixed(4, divisor=1)), {names[0]: (form, 5), names[1]: (form, 6)})
    decomposed = ms_backend.build(rewrite(graph, chosen).graph, like=model)
    arrays = {name: array for layer in approximations(graph, chosen).values() for name, array in layer.items()}
    for param in model.get_parameters():  # a copy of the original holding the multiplied-out kernels
        if param.name in arrays:
            param.set_data(ms.Tensor(arrays[param.name].astype(np.float32)))
    x = ms.Tensor(np.random.default_rng(2).standard_normal((2, 8, 12, 12)).astype(np.float32))
    np.testing.assert_allclose(decomposed(x).asnumpy(), model(x).asnumpy(), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ choosing a form

def test_allocator_takes_another_form_where_it_buys_less_error_for_the_cost() -> None:
    from lowrank_ir._budget import Candidate, Form, allocate

    main = np.array([1.0, 0.6, 0.3, 0.0])  # e(r)² of the main form, r = 0 .. 3
    other = np.array([1.0, 0.1, 0.0, 0.0])  # a form that is exact at rank 2
    cand = Candidate("conv", main, lambda r: 10.0 * r, 100.0, 3,
                     forms={"spatial_svd": Form(other, lambda r: 12.0 * r, 3)})
    assert allocate([cand], 30.0, 1, convex=True) == {"conv": ("spatial_svd", 2)}
    assert allocate([cand], 15.0, 1, convex=True) == {"conv": ("spatial_svd", 1)}
    plain = Candidate("conv", main, lambda r: 10.0 * r, 100.0, 3)
    assert allocate([plain], 30.0, 1, convex=True) == {"conv": 3}
    with pytest.raises(ValueError, match="pass convex=True"):
        allocate([cand], 30.0, 1)


def separable_conv(seed: int = 0, channels: int = 96, spatial: int = 40, rank: int = 16) -> object:
    """x -> 3x3 Conv whose kernel is exactly a rank-``rank`` spatial SVD (kh x 1 then 1 x kw), with a bias."""
    from onnx import helper

    rng = np.random.default_rng(seed)
    vertical = rng.standard_normal((rank, channels, 3, 1)) / np.sqrt(3 * channels)
    horizontal = rng.standard_normal((channels, rank, 1, 3)) / np.sqrt(3 * rank)
    kernel = spatial_kernel(vertical, horizontal).astype(np.float32)
    inits = {"conv.weight": kernel, "conv.bias": rng.standard_normal(channels).astype(np.float32) * 0.1}
    node = helper.make_node("Conv", ["x", "conv.weight", "conv.bias"], ["y"], name="conv", kernel_shape=[3, 3],
                            pads=[1, 1, 1, 1])
    shape = [1, channels, spatial, spatial]
    return om.make_model([node], [om.tensor("x", shape)], [om.tensor("y", shape)], inits)


def test_latency_budget_chooses_the_form_that_is_exact_where_it_is_fast(tmp_path) -> None:
    import onnx

    from lowrank_ir import Decompose
    from tools.bench_cli import bench

    model = separable_conv()
    decomposer = Decompose(model).from_budget(latency=0.75, divisor=16)
    form, rank = decomposer.forms["conv"]
    assert form == "spatial_svd" and rank >= 16  # exact from rank 16 on
    assert decomposer.latency["layers"]["conv"]["form"] == "spatial_svd"
    assert decomposer.report["conv"].form == "spatial_svd"
    small = decomposer.decompose_network()
    assert [_kernel_shape(node) for node in small.graph.node] == [[3, 1], [1, 3]]
    feeds = {"x": np.random.default_rng(1).standard_normal((1, 96, 40, 40)).astype(np.float32)}
    expected, got = om.run(model, feeds)[0], om.run(small, feeds)[0]
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-4
    assert decomposer.report["conv"].error < 1e-4
    original, decomposed = tmp_path / "model.onnx", tmp_path / "small.onnx"
    onnx.save(model, original)
    onnx.save(small, decomposed)
    assert bench(original, decomposed, runs=20).latency_ratio <= 0.75 + 0.05


def _kernel_shape(node: object) -> list[int]:
    return next(list(attr.ints) for attr in node.attribute if attr.name == "kernel_shape")  # type: ignore[attr-defined]


def test_channel_svd_with_patch_statistics_minimises_the_output_error() -> None:
    from frontends.onnx import lower
    from lowrank_ir import LayerStats

    graph = lower(_onnx_model())
    rng = np.random.default_rng(6)
    mixing = rng.standard_normal((72, 72)) * np.logspace(0, -2, 72)  # correlated patches, ordered (in, taps)
    patches = mixing @ mixing.T
    stats = {"conv": LayerStats(np.eye(8), 1000, patch_moment=patches)}
    chosen = with_forms(plan(graph, Policy.fixed(4, divisor=1)), {"conv": (SVD, 4)})
    aware, free = rewrite(graph, chosen, stats=stats), rewrite(graph, chosen)
    kernel = graph.params["conv.weight"].astype(np.float64).reshape(12, -1)

    def output_error(result) -> float:  # sqrt(tr(D P Dᵀ) / tr(W P Wᵀ)), D = W - W'
        first, last = (result.graph.params[f"conv.{index}.weight"].astype(np.float64) for index in (0, 1))
        delta = kernel - channel_kernel(first, last).reshape(12, -1)
        return float(np.sqrt(np.sum((delta @ patches) * delta) / np.sum((kernel @ patches) * kernel)))

    assert aware.errors["conv"][1] == "output" and free.errors["conv"][1] == "weight"
    assert aware.errors["conv"][0] == pytest.approx(output_error(aware), rel=1e-3)
    assert output_error(aware) < 0.9 * output_error(free)


@pytest.mark.parametrize("form", FORMS)
def test_report_counts_the_parameters_and_multiply_adds_of_each_form(form) -> None:
    from frontends.onnx import lower
    from lowrank_ir import build_report

    graph = lower(_onnx_model(), input_shapes={"x": [1, 8, 11, 11]})  # stride 2, pads 1: 6x6 outputs
    row = build_report(graph, with_forms(plan(graph, Policy.fixed(4, divisor=1)), {"conv": (form, 5)}))["conv"]
    assert row.form == form and row.rank == 5
    assert row.params_before == 12 * 8 * 9 + 12 and row.flops_before == 2 * 12 * 8 * 9 * 36
    if form == SVD:
        assert row.params_after == channel_params((12, 8, 3, 3), 5) + 12 == 5 * (8 * 9 + 12) + 12
        assert row.flops_after == 2 * 5 * (8 * 9 + 12) * 36
    else:  # the kh x 1 conv keeps the columns: 6 rows x 12 columns (stride 2 over the width), then 6 x 6
        assert row.params_after == spatial_params((12, 8, 3, 3), 5) + 12 == 5 * (8 * 3 + 12 * 3) + 12
        assert row.flops_after == 2 * 5 * (8 * 3 * 2 + 12 * 3) * 36


def test_benchmark_mac_ratio_counts_every_layer_at_its_resolution() -> None:
    from onnx import helper

    from benchmarks.latency import mac_ratio
    from lowrank_ir import Decompose

    rng = np.random.default_rng(7)
    inits = {"big.weight": om.decaying(rng, (64, 8, 1, 1)), "small.weight": om.decaying(rng, (64, 64, 1, 1))}
    nodes = [helper.make_node("Conv", ["x", "big.weight"], ["h"], name="big", kernel_shape=[1, 1]),
             helper.make_node("MaxPool", ["h"], ["p"], kernel_shape=[8, 8], strides=[8, 8]),
             helper.make_node("Conv", ["p", "small.weight"], ["y"], name="small", kernel_shape=[1, 1])]
    model = om.make_model(nodes, [om.tensor("x", ["n", 8, "h", "w"])], [om.tensor("y", ["n", 64, "a", "b"])], inits)
    decomposer = Decompose(model).from_fixed(8, divisor=1, excludes=["big"])
    decomposer.decompose_network()
    # per sample at 64x64: big 64·8·4096 MACs (kept), small 64·64·64 -> 8·128·64
    big, small = 64 * 8 * 4096, 64 * 64 * 64
    assert mac_ratio(model, decomposer.plan, {"x": [1, 8, 64, 64]}) == pytest.approx(
        (big + 8 * 128 * 64) / (big + small))


def test_decompose_command_writes_the_form_the_latency_budget_chose(tmp_path, capsys) -> None:
    import onnx

    from tools.cli import main

    source, target = tmp_path / "separable.onnx", tmp_path / "small.onnx"
    onnx.save(separable_conv(), source)
    assert main(["decompose", str(source), "-o", str(target), "--budget-latency", "0.75", "--divisor", "16"]) == 0, \
        capsys.readouterr().err
    assert [_kernel_shape(node) for node in onnx.load(str(target)).graph.node] == [[3, 1], [1, 3]]


# ------------------------------------------------------------------------------------------ data-aware spatial SVD

def _patches(seed: int, shape: tuple[int, ...], rows: int = 4000) -> np.ndarray:
    """``rows`` correlated im2col patches for a kernel of ``shape``, ordered ``(in, kh, kw)`` like the frontends'."""
    rng = np.random.default_rng(seed)
    size = int(np.prod(shape[1:]))
    mixing = rng.standard_normal((size, size)) * np.logspace(0, -2, size)
    return rng.standard_normal((rows, size)) @ mixing.T


def _exact_output_error(kernel: np.ndarray, approx: np.ndarray, moment: np.ndarray) -> float:
    """The conv's relative output error ``sqrt(tr(D P Dᵀ) / tr(K P Kᵀ))``, ``D = K - K'`` as ``[out, in·kh·kw]``."""
    full, delta = kernel.reshape(len(kernel), -1), (kernel - approx).reshape(len(kernel), -1)
    return float(np.sqrt(np.sum((delta @ moment) * delta) / np.sum((full @ moment) * full)))


def test_column_moment_is_the_moment_of_the_vertical_convs_input_columns() -> None:
    shape = (12, 8, 3, 5)
    patches = _patches(0, shape, rows=200)
    columns = patches.reshape(200, 8, 3, 5).transpose(0, 3, 1, 2).reshape(200 * 5, 8 * 3)  # one row per (patch, j)
    np.testing.assert_allclose(spatial_column_moment(patches.T @ patches / 200, shape),
                               columns.T @ columns / (200 * 5), rtol=1e-12, atol=1e-12)
    channel = np.cov(np.random.default_rng(1).standard_normal((8, 50)))
    np.testing.assert_array_equal(spatial_row_moment(channel, 3).reshape(8, 3, 8, 3),
                                  np.einsum("ab,ij->aibj", channel, np.eye(3)))


def test_whitening_by_the_identity_is_the_data_free_fit() -> None:
    kernel = _kernel(2)
    vertical, horizontal, _ = spatial_factors(kernel, 6)
    whitened = whitened_spatial_factors(kernel, 6, np.eye(8 * 3))
    np.testing.assert_allclose(spatial_kernel(*whitened), spatial_kernel(vertical, horizontal), atol=1e-12)


def test_horizontal_refit_is_the_least_squares_optimum_for_the_vertical_factor() -> None:
    shape = (12, 8, 3, 5)
    kernel = _kernel(3, shape)
    patches = _patches(4, shape, rows=500)
    moment = patches.T @ patches / 500
    vertical, start = whitened_spatial_factors(kernel, 4, spatial_column_moment(moment, shape))
    refit = spatial_refit_horizontal(kernel, vertical, moment, damping=0.0)
    # brute force: regress the layer's outputs K p on the vertical conv's outputs z = (V applied per column j)
    outputs = patches @ kernel.reshape(12, -1).T
    tapped = np.einsum("sci,ncij->nsj", vertical[..., 0], patches.reshape(500, 8, 3, 5)).reshape(500, -1)
    solution = np.linalg.lstsq(tapped, outputs, rcond=None)[0].T.reshape(12, 4, 1, 5)
    np.testing.assert_allclose(refit, solution, rtol=1e-6, atol=1e-9)
    assert _exact_output_error(kernel, spatial_kernel(vertical, refit), moment) < \
        _exact_output_error(kernel, spatial_kernel(vertical, start), moment)


@pytest.mark.parametrize("rank", [2, 6, 12])
def test_data_aware_spatial_svd_lowers_the_output_error_and_reports_it(rank) -> None:
    from frontends.onnx import lower
    from lowrank_ir import LayerStats

    graph = lower(_onnx_model())  # conv [12, 8, 3, 3], with a bias
    kernel = graph.params["conv.weight"].astype(np.float64)
    patches = _patches(5, kernel.shape)
    moment = patches.T @ patches / len(patches)
    channel = spatial_column_moment(moment, kernel.shape)[::3, ::3]  # the input-channel moment (row offset 0)
    chosen = with_forms(plan(graph, Policy.fixed(4, divisor=1)), {"conv": (SPATIAL_SVD, rank)})
    free = rewrite(graph, chosen)
    exact = rewrite(graph, chosen, stats={"conv": LayerStats(channel, len(patches), patch_moment=moment)})
    by_channel = rewrite(graph, chosen, stats={"conv": LayerStats(channel, len(patches))})

    def kernel_of(result) -> np.ndarray:
        return spatial_kernel(*(result.graph.params[f"conv.{index}.weight"].astype(np.float64) for index in (0, 1)))

    assert free.errors["conv"][1] == "weight" and exact.errors["conv"][1] == by_channel.errors["conv"][1] == "output"
    assert exact.errors["conv"][0] == pytest.approx(_exact_output_error(kernel, kernel_of(exact), moment), rel=1e-4)
    assert _exact_output_error(kernel, kernel_of(exact), moment) < 0.9 * _exact_output_error(kernel, kernel_of(free),
                                                                                            moment)
    # without patch statistics: the channel-moment estimate (every tap through the channel moment) is what drops
    rows = np.kron(np.eye(9), channel)  # that estimate as a moment over (taps, in), ordered like the transpose below

    def estimate(approx: np.ndarray) -> float:
        by_tap = (kernel - approx).transpose(0, 2, 3, 1).reshape(12, -1)
        full = kernel.transpose(0, 2, 3, 1).reshape(12, -1)
        return float(np.sqrt(np.sum((by_tap @ rows) * by_tap) / np.sum((full @ rows) * full)))

    assert by_channel.errors["conv"][0] == pytest.approx(estimate(kernel_of(by_channel)), rel=1e-4)
    assert estimate(kernel_of(by_channel)) < estimate(kernel_of(free))


def test_data_free_spatial_svd_is_the_truncated_svd_of_the_weight() -> None:
    from frontends.onnx import lower

    graph = lower(_onnx_model())
    result = rewrite(graph, with_forms(plan(graph, Policy.fixed(4, divisor=1)), {"conv": (SPATIAL_SVD, 5)}))
    vertical, horizontal, error = spatial_factors(graph.params["conv.weight"], 5)
    np.testing.assert_array_equal(result.graph.params["conv.0.weight"], vertical.astype(np.float32))
    np.testing.assert_array_equal(result.graph.params["conv.1.weight"], horizontal.astype(np.float32))
    assert result.errors["conv"] == (error, "weight")


def test_data_aware_spatial_svd_on_ppocr_det_beats_the_data_free_fit_on_other_images(tmp_path) -> None:
    """PP-OCR det's five 3x3 head convs (96 -> 24) in spatial SVD at rank 16, fitted on 4 text images."""
    from frontends import onnx as onnx_frontend
    from lowrank_ir import Decompose, write_json
    from lowrank_ir._policy import config_document

    model = onnx_frontend.load_model(om.ppocr_file("det"))
    heads = [f"p2o.Conv.{index}" for index in (49, 52, 55, 58, 61)]
    path = tmp_path / "decompose_config.json"
    write_json(path, config_document({name: [16, 16] for name in heads}, {name: (SPATIAL_SVD, 16) for name in heads}))
    free, aware = (Decompose(model, config_file=path).from_file() for _ in range(2))
    held_out = om.ppocr_feeds("det", seed=0, batch=2)
    reference = om.run(model, held_out)[0]

    def output_error(decomposed: object) -> float:
        return float(np.linalg.norm(om.run(decomposed, held_out)[0] - reference) / np.linalg.norm(reference))

    free_error = output_error(free.decompose_network())
    aware_error = output_error(aware.decompose_network(datasets=[om.ppocr_feeds("det", seed=1, batch=4)]))
    print(f"\nPP-OCR det, 5 head convs in spatial SVD at rank 16: output error on 2 other images, data-free "
          f"{free_error:.4f}, data-aware {aware_error:.4f}")
    assert all(aware.report[name].form == SPATIAL_SVD for name in heads)
    assert aware_error < 0.9 * free_error


@pytest.mark.parametrize(("form", "patch_statistics"), [(SPATIAL_SVD, False), (SPATIAL_SVD, True), (SVD, True)])
def test_the_budgets_error_curve_of_a_form_is_the_error_of_its_data_aware_fit(form, patch_statistics) -> None:
    """The latency budget's estimate (whitened tail, ``form_whitening``) is what the engine's fit reaches.

    Exactly where the fit is a whitened SVD measured under the same moment. With patch statistics the
    spatial fit is measured exactly (the estimate leaves out the columns' correlations across ``j``) and
    its horizontal factor refit: on these correlated patches it lands at or below the estimate.
    """
    from frontends.onnx import lower
    from lowrank_ir import LayerStats
    from lowrank_ir._budget import matrix_spectrum, tail_errors
    from lowrank_ir._engine import form_whitening

    graph = lower(_onnx_model())
    kernel = graph.params["conv.weight"]
    patches = _patches(6, kernel.shape)
    moment = patches.T @ patches / len(patches)
    channel = spatial_column_moment(moment, kernel.shape)[::3, ::3]
    stats = LayerStats(channel, len(patches), patch_moment=moment if patch_statistics else None)
    matrix = spatial_matrix(kernel).T if form == SPATIAL_SVD else channel_matrix(kernel)
    curve = tail_errors(matrix_spectrum(matrix, form_whitening(form, stats, kernel.shape)))
    for rank in (2, 5, 9):
        chosen = with_forms(plan(graph, Policy.fixed(4, divisor=1)), {"conv": (form, rank)})
        error, kind = rewrite(graph, chosen, stats={"conv": stats}).errors["conv"]
        assert kind == "output"
        if form == SPATIAL_SVD and patch_statistics:
            assert error <= np.sqrt(curve[rank]) + 1e-9
        else:
            assert error == pytest.approx(np.sqrt(curve[rank]), rel=1e-6)


@pytest.mark.parametrize("form", FORMS)
def test_the_spectrum_reported_for_a_form_is_the_one_its_rank_cuts(form) -> None:
    from frontends.onnx import lower
    from lowrank_ir import LayerStats
    from lowrank_ir._budget import matrix_spectrum, tail_errors
    from lowrank_ir._report import spectra, spectral_energy

    graph = lower(_onnx_model())
    kernel = graph.params["conv.weight"]
    patches = _patches(7, kernel.shape)
    moment = patches.T @ patches / len(patches)
    stats = {"conv": LayerStats(spatial_column_moment(moment, kernel.shape)[::3, ::3], len(patches),
                                patch_moment=moment)}
    chosen = with_forms(plan(graph, Policy.fixed(4, divisor=1)), {"conv": (form, 5)})
    matrix = spatial_matrix(kernel) if form == SPATIAL_SVD else channel_matrix(kernel)
    free, aware = spectra(graph, chosen)["conv"], spectra(graph, chosen, stats)["conv"]
    assert free["count"] == aware["count"] == (24 if form == SPATIAL_SVD else 12) and aware["whitened"]
    assert free["kept_energy"] == pytest.approx(1 - tail_errors(matrix_spectrum(matrix))[5])
    assert spectral_energy(graph, chosen)["conv"] == pytest.approx(free["kept_energy"])
    whitened = rewrite(graph, chosen, stats=stats).errors["conv"][0]
    if form == SVD:  # the channel SVD's fit is that whitened truncation
        assert aware["kept_energy"] == pytest.approx(1 - whitened**2)
