"""The ``lowrank`` command line.

Commands:
  demo        the main job on a built-in model (no downloads)
  decompose   decompose a PyTorch model given as ``module:factory`` (+ weights) and save it, or an ONNX
              file (``MODEL.onnx -o OUT.onnx``, validated in onnxruntime; see ``tools/onnx_cli.py``)
  inspect     per-layer table of a model: shapes, chosen ranks, parameters and FLOPs before/after

Bad input gives one line on stderr and exit code 2; nothing half-written is left behind.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]

EXIT_BAD_INPUT = 2


class UsageError(ValueError):
    """Bad command-line input: reported as one line, exit code 2."""


def _load_factory(spec: str) -> Any:
    """Call ``module:factory`` (e.g. ``tests.models:resnet50``) and return the model it builds."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise UsageError(f"model {spec!r} must be 'module:factory', e.g. 'tests.models:resnet50'")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UsageError(f"cannot import module {module_name!r} of {spec!r}: {err}") from err
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise UsageError(f"{module_name!r} has no callable {attribute!r}")
    return factory()


def _load_model(spec: str, weights: str | None) -> Any:
    model = _load_factory(spec)
    if weights is not None:
        import torch

        path = Path(weights)
        if not path.is_file():
            raise UsageError(f"weights file {weights!r} does not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise UsageError(f"cannot read weights {weights!r}: {err}") from err
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0:3]
            raise UsageError(f"weights {weights!r} do not fit {spec!r}: {' '.join(first)}") from err
    return model


def read_rules(file: str) -> Any:
    """The ``--dict`` file's JSON rules."""
    path = Path(file)
    if not path.is_file():
        raise UsageError(f"--dict file {file!r} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UsageError(f"--dict file {file!r} is not valid JSON: {err}") from err


def _choose(decomposer: Any, args: argparse.Namespace) -> Any:
    excludes = [name for name in (args.excludes or "").split(",") if name] or None
    if args.fixed is not None:
        return decomposer.from_fixed(args.fixed, excludes, args.divisor)
    if args.dict is not None:
        return decomposer.from_dict(read_rules(args.dict), excludes, args.divisor)
    if args.vbmf:
        return decomposer.from_vbmf(excludes, args.divisor)
    return decomposer.from_ratio(args.ratio, excludes, args.divisor)


def _add_policy_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--ratio", type=float, default=0.5,
                       help="keep this fraction of each layer's parameters (default 0.5)")
    group.add_argument("--fixed", type=int, help="the same rank for every layer")
    group.add_argument("--dict", metavar="FILE", help='JSON file of {"regex": rank | ratio | "vbmf"} rules')
    group.add_argument("--vbmf", action="store_true", help="ranks estimated by EVBMF from the weights")
    parser.add_argument("--excludes", metavar="A,B", help="comma-separated layer names to leave alone")
    parser.add_argument("--divisor", type=int, default=64,
                        help="round ranks to multiples of this (1 disables; default 64)")
    parser.add_argument("--input-shape", action="append", metavar="NAME=D1,D2,...",
                        help="ONNX: fix a dynamic input's dims (for per-sample FLOPs and random validation "
                             "feeds); repeat for each input")


def _progress_bar(label: str) -> Any:
    """A one-line progress bar on stderr (only when stderr is a terminal), as a ``progress`` callback."""
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int, name: str) -> None:
        filled = 30 * done // max(total, 1)
        end = "\n" if done == total else ""
        sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total} {name[:40]:<40}{end}")
        sys.stderr.flush()
    return show


def _cmd_demo(args: argparse.Namespace) -> int:
    from tools.demo import run_demo

    run_demo(out=args.out, ratio=args.ratio, framework=args.framework, divisor=args.divisor)
    return 0


def _onnx_only(args: argparse.Namespace, names: Sequence[str]) -> None:
    given = [f"--{name.replace('_', '-')}" for name in names if getattr(args, name, None) is not None]
    if given:
        raise UsageError(f"{', '.join(given)} apply to ONNX models (MODEL.onnx), not to {args.model!r}")


def _cmd_inspect(args: argparse.Namespace) -> int:
    from lowrank_ir import Decompose
    from tools import onnx_cli

    if onnx_cli.is_onnx_path(args.model):
        return onnx_cli.inspect(args)
    _onnx_only(args, ["input_shape"])
    model = _load_model(args.model, args.weights)
    decomposer = _choose(Decompose(model), args)
    print(decomposer.report.table())
    return 0


def _cmd_decompose(args: argparse.Namespace) -> int:
    from tools import onnx_cli

    if onnx_cli.is_onnx_path(args.model):
        return onnx_cli.decompose(args)
    _onnx_only(args, ["input_shape", "calib", "feeds", "tolerance", "opset"])
    import torch

    from lowrank_ir import Decompose, SafeWriteUmask, write_json
    from lowrank_ir._files import atomic_directory

    model = _load_model(args.model, args.weights)
    decomposer = _choose(Decompose(model), args)
    decomposed = decomposer.decompose_network(progress=_progress_bar("decomposing"))
    with atomic_directory(args.output) as folder:
        with SafeWriteUmask():
            torch.save(decomposed.state_dict(), folder / "state_dict.pt")
        write_json(folder / "decompose_config.json", decomposer.decompose_config)
        write_json(folder / "report.json", decomposer.report.to_dict())
    if args.report:
        write_json(args.report, decomposer.report.to_dict())
    print(decomposer.report.table(only_decomposed=True))
    print(f"saved state_dict.pt, decompose_config.json and report.json in {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lowrank",
        description="Make trained neural networks smaller and faster by low-rank decomposition.",
        epilog="Start with 'lowrank demo'. Each command has its own --help.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser("demo", help="decompose a built-in model and show what changed",
                               description="Decompose a built-in CNN + MLP at --ratio, print the per-layer "
                                           "table and the agreement with the original, save the results.")
    demo.add_argument("--out", metavar="DIR", help="folder for the results (default: a new temporary folder)")
    demo.add_argument("--ratio", type=float, default=0.5, help="parameter ratio per layer (default 0.5)")
    demo.add_argument("--divisor", type=int, default=16, help="round ranks to multiples of this (default 16)")
    demo.add_argument("--framework", default="torch", choices=["torch", "mindspore"],
                      help="framework of the demo model (the same model and weights in both; default torch)")
    demo.set_defaults(run=_cmd_demo)

    inspect = commands.add_parser("inspect", help="per-layer table of a model under a rank policy",
                                  description="Print each layer's shape, chosen rank, parameters and FLOPs "
                                              "before/after, or why it is left alone.")
    inspect.add_argument("model", help="an ONNX file (MODEL.onnx), or a PyTorch model as 'module:factory' "
                                       "(e.g. tests.models:resnet50)")
    inspect.add_argument("--weights", metavar="FILE", help="state dict (.pt) to load into the model")
    _add_policy_args(inspect)
    inspect.set_defaults(run=_cmd_inspect)

    decompose = commands.add_parser(
        "decompose", help="decompose a model and save it",
        description="Decompose an ONNX model (MODEL.onnx -o OUT.onnx: checked, validated against the original "
                    "in onnxruntime, written atomically), or a PyTorch model given as module:factory (its state "
                    "dict, decompose_config.json and report.json saved in the -o folder).")
    decompose.add_argument("model", help="an ONNX file (MODEL.onnx), or a PyTorch model as 'module:factory' "
                                         "(e.g. tests.models:resnet50)")
    decompose.add_argument("--weights", metavar="FILE", help="PyTorch: state dict (.pt) to load into the model")
    decompose.add_argument("-o", "--output", required=True, metavar="OUT",
                           help="ONNX: the decomposed model's file (OUT.onnx); PyTorch: the output folder")
    decompose.add_argument("--report", metavar="FILE.json", help="also write the report here")
    _add_policy_args(decompose)
    decompose.add_argument("--calib", metavar="FEEDS.npz",
                           help="ONNX: calibration feeds (one array per input, by name) for data-aware "
                                "decomposition; layer inputs are collected with onnxruntime")
    decompose.add_argument("--feeds", metavar="FEEDS.npz",
                           help="ONNX: feeds to validate on (default: random feeds from the input specs)")
    decompose.add_argument("--tolerance", type=float, metavar="REL",
                           help="ONNX: exit with code 1 (and write no model) when an output's relative error "
                                "max|d|/max|ref| exceeds this")
    decompose.add_argument("--opset", type=int, metavar="N",
                           help="ONNX: convert the model to this opset first (onnx.version_converter)")
    decompose.set_defaults(run=_cmd_decompose)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except (UsageError, ValueError, TypeError, OSError, ImportError) as err:
        print(f"lowrank {args.command}: error: {err}".splitlines()[0], file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
