"""Image tensor conventions shared by every stage.

- Stored and streamed images are uint8 ``[B, H, W, C]`` (C = 1 or 3), as PIL and the tar shards hold them.
- Models take float ``[B, C, H, W]``: pixels in ``[0, 1]`` for augmentations, then ``normalize_images`` to
  ``[-1, 1]`` right before a backbone (training and evaluation alike).
- Generators return float ``[0, 1]`` images that :func:`to_uint8` rounds to the stored form.
"""

from __future__ import annotations

import numpy as np
import torch


def to_uint8(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """float ``[B, C, H, W]`` tensor or ``[B, H, W, C]`` array in [0, 1] -> uint8 ``[B, H, W, C]``."""
    if isinstance(images, torch.Tensor):
        images = images.permute(0, 2, 3, 1).float().numpy()
    return np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8)


def uint8_to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, H, W, C]`` (on any device) -> float ``[B, C, H, W]`` in [0, 1], converted where it lies."""
    return images.permute(0, 3, 1, 2).float().div_(255.0).contiguous()


def normalize_images(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] images -> the [-1, 1] range every backbone sees (training and evaluation alike)."""
    return (x - 0.5) / 0.5


def randomise_background(x: torch.Tensor, generator: torch.Generator, p: float = 0.5, max_level: float = 0.35,
                         max_noise: float = 0.2, threshold: float = 16 / 255) -> torch.Tensor:
    """Put a share ``p`` of real black-background images on a random grey level with random pixel noise, as small
    generators often draw them, so that a classifier trained on real images can read generated ones.

    ``x`` float ``[B, C, H, W]`` in [-1, 1] -> the same shape and range. Per image: background (pixels at or below
    ``threshold`` in [0, 1]) lifted by a level in ``[0, max_level]``; every pixel gets Gaussian noise with a
    standard deviation in ``[0, max_noise]``. The object's own values are not shifted, so tone stays readable.
    """
    b = x.shape[0]
    pick = (torch.rand(b, generator=generator) < p).view(b, 1, 1, 1).to(x.dtype)
    level = torch.rand(b, generator=generator).view(b, 1, 1, 1) * max_level
    std = torch.rand(b, generator=generator).view(b, 1, 1, 1) * max_noise
    unit = (x + 1) / 2
    background = (unit <= threshold).to(x.dtype)
    noisy = (unit + background * level + std * torch.randn(x.shape, generator=generator)).clamp(0, 1)
    return torch.where(pick.bool(), noisy * 2 - 1, x)
