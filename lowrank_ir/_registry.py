"""Which frontend and backend serve a model: a plain dict keyed by framework, filled at import time.

Detection reads the model's class hierarchy by module name, so it never imports a framework the user
does not have; the frontend/backend modules (which do import it) are loaded only when picked.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

__all__ = ["ADAPTERS", "FRAMEWORKS", "Framework", "adapter", "backend_for", "framework_of", "frontend_for",
           "latency_for", "register_framework"]


@dataclass(frozen=True, slots=True)
class Framework:
    """A framework: the base class that marks its models, and the modules that serve them."""

    name: str
    base_module: str
    base_class: str
    frontend: str
    backend: str
    #: How error messages name the framework's model class (default ``<package>.nn.<base_class>``).
    label: str = ""
    #: The module that measures the framework's models' latency (empty: latency is not measured).
    latency: str = ""

    @property
    def model_class(self) -> str:
        return self.label or f"{self.base_module.split('.')[0]}.nn.{self.base_class}"


FRAMEWORKS: dict[str, Framework] = {}


def register_framework(framework: Framework) -> Framework:
    FRAMEWORKS[framework.name] = framework
    return framework


register_framework(Framework("torch", "torch.nn.modules.module", "Module", "frontends.torch", "backends.torch"))
register_framework(Framework("mindspore", "mindspore.nn.cell", "Cell", "frontends.mindspore",
                             "backends.mindspore"))
register_framework(Framework("onnx", "onnx.onnx_ml_pb2", "ModelProto", "frontends.onnx", "backends.onnx",
                             label="onnx.ModelProto", latency="backends.latency"))


def framework_of(model: Any) -> str:
    """The name of the framework ``model`` belongs to; ``TypeError`` listing the supported ones if none."""
    for cls in type(model).__mro__:
        for framework in FRAMEWORKS.values():
            if cls.__module__ == framework.base_module and cls.__name__ == framework.base_class:
                return framework.name
    supported = ", ".join(fw.model_class for fw in FRAMEWORKS.values())
    raise TypeError(f"expected a model of a supported framework ({supported}), got {type(model).__name__} "
                    f"from module {type(model).__module__!r}")


def _load(module_name: str, role: str, framework: str) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ImportError(f"the {framework} {role} ({module_name}) could not be imported: {err}. "
                          f"Install lowrank-ir with the '{framework}' extra.") from err


def frontend_for(model: Any) -> ModuleType:
    name = framework_of(model)
    return _load(FRAMEWORKS[name].frontend, "frontend", name)


def backend_for(model: Any) -> ModuleType:
    name = framework_of(model)
    return _load(FRAMEWORKS[name].backend, "backend", name)


def latency_for(model: Any) -> ModuleType:
    """The module that measures ``model``'s latency; ``ValueError`` when its framework has none."""
    name = framework_of(model)
    framework = FRAMEWORKS[name]
    if not framework.latency:
        measured = [fw.model_class for fw in FRAMEWORKS.values() if fw.latency]
        raise ValueError(f"latency is measured in onnxruntime, on {', '.join(measured)} models; this is a "
                         f"{framework.model_class}: export it first (backends.onnx.export(model, inputs)) and "
                         f"decompose the ONNX model")
    return _load(framework.latency, "latency measurement", name)


#: Libraries whose model files the core reads and writes through an adapter module (loaded on first use).
ADAPTERS: dict[str, str] = {"transformers": "backends.huggingface"}


def adapter(library: str) -> ModuleType:
    """The adapter module for ``library`` (a key of :data:`ADAPTERS`), imported now."""
    if library not in ADAPTERS:
        raise ValueError(f"no adapter for {library!r}; adapters exist for: {', '.join(sorted(ADAPTERS))}")
    return _load(ADAPTERS[library], "adapter", library)
