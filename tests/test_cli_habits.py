"""Command-line habits: ``--version``, ``-v``/``-q`` on every command, ``inspect --json``."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import lowrank_ir  # noqa: E402
from tools.cli import build_parser, main  # noqa: E402

ROOTS = ("lowrank_ir", "frontends", "backends", "tools")


@pytest.fixture
def restore_logging() -> Any:
    """-v/-q set the library's log level and attach a handler: put both back afterwards."""
    saved = {name: (logging.getLogger(name).level, list(logging.getLogger(name).handlers)) for name in ROOTS}
    yield
    for name, (level, handlers) in saved.items():
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.handlers[:] = handlers


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"lowrank {lowrank_ir.__version__}"


def test_every_command_takes_verbose_and_quiet() -> None:
    parser = build_parser()
    commands = next(action for action in parser._actions if action.dest == "command").choices
    assert set(commands) >= {"demo", "inspect", "decompose", "convert", "parity"}
    for name, command in commands.items():
        options = {option for action in command._actions for option in action.option_strings}
        assert {"-v", "--verbose", "-q", "--quiet"} <= options, name


@pytest.mark.usefixtures("restore_logging")
def test_verbose_logs_progress_and_quiet_keeps_errors_only(capsys) -> None:
    assert main(["inspect", "tests.models:resnet50"]) == 0
    assert "layers to decompose" not in capsys.readouterr().err
    assert main(["inspect", "tests.models:resnet50", "-v"]) == 0
    assert "INFO lowrank_ir._api: 39 layers to decompose" in capsys.readouterr().err
    assert main(["inspect", "tests.models:resnet50", "-q"]) == 0
    assert capsys.readouterr().err == ""
    assert all(logging.getLogger(name).level == logging.ERROR for name in ROOTS)
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", "tests.models:resnet50", "-v", "-q"])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_inspect_json_is_the_report(capsys) -> None:
    from lowrank_ir import Decompose
    from tests.models import resnet50

    assert main(["inspect", "tests.models:resnet50", "--ratio", "0.5", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(Decompose(resnet50()).from_ratio(0.5).report.to_dict()))
    assert printed["totals"]["decomposed"] == 39 and len(printed["layers"]) == 54


def test_inspect_json_of_an_onnx_file(tmp_path, capsys) -> None:
    onnx = pytest.importorskip("onnx")
    import numpy as np

    from tests.onnx_models import mlp

    path = tmp_path / "mlp.onnx"
    onnx.save(mlp(np.random.default_rng(0)), path)
    assert main(["inspect", str(path), "--divisor", "8", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["totals"]["layers"] == len(printed["layers"]) >= 2
    assert all({"name", "rank", "params_before", "params_after"} <= set(layer) for layer in printed["layers"])
    assert main(["inspect", str(path), "--divisor", "8"]) == 0
    assert "TOTAL" in capsys.readouterr().out


def _tools_imports() -> dict[str, set[str]]:
    """Each ``tools`` module -> the ``tools`` modules it imports (anywhere in it, functions included)."""
    import ast
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "tools"
    modules = {path.stem: path for path in folder.glob("*.py") if path.stem != "__init__"}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module == "tools":
                found |= {alias.name for alias in node.names if alias.name in modules}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tools."):
                found.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                found |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("tools.")}
        graph[name] = found - {name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path (first module repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        path.append(name)
        for child in sorted(graph.get(name, ())):
            if state.get(child) == 1:
                return [*path[path.index(child):], child]
            if child not in state and (found := visit(child)):
                return found
        path.pop()
        state[name] = 2
        return None

    for name in sorted(graph):
        if name not in state and (found := visit(name)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"cli": {"onnx_cli"}, "onnx_cli": {"parity_cli"}, "parity_cli": {"cli"}}) == [
        "cli", "onnx_cli", "parity_cli", "cli"]
    assert _cycle({"cli": {"onnx_cli", "common"}, "onnx_cli": {"common"}, "common": set()}) is None


def test_tools_has_no_import_cycle_and_no_private_names_across_modules() -> None:
    import ast
    from pathlib import Path

    graph = _tools_imports()
    assert {"cli", "common", "onnx_cli"} <= set(graph)
    assert _cycle(graph) is None, f"import cycle in tools/: {' -> '.join(_cycle(graph) or [])}"
    assert graph["common"] == set(), "tools/common.py is the shared base: it imports no other tools module"
    private = []
    for path in (Path(__file__).resolve().parents[1] / "tools").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "tools":
                module = node.module or ""
                private += [f"{path.name}: {module}.{alias.name}" for alias in node.names
                            if alias.name.startswith("_") or any(part.startswith("_") for part in module.split("."))]
    assert not private, private


# ------------------------------------------------------------------------------------ progress bars, reports

def test_progress_bars_draw_one_bar_per_phase_only_when_asked() -> None:
    import argparse
    import io

    from tools.common import ProgressBars, progress_bars

    quiet = argparse.Namespace(quiet=True, progress=False)
    assert not isinstance(progress_bars(quiet, io.StringIO()), ProgressBars)
    assert not isinstance(progress_bars(argparse.Namespace(), io.StringIO()), ProgressBars)  # not a terminal
    stream = io.StringIO()
    with progress_bars(argparse.Namespace(progress=True), stream) as bars:
        assert isinstance(bars, ProgressBars)
        for done in range(1, 4):
            bars("calibration", done, 3)
        rewrite = bars.layers("rewrite")
        rewrite(1, 2, "fc1")
        rewrite(2, 2, "fc2")
        bars("validation", 0, 1, "onnxruntime")
    text = stream.getvalue()
    assert "calibrating (batches)" in text and "3/3" in text
    assert "decomposing (layers)" in text and "2/2" in text and "fc2" in text
    assert "validating (runs)" in text and "0/1" in text  # closed unfinished when the block ends


def test_onnx_report_json_and_html(tmp_path, capsys) -> None:
    import numpy as np

    onnx = pytest.importorskip("onnx")
    from tests.onnx_models import mlp
    from tests.skips import require

    require("matplotlib")
    rng = np.random.default_rng(0)
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp(rng), path)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=rng.standard_normal((16, 48)).astype(np.float32))
    for name, extra in (("free", []), ("aware", ["--calib", str(calib)])):
        assert main(["decompose", str(path), "-o", str(tmp_path / f"{name}.onnx"), "--divisor", "8",
                     "--report", str(tmp_path / f"{name}.json"), *extra]) == 0
    capsys.readouterr()
    free, aware = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("free", "aware"))
    assert set(free["spectra"]) == set(free["decompose_config"]) == set(aware["spectra"])
    assert not any(spectrum["whitened"] for spectrum in free["spectra"].values())
    assert all(spectrum["whitened"] for spectrum in aware["spectra"].values())
    assert free["policy"] == {"kind": "ratio", "value": 0.5, "divisor": 8, "excludes": None}
    assert aware["policy"]["calib"] == str(calib) and aware["validation"]["outputs"][0]["name"] == "y"
    assert free["totals"]["decomposed"] == len(free["layers"]) == 2
    page = tmp_path / "aware.html"
    assert main(["report", str(tmp_path / "aware.json"), "-o", str(page)]) == 0
    text = page.read_text()
    assert text.count("<img src=\"data:image/png;base64,") == 3  # totals, per layer, spectra
    assert "Validation in onnxruntime" in text and "(whitened by the calibration data)" in text
    assert main(["decompose", str(path), "-o", str(tmp_path / "x.onnx"), "--divisor", "8",
                 "--report", str(tmp_path / "direct.html")]) == 0
    assert "<img src=\"data:image/png;base64," in (tmp_path / "direct.html").read_text()
    assert main(["decompose", str(path), "-o", str(tmp_path / "b.onnx"), "--divisor", "8", "--budget-params", "0.5",
                 "--calib", str(calib), "--report", str(tmp_path / "budget.json")]) == 0
    budget = json.loads((tmp_path / "budget.json").read_text())
    assert set(budget["sensitivities"]) == {layer["name"] for layer in budget["layers"]}
    assert all(value > 0 for value in budget["sensitivities"].values())


def test_the_page_draws_sensitivities_and_latency_when_the_report_has_them() -> None:
    from tests.skips import require
    from tools.html_report import render_html

    require("matplotlib")
    layers = [{"name": name, "op": "Linear", "shape": [64, 64], "form": "svd", "rank": 16, "params_before": 4160,
               "params_after": 2112, "error": 0.1, "error_kind": "output", "reason": ""} for name in ("fc1", "fc2")]
    spectra = {name: {"values": [1.0, 0.5, 0.25, 0.1], "count": 64, "rank": 2, "kept_energy": 0.9, "whitened": True}
               for name in ("fc1", "fc2")}
    latency = {"target": 0.8, "met": True, "original_ms": 2.0, "decomposed_ms": 1.5, "ratio": 0.75,
               "layers": {"fc1": {"rank": 16, "before_ms": 1.0, "after_ms": 0.7},
                          "fc2": {"rank": 16, "before_ms": 1.0, "after_ms": 0.8}}}
    document = {"model": "m.onnx", "totals": {"params_before": 8320, "params_after": 4224}, "layers": layers,
                "spectra": spectra, "sensitivities": {"fc1": 0.03, "fc2": 6.6}, "latency": latency,
                "policy": {"kind": "budget_latency", "value": 0.8}}
    page = render_html(document)
    assert page.count("<img src=\"data:image/png;base64,") == 5  # totals, per layer, spectra, sens., latency
    assert "Measured sensitivities and budget allocation" in page and "<h2>Latency</h2>" in page
    assert "kind=budget_latency" in page
    older = render_html({"model": "m.onnx", "layers": {"totals": document["totals"], "layers": layers}})
    assert older.count("<img") == 2  # the ONNX command's earlier shape: totals and per layer, no spectra
    with pytest.raises(ValueError, match="no list of layers"):
        render_html({"layers": "fc1"})
