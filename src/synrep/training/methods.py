"""Training methods: the backbone plus the heads and loss terms each method needs, in one registry.

Each method is a :class:`Method` subclass registered with :func:`register_method`; it declares what it
needs from the data (``needs_multiple_images``, ``needs_captions``, ``needs_patch_tokens``) and the loop
asks the class instead of checking names. ``forward(batch, generator, step)`` returns a dict of named loss
terms (summed by the loop); ``after_step(step)`` runs after each optimizer step (an EMA teacher update)
and returns values to log. Adding a method is one class and its ``@register_method`` line. A batch carries float images ``[B, C, H, W]`` in [0, 1] plus int ids ``group`` (the
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
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import require
from ..distributed import all_reduce_max_, all_reduce_sum_, gather_no_grad, gather_with_grad, get_rank
from .augment import AugmentConfig, augment, multi_crop
from .backbones import BackboneConfig, VisionTransformer, build_backbone
from .losses import image_text_contrastive, masked_token_distillation, multi_positive_contrastive, sinkhorn_knopp

@dataclass
class MethodConfig:
    temperature: float = 0.1  # contrastive softmax temperature (StableRep 0.1, SynCLR 0.08)
    views: int = 1  # augmented views per image (SimCLR uses at least 2)
    proj_dim: int = 128  # projection head output dimension
    proj_hidden: int = 512  # projection head hidden width
    text_weight: float = 1.0  # StableRep+: weight of the image-text loss
    text_dim: int = 384  # StableRep+: caption embedding dimension (MiniLM: 384)
    logit_scale_init: float = 1 / 0.07  # StableRep+: initial image-text logit scale
    logit_scale_max: float = 100.0  # StableRep+: logit scale clamp
    mim_weight: float = 1.0  # SynCLR: weight of the masked-image-modelling loss
    mask_image_prob: float = 0.5  # SynCLR: fraction of images that get masked
    mask_ratio: float = 0.5  # SynCLR: fraction of patches masked in a masked image
    num_prototypes: int = 1024  # SynCLR: prototypes of the patch head
    student_temp: float = 0.1  # SynCLR: student softmax temperature
    teacher_temp: float = 0.07  # SynCLR: teacher temperature after warm-up
    teacher_temp_warmup: float = 0.04  # SynCLR: teacher temperature at step 0
    teacher_temp_warmup_steps: int = 100  # SynCLR: steps of teacher temperature warm-up
    ema_start: float = 0.994  # SynCLR: EMA teacher momentum at step 0
    ema_end: float = 1.0  # SynCLR: EMA teacher momentum at the end (cosine)

    def check(self) -> None:
        for key in ("temperature", "student_temp", "teacher_temp", "teacher_temp_warmup", "logit_scale_init", "logit_scale_max"):
            value = getattr(self, key)
            require(math.isfinite(value) and value > 0, key, f"must be a positive number, got {value}")
        for key in ("views", "proj_dim", "proj_hidden", "text_dim", "num_prototypes"):
            require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        for key in ("mask_image_prob", "mask_ratio", "ema_start", "ema_end"):
            require(0 <= getattr(self, key) <= 1, key, f"must be in [0, 1], got {getattr(self, key)}")
        for key in ("text_weight", "mim_weight", "teacher_temp_warmup_steps"):
            require(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")


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


class Method(nn.Module):
    """A training method: ``self.backbone`` (the encoder that is exported) plus heads and a loss."""

    name: ClassVar[str] = ""
    needs_multiple_images: ClassVar[bool] = False  # positives are the other images of a caption
    needs_captions: ClassVar[bool] = False  # the batch must carry caption embeddings (``text``)
    needs_patch_tokens: ClassVar[bool] = False  # masked image modelling: a ViT backbone
    may_leave_parameters_unused: ClassVar[bool] = False  # DDP must search for unused parameters (costs a graph walk)

    def __init__(self, backbone_cfg: BackboneConfig, cfg: MethodConfig, aug: AugmentConfig, num_classes: int, total_steps: int):
        super().__init__()
        self.cfg, self.aug, self.total_steps = cfg, aug, total_steps
        self.backbone = build_backbone(backbone_cfg)
        self.image_size = backbone_cfg.image_size
        if self.needs_patch_tokens and not isinstance(self.backbone, VisionTransformer):
            raise ValueError(f"method {self.name} needs a ViT backbone (patch tokens for masked modelling), not {backbone_cfg.name!r}")
        if not self.needs_patch_tokens and isinstance(getattr(self.backbone, "mask_token", None), nn.Parameter):
            self.backbone.mask_token.requires_grad_(False)  # only masked modelling uses it; DDP needs every trained parameter used

    def forward(self, batch: dict, generator: torch.Generator, step: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def after_step(self, step: int) -> dict[str, float | torch.Tensor]:
        """Called after the optimizer step ``step``; returns values to log (tensors are read only at log steps)."""
        return {}


METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available as ``method=<cls.name>``."""
    if not cls.name or cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} is empty or already registered")
    METHODS[cls.name] = cls
    return cls


class ContrastiveMethod(Method):
    """V augmented views per image, a projection head, and the multi-positive loss over ``positive_key`` ids."""

    positive_key: ClassVar[str] = "group"  # batch key whose equal ids are positives
    min_views: ClassVar[int] = 1

    def __init__(self, backbone_cfg: BackboneConfig, cfg: MethodConfig, aug: AugmentConfig, num_classes: int, total_steps: int):
        super().__init__(backbone_cfg, cfg, aug, num_classes, total_steps)
        self.projector = mlp(self.backbone.feature_dim, cfg.proj_hidden, cfg.proj_dim)

    def views(self) -> int:
        return max(self.min_views, self.cfg.views)

    def forward(self, batch: dict, generator: torch.Generator, step: int) -> dict[str, torch.Tensor]:
        x = batch["images"]
        v = self.views()
        viewed = torch.cat([augment(x, generator, self.aug, size=self.image_size) for _ in range(v)])  # [V*B, C, H, W]
        feats = self.backbone(normalize_images(viewed))
        z = F.normalize(self.projector(feats), dim=-1)
        ids = batch[self.positive_key].repeat(v)
        # Keep anchors of one rank contiguous in the gathered batch: [views x local batch] per rank.
        return {"contrastive": _gathered_loss(z, ids, self.cfg.temperature), **self.extra_losses(batch, feats[: len(x)])}

    def extra_losses(self, batch: dict, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        """More loss terms from the first view's features ``[B, D]`` (none here)."""
        return {}


@register_method
class SimCLR(ContrastiveMethod):
    """Instance discrimination: two views of the same image are the only positives."""

    name, positive_key, min_views = "simclr", "image", 2


@register_method
class SupCon(ContrastiveMethod):
    """Supervised contrastive by concept: every image of the same concept is a positive."""

    name, positive_key = "supcon", "concept"


@register_method
class StableRep(ContrastiveMethod):
    """StableRep: the images of one caption are each other's positives (multi-positive loss)."""

    name, positive_key, needs_multiple_images = "stablerep", "group", True


@register_method
class StableRepPlus(StableRep):
    """StableRep+: StableRep plus a multi-positive image-text loss (frozen MiniLM + trainable text projection)."""

    name, needs_captions = "stablerep+", True

    def __init__(self, backbone_cfg: BackboneConfig, cfg: MethodConfig, aug: AugmentConfig, num_classes: int, total_steps: int):
        super().__init__(backbone_cfg, cfg, aug, num_classes, total_steps)
        self.image_to_text = nn.Linear(self.backbone.feature_dim, cfg.proj_dim)
        self.text_projector = mlp(cfg.text_dim, cfg.proj_hidden, cfg.proj_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(cfg.logit_scale_init)))

    def extra_losses(self, batch: dict, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        image_emb = F.normalize(self.image_to_text(feats), dim=-1)
        groups, first = torch.unique(batch["group"], return_inverse=True)
        text_src = torch.zeros(len(groups), batch["text"].shape[1], dtype=batch["text"].dtype, device=feats.device)
        text_src[first] = batch["text"]
        text_emb = F.normalize(self.text_projector(text_src), dim=-1)
        image_all = gather_with_grad(image_emb)
        text_all = gather_with_grad(text_emb)
        group_all = gather_no_grad(batch["group"]) if image_all is not image_emb else batch["group"]
        text_group_all = gather_no_grad(groups) if text_all is not text_emb else groups
        text_group_all, keep = _unique_first(text_group_all)
        scale = self.logit_scale.exp().clamp(max=self.cfg.logit_scale_max)
        return {"image_text": self.cfg.text_weight * image_text_contrastive(image_all, group_all, text_all[keep], text_group_all, scale)}

    def after_step(self, step: int) -> dict[str, torch.Tensor]:
        return {"logit_scale": self.logit_scale.detach().exp()}  # read on the host only at log steps


def _unique_first(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct ids in first-seen order and the positions of their first occurrence."""
    seen: dict[int, int] = {}
    for pos, value in enumerate(ids.tolist()):
        seen.setdefault(value, pos)
    positions = torch.tensor(list(seen.values()), device=ids.device, dtype=torch.long)
    return ids[positions], positions


@register_method
class Supervised(Method):
    """Cross-entropy on the concept/label ids through a linear classifier on the backbone."""

    name = "supervised"

    def __init__(self, backbone_cfg: BackboneConfig, cfg: MethodConfig, aug: AugmentConfig, num_classes: int, total_steps: int):
        super().__init__(backbone_cfg, cfg, aug, num_classes, total_steps)
        self.classifier = nn.Linear(self.backbone.feature_dim, num_classes)

    def forward(self, batch: dict, generator: torch.Generator, step: int) -> dict[str, torch.Tensor]:
        x = augment(batch["images"], generator, self.aug, size=self.image_size)
        return {"cross_entropy": F.cross_entropy(self.classifier(self.backbone(normalize_images(x))), batch["concept"])}


@register_method
class SynCLR(Method):
    """Multi-positive contrastive on multi-crop views + iBOT masked image modelling with an EMA teacher."""

    name, needs_multiple_images, needs_patch_tokens = "synclr", True, True
    may_leave_parameters_unused = True  # the mask token is unused in a batch where no image is masked

    def __init__(self, backbone_cfg: BackboneConfig, cfg: MethodConfig, aug: AugmentConfig, num_classes: int, total_steps: int):
        super().__init__(backbone_cfg, cfg, aug, num_classes, total_steps)
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

    def after_step(self, step: int) -> dict[str, float]:
        return {"ema_momentum": self.update_teacher(step), "teacher_temp": self.teacher_temperature(step)}

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
            targets = sinkhorn_knopp(teacher_logits.reshape(b * n, -1), self.teacher_temperature(step),
                                     all_reduce_sum=all_reduce_sum_, all_reduce_max=all_reduce_max_).view_as(teacher_logits)
        student_logits = self.patch_head(patches)
        losses["mim"] = self.cfg.mim_weight * masked_token_distillation(student_logits, targets, mask, self.cfg.student_temp)
        return losses



def build_method(name: str, backbone_cfg: BackboneConfig, cfg: MethodConfig, aug: AugmentConfig, num_classes: int,
                 total_steps: int) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name](backbone_cfg, cfg, aug, num_classes, total_steps)
