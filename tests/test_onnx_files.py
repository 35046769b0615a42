"""ONNX files and the command line: saving (atomic, 0640, external data), reading (bad files are one
clear line and exit code 2, nothing written), ``lowrank inspect/decompose MODEL.onnx``."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from backends import onnx as onnx_backend  # noqa: E402
from frontends import onnx as onnx_frontend  # noqa: E402
from tests import onnx_models as om  # noqa: E402
from tools.cli import main  # noqa: E402


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def mlp_file(tmp_path: Path, rng: np.random.Generator) -> Path:
    path = tmp_path / "mlp.onnx"
    path.write_bytes(om.mlp(rng, dims=(64, 96, 32)).SerializeToString())
    return path


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.startswith("."))


# ---------------------------------------------------------------------------------------- saving

def test_save_is_atomic_with_safe_permissions(tmp_path, rng, restore_umask) -> None:
    os.umask(0o000)
    model = om.mlp(rng)
    path = onnx_backend.save(model, tmp_path / "out.onnx")
    assert onnx.load(path).SerializeToString() == model.SerializeToString()
    assert _mode(path) == 0o640 and _leftovers(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="does not exist"):
        onnx_backend.save(model, tmp_path / "missing" / "out.onnx")


def test_external_data_round_trip(tmp_path, rng) -> None:
    model = om.mlp(rng, dims=(64, 96, 32))
    before = model.SerializeToString()
    path = onnx_backend.save(model, tmp_path / "big.onnx", external_data=True)
    assert model.SerializeToString() == before  # the caller's model is not changed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    assert _mode(tmp_path / "big.onnx.data") == 0o640
    loaded = onnx_frontend.load_model(path)
    graph = onnx_frontend.lower(path)
    np.testing.assert_array_equal(graph.params["fc0.weight"],
                                  onnx.numpy_helper.to_array(model.graph.initializer[0]))
    report = onnx_backend.validate(model, path)  # onnxruntime reads the external data from the file
    assert report.max_rel == 0.0
    assert onnx_frontend.count_parameters(loaded) == onnx_frontend.count_parameters(model)


def _external_model(tmp_path: Path, rng: np.random.Generator, location: str | None = None) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    path = onnx_backend.save(om.mlp(rng), folder / "m.onnx", external_data=True)
    if location is not None:
        model = onnx.load(path, load_external_data=False)
        for tensor in model.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
        path.write_bytes(model.SerializeToString())
    return path


# ------------------------------------------------------------------------------------- bad files

def test_bad_files_are_clear_errors(tmp_path, rng) -> None:
    data = om.mlp(rng).SerializeToString()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="is not an ONNX model: it cannot be parsed"):
        onnx_frontend.load_model(truncated)
    text = tmp_path / "text.onnx"
    text.write_text("not a model at all\n")
    with pytest.raises(ValueError, match="is not an ONNX model"):
        onnx_frontend.load_model(text)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="is not an ONNX model: it has no graph"):
        onnx_frontend.load_model(empty)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        onnx_frontend.load_model(tmp_path / "nothing.onnx")
    with pytest.raises(TypeError, match="expected an onnx.ModelProto or the path"):
        onnx_frontend.lower(42)  # type: ignore[arg-type]


def test_missing_external_data(tmp_path, rng) -> None:
    path = _external_model(tmp_path, rng)
    (path.parent / "m.onnx.data").unlink()
    with pytest.raises(FileNotFoundError, match="external data file 'm.onnx.data' is missing"):
        onnx_frontend.load_model(path)


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/hostname", "link/secret.bin"])
def test_external_data_outside_the_folder_is_rejected(location, tmp_path, rng) -> None:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\0" * 100_000)  # present, so only the location check can reject it
    path = _external_model(tmp_path, rng, location)
    (path.parent / "link").symlink_to(tmp_path)
    with pytest.raises(ValueError, match="escapes the model's folder"):
        onnx_frontend.load_model(path)


def test_external_data_shorter_than_announced(tmp_path, rng) -> None:
    path = _external_model(tmp_path, rng)
    data = path.parent / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(ValueError, match="holds 100 bytes"):
        onnx_frontend.load_model(path)


def test_model_proto_with_unloaded_external_data(tmp_path, rng) -> None:
    path = _external_model(tmp_path, rng)
    with pytest.raises(ValueError, match="external data that is not loaded"):
        onnx_frontend.lower(onnx.load(path, load_external_data=False))


# ------------------------------------------------------------------------------- command line

def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.fixture
def bad_inputs(tmp_path: Path, rng: np.random.Generator, mlp_file: Path) -> dict[str, tuple[list[str], str]]:
    """argv (after 'decompose') and the message expected on stderr, per kind of bad input."""
    data = mlp_file.read_bytes()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(data[: len(data) - 7])
    text = tmp_path / "text.onnx"
    text.write_text("hello\n")
    missing = _external_model(tmp_path / "a", rng) if (tmp_path / "a").mkdir() is None else None
    assert missing is not None
    (missing.parent / "m.onnx.data").unlink()
    (tmp_path / "b").mkdir()
    (tmp_path / "secret.bin").write_bytes(b"\0" * 100_000)
    escaping = _external_model(tmp_path / "b", rng, "../../secret.bin")
    relu = tmp_path / "relu.onnx"
    relu.write_bytes(om.make_model([onnx.helper.make_node("Relu", ["x"], ["y"])], [om.tensor("x", [2])],
                                   [om.tensor("y", [2])]).SerializeToString())
    f32 = np.zeros((4, 64), np.float32)
    return {
        "truncated": ([str(truncated)], "is not an ONNX model: it cannot be parsed"),
        "not onnx": ([str(text)], "is not an ONNX model"),
        "missing external data": ([str(missing)], "external data file 'm.onnx.data' is missing"),
        "escaping external data": ([str(escaping)], "escapes the model's folder"),
        "no decomposable layer": ([str(relu)], "no layer of"),
        "nothing to decompose at this divisor": ([str(mlp_file), "--ratio", "0.1"], "would not save parameters"),
        "calib dtype": ([str(mlp_file), "--calib", str(_npz(tmp_path / "c1.npz", x=f32.astype(np.float64)))],
                        "input 'x' has dtype float64, the model expects float32"),
        "calib shape": ([str(mlp_file), "--calib", str(_npz(tmp_path / "c2.npz", x=np.zeros((4, 63), np.float32)))],
                        "dimension 1 must be 64"),
        "calib names": ([str(mlp_file), "--calib", str(_npz(tmp_path / "c3.npz", y=f32))], "missing ['x']"),
        "feeds rank": ([str(mlp_file), "--feeds", str(_npz(tmp_path / "f.npz", x=np.zeros(64, np.float32)))],
                       "the model expects 2 dimensions"),
        "feeds not npz": ([str(mlp_file), "--feeds", str(text)], "is not a readable .npz archive"),
        "bad input shape": ([str(mlp_file), "--input-shape", "x=1,,0"], "must be NAME=D1,D2"),
        "weights": ([str(mlp_file), "--weights", "w.pt"], "an ONNX model carries its own weights"),
        "bad opset": ([str(mlp_file), "--opset", "999"], "newer than this onnx package knows"),
    }


def test_bad_input_is_one_line_exit_2_and_no_output(bad_inputs, tmp_path, capsys) -> None:
    out = tmp_path / "out.onnx"
    for label, (argv, message) in bad_inputs.items():
        code = main(["decompose", *argv, "-o", str(out)])
        err = capsys.readouterr().err.strip()
        assert code == 2, (label, err)
        assert message in err and len(err.splitlines()) == 1, (label, err)
        assert not out.exists() and _leftovers(tmp_path) == [], label


def test_bad_output_paths(mlp_file, tmp_path, capsys) -> None:
    for target, message in ((tmp_path / "out.txt", "ending in .onnx"), (tmp_path / "no" / "o.onnx", "does not exist"),
                            (tmp_path, "ending in .onnx")):
        assert main(["decompose", str(mlp_file), "-o", str(target)]) == 2
        assert message in capsys.readouterr().err
    folder = tmp_path / "dir.onnx"
    folder.mkdir()
    assert main(["decompose", str(mlp_file), "-o", str(folder)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_onnx_options_are_rejected_for_pytorch_models(capsys) -> None:
    pytest.importorskip("torch")
    assert main(["inspect", "tests.models:resnet50", "--input-shape", "x=1,3,8,8"]) == 2
    assert "--input-shape apply to ONNX models" in capsys.readouterr().err


def test_cli_decompose_writes_a_validated_model_and_report(mlp_file, tmp_path, capsys) -> None:
    out, report_file = tmp_path / "small.onnx", tmp_path / "report.json"
    assert main(["decompose", str(mlp_file), "-o", str(out), "--ratio", "0.5", "--divisor", "8",
                 "--report", str(report_file), "--tolerance", "0.9"]) == 0
    printed = capsys.readouterr().out
    assert "TOTAL" in printed and "max rel" in printed and f"saved {out}" in printed
    assert _mode(out) == 0o640 and _mode(report_file) == 0o640
    written = onnx.load(out)
    onnx.checker.check_model(written, full_check=True)
    report = json.loads(report_file.read_text())
    assert report["decompose_config"] == {"fc0": 24, "fc1": 16} and report["passed"] is True
    assert report["parameters"]["after"] < report["parameters"]["before"]
    assert report["validation"]["outputs"][0]["name"] == "y" and report["totals"]["decomposed"] == 2
    assert [layer["energy"] is not None for layer in report["layers"]] == [True, True]


def test_cli_tolerance_exceeded_writes_no_model(mlp_file, tmp_path, capsys) -> None:
    out, report_file = tmp_path / "small.onnx", tmp_path / "report.json"
    code = main(["decompose", str(mlp_file), "-o", str(out), "--fixed", "8", "--divisor", "1",
                 "--tolerance", "1e-6", "--report", str(report_file)])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "further from the original than --tolerance" in err and len(err.splitlines()) == 1
    assert not out.exists() and json.loads(report_file.read_text())["passed"] is False


def test_cli_calib_beats_data_free_on_correlated_feeds(tmp_path, rng, capsys) -> None:
    model_file = tmp_path / "mlp.onnx"
    model_file.write_bytes(om.mlp(rng, dims=(64, 64, 32)).SerializeToString())
    mixing = rng.standard_normal((6, 64))

    def correlated(count: int) -> np.ndarray:
        return (rng.standard_normal((count, 6)) @ mixing + 0.01 * rng.standard_normal((count, 64))).astype(np.float32)

    calib, feeds = _npz(tmp_path / "calib.npz", x=correlated(512)), _npz(tmp_path / "feeds.npz", x=correlated(256))
    errors = {}
    for label, extra in (("free", []), ("aware", ["--calib", str(calib)])):
        report_file = tmp_path / f"{label}.json"
        assert main(["decompose", str(model_file), "-o", str(tmp_path / f"{label}.onnx"), "--fixed", "8",
                     "--divisor", "1", "--feeds", str(feeds), "--report", str(report_file), *extra]) == 0
        report = json.loads(report_file.read_text())
        assert report["data_aware"] is (label == "aware")
        errors[label] = report["validation"]["outputs"][0]["mean_rel"]
    capsys.readouterr()
    assert errors["aware"] < 0.5 * errors["free"]


def test_cli_opset(tmp_path, rng, capsys) -> None:
    model_file = tmp_path / "mlp13.onnx"
    model_file.write_bytes(om.mlp(rng, dims=(64, 96, 32), opset=13).SerializeToString())
    out = tmp_path / "out.onnx"
    assert main(["decompose", str(model_file), "-o", str(out), "--divisor", "8", "--opset", "17"]) == 0
    assert onnx.load(out).opset_import[0].version == 17
    capsys.readouterr()


def test_cli_inspect_prints_the_table_with_spectrum(tmp_path, rng, capsys) -> None:
    model_file = tmp_path / "conv.onnx"
    model_file.write_bytes(om.conv(rng, channels=(64, 96), spatial=16).SerializeToString())
    assert main(["inspect", str(model_file), "--divisor", "8", "--input-shape", "x=2,64,16,16"]) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert "IR" in lines[0] and "x float32[batch, 64, 16, 16]" in lines[0]
    assert "energy" in lines[1] and "conv" in lines[2] and "FLOPs per sample" in lines[-1]
    energy = float(lines[2][lines[1].index("energy"):].split()[0])
    assert 0 < energy <= 1


def test_cli_large_models_go_through_external_data(mlp_file, tmp_path, monkeypatch, capsys) -> None:
    """Above the protobuf limit (lowered here to 1 kB) the model is validated and saved with external data."""
    import tools.onnx_cli

    monkeypatch.setattr(tools.onnx_cli, "PROTOBUF_LIMIT", 1024)
    out = tmp_path / "out" / "small.onnx"
    out.parent.mkdir()
    assert main(["decompose", str(mlp_file), "-o", str(out), "--divisor", "8"]) == 0
    capsys.readouterr()
    assert sorted(path.name for path in out.parent.iterdir()) == ["small.onnx", "small.onnx.data"]
    monkeypatch.undo()
    inline = tmp_path / "inline.onnx"
    assert main(["decompose", str(mlp_file), "-o", str(inline), "--divisor", "8"]) == 0
    capsys.readouterr()
    assert not (tmp_path / "inline.onnx.data").exists()
    assert onnx_backend.validate(inline, out).max_rel == 0.0  # the same model, its weights stored outside
    assert onnx_backend.validate(mlp_file, out).max_rel > 1e-3


@pytest.mark.parametrize("option", [["--budget-params", "0.4"], ["--budget-flops", "0.4"], ["--energy", "0.9"]])
def test_cli_global_policies_with_calibration(tmp_path, rng, capsys, option) -> None:
    model_file = tmp_path / "mlp.onnx"
    model_file.write_bytes(om.mlp(rng, dims=(64, 96, 48, 32)).SerializeToString())
    calib = _npz(tmp_path / "calib.npz", x=rng.standard_normal((256, 64)).astype(np.float32))
    report_file = tmp_path / "report.json"
    assert main(["decompose", str(model_file), "-o", str(tmp_path / "out.onnx"), *option, "--divisor", "4",
                 "--calib", str(calib), "--report", str(report_file)]) == 0
    report = json.loads(report_file.read_text())
    assert report["data_aware"] and report["decompose_config"]
    if option[0] == "--budget-params":
        graph = onnx_frontend.lower(om.mlp(np.random.default_rng(0), dims=(64, 96, 48, 32)))
        total = sum(int(np.prod(graph.param(node, "weight").shape)) for node in graph.layers())
        kept = sum(rank * sum(graph.param(graph.node(name), "weight").shape)
                   for name, rank in report["decompose_config"].items())
        kept += sum(int(np.prod(graph.param(node, "weight").shape)) for node in graph.layers()
                    if node.name not in report["decompose_config"])
        assert kept <= 0.4 * total
    if option[0] == "--budget-flops":  # per sample: 2 x out x in for each Gemm
        totals = report["totals"]
        assert totals["flops_unit"] == "per sample"
        assert totals["flops_before"] == 2 * (64 * 96 + 96 * 48 + 48 * 32)
        assert totals["flops_after"] <= 0.4 * totals["flops_before"]
    capsys.readouterr()


@pytest.mark.parametrize(("value", "message"), [("1.5", "neither a fraction"), ("abc", "neither a fraction"),
                                                 ("0", "neither a fraction")])
def test_cli_budget_values_are_checked(tmp_path, rng, capsys, value, message) -> None:
    model_file = tmp_path / "mlp.onnx"
    model_file.write_bytes(om.mlp(rng).SerializeToString())
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", str(model_file), "--budget-params", value])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
