"""LAPACK's symmetric eigensolvers, called without holding Python's global interpreter lock.

The engine factorizes layers on worker threads (:func:`lowrank_ir._engine.rewrite`), which run in parallel
only while no thread holds the GIL. numpy's linear algebra releases it; scipy's LAPACK wrappers (f2py) do
not, so two threads in ``scipy.linalg.eigh`` take turns (measured, one BLAS thread each: two threads ran
two 512 x 512 float32 eigensolvers in the time of one thread running both, against 1.95x for numpy's
``eigh``). Yet scipy's drivers are the ones the engine needs: the float32 divide-and-conquer solver (``syevd``,
twice as fast as numpy's float32 ``eigh``) and the partial solver of the top pairs (``syevr``).

So they are called here through ``ctypes`` (which releases the GIL during a foreign call), in the LAPACKE C
interface of the OpenBLAS that scipy itself loads: the same routines on the same library, under the same
thread limits (``threadpoolctl`` limits that library). Where no such library is found, :func:`eigh` returns
None and callers use scipy.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

import numpy as np

#: LAPACKE's ``matrix_layout`` for column-major (Fortran-ordered) arrays, LAPACK's own: no transposed copies.
LAPACK_COL_MAJOR = 102

#: Symbol names of LAPACKE's functions as OpenBLAS builds export them, with their integer type: scipy's
#: own build (``scipy_`` prefix, 32-bit), a plain one (32-bit), numpy's ILP64 one (``64_`` suffix).
_NAMINGS = (("scipy_LAPACKE_{}", ctypes.c_int32), ("LAPACKE_{}", ctypes.c_int32), ("LAPACKE_{}64_", ctypes.c_int64))


@functools.cache
def _functions() -> dict[str, Any] | None:
    """LAPACKE's ``{s,d}syev{d,r}`` with their argument types, or None if no loaded OpenBLAS has them."""
    import scipy.linalg  # noqa: F401  (loads scipy's OpenBLAS)
    from threadpoolctl import threadpool_info

    paths = [info["filepath"] for info in threadpool_info() if info.get("internal_api") == "openblas"]
    for path in sorted(paths, key=lambda path: "scipy" not in path):  # scipy's own library first
        library = ctypes.CDLL(path)
        for naming, integer in _NAMINGS:
            try:
                found = {name: getattr(library, naming.format(name)) for name in
                         ("ssyevd", "dsyevd", "ssyevr", "dsyevr")}
            except AttributeError:
                continue
            pointer = ctypes.c_void_p
            for name, function in found.items():
                real = ctypes.c_float if name[0] == "s" else ctypes.c_double
                function.restype = integer
                if name.endswith("d"):  # layout, jobz, uplo, n, a, lda, w
                    function.argtypes = [ctypes.c_int, ctypes.c_char, ctypes.c_char, integer, pointer, integer, pointer]
                else:  # layout, jobz, range, uplo, n, a, lda, vl, vu, il, iu, abstol, m, w, z, ldz, isuppz
                    function.argtypes = [ctypes.c_int, ctypes.c_char, ctypes.c_char, ctypes.c_char, integer, pointer,
                                         integer, real, real, integer, integer, real, pointer, pointer, pointer,
                                         integer, pointer]
            return {"integer": np.dtype(integer), **found}
    return None


def available() -> bool:
    """Whether :func:`eigh` can run (an OpenBLAS with LAPACKE is loaded)."""
    return _functions() is not None


def eigh(symmetric: np.ndarray, subset: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """Eigenvalues (ascending) and eigenvectors ``[n, k]`` of a symmetric float32 or float64 matrix.

    ``subset``: the 0-based indices ``(lo, hi)`` of the pairs wanted (``syevr``); None: all of them
    (``syevd``). The lower triangle is read, as scipy's ``eigh`` reads it. Returns None where LAPACKE is not
    available. The input is not changed.

    Raises:
        numpy.linalg.LinAlgError: If the solver does not converge.
    """
    functions = _functions()
    if functions is None:
        return None
    dtype = symmetric.dtype
    prefix = "s" if dtype == np.float32 else "d"
    size = symmetric.shape[0]
    work = np.array(symmetric, dtype=dtype, order="F")  # overwritten by the solver (by the eigenvectors: syevd)
    values = np.empty(size, dtype=dtype)
    if subset is None:
        info = functions[f"{prefix}syevd"](LAPACK_COL_MAJOR, b"V", b"L", size, work.ctypes.data, size,
                                            values.ctypes.data)
        vectors = work
    else:
        low, high = subset
        wanted = high - low + 1
        found = np.zeros(1, dtype=functions["integer"])
        vectors = np.empty((size, wanted), dtype=dtype, order="F")
        support = np.empty(2 * max(1, size), dtype=functions["integer"])
        info = functions[f"{prefix}syevr"](LAPACK_COL_MAJOR, b"V", b"I", b"L", size, work.ctypes.data, size, 0.0,
                                            0.0, low + 1, high + 1, 0.0, found.ctypes.data, values.ctypes.data,
                                            vectors.ctypes.data, size, support.ctypes.data)
        values = values[:wanted]
    if info != 0:
        raise np.linalg.LinAlgError(f"LAPACK {prefix}syev{'d' if subset is None else 'r'} failed (info {info})")
    return values, vectors
