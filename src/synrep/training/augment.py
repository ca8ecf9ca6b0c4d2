"""Batched, seeded image augmentations on tensors (no torchvision; it cannot be used beside this torch).

All functions take float images ``[B, C, H, W]`` in ``[0, 1]`` (C = 1 or 3) and a ``torch.Generator``
(a CPU generator: every random number is drawn on the host, so a batch on any device gets the same
parameters), and return a tensor of the same layout. Each sample draws its own parameters.

The chain (:func:`augment`) follows the published recipes:

- StableRep (``main_stablerep.py``): downsample-and-upsample to 64 or 128 px of the stored 256 px with
  probability 0.05 *before* everything else; random-resized crop (0.08, 1); colour jitter (0.4, 0.4, 0.4, 0.1)
  with p = 0.8; grayscale p = 0.2; Gaussian blur σ ∈ [0.1, 2] with p = 0.5; horizontal flip.
- SynCLR (``dataset/augmentations.py``, DINO's multi-crop): a global crop (0.32, 1) and local crops (0.08, 0.32)
  at 96 px; jitter (0.4, 0.4, 0.2, 0.1) p = 0.8; grayscale 0.2; the global crop takes one of two recipes at
  random, blur p = 1.0, or blur p = 0.1 + solarize p = 0.2; local crops blur p = 0.5; bicubic resizing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

Probability = float | torch.Tensor  # one probability, or one per sample ``[B]``


@dataclass
class AugmentConfig:
    crop_scale_min: float = 0.35  # random-resized (global) crop: smallest area fraction
    crop_scale_max: float = 1.0  # random-resized (global) crop: largest area fraction
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"  # resampling of crops (SynCLR/DINO: bicubic)
    flip_p: float = 0.5  # horizontal flip probability
    jitter_p: float = 0.8  # colour jitter probability
    brightness: float = 0.4  # colour jitter: brightness factor range +-
    contrast: float = 0.4  # colour jitter: contrast factor range +-
    saturation: float = 0.4  # colour jitter: saturation factor range +- (RGB only)
    hue: float = 0.1  # colour jitter: hue shift range +- in turns (RGB only)
    grayscale_p: float = 0.2  # random grayscale probability (RGB only)
    blur_p: float = 0.2  # Gaussian blur probability (symmetric views and local crops)
    blur_sigma_min: float = 0.1  # Gaussian blur: smallest sigma in px
    blur_sigma_max: float = 1.5  # Gaussian blur: largest sigma in px (kernel radius ceil(2 sigma_max))
    solarize_p: float = 0.0  # solarize probability (symmetric views; asymmetric views use global_solarize_p)
    solarize_threshold: float = 0.5  # solarize inverts pixels >= this (torchvision's 128 of 255)
    downsample_p: float = 0.0  # StableRep: downsample-and-upsample the loaded image before the crop, probability
    downsample_factors: list[float] = field(default_factory=lambda: [0.25, 0.5])  # StableRep: sizes as fractions of the loaded image (64 and 128 of 256 px), one drawn uniformly
    asymmetric_globals: bool = False  # global views take recipe 1 or 2 (global_blur_p/global_solarize_p) at random per image (SynCLR, DINO, BYOL)
    global_blur_p: list[float] = field(default_factory=lambda: [1.0, 0.1])  # asymmetric globals: blur probability of recipe 1 and recipe 2
    global_solarize_p: list[float] = field(default_factory=lambda: [0.0, 0.2])  # asymmetric globals: solarize probability of recipe 1 and recipe 2
    local_crops: int = 4  # SynCLR: number of local crops
    local_size: int = 0  # SynCLR: local crop size in px (0 = 3/7 of the global size rounded to whole patches: 96 px at 224/16)
    local_scale_min: float = 0.1  # SynCLR: local crop smallest area fraction
    local_scale_max: float = 0.4  # SynCLR: local crop largest area fraction

    def check(self) -> None:
        from ..config import require

        for lo, hi in (("crop_scale_min", "crop_scale_max"), ("local_scale_min", "local_scale_max")):
            a, b = getattr(self, lo), getattr(self, hi)
            require(0 < a <= b <= 1, lo, f"{lo}={a} and {hi}={b} must satisfy 0 < {lo} <= {hi} <= 1")
        for key in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p", "downsample_p", "solarize_threshold"):
            require(0 <= getattr(self, key) <= 1, key, f"must be in [0, 1], got {getattr(self, key)}")
        for key in ("brightness", "contrast", "saturation", "hue"):
            require(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        require(self.hue <= 0.5, "hue", f"is a shift in turns: must be <= 0.5, got {self.hue}")
        require(0 < self.blur_sigma_min <= self.blur_sigma_max <= 50, "blur_sigma_min",
                f"blur_sigma_min={self.blur_sigma_min} and blur_sigma_max={self.blur_sigma_max} must satisfy 0 < min <= max <= 50")
        require(len(self.downsample_factors) >= 1 and all(0 < f < 1 for f in self.downsample_factors), "downsample_factors",
                f"must be a non-empty list of fractions in (0, 1), got {self.downsample_factors}")
        for key in ("global_blur_p", "global_solarize_p"):
            value = getattr(self, key)
            require(len(value) == 2 and all(0 <= p <= 1 for p in value), key, f"must be two probabilities (recipe 1, recipe 2), got {value}")
        require(self.local_crops >= 0, "local_crops", f"must be >= 0, got {self.local_crops}")
        require(self.local_size >= 0, "local_size", f"must be >= 0 (0 = automatic), got {self.local_size}")


def _uniform(g: torch.Generator, n: int, lo: float, hi: float, device) -> torch.Tensor:
    return torch.rand(n, generator=g).to(device) * (hi - lo) + lo


def _draw(g: torch.Generator, b: int, p: Probability, device) -> torch.Tensor:
    """Bernoulli(p) per sample as a bool ``[B, 1, 1, 1]`` mask; ``p`` is one probability or one per sample."""
    u = torch.rand(b, generator=g)
    p = p.cpu() if isinstance(p, torch.Tensor) else p
    return (u < p).to(device).view(b, 1, 1, 1)


def _active(p: Probability) -> bool:
    return bool((p > 0).any()) if isinstance(p, torch.Tensor) else p > 0


def random_resized_crop(x: torch.Tensor, g: torch.Generator, size: int, scale: tuple[float, float],
                        ratio: tuple[float, float] = (3 / 4, 4 / 3), flip_p: float = 0.0,
                        mode: str = "bilinear") -> torch.Tensor:
    """Crop a random area fraction in ``scale`` with aspect in ``ratio``, resize to ``size``, maybe flip."""
    b = x.shape[0]
    area = _uniform(g, b, *scale, "cpu")
    log_r = _uniform(g, b, math.log(ratio[0]), math.log(ratio[1]), "cpu")
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
    out = F.grid_sample(x, grid, mode=mode, padding_mode="reflection", align_corners=False)
    return out.clamp(0, 1) if mode == "bicubic" else out  # bicubic overshoots


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def color_jitter(x: torch.Tensor, g: torch.Generator, p: float, brightness: float, contrast: float,
                 saturation: float, hue: float) -> torch.Tensor:
    """Brightness, contrast (all images), saturation and a hue shift (RGB only), applied with probability p."""
    b = x.shape[0]
    apply = _draw(g, b, p, x.device)
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
    apply = _draw(g, x.shape[0], p, x.device)
    return torch.where(apply, _gray(x).expand_as(x), x)


def gaussian_blur(x: torch.Tensor, g: torch.Generator, p: Probability, sigma: tuple[float, float] = (0.1, 1.5)) -> torch.Tensor:
    """Per-sample Gaussian blur (separable kernel of radius ceil(2 sigma_max), reflect padding), sigma drawn
    uniformly in ``sigma`` (px), applied with probability ``p`` (one value or one per sample)."""
    if not _active(p):
        return x
    b, c, hgt, wid = x.shape
    s = _uniform(g, b, *sigma, x.device).to(x.dtype)
    radius = max(1, min(math.ceil(2 * sigma[1]), hgt - 1, wid - 1))
    coords = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-(coords[None] ** 2) / (2 * s[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)  # [B, 2r+1]
    size = 2 * radius + 1
    xr = x.reshape(1, b * c, hgt, wid)
    kh = k.repeat_interleave(c, 0).view(b * c, 1, 1, size)
    kv = k.repeat_interleave(c, 0).view(b * c, 1, size, 1)
    blurred = F.conv2d(F.pad(xr, (radius, radius, 0, 0), mode="reflect"), kh, groups=b * c)
    blurred = F.conv2d(F.pad(blurred, (0, 0, radius, radius), mode="reflect"), kv, groups=b * c).view_as(x)
    return torch.where(_draw(g, b, p, x.device), blurred, x)


def solarize(x: torch.Tensor, g: torch.Generator, p: Probability, threshold: float = 0.5) -> torch.Tensor:
    """Invert every pixel ``>= threshold`` (x -> 1 - x), applied to each image with probability ``p``."""
    if not _active(p):
        return x
    solarized = torch.where(x >= threshold, 1.0 - x, x)
    return torch.where(_draw(g, x.shape[0], p, x.device), solarized, x)


def random_downsample(x: torch.Tensor, g: torch.Generator, p: float, factors: list[float] | tuple[float, ...] = (0.5,)) -> torch.Tensor:
    """Resize down to ``factor`` of the size (one factor drawn uniformly per image) and back up, probability p.

    StableRep applies it to the stored image before the crop (``DownSampleAndUpsample``: Resize(64 or 128)
    then Resize(256)), so the crop sees a low-resolution image at full size.
    """
    if p <= 0:
        return x
    b = x.shape[0]
    hgt, wid = x.shape[-2:]
    which = torch.randint(len(factors), (b,), generator=g).to(x.device).view(b, 1, 1, 1)
    apply = _draw(g, b, p, x.device)
    out = x
    for i, factor in enumerate(factors):
        small = (max(1, round(hgt * factor)), max(1, round(wid * factor)))
        down = F.interpolate(x, size=small, mode="bilinear", align_corners=False, antialias=True)
        up = F.interpolate(down, size=(hgt, wid), mode="bilinear", align_corners=False)
        out = torch.where(apply & (which == i), up, out)
    return out


def augment(x: torch.Tensor, g: torch.Generator, cfg: AugmentConfig, size: int | None = None,
            scale: tuple[float, float] | None = None, blur_p: Probability | None = None,
            solarize_p: Probability | None = None) -> torch.Tensor:
    """One view: downsample (before the crop), crop+flip, colour jitter, grayscale, blur, solarize.

    ``[B, C, H, W]`` in [0, 1] -> ``[B, C, size, size]``. ``scale`` (crop area range), ``blur_p`` and ``solarize_p``
    default to the config's symmetric values; a view of an asymmetric recipe passes per-sample ``[B]`` probabilities.
    """
    size = size or x.shape[-1]
    out = random_downsample(x, g, cfg.downsample_p, cfg.downsample_factors)
    out = random_resized_crop(out, g, size, scale or (cfg.crop_scale_min, cfg.crop_scale_max), flip_p=cfg.flip_p,
                              mode=cfg.interpolation)
    out = color_jitter(out, g, cfg.jitter_p, cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)
    out = random_grayscale(out, g, cfg.grayscale_p)
    out = gaussian_blur(out, g, cfg.blur_p if blur_p is None else blur_p, (cfg.blur_sigma_min, cfg.blur_sigma_max))
    return solarize(out, g, cfg.solarize_p if solarize_p is None else solarize_p, cfg.solarize_threshold)


def global_recipes(b: int, g: torch.Generator, cfg: AugmentConfig) -> torch.Tensor | None:
    """Per image, which asymmetric recipe (0 or 1) its first global view takes; None when views are symmetric.

    View ``v`` of image ``i`` takes recipe ``(r_i + v) % 2`` (DINO: with two global views, one of each)."""
    return torch.randint(2, (b,), generator=g) if cfg.asymmetric_globals else None


def global_view(x: torch.Tensor, g: torch.Generator, cfg: AugmentConfig, size: int | None = None,
                recipes: torch.Tensor | None = None, index: int = 0) -> torch.Tensor:
    """Global view number ``index``: the symmetric chain, or recipe ``(recipes + index) % 2`` per image."""
    if recipes is None:
        return augment(x, g, cfg, size=size)
    r = (recipes + index) % 2
    blur = torch.tensor(cfg.global_blur_p)[r]
    sol = torch.tensor(cfg.global_solarize_p)[r]
    return augment(x, g, cfg, size=size, blur_p=blur, solarize_p=sol)


def local_crop_size(cfg: AugmentConfig, global_size: int, patch_size: int = 1) -> int:
    """``cfg.local_size``, or 3/7 of the global size (96 px at 224) rounded to whole patches when it is 0."""
    if cfg.local_size:
        return cfg.local_size
    return max(patch_size, round(global_size * 3 / 7 / patch_size) * patch_size)


def multi_crop(x: torch.Tensor, g: torch.Generator, cfg: AugmentConfig, size: int | None = None,
               local_size: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One global view ``[B, C, size, size]`` and ``cfg.local_crops`` local views ``[B, C, s, s]`` (SynCLR).

    Local crops use the local crop scale, the symmetric blur probability and no solarization (DINO, SynCLR)."""
    size = size or x.shape[-1]
    glob = global_view(x, g, cfg, size, global_recipes(x.shape[0], g, cfg))
    s = local_size or local_crop_size(cfg, size)
    local = [augment(x, g, cfg, size=s, scale=(cfg.local_scale_min, cfg.local_scale_max), solarize_p=0.0)
             for _ in range(cfg.local_crops)]
    return glob, local
