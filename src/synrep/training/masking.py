"""Patch masks for masked image modelling (iBOT / SynCLR), drawn with a seeded ``torch.Generator`` on the host.

A mask is bool ``[B, N]`` over the N = grid x grid patch tokens of each global crop, True where the
student sees the mask token instead of the patch.

- ``random`` (SynCLR's ``--mask_shape rand``, iBOT's ``rand``): exactly ``floor(B * image_prob)`` images are
  masked, chosen at random, each with exactly ``floor(N * ratio)`` tokens at random positions.
- ``block`` (iBOT's default, BEiT-style): the same images, each covered by random rectangles of at least
  ``(grid // 3)^2`` tokens and aspect ratio in [0.3, 1/0.3] until ``floor(N * ratio)`` tokens are masked
  (a rectangle that would overshoot is redrawn; after 10 failed draws the image keeps what it has, as iBOT does).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

MaskShape = Literal["random", "block"]


def masked_counts(batch: int, tokens: int, image_prob: float, ratio: float) -> tuple[int, int]:
    """``(images masked, tokens masked per masked image)`` as the reference collate computes them (floors)."""
    return int(batch * image_prob + 1e-9), int(tokens * ratio + 1e-9)


def random_mask(batch: int, grid: int, image_prob: float, ratio: float, g: torch.Generator) -> torch.Tensor:
    """Exact-ratio random masks ``[B, grid*grid]`` (see the module docstring)."""
    n = grid * grid
    images, per_image = masked_counts(batch, n, image_prob, ratio)
    mask = torch.zeros(batch, n, dtype=torch.bool)
    if images == 0 or per_image == 0:
        return mask
    chosen = torch.randperm(batch, generator=g)[:images]
    order = torch.rand(images, n, generator=g).argsort(dim=1)[:, :per_image]  # a random subset of each row
    rows = torch.zeros(images, n, dtype=torch.bool)
    rows.scatter_(1, order, True)
    mask[chosen] = rows
    return mask


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _randint(g: torch.Generator, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi] inclusive."""
    return int(torch.randint(lo, hi + 1, (), generator=g))


def block_mask_one(grid: int, target: int, g: torch.Generator, min_aspect: float = 0.3) -> torch.Tensor:
    """One iBOT block mask ``[grid, grid]`` with up to ``target`` masked tokens."""
    mask = torch.zeros(grid, grid, dtype=torch.bool)
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    low = (grid // 3) ** 2
    count = 0
    while count < target:
        room = target - count
        delta = 0
        for _ in range(10):
            area = _uniform(g, low, room)
            aspect = math.exp(_uniform(g, *log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if w < grid and h < grid:
                top, left = _randint(g, 0, grid - h), _randint(g, 0, grid - w)
                new = h * w - int(mask[top:top + h, left:left + w].sum())
                if 0 < new <= room:
                    mask[top:top + h, left:left + w] = True
                    delta = new
            if delta > 0:
                break
        if delta == 0:
            break
        count += delta
    return mask


def block_mask(batch: int, grid: int, image_prob: float, ratio: float, g: torch.Generator) -> torch.Tensor:
    """Block masks ``[B, grid*grid]`` for ``floor(B * image_prob)`` random images (see the module docstring)."""
    n = grid * grid
    images, per_image = masked_counts(batch, n, image_prob, ratio)
    mask = torch.zeros(batch, n, dtype=torch.bool)
    if images == 0 or per_image == 0:
        return mask
    for i in torch.randperm(batch, generator=g)[:images].tolist():
        mask[i] = block_mask_one(grid, per_image, g).flatten()
    return mask


def token_mask(shape: MaskShape, batch: int, grid: int, image_prob: float, ratio: float, g: torch.Generator) -> torch.Tensor:
    """Masks ``[B, grid*grid]`` of the given shape (``random`` or ``block``)."""
    if shape == "random":
        return random_mask(batch, grid, image_prob, ratio, g)
    if shape == "block":
        return block_mask(batch, grid, image_prob, ratio, g)
    raise ValueError(f"mask shape {shape!r} is not allowed; choose random or block")
