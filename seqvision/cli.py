"""The ``seqvision`` command line: one subcommand per job, each with its own ``--help``.

Subcommands live in their modules (``seqvision.train``, ``seqvision.benchmark`` ...), each exposing
``build_parser()`` and ``run(args)``; they are imported only when used, so ``seqvision --help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import textwrap
import warnings

from .errors import UserError

# name -> (module, one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "models": ("seqvision.cli", "list every variant: parameters, GFLOPs with/without LSTMs, feature maps"),
    "info": ("seqvision.cli", "summary of one model: parameters, GFLOPs, feature shapes, preprocessing"),
    "convert": ("seqvision.cli", "convert a checkpoint between the authors', timm's and seqvision's formats"),
    "predict": ("seqvision.predict", "classify image files, directories or glob patterns with a trained model"),
    "export": ("seqvision.export", "export to ONNX or torch.export with dynamic batch/height/width, checked"),
    "demo": ("seqvision.demo", "train a small Sequencer2D on the built-in digits, then predict with it"),
    "train": ("seqvision.train", "train or fine-tune with the paper's recipes (configs/), one process or torchrun"),
    "validate": ("seqvision.evaluate", "top-1/top-5, loss, per-class accuracy and confusion matrix of a checkpoint"),
    "resolution-sweep": ("seqvision.analysis.resolution", "accuracy against input size (resolution adaptability)"),
    "robustness": ("seqvision.analysis.robustness", "ImageNet-C mCE, ImageNet-A/-R/-Sketch style evaluations"),
    "adversarial": ("seqvision.analysis.adversarial", "robust accuracy under FGSM and L-inf PGD attacks"),
    "erf": ("seqvision.analysis.erf", "effective receptive field heat-maps per layer, seqvision or timm models"),
    "study": ("seqvision.analysis.study", "Sequencer2D vs same-size timm peers trained alike: resolution sweep, ERFs"),
    "bench": ("seqvision.benchmark", "CPU/GPU speed and memory: seqvision engines vs timm and convnext_tiny"),
}


# -- argument types shared by the subcommands ------------------------------------------------------------
# argparse turns an ArgumentTypeError into one line ("seqvision bench: error: argument --batch: must be ...")
# instead of the traceback a 0 or a negative count would raise deep inside torch or the data loader.
def _number(text: str, kind: type, ok, what: str) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or value != value or not ok(value):  # value != value: NaN
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1 (batch sizes, counts, image sizes)."""
    return _number(text, int, lambda v: v >= 1, "an integer of at least 1")


def non_negative_int(text: str) -> int:
    """argparse type: an integer of 0 or more (worker processes, warm-up steps)."""
    return _number(text, int, lambda v: v >= 0, "an integer of 0 or more")


def positive_float(text: str) -> float:
    """argparse type: a number above 0 (step sizes, crop fractions)."""
    return _number(text, float, lambda v: v > 0, "a number above 0")


def non_negative_float(text: str) -> float:
    """argparse type: a number of 0 or more (attack radii)."""
    return _number(text, float, lambda v: v >= 0, "a number of 0 or more")


def positive_int_list(text: str) -> list[int]:
    """argparse type: comma-separated integers of at least 1, e.g. ``1,8,32``."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        values = [positive_int(p) for p in parts]
    except argparse.ArgumentTypeError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers of at least 1 (e.g. 1,8,32), got {text!r}")
    return values


# -- seqvision models ----------------------------------------------------------------------------------
def _models_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="seqvision models",
        description="List the registered Sequencer variants.",
        epilog="example:\n  seqvision models --flops\n  seqvision models 'sequencer2d_s*'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("pattern", nargs="?", default="*", help="shell-style name filter (default: all)")
    p.add_argument("--flops", action="store_true", help="add GFLOPs (multiply-adds) with and without LSTMs")
    p.add_argument("--img-size", type=positive_int, default=224, help="input size for the FLOPs and feature maps")
    return p


def models_table(pattern: str = "*", flops: bool = True, img_size: int = 224) -> str:
    """The markdown table printed by ``seqvision models`` (the README embeds ``--flops`` at 224)."""
    from .models import list_models
    from .models.complexity import variant_complexity

    names = list_models(pattern)
    if not names:
        raise UserError(f"no model matches {pattern!r}; `seqvision models` lists them all")
    head = ["model", "params"]
    if flops:
        head += [f"GMACs @{img_size} (with LSTMs, paper)", "GMACs (without LSTMs)"]
    head += [f"feature maps @{img_size} (H x W x C per stage)"]
    rows = []
    for name in names:
        c = variant_complexity(name, img_size)
        row = [name, f"{c.params:,}"]
        if flops:
            row += [f"{c.macs / 1e9:.2f}", f"{c.macs_without_rnn / 1e9:.2f}"]
        row += [", ".join(f"{h}x{w}x{ch}" for h, w, ch in c.feature_shapes)]
        rows.append(row)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _run_models(args: argparse.Namespace) -> int:
    print(models_table(args.pattern, args.flops, args.img_size))
    return 0


# -- seqvision info ------------------------------------------------------------------------------------
def _info_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="seqvision info",
        description="Summarise one model: parameters, multiply-adds, feature shapes and preprocessing.",
        epilog="example:\n  seqvision info sequencer2d_s --img-size 392",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", nargs="?", default="sequencer2d_s", help="variant name (default: sequencer2d_s)")
    p.add_argument("--img-size", type=positive_int, default=None, help="input size (default: the variant's own)")
    return p


def model_summary(name: str, img_size: int | None = None) -> str:
    """A human-readable summary of a registered variant (``seqvision info``)."""
    from .models import model_config, resolve_name
    from .models.complexity import variant_complexity
    from .models.sequencer import pretrained_cfg_for

    name = resolve_name(name)
    cfg = pretrained_cfg_for(name)
    size = img_size or cfg["input_size"][-1]
    c = variant_complexity(name, size)
    arch = model_config(name)
    lines = [
        f"{name}",
        f"  parameters            {c.params:,}",
        f"  multiply-adds @{size}   {c.macs / 1e9:.2f} G with LSTMs (paper's convention), "
        f"{c.macs_without_rnn / 1e9:.2f} G without",
        f"  stages                layers {tuple(arch['layers'])}, widths {tuple(arch['embed_dims'])}, "
        f"hidden {tuple(arch['hidden_sizes'])}",
        "  feature maps          " + "  ".join(f"{h}x{w}x{ch}" for h, w, ch in c.feature_shapes),
        f"  preprocessing         {cfg['input_size'][-1]} px, crop_pct {cfg['crop_pct']}, "
        f"{cfg['interpolation']}, mean {cfg['mean']}, std {cfg['std']}",
        f"  published weights     {cfg['url'] or 'none'}",
    ]
    return "\n".join(lines)


def _run_info(args: argparse.Namespace) -> int:
    print(model_summary(args.model, args.img_size))
    return 0


# -- seqvision convert ---------------------------------------------------------------------------------
def _convert_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="seqvision convert",
        description=(
            "Convert a Sequencer checkpoint between formats. The source format (authors' .pth, timm's "
            ".safetensors/.pth, seqvision's .safetensors, or a seqvision training checkpoint) is detected."
        ),
        epilog=(
            "examples:\n"
            "  seqvision convert sequencer2d_s.pth sequencer2d_s.safetensors\n"
            "  seqvision convert model.safetensors authors.pth --to authors"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", help="checkpoint to read")
    p.add_argument("dst", help="file to write (.safetensors or .pth)")
    p.add_argument("--to", choices=("seqvision", "timm", "authors"), default="seqvision", help="output format")
    return p


def _run_convert(args: argparse.Namespace) -> int:
    from .weights import convert_checkpoint

    r = convert_checkpoint(args.src, args.dst, args.to)
    variant = r["variant"] or "unrecognised variant"
    print(f"{args.src} ({r['from']} layout, {variant}, {r['tensors']} tensors) -> {args.dst} ({r['to']})")
    return 0


_LOCAL = {
    "models": (_models_parser, _run_models),
    "info": (_info_parser, _run_info),
    "convert": (_convert_parser, _run_convert),
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

        example:
          seqvision models --flops       # every variant with its cost
        """
    ).replace("{rows}", rows)


def get_parser(command: str) -> tuple[argparse.ArgumentParser, object]:
    """The argument parser and ``run`` function of a subcommand."""
    if command in _LOCAL:
        build, run = _LOCAL[command]
        return build(), run
    module = importlib.import_module(COMMANDS[command][0])
    parser = module.build_parser()
    parser.prog = f"seqvision {command}"
    return parser, module.run


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_main_help())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"seqvision {__version__}")
        return 0
    _quiet_warnings()
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"seqvision: unknown command {command!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    parser, run = get_parser(command)
    args = parser.parse_args(rest)
    try:
        return int(run(args) or 0)
    except UserError as e:
        if os.environ.get("SEQVISION_DEBUG"):
            raise
        print(f"seqvision {command}: error: {e}", file=sys.stderr)
        return 2


def _quiet_warnings() -> None:
    # Show our own warnings (e.g. "classifier re-initialised") once, without the source line.
    warnings.formatwarning = lambda msg, cat, *a, **k: f"{cat.__name__}: {msg}\n"


if __name__ == "__main__":
    sys.exit(main())
