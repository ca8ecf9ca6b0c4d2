"""``synrep generator train``: train the embedded text-to-image model on Fashion-MNIST *train* only.

Each training image is paired with a caption written for its label by the stage-1 template
backend ("A product photo of a leather ankle boot"); captions are dropped to the empty string with
probability ``caption_dropout`` so that classifier-free guidance works. The learning rate is
constant after warm-up and the batch at step k depends only on (seed, k), so a run stopped at step
K equals a run asked for K steps, and a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import copy
import logging
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..captions.concepts import generic_backgrounds, load_concepts
from ..captions.requests import plan_requests
from ..captions.template_backend import TemplateBackend
from ..ema import ema_update
from ..config import config_to_dict, require, save_config
from ..datasets import DATASETS, image_captions, load_dataset
from ..errors import SynrepError
from ..plots import save_curve
from ..atomic import atomic_torch_save, atomic_write_text
from ..utils import set_threads, sha256_arrays, stable_seed
from .model import EmbeddedGenerator, EmbeddedModelConfig, build_train_scheduler

LOG = logging.getLogger("synrep.generator")


class GeneratorTrainError(SynrepError, ValueError):
    """Generator training cannot start: concepts or images that do not fit the model, a checkpoint of another model."""


class GeneratorDiverged(SynrepError, FloatingPointError):
    """The generator's training loss became nan or inf."""


@dataclass
class GeneratorTrainConfig:
    out_dir: str = "runs/generator"
    dataset: str = "fashion-mnist"
    concepts: str = "fashion-mnist"
    steps: int = 3000
    batch_size: int = 128
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    captions_per_class: int = 64
    seed: int = 0
    checkpoint_every: int = 200
    num_threads: int = 0
    limit_images: int = 0
    model: EmbeddedModelConfig = field(default_factory=EmbeddedModelConfig)

    def check(self) -> None:
        problem = DATASETS.problem(self.dataset)
        require(problem is None, "dataset", problem or "")
        require(bool(self.concepts), "concepts", "is empty; give a shipped list name or a concepts file")
        for key in ("steps", "batch_size", "captions_per_class", "checkpoint_every"):
            require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        for key in ("warmup_steps", "num_threads", "limit_images"):
            require(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        require(math.isfinite(self.lr) and self.lr > 0, "lr", f"must be a positive number, got {self.lr}")
        for key in ("weight_decay", "grad_clip"):
            require(math.isfinite(getattr(self, key)) and getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        for key in ("ema_decay", "caption_dropout"):
            require(0 <= getattr(self, key) < 1, key, f"must be in [0, 1), got {getattr(self, key)}")


def class_captions(concepts_name: str, class_names: list[str], per_class: int, seed: int) -> list[list[str]]:
    """``per_class`` distinct template captions per dataset class (c and c+bg templates)."""
    concepts = load_concepts(concepts_name)
    by_label = {c.label: c for c in concepts.concepts if c.label is not None}
    backend = TemplateBackend()
    out = []
    for label in range(len(class_names)):
        if label not in by_label:
            raise GeneratorTrainError(f"concept list {concepts_name!r} has no concept with label {label} ({class_names[label]})")
        concept = by_label[label]
        backgrounds = concepts.backgrounds.get(concept.name, []) + generic_backgrounds()
        captions: list[str] = []
        start = 0
        while len(captions) < per_class and start < per_class * 20:
            reqs = plan_requests(concepts, concept, per_class, seed, {"c": 0.5, "c+bg": 0.5}, backgrounds, start=start)
            for text in backend.generate(reqs):
                if text not in captions and len(captions) < per_class:
                    captions.append(text)
            start += per_class
        out.append(captions)
    return out


def _lr_at(step: int, cfg: GeneratorTrainConfig) -> float:
    return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))


def model_card(cfg: GeneratorTrainConfig, step: int, wall_s: float, data_hash: str, losses: list[float], n_images: int) -> str:
    default = GeneratorTrainConfig()
    keys = [("steps", step), ("seed", cfg.seed), ("batch_size", cfg.batch_size), ("lr", cfg.lr)]
    keys += [(k, v) for k, v, usual in [("dataset", cfg.dataset, default.dataset),
                                        ("model.image_size", cfg.model.image_size, default.model.image_size)] if v != usual]
    overrides = " ".join(f"{k}={v}" for k, v in keys)
    return f"""# synrep embedded generator

A small text-conditional diffusion model (diffusers `UNet2DConditionModel`, pixel space
{cfg.model.image_size}x{cfg.model.image_size}x{cfg.model.channels}, channels {cfg.model.block_out_channels}) conditioned on frozen
all-MiniLM-L6-v2 caption embeddings, trained by synrep on the **{cfg.dataset} train split only**
({n_images} images; the test split is never seen).

| field | value |
|---|---|
| command | `synrep generator train {overrides}` |
| steps | {step} |
| batch size | {cfg.batch_size} |
| seed | {cfg.seed} |
| learning rate | {cfg.lr} (constant after {cfg.warmup_steps} warm-up steps), EMA {cfg.ema_decay} |
| caption dropout (for CFG) | {cfg.caption_dropout} |
| captions | {"one per image, naming its attributes (the dataset's own)" if DATASETS.traits(cfg.dataset).get("image_captions") else f"{cfg.captions_per_class} per class (template backend)"} |
| wall time | {wall_s / 60:.1f} min on {platform.machine()} with {torch.get_num_threads()} threads |
| final loss (mean of last 50 steps) | {float(np.mean(losses[-50:])) if losses else float('nan'):.4f} |
| data sha256 (train images + labels) | `{data_hash}` |
| torch / python | {torch.__version__} / {sys.version.split()[0]} |

Licence of the training data: Fashion-MNIST, MIT (Zalando Research).
"""


def train_generator(cfg: GeneratorTrainConfig, resume: bool = True) -> Path:
    """Train (or resume) and export the EMA model to ``out_dir/model``; returns that folder."""
    set_threads(cfg.num_threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    data = load_dataset(cfg.dataset, "train")
    if cfg.limit_images:
        data = data.subset(np.arange(min(cfg.limit_images, len(data))))
    data_hash = sha256_arrays(data.images, data.labels)
    images = torch.from_numpy(data.images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)  # [N, C, H, W] in [-1, 1]
    if images.shape[1:] != (cfg.model.channels, cfg.model.image_size, cfg.model.image_size):
        raise GeneratorTrainError(f"dataset images are {tuple(images.shape[1:])}, model expects "
                                  f"{(cfg.model.channels, cfg.model.image_size, cfg.model.image_size)}")
    labels = torch.from_numpy(data.labels)

    per_image = image_captions(cfg.dataset, "train")
    torch.manual_seed(cfg.seed)  # the UNet's initial weights depend on the seed only
    generator = EmbeddedGenerator(cfg.model)
    if per_image is not None:  # each image has its own caption (the attribute world): encode each distinct one once
        flat = sorted(set(per_image[: len(data)]))
        where = {c: i for i, c in enumerate(flat)}
        caption_of_image = torch.tensor([where[c] for c in per_image[: len(data)]])
    else:  # class-level template captions, drawn at random for each image of the class
        flat = [c for per in class_captions(cfg.concepts, data.class_names, cfg.captions_per_class, cfg.seed) for c in per]
    tokens, pooled = generator.encode_text(flat + [""])
    empty_tokens, empty_pooled = tokens[-1], pooled[-1]
    tokens, pooled = tokens[:-1], pooled[:-1]
    atomic_write_text(out / "train_captions.txt", "\n".join(flat) + "\n")

    unet = generator.unet.train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    noise_scheduler = build_train_scheduler(cfg.model)
    alphas = noise_scheduler.alphas_cumprod
    step, losses, wall = 0, [], 0.0
    ckpt_path = out / "checkpoint.pt"
    if resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        try:
            unet.load_state_dict(state["unet"])
            ema.load_state_dict(state["ema"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:  # a checkpoint of another model (other model.* settings)
            raise GeneratorTrainError(f"{ckpt_path} does not fit this model ({str(err).splitlines()[0]}); "
                                      "use the model settings it was written with, another out_dir, or --no-resume") from None
        step, losses, wall = int(state["step"]), list(state["losses"]), float(state["wall_s"])
        LOG.info("resumed generator training from %s at step %d", ckpt_path, step)

    def export(at_step: int) -> Path:
        export_gen = EmbeddedGenerator(cfg.model, unet=ema, text_encoder=generator._text_encoder)
        folder = export_gen.save(out / "model", card=model_card(cfg, at_step, wall, data_hash, losses, len(data)))
        if losses:
            xs = np.arange(1, len(losses) + 1)
            smooth = np.convolve(losses, np.ones(25) / 25, mode="valid") if len(losses) >= 25 else np.asarray(losses)
            save_curve(folder / "loss_curve.png", {"loss": (xs, losses), "moving mean (25)": (xs[len(xs) - len(smooth):], smooth)},
                       title="embedded generator: denoising loss", logy=True)
        return folder

    bar = tqdm(total=cfg.steps, initial=step, desc="generator train", unit="step", dynamic_ncols=True)
    start_time = time.time() - wall
    while step < cfg.steps:
        rng = torch.Generator().manual_seed(stable_seed("gen-train", cfg.seed, step))
        idx = torch.randint(0, len(images), (cfg.batch_size,), generator=rng)
        x0 = images[idx]
        y = labels[idx]
        cap = torch.randint(0, cfg.captions_per_class, (cfg.batch_size,), generator=rng)
        row = caption_of_image[idx] if per_image is not None else y * cfg.captions_per_class + cap
        ctx, pool = tokens[row].clone(), pooled[row].clone()
        drop = torch.rand(cfg.batch_size, generator=rng) < cfg.caption_dropout
        ctx[drop], pool[drop] = empty_tokens, empty_pooled
        noise = torch.randn(x0.shape, generator=rng)
        t = torch.randint(0, cfg.model.num_train_timesteps, (cfg.batch_size,), generator=rng)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, cfg)
        pred = unet(noisy, t, encoder_hidden_states=ctx, class_labels=pool).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        if not torch.isfinite(loss):
            raise GeneratorDiverged(f"generator training loss became {loss.item()} at step {step}; lower lr (now {cfg.lr})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
        optimizer.step()
        ema_update(ema, unet, min(cfg.ema_decay, (1 + step) / (10 + step)))
        losses.append(loss.item())
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses[-25:]):.4f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            wall = time.time() - start_time
            atomic_torch_save({"unet": unet.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                               "step": step, "losses": losses, "wall_s": wall, "config": config_to_dict(cfg)}, ckpt_path)
            export(step)
    bar.close()
    wall = time.time() - start_time
    folder = export(step)
    LOG.info("generator trained for %d steps in %.1f min; exported to %s", step, wall / 60, folder)
    return folder
