"""``seqvision adversarial``: robust accuracy under FGSM and L-inf PGD attacks."""

from __future__ import annotations

import argparse

from ..analysis.adversarial import (
    ATTACKS,
    DEFAULT_STEPS,
    Normalized,
    robust_accuracy,
)
from ..evaluate import eval_data_config, eval_loader, eval_transform, num_outputs, target_mapping
from ..files import write_csv, write_json
from ..inference import load_any_model
from ..runtime import pick_device
from .common import (
    add_model_args,
    format_table,
    non_negative_float,
    open_data,
    output_dir,
    positive_float,
    positive_int,
    report_skipped,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=(
            "Robust accuracy under FGSM and L-inf PGD, with the normalisation inside the model so eps is "
            "in pixel units (default: eps 1/255, PGD 5 steps of 0.5/255). Writes adversarial.json/.csv."
        ),
        epilog=(
            "examples:\n"
            "  seqvision adversarial --checkpoint runs/digits/best.pth --data-dir digits\n"
            "  seqvision adversarial --model sequencer2d_s --pretrained --data-dir imagenet/val --eps 4 --steps 10"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    p.add_argument("--attacks", nargs="+", choices=ATTACKS, default=list(ATTACKS))
    p.add_argument("--eps", type=non_negative_float, default=1.0, help="L-inf radius in units of 1/255 (default 1)")
    p.add_argument("--steps", type=positive_int, default=DEFAULT_STEPS, help="PGD iterations (default 5)")
    p.add_argument("--step-size", type=positive_float, default=0.5, help="PGD step in units of 1/255 (default 0.5)")
    p.add_argument("--random-start", action="store_true", help="start PGD at a uniform point of the eps-ball")
    p.add_argument("--seed", type=int, default=0)
    return p


def run(args: argparse.Namespace) -> int:
    device = pick_device(args.device)
    loaded = load_any_model(args.model, args.checkpoint, device, args.pretrained)
    cfg = eval_data_config(loaded, args.img_size, args.crop_pct, args.interpolation)
    data = open_data(args)
    mapping, _ = target_mapping(data.class_names, loaded.class_names, num_outputs(loaded.model))
    loader = eval_loader(data, eval_transform(cfg, normalize=False), mapping, args.batch_size, args.workers)
    model = Normalized(loaded.model, cfg["mean"], cfg["std"]).to(device).eval()
    res = robust_accuracy(
        model,
        loader,
        device,
        args.eps / 255,
        args.steps,
        args.step_size / 255,
        args.attacks,
        args.random_start,
        args.amp,
        args.on_error,
        args.seed,
        source=data.source,
    )
    report_skipped(res["skipped"])
    rows = [
        dict(
            attack="none" if k == "clean" else k,
            eps_255=0.0 if k == "clean" else args.eps,
            steps=0 if k == "clean" else (1 if k == "fgsm" else args.steps),
            top1=v,
            changed_predictions=res["changed_predictions"].get(k, 0),
        )
        for k, v in res["accuracy"].items()
    ]
    out = output_dir(args, "adversarial")
    summary = dict(
        model=loaded.name,
        checkpoint=args.checkpoint,
        data=data.source,
        input_size=cfg["input_size"][-1],
        **{k: v for k, v in res.items() if k != "skipped"},
        skipped_images=res["skipped"],
    )
    files = [write_json(out / "adversarial.json", summary), write_csv(out / "adversarial.csv", rows)]
    print(f"{loaded.name} on {data.source}: {res['images']} images, eps {args.eps}/255")
    print(
        format_table(
            ["attack", "steps", "top-1 %", "predictions changed"],
            [[r["attack"], r["steps"], r["top1"], r["changed_predictions"]] for r in rows],
        )
    )
    print("wrote " + ", ".join(str(f) for f in files))
    return 0
