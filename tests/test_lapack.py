"""LAPACK's symmetric eigensolvers through LAPACKE: scipy's results, without holding the GIL."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import scipy.linalg

from lowrank_ir import _lapack
from lowrank_ir._linalg import leading_eigh

pytestmark = pytest.mark.skipif(not _lapack.available(), reason="no OpenBLAS with LAPACKE is loaded")


def _symmetric(size: int, dtype: type, seed: int = 0) -> np.ndarray:
    rows: np.ndarray = np.random.default_rng(seed).standard_normal((size, 2 * size)).astype(dtype)
    return rows @ rows.T


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("subset", [None, (150, 199), (0, 0)])
def test_eigh_gives_scipys_pairs_and_leaves_its_input(dtype: type, subset: tuple[int, int] | None) -> None:
    matrix = _symmetric(200, dtype)
    before = matrix.copy()
    values, vectors = _lapack.eigh(matrix, subset)  # type: ignore[misc]
    expected_values, expected_vectors = scipy.linalg.eigh(matrix, subset_by_index=subset,
                                                          driver="evd" if subset is None else "evr")
    assert values.dtype == dtype and vectors.dtype == dtype
    np.testing.assert_array_equal(matrix, before)
    # the same LAPACK routines on the same library: equal, not just close
    np.testing.assert_array_equal(values, expected_values)
    np.testing.assert_array_equal(vectors, expected_vectors)


def test_eigh_reads_the_lower_triangle_as_scipy_does() -> None:
    matrix = _symmetric(50, np.float64)
    lower = np.tril(matrix) + np.triu(np.full_like(matrix, 7.0), 1)  # garbage above the diagonal
    np.testing.assert_allclose(_lapack.eigh(lower)[0], np.linalg.eigvalsh(matrix), rtol=1e-10)  # type: ignore[index]


def test_eigh_refuses_a_matrix_it_cannot_solve() -> None:
    with pytest.raises(np.linalg.LinAlgError, match="syevd failed"):
        _lapack.eigh(np.full((4, 4), np.nan))


def _python_steps_during(solve: Callable[[], Any]) -> int:
    """How many steps of a Python loop the main thread runs while another thread is inside ``solve()``."""
    inside, done = threading.Event(), threading.Event()

    def run() -> None:
        inside.set()
        solve()
        done.set()

    worker = threading.Thread(target=run)
    worker.start()
    inside.wait()
    steps = 0
    while not done.is_set():
        steps += 1
    worker.join()
    return steps


def test_eigh_lets_other_threads_run_where_scipys_wrapper_does_not() -> None:
    # The engine's worker threads factorize layers in parallel only if the eigensolver releases the GIL. scipy's
    # f2py wrapper holds it: the main thread steps only around the solver's run, in its checks and copies (0.2 to
    # 0.3 million steps here, one BLAS thread), while ours lets it step throughout (1.4 to 2.2 million). If ours
    # held the GIL too, the two counts would be alike. Best of three each, against the machine's noise.
    from threadpoolctl import threadpool_limits

    matrix = _symmetric(1000, np.float32, seed=1)
    with threadpool_limits(limits=1, user_api="blas"):
        held = min(_python_steps_during(lambda: scipy.linalg.eigh(matrix, driver="evd")) for _ in range(3))
        released = max(_python_steps_during(lambda: _lapack.eigh(matrix)) for _ in range(3))
    assert released > 3 * held, (released, held)


def test_leading_eigh_takes_the_lapacke_solvers_for_float32_and_partial_problems(monkeypatch) -> None:
    calls: list[tuple[int, int] | None] = []
    original = _lapack.eigh

    def counted(matrix: np.ndarray, subset: tuple[int, int] | None = None) -> Any:
        calls.append(subset)
        return original(matrix, subset)

    monkeypatch.setattr(_lapack, "eigh", counted)
    matrix = _symmetric(100, np.float64)
    leading_eigh(matrix.astype(np.float32), 60)  # float32, most pairs: all pairs
    leading_eigh(matrix, 5)  # float64, a few pairs: the partial solver
    leading_eigh(matrix, 60)  # float64, most pairs: numpy's eigh (it releases the GIL itself)
    assert calls == [None, (95, 99)]


def test_leading_eigh_falls_back_to_scipy_without_lapacke(monkeypatch) -> None:
    matrix = _symmetric(80, np.float32)
    expected = leading_eigh(matrix, 10)
    monkeypatch.setattr(_lapack, "eigh", lambda matrix, subset=None: None)  # as where no OpenBLAS has LAPACKE
    values, vectors = leading_eigh(matrix, 10)
    np.testing.assert_array_equal(values, expected[0])
    np.testing.assert_array_equal(vectors, expected[1])
