"""The ``Decompose`` facade: validation, config files, the multi-process recipe, data-aware decomposition,
the report, ``count_parameters`` and ``set_logger_level``.

Every bad input must raise a ``ValueError``/``TypeError`` naming the problem, leave the model as it was
and write nothing.
"""

from __future__ import annotations

import json
import logging
import os
import stat

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

import frontends.torch as torch_frontend  # noqa: E402
from lowrank_ir import Decompose, SafeWriteUmask, count_parameters, set_logger_level  # noqa: E402


class Net(nn.Module):
    """Convs with BatchNorm (buffers) and an MLP head: every layer type of the reference's ResNet flow."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 48, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(48)
        self.fc = nn.Linear(48, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(torch.relu(self.fc(x.mean(dim=(2, 3)))))


def make_net() -> Net:
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so a wrong buffer would show
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture
def net() -> Net:
    return make_net()


@pytest.fixture
def config_path(tmp_path):
    return tmp_path / "decompose_config.json"


# ------------------------------------------------------------------------------------------ validation

BAD_CALLS = {
    # id: (method, args, kwargs, exception, message regex)
    "ratio-0": ("from_ratio", (0.0,), {}, ValueError, r"ratio must be a float strictly between 0 and 1.*0\.0"),
    "ratio-0-int": ("from_ratio", (0,), {}, ValueError, r"ratio must be a float.*got 0$"),
    "ratio-1": ("from_ratio", (1.0,), {}, ValueError, r"ratio must be a float strictly.*1\.0"),
    "ratio-1.5": ("from_ratio", (1.5,), {}, ValueError, r"ratio must be a float strictly.*1\.5"),
    "ratio-str": ("from_ratio", ("0.5",), {}, ValueError, r"ratio must be a float.*'0\.5'"),
    "ratio-bool": ("from_ratio", (True,), {}, ValueError, r"ratio must be a float.*True"),
    "ratio-int-2": ("from_ratio", (2,), {}, ValueError, r"ratio must be a float.*got 2$"),
    "fixed-0": ("from_fixed", (0,), {}, ValueError, r"fixed rank must be an int > 0.*got 0$"),
    "fixed-neg": ("from_fixed", (-1,), {}, ValueError, r"fixed rank must be an int > 0.*-1"),
    "fixed-float": ("from_fixed", (2.5,), {}, ValueError, r"fixed rank must be an int > 0.*2\.5"),
    "fixed-bool": ("from_fixed", (True,), {}, ValueError, r"fixed rank must be an int > 0.*True"),
    "dict-empty": ("from_dict", ({},), {}, ValueError, r"non-empty dict.*\{\}"),
    "dict-list": ("from_dict", ([("fc", 4)],), {}, ValueError, r"non-empty dict.*\[\('fc', 4\)\]"),
    "dict-str": ("from_dict", ("fc",), {}, ValueError, r"non-empty dict.*'fc'"),
    "dict-bad-regex": ("from_dict", ({"(": 4},), {}, ValueError, r"key '\(' is not a valid regular expression"),
    "dict-key-int": ("from_dict", ({3: 4},), {}, ValueError, r"keys must be regular-expression strings, got 3"),
    "dict-value-svd": ("from_dict", ({"fc": "svd"},), {}, ValueError, r"from_dict\['fc'\].*'vbmf'.*'svd'"),
    "dict-value-0": ("from_dict", ({"fc": 0},), {}, ValueError,
                     r"from_dict\['fc'\]: fixed rank must be an int > 0.*got 0 \(to leave layers alone, name them in "
                     r"excludes\)$"),
    "dict-value-1.5": ("from_dict", ({"fc": 1.5},), {}, ValueError, r"ratio must be a float.*1\.5"),
    "dict-value-none": ("from_dict", ({"fc": None},), {}, ValueError, r"from_dict\['fc'\].*got None"),
    "dict-value-bool": ("from_dict", ({"fc": True},), {}, ValueError, r"from_dict\['fc'\].*got True"),
    "excludes-str": ("from_ratio", (0.5,), {"excludes": "fc"}, ValueError, r"excludes must be a list or tuple.*'fc'"),
    "excludes-set": ("from_fixed", (8,), {"excludes": {"fc"}}, ValueError, r"excludes must be a list or tuple.*set"),
    "excludes-int-item": ("from_ratio", (0.5,), {"excludes": ["fc", 3]}, ValueError,
                          r"excludes must hold layer names \(str\).*\[3\]"),
    "excludes-none-item": ("from_vbmf", (), {"excludes": (None,)}, ValueError, r"excludes must hold layer names.*None"),
    "divisor-0": ("from_ratio", (0.5,), {"divisor": 0}, ValueError, r"divisor must be an int > 0.*got 0$"),
    "divisor-float": ("from_fixed", (8,), {"divisor": 1.5}, ValueError, r"divisor must be an int > 0.*1\.5"),
    "divisor-bool": ("from_dict", ({"fc": 8},), {"divisor": True}, ValueError, r"divisor must be an int > 0.*True"),
    "divisor-neg": ("from_vbmf", (), {"divisor": -64}, ValueError, r"divisor must be an int > 0.*-64"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS), ids=list(BAD_CALLS))
def test_from_methods_validate(case: str, net, config_path, snapshot) -> None:
    method, args, kwargs, error, message = BAD_CALLS[case]
    snap = snapshot(net)
    decomposer = Decompose(net, config_file=config_path)
    with pytest.raises(error, match=message):
        getattr(decomposer, method)(*args, **kwargs)
    assert decomposer.decompose_config is None
    assert not config_path.exists()
    assert list(config_path.parent.iterdir()) == []  # no temporary file left either
    snap.check()


def test_failing_from_call_keeps_the_earlier_config(net, config_path, snapshot) -> None:
    decomposer = Decompose(net, config_file=config_path).from_fixed(8, divisor=1)
    saved, text = dict(decomposer.decompose_config), config_path.read_text()
    snap = snapshot(net)
    with pytest.raises(ValueError, match="ratio must be a float"):
        decomposer.from_ratio(1.5)
    assert decomposer.decompose_config == saved
    assert config_path.read_text() == text
    snap.check()


@pytest.mark.parametrize("config_file", ["config.yaml", "config.json.bak", "config", 42, b"config.json"])
def test_config_file_must_be_a_json_path(config_file, net) -> None:
    with pytest.raises(ValueError, match=r"config_file must be a path ending in '\.json'"):
        Decompose(net, config_file=config_file)


def test_from_file_needs_a_config_file(net) -> None:
    with pytest.raises(ValueError, match=r"from_file needs Decompose\(model, config_file="):
        Decompose(net).from_file()


def test_from_file_with_a_missing_file(net, config_path) -> None:
    decomposer = Decompose(net, config_file=config_path)
    with pytest.raises(ValueError, match=r"decompose_config\.json' does not exist"):
        decomposer.from_file()
    assert decomposer.decompose_config is None and not config_path.exists()


@pytest.mark.parametrize(("content", "message"), [
    (b"\x00\xff\xfe garbage", "is not valid JSON"),
    (b"{not json", "is not valid JSON"),
    (b"", "is not valid JSON"),
    (b"[1, 2]", r"must be a non-empty JSON object.*\[1, 2\]"),
    (b"{}", r"must be a non-empty JSON object"),
    (b'{"fc": "eight"}', r"\['fc'\] must be an int rank > 0 or \[out rank, in rank\], got 'eight'"),
    (b'{"fc": 0}', r"\['fc'\] must be an int rank > 0"),
    (b'{"conv1": [8, 8, 8]}', r"\['conv1'\] must be an int rank > 0 or \[out rank, in rank\]"),
    (b'{"conv1": [8.5, 8]}', r"\['conv1'\] must be an int rank > 0 or \[out rank, in rank\]"),
    (b'{"fc": true}', r"\['fc'\] must be an int rank > 0"),
], ids=["binary", "truncated", "empty-file", "list", "empty-object", "str-rank", "zero-rank", "three-ranks",
        "float-rank", "bool-rank"])
def test_from_file_with_a_bad_file(content: bytes, message: str, net, config_path, snapshot) -> None:
    config_path.write_bytes(content)
    snap = snapshot(net)
    decomposer = Decompose(net, config_file=config_path)
    with pytest.raises(ValueError, match=message):
        decomposer.from_file()
    assert decomposer.decompose_config is None
    assert config_path.read_bytes() == content  # from_file never writes
    snap.check()


@pytest.mark.parametrize(("config", "message"), [
    ({"fc": 8, "nope": 4}, r"names layers the model does not have.*\['nope'\]"),
    ({"layer1.0.conv1": [8, 8]}, r"names layers the model does not have.*'layer1\.0\.conv1'"),
    ({"bn1": 8}, r"names layers the model does not have.*\['bn1'\]"),
    ({"fc": 49}, r"'fc'.*rank 49, above its largest possible rank \[48\]"),
    ({"conv2": [48, 33]}, r"'conv2'.*above its largest possible rank \[48, 32\]"),
    ({"conv2": [49, 8]}, r"'conv2'.*above its largest possible rank \[48, 32\]"),
    ({"fc": [8, 8]}, r"'fc'.*takes one int rank"),
], ids=["unknown", "resnet-name", "not-a-layer", "linear-rank-too-big", "conv-in-rank-too-big",
        "conv-out-rank-too-big", "linear-two-ranks"])
def test_config_that_does_not_fit_the_model(config, message, net, write_config, snapshot) -> None:
    snap = snapshot(net)
    decomposer = Decompose(net, config_file=write_config(config))
    with pytest.raises(ValueError, match=message):
        decomposer.from_file()
    assert decomposer.decompose_config is None
    snap.check()


def test_decompose_network_before_any_from(net) -> None:
    with pytest.raises(ValueError, match="no decompose_config yet: call from_ratio"):
        Decompose(net).decompose_network()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("layer", ["fc", "conv2"])
def test_nan_or_inf_weights_are_rejected(bad: float, layer: str, config_path, snapshot) -> None:
    model = make_net()
    with torch.no_grad():
        model.get_submodule(layer).weight.view(-1)[3] = bad
    snap = snapshot(model)
    decomposer = Decompose(model, config_file=config_path)
    with pytest.raises(ValueError, match=rf"layer '{layer}'.*holds 1 NaN or Inf values"):
        decomposer.from_ratio(0.5, divisor=8)
    assert decomposer.decompose_config is None and not config_path.exists()
    snap.check()


def test_nan_weights_in_an_excluded_layer_are_fine() -> None:
    model = make_net()
    with torch.no_grad():
        model.fc.weight[0, 0] = float("nan")
    decomposer = Decompose(model).from_ratio(0.5, excludes=["fc"], divisor=8)
    assert "fc" not in decomposer.decompose_config and decomposer.decompose_config


def test_nan_weights_after_from_are_caught_by_decompose_network(net, snapshot) -> None:
    decomposer = Decompose(net).from_ratio(0.5, divisor=8)
    with torch.no_grad():
        net.fc.weight[1, 1] = float("nan")
    snap = snapshot(net)
    with pytest.raises(ValueError, match=r"layer 'fc'.*NaN or Inf"):
        decomposer.decompose_network()
    snap.check()


@pytest.mark.parametrize("value", [1, 0, "yes", None, 1.0])
def test_do_decompose_weight_must_be_bool(value, net) -> None:
    decomposer = Decompose(net).from_ratio(0.5, divisor=8)
    with pytest.raises(TypeError, match=rf"do_decompose_weight must be a bool, got {value!r}"):
        decomposer.decompose_network(do_decompose_weight=value)


@pytest.mark.parametrize(("value", "error"), [
    (0, ValueError), (-2, ValueError), ("3", TypeError), (True, TypeError), (1.0, TypeError), (None, TypeError),
])
def test_max_iter_is_checked(value, error, net) -> None:
    decomposer = Decompose(net).from_ratio(0.5, divisor=8)
    with pytest.raises(error, match=rf"max_iter must be .*got {value!r}"):
        decomposer.decompose_network(datasets=[torch.randn(1, 3, 8, 8)], max_iter=value)


@pytest.mark.parametrize("model", [{"conv": 1}, "model.pt", 3, None, nn.Linear], ids=["dict", "str", "int", "none",
                                                                                     "class-not-instance"])
def test_unsupported_model_type(model) -> None:
    with pytest.raises(TypeError, match=r"expected a model of a supported framework.*torch\.nn\.Module"):
        Decompose(model)
    with pytest.raises(TypeError, match=r"supported framework"):
        count_parameters(model)


@pytest.mark.parametrize("model", [
    nn.Sequential(nn.ReLU(), nn.BatchNorm1d(4)),
    nn.Sequential(nn.Conv2d(8, 8, 3, groups=8)),
    nn.Sequential(nn.Linear(2, 1)),  # too small to save parameters at any rank
    nn.Sequential(),
], ids=["no-layers", "depthwise-only", "too-small", "empty"])
def test_model_with_nothing_to_decompose(model, config_path, snapshot) -> None:
    snap = snapshot(model)
    decomposer = Decompose(model, config_file=config_path)
    with pytest.raises(ValueError, match=r"no layer of this Sequential would be decomposed"):
        decomposer.from_ratio(0.5, divisor=1)
    assert not config_path.exists()
    snap.check()


# ------------------------------------------------------------------------------------------ config file

def test_config_file_is_written_safely_and_exactly(net, config_path, restore_umask) -> None:
    os.umask(0)  # even a permissive umask must not make the config group/other-writable
    decomposer = Decompose(net, config_file=config_path).from_ratio(0.5, divisor=8)
    mode = stat.S_IMODE(config_path.stat().st_mode)
    assert mode & 0o022 == 0, oct(mode)
    assert json.loads(config_path.read_text()) == decomposer.decompose_config
    assert type(decomposer.decompose_config) is dict
    assert all(type(rank) is int or (type(rank) is list and {type(r) for r in rank} == {int})
               for rank in decomposer.decompose_config.values())
    # overwriting a world-writable file replaces it with a safe one
    config_path.chmod(0o666)
    Decompose(net, config_file=str(config_path)).from_fixed(8, divisor=1)
    assert stat.S_IMODE(config_path.stat().st_mode) & 0o022 == 0
    assert json.loads(config_path.read_text()) == Decompose(net).from_fixed(8, divisor=1).decompose_config
    assert sorted(path.name for path in config_path.parent.iterdir()) == [config_path.name]


def test_config_file_round_trip_through_from_file(net, config_path) -> None:
    first = Decompose(net, config_file=config_path).from_dict({"conv": 0.4, "fc": 16}, divisor=4)
    restored = Decompose(net, config_file=config_path).from_file()
    assert restored.decompose_config == first.decompose_config
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(first.decompose_network()(x), restored.decompose_network()(x))


# ------------------------------------------------------------------------------- multi-process recipe

def test_multi_process_recipe(net, config_path, tmp_path, restore_umask) -> None:
    """Decompose on one process, save; rebuild the structure elsewhere, load: identical outputs."""
    decomposer = Decompose(net, config_file=config_path).from_ratio(0.5, divisor=8)
    assert set(decomposer.decompose_config) == {"conv1", "conv2", "fc", "head"}
    decomposed = decomposer.decompose_network().eval()
    checkpoint = tmp_path / "decomposed.pt"
    os.umask(0)
    with SafeWriteUmask():
        torch.save(decomposed.state_dict(), checkpoint)
    assert os.umask(0) == 0  # SafeWriteUmask put the permissive umask back
    assert stat.S_IMODE(checkpoint.stat().st_mode) & 0o022 == 0
    state = torch.load(checkpoint, weights_only=True)

    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        expected = decomposed(x)
    same_process = decomposer.decompose_network(do_decompose_weight=False)
    other_process = Decompose(make_net(), config_file=config_path).from_file().decompose_network(
        do_decompose_weight=False)
    for structure in (same_process, other_process):
        assert list(structure.state_dict()) == list(state)
        structure.eval()
        with torch.no_grad():
            assert not torch.allclose(structure(x), expected)  # the factors really were left at init
        structure.load_state_dict(state, strict=True)
        with torch.no_grad():
            assert torch.equal(structure(x), expected)


def test_structure_only_does_no_decomposition_work(net) -> None:
    decomposer = Decompose(net).from_ratio(0.5, divisor=8)
    structure = decomposer.decompose_network(do_decompose_weight=False)
    assert all(layer.error is None for layer in decomposer.report)
    assert all(torch.isfinite(p).all() for p in structure.parameters())
    decomposed = decomposer.decompose_network()
    assert {name: p.shape for name, p in structure.state_dict().items()} == {
        name: p.shape for name, p in decomposed.state_dict().items()}


# --------------------------------------------------------------------------------------- data-aware

def mixing(size: int, generator: torch.Generator) -> torch.Tensor:
    """A random ill-conditioned mixing matrix: singular values from 1 down to 1e-3."""
    q1, _ = torch.linalg.qr(torch.randn(size, size, generator=generator))
    q2, _ = torch.linalg.qr(torch.randn(size, size, generator=generator))
    return q1 @ torch.diag(torch.logspace(0, -3, size)) @ q2


class LinearModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(32, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class ConvModel(nn.Module):
    def __init__(self, kernel: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(16, 16, kernel, padding=kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@pytest.mark.parametrize("case", ["linear", "conv1x1", "conv3x3"])
def test_data_aware_beats_data_free_on_correlated_inputs(case: str, rel_err) -> None:
    generator = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    if case == "linear":
        model: nn.Module = LinearModel().eval()
        mix = mixing(32, generator)

        def sample(count: int) -> torch.Tensor:
            return torch.randn(count, 32, generator=generator) @ mix
        rank = 6
    else:
        model = ConvModel(1 if case == "conv1x1" else 3).eval()
        mix = mixing(16, generator)

        def sample(count: int) -> torch.Tensor:
            return torch.einsum("nchw,cd->ndhw", torch.randn(count, 16, 8, 8, generator=generator), mix)
        rank = 4
    calibration = [sample(16) for _ in range(4)]
    held_out = sample(64)  # same distribution, not seen during calibration
    decomposer = Decompose(model).from_fixed(rank, divisor=1)
    data_free = decomposer.decompose_network()
    data_aware = decomposer.decompose_network(datasets=calibration)
    assert {layer.error_kind for layer in decomposer.report if layer.form} == {"output"}
    with torch.no_grad():
        expected = model(held_out)
        free_error, aware_error = rel_err(data_free(held_out), expected), rel_err(data_aware(held_out), expected)
    assert aware_error < 0.8 * free_error, (aware_error, free_error)


def test_data_aware_on_uncorrelated_inputs_is_close_to_data_free(rel_err) -> None:
    """With white inputs the output-optimal factors are the SVD ones: both paths agree."""
    model = LinearModel().eval()
    x = torch.randn(4096, 32)
    decomposer = Decompose(model).from_fixed(6, divisor=1)
    free, aware = decomposer.decompose_network(), decomposer.decompose_network(datasets=[x])
    with torch.no_grad():
        free_error, aware_error = rel_err(free(x), model(x)), rel_err(aware(x), model(x))
    assert aware_error <= free_error + 1e-6  # optimal on the calibration data itself
    assert aware_error == pytest.approx(free_error, rel=0.1)


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(32, 24)
        self.gate = nn.Linear(8, 24)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        out = self.fc(x)
        return out if scale is None else out * torch.sigmoid(self.gate(scale))


def test_dataset_elements_tensor_tuple_list_dict_are_equivalent() -> None:
    model = TwoInputs().eval()
    generator = torch.Generator().manual_seed(3)
    xs = [torch.randn(8, 32, generator=generator) @ mixing(32, generator) for _ in range(3)]
    decomposer = Decompose(model).from_dict({"fc": 6}, divisor=1)
    variants = {
        "tensor": xs,
        "tuple": [(x,) for x in xs],
        "list": [[x] for x in xs],
        "dict": [{"x": x} for x in xs],
    }
    probe = torch.randn(5, 32)
    outputs = {}
    for kind, data in variants.items():
        with torch.no_grad():
            outputs[kind] = decomposer.decompose_network(datasets=data)(probe)
    free = decomposer.decompose_network()
    with torch.no_grad():
        assert not torch.allclose(free(probe), outputs["tensor"])
    for kind, output in outputs.items():
        assert torch.equal(output, outputs["tensor"]), kind
    # keyword arguments reach the model: a dict with both inputs runs gate too (its layer is not decomposed)
    both = [{"x": x, "scale": torch.randn(8, 8)} for x in xs]
    with torch.no_grad():
        assert torch.equal(decomposer.decompose_network(datasets=both)(probe), outputs["tensor"])


@pytest.mark.parametrize(("element", "type_name"), [(3, "int"), ("abc", "str"), (None, "NoneType"),
                                                     (3.5, "float"), ({1, 2}, "set")])
def test_bad_dataset_element_type(element, type_name, net, snapshot) -> None:
    decomposer = Decompose(net).from_ratio(0.5, divisor=8)
    snap = snapshot(net)
    with pytest.raises(TypeError, match=rf"datasets element 1 is a {type_name}; each element must be a dict"):
        decomposer.decompose_network(datasets=[torch.randn(2, 3, 8, 8), element])
    snap.check()


@pytest.mark.parametrize("datasets", [3, "abc"])
def test_datasets_must_be_iterable(datasets, net) -> None:
    decomposer = Decompose(net).from_ratio(0.5, divisor=8)
    with pytest.raises(TypeError, match="datasets must be an iterable of model inputs"):
        decomposer.decompose_network(datasets=datasets)


@pytest.mark.parametrize("datasets", [[], (), iter([])], ids=["list", "tuple", "iterator"])
def test_empty_dataset(datasets, net) -> None:
    decomposer = Decompose(net).from_ratio(0.5, divisor=8)
    with pytest.raises(ValueError, match="datasets is empty"):
        decomposer.decompose_network(datasets=datasets)


@pytest.mark.parametrize(("bad", "index"), [(torch.randn(2, 4, 8, 8), 2), (torch.randn(2, 3), 1)])
def test_dataset_element_of_the_wrong_shape(bad, index, net, snapshot) -> None:
    data = [torch.randn(2, 3, 8, 8) for _ in range(index)] + [bad]
    decomposer = Decompose(net).from_ratio(0.5, divisor=8)
    snap = snapshot(net)
    with pytest.raises(ValueError, match=rf"datasets element {index} does not fit the model"):
        decomposer.decompose_network(datasets=data)
    snap.check()


def test_non_finite_activations_are_rejected(net) -> None:
    decomposer = Decompose(net).from_ratio(0.5, divisor=8)
    x = torch.randn(2, 3, 8, 8)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"input of layer '\w+' holds NaN or Inf"):
        decomposer.decompose_network(datasets=[x])


def test_max_iter_limits_the_batches_used() -> None:
    model = LinearModel().eval()
    generator = torch.Generator().manual_seed(5)
    mix = mixing(32, generator)
    batches = [torch.randn(8, 32, generator=generator) @ mix for _ in range(3)]
    decomposer = Decompose(model).from_fixed(6, divisor=1)
    probe = torch.randn(4, 32)
    with torch.no_grad():
        two = decomposer.decompose_network(datasets=batches[:2])(probe)
        limited = decomposer.decompose_network(datasets=[*batches[:2], "never read"], max_iter=2)(probe)
        everything = decomposer.decompose_network(datasets=batches, max_iter=-1)(probe)
    assert torch.equal(limited, two)
    assert not torch.equal(everything, two)
    with pytest.raises(TypeError, match="datasets element 2 is a str"):
        decomposer.decompose_network(datasets=[*batches[:2], "now read"])

    drawn = []

    def stream():
        for index in range(100):
            drawn.append(index)
            yield batches[index % 3]

    decomposer.decompose_network(datasets=stream(), max_iter=2)
    assert drawn == [0, 1]  # no batch drawn beyond max_iter (a DataLoader batch can be expensive)


def test_max_iter_counts_samples_in_the_statistics() -> None:
    model = LinearModel().eval()
    graph = torch_frontend.lower(model)
    batches = [torch.randn(8, 32), torch.randn(8, 32), torch.randn(8, 32)]
    stats = torch_frontend.collect_stats(model, graph, batches, max_iter=2)
    assert stats["fc"].count == 16
    expected = torch.cat(batches[:2]).double()
    assert torch.allclose(torch.from_numpy(stats["fc"].moment), expected.T @ expected / 16)


# -------------------------------------------------------------------------------------------- report

def _layer_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_report_figures_match_the_models(net) -> None:
    decomposer = Decompose(net).from_ratio(0.5, divisor=8)
    config = decomposer.decompose_config
    assert all(layer.error is None for layer in decomposer.report)
    decomposed = decomposer.decompose_network()
    report = decomposer.report
    assert {layer.name for layer in report if layer.form} == set(config)
    for layer in report:
        original = net.get_submodule(layer.name)
        assert layer.params_before == _layer_params(original)
        assert layer.params_after == _layer_params(decomposed.get_submodule(layer.name))
        if layer.form:
            assert layer.rank == config[layer.name]
            assert layer.params_after < layer.params_before
            assert layer.flops_after < layer.flops_before
            assert layer.error is not None and 0 <= layer.error < 1 and layer.error_kind == "weight"
        else:
            assert layer.rank is None and layer.reason and layer.error is None
    totals = report.totals()
    assert totals["params_before"] - totals["params_after"] == count_parameters(net) - count_parameters(decomposed)
    assert totals["decomposed"] == len(config)
    table = report.table()
    assert all(name in table for name in config) and "TOTAL" in table


def test_report_error_is_the_weight_error(net) -> None:
    decomposer = Decompose(net).from_dict({"fc": 8}, divisor=1)
    decomposed = decomposer.decompose_network()
    with torch.no_grad():
        approx = decomposed.fc[1].weight @ decomposed.fc[0].weight
        expected = float((approx - net.fc.weight).norm() / net.fc.weight.norm())
    assert decomposer.report["fc"].error == pytest.approx(expected, rel=1e-4)
    singular = torch.linalg.svdvals(net.fc.weight.detach().double())
    optimum = float(singular[8:].norm() / singular.norm())
    assert decomposer.report["fc"].error == pytest.approx(optimum, rel=1e-4)


# --------------------------------------------------------------------------- count_parameters, logging

def test_count_parameters_counts_parameters_only(net) -> None:
    expected = sum(p.numel() for p in net.parameters())
    assert count_parameters(net) == expected
    state_total = sum(t.numel() for t in net.state_dict().values())
    buffers = sum(b.numel() for b in net.buffers())
    assert buffers > 0 and count_parameters(net) == state_total - buffers


def test_count_parameters_counts_shared_weights_once() -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight
    assert count_parameters(model) == 40
    assert isinstance(count_parameters(model), int)


@pytest.fixture
def lowrank_loggers():
    names = ("lowrank_ir", "frontends", "backends", "tools")
    saved = {name: (logging.getLogger(name).level, list(logging.getLogger(name).handlers)) for name in names}
    yield names
    for name, (level, handlers) in saved.items():
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.handlers[:] = handlers


@pytest.mark.parametrize(("level", "value"), [("info", logging.INFO), ("DEBUG", logging.DEBUG),
                                              ("warning", logging.WARNING), (" Error ", logging.ERROR)])
def test_set_logger_level(level, value, lowrank_loggers) -> None:
    set_logger_level(level)
    assert all(logging.getLogger(name).level == value for name in lowrank_loggers)
    set_logger_level(level)  # a second call adds no second handler
    assert len(logging.getLogger("lowrank_ir").handlers) == 1


@pytest.mark.parametrize(("level", "error", "message"), [
    ("loud", ValueError, r"unknown log level 'loud'; use one of"),
    ("", ValueError, "unknown log level"),
    (10, TypeError, "level must be a str"),
    (None, TypeError, "level must be a str"),
])
def test_set_logger_level_rejects(level, error, message, lowrank_loggers) -> None:
    before = logging.getLogger("lowrank_ir").level
    with pytest.raises(error, match=message):
        set_logger_level(level)
    assert logging.getLogger("lowrank_ir").level == before


def test_config_file_in_a_missing_folder_is_rejected_up_front(tmp_path) -> None:
    from torch import nn

    from lowrank_ir import Decompose

    with pytest.raises(ValueError, match="which does not exist"):
        Decompose(nn.Linear(4, 4), config_file=tmp_path / "nope" / "c.json")


def test_from_policy_is_what_the_from_calls_build(net, config_path) -> None:
    from lowrank_ir import Policy

    by_call = Decompose(net).from_fixed(16, ["head"], divisor=8)
    by_policy = Decompose(net, config_file=config_path).from_policy(Policy.fixed(16, ["head"], 8))
    assert by_policy.decompose_config == by_call.decompose_config == json.loads(config_path.read_text())
    assert by_policy.report.to_dict() == by_call.report.to_dict()
    with pytest.raises(TypeError, match=r"takes a lowrank_ir\.Policy.*got 0\.5"):
        Decompose(net).from_policy(0.5)
