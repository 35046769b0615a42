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

from lowrank_ir._policy import plain_number

__all__ = ["ANY", "MapOf", "SafeWriteUmask", "atomic_directory", "atomic_write", "check_schema", "path_inside",
           "read_json", "write_json"]

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
        umask = plain_number(umask)  # type: ignore[assignment]
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


def path_inside(folder: str | os.PathLike[str], name: str) -> Path | None:
    """The resolved ``folder / name`` when ``name`` is a relative path that stays inside ``folder``, else None.

    Symlinks are resolved first, so a link leading out of ``folder`` is outside; ``folder`` itself is
    not inside it.
    """
    base = Path(folder).resolve()
    target = (base / name).resolve()
    if not name or Path(name).is_absolute() or target == base or not target.is_relative_to(base):
        return None
    return target


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically, with safe permissions."""
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    with atomic_write(path, "w") as stream:
        stream.write(text)


#: Largest JSON file read (config files, manifests, ``graph.json``), in bytes.
MAX_JSON_BYTES = 256 * 2**20

#: Deepest nesting accepted in a JSON file (ours nest a handful of levels).
MAX_JSON_DEPTH = 64


class MapOf:
    """Schema of a JSON object with any keys whose values all match ``values``."""

    __slots__ = ("values",)

    def __init__(self, values: Any) -> None:
        self.values = values


#: Schema of anything at all.
ANY = object


def _describe(schema: Any) -> str:
    if isinstance(schema, tuple):
        return " or ".join(_describe(item) for item in schema)
    if isinstance(schema, (dict, MapOf)):
        return "an object"
    if isinstance(schema, list):
        return "an array"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "an object",
            list: "an array", type(None): "null"}.get(schema, getattr(schema, "__name__", str(schema)))


def _matches_type(value: Any, schema: Any) -> bool:
    if isinstance(schema, tuple):
        return any(_matches_type(value, item) for item in schema)
    if isinstance(schema, (dict, MapOf)):
        return isinstance(value, dict)
    if isinstance(schema, list):
        return isinstance(value, list)
    if schema is ANY:
        return True
    if schema is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if schema is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, schema)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_schema(value: Any, schema: Any, what: str, where: str = "") -> None:
    """``ValueError`` naming ``what`` (the file) and the key when ``value`` does not match ``schema``.

    A schema is a type (``str``, ``int`` — not bool —, ``float`` — any number —, ``bool``, ``dict``,
    ``list``, ``ANY``), a tuple of schemas (any of them), ``{key: schema}`` (an object with these
    keys; a key ending in ``?`` may be missing; other keys are allowed), ``[schema]`` (an array of
    items matching it) or :class:`MapOf` (an object with any keys).
    """
    stack = [(value, schema, where)]
    while stack:
        item, expected, path = stack.pop()
        if not _matches_type(item, expected):
            shown = f"{path} " if path else "the top level "
            raise ValueError(f"{what}: {shown}must be {_describe(expected)}, got {_short(item)}")
        if isinstance(expected, tuple):
            expected = next(choice for choice in expected if _matches_type(item, choice))
        if isinstance(expected, dict):
            for key, sub in expected.items():
                name = key.rstrip("?")
                if name not in item:
                    if key.endswith("?"):
                        continue
                    inside = f" in {path}" if path else ""
                    raise ValueError(f"{what}: key {name!r} is missing{inside}")
                stack.append((item[name], sub, f"{path}.{name}" if path else name))
        elif isinstance(expected, MapOf):
            stack.extend((sub, expected.values, f"{path}[{key!r}]") for key, sub in item.items())
        elif isinstance(expected, list):
            stack.extend((sub, expected[0], f"{path}[{index}]") for index, sub in enumerate(item))


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0), without recursion."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def read_json(path: str | os.PathLike[str], what: str | None = None, *, schema: Any = ANY,
              max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """The JSON in ``path``, at most ``max_bytes`` long and ``max_depth`` deep, checked against ``schema``.

    Every problem is a ``ValueError`` that starts with ``what`` (default: the quoted path): not
    valid JSON, too large, nested too deep, or (see :func:`check_schema`) a key missing or of the
    wrong type.
    """
    label = what or repr(str(path))
    with open(path, "rb") as stream:  # bounded read: also safe on a FIFO or a device
        data = stream.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"{label} is larger than {max_bytes} bytes, the most a JSON file read here may hold")
    try:
        value = json.loads(data.decode("utf-8"))
    except RecursionError as err:
        raise ValueError(f"{label} is nested deeper than {max_depth} levels, the most accepted") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{label} is not valid JSON: {err}") from err
    if _depth(value) > max_depth:
        raise ValueError(f"{label} is nested deeper than {max_depth} levels, the most accepted")
    check_schema(value, schema, label)
    return value
