"""A small model for ``module:factory`` command lines in the fuzzing suite (importable without hypothesis)."""

from __future__ import annotations

import torch


def tiny_mlp() -> torch.nn.Module:
    """A seeded 32 -> 48 -> 16 MLP."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.ReLU(), torch.nn.Linear(48, 16))
