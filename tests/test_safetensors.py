"""Hugging Face checkpoint folders in, checkpoint folders out: streamed layer by layer, same result as in memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from backends.safetensors import FileTensor, split_by_cost, write_safetensors  # noqa: E402
from frontends.safetensors import INDEX_FILE, TensorInfo, open_checkpoint, stored_tensors  # noqa: E402
from lowrank_ir import Decompose  # noqa: E402
from tools.cli import main  # noqa: E402

EMBEDDING = "model.embed_tokens"


def _llama(dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def _save(model: torch.nn.Module, folder: Path, max_shard_size: str | None) -> Path:
    if max_shard_size is None:
        model.save_pretrained(folder)
    else:
        model.save_pretrained(folder, max_shard_size=max_shard_size)
    return folder


def _load_folder(folder: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        state.update(safetensors_torch.load_file(path))
    return state


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(24).reshape(2, 12) % 96
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 3+-shard float32 Llama checkpoint and its decomposition through the command line."""
    root = tmp_path_factory.mktemp("checkpoint")
    source = _save(_llama(), root / "src", "400KB")
    target = root / "out"
    assert main(["decompose", str(source), "-o", str(target), "--ratio", "0.5", "--divisor", "16"]) == 0
    return source, target


def test_the_command_in_process_leaves_nothing_frozen(sharded: tuple[Path, Path], tmp_path: Path) -> None:
    # The checkpoint command freezes the objects alive before its work (gc.freeze); run from another program's
    # process (here the test's), it hands them back to the collector when it ends.
    import gc

    assert gc.get_freeze_count() == 0
    assert main(["decompose", str(sharded[0]), "-o", str(tmp_path / "out"), "--ratio", "0.5", "--divisor", "16"]) == 0
    assert gc.get_freeze_count() == 0


def test_output_folder_keeps_the_layout_with_reference_names(sharded: tuple[Path, Path]) -> None:
    source, target = sharded
    shards = sorted(path.name for path in source.glob("*.safetensors"))
    assert len(shards) >= 3
    assert sorted(path.name for path in target.glob("*.safetensors")) == shards
    for name in ("config.json", "generation_config.json", INDEX_FILE, "decompose_config.json", "report.json"):
        assert (target / name).is_file(), name
    assert not [path.name for path in target.iterdir() if path.name.startswith(".")]  # no side files left
    index = json.loads((target / INDEX_FILE).read_text())
    state = _load_folder(target)
    assert set(index["weight_map"]) == set(state)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    for name, shard in index["weight_map"].items():
        assert name in safetensors_torch.load_file(target / shard)
    config = json.loads((target / "decompose_config.json").read_text())
    assert "model.layers.0.mlp.up_proj" in config and "lm_head" in config and EMBEDDING not in config
    for layer in config:
        assert f"{layer}.weight" not in state
        assert {f"{layer}.0.weight", f"{layer}.1.weight"} <= set(state)
    assert f"{EMBEDDING}.weight" in state and "model.norm.weight" in state
    report = json.loads((target / "report.json").read_text())
    assert {row["name"] for row in report["layers"] if row["rank"]} == set(config)


def test_rebuilt_structure_matches_decomposing_in_memory(sharded: tuple[Path, Path]) -> None:
    source, target = sharded
    original = transformers.LlamaForCausalLM.from_pretrained(source).eval()
    decomposer = Decompose(original).from_ratio(0.5, excludes=[EMBEDDING], divisor=16)
    in_memory = decomposer.decompose_network()
    streamed_config = json.loads((target / "decompose_config.json").read_text())
    assert streamed_config == decomposer.decompose_config
    # The structure-only recipe, then the streamed weights.
    rebuilt = Decompose(_llama(seed=1), config_file=target / "decompose_config.json").from_file() \
        .decompose_network(do_decompose_weight=False)
    rebuilt.load_state_dict(_load_folder(target), strict=True)
    expected, got = _logits(in_memory), _logits(rebuilt)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    assert not torch.allclose(_logits(original), got, atol=1e-3)  # the decomposition did change the model
    for name, tensor in in_memory.state_dict().items():
        np.testing.assert_allclose(rebuilt.state_dict()[name].numpy(), tensor.numpy(), rtol=1e-4, atol=1e-5,
                                   err_msg=name)


def _same_files(folder: Path, other: Path) -> None:
    """Every file of ``folder`` is in ``other`` with the same bytes; ``report.json`` the same but for its time."""
    names = sorted(path.name for path in folder.iterdir())
    assert sorted(path.name for path in other.iterdir()) == names
    for name in names:
        if name == "report.json":  # it says when it was written
            first, second = (json.loads((where / name).read_text()) for where in (folder, other))
            assert first.pop("created") <= second.pop("created") and first == second
        else:
            assert (other / name).read_bytes() == (folder / name).read_bytes(), name


def _gpt2(seed: int) -> torch.nn.Module:
    config = transformers.GPT2Config(vocab_size=96, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                                     tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config).eval()


def test_gpt2_conv1d_layers_are_streamed_like_linear_layers(tmp_path: Path) -> None:
    """GPT-2's Conv1D (weight stored [in, out]) streams into the nn.Linear chains of the in-memory decomposition."""
    source = _save(_gpt2(seed=0), tmp_path / "src", "100KB")
    target = tmp_path / "out"
    assert main(["decompose", str(source), "-o", str(target), "--ratio", "0.5", "--divisor", "8"]) == 0
    config = json.loads((target / "decompose_config.json").read_text())
    for block in range(2):
        for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            assert f"transformer.h.{block}.{layer}" in config
    state = _load_folder(target)
    c_attn = "transformer.h.0.attn.c_attn"
    rank = config[c_attn]
    assert state[f"{c_attn}.0.weight"].shape == (rank, 64) and state[f"{c_attn}.1.weight"].shape == (192, rank)
    original = transformers.GPT2LMHeadModel.from_pretrained(source).eval()
    decomposer = Decompose(original).from_ratio(0.5, excludes=["transformer.wte", "transformer.wpe"], divisor=8)
    in_memory = decomposer.decompose_network()
    assert config == decomposer.decompose_config
    rebuilt = Decompose(_gpt2(seed=1), config_file=target / "decompose_config.json").from_file() \
        .decompose_network(do_decompose_weight=False)
    rebuilt.load_state_dict(state, strict=True)
    expected, got = _logits(in_memory), _logits(rebuilt)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    assert not torch.allclose(_logits(original), got, atol=1e-3)
    report = json.loads((target / "report.json").read_text())
    assert {row["name"] for row in report["layers"] if row["rank"]} == set(config)


def test_same_input_gives_byte_identical_output(sharded: tuple[Path, Path], tmp_path: Path) -> None:
    source, target = sharded
    again = tmp_path / "again"
    assert main(["decompose", str(source), "-o", str(again), "--ratio", "0.5", "--divisor", "16"]) == 0
    _same_files(target, again)


def test_bfloat16_single_file_stays_bfloat16_and_unsharded(tmp_path: Path) -> None:
    model = _llama(torch.bfloat16)
    source = _save(model, tmp_path / "src", None)
    assert not (source / INDEX_FILE).exists()
    target = tmp_path / "out"
    assert main(["decompose", str(source), "-o", str(target), "--dict", str(_rules(tmp_path)),
                 "--divisor", "16"]) == 0
    assert sorted(path.name for path in target.glob("*.safetensors")) == ["model.safetensors"]
    assert not (target / INDEX_FILE).exists()
    state = _load_folder(target)
    assert {tensor.dtype for tensor in state.values()} == {torch.bfloat16}
    config = json.loads((target / "decompose_config.json").read_text())
    assert sorted(config) == [f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("down_proj", "gate_proj",
                                                                                         "up_proj")]
    original = model.state_dict()
    for name in ("model.layers.0.self_attn.q_proj.weight", "lm_head.weight", f"{EMBEDDING}.weight"):
        assert torch.equal(state[name], original[name])  # left alone: the same bits
    up = "model.layers.1.mlp.up_proj"
    product = state[f"{up}.1.weight"].float() @ state[f"{up}.0.weight"].float()
    weight = original["model.layers.1.mlp.up_proj.weight"].float()
    assert float((weight - product).norm() / weight.norm()) < 0.9


def _rules(folder: Path) -> Path:
    path = folder / "rules.json"
    path.write_text(json.dumps({r"\.mlp\.": 0.5}))
    return path


def test_written_file_loads_with_safetensors_from_memory_and_from_file_ranges(tmp_path: Path) -> None:
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3, dtype=torch.bfloat16),
               "c": torch.tensor(7, dtype=torch.int64), "d": torch.zeros(0, 4)}
    write_safetensors(tmp_path / "x.safetensors", list(tensors.items()))
    loaded = safetensors_torch.load_file(tmp_path / "x.safetensors")
    assert list(loaded) == list(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor)
    # The same tensors as byte ranges of that file, in another order, beside one from memory.
    stored = {info.name: FileTensor(tmp_path / "x.safetensors", info)
              for info in stored_tensors(tmp_path / "x.safetensors")}
    mixed = [("b", stored["b"]), ("e", torch.full((2,), 5, dtype=torch.int8)), ("a", stored["a"]), ("d", stored["d"])]
    write_safetensors(tmp_path / "y.safetensors", mixed)
    again = safetensors_torch.load_file(tmp_path / "y.safetensors")
    assert list(again) == ["b", "e", "a", "d"]
    assert torch.equal(again["a"], tensors["a"]) and torch.equal(again["b"], tensors["b"])
    # Copied back in the order they were written: the same bytes, header included.
    write_safetensors(tmp_path / "z.safetensors", [(name, stored[name]) for name in tensors])
    assert (tmp_path / "z.safetensors").read_bytes() == (tmp_path / "x.safetensors").read_bytes()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["x.safetensors", "y.safetensors", "z.safetensors"]
    with pytest.raises(ValueError, match="'a' is written twice"):
        write_safetensors(tmp_path / "w.safetensors", [("a", tensors["a"]), ("a", stored["a"])])
    with pytest.raises(ValueError, match="'q' has dtype torch.complex64, which safetensors cannot store"):
        write_safetensors(tmp_path / "w.safetensors", [("q", torch.zeros(2, dtype=torch.complex64))])
    beyond = stored["a"].info.start + 10 ** 6  # a header that lists bytes the file does not have
    truncated = FileTensor(tmp_path / "x.safetensors", TensorInfo("a", "x.safetensors", "F32", (2, 3), beyond,
                                                                  beyond + 24))
    with pytest.raises(ValueError, match="before the tensor data it lists"):
        write_safetensors(tmp_path / "w.safetensors", [("a", truncated)])
    assert not (tmp_path / "w.safetensors").exists()  # nothing half-written is left


def test_bad_folders_are_one_line_and_exit_2(tmp_path: Path, sharded: tuple[Path, Path], capsys) -> None:
    source, _ = sharded
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    assert main(["decompose", str(empty), "-o", str(out)]) == 2
    assert "has no config.json" in capsys.readouterr().err
    # --energy loads the folder in memory (tests/test_hf_cli.py), where the streamed path's options do not apply
    assert main(["decompose", str(source), "-o", str(out), "--energy", "0.9", "--nproc", "2"]) == 2
    assert "--nproc cannot be used with a Hugging Face folder loaded in memory" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in source.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    first_shard = sorted(broken.glob("*.safetensors"))[0]
    first_shard.unlink()
    assert main(["decompose", str(broken), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and first_shard.name in err
    assert not out.exists()
    with pytest.raises(FileNotFoundError, match="has neither model.safetensors nor"):
        (tmp_path / "cfg").mkdir()
        (tmp_path / "cfg" / "config.json").write_text("{}")
        open_checkpoint(tmp_path / "cfg")


def test_output_folder_rules_hold_for_checkpoint_folders(sharded: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    source, _ = sharded
    common = ["--ratio", "0.5", "--divisor", "16", "--threads", "1"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's own file\n")
    for force in ([], ["--force"]):  # never replaced, refused before any work
        assert main(["decompose", str(source), "-o", str(mine), *force, *common]) == 2
        assert "holds 'notes.txt', which this command does not write" in capsys.readouterr().err
    assert sorted(path.name for path in mine.iterdir()) == ["notes.txt"]
    out, report = tmp_path / "out", tmp_path / "nodir" / "report.json"
    assert main(["decompose", str(source), "-o", str(out), "--report", str(report), *common]) == 2
    assert not out.exists()  # the report's folder is checked before any work
    report = tmp_path / "report.json"
    assert main(["decompose", str(source), "-o", str(out), "--report", str(report), *common]) == 0
    assert report.is_file() and (out / "report.json").read_text() == report.read_text()
    first = (out / "decompose_config.json").read_text()
    assert main(["decompose", str(source), "-o", str(out), *common]) == 2  # an earlier run's folder: --force
    assert "add --force" in capsys.readouterr().err
    assert main(["decompose", str(source), "-o", str(out), "--force", *common]) == 0
    assert (out / "decompose_config.json").read_text() == first
    capsys.readouterr()


def test_two_processes_write_the_same_bytes_as_one(sharded: tuple[Path, Path], tmp_path: Path, capfd) -> None:
    source, _ = sharded
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--ratio", "0.5", "--divisor", "16", "--threads", "1"]
    assert main(["decompose", str(source), "-o", str(one), *common]) == 0
    capfd.readouterr()
    assert main(["decompose", str(source), "-o", str(two), "--nproc", "2", *common]) == 0
    assert "(2 processes)" in capfd.readouterr().out  # forked from this (test) process, after it used torch
    _same_files(one, two)


def test_torchrun_processes_write_the_same_bytes_as_one(sharded: tuple[Path, Path], tmp_path: Path) -> None:
    """The multi-node path: processes torchrun starts meet by its rendezvous and write what one process writes."""
    source, _ = sharded
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--ratio", "0.5", "--divisor", "16", "--threads", "1"]
    assert main(["decompose", str(source), "-o", str(one), *common]) == 0
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "tools.cli", "decompose", str(source), "-o", str(two), *common],
                          capture_output=True, text=True, env=env, cwd=root, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "(2 processes)" in done.stdout  # rank 0 wrote the folder
    _same_files(one, two)


def test_a_failing_process_stops_the_command_and_leaves_no_folder(sharded: tuple[Path, Path], tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import backends.safetensors

    source, _ = sharded
    real = backends.safetensors._decompose_layer

    def fails_on_one_layer(checkpoint, node, *rest):  # the forked processes inherit it
        if node.name == "model.layers.1.mlp.down_proj":
            raise RuntimeError(f"no factors for {node.name}")
        return real(checkpoint, node, *rest)

    monkeypatch.setattr(backends.safetensors, "_decompose_layer", fails_on_one_layer)
    out = tmp_path / "out"
    cause = r"process [01] of 2 failed: RuntimeError: no factors for model\.layers\.1\.mlp\.down_proj"
    with pytest.raises(RuntimeError, match=cause):  # the cause, not the other process's lost connection
        main(["decompose", str(source), "-o", str(out), "--nproc", "2", "--threads", "1"])
    assert not out.exists() and not [path for path in tmp_path.iterdir() if path.name != "out"]


def test_a_process_that_cannot_write_stops_the_command_with_one_line(sharded: tuple[Path, Path], tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import backends.safetensors

    source, _ = sharded
    real = backends.safetensors._decompose_layer

    def disk_full(checkpoint, node, *rest):  # the forked processes inherit it
        if node.name == "model.layers.1.mlp.down_proj":
            raise OSError(28, "No space left on device")
        return real(checkpoint, node, *rest)

    monkeypatch.setattr(backends.safetensors, "_decompose_layer", disk_full)
    out = tmp_path / "out"
    assert main(["decompose", str(source), "-o", str(out), "--nproc", "2", "--threads", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "process" in err[0], err
    assert not out.exists()


def test_layers_are_split_by_cost_largest_first() -> None:
    owner = split_by_cost({"a": 10, "b": 7, "c": 5, "d": 3, "e": 3}, 2)
    assert owner == {"a": 0, "b": 1, "c": 1, "d": 0, "e": 1}  # loads 13 and 15
    assert set(split_by_cost({"x": 1}, 3).values()) == {0}


def test_process_options_are_for_checkpoint_folders_only(capsys) -> None:
    assert main(["decompose", "tests.models:resnet50", "-o", "unused", "--nproc", "2"]) == 2
    assert "--nproc apply to checkpoint folders" in capsys.readouterr().err
