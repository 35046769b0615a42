"""The one ONNX interpreter (``backends/_onnx_interpreter.py``), run by PyTorch and by MindSpore.

Every one-op case of ``rebuild_cases`` runs in both frameworks through the same op table and must
agree with onnxruntime (dtype equal, ``relative_error`` within ``TOLERANCE``); both containers take
inputs by name, raise the same errors, and free values no later node reads; old-opset attribute forms
are resolved when the program is built; no ONNX op is named in the framework modules.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("GLOG_v", "3")  # MindSpore's C++ logs: errors only

import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from backends import _onnx_interpreter as interpreter  # noqa: E402
from frontends import onnx as onnx_frontend  # noqa: E402
from lowrank_ir import Graph  # noqa: E402
from tests.rebuild_cases import CASES, REQUIRED_OPS, TOLERANCE, relative_error  # noqa: E402

FRAMEWORKS = [pytest.param("torch", marks=pytest.mark.torch), pytest.param("mindspore", marks=pytest.mark.mindspore)]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Any:
    """One torch intra-op thread while this module runs (the machine's cores are shared)."""
    try:
        import torch
    except ImportError:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rebuilt(framework: str, graph: Graph) -> Any:
    if framework == "torch":
        pytest.importorskip("torch")
        from backends.torch import from_dataflow as rebuild
    else:
        pytest.importorskip("mindspore")
        from backends.mindspore import from_dataflow as rebuild
    return rebuild(graph)


def run(framework: str, model: Any, feeds: dict[str, Any], *positional: Any) -> list[np.ndarray]:
    """``model`` run on ``positional`` and ``feeds`` (by name), its outputs as numpy."""
    if framework == "torch":
        import torch

        def convert(value: Any) -> Any:
            return torch.from_numpy(np.asarray(value))

        with torch.no_grad():
            result = model(*map(convert, positional), **{name: convert(v) for name, v in feeds.items()})
    else:
        import mindspore as ms

        def convert(value: Any) -> Any:
            return ms.Tensor(np.asarray(value))

        result = model(*map(convert, positional), **{name: convert(v) for name, v in feeds.items()})
    outputs = result if isinstance(result, tuple) else (result,)
    return [output.numpy() if framework == "torch" else output.asnumpy() for output in outputs]


def test_the_cases_cover_every_op_of_the_interpreter() -> None:
    covered = {op for item in CASES for op in item.ops}
    assert REQUIRED_OPS <= covered, sorted(REQUIRED_OPS - covered)
    assert covered == set(interpreter.OPS), (sorted(covered - set(interpreter.OPS)),
                                             sorted(set(interpreter.OPS) - covered))
    names = [item.name for item in CASES]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("case", CASES, ids=[item.name for item in CASES])
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_case_agrees_with_onnxruntime(framework: str, case: Any) -> None:
    from tests.rebuild_cases import reference

    got = run(framework, rebuilt(framework, onnx_frontend.lower(case.model)), case.feeds)
    expected = reference(case)
    assert len(got) == len(expected)
    for value, want in zip(got, expected, strict=True):
        assert value.dtype == want.dtype, (value.dtype, want.dtype)
        assert relative_error(value, want) <= TOLERANCE, relative_error(value, want)


# ---------------------------------------------------------------------------------------- containers

def _two_input_graph(opset: int = 13) -> Graph:
    nodes = [helper.make_node("Sub", ["a", "b"], ["d"], name="sub"),
             helper.make_node("Relu", ["d"], ["r"], name="relu"),
             helper.make_node("Reshape", ["r", "shape"], ["y"], name="to_rows_of_three")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 8]),
                                           helper.make_tensor_value_info("b", TensorProto.FLOAT, ["n", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", 3])],
                              [numpy_helper.from_array(np.array([-1, 3], np.int64), "shape")])
    return onnx_frontend.lower(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_inputs_by_name_and_by_position_agree(framework: str) -> None:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((3, 8)).astype(np.float32), rng.standard_normal((3, 8)).astype(np.float32)
    model = rebuilt(framework, _two_input_graph())
    expected = np.maximum(a - b, 0).reshape(-1, 3)
    for got in (run(framework, model, {}, a, b), run(framework, model, {"b": b, "a": a}),
                run(framework, model, {"b": b}, a)):
        np.testing.assert_array_equal(got[0], expected)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_bad_inputs_are_the_same_error_in_every_framework(framework: str) -> None:
    model = rebuilt(framework, _two_input_graph())
    a = np.zeros((3, 8), np.float32)
    cases = [((a,), {"c": a}, r"unknown input 'c'; the graph takes \['a', 'b'\]"),
             ((a,), {"a": a}, r"input 'a' given twice"),
             ((a,), {}, r"missing inputs \['b'\]"),
             ((a, a, a), {}, r"the graph takes 2 inputs \['a', 'b'\], 3 were given"),
             ((a, a[0]), {}, r"input 'b' has shape \[8\] \(1 dimensions\), the graph expects 2 dimensions \[n, 8\]"),
             ((a, np.zeros((3, 7), np.float32)), {}, r"the graph expects \[n, 8\] \(dimension 1 must be 8\)"),
             ((a, np.zeros((3, 8), np.int64)), {}, r"input 'b' has dtype int64, the graph expects float32")]
    for positional, named, message in cases:
        with pytest.raises(interpreter.InputError, match=message) as caught:
            run(framework, model, named, *positional)
        assert isinstance(caught.value, TypeError) and isinstance(caught.value, ValueError)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_a_failing_node_is_one_error_naming_it(framework: str) -> None:
    model = rebuilt(framework, _two_input_graph())
    odd = np.zeros((1, 8), np.float32)  # 8 values do not make rows of three
    with pytest.raises(interpreter.NodeError, match=r"while running node 'to_rows_of_three' \(Reshape\): .*invalid") \
            as caught:
        run(framework, model, {}, odd, odd)
    assert isinstance(caught.value, RuntimeError) and caught.value.__cause__ is not None


# ------------------------------------------------------------------------------------ the program

def test_dead_values_are_freed_after_their_last_reader() -> None:
    program = interpreter.program(_two_input_graph(), "a test")
    assert [step.name for step in program.steps] == ["sub", "relu", "to_rows_of_three"]
    assert [sorted(step.free) for step in program.steps] == [["a", "b"], ["d"], ["r"]]


def test_old_opset_attribute_forms_become_inputs_at_build_time() -> None:
    nodes = [helper.make_node("Squeeze", ["x"], ["s"], name="squeeze", axes=[1]),
             helper.make_node("Slice", ["s"], ["y"], name="slice", starts=[1], ends=[3], axes=[0])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    program = interpreter.program(onnx_frontend.lower(helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 9)])), "a test")
    squeeze, slice_ = program.steps
    assert "axes" not in squeeze.attrs and squeeze.args[1][0] == "const"
    np.testing.assert_array_equal(squeeze.args[1][1], [1])
    assert not {"starts", "ends", "axes"} & set(slice_.attrs)
    assert [arg[1].tolist() for arg in slice_.args[1:]] == [[1], [3], [0]]


def test_no_onnx_op_is_named_in_a_framework_module() -> None:
    """The frameworks supply primitives only: no ONNX op type appears as a string in their modules."""
    root = Path(__file__).resolve().parents[1] / "backends"
    for module in ("_torch_graph.py", "_mindspore_graph.py"):
        tree = ast.parse((root / module).read_text())
        strings = {node.value for node in ast.walk(tree)
                   if isinstance(node, ast.Constant) and isinstance(node.value, str)}
        assert not strings & set(interpreter.OPS), (module, sorted(strings & set(interpreter.OPS)))
