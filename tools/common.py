"""What the ``lowrank`` commands share: errors, model arguments, rank options, outputs, progress bars.

Every ``tools/*_cli.py`` module imports from here and from the library, never from another command
module, so ``tools/`` has no import cycle (``tests/test_cli_habits.py`` checks it): ``tools.cli``
builds the parser and dispatches to the command modules, which depend on this one only.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

__all__ = ["EXIT_BAD_INPUT", "INPUT_OPTIONS", "ProgressBars", "UsageError", "add_limit_arg", "budget_target",
           "byte_size", "choose_ranks", "chosen_policy", "command_outputs", "excludes_of", "global_policy",
           "is_onnx_path", "load_factory", "load_model", "parse_input_shapes", "policy_of", "progress_bars",
           "rank_policy", "read_rules", "show_report"]

EXIT_BAD_INPUT = 2


class UsageError(ValueError):
    """Bad command-line input: reported as one line, exit code 2."""


#: The files a command may read, by option: an output resolving to one of them is refused.
INPUT_OPTIONS = {"weights": "the --weights file", "dict": "the --dict file", "feeds": "the --feeds file",
                 "calib": "the --calib file", "calib_text": "the --calib-text file"}


# ------------------------------------------------------------------------------------------ model arguments

def is_onnx_path(spec: str) -> bool:
    """Whether the model argument names an ONNX file (rather than a ``module:factory``)."""
    return spec.lower().endswith(".onnx")


def parse_input_shapes(items: list[str] | None) -> dict[str, list[int]] | None:
    """``["x=1,3,640,640", "ids=2x16"]`` -> ``{"x": [1, 3, 640, 640], "ids": [2, 16]}``."""
    if not items:
        return None
    shapes: dict[str, list[int]] = {}
    for item in items:
        name, sep, dims = item.rpartition("=")
        try:
            values = [int(dim) for dim in dims.replace("x", ",").split(",") if dim.strip()]
        except ValueError:
            values = []
        if not sep or not name or not values or any(value < 1 for value in values):
            raise UsageError(f"--input-shape {item!r} must be NAME=D1,D2,... with positive dims, e.g. x=1,3,640,640")
        shapes[name] = values
    return shapes


def load_factory(spec: str) -> Any:
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


def load_model(spec: str, weights: str | None) -> Any:
    """The PyTorch model ``module:factory`` builds, with the ``--weights`` state dict loaded strictly."""
    model = load_factory(spec)
    if weights is not None:
        from backends.torch import load_weights

        load_weights(model, weights)  # strict; a .safetensors or a torch.save file (weights_only)
    return model


def command_outputs(args: argparse.Namespace) -> Any:
    """A ``lowrank_ir._files.Outputs`` for this command: ``--force`` and the files it reads recorded."""
    from lowrank_ir._files import Outputs

    outputs = Outputs(force=getattr(args, "force", False))
    model = getattr(args, "model", None)
    if model is not None and is_onnx_path(model):
        outputs.read(model, "the input model", check=False)  # each command says how a model is missing
    for option, what in INPUT_OPTIONS.items():
        outputs.read(getattr(args, option, None), what)
    return outputs


# ------------------------------------------------------------------------------------------ rank options

def read_rules(file: str) -> Any:
    """The ``--dict`` file's JSON rules, checked (errors name the file and the rule)."""
    from lowrank_ir import Policy
    from lowrank_ir._files import read_json

    path = Path(file)
    if not path.is_file():
        raise UsageError(f"--dict file {file!r} does not exist")
    try:
        rules = read_json(path, f"--dict file {file!r}", schema=dict)
    except ValueError as err:
        raise UsageError(str(err)) from err
    try:
        Policy.from_dict(rules)
    except ValueError as err:
        raise UsageError(f"--dict file {file!r}: {err}") from err
    return rules


def byte_size(text: str) -> int:
    """A ``--max-bytes`` value: bytes, or a size with a unit (``64G``)."""
    from lowrank_ir._limits import parse_size

    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def add_limit_arg(parser: argparse.ArgumentParser) -> None:
    """``--max-bytes``: the most one array (a tensor, a feed, an input of --input-shape) may take."""
    parser.add_argument("--max-bytes", type=byte_size, metavar="SIZE",
                        help="the most one tensor, feed or --input-shape input may take, checked before it is "
                             "read or allocated (e.g. 64G; default half of physical memory)")


def budget_target(text: str) -> float | int:
    """A ``--budget-params``/``--budget-flops`` value: a fraction in (0, 1) or an absolute count."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if 0.0 < value < 1.0:
        return value
    if value >= 1.0 and value == int(value):
        return int(value)
    raise argparse.ArgumentTypeError(f"{text!r} is neither a fraction in (0, 1) nor a whole count >= 1")


def excludes_of(args: argparse.Namespace) -> list[str] | None:
    """``--excludes A,B`` as a list of layer names (None when not given)."""
    return [name for name in (getattr(args, "excludes", None) or "").split(",") if name] or None


def policy_of(args: argparse.Namespace) -> dict[str, Any]:
    """How the command line chose ranks, for ``report.json``'s ``policy``."""
    for kind in ("energy", "budget_params", "budget_flops", "budget_latency", "fixed", "dict"):
        value = getattr(args, kind, None)
        if value is not None:
            break
    else:
        kind, value = ("vbmf", True) if getattr(args, "vbmf", False) else ("ratio", getattr(args, "ratio", None))
    policy = {"kind": kind, "value": value, "divisor": getattr(args, "divisor", None), "excludes": excludes_of(args)}
    for option in ("calib", "calib_text", "max_length", "batch_size", "count_padding"):
        if getattr(args, option, None) not in (None, False):
            policy[option] = getattr(args, option)
    return policy


def global_policy(decomposer: Any, args: argparse.Namespace, datasets: Any = None) -> Any:
    """``--energy`` / ``--budget-*`` applied to ``decomposer`` (a ``Decompose``), or None if none is given."""
    excludes = excludes_of(args)
    if getattr(args, "energy", None) is not None:
        return decomposer.from_energy(args.energy, excludes, args.divisor, datasets=datasets)
    latency = getattr(args, "budget_latency", None)
    if latency is not None:
        return decomposer.from_budget(latency=latency, excludes=excludes, divisor=args.divisor, datasets=datasets,
                                      input_shapes=parse_input_shapes(args.input_shape))
    for kind in ("params", "flops"):
        target = getattr(args, f"budget_{kind}", None)
        if target is not None:
            return decomposer.from_budget(**{kind: target}, excludes=excludes, divisor=args.divisor,
                                          datasets=datasets)
    return None


def rank_policy(args: argparse.Namespace) -> Any:
    """The per-layer ``Policy`` of ``--fixed``, ``--dict``, ``--vbmf`` or ``--ratio`` (the default)."""
    from lowrank_ir import Policy

    excludes = excludes_of(args)
    if args.fixed is not None:
        return Policy.fixed(args.fixed, excludes, args.divisor)
    if args.dict is not None:
        return Policy.from_dict(read_rules(args.dict), excludes, args.divisor)
    if args.vbmf:
        return Policy.vbmf(excludes, args.divisor)
    return Policy.ratio(args.ratio, excludes, args.divisor)


def choose_ranks(decomposer: Any, args: argparse.Namespace, datasets: Any = None) -> Any:
    """``decomposer`` (a ``Decompose``) with the ranks the options ask for; ``datasets`` for the global policies."""
    chosen = global_policy(decomposer, args, datasets)
    return chosen if chosen is not None else decomposer.from_policy(rank_policy(args))


def chosen_policy(args: argparse.Namespace, model: Any = None, calib: dict[str, Any] | None = None,
                  progress: Any = None) -> tuple[Any, Any]:
    """The rank policy the options ask for, and the ``Decompose`` that chose it (None for a per-layer policy).

    ``--energy``/``--budget-*`` are chosen on ``model`` (with ``calib``); that ``Decompose`` holds what they
    measured (``sensitivities``, ``latency``). ``progress``: its progress callback.
    """
    from lowrank_ir import Decompose, Policy

    if model is not None:
        chooser = Decompose(model, progress=progress)
        chosen = global_policy(chooser, args, None if calib is None else [calib])
        if chosen is not None:
            return Policy.config(chosen.decompose_config), chooser
    return rank_policy(args), None


# ------------------------------------------------------------------------------------------ showing results

def show_report(report: Any, args: argparse.Namespace, header: str | None = None) -> None:
    """Print ``report`` as its table (after ``header``), or as JSON with ``--json``."""
    if getattr(args, "json", False):
        print(json.dumps(report.to_dict(), indent=2))
        return
    if header is not None:
        print(header)
    print(report.table())


class ProgressBars:
    """tqdm bars on ``stream`` for the library's ``progress(phase, done, total, item)`` callbacks.

    One bar per phase (calibration batches, sensitivity runs, layers rewritten, validation runs): a new
    phase closes the previous bar. The library only calls back; the bars are drawn here. ``close()``
    (or leaving the ``with`` block) closes the last one. ``total`` 0 means "not known in advance".
    """

    #: What each phase counts, as its bar says it.
    LABELS = {"calibration": "calibrating (batches)", "sensitivity": "measuring sensitivities (layers)",
              "rewrite": "decomposing (layers)", "refine": "refining in order (layers)",
              "validation": "validating (runs)", "reading": "reading (layers)"}

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._bar: Any = None
        self._phase: str | None = None

    def __call__(self, phase: str, done: int, total: int, item: str = "") -> None:
        from tqdm import tqdm

        if phase != self._phase or self._bar is None:
            self.close()
            self._phase = phase
            self._bar = tqdm(total=total or None, desc=self.LABELS.get(phase, phase), file=self.stream,
                             leave=True, dynamic_ncols=True, unit="")
        bar = self._bar
        if total and bar.total != total:
            bar.total = total
        bar.set_postfix_str(item[:40], refresh=False)
        bar.update(max(done - bar.n, 0))
        if total and done >= total:
            self.close()

    def layers(self, phase: str) -> Callable[[int, int, str], None]:
        """A ``progress(done, total, name)`` callback (the library's per-layer form) drawing ``phase``'s bar."""
        def show(done: int, total: int, name: str) -> None:
            self(phase, done, total, name)
        return show

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar, self._phase = None, None

    def __enter__(self) -> ProgressBars:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _NoBars:
    """The callbacks of :class:`ProgressBars` that draw nothing (not a terminal, or ``--no-progress``)."""

    def __call__(self, phase: str, done: int, total: int, item: str = "") -> None:
        return None

    def layers(self, phase: str) -> None:
        return None

    def close(self) -> None:
        return None

    def __enter__(self) -> _NoBars:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def progress_bars(args: argparse.Namespace | None = None, stream: TextIO | None = None) -> Any:
    """Progress bars on stderr when it is a terminal and ``-q`` is not given, or always with ``--progress``.

    Returns a :class:`ProgressBars` (a ``progress(phase, done, total, item)`` callback with ``.layers(phase)``
    for per-layer callbacks), or an object with the same calls that draws nothing.
    """
    stream = stream or sys.stderr
    forced = bool(getattr(args, "progress", False))
    if not forced and (getattr(args, "quiet", False) or not stream.isatty()):
        return _NoBars()
    return ProgressBars(stream)

