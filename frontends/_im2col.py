"""Im2col patch moments of 2-D convs from layer inputs held as numpy arrays (ONNX and MindSpore frontends).

A k x k conv computes ``y = K_mat p`` on every im2col patch ``p`` (length ``in · kh · kw``, ordered
``(in, kh, kw)`` like ``kernel.reshape(out, -1)``), so ``E[p pᵀ]`` gives its exact output error. The
patches here are exactly what the conv sees: the input zero-padded by the IR ``padding`` (any form,
resolved on the input size by ``lowrank_ir.conv_pads``), strided and dilated.
"""

from __future__ import annotations

import math

import numpy as np

from lowrank_ir import Node, Op, conv_pads

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


def patch_moment_sum(node: Node, x: np.ndarray) -> tuple[np.ndarray, int]:
    """``(Σ p pᵀ, number of patches)`` over the im2col patches ``p`` (ordered (in, kh, kw)) the conv sees.

    Products are taken in float32 one image at a time (bounded memory) and summed in float64.
    """
    kernel, stride, dilation = node.attrs["kernel_size"], node.attrs["stride"], node.attrs["dilation"]
    begins, ends = conv_pads(node.attrs["padding"], x.shape[2:], kernel, stride, dilation)
    padded = np.pad(x.astype(np.float32, copy=False), [(0, 0), (0, 0), *zip(begins, ends, strict=True)])
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
