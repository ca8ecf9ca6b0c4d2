"""``synrep train``: the training loop shared by every method.

AdamW, linear warm-up then cosine decay, learning rate scaled by the global batch size, gradient
clipping, AMP on GPU (fp32 on CPU), DDP under torchrun (gloo on CPU, NCCL on GPU), checkpoints with
model/optimizer/RNG state (the data position is the step) every ``checkpoint_every`` steps, ``resume`` from the latest, metrics
as JSON lines, a NaN/inf guard, and the encoder exported as safetensors at the end.

The batch and the augmentation randomness at step k are functions of (seed, k, rank) only, so a run
resumed from step k continues exactly as the uninterrupted run would have (unless a group before k could not be
decoded; docs/data.md).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..config import changed_settings, check_config, config_to_dict, require, save_config
from ..errors import SynrepError
from ..distributed import barrier, cleanup, init_distributed
from ..plots import save_metrics_curve
from ..atomic import atomic_torch_save, atomic_write_text
from ..utils import append_jsonl, read_jsonl, set_threads, stable_seed
from .augment import AugmentConfig
from .backbones import BACKBONES, BackboneConfig
from ..sources import Source
from ..streaming import BatchSpec, ShortGroups, steps_per_epoch
from .data import LoaderConfig, check_data, make_batches, open_data, to_device
from .export import export_encoder
from .fast_paths import SpeedConfig, describe, enable_tf32, optimizer_kwargs, prepare_backbone
from .metrics import MetricWindow
from .methods import METHODS, MethodConfig, build_method
from .presets import PresetName, describe_presets, preset_values

LOG = logging.getLogger("synrep.train")
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


class TrainingError(SynrepError, RuntimeError):
    """Training cannot go on (bad settings, or a NaN/inf loss)."""


@dataclass
class TrainConfig:
    data: str = "runs/shards"  # shard folder from `synrep generate`, or real:<dataset> / imagefolder:<root> / wds:<folder>
    out_dir: str = "runs/train"  # checkpoint, metrics.jsonl, config.yaml and the exported encoder/ go here
    preset: PresetName = "demo"  # a method's published recipe (method, loss, heads, augmentations, schedules, optimizer); explicit keys override it
    method: str = "stablerep"  # training objective (registered methods: simclr, supcon, stablerep, stablerep+, synclr, supervised)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loss: MethodConfig = field(default_factory=MethodConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    groups_per_batch: int = 64  # caption groups per batch on each rank (G)
    images_per_group: int = 4  # images drawn from each caption group (k); they are each other's positives
    short_groups: ShortGroups = "error"  # a group with fewer than k images: error, fewer (use all it has) or skip
    steps: int = 300  # optimizer steps in all
    optimizer: Literal["adamw", "sgd"] = "adamw"  # AdamW (betas 0.9, 0.98) or SGD with momentum 0.9 (GenRep)
    base_lr: float = 1e-3  # peak learning rate for a global batch of 256 images (scaled by lr_scaling)
    lr_scaling: Literal["linear", "sqrt", "none"] = "linear"  # relative to a global batch of 256
    warmup_steps: int = 30  # linear warm-up steps before the cosine decay
    min_lr_ratio: float = 0.01  # final learning rate as a fraction of the peak
    weight_decay: float = 0.05  # weight decay (not on norms, biases, tokens)
    grad_clip: float = 3.0  # clip the global gradient norm to this (0 = no clipping, as the reference trainers)
    encoder: Literal["student", "teacher"] = "student"  # backbone exported as out_dir/encoder: the trained one, or the EMA teacher (DINO/iBOT evaluate the teacher; synclr)
    checkpoint_every: int = 100  # write checkpoint.pt every this many steps (and at the end)
    log_every: int = 10  # append a metrics.jsonl row every this many steps
    seed: int = 0  # seeds the model, the data order and the augmentations
    device: str = "auto"  # auto (cuda when available), cpu, cuda or cuda:N
    amp: bool = True  # bf16 autocast on GPU (fp32 on CPU regardless)
    num_threads: int = 0  # torch CPU threads (0 = torch's default)
    limit_groups: int = 0  # train on the first N groups only (0 = all)
    resume: bool = True  # continue from out_dir/checkpoint.pt when it exists
    stop_after: int = 0  # stop (with a checkpoint) after this many steps of this call: for tests and preemption drills

    def check(self) -> None:
        require(self.method in METHODS, "method", f"{self.method!r} is not allowed; choose one of {', '.join(METHODS)}")
        require(not METHODS[self.method].needs_patch_tokens or BACKBONES.problem(self.backbone.name) is not None
                or BACKBONES.traits(self.backbone.name)["patch_tokens"], "backbone.name",
                f"method {self.method} needs a backbone with patch tokens (masked image modelling); "
                f"choose one of {', '.join(BACKBONES.names_with('patch_tokens'))}, not {self.backbone.name!r}")
        require(self.encoder == "student" or METHODS[self.method].has_teacher, "encoder",
                f"method {self.method} has no EMA teacher; encoder=teacher needs one of "
                f"{', '.join(n for n, m in METHODS.items() if m.has_teacher)}")
        for key in ("steps", "groups_per_batch", "images_per_group", "log_every", "checkpoint_every"):
            require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        for key in ("limit_groups", "warmup_steps", "stop_after", "num_threads", "weight_decay"):
            require(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        require(math.isfinite(self.base_lr) and self.base_lr > 0, "base_lr", f"must be a positive number, got {self.base_lr}")
        require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        require(self.grad_clip >= 0, "grad_clip", f"must be >= 0 (0 = no clipping), got {self.grad_clip}")

    def preset_values(self) -> dict:
        """The values ``preset`` sets (dotted keys); ``load_config`` applies them under explicit keys."""
        return preset_values(self.preset)

    @classmethod
    def key_help(cls) -> dict[str, str]:
        """Longer ``--help`` text for some keys: what each preset sets."""
        return {"preset": describe_presets()}


def global_batch_size(cfg: TrainConfig, world_size: int) -> int:
    return cfg.groups_per_batch * cfg.images_per_group * world_size


def scaled_lr(cfg: TrainConfig, world_size: int) -> float:
    ratio = global_batch_size(cfg, world_size) / 256
    factor = {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}.get(cfg.lr_scaling)
    if factor is None:
        raise TrainingError(f"lr_scaling={cfg.lr_scaling!r} is not allowed; choose linear, sqrt or none")
    return cfg.base_lr * factor


def lr_at(step: int, peak: float, cfg: TrainConfig) -> float:
    """Linear warm-up to ``peak`` over ``warmup_steps``, then cosine down to ``min_lr_ratio * peak``."""
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return peak * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module, lr: float, device: str = "cpu") -> torch.optim.Optimizer:
    groups = _param_groups(model, cfg.weight_decay)
    kwargs = optimizer_kwargs(cfg.speed, device)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, **kwargs)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), **kwargs)


def validate(cfg: TrainConfig) -> None:
    """Check every value (also done when the config loads; here for configs built in code)."""
    check_config(cfg)


def sync_batchnorm(model: torch.nn.Module, device: str) -> torch.nn.Module:
    """BatchNorm layers -> SyncBatchNorm (statistics over the global batch) on CUDA devices.

    PyTorch's SyncBatchNorm runs only on GPUs; CPU ranks (gloo) keep per-rank statistics, which is logged.
    """
    if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    if not device.startswith("cuda"):
        LOG.info("BatchNorm statistics stay per rank on CPU (SyncBatchNorm needs GPUs)")
        return model
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(("cls_token", "mask_token", "pos_embed", "logit_scale")) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# Keys that may change between a run and its resume: where it writes and how often it reports, not what it learns.
RESUMABLE_CHANGES = {"out_dir", "resume", "stop_after", "num_threads", "log_every", "checkpoint_every", "device",
                     "speed.fused_optimizer", "speed.tf32", "speed.channels_last", "speed.compile"}


def _check_same_run(cfg: TrainConfig, saved: dict, ckpt: Path) -> None:
    """Refuse to resume from a checkpoint written with other training settings (listing them)."""
    changed = changed_settings(saved, config_to_dict(cfg), RESUMABLE_CHANGES)
    if changed:
        raise TrainingError(f"{ckpt} was written with other settings ({'; '.join(changed)}); resuming would mix two runs. "
                            f"Use a new out_dir, or start over in this one with --no-resume (resume=false)")


def _drop_metrics_after(path: Path, step: int) -> None:
    """Remove metrics rows logged after the checkpoint's step (they will be logged again), and a row cut short
    by a kill: rewritten whole, so the next appended row starts on a line of its own."""
    if not path.exists():
        return
    rows = read_jsonl(path)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows if r.get("step", 0) <= step))


def _check_method(cfg: TrainConfig, source: Source) -> None:
    method = METHODS[cfg.method]
    if method.needs_multiple_images and source.images_per_group == 1 and cfg.loss.views < 2:
        raise TrainingError(f"method {cfg.method} needs several images per caption (or loss.views>=2); "
                            f"{source.description} has one per group")
    if method.needs_multiple_images and cfg.images_per_group == 1 and cfg.loss.views < 2:  # no anchor would have a positive
        raise TrainingError(f"method {cfg.method} takes the other images of a caption as positives, but images_per_group=1 "
                            "and loss.views=1 leave every anchor without one; set images_per_group>=2 or loss.views=2")
    if method.needs_captions and not source.captioned:
        raise TrainingError(f"method {cfg.method} needs captions; {source.description} has none (use a synthetic shard folder)")


def train(cfg: TrainConfig) -> Path:
    """Train, checkpoint and export; returns the exported encoder folder ``out_dir/encoder``."""
    validate(cfg)
    set_threads(cfg.num_threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    info = init_distributed(device)
    if device.startswith("cuda"):
        if info.world_size > 1 or device == "cuda":  # torchrun: each process takes its local rank's GPU
            device = f"cuda:{info.local_rank}"
        torch.cuda.set_device(device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = open_data(cfg.data, cfg.limit_groups, cfg.loader.real_split)
    _check_method(cfg, source)
    load_size = check_data(source, cfg.groups_per_batch, cfg.images_per_group, cfg.short_groups, cfg.backbone.image_size,
                           cfg.loader, info.world_size)
    if info.is_main:
        save_config(cfg, out)
    torch.manual_seed(cfg.seed)
    model = build_method(cfg.method, cfg.backbone, cfg.loss, cfg.augment, len(source.class_names), cfg.steps).to(device)
    enable_tf32(cfg.speed, device)
    fast = prepare_backbone(model, cfg.backbone.name, cfg.speed, device)
    peak_lr = scaled_lr(cfg, info.world_size)
    optimizer = build_optimizer(cfg, model, peak_lr, device)
    use_amp = cfg.amp and device.startswith("cuda")
    scaler = torch.amp.GradScaler("cuda", enabled=False)  # bf16 needs no loss scaling (and the scaler's inf check would sync every step)
    step = 0
    ckpt = out / CHECKPOINT
    data_state = {"world_size": info.world_size, "num_workers": cfg.loader.num_workers, "groups": source.units.total,
                  "shuffle_buffer": cfg.loader.shuffle_buffer}
    if cfg.resume and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        _check_same_run(cfg, state.get("config", {}), ckpt)
        before = state.get("data", {})
        changed = [f"{k} {before[k]} -> {v}" for k, v in data_state.items() if k in before and before[k] != v]
        if changed:
            raise TrainingError(f"{ckpt} was written with other data settings ({'; '.join(changed)}): the batch order would "
                                "differ, so it cannot resume exactly; use the same settings or a new out_dir")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        step = int(state["step"])
        if info.is_main:
            _drop_metrics_after(out / METRICS, step)
        LOG.info("resumed from %s at step %d", ckpt, step)
    elif info.is_main and (out / METRICS).exists():
        (out / METRICS).unlink()
    ddp = model
    if info.world_size > 1:
        model = sync_batchnorm(model, device)
        ddp = DistributedDataParallel(model, find_unused_parameters=METHODS[cfg.method].may_leave_parameters_unused)
    spec = BatchSpec(cfg.groups_per_batch, cfg.images_per_group, load_size, cfg.backbone.in_channels, cfg.short_groups,
                     cfg.loader.shuffle_buffer, cfg.seed, captions=METHODS[cfg.method].needs_captions)
    _, batches = make_batches(source, spec, cfg.loader, info.rank, info.world_size, step, device.startswith("cuda"),
                              cfg.loss.text_tower, cfg.loss.text_context)
    batch_images = cfg.groups_per_batch * cfg.images_per_group
    LOG.info("training %s on %s: %d steps per epoch, backbone %s (%.2fM params, %d px, %d channel(s)), global batch %d, "
             "lr %.2e, %d steps, %d loader worker(s); fast paths: %s", cfg.method, source.description,
             steps_per_epoch(source.units.total, cfg.groups_per_batch, info.world_size), cfg.backbone.name,
             sum(p.numel() for p in model.backbone.parameters()) / 1e6, cfg.backbone.image_size, cfg.backbone.in_channels,
             global_batch_size(cfg, info.world_size), peak_lr, cfg.steps, cfg.loader.num_workers, describe(cfg.speed, device, fast))
    bar = tqdm(total=cfg.steps, initial=step, desc=f"train {cfg.method}", unit="step", disable=not info.is_main, dynamic_ncols=True)
    window_start, window_images, done_this_call = time.time(), 0, 0
    window = MetricWindow(device)
    while step < cfg.steps:
        loaded = next(batches)
        if loaded["step"] != step:
            raise TrainingError(f"the data stream delivered batch {loaded['step']} at step {step}")
        batch = to_device(loaded, device)
        generator = torch.Generator().manual_seed(stable_seed("augment", cfg.seed, step, info.rank) % 2**63)
        lr = lr_at(step, peak_lr, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            terms = ddp(batch, generator, step)
        loss = sum(terms.values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        model.before_optimizer_step(step)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
        scaler.step(optimizer)
        scaler.update()
        window.add(step, loss, terms, grad_norm, model.after_step(step))
        step += 1
        done_this_call += 1
        window_images += len(batch["images"]) * info.world_size
        stop_now = bool(cfg.stop_after and done_this_call >= cfg.stop_after)
        log_now = step % cfg.log_every == 0 or step == cfg.steps
        checkpoint_now = step % cfg.checkpoint_every == 0 or step == cfg.steps or stop_now
        if log_now or checkpoint_now:  # the only host sync: every rank reads at the same steps
            values, bad = window.read()
            if bad is not None:
                where = f"at step {bad[0] + 1}" if bad[0] >= 0 else f"on another rank before step {step}"
                raise TrainingError(f"loss became {bad[1] if bad[0] >= 0 else 'nan/inf'} {where} ({values}); lower base_lr (now "
                                    f"{cfg.base_lr}) or raise loss.temperature; the last good checkpoint is kept in {ckpt}")
        if info.is_main and log_now:
            record = {"step": step, **values, "lr": lr, "epoch": int(loaded["epoch"]),
                      "img_per_s": window_images / max(time.time() - window_start, 1e-9)}
            window_start, window_images = time.time(), 0
            append_jsonl(out / METRICS, record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", img_s=f"{record['img_per_s']:.0f}")
        bar.update(1)
        if checkpoint_now:
            if info.is_main:
                atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                                   "data": data_state, "torch_rng": torch.get_rng_state(), "step": step,
                                   "config": config_to_dict(cfg)}, ckpt)
            barrier()
        if stop_now:
            batches.close()
            bar.close()
            LOG.info("stopped after %d steps at step %d (stop_after); resume with the same command", done_this_call, step)
            cleanup()
            return out / "encoder"
    batches.close()
    bar.close()
    folder = out / "encoder"
    if info.is_main:
        folder = finish(cfg, model, source, out, batch_images)
    barrier()
    cleanup()
    return folder


def finish(cfg: TrainConfig, model: torch.nn.Module, source: Source, out: Path, batch_images: int) -> Path:
    """Export the encoder with a model card, and draw the loss curve."""
    metrics = read_jsonl(out / METRICS)
    if metrics:
        save_metrics_curve(out / "loss_curve.png", metrics, f"{cfg.method} training loss")
    speed = [m["img_per_s"] for m in metrics if "img_per_s" in m]
    info = {"method": cfg.method, "preset": cfg.preset, "weights": cfg.encoder, "data": cfg.data, "steps": cfg.steps, "seed": cfg.seed,
            "final_loss": metrics[-1]["loss"] if metrics else None, "train_config": config_to_dict(cfg)}
    card = f"""# synrep encoder: {cfg.method}

| field | value |
|---|---|
| method | {cfg.method} (preset `{cfg.preset}`) |
| exported weights | {cfg.encoder}{' (EMA teacher)' if cfg.encoder == 'teacher' else ''} |
| training data | `{cfg.data}` ({source.description}; classes: {', '.join(source.class_names[:10])}) |
| backbone | {cfg.backbone.name} ({sum(p.numel() for p in model.backbone.parameters()) / 1e6:.2f}M params, {model.backbone.feature_dim}-d features) |
| steps x batch | {cfg.steps} x {batch_images} images per rank |
| seed | {cfg.seed} |
| final loss | {info['final_loss']} |
| throughput | {np.median(speed) if speed else float('nan'):.0f} images/s (median) |

Load it with `synrep.training.export.load_encoder("{out / 'encoder'}")`; evaluate with `synrep eval encoder={out / 'encoder'}`.
"""
    return export_encoder(model.encoder(cfg.encoder), cfg.backbone, out / "encoder", info, card)
