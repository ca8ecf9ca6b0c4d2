"""Exponential moving averages of a model's weights (the SynCLR / DINO teacher, the embedded generator's EMA UNet)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update(average: nn.Module, model: nn.Module, momentum: float) -> None:
    """``average <- momentum * average + (1 - momentum) * model`` for every parameter; buffers (BatchNorm
    statistics) are copied from ``model``. Both modules must have the same architecture."""
    averaged, current = list(average.parameters()), [p.detach() for p in model.parameters()]
    if len(averaged) != len(current):
        raise ValueError(f"EMA of a different architecture: {len(averaged)} parameters vs {len(current)}")
    torch._foreach_mul_(averaged, momentum)
    torch._foreach_add_(averaged, current, alpha=1 - momentum)
    for b_avg, b_cur in zip(average.buffers(), model.buffers()):
        b_avg.copy_(b_cur)
