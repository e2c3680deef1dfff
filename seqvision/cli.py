"""The ``seqvision`` command line: one subcommand per job, each with its own ``--help``.

Each subcommand is a module (``seqvision.commands.train`` ...) exposing ``build_parser()`` and ``run(args)``;
it is imported only when used, so ``seqvision --help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import textwrap
import warnings

from . import __version__
from .errors import UserError

# name -> (module, one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "models": ("seqvision.commands.models", "list every variant: parameters, GFLOPs with/without LSTMs, feature maps"),
    "info": ("seqvision.commands.info", "summary of one model: parameters, GFLOPs, feature shapes, preprocessing"),
    "convert": ("seqvision.commands.convert", "convert a checkpoint between the authors', timm's, seqvision's formats"),
    "predict": ("seqvision.commands.predict", "classify image files, directories or glob patterns"),
    "export": ("seqvision.commands.export", "export to ONNX or torch.export with dynamic batch/height/width, checked"),
    "demo": ("seqvision.commands.demo", "train a small Sequencer2D on the built-in digits, then predict with it"),
    "train": ("seqvision.commands.train", "train or fine-tune with the paper's recipes, one process or torchrun"),
    "validate": ("seqvision.commands.validate", "top-1/top-5, loss, per-class accuracy, confusion matrix of a model"),
    "resolution-sweep": ("seqvision.commands.resolution_sweep", "accuracy against input size (resolution adapts)"),
    "robustness": ("seqvision.commands.robustness", "ImageNet-C mCE, ImageNet-A/-R/-Sketch style evaluations"),
    "adversarial": ("seqvision.commands.adversarial", "robust accuracy under FGSM and L-inf PGD attacks"),
    "erf": ("seqvision.commands.erf", "effective receptive field heat-maps per layer, seqvision or timm models"),
    "study": ("seqvision.commands.study", "Sequencer2D vs same-size timm peers trained alike: resolution, ERFs"),
    "bench": ("seqvision.commands.bench", "CPU/GPU speed and memory: seqvision engines vs timm and convnext_tiny"),
}


def _main_help() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {n.ljust(width)}  {summary}" for n, (_, summary) in COMMANDS.items())
    return textwrap.dedent(
        """\
        usage: seqvision COMMAND [options]   (seqvision COMMAND --help for each)

        Sequencer (Deep LSTM for image classification): train, evaluate, analyse, deploy.

        commands:
        {rows}

        options for every command:
          --debug        show the Python traceback of an internal error (or set SEQVISION_DEBUG=1)

        example:
          seqvision models --flops       # every variant with its cost
        """
    ).replace("{rows}", rows)


def get_parser(command: str) -> tuple[argparse.ArgumentParser, object]:
    """The argument parser and ``run`` function of a subcommand."""
    module = importlib.import_module(COMMANDS[command][0])
    parser = module.build_parser()
    parser.prog = f"seqvision {command}"
    return parser, module.run


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or bool(os.environ.get("SEQVISION_DEBUG"))
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_main_help())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"seqvision {__version__}")
        return 0
    _quiet_warnings()
    _printable_stdout()
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"seqvision: unknown command {command!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        parser, run = get_parser(command)
        args = parser.parse_args(rest)
        return int(run(args) or 0)
    except UserError as e:
        if debug:
            raise
        print(f"seqvision {command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"seqvision {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not the user's input: one line, the trace on request
        if debug:
            raise
        text = str(e).strip().splitlines()
        what = f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__
        print(
            f"seqvision {command}: internal error: {what}; run with --debug (or SEQVISION_DEBUG=1) for the traceback",
            file=sys.stderr,
        )
        return 1


def _printable_stdout() -> None:
    # A file name or class name the terminal's encoding cannot show is printed escaped, not a crash.
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        try:
            reconfigure(errors="backslashreplace")
        except (ValueError, OSError):
            pass


def _quiet_warnings() -> None:
    # Show our own warnings (e.g. "classifier re-initialised") once, without the source line.
    warnings.formatwarning = lambda msg, cat, *a, **k: f"{cat.__name__}: {msg}\n"


if __name__ == "__main__":
    sys.exit(main())
