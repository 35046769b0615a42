"""The calibration accumulator: running sums of layer inputs, turned into ``LayerStats`` at the end.

Every frontend collects layer input statistics the same way: a hook (a PyTorch forward pre-hook, a
MindSpore one, an onnxruntime probe output) sees a batch of a layer's input as rows ``X`` (one row per
position, features last) and adds its products to running sums; after the last element the sums are
divided by the number of rows. The hooks and the products are the framework's (a PyTorch model may
run on a GPU); the sums, the counts and the division are here, once.

Sum keys (see :func:`lowrank_ir._engine.stats_from_sums`): ``moment`` ``Σ X̃ᵀX̃``, ``mean`` ``Σ X̃``,
and for the sequential mode's error compensation ``cross`` ``Σ XᵀX̃``, ``source`` ``ΣXᵀX``,
``source_mean`` ``Σ X`` (X the layer's input in the original model, X̃ in the partly decomposed one);
apart, the im2col patch sums ``Σ p pᵀ`` of k x k convs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from lowrank_ir._engine import LayerStats, stats_from_sums

__all__ = ["MomentSums"]

logger = logging.getLogger(__name__)


class MomentSums:
    """Running sums of the inputs of the layers ``names``, in whatever array type the frontend computes.

    Sums are added with ``+``, so a frontend may keep them as framework tensors (on their device) and
    convert them once, in :meth:`stats`. Summands are expected in float64 (the precision of the result).
    """

    def __init__(self, names: Iterable[str]) -> None:
        self.names = list(names)
        self.counts: dict[str, int] = dict.fromkeys(self.names, 0)
        self.sums: dict[str, dict[str, Any]] = {name: {} for name in self.names}
        self.patches: dict[str, tuple[Any, int]] = {}

    def add(self, name: str, rows: int, **sums: Any) -> None:
        """Add one batch of layer ``name``'s input: ``rows`` rows, and their products by key (``moment=...``)."""
        held = self.sums[name]
        for key, value in sums.items():
            held[key] = value if key not in held else held[key] + value
        self.counts[name] += rows

    def add_patches(self, name: str, total: Any, count: int) -> None:
        """Add ``total`` = Σ p pᵀ over ``count`` im2col patches of conv ``name``."""
        if count:
            before = self.patches.get(name)
            self.patches[name] = (total, count) if before is None else (before[0] + total, before[1] + count)

    def stats(self, as_array: Callable[[Any], np.ndarray] = np.asarray,
              warn_unseen: bool = True) -> dict[str, LayerStats]:
        """Per layer that saw rows, its :class:`LayerStats` (the sums divided by the rows, in float64).

        ``as_array`` turns a held sum into a numpy array (e.g. a tensor's ``.cpu().numpy()``). A layer
        that saw no rows is left out (with a warning when ``warn_unseen``: it is decomposed data-free).
        ``ValueError`` naming the layer when a NaN or Inf reached its sums.
        """
        stats = {}
        for name in self.names:
            count = self.counts[name]
            if count == 0:
                if warn_unseen:
                    logger.warning("layer %r saw no data during calibration; it is decomposed data-free", name)
                continue
            sums = {key: as_array(value) for key, value in self.sums[name].items()}
            patch = self.patches.get(name)
            stats[name] = stats_from_sums(name, count, sums,
                                          None if patch is None else (as_array(patch[0]), patch[1]))
        return stats
