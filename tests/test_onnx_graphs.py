"""Real-world ONNX graph patterns: weights reached through chains of constant ops, shared
initializers, and candidate layers that are not lowered but still reported.

Each model is built by hand in the form exporters write, decomposed exactly (weights of exactly the
rank used), written, and run in onnxruntime against the original.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from backends import onnx as onnx_backend  # noqa: E402
from frontends import onnx as onnx_frontend  # noqa: E402
from lowrank_ir import Op, Policy, build_report, plan, rewrite  # noqa: E402
from tests import onnx_models as om  # noqa: E402
from tools.cli import main  # noqa: E402

OUT, IN, RANK = 12, 16, 4


def low_rank(rng: np.random.Generator, rows: int, cols: int, rank: int = RANK) -> np.ndarray:
    """A float32 matrix of exactly ``rank``: its rank-``rank`` factorization is exact."""
    return (rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, cols))).astype(np.float32)


def _gemm_model(weight_nodes: list[Any], weight: str, inits: dict[str, np.ndarray], bias: str | None = None,
                trans_b: int = 1) -> Any:
    """x [batch, IN] -> Gemm(x, weight[, bias]) -> y [batch, OUT], the weight computed by ``weight_nodes``."""
    gemm = helper.make_node("Gemm", ["x", weight] + ([bias] if bias else []), ["y"], name="fc", transB=trans_b)
    return om.make_model([*weight_nodes, gemm], [om.tensor("x", ["batch", IN])], [om.tensor("y", ["batch", OUT])],
                         inits)


def _identity(rng: np.random.Generator) -> tuple[Any, np.ndarray]:
    w = low_rank(rng, OUT, IN)
    return _gemm_model([helper.make_node("Identity", ["w0"], ["w"], name="copy")], "w", {"w0": w}), w


def _cast(rng: np.random.Generator) -> tuple[Any, np.ndarray]:
    w = low_rank(rng, OUT, IN).astype(np.float16)
    node = helper.make_node("Cast", ["w16"], ["w"], name="cast", to=TensorProto.FLOAT)
    return _gemm_model([node], "w", {"w16": w}), w.astype(np.float32)


def _reshape(rng: np.random.Generator) -> tuple[Any, np.ndarray]:
    w = low_rank(rng, OUT, IN)
    node = helper.make_node("Reshape", ["flat", "shape"], ["w"], name="reshape")
    return _gemm_model([node], "w", {"flat": w.ravel(), "shape": np.array([OUT, IN], np.int64)}), w


def _transpose(rng: np.random.Generator) -> tuple[Any, np.ndarray]:
    w = low_rank(rng, OUT, IN)
    node = helper.make_node("Transpose", ["wt"], ["w"], name="transpose", perm=[1, 0])
    return _gemm_model([node], "w", {"wt": np.ascontiguousarray(w.T)}), w


def _squeeze(rng: np.random.Generator) -> tuple[Any, np.ndarray]:
    w = low_rank(rng, OUT, IN)
    node = helper.make_node("Squeeze", ["w3", "axes"], ["w"], name="squeeze")
    return _gemm_model([node], "w", {"w3": w[None], "axes": np.array([0], np.int64)}), w


def _dequantize(rng: np.random.Generator) -> tuple[Any, np.ndarray]:
    zero = rng.integers(-3, 3, OUT).astype(np.int8)
    product = rng.integers(-2, 3, (OUT, RANK)) @ rng.integers(-2, 3, (RANK, IN))  # rank RANK once dequantized
    q = (zero[:, None] + product).astype(np.int8)
    scale = rng.uniform(0.01, 0.02, OUT).astype(np.float32)
    node = helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["w"], name="dequantize", axis=0)
    expected = ((q.astype(np.float32) - zero[:, None]) * scale[:, None]).astype(np.float32)
    return _gemm_model([node], "w", {"q": q, "scale": scale, "zero": zero}), expected


def _constant_chain(rng: np.random.Generator) -> tuple[Any, np.ndarray]:
    """A ``Constant`` value transposed into the weight, and a bias from a ``Constant`` of ``value_floats``."""
    w = low_rank(rng, OUT, IN)
    nodes = [om.constant_node("wt", np.ascontiguousarray(w.T)),
             helper.make_node("Transpose", ["wt"], ["w"], name="transpose", perm=[1, 0]),
             helper.make_node("Constant", [], ["b"], name="bias", value_floats=rng.standard_normal(OUT).tolist())]
    return _gemm_model(nodes, "w", {}, bias="b"), w


def _long_chain(rng: np.random.Generator) -> tuple[Any, np.ndarray]:
    """Cast -> Transpose -> Reshape -> Identity, as optimisers leave them."""
    w = low_rank(rng, OUT, IN)
    nodes = [helper.make_node("Cast", ["w16"], ["a"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Transpose", ["a"], ["b"], name="transpose", perm=[1, 0]),
             helper.make_node("Reshape", ["b", "shape"], ["c"], name="reshape"),
             helper.make_node("Identity", ["c"], ["w"], name="copy")]
    w16 = np.ascontiguousarray(w.T).astype(np.float16)
    inits = {"w16": w16, "shape": np.array([OUT, IN], np.int64)}
    return _gemm_model(nodes, "w", inits), w16.astype(np.float32).T


def _unsqueeze_conv(rng: np.random.Generator) -> tuple[Any, np.ndarray]:
    """A 1x1 conv whose kernel is a matrix unsqueezed to [out, in, 1, 1]."""
    w = low_rank(rng, OUT, IN)
    nodes = [helper.make_node("Unsqueeze", ["w2", "axes"], ["w"], name="unsqueeze"),
             helper.make_node("Conv", ["x", "w"], ["y"], name="conv", kernel_shape=[1, 1])]
    model = om.make_model(nodes, [om.tensor("x", ["batch", IN, 5, 5])], [om.tensor("y", ["batch", OUT, 5, 5])],
                          {"w2": w, "axes": np.array([2, 3], np.int64)})
    return model, w[:, :, None, None]


CHAINS: dict[str, Callable[[np.random.Generator], tuple[Any, np.ndarray]]] = {
    "identity": _identity, "cast": _cast, "reshape": _reshape, "transpose": _transpose, "squeeze": _squeeze,
    "unsqueeze": _unsqueeze_conv, "dequantize": _dequantize, "constant": _constant_chain, "chain": _long_chain,
}


def _feeds(model: Any, seed: int = 1) -> dict[str, np.ndarray]:
    return onnx_backend.random_feeds(model, seed=seed)


def _decomposed(model: Any, config: dict[str, Any]) -> Any:
    graph = onnx_frontend.lower(model)
    return onnx_backend.build(rewrite(graph, plan(graph, Policy.config(config))).graph, like=model)


@pytest.mark.parametrize("kind", list(CHAINS))
def test_weight_through_a_chain_of_constant_ops_is_folded(kind: str) -> None:
    model, expected = CHAINS[kind](np.random.default_rng(0))
    graph = onnx_frontend.lower(model)
    (layer,) = graph.layers()
    assert layer.op in (Op.LINEAR, Op.CONV) and "locked" not in layer.attrs
    np.testing.assert_array_equal(graph.param(layer, "weight"), expected)
    # Not decomposed, the model is written back exactly as it came (the chain, not a folded copy).
    assert onnx_backend.build(graph, like=model).SerializeToString() == model.SerializeToString()

    rank = [RANK, RANK] if layer.op is Op.CONV else RANK
    small = _decomposed(model, {layer.name: rank})
    # The chain and the constants only it read are gone: the factors replace them.
    assert {node.op_type for node in small.graph.node} == {layer.attrs["source_op"]}
    stored = {tensor.name for tensor in small.graph.initializer}
    assert all(name.startswith(f"{layer.name}.") for name in stored), stored
    factors = sum(int(np.prod(tensor.dims)) for tensor in small.graph.initializer)
    assert factors < OUT * IN + OUT
    feeds = _feeds(model)
    assert onnx_backend.validate(model, small, feeds).max_rel < 1e-4


def _shared_model(rng: np.random.Generator) -> tuple[Any, np.ndarray]:
    """TorchScript's pattern: ``a`` reads ``w`` itself, ``b`` an ``Identity`` of it (an equal, separate weight)."""
    w = low_rank(rng, IN, IN)
    nodes = [helper.make_node("Identity", ["w"], ["w_copy"], name="dedup"),
             helper.make_node("Gemm", ["x", "w"], ["h"], name="a", transB=1),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "w_copy"], ["y"], name="b", transB=1)]
    return om.make_model(nodes, [om.tensor("x", ["batch", IN])], [om.tensor("y", ["batch", IN])], {"w": w}), w


@pytest.mark.parametrize("decomposed", [["a"], ["b"], ["a", "b"]])
def test_shared_initializer_is_split_and_kept_while_read(decomposed: list[str]) -> None:
    model, _ = _shared_model(np.random.default_rng(0))
    graph = onnx_frontend.lower(model)
    assert [node.name for node in graph.layers() if "locked" not in node.attrs] == ["a", "b"]
    small = _decomposed(model, {name: RANK for name in decomposed})
    stored = {tensor.name for tensor in small.graph.initializer}
    ops = [node.op_type for node in small.graph.node]
    assert ("w" in stored) == (decomposed != ["a", "b"])  # kept while an unchanged layer reads it
    assert ("Identity" in ops) == (decomposed == ["a"])  # b unchanged: its Identity stays
    assert onnx_backend.validate(model, small, _feeds(model)).max_rel < 1e-4


def test_the_part_of_a_chain_another_node_reads_stays() -> None:
    rng = np.random.default_rng(0)
    w = low_rank(rng, IN, IN)
    nodes = [helper.make_node("Transpose", ["wt"], ["w"], name="transpose", perm=[1, 0]),
             helper.make_node("Identity", ["w"], ["w_fc"], name="copy"),
             helper.make_node("Gemm", ["x", "w_fc"], ["h"], name="fc", transB=1),
             helper.make_node("Add", ["h", "w"], ["y"], name="add")]  # reads the transposed weight as data
    model = om.make_model(nodes, [om.tensor("x", [IN, IN])], [om.tensor("y", [IN, IN])],
                          {"wt": np.ascontiguousarray(w.T)})
    small = _decomposed(model, {"fc": RANK})
    assert [node.op_type for node in small.graph.node] == ["Transpose", "Gemm", "Gemm", "Add"]
    assert "wt" in {tensor.name for tensor in small.graph.initializer}
    # The value itself read by the layer and by another node: a tied weight, left alone.
    graph = onnx_frontend.lower(model)
    assert "also read by" not in graph.node("fc").attrs.get("locked", "")
    tied = model.graph.node[2]
    tied.input[1] = "w"
    del model.graph.node[1]
    assert "also read by Add node 'add'" in onnx_frontend.lower(model).node("fc").attrs["locked"]
    assert onnx_backend.validate(model, small, _feeds(model)).max_rel < 1e-4


def test_tied_weight_is_left_alone_with_the_reason() -> None:
    """One value read by two layers (PyTorch's tied weights, exported as is): both kept, the reason given."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Gemm", ["x", "w"], ["h"], name="a", transB=1),
             helper.make_node("Gemm", ["h", "w"], ["y"], name="b", transB=1)]
    model = om.make_model(nodes, [om.tensor("x", ["batch", IN])], [om.tensor("y", ["batch", IN])],
                          {"w": low_rank(rng, IN, IN)})
    graph = onnx_frontend.lower(model)
    report = build_report(graph, plan(graph, Policy.ratio(0.5, divisor=1)))
    assert [(layer.name, layer.form) for layer in report] == [("a", None), ("b", None)]
    assert "also read by Gemm node 'b'" in report["a"].reason
    assert report.totals()["params_before"] == IN * IN  # one weight, counted once


def test_overridable_initializer_is_not_folded() -> None:
    """A constant a caller may override (an initializer that is also a graph input) is not folded."""
    model, _ = _identity(np.random.default_rng(0))
    model.graph.input.append(om.tensor("w0", [OUT, IN]))
    graph = onnx_frontend.lower(model)
    assert graph.layers() == []
    report = build_report(graph, plan(graph, Policy.ratio(0.5, divisor=1)))
    assert "caller may override" in report["fc"].reason


def test_sparse_constant_is_not_folded() -> None:
    """A sparse ``Constant`` may declare any size: it is not densified to be folded."""
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(np.ones(2, np.float32), "values"),
                                       numpy_helper.from_array(np.array([0, 5], np.int64), "indices"), [OUT, IN])
    node = helper.make_node("Constant", [], ["w"], name="sparse", sparse_value=sparse)
    graph = onnx_frontend.lower(_gemm_model([node], "w", {}))
    assert graph.layers() == []
    assert graph.meta["unlowered"]["fc"]["reason"] == "'w' is a sparse constant (of any declared size), not folded"


def _candidates_model(rng: np.random.Generator) -> Any:
    nodes = [
        helper.make_node("Gemm", ["x", "w_ok"], ["y_ok"], name="ok", transB=1),
        helper.make_node("Gemm", ["xt", "w_ta"], ["y_ta"], name="trans_a", transA=1, transB=1),
        helper.make_node("MatMul", ["x3", "w3"], ["y3"], name="batched"),
        helper.make_node("Gather", ["table", "ids"], ["y_ids"], name="lookup"),
        helper.make_node("ConvTranspose", ["img", "w_up"], ["y_up"], name="up", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["img", "w_run"], ["y_run"], name="dynamic", kernel_shape=[1, 1]),
    ]
    inputs = [om.tensor("x", [2, IN]), om.tensor("xt", [IN, 2]), om.tensor("x3", [2, 3, IN]),
              om.tensor("ids", [5], TensorProto.INT64), om.tensor("img", [1, 8, 4, 4]),
              om.tensor("w_run", [8, 8, 1, 1])]
    outputs = [om.tensor("y_ok", [2, OUT]), om.tensor("y_ta", [2, OUT]), om.tensor("y3", [2, 3, OUT]),
               om.tensor("y_ids", [5, 2], TensorProto.INT64), om.tensor("y_up", [1, 4, 8, 8]),
               om.tensor("y_run", [1, 8, 4, 4])]
    inits = {"w_ok": low_rank(rng, OUT, IN), "w_ta": low_rank(rng, OUT, IN),
             "w3": rng.standard_normal((2, IN, OUT)).astype(np.float32),
             "table": np.arange(20, dtype=np.int64).reshape(10, 2),
             "w_up": rng.standard_normal((8, 4, 2, 2)).astype(np.float32)}
    return om.make_model(nodes, inputs, outputs, inits)


REASONS = {
    "trans_a": "transA=1",
    "batched": "constant 'w3' has 3 dimensions, not 2",
    "lookup": "constant 'table' is int64, not floating point",
    "up": "ConvTranspose layers are not decomposed yet",
    "dynamic": "'w_run' is a graph input, not a constant",
}


def test_every_candidate_layer_is_reported_with_its_reason(tmp_path, capsys) -> None:
    model = _candidates_model(np.random.default_rng(0))
    graph = onnx_frontend.lower(model)
    report = build_report(graph, plan(graph, Policy.ratio(0.5, divisor=1)))
    assert [layer.name for layer in report] == ["ok", "trans_a", "batched", "lookup", "up", "dynamic"]
    assert report["ok"].form == "svd"
    for name, reason in REASONS.items():
        assert report[name].reason == reason and report[name].form is None
    assert report["up"].shape == [8, 4, 2, 2] and report["up"].params_before == report["up"].params_after == 128
    assert report["dynamic"].shape == [] and report["dynamic"].params_before == 0
    assert report.totals()["layers"] == 6 and report.totals()["decomposed"] == 1

    path = tmp_path / "candidates.onnx"
    onnx.save(model, path)
    assert main(["inspect", str(path), "--ratio", "0.5", "--divisor", "1"]) == 0
    table = capsys.readouterr().out
    for name, reason in REASONS.items():
        assert any(name in line and reason in line for line in table.splitlines()), (name, table)


def test_output_errors_replace_a_folded_weight() -> None:
    """The measured budget truncates one folded weight at a time through ``output_errors``."""
    model, w = _shared_model(np.random.default_rng(0))
    feeds = [_feeds(model, seed) for seed in range(2)]
    errors = onnx_frontend.output_errors(model, feeds, [{"w_copy": w}, {"w_copy": np.zeros_like(w)}])
    assert errors[0] == 0.0 and errors[1] == pytest.approx(1.0)
    assert len(model.graph.initializer) == 1 and model.graph.node[0].output[0] == "w_copy"  # not changed


def test_folded_params_do_not_change_the_model_proto() -> None:
    model, _ = _long_chain(np.random.default_rng(0))
    before = model.SerializeToString()
    graph = onnx_frontend.lower(model)
    assert graph.meta["onnx"]["folded"] == {"w": ["cast", "transpose", "reshape", "copy"]}
    assert model.SerializeToString() == before
    assert not graph.params["w"].flags.writeable  # the folded value is shared, read-only
