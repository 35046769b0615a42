"""Layers in two-factor forms survive a config file: written beside the reference format, restored by ``from_file``.

A latency budget may write a k x k conv as channel SVD or spatial SVD; the config file keeps the
reference tool's ``{layer: rank or [out, in]}`` (each such layer at a Tucker-2 stand-in) and adds a
``"__forms__"`` section, which ``from_file`` restores and the reference tool never reads.
"""

from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest

from lowrank_ir import Decompose, Policy, plan, with_forms, write_json
from lowrank_ir._engine import SPATIAL_SVD, SVD
from lowrank_ir._policy import FORMS_KEY, config_document, split_config_document
from tests import onnx_models as om
from tests.test_conv_forms import _torch_model, separable_conv

#: Ranks and forms of ``_torch_model``'s two convs ("0": 8 -> 16 3x3, "2": 16 -> 12 5x3).
CONFIG = {"0": [5, 5], "2": [6, 6]}
FORMS = {"0": (SPATIAL_SVD, 5), "2": (SVD, 6)}


def _decomposed(decomposer: Decompose) -> list[tuple[str, str | None, object]]:
    assert decomposer.plan is not None
    return [(entry.name, entry.form, entry.rank) for entry in decomposer.plan.decomposed_entries()]


def test_latency_budget_forms_survive_save_and_from_file(tmp_path) -> None:
    model = separable_conv()
    path = tmp_path / "decompose_config.json"
    chosen = Decompose(model, config_file=path).from_budget(latency=0.75, divisor=16)
    assert chosen.forms["conv"][0] == SPATIAL_SVD
    document = json.loads(path.read_text())
    assert document == {"conv": chosen.decompose_config["conv"], FORMS_KEY: {"conv": list(chosen.forms["conv"])}}
    restored = Decompose(model, config_file=path).from_file()
    assert restored.forms == chosen.forms and restored.decompose_config == chosen.decompose_config
    assert _decomposed(restored) == _decomposed(chosen)
    assert restored.report["conv"].form == SPATIAL_SVD
    feeds = {"x": np.random.default_rng(3).standard_normal((1, 96, 40, 40)).astype(np.float32)}
    np.testing.assert_array_equal(om.run(restored.decompose_network(), feeds)[0],
                                  om.run(chosen.decompose_network(), feeds)[0])


def test_a_torch_model_is_rebuilt_in_the_forms_of_its_config_file(tmp_path, snapshot) -> None:
    torch = pytest.importorskip("torch")
    from backends import torch as torch_backend
    from frontends import torch as torch_frontend
    from lowrank_ir import rewrite

    model = _torch_model()
    snap = snapshot(model)
    path = tmp_path / "decompose_config.json"
    write_json(path, config_document(CONFIG, FORMS))
    restored = Decompose(model, config_file=path).from_file()
    assert restored.forms == FORMS and restored.decompose_config == CONFIG
    small = restored.decompose_network()
    assert [tuple(part.kernel_size) for part in small[0]] == [(3, 1), (1, 3)]
    assert [tuple(part.kernel_size) for part in small[2]] == [(5, 3), (1, 1)]
    graph = torch_frontend.lower(model)
    direct = torch_backend.build(rewrite(graph, with_forms(plan(graph, Policy.config(CONFIG)), FORMS)).graph,
                                 like=model)
    # the multi-process recipe: every process rebuilds the structure from the file and loads the weights
    structure = Decompose(model, config_file=path).from_file().decompose_network(do_decompose_weight=False)
    structure.load_state_dict(small.state_dict())
    x = torch.randn(2, 8, 13, 11, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        np.testing.assert_array_equal(small(x).numpy(), direct(x).numpy())
        np.testing.assert_array_equal(structure(x).numpy(), small(x).numpy())
    snap.check()


def test_the_reference_tool_reads_a_file_with_forms_as_tucker2(tmp_path) -> None:
    pytest.importorskip("torch")
    reference = pytest.importorskip("msmodelslim.pytorch.low_rank_decompose")
    from msmodelslim import logger

    model = _torch_model()
    path = tmp_path / "decompose_config.json"
    write_json(path, config_document(CONFIG, FORMS))
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        theirs = reference.Decompose(copy.deepcopy(model), config_file=str(path)).from_file()
        small = theirs.decompose_network(do_decompose_weight=False)
    finally:
        logger.setLevel(level)
    assert FORMS_KEY in theirs.decompose_config  # read, never looked up as a layer
    assert [len(small[index]) for index in (0, 2)] == [3, 3]  # the stand-ins: Tucker-2 chains
    assert tuple(small[0][1].weight.shape[:2]) == (5, 5) and tuple(small[2][1].weight.shape[:2]) == (6, 6)


def test_reference_format_files_load_unchanged(write_config) -> None:
    model = _torch_model()
    restored = Decompose(model, config_file=write_config(CONFIG)).from_file()
    assert restored.forms == {} and restored.decompose_config == CONFIG
    assert [entry.form for entry in restored.plan.decomposed_entries()] == ["tucker2", "tucker2"]
    assert split_config_document(CONFIG) == (CONFIG, {})


def test_a_config_file_written_without_forms_has_no_section(tmp_path) -> None:
    path = tmp_path / "decompose_config.json"
    decomposer = Decompose(_torch_model(), config_file=path).from_fixed(4, divisor=1)
    assert json.loads(path.read_text()) == decomposer.decompose_config == decomposer.config_document()
    assert FORMS_KEY not in decomposer.config_document()


@pytest.mark.parametrize(("forms", "message"), [
    ({"0": ["cp", 4]}, r"__forms__.*layer '0' \(Conv\) cannot take form 'cp': conv layers take one of 'svd', "
                       r"'spatial_svd'"),
    ({"0": ["spatial_svd", 25]}, r"__forms__.*'0' \(weight \[16, 8, 3, 3\]\) takes 'spatial_svd' ranks 1 \.\. 24, "
                                 r"got 25"),
    ({"2": ["svd", 0]}, r"'2' \(weight \[12, 16, 5, 3\]\) takes 'svd' ranks 1 \.\. 12, got 0"),
    ({"1": ["svd", 4]}, r"\['__forms__'\] names '1', which has no entry in config_file"),
    ({"0": "spatial_svd"}, r"\['__forms__'\]\['0'\] must be \[form name, int rank\].*got 'spatial_svd'"),
    ({"0": ["spatial_svd", 4.0]}, r"\['__forms__'\]\['0'\] must be \[form name, int rank\]"),
    (["0", "svd", 4], r"\['__forms__'\] must be a JSON object \{layer name: \[form, rank\]\}, got \['0'"),
], ids=["unknown-form", "rank-above-the-form-limit", "rank-zero", "layer-not-in-config", "not-a-pair", "float-rank",
        "not-an-object"])
def test_a_bad_forms_section_is_refused_naming_it(forms, message, write_config, snapshot) -> None:
    model = _torch_model()
    snap = snapshot(model)
    path = write_config({**CONFIG, FORMS_KEY: forms})
    content = path.read_bytes()
    decomposer = Decompose(model, config_file=path)
    with pytest.raises(ValueError, match=message):
        decomposer.from_file()
    assert decomposer.decompose_config is None and decomposer.forms == {}
    assert path.read_bytes() == content
    snap.check()


def test_rules_with_a_forms_section_are_refused_pointing_to_from_file() -> None:
    with pytest.raises(ValueError, match=r"rules hold '__forms__'.*from_file\(\)"):
        Decompose(_torch_model()).from_dict(config_document(CONFIG, FORMS))


def test_a_hugging_face_folder_keeps_the_forms_of_its_convs(tmp_path, write_config) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from lowrank_ir.hf import load_decomposed, save_decomposed

    torch.manual_seed(0)
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    model = transformers.ResNetModel(config).eval()
    block = "encoder.stages.1.layers.0"  # 3x3 convs 8 -> 16 and 16 -> 16, a 1x1 shortcut 8 -> 16
    spatial, channel = f"{block}.layer.1.convolution", f"{block}.layer.0.convolution"
    forms = {spatial: (SPATIAL_SVD, 8), channel: (SVD, 6)}
    document = config_document({spatial: [8, 8], channel: [6, 6], f"{block}.shortcut.convolution": [4, 4]}, forms)
    small = Decompose(model, config_file=write_config(document)).from_file().decompose_network()
    folder = save_decomposed(small, tmp_path / "resnet")
    assert json.loads((folder / "decompose_config.json").read_text()) == document
    loaded = load_decomposed(folder)
    assert [tuple(part.kernel_size) for part in loaded.get_submodule(spatial)] == [(3, 1), (1, 3)]
    assert [tuple(part.kernel_size) for part in loaded.get_submodule(channel)] == [(3, 3), (1, 1)]
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        np.testing.assert_array_equal(loaded(pixel_values=images).last_hidden_state.numpy(),
                                      small(pixel_values=images).last_hidden_state.numpy())


def test_a_decompose_folder_with_forms_is_rebuilt_in_them_by_the_command_line(tmp_path, write_config) -> None:
    """``lowrank bench`` rebuilds a ``lowrank decompose module:factory -o DIR`` folder from its config file."""
    torch = pytest.importorskip("torch")
    from backends.torch import save_weights
    from tests.models import convnet
    from tools.bench_cli import _torch_decomposed

    document = config_document({"2": [24, 24], "4": [16, 16]}, {"2": (SPATIAL_SVD, 24)})
    decomposer = Decompose(convnet(), config_file=write_config(document)).from_file()
    small = decomposer.decompose_network()
    folder = tmp_path / "small"
    folder.mkdir()
    save_weights(small, folder / "state_dict.safetensors")
    write_json(folder / "decompose_config.json", decomposer.config_document())
    rebuilt = _torch_decomposed(str(folder), convnet())
    assert [tuple(part.kernel_size) for part in rebuilt[2]] == [(3, 1), (1, 3)]
    x = torch.randn(1, 16, 12, 12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        np.testing.assert_array_equal(rebuilt(x).numpy(), small(x).numpy())
