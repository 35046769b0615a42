"""Two-factor forms of a k x k convolution: spatial SVD and channel SVD (pure numpy).

A kernel ``K [out, in, kh, kw]`` (channel SVD: any number of spatial dims) is rearranged into a
matrix whose truncated SVD (``_linalg.svd_factors``: ``M ≈ left @ right``, ``left = U_r √S_r``,
``right = √S_r V_rᵀ``, Eckart–Young optimal) gives the weights of two chained convolutions. The
error of the kernel is the error of the matrix: the rearrangement only permutes entries, so
``||K - K'||_F = ||M - M'||_F = sqrt(Σ_{i>r} s_i²)`` for the singular values ``s_i`` of ``M``.

Channel SVD (a k x k conv to ``r`` channels, then a 1x1 conv; Zhang et al. 2016)::

    M[o, (c, t)] = K[o, c, t]                  M [out, in·T], T = kh·kw taps, t over the taps
    first[s, c, t] = right[s, (c, t)]          conv.0: k x k, in -> r, the original stride/padding/dilation
    last[o, s]     = left[o, s]                conv.1: 1x1, r -> out, the original bias
    K'[o, c, t]    = Σ_s last[o, s] first[s, c, t]

Spatial SVD (a kh x 1 conv to ``r`` channels, then a 1 x kw conv; Jaderberg et al. 2014, scheme 2,
as AIMET does)::

    M[(c, i), (o, j)] = K[o, c, i, j]          M [in·kh, out·kw]
    vertical[s, c, i]   = left[(c, i), s]      conv.0: kh x 1, in -> r, stride/padding/dilation of the rows
    horizontal[o, s, j] = right[s, (o, j)]     conv.1: 1 x kw, r -> out, those of the columns, the bias
    K'[o, c, i, j] = Σ_s vertical[s, c, i] horizontal[o, s, j]

Costs of a conv ``[out, in, kh, kw]`` at rank ``r`` with ``P`` output positions (``H_o x W_o``;
spatial SVD's first conv computes ``H_o x W`` positions, ``W`` the padded input width over its column
dilation span, about ``W_o · stride_w``):

=============  =========================  ====================================================
form           parameters                 multiply-adds
=============  =========================  ====================================================
original       out·in·kh·kw               out·in·kh·kw·P
Tucker-2       r_in·in + r_out·r_in·kh·kw (r_in·in·P_in + r_out·r_in·kh·kw + out·r_out)·P
               + out·r_out
channel SVD    r·(in·kh·kw + out)         r·(in·kh·kw + out)·P
spatial SVD    r·(in·kh + out·kw)         r·in·kh·H_o·W + r·out·kw·P
=============  =========================  ====================================================

Channel SVD keeps the full k x k receptive field in one conv at ``r`` output channels; spatial SVD
splits it into two thin convs, cheapest when both ``in`` and ``out`` are large. Which one is faster
on a given runtime is measured (``backends.latency``), not assumed.

Data-aware spatial SVD. The vertical conv's input is the layer's own input, so its side of ``M`` (the
rows ``(c, i)``) is whitened by the second moment ``Q`` of a kh-tall input column ``q`` (one tap column
of an im2col patch ``p``, ordered ``(c, i, j)``). Counting each column offset ``j`` alone, the output
error is ``Σ_j E||(K - K')_j q_j||² = ||Q^{1/2} (M - M')||_F²``, whose rank-``r`` optimum is the
whitened SVD of ``Mᵀ`` (``_linalg.whitened_svd_factors(Mᵀ, Q, r)``)::

    Q[(c, i), (c', i')] = (1/kw) Σ_j P[(c, i, j), (c', i', j)]      from the patch moment P = E[p pᵀ]
    Q = C ⊗ I_kh                                                   from the channel moment C alone

With ``P`` the columns' correlations across ``j`` count too: for the vertical factor ``V`` fixed, the
horizontal factor minimising the exact output error ``E||K p - H T p||²`` (``T p`` the vertical
conv's outputs ``z[(s, j)] = Σ_{c,i} V[s, c, i] p[(c, i, j)]``) is the least-squares fit::

    H = K P Tᵀ (T P Tᵀ + δ I)⁻¹      (δ a relative ridge, as in ``_linalg.refit_tucker2``)

which the engine keeps where it lowers the exact error of the whitened start (near full rank the
ridge can cost more than the refit gains).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from lowrank_ir import _linalg

__all__ = ["channel_factors", "channel_kernel", "channel_matrix", "channel_params", "spatial_column_moment",
           "spatial_factors", "spatial_kernel", "spatial_matrix", "spatial_params", "spatial_refit_horizontal",
           "spatial_row_moment", "whitened_spatial_factors"]


def _kernel(kernel: np.ndarray, ndim: int | None = None) -> np.ndarray:
    array = np.asarray(kernel)
    if array.ndim < 3 or (ndim is not None and array.ndim != ndim):
        wanted = f"{ndim}-D [out, in, kh, kw]" if ndim is not None else "[out, in, *k] with 1 to 3 spatial dims"
        raise ValueError(f"a conv kernel must be {wanted}, got shape {list(array.shape)}")
    return array


# ------------------------------------------------------------------------------------------ channel SVD

def channel_matrix(kernel: np.ndarray) -> np.ndarray:
    """``M [out, in·T]`` with ``M[o, (c, t)] = K[o, c, t]``: the kernel's out-mode unfolding."""
    array = _kernel(kernel)
    return array.reshape(array.shape[0], -1)


def channel_factors(kernel: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, float]:
    """``(first [r, in, *k], last [out, r, 1...], relative error)`` of the rank-``r`` channel SVD (float64)."""
    array = _kernel(kernel)
    matrix = channel_matrix(array)
    left, right = _linalg.svd_factors(matrix, rank)
    error = _linalg.svd_relative_error(matrix, left, right)
    ones = (1,) * (array.ndim - 2)
    return right.reshape(rank, *array.shape[1:]), left.reshape(array.shape[0], rank, *ones), error


def channel_kernel(first: np.ndarray, last: np.ndarray) -> np.ndarray:
    """``K'[o, c, t] = Σ_s last[o, s] first[s, c, t]``: the kernel the two convs compute."""
    rank = first.shape[0]
    product = last.reshape(last.shape[0], rank) @ first.reshape(rank, -1)
    return product.reshape(last.shape[0], *first.shape[1:])


def channel_params(shape: Sequence[int], rank: int) -> int:
    """Parameters of the channel SVD of a kernel of ``shape`` at ``rank`` (no bias): ``r·(in·T + out)``."""
    return rank * (int(shape[1]) * math.prod(shape[2:]) + int(shape[0]))


# ------------------------------------------------------------------------------------------ spatial SVD

def spatial_matrix(kernel: np.ndarray) -> np.ndarray:
    """``M [in·kh, out·kw]`` with ``M[(c, i), (o, j)] = K[o, c, i, j]``."""
    array = _kernel(kernel, 4)
    out, inp, height, width = array.shape
    return array.transpose(1, 2, 0, 3).reshape(inp * height, out * width)


def spatial_factors(kernel: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, float]:
    """``(vertical [r, in, kh, 1], horizontal [out, r, 1, kw], relative error)`` of the rank-``r`` spatial SVD."""
    array = _kernel(kernel, 4)
    out, inp, height, width = array.shape
    matrix = spatial_matrix(array)
    left, right = _linalg.svd_factors(matrix, rank)
    error = _linalg.svd_relative_error(matrix, left, right)
    vertical = left.T.reshape(rank, inp, height, 1)
    horizontal = right.reshape(rank, out, width).transpose(1, 0, 2).reshape(out, rank, 1, width)
    return vertical, horizontal, error


def spatial_kernel(vertical: np.ndarray, horizontal: np.ndarray) -> np.ndarray:
    """``K'[o, c, i, j] = Σ_s vertical[s, c, i] horizontal[o, s, j]``: the kernel the two convs compute."""
    return np.einsum("sci,osj->ocij", vertical[..., 0], horizontal[:, :, 0, :])


def spatial_params(shape: Sequence[int], rank: int) -> int:
    """Parameters of the spatial SVD of a kernel of ``shape`` at ``rank`` (no bias): ``r·(in·kh + out·kw)``."""
    out, inp, height, width = (int(dim) for dim in shape)
    return rank * (inp * height + out * width)


# -------------------------------------------------------------------------------------- data-aware spatial SVD

def spatial_column_moment(patch_moment: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """``Q [in·kh, in·kh]``, the moment of the vertical conv's input columns, from the im2col patch moment.

    ``Q[(c, i), (c', i')] = (1/kw) Σ_j P[(c, i, j), (c', i', j)]`` for a kernel of ``shape``
    ``[out, in, kh, kw]`` and ``P [in·kh·kw, in·kh·kw]`` ordered ``(c, i, j)``.
    """
    _, inp, height, width = (int(dim) for dim in shape)
    blocks = np.asarray(patch_moment, dtype=np.float64).reshape(inp, height, width, inp, height, width)
    return np.einsum("aibcjb->aicj", blocks).reshape(inp * height, inp * height) / width


def spatial_row_moment(moment: np.ndarray, height: int) -> np.ndarray:
    """``Q = C ⊗ I_kh``: the column moment from the input-channel moment ``C`` alone (rows uncorrelated)."""
    return np.kron(np.asarray(moment, dtype=np.float64), np.eye(height))


def whitened_spatial_factors(kernel: np.ndarray, rank: int, moment: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(vertical [r, in, kh, 1], horizontal [out, r, 1, kw])`` minimising ``||Q^{1/2} (M - M')||_F`` (float64).

    ``moment``: ``Q``, the moment of the vertical conv's input columns (:func:`spatial_column_moment`
    or :func:`spatial_row_moment`). With ``Q = I`` this is :func:`spatial_factors`'s fit.
    """
    array = _kernel(kernel, 4)
    out, inp, height, width = array.shape
    left, right = _linalg.whitened_svd_factors(spatial_matrix(array).T, moment, rank)  # Mᵀ ≈ left @ right
    vertical = right.reshape(rank, inp, height, 1)
    horizontal = left.reshape(out, width, rank).transpose(0, 2, 1).reshape(out, rank, 1, width)
    return vertical, horizontal


def spatial_refit_horizontal(kernel: np.ndarray, vertical: np.ndarray, patch_moment: np.ndarray,
                             damping: float = 1e-6) -> np.ndarray:
    """The ``horizontal [out, r, 1, kw]`` minimising the exact output error for a fixed ``vertical`` (float64).

    ``H = K P Tᵀ (T P Tᵀ + δ I)⁻¹`` (module docstring) with ``P = patch_moment`` ordered ``(c, i, j)``,
    ``δ = damping · tr(T P Tᵀ) / (r·kw)``; ``T`` is applied to ``P`` without being formed.
    """
    array = _kernel(kernel, 4).astype(np.float64)
    out, inp, height, width = array.shape
    rank = vertical.shape[0]
    taps = inp * height * width
    columns = np.asarray(vertical, dtype=np.float64).reshape(rank, inp * height)
    moment = np.asarray(patch_moment, dtype=np.float64).reshape(inp * height, width * taps)
    applied = (columns @ moment).reshape(rank * width, taps)  # T P, rows (s, j)
    gram = np.tensordot(applied.reshape(rank * width, inp * height, width), columns, axes=([1], [1]))
    gram = gram.transpose(0, 2, 1).reshape(rank * width, rank * width)  # T P Tᵀ, (s, j) x (s', j')
    gram = 0.5 * (gram + gram.T)
    target = array.reshape(out, taps) @ applied.T  # K P Tᵀ
    ridge = damping * max(float(np.trace(gram)) / (rank * width), float(np.finfo(np.float64).tiny))
    solved = np.linalg.solve(gram + ridge * np.eye(rank * width), target.T).T  # [out, (s, j)]
    return solved.reshape(out, rank, 1, width)
