"""``seqvision train``: train or fine-tune a Sequencer with the paper's recipes, on one process or many."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

import yaml

from ..train import TrainConfig, Trainer, flag_specs, load_recipe, merge, parse_set, resolve_config
from ..train.checkpoint import read_training_checkpoint

EPILOG = """\
recipes (--config NAME, shipped in seqvision/configs/; default: digits):
  digits                       small Sequencer2D on scikit-learn's 8x8 digits (CPU, about a minute)
  imagenet_s / _m / _l         ImageNet-1K from scratch (paper Sec. 4: 300 + 10 epochs, AdamW 2e-3 @ 2048)
  imagenet_l_392               fine-tune L at 392 px (30 epochs, lr 5e-5 @ 512)
  cifar10 / cifar100 / flowers102 / stanford_cars   transfer from ImageNet weights (200 + 10 epochs)

examples:
  seqvision train                                    # digits, the built-in default
  seqvision train --epochs 5 --set lr=1e-3 --output runs/quick
  seqvision train --resume runs/quick                # continue exactly where it stopped
  seqvision train -c imagenet_s --data-dir /data/imagenet --set batch_size=128,workers=8
  seqvision train -c cifar10 --data-dir /data/cifar --finetune sequencer2d_s.pth
  torchrun --nproc-per-node 8 -m seqvision train -c imagenet_s --data-dir /data/imagenet

Any recipe key can be set with --set KEY=VALUE (YAML values; repeat it, e.g. --set aa=null
--set model_kwargs.layers=[2,2,4,2]). The learning rate is for the recipe's global batch
(lr_base_batch) and is scaled linearly to the batch actually used (--set lr_scaling=none turns that off).
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="seqvision train",
        description="Train or fine-tune a Sequencer with the paper's recipes (timm's pipeline); "
        "with no arguments, a small Sequencer2D on the built-in digits.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-c", "--config", default="digits", help="recipe name or YAML file (default: digits)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any recipe key (repeatable)")
    g = p.add_argument_group("common keys (shortcuts for --set)")
    for spec in flag_specs():
        flag = "--" + spec["name"].replace("_", "-")
        kw: dict[str, Any] = {"dest": spec["name"], "default": None, "help": spec["help"]}
        if spec["type"] is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = spec["type"]
            if spec["choices"]:
                kw["choices"] = spec["choices"]
            if spec["metavar"]:
                kw["metavar"] = spec["metavar"]
        g.add_argument(flag, **kw)
    r = p.add_argument_group("run")
    r.add_argument("-o", "--output", help="run directory (default: runs/<recipe>-<date-time>)")
    r.add_argument("--resume", metavar="RUN_OR_CKPT", help="continue a run (its directory or last.pth)")
    r.add_argument("--overwrite", action="store_true", help="replace a finished run in --output")
    r.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    return p


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line (shortcut flags, then ``--set``), as one config layer."""
    flags = {s["name"]: getattr(args, s["name"]) for s in flag_specs() if getattr(args, s["name"], None) is not None}
    if getattr(args, "output", None) is not None:
        flags["output"] = args.output
    return merge(flags, parse_set(getattr(args, "set", None)))


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, str, dict[str, Any]]:
    """(checked config, recipe name, command-line overrides) for parsed ``seqvision train`` arguments."""
    recipe = load_recipe(args.config)
    overrides = overrides_from_args(args)
    if "data_dir" in overrides and "dataset" not in overrides and recipe.get("dataset", "digits") == "digits":
        overrides["dataset"] = "folder"  # --data-dir alone means an ImageFolder tree
    return resolve_config(recipe, overrides), Path(args.config).stem, overrides


class Stopped(KeyboardInterrupt):
    """SIGTERM, raised where the run is, so that it ends as Ctrl-C does."""


def _stop_on_sigterm(signum: int, frame: Any) -> None:
    raise Stopped()


def run(args: argparse.Namespace) -> int:
    cfg, name, overrides = config_from_args(args)
    if args.print_config:
        if args.resume:  # the run's own settings, with the command line's keys over them
            _, state = read_training_checkpoint(args.resume)
            cfg = resolve_config(
                {k: v for k, v in state["config"].items() if k in TrainConfig.__dataclass_fields__}, overrides
            )
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    trainer = None
    try:
        trainer = Trainer(cfg, name, args.resume, args.overwrite, overrides)
        trainer.fit()
    except KeyboardInterrupt as e:
        what = "stopped by SIGTERM" if isinstance(e, Stopped) else "interrupted"
        if trainer is None:
            print(f"seqvision train: {what} before the run started", file=sys.stderr)
        else:
            print(
                f"seqvision train: {what}; `seqvision train --resume {trainer.out}` continues from its last checkpoint",
                file=sys.stderr,
            )
        return 130
    finally:
        if trainer is not None:
            trainer.close()
        signal.signal(signal.SIGTERM, previous)
    return 0
