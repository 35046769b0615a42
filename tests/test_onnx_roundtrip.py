"""ONNX -> IR -> ONNX without decomposition, on every model of the onnx backend test data.

Each model is lowered and written back; the result must be the same model byte for byte, and where
onnxruntime can run the original on its stored inputs, the written model's outputs must be
identical to the original's (and as close to the stored outputs as the original's are). The models
onnxruntime cannot load are listed, with the reason, in ``tests/skips.py``: only they skip the output
check, and a listed model that loads fails the test (the list is stale).
"""

from __future__ import annotations

import re

import numpy as np
import pytest

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
ort.set_default_logger_severity(3)

from backends import onnx as onnx_backend  # noqa: E402
from frontends import onnx as onnx_frontend  # noqa: E402
from tests.onnx_models import BackendCase, backend_cases, session  # noqa: E402
from tests.skips import ORT_CANNOT_RUN  # noqa: E402

CASES = backend_cases()

#: Model id -> why onnxruntime cannot load it.
CANNOT_RUN = {model: reason for reason, models in ORT_CANNOT_RUN.items() for model in models}


def _same(a: object, b: object) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    a_arr, b_arr = np.asarray(a), np.asarray(b)
    if a_arr.dtype != b_arr.dtype or a_arr.shape != b_arr.shape:
        return False
    return bool(np.array_equal(a_arr, b_arr, equal_nan=a_arr.dtype.kind in "fc"))


def _close(a: object, b: object) -> bool:
    """Within the onnx backend tests' default tolerance (rtol 1e-3, atol 1e-7)."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    a_arr, b_arr = np.asarray(a), np.asarray(b)
    if a_arr.dtype.kind not in "fciub":
        return bool(np.array_equal(a_arr, b_arr))
    return a_arr.shape == b_arr.shape and bool(np.allclose(a_arr, b_arr, rtol=1e-3, atol=1e-7, equal_nan=True))


def _reason(err: Exception) -> str:
    """Why onnxruntime cannot load a model, in a few words."""
    message = str(err)
    found = re.search(r"implementation for (\w+\(-?\d+\))", message)
    if found:
        return f"onnxruntime has no kernel for {found.group(1)}"
    found = re.search(r"([\w.]+:\w+)\(-?\d+\) is not a registered", message)
    if found:
        return f"onnxruntime does not know the op {found.group(1)}"
    if "locale" in message:
        return "onnxruntime's StringNormalizer needs the en_US.UTF-8 locale, not installed here"
    return message.splitlines()[0][:100]


def test_the_backend_data_is_there() -> None:
    sets = {case.id.split("/")[0] for case in CASES}
    assert sets == {"simple", "pytorch-converted", "pytorch-operator", "light"}
    assert len(CASES) >= 140


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_round_trip_is_identical(case: BackendCase) -> None:
    model = case.load()
    graph = onnx_frontend.lower(model)
    written = onnx_backend.build(graph, like=model)
    assert written.SerializeToString(deterministic=True) == model.SerializeToString(deterministic=True)
    # From the IR alone (no `like` to copy constants from) tensors are re-encoded: same values, same outputs.
    from_ir = onnx_backend.build(graph, check=False)
    cannot_run = CANNOT_RUN.get(case.id)
    if cannot_run is not None:
        with pytest.raises(Exception) as err:  # noqa: B017 - onnxruntime's own exception types
            session(model)
        assert _reason(err.value) == cannot_run
        pytest.skip(f"written back byte-identical; {cannot_run}")
    original = session(model)
    rebuilt, rebuilt_from_ir = session(written), session(from_ir)
    for feeds, expected in case.feeds_and_outputs(model):
        want = original.run(None, feeds)
        for candidate, label in ((rebuilt, "the round trip"), (rebuilt_from_ir, "writing from the IR alone")):
            got = candidate.run(None, feeds)
            assert len(got) == len(want)
            for index, (a, b) in enumerate(zip(want, got, strict=True)):
                assert _same(a, b), f"output {index} differs after {label}"
        for index, (a, b) in enumerate(zip(want, expected, strict=False)):
            assert _close(a, b), f"onnxruntime differs from the stored output {index}"


def test_the_models_onnxruntime_cannot_run_are_backend_cases() -> None:
    ids = {case.id for case in CASES}
    assert set(CANNOT_RUN) <= ids
    assert len(ids - set(CANNOT_RUN)) >= 100
