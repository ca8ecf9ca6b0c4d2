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
