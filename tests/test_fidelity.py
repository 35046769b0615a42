"""Data-aware refinements: the mean error folded into the bias, and the sequential mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lowrank_ir import Decompose, Policy, plan, rewrite
from lowrank_ir._engine import LayerStats


def correlated(count: int, dim: int, generator: torch.Generator, shift: float = 2.0) -> torch.Tensor:
    mixing = torch.randn(dim, dim, generator=generator) * torch.logspace(0, -2, dim)
    return torch.randn(count, dim, generator=generator) @ mixing + shift


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 16)).eval()


def test_bias_correction_makes_the_mean_output_exact() -> None:
    rng = np.random.default_rng(0)
    weight, bias = rng.standard_normal((24, 32)), rng.standard_normal(24)
    from lowrank_ir import Graph, Node, Op

    graph = Graph([Node(Op.LINEAR, "fc", {"in_features": 32, "out_features": 24}, {"weight": "w", "bias": "b"})],
                  {"w": weight, "b": bias})
    x = rng.standard_normal((5000, 32)) @ (rng.standard_normal((32, 32)) * np.logspace(0, -2, 32)) + 3.0
    mean = x.mean(0)
    with_mean = {"fc": LayerStats(x.T @ x / len(x), len(x), mean)}
    without = {"fc": LayerStats(x.T @ x / len(x), len(x))}
    chosen = plan(graph, Policy.config({"fc": 4}))
    corrected, plain = rewrite(graph, chosen, stats=with_mean).graph, rewrite(graph, chosen, stats=without).graph

    def outputs(g):
        return x @ (g.params["fc.1.weight"] @ g.params["fc.0.weight"]).T + g.params["fc.1.bias"]

    target = x @ weight.T + bias
    np.testing.assert_allclose(outputs(corrected).mean(0), target.mean(0), atol=1e-9)
    assert np.abs(outputs(plain).mean(0) - target.mean(0)).max() > 1e-3
    assert np.linalg.norm(outputs(corrected) - target) < np.linalg.norm(outputs(plain) - target)
    np.testing.assert_array_equal(corrected.params["fc.0.weight"], plain.params["fc.0.weight"])


def test_bias_free_layers_keep_their_structure() -> None:
    generator = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Linear(32, 32, bias=False)).eval()
    small = Decompose(model).from_fixed(4, divisor=1).decompose_network(datasets=[correlated(256, 32, generator)])
    assert set(small.state_dict()) == {"0.0.weight", "0.1.weight"}


def test_sequential_refines_every_layer_and_leaves_the_model_alone() -> None:
    generator = torch.Generator().manual_seed(2)
    model = mlp()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    batches = [correlated(128, 32, generator) for _ in range(4)]
    held_out = correlated(512, 32, generator)
    decomposer = Decompose(model).from_fixed(6, divisor=1)
    one_shot = decomposer.decompose_network(datasets=batches)
    sequential = decomposer.decompose_network(datasets=batches, sequential=True)
    assert {layer.name for layer in decomposer.report if layer.error is not None} == {"0", "2", "4"}
    # the first layer sees the same inputs either way; later ones see the decomposed upstream
    assert torch.equal(one_shot[0][0].weight, sequential[0][0].weight)
    assert not torch.equal(one_shot[4][0].weight, sequential[4][0].weight)
    with torch.no_grad():
        reference = model(held_out)
        err_seq = float((sequential(held_out) - reference).norm() / reference.norm())
        err_one = float((one_shot(held_out) - reference).norm() / reference.norm())
    assert np.isfinite(err_seq) and err_seq < 1.0 and err_one < 1.0
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_execution_groups_share_a_pass_for_layers_fed_the_same_tensor() -> None:
    from frontends.torch import execution_groups, lower

    class QKV(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
            self.out = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            attention = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2), dim=-1)
            return self.out(attention @ self.v(x))

    model = QKV().eval()
    groups = execution_groups(model, lower(model), [torch.randn(2, 3, 8)], ["out", "v", "k", "q"])
    assert groups == [["q", "k", "v"], ["out"]]


@pytest.mark.parametrize("bad", [None, 1])
def test_sequential_validation(bad) -> None:
    decomposer = Decompose(mlp()).from_fixed(6, divisor=1)
    if bad is None:
        with pytest.raises(ValueError, match="sequential=True needs datasets"):
            decomposer.decompose_network(sequential=True)
    else:
        with pytest.raises(TypeError, match="sequential must be a bool"):
            decomposer.decompose_network(datasets=[torch.randn(2, 32)], sequential=bad)
