"""Where the engine's dense linear algebra runs: numpy (LAPACK on the CPU) or torch.linalg (CUDA when there).

The truncated SVD and Tucker-2's HOOI (:mod:`lowrank_ir._linalg`) spend their time in Gram matrices and
symmetric eigensolvers. With the ``torch`` backend those run on torch tensors: on a CUDA device when one
is available, else on the CPU (the same arithmetic, which is how it is tested here). Everything else
(validation, signs, the factors returned) stays numpy, and results come back as float64 numpy arrays.

``auto`` (the default) picks ``torch`` on CUDA when torch is already imported and sees a GPU, else
``numpy``: the core never imports torch by itself. On the CPU numpy stays faster for every shape measured,
although torch's wheels carry MKL: torch has no partial eigensolver, and MKL's full ``ssyevd`` costs what
scipy's does (1 thread, CPU seconds: a 2048 x 2048 float32 Gram, all pairs 0.85 s in either, the top
576 by scipy's ``evr`` 0.55 s; a 384 x 384 one 21 ms against scipy's 17 ms; the float32 Gram of a
2048 x 2048 weight 0.17 s in torch against numpy's 0.10 s). The choice is a context variable, set with
:func:`linalg_backend`; the engine's worker threads run in the caller's context, so they see it.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import numpy as np

__all__ = ["LINALG_BACKENDS", "as_numpy", "device", "linalg_backend", "to_device"]

#: The accepted names: ``auto`` (torch on CUDA when available, else numpy), ``numpy``, ``torch``.
LINALG_BACKENDS = ("auto", "numpy", "torch")

_CHOICE: ContextVar[str] = ContextVar("lowrank_ir_linalg_backend", default="auto")


@contextlib.contextmanager
def linalg_backend(name: str) -> Iterator[str]:
    """Within the block, the engine's Gram matrices and eigensolvers run on ``name`` (see :data:`LINALG_BACKENDS`).

    Yields the name. ``torch`` needs PyTorch installed; it uses CUDA when available, else the CPU.

    Raises:
        ValueError: If ``name`` is not one of :data:`LINALG_BACKENDS`.
        ImportError: If ``name`` is ``torch`` and PyTorch is not installed.
    """
    if not isinstance(name, str) or name not in LINALG_BACKENDS:
        raise ValueError(f"linalg backend must be one of {', '.join(repr(b) for b in LINALG_BACKENDS)}, got {name!r}")
    if name == "torch":
        try:
            import torch  # noqa: F401
        except ImportError as err:
            raise ImportError("linalg backend 'torch' needs PyTorch: pip install torch") from err
    token = _CHOICE.set(name)
    try:
        yield name
    finally:
        _CHOICE.reset(token)


def device() -> Any:
    """The torch device the linear algebra runs on, or None for numpy."""
    choice = _CHOICE.get()
    if choice == "numpy":
        return None
    torch = sys.modules.get("torch")
    if choice == "auto":
        if torch is None or not torch.cuda.is_available():
            return None
        return torch.device("cuda")
    import torch as imported

    return imported.device("cuda" if imported.cuda.is_available() else "cpu")


def to_device(array: np.ndarray, dtype: type, where: Any) -> Any:
    """``array`` as ``dtype`` (np.float32 or np.float64) on ``where`` (a torch device; None: numpy)."""
    if where is None:
        return np.asarray(array, dtype=dtype)
    import torch

    return torch.from_numpy(np.ascontiguousarray(array, dtype=dtype)).to(where)


def as_numpy(value: Any) -> np.ndarray:
    """A numpy array or torch tensor as a float64 numpy array."""
    if isinstance(value, np.ndarray):
        return value.astype(np.float64, copy=False)
    return value.detach().to("cpu").double().numpy()
