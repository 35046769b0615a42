"""Native models exported to ONNX: a decomposed PyTorch model (``torch.onnx.export``) and a decomposed
MindSpore Cell (``mindspore.export``), each validated against the native model's own outputs; and
decomposing the exported original through the ONNX frontend gives what exporting the natively
decomposed model gives."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from backends import onnx as onnx_backend  # noqa: E402
from lowrank_ir import Decompose  # noqa: E402
from tests import onnx_models as om  # noqa: E402
from tests.skips import require  # noqa: E402

RATIO, DIVISOR = 0.5, 8


# ------------------------------------------------------------------------------------------ PyTorch

def _torch_net():
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    from torch import nn

    class Net(nn.Module):
        """Conv -> Conv(stride 2) -> Linear -> Linear, and an embedding branch with an N-d projection."""

        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(16, 48, 3, padding=1)
            self.conv2 = nn.Conv2d(48, 64, 3, stride=2, padding=1)
            self.fc = nn.Linear(64 * 4 * 4, 96)
            self.fc2 = nn.Linear(96, 10)
            self.emb = nn.Embedding(120, 64)
            self.proj = nn.Linear(64, 48)

        def forward(self, x, ids):
            h = torch.relu(self.conv2(torch.relu(self.conv(x)))).flatten(1)
            return self.fc2(torch.relu(self.fc(h))), self.proj(self.emb(ids))

    torch.manual_seed(0)
    net = Net().eval()
    generator = torch.Generator().manual_seed(1)
    inputs = (torch.randn(3, 16, 8, 8, generator=generator), torch.randint(0, 120, (3, 7), generator=generator))
    return net, inputs


@pytest.mark.slow
def test_torch_export_parity_with_onnx_decomposition() -> None:
    net, inputs = _torch_net()
    exported = onnx_backend.export(net, inputs, input_names=["x", "ids"])
    assert onnx_backend.validate_native(net, exported, inputs).max_rel < 1e-5

    # The ONNX path: decompose the exported original through the ONNX frontend.
    through_onnx = Decompose(exported).from_ratio(RATIO, divisor=DIVISOR)
    onnx_config = through_onnx.decompose_config
    decomposed_onnx = through_onnx.decompose_network()

    # The native path: decompose the PyTorch model, then export it.
    natively = Decompose(net).from_ratio(RATIO, divisor=DIVISOR)
    small = natively.decompose_network()
    decomposed_export = onnx_backend.export(small, inputs, input_names=["x", "ids"])
    assert onnx_backend.validate_native(small, decomposed_export, inputs).max_rel < 1e-5

    # Same layers (named after their weights: fc.weight -> fc), same ranks, same outputs.
    shared = {name for name in natively.decompose_config if name in onnx_config}
    assert shared >= {"conv", "conv2", "fc", "emb"}
    assert {name: onnx_config[name] for name in shared} == {name: natively.decompose_config[name] for name in shared}
    assert len(onnx_config) == len(natively.decompose_config)  # proj is an unnamed MatMul in the export
    feeds = {"x": inputs[0].numpy(), "ids": inputs[1].numpy()}
    for a, b in zip(om.run(decomposed_onnx, feeds), om.run(decomposed_export, feeds), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # ... and the factor initializers carry the same names and values in both files.
    ours = {init.name: onnx.numpy_helper.to_array(init) for init in decomposed_onnx.graph.initializer}
    theirs = {init.name: onnx.numpy_helper.to_array(init) for init in decomposed_export.graph.initializer}
    for name in ("fc.0.weight", "fc.1.weight", "fc.1.bias", "conv.0.weight", "conv.1.weight", "conv.2.weight"):
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-6, atol=1e-7)


def test_export_rejects_other_models() -> None:
    with pytest.raises(TypeError, match="supported framework"):
        onnx_backend.export({"not": "a model"}, ())


# ---------------------------------------------------------------------------------------- MindSpore

def _mindspore_net():
    import os

    os.environ.setdefault("GLOG_v", "3")  # MindSpore's C++ logs: errors only
    ms = require("mindspore")
    from mindspore import nn

    class Net(nn.Cell):
        """Conv(pad 1) -> Dense -> Dense."""

        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(16, 48, 3, pad_mode="pad", padding=1, has_bias=True)
            self.relu = nn.ReLU()
            self.flatten = nn.Flatten()
            self.fc = nn.Dense(48 * 8 * 8, 96)
            self.fc2 = nn.Dense(96, 10)

        def construct(self, x):
            return self.fc2(self.relu(self.fc(self.flatten(self.relu(self.conv(x))))))

    ms.set_seed(0)
    net = Net()
    net.set_train(False)
    x = ms.Tensor(np.random.default_rng(1).standard_normal((2, 16, 8, 8)).astype(np.float32))
    return net, x


@pytest.mark.slow
def test_mindspore_export_parity_with_onnx_decomposition() -> None:
    net, x = _mindspore_net()
    exported = onnx_backend.export(net, x, input_names=["x"])
    assert exported.producer_name == "MindSpore"
    assert onnx_backend.validate_native(net, exported, x).max_rel < 1e-5

    through_onnx = Decompose(exported).from_ratio(RATIO, divisor=DIVISOR)
    decomposed_onnx = through_onnx.decompose_network()
    natively = Decompose(net).from_ratio(RATIO, divisor=DIVISOR)
    small = natively.decompose_network()
    small.set_train(False)
    decomposed_export = onnx_backend.export(small, x, input_names=["x"])
    assert onnx_backend.validate_native(small, decomposed_export, x).max_rel < 1e-5

    assert through_onnx.decompose_config == natively.decompose_config == {"conv": [16, 16], "fc": 48, "fc2": 8}
    feeds = {"x": x.asnumpy()}
    for a, b in zip(om.run(decomposed_onnx, feeds), om.run(decomposed_export, feeds), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    names = {init.name for init in decomposed_export.graph.initializer}
    assert {"conv.0.weight", "conv.1.weight", "conv.2.weight", "fc.0.weight", "fc.1.weight", "fc.1.bias"} <= names
