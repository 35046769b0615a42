"""``lowrank convert MODEL.onnx --to torch|mindspore -o OUT`` and ``lowrank parity MODEL``.

Both are thin: the work is ``lowrank_ir.convert`` / ``save_converted`` and ``lowrank_ir.parity``.
``convert`` writes a folder that ``lowrank_ir.load_converted`` turns back into a trainable model;
``parity`` prints a table of how far PyTorch, MindSpore (and the model's own framework) are from
onnxruntime, before and after decomposition, and exits 0 within ``--tolerance``, 1 above it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from tools.common import UsageError, command_outputs, is_onnx_path, load_factory, parse_input_shapes

__all__ = ["EXIT_ABOVE_TOLERANCE", "TARGETS", "convert", "parity"]

#: Exit code when a runtime is further from onnxruntime than ``--tolerance``.
EXIT_ABOVE_TOLERANCE = 1

TARGETS = ("torch", "mindspore")


def _size(path: Path) -> str:
    size = float(path.stat().st_size)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def _op_counts(graph: Any) -> str:
    counts = Counter(node.op.value if node.is_layer else str(node.attrs.get("source_op")) for node in graph.nodes)
    shown = ", ".join(f"{op} {count}" for op, count in counts.most_common(8))
    return shown + (f", ... ({len(counts)} op types)" if len(counts) > 8 else "")


def convert(args: argparse.Namespace) -> int:
    """Convert an ONNX file to a PyTorch or MindSpore model folder, and say what was written."""
    from crossframework.convert import MANIFEST_FILE, WEIGHTS_FILES
    from lowrank_ir import convert as convert_model
    from lowrank_ir import save_converted
    from lowrank_ir.serde import GRAPH_FILE, PARAMS_FILE

    if args.to not in TARGETS:
        raise UsageError(f"--to {args.to!r}: choose torch or mindspore")
    if not is_onnx_path(args.model):
        raise UsageError(f"convert takes an ONNX file (MODEL.onnx), got {args.model!r}; export a PyTorch or "
                         f"MindSpore model first (backends.onnx.export), or check it with 'lowrank parity'")
    if not Path(args.model).is_file():
        raise UsageError(f"ONNX model {args.model!r} does not exist")
    input_shapes = parse_input_shapes(args.input_shape)
    names = [MANIFEST_FILE, GRAPH_FILE, PARAMS_FILE, WEIGHTS_FILES[args.to]]
    outputs = command_outputs(args)
    folder = outputs.folder(args.output, names, "-o")
    outputs.check()  # before the work, not after it
    native = convert_model(args.model, args.to, input_shapes=input_shapes)
    graph = native.source_graph
    with outputs.writing() as stage:
        written = save_converted(native, stage.folder(folder) / "converted")
        for name in names:
            os.replace(written / name, stage.path(folder / name))
        written.rmdir()
    values = sum(int(array.size) for array in graph.params.values())
    print(f"converted {args.model} to {args.to}: a {type(native).__name__} of {len(graph.nodes)} nodes "
          f"({len(graph.layers())} layers; {_op_counts(graph)})")
    inputs = ", ".join(value.name for value in graph.inputs)
    results = ", ".join(value.name for value in graph.outputs)
    print(f"params: {len(graph.params)} arrays, {values:,} values; inputs {inputs}; outputs {results}")
    files = ", ".join(f"{name} ({_size(folder / name)})" for name in sorted(names))
    print(f"wrote {args.output}: {files}")
    print(f"load it with: lowrank_ir.load_converted({args.output!r})")
    return 0


def _model(spec: str) -> Any:
    """An ONNX path as it is; a ``module:factory`` called, its result a PyTorch or MindSpore model."""
    from lowrank_ir import framework_of

    if is_onnx_path(spec):
        if not Path(spec).is_file():
            raise UsageError(f"ONNX model {spec!r} does not exist")
        return spec
    model = load_factory(spec)
    framework_of(model)  # TypeError naming the supported model classes
    return model


def parity(args: argparse.Namespace) -> int:
    """Compare onnxruntime, PyTorch and MindSpore on one model; exit 1 above ``--tolerance``."""
    from lowrank_ir import parity as run_parity
    from lowrank_ir import write_json

    if not args.tolerance >= 0:
        raise UsageError(f"--tolerance must be a number >= 0, got {args.tolerance!r}")
    if args.weights is not None and is_onnx_path(args.model):
        raise UsageError("--weights loads a PyTorch state dict or MindSpore checkpoint into a module:factory "
                         "model; an ONNX model carries its own weights")
    if args.feeds is not None and not Path(args.feeds).is_file():
        raise UsageError(f"--feeds file {args.feeds!r} does not exist")
    if args.weights is not None and not Path(args.weights).is_file():
        raise UsageError(f"--weights file {args.weights!r} does not exist")
    outputs = command_outputs(args)
    report_file = outputs.file(args.report, "--report") if args.report else None
    outputs.check()
    model = _model(args.model)
    ratio = None if args.no_decompose else args.ratio
    report = run_parity(model, feeds=args.feeds, weights=args.weights, ratio=ratio, tolerance=args.tolerance,
                        input_shapes=parse_input_shapes(args.input_shape), seed=args.seed, divisor=args.divisor)
    print(report.table())
    if report_file is not None:
        with outputs.writing() as stage:
            write_json(stage.path(report_file), report.to_dict())
    if not report.ok:
        worst = max(report.failures(), key=lambda row: row.max_rel)
        print(f"lowrank parity: {len(report.failures())} outputs differ from onnxruntime by more than --tolerance "
              f"{args.tolerance:g} (worst: {worst.runtime}, {worst.stage}, max rel {worst.max_rel:.3e})",
              file=sys.stderr)
        return EXIT_ABOVE_TOLERANCE
    return 0
