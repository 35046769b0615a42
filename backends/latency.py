"""Latency in onnxruntime: timing sessions, interleaved runs, and one layer's latency per form and rank.

Timing: every session runs on the CPU with ``threads`` intra-op threads, one inter-op thread and
sequential execution. :func:`interleaved_times` runs several sessions in turn, the order alternating
from one round to the next, so a change of machine load falls on all of them alike; read medians
and ratios. Two clocks: ``wall`` (elapsed time: the latency, on a machine nobody else uses) and
``cpu`` (the process's CPU time: with one intra-op thread onnxruntime computes on the calling
thread, so this is the latency the run would have on an idle core, and other processes sharing the
machine do not inflate it; measured here, a 4 ms model took 16 ms of wall time at load average 16 on
2 cores and 3.95 ms of CPU time). ``auto`` is ``cpu`` with one thread, ``wall`` with more.

A layer's latency is measured on a micro-graph: the layer alone (or its factorized parts, as
``lowrank_ir.rewrite`` lays them out) on an input of the shape it sees in the model, written by
``backends.onnx.build`` as the decomposed model would be. Its factorized forms are the deployment
ones (the ``compact`` layout: two 1x1 convs for a 1x1 conv, two matrices for a Gemm/MatMul, the
Tucker-2 chain for a k x k conv). Weights are zeros (no linear algebra is run to time a shape;
dense kernels take the same time on any normal values). Measurements are cached by what determines
them: op, attributes, weight and input shapes, form and rank, threads.

:class:`LatencyModel` gathers what a latency budget needs for one ONNX model: the whole model's
measured latency, each candidate layer's latency whole, and its latency at any rank (measured on a
grid of ranks and interpolated linearly in between).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from onnx import ModelProto

from backends.onnx import build, random_feeds
from frontends.onnx import check_feeds, inferred_shapes, input_specs, measured_shapes, run
from lowrank_ir import Graph, Node, Op, Policy, Value, plan, rewrite, with_forms, with_layout
from lowrank_ir._conv_forms import channel_params, spatial_params
from lowrank_ir._engine import SPATIAL_SVD, form_rank_limit
from lowrank_ir._policy import tucker2_stand_in
from lowrank_ir._protocols import LatencyMeasurement

__all__ = ["CLOCKS", "GRID_POINTS", "LAYOUT", "LatencyModel", "interleaved_calls", "interleaved_times",
           "layer_latency", "resolve_clock", "time_run", "timing_session"]

logger = logging.getLogger(__name__)

#: The layout latency is measured in and decomposed models are deployed in.
LAYOUT = "compact"

#: Ranks at which a layer's factorized latency is measured (evenly spread up to its largest useful rank).
GRID_POINTS = 8

#: Untimed runs before a micro-graph is timed, and timed runs (their median is the figure).
MICRO_WARMUP = 2
MICRO_RUNS = 9

#: ``auto``: ``cpu`` with one intra-op thread, else ``wall`` (see the module docstring).
CLOCKS = ("auto", "wall", "cpu")

_CACHE: dict[tuple[Any, ...], float] = {}


def timing_session(model: ModelProto, threads: int, profile_dir: str | None = None) -> Any:
    """A CPU session timed the same way for every model: ``threads`` intra-op threads, sequential.

    With ``profile_dir``, onnxruntime's profiler writes its trace there (``end_profiling()``).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if profile_dir is not None:
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(profile_dir, "profile")
    try:
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"onnxruntime cannot load the model: {first}") from err


def resolve_clock(clock: str, threads: int) -> str:
    """``wall`` or ``cpu`` for ``clock`` (one of :data:`CLOCKS`); ``auto`` is ``cpu`` with one thread."""
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {', '.join(repr(name) for name in CLOCKS)}, got {clock!r}")
    if clock == "auto":
        return "cpu" if threads == 1 else "wall"
    return clock


def time_run(sess: Any, feeds: Mapping[str, Any], where: str = "the feeds", clock: str = "wall") -> float:
    """One run's time in milliseconds on ``clock`` (``wall`` or ``cpu``); onnxruntime errors as ``ValueError``."""
    now = time.process_time if clock == "cpu" else time.perf_counter
    start = now()
    run(sess, feeds, where=where)
    return (now() - start) * 1000.0


def interleaved_times(sessions: Sequence[Any], feeds: Mapping[str, Any], runs: int, warmup: int,
                      labels: Sequence[str] | None = None, clock: str = "wall") -> list[list[float]]:
    """Per session, ``runs`` timed runs (ms), taken in rounds whose order alternates, after ``warmup`` rounds.

    At least one untimed round runs, so feeds a model cannot take fail before any timing.
    """
    labels = labels or [f"the feeds (model {index + 1})" for index in range(len(sessions))]
    calls = [functools.partial(run, sess, feeds, where=label) for sess, label in zip(sessions, labels, strict=True)]
    return interleaved_calls(calls, runs, warmup, clock)


def interleaved_calls(calls: Sequence[Callable[[], Any]], runs: int, warmup: int,
                      clock: str = "wall") -> list[list[float]]:
    """Per call (one inference of one model, any runtime), ``runs`` timed calls (ms) in alternating rounds.

    Rounds run every call once, in an order that reverses from one round to the next, after
    ``max(warmup, 1)`` untimed rounds; ``clock`` is ``wall`` or ``cpu`` (see the module docstring).
    """
    now = time.process_time if clock == "cpu" else time.perf_counter
    order = list(range(len(calls)))
    for _ in range(max(warmup, 1)):
        for index in order:
            calls[index]()
    times: list[list[float]] = [[] for _ in calls]
    for round_index in range(runs):
        for index in (order if round_index % 2 == 0 else order[::-1]):
            start = now()
            calls[index]()
            times[index].append((now() - start) * 1000.0)
    return times


# ------------------------------------------------------------------------------------------ layers

def _standalone(node: Node, weight: np.ndarray, bias: np.ndarray | None, input_shape: Sequence[int],
                dtype: str) -> Graph:
    """A graph holding ``node`` alone, zero weights of its shapes, reading ``x`` and writing ``y``."""
    attrs = {key: value for key, value in node.attrs.items() if key not in ("onnx", "source_op")}
    params = {f"layer.{role}": np.zeros(array.shape, dtype=array.dtype)
              for role, array in (("weight", weight), ("bias", bias)) if array is not None}
    single = Node(node.op, "layer", attrs, {name.split(".")[1]: name for name in params}, ["x"], ["y"])
    return Graph([single], params, [Value("x", dtype, tuple(int(dim) for dim in input_shape))], [Value("y", dtype)])


def _signature(node: Node, weight: np.ndarray, bias: np.ndarray | None, input_shape: Sequence[int]) -> tuple[Any, ...]:
    attrs = tuple(sorted((key, repr(value)) for key, value in node.attrs.items()
                         if key not in ("onnx", "source_op", "out_positions", "in_positions")))
    return (node.op.value, attrs, tuple(weight.shape), str(weight.dtype), bias is not None, tuple(input_shape))


def layer_latency(node: Node, weight: np.ndarray, bias: np.ndarray | None, input_shape: Sequence[int],
                  rank: int | None, threads: int = 1, clock: str = "auto", form: str | None = None) -> float:
    """Median latency (ms) of ``node`` on an input of ``input_shape``, whole (``rank`` None) or factorized.

    A conv is factorized at Tucker-2 ranks ``(rank, rank)``, written in the compact layout (two 1x1
    convs for a 1x1 conv), or in ``form`` (``svd``: channel SVD, ``spatial_svd``) at ``rank``; a Linear
    or MatMul at ``rank``.
    """
    clock = resolve_clock(clock, threads)
    key = (*_signature(node, weight, bias, input_shape), rank, form, threads, clock)
    if key in _CACHE:
        return _CACHE[key]
    dtype = str(np.dtype(weight.dtype))
    graph = _standalone(node, weight, bias, input_shape, dtype)
    if rank is not None:
        spec: int | list[int] = tucker2_stand_in(rank, weight.shape) if node.op is Op.CONV else rank
        chosen = with_layout(plan(graph, Policy.config({"layer": spec})), LAYOUT)
        if form is not None:
            chosen = with_forms(chosen, {"layer": (form, rank)})
        graph = rewrite(graph, chosen, weights=False).graph
    model = build(graph, check=False)
    sess = timing_session(model, threads)
    feeds = {"x": np.ones(tuple(int(dim) for dim in input_shape), dtype=dtype)}
    times = interleaved_times([sess], feeds, MICRO_RUNS, MICRO_WARMUP, [f"a {node.op.value} micro-graph"], clock)[0]
    _CACHE[key] = float(np.median(times))
    return _CACHE[key]


def _static(shape: Sequence[Any] | None) -> bool:
    return shape is not None and all(isinstance(dim, int) and dim > 0 for dim in shape)


def _grid(max_rank: int, divisor: int, useful: int) -> list[int]:
    """Up to :data:`GRID_POINTS` ranks, multiples of ``divisor``, spread evenly from ``divisor`` to ``useful``.

    Never above ``max_rank``: empty when ``divisor`` is larger.
    """
    top = min(max_rank, max(divisor, useful))
    points = {min(top, max(divisor, int(round(top * step / GRID_POINTS / divisor)) * divisor))
              for step in range(1, GRID_POINTS + 1)}
    return sorted(point for point in points if point <= max_rank)


def _interpolated(points: Sequence[tuple[int, float]], limit: int) -> Callable[[int], float]:
    """Linear interpolation of measured ``(rank, ms)`` points; infinite past ``limit``."""
    ranks = np.array([rank for rank, _ in points], dtype=np.float64)
    values = np.array([value for _, value in points], dtype=np.float64)

    def cost(rank: int) -> float:
        if rank > limit:
            return math.inf
        if rank > ranks[-1]:  # beyond the grid: the last measured slope
            slope = (values[-1] - values[-2]) / (ranks[-1] - ranks[-2]) if len(ranks) > 1 else 0.0
            return float(values[-1] + slope * (rank - ranks[-1]))
        return float(np.interp(rank, ranks, values))
    return cost


class LatencyModel:
    """Measured latencies of one ONNX model and its candidate layers, for the latency budget.

    ``input_shapes`` (input name -> dims) fixes the dims the model is timed at: every dynamic input
    dim must be given. ``model_ms`` is the whole model's median latency over ``runs`` runs.
    """

    def __init__(self, model: ModelProto, graph: Graph, input_shapes: Mapping[str, Sequence[int]] | None,
                 threads: int = 1, runs: int = 20, clock: str = "auto") -> None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be an int >= 1 (onnxruntime intra-op threads), got {threads!r}")
        self.clock = resolve_clock(clock, threads)
        specs = input_specs(model)
        dynamic = [name for name, spec in specs.items() if spec.shape is None
                   or not all(isinstance(dim, int) and dim > 0 for dim in spec.shape)]
        missing = [name for name in dynamic if name not in (input_shapes or {})]
        if missing:
            shown = {name: list(specs[name].shape or ()) for name in missing}
            raise ValueError(f"latency depends on the input shapes: give input_shapes for the dynamic inputs "
                             f"{shown}, e.g. {{{missing[0]!r}: [1, ...]}}")
        self.model, self.graph, self.threads = model, graph, threads
        self.input_shapes = {name: [int(dim) for dim in dims] for name, dims in (input_shapes or {}).items()}
        self.feeds = check_feeds(model, random_feeds(model, self.input_shapes), "input_shapes")
        self.model_ms = self.measure(model, runs)
        self._shapes = inferred_shapes(model, self.input_shapes)
        unknown = [node for node in graph.layers() if node.inputs and not _static(self._shapes.get(node.inputs[0]))]
        if unknown:  # shape inference stops at data-dependent reshapes: one run of the model tells
            feed_shapes = {name: [int(dim) for dim in np.shape(value)] for name, value in self.feeds.items()}
            self._shapes.update(measured_shapes(model, graph, feed_shapes, unknown))

    def measure(self, model: ModelProto, runs: int = 20) -> float:
        """Median latency (ms) of ``model`` (the same inputs as this one) on this model's feeds."""
        return float(np.median(interleaved_times([timing_session(model, self.threads)], self.feeds, runs, 2,
                                                 ["input_shapes"], self.clock)[0]))

    def compare(self, decomposed: ModelProto, runs: int = 20) -> tuple[float, float]:
        """Median latencies (ms) of this model and ``decomposed``, measured interleaved."""
        sessions = [timing_session(model, self.threads) for model in (self.model, decomposed)]
        times = interleaved_times(sessions, self.feeds, runs, 2, ["input_shapes (original)", "input_shapes"],
                                  self.clock)
        return float(np.median(times[0])), float(np.median(times[1]))

    def input_shape(self, node: Node) -> tuple[int, ...] | None:
        """The shape of ``node``'s input at these input shapes (None when it cannot be known)."""
        shape = self._shapes.get(node.inputs[0]) if node.inputs else None
        return tuple(int(dim) for dim in shape) if _static(shape) else None  # type: ignore[union-attr, arg-type]

    def supports(self, node: Node) -> str:
        """Empty when the layer's latency can be measured; else why not."""
        if node.op is Op.EMBEDDING:
            return "an embedding lookup costs no multiply-adds: its factorized form can only be slower"
        if node.op is Op.MATMUL and node.attrs.get("weight_side", "right") != "right":
            return "a MatMul with the weight on the left is not timed"
        if node.op not in (Op.LINEAR, Op.MATMUL, Op.CONV):
            return f"{node.op.value} layers are not timed"
        if self.input_shape(node) is None:
            return "its input shape is unknown at these input shapes"
        return ""

    def layer_ms(self, node: Node, rank: int | None = None, form: str | None = None) -> float:
        """``node``'s median latency (ms), whole or factorized at ``rank`` (see :func:`layer_latency`)."""
        weight = self.graph.param(node, "weight")
        assert weight is not None
        shape = self.input_shape(node)
        assert shape is not None
        return layer_latency(node, weight, self.graph.param(node, "bias"), shape, rank, self.threads, self.clock,
                             form)

    def forms(self, node: Node) -> list[str]:
        """The two-factor forms ``node`` may take besides its main one: a k x k conv's (``svd``, ``spatial_svd``)."""
        weight = self.graph.param(node, "weight")
        if node.op is not Op.CONV or weight is None or math.prod(weight.shape[2:]) == 1:
            return []
        return ["svd", SPATIAL_SVD] if weight.ndim == 4 else ["svd"]

    def cost(self, node: Node, max_rank: int, divisor: int, form: str | None = None) -> Callable[[int], float]:
        """``rank -> latency (ms)`` of ``node`` factorized: measured on a grid of ranks, interpolated between.

        The main form (``form`` None: Tucker-2 for a conv, SVD for a matrix) or a conv's ``form``. The
        grid reaches the rank whose parameters equal the layer's; past it the cost is infinite (a form
        with more parameters than the layer is not a decomposition, even where a micro-graph times it
        faster).
        ``ValueError`` when no multiple of ``divisor`` is a possible rank (at most ``max_rank``).
        """
        weight = self.graph.param(node, "weight")
        assert weight is not None
        out, inp, taps = weight.shape[0], weight.shape[1], math.prod(weight.shape[2:])
        if node.op is Op.MATMUL:
            inp, out = out, inp
        square = taps > 1  # Tucker-2 (r, r): r·in + r²·taps + r·out

        def params(rank: int) -> int:
            if form == SPATIAL_SVD:
                return spatial_params(weight.shape, rank)
            if form is not None:
                return channel_params(weight.shape, rank)
            return rank * (inp + out) + (rank * rank * taps if square else 0)

        if form is not None:
            max_rank = form_rank_limit(node.op, weight.shape, form)
        useful = next((rank for rank in range(1, max_rank + 1) if params(rank) >= out * inp * taps), max_rank)
        ranks = _grid(max_rank, divisor, useful)
        if not ranks:
            raise ValueError(f"layer {node.name!r} has no rank that is a multiple of {divisor} (largest {max_rank})")
        return _interpolated([(rank, self.layer_ms(node, rank, form)) for rank in ranks], max(useful, ranks[-1]))


if TYPE_CHECKING:  # the registry hands this module out as a LatencyMeasurement: mypy checks that it is one
    import backends.latency as _this_module

    _AS_PROTOCOL: LatencyMeasurement = _this_module
