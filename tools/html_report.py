"""The visual report: ``report.json`` as one self-contained HTML page, and ``lowrank report``.

``--report FILE.html`` on ``decompose`` (and ``lowrank report report.json -o report.html``) writes one
HTML file with its images embedded as PNG data URIs (matplotlib, the ``report`` extra: nothing is
fetched when the page is opened):

* each decomposed layer's normalised singular-value spectrum ``s_i / s_0`` (log scale) with the chosen
  rank marked and the kept part shaded; whitened (``W C^{1/2}``) when the decomposition was data-aware;
* rank (as a fraction of the full rank), kept energy and output error per layer;
* measured sensitivities and the budget's allocation (parameters kept per layer), when a budget used them;
* the totals (parameters and FLOPs before/after), and latency where it was measured;
* a table of every layer, decomposed or with the reason it is not.

The JSON it reads is what the commands write (``lowrank_ir._report.report_document``); the ONNX
command's older shape, with the report under ``"layers"``, is read too.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import math
from pathlib import Path
from typing import Any

from tools.common import UsageError, command_outputs, policy_of

__all__ = ["add_parser", "check_report_option", "decomposer_document", "is_html", "render_html",
           "report_command", "write_report"]

#: Spectra drawn per image (a grid of small plots), so that a large model gives several images, not a huge one.
SPECTRA_PER_IMAGE = 24
COLUMNS = 6


def decomposer_document(decomposer: Any, args: argparse.Namespace, **fields: Any) -> dict[str, Any]:
    """``report.json`` of a ``Decompose`` that has decomposed: report, spectra, sensitivities, latency, policy."""
    from lowrank_ir._report import report_document

    return report_document(decomposer.report, spectra=decomposer.spectra(), sensitivities=decomposer.sensitivities,
                           latency=decomposer.latency, policy=policy_of(args), model=args.model,
                           decompose_config=decomposer.decompose_config, **fields)


def is_html(name: str | Path) -> bool:
    """Whether a ``--report`` file name asks for the HTML page (``.html``) rather than the JSON."""
    return Path(name).suffix.lower() in (".html", ".htm")


def check_report_option(name: str | None) -> None:
    """Before any work: a ``--report`` page needs matplotlib (``ImportError`` naming the extra otherwise)."""
    if name is not None and is_html(name):
        _pyplot()


def write_report(document: dict[str, Any], path: Path, name: str | Path) -> None:
    """``document`` to ``path``: the HTML page when the user's file ``name`` ends in ``.html``, else the JSON.

    (``path`` may be a temporary name the file is moved from.)
    """
    from lowrank_ir import atomic_write, write_json

    if not is_html(name):
        write_json(path, document)
        return
    page = render_html(document)
    with atomic_write(path, "w") as stream:
        stream.write(page)


# ------------------------------------------------------------------------------------------ reading

def _layers(document: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(layers, totals) of a report document, in either shape the commands write."""
    layers: Any = document.get("layers")
    totals: Any = document.get("totals")
    if isinstance(layers, dict):  # the ONNX command's report: {"layers": {"totals": ..., "layers": [...]}}
        layers, totals = layers.get("layers"), layers.get("totals")
    if not isinstance(layers, list) or not all(isinstance(layer, dict) and "name" in layer for layer in layers):
        raise ValueError("the report has no list of layers (each an object with a 'name'); give a report.json "
                         "that lowrank inspect --json or lowrank decompose --report wrote")
    return layers, totals if isinstance(totals, dict) else {}


# ------------------------------------------------------------------------------------------ images

def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("the HTML report draws with matplotlib, which is not installed: pip install "
                          "'lowrank-ir[report]' (or matplotlib), or write the report as .json") from err
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(figure: Any) -> str:
    """The figure as a PNG data URI (closed afterwards)."""
    plt = _pyplot()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _spectra_images(spectra: dict[str, dict[str, Any]]) -> list[str]:
    plt = _pyplot()
    names = [name for name, spectrum in spectra.items() if spectrum.get("values")]
    images = []
    for start in range(0, len(names), SPECTRA_PER_IMAGE):
        chunk = names[start:start + SPECTRA_PER_IMAGE]
        rows = math.ceil(len(chunk) / COLUMNS)
        columns = min(COLUMNS, len(chunk))
        figure, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.1 * rows), squeeze=False)
        for axis in axes.flat[len(chunk):]:
            axis.set_visible(False)
        for axis, name in zip(axes.flat, chunk, strict=False):
            spectrum = spectra[name]
            values = [max(float(value), 1e-12) for value in spectrum["values"]]
            rank = int(spectrum.get("rank") or 0)
            axis.semilogy(range(1, len(values) + 1), values, color="#1f77b4", linewidth=1.2)
            if 0 < rank <= len(values):
                axis.fill_between(range(1, rank + 1), values[:rank], 1e-12, color="#1f77b4", alpha=0.15)
            axis.axvline(rank, color="#d62728", linewidth=1.2, linestyle="--")
            axis.set_ylim(max(min(values), 1e-6) / 2, 1.5)
            kept = spectrum.get("kept_energy")
            label = f"r={rank}" + ("" if kept is None else f", kept {float(kept):.3f}")
            axis.set_title(f"{name}\n{label}" + (" (whitened)" if spectrum.get("whitened") else ""), fontsize=7)
            axis.tick_params(labelsize=6)
        figure.suptitle("normalised singular values s_i / s_0 (dashed: chosen rank)", fontsize=9)
        figure.tight_layout()
        images.append(_png(figure))
    return images


def _per_layer_image(layers: list[dict[str, Any]], spectra: dict[str, dict[str, Any]]) -> str | None:
    decomposed = [layer for layer in layers if layer.get("form")]
    if not decomposed:
        return None
    plt = _pyplot()
    names = [layer["name"] for layer in decomposed]
    fraction = []
    for layer in decomposed:
        rank = layer.get("rank")
        rank = max(rank) if isinstance(rank, list) else rank
        shape = layer.get("shape") or [1, 1]
        full = min(int(shape[0]), int(math.prod(shape[1:]))) if len(shape) > 1 else 1
        fraction.append(float(rank or 0) / max(full, 1))
    energy = [spectra.get(name, {}).get("kept_energy", layer.get("energy")) for name, layer in zip(names, decomposed,
                                                                                                  strict=True)]
    errors = [layer.get("error") for layer in decomposed]
    panels: list[tuple[str, list[Any]]] = [("rank / full rank", fraction), ("kept energy", energy),
                                           ("relative error (blue: output, grey: weight)", errors)]
    colours = {"rank / full rank": ["#1f77b4"] * len(names), "kept energy": ["#2ca02c"] * len(names)}
    colours[panels[2][0]] = ["#1f77b4" if layer.get("error_kind") == "output" else "#7f7f7f" for layer in decomposed]
    height = max(2.5, 0.22 * len(names) + 1.0)
    figure, axes = plt.subplots(1, len(panels), figsize=(12, height), sharey=True)
    positions = list(range(len(names)))
    for axis, (title, values) in zip(axes, panels, strict=True):
        shown = [float(value) if value is not None else 0.0 for value in values]
        axis.barh(positions, shown, color=colours[title])
        if title.startswith("relative error") and any(value > 0 for value in shown):
            axis.set_xscale("log")  # errors span orders of magnitude
        axis.set_title(title, fontsize=9)
        axis.tick_params(labelsize=7)
        if all(value is None for value in values):
            axis.text(0.5, 0.5, "not measured", transform=axis.transAxes, ha="center", fontsize=8)
    axes[0].set_yticks(positions, names)
    axes[0].invert_yaxis()
    figure.tight_layout()
    return _png(figure)


def _sensitivity_image(layers: list[dict[str, Any]], sensitivities: dict[str, float]) -> str | None:
    if not sensitivities:
        return None
    plt = _pyplot()
    by_name = {layer["name"]: layer for layer in layers}
    names = list(sensitivities)
    kept = [by_name[name]["params_after"] / max(by_name[name]["params_before"], 1) if name in by_name else 0.0
            for name in names]
    height = max(2.5, 0.22 * len(names) + 1.0)
    figure, axes = plt.subplots(1, 2, figsize=(11, height), sharey=True)
    positions = list(range(len(names)))
    axes[0].barh(positions, [max(float(sensitivities[name]), 1e-12) for name in names], color="#9467bd")
    axes[0].set_xscale("log")
    axes[0].set_title("measured sensitivity (log)", fontsize=9)
    axes[1].barh(positions, kept, color="#ff7f0e")
    axes[1].axvline(1.0, color="grey", linewidth=0.8)
    axes[1].set_title("budget allocation: parameters after / before", fontsize=9)
    axes[0].set_yticks(positions, names)
    axes[0].invert_yaxis()
    for axis in axes:
        axis.tick_params(labelsize=7)
    figure.tight_layout()
    return _png(figure)


def _totals_image(totals: dict[str, Any]) -> str | None:
    pairs = [(label, float(totals[f"{key}_before"]), float(totals.get(f"{key}_after") or 0))
             for label, key in (("parameters", "params"), ("FLOPs", "flops")) if totals.get(f"{key}_before")]
    if not pairs:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(pairs), figsize=(4 * len(pairs), 2.6), squeeze=False)
    for axis, (label, before, after) in zip(axes.flat, pairs, strict=True):
        axis.bar(["before", "after"], [before, after], color=["#7f7f7f", "#1f77b4"])
        axis.set_title(f"{label}: {after / before:.1%} kept", fontsize=9)
        axis.tick_params(labelsize=7)
    figure.tight_layout()
    return _png(figure)


def _latency_image(latency: dict[str, Any]) -> str | None:
    per_layer = latency.get("layers") if isinstance(latency, dict) else None
    if not per_layer:
        return None
    plt = _pyplot()
    names = list(per_layer)
    height = max(2.5, 0.22 * len(names) + 1.0)
    figure, axis = plt.subplots(figsize=(8, height))
    positions = list(range(len(names)))
    axis.barh([p - 0.2 for p in positions], [per_layer[n]["before_ms"] for n in names], height=0.4,
              label="whole", color="#7f7f7f")
    axis.barh([p + 0.2 for p in positions], [per_layer[n]["after_ms"] for n in names], height=0.4,
              label="decomposed", color="#1f77b4")
    axis.set_yticks(positions, names)
    axis.invert_yaxis()
    axis.set_xlabel("ms (onnxruntime, per layer)", fontsize=8)
    axis.legend(fontsize=7)
    axis.tick_params(labelsize=7)
    figure.tight_layout()
    return _png(figure)


# ------------------------------------------------------------------------------------------ the page

STYLE = """body{font-family:sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}
td:first-child,th:first-child,td:last-child{text-align:left}img{max-width:100%;display:block;margin:1em 0}
.meta{color:#555;font-size:13px}"""


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, list):
        return "x".join(str(item) for item in value)
    return html.escape(str(value))


def _table(rows: list[list[Any]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(name)}</th>" for name in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(value)}</td>" for value in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _image(uri: str | None, alt: str) -> str:
    return "" if uri is None else f'<img src="{uri}" alt="{html.escape(alt)}">'


def render_html(document: dict[str, Any]) -> str:
    """The report as one self-contained HTML page (see the module docstring)."""
    if not isinstance(document, dict):
        raise ValueError(f"a report is a JSON object, got a {type(document).__name__}")
    layers, totals = _layers(document)
    spectra = document.get("spectra") or {}
    sensitivities = document.get("sensitivities") or {}
    latency = document.get("latency") or {}
    policy = document.get("policy") or {}
    model = str(document.get("model", ""))
    title = f"lowrank report: {Path(model).name or model}"
    meta = [model, f"{document.get('tool', 'lowrank-ir')} {document.get('version', '')}",
            f"created {document.get('created', 'unknown')}",
            "policy " + ", ".join(f"{key}={value}" for key, value in policy.items() if value is not None)]
    whitened = any(spectrum.get("whitened") for spectrum in spectra.values())
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body>",
             f"<h1>{html.escape(title)}</h1><p class='meta'>{html.escape(' · '.join(meta))}</p>",
             "<h2>Totals</h2>",
             _table([[key, value] for key, value in totals.items()], ["total", "value"]),
             _image(_totals_image(totals), "parameters and FLOPs before and after")]
    validation = document.get("validation")
    if isinstance(validation, dict) and isinstance(validation.get("outputs"), list):
        columns = ["name", "shape", "max_abs", "mean_abs", "max_rel", "mean_rel"]
        rows = [[output.get(column) for column in columns] for output in validation["outputs"]
                if isinstance(output, dict)]
        parts += ["<h2>Validation in onnxruntime</h2>", _table(rows, ["output", "shape", "max |d|", "mean |d|",
                                                                   "max rel", "mean rel"])]
    parts += ["<h2>Per layer</h2>", _image(_per_layer_image(layers, spectra), "rank, kept energy and error")]
    if spectra:
        parts += [f"<h2>Spectra{' (whitened by the calibration data)' if whitened else ''}</h2>",
                  *(_image(uri, "singular-value spectra") for uri in _spectra_images(spectra))]
    if sensitivities:
        parts += ["<h2>Measured sensitivities and budget allocation</h2>",
                  _image(_sensitivity_image(layers, sensitivities), "sensitivities and allocation")]
    if latency:
        summary = {key: latency.get(key) for key in ("target", "met", "original_ms", "decomposed_ms", "ratio")}
        parts += ["<h2>Latency</h2>", _table([[key, value] for key, value in summary.items()], ["latency", "value"]),
                  _image(_latency_image(latency), "latency per layer")]
    rows = [[layer.get("name"), layer.get("op"), layer.get("shape"), layer.get("rank"), layer.get("params_before"),
             layer.get("params_after"), layer.get("energy") if layer.get("name") not in spectra
             else spectra[layer["name"]].get("kept_energy"), layer.get("error"), layer.get("reason")]
            for layer in layers]
    parts += ["<h2>Every layer</h2>", _table(rows, ["layer", "kind", "weight", "rank", "params before",
                                                    "params after", "kept energy", "error", "note"]),
              "</body></html>"]
    return "\n".join(part for part in parts if part)


# ------------------------------------------------------------------------------------------ the command

def report_command(args: argparse.Namespace) -> int:
    """``lowrank report report.json -o report.html``."""
    from lowrank_ir._files import read_json

    if not Path(args.report_json).is_file():
        raise UsageError(f"report {args.report_json!r} does not exist")
    if not is_html(args.output):
        raise UsageError(f"-o {args.output!r}: the page is written to a file ending in .html")
    document = read_json(args.report_json, f"report {args.report_json!r}", schema=dict)
    outputs = command_outputs(args)
    outputs.read(args.report_json, "the report")
    output = outputs.file(args.output, "-o")
    outputs.check()
    page = render_html(document)  # every image drawn before anything is written
    with outputs.writing() as stage:
        stage.path(output).write_text(page, encoding="utf-8")
    print(f"wrote {args.output}")
    return 0


def add_parser(commands: Any) -> None:
    """Register ``report`` on the ``lowrank`` command line's subparsers."""
    parser = commands.add_parser(
        "report", help="draw a report.json as one self-contained HTML page",
        description="Turn the report.json that 'lowrank decompose --report' or 'inspect --json' wrote into one "
                    "HTML file with embedded images: spectra with the chosen ranks, rank / kept energy / error per "
                    "layer, sensitivities and budget allocation, totals, latency (needs matplotlib).",
        epilog="example: lowrank report out/report.json -o report.html")
    parser.add_argument("report_json", metavar="REPORT.json", help="the report to draw")
    parser.add_argument("-o", "--output", required=True, metavar="OUT.html", help="the HTML file to write")
    parser.add_argument("--force", action="store_true", help="replace OUT.html if it exists")
    parser.set_defaults(run=report_command)
