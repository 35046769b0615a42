"""Real English sentences without a download: the docstrings of Python's standard library.

Deterministic for a given Python version. Sentences are split on '. ', kept when they look like prose
(8 to 40 words, mostly letters), de-duplicated, and handed out in a fixed shuffled order so that the
calibration and held-out sets are disjoint.
"""

from __future__ import annotations

import importlib
import random
import re

MODULES = (
    "argparse", "asyncio", "collections", "concurrent.futures", "contextlib", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "email", "enum", "fractions", "functools", "gettext", "heapq",
    "http.client", "inspect", "ipaddress", "json", "logging", "mailbox", "multiprocessing", "numbers",
    "optparse", "os", "pathlib", "pickle", "pydoc", "queue", "random", "re", "shutil", "smtplib",
    "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "tkinter", "typing", "unittest", "urllib.parse", "uuid", "warnings", "zipfile",
)


def _docstrings() -> list[str]:
    texts = []
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        objects = [module, *(getattr(module, attr) for attr in sorted(dir(module)) if not attr.startswith("_"))]
        for obj in objects:
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str):
                texts.append(doc)
    return texts


def sentences(seed: int = 0) -> list[str]:
    """All usable sentences, shuffled deterministically."""
    found: dict[str, None] = {}
    for text in _docstrings():
        for raw in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
            words = raw.split()
            letters = sum(ch.isalpha() or ch == " " for ch in raw)
            if 8 <= len(words) <= 40 and letters >= 0.85 * len(raw) and raw[0].isupper():
                found.setdefault(raw, None)
    ordered = sorted(found)
    random.Random(seed).shuffle(ordered)
    return ordered


def split(calibration: int, held_out: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Disjoint calibration and held-out sentence lists."""
    pool = sentences(seed)
    if len(pool) < calibration + held_out:
        raise ValueError(f"only {len(pool)} sentences available, {calibration + held_out} asked")
    return pool[:calibration], pool[calibration:calibration + held_out]
