"""How far bf16 logits are from fp32: seqvision's bf16 modes against timm's, on the same weights and images.

seqvision's model is built with seed 0 and its zero-initialised classifier given seeded random weights (so the
logits are not all zero); timm's model of the same variant loads that state dict. fp32 reference: timm's fp32
logits. Each bf16 setting is scored by max |logit - fp32| / max |fp32 logit|, the same with means, and the share
of images whose top-1 class matches fp32's. Random weights stand in for trained ones (none can be downloaded on
the machines this runs on): compare rows with each other, not with a trained model's error.

    python benchmarks/bf16_logits.py --batch 8 --img-size 224
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seqvision import ops  # noqa: E402
from seqvision.bench import seeded_model  # noqa: E402
from seqvision.ops import fused  # noqa: E402


def models(name: str) -> tuple[nn.Module, nn.Module]:
    """(seqvision's ``name``, timm's ``name``) holding the same weights, in eval mode."""
    import timm

    ours = seeded_model(name).eval()
    fc = ours.head.fc
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        fc.weight.copy_(torch.randn(fc.weight.shape, generator=g) / fc.weight.shape[1] ** 0.5)
    theirs = timm.create_model(name).eval()
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _run(model: nn.Module, x: torch.Tensor, mode: str, engine: str | None, bf16_recurrence: bool) -> torch.Tensor:
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "autocast" else contextlib.nullcontext()
    if mode == "bf16 weights":
        model, x = model.bfloat16(), x.bfloat16()
    engine_ctx = ops.use_engine(engine) if engine else contextlib.nullcontext()
    try:
        with torch.inference_mode(), engine_ctx, fused.use_bf16_recurrence(bf16_recurrence), amp:
            return model(x).float()
    finally:
        model.float()


def bf16_logit_errors(name: str, img_size: int, batch: int, seed: int = 0) -> dict[str, tuple[float, float, float]]:
    """{setting: (max error / max |fp32 logit|, mean error / mean |fp32 logit|, top-1 agreement with fp32)}."""
    ours, theirs = models(name)
    x = torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        ref = theirs(x)
    settings: dict[str, Callable[[], torch.Tensor]] = {
        "seqvision fused, fp32 (check)": lambda: _run(ours, x, "fp32", "fused", False),
        "seqvision fused, autocast": lambda: _run(ours, x, "autocast", "fused", False),
        "seqvision fused, autocast, bf16 recurrence": lambda: _run(ours, x, "autocast", "fused", True),
        "seqvision fused, bf16 weights": lambda: _run(ours, x, "bf16 weights", "fused", False),
        "seqvision fused, bf16 weights, bf16 recurrence": lambda: _run(ours, x, "bf16 weights", "fused", True),
        "timm, autocast": lambda: _run(theirs, x, "autocast", None, False),
        "timm, bf16 weights": lambda: _run(theirs, x, "bf16 weights", None, False),
    }
    out = {}
    for label, fn in settings.items():
        y = fn()
        err = (y - ref).abs()
        agree = (y.argmax(1) == ref.argmax(1)).float().mean().item()
        out[label] = ((err.max() / ref.abs().max()).item(), (err.mean() / ref.abs().mean()).item(), agree)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sequencer2d_s")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"{args.model}, {args.img_size} px, batch {args.batch}; CPU: {cpu}; bf16 recurrence kernel: "
          f"{fused.bf16_recurrence_kernel()}\n")
    errors = bf16_logit_errors(args.model, args.img_size, args.batch)
    print("| setting | max error / max abs fp32 logit | mean error / mean abs fp32 logit | top-1 = fp32 |")
    print("|---|---|---|---|")
    for label, (rel_max, rel_mean, agree) in errors.items():
        print(f"| {label} | {rel_max:.2e} | {rel_mean:.2e} | {100 * agree:.0f}% |")
    ours = max(v[1] for k, v in errors.items() if k.startswith("seqvision") and "check" not in k)
    timm_best = min(v[1] for k, v in errors.items() if k.startswith("timm"))
    print(f"\nworst seqvision bf16 setting / timm's better bf16 mode, mean error: {ours / timm_best:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
