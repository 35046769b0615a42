"""Rank policies from spectra: keep a fraction of spectral energy, or meet one global budget.

The estimate. A layer's relative output error at rank ``r`` is taken from the spectrum of its weight
as the data sees it: with input second moment ``C`` the singular values ``σ_i`` of ``W C^{1/2}``
(the eigenvalues of ``W C Wᵀ``), without data those of ``W``. Truncating keeps the top ``r``, so::

    e(r)² = Σ_{i > r} σ_i² / Σ_i σ_i²          (exact for a truncated SVD, Eckart–Young)

A conv kernel's Tucker-2 at ranks ``(h, h)`` is estimated by the HOSVD bound over its two unfoldings
(out-mode spectrum ``σ⁰``, in-mode spectrum ``σ¹``, the latter whitened by the input channel moment)::

    e(h)² ≈ (Σ_{i > h} σ⁰_i² + Σ_{i > h} σ¹_i²) / Σ_i σ⁰_i²

``from_energy(keep)`` gives each layer the smallest rank with ``1 - e(r)² >= keep``.

``from_budget`` minimises ``Σ_layers s_l · e_l(r_l)²`` subject to ``Σ_layers cost_l(r_l) <= budget``, with
cost the parameters or FLOPs after decomposition. ``s_l`` is the layer's *sensitivity*: how much of the
model's output a unit of the layer's own relative error costs. Without data every layer counts the
same (``s_l = 1``). With data it is measured (:func:`calibrate`): each layer alone is truncated at a
probe rank (the rank a uniform budget would give it, data-aware, bias-corrected) and the model's
relative output error ``E_l = Σ‖y' − y‖² / Σ‖y‖²`` is measured on calibration data, so::

    s_l = E_l / e_l(r_probe)²        and the allocator minimises    Σ_l E_l · e_l(r_l)² / e_l(r_probe)²

— the first-order model of the end-to-end error, the sum of the layers' measured contributions, each
following its own spectrum away from the probe. On all-MiniLM-L6-v2 the measured sensitivities span
two orders of magnitude (a query projection 0.03, the last FFN output 6.6), which is why the spectra
alone, with every layer counting the same, allocate worse than uniform ratios.
Ranks move in steps of ``divisor``; a layer may also be kept whole (error 0, its original cost). The
allocation is greedy on marginal value — each step buys the largest error reduction per unit of cost —
which is optimal for convex error curves and is what the spectra give in practice. The budget is met
to within one step.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

__all__ = ["Candidate", "Choice", "Form", "allocate", "calibrate", "energy_rank", "first_elements", "lower_hull",
           "matrix_spectrum", "probe_rank",
           "relative_output_errors", "sensitivities", "tail_errors"]


def matrix_spectrum(matrix: np.ndarray, moment: np.ndarray | None = None) -> np.ndarray:
    """Squared singular values of ``W C^{1/2}`` (or of ``W``), descending, float64, length min(out, in)."""
    weight = np.asarray(matrix, dtype=np.float64)
    out, inp = weight.shape
    if moment is not None:
        gram = weight @ np.asarray(moment, dtype=np.float64) @ weight.T  # [out, out]
        values = np.linalg.eigvalsh(0.5 * (gram + gram.T))[::-1][:min(out, inp)]
    else:
        values = np.linalg.svd(weight, compute_uv=False) ** 2
    return np.clip(values, 0.0, None)


def tail_errors(spectrum: np.ndarray, total: float | None = None) -> np.ndarray:
    """``e(r)²`` for r = 0 .. len(spectrum): the share of energy beyond the first r values."""
    energy = float(np.sum(spectrum)) if total is None else total
    tails = np.concatenate([np.cumsum(spectrum[::-1])[::-1], [0.0]])
    return tails / energy if energy > 0 else np.zeros_like(tails)


def energy_rank(errors: np.ndarray, keep: float) -> int:
    """The smallest rank ``r >= 1`` with ``1 - e(r)² >= keep`` (``errors`` from :func:`tail_errors`)."""
    reached = np.nonzero(1.0 - errors >= keep - 1e-12)[0]
    return max(1, int(reached[0]) if reached.size else len(errors) - 1)


#: What the allocator gives a layer: a rank of its main form (0: kept whole), or ``(form, rank)`` of another.
Choice = int | tuple[str, int]


@dataclass(slots=True)
class Form:
    """Another form a layer may take instead of its main one: error curve, cost per rank, largest rank."""

    errors: np.ndarray
    cost: Callable[[int], float]
    max_rank: int


@dataclass(slots=True)
class Candidate:
    """One layer for the allocator: its error curve, cost per rank, and its cost when kept whole.

    ``errors[r]`` is ``e(r)²`` for r = 0 .. max rank; ``cost(r)`` the parameters or FLOPs at rank r.
    ``forms``: other forms the layer may take (name -> :class:`Form`), whose options are ``(form, rank)``.
    """

    name: str
    errors: np.ndarray
    cost: Callable[[int], float]
    original_cost: float
    max_rank: int
    ranks: list[int] = field(default_factory=list)
    forms: dict[str, Form] = field(default_factory=dict)

    def options(self, divisor: int) -> list[tuple[Choice, float, float]]:
        """(choice, cost, error) for the ranks worth having; 0 means "kept whole", and comes last.

        The main form's ranks come first, cheapest first, then each other form's.
        """
        options: list[tuple[Choice, float, float]] = []
        curves: list[tuple[str | None, np.ndarray, Callable[[int], float], int]] = [
            (None, self.errors, self.cost, self.max_rank),
            *((name, form.errors, form.cost, form.max_rank) for name, form in self.forms.items())]
        for name, errors, cost_of, max_rank in curves:
            for rank in range(divisor, max_rank + 1, divisor):
                cost = cost_of(rank)
                if cost >= self.original_cost:
                    break
                options.append((rank if name is None else (name, rank), cost, float(errors[rank])))
        options.append((0, self.original_cost, 0.0))
        return options

    def chosen(self, choice: Choice) -> tuple[float, float]:
        """(cost, error) of ``choice``."""
        if isinstance(choice, tuple):
            form = self.forms[choice[0]]
            return form.cost(choice[1]), float(form.errors[choice[1]])
        return (self.cost(choice), float(self.errors[choice])) if choice else (self.original_cost, 0.0)


def lower_hull(options: Sequence[tuple[Choice, float, float]]) -> list[tuple[Choice, float, float]]:
    """The (rank, cost, error) options on the lower convex hull of error over cost, cheapest first.

    A greedy that climbs one option at a time stops on a flat stretch of a layer's curve even when a
    costlier option further on buys much more per unit of cost; on the hull every next step buys less
    per unit than the one before, so the greedy takes the steps worth taking. Options above the hull
    are never the best use of their cost.
    """
    hull: list[tuple[Choice, float, float]] = []
    for point in sorted(options, key=lambda option: (option[1], option[2])):
        while len(hull) >= 2:
            (_, x0, y0), (_, x1, y1) = hull[-2], hull[-1]
            if (x1 - x0) * (point[2] - y0) - (y1 - y0) * (point[1] - x0) > 0:
                break
            hull.pop()
        hull.append(point)
    best = min(range(len(hull)), key=lambda index: (hull[index][2], hull[index][1]))
    return hull[:best + 1]


def allocate(candidates: list[Candidate], budget: float, divisor: int, convex: bool = False) -> dict[str, Choice]:
    """Ranks minimising ``Σ e²`` with total cost <= ``budget``; 0 means the layer is kept whole.

    ``convex``: each layer climbs the lower convex hull of its options (:func:`lower_hull`), for cost
    curves that are not smooth (measured latencies); candidates with other ``forms`` need it (their
    options are one hull over every form). Raises ``ValueError`` when even the smallest ranks exceed
    the budget (naming what the minimum is).
    """
    if not convex and any(cand.forms for cand in candidates):
        raise ValueError("candidates with other forms are allocated on their lower hull: pass convex=True")
    ladders = {cand.name: lower_hull(cand.options(divisor)) if convex else cand.options(divisor)
               for cand in candidates}
    position = dict.fromkeys(ladders, 0)
    spent = sum(ladder[0][1] for ladder in ladders.values())
    if spent > budget:
        raise ValueError(f"the budget {budget:,.0f} cannot be met: the smallest ranks (rank {divisor} everywhere) "
                         f"already cost {spent:,.0f}")
    heap: list[tuple[float, str]] = []

    def push(name: str) -> None:
        ladder, index = ladders[name], position[name]
        if index + 1 < len(ladder):
            gain = ladder[index][2] - ladder[index + 1][2]
            extra = ladder[index + 1][1] - ladder[index][1]
            heapq.heappush(heap, (-(gain / extra) if extra > 0 else -math.inf, name))

    for name in ladders:
        push(name)
    while heap:
        _, name = heapq.heappop(heap)
        ladder, index = ladders[name], position[name]
        extra = ladder[index + 1][1] - ladder[index][1]
        if spent + extra > budget:
            continue  # this step does not fit; cheaper steps of other layers may still
        spent += extra
        position[name] = index + 1
        push(name)
    return {name: ladders[name][position[name]][0] for name in ladders}


def probe_rank(candidate: Candidate, fraction: float, divisor: int) -> int:
    """The largest rank (a multiple of ``divisor``, at least ``divisor``) costing at most ``fraction`` of the layer."""
    rank = divisor
    while rank + divisor <= candidate.max_rank and candidate.cost(rank + divisor) <= fraction * candidate.original_cost:
        rank += divisor
    return min(rank, candidate.max_rank)


def sensitivities(candidates: list[Candidate], measured: dict[str, float], probes: dict[str, int]) -> dict[str, float]:
    """``s_l = E_l / e_l(r_probe)²`` for the measured layers whose spectral error at the probe is not zero."""
    result = {}
    for cand in candidates:
        spectral = float(cand.errors[probes[cand.name]])
        if cand.name in measured and spectral > 0:
            result[cand.name] = max(measured[cand.name], 0.0) / spectral
    return result


def calibrate(candidates: list[Candidate], scales: dict[str, float]) -> list[Candidate]:
    """Candidates whose error curves are scaled by their sensitivities (:func:`sensitivities`).

    A layer without one (not measured, or exactly low-rank at its probe, where the measured error says
    nothing about its scale) gets the median sensitivity of the others.
    """
    fallback = float(np.median(list(scales.values()))) if scales else 1.0
    return [Candidate(cand.name, cand.errors * scales.get(cand.name, fallback), cand.cost, cand.original_cost,
                      cand.max_rank,
                      forms={name: Form(form.errors * scales.get(cand.name, fallback), form.cost, form.max_rank)
                             for name, form in cand.forms.items()})
            for cand in candidates]


# ------------------------------------------------------------------------------------ measuring

_Trial = TypeVar("_Trial")


def first_elements(datasets: Iterable[Any], max_iter: int) -> list[Any]:
    """The first ``max_iter`` elements of ``datasets`` (-1: all); ``ValueError`` when there are none."""
    elements = []
    for element in datasets:
        elements.append(element)
        if 0 < max_iter <= len(elements):
            break
    if not elements:
        raise ValueError("datasets is empty: measuring output errors needs at least one element")
    return elements


def relative_output_errors(outputs: Callable[[int], Sequence[Any]], count: int, trials: Sequence[_Trial],
                           applied: Callable[[_Trial], AbstractContextManager[object]],
                           progress: Callable[[int], None] | None = None) -> list[float]:
    """Per trial, ``Σ‖y' − y‖² / Σ‖y‖²`` over ``count`` elements: what the frontends' ``output_errors`` share.

    ``outputs(i)`` runs the model on element ``i`` and returns its floating-point outputs (float64 arrays
    or tensors); ``applied(trial)`` is a context that puts the trial's weights in place and takes them
    out again. ``y`` is measured before any trial. ``progress(trials done)`` is called after each trial.
    """
    reference = [outputs(index) for index in range(count)]
    norm = sum(float((value ** 2).sum()) for values in reference for value in values)
    if not math.isfinite(norm):
        raise ValueError("the model's outputs on datasets hold NaN or Inf values")
    errors = []
    for trial in trials:
        with applied(trial):
            squared = sum(float(((new - old) ** 2).sum()) for index in range(count)
                          for new, old in zip(outputs(index), reference[index], strict=True))
        errors.append(squared / norm if norm > 0 else 0.0)
        if progress is not None:
            progress(len(errors))
    return errors
