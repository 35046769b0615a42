"""The core is numpy only: importing lowrank_ir never imports a framework."""

from __future__ import annotations

import subprocess
import sys

import lowrank_ir

FRAMEWORKS = ("torch", "mindspore", "onnx", "onnxruntime", "tensorflow", "scipy")


def test_import_pulls_in_no_framework() -> None:
    code = (
        "import sys, lowrank_ir\n"
        f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r})\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_public_api_is_all() -> None:
    for name in lowrank_ir.__all__:
        assert hasattr(lowrank_ir, name), name
    assert {"Decompose", "count_parameters", "SafeWriteUmask", "set_logger_level"} <= set(lowrank_ir.__all__)


def test_unsupported_model_type_names_supported_frameworks() -> None:
    import pytest

    with pytest.raises(TypeError, match=r"torch\.nn\.Module.*mindspore\.nn\.Cell.*got dict"):
        lowrank_ir.Decompose({"not": "a model"})
