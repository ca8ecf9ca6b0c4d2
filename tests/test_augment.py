"""Augmentations checked on their statistics (fractions of images touched ~ the configured probabilities) and on
what each operation does, on CPU and, where one is present, on a CUDA device with the same seeded parameters."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from synrep.training.augment import (AugmentConfig, augment, gaussian_blur, global_view, local_crop_size, multi_crop,
                                     random_downsample, random_grayscale, random_resized_crop, solarize)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]
N = 4000  # images per statistic: the binomial sd at p = 0.2 is 0.006, the tolerance 0.03 is 5 sd


def _touched(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).flatten(1).abs().amax(1) > 1e-6


def _images(device, n=N, c=1, size=8, seed=0):
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed)).to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_solarize_inverts_bright_pixels_of_a_fraction_p_of_images(device):
    x = _images(device)
    out = solarize(x, torch.Generator().manual_seed(1), p=0.2, threshold=0.5)
    hit = _touched(out, x)
    assert abs(hit.float().mean().item() - 0.2) < 0.03
    expected = torch.where(x >= 0.5, 1 - x, x)
    assert torch.equal(out[hit], expected[hit]) and torch.equal(out[~hit], x[~hit])


@pytest.mark.parametrize("device", DEVICES)
def test_blur_fraction_and_kernel(device):
    x = _images(device)
    out = gaussian_blur(x, torch.Generator().manual_seed(2), p=0.5, sigma=(0.1, 2.0))
    hit = _touched(out, x)
    assert abs(hit.float().mean().item() - 0.5) < 0.03
    # A blurred image keeps its mean (a normalised kernel, reflect padding keeps most of it) and loses contrast.
    assert (out[hit].flatten(1).std(1) < x[hit].flatten(1).std(1)).float().mean() > 0.95
    delta = torch.zeros(1, 1, 17, 17, device=device)
    delta[..., 8, 8] = 1
    k = gaussian_blur(delta, torch.Generator().manual_seed(0), p=1.0, sigma=(2.0, 2.0))[0, 0]
    assert k.sum().item() == pytest.approx(1.0, abs=1e-5) and (k[8, 4] > 0) and k[8, 3] == 0, "radius ceil(2 sigma) = 4"
    ref = torch.exp(-torch.arange(-4, 5, dtype=torch.float32) ** 2 / 8)
    ref = ref / ref.sum()
    assert torch.allclose(k[8, 4:13].cpu(), ref * ref[4], atol=1e-6), "separable Gaussian with sigma 2"


@pytest.mark.parametrize("device", DEVICES)
def test_flip_and_grayscale_fractions(device):
    x = _images(device, c=3)
    g = torch.Generator().manual_seed(3)
    out = random_resized_crop(x, g, 8, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.5)
    flipped = torch.isclose(out, x.flip(-1), atol=1e-5).flatten(1).all(1)
    same = torch.isclose(out, x, atol=1e-5).flatten(1).all(1)
    assert (flipped ^ same).all(), "a full-size crop is the image or its mirror, exactly"
    assert abs(flipped.float().mean().item() - 0.5) < 0.03
    gray = random_grayscale(x, torch.Generator().manual_seed(4), p=0.2)
    hit = _touched(gray, x)
    assert abs(hit.float().mean().item() - 0.2) < 0.03
    assert torch.allclose(gray[hit][:, 0], 0.299 * x[hit][:, 0] + 0.587 * x[hit][:, 1] + 0.114 * x[hit][:, 2])


@pytest.mark.parametrize("device", DEVICES)
def test_downsample_fraction_and_resolution(device):
    x = _images(device, size=32)
    out = random_downsample(x, torch.Generator().manual_seed(5), p=0.05, factors=[0.25, 0.5])
    hit = _touched(out, x)
    assert abs(hit.float().mean().item() - 0.05) < 0.015
    for f in (0.25, 0.5):  # every touched image is one of the two down-and-up versions, both occur
        small = F.interpolate(x, size=int(32 * f), mode="bilinear", align_corners=False, antialias=True)
        version = F.interpolate(small, size=32, mode="bilinear", align_corners=False)
        match = torch.isclose(out, version, atol=1e-5).flatten(1).all(1) & hit
        assert 0.3 < match.sum().item() / hit.sum().item() < 0.7


def test_stablerep_downsample_comes_before_the_crop():
    """Stripes of period 4 px on a 64 px image vanish when the whole image is reduced to 16 px (Nyquist: period 8)
    before a quarter-area crop; reducing the crop's 64 px output to 16 px instead keeps them (period 8 there)."""
    col = torch.arange(64).float()
    x = (0.5 + 0.5 * torch.sin(2 * torch.pi * col / 4))[None, None, None, :].expand(64, 1, 64, 64).contiguous()
    cfg = AugmentConfig(crop_scale_min=0.25, crop_scale_max=0.25, flip_p=0, jitter_p=0, blur_p=0, downsample_p=1.0,
                        downsample_factors=[0.25])
    out = augment(x, torch.Generator().manual_seed(6), cfg, size=64)
    crop = random_resized_crop(x, torch.Generator().manual_seed(6), 64, (0.25, 0.25))
    after = random_downsample(crop, torch.Generator().manual_seed(0), 1.0, [0.25])
    assert crop.std() > 0.25 and after.std() > 0.05, "the stripes survive a crop, and a downsample after it"
    assert out.std() < 0.02, "downsampled before the crop: the stripes are gone"


def test_asymmetric_global_recipes():
    """Recipe 1: blur always, never solarize; recipe 2: blur 10%, solarize 20%. A constant 0.8 image shows solarizing
    (-> 0.2) and is unchanged by blur; a noise image shows blurring (its contrast drops)."""
    cfg = AugmentConfig(crop_scale_min=1.0, flip_p=0, jitter_p=0, asymmetric_globals=True, global_blur_p=[1.0, 0.1],
                        global_solarize_p=[0.0, 0.2], blur_sigma_min=1.0, blur_sigma_max=1.0)
    recipe = {r: torch.full((N,), r, dtype=torch.long) for r in (0, 1)}
    flat = torch.full((N, 1, 16, 16), 0.8)
    noise = _images("cpu", size=16) * 0.99  # below 1: never solarized with threshold 1 (same random draws)
    dark = dataclasses.replace(cfg, solarize_threshold=1.0)
    view = lambda x, r, index=0, c=cfg: global_view(x, torch.Generator().manual_seed(7), c, 16, recipe[r], index)  # noqa: E731
    crop = random_resized_crop(noise, torch.Generator().manual_seed(7), 16, (1.0, 1.0))  # the first draws of a view
    solarized = lambda v: (v < 0.5).flatten(1).all(1)  # noqa: E731
    blurred = lambda v: _touched(v, crop)  # noqa: E731
    assert not solarized(view(flat, 0)).any() and blurred(view(noise, 0, c=dark)).all()
    assert abs(solarized(view(flat, 1)).float().mean().item() - 0.2) < 0.03
    assert abs(blurred(view(noise, 1, c=dark)).float().mean().item() - 0.1) < 0.03
    # View v of image i takes recipe (r_i + v) % 2: a second view swaps the recipes.
    assert torch.equal(view(noise, 1, index=1), view(noise, 0))


def test_multi_crop_sizes_and_local_views_are_never_solarized():
    cfg = AugmentConfig(local_crops=3, local_size=12, solarize_p=1.0, blur_p=0)
    x = torch.rand(16, 1, 28, 28)
    g, local = multi_crop(x, torch.Generator().manual_seed(0), cfg)
    assert g.shape == (16, 1, 28, 28) and [t.shape for t in local] == [(16, 1, 12, 12)] * 3
    assert local_crop_size(AugmentConfig(), 224, 16) == 96 and local_crop_size(AugmentConfig(), 28, 7) == 14
    assert local_crop_size(AugmentConfig(local_size=20), 224, 16) == 20


@pytest.mark.parametrize("device", DEVICES)
def test_augment_is_seeded_keeps_range_and_matches_across_devices(device):
    x = torch.rand(6, 3, 20, 20)
    cfg = AugmentConfig(blur_p=1.0, downsample_p=0.5, solarize_p=0.5, interpolation="bicubic", asymmetric_globals=True)
    a = augment(x.to(device), torch.Generator().manual_seed(1), cfg, size=16)
    b = augment(x.to(device), torch.Generator().manual_seed(1), cfg, size=16)
    c = augment(x.to(device), torch.Generator().manual_seed(2), cfg, size=16)
    assert a.shape == (6, 3, 16, 16) and torch.equal(a, b) and not torch.equal(a, c) and a.min() >= 0 and a.max() <= 1
    cpu = augment(x, torch.Generator().manual_seed(1), cfg, size=16)
    assert torch.allclose(a.cpu(), cpu, atol=1e-4), "parameters are drawn on the host: the same on every device"


@pytest.mark.parametrize("override, key", [("augment.solarize_p=1.5", "augment.solarize_p"),
                                           ("augment.global_blur_p=[1.0]", "augment.global_blur_p"),
                                           ("augment.downsample_factors=[2]", "augment.downsample_factors"),
                                           ("augment.blur_sigma_min=3", "augment.blur_sigma_min"),
                                           ("augment.interpolation=nearest", "augment.interpolation")])
def test_bad_augmentation_values_fail_when_the_config_loads(override, key):
    from synrep.config import ConfigError, load_config
    from synrep.training.loop import TrainConfig

    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        load_config(TrainConfig, None, [override])
