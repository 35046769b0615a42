"""The core's doors to cross-framework work: ``convert``, ``save_converted``, ``load_converted``, ``parity``.

Converting a model between frameworks and comparing frameworks orchestrate several frontends and
backends, so that work lives above the backends, in the module the registry names
(``lowrank_ir._registry.CROSS_FRAMEWORK``, loaded on the first call, as plugins are). These functions
keep the public names in ``lowrank_ir`` and hand every argument on unchanged; the options and their
defaults are documented once, there.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lowrank_ir._parity_report import ParityReport
from lowrank_ir._registry import cross_framework

__all__ = ["convert", "load_converted", "parity", "save_converted"]


def convert(model: Any, to: str, **options: Any) -> Any:
    """Rebuild ``model`` (an ONNX file or ``ModelProto``, or a dataflow ``Graph``) as a trainable model.

    ``to``: ``"torch"`` or ``"mindspore"``. Options: ``input_shapes``, ``max_bytes``. The whole
    documentation: ``crossframework.convert.convert``.
    """
    return cross_framework().convert(model, to, **options)


def save_converted(model: Any, path: str | os.PathLike[str], **options: Any) -> Path:
    """Write a converted model (or an ONNX model / Graph to convert, with ``to=``) to the folder ``path``.

    Options: ``to``, ``input_shapes``, ``max_bytes``. The whole documentation:
    ``crossframework.convert.save_converted``.
    """
    return Path(cross_framework().save_converted(model, path, **options))


def load_converted(path: str | os.PathLike[str], weights: str | os.PathLike[str] | None = None) -> Any:
    """The native model saved in the folder ``path`` by :func:`save_converted`, with ``weights`` if given.

    The whole documentation: ``crossframework.convert.load_converted``.
    """
    return cross_framework().load_converted(path, weights)


def parity(model: Any, **options: Any) -> ParityReport:
    """Run ``model`` in onnxruntime, PyTorch and MindSpore on the same inputs and compare the outputs.

    Options: ``feeds``, ``weights``, ``ratio``, ``tolerance``, ``input_shapes``, ``seed``, ``divisor``,
    ``frameworks``, ``max_bytes``. The whole documentation: ``crossframework.convert.parity``.
    """
    report: ParityReport = cross_framework().parity(model, **options)
    return report
