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
