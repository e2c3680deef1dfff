"""``seqvision adversarial``: robust accuracy under FGSM and L-inf PGD attacks.

The attacks work on images in [0, 1] pixel space, with the model's normalisation moved inside the model
(``Normalized``), so ``eps`` is in pixel units: the reference setting is eps = 1/255 and PGD with 5 steps
of 0.5/255 (the Sequencer authors' robustness evaluation). Adversarial images are clipped to [0, 1].
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError
from ..evaluate import iterate_batches
from ..images import display_path
from ..runtime import autocast, rnn_grad_mode

DEFAULT_EPS = 1 / 255
DEFAULT_STEPS = 5
DEFAULT_STEP_SIZE = 0.5 / 255
ATTACKS = ("fgsm", "pgd")


class Normalized(nn.Module):
    """``model((x - mean) / std)``: a model that takes [0, 1] images, so attacks perturb pixels."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.model((x - self.mean) / self.std)


def _loss_grad(model: nn.Module, x: Tensor, y: Tensor, amp: bool) -> Tensor:
    x = x.detach().requires_grad_(True)
    with autocast(x.device, amp):
        logits = model(x)
    loss = F.cross_entropy(logits.float(), y)
    (grad,) = torch.autograd.grad(loss, x)
    return grad


def fgsm(model: nn.Module, x: Tensor, y: Tensor, eps: float = DEFAULT_EPS, amp: bool = False) -> Tensor:
    """Fast gradient sign method (Goodfellow et al., 2015): one step of ``eps`` along sign(grad loss)."""
    with rnn_grad_mode(model):
        grad = _loss_grad(model, x, y, amp)
    return (x + eps * grad.sign()).clamp(0, 1).detach()


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float = DEFAULT_EPS,
    steps: int = DEFAULT_STEPS,
    step_size: float = DEFAULT_STEP_SIZE,
    random_start: bool = False,
    generator: torch.Generator | None = None,
    amp: bool = False,
) -> Tensor:
    """L-inf projected gradient descent (Madry et al., 2018): ``steps`` signed-gradient steps of
    ``step_size``, each projected back into the eps-ball around ``x`` and into [0, 1]."""
    x = x.detach()
    adv = x.clone()
    if random_start:
        noise = torch.rand(x.shape, generator=generator, device="cpu").to(x.device) * 2 - 1
        adv = (x + eps * noise).clamp(0, 1)
    with rnn_grad_mode(model):
        for _ in range(steps):
            grad = _loss_grad(model, adv, y, amp)
            adv = adv.detach() + step_size * grad.sign()
            adv = torch.min(torch.max(adv, x - eps), x + eps).clamp(0, 1)
    return adv.detach()


def robust_accuracy(
    model: nn.Module,
    loader: Iterable,
    device: str | torch.device = "cpu",
    eps: float = DEFAULT_EPS,
    steps: int = DEFAULT_STEPS,
    step_size: float = DEFAULT_STEP_SIZE,
    attacks: Sequence[str] = ATTACKS,
    random_start: bool = False,
    amp: bool = False,
    on_error: str = "skip",
    seed: int = 0,
    source: str | None = None,
) -> dict[str, Any]:
    """Clean and attacked top-1 accuracy (percent) of a model taking [0, 1] images, plus how many
    predictions each attack changed. ``source`` names the data when no image could be read."""
    device = torch.device(device)
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    n = 0
    correct = dict.fromkeys(("clean", *attacks), 0)
    flipped = dict.fromkeys(attacks, 0)
    max_linf = dict.fromkeys(attacks, 0.0)
    skipped: list[str] = []
    for x, y in iterate_batches(loader, on_error, skipped):
        x, y = x.to(device), y.to(device)
        with torch.no_grad(), autocast(device, amp):
            clean = model(x).argmax(1)
        correct["clean"] += int((clean == y).sum())
        for name in attacks:
            if name == "fgsm":
                adv = fgsm(model, x, y, eps, amp)
            else:
                adv = pgd(model, x, y, eps, steps, step_size, random_start, gen, amp)
            max_linf[name] = max(max_linf[name], float((adv - x).abs().max()))
            with torch.no_grad(), autocast(device, amp):
                pred = model(adv).argmax(1)
            correct[name] += int((pred == y).sum())
            flipped[name] += int((pred != clean).sum())
        n += len(y)
    if n == 0:
        where = f" in {display_path(source)}" if source else ""
        why = f" ({len(skipped)} unreadable; the first: {skipped[0]})" if skipped else ""
        raise UserError(f"no image{where} could be evaluated{why}")
    return dict(
        images=n,
        eps=eps,
        steps=steps,
        step_size=step_size,
        random_start=random_start,
        accuracy={k: 100.0 * v / n for k, v in correct.items()},
        changed_predictions=flipped,
        max_linf=max_linf,
        skipped=skipped,
    )
