"""``lowrank bench ORIGINAL DECOMPOSED``: latency of a model and its decomposed version, side by side.

ONNX files run in onnxruntime; PyTorch models (``module:factory``, the decomposed one as another
``module:factory`` or the folder ``lowrank decompose`` wrote) run in eager mode under
``torch.inference_mode`` with ``--threads`` intra-op threads, timed with the same interleaving
(``backends.latency.interleaved_calls``); ``--per-layer`` is for ONNX files only.

Both models run in one process on the same feeds, each in its own CPU session with ``--threads``
intra-op threads (``backends.latency``: one inter-op thread, sequential execution). After
``--warmup`` runs of each, the ``--runs`` timed runs are interleaved in pairs whose order alternates
(original first, then decomposed first, ...), so a change of machine load between runs falls on
both models alike. The
figures are the median latency of each model, its spread (min, quartiles, max), the latency ratio
(decomposed median / original median), the median of the per-pair ratios (robust to load that
changes slowly), and the speedup (original median / decomposed median).

``--per-layer`` adds a layer table from onnxruntime's profiler (``SessionOptions.enable_profiling``,
separate sessions, so profiling does not slow the timed runs): each node's mean kernel time per run
in the original beside the decomposed model's, where a factorized layer sums its parts (``conv.0``,
``conv.1``, ... for ``conv``, from the decomposed model's ``lowrank_ir.factorized`` metadata), and
kernels onnxruntime's optimiser renamed after a node or its output are counted to that node (the
profiler's times are wall time, whatever ``--clock`` says).
``--json FILE`` writes every figure (``-`` prints it). ``--clock``: wall or CPU time (by default CPU
time with one thread: on a shared machine other processes do not inflate it; see ``backends.latency``).

Bad input (a missing or unreadable file, models that take different inputs, an ``--input-shape`` or
feeds that do not fit) is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tools.common import UsageError, is_onnx_path, load_factory, load_model, parse_input_shapes

__all__ = ["BenchResult", "LayerTime", "Timing", "add_parser", "bench", "bench_command"]

#: Per-pair ratios and medians are what to read on a shared machine; these are the defaults.
DEFAULT_RUNS = 20
DEFAULT_WARMUP = 3


@dataclass(slots=True)
class Timing:
    """One model's timed runs, in milliseconds."""

    path: str
    times_ms: list[float]

    @property
    def median_ms(self) -> float:
        return float(np.median(self.times_ms))

    def spread(self) -> dict[str, float]:
        """min, first quartile, third quartile and max of the runs (ms)."""
        low, q25, q75, high = np.percentile(self.times_ms, [0, 25, 75, 100])
        return {"min_ms": float(low), "q25_ms": float(q25), "q75_ms": float(q75), "max_ms": float(high)}

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "median_ms": self.median_ms, **self.spread(), "times_ms": self.times_ms}


@dataclass(slots=True)
class LayerTime:
    """A layer (an original node) and its mean kernel time per run in each model (ms); None where it has none."""

    name: str
    op: str
    original_ms: float | None
    decomposed_ms: float | None
    kernels: int = 0  # how many profiled kernels the decomposed time sums


@dataclass(slots=True)
class BenchResult:
    """Everything ``bench`` measured."""

    original: Timing
    decomposed: Timing
    threads: int
    warmup: int
    inputs: dict[str, list[int]]
    version: str  # the runtime's version
    load_average: list[float]
    cpus: int
    clock: str = "wall"
    layers: list[LayerTime] = field(default_factory=list)
    runtime: str = "onnxruntime"  # or "torch" (eager mode)

    @property
    def latency_ratio(self) -> float:
        """Decomposed median / original median."""
        return self.decomposed.median_ms / self.original.median_ms

    @property
    def paired_ratio(self) -> float:
        """Median over the interleaved pairs of decomposed time / original time."""
        pairs = np.asarray(self.decomposed.times_ms) / np.asarray(self.original.times_ms)
        return float(np.median(pairs))

    @property
    def speedup(self) -> float:
        return self.original.median_ms / self.decomposed.median_ms

    def to_dict(self) -> dict[str, Any]:
        return {
            "runtime": self.runtime, "version": self.version, "threads": self.threads,
            "runs": len(self.original.times_ms), "warmup": self.warmup, "inputs": self.inputs,
            "load_average": self.load_average, "cpus": self.cpus, "clock": self.clock,
            "original": self.original.to_dict(), "decomposed": self.decomposed.to_dict(),
            "latency_ratio": self.latency_ratio, "paired_ratio": self.paired_ratio, "speedup": self.speedup,
            "per_layer": [asdict(layer) for layer in self.layers],
        }

    def table(self) -> str:
        inputs = ", ".join(f"{name}[{','.join(str(dim) for dim in dims)}]" for name, dims in self.inputs.items())
        clock = "CPU time" if self.clock == "cpu" else "wall time"
        lines = [f"{self.runtime} {self.version}, CPU, {self.threads} intra-op thread(s), "
                 f"{len(self.original.times_ms)} interleaved runs after {self.warmup} warm-up, {clock}; inputs "
                 f"{inputs}; load average {self.load_average[0]:.2f} on {self.cpus} CPUs",
                 f"{'model':<11}{'median ms':>11}{'min':>10}{'q25':>10}{'q75':>10}{'max':>10}  file"]
        for label, timing in (("original", self.original), ("decomposed", self.decomposed)):
            spread = timing.spread()
            lines.append(f"{label:<11}{timing.median_ms:>11.3f}{spread['min_ms']:>10.3f}{spread['q25_ms']:>10.3f}"
                         f"{spread['q75_ms']:>10.3f}{spread['max_ms']:>10.3f}  {timing.path}")
        lines.append(f"latency ratio {self.latency_ratio:.3f} (median of paired ratios {self.paired_ratio:.3f}); "
                     f"speedup {self.speedup:.3f}x")
        if self.layers:
            lines.append("")
            lines.append(_layer_table(self.layers))
        return "\n".join(lines)


def _layer_table(layers: Sequence[LayerTime]) -> str:
    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    width = max(len("node"), *(len(layer.name) for layer in layers))
    op_width = max(len("op"), *(len(layer.op) for layer in layers))
    lines = [f"{'node':<{width}}  {'op':<{op_width}}  {'original ms':>12}  {'decomposed ms':>14}  kernels"]
    for layer in layers:
        lines.append(f"{layer.name:<{width}}  {layer.op:<{op_width}}  {cell(layer.original_ms):>12}  "
                     f"{cell(layer.decomposed_ms):>14}  {layer.kernels or ''}")
    return "\n".join(lines).rstrip()


# ------------------------------------------------------------------------------------------ inputs

def _check_same_inputs(original: Any, decomposed: Any, paths: Sequence[str]) -> None:
    from frontends.onnx import input_specs

    specs = [{name: (spec.dtype, list(spec.shape or ())) for name, spec in input_specs(model).items()}
             for model in (original, decomposed)]
    if specs[0] != specs[1]:
        raise UsageError(f"the models take different inputs: {paths[0]!r} takes {_show_specs(specs[0])}, "
                         f"{paths[1]!r} takes {_show_specs(specs[1])}; bench compares two versions of one model")


def _show_specs(specs: Mapping[str, tuple[Any, list[Any]]]) -> str:
    return ", ".join(f"{name} {dtype}[{','.join('?' if dim is None else str(dim) for dim in shape)}]"
                     for name, (dtype, shape) in specs.items()) or "no inputs"


def _feeds(model: Any, feeds: Mapping[str, np.ndarray] | None,
           input_shapes: Mapping[str, Sequence[int]] | None) -> dict[str, Any]:
    from backends.onnx import random_feeds
    from frontends.onnx import check_feeds, input_specs

    specs = input_specs(model)
    if feeds is not None:
        if input_shapes:
            raise UsageError("give either --feeds or --input-shape: the feeds fix the input shapes")
        return check_feeds(model, feeds, "--feeds")
    unknown = [name for name in input_shapes or {} if name not in specs]
    if unknown:
        raise UsageError(f"--input-shape names inputs the model does not have: {unknown}; it takes {list(specs)}")
    for name, dims in (input_shapes or {}).items():
        rank = specs[name].shape
        if rank is not None and len(dims) != len(rank):
            raise UsageError(f"--input-shape {name}={','.join(str(dim) for dim in dims)} has {len(dims)} dims, "
                             f"input {name!r} has {len(rank)}")
    return check_feeds(model, random_feeds(model, input_shapes), "--input-shape")


# ------------------------------------------------------------------------------------------ profiling

def _profile(model: Any, feeds: Mapping[str, Any], threads: int, runs: int) -> dict[str, tuple[str, float]]:
    """Profiled kernel name -> (op type, mean kernel time per run in ms), from onnxruntime's profiler."""
    from backends.latency import time_run, timing_session

    with tempfile.TemporaryDirectory(prefix="lowrank-bench-") as folder:
        sess = timing_session(model, threads, profile_dir=folder)
        for _ in range(runs):
            time_run(sess, feeds, "the feeds (profiled)")
        events = json.loads(Path(sess.end_profiling()).read_text())
    totals: dict[str, tuple[str, float]] = {}
    for event in events:
        name = str(event.get("name", ""))
        if event.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        node = name[: -len("_kernel_time")]
        op, total = totals.get(node, (str(event.get("args", {}).get("op_name", "")), 0.0))
        totals[node] = (op, total + float(event.get("dur", 0)) / 1000.0)
    return {node: (op, total / runs) for node, (op, total) in totals.items()}


def _layer_names(model: Any) -> dict[str, str]:
    """Node names and output names of ``model`` -> the layer they belong to.

    A factorized part (the model's ``lowrank_ir.factorized`` metadata) belongs to its source layer; every
    other node is its own layer.
    """
    from backends.onnx import METADATA_KEY

    recorded = next((prop.value for prop in model.metadata_props if prop.key == METADATA_KEY), "{}")
    owner = {part: layer for layer, parts in json.loads(recorded).items() for part in parts}
    names: dict[str, str] = {}
    for node in model.graph.node:
        layer = owner.get(node.name, node.name)
        for output in node.output:
            names.setdefault(output, layer)
        if node.name:
            names[node.name] = layer
    return names


def _owner(kernel: str, names: Mapping[str, str]) -> str:
    """The layer of a profiled kernel; unknown kernels keep their name.

    onnxruntime names optimised kernels after a node or its output, with a suffix (``conv_out_nchwc``,
    ``matmul/MatmulTransposeFusion/``).
    """
    if kernel in names:
        return names[kernel]
    for cut in range(len(kernel) - 1, 0, -1):
        if kernel[cut] in "_/:" and kernel[:cut] in names:
            return names[kernel[:cut]]
    return kernel


def _by_layer(profile: Mapping[str, tuple[str, float]], names: Mapping[str, str]) -> dict[str, tuple[str, float, int]]:
    """Layer -> (op types, total ms, kernels) over a profile."""
    layers: dict[str, tuple[set[str], float, int]] = {}
    for kernel, (op, time_ms) in profile.items():
        ops, total, count = layers.get(_owner(kernel, names), (set(), 0.0, 0))
        layers[_owner(kernel, names)] = (ops | {op}, total + time_ms, count + 1)
    return {layer: ("+".join(sorted(ops)), total, count) for layer, (ops, total, count) in layers.items()}


def _layer_times(original: Mapping[str, tuple[str, float, int]],
                 decomposed: Mapping[str, tuple[str, float, int]]) -> list[LayerTime]:
    """One row per layer of either model, slowest first; ``parts`` counts the decomposed kernels."""
    rows = []
    for layer in [*original, *(name for name in decomposed if name not in original)]:
        before, after = original.get(layer), decomposed.get(layer)
        op = (before or after or ("", 0.0, 0))[0]
        rows.append(LayerTime(layer, op, None if before is None else before[1], None if after is None else after[1],
                              0 if after is None else after[2]))
    return sorted(rows, key=lambda row: -max(row.original_ms or 0.0, row.decomposed_ms or 0.0))


# ------------------------------------------------------------------------------------------ bench

def bench(original: str | os.PathLike[str], decomposed: str | os.PathLike[str], *,
          feeds: Mapping[str, np.ndarray] | None = None, input_shapes: Mapping[str, Sequence[int]] | None = None,
          threads: int = 1, runs: int = DEFAULT_RUNS, warmup: int = DEFAULT_WARMUP,
          per_layer: bool = False, clock: str = "auto") -> BenchResult:
    """Time two ONNX files in onnxruntime with interleaved runs (see the module docstring).

    ``feeds`` (input name -> array) or random feeds whose dynamic dims ``input_shapes`` fixes. ``clock``:
    ``wall``, ``cpu`` or ``auto`` (``backends.latency``: CPU time with one thread, else wall time).
    Raises ``UsageError``/``ValueError``/``OSError`` naming the problem for bad input, before any run.
    """
    import onnxruntime as ort

    from backends.latency import interleaved_times, timing_session
    from frontends.onnx import load_model

    clock = _check_counts(threads, runs, warmup, clock)
    paths = [os.fspath(original), os.fspath(decomposed)]
    for path in paths:
        if not path.lower().endswith(".onnx"):
            raise UsageError(f"{path!r} is not an ONNX file (MODEL.onnx); bench times ONNX models")
    models = [load_model(path) for path in paths]
    _check_same_inputs(models[0], models[1], paths)
    checked = _feeds(models[0], feeds, input_shapes)
    sessions = [timing_session(model, threads) for model in models]
    times = interleaved_times(sessions, checked, runs, warmup,
                              ["the feeds (original model)", "the feeds (decomposed model)"], clock)
    layers = []
    if per_layer:
        original_layers, decomposed_layers = (_by_layer(_profile(model, checked, threads, min(runs, 10)),
                                                        _layer_names(model)) for model in models)
        layers = _layer_times(original_layers, decomposed_layers)
    shapes = {name: [int(dim) for dim in np.shape(value)] for name, value in checked.items()}
    return BenchResult(Timing(paths[0], times[0]), Timing(paths[1], times[1]), threads, warmup, shapes,
                       ort.__version__, [round(value, 2) for value in os.getloadavg()], os.cpu_count() or 1, clock,
                       layers)


def _check_counts(threads: int, runs: int, warmup: int, clock: str) -> str:
    """``UsageError`` for a count that is not an int at least its least value; the clock resolved."""
    from backends.latency import resolve_clock

    for label, value, least in (("threads", threads, 1), ("runs", runs, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise UsageError(f"--{label} must be an integer >= {least}, got {value!r}")
    return resolve_clock(clock, threads)


#: The state dict files ``lowrank decompose module:factory -o DIR`` may write in ``DIR``.
_DECOMPOSED_WEIGHTS = ("state_dict.safetensors", "state_dict.pt")


def _torch_decomposed(spec: str, source: Any) -> Any:
    """The decomposed model ``spec`` names: a ``module:factory``, or a ``lowrank decompose`` output folder.

    From a folder the decomposed structure is rebuilt from ``source`` (the original model) and the
    folder's ``decompose_config.json``, and its state dict is loaded, strictly.
    """
    from backends.torch import load_weights
    from lowrank_ir import Decompose

    folder = Path(spec)
    if not folder.is_dir():
        return load_factory(spec)
    config = folder / "decompose_config.json"
    weights = next((folder / name for name in _DECOMPOSED_WEIGHTS if (folder / name).is_file()), None)
    if not config.is_file() or weights is None:
        raise UsageError(f"folder {spec!r} is not what 'lowrank decompose module:factory -o DIR' writes: it needs "
                         f"decompose_config.json and one of {', '.join(_DECOMPOSED_WEIGHTS)}")
    structure = Decompose(source, config_file=config).from_file().decompose_network(do_decompose_weight=False)
    return load_weights(structure, weights).eval()


def bench_torch(original: str, decomposed: str | os.PathLike[str], *, weights: str | None = None,
                feeds: Mapping[str, np.ndarray] | None = None, input_shapes: Mapping[str, Sequence[int]] | None = None,
                threads: int = 1, runs: int = DEFAULT_RUNS, warmup: int = DEFAULT_WARMUP,
                clock: str = "auto") -> BenchResult:
    """Time a PyTorch model against its decomposed version in eager mode, interleaved as :func:`bench` does.

    ``original`` is ``module:factory`` (with ``weights``, a state dict file, loaded); ``decomposed`` another
    ``module:factory`` or the folder ``lowrank decompose module:factory -o DIR`` wrote. Inputs: ``feeds``
    (arrays passed positionally, in their order) or random normal ones (seed 0) of ``input_shapes`` (in
    their order; the names only label them). ``threads``: torch intra-op threads, restored afterwards.
    """
    import torch

    from backends.latency import interleaved_calls

    clock = _check_counts(threads, runs, warmup, clock)
    if os.fspath(decomposed).lower().endswith(".onnx"):
        raise UsageError(f"{os.fspath(decomposed)!r} is an ONNX file and {original!r} a PyTorch model: bench "
                         f"compares two versions of one model in one runtime (export both, or give the decomposed "
                         f"PyTorch model)")
    if feeds is not None and input_shapes:
        raise UsageError("give either --feeds or --input-shape: the feeds fix the input shapes")
    if not feeds and not input_shapes:
        raise UsageError("a PyTorch model needs its inputs: --input-shape NAME=D1,D2,... (one per forward "
                         "argument, in order) or --feeds FEEDS.npz")
    source = load_model(original, weights).eval()
    models = [source, _torch_decomposed(os.fspath(decomposed), source).eval()]
    generator = torch.Generator().manual_seed(0)
    arrays = dict(feeds) if feeds is not None else {
        name: torch.randn(*[int(dim) for dim in dims], generator=generator).numpy()
        for name, dims in (input_shapes or {}).items()}
    inputs = [torch.from_numpy(np.ascontiguousarray(array)) for array in arrays.values()]
    labels = [f"{original!r}", f"{os.fspath(decomposed)!r}"]
    before = torch.get_num_threads()

    def call(index: int) -> None:
        try:
            models[index](*inputs)
        except Exception as err:  # a model raises whatever its layers raise on inputs that do not fit
            shapes = {name: list(np.shape(array)) for name, array in arrays.items()}
            raise ValueError(f"model {labels[index]} cannot run on inputs {shapes}: "
                             f"{str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}"
                             ) from err

    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            times = interleaved_calls([lambda: call(0), lambda: call(1)], runs, warmup, clock)
    finally:
        torch.set_num_threads(before)
    shapes = {name: [int(dim) for dim in np.shape(array)] for name, array in arrays.items()}
    return BenchResult(Timing(original, times[0]), Timing(os.fspath(decomposed), times[1]), threads, warmup, shapes,
                       torch.__version__, [round(value, 2) for value in os.getloadavg()], os.cpu_count() or 1, clock,
                       runtime="torch")


def bench_command(args: argparse.Namespace) -> int:
    """``lowrank bench``: print the table (and write ``--json``)."""
    from backends.onnx import load_feeds
    from lowrank_ir import write_json

    feeds = load_feeds(args.feeds) if args.feeds else None
    input_shapes = parse_input_shapes(args.input_shape)
    if is_onnx_path(args.original):
        if args.weights:
            raise UsageError("--weights loads a state dict into a module:factory model; an ONNX file holds its own")
        result = bench(args.original, args.decomposed, feeds=feeds, input_shapes=input_shapes, threads=args.threads,
                       runs=args.runs, warmup=args.warmup, per_layer=args.per_layer, clock=args.clock)
    else:
        if ":" not in args.original or Path(args.original).exists():
            raise UsageError(f"{args.original!r} is not an ONNX file (MODEL.onnx) nor a PyTorch model given as "
                             f"module:factory; bench times one of those against its decomposed version")
        if args.per_layer:
            raise UsageError("--per-layer reads onnxruntime's profiler: ONNX models only (export the model with "
                             "backends.onnx.export to see its layers)")
        result = bench_torch(args.original, args.decomposed, weights=args.weights, feeds=feeds,
                             input_shapes=input_shapes, threads=args.threads, runs=args.runs, warmup=args.warmup,
                             clock=args.clock)
    if args.json == "-":
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    print(result.table())
    if args.json:
        write_json(args.json, result.to_dict())
    return 0


def add_parser(commands: Any) -> None:
    """Register ``bench`` on the ``lowrank`` command line's subparsers."""
    parser = commands.add_parser(
        "bench", help="time a model against its decomposed version (onnxruntime, or PyTorch eager mode)",
        description="Run ORIGINAL and DECOMPOSED on the same feeds with interleaved runs (ONNX files in "
                    "onnxruntime, PyTorch models in eager mode), and print each model's median latency, its "
                    "spread, the latency ratio and the speedup.",
        epilog="examples: lowrank bench model.onnx small.onnx --input-shape x=8,3,48,320 --threads 1 --runs 30; "
               "lowrank bench tests.models:resnet50 out/ --input-shape x=1,3,224,224 (out/ from "
               "'lowrank decompose tests.models:resnet50 -o out')")
    parser.add_argument("original", help="the original model: ORIGINAL.onnx, or a PyTorch model as module:factory "
                                         "(with --weights)")
    parser.add_argument("decomposed", help="the decomposed model: DECOMPOSED.onnx (it must take the same inputs), "
                                           "or for a PyTorch model another module:factory or the folder 'lowrank "
                                           "decompose' wrote")
    parser.add_argument("--weights", help="module:factory models: a state dict (.safetensors or .pt) for ORIGINAL")
    parser.add_argument("--input-shape", action="append", metavar="NAME=D1,D2,...",
                        help="fix a dynamic input's dims for the random feeds (e.g. x=1,3,224,224); repeat per input")
    parser.add_argument("--feeds", metavar="FEEDS.npz", help="the inputs, one array per input by name "
                                                              "(default: random feeds)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS,
                        help=f"timed runs of each model, interleaved (default {DEFAULT_RUNS})")
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP,
                        help=f"untimed runs of each model first (default {DEFAULT_WARMUP})")
    parser.add_argument("--clock", default="auto", choices=["auto", "wall", "cpu"],
                        help="wall: elapsed time; cpu: the process's CPU time, what one thread takes on an idle core "
                             "(other processes on a shared machine do not inflate it); auto (default): cpu with "
                             "--threads 1, else wall")
    parser.add_argument("--per-layer", action="store_true",
                        help="add a per-node table of kernel times from onnxruntime's profiler")
    parser.add_argument("--json", metavar="FILE.json", help="also write every figure as JSON here ('-': print "
                                                             "the JSON instead of the table)")
    parser.set_defaults(run=bench_command)
