"""The IR: nodes, graphs, verify() and its messages, save/load round trips."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from lowrank_ir import Graph, GraphError, LazyArray, Node, Op, Value, conv_pads, load_graph, save_graph, verify
from lowrank_ir._ir import onnx_padding


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def linear_graph(rng: np.random.Generator, bias: bool = True) -> Graph:
    params = {"fc.weight": rng.standard_normal((4, 3)).astype(np.float32)}
    roles = {"weight": "fc.weight"}
    if bias:
        params["fc.bias"] = rng.standard_normal(4).astype(np.float32)
        roles["bias"] = "fc.bias"
    nodes = [Node(Op.LINEAR, "fc", {"in_features": 3, "out_features": 4}, roles, ["x"], ["y"]),
             Node(Op.OPAQUE, "act", {"source_op": "Relu"}, {}, ["y"], ["z"])]
    return Graph(nodes, params, [Value("x", "float32", ("N", 3))], [Value("z", "float32", ("N", 4))],
                 {"source": "test"})


def conv_graph(rng: np.random.Generator) -> Graph:
    attrs = {"in_channels": 4, "out_channels": 6, "kernel_size": (3, 1), "stride": (1, 1), "padding": (1, 0),
             "dilation": (1, 1), "groups": 2, "padding_mode": "zeros"}
    return Graph([Node(Op.CONV, "conv", attrs, {"weight": "conv.weight"})],
                 {"conv.weight": rng.standard_normal((6, 2, 3, 1)).astype(np.float32)})


def test_valid_graphs_verify(rng: np.random.Generator) -> None:
    assert verify(linear_graph(rng)) is not None
    assert verify(conv_graph(rng)) is not None


def test_unknown_op_is_named() -> None:
    with pytest.raises(ValueError, match=r"unknown op 'Dense'.*known ops: Linear, Conv"):
        Node("Dense", "fc")  # type: ignore[arg-type]


def test_duplicate_node_name_rejected(rng: np.random.Generator) -> None:
    graph = linear_graph(rng)
    with pytest.raises(GraphError, match="'fc' is already in the graph"):
        graph.add_node(Node(Op.OPAQUE, "fc", {"source_op": "Relu"}))


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        (lambda g: g.params.pop("fc.bias"), r"refers to params not in the graph: \['fc.bias'\]"),
        (lambda g: g.set_param("fc.weight", np.zeros((4, 5), np.float32)),
         r"shape \(4, 5\), its attributes imply \(4, 3\)"),
        (lambda g: g.set_param("fc.bias", np.zeros(3, np.float32)),
         r"bias 'fc.bias' has shape \(3,\), expected \(4,\)"),
        (lambda g: g.node("fc").attrs.pop("in_features"), r"missing attributes \['in_features'\]"),
        (lambda g: g.node("act").inputs.append("nowhere"), r"inputs \['nowhere'\] are not produced before it"),
    ],
)
def test_verify_names_each_problem(rng: np.random.Generator, break_it, message: str) -> None:
    graph = linear_graph(rng)
    break_it(graph)
    with pytest.raises(GraphError, match=message):
        verify(graph)


def test_verify_lists_every_problem_at_once(rng: np.random.Generator) -> None:
    graph = linear_graph(rng)
    graph.params.pop("fc.bias")
    graph.node("act").inputs.append("nowhere")
    with pytest.raises(GraphError) as info:
        verify(graph)
    assert "fc.bias" in str(info.value) and "nowhere" in str(info.value)


def test_conv_groups_must_divide_channels(rng: np.random.Generator) -> None:
    graph = conv_graph(rng)
    graph.node("conv").attrs["groups"] = 4
    with pytest.raises(GraphError, match="groups=4 must divide.*out_channels=6"):
        verify(graph)


@pytest.mark.parametrize(("padding", "sizes", "stride", "dilation", "expected"), [
    ((1, 2), (7, 7), (1, 1), (1, 1), ([1, 2], [1, 2])),  # per dimension, both ends
    ((0, 1, 2, 3), (7, 7), (1, 1), (1, 1), ([0, 1], [2, 3])),  # ONNX pads: begins..., ends...
    ("valid", (7, 7), (2, 2), (1, 1), ([0, 0], [0, 0])),
    ("same", (7, 8), (2, 2), (1, 1), ([1, 0], [1, 1])),  # out ceil(size / 2): totals 2 and 1, odd extra at the end
    ("same_lower", (7, 8), (2, 2), (1, 1), ([1, 1], [1, 0])),  # ... and at the beginning
    ("same", (5, 5), (1, 1), (2, 2), ([2, 2], [2, 2])),  # total (k - 1) dilation at stride 1
])
def test_conv_pads_resolves_every_padding_form(padding, sizes, stride, dilation, expected) -> None:
    assert conv_pads(padding, sizes, (3, 3), stride, dilation) == expected


def test_conv_pads_names_a_form_it_does_not_know() -> None:
    with pytest.raises(ValueError, match=r"padding 'full' is not 'valid', 'same', 'same_lower'"):
        conv_pads("full", (5,), (3,), (1,), (1,))
    with pytest.raises(ValueError, match=r"padding \(1, 2, 3\) has neither 2 .* nor 4"):
        conv_pads((1, 2, 3), (5, 5), (3, 3), (1, 1), (1, 1))


@pytest.mark.parametrize(("attrs", "expected"), [
    ({}, (0, 0)),
    ({"pads": [1, 2, 1, 2]}, (1, 2)),
    ({"auto_pad": "NOTSET", "pads": [0, 1, 2, 1]}, (0, 1, 2, 1)),
    ({"auto_pad": "VALID", "pads": [1, 1, 1, 1]}, "valid"),
    ({"auto_pad": "SAME_UPPER"}, "same"),
    ({"auto_pad": "SAME_LOWER"}, "same_lower"),
])
def test_onnx_padding_gives_the_conv_padding_form(attrs, expected) -> None:
    assert onnx_padding(attrs, 2) == expected


def test_onnx_padding_names_what_it_cannot_read() -> None:
    with pytest.raises(ValueError, match=r"auto_pad 'SAME' is not one of NOTSET, VALID, SAME_UPPER, SAME_LOWER"):
        onnx_padding({"auto_pad": "SAME"}, 2)
    with pytest.raises(ValueError, match=r"pads \(1, 1\) do not have 4 entries"):
        onnx_padding({"pads": [1, 1]}, 2)


def test_value_mismatch_says_why_an_array_cannot_feed_an_input() -> None:
    value = Value("x", "float32", ("batch", 8))
    assert value.mismatch("float32", (3, 8)) is None
    assert value.mismatch("int64", (3, 8)) == "input 'x' has dtype int64, the graph expects float32"
    assert value.mismatch("float64", (3, 8), "model", any_float=True) is None
    assert value.mismatch("float32", (8,), "model") == ("input 'x' has shape [8] (1 dimensions), the model expects "
                                                        "2 dimensions [batch, 8]")
    assert value.mismatch("float32", (3, 7)).endswith("expects [batch, 8] (dimension 1 must be 8)")
    assert Value("y").mismatch("int8", (1, 2, 3)) is None  # nothing declared, anything fits


def test_replace_node_keeps_graph_consistent(rng: np.random.Generator) -> None:
    graph = linear_graph(rng)
    parts = [Node(Op.LINEAR, "fc.0", {"in_features": 3, "out_features": 2}, {"weight": "fc.0.weight"}, ["x"], ["h"]),
             Node(Op.LINEAR, "fc.1", {"in_features": 2, "out_features": 4},
                  {"weight": "fc.1.weight", "bias": "fc.bias"}, ["h"], ["y"])]
    graph.replace_node("fc", parts, {"fc.0.weight": np.zeros((2, 3), np.float32),
                                     "fc.1.weight": np.zeros((4, 2), np.float32)}, drop_params=["fc.weight", "fc.bias"])
    verify(graph)
    assert [node.name for node in graph] == ["fc.0", "fc.1", "act"]
    assert "fc.weight" not in graph.params and "fc.bias" in graph.params  # still used by fc.1


def test_copy_is_independent(rng: np.random.Generator) -> None:
    graph = linear_graph(rng)
    copy = graph.copy()
    copy.node("fc").attrs["out_features"] = 99
    copy.params.pop("fc.bias")
    assert graph.node("fc").attrs["out_features"] == 4 and "fc.bias" in graph.params
    assert copy.node("fc") is not graph.node("fc")


@pytest.mark.parametrize("make", [linear_graph, conv_graph])
def test_save_load_round_trip(tmp_path, rng: np.random.Generator, make) -> None:
    graph = make(rng)
    save_graph(graph, tmp_path / "g")
    loaded = load_graph(tmp_path / "g")
    assert [(n.op, n.name, n.attrs, n.params, n.inputs, n.outputs) for n in loaded] == \
           [(n.op, n.name, n.attrs, n.params, n.inputs, n.outputs) for n in graph]
    assert loaded.params.keys() == graph.params.keys()
    for name, array in graph.params.items():
        np.testing.assert_array_equal(loaded.params[name], array)
        assert loaded.params[name].dtype == array.dtype
    assert [(v.name, v.dtype, v.shape) for v in loaded.inputs] == [(v.name, v.dtype, v.shape) for v in graph.inputs]
    assert loaded.meta == graph.meta
    structure = json.loads((tmp_path / "g" / "graph.json").read_text())
    assert structure["nodes"][0]["name"] == graph.nodes[0].name  # human-readable
    assert os.stat(tmp_path / "g" / "params.safetensors").st_mode & 0o022 == 0


def test_save_invalid_graph_writes_nothing(tmp_path, rng: np.random.Generator) -> None:
    graph = linear_graph(rng)
    graph.params.pop("fc.weight")
    with pytest.raises(GraphError):
        save_graph(graph, tmp_path / "g")
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_the_previous_graph(tmp_path, rng: np.random.Generator) -> None:
    good = linear_graph(rng)
    save_graph(good, tmp_path / "g")
    bad = linear_graph(rng)
    bad.params["fc.weight"] = np.zeros((4, 3), dtype=object)  # safetensors cannot store object arrays
    with pytest.raises(Exception):  # noqa: B017 - whatever safetensors raises
        save_graph(bad, tmp_path / "g")
    np.testing.assert_array_equal(load_graph(tmp_path / "g").params["fc.weight"], good.params["fc.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g"]


def test_load_errors_name_the_problem(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="graph.json is missing"):
        load_graph(tmp_path)
    (tmp_path / "graph.json").write_text("{not json")
    (tmp_path / "params.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_graph(tmp_path)
    (tmp_path / "graph.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="not a lowrank-ir graph file"):
        load_graph(tmp_path)


def test_lazy_params_are_read_on_each_lookup_and_stay_lazy_in_copies() -> None:
    reads: list[int] = []
    source = np.arange(12, dtype=np.float32).reshape(4, 3)

    def load() -> np.ndarray:
        reads.append(1)
        return source.copy()

    graph = Graph([Node(Op.LINEAR, "fc", {"in_features": 3, "out_features": 4}, {"weight": "fc.weight"})])
    graph.params.set_lazy("fc.weight", LazyArray((4, 3), np.float32, load, np.float16, origin="fc"))
    verify(graph)  # shapes are checked without reading
    assert reads == [] and graph.params.shape("fc.weight") == (4, 3)
    assert graph.params.dtype("fc.weight") == np.float32 and graph.params.source_dtype("fc.weight") == np.float16
    assert graph.params.storage_key("fc.weight") == "fc"
    first, second = graph.params["fc.weight"], graph.param(graph.node("fc"), "weight")
    assert reads == [1, 1] and first is not second and not first.flags.writeable
    np.testing.assert_array_equal(first, source)
    assert [name for name, _ in graph.params.items()] == ["fc.weight"] and len(reads) == 3
    copied = graph.copy()
    assert copied.params.is_lazy("fc.weight") and len(reads) == 3


def test_a_lazy_param_read_in_another_shape_is_refused() -> None:
    lazy = LazyArray((4, 3), np.float32, lambda: np.zeros((3, 4), dtype=np.float32))
    with pytest.raises(GraphError, match=r"shape \(4, 3\) and dtype float32 read as \(3, 4\) float32"):
        lazy.load()
