"""The engine on IR graphs alone (numpy only): plans, rewrites, wiring, structure-only, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from lowrank_ir import Graph, Node, Op, Policy, Value, plan, rewrite, verify
from lowrank_ir._engine import LayerStats


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def dataflow_graph(rng: np.random.Generator) -> Graph:
    """x -> Linear(32 -> 48, bias) -> Relu -> MatMul(48 -> 40) ; plus an embedding table."""
    params = {
        "fc.weight": rng.standard_normal((48, 32)), "fc.bias": rng.standard_normal(48),
        "proj": rng.standard_normal((48, 40)), "table": rng.standard_normal((100, 24)),
    }
    nodes = [
        Node(Op.LINEAR, "fc", {"in_features": 32, "out_features": 48}, {"weight": "fc.weight", "bias": "fc.bias"},
             ["x"], ["h"]),
        Node(Op.OPAQUE, "relu", {"source_op": "Relu"}, {}, ["h"], ["a"]),
        Node(Op.MATMUL, "mm", {"in_features": 48, "out_features": 40}, {"weight": "proj"}, ["a"], ["y"]),
        Node(Op.EMBEDDING, "emb", {"num_embeddings": 100, "embedding_dim": 24, "padding_idx": None},
             {"weight": "table"}, ["ids"], ["e"]),
    ]
    return verify(Graph(nodes, params, [Value("x"), Value("ids")], [Value("y"), Value("e")]))


def run(graph: Graph, x: np.ndarray, ids: np.ndarray) -> dict[str, np.ndarray]:
    """A tiny numpy interpreter for the ops used here."""
    values = {"x": x, "ids": ids}
    for node in graph:
        w = graph.param(node, "weight")
        b = graph.param(node, "bias")
        (source,) = node.inputs
        if node.op is Op.LINEAR:
            values[node.outputs[0]] = values[source] @ w.T + (0 if b is None else b)
        elif node.op is Op.MATMUL:
            values[node.outputs[0]] = values[source] @ w
        elif node.op is Op.EMBEDDING:
            values[node.outputs[0]] = w[values[source]]
        else:
            values[node.outputs[0]] = np.maximum(values[source], 0)
    return values


def test_full_rank_rewrite_computes_the_same(rng: np.random.Generator) -> None:
    graph = dataflow_graph(rng)
    chosen = plan(graph, Policy.config({"fc": 32, "mm": 40, "emb": 24}))
    new = rewrite(graph, chosen).graph
    x, ids = rng.standard_normal((5, 32)), rng.integers(0, 100, 7)
    before, after = run(graph, x, ids), run(new, x, ids)
    np.testing.assert_allclose(after["y"], before["y"], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(after["e"], before["e"], rtol=1e-10, atol=1e-10)


def test_rewrite_names_and_wires_parts(rng: np.random.Generator) -> None:
    graph = dataflow_graph(rng)
    new = rewrite(graph, plan(graph, Policy.config({"fc": 8, "emb": 4}))).graph
    names = [node.name for node in new]
    assert names == ["fc.0", "fc.1", "relu", "mm", "emb.0", "emb.1"]
    assert new.node("fc.0").inputs == ["x"] and new.node("fc.1").outputs == ["h"]
    assert new.node("fc.0").outputs == new.node("fc.1").inputs
    assert "bias" not in new.node("fc.0").params and new.node("fc.1").params["bias"] == "fc.1.bias"
    assert (new.node("emb.0").op, new.node("emb.1").op) == (Op.EMBEDDING, Op.LINEAR)
    assert new.param(new.node("fc.0"), "weight").shape == (8, 32)
    assert new.param(new.node("emb.1"), "weight").shape == (24, 4)
    assert "fc.weight" not in new.params and "table" not in new.params
    assert new.meta["factorized"] == {"fc": ["fc.0", "fc.1"], "emb": ["emb.0", "emb.1"]}


def test_rewrite_leaves_the_input_graph_alone(rng: np.random.Generator) -> None:
    graph = dataflow_graph(rng)
    before = {name: array.copy() for name, array in graph.params.items()}
    rewrite(graph, plan(graph, Policy.ratio(0.5, divisor=1)))
    assert [node.name for node in graph] == ["fc", "relu", "mm", "emb"]
    assert before.keys() == graph.params.keys()
    for name, array in before.items():
        np.testing.assert_array_equal(graph.params[name], array)


def test_truncation_is_the_best_rank_r_approximation(rng: np.random.Generator) -> None:
    graph = dataflow_graph(rng)
    result = rewrite(graph, plan(graph, Policy.config({"fc": 10})))
    w = graph.params["fc.weight"]
    product = result.graph.params["fc.1.weight"] @ result.graph.params["fc.0.weight"]
    singular = np.linalg.svd(w, compute_uv=False)
    optimum = np.sqrt(np.sum(singular[10:] ** 2))
    assert np.linalg.norm(w - product) == pytest.approx(optimum, rel=1e-9)
    assert result.errors["fc"] == (pytest.approx(optimum / np.linalg.norm(w), rel=1e-9), "weight")


def test_structure_only_uses_placeholders(rng: np.random.Generator) -> None:
    graph = dataflow_graph(rng)
    new = rewrite(graph, plan(graph, Policy.config({"fc": 8, "mm": 16})), weights=False).graph
    core = new.params["mm.0.weight"]
    assert core.shape == (48, 16) and not core.any()
    assert core.strides == (0, 0)  # no memory behind it
    assert new.params["fc.1.bias"] is graph.params["fc.bias"]


def test_rewrite_is_deterministic_and_parallel_agrees(rng: np.random.Generator) -> None:
    graph = dataflow_graph(rng)
    chosen = plan(graph, Policy.ratio(0.4, divisor=1))
    serial = rewrite(graph, chosen, workers=1).graph
    again = rewrite(graph, chosen, workers=1).graph
    parallel = rewrite(graph, chosen, workers=2).graph
    for name in serial.params:
        np.testing.assert_array_equal(serial.params[name], again.params[name])
        # BLAS thread counts differ between the two runs: equal up to summation order
        np.testing.assert_allclose(serial.params[name], parallel.params[name], rtol=1e-10, atol=1e-12)


def test_parallel_layers_start_dearest_first_and_keep_their_order() -> None:
    # Two workers: the dearest task starts first (a large layer must not be left to run alone at the end).
    import threading

    from lowrank_ir._engine import PlanEntry, _cost, _run_parallel

    started: list[int] = []
    lock = threading.Lock()

    def task(index: int) -> int:
        with lock:
            started.append(index)
        return index * 10

    costs = [1.0, 5.0, 3.0, 8.0, 2.0]
    results = _run_parallel([lambda index=index: task(index) for index in range(5)], [str(i) for i in range(5)],
                            workers=2, costs=costs)
    assert results == [0, 10, 20, 30, 40]
    assert 3 in started[:2]  # the dearest is taken first (by one of the two workers)
    assert sorted(started) == [0, 1, 2, 3, 4]
    assert _cost(PlanEntry("a", Op.CONV, (512, 512, 3, 3), "tucker2", (320, 320))) > _cost(
        PlanEntry("b", Op.LINEAR, (1000, 2048), "svd", 320))


def test_data_aware_uses_stats_and_reports_output_error(rng: np.random.Generator) -> None:
    graph = dataflow_graph(rng)
    mixing = rng.standard_normal((32, 32)) * np.logspace(0, -3, 32)
    x = rng.standard_normal((4000, 32)) @ mixing
    stats = {"fc": LayerStats(x.T @ x / len(x), len(x))}
    chosen = plan(graph, Policy.config({"fc": 6}))
    aware = rewrite(graph, chosen, stats=stats)
    free = rewrite(graph, chosen)
    w = graph.params["fc.weight"]

    def output_error(result) -> float:
        product = result.graph.params["fc.1.weight"] @ result.graph.params["fc.0.weight"]
        return float(np.linalg.norm(x @ (w - product).T) / np.linalg.norm(x @ w.T))

    assert aware.errors["fc"][1] == "output"
    assert aware.errors["fc"][0] == pytest.approx(output_error(aware), rel=1e-6)
    assert output_error(aware) < 0.5 * output_error(free)


def test_too_few_calibration_rows_are_warned_about(rng: np.random.Generator, caplog) -> None:
    """Fewer rows than input features: the factors fit those rows, and the error measured on them is optimistic."""
    graph = dataflow_graph(rng)
    chosen = plan(graph, Policy.config({"fc": 12}))
    few = rng.standard_normal((10, 32))
    with caplog.at_level("WARNING", logger="lowrank_ir._engine"):
        result = rewrite(graph, chosen, stats={"fc": LayerStats(few.T @ few / len(few), len(few))})
    assert result.errors["fc"][0] < 1e-6  # rank 12 >= 10 rows: exact on them, whatever the weight
    assert "1 of 1 data-aware layers saw fewer calibration rows than input features ('fc': 10 rows for 32 " \
           "features)" in caplog.text
    caplog.clear()
    many = rng.standard_normal((400, 32))
    with caplog.at_level("WARNING", logger="lowrank_ir._engine"):
        rewrite(graph, chosen, stats={"fc": LayerStats(many.T @ many / len(many), len(many))})
    assert "calibration rows" not in caplog.text


def conv_node(groups: int = 1, **extra) -> Node:
    attrs = {"in_channels": 8, "out_channels": 8, "kernel_size": (3, 3), "stride": (1, 1), "padding": (1, 1),
             "dilation": (1, 1), "groups": groups, "padding_mode": "zeros", **extra}
    return Node(Op.CONV, "conv", attrs, {"weight": "w"})


@pytest.mark.parametrize(("node", "shape", "reason"), [
    (conv_node(groups=2), (8, 4, 3, 3), "grouped convolution"),
    (conv_node(locked="nn.MultiheadAttention reads out_proj.weight"), (8, 8, 3, 3), "MultiheadAttention"),
])
def test_layers_left_alone_say_why(rng: np.random.Generator, node: Node, shape, reason: str) -> None:
    graph = Graph([node], {"w": rng.standard_normal(shape)})
    chosen = plan(graph, Policy.fixed(2, divisor=1))
    assert not chosen.entries["conv"].decomposed
    assert reason in chosen.entries["conv"].reason
    assert chosen.decompose_config() == {}


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weights_are_named(rng: np.random.Generator, bad: float) -> None:
    graph = dataflow_graph(rng)
    graph.params["proj"] = graph.params["proj"].copy()
    graph.params["proj"][3, 4] = bad
    with pytest.raises(ValueError, match=r"layer 'mm': weight 'proj' holds 1 NaN or Inf"):
        plan(graph, Policy.ratio(0.5, divisor=1))


def test_config_for_unknown_layer_lists_the_real_ones(rng: np.random.Generator) -> None:
    graph = dataflow_graph(rng)
    with pytest.raises(ValueError, match=r"does not have.*\['fc2'\].*'fc', 'mm', 'emb'"):
        plan(graph, Policy.config({"fc2": 4}))


def test_config_rank_above_the_dimension_is_rejected(rng: np.random.Generator) -> None:
    graph = dataflow_graph(rng)
    with pytest.raises(ValueError, match=r"rank 33, above its largest possible rank \[32\]"):
        plan(graph, Policy.config({"fc": 33}))


def test_decompose_config_format(rng: np.random.Generator) -> None:
    graph = Graph([conv_node()], {"w": rng.standard_normal((8, 8, 3, 3))})
    config = plan(graph, Policy.fixed(2, divisor=1)).decompose_config()
    assert config == {"conv": [2, 2]} and isinstance(config["conv"], list)


@pytest.mark.parametrize("workers", [1, 2])
def test_progress_reports_every_layer_once(rng: np.random.Generator, workers: int) -> None:
    graph = dataflow_graph(rng)
    calls: list[tuple[int, int, str]] = []
    rewrite(graph, plan(graph, Policy.config({"fc": 4, "mm": 4, "emb": 4})), workers=workers,
            progress=lambda done, total, name: calls.append((done, total, name)))
    assert [done for done, _, _ in calls] == [1, 2, 3]
    assert {total for _, total, _ in calls} == {3}
    assert sorted(name for _, _, name in calls) == ["emb", "fc", "mm"]


def test_a_pointwise_tucker2_is_scheduled_at_the_cost_of_its_svd() -> None:
    # The engine starts the dearest layers first: a 1x1 kernel's Tucker-2 is its truncated SVD (no HOOI sweeps),
    # so it costs what the SVD of its matrix costs, below a 3x3 kernel of fewer weights that takes HOOI.
    from lowrank_ir._engine import TUCKER2, factorization_cost

    pointwise = factorization_cost((2048, 1024, 1, 1), TUCKER2, (320, 320))
    assert pointwise == factorization_cost((2048, 1024))
    assert pointwise < factorization_cost((512, 512, 3, 3), TUCKER2, (320, 320))
