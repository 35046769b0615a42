"""ONNX models and data for the tests: small builders, the onnx backend test data, PP-OCR, feeds.

Every builder is seeded and returns a checked ``ModelProto``. Weights have decaying spectra (as
trained weights do), so low-rank approximations are meaningful.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from tests.skips import missing

OPSET = 17


def decaying(rng: np.random.Generator, shape: Sequence[int], decay: float = 0.85) -> np.ndarray:
    """A float32 array of ``shape`` whose ``[shape[0], rest]`` matrix has singular values ``decay**i``."""
    rows, cols = shape[0], int(np.prod(shape[1:]))
    u, _ = np.linalg.qr(rng.standard_normal((rows, rows)))
    v, _ = np.linalg.qr(rng.standard_normal((cols, cols)))
    k = min(rows, cols)
    matrix = (u[:, :k] * decay ** np.arange(k)) @ v[:, :k].T
    return matrix.reshape(shape).astype(np.float32)


def make_model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
               initializers: dict[str, np.ndarray] | None = None, opset: int = OPSET, ir_version: int | None = None,
               name: str = "test", check: bool = True) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(array, key) for key, array in (initializers or {}).items()]
    graph = helper.make_graph(nodes, name, inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="lowrank-tests")
    if ir_version is not None:
        model.ir_version = ir_version
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model


def tensor(name: str, shape: Sequence[int | str | None] | None, dtype: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, None if shape is None else list(shape))


def constant_node(name: str, array: np.ndarray) -> onnx.NodeProto:
    """A ``Constant`` node holding ``array`` (how PP-OCR exports keep their weights)."""
    return helper.make_node("Constant", [], [name], name=f"const_{name}", value=numpy_helper.from_array(array))


# --------------------------------------------------------------------------------------- builders

def mlp(rng: np.random.Generator, dims: Sequence[int] = (48, 64, 40), *, trans_b: int = 1, alpha: float = 1.0,
        beta: float = 1.0, bias_shape: str = "vector", constants: bool = False, opset: int = OPSET,
        ir_version: int | None = None) -> onnx.ModelProto:
    """x [N, d0] -> Gemm -> Relu -> Gemm -> y; ``bias_shape`` "vector" [out], "row" [1, out] or "none"."""
    nodes, inits = [], {}
    value = "x"
    for index, (inp, out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        weight = decaying(rng, (out, inp))
        arrays = {f"fc{index}.weight": weight if trans_b else np.ascontiguousarray(weight.T)}
        if bias_shape != "none":
            bias = rng.standard_normal(out).astype(np.float32)
            arrays[f"fc{index}.bias"] = bias if bias_shape == "vector" else bias.reshape(1, out)
        if constants:
            nodes += [constant_node(key, array) for key, array in arrays.items()]
        else:
            inits.update(arrays)
        output = "y" if index == len(dims) - 2 else f"h{index}"
        gemm_inputs = [value, *arrays]
        nodes.append(helper.make_node("Gemm", gemm_inputs, [f"{output}_pre" if output != "y" else output],
                                      name=f"gemm{index}", transB=trans_b, alpha=alpha, beta=beta))
        if output != "y":
            nodes.append(helper.make_node("Relu", [f"{output}_pre"], [output], name=f"relu{index}"))
        value = output
    return make_model(nodes, [tensor("x", ["batch", dims[0]])], [tensor("y", ["batch", dims[-1]])], inits,
                      opset=opset, ir_version=ir_version)


def matmul(rng: np.random.Generator, side: str = "right", x_shape: Sequence[int | str] = ("batch", 10, 32),
           out: int = 24) -> onnx.ModelProto:
    """y = x W (side "right", features on x's last axis) or y = W x (side "left", on x's second-to-last)."""
    features = x_shape[-1] if side == "right" else x_shape[-2]
    assert isinstance(features, int)
    weight = decaying(rng, (out, features))
    if side == "right":
        node = helper.make_node("MatMul", ["x", "proj.weight"], ["y"], name="mm")
        inits = {"proj.weight": np.ascontiguousarray(weight.T)}
        y_shape = [*x_shape[:-1], out]
    else:
        node = helper.make_node("MatMul", ["proj.weight", "x"], ["y"], name="mm")
        inits = {"proj.weight": weight}
        y_shape = [*x_shape[:-2], out, x_shape[-1]] if len(x_shape) >= 2 else [out]
    relu = helper.make_node("Relu", ["x"], ["x_relu"], name="relu")
    node.input[:] = [name if name != "x" else "x_relu" for name in node.input]
    return make_model([relu, node], [tensor("x", x_shape)], [tensor("y", y_shape)], inits)


def conv(rng: np.random.Generator, ndim: int = 2, channels: tuple[int, int] = (16, 24), kernel: int = 3,
         group: int = 1, pads: Sequence[int] | None = None, strides: int = 1, dilations: int = 1,
         auto_pad: str | None = None, bias: bool = True, spatial: int = 12) -> onnx.ModelProto:
    """x [N, C, *spatial] -> Conv -> y, with the attributes given (pads in ONNX (begin..., end...) order)."""
    cin, cout = channels
    weight = decaying(rng, (cout, cin // group, *(kernel,) * ndim))
    inits = {"conv.weight": weight}
    inputs = ["x", "conv.weight"]
    if bias:
        inits["conv.bias"] = rng.standard_normal(cout).astype(np.float32)
        inputs.append("conv.bias")
    attrs: dict[str, Any] = {"kernel_shape": [kernel] * ndim, "group": group, "strides": [strides] * ndim,
                             "dilations": [dilations] * ndim}
    if auto_pad:
        attrs["auto_pad"] = auto_pad
    else:
        attrs["pads"] = list(pads) if pads is not None else [kernel // 2] * (2 * ndim)
    node = helper.make_node("Conv", inputs, ["y"], name="conv", **attrs)
    model = make_model([node], [tensor("x", ["batch", cin, *(spatial,) * ndim])], [tensor("y", None)], inits,
                       check=False)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    del model.graph.output[:]
    model.graph.output.extend(inferred.graph.output)
    onnx.checker.check_model(model, full_check=True)
    return model


def embedding(rng: np.random.Generator, rows: int = 100, dim: int = 48) -> onnx.ModelProto:
    """ids [N, T] -> Gather(table) -> MatMul(proj) -> y."""
    table = decaying(rng, (rows, dim))
    proj = decaying(rng, (dim, 16))
    nodes = [helper.make_node("Gather", ["emb.weight", "ids"], ["e"], name="gather", axis=0),
             helper.make_node("MatMul", ["e", "proj"], ["y"], name="proj")]
    return make_model(nodes, [tensor("ids", ["batch", "seq"], TensorProto.INT64)],
                      [tensor("y", ["batch", "seq", 16])], {"emb.weight": table, "proj": proj})


def if_model(rng: np.random.Generator) -> onnx.ModelProto:
    """An If whose branches read the outer scope's weight and input (and a Gemm layer outside)."""
    w = decaying(rng, (32, 32))
    then_graph = helper.make_graph([helper.make_node("MatMul", ["h", "shared"], ["out_then"])], "then", [],
                                   [tensor("out_then", [4, 32])])
    else_graph = helper.make_graph([helper.make_node("Neg", ["h"], ["out_else"])], "else", [],
                                   [tensor("out_else", [4, 32])])
    nodes = [helper.make_node("Gemm", ["x", "fc.weight"], ["h"], name="fc", transB=1),
             helper.make_node("ReduceSum", ["x"], ["s"], name="sum", keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["cond"], name="greater"),
             helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_graph, else_branch=else_graph)]
    inits = {"fc.weight": decaying(rng, (32, 32)), "shared": w, "zero": np.zeros((), np.float32)}
    return make_model(nodes, [tensor("x", [4, 32])], [tensor("y", [4, 32])], inits)


def loop_model() -> onnx.ModelProto:
    """A Loop accumulating x three times (loop-carried value, a subgraph reading an outer constant)."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Add", ["acc_in", "step"], ["acc_out"])],
        "body", [tensor("i", [], TensorProto.INT64), tensor("cond_in", [], TensorProto.BOOL), tensor("acc_in", [2, 3])],
        [tensor("cond_out", [], TensorProto.BOOL), tensor("acc_out", [2, 3])])
    nodes = [helper.make_node("Loop", ["trips", "", "x"], ["y"], name="loop", body=body)]
    inits = {"trips": np.array(3, np.int64), "step": np.full((2, 3), 0.5, np.float32)}
    return make_model(nodes, [tensor("x", [2, 3])], [tensor("y", [2, 3])], inits)


def scan_model() -> onnx.ModelProto:
    """A Scan computing a running sum over the first axis."""
    body = helper.make_graph(
        [helper.make_node("Add", ["sum_in", "next"], ["sum_out"]),
         helper.make_node("Identity", ["sum_out"], ["scan_out"])],
        "scan_body", [tensor("sum_in", [2]), tensor("next", [2])], [tensor("sum_out", [2]), tensor("scan_out", [2])])
    nodes = [helper.make_node("Scan", ["init", "x"], ["final", "y"], name="scan", body=body, num_scan_inputs=1)]
    return make_model(nodes, [tensor("init", [2]), tensor("x", [5, 2])], [tensor("final", [2]), tensor("y", [5, 2])])


# --------------------------------------------------------------------------------------- running

def session(model: onnx.ModelProto | str | os.PathLike[str]) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto | str | os.PathLike[str], feeds: dict[str, Any]) -> list[Any]:
    return list(session(model).run(None, feeds))


# ------------------------------------------------------------------------------ backend test data

BACKEND_DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
BACKEND_SETS = ("simple", "pytorch-converted", "pytorch-operator", "light")


@dataclass(frozen=True)
class BackendCase:
    """One model of the onnx backend test data, with its stored inputs and expected outputs."""

    id: str
    model: Path
    data_sets: tuple[Path, ...] = ()
    light_output: Path | None = None

    def load(self) -> onnx.ModelProto:
        return onnx.load(self.model)

    def feeds_and_outputs(self, model: onnx.ModelProto) -> list[tuple[dict[str, Any], list[Any]]]:
        """Per stored data set: the feeds by input name, and the expected outputs."""
        inits = {init.name for init in model.graph.initializer}
        inputs = [value for value in model.graph.input if value.name not in inits]
        if self.light_output is not None:  # the runner feeds arange/n and stores only the output
            feeds = {}
            for value in inputs:
                shape = [dim.dim_value if dim.HasField("dim_value") else 1 for dim in value.type.tensor_type.shape.dim]
                count = int(np.prod(shape))
                feeds[value.name] = (np.arange(count).reshape(shape) / count).astype(np.float32)
            return [(feeds, [_load_pb(self.light_output, model.graph.output[0].type)])]
        result = []
        for folder in self.data_sets:
            files = sorted(folder.glob("input_*.pb"), key=lambda path: int(path.stem.split("_")[1]))
            feeds = {value.name: _load_pb(path, value.type) for value, path in zip(inputs, files, strict=False)}
            outs = sorted(folder.glob("output_*.pb"), key=lambda path: int(path.stem.split("_")[1]))
            expected = [_load_pb(path, value.type) for value, path in zip(model.graph.output, outs, strict=False)]
            result.append((feeds, expected))
        return result


def _load_pb(path: Path, type_proto: onnx.TypeProto) -> Any:
    data = path.read_bytes()
    kind = type_proto.WhichOneof("value")
    if kind == "sequence_type":
        sequence = onnx.SequenceProto()
        sequence.ParseFromString(data)
        return numpy_helper.to_list(sequence)
    if kind == "optional_type":
        optional = onnx.OptionalProto()
        optional.ParseFromString(data)
        return numpy_helper.to_optional(optional)
    proto = TensorProto()
    proto.ParseFromString(data)
    return numpy_helper.to_array(proto)


def backend_cases() -> list[BackendCase]:
    cases = []
    for name in BACKEND_SETS:
        if name == "light":
            for path in sorted((BACKEND_DATA / name).glob("*.onnx")):
                output = path.with_name(f"{path.stem}_output_0.pb")
                cases.append(BackendCase(f"light/{path.stem}", path, light_output=output))
            continue
        for folder in sorted((BACKEND_DATA / name).iterdir()):
            if (folder / "model.onnx").is_file():
                sets = tuple(sorted(Path(p) for p in glob.glob(str(folder / "test_data_set_*"))))
                cases.append(BackendCase(f"{name}/{folder.name}", folder / "model.onnx", sets))
    return cases


# ----------------------------------------------------------------------------------------- PP-OCR

PPOCR_FILES = {
    "det": "ch_PP-OCRv4_det_infer.onnx",
    "rec": "ch_PP-OCRv4_rec_infer.onnx",
    "cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx",
}


def ppocr_model(kind: str) -> Path | None:
    """The PP-OCR model file shipped by ``rapidocr-onnxruntime`` (found without importing the package,
    whose ``__init__`` needs OpenCV), or None when the package is not installed."""
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / PPOCR_FILES[kind]
    return path if path.is_file() else None


def ppocr_file(kind: str) -> Path:
    """The PP-OCR model file for a test: when ``rapidocr-onnxruntime`` is missing the test skips, or fails in CI."""
    path = ppocr_model(kind)
    if path is None:
        missing("rapidocr-onnxruntime (the PP-OCR models)")
    return path


def text_image(height: int, width: int, seed: int) -> np.ndarray:
    """A synthetic page: dark glyph-like strokes in lines of text on a light, noisy background (HWC, 0..255)."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 235.0) + rng.normal(0, 4, (height, width, 3))
    top = 4
    while top < height - 12:
        line = int(rng.integers(10, 20))
        left = int(rng.integers(2, 10))
        while left < width - 8:
            glyph = int(rng.integers(4, line))
            for _ in range(3):
                if rng.random() < 0.5:
                    column = left + int(rng.integers(0, glyph))
                    image[top:top + line, column:column + 2] = 30
                else:
                    row = top + int(rng.integers(0, line))
                    image[row:row + 2, left:left + glyph] = 30
            left += glyph + int(rng.integers(1, 4)) + (int(rng.integers(6, 15)) if rng.random() < 0.1 else 0)
        top += line + int(rng.integers(6, 20))
    return np.clip(image, 0, 255)


def ppocr_feeds(kind: str, seed: int, batch: int = 1) -> dict[str, np.ndarray]:
    """PP-OCR's own preprocessing of synthetic text images: det pages 160x160, rec/cls lines 48 high."""
    images = []
    for index in range(batch):
        if kind == "det":
            image = text_image(160, 160, seed * 100 + index) / 255.0
            image = (image - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
        else:
            image = text_image(48, 320 if kind == "rec" else 192, seed * 100 + index) / 255.0
            image = (image - 0.5) / 0.5
        images.append(image.transpose(2, 0, 1))
    return {"x": np.stack(images).astype(np.float32)}
