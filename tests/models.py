"""Models written out for the tests (no torchvision, no downloads)."""

from __future__ import annotations

import torch
from torch import nn


class Bottleneck(nn.Module):
    """torchvision's ResNet Bottleneck, same attribute names (conv1/bn1 ... downsample)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50(nn.Module):
    """ResNet-50 in torchvision's layout: state-dict keys match ``torchvision.models.resnet50()``."""

    def __init__(self, num_classes: int = 1000, width: int = 64) -> None:
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(width, 3)
        self.layer2 = self._make_layer(width * 2, 4, stride=2)
        self.layer3 = self._make_layer(width * 4, 6, stride=2)
        self.layer4 = self._make_layer(width * 8, 3, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * Bottleneck.expansion, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet50(seed: int = 0) -> ResNet50:
    torch.manual_seed(seed)
    return ResNet50().eval()


class Mixed(nn.Module):
    """Every layer kind the reference decomposes: Embedding, Linear, a 3x3 and a 1x1 Conv2d.

    Token ids ``[batch, 10, 10]`` -> ``embedding`` (Embedding, Linear) -> ``feature`` (3x3 conv, 1x1 conv,
    with a residual) -> 2x2 average pool -> ``inner`` (Linear) -> ``classifier`` (two Linears). The
    names (``embedding.0``, ``feature.2``, ``classifier.0`` ...) are those of the reference's own
    documentation examples.
    """

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Sequential(nn.Embedding(16, 32), nn.Linear(32, 64), nn.ReLU())
        self.feature = nn.Sequential(nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.Conv2d(128, 64, 1), nn.ReLU())
        self.pool = nn.AvgPool2d(2)
        self.inner = nn.Linear(64 * 5 * 5, 512)
        self.classifier = nn.Sequential(nn.Linear(512, 256), nn.Linear(256, 10))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embedding(ids).permute(0, 3, 1, 2)
        x = self.pool(self.feature(x) + x)
        return self.classifier(self.inner(torch.flatten(x, 1)))


def mixed(seed: int = 0) -> Mixed:
    torch.manual_seed(seed)
    return Mixed().eval()


def mixed_ids(seed: int = 0, batch: int = 2) -> torch.Tensor:
    """Token ids for :class:`Mixed`."""
    return torch.randint(0, 16, (batch, 10, 10), generator=torch.Generator().manual_seed(seed))


def convnet(seed: int = 0) -> nn.Module:
    """A small CNN (3x3, 3x3, 1x1 convs) on x [N, 16, H, W]: ``lowrank bench``'s PyTorch model."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(16, 96, 3, padding=1), nn.ReLU(), nn.Conv2d(96, 96, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(96, 32, 1)).eval()
