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
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from lowrank_ir import _linalg

__all__ = ["channel_factors", "channel_kernel", "channel_matrix", "channel_params", "spatial_factors",
           "spatial_kernel", "spatial_matrix", "spatial_params"]


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
