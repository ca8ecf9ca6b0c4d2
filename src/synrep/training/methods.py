"""Training methods: the backbone plus the heads and loss terms each method needs, in one registry.

Each method is a :class:`Method` subclass registered with :func:`register_method`; it declares what it
needs from the data (``needs_multiple_images``, ``needs_captions``, ``needs_patch_tokens``) and the loop
asks the class instead of checking names. ``forward(batch, generator, step)`` returns a dict of named loss
terms (summed by the loop); ``before_optimizer_step(step)`` runs between backward and the optimizer step
(dropping frozen gradients); ``after_step(step)`` runs after it (an EMA teacher update) and returns values
to log; ``encoder(which)`` is the backbone to export (``teacher`` for methods with ``has_teacher``).
Adding a method is one class and its ``@register_method`` line. A batch carries float images
``[B, C, H, W]`` in [0, 1] plus int ids ``group`` (the caption), ``concept`` (the class) and ``image``
(unique per image across ranks), and for StableRep+ the group's caption embedding ``text`` ``[B, 384]``.
Heads are in :mod:`synrep.training.heads`, masks in :mod:`synrep.training.masking`, named recipes in
:mod:`synrep.training.presets`.

| method | positives | extra |
|---|---|---|
| ``simclr`` | two views of the same image | |
| ``supcon`` | same concept / label | |
| ``stablerep`` | same caption (multi-positive) | |
| ``stablerep+`` | same caption | + multi-positive image-text loss, frozen MiniLM + trainable text projection |
| ``synclr`` | same caption: student crops vs EMA-teacher global crops | + iBOT masked image modelling with the EMA teacher |
| ``supervised`` | — | cross-entropy on labels (an upper bound on real data) |
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..config import require
from ..ema import ema_update
from ..errors import SynrepError
from ..distributed import all_reduce_max_, all_reduce_sum_, gather_no_grad, gather_with_grad, get_rank
from .augment import AugmentConfig, global_recipes, global_view, local_crop_size, multi_crop
from .backbones import BACKBONES, BackboneConfig, build_backbone
from .heads import Activation, Norm, PatchHead, projection_head, trunc_normal_init
from .losses import ibot_patch_loss, image_text_contrastive, multi_positive_contrastive, sinkhorn_knopp, synclr_contrastive
from .masking import MaskShape, token_mask
from .text_tower import TextTower, TextTransformer, load_tokenizer


@dataclass
class MethodConfig:
    temperature: float = 0.1  # contrastive softmax temperature (StableRep 0.1, SynCLR 0.08)
    views: int = 1  # augmented views per image (SimCLR uses at least 2)
    proj_layers: int = 2  # projection head: linear layers (StableRep, SynCLR: 3)
    proj_hidden: int = 512  # projection head: hidden width (StableRep, SynCLR: 4096; 0 = the backbone's feature width)
    proj_dim: int = 128  # projection head: output dimension (StableRep, SynCLR: 256)
    proj_norm: Norm = "none"  # projection head: normalisation after hidden layers (StableRep bn, SynCLR ln)
    proj_act: Activation = "gelu"  # projection head: activation (StableRep relu, SynCLR gelu)
    proj_last_norm: bool = False  # projection head: affine-free BN/LN on the output (SynCLR: true)
    pred_layers: int = 2  # SynCLR: student predictor layers after the projection (proj_hidden wide, same norm)
    text_weight: float = 1.0  # StableRep+: weight of the image-text loss
    text_dim: int = 384  # StableRep+: caption embedding dimension (MiniLM: 384)
    text_embed_dim: int = 0  # StableRep+: width of the joint image-text space (0 = proj_dim; reference 512)
    logit_scale_init: float = 1 / 0.07  # StableRep+: initial image-text logit scale
    logit_scale_max: float = 100.0  # StableRep+: logit scale clamp
    text_tower: TextTower = "minilm"  # StableRep+: frozen MiniLM + trainable MLP (CPU default), or a text transformer trained from scratch (the paper's)
    text_layers: int = 12  # StableRep+ transformer tower: blocks (paper 12)
    text_width: int = 512  # StableRep+ transformer tower: width (paper 512)
    text_heads: int = 8  # StableRep+ transformer tower: attention heads (paper 8)
    text_context: int = 77  # StableRep+ transformer tower: tokens per caption, longer ones cut (paper 77)
    mim_weight: float = 1.0  # SynCLR: weight of the masked-image-modelling loss
    mask_image_prob: float = 0.5  # SynCLR: fraction of global crops that get masked (exactly floor(B x this))
    mask_ratio: float = 0.5  # SynCLR: fraction of patches masked in a masked crop (exactly floor(N x this))
    mask_shape: MaskShape = "random"  # SynCLR: random tokens (SynCLR's rand) or iBOT's blocks
    num_prototypes: int = 1024  # SynCLR: prototypes of the patch head (reference 8192)
    patch_head_layers: int = 3  # SynCLR: MLP layers of the patch head before its bottleneck
    patch_head_hidden: int = 512  # SynCLR: patch head hidden width (reference 2048)
    patch_head_bottleneck: int = 128  # SynCLR: L2-normalised bottleneck width (reference 256)
    freeze_last_layer: float = 0.05  # SynCLR: fraction of training during which the prototypes are frozen (DINO/iBOT: one epoch)
    student_temp: float = 0.1  # SynCLR: student softmax temperature
    teacher_temp: float = 0.07  # SynCLR: teacher temperature after warm-up
    teacher_temp_warmup: float = 0.04  # SynCLR: teacher temperature at step 0
    teacher_temp_warmup_frac: float = 0.1  # SynCLR: fraction of training over which the teacher temperature rises linearly
    ema_start: float = 0.994  # SynCLR: EMA teacher momentum at step 0
    ema_end: float = 1.0  # SynCLR: EMA teacher momentum at the end (cosine)
    local_excludes_own_global: bool = False  # SynCLR: a local crop's own image's teacher key is not a positive (avoid_local_global_same)

    def check(self) -> None:
        for key in ("temperature", "student_temp", "teacher_temp", "teacher_temp_warmup", "logit_scale_init", "logit_scale_max"):
            value = getattr(self, key)
            require(math.isfinite(value) and value > 0, key, f"must be a positive number, got {value}")
        for key in ("views", "proj_layers", "proj_dim", "text_dim", "num_prototypes", "patch_head_layers", "patch_head_hidden",
                    "patch_head_bottleneck"):
            require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        for key in ("text_layers", "text_width", "text_heads", "text_context"):
            require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        require(self.text_width % self.text_heads == 0, "text_width",
                f"must be a multiple of text_heads={self.text_heads}, got {self.text_width}")
        for key in ("proj_hidden", "text_embed_dim", "pred_layers"):
            require(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        for key in ("mask_image_prob", "mask_ratio", "ema_start", "ema_end", "freeze_last_layer", "teacher_temp_warmup_frac"):
            require(0 <= getattr(self, key) <= 1, key, f"must be in [0, 1], got {getattr(self, key)}")
        require(self.ema_start <= self.ema_end, "ema_start", f"must be <= ema_end={self.ema_end}, got {self.ema_start}")
        for key in ("text_weight", "mim_weight"):
            value = getattr(self, key)
            require(math.isfinite(value) and value >= 0, key, f"must be >= 0, got {value}")


def normalize_images(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] images -> the [-1, 1] range every backbone sees (training and evaluation alike)."""
    return (x - 0.5) / 0.5


def mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """Linear-GELU-Linear (the StableRep+ text projection on frozen MiniLM embeddings)."""
    return projection_head(in_dim, hidden, out_dim, layers=2)


def build_projector(in_dim: int, cfg: MethodConfig) -> nn.Sequential:
    """The configured projection head ``[.., in_dim] -> [.., proj_dim]``."""
    return projection_head(in_dim, cfg.proj_hidden or in_dim, cfg.proj_dim, cfg.proj_layers, cfg.proj_norm, cfg.proj_act,
                           cfg.proj_last_norm)


def _gathered_loss(z: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """Multi-positive loss of this rank's anchors against the globally gathered batch."""
    keys = gather_with_grad(z)
    key_ids = gather_no_grad(ids) if keys is not z else ids  # int64: exact for any number of ids
    return multi_positive_contrastive(z, ids, keys, key_ids, temperature, anchor_offset=get_rank() * z.shape[0])


class MethodError(SynrepError, ValueError):
    """A method cannot run with these settings (e.g. masked modelling without a ViT)."""


class Method(nn.Module):
    """A training method: ``self.backbone`` (the encoder that is exported) plus heads and a loss."""

    name: ClassVar[str] = ""
    needs_multiple_images: ClassVar[bool] = False  # positives are the other images of a caption
    needs_captions: ClassVar[bool] = False  # the batch must carry caption embeddings (``text``)
    needs_patch_tokens: ClassVar[bool] = False  # masked image modelling: a ViT backbone
    has_teacher: ClassVar[bool] = False  # keeps an EMA teacher backbone (``teacher_backbone``) that can be exported instead
    may_leave_parameters_unused: ClassVar[bool] = False  # DDP must search for unused parameters (costs a graph walk)

    def __init__(self, backbone_cfg: BackboneConfig, cfg: MethodConfig, aug: AugmentConfig, num_classes: int, total_steps: int):
        super().__init__()
        self.cfg, self.aug, self.total_steps = cfg, aug, total_steps
        self.backbone = build_backbone(backbone_cfg)
        self.image_size = backbone_cfg.image_size
        if self.needs_patch_tokens and not BACKBONES.traits(backbone_cfg.name)["patch_tokens"]:
            raise MethodError(f"method {self.name} needs a ViT backbone (patch tokens for masked modelling), not {backbone_cfg.name!r}")
        if not self.needs_patch_tokens and isinstance(getattr(self.backbone, "mask_token", None), nn.Parameter):
            self.backbone.mask_token.requires_grad_(False)  # only masked modelling uses it; DDP needs every trained parameter used

    def forward(self, batch: dict, generator: torch.Generator, step: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def before_optimizer_step(self, step: int) -> None:
        """Called between backward and the optimizer step ``step`` (gradients are unscaled): e.g. drop frozen gradients."""

    def after_step(self, step: int) -> dict[str, float | torch.Tensor]:
        """Called after the optimizer step ``step``; returns values to log (tensors are read only at log steps)."""
        return {}

    def encoder(self, which: Literal["student", "teacher"] = "student") -> nn.Module:
        """The backbone to export: the trained one, or the EMA teacher of a method that has one."""
        if which == "teacher":
            if not self.has_teacher:
                raise MethodError(f"method {self.name} has no EMA teacher to export; use encoder=student")
            return self.teacher_backbone
        return self.backbone


METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available as ``method=<cls.name>``."""
    if not cls.name or cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} is empty or already registered")
    METHODS[cls.name] = cls
    return cls


def project_per_view(head: nn.Module, feats: torch.Tensor, views: int) -> torch.Tensor:
    """Apply ``head`` to each view's ``[B, D]`` chunk of ``[V*B, D]`` separately: BatchNorm statistics per view,
    as StableRep's reference ("do separate BN"); identical to one call for heads without BatchNorm."""
    if views == 1:
        return head(feats)
    return torch.cat([head(chunk) for chunk in feats.chunk(views)])


class ContrastiveMethod(Method):
    """V augmented views per image, a projection head, and the multi-positive loss over ``positive_key`` ids."""

    positive_key: ClassVar[str] = "group"  # batch key whose equal ids are positives
    min_views: ClassVar[int] = 1

    def __init__(self, backbone_cfg: BackboneConfig, cfg: MethodConfig, aug: AugmentConfig, num_classes: int, total_steps: int):
        super().__init__(backbone_cfg, cfg, aug, num_classes, total_steps)
        self.projector = build_projector(self.backbone.feature_dim, cfg)

    def views(self) -> int:
        return max(self.min_views, self.cfg.views)

    def forward(self, batch: dict, generator: torch.Generator, step: int) -> dict[str, torch.Tensor]:
        x = batch["images"]
        v = self.views()
        recipes = global_recipes(len(x), generator, self.aug)
        viewed = torch.cat([global_view(x, generator, self.aug, self.image_size, recipes, i) for i in range(v)])  # [V*B, C, H, W]
        feats = self.backbone(normalize_images(viewed))
        z = F.normalize(project_per_view(self.projector, feats, v), dim=-1)
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
    """StableRep+: StableRep plus a multi-positive image-text loss; the text side is ``loss.text_tower``
    (frozen MiniLM + trainable MLP, or a text transformer trained from scratch, see :mod:`.text_tower`)."""

    name, needs_captions = "stablerep+", True

    def __init__(self, backbone_cfg: BackboneConfig, cfg: MethodConfig, aug: AugmentConfig, num_classes: int, total_steps: int):
        super().__init__(backbone_cfg, cfg, aug, num_classes, total_steps)
        embed = cfg.text_embed_dim or cfg.proj_dim
        self.image_to_text = nn.Linear(self.backbone.feature_dim, embed, bias=False)  # the reference's linear image_projection
        if cfg.text_tower == "transformer":
            self.text_input = "text_tokens"
            vocab = load_tokenizer().vocab_size
            self.text_projector = nn.Sequential(TextTransformer(vocab, cfg.text_context, cfg.text_width, cfg.text_layers, cfg.text_heads),
                                                nn.Linear(cfg.text_width, embed, bias=False))  # CLIP's text_projection
        else:
            self.text_input = "text"
            self.text_projector = mlp(cfg.text_dim, cfg.proj_hidden or cfg.text_dim, embed)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(cfg.logit_scale_init)))

    def extra_losses(self, batch: dict, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        image_emb = F.normalize(self.image_to_text(feats), dim=-1)
        groups, group_of_row = torch.unique(batch["group"], return_inverse=True)
        text_in = batch[self.text_input]  # [B, 384] embeddings or [B, L] token ids; equal within a group
        text_src = torch.zeros(len(groups), *text_in.shape[1:], dtype=text_in.dtype, device=feats.device)
        text_src[group_of_row] = text_in  # one row per caption
        text_emb = F.normalize(self.text_projector(text_src), dim=-1)
        # A batch that repeats a group (padding after unreadable data) has fewer distinct captions on this rank:
        # pad the rows to the batch size (group -1) so that every rank gathers the same shape, then drop them.
        pad = len(batch["group"]) - len(groups)
        text_emb = torch.cat([text_emb, text_emb.new_zeros(pad, text_emb.shape[1])])
        groups = torch.cat([groups, groups.new_full((pad,), -1)])
        image_all = gather_with_grad(image_emb)
        text_all = gather_with_grad(text_emb)
        group_all = gather_no_grad(batch["group"]) if image_all is not image_emb else batch["group"]
        text_group_all = gather_no_grad(groups) if text_all is not text_emb else groups
        real = torch.nonzero(text_group_all >= 0).squeeze(1)
        text_group_all, first = _unique_first(text_group_all[real])
        keep = real[first]
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
        x = global_view(batch["images"], generator, self.aug, self.image_size)
        return {"cross_entropy": F.cross_entropy(self.classifier(self.backbone(normalize_images(x))), batch["concept"])}


def cosine_momentum(step: int, total_steps: int, start: float, end: float) -> float:
    """EMA momentum at ``step``: ``end - (end - start) * (1 + cos(pi * step / total)) / 2`` (DINO's cosine_scheduler,
    SynCLR's ``adjust_moco_momentum_v2``): ``start`` at step 0, ``end`` at the last step."""
    progress = min(1.0, step / max(1, total_steps))
    return end - (end - start) * (math.cos(math.pi * progress) + 1) / 2


def linear_warmup(step: int, warmup_steps: int, start: float, end: float) -> float:
    """``start`` at step 0 rising linearly to ``end`` at ``warmup_steps``, then ``end``."""
    if step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps


@register_method
class SynCLR(Method):
    """SynCLR: multi-positive contrastive of student crops against EMA-teacher keys + iBOT masked image modelling.

    Student: backbone, projector, predictor and DINO-style patch head. Teacher (EMA of the student, cosine
    momentum): backbone, projector, patch head. The teacher sees the unmasked global crop; its projected class
    token is the key of every crop of the same caption (:func:`~synrep.training.losses.synclr_contrastive`,
    gathered over ranks); its patch-head outputs at the masked tokens, centred with Sinkhorn-Knopp over all
    ranks, are the student's targets at those tokens (:func:`~synrep.training.losses.ibot_patch_loss`).
    """

    name, needs_multiple_images, needs_patch_tokens, has_teacher = "synclr", True, True, True
    may_leave_parameters_unused = True  # the mask token is unused in a batch where no image is masked

    def __init__(self, backbone_cfg: BackboneConfig, cfg: MethodConfig, aug: AugmentConfig, num_classes: int, total_steps: int):
        super().__init__(backbone_cfg, cfg, aug, num_classes, total_steps)
        dim = self.backbone.feature_dim
        self.projector = trunc_normal_init(build_projector(dim, cfg))
        hidden = cfg.proj_hidden or dim
        self.predictor = trunc_normal_init(projection_head(cfg.proj_dim, hidden, cfg.proj_dim, cfg.pred_layers, cfg.proj_norm,
                                                           cfg.proj_act, cfg.proj_last_norm)) if cfg.pred_layers else nn.Identity()
        self.patch_head = PatchHead(dim, cfg.num_prototypes, cfg.patch_head_hidden, cfg.patch_head_bottleneck, cfg.patch_head_layers)
        self.teacher_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.teacher_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.teacher_head = copy.deepcopy(self.patch_head).requires_grad_(False)
        self.local_size = local_crop_size(aug, self.image_size, backbone_cfg.patch_size)
        self.freeze_steps = round(cfg.freeze_last_layer * total_steps)

    def pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(student, teacher) module pairs kept in EMA."""
        return [(self.backbone, self.teacher_backbone), (self.projector, self.teacher_projector), (self.patch_head, self.teacher_head)]

    def momentum(self, step: int) -> float:
        """EMA momentum: cosine from ``ema_start`` to ``ema_end`` over training."""
        return cosine_momentum(step, self.total_steps, self.cfg.ema_start, self.cfg.ema_end)

    def teacher_temperature(self, step: int) -> float:
        """Linear from ``teacher_temp_warmup`` to ``teacher_temp`` over ``teacher_temp_warmup_frac`` of training."""
        c = self.cfg
        return linear_warmup(step, round(c.teacher_temp_warmup_frac * self.total_steps), c.teacher_temp_warmup, c.teacher_temp)

    @torch.no_grad()
    def update_teacher(self, step: int) -> float:
        """teacher <- m * teacher + (1 - m) * student for every parameter (buffers are copied); returns m."""
        m = self.momentum(step)
        for student, teacher in self.pairs():
            ema_update(teacher, student, m)
        return m

    def before_optimizer_step(self, step: int) -> None:
        """Freeze the prototypes for the first ``freeze_last_layer`` of training (DINO's cancel_gradients_last_layer:
        the gradient is dropped, so neither the update nor weight decay touches them)."""
        if step < self.freeze_steps:
            for p in self.patch_head.last_layer.parameters():
                p.grad = None

    def after_step(self, step: int) -> dict[str, float]:
        return {"ema_momentum": self.update_teacher(step), "teacher_temp": self.teacher_temperature(step)}

    def forward(self, batch: dict, generator: torch.Generator, step: int) -> dict[str, torch.Tensor]:
        x, ids = batch["images"], batch["group"]
        b = len(x)
        global_crop, local_crops = multi_crop(x, generator, self.aug, size=self.image_size, local_size=self.local_size)
        grid = global_crop.shape[-1] // self.backbone.patch_size
        mask = token_mask(self.cfg.mask_shape, b, grid, self.cfg.mask_image_prob, self.cfg.mask_ratio, generator).to(x.device)
        global_in = normalize_images(global_crop)
        cls, patches = self.backbone.forward_tokens(global_in, mask)
        crops = [cls]
        if local_crops:
            crops.append(self.backbone(normalize_images(torch.cat(local_crops))))  # [L*B, D], crop-major
        queries = F.normalize(self.predictor(self.projector(torch.cat(crops))), dim=-1)
        with torch.no_grad():
            teacher_cls, teacher_patches = self.teacher_backbone.forward_tokens(global_in)
            keys = F.normalize(self.teacher_projector(teacher_cls), dim=-1)
            all_keys = gather_no_grad(keys)
            all_ids = gather_no_grad(ids) if all_keys is not keys else ids
            targets = sinkhorn_knopp(self.teacher_head(teacher_patches[mask]), self.teacher_temperature(step),
                                     all_reduce_sum=all_reduce_sum_, all_reduce_max=all_reduce_max_)  # [M, K]
        glob, local = synclr_contrastive(queries[:b], queries[b:], ids, all_keys, all_ids, self.cfg.temperature,
                                         key_offset=get_rank() * b, local_excludes_own_global=self.cfg.local_excludes_own_global)
        token_image = torch.nonzero(mask)[:, 0]
        mim = ibot_patch_loss(self.patch_head(patches[mask]), targets, token_image, self.cfg.student_temp)
        return {"contrastive_global": glob, "contrastive_local": local, "mim": self.cfg.mim_weight * mim}


def build_method(name: str, backbone_cfg: BackboneConfig, cfg: MethodConfig, aug: AugmentConfig, num_classes: int,
                 total_steps: int) -> Method:
    if name not in METHODS:
        raise MethodError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name](backbone_cfg, cfg, aug, num_classes, total_steps)
