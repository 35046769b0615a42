"""Layouts of a factorized 1x1 conv: the reference tool's three convs, or the compact two.

At the same rank both compute the same function (the reference layout's middle conv is an r x r
identity), so a model decomposed in either layout gives the same outputs, data-free and data-aware;
the compact one has r² fewer parameters and one kernel less. ONNX output is compact by default,
PyTorch and MindSpore keep the reference layout unless ``layout="compact"`` is asked for.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from lowrank_ir import LAYOUTS, Decompose, Policy, count_parameters, plan, with_layout
from tests import onnx_models as om

RANK = 8


def _torch_model(seed: int = 0):
    torch = pytest.importorskip("torch")
    from torch import nn

    torch.manual_seed(seed)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.point = nn.Conv2d(24, 32, 1, stride=2, padding=1)  # strided and padded: where the parts put it
            self.spatial = nn.Conv2d(32, 32, 3, padding=1)
            self.fc = nn.Linear(32, 20)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.spatial(torch.relu(self.point(x)))
            return self.fc(h.mean(dim=(2, 3)))

    return Net().eval()


def test_compact_layout_turns_only_pointwise_tucker2_into_two_factors() -> None:
    from frontends import torch as torch_frontend

    graph = torch_frontend.lower(_torch_model())
    reference = plan(graph, Policy.fixed(RANK, divisor=1))
    assert {entry.name: entry.form for entry in reference.decomposed_entries()} == {
        "point": "tucker2", "spatial": "tucker2", "fc": "svd"}
    compact = with_layout(reference, "compact")
    assert {entry.name: (entry.form, entry.rank) for entry in compact.decomposed_entries()} == {
        "point": ("svd", RANK), "spatial": ("tucker2", (RANK, RANK)), "fc": ("svd", RANK)}
    assert with_layout(reference, "reference") is reference
    assert reference.entries["point"].form == "tucker2"  # the plan given is not changed
    assert LAYOUTS == ("reference", "compact")


@pytest.mark.parametrize("layout", ["Compact", "", None, 2])
def test_unknown_layout_is_refused_naming_it_and_the_layouts(layout) -> None:
    with pytest.raises(ValueError, match=r"layout must be one of 'reference', 'compact', got " + repr(layout)):
        with_layout(plan(_lower_onnx(), Policy.fixed(RANK, divisor=1)), layout)


def test_decompose_network_refuses_an_unknown_layout_before_any_work() -> None:
    decomposer = Decompose(_torch_model()).from_fixed(RANK, divisor=1)
    with pytest.raises(ValueError, match="got 'three'"):
        decomposer.decompose_network(layout="three")


@pytest.mark.parametrize("data_aware", [False, True])
def test_torch_layouts_give_the_same_outputs_for_the_same_ranks(data_aware) -> None:
    torch = pytest.importorskip("torch")
    model = _torch_model()
    x = torch.randn(4, 24, 10, 10)
    datasets = [torch.randn(8, 24, 10, 10) + 0.3 for _ in range(2)] if data_aware else None
    decomposer = Decompose(model).from_fixed(RANK, divisor=1)
    reference = decomposer.decompose_network(datasets=datasets)
    reference_report = decomposer.report
    compact = decomposer.decompose_network(datasets=datasets, layout="compact")
    assert len(reference.point) == 3 and len(compact.point) == 2
    assert len(reference.spatial) == len(compact.spatial) == 3 and len(compact.fc) == 2
    assert [key for key in compact.state_dict() if key.startswith("point.")] == [
        "point.0.weight", "point.1.weight", "point.1.bias"]
    assert tuple(compact.point[0].stride) == (2, 2) and tuple(compact.point[0].padding) == (1, 1)
    assert count_parameters(reference) - count_parameters(compact) == RANK * RANK
    assert decomposer.report["point"].params_after == RANK * (24 + 32) + 32
    assert reference_report["point"].params_after == RANK * (24 + 32) + RANK * RANK + 32
    with torch.no_grad():
        expected, got, original = reference(x), compact(x), model(x)
    assert float((expected - original).abs().max()) > 1e-3  # truncated: the comparison is not trivial
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_torch_compact_structure_loads_compact_weights() -> None:
    """The multi-process recipe in the compact layout: weights saved from one build load into the structure."""
    torch = pytest.importorskip("torch")
    decomposer = Decompose(_torch_model()).from_fixed(RANK, divisor=1)
    weighted = decomposer.decompose_network(layout="compact")
    structure = decomposer.decompose_network(do_decompose_weight=False, layout="compact")
    structure.load_state_dict(weighted.state_dict(), strict=True)
    x = torch.randn(2, 24, 10, 10)
    with torch.no_grad():
        torch.testing.assert_close(structure(x), weighted(x))


@pytest.mark.mindspore
def test_mindspore_layouts_give_the_same_outputs_for_the_same_ranks() -> None:
    os.environ.setdefault("GLOG_v", "3")
    ms = pytest.importorskip("mindspore")
    from mindspore import nn

    ms.set_seed(0)

    class Net(nn.Cell):
        def __init__(self) -> None:
            super().__init__()
            self.point = nn.Conv2d(24, 32, 1, stride=2, pad_mode="pad", padding=1, has_bias=True)
            self.head = nn.Dense(32, 20)

        def construct(self, x):
            return self.head(self.point(x).mean(axis=(2, 3)))

    model = Net()
    x = ms.Tensor(np.random.default_rng(0).standard_normal((4, 24, 10, 10)).astype(np.float32))
    decomposer = Decompose(model).from_fixed(RANK, divisor=1)
    reference = decomposer.decompose_network()
    compact = decomposer.decompose_network(layout="compact")
    assert len(reference.point) == 3 and len(compact.point) == 2
    assert sorted(param.name for param in compact.get_parameters() if param.name.startswith("point.")) == [
        "point.0.weight", "point.1.bias", "point.1.weight"]
    expected, got = reference(x).asnumpy(), compact(x).asnumpy()
    assert float(np.abs(expected - model(x).asnumpy()).max()) > 1e-3
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def _pointwise_onnx():
    return om.conv(np.random.default_rng(0), channels=(32, 48), kernel=1, pads=[1, 1, 1, 1], strides=2)


def _lower_onnx():
    from frontends import onnx as onnx_frontend

    return onnx_frontend.lower(_pointwise_onnx())


def _conv_count(model) -> int:
    return sum(1 for node in model.graph.node if node.op_type == "Conv")


def test_onnx_is_compact_by_default_and_matches_the_reference_layout() -> None:
    model = _pointwise_onnx()
    decomposer = Decompose(model).from_fixed(RANK, divisor=1)
    compact = decomposer.decompose_network()
    reference = decomposer.decompose_network(layout="reference")
    assert (_conv_count(compact), _conv_count(reference)) == (2, 3)
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 32, 12, 12)).astype(np.float32)}
    expected, got, original = om.run(reference, feeds)[0], om.run(compact, feeds)[0], om.run(model, feeds)[0]
    assert float(np.abs(expected - original).max()) > 1e-3
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_onnx_command_line_writes_the_compact_form(tmp_path, capsys) -> None:
    import onnx

    from tools.cli import main

    source, output = tmp_path / "point.onnx", tmp_path / "small.onnx"
    onnx.save(_pointwise_onnx(), source)
    assert main(["decompose", str(source), "-o", str(output), "--fixed", str(RANK), "--divisor", "1"]) == 0
    written = onnx.load(output)
    assert _conv_count(written) == 2
    assert {tensor.name: list(tensor.dims) for tensor in written.graph.initializer} == {
        "conv.0.weight": [RANK, 32, 1, 1], "conv.1.weight": [48, RANK, 1, 1], "conv.1.bias": [48]}
    first = next(node for node in written.graph.node if node.name == "conv.0")
    attrs = {attr.name: list(attr.ints) for attr in first.attribute}
    assert attrs["strides"] == [2, 2] and attrs["pads"] == [1, 1, 1, 1]
    table = capsys.readouterr().out
    assert f"{RANK * (32 + 48) + 48}" in table.replace(",", "")  # the compact form's parameters
