"""Shared test utilities."""

import torch


def randomise(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Random weights everywhere, in eval mode: the authors' zero-initialised head would make any two
    models' logits agree trivially."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()
