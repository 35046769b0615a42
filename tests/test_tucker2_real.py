"""Tucker-2's HOOI stopping rule on real conv kernels: near a run to convergence, never worse than the reference.

The kernels are PP-OCR's (``rapidocr-onnxruntime``, trained weights): the detector's k x k convs with more
than one input channel per group (the others are depthwise) and some of its 1x1 convs at unequal ranks
(which take HOOI too). The reference is msModelSlim's own ``tucker()``, run on the same kernel and ranks
as its ``low_rank_decompose`` runs it (float32 input, modes out and in).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import pytest

from tests.onnx_models import ppocr_file
from tests.skips import require

onnx_frontend = pytest.importorskip("frontends.onnx")
reference_tucker = require("msmodelslim.common.low_rank_decompose.tucker")

from lowrank_ir._engine import HOOI_MAX_ITER, HOOI_TOL  # noqa: E402
from lowrank_ir._linalg import reconstruct_tucker2, relative_error, tucker2, tucker2_relative_error  # noqa: E402

pytestmark = pytest.mark.reference

#: How far above a run to convergence (relative) the engine's stopping rule may leave a trained kernel's error:
#: measured at most 1.3e-4 on these kernels and ranks.
CONVERGENCE_MARGIN = 2e-4

#: Ranks as fractions of (out, in): a quarter of both, half the out mode, half of both.
RANK_FRACTIONS = [(0.25, 0.25), (0.5, 0.25), (0.5, 0.5)]


@pytest.fixture(autouse=True, scope="module")
def _quiet_reference() -> Iterator[None]:
    """The reference logs every Tucker iteration at INFO; keep test output readable."""
    from msmodelslim import logger

    level = logger.level
    logger.setLevel(logging.WARNING)
    yield
    logger.setLevel(level)


@pytest.fixture(scope="module")
def det_kernels() -> dict[str, np.ndarray]:
    """PP-OCR det's conv kernels with at least 16 out and in channels: its six k x k ones and its 1x1 ones."""
    graph = onnx_frontend.lower(onnx_frontend.load_model(ppocr_file("det")))
    kernels = {}
    for name, value in graph.params.items():
        array = np.asarray(value, dtype=np.float64)
        if array.ndim == 4 and min(array.shape[:2]) >= 16:
            kernels[name] = array
    assert sum(kernel.shape[2] > 1 for kernel in kernels.values()) == 6
    return kernels


def _ranks(kernel: np.ndarray, fractions: tuple[float, float]) -> tuple[int, int]:
    return max(1, int(kernel.shape[0] * fractions[0])), max(1, int(kernel.shape[1] * fractions[1]))


def _engine_error(kernel: np.ndarray, ranks: tuple[int, int]) -> float:
    """The error of Tucker-2 as the engine runs it (its tolerance and sweep limit)."""
    return tucker2_relative_error(kernel, tucker2(kernel, *ranks, max_iter=HOOI_MAX_ITER, tol=HOOI_TOL)[1])


def _reference_error(kernel: np.ndarray, ranks: tuple[int, int]) -> float:
    core, (last, first) = reference_tucker.tucker(kernel.astype(np.float32), ranks=ranks, modes=[0, 1])
    approx = reconstruct_tucker2(last, np.asarray(core), np.asarray(first).T)
    return relative_error(kernel, approx)


@pytest.mark.parametrize("fractions", RANK_FRACTIONS)
def test_stopping_rule_error_is_near_a_run_to_convergence_on_trained_kernels(det_kernels, fractions) -> None:
    for name, kernel in det_kernels.items():
        if kernel.shape[2] == 1:
            continue
        ranks = _ranks(kernel, fractions)
        stopped = _engine_error(kernel, ranks)
        converged = tucker2_relative_error(kernel, tucker2(kernel, *ranks, max_iter=5000, tol=1e-12)[1])
        assert converged - 1e-12 <= stopped <= converged * (1 + CONVERGENCE_MARGIN), (name, ranks, stopped, converged)


@pytest.mark.parametrize("fractions", RANK_FRACTIONS)
def test_stopping_rule_error_is_no_worse_than_the_reference_tucker(det_kernels, fractions) -> None:
    # 1e-9 absolute: on the 1x1 kernels both reach the same optimum (an SVD's), up to float32 rounding.
    checked = 0
    for name, kernel in det_kernels.items():
        ranks = _ranks(kernel, fractions)
        if kernel.shape[2] == 1 and ranks[0] == ranks[1]:
            continue  # the engine factors this as a matrix, not by HOOI
        ours, theirs = _engine_error(kernel, ranks), _reference_error(kernel, ranks)
        assert ours <= theirs + 1e-9, (name, ranks, ours, theirs)
        checked += 1
    assert checked >= 6


def test_stopping_rule_on_random_weights_is_no_worse_than_the_reference() -> None:
    # Random init (flat spectra, the benchmarks' ResNet-50): HOOI's slowest convergence, where the float32
    # sweeps take Rayleigh–Ritz steps (ranks a quarter of each side).
    rng = np.random.default_rng(31)
    kernel = rng.standard_normal((256, 256, 3, 3)) / 48.0
    ours, theirs = _engine_error(kernel, (64, 64)), _reference_error(kernel, (64, 64))
    assert ours <= theirs, (ours, theirs)
