import torch

from synrep.images import randomise_background


def _garments(n: int = 64) -> torch.Tensor:
    """``[n, 1, 20, 20]`` in [-1, 1]: a black canvas (-1) with a mid-grey square (0) in the middle."""
    x = -torch.ones(n, 1, 20, 20)
    x[:, :, 5:15, 5:15] = 0.0
    return x


def test_randomise_background_lifts_the_background_and_keeps_the_object_and_range():
    x = _garments()
    out = randomise_background(x, torch.Generator().manual_seed(0), p=1.0)
    assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1
    background = out[:, :, :5, :].mean((1, 2, 3))
    assert (background > -1 + 0.05).float().mean() > 0.8, "most backgrounds are no longer black"
    object_mean = out[:, :, 5:15, 5:15].mean()
    assert abs(float(object_mean)) < 0.05, "the object's own values are not shifted (only noise is added)"


def test_randomise_background_touches_only_a_share_p_of_the_images_and_is_seeded():
    x = _garments(200)
    out = randomise_background(x, torch.Generator().manual_seed(1), p=0.5)
    changed = (out != x).flatten(1).any(1).float().mean()
    assert 0.3 < changed < 0.7
    assert torch.equal(randomise_background(x, torch.Generator().manual_seed(0), p=0.0), x)
    again = randomise_background(x, torch.Generator().manual_seed(1), p=0.5)
    assert torch.equal(out, again)
