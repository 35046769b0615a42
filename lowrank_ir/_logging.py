"""Logging for the library: one ``lowrank_ir`` logger tree; ``set_logger_level`` for users."""

from __future__ import annotations

import logging

from lowrank_ir._registry import packages

__all__ = ["LEVELS", "set_logger_level"]

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
    "fatal": logging.CRITICAL,
}

#: The loggers set: the core's, the command line's, and those of the plugin packages the registry names.
_ROOTS = ("lowrank_ir", "tools")


def set_logger_level(level: str = "info") -> None:
    """Set the level of lowrank-ir's loggers to one of ``debug``, ``info``, ``warning``, ``error``, ``critical``.

    A handler printing to stderr is attached once if the logger has none, so ``info`` messages show.
    """
    if not isinstance(level, str):
        raise TypeError(f"level must be a str such as 'info', got {type(level).__name__} {level!r}")
    value = LEVELS.get(level.strip().lower())
    if value is None:
        raise ValueError(f"unknown log level {level!r}; use one of {sorted(set(LEVELS) - {'warn', 'fatal'})}")
    for name in dict.fromkeys([*_ROOTS, *packages()]):
        logger = logging.getLogger(name)
        logger.setLevel(value)
        if not logger.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            logger.addHandler(handler)
