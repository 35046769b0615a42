"""Shared test set-up: every test starts from seeded RNGs; helpers for configs, snapshots and errors.

This file imports no framework: torch is seeded only when a test module has imported it, so the
numpy-only core tests stay framework-free.

In CI (``CI=true``) a skip that ``tests/skips.py`` does not list fails the run, and so does a listed
test that does not skip: CI installs every dependency, so nothing may be skipped silently.
"""

from __future__ import annotations

import json
import logging
import random
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.skips import EXPECTED_SKIPS, IN_CI

SEED = 0


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


def _fail_unlisted_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    """In CI, turn a skip ``tests/skips.py`` does not list, or a listed test that ran, into a failure."""
    expected = EXPECTED_SKIPS.get(report.nodeid)
    if report.skipped:
        reason = _skip_reason(report)
        if expected is None or expected not in reason:
            report.outcome = "failed"
            report.longrepr = (f"skipped in CI ({reason!r}), and tests/skips.py does not list this skip: install "
                               f"what is missing, or list the skip with its reason")
    elif report.passed and expected is not None and getattr(report, "when", "call") == "call":
        report.outcome = "failed"
        report.longrepr = f"tests/skips.py lists this test as skipping ({expected!r}), but it ran: update the list"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    outcome = yield
    if IN_CI:
        _fail_unlisted_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Any:
    outcome = yield
    if IN_CI:  # a module-level importorskip: the whole file would silently not run
        _fail_unlisted_skip(outcome.get_result())


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    """Seed Python's, numpy's and (when loaded) torch's global RNGs before every test."""
    random.seed(SEED)
    np.random.seed(SEED)  # noqa: NPY002 - the legacy global RNG, for code that still draws from it
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(SEED)


@pytest.fixture(scope="module")
def one_torch_thread() -> Any:
    """One torch intra-op thread for a module (``pytest.mark.usefixtures``): the machine's cores are
    shared, and results do not depend on it."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def quiet_reference() -> Any:
    """The reference tool's logger at WARNING for a module (it logs every Tucker iteration at INFO)."""
    logger = pytest.importorskip("msmodelslim").logger
    level = logger.level
    logger.setLevel(logging.WARNING)
    yield logger
    logger.setLevel(level)


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[..., Path]:
    """``write_config(config, name="config.json")``: a JSON ``decompose_config`` file in ``tmp_path``."""

    def write(config: Any, name: str = "config.json") -> Path:
        path = tmp_path / name
        path.write_text(json.dumps(config))
        return path

    return write


def relative_error(approx: Any, reference: Any) -> float:
    """``||approx - reference|| / ||reference||`` of two tensors, computed in float64."""
    approx, reference = approx.detach().double(), reference.detach().double()
    return float((approx - reference).norm() / reference.norm())


@pytest.fixture
def rel_err() -> Callable[[Any, Any], float]:
    return relative_error


class ModelSnapshot:
    """Everything about an ``nn.Module`` a decomposition must not change; :meth:`check` asserts it."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.structure = repr(model)
        self.modules = [(name, type(module), id(module)) for name, module in model.named_modules()]
        self.training = {name: module.training for name, module in model.named_modules()}
        self.params = {name: (id(param), param.requires_grad, param.dtype)
                       for name, param in model.named_parameters()}
        self.state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
        self.hooks = self._hooks(model)

    @staticmethod
    def _hooks(model: Any) -> dict[str, tuple[int, int, int]]:
        return {name: (len(module._forward_hooks), len(module._forward_pre_hooks), len(module._backward_hooks))
                for name, module in model.named_modules()}

    def check(self) -> None:
        model = self.model
        assert repr(model) == self.structure
        assert [(name, type(module), id(module)) for name, module in model.named_modules()] == self.modules
        assert {name: module.training for name, module in model.named_modules()} == self.training
        assert {name: (id(param), param.requires_grad, param.dtype)
                for name, param in model.named_parameters()} == self.params
        state = model.state_dict()
        assert list(state) == list(self.state)
        for name, tensor in self.state.items():
            assert state[name].dtype == tensor.dtype, name
            assert state[name].shape == tensor.shape, name
            same = state[name].eq(tensor) | (state[name].isnan() & tensor.isnan())
            assert bool(same.all()), f"{name} changed"
        assert self._hooks(model) == self.hooks


@pytest.fixture
def snapshot() -> Callable[[Any], ModelSnapshot]:
    """``snap = snapshot(model)`` ... ``snap.check()``: the model is exactly as it was."""
    return ModelSnapshot


@pytest.fixture
def restore_umask() -> Any:
    """Restore the process umask after a test that changes it."""
    import os

    saved = os.umask(0o022)
    os.umask(saved)
    yield saved
    os.umask(saved)


def as_lists(config: Mapping[str, Any]) -> dict[str, Any]:
    """A ``decompose_config`` with tuples turned into lists (the reference tool keeps conv ranks as tuples)."""
    return {name: list(rank) if isinstance(rank, tuple) else rank for name, rank in config.items()}


@pytest.fixture
def to_lists() -> Callable[[Mapping[str, Any]], dict[str, Any]]:
    return as_lists
