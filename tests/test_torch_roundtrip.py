"""PyTorch round trips: model -> IR -> engine -> new model, checked numerically against the original.

Full-rank decompositions (exact ranks from a saved config, so no rounding and no saving check) must
reproduce the original layer; the new model keeps dtype, requires_grad and modes; the input model is
never changed; layers that cannot be replaced safely are left alone with the reason in the report.
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

import frontends.torch as torch_frontend  # noqa: E402
from backends import torch as torch_backend  # noqa: E402
from lowrank_ir import Decompose, Policy, count_parameters, load_graph, plan, rewrite, save_graph  # noqa: E402

FULL_RANK_TOLERANCE = 1e-5


class One(nn.Module):
    """A model holding one layer under ``name`` (so state-dict keys are ``name.*``)."""

    def __init__(self, name: str, layer: nn.Module) -> None:
        super().__init__()
        self.layer_name = name
        self.add_module(name, layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.layer_name)(x)


def full_rank(layer: nn.Module) -> int | list[int]:
    """The full rank of a layer as a ``decompose_config`` value."""
    if isinstance(layer, nn.Linear):
        return min(layer.in_features, layer.out_features)
    if isinstance(layer, nn.Embedding):
        return min(layer.num_embeddings, layer.embedding_dim)
    return [layer.out_channels, layer.in_channels]


def decompose_full_rank(model: One, write_config) -> tuple[Decompose, nn.Module]:
    layer = getattr(model, model.layer_name)
    path = write_config({model.layer_name: full_rank(layer)})
    decomposer = Decompose(model, config_file=path).from_file()
    return decomposer, decomposer.decompose_network()


# ------------------------------------------------------------------------------------------- full rank

CONV_CASES = {
    # id: (factory, input shape)
    "conv2d-3x3": (lambda: nn.Conv2d(6, 8, 3), (2, 6, 9, 9)),
    "conv2d-strided": (lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1), (2, 6, 11, 11)),
    "conv2d-stride-2x1": (lambda: nn.Conv2d(6, 8, 3, stride=(2, 1)), (2, 6, 10, 9)),
    "conv2d-dilated": (lambda: nn.Conv2d(6, 8, 3, dilation=2, padding=2), (2, 6, 9, 9)),
    "conv2d-padded-2": (lambda: nn.Conv2d(6, 8, 3, padding=2), (2, 6, 7, 7)),
    "conv2d-same": (lambda: nn.Conv2d(6, 8, 3, padding="same"), (2, 6, 9, 9)),
    "conv2d-same-even-dilated": (lambda: nn.Conv2d(6, 8, 4, padding="same", dilation=2), (2, 6, 9, 9)),
    "conv2d-valid": (lambda: nn.Conv2d(6, 8, 3, padding="valid"), (2, 6, 9, 9)),
    "conv2d-reflect": (lambda: nn.Conv2d(6, 8, 3, padding=1, padding_mode="reflect"), (2, 6, 9, 9)),
    "conv2d-circular": (lambda: nn.Conv2d(6, 8, 3, padding=1, padding_mode="circular"), (2, 6, 9, 9)),
    "conv2d-replicate": (lambda: nn.Conv2d(6, 8, 3, padding=(2, 1), padding_mode="replicate"), (2, 6, 9, 9)),
    "conv2d-3x1": (lambda: nn.Conv2d(6, 8, (3, 1), padding=(1, 0)), (2, 6, 9, 9)),
    "conv2d-1x5": (lambda: nn.Conv2d(6, 8, (1, 5), padding=(0, 2)), (2, 6, 9, 9)),
    "conv2d-1x1": (lambda: nn.Conv2d(6, 8, 1), (2, 6, 5, 5)),
    "conv2d-wide-in": (lambda: nn.Conv2d(12, 4, 3, stride=2), (2, 12, 9, 9)),
    "conv2d-unbatched": (lambda: nn.Conv2d(6, 8, 3, padding=1), (6, 9, 9)),
    "conv1d": (lambda: nn.Conv1d(6, 8, 3, padding=1), (2, 6, 17)),
    "conv1d-same-reflect": (lambda: nn.Conv1d(6, 8, 4, padding="same", padding_mode="reflect"), (2, 6, 17)),
    "conv1d-strided-dilated": (lambda: nn.Conv1d(6, 8, 5, stride=3, dilation=2), (2, 6, 31)),
    "conv3d": (lambda: nn.Conv3d(4, 6, 3, padding=1), (2, 4, 5, 6, 5)),
    "conv3d-nonsquare": (lambda: nn.Conv3d(4, 6, (3, 1, 2), stride=(1, 2, 1)), (2, 4, 5, 6, 5)),
}


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("case", list(CONV_CASES), ids=list(CONV_CASES))
def test_full_rank_conv_reproduces_the_layer(case: str, bias: bool, write_config, rel_err) -> None:
    factory, shape = CONV_CASES[case]
    torch.manual_seed(1)
    conv = factory()
    if not bias:
        conv.bias = None
    model = One("conv", conv).eval()
    decomposer, decomposed = decompose_full_rank(model, write_config)
    x = torch.randn(*shape)
    with torch.no_grad():
        expected, actual = model(x), decomposed(x)
    assert actual.shape == expected.shape
    assert rel_err(actual, expected) < FULL_RANK_TOLERANCE
    chain = decomposed.conv
    assert isinstance(chain, nn.Sequential) and len(chain) == 3
    assert all(type(part) is type(conv) for part in chain)
    # the core keeps the layer's geometry; the 1x1 ends are plain pointwise convs
    core = chain[1]
    for attr in ("kernel_size", "stride", "padding", "dilation", "padding_mode"):
        assert getattr(core, attr) == getattr(conv, attr), attr
    assert chain[0].kernel_size == chain[2].kernel_size == (1,) * len(conv.kernel_size)
    expected_keys = ["conv.0.weight", "conv.1.weight", "conv.2.weight"] + (["conv.2.bias"] if bias else [])
    assert list(decomposed.state_dict()) == expected_keys
    assert decomposer.report["conv"].error < FULL_RANK_TOLERANCE


@pytest.mark.parametrize(("out_features", "in_features"), [(12, 16), (16, 12), (10, 10)])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_full_rank_linear_reproduces_the_layer(out_features: int, in_features: int, bias: bool,
                                               write_config, rel_err) -> None:
    model = One("fc", nn.Linear(in_features, out_features, bias=bias)).eval()
    decomposer, decomposed = decompose_full_rank(model, write_config)
    x = torch.randn(5, 3, in_features)  # extra leading dims go through unchanged
    with torch.no_grad():
        assert rel_err(decomposed(x), model(x)) < FULL_RANK_TOLERANCE
    rank = min(in_features, out_features)
    assert [(part.in_features, part.out_features) for part in decomposed.fc] == [(in_features, rank),
                                                                               (rank, out_features)]
    expected_keys = ["fc.0.weight", "fc.1.weight"] + (["fc.1.bias"] if bias else [])
    assert list(decomposed.state_dict()) == expected_keys
    assert decomposed.fc[0].bias is None
    if bias:
        assert torch.equal(decomposed.fc[1].bias, model.fc.bias)


@pytest.mark.parametrize(("num", "dim", "padding_idx"), [(20, 8, 3), (20, 8, None), (6, 10, 0), (6, 10, -1)])
def test_full_rank_embedding_reproduces_the_layer(num: int, dim: int, padding_idx: int | None,
                                                  write_config, rel_err) -> None:
    model = One("emb", nn.Embedding(num, dim, padding_idx=padding_idx)).eval()
    decomposer, decomposed = decompose_full_rank(model, write_config)
    ids = torch.randint(0, num, (4, 7))
    ids[0, :] = model.emb.padding_idx if padding_idx is not None else 0
    with torch.no_grad():
        expected, actual = model(ids), decomposed(ids)
    assert rel_err(actual, expected) < FULL_RANK_TOLERANCE
    lookup = decomposed.emb[0]
    assert isinstance(lookup, nn.Embedding) and isinstance(decomposed.emb[1], nn.Linear)
    assert lookup.padding_idx == model.emb.padding_idx
    if padding_idx is not None:  # the padding row still looks up (numerically) zero
        assert float(actual[0].abs().max()) < 1e-6
    assert list(decomposed.state_dict()) == ["emb.0.weight", "emb.1.weight"]


@pytest.mark.parametrize("groups", [2, 6])
def test_grouped_conv_is_left_alone_with_the_reason(groups: int, rel_err) -> None:
    """Grouped and depthwise convs are kept as they are (the reference would build a wrong layer)."""
    torch.manual_seed(2)
    model = nn.Sequential()
    model.add_module("grouped", nn.Conv2d(6, 6, 3, padding=1, groups=groups))
    model.add_module("mix", nn.Conv2d(6, 48, 3, padding=1))
    model.eval()
    decomposer = Decompose(model).from_fixed(2, divisor=1)
    assert decomposer.decompose_config == {"mix": [2, 2]}
    assert f"groups={groups}" in decomposer.report["grouped"].reason
    assert decomposer.report["grouped"].form is None
    decomposed = decomposer.decompose_network()
    assert f"groups={groups}" in decomposer.report["grouped"].reason  # still after decompose_network
    assert type(decomposed.grouped) is nn.Conv2d and decomposed.grouped.groups == groups
    assert torch.equal(decomposed.grouped.weight, model.grouped.weight)
    x = torch.randn(2, 6, 7, 7)
    with torch.no_grad():
        assert torch.equal(decomposed.grouped(x), model.grouped(x))
        assert math.isfinite(rel_err(decomposed(x), model(x)))


def test_config_naming_a_grouped_conv_is_rejected(write_config) -> None:
    model = nn.Sequential(nn.Conv2d(6, 6, 3, groups=3), nn.Conv2d(6, 8, 3))
    decomposer = Decompose(model, config_file=write_config({"0": [2, 2]}))
    with pytest.raises(ValueError, match=r"'0'.*grouped convolution \(groups=3\)"):
        decomposer.from_file()


# ------------------------------------------------------------------------------ what the copy keeps


class Net(nn.Module):
    """A conv + MLP model with BatchNorm (buffers) and nested modules."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 24)
        self.head = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(self.pool(self.features(x)).flatten(1))))


NET_FULL_CONFIG = {"features.0": [16, 3], "features.3": [32, 16], "fc": 24, "head": 10}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_dtype_is_kept(dtype: torch.dtype, write_config, rel_err) -> None:
    model = Net().to(dtype).eval()
    decomposer = Decompose(model, config_file=write_config(NET_FULL_CONFIG)).from_file()
    decomposed = decomposer.decompose_network()
    assert {tensor.dtype for tensor in decomposed.state_dict().values() if tensor.is_floating_point()} == {dtype}
    x = torch.randn(2, 3, 8, 8, dtype=torch.float32)
    with torch.no_grad():
        error = rel_err(decomposed(x.to(dtype)), model(x.to(dtype)))
    tolerance = {torch.float64: 1e-12, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    assert error < tolerance


def test_requires_grad_and_modes_are_kept(write_config) -> None:
    model = Net().train()
    model.features[0].requires_grad_(False)
    model.head.eval()
    decomposed = Decompose(model, config_file=write_config(NET_FULL_CONFIG)).from_file().decompose_network()
    for name in ("features.0", "features.3", "fc", "head"):
        original, chain = model.get_submodule(name), decomposed.get_submodule(name)
        assert isinstance(chain, nn.Sequential)
        assert {part.training for part in chain.modules()} == {original.training}, name
        assert {p.requires_grad for p in chain.parameters()} == {original.weight.requires_grad}, name
    # modules that were not replaced keep their state too
    assert decomposed.training and decomposed.features[1].training
    grads = {name: p.requires_grad for name, p in decomposed.named_parameters()}
    assert not grads["features.0.0.weight"] and grads["fc.0.weight"]


def test_decomposed_model_trains() -> None:
    """The factors are leaf parameters: gradients reach them, and none reach the original model."""
    model = Net().train()
    decomposed = Decompose(model).from_ratio(0.5, divisor=4).decompose_network()
    optimizer = torch.optim.SGD(decomposed.parameters(), lr=0.1)
    x, target = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    before = decomposed.fc[0].weight.detach().clone()
    loss = nn.functional.cross_entropy(decomposed(x), target)
    loss.backward()
    assert all(p.grad is not None for p in decomposed.parameters())
    assert all(p.grad is None for p in model.parameters())
    optimizer.step()
    assert not torch.equal(decomposed.fc[0].weight, before)


# ------------------------------------------------------------------------- the input is never changed


def test_input_model_is_not_mutated(snapshot, write_config) -> None:
    model = Net().train()
    snap = snapshot(model)
    decomposer = Decompose(model, config_file=write_config(NET_FULL_CONFIG)).from_file()
    decomposed = decomposer.decompose_network()
    structure = decomposer.decompose_network(do_decompose_weight=False)
    snap.check()
    assert decomposed is not model and structure is not model
    assert isinstance(decomposed.fc, nn.Sequential) and isinstance(model.fc, nn.Linear)
    # the new model shares no tensor with the old one: training it leaves the original alone
    with torch.no_grad():
        for param in decomposed.parameters():
            param.add_(1.0)
    snap.check()


def test_input_model_is_not_mutated_by_a_data_aware_run(snapshot) -> None:
    model = Net().train()  # BatchNorm in training mode would update its statistics if run in train mode
    snap = snapshot(model)
    data = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    decomposed = Decompose(model).from_ratio(0.5, divisor=4).decompose_network(datasets=data)
    snap.check()
    assert isinstance(decomposed.fc, nn.Sequential)


@pytest.mark.parametrize("bad_data", [
    [torch.randn(2, 3, 8, 8), torch.randn(2, 5, 8, 8)],  # fails inside the forward, hooks registered
    [torch.randn(2, 3, 8, 8), 7],  # not a model input
    [],
], ids=["wrong-shape", "bad-element", "empty"])
def test_input_model_is_not_mutated_by_a_failing_call(bad_data, snapshot) -> None:
    model = Net().train()
    snap = snapshot(model)
    decomposer = Decompose(model).from_ratio(0.5, divisor=4)
    with pytest.raises((TypeError, ValueError)):
        decomposer.decompose_network(datasets=bad_data)
    snap.check()


def test_input_model_is_not_mutated_when_planning_fails(snapshot) -> None:
    model = Net().train()
    with torch.no_grad():
        model.fc.weight[0, 0] = float("nan")
    snap = snapshot(model)
    with pytest.raises(ValueError, match="NaN or Inf"):
        Decompose(model).from_ratio(0.5, divisor=4)
    snap.check()


# ----------------------------------------------------------------------- layers that must stay as they are


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.fc = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.attn(x, x, x, need_weights=False)[0])


def test_multihead_attention_out_proj_is_not_replaced(rel_err, write_config) -> None:
    model = Attention().eval()
    decomposer = Decompose(model).from_fixed(8, divisor=1)
    assert decomposer.decompose_config == {"fc": 8}
    reason = decomposer.report["attn.out_proj"].reason
    assert "MultiheadAttention" in reason and "out_proj.weight" in reason
    decomposed = decomposer.decompose_network()
    assert type(decomposed.attn.out_proj) is type(model.attn.out_proj)
    x = torch.randn(2, 5, 32)
    alone = Decompose(nn.Sequential(model.fc)).from_fixed(8, divisor=1).decompose_network()  # fc by itself
    with torch.no_grad():
        expected = model.attn(x, x, x, need_weights=False)[0]
        assert torch.equal(decomposed.attn(x, x, x, need_weights=False)[0], expected)
        torch.testing.assert_close(decomposed(x), alone(expected), rtol=1e-5, atol=1e-6)
        assert rel_err(decomposed(x), model(x)) > 1e-3
    with pytest.raises(ValueError, match=r"attn\.out_proj.*out_proj\.weight"):
        Decompose(model, config_file=write_config({"attn.out_proj": 32})).from_file()


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 16)
        self.mid = nn.Linear(16, 16)
        self.head = nn.Linear(16, 40, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.mid(self.emb(ids)))


def test_tied_weights_are_left_alone() -> None:
    model = Tied().eval()
    decomposer = Decompose(model).from_fixed(4, divisor=1)
    assert decomposer.decompose_config == {"mid": 4}
    for name in ("emb", "head"):
        assert "tied" in decomposer.report[name].reason
    decomposed = decomposer.decompose_network()
    assert decomposed.head.weight is decomposed.emb.weight  # the tie survives the copy
    assert decomposed.emb.weight is not model.emb.weight
    assert isinstance(decomposed.mid, nn.Sequential)
    totals = decomposer.report.totals()  # the tied table counts once, as count_parameters does
    assert totals["params_before"] == count_parameters(model) == 40 * 16 + 16 * 16 + 16
    assert totals["params_after"] == count_parameters(decomposed) == 40 * 16 + 4 * 32 + 16
    assert decomposer.report["head"].weight == "emb.weight"


PARAMETRIZATIONS = {
    "weight_norm": lambda layer: nn.utils.parametrizations.weight_norm(layer),
    "spectral_norm": lambda layer: nn.utils.parametrizations.spectral_norm(layer),
    "orthogonal": lambda layer: nn.utils.parametrizations.orthogonal(layer),
}


@pytest.mark.parametrize("kind", list(PARAMETRIZATIONS))
def test_parametrized_layers_are_left_alone(kind: str, snapshot) -> None:
    """A parametrized weight is computed in the forward: the layer is kept, the rest is decomposed,
    and reading the weight does not run e.g. spectral norm's power iteration on the user's model."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 48))
    PARAMETRIZATIONS[kind](model[0])
    model.train()
    snap = snapshot(model)
    decomposer = Decompose(model).from_fixed(8, divisor=1)
    assert decomposer.decompose_config == {"2": 8}
    assert "parametrized" in decomposer.report["0"].reason
    assert decomposer.report["0"].shape == [48, 48]
    decomposed = decomposer.decompose_network()
    snap.check()
    assert nn.utils.parametrize.is_parametrized(decomposed[0], "weight")
    model.eval()
    decomposed.eval()
    x = torch.randn(3, 48)
    with torch.no_grad():
        assert torch.equal(decomposed[0](x), model[0](x))
    graph = torch_frontend.lower(model)
    assert graph.meta["computed_params"] == ["0.weight"]
    assert list(torch_backend.state_dict(graph)) == list(model.state_dict())


def test_model_that_is_itself_a_layer(rel_err, write_config) -> None:
    model = nn.Linear(12, 10).eval()
    decomposer = Decompose(model, config_file=write_config({"": 10})).from_file()
    decomposed = decomposer.decompose_network()
    assert isinstance(decomposed, nn.Sequential) and list(decomposed.state_dict()) == ["0.weight", "1.weight",
                                                                                      "1.bias"]
    x = torch.randn(3, 12)
    with torch.no_grad():
        assert rel_err(decomposed(x), model(x)) < FULL_RANK_TOLERANCE


# --------------------------------------------------------------------------------- graph save / load


def _assert_same_graph(loaded, graph) -> None:
    assert [node.name for node in loaded.nodes] == [node.name for node in graph.nodes]
    for new, old in zip(loaded.nodes, graph.nodes, strict=True):
        assert (new.op, new.attrs, new.params, new.inputs, new.outputs) == (
            old.op, old.attrs, old.params, old.inputs, old.outputs), old.name
    assert set(loaded.params) == set(graph.params)
    for name, array in graph.params.items():
        assert loaded.params[name].dtype == array.dtype, name
        assert loaded.params[name].shape == array.shape, name
        assert (loaded.params[name] == array).all(), name
    assert loaded.meta == graph.meta


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_graph_save_load_round_trip(dtype: torch.dtype, tmp_path, rel_err) -> None:
    model = nn.Sequential()
    model.add_module("conv", nn.Conv2d(3, 8, (3, 1), padding="same", padding_mode="reflect"))
    model.add_module("norm", nn.GroupNorm(2, 8))
    model.add_module("grouped", nn.Conv2d(8, 8, 3, groups=4, bias=False))
    model.add_module("flat", nn.Flatten())
    model.add_module("fc", nn.Linear(8 * 25, 6))
    model = model.to(dtype).eval()
    graph = torch_frontend.lower(model)
    _assert_same_graph(load_graph(save_graph(graph, tmp_path / "lowered")), graph)

    # a factorized graph round-trips too, and the loaded one builds the same model
    factorized = rewrite(graph, plan(graph, Policy.fixed(2, divisor=1))).graph
    loaded = load_graph(save_graph(factorized, tmp_path / "factorized"))
    _assert_same_graph(loaded, factorized)
    x = torch.randn(2, 3, 7, 7, dtype=dtype)
    with torch.no_grad():
        from_saved = torch_backend.build(loaded, like=model)(x)
        assert torch.equal(from_saved, torch_backend.build(factorized, like=model)(x))
    assert set(loaded.meta["factorized"]) == {"conv", "fc"}


def test_graph_round_trip_keeps_scalar_buffers(tmp_path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    graph = torch_frontend.lower(model)
    assert graph.params["1.num_batches_tracked"].shape == ()
    loaded = load_graph(save_graph(graph, tmp_path / "g"))
    assert loaded.params["1.num_batches_tracked"].shape == ()
    _assert_same_graph(loaded, graph)


def test_embedding_graph_round_trip_keeps_none_attributes(tmp_path) -> None:
    model = One("emb", nn.Embedding(30, 12, padding_idx=None, max_norm=None))
    graph = torch_frontend.lower(model)
    loaded = load_graph(save_graph(graph, tmp_path / "g"))
    _assert_same_graph(loaded, graph)
    assert loaded.node("emb").attrs["padding_idx"] is None
