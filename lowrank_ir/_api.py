"""The ``Decompose`` facade: the reference tool's call style over lower -> plan -> rewrite -> build.

>>> decomposer = Decompose(model).from_ratio(0.5)          # doctest: +SKIP
>>> small = decomposer.decompose_network()                  # doctest: +SKIP
>>> print(decomposer.report.table())                        # doctest: +SKIP

Every step is a plain function (``frontend.lower``, ``engine.plan``, ``engine.rewrite``,
``backend.build``); this class only keeps the chosen config between calls. The user's model is never
changed: ``decompose_network`` returns a new one.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lowrank_ir._engine import Plan, Progress, plan, rewrite
from lowrank_ir._files import write_json
from lowrank_ir._ir import Graph
from lowrank_ir._policy import Policy, RankSpec, validate_config
from lowrank_ir._registry import backend_for, frontend_for
from lowrank_ir._report import Report, build_report

__all__ = ["Decompose", "count_parameters"]

logger = logging.getLogger(__name__)


def count_parameters(model: Any) -> int:
    """Number of parameters of a PyTorch or MindSpore model, counted the same way for both.

    Counted: every trainable weight tensor (``nn.Parameter`` in PyTorch, ``Parameter`` in MindSpore),
    shared ones once. Not counted: running statistics such as BatchNorm's moving mean and variance
    (buffers in PyTorch, non-trainable parameters in MindSpore).
    """
    return int(frontend_for(model).count_parameters(model))


def _check_config_file(config_file: object) -> Path | None:
    if config_file is None:
        return None
    if not isinstance(config_file, (str, os.PathLike)) or not os.fspath(config_file).endswith(".json"):
        raise ValueError(f"config_file must be a path ending in '.json', got {config_file!r}")
    path = Path(config_file)
    if not path.parent.is_dir():
        raise ValueError(f"config_file {str(path)!r} is in folder {str(path.parent)!r}, which does not exist")
    return path


def _keep_reasons(chosen: Plan, earlier: Plan | None) -> Plan:
    """``chosen`` with the reasons ``earlier`` gave for the layers it left alone (instead of "not in config")."""
    if earlier is None:
        return chosen
    for name, entry in chosen.entries.items():
        before = earlier.entries.get(name)
        if not entry.decomposed and before is not None and not before.decomposed:
            chosen.entries[name] = before
    return chosen


class Decompose:
    """Low-rank decomposition of a PyTorch ``nn.Module`` or MindSpore ``nn.Cell``.

    Args:
        model: the trained model. It is read, never changed.
        config_file: a ``.json`` path. Every ``from_*`` call writes the chosen ``decompose_config``
            there (atomically, not group/other-writable); ``from_file`` reads it back.

    Choose ranks with one of ``from_ratio``, ``from_fixed``, ``from_dict``, ``from_vbmf``,
    ``from_file`` (each returns ``self``), then call :meth:`decompose_network`.
    """

    def __init__(self, model: Any, config_file: str | os.PathLike[str] | None = None) -> None:
        self._frontend = frontend_for(model)  # TypeError for models of unsupported frameworks
        self.model = model
        self.config_file = _check_config_file(config_file)
        self.decompose_config: dict[str, int | list[int]] | None = None
        self.report: Report | None = None
        self.plan: Plan | None = None

    # ------------------------------------------------------------------------------------ choosing ranks

    def from_ratio(self, channel_ratio: float, excludes: Sequence[str] | None = None,
                   divisor: int = 64) -> Decompose:
        """Keep about ``channel_ratio`` of each layer's parameters (a float in (0, 1)).

        ``excludes``: exact layer names to leave alone. ``divisor``: ranks are rounded to multiples
        of it (1 disables rounding).
        """
        return self._choose(Policy.ratio(channel_ratio, excludes, divisor))

    def from_fixed(self, channel_fixed: int, excludes: Sequence[str] | None = None,
                   divisor: int = 64) -> Decompose:
        """The same rank ``channel_fixed`` (an int > 0, rounded by ``divisor``) for every layer."""
        return self._choose(Policy.fixed(channel_fixed, excludes, divisor))

    def from_dict(self, channel_dict: Mapping[str, RankSpec], excludes: Sequence[str] | None = None,
                  divisor: int = 64) -> Decompose:
        """Per-layer rules ``{regex: int | float | "vbmf"}``; the first key that ``re.search``-matches wins."""
        return self._choose(Policy.from_dict(channel_dict, excludes, divisor))

    def from_vbmf(self, excludes: Sequence[str] | None = None, divisor: int = 64) -> Decompose:
        """Ranks estimated from each weight by EVBMF (best on pretrained weights)."""
        return self._choose(Policy.vbmf(excludes, divisor))

    def from_file(self) -> Decompose:
        """Restore the ``decompose_config`` saved in ``config_file`` by an earlier ``from_*`` call."""
        if self.config_file is None:
            raise ValueError("from_file needs Decompose(model, config_file='....json') naming a saved config")
        if not self.config_file.is_file():
            raise ValueError(f"config_file {str(self.config_file)!r} does not exist; call another from_* "
                             f"method with this config_file first to save one")
        try:
            config = json.loads(self.config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"config_file {str(self.config_file)!r} is not valid JSON: {err}") from err
        config = validate_config(config, f"config_file {str(self.config_file)!r}")
        graph = self._lower()
        self.plan = plan(graph, Policy.config(config))
        self.decompose_config = config
        self.report = build_report(graph, self.plan)
        return self

    def _lower(self) -> Graph:
        return self._frontend.lower(self.model)

    def _choose(self, policy: Policy) -> Decompose:
        graph = self._lower()
        chosen = plan(graph, policy)
        config = chosen.decompose_config()
        if not config:
            kept = {entry.name: entry.reason for entry in chosen.kept()}
            detail = "; ".join(f"{name}: {reason}" for name, reason in list(kept.items())[:5])
            raise ValueError(
                f"no layer of this {type(self.model).__name__} would be decomposed under {policy.kind!r} "
                f"({len(kept)} candidate layers{': ' + detail if detail else ''})")
        if self.config_file is not None:
            write_json(self.config_file, config)
            logger.info("wrote decompose_config to %s", self.config_file)
        self.plan, self.decompose_config = chosen, config
        self.report = build_report(graph, chosen)
        logger.info("%d layers to decompose", len(config))
        return self

    # ------------------------------------------------------------------------------------ decomposing

    def decompose_network(self, do_decompose_weight: bool = True, datasets: Any = None,
                          max_iter: int = -1, *, sequential: bool = False,
                          progress: Progress | None = None) -> Any:
        """A new model with every layer of ``decompose_config`` replaced by its low-rank factors.

        Args:
            do_decompose_weight: True fills the factors from the trained weights. False builds the
                decomposed *structure* only (factors at their initialisation): load a state dict or
                checkpoint saved from a weight-decomposed model into it (the multi-process recipe).
            datasets: optional calibration data (an iterable of model inputs: dict -> keyword
                arguments, list/tuple -> positional arguments, a tensor -> the one argument). With it,
                each layer minimises its *output* error on this data instead of its weight error, and
                the error on the mean input is folded into the layer's bias.
            max_iter: how many elements of ``datasets`` to use; -1 for all.
            sequential: with ``datasets``, decompose layers in execution order, each from statistics
                taken on the model whose earlier layers are already decomposed, so errors do not
                compound unseen. Layers fed the same tensor (query/key/value) share one calibration
                pass, and each pass stops as soon as the layers it serves have seen their input.
            progress: optional ``progress(done, total, layer name)`` callback, called as layers finish.
        """
        if self.decompose_config is None:
            raise ValueError("no decompose_config yet: call from_ratio, from_fixed, from_dict, from_vbmf "
                             "or from_file before decompose_network")
        if not isinstance(do_decompose_weight, bool):
            raise TypeError(f"do_decompose_weight must be a bool, got {do_decompose_weight!r}")
        if isinstance(max_iter, bool) or not isinstance(max_iter, int):
            raise TypeError(f"max_iter must be an int (-1 for the whole dataset), got {max_iter!r}")
        if not (max_iter == -1 or max_iter > 0):
            raise ValueError(f"max_iter must be -1 (the whole dataset) or an int > 0, got {max_iter!r}")
        if not isinstance(sequential, bool):
            raise TypeError(f"sequential must be a bool, got {sequential!r}")
        if sequential and datasets is None:
            raise ValueError("sequential=True needs datasets: it refines each layer on calibration data")
        graph = self._lower()
        chosen = _keep_reasons(plan(graph, Policy.config(self.decompose_config)), self.plan)
        stats = None
        names = [entry.name for entry in chosen.decomposed()]
        if datasets is not None and do_decompose_weight:
            stats = self._frontend.collect_stats(self.model, graph, datasets, max_iter=max_iter, names=names)
        result = rewrite(graph, chosen, stats=stats, weights=do_decompose_weight, progress=progress)
        backend = backend_for(self.model)
        model = backend.build(result.graph, like=self.model, weights=do_decompose_weight)
        errors = result.errors
        if sequential and do_decompose_weight:
            errors = self._refine_sequentially(model, graph, chosen, datasets, max_iter, names, progress)
        self.plan = chosen
        self.report = build_report(graph, chosen, errors)
        return model

    def _refine_sequentially(self, model: Any, graph: Graph, chosen: Plan, datasets: Any, max_iter: int,
                             names: list[str], progress: Progress | None) -> dict[str, tuple[float, str]]:
        """Redo each group of layers, in execution order, from statistics of ``model`` as refined so far."""
        backend = backend_for(self.model)
        groups = self._frontend.execution_groups(model, graph, datasets, names)
        errors: dict[str, tuple[float, str]] = {}
        done = 0
        for group in groups:
            stats = self._frontend.collect_stats(model, graph, datasets, max_iter=max_iter, names=group,
                                                 stop_early=True)
            part = Plan({name: chosen.entries[name] for name in group})
            result = rewrite(graph, part, stats=stats, workers=1)
            backend.load_layers(model, result.graph, group)
            errors.update(result.errors)
            done += len(group)
            if progress is not None:
                progress(done, len(names), group[-1])
        return errors
