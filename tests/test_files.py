"""SafeWriteUmask and atomic writes: safe permissions, restored umask, never a half-written file."""

from __future__ import annotations

import json
import os
import stat

import pytest

from lowrank_ir import SafeWriteUmask, atomic_write, write_json


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.fixture(autouse=True)
def open_umask():
    previous = os.umask(0o000)  # the most permissive setting: our code must not rely on the user's umask
    yield
    os.umask(previous)


def test_context_manager_makes_files_safe_and_restores(tmp_path) -> None:
    with SafeWriteUmask():
        (tmp_path / "a.txt").write_text("x")
    assert stat.S_IMODE(os.stat(tmp_path / "a.txt").st_mode) & 0o027 == 0
    assert current_umask() == 0o000


def test_restored_even_on_error(tmp_path) -> None:
    with pytest.raises(RuntimeError), SafeWriteUmask():
        raise RuntimeError("boom")
    assert current_umask() == 0o000


def test_decorator_forms(tmp_path) -> None:
    @SafeWriteUmask
    def write(path):
        path.write_text("x")
        return current_umask()

    @SafeWriteUmask(umask=0o077)
    def write_private(path):
        path.write_text("x")
        return current_umask()

    assert write(tmp_path / "a") == 0o027
    assert write_private(tmp_path / "b") == 0o077
    assert stat.S_IMODE(os.stat(tmp_path / "b").st_mode) == 0o600
    assert current_umask() == 0o000
    assert write.__name__ == "write"


def test_decorator_restores_on_error() -> None:
    @SafeWriteUmask
    def fail():
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        fail()
    assert current_umask() == 0o000


def test_a_weak_umask_is_strengthened() -> None:
    with SafeWriteUmask(umask=0o000):
        assert current_umask() & 0o022 == 0o022


@pytest.mark.parametrize("bad", [-1, 0o1000, "0o22", True])
def test_bad_umask_rejected(bad) -> None:
    with pytest.raises(ValueError, match="umask must be an int between 0 and 0o777"):
        SafeWriteUmask(umask=bad)


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path) -> None:
    target = tmp_path / "config.json"
    write_json(target, {"fc": 3})
    with pytest.raises(RuntimeError), atomic_write(target) as stream:
        stream.write("half")
        raise RuntimeError("interrupted")
    assert json.loads(target.read_text()) == {"fc": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
    assert stat.S_IMODE(os.stat(target).st_mode) & 0o022 == 0


def test_atomic_write_into_missing_folder_says_so(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"), atomic_write(tmp_path / "nope" / "a.json"):
        pass
