"""``lowrank convert MODEL.onnx --to torch|mindspore -o OUT`` and ``lowrank parity MODEL``.

Both are thin: the work is ``lowrank_ir.convert`` / ``save_converted`` and ``lowrank_ir.parity``.
``convert`` writes a folder that ``lowrank_ir.load_converted`` turns back into a trainable model;
``parity`` prints a table of how far PyTorch, MindSpore (and the model's own framework) are from
onnxruntime, before and after decomposition, and exits 0 within ``--tolerance``, 1 above it.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from tools.cli import UsageError, _load_factory

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
    from lowrank_ir import convert as convert_model
    from lowrank_ir import save_converted
    from lowrank_ir._convert import check_output_folder
    from tools.onnx_cli import is_onnx_path, parse_input_shapes

    if args.to not in TARGETS:
        raise UsageError(f"--to {args.to!r}: choose torch or mindspore")
    if not is_onnx_path(args.model):
        raise UsageError(f"convert takes an ONNX file (MODEL.onnx), got {args.model!r}; export a PyTorch or "
                         f"MindSpore model first (backends.onnx.export), or check it with 'lowrank parity'")
    if not Path(args.model).is_file():
        raise UsageError(f"ONNX model {args.model!r} does not exist")
    input_shapes = parse_input_shapes(args.input_shape)
    check_output_folder(args.output)  # before the work, not after it
    native = convert_model(args.model, args.to, input_shapes=input_shapes)
    graph = native.source_graph
    folder = save_converted(native, args.output)
    values = sum(int(array.size) for array in graph.params.values())
    print(f"converted {args.model} to {args.to}: a {type(native).__name__} of {len(graph.nodes)} nodes "
          f"({len(graph.layers())} layers; {_op_counts(graph)})")
    inputs = ", ".join(value.name for value in graph.inputs)
    outputs = ", ".join(value.name for value in graph.outputs)
    print(f"params: {len(graph.params)} arrays, {values:,} values; inputs {inputs}; outputs {outputs}")
    files = ", ".join(f"{path.name} ({_size(path)})" for path in sorted(folder.iterdir()))
    print(f"wrote {folder}: {files}")
    print(f"load it with: lowrank_ir.load_converted({str(folder)!r})")
    return 0


def _model(spec: str) -> Any:
    """An ONNX path as it is; a ``module:factory`` called, its result a PyTorch or MindSpore model."""
    from lowrank_ir import framework_of
    from tools.onnx_cli import is_onnx_path

    if is_onnx_path(spec):
        if not Path(spec).is_file():
            raise UsageError(f"ONNX model {spec!r} does not exist")
        return spec
    model = _load_factory(spec)
    framework_of(model)  # TypeError naming the supported model classes
    return model


def parity(args: argparse.Namespace) -> int:
    """Compare onnxruntime, PyTorch and MindSpore on one model; exit 1 above ``--tolerance``."""
    from lowrank_ir import parity as run_parity
    from lowrank_ir import write_json
    from tools.onnx_cli import is_onnx_path, parse_input_shapes

    if not args.tolerance >= 0:
        raise UsageError(f"--tolerance must be a number >= 0, got {args.tolerance!r}")
    if args.weights is not None and is_onnx_path(args.model):
        raise UsageError("--weights loads a PyTorch state dict or MindSpore checkpoint into a module:factory "
                         "model; an ONNX model carries its own weights")
    if args.feeds is not None and not Path(args.feeds).is_file():
        raise UsageError(f"--feeds file {args.feeds!r} does not exist")
    if args.weights is not None and not Path(args.weights).is_file():
        raise UsageError(f"--weights file {args.weights!r} does not exist")
    model = _model(args.model)
    ratio = None if args.no_decompose else args.ratio
    report = run_parity(model, feeds=args.feeds, weights=args.weights, ratio=ratio, tolerance=args.tolerance,
                        input_shapes=parse_input_shapes(args.input_shape), seed=args.seed, divisor=args.divisor)
    print(report.table())
    if args.report:
        write_json(args.report, report.to_dict())
    if not report.ok:
        worst = max(report.failures(), key=lambda row: row.max_rel)
        print(f"lowrank parity: {len(report.failures())} outputs differ from onnxruntime by more than --tolerance "
              f"{args.tolerance:g} (worst: {worst.runtime}, {worst.stage}, max rel {worst.max_rel:.3e})",
              file=sys.stderr)
        return EXIT_ABOVE_TOLERANCE
    return 0
