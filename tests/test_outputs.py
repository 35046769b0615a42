"""What the command line writes: never an input, never a file it did not name, all outputs or none.

Each test runs a real command (``tools.cli.main``) on a real model — the demo's small PyTorch CNN as
``tools.demo:demo_model``, or a small ONNX MLP — and looks at the files afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import load_file  # noqa: E402

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from lowrank_ir import Decompose, save_graph  # noqa: E402
from lowrank_ir._files import FILE_MODE, FOLDER_MODE, Outputs  # noqa: E402
from tests import onnx_models as om  # noqa: E402
from tests.cli_checks import one_line_error  # noqa: E402
from tools.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TORCH_MODEL = ["tools.demo:demo_model", "--divisor", "16"]
TORCH_FILES = ["decompose_config.json", "report.json", "state_dict.safetensors"]


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture
def mlp_file(tmp_path: Path) -> Path:
    path = tmp_path / "m.onnx"
    path.write_bytes(om.mlp(np.random.default_rng(0), dims=(64, 96, 32)).SerializeToString())
    return path


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


# ------------------------------------------------------------------------------ existing folders

def test_an_existing_folder_keeps_the_users_files(tmp_path, capsys) -> None:
    mywork = tmp_path / "mywork"
    mywork.mkdir()
    (mywork / "notes.txt").write_text("mine")
    (mywork / "data").mkdir()
    assert main(["decompose", *TORCH_MODEL, "-o", str(mywork)]) == 0
    capsys.readouterr()
    assert _names(mywork) == sorted(["data", "notes.txt", *TORCH_FILES])
    assert (mywork / "notes.txt").read_text() == "mine"


def test_the_tools_own_names_are_replaced_only_with_force(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["decompose", *TORCH_MODEL, "-o", str(out)]) == 0
    (out / "notes.txt").write_text("mine")
    config = (out / "decompose_config.json").read_bytes()
    (out / "state_dict.safetensors").write_bytes(b"older")
    capsys.readouterr()

    assert main(["decompose", *TORCH_MODEL, "--ratio", "0.3", "-o", str(out)]) == 2
    one_line_error(capsys, "already holds", "state_dict.safetensors", "--force")
    assert (out / "state_dict.safetensors").read_bytes() == b"older"

    assert main(["decompose", *TORCH_MODEL, "--ratio", "0.3", "-o", str(out), "--force"]) == 0
    capsys.readouterr()
    assert _names(out) == sorted(["notes.txt", *TORCH_FILES])
    assert (out / "notes.txt").read_text() == "mine" and (out / "decompose_config.json").read_bytes() != config
    load_file(out / "state_dict.safetensors")  # the new, complete state dict


def test_an_existing_output_file_is_replaced_only_with_force(mlp_file, tmp_path, capsys) -> None:
    out = tmp_path / "small.onnx"
    out.write_bytes(b"someone's model")
    argv = ["decompose", str(mlp_file), "-o", str(out), "--divisor", "8"]
    assert main(argv) == 2
    one_line_error(capsys, f"-o {str(out)!r} exists", "--force")
    assert out.read_bytes() == b"someone's model"
    assert main([*argv, "--force"]) == 0
    capsys.readouterr()
    onnx.checker.check_model(onnx.load(out), full_check=True)


def test_a_model_with_external_data_appears_with_it_or_not_at_all(mlp_file, tmp_path, monkeypatch, capsys) -> None:
    from tools import onnx_cli

    monkeypatch.setattr(onnx_cli, "PROTOBUF_LIMIT", 1000)  # this small model takes the 2 GB path
    out = tmp_path / "small.onnx"
    argv = ["decompose", str(mlp_file), "-o", str(out), "--divisor", "8", "--fixed", "8"]
    assert main([*argv, "--tolerance", "1e-6"]) == 1
    assert _names(tmp_path) == ["m.onnx"]
    assert main(argv) == 0
    capsys.readouterr()
    assert _names(tmp_path) == ["m.onnx", "small.onnx", "small.onnx.data"]
    assert {_mode(tmp_path / name) for name in ("small.onnx", "small.onnx.data")} == {FILE_MODE}
    onnx.checker.check_model(str(out), full_check=True)


def test_output_dot_writes_into_the_current_folder(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["decompose", *TORCH_MODEL, "-o", "."]) == 0
    capsys.readouterr()
    assert _names(tmp_path) == sorted(["notes.txt", *TORCH_FILES])  # no '..xxxx.old' left behind


def test_convert_writes_beside_the_users_files(tmp_path, capsys) -> None:
    pytest.importorskip("mindspore")
    model = tmp_path / "m.onnx"
    model.write_bytes(om.mlp(np.random.default_rng(0), dims=(8, 12, 4)).SerializeToString())
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    assert main(["convert", str(model), "--to", "torch", "-o", str(keep)]) == 0
    assert _names(keep) == ["converted.json", "graph.json", "model.pt", "notes.txt", "params.safetensors"]
    capsys.readouterr()
    assert main(["convert", str(model), "--to", "torch", "-o", str(keep)]) == 2
    one_line_error(capsys, "already holds", "--force")
    assert main(["convert", str(model), "--to", "torch", "-o", str(keep), "--force"]) == 0
    assert (keep / "notes.txt").read_text() == "mine"


def test_saving_a_graph_never_deletes_files_it_did_not_write(tmp_path) -> None:
    from frontends.onnx import lower

    graph = lower(om.mlp(np.random.default_rng(0), dims=(8, 12, 4)))
    folder = tmp_path / "g"
    save_graph(graph, folder)
    save_graph(graph, folder)  # an earlier graph folder is replaced as a whole
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        save_graph(graph, folder)
    assert _names(folder) == ["graph.json", "notes.txt", "params.safetensors"]


# ------------------------------------------------------------------------------ outputs vs inputs

def test_an_output_that_is_an_input_is_refused(mlp_file, tmp_path, monkeypatch, capsys) -> None:
    original = mlp_file.read_bytes()
    (tmp_path / "link.onnx").symlink_to(mlp_file)
    os.link(mlp_file, tmp_path / "hard.onnx")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    for output in ("m.onnx", "./m.onnx", str(mlp_file), "link.onnx", "hard.onnx", "sub/../m.onnx"):
        for force in ([], ["--force"]):
            assert main(["decompose", "m.onnx", "-o", output, "--divisor", "8", *force]) == 2, output
            one_line_error(capsys, f"-o {output!r}", "is the input model")
    assert main(["decompose", "m.onnx", "-o", "small.onnx", "--divisor", "8", "--report", "m.onnx", "--force"]) == 2
    one_line_error(capsys, "--report 'm.onnx'", "is the input model")
    assert mlp_file.read_bytes() == original
    assert _names(tmp_path) == ["hard.onnx", "link.onnx", "m.onnx", "sub"]


def test_a_report_that_is_an_input_file_is_refused(mlp_file, tmp_path, capsys) -> None:
    feeds = _npz(tmp_path / "feeds.npz", x=np.ones((2, 64), np.float32))
    before = feeds.read_bytes()
    assert main(["decompose", str(mlp_file), "-o", str(tmp_path / "s.onnx"), "--divisor", "8", "--feeds", str(feeds),
                 "--report", str(feeds), "--force"]) == 2
    one_line_error(capsys, "is the --feeds file")
    assert main(["parity", str(mlp_file), "--no-decompose", "--report", str(mlp_file), "--force"]) == 2
    one_line_error(capsys, "is the input model")
    torch.save({}, tmp_path / "w.pt")
    assert main(["decompose", *TORCH_MODEL, "--weights", str(tmp_path / "w.pt"), "-o", str(tmp_path / "o"),
                 "--report", str(tmp_path / "w.pt"), "--force"]) == 2
    one_line_error(capsys, "is the --weights file")
    assert feeds.read_bytes() == before and not (tmp_path / "s.onnx").exists() and not (tmp_path / "o").exists()


def test_two_outputs_naming_one_file_are_refused(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["decompose", *TORCH_MODEL, "-o", str(out), "--report", str(out / "report.json")]) == 2
    one_line_error(capsys, "--report", "also written by -o")
    assert not out.exists()


# ------------------------------------------------------------------------------ all or nothing

def test_every_input_path_is_checked_before_the_work(mlp_file, tmp_path, capsys) -> None:
    calib = _npz(tmp_path / "calib.npz", x=np.ones((4, 64), np.float32))
    argv = ["decompose", str(mlp_file), "-o", str(tmp_path / "s.onnx"), "--budget-params", "0.5", "--divisor", "8",
            "--calib", str(calib)]
    assert main([*argv, "--feeds", str(tmp_path / "missing.npz")]) == 2  # not after measuring the budget
    one_line_error(capsys, "the --feeds file", "missing.npz' does not exist")
    assert main([*argv, "--feeds", str(tmp_path)]) == 2
    one_line_error(capsys, "the --feeds file", "is a folder")
    assert _names(tmp_path) == ["calib.npz", "m.onnx"]


def test_a_report_in_a_missing_folder_is_refused_before_any_work(mlp_file, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["decompose", *TORCH_MODEL, "-o", str(out), "--report", str(tmp_path / "nodir" / "r.json")]) == 2
    one_line_error(capsys, "nodir", "does not exist")
    small = tmp_path / "small.onnx"
    assert main(["decompose", str(mlp_file), "-o", str(small), "--divisor", "8",
                 "--report", str(tmp_path / "nodir" / "r.json")]) == 2
    one_line_error(capsys, "nodir", "does not exist")
    assert _names(tmp_path) == ["m.onnx"]


def test_the_demo_leaves_nothing_when_it_fails(tmp_path, capsys) -> None:
    newdir = tmp_path / "newdir"
    assert main(["demo", "--out", str(newdir), "--ratio", "2"]) == 2
    one_line_error(capsys, "ratio")
    assert _names(tmp_path) == []


def test_the_demo_writes_its_files_together(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("{}")
    assert main(["demo", "--out", str(out)]) == 2  # checked before the work, not after it
    one_line_error(capsys, "already holds report.json", "--force")
    assert _names(out) == ["report.json"]
    assert main(["demo", "--out", str(out), "--force"]) == 0
    capsys.readouterr()
    assert _names(out) == TORCH_FILES and "agreement" in json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("umask", [0o000, 0o002, 0o077])
def test_created_folders_and_files_have_one_mode_whatever_the_umask(umask, tmp_path, restore_umask, capsys) -> None:
    os.umask(umask)
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
    assert main(["decompose", *TORCH_MODEL, "-o", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    for folder in (tmp_path / "demo", tmp_path / "out"):
        assert _mode(folder) == FOLDER_MODE == 0o750, oct(_mode(folder))
        assert {_mode(path) for path in folder.iterdir()} == {FILE_MODE} == {0o640}


def test_an_output_that_appears_during_the_work_is_not_replaced(tmp_path) -> None:
    outputs = Outputs()
    report = outputs.file(tmp_path / "r.json", "--report")
    folder = outputs.folder(tmp_path / "new", ["a.txt"], "-o")
    outputs.check()
    with pytest.raises(FileExistsError, match="appeared while this command ran"), outputs.writing() as stage:
        stage.path(report).write_text("ours")
        stage.path(folder / "a.txt").write_text("ours")
        (tmp_path / "r.json").write_text("someone's")
    assert (tmp_path / "r.json").read_text() == "someone's" and _names(tmp_path) == ["r.json"]


def test_a_dropped_output_is_not_written_and_the_rest_is(tmp_path) -> None:
    outputs = Outputs()
    model, report = outputs.file(tmp_path / "m.onnx", "-o"), outputs.file(tmp_path / "r.json", "--report")
    with outputs.writing() as stage:
        stage.path(model).write_bytes(b"model")
        stage.path(report).write_text("{}")
        stage.drop(model)
    assert _names(tmp_path) == ["r.json"] and _mode(tmp_path / "r.json") == FILE_MODE


# ------------------------------------------------------------------------------ killed runs

KILLED_WRITE = """
import os, signal, sys
from lowrank_ir._files import atomic_directory, atomic_write

folder = sys.argv[1]
with atomic_write(os.path.join(folder, "small.onnx"), "wb") as stream:
    stream.write(b"half a model")
    stream.flush()
    with atomic_directory(os.path.join(folder, "od")) as tmp:
        open(os.path.join(tmp, "graph.json"), "w").write("{")
        os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_runs_temporary_files_are_removed_by_the_next_run(mlp_file, tmp_path, capsys) -> None:
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / ".notes.tmp").write_text("the user's, not ours")
    killed = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLED_WRITE), str(folder)], cwd=ROOT,
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    leftovers = [name for name in _names(folder) if name != ".notes.tmp"]
    assert len(leftovers) == 2 and any(name.startswith(".small.onnx.") for name in leftovers), leftovers
    assert main(["decompose", str(mlp_file), "-o", str(folder / "other.onnx"), "--divisor", "8"]) == 0
    capsys.readouterr()
    assert _names(folder) == [".notes.tmp", "other.onnx"]


def test_a_live_runs_temporary_files_are_kept(tmp_path) -> None:
    from lowrank_ir._files import atomic_write

    with atomic_write(tmp_path / "a.json") as stream:
        stream.write("{}")
        with atomic_write(tmp_path / "b.json") as other:  # another write into the folder, while this one runs
            other.write("{}")
    assert _names(tmp_path) == ["a.json", "b.json"]


# ------------------------------------------------------------------------------ bad feeds, config file

@pytest.mark.parametrize(("option", "bad"), [("--feeds", np.nan), ("--feeds", np.inf), ("--calib", np.nan),
                                             ("--calib", -np.inf)])
def test_feeds_with_nan_or_inf_are_refused(option, bad, mlp_file, tmp_path, capsys) -> None:
    x = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    x[3, 5] = bad
    feeds = _npz(tmp_path / "bad.npz", x=x)
    out = tmp_path / "small.onnx"
    assert main(["decompose", str(mlp_file), "-o", str(out), "--divisor", "8", option, str(feeds),
                 "--tolerance", "0.5"]) == 2
    one_line_error(capsys, f"{option} {str(feeds)!r}", "input 'x'", "not finite")
    assert not out.exists()


def test_parity_refuses_feeds_with_nan(mlp_file, tmp_path, capsys) -> None:
    x = np.ones((2, 64), np.float32)
    x[1, 0] = np.nan
    feeds = _npz(tmp_path / "bad.npz", x=x)
    assert main(["parity", str(mlp_file), "--feeds", str(feeds), "--no-decompose"]) == 2
    one_line_error(capsys, f"feeds {str(feeds)!r}", "input 'x' has 1 of 128 values not finite")


def test_a_config_file_that_is_a_folder_is_refused_at_once(tmp_path) -> None:
    from tools.demo import demo_model

    (tmp_path / "config.json").mkdir()
    with pytest.raises(ValueError, match=r"config_file .*config\.json' is a folder"):
        Decompose(demo_model(), config_file=tmp_path / "config.json")

