"""Side by side with the reference tool's MindSpore path (msModelSlim's ``mindspore.low_rank_decompose``).

Every expectation is what the reference computes now, on the same Cell. The reference changes the
Cell it is given (it replaces layers in place), so it always gets its own copy; ours is checked to
leave its input alone.
"""

from __future__ import annotations

import os

os.environ.setdefault("GLOG_v", "3")  # MindSpore's C++ logs: errors only

import logging  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

ms = pytest.importorskip("mindspore")
reference = pytest.importorskip("msmodelslim.mindspore.low_rank_decompose")

from mindspore import nn  # noqa: E402
from ms_models import CellSnapshot, resnet50  # noqa: E402

from backends import mindspore as ms_backend  # noqa: E402
from lowrank_ir import Decompose, count_parameters  # noqa: E402

RefDecompose = reference.Decompose

pytestmark = [pytest.mark.reference, pytest.mark.mindspore]

#: Weight decompositions run on a narrow ResNet-50 (same layout) to keep the reference's Tucker quick.
SMALL_WIDTH = 8


@pytest.fixture(autouse=True, scope="module")
def _quiet_reference():
    from msmodelslim import logger

    level = logger.level
    logger.setLevel(logging.WARNING)
    yield
    logger.setLevel(level)


def _shapes(cell: nn.Cell) -> list[tuple[str, tuple[int, ...]]]:
    return [(param.name, tuple(param.shape)) for param in cell.get_parameters()]


def test_resnet50_config_and_structure_match_the_reference(to_lists) -> None:
    ours_cell, their_cell = resnet50(), resnet50()
    snap = CellSnapshot(ours_cell)
    ours = Decompose(ours_cell).from_ratio(0.5)
    theirs = RefDecompose(their_cell).from_ratio(0.5)
    assert ours.decompose_config == to_lists(theirs.decompose_config)
    assert len(ours.decompose_config) == 39 and ours.decompose_config["fc"] == 320
    structure = ours.decompose_network(do_decompose_weight=False)
    their_structure = theirs.decompose_network(do_decompose_weight=False)
    assert _shapes(structure) == _shapes(their_structure)  # names, order and shapes
    assert count_parameters(structure) == count_parameters(their_structure)
    snap.check()  # ours left its input alone ...
    assert their_structure is their_cell  # ... the reference replaced layers in the Cell it was given
    assert isinstance(their_cell.fc, nn.SequentialCell)


def test_weight_checkpoints_move_both_ways(tmp_path) -> None:
    ours = Decompose(resnet50(seed=1, width=SMALL_WIDTH)).from_ratio(0.5, divisor=8)
    our_model = ours.decompose_network()
    theirs = RefDecompose(resnet50(seed=1, width=SMALL_WIDTH)).from_ratio(0.5, divisor=8)
    their_model = theirs.decompose_network()
    assert ours.decompose_config
    x = ms.Tensor(np.random.default_rng(3).standard_normal((2, 3, 64, 64)).astype(np.float32))
    our_output, their_output = our_model(x).asnumpy(), their_model(x).asnumpy()
    assert np.isfinite(our_output).all()

    ms.save_checkpoint(our_model, str(tmp_path / "ours.ckpt"))
    ms.save_checkpoint(their_model, str(tmp_path / "theirs.ckpt"))
    # our checkpoint in the reference's structure computes exactly what our model computes
    their_structure = RefDecompose(resnet50(seed=1, width=SMALL_WIDTH)).from_ratio(0.5, divisor=8) \
        .decompose_network(do_decompose_weight=False)
    ms_backend.load_checkpoint(their_structure, tmp_path / "ours.ckpt")
    their_structure.set_train(False)
    assert np.array_equal(their_structure(x).asnumpy(), our_output)
    # and the reference's checkpoint in our structure computes what the reference's model computes
    our_structure = Decompose(resnet50(seed=1, width=SMALL_WIDTH)).from_ratio(0.5, divisor=8) \
        .decompose_network(do_decompose_weight=False)
    ms_backend.load_checkpoint(our_structure, tmp_path / "theirs.ckpt")
    assert np.array_equal(our_structure(x).asnumpy(), their_output)


def test_embedding_layout_matches_the_reference(to_lists) -> None:
    class Tokens(nn.Cell):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(96, 64)
            self.fc = nn.Dense(64, 64, activation="relu")

        def construct(self, ids: ms.Tensor) -> ms.Tensor:
            return self.fc(self.emb(ids))

    ms.set_seed(4)
    ours = Decompose(Tokens()).from_ratio(0.5, divisor=8)
    theirs = RefDecompose(Tokens()).from_ratio(0.5, divisor=8)
    assert ours.decompose_config == to_lists(theirs.decompose_config) == {"emb": 24, "fc": 16}
    assert _shapes(ours.decompose_network()) == _shapes(theirs.decompose_network())
