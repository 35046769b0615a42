"""PyTorch and MindSpore agree: the same architecture with the same weights decomposes to the same
``decompose_config``, to factors whose products agree, and to models whose outputs agree; the
MindSpore ResNet-50 gets the PyTorch ResNet-50's config; ``lowrank demo --framework mindspore`` prints
what the PyTorch demo prints.
"""

from __future__ import annotations

import os

os.environ.setdefault("GLOG_v", "3")  # MindSpore's C++ logs: errors only

import json  # noqa: E402
import re  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
ms = pytest.importorskip("mindspore")

from models import resnet50 as torch_resnet50  # noqa: E402
from ms_models import CellSnapshot  # noqa: E402
from ms_models import resnet50 as ms_resnet50  # noqa: E402
from parity_models import (  # noqa: E402
    copy_mindspore_to_torch,
    copy_torch_to_mindspore,
    mindspore_params,
    torch_to_mindspore,
    twins,
)

import frontends.mindspore as ms_frontend  # noqa: E402
import frontends.torch as torch_frontend  # noqa: E402
from lowrank_ir import Decompose, Graph, Op, count_parameters  # noqa: E402

PRODUCT_TOLERANCE = 1e-5
OUTPUT_TOLERANCE = 1e-4


pytestmark = [pytest.mark.mindspore, pytest.mark.torch]


@pytest.fixture(autouse=True)
def _seed_mindspore() -> None:
    ms.set_seed(0)


def rel(actual: np.ndarray, expected: np.ndarray) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def inputs(kind: str, count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "cnn":
        return rng.standard_normal((count, 3, 16, 16)).astype(np.float32)
    if kind == "cnn8":
        return rng.standard_normal((count, 8, 8, 8)).astype(np.float32)
    return rng.integers(0, 64, (count, 16)).astype(np.int32)


def run_torch(model, x: np.ndarray) -> np.ndarray:
    tensor = torch.from_numpy(x).long() if x.dtype == np.int32 else torch.from_numpy(x)
    with torch.no_grad():
        return model(tensor).numpy()


def run_ms(cell, x: np.ndarray) -> np.ndarray:
    return cell(ms.Tensor(x)).asnumpy()


def factor_product(graph: Graph, name: str, parts: int) -> np.ndarray:
    """The layer a decomposed model computes, rebuilt from its factors in the IR layout."""
    nodes = [graph.node(f"{name}.{index}") for index in range(parts)]
    weights = [graph.param(node, "weight") for node in nodes]
    if nodes[0].op is Op.EMBEDDING:
        return weights[0] @ weights[1].T
    if nodes[0].op is Op.LINEAR:
        return weights[1] @ weights[0]
    first, core, last = weights
    return np.einsum("or,rs...,si->oi...", last.reshape(last.shape[:2]), core, first.reshape(first.shape[:2]))


# ------------------------------------------------------------------------------------------ the map


@pytest.mark.parametrize("kind", ["cnn", "transformer"])
def test_name_map_covers_both_models_exactly_and_round_trips(kind: str) -> None:
    model, cell = twins(kind)
    names = torch_to_mindspore(model)
    assert set(names.values()) == {param.name for param in cell.get_parameters()}
    assert set(names) == {key for key in model.state_dict() if not key.endswith("num_batches_tracked")}
    assert len(set(names.values())) == len(names)  # one-to-one
    if kind == "cnn":
        assert names["layer1.0.bn1.weight"] == "layer1.0.bn1.gamma"
        assert names["layer1.0.downsample.1.running_var"] == "layer1.0.downsample.1.moving_variance"
        assert mindspore_params(model)["rows.weight"].shape == tuple(cell.rows.weight.shape) == (32, 32, 1, 3)
    else:
        assert names["tok.weight"] == "tok.embedding_table" and names["ln1.weight"] == "ln1.gamma"
    for param in cell.get_parameters():  # the copy really landed
        np.testing.assert_array_equal(param.asnumpy(), mindspore_params(model)[param.name])
    # and back: a fresh PyTorch model loaded from the MindSpore cell equals the original
    fresh, _ = twins(kind, seed=9)
    copy_mindspore_to_torch(cell, fresh)
    for key, tensor in model.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(fresh.state_dict()[key], tensor), key


def test_name_map_rejects_another_structure() -> None:
    model, _ = twins("cnn")
    _, other = twins("transformer")
    with pytest.raises(ValueError, match="the models differ: missing"):
        copy_torch_to_mindspore(model, other)


@pytest.mark.parametrize("kind", ["cnn", "transformer"])
def test_twins_compute_the_same(kind: str) -> None:
    model, cell = twins(kind)
    x = inputs(kind, 4, seed=1)
    assert rel(run_ms(cell, x), run_torch(model, x)) < 1e-5


# -------------------------------------------------------------------------------------- decomposed


@pytest.mark.parametrize("kind", ["cnn", "transformer"])
def test_decompositions_agree_across_frameworks(kind: str) -> None:
    model, cell = twins(kind)
    snap = CellSnapshot(cell)
    ours_torch = Decompose(model).from_ratio(0.5, divisor=8)
    ours_ms = Decompose(cell).from_ratio(0.5, divisor=8)
    assert ours_ms.decompose_config == ours_torch.decompose_config
    config = ours_ms.decompose_config
    assert len(config) >= (6 if kind == "cnn" else 8)
    if kind == "transformer":
        assert {"tok", "pos", "ff1", "head"} <= set(config)
    else:
        assert {"rows", "fc1", "layer1.0.conv1"} <= set(config)
    torch_model, ms_cell = ours_torch.decompose_network(), ours_ms.decompose_network()
    snap.check()

    torch_graph, ms_graph = torch_frontend.lower(torch_model), ms_frontend.lower(ms_cell)
    errors = {}
    for name, rank in config.items():
        parts = 3 if isinstance(rank, list) else 2
        errors[name] = rel(factor_product(ms_graph, name, parts), factor_product(torch_graph, name, parts))
    assert all(error < PRODUCT_TOLERANCE for error in errors.values()), errors  # a NaN fails too

    x = inputs(kind, 8, seed=2)
    expected = run_torch(torch_model, x)
    assert rel(run_ms(ms_cell, x), expected) < OUTPUT_TOLERANCE
    assert rel(expected, run_torch(model, x)) > 1e-3  # the decomposition really changed the model
    # the decomposed weights move across frameworks through the same name map
    structure = Decompose(model).from_ratio(0.5, divisor=8).decompose_network(do_decompose_weight=False)
    copy_mindspore_to_torch(ms_cell, structure)
    assert rel(run_torch(structure.eval(), x), expected) < OUTPUT_TOLERANCE


def test_data_aware_decompositions_agree_across_frameworks() -> None:
    model, cell = twins("cnn")
    calibration = [inputs("cnn", 16, seed) for seed in range(3)]
    ours_torch = Decompose(model).from_ratio(0.5, divisor=8)
    ours_ms = Decompose(cell).from_ratio(0.5, divisor=8)
    torch_model = ours_torch.decompose_network(datasets=[torch.from_numpy(x) for x in calibration])
    ms_cell = ours_ms.decompose_network(datasets=calibration)
    assert {layer.error_kind for layer in ours_ms.report if layer.form} == {"output"}
    for ms_layer, torch_layer in zip(ours_ms.report, ours_torch.report, strict=True):
        assert ms_layer.name == torch_layer.name and ms_layer.rank == torch_layer.rank
        if ms_layer.form:
            assert ms_layer.error == pytest.approx(torch_layer.error, rel=1e-3, abs=1e-5)  # float32 activations
    x = inputs("cnn", 8, seed=5)
    assert rel(run_ms(ms_cell, x), run_torch(torch_model, x)) < OUTPUT_TOLERANCE


def test_sequential_refinement_agrees_across_frameworks() -> None:
    """Layers in execution order, q/k/v sharing one pass: same groups, same model in both frameworks."""
    model, cell = twins("transformer")
    calibration = [inputs("transformer", 8, seed) for seed in range(3)]
    torch_calibration = [torch.from_numpy(ids).long() for ids in calibration]
    ours_torch = Decompose(model).from_ratio(0.5, divisor=8)
    ours_ms = Decompose(cell).from_ratio(0.5, divisor=8)
    names = list(ours_ms.decompose_config)
    groups = ms_frontend.execution_groups(cell, ms_frontend.lower(cell), calibration, names)
    assert groups == torch_frontend.execution_groups(model, torch_frontend.lower(model), torch_calibration, names)
    assert ["q", "k", "v"] in groups
    snap = CellSnapshot(cell)
    torch_model = ours_torch.decompose_network(datasets=torch_calibration, sequential=True)
    ms_cell = ours_ms.decompose_network(datasets=calibration, sequential=True)
    snap.check()
    x = inputs("transformer", 8, seed=9)
    assert rel(run_ms(ms_cell, x), run_torch(torch_model, x)) < OUTPUT_TOLERANCE
    one_pass = ours_ms.decompose_network(datasets=calibration)
    assert rel(run_ms(ms_cell, x), run_ms(one_pass, x)) > 1e-4  # the refinement really changed the factors


# ------------------------------------------------------------------------------------------ ResNet-50


CONVS = ((8, 32, 1), (32, 64, 1), (64, 64, 2))  # (in, out, stride) of 3x3 convs, padding 1, on 8x8 inputs


def conv_twins() -> tuple[torch.nn.Module, ms.nn.Cell]:
    """Three 3x3 convs and a Linear, in PyTorch and MindSpore with the same weights."""
    from mindspore import nn as msnn

    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    cells: list[msnn.Cell] = []
    for cin, cout, stride in CONVS:
        layers += [torch.nn.Conv2d(cin, cout, 3, stride=stride, padding=1), torch.nn.ReLU()]
        cells += [msnn.Conv2d(cin, cout, 3, stride=stride, pad_mode="pad", padding=1, has_bias=True), msnn.ReLU()]
    layers += [torch.nn.Flatten(), torch.nn.Linear(64 * 4 * 4, 10)]
    cells += [msnn.Flatten(), msnn.Dense(64 * 4 * 4, 10)]
    model, cell = torch.nn.Sequential(*layers).eval(), msnn.SequentialCell(cells)
    cell.set_train(False)
    ms.load_param_into_net(cell, {name: ms.Parameter(ms.Tensor(value.detach().numpy()), name=name)
                                  for name, value in model.state_dict().items()})
    return model, cell


def conv_flops(cin: int, cout: int, rank: int | None) -> int:
    """FLOPs per output position of a 3x3 conv, whole (rank None) or Tucker-2 at ranks (rank, rank)."""
    if rank is None:
        return 2 * cout * cin * 9
    return 2 * (cin * rank + rank * rank * 9 + rank * cout)


def linear_flops(cin: int, cout: int, rank: int | None) -> int:
    return 2 * cout * cin if rank is None else 2 * rank * (cin + cout)


@pytest.mark.parametrize("fraction", [0.3, 0.6])
@pytest.mark.parametrize("divisor", [1, 8])
def test_flops_budget_on_convs_in_both_frameworks(fraction: float, divisor: int) -> None:
    model, cell = conv_twins()
    shapes = {"0": (8, 32), "2": (32, 64), "4": (64, 64), "7": (1024, 10)}
    assert rel(run_ms(cell, inputs("cnn8", 2, 0)), run_torch(model, inputs("cnn8", 2, 0))) < OUTPUT_TOLERANCE
    configs = []
    for net in (model, cell):
        decomposer = Decompose(net).from_budget(flops=fraction, divisor=divisor)
        config = decomposer.decompose_config
        configs.append(config)

        def cost(name: str, rank: int | None) -> int:
            flops = linear_flops if name == "7" else conv_flops
            return flops(*shapes[name], rank)

        ranks = {name: None if name not in config else config[name][0] if name != "7" else config[name]
                 for name in shapes}
        assert all(config[name][0] == config[name][1] for name in config if name != "7")
        original = sum(cost(name, None) for name in shapes)
        spent = sum(cost(name, rank) for name, rank in ranks.items())
        largest_step = max(cost(name, min(shapes[name])) - cost(name, min(shapes[name]) - divisor) for name in shapes)
        assert spent <= fraction * original
        assert fraction * original - spent < largest_step
        report = {layer.name: layer for layer in decomposer.report}
        for name, rank in ranks.items():  # the report counts what the closed form counts
            assert (report[name].flops_before, report[name].flops_after) == (cost(name, None), cost(name, rank))
    assert configs[0] == configs[1]


def test_resnet50_gets_the_pytorch_config_and_structure() -> None:
    cell, model = ms_resnet50(), torch_resnet50()
    assert count_parameters(cell) == count_parameters(model) == 25_557_032
    ours_ms = Decompose(cell).from_ratio(0.5)
    ours_torch = Decompose(model).from_ratio(0.5)
    config = ours_ms.decompose_config
    assert config == ours_torch.decompose_config
    assert len(config) == 39 and config["fc"] == 320
    assert "conv1" not in config and not any(name.startswith("layer1.") for name in config)
    assert ours_ms.report.table() == ours_torch.report.table()
    structure = ours_ms.decompose_network(do_decompose_weight=False)
    torch_structure = ours_torch.decompose_network(do_decompose_weight=False)
    names = torch_to_mindspore(torch_structure)
    shapes = {param.name: tuple(param.shape) for param in structure.get_parameters()}
    assert shapes == {names[key]: tuple(tensor.shape) for key, tensor in torch_structure.state_dict().items()
                      if key in names}
    assert shapes["fc.0.weight"] == (320, 2048) and shapes["layer4.2.conv2.1.weight"][2:] == (3, 3)
    assert count_parameters(structure) == count_parameters(torch_structure)


# ------------------------------------------------------------------------------------------- the demo


def test_demo_with_mindspore_prints_what_the_pytorch_demo_prints(tmp_path, capsys) -> None:
    from tools.cli import main
    from tools.demo import ms_demo_model

    assert main(["demo", "--framework", "mindspore", "--out", str(tmp_path / "ms")]) == 0
    printed = capsys.readouterr().out
    assert "lowrank demo (mindspore)" in printed and "TOTAL" in printed and "data-aware" in printed
    folder = tmp_path / "ms"
    assert sorted(path.name for path in folder.iterdir()) == ["decompose_config.json", "decomposed.ckpt",
                                                              "report.json"]
    for path in folder.iterdir():
        assert os.stat(path).st_mode & 0o022 == 0
    assert main(["demo", "--framework", "torch", "--out", str(tmp_path / "torch")]) == 0
    torch_printed = capsys.readouterr().out
    def table(text: str) -> str:  # the printed figures, errors to 3 decimals (float32 activations differ)
        body = text[text.index("layer  kind"):text.index("saved ")]
        return re.sub(r"(\d\.\d{3})\d", r"\1", body)

    assert table(printed) == table(torch_printed)
    report = json.loads((folder / "report.json").read_text())
    torch_report = json.loads((tmp_path / "torch" / "report.json").read_text())
    assert report["totals"] == torch_report["totals"]
    for layer, torch_layer in zip(report["layers"], torch_report["layers"], strict=True):
        error, torch_error = layer.pop("error"), torch_layer.pop("error")
        assert layer == torch_layer
        assert (error is None and torch_error is None) or error == pytest.approx(torch_error, rel=1e-4)
    for mode in ("data-free", "data-aware"):
        for figure, value in report["agreement"][mode].items():
            assert value == pytest.approx(torch_report["agreement"][mode][figure], abs=1e-4), (mode, figure)
    aware, free = report["agreement"]["data-aware"], report["agreement"]["data-free"]
    assert aware["relative_error"] < free["relative_error"]
    # the recipe the demo prints: structure from the saved config, weights from the saved checkpoint
    rebuilt = Decompose(ms_demo_model(), config_file=folder / "decompose_config.json").from_file() \
        .decompose_network(do_decompose_weight=False)
    not_loaded, unused = ms.load_param_into_net(rebuilt, ms.load_checkpoint(str(folder / "decomposed.ckpt")),
                                                strict_load=True)
    assert not_loaded == [] and unused == []


def test_demo_rejects_an_unknown_framework(capsys) -> None:
    from tools.cli import main

    with pytest.raises(SystemExit):
        main(["demo", "--framework", "tensorflow"])
    assert "invalid choice" in capsys.readouterr().err
