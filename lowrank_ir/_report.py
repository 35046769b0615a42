"""Per-layer figures of a decomposition: rank, parameters and FLOPs before/after, error.

FLOPs count 2 per multiply-add. When the frontend knows how many output positions a layer computes
per sample (``out_positions``, and ``in_positions`` for a conv's input), FLOPs are per sample;
otherwise they are per output position (one token, one output pixel).

``energy`` (optional, :func:`spectral_energy`) is the fraction of a weight's spectral energy its
planned rank keeps, ``Σ_{i<r} s_i² / Σ s_i²``: of the weight matrix for SVD, of the weaker of the
kernel's out- and in-mode unfoldings for Tucker-2 (an upper bound on what the factors keep).

Nodes a frontend recognised as candidate layers but kept opaque (``graph.meta["unlowered"]``: node name
-> ``op``, ``weight``, ``shape``, ``reason``; e.g. an ONNX ``ConvTranspose``, or a ``Gemm`` with
``transA=1``) get a row too, in graph order, with their reason: their weight's parameters before and
after, and no FLOPs (the IR does not know their shapes).

:func:`spectra` gives each decomposed layer's normalised singular-value spectrum ``s_i / s_0`` (of the
weight matrix ``[out, in]``; of ``W C^{1/2}`` when the layer's calibration statistics are given, the
spectrum data-aware decomposition truncates; of the out-mode unfolding for Tucker-2; of the form's
matrix for a k x k conv in channel or spatial SVD, whitened as its fit is), truncated to its first
values, with the planned rank and the energy it keeps, ``Σ_{i<r} s_i² / Σ s_i²``.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from lowrank_ir import _conv_forms
from lowrank_ir._budget import matrix_spectrum
from lowrank_ir._engine import (
    CONV_FORMS,
    SPATIAL_SVD,
    SVD,
    TUCKER2,
    LayerStats,
    Plan,
    PlanEntry,
    _matrix_view,
    factor_count,
    form_whitening,
)
from lowrank_ir._ir import Graph, Node, Op

__all__ = ["SPECTRUM_LENGTH", "LayerReport", "Report", "build_report", "report_document", "spectra", "spectral_energy"]

#: How many leading singular values :func:`spectra` keeps per layer (the report's truncated spectra).
SPECTRUM_LENGTH = 256


@dataclass(slots=True)
class LayerReport:
    """One layer's line of the report."""

    name: str
    op: str
    shape: list[int]
    form: str | None
    rank: int | list[int] | None
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    error: float | None = None
    error_kind: str | None = None
    reason: str = ""
    energy: float | None = None
    weight: str = ""  # the weight's param name (for tied weights, the first layer's): counted once in totals
    flushed: int = 0  # subnormal values of the written factors set to zero


def _positions(node: Node) -> tuple[int, int]:
    out = int(node.attrs.get("out_positions", 1))
    return int(node.attrs.get("in_positions", out)), out


def _layer_figures(entry: PlanEntry, node: Node, has_bias: bool) -> tuple[int, int, int, int]:
    """(params before, params after, flops before, flops after) of one layer."""
    shape = entry.shape
    bias = shape[0] if has_bias else 0
    in_pos, out_pos = _positions(node)
    if node.op in (Op.CONV, Op.CONV_TRANSPOSE):
        out, inp, taps = shape[0], shape[1], math.prod(shape[2:])
        before_params = out * inp * taps + bias
        before_flops = 2 * out * inp * taps * out_pos
        if entry.form == SVD and isinstance(entry.rank, int):  # channel SVD; a 1x1 conv's compact layout
            after = factor_count(shape, entry.form, entry.rank)
            return before_params, after + bias, before_flops, 2 * after * out_pos
        if entry.form == SPATIAL_SVD and isinstance(entry.rank, int):  # the first conv keeps the input's columns
            columns = int(node.attrs.get("stride", (1, 1))[1])
            rank, height, width = entry.rank, shape[2], shape[3]
            return (before_params, factor_count(shape, entry.form, rank) + bias, before_flops,
                    2 * rank * (inp * height * columns + out * width) * out_pos)
        if entry.form != TUCKER2:
            return before_params, before_params, before_flops, before_flops
        assert isinstance(entry.rank, tuple)
        r_out, r_in = entry.rank
        after_params = factor_count(shape, entry.form, entry.rank) + bias
        after_flops = 2 * (inp * r_in * in_pos + r_in * r_out * taps * out_pos + r_out * out * out_pos)
        return before_params, after_params, before_flops, after_flops
    rows, cols = shape[0], shape[1]
    before_params = rows * cols + bias
    before_flops = 0 if node.op is Op.EMBEDDING else 2 * rows * cols * out_pos
    if entry.form != SVD:
        return before_params, before_params, before_flops, before_flops
    assert isinstance(entry.rank, int)
    rank = entry.rank
    after_params = factor_count(shape, entry.form, rank) + bias
    # An Embedding becomes a lookup into [rows, rank] then a Linear rank -> cols.
    after_flops = (2 * rank * cols * out_pos if node.op is Op.EMBEDDING
                   else 2 * rank * (rows + cols) * out_pos)
    return before_params, after_params, before_flops, after_flops


def _kept_energy(matrix: np.ndarray, rank: int) -> float:
    values = np.linalg.svd(matrix.astype(np.float64), compute_uv=False) ** 2
    total = float(values.sum())
    return float(values[:rank].sum()) / total if total > 0 else 1.0


def spectral_energy(graph: Graph, plan: Plan) -> dict[str, float]:
    """Per decomposed layer of ``plan``, the fraction of spectral energy its rank keeps (see module doc)."""
    energy = {}
    for entry in plan.decomposed_entries():
        weight = graph.param(graph.node(entry.name), "weight")
        if weight is None or not np.isfinite(weight).all():
            continue
        if entry.form == TUCKER2 and isinstance(entry.rank, tuple):
            rank_out, rank_in = entry.rank
            out_mode = weight.reshape(weight.shape[0], -1)
            in_mode = np.moveaxis(weight, 1, 0).reshape(weight.shape[1], -1)
            energy[entry.name] = min(_kept_energy(out_mode, rank_out), _kept_energy(in_mode, rank_in))
        elif isinstance(entry.rank, int):
            energy[entry.name] = _kept_energy(_form_matrix(entry, weight), entry.rank)
    return energy


def _form_matrix(entry: PlanEntry, weight: np.ndarray) -> np.ndarray:
    """The matrix a conv's two-factor form truncates (``lowrank_ir._conv_forms``); ``[out, in·T]`` for channel SVD.

    Spatial SVD's is ``spatial_matrix(K)ᵀ``, its input side (the rows ``(c, i)``) last, as data-aware
    whitening sees it; every other single-rank entry's is the weight as ``[out, rest]``.
    """
    if entry.form == SPATIAL_SVD:
        return _conv_forms.spatial_matrix(weight).T
    return weight.reshape(weight.shape[0], -1)


def _two_factor_kxk(entry: PlanEntry) -> bool:
    return entry.op is Op.CONV and entry.form in CONV_FORMS and math.prod(entry.shape[2:]) > 1


def spectra(graph: Graph, plan: Plan, stats: dict[str, LayerStats] | None = None,
            length: int = SPECTRUM_LENGTH) -> dict[str, dict[str, Any]]:
    """Per decomposed layer of ``plan``: its normalised spectrum, planned rank and kept energy (see module doc).

    Each value is ``{"values": [s_i / s_0 for the first length], "count": all values, "rank": r,
    "kept_energy": fraction, "whitened": bool}``; a layer whose weight is not finite is left out.
    """
    stats = stats or {}
    result: dict[str, dict[str, Any]] = {}
    for entry in plan.decomposed_entries():
        node = graph.node(entry.name)
        weight = graph.param(node, "weight")
        if weight is None or not np.isfinite(weight).all():
            continue
        rank = entry.rank[0] if isinstance(entry.rank, tuple) else entry.rank
        layer_stats = stats.get(entry.name)
        if _two_factor_kxk(entry):  # a k x k conv in channel or spatial SVD: its form's matrix and whitening
            matrix = _form_matrix(entry, np.asarray(weight))
            moment = form_whitening(entry.form or SVD, layer_stats, entry.shape)
        else:
            matrix = _matrix_view(node, np.asarray(weight))
            moment = None if layer_stats is None else layer_stats.moment
        whitened = moment is not None and moment.shape[0] == matrix.shape[1]
        squared = matrix_spectrum(matrix, moment if whitened else None)
        values = np.sqrt(squared)
        total = float(squared.sum())
        top = float(values[0]) if values.size and values[0] > 0 else 1.0
        result[entry.name] = {
            "values": [round(float(value) / top, 6) for value in values[:length]], "count": int(values.size),
            "rank": int(rank or 0), "kept_energy": float(squared[:rank].sum()) / total if total > 0 else 1.0,
            "whitened": bool(whitened)}
    return result


def build_report(graph: Graph, plan: Plan, errors: dict[str, tuple[float, str]] | None = None,
                 energy: dict[str, float] | None = None, flushed: dict[str, int] | None = None) -> Report:
    """The report of ``plan`` over the (original) ``graph``.

    With ``errors`` and ``flushed`` (subnormals set to zero) from the rewrite and ``energy``
    (:func:`spectral_energy`) when known.
    """
    errors = errors or {}
    energy = energy or {}
    flushed = flushed or {}
    layers = []
    owners: dict[Hashable, str] = {}
    for entry in plan.entries.values():
        node = graph.node(entry.name)
        weight_name = node.params.get("weight", "")
        key = graph.params.storage_key(weight_name) if weight_name in graph.params else None
        if key is not None:
            # One array under several names (PyTorch's tied weights are views of one tensor): its first name.
            weight_name = owners.setdefault(key, weight_name)
        figures = _layer_figures(entry, node, "bias" in node.params)
        error = errors.get(entry.name)
        rank = list(entry.rank) if isinstance(entry.rank, tuple) else entry.rank
        layers.append(LayerReport(entry.name, entry.op.value, list(entry.shape), entry.form, rank, *figures,
                                  None if error is None else error[0], None if error is None else error[1],
                                  entry.reason, energy.get(entry.name), weight_name, flushed.get(entry.name, 0)))
    layers.extend(_unlowered_rows(graph))
    order = {node.name: position for position, node in enumerate(graph.nodes)}
    layers.sort(key=lambda layer: order.get(layer.name, len(order)))
    return Report(layers, per_sample=any("out_positions" in node.attrs for node in graph.layers()))


def _unlowered_rows(graph: Graph) -> list[LayerReport]:
    """The rows of the candidate layers the frontend kept opaque (see the module docstring)."""
    rows = []
    for name, info in graph.meta.get("unlowered", {}).items():
        if name not in graph:
            continue
        shape = [int(dim) for dim in info.get("shape", [])]
        params = math.prod(shape) if shape else 0
        rows.append(LayerReport(name, str(info["op"]), shape, None, None, params, params, 0, 0,
                                reason=str(info["reason"]), weight=str(info.get("weight", ""))))
    return rows


class Report:
    """What a decomposition did, layer by layer, with totals over the layers considered."""

    __slots__ = ("layers", "per_sample")

    def __init__(self, layers: list[LayerReport], per_sample: bool = False) -> None:
        self.layers = layers
        self.per_sample = per_sample

    def __repr__(self) -> str:
        totals = self.totals()
        return (f"Report({totals['decomposed']} of {len(self.layers)} layers decomposed, params "
                f"{totals['params_before']} -> {totals['params_after']})")

    def __iter__(self) -> Any:
        return iter(self.layers)

    def __getitem__(self, name: str) -> LayerReport:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer {name!r} in the report")

    def totals(self) -> dict[str, Any]:
        """Sums over the layers; a weight several layers share (tied) counts its parameters once."""
        owners: dict[str, LayerReport] = {}
        for layer in self.layers:
            owners.setdefault(layer.weight or f"#{layer.name}", layer)
        counted = list(owners.values())
        return {
            "layers": len(self.layers),
            "decomposed": sum(1 for layer in self.layers if layer.form),
            "params_before": sum(layer.params_before for layer in counted),
            "params_after": sum(layer.params_after for layer in counted),
            "flops_before": sum(layer.flops_before for layer in self.layers),
            "flops_after": sum(layer.flops_after for layer in self.layers),
            "flops_unit": "per sample" if self.per_sample else "per output position",
            "flushed": sum(layer.flushed for layer in self.layers),
        }

    def to_dict(self) -> dict[str, Any]:
        return {"totals": self.totals(), "layers": [asdict(layer) for layer in self.layers]}

    def table(self, only_decomposed: bool = False) -> str:
        """A plain-text table, one line per layer, then the totals."""
        with_energy = any(layer.energy is not None for layer in self.layers)
        header: tuple[str, ...] = ("layer", "kind", "weight", "rank", "params", "FLOPs", "error", "note")
        if with_energy:  # the spectrum summary: energy kept at the planned rank
            header = (*header[:6], "energy", *header[6:])
        rows: list[tuple[str, ...]] = []
        for layer in self.layers:
            if only_decomposed and not layer.form:
                continue
            rank = "-" if layer.rank is None else (
                "x".join(str(r) for r in layer.rank) if isinstance(layer.rank, list) else str(layer.rank))
            error = "" if layer.error is None else f"{layer.error:.4f} {layer.error_kind}"
            row: tuple[str, ...] = (layer.name, layer.op, "x".join(str(d) for d in layer.shape), rank,
                                    f"{_human(layer.params_before)} -> {_human(layer.params_after)}",
                                    f"{_human(layer.flops_before)} -> {_human(layer.flops_after)}")
            if with_energy:
                row += ("" if layer.energy is None else f"{layer.energy:.3f}",)
            rows.append((*row, error, layer.reason))
        totals = self.totals()
        total: tuple[str, ...] = ("TOTAL", f"{totals['decomposed']}/{totals['layers']}", "", "",
                                  f"{_human(totals['params_before'])} -> {_human(totals['params_after'])}",
                                  f"{_human(totals['flops_before'])} -> {_human(totals['flops_after'])}")
        note = f"FLOPs {totals['flops_unit']}"
        if totals["flushed"]:
            note += f"; {totals['flushed']} subnormal values flushed to zero"
        rows.append((*total, *([""] if with_energy else []), "", note))
        widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header) - 1)]
        lines = []
        for row in [header, *rows]:
            cells = [str(cell).ljust(width) for cell, width in zip(row, widths, strict=False)]
            lines.append("  ".join([*cells, str(row[-1])]).rstrip())
        return "\n".join(lines)


def _human(count: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(count) >= size:
            return f"{count / size:.2f}{unit}"
    return str(count)


def report_document(report: Report, *, spectra: dict[str, dict[str, Any]] | None = None,
                    sensitivities: dict[str, float] | None = None, latency: dict[str, Any] | None = None,
                    policy: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    """What ``report.json`` holds: the report's totals and layers, and what explains them.

    Keys: ``tool``, ``version``, ``created`` (UTC, ISO 8601), ``policy`` (how the ranks were chosen),
    ``totals``, ``layers`` (:meth:`Report.to_dict`), ``spectra`` (:func:`spectra`), ``sensitivities``
    (each layer's measured relative output error under a budget with data), ``latency`` (what a latency
    budget measured), then ``fields`` as given (the model, the output, a validation...).
    """
    import datetime

    from lowrank_ir import __version__

    return {"tool": "lowrank-ir", "version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "policy": policy or {}, **report.to_dict(), "spectra": spectra or {},
            "sensitivities": sensitivities or {}, "latency": latency or {}, **fields}
