"""Tests of lowrank_ir._evbmf (EVBMF rank estimation).

Agreement with the reference tool (msModelSlim 26.1.0, ``low_rank_decompose/vbmf.py``) was
checked during development by running its ``evbmf`` / ``search_rank`` on the same matrices:
the planted-rank matrices below (all shapes and ranks, also scaled by 0.003), matrices with a
decaying spectrum ``s_i = exp(-i / 20)`` between random rotations (shapes 64x128 to 512x4608, both
orientations, scales 1, 0.05 and 0.002, with and without noise), pure Gaussian noise, conv-like
kernels for ``search_rank`` (3x3, 1x1, 1-D and 3-D) and 300 random matrices with random shapes,
spectra, scales (1e-4 to 10) and noise levels: every rank agreed, with the reference fed float64
and float32 input. ``test_matches_reference_tool`` repeats part of that check where the reference
is installed (``pip install .[reference]``).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from lowrank_ir._evbmf import evbmf_rank, vbmf_ranks


def _orthonormal(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((rows, cols)))
    return q


def _planted(rng: np.random.Generator, shape: tuple[int, int], rank: int, noise: float = 1.0) -> np.ndarray:
    """Rank-``rank`` signal well above the noise edge σ(√L + √M), plus Gaussian noise of std σ."""
    rows, cols = shape
    edge = noise * (np.sqrt(rows) + np.sqrt(cols))
    spectrum = 3.0 * edge * np.linspace(2.0, 1.0, rank)
    signal = (_orthonormal(rng, rows, rank) * spectrum) @ _orthonormal(rng, cols, rank).T
    return signal + noise * rng.standard_normal(shape)


def _decaying(rng: np.random.Generator, shape: tuple[int, int], scale: float = 1.0) -> np.ndarray:
    """A pretrained-like matrix: singular values exp(-i / 20) between random rotations."""
    rows, cols = shape
    k = min(rows, cols)
    spectrum = scale * np.exp(-np.arange(k) / 20.0)
    return (_orthonormal(rng, rows, k) * spectrum) @ _orthonormal(rng, cols, k).T


SHAPES = [(64, 128), (128, 64), (256, 576), (96, 96)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rank", [5, 12, 30])
def test_recovers_planted_rank(shape: tuple[int, int], rank: int) -> None:
    rng = np.random.default_rng(1000 + 7 * rank + shape[0])
    matrix = _planted(rng, shape, rank)
    assert evbmf_rank(matrix) == rank
    # The rank of a clearly separated signal does not depend on the scale or dtype.
    assert evbmf_rank(0.003 * matrix) == rank
    assert evbmf_rank(matrix.astype(np.float32)) == rank


@pytest.mark.parametrize("shape", SHAPES)
def test_pure_noise_has_rank_zero(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(shape[0] + shape[1])
    assert evbmf_rank(rng.standard_normal(shape)) == 0


def test_vbmf_ranks_of_planted_tucker_kernel() -> None:
    # out-unfolding of rank 6, in-unfolding of rank 4, plus weak noise.
    rng = np.random.default_rng(21)
    core = rng.standard_normal((6, 4, 3, 3))
    last = _orthonormal(rng, 64, 6) * 40.0
    first = _orthonormal(rng, 48, 4).T * 40.0
    kernel = np.einsum("oa,abxy,bi->oixy", last, core, first) + rng.standard_normal((64, 48, 3, 3))
    assert np.linalg.matrix_rank(kernel.reshape(64, -1), tol=1e-6) == 64  # noise makes it full rank
    assert vbmf_ranks(kernel) == (6, 4)


def test_vbmf_ranks_of_a_2d_weight() -> None:
    rng = np.random.default_rng(25)
    assert vbmf_ranks(_planted(rng, (64, 128), 7)) == (7, 7)


def test_vbmf_ranks_are_at_least_one() -> None:
    rng = np.random.default_rng(22)
    noise = rng.standard_normal((32, 16, 3, 3))
    assert evbmf_rank(noise.reshape(32, -1)) == 0
    assert vbmf_ranks(noise) == (1, 1)


def test_decaying_spectrum_gives_a_proper_rank() -> None:
    rng = np.random.default_rng(23)
    matrix = _decaying(rng, (256, 576), scale=0.05) + 1e-4 * rng.standard_normal((256, 576))
    rank = evbmf_rank(matrix)
    assert 1 <= rank < 256
    assert evbmf_rank(matrix.astype(np.float32)) == rank


@pytest.mark.parametrize("shape", [(1, 5), (5, 1), (2, 1), (1, 1), (3, 2)])
def test_degenerate_shapes(shape: tuple[int, int]) -> None:
    # The reference raises IndexError on a [2, 1] matrix; we return a rank in range.
    matrix = np.arange(1.0, 1.0 + np.prod(shape)).reshape(shape)
    assert 0 <= evbmf_rank(matrix) <= min(shape)


def test_invalid_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="NaN or Inf"):
        evbmf_rank(np.array([[1.0, np.nan], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="2-D"):
        evbmf_rank(np.ones(5))
    with pytest.raises(ValueError, match="2-D"):
        evbmf_rank(np.ones((0, 3)))
    with pytest.raises(ValueError, match="out, in"):
        vbmf_ranks(np.ones(5))


def test_import_does_not_load_scipy() -> None:
    code = "import sys, lowrank_ir._evbmf, lowrank_ir._linalg; print('scipy' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


@pytest.mark.reference
def test_matches_reference_tool() -> None:
    vbmf = pytest.importorskip("msmodelslim.common.low_rank_decompose.vbmf")
    rng = np.random.default_rng(24)
    matrices = [_planted(rng, shape, 12) for shape in SHAPES]
    matrices += [_decaying(rng, shape, scale) for shape in SHAPES for scale in (1.0, 0.02)]
    matrices += [_decaying(rng, (200, 90), 0.05) + 1e-3 * rng.standard_normal((200, 90))]
    for matrix in matrices:
        assert evbmf_rank(matrix) == vbmf.evbmf(matrix), matrix.shape
        assert evbmf_rank(matrix) == vbmf.evbmf(matrix.astype(np.float32)), matrix.shape
    kernel = _decaying(rng, (64, 32 * 9), 0.05).reshape(64, 32, 3, 3)
    kernel += 1e-3 * rng.standard_normal(kernel.shape)
    assert vbmf_ranks(kernel) == tuple(vbmf.search_rank(kernel))
