"""The torch backend of the engine's linear algebra gives what numpy gives (run on the CPU here)."""

from __future__ import annotations

import numpy as np
import pytest

from lowrank_ir import Graph, Node, Op, Policy, linalg_backend, plan, rewrite
from lowrank_ir._backend import device
from lowrank_ir._linalg import leading_eigh, reconstruct_tucker2, relative_error, svd_factors, tucker2
from tests.skips import require

torch = require("torch")


def _decaying(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    k = min(rows, cols)
    u = np.linalg.qr(rng.standard_normal((rows, k)))[0]
    v = np.linalg.qr(rng.standard_normal((cols, k)))[0]
    return (u * np.exp(-np.arange(k) / (k / 6))) @ v.T


def test_backend_choice_is_scoped_and_validated() -> None:
    assert device() is None or device().type == "cuda"  # auto: numpy unless a GPU is there
    with linalg_backend("torch"):
        assert device().type == ("cuda" if torch.cuda.is_available() else "cpu")
        with linalg_backend("numpy"):
            assert device() is None
    with pytest.raises(ValueError, match=r"'cupy'.*'auto', 'numpy', 'torch'|'auto', 'numpy', 'torch'.*'cupy'"):
        with linalg_backend("cupy"):
            pass


def test_leading_eigh_on_torch_matches_numpy() -> None:
    rng = np.random.default_rng(40)
    factor = rng.standard_normal((60, 70))
    symmetric = factor @ factor.T
    values, vectors = leading_eigh(symmetric, 12)
    got_values, got_vectors = leading_eigh(torch.from_numpy(symmetric), 12)
    np.testing.assert_allclose(got_values.numpy(), values, rtol=1e-10)
    np.testing.assert_allclose(np.abs(got_vectors.numpy().T @ vectors), np.eye(12), atol=1e-8)


@pytest.mark.parametrize("shape", [(40, 90), (90, 40)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_svd_factors_on_torch_match_numpy(shape: tuple[int, int], dtype: type) -> None:
    weight = _decaying(np.random.default_rng(41), *shape).astype(dtype)
    left, right = svd_factors(weight, 10)
    with linalg_backend("torch"):
        torch_left, torch_right = svd_factors(weight, 10)
    assert torch_left.dtype == np.float64 and isinstance(torch_left, np.ndarray)
    np.testing.assert_allclose(torch_left, left, atol=1e-8)
    np.testing.assert_allclose(torch_right, right, atol=1e-8)


def test_tucker2_on_torch_reaches_the_same_error() -> None:
    rng = np.random.default_rng(42)
    core = rng.standard_normal((24, 16, 3, 3)) * np.exp(-np.arange(24) / 5)[:, None, None, None]
    kernel = reconstruct_tucker2(np.linalg.qr(rng.standard_normal((24, 24)))[0], core,
                                 np.linalg.qr(rng.standard_normal((16, 16)))[0].T)
    last, core_np, first = tucker2(kernel, 10, 8)
    with linalg_backend("torch"):
        torch_last, torch_core, torch_first = tucker2(kernel, 10, 8)
    error = relative_error(kernel, reconstruct_tucker2(last, core_np, first))
    torch_error = relative_error(kernel, reconstruct_tucker2(torch_last, torch_core, torch_first))
    assert torch_error == pytest.approx(error, rel=1e-6)
    np.testing.assert_allclose(torch_last.T @ torch_last, np.eye(10), atol=1e-10)


def test_rewrite_on_torch_gives_the_same_ranks_and_errors() -> None:
    # Through the engine's worker threads: the backend chosen by the caller holds in them.
    rng = np.random.default_rng(43)
    conv = {"in_channels": 16, "out_channels": 32, "kernel_size": (3, 3), "stride": (1, 1), "padding": (1, 1),
            "dilation": (1, 1), "groups": 1, "padding_mode": "zeros"}
    kernel = rng.standard_normal((32, 16, 3, 3)) * np.exp(-np.arange(32) / 6)[:, None, None, None]
    params = {"conv.weight": kernel.astype(np.float32), "fc.weight": _decaying(rng, 24, 128).astype(np.float32)}
    graph = Graph([Node(Op.CONV, "conv", conv, {"weight": "conv.weight"}),
                   Node(Op.LINEAR, "fc", {"in_features": 128, "out_features": 24}, {"weight": "fc.weight"})], params)
    chosen = plan(graph, Policy.ratio(0.4, divisor=1))
    assert [entry.name for entry in chosen.decomposed_entries()] == ["conv", "fc"]
    numpy_result = rewrite(graph, chosen, workers=2)
    with linalg_backend("torch"):
        torch_result = rewrite(graph, chosen, workers=2)
    assert torch_result.errors.keys() == numpy_result.errors.keys()
    for name, (error, kind) in numpy_result.errors.items():
        assert torch_result.errors[name][1] == kind
        assert torch_result.errors[name][0] == pytest.approx(error, rel=1e-6)
    for name, array in numpy_result.graph.params.items():
        assert torch_result.graph.params[name].shape == array.shape
