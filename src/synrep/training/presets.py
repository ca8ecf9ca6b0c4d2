"""Named training recipes: ``preset=<name>`` sets a method's published settings in one key.

A preset sets the method, its loss (temperature, weights, masking, teacher schedules), its heads, its
augmentations and its optimiser; any key given explicitly (YAML or ``key=value``) still overrides it
(``load_config`` applies the preset first). It does not set what depends on the hardware or the data:
backbone, image size, batch (``groups_per_batch`` x ``images_per_group``), steps, warm-up steps. Schedules the
papers give in epochs are fractions of training here (``loss.teacher_temp_warmup_frac``,
``loss.freeze_last_layer``; the EMA momentum is a cosine over all steps), so a preset fits any run length.

Where each value comes from (google-research/syn-rep-learn unless said otherwise; docs/methods.md lists the
deviations that remain):

- ``stablerep``: ``StableRep/main_stablerep.py`` and its README command (``--blr 2.0e-4 --weight_decay 0.1
  --beta2 0.98 --n_img 6 --downsample --downsample_prob 0.05 --down_res 64 128``), ``models/StableRep.py``
  (3-layer 4096-BN-ReLU head to 256), ``models/losses.py`` (τ = 0.1). The reference learning rate is
  ``blr x captions x n_img / 256 x num_crop / 2`` = ``1e-4 x images / 256`` with one crop per image.
- ``stablerep+``: ``stablerep`` + ``--add_language`` (``models/StableRepMM.py``): image-text loss weight 1,
  logit scale 1/0.07 clamped at 100, 512-d joint space, a 12-layer 512-wide 8-head text transformer with a
  77-token context trained from scratch (the demo keeps the frozen MiniLM + MLP tower).
- ``simclr`` / ``supcon``: the StableRep trainer run as the papers' baselines (two crops of one image,
  positives = the image / the concept), without StableRep's downsample augmentation; num_crop = 2 makes the
  reference learning rate ``2e-4 x images / 256``.
- ``synclr``: ``SynCLR/train_pytorch``'s README command and defaults (``main_mask_synclr.py``,
  ``synclr_meta_arch.py``, ``models/head.py``, ``dataset/augmentations.py``): ``--blr 1.5e-4`` over
  ``captions x n_img / 2`` (= ``7.5e-5 x images / 256``), weight decay 0.1, momentum 0.994 -> 1 cosine,
  4 local crops, ``--mask_probability 0.5 --mask_ratio 0.5 --mask_shape rand``, 8192 prototypes behind a
  2048-wide 3-layer head with a 256-d bottleneck, teacher temperature 0.04 -> 0.07 over 1 of 15 epochs,
  student 0.1; τ = 0.08 from the paper (the script's default is 0.1); prototypes frozen for the first
  epoch as DINO/iBOT do (1 of 15).
- ``genrep``: ali-design/GenRep ``main_unified.py`` (SimCLR/SupCon on latent-neighbour views): τ = 0.1,
  2-layer ReLU head (feature width, 128 out), SGD 0.03 momentum 0.9 weight decay 1e-4 at batch 256 without
  scaling, cosine to 0.1^3 of the peak, crop (0.2, 1), no blur. The positives are the images of one group
  (an anchor and its latent neighbours, ``synrep generate views=latent``).
- ``demo``: the embedded CPU default (what ``synrep run`` trains): the dataclass defaults.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

PresetName = Literal["demo", "stablerep", "stablerep+", "simclr", "supcon", "synclr", "genrep"]

# The demo's values are the config classes' defaults; they are written out so that `--help` and the tests
# can show and check them (a test asserts they equal the defaults).
_DEMO_HEAD = {"loss.proj_layers": 2, "loss.proj_hidden": 512, "loss.proj_dim": 128, "loss.proj_norm": "none",
              "loss.proj_act": "gelu", "loss.proj_last_norm": False}
_DEMO_AUG = {"augment.crop_scale_min": 0.35, "augment.crop_scale_max": 1.0, "augment.interpolation": "bilinear",
             "augment.flip_p": 0.5, "augment.jitter_p": 0.8, "augment.brightness": 0.4, "augment.contrast": 0.4,
             "augment.saturation": 0.4, "augment.hue": 0.1, "augment.grayscale_p": 0.2, "augment.blur_p": 0.2,
             "augment.blur_sigma_min": 0.1, "augment.blur_sigma_max": 1.5, "augment.solarize_p": 0.0,
             "augment.downsample_p": 0.0, "augment.asymmetric_globals": False}
_DEMO_OPT = {"optimizer": "adamw", "base_lr": 1e-3, "lr_scaling": "linear", "weight_decay": 0.05, "min_lr_ratio": 0.01,
             "grad_clip": 3.0}

# StableRep's trainer: head, loss and augmentations shared by stablerep, stablerep+, simclr and supcon.
_STABLEREP_HEAD = {"loss.proj_layers": 3, "loss.proj_hidden": 4096, "loss.proj_dim": 256, "loss.proj_norm": "bn",
                   "loss.proj_act": "relu", "loss.proj_last_norm": False, "loss.temperature": 0.1}
_STABLEREP_AUG = {"augment.crop_scale_min": 0.08, "augment.crop_scale_max": 1.0, "augment.interpolation": "bilinear",
                  "augment.flip_p": 0.5, "augment.jitter_p": 0.8, "augment.brightness": 0.4, "augment.contrast": 0.4,
                  "augment.saturation": 0.4, "augment.hue": 0.1, "augment.grayscale_p": 0.2, "augment.blur_p": 0.5,
                  "augment.blur_sigma_min": 0.1, "augment.blur_sigma_max": 2.0, "augment.solarize_p": 0.0,
                  "augment.asymmetric_globals": False, "augment.downsample_p": 0.0}
_STABLEREP_OPT = {"optimizer": "adamw", "lr_scaling": "linear", "weight_decay": 0.1, "min_lr_ratio": 0.0, "grad_clip": 0.0}

PRESETS: dict[str, dict[str, Any]] = {
    "demo": {"method": "stablerep", "loss.temperature": 0.1, "loss.views": 1, **_DEMO_HEAD, **_DEMO_AUG, **_DEMO_OPT},
    "stablerep": {"method": "stablerep", "loss.views": 1, **_STABLEREP_HEAD, **_STABLEREP_AUG, **_STABLEREP_OPT,
                  "augment.downsample_p": 0.05, "augment.downsample_factors": [0.25, 0.5], "base_lr": 1e-4},
    "stablerep+": {"method": "stablerep+", "loss.views": 1, **_STABLEREP_HEAD, **_STABLEREP_AUG, **_STABLEREP_OPT,
                   "augment.downsample_p": 0.05, "augment.downsample_factors": [0.25, 0.5], "base_lr": 1e-4,
                   "loss.text_weight": 1.0, "loss.text_embed_dim": 512, "loss.logit_scale_init": 1 / 0.07,
                   "loss.logit_scale_max": 100.0, "loss.text_tower": "transformer", "loss.text_layers": 12,
                   "loss.text_width": 512, "loss.text_heads": 8, "loss.text_context": 77},
    "simclr": {"method": "simclr", "loss.views": 2, **_STABLEREP_HEAD, **_STABLEREP_AUG, **_STABLEREP_OPT, "base_lr": 2e-4},
    "supcon": {"method": "supcon", "loss.views": 2, **_STABLEREP_HEAD, **_STABLEREP_AUG, **_STABLEREP_OPT, "base_lr": 2e-4},
    "synclr": {
        "method": "synclr", "loss.temperature": 0.08,
        "loss.proj_layers": 3, "loss.proj_hidden": 4096, "loss.proj_dim": 256, "loss.proj_norm": "ln", "loss.proj_act": "gelu",
        "loss.proj_last_norm": True, "loss.pred_layers": 2,
        "loss.num_prototypes": 8192, "loss.patch_head_layers": 3, "loss.patch_head_hidden": 2048, "loss.patch_head_bottleneck": 256,
        "loss.freeze_last_layer": 1 / 15, "loss.mim_weight": 1.0, "loss.mask_image_prob": 0.5, "loss.mask_ratio": 0.5,
        "loss.mask_shape": "random", "loss.student_temp": 0.1, "loss.teacher_temp_warmup": 0.04, "loss.teacher_temp": 0.07,
        "loss.teacher_temp_warmup_frac": 1 / 15, "loss.ema_start": 0.994, "loss.ema_end": 1.0,
        "loss.local_excludes_own_global": False,
        "augment.crop_scale_min": 0.32, "augment.crop_scale_max": 1.0, "augment.local_crops": 4, "augment.local_size": 0,
        "augment.local_scale_min": 0.08, "augment.local_scale_max": 0.32, "augment.interpolation": "bicubic",
        "augment.flip_p": 0.5, "augment.jitter_p": 0.8, "augment.brightness": 0.4, "augment.contrast": 0.4,
        "augment.saturation": 0.2, "augment.hue": 0.1, "augment.grayscale_p": 0.2, "augment.blur_p": 0.5,
        "augment.blur_sigma_min": 0.1, "augment.blur_sigma_max": 2.0, "augment.asymmetric_globals": True,
        "augment.global_blur_p": [1.0, 0.1], "augment.global_solarize_p": [0.0, 0.2], "augment.solarize_p": 0.0,
        "augment.downsample_p": 0.0,
        "optimizer": "adamw", "base_lr": 7.5e-5, "lr_scaling": "linear", "weight_decay": 0.1, "min_lr_ratio": 0.0, "grad_clip": 0.0,
    },
    "genrep": {
        "method": "stablerep", "loss.temperature": 0.1, "loss.views": 1,
        "loss.proj_layers": 2, "loss.proj_hidden": 0, "loss.proj_dim": 128, "loss.proj_norm": "none", "loss.proj_act": "relu",
        "loss.proj_last_norm": False,
        "augment.crop_scale_min": 0.2, "augment.crop_scale_max": 1.0, "augment.interpolation": "bilinear", "augment.flip_p": 0.5,
        "augment.jitter_p": 0.8, "augment.brightness": 0.4, "augment.contrast": 0.4, "augment.saturation": 0.4, "augment.hue": 0.1,
        "augment.grayscale_p": 0.2, "augment.blur_p": 0.0, "augment.solarize_p": 0.0, "augment.asymmetric_globals": False,
        "augment.downsample_p": 0.0,
        "optimizer": "sgd", "base_lr": 0.03, "lr_scaling": "none", "weight_decay": 1e-4, "min_lr_ratio": 0.001, "grad_clip": 0.0,
    },
}
assert set(PRESETS) == set(get_args(PresetName))

SUMMARY = {
    "demo": "the CPU demo (the defaults): stablerep, 2-layer 512 GELU head to 128, crop 0.35, blur 0.2, AdamW 1e-3",
    "stablerep": "StableRep: tau 0.1, 3-layer 4096 BN-ReLU head to 256, crop 0.08, blur 0.5, downsample 64/128 px p 0.05 "
                 "before the crop, AdamW 1e-4 wd 0.1, no clipping",
    "stablerep+": "stablerep + image-text loss (weight 1, logit scale 1/0.07 <= 100, 512-d) with a 12-layer text transformer trained from scratch",
    "simclr": "SimCLR as StableRep trains it: 2 views of one image, StableRep head and augmentations, AdamW 2e-4",
    "supcon": "SupCon by concept as StableRep trains it: 2 views, StableRep head and augmentations, AdamW 2e-4",
    "synclr": "SynCLR: tau 0.08, student (3-layer 4096 LN head + 2-layer predictor) vs EMA-teacher keys (0.994->1), "
              "4 local crops, asymmetric global recipes (blur 1.0 | blur 0.1 + solarize 0.2), iBOT: 50% of crops x 50% of "
              "tokens, 8192 unit prototypes (frozen 1/15), teacher temp 0.04->0.07 over 1/15, AdamW 7.5e-5 wd 0.1",
    "genrep": "GenRep: latent-neighbour groups as positives, tau 0.1, 2-layer ReLU head to 128, crop 0.2, no blur, "
              "SGD 0.03 momentum 0.9 wd 1e-4",
}


def preset_values(name: str) -> dict[str, Any]:
    """The dotted ``TrainConfig`` keys and values preset ``name`` sets (a copy)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return {k: list(v) if isinstance(v, list) else v for k, v in PRESETS[name].items()}


def describe_presets() -> str:
    """Multi-line ``--help`` text: the rule, then one line per preset."""
    width = max(map(len, PRESETS))
    lines = ["a method's published recipe; keys given explicitly override it. Backbone, image size, batch, steps and "
             "warm-up are not set. See docs/methods.md."]
    lines += [f"      {name.ljust(width)}  {SUMMARY[name]}" for name in PRESETS]
    return "\n".join(lines)


def apply_preset(cfg, name: str | None = None):
    """A copy of a ``TrainConfig`` with every value of preset ``name`` (default ``cfg.preset``) set, for configs built
    in code (``load_config`` applies presets itself, under the explicit keys)."""
    import dataclasses

    from ..config import set_values

    name = name or cfg.preset
    return set_values(dataclasses.replace(cfg, preset=name), preset_values(name))
