"""MindSpore round trips: Cell -> IR -> engine -> new Cell, checked numerically against the original.

Full-rank decompositions (exact ranks from a saved config) must reproduce each supported cell; the
new Cell keeps dtype, mixed precision, requires_grad and training flags; parameter names follow the
``fc.0.weight`` layout and checkpoints round-trip; the input Cell is never changed; every bad input
is a clear error.
"""

from __future__ import annotations

import os

os.environ.setdefault("GLOG_v", "3")  # MindSpore's C++ logs: errors only

import json  # noqa: E402
import stat  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

ms = pytest.importorskip("mindspore")

from mindspore import nn, ops  # noqa: E402
from ms_models import CellSnapshot  # noqa: E402

import frontends.mindspore as ms_frontend  # noqa: E402
from backends import mindspore as ms_backend  # noqa: E402
from lowrank_ir import Decompose, Op, Policy, SafeWriteUmask, count_parameters, plan, rewrite  # noqa: E402

FULL_RANK_TOLERANCE = 1e-5


pytestmark = pytest.mark.mindspore


@pytest.fixture(autouse=True)
def _seed_mindspore() -> None:
    ms.set_seed(0)


def rel(actual: ms.Tensor | np.ndarray, expected: ms.Tensor | np.ndarray) -> float:
    """``||actual - expected|| / ||expected||`` in float64."""
    a = np.asarray(actual.asnumpy() if isinstance(actual, ms.Tensor) else actual, dtype=np.float64)
    e = np.asarray(expected.asnumpy() if isinstance(expected, ms.Tensor) else expected, dtype=np.float64)
    return float(np.linalg.norm(a - e) / np.linalg.norm(e))


def tensor(*shape: int, seed: int = 0) -> ms.Tensor:
    return ms.Tensor(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


class One(nn.Cell):
    """A model holding one layer under ``name`` (so parameter names are ``name.*``)."""

    def __init__(self, name: str, layer: nn.Cell) -> None:
        super().__init__()
        self.layer_name = name
        setattr(self, name, layer)  # names its parameters name.weight ... (insert_child_to_cell would not)

    def construct(self, x: ms.Tensor) -> ms.Tensor:
        return getattr(self, self.layer_name)(x)


def param_names(cell: nn.Cell) -> list[str]:
    return [param.name for param in cell.get_parameters()]


def full_rank(layer: nn.Cell) -> int | list[int]:
    if isinstance(layer, nn.Dense):
        return min(layer.in_channels, layer.out_channels)
    if isinstance(layer, nn.Embedding):
        return min(layer.vocab_size, layer.embedding_size)
    return [layer.out_channels, layer.in_channels]


def decompose_full_rank(model: One, write_config) -> tuple[Decompose, nn.Cell]:
    layer = getattr(model, model.layer_name)
    decomposer = Decompose(model, config_file=write_config({model.layer_name: full_rank(layer)})).from_file()
    return decomposer, decomposer.decompose_network()


# ------------------------------------------------------------------------------------------- lowering


class Everything(nn.Cell):
    """Every supported cell, BatchNorm (statistics), a nested SequentialCell and an unsupported Conv3d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, (3, 5), stride=(2, 1), pad_mode="pad", padding=(1, 2, 0, 3), has_bias=True)
        self.bn = nn.BatchNorm2d(8)
        self.rows = nn.Conv1d(8, 6, 3, pad_mode="pad", padding=2, dilation=2)
        self.fc = nn.Dense(6, 5, activation="relu")
        self.emb = nn.Embedding(11, 6, padding_idx=2)
        self.head = nn.SequentialCell([nn.Dense(5, 3, has_bias=False), nn.ReLU()])
        self.vol = nn.Conv3d(2, 2, 1)

    def construct(self, x: ms.Tensor) -> ms.Tensor:
        return x


def test_lower_names_layouts_and_attributes() -> None:
    model = Everything()
    graph = ms_frontend.lower(model)
    nodes = {node.name: node for node in graph.nodes}
    assert list(nodes) == ["conv", "bn", "rows", "fc", "emb", "head.0", "vol"]
    conv = nodes["conv"]
    assert conv.op is Op.CONV and conv.params == {"weight": "conv.weight", "bias": "conv.bias"}
    assert conv.attrs["padding"] == (1, 0, 2, 3)  # (top, bottom, left, right) -> ONNX (begin..., end...)
    assert conv.attrs["kernel_size"] == (3, 5) and conv.attrs["stride"] == (2, 1)
    rows = nodes["rows"]
    assert rows.attrs["kernel_size"] == (3,) and rows.attrs["dilation"] == (2,) and rows.attrs["padding"] == (2,)
    assert graph.params["rows.weight"].shape == (6, 8, 3)  # MindSpore holds (6, 8, 1, 3)
    assert nodes["fc"].attrs["activation"] == "relu"
    assert nodes["emb"].op is Op.EMBEDDING and nodes["emb"].params == {"weight": "emb.embedding_table"}
    assert nodes["emb"].attrs["padding_idx"] == 2
    assert nodes["head.0"].params == {"weight": "head.0.weight"}
    assert nodes["bn"].op is Op.OPAQUE and set(nodes["bn"].params.values()) == {
        "bn.gamma", "bn.beta", "bn.moving_mean", "bn.moving_variance"}
    assert nodes["vol"].op is Op.OPAQUE  # Conv3d is carried, not decomposed
    assert set(graph.params) == set(param_names(model))  # the whole checkpoint
    assert all(not array.flags.writeable for array in graph.params.values())
    # the graph holds copies: changing the model afterwards leaves it alone
    before = graph.params["fc.weight"].copy()
    model.fc.weight.set_data(ops.zeros_like(model.fc.weight))
    assert np.array_equal(graph.params["fc.weight"], before)


@pytest.mark.parametrize(("pad_mode", "padding", "ir", "back"), [
    ("same", 0, "same", 0), ("valid", 0, "valid", 0), ("pad", 0, (0, 0), 0), ("pad", 2, (2, 2), 2),
    ("pad", (1, 1, 2, 2), (1, 2), (1, 1, 2, 2)), ("pad", (0, 1, 2, 3), (0, 2, 1, 3), (0, 1, 2, 3)),
    ("pad", (3, 3, 3, 3), (3, 3), 3),
])
def test_conv2d_padding_maps_both_ways(pad_mode: str, padding, ir, back) -> None:
    """(top, bottom, left, right) <-> the IR's per-dimension or (begin..., end...) form; pad_mode is kept."""
    assert ms_frontend.conv2d_padding(pad_mode, padding) == ir
    assert ms_backend.conv2d_padding(ir) == (pad_mode, back)


def test_paddings_mindspore_cannot_express_are_rejected() -> None:
    with pytest.raises(ValueError, match="'same_lower' has no MindSpore pad_mode"):
        ms_backend.conv2d_padding("same_lower")
    with pytest.raises(ValueError, match="neither 2 .* nor 4"):
        ms_backend.conv2d_padding((1, 2, 3))


# ------------------------------------------------------------------------------------------- full rank

CONV_CASES = {
    # id: (factory, input shape)
    "same": (lambda b: nn.Conv2d(6, 8, 3, pad_mode="same", has_bias=b), (2, 6, 9, 9)),
    "same-strided-even": (lambda b: nn.Conv2d(6, 8, 4, stride=2, pad_mode="same", has_bias=b), (2, 6, 9, 9)),
    "valid": (lambda b: nn.Conv2d(6, 8, 3, pad_mode="valid", has_bias=b), (2, 6, 9, 9)),
    "pad-1": (lambda b: nn.Conv2d(6, 8, 3, pad_mode="pad", padding=1, has_bias=b), (2, 6, 9, 9)),
    "pad-0": (lambda b: nn.Conv2d(6, 8, 3, pad_mode="pad", padding=0, has_bias=b), (2, 6, 9, 9)),
    "pad-asymmetric": (lambda b: nn.Conv2d(6, 8, 3, pad_mode="pad", padding=(0, 2, 1, 3), has_bias=b),
                       (2, 6, 9, 9)),
    "strided": (lambda b: nn.Conv2d(6, 8, 3, stride=2, pad_mode="pad", padding=1, has_bias=b), (2, 6, 11, 11)),
    "stride-2x1": (lambda b: nn.Conv2d(6, 8, 3, stride=(2, 1), pad_mode="valid", has_bias=b), (2, 6, 10, 9)),
    "dilated": (lambda b: nn.Conv2d(6, 8, 3, dilation=2, pad_mode="pad", padding=2, has_bias=b), (2, 6, 9, 9)),
    "dilated-same": (lambda b: nn.Conv2d(6, 8, 3, dilation=(2, 1), pad_mode="same", has_bias=b), (2, 6, 9, 9)),
    "3x1": (lambda b: nn.Conv2d(6, 8, (3, 1), pad_mode="pad", padding=(1, 1, 0, 0), has_bias=b), (2, 6, 9, 9)),
    "1x1": (lambda b: nn.Conv2d(6, 8, 1, has_bias=b), (2, 6, 5, 5)),
    "wide-in": (lambda b: nn.Conv2d(12, 4, 3, stride=2, pad_mode="valid", has_bias=b), (2, 12, 9, 9)),
    "conv1d-pad": (lambda b: nn.Conv1d(6, 8, 3, pad_mode="pad", padding=1, has_bias=b), (2, 6, 17)),
    "conv1d-same": (lambda b: nn.Conv1d(6, 8, 4, pad_mode="same", has_bias=b), (2, 6, 17)),
    "conv1d-same-strided": (lambda b: nn.Conv1d(6, 8, 4, stride=2, pad_mode="same", has_bias=b), (2, 6, 17)),
    "conv1d-strided-dilated": (lambda b: nn.Conv1d(6, 8, 5, stride=3, dilation=2, pad_mode="valid", has_bias=b),
                               (2, 6, 31)),
}

GEOMETRY = ("kernel_size", "stride", "pad_mode", "padding", "dilation", "group", "data_format")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("case", list(CONV_CASES), ids=list(CONV_CASES))
def test_full_rank_conv_reproduces_the_layer(case: str, bias: bool, write_config) -> None:
    factory, shape = CONV_CASES[case]
    conv = factory(bias)
    model = One("conv", conv)
    model.set_train(False)
    decomposer, decomposed = decompose_full_rank(model, write_config)
    x = tensor(*shape, seed=1)
    expected, actual = model(x), decomposed(x)
    assert actual.shape == expected.shape
    assert rel(actual, expected) < FULL_RANK_TOLERANCE
    chain = decomposed.conv
    assert isinstance(chain, nn.SequentialCell) and len(chain) == 3
    assert all(type(part) is type(conv) for part in chain)
    core = chain[1]
    for attr in GEOMETRY:  # the core keeps the layer's geometry exactly
        if hasattr(conv, attr):
            assert getattr(core, attr) == getattr(conv, attr), attr
    pointwise = (1, 1)
    assert chain[0].kernel_size == chain[2].kernel_size == pointwise
    assert chain[0].stride == chain[2].stride == pointwise
    expected_names = ["conv.0.weight", "conv.1.weight", "conv.2.weight"] + (["conv.2.bias"] if bias else [])
    assert param_names(decomposed) == expected_names
    assert decomposer.report["conv"].error < FULL_RANK_TOLERANCE


@pytest.mark.parametrize(("out_features", "in_features"), [(12, 16), (16, 12), (10, 10)])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("activation", [None, "relu", "tanh", "leaky"])
def test_full_rank_dense_reproduces_the_layer(out_features: int, in_features: int, bias: bool,
                                              activation: str | None, write_config) -> None:
    act = nn.LeakyReLU(0.3) if activation == "leaky" else activation
    model = One("fc", nn.Dense(in_features, out_features, has_bias=bias, activation=act))
    decomposer, decomposed = decompose_full_rank(model, write_config)
    x = tensor(5, 3, in_features, seed=2)  # extra leading dims go through unchanged
    assert rel(decomposed(x), model(x)) < FULL_RANK_TOLERANCE
    rank = min(in_features, out_features)
    first, last = decomposed.fc
    assert [(part.in_channels, part.out_channels) for part in (first, last)] == [(in_features, rank),
                                                                               (rank, out_features)]
    assert not first.has_bias and last.has_bias == bias
    # the activation is applied once, after the last factor, with its options
    assert not first.activation_flag and last.activation_flag == (activation is not None)
    if activation == "leaky":
        assert type(last.activation) is nn.LeakyReLU and last.activation is not model.fc.activation
        assert float(last.activation(ms.Tensor([-1.0]))[0]) == pytest.approx(-0.3)
    assert param_names(decomposed) == ["fc.0.weight", "fc.1.weight"] + (["fc.1.bias"] if bias else [])
    if bias:
        assert np.array_equal(last.bias.asnumpy(), model.fc.bias.asnumpy())


@pytest.mark.parametrize(("num", "dim", "padding_idx", "one_hot"),
                         [(20, 8, 3, False), (20, 8, None, False), (6, 10, 0, False), (20, 8, None, True)])
def test_full_rank_embedding_reproduces_the_layer(num: int, dim: int, padding_idx: int | None, one_hot: bool,
                                                  write_config) -> None:
    model = One("emb", nn.Embedding(num, dim, use_one_hot=one_hot, padding_idx=padding_idx))
    decomposer, decomposed = decompose_full_rank(model, write_config)
    ids_np = np.random.default_rng(3).integers(0, num, (4, 7)).astype(np.int32)
    if padding_idx is not None:
        ids_np[0, :] = padding_idx
    ids = ms.Tensor(ids_np)
    expected, actual = model(ids), decomposed(ids)
    assert rel(actual, expected) < FULL_RANK_TOLERANCE
    lookup, project = decomposed.emb
    assert isinstance(lookup, nn.Embedding) and isinstance(project, nn.Dense) and not project.has_bias
    assert lookup.padding_idx == padding_idx and lookup.use_one_hot == one_hot
    if padding_idx is not None:  # the padding row still looks up (numerically) zero
        assert float(np.abs(actual.asnumpy()[0]).max()) < 1e-6
    # the table keeps MindSpore's name, as the reference's decomposed Embedding does
    assert param_names(decomposed) == ["emb.0.embedding_table", "emb.1.weight"]


@pytest.mark.parametrize("group", [2, 6])
def test_grouped_conv_is_left_alone_with_the_reason(group: int) -> None:
    model = nn.SequentialCell([nn.Conv2d(6, 6, 3, group=group, has_bias=True), nn.Conv2d(6, 48, 3)])
    model.set_train(False)
    decomposer = Decompose(model).from_fixed(2, divisor=1)
    assert decomposer.decompose_config == {"1": [2, 2]}
    assert f"groups={group}" in decomposer.report["0"].reason and decomposer.report["0"].form is None
    decomposed = decomposer.decompose_network()
    assert type(decomposed[0]) is nn.Conv2d and decomposed[0].group == group
    assert np.array_equal(decomposed[0].weight.asnumpy(), model[0].weight.asnumpy())
    x = tensor(2, 6, 7, 7)
    assert np.array_equal(decomposed[0](x).asnumpy(), model[0](x).asnumpy())
    assert isinstance(decomposed[1], nn.SequentialCell)


def test_config_naming_a_grouped_conv_is_rejected(write_config) -> None:
    model = nn.SequentialCell([nn.Conv2d(6, 6, 3, group=3), nn.Conv2d(6, 8, 3)])
    decomposer = Decompose(model, config_file=write_config({"0": [2, 2]}))
    with pytest.raises(ValueError, match=r"'0'.*grouped convolution \(groups=3\)"):
        decomposer.from_file()


# ------------------------------------------------------------------------------ what the copy keeps


class Net(nn.Cell):
    """Convs with BatchNorm (moving statistics) and an MLP head, nested in a SequentialCell."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.SequentialCell([
            nn.Conv2d(3, 16, 3, pad_mode="pad", padding=1, has_bias=True), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, pad_mode="pad", padding=1), nn.ReLU()])
        self.fc = nn.Dense(32, 24, activation="relu")
        self.head = nn.Dense(24, 10)

    def construct(self, x: ms.Tensor) -> ms.Tensor:
        return self.head(self.fc(ops.mean(self.features(x), (2, 3))))


NET_FULL_CONFIG = {"features.0": [16, 3], "features.3": [32, 16], "fc": 24, "head": 10}


def make_net(seed: int = 0) -> Net:
    ms.set_seed(seed)
    model = Net()
    bn = model.features[1]
    rng = np.random.default_rng(seed)  # non-trivial statistics, so a wrong parameter would show
    bn.moving_mean.set_data(ms.Tensor(rng.uniform(-0.5, 0.5, 16).astype(np.float32)))
    bn.moving_variance.set_data(ms.Tensor(rng.uniform(0.5, 2.0, 16).astype(np.float32)))
    model.set_train(False)
    return model


@pytest.fixture
def net() -> Net:
    return make_net()


def test_decomposed_layers_in_a_sequential_cell_really_run(net) -> None:
    """A SequentialCell runs its own list of cells: the replacement must reach it, not just an attribute."""
    decomposed = Decompose(net).from_fixed(4, divisor=1).decompose_network()
    assert isinstance(decomposed.features[0], nn.SequentialCell)
    assert decomposed.features.cell_list[0] is decomposed.features[0]
    x = tensor(2, 3, 8, 8)
    assert rel(decomposed(x), net(x)) > 1e-3  # rank 4 of 16/32: the factors really are what runs


def test_named_sequential_and_cell_list_parents(write_config) -> None:
    from collections import OrderedDict

    class Lists(nn.Cell):
        def __init__(self) -> None:
            super().__init__()
            self.named = nn.SequentialCell(OrderedDict([("inner", nn.Dense(8, 8)), ("act", nn.ReLU())]))
            self.layers = nn.CellList([nn.Dense(8, 8), nn.Dense(8, 6)])

        def construct(self, x: ms.Tensor) -> ms.Tensor:
            x = self.named(x)
            for layer in self.layers:
                x = layer(x)
            return x

    model = Lists()
    config = {"named.inner": 8, "layers.0": 8, "layers.1": 6}
    decomposed = Decompose(model, config_file=write_config(config)).from_file().decompose_network()
    x = tensor(3, 8)
    assert rel(decomposed(x), model(x)) < FULL_RANK_TOLERANCE
    assert isinstance(decomposed.named.inner, nn.SequentialCell) and isinstance(decomposed.layers[1],
                                                                               nn.SequentialCell)
    assert param_names(decomposed) == ["named.inner.0.weight", "named.inner.1.weight", "named.inner.1.bias",
                                       "layers.0.0.weight", "layers.0.1.weight", "layers.0.1.bias",
                                       "layers.1.0.weight", "layers.1.1.weight", "layers.1.1.bias"]
    structure = Decompose(model).from_dict({".": 2}, divisor=1).decompose_network(do_decompose_weight=False)
    assert rel(structure(x), model(x)) > 1e-3


@pytest.mark.parametrize("mode", ["params", "to_float"])
def test_float16_stays_float16(mode: str, write_config) -> None:
    if mode == "params":
        model = One("fc", nn.Dense(16, 12, dtype=ms.float16))
    else:
        model = One("fc", nn.Dense(16, 12)).to_float(ms.float16)
    decomposer = Decompose(model, config_file=write_config({"fc": 12})).from_file()
    for weights in (True, False):
        decomposed = decomposer.decompose_network(do_decompose_weight=weights)
        expected = {"params": "Float16", "to_float": "Float32"}[mode]
        assert {str(param.dtype) for param in decomposed.get_parameters()} == {expected}
        assert {str(part.get_mixed_precision_type()) for part in decomposed.fc} == {
            str(model.fc.get_mixed_precision_type())}
        # cells not replaced keep theirs too (MindSpore's deepcopy alone would drop it)
        assert decomposed.get_mixed_precision_type() == model.get_mixed_precision_type()
    x = tensor(4, 16)
    if mode == "params":
        x = x.astype(ms.float16)
    output = decomposer.decompose_network()(x)
    assert output.dtype == model(x).dtype == ms.float16
    assert rel(output, model(x)) < 1e-2


def test_float16_conv_and_embedding(write_config) -> None:
    class Half(nn.Cell):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(6, 8, 3, dtype=ms.float16)
            self.emb = nn.Embedding(10, 6)
            self.emb.embedding_table.set_dtype(ms.float16)

        def construct(self, x: ms.Tensor) -> ms.Tensor:
            return x

    model = Half()
    config = {"conv": [8, 6], "emb": 6}
    decomposer = Decompose(model, config_file=write_config(config)).from_file()
    for weights in (True, False):
        decomposed = decomposer.decompose_network(do_decompose_weight=weights)
        assert {str(param.dtype) for param in decomposed.get_parameters()} == {"Float16"}
    decomposed = decomposer.decompose_network()
    x = tensor(2, 6, 7, 7).astype(ms.float16)
    assert rel(decomposed.conv(x), model.conv(x)) < 1e-2
    ids = ms.Tensor(np.arange(10, dtype=np.int32))
    assert rel(decomposed.emb(ids), model.emb(ids)) < 1e-2


def test_bfloat16_parameters_stay_bfloat16(write_config) -> None:
    """MindSpore's CPU kernels cannot run bfloat16 layers; the structure and the values still can be checked."""
    model = One("fc", nn.Dense(16, 12, dtype=ms.bfloat16))
    graph = ms_frontend.lower(model)
    assert graph.params["fc.weight"].dtype == np.float32 and graph.meta["dtypes"]["fc.weight"] == "BFloat16"
    decomposer = Decompose(model, config_file=write_config({"fc": 12})).from_file()
    decomposed = decomposer.decompose_network()
    assert {str(param.dtype) for param in decomposed.get_parameters()} == {"BFloat16"}
    fc = decomposed.fc
    product = fc[1].weight.astype(ms.float32).asnumpy() @ fc[0].weight.astype(ms.float32).asnumpy()
    assert rel(product, model.fc.weight.astype(ms.float32).asnumpy()) < 2e-2  # bfloat16 has 8 mantissa bits
    params = ms_backend.state_dict(graph)
    assert params["fc.weight"].dtype == ms.bfloat16


def test_duplicate_parameter_names_are_rejected() -> None:
    """``insert_child_to_cell`` does not prefix parameter names: two layers' weights are both 'weight'."""
    model = nn.Cell()
    model.insert_child_to_cell("a", nn.Dense(4, 4))
    model.insert_child_to_cell("b", nn.Dense(4, 4))
    with pytest.raises(ValueError, match="two different parameters are both named 'weight'"):
        Decompose(model).from_fixed(2, divisor=1)


def test_requires_grad_and_training_flags_are_kept(write_config) -> None:
    model = make_net()
    model.set_train(True)
    model.features[0].weight.requires_grad = False
    model.head.set_train(False)
    decomposed = Decompose(model, config_file=write_config(NET_FULL_CONFIG)).from_file().decompose_network()
    cells = dict(model.cells_and_names())
    new_cells = dict(decomposed.cells_and_names())
    for name in NET_FULL_CONFIG:
        original, chain = cells[name], new_cells[name]
        assert isinstance(chain, nn.SequentialCell)
        assert {cell.training for _, cell in chain.cells_and_names()} == {original.training}, name
        assert {p.requires_grad for p in chain.get_parameters()} == {original.weight.requires_grad}, name
    assert decomposed.training and new_cells["features.1"].training  # cells not replaced keep theirs


def test_decomposed_cell_trains(net) -> None:
    """Gradients reach the factors, and an optimizer step changes them and not the original."""
    decomposed = Decompose(net).from_ratio(0.5, divisor=4).decompose_network()
    decomposed.set_train(True)
    snap = CellSnapshot(net)
    loss_fn = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")
    optimizer = nn.SGD(decomposed.trainable_params(), learning_rate=0.1)

    def forward(x: ms.Tensor, y: ms.Tensor) -> ms.Tensor:
        return loss_fn(decomposed(x), y)

    grad_fn = ms.value_and_grad(forward, None, optimizer.parameters)
    before = decomposed.fc[0].weight.asnumpy().copy()
    _, grads = grad_fn(tensor(4, 3, 8, 8), ms.Tensor(np.array([1, 2, 3, 4], np.int32)))
    assert all(float(np.abs(grad.asnumpy()).sum()) > 0 for grad in grads)
    optimizer(grads)
    assert not np.array_equal(decomposed.fc[0].weight.asnumpy(), before)
    snap.check()


def test_model_that_is_itself_a_layer(write_config) -> None:
    model = nn.Dense(16, 12)
    decomposer = Decompose(model, config_file=write_config({"": 12})).from_file()
    decomposed = decomposer.decompose_network()
    x = tensor(3, 16)
    assert isinstance(decomposed, nn.SequentialCell)
    assert rel(decomposed(x), model(x)) < FULL_RANK_TOLERANCE
    assert param_names(decomposed) == ["0.weight", "1.weight", "1.bias"]
    assert param_names(model) == ["weight", "bias"]


# ------------------------------------------------------------------------- layers that must stay as they are


class Tied(nn.Cell):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.out = nn.Dense(16, 20, has_bias=False)
        self.out.weight = self.emb.embedding_table  # output projection tied to the input embedding
        self.shared = nn.Dense(16, 16)
        self.again = self.shared
        self.free = nn.Dense(16, 16)

    def construct(self, ids: ms.Tensor) -> ms.Tensor:
        return self.out(self.again(self.shared(self.emb(ids))))


def test_tied_and_shared_layers_are_left_alone() -> None:
    model = Tied()
    decomposer = Decompose(model).from_fixed(4, divisor=1)
    assert decomposer.decompose_config == {"free": 4}
    assert "tied to" in decomposer.report["emb"].reason and "tied to" in decomposer.report["out"].reason
    assert "shared under several names" in decomposer.report["shared"].reason


class Doubled(nn.Dense):
    def construct(self, x: ms.Tensor) -> ms.Tensor:
        return 2 * super().construct(x)


def test_layers_whose_replacement_would_change_the_model_are_left_alone() -> None:
    class Cells(nn.Cell):
        def __init__(self) -> None:
            super().__init__()
            self.custom = Doubled(16, 16)
            self.hooked = nn.Dense(16, 16)
            self.prelu = nn.Dense(16, 16, activation=nn.PReLU())
            self.plain = nn.Dense(16, 16)

        def construct(self, x: ms.Tensor) -> ms.Tensor:
            return self.plain(self.prelu(self.hooked(self.custom(x))))

    model = Cells()
    handle = model.hooked.register_forward_pre_hook(lambda cell, args: None)
    try:
        decomposer = Decompose(model).from_fixed(4, divisor=1)
    finally:
        handle.remove()
    assert decomposer.decompose_config == {"plain": 4}
    report = decomposer.report
    assert "overrides Dense.construct" in report["custom"].reason
    assert "forward hooks" in report["hooked"].reason
    assert "activation PReLU holds parameters" in report["prelu"].reason


def test_nhwc_convolutions_are_left_alone_with_the_reason(monkeypatch) -> None:
    """NHWC convs exist on GPU only; build one by making MindSpore believe it runs on a GPU."""
    import mindspore.nn.layer.conv as conv_module

    real = conv_module.context.get_context
    monkeypatch.setattr(conv_module.context, "get_context",
                        lambda key: "GPU" if key == "device_target" else real(key))
    nhwc = nn.Conv2d(6, 8, (3, 5), data_format="NHWC")
    monkeypatch.undo()
    assert tuple(nhwc.weight.shape) == (8, 3, 5, 6)
    model = nn.SequentialCell([nhwc, nn.Dense(8, 8)])
    graph = ms_frontend.lower(model)
    assert graph.params["0.weight"].shape == (8, 6, 3, 5)  # channels first in the IR
    decomposer = Decompose(model).from_fixed(2, divisor=1)
    assert decomposer.decompose_config == {"1": 2}
    assert "NHWC" in decomposer.report["0"].reason
    params = ms_backend.state_dict(graph)
    assert tuple(params["0.weight"].shape) == (8, 3, 5, 6)  # back in MindSpore's layout
    assert np.array_equal(params["0.weight"].asnumpy(), nhwc.weight.asnumpy())


# ------------------------------------------------------------------------------- checkpoints (.ckpt)


def test_structure_only_rebuild_loads_the_checkpoint(net, tmp_path, restore_umask) -> None:
    """The multi-process recipe: decompose and save on one card, rebuild the structure elsewhere, load."""
    config = tmp_path / "decompose_config.json"
    decomposer = Decompose(net, config_file=config).from_ratio(0.5, divisor=4)
    decomposed = decomposer.decompose_network()
    checkpoint = tmp_path / "decomposed.ckpt"
    os.umask(0o002)
    with SafeWriteUmask():
        ms.save_checkpoint(decomposed, str(checkpoint))
    assert stat.S_IMODE(checkpoint.stat().st_mode) & 0o022 == 0
    x = tensor(2, 3, 8, 8, seed=5)
    expected = decomposed(x).asnumpy()

    structure = Decompose(make_net(), config_file=config).from_file().decompose_network(do_decompose_weight=False)
    assert param_names(structure) == param_names(decomposed)
    assert not np.allclose(structure(x).asnumpy(), expected)  # the factors really were left at init
    not_loaded, unused = ms.load_param_into_net(structure, ms.load_checkpoint(str(checkpoint)), strict_load=True)
    assert not_loaded == [] and unused == []
    assert np.array_equal(structure(x).asnumpy(), expected)
    # the same through the backend's strict loader
    other = Decompose(make_net(), config_file=config).from_file().decompose_network(do_decompose_weight=False)
    assert ms_backend.load_checkpoint(other, checkpoint) is other
    assert np.array_equal(other(x).asnumpy(), expected)


def test_checkpoint_from_a_different_structure_is_rejected(net, tmp_path) -> None:
    half = Decompose(net).from_ratio(0.5, divisor=4).decompose_network()
    checkpoint = tmp_path / "half.ckpt"
    ms.save_checkpoint(half, str(checkpoint))
    other = Decompose(net).from_fixed(2, divisor=1).decompose_network(do_decompose_weight=False)
    snap = CellSnapshot(other)
    with pytest.raises(ValueError, match=r"does not fit this Net.*shape mismatches features\.0\.0\.weight"):
        ms_backend.load_checkpoint(other, checkpoint)
    snap.check()  # nothing was loaded
    original_checkpoint = tmp_path / "original.ckpt"
    ms.save_checkpoint(net, str(original_checkpoint))
    with pytest.raises(ValueError, match=r"missing features\.0\.0\.weight.*unexpected features\.0\.weight"):
        ms_backend.load_checkpoint(other, original_checkpoint)
    with pytest.raises(ValueError, match="does not exist"):
        ms_backend.load_checkpoint(other, tmp_path / "nothing.ckpt")
    snap.check()


def test_state_dict_of_the_graph_is_the_built_cells_checkpoint(net, tmp_path) -> None:
    graph = ms_frontend.lower(net)
    chosen = plan(graph, Policy.fixed(4, divisor=1))
    result = rewrite(graph, chosen)
    built = ms_backend.build(result.graph, like=net)
    params = ms_backend.state_dict(result.graph)
    assert sorted(params) == sorted(param_names(built))
    for param in built.get_parameters():
        assert np.array_equal(params[param.name].asnumpy(), param.asnumpy()), param.name
    ms.save_checkpoint([{"name": name, "data": param} for name, param in params.items()], str(tmp_path / "graph.ckpt"))
    structure = ms_backend.build(result.graph, like=net, weights=False)
    ms_backend.load_checkpoint(structure, tmp_path / "graph.ckpt")
    x = tensor(2, 3, 8, 8)
    assert np.array_equal(structure(x).asnumpy(), built(x).asnumpy())


def test_conv1d_state_dict_has_mindspore_layout() -> None:
    model = One("rows", nn.Conv1d(6, 8, 3, has_bias=True))
    params = ms_backend.state_dict(ms_frontend.lower(model))
    assert tuple(params["rows.weight"].shape) == (8, 6, 1, 3)
    assert np.array_equal(params["rows.weight"].asnumpy(), model.rows.weight.asnumpy())


# ------------------------------------------------------------------------- the input is never changed


def test_input_cell_is_not_mutated(write_config) -> None:
    model = make_net()
    model.set_train(True)
    snap = CellSnapshot(model)
    decomposer = Decompose(model, config_file=write_config(NET_FULL_CONFIG)).from_file()
    decomposed = decomposer.decompose_network()
    structure = decomposer.decompose_network(do_decompose_weight=False)
    snap.check()
    assert decomposed is not model and structure is not model
    assert isinstance(decomposed.fc, nn.SequentialCell) and isinstance(model.fc, nn.Dense)
    # the new cells share no memory with the old one: changing them in place leaves the original alone
    for param in [*decomposed.get_parameters(), *structure.get_parameters()]:
        param.asnumpy()[...] = 7  # asnumpy is a view of the parameter's memory on the CPU
    assert float(decomposed.fc[0].weight.asnumpy()[0, 0]) == 7.0  # (it is: the write went through)
    snap.check()


def test_input_cell_is_not_mutated_by_a_data_aware_run() -> None:
    model = make_net()
    model.set_train(True)  # BatchNorm in training mode would update its moving statistics
    snap = CellSnapshot(model)
    data = [tensor(4, 3, 8, 8, seed=seed) for seed in range(3)]
    decomposed = Decompose(model).from_ratio(0.5, divisor=4).decompose_network(datasets=data)
    snap.check()
    assert isinstance(decomposed.fc, nn.SequentialCell)


@pytest.mark.parametrize("bad_data", [
    [np.ones((2, 3, 8, 8), np.float32), np.ones((2, 5, 8, 8), np.float32)],  # fails inside, hooks registered
    [np.ones((2, 3, 8, 8), np.float32), 7],
    [],
], ids=["wrong-shape", "bad-element", "empty"])
def test_input_cell_is_not_mutated_by_a_failing_call(bad_data) -> None:
    model = make_net()
    model.set_train(True)
    snap = CellSnapshot(model)
    decomposer = Decompose(model).from_ratio(0.5, divisor=4)
    with pytest.raises((TypeError, ValueError)):
        decomposer.decompose_network(datasets=bad_data)
    snap.check()


# ------------------------------------------------------------------------------------- bad input


@pytest.fixture
def config_path(tmp_path):
    return tmp_path / "decompose_config.json"


FROM_CASES = {
    "ratio-high": (lambda d: d.from_ratio(1.5), ValueError, "ratio must be a float strictly between 0 and 1"),
    "ratio-type": (lambda d: d.from_ratio("half"), ValueError, "ratio must be a float strictly between"),
    "fixed-zero": (lambda d: d.from_fixed(0), ValueError, "fixed rank must be an int > 0"),
    "divisor-zero": (lambda d: d.from_ratio(0.5, divisor=0), ValueError, "divisor must be an int > 0"),
    "excludes-str": (lambda d: d.from_ratio(0.5, excludes="fc"), ValueError, "excludes must be a list or tuple"),
    "dict-empty": (lambda d: d.from_dict({}), ValueError, "from_dict takes a non-empty dict"),
    "dict-bad-rank": (lambda d: d.from_dict({"fc": -3}), ValueError, "rank must be an int > 0"),
    "dict-bad-regex": (lambda d: d.from_dict({"(": 4}), ValueError, "not a valid regular expression"),
    "vbmf-divisor": (lambda d: d.from_vbmf(divisor=-1), ValueError, "divisor"),
}


@pytest.mark.parametrize("case", list(FROM_CASES), ids=list(FROM_CASES))
def test_from_methods_validate(case: str, net, config_path) -> None:
    call, error, message = FROM_CASES[case]
    snap = CellSnapshot(net)
    decomposer = Decompose(net, config_file=config_path)
    with pytest.raises(error, match=message):
        call(decomposer)
    assert decomposer.decompose_config is None and not config_path.exists()
    snap.check()


def test_every_from_method_works_for_a_cell(net, config_path) -> None:
    decomposer = Decompose(net, config_file=config_path)
    configs = {
        "ratio": decomposer.from_ratio(0.5, divisor=4).decompose_config,
        "fixed": decomposer.from_fixed(4, excludes=["head"], divisor=4).decompose_config,
        "dict": decomposer.from_dict({r"^features": 0.5, "fc": 8}, divisor=4).decompose_config,
        "vbmf": decomposer.from_vbmf(divisor=1).decompose_config,
    }
    assert configs["fixed"] == {"features.0": [4, 3], "features.3": [4, 4], "fc": 4}  # capped at 3 inputs
    assert configs["dict"]["fc"] == 8 and "head" not in configs["dict"]
    assert all(configs.values())
    saved = json.loads(config_path.read_text())
    assert saved == configs["vbmf"]  # the last from_* call wrote the file
    restored = Decompose(net, config_file=config_path).from_file()
    assert restored.decompose_config == saved
    assert restored.report is not None and restored.report.table()


@pytest.mark.parametrize(("config", "message"), [
    ({"nope": 4}, "names layers the model does not have"),
    ({"fc": 999}, "above its largest possible rank"),
    ({"features.0": "x"}, r"\['features.0'\] must be an int rank > 0 or \[out rank, in rank\]"),
])
def test_config_that_does_not_fit_the_cell(config, message, net, write_config) -> None:
    snap = CellSnapshot(net)
    with pytest.raises(ValueError, match=message):
        Decompose(net, config_file=write_config(config)).from_file()
    snap.check()


def test_from_file_and_config_file_checks(net, config_path, tmp_path) -> None:
    with pytest.raises(ValueError, match="from_file needs"):
        Decompose(net).from_file()
    with pytest.raises(ValueError, match="does not exist"):
        Decompose(net, config_file=config_path).from_file()
    with pytest.raises(ValueError, match="must be a path ending in '.json'"):
        Decompose(net, config_file=tmp_path / "config.txt")
    config_path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Decompose(net, config_file=config_path).from_file()


def test_decompose_network_argument_checks(net) -> None:
    with pytest.raises(ValueError, match="no decompose_config yet"):
        Decompose(net).decompose_network()
    decomposer = Decompose(net).from_ratio(0.5, divisor=4)
    with pytest.raises(TypeError, match="do_decompose_weight must be a bool"):
        decomposer.decompose_network(do_decompose_weight=1)
    for bad, error in ((0, ValueError), (-2, ValueError), (1.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match="max_iter"):
            decomposer.decompose_network(datasets=[tensor(2, 3, 8, 8)], max_iter=bad)


class NoLayers(nn.Cell):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.depthwise = nn.Conv2d(3, 3, 3, group=3)

    def construct(self, x: ms.Tensor) -> ms.Tensor:
        return self.depthwise(self.bn(x))


@pytest.mark.parametrize("model", [NoLayers, nn.ReLU, lambda: nn.Dense(2, 2)], ids=["bn+depthwise", "relu", "tiny"])
def test_cell_with_nothing_to_decompose(model, config_path) -> None:
    cell = model()
    snap = CellSnapshot(cell)
    with pytest.raises(ValueError, match="no layer of this .* would be decomposed"):
        Decompose(cell, config_file=config_path).from_ratio(0.5)
    assert not config_path.exists()
    snap.check()


def test_nan_weights_are_rejected(net) -> None:
    weight = net.fc.weight.asnumpy().copy()
    weight[0, 0] = np.nan
    net.fc.weight.set_data(ms.Tensor(weight))
    snap = CellSnapshot(net)
    with pytest.raises(ValueError, match=r"layer 'fc'.*NaN or Inf"):
        Decompose(net).from_ratio(0.5, divisor=4)
    snap.check()


# ------------------------------------------------------------------------------- calibration data


class TwoInputs(nn.Cell):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Dense(32, 24)
        self.gate = nn.Dense(8, 24)

    def construct(self, x: ms.Tensor, scale: ms.Tensor | None = None) -> ms.Tensor:
        out = self.fc(x)
        return out if scale is None else out * ops.sigmoid(self.gate(scale))


def mixing(size: int, rng: np.random.Generator) -> np.ndarray:
    """A mixing matrix with a steep spectrum: inputs through it are strongly correlated."""
    q, _ = np.linalg.qr(rng.standard_normal((size, size)))
    return (q * np.geomspace(1.0, 1e-3, size)).astype(np.float32) @ q.T.astype(np.float32)


def test_dataset_elements_tensor_array_tuple_list_dict_are_equivalent() -> None:
    model = TwoInputs()
    rng = np.random.default_rng(3)
    mix = mixing(32, rng)
    xs = [(rng.standard_normal((8, 32)).astype(np.float32) @ mix) for _ in range(3)]
    decomposer = Decompose(model).from_dict({"fc": 6}, divisor=1)
    variants = {
        "tensor": [ms.Tensor(x) for x in xs],
        "numpy": xs,
        "tuple": [(ms.Tensor(x),) for x in xs],
        "list": [[x] for x in xs],
        "dict": [{"x": ms.Tensor(x)} for x in xs],
    }
    probe = tensor(5, 32)
    outputs = {kind: decomposer.decompose_network(datasets=data)(probe).asnumpy() for kind, data in variants.items()}
    assert not np.allclose(decomposer.decompose_network()(probe).asnumpy(), outputs["tensor"])
    for kind, output in outputs.items():
        assert np.array_equal(output, outputs["tensor"]), kind
    both = [{"x": ms.Tensor(x), "scale": tensor(8, 8)} for x in xs]  # keyword arguments reach the model
    assert np.array_equal(decomposer.decompose_network(datasets=both)(probe).asnumpy(), outputs["tensor"])


@pytest.mark.parametrize(("element", "type_name"), [(3, "int"), ("abc", "str"), (None, "NoneType"),
                                                     ({1, 2}, "set")])
def test_bad_dataset_element_type(element, type_name, net) -> None:
    decomposer = Decompose(net).from_ratio(0.5, divisor=8)
    snap = CellSnapshot(net)
    with pytest.raises(TypeError, match=rf"datasets element 1 is a {type_name}; each element must be a dict"):
        decomposer.decompose_network(datasets=[tensor(2, 3, 8, 8), element])
    snap.check()


@pytest.mark.parametrize("datasets", [3, "abc"])
def test_datasets_must_be_iterable(datasets, net) -> None:
    with pytest.raises(TypeError, match="datasets must be an iterable of model inputs"):
        Decompose(net).from_ratio(0.5, divisor=8).decompose_network(datasets=datasets)


@pytest.mark.parametrize("datasets", [[], (), iter([])], ids=["list", "tuple", "iterator"])
def test_empty_dataset(datasets, net) -> None:
    with pytest.raises(ValueError, match="datasets is empty"):
        Decompose(net).from_ratio(0.5, divisor=8).decompose_network(datasets=datasets)


@pytest.mark.parametrize(("shape", "index"), [((2, 4, 8, 8), 2), ((2, 3), 1)])
def test_dataset_element_that_does_not_fit(shape, index, net) -> None:
    data = [tensor(2, 3, 8, 8) for _ in range(index)] + [tensor(*shape)]
    decomposer = Decompose(net).from_ratio(0.5, divisor=8)
    snap = CellSnapshot(net)
    with pytest.raises(ValueError, match=rf"datasets element {index} does not fit the model"):
        decomposer.decompose_network(datasets=data)
    snap.check()


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_activations_are_rejected(bad: float) -> None:
    model = TwoInputs()
    x = tensor(4, 32).asnumpy()
    x[1, 3] = bad
    snap = CellSnapshot(model)
    with pytest.raises(ValueError, match=r"input of layer 'fc' holds NaN or Inf"):
        Decompose(model).from_dict({"fc": 6}, divisor=1).decompose_network(datasets=[tensor(4, 32), x])
    snap.check()


def test_max_iter_limits_the_elements_drawn() -> None:
    model = TwoInputs()
    drawn = []

    def stream():
        for index in range(10):
            drawn.append(index)
            yield tensor(4, 32, seed=index)

    decomposer = Decompose(model).from_dict({"fc": 6}, divisor=1)
    decomposer.decompose_network(datasets=stream(), max_iter=3)
    assert drawn == [0, 1, 2]
    stats = ms_frontend.collect_stats(model, ms_frontend.lower(model), [tensor(4, 32), tensor(6, 32)], max_iter=1)
    assert stats["fc"].count == 4 and set(stats) == {"fc"}  # gate saw no data: no scale was given


def test_statistics_are_the_input_second_moment() -> None:
    model = nn.SequentialCell([nn.Conv1d(3, 4, 3, pad_mode="same"), nn.ReLU(), nn.Conv2d(4, 2, 1)])
    x = tensor(2, 3, 5, seed=4)

    class Wrap(nn.Cell):
        def __init__(self) -> None:
            super().__init__()
            self.conv = model[0]
            self.dense = nn.Dense(5, 2)

        def construct(self, x: ms.Tensor) -> ms.Tensor:
            return self.dense(self.conv(x))

    wrap = Wrap()
    stats = ms_frontend.collect_stats(wrap, ms_frontend.lower(wrap), [x])
    rows = np.moveaxis(x.asnumpy(), 1, -1).reshape(-1, 3).astype(np.float64)
    assert stats["conv"].count == 10
    np.testing.assert_allclose(stats["conv"].moment, rows.T @ rows / 10, rtol=1e-12)
    hidden = wrap.conv(x).asnumpy().reshape(-1, 5).astype(np.float64)
    np.testing.assert_allclose(stats["dense"].moment, hidden.T @ hidden / 8, rtol=1e-6)


def test_statistics_run_in_pynative_mode_and_restore_graph_mode() -> None:
    model = TwoInputs()
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        stats = ms_frontend.collect_stats(model, ms_frontend.lower(model), [tensor(4, 32)])
        assert ms.get_context("mode") == ms.GRAPH_MODE
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    assert stats["fc"].count == 4


class LinearModel(nn.Cell):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Dense(32, 24)

    def construct(self, x: ms.Tensor) -> ms.Tensor:
        return self.fc(x)


class ConvModel(nn.Cell):
    def __init__(self, kernel: int, one_d: bool = False) -> None:
        super().__init__()
        conv = nn.Conv1d if one_d else nn.Conv2d
        self.conv = conv(16, 16, kernel, pad_mode="same", has_bias=True)

    def construct(self, x: ms.Tensor) -> ms.Tensor:
        return self.conv(x)


@pytest.mark.parametrize("case", ["dense", "conv1x1", "conv3x3", "conv1d"])
def test_data_aware_beats_data_free_on_correlated_inputs(case: str) -> None:
    rng = np.random.default_rng(7)
    if case == "dense":
        model: nn.Cell = LinearModel()
        mix = mixing(32, rng)

        def sample(count: int) -> ms.Tensor:
            return ms.Tensor(rng.standard_normal((count, 32)).astype(np.float32) @ mix)
        rank = 6
    else:
        model = ConvModel(1 if case == "conv1x1" else 3, one_d=case == "conv1d")
        mix = mixing(16, rng)
        spatial = (8,) if case == "conv1d" else (8, 8)

        def sample(count: int) -> ms.Tensor:
            noise = rng.standard_normal((count, 16, *spatial)).astype(np.float32)
            return ms.Tensor(np.einsum("nc...,cd->nd...", noise, mix).astype(np.float32))
        rank = 4
    calibration = [sample(16) for _ in range(4)]
    held_out = sample(64)  # same distribution, not seen during calibration
    decomposer = Decompose(model).from_fixed(rank, divisor=1)
    data_free = decomposer.decompose_network()
    data_aware = decomposer.decompose_network(datasets=calibration)
    assert {layer.error_kind for layer in decomposer.report if layer.form} == {"output"}
    expected = model(held_out)
    free_error, aware_error = rel(data_free(held_out), expected), rel(data_aware(held_out), expected)
    assert aware_error < 0.8 * free_error, (aware_error, free_error)


# ------------------------------------------------------------------------------------- counting


def test_count_parameters_counts_weights_not_moving_statistics(net) -> None:
    weights = sum(int(np.prod(p.shape)) for p in net.get_parameters() if "moving" not in p.name)
    assert count_parameters(net) == weights == ms_frontend.count_parameters(net)
    net.fc.weight.requires_grad = False  # frozen weights are parameters, as PyTorch counts them
    assert count_parameters(net) == weights
    assert count_parameters(Tied()) == 20 * 16 + 16 * 16 + 16 + 16 * 16 + 16  # tied and shared once


def test_output_errors_and_measured_budget() -> None:
    rng = np.random.default_rng(5)
    model = LinearModel()
    before = {param.name: param.asnumpy().copy() for param in model.get_parameters()}
    mix = mixing(32, rng)
    batches = [ms.Tensor(rng.standard_normal((16, 32)).astype(np.float32) @ mix) for _ in range(3)]
    weight = model.fc.weight.asnumpy()
    errors = ms_frontend.output_errors(model, batches, [{}, {"fc.weight": np.zeros_like(weight)},
                                                        {"fc.weight": 0.5 * weight}], max_iter=2)
    assert errors[0] == 0.0 and errors[1] > errors[2] > 0.0
    outputs = np.concatenate([model(batch).asnumpy() for batch in batches[:2]]).astype(np.float64)
    bias = model.fc.bias.asnumpy().astype(np.float64)  # a zero weight leaves only the bias
    assert errors[1] == pytest.approx(float(((outputs - bias) ** 2).sum() / (outputs ** 2).sum()), rel=1e-5)
    for param in model.get_parameters():
        np.testing.assert_array_equal(param.asnumpy(), before[param.name])
    with pytest.raises(ValueError, match="no parameter named 'nope'"):
        ms_frontend.output_errors(model, batches, [{"nope": np.zeros(2)}])
    decomposer = Decompose(model).from_budget(params=0.5, datasets=batches)
    assert set(decomposer.sensitivities) == {"fc"}


def test_copy_leaves_out_the_layers_to_be_replaced_but_not_a_cell_also_kept_elsewhere() -> None:
    # The backend replaces the factorized layers in its copy: copying their weights first only to drop them
    # would cost the model's size again. A cell also held at a path that stays is copied all the same.
    shared = nn.Dense(6, 6)

    class Two(nn.Cell):
        def __init__(self) -> None:
            super().__init__()
            self.big = nn.Dense(8, 6)
            self.tied = shared
            self.again = shared
            self.head = nn.Dense(6, 2)

        def construct(self, x: ms.Tensor) -> ms.Tensor:
            return self.head(self.again(self.tied(self.big(x))))

    model = Two()
    copied = ms_frontend.copy_model(model, leave_out=["big", "tied"])
    assert type(copied.big) is nn.Cell and not list(copied.big.get_parameters())  # an empty place-holder
    assert isinstance(copied.tied, nn.Dense) and copied.tied is not shared  # "again" holds it: copied
    assert copied.head is not model.head
    np.testing.assert_array_equal(copied.head.weight.asnumpy(), model.head.weight.asnumpy())
    assert isinstance(model.big, nn.Dense)  # the user's model is untouched
