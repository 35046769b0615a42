"""ONNX layers through the IR: lowering, full-rank decomposition reproduces outputs, locks, subgraphs,
data-aware decomposition, the ``Decompose`` facade on a ``ModelProto``."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from backends import onnx as onnx_backend  # noqa: E402
from frontends import onnx as onnx_frontend  # noqa: E402
from lowrank_ir import Decompose, Op, Policy, count_parameters, framework_of, load_graph, plan, rewrite, save_graph  # noqa: E402  # noqa: E402
from tests import onnx_models as om  # noqa: E402


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def full_rank_config(graph):
    """Every decomposable layer at its full rank (an exact factorization)."""
    config = {}
    for node in graph.layers():
        weight = graph.param(node, "weight")
        if node.op is Op.CONV:
            if node.attrs["groups"] == 1:
                config[node.name] = [int(weight.shape[0]), int(weight.shape[1])]
        else:
            config[node.name] = int(min(weight.shape))
    return config


def decompose(model, policy, stats_feeds=None, **lower_args):
    graph = onnx_frontend.lower(model, **lower_args)
    chosen = plan(graph, policy)
    stats = None
    if stats_feeds is not None:
        names = [entry.name for entry in chosen.decomposed_entries()]
        stats = onnx_frontend.collect_stats(model, graph, stats_feeds, names=names)
    result = rewrite(graph, chosen, stats=stats)
    return graph, chosen, result, onnx_backend.build(result.graph, like=model)


def op_types(model) -> list[str]:
    return [node.op_type for node in model.graph.node]


# ---------------------------------------------------------------------------------------- lowering

def test_onnx_models_are_recognised_by_the_registry(rng) -> None:
    assert framework_of(om.mlp(rng)) == "onnx"


def test_gemm_lowers_to_linear_or_matmul_with_its_scales(rng) -> None:
    graph = onnx_frontend.lower(om.mlp(rng, alpha=0.5, beta=2.0))
    fc0 = graph.node("fc0")  # named after the weight: fc0.weight -> fc0
    assert fc0.op is Op.LINEAR and fc0.params == {"weight": "fc0.weight", "bias": "fc0.bias"}
    assert (fc0.attrs["in_features"], fc0.attrs["out_features"], fc0.attrs["alpha"], fc0.attrs["beta"]) == \
        (48, 64, 0.5, 2.0)
    assert fc0.inputs == ["x"] and fc0.outputs == ["h0_pre"] and fc0.attrs["onnx"]["name"] == "gemm0"
    assert graph.node("relu0").op is Op.OPAQUE and graph.node("relu0").attrs["source_op"] == "Relu"
    as_matmul = onnx_frontend.lower(om.mlp(rng, trans_b=0)).node("fc1")
    assert as_matmul.op is Op.MATMUL and graph.param(fc0, "weight").shape == (64, 48)
    assert (as_matmul.attrs["in_features"], as_matmul.attrs["out_features"]) == (64, 40)


def test_constant_nodes_become_params_and_are_written_back_as_constants(rng) -> None:
    model = om.mlp(rng, constants=True)
    graph = onnx_frontend.lower(model)
    assert {"fc0.weight", "fc0.bias", "fc1.weight", "fc1.bias"} <= set(graph.params)
    assert not any(node.attrs.get("source_op") == "Constant" for node in graph)
    written = onnx_backend.build(graph, like=model)
    assert written.SerializeToString() == model.SerializeToString()
    assert op_types(onnx_backend.build(graph)).count("Constant") == 4


def test_conv_attributes_and_padding_forms(rng) -> None:
    cases = {
        "symmetric": (om.conv(rng), (1, 1)),
        "asymmetric": (om.conv(rng, pads=[1, 0, 2, 1]), (1, 0, 2, 1)),
        "same_upper": (om.conv(rng, auto_pad="SAME_UPPER", strides=2), "same"),
        "same_lower": (om.conv(rng, auto_pad="SAME_LOWER", kernel=4), "same_lower"),
        "valid": (om.conv(rng, auto_pad="VALID"), "valid"),
    }
    for label, (model, padding) in cases.items():
        node = onnx_frontend.lower(model).node("conv")
        assert node.op is Op.CONV and node.attrs["padding"] == padding, label
    grouped = onnx_frontend.lower(om.conv(rng, channels=(16, 32), group=4, strides=2, dilations=2)).node("conv")
    assert (grouped.attrs["groups"], grouped.attrs["in_channels"], grouped.attrs["stride"],
            grouped.attrs["dilation"]) == (4, 16, (2, 2), (2, 2))


def test_matmul_sides_and_embedding(rng) -> None:
    right = onnx_frontend.lower(om.matmul(rng, "right")).node("proj")
    left = onnx_frontend.lower(om.matmul(rng, "left", x_shape=("batch", 32, 7))).node("proj")
    assert right.op is Op.MATMUL and "weight_side" not in right.attrs and right.inputs == ["x_relu"]
    assert left.attrs["weight_side"] == "left" and (left.attrs["in_features"], left.attrs["out_features"]) == (32, 24)
    emb = onnx_frontend.lower(om.embedding(rng)).node("emb")
    assert emb.op is Op.EMBEDDING and (emb.attrs["num_embeddings"], emb.attrs["embedding_dim"]) == (100, 48)
    assert emb.inputs == ["ids"]


def test_computed_weights_stay_opaque(rng) -> None:
    """A MatMul of two data inputs, and a Conv whose weight is computed at run time, are not layers."""
    nodes = [helper.make_node("MatMul", ["a", "b"], ["c"], name="mm"),
             helper.make_node("Relu", ["w0"], ["w"], name="relu"),
             helper.make_node("Conv", ["x", "w"], ["y"], name="conv", kernel_shape=[1, 1])]
    model = om.make_model(nodes, [om.tensor("a", [2, 3]), om.tensor("b", [3, 4]), om.tensor("x", [1, 2, 4, 4])],
                          [om.tensor("c", [2, 4]), om.tensor("y", [1, 2, 4, 4])],
                          {"w0": rng.standard_normal((2, 2, 1, 1)).astype(np.float32)})
    graph = onnx_frontend.lower(model)
    assert graph.layers() == []
    assert graph.node("conv").params == {} and graph.node("relu").params == {"input:0": "w0"}
    # The Conv is still listed, with the reason; the MatMul of two run-time values is no candidate.
    assert graph.meta["unlowered"] == {"conv": {"op": "Conv", "weight": "w", "shape": [],
                                                "reason": "'w' is computed at run time (by Relu node 'relu'), "
                                                          "not a constant"}}


def test_per_sample_positions_from_shapes(rng) -> None:
    model = om.conv(rng, strides=2, spatial=16)
    node = onnx_frontend.lower(model).node("conv")
    assert (node.attrs["in_positions"], node.attrs["out_positions"]) == (256, 64)
    dynamic = om.matmul(rng, "right", x_shape=("batch", "seq", 32))
    assert "out_positions" not in onnx_frontend.lower(dynamic).node("proj").attrs
    fixed = onnx_frontend.lower(dynamic, input_shapes={"x": [2, 10, 32]}).node("proj")
    assert fixed.attrs["out_positions"] == 10


# ------------------------------------------------------------------------------- exact factorization

FULL_RANK_CASES = {
    "gemm": lambda rng: om.mlp(rng),
    "gemm_no_bias": lambda rng: om.mlp(rng, bias_shape="none"),
    "gemm_row_bias_scaled": lambda rng: om.mlp(rng, alpha=0.5, beta=1.5, bias_shape="row"),
    "gemm_transB0": lambda rng: om.mlp(rng, trans_b=0, alpha=2.0, beta=0.25),
    "gemm_transB0_no_bias": lambda rng: om.mlp(rng, trans_b=0, bias_shape="none"),
    "gemm_constants": lambda rng: om.mlp(rng, constants=True),
    "gemm_opset9": lambda rng: om.mlp(rng, opset=9),
    "matmul_right_3d": lambda rng: om.matmul(rng, "right"),
    "matmul_right_2d": lambda rng: om.matmul(rng, "right", x_shape=("batch", 32)),
    "matmul_left_3d": lambda rng: om.matmul(rng, "left", x_shape=("batch", 32, 7)),
    "matmul_left_2d": lambda rng: om.matmul(rng, "left", x_shape=(32, 5)),
    "conv1d": lambda rng: om.conv(rng, ndim=1, spatial=20),
    "conv2d": lambda rng: om.conv(rng),
    "conv3d": lambda rng: om.conv(rng, ndim=3, channels=(6, 8), spatial=6),
    "conv2d_asym_pads_stride": lambda rng: om.conv(rng, pads=[1, 0, 2, 1], strides=2),
    "conv2d_dilated_no_bias": lambda rng: om.conv(rng, dilations=2, pads=[2, 2, 2, 2], bias=False),
    "conv2d_same_upper_stride2": lambda rng: om.conv(rng, auto_pad="SAME_UPPER", strides=2, spatial=11),
    "conv2d_same_lower_even": lambda rng: om.conv(rng, auto_pad="SAME_LOWER", kernel=4, spatial=9),
    "conv2d_valid": lambda rng: om.conv(rng, auto_pad="VALID"),
    "conv2d_1x1": lambda rng: om.conv(rng, kernel=1, pads=[0, 0, 0, 0]),
    "embedding": lambda rng: om.embedding(rng),
}


def _feeds(model) -> dict[str, np.ndarray]:
    """Random feeds with dynamic dims of 3 (batch) and 5 (others)."""
    shapes = {}
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [dim.dim_value if dim.HasField("dim_value") else (3 if axis == 0 else 5)
                              for axis, dim in enumerate(dims)]
    return onnx_backend.random_feeds(model, shapes)


@pytest.mark.parametrize("case", sorted(FULL_RANK_CASES))
def test_full_rank_decomposition_reproduces_outputs(case, rng) -> None:
    model = FULL_RANK_CASES[case](rng)
    graph, chosen, result, written = decompose(model, Policy.config(full_rank_config(onnx_frontend.lower(model))))
    assert chosen.decomposed_entries(), "the model has a layer to decompose"
    report = onnx_backend.validate(model, written, _feeds(model))
    assert report.max_rel < 1e-5, report.table()
    # The decomposed layers are plain ONNX nodes named after their parts, initializers after their params.
    factorized = result.graph.meta["factorized"]
    names = {node.name for node in written.graph.node}
    inits = {init.name for init in written.graph.initializer} | {
        node.output[0] for node in written.graph.node if node.op_type == "Constant"}
    for original, parts in factorized.items():
        assert set(parts) <= names
        assert {f"{part}.weight" for part in parts} <= inits or original == "emb"
    kinds = op_types(written)
    if case.startswith("conv"):
        assert kinds.count("Conv") == 3
    elif case.startswith(("gemm", "matmul")):
        assert kinds.count("Gemm") + kinds.count("MatMul") == 2 * len(factorized) + (
            len(graph.layers()) - len(factorized))
    assert written.metadata_props[-1].key == onnx_backend.METADATA_KEY


def same_outputs(model, other, shapes=None, rtol: float = 0.0) -> None:
    """``model`` and ``other`` give the same outputs in onnxruntime on the same random feeds."""
    feeds = onnx_backend.random_feeds(model, shapes)
    for got, want in zip(om.run(model, feeds), om.run(other, feeds), strict=True):
        np.testing.assert_allclose(got, want, rtol=rtol, atol=0.0)


def test_ir3_models_list_new_initializers_as_inputs(rng) -> None:
    model = om.mlp(rng, opset=9)
    plain = onnx.ModelProto()
    plain.CopyFrom(model)
    for init in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    model.ir_version = 3
    onnx.checker.check_model(model)
    graph = onnx_frontend.lower(model)
    assert [value.name for value in graph.inputs] == ["x"] and "locked" not in graph.node("fc0").attrs
    _, _, _, written = decompose(model, Policy.config({"fc0": 40}))
    inputs = {value.name for value in written.graph.input}
    assert {"fc0.0.weight", "fc0.1.weight", "fc0.1.bias"} <= inputs and "fc0.weight" not in inputs
    same_outputs(written, decompose(plain, Policy.config({"fc0": 40}))[3])  # as without listing them as inputs


def test_low_rank_decomposition_is_checked_and_smaller(rng) -> None:
    model = om.mlp(rng, dims=(96, 128, 64))
    graph, chosen, result, written = decompose(model, Policy.ratio(0.5, divisor=8))
    assert len(chosen.decomposed_entries()) == 2
    onnx.checker.check_model(written, full_check=True)
    onnx.shape_inference.infer_shapes(written, strict_mode=True)
    assert onnx_frontend.count_parameters(written) < onnx_frontend.count_parameters(model)
    report = onnx_backend.validate(model, written)
    assert 0 < report.max_rel < 0.5 and report.outputs[0].name == "y"


# -------------------------------------------------------------------------------------------- locks

def test_layers_whose_weight_is_used_elsewhere_are_locked(rng) -> None:
    weight = om.decaying(rng, (32, 32))
    nodes = [helper.make_node("Gemm", ["x", "w"], ["h"], name="a", transB=1),
             helper.make_node("Gemm", ["h", "w"], ["y"], name="b", transB=1),
             helper.make_node("MatMul", ["x", "v"], ["z"], name="c")]
    model = om.make_model(nodes, [om.tensor("x", [4, 32]), om.tensor("v", [32, 8])],
                          [om.tensor("y", [4, 32]), om.tensor("z", [4, 8]), om.tensor("v", [32, 8])],
                          {"w": weight, "v": om.decaying(rng, (32, 8))})
    graph = onnx_frontend.lower(model)
    assert "also read by Gemm node 'b'" in graph.node("a").attrs["locked"]
    assert "graph input" in graph.node("c").attrs["locked"]
    chosen = plan(graph, Policy.ratio(0.5, divisor=1))
    assert not chosen.decomposed_entries()


def test_weight_that_is_a_graph_output_is_locked(rng) -> None:
    model = om.mlp(rng)
    model.graph.output.append(helper.make_tensor_value_info("fc1.weight", TensorProto.FLOAT, [40, 64]))
    graph = onnx_frontend.lower(model)
    assert "graph output" in graph.node("fc1").attrs["locked"] and "locked" not in graph.node("fc0").attrs


# ---------------------------------------------------------------------------------------- subgraphs

@pytest.mark.parametrize("builder", ["if_model", "loop_model", "scan_model"])
def test_subgraph_ops_round_trip_exactly(builder, rng, tmp_path) -> None:
    model = om.if_model(rng) if builder == "if_model" else getattr(om, builder)()
    graph = onnx_frontend.lower(model)
    assert onnx_backend.build(graph, like=model).SerializeToString() == model.SerializeToString()
    # Saved as an IR graph (subgraphs as bytes) and loaded back, it still writes the same model.
    loaded = load_graph(save_graph(graph, tmp_path / "graph"))
    again = onnx_backend.build(loaded, like=model)
    assert again.SerializeToString() == model.SerializeToString()
    feeds = onnx_backend.random_feeds(model)
    for want, got in zip(om.run(model, feeds), om.run(again, feeds), strict=True):
        np.testing.assert_array_equal(want, got)


def test_decomposing_beside_a_subgraph_keeps_what_the_subgraph_reads(rng) -> None:
    model = om.if_model(rng)
    graph = onnx_frontend.lower(model)
    branch = graph.node("branch")
    assert branch.params == {"outer:shared": "shared"} and isinstance(branch.attrs["then_branch"], bytes)
    _, _, result, written = decompose(model, Policy.config({"fc": 32}))
    assert "shared" in result.graph.params and "fc.weight" not in result.graph.params
    positive = {"x": np.abs(rng.standard_normal((4, 32))).astype(np.float32)}
    for feeds in (positive, {"x": -positive["x"]}):
        assert onnx_backend.validate(model, written, feeds).max_rel < 1e-5


# ------------------------------------------------------------------------------------- unsupported

def test_unsupported_constructs_are_clear_errors(rng) -> None:
    model = om.mlp(rng)
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(np.ones(2, np.float32), "s"),
                                       numpy_helper.from_array(np.array([0, 3], np.int64), "s_idx"), [4])
    model.graph.sparse_initializer.append(sparse)
    with pytest.raises(ValueError, match="unsupported ONNX construct: sparse initializers"):
        onnx_frontend._check_supported(model)
    node = helper.make_node("Custom", ["x"], ["y"], domain="my.domain", name="custom", source_op="clash")
    clash = om.make_model([node], [om.tensor("x", [2])], [om.tensor("y", [2])], check=False)
    clash.opset_import.append(helper.make_opsetid("my.domain", 1))
    with pytest.raises(ValueError, match="reserves for itself"):
        onnx_frontend.lower(clash)


def test_custom_domain_ops_and_attribute_types_round_trip(rng) -> None:
    values = {"f": 0.1, "i": -3, "s": "text", "floats": [0.5, 1.5], "ints": [1, 2], "strings": ["a", "b"],
              "t": numpy_helper.from_array(np.arange(3, dtype=np.float32))}
    node = helper.make_node("Custom", ["x"], ["y"], domain="my.domain", name="custom", doc_string="doc", **values)
    node.attribute.append(onnx.AttributeProto(name="empty_ints", type=onnx.AttributeProto.INTS))
    graph = helper.make_graph([node], "g", [om.tensor("x", [2])], [om.tensor("y", [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.domain", 1)])
    lowered = onnx_frontend.lower(model)
    custom = lowered.node("custom")
    assert custom.attrs["s"] == "text" and custom.attrs["ints"] == (1, 2) and isinstance(custom.attrs["t"], bytes)
    assert custom.attrs["onnx"]["types"]["empty_ints"] == "INTS"
    assert onnx_backend.build(lowered, like=model, check=False).SerializeToString() == model.SerializeToString()


# ------------------------------------------------------------------------------------- data-aware

def _correlated(rng: np.random.Generator, count: int, mixing: np.ndarray) -> dict[str, np.ndarray]:
    latent = rng.standard_normal((count, mixing.shape[0]))
    return {"x": (latent @ mixing + 0.01 * rng.standard_normal((count, mixing.shape[1]))).astype(np.float32)}


def test_data_aware_beats_data_free_on_correlated_feeds(rng) -> None:
    model = om.mlp(rng, dims=(64, 64, 32))
    mixing = rng.standard_normal((6, 64))
    calib, held_out = _correlated(rng, 512, mixing), _correlated(rng, 256, mixing)
    policy = Policy.config({"fc0": 8, "fc1": 8})
    _, _, free_result, free = decompose(model, policy)
    _, _, aware_result, aware = decompose(model, policy, stats_feeds=[calib])
    assert aware_result.errors["fc0"][1] == "output"
    free_error = onnx_backend.validate(model, free, held_out).outputs[0].mean_rel
    aware_error = onnx_backend.validate(model, aware, held_out).outputs[0].mean_rel
    assert aware_error < 0.5 * free_error


def test_collect_stats_moments_and_means(rng) -> None:
    model = om.conv(rng, channels=(8, 12), spatial=5)
    graph = onnx_frontend.lower(model)
    x = rng.standard_normal((3, 8, 5, 5)).astype(np.float32)
    stats = onnx_frontend.collect_stats(model, graph, [{"x": x[:2]}, {"x": x[2:]}])["conv"]
    rows = np.moveaxis(x, 1, -1).reshape(-1, 8).astype(np.float64)
    assert stats.count == 75
    np.testing.assert_allclose(stats.moment, rows.T @ rows / 75, rtol=1e-10)
    np.testing.assert_allclose(stats.mean, rows.mean(axis=0), rtol=1e-10)
    left = om.matmul(rng, "left", x_shape=(2, 32, 7))
    y = rng.standard_normal((2, 32, 7)).astype(np.float32)
    left_stats = onnx_frontend.collect_stats(left, onnx_frontend.lower(left), [{"x": y}])["proj"]
    columns = np.moveaxis(np.maximum(y, 0), -2, -1).reshape(-1, 32).astype(np.float64)  # MatMul(W, relu(x))
    np.testing.assert_allclose(left_stats.moment, columns.T @ columns / 14, rtol=1e-10)


def test_collect_stats_checks_feeds(rng) -> None:
    model = om.mlp(rng)
    graph = onnx_frontend.lower(model)
    with pytest.raises(ValueError, match=r"datasets element 0: input 'x' has dtype float64, the model expects float32"):
        onnx_frontend.collect_stats(model, graph, [{"x": np.zeros((2, 48))}])
    with pytest.raises(ValueError, match=r"dimension 1 must be 48"):
        onnx_frontend.collect_stats(model, graph, [{"x": np.zeros((2, 47), np.float32)}])
    with pytest.raises(ValueError, match=r"missing \['x'\].*unknown \['y'\]"):
        onnx_frontend.collect_stats(model, graph, [{"y": np.zeros((2, 48), np.float32)}])
    with pytest.raises(ValueError, match="datasets is empty"):
        onnx_frontend.collect_stats(model, graph, [])


# ---------------------------------------------------------------------------------------- facade

def test_decompose_facade_takes_a_model_proto(rng) -> None:
    model = om.mlp(rng, dims=(96, 128, 64))
    before = model.SerializeToString()
    decomposer = Decompose(model).from_ratio(0.5, divisor=8)
    assert decomposer.decompose_config == {"fc0": 32, "fc1": 24}
    small = decomposer.decompose_network()
    assert isinstance(small, onnx.ModelProto) and model.SerializeToString() == before
    assert count_parameters(small) < count_parameters(model) == 96 * 128 + 128 + 128 * 64 + 64
    calibration = onnx_backend.random_feeds(model, {"x": [64, 96]})
    aware = Decompose(model).from_ratio(0.5, divisor=8).decompose_network(datasets=[calibration])
    # what the engine gives with the same statistics, and not the data-free model
    same_outputs(aware, decompose(model, Policy.ratio(0.5, divisor=8), stats_feeds=[calibration])[3], rtol=1e-6)
    with pytest.raises(AssertionError):
        same_outputs(aware, small, rtol=1e-3)
    structure = Decompose(model).from_ratio(0.5, divisor=8).decompose_network(do_decompose_weight=False)
    shapes = {init.name: list(init.dims) for init in structure.graph.initializer}
    assert shapes["fc0.0.weight"] == [32, 96] and not numpy_helper.to_array(
        next(init for init in structure.graph.initializer if init.name == "fc0.0.weight")).any()


def test_opset_conversion(rng) -> None:
    model = om.mlp(rng, opset=13)
    converted = onnx_backend.convert_opset(model, 17)
    assert converted.opset_import[0].version == 17 and onnx_backend.convert_opset(model, 13) is model
    _, _, _, written = decompose(converted, Policy.ratio(0.5, divisor=8))
    assert written.opset_import[0].version == 17
    same_outputs(written, decompose(model, Policy.ratio(0.5, divisor=8))[3], rtol=1e-6)  # as at opset 13
    with pytest.raises(ValueError, match="cannot convert the model from opset 17 to opset 13: .*Relu"):
        onnx_backend.convert_opset(converted, 13)
    with pytest.raises(ValueError, match="opset must be an int >= 1"):
        onnx_backend.convert_opset(model, 0)
    with pytest.raises(ValueError, match="newer than this onnx package knows"):
        onnx_backend.convert_opset(model, 999)


def test_layer_names_never_collide_with_the_models_own_names(rng) -> None:
    """A Gemm on 'fc.weight' beside a Gemm on 'fc.0.weight': the first cannot be called 'fc'."""
    nodes = [helper.make_node("Gemm", ["x", "fc.weight"], ["h"], name="first", transB=1),
             helper.make_node("Gemm", ["h", "fc.0.weight"], ["y"], name="second", transB=1)]
    model = om.make_model(nodes, [om.tensor("x", [4, 32])], [om.tensor("y", [4, 24])],
                          {"fc.weight": om.decaying(rng, (32, 32)), "fc.0.weight": om.decaying(rng, (24, 32))})
    graph = onnx_frontend.lower(model)
    assert [node.name for node in graph.layers()] == ["first", "fc.0"]
    _, _, _, written = decompose(model, Policy.config(full_rank_config(graph)))
    assert onnx_backend.validate(model, written).max_rel < 1e-5


def test_the_onnx_modules_import_no_other_framework() -> None:
    import subprocess
    import sys

    code = ("import sys, frontends.onnx, backends.onnx\n"
            "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'mindspore'))))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_sequential_data_aware_decomposition(rng) -> None:
    """The facade's sequential mode: each layer refined on the model whose earlier layers are decomposed."""
    model = om.mlp(rng, dims=(64, 64, 48, 32))
    mixing = rng.standard_normal((6, 64))
    calib = [_correlated(rng, 256, mixing) for _ in range(2)]
    held_out = _correlated(rng, 256, mixing)
    graph = onnx_frontend.lower(model)
    assert onnx_frontend.execution_groups(model, graph, calib, ["fc2", "fc0", "fc1"]) == [["fc0"], ["fc1"], ["fc2"]]
    errors = {}
    for sequential in (False, True):
        decomposer = Decompose(model).from_fixed(8, divisor=1)
        small = decomposer.decompose_network(datasets=calib, sequential=sequential)
        errors[sequential] = onnx_backend.validate(model, small, held_out).outputs[0].mean_rel
        assert {layer.error_kind for layer in decomposer.report if layer.form} == {"output"}
    assert errors[True] <= errors[False] * 1.05
    with pytest.raises(ValueError, match="was not factorized"):
        onnx_backend.load_layers(model, graph, ["fc0"])


def test_output_errors_and_measured_budget(rng) -> None:
    model = om.mlp(rng, dims=(64, 64, 32))
    before = model.SerializeToString()
    mixing = rng.standard_normal((6, 64))
    feeds = [_correlated(rng, 64, mixing) for _ in range(2)]
    graph = onnx_frontend.lower(model)
    weight = graph.param(graph.node("fc1"), "weight")
    name = graph.node("fc1").params["weight"]
    errors = onnx_frontend.output_errors(model, feeds, [{}, {name: np.zeros_like(weight)}, {name: 0.5 * weight}])
    assert errors[0] == 0.0 and errors[1] > errors[2] > 0.0
    assert model.SerializeToString() == before
    with pytest.raises(ValueError, match="no initializer or constant named 'nope'"):
        onnx_frontend.output_errors(model, feeds, [{"nope": np.zeros(2)}])
    decomposer = Decompose(model).from_budget(params=0.5, datasets=feeds)
    assert set(decomposer.sensitivities) == {"fc0", "fc1"}
    assert all(value > 0 for value in decomposer.sensitivities.values())
    assert model.SerializeToString() == before


def test_flops_budget_counts_each_layer_at_its_resolution(rng) -> None:
    """Two 1x1 convs of the same shape, one at 16x16 and one (after a stride-4 conv) at 4x4: per sample,
    the first costs 16x the FLOPs, so a FLOP budget must cut it harder; the budget is met per sample."""
    weights = {name: om.decaying(rng, (32, 32, 1, 1)) for name in ("big.weight", "small.weight")}
    weights["down.weight"] = om.decaying(rng, (32, 32, 4, 4))
    nodes = [helper.make_node("Conv", ["x", "big.weight"], ["a"], name="big"),
             helper.make_node("Relu", ["a"], ["b"], name="relu"),
             helper.make_node("Conv", ["b", "down.weight"], ["c"], name="down", strides=[4, 4]),
             helper.make_node("Conv", ["c", "small.weight"], ["y"], name="small")]
    model = om.make_model(nodes, [om.tensor("x", [1, 32, 16, 16])], [om.tensor("y", [1, 32, 4, 4])], weights)
    decomposer = Decompose(model).from_budget(flops=0.5, divisor=1, excludes=["down"])
    report = {layer.name: layer for layer in decomposer.report}
    assert sum(report[name].flops_after for name in ("big", "small")) <= 0.5 * sum(
        report[name].flops_before for name in ("big", "small"))
    assert report["big"].rank is not None
    assert report["small"].rank is None or report["small"].rank > report["big"].rank
