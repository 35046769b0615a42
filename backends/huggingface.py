"""Hugging Face ``transformers`` adapter: a decomposed model saved as a folder, and loaded back.

A decomposed model is saved as one folder (:func:`save_decomposed`)::

    OUT/config.json             the model's config; its ``model_type`` is the marker below
    OUT/decompose_config.json   the ranks ({layer: rank}, and the forms of convs in two parts), as
                                ``Decompose(..., config_file=...)`` writes them
    OUT/decomposed.safetensors  the weights of the decomposed model (its state dict; tied weights once)
    OUT/generation_config.json  when the model generates text
    OUT/tokenizer files         when a tokenizer is given (``AutoTokenizer.from_pretrained(OUT)`` reads them)

Loading (:func:`load_decomposed`) follows the structure-only recipe: the architecture named in
``config.json`` is built from the config, ``Decompose(...).from_file().decompose_network(
do_decompose_weight=False)`` rebuilds the decomposed structure, and the weights are loaded strictly
(every missing or unexpected name is an error).

transformers itself cannot load such a folder correctly (it knows nothing of the factorized layers:
it would fill them with random weights and only log it), so it is made to refuse it, loudly:

* ``config.json`` has ``model_type`` ``"lowrank_ir_decomposed"``, which transformers does not know:
  ``AutoModel.from_pretrained(OUT)`` / ``AutoConfig`` raise ``ValueError``. The original model type and
  the architecture class are kept under the ``"lowrank_ir"`` key.
* The weights are not in a file transformers looks for (``model.safetensors``, ``pytorch_model.bin``):
  a concrete class (``BertModel.from_pretrained(OUT)``), which reads any ``model_type``, raises ``OSError``.

The folder appears complete or not at all (written beside ``OUT``, then moved), not group/other-writable.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from frontends.safetensors import model_class
from frontends.torch import lowering_for
from lowrank_ir._api import Decompose
from lowrank_ir._engine import SPATIAL_SVD, SVD
from lowrank_ir._files import atomic_directory, read_json
from lowrank_ir._policy import config_document, tucker2_stand_in
from lowrank_ir._protocols import ModelFilesAdapter

__all__ = ["CONFIG_FILE", "DECOMPOSE_CONFIG_FILE", "MARKER", "WEIGHTS_FILE", "decompose_config_of",
           "is_decomposed_folder", "load_decomposed", "load_pretrained", "save_decomposed", "tokenizer_of",
           "write_decomposed"]

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
DECOMPOSE_CONFIG_FILE = "decompose_config.json"
WEIGHTS_FILE = "decomposed.safetensors"
#: ``config.json``'s ``model_type`` in a saved folder: no transformers architecture has it.
MARKER = "lowrank_ir_decomposed"
#: The ``config.json`` key holding what :func:`load_decomposed` needs.
RECORD_KEY = "lowrank_ir"
FORMAT_VERSION = 1


def _check_model(model: Any) -> transformers.PreTrainedModel:
    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(f"save_decomposed takes a transformers PreTrainedModel (e.g. what Decompose("
                        f"AutoModel.from_pretrained(...)).decompose_network() returns), got {type(model).__name__}")
    name = type(model).__name__
    if getattr(transformers, name, None) is not type(model):
        raise ValueError(f"{name} is not a class of the transformers package (remote or custom code); "
                         f"load_decomposed could not rebuild it")
    return model


def decompose_config_of(model: transformers.PreTrainedModel,
                        ) -> tuple[dict[str, int | list[int]], dict[str, tuple[str, int]]]:
    """``(decompose_config, forms)`` of a decomposed model: each layer its architecture has that is a chain here.

    The architecture is instantiated from ``model.config`` on the ``meta`` device (no memory, no init)
    and compared module by module: where it has a layer (``Linear``, ``Conv``, ``Embedding``, ``Conv1D``)
    and ``model`` an ``nn.Sequential``, the chain's middle part gives the rank (two parts: its input
    width; a Tucker-2 conv's three parts: the core's ``[out, in]`` channels). A conv in two parts is in
    a two-factor form (``forms``: channel SVD, or spatial SVD when the first part is ``kh x 1``), with a
    Tucker-2 stand-in in the config, as ``lowrank_ir._policy.config_document`` writes them.
    """
    with torch.device("meta"):
        original = type(model)(copy.deepcopy(model.config))
    modules = dict(model.named_modules())
    config: dict[str, int | list[int]] = {}
    forms: dict[str, tuple[str, int]] = {}
    for name, layer in original.named_modules():
        chain = modules.get(name)
        if not isinstance(chain, nn.Sequential) or lowering_for(layer) is None:
            continue
        weights = [getattr(part, "weight", None) for part in chain]
        if len(chain) not in (2, 3) or not all(isinstance(weight, torch.Tensor) for weight in weights):
            raise ValueError(f"{name!r} is an nn.Sequential of {len(chain)} parts where {type(model).__name__} "
                             f"has a {type(layer).__name__}; a decomposed layer is a chain of 2 or 3 weighted parts")
        core = weights[1]
        assert isinstance(core, torch.Tensor)
        if len(chain) == 3:
            config[name] = [int(core.shape[0]), int(core.shape[1])]
        elif isinstance(layer, nn.modules.conv._ConvNd):
            rank, kernel = int(core.shape[1]), tuple(layer.kernel_size)
            first = chain[0]
            spatial = (len(kernel) == 2 and kernel[1] > 1 and isinstance(first, nn.modules.conv._ConvNd)
                       and tuple(first.kernel_size) == (kernel[0], 1))
            forms[name] = (SPATIAL_SVD if spatial else SVD, rank)
            config[name] = tucker2_stand_in(rank, (layer.out_channels, layer.in_channels))
        else:
            config[name] = int(core.shape[1])
    return config, forms


def is_decomposed_folder(folder: Path) -> bool:
    """Whether ``folder`` is one :func:`save_decomposed` wrote (its ``config.json`` carries the marker)."""
    return _marker(folder / CONFIG_FILE) == MARKER


def _check_folder(folder: Path) -> None:
    """Refuse to replace a folder that is neither empty nor an earlier :func:`save_decomposed` output."""
    if folder.is_dir() and any(folder.iterdir()) and not is_decomposed_folder(folder):
        raise FileExistsError(f"{str(folder)!r} exists and is not a folder save_decomposed wrote; choose a new "
                              f"folder, the old one is not replaced")


def _marker(file: Path) -> Any:
    try:
        return json.loads(file.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def write_decomposed(model: Any, folder: Path, tokenizer: Any = None) -> dict[str, int | list[int]]:
    """Write the files of :func:`save_decomposed` into the existing, empty ``folder``; the ranks written.

    For callers that write more files beside them and move the folder into place themselves.
    """
    model = _check_model(model)
    ranks, forms = decompose_config_of(model)
    if not ranks:
        raise ValueError(f"no layer of this {type(model).__name__} is decomposed (no nn.Sequential chain where "
                         f"its architecture has a layer); save it with model.save_pretrained(...)")
    config = model.config.to_dict()
    config[RECORD_KEY] = {"format": FORMAT_VERSION, "model_type": config.get("model_type"),
                          "architecture": type(model).__name__, "weights": WEIGHTS_FILE,
                          "load_with": "lowrank_ir.hf.load_decomposed(folder)"}
    config["model_type"] = MARKER
    config["architectures"] = [type(model).__name__]
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (folder / DECOMPOSE_CONFIG_FILE).write_text(json.dumps(config_document(ranks, forms), indent=2) + "\n")
    save_model(model, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    generation = getattr(model, "generation_config", None)
    if generation is not None and model.can_generate():
        generation.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return ranks


def save_decomposed(model: Any, folder: str | os.PathLike[str], tokenizer: Any = None) -> Path:
    """Write a decomposed transformers model (and its tokenizer) to ``folder``; see the module docstring.

    Args:
        model: the decomposed model (``Decompose(hf_model)....decompose_network()``), a transformers
            ``PreTrainedModel`` of a class the transformers package has. Not changed.
        folder: created, or replaced when it is an earlier output of this function or empty.
        tokenizer: optional; its files are saved beside the model (``tokenizer.save_pretrained``).

    Raises:
        TypeError: ``model`` is not a transformers model.
        ValueError: no layer of ``model`` is decomposed (save it with ``save_pretrained``).
        FileExistsError: ``folder`` holds something else.
    """
    model = _check_model(model)
    target = Path(folder)
    _check_folder(target)
    with atomic_directory(target) as tmp:
        ranks = write_decomposed(model, tmp, tokenizer)
    logger.info("saved %s with %d decomposed layers in %s", type(model).__name__, len(ranks), target)
    return target


def _read_config(folder: Path) -> tuple[transformers.PretrainedConfig, type[transformers.PreTrainedModel]]:
    """The model config and architecture class a :func:`save_decomposed` folder names."""
    file = folder / CONFIG_FILE
    if not folder.is_dir():
        raise FileNotFoundError(f"decomposed model folder {str(folder)!r} does not exist or is not a folder")
    if not file.is_file():
        raise ValueError(f"{str(folder)!r} is not a decomposed model: {CONFIG_FILE} is missing")
    data = read_json(file)
    record = data.get(RECORD_KEY) if isinstance(data, dict) else None
    if not isinstance(record, dict) or data.get("model_type") != MARKER:
        raise ValueError(f"{str(file)!r} was not written by save_decomposed (no {RECORD_KEY!r} record); a plain "
                         f"transformers folder loads with AutoModel.from_pretrained")
    if record.get("format") != FORMAT_VERSION:
        raise ValueError(f"{str(file)!r} has format {record.get('format')!r}; this lowrank-ir reads format "
                         f"{FORMAT_VERSION}")
    architecture = getattr(transformers, str(record.get("architecture")), None)
    if not (isinstance(architecture, type) and issubclass(architecture, transformers.PreTrainedModel)):
        raise ValueError(f"{str(file)!r} names architecture {record.get('architecture')!r}, which this "
                         f"transformers {transformers.__version__} does not have")
    config_class = architecture.config_class
    if config_class is None:
        raise ValueError(f"{architecture.__name__} has no config class to read {str(file)!r} with")
    fields = {key: value for key, value in data.items() if key != RECORD_KEY}
    fields["model_type"] = record.get("model_type")
    return config_class.from_dict(fields), architecture


def _saved_dtype(file: Path) -> torch.dtype | None:
    """The one floating dtype of the saved tensors (None when there are several, or none)."""
    dtypes = set()
    with safe_open(str(file), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 - a safetensors handle is not a dict
            dtype = handle.get_slice(key).get_dtype()
            if dtype.startswith(("F", "BF")):
                dtypes.add(dtype)
    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}.get(
        dtypes.pop()) if len(dtypes) == 1 else None


def load_decomposed(folder: str | os.PathLike[str]) -> Any:
    """The decomposed model saved in ``folder`` by :func:`save_decomposed`, in eval mode.

    Raises:
        FileNotFoundError: ``folder`` or a file in it is missing.
        ValueError: ``folder`` is not a decomposed-model folder, or its weights do not fit the rebuilt
            structure (every missing and unexpected name is listed; nothing is returned).
    """
    source = Path(folder)
    config, architecture = _read_config(source)
    weights = source / WEIGHTS_FILE
    ranks = source / DECOMPOSE_CONFIG_FILE
    for file in (weights, ranks):
        if not file.is_file():
            raise FileNotFoundError(f"decomposed model folder {str(source)!r} has no {file.name}")
    dtype = _saved_dtype(weights)
    original: nn.Module = architecture(config)
    if dtype is not None:
        original.to(dtype=dtype)
    structure = Decompose(original, config_file=ranks).from_file().decompose_network(do_decompose_weight=False)
    try:
        missing, unexpected = load_model(structure, str(weights), strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"the weights in {str(weights)!r} do not fit the rebuilt {architecture.__name__}: "
                         f"{err}") from err
    if missing or unexpected:
        raise ValueError(f"the weights in {str(weights)!r} do not fit the rebuilt {architecture.__name__}: "
                         f"missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    return structure.eval()


#: Files that show a folder holds a tokenizer ``AutoTokenizer`` can read.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "tokenizer.model")


def load_pretrained(folder: str | os.PathLike[str]) -> nn.Module:
    """A Hugging Face model folder in memory, in eval mode: the class ``config.json`` names, its safetensors weights.

    Raises:
        ValueError: ``folder`` was written by :func:`save_decomposed` (load it with :func:`load_decomposed`),
            holds no safetensors weights, or its weights do not fill the model (missing names listed).
    """
    source = Path(folder)
    if is_decomposed_folder(source):
        raise ValueError(f"{str(source)!r} holds a decomposed model already; load it with "
                         f"lowrank_ir.hf.load_decomposed")
    config = read_json(source / CONFIG_FILE, f"{CONFIG_FILE} of {str(source)!r}", schema=dict)
    architecture = model_class(config, source)
    if not any(source.glob("*.safetensors")):
        raise ValueError(f"{str(source)!r} holds no .safetensors weights (model.safetensors or shards); "
                         f"save the model with save_pretrained(safe_serialization=True)")
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # progress is drawn by the caller, if at all
    try:
        model, info = architecture.from_pretrained(source, use_safetensors=True, output_loading_info=True)
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    missing = sorted(info.get("missing_keys") or [])
    mismatched = info.get("mismatched_keys") or []
    if missing or mismatched:
        raise ValueError(f"the weights in {str(source)!r} do not fill {architecture.__name__}: missing "
                         f"{missing[:5]}, shape mismatches {list(mismatched)[:5]}")
    return model.eval()


def tokenizer_of(folder: str | os.PathLike[str]) -> Any:
    """The tokenizer saved in ``folder`` (``AutoTokenizer``), or None when it holds none."""
    source = Path(folder)
    if not any((source / name).is_file() for name in TOKENIZER_FILES):
        return None
    return transformers.AutoTokenizer.from_pretrained(source)


if TYPE_CHECKING:  # the registry hands this module out as a ModelFilesAdapter: mypy checks that it is one
    import backends.huggingface as _this_module

    _AS_PROTOCOL: ModelFilesAdapter = _this_module
