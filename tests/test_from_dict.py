"""``from_dict`` takes every per-layer value form the reference tool takes, with its precedence and rounding.

Value forms: an int rank, a float ratio, ``"vbmf"``, an ``(out rank, in rank)`` pair (tuple, or list as
JSON gives it); keys are strings or compiled ``re.Pattern``. Every expectation about the reference
(msModelSlim's ``low_rank_decompose``) is what it computes now, in this process, on ``tests/models.py``'s
``Mixed`` (Embedding, Linear, a 3x3 and a 1x1 conv). Where we refuse what the reference accepts, a test
shows both sides. The same rules go through the ONNX facade and the command line's ``--dict``.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from models import mixed, mixed_ids  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch import nn  # noqa: E402

from lowrank_ir import Decompose, count_parameters  # noqa: E402
from tools.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def reference(quiet_reference) -> Any:
    """The reference's PyTorch ``Decompose`` class."""
    return pytest.importorskip("msmodelslim.pytorch.low_rank_decompose").Decompose


@pytest.fixture(scope="module")
def ref_count() -> Any:
    return pytest.importorskip("ascend_utils.common.utils").count_parameters


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return mixed(seed=0)


def _config_or_error(decomposer: Any, rules: Any, **kwargs: Any) -> Any:
    """The config ``from_dict`` gives, with tuples as lists, or "no config" when the tool refuses to make one."""
    try:
        config = decomposer.from_dict(rules, **kwargs).decompose_config
    except ValueError:
        return "no config"
    return {name: list(rank) if isinstance(rank, tuple) else rank for name, rank in config.items()}


# ----------------------------------------------------------------------------- same config as the reference

RULE_CASES = {
    # id: (rules, keyword arguments)
    "documented-pairs-d16": ({"feature.0": (32, 16), "feature.2": (16, 28)}, {"divisor": 16}),
    "documented-mixed-d16": ({"feature.0": (64, 64), "inner": 192, "classifier.0": 128}, {"divisor": 16}),
    "pairs-round-each-rank-d16": ({"feature.0": (12, 12), "feature.2": (31, 13), "inner": 11}, {"divisor": 16}),
    "pairs-d1": ({"feature.0": (37, 5), "feature.2": (3, 50)}, {"divisor": 1}),
    "pairs-d3": ({"feature.0": (37, 5), "feature.2": (3, 50), "classifier.0": (7, 100)}, {"divisor": 3}),
    "pairs-on-matrices-d8": ({"embedding.0": (5, 9), "embedding.1": (9, 3), "inner": (100, 7),
                              "classifier.0": [40, 70], "feature": (20, 9)}, {"divisor": 8}),
    "lists-as-json-gives-them": ({"feature.0": [24, 40], "inner": [64, 32]}, {"divisor": 8}),
    "compiled-keys-with-flags": ({re.compile("FEAT", re.IGNORECASE): (20, 40), "classifier": 0.3,
                                  re.compile(r"^emb.*\.1$"): "VBMF"}, {"divisor": 4}),
    "first-match-in-dict-order-wins": ({"feature": (16, 16), "feature.0": (64, 64), ".": 0.25}, {"divisor": 16}),
    "one-pattern-twice-last-value": ({"feature.0": (32, 16), re.compile("feature.0"): (64, 48), "inner": 64},
                                     {"divisor": 16}),
    "excludes-before-rules": ({"feature": (24, 24), "classifier": 0.5},
                              {"divisor": 8, "excludes": ["feature.2", "classifier.1"]}),
    "ratio-vbmf-int-pair": ({"embedding": "vbmf", "feature.0": 0.4, "feature.2": (8, 24), "inner": 100,
                             "classifier": 0.6}, {"divisor": 8}),
}


@pytest.mark.reference
@pytest.mark.parametrize("case", list(RULE_CASES), ids=list(RULE_CASES))
def test_config_matches_the_reference(case: str, model, reference, snapshot) -> None:
    rules, kwargs = RULE_CASES[case]
    snap = snapshot(model)
    ours = _config_or_error(Decompose(model), rules, **kwargs)
    theirs = _config_or_error(reference(model), rules, **kwargs)
    assert ours == theirs
    assert ours != "no config" and len(ours) >= 2
    snap.check()


def _capped(config: Any, model: nn.Module) -> Any:
    """The reference's config with conv ranks capped at the layer's channels, as ours are.

    (Above them the reference's Tucker-2 cannot give the rank asked and its ``decompose_network``
    fails, see ``test_reference.py``; the saving check runs before the cap in both tools.)
    """
    if not isinstance(config, dict):
        return config
    capped = dict(config)
    for name, rank in config.items():
        layer = model.get_submodule(name)
        if isinstance(layer, nn.Conv2d):
            capped[name] = [min(rank[0], layer.out_channels), min(rank[1], layer.in_channels)]
    return capped


@pytest.mark.reference
def test_pairs_round_to_the_divisor_exactly_as_the_reference_does(model, reference) -> None:
    """Every (out, in) pair of a grid, on the 3x3 conv, the 1x1 conv and (as max(out, in)) on the Linears."""
    ranks = (1, 5, 7, 12, 17, 31, 45, 70, 130)
    compared = decomposed = capped = 0
    for divisor in (1, 3, 8, 16, 64):
        for out_rank in ranks:
            for in_rank in ranks:
                rules = {"feature": (out_rank, in_rank), "inner": (out_rank, in_rank),
                         "classifier.0": [in_rank, out_rank]}
                ours = _config_or_error(Decompose(model), rules, divisor=divisor)
                theirs = _config_or_error(reference(model), rules, divisor=divisor)
                assert ours == _capped(theirs, model), (rules, divisor)
                compared += 1
                decomposed += ours != "no config"
                capped += ours != theirs
    assert compared == 5 * len(ranks) ** 2
    assert decomposed > compared // 2  # most pairs save parameters somewhere
    assert 0 < capped < compared // 4  # the cap is the exception


@pytest.mark.reference
def test_a_pair_on_a_matrix_layer_is_its_larger_rank_as_in_the_reference(model, reference) -> None:
    rules = {"embedding.0": (3, 7), "embedding.1": (4, 9), "inner": (16, 40), "classifier.0": [70, 8]}
    ours = Decompose(model).from_dict(rules, divisor=8)
    theirs = reference(model).from_dict(rules, divisor=8)
    # max(3, 7) = 7 -> 8; max(4, 9) = 9 -> 16 (8 would be more than 10% below 9); 40 -> 40; 70 -> 72
    expected = {"embedding.0": 8, "embedding.1": 16, "inner": 40, "classifier.0": 72}
    assert ours.decompose_config == theirs.decompose_config == expected
    structure = ours.decompose_network(do_decompose_weight=False)
    assert structure.inner[0].weight.shape == (40, 1600) and structure.inner[1].weight.shape == (512, 40)
    assert structure.embedding[0][0].weight.shape == (16, 8) and structure.embedding[0][1].weight.shape == (32, 8)


# ------------------------------------------------------------------------- what we refuse, and what it does

SKIPPED = {"inner": 64}  # what the reference makes of {"feature.0": <value>, "inner": 64}: feature.0 dropped silently

REFUSED = {
    # id: (value, the reference's config, what our error says)
    "pair-with-zero": ((16, 0), SKIPPED, r"rank pair must be \(out rank, in rank\), two ints > 0.*\(16, 0\)"),
    "pair-of-floats": ((16.0, 8.0), SKIPPED, r"two ints > 0 \(not bools or floats\), got \(16\.0, 8\.0\)"),
    "one-rank-in-a-list": ([16], SKIPPED, r"rank pair must be.*got \[16\]"),
    "three-ranks": ((8, 8, 8), SKIPPED, r"rank pair must be.*got \(8, 8, 8\)"),
    "pair-with-vbmf": (("vbmf", 8), SKIPPED, r"rank pair must be.*\('vbmf', 8\)"),
    "rank-0": (0, SKIPPED, r"fixed rank must be an int > 0.*got 0 \(to leave layers alone, name them in excludes\)"),
    "negative-rank": (-16, SKIPPED, r"fixed rank must be an int > 0.*got -16"),
    "none": (None, SKIPPED, r"a value must be an int rank > 0, a float ratio in \(0, 1\), 'vbmf' or an \(out rank"),
    # a bool is an int to the reference: True is rank 1, rounded up to the divisor
    "pair-with-bool": ([True, 8], {"feature.0": (16, 16), "inner": 64}, r"got \[True, 8\]"),
    "bool": (True, {"feature.0": (16, 16), "inner": 64}, r"a value must be an int rank > 0.*got True"),
}


@pytest.mark.reference
@pytest.mark.parametrize("case", list(REFUSED), ids=list(REFUSED))
def test_values_the_reference_skips_or_misreads_are_refused_clearly(case: str, model, reference) -> None:
    value, their_config, message = REFUSED[case]
    rules = {"feature.0": value, "inner": 64}
    assert reference(model).from_dict(rules, divisor=16).decompose_config == their_config
    decomposer = Decompose(model)
    with pytest.raises(ValueError, match=r"^from_dict\['feature\.0'\]: .*" + message):
        decomposer.from_dict(rules, divisor=16)
    assert decomposer.decompose_config is None


@pytest.mark.reference
def test_excludes_says_what_a_rule_of_zero_does_in_the_reference(model, reference) -> None:
    """A first-matching rule with value 0 leaves a layer alone in the reference; we refuse 0 and point to
    excludes, which gives the same config."""
    theirs = reference(model).from_dict({"feature.0": 0, "feature": 16}, divisor=16).decompose_config
    ours = Decompose(model).from_dict({"feature": 16}, divisor=16, excludes=["feature.0"]).decompose_config
    assert ours == {"feature.2": [16, 16]} == {name: list(rank) for name, rank in theirs.items()}


@pytest.mark.reference
def test_a_float_of_one_or_more_is_refused_where_the_reference_reads_a_rank(model, reference) -> None:
    assert reference(model).from_dict({"inner": 64.0}, divisor=16).decompose_config == {"inner": 64}
    with pytest.raises(ValueError, match=r"from_dict\['inner'\]: ratio must be a float strictly between 0 and 1.*"
                                         r"64\.0 \(a rank is given as an int\)"):
        Decompose(model).from_dict({"inner": 64.0}, divisor=16)
    assert Decompose(model).from_dict({"inner": 64}, divisor=16).decompose_config == {"inner": 64}


@pytest.mark.reference
def test_bytes_patterns_are_refused_where_the_reference_fails(model, reference) -> None:
    with pytest.raises(TypeError):  # it searches str layer names with a bytes pattern
        reference(model).from_dict({re.compile(b"inner"): 64})
    with pytest.raises(ValueError, match=r"keys must be regular-expression strings, got re\.compile\(b'inner'\)"):
        Decompose(model).from_dict({re.compile(b"inner"): 64})


# ------------------------------------------------------------------------------ decompose_config given back

def _made_by(name: str, decomposer: Decompose) -> tuple[Decompose, int]:
    """A decomposer after the ``from_*`` call ``name``, and the divisor that call used."""
    calls = {
        "ratio-d16": (lambda: decomposer.from_ratio(0.5, divisor=16), 16),
        "ratio-d64": (lambda: decomposer.from_ratio(0.3), 64),
        "fixed-d8": (lambda: decomposer.from_fixed(24, divisor=8, excludes=["classifier.1"]), 8),
        "vbmf-d4": (lambda: decomposer.from_vbmf(divisor=4), 4),
        "pairs-d16": (lambda: decomposer.from_dict(RULE_CASES["documented-pairs-d16"][0], divisor=16), 16),
        "energy-d1": (lambda: decomposer.from_energy(0.8), 1),
    }
    call, divisor = calls[name]
    return call(), divisor


@pytest.mark.parametrize("made_by", ["ratio-d16", "ratio-d64", "fixed-d8", "vbmf-d4", "pairs-d16", "energy-d1"])
def test_decompose_config_given_back_gives_the_same_config_and_outputs(made_by: str, model) -> None:
    first, divisor = _made_by(made_by, Decompose(model))
    config = first.decompose_config
    assert config and any(isinstance(rank, list) for rank in config.values())  # convs are [out, in] pairs
    again = Decompose(model).from_dict(config, divisor=divisor)
    assert again.decompose_config == config
    assert list(again.decompose_config) == list(config)
    ids = mixed_ids(seed=1)
    with torch.no_grad():
        expected, actual = first.decompose_network()(ids), again.decompose_network()(ids)
    assert torch.equal(actual, expected)
    assert not torch.equal(actual, model(ids))  # something was decomposed


def test_conv_ranks_capped_at_the_channels_come_back_capped() -> None:
    """A 3-channel stem at ratio 0.3, divisor 1 gets [7, 3] (in-rank capped at its 3 channels); given back,
    the pair [7, 3] passes the same saving check and gives the same layer."""
    torch.manual_seed(4)
    stem = nn.Sequential(nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)).eval()
    first = Decompose(stem).from_ratio(0.3, divisor=1)
    assert first.decompose_config == {"0": [7, 3]}
    again = Decompose(stem).from_dict(first.decompose_config, divisor=1)
    assert again.decompose_config == {"0": [7, 3]}
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(again.decompose_network()(x), first.decompose_network()(x))


@pytest.mark.reference
def test_the_reference_reads_our_config_as_rules_the_same_way(model, reference) -> None:
    config = Decompose(model).from_ratio(0.5, divisor=16).decompose_config
    theirs = reference(model).from_dict(config, divisor=16).decompose_config
    assert {name: list(rank) if isinstance(rank, tuple) else rank for name, rank in theirs.items()} == config


@pytest.mark.reference
def test_keys_are_searched_so_a_name_inside_another_matches_it_in_both_tools(reference) -> None:
    """``from_dict`` keys are regexes searched in order, as in the reference: given back, the key "1"
    also matches layer "10" first. Anchored, escaped keys give the config back exactly."""
    torch.manual_seed(0)
    chain = nn.Sequential(*[nn.Linear(64, 64) for _ in range(12)])
    config = Decompose(chain).from_dict({"^1$": 8, "^10$": 16}, divisor=1).decompose_config
    assert config == {"1": 8, "10": 16}
    searched = {"1": 8, "10": 8, "11": 8}
    assert Decompose(chain).from_dict(config, divisor=1).decompose_config == searched
    assert reference(chain).from_dict(config, divisor=1).decompose_config == searched
    exact = {f"^{re.escape(name)}$": rank for name, rank in config.items()}
    assert Decompose(chain).from_dict(exact, divisor=1).decompose_config == config


# ------------------------------------------------------------------------ structures for N-process training

STRUCTURE_CASES = {
    "documented-pairs-d16": RULE_CASES["documented-pairs-d16"],
    "pairs-on-matrices-d8": RULE_CASES["pairs-on-matrices-d8"],
    "pairs-everywhere-d1": ({"embedding": (7, 3), "feature.0": (37, 5), "feature.2": (3, 50), "inner": (10, 90),
                             "classifier": [33, 12]}, {"divisor": 1}),
}


@pytest.mark.reference
@pytest.mark.parametrize("case", list(STRUCTURE_CASES), ids=list(STRUCTURE_CASES))
def test_structure_only_with_pairs_has_the_reference_parameters(case: str, model, reference, ref_count) -> None:
    rules, kwargs = STRUCTURE_CASES[case]
    ours = Decompose(model).from_dict(rules, **kwargs).decompose_network(do_decompose_weight=False)
    theirs = reference(model).from_dict(rules, **kwargs).decompose_network(do_decompose_weight=False)
    assert count_parameters(ours) == ref_count(theirs) == ref_count(ours)
    assert count_parameters(ours) < count_parameters(model)
    shapes = {name: tuple(tensor.shape) for name, tensor in ours.state_dict().items()}
    assert shapes == {name: tuple(tensor.shape) for name, tensor in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict(), strict=True)


# ---------------------------------------------------------------------------------------------- ONNX facade

ONNX_CASES = {
    # id: (model factory, rules, expected config at divisor 8)
    "conv-3x3": (lambda om, rng: om.conv(rng, channels=(32, 48)), {"conv": (12, 20)}, {"conv": [16, 24]}),
    "conv-1x1": (lambda om, rng: om.conv(rng, channels=(48, 64), kernel=1), {"conv": [20, 12]}, {"conv": [24, 16]}),
    # fc0 [64, 48]: max(12, 20) = 20 -> 24; fc1 [40, 64]: max(4, 9) = 9 -> 8, 11% below 9 -> 16
    "gemm": (lambda om, rng: om.mlp(rng, dims=(48, 64, 40)), {"fc0": (12, 20), re.compile("fc1"): [4, 9]},
             {"fc0": 24, "fc1": 16}),
    "gather": (lambda om, rng: om.embedding(rng), {"^emb$": (10, 3)}, {"emb": 16}),
}


@pytest.mark.parametrize("case", list(ONNX_CASES), ids=list(ONNX_CASES))
def test_onnx_facade_takes_pairs_and_gives_its_config_back(case: str) -> None:
    pytest.importorskip("onnxruntime")
    from tests import onnx_models as om

    factory, rules, expected = ONNX_CASES[case]
    rng = np.random.default_rng(3)
    original = factory(om, rng)
    first = Decompose(original).from_dict(rules, divisor=8)
    assert first.decompose_config == expected
    again = Decompose(original).from_dict(first.decompose_config, divisor=8)
    assert again.decompose_config == expected
    inputs = original.graph.input[0]
    shape = [dim.dim_value or 2 for dim in inputs.type.tensor_type.shape.dim]
    feeds = {inputs.name: (rng.integers(0, 100, shape) if inputs.type.tensor_type.elem_type == 7
                           else rng.standard_normal(shape).astype(np.float32))}
    outputs = om.run(first.decompose_network(), feeds)
    assert all(np.array_equal(a, b) for a, b in zip(outputs, om.run(again.decompose_network(), feeds), strict=True))
    assert not np.allclose(outputs[0], om.run(original, feeds)[0], rtol=1e-6, atol=0)  # it was decomposed


# -------------------------------------------------------------------------------------- command line --dict

@pytest.mark.reference
def test_cli_dict_takes_out_in_lists_and_its_saved_config(tmp_path, capsys, model, reference) -> None:
    rules = {"feature.0": [32, 16], "feature.2": [16, 28], "inner": [100, 7]}
    (tmp_path / "rules.json").write_text(json.dumps(rules))
    out = tmp_path / "out"
    assert main(["decompose", "tests.models:mixed", "--dict", str(tmp_path / "rules.json"), "--divisor", "16",
                 "-o", str(out)]) == 0
    config = json.loads((out / "decompose_config.json").read_text())
    theirs = reference(model).from_dict({name: tuple(rank) for name, rank in rules.items()}, divisor=16)
    assert config == {"feature.0": [32, 16], "feature.2": [16, 32], "inner": 96}
    assert config == {name: list(rank) if isinstance(rank, tuple) else rank
                      for name, rank in theirs.decompose_config.items()}
    # the saved decompose_config is itself a --dict file that gives the same model
    again = tmp_path / "again"
    assert main(["decompose", "tests.models:mixed", "--dict", str(out / "decompose_config.json"), "--divisor", "16",
                 "-o", str(again)]) == 0
    assert json.loads((again / "decompose_config.json").read_text()) == config
    first, second = load_file(out / "state_dict.safetensors"), load_file(again / "state_dict.safetensors")
    assert list(first) == list(second) and all(torch.equal(first[key], second[key]) for key in first)
    capsys.readouterr()


@pytest.mark.parametrize(("rules", "message"), [
    ({"feature.0": [16]}, r"from_dict['feature.0']: a rank pair must be (out rank, in rank)"),
    ({"feature.0": [16, 8.5]}, "got [16, 8.5]"),
    ({"feature.0": [16, 8], "inner": None}, "from_dict['inner']: a value must be"),
    ({"feature.0": "svd"}, "the only method name accepted is 'vbmf'"),
])
def test_cli_dict_bad_values_are_one_line_and_exit_2(rules, message, tmp_path, capsys) -> None:
    (tmp_path / "rules.json").write_text(json.dumps(rules))
    out = tmp_path / "out"
    assert main(["decompose", "tests.models:mixed", "--dict", str(tmp_path / "rules.json"), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_onnx_cli_dict_takes_out_in_lists(tmp_path, capsys) -> None:
    pytest.importorskip("onnxruntime")
    import onnx

    from tests import onnx_models as om

    onnx.save(om.conv(np.random.default_rng(3), channels=(32, 48)), tmp_path / "conv.onnx")
    (tmp_path / "rules.json").write_text(json.dumps({"conv": [12, 20]}))
    report = tmp_path / "report.json"
    assert main(["decompose", str(tmp_path / "conv.onnx"), "-o", str(tmp_path / "small.onnx"), "--dict",
                 str(tmp_path / "rules.json"), "--divisor", "8", "--tolerance", "10", "--report", str(report)]) == 0
    small = onnx.load(tmp_path / "small.onnx")
    shapes = {init.name: list(init.dims) for init in small.graph.initializer}
    assert shapes["conv.0.weight"] == [24, 32, 1, 1] and shapes["conv.1.weight"] == [16, 24, 3, 3]
    assert shapes["conv.2.weight"] == [48, 16, 1, 1]
    capsys.readouterr()
