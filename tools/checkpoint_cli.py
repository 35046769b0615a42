"""``lowrank decompose MODEL_DIR -o OUT_DIR``: a Hugging Face checkpoint folder decomposed layer by layer.

The folder is streamed (``backends/safetensors.py``): one Linear layer in memory at a time, the output
written as shards of the input's layout into a temporary folder that becomes ``OUT_DIR`` only when
everything is written, with ``decompose_config.json`` and ``report.json`` beside the weights.

Several processes share the work under torch.distributed (gloo on the CPU, NCCL when CUDA is there:
only barriers and one broadcast pass between them). ``--nproc N`` reads the folder and finds its layers
(importing torch and the transformers model class: most of the command's fixed cost) in this process,
then forks N workers with ``torch.multiprocessing`` (so none of them imports anything again), which meet
through a file store in a temporary folder, each take their share, and exit; this process then writes
the index, the config and the report. ``torchrun --nproc_per_node N [--nnodes M ...] -m tools.cli
decompose ...`` runs the same shares in processes it starts, on one or several machines: there rank 0
creates the temporary folder and tells the others where it is (every node must see it: a shared file
system), and makes it ``OUT_DIR`` at the end.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from tools.common import UsageError, chosen_policy, command_outputs, policy_of, progress_bars

__all__ = ["decompose", "folder_only", "is_checkpoint_path"]

#: Options of other model kinds that make no sense for a checkpoint folder.
_NOT_FOR_FOLDERS = ("weights", "input_shape", "calib", "feeds", "tolerance", "opset", "energy", "budget_params",
                    "budget_flops")


def is_checkpoint_path(spec: str) -> bool:
    """Whether the model argument names a folder (a checkpoint folder, or something claiming to be one)."""
    return Path(spec).is_dir()


def folder_only(args: argparse.Namespace) -> None:
    """Reject ``--nproc``/``--threads`` for models that are not checkpoint folders."""
    given = [f"--{name}" for name in ("nproc", "threads") if getattr(args, name, None) is not None]
    if given:
        raise UsageError(f"{', '.join(given)} apply to checkpoint folders, not to {args.model!r}")


def _check(args: argparse.Namespace) -> None:
    given = [f"--{name.replace('_', '-')}" for name in _NOT_FOR_FOLDERS if getattr(args, name, None) is not None]
    if given:
        raise UsageError(f"{', '.join(given)} cannot be used with a checkpoint folder ({args.model!r}): it is "
                         f"decomposed layer by layer with --ratio, --fixed, --dict or --vbmf")
    for option in ("nproc", "threads"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise UsageError(f"--{option} must be at least 1, got {value!r}")
    source, target = Path(args.model).resolve(), Path(args.output).resolve()
    if target == source or source in target.parents:
        raise UsageError(f"output folder {args.output!r} must be outside the checkpoint folder {args.model!r}")


def _forked(args: argparse.Namespace, policy: Any, folder: Path, progress: Any) -> Any:
    """Decompose the folder into ``folder`` with ``--nproc`` processes forked from this one; the result.

    The folder is read and its layers found here, once, before the fork; the processes meet through a
    file store and each run its share (``decompose_share``); this process then collects and finishes.
    """
    import tempfile

    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    from backends.safetensors import collect_checkpoint, finish_checkpoint

    job = _prepared(args, folder, policy)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.nproc)
    failures = mp.get_context("fork").SimpleQueue()  # the first failure is the cause; the others follow from it
    with tempfile.TemporaryDirectory(prefix="lowrank-store-") as meeting:
        try:
            mp.start_processes(_share, args=(job, args.nproc, threads, f"file://{meeting}/store", progress, failures),
                               nprocs=args.nproc, start_method="fork")
        except ProcessException as err:
            kind, first = (failures.get() if not failures.empty()
                           else ("RuntimeError", f"process {err.error_index} of {args.nproc}: {err}"))
            raise _RAISED.get(kind, RuntimeError)(f"{first.strip().splitlines()[0]} (the command stopped)") from err
    result = collect_checkpoint(job)
    finish_checkpoint(job)
    return result


#: A process's error is raised again in the command as its kind where that is bad input or the system's
#: (a clear one-line error, exit 2), else as RuntimeError (a traceback: a bug).
_RAISED: dict[str, type[Exception]] = {"ValueError": ValueError, "TypeError": TypeError, "OSError": OSError,
                                       "MemoryError": MemoryError}


def _prepared(args: argparse.Namespace, folder: Path, policy: Any) -> Any:
    """The folder read and its layers found (torch and the model class imported), then the heap frozen.

    ``gc.freeze`` moves every object alive (mostly the imported modules') out of the collector's sight: the
    collections during the work and the interpreter's last one at exit skip them (a second of CPU with torch
    and transformers loaded), and forked processes do not copy the pages the collector would touch
    (CPython's advice before a fork).
    """
    import gc

    from backends.safetensors import prepare_checkpoint

    job = prepare_checkpoint(Path(args.model).resolve(), folder, policy)
    gc.freeze()
    return job


def _share(index: int, job: Any, size: int, threads: int, store: str, progress: Any, failures: Any) -> None:
    """One forked process: join the group through ``store`` as rank ``index`` of ``size`` and do its share.

    An error is put on ``failures`` (one line) before the process ends, so the first one there is the cause
    (a process waiting for this one fails only after it).
    """
    import torch
    import torch.distributed as dist

    from backends.safetensors import Workers, decompose_share
    from tools.distributed import init_process_group, process_device

    torch.set_num_threads(1)  # the parent's OpenMP pool does not survive a fork; the engine's BLAS threads are set
    init_process_group(process_device(index), init_method=store, rank=index, world_size=size)
    try:
        decompose_share(job, Workers(index, size, dist.barrier, threads), progress if index == 0 else None)
    except BaseException as err:
        kind = next((name for name, kind in _RAISED.items() if isinstance(err, kind)), "RuntimeError")
        failures.put((kind, f"process {index} of {size} failed: {type(err).__name__}: {err}"))
        raise
    finally:
        dist.destroy_process_group()


def _distributed(threads: int | None) -> Any:
    """This process's :class:`Workers`: torch.distributed's rank and world under torchrun, else one.

    The process group is NCCL when CUDA is there (each process on its ``LOCAL_RANK``'s device), else gloo.
    """
    from backends.safetensors import Workers

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Workers(threads=threads)
    import torch.distributed as dist

    from tools.distributed import init_process_group, process_device

    if not dist.is_initialized():
        init_process_group(process_device(int(os.environ.get("LOCAL_RANK", "0"))))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return Workers(dist.get_rank(), dist.get_world_size(), dist.barrier,
                   threads or max(1, (os.cpu_count() or 1) // local))


def _shared_folder(folder: Path | None) -> Path:
    """Rank 0's ``folder``, on every rank."""
    import torch.distributed as dist

    box = [str(folder) if folder is not None else None]
    dist.broadcast_object_list(box, src=0)
    return Path(str(box[0]))


def _outputs(args: argparse.Namespace) -> tuple[Any, Path | None]:
    """The command's outputs, checked before any work; the ``Outputs`` and the report's key.

    ``-o`` is a new folder (or, with ``--force``, one an earlier run wrote); ``--report`` is not an input.
    """
    outputs = command_outputs(args)
    report = outputs.file(args.report, "--report") if args.report else None
    outputs.check()
    target = Path(args.output)
    held = set(os.listdir(target)) if target.is_dir() else set()
    foreign = sorted(held - set(os.listdir(args.model)) - {"decompose_config.json", "report.json"})
    if foreign:
        raise FileExistsError(f"-o {args.output!r} holds {', '.join(map(repr, foreign[:5]))}, which this command "
                              f"does not write: give a new folder (a folder holding other files is never replaced)")
    if held and not args.force:
        raise FileExistsError(f"-o {args.output!r} already holds files an earlier run wrote; add --force to "
                              f"replace them, or give a new folder")
    return outputs, report


def decompose(args: argparse.Namespace) -> int:
    from lowrank_ir._files import atomic_directory, write_json
    from lowrank_ir._report import report_document
    from tools.html_report import check_report_option, write_report

    _check(args)
    check_report_option(args.report)
    policy = chosen_policy(args)[0]
    forked = args.nproc is not None and args.nproc > 1 and int(os.environ.get("WORLD_SIZE", "1")) <= 1
    workers = None if forked else _distributed(args.threads)  # torch is imported after the checks when forking
    if workers is not None and workers.rank != 0:
        from backends.safetensors import run_checkpoint

        run_checkpoint(_prepared(args, _shared_folder(None), policy), workers)
        return 0
    outputs, report = _outputs(args)
    with outputs.writing() as stage, atomic_directory(Path(args.output).resolve()) as folder:
        progress = progress_bars(args).layers("rewrite")
        if workers is None:
            result = _forked(args, policy, folder, progress)
        else:
            from backends.safetensors import run_checkpoint

            if workers.size > 1:
                _shared_folder(folder)
            result = run_checkpoint(_prepared(args, folder, policy), workers, progress)
        document = report_document(result.report, policy=policy_of(args), model=args.model, data_aware=False,
                                   decompose_config=result.decompose_config)
        write_json(folder / "decompose_config.json", result.decompose_config)
        write_json(folder / "report.json", document)
        if report is not None:  # moved into place with the folder, or not at all
            write_report(document, stage.path(report), args.report)
    processes = args.nproc if workers is None else workers.size
    print(result.report.table(only_decomposed=True))
    print(f"saved {len(set(result.weight_map.values()))} shard(s), decompose_config.json and report.json "
          f"in {args.output}" + (f" ({processes} processes)" if processes > 1 else ""))
    return 0
