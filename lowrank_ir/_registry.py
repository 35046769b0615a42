"""Which frontend and backend serve a model: a plain dict keyed by framework, filled at import time.

Detection reads the model's class hierarchy by module name, so it never imports a framework the user
does not have; the frontend/backend modules (which do import it) are loaded only when picked, and
returned as the ``Protocol`` they meet (``lowrank_ir._protocols``): a module that lacks a member of
its protocol is refused when loaded.

This table is the only place the core names a module outside it: the plugins (:data:`FRAMEWORKS`,
:data:`ADAPTERS`) and the cross-framework work above the backends (:data:`CROSS_FRAMEWORK`: convert
and parity orchestrate several plugins, so they are not core work; ``lowrank_ir.convert`` and
``lowrank_ir.parity`` hand their calls on to it).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from lowrank_ir._protocols import Backend, Frontend, LatencyMeasurement, ModelFilesAdapter, NativeBackend

__all__ = ["ADAPTERS", "CROSS_FRAMEWORK", "FRAMEWORKS", "Framework", "adapter", "backend_for", "cross_framework",
           "framework_of", "frontend_for", "latency_for", "native_backend", "packages", "register_framework"]


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


def _load(module_name: str, role: str, framework: str, protocol: type) -> Any:
    """Import the ``role`` module ``module_name`` of ``framework`` and check that it meets ``protocol``.

    ``ImportError`` naming the extra to install when it cannot be imported; ``TypeError`` listing the
    members it lacks when it is not a ``protocol``.
    """
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ImportError(f"the {framework} {role} ({module_name}) could not be imported: {err}. "
                          f"Install lowrank-ir with the '{framework}' extra.") from err
    if not isinstance(module, protocol):
        missing = [name for name in _members(protocol) if not hasattr(module, name)]
        raise TypeError(f"the {framework} {role} {module_name!r} is not a {protocol.__name__}: it lacks "
                        f"{', '.join(missing)}")
    return module


def _members(protocol: type) -> list[str]:
    """The names a module must define to meet ``protocol`` (its methods and annotated attributes)."""
    names: set[str] = set()
    for cls in protocol.__mro__:
        if cls is object or cls.__name__ in ("Protocol", "Generic"):
            continue
        names.update(name for name in vars(cls) if not name.startswith("_"))
        names.update(getattr(cls, "__annotations__", {}))
    return sorted(names)


def frontend_for(model: Any) -> Frontend:
    name = framework_of(model)
    module: Frontend = _load(FRAMEWORKS[name].frontend, "frontend", name, Frontend)
    return module


def backend_for(model: Any) -> Backend:
    name = framework_of(model)
    module: Backend = _load(FRAMEWORKS[name].backend, "backend", name, Backend)
    return module


#: The frameworks whose models are trained natively (their backends are :class:`NativeBackend`).
NATIVE_FRAMEWORKS = ("torch", "mindspore")


def native_backend(framework: str) -> NativeBackend:
    """The backend of ``framework`` (one of :data:`NATIVE_FRAMEWORKS`), imported now."""
    if framework not in NATIVE_FRAMEWORKS:
        raise ValueError(f"{framework!r} is not a framework of trainable models; choose one of "
                         f"{', '.join(NATIVE_FRAMEWORKS)}")
    module: NativeBackend = _load(FRAMEWORKS[framework].backend, "backend", framework, NativeBackend)
    return module


def latency_for(model: Any) -> LatencyMeasurement:
    """The module that measures ``model``'s latency; ``ValueError`` when its framework has none."""
    name = framework_of(model)
    framework = FRAMEWORKS[name]
    if not framework.latency:
        measured = [fw.model_class for fw in FRAMEWORKS.values() if fw.latency]
        raise ValueError(f"latency is measured in onnxruntime, on {', '.join(measured)} models; this is a "
                         f"{framework.model_class}: export it first (backends.onnx.export(model, inputs)) and "
                         f"decompose the ONNX model")
    module: LatencyMeasurement = _load(framework.latency, "latency measurement", name, LatencyMeasurement)
    return module


#: Libraries whose model files the core reads and writes through an adapter module (loaded on first use).
ADAPTERS: dict[str, str] = {"transformers": "backends.huggingface"}


def adapter(library: str) -> ModelFilesAdapter:
    """The adapter module for ``library`` (a key of :data:`ADAPTERS`), imported now."""
    if library not in ADAPTERS:
        raise ValueError(f"no adapter for {library!r}; adapters exist for: {', '.join(sorted(ADAPTERS))}")
    module: ModelFilesAdapter = _load(ADAPTERS[library], "adapter", library, ModelFilesAdapter)
    return module


#: The module of cross-framework work (convert, parity), above the backends.
CROSS_FRAMEWORK = "crossframework.convert"


def cross_framework() -> ModuleType:
    """The cross-framework module (:data:`CROSS_FRAMEWORK`), imported now.

    Not a plugin: a layer above the backends whose public functions the core re-exports
    (``lowrank_ir.convert`` ...), so it has no protocol of its own.
    """
    return importlib.import_module(CROSS_FRAMEWORK)


def packages() -> list[str]:
    """The top-level packages of the modules this table names (e.g. for their loggers), in table order."""
    modules = [name for fw in FRAMEWORKS.values() for name in (fw.frontend, fw.backend, fw.latency) if name]
    modules += [*ADAPTERS.values(), CROSS_FRAMEWORK]
    return list(dict.fromkeys(module.split(".")[0] for module in modules))
