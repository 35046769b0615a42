"""Safe file writing: a umask context, atomic writes, and the outputs of a command checked as one.

Everything this package writes goes first to a temporary file or folder beside its destination, named
``.<name>.lowrank-<host>-<pid>-<random>.tmp``, and is moved into place only when complete (removed on
error). A run killed before that leaves such names behind; the next write into the same folder removes
those whose process no longer runs on this machine. Anything not named this way is never removed.

Folders this package creates get mode :data:`FOLDER_MODE` (0750) and files :data:`FILE_MODE` (0640),
whatever the process umask.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from lowrank_ir._policy import plain_number

__all__ = ["ANY", "FILE_MODE", "FOLDER_MODE", "MapOf", "Outputs", "SafeWriteUmask", "atomic_directory", "atomic_write",
           "check_file_target", "check_schema", "path_inside", "read_json", "remove_leftovers", "temporary_folder",
           "write_json"]

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

#: Files we write are not writable by group or others, and not readable by others.
SAFE_UMASK = 0o027

#: The mode of every folder this package creates, and of every file it writes, whatever the umask.
FOLDER_MODE = 0o750
FILE_MODE = 0o640

#: Temporary names: ``.<name>.lowrank-<host>-<pid>-<random>.tmp`` (random: what ``tempfile`` draws).
_TEMP_TAG = "lowrank"
_TEMP_NAME = re.compile(r"^\..+\.lowrank-(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]{1,10})-[a-z0-9_]+\.tmp$")


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


# ------------------------------------------------------------------------------- temporary names

def _host() -> str:
    """This machine, as 8 hex digits (a folder may be shared between machines)."""
    return hashlib.sha1(socket.gethostname().encode(), usedforsecurity=False).hexdigest()[:8]


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (an unlikely pid counts as running: kept)."""
    if pid == os.getpid() or not 0 < pid < 2**31:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, as another user's process
        return True
    return True


def remove_leftovers(folder: str | os.PathLike[str]) -> list[str]:
    """Remove the temporary files and folders that killed runs left in ``folder``; return their names.

    Only names of this package's temporary form are considered, and of those only the ones created on
    this machine by a process that no longer runs: a write in progress is never disturbed.
    """
    host = _host()
    removed: list[str] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if match is None or match["host"] != host or _running(int(match["pid"])):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except FileNotFoundError:  # another run removed it first
            continue
        except OSError as err:
            logger.warning("cannot remove %s, left by a killed run: %s", entry.path, err)
            continue
        removed.append(entry.name)
    if removed:
        logger.info("removed %d temporary files of killed runs from %s: %s", len(removed), folder, ", ".join(removed))
    return removed


def _temp_prefix(target: Path) -> str:
    return f".{target.name}.{_TEMP_TAG}-{_host()}-{os.getpid()}-"


def temporary_folder(target: str | os.PathLike[str]) -> Path:
    """A new, empty temporary folder beside ``target`` (mode 0700 until used), after removing leftovers there."""
    target = Path(target)
    remove_leftovers(target.parent)
    with SafeWriteUmask():
        return Path(tempfile.mkdtemp(prefix=_temp_prefix(target), suffix=".tmp", dir=target.parent))


def _temporary_file(target: Path) -> tuple[int, Path]:
    remove_leftovers(target.parent)
    with SafeWriteUmask():
        handle, name = tempfile.mkstemp(prefix=_temp_prefix(target), suffix=".tmp", dir=target.parent)
    return handle, Path(name)


# ---------------------------------------------------------------------------------- atomic writes

def check_file_target(path: str | os.PathLike[str], label: str) -> None:
    """``ValueError`` starting with ``label`` unless a file can be written at ``path``.

    It must not be a folder, and its folder must exist and be writable.
    """
    target = Path(path)
    folder = target.parent
    if target.is_dir():
        raise ValueError(f"{label} is a folder; give the path of a file")
    if not folder.is_dir():
        raise ValueError(f"{label} is in folder {str(folder)!r}, which does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{label} is in folder {str(folder)!r}, which is not writable")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "w") -> Iterator[Any]:
    """Open a temporary file beside ``path``; on success it replaces ``path``, on error it is removed.

    The file gets mode 0640 (never group/other-writable).
    """
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"cannot write {str(target)!r}: it is a directory")
    directory = target.parent if str(target.parent) else Path(".")
    if not directory.is_dir():
        raise FileNotFoundError(f"cannot write {str(target)!r}: folder {str(directory)!r} does not exist")
    handle, tmp = _temporary_file(target)
    try:
        with os.fdopen(handle, mode) as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Fill a temporary folder beside ``path``; on success it becomes ``path``, mode 0750.

    An existing folder at ``path`` is replaced only when everything in it is replaced: one holding a name
    the new folder does not have is kept as it is (``FileExistsError`` naming what it holds).
    """
    target = Path(os.path.abspath(path))
    parent = target.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"cannot write {str(target)!r}: folder {str(parent)!r} does not exist")
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"cannot write folder {str(target)!r}: a file of that name exists")
    tmp = temporary_folder(target)
    try:
        with SafeWriteUmask():
            yield tmp
        os.chmod(tmp, FOLDER_MODE)
        old = None
        if target.exists():
            foreign = sorted(set(os.listdir(target)) - set(os.listdir(tmp)))
            if foreign:
                shown = ", ".join(repr(name) for name in foreign[:5]) + (" ..." if len(foreign) > 5 else "")
                raise FileExistsError(f"cannot replace folder {str(target)!r}: it holds {shown}, which this would "
                                      f"delete; choose a new folder")
            old = temporary_folder(target)
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


# ------------------------------------------------------------------------------ a command's outputs

def _entry(path: str | os.PathLike[str]) -> Path:
    """The directory entry ``path`` names: its folder resolved (symlinks, ``..``), its last name kept.

    Writing replaces that entry; a symlink there is replaced, never written through.
    """
    text = os.fspath(path)
    name = os.path.basename(text)
    if name in ("", ".", ".."):
        return Path(os.path.realpath(text))
    return Path(os.path.realpath(os.path.dirname(text) or ".")) / name


def _same_file(entry: Path, other: str | os.PathLike[str]) -> bool:
    """Whether writing ``entry`` would write the file ``other`` (same resolved path, or a hard link of it)."""
    if os.path.realpath(entry) == os.path.realpath(other):
        return True
    try:
        return os.path.samefile(entry, other)
    except OSError:  # one of them does not exist
        return False


@dataclass(slots=True)
class _Output:
    """One file a command writes: how the user named it, by which option, and in which folder output."""

    given: str
    what: str
    optional: bool
    folder: Path | None = None

    @property
    def label(self) -> str:
        return f"{self.what} {self.given!r}"


class Outputs:
    """Every file one command writes, checked together before the work starts and moved into place together.

    Register what the command reads (:meth:`read`) and writes (:meth:`file`, :meth:`folder`), call
    :meth:`check` before the work, and write inside ``with outputs.writing() as stage:`` to the paths
    ``stage.path(target)`` gives. The rules:

    - An output is never an input: a path that resolves (through symlinks, ``..``, hard links) to a file
      the command reads is refused, ``force`` or not. Two outputs naming one file are refused.
    - An existing output folder is never deleted, emptied or replaced: only the command's own file names
      are written into it, everything else in it is left alone. A new folder is created (its parent must
      exist), mode :data:`FOLDER_MODE`.
    - A file that exists under an output's name is replaced only with ``force``.
    - Everything goes to temporary files beside the destinations first, and is moved into place (mode
      :data:`FILE_MODE`) only when the ``with`` block ends without error: a new folder appears whole, in
      one rename. On error nothing is moved and the temporary files are removed.
    """

    def __init__(self, force: bool = False) -> None:
        self.force = force
        self._inputs: list[tuple[str, str]] = []
        self._required: list[tuple[str, str]] = []
        self._outputs: dict[Path, _Output] = {}
        self._folders: dict[Path, _Output] = {}

    def read(self, path: str | os.PathLike[str] | None, what: str, *, check: bool = True) -> None:
        """Record a file the command reads (``what``: e.g. "the --feeds file"); None is ignored.

        ``check``: :meth:`check` refuses it when it is not a file (False: the command checks it itself).
        """
        if path is not None:
            self._inputs.append((os.fspath(path), what))
            if check:
                self._required.append((os.fspath(path), what))

    def file(self, path: str | os.PathLike[str], what: str, *, optional: bool = False) -> Path:
        """Record a file the command writes (``what``: the option naming it); return its key for ``stage.path``.

        ``optional``: the command may leave it unwritten (e.g. an ONNX model's external data).
        """
        return self._add(_entry(path), _Output(os.fspath(path), what, optional))

    def folder(self, path: str | os.PathLike[str], names: Iterable[str], what: str) -> Path:
        """Record a folder that receives the files ``names``; return it (``folder / name`` are the keys)."""
        folder = Path(os.path.realpath(path))
        output = _Output(os.fspath(path), what, optional=False)
        self._folders[folder] = output
        for name in names:
            self._add(folder / name, _Output(os.fspath(path), what, optional=False, folder=folder))
        return folder

    def _add(self, key: Path, output: _Output) -> Path:
        earlier = self._outputs.get(key)
        if earlier is not None:
            raise ValueError(f"{output.label} is also written by {earlier.label}; give them different paths")
        self._outputs[key] = output
        return key

    def check(self) -> None:
        """Raise on the first problem of any input or output path, before the work starts.

        ``FileNotFoundError`` for a missing input, ``FileExistsError`` for an output name that exists
        (without ``force``), ``ValueError`` for the rest.
        """
        for path, what in self._required:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{what} {path!r} {'is a folder' if os.path.isdir(path) else 'does not exist'}")
        for key, output in self._outputs.items():
            for path, what in self._inputs:
                if _same_file(key, path):
                    name = repr(output.given) if output.folder is None else f"{output.given!r} ({key.name})"
                    raise ValueError(f"{output.what} {name} is {what} {path!r}: writing it would destroy it; "
                                     f"choose another path")
            for other_key, other in self._outputs.items():
                if other_key != key and _same_file(key, other_key):
                    raise ValueError(f"{output.label} is also written by {other.label}; give them different paths")
        for folder, output in self._folders.items():
            self._check_folder(folder, output)
        for key, output in self._outputs.items():
            if output.folder is None:
                check_file_target(key, output.label)
                if os.path.lexists(key) and not self.force:
                    raise FileExistsError(f"{output.label} exists; add --force to replace it")

    def _check_folder(self, folder: Path, output: _Output) -> None:
        if os.path.lexists(output.given) and not folder.is_dir():
            raise ValueError(f"{output.label} is a file (or a broken link), not a folder")
        names = [key.name for key, item in self._outputs.items() if item.folder == folder]
        if not folder.is_dir():
            check_file_target(folder, output.label)  # its parent exists and is writable
            return
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ValueError(f"{output.label} is a folder that is not writable")
        folders = [name for name in names if (folder / name).is_dir()]
        if folders:
            raise ValueError(f"{output.label} holds a folder named {folders[0]!r} where this writes a file")
        existing = [name for name in names if os.path.lexists(folder / name)]
        if existing and not self.force:
            raise FileExistsError(f"{output.label} already holds {', '.join(existing)}; add --force to replace "
                                  f"{'it' if len(existing) == 1 else 'them'} (nothing else in it is touched)")

    @contextlib.contextmanager
    def writing(self) -> Iterator[Staging]:
        """Check again, then yield the staging area; when the block ends without error, move every output into place."""
        self.check()
        stage = Staging(self._outputs, self._folders, self.force)
        try:
            stage.prepare()
            yield stage
            stage.commit()
        finally:
            stage.remove()


class Staging:
    """Where the outputs of :class:`Outputs` are written before they are moved into place."""

    def __init__(self, outputs: dict[Path, _Output], folders: dict[Path, _Output], force: bool) -> None:
        self._outputs = outputs
        self._new = {folder: output for folder, output in folders.items() if not folder.is_dir()}
        self._force = force
        self._dropped: set[Path] = set()
        self._folders: dict[Path, Path] = {}  # destination folder -> its temporary folder

    def prepare(self) -> None:
        """Create one temporary folder per destination folder."""
        for key in self._outputs:
            destination = key.parent
            if destination not in self._folders:
                # a new output folder is staged beside itself and renamed; an existing one is staged inside
                beside = destination if destination in self._new else destination / key.name
                self._folders[destination] = temporary_folder(beside)

    def path(self, target: Path) -> Path:
        """Where to write the output ``target`` (a key that ``Outputs.file`` or ``Outputs.folder`` gave)."""
        if target not in self._outputs:
            raise KeyError(f"{str(target)!r} is not one of this command's outputs")
        return self._folders[target.parent] / target.name

    def folder(self, folder: Path) -> Path:
        """The temporary folder the files of the output folder ``folder`` are written to."""
        return self._folders[folder]

    def drop(self, target: Path) -> None:
        """Leave the output ``target`` unwritten (e.g. a model that failed its validation)."""
        self._dropped.add(target)

    def commit(self) -> None:
        """Move every written output into place: new folders by one rename each, other files one by one."""
        moves = []
        for key, output in self._outputs.items():
            staged = self.path(key)
            if key in self._dropped or (output.optional and not os.path.lexists(staged)):
                continue
            if not os.path.isfile(staged):
                raise RuntimeError(f"{output.label}: {key.name} was not written")
            appeared = key.parent in self._new and os.path.lexists(key.parent)
            if appeared or (os.path.lexists(key) and not self._force):
                raise FileExistsError(f"{output.label} appeared while this command ran; nothing was written")
            moves.append((staged, key))
        for staged, _ in moves:
            os.chmod(staged, FILE_MODE)
        for folder in {key.parent for _, key in moves if key.parent in self._new}:
            os.chmod(self._folders[folder], FOLDER_MODE)
            os.rename(self._folders.pop(folder), folder)
        for staged, key in moves:
            if key.parent not in self._new:
                os.replace(staged, key)
        logger.info("wrote %s", ", ".join(str(key) for _, key in moves))

    def remove(self) -> None:
        """Remove what is left of the temporary folders (all of them, after an error)."""
        for tmp in self._folders.values():
            shutil.rmtree(tmp, ignore_errors=True)
        self._folders.clear()
