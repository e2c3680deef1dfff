"""What ``seqvision bench`` measures (``BenchSettings``) and the names its rows share."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..models import create_model

DTYPES = ("fp32", "bf16", "int8")
MODES = {"fp32": ["fp32"], "bf16": ["autocast", "bf16 weights"], "int8": ["int8 dynamic"]}
PEER_BF16 = "bf16 inference precision"  # the peers' bf16 mode: the runtime runs its own bf16 kernels
BF16_RECURRENCE_ROW = "seqvision fused, bf16 recurrence"


@dataclass(frozen=True)
class BenchSettings:
    """One benchmark run; the defaults are ``seqvision bench``'s."""

    model: str = "sequencer2d_s"
    batch: tuple[int, ...] | None = None  # default: 1, 8, 32 on the CPU, 256 on CUDA
    dtype: str = "fp32,bf16"  # comma-separated: fp32, bf16, int8
    device: str = "cpu"
    train: bool = False
    img_size: int = 224
    iters: int = 10
    warmup: int = 2
    threads: int | None = None
    no_compile: bool = False
    no_convnext: bool = False
    no_reference: bool = False
    no_peers: bool = False


def seeded_model(name: str) -> nn.Module:
    """seqvision's ``name`` with the weights of seed 0 (the global RNG is left as it was): every seqvision row and
    the peers' exported model hold the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return create_model(name)
