"""Models as the exporters this project meets write them, decomposed through ONNX and natively.

torch's dynamo exporter and its TorchScript exporter (``dynamo=False``: BatchNorm folded into the convs,
equal initializers de-duplicated through ``Identity``), MindSpore's exporter, and the paddle2onnx PP-OCR
models of ``rapidocr-onnxruntime``. A model decomposed through ONNX must reach, within 1%, the parameter
count of the same model decomposed natively, and the decomposed ONNX must run in onnxruntime close to
the original. Weights have decaying spectra (as trained weights do), so ratio 0.5 keeps most of them.
"""

from __future__ import annotations

import collections
import io
import os
import warnings
from typing import Any

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
nn = torch.nn

from backends import onnx as onnx_backend  # noqa: E402
from frontends import onnx as onnx_frontend  # noqa: E402
from lowrank_ir import Decompose, Policy, build_report, count_parameters, plan  # noqa: E402
from tests.onnx_models import decaying, ppocr_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RATIO, DIVISOR = 0.5, 16
#: The parameter counts through ONNX and natively may differ by this fraction (BatchNorm: the native
#: model counts its scale and shift, the exported one a folded conv bias).
PARITY = 0.01


class _Block(nn.Module):
    """A ResNet basic block (BatchNorm after each conv, a strided 1x1 downsample when the width changes)."""

    def __init__(self, inp: int, out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inp, out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out)
        self.conv2 = nn.Conv2d(out, out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.down = None if stride == 1 and inp == out else nn.Sequential(nn.Conv2d(inp, out, 1, stride, bias=False),
                                                                           nn.BatchNorm2d(out))

    def forward(self, x: Any) -> Any:
        skip = x if self.down is None else self.down(x)
        return torch.relu(skip + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class ResNetLike(nn.Module):
    """stem conv + BN, a 64-wide block, a strided 128-wide block, global pooling, a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(64)
        self.layer1 = _Block(64, 64)
        self.layer2 = _Block(64, 128, stride=2)
        self.fc = nn.Linear(128, 100)

    def forward(self, x: Any) -> Any:
        x = self.layer2(self.layer1(torch.relu(self.bn(self.stem(x)))))
        return self.fc(x.mean((2, 3)))


class TiedEqual(nn.Module):
    """Equal (separate) weights and one tied weight: ``fc3`` and ``conv2`` equal copies, ``head`` tied to ``fc2``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(64, 64, 3, padding=1)
        self.conv2 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 128)
        self.fc3 = nn.Linear(128, 128)
        self.head = nn.Linear(128, 128)
        self.head.weight = self.fc2.weight

    def forward(self, x: Any) -> Any:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3))
        return self.head(torch.relu(self.fc3(torch.relu(self.fc2(self.fc1(h))))))


def _trained_like(model: Any, seed: int) -> Any:
    """``model`` in eval mode with decaying-spectrum weights and non-trivial BatchNorm statistics."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.weight.copy_(torch.from_numpy(decaying(rng, tuple(module.weight.shape), 0.8)))
                if module.bias is not None:
                    module.bias.copy_(torch.from_numpy(rng.normal(0, 0.1, module.bias.shape).astype(np.float32)))
            elif isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, module.weight.shape).astype(np.float32)))
                module.bias.copy_(torch.from_numpy(rng.normal(0, 0.1, module.bias.shape).astype(np.float32)))
                features = module.num_features
                module.running_mean.copy_(torch.from_numpy(rng.normal(0, 0.1, features).astype(np.float32)))
                module.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 2.0, features).astype(np.float32)))
    if isinstance(model, TiedEqual):
        with torch.no_grad():
            model.fc3.weight.copy_(model.fc2.weight)
            model.fc3.bias.copy_(model.fc2.bias)
            model.conv2.weight.copy_(model.conv1.weight)
            model.conv2.bias.copy_(model.conv1.bias)
    return model.eval()


def _export_torch(model: Any, example: Any, dynamo: bool) -> Any:
    with warnings.catch_warnings():  # the exporters' own deprecation and tracer warnings
        warnings.simplefilter("ignore")
        if dynamo:
            return onnx_backend.export(model, example, input_names=["x"])
        stream = io.BytesIO()
        torch.onnx.export(model, (example,), stream, dynamo=False, input_names=["x"])
    return onnx.load_from_string(stream.getvalue())


def _statistics(model: Any) -> int:
    """Elements of BatchNorm running statistics in an ONNX model (float constants, not parameters)."""
    tensors = {tensor.name: tensor for tensor in model.graph.initializer}
    return sum(int(np.prod(tensors[name].dims)) for node in model.graph.node if node.op_type == "BatchNormalization"
               for name in node.input[3:5] if name in tensors)


def _onnx_parameters(model: Any) -> int:
    return count_parameters(model) - _statistics(model)


def _decomposed_both_ways(model: Any, exported: Any) -> tuple[Decompose, Any, Decompose, Any]:
    native = Decompose(model).from_ratio(RATIO, divisor=DIVISOR)
    through_onnx = Decompose(exported).from_ratio(RATIO, divisor=DIVISOR)
    return native, native.decompose_network(), through_onnx, through_onnx.decompose_network()


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("kind", ["resnet", "tied"])
def test_torch_exports_decompose_as_the_native_model(kind: str, dynamo: bool) -> None:
    model = _trained_like(ResNetLike() if kind == "resnet" else TiedEqual(), seed=1)
    example = torch.from_numpy(np.random.default_rng(2).standard_normal((2, 3 if kind == "resnet" else 64, 16, 16))
                               .astype(np.float32))
    exported = _export_torch(model, example, dynamo)
    native, small, through_onnx, small_onnx = _decomposed_both_ways(model, exported)

    # Every layer the native model decomposes is decomposed through ONNX too, at the same rank.
    native_ranks = {name: rank for name, rank in native.decompose_config.items()}
    assert sorted(map(str, through_onnx.decompose_config.values())) == sorted(map(str, native_ranks.values()))
    before, after = count_parameters(model), count_parameters(small)
    onnx_before, onnx_after = _onnx_parameters(exported), _onnx_parameters(small_onnx)
    # (TorchScript stores equal weights once, so its file may hold fewer before decomposition.)
    assert onnx_before <= (1 + PARITY) * before, (onnx_before, before)
    assert abs(onnx_after - after) <= PARITY * after, (onnx_after, after)
    assert after < 0.85 * before

    # The decomposed ONNX runs in onnxruntime close to the original and to the native decomposed model.
    feeds = {"x": example.numpy()}
    report = onnx_backend.validate(exported, small_onnx, feeds)
    with torch.no_grad():
        native_out = small(example).numpy()
    onnx_out = onnxruntime_output(small_onnx, feeds)
    native_error = float(np.abs(native_out - model(example).detach().numpy()).max() / np.abs(native_out).max())
    assert report.max_rel < 0.25
    assert report.max_rel < 2 * native_error + 1e-4
    if kind == "tied":  # no BatchNorm: the same weights, the same factorization, the same outputs
        np.testing.assert_allclose(onnx_out, native_out, rtol=1e-3, atol=1e-4 * np.abs(native_out).max())


def onnxruntime_output(model: Any, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return np.asarray(onnx_frontend.run(onnx_frontend.session(model), feeds)[0])


def test_torchscript_equal_weights_are_split_and_tied_ones_left_alone() -> None:
    """TorchScript writes ``fc3.weight = Identity(fc2.weight)`` and ``head`` reading ``fc2.weight`` itself."""
    model = _trained_like(TiedEqual(), seed=1)
    exported = _export_torch(model, torch.zeros(1, 64, 8, 8), dynamo=False)
    assert {node.op_type for node in exported.graph.node} >= {"Identity"}
    graph = onnx_frontend.lower(exported)
    the_plan = plan(graph, Policy.ratio(RATIO, divisor=DIVISOR))
    report = {layer.name: layer for layer in build_report(graph, the_plan)}
    assert report["fc3"].form == "svd" and report["conv2"].form == "tucker2"  # through Identity: split per layer
    assert report["conv1"].form == "tucker2"  # its initializer feeds conv2's Identity too
    tied = [layer for layer in report.values() if layer.shape == [128, 128] and not layer.form]
    assert len(tied) == 2 and all("also read by Gemm node" in layer.reason for layer in tied)
    native = Decompose(model).from_ratio(RATIO, divisor=DIVISOR)
    assert "fc2" not in native.decompose_config and "head" not in native.decompose_config  # natively tied too


# ------------------------------------------------------------------------------------------- MindSpore

def _mindspore_cnn() -> tuple[Any, np.ndarray]:
    os.environ.setdefault("GLOG_v", "3")
    ms = pytest.importorskip("mindspore")
    from mindspore import nn as msnn

    class Cnn(msnn.Cell):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = msnn.Conv2d(3, 64, 3, pad_mode="pad", padding=1)
            self.bn = msnn.BatchNorm2d(64)
            self.conv2 = msnn.Conv2d(64, 64, 3, pad_mode="pad", padding=1, has_bias=True)
            self.pool = msnn.AvgPool2d(16, 16)
            self.flatten = msnn.Flatten()
            self.fc1 = msnn.Dense(64, 128)
            self.fc2 = msnn.Dense(128, 10)
            self.relu = msnn.ReLU()

        def construct(self, x: Any) -> Any:
            x = self.pool(self.relu(self.conv2(self.relu(self.bn(self.conv1(x))))))
            return self.fc2(self.relu(self.fc1(self.flatten(x))))

    ms.set_seed(0)
    cell = Cnn()
    rng = np.random.default_rng(3)
    for param in cell.trainable_params():
        if param.name.endswith("weight") and len(param.shape) >= 2:
            param.set_data(ms.Tensor(decaying(rng, tuple(param.shape), 0.8)))
    cell.set_train(False)
    return cell, rng.standard_normal((1, 3, 16, 16)).astype(np.float32)


def test_mindspore_export_decomposes_as_the_native_cell() -> None:
    import mindspore as ms

    cell, x = _mindspore_cnn()
    exported = onnx_backend.export(cell, ms.Tensor(x), input_names=["x"])
    native, small, through_onnx, small_onnx = _decomposed_both_ways(cell, exported)
    assert through_onnx.decompose_config == native.decompose_config  # MindSpore keeps the cell paths
    after, onnx_after = count_parameters(small), _onnx_parameters(small_onnx)
    assert abs(onnx_after - after) <= PARITY * after, (onnx_after, after)
    assert after < 0.8 * count_parameters(cell)
    expected = small(ms.Tensor(x)).asnumpy()
    np.testing.assert_allclose(onnxruntime_output(small_onnx, {"x": x}), expected, rtol=1e-3,
                               atol=1e-4 * np.abs(expected).max())
    assert onnx_backend.validate(exported, small_onnx, {"x": x}).max_rel < 0.25


# --------------------------------------------------------------------------------------------- PP-OCR

CANDIDATES = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Gather")


@pytest.mark.parametrize("kind", ["det", "rec", "cls"])
def test_ppocr_every_candidate_layer_is_reported(kind: str) -> None:
    """Every Conv, ConvTranspose and Gemm, and every MatMul/Gather on a constant, has a report row."""
    path = ppocr_model(kind)
    if path is None:
        pytest.fail("rapidocr-onnxruntime==1.4.4 is not installed (it is in requirements.txt)")
    model = onnx.load(str(path))
    graph = onnx_frontend.lower(model)
    report = build_report(graph, plan(graph, Policy.ratio(RATIO, divisor=64)))
    constants = {tensor.name for tensor in model.graph.initializer}
    constants |= {node.output[0] for node in model.graph.node if node.op_type == "Constant"}
    expected = collections.Counter(
        node.op_type for node in model.graph.node if node.op_type in CANDIDATES
        and (node.op_type in ("Conv", "ConvTranspose", "Gemm") or any(name in constants for name in node.input)))
    rows = collections.Counter(layer.op if layer.op in CANDIDATES else graph.node(layer.name).attrs["source_op"]
                               for layer in report)
    assert rows == expected
    for layer in report:
        assert layer.form or layer.reason, layer.name
    if kind == "det":  # the upsampling ConvTransposes are kept, and say why
        kept = [layer for layer in report if layer.op == "ConvTranspose"]
        assert len(kept) == 2 and all("not decomposed yet" in layer.reason for layer in kept)
