"""Hugging Face round trip: save a decomposed transformers model as a folder, and load it back.

>>> from lowrank_ir import Decompose                                   # doctest: +SKIP
>>> from lowrank_ir.hf import load_decomposed, save_decomposed          # doctest: +SKIP
>>> small = Decompose(AutoModel.from_pretrained(src)).from_ratio(0.5).decompose_network()  # doctest: +SKIP
>>> save_decomposed(small, "out", tokenizer=AutoTokenizer.from_pretrained(src))           # doctest: +SKIP
>>> model = load_decomposed("out")                                      # doctest: +SKIP

The folder holds ``config.json``, ``decompose_config.json``, the weights as safetensors and the
tokenizer files; ``AutoModel.from_pretrained`` refuses it (it would fill the factorized layers with
random weights), ``load_decomposed`` rebuilds the decomposed structure and loads the weights strictly.
The work is done in ``backends/huggingface.py`` (see its docstring); importing this module imports no
framework, transformers and torch are loaded on the first call.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lowrank_ir._registry import adapter

__all__ = ["load_decomposed", "save_decomposed"]


def save_decomposed(model: Any, folder: str | os.PathLike[str], tokenizer: Any = None) -> Path:
    """Write the decomposed transformers ``model`` (and ``tokenizer``, if given) to ``folder``; returns it.

    ``folder`` is created, or replaced when it is empty or an earlier output of this function; it
    appears complete or not at all. ``model`` is not changed.
    """
    return Path(adapter("transformers").save_decomposed(model, folder, tokenizer))


def load_decomposed(folder: str | os.PathLike[str]) -> Any:
    """The decomposed model :func:`save_decomposed` wrote to ``folder``, in eval mode, weights loaded strictly."""
    return adapter("transformers").load_decomposed(folder)
