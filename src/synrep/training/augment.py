"""Batched, seeded image augmentations on tensors (no torchvision; it cannot be used beside this torch).

All functions take float images ``[B, C, H, W]`` in ``[0, 1]`` (C = 1 or 3) and a ``torch.Generator``,
and return a tensor of the same layout. Each sample draws its own parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AugmentConfig:
    crop_scale_min: float = 0.35  # random-resized crop: smallest area fraction
    crop_scale_max: float = 1.0  # random-resized crop: largest area fraction
    flip_p: float = 0.5  # horizontal flip probability
    jitter_p: float = 0.8  # colour jitter probability
    brightness: float = 0.4  # colour jitter: brightness factor range +-
    contrast: float = 0.4  # colour jitter: contrast factor range +-
    saturation: float = 0.4  # colour jitter: saturation factor range +- (RGB only)
    hue: float = 0.1  # colour jitter: hue shift range +- in turns (RGB only)
    grayscale_p: float = 0.2  # random grayscale probability (RGB only)
    blur_p: float = 0.2  # Gaussian blur probability
    downsample_p: float = 0.0  # downsample-and-upsample probability
    local_crops: int = 4  # SynCLR: number of local crops
    local_size: int = 14  # SynCLR: local crop size in px
    local_scale_min: float = 0.1  # SynCLR: local crop smallest area fraction
    local_scale_max: float = 0.4  # SynCLR: local crop largest area fraction

    def check(self) -> None:
        from ..config import require

        for lo, hi in (("crop_scale_min", "crop_scale_max"), ("local_scale_min", "local_scale_max")):
            a, b = getattr(self, lo), getattr(self, hi)
            require(0 < a <= b <= 1, lo, f"{lo}={a} and {hi}={b} must satisfy 0 < {lo} <= {hi} <= 1")
        for key in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "downsample_p"):
            require(0 <= getattr(self, key) <= 1, key, f"is a probability: must be in [0, 1], got {getattr(self, key)}")
        for key in ("brightness", "contrast", "saturation", "hue"):
            require(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        require(self.local_crops >= 0 and self.local_size >= 1, "local_crops", "local_crops must be >= 0 and local_size >= 1")


def _uniform(g: torch.Generator, n: int, lo: float, hi: float, device) -> torch.Tensor:
    return torch.rand(n, generator=g).to(device) * (hi - lo) + lo


def random_resized_crop(x: torch.Tensor, g: torch.Generator, size: int, scale: tuple[float, float],
                        ratio: tuple[float, float] = (3 / 4, 4 / 3), flip_p: float = 0.0) -> torch.Tensor:
    """Crop a random area fraction in ``scale`` with aspect in ``ratio``, resize to ``size`` (bilinear), maybe flip."""
    b = x.shape[0]
    area = _uniform(g, b, *scale, "cpu")
    log_r = _uniform(g, b, torch.log(torch.tensor(ratio[0])).item(), torch.log(torch.tensor(ratio[1])).item(), "cpu")
    aspect = torch.exp(log_r)
    w = torch.sqrt(area * aspect).clamp(max=1.0)
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (torch.rand(b, generator=g) * 2 - 1) * (1 - w)
    cy = (torch.rand(b, generator=g) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(b, generator=g) < flip_p, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = w * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta.to(x.device, x.dtype), [b, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def color_jitter(x: torch.Tensor, g: torch.Generator, p: float, brightness: float, contrast: float,
                 saturation: float, hue: float) -> torch.Tensor:
    """Brightness, contrast (all images), saturation and a hue shift (RGB only), applied with probability p."""
    b = x.shape[0]
    apply = (torch.rand(b, generator=g) < p).to(x.device).view(b, 1, 1, 1)
    bright = _uniform(g, b, 1 - brightness, 1 + brightness, x.device).view(b, 1, 1, 1)
    contr = _uniform(g, b, 1 - contrast, 1 + contrast, x.device).view(b, 1, 1, 1)
    out = x * bright
    mean = _gray(out).mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * contr + mean
    if x.shape[1] == 3:
        sat = _uniform(g, b, 1 - saturation, 1 + saturation, x.device).view(b, 1, 1, 1)
        gray = _gray(out)
        out = (out - gray) * sat + gray
        shift = _uniform(g, b, -hue, hue, x.device).view(b, 1, 1, 1)
        # Hue rotation approximated by rotating the chroma plane (YIQ).
        yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], device=x.device, dtype=x.dtype)
        inv = torch.linalg.inv(yiq)
        c = torch.einsum("ij,bjhw->bihw", yiq, out)
        angle = shift * 2 * torch.pi
        i2 = c[:, 1:2] * torch.cos(angle) - c[:, 2:3] * torch.sin(angle)
        q2 = c[:, 1:2] * torch.sin(angle) + c[:, 2:3] * torch.cos(angle)
        out = torch.einsum("ij,bjhw->bihw", inv, torch.cat([c[:, :1], i2, q2], dim=1))
    return torch.where(apply, out.clamp(0, 1), x)


def random_grayscale(x: torch.Tensor, g: torch.Generator, p: float) -> torch.Tensor:
    if x.shape[1] == 1 or p <= 0:
        return x
    apply = (torch.rand(x.shape[0], generator=g) < p).to(x.device).view(-1, 1, 1, 1)
    return torch.where(apply, _gray(x).expand_as(x), x)


def gaussian_blur(x: torch.Tensor, g: torch.Generator, p: float, sigma: tuple[float, float] = (0.1, 1.5)) -> torch.Tensor:
    """Per-sample Gaussian blur (5x5 separable kernel) with sigma drawn in ``sigma``, probability p."""
    if p <= 0:
        return x
    b, c = x.shape[:2]
    s = _uniform(g, b, *sigma, x.device)
    coords = torch.arange(5, device=x.device, dtype=x.dtype) - 2
    k = torch.exp(-(coords[None] ** 2) / (2 * s[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)  # [B, 5]
    xr = x.reshape(1, b * c, *x.shape[2:])
    kh = k.repeat_interleave(c, 0).view(b * c, 1, 1, 5)
    kv = k.repeat_interleave(c, 0).view(b * c, 1, 5, 1)
    blurred = F.conv2d(F.pad(xr, (2, 2, 0, 0), mode="reflect"), kh, groups=b * c)
    blurred = F.conv2d(F.pad(blurred, (0, 0, 2, 2), mode="reflect"), kv, groups=b * c).view_as(x)
    apply = (torch.rand(b, generator=g) < p).to(x.device).view(b, 1, 1, 1)
    return torch.where(apply, blurred, x)


def random_downsample(x: torch.Tensor, g: torch.Generator, p: float, factor: float = 0.5) -> torch.Tensor:
    """Downsample by ``factor`` and back up (loss of detail), probability p."""
    if p <= 0:
        return x
    size = x.shape[-2:]
    small = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
    up = F.interpolate(small, size=size, mode="bilinear", align_corners=False)
    apply = (torch.rand(x.shape[0], generator=g) < p).to(x.device).view(-1, 1, 1, 1)
    return torch.where(apply, up, x)


def augment(x: torch.Tensor, g: torch.Generator, cfg: AugmentConfig, size: int | None = None,
            scale: tuple[float, float] | None = None) -> torch.Tensor:
    """The SimCLR-style chain: crop+flip, colour jitter, grayscale, blur, downsample. ``[B, C, H, W]`` in [0, 1]."""
    size = size or x.shape[-1]
    out = random_resized_crop(x, g, size, scale or (cfg.crop_scale_min, cfg.crop_scale_max), flip_p=cfg.flip_p)
    out = color_jitter(out, g, cfg.jitter_p, cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)
    out = random_grayscale(out, g, cfg.grayscale_p)
    out = gaussian_blur(out, g, cfg.blur_p)
    return random_downsample(out, g, cfg.downsample_p)


def multi_crop(x: torch.Tensor, g: torch.Generator, cfg: AugmentConfig,
               size: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One global view ``[B, C, size, size]`` and ``cfg.local_crops`` local views ``[B, C, s, s]`` (SynCLR)."""
    global_view = augment(x, g, cfg, size=size)
    local = [augment(x, g, cfg, size=cfg.local_size, scale=(cfg.local_scale_min, cfg.local_scale_max)) for _ in range(cfg.local_crops)]
    return global_view, local
