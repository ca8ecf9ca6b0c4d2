"""Training methods: the backbone plus the heads and loss terms each method needs.

Each method is an ``nn.Module`` whose ``forward(batch)`` returns a dict of named loss terms (summed
by the loop). A batch carries float images ``[B, C, H, W]`` in [0, 1] plus int ids ``group`` (the
caption), ``concept`` (the class) and ``image`` (unique per image across ranks), and for StableRep+
the group's caption embedding ``text`` ``[B, 384]``.

| method | positives | extra |
|---|---|---|
| ``simclr`` | two views of the same image | |
| ``supcon`` | same concept / label | |
| ``stablerep`` | same caption (multi-positive) | |
| ``stablerep+`` | same caption | + multi-positive image-text loss, frozen MiniLM + trainable text projection |
| ``synclr`` | same caption (global + local crops) | + iBOT masked image modelling with an EMA teacher |
| ``supervised`` | — | cross-entropy on labels (an upper bound on real data) |
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import gather_no_grad, gather_with_grad, get_rank
from .augment import AugmentConfig, augment, multi_crop
from .backbones import BackboneConfig, VisionTransformer, build_backbone
from .losses import image_text_contrastive, masked_token_distillation, multi_positive_contrastive, sinkhorn_knopp

METHODS = ("simclr", "supcon", "stablerep", "stablerep+", "synclr", "supervised")


@dataclass
class MethodConfig:
    temperature: float = 0.1
    views: int = 1
    proj_dim: int = 128
    proj_hidden: int = 512
    text_weight: float = 1.0
    text_dim: int = 384
    logit_scale_init: float = 1 / 0.07
    logit_scale_max: float = 100.0
    mim_weight: float = 1.0
    mask_image_prob: float = 0.5
    mask_ratio: float = 0.5
    num_prototypes: int = 1024
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    teacher_temp_warmup: float = 0.04
    teacher_temp_warmup_steps: int = 100
    ema_start: float = 0.994
    ema_end: float = 1.0


def normalize_images(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] images -> the [-1, 1] range every backbone sees (training and evaluation alike)."""
    return (x - 0.5) / 0.5


def mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))


def _gathered_loss(z: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """Multi-positive loss of this rank's anchors against the globally gathered batch."""
    keys = gather_with_grad(z)
    key_ids = gather_no_grad(ids) if keys is not z else ids  # int64: exact for any number of ids
    return multi_positive_contrastive(z, ids, keys, key_ids, temperature, anchor_offset=get_rank() * z.shape[0])


class ContrastiveMethod(nn.Module):
    """simclr, supcon, stablerep, stablerep+: V augmented views per image, a projection head, one loss."""

    def __init__(self, name: str, backbone_cfg: BackboneConfig, cfg: MethodConfig, aug: AugmentConfig):
        super().__init__()
        self.name, self.cfg, self.aug = name, cfg, aug
        self.backbone = build_backbone(backbone_cfg)
        self.image_size = backbone_cfg.image_size
        self.projector = mlp(self.backbone.feature_dim, cfg.proj_hidden, cfg.proj_dim)
        if name == "stablerep+":
            self.image_to_text = nn.Linear(self.backbone.feature_dim, cfg.proj_dim)
            self.text_projector = mlp(cfg.text_dim, cfg.proj_hidden, cfg.proj_dim)
            self.logit_scale = nn.Parameter(torch.tensor(math.log(cfg.logit_scale_init)))

    def views(self) -> int:
        return max(2, self.cfg.views) if self.name == "simclr" else max(1, self.cfg.views)

    def forward(self, batch: dict, generator: torch.Generator, step: int) -> dict[str, torch.Tensor]:
        x = batch["images"]
        v = self.views()
        viewed = torch.cat([augment(x, generator, self.aug, size=self.image_size) for _ in range(v)])  # [V*B, C, H, W]
        feats = self.backbone(normalize_images(viewed))
        z = F.normalize(self.projector(feats), dim=-1)
        key = {"simclr": "image", "supcon": "concept"}.get(self.name, "group")
        ids = batch[key].repeat(v)
        # Keep anchors of one rank contiguous in the gathered batch: [views x local batch] per rank.
        losses = {"contrastive": _gathered_loss(z, ids, self.cfg.temperature)}
        if self.name == "stablerep+":
            image_emb = F.normalize(self.image_to_text(feats[: len(x)]), dim=-1)
            groups, first = torch.unique(batch["group"], return_inverse=True)
            text_src = torch.zeros(len(groups), batch["text"].shape[1], dtype=batch["text"].dtype, device=x.device)
            text_src[first] = batch["text"]
            text_emb = F.normalize(self.text_projector(text_src), dim=-1)
            image_all = gather_with_grad(image_emb)
            text_all = gather_with_grad(text_emb)
            group_all = gather_no_grad(batch["group"]) if image_all is not image_emb else batch["group"]
            text_group_all = gather_no_grad(groups) if text_all is not text_emb else groups
            text_group_all, keep = _unique_first(text_group_all)
            scale = self.logit_scale.exp().clamp(max=self.cfg.logit_scale_max)
            losses["image_text"] = self.cfg.text_weight * image_text_contrastive(image_all, group_all, text_all[keep], text_group_all, scale)
        return losses


def _unique_first(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct ids in first-seen order and the positions of their first occurrence."""
    seen: dict[int, int] = {}
    for pos, value in enumerate(ids.tolist()):
        seen.setdefault(value, pos)
    positions = torch.tensor(list(seen.values()), device=ids.device, dtype=torch.long)
    return ids[positions], positions


class SupervisedMethod(nn.Module):
    """Cross-entropy on the concept/label ids through a linear classifier on the backbone."""

    def __init__(self, backbone_cfg: BackboneConfig, cfg: MethodConfig, aug: AugmentConfig, num_classes: int):
        super().__init__()
        self.name, self.cfg, self.aug = "supervised", cfg, aug
        self.backbone = build_backbone(backbone_cfg)
        self.image_size = backbone_cfg.image_size
        self.classifier = nn.Linear(self.backbone.feature_dim, num_classes)

    def forward(self, batch: dict, generator: torch.Generator, step: int) -> dict[str, torch.Tensor]:
        x = augment(batch["images"], generator, self.aug, size=self.image_size)
        return {"cross_entropy": F.cross_entropy(self.classifier(self.backbone(normalize_images(x))), batch["concept"])}


class SynCLRMethod(nn.Module):
    """Multi-positive contrastive on multi-crop views + iBOT masked image modelling with an EMA teacher."""

    def __init__(self, backbone_cfg: BackboneConfig, cfg: MethodConfig, aug: AugmentConfig, total_steps: int):
        super().__init__()
        self.name, self.cfg, self.aug, self.total_steps = "synclr", cfg, aug, total_steps
        self.backbone = build_backbone(backbone_cfg)
        self.image_size = backbone_cfg.image_size
        if not isinstance(self.backbone, VisionTransformer):
            raise ValueError(f"method synclr needs a ViT backbone (patch tokens for masked modelling), not {backbone_cfg.name!r}")
        dim = self.backbone.feature_dim
        self.projector = mlp(dim, cfg.proj_hidden, cfg.proj_dim)
        self.patch_head = mlp(dim, cfg.proj_hidden, cfg.num_prototypes)
        self.teacher_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.teacher_head = copy.deepcopy(self.patch_head).requires_grad_(False)

    def momentum(self, step: int) -> float:
        """EMA momentum: cosine from ``ema_start`` to ``ema_end`` over training."""
        c = self.cfg
        progress = min(1.0, step / max(1, self.total_steps))
        return c.ema_end - (c.ema_end - c.ema_start) * (math.cos(math.pi * progress) + 1) / 2

    def teacher_temperature(self, step: int) -> float:
        c = self.cfg
        if step >= c.teacher_temp_warmup_steps:
            return c.teacher_temp
        return c.teacher_temp_warmup + (c.teacher_temp - c.teacher_temp_warmup) * step / max(1, c.teacher_temp_warmup_steps)

    @torch.no_grad()
    def update_teacher(self, step: int) -> float:
        m = self.momentum(step)
        for student, teacher in ((self.backbone, self.teacher_backbone), (self.patch_head, self.teacher_head)):
            for ps, pt in zip(student.parameters(), teacher.parameters()):
                pt.mul_(m).add_(ps.detach(), alpha=1 - m)
        return m

    def forward(self, batch: dict, generator: torch.Generator, step: int) -> dict[str, torch.Tensor]:
        x = batch["images"]
        b = len(x)
        global_view, local_views = multi_crop(x, generator, self.aug, size=self.image_size)
        n = self.backbone.num_patches(global_view.shape[-1])
        masked_image = torch.rand(b, generator=generator) < self.cfg.mask_image_prob
        token_mask = torch.rand(b, n, generator=generator) < self.cfg.mask_ratio
        mask = (token_mask & masked_image[:, None]).to(x.device)
        cls, patches = self.backbone.forward_tokens(normalize_images(global_view), mask)
        embeddings = [self.projector(cls)]
        for view in local_views:
            embeddings.append(self.projector(self.backbone(normalize_images(view))))
        z = F.normalize(torch.cat(embeddings), dim=-1)
        ids = batch["group"].repeat(1 + len(local_views))
        losses = {"contrastive": _gathered_loss(z, ids, self.cfg.temperature)}
        with torch.no_grad():
            _, teacher_patches = self.teacher_backbone.forward_tokens(normalize_images(global_view))
            teacher_logits = self.teacher_head(teacher_patches)  # [B, N, K]
            targets = sinkhorn_knopp(teacher_logits.reshape(b * n, -1), self.teacher_temperature(step)).view_as(teacher_logits)
        student_logits = self.patch_head(patches)
        losses["mim"] = self.cfg.mim_weight * masked_token_distillation(student_logits, targets, mask, self.cfg.student_temp)
        return losses


def build_method(name: str, backbone_cfg: BackboneConfig, cfg: MethodConfig, aug: AugmentConfig, num_classes: int,
                 total_steps: int) -> nn.Module:
    if name in ("simclr", "supcon", "stablerep", "stablerep+"):
        return ContrastiveMethod(name, backbone_cfg, cfg, aug)
    if name == "synclr":
        return SynCLRMethod(backbone_cfg, cfg, aug, total_steps)
    if name == "supervised":
        return SupervisedMethod(backbone_cfg, cfg, aug, num_classes)
    raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
