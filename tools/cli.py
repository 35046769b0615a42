"""The ``lowrank`` command line.

Commands:
  demo        the main job on a built-in model (no downloads)
  decompose   decompose a PyTorch model given as ``module:factory`` (+ weights) and save it, an ONNX
              file (``MODEL.onnx -o OUT.onnx``, validated in onnxruntime; see ``tools/onnx_cli.py``), or a
              Hugging Face folder (``MODEL_DIR -o OUT_DIR``: in memory with ``--calib-text``, see
              ``tools/hf_cli.py``; else streamed layer by layer, see ``tools/checkpoint_cli.py``)
  inspect     per-layer table of a model: shapes, chosen ranks, parameters and FLOPs before/after
  report      draw a ``report.json`` as one self-contained HTML page (``tools/html_report.py``)
  convert     rebuild an ONNX file as a trainable PyTorch or MindSpore model, saved as a folder
              (``MODEL.onnx --to torch|mindspore -o OUT``; see ``tools/parity_cli.py``)
  parity      run a model in onnxruntime, PyTorch and MindSpore on the same inputs and compare them,
              before and after decomposition; exit 1 above ``--tolerance``
  bench       time an ONNX model and its decomposed version in onnxruntime, interleaved (``tools/bench_cli.py``)

Bad input gives one line on stderr and exit code 2; nothing half-written is left behind. Outputs never
replace an input; an existing output folder only receives the command's own file names, and files of
those names are replaced only with ``--force`` (``lowrank_ir._files.Outputs``).
Every command takes ``-v`` (progress messages; ``-vv`` for details), ``-q`` (errors only) and
``--progress`` (progress bars even when stderr is not a terminal); ``lowrank --version`` prints the
version. What the commands share (errors, model arguments, rank options, outputs, progress bars) is in
``tools/common.py``, the report's drawing in ``tools/html_report.py``; only this module dispatches to
the command modules, so ``tools/`` has no import cycle.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tools.common import (
    EXIT_BAD_INPUT,
    UsageError,
    add_limit_arg,
    budget_target,
    choose_ranks,
    command_outputs,
    is_onnx_path,
    load_model,
    progress_bars,
    show_report,
)

__all__ = ["main"]

#: The files ``lowrank decompose module:factory -o DIR`` writes in ``DIR`` besides ``state_dict.<format>``.
TORCH_OUTPUT_FILES = ("decompose_config.json", "report.json")


def _add_policy_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--ratio", type=float, default=0.5,
                       help="keep this fraction of each layer's parameters (default 0.5)")
    group.add_argument("--fixed", type=int, help="the same rank for every layer")
    group.add_argument("--dict", metavar="FILE",
                       help='JSON file of {"regex": rank | ratio | "vbmf" | [out, in]} rules (the first key that '
                            'matches a layer name wins; a saved decompose_config.json is one)')
    group.add_argument("--vbmf", action="store_true", help="ranks estimated by EVBMF from the weights")
    group.add_argument("--energy", type=float, metavar="KEEP",
                       help="each layer keeps this fraction in (0, 1] of its spectral energy (of its output "
                            "energy with --calib)")
    group.add_argument("--budget-params", type=budget_target, metavar="N",
                       help="one parameter target for the decomposable layers together: a fraction in (0, 1) "
                            "or a count; ranks go where they cost the least output error (with --calib, "
                            "each layer's effect on the output is measured)")
    group.add_argument("--budget-flops", type=budget_target, metavar="N",
                       help="the same with a FLOP target")
    group.add_argument("--budget-latency", type=float, metavar="T",
                       help="ONNX: reach this fraction in (0, 1) of the model's latency, measured in onnxruntime "
                            "(1 thread) at --input-shape")
    parser.add_argument("--excludes", metavar="A,B", help="comma-separated layer names to leave alone")
    parser.add_argument("--divisor", type=int, default=64,
                        help="round ranks to multiples of this (1 disables; default 64)")
    parser.add_argument("--input-shape", action="append", metavar="NAME=D1,D2,...",
                        help="ONNX: fix a dynamic input's dims (for per-sample FLOPs and random validation "
                             "feeds); repeat for each input")
    add_limit_arg(parser)


def _cmd_demo(args: argparse.Namespace) -> int:
    from tools.demo import run_demo

    run_demo(out=args.out, ratio=args.ratio, framework=args.framework, divisor=args.divisor, force=args.force)
    return 0


def _onnx_only(args: argparse.Namespace, names: Sequence[str]) -> None:
    given = [f"--{name.replace('_', '-')}" for name in names if getattr(args, name, None) is not None]
    if given:
        raise UsageError(f"{', '.join(given)} apply to ONNX models (MODEL.onnx), not to {args.model!r}")


def _folder_only(args: argparse.Namespace) -> None:
    given = [f"--{name.replace('_', '-')}" for name in ("calib_text", "max_length", "batch_size")
             if getattr(args, name, None) is not None]
    given += [f"--{name.replace('_', '-')}" for name in ("in_memory", "count_padding") if getattr(args, name, False)]
    if given:
        raise UsageError(f"{', '.join(given)} apply to Hugging Face model folders, not to {args.model!r}")


def _cmd_inspect(args: argparse.Namespace) -> int:
    from lowrank_ir import Decompose
    from tools import checkpoint_cli, hf_cli, onnx_cli

    if checkpoint_cli.is_checkpoint_path(args.model):
        return hf_cli.inspect(args)
    _folder_only(args)
    if is_onnx_path(args.model):
        return onnx_cli.inspect(args)
    _onnx_only(args, ["input_shape"])
    model = load_model(args.model, args.weights)
    decomposer = choose_ranks(Decompose(model), args)
    show_report(decomposer.report, args)
    return 0


def _cmd_decompose(args: argparse.Namespace) -> int:
    from tools import checkpoint_cli, hf_cli, onnx_cli

    if checkpoint_cli.is_checkpoint_path(args.model):
        return hf_cli.decompose(args) if hf_cli.in_memory(args) else checkpoint_cli.decompose(args)
    checkpoint_cli.folder_only(args)
    _folder_only(args)
    if is_onnx_path(args.model):
        return onnx_cli.decompose(args)
    _onnx_only(args, ["input_shape", "calib", "feeds", "tolerance", "opset"])
    from backends.torch import save_weights
    from lowrank_ir import Decompose, SafeWriteUmask, write_json
    from tools.html_report import check_report_option, decomposer_document, write_report

    weights = f"state_dict.{args.weights_format}"
    names = (weights, *TORCH_OUTPUT_FILES)
    outputs = command_outputs(args)
    folder = outputs.folder(args.output, names, "-o")
    report = outputs.file(args.report, "--report") if args.report else None
    outputs.check()
    check_report_option(args.report)
    model = load_model(args.model, args.weights)
    with progress_bars(args) as bars:
        decomposer = choose_ranks(Decompose(model, progress=bars), args)
        decomposed = decomposer.decompose_network()
    with outputs.writing() as stage:
        with SafeWriteUmask():
            save_weights(decomposed, stage.path(folder / weights))
        write_json(stage.path(folder / "decompose_config.json"), decomposer.config_document())
        document = decomposer_document(decomposer, args, data_aware=False)
        write_json(stage.path(folder / "report.json"), document)
        if report is not None:
            write_report(document, stage.path(report), args.report)
    print(decomposer.report.table(only_decomposed=True))
    print(f"saved {', '.join(names)} in {args.output}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from tools import parity_cli

    return parity_cli.convert(args)


def _cmd_parity(args: argparse.Namespace) -> int:
    from tools import parity_cli

    return parity_cli.parity(args)


def _add_text_args(parser: argparse.ArgumentParser) -> None:
    """``--calib-text`` and its batching: data-aware decomposition of a Hugging Face folder on sentences."""
    parser.add_argument("--calib-text", metavar="FILE",
                        help="Hugging Face folders: calibration sentences, one a line (UTF-8), tokenized with the "
                             "folder's tokenizer into padded batches; padding is left out of the statistics")
    parser.add_argument("--max-length", type=int, metavar="N",
                        help="--calib-text: truncate sentences to N tokens (default: the tokenizer's limit, at most "
                             "512)")
    parser.add_argument("--batch-size", type=int, metavar="N", help="--calib-text: sentences per batch (default 16)")
    parser.add_argument("--count-padding", action="store_true",
                        help="--calib-text: count the padding positions in the statistics (by default they are left "
                             "out, so a padded batch gives the statistics of its sentences one by one)")


def _add_force(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true",
                        help="replace files that exist under the names this command writes (nothing else is touched; "
                             "an input is never replaced)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lowrank",
        description="Make trained neural networks smaller and faster by low-rank decomposition.",
        epilog="Start with 'lowrank demo'. Each command has its own --help.")
    from lowrank_ir import __version__

    parser.add_argument("--version", action="version", version=f"lowrank {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser("demo", help="decompose a built-in model and show what changed",
                               description="Decompose a built-in CNN + MLP at --ratio, print the per-layer "
                                           "table and the agreement with the original, save the results.")
    demo.add_argument("--out", metavar="DIR", help="folder for the results (created, or an existing one receives "
                                                   "the three files; default: a new temporary folder)")
    demo.add_argument("--ratio", type=float, default=0.5, help="parameter ratio per layer (default 0.5)")
    demo.add_argument("--divisor", type=int, default=16, help="round ranks to multiples of this (default 16)")
    demo.add_argument("--framework", default="torch", choices=["torch", "mindspore"],
                      help="framework of the demo model (the same model and weights in both; default torch)")
    _add_force(demo)
    demo.set_defaults(run=_cmd_demo)

    inspect = commands.add_parser("inspect", help="per-layer table of a model under a rank policy",
                                  description="Print each layer's shape, chosen rank, parameters and FLOPs "
                                              "before/after, or why it is left alone.")
    inspect.add_argument("model", help="an ONNX file (MODEL.onnx), a PyTorch model as 'module:factory' "
                                       "(e.g. tests.models:resnet50), or a Hugging Face model folder (config.json + "
                                       "safetensors; loaded in memory)")
    inspect.add_argument("--weights", metavar="FILE", help="state dict (.pt) to load into the model")
    inspect.add_argument("--json", action="store_true",
                         help="print the report as JSON (totals and one object per layer) instead of the table")
    _add_policy_args(inspect)
    _add_text_args(inspect)
    inspect.set_defaults(run=_cmd_inspect)

    decompose = commands.add_parser(
        "decompose", help="decompose a model and save it",
        description="Decompose an ONNX model (MODEL.onnx -o OUT.onnx: checked, validated against the original "
                    "in onnxruntime, written atomically), a PyTorch model given as module:factory (its state "
                    "dict, decompose_config.json and report.json saved in the -o folder), or a Hugging Face model "
                    "folder (-o OUT_DIR; data-aware with --calib-text).")
    decompose.add_argument("model", help="an ONNX file (MODEL.onnx), a PyTorch model as 'module:factory' "
                                         "(e.g. tests.models:resnet50), or a Hugging Face model folder "
                                         "(config.json + safetensors): loaded in memory with --calib-text, "
                                         "--energy, --budget-* or --in-memory (OUT_DIR loads with "
                                         "lowrank_ir.hf.load_decomposed), else streamed layer by layer "
                                         "(OUT_DIR: shards in the input's layout)")
    decompose.add_argument("--weights", metavar="FILE", help="PyTorch: state dict (.pt) to load into the model")
    decompose.add_argument("-o", "--output", required=True, metavar="OUT",
                           help="ONNX: the decomposed model's file (OUT.onnx); PyTorch: the output folder (created, "
                                "or an existing one receives the three files; nothing else in it is touched); "
                                "checkpoint folders: a new output folder")
    decompose.add_argument("--report", metavar="FILE.json|FILE.html",
                           help="also write the report here: JSON, or with .html one self-contained page with "
                                "spectra, ranks, errors and sensitivities drawn (needs matplotlib)")
    decompose.add_argument("--weights-format", choices=["safetensors", "pt"], default="safetensors",
                           help="PyTorch: the state dict as state_dict.safetensors (the default: no pickle) or "
                                "state_dict.pt (torch.save)")
    _add_policy_args(decompose)
    decompose.add_argument("--nproc", type=int, metavar="N",
                           help="checkpoint folders: share the layers among N processes forked once the folder is "
                                "read (torch.distributed, gloo); several machines: run torchrun --nnodes ... -m "
                                "tools.cli decompose ... on each")
    decompose.add_argument("--threads", type=int, metavar="N",
                           help="checkpoint folders: BLAS threads per process (default: cores / processes)")
    decompose.add_argument("--calib", metavar="FEEDS.npz",
                           help="ONNX: calibration feeds (one array per input, by name) for data-aware "
                                "decomposition; layer inputs are collected with onnxruntime")
    decompose.add_argument("--feeds", metavar="FEEDS.npz",
                           help="ONNX: feeds to validate on (default: random feeds from the input specs)")
    decompose.add_argument("--tolerance", type=float, metavar="REL",
                           help="ONNX: exit with code 1 (and write no model) when an output's relative error "
                                "max|d|/max|ref| exceeds this")
    decompose.add_argument("--opset", type=int, metavar="N",
                           help="ONNX: convert the model to this opset first (onnx.version_converter)")
    _add_text_args(decompose)
    decompose.add_argument("--in-memory", action="store_true",
                           help="Hugging Face folders: load the model in memory even without --calib-text (the "
                                "output then loads with lowrank_ir.hf.load_decomposed)")
    _add_force(decompose)
    decompose.set_defaults(run=_cmd_decompose)

    convert = commands.add_parser(
        "convert", help="rebuild an ONNX model as a trainable PyTorch or MindSpore model",
        description="Lower an ONNX model to the IR and rebuild it as a trainable PyTorch nn.Module or MindSpore "
                    "nn.Cell whose parameters carry the ONNX initializer names. The -o folder receives the IR "
                    "graph (graph.json + params.safetensors), the native weights (model.pt: a state dict, or "
                    "model.ckpt: a checkpoint) and converted.json. Load it back in Python with "
                    "lowrank_ir.load_converted(OUT), optionally with weights= a state dict or checkpoint saved "
                    "after training.",
        epilog="example: lowrank convert model.onnx --to torch -o model_torch")
    convert.add_argument("model", help="the ONNX file to convert (MODEL.onnx)")
    convert.add_argument("--to", required=True, metavar="torch|mindspore", help="the framework to rebuild it in")
    convert.add_argument("-o", "--output", required=True, metavar="OUT",
                         help="the folder to write (created, or an existing one receives the four files; nothing "
                              "else in it is touched)")
    convert.add_argument("--input-shape", action="append", metavar="NAME=D1,D2,...",
                         help="fix a dynamic input's dims for shape inference (e.g. x=1,3,224,224); repeat per input")
    add_limit_arg(convert)
    _add_force(convert)
    convert.set_defaults(run=_cmd_convert)

    parity = commands.add_parser(
        "parity", help="check that onnxruntime, PyTorch and MindSpore agree on a model, decomposed and not",
        description="Run one model in onnxruntime and, rebuilt through the IR, in PyTorch and MindSpore (and as "
                    "it is, when it is a PyTorch or MindSpore model: it is exported to ONNX first) on the same "
                    "inputs, and print per output the max and mean absolute and relative differences from "
                    "onnxruntime. Then the same for the model decomposed at --ratio, with how far the decomposed "
                    "model is from the original as information. Exit code 0 when every difference is within "
                    "--tolerance, 1 when one is not, 2 for bad input.",
        epilog="examples: 'lowrank parity model.onnx --divisor 8'; 'lowrank parity mypkg.nets:small_cnn --weights "
               "w.pt --input-shape x=1,3,32,32'")
    parity.add_argument("model", help="an ONNX file (MODEL.onnx), or 'module:factory' where factory() returns a "
                                      "PyTorch nn.Module or a MindSpore nn.Cell (the framework is detected)")
    parity.add_argument("--weights", metavar="FILE",
                        help="module:factory models: a PyTorch state dict (.pt) or MindSpore checkpoint (.ckpt) "
                             "to load first (strictly: every name and shape must match)")
    parity.add_argument("--feeds", metavar="FILE.npz",
                        help="the inputs, one array per input by name (module:factory models: in the order the "
                             "model takes them). Default: random inputs from the ONNX input specs")
    parity.add_argument("--input-shape", action="append", metavar="NAME=D1,D2,...",
                        help="an input's dims for random inputs (ONNX: fixes dynamic dims; module:factory models "
                             "without --feeds: random float32 inputs of these shapes, in this order); repeat per "
                             "input")
    group = parity.add_mutually_exclusive_group()
    group.add_argument("--ratio", type=float, default=0.5,
                       help="also check the model decomposed at this per-layer parameter ratio (default 0.5)")
    group.add_argument("--no-decompose", action="store_true", help="check the original model only")
    parity.add_argument("--divisor", type=int, default=64,
                        help="round the decomposed ranks to multiples of this (default 64; small models need a "
                             "smaller one, e.g. 8)")
    parity.add_argument("--tolerance", type=float, default=1e-4, metavar="REL",
                        help="the largest relative difference max|d|/max|ref| allowed (default 1e-4)")
    parity.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    parity.add_argument("--report", metavar="FILE.json", help="also write the rows as JSON here")
    add_limit_arg(parity)
    _add_force(parity)
    parity.set_defaults(run=_cmd_parity)

    from tools import bench_cli, html_report

    bench_cli.add_parser(commands)
    html_report.add_parser(commands)
    for command in commands.choices.values():
        _add_verbosity(command)
    return parser


def _add_verbosity(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="count", default=0,
                       help="log progress messages to stderr (-vv: details too)")
    group.add_argument("-q", "--quiet", action="store_true", help="log errors only (and no progress bars)")
    parser.add_argument("--progress", action="store_true",
                        help="draw progress bars on stderr even when it is not a terminal (by default they are "
                             "drawn on a terminal only)")


def _set_verbosity(args: argparse.Namespace) -> None:
    """``-v``/``-vv``/``-q`` as the library's log level; without them Python's default (warnings) holds."""
    from lowrank_ir import set_logger_level

    if args.quiet:
        set_logger_level("error")
    elif args.verbose:
        set_logger_level("info" if args.verbose == 1 else "debug")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command ``argv`` (default: this process's arguments); the exit status.

    Called with ``argv`` (in another program's process, or a test's), it leaves the collector as it found it:
    a checkpoint command freezes the objects alive before its work (``gc.freeze``, so that neither the
    collections during the work nor the forked processes touch them), and that is undone at the end. As the
    process's own command (no ``argv``) the freeze stays, so the interpreter's exit skips them too.
    """
    import gc

    from lowrank_ir._limits import size_limit

    parser = build_parser()
    args = parser.parse_args(argv)
    _set_verbosity(args)
    frozen = gc.get_freeze_count()
    try:
        with size_limit(getattr(args, "max_bytes", None)):
            return int(args.run(args))
    except (UsageError, ValueError, TypeError, OSError, ImportError) as err:
        print(f"lowrank {args.command}: error: {err}".splitlines()[0], file=sys.stderr)
        return EXIT_BAD_INPUT
    except MemoryError as err:  # what the size checks could not foresee (intermediate results)
        print(f"lowrank {args.command}: error: out of memory ({err or 'MemoryError'}); use smaller inputs or "
              f"a machine with more memory".splitlines()[0], file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        if argv is not None and frozen == 0 and gc.get_freeze_count():
            gc.unfreeze()  # what the command froze goes back to the collector of the caller's process


if __name__ == "__main__":
    sys.exit(main())
