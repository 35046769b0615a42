"""Everything read is bounded and confined: JSON (size, depth, schema), safetensors, manifests, array
sizes against the memory limit, ratios, numpy scalars, excludes, ONNX external data."""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path

import numpy as np
import pytest

from lowrank_ir import Graph, GraphError, Node, Op, Policy, Value, load_graph, plan, save_graph, verify
from lowrank_ir._files import MapOf, check_schema, read_json
from lowrank_ir._limits import check_array, max_bytes, parse_size, size_limit

DEEP = "[" * 100_000 + "]" * 100_000


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def mlp_graph(rng: np.random.Generator, dims: tuple[int, int, int] = (48, 64, 40)) -> Graph:
    """Two Linear layers, ``fc0`` and ``fc1``, with a ReLU between them."""
    nodes, params = [], {}
    for index, (inp, out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        params[f"fc{index}.weight"] = rng.standard_normal((out, inp)).astype(np.float32)
        nodes.append(Node(Op.LINEAR, f"fc{index}", {"in_features": inp, "out_features": out},
                          {"weight": f"fc{index}.weight"}, ["x" if index == 0 else "h"], ["h" if index == 0 else "y"]))
    return Graph(nodes, params, [Value("x", "float32", ("N", dims[0]))], [Value("y", "float32", ("N", dims[-1]))])


# ------------------------------------------------------------------------------------------------ JSON

def test_read_json_refuses_deep_nesting_without_recursion_error(tmp_path) -> None:
    path = tmp_path / "deep.json"
    path.write_text(DEEP)
    with pytest.raises(ValueError, match=r"deep\.json.*nested deeper than 64 levels"):
        read_json(path)
    path.write_text("[" * 65 + "]" * 65)  # parses, but deeper than what any of our files hold
    with pytest.raises(ValueError, match="nested deeper than 64"):
        read_json(path)
    path.write_text("[" * 64 + "]" * 64)
    assert read_json(path) is not None


def test_read_json_refuses_files_over_the_size_limit(tmp_path) -> None:
    path = tmp_path / "big.json"
    path.write_text(json.dumps({"key": "x" * 100}))
    with pytest.raises(ValueError, match=r"big\.json.*larger than 50 bytes"):
        read_json(path, max_bytes=50)
    assert read_json(path, max_bytes=200) == {"key": "x" * 100}


@pytest.mark.parametrize(("value", "message"), [
    ({"a": 1}, r"'f.json': key 'b' is missing"),
    ({"a": True, "b": []}, r"'f.json': a must be an integer, got True"),
    ({"a": 1, "b": [{"c": "x"}, {"c": 3}]}, r"'f.json': b\[1\]\.c must be a string, got 3"),
    ({"a": 1, "b": [], "m": {"k": 1}}, r"'f.json': m\['k'\] must be a string, got 1"),
    ([1], r"'f.json': the top level must be an object"),
])
def test_schema_errors_name_the_file_and_the_key(value, message) -> None:
    schema = {"a": int, "b": [{"c": str}], "m?": MapOf(str)}
    with pytest.raises(ValueError, match=message):
        check_schema(value, schema, "'f.json'")
    check_schema({"a": 1, "b": [{"c": "x"}]}, schema, "'f.json'")  # valid: optional key absent


def test_deep_config_file_is_a_clean_error(tmp_path) -> None:
    torch = pytest.importorskip("torch")
    from lowrank_ir import Decompose

    config = tmp_path / "config.json"
    config.write_text(DEEP)
    decomposer = Decompose(torch.nn.Sequential(torch.nn.Linear(64, 64)), config_file=config)
    with pytest.raises(ValueError, match=r"config_file .*config\.json.* nested deeper"):
        decomposer.from_file()


def test_deep_dict_file_is_exit_2(tmp_path, capsys) -> None:
    pytest.importorskip("onnx")
    from tests import onnx_models as om
    from tools.cli import main

    model = tmp_path / "mlp.onnx"
    model.write_bytes(om.mlp(np.random.default_rng(0), dims=(64, 96, 32)).SerializeToString())
    rules = tmp_path / "rules.json"
    rules.write_text(DEEP)
    assert main(["inspect", str(model), "--dict", str(rules)]) == 2
    err = capsys.readouterr().err
    assert "nested deeper" in err and "rules.json" in err and len(err.strip().splitlines()) == 1
    rules.write_text(json.dumps({"fc": "svd"}))
    assert main(["inspect", str(model), "--dict", str(rules)]) == 2
    assert "--dict file" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ graph.json

def _edit_graph_json(folder: Path, edit) -> None:
    path = folder / "graph.json"
    structure = json.loads(path.read_text())
    edit(structure)
    path.write_text(json.dumps(structure))


@pytest.mark.parametrize(("edit", "message"), [
    (lambda s: s.pop("nodes"), r"graph\.json': key 'nodes' is missing"),
    (lambda s: s.pop("outputs"), r"graph\.json': key 'outputs' is missing"),
    (lambda s: s["nodes"][1].pop("op"), r"graph\.json': key 'op' is missing in nodes\[1\]"),
    (lambda s: s["nodes"][0].update(inputs=5), r"graph\.json': nodes\[0\]\.inputs must be an array, got 5"),
    (lambda s: s["nodes"][0].update(params={"weight": 3}), r"nodes\[0\]\.params\['weight'\] must be a string"),
    (lambda s: s["nodes"][0].update(op="Dense"), r"graph\.json': nodes\[0\] \('fc0'\) cannot be read.*Dense"),
    (lambda s: s["nodes"][0]["params"].update(weight="nope"), r"graph\.json': invalid graph.*'nope'"),
])
def test_graph_json_missing_keys_and_wrong_types_name_file_and_key(tmp_path, rng, edit, message) -> None:
    save_graph(mlp_graph(rng), tmp_path / "g")
    _edit_graph_json(tmp_path / "g", edit)
    with pytest.raises(ValueError, match=message):
        load_graph(tmp_path / "g")


def test_deep_graph_json_is_a_clean_error(tmp_path, rng) -> None:
    save_graph(mlp_graph(rng), tmp_path / "g")
    (tmp_path / "g" / "graph.json").write_text(DEEP)
    with pytest.raises(ValueError, match="nested deeper"):
        load_graph(tmp_path / "g")


@pytest.mark.parametrize("damage", ["truncated", "empty", "forged-header", "huge-header-length"])
def test_bad_safetensors_name_the_file(tmp_path, rng, damage) -> None:
    save_graph(mlp_graph(rng), tmp_path / "g")
    params = tmp_path / "g" / "params.safetensors"
    data = params.read_bytes()
    if damage == "truncated":
        params.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        params.write_bytes(b"")
    elif damage == "forged-header":
        header = json.dumps({"fc0.weight": {"dtype": "F32", "shape": [10**6, 10**6],
                                            "data_offsets": [0, 4 * 10**12]}}).encode()
        params.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    else:
        params.write_bytes((2**62).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match=r"params\.safetensors' is not a readable safetensors file"):
        load_graph(tmp_path / "g")


def test_graph_error_is_one_line(rng) -> None:
    graph = mlp_graph(rng)
    graph.nodes[0].params["weight"] = "missing"
    graph.nodes[1].inputs = ["nowhere"]
    with pytest.raises(GraphError) as info:
        verify(graph)
    message = str(info.value)
    assert "\n" not in message and "2 problems" in message and "'missing'" in message and "'nowhere'" in message


# ------------------------------------------------------------------------------------ converted.json

def _converted_folder(tmp_path: Path, rng: np.random.Generator, **manifest: object) -> Path:
    folder = tmp_path / "converted"
    save_graph(mlp_graph(rng), folder)
    content = {"format": "lowrank-ir converted model", "version": 1, "framework": "torch", "weights": "model.pt"}
    content.update(manifest)
    (folder / "converted.json").write_text(json.dumps({k: v for k, v in content.items() if v is not None}))
    return folder


@pytest.mark.parametrize(("weights", "message"), [
    ("../outside.pt", r"weights '\.\./outside\.pt' is not a file inside the folder"),
    ("ABSOLUTE", r"is not a file inside the folder"),
    ("sub/../../outside.pt", r"is not a file inside the folder"),
    ("", r"is not a file inside the folder"),
    (None, r"converted\.json': key 'weights' is missing"),
    (3, r"converted\.json': weights must be a string, got 3"),
])
def test_manifest_weights_stay_inside_the_folder(tmp_path, rng, weights, message) -> None:
    from lowrank_ir import load_converted

    outside = tmp_path / "outside.pt"
    outside.write_bytes(b"not to be read")
    folder = _converted_folder(tmp_path, rng, weights=str(outside) if weights == "ABSOLUTE" else weights)
    with pytest.raises(ValueError, match=message):
        load_converted(folder)


def test_manifest_weights_through_a_symlink_out_are_refused(tmp_path, rng) -> None:
    from lowrank_ir import load_converted

    (tmp_path / "outside.pt").write_bytes(b"not to be read")
    folder = _converted_folder(tmp_path, rng, weights="link.pt")
    (folder / "link.pt").symlink_to(tmp_path / "outside.pt")
    with pytest.raises(ValueError, match="is not a file inside the folder"):
        load_converted(folder)


def test_deep_manifest_is_a_clean_error(tmp_path, rng) -> None:
    from lowrank_ir import load_converted

    folder = _converted_folder(tmp_path, rng)
    (folder / "converted.json").write_text(DEEP)
    with pytest.raises(ValueError, match=r"converted\.json.*nested deeper"):
        load_converted(folder)


# ------------------------------------------------------------------------------------- memory limit

def test_limit_defaults_to_half_the_memory_and_can_be_set() -> None:
    default = max_bytes()
    assert default > 2**20
    with size_limit("1K") as limit:
        assert limit == max_bytes() == 1024
        with pytest.raises(ValueError, match=r"'x' \(shape \[16, 17\], float32\).*more than the memory limit"):
            check_array((16, 17), np.float32, "'x'")
        with size_limit(None):
            assert max_bytes() == 1024  # None keeps what is in force
    assert max_bytes() == default
    assert check_array((16, 16), np.float32, "x") == 1024
    assert parse_size("64G") == 64 * 2**30 and parse_size("1.5k") == 1536 and parse_size("123") == 123
    for bad in ("lots", "-1", "0", "1X"):
        with pytest.raises(ValueError, match="size"):
            parse_size(bad)
    with pytest.raises(ValueError, match="max_bytes must be"):
        with size_limit(-5):
            pass


@pytest.fixture
def mlp_file(tmp_path: Path) -> Path:
    pytest.importorskip("onnx")
    from tests import onnx_models as om

    path = tmp_path / "mlp.onnx"
    path.write_bytes(om.mlp(np.random.default_rng(0), dims=(64, 96, 32)).SerializeToString())
    return path


def _one_line_exit_2(capsys, argv: list[str], *needles: str) -> None:
    from tools.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize("command", ["inspect", "decompose", "convert", "parity"])
def test_huge_input_shape_is_refused_before_allocating(tmp_path, mlp_file, capsys, command) -> None:
    extra = {"decompose": ["-o", str(tmp_path / "out.onnx")], "convert": ["--to", "torch", "-o", str(tmp_path / "c")],
             "parity": ["--no-decompose"]}.get(command, [])
    _one_line_exit_2(capsys, [command, str(mlp_file), "--input-shape", "x=1000000000000,64", *extra],
                     "input 'x'" if command != "parity" else "'x'", "232.8 TiB", "more than the memory limit")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["mlp.onnx"]


def test_max_bytes_flag_sets_the_limit(mlp_file, capsys) -> None:
    from tools.cli import main

    assert main(["inspect", str(mlp_file), "--input-shape", "x=1000,64"]) == 0
    capsys.readouterr()
    _one_line_exit_2(capsys, ["inspect", str(mlp_file), "--input-shape", "x=1000,64", "--max-bytes", "100K"],
                     "250.0 KiB", "limit set is 100.0 KiB")
    with pytest.raises(SystemExit) as info:
        main(["inspect", str(mlp_file), "--max-bytes", "lots"])
    assert info.value.code == 2


def test_model_declaring_a_huge_dimension_is_refused(tmp_path, capsys) -> None:
    pytest.importorskip("onnx")
    from tests import onnx_models as om

    rng = np.random.default_rng(0)
    weight = om.decaying(rng, (96, 64))
    node = om.helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    model = om.make_model([node], [om.tensor("x", [10**12, 96])], [om.tensor("y", [10**12, 64])], {"w": weight})
    path = tmp_path / "huge.onnx"
    path.write_bytes(model.SerializeToString())
    _one_line_exit_2(capsys, ["decompose", str(path), "-o", str(tmp_path / "out.onnx"), "--divisor", "8"],
                     "random feed 'x'", "more than the memory limit")
    assert not (tmp_path / "out.onnx").exists()
    from backends.onnx import random_feeds

    with pytest.raises(ValueError, match="random feed 'x'"):
        random_feeds(model)
    assert random_feeds(model, {"x": [2, 96]})["x"].shape == (2, 96)
    with pytest.raises(ValueError, match=r"random feed 'x'.*limit set is 100 B"):
        random_feeds(model, {"x": [2, 96]}, max_bytes=100)


def test_ten_gigabyte_sparse_file_is_refused_unread(tmp_path, capsys) -> None:
    pytest.importorskip("onnx")
    from frontends.onnx import load_model

    path = tmp_path / "big.onnx"
    with open(path, "wb") as stream:
        stream.truncate(10 * 2**30)
    _one_line_exit_2(capsys, ["inspect", str(path)], "10.0 GiB", "at most 2 GB")
    _one_line_exit_2(capsys, ["decompose", str(path), "-o", str(tmp_path / "o.onnx")], "at most 2 GB")
    small = tmp_path / "small.onnx"
    with open(small, "wb") as stream:
        stream.truncate(4096)
    with pytest.raises(ValueError, match=r"ONNX model .*small\.onnx.*4\.0 KiB.*limit set is 1.0 KiB"):
        load_model(small, max_bytes=1024)


def test_npz_feeds_are_checked_from_their_headers(tmp_path) -> None:
    pytest.importorskip("onnx")
    from backends.onnx import load_feeds

    path = tmp_path / "forged.npz"
    with zipfile.ZipFile(path, "w") as archive, archive.open("x.npy", "w") as stream:
        np.lib.format.write_array_header_1_0(stream, {"descr": "<f4", "fortran_order": False, "shape": (10**12,)})
    with pytest.raises(ValueError, match=r"forged\.npz'.*array 'x'.*shape \[1000000000000\].*memory limit"):
        load_feeds(path)
    good = tmp_path / "good.npz"
    np.savez(good, x=np.zeros((4, 64), np.float32))
    assert load_feeds(good)["x"].shape == (4, 64)
    with pytest.raises(ValueError, match="array 'x'"):
        load_feeds(good, max_bytes=512)


def test_convert_and_parity_take_max_bytes(mlp_file) -> None:
    pytest.importorskip("torch")
    from lowrank_ir import convert, parity

    with pytest.raises(ValueError, match=r"input 'x' of input_shapes.*limit set is 100.0 KiB"):
        convert(mlp_file, "torch", input_shapes={"x": [1000, 64]}, max_bytes=100 * 1024)
    assert convert(mlp_file, "torch", input_shapes={"x": [1000, 64]}, max_bytes="1M") is not None
    with pytest.raises(ValueError, match="limit set is 100.0 KiB"):
        parity(mlp_file, input_shapes={"x": [1000, 64]}, ratio=None, frameworks=["torch"], max_bytes="100K")


# ----------------------------------------------------------------------------------- external data

def _external(tensor, location: str, length: int | None = None) -> None:
    from onnx import TensorProto

    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location
    if length is not None:
        entry = tensor.external_data.add()
        entry.key, entry.value = "length", str(length)


def test_external_data_check_walks_sparse_constants(tmp_path) -> None:
    pytest.importorskip("onnx")
    from onnx import helper, numpy_helper

    from frontends.onnx import check_external_data
    from tests import onnx_models as om

    values = numpy_helper.from_array(np.ones(2, np.float32), "v")
    indices = numpy_helper.from_array(np.array([0, 3], np.int64), "i")
    _external(values, "../secret.bin")
    sparse = helper.make_sparse_tensor(values, indices, [4])
    node = helper.make_node("Constant", [], ["c"], name="c", sparse_value=sparse)
    model = om.make_model([node, helper.make_node("Add", ["x", "c"], ["y"])], [om.tensor("x", [4])],
                          [om.tensor("y", [4])], check=False)
    with pytest.raises(ValueError, match=r"tensor 'v'.*'\.\./secret\.bin' escapes the model's folder"):
        check_external_data(model, tmp_path)


def test_external_data_check_walks_training_info(tmp_path, rng) -> None:
    pytest.importorskip("onnx")
    from onnx import helper, numpy_helper

    from frontends.onnx import check_external_data, load_model
    from tests import onnx_models as om

    model = om.mlp(rng, dims=(8, 16, 4))
    init = numpy_helper.from_array(np.zeros(3, np.float32), "state")
    _external(init, "/etc/passwd")
    training = model.training_info.add()
    training.initialization.CopyFrom(helper.make_graph([], "init", [], [], [init]))
    with pytest.raises(ValueError, match=r"tensor 'state'.*'/etc/passwd' escapes"):
        check_external_data(model, tmp_path)
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ValueError, match="escapes"):
        load_model(path)


def _external_model(length: int | None) -> object:
    from onnx import numpy_helper

    from tests import onnx_models as om

    weight = numpy_helper.from_array(np.zeros((16, 16), np.float32), "w")
    _external(weight, "w.bin", length)
    node = om.helper.make_node("MatMul", ["x", "w"], ["y"])
    model = om.make_model([node], [om.tensor("x", [1, 16])], [om.tensor("y", [1, 16])], check=False)
    model.graph.initializer.append(weight)
    return model


@pytest.mark.parametrize(("length", "message"), [
    (1000, r"declares length 1000, but its dims \[16, 16\] and type FLOAT need 1024 bytes"),
    (None, r"would read 1000 bytes, but its dims \[16, 16\] and type FLOAT need 1024 bytes"),
])
def test_external_data_length_is_compared_with_the_tensor_size(tmp_path, length, message) -> None:
    pytest.importorskip("onnx")
    from frontends.onnx import check_external_data, load_model

    (tmp_path / "w.bin").write_bytes(b"\0" * 1000)
    with pytest.raises(ValueError, match=message):
        check_external_data(_external_model(length), tmp_path)
    (tmp_path / "w.bin").write_bytes(b"\0" * 1024)  # exactly the tensor: accepted, and bounded by max_bytes
    path = tmp_path / "m.onnx"
    path.write_bytes(_external_model(None if length is None else 1024).SerializeToString())  # type: ignore[attr-defined]
    assert load_model(path).graph.initializer[0].dims == [16, 16]
    with pytest.raises(ValueError, match=r"tensor 'w' \(external data.*limit set is 512 B"):
        load_model(path, max_bytes=512)


# ------------------------------------------------------------------------------- ratios, numbers

def test_ratio_that_rounds_every_rank_to_zero_is_refused(rng) -> None:
    graph = mlp_graph(rng)
    for ratio in (1e-300, 1e-3):
        with pytest.raises(ValueError, match=rf"ratio {ratio!r} is too small.*every layer it applies to \(2\).*0\.036"):
            plan(graph, Policy.ratio(ratio, divisor=1))
    assert plan(graph, Policy.ratio(0.05, divisor=1)).decomposed_entries()  # fc0 gets rank 1
    with pytest.raises(ValueError, match="too small"):
        plan(graph, Policy.from_dict({"fc": 1e-300}, divisor=1))


def test_tiny_ratio_on_the_command_line_is_exit_2(tmp_path, mlp_file, capsys) -> None:
    _one_line_exit_2(capsys, ["decompose", str(mlp_file), "-o", str(tmp_path / "o.onnx"), "--ratio", "1e-300"],
                     "ratio 1e-300 is too small")
    assert not (tmp_path / "o.onnx").exists()


def test_numpy_scalars_are_accepted_where_python_numbers_are(rng) -> None:
    graph = mlp_graph(rng)
    expected = plan(graph, Policy.ratio(0.5, divisor=8)).decompose_config()
    for ratio in (np.float16(0.5), np.float32(0.5), np.float64(0.5), np.longdouble(0.5)):
        for divisor in (np.int8(8), np.uint16(8), np.int32(8), np.int64(8)):
            assert plan(graph, Policy.ratio(ratio, divisor=divisor)).decompose_config() == expected
    fixed = plan(graph, Policy.fixed(8, divisor=1)).decompose_config()
    assert plan(graph, Policy.fixed(np.int32(8), divisor=np.uint8(1))).decompose_config() == fixed
    assert plan(graph, Policy.from_dict({"fc": np.float32(0.5)}, divisor=np.int64(8))).decompose_config() == expected
    for bad in (np.bool_(True), True, np.float32(1.5), np.int64(0)):
        with pytest.raises(ValueError):
            Policy.fixed(bad) if not isinstance(bad, np.floating) else Policy.ratio(bad)


def test_numpy_scalars_in_the_decompose_api(tmp_path) -> None:
    torch = pytest.importorskip("torch")
    from lowrank_ir import Decompose

    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 32))
    expected = Decompose(model).from_ratio(0.5, divisor=8).decompose_config
    assert Decompose(model).from_ratio(np.float32(0.5), divisor=np.int64(8)).decompose_config == expected
    assert Decompose(model).from_fixed(np.int16(8), divisor=np.int32(8)).decompose_config == {"0": 8, "2": 8}
    energy = Decompose(model).from_energy(0.5, divisor=1).decompose_config
    assert Decompose(model).from_energy(np.float32(0.5), divisor=np.int8(1)).decompose_config == energy
    budget = Decompose(model).from_budget(params=0.5, divisor=8).decompose_config
    assert Decompose(model).from_budget(params=np.float32(0.5), divisor=8).decompose_config == budget
    counted = Decompose(model).from_budget(params=4000, divisor=8).decompose_config
    assert Decompose(model).from_budget(params=np.int64(4000), divisor=8).decompose_config == counted
    data = [torch.randn(4, 64) for _ in range(3)]
    decomposer = Decompose(model).from_ratio(0.5, divisor=8)
    assert decomposer.decompose_network(datasets=data, max_iter=np.int64(2)) is not None


def test_parity_takes_numpy_scalars(mlp_file) -> None:
    pytest.importorskip("torch")
    from lowrank_ir import parity

    report = parity(mlp_file, ratio=np.float32(0.5), tolerance=np.float32(1e-3), divisor=np.int64(8),
                    seed=np.int32(1), frameworks=["torch"])
    assert report.ok and report.ratio == 0.5 and report.divisor == 8
    with pytest.raises(ValueError, match="ratio must be"):
        parity(mlp_file, ratio=np.float32(2.0), frameworks=["torch"])


# ------------------------------------------------------------------------------- excludes, config_file

def test_unknown_excludes_are_reported_with_a_suggestion(rng, caplog) -> None:
    graph = mlp_graph(rng)
    with caplog.at_level(logging.WARNING, logger="lowrank_ir"):
        entries = plan(graph, Policy.ratio(0.5, ["fc0", "fc2", "fcc1"], divisor=8)).entries
    assert entries["fc0"].reason == "in excludes" and entries["fc1"].decomposed  # the known name still applies
    (record,) = [record for record in caplog.records if "excludes" in record.getMessage()]
    message = record.getMessage()
    assert record.levelno == logging.WARNING and "\n" not in message
    assert "2 layer(s) the model does not have, ignored" in message and "['fc2', 'fcc1']" in message
    assert "'fcc1': did you mean 'fc1'?" in message
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lowrank_ir"):
        plan(graph, Policy.ratio(0.5, ["fc0"], divisor=8))
    assert not caplog.records  # nothing to say when every name is a layer


def test_unknown_excludes_in_every_policy(tmp_path, mlp_file, capsys, caplog) -> None:
    torch = pytest.importorskip("torch")
    from lowrank_ir import Decompose
    from tools.cli import main

    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 32))
    calls = [lambda d: d.from_ratio(0.5, ["fc"], 8), lambda d: d.from_fixed(8, ["fc"], 8),
             lambda d: d.from_vbmf(["fc"], 8), lambda d: d.from_dict({"0": 8}, ["fc"], 8),
             lambda d: d.from_energy(0.5, ["fc"]), lambda d: d.from_budget(params=0.5, excludes=["fc"])]
    for call in calls:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="lowrank_ir"):
            call(Decompose(model))
        assert any("does not have, ignored" in record.getMessage() and "['fc']" in record.getMessage()
                   for record in caplog.records), call
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lowrank_ir"):
        assert main(["inspect", str(mlp_file), "--excludes", "fc0,fc9", "--divisor", "8"]) == 0
    assert any("['fc9']" in record.getMessage() for record in caplog.records)


def test_config_file_that_is_a_folder_is_refused_up_front(tmp_path) -> None:
    torch = pytest.importorskip("torch")
    from lowrank_ir import Decompose

    (tmp_path / "config.json").mkdir()
    with pytest.raises(ValueError, match=r"config_file .*config\.json' is a folder"):
        Decompose(torch.nn.Sequential(torch.nn.Linear(64, 64)), config_file=tmp_path / "config.json")


def test_safe_umask_takes_a_numpy_int(tmp_path) -> None:
    import os

    from lowrank_ir import SafeWriteUmask

    with SafeWriteUmask(umask=np.int64(0o077)):
        (tmp_path / "f").write_text("x")
    assert os.stat(tmp_path / "f").st_mode & 0o077 == 0


def test_an_unforeseen_memory_error_is_one_line_and_exit_2(monkeypatch, mlp_file, capsys) -> None:
    from tools import onnx_cli

    def exhausted(args: object) -> int:
        raise MemoryError("Unable to allocate 3.64 TiB")

    monkeypatch.setattr(onnx_cli, "inspect", exhausted)
    _one_line_exit_2(capsys, ["inspect", str(mlp_file)], "out of memory (Unable to allocate 3.64 TiB)")
