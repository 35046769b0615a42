"""The result of a cross-framework parity run: one row per stage, runtime and output.

``crossframework.convert.parity`` (``lowrank_ir.parity``) fills it; it is plain data (numpy-free),
printed with :meth:`ParityReport.table` and written as JSON with :meth:`ParityReport.to_dict`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["CHECKED", "INFORMATION", "REFERENCE", "ParityReport", "ParityRow"]

#: Rows whose ``check`` is one of these count toward :attr:`ParityReport.ok`.
CHECKED = "checked"
REFERENCE = "reference"
INFORMATION = "information"


@dataclass(slots=True)
class ParityRow:
    """One output of one runtime at one stage, compared with a reference.

    ``stage``: ``"original"`` or ``"decomposed"``. ``runtime``: ``"onnxruntime"``, ``"torch"`` and
    ``"mindspore"`` (rebuilt through the IR), or ``"torch (native)"`` / ``"mindspore (native)"`` (the
    model as given). ``reference``: what it is compared with (empty for the reference itself).
    ``check``: ``"checked"`` (counts toward :attr:`ParityReport.ok`), ``"reference"`` (the row other
    rows of its stage are compared with), or ``"information"`` (the decomposed model against the
    original: decomposition error, not a disagreement between frameworks).
    """

    stage: str
    runtime: str
    output: str
    shape: list[int]
    max_abs: float
    mean_abs: float
    max_rel: float
    mean_rel: float
    reference: str
    check: str

    def within(self, tolerance: float) -> bool:
        return self.check != CHECKED or self.max_rel <= tolerance


@dataclass(slots=True)
class ParityReport:
    """The result of ``lowrank_ir.parity``: one row per stage, runtime and output, and what was run."""

    rows: list[ParityRow]
    tolerance: float
    model: str
    feeds: dict[str, list[int]]
    ratio: float | None = None
    divisor: int | None = None
    decomposed_layers: int = 0
    candidate_layers: int = 0
    parameters: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Every checked row within ``tolerance`` (relative: ``max|d| / max|ref|``)."""
        return all(row.within(self.tolerance) for row in self.rows)

    def failures(self) -> list[ParityRow]:
        """The checked rows above ``tolerance``."""
        return [row for row in self.rows if not row.within(self.tolerance)]

    def worst(self, stage: str | None = None, runtime: str | None = None) -> float:
        """The largest ``max_rel`` of the checked rows of ``stage`` / ``runtime`` (all when None)."""
        return max((row.max_rel for row in self.rows if row.check == CHECKED
                    and stage in (None, row.stage) and runtime in (None, row.runtime)), default=0.0)

    def runtimes(self, stage: str) -> list[str]:
        """The runtimes with rows at ``stage``, in order."""
        return list(dict.fromkeys(row.runtime for row in self.rows if row.stage == stage))

    def information(self) -> float | None:
        """How far the decomposed model is from the original (worst ``max_rel``), None without one."""
        values = [row.max_rel for row in self.rows if row.check == INFORMATION]
        return max(values) if values else None

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "tolerance": self.tolerance, "model": self.model, "feeds": self.feeds,
                "ratio": self.ratio, "divisor": self.divisor, "decomposed_layers": self.decomposed_layers,
                "candidate_layers": self.candidate_layers, "parameters": self.parameters, "skipped": self.skipped,
                "rows": [asdict(row) for row in self.rows]}

    def table(self) -> str:
        """The rows as an aligned text table, with what was compared and the verdict."""
        header = ("stage", "runtime", "output", "shape", "max abs", "mean abs", "max rel", "mean rel", "check")
        body = []
        for row in self.rows:
            shape = "x".join(str(dim) for dim in row.shape) or "scalar"
            if row.check == REFERENCE:
                numbers = ("-", "-", "-", "-")
                verdict = "reference"
            else:
                numbers = (f"{row.max_abs:.3e}", f"{row.mean_abs:.3e}", f"{row.max_rel:.3e}", f"{row.mean_rel:.3e}")
                verdict = ("ok" if row.within(self.tolerance) else "FAIL") if row.check == CHECKED \
                    else "vs original (info)"
            body.append((row.stage, row.runtime, row.output, shape, *numbers, verdict))
        widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
        feeds = ", ".join(f"{name}[{', '.join(str(dim) for dim in shape)}]" for name, shape in self.feeds.items())
        lines = [f"parity of {self.model} on {feeds}: every runtime against onnxruntime, "
                 f"tolerance {self.tolerance:g} on max|d|/max|ref|"]
        lines += ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
                  for line in [header, *body]]
        for name, reason in self.skipped.items():
            lines.append(f"{name}: skipped ({reason})")
        if self.ratio is not None:
            before, after = self.parameters.get("before", 0), self.parameters.get("after", 0)
            information = self.information()
            lines.append(f"decomposed at ratio {self.ratio:g} (divisor {self.divisor}): {self.decomposed_layers} of "
                         f"{self.candidate_layers} layers, float constants {before:,} -> {after:,}; decomposed vs "
                         f"original in onnxruntime: max rel {information or 0.0:.3e} (information, not checked)")
        failures = self.failures()
        if failures:
            worst = max(failures, key=lambda row: row.max_rel)
            lines.append(f"FAIL: {len(failures)} of {sum(row.check == CHECKED for row in self.rows)} checked rows "
                         f"above {self.tolerance:g} (worst: {worst.runtime} {worst.stage} {worst.output!r}, max rel "
                         f"{worst.max_rel:.3e})")
        else:
            lines.append(f"PASS: every runtime within {self.tolerance:g} of onnxruntime (worst max rel "
                         f"{self.worst():.3e})")
        return "\n".join(lines)
