"""The contracts between the core and its plugins: what a frontend, a backend, ... module provides.

The registry (``lowrank_ir._registry``) loads a plugin module by name when a model of its framework
is handed in and returns it as one of these ``Protocol`` types, so the type checker sees every call
that crosses the plugin boundary, and a module that lacks a member is refused when it is loaded.
A plugin is a *module*: its functions are the protocol's methods (``self`` is the module), its
constants the protocol's attributes. Framework-specific arguments (a PyTorch model, a MindSpore
cell, an ONNX ``ModelProto`` or path) are typed ``Any`` here; each module types them precisely.

- :class:`Frontend`: native model -> IR graph, and calibration statistics from data.
- :class:`Backend`: IR graph -> a model like the source one (``build``), layers refreshed in place.
- :class:`NativeBackend`: a backend of a trainable framework (PyTorch, MindSpore): besides
  :class:`Backend`, a whole model built from a dataflow graph, its weights and runs on numpy
  arrays, and its export to ONNX; what cross-framework conversion and parity use.
- :class:`LatencyMeasurement`: measured latencies for the latency budget (a :class:`LatencyTimer` per model).
- :class:`ModelFilesAdapter`: a library's model folders (Hugging Face) written and read decomposed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np

from lowrank_ir._engine import LayerStats
from lowrank_ir._ir import Graph, Node

__all__ = ["Backend", "Frontend", "LatencyMeasurement", "LatencyTimer", "ModelFilesAdapter", "NativeBackend",
           "NativeOutputs"]


class NativeOutputs(NamedTuple):
    """What ``run_numpy`` returns: a model's outputs as numpy arrays, in order, and their names or None.

    ``names`` are the keys of a flat dict-like result (a ``transformers`` ``ModelOutput``:
    ``last_hidden_state``, ``pooler_output``), for naming the outputs of an ONNX export.
    """

    arrays: list[np.ndarray]
    names: list[str] | None


@runtime_checkable
class Frontend(Protocol):
    """A framework's frontend module (``frontends/<framework>.py``)."""

    #: Whether calibration can leave padded token positions out (``collect_stats(..., mask_padding=)``).
    MASKS_PADDING: bool

    def lower(self, model: Any) -> Graph:
        """``model`` as an IR graph (verified)."""

    def count_parameters(self, model: Any) -> int:
        """The model's trainable parameters, shared ones once."""

    def collect_stats(self, model: Any, graph: Graph, datasets: Iterable[Any], max_iter: int = -1,
                      names: Sequence[str] | None = None, stop_early: bool = False) -> dict[str, LayerStats]:
        """Input statistics of the layers ``names`` of ``graph``, from running ``model`` on ``datasets``."""

    def collect_cross_stats(self, original: Any, model: Any, graph: Graph, datasets: Iterable[Any],
                            max_iter: int = -1, names: Sequence[str] | None = None) -> dict[str, LayerStats]:
        """Statistics relating each layer's input in ``model`` (partly decomposed) to its input in ``original``."""

    def execution_groups(self, model: Any, graph: Graph, datasets: Iterable[Any],
                         names: Sequence[str]) -> list[list[str]]:
        """The layers ``names`` in execution order, grouped by shared input."""

    def output_errors(self, model: Any, datasets: Iterable[Any], trials: Sequence[Mapping[str, np.ndarray]],
                      max_iter: int = -1, progress: Callable[[int], None] | None = None) -> list[float]:
        """Per trial (param name -> replacement array), the model's relative output error.

        ``progress(done)`` is called after each trial, when given.
        """


@runtime_checkable
class Backend(Protocol):
    """A framework's backend module (``backends/<framework>.py``)."""

    #: How factorized layers are laid out unless the caller says (one of ``lowrank_ir.LAYOUTS``).
    DEFAULT_LAYOUT: str

    def build(self, graph: Graph, like: Any, weights: bool = True, *, take_arrays: bool = False) -> Any:
        """A new model like ``like`` (the model ``graph`` was lowered from) with ``graph``'s factorized layers.

        ``take_arrays``: the new model may use the memory of ``graph``'s arrays instead of copies (a backend
        that cannot keeps copying); ``graph`` must not be used afterwards.
        """

    def load_layers(self, model: Any, graph: Graph, names: list[str]) -> None:
        """Copy the factors of the factorized layers ``names`` from ``graph`` into ``model`` (one ``build`` made)."""


@runtime_checkable
class NativeBackend(Backend, Protocol):
    """The backend of a trainable framework: what ``convert`` and ``parity`` need besides :class:`Backend`."""

    @property
    def DATAFLOW_CLASS(self) -> type:  # noqa: N802  (a module constant)
        """The class of the models :meth:`from_dataflow` returns."""

    def from_dataflow(self, graph: Graph, *, weights: bool = True) -> Any:
        """A whole trainable model that runs the dataflow ``graph`` (lowered from ONNX), params named as the IR's.

        Unlike :meth:`build`, which rewrites a copy of the source model layer by layer, this makes the
        whole model from the graph alone: the way ONNX models become trainable ones.
        """

    def graph_params(self, model: Any, /) -> dict[str, np.ndarray]:
        """The current values of a :meth:`from_dataflow` model's params, by IR param name."""

    def state_dict(self, graph: Graph) -> Mapping[str, Any]:
        """``graph``'s arrays as the framework's weights mapping."""

    def save_weights(self, model: Any, path: str | os.PathLike[str]) -> None:
        """Write ``model``'s weights to ``path``; :meth:`load_weights` reads them back."""

    def load_weights(self, model: Any, path: str | os.PathLike[str]) -> Any:
        """Load the weights file ``path`` into ``model``, strictly, in place; returns ``model``."""

    def for_inference(self, model: Any, weights: str | os.PathLike[str] | None = None) -> Any:
        """``model`` in inference mode with ``weights`` loaded (a copy when anything changes)."""

    def as_tensors(self, arrays: Iterable[np.ndarray]) -> tuple[Any, ...]:
        """The arrays as the framework's tensors (copies)."""

    def numpy_copy(self, value: Any) -> np.ndarray:
        """A tensor (or anything numpy takes) as a new numpy array of its own."""

    def run_numpy(self, model: Any, arrays: Sequence[np.ndarray]) -> NativeOutputs:
        """Run ``model`` on positional numpy inputs; its outputs as numpy arrays."""

    def export_onnx(self, model: Any, arguments: tuple[Any, ...], input_names: Sequence[str] | None = None,
                    output_names: Sequence[str] | None = None, opset: int | None = None) -> Any:
        """``model`` exported to ONNX (an ``onnx.ModelProto``), run on the tensors ``arguments``."""


class LatencyTimer(Protocol):
    """Measured latencies of one model and its candidate layers (what ``LatencyModel(...)`` returns)."""

    model_ms: float
    clock: str
    input_shapes: dict[str, list[int]]

    def supports(self, node: Node) -> str:
        """Empty when the layer's latency can be measured; else why not."""

    def layer_ms(self, node: Node, rank: int | None = None, form: str | None = None) -> float:
        """The layer's latency (ms), whole or factorized at ``rank`` (in ``form``, else its main form)."""

    def forms(self, node: Node) -> list[str]:
        """The two-factor forms the layer may take besides its main one (a k x k conv's)."""

    def cost(self, node: Node, max_rank: int, divisor: int, form: str | None = None) -> Callable[[int], float]:
        """``rank -> latency (ms)`` of the layer factorized (in ``form``, else its main form)."""

    def compare(self, decomposed: Any, runs: int = 20) -> tuple[float, float]:
        """Latencies (ms) of the model and of ``decomposed``, measured interleaved."""


@runtime_checkable
class LatencyMeasurement(Protocol):
    """The module that measures a framework's models' latency (``backends/latency.py`` for ONNX)."""

    #: The layout of the factorized layers that are timed.
    LAYOUT: str

    def LatencyModel(self, model: Any, graph: Graph, input_shapes: Mapping[str, Sequence[int]] | None,  # noqa: N802
                     threads: int = 1) -> LatencyTimer:
        """Measure ``model`` (its whole latency now, its layers' on demand) at ``input_shapes``."""


@runtime_checkable
class ModelFilesAdapter(Protocol):
    """The module that writes and reads a library's model folders decomposed (``backends/huggingface.py``)."""

    def save_decomposed(self, model: Any, folder: str | os.PathLike[str], tokenizer: Any = None) -> Path:
        """Write the decomposed ``model`` (and ``tokenizer``) as a folder the library loads."""

    def load_decomposed(self, folder: str | os.PathLike[str]) -> Any:
        """The decomposed model saved in ``folder``."""
