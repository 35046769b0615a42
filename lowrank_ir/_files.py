"""Safe file writing: a umask context, and atomic writes that never leave a half-written file."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["SafeWriteUmask", "atomic_directory", "atomic_write", "read_json", "write_json"]

F = TypeVar("F", bound=Callable[..., Any])

#: Files we write are not writable by group or others, and not readable by others.
SAFE_UMASK = 0o027


class SafeWriteUmask:
    """Create files with a safe umask (``0o027`` by default: no group/other write, no other read).

    Use as a context manager (``with SafeWriteUmask(): torch.save(...)``) or as a decorator
    (``@SafeWriteUmask`` or ``@SafeWriteUmask(umask=0o077)``). The previous umask is restored on exit,
    also when the block raises. Nesting works: each level restores what it found.
    """

    def __init__(self, func: Callable[..., Any] | None = None, umask: int = SAFE_UMASK) -> None:
        if func is not None and not callable(func):
            raise TypeError(f"SafeWriteUmask wraps a function; got {func!r}")
        if isinstance(umask, bool) or not isinstance(umask, int) or not 0 <= umask <= 0o777:
            raise ValueError(f"umask must be an int between 0 and 0o777, got {umask!r}")
        self.func = func
        self.umask = umask | 0o022  # never weaker than "no group/other write"
        self._saved: list[int] = []
        if func is not None:
            functools.update_wrapper(self, func)

    def __enter__(self) -> SafeWriteUmask:
        self._saved.append(os.umask(self.umask))
        return self

    def __exit__(self, *exc: object) -> None:
        os.umask(self._saved.pop())

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.func is None:  # used as @SafeWriteUmask(umask=...): wrap the function given now
            (func,) = args
            return SafeWriteUmask(func, self.umask)
        with SafeWriteUmask(umask=self.umask):
            return self.func(*args, **kwargs)

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        return functools.partial(self.__call__, instance)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "w") -> Iterator[Any]:
    """Open a temporary file beside ``path``; on success it replaces ``path``, on error it is removed.

    The file is created with the safe umask, so it is never group/other-writable.
    """
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"cannot write {str(target)!r}: it is a directory")
    directory = target.parent if str(target.parent) else Path(".")
    if not directory.is_dir():
        raise FileNotFoundError(f"cannot write {str(target)!r}: folder {str(directory)!r} does not exist")
    with SafeWriteUmask():
        handle, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(handle, mode) as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(tmp, 0o640)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Fill a temporary folder beside ``path``; on success it becomes ``path`` (replacing an old one)."""
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"cannot write {str(target)!r}: folder {str(parent)!r} does not exist")
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"cannot write folder {str(target)!r}: a file of that name exists")
    with SafeWriteUmask():
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent))
    try:
        with SafeWriteUmask():
            yield tmp
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=parent))
            os.replace(target, old / "old")
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically, with safe permissions."""
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    with atomic_write(path, "w") as stream:
        stream.write(text)


def read_json(path: str | os.PathLike[str], what: str | None = None) -> Any:
    """The JSON in ``path``; ``ValueError("<what> is not valid JSON: ...")`` when it is not (what: the quoted path)."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{what or repr(str(path))} is not valid JSON: {err}") from err
