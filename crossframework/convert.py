"""Moving a model between frameworks through the IR, and checking that the frameworks agree.

Three entry points, each a plain function over the frontends and backends:

- :func:`convert` turns an ONNX model (a file, a ``ModelProto``) or a dataflow :class:`Graph` into a
  trainable native model: ``backends.torch.from_dataflow`` (a ``GraphModule``) or
  ``backends.mindspore.from_dataflow`` (a ``GraphCell``), parameters named after the IR params.
- :func:`save_converted` / :func:`load_converted` store a converted model as one folder::

      OUT/converted.json        what the folder holds (framework, weights file, format version)
      OUT/graph.json            the IR graph: structure (lowrank_ir.save_graph) ...
      OUT/params.safetensors    ... and its params, the weights at the time of saving
      OUT/model.pt | model.ckpt the native weights: a PyTorch state dict / a MindSpore checkpoint

  The folder appears complete or not at all (written beside ``OUT``, then moved), not
  group/other-writable. Loading rebuilds the structure from the graph (``from_dataflow(graph,
  weights=False)``) and loads the native weights file, or another one saved from the same model
  (``weights=``, e.g. after fine-tuning), strictly.
- :func:`parity` runs one model in onnxruntime, PyTorch and MindSpore (rebuilt through the IR) and,
  when given, in its own framework, on the same inputs, and compares every output with onnxruntime's:
  max and mean absolute and relative differences (``max|d| / max|ref|``, ``mean|d| / mean|ref|``).
  Then the same for the model decomposed at ``ratio`` (the ONNX facade, ``Decompose``), with how far
  the decomposed model is from the original as information. :class:`ParityReport` holds the rows.

This module sits above the backends: it orchestrates several frontends and backends, which the core
does not (``lowrank_ir.convert`` / ``parity`` ... hand their calls on to it, through the registry). It
imports no framework itself: the PyTorch and MindSpore backends are loaded when a model of theirs is
handled (``lowrank_ir._registry.native_backend``, typed by the ``NativeBackend`` protocol: ``from_dataflow``,
``graph_params``, ``save_weights`` / ``load_weights`` (strict), ``for_inference``, ``as_tensors`` /
``numpy_copy``, ``run_numpy`` and ``export_onnx``), and the ONNX frontend and backend when the work
needs onnx or onnxruntime.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lowrank_ir._api import Decompose
from lowrank_ir._engine import plan
from lowrank_ir._files import atomic_directory, check_schema, path_inside, read_json
from lowrank_ir._ir import Graph
from lowrank_ir._limits import check_array, limited
from lowrank_ir._parity_report import CHECKED, INFORMATION, REFERENCE, ParityReport, ParityRow
from lowrank_ir._policy import Policy, plain_number, validate_divisor, validate_ratio
from lowrank_ir._registry import NATIVE_FRAMEWORKS, framework_of, native_backend
from lowrank_ir.serde import GRAPH_FILE, PARAMS_FILE, load_graph, save_graph

__all__ = ["NATIVE_FRAMEWORKS", "ParityReport", "ParityRow", "convert", "load_converted", "parity", "save_converted"]

logger = logging.getLogger(__name__)

#: The file describing a converted-model folder, and its format.
MANIFEST_FILE = "converted.json"
MANIFEST_FORMAT = "lowrank-ir converted model"
MANIFEST_VERSION = 1

#: What ``converted.json`` must hold (``read_manifest`` names the file and the key when it does not).
MANIFEST_SCHEMA = {"format": str, "version": int, "framework": str, "weights": str, "graph?": str, "params?": str,
                   "model_class?": str, "inputs?": [str], "outputs?": [str]}

#: The native weights file of a converted-model folder, per framework.
WEIGHTS_FILES = {"torch": "model.pt", "mindspore": "model.ckpt"}

#: The attribute under which a converted model keeps the IR graph it was rebuilt from.
GRAPH_ATTRIBUTE = "source_graph"

# ------------------------------------------------------------------------------------------- checking

def _check_target(to: object) -> str:
    if not isinstance(to, str) or to not in NATIVE_FRAMEWORKS:
        raise ValueError(f"cannot convert to {to!r}: choose one of {', '.join(NATIVE_FRAMEWORKS)}")
    return to


def _is_onnx_source(model: object) -> bool:
    if isinstance(model, (str, os.PathLike)):
        return True
    try:
        return framework_of(model) == "onnx"
    except TypeError:
        return False


def _as_graph(model: Any, input_shapes: Mapping[str, Sequence[int]] | None) -> Graph:
    """The dataflow graph of ``model``: a Graph as it is, an ONNX model (file or proto) lowered."""
    if isinstance(model, Graph):
        return model
    if _is_onnx_source(model):
        from frontends import onnx as onnx_frontend

        return onnx_frontend.lower(model, input_shapes=input_shapes)
    kind = framework_of(model)  # TypeError for models of no supported framework
    raise TypeError(f"convert takes an ONNX model (a .onnx path or an onnx.ModelProto) or a dataflow "
                    f"lowrank_ir.Graph, got a {kind} model: export it to ONNX first "
                    f"(backends.onnx.export(model, example_inputs)), or use parity() to compare frameworks")


# ------------------------------------------------------------------------------------------- convert

@limited
def convert(model: Any, to: str, *, input_shapes: Mapping[str, Sequence[int]] | None = None,
            max_bytes: int | str | None = None) -> Any:
    """Rebuild ``model`` as a trainable PyTorch or MindSpore model through the IR.

    Args:
        model: an ONNX file path, an ``onnx.ModelProto``, or a dataflow ``Graph``
            (``frontends.onnx.lower``'s, decomposed or not).
        to: ``"torch"`` (returns a ``backends.torch.GraphModule``, an ``nn.Module``) or
            ``"mindspore"`` (a ``backends.mindspore.GraphCell``, an ``nn.Cell``, PyNative mode).
        input_shapes: input name -> dims, fixing dynamic input dims for shape inference while
            lowering (the rebuilt model still takes any size the graph allows).
        max_bytes: the most one array (a tensor of the model, an input of ``input_shapes``) may take,
            checked before it is read or allocated: an int or a size such as ``"64G"``; default half of
            physical memory.

    Returns:
        The native model, its parameters filled from the graph and named after the IR params. It
        keeps the graph it was rebuilt from as ``model.source_graph``, which :func:`save_converted` uses.

    Raises:
        ValueError: an unknown ``to``; a graph with ops the backend cannot run (all listed); an
            invalid ONNX model. ``TypeError`` for a native model (export it to ONNX first).
    """
    target = _check_target(to)
    graph = _as_graph(model, input_shapes)
    native = native_backend(target).from_dataflow(graph)
    setattr(native, GRAPH_ATTRIBUTE, graph)
    return native


def _converted_graph(native: Any, framework: str) -> Graph:
    """The graph ``native`` was rebuilt from, its params replaced by the model's current values."""
    backend = native_backend(framework)
    graph = getattr(native, GRAPH_ATTRIBUTE, None)
    if not isinstance(native, backend.DATAFLOW_CLASS) or not isinstance(graph, Graph):
        raise TypeError(f"save_converted takes a model returned by convert() or load_converted() (it knows the "
                        f"graph it was rebuilt from), or an ONNX model / Graph with to=; got a "
                        f"{type(native).__name__}")
    current = graph.copy()
    for name, array in backend.graph_params(native).items():
        current.set_param(name, array)
    return current


def check_output_folder(path: str | os.PathLike[str]) -> None:
    """Refuse to replace a folder that is not an earlier converted model (or empty): ``FileExistsError``."""
    path = Path(path)
    if path.is_dir() and any(path.iterdir()) and not (path / MANIFEST_FILE).is_file():
        raise FileExistsError(f"{str(path)!r} exists and is not a converted-model folder (no {MANIFEST_FILE}); "
                              f"choose a new folder, the old one is not replaced")


@limited
def save_converted(model: Any, path: str | os.PathLike[str], *, to: str | None = None,
                   input_shapes: Mapping[str, Sequence[int]] | None = None, max_bytes: int | str | None = None) -> Path:
    """Write a converted model to the folder ``path`` (created, or an earlier one replaced, atomically).

    Args:
        model: a model returned by :func:`convert` or :func:`load_converted` (trained or not: its
            current weights are written), or an ONNX model / dataflow ``Graph`` to convert first.
        path: the folder. An existing folder is replaced only if it is an earlier converted model
            (or empty).
        to: the framework to convert an ONNX model / Graph to (``"torch"`` | ``"mindspore"``); for a
            converted model, None or its own framework.
        input_shapes: as in :func:`convert`, when converting here.
        max_bytes: as in :func:`convert`.

    Returns:
        ``path``, holding ``converted.json``, ``graph.json``, ``params.safetensors`` and the native
        weights (``model.pt`` or ``model.ckpt``).
    """
    target = Path(path)
    check_output_folder(target)
    if isinstance(model, Graph) or _is_onnx_source(model):
        if to is None:
            raise ValueError("save_converted of an ONNX model or a Graph needs to='torch' or to='mindspore'")
        model = convert(model, to, input_shapes=input_shapes)
    framework = framework_of(model)
    if framework not in NATIVE_FRAMEWORKS:
        raise TypeError(f"save_converted takes a converted PyTorch or MindSpore model, got a {framework} model")
    if to is not None and _check_target(to) != framework:
        raise ValueError(f"the model is a {framework} model; to={to!r} does not match (convert it again instead)")
    graph = _converted_graph(model, framework)
    weights_file = WEIGHTS_FILES[framework]
    manifest = {
        "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "framework": framework,
        "model_class": type(model).__name__, "weights": weights_file, "graph": GRAPH_FILE, "params": PARAMS_FILE,
        "inputs": [value.name for value in graph.inputs], "outputs": [value.name for value in graph.outputs],
    }
    with atomic_directory(target) as folder:
        save_graph(graph, folder / "ir")
        for name in (GRAPH_FILE, PARAMS_FILE):
            os.replace(folder / "ir" / name, folder / name)
        shutil.rmtree(folder / "ir")
        native_backend(framework).save_weights(model, folder / weights_file)
        (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
    logger.info("saved the converted %s model in %s", framework, target)
    return target


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``converted.json`` of a converted-model folder, checked."""
    folder = Path(path)
    file = folder / MANIFEST_FILE
    if not folder.is_dir():
        raise FileNotFoundError(f"converted model {str(folder)!r} does not exist or is not a folder")
    if not file.is_file():
        raise ValueError(f"{str(folder)!r} is not a converted model: {MANIFEST_FILE} is missing "
                         f"(save_converted / 'lowrank convert' write it)")
    manifest = read_json(file)
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{str(file)!r} does not describe a lowrank-ir converted model")
    if manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{str(file)!r} has format version {manifest.get('version')!r}; this lowrank-ir reads "
                         f"version {MANIFEST_VERSION}")
    check_schema(manifest, MANIFEST_SCHEMA, repr(str(file)))
    if manifest["framework"] not in NATIVE_FRAMEWORKS:
        raise ValueError(f"{str(file)!r} names framework {manifest['framework']!r}; expected one of "
                         f"{', '.join(NATIVE_FRAMEWORKS)}")
    if path_inside(folder, manifest["weights"]) is None:
        raise ValueError(f"{str(file)!r}: weights {manifest['weights']!r} is not a file inside the folder "
                         f"{str(folder)!r}; a converted-model folder names its own files (e.g. "
                         f"{WEIGHTS_FILES['torch']!r})")
    return manifest


def load_converted(path: str | os.PathLike[str], weights: str | os.PathLike[str] | None = None) -> Any:
    """The native model saved in the folder ``path`` by :func:`save_converted` (or ``lowrank convert``).

    The structure is rebuilt from the saved graph (``from_dataflow(graph, weights=False)``), then the weights
    are loaded from the folder's own ``model.pt`` / ``model.ckpt``, or from ``weights``: a state dict
    (``torch.save(model.state_dict(), ...)``) or checkpoint (``mindspore.save_checkpoint``) saved from
    the same converted model, e.g. after fine-tuning.

    Raises:
        ValueError: the weights file is for another model: every missing and unexpected name and every
            shape mismatch is named (nothing is loaded then); or it is not a weights file.
        FileNotFoundError: the folder or the weights file does not exist.
    """
    manifest = read_manifest(path)
    framework = str(manifest["framework"])
    graph = load_graph(path)
    source = Path(path) / manifest["weights"] if weights is None else Path(weights)
    if not source.is_file():
        raise FileNotFoundError(f"weights file {str(source)!r} does not exist")
    backend = native_backend(framework)
    native = backend.from_dataflow(graph, weights=False)
    backend.load_weights(native, source)
    setattr(native, GRAPH_ATTRIBUTE, graph)
    return native


# --------------------------------------------------------------------------------------------- parity

@dataclass(slots=True)
class _Runner:
    """One runtime at one stage: a name and how to run it on the (checked, numpy) feeds."""

    runtime: str
    run: Callable[[dict[str, np.ndarray]], list[np.ndarray]]


def _installed(framework: str) -> bool:
    return importlib.util.find_spec(framework) is not None


def _frameworks(frameworks: Sequence[str] | None) -> tuple[list[str], dict[str, str]]:
    if frameworks is None:
        chosen = [name for name in NATIVE_FRAMEWORKS if _installed(name)]
        return chosen, {name: "not installed" for name in NATIVE_FRAMEWORKS if name not in chosen}
    if isinstance(frameworks, str) or not all(name in NATIVE_FRAMEWORKS for name in frameworks):
        raise ValueError(f"frameworks must be a list drawn from {list(NATIVE_FRAMEWORKS)}, got {frameworks!r}")
    return list(dict.fromkeys(frameworks)), {}


def _rebuilt_runner(framework: str, graph: Graph) -> _Runner:
    """Rebuild ``graph`` now (unsupported ops fail here, before anything runs); run it later."""
    backend = native_backend(framework)
    native = backend.from_dataflow(graph)
    names = [value.name for value in graph.inputs]

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return backend.run_numpy(native, [feeds[name] for name in names]).arrays

    return _Runner(framework, run)


def _onnxruntime(model: Any) -> Callable[[dict[str, np.ndarray]], list[np.ndarray]]:
    from frontends import onnx as onnx_frontend

    session = onnx_frontend.session(model)
    names = [value.name for value in model.graph.output]

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [np.asarray(value) for value in onnx_frontend.run(session, feeds, names, "the feeds")]

    return run


def _as_numpy(value: Any) -> np.ndarray:
    """A feed as a numpy array: a PyTorch or MindSpore tensor through its backend's ``numpy_copy``."""
    framework = type(value).__module__.split(".")[0]  # as the registry tells models apart: no import
    if framework in NATIVE_FRAMEWORKS:
        return native_backend(framework).numpy_copy(value)
    return np.asarray(value)


def _read_feeds(feeds: Any) -> dict[str, np.ndarray] | None:
    if feeds is None:
        return None
    if isinstance(feeds, (str, os.PathLike)):
        from backends import onnx as onnx_backend

        return dict(onnx_backend.load_feeds(feeds))
    if not isinstance(feeds, Mapping):
        raise TypeError(f"feeds must be a dict of input name -> array or the path of an .npz file, "
                        f"got {type(feeds).__name__}")
    return {str(name): _as_numpy(value) for name, value in feeds.items()}


def _check_shapes(input_shapes: Mapping[str, Sequence[int]] | None, names: Sequence[str] | None) -> None:
    if not input_shapes:
        return
    for name, dims in input_shapes.items():
        if names is not None and name not in names:
            raise ValueError(f"input_shapes names {name!r}, which is not an input of the model (inputs: {list(names)})")
        if isinstance(dims, (str, bytes)) or not all(isinstance(dim, (int, np.integer)) and dim > 0 for dim in dims):
            raise ValueError(f"input_shapes[{name!r}] must be a list of positive ints, got {dims!r}")


def _native_feeds(feeds: dict[str, np.ndarray] | None, input_shapes: Mapping[str, Sequence[int]] | None,
                  seed: int, framework: str) -> dict[str, np.ndarray]:
    """The inputs a native model is exported and run on, in its positional order."""
    if feeds is not None:
        if not feeds:
            raise ValueError("feeds is empty: give one array per input of the model, in its argument order")
        return feeds
    if not input_shapes:
        raise ValueError(f"a {framework} model needs feeds (a dict of input name -> array, in the order the model "
                         f"takes them, or an .npz file) or input_shapes (input name -> dims, for random float32 "
                         f"inputs) to be exported to ONNX and run")
    _check_shapes(input_shapes, None)
    for name, dims in input_shapes.items():
        check_array(dims, np.float32, f"random input {name!r}")
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal([int(dim) for dim in dims]).astype(np.float32)
            for name, dims in input_shapes.items()}


def _describe(model: Any) -> str:
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model)
    framework = framework_of(model)
    if framework == "onnx":
        return f"the ONNX model {model.graph.name!r}" if model.graph.name else "the ONNX model"
    return f"the {framework} {type(model).__name__}"


def _compare_rows(stage: str, runtime: str, names: Sequence[str], reference: Sequence[Any], got: Sequence[Any],
                  against: str, check: str) -> list[ParityRow]:
    if len(got) != len(reference):
        raise ValueError(f"{runtime} ({stage}) returned {len(got)} outputs, onnxruntime {len(reference)} "
                         f"({list(names)})")
    from backends.onnx import compare

    rows = []
    for name, expected, result in zip(names, reference, got, strict=True):
        error = compare(name, expected, result)
        rows.append(ParityRow(stage, runtime, name, list(error.shape), error.max_abs, error.mean_abs,
                              error.max_rel, error.mean_rel, against, check))
    return rows


def _reference_rows(stage: str, names: Sequence[str], outputs: Sequence[Any]) -> list[ParityRow]:
    return [ParityRow(stage, "onnxruntime", name, [int(dim) for dim in np.shape(value)], 0.0, 0.0, 0.0, 0.0, "",
                      REFERENCE) for name, value in zip(names, outputs, strict=True)]


@limited
def parity(model: Any, *, feeds: Any = None, weights: str | os.PathLike[str] | None = None,
           ratio: float | None = 0.5, tolerance: float = 1e-4,
           input_shapes: Mapping[str, Sequence[int]] | None = None, seed: int = 0, divisor: int = 64,
           frameworks: Sequence[str] | None = None, max_bytes: int | str | None = None) -> ParityReport:
    """Run ``model`` in onnxruntime, PyTorch and MindSpore on the same inputs and compare the outputs.

    The PyTorch and MindSpore versions are rebuilt from the ONNX model through the IR
    (``frontends.onnx.lower`` -> ``backends.torch.from_dataflow`` / ``backends.mindspore.from_dataflow``); a native
    model is first exported to ONNX (``backends.onnx.export``) and also run as it is. Every output of
    every runtime is compared with onnxruntime's. Then, unless ``ratio`` is None, the ONNX model is
    decomposed (``Decompose(model).from_ratio(ratio, divisor=divisor)``), and its rebuilt versions are
    compared with onnxruntime running the decomposed ONNX; the decomposed model's distance from the
    original is reported as information (a native model is run in the original half only: the
    decomposed half is its ONNX export, decomposed). Every version is built before any of them runs
    (a native model runs once first, for its export), so unsupported ops and bad feeds fail fast.

    Args:
        model: an ONNX file path or ``onnx.ModelProto``; or a PyTorch ``nn.Module`` or MindSpore
            ``nn.Cell`` (left unchanged: weights are loaded into, and inference mode set on, a copy).
        feeds: a dict of input name -> array (numpy, or tensors) or the path of an ``.npz`` holding one.
            For a native model the dict's order is the model's argument order and its keys name the
            ONNX inputs. Default: random feeds from the ONNX input specs (``backends.onnx.random_feeds``;
            dynamic dims from ``input_shapes``); a native model needs ``feeds`` or ``input_shapes``.
        weights: for a native model, a state dict file (PyTorch) or ``.ckpt`` (MindSpore) to load first,
            strictly.
        ratio: the per-layer parameter ratio of the decomposed half, in (0, 1); None skips it.
        tolerance: the largest relative difference (``max|d| / max|ref|``) a checked row may have.
        input_shapes: input name -> dims: dynamic dims of random feeds; for a native model without
            ``feeds``, the shapes of random float32 inputs.
        seed: the seed of random feeds.
        divisor: ranks of the decomposed half are rounded to multiples of this (small models need a
            small one: at 64 their layers would not be decomposed).
        frameworks: which of ``"torch"``, ``"mindspore"`` to rebuild in; default both, or those
            installed (the others are listed in ``report.skipped``).
        max_bytes: the most one array (a model tensor, a feed, an input of ``input_shapes``) may take,
            checked before it is read or allocated: an int or a size such as ``"64G"``; default half of
            physical memory.

    Raises:
        ValueError: bad feeds (missing or unknown inputs, wrong dtype or shape), ops a backend cannot
            run (all listed), weights for another model, no layer to decompose at ``ratio``, ...
        TypeError: a model of no supported framework.
    """
    tolerance, ratio, seed = plain_number(tolerance), plain_number(ratio), plain_number(seed)  # type: ignore[assignment]
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance >= 0:
        raise ValueError(f"tolerance must be a number >= 0, got {tolerance!r}")
    if ratio is not None:
        ratio = validate_ratio(ratio)
    divisor = validate_divisor(divisor)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    chosen, skipped = _frameworks(frameworks)
    if not chosen and _is_onnx_source(model):
        raise ValueError("no framework to compare with onnxruntime: install torch or mindspore, or name one in "
                         "frameworks=")
    given = _read_feeds(feeds)
    from backends import onnx as onnx_backend
    from frontends import onnx as onnx_frontend


    native: tuple[Any, str] | None = None
    if _is_onnx_source(model):
        if weights is not None:
            raise ValueError("weights load into a PyTorch or MindSpore model; an ONNX model carries its own")
        proto = onnx_frontend.as_model(model)
        _check_shapes(input_shapes, list(onnx_frontend.input_specs(proto)))
        arrays = given if given is not None else onnx_backend.random_feeds(proto, input_shapes, seed)
    else:
        framework = framework_of(model)
        if framework not in NATIVE_FRAMEWORKS:
            raise TypeError(f"parity takes an ONNX, PyTorch or MindSpore model, got a {framework} model")
        backend = native_backend(framework)
        ready = backend.for_inference(model, weights)
        arrays = _native_feeds(given, input_shapes, seed, framework)
        result = backend.run_numpy(ready, list(arrays.values()))
        proto = onnx_backend.export(ready, backend.as_tensors(arrays.values()), input_names=list(arrays),
                                    output_names=result.names)
        native = (result.arrays, framework)
    where = f"feeds {os.fspath(feeds)!r}" if isinstance(feeds, (str, os.PathLike)) else "feeds"
    checked = onnx_frontend.check_feeds(proto, arrays, where)
    names = [value.name for value in proto.graph.output]

    graph = onnx_frontend.lower(proto, input_shapes=input_shapes)
    runners = [_rebuilt_runner(name, graph) for name in chosen]
    if native is not None:  # already run, on these feeds, before the export
        outputs, framework = native
        runners.append(_Runner(f"{framework} (native)", lambda feeds: outputs))
    report = ParityReport([], float(tolerance), _describe(model), {name: list(np.shape(value))
                                                                    for name, value in checked.items()},
                          skipped=skipped)

    decomposed_runners: list[_Runner] = []
    decomposed_proto = None
    if ratio is not None:
        decomposed_proto, report.decomposed_layers, report.candidate_layers = _decompose(proto, graph, ratio, divisor)
        decomposed_graph = onnx_frontend.lower(decomposed_proto, input_shapes=input_shapes)
        decomposed_runners = [_rebuilt_runner(name, decomposed_graph) for name in chosen]
        report.ratio, report.divisor = float(ratio), divisor
        report.parameters = {"before": int(onnx_frontend.count_parameters(proto)),
                             "after": int(onnx_frontend.count_parameters(decomposed_proto))}

    reference = _onnxruntime(proto)(checked)
    report.rows += _reference_rows("original", names, reference)
    for runner in runners:
        report.rows += _compare_rows("original", runner.runtime, names, reference, runner.run(checked),
                                     "onnxruntime", CHECKED)
    if decomposed_proto is not None:
        decomposed_reference = _onnxruntime(decomposed_proto)(checked)
        report.rows += _compare_rows("decomposed", "onnxruntime", names, reference, decomposed_reference,
                                     "original (onnxruntime)", INFORMATION)
        for runner in decomposed_runners:
            report.rows += _compare_rows("decomposed", runner.runtime, names, decomposed_reference,
                                         runner.run(checked), "onnxruntime", CHECKED)
    logger.info("parity: %s (worst max rel %.3e)", "ok" if report.ok else "FAIL", report.worst())
    return report


def _decompose(model: Any, graph: Graph, ratio: float, divisor: int) -> tuple[Any, int, int]:
    """``model`` decomposed at ``ratio`` by the facade; how many layers were decomposed, of how many candidates.

    The plan is checked on ``graph`` (``model`` lowered) first: a ratio and divisor that would
    decompose nothing is an error saying what to change, raised before anything runs.
    """
    chosen = plan(graph, Policy.ratio(ratio, None, divisor))
    if not chosen.decomposed_entries():
        kept = "; ".join(f"{entry.name}: {entry.reason}" for entry in chosen.kept_entries()[:3])
        raise ValueError(f"no layer of the model would be decomposed at ratio {ratio:g} with divisor {divisor} "
                         f"({len(chosen.entries)} candidate layers{': ' + kept if kept else ''}); give a smaller "
                         f"divisor, or ratio=None (--no-decompose) to check the original only")
    decomposer = Decompose(model).from_ratio(ratio, divisor=divisor)
    decomposed = decomposer.decompose_network()
    return decomposed, len(decomposer.decompose_config or {}), len(chosen.entries)
