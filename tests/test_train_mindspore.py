"""tools/train_mindspore.py: decompose a MindSpore Cell, fine-tune it, save and reload the .ckpt.

Real MindSpore (CPU, PyNative) on the real digits images; a narrow model and large batches keep it short.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

ms = pytest.importorskip("mindspore")
pytest.importorskip("sklearn")

from lowrank_ir import Decompose  # noqa: E402
from tools import train_mindspore as train_ms  # noqa: E402

pytestmark = pytest.mark.mindspore

FAST = ["--width", "16", "--batch_size", "128"]


def run_main(argv: list[str]) -> int:
    try:
        return train_ms.main(argv)
    except SystemExit as stop:  # argparse's exit code, as a process would see it
        return int(stop.code or 0)


def read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def test_decompose_finetune_save_and_reload_the_checkpoint(tmp_path, capsys) -> None:
    save, metrics_file = tmp_path / "run", tmp_path / "metrics.json"
    assert run_main(["--ratio", "0.5", "--epochs", "1", "--lr", "0.1", *FAST, "--save", str(save),
                     "--metrics", str(metrics_file)]) == 0
    printed = capsys.readouterr().out
    assert "reloaded" in printed and "structure-only rebuild" in printed and "Final top-1 accuracy" in printed
    metrics = read(metrics_file)
    assert metrics["framework"] == "mindspore" and metrics["decomposed"]
    assert metrics["layers_decomposed"] >= 5 and metrics["parameters"] < 0.7 * metrics["parameters_original"]
    # the .ckpt saved after fine-tuning reloads, into a structure-only rebuild, to the very same Cell
    assert metrics["checksum_reloaded"] == metrics["checksum_final"] != metrics["checksum_loaded"]
    assert metrics["accuracy_reloaded"] == metrics["accuracy"]
    assert metrics["throughput"] > 0 and metrics["time_per_epoch"] > 0 and len(metrics["epochs"]) == 1
    assert sorted(path.name for path in save.iterdir()) == ["decompose_config.json", "decomposed_init.ckpt",
                                                            "model.ckpt"]
    assert all(os.stat(path).st_mode & 0o027 == 0 for path in [save, *save.iterdir()])

    # the recipe outside the script: structure from the config, load_checkpoint + load_param_into_net
    structure = Decompose(train_ms.small_resnet(width=16), config_file=save / "decompose_config.json") \
        .from_file().decompose_network(do_decompose_weight=False)
    not_loaded, unused = ms.load_param_into_net(structure, ms.load_checkpoint(str(save / "decomposed_init.ckpt")),
                                                strict_load=True)
    assert not not_loaded and not unused
    assert train_ms.cell_checksum(structure) == metrics["checksum_loaded"]

    # a decomposed .ckpt with its config resumes without decomposing again (0 epochs: evaluate only)
    resumed = tmp_path / "resumed.json"
    assert run_main(["--checkpoint", str(save / "model.ckpt"), "--config", str(save / "decompose_config.json"),
                     "--epochs", "0", *FAST, "--metrics", str(resumed)]) == 0
    again = read(resumed)
    assert again["checksum_loaded"] == metrics["checksum_final"]
    assert again["accuracy"] == pytest.approx(metrics["accuracy"])


@pytest.mark.parametrize(("case", "message"), [
    ("missing checkpoint", "--checkpoint file"),
    ("corrupt checkpoint", "cannot read checkpoint"),
    ("checkpoint of another width", "does not fit the model (width 16"),
    ("unknown option", "unrecognized arguments: --tucker"),
    ("ratio out of range", "ratio must be a float strictly between 0 and 1"),
    ("config naming unknown layers", "names layers the model does not have"),
])
def test_bad_input_is_one_line_before_training(case, message, tmp_path, capsys) -> None:
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"not a checkpoint")
    other = tmp_path / "width8.ckpt"
    if case == "checkpoint of another width":
        ms.save_checkpoint(train_ms.small_resnet(width=8), str(other))
    bad_config = tmp_path / "config.json"
    bad_config.write_text(json.dumps({"layer9.conv": [4, 4]}))
    argv = {
        "missing checkpoint": ["--checkpoint", str(tmp_path / "nope.ckpt")],
        "corrupt checkpoint": ["--checkpoint", str(corrupt)],
        "checkpoint of another width": ["--checkpoint", str(other)],
        "unknown option": ["--tucker"],
        "ratio out of range": ["--ratio", "1.5"],
        "config naming unknown layers": ["--config", str(bad_config)],
    }[case]
    save = tmp_path / "run"
    assert run_main([*FAST, *argv, "--save", str(save)]) == 2
    captured = capsys.readouterr()
    error = captured.err.strip()
    assert message in error and len(error.splitlines()) == 1, error
    assert "epoch" not in captured.out and not save.exists()
