"""Graph <-> directory: ``graph.json`` (structure, human-readable) + ``params.safetensors`` (arrays).

One function per direction, beside the IR rather than inside it. Saving is atomic: the directory
appears complete or not at all.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from lowrank_ir._files import MapOf, atomic_directory, check_schema, read_json
from lowrank_ir._ir import Graph, GraphError, Node, Op, Value, verify

__all__ = ["GRAPH_SCHEMA", "load_graph", "read_params", "save_graph"]

FORMAT_VERSION = 1
GRAPH_FILE = "graph.json"
PARAMS_FILE = "params.safetensors"

_VALUE_SCHEMA = {"name": str, "dtype?": (str, type(None)), "shape?": ([(int, str, type(None))], type(None))}

#: What ``graph.json`` must hold; ``load_graph`` names the file and the key when it does not.
GRAPH_SCHEMA = {
    "format": str, "version": int, "meta": dict, "inputs": [_VALUE_SCHEMA], "outputs": [_VALUE_SCHEMA],
    "nodes": [{"op": str, "name": str, "attrs": dict, "params": MapOf(str), "inputs": [str], "outputs": [str]}],
}


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return {"__tuple__": [_jsonable(item) for item in value]}
    if isinstance(value, list):
        return [_jsonable(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return {"__array__": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, bytes):
        return {"__bytes__": value.hex()}
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, list):
        return [_from_json(item) for item in value]
    if isinstance(value, dict):
        if "__tuple__" in value:
            return tuple(_from_json(item) for item in value["__tuple__"])
        if "__array__" in value:
            return np.asarray(value["__array__"], dtype=value["dtype"])
        if "__bytes__" in value:
            return bytes.fromhex(value["__bytes__"])
        return {key: _from_json(item) for key, item in value.items()}
    return value


def _value_to_json(value: Value) -> dict[str, Any]:
    return {"name": value.name, "dtype": value.dtype,
            "shape": None if value.shape is None else list(value.shape)}


def _value_from_json(data: dict[str, Any]) -> Value:
    shape = data.get("shape")
    return Value(data["name"], data.get("dtype"), None if shape is None else tuple(shape))


def save_graph(graph: Graph, directory: str | os.PathLike[str]) -> Path:
    """Verify ``graph`` and write it to ``directory`` (created or replaced atomically)."""
    from safetensors.numpy import save_file

    verify(graph)
    structure = {
        "format": "lowrank-ir graph",
        "version": FORMAT_VERSION,
        "meta": _jsonable(graph.meta),
        "inputs": [_value_to_json(value) for value in graph.inputs],
        "outputs": [_value_to_json(value) for value in graph.outputs],
        "nodes": [
            {"op": node.op.value, "name": node.name, "attrs": _jsonable(node.attrs), "params": node.params,
             "inputs": node.inputs, "outputs": node.outputs}
            for node in graph.nodes
        ],
    }
    # ascontiguousarray makes 0-d arrays 1-d: reshape back so scalars (num_batches_tracked) keep their shape
    arrays = {name: np.ascontiguousarray(array).reshape(array.shape) for name, array in graph.params.items()}
    with atomic_directory(directory) as tmp:
        (tmp / GRAPH_FILE).write_text(json.dumps(structure, indent=1) + "\n")
        save_file(arrays, str(tmp / PARAMS_FILE))
    return Path(directory)


def read_params(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The arrays of a safetensors file; ``ValueError`` naming the file when it is empty, truncated or forged."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, ValueError, TypeError, OverflowError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{str(path)!r} is not a readable safetensors file ({first}); is it empty, truncated "
                         f"or of another format?") from err


def load_graph(directory: str | os.PathLike[str]) -> Graph:
    """Read a graph written by :func:`save_graph` and verify it.

    A file that is not what :func:`save_graph` writes (a key missing or of the wrong type, an unknown op,
    a truncated ``params.safetensors``, an inconsistent graph) is a ``ValueError`` naming the file.
    """
    folder = Path(directory)
    graph_file, params_file = folder / GRAPH_FILE, folder / PARAMS_FILE
    for path in (graph_file, params_file):
        if not path.is_file():
            raise FileNotFoundError(f"{str(folder)!r} is not a saved graph: {path.name} is missing "
                                    f"(a saved graph has {GRAPH_FILE} and {PARAMS_FILE})")
    label = repr(str(graph_file))
    structure = read_json(graph_file)
    if not isinstance(structure, dict) or structure.get("format") != "lowrank-ir graph":
        raise ValueError(f"{label} is not a lowrank-ir graph file")
    if structure.get("version") != FORMAT_VERSION:
        raise ValueError(f"{label} has format version {structure.get('version')!r}; "
                         f"this lowrank-ir reads version {FORMAT_VERSION}")
    check_schema(structure, GRAPH_SCHEMA, label)
    params = read_params(params_file)
    nodes = []
    for index, item in enumerate(structure["nodes"]):
        try:
            nodes.append(Node(Op(item["op"]), item["name"], _from_json(item["attrs"]), dict(item["params"]),
                              list(item["inputs"]), list(item["outputs"])))
        except (ValueError, TypeError, KeyError) as err:
            raise ValueError(f"{label}: nodes[{index}] ({item['name']!r}) cannot be read: {err}; ops are "
                             f"{', '.join(op.value for op in Op)}") from err
    try:
        graph = Graph(nodes, params, [_value_from_json(v) for v in structure["inputs"]],
                      [_value_from_json(v) for v in structure["outputs"]], _from_json(structure["meta"]))
        return verify(graph)
    except GraphError as err:
        raise GraphError(f"{label}: {err}") from err
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"{label} does not describe a consistent graph: {err}") from err
