"""MindSpore models written out for the tests (no model zoo, no downloads).

``ResNet50`` has the standard torchvision layout and attribute names (``conv1``/``bn1`` ... ``downsample``,
``fc``), so its cell paths, decompose_config and decomposed parameter names line up with
``tests/models.py``'s PyTorch ResNet-50; BatchNorm parameters are MindSpore's (gamma, beta,
moving_mean, moving_variance). Padding is explicit (``pad_mode="pad"``) so that both compute the same.
"""

from __future__ import annotations

import os

os.environ.setdefault("GLOG_v", "3")  # MindSpore's C++ logs: errors only

import mindspore as ms  # noqa: E402
from mindspore import nn, ops  # noqa: E402


class Bottleneck(nn.Cell):
    """torchvision's ResNet Bottleneck, same attribute names (conv1/bn1 ... downsample)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Cell | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, pad_mode="valid")
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, pad_mode="pad", padding=1)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, pad_mode="valid")
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def construct(self, x: ms.Tensor) -> ms.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50(nn.Cell):
    """ResNet-50 with torchvision's cell paths: ``layer4.2.conv2``, ``layer2.0.downsample.0``, ``fc``."""

    def __init__(self, num_classes: int = 1000, width: int = 64) -> None:
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, pad_mode="pad", padding=3)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, pad_mode="pad", padding=1)
        self.layer1 = self._make_layer(width, 3)
        self.layer2 = self._make_layer(width * 2, 4, stride=2)
        self.layer3 = self._make_layer(width * 4, 6, stride=2)
        self.layer4 = self._make_layer(width * 8, 3, stride=2)
        self.fc = nn.Dense(width * 8 * Bottleneck.expansion, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.SequentialCell:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.SequentialCell([
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, 1, stride=stride, pad_mode="valid"),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            ])
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.SequentialCell(layers)

    def construct(self, x: ms.Tensor) -> ms.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(ops.mean(x, (2, 3)))


def resnet50(seed: int = 0, width: int = 64) -> ResNet50:
    ms.set_seed(seed)
    model = ResNet50(width=width)
    model.set_train(False)
    return model


# ---------------------------------------------------------------------------------------- snapshot

_HOOKS = ("_forward_pre_hook", "_forward_hook", "_forward_pre_hook_with_kwargs", "_forward_hook_with_kwargs")


def _hooks(cell: nn.Cell, table: str) -> dict:
    """A hook table, read without creating it (MindSpore creates them lazily on first access)."""
    attributes = vars(cell)
    lazy = f"_lazy{table}"
    return (attributes[lazy] if lazy in attributes else getattr(cell, table, None)) or {}


class CellSnapshot:
    """Everything about an ``nn.Cell`` a decomposition must not change; :meth:`check` asserts it."""

    def __init__(self, model: nn.Cell) -> None:
        self.model = model
        self.structure = repr(model)
        self.cells = self._cells(model)
        self.params = self._params(model)
        self.values = {param.name: param.asnumpy().copy() for param in model.get_parameters()}

    @staticmethod
    def _cells(model: nn.Cell) -> list[tuple[object, ...]]:
        return [(name, type(cell), id(cell), cell.training, cell.phase, dict(cell.get_flags()),
                 str(cell.get_mixed_precision_type()), tuple(len(_hooks(cell, table)) for table in _HOOKS))
                for name, cell in model.cells_and_names()]

    @staticmethod
    def _params(model: nn.Cell) -> list[tuple[object, ...]]:
        return [(path, param.name, id(param), param.requires_grad, str(param.dtype), tuple(param.shape))
                for path, param in model.parameters_and_names()]

    def check(self) -> None:
        import numpy as np

        model = self.model
        assert repr(model) == self.structure
        assert self._cells(model) == self.cells
        assert self._params(model) == self.params
        for param in model.get_parameters():
            assert np.array_equal(param.asnumpy(), self.values[param.name], equal_nan=True), f"{param.name} changed"


class Mixed(nn.Cell):
    """The MindSpore twin of ``tests/models.py``'s ``Mixed``: Embedding, Dense, 3x3 and 1x1 Conv2d, same names."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.SequentialCell([nn.Embedding(16, 32), nn.Dense(32, 64), nn.ReLU()])
        self.feature = nn.SequentialCell([nn.Conv2d(64, 128, 3, pad_mode="pad", padding=1, has_bias=True), nn.ReLU(),
                                          nn.Conv2d(128, 64, 1, has_bias=True), nn.ReLU()])
        self.pool = nn.AvgPool2d(2, stride=2)
        self.flatten = nn.Flatten()
        self.inner = nn.Dense(64 * 5 * 5, 512)
        self.classifier = nn.SequentialCell([nn.Dense(512, 256), nn.Dense(256, 10)])

    def construct(self, ids: ms.Tensor) -> ms.Tensor:
        x = ops.transpose(self.embedding(ids), (0, 3, 1, 2))
        x = self.pool(self.feature(x) + x)
        return self.classifier(self.inner(self.flatten(x)))


def mixed(seed: int = 0) -> Mixed:
    ms.set_seed(seed)
    model = Mixed()
    model.set_train(False)
    return model
