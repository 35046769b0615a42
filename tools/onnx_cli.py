"""``lowrank inspect MODEL.onnx`` and ``lowrank decompose MODEL.onnx -o OUT.onnx``.

The ONNX path of the command line, as plain steps: load (checked) -> [convert opset] -> lower ->
plan -> [collect statistics on ``--calib`` feeds] -> rewrite -> build -> validate in onnxruntime ->
save atomically. Nothing is written until every step has passed; above ``--tolerance`` the model is
not written (the report is, when asked for) and the exit code is 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from frontends.onnx import PROTOBUF_LIMIT
from tools.common import (
    UsageError,
    chosen_policy,
    command_outputs,
    parse_input_shapes,
    policy_of,
    progress_bars,
    show_report,
)

__all__ = ["EXIT_ABOVE_TOLERANCE", "decompose", "inspect"]

#: Exit code when the decomposed model is further from the original than ``--tolerance``.
EXIT_ABOVE_TOLERANCE = 1


def _describe(model: Any, path: str) -> str:
    from frontends.onnx import count_parameters, input_specs

    opsets = ", ".join(f"{opset.domain or 'ai.onnx'} {opset.version}" for opset in model.opset_import)
    inputs = ", ".join(f"{name} {spec.dtype}[{', '.join('?' if dim is None else str(dim) for dim in spec.shape or ())}]"
                       for name, spec in input_specs(model).items())
    producer = f"{model.producer_name} {model.producer_version}".strip() or "unknown producer"
    return (f"{path}: IR {model.ir_version}, opset {opsets}, {producer}; inputs {inputs}; "
            f"{count_parameters(model):,} float constants")


def inspect(args: argparse.Namespace) -> int:
    """Print the per-layer table of an ONNX model under the policy: shape, rank, params, FLOPs, energy."""
    from backends.onnx import DEFAULT_LAYOUT
    from frontends.onnx import load_model, lower
    from lowrank_ir import build_report, plan, with_forms, with_layout
    from lowrank_ir._report import spectral_energy

    if args.weights:
        raise UsageError("--weights loads a PyTorch state dict; an ONNX model carries its own weights")
    model = load_model(args.model)
    policy, chooser = chosen_policy(args, model)
    graph = lower(model, input_shapes=parse_input_shapes(args.input_shape))
    chosen = with_forms(with_layout(plan(graph, policy), DEFAULT_LAYOUT), chooser.forms if chooser else {})
    show_report(build_report(graph, chosen, energy=spectral_energy(graph, chosen)), args,
                header=_describe(model, args.model))
    return 0


def _feeds(path: str | None, model: Any, what: str) -> dict[str, Any] | None:
    from backends.onnx import load_feeds
    from frontends.onnx import check_feeds

    if path is None:
        return None
    return check_feeds(model, load_feeds(path), f"{what} {path!r}")


def decompose(args: argparse.Namespace) -> int:
    """Decompose an ONNX file, validate it against the original in onnxruntime, save it."""
    from backends.onnx import DEFAULT_LAYOUT, build, convert_opset, save, validate
    from frontends.onnx import collect_stats, count_parameters, load_model, lower
    from lowrank_ir import build_report, plan, rewrite, with_forms, with_layout
    from lowrank_ir._report import report_document, spectra, spectral_energy
    from tools.html_report import check_report_option, write_report

    if args.weights:
        raise UsageError("--weights loads a PyTorch state dict; an ONNX model carries its own weights")
    if not Path(args.output).name.lower().endswith(".onnx"):
        raise UsageError(f"-o {args.output!r}: the decomposed ONNX model is written to a file ending in .onnx")
    if args.tolerance is not None and not args.tolerance >= 0:
        raise UsageError(f"--tolerance must be a number >= 0, got {args.tolerance!r}")
    outputs = command_outputs(args)
    output = outputs.file(args.output, "-o")
    external = outputs.file(f"{args.output}.data", "-o", optional=True)  # written from 2 GB on
    report_file = outputs.file(args.report, "--report") if args.report else None
    outputs.check()
    check_report_option(args.report)
    input_shapes = parse_input_shapes(args.input_shape)
    original = load_model(args.model)
    model = original if args.opset is None else convert_opset(original, args.opset)
    calib = _feeds(args.calib, model, "--calib")
    bars = progress_bars(args)
    policy, chooser = chosen_policy(args, model, calib, progress=bars)
    feeds = _feeds(args.feeds, original, "--feeds")
    known = calib if calib is not None else feeds  # the feeds' shapes resolve dynamic dims (per-sample FLOPs)
    if input_shapes is None and known is not None:
        input_shapes = {name: list(getattr(value, "shape", ())) for name, value in known.items()}
    graph = lower(model, input_shapes=input_shapes)
    # the latency budget may give k x k convs another form, which a decompose_config cannot say
    chosen = with_forms(with_layout(plan(graph, policy), DEFAULT_LAYOUT), chooser.forms if chooser else {})
    if not chosen.decomposed_entries():
        kept = chosen.kept_entries()
        detail = "; ".join(f"{entry.name}: {entry.reason}" for entry in kept[:3])
        raise ValueError(f"no layer of {args.model!r} would be decomposed under {policy.kind!r} "
                         f"({len(graph.layers())} candidate layers{': ' + detail if detail else ''})")
    stats = None
    if calib is not None:
        stats = collect_stats(model, graph, [calib], names=[entry.name for entry in chosen.decomposed_entries()])
    result = rewrite(graph, chosen, stats=stats, progress=bars.layers("rewrite"))
    decomposed = build(result.graph, like=model)
    with outputs.writing() as stage:
        candidate: Any = decomposed
        if decomposed.ByteSize() >= PROTOBUF_LIMIT:  # onnxruntime reads it from disk, with its external data
            candidate = save(decomposed, stage.path(output), external_data=True)
        reference = args.model if original.ByteSize() >= PROTOBUF_LIMIT else original
        bars("validation", 0, 1, "onnxruntime")
        validation = validate(reference, candidate, feeds, input_shapes=input_shapes)
        bars("validation", 1, 1, "onnxruntime")
        report = build_report(graph, chosen, result.errors, spectral_energy(graph, chosen), result.flushed)
        passed = args.tolerance is None or validation.passed(args.tolerance)
        params = {"before": count_parameters(original), "after": count_parameters(decomposed)}
        print(report.table(only_decomposed=True))
        print(validation.table())
        print(f"float constants {params['before']:,} -> {params['after']:,}; worst relative error "
              f"{validation.max_rel:.3e}" + ("" if args.tolerance is None else f" (tolerance {args.tolerance:g})"))
        if report_file is not None:
            document = report_document(
                report, spectra=spectra(graph, chosen, stats), policy=policy_of(args), model=args.model,
                sensitivities=getattr(chooser, "sensitivities", None), latency=getattr(chooser, "latency", None),
                output=args.output, opset=args.opset, data_aware=calib is not None,
                decompose_config=chosen.decompose_config(), parameters=params, validation=validation.to_dict(),
                tolerance=args.tolerance, passed=passed)
            write_report(document, stage.path(report_file), args.report)
        if passed and candidate is decomposed:
            save(decomposed, stage.path(output))
        elif not passed:  # the report is written, the model is not
            stage.drop(output)
            stage.drop(external)
    if not passed:
        print(f"lowrank decompose: the decomposed model is further from the original than --tolerance "
              f"{args.tolerance:g} (worst relative error {validation.max_rel:.3e}); {args.output} not written",
              file=sys.stderr)
        return EXIT_ABOVE_TOLERANCE
    print(f"saved {args.output}")
    return 0
