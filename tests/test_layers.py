"""The layering holds in the code, not only at import time.

The core (``lowrank_ir``) names no plugin package (``frontends``, ``backends``), whether by an import,
by a string handed to importlib, or by a module path in any other string, except in the registry's
table (``lowrank_ir/_registry.py``). Docstrings may speak of the plugins; code may not reach them.
And every plugin module the registry hands out meets the ``Protocol`` it is handed out as.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import lowrank_ir
from lowrank_ir import _registry
from lowrank_ir._protocols import Backend, Frontend, LatencyMeasurement, ModelFilesAdapter, NativeBackend
from tests.skips import require

CORE = Path(lowrank_ir.__file__).parent
TABLE = CORE / "_registry.py"
PLUGIN_PACKAGES = ("frontends", "backends")
PLUGIN_NAME = re.compile(rf"\b({'|'.join(PLUGIN_PACKAGES)})\b")


def _docstrings(tree: ast.Module) -> set[int]:
    """The ids of the docstring nodes of ``tree`` (module, classes, functions)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def plugin_names(source: str) -> list[str]:
    """Where ``source`` names a plugin package: imports, and strings that are not docstrings."""
    tree = ast.parse(source)
    docstrings = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {alias.name}" for alias in node.names
                      if alias.name.split(".")[0] in PLUGIN_PACKAGES]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] in PLUGIN_PACKAGES:
                found.append(f"line {node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if PLUGIN_NAME.search(node.value):
                found.append(f"line {node.lineno}: string {node.value[:60]!r}")
    return sorted(found, key=lambda entry: int(entry.split(":")[0].split()[1]))


def test_the_check_sees_imports_and_strings() -> None:
    source = ('"""Docstrings may say backends.torch."""\nimport backends.torch\nfrom frontends import onnx\n'
              'import importlib\nimportlib.import_module("frontends.torch")\nx = "frontend_for"\n')
    found = plugin_names(source)
    assert [entry.split(":")[0] for entry in found] == ["line 2", "line 3", "line 5"], found


def test_the_core_names_no_plugin_outside_the_registry_table() -> None:
    offenders = {str(path.relative_to(CORE.parent)): plugin_names(path.read_text(encoding="utf-8"))
                 for path in sorted(CORE.rglob("*.py")) if path != TABLE}
    offenders = {path: found for path, found in offenders.items() if found}
    assert not offenders, f"the core names frontends/backends outside {TABLE.name}: {offenders}"
    assert plugin_names(TABLE.read_text(encoding="utf-8")), "the registry's table names the plugins"


def _plugins() -> list[tuple[str, str, type]]:
    """(framework, module, protocol) for every module the registry's table names."""
    rows = []
    for framework in _registry.FRAMEWORKS.values():
        rows.append((framework.name, framework.frontend, Frontend))
        native = framework.name in _registry.NATIVE_FRAMEWORKS
        rows.append((framework.name, framework.backend, NativeBackend if native else Backend))
        if framework.latency:
            rows.append((framework.name, framework.latency, LatencyMeasurement))
    rows += [(library, module, ModelFilesAdapter) for library, module in _registry.ADAPTERS.items()]
    return rows


#: What a plugin of each framework (or adapted library) needs installed.
REQUIRES = {"torch": "torch", "mindspore": "mindspore", "onnx": "onnxruntime", "transformers": "transformers"}


@pytest.mark.parametrize(("framework", "module", "protocol"), _plugins(), ids=[row[1] for row in _plugins()])
def test_every_plugin_meets_its_protocol(framework: str, module: str, protocol: type) -> None:
    import importlib
    import inspect

    require(REQUIRES[framework])
    loaded = importlib.import_module(module)
    assert isinstance(loaded, protocol), f"{module} lacks a member of {protocol.__name__}"
    for name, member in vars(protocol).items():  # methods: the module's function takes the protocol's arguments
        if name.startswith("_") or not inspect.isfunction(member):
            continue
        wanted = [param for param in inspect.signature(member).parameters.values() if param.name != "self"]
        got = list(inspect.signature(getattr(loaded, name)).parameters.values())
        assert len(got) >= len(wanted), f"{module}.{name} takes fewer arguments than {protocol.__name__} says"
        for param, given in zip(wanted, got, strict=False):  # positional-only: any name; else the same name
            if param.kind is not inspect.Parameter.POSITIONAL_ONLY:
                assert param.name == given.name, f"{module}.{name}: argument {given.name!r}, expected {param.name!r}"
            if param.default is not inspect.Parameter.empty:  # a default the protocol promises, the module keeps
                assert param.default == given.default, f"{module}.{name}({param.name}=...): its default differs"


def test_the_registry_refuses_a_module_that_is_not_a_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(_registry.ADAPTERS, "json", "json")
    with pytest.raises(TypeError, match=r"'json' is not a ModelFilesAdapter: it lacks load_decomposed, save_"):
        _registry.adapter("json")
