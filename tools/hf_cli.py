"""``lowrank inspect|decompose MODEL_DIR`` for a Hugging Face folder loaded in memory, with text calibration.

A folder (``config.json`` + safetensors weights) takes one of two paths:

* **in memory** (this module): the model class ``config.json`` names is built and its safetensors
  weights loaded (``backends.huggingface.load_pretrained``), then decomposed like any PyTorch model.
  This is the path when the ranks need the model to run or to be seen whole: ``--calib-text`` (data-aware,
  padded batches from the folder's tokenizer, padding left out of the statistics), ``--energy``,
  ``--budget-params``/``--budget-flops``, or ``--in-memory``. ``decompose`` writes ``-o OUT_DIR`` as
  ``lowrank_ir.hf.save_decomposed`` does (loadable with ``lowrank_ir.hf.load_decomposed``; the tokenizer
  is copied) plus ``report.json``. ``inspect`` always takes this path.
* **streamed** (``tools/checkpoint_cli.py``): every other ``decompose`` of a folder; one layer in memory
  at a time, for checkpoints larger than memory, over several processes with ``--nproc``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from tools.common import UsageError, choose_ranks, command_outputs, progress_bars, show_report

__all__ = ["REPORT_FILE", "calibration_batches", "decompose", "in_memory", "inspect", "read_sentences"]

#: What ``decompose`` writes beside ``save_decomposed``'s files in ``OUT_DIR``.
REPORT_FILE = "report.json"

#: Options only the in-memory path takes (``--calib-text`` and its batching).
TEXT_OPTIONS = ("calib_text", "max_length", "batch_size")


def in_memory(args: argparse.Namespace) -> bool:
    """Whether ``decompose`` takes a folder the in-memory way (see the module docstring) rather than streamed."""
    return getattr(args, "in_memory", False) or any(getattr(args, name, None) not in (None, False)
               for name in ("calib_text", "max_length", "batch_size", "count_padding", "energy", "budget_params",
                            "budget_flops"))


def read_sentences(file: str) -> list[str]:
    """The ``--calib-text`` file's sentences: one a line, blank lines skipped (UTF-8)."""
    path = Path(file)
    if not path.is_file():
        raise UsageError(f"--calib-text file {file!r} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise UsageError(f"--calib-text file {file!r} is not UTF-8 text ({err.reason} at byte {err.start}); "
                         f"give one sentence a line") from err
    sentences = [line.strip() for line in lines if line.strip()]
    if not sentences:
        raise UsageError(f"--calib-text file {file!r} holds no sentence (one sentence a line)")
    return sentences


def calibration_batches(tokenizer: Any, sentences: list[str], max_length: int, batch_size: int) -> list[Any]:
    """``sentences`` tokenized in padded batches of ``batch_size`` (dicts holding ``attention_mask``)."""
    return [dict(tokenizer(sentences[start:start + batch_size], padding=True, truncation=True,
                           max_length=max_length, return_tensors="pt"))
            for start in range(0, len(sentences), batch_size)]


def _check(args: argparse.Namespace) -> None:
    for option in ("max_length", "batch_size"):
        value = getattr(args, option, None)
        if value is not None and value < 1:
            raise UsageError(f"--{option.replace('_', '-')} must be at least 1, got {value!r}")
    for option in ("max_length", "batch_size", "count_padding"):
        if getattr(args, option, None) not in (None, False) and getattr(args, "calib_text", None) is None:
            raise UsageError(f"--{option.replace('_', '-')} sets how --calib-text is tokenized; give --calib-text")
    given = [f"--{name.replace('_', '-')}" for name in ("weights", "input_shape", "calib", "feeds", "tolerance",
                                                         "opset", "budget_latency", "nproc", "threads")
             if getattr(args, name, None) is not None]
    if given:
        raise UsageError(f"{', '.join(given)} cannot be used with a Hugging Face folder loaded in memory "
                         f"({args.model!r}); its weights and tokenizer come from the folder")


def _load(args: argparse.Namespace) -> tuple[Any, Any, list[Any] | None]:
    """The folder's model, its tokenizer (or None), and the ``--calib-text`` batches (or None)."""
    from backends.huggingface import load_pretrained, tokenizer_of

    sentences = read_sentences(args.calib_text) if args.calib_text is not None else None
    model = load_pretrained(args.model)
    tokenizer = tokenizer_of(args.model)
    if sentences is None:
        return model, tokenizer, None
    if tokenizer is None:
        raise UsageError(f"--calib-text needs the folder's tokenizer, and {args.model!r} holds none "
                         f"(tokenizer.json, tokenizer_config.json or vocab.txt)")
    limit = args.max_length or min(int(getattr(tokenizer, "model_max_length", 512) or 512), 512)
    return model, tokenizer, calibration_batches(tokenizer, sentences, limit, args.batch_size or 16)


def inspect(args: argparse.Namespace) -> int:
    """Print the per-layer table (or ``--json``) of the folder's model under the policy."""
    from lowrank_ir import Decompose

    _check(args)
    model, _, batches = _load(args)
    with progress_bars(args) as bars:
        decomposer = choose_ranks(Decompose(model, progress=bars, mask_padding=not args.count_padding), args,
                                  batches)
    show_report(decomposer.report, args, header=f"{args.model}: {type(model).__name__}")
    return 0


def decompose(args: argparse.Namespace) -> int:
    """Decompose the folder's model (data-aware with ``--calib-text``) and write ``-o`` as ``save_decomposed`` does."""
    from backends.huggingface import is_decomposed_folder, write_decomposed
    from lowrank_ir import Decompose, write_json
    from lowrank_ir._files import atomic_directory
    from tools.html_report import check_report_option, decomposer_document, write_report

    _check(args)
    target = Path(args.output).resolve()
    source = Path(args.model).resolve()
    if target == source or source in target.parents:
        raise UsageError(f"output folder {args.output!r} must be outside the model folder {args.model!r}")
    outputs = command_outputs(args)
    report = outputs.file(args.report, "--report") if args.report else None
    outputs.check()
    check_report_option(args.report)
    if target.is_dir() and os.listdir(target):
        if not is_decomposed_folder(target):
            raise FileExistsError(f"-o {args.output!r} holds files this command did not write: give a new folder "
                                  f"(a folder holding other files is never replaced)")
        if not args.force:
            raise FileExistsError(f"-o {args.output!r} already holds a decomposed model; add --force to replace "
                                  f"it, or give a new folder")
    model, tokenizer, batches = _load(args)
    with progress_bars(args) as bars:
        decomposer = choose_ranks(Decompose(model, progress=bars, mask_padding=not args.count_padding), args,
                                  batches)
        decomposed = decomposer.decompose_network(datasets=batches)
    document = decomposer_document(decomposer, args, data_aware=batches is not None)
    with outputs.writing() as stage, atomic_directory(target) as folder:
        write_decomposed(decomposed, folder, tokenizer)
        write_json(folder / REPORT_FILE, document)
        if report is not None:
            write_report(document, stage.path(report), args.report)
    print(decomposer.report.table(only_decomposed=True))
    print(f"saved {args.output} (load it with lowrank_ir.hf.load_decomposed({args.output!r}))")
    return 0
