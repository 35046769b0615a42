"""How much one array may take: a byte limit checked before anything is allocated.

Shapes come from outside (``--input-shape``, an ONNX model's declared dims, an ``.npz`` header, an
external-data reference); a shape of ``[1, 10**12]`` must be a clear error, not a ``MemoryError``
half-way through a run. The limit is :data:`DEFAULT_FRACTION` of physical memory unless raised (or
lowered) with :func:`size_limit`, which the ``max_bytes=`` keywords of the public functions and the
``--max-bytes`` option of the command line use.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from typing import Any, TypeVar

import numpy as np

__all__ = ["DEFAULT_FRACTION", "check_array", "check_bytes", "check_npz", "format_bytes", "limited", "max_bytes",
           "parse_size", "size_limit"]

F = TypeVar("F", bound=Callable[..., Any])

#: The default limit, as a fraction of physical memory.
DEFAULT_FRACTION = 0.5

#: Used when the physical memory cannot be read (non-POSIX systems).
FALLBACK_MEMORY = 8 * 2**30

_LIMIT: ContextVar[int | None] = ContextVar("lowrank_ir_max_bytes", default=None)

_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def physical_memory() -> int:
    """Bytes of physical memory (``FALLBACK_MEMORY`` when the system does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, OSError, ValueError):
        return FALLBACK_MEMORY


def max_bytes() -> int:
    """The limit in force: the innermost :func:`size_limit`, else half of physical memory."""
    limit = _LIMIT.get()
    return int(physical_memory() * DEFAULT_FRACTION) if limit is None else limit


def _check_limit(limit: object) -> int | None:
    if limit is None:
        return None
    if isinstance(limit, str):
        return parse_size(limit)
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit <= 0:
        raise ValueError(f"max_bytes must be None (half of physical memory), an int > 0 or a size such as "
                         f"'64G', got {limit!r}")
    return int(limit)


@contextlib.contextmanager
def size_limit(limit: int | str | None) -> Iterator[int]:
    """Within the block, arrays may take up to ``limit`` bytes (None: keep the limit in force).

    ``limit`` is a byte count or a size such as ``"64G"`` (see :func:`parse_size`). Yields the limit.
    """
    checked = _check_limit(limit)
    if checked is None:
        yield max_bytes()
        return
    token = _LIMIT.set(checked)
    try:
        yield checked
    finally:
        _LIMIT.reset(token)


def limited(func: F) -> F:
    """Run ``func`` under ``size_limit(max_bytes)``, ``max_bytes`` being its keyword argument (None: as in force).

    For the public functions that read or allocate what their input declares; each documents the keyword.
    """
    @functools.wraps(func)
    def run(*args: Any, **kwargs: Any) -> Any:
        with size_limit(kwargs.get("max_bytes")):
            return func(*args, **kwargs)

    return run  # type: ignore[return-value]


def format_bytes(count: int | float) -> str:
    """``3.6 TiB``-style size, for messages."""
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(size) < 1024 or unit == "PiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} PiB"


def parse_size(text: str) -> int:
    """``"64G"``, ``"1.5T"``, ``"500M"``, ``"123456"`` -> bytes (binary units: K = 1024)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if match is None:
        raise ValueError(f"size {text!r} must be a number of bytes, optionally with a unit K, M, G or T "
                         f"(e.g. 64G)")
    value = float(match.group(1)) * _UNITS[match.group(2).upper()]
    if not math.isfinite(value) or value < 1:
        raise ValueError(f"size {text!r} must be at least 1 byte")
    return int(value)


def _advice() -> str:
    chosen = _LIMIT.get()
    where = "the limit set" if chosen is not None else f"the default limit ({DEFAULT_FRACTION:g} of physical memory)"
    return f"{where} is {format_bytes(max_bytes())}; raise it with max_bytes= (--max-bytes on the command line)"


def check_bytes(count: int, what: str) -> int:
    """``count`` when it is within the limit; else ``ValueError`` naming ``what`` and how to raise the limit."""
    if count > max_bytes():
        raise ValueError(f"{what} would take {format_bytes(count)}, more than the memory limit: {_advice()}")
    return count


def check_array(shape: Iterable[int], dtype: object, what: str) -> int:
    """Bytes of an array of ``shape`` and ``dtype``, checked with :func:`check_bytes` before it is allocated."""
    dims = [int(dim) for dim in shape]
    if any(dim < 0 for dim in dims):
        raise ValueError(f"{what} has a negative dimension: {dims}")
    count = math.prod(dims) * np.dtype(dtype).itemsize  # type: ignore[call-overload]
    if count > max_bytes():
        raise ValueError(f"{what} (shape {dims}, {np.dtype(dtype)}) would take {format_bytes(count)}, more than "  # type: ignore[call-overload]
                         f"the memory limit: {_advice()}")
    return count


def check_npz(path: str | os.PathLike[str], what: str) -> None:
    """Check every array of an ``.npz`` archive against the limit from its header, before any is read.

    An archive that cannot be read this way is left to the reader, which reports it.
    """
    import zipfile

    from numpy.lib import format as npy

    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile):
        return
    with archive:
        for member in archive.infolist():
            if not member.filename.endswith(".npy"):
                continue
            try:
                with archive.open(member) as stream:
                    version = npy.read_magic(stream)
                    read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
                    shape, _, dtype = read_header(stream)  # the header only
            except (OSError, ValueError, zipfile.BadZipFile, EOFError):
                continue
            check_array(shape, dtype, f"{what}: array {member.filename[:-4]!r}")
