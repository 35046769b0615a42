"""Dense linear algebra of the decomposition engine: truncated SVD, whitening, Tucker-2.

Everything here is pure numpy, computed in float64, and returns float64 arrays (callers cast
to the model's dtype). Every function validates its inputs before computing anything.

Conventions: a 2-D weight ``W`` is ``[out, in]`` and acts as ``y = W x``; a convolution kernel
``K`` is ``[out, in, *k]`` with one to three spatial dimensions ``k``. ``C = E[x xᵀ]`` (``[in, in]``)
is the second moment of the layer's input, measured on calibration data.

Formulas:

- Truncated SVD (data-free, Eckart–Young optimal). ``W = U S Vᵀ``::

      W ≈ left @ right,   left = U_r √S_r  [out, r],   right = √S_r V_rᵀ  [r, in]

  and ``||W - left @ right||_F = sqrt(Σ_{i>r} s_i²)``. It is computed from the Gram matrix of the
  smaller side, never from a full SVD: for ``out <= in`` the ``r`` leading eigenvectors of ``W Wᵀ``
  are ``U_r``, and ``U_r U_rᵀ W = U_r S_r V_rᵀ`` is the orthogonal projection of ``W`` on them, so
  ``S_r V_rᵀ = U_rᵀ W`` (``s_i`` = the norm of its row ``i``); for ``out > in`` the same with
  ``Wᵀ W`` and ``V_r``, ``U_r S_r = W V_r``. The cost is ``min²·max`` for the Gram matrix plus an
  eigensolver on ``min x min`` that stops at the ``r`` wanted pairs where that pays
  (:func:`leading_eigh`), instead of a full SVD's ``min²·max`` with a much larger constant. The
  Gram matrix squares the condition number, which only blurs directions whose ``s_i² < eps·s_1²``:
  they carry a relative energy below ``eps`` (1e-16), so the error reached stays the Eckart–Young
  optimum to far below 1e-6 (tested on ill-conditioned and exactly-low-rank weights). Because
  ``U_r U_rᵀ W`` is a projection, ``||W - W'||² = ||W||² - Σ_{i<=r} s_i²`` (:func:`svd_relative_error`).
  A large float32 weight searches its subspace in float32 first (``Q``, ``r`` plus a few directions)
  and takes the float64 Rayleigh–Ritz optimum within ``span(Q)`` (:func:`_float32_search`), the same
  optimum where float32 resolves the spectrum down to the cut, and float64 throughout where it does not.

- Deterministic signs (``svd_flip``): in every component, the entry of largest absolute value of
  the left vector is made positive and the right vector is flipped with it, so ``U S Vᵀ`` is
  unchanged and the same input always gives the same factors.

- Whitened SVD (data-aware): minimise the expected output error
  ``E||(W - W')x||² = ||(W - W') C^{1/2}||_F²`` over ``rank(W') <= r``. With the symmetric
  square root ``C^{1/2}`` (``psd_sqrt``, eigenvalues clipped at 0) and ``A = W C^{1/2} = U S Vᵀ``::

      W' = U_r U_rᵀ W,     since  W' C^{1/2} = U_r U_rᵀ A = U_r S_r V_rᵀ = A_r

  so the output error equals the Eckart–Young optimum ``||A - A_r||_F``. No inverse of ``C`` is
  needed, which keeps this exact when ``C`` is singular. The factors are balanced:
  ``B = U_rᵀ W``, ``g_i = sqrt(||B[i]||)`` (1 where the row is zero), ``left = U_r diag(g)``,
  ``right = diag(g)⁻¹ B``. With ``C = I`` this is exactly the truncated SVD above.

- Tucker-2 of a kernel over its out (0) and in (1) modes::

      K[o, i, ...] ≈ Σ_{a,b} last[o, a] core[a, b, ...] first[b, i]

  computed by HOOI (higher-order orthogonal iteration) started from the HOSVD: each mode's
  factor is the leading left singular subspace of the kernel projected on the other mode's factor,
  alternated until a sweep lowers the relative error ``e = ||K - K'||_F / ||K||_F`` by at most ``tol``
  or ``e²`` by no more than its rounding (the sweeps in float32, then in float64 from there until the
  error settles again). A sweep after the first may replace a mode's eigenproblem by one Rayleigh–Ritz
  step from its current factor ``U`` over ``[U, M Mᵀ U]`` (``M`` the kernel projected on the other mode): the best
  factor within a span that holds ``U``, so the error still never rises. ``last`` has orthonormal columns and
  ``first`` orthonormal rows, so ``core = lastᵀ ×_out K ×_in first`` and
  ``||K - K'||² = ||K||² - ||core||²`` (:func:`tucker2_relative_error`). A 1x1 kernel is a matrix ``K``:
  its HOSVD ``U_a U_aᵀ K V_b V_bᵀ`` is the truncated SVD at ``min(a, b)``, the Eckart–Young optimum, so it
  is computed as an SVD and takes no sweep.

- Data-aware Tucker-2: the in mode is whitened, ``K' = K ×_in C^{1/2}`` (every ``K[:, :, taps]``
  multiplied by ``C^{1/2}`` on the right), HOOI gives ``last, core, first'`` in whitened space, and
  ``first = first' (C^{1/2})⁺`` maps the in-factor back (pseudo-inverse with eigenvalues of ``C``
  below ``1e-10 · max`` treated as zero), so that on inputs in ``range(C)`` the factorized layer
  computes the whitened Tucker-2 approximation.

- Im2col refit of a Tucker-2 (``refit_tucker2``): a k x k conv's output is ``K_mat p`` over the
  im2col patches ``p`` (length ``in·T``, ``T = prod(k)``, ordered ``(in, *k)`` like
  ``K.reshape(out, -1)``), so with ``P = E[p pᵀ]`` its output error is ``||(K_mat - K'_mat) P^{1/2}||_F``
  exactly. Given the in-factor ``first``, ``B = first ⊗ I_T`` (``[r_in·T, in·T]``) maps a patch to the
  projected patch in ``core.reshape(r_out, r_in·T)`` order, and with ``G = B P Bᵀ``::

      A = K_mat P Bᵀ (G + δI)⁻¹,   last = leading r_out eigenvectors of A G Aᵀ,   core = lastᵀ A

  (``A`` is the unconstrained optimum of ``last·core``; the rank-``r_out`` optimum is the whitened
  truncation ``U_r U_rᵀ A`` of ``A G^{1/2}``; ``δ = damping · tr(G) / (r_in·T)``).

- Subnormal flush (``flush_subnormals``): in the written dtype, every ``x`` with
  ``0 < |x| < tiny`` (the smallest normal number: 1.2e-38 in float32 and bfloat16, 6.1e-5 in
  float16) becomes 0. This changes a value by less than ``tiny``; CPU kernels that meet subnormal
  operands or produce subnormal activations can run tens of times slower.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from lowrank_ir import _lapack
from lowrank_ir._backend import as_numpy, device, to_device

__all__ = [
    "flush_subnormals",
    "leading_eigh",
    "psd_sqrt",
    "reconstruct_tucker2",
    "refit_tucker2",
    "relative_error",
    "svd_factors",
    "svd_flip",
    "svd_relative_error",
    "tucker2",
    "tucker2_relative_error",
    "whitened_svd_factors",
]

Array = NDArray[np.float64]

#: Eigenvalues of a moment matrix below this fraction of the largest one are treated as zero when
#: the square root is inverted (the data-aware Tucker-2 in-factor).
PINV_RELATIVE_THRESHOLD = 1e-10

#: A moment matrix whose most negative eigenvalue is below ``-NEGATIVE_EIGENVALUE_TOLERANCE · max|λ|``
#: is not a second moment (rounding of a float32 accumulation stays far below this).
NEGATIVE_EIGENVALUE_TOLERANCE = 1e-3

#: Largest accepted asymmetry of a moment matrix, relative to its largest absolute entry.
ASYMMETRY_TOLERANCE = 1e-5

_TINY = float(np.finfo(np.float64).tiny)

#: Tucker-2 searches its subspaces in float32 unless the HOSVD leaves less than this fraction of the
#: kernel's energy out: float32 Gram matrices resolve about 1e-7 of it, and near that the stopping rule
#: cannot tell a float32 subspace from the float64 one.
FLOAT32_RESIDUAL = 1e-4

#: A float32 weight whose smaller side has at least this many rows or columns has its truncated SVD's
#: subspace searched in float32 (:func:`_float32_search`), with this many extra directions (at least,
#: or a 32nd of the rank), when its float32 eigenvalues stay above this fraction of the largest.
#: The extra directions are the Rayleigh-Ritz step's room to rotate across the cut; its cost grows with
#: them. Measured on the Llama-shaped stack's uniform-init weights (the flattest spectra, 1 BLAS thread):
#: 16, 32 or an eighth of the rank (64, 96) all end 2e-13 above the full SVD's error, and 96 instead of
#: 24 extra directions cost 0.2 s more on a 5504 x 2048 weight at rank 768 (2.1 s against 1.9 s).
#: Below this side the search is not taken, for memory rather than time: since the float32 eigensolver runs
#: without the GIL (:mod:`lowrank_ir._lapack`) it is faster from 384 rows up (the all-MiniLM-L6-v2 rewrite on two
#: workers 0.43-0.47 s against 0.48-0.50 s), but each worker thread then held about 2.6 MB more resident memory
#: (measured on a 4-layer BERT of hidden 384: 24.2 against 21.6 MB with one worker, 33 to 34.6 against 28 MB with
#: two), which took that small model to the edge of its memory bound (``tests/test_memory.py``).
FLOAT32_SEARCH_SIDE = 1536
FLOAT32_OVERSAMPLING = 16
FLOAT32_SEARCH_FLOOR = 1e-3

#: Rows or columns of a float32 weight converted to float64 at a time (:func:`svd_factors`).
FLOAT64_BLOCK = 512

#: The partial eigensolver (LAPACK ``syevr``, the top pairs only) replaces the full ``eigh`` when at
#: most this fraction of the pairs is wanted...
PARTIAL_EIGH_FRACTION = 0.2
#: ...or, on matrices of at least this side, when at most ``PARTIAL_EIGH_LARGE_FRACTION`` is: there
#: the full solver's back-transformation dominates (measured, 1 BLAS thread: n=2048, r=704: 1.8 s
#: against 5.2 s; n=1024, r=256: equal; n=384, r=64: 0.047 s against 0.058 s; n=512, r=128: the full
#: solver 1.2x faster).
PARTIAL_EIGH_LARGE_SIDE = 1536
PARTIAL_EIGH_LARGE_FRACTION = 0.6

#: The resolution of HOOI's ``1 - fit²`` (the energy a Tucker-2 leaves out), in units of its dtype's
#: machine epsilon: the sum of the eigenvalues against ``||K||²`` is off by up to about 4 eps (measured on
#: ResNet-50's 512 x 512 x 3 x 3 kernels and exactly-low-rank ones, float32 and float64).
FIT_ROUNDING_ULPS = 32

#: HOOI's sweeps after the first update a mode's factor by one Rayleigh–Ritz step from the current one (over
#: it and its image under the Gram matrix) instead of the Gram matrix's leading eigenvectors where the rank
#: is at most this fraction of the mode's side: the step then costs a few products by the ``[side, rank]``
#: factor and a ``2·rank`` eigenproblem, against the ``side x side`` Gram matrix and its eigensolver
#: (ResNet-50's 512 x 512 x 3 x 3 kernels at ranks (64, 64), one thread: 0.36 s of CPU against 0.5 s for
#: the same sweeps exact, to a slightly higher error per sweep).
WARM_STEP_FRACTION = 0.25
#: A Rayleigh–Ritz step gains a little less per sweep than the exact update, so sweeps that take one stop
#: when the error falls by at most this fraction of ``tol``: they then end at least as low as exact sweeps
#: at ``tol`` (and as the reference tool's at the same tolerance), on ResNet-50's 512 x 512 x 3 x 3 and
#: 256 x 256 x 3 x 3 kernels at ranks (64, 64) and PP-OCR det's 3 x 3 and 2 x 2 ones.
WARM_STEP_TOL = 0.7


# --------------------------------------------------------------------------------------------
# validation helpers


def _as_float64(value: ArrayLike, name: str, keep_float32: bool = False) -> Array:
    """Returns ``value`` as a float64 array (or float32, kept), rejecting empty and non-finite input."""
    array = np.asarray(value)
    if not (keep_float32 and array.dtype == np.float32):
        array = np.asarray(array, dtype=np.float64)
    if array.size == 0:
        raise ValueError(f"{name} has shape {array.shape!r}: it has no entries to decompose")
    if not np.all(np.isfinite(array)):
        count = int(array.size - np.count_nonzero(np.isfinite(array)))
        raise ValueError(f"{name} of shape {array.shape!r} contains NaN or Inf ({count} entries)")
    return array


def _as_matrix(value: ArrayLike, name: str, keep_float32: bool = False) -> Array:
    """Returns ``value`` as a finite float64 (or float32, kept) 2-D array."""
    array = np.asarray(value)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix [out, in], got shape {array.shape!r}")
    return _as_float64(array, name, keep_float32)


def _float64_blocks(matrix: np.ndarray, axis: int) -> Iterator[tuple[slice, Array]]:
    """``matrix`` in float64 as ``(slice, block)`` pieces along ``axis`` (0: rows, 1: columns).

    A float64 matrix is one piece, itself; a float32 one is converted ``FLOAT64_BLOCK`` rows or columns
    at a time, so float64 arithmetic never needs a float64 copy of the whole weight.
    """
    if matrix.dtype == np.float64:
        yield slice(None), matrix
        return
    for start in range(0, matrix.shape[axis], FLOAT64_BLOCK):
        part = slice(start, start + FLOAT64_BLOCK)
        block = matrix[part] if axis == 0 else matrix[:, part]
        yield part, np.ascontiguousarray(block, dtype=np.float64)


def _as_int(value: object, name: str) -> int:
    """Returns ``value`` as an int, rejecting bools, floats and other non-integers."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _check_rank(rank: object, name: str, upper: int, what: str) -> int:
    """Returns ``rank`` as an int after checking ``1 <= rank <= upper``."""
    value = _as_int(rank, name)
    if not 1 <= value <= upper:
        raise ValueError(f"{name}={value!r} is out of range: it must be in [1, {upper}] ({what})")
    return value


# --------------------------------------------------------------------------------------------
# SVD


def svd_flip(u: ArrayLike, vt: ArrayLike) -> tuple[Array, Array]:
    """Makes the signs of an SVD deterministic.

    For each component ``j``, the entry of largest absolute value in ``u[:, j]`` is made positive
    and ``vt[j]`` is flipped with it, so ``u @ diag(s) @ vt`` is unchanged. ``u`` may be tall or
    wide; when ``u`` and ``vt`` hold different numbers of components (``full_matrices=True``),
    unpaired left vectors are still normalised and unpaired right vectors are left alone. Ties
    are broken by the first (lowest-index) entry; an all-zero column keeps its sign.

    Args:
        u: Left singular vectors as columns, ``[m, k]``.
        vt: Right singular vectors as rows, ``[k', n]``.

    Returns:
        ``(u, vt)``: new float64 arrays with the signs fixed.

    Raises:
        ValueError: If ``u`` or ``vt`` is not 2-D.
    """
    u_arr = np.array(u, dtype=np.float64)
    vt_arr = np.array(vt, dtype=np.float64)
    if u_arr.ndim != 2 or vt_arr.ndim != 2:
        raise ValueError(f"svd_flip expects 2-D u and vt, got shapes {u_arr.shape!r} and {vt_arr.shape!r}")
    signs = _column_signs(u_arr)
    u_arr *= signs
    paired = min(u_arr.shape[1], vt_arr.shape[0])
    vt_arr[:paired] *= signs[:paired, None]
    return u_arr, vt_arr


def _column_signs(matrix: Array) -> Array:
    """Returns, per column, the sign (+1 or -1) of the entry of largest absolute value."""
    if matrix.shape[0] == 0:
        return np.ones(matrix.shape[1])
    rows = np.argmax(np.abs(matrix), axis=0)
    signs = np.sign(matrix[rows, np.arange(matrix.shape[1])])
    signs[signs == 0] = 1.0
    return signs


def leading_eigh(symmetric: Array, rank: int) -> tuple[Array, Array]:
    """The ``rank`` largest eigenvalues of a symmetric matrix, descending, and their eigenvectors.

    Only the wanted pairs are computed (scipy's ``eigh(subset_by_index=..., driver="evr")``) where
    that is cheaper than the full ``np.linalg.eigh``: for a small fraction of the pairs, or for most
    of a large matrix (see ``PARTIAL_EIGH_*``). A float32 matrix is solved in float32 (scipy's ``evd``
    driver for all pairs: numpy's float32 ``eigh`` is no faster than its float64 one); a torch tensor (the
    torch backend, :mod:`lowrank_ir._backend`) by ``torch.linalg.eigh`` on its device. No input checks:
    callers pass a finite symmetric float64 or float32 matrix they built and ``1 <= rank <= n``.

    Returns:
        ``(values [rank], vectors [n, rank])`` in the matrix's dtype and kind (numpy or torch), the vectors
        as contiguous columns (matmul on negative strides bypasses BLAS).
    """
    size = symmetric.shape[0]
    if not isinstance(symmetric, np.ndarray):  # a torch tensor (the torch backend): no partial solver there
        import torch

        values, vectors = torch.linalg.eigh(symmetric)
        return values[size - rank:].flip(0), vectors[:, size - rank:].flip(1).contiguous()
    partial = rank <= PARTIAL_EIGH_FRACTION * size or (
        size >= PARTIAL_EIGH_LARGE_SIDE and rank <= PARTIAL_EIGH_LARGE_FRACTION * size)
    if (partial and rank < size) or symmetric.dtype == np.float32:
        subset = (size - rank, size - 1) if partial else None
        solved = _lapack.eigh(symmetric, subset)  # scipy's drivers without holding the GIL
        if solved is None:
            from scipy.linalg import eigh

            solved = eigh(symmetric, subset_by_index=subset, driver="evr" if partial else "evd", check_finite=False)
        values, vectors = solved
    else:
        values, vectors = np.linalg.eigh(symmetric)
    values, vectors = values[values.size - rank:], vectors[:, values.size - rank:]
    return np.ascontiguousarray(values[::-1]), np.ascontiguousarray(vectors[:, ::-1])


def _balanced_split(basis: Array, projected: Array) -> tuple[Array, Array]:
    """``(basis diag(g), diag(g)⁻¹ projected)`` with ``g_i = sqrt(||projected[i]||)`` (1 where it is zero).

    With ``basis = U_r`` orthonormal and ``projected = U_rᵀ W = S_r V_rᵀ`` this is ``(U_r √S_r, √S_r V_rᵀ)``.
    """
    row_norms = np.linalg.norm(projected, axis=1)
    balance = np.ones(basis.shape[1])
    nonzero = row_norms > 0
    balance[nonzero] = np.sqrt(row_norms[nonzero])
    return basis * balance, projected / balance[:, None]


def svd_factors(weight: ArrayLike, rank: int) -> tuple[Array, Array]:
    """Truncated SVD of a 2-D weight, singular values split evenly: ``W ≈ left @ right``.

    ``left = U_r √S_r`` and ``right = √S_r V_rᵀ`` with signs fixed as :func:`svd_flip` fixes them. The
    error ``||W - left @ right||_F`` is ``sqrt(Σ_{i>r} s_i²)``, the smallest possible at rank ``r``.
    Computed from the Gram matrix of the smaller side (see the module docstring), never a full SVD.

    Args:
        weight: ``[out, in]`` matrix.
        rank: Number of components kept, ``1 <= rank <= min(out, in)``.

    Returns:
        ``(left [out, rank], right [rank, in])`` in float64.

    Raises:
        ValueError: If the weight is not a finite non-empty 2-D matrix or the rank is out of range.
        TypeError: If the rank is not an integer.
    """
    matrix = _as_matrix(weight, "weight", keep_float32=True)
    out_dim, in_dim = matrix.shape
    rank = _check_rank(rank, "rank", min(out_dim, in_dim), f"min(out={out_dim}, in={in_dim})")
    # float64 arithmetic throughout; a float32 weight is converted a block at a time (no float64 copy).
    where = device()
    axis = 1 if out_dim <= in_dim else 0  # the Gram matrix of the smaller side
    found = _float32_search(matrix, rank, axis) if where is None else None
    if found is None:
        basis = as_numpy(leading_eigh(_gram(matrix, axis, where), rank)[1])  # U_r (wide) or V_r (tall)
        product = _projection(matrix, basis, axis, where)  # U_rᵀ W = S_r V_rᵀ (wide) or W V_r = U_r S_r (tall)
    else:
        basis, product = found
    if axis == 1:
        signs = _column_signs(basis)
        return _balanced_split(basis * signs, product * signs[:, None])
    signs = _column_signs(product)
    left, right = _balanced_split(basis * signs, (product * signs).T)
    return right.T, left.T


def _float32_search(matrix: np.ndarray, rank: int, axis: int) -> tuple[Array, Array] | None:
    """The smaller side's leading subspace searched in float32, refined to the float64 optimum within it.

    For a float32 weight whose smaller side is at least ``FLOAT32_SEARCH_SIDE``: the float32 Gram matrix
    (no copy of the weight, half the arithmetic) gives ``k = rank + oversampling`` leading eigenvectors
    ``Q``; in float64, ``Q`` is orthonormalised (:func:`_orthonormalized`), ``B = Qᵀ W`` (``W Q`` when
    tall) is the weight projected on it, and the Rayleigh-Ritz step (the leading eigenvectors ``Z`` of
    ``B Bᵀ``) returns ``(Q Z_r, Z_rᵀ B)``: the best rank-``r`` approximation whose left (right when tall)
    subspace lies in ``span(Q)``. Float32 perturbs ``Q`` by about ``1e-7 · s_1²`` in the Gram's units, so
    the ``k``-th eigenvalue must stand above ``FLOAT32_SEARCH_FLOOR · s_1²`` for ``span(Q)`` to hold the
    top ``r`` directions to far below 1e-6 of error; otherwise (an ill-conditioned or exactly low-rank
    weight) this returns None and the caller works in float64.
    """
    side = matrix.shape[1 - axis]
    if matrix.dtype != np.float32 or side < FLOAT32_SEARCH_SIDE:
        return None
    count = min(side, rank + max(FLOAT32_OVERSAMPLING, rank // 32))
    values, vectors = leading_eigh(matrix @ matrix.T if axis == 1 else matrix.T @ matrix, count)
    if not values[-1] > FLOAT32_SEARCH_FLOOR * values[0]:
        return None
    basis = _orthonormalized(vectors)
    product = _projection(matrix, basis, axis, None)  # [k, in] (wide) or [out, k] (tall)
    small = product @ product.T if axis == 1 else product.T @ product
    rotation = leading_eigh(0.5 * (small + small.T), rank)[1]
    return basis @ rotation, (rotation.T @ product if axis == 1 else product @ rotation)


def _orthonormalized(vectors: np.ndarray) -> Array:
    """Float64 orthonormal columns spanning ``vectors``, columns that are nearly orthonormal already.

    Cholesky QR: ``VᵀV = L Lᵀ``, ``Q = V L⁻ᵀ``. Its loss of orthogonality is about ``κ(V)² · eps``, which
    for float32 eigenvectors (orthonormal to about 1e-5) is float64's own rounding, at a third of the
    cost of a Householder QR (measured, 1 BLAS thread: ``[2048, 576]`` 0.045 s against 0.12 s;
    ``[2048, 864]`` 0.084 s against 0.23 s). Householder QR unless every eigenvalue of ``VᵀV`` is
    within 0.5 of 1 (Gershgorin: ``k · max|VᵀV - I| < 0.5``, so ``κ(V)² < 3``), which eigenvectors
    always are.
    """
    from scipy.linalg import solve_triangular

    columns = np.asarray(vectors, dtype=np.float64)
    gram = columns.T @ columns
    if columns.shape[1] * float(np.max(np.abs(gram - np.eye(columns.shape[1])))) >= 0.5:
        return np.linalg.qr(columns)[0]
    lower = np.linalg.cholesky(gram)
    return np.ascontiguousarray(solve_triangular(lower, columns.T, lower=True, check_finite=False).T)


def _gram(matrix: np.ndarray, axis: int, where: Any) -> Any:
    """``W Wᵀ`` (``axis`` 1, summed over columns) or ``Wᵀ W`` (``axis`` 0) in float64, on ``where``'s device."""
    if where is not None:
        weight = to_device(matrix, np.float64, where)
        return weight @ weight.T if axis == 1 else weight.T @ weight
    side = matrix.shape[1 - axis]
    gram = np.zeros((side, side))
    for _, block in _float64_blocks(matrix, axis):
        gram += block @ block.T if axis == 1 else block.T @ block
    return gram


def _projection(matrix: np.ndarray, basis: Array, axis: int, where: Any) -> Array:
    """``basisᵀ W`` (``axis`` 1, ``basis [out, r]``) or ``W basis`` (``axis`` 0, ``basis [in, r]``), float64."""
    if where is not None:
        weight, on = to_device(matrix, np.float64, where), to_device(basis, np.float64, where)
        return as_numpy(on.T @ weight if axis == 1 else weight @ on)
    rank = basis.shape[1]
    result = np.empty((rank, matrix.shape[1]) if axis == 1 else (matrix.shape[0], rank))
    for part, block in _float64_blocks(matrix, axis):
        if axis == 1:
            result[:, part] = basis.T @ block
        else:
            result[part] = block @ basis
    return result


def _squared_norm(array: np.ndarray) -> float:
    """``||array||_F²`` summed in float64 (a float32 array a block of rows at a time, without a float64 copy)."""
    matrix = array.reshape(array.shape[0], -1) if array.ndim else array.reshape(1, 1)
    return sum(float(np.vdot(block, block)) for _, block in _float64_blocks(matrix, 0))


def svd_relative_error(weight: ArrayLike, left: ArrayLike, right: ArrayLike) -> float:
    """``||W - left @ right||_F / ||W||_F`` for factors from :func:`svd_factors`, without their product.

    ``left @ right`` is an orthogonal projection of ``W`` with orthogonal columns in ``left`` and rows
    in ``right``, so ``||W - W'||² = ||W||² - Σ_i ||left[:, i]||² ||right[i]||²``. The subtraction
    resolves errors down to about 1e-8 relative; below that the figure is 0 or that small.

    Args:
        weight: ``[out, in]`` matrix.
        left: ``[out, r]`` from :func:`svd_factors`.
        right: ``[r, in]`` from :func:`svd_factors`.

    Returns:
        The relative Frobenius error.
    """
    total = _squared_norm(np.asarray(weight))
    kept = float(np.sum(np.sum(np.square(left), axis=0) * np.sum(np.square(right), axis=1)))
    return math.sqrt(max(total - kept, 0.0) / total) if total > 0 else 0.0


def tucker2_relative_error(kernel: ArrayLike, core: ArrayLike) -> float:
    """``||K - K'||_F / ||K||_F`` for data-free :func:`tucker2` factors, from the core alone.

    ``K' = last core first`` with orthonormal ``last`` columns and ``first`` rows is the orthogonal
    projection of ``K`` on their subspaces, so ``||K - K'||² = ||K||² - ||core||²`` (no reconstruction).
    """
    total, kept = _squared_norm(np.asarray(kernel)), _squared_norm(np.asarray(core, dtype=np.float64))
    return math.sqrt(max(total - kept, 0.0) / total) if total > 0 else 0.0


# --------------------------------------------------------------------------------------------
# second moments


def _symmetric_moment(moment: ArrayLike, name: str = "moment") -> Array:
    """``moment`` as a symmetrised float64 matrix, after checking it is square, finite and symmetric."""
    raw = np.asarray(moment)
    if raw.ndim != 2 or raw.shape[0] != raw.shape[1]:
        raise ValueError(f"{name} must be a square [in, in] matrix, got shape {raw.shape!r}")
    matrix = _as_float64(raw, name)
    scale = float(np.max(np.abs(matrix))) if matrix.size else 0.0
    asymmetry = float(np.max(np.abs(matrix - matrix.T))) if matrix.size else 0.0
    if asymmetry > ASYMMETRY_TOLERANCE * scale:
        raise ValueError(
            f"{name} must be symmetric: max |C - Cᵀ| = {asymmetry:.3g} for max |C| = {scale:.3g}"
        )
    return 0.5 * (matrix + matrix.T)


def _psd_eig(moment: ArrayLike, name: str = "moment") -> tuple[Array, Array]:
    """Eigen-decomposition of a symmetric PSD matrix with rounding noise removed.

    Returns ``(eigenvalues, eigenvectors)`` with eigenvalues ascending, negative and tiny ones
    (below ``n · eps · max``) set to exactly zero.
    """
    matrix = _symmetric_moment(moment, name)
    values, vectors = np.linalg.eigh(matrix)
    magnitude = float(np.max(np.abs(values)))
    if values[0] < -NEGATIVE_EIGENVALUE_TOLERANCE * magnitude:
        raise ValueError(
            f"{name} is not positive semi-definite: eigenvalue {values[0]:.3g} for max |eigenvalue| "
            f"{magnitude:.3g} (an input second moment E[x xᵀ] has none below zero)"
        )
    cutoff = matrix.shape[0] * np.finfo(np.float64).eps * max(float(values[-1]), 0.0)
    values = np.where(values > cutoff, values, 0.0)
    return values, vectors


def psd_sqrt(moment: ArrayLike) -> Array:
    """Symmetric square root ``C^{1/2}`` of a symmetric positive semi-definite matrix.

    Computed from ``eigh`` in float64; negative eigenvalues (rounding) and tiny ones (below
    ``n · eps · max``) are clipped to zero, so singular moments are handled exactly.

    Args:
        moment: ``[n, n]`` symmetric PSD matrix, e.g. ``E[x xᵀ]``.

    Returns:
        ``S`` ``[n, n]``, symmetric, with ``S @ S ≈ C``.

    Raises:
        ValueError: If the matrix is not square, has NaN or Inf, is not symmetric, or has a clearly
            negative eigenvalue.
    """
    values, vectors = _psd_eig(moment)
    root = vectors * np.sqrt(values)
    result = root @ vectors.T
    return 0.5 * (result + result.T)


def _psd_sqrt_and_pinv(moment: ArrayLike, in_dim: int) -> tuple[Array, Array]:
    """Returns ``(C^{1/2}, (C^{1/2})⁺)`` for an ``[in_dim, in_dim]`` moment."""
    raw = np.asarray(moment)
    if raw.shape != (in_dim, in_dim):
        raise ValueError(f"moment must have shape ({in_dim}, {in_dim}) [in, in], got {raw.shape!r}")
    values, vectors = _psd_eig(raw)
    roots = np.sqrt(values)
    kept = values > PINV_RELATIVE_THRESHOLD * max(float(values[-1]), 0.0)
    inverse_roots = np.zeros_like(roots)
    inverse_roots[kept] = 1.0 / roots[kept]
    sqrt_matrix = (vectors * roots) @ vectors.T
    pinv_matrix = (vectors * inverse_roots) @ vectors.T
    return 0.5 * (sqrt_matrix + sqrt_matrix.T), 0.5 * (pinv_matrix + pinv_matrix.T)


def _whitened_left_basis(matrix: Array, moment: ArrayLike, rank: int) -> Array:
    """The ``rank`` leading left singular vectors of ``A = W C^{1/2}``, signs fixed.

    When ``out <= in`` they are the leading eigenvectors of ``A Aᵀ = W C Wᵀ`` (``[out, out]``): no
    square root of ``C`` and no SVD of ``A`` are needed, which is several times faster for wide
    layers. Otherwise the SVD of ``W C^{1/2}`` is taken.
    """
    out_dim, in_dim = matrix.shape
    if out_dim <= in_dim:
        symmetric = _symmetric_moment(moment)
        if np.any(np.diag(symmetric) < 0):
            raise ValueError("moment is not positive semi-definite: it has a negative diagonal entry")
        gram = matrix @ symmetric @ matrix.T
        _, basis = leading_eigh(0.5 * (gram + gram.T), rank)
        return basis * _column_signs(basis)
    u, _, vt = np.linalg.svd(matrix @ psd_sqrt(moment), full_matrices=False)
    u, _ = svd_flip(u, vt)
    return np.ascontiguousarray(u[:, :rank])


def whitened_svd_factors(weight: ArrayLike, moment: ArrayLike, rank: int) -> tuple[Array, Array]:
    """Data-aware truncated SVD: minimises the output error ``||(W - left @ right) C^{1/2}||_F``.

    ``A = W C^{1/2} = U S Vᵀ``; the optimum at rank ``r`` is ``W' = U_r U_rᵀ W`` (its output error
    is the Eckart–Young error of ``A``), split as ``left = U_r diag(g)``,
    ``right = diag(g)⁻¹ U_rᵀ W`` with ``g_i = sqrt(||(U_rᵀ W)[i]||)``. No inverse of ``C`` is
    taken, so a singular ``C`` (inputs confined to a subspace) is fine. With ``C = I`` this equals
    :func:`svd_factors`.

    Args:
        weight: ``[out, in]`` matrix acting as ``y = W x``.
        moment: ``[in, in]`` input second moment ``E[x xᵀ]``.
        rank: Number of components kept, ``1 <= rank <= min(out, in)``.

    Returns:
        ``(left [out, rank], right [rank, in])`` in float64.

    Raises:
        ValueError: On a non-finite or non-2-D weight, a moment of the wrong shape or not
            symmetric PSD, or a rank out of range.
        TypeError: If the rank is not an integer.
    """
    matrix = _as_matrix(weight, "weight")
    out_dim, in_dim = matrix.shape
    rank = _check_rank(rank, "rank", min(out_dim, in_dim), f"min(out={out_dim}, in={in_dim})")
    raw_moment = np.asarray(moment)
    if raw_moment.shape != (in_dim, in_dim):
        raise ValueError(
            f"moment must have shape ({in_dim}, {in_dim}) [in, in] for a weight of shape "
            f"{matrix.shape!r}, got {raw_moment.shape!r}"
        )
    basis = _whitened_left_basis(matrix, raw_moment, rank)
    return _balanced_split(basis, basis.T @ matrix)


def compensating_factors(weight: ArrayLike, cross: ArrayLike, moment: ArrayLike, rank: int,
                         damping: float = 1e-3) -> tuple[Array, Array]:
    """Rank-``r`` ``W'`` whose outputs on *perturbed* inputs best match ``W``'s on the original ones.

    Minimises ``E‖W x − W' x̃‖²`` where ``x`` is the layer's input in the original model and ``x̃`` its
    input in the model whose earlier layers are already decomposed, given ``cross = E[x x̃ᵀ]`` and
    ``moment = C̃ = E[x̃ x̃ᵀ]``. Completing the square, the objective is ``‖(W' − T) C̃^{1/2}‖²`` plus a
    constant, with the regression target ``T = W E[x x̃ᵀ] C̃⁻¹``; so, as in
    :func:`whitened_svd_factors`, ``W' = U_r U_rᵀ T`` with ``U_r`` the leading eigenvectors of
    ``T C̃ Tᵀ = (W E[x x̃ᵀ]) C̃⁻¹ (W E[x x̃ᵀ])ᵀ``. ``C̃`` is damped by ``damping · tr(C̃)/n`` for the solve
    (a ridge: without it, directions the calibration data barely covers — dead ReLUs — get huge
    weights that blow up on new data; 1e-3 was measured on a digits MLP, 1e-8 gave 10x the error).
    With ``x̃ = x`` this is the whitened truncation itself.

    Returns:
        ``(left [out, rank], right [rank, in])`` in float64, balanced as in :func:`whitened_svd_factors`.
    """
    matrix = _as_matrix(weight, "weight")
    out_dim, in_dim = matrix.shape
    rank = _check_rank(rank, "rank", min(out_dim, in_dim), f"min(out={out_dim}, in={in_dim})")
    perturbed = _symmetric_moment(moment)
    mixed = _as_float64(np.asarray(cross), "cross")
    if perturbed.shape != (in_dim, in_dim) or mixed.shape != (in_dim, in_dim):
        raise ValueError(f"moment and cross must have shape ({in_dim}, {in_dim}) for a weight of shape "
                         f"{matrix.shape!r}, got {perturbed.shape!r} and {mixed.shape!r}")
    scale = max(float(np.trace(perturbed)) / max(in_dim, 1), _TINY)
    target_times_moment = matrix @ mixed  # W E[x x̃ᵀ] = T C̃
    target = np.linalg.solve(perturbed + damping * scale * np.eye(in_dim), target_times_moment.T).T
    gram = target_times_moment @ target.T  # T C̃ Tᵀ
    _, basis = leading_eigh(0.5 * (gram + gram.T), rank)
    basis = basis * _column_signs(basis)
    return _balanced_split(basis, basis.T @ target)


# --------------------------------------------------------------------------------------------
# Tucker-2


def _tap(taps: Any, index: int, dtype: type) -> Any:
    """Tap ``index`` ``[out, in]`` of the ``[T, out, in]`` kernel ``taps`` in ``dtype``.

    A numpy kernel stays in its own dtype and one tap at a time is converted (no whole copy in the sweeps'
    dtype); a torch tensor (the torch backend) is already in it, on its device.
    """
    tap = taps[index]
    return tap.astype(dtype, copy=False) if isinstance(tap, np.ndarray) else tap


def _out_blocks(taps: Any, first: Any, dtype: type) -> Iterator[Any]:
    """``M = (K ×_in first)_(0)`` ``[out, T·r_in]`` a tap at a time: ``K_t firstᵀ`` ``[out, r_in]``."""
    for index in range(taps.shape[0]):
        yield _tap(taps, index, dtype) @ first.T


def _in_blocks(taps: Any, last: Any, dtype: type) -> Iterator[Any]:
    """``N = (K ×_out lastᵀ)_(1)`` ``[in, r_out·T]`` a tap at a time: ``K_tᵀ last`` ``[in, r_out]``."""
    for index in range(taps.shape[0]):
        yield _tap(taps, index, dtype).T @ last


def _sum_of(terms: Iterable[Any]) -> Any:
    """The sum of a non-empty run of equally shaped arrays, added in place into the first."""
    iterator = iter(terms)
    total = next(iterator)
    for term in iterator:
        total += term
    return total


def _gram_of(blocks: Iterable[Any]) -> Any:
    """``Σ_t B_t B_tᵀ``: the Gram matrix ``rows rowsᵀ`` of the rows ``[B_0, B_1, ...]`` side by side."""
    return _sum_of(block @ block.T for block in blocks)


def _orthonormal_span(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Orthonormal columns spanning ``[left, right]`` (numpy arrays or torch tensors)."""
    if isinstance(left, np.ndarray):
        return np.linalg.qr(np.hstack([left, right]))[0]
    import torch

    return torch.linalg.qr(torch.cat([left, right], dim=1))[0]


def _leading_subspace(blocks: Iterable[Any], rank: int, start: Any = None) -> tuple[Any, Any]:
    """The ``rank`` leading left singular directions of ``rows = [B_0, B_1, ...]`` ``[n, c]``, and their energies.

    The energies are ``s_i²``; ``blocks`` are the column blocks ``B_t`` of ``rows``. Without ``start``: exactly,
    the leading eigenpairs of the Gram matrix ``rows rowsᵀ = Σ_t B_t B_tᵀ``, summed a block at a time (``rows``
    is never held whole). From an orthonormal ``start`` ``[n, rank]``: one Rayleigh–Ritz step, the best
    ``rank`` directions within ``V = orth[start, rows rowsᵀ start]`` (the leading eigenvectors of
    ``(Vᵀ rows)(Vᵀ rows)ᵀ``, mapped back by ``V``), without forming the ``n x n`` Gram matrix or solving its
    eigenproblem. ``span(V)`` holds ``start``, so the energy kept, ``||basisᵀ rows||²`` (the sum of the
    returned values), is never less than ``start``'s.
    """
    if start is None:
        return leading_eigh(_gram_of(blocks), rank)
    held = list(blocks)  # two passes: rows rowsᵀ start, then the projection on the span
    span = _orthonormal_span(start, _sum_of(block @ (block.T @ start) for block in held))
    small = _gram_of(span.T @ block for block in held)
    values, rotation = leading_eigh(0.5 * (small + small.T), rank)
    return values, span @ rotation


def _tucker2_error(kept: float, norm_sq: float) -> float:
    """The relative error ``sqrt(1 - kept / ||K||²)`` of orthonormal Tucker-2 factors keeping ``kept = ||core||²``."""
    return math.sqrt(max(1.0 - kept / norm_sq, 0.0))


def _core_energy(taps: Any, last: Any, first: Any, dtype: type) -> float:
    """``||core||² = Σ_t ||lastᵀ K_t firstᵀ||²`` of orthonormal factors."""
    total = 0.0
    for block in _in_blocks(taps, last, dtype):
        core = first @ block
        total += float((core * core).sum())
    return total


def _hosvd(taps: Any, rank_out: int, rank_in: int, norm_sq: float, dtype: type) -> tuple[Any, Any, float]:
    """HOSVD of the ``[T, out, in]`` kernel in ``dtype``: each factor from its own unfolding's Gram; and the error."""
    count = taps.shape[0]
    _, last = leading_eigh(_gram_of(_tap(taps, index, dtype) for index in range(count)), rank_out)
    first = leading_eigh(_gram_of(_tap(taps, index, dtype).T for index in range(count)), rank_in)[1].T
    return last, first, _tucker2_error(_core_energy(taps, last, first, dtype), norm_sq)


def _settled(previous: float, error: float, tol: float, rounding: float) -> bool:
    """Whether a HOOI sweep taking the relative error from ``previous`` to ``error`` lowered it by ``<= tol``.

    Computed on the energy left out, ``e² = 1 - fit²``, as ``previous² - error² <= tol · (previous + error)``
    (the same inequality, without a square root of a rounded difference), or at most ``rounding``,
    the resolution of ``e²`` in the sweep's dtype: a kernel fitted to rounding (exactly low rank at these
    ranks) has nothing left to gain, and a sweep whose error rose by rounding (exact HOOI never raises it)
    stops too.
    """
    gain = previous * previous - error * error
    return gain <= max(tol * (previous + error), rounding)


def takes_subspace_steps(rank: int, side: int) -> bool:
    """Whether HOOI updates a mode of ``side`` at ``rank`` by Rayleigh–Ritz steps after its first sweep."""
    return rank <= WARM_STEP_FRACTION * side


def tucker2_size(shape: Sequence[int], ranks: tuple[int, int]) -> int:
    """Entries of Tucker-2's ``(last, core, first)`` of an ``[out, in, *k]`` kernel at ``ranks`` ``(r_out, r_in)``."""
    out_dim, in_dim, taps = shape[0], shape[1], math.prod(shape[2:])
    rank_out, rank_in = ranks
    return in_dim * rank_in + rank_in * rank_out * taps + rank_out * out_dim


def tucker2_workspace(shape: Sequence[int], ranks: tuple[int, int], itemsize: int) -> float:
    """Estimated peak bytes of data-free :func:`tucker2` on an ``[out, in, *k]`` kernel of ``itemsize``-byte entries.

    What :func:`_hooi` holds: the kernel as ``[T, out, in]`` in its dtype, the float64 factors and core, five
    ``side x side`` float64 matrices (a Gram matrix and its eigensolver's copies), and where a mode takes
    Rayleigh–Ritz steps the projection its step reads (``[out, T·r_in]`` or ``[in, T·r_out]`` in float64).
    tracemalloc against this estimate, float32 kernels: 0.94 to 1.04 at ranks above a quarter of the sides
    (ResNet-50's 128- to 512-channel 3 x 3 kernels at ratio 0.5, a 7 x 7 one), 0.64 to 0.77 with steps.
    """
    out_dim, in_dim = shape[0], shape[1]
    taps = math.prod(shape[2:])
    rank_out, rank_in = ranks
    steps = max(out_dim * taps * rank_in if takes_subspace_steps(rank_out, out_dim) else 0,
                in_dim * taps * rank_out if takes_subspace_steps(rank_in, in_dim) else 0)
    side = max(out_dim, in_dim)
    return float(itemsize * out_dim * in_dim * taps + 8 * (tucker2_size(shape, ranks) + steps + 5 * side * side))


def _hooi_sweeps(taps: Any, dtype: type, last: Any, first: Any, error: float, norm_sq: float,
                 max_iter: int, tol: float, exact_sweeps: int) -> tuple[Any, Any, float]:
    """HOOI sweeps in ``dtype`` from ``(last, first)`` until the relative error settles (:func:`_settled`).

    ``taps`` is the ``[T, out, in]`` kernel. Each update is the best factor of its mode given the other one,
    or, after the first ``exact_sweeps`` sweeps and where the rank is at most ``WARM_STEP_FRACTION`` of the
    mode's side, a Rayleigh–Ritz step towards it from the current factor (:func:`_leading_subspace`); either
    way the error never rises. A sweep with such a step stops at ``WARM_STEP_TOL · tol``.
    ``||core||²`` is the energy the in-mode update keeps (the sum of its values), and the error
    ``sqrt(1 - ||core||² / ||K||²)``. Returns the factors and that error.
    """
    (_, out_dim, in_dim), rank_out, rank_in = taps.shape, last.shape[1], first.shape[0]
    warm_out, warm_in = takes_subspace_steps(rank_out, out_dim), takes_subspace_steps(rank_in, in_dim)
    rounding = FIT_ROUNDING_ULPS * float(np.finfo(dtype).eps)
    for sweep in range(max_iter):
        warm = sweep >= exact_sweeps
        sweep_tol = tol * WARM_STEP_TOL if warm and (warm_out or warm_in) else tol
        _, last = _leading_subspace(_out_blocks(taps, first, dtype), rank_out, last if warm and warm_out else None)
        values, vectors = _leading_subspace(_in_blocks(taps, last, dtype), rank_in,
                                            first.T if warm and warm_in else None)
        first = vectors.T
        previous, error = error, _tucker2_error(float(values.clip(min=0.0).sum()), norm_sq)
        if _settled(previous, error, sweep_tol, rounding):
            break
    return last, first, error


def _in_phase(taps: np.ndarray, dtype: type, where: Any) -> Any:
    """The kernel the sweeps in ``dtype`` read: numpy, ``taps`` (a tap converted at a time); torch, a copy on it."""
    return taps if where is None else to_device(taps, dtype, where)


def _hooi(
    kernel: Array, rank_out: int, rank_in: int, max_iter: int, tol: float
) -> tuple[Array, Array, Array]:
    """HOOI on a 3-D ``[out, in, T]`` kernel; returns ``(last, core, first)`` with fixed signs.

    The kernel is held once, as ``[T, out, in]`` in its own dtype, so that every product is a tap's
    contiguous ``[out, in]`` matrix by a factor: each mode's Gram matrix (``out x out``, ``in x in``) is summed a
    tap at a time, and neither the kernel in another dtype nor its projection on a factor (``[out, T·r_in]``,
    as large as the kernel at high ranks) is ever held whole; a Rayleigh–Ritz step (:func:`_hooi_sweeps`, low
    ranks) holds the projection, small there. The sweeps run in float32 first (half the memory traffic of
    float64, and its eigensolver is about twice as fast), then in float64 from where they stopped until the
    error settles again (:func:`_settled`; one sweep, usually): the factors are a float64 iterate (float32
    alone cannot resolve the tail of an ill-conditioned kernel), and the core is the float64 projection of
    the kernel on them.
    """
    out_dim, in_dim, count = kernel.shape
    taps = np.ascontiguousarray(kernel.transpose(2, 0, 1))
    norm_sq = max(_squared_norm(taps.reshape(count * out_dim, in_dim)), _TINY)
    where = device()
    if count == 1:
        return _signed_tucker2(taps, *_matrix_tucker2(taps[0], rank_out, rank_in, where))
    search = _in_phase(taps, np.float32, where) if max_iter > 0 else None
    if search is not None:
        last, first, error = _hosvd(search, rank_out, rank_in, norm_sq, np.float32)
        if error * error < FLOAT32_RESIDUAL:
            # Nearly exact at these ranks: float32 cannot see the tail it gets wrong. Float64 throughout.
            search = None
    if search is None:
        precise = _in_phase(taps, np.float64, where)
        last, first, error = _hosvd(precise, rank_out, rank_in, norm_sq, np.float64)
        last, first, error = _hooi_sweeps(precise, np.float64, last, first, error, norm_sq, max_iter, tol, max_iter)
    else:
        # From the HOSVD, a first exact sweep: it takes the iteration where exact HOOI goes (HOOI has several
        # fixed points; Rayleigh–Ritz steps straight from the HOSVD may settle in a worse one).
        last, first, error = _hooi_sweeps(search, np.float32, last, first, error, norm_sq, max_iter, tol, 1)
        del search
        precise = _in_phase(taps, np.float64, where)
        last, first, _ = _hooi_sweeps(precise, np.float64, to_device(as_numpy(last), np.float64, where),
                                      to_device(as_numpy(first), np.float64, where), error, norm_sq, max_iter, tol, 0)
    del precise
    return _signed_tucker2(taps, as_numpy(last), as_numpy(first))


def _matrix_tucker2(matrix: np.ndarray, rank_out: int, rank_in: int, where: Any) -> tuple[Array, Array]:
    """Tucker-2 factors ``(last, first)`` of a matrix (a 1x1 kernel): its leading singular subspaces.

    The HOSVD's projection ``U_a U_aᵀ K V_bᵀ V_b`` is then the truncated SVD at ``min(a, b)``, the Eckart–Young
    optimum, so no HOOI sweep can lower its error. Computed as :func:`svd_factors` computes an SVD: the Gram
    matrix of the smaller side in float64 blocks, its leading eigenvectors, and the other side's singular
    vectors as the orthonormalized projection (its columns ``U_i s_i`` or rows ``s_i V_iᵀ`` are orthogonal).
    A rank above the smaller side (directions beyond the matrix's rank) takes that side's Gram matrix too.
    """
    out_dim, in_dim = matrix.shape
    small = min(out_dim, in_dim)
    wide = out_dim <= in_dim
    other = rank_in if wide else rank_out  # the rank of the side read off the projection
    if other > small:
        last = as_numpy(leading_eigh(_gram(matrix, 1, where), rank_out)[1])
        return last, as_numpy(leading_eigh(_gram(matrix, 0, where), rank_in)[1]).T
    axis = 1 if wide else 0
    basis = as_numpy(leading_eigh(_gram(matrix, axis, where), max(rank_out, rank_in))[1])
    product = _projection(matrix, basis, axis, where)  # S V_kᵀ [k, in] (wide) or U_k S [out, k] (tall)
    if wide:
        return basis[:, :rank_out], np.linalg.qr(product[:rank_in].T)[0].T
    return np.linalg.qr(product[:, :rank_out])[0], basis[:, :rank_in].T


def _signed_tucker2(taps: np.ndarray, last: Array, first: Array) -> tuple[Array, Array, Array]:
    """``(last, core, first)`` of orthonormal factors of the ``[T, out, in]`` kernel, signs fixed, core in float64."""
    last = last * _column_signs(last)
    first = first * _column_signs(first.T)[:, None]
    # core[a, b, t] = Σ_{o, i} last[o, a] K[o, i, t] first[b, i], a tap at a time in float64 blocks
    core = np.empty((last.shape[1], first.shape[0], taps.shape[0]))
    for index, tap in enumerate(taps):
        core[:, :, index] = _projection(tap, last, 1, None) @ first.T
    return last, core, first


def tucker2(
    kernel: ArrayLike,
    rank_out: int,
    rank_in: int,
    moment: ArrayLike | None = None,
    max_iter: int = 100,
    tol: float = 1e-7,
) -> tuple[Array, Array, Array]:
    """Tucker-2 decomposition of a convolution kernel over its out and in channels.

    ``K[o, i, ...] ≈ Σ last[o, a] core[a, b, ...] first[b, i]``, computed by HOOI started from the
    HOSVD. Iteration stops when a sweep lowers the relative error ``e = ||K - K'|| / ||K||`` by at
    most ``tol``, or ``e²`` by no more than its rounding (a kernel exactly of these ranks stops after one
    sweep), or after ``max_iter`` sweeps, first in float32, then in float64 from there (``max_iter=0`` returns
    the float64 HOSVD). A 1x1 kernel takes no sweep: its HOSVD is its truncated SVD at the smaller rank, the
    optimum. Signs are deterministic: the
    largest-magnitude entry of each column of ``last`` and of each row of ``first`` is positive, and
    the core carries the matching signs, so the reconstruction does not depend on them.

    As a layer: ``first`` is a 1x1 conv ``in -> rank_in``, ``core`` a conv ``rank_in -> rank_out``
    with the original spatial shape, ``last`` a 1x1 conv ``rank_out -> out``.

    Data-free, ``last`` has orthonormal columns and ``first`` orthonormal rows. With ``moment``
    (``C = E[x xᵀ]`` over input channels), the in mode is whitened: HOOI runs on
    ``K' = K ×_in C^{1/2}``, and the whitened in-factor ``first'`` is mapped back as
    ``first = first' (C^{1/2})⁺`` (eigenvalues of ``C`` below ``1e-10 · max`` count as zero), so
    that on inputs in ``range(C)`` the factorized conv equals the whitened approximation. For 1x1
    kernels this minimises the expected output error exactly (for the in mode; the out mode is
    unweighted, as the output error needs). For larger kernels ``C`` only describes channels, not
    neighbouring taps, so it is the channel-moment approximation of the output error (an im2col
    moment over ``in · prod(k)`` would be exact).

    Args:
        kernel: ``[out, in, *k]`` with one, two or three spatial dimensions.
        rank_out: Rank of the out mode, ``1 <= rank_out <= out``.
        rank_in: Rank of the in mode, ``1 <= rank_in <= in``.
        moment: Optional ``[in, in]`` input-channel second moment for data-aware decomposition.
        max_iter: Maximum number of HOOI sweeps (``>= 0``).
        tol: Decrease of the relative error in a sweep at or below which HOOI stops (``>= 0``).

    Returns:
        ``(last [out, rank_out], core [rank_out, rank_in, *k], first [rank_in, in])`` in float64.

    Raises:
        ValueError: On a kernel that is not 3-D to 5-D or has NaN or Inf, ranks out of range, a
            moment of the wrong shape or not symmetric PSD, or a negative ``max_iter``/``tol``.
        TypeError: If a rank or ``max_iter`` is not an integer.
    """
    raw = np.asarray(kernel)
    if raw.ndim not in (3, 4, 5):
        raise ValueError(
            f"kernel must be [out, in, *k] with 1 to 3 spatial dimensions, got shape {raw.shape!r}"
            + (" (use svd_factors for a 2-D weight)" if raw.ndim == 2 else "")
        )
    # Data-free, a float32 kernel is not copied to float64 whole: _hooi holds one float64 copy of its own.
    array = _as_float64(raw, "kernel", keep_float32=moment is None)
    out_dim, in_dim = array.shape[:2]
    spatial = array.shape[2:]
    shape = array.shape
    rank_out = _check_rank(rank_out, "rank_out", out_dim, f"the out dimension of a kernel {shape!r}")
    rank_in = _check_rank(rank_in, "rank_in", in_dim, f"the in dimension of a kernel {shape!r}")
    max_iter = _as_int(max_iter, "max_iter")
    if max_iter < 0:
        raise ValueError(f"max_iter must be >= 0, got {max_iter!r}")
    tol_value = float(tol)
    if not (math.isfinite(tol_value) and tol_value >= 0.0):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")

    flat = array.reshape(out_dim, in_dim, -1)
    if moment is None:
        last, core, first = _hooi(flat, rank_out, rank_in, max_iter, tol_value)
    else:
        sqrt_moment, pinv_sqrt = _psd_sqrt_and_pinv(moment, in_dim)
        # K'[o, :, t] = K[o, :, t] @ C^{1/2}, i.e. C^{1/2} @ K[o] since C^{1/2} is symmetric.
        whitened = np.matmul(sqrt_moment, flat)
        last, core, first_white = _hooi(whitened, rank_out, rank_in, max_iter, tol_value)
        first = first_white @ pinv_sqrt
        signs = _column_signs(first.T)
        first = first * signs[:, None]
        core = core * signs[None, :, None]
    return last, core.reshape(rank_out, rank_in, *spatial), first


def _patch_projection(first: Array, taps: int) -> Array:
    """``B = first ⊗ I_T`` ``[r_in·T, in·T]``: a patch ordered ``(in, taps)`` to its ``(r_in, taps)`` projection."""
    return np.kron(first, np.eye(taps))


def refit_tucker2(
    kernel: ArrayLike,
    first: ArrayLike,
    rank_out: int,
    patch_moment: ArrayLike,
    damping: float = 1e-6,
) -> tuple[Array, Array]:
    """Best ``(last, core)`` for a fixed in-factor under the exact im2col output error.

    Minimises ``||(K_mat - last · core_mat · B) P^{1/2}||_F`` where ``K_mat = kernel.reshape(out, in·T)``,
    ``core_mat = core.reshape(r_out, r_in·T)``, ``B = first ⊗ I_T`` (``first`` applied to every tap of
    a patch ordered ``(in, *k)``, as ``torch.nn.functional.unfold`` orders it) and ``P = patch_moment``
    ``= E[p pᵀ]`` over the conv's im2col patches ``p``. With ``G = B P Bᵀ``::

        A = K_mat P Bᵀ (G + δI)⁻¹        (unconstrained optimum of last · core_mat)
        last = leading r_out eigenvectors of A G Aᵀ
        core_mat = lastᵀ A

    since the objective is ``||(X - A) G^{1/2}||²`` plus a constant in ``X = last · core_mat``, whose
    rank-``r_out`` optimum is ``U_r U_rᵀ A`` (Eckart–Young on ``A G^{1/2}``). ``δ = damping · tr(G)/n``
    (``n = r_in·T``) keeps the solve defined when ``G`` is singular. ``last`` has orthonormal columns,
    the largest-magnitude entry of each positive.

    Args:
        kernel: ``[out, in, *k]`` with one to three spatial dimensions.
        first: The in-factor ``[r_in, in]``.
        rank_out: Rank of the out mode, ``1 <= rank_out <= out`` (beyond ``r_in·T`` the extra
            columns of ``last`` get zero core rows).
        patch_moment: ``[in·T, in·T]`` im2col second moment ``E[p pᵀ]``.
        damping: Relative ridge on ``G`` (``>= 0``).

    Returns:
        ``(last [out, rank_out], core [rank_out, r_in, *k])`` in float64.

    Raises:
        ValueError: On shapes that do not chain, non-finite input, a moment that is not symmetric, a
            rank out of range or a negative damping.
        TypeError: If the rank is not an integer.
    """
    raw = np.asarray(kernel)
    if raw.ndim not in (3, 4, 5):
        raise ValueError(f"kernel must be [out, in, *k] with 1 to 3 spatial dimensions, got shape {raw.shape!r}")
    array = _as_float64(raw, "kernel")
    out_dim, in_dim = array.shape[:2]
    spatial = array.shape[2:]
    taps = int(np.prod(spatial))
    first_arr = _as_matrix(first, "first")
    if first_arr.shape[1] != in_dim:
        raise ValueError(f"first must be [r_in, {in_dim}] for a kernel of shape {array.shape!r}, "
                         f"got {first_arr.shape!r}")
    rank_in = first_arr.shape[0]
    width = rank_in * taps
    rank_out = _check_rank(rank_out, "rank_out", out_dim, f"the out dimension of a kernel {array.shape!r}")
    if np.asarray(patch_moment).shape != (in_dim * taps, in_dim * taps):
        raise ValueError(f"patch_moment must have shape ({in_dim * taps}, {in_dim * taps}) [in·taps, in·taps] "
                         f"for a kernel of shape {array.shape!r}, got {np.asarray(patch_moment).shape!r}")
    moment = _symmetric_moment(patch_moment, "patch_moment")
    ridge = float(damping)
    if not (math.isfinite(ridge) and ridge >= 0.0):
        raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
    matrix = array.reshape(out_dim, in_dim * taps)
    # B P without forming B: apply first over the in index of P viewed as [in, T·in·T].
    projected = (first_arr @ moment.reshape(in_dim, -1)).reshape(width, in_dim * taps)  # B P
    gram = (first_arr @ projected.reshape(rank_in, taps, in_dim, taps).transpose(2, 0, 1, 3)
            .reshape(in_dim, -1)).reshape(rank_in, rank_in, taps, taps)
    gram = gram.transpose(1, 2, 0, 3).reshape(width, width)  # B P Bᵀ
    gram = 0.5 * (gram + gram.T)
    target = matrix @ projected.T  # K P Bᵀ
    scale = max(float(np.trace(gram)) / width, _TINY)
    solved = np.linalg.solve(gram + ridge * scale * np.eye(width), target.T).T  # A
    weighted = solved @ gram @ solved.T
    _, last = leading_eigh(0.5 * (weighted + weighted.T), rank_out)
    last = last * _column_signs(last)
    core = last.T @ solved
    return last, core.reshape(rank_out, rank_in, *spatial)


def reconstruct_tucker2(last: ArrayLike, core: ArrayLike, first: ArrayLike) -> Array:
    """Rebuilds a kernel from its Tucker-2 factors: ``Σ last[o, a] core[a, b, ...] first[b, i]``.

    Args:
        last: ``[out, rank_out]``.
        core: ``[rank_out, rank_in, *k]``.
        first: ``[rank_in, in]``.

    Returns:
        The ``[out, in, *k]`` kernel in float64.

    Raises:
        ValueError: If the shapes do not chain.
    """
    last_arr = np.asarray(last, dtype=np.float64)
    core_arr = np.asarray(core, dtype=np.float64)
    first_arr = np.asarray(first, dtype=np.float64)
    if (
        last_arr.ndim != 2
        or first_arr.ndim != 2
        or core_arr.ndim < 2
        or core_arr.shape[:2] != (last_arr.shape[1], first_arr.shape[0])
    ):
        raise ValueError(
            "Tucker-2 factors do not chain: expected last [out, r_out], core [r_out, r_in, *k], "
            f"first [r_in, in], got {last_arr.shape!r}, {core_arr.shape!r}, {first_arr.shape!r}"
        )
    rank_out, rank_in = core_arr.shape[:2]
    spatial = core_arr.shape[2:]
    flat = core_arr.reshape(rank_out, rank_in, -1)
    # [out, r_in, T] -> apply first over r_in -> [out, in, T]
    mixed = (last_arr @ flat.reshape(rank_out, -1)).reshape(last_arr.shape[0], rank_in, -1)
    result = np.matmul(first_arr.T, mixed)
    return result.reshape(last_arr.shape[0], first_arr.shape[1], *spatial)


def relative_error(reference: ArrayLike, approx: ArrayLike) -> float:
    """``||reference - approx||_F / ||reference||_F`` (the denominator floored at the smallest float).

    Args:
        reference: The exact array.
        approx: Its approximation, same shape.

    Returns:
        The relative Frobenius error.

    Raises:
        ValueError: If the shapes differ.
    """
    ref = np.asarray(reference, dtype=np.float64)
    app = np.asarray(approx, dtype=np.float64)
    if ref.shape != app.shape:
        raise ValueError(f"shapes differ: reference {ref.shape!r}, approximation {app.shape!r}")
    return float(np.linalg.norm(ref - app)) / max(float(np.linalg.norm(ref)), _TINY)


def _smallest_normal(dtype: np.dtype) -> float | None:
    """The smallest positive normal number of ``dtype``; None for non-floating dtypes."""
    if dtype.kind == "f":
        return float(np.finfo(dtype).tiny)
    if dtype.name == "bfloat16":  # ml_dtypes: float32's exponent range, which np.finfo does not know
        return float(np.finfo(np.float32).tiny)
    return None


def flush_subnormals(array: np.ndarray) -> tuple[np.ndarray, int]:
    """``array`` with its subnormal values set to zero, in its own dtype, and how many there were.

    Args:
        array: Any array; only floating dtypes (float16/32/64, bfloat16) can hold subnormals.

    Returns:
        ``(flushed, count)``: ``array`` itself when ``count`` is 0, else a new array of the same
        dtype and shape.
    """
    tiny = _smallest_normal(array.dtype)
    if tiny is None or array.size == 0:
        return array, 0
    magnitude = np.abs(array.astype(np.float64) if array.dtype.kind != "f" else array)
    subnormal = (magnitude < tiny) & (magnitude > 0)
    count = int(np.count_nonzero(subnormal))
    if count == 0:
        return array, 0
    flushed = np.array(array, copy=True)
    flushed[subnormal] = 0
    return flushed, count
