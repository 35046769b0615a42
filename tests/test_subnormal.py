"""No value the tool writes is subnormal: factors and bias corrections, in every dtype and backend.

Trained weights often hold near-dead channels (rows of values at the bottom of the dtype's range);
their share of the factors ``U√S`` falls below the dtype's smallest normal number, where CPU
kernels can run tens of times slower. The engine flushes them once, where it casts the factors for writing, and
the report counts them.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from lowrank_ir import Decompose, Policy, build_report, plan, rewrite
from lowrank_ir._engine import LayerStats, approximations
from lowrank_ir._linalg import flush_subnormals, svd_factors
from tests import onnx_models as om

#: Per dtype, the largest value of a near-dead channel: trained PP-OCR rec has 1x1 convs whose dead
#: output channels hold values of 3e-40 .. 1e-38 (float32).
NEAR_DEAD = {"float32": 5e-39, "float16": 2e-6}


def _subnormal_count(array: np.ndarray, tiny: float) -> int:
    magnitude = np.abs(np.asarray(array, dtype=np.float64))
    return int(np.count_nonzero((magnitude > 0) & (magnitude < tiny)))


def _near_dead(rng: np.random.Generator, shape: tuple[int, ...], scale: float, dead: int = 6) -> np.ndarray:
    """A decaying-spectrum float32 weight whose first ``dead`` output channels are scaled by ``scale``."""
    weight = om.decaying(rng, shape, decay=0.97) * 4.0
    weight[:dead] = weight[:dead] / np.abs(weight[:dead]).max() * scale
    return weight


def test_flush_subnormals_zeroes_exactly_the_subnormals_in_each_dtype() -> None:
    import ml_dtypes

    tiny32, tiny16 = float(np.finfo(np.float32).tiny), float(np.finfo(np.float16).tiny)
    cases = [(np.float32, [1.0, -tiny32, tiny32 / 4, -tiny32 / 1024, 0.0, 3e-38]),
             (np.float16, [1.0, -tiny16, tiny16 / 4, -6e-8, 0.0, 1e-4]),
             (ml_dtypes.bfloat16, [1.0, -tiny32, tiny32 / 4, -tiny32 / 64, 0.0, 3e-38])]
    for dtype, values in cases:
        array = np.array(values, dtype=np.float64).astype(dtype)
        flushed, count = flush_subnormals(array)
        assert count == 2, dtype
        assert flushed.dtype == array.dtype and flushed.shape == array.shape
        np.testing.assert_array_equal(flushed.astype(np.float64),
                                      np.where([0, 0, 1, 1, 0, 0], 0.0, array.astype(np.float64)))
        assert array.astype(np.float64)[2] != 0  # the input is not changed


def test_flush_subnormals_returns_the_same_array_when_nothing_is_subnormal() -> None:
    array = np.array([1.0, 0.0, -2.5], dtype=np.float32)
    flushed, count = flush_subnormals(array)
    assert count == 0 and flushed is array
    integers = np.array([0, 1, 2])
    assert flush_subnormals(integers) == (integers, 0)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_engine_factors_of_near_dead_channels_hold_no_subnormals(dtype) -> None:
    """A Gemm with near-dead rows, data-free: its factors would hold subnormals; none are written."""
    from frontends import onnx as onnx_frontend

    rng = np.random.default_rng(0)
    model = om.mlp(rng, dims=(128, 96, 40))
    weight = _near_dead(rng, (96, 128), NEAR_DEAD[dtype])
    graph = onnx_frontend.lower(model)
    graph.params["fc0.weight"] = weight.astype(dtype)
    graph.params["fc0.bias"] = graph.params["fc0.bias"].astype(dtype)
    graph.params["fc1.weight"] = graph.params["fc1.weight"].astype(dtype)
    graph.params["fc1.bias"] = graph.params["fc1.bias"].astype(dtype)
    chosen = plan(graph, Policy.config({"fc0": 32}))
    tiny = float(np.finfo(dtype).tiny)
    left, _ = svd_factors(weight.astype(dtype).astype(np.float64), 32)
    assert _subnormal_count(left.astype(dtype), tiny) > 0  # unflushed, the factors would hold subnormals
    result = rewrite(graph, chosen)
    written = {name: result.graph.params[name] for name in ("fc0.0.weight", "fc0.1.weight", "fc0.1.bias")}
    assert all(array.dtype == np.dtype(dtype) for array in written.values())
    assert {name: _subnormal_count(array, tiny) for name, array in written.items()} == dict.fromkeys(written, 0)
    assert result.flushed["fc0"] > 0
    report = build_report(graph, chosen, result.errors, flushed=result.flushed)
    assert report["fc0"].flushed == result.flushed["fc0"]
    assert report.totals()["flushed"] == sum(result.flushed.values())
    assert f"{report.totals()['flushed']} subnormal values flushed to zero" in report.table()


def test_bias_correction_of_near_dead_channels_holds_no_subnormals() -> None:
    """Data-aware, the mean error goes into the bias: on dead channels with a zero bias it is subnormal."""
    from frontends import onnx as onnx_frontend

    rng = np.random.default_rng(1)
    graph = onnx_frontend.lower(om.mlp(rng, dims=(128, 96, 40)))
    graph.params["fc0.weight"] = _near_dead(rng, (96, 128), NEAR_DEAD["float32"])
    graph.params["fc0.bias"] = np.concatenate([np.zeros(6, np.float32), graph.params["fc0.bias"][6:]])
    inputs = rng.standard_normal((512, 128)) + 0.5
    stats = {"fc0": LayerStats(inputs.T @ inputs / len(inputs), len(inputs), inputs.mean(axis=0))}
    chosen = plan(graph, Policy.config({"fc0": 32}))
    tiny = float(np.finfo(np.float32).tiny)
    unflushed = approximations(graph, chosen, stats)["fc0"]["fc0.bias"]  # the full-size view, not written
    assert _subnormal_count(unflushed, tiny) > 0
    result = rewrite(graph, chosen, stats)
    bias = result.graph.params["fc0.1.bias"]
    assert bias.dtype == np.float32 and _subnormal_count(bias, tiny) == 0
    np.testing.assert_allclose(bias[6:], unflushed[6:], rtol=0, atol=0)  # normal values are kept exactly
    assert result.flushed["fc0"] >= _subnormal_count(unflushed, tiny)


def _torch_model(dtype: str) -> Any:
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Linear(128, 96), torch.nn.ReLU(), torch.nn.Linear(96, 40))
    with torch.no_grad():
        model[0].weight.copy_(torch.from_numpy(_near_dead(np.random.default_rng(2), (96, 128), NEAR_DEAD[
            "float16" if dtype == "float16" else "float32"])))
        model[0].bias[:6] = 0.0
    return model.to(getattr(torch, dtype))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_torch_decomposed_model_holds_no_subnormals(dtype) -> None:
    torch = pytest.importorskip("torch")
    model = _torch_model(dtype)
    decomposer = Decompose(model).from_fixed(32, divisor=1)
    small = decomposer.decompose_network()
    tiny = float(torch.finfo(getattr(torch, dtype)).tiny)
    state = {name: tensor.float().numpy() for name, tensor in small.state_dict().items()}
    assert {name for name in state if name.startswith("0.")} == {"0.0.weight", "0.1.weight", "0.1.bias"}
    assert all(tensor.dtype == getattr(torch, dtype) for tensor in small.state_dict().values())
    assert {name: _subnormal_count(array, tiny) for name, array in state.items() if name.startswith("0.")} == {
        "0.0.weight": 0, "0.1.weight": 0, "0.1.bias": 0}
    assert decomposer.report["0"].flushed > 0


def test_torch_data_aware_bias_holds_no_subnormals() -> None:
    torch = pytest.importorskip("torch")
    model = _torch_model("float32")
    batches = [torch.randn(64, 128) + 0.5 for _ in range(4)]
    decomposer = Decompose(model).from_fixed(32, divisor=1)
    small = decomposer.decompose_network(datasets=batches)
    tiny = float(torch.finfo(torch.float32).tiny)
    for name, tensor in small.state_dict().items():
        assert _subnormal_count(tensor.numpy(), tiny) == 0 or not name.startswith("0."), name
    assert decomposer.report["0"].flushed > 0
    assert decomposer.report["0"].error_kind == "output"


@pytest.mark.mindspore
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_mindspore_decomposed_cell_holds_no_subnormals(dtype) -> None:
    ms = pytest.importorskip("mindspore")
    from mindspore import nn

    class Net(nn.Cell):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Dense(128, 96, dtype=getattr(ms, dtype))
            self.head = nn.Dense(96, 40, dtype=getattr(ms, dtype))

        def construct(self, x: Any) -> Any:
            return self.head(self.fc(x))

    model = Net()
    weight = _near_dead(np.random.default_rng(3), (96, 128), NEAR_DEAD[dtype]).astype(dtype)
    model.fc.weight.set_data(ms.Tensor(weight))
    decomposer = Decompose(model).from_fixed(32, divisor=1)
    small = decomposer.decompose_network()
    tiny = float(np.finfo(dtype).tiny)
    written = {param.name: param.asnumpy() for param in small.get_parameters() if param.name.startswith("fc.")}
    assert set(written) == {"fc.0.weight", "fc.1.weight", "fc.1.bias"}
    assert all(array.dtype == np.dtype(dtype) for array in written.values())
    assert {name: _subnormal_count(array, tiny) for name, array in written.items()} == dict.fromkeys(written, 0)
    assert decomposer.report["fc"].flushed > 0


def _factor_arrays(model: Any, layers: list[str]) -> dict[str, np.ndarray]:
    """The arrays an ONNX model holds for the parts of ``layers`` (initializers and Constant nodes)."""
    import onnx
    from onnx import numpy_helper

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(model)
    arrays = {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            arrays[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return {name: array for name, array in arrays.items() if any(name.startswith(f"{layer}.") for layer in layers)}


def test_onnx_decompose_writes_no_subnormals_and_reports_the_count(tmp_path) -> None:
    import onnx

    from tools.cli import main

    rng = np.random.default_rng(4)
    model = om.mlp(rng, dims=(128, 96, 40))
    for tensor in model.graph.initializer:
        if tensor.name == "fc0.weight":
            tensor.CopyFrom(onnx.numpy_helper.from_array(_near_dead(rng, (96, 128), NEAR_DEAD["float32"]), tensor.name))
    source, output, report = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "report.json"
    onnx.save(model, source)
    assert main(["decompose", str(source), "-o", str(output), "--fixed", "32", "--divisor", "1",
                 "--report", str(report)]) == 0
    factors = _factor_arrays(output, ["fc0"])
    assert len(factors) == 3
    tiny = float(np.finfo(np.float32).tiny)
    assert {name: _subnormal_count(array, tiny) for name, array in factors.items()} == dict.fromkeys(factors, 0)
    totals = json.loads(report.read_text())["totals"]
    assert totals["flushed"] > 0


@pytest.mark.slow
def test_ppocr_rec_factors_hold_no_subnormals(tmp_path, capsys) -> None:
    """Trained PP-OCR rec: its dead channels give ~750 subnormal factor values at ratio 0.5.

    (About 1,800 while Tucker-2 searched in float64 only: how many of a dead channel's ~1e-40 entries come
    out nonzero depends on rounding, whereas none may be written.)
    """
    from tools.cli import main

    source = om.ppocr_model("rec")
    if source is None:
        pytest.fail("rapidocr-onnxruntime is not installed (it is in requirements.txt)")
    output, report = tmp_path / "rec.onnx", tmp_path / "report.json"
    assert main(["decompose", str(source), "-o", str(output), "--ratio", "0.5", "--input-shape", "x=1,3,48,320",
                 "--report", str(report)]) == 0
    content = json.loads(report.read_text())
    layers = [layer["name"] for layer in content["layers"] if layer["form"]]
    factors = _factor_arrays(output, layers)
    tiny = float(np.finfo(np.float32).tiny)
    assert len(factors) >= 2 * len(layers)
    assert sum(_subnormal_count(array, tiny) for array in factors.values()) == 0
    assert content["totals"]["flushed"] > 500
    assert "subnormal values flushed to zero" in capsys.readouterr().out
