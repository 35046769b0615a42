"""The engine: ``plan`` (graph + policy -> one rank per layer) and ``rewrite`` (graph + plan -> factorized graph).

Both are plain functions with no hidden state. Factorized layers keep the source name as a prefix and
number their parts the way ``nn.Sequential`` numbers children:

* ``svd`` (Linear, MatMul, Embedding): ``fc`` -> ``fc.0`` (in -> r, no bias), ``fc.1`` (r -> out, the
  original bias). An Embedding becomes ``emb.0`` (Embedding num -> r) and ``emb.1`` (Linear r -> dim);
  ``emb.0``'s table keeps the source's attribute name (``emb.0.weight``; MindSpore ``emb.0.embedding_table``).
* ``tucker2`` (Conv): ``conv`` -> ``conv.0`` (1x1, in -> r_in), ``conv.1`` (the k x k core, original
  stride/padding/dilation), ``conv.2`` (1x1, r_out -> out, the original bias).
* ``svd`` of a Conv (channel SVD; a 1x1 conv's is the ``compact`` layout): ``conv`` -> ``conv.0``
  (the original kernel size, stride/padding/dilation, in -> r), ``conv.1`` (1x1, r -> out, the original bias).
* ``spatial_svd`` of a 2-D k x k Conv: ``conv`` -> ``conv.0`` (kh x 1, in -> r, the rows' stride, padding and
  dilation), ``conv.1`` (1 x kw, r -> out, the columns', the original bias).

The math of the two conv forms and their costs: ``lowrank_ir._conv_forms``.

Layouts (:func:`with_layout`): ``reference`` is the reference tool's, whose checkpoints must load: a 1x1
conv becomes three convs, the middle one an r x r identity core. ``compact`` writes a 1x1 conv at
equal ranks as the two-factor ``svd`` form, the same function at rank r. Per 1x1 conv [out, in] at
rank r and P output positions:

=========  =========================  ==============================  =======
layout     parameters                 multiply-adds                   kernels
=========  =========================  ==============================  =======
original   out·in                     out·in·P                        1
reference  r·(in + out) + r²          (r·(in + out) + r²)·P           3
compact    r·(in + out)               r·(in + out)·P                  2
=========  =========================  ==============================  =======

(the reference layout's first conv runs at the input resolution when the conv is strided).

Every written value is cast to the layer's dtype in one place, with its subnormals flushed to zero
(:func:`_cast_for_writing`).

Layers are decomposed in parallel threads (numpy's LAPACK calls release the GIL) with BLAS limited to
one thread per worker: oversubscribed OpenBLAS on a small machine is up to 100x slower.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import ctypes.util
import difflib
import functools
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from lowrank_ir import _conv_forms, _linalg
from lowrank_ir._evbmf import vbmf_ranks
from lowrank_ir._ir import Graph, Node, Op, verify
from lowrank_ir._policy import Policy, conv_ranks, matrix_rank, ratio_rank, smallest_ratio

__all__ = ["CONV_FORMS", "LAYOUTS", "LayerStats", "Plan", "PlanEntry", "approximations", "form_rank_limit",
           "form_whitening", "plan", "rewrite", "spatial_moment", "stats_from_sums", "validate_layout",
           "warn_unknown_excludes", "with_forms", "with_layout"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

SVD = "svd"
TUCKER2 = "tucker2"
SPATIAL_SVD = "spatial_svd"

#: The forms a k x k conv may take (:func:`with_forms`); their rank is one int.
CONV_FORMS = (SVD, SPATIAL_SVD)

#: How factorized layers are laid out (see the module docstring): the reference tool's, or compact.
LAYOUTS = ("reference", "compact")

#: HOOI stops when a sweep lowers the relative reconstruction error by at most this
#: (:func:`lowrank_ir._linalg.tucker2`): the reference tool's rule and tolerance. Each of ResNet-50's k x k
#: kernels under ``from_vbmf()`` (random init, errors near 0.9) ends 5e-5 or more below the reference's
#: error, and PP-OCR det's trained 3 x 3 kernels below it and within 2e-4 of themselves above a run to
#: convergence. (Stated relative to the error, a tolerance that keeps the same margin near 0.95 would be
#: stricter at ``from_ratio(0.5)``'s errors near 0.55, for sweeps that buy 1e-5 of error there.)
HOOI_TOL = 1e-4
HOOI_MAX_ITER = 50
#: Sweeps a HOOI usually takes at that tolerance (for scheduling estimates only).
HOOI_TYPICAL_SWEEPS = 6

#: The sequential mode's compensating regression needs this many input rows per input feature; with
#: fewer (e.g. squeeze-excitation layers on pooled features, one row per image) it overfits the
#: calibration set, and the layer is fitted to its own outputs on its perturbed inputs instead.
COMPENSATE_ROWS_PER_FEATURE = 4


@dataclass(slots=True)
class LayerStats:
    """Input statistics of one layer from calibration data: ``moment`` = E[x xᵀ] (float64), ``count`` rows.

    For the sequential mode's error compensation, ``moment``/``mean`` describe the layer's input x̃ in
    the partly decomposed model, and ``cross`` = E[x x̃ᵀ], ``source_moment`` = E[x xᵀ] and
    ``source_mean`` = E[x] relate it to the input x the original model gives it.

    For a k x k conv, ``patch_moment`` = E[p pᵀ] over the im2col patches p the conv sees (length
    ``in · prod(k)``, ordered ``(in, *k)`` like ``kernel.reshape(out, -1)`` and
    ``torch.nn.functional.unfold``), when the frontend collected it; the conv's output error is then
    measured and minimised exactly instead of through the channel moment.
    """

    moment: np.ndarray
    count: int
    mean: np.ndarray | None = None
    cross: np.ndarray | None = None
    source_moment: np.ndarray | None = None
    source_mean: np.ndarray | None = None
    patch_moment: np.ndarray | None = None


#: Keys of :func:`stats_from_sums` and the LayerStats fields they become.
_SUM_FIELDS = {"moment": "moment", "mean": "mean", "cross": "cross", "source": "source_moment",
               "source_mean": "source_mean"}


def stats_from_sums(name: str, count: int, sums: Mapping[str, np.ndarray],
                    patch: tuple[np.ndarray, int] | None = None) -> LayerStats:
    """A layer's statistics from a frontend's running float64 sums over ``count`` input rows.

    ``sums`` holds ``moment`` (Σ x xᵀ) and optionally ``mean`` (Σ x), ``cross``, ``source``,
    ``source_mean`` (the sequential mode's sums); ``patch`` is (Σ p pᵀ over im2col patches, patch count).
    Raises ``ValueError`` naming the layer when a NaN or Inf reached the sums.
    """
    means = {_SUM_FIELDS[key]: np.asarray(value, dtype=np.float64) / count for key, value in sums.items()}
    if patch is not None and patch[1]:
        means["patch_moment"] = np.asarray(patch[0], dtype=np.float64) / patch[1]
    if not all(np.isfinite(value).all() for value in means.values()):
        raise ValueError(f"the input of layer {name!r} holds NaN or Inf values (seen during calibration); "
                         f"statistics need finite activations")
    moment = means.pop("moment")
    return LayerStats(moment, count, **means)


@dataclass(frozen=True, slots=True)
class PlanEntry:
    """What happens to one layer: its ``form`` and ``rank`` (``(out, in)`` for tucker2), or why it is kept."""

    name: str
    op: Op
    shape: tuple[int, ...]
    form: str | None = None
    rank: int | tuple[int, int] | None = None
    reason: str = ""

    @property
    def decomposed(self) -> bool:
        return self.form is not None


@dataclass(slots=True)
class Plan:
    """The engine's decision for every layer of a graph, in graph order."""

    entries: dict[str, PlanEntry] = field(default_factory=dict)

    def decomposed_entries(self) -> list[PlanEntry]:
        """The entries of the layers to factorize (``entry.decomposed``), in graph order."""
        return [entry for entry in self.entries.values() if entry.decomposed]

    def kept_entries(self) -> list[PlanEntry]:
        """The entries of the layers left whole, each with its ``reason``, in graph order."""
        return [entry for entry in self.entries.values() if not entry.decomposed]

    def decompose_config(self) -> dict[str, int | list[int]]:
        """The reference tool's ``decompose_config``: name -> rank, or [out rank, in rank] for convs."""
        config: dict[str, int | list[int]] = {}
        for entry in self.decomposed_entries():
            config[entry.name] = list(entry.rank) if isinstance(entry.rank, tuple) else int(entry.rank or 0)
        return config


# ----------------------------------------------------------------------------------------------- planning

def _why_not_decomposable(node: Node, graph: Graph) -> str:
    """Empty when the engine can factorize ``node``; otherwise the reason it is left alone."""
    if "locked" in node.attrs:
        return str(node.attrs["locked"])
    if node.op is Op.CONV_TRANSPOSE:
        return "ConvTranspose layers are not decomposed yet"
    if node.op is Op.CONV and node.attrs["groups"] != 1:
        return (f"grouped convolution (groups={node.attrs['groups']}): a Tucker-2 across groups would "
                f"compute something else, so it is left alone")
    if node.op is Op.EMBEDDING and node.attrs.get("max_norm") is not None:
        return "Embedding with max_norm renormalises looked-up rows, which a factorization would change"
    weight = graph.param(node, "weight")
    if weight is not None and weight.dtype.kind not in "fc":
        return f"weight dtype {weight.dtype} is not floating point"
    return ""


def _check_finite(node: Node, weight: np.ndarray) -> None:
    if not np.isfinite(weight).all():
        bad = int(weight.size - np.isfinite(weight).sum())
        raise ValueError(f"layer {node.name!r}: weight {node.params['weight']!r} holds {bad} NaN or Inf "
                         f"values; decomposition needs finite weights")


def _matrix_view(node: Node, weight: np.ndarray) -> np.ndarray:
    """The layer's weight as ``[out, in]``.

    A right-hand MatMul weight is stored ``[in, out]``, a 1x1 conv's kernel ``[out, in, 1, ...]``.
    """
    if node.op is Op.CONV:
        return weight.reshape(weight.shape[0], -1)
    return weight.T if node.op is Op.MATMUL and node.attrs.get("weight_side", "right") == "right" else weight


def _plan_entry(node: Node, graph: Graph, policy: Policy) -> PlanEntry | None:
    shape = tuple(int(dim) for dim in _weight_shaped(node, graph).shape)  # verify() guarantees a weight
    spec = policy.spec_for(node.name)
    if spec is None:
        reason = ("in excludes" if node.name in policy.excludes
                  else "not in decompose_config" if policy.kind == "config" else "matched by no rule")
        return PlanEntry(node.name, node.op, shape, reason=reason)
    reason = _why_not_decomposable(node, graph)
    if reason:
        return PlanEntry(node.name, node.op, shape, reason=reason)
    weight = graph.param(node, "weight")  # read only for a layer the policy decomposes
    assert weight is not None
    _check_finite(node, weight)
    exact = policy.kind == "config"
    if node.op is Op.CONV:
        if exact and isinstance(spec, int):
            spec = (spec, spec)
        ranks, reason = conv_ranks(shape, spec, policy.divisor, lambda: vbmf_ranks(weight), not exact)
        if reason:
            return PlanEntry(node.name, node.op, shape, reason=reason)
        return PlanEntry(node.name, node.op, shape, TUCKER2, ranks)
    if exact and not isinstance(spec, int):
        raise ValueError(f"layer {node.name!r} ({node.op}) takes one int rank, the config gives {spec!r}")
    matrix_shape = _matrix_view(node, weight).shape
    rank, reason = matrix_rank((int(matrix_shape[0]), int(matrix_shape[1])), spec, policy.divisor,
                               lambda: vbmf_ranks(weight), not exact)
    if reason:
        return PlanEntry(node.name, node.op, shape, reason=reason)
    return PlanEntry(node.name, node.op, shape, SVD, rank)


def plan(graph: Graph, policy: Policy) -> Plan:
    """Choose a form and rank for every layer of ``graph`` under ``policy``.

    Logs a warning when ``policy.excludes`` names a layer the graph does not have. Raises ``ValueError``
    when a ratio rounds the rank of every layer it applies to down to 0, when a layer to be decomposed
    has NaN/Inf weights, and, for an exact ``config`` policy, when the config names layers the graph
    does not have or ranks that don't fit.
    """
    warn_unknown_excludes(graph, policy.excludes)
    _check_ratios(graph, policy)
    result = Plan()
    for node in graph.layers():
        entry = _plan_entry(node, graph, policy)
        if entry is not None:
            result.entries[node.name] = entry
    if policy.kind == "config":
        _check_config_fits(graph, policy.value, result)
    _release_free_memory()  # the pages of the weights read (lazy ones are read here as new arrays)
    return result


def warn_unknown_excludes(graph: Graph, excludes: Iterable[str]) -> list[str]:
    """Names in ``excludes`` that are not layers of ``graph``, logged as a warning with the nearest layer names.

    A warning, not an error: the reference tool ignores such names, and scripts written for it pass one
    exclude list to a family of models (``layer{stage}.{block}`` for every block any of them has); a
    typo is still shown, with the name it probably meant.
    """
    layers = [node.name for node in graph.layers()]
    known = set(layers)
    unknown = [name for name in excludes if name not in known]
    if unknown:
        hints = {name: difflib.get_close_matches(name, layers, n=1) for name in unknown}
        detail = "".join(f"; {name!r}: did you mean {hint[0]!r}?" for name, hint in hints.items() if hint)
        logger.warning("excludes names %d layer(s) the model does not have, ignored (excludes are exact layer "
                       "names): %s%s", len(unknown), unknown, detail)
    return unknown


def _check_ratios(graph: Graph, policy: Policy) -> None:
    """``ValueError`` for a parameter ratio that rounds the rank of every layer it applies to down to 0."""
    ranks: dict[float, list[tuple[float, tuple[int, ...]]]] = {}
    for node in graph.layers():
        spec = policy.spec_for(node.name)
        if not isinstance(spec, float) or _why_not_decomposable(node, graph):
            continue
        weight = _weight_shaped(node, graph)
        shape = tuple(int(dim) for dim in (weight.shape if node.op is Op.CONV else _matrix_view(node, weight).shape))
        ranks.setdefault(spec, []).append((ratio_rank(shape, spec), shape))
    for ratio, found in ranks.items():
        needed = min(smallest_ratio(shape) for _, shape in found)
        if max(rank for rank, _ in found) < 1 and needed < 1:  # (else the layers are too small for any ratio)
            raise ValueError(f"ratio {ratio!r} is too small to represent: it rounds the rank of every layer it "
                             f"applies to ({len(found)}) to 0; the smallest ratio giving any of them rank 1 is "
                             f"{needed:.3g}")


def _pointwise(entry: PlanEntry) -> bool:
    return entry.op is Op.CONV and all(size == 1 for size in entry.shape[2:])


def validate_layout(layout: object) -> str:
    """``layout`` if it is one of :data:`LAYOUTS`; else ``ValueError`` naming it and the layouts."""
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(repr(name) for name in LAYOUTS)}, got {layout!r}")
    return layout


def with_layout(the_plan: Plan, layout: str) -> Plan:
    """``the_plan`` written in ``layout`` (one of :data:`LAYOUTS`; see the module docstring).

    ``compact`` turns each Tucker-2 entry of a 1x1 conv into the two-factor ``svd`` form at rank
    ``min(r_out, r_in)``, the rank its three factors can reach; every other entry is kept.
    ``reference`` returns ``the_plan`` itself.
    """
    if validate_layout(layout) == "reference":
        return the_plan
    entries = {}
    for name, entry in the_plan.entries.items():
        if entry.form == TUCKER2 and _pointwise(entry) and isinstance(entry.rank, tuple):
            entry = PlanEntry(entry.name, entry.op, entry.shape, SVD, min(entry.rank), entry.reason)
        entries[name] = entry
    return Plan(entries)


def _check_config_fits(graph: Graph, config: Mapping[str, Any], result: Plan) -> None:
    unknown = [name for name in config if name not in result.entries]
    if unknown:
        layers = [node.name for node in graph.layers()]
        shown = ", ".join(repr(name) for name in layers[:8]) + (" ..." if len(layers) > 8 else "")
        raise ValueError(f"decompose_config names layers the model does not have (or that are not "
                         f"decomposable): {unknown}; the model's layers are: {shown}")
    for name in config:
        entry = result.entries[name]
        if not entry.decomposed:
            raise ValueError(f"decompose_config asks to decompose {name!r}, which is left alone: {entry.reason}")
        limits = _rank_limits(entry)
        ranks = entry.rank if isinstance(entry.rank, tuple) else (entry.rank,)
        if any(rank > limit for rank, limit in zip(ranks, limits, strict=True)):  # type: ignore[operator]
            raise ValueError(f"decompose_config gives {name!r} (weight {list(entry.shape)}) rank "
                             f"{config[name]!r}, above its largest possible rank {list(limits)}")


def _rank_limits(entry: PlanEntry) -> tuple[int, ...]:
    if entry.form == TUCKER2:
        return (entry.shape[0], entry.shape[1])
    return (form_rank_limit(entry.op, entry.shape, entry.form or SVD),)


def form_rank_limit(op: Op, shape: Sequence[int], form: str) -> int:
    """The largest rank of ``form`` (``svd`` or ``spatial_svd``) for a layer of ``op`` with weight ``shape``."""
    if op is Op.CONV and form == SPATIAL_SVD:
        return min(shape[1] * shape[2], shape[0] * shape[3])
    if op is Op.CONV:
        return min(shape[0], shape[1] * math.prod(shape[2:]))
    return min(shape[0], shape[1])


def with_forms(the_plan: Plan, forms: Mapping[str, tuple[str, int]]) -> Plan:
    """``the_plan`` with the conv layers of ``forms`` (name -> (form, rank)) in a two-factor form.

    A form is one of :data:`CONV_FORMS`: ``svd`` (channel SVD), ``spatial_svd`` (2-D convs only). ``ValueError``
    naming the layer for a layer the plan does not decompose, a layer that is not a conv, a form it cannot
    take, or a rank outside ``1 .. its largest``.
    """
    entries = dict(the_plan.entries)
    for name, (form, rank) in forms.items():
        entry = entries.get(name)
        if entry is None or not entry.decomposed:
            raise ValueError(f"with_forms names {name!r}, which the plan does not decompose")
        if entry.op is not Op.CONV or form not in CONV_FORMS:
            raise ValueError(f"layer {name!r} ({entry.op.value}) cannot take form {form!r}: conv layers take "
                             f"one of {', '.join(repr(one) for one in CONV_FORMS)}")
        if form == SPATIAL_SVD and len(entry.shape) != 4:
            raise ValueError(f"layer {name!r} (weight {list(entry.shape)}) cannot take {SPATIAL_SVD!r}: it "
                             f"splits a 2-D kernel into rows and columns")
        limit = form_rank_limit(entry.op, entry.shape, form)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
            raise ValueError(f"layer {name!r} (weight {list(entry.shape)}) takes {form!r} ranks 1 .. {limit}, "
                             f"got {rank!r}")
        entries[name] = PlanEntry(entry.name, entry.op, entry.shape, form, rank, entry.reason)
    return Plan(entries)


# ------------------------------------------------------------------------------------------ rewriting

def _placeholder(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A zero array of ``shape`` that takes no memory (structure-only rewrites)."""
    return np.broadcast_to(np.zeros((), dtype=dtype), shape)


def _weight_shaped(node: Node, graph: Graph) -> np.ndarray:
    """A placeholder of the layer's weight shape and dtype: to lay out its parts without reading the weight."""
    name = node.params["weight"]
    return _placeholder(graph.params.shape(name), graph.params.dtype(name))


def _transposed(array: np.ndarray) -> np.ndarray:
    """``array.T``: a contiguous copy for real arrays, a free view for placeholders."""
    return array.T if 0 in array.strides else np.ascontiguousarray(array.T)


def _wire(parts: list[Node], node: Node) -> None:
    """Connect a chain of parts in place of ``node`` on dataflow graphs."""
    if not node.inputs and not node.outputs:
        return
    previous = list(node.inputs)
    for index, part in enumerate(parts):
        part.inputs = previous
        part.outputs = list(node.outputs) if index == len(parts) - 1 else [f"{node.name}.{index}:output"]
        previous = part.outputs


@dataclass(slots=True)
class _Factors:
    """The arrays of one factorized layer, its error figure, and the bias correction (if any)."""

    arrays: list[np.ndarray]
    error: float | None = None
    error_kind: str = "weight"
    bias_shift: np.ndarray | None = None


def _output_error(delta: np.ndarray, weight: np.ndarray, moment: np.ndarray,
                  reference: np.ndarray | None = None) -> float:
    """||(W - W') C^{1/2}|| / ||W R^{1/2}|| = sqrt(tr(D C Dᵀ) / tr(W R Wᵀ)), R = C unless given."""
    num = float(np.sum((delta @ moment) * delta))
    base = moment if reference is None else reference
    den = float(np.sum((weight @ base) * weight))
    return math.sqrt(max(num, 0.0) / den) if den > 0 else 0.0


def _centered(stats: LayerStats) -> np.ndarray:
    """The input covariance E[(x - μ)(x - μ)ᵀ] = C - μ μᵀ: the error left once the mean error is in the bias."""
    assert stats.mean is not None
    return stats.moment - np.outer(stats.mean, stats.mean)


def _factor_matrix(matrix: np.ndarray, rank: int, stats: LayerStats | None, correct_bias: bool) -> _Factors:
    """``matrix [out, in] ≈ left @ right`` (data-aware when ``stats`` has the input moment).

    With ``correct_bias`` and the input mean μ known, the error on the mean, (W - W') μ, is returned as
    a bias shift: the layer's output is then exact on average, and its remaining error is measured
    against the input covariance instead of the second moment.
    """
    if stats is None:  # svd_factors works on float32 weights in float64 blocks, without a float64 copy
        left, right = _linalg.svd_factors(matrix, rank)
        return _Factors([left, right], _linalg.svd_relative_error(matrix, left, right))
    matrix64 = matrix.astype(np.float64)
    if stats.cross is not None and stats.count >= COMPENSATE_ROWS_PER_FEATURE * matrix.shape[1]:
        return _compensate(matrix64, rank, stats, correct_bias)
    left, right = _linalg.whitened_svd_factors(matrix64, stats.moment, rank)
    delta = matrix64 - left @ right
    if correct_bias and stats.mean is not None:
        return _Factors([left, right], _output_error(delta, matrix64, _centered(stats), stats.moment), "output",
                        delta @ stats.mean)
    return _Factors([left, right], _output_error(delta, matrix64, stats.moment), "output")


def _compensate(matrix: np.ndarray, rank: int, stats: LayerStats, correct_bias: bool) -> _Factors:
    """Factors matching the original layer's outputs from the perturbed inputs (sequential mode)."""
    assert stats.cross is not None and stats.source_moment is not None
    moment, cross, source = stats.moment, stats.cross, stats.source_moment
    centre = correct_bias and stats.mean is not None and stats.source_mean is not None
    if centre:
        assert stats.mean is not None and stats.source_mean is not None
        moment = moment - np.outer(stats.mean, stats.mean)
        cross = cross - np.outer(stats.source_mean, stats.mean)
        source = source - np.outer(stats.source_mean, stats.source_mean)
    left, right = _linalg.compensating_factors(matrix, cross, moment, rank)
    approx = left @ right
    # E‖W x − W' x̃‖² = tr(W S Wᵀ) − 2 tr(W X W'ᵀ) + tr(W' C̃ W'ᵀ), relative to E‖W x‖²
    reference = float(np.sum((matrix @ source) * matrix))
    error = reference - 2 * float(np.sum((matrix @ cross) * approx)) + float(np.sum((approx @ moment) * approx))
    relative = math.sqrt(max(error, 0.0) / reference) if reference > 0 else 0.0
    shift = None
    if centre:
        assert stats.mean is not None and stats.source_mean is not None
        shift = matrix @ stats.source_mean - approx @ stats.mean
    return _Factors([left, right], relative, "output", shift)


def _factor_pointwise(kernel: np.ndarray, rank: int, stats: LayerStats | None, correct_bias: bool) -> _Factors:
    """A 1x1 kernel at Tucker-2 ranks ``(r, r)``: the matrix factorization, with an identity core.

    Any rank-r matrix is ``last @ core @ first``, so the best rank-r factors (data-free, whitened, or
    compensating in the sequential mode) are the best Tucker-2 factors too.
    """
    out, inp = kernel.shape[:2]
    factors = _factor_matrix(kernel.reshape(out, inp), rank, stats, correct_bias)
    left, right = factors.arrays
    factors.arrays = [right, np.eye(rank), left]
    return factors


def _factor_kernel(kernel: np.ndarray, ranks: tuple[int, int], stats: LayerStats | None,
                   correct_bias: bool) -> _Factors:
    if int(np.prod(kernel.shape[2:])) == 1 and ranks[0] == ranks[1]:
        return _factor_pointwise(kernel, ranks[0], stats, correct_bias)
    if stats is None:  # tucker2 holds the one float64 copy of a float32 kernel it needs
        last, core, first = _linalg.tucker2(kernel, ranks[0], ranks[1], max_iter=HOOI_MAX_ITER, tol=HOOI_TOL)
        return _Factors([first, core, last], _linalg.tucker2_relative_error(kernel, core))
    kernel64 = kernel.astype(np.float64)
    moment = stats.moment
    last, core, first = _linalg.tucker2(kernel64, ranks[0], ranks[1], moment=moment, max_iter=HOOI_MAX_ITER,
                                        tol=HOOI_TOL)
    patches = _usable_patches(stats, kernel.shape)
    if patches is not None:
        # Keep the channel-whitened in-factor, refit (last, core) under the exact im2col output error.
        last, core = _linalg.refit_tucker2(kernel64, first, ranks[0], patches)
    approx = _linalg.reconstruct_tucker2(last, core, first)
    error, shift = _kernel_output_error(kernel64, approx, stats, patches, correct_bias)
    return _Factors([first, core, last], error, "output", shift)


def _usable_patches(stats: LayerStats, shape: Sequence[int]) -> np.ndarray | None:
    """The im2col patch moment of ``stats`` if it fits a k x k kernel of ``shape`` (``[in·T, in·T]``), else None."""
    taps = math.prod(shape[2:])
    patches = stats.patch_moment
    if patches is not None and taps > 1 and patches.shape == (shape[1] * taps,) * 2:
        return patches
    return None


def _kernel_output_error(kernel: np.ndarray, approx: np.ndarray, stats: LayerStats, patches: np.ndarray | None,
                         correct_bias: bool) -> tuple[float, np.ndarray | None]:
    """(relative output error, bias shift or None) of a conv kernel ``[out, in, *k]`` replaced by ``approx``.

    Exact under the im2col patch moment ``patches`` when given; else the channel-moment estimate, each
    tap's ``[out, in]`` slice seen through the input-channel moment. With ``correct_bias`` and the input
    mean μ known, the error on a constant input image μ, ``Σ_taps (K - K')_t μ``, is the bias shift and
    the error left is measured on the centred input.
    """
    out, inp = kernel.shape[:2]
    taps = math.prod(kernel.shape[2:])
    shift = None
    if correct_bias and stats.mean is not None:
        shift = (kernel - approx).reshape(out, inp, -1).sum(axis=2) @ stats.mean
    if patches is not None:
        delta, full = (kernel - approx).reshape(out, -1), kernel.reshape(out, -1)
        if shift is None:
            return _output_error(delta, full, patches), None
        assert stats.mean is not None
        patch_mean = np.repeat(stats.mean, taps)  # a constant image μ, ordered (in, taps)
        return _output_error(delta, full, patches - np.outer(patch_mean, patch_mean), patches), shift
    delta = (kernel - approx).transpose(0, *range(2, kernel.ndim), 1).reshape(-1, inp)
    full = kernel.transpose(0, *range(2, kernel.ndim), 1).reshape(-1, inp)
    if shift is None:
        return _output_error(delta, full, stats.moment), None
    return _output_error(delta, full, _centered(stats), stats.moment), shift


def spatial_moment(stats: LayerStats, shape: Sequence[int]) -> np.ndarray:
    """The moment whitening a spatial SVD's input side: of the vertical conv's input columns ``(c, i)``.

    From the im2col patch moment when ``stats`` has one that fits ``shape``, else from the input-channel
    moment at every row (``lowrank_ir._conv_forms``).
    """
    patches = _usable_patches(stats, shape)
    if patches is not None:
        return _conv_forms.spatial_column_moment(patches, shape)
    return _conv_forms.spatial_row_moment(stats.moment, int(shape[2]))


def form_whitening(form: str, stats: LayerStats | None, shape: Sequence[int]) -> np.ndarray | None:
    """The moment a k x k conv's two-factor ``form`` is fitted under with ``stats`` (None: the weight error).

    Spatial SVD: :func:`spatial_moment` on the input side of ``spatial_matrix(K)ᵀ``; channel SVD: the
    im2col patch moment on the ``[out, in·T]`` matrix's input side, when there is one.
    """
    if stats is None:
        return None
    if form == SPATIAL_SVD:
        return spatial_moment(stats, shape)
    return _usable_patches(stats, shape)


def _factor_spatial(kernel: np.ndarray, rank: int, stats: LayerStats | None, correct_bias: bool) -> _Factors:
    """Spatial SVD at ``rank``; data-aware when ``stats`` is given (``lowrank_ir._conv_forms``).

    Data-free: the truncated SVD of the kernel's spatial matrix (the weight error). With statistics: the
    vertical conv's input side is whitened by the moment of its input columns (from the im2col patch
    moment, else the channel moment at every row), then, with the patch moment, the horizontal factor
    is refit to the exact output error; the error is the output error, the mean's error goes to the bias.
    """
    if stats is None:
        vertical, horizontal, error = _conv_forms.spatial_factors(kernel, rank)
        return _Factors([vertical, horizontal], error)
    kernel64 = kernel.astype(np.float64)
    patches = _usable_patches(stats, kernel.shape)
    vertical, horizontal = _conv_forms.whitened_spatial_factors(kernel64, rank, spatial_moment(stats, kernel.shape))
    error, shift = _kernel_output_error(kernel64, _conv_forms.spatial_kernel(vertical, horizontal), stats, patches,
                                        correct_bias)
    if patches is not None:
        # The refit is the exact optimum for this vertical factor up to its ridge: kept where it is better.
        refit = _conv_forms.spatial_refit_horizontal(kernel64, vertical, patches)
        refit_error, refit_shift = _kernel_output_error(kernel64, _conv_forms.spatial_kernel(vertical, refit), stats,
                                                        patches, correct_bias)
        if refit_error < error:
            horizontal, error, shift = refit, refit_error, refit_shift
    return _Factors([vertical, horizontal], error, "output", shift)


def _kernel_stats(node: Node, weight: np.ndarray, stats: LayerStats | None) -> LayerStats | None:
    """What a k x k conv's channel SVD can use of ``stats``: the im2col patch moment, or nothing.

    Channel SVD factors ``[out, in·T]`` and needs the moment of the ``(in, taps)`` patches; without it
    the factors minimise the weight error, which is logged.
    """
    taps = int(np.prod(weight.shape[2:]))
    if stats is None or node.op is not Op.CONV or taps == 1:
        return stats
    patches = _usable_patches(stats, weight.shape)
    if patches is not None:
        mean = None if stats.mean is None else np.repeat(stats.mean, taps)  # a constant image, ordered (in, taps)
        return LayerStats(patches, stats.count, mean)
    logger.info("layer %r: its %d-tap channel SVD is fitted to the weight (no patch statistics)", node.name, taps)
    return None


def _compute(node: Node, entry: PlanEntry, graph: Graph, stats: LayerStats | None) -> _Factors:
    weight = graph.param(node, "weight")
    assert weight is not None
    # The mean error goes into the bias where the layer has one (a bias-free layer keeps its structure).
    correct_bias = "bias" in node.params and node.attrs.get("weight_side", "right") == "right"
    try:
        if entry.form == TUCKER2:
            assert isinstance(entry.rank, tuple)
            return _factor_kernel(weight, entry.rank, stats, correct_bias)
        assert isinstance(entry.rank, int)
        if entry.form == SPATIAL_SVD:
            return _factor_spatial(weight, entry.rank, stats, correct_bias)
        return _factor_matrix(_matrix_view(node, weight), entry.rank, _kernel_stats(node, weight, stats),
                              correct_bias)
    except Exception as err:
        raise ValueError(f"while decomposing layer {node.name!r} (weight {list(weight.shape)}, "
                         f"rank {entry.rank}): {err}") from err


def _attribute(node: Node, role: str) -> str:
    """The source's attribute name for ``role``: the layer's param name after the layer's own prefix.

    ``weight`` in PyTorch, ``embedding_table`` for a MindSpore Embedding's weight (also when MindSpore left
    the name unprefixed); the role itself when the param name is not ``<layer>.<attribute>`` (ONNX).
    """
    param, prefix = node.params.get(role, ""), f"{node.name}."
    if param.startswith(prefix):
        attribute = param[len(prefix):]
    else:  # a layer that is the model itself has unprefixed names; ONNX initializers keep the role
        attribute = param if not node.name else ""
    return attribute if attribute.isidentifier() else role


def _parts_svd(node: Node, entry: PlanEntry, graph: Graph, arrays: list[np.ndarray] | None,
               ) -> tuple[list[Node], dict[str, np.ndarray]]:
    weight = _weight_shaped(node, graph)
    assert isinstance(entry.rank, int)
    rank, name, dtype = entry.rank, node.name, weight.dtype
    out, inp = _matrix_view(node, weight).shape  # a conv's inp counts in·taps
    if arrays is None:
        left, right = _placeholder((out, rank), dtype), _placeholder((rank, inp), dtype)
    else:
        left, right = arrays
    params: dict[str, np.ndarray] = {}
    if node.op is Op.EMBEDDING:
        lookup = {key: value for key, value in node.attrs.items() if key not in ("embedding_dim",)}
        table = f"{name}.0.{_attribute(node, 'weight')}"  # MindSpore: emb.0.embedding_table
        first = Node(Op.EMBEDDING, f"{name}.0", {**lookup, "embedding_dim": rank}, {"weight": table})
        second = Node(Op.LINEAR, f"{name}.1", {"in_features": rank, "out_features": inp},
                      {"weight": f"{name}.1.weight"})
        params[table], params[f"{name}.1.weight"] = left, _transposed(right)
    elif node.op is Op.CONV:
        # The first conv keeps the kernel, stride and padding: the second (1x1) runs at the output resolution.
        kernel = tuple(weight.shape[2:])
        ones = (1,) * len(kernel)
        keep = {key: value for key, value in node.attrs.items()
                if key not in ("in_channels", "out_channels", "groups")}
        first = Node(Op.CONV, f"{name}.0", {**keep, "in_channels": weight.shape[1], "out_channels": rank,
                                            "groups": 1}, {"weight": f"{name}.0.weight"})
        second = Node(Op.CONV, f"{name}.1", {"in_channels": rank, "out_channels": out, **_pointwise_attrs(ones)},
                      {"weight": f"{name}.1.weight"})
        params[f"{name}.0.weight"] = right.reshape(rank, weight.shape[1], *kernel)
        params[f"{name}.1.weight"] = left.reshape(out, rank, *ones)
    elif node.op is Op.MATMUL:
        # Both parts multiply from the weight's side; the second keeps the other attrs (Gemm alpha/beta).
        side = node.attrs.get("weight_side", "right")
        sided = {} if side == "right" else {"weight_side": side}
        extra = {key: value for key, value in node.attrs.items() if key not in ("in_features", "out_features")}
        first = Node(Op.MATMUL, f"{name}.0", {"in_features": inp, "out_features": rank, **sided},
                     {"weight": f"{name}.0.weight"})
        second = Node(Op.MATMUL, f"{name}.1", {**extra, "in_features": rank, "out_features": out},
                      {"weight": f"{name}.1.weight"})
        if side == "right":
            params[f"{name}.0.weight"], params[f"{name}.1.weight"] = _transposed(right), _transposed(left)
        else:
            params[f"{name}.0.weight"], params[f"{name}.1.weight"] = right, left
    else:
        extra = {key: value for key, value in node.attrs.items() if key not in ("in_features", "out_features")}
        first = Node(Op.LINEAR, f"{name}.0", {"in_features": inp, "out_features": rank},
                     {"weight": f"{name}.0.weight"})
        second = Node(Op.LINEAR, f"{name}.1", {**extra, "in_features": rank, "out_features": out},
                      {"weight": f"{name}.1.weight"})
        params[f"{name}.0.weight"], params[f"{name}.1.weight"] = right, left
    bias = graph.param(node, "bias")
    if bias is not None:
        second.params["bias"] = f"{name}.1.bias"
        params[f"{name}.1.bias"] = bias
    return [first, second], params


def _split_padding(padding: Any, axis: int) -> Any:
    """The padding of a 2-D conv restricted to ``axis`` (0: rows, 1: columns), the other axis unpadded.

    "valid", "same" and "same_lower" act on each axis alone and carry over as they are.
    """
    if isinstance(padding, str):
        return padding
    pads = [int(pad) for pad in padding]
    if len(pads) == 2:
        return tuple(pad if index == axis else 0 for index, pad in enumerate(pads))
    return tuple(pad if index % 2 == axis else 0 for index, pad in enumerate(pads))  # (top, left, bottom, right)


def _parts_spatial(node: Node, entry: PlanEntry, graph: Graph, arrays: list[np.ndarray] | None,
                   ) -> tuple[list[Node], dict[str, np.ndarray]]:
    """A 2-D conv as a kh x 1 conv (the rows' stride/padding/dilation) then a 1 x kw conv (the columns')."""
    weight = _weight_shaped(node, graph)
    assert isinstance(entry.rank, int)
    rank, name, dtype = entry.rank, node.name, weight.dtype
    out, inp, height, width = weight.shape
    shapes = [(rank, inp, height, 1), (out, rank, 1, width)]
    kernels = [_placeholder(shape, dtype) for shape in shapes] if arrays is None else arrays
    keep = {key: value for key, value in node.attrs.items()
            if key not in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups")}
    stride, dilation, padding = node.attrs["stride"], node.attrs["dilation"], node.attrs["padding"]
    parts = []
    for axis, (channels_in, channels_out, kernel) in enumerate(((inp, rank, (height, 1)), (rank, out, (1, width)))):
        attrs = {**keep, "in_channels": channels_in, "out_channels": channels_out, "kernel_size": kernel,
                 "stride": tuple(step if index == axis else 1 for index, step in enumerate(stride)),
                 "padding": _split_padding(padding, axis),
                 "dilation": tuple(step if index == axis else 1 for index, step in enumerate(dilation)),
                 "groups": 1}
        parts.append(Node(Op.CONV, f"{name}.{axis}", attrs, {"weight": f"{name}.{axis}.weight"}))
    params = {f"{name}.{index}.weight": array.reshape(shape)
              for index, (array, shape) in enumerate(zip(kernels, shapes, strict=True))}
    bias = graph.param(node, "bias")
    if bias is not None:
        parts[1].params["bias"] = f"{name}.1.bias"
        params[f"{name}.1.bias"] = bias
    return parts, params


def _pointwise_attrs(ones: tuple[int, ...]) -> dict[str, Any]:
    """The attributes of a plain 1x1 conv part (no stride, padding or dilation)."""
    return {"kernel_size": ones, "stride": ones, "padding": (0,) * len(ones), "dilation": ones, "groups": 1,
            "padding_mode": "zeros"}


def _parts_tucker2(node: Node, entry: PlanEntry, graph: Graph, arrays: list[np.ndarray] | None,
                   ) -> tuple[list[Node], dict[str, np.ndarray]]:
    weight = _weight_shaped(node, graph)
    assert isinstance(entry.rank, tuple)
    (rank_out, rank_in), name, dtype = entry.rank, node.name, weight.dtype
    out, inp, kernel = weight.shape[0], weight.shape[1], tuple(weight.shape[2:])
    ones = (1,) * len(kernel)
    pointwise = _pointwise_attrs(ones)
    shapes = [(rank_in, inp, *ones), (rank_out, rank_in, *kernel), (out, rank_out, *ones)]
    if arrays is None:
        kernels = [_placeholder(shape, dtype) for shape in shapes]
    else:
        kernels = [array.reshape(shape) for array, shape in zip(arrays, shapes, strict=True)]
    keep = {key: value for key, value in node.attrs.items()
            if key not in ("in_channels", "out_channels", "kernel_size", "groups")}
    parts = [
        Node(Op.CONV, f"{name}.0", {"in_channels": inp, "out_channels": rank_in, **pointwise}),
        Node(Op.CONV, f"{name}.1", {**keep, "in_channels": rank_in, "out_channels": rank_out,
                                    "kernel_size": kernel, "groups": 1}),
        Node(Op.CONV, f"{name}.2", {"in_channels": rank_out, "out_channels": out, **pointwise}),
    ]
    params = {}
    for index, (part, array) in enumerate(zip(parts, kernels, strict=True)):
        part.params["weight"] = f"{name}.{index}.weight"
        params[f"{name}.{index}.weight"] = array
    bias = graph.param(node, "bias")
    if bias is not None:
        parts[2].params["bias"] = f"{name}.2.bias"
        params[f"{name}.2.bias"] = bias
    return parts, params


def _cast_for_writing(params: dict[str, np.ndarray], parts: list[Node], node: Node, graph: Graph) -> int:
    """Cast the parts' factors (and bias) to the layer's dtypes, C-contiguous, subnormals flushed; returns the count.

    Every value the tool writes for a factorized layer passes through here once: weights take the
    original weight's dtype as its source holds it (``Params.source_dtype``: bfloat16 for a lazy bfloat16
    weight), the bias the original bias's. Subnormals of that dtype become zero
    (``_linalg.flush_subnormals``): near-dead channels of trained weights leave them in the factors,
    and CPU kernels that meet them can run tens of times slower.
    """
    dtypes = {role: graph.params.source_dtype(name) for role, name in node.params.items()
              if role in ("weight", "bias")}
    count = 0
    for part in parts:
        for role, name in part.params.items():
            cast = params[name].astype(dtypes[role], order="C", copy=False)
            params[name], flushed = _linalg.flush_subnormals(cast)
            count += flushed
    return count


def _parts(node: Node, entry: PlanEntry, graph: Graph, arrays: list[np.ndarray] | None,
           ) -> tuple[list[Node], dict[str, np.ndarray]]:
    builder = {TUCKER2: _parts_tucker2, SPATIAL_SVD: _parts_spatial}.get(entry.form or SVD, _parts_svd)
    return builder(node, entry, graph, arrays)


@dataclass(slots=True)
class _Written:
    """One factorized layer as it goes into the new graph: its parts, their arrays (in the layer's dtypes).

    ``flushed`` and ``error`` are None for a structure-only rewrite.
    """

    parts: list[Node]
    params: dict[str, np.ndarray]
    flushed: int | None = None
    error: tuple[float, str] | None = None


def _written(node: Node, entry: PlanEntry, graph: Graph, stats: LayerStats | None) -> _Written:
    """Factorize one layer and write its parts, cast to the layer's dtypes as soon as they are computed.

    Only the written arrays outlive the call: the float64 factors and workspace are the worker's, so a
    rewrite holds the factorized layers in their own dtype plus the workspace of the layers in flight.
    """
    factors = _compute(node, entry, graph, stats)
    parts, params = _parts(node, entry, graph, factors.arrays)
    factors.arrays = []
    if factors.bias_shift is not None:
        bias_name = parts[-1].params["bias"]
        params[bias_name] = params[bias_name].astype(np.float64) + factors.bias_shift
    flushed = _cast_for_writing(params, parts, node, graph)
    error = None if factors.error is None else (factors.error, factors.error_kind)
    del factors
    _release_free_memory()
    return _Written(parts, params, flushed, error)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """The C library's ``malloc_trim`` (glibc), or None where it has none."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


#: glibc's ``mallopt`` parameter for the size from which an allocation gets its own memory mapping.
_M_MMAP_THRESHOLD = -3

#: While layers are factorized, arrays from this size up get their own mapping, returned to the system
#: when freed. glibc's default threshold rises to 32 MiB after the first large array is freed, so a
#: layer's float64 workspace then lands in the heap, and the heaps of the worker threads keep their pages
#: between the arrays that outlive the layer: on ResNet-50, 0.3x the model's size above what is held.
FACTORIZING_MMAP_THRESHOLD = 8 << 20

#: Set when the factorizations are done: glibc's ceiling for its own rising threshold on 64-bit systems,
#: which a process that has freed one large array runs with anyway (setting a threshold stops it rising).
RESTORED_MMAP_THRESHOLD = 32 << 20


@functools.cache
def _mallopt() -> Callable[[int, int], int] | None:
    """The C library's ``mallopt`` (glibc), or None where it has none."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return None


@contextlib.contextmanager
def _large_arrays_mapped() -> Iterator[None]:
    """Within the block, arrays of :data:`FACTORIZING_MMAP_THRESHOLD` bytes and more are mapped on their own."""
    mallopt = _mallopt()
    if mallopt is None:
        yield
        return
    mallopt(_M_MMAP_THRESHOLD, FACTORIZING_MMAP_THRESHOLD)
    try:
        yield
    finally:
        mallopt(_M_MMAP_THRESHOLD, RESTORED_MMAP_THRESHOLD)


def _release_free_memory() -> None:
    """Give the pages of freed workspace back to the system (glibc keeps them in its arenas otherwise).

    A layer's float64 workspace is freed between the small arrays that outlive it (the written factors),
    and glibc keeps such holes resident; without this, a rewrite's resident memory grows past what it holds.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _approximation(node: Node, entry: PlanEntry, graph: Graph, stats: LayerStats | None) -> dict[str, np.ndarray]:
    """The layer's weight (and bias) as its factors multiply back out, in the original param layout."""
    weight = graph.param(node, "weight")
    assert weight is not None
    factors = _compute(node, entry, graph, stats)
    if entry.form == TUCKER2:
        first, core, last = factors.arrays
        approx = _linalg.reconstruct_tucker2(last, core, first).reshape(weight.shape)
    elif entry.form == SPATIAL_SVD:
        approx = _conv_forms.spatial_kernel(*factors.arrays)
    else:
        left, right = factors.arrays
        approx = left @ right
        if node.op is Op.MATMUL and node.attrs.get("weight_side", "right") == "right":
            approx = approx.T
        approx = approx.reshape(weight.shape)
    arrays = {node.params["weight"]: approx.astype(weight.dtype)}
    bias = graph.param(node, "bias")
    if bias is not None and factors.bias_shift is not None:
        arrays[node.params["bias"]] = (bias.astype(np.float64) + factors.bias_shift).astype(bias.dtype)
    return arrays


def approximations(graph: Graph, the_plan: Plan, stats: Mapping[str, LayerStats] | None = None,
                   workers: int | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Per decomposed layer of ``the_plan``: param name -> the full-size array its factors amount to.

    The same factorization :func:`rewrite` computes, multiplied back out (``W' = U V``, or the Tucker-2
    reconstruction) with the bias correction applied, so a model can run with one layer truncated and
    nothing else changed: how the budget policy measures each layer's effect on the model's output.
    """
    entries = [entry for entry in the_plan.decomposed_entries() if entry.name in graph]
    stats = stats or {}
    tasks = [functools.partial(_approximation, graph.node(entry.name), entry, graph, stats.get(entry.name))
             for entry in entries]
    names = [entry.name for entry in entries]
    results = _run_parallel(tasks, names, _workers(workers, len(tasks)), costs=[_cost(entry) for entry in entries])
    return dict(zip(names, results, strict=True))


@dataclass(slots=True)
class RewriteResult:
    """The factorized graph; per decomposed layer its error figure and how many subnormals were flushed.

    Both are empty for a structure-only rewrite.
    """

    graph: Graph
    errors: dict[str, tuple[float, str]]
    flushed: dict[str, int] = field(default_factory=dict)


def _workers(requested: int | None, jobs: int) -> int:
    if requested is not None:
        return max(1, min(requested, jobs))
    return max(1, min(os.cpu_count() or 1, jobs))


#: Called after each layer is decomposed with (layers done, layers in all, name of the layer just done).
Progress = Callable[[int, int, str], None]


def factorization_cost(shape: Sequence[int], form: str | None = SVD, rank: Any = None) -> float:
    """Estimated multiply-adds of factorizing a weight of ``shape``: to schedule or split the dearest first.

    SVD (the default): the smaller side's Gram matrix and its eigensolver; so is a 1x1 kernel's Tucker-2
    (its truncated SVD, no sweeps). A k x k Tucker-2 at ``rank`` ``(out, in)``: a few HOOI sweeps, each two
    projections of the kernel and two Gram matrices with their eigensolvers.
    """
    out, inp = shape[0], shape[1]
    taps = math.prod(shape[2:])
    if form == TUCKER2 and isinstance(rank, tuple) and taps > 1:
        rank_out, rank_in = rank
        sweep = (out * inp * taps * (rank_out + rank_in) + (out * out * rank_in + inp * inp * rank_out) * taps
                 + out**3 + inp**3)
        return float(HOOI_TYPICAL_SWEEPS * sweep)
    small, large = sorted((out, math.prod(shape[1:])))
    return float(small * small * large + small**3)


def _cost(entry: PlanEntry) -> float:
    return factorization_cost(entry.shape, entry.form, entry.rank)


def factor_count(shape: Sequence[int], form: str | None, rank: Any) -> int:
    """Entries of the factors a weight of ``shape`` takes at ``rank`` in ``form`` (bias not counted).

    Tucker-2 at ``(r_out, r_in)``: ``in·r_in + r_in·r_out·taps + r_out·out``; SVD of a matrix (a conv's
    channel SVD) at r: ``r·(out + in·taps)``; spatial SVD: ``_conv_forms.spatial_params``.
    """
    if form == TUCKER2 and isinstance(rank, tuple):
        return _linalg.tucker2_size(shape, rank)
    if form == SPATIAL_SVD:
        return _conv_forms.spatial_params(shape, rank)
    return _conv_forms.channel_params(shape, rank)


#: Float64 copies of a matrix's weight its factorization holds at its peak, written factors included
#: (tracemalloc: 1.4 to 1.9 for matrices from 384 x 1536 to 5504 x 2048 and 1x1 convs; 2.1 for 1x1 kernels at
#: unequal Tucker-2 ranks).
MATRIX_WORKSPACE = 2.0

#: The workspace the memory bound allows beside the decomposed model: this many float64 copies of the
#: largest decomposed layer's weight.
WORKSPACE_WEIGHTS = 3


def factorization_workspace(shape: Sequence[int], form: str | None, data_aware: bool = False,
                            rank: Any = None, itemsize: int = 4) -> float:
    """Estimated peak bytes of factorizing a weight of ``shape`` (``itemsize`` bytes an entry) in ``form``.

    To keep layers in flight within the memory bound. A k x k Tucker-2 at ranks ``rank``: what HOOI holds
    (:func:`_linalg.tucker2_workspace`), data-aware on a float64 kernel beside its float64 and whitened copies;
    otherwise :data:`MATRIX_WORKSPACE` copies of the weight in float64. Data-aware, plus four ``in x in``
    float64 matrices (the moment, its square root and pseudo-inverse, a product).
    """
    weight64 = 8.0 * math.prod(shape)
    taps = math.prod(shape[2:])
    if form == TUCKER2 and taps > 1 and isinstance(rank, tuple):
        estimate = _linalg.tucker2_workspace(shape, rank, 8 if data_aware else itemsize)
        if data_aware:
            estimate += 2 * weight64
    else:
        estimate = MATRIX_WORKSPACE * weight64
    if data_aware:
        features = shape[1] * (taps if form != TUCKER2 else 1)
        estimate += 4 * 8.0 * features * features
    return estimate


@dataclass(frozen=True, slots=True)
class MemoryBudget:
    """Which layers may be factorized at the same time, so that the peak stays within the memory bound.

    Per task: ``workspaces`` (its estimated peak bytes, :func:`factorization_workspace`) and ``outputs``
    (the bytes of the arrays it leaves); ``spare``: the bytes allowed beyond the outputs. What a rewrite
    holds at any time is the outputs of the finished tasks plus the workspace of those in flight; keeping
    that within ``spare`` + all the outputs means: a task starts only when the workspaces in flight, its
    own included, fit in ``spare`` + the outputs of the tasks not finished yet. A task starts alone
    whatever its workspace, so every task runs.
    """

    workspaces: Sequence[float]
    outputs: Sequence[float]
    spare: float

    def admits(self, index: int, running: Iterable[int], unfinished: Iterable[int]) -> bool:
        """Whether task ``index`` may start beside the tasks ``running`` (``unfinished``: running or pending)."""
        running = list(running)
        if not running:
            return True
        in_flight = sum(self.workspaces[task] for task in running) + self.workspaces[index]
        return in_flight <= self.spare + sum(self.outputs[task] for task in unfinished)


def memory_budget(entries: Sequence[PlanEntry], graph: Graph, stats: Mapping[str, LayerStats]) -> MemoryBudget:
    """The :class:`MemoryBudget` of factorizing ``entries``.

    Spare workspace: :data:`WORKSPACE_WEIGHTS` x the largest weight in float64; outputs in the layers' dtypes.
    """
    outputs, workspaces = [], []
    for entry in entries:
        weight = graph.node(entry.name).params["weight"]
        outputs.append(float(graph.params.source_dtype(weight).itemsize
                             * factor_count(entry.shape, entry.form, entry.rank)))
        read = graph.params.dtype(weight).itemsize  # bytes an entry as the layer reads the weight
        workspace = factorization_workspace(entry.shape, entry.form, entry.name in stats, entry.rank, read)
        if graph.params.is_lazy(weight):  # the weight as the layer reads it
            workspace += read * math.prod(entry.shape)
        workspaces.append(workspace)
    largest = max((math.prod(entry.shape) for entry in entries), default=0)
    return MemoryBudget(workspaces, outputs, WORKSPACE_WEIGHTS * 8.0 * largest)


def _run_parallel(tasks: Sequence[Callable[[], _T]], names: Sequence[str], workers: int,
                  progress: Progress | None = None, threads: int | None = None,
                  costs: Sequence[float] | None = None, memory: MemoryBudget | None = None) -> list[_T]:
    """Run the layer tasks on ``workers`` threads, BLAS limited to ``threads // workers`` threads each.

    ``threads`` is the process's budget of threads (default: one per core). With ``costs``, tasks
    start dearest first (longest-processing-time order: the last layers to finish are then short ones,
    not one large layer running alone while the other workers idle; one worker also takes the dearest
    first, while it holds the fewest finished layers); results keep the tasks' order. With ``memory``, a
    task starts only when :meth:`MemoryBudget.admits` it: the first in that order that fits starts, so
    small layers run beside a large one the budget will not pair with another large one.
    """
    if not tasks:
        return []
    blas_threads = max(1, (threads or os.cpu_count() or 1) // workers)
    # scipy brings its own BLAS; threadpool_limits only limits the libraries loaded when it is entered.
    import scipy.linalg  # noqa: F401
    from threadpoolctl import threadpool_limits

    report = progress or (lambda done, total, name: None)
    order = range(len(tasks)) if costs is None else sorted(range(len(tasks)), key=lambda index: -costs[index])
    results: dict[int, _T] = {}
    with threadpool_limits(limits=blas_threads, user_api="blas"):
        if workers == 1:
            for done, index in enumerate(order, start=1):
                results[index] = tasks[index]()
                report(done, len(tasks), names[index])
            return [results[index] for index in range(len(tasks))]
        pending = list(order)
        running: dict[Future[_T], int] = {}
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lowrank") as pool:
            while pending or running:
                for index in list(pending):
                    if len(running) == workers:
                        break
                    if memory is None or memory.admits(index, running.values(), [*pending, *running.values()]):
                        pending.remove(index)
                        # Each task runs in a copy of the caller's context: context settings (the linalg
                        # backend, the size limit) hold in the workers too.
                        running[pool.submit(contextvars.copy_context().run, tasks[index])] = index
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    index = running.pop(future)
                    results[index] = future.result()
                    report(len(results), len(tasks), names[index])
        return [results[index] for index in range(len(tasks))]


def _warn_thin_statistics(names: Sequence[str], stats: Mapping[str, LayerStats]) -> None:
    """One warning when data-aware layers saw fewer calibration rows than they have input features.

    Their factors are fitted to a subspace those few rows span, and the output error measured on the
    same rows is optimistic (exactly 0 once the rank reaches the number of rows): it says little about
    other inputs.
    """
    thin = [(name, stats[name].count, stats[name].moment.shape[0]) for name in names
            if name in stats and stats[name].count < stats[name].moment.shape[0]]
    if thin:
        name, rows, features = thin[0]
        logger.warning("%d of %d data-aware layers saw fewer calibration rows than input features (%r: %d rows "
                       "for %d features); their output errors are measured on those rows and are optimistic: "
                       "calibrate with more data", len(thin), sum(name in stats for name in names), name, rows,
                       features)


def rewrite(graph: Graph, the_plan: Plan, stats: Mapping[str, LayerStats] | None = None,
            weights: bool = True, workers: int | None = None,
            progress: Progress | None = None, threads: int | None = None) -> RewriteResult:
    """A new graph with every decomposed layer of ``the_plan`` replaced by its factors.

    ``stats`` (layer name -> input statistics) makes the factorization data-aware for the layers it
    covers. ``weights=False`` builds the structure only (parameters are zero placeholders, no linear
    algebra runs). ``progress(done, total, name)`` is called as each layer finishes. ``workers``
    threads decompose layers in parallel (default: one per core), sharing ``threads`` BLAS threads
    (default: one per core). ``graph`` itself is not changed.
    """
    entries = [entry for entry in the_plan.decomposed_entries() if entry.name in graph]
    missing = [entry.name for entry in the_plan.decomposed_entries() if entry.name not in graph]
    if missing:
        raise ValueError(f"the plan names layers the graph does not have: {missing}")
    stats = stats or {}
    if weights:
        _warn_thin_statistics([entry.name for entry in entries], stats)
        tasks = [functools.partial(_written, graph.node(entry.name), entry, graph, stats.get(entry.name))
                 for entry in entries]
        names = [entry.name for entry in entries]
        with _large_arrays_mapped():
            layers = list(_run_parallel(tasks, names, _workers(workers, len(tasks)), progress, threads,
                                        [_cost(entry) for entry in entries], memory_budget(entries, graph, stats)))
    else:
        layers = [_Written(*_parts(graph.node(entry.name), entry, graph, None)) for entry in entries]
    new = graph.copy()
    factorized: dict[str, list[str]] = dict(new.meta.get("factorized", {}))
    errors: dict[str, tuple[float, str]] = {}
    flushed: dict[str, int] = {}
    for entry, layer in zip(entries, layers, strict=True):
        node = new.node(entry.name)
        _wire(layer.parts, node)
        new.replace_node(node.name, layer.parts, layer.params, drop_params=node.params.values())
        factorized[entry.name] = [part.name for part in layer.parts]
        if layer.flushed is not None:
            flushed[entry.name] = layer.flushed
        if layer.error is not None:
            errors[entry.name] = layer.error
    new.meta["factorized"] = factorized
    verify(new)
    total = sum(flushed.values())
    if total:
        logger.info("flushed %d subnormal values to zero in the factors of %d layers", total,
                    sum(1 for count in flushed.values() if count))
    return RewriteResult(new, errors, flushed)
