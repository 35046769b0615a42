"""The `lowrank` command line: the demo runs, bad input is one line and exit code 2, nothing half-written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import load_file  # noqa: E402

from tools.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_and_saves_a_rebuildable_model(tmp_path, capsys) -> None:
    from lowrank_ir import Decompose
    from tools.demo import demo_model

    assert main(["demo", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "TOTAL" in printed and "data-aware" in printed and "agreement" in printed
    saved = sorted(p.name for p in tmp_path.iterdir())
    assert saved == ["decompose_config.json", "report.json", "state_dict.safetensors"]
    for path in tmp_path.iterdir():
        assert os.stat(path).st_mode & 0o022 == 0
    report = json.loads((tmp_path / "report.json").read_text())
    aware, free = report["agreement"]["data-aware"], report["agreement"]["data-free"]
    assert aware["relative_error"] < free["relative_error"]
    # the same document every command writes: what explains the ranks, and when and by what it was written
    assert report["tool"] == "lowrank-ir" and report["created"] and report["policy"]["kind"] == "ratio"
    decomposed = {row["name"] for row in report["layers"] if row.get("rank")}
    assert decomposed and set(report["spectra"]) == decomposed
    # the recipe the demo prints: structure from the saved config, weights from the saved state dict
    rebuilt = Decompose(demo_model(), config_file=tmp_path / "decompose_config.json").from_file() \
        .decompose_network(do_decompose_weight=False)
    rebuilt.load_state_dict(load_file(tmp_path / "state_dict.safetensors"), strict=True)


def test_console_script_help() -> None:
    result = subprocess.run([sys.executable, "-m", "tools.cli", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0
    for command in ("demo", "decompose", "inspect"):
        assert command in result.stdout


def _rows(table: str) -> dict[str, list[str]]:
    """The words of each line of a printed report table, by the line's first word (the layer name)."""
    return {line.split()[0]: line.split() for line in table.splitlines() if line.strip()}


def test_inspect_prints_the_plan(capsys) -> None:
    from lowrank_ir import Decompose
    from tests.models import resnet50

    assert main(["inspect", "tests.models:resnet50", "--ratio", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert Decompose(resnet50()).from_ratio(0.5).report.table() in printed
    rows = _rows(printed)
    # int(0.5 * 1000 * 2048 / 3048) = 335; the root of 9h^2 + 1024h - 0.5 * 512 * 512 * 9 is 309.6: both 320 in 64s
    assert rows["fc"][1:4] == ["Linear", "1000x2048", "320"]  # layer, kind, weight, rank
    assert rows["layer4.2.conv2"][1:4] == ["Conv", "512x512x3x3", "320x320"]
    assert rows["TOTAL"][1] == "39/54"


def _table(policy: str, *args: object, **kwargs: object) -> str:
    """The table the API's ``Decompose(resnet50()).<policy>(*args, **kwargs)`` reports."""
    from lowrank_ir import Decompose
    from tests.models import resnet50

    return getattr(Decompose(resnet50()), policy)(*args, **kwargs).report.table()


def test_inspect_with_vbmf(capsys) -> None:
    assert main(["inspect", "tests.models:resnet50", "--vbmf", "--divisor", "16"]) == 0
    printed = capsys.readouterr().out
    assert _table("from_vbmf", divisor=16) in printed
    assert _table("from_vbmf", divisor=16) != _table("from_ratio", 0.5, divisor=16)


def test_inspect_with_dict_rules(write_config, capsys) -> None:
    rules = {r"^fc$": 64, r"layer4\.\d\.conv2": 0.25, r"layer1": "vbmf"}
    assert main(["inspect", "tests.models:resnet50", "--dict", str(write_config(rules, "rules.json")),
                 "--divisor", "16"]) == 0
    printed = capsys.readouterr().out
    assert _table("from_dict", rules, divisor=16) in printed
    rows = _rows(printed)
    assert rows["fc"][3] == "64" and rows["layer4.0.conv2"][3] != "-" and rows["layer3.0.conv2"][3] == "-"


def test_decompose_loads_matching_weights(tmp_path, write_config, capsys) -> None:
    from lowrank_ir import Decompose
    from tests.models import resnet50

    trained = resnet50(seed=1)
    torch.save(trained.state_dict(), tmp_path / "w.pt")
    rules = write_config({r"^fc$": 64}, "rules.json")
    out = tmp_path / "out"
    assert main(["decompose", "tests.models:resnet50", "--weights", str(tmp_path / "w.pt"), "--dict", str(rules),
                 "-o", str(out)]) == 0
    capsys.readouterr()
    state = load_file(out / "state_dict.safetensors")
    expected = Decompose(trained).from_dict({r"^fc$": 64}).decompose_network().state_dict()
    assert sorted(state) == sorted(expected)
    for name, tensor in expected.items():  # the loaded weights were decomposed, not the factory's own
        assert torch.equal(state[name], tensor), name
    assert not torch.equal(state["conv1.weight"], resnet50().conv1.weight)


def test_weights_in_either_format_and_a_pt_output_on_request(tmp_path, capsys) -> None:
    from safetensors.torch import save_file

    from tests.models import resnet50

    trained = resnet50(seed=1)
    save_file({name: tensor.contiguous() for name, tensor in trained.state_dict().items()}, tmp_path / "w.safetensors")
    torch.save(trained.state_dict(), tmp_path / "w.pt")
    common = ["tests.models:resnet50", "--ratio", "0.5", "--excludes", "conv1"]
    assert main(["decompose", *common, "--weights", str(tmp_path / "w.safetensors"), "-o", str(tmp_path / "a")]) == 0
    assert main(["decompose", *common, "--weights", str(tmp_path / "w.pt"), "--weights-format", "pt",
                 "-o", str(tmp_path / "b")]) == 0
    assert "state_dict.pt" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["decompose_config.json", "report.json",
                                                                  "state_dict.pt"]
    from_safetensors = load_file(tmp_path / "a" / "state_dict.safetensors")
    from_pickle = torch.load(tmp_path / "b" / "state_dict.pt", weights_only=True)
    assert sorted(from_safetensors) == sorted(from_pickle)
    assert all(torch.equal(from_safetensors[name], tensor) for name, tensor in from_pickle.items())


def test_demo_with_ratio_and_divisor(tmp_path, capsys) -> None:
    from lowrank_ir import Decompose
    from tools.demo import demo_model

    assert main(["demo", "--out", str(tmp_path), "--ratio", "0.3", "--divisor", "8"]) == 0
    capsys.readouterr()
    config = json.loads((tmp_path / "decompose_config.json").read_text())
    expected = Decompose(demo_model()).from_ratio(0.3, divisor=8).decompose_config
    assert config == {name: list(rank) if isinstance(rank, tuple) else rank for name, rank in expected.items()}
    assert config != Decompose(demo_model()).from_ratio(0.5, divisor=16).decompose_config


@pytest.mark.parametrize(("argv", "message"), [
    (["inspect", "nocolon"], "must be 'module:factory'"),
    (["inspect", "no_such_module:f"], "cannot import module 'no_such_module'"),
    (["inspect", "tests.models:nothing"], "has no callable 'nothing'"),
    (["inspect", "tests.models:resnet50", "--ratio", "1.5"], "ratio must be a float strictly between 0 and 1"),
    (["inspect", "tests.models:resnet50", "--fixed", "0"], "fixed rank must be an int > 0"),
    (["inspect", "tests.models:resnet50", "--divisor", "0"], "divisor must be an int > 0"),
    (["inspect", "tests.models:resnet50", "--energy", "1.5"], "keep must be a float in (0, 1]"),
    (["inspect", "tests.models:resnet50", "--budget-params", "10"], "cannot be met"),
    (["inspect", "tests.models:resnet50", "--dict", "missing.json"], "does not exist"),
    (["inspect", "tests.models:resnet50", "--weights", "missing.pt"], "does not exist"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_weights_for_another_model_are_rejected(tmp_path, capsys) -> None:
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "w.pt")
    assert main(["decompose", "tests.models:resnet50", "--weights", str(tmp_path / "w.pt"), "-o",
                 str(tmp_path / "out")]) == 2
    assert "do not fit" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_decompose_writes_a_complete_folder(tmp_path, capsys) -> None:
    from tests.models import resnet50

    out = tmp_path / "out"
    assert main(["decompose", "tests.models:resnet50", "--ratio", "0.5", "-o", str(out),
                 "--report", str(tmp_path / "r.json")]) == 0
    config = json.loads((out / "decompose_config.json").read_text())
    assert config["fc"] == 320 and len(config) == 39
    state = load_file(out / "state_dict.safetensors")
    assert state["fc.0.weight"].shape == (320, 2048) and state["layer4.2.conv2.1.weight"].shape[2:] == (3, 3)
    assert json.loads((tmp_path / "r.json").read_text())["totals"]["decomposed"] == 39
    model = resnet50()
    assert torch.equal(model.fc.weight, resnet50().fc.weight)  # factories are deterministic
    capsys.readouterr()


@pytest.mark.parametrize(("option", "policy"), [
    (["--energy", "0.8"], {"from_energy": 0.8}),
    (["--budget-params", "0.5"], {"from_budget": {"params": 0.5}}),
    (["--budget-flops", "0.5"], {"from_budget": {"flops": 0.5}}),
])
def test_inspect_with_global_policies(option, policy, capsys) -> None:
    from lowrank_ir import Decompose
    from tests.models import resnet50

    assert main(["inspect", "tests.models:resnet50", *option, "--divisor", "16"]) == 0
    printed = capsys.readouterr().out
    ((call, argument),) = policy.items()
    method = getattr(Decompose(resnet50()), call)
    expected = method(argument, divisor=16) if call == "from_energy" else method(**argument, divisor=16)
    assert expected.report.table() in printed  # the option runs that policy
    totals = expected.report.totals()
    if option[0] == "--budget-flops":
        assert 0.45 * totals["flops_before"] < totals["flops_after"] <= 0.5 * totals["flops_before"]
    elif option[0] == "--budget-params":
        assert 0.45 * totals["params_before"] < totals["params_after"] <= 0.5 * totals["params_before"]
    else:
        assert totals["decomposed"] > 0
