"""Fuzzing everything the tool reads: ONNX files, JSON configs and manifests, safetensors, command lines.

Seeded and bounded: every case derives from a fixed seed (plain loops, or hypothesis with
``derandomize=True``), so a failure reproduces. The invariants:

- the command line ends with exit code 0, 1 or 2, never a traceback;
- no file outside the output paths is created, changed or removed (no temporary leftovers either);
- a run that does not succeed leaves no output; a run that does leaves complete, checked outputs;
- the Python API raises only the documented kinds (``ValueError``, ``TypeError``, ``OSError``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from tests import fuzz_models, onnx_models
from tools.cli import main

#: The error kinds the Python API documents for bad input.
API_ERRORS = (ValueError, TypeError, OSError)

#: hypothesis: reproducible, no deadline (the machine is shared), no example database on disk.
FUZZ = settings(derandomize=True, deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# ------------------------------------------------------------------------------------------ invariants

def tree_state(root: Path) -> dict[str, tuple[str, str]]:
    """Every entry under ``root``: relative path -> (kind, content digest or link target)."""
    state: dict[str, tuple[str, str]] = {}
    for path in sorted(root.rglob("*")):
        relative = str(path.relative_to(root))
        if path.is_symlink():
            state[relative] = ("link", os.readlink(path))
        elif path.is_dir():
            state[relative] = ("dir", oct(path.stat().st_mode & 0o777))
        else:
            state[relative] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
    return state


def run_cli(argv: list[str], root: Path, outputs: tuple[str, ...] = (), reports: tuple[str, ...] = (),
            inputs: tuple[str, ...] = ()) -> tuple[int, str]:
    """Run ``lowrank argv`` in ``root`` and check the invariants; the exit code and stderr.

    ``outputs`` are the relative paths the command may write (files, or folders with their contents), and
    ``reports`` those of them that are reports. ``inputs`` are the user's files: never changed, even when an
    output names them or the folder that holds them.
    """
    before = tree_state(root)
    stdout, stderr = io.StringIO(), io.StringIO()
    cwd = Path.cwd()
    os.chdir(root)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                code = main(argv)
            except SystemExit as stop:  # argparse's usage errors
                code = stop.code if isinstance(stop.code, int) else 2
    finally:
        os.chdir(cwd)
    err = stderr.getvalue()
    assert code in (0, 1, 2), f"lowrank {argv}: exit code {code!r}\n{err}"
    assert "Traceback" not in err, f"lowrank {argv}: traceback\n{err}"
    if code == 2:
        assert err.strip(), f"lowrank {argv}: exit 2 without a message"
    after = tree_state(root)

    def owned(relative: str) -> bool:
        if relative in inputs or any(name.startswith(relative + "/") for name in inputs):
            return False
        for out in map(os.path.normpath, outputs):
            if out == "." or relative == out or relative.startswith(out + "/"):
                return True
        return False

    changed = {key for key in before.keys() | after.keys() if before.get(key) != after.get(key)}
    foreign = sorted(key for key in changed if not owned(key))
    assert not foreign, f"lowrank {argv} (exit {code}) touched files outside its outputs: {foreign}\n{err}"
    if code != 0:  # above --tolerance (exit 1) the report is still written: it says why
        allowed = {report for report in reports if code == 1}
        written = sorted(key for key in changed if key in after and key not in allowed)
        assert not written, f"lowrank {argv} failed (exit {code}) but left {written}\n{err}"
    return code, err


def api_call(fn: Callable[[], Any], root: Path) -> Any:
    """Call ``fn``; it returns, or raises a documented error kind, and changes nothing under ``root``."""
    before = tree_state(root)
    try:
        result = fn()
    except API_ERRORS as err:
        result = err
    assert tree_state(root) == before, "the call changed files it only had to read"
    return result


# --------------------------------------------------------------------------------------- ONNX mutations

def seed_models() -> dict[str, onnx.ModelProto]:
    rng = np.random.default_rng(0)
    return {"mlp": onnx_models.mlp(rng, dims=(24, 32, 16)),
            "conv": onnx_models.conv(rng, channels=(8, 16), kernel=3)}


def flip_bits(data: bytes, rng: np.random.Generator) -> bytes:
    buffer = bytearray(data)
    for _ in range(int(rng.integers(1, 9))):
        position = int(rng.integers(len(buffer)))
        buffer[position] ^= 1 << int(rng.integers(8))
    return bytes(buffer)


def truncate(data: bytes, rng: np.random.Generator) -> bytes:
    return data[: int(rng.integers(0, len(data)))]


def forge_initializer_dims(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    init = model.graph.initializer[int(rng.integers(len(model.graph.initializer)))]
    choice = int(rng.integers(4))
    if choice == 0:
        init.dims[0] = init.dims[0] * 1000
    elif choice == 1:
        init.dims[0] = 2**40
    elif choice == 2:
        init.dims[0] = -3
    else:
        init.dims.append(0)


def forge_input_dims(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dim = dims[int(rng.integers(len(dims)))]
    dim.Clear()
    dim.dim_value = int(rng.choice([10**12, 2**62, 0]))


def make_cycle(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    nodes = model.graph.node
    nodes[0].input[0] = nodes[len(nodes) - 1].output[0]


def duplicate_output(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    nodes = model.graph.node
    if len(nodes) > 1:
        nodes[1].output[0] = nodes[0].output[0]
    else:
        model.graph.output.append(model.graph.output[0])


def unknown_op(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    node = model.graph.node[int(rng.integers(len(model.graph.node)))]
    if rng.integers(2):
        node.op_type = "NoSuchOperator"
    else:
        node.domain = "com.example.hostile"
        model.opset_import.append(helper.make_opsetid("com.example.hostile", 1))


def bad_attribute_text(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    model.graph.node[0].attribute.append(helper.make_attribute("note", b"\xff\xfe\x00bad"))


def duplicate_initializer(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    first = model.graph.initializer[0]
    copy = model.graph.initializer.add()
    copy.CopyFrom(first)
    copy.float_data.extend([1.0])


def dangling_output(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    model.graph.output[0].name = "nowhere"


def hostile_external(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    """Move the largest initializer to external data at a hostile location."""
    init = max(model.graph.initializer, key=lambda tensor: len(tensor.raw_data) + len(tensor.float_data))
    array = numpy_helper.to_array(init)
    init.ClearField("raw_data")
    init.ClearField("float_data")
    init.data_location = TensorProto.EXTERNAL
    location = str(rng.choice(["../secret.bin", "/etc/passwd", "sub/../../secret.bin", "link.bin",
                               "weights.bin", "missing.bin", "a\x00b.bin", ""]))
    entries = {"location": location}
    choice = int(rng.integers(4))
    if choice == 1:
        entries["length"] = str(array.nbytes * 1000)
    elif choice == 2:
        entries["offset"] = str(2**40)
    elif choice == 3:
        entries["length"] = str(max(array.nbytes - 4, 0))
    for key, value in entries.items():
        entry = init.external_data.add()
        entry.key, entry.value = key, value


def escaping_tensor(array: np.ndarray, name: str) -> onnx.TensorProto:
    """A tensor of ``array``'s type and shape whose data is external, at a path outside the model's folder."""
    tensor = numpy_helper.from_array(array, name)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "../secret.bin"
    return tensor


def sparse_constant_external(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    """A sparse ``Constant`` whose values point outside the folder."""
    values = escaping_tensor(np.ones(2, np.float32), "sv")
    indices = numpy_helper.from_array(np.array([0, 3], np.int64), "si")
    sparse = helper.make_sparse_tensor(values, indices, [4])
    node = helper.make_node("Constant", [], ["sparse_out"], sparse_value=sparse)
    model.graph.node.insert(0, node)


def training_info_external(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    """A ``training_info`` initializer that points outside the folder."""
    tensor = escaping_tensor(np.ones(4, np.float32), "trained")
    info = model.training_info.add()
    info.initialization.CopyFrom(helper.make_graph([], "init", [], [], [tensor]))


#: Structural mutations, applied to a parsed copy of a seed model.
STRUCTURAL: dict[str, Callable[[onnx.ModelProto, np.random.Generator], None]] = {
    "forge_initializer_dims": forge_initializer_dims,
    "forge_input_dims": forge_input_dims,
    "cycle": make_cycle,
    "duplicate_output": duplicate_output,
    "unknown_op": unknown_op,
    "bad_attribute_text": bad_attribute_text,
    "duplicate_initializer": duplicate_initializer,
    "dangling_output": dangling_output,
    "hostile_external": hostile_external,
    "sparse_constant_external": sparse_constant_external,
    "training_info_external": training_info_external,
}


@pytest.fixture
def workspace(tmp_path: Path) -> Iterator[Path]:
    """A folder to run in, with a secret beside it that hostile paths aim at, and a symlink to it."""
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(4096, dtype=np.float32).tobytes())
    root = tmp_path / "work"
    root.mkdir()
    (root / "sub").mkdir()
    (root / "link.bin").symlink_to(secret)
    (root / "weights.bin").write_bytes(np.ones(4096, np.float32).tobytes())
    yield root
    assert secret.read_bytes() == np.arange(4096, dtype=np.float32).tobytes(), "the secret was changed"


def onnx_cases() -> Iterator[tuple[str, int]]:
    for kind in ("bitflip", "truncate"):
        for seed in range(40):
            yield kind, seed
    for kind in STRUCTURAL:
        for seed in range(3):
            yield kind, seed


def mutate(kind: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    models = seed_models()
    model = models["mlp" if seed % 2 == 0 else "conv"]
    if kind == "bitflip":
        return flip_bits(model.SerializeToString(), rng)
    if kind == "truncate":
        return truncate(model.SerializeToString(), rng)
    STRUCTURAL[kind](model, rng)
    return model.SerializeToString()


@pytest.mark.parametrize(("kind", "seed"), list(onnx_cases()))
def test_mutated_onnx(workspace: Path, kind: str, seed: int) -> None:
    (workspace / "in.onnx").write_bytes(mutate(kind, seed))
    run_cli(["inspect", "in.onnx", "--divisor", "4"], workspace)
    code, err = run_cli(["decompose", "in.onnx", "-o", "out.onnx", "--divisor", "4", "--report", "report.json"],
                        workspace, outputs=("out.onnx", "out.onnx.data", "report.json"), reports=("report.json",))
    if kind in ("hostile_external", "sparse_constant_external", "training_info_external"):
        location_escapes = code == 0 and not (workspace / "in.onnx").read_bytes().count(b"weights.bin")
        assert not location_escapes, f"a model with external data outside its folder was decomposed\n{err}"
    if code == 0:
        onnx.checker.check_model(onnx.load(str(workspace / "out.onnx")), full_check=True)
        assert json.loads((workspace / "report.json").read_text())["layers"]


# -------------------------------------------------------------------------------------- JSON mutations

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)


def hostile_json_texts() -> list[str]:
    """JSON texts no schema expects: deep nesting, huge numbers, NaN tokens, garbage."""
    return ["[" * 100_000 + "]" * 100_000, '{"a":' * 50_000 + "1" + "}" * 50_000, "1e400", "NaN", "-Infinity",
            "", "\x00", '{"fc": 1e999}', '{"fc": [1e999, 2]}', '{"": 1}', '{"fc": "' + "x" * 100_000 + '"}',
            '{"fc": 1, "fc": "vbmf"}', "\ufeff{}", '{"fc": true}', '{"fc": [16, 8, 4]}', '{"(": 2}']


@pytest.fixture(scope="module")
def graph_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved IR graph of the MLP (graph.json + params.safetensors)."""
    from frontends.onnx import lower
    from lowrank_ir import save_graph

    folder = tmp_path_factory.mktemp("saved") / "graph"
    save_graph(lower(seed_models()["mlp"]), folder)
    return folder


def write_rules(root: Path, text: str) -> None:
    (root / "rules.json").write_text(text)


@pytest.mark.parametrize("index", range(len(hostile_json_texts())))
def test_hostile_rules_files(workspace: Path, index: int) -> None:
    onnx.save(seed_models()["mlp"], str(workspace / "in.onnx"))
    write_rules(workspace, hostile_json_texts()[index])
    run_cli(["inspect", "in.onnx", "--divisor", "4", "--dict", "rules.json"], workspace)


@settings(FUZZ, max_examples=40)
@given(value=json_values)
def test_random_rules_files(tmp_path: Path, value: Any) -> None:
    root = Path(tempfile.mkdtemp(dir=tmp_path))
    onnx.save(seed_models()["mlp"], str(root / "in.onnx"))
    write_rules(root, json.dumps(value))
    run_cli(["inspect", "in.onnx", "--divisor", "4", "--dict", "rules.json"], root)


def mutate_graph_json(structure: dict[str, Any], rng: np.random.Generator) -> Any:
    """Drop, retype or corrupt one key somewhere in a graph.json structure."""
    choice = int(rng.integers(6))
    nodes = structure["nodes"]
    node = nodes[int(rng.integers(len(nodes)))]
    if choice == 0:
        del structure[str(rng.choice(["nodes", "inputs", "outputs", "meta", "version"]))]
    elif choice == 1:
        del node[str(rng.choice(list(node)))]
    elif choice == 2:
        junk: list[Any] = [None, 7, "x", [1, [2]], {"__array__": [1], "dtype": "evil"}, {"__tuple__": 5}]
        node[str(rng.choice(list(node)))] = junk[int(rng.integers(len(junk)))]
    elif choice == 3:
        node["op"] = "NotAnOp"
    elif choice == 4:
        node["params"] = {"weight": "../../etc/passwd"}
    else:
        structure["nodes"] = {"not": "a list"}
    return structure


@pytest.mark.parametrize("seed", range(30))
def test_mutated_graph_json(tmp_path: Path, graph_folder: Path, seed: int) -> None:
    from lowrank_ir import load_graph

    folder = tmp_path / "graph"
    folder.mkdir()
    (folder / "params.safetensors").write_bytes((graph_folder / "params.safetensors").read_bytes())
    structure = json.loads((graph_folder / "graph.json").read_text())
    (folder / "graph.json").write_text(json.dumps(mutate_graph_json(structure, np.random.default_rng(seed))))
    api_call(lambda: load_graph(folder), tmp_path)


@pytest.mark.parametrize("index", range(len(hostile_json_texts())))
def test_hostile_graph_json(tmp_path: Path, graph_folder: Path, index: int) -> None:
    from lowrank_ir import load_graph

    folder = tmp_path / "graph"
    folder.mkdir()
    (folder / "params.safetensors").write_bytes((graph_folder / "params.safetensors").read_bytes())
    (folder / "graph.json").write_text(hostile_json_texts()[index])
    api_call(lambda: load_graph(folder), tmp_path)


@pytest.mark.parametrize("index", range(len(hostile_json_texts())))
def test_hostile_config_file(tmp_path: Path, index: int) -> None:
    import torch

    from lowrank_ir import Decompose

    config = tmp_path / "decompose_config.json"
    config.write_text(hostile_json_texts()[index])
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
    api_call(lambda: Decompose(model, config_file=str(config)).from_file(), tmp_path)


# ---------------------------------------------------------------------------------- safetensors headers

def safetensors_mutations(data: bytes, rng: np.random.Generator) -> bytes:
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    body = data[8 + length:]
    choice = int(rng.integers(9))
    name = str(rng.choice([key for key in header if key != "__metadata__"]))
    if choice == 0:
        return struct.pack("<Q", 2**63) + data[8:]
    if choice == 1:
        return struct.pack("<Q", length + 10_000) + data[8:]
    if choice == 2:
        return data[: int(rng.integers(0, len(data)))]
    if choice == 3:
        header[name]["shape"] = [2**31, 2**31]
    elif choice == 4:
        header[name]["data_offsets"] = [0, 2**40]
    elif choice == 5:
        header[name]["dtype"] = str(rng.choice(["F64", "EVIL", "U8", ""]))
    elif choice == 6:
        header[name]["shape"] = [-1]
    elif choice == 7:
        header["__metadata__"] = {"x": [1, 2]}
    else:
        del header[name]
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


@pytest.mark.parametrize("seed", range(27))
def test_mutated_safetensors(tmp_path: Path, graph_folder: Path, seed: int) -> None:
    from lowrank_ir import load_graph

    folder = tmp_path / "graph"
    folder.mkdir()
    (folder / "graph.json").write_text((graph_folder / "graph.json").read_text())
    data = (graph_folder / "params.safetensors").read_bytes()
    (folder / "params.safetensors").write_bytes(safetensors_mutations(data, np.random.default_rng(seed)))
    api_call(lambda: load_graph(folder), tmp_path)


@pytest.mark.parametrize("content", [b"", b"\x00" * 7, b"\xff" * 64])
def test_garbage_safetensors(tmp_path: Path, graph_folder: Path, content: bytes) -> None:
    from lowrank_ir import load_graph

    folder = tmp_path / "graph"
    folder.mkdir()
    (folder / "graph.json").write_text((graph_folder / "graph.json").read_text())
    (folder / "params.safetensors").write_bytes(content)
    result = api_call(lambda: load_graph(folder), tmp_path)
    assert isinstance(result, API_ERRORS)
    assert "params.safetensors" in str(result), f"the error does not name the file: {result}"


# ------------------------------------------------------------------------------------ converted manifests

@pytest.fixture(scope="module")
def converted_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lowrank_ir import convert, save_converted

    folder = tmp_path_factory.mktemp("converted") / "torch"
    save_converted(convert(seed_models()["mlp"], "torch"), folder)
    return folder


def manifest_mutations(manifest: dict[str, Any], rng: np.random.Generator) -> Any:
    choice = int(rng.integers(6))
    keys = list(manifest)
    if choice == 0:
        del manifest[str(rng.choice(keys))]
    elif choice == 1:
        junk: list[Any] = [None, 3, [1], {"a": 1}, "../outside.pt"]
        manifest[str(rng.choice(keys))] = junk[int(rng.integers(len(junk)))]
    elif choice == 2:
        for key in keys:
            if isinstance(manifest[key], str) and manifest[key].endswith((".pt", ".ckpt")):
                manifest[key] = str(rng.choice(["../outside.pt", "/etc/passwd", "sub/../../outside.pt"]))
    elif choice == 3:
        return [manifest]
    elif choice == 4:
        manifest["framework"] = "tensorflow"
    else:
        manifest[str(rng.choice(keys))] = "x" * 10_000
    return manifest


@pytest.mark.parametrize("seed", range(18))
def test_mutated_converted_manifest(tmp_path: Path, converted_folder: Path, seed: int) -> None:
    from lowrank_ir import load_converted

    folder = tmp_path / "converted"
    folder.mkdir()
    for path in converted_folder.rglob("*"):
        target = folder / path.relative_to(converted_folder)
        if path.is_dir():
            target.mkdir(exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    (tmp_path / "outside.pt").write_bytes((converted_folder / "model.pt").read_bytes())
    manifest = json.loads((folder / "converted.json").read_text())
    (folder / "converted.json").write_text(json.dumps(manifest_mutations(manifest, np.random.default_rng(seed))))
    result = api_call(lambda: load_converted(folder), tmp_path)
    if not isinstance(result, BaseException):
        text = (folder / "converted.json").read_text()
        assert "outside" not in text and "/etc/" not in text, "weights outside the folder were loaded"


# ------------------------------------------------------------------------------------------ command lines

RATIOS = ["0.5", "0", "-1", "1", "2", "1e-300", "nan", "inf", "abc", "0.25"]
DIVISORS = ["4", "0", "-8", "1", "1000000000", "x"]
SHAPES = ["x=2,24", "x=1,1000000000000", "x=0,24", "nope=1,2", "x=", "=1", "x=a,b", "x=2x24"]
OUTPUTS = ["out.onnx", "in.onnx", "./in.onnx", "link.onnx", ".", "sub", "nodir/out.onnx", "out.txt", "sub/out.onnx"]
REPORTS = ["report.json", "in.onnx", "nodir/r.json", "sub", "out.onnx"]
FEEDS = ["feeds.npz", "nan_feeds.npz", "missing.npz", "in.onnx", "bad_feeds.npz"]

options = st.fixed_dictionaries({}, optional={
    "--ratio": st.sampled_from(RATIOS), "--fixed": st.sampled_from(["4", "0", "-2", "1.5", "100000"]),
    "--divisor": st.sampled_from(DIVISORS), "--excludes": st.sampled_from(["fc1", "nope", ",", ""]),
    "--input-shape": st.sampled_from(SHAPES), "--dict": st.sampled_from(["rules.json", "missing.json", "in.onnx"]),
    "--vbmf": st.just(None), "--tolerance": st.sampled_from(["nan", "-1", "0", "1e9"]),
    "--feeds": st.sampled_from(FEEDS), "--calib": st.sampled_from(FEEDS), "--report": st.sampled_from(REPORTS),
    "--opset": st.sampled_from(["1", "13", "17", "99"]), "--weights": st.just("in.onnx"),
})


def prepare_cli_folder(root: Path) -> None:
    (root / "sub").mkdir()
    (root / "sub" / "keep.txt").write_text("a file of the user's own\n")
    onnx.save(seed_models()["mlp"], str(root / "in.onnx"))
    (root / "link.onnx").symlink_to(root / "in.onnx")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 24)).astype(np.float32)
    np.savez(root / "feeds.npz", x=x)
    x_nan = x.copy()
    x_nan[0, 0] = np.nan
    np.savez(root / "nan_feeds.npz", x=x_nan)
    np.savez(root / "bad_feeds.npz", y=np.ones((2, 3, 4), np.float64))
    (root / "rules.json").write_text(json.dumps({"fc": 0.5, ".*": 8}))


@settings(FUZZ, max_examples=150)
@given(command=st.sampled_from(["inspect", "decompose"]), output=st.sampled_from(OUTPUTS), chosen=options)
def test_random_command_lines(tmp_path: Path, command: str, output: str, chosen: dict[str, Any]) -> None:
    root = Path(tempfile.mkdtemp(dir=tmp_path))  # a fresh folder for every example
    prepare_cli_folder(root)
    argv = [command, "in.onnx"]
    if "--divisor" not in chosen:  # the seed model is small: the default divisor (64) decomposes nothing
        argv += ["--divisor", "4"]
    if command == "decompose":
        argv += ["-o", output]
    for flag, value in chosen.items():
        argv += [flag] if value is None else [flag, value]
    report = chosen.get("--report", "")
    outputs = (output, f"{output}.data", report) if command == "decompose" else ()
    code, err = run_cli(argv, root, outputs=tuple(name for name in outputs if name), reports=(report,),
                        inputs=("in.onnx", "feeds.npz", "nan_feeds.npz", "bad_feeds.npz", "rules.json", "sub/keep.txt"))
    event(f"exit {code}")
    if code == 0 and command == "decompose":
        for value in ("nan_feeds.npz",):
            assert value not in (chosen.get("--feeds"), chosen.get("--calib")), f"NaN feeds were accepted: {argv}"
        assert output.endswith(".onnx") and output not in ("in.onnx", "./in.onnx", "link.onnx")
        assert (root / "in.onnx").is_file() and not (root / "in.onnx").is_symlink()


FACTORY_OUTPUTS = ["out", "sub", ".", "in.onnx", "newdir/out", "sub/inner", "rules.json"]
WEIGHTS = ["state.pt", "in.onnx", "missing.pt", "evil.pt", "rules.json"]


def prepare_factory_folder(root: Path) -> None:
    import pickle

    import torch

    prepare_cli_folder(root)
    torch.save(fuzz_models.tiny_mlp().state_dict(), root / "state.pt")

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.remove, (str(root / "rules.json"),))

    (root / "evil.pt").write_bytes(pickle.dumps(Evil()))


factory_options = st.fixed_dictionaries({}, optional={
    "--ratio": st.sampled_from(RATIOS), "--fixed": st.sampled_from(["4", "0", "100000"]),
    "--divisor": st.sampled_from(DIVISORS), "--excludes": st.sampled_from(["0", "nope", ""]),
    "--dict": st.sampled_from(["rules.json", "missing.json", "in.onnx"]), "--vbmf": st.just(None),
    "--report": st.sampled_from(REPORTS + ["out/report.json"]), "--weights": st.sampled_from(WEIGHTS),
    "--input-shape": st.sampled_from(SHAPES),
})


@settings(FUZZ, max_examples=40)
@given(output=st.sampled_from(FACTORY_OUTPUTS), chosen=factory_options)
def test_random_factory_command_lines(tmp_path: Path, output: str, chosen: dict[str, Any]) -> None:
    root = Path(tempfile.mkdtemp(dir=tmp_path))
    prepare_factory_folder(root)
    argv = ["decompose", "tests.fuzz_models:tiny_mlp", "-o", output]
    if "--divisor" not in chosen:
        argv += ["--divisor", "4"]
    for flag, value in chosen.items():
        argv += [flag] if value is None else [flag, value]
    report = chosen.get("--report", "")
    inputs = ("in.onnx", "feeds.npz", "rules.json", "sub/keep.txt", "state.pt", "evil.pt", "link.onnx")
    code, err = run_cli(argv, root, outputs=tuple(name for name in (output, report) if name), reports=(report,),
                        inputs=inputs)
    event(f"exit {code}")
    assert (root / "rules.json").exists(), "a pickle in --weights was executed"
    if code == 0:
        assert chosen.get("--weights") in (None, "state.pt"), f"bad --weights accepted: {argv}"


@settings(FUZZ, max_examples=20)
@given(to=st.sampled_from(["torch", "mindspore", "tensorflow"]), output=st.sampled_from(FACTORY_OUTPUTS),
       shape=st.sampled_from([None, *SHAPES]))
def test_random_convert_command_lines(tmp_path: Path, to: str, output: str, shape: str | None) -> None:
    root = Path(tempfile.mkdtemp(dir=tmp_path))
    prepare_cli_folder(root)
    argv = ["convert", "in.onnx", "--to", to, "-o", output] + ([] if shape is None else ["--input-shape", shape])
    inputs = ("in.onnx", "feeds.npz", "rules.json", "sub/keep.txt", "link.onnx")
    code, _ = run_cli(argv, root, outputs=(output,), inputs=inputs)
    event(f"exit {code}")
    if code == 0:
        assert (root / output / "converted.json").is_file()
