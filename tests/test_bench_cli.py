"""``lowrank bench ORIGINAL.onnx DECOMPOSED.onnx``: real onnxruntime sessions on small real models.

No figure is compared with a time limit: the tests check what is reported (runs, medians, the ratio
and speedup they imply, the per-layer rows of the factorized layers) and that bad input is one line
on stderr with exit code 2.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from lowrank_ir import Decompose  # noqa: E402
from tests import onnx_models as om  # noqa: E402
from tools.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def conv_pair(tmp_path_factory):
    """A 1x1 conv model and its compact decomposition (conv.0, conv.1), saved as files."""
    folder = tmp_path_factory.mktemp("bench")
    model = om.conv(np.random.default_rng(0), channels=(64, 96), kernel=1, pads=[0, 0, 0, 0], spatial=16)
    small = Decompose(model).from_fixed(16, divisor=1).decompose_network()
    original, decomposed = folder / "conv.onnx", folder / "conv_small.onnx"
    onnx.save(model, original)
    onnx.save(small, decomposed)
    return str(original), str(decomposed)


def _one_line_error(capsys, *fragments: str) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("lowrank bench: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert captured.out == ""
    return lines[0]


def test_bench_reports_medians_spread_ratio_and_speedup(conv_pair, tmp_path, capsys) -> None:
    report = tmp_path / "bench.json"
    code = main(["bench", *conv_pair, "--input-shape", "x=2,64,16,16", "--runs", "5", "--warmup", "1",
                 "--json", str(report)])
    assert code == 0, capsys.readouterr().err
    table = capsys.readouterr().out
    content = json.loads(report.read_text())
    assert content["runs"] == 5 and content["threads"] == 1 and content["warmup"] == 1
    assert content["inputs"] == {"x": [2, 64, 16, 16]}
    for key in ("original", "decomposed"):
        timing = content[key]
        assert len(timing["times_ms"]) == 5 and all(value > 0 for value in timing["times_ms"])
        assert timing["median_ms"] == pytest.approx(float(np.median(timing["times_ms"])))
        assert timing["min_ms"] <= timing["q25_ms"] <= timing["median_ms"] <= timing["q75_ms"] <= timing["max_ms"]
    ratio = content["decomposed"]["median_ms"] / content["original"]["median_ms"]
    assert content["latency_ratio"] == pytest.approx(ratio)
    assert content["speedup"] == pytest.approx(1 / ratio)
    pairs = np.array(content["decomposed"]["times_ms"]) / np.array(content["original"]["times_ms"])
    assert content["paired_ratio"] == pytest.approx(float(np.median(pairs)))
    assert content["per_layer"] == []
    assert f"latency ratio {ratio:.3f}" in table and f"speedup {1 / ratio:.3f}x" in table
    assert conv_pair[0] in table and conv_pair[1] in table


def test_bench_per_layer_sums_the_parts_of_a_factorized_layer(conv_pair, capsys) -> None:
    assert main(["bench", *conv_pair, "--runs", "2", "--warmup", "0", "--per-layer", "--json", "-"]) == 0
    content = json.loads(capsys.readouterr().out)
    rows = {row["name"]: row for row in content["per_layer"]}
    assert rows["conv"]["original_ms"] > 0 and rows["conv"]["decomposed_ms"] > 0
    assert rows["conv"]["kernels"] == 2  # conv.0 and conv.1, counted to the layer they replace
    assert "conv.0" not in rows and "conv.1" not in rows
    assert content["inputs"] == {"x": [1, 64, 16, 16]}  # the batch axis of random feeds is 1


def test_bench_takes_feeds_from_a_file(conv_pair, tmp_path, capsys) -> None:
    feeds = tmp_path / "feeds.npz"
    np.savez(feeds, x=np.random.default_rng(0).standard_normal((3, 64, 16, 16)).astype(np.float32))
    assert main(["bench", *conv_pair, "--feeds", str(feeds), "--runs", "2", "--warmup", "0", "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["inputs"] == {"x": [3, 64, 16, 16]}


def test_bench_missing_file_is_one_line_exit_2(conv_pair, tmp_path, capsys) -> None:
    missing = str(tmp_path / "nowhere.onnx")
    assert main(["bench", conv_pair[0], missing]) == 2
    _one_line_error(capsys, missing, "does not exist")


def test_bench_refuses_models_whose_inputs_differ(conv_pair, tmp_path, capsys) -> None:
    other = tmp_path / "mlp.onnx"
    onnx.save(om.mlp(np.random.default_rng(1)), other)
    assert main(["bench", conv_pair[0], str(other)]) == 2
    _one_line_error(capsys, "the models take different inputs", "x float32[batch,64,16,16]", "x float32[batch,48]")


@pytest.mark.parametrize(("arguments", "fragments"), [
    (["--input-shape", "x=two,64"], ["--input-shape 'x=two,64' must be NAME=D1,D2,..."]),
    (["--input-shape", "y=1,64,16,16"], ["names inputs the model does not have: ['y']", "it takes ['x']"]),
    (["--input-shape", "x=1,64,16"], ["has 3 dims, input 'x' has 4"]),
    (["--input-shape", "x=1,32,16,16"], ["input 'x' has shape [1, 32, 16, 16]", "dimension 1 must be 64"]),
    (["--runs", "0"], ["--runs must be an integer >= 1, got 0"]),
    (["--threads", "-1"], ["--threads must be an integer >= 1, got -1"]),
])
def test_bench_bad_shapes_and_options_are_one_line_exit_2(conv_pair, arguments, fragments, capsys) -> None:
    assert main(["bench", *conv_pair, *arguments]) == 2
    _one_line_error(capsys, *fragments)


def test_bench_bad_feeds_are_one_line_exit_2(conv_pair, tmp_path, capsys) -> None:
    feeds = tmp_path / "feeds.npz"
    np.savez(feeds, image=np.zeros((1, 64, 16, 16), np.float32))
    assert main(["bench", *conv_pair, "--feeds", str(feeds)]) == 2
    _one_line_error(capsys, "--feeds do not match the model's inputs", "missing ['x']", "unknown ['image']")
    np.savez(feeds, x=np.zeros((1, 64, 16, 16), np.float32))
    assert main(["bench", *conv_pair, "--feeds", str(feeds), "--input-shape", "x=1,64,16,16"]) == 2
    _one_line_error(capsys, "either --feeds or --input-shape")


def test_bench_refuses_a_file_that_is_not_onnx(conv_pair, tmp_path, capsys) -> None:
    text = tmp_path / "model.txt"
    text.write_text("not a model")
    assert main(["bench", str(text), conv_pair[1]]) == 2
    _one_line_error(capsys, repr(str(text)), "is not an ONNX file")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x00not protobuf")
    assert main(["bench", conv_pair[0], str(broken)]) == 2
    _one_line_error(capsys, str(broken))


# ------------------------------------------------------------------------------------------ PyTorch models

TORCH_MODEL = "tests.models:convnet"


@pytest.fixture(scope="module")
def torch_folder(tmp_path_factory):
    """What ``lowrank decompose tests.models:convnet -o DIR --ratio 0.3`` writes."""
    pytest.importorskip("torch")
    folder = tmp_path_factory.mktemp("bench_torch") / "small"
    assert main(["decompose", TORCH_MODEL, "-o", str(folder), "--ratio", "0.3", "--divisor", "8"]) == 0
    return str(folder)


def test_bench_times_pytorch_models_in_eager_mode(torch_folder, capsys) -> None:
    capsys.readouterr()
    code = main(["bench", TORCH_MODEL, torch_folder, "--input-shape", "x=2,16,20,20", "--runs", "4", "--warmup", "1",
                 "--json", "-"])
    assert code == 0, capsys.readouterr().err
    content = json.loads(capsys.readouterr().out)
    assert content["runtime"] == "torch" and content["clock"] == "cpu" and content["runs"] == 4
    assert content["inputs"] == {"x": [2, 16, 20, 20]}
    for key in ("original", "decomposed"):
        assert len(content[key]["times_ms"]) == 4 and all(value > 0 for value in content[key]["times_ms"])
    ratio = content["decomposed"]["median_ms"] / content["original"]["median_ms"]
    assert content["latency_ratio"] == pytest.approx(ratio)


def test_bench_rebuilds_the_decomposed_pytorch_model_that_decompose_wrote(torch_folder) -> None:
    torch = pytest.importorskip("torch")
    from tests.models import convnet
    from tools.bench_cli import _torch_decomposed

    rebuilt = _torch_decomposed(torch_folder, convnet())
    assert isinstance(rebuilt[2], torch.nn.Sequential)  # the 3x3 conv is a Tucker-2 chain
    x = torch.randn(1, 16, 12, 12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        original, small = convnet()(x), rebuilt(x)
    assert 0 < float((small - original).norm() / original.norm()) < 1.0  # the factors were loaded, not left at init


@pytest.mark.parametrize(("arguments", "fragments"), [
    ([], ["a PyTorch model needs its inputs: --input-shape"]),
    (["--input-shape", "x=2,8,20,20"], ["cannot run on inputs {'x': [2, 8, 20, 20]}"]),
    (["--input-shape", "x=2,16,20,20", "--per-layer"], ["--per-layer reads onnxruntime's profiler"]),
])
def test_bench_bad_input_for_pytorch_models_is_one_line_exit_2(torch_folder, arguments, fragments, capsys) -> None:
    capsys.readouterr()
    assert main(["bench", TORCH_MODEL, torch_folder, *arguments]) == 2
    _one_line_error(capsys, *fragments)


def test_bench_refuses_a_folder_decompose_did_not_write(tmp_path, capsys) -> None:
    pytest.importorskip("torch")
    assert main(["bench", TORCH_MODEL, str(tmp_path), "--input-shape", "x=1,16,8,8"]) == 2
    _one_line_error(capsys, "is not what 'lowrank decompose module:factory -o DIR' writes", "decompose_config.json")
