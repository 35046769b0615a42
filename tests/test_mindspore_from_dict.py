"""``from_dict`` on MindSpore Cells: the reference's value forms, rounding and structures, side by side.

``tests/ms_models.py``'s ``Mixed`` has every cell kind the reference decomposes (Embedding, Dense, a 3x3
and a 1x1 Conv2d). The reference's ``decompose_network`` replaces layers in the Cell it is given, so
it always gets its own copy (same seed, same weights).
"""

from __future__ import annotations

import os

os.environ.setdefault("GLOG_v", "3")  # MindSpore's C++ logs: errors only

import re  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

ms = pytest.importorskip("mindspore")
reference = pytest.importorskip("msmodelslim.mindspore.low_rank_decompose")

from ms_models import CellSnapshot, mixed  # noqa: E402

from lowrank_ir import Decompose, count_parameters  # noqa: E402

RefDecompose = reference.Decompose
ref_count = pytest.importorskip("ascend_utils.common.utils").count_parameters

pytestmark = [pytest.mark.reference, pytest.mark.mindspore, pytest.mark.usefixtures("quiet_reference")]


def _lists(config: dict[str, Any]) -> dict[str, Any]:
    return {name: list(rank) if isinstance(rank, tuple) else rank for name, rank in config.items()}


def _ids(seed: int = 1) -> ms.Tensor:
    return ms.Tensor(np.random.default_rng(seed).integers(0, 16, (2, 10, 10)).astype(np.int32))


RULE_CASES = {
    # id: (rules, divisor)
    "documented-pairs-d16": ({"feature.0": (32, 16), "feature.2": (16, 28)}, 16),
    "pairs-round-each-rank-d16": ({"feature.0": (12, 12), "feature.2": (31, 13), "inner": 11}, 16),
    "pairs-on-dense-and-embedding-d8": ({"embedding.0": (3, 7), "embedding.1": (4, 9), "inner": (16, 40),
                                         "classifier.0": [70, 8], "feature": (20, 9)}, 8),
    "compiled-keys-first-match-d4": ({re.compile("FEAT", re.IGNORECASE): (20, 40), "feature.0": (64, 64),
                                      "classifier": 0.3, r"^emb.*\.1$": "vbmf"}, 4),
    "pairs-d1": ({"feature.0": (37, 5), "feature.2": (3, 50), "classifier": [33, 12]}, 1),
}


@pytest.mark.parametrize("case", list(RULE_CASES), ids=list(RULE_CASES))
def test_config_and_structure_match_the_reference(case: str) -> None:
    rules, divisor = RULE_CASES[case]
    cell = mixed()
    snap = CellSnapshot(cell)
    ours = Decompose(cell).from_dict(rules, divisor=divisor)
    theirs = RefDecompose(mixed()).from_dict(rules, divisor=divisor)
    assert ours.decompose_config == _lists(theirs.decompose_config)
    assert len(ours.decompose_config) >= 2
    structure = ours.decompose_network(do_decompose_weight=False)
    their_structure = theirs.decompose_network(do_decompose_weight=False)
    assert count_parameters(structure) == count_parameters(their_structure) < count_parameters(cell)
    assert ref_count(structure) == ref_count(their_structure)  # the reference's own count (no BatchNorm here)
    assert [(p.name, tuple(p.shape)) for p in structure.get_parameters()] == \
        [(p.name, tuple(p.shape)) for p in their_structure.get_parameters()]
    snap.check()


def test_pairs_round_to_the_divisor_exactly_as_the_reference_does() -> None:
    """A grid of (out, in) pairs on both convs and (as max(out, in)) on two Dense layers; ranks within
    the channels, where both tools build the same layers (above them see ``test_reference.py``)."""
    cell, their_cell = mixed(), mixed()
    compared = 0
    for divisor in (1, 3, 8, 16):
        for out_rank in (1, 7, 12, 31, 45):
            for in_rank in (2, 5, 17, 33, 60):
                rules = {"feature": (out_rank, in_rank), "inner": (out_rank, in_rank), "classifier.0": [in_rank, 9]}
                ours = Decompose(cell).from_dict(rules, divisor=divisor).decompose_config
                theirs = RefDecompose(their_cell).from_dict(rules, divisor=divisor).decompose_config
                assert ours == _lists(theirs), (rules, divisor)
                assert "feature.0" in ours
                compared += 1
    assert compared == 100


@pytest.mark.parametrize("made_by", ["ratio-d16", "fixed-d8", "pairs-d16", "vbmf-d4"])
def test_decompose_config_given_back_gives_the_same_config_and_outputs(made_by: str) -> None:
    cell = mixed()
    calls = {
        "ratio-d16": (lambda d: d.from_ratio(0.5, divisor=16), 16),
        "fixed-d8": (lambda d: d.from_fixed(24, divisor=8), 8),
        "pairs-d16": (lambda d: d.from_dict(RULE_CASES["documented-pairs-d16"][0], divisor=16), 16),
        "vbmf-d4": (lambda d: d.from_vbmf(divisor=4), 4),
    }
    call, divisor = calls[made_by]
    first = call(Decompose(cell))
    config = first.decompose_config
    assert any(isinstance(rank, list) for rank in config.values())
    again = Decompose(cell).from_dict(config, divisor=divisor)
    assert again.decompose_config == config
    assert _lists(RefDecompose(mixed()).from_dict(config, divisor=divisor).decompose_config) == config
    x = _ids()
    expected = first.decompose_network()(x).asnumpy()
    assert np.array_equal(again.decompose_network()(x).asnumpy(), expected)
    assert not np.allclose(expected, cell(x).asnumpy(), rtol=1e-6, atol=0)  # something was decomposed


def test_refused_values_name_the_key_where_the_reference_drops_the_layer() -> None:
    rules = {"feature.0": (16, 0), "inner": 64}
    assert RefDecompose(mixed()).from_dict(rules, divisor=16).decompose_config == {"inner": 64}
    with pytest.raises(ValueError, match=r"from_dict\['feature\.0'\]: a rank pair must be \(out rank, in rank\)"):
        Decompose(mixed()).from_dict(rules, divisor=16)
