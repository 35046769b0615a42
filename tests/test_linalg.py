"""Tests of lowrank_ir._linalg against the formulas in its module docstring."""

from __future__ import annotations

import numpy as np
import pytest

from lowrank_ir import _linalg as linalg_module
from lowrank_ir._linalg import (
    leading_eigh,
    psd_sqrt,
    reconstruct_tucker2,
    relative_error,
    svd_factors,
    svd_flip,
    svd_relative_error,
    tucker2,
    tucker2_relative_error,
    whitened_svd_factors,
)


def _orthonormal(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((rows, cols)))
    return q


def _decaying_matrix(rng: np.random.Generator, rows: int, cols: int, tau: float = 4.0) -> np.ndarray:
    """A matrix with singular values exp(-i / tau): trained-weight-like, not flat like noise."""
    k = min(rows, cols)
    spectrum = np.exp(-np.arange(k) / tau)
    return (_orthonormal(rng, rows, k) * spectrum) @ _orthonormal(rng, cols, k).T


def _correlated_inputs(
    rng: np.random.Generator, dim: int, samples: int, rank: int | None = None
) -> np.ndarray:
    """Inputs X = L Z [dim, samples] with a random mixing L, so E[x xᵀ] is far from identity."""
    mixing = rng.standard_normal((dim, dim)) * np.exp(-np.arange(dim) / 3.0)
    if rank is not None:
        mixing = mixing[:, :rank]
    return mixing @ rng.standard_normal((mixing.shape[1], samples))


def _moment(inputs: np.ndarray) -> np.ndarray:
    return inputs @ inputs.T / inputs.shape[1]


def _whitened_optimum(weight: np.ndarray, moment: np.ndarray, rank: int) -> float:
    """||A - A_r||_F for A = W C^{1/2}: the smallest output error reachable at this rank."""
    singular = np.linalg.svd(weight @ psd_sqrt(moment), compute_uv=False)
    return float(np.sqrt(np.sum(singular[rank:] ** 2)))


def _output_error(weight: np.ndarray, approx: np.ndarray, inputs: np.ndarray) -> float:
    """sqrt(mean over samples of ||(W - W') x||²), which equals ||(W - W') C^{1/2}||_F."""
    return float(np.linalg.norm((weight - approx) @ inputs)) / np.sqrt(inputs.shape[1])


# ------------------------------------------------------------------------------------------
# svd_flip / svd_factors


@pytest.mark.parametrize("shape", [(7, 4), (4, 7)])
def test_svd_flip_fixes_signs_and_keeps_product(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal(shape)
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    flipped_u, flipped_vt = svd_flip(u, vt)
    np.testing.assert_allclose((flipped_u * s) @ flipped_vt, matrix, atol=1e-12)
    rows = np.argmax(np.abs(flipped_u), axis=0)
    assert np.all(flipped_u[rows, np.arange(flipped_u.shape[1])] > 0)
    # Any sign pattern in the input gives the same output.
    signs = np.where(rng.random(u.shape[1]) < 0.5, -1.0, 1.0)
    again_u, again_vt = svd_flip(u * signs, vt * signs[:, None])
    np.testing.assert_array_equal(again_u, flipped_u)
    np.testing.assert_array_equal(again_vt, flipped_vt)


def test_svd_flip_with_full_matrices_of_different_sizes() -> None:
    rng = np.random.default_rng(1)
    matrix = rng.standard_normal((3, 5))
    u, s, vt = np.linalg.svd(matrix, full_matrices=True)  # u [3, 3], vt [5, 5]
    flipped_u, flipped_vt = svd_flip(u, vt)
    assert flipped_u.shape == (3, 3) and flipped_vt.shape == (5, 5)
    np.testing.assert_allclose((flipped_u * s) @ flipped_vt[:3], matrix, atol=1e-12)
    np.testing.assert_array_equal(flipped_vt[3:], vt[3:])


@pytest.mark.parametrize("shape", [(12, 20), (20, 12), (9, 9)])
def test_svd_factors_full_rank_reconstructs(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(2)
    weight = rng.standard_normal(shape)
    left, right = svd_factors(weight, min(shape))
    assert left.dtype == np.float64 and right.dtype == np.float64
    assert relative_error(weight, left @ right) < 1e-12


@pytest.mark.parametrize("rank", [1, 3, 7, 11])
def test_svd_factors_error_is_eckart_young(rank: int) -> None:
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((16, 11))
    singular = np.linalg.svd(weight, compute_uv=False)
    left, right = svd_factors(weight, rank)
    assert left.shape == (16, rank) and right.shape == (rank, 11)
    expected = np.sqrt(np.sum(singular[rank:] ** 2))
    assert np.linalg.norm(weight - left @ right) == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_svd_factors_balanced_and_deterministic() -> None:
    rng = np.random.default_rng(4)
    weight = rng.standard_normal((10, 14)).astype(np.float32)
    left, right = svd_factors(weight, 5)
    again_left, again_right = svd_factors(weight.copy(), 5)
    np.testing.assert_array_equal(left, again_left)
    np.testing.assert_array_equal(right, again_right)
    # sqrt(S) on both sides: column norms of left equal row norms of right.
    np.testing.assert_allclose(np.linalg.norm(left, axis=0), np.linalg.norm(right, axis=1), rtol=1e-12)
    rows = np.argmax(np.abs(left), axis=0)
    assert np.all(left[rows, np.arange(5)] > 0)
    # Negating the weight flips right only: signs are a function of the left vectors.
    neg_left, neg_right = svd_factors(-weight, 5)
    np.testing.assert_allclose(neg_left, left, atol=1e-12)
    np.testing.assert_allclose(neg_right, -right, atol=1e-12)


def _spectrum_matrix(rng: np.random.Generator, rows: int, cols: int, spectrum: np.ndarray) -> np.ndarray:
    """``U diag(spectrum) Vᵀ`` with random orthonormal ``U`` and ``V``."""
    k = spectrum.size
    return (_orthonormal(rng, rows, k) * spectrum) @ _orthonormal(rng, cols, k).T


def _svd_optimum(weight: np.ndarray, rank: int) -> float:
    """The Eckart–Young relative error at ``rank``, from a full float64 SVD."""
    singular = np.linalg.svd(weight.astype(np.float64), compute_uv=False)
    return float(np.sqrt(np.sum(singular[rank:] ** 2) / np.sum(singular**2)))


@pytest.fixture
def large_side_64(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small matrices take the partial eigensolver's large-matrix path (most pairs of a large side)."""
    monkeypatch.setattr(linalg_module, "PARTIAL_EIGH_LARGE_SIDE", 64)


# Shapes cover wide and tall weights and every eigensolver path: the partial one for a small fraction
# of a side, the full one, and (sides lowered to 64) the partial one for most of a large side.
_TRUNCATION_CASES = [
    ((120, 300), 12, False),  # wide, partial (12 <= 0.2 * 120)
    ((300, 120), 12, False),  # tall, partial
    ((120, 300), 60, False),  # wide, full eigh
    ((300, 120), 90, False),  # tall, full eigh
    ((160, 200), 90, True),  # wide, partial as on a large side
    ((200, 160), 90, True),  # tall, partial as on a large side
]


@pytest.mark.parametrize(("shape", "rank", "large"), _TRUNCATION_CASES)
@pytest.mark.parametrize("kind", ["decaying", "ill-conditioned", "exactly-low-rank"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32, "float32 searched in float32"])
def test_svd_factors_match_a_full_svd_to_1e_6(shape: tuple[int, int], rank: int, large: bool, kind: str,
                                              dtype: type | str, request: pytest.FixtureRequest,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    if large:
        request.getfixturevalue("large_side_64")
    if isinstance(dtype, str):  # small weights take the float32 search too (where its floor lets them)
        monkeypatch.setattr(linalg_module, "FLOAT32_SEARCH_SIDE", 1)
        dtype = np.float32
    monkeypatch.setattr(linalg_module, "FLOAT64_BLOCK", 64)  # float32 weights go through several blocks
    rng = np.random.default_rng(30)
    k = min(shape)
    if kind == "decaying":
        spectrum = np.exp(-np.arange(k) / (k / 8))
    elif kind == "ill-conditioned":  # condition number 1e12, the truncation deep in the tail
        spectrum = np.logspace(0, -12, k)
    else:  # true rank below and above the requested one
        spectrum = np.where(np.arange(k) < rank // 2, np.linspace(3.0, 1.0, k), 0.0)
    weight = _spectrum_matrix(rng, *shape, spectrum).astype(dtype)
    left, right = svd_factors(weight, rank)
    assert left.dtype == np.float64 and right.dtype == np.float64
    optimum = _svd_optimum(weight, rank)
    assert relative_error(weight, left @ right) == pytest.approx(optimum, abs=1e-6)
    assert svd_relative_error(weight, left, right) == pytest.approx(optimum, abs=1e-6)
    # The factors are the full SVD's, signs fixed the svd_flip way (where the singular values are distinct).
    u, singular, vt = np.linalg.svd(weight.astype(np.float64), full_matrices=False)
    u, vt = svd_flip(u[:, :rank], vt[:rank])
    distinct = (singular[:rank] > 1e-6 * singular[0]) & (np.abs(np.diff(singular[: rank + 1])) > 1e-6 * singular[0])
    if kind != "exactly-low-rank":
        np.testing.assert_allclose(left[:, distinct] / np.sqrt(singular[:rank][distinct]), u[:, distinct],
                                   atol=1e-5)
        np.testing.assert_allclose(right[distinct] / np.sqrt(singular[:rank][distinct, None]), vt[distinct],
                                   atol=1e-5)


@pytest.mark.parametrize("shape", [(300, 700), (700, 300)])
@pytest.mark.parametrize("spectrum", ["trained-like", "flat", "cluster across the cut"])
def test_float32_search_reaches_the_float64_optimum(shape: tuple[int, int], spectrum: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # A float32 weight of a realistic spectrum takes the float32 search (not its float64 fallback), and the
    # Rayleigh-Ritz step in float64 lands on the full SVD's optimum (small sides search too, here).
    monkeypatch.setattr(linalg_module, "FLOAT32_SEARCH_SIDE", 256)
    rng = np.random.default_rng(32)
    k = min(shape)
    if spectrum == "trained-like":
        values = np.exp(-np.arange(k) / (k / 5))
    elif spectrum == "flat":
        values = 1.0 + 0.3 * rng.random(k)
    else:  # rank 75 cuts through 60 nearly equal values, wider than the search's extra directions
        values = np.concatenate([np.linspace(3.0, 2.0, 50), 1.0 + 1e-6 * rng.random(60),
                                 np.linspace(0.9, 0.1, k - 110)])
    weight = _spectrum_matrix(rng, *shape, np.sort(values)[::-1]).astype(np.float32)
    assert linalg_module._float32_search(weight, 75, 1 if shape[0] <= shape[1] else 0) is not None
    left, right = svd_factors(weight, 75)
    optimum = _svd_optimum(weight, 75)
    # Within a cluster float32 cannot order, the directions kept may differ from the SVD's: the error stays
    # within the cluster's spread (1e-6 relative) of the optimum; elsewhere it is the optimum to 1e-9.
    tolerance = 1e-6 if spectrum == "cluster across the cut" else 1e-9 * optimum
    assert relative_error(weight, left @ right) == pytest.approx(optimum, abs=tolerance)
    assert svd_relative_error(weight, left, right) == pytest.approx(optimum, abs=tolerance)
    np.testing.assert_allclose(left.T @ left, np.diag(np.diag(left.T @ left)), atol=1e-9)  # U_r √S_r: orthogonal
    # An exactly low-rank weight falls back to float64 (float32 cannot see where its spectrum ends).
    low = _spectrum_matrix(rng, *shape, np.where(np.arange(k) < 40, 1.0, 0.0)).astype(np.float32)
    assert linalg_module._float32_search(low, 75, 1 if shape[0] <= shape[1] else 0) is None


@pytest.mark.parametrize("skew", [1e-5, 0.3])
def test_orthonormalized_spans_the_same_columns(skew: float) -> None:
    # Nearly orthonormal columns (float32 eigenvectors) take Cholesky QR, skewed ones Householder QR;
    # both give float64-orthonormal columns spanning the same space.
    rng = np.random.default_rng(33)
    base = _orthonormal(rng, 300, 40)
    columns = (base + skew * rng.standard_normal((300, 40)) / np.sqrt(300)).astype(np.float32)
    basis = linalg_module._orthonormalized(columns)
    assert basis.dtype == np.float64 and basis.shape == (300, 40)
    np.testing.assert_allclose(basis.T @ basis, np.eye(40), atol=1e-13)
    within = basis @ (basis.T @ columns.astype(np.float64))
    np.testing.assert_allclose(within, columns, atol=1e-12)


@pytest.mark.parametrize(("size", "rank"), [(200, 10), (200, 150), (200, 100), (200, 199)])
def test_leading_eigh_is_the_top_of_a_full_eigh(size: int, rank: int, large_side_64: None) -> None:
    rng = np.random.default_rng(31)
    factor = rng.standard_normal((size, size + 8))
    symmetric = factor @ factor.T
    values, vectors = leading_eigh(symmetric, rank)
    expected = np.linalg.eigvalsh(symmetric)[::-1][:rank]
    np.testing.assert_allclose(values, expected, rtol=1e-9)
    assert vectors.shape == (size, rank) and vectors.flags.c_contiguous
    np.testing.assert_allclose(vectors.T @ vectors, np.eye(rank), atol=1e-9)
    np.testing.assert_allclose(symmetric @ vectors, vectors * values, atol=1e-7 * values[0])


def test_svd_relative_error_of_exact_and_zero_weights() -> None:
    rng = np.random.default_rng(32)
    weight = rng.standard_normal((9, 4)) @ rng.standard_normal((4, 14))
    left, right = svd_factors(weight, 4)
    assert svd_relative_error(weight, left, right) < 1e-7
    assert svd_relative_error(np.zeros((3, 5)), np.zeros((3, 2)), np.zeros((2, 5))) == 0.0


# ------------------------------------------------------------------------------------------
# psd_sqrt / whitened_svd_factors


def test_psd_sqrt_of_singular_and_slightly_indefinite_moments() -> None:
    rng = np.random.default_rng(5)
    inputs = _correlated_inputs(rng, 8, 500, rank=5)
    moment = _moment(inputs)
    root = psd_sqrt(moment)
    np.testing.assert_array_equal(root, root.T)
    np.testing.assert_allclose(root @ root, moment, atol=1e-12 * np.abs(moment).max())
    # Rounding can make a singular moment slightly indefinite: clipped, never NaN.
    vectors = _orthonormal(rng, 8, 8)
    values = np.array([-1e-14, 0.0, 1e-3, 0.1, 0.5, 1.0, 2.0, 3.0])
    indefinite = (vectors * values) @ vectors.T
    root = psd_sqrt(indefinite)
    assert np.all(np.isfinite(root))
    assert np.linalg.eigvalsh(root).min() > -1e-12


def test_whitened_svd_is_optimal_for_output_error() -> None:
    rng = np.random.default_rng(6)
    weight = rng.standard_normal((24, 16))
    inputs = _correlated_inputs(rng, 16, 4000)
    moment = _moment(inputs)
    assert relative_error(np.eye(16), moment / np.trace(moment) * 16) > 0.5  # far from identity
    for rank in (2, 5, 9):
        left, right = whitened_svd_factors(weight, moment, rank)
        assert left.shape == (24, rank) and right.shape == (rank, 16)
        error = _output_error(weight, left @ right, inputs)
        assert error == pytest.approx(_whitened_optimum(weight, moment, rank), rel=1e-9)
        plain_left, plain_right = svd_factors(weight, rank)
        assert error < 0.9 * _output_error(weight, plain_left @ plain_right, inputs)


def test_whitened_svd_with_singular_moment() -> None:
    rng = np.random.default_rng(7)
    weight = rng.standard_normal((12, 10))
    inputs = _correlated_inputs(rng, 10, 2000, rank=4)  # inputs span only 4 of 10 dimensions
    moment = _moment(inputs)
    assert np.linalg.matrix_rank(moment) == 4
    for rank in (2, 4, 6):
        left, right = whitened_svd_factors(weight, moment, rank)
        assert np.all(np.isfinite(left)) and np.all(np.isfinite(right))
        error = _output_error(weight, left @ right, inputs)
        optimum = _whitened_optimum(weight, moment, rank)
        assert error == pytest.approx(optimum, rel=1e-9, abs=1e-10 * np.linalg.norm(weight @ inputs))
    # Rank 4 already reproduces every output exactly.
    left, right = whitened_svd_factors(weight, moment, 4)
    assert _output_error(weight, left @ right, inputs) < 1e-10 * _output_error(weight, 0 * weight, inputs)


@pytest.mark.parametrize("rank", [1, 4, 8])
def test_whitened_svd_with_identity_is_plain_svd(rank: int) -> None:
    rng = np.random.default_rng(8)
    weight = rng.standard_normal((8, 13))
    left, right = whitened_svd_factors(weight, np.eye(13), rank)
    plain_left, plain_right = svd_factors(weight, rank)
    np.testing.assert_allclose(left, plain_left, atol=1e-12)
    np.testing.assert_allclose(right, plain_right, atol=1e-12)


# ------------------------------------------------------------------------------------------
# Tucker-2


@pytest.mark.parametrize("shape", [(8, 6, 3, 3), (8, 6, 1, 1), (8, 6, 5), (8, 6, 3, 1), (5, 4, 2, 3, 2)])
def test_tucker2_full_rank_reconstructs(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(9)
    kernel = rng.standard_normal(shape)
    last, core, first = tucker2(kernel, shape[0], shape[1])
    assert last.shape == (shape[0], shape[0])
    assert core.shape == shape
    assert first.shape == (shape[1], shape[1])
    assert relative_error(kernel, reconstruct_tucker2(last, core, first)) < 1e-12


def test_tucker2_matches_explicit_sum() -> None:
    rng = np.random.default_rng(10)
    last = rng.standard_normal((5, 3))
    core = rng.standard_normal((3, 2, 3, 2))
    first = rng.standard_normal((2, 4))
    expected = np.einsum("oa,abxy,bi->oixy", last, core, first)
    np.testing.assert_allclose(reconstruct_tucker2(last, core, first), expected, atol=1e-12)


def _structured_kernel(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """A kernel whose channel modes have decaying spectra, plus a little noise."""
    out_dim, in_dim = shape[:2]
    core = rng.standard_normal(shape)
    out_basis = _orthonormal(rng, out_dim, out_dim) * np.exp(-np.arange(out_dim) / 4.0)
    in_basis = _orthonormal(rng, in_dim, in_dim) * np.exp(-np.arange(in_dim) / 4.0)
    kernel = reconstruct_tucker2(out_basis, core, in_basis.T)
    return kernel + 0.01 * rng.standard_normal(shape)


def test_tucker2_error_decreases_with_rank_and_beats_hosvd() -> None:
    rng = np.random.default_rng(11)
    kernel = _structured_kernel(rng, (24, 16, 3, 3))
    errors = []
    improved = 0
    for rank in range(1, 17, 3):
        last, core, first = tucker2(kernel, min(rank + 4, 24), rank)
        error = relative_error(kernel, reconstruct_tucker2(last, core, first))
        hosvd = tucker2(kernel, min(rank + 4, 24), rank, max_iter=0)
        hosvd_error = relative_error(kernel, reconstruct_tucker2(*hosvd))
        assert error <= hosvd_error + 1e-12
        improved += error < hosvd_error - 1e-9
        errors.append(error)
    assert all(later <= earlier + 1e-12 for earlier, later in zip(errors, errors[1:], strict=False))
    assert errors[-1] < 0.1 * errors[0]
    assert improved > 0  # HOOI iterations did something beyond the HOSVD


def _float64_hooi_error(kernel: np.ndarray, rank_out: int, rank_in: int, tol: float) -> float:
    """Relative error of plain float64 HOOI, each mode from a full SVD (the reference tool's algorithm)."""
    out_dim, in_dim = kernel.shape[:2]
    flat = kernel.reshape(out_dim, in_dim, -1)

    def leading(matrix: np.ndarray, rank: int) -> np.ndarray:
        return np.linalg.svd(matrix, full_matrices=True)[0][:, :rank]

    last = leading(flat.reshape(out_dim, -1), rank_out)
    first = leading(flat.transpose(1, 0, 2).reshape(in_dim, -1), rank_in)
    norm_sq, previous = float(np.sum(flat**2)), 0.0
    for _ in range(200):
        last = leading(np.einsum("oit,ib->obt", flat, first).reshape(out_dim, -1), rank_out)
        first = leading(np.einsum("oit,oa->iat", flat, last).reshape(in_dim, -1), rank_in)
        fit = float(np.sum(np.einsum("oit,oa,ib->abt", flat, last, first) ** 2)) / norm_sq
        if abs(fit - previous) <= tol * fit:
            break
        previous = fit
    core = np.einsum("oit,oa,ib->abt", flat, last, first).reshape(rank_out, rank_in, *kernel.shape[2:])
    return relative_error(kernel, reconstruct_tucker2(last, core, first.T))


def _mode_spectra_kernel(rng: np.random.Generator, shape: tuple[int, ...], smallest: float) -> np.ndarray:
    """A kernel whose out and in modes have singular values falling log-evenly from 1 to ``smallest``."""
    out_dim, in_dim = shape[:2]
    core = (rng.standard_normal(shape) * np.logspace(0, np.log10(smallest), out_dim)[:, None, None, None]
            * np.logspace(0, np.log10(smallest), in_dim)[None, :, None, None])
    return reconstruct_tucker2(_orthonormal(rng, out_dim, out_dim), core, _orthonormal(rng, in_dim, in_dim).T)


# The sweeps run in float32 before float64 ones: the error reached is float64 HOOI's, also where the kernel's
# tail is far below float32's resolution (1e-6 and 1e-12 ranges, the truncation deep in the tail).
@pytest.mark.parametrize(("kind", "ranks"), [("structured", (12, 8)), ("structured", (4, 4)),
                                             ("range 1e-3", (20, 14)), ("range 1e-6", (24, 16)),
                                             ("range 1e-6", (40, 28)), ("range 1e-12", (40, 28))])
def test_tucker2_reaches_float64_hooi_to_1e_6(kind: str, ranks: tuple[int, int]) -> None:
    rng = np.random.default_rng(14)
    shape = (48, 32, 3, 3)
    kernel = (_structured_kernel(rng, shape) if kind == "structured"
              else _mode_spectra_kernel(rng, shape, float(kind.split()[1])))
    last, core, first = tucker2(kernel, *ranks, tol=1e-10)
    error = relative_error(kernel, reconstruct_tucker2(last, core, first))
    expected = _float64_hooi_error(kernel, *ranks, tol=1e-10)
    # As good as float64 HOOI to 1e-6 (relative), or better (where the tail holds ~1e-12 of the energy, the fit
    # criterion stops HOOI before its error settles, and starting closer ends lower); plus 1e-7 absolute:
    # Gram matrices resolve directions down to sqrt(eps) ~ 1.5e-8 of the largest singular value.
    assert error <= expected * (1 + 1e-6) + 1e-7
    assert tucker2_relative_error(kernel, core) == pytest.approx(error, rel=1e-6, abs=1e-7)


def _counting_updates(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Records every HOOI factor update (True: a Rayleigh–Ritz step from the current factor, False: exact)."""
    calls: list[bool] = []
    original = linalg_module._leading_subspace

    def counted(rows: np.ndarray, rank: int, start: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        calls.append(start is not None)
        return original(rows, rank, start)

    monkeypatch.setattr(linalg_module, "_leading_subspace", counted)
    return calls


@pytest.mark.parametrize("ranks", [(6, 5), (9, 8)])
def test_tucker2_exactly_low_rank_kernel_stops_after_one_sweep(ranks: tuple[int, int],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # A kernel of Tucker ranks (6, 5): its error at these ranks or above is float64 rounding, which no sweep
    # can lower, so HOOI stops after its first sweep (two factor updates) instead of running to max_iter.
    rng = np.random.default_rng(21)
    core = rng.standard_normal((6, 5, 3, 3))
    kernel = reconstruct_tucker2(_orthonormal(rng, 40, 6), core, _orthonormal(rng, 32, 5).T)
    calls = _counting_updates(monkeypatch)
    last, core, first = tucker2(kernel, *ranks, max_iter=100, tol=1e-12)
    assert calls == [False, False]
    assert relative_error(kernel, reconstruct_tucker2(last, core, first)) < 1e-12


def test_tucker2_nearly_exact_kernel_stops_in_few_sweeps(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tails 1e-6 and 1e-12 below the top, cut deep in the tail: the error is tiny but above rounding, and the
    # sweeps stop once they lower it by at most tol or its square by rounding.
    rng = np.random.default_rng(22)
    for smallest in (1e-6, 1e-12):
        kernel = _mode_spectra_kernel(rng, (48, 32, 3, 3), smallest)
        calls = _counting_updates(monkeypatch)
        tucker2(kernel, 40, 28, max_iter=100, tol=1e-4)
        assert 2 <= len(calls) <= 8, (smallest, len(calls))


@pytest.mark.parametrize(("kind", "ranks"), [("flat", (16, 16)), ("flat", (8, 24)), ("structured", (12, 8))])
def test_tucker2_stopping_rule_error_near_a_converged_run(kind: str, ranks: tuple[int, int]) -> None:
    # Flat spectra (random weights) are HOOI's slowest case: each sweep gains little and for long. At tol 1e-4
    # the error stops within 1e-3 of itself above a run to convergence, and never below it; the structured
    # kernel (trained-like) converges fast and stops within 1e-5.
    rng = np.random.default_rng(23)
    shape = (64, 48, 3, 3)
    kernel = rng.standard_normal(shape) if kind == "flat" else _structured_kernel(rng, shape)
    stopped = tucker2_relative_error(kernel, tucker2(kernel, *ranks, max_iter=100, tol=1e-4)[1])
    converged = tucker2_relative_error(kernel, tucker2(kernel, *ranks, max_iter=2000, tol=1e-12)[1])
    hosvd = tucker2_relative_error(kernel, tucker2(kernel, *ranks, max_iter=0)[1])
    assert converged - 1e-12 <= stopped <= converged * (1 + (1e-3 if kind == "flat" else 1e-5))
    assert stopped < hosvd - 1e-4 * (hosvd - converged)  # the sweeps did run


def test_leading_subspace_step_never_loses_energy_and_keeps_an_invariant_subspace() -> None:
    rng = np.random.default_rng(24)
    rows = _decaying_matrix(rng, 60, 90, tau=6.0)
    rank = 12
    start = _orthonormal(rng, 60, rank)
    values, basis = linalg_module._leading_subspace([rows], rank, start)
    np.testing.assert_allclose(basis.T @ basis, np.eye(rank), atol=1e-12)
    # the values are the energies the new basis keeps, and they are at least the start's
    assert float(values.sum()) == pytest.approx(float(np.sum((basis.T @ rows) ** 2)), rel=1e-12)
    assert float(values.sum()) >= float(np.sum((start.T @ rows) ** 2))
    # repeated steps converge to the exact leading subspace, which a step then keeps
    exact_values, exact = linalg_module._leading_subspace([rows], rank, None)
    for _ in range(100):
        values, basis = linalg_module._leading_subspace([rows], rank, basis)
    np.testing.assert_allclose(values, exact_values, rtol=1e-10)
    np.testing.assert_allclose(np.abs(basis.T @ exact), np.eye(rank), atol=1e-6)


def test_tucker2_float32_subspace_steps_reach_the_exact_sweeps_optimum(monkeypatch: pytest.MonkeyPatch) -> None:
    # Ranks at most a quarter of each side: the float32 sweeps take Rayleigh–Ritz steps, and a run to
    # convergence ends at float64 HOOI's error all the same (the first sweep is exact: on this kernel, steps
    # straight from the HOSVD settled in another fixed point, 7.5e-4 higher).
    rng = np.random.default_rng(25)
    kernel = _structured_kernel(rng, (64, 48, 3, 3)) + 0.05 * rng.standard_normal((64, 48, 3, 3))
    calls = _counting_updates(monkeypatch)
    last, core, first = tucker2(kernel, 16, 12, max_iter=500, tol=1e-10)
    assert any(calls) and not all(calls)  # warm steps in float32, exact updates in the float64 finish
    expected = _float64_hooi_error(kernel, 16, 12, tol=1e-12)
    assert relative_error(kernel, reconstruct_tucker2(last, core, first)) <= expected * (1 + 1e-6)


@pytest.mark.parametrize("shape", [(16, 12, 3, 3), (12, 16, 3), (10, 6, 1, 1)])
def test_tucker2_factors_orthonormal_and_signs_deterministic(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(12)
    kernel = rng.standard_normal(shape)
    last, core, first = tucker2(kernel, 5, 4)
    np.testing.assert_allclose(last.T @ last, np.eye(5), atol=1e-12)
    np.testing.assert_allclose(first @ first.T, np.eye(4), atol=1e-12)
    assert np.all(last[np.argmax(np.abs(last), axis=0), np.arange(5)] > 0)
    assert np.all(first[np.arange(4), np.argmax(np.abs(first), axis=1)] > 0)
    # The core is the projection of the kernel on the factors.
    expected_core = np.einsum("oa,oi...,bi->ab...", last, kernel, first)
    np.testing.assert_allclose(core, expected_core, atol=1e-12)
    again = tucker2(kernel.copy(), 5, 4)
    for got, want in zip(again, (last, core, first), strict=True):
        np.testing.assert_array_equal(got, want)


def test_tucker2_data_aware_1x1_minimises_output_error() -> None:
    rng = np.random.default_rng(13)
    weight = rng.standard_normal((20, 14))
    kernel = weight[:, :, None, None]
    inputs = _correlated_inputs(rng, 14, 4000)
    moment = _moment(inputs)
    for rank in (3, 6):
        aware = reconstruct_tucker2(*tucker2(kernel, rank, rank, moment=moment))[:, :, 0, 0]
        free = reconstruct_tucker2(*tucker2(kernel, rank, rank))[:, :, 0, 0]
        aware_error = _output_error(weight, aware, inputs)
        assert aware_error < 0.9 * _output_error(weight, free, inputs)
        # 1x1: exact output-error minimisation, the whitened Eckart-Young optimum.
        assert aware_error == pytest.approx(_whitened_optimum(weight, moment, rank), rel=1e-8)


def test_tucker2_data_aware_kxk_reduces_channel_moment_error() -> None:
    # For inputs that are independent across pixels with channel moment C, a kxk conv's output
    # error is exactly ||(K - K') ×_in C^{1/2}||, the criterion the data-aware Tucker-2 minimises.
    rng = np.random.default_rng(14)
    kernel = rng.standard_normal((16, 12, 3, 3))
    moment = _moment(_correlated_inputs(rng, 12, 3000))
    root = psd_sqrt(moment)

    def channel_error(approx: np.ndarray) -> float:
        return float(np.linalg.norm(np.einsum("oi...,ij->oj...", kernel - approx, root)))

    aware = reconstruct_tucker2(*tucker2(kernel, 6, 4, moment=moment))
    free = reconstruct_tucker2(*tucker2(kernel, 6, 4))
    assert np.all(np.isfinite(aware))
    assert channel_error(aware) < 0.9 * channel_error(free)


def test_tucker2_data_aware_identity_and_singular_moments() -> None:
    rng = np.random.default_rng(15)
    kernel = rng.standard_normal((10, 8, 3, 3))
    free = reconstruct_tucker2(*tucker2(kernel, 4, 3))
    with_identity = reconstruct_tucker2(*tucker2(kernel, 4, 3, moment=np.eye(8)))
    np.testing.assert_allclose(with_identity, free, atol=1e-10)
    singular = _moment(_correlated_inputs(rng, 8, 1000, rank=3))
    last, core, first = tucker2(kernel, 4, 3, moment=singular)
    assert all(np.all(np.isfinite(part)) for part in (last, core, first))
    assert first.shape == (3, 8) and core.shape == (4, 3, 3, 3)


# ------------------------------------------------------------------------------------------
# validation


def test_non_finite_weights_are_rejected() -> None:
    weight = np.ones((4, 3))
    weight[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        svd_factors(weight, 2)
    with pytest.raises(ValueError, match="NaN or Inf"):
        whitened_svd_factors(weight, np.eye(3), 2)
    kernel = np.ones((4, 3, 3, 3))
    kernel[0, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        tucker2(kernel, 2, 2)
    moment = np.eye(3)
    moment[0, 0] = np.nan
    with pytest.raises(ValueError, match="moment.*NaN or Inf"):
        psd_sqrt(moment)


def test_bad_ranks_are_rejected_with_the_range() -> None:
    weight = np.ones((6, 4))
    with pytest.raises(ValueError, match=r"rank=0 .*\[1, 4\]"):
        svd_factors(weight, 0)
    with pytest.raises(ValueError, match=r"rank=5 .*\[1, 4\].*out=6, in=4"):
        svd_factors(weight, 5)
    with pytest.raises(ValueError, match=r"rank=7 .*\[1, 4\]"):
        whitened_svd_factors(weight, np.eye(4), 7)
    kernel = np.ones((6, 4, 3, 3))
    with pytest.raises(ValueError, match=r"rank_out=7 .*\[1, 6\]"):
        tucker2(kernel, 7, 2)
    with pytest.raises(ValueError, match=r"rank_in=5 .*\[1, 4\]"):
        tucker2(kernel, 2, 5)
    with pytest.raises(TypeError, match="integer"):
        svd_factors(weight, 2.5)  # type: ignore[arg-type]


def test_bad_shapes_are_rejected() -> None:
    with pytest.raises(ValueError, match="2-D"):
        svd_factors(np.ones((2, 3, 4)), 1)
    with pytest.raises(ValueError, match="svd_factors"):
        tucker2(np.ones((4, 3)), 1, 1)
    with pytest.raises(ValueError, match=r"moment must have shape \(3, 3\)"):
        whitened_svd_factors(np.ones((4, 3)), np.eye(4), 1)
    with pytest.raises(ValueError, match=r"moment must have shape \(3, 3\)"):
        tucker2(np.ones((4, 3, 3, 3)), 1, 1, moment=np.eye(2))
    with pytest.raises(ValueError, match="square"):
        psd_sqrt(np.ones((3, 4)))
    with pytest.raises(ValueError, match="symmetric"):
        psd_sqrt(np.array([[1.0, 0.5], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="positive semi-definite"):
        psd_sqrt(-np.eye(3))
    with pytest.raises(ValueError, match="max_iter"):
        tucker2(np.ones((4, 3, 3, 3)), 1, 1, max_iter=-1)
    with pytest.raises(ValueError, match="shapes differ"):
        relative_error(np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="do not chain"):
        reconstruct_tucker2(np.ones((4, 2)), np.ones((3, 2, 3, 3)), np.ones((2, 5)))


def test_relative_error_of_zero_reference_is_finite() -> None:
    assert relative_error(np.zeros((3, 3)), np.zeros((3, 3))) == 0.0
    assert relative_error(np.ones(4), np.zeros(4)) == pytest.approx(1.0)


def test_compensating_factors_reduce_to_the_whitened_optimum_without_perturbation() -> None:
    from lowrank_ir._linalg import compensating_factors

    rng = np.random.default_rng(7)
    weight = rng.standard_normal((20, 30))
    x = rng.standard_normal((2000, 30)) @ (rng.standard_normal((30, 30)) * np.logspace(0, -2, 30))
    moment = x.T @ x / len(x)
    left, right = compensating_factors(weight, moment, moment, 5, damping=1e-12)
    best_left, best_right = whitened_svd_factors(weight, moment, 5)

    def output_error(approx: np.ndarray) -> float:
        return float(np.linalg.norm(x @ (weight - approx).T))

    assert output_error(left @ right) == pytest.approx(output_error(best_left @ best_right), rel=1e-7)


def test_compensating_factors_undo_a_known_input_perturbation() -> None:
    from lowrank_ir._linalg import compensating_factors

    rng = np.random.default_rng(8)
    low_rank = rng.standard_normal((6, 3)) @ rng.standard_normal((3, 12))  # W' can be exact
    x = rng.standard_normal((4000, 12))
    mix = np.eye(12) + 0.3 * rng.standard_normal((12, 12))  # x̃ = mix x: an invertible perturbation
    x_tilde = x @ mix.T
    target = low_rank @ np.linalg.inv(mix)  # W' x̃ = low_rank x
    cross = x.T @ x_tilde / len(x)
    moment = x_tilde.T @ x_tilde / len(x)
    left, right = compensating_factors(low_rank, cross, moment, 3, damping=1e-12)
    np.testing.assert_allclose(left @ right, target, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("shape", "ranks"), [((40, 30, 1, 1), (12, 20)), ((30, 40, 1, 1), (20, 12)),
                                              ((30, 40, 1), (25, 25)), ((40, 24, 1, 1), (30, 10))])
def test_tucker2_of_a_pointwise_kernel_is_its_truncated_svd_without_sweeps(shape, ranks, monkeypatch) -> None:
    # A matrix's Tucker-2 optimum at ranks (a, b) is its truncated SVD at min(a, b) (Eckart–Young): reached at once,
    # with no HOOI sweep, and orthonormal factors of the asked ranks (also above the matrix's rank, (30, 10) on 24).
    rng = np.random.default_rng(26)
    kernel = _decaying_matrix(rng, shape[0], shape[1], tau=5.0).reshape(shape)
    calls = _counting_updates(monkeypatch)
    last, core, first = tucker2(kernel.astype(np.float32), *ranks)
    assert calls == []
    assert last.shape == (shape[0], ranks[0]) and first.shape == (ranks[1], shape[1])
    np.testing.assert_allclose(last.T @ last, np.eye(ranks[0]), atol=1e-6)
    np.testing.assert_allclose(first @ first.T, np.eye(ranks[1]), atol=1e-6)
    matrix = kernel.reshape(shape[:2]).astype(np.float32).astype(np.float64)
    singular = np.linalg.svd(matrix, compute_uv=False)
    optimum = float(np.sqrt((singular[min(ranks):] ** 2).sum() / (singular**2).sum()))
    error = relative_error(matrix, reconstruct_tucker2(last, core, first).reshape(shape[:2]))
    assert error == pytest.approx(optimum, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize(("shape", "ranks"), [((96, 96, 3, 3), (60, 60)), ((96, 64, 3, 3), (16, 48)),
                                              ((48, 80, 5, 5), (36, 12))])
def test_tucker2_peak_memory_stays_within_its_workspace_estimate(shape, ranks) -> None:
    # The engine lets layers run side by side when their estimated workspaces fit the memory bound: the
    # estimate must hold what HOOI allocates (tracemalloc, float32 kernels, high ranks and subspace steps).
    import tracemalloc

    kernel = np.random.default_rng(27).standard_normal(shape).astype(np.float32)
    tucker2(kernel, *ranks, max_iter=1)  # the process's one-time allocations (imports, caches) are not HOOI's
    tracemalloc.start()
    try:
        tucker2(kernel, *ranks, max_iter=50, tol=1e-4)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= linalg_module.tucker2_workspace(shape, ranks, kernel.itemsize), (peak, shape, ranks)
