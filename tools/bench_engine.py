"""Engine speed on a ResNet-50 at ``from_ratio(0.5)``, next to bare LAPACK and the reference tool.

Run:  python tools/bench_engine.py [--repeat 3] [--no-reference]

Printed, all in one process, BLAS threads set explicitly:

* ``bare LAPACK``: for each layer the plan decomposes, one plain ``np.linalg.svd`` of its weight (a
  Linear's matrix; for a conv, the two unfoldings a Tucker-2 HOSVD needs) — the least linear algebra
  any tool must do for this plan.
* ``linalg inside the engine``: time the engine spends inside ``np.linalg`` calls (timed by wrapping them).
* ``engine (1 worker)``: ``lowrank_ir.rewrite`` end to end, one thread of work, BLAS on all cores.
* ``engine (default)``: the same with the engine's own parallelism (one layer per core, BLAS 1 thread each).
* ``decompose_network``: the whole user call (lower, plan, rewrite, rebuild the torch model).
* ``reference``: msModelSlim's ``Decompose(model).from_ratio(0.5).decompose_network()``.

Overhead = time outside ``np.linalg`` / time inside it. Times are the minimum of ``--repeat`` runs;
ratios are what to read on a shared, noisy machine.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _best(function: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


class LinalgTimer:
    """Wraps ``np.linalg`` decompositions to add up the time spent inside them."""

    NAMES = ("svd", "eigh", "eig", "qr", "cholesky", "pinv", "lstsq")

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._lock = threading.Lock()
        self._saved: dict[str, Callable[..., Any]] = {}

    def __enter__(self) -> LinalgTimer:
        for name in self.NAMES:
            original = getattr(np.linalg, name)
            self._saved[name] = original
            setattr(np.linalg, name, self._wrap(original))
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self._saved.items():
            setattr(np.linalg, name, original)

    def _wrap(self, function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                with self._lock:
                    self.seconds += time.perf_counter() - start
                    self.calls += 1
        return timed


def bare_lapack(graph: Any, plan: Any) -> None:
    """One plain SVD per matrix the plan needs (HOSVD unfoldings for convs)."""
    for entry in plan.decomposed():
        weight = np.asarray(graph.params[graph.node(entry.name).params["weight"]], dtype=np.float64)
        if weight.ndim == 2:
            np.linalg.svd(weight, full_matrices=False)
        else:
            out, inp = weight.shape[:2]
            np.linalg.svd(weight.reshape(out, -1), full_matrices=False)
            np.linalg.svd(weight.transpose(1, 0, *range(2, weight.ndim)).reshape(inp, -1), full_matrices=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the best is kept")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference tool")
    args = parser.parse_args(argv)

    from threadpoolctl import threadpool_info, threadpool_limits

    import lowrank_ir
    from frontends.torch import lower
    from lowrank_ir import Decompose, Policy, plan, rewrite
    from tests.models import resnet50

    cores = os.cpu_count() or 1
    blas = [f"{info['internal_api']} {info.get('version')} ({info['num_threads']} threads)"
            for info in threadpool_info() if info["user_api"] == "blas"]
    model = resnet50()
    graph = lower(model)
    chosen = plan(graph, Policy.ratio(0.5))
    print(f"ResNet-50, from_ratio(0.5): {len(chosen.decomposed())} layers decomposed; {cores} cores; "
          f"BLAS: {', '.join(blas)}; lowrank-ir {lowrank_ir.__version__}")

    rows: list[tuple[str, float]] = []
    with threadpool_limits(limits=cores, user_api="blas"):
        bare, _ = _best(lambda: bare_lapack(graph, chosen), args.repeat)
        rows.append(("bare LAPACK (one SVD per matrix)", bare))
        timer = LinalgTimer()
        with timer:
            serial, _ = _best(lambda: rewrite(graph, chosen, workers=1), 1)
        rows.append(("linalg inside the engine (1 worker)", timer.seconds))
        serial, _ = _best(lambda: rewrite(graph, chosen, workers=1), args.repeat)
        rows.append(("engine rewrite (1 worker)", serial))
    parallel, _ = _best(lambda: rewrite(graph, chosen), args.repeat)
    rows.append((f"engine rewrite (default, {min(cores, len(chosen.decomposed()))} workers)", parallel))
    whole, _ = _best(lambda: Decompose(model).from_ratio(0.5).decompose_network(), args.repeat)
    rows.append(("decompose_network (lower+plan+rewrite+build)", whole))
    if not args.no_reference:
        try:
            from msmodelslim.pytorch.low_rank_decompose import Decompose as Reference
        except ImportError:
            print("(reference tool not installed: pip install msmodelslim==26.1.0)")
        else:
            reference, _ = _best(lambda: Reference(model).from_ratio(0.5).decompose_network(), 1)
            rows.append(("reference decompose_network", reference))

    width = max(len(name) for name, _ in rows)
    for name, seconds in rows:
        print(f"  {name:<{width}}  {seconds:8.2f} s   {seconds / bare:6.2f} x bare LAPACK")
    inside = timer.seconds
    print(f"engine overhead outside np.linalg (1 worker): {(serial - inside) / inside:.1%} "
          f"({timer.calls} linalg calls)")
    if not args.no_reference and rows[-1][0].startswith("reference"):
        print(f"reference / ours (decompose_network): {rows[-1][1] / whole:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
