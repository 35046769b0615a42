"""Rank estimation by empirical variational Bayesian matrix factorization (EVBMF).

Nakajima, Sugiyama, Babacan and Tomioka (2013), "Global analytic solution of fully-observed
variational Bayesian matrix factorization", JMLR 14. For an ``L x M`` matrix ``V`` with singular
values ``γ_1 >= γ_2 >= ...`` and Gaussian noise of variance ``σ²``, write ``α = L / M``,
``x_h = γ_h² / (M σ²)``, ``τ̄ = 2.5129 √α`` and ``x̄ = (1 + τ̄)(1 + α / τ̄)``.

- A component survives EVBMF exactly when ``γ_h > γ̄ = sqrt(M σ² x̄)``; the estimated rank is the
  number of such singular values.
- The noise variance is the minimiser of the (scaled) free energy

      Ω(σ²) = Σ_h ψ₀(x_h) + Σ_{h: x_h > x̄} ψ₁(x_h),
      ψ₀(x) = x - log x,
      ψ₁(x) = log(τ(x) + 1) + α log(τ(x) / α + 1) - τ(x),
      τ(x)  = (x - (1 + α) + sqrt((x - (1 + α))² - 4α)) / 2,

  over ``σ²`` in ``[σ̲², σ̄²]``, ``σ̄² = ||V||_F² / (L M)`` and
  ``σ̲² = max(γ_{ē+1}² / (M x̄), mean_{h > ē} γ_h² / M)`` with ``ē = min(⌈L / (1 + α)⌉ - 1, L)``.
  The global minimiser lies in that interval, found by a bounded scalar search.

The paper takes ``L <= M``; we follow the reference tool (msModelSlim's ``evbmf``) instead and use
``L`` = rows, ``M`` = columns whatever the orientation, so the ranks match it layer for layer. When
``L > M`` the ``L - M`` missing singular values are zero: in ``Σ_h ψ₀`` they contribute only
``(L - M) log σ²`` (plus a constant), and the mean in ``σ̲²`` runs over the ``M`` computed values.
Three more details follow the reference so that its bounded search takes the same path:
the search is scipy's ``minimize_scalar(method="bounded")`` with its default absolute tolerance
(``xatol = 1e-5``, so the estimate depends on the scale of the matrix), the divisor ``M σ²`` in
``x_h`` is floored at ``1e-6``, and ``ē`` is clipped to ``[1, L - 1]`` (then to the number of
computed singular values, where the reference would fail with an IndexError on ``[L, 1]``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["evbmf_rank", "vbmf_ranks"]

#: ``τ̄ = TAU_BAR_COEFFICIENT · √α`` (Nakajima et al. 2013, the EVBMF threshold constant).
TAU_BAR_COEFFICIENT = 2.5129

#: Floor of the divisors ``M σ²`` (and ``L M``), as in the reference implementation.
DIVISOR_FLOOR = 1e-6


def _floored(value: float) -> float:
    return max(value, DIVISOR_FLOOR)


def _free_energy(
    sigma2: float,
    squared: NDArray[np.float64],
    rows: int,
    cols: int,
    x_bar: float,
) -> float:
    """The scaled EVBMF free energy ``Ω(σ²)`` (up to a constant) for squared singular values."""
    alpha = rows / cols
    x = squared / _floored(cols * sigma2)
    above = x[x > x_bar]
    below = x[x <= x_bar]
    shifted = above - (1.0 + alpha)
    tau = 0.5 * (shifted + np.sqrt(shifted**2 - 4.0 * alpha))
    energy = float(np.sum(below - np.log(below)))
    energy += float(np.sum(above - tau + np.log((tau + 1.0) / above) + alpha * np.log(tau / alpha + 1.0)))
    # The rows - len(squared) singular values that are exactly zero (rows > cols).
    energy += (rows - squared.size) * math.log(sigma2)
    return energy


def evbmf_rank(matrix: ArrayLike) -> int:
    """Number of singular values kept by EVBMF, with the noise variance estimated.

    The rows are ``L`` and the columns ``M`` as given (no transpose when ``L > M``, like the
    reference tool). See the module docstring for the formulas.

    Args:
        matrix: A finite 2-D matrix.

    Returns:
        The EVBMF rank, between 0 and ``min(L, M)``.

    Raises:
        ValueError: If the matrix is not 2-D, is empty, or has NaN or Inf.
    """
    from scipy.optimize import minimize_scalar

    array = np.asarray(matrix)
    if array.ndim != 2 or array.size == 0:
        raise ValueError(f"evbmf_rank needs a non-empty 2-D matrix, got shape {array.shape!r}")
    values = np.asarray(array, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError(f"matrix of shape {values.shape!r} contains NaN or Inf")
    rows, cols = values.shape
    # The squared singular values are the eigenvalues of the smaller side's Gram matrix: several times
    # cheaper than an SVD, and exact to eps·s_1², far below any threshold EVBMF draws.
    gram = values @ values.T if rows <= cols else values.T @ values
    squared = np.clip(np.linalg.eigvalsh(gram)[::-1], 0.0, None)
    singular = np.sqrt(squared)

    alpha = rows / cols
    tau_bar = TAU_BAR_COEFFICIENT * math.sqrt(alpha)
    x_bar = (1.0 + tau_bar) * (1.0 + alpha / tau_bar)

    # Bounds of the noise variance (the paper's σ̲² and σ̄²), 0-based index first = ē.
    e_bar = min(math.ceil(rows / (1.0 + alpha)) - 1, rows)
    first = min(max(e_bar, 1), rows - 1, squared.size - 1)
    first = max(first, 0)
    upper = float(np.sum(squared)) / _floored(rows * cols)
    lower = max(
        float(squared[first]) / _floored(cols * x_bar),
        float(np.mean(squared[first:])) / cols,
    )
    if upper < lower:
        lower, upper = upper, lower

    args: tuple[Any, ...] = (squared, rows, cols, x_bar)
    result = minimize_scalar(_free_energy, args=args, bounds=(lower, upper), method="bounded")
    sigma2 = float(result.x)

    threshold = math.sqrt(cols * sigma2 * x_bar)
    return int(np.count_nonzero(singular > threshold))


def vbmf_ranks(weight: ArrayLike) -> tuple[int, int]:
    """EVBMF ranks of a weight's out and in unfoldings, each at least 1.

    Args:
        weight: ``[out, in]`` or ``[out, in, *k]``.

    Returns:
        ``(rank of the [out, in·prod(k)] unfolding, rank of the [in, out·prod(k)] unfolding)``,
        each raised to at least 1.

    Raises:
        ValueError: If the weight has fewer than 2 dimensions, is empty, or has NaN or Inf.
    """
    array = np.asarray(weight)
    if array.ndim < 2:
        raise ValueError(f"vbmf_ranks needs a weight [out, in, *k], got shape {array.shape!r}")
    out_unfolding = array.reshape(array.shape[0], -1)
    in_unfolding = np.swapaxes(array, 0, 1).reshape(array.shape[1], -1)
    return max(evbmf_rank(out_unfolding), 1), max(evbmf_rank(in_unfolding), 1)
