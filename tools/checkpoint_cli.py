"""``lowrank decompose MODEL_DIR -o OUT_DIR``: a Hugging Face checkpoint folder decomposed layer by layer.

The folder is streamed (``backends/safetensors.py``): one Linear layer in memory at a time, the output
written as shards of the input's layout into a temporary folder that becomes ``OUT_DIR`` only when
everything is written, with ``decompose_config.json`` and ``report.json`` beside the weights.

Several processes share the work under torch.distributed (gloo on the CPU, NCCL when CUDA is there:
only barriers and one broadcast pass between them): started by ``torchrun --nproc_per_node N
[--nnodes M ...] -m tools.cli decompose ...``, or by ``--nproc N``, which runs exactly that on this
machine. Rank 0 creates the temporary folder and tells the others where it is (every node must see it:
a shared file system), and makes it ``OUT_DIR`` at the end.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
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


def _launch(args: argparse.Namespace) -> int:
    """Run this command again under ``torchrun --standalone --nproc_per_node N``; its exit code."""
    argv = ["decompose", args.model, "-o", args.output, "--divisor", str(args.divisor)]
    if args.fixed is not None:
        argv += ["--fixed", str(args.fixed)]
    elif args.dict is not None:
        argv += ["--dict", args.dict]
    elif args.vbmf:
        argv += ["--vbmf"]
    else:
        argv += ["--ratio", repr(args.ratio)]
    for option in ("excludes", "threads", "report"):
        if getattr(args, option) is not None:
            argv += [f"--{option}", str(getattr(args, option))]
    if args.force:
        argv += ["--force"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(args.nproc), "-m", "tools.cli", *argv]
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    return subprocess.run(command, env=env, check=False).returncode


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
    if args.nproc is not None and args.nproc > 1 and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        _outputs(args)  # bad outputs stop here, before torchrun starts; torch is not imported in this process
        return _launch(args)
    from backends.safetensors import decompose_checkpoint

    workers = _distributed(args.threads)
    if workers.rank == 0:
        outputs, report = _outputs(args)
    source = Path(args.model).resolve()
    if workers.rank != 0:
        decompose_checkpoint(source, _shared_folder(None), policy, workers=workers)
        return 0
    with outputs.writing() as stage, atomic_directory(Path(args.output).resolve()) as folder:
        if workers.size > 1:
            _shared_folder(folder)
        result = decompose_checkpoint(source, folder, policy, progress=progress_bars(args).layers("rewrite"),
                                      workers=workers)
        document = report_document(result.report, policy=policy_of(args), model=args.model, data_aware=False,
                                   decompose_config=result.decompose_config)
        write_json(folder / "decompose_config.json", result.decompose_config)
        write_json(folder / "report.json", document)
        if report is not None:  # moved into place with the folder, or not at all
            write_report(document, stage.path(report), args.report)
    print(result.report.table(only_decomposed=True))
    print(f"saved {len(set(result.weight_map.values()))} shard(s), decompose_config.json and report.json "
          f"in {args.output}" + (f" ({workers.size} processes)" if workers.size > 1 else ""))
    return 0
