"""``lowrank decompose MODEL_DIR -o OUT_DIR``: a Hugging Face checkpoint folder decomposed layer by layer.

The folder is streamed (``backends/safetensors.py``): one Linear layer in memory at a time, the output
written as shards of the input's layout into a temporary folder that becomes ``OUT_DIR`` only when
everything is written, with ``decompose_config.json`` and ``report.json`` beside the weights.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tools.cli import UsageError, _progress_bar

__all__ = ["decompose", "is_checkpoint_path"]

#: Options of other model kinds that make no sense for a checkpoint folder.
_NOT_FOR_FOLDERS = ("weights", "input_shape", "calib", "feeds", "tolerance", "opset", "energy", "budget_params",
                    "budget_flops")


def is_checkpoint_path(spec: str) -> bool:
    """Whether the model argument names a folder (a checkpoint folder, or something claiming to be one)."""
    return Path(spec).is_dir()


def decompose(args: argparse.Namespace) -> int:
    from backends.safetensors import decompose_checkpoint
    from lowrank_ir._files import atomic_directory, write_json
    from tools.onnx_cli import policy_from_args

    given = [f"--{name.replace('_', '-')}" for name in _NOT_FOR_FOLDERS if getattr(args, name, None) is not None]
    if given:
        raise UsageError(f"{', '.join(given)} cannot be used with a checkpoint folder ({args.model!r}): it is "
                         f"decomposed layer by layer with --ratio, --fixed, --dict or --vbmf")
    policy = policy_from_args(args)
    source, target = Path(args.model).resolve(), Path(args.output).resolve()
    if target == source or source in target.parents:
        raise UsageError(f"output folder {args.output!r} must be outside the checkpoint folder {args.model!r}")
    with atomic_directory(target) as folder:
        result = decompose_checkpoint(source, folder, policy, progress=_progress_bar("decomposing"))
        write_json(folder / "decompose_config.json", result.decompose_config)
        write_json(folder / "report.json", result.report.to_dict())
    if args.report:
        write_json(args.report, result.report.to_dict())
    print(result.report.table(only_decomposed=True))
    print(f"saved {len(set(result.weight_map.values()))} shard(s), decompose_config.json and report.json "
          f"in {args.output}")
    return 0
