"""The training flow (tools/train.py and its launchers): decompose, fine-tune, and train on 2 processes.

Real torch, real digits images, a real ``torchrun`` with gloo on the CPU. The model is kept small
(``--width 16``, one torch thread) so the whole file runs in well under a minute on 2 shared cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from lowrank_ir import Decompose  # noqa: E402
from tools import train  # noqa: E402
from tools.digits import DataError, load_digits, load_image_folder  # noqa: E402

pytestmark = pytest.mark.torch

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--width", "16", "--threads", "1"]


def run_main(argv: list[str]) -> int:
    """``train.main`` as a process would see it: argparse's exit codes returned, not raised."""
    try:
        return train.main(argv)
    except SystemExit as stop:
        return int(stop.code or 0)


def run_script(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(ROOT / "tools" / script), *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout, check=False)


def read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def safe(path: Path) -> bool:
    """Neither group- nor other-writable, not other-readable (what SafeWriteUmask gives)."""
    return os.stat(path).st_mode & 0o027 == 0


def rebuilt(folder: Path, state_file: str, width: int = 16) -> Any:
    """The reference's recipe, outside the script: structure from the saved config, then the saved state dict."""
    model = Decompose(train.small_resnet(width=width), config_file=folder / "decompose_config.json") \
        .from_file().decompose_network(do_decompose_weight=False)
    model.load_state_dict(torch.load(folder / state_file, weights_only=True), strict=True)
    return model


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The original model trained on the digits (``--no-decompose``): its checkpoint and metrics."""
    folder = tmp_path_factory.mktemp("original")
    code = run_main(["--no-decompose", "--epochs", "6", *SMALL, "--save", str(folder / "run"),
                     "--metrics", str(folder / "metrics.json")])
    assert code == 0
    return folder / "run" / "model.pt", read(folder / "metrics.json")


# ------------------------------------------------------------------------------------------------ one process

def test_training_the_original_saves_a_safe_checkpoint(pretrained) -> None:
    checkpoint, metrics = pretrained
    assert safe(checkpoint) and safe(checkpoint.parent)
    assert metrics["decomposed"] is False and metrics["parameters"] == metrics["parameters_original"]
    assert metrics["accuracy"] > 0.9  # 6 epochs on the digits
    assert len(metrics["epochs"]) == 6 and metrics["throughput"] > 0 and metrics["time_per_epoch"] > 0
    state = torch.load(checkpoint, weights_only=True)
    assert not any(key.startswith("module.") for key in state)


def test_decompose_then_finetune_recovers_the_original_accuracy(pretrained, tmp_path, capsys) -> None:
    checkpoint, original = pretrained
    save, metrics_file = tmp_path / "run", tmp_path / "metrics.json"
    assert run_main(["--checkpoint", str(checkpoint), "--ratio", "0.5", "--epochs", "3", *SMALL,
                     "--save", str(save), "--metrics", str(metrics_file)]) == 0
    printed = capsys.readouterr().out
    assert "Final top-1 accuracy" in printed and "samples/s" in printed and "time per epoch" in printed
    metrics = read(metrics_file)
    assert metrics["accuracy_original"] == pytest.approx(original["accuracy"])  # the checkpoint was loaded
    # layers really were decomposed (divisor 8), and parameters dropped
    assert metrics["decomposed"] and metrics["layers_decomposed"] >= 5
    assert metrics["parameters"] < 0.7 * metrics["parameters_original"]
    assert all("." in name or name == "fc" for name in metrics["decompose_config"])
    # fine-tuning recovers at least 98% of the original's test accuracy
    assert metrics["accuracy"] >= 0.98 * metrics["accuracy_original"]
    for key in ("loss", "throughput", "time_per_epoch", "accuracy_decomposed", "loss_decomposed"):
        assert metrics[key] > 0, key
    # what was saved rebuilds with the reference's recipe, bit for bit
    assert sorted(path.name for path in save.iterdir()) == ["decompose_config.json", "decomposed_init.pt",
                                                            "model.pt"]
    assert all(safe(path) for path in save.iterdir())
    assert train.state_checksum(rebuilt(save, "decomposed_init.pt")) == metrics["checksums_loaded"][0]
    assert train.state_checksum(rebuilt(save, "model.pt")) == metrics["checksums_final"][0]

    # a decomposed checkpoint + its config resumes without decomposing again (0 epochs: evaluate only)
    resumed = tmp_path / "resumed.json"
    assert run_main(["--checkpoint", str(save / "model.pt"), "--config", str(save / "decompose_config.json"),
                     "--epochs", "0", *SMALL, "--metrics", str(resumed)]) == 0
    again = read(resumed)
    assert again["checksums_loaded"] == metrics["checksums_final"]
    assert again["accuracy"] == pytest.approx(metrics["accuracy"])


def test_the_same_seed_gives_the_same_run(pretrained, tmp_path) -> None:
    checkpoint, _ = pretrained
    results = []
    for name in ("a", "b"):
        assert run_main(["--checkpoint", str(checkpoint), "--ratio", "0.5", "--epochs", "1", "--seed", "3",
                         *SMALL, "--metrics", str(tmp_path / f"{name}.json")]) == 0
        results.append(read(tmp_path / f"{name}.json"))
    assert results[0]["checksums_final"] == results[1]["checksums_final"]
    assert results[0]["accuracy"] == results[1]["accuracy"]


def test_dry_run_checks_without_training(pretrained, capsys) -> None:
    checkpoint, _ = pretrained
    assert run_main(["--dry_run", "--world_size", "4", "--checkpoint", str(checkpoint), *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "ok:" in printed and "4 process(es)" in printed and "layers to decompose" in printed
    assert "epoch" not in printed


# ------------------------------------------------------------------------------------------------ bad input

def _decomposed_checkpoint(folder: Path) -> Path:
    model = Decompose(train.small_resnet(width=16)).from_ratio(0.5, divisor=8).decompose_network()
    torch.save(model.state_dict(), folder / "decomposed.pt")
    return folder / "decomposed.pt"


@pytest.mark.parametrize(("case", "message"), [
    ("missing checkpoint", "--checkpoint file"),
    ("checkpoint of another width", "does not fit the model (width 8"),
    ("decomposed checkpoint without its config", "does not fit the model"),
    ("corrupt checkpoint", "cannot read checkpoint"),
    ("unknown option", "unrecognized arguments: --tucker"),
    ("ratio out of range", "ratio must be a float strictly between 0 and 1"),
    ("two decomposition options", "not allowed with argument"),
    ("config naming unknown layers", "names layers the model does not have"),
    ("divisor too large", "no layer of this SmallResNet would be decomposed"),
    ("batch larger than the data", "cannot give each of 1 processes a full batch"),
    ("missing data folder", "is not a folder"),
])
def test_bad_input_is_one_line_before_training(case, message, pretrained, tmp_path, capsys) -> None:
    checkpoint, _ = pretrained
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    bad_config = tmp_path / "config.json"
    bad_config.write_text(json.dumps({"layer9.conv": [4, 4]}))
    argv = {
        "missing checkpoint": ["--checkpoint", str(tmp_path / "nope.pt")],
        "checkpoint of another width": ["--checkpoint", str(checkpoint), "--width", "8"],
        "decomposed checkpoint without its config": ["--checkpoint", str(_decomposed_checkpoint(tmp_path))],
        "corrupt checkpoint": ["--checkpoint", str(corrupt)],
        "unknown option": ["--tucker"],
        "ratio out of range": ["--ratio", "1.5"],
        "two decomposition options": ["--ratio", "0.5", "--vbmf"],
        "config naming unknown layers": ["--config", str(bad_config)],
        "divisor too large": ["--divisor", "64"],
        "batch larger than the data": ["--batch_size", "5000"],
        "missing data folder": ["--data_path", str(tmp_path / "nothing")],
    }[case]
    save, metrics = tmp_path / "run", tmp_path / "metrics.json"
    assert run_main([*SMALL, *argv, "--save", str(save), "--metrics", str(metrics)]) == 2
    captured = capsys.readouterr()
    error = captured.err.strip()
    assert message in error and len(error.splitlines()) == 1, error
    assert "epoch" not in captured.out  # stopped before training
    assert not save.exists() and not metrics.exists()


# ------------------------------------------------------------------------------------------------ N processes

@pytest.mark.slow
def test_two_processes_with_torchrun_load_the_same_weights_and_stay_in_sync(pretrained, tmp_path) -> None:
    checkpoint, _ = pretrained
    out = tmp_path / "np"
    result = run_script("train_full_np.sh", "--nproc", "2", "--output_dir", str(out), "--checkpoint",
                        str(checkpoint), "--ratio", "0.5", "--epochs", "1", *SMALL)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = read(out / "metrics.json")
    assert metrics["world_size"] == 2 and metrics["backend"] == "gloo"
    assert metrics["threads_per_process"] == 1
    loaded, final = metrics["checksums_loaded"], metrics["checksums_final"]
    # every rank loaded the one state dict rank 0 saved, and DDP kept them identical through training
    assert len(loaded) == 2 and loaded[0] == loaded[1]
    assert len(final) == 2 and final[0] == final[1]
    assert loaded[0] != final[0]
    assert train.state_checksum(rebuilt(out, "decomposed_init.pt")) == loaded[0]
    assert train.state_checksum(rebuilt(out, "model.pt")) == final[0]
    assert metrics["layers_decomposed"] >= 5 and metrics["parameters"] < metrics["parameters_original"]
    assert all(safe(path) for path in out.iterdir())
    assert "Final top-1 accuracy" in (out / "train.log").read_text()


def test_launcher_refuses_more_processes_than_the_data_allows(pretrained, tmp_path) -> None:
    checkpoint, _ = pretrained
    out = tmp_path / "np"
    result = run_script("train_full_np.sh", "--nproc", "64", "--output_dir", str(out), "--checkpoint",
                        str(checkpoint), *SMALL)
    assert result.returncode == 2
    error = result.stderr.strip()
    assert "cannot give each of 64 processes a full batch" in error and len(error.splitlines()) == 1, error
    assert "running:" not in result.stdout and not out.exists()  # torchrun never started


@pytest.mark.parametrize(("args", "message"), [
    ([], "--nproc N is required"),
    (["--nproc", "two"], "--nproc must be a whole number > 0"),
    (["--nproc", "2", "--nnodes", "2"], "needs --rdzv_endpoint"),
    (["--nproc", "2", "--data_path", "/no/such/folder"], "is not a folder"),
])
def test_launcher_usage_errors(args, message) -> None:
    result = run_script("train_full_np.sh", *args, timeout=30)
    assert result.returncode == 2 and message in result.stderr


def test_one_process_launcher_on_a_folder_of_images(tmp_path) -> None:
    from PIL import Image

    digits = load_digits()
    folder = tmp_path / "images"
    for label in range(3):
        (folder / f"class{label}").mkdir(parents=True)
        pixels = digits.train_x[digits.train_y == label][:24, 0]
        for index, image in enumerate(pixels):
            scaled = (image - image.min()) / (np.ptp(image) + 1e-6) * 255
            Image.fromarray(scaled.astype(np.uint8)).save(folder / f"class{label}" / f"{index}.png")
    out = tmp_path / "out"
    result = run_script("train_full_1p.sh", "--data_path", str(folder), "--output_dir", str(out),
                        "--ratio", "0.5", "--epochs", "1", "--batch_size", "8", "--image_size", "12", *SMALL)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = read(out / "metrics.json")
    assert metrics["train_samples"] + metrics["test_samples"] == 72 and metrics["test_samples"] == 15
    assert "3 classes" in metrics["data"] and "1x12x12" in metrics["data"]
    assert metrics["decomposed"] and (out / "model.pt").is_file() and (out / "train.log").is_file()
    assert run_script("train_full_1p.sh", "--help", timeout=30).returncode == 0


# ------------------------------------------------------------------------------------------------ data

def test_digits_split_is_fixed_stratified_and_standardised() -> None:
    first, second = load_digits(), load_digits()
    assert len(first.train_y) + len(first.test_y) == 1797 and first.train_x.shape[1:] == (1, 8, 8)
    assert np.array_equal(first.test_y, second.test_y) and np.array_equal(first.test_x, second.test_x)
    assert set(np.unique(first.test_y)) == set(range(10))
    assert abs(float(first.train_x.mean())) < 1e-4 and abs(float(first.train_x.std()) - 1) < 1e-3
    assert load_digits(16).train_x.shape[1:] == (1, 16, 16)


def test_image_folder_train_val_layout_and_errors(tmp_path) -> None:
    from PIL import Image

    for split in ("train", "val"):
        for name in ("cat", "dog"):
            (tmp_path / split / name).mkdir(parents=True)
            for index in range(3):
                Image.new("RGB", (10, 7), color=(index * 40, 0, 200)).save(tmp_path / split / name / f"{index}.jpg")
    data = load_image_folder(tmp_path, size=8, channels=3)
    assert data.classes == ("cat", "dog") and data.train_x.shape == (6, 3, 8, 8) and len(data.test_y) == 6
    (tmp_path / "train" / "cow").mkdir()
    with pytest.raises(DataError, match="they must match"):
        load_image_folder(tmp_path)
    (tmp_path / "val" / "cow").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        load_image_folder(tmp_path)
    (tmp_path / "val" / "cow" / "broken.png").write_bytes(b"not an image")
    (tmp_path / "train" / "cow" / "ok.png").write_bytes((tmp_path / "train" / "cat" / "0.jpg").read_bytes())
    with pytest.raises(DataError, match="cannot read image"):
        load_image_folder(tmp_path)
