"""Small one-op ONNX models for the whole-model rebuilders (PyTorch, MindSpore), with seeded feeds.

Each :class:`Case` is a checked ``onnx.ModelProto`` exercising one ONNX operator in one attribute or
input form, at the opsets the exporters we meet emit: torch's dynamo exporter (opset 18+), MindSpore's
(opset 11-ish) and the PP-OCR models (opsets 11 and 12). Constants are initializers (``Constant``
nodes where the form matters), so a case also checks how a builder tells weights from shapes.

API (read by ``tests/test_graph_interpreter.py``, which runs every case in PyTorch and in MindSpore
through the one ONNX interpreter, and by the two frameworks' rebuild tests):

- ``CASES``: list of :class:`Case` (``.name``, ``.model``, ``.feeds`` name -> ``np.ndarray``, ``.ops``);
  ``cases_for(ops)`` the cases using only ``ops``; ``REQUIRED_OPS`` the ops issue 7 asks for;
- :func:`reference` runs a case in onnxruntime; :func:`relative_error` is the agreement measure,
  ``max |got - ref| / max |ref|`` (exact equality for integer and boolean outputs), and
  ``TOLERANCE`` the bound every rebuilt case must meet.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["CASES", "REQUIRED_OPS", "TOLERANCE", "Case", "cases_for", "reference", "relative_error"]

#: Relative error (max |d| / max |ref|) a rebuilt model may have against onnxruntime.
TOLERANCE = 1e-4

#: The ONNX ops issue 7 asks every rebuilder to cover (the cases cover more).
REQUIRED_OPS = frozenset({
    "Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Exp", "Erf", "Relu",
    "LeakyRelu", "Sigmoid", "Tanh", "Gelu", "HardSigmoid", "HardSwish", "Clip", "Softmax", "LayerNormalization",
    "BatchNormalization", "MaxPool", "AveragePool", "GlobalAveragePool", "Flatten", "Reshape", "Transpose", "Concat",
    "Split", "Slice", "Gather", "Unsqueeze", "Squeeze", "Shape", "Constant", "ConstantOfShape", "ReduceMean", "Cast",
    "Where", "Expand", "Pad", "Resize", "Identity", "Dropout",
})

INT64_MAX = np.iinfo(np.int64).max
INT64_MIN = np.iinfo(np.int64).min

FLOAT, INT64, BOOL = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL


@dataclass(frozen=True)
class Case:
    """One checked model, its feeds, and the ONNX ops it exercises."""

    name: str
    model: onnx.ModelProto
    feeds: dict[str, np.ndarray]
    ops: tuple[str, ...] = field(default=())

    def __repr__(self) -> str:
        return f"Case({self.name!r})"


def _rng(name: str) -> np.random.Generator:
    """A generator seeded from the case name: adding a case never changes another's data."""
    return np.random.default_rng(zlib.crc32(name.encode()))


def _elem(array: np.ndarray) -> int:
    return helper.np_dtype_to_tensor_dtype(array.dtype)


def _model(nodes: list[onnx.NodeProto], feeds: dict[str, np.ndarray], outputs: Sequence[tuple[str, int]],
           inits: dict[str, np.ndarray] | None = None, opset: int = 18) -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info(name, _elem(array), list(array.shape)) for name, array in feeds.items()]
    outs = [helper.make_tensor_value_info(name, elem, None) for name, elem in outputs]
    initializer = [numpy_helper.from_array(np.asarray(array), name) for name, array in (inits or {}).items()]
    graph = helper.make_graph(nodes, "case", inputs, outs, initializer)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="rebuild-cases")
    model.ir_version = min(model.ir_version, 10)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)  # output shapes
    del model.graph.output[:]
    model.graph.output.extend(inferred.graph.output)
    unknown = [value for value in model.graph.output if not value.type.tensor_type.HasField("shape")]
    if unknown:  # shapes computed from data (Reshape by a computed shape...): take them from a run
        results = dict(zip([value.name for value in model.graph.output], _run(model, feeds), strict=True))
        for value in unknown:
            for dim in results[value.name].shape:
                value.type.tensor_type.shape.dim.add().dim_value = dim
    onnx.checker.check_model(model, full_check=True)
    return model


def _session(model: onnx.ModelProto) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return [np.asarray(value) for value in _session(model).run(None, feeds)]


CASES: list[Case] = []


def case(name: str, ops: Sequence[str] | str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register the builder ``function(rng) -> (nodes, feeds, outputs, inits, opset)`` as a case."""

    def register(function: Callable[..., Any]) -> Callable[..., Any]:
        nodes, feeds, outputs, inits, opset = function(_rng(name))
        listed = (ops,) if isinstance(ops, str) else tuple(ops or sorted({node.op_type for node in nodes}))
        CASES.append(Case(name, _model(nodes, feeds, outputs, inits, opset), feeds, listed))
        return function

    return register


def node(op: str, inputs: Sequence[str], outputs: Sequence[str], **attrs: Any) -> onnx.NodeProto:
    return helper.make_node(op, list(inputs), list(outputs), name=f"{op.lower()}_{outputs[0]}", **attrs)


def normal(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def const(name: str, array: np.ndarray) -> onnx.NodeProto:
    """A ``Constant`` node (how PP-OCR keeps its weights) holding ``array``."""
    return helper.make_node("Constant", [], [name], name=f"const_{name}", value=numpy_helper.from_array(array))


def i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


# ----------------------------------------------------------------------------------------- layers

def _conv(rng: np.random.Generator, ndim: int = 2, cin: int = 4, cout: int = 6, kernel: int = 3, group: int = 1,
          spatial: int = 9, bias: bool = True, runtime_weight: bool = False, opset: int = 18, **attrs: Any):
    x = normal(rng, 2, cin, *(spatial,) * ndim)
    w = normal(rng, cout, cin // group, *(kernel,) * ndim) * 0.3
    b = normal(rng, cout)
    feeds, inits = {"x": x}, {}
    (feeds if runtime_weight else inits)["w"] = w
    inputs = ["x", "w"]
    if bias:
        inits["b"] = b
        inputs.append("b")
    return [node("Conv", inputs, ["y"], group=group, **attrs)], feeds, [("y", FLOAT)], inits, opset


case("Conv 2-D symmetric pads")(lambda rng: _conv(rng, pads=[1, 1, 1, 1], strides=[2, 2]))
case("Conv 2-D asymmetric pads")(lambda rng: _conv(rng, pads=[0, 1, 2, 1], bias=False))
case("Conv 2-D SAME_UPPER stride 2")(lambda rng: _conv(rng, auto_pad="SAME_UPPER", strides=[2, 2], spatial=8))
case("Conv 2-D SAME_LOWER")(lambda rng: _conv(rng, auto_pad="SAME_LOWER", kernel=2, spatial=7))
case("Conv 2-D VALID dilated")(lambda rng: _conv(rng, auto_pad="VALID", dilations=[2, 2]))
case("Conv 2-D depthwise")(lambda rng: _conv(rng, cin=6, cout=6, group=6, pads=[1, 1, 1, 1], opset=11))
case("Conv 2-D grouped 1x3")(lambda rng: _conv(rng, cin=4, cout=8, group=2, kernel=1, pads=[0, 0, 0, 0], opset=12))
case("Conv 1-D")(lambda rng: _conv(rng, ndim=1, pads=[2, 1], strides=[2], spatial=11))
case("Conv 3-D")(lambda rng: _conv(rng, ndim=3, cin=2, cout=3, spatial=5, pads=[1, 0, 1, 1, 0, 1]))
case("Conv runtime weight")(lambda rng: _conv(rng, runtime_weight=True, pads=[1, 1, 1, 1], group=2))
case("Conv runtime weight SAME_UPPER")(lambda rng: _conv(rng, runtime_weight=True, auto_pad="SAME_UPPER",
                                                         strides=[2, 2], spatial=8, bias=False))


def _conv_transpose(rng: np.random.Generator, ndim: int = 2, cin: int = 4, cout: int = 6, kernel: int = 3,
                    group: int = 1, spatial: int = 5, opset: int = 11, **attrs: Any):
    x = normal(rng, 2, cin, *(spatial,) * ndim)
    inits = {"w": normal(rng, cin, cout // group, *(kernel,) * ndim) * 0.3, "b": normal(rng, cout)}
    return ([node("ConvTranspose", ["x", "w", "b"], ["y"], group=group, **attrs)], {"x": x}, [("y", FLOAT)],
            inits, opset)


case("ConvTranspose stride 2 (PP-OCR)")(lambda rng: _conv_transpose(rng, kernel=2, strides=[2, 2],
                                                                    pads=[0, 0, 0, 0], opset=11))
case("ConvTranspose pads output_padding")(lambda rng: _conv_transpose(rng, strides=[2, 2], pads=[1, 0, 1, 2],
                                                                      output_padding=[1, 0]))
case("ConvTranspose grouped dilated")(lambda rng: _conv_transpose(rng, cin=4, cout=6, group=2, dilations=[2, 1],
                                                                  pads=[1, 1, 1, 1], opset=18))
case("ConvTranspose 1-D")(lambda rng: _conv_transpose(rng, ndim=1, strides=[3], pads=[1, 2]))
case("ConvTranspose SAME_UPPER")(lambda rng: _conv_transpose(rng, strides=[2, 2], auto_pad="SAME_UPPER"))
case("ConvTranspose output_shape")(lambda rng: _conv_transpose(rng, strides=[2, 2], output_shape=[10, 11]))


@case("Gemm Linear alpha beta")
def _gemm_linear(rng):
    inits = {"fc.weight": normal(rng, 6, 5), "fc.bias": normal(rng, 6)}
    return ([node("Gemm", ["x", "fc.weight", "fc.bias"], ["y"], transB=1, alpha=0.5, beta=2.0)],
            {"x": normal(rng, 3, 5)}, [("y", FLOAT)], inits, 13)


@case("Gemm MatMul bias row")
def _gemm_matmul(rng):
    inits = {"w": normal(rng, 5, 6), "c": normal(rng, 1, 6)}
    return ([node("Gemm", ["x", "w", "c"], ["y"], alpha=1.5)], {"x": normal(rng, 3, 5)}, [("y", FLOAT)], inits, 11)


@case("Gemm runtime transA scalar C")
def _gemm_runtime(rng):
    feeds = {"a": normal(rng, 5, 3), "b": normal(rng, 6, 5)}
    return ([node("Gemm", ["a", "b", "c"], ["y"], transA=1, transB=1, alpha=0.7, beta=0.3)], feeds,
            [("y", FLOAT)], {"c": np.array(1.25, np.float32)}, 13)


@case("Gemm runtime no C")
def _gemm_no_c(rng):
    feeds = {"a": normal(rng, 3, 5), "b": normal(rng, 5, 4)}
    return [node("Gemm", ["a", "b"], ["y"])], feeds, [("y", FLOAT)], {}, 11


@case("MatMul weight right 3-D")
def _matmul_right(rng):
    return ([node("MatMul", ["x", "w"], ["y"])], {"x": normal(rng, 2, 3, 5)}, [("y", FLOAT)],
            {"w": normal(rng, 5, 4)}, 18)


@case("MatMul weight left")
def _matmul_left(rng):
    return ([node("MatMul", ["w", "x"], ["y"])], {"x": normal(rng, 2, 5, 3)}, [("y", FLOAT)],
            {"w": normal(rng, 4, 5)}, 13)


@case("MatMul runtime batched broadcast")
def _matmul_runtime(rng):
    feeds = {"a": normal(rng, 2, 1, 3, 5), "b": normal(rng, 4, 5, 2)}
    return [node("MatMul", ["a", "b"], ["y"])], feeds, [("y", FLOAT)], {}, 13


@case("MatMul runtime 1-D")
def _matmul_vector(rng):
    feeds = {"a": normal(rng, 5), "b": normal(rng, 2, 5, 3)}
    return [node("MatMul", ["a", "b"], ["y"])], feeds, [("y", FLOAT)], {}, 13


@case("Gather Embedding negative ids", ("Gather",))
def _embedding(rng):
    ids = rng.integers(-10, 10, (2, 5)).astype(np.int64)
    return ([node("Gather", ["table", "ids"], ["y"], axis=0)], {"ids": ids}, [("y", FLOAT)],
            {"table": normal(rng, 10, 4)}, 13)


# ---------------------------------------------------------------------------------- elementwise

def _binary(op: str, a_shape: Sequence[int], b_shape: Sequence[int], opset: int = 13, dtype: str = "float32",
            const_b: bool = False, positive: bool = False, out: int | None = None):
    def build(rng):
        if dtype == "float32":
            a, b = normal(rng, *a_shape), normal(rng, *b_shape)
            if positive:
                a = np.abs(a) + 0.5
        else:
            a = rng.integers(-20, 20, a_shape).astype(dtype)
            b = rng.integers(1, 7, b_shape).astype(dtype) * rng.choice([-1, 1], b_shape).astype(dtype)
        feeds, inits = {"a": a}, {}
        (inits if const_b else feeds)["b"] = b
        elem = FLOAT if dtype == "float32" else helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        elem = elem if out is None else out
        return [node(op, ["a", "b"], ["y"])], feeds, [("y", elem)], inits, opset
    return build


case("Add broadcast")(_binary("Add", (2, 3, 4), (3, 1)))
case("Add bias constant")(_binary("Add", (2, 3, 4), (4,), const_b=True))
case("Sub broadcast")(_binary("Sub", (3, 1), (2, 1, 4), opset=7))
case("Mul scalar constant")(_binary("Mul", (2, 3), (), const_b=True))
case("Div broadcast")(_binary("Div", (2, 3, 4), (4,), opset=7, positive=True))
case("Div int64 truncates")(_binary("Div", (3, 4), (3, 4), dtype="int64"))
case("Div int32 truncates")(_binary("Div", (6,), (6,), dtype="int32"))
case("Pow float")(_binary("Pow", (2, 3), (3,), positive=True, opset=12))
case("Min broadcast")(_binary("Min", (2, 3), (3,)))
case("Max broadcast")(_binary("Max", (2, 3), (2, 1)))
case("Mod int fmod 0")(_binary("Mod", (3, 4), (3, 4), dtype="int64"))
case("Equal int")(_binary("Equal", (3, 4), (4,), dtype="int64", out=BOOL))


@case("Pow int exponent")
def _pow_int(rng):
    return ([node("Pow", ["a", "e"], ["y"])], {"a": normal(rng, 2, 3)}, [("y", FLOAT)],
            {"e": np.array(2, np.int64)}, 15)


@case("Mod fmod 1 float")
def _fmod(rng):
    feeds = {"a": normal(rng, 2, 3) * 5, "b": np.abs(normal(rng, 3)) + 0.5}
    return [node("Mod", ["a", "b"], ["y"], fmod=1)], feeds, [("y", FLOAT)], {}, 13


@case("Less Greater Not And Or Xor Where")
def _logic(rng):
    feeds = {"a": normal(rng, 3, 4), "b": normal(rng, 4)}
    nodes = [node("Less", ["a", "b"], ["lt"]), node("Greater", ["a", "zero"], ["gt"]),
             node("LessOrEqual", ["a", "b"], ["le"]), node("GreaterOrEqual", ["a", "b"], ["ge"]),
             node("Not", ["lt"], ["nlt"]), node("And", ["nlt", "gt"], ["both"]), node("Or", ["le", "gt"], ["either"]),
             node("Xor", ["ge", "either"], ["one"]), node("Where", ["both", "a", "b"], ["y"]),
             node("Cast", ["one"], ["one_f"], to=FLOAT), node("Where", ["either", "one_f", "a"], ["z"])]
    return nodes, feeds, [("y", FLOAT), ("z", FLOAT), ("both", BOOL)], {"zero": np.zeros((), np.float32)}, 16


@case("Sum Mean variadic")
def _variadic(rng):
    feeds = {"a": normal(rng, 2, 3), "b": normal(rng, 3), "c": normal(rng, 2, 1)}
    nodes = [node("Sum", ["a", "b", "c"], ["s"]), node("Mean", ["a", "b", "c"], ["m"]),
             node("Max", ["a", "b", "c"], ["mx"]), node("Min", ["a"], ["mn"])]
    return nodes, feeds, [("s", FLOAT), ("m", FLOAT), ("mx", FLOAT), ("mn", FLOAT)], {}, 13


def _unary(op: str, opset: int = 13, positive: bool = False, scale: float = 1.0, **attrs: Any):
    def build(rng):
        x = normal(rng, 2, 3, 4) * scale
        if positive:
            x = np.abs(x) + 0.1
        return [node(op, ["x"], ["y"], **attrs)], {"x": x}, [("y", FLOAT)], {}, opset
    return build


for _op, _kwargs in [
    ("Sqrt", {"positive": True}), ("Exp", {}), ("Log", {"positive": True}), ("Erf", {}), ("Relu", {"opset": 14}),
    ("Sigmoid", {}), ("Tanh", {}), ("Neg", {}), ("Abs", {}), ("Reciprocal", {"positive": True}),
    ("Floor", {"scale": 3.0}), ("Ceil", {"scale": 3.0}), ("Round", {"scale": 3.0, "opset": 11}), ("Sign", {}),
    ("Sin", {}), ("Cos", {}), ("Softplus", {}), ("Softsign", {}), ("HardSwish", {"opset": 14, "scale": 4.0}),
    ("Identity", {"opset": 16}), ("Mish", {"opset": 18}),
]:
    case(_op)(_unary(_op, **_kwargs))
case("Tan")(_unary("Tan", scale=0.5))
for _op in ("Atan", "Sinh", "Cosh"):
    case(_op)(_unary(_op, scale=0.5))
case("Celu")(_unary("Celu", opset=12, alpha=0.7))


@case("Asin Acos")
def _asin(rng):
    x = np.clip(normal(rng, 2, 3) * 0.4, -0.95, 0.95)
    return [node("Asin", ["x"], ["a"]), node("Acos", ["x"], ["b"])], {"x": x}, [("a", FLOAT), ("b", FLOAT)], {}, 7


@case("Asinh Acosh Atanh")
def _inverse_hyperbolic(rng):
    feeds = {"x": normal(rng, 2, 3) * 2, "c": np.abs(normal(rng, 2, 3)) + 1.0,
             "t": np.clip(normal(rng, 2, 3) * 0.4, -0.95, 0.95)}
    nodes = [node("Asinh", ["x"], ["a"]), node("Acosh", ["c"], ["b"]), node("Atanh", ["t"], ["h"])]
    return nodes, feeds, [("a", FLOAT), ("b", FLOAT), ("h", FLOAT)], {}, 9


@case("BitShift left right")
def _bit_shift(rng):
    feeds = {"a": rng.integers(0, 16, (3, 4)).astype(np.uint8), "s": rng.integers(0, 4, (4,)).astype(np.uint8)}
    nodes = [node("BitShift", ["a", "s"], ["l"], direction="LEFT"),
             node("BitShift", ["a", "s"], ["r"], direction="RIGHT")]
    return nodes, feeds, [("l", TensorProto.UINT8), ("r", TensorProto.UINT8)], {}, 11


@case("Shrink")
def _shrink(rng):
    return [node("Shrink", ["x"], ["y"], lambd=0.3, bias=0.1)], {"x": normal(rng, 2, 3, 4)}, [("y", FLOAT)], {}, 9


@case("Bitwise ops")
def _bitwise(rng):
    feeds = {"a": rng.integers(-50, 50, (3, 4)).astype(np.int32), "b": rng.integers(-50, 50, (4,)).astype(np.int32)}
    nodes = [node("BitwiseAnd", ["a", "b"], ["x"]), node("BitwiseOr", ["a", "b"], ["o"]),
             node("BitwiseXor", ["a", "b"], ["r"]), node("BitwiseNot", ["a"], ["n"])]
    int32 = TensorProto.INT32
    return nodes, feeds, [("x", int32), ("o", int32), ("r", int32), ("n", int32)], {}, 18


@case("CastLike")
def _cast_like(rng):
    return ([node("CastLike", ["x", "like"], ["y"])], {"x": normal(rng, 2, 3) * 4}, [("y", INT64)],
            {"like": i64(0)}, 15)


case("LeakyRelu")(_unary("LeakyRelu", alpha=0.1, opset=6))
case("LeakyRelu default alpha")(_unary("LeakyRelu", opset=16))
case("Elu")(_unary("Elu", alpha=0.8, opset=6))
case("Selu")(_unary("Selu", opset=6))
case("HardSigmoid PP-OCR")(_unary("HardSigmoid", alpha=0.1666667, beta=0.5, opset=6, scale=4.0))
case("HardSigmoid default")(_unary("HardSigmoid", opset=6, scale=4.0))
case("Gelu exact")(_unary("Gelu", opset=20))
case("Gelu tanh")(_unary("Gelu", opset=20, approximate="tanh"))
case("Clip attrs opset 6")(_unary("Clip", opset=6, min=-0.5, max=0.7))
case("ThresholdedRelu")(_unary("ThresholdedRelu", opset=10, alpha=0.3))


@case("Clip inputs (PP-OCR)")
def _clip_inputs(rng):
    return ([node("Clip", ["x", "lo", "hi"], ["y"])], {"x": normal(rng, 2, 3, 4) * 4}, [("y", FLOAT)],
            {"lo": np.array(0.0, np.float32), "hi": np.array(6.0, np.float32)}, 11)


@case("Clip max only")
def _clip_max(rng):
    return ([node("Clip", ["x", "", "hi"], ["y"])], {"x": normal(rng, 2, 3)}, [("y", FLOAT)],
            {"hi": np.array(0.25, np.float32)}, 13)


@case("Clip no bounds int")
def _clip_int(rng):
    x = rng.integers(-9, 9, (3, 4)).astype(np.int64)
    return ([node("Clip", ["x", "lo"], ["y"])], {"x": x}, [("y", INT64)], {"lo": np.array(-2, np.int64)}, 13)


@case("PRelu per channel")
def _prelu(rng):
    return ([node("PRelu", ["x", "slope"], ["y"])], {"x": normal(rng, 2, 3, 4, 4)}, [("y", FLOAT)],
            {"slope": np.abs(normal(rng, 3, 1, 1))}, 16)


@case("IsNaN IsInf")
def _isnan(rng):
    x = normal(rng, 3, 4)
    x[0, 1], x[1, 2], x[2, 0] = np.nan, np.inf, -np.inf
    nodes = [node("IsNaN", ["x"], ["nan"]), node("IsInf", ["x"], ["inf"])]
    return nodes, {"x": x}, [("nan", BOOL), ("inf", BOOL)], {}, 20


# ------------------------------------------------------------------------------ normalisations

def _softmax(op: str, opset: int, axis: int | None, shape: Sequence[int] = (2, 3, 4, 5)):
    def build(rng):
        attrs = {} if axis is None else {"axis": axis}
        return [node(op, ["x"], ["y"], **attrs)], {"x": normal(rng, *shape) * 3}, [("y", FLOAT)], {}, opset
    return build


case("Softmax opset 11 axis 1 coerced 2-D")(_softmax("Softmax", 11, 1))
case("Softmax opset 11 default axis")(_softmax("Softmax", 11, None))
case("Softmax opset 12 axis 2 (PP-OCR)")(_softmax("Softmax", 12, 2))
case("Softmax opset 13 axis 1")(_softmax("Softmax", 13, 1))
case("Softmax opset 13 default axis")(_softmax("Softmax", 13, None))
case("LogSoftmax opset 11 axis -2")(_softmax("LogSoftmax", 11, -2))
case("LogSoftmax opset 13")(_softmax("LogSoftmax", 13, 2))

case("Hardmax opset 11 coerced 2-D")(_softmax("Hardmax", 11, 1))
case("Hardmax opset 13 axis 1")(_softmax("Hardmax", 13, 1))


@case("LRN across channels")
def _lrn(rng):
    return ([node("LRN", ["x"], ["y"], size=3, alpha=0.001, beta=0.75, bias=2.0)], {"x": normal(rng, 2, 5, 4, 4)},
            [("y", FLOAT)], {}, 13)


@case("LayerNormalization last axis")
def _layer_norm(rng):
    inits = {"scale": normal(rng, 8), "bias": normal(rng, 8)}
    return ([node("LayerNormalization", ["x", "scale", "bias"], ["y"], epsilon=1e-12)], {"x": normal(rng, 2, 3, 8)},
            [("y", FLOAT)], inits, 17)


@case("LayerNormalization axis 1 no bias")
def _layer_norm_axis(rng):
    return ([node("LayerNormalization", ["x", "scale"], ["y"], axis=1)], {"x": normal(rng, 2, 3, 4)},
            [("y", FLOAT)], {"scale": normal(rng, 3, 4)}, 18)


def _batch_norm(opset: int, constants: bool = False):
    def build(rng):
        arrays = {"scale": normal(rng, 3), "bias": normal(rng, 3), "mean": normal(rng, 3),
                  "var": np.abs(normal(rng, 3)) + 0.2}
        nodes = [const(key, value) for key, value in arrays.items()] if constants else []
        nodes.append(node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["y"], epsilon=1e-5))
        return nodes, {"x": normal(rng, 2, 3, 4, 5)}, [("y", FLOAT)], {} if constants else arrays, opset
    return build


case("BatchNormalization opset 9 Constant nodes (PP-OCR)")(_batch_norm(9, constants=True))
case("BatchNormalization opset 15")(_batch_norm(15))


@case("InstanceNormalization")
def _instance_norm(rng):
    return ([node("InstanceNormalization", ["x", "s", "b"], ["y"], epsilon=1e-5)], {"x": normal(rng, 2, 3, 4, 5)},
            [("y", FLOAT)], {"s": normal(rng, 3), "b": normal(rng, 3)}, 6)


# ------------------------------------------------------------------------------------- pooling

def _pool(op: str, opset: int = 12, ndim: int = 2, spatial: int = 9, **attrs: Any):
    def build(rng):
        x = normal(rng, 2, 3, *(spatial,) * ndim)
        return [node(op, ["x"], ["y"], **attrs)], {"x": x}, [("y", FLOAT)], {}, opset
    return build


case("MaxPool 3x3 s2 pads (ResNet)")(_pool("MaxPool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]))
case("MaxPool 2x2 (PP-OCR)")(_pool("MaxPool", opset=11, kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 0, 0]))
case("MaxPool ceil dilated asymmetric")(_pool("MaxPool", kernel_shape=[3, 2], strides=[2, 2], pads=[0, 1, 2, 0],
                                              dilations=[1, 2], ceil_mode=1, spatial=10))
case("MaxPool SAME_UPPER")(_pool("MaxPool", kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER", spatial=8))
case("MaxPool 1-D")(_pool("MaxPool", ndim=1, kernel_shape=[3], strides=[2], spatial=11))
case("AveragePool exclude pad (PP-OCR)")(_pool("AveragePool", opset=11, kernel_shape=[3, 2], strides=[3, 2],
                                               pads=[0, 0, 0, 0], count_include_pad=0))
case("AveragePool pads exclude")(_pool("AveragePool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]))
case("AveragePool pads include")(_pool("AveragePool", kernel_shape=[3, 3], strides=[1, 1], pads=[1, 0, 1, 2],
                                       count_include_pad=1, opset=11))
case("AveragePool ceil")(_pool("AveragePool", kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1, opset=11))
case("AveragePool SAME_LOWER")(_pool("AveragePool", kernel_shape=[2, 2], strides=[1, 1], auto_pad="SAME_LOWER"))
case("GlobalAveragePool")(_pool("GlobalAveragePool", opset=1))
case("GlobalMaxPool 1-D")(_pool("GlobalMaxPool", opset=1, ndim=1))


@case("MaxPool with Indices")
def _maxpool_indices(rng):
    nodes = [node("MaxPool", ["x"], ["y", "i"], kernel_shape=[2, 2], strides=[2, 2])]
    return nodes, {"x": normal(rng, 2, 3, 6, 6)}, [("y", FLOAT), ("i", INT64)], {}, 12


# ------------------------------------------------------------------------------------- shapes

@case("Flatten axis 1")
def _flatten(rng):
    nodes = [node("Flatten", ["x"], ["y"]), node("Flatten", ["x"], ["z"], axis=0),
             node("Flatten", ["x"], ["w"], axis=-1)]
    return nodes, {"x": normal(rng, 2, 3, 4)}, [("y", FLOAT), ("z", FLOAT), ("w", FLOAT)], {}, 13


@case("Reshape zero copies and -1")
def _reshape(rng):
    return ([node("Reshape", ["x", "shape"], ["y"])], {"x": normal(rng, 2, 3, 4)}, [("y", FLOAT)],
            {"shape": i64(0, -1, 2)}, 13)


@case("Reshape allowzero")
def _reshape_allowzero(rng):
    return ([node("Reshape", ["x", "shape"], ["y"], allowzero=1)], {"x": normal(rng, 2, 3, 4)}, [("y", FLOAT)],
            {"shape": i64(4, 3, 2)}, 14)


@case("Reshape opset 5 Constant shape (PP-OCR)")
def _reshape_constant(rng):
    return ([const("shape", i64(0, 12)), node("Reshape", ["x", "shape"], ["y"])], {"x": normal(rng, 2, 3, 4)},
            [("y", FLOAT)], {}, 11)


@case("Shape Gather Unsqueeze Concat Reshape")
def _shape_chain(rng):
    nodes = [node("Shape", ["x"], ["s"]), node("Gather", ["s", "zero"], ["n"], axis=0),
             node("Unsqueeze", ["n", "axes"], ["n1"]), node("Concat", ["n1", "minus_one"], ["target"], axis=0),
             node("Reshape", ["x", "target"], ["y"])]
    inits = {"zero": np.array(0, np.int64), "axes": i64(0), "minus_one": i64(-1)}
    return nodes, {"x": normal(rng, 2, 3, 4)}, [("y", FLOAT), ("target", INT64)], inits, 13


@case("Shape Slice Cast (PP-OCR)")
def _shape_slice(rng):
    nodes = [node("Shape", ["x"], ["s"]), node("Slice", ["s", "st", "en", "ax"], ["hw"]),
             node("Cast", ["hw"], ["hw32"], to=TensorProto.INT32), node("Cast", ["hw32"], ["hw64"], to=INT64),
             node("Concat", ["lead", "hw64"], ["target"], axis=0), node("Reshape", ["x", "target"], ["y"])]
    inits = {"st": i64(-2), "en": i64(INT64_MAX), "ax": i64(0), "lead": i64(-1)}
    return nodes, {"x": normal(rng, 2, 3, 4, 5)}, [("y", FLOAT)], inits, 12


@case("Shape start end")
def _shape_start(rng):
    nodes = [node("Shape", ["x"], ["a"], start=1), node("Shape", ["x"], ["b"], start=-3, end=-1),
             node("Size", ["x"], ["n"])]
    return nodes, {"x": normal(rng, 2, 3, 4, 5)}, [("a", INT64), ("b", INT64), ("n", INT64)], {}, 15


@case("Transpose")
def _transpose(rng):
    nodes = [node("Transpose", ["x"], ["y"], perm=[2, 0, 3, 1]), node("Transpose", ["x"], ["z"])]
    return nodes, {"x": normal(rng, 2, 3, 4, 5)}, [("y", FLOAT), ("z", FLOAT)], {}, 13


@case("Concat negative axis")
def _concat(rng):
    feeds = {"a": normal(rng, 2, 3), "b": normal(rng, 2, 1)}
    return [node("Concat", ["a", "b", "c"], ["y"], axis=-1)], feeds, [("y", FLOAT)], {"c": normal(rng, 2, 2)}, 11


def _split(opset: int, attrs: dict[str, Any], split_input: np.ndarray | None, outputs: int, dim: int = 7):
    def build(rng):
        inputs, inits = ["x"], {}
        if split_input is not None:
            inputs.append("split")
            inits["split"] = split_input
        names = [f"y{i}" for i in range(outputs)]
        return ([node("Split", inputs, names, **attrs)], {"x": normal(rng, 2, dim, 3)}, [(n, FLOAT) for n in names],
                inits, opset)
    return build


case("Split opset 11 split attr")(_split(11, {"axis": 1, "split": [2, 5]}, None, 2))
case("Split opset 11 equal")(_split(11, {"axis": -1}, None, 3, dim=3))
case("Split opset 13 split input")(_split(13, {"axis": 1}, i64(3, 1, 3), 3))
case("Split opset 18 num_outputs uneven")(_split(18, {"axis": 1, "num_outputs": 3}, None, 3))


@case("Slice opset 9 attrs")
def _slice_attrs(rng):
    nodes = [node("Slice", ["x"], ["y"], starts=[1, -3], ends=[1000, -1], axes=[0, 2])]
    return nodes, {"x": normal(rng, 3, 4, 5)}, [("y", FLOAT)], {}, 9


@case("Slice opset 13 negative steps, INT64 bounds")
def _slice_steps(rng):
    nodes = [node("Slice", ["x", "st", "en", "ax", "sp"], ["y"]),
             node("Slice", ["x", "st2", "en2"], ["z"])]
    inits = {"st": i64(-1, INT64_MAX, 1), "en": i64(INT64_MIN, 0, 4), "ax": i64(-1, 1, 0), "sp": i64(-2, -1, 2),
             "st2": i64(0, 1), "en2": i64(2, INT64_MAX)}
    return nodes, {"x": normal(rng, 5, 4, 6)}, [("y", FLOAT), ("z", FLOAT)], inits, 13


@case("Gather runtime data negative indices axis 1")
def _gather(rng):
    nodes = [node("Gather", ["x", "idx"], ["y"], axis=1), node("Gather", ["x", "scalar"], ["z"], axis=-1)]
    inits = {"idx": np.array([[0, -1], [2, -3]], np.int64), "scalar": np.array(-2, np.int64)}
    return nodes, {"x": normal(rng, 2, 4, 5)}, [("y", FLOAT), ("z", FLOAT)], inits, 13


@case("Gather constant table constant indices")
def _gather_const(rng):
    nodes = [node("Gather", ["table", "idx"], ["rows"], axis=0), node("Add", ["x", "rows"], ["y"])]
    inits = {"table": normal(rng, 6, 4), "idx": i64(1, 3, -1)}
    return nodes, {"x": normal(rng, 2, 3, 4)}, [("y", FLOAT)], inits, 13


@case("GatherElements")
def _gather_elements(rng):
    idx = rng.integers(-3, 3, (2, 4, 5)).astype(np.int64)
    return ([node("GatherElements", ["x", "idx"], ["y"], axis=1)], {"x": normal(rng, 2, 3, 5)}, [("y", FLOAT)],
            {"idx": idx}, 13)


@case("GatherND batch_dims 0 and 1")
def _gather_nd(rng):
    nodes = [node("GatherND", ["x", "i0"], ["y"]), node("GatherND", ["x", "i1"], ["z"], batch_dims=1)]
    inits = {"i0": np.array([[[0, 1], [1, -1]], [[1, 2], [0, 0]]], np.int64),
             "i1": np.array([[[1], [0]], [[2], [-1]]], np.int64)}
    return nodes, {"x": normal(rng, 2, 3, 4)}, [("y", FLOAT), ("z", FLOAT)], inits, 13


@case("Unsqueeze Squeeze opset 11 attrs")
def _squeeze_attrs(rng):
    nodes = [node("Unsqueeze", ["x"], ["u"], axes=[0, -1]), node("Squeeze", ["u"], ["y"], axes=[0, 4]),
             node("Squeeze", ["u"], ["z"])]
    return nodes, {"x": normal(rng, 2, 1, 3)}, [("y", FLOAT), ("z", FLOAT), ("u", FLOAT)], {}, 11


@case("Unsqueeze Squeeze opset 13 inputs")
def _squeeze_inputs(rng):
    nodes = [node("Unsqueeze", ["x", "ua"], ["u"]), node("Squeeze", ["u", "sa"], ["y"]), node("Squeeze", ["u"], ["z"])]
    inits = {"ua": i64(3, 1), "sa": i64(-2)}
    return nodes, {"x": normal(rng, 2, 1, 3)}, [("y", FLOAT), ("z", FLOAT), ("u", FLOAT)], inits, 13


@case("Squeeze opset 12 one axis (PP-OCR)")
def _squeeze_pp(rng):
    return [node("Squeeze", ["x"], ["y"], axes=[2])], {"x": normal(rng, 2, 3, 1, 5)}, [("y", FLOAT)], {}, 12


@case("Expand")
def _expand(rng):
    nodes = [node("Expand", ["x", "shape"], ["y"]), node("Shape", ["y"], ["s"]), node("Expand", ["b", "s"], ["z"])]
    feeds = {"x": normal(rng, 3, 1), "b": normal(rng, 1)}
    return nodes, feeds, [("y", FLOAT), ("z", FLOAT)], {"shape": i64(2, 1, 4)}, 13


@case("Tile Range")
def _tile_range(rng):
    nodes = [node("Tile", ["x", "reps"], ["y"]), node("Shape", ["x"], ["s"]),
             node("Gather", ["s", "one"], ["n"], axis=0), node("Range", ["zero", "n", "step"], ["r"]),
             node("Range", ["fs", "fl", "fd"], ["rf"])]
    inits = {"reps": i64(2, 1, 3), "one": np.array(1, np.int64), "zero": np.array(0, np.int64),
             "step": np.array(2, np.int64), "fs": np.array(1.5, np.float32), "fl": np.array(-2.0, np.float32),
             "fd": np.array(-0.75, np.float32)}
    return nodes, {"x": normal(rng, 2, 5, 3)}, [("y", FLOAT), ("r", INT64), ("rf", FLOAT)], inits, 13


@case("Constant forms")
def _constants(rng):
    nodes = [helper.make_node("Constant", [], ["cf"], name="cf", value_float=0.5),
             helper.make_node("Constant", [], ["ci"], name="ci", value_ints=[1, 2, 3]),
             helper.make_node("Constant", [], ["cfs"], name="cfs", value_floats=[1.0, -1.0, 2.0]),
             const("ct", normal(rng, 3)),
             node("Mul", ["x", "cf"], ["a"]), node("Add", ["a", "ct"], ["b"]), node("Mul", ["b", "cfs"], ["y"]),
             node("Cast", ["ci"], ["cif"], to=FLOAT), node("Add", ["y", "cif"], ["z"])]
    return nodes, {"x": normal(rng, 2, 3)}, [("z", FLOAT), ("ci", INT64)], {}, 13


@case("ConstantOfShape")
def _constant_of_shape(rng):
    nodes = [node("Shape", ["x"], ["s"]),
             node("ConstantOfShape", ["s"], ["f"], value=numpy_helper.from_array(np.array([1.5], np.float32))),
             node("ConstantOfShape", ["s"], ["z"]),
             node("ConstantOfShape", ["two"], ["i"], value=numpy_helper.from_array(np.array([7], np.int64))),
             node("Add", ["x", "f"], ["y"])]
    return nodes, {"x": normal(rng, 2, 3)}, [("y", FLOAT), ("z", FLOAT), ("i", INT64)], {"two": i64(2, 2)}, 13


def _reduce(op: str, opset: int, axes: Sequence[int] | None, axes_input: bool, keepdims: int | None = None,
            noop: int | None = None):
    def build(rng):
        attrs: dict[str, Any] = {}
        inputs, inits = ["x"], {}
        if keepdims is not None:
            attrs["keepdims"] = keepdims
        if noop is not None:
            attrs["noop_with_empty_axes"] = noop
        if axes is not None:
            if axes_input:
                inputs.append("axes")
                inits["axes"] = i64(*axes)
            else:
                attrs["axes"] = list(axes)
        x = np.abs(normal(rng, 2, 3, 4)) + 0.1 if op in ("ReduceLogSum", "ReduceProd") else normal(rng, 2, 3, 4)
        return [node(op, inputs, ["y"], **attrs)], {"x": x}, [("y", FLOAT)], inits, opset
    return build


case("ReduceMean opset 11 axes attr (PP-OCR)")(_reduce("ReduceMean", 11, [-1], False))
case("ReduceMean opset 13 keepdims 0")(_reduce("ReduceMean", 13, [0, 2], False, keepdims=0))
case("ReduceMean opset 18 axes input")(_reduce("ReduceMean", 18, [-1, 1], True))
case("ReduceMean opset 18 no axes")(_reduce("ReduceMean", 18, None, True, keepdims=0))
case("ReduceMean opset 18 noop empty")(_reduce("ReduceMean", 18, None, True, noop=1))
case("ReduceSum opset 11 attr")(_reduce("ReduceSum", 11, [1], False))
case("ReduceSum opset 13 input")(_reduce("ReduceSum", 13, [-1], True, keepdims=0))
case("ReduceMax opset 18")(_reduce("ReduceMax", 18, [1], True))
case("ReduceMin opset 13")(_reduce("ReduceMin", 13, [0, 1], False, keepdims=0))
case("ReduceProd opset 13")(_reduce("ReduceProd", 13, [2], False))
case("ReduceL2 opset 18")(_reduce("ReduceL2", 18, [2], True))
case("ReduceSumSquare opset 13")(_reduce("ReduceSumSquare", 13, [1], False))
case("ReduceL1 opset 18")(_reduce("ReduceL1", 18, [0, -1], True, keepdims=0))
case("ReduceLogSum opset 13")(_reduce("ReduceLogSum", 13, [1], False))
case("ReduceLogSumExp opset 13")(_reduce("ReduceLogSumExp", 13, [2], False))


@case("ArgMax ArgMin")
def _argmax(rng):
    x = rng.integers(0, 3, (3, 4, 5)).astype(np.float32)
    nodes = [node("ArgMax", ["x"], ["a"], axis=1), node("ArgMin", ["x"], ["b"], axis=-1, keepdims=0),
             node("ArgMax", ["x"], ["c"], axis=2, select_last_index=1)]
    return nodes, {"x": x}, [("a", INT64), ("b", INT64), ("c", INT64)], {}, 13


@case("Cast forms")
def _cast(rng):
    x = normal(rng, 3, 4) * 5
    x[0, 0] = 0.0
    nodes = [node("Cast", ["x"], ["i"], to=INT64), node("Cast", ["x"], ["h"], to=TensorProto.FLOAT16),
             node("Cast", ["x"], ["b"], to=BOOL), node("Cast", ["i"], ["f"], to=TensorProto.DOUBLE),
             node("Cast", ["b"], ["bi"], to=TensorProto.INT32), node("Cast", ["x"], ["u"], to=TensorProto.UINT8)]
    x = np.abs(x)
    outs = [("i", INT64), ("h", TensorProto.FLOAT16), ("b", BOOL), ("f", TensorProto.DOUBLE),
            ("bi", TensorProto.INT32), ("u", TensorProto.UINT8)]
    return nodes, {"x": x}, outs, {}, 13


@case("Cast negative to int")
def _cast_negative(rng):
    return [node("Cast", ["x"], ["i"], to=INT64)], {"x": normal(rng, 3, 4) * 5}, [("i", INT64)], {}, 19


def _pad(opset: int, mode: str | None, pads: Sequence[int], as_attr: bool = False, value: float | None = None,
         axes: Sequence[int] | None = None):
    def build(rng):
        attrs: dict[str, Any] = {} if mode is None else {"mode": mode}
        inputs, inits = ["x"], {}
        if as_attr:
            attrs["pads"] = list(pads)
            if value is not None:
                attrs["value"] = value
        else:
            inputs.append("pads")
            inits["pads"] = i64(*pads)
            if value is not None or axes is not None:
                inputs.append("value" if value is not None else "")
                if value is not None:
                    inits["value"] = np.array(value, np.float32)
            if axes is not None:
                inputs.append("axes")
                inits["axes"] = i64(*axes)
        return [node("Pad", inputs, ["y"], **attrs)], {"x": normal(rng, 2, 3, 4, 5)}, [("y", FLOAT)], inits, opset
    return build


case("Pad opset 2 attrs")(_pad(2, "constant", [0, 0, 1, 2, 0, 1, 2, 0], as_attr=True, value=1.5))
case("Pad opset 11 constant")(_pad(11, None, [0, 1, 1, 0, 1, 0, 0, 2], value=-2.0))
case("Pad opset 11 reflect")(_pad(11, "reflect", [0, 0, 2, 1, 0, 0, 1, 3]))
case("Pad opset 13 edge all axes")(_pad(13, "edge", [1, 0, 2, 1, 0, 2, 1, 3]))
case("Pad opset 13 negative crop")(_pad(13, "constant", [0, 0, -1, 1, 0, 0, 2, -2]))
case("Pad opset 18 axes")(_pad(18, "reflect", [1, 2, 2, 1], axes=[-1, 2]))
case("Pad opset 19 wrap")(_pad(19, "wrap", [0, 1, 2, 1, 0, 2, 1, 3]))


def _resize(opset: int, shape: Sequence[int], scales: Sequence[float] | None = None,
            sizes: Sequence[int] | None = None, roi: Sequence[float] | None = None, **attrs: Any):
    def build(rng):
        inits: dict[str, np.ndarray] = {}
        if opset < 11:
            inputs = ["x", "scales"]
        else:
            inputs = ["x", "roi" if roi is not None or opset < 13 else ""]
            if roi is not None or opset < 13:
                inits["roi"] = np.array(roi if roi is not None else [], np.float32)
            inputs.append("scales" if scales is not None else "")
        if scales is not None:
            inits["scales"] = np.array(scales, np.float32)
        if sizes is not None:
            inputs.append("sizes")
            inits["sizes"] = i64(*sizes)
        return [node("Resize", inputs, ["y"], **attrs)], {"x": normal(rng, *shape)}, [("y", FLOAT)], inits, opset
    return build


case("Resize nearest asymmetric floor x2 (PP-OCR)")(_resize(11, (1, 2, 5, 6), scales=[1, 1, 2, 2], mode="nearest",
                                                            coordinate_transformation_mode="asymmetric",
                                                            nearest_mode="floor"))
case("Resize opset 10 nearest")(_resize(10, (1, 2, 4, 5), scales=[1, 1, 2, 3], mode="nearest"))
case("Resize opset 10 linear")(_resize(10, (1, 2, 4, 5), scales=[1, 1, 2, 1.5], mode="linear"))
case("Resize nearest half_pixel round_prefer_floor sizes")(_resize(13, (1, 2, 5, 7), sizes=[1, 2, 8, 4]))
case("Resize nearest round_prefer_ceil downscale")(_resize(13, (1, 2, 9, 8), scales=[1, 1, 0.5, 0.75],
                                                           nearest_mode="round_prefer_ceil"))
case("Resize nearest ceil align_corners")(_resize(13, (1, 2, 4, 5), sizes=[1, 2, 7, 9], nearest_mode="ceil",
                                                  coordinate_transformation_mode="align_corners"))
case("Resize linear half_pixel")(_resize(13, (2, 3, 5, 6), scales=[1, 1, 1.6, 2.5], mode="linear"))
case("Resize linear pytorch_half_pixel sizes")(_resize(13, (1, 2, 6, 5), sizes=[1, 2, 1, 11], mode="linear",
                                                       coordinate_transformation_mode="pytorch_half_pixel"))
case("Resize linear align_corners 1-D")(_resize(13, (2, 3, 7), sizes=[2, 3, 12], mode="linear",
                                                coordinate_transformation_mode="align_corners"))
case("Resize linear asymmetric 3-D")(_resize(13, (1, 2, 3, 4, 5), scales=[1, 1, 2, 1.5, 0.6], mode="linear",
                                             coordinate_transformation_mode="asymmetric"))
case("Resize cubic half_pixel")(_resize(13, (1, 2, 5, 6), scales=[1, 1, 2, 1.5], mode="cubic"))
case("Resize cubic exclude_outside")(_resize(13, (1, 2, 6, 5), sizes=[1, 2, 9, 4], mode="cubic",
                                             exclude_outside=1, cubic_coeff_a=-0.5))
case("Resize tf_crop_and_resize")(_resize(13, (1, 2, 6, 7), sizes=[1, 2, 5, 4], mode="linear",
                                          roi=[0, 0, 0.2, 0.1, 1, 1, 0.9, 1.2],
                                          coordinate_transformation_mode="tf_crop_and_resize",
                                          extrapolation_value=-1.0))
case("Resize opset 18 axes keep_aspect_ratio")(_resize(18, (1, 2, 6, 8), sizes=[9, 9], axes=[2, 3],
                                                       keep_aspect_ratio_policy="not_larger", mode="linear"))
case("Resize opset 19 half_pixel_symmetric")(_resize(19, (1, 2, 6, 8), scales=[1, 1, 1.5, 0.7], mode="linear",
                                                     coordinate_transformation_mode="half_pixel_symmetric"))

case("Upsample opset 9 nearest")(lambda rng: ([node("Upsample", ["x", "scales"], ["y"], mode="nearest")],
                                              {"x": normal(rng, 1, 2, 3, 4)}, [("y", FLOAT)],
                                              {"scales": np.array([1, 1, 2, 1.5], np.float32)}, 9))
case("Upsample opset 9 linear")(lambda rng: ([node("Upsample", ["x", "scales"], ["y"], mode="linear")],
                                             {"x": normal(rng, 1, 2, 3, 4)}, [("y", FLOAT)],
                                             {"scales": np.array([1, 1, 2, 2.5], np.float32)}, 9))


@case("Dropout opset 12 mask")
def _dropout(rng):
    return ([node("Dropout", ["x", "ratio"], ["y", "mask"])], {"x": normal(rng, 2, 3)},
            [("y", FLOAT), ("mask", BOOL)], {"ratio": np.array(0.3, np.float32)}, 12)


@case("Dropout opset 10 attr")
def _dropout_attr(rng):
    return [node("Dropout", ["x"], ["y"], ratio=0.4)], {"x": normal(rng, 2, 3)}, [("y", FLOAT)], {}, 10


@case("Einsum attention")
def _einsum(rng):
    feeds = {"q": normal(rng, 2, 3, 4), "k": normal(rng, 2, 5, 4)}
    return [node("Einsum", ["q", "k"], ["y"], equation="bqd,bkd->bqk")], feeds, [("y", FLOAT)], {}, 12


@case("CumSum Trilu")
def _cumsum(rng):
    nodes = [node("CumSum", ["x", "axis"], ["c"]), node("CumSum", ["x", "axis"], ["r"], exclusive=1, reverse=1),
             node("Trilu", ["x", "k"], ["lower"], upper=0), node("Trilu", ["x"], ["upper"])]
    inits = {"axis": np.array(-1, np.int64), "k": np.array(1, np.int64)}
    return nodes, {"x": normal(rng, 2, 4, 5)}, [("c", FLOAT), ("r", FLOAT), ("lower", FLOAT), ("upper", FLOAT)], \
        inits, 14


@case("DepthToSpace SpaceToDepth")
def _depth_to_space(rng):
    nodes = [node("DepthToSpace", ["x"], ["d"], blocksize=2), node("DepthToSpace", ["x"], ["c"], blocksize=2,
                                                                   mode="CRD"),
             node("SpaceToDepth", ["d"], ["s"], blocksize=2)]
    return nodes, {"x": normal(rng, 2, 8, 3, 4)}, [("d", FLOAT), ("c", FLOAT), ("s", FLOAT)], {}, 13


@case("TopK")
def _topk(rng):
    x = rng.permutation(60).reshape(3, 4, 5).astype(np.float32)
    nodes = [node("TopK", ["x", "k"], ["v", "i"], axis=1), node("TopK", ["x", "k"], ["v2", "i2"], largest=0)]
    return nodes, {"x": x}, [("v", FLOAT), ("i", INT64), ("v2", FLOAT), ("i2", INT64)], {"k": i64(2)}, 11


@case("OneHot NonZero")
def _one_hot(rng):
    nodes = [node("OneHot", ["ids", "depth", "values"], ["oh"], axis=-1), node("NonZero", ["x"], ["nz"])]
    ids = np.array([[0, 3], [-1, 2]], np.int64)
    x = (rng.random((3, 4)) < 0.5).astype(np.float32)
    inits = {"depth": np.array(4, np.int64), "values": np.array([0.0, 2.0], np.float32)}
    return nodes, {"ids": ids, "x": x}, [("oh", FLOAT), ("nz", INT64)], inits, 11


@case("ScatterND ScatterElements")
def _scatter(rng):
    nodes = [node("ScatterND", ["x", "idx", "upd"], ["a"]),
             node("ScatterElements", ["x", "eidx", "eupd"], ["b"], axis=1)]
    inits = {"idx": np.array([[0, 1], [1, -1]], np.int64), "upd": normal(rng, 2, 4),
             "eidx": np.array([[[0], [2]], [[1], [-1]]], np.int64), "eupd": normal(rng, 2, 2, 1)}
    return nodes, {"x": normal(rng, 2, 3, 4)}, [("a", FLOAT), ("b", FLOAT)], inits, 13



@case("Scatter opset 10")
def _scatter_old(rng):
    inits = {"idx": np.array([[1, 0, 2], [0, 2, -1]], np.int64), "upd": normal(rng, 2, 3)}
    return [node("Scatter", ["x", "idx", "upd"], ["y"], axis=1)], {"x": normal(rng, 2, 4)}, [("y", FLOAT)], inits, 10

# ----------------------------------------------------------------------------------- reference

def cases_for(ops: set[str] | frozenset[str]) -> list[Case]:
    """The cases using only ``ops`` (for a builder that supports a subset of the ops covered here)."""
    return [item for item in CASES if set(item.ops) <= set(ops)]


def reference(item: Case) -> list[np.ndarray]:
    """The case's outputs from onnxruntime (one thread, quiet)."""
    return _run(item.model, item.feeds)


def relative_error(got: Any, ref: Any) -> float:
    """``max |got - ref| / max |ref|`` in float64; integer and boolean outputs must be equal (0 or inf).

    Shapes must match exactly (else inf); NaNs at the same places count as equal.
    """
    got_arr, ref_arr = np.asarray(got), np.asarray(ref)
    if got_arr.shape != ref_arr.shape:
        return float("inf")
    if ref_arr.dtype.kind in "biu" or got_arr.dtype.kind in "biu":
        return 0.0 if np.array_equal(got_arr, ref_arr) else float("inf")
    if ref_arr.size == 0:
        return 0.0
    got64, ref64 = got_arr.astype(np.float64), ref_arr.astype(np.float64)
    same_nan = np.isnan(got64) & np.isnan(ref64)
    same_inf = np.isinf(ref64) & (got64 == ref64)
    diff = np.where(same_nan | same_inf, 0.0, np.abs(got64 - ref64))
    if np.isnan(diff).any():
        return float("inf")
    scale = np.abs(np.where(same_nan | same_inf, 0.0, ref64)).max()
    error = float(diff.max())
    return error / float(scale) if scale > 0 else (0.0 if error == 0 else float("inf"))
