"""The same architectures written for PyTorch and MindSpore, and the weight-name map between them.

``SmallResNet``: a ResNet-style CNN (stem, two basic blocks with a strided downsample, a Conv1d over
the pooled rows, and a Dense/Linear head). ``TinyTransformer``: token and position Embeddings, one
self-attention block with LayerNorms and a feed-forward MLP, a Dense/Linear head. Cell paths and
module paths are identical, so ``decompose_config`` keys are too.

The name map (:func:`torch_to_mindspore`) walks the PyTorch modules: a parameter's name is kept
except where MindSpore's layer calls it differently (BatchNorm/LayerNorm ``weight``/``bias`` ->
``gamma``/``beta``, running statistics -> ``moving_mean``/``moving_variance``, Embedding ``weight``
-> ``embedding_table``) and a Conv1d weight gains MindSpore's height axis. It works on decomposed
models as well (``fc.0.weight``, ``emb.0.weight`` -> ``emb.0.embedding_table``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

os.environ.setdefault("GLOG_v", "3")

import mindspore as ms  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from mindspore import nn as msnn  # noqa: E402
from mindspore import ops  # noqa: E402
from torch import nn  # noqa: E402

# ------------------------------------------------------------------------------------------ PyTorch


class TorchBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + identity)


class TorchSmallResNet(nn.Module):
    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.layer1 = nn.Sequential(TorchBlock(width, 2 * width, stride=2), TorchBlock(2 * width, 2 * width))
        self.rows = nn.Conv1d(2 * width, 2 * width, 3, padding=1)
        self.fc1 = nn.Linear(2 * width, 64)
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer1(torch.relu(self.bn(self.stem(x))))
        x = torch.relu(self.rows(x.mean(dim=2)))  # [N, C, W]: a 1-D conv along the width
        return self.fc2(torch.relu(self.fc1(x.mean(dim=2))))


class TorchTinyTransformer(nn.Module):
    def __init__(self, vocab: int = 64, dim: int = 48, seq: int = 16) -> None:
        super().__init__()
        self.dim = dim
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(seq, dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.ln1 = nn.LayerNorm(dim)
        self.ff1 = nn.Linear(dim, 4 * dim)
        self.ff2 = nn.Linear(4 * dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1])
        x = self.tok(ids) + self.pos(positions)
        scores = self.q(x) @ self.k(x).transpose(1, 2) / math.sqrt(self.dim)
        h = self.ln1(x + self.o(torch.softmax(scores, dim=-1) @ self.v(x)))
        y = self.ln2(h + self.ff2(nn.functional.gelu(self.ff1(h))))
        return self.head(y)


# ---------------------------------------------------------------------------------------- MindSpore


class MsBlock(msnn.Cell):
    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = msnn.Conv2d(inplanes, planes, 3, stride=stride, pad_mode="pad", padding=1)
        self.bn1 = msnn.BatchNorm2d(planes)
        self.conv2 = msnn.Conv2d(planes, planes, 3, pad_mode="pad", padding=1)
        self.bn2 = msnn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = msnn.SequentialCell([msnn.Conv2d(inplanes, planes, 1, stride=stride, pad_mode="valid"),
                                                   msnn.BatchNorm2d(planes)])

    def construct(self, x: ms.Tensor) -> ms.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = ops.relu(self.bn1(self.conv1(x)))
        return ops.relu(self.bn2(self.conv2(out)) + identity)


class MsSmallResNet(msnn.Cell):
    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = msnn.Conv2d(3, width, 3, pad_mode="pad", padding=1)
        self.bn = msnn.BatchNorm2d(width)
        self.layer1 = msnn.SequentialCell([MsBlock(width, 2 * width, stride=2), MsBlock(2 * width, 2 * width)])
        self.rows = msnn.Conv1d(2 * width, 2 * width, 3, pad_mode="pad", padding=1, has_bias=True)
        self.fc1 = msnn.Dense(2 * width, 64)
        self.fc2 = msnn.Dense(64, num_classes)

    def construct(self, x: ms.Tensor) -> ms.Tensor:
        x = self.layer1(ops.relu(self.bn(self.stem(x))))
        x = ops.relu(self.rows(x.mean(axis=2)))
        return self.fc2(ops.relu(self.fc1(x.mean(axis=2))))


class MsTinyTransformer(msnn.Cell):
    def __init__(self, vocab: int = 64, dim: int = 48, seq: int = 16) -> None:
        super().__init__()
        self.dim = dim
        self.tok = msnn.Embedding(vocab, dim)
        self.pos = msnn.Embedding(seq, dim)
        self.q, self.k, self.v, self.o = (msnn.Dense(dim, dim) for _ in range(4))
        self.ln1 = msnn.LayerNorm((dim,), epsilon=1e-5)
        self.ff1 = msnn.Dense(dim, 4 * dim)
        self.ff2 = msnn.Dense(4 * dim, dim)
        self.ln2 = msnn.LayerNorm((dim,), epsilon=1e-5)
        self.gelu = msnn.GELU(approximate=False)  # PyTorch's default GELU is the exact (erf) one
        self.head = msnn.Dense(dim, vocab)

    def construct(self, ids: ms.Tensor) -> ms.Tensor:
        positions = ops.arange(ids.shape[1])
        x = self.tok(ids) + self.pos(positions)
        scores = ops.matmul(self.q(x), self.k(x).swapaxes(1, 2)) / math.sqrt(self.dim)
        h = self.ln1(x + self.o(ops.matmul(ops.softmax(scores, axis=-1), self.v(x))))
        y = self.ln2(h + self.ff2(self.gelu(self.ff1(h))))
        return self.head(y)


# ------------------------------------------------------------------------------------------ the map

#: PyTorch module type -> {PyTorch attribute: MindSpore attribute} where the names differ.
RENAMES: dict[type[nn.Module], dict[str, str]] = {
    nn.BatchNorm1d: {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean",
                     "running_var": "moving_variance"},
    nn.BatchNorm2d: {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean",
                     "running_var": "moving_variance"},
    nn.LayerNorm: {"weight": "gamma", "bias": "beta"},
    nn.Embedding: {"weight": "embedding_table"},
}

#: PyTorch state that MindSpore does not keep.
DROPPED = {"num_batches_tracked"}


def torch_to_mindspore(model: nn.Module) -> dict[str, str]:
    """PyTorch state-dict key -> MindSpore parameter name, for every key MindSpore keeps."""
    names = {}
    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        renames = RENAMES.get(type(module), {})
        own = [key for key, _ in module.named_parameters(recurse=False)]
        own += [key for key, _ in module.named_buffers(recurse=False)]
        for key in own:
            if key not in DROPPED:
                names[prefix + key] = prefix + renames.get(key, key)
    return names


def _conv1d_weights(model: nn.Module) -> set[str]:
    return {f"{path}.weight" for path, module in model.named_modules() if isinstance(module, nn.Conv1d)}


def mindspore_params(model: nn.Module) -> dict[str, np.ndarray]:
    """The PyTorch model's state as MindSpore-named float arrays in MindSpore layouts."""
    state = model.state_dict()
    conv1d = _conv1d_weights(model)
    params = {}
    for key, ms_name in torch_to_mindspore(model).items():
        array = state[key].detach().cpu().numpy().copy()
        params[ms_name] = array[:, :, None, :] if key in conv1d else array
    return params


def copy_torch_to_mindspore(model: nn.Module, cell: msnn.Cell) -> None:
    """Load ``model``'s weights into ``cell``; ``ValueError`` unless the names and shapes match exactly."""
    params = mindspore_params(model)
    targets = {param.name: param for param in cell.get_parameters()}
    missing, unexpected = sorted(set(targets) - set(params)), sorted(set(params) - set(targets))
    shapes = {name: (params[name].shape, tuple(targets[name].shape)) for name in set(params) & set(targets)
              if params[name].shape != tuple(targets[name].shape)}
    if missing or unexpected or shapes:
        raise ValueError(f"the models differ: missing {missing}, unexpected {unexpected}, shapes {shapes}")
    for name, array in params.items():
        targets[name].set_data(ms.Tensor(array, dtype=targets[name].dtype))


def copy_mindspore_to_torch(cell: msnn.Cell, model: nn.Module) -> None:
    """The inverse of :func:`copy_torch_to_mindspore` (running statistics' counters left as they are)."""
    arrays = {param.name: param.asnumpy() for param in cell.get_parameters()}
    conv1d = _conv1d_weights(model)
    state = model.state_dict()
    names = torch_to_mindspore(model)
    if set(names.values()) != set(arrays):
        raise ValueError(f"the models differ: {sorted(set(names.values()) ^ set(arrays))}")
    new = {}
    for key, ms_name in names.items():
        array = arrays[ms_name]
        new[key] = torch.from_numpy(array.reshape(array.shape[0], array.shape[1], -1) if key in conv1d
                                    else array.copy()).to(state[key].dtype)
    model.load_state_dict({**state, **new}, strict=True)


def randomise_statistics(model: nn.Module, seed: int) -> None:
    """Non-trivial BatchNorm statistics and LayerNorm affine parameters, so a wrong mapping would show."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm2d, nn.LayerNorm)):
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.uniform_(-0.2, 0.2, generator=generator)
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.3, 0.3, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)


def twins(kind: str, seed: int = 0) -> tuple[nn.Module, msnn.Cell]:
    """A PyTorch model and its MindSpore twin holding the same weights, both in eval mode."""
    factories: Mapping[str, Any] = {"cnn": (TorchSmallResNet, MsSmallResNet),
                                    "transformer": (TorchTinyTransformer, MsTinyTransformer)}
    torch_factory, ms_factory = factories[kind]
    torch.manual_seed(seed)
    model = torch_factory().eval()
    randomise_statistics(model, seed)
    ms.set_seed(seed)
    cell = ms_factory()
    cell.set_train(False)
    copy_torch_to_mindspore(model, cell)
    return model, cell
