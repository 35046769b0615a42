"""Which tests may skip, and when.

Outside CI a test whose optional dependency is missing skips (:func:`require`, :func:`missing`). In CI
(``CI=true``) every dependency is installed, so a missing one fails the test, and ``conftest.py`` fails
every skip that is not listed in :data:`EXPECTED_SKIPS` -- and every listed test that does not skip --
so the list is exact: ``pytest -rs`` shows the counts by reason.

The expected skips are models of the onnx package's backend test data that onnxruntime cannot load
(:data:`ORT_CANNOT_RUN`): their round trip is still checked byte for byte, their outputs cannot be; and
the HTML report's browser test where no Chromium is installed (an operating-system package, not a pip
one: the README's set-up installs it where ``apt-get`` can).
"""

from __future__ import annotations

import importlib
import locale
import os
import shutil
from types import ModuleType
from typing import NoReturn

import pytest

#: True when the environment says it is CI (``CI=true``, as GitHub Actions, GitLab CI and others set it).
IN_CI = os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def missing(what: str) -> NoReturn:
    """Skip the test because ``what`` is not installed, or, in CI, fail it: CI installs every dependency."""
    if IN_CI:
        pytest.fail(f"{what} is not installed; CI installs every dependency (requirements.txt)", pytrace=False)
    pytest.skip(f"{what} is not installed")


def require(module: str) -> ModuleType:
    """``pytest.importorskip`` for third-party modules, except that in CI a missing one fails the test."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        missing(f"{module!r} ({err})")


def _locale_installed(name: str) -> bool:
    saved = locale.setlocale(locale.LC_CTYPE)
    try:
        locale.setlocale(locale.LC_CTYPE, name)
    except locale.Error:
        return False
    locale.setlocale(locale.LC_CTYPE, saved)
    return True


def chromium() -> str | None:
    """The path of a headless-capable Chromium on ``PATH``, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


ROUND_TRIP = "tests/test_onnx_roundtrip.py::test_round_trip_is_identical"
BROWSER_TEST = "tests/test_hf_cli.py::test_the_html_report_in_a_headless_browser"
NO_BROWSER = "Chromium is not installed (an operating-system package: apt-get install chromium)"

#: The onnx backend-test models onnxruntime cannot load, by the reason the round-trip test gives.
ORT_CANNOT_RUN: dict[str, tuple[str, ...]] = {
    "onnxruntime has no kernel for Add(6)": (
        "pytorch-converted/test_Softsign", "pytorch-operator/test_operator_add_broadcast",
        "pytorch-operator/test_operator_add_size1_broadcast",
        "pytorch-operator/test_operator_add_size1_right_broadcast",
        "pytorch-operator/test_operator_add_size1_singleton_broadcast", "pytorch-operator/test_operator_addconstant",
        "pytorch-operator/test_operator_basic", "pytorch-operator/test_operator_non_float_params",
        "pytorch-operator/test_operator_params"),
    "onnxruntime has no kernel for AveragePool(1)": (
        "pytorch-converted/test_AvgPool1d", "pytorch-converted/test_AvgPool1d_stride",
        "pytorch-converted/test_AvgPool2d",
        "pytorch-converted/test_AvgPool2d_stride", "pytorch-converted/test_AvgPool3d",
        "pytorch-converted/test_AvgPool3d_stride", "pytorch-converted/test_AvgPool3d_stride1_pad0_gpu_input"),
    "onnxruntime has no kernel for PRelu(6)": (
        "pytorch-converted/test_PReLU_1d", "pytorch-converted/test_PReLU_1d_multiparam",
        "pytorch-converted/test_PReLU_2d",
        "pytorch-converted/test_PReLU_2d_multiparam", "pytorch-converted/test_PReLU_3d",
        "pytorch-converted/test_PReLU_3d_multiparam"),
    "onnxruntime has no kernel for BatchNormalization(6)": (
        "pytorch-converted/test_BatchNorm1d_3d_input_eval", "pytorch-converted/test_BatchNorm2d_eval",
        "pytorch-converted/test_BatchNorm2d_momentum_eval", "pytorch-converted/test_BatchNorm3d_eval",
        "pytorch-converted/test_BatchNorm3d_momentum_eval"),
    "onnxruntime has no kernel for Mul(6)": (
        "pytorch-converted/test_GLU", "pytorch-converted/test_GLU_dim",
        "pytorch-converted/test_PoissonNLLLLoss_no_reduce"),
    "onnxruntime has no kernel for Gemm(6)": (
        "pytorch-converted/test_Linear", "pytorch-operator/test_operator_addmm", "pytorch-operator/test_operator_mm"),
    "onnxruntime does not know the op ai.onnx.preview.training:Gradient": (
        "simple/test_gradient_of_add", "simple/test_gradient_of_add_and_mul"),
    "onnxruntime has no kernel for Pow(1)": ("pytorch-operator/test_operator_pow",),
}
if not _locale_installed("en_US.UTF-8"):  # where the locale is installed, these models run
    ORT_CANNOT_RUN["onnxruntime's StringNormalizer needs the en_US.UTF-8 locale, not installed here"] = (
        "simple/test_strnorm_model_monday_casesensintive_lower",
        "simple/test_strnorm_model_monday_casesensintive_upper",
        "simple/test_strnorm_model_monday_empty_output", "simple/test_strnorm_model_monday_insensintive_upper_twodim")

#: node id -> the reason its skip must give; every other skip fails a CI run.
EXPECTED_SKIPS: dict[str, str] = {f"{ROUND_TRIP}[{model}]": reason
                                  for reason, models in ORT_CANNOT_RUN.items() for model in models}
if chromium() is None:
    EXPECTED_SKIPS[BROWSER_TEST] = NO_BROWSER
