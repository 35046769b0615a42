"""Checks the command-line tests share."""

from __future__ import annotations

from typing import Any


def one_line_error(capsys: Any, *parts: str) -> str:
    """The captured stderr, checked to be one line holding every one of ``parts``."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for part in parts:
        assert part in err, err
    return err
