"""Heads that sit on the backbone during training (never exported).

- :func:`projection_head`: the contrastive projection MLP. StableRep (``models/StableRep.py``): 3 layers,
  4096 hidden, BatchNorm + ReLU, 256 out. SynCLR (``models/head.py``, ``MLPHead`` with ``ln``): 3 layers,
  4096 hidden, LayerNorm + GELU, 256 out through a bias-free layer and an affine-free LayerNorm; its predictor
  is the same with 2 layers. The CPU demo: 2 layers, 512 hidden, GELU, no normalisation, 128 out.
- :class:`PatchHead`: the DINO/iBOT head. An MLP (GELU, no normalisation) to a bottleneck that is
  L2-normalised, then K prototypes whose weight rows are normalised to length 1 (weight normalisation with the
  gain fixed at 1, DINO's ``norm_last_layer``): every output is a cosine in [-1, 1], so teacher logits / 0.04
  stay within ±25 and Sinkhorn-Knopp is well conditioned. ``last_layer`` is the part frozen for the first steps.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Norm = Literal["none", "bn", "ln"]
Activation = Literal["gelu", "relu"]


def _norm(kind: Norm, dim: int, affine: bool = True) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm1d(dim, affine=affine)
    if kind == "ln":
        return nn.LayerNorm(dim, elementwise_affine=affine)
    return nn.Identity()


def projection_head(in_dim: int, hidden: int, out_dim: int, layers: int = 2, norm: Norm = "none",
                    activation: Activation = "gelu", last_norm: bool = False) -> nn.Sequential:
    """``layers`` linear layers ``in -> hidden -> ... -> out`` with norm + activation between them.

    The last linear layer has a bias unless it is followed by a normalisation (``last_norm``: BN/LN without
    affine parameters, as SimCLR and SynCLR). ``layers=1`` is a linear projection.
    """
    if layers < 1:
        raise ValueError(f"a projection head needs at least 1 layer, got {layers}")
    act = nn.GELU if activation == "gelu" else lambda: nn.ReLU(inplace=True)
    mods: list[nn.Module] = []
    dim = in_dim
    for _ in range(layers - 1):
        mods += [nn.Linear(dim, hidden), _norm(norm, hidden), act()]
        dim = hidden
    last_norm = last_norm and norm != "none"
    mods.append(nn.Linear(dim, out_dim, bias=not last_norm))
    if last_norm:
        mods.append(_norm(norm, out_dim, affine=False))
    return nn.Sequential(*[m for m in mods if not isinstance(m, nn.Identity)])


def trunc_normal_init(module: nn.Module, std: float = 0.02) -> nn.Module:
    """Linear weights ~ truncated normal(std), biases 0 (the SynCLR / DINO head initialisation)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


class Prototypes(nn.Module):
    """K prototypes ``[K, D]`` used with unit-length rows: ``x -> x @ normalize(weight).T`` (weight norm, gain 1)."""

    def __init__(self, dim: int, num_prototypes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_prototypes, dim))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, F.normalize(self.weight, dim=1))


class PatchHead(nn.Module):
    """DINO/iBOT head: ``[..., in] -> MLP -> L2-normalised bottleneck [..., d] -> prototypes [..., K]``."""

    def __init__(self, in_dim: int, num_prototypes: int, hidden: int = 2048, bottleneck: int = 256, layers: int = 3):
        super().__init__()
        self.mlp = trunc_normal_init(projection_head(in_dim, hidden, bottleneck, layers, norm="none", activation="gelu"))
        self.last_layer = Prototypes(bottleneck, num_prototypes)

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(x), dim=-1, eps=1e-6 if x.dtype == torch.float16 else 1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(self.bottleneck(x))
