"""The ``Decompose`` facade: the reference tool's call style over lower -> plan -> rewrite -> build.

>>> decomposer = Decompose(model).from_ratio(0.5)          # doctest: +SKIP
>>> small = decomposer.decompose_network()                  # doctest: +SKIP
>>> print(decomposer.report.table())                        # doctest: +SKIP

Every step is a plain function (``frontend.lower``, ``engine.plan``, ``engine.rewrite``,
``backend.build``); this class only keeps the chosen config between calls. The user's model is never
changed: ``decompose_network`` returns a new one.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lowrank_ir import _budget, _conv_forms
from lowrank_ir._engine import (
    SPATIAL_SVD,
    LayerStats,
    Plan,
    PlanEntry,
    Progress,
    _matrix_view,
    _why_not_decomposable,
    approximations,
    form_rank_limit,
    plan,
    rewrite,
    validate_layout,
    warn_unknown_excludes,
    with_forms,
    with_layout,
)
from lowrank_ir._files import check_file_target, read_json, write_json
from lowrank_ir._ir import Graph, Node, Op
from lowrank_ir._policy import (
    FORMS_KEY,
    Policy,
    Rules,
    config_document,
    plain_number,
    split_config_document,
    tucker2_stand_in,
    validate_divisor,
    validate_excludes,
)
from lowrank_ir._protocols import LatencyTimer
from lowrank_ir._registry import backend_for, frontend_for, latency_for
from lowrank_ir._report import SPECTRUM_LENGTH, Report, _positions, build_report, spectra

__all__ = ["Decompose", "PhaseProgress", "count_parameters"]

#: ``progress(phase, done, total, item)``: ``phase`` is ``"calibration"`` (datasets elements run),
#: ``"sensitivity"`` (layers whose effect on the output is measured), ``"rewrite"`` (layers factorized) or
#: ``"refine"`` (layers refitted in order); ``total`` 0 when not known in advance.
PhaseProgress = Callable[[str, int, int, str], None]

logger = logging.getLogger(__name__)

#: The latency budget measures its allocation on the whole model, then re-allocates by the excess (or the
#: slack) this many times at most; it stops early within ``LATENCY_SLACK`` below the target.
LATENCY_ATTEMPTS = 4
LATENCY_SLACK = 0.02


def count_parameters(model: Any) -> int:
    """Number of parameters of a PyTorch or MindSpore model, counted the same way for both.

    Counted: every trainable weight tensor (``nn.Parameter`` in PyTorch, ``Parameter`` in MindSpore),
    shared ones once. Not counted: running statistics such as BatchNorm's moving mean and variance
    (buffers in PyTorch, non-trainable parameters in MindSpore).
    """
    return int(frontend_for(model).count_parameters(model))


def _check_config_file(config_file: object) -> Path | None:
    if config_file is None:
        return None
    if not isinstance(config_file, (str, os.PathLike)) or not os.fspath(config_file).endswith(".json"):
        raise ValueError(f"config_file must be a path ending in '.json', got {config_file!r}")
    path = Path(config_file)
    check_file_target(path, f"config_file {str(path)!r}")  # a folder, or no folder to write in, fails now
    return path


def _keep_reasons(chosen: Plan, earlier: Plan | None) -> Plan:
    """``chosen`` with the reasons ``earlier`` gave for the layers it left alone (instead of "not in config")."""
    if earlier is None:
        return chosen
    for name, entry in chosen.entries.items():
        before = earlier.entries.get(name)
        if not entry.decomposed and before is not None and not before.decomposed:
            chosen.entries[name] = before
    return chosen


class Decompose:
    """Low-rank decomposition of a PyTorch ``nn.Module`` or MindSpore ``nn.Cell``.

    Args:
        model: the trained model. It is read, never changed.
        config_file: a ``.json`` path. Every ``from_*`` call writes the chosen ``decompose_config``
            there (atomically, not group/other-writable), with a ``"__forms__"`` section for the layers
            a latency budget wrote in another two-factor form (:meth:`config_document`); ``from_file``
            reads it back, forms included. The reference tool reads the file too (as Tucker-2 layers).
        mask_padding: with calibration data whose elements are dicts holding an ``attention_mask``
            (a tokenizer's padded batches), leave the padding positions out of the statistics of
            token-aligned layer inputs and of the measured output errors (the default); False keeps
            them. PyTorch models only.
        progress: optional ``progress(phase, done, total, item)`` callback (:data:`PhaseProgress`), called
            as calibration elements, sensitivity runs and layers finish; for progress bars.

    Choose ranks with one of ``from_ratio``, ``from_fixed``, ``from_dict``, ``from_vbmf``,
    ``from_file`` (each returns ``self``), then call :meth:`decompose_network`.
    """

    def __init__(self, model: Any, config_file: str | os.PathLike[str] | None = None, *,
                 mask_padding: bool = True, progress: PhaseProgress | None = None) -> None:
        self._frontend = frontend_for(model)  # TypeError for models of unsupported frameworks
        self.model = model
        self.config_file = _check_config_file(config_file)
        if not isinstance(mask_padding, bool):
            raise TypeError(f"mask_padding must be a bool, got {mask_padding!r}")
        if not mask_padding and not self._frontend.MASKS_PADDING:
            raise ValueError(f"mask_padding=False is not an option for a {type(model).__name__}: its calibration "
                             f"never masks padding (only PyTorch models' does)")
        #: Calibration options passed to the frontend (only those that differ from its defaults).
        self._data_options: dict[str, Any] = {} if mask_padding else {"mask_padding": False}
        if progress is not None and not callable(progress):
            raise TypeError(f"progress must be a callable progress(phase, done, total, item), got {progress!r}")
        self._progress = progress
        #: What :meth:`spectra` reads: the last decomposition's graph, plan and calibration statistics.
        self._decomposed: tuple[Graph, Plan, dict[str, LayerStats]] | None = None
        self.decompose_config: dict[str, int | list[int]] | None = None
        self.report: Report | None = None
        self.plan: Plan | None = None
        self._stats: tuple[int, int, dict[str, LayerStats]] | None = None
        self.sensitivities: dict[str, float] = {}
        self.latency: dict[str, Any] = {}
        #: Layers in another two-factor form: name -> (form, rank) (``with_forms``), chosen by the latency budget
        #: or restored by ``from_file``.
        self.forms: dict[str, tuple[str, int]] = {}

    # ------------------------------------------------------------------------------------ choosing ranks

    def from_ratio(self, channel_ratio: float, excludes: Sequence[str] | None = None,
                   divisor: int = 64) -> Decompose:
        """Keep about ``channel_ratio`` of each layer's parameters (a float in (0, 1)).

        ``excludes``: exact layer names to leave alone. ``divisor``: ranks are rounded to multiples
        of it (1 disables rounding).
        """
        return self._choose(Policy.ratio(channel_ratio, excludes, divisor))

    def from_fixed(self, channel_fixed: int, excludes: Sequence[str] | None = None,
                   divisor: int = 64) -> Decompose:
        """The same rank ``channel_fixed`` (an int > 0, rounded by ``divisor``) for every layer."""
        return self._choose(Policy.fixed(channel_fixed, excludes, divisor))

    def from_dict(self, channel_dict: Rules, excludes: Sequence[str] | None = None,
                  divisor: int = 64) -> Decompose:
        """Per-layer rules ``{regex: int | float | "vbmf" | (out, in)}``; the first key that ``re.search``-matches wins.

        Keys are strings or compiled ``re.Pattern``. A value is an int rank, a float ratio in (0, 1),
        ``"vbmf"``, or an ``(out rank, in rank)`` pair (list or tuple): a conv's Tucker-2 ranks, the
        larger of the two for a matrix layer. Every rank is rounded by ``divisor``, so a
        ``decompose_config`` given back with the divisor it was made with gives the same config.
        """
        return self._choose(Policy.from_dict(channel_dict, excludes, divisor))

    def from_vbmf(self, excludes: Sequence[str] | None = None, divisor: int = 64) -> Decompose:
        """Ranks estimated from each weight by EVBMF (best on pretrained weights)."""
        return self._choose(Policy.vbmf(excludes, divisor))

    def from_policy(self, policy: Policy) -> Decompose:
        """Ranks from a :class:`Policy` (what each ``from_*`` call above builds from its arguments)."""
        if not isinstance(policy, Policy):
            raise TypeError(f"from_policy takes a lowrank_ir.Policy (e.g. Policy.ratio(0.5)), got {policy!r}")
        return self._choose(policy)

    def from_energy(self, keep: float, excludes: Sequence[str] | None = None, divisor: int = 1, *,
                    include: str | None = None, datasets: Any = None, max_iter: int = -1) -> Decompose:
        """Each layer keeps the smallest rank that holds a fraction ``keep`` in (0, 1] of its spectral energy.

        With ``datasets`` the spectrum is the one the data sees (singular values of ``W C^{1/2}``), so
        the kept fraction is one of the layer's *output* energy. ``include``: a regex; only layers whose
        name it matches are candidates. Ranks are rounded up to multiples of ``divisor``.
        """
        keep = plain_number(keep)  # type: ignore[assignment]
        if isinstance(keep, bool) or not isinstance(keep, float) or not 0.0 < keep <= 1.0:
            raise ValueError(f"keep must be a float in (0, 1], the fraction of spectral energy kept, got {keep!r}")
        graph, candidates = self._candidates(excludes, divisor, include, datasets, max_iter, "params")
        config: dict[str, int | list[int]] = {}
        for cand in candidates:
            rank = _round_up(_budget.energy_rank(cand.errors, keep), validate_divisor(divisor), cand.max_rank)
            if cand.cost(rank) < cand.original_cost:
                config[cand.name] = [rank, rank] if graph.node(cand.name).op is Op.CONV else rank
        return self._choose_exact(graph, config, candidates, f"energy {keep}")

    def from_budget(self, params: float | int | None = None, flops: float | int | None = None,
                    excludes: Sequence[str] | None = None, divisor: int = 1, *, include: str | None = None,
                    datasets: Any = None, max_iter: int = -1, estimate: str | None = None,
                    probe_iter: int | None = None, latency: float | None = None,
                    input_shapes: Mapping[str, Sequence[int]] | None = None, threads: int = 1) -> Decompose:
        """Ranks for the whole model from one target: ``params=``, ``flops=`` or ``latency=`` (exactly one).

        A float in (0, 1) is the fraction of the candidate layers' current parameters (or FLOPs) to
        keep; an int is the absolute number their decomposed forms may have. FLOPs are counted as the
        report counts them: per sample where the graph knows each layer's positions (an ONNX model
        with fixed input shapes), else per output position. Ranks are allocated
        across layers to minimise the model's estimated output error — see ``lowrank_ir._budget``. A
        layer may be kept whole when that is the best use of the budget. Met to within one ``divisor`` step.

        ``estimate``: ``"measured"`` (the default with ``datasets``) weighs each layer's whitened
        spectrum by its sensitivity, measured by running the model on the calibration data (the first
        ``probe_iter`` elements of ``datasets``; by default the ``max_iter`` the statistics use) with that
        layer alone truncated (one pass per candidate layer; the model itself
        is not changed); ``"spectral"`` (the default without data) counts every layer's relative error
        the same. The measured sensitivities are kept in ``self.sensitivities``.

        ``latency`` (ONNX models): a float in (0, 1), the fraction of the model's measured onnxruntime
        latency to reach at ``input_shapes`` (input name -> dims; every dynamic dim) with ``threads``
        intra-op threads. Each candidate layer's latency is measured whole and factorized on a grid of
        ranks (micro-graphs, ``backends.latency``); ranks are allocated to meet the target at the least
        estimated error (layers whose factorized form is not faster stay whole; a k x k conv may take
        Tucker-2, channel SVD or spatial SVD, whichever buys the most error per millisecond, kept in
        ``self.forms``: ``lowrank_ir._conv_forms``); then the decomposed
        structure is measured whole, interleaved with the original, and the budget moved by the measured
        excess or slack and re-allocated (``LATENCY_ATTEMPTS`` measurements at most); the allocation
        with the least estimated error within the target is kept. A target below the fastest reachable
        latency is refused before any decomposition, naming it. Times are CPU time with one thread, wall
        time with more (``backends.latency``). ``self.latency`` holds the measured figures: per layer
        before/after (micro-graphs), and for the whole model (measured, not summed). With ``datasets``
        each layer's error curve is weighed by its measured sensitivity, as for ``params=``.
        """
        if latency is not None:
            latency = plain_number(latency)  # type: ignore[assignment]
            if params is not None or flops is not None:
                raise ValueError("from_budget takes exactly one of params= or flops= (or latency=)")
            return self._latency_budget(latency, excludes, divisor, include, datasets, max_iter, input_shapes,
                                        threads, estimate, probe_iter)
        if (params is None) == (flops is None):
            raise ValueError("from_budget takes exactly one of params= or flops= (or latency=)")
        target = plain_number(params if params is not None else flops)
        kind = "params" if params is not None else "flops"
        valid_fraction = isinstance(target, float) and 0.0 < target < 1.0
        valid_count = isinstance(target, int) and not isinstance(target, bool) and target > 0
        if not (valid_fraction or valid_count):
            raise ValueError(f"{kind} must be a float in (0, 1) (a fraction to keep) or an int > 0 (an absolute "
                             f"count), got {target!r}")
        probe_iter = plain_number(probe_iter)  # type: ignore[assignment]
        max_iter = plain_number(max_iter)  # type: ignore[assignment]
        amount = float(target)  # type: ignore[arg-type]
        graph, candidates = self._budget_candidates(excludes, divisor, include, datasets, max_iter, kind, estimate,
                                                    probe_iter, lambda cands: _budget_of(amount, cands)[1])
        ranks = _budget.allocate(candidates, _budget_of(amount, candidates)[0], validate_divisor(divisor))
        config = _config(graph, ranks)
        return self._choose_exact(graph, config, candidates, f"budget {kind}={target}")

    def _budget_candidates(self, excludes: Sequence[str] | None, divisor: int, include: str | None, datasets: Any,
                           max_iter: int, kind: str, estimate: str | None, probe_iter: int | None,
                           probe_fraction: Callable[[list[_budget.Candidate]], float],
                           ) -> tuple[Graph, list[_budget.Candidate]]:
        """The budget's candidates, scaled by measured sensitivities under the measured estimate.

        Sensitivities are probed at ``probe_fraction(candidates)`` of each layer's cost, and not
        measured when that is 1 or more (nothing would be truncated).
        """
        estimate = _check_estimate(estimate, datasets, probe_iter)
        probe_iter = max_iter if probe_iter is None else probe_iter
        source = datasets
        if estimate == "measured" and isinstance(datasets, Iterator):  # one-shot: read once, used twice
            datasets = list(itertools.islice(datasets, max_iter if max_iter > 0 else None))
        graph, candidates = self._candidates(excludes, divisor, include, datasets, max_iter, kind)
        if self._stats is not None and datasets is not source:
            self._stats = (id(source), *self._stats[1:])  # decompose_network(datasets=source) reuses them
        fraction = probe_fraction(candidates)
        if estimate == "measured" and fraction < 1.0:
            candidates = self._measured(graph, candidates, fraction, datasets, probe_iter)
        return graph, candidates

    def _latency_budget(self, target: float, excludes: Sequence[str] | None, divisor: int, include: str | None,
                        datasets: Any, max_iter: int, input_shapes: Mapping[str, Sequence[int]] | None,
                        threads: int, estimate: str | None, probe_iter: int | None) -> Decompose:
        """``from_budget(latency=...)``: ranks meeting a measured latency target (see ``from_budget``).

        With ``datasets`` (the measured estimate) each layer's error curve is scaled by its measured
        sensitivity, probed at the parameter fraction ``target`` (a uniform stand-in for the latency target).
        """
        if isinstance(target, bool) or not isinstance(target, float) or not 0.0 < target < 1.0:
            raise ValueError(f"latency must be a float in (0, 1), the fraction of the model's measured latency to "
                             f"reach, got {target!r}")
        measuring = latency_for(self.model)
        graph, candidates = self._budget_candidates(excludes, divisor, include, datasets, max_iter, "params",
                                                    estimate, probe_iter, lambda _: target)
        measured = _check_estimate(estimate, datasets, probe_iter) == "measured"
        fallback = float(np.median(list(self.sensitivities.values()))) if measured and self.sensitivities else 1.0
        scales = {cand.name: self.sensitivities.get(cand.name, fallback) if measured else 1.0 for cand in candidates}
        timer = measuring.LatencyModel(self.model, graph, input_shapes, threads)
        timed: list[_budget.Candidate] = []
        untimed: dict[str, str] = {}
        step = validate_divisor(divisor)
        for cand in candidates:
            node = graph.node(cand.name)
            reason = timer.supports(node) or (f"its largest rank {cand.max_rank} is below the divisor {step}"
                                              if cand.max_rank < step else "")
            if reason:
                untimed[cand.name] = reason
                continue
            timed.append(_budget.Candidate(cand.name, cand.errors, timer.cost(node, cand.max_rank, divisor),
                                           timer.layer_ms(node), cand.max_rank,
                                           forms=_timed_forms(node, graph, timer, divisor, scales.get(cand.name, 1.0))))
        if not timed:
            raise ValueError(f"no candidate layer of this model can be timed: {untimed}")
        rest = max(timer.model_ms - sum(cand.original_cost for cand in timed), 0.0)
        fastest = rest + sum(min(cost for _, cost, _ in cand.options(step)) for cand in timed)
        if fastest > target * timer.model_ms:
            raise ValueError(
                f"latency={target} cannot be reached: the fastest forms measured give "
                f"{fastest / timer.model_ms:.3f} of the model's latency ({fastest:.2f} ms of {timer.model_ms:.2f} ms "
                f"at {timer.input_shapes or 'its input shapes'}, {threads} thread(s)); ask for "
                f"{math.ceil(fastest / timer.model_ms * 100) / 100:.2f} or more")
        layers = {cand.name: cand.original_cost for cand in timed}
        budget = target * timer.model_ms - rest
        met: tuple[float, dict[str, _budget.Choice], float, float, int] | None = None  # least error within target
        closest: tuple[float, dict[str, _budget.Choice], float, float, int] | None = None  # else least latency
        tried: list[tuple[dict[str, int | list[int]], dict[str, tuple[str, int]]]] = []
        for attempt in range(1, LATENCY_ATTEMPTS + 1):
            ranks = _budget.allocate(timed, budget, step, convex=True)
            config, forms = _config(graph, ranks), _forms(ranks)
            if not config or (config, forms) in tried:
                break
            tried.append((config, forms))
            structure = rewrite(graph, with_forms(with_layout(plan(graph, Policy.config(config)), measuring.LAYOUT),
                                                  forms), weights=False).graph
            original_ms, decomposed_ms = timer.compare(backend_for(self.model).build(structure, self.model,
                                                                                     weights=False))
            ratio = decomposed_ms / original_ms
            error = sum(cand.chosen(ranks[cand.name])[1] for cand in timed)
            logger.info("latency budget %.3f, attempt %d: measured %.3f (%.2f ms of %.2f ms), estimated error %.4g",
                        target, attempt, ratio, decomposed_ms, original_ms, error)
            if ratio <= target:
                if met is None or error < met[0]:
                    met = (error, ranks, original_ms, decomposed_ms, attempt)
                if target - ratio < LATENCY_SLACK:
                    break
            elif closest is None or ratio < closest[3] / closest[2]:
                closest = (error, ranks, original_ms, decomposed_ms, attempt)
            budget += (target - ratio) * timer.model_ms  # tighten by the excess, or spend what is left
            if budget < fastest - rest:
                break
        best = met or closest
        if best is None:
            raise ValueError(f"no layer would be decomposed under latency={target}: every candidate is as fast "
                             f"kept whole")
        _, ranks, original_ms, decomposed_ms, attempts = best
        config, forms = _config(graph, ranks), _forms(ranks)
        per_layer = {}
        for cand in timed:
            choice = ranks[cand.name]
            form, rank = choice if isinstance(choice, tuple) else (None, config.get(cand.name))
            per_layer[cand.name] = {"rank": rank, "form": form, "before_ms": layers[cand.name],
                                    "after_ms": cand.chosen(choice)[0]}
        self.latency = {"target": target, "met": met is not None, "threads": threads, "clock": timer.clock,
                        "input_shapes": timer.input_shapes, "original_ms": original_ms,
                        "decomposed_ms": decomposed_ms, "ratio": decomposed_ms / original_ms, "attempt": attempts,
                        "layers": per_layer, "not_timed": untimed}
        if met is None:
            logger.warning("latency=%s was not met: the closest allocation measured %.3f", target,
                           decomposed_ms / original_ms)
        return self._choose_exact(graph, config, candidates, f"budget latency={target}", forms)

    def _measured(self, graph: Graph, candidates: list[_budget.Candidate], fraction: float, datasets: Any,
                  probe_iter: int) -> list[_budget.Candidate]:
        """Candidates scaled by each layer's measured effect on the model's output (see ``_budget.calibrate``).

        Each layer is truncated alone at the rank the uniform ``fraction`` gives it (data-aware, with
        the cached statistics); the model runs once per layer on ``probe_iter`` elements (-1: all).
        """
        probes = {cand.name: _budget.probe_rank(cand, fraction, 1) for cand in candidates}
        config = _config(graph, probes)
        probe_plan = plan(graph, Policy.config(config))
        stats = self._stats[2] if self._stats is not None else {}
        truncated = approximations(graph, probe_plan, stats)
        names = list(truncated)
        logger.info("measuring the output error of %d layers, each truncated alone", len(names))
        errors = self._frontend.output_errors(self.model, datasets, [truncated[name] for name in names],
                                              max_iter=probe_iter, progress=self._phase("sensitivity", names),
                                              **self._data_options)
        measured = dict(zip(names, errors, strict=True))
        for name, error in measured.items():
            logger.debug("%s: rank %d alone -> relative output error %.3g", name, probes[name], error)
        self.sensitivities = _budget.sensitivities(candidates, measured, probes)
        return _budget.calibrate(candidates, self.sensitivities)

    def _candidates(self, excludes: Sequence[str] | None, divisor: int, include: str | None, datasets: Any,
                    max_iter: int, kind: str) -> tuple[Graph, list[_budget.Candidate]]:
        """The decomposable layers with their error curves and cost functions (for energy/budget)."""
        import re

        excluded = set(validate_excludes(excludes))
        validate_divisor(divisor)
        max_iter = plain_number(max_iter)  # type: ignore[assignment]
        try:
            pattern = re.compile(include) if include is not None else None
        except (re.error, TypeError) as err:
            raise ValueError(f"include must be a regular expression string, got {include!r}: {err}") from err
        graph = self._lower()
        warn_unknown_excludes(graph, sorted(excluded))
        nodes = [node for node in graph.layers()
                 if node.name not in excluded and (pattern is None or pattern.search(node.name))
                 and not _why_not_decomposable(node, graph)]
        if not nodes:
            raise ValueError(f"no decomposable layer of this {type(self.model).__name__} is a candidate "
                             f"(include={include!r}, excludes={sorted(excluded)})")
        stats = self._calibration(graph, datasets, max_iter, [node.name for node in nodes])
        return graph, [_candidate(node, graph, stats.get(node.name), kind) for node in nodes]

    def _calibration(self, graph: Graph, datasets: Any, max_iter: int, names: list[str]) -> dict[str, LayerStats]:
        """Statistics for ``names``, kept for a ``decompose_network`` call given the same ``datasets`` object."""
        if datasets is None:
            return {}
        stats = self._frontend.collect_stats(self.model, graph, self._counted(datasets, max_iter), max_iter=max_iter,
                                             names=names, **self._data_options)
        self._stats = (id(datasets), max_iter, stats)
        return dict(stats)

    def _choose_exact(self, graph: Graph, config: dict[str, int | list[int]],
                      candidates: list[_budget.Candidate], policy: str,
                      forms: Mapping[str, tuple[str, int]] | None = None) -> Decompose:
        """Choose ``config`` (and ``forms``: layers in another two-factor form); write both to ``config_file``."""
        if not config:
            raise ValueError(f"no layer of this {type(self.model).__name__} would be decomposed under {policy}: "
                             f"every candidate is cheaper kept whole")
        forms = dict(forms or {})
        chosen = with_forms(plan(graph, Policy.config(config)), forms)
        for cand in candidates:
            if cand.name not in config:
                entry = chosen.entries[cand.name]
                chosen.entries[cand.name] = PlanEntry(entry.name, entry.op, entry.shape,
                                                      reason=f"kept whole by the {policy} policy")
        if self.config_file is not None:
            write_json(self.config_file, config_document(config, forms))
        self.plan, self.decompose_config, self.forms = chosen, config, forms
        self.report = build_report(graph, chosen)
        return self

    def from_file(self) -> Decompose:
        """Restore the ``decompose_config`` and forms saved in ``config_file`` by an earlier ``from_*`` call.

        The file is the reference tool's ``{layer: rank or [out, in]}`` (either tool's files load), with,
        after a latency budget that wrote some k x k convs in channel or spatial SVD, a
        ``"__forms__": {layer: [form, rank]}`` section (``lowrank_ir._policy.FORMS_KEY``) that restores
        them into ``self.forms``, so the model rebuilt is the one the budget measured.
        """
        if self.config_file is None:
            raise ValueError("from_file needs Decompose(model, config_file='....json') naming a saved config")
        if not self.config_file.is_file():
            raise ValueError(f"config_file {str(self.config_file)!r} does not exist; call another from_* "
                             f"method with this config_file first to save one")
        source = f"config_file {str(self.config_file)!r}"
        config, forms = split_config_document(read_json(self.config_file, source), source)
        graph = self._lower()
        chosen = plan(graph, Policy.config(config))
        try:
            chosen = with_forms(chosen, forms)
        except ValueError as err:
            raise ValueError(f"{source}[{FORMS_KEY!r}]: {err}") from err
        self.plan, self.decompose_config, self.forms = chosen, config, forms
        self.report = build_report(graph, self.plan)
        return self

    def config_document(self) -> dict[str, Any]:
        """What ``config_file`` holds for the current choice: ``decompose_config`` plus the layers' forms, if any.

        The JSON object to save where a config file is written by hand (a tool's output folder);
        ``from_file`` reads it back. ``ValueError`` before any ``from_*`` call.
        """
        if self.decompose_config is None:
            raise ValueError("no decompose_config yet: call a from_* method first")
        return config_document(self.decompose_config, self.forms)

    def _lower(self) -> Graph:
        return self._frontend.lower(self.model)

    def _choose(self, policy: Policy) -> Decompose:
        graph = self._lower()
        chosen = plan(graph, policy)
        config = chosen.decompose_config()
        if not config:
            kept = {entry.name: entry.reason for entry in chosen.kept_entries()}
            detail = "; ".join(f"{name}: {reason}" for name, reason in list(kept.items())[:5])
            raise ValueError(
                f"no layer of this {type(self.model).__name__} would be decomposed under {policy.kind!r} "
                f"({len(kept)} candidate layers{': ' + detail if detail else ''})")
        if self.config_file is not None:
            write_json(self.config_file, config_document(config))
            logger.info("wrote decompose_config to %s", self.config_file)
        self.plan, self.decompose_config, self.forms = chosen, config, {}
        self.report = build_report(graph, chosen)
        logger.info("%d layers to decompose", len(config))
        return self

    # ------------------------------------------------------------------------------------ decomposing

    def decompose_network(self, do_decompose_weight: bool = True, datasets: Any = None,
                          max_iter: int = -1, *, sequential: bool = False,
                          progress: Progress | None = None, layout: str | None = None) -> Any:
        """A new model with every layer of ``decompose_config`` replaced by its low-rank factors.

        Args:
            do_decompose_weight: True fills the factors from the trained weights. False builds the
                decomposed *structure* only (factors at their initialisation): load a state dict or
                checkpoint saved from a weight-decomposed model into it (the multi-process recipe).
            datasets: optional calibration data (an iterable of model inputs: dict -> keyword
                arguments, list/tuple -> positional arguments, a tensor -> the one argument). With it,
                each layer minimises its *output* error on this data instead of its weight error, and
                the error on the mean input is folded into the layer's bias.
            max_iter: how many elements of ``datasets`` to use; -1 for all.
            sequential: with ``datasets``, decompose layers in execution order, each from statistics
                taken on the model whose earlier layers are already decomposed, so errors do not
                compound unseen. Layers fed the same tensor (query/key/value) share one calibration
                pass, and each pass stops as soon as the layers it serves have seen their input.
            progress: optional ``progress(done, total, layer name)`` callback, called as layers finish
                (without it, the ``progress`` given to ``Decompose`` hears of them as ``"rewrite"``).
            layout: ``"reference"`` (the reference tool's: a 1x1 conv becomes three convs, so its
                checkpoints load) or ``"compact"`` (a 1x1 conv becomes two, without the r x r middle
                conv: the same function with fewer parameters and kernels). Default: the backend's,
                ``"reference"`` for PyTorch and MindSpore, ``"compact"`` for ONNX.
        """
        if layout is not None:
            validate_layout(layout)
        if self.decompose_config is None:
            raise ValueError("no decompose_config yet: call from_ratio, from_fixed, from_dict, from_vbmf "
                             "or from_file before decompose_network")
        if not isinstance(do_decompose_weight, bool):
            raise TypeError(f"do_decompose_weight must be a bool, got {do_decompose_weight!r}")
        max_iter = plain_number(max_iter)  # type: ignore[assignment]
        if isinstance(max_iter, bool) or not isinstance(max_iter, int):
            raise TypeError(f"max_iter must be an int (-1 for the whole dataset), got {max_iter!r}")
        if not (max_iter == -1 or max_iter > 0):
            raise ValueError(f"max_iter must be -1 (the whole dataset) or an int > 0, got {max_iter!r}")
        if not isinstance(sequential, bool):
            raise TypeError(f"sequential must be a bool, got {sequential!r}")
        if sequential and datasets is None:
            raise ValueError("sequential=True needs datasets: it refines each layer on calibration data")
        graph = self._lower()
        backend = backend_for(self.model)
        chosen = with_forms(with_layout(_keep_reasons(plan(graph, Policy.config(self.decompose_config)), self.plan),
                                        layout or backend.DEFAULT_LAYOUT), self.forms)
        stats = None
        names = [entry.name for entry in chosen.decomposed_entries()]
        if datasets is not None and do_decompose_weight:
            cached = self._stats
            if cached is not None and cached[0] == id(datasets) and cached[1] == max_iter:
                stats = {name: cached[2][name] for name in names if name in cached[2]}  # from from_energy/budget
            else:
                stats = self._frontend.collect_stats(self.model, graph, self._counted(datasets, max_iter),
                                                     max_iter=max_iter, names=names, **self._data_options)
        result = rewrite(graph, chosen, stats=stats, weights=do_decompose_weight,
                         progress=progress or self._layers("rewrite"))
        # The rewritten graph is this call's alone: the new model may take its arrays over without a copy.
        model = backend.build(result.graph, like=self.model, weights=do_decompose_weight, take_arrays=True)
        errors, flushed = result.errors, result.flushed
        if sequential and do_decompose_weight:
            errors, flushed = self._refine_sequentially(model, graph, chosen, datasets, max_iter, names,
                                                        progress or self._layers("refine"))
        self.plan = chosen
        self._decomposed = (graph, chosen, stats or {})
        self.report = build_report(graph, chosen, errors, flushed=flushed)
        return model

    def spectra(self, length: int = SPECTRUM_LENGTH) -> dict[str, dict[str, Any]]:
        """Each decomposed layer's normalised singular-value spectrum, rank and kept energy (``_report.spectra``).

        Of the last :meth:`decompose_network` call: whitened by the layer's input moment when it was
        data-aware. Empty before any decomposition.
        """
        if self._decomposed is None:
            return {}
        return spectra(*self._decomposed, length=length)

    def _layers(self, phase: str) -> Progress | None:
        """The ``progress`` given to ``Decompose`` as a per-layer ``progress(done, total, name)`` callback."""
        report = self._progress
        if report is None:
            return None

        def show(done: int, total: int, name: str) -> None:
            report(phase, done, total, name)
        return show

    def _phase(self, phase: str, names: Sequence[str]) -> Callable[[int], None] | None:
        """A ``progress(done)`` callback over ``names`` for the ``progress`` given to ``Decompose``."""
        report = self._progress
        if report is None:
            return None

        def show(done: int) -> None:
            report(phase, done, len(names), names[done - 1] if 0 < done <= len(names) else "")
        return show

    def _counted(self, datasets: Any, max_iter: int) -> Any:
        """``datasets``, reporting each element run as ``"calibration"`` progress (as it is without a callback)."""
        if self._progress is None or isinstance(datasets, (str, bytes, Mapping)) or not hasattr(datasets, "__iter__"):
            return datasets  # the frontend names what is wrong with it
        return _Counted(datasets, self._progress, max_iter)

    def _refine_sequentially(self, model: Any, graph: Graph, chosen: Plan, datasets: Any, max_iter: int,
                             names: list[str], progress: Progress | None,
                             ) -> tuple[dict[str, tuple[float, str]], dict[str, int]]:
        """Redo each group of layers, in execution order, from statistics of ``model`` as refined so far."""
        backend = backend_for(self.model)
        groups = self._frontend.execution_groups(model, graph, datasets, names)
        errors: dict[str, tuple[float, str]] = {}
        flushed: dict[str, int] = {}
        done = 0
        # Each layer is fitted to the original model's outputs (compensating upstream error): the frontend
        # runs the original beside the decomposed model.
        for group in groups:
            stats = self._frontend.collect_cross_stats(self.model, model, graph, datasets, max_iter=max_iter,
                                                       names=group, **self._data_options)
            part = Plan({name: chosen.entries[name] for name in group})
            result = rewrite(graph, part, stats=stats, workers=1)
            backend.load_layers(model, result.graph, group)
            errors.update(result.errors)
            flushed.update(result.flushed)
            done += len(group)
            if progress is not None:
                progress(done, len(names), group[-1])
        return errors, flushed


class _Counted:
    """An iterable over ``datasets`` that reports each element the caller has finished with.

    An element counts as done when the next one is asked for, or when the caller stops iterating (a
    ``max_iter`` cut, the end): ``progress("calibration", done, total, "")``.
    """

    __slots__ = ("datasets", "max_iter", "progress")

    def __init__(self, datasets: Any, progress: PhaseProgress, max_iter: int) -> None:
        self.datasets = datasets
        self.progress = progress
        self.max_iter = max_iter

    def __iter__(self) -> Iterator[Any]:
        size = len(self.datasets) if hasattr(self.datasets, "__len__") else 0
        total = min(size, self.max_iter) if size and self.max_iter > 0 else (size or max(self.max_iter, 0))
        done = 0
        pending = False
        try:
            for element in self.datasets:
                pending = True
                yield element
                pending = False
                done += 1
                self.progress("calibration", done, total, "")
        finally:
            if pending:
                self.progress("calibration", done + 1, total, "")


def _check_estimate(estimate: str | None, datasets: Any, probe_iter: int | None) -> str:
    if estimate is None:
        estimate = "spectral" if datasets is None else "measured"
    if estimate not in ("measured", "spectral"):
        raise ValueError(f"estimate must be 'measured' or 'spectral', got {estimate!r}")
    if estimate == "measured" and datasets is None:
        raise ValueError("estimate='measured' needs datasets: sensitivities are measured by running the model")
    if probe_iter is not None and (isinstance(probe_iter, bool) or not isinstance(probe_iter, int)
                                   or not (probe_iter == -1 or probe_iter >= 1)):
        raise ValueError(f"probe_iter must be None (as max_iter), -1 (all of datasets) or an int >= 1 (datasets "
                         f"elements used to measure), got {probe_iter!r}")
    return estimate


def _budget_of(target: float, candidates: Sequence[_budget.Candidate]) -> tuple[float, float]:
    """(budget, its fraction of the candidates' cost) for a params/FLOPs target: a fraction below 1, else a count."""
    total = sum(cand.original_cost for cand in candidates)
    budget = target * total if target < 1.0 else target
    return budget, budget / total


def _config(graph: Graph, ranks: Mapping[str, _budget.Choice]) -> dict[str, int | list[int]]:
    """A ``decompose_config`` from one choice per layer (a conv's Tucker-2 ranks equal); rank 0 leaves a layer out.

    A layer given another form (``(form, rank)``, see :func:`_forms`) is in the config at the Tucker-2
    ranks nearest its rank, a stand-in that ``with_forms`` replaces.
    """
    config: dict[str, int | list[int]] = {}
    for name, choice in ranks.items():
        rank = choice[1] if isinstance(choice, tuple) else choice
        if not rank:
            continue
        node = graph.node(name)
        if node.op is Op.CONV:
            config[name] = tucker2_stand_in(rank, graph.params.shape(node.params["weight"]))
        else:
            config[name] = rank
    return config


def _timed_forms(node: Node, graph: Graph, timer: LatencyTimer, divisor: int, scale: float,
                 ) -> dict[str, _budget.Form]:
    """A k x k conv's other two-factor forms for the latency budget: weight-error curves, measured latency.

    The error of channel and spatial SVD at rank r is the tail of the singular values of the form's
    matrix (``lowrank_ir._conv_forms``), relative to ``||K||²`` like the data-free Tucker-2 estimate, times
    the layer's sensitivity ``scale`` (1 without data). With calibration data the forms are still fitted
    data-aware; their curves stay the weight's. Measured on PP-OCR det (budget 0.9, 8 calibration images):
    the whitened tails (``form_whitening``, relative to the whitened spectrum) sit on another scale than the
    Tucker-2 estimate they are weighed against, and the allocation they gave had 6 to 12 times the output
    error of this one (0.20 and 0.38 against 0.033) at about the same latency.
    """
    weight = graph.param(node, "weight")
    assert weight is not None
    forms = {}
    for form in timer.forms(node):
        matrix = _conv_forms.spatial_matrix(weight) if form == SPATIAL_SVD else _conv_forms.channel_matrix(weight)
        limit = form_rank_limit(node.op, weight.shape, form)
        if limit < divisor:
            continue
        errors = _budget.tail_errors(_budget.matrix_spectrum(matrix)) * scale
        forms[form] = _budget.Form(errors, timer.cost(node, limit, divisor, form), limit)
    return forms


def _forms(ranks: Mapping[str, _budget.Choice]) -> dict[str, tuple[str, int]]:
    """The layers an allocation gives another form: name -> (form, rank)."""
    return {name: choice for name, choice in ranks.items() if isinstance(choice, tuple)}


def _round_up(rank: int, divisor: int, limit: int) -> int:
    return min(limit, -(-rank // divisor) * divisor)


def _candidate(node: Node, graph: Graph, stats: LayerStats | None, kind: str) -> _budget.Candidate:
    """Error curve and cost function of one layer (cost in parameters, or FLOPs as the report counts them).

    FLOPs are per sample where the graph knows the layers' positions per sample (ONNX models with
    fixed input shapes), else per output position.
    """
    weight = graph.param(node, "weight")
    assert weight is not None
    flops = kind == "flops"
    in_pos, out_pos = _positions(node) if flops else (1, 1)
    scale = 2 if flops else 1
    moment = None if stats is None else stats.moment
    if node.op is Op.CONV:
        out, inp, taps = weight.shape[0], weight.shape[1], int(np.prod(weight.shape[2:]))

        def cost(h: int) -> float:
            return scale * (inp * h * in_pos + (h * h * taps + h * out) * out_pos)

        if taps == 1:
            # Tucker-2 at ranks (h, h) of a 1x1 kernel is its matrix's rank-h factorization (the engine's
            # ``_factor_pointwise``): one spectral tail, whitened by the input-channel moment when there is one.
            errors = _budget.tail_errors(_budget.matrix_spectrum(weight.reshape(out, inp), moment))
            return _budget.Candidate(node.name, errors, cost, scale * out * inp * out_pos, min(out, inp))
        kernel = np.asarray(weight, dtype=np.float64)
        out_mode = _budget.matrix_spectrum(kernel.reshape(out, -1))
        in_unfolding = kernel.transpose(1, 0, *range(2, kernel.ndim)).reshape(inp, -1)
        if moment is None:
            in_mode = _budget.matrix_spectrum(in_unfolding)
        else:
            from lowrank_ir._linalg import psd_sqrt

            root = psd_sqrt(moment)
            whitened = root @ in_unfolding
            in_mode = np.clip(np.linalg.eigvalsh(whitened @ whitened.T)[::-1], 0.0, None)
        total = float(np.sum(out_mode))
        errors = np.minimum(_budget.tail_errors(out_mode, total)[:min(out, inp) + 1]
                            + _budget.tail_errors(in_mode, total)[:min(out, inp) + 1], 1.0)
        return _budget.Candidate(node.name, errors, cost, scale * out * inp * taps * out_pos, min(out, inp))
    matrix = _matrix_view(node, weight)
    out, inp = matrix.shape
    usable = moment if node.op in (Op.LINEAR, Op.MATMUL) else None
    errors = _budget.tail_errors(_budget.matrix_spectrum(matrix, usable))
    return _budget.Candidate(node.name, errors, lambda r: scale * r * (out + inp) * out_pos,
                             scale * out * inp * out_pos, min(out, inp))
