"""Engine speed and memory against the reference tool, side by side in one process.

Run:  python -m benchmarks.engine [--cases resnet50-ratio,resnet50-vbmf,minilm,llama,checkpoint,nproc]
                                  [--repeat 1] [--threads N] [--no-reference] [--load N]
                                  [--linalg auto|numpy|torch]

Rows (both tools get the same model; the reference replaces layers in place, so it works on a copy made
before its clock starts):

* ``resnet50-ratio``: ResNet-50 (torchvision layout, seeded init), ``from_ratio(0.5)``.
* ``resnet50-vbmf``: the same, ``from_vbmf()`` (EVBMF ranks, then Tucker-2/SVD at them).
* ``minilm``: all-MiniLM-L6-v2 with its real weights, the encoder's Linear layers at ratio 0.5
  (``from_dict``), data-free.
* ``llama``: a Llama-shaped stack, 4 blocks of hidden 2048 and MLP 5504 (q/k/v/o, gate/up/down
  Linear layers, no bias), float32, 0.75 GiB.

* ``checkpoint``: the same Llama shape (2 blocks: the bound does not depend on their number) as a
  transformers ``LlamaForCausalLM`` checkpoint folder
  (vocabulary 1024, float32, ``save_pretrained(max_shard_size="200MB")``), decomposed by
  ``lowrank decompose MODEL_DIR -o OUT_DIR --ratio 0.5`` in a fresh process (ours only: the reference
  has no such path). Its peak RSS above the process's RSS before the call (after
  importing the model class and scipy) is set against the bound "largest input shard + 3 x the
  largest layer's weight in float64".
* ``nproc``: the ``llama`` row's stack (4 blocks, 0.75 GiB of layers: the issue's Llama-shaped model) as such a
  checkpoint folder, decomposed by ``lowrank decompose --threads 1`` with ``--nproc 2``
  against ``--nproc 1`` (whole commands, the workers' start included): the throughput ratio, wall and
  CPU seconds, whether the outputs are the same bytes, how evenly the layers' estimated cost was split
  and how long a process waited for the other, and the seconds of the command when no layer is
  factorized (start-up, reading and writing: what more processes don't shorten), for both.

Each row gives the seconds of the whole ``decompose_network`` call (ranks chosen beforehand, as a
user calls it), the peak resident memory above the process's at the call's start (the kernel's
high-water mark, reset at the start) as a multiple of the model's parameter bytes, and beside ours the
bound it should stay under (the decomposed model's own bytes + 3 x the largest decomposed layer's
weight in float64; the model's weights are read before, and before each call the same tool decomposes
a small model of the model's largest layers, so that what a process sets up once -- code, BLAS buffers,
threads -- is not counted as the call's), whether both tools chose the same ranks, and the
mean relative reconstruction error ``||W - W'|| / ||W||`` of the decomposed layers for each tool. With
``--repeat`` the runs are interleaved (ours, reference, ours, ...) and the best time is kept, so load
from other jobs falls on both alike; read the ratio. BLAS and torch use ``--threads`` threads (default:
all cores) in both tools; our engine splits them between layer workers.

``--load N`` runs N busy processes (one pure-Python loop each) beside both tools for the whole run: a
concurrent CPU load of known size, on top of whatever else the machine runs (the load average printed
before and after includes both). ``--linalg torch`` runs our engine's Gram matrices and eigensolvers on
torch (CUDA when available; see ``lowrank_ir.linalg_backend``).
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


class PeakRSS:
    """This process's peak resident memory over a ``with`` block (bytes): ``start``, ``peak``, ``extra``.

    On Linux the kernel's high-water mark is reset at the start (``/proc/self/clear_refs``) and read at
    the end (``VmHWM``), so no peak is missed; a thread also samples the RSS every ``interval`` seconds
    (the only measure where the high-water mark cannot be reset).
    """

    def __init__(self, interval: float = 0.005) -> None:
        import psutil

        self._process = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._high_water = False
        self.start = 0
        self.peak = 0

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(self._interval)

    def __enter__(self) -> PeakRSS:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._high_water = high_water_mark() is not None
        except OSError:
            self._high_water = False
        self.start = self.peak = self._process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)
        if self._high_water:
            self.peak = max(self.peak, high_water_mark() or 0)

    @property
    def extra(self) -> int:
        return self.peak - self.start


def high_water_mark() -> int | None:
    """This process's peak resident memory (``VmHWM``, bytes) as the kernel counts it; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def memory_bound(model: Any, decomposed: Any, config: dict[str, Any]) -> int:
    """Bytes: the decomposed model's own tensors + 3 x the largest decomposed layer's weight in float64.

    What an in-memory decomposition may hold above the loaded model: the new model, and the workspace of
    the layers in flight (a weight's float64 blocks, Gram matrix and factors).
    """
    own = sum(tensor.numel() * tensor.element_size()
              for tensor in [*decomposed.parameters(), *decomposed.buffers()])
    largest = max(model.get_submodule(name).weight.numel() for name in config)
    return own + 3 * largest * 8


@dataclass
class Run:
    seconds: float
    extra_bytes: int
    config: dict[str, Any]
    error: float
    bound_bytes: int


@dataclass
class Case:
    title: str
    build: Callable[[], Any]
    choose: Callable[[Any], Any]  # a Decompose (either tool's) -> it, ranks chosen


def _llama_stack(blocks: int = 4, hidden: int = 2048, mlp: int = 5504) -> Any:
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(self, name, nn.Linear(hidden, hidden, bias=False))
            self.gate_proj = nn.Linear(hidden, mlp, bias=False)
            self.up_proj = nn.Linear(hidden, mlp, bias=False)
            self.down_proj = nn.Linear(mlp, hidden, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x + self.o_proj(self.v_proj(x) * torch.sigmoid(self.q_proj(x) * self.k_proj(x)))
            return x + self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))

    torch.manual_seed(0)
    return nn.Sequential(*[Block() for _ in range(blocks)]).eval()


def _resnet50() -> Any:
    from tests.models import resnet50

    return resnet50()


def _minilm() -> Any:
    from benchmarks import minilm

    return minilm.load()[1]


def _minilm_rules(decomposer: Any) -> Any:
    from benchmarks import minilm

    return decomposer.from_dict(minilm.ENCODER_RULES)


CASES = {
    "resnet50-ratio": Case("ResNet-50 from_ratio(0.5)", _resnet50, lambda d: d.from_ratio(0.5)),
    "resnet50-vbmf": Case("ResNet-50 from_vbmf()", _resnet50, lambda d: d.from_vbmf()),
    "minilm": Case("all-MiniLM-L6-v2 encoder from_dict(0.5), data-free", _minilm, _minilm_rules),
    "llama": Case("Llama-shaped stack, 4 x (2048, MLP 5504), fp32", _llama_stack, lambda d: d.from_ratio(0.5)),
}


def _mean_error(original: dict[str, Any], decomposed: dict[str, Any], config: dict[str, Any]) -> float:
    """Mean ``||W - W'|| / ||W||`` over the decomposed layers, W' multiplied back from the factors."""
    from lowrank_ir._linalg import reconstruct_tucker2, relative_error

    errors = []
    for name in config:
        weight = original[f"{name}.weight"].detach().double().numpy()
        parts = [decomposed[f"{name}.{index}.weight"].detach().double().numpy() for index in range(3)
                 if f"{name}.{index}.weight" in decomposed]
        if len(parts) == 2:
            approx = parts[1] @ parts[0]
        else:
            first, core, last = parts
            approx = reconstruct_tucker2(last.reshape(last.shape[:2]), core, first.reshape(first.shape[:2]))
        errors.append(relative_error(weight, approx.reshape(weight.shape)))
    return float(np.mean(errors))


def _as_lists(config: dict[str, Any]) -> dict[str, Any]:
    """A decompose_config with conv ranks as lists (the reference gives tuples)."""
    return {name: list(rank) if isinstance(rank, (list, tuple)) else rank for name, rank in config.items()}


def _read_weights(model: Any) -> None:
    """Read every weight of ``model`` once, so that the loaded model is in memory before a call is measured.

    transformers maps safetensors files: a weight nobody has read is not resident yet, and the first read
    (by either tool) would count the model's own pages in the call's peak.
    """
    import torch

    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.sum()


def _largest_layers(model: Any, config: dict[str, Any]) -> Any:
    """A small model of copies of ``model``'s largest decomposed layer of each weight rank: to warm up on."""
    from torch import nn

    largest: dict[int, Any] = {}
    for name in config:
        layer = model.get_submodule(name)
        rank = layer.weight.dim()
        if rank not in largest or layer.weight.numel() > largest[rank].weight.numel():
            largest[rank] = layer
    return nn.ModuleList(copy.deepcopy(layer) for layer in largest.values())


def _warm_up(decompose: Any, model: Any, config: dict[str, Any]) -> None:
    """Decompose the model's largest layers once, so that what a process sets up once is not the measured call's.

    Code loaded, BLAS buffers of those sizes and thread pools are the process's.
    """
    decompose(_largest_layers(model, config)).from_ratio(0.5).decompose_network()
    gc.collect()


def _run(decompose: Any, model: Any, case: Case, mutates: bool) -> Run:
    work = copy.deepcopy(model) if mutates else model
    decomposer = case.choose(decompose(work))
    config = dict(decomposer.decompose_config)
    _warm_up(decompose, model, config)
    with PeakRSS() as memory:
        start = time.perf_counter()
        result = decomposer.decompose_network()
        seconds = time.perf_counter() - start
    error = _mean_error(model.state_dict(), result.state_dict(), config)
    bound = memory_bound(model, result, config)
    del result, decomposer, work
    gc.collect()
    return Run(seconds, memory.extra, config, error, bound)


_STREAM_CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
import numpy as np, scipy.linalg
from backends.safetensors import decompose_checkpoint
from benchmarks.engine import PeakRSS
from frontends.safetensors import linear_layers, open_checkpoint
from lowrank_ir import Policy
# Warm up: import the model class and scipy's eigensolver, so that the baseline holds the code.
linear_layers(open_checkpoint({source!r}))
scipy.linalg.eigh(np.eye(8), subset_by_index=(6, 7), driver="evr")
with PeakRSS(0.002) as memory:
    start = time.perf_counter()
    result = decompose_checkpoint({source!r}, {target!r}, Policy.ratio(0.5))
    seconds = time.perf_counter() - start
print(json.dumps({{"baseline": memory.start, "peak": memory.peak, "seconds": seconds,
                  "largest_shard": result.largest_input_shard, "layers": len(result.decompose_config)}}))
"""


def _spin() -> None:
    """Burn one core until killed (a unit of concurrent load)."""
    while True:
        pass


class BusyLoad:
    """``count`` processes each spinning one core while the block runs."""

    def __init__(self, count: int) -> None:
        self._count = count
        self._processes: list[Any] = []

    def __enter__(self) -> BusyLoad:
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self._processes = [context.Process(target=_spin, daemon=True) for _ in range(self._count)]
        for process in self._processes:
            process.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for process in self._processes:
            process.terminate()
        for process in self._processes:
            process.join()


def _llama_checkpoint(folder: Path, blocks: int, hidden: int, mlp: int) -> int:
    """Write the Llama-shaped ``LlamaForCausalLM`` checkpoint folder (shards of 200 MB); its parameter bytes."""
    import torch
    import transformers

    config = transformers.LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=mlp,
                                      num_hidden_layers=blocks, num_attention_heads=16, num_key_value_heads=16,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(folder, max_shard_size="200MB")
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    gc.collect()
    return model_bytes


def checkpoint_row(blocks: int = 2, hidden: int = 2048, mlp: int = 5504) -> str:
    """Write the Llama-shaped checkpoint, stream it through a fresh process, report its peak RSS."""
    import json
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="lowrank-bench-") as tmp:
        model_bytes = _llama_checkpoint(Path(tmp) / "src", blocks, hidden, mlp)
        (Path(tmp) / "out").mkdir()
        code = _STREAM_CHILD.format(root=str(ROOT), source=str(Path(tmp) / "src"), target=str(Path(tmp) / "out"))
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        figures = json.loads(done.stdout.strip().splitlines()[-1])
    extra = figures["peak"] - figures["baseline"]
    layer64 = hidden * mlp * 8
    bound = figures["largest_shard"] + 3 * layer64
    mib = 1 << 20
    return (f"checkpoint folder, {blocks} x (hidden {hidden}, MLP {mlp}), fp32, {model_bytes / mib:.0f} MiB: "
            f"{figures['layers']} layers in {figures['seconds']:.1f} s; peak RSS above start {extra / mib:.0f} MiB "
            f"(x{extra / model_bytes:.2f} the model) against the bound largest shard "
            f"{figures['largest_shard'] / mib:.0f} MiB + 3 x {layer64 / mib:.0f} MiB = {bound / mib:.0f} MiB: "
            f"{'within' if extra <= bound else 'ABOVE'}")


def _same_output(one: Path, two: Path) -> bool:
    """Whether two runs wrote the same file: the same bytes, or for ``report.json`` all but the time it was written."""
    import json

    if one.name != "report.json":
        return one.read_bytes() == two.read_bytes()
    first, second = json.loads(one.read_text()), json.loads(two.read_text())
    first.pop("created", None)
    second.pop("created", None)
    return first == second


def nproc_row(repeat: int = 1, blocks: int = 4, hidden: int = 2048, mlp: int = 5504) -> str:
    """``lowrank decompose --threads 1`` on the Llama-shaped checkpoint with ``--nproc 2`` against ``--nproc 1``.

    Each run is the whole command in a fresh process (the workers' start included); runs alternate (1, 2,
    1, 2, ...) and the best of ``repeat`` is kept for each, its wall and CPU seconds (of all its processes,
    which load from other jobs inflates less). The outputs must be the same bytes. Also given: the split's
    balance (the largest process's share of the estimated cost: 0.5 is a perfect split of two; and the
    longest a process waited for the other at the barrier, from the command's ``-v`` log), and the same
    command on the folder with every layer excluded (start-up, reading the model class, copying the
    shards: what more processes do not shorten), which split the seconds into a fixed part and the
    factorizations.
    """
    import json
    import re
    import resource
    import subprocess
    import tempfile

    from backends.safetensors import CheckpointJob, split_by_cost
    from frontends.safetensors import linear_layers, open_checkpoint
    from lowrank_ir import Policy

    waits: list[float] = []

    def command(source: Path, target: Path, nproc: int, *policy: str) -> tuple[float, float]:
        argv = [sys.executable, "-m", "tools.cli", "decompose", str(source), "-o", str(target), "-v",
                *(policy or ("--ratio", "0.5")), "--threads", "1", "--nproc", str(nproc)]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True, check=True, cwd=ROOT)
        seconds = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if nproc > 1 and not policy:
            waits.extend(float(wait) for wait in re.findall(r"then ([0-9.]+) s waiting", done.stderr))
        return seconds, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime

    with tempfile.TemporaryDirectory(prefix="lowrank-bench-") as tmp:
        source = Path(tmp) / "src"
        _llama_checkpoint(source, blocks, hidden, mlp)
        checkpoint = open_checkpoint(source)
        job = CheckpointJob(checkpoint, linear_layers(checkpoint), Policy.ratio(0.5), Path(tmp))
        costs = job.layer_costs()
        owner = split_by_cost(costs, 2)
        largest = max(sum(cost for name, cost in costs.items() if owner[name] == rank) for rank in range(2))
        rules = Path(tmp) / "none.json"
        rules.write_text(json.dumps({"^$": 1}))  # matches no layer: everything but the factorizations
        whole = {1: (math.inf, math.inf), 2: (math.inf, math.inf)}
        fixed = {1: (math.inf, math.inf), 2: (math.inf, math.inf)}
        for attempt in range(repeat):
            for nproc in (1, 2):
                run = command(source, Path(tmp) / f"out{nproc}-{attempt}", nproc)
                whole[nproc] = min(whole[nproc], run)
                run = command(source, Path(tmp) / f"fixed{nproc}-{attempt}", nproc, "--dict", str(rules))
                fixed[nproc] = min(fixed[nproc], run)
        one, two = Path(tmp) / "out1-0", Path(tmp) / "out2-0"
        same = sorted(path.name for path in one.iterdir()) == sorted(path.name for path in two.iterdir()) and all(
            _same_output(path, two / path.name) for path in one.iterdir())
    work = {nproc: (whole[nproc][0] - fixed[nproc][0], whole[nproc][1] - fixed[nproc][1]) for nproc in (1, 2)}
    return (f"--threads 1 on the checkpoint folder ({len(costs)} layers): --nproc 1 {whole[1][0]:.1f} s, --nproc 2 "
            f"{whole[2][0]:.1f} s, throughput x{whole[1][0] / whole[2][0]:.2f} (CPU time of all processes: "
            f"{whole[1][1]:.1f} s and {whole[2][1]:.1f} s); output {'identical' if same else 'DIFFERS'}; "
            f"largest process's share of the estimated cost {largest / sum(costs.values()):.3f}, longest wait "
            f"at the barrier {max(waits, default=math.nan):.2f} s; without factorizations (start-up, reading, "
            f"writing) {fixed[1][0]:.1f} s and {fixed[2][0]:.1f} s (CPU {fixed[1][1]:.1f} s and {fixed[2][1]:.1f} s); "
            f"the factorizations alone (the difference) {work[1][0]:.1f} s and {work[2][0]:.1f} s, "
            f"x{work[1][0] / work[2][0]:.2f} (CPU {work[1][1]:.1f} s and {work[2][1]:.1f} s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    choices = [*CASES, "checkpoint", "nproc"]
    parser.add_argument("--cases", default=",".join(choices), help=f"comma-separated, of {', '.join(choices)}")
    parser.add_argument("--repeat", type=int, default=1, help="interleaved runs per tool; the best is kept")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="BLAS/torch threads")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference tool")
    parser.add_argument("--load", type=int, default=0, help="busy processes run beside the tools (default 0)")
    parser.add_argument("--linalg", default="auto", help="our engine's linear algebra: auto, numpy or torch")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.cases.split(",") if name.strip()]
    unknown = [name for name in names if name not in choices]
    if unknown:
        parser.error(f"unknown case(s) {unknown!r}; choose from {', '.join(choices)}")

    import logging

    import torch
    from threadpoolctl import threadpool_limits

    import lowrank_ir
    from lowrank_ir import Decompose

    logging.disable(logging.INFO)  # the reference logs every layer
    torch.set_num_threads(args.threads)
    reference: Any = None
    if not args.no_reference:
        try:
            from msmodelslim.pytorch.low_rank_decompose import Decompose as reference
        except ImportError:
            print("(reference tool not installed: pip install msmodelslim==26.1.0)")
    from lowrank_ir import LINALG_BACKENDS, linalg_backend

    if args.linalg not in LINALG_BACKENDS:
        parser.error(f"--linalg {args.linalg!r}: choose from {', '.join(LINALG_BACKENDS)}")
    if args.load < 0:
        parser.error(f"--load {args.load!r}: a number of busy processes, 0 or more")
    print(f"lowrank-ir {lowrank_ir.__version__}; {os.cpu_count()} cores, {args.threads} threads; "
          f"{args.load} busy processes beside; linalg {args.linalg}; "
          f"load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    header = (f"{'case':<52} {'ours s':>8} {'ref s':>8} {'ref/ours':>8} {'ours mem':>9} {'bound':>6} {'ref mem':>8} "
              f"{'ranks':>6} {'ours err':>9} {'ref err':>8}")
    print(header)
    with threadpool_limits(limits=args.threads, user_api="blas"), BusyLoad(args.load), linalg_backend(args.linalg):
        for name in names:
            if name == "checkpoint":
                print(checkpoint_row(), flush=True)
                continue
            if name == "nproc":
                print(nproc_row(args.repeat), flush=True)
                continue
            case = CASES[name]
            model = case.build()
            _read_weights(model)
            model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            ours: Run | None = None
            ref: Run | None = None
            for _ in range(args.repeat):
                run = _run(Decompose, model, case, mutates=False)
                ours = run if ours is None or run.seconds < ours.seconds else ours
                if reference is not None:
                    run = _run(reference, model, case, mutates=True)
                    ref = run if ref is None or run.seconds < ref.seconds else ref
            assert ours is not None
            line = f"{case.title:<52} {ours.seconds:8.2f} "
            if ref is not None:
                same = "same" if _as_lists(ref.config) == _as_lists(ours.config) else "DIFFER"
                line += (f"{ref.seconds:8.2f} {ref.seconds / ours.seconds:7.2f}x "
                         f"{ours.extra_bytes / model_bytes:8.2f}x {ours.bound_bytes / model_bytes:5.2f}x "
                         f"{ref.extra_bytes / model_bytes:7.2f}x "
                         f"{same:>6} {ours.error:9.5f} {ref.error:8.5f}")
            else:
                line += (f"{'-':>8} {'-':>8} {ours.extra_bytes / model_bytes:8.2f}x "
                         f"{ours.bound_bytes / model_bytes:5.2f}x {'-':>8} {'-':>6} {ours.error:9.5f}")
            print(line, flush=True)
            del model
            gc.collect()
    print(f"model size: parameter bytes; memory: peak RSS above the call's start, x model size; bound: the "
          f"decomposed model's own bytes + 3 x its largest decomposed layer's weight in float64. "
          f"load average after: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
