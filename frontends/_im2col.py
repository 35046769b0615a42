"""Im2col patch moments of 2-D convs from layer inputs held as numpy arrays (ONNX and MindSpore frontends).

A k x k conv computes ``y = K_mat p`` on every im2col patch ``p`` (length ``in · kh · kw``, ordered
``(in, kh, kw)`` like ``kernel.reshape(out, -1)``), so ``E[p pᵀ]`` gives its exact output error. The
patches here are exactly what the conv sees: the input zero-padded by the IR ``padding`` (explicit
``(h, w)`` / ``(begin..., end...)``, or ``"valid"``, or ``"same"``/``"same_lower"`` resolved on the
input size as ONNX's SAME_UPPER/SAME_LOWER and MindSpore's ``same`` do), strided and dilated.
"""

from __future__ import annotations

import math

import numpy as np

from lowrank_ir import Node, Op

__all__ = ["MAX_PATCH_FEATURES", "collects_patches", "patch_moment_sum"]


#: Largest im2col patch length ``in · prod(k)`` whose second moment is collected (a 4608² float64
#: matrix is 170 MB; beyond it the channel moment is used).
MAX_PATCH_FEATURES = 4608


def collects_patches(node: Node) -> bool:
    """Whether the im2col patch moment of ``node`` is collected: 2-D ungrouped k x k convs, not too wide."""
    if node.op is not Op.CONV:
        return False
    kernel = tuple(node.attrs["kernel_size"])
    return (len(kernel) == 2 and math.prod(kernel) > 1 and node.attrs.get("groups", 1) == 1
            and node.attrs.get("padding_mode", "zeros") == "zeros" and node.attrs.get("data_format", "NCHW") == "NCHW"
            and int(node.attrs["in_channels"]) * math.prod(kernel) <= MAX_PATCH_FEATURES)


def _pads(node: Node, spatial: tuple[int, ...]) -> list[tuple[int, int]]:
    """Per spatial axis ``(begin, end)`` zero padding of a conv, resolving ``auto_pad`` on the input size."""
    padding = node.attrs["padding"]
    kernel, stride, dilation = node.attrs["kernel_size"], node.attrs["stride"], node.attrs["dilation"]
    ndim = len(kernel)
    if padding == "valid":
        return [(0, 0)] * ndim
    if isinstance(padding, str):  # SAME_UPPER ("same") puts the odd pixel at the end, SAME_LOWER at the start
        pads = []
        for size, k, s, d in zip(spatial, kernel, stride, dilation, strict=True):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small, large = total // 2, total - total // 2
            pads.append((small, large) if padding == "same" else (large, small))
        return pads
    values = [int(p) for p in padding]
    if len(values) == ndim:
        return [(value, value) for value in values]
    return list(zip(values[:ndim], values[ndim:], strict=True))


def patch_moment_sum(node: Node, x: np.ndarray) -> tuple[np.ndarray, int]:
    """``(Σ p pᵀ, number of patches)`` over the im2col patches ``p`` (ordered (in, kh, kw)) the conv sees.

    Products are taken in float32 one image at a time (bounded memory) and summed in float64.
    """
    kernel, stride, dilation = node.attrs["kernel_size"], node.attrs["stride"], node.attrs["dilation"]
    pads = _pads(node, tuple(x.shape[2:]))
    padded = np.pad(x.astype(np.float32, copy=False), [(0, 0), (0, 0), *pads])
    window = tuple((k - 1) * d + 1 for k, d in zip(kernel, dilation, strict=True))
    features = int(node.attrs["in_channels"]) * math.prod(kernel)
    total = np.zeros((features, features))
    count = 0
    for image in padded:
        # [1, H', W', C, kh', kw'] -> strided output positions and dilated taps -> [H'', W'', C, kh, kw]
        views = np.lib.stride_tricks.sliding_window_view(image, (image.shape[0], *window))[0]
        views = views[::stride[0], ::stride[1], :, ::dilation[0], ::dilation[1]]
        rows = np.ascontiguousarray(views).reshape(-1, features)
        total += (rows.T @ rows).astype(np.float64)
        count += rows.shape[0]
    return total, count
