"""Losses as pure functions: no module state, no cached masks; shapes in every docstring.

Distributed use: pass this rank's anchors and the gathered keys (see ``synrep.distributed.
gather_with_grad``) together with ``anchor_offset``, the position of this rank's first anchor
inside the keys; with one process anchors are the keys and the offset is 0.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def _check(anchors: torch.Tensor, anchor_ids: torch.Tensor, keys: torch.Tensor, key_ids: torch.Tensor) -> None:
    if anchors.ndim != 2 or keys.ndim != 2 or anchors.shape[1] != keys.shape[1]:
        raise ValueError(f"anchors {tuple(anchors.shape)} and keys {tuple(keys.shape)} must be [B, D] and [N, D]")
    if anchor_ids.shape != (anchors.shape[0],) or key_ids.shape != (keys.shape[0],):
        raise ValueError(f"ids must be [B] and [N]; got {tuple(anchor_ids.shape)} and {tuple(key_ids.shape)}")


def multi_positive_contrastive(anchors: torch.Tensor, anchor_ids: torch.Tensor, keys: torch.Tensor | None = None,
                               key_ids: torch.Tensor | None = None, temperature: float = 0.1,
                               anchor_offset: int = 0) -> torch.Tensor:
    """StableRep / SynCLR multi-positive contrastive loss (mean over anchors).

    anchors: ``[B, D]`` L2-normalised embeddings; anchor_ids: int ``[B]`` group (caption) ids;
    keys / key_ids: ``[N, D]`` / ``[N]`` all embeddings of the (gathered) batch, defaults to the anchors;
    anchor i is key ``anchor_offset + i`` and is excluded from its own softmax and target.
    For anchor i: q_ij = softmax_j≠i(a_i·k_j / τ), p_ij = 1[id_i = id_j] / #{j≠i: id_j = id_i},
    loss_i = -Σ_j p_ij log q_ij. Anchors without any positive contribute 0 (and are not averaged in).
    """
    if keys is None:
        keys, key_ids = anchors, anchor_ids
    _check(anchors, anchor_ids, keys, key_ids)
    b = anchors.shape[0]
    logits = anchors @ keys.t() / temperature  # [B, N]
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[torch.arange(b, device=logits.device), anchor_offset + torch.arange(b, device=logits.device)] = True
    logits = logits.masked_fill(self_mask, float("-inf"))
    positives = (anchor_ids[:, None] == key_ids[None, :]) & ~self_mask
    counts = positives.sum(1)
    log_q = F.log_softmax(logits, dim=1).masked_fill(self_mask, 0.0)
    per_anchor = -(positives * log_q).sum(1) / counts.clamp_min(1)
    valid = counts > 0
    return per_anchor[valid].mean() if valid.any() else per_anchor.sum() * 0.0


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """SimCLR NT-Xent: two views ``[B, D]`` each (L2-normalised); the other view of the same image is the positive."""
    if z1.shape != z2.shape:
        raise ValueError(f"views must have the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    ids = torch.arange(z1.shape[0], device=z1.device)
    return multi_positive_contrastive(torch.cat([z1, z2]), torch.cat([ids, ids]), temperature=temperature)


def supcon(features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al., L_out): ``[B, D]`` normalised features, int ``[B]`` labels.

    Same formula as the multi-positive loss with labels as the groups (mean of log-probabilities
    over positives equals cross-entropy against the uniform target over positives).
    """
    return multi_positive_contrastive(features, labels, temperature=temperature)


def image_text_contrastive(image_emb: torch.Tensor, image_group: torch.Tensor, text_emb: torch.Tensor,
                           text_group: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP-style loss made multi-positive for StableRep+ (several images share one caption).

    image_emb: ``[B, D]``, image_group: ``[B]``; text_emb: ``[T, D]``, text_group: ``[T]`` (distinct
    groups); all normalised. Image→text: the image's own caption is the one positive. Text→image:
    all images of the caption are positives with equal target weight. Returns the mean of both directions.
    """
    logits = logit_scale * image_emb @ text_emb.t()  # [B, T]
    match = (image_group[:, None] == text_group[None, :]).float()
    if (match.sum(1) != 1).any():
        raise ValueError("every image must match exactly one caption in text_group")
    i2t = -(match * F.log_softmax(logits, dim=1)).sum(1).mean()
    target_t = match.t() / match.t().sum(1, keepdim=True).clamp_min(1)
    has = match.t().sum(1) > 0
    t2i = -(target_t * F.log_softmax(logits.t(), dim=1)).sum(1)[has].mean()
    return (i2t + t2i) / 2


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, temperature: float, iterations: int = 3,
                   all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   all_reduce_max: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Sinkhorn-Knopp centring of teacher outputs (SwAV/iBOT): ``[N, K]`` logits -> ``[N, K]`` soft targets.

    Rows sum to 1 and the K prototypes are used equally often across the samples of *all* ranks: under
    torch.distributed pass in-place reductions over ranks (``synrep.distributed.all_reduce_sum_`` and
    ``all_reduce_max_``); every rank then gets its rows of the targets one process would compute for the
    whole gathered batch. Without them the centring is over this rank's N rows.
    """
    reduce_sum = all_reduce_sum or (lambda t: t)
    reduce_max = all_reduce_max or (lambda t: t)
    logits = teacher_logits.float()
    q = torch.exp((logits - reduce_max(logits.max().clone())) / temperature).t()  # [K, N]
    k = q.shape[0]
    n = reduce_sum(torch.tensor(float(q.shape[1]), device=q.device))
    q = q / reduce_sum(q.sum())
    for _ in range(iterations):
        q = q / reduce_sum(q.sum(dim=1, keepdim=True)) / k
        q = q / q.sum(dim=0, keepdim=True) / n
    return (q * n).t()


def masked_token_distillation(student_logits: torch.Tensor, teacher_probs: torch.Tensor, mask: torch.Tensor,
                              student_temperature: float = 0.1) -> torch.Tensor:
    """iBOT masked-image-modelling loss: cross-entropy from teacher to student on masked patches only.

    student_logits: ``[B, N, K]``; teacher_probs: ``[B, N, K]`` (rows sum to 1); mask: bool ``[B, N]``.
    Each image's loss is averaged over its masked patches, then over images that have any.
    """
    log_p = F.log_softmax(student_logits / student_temperature, dim=-1)
    per_patch = -(teacher_probs * log_p).sum(-1)  # [B, N]
    m = mask.float()
    per_image = (per_patch * m).sum(1) / m.sum(1).clamp_min(1.0)
    has = mask.any(1)
    return per_image[has].mean() if has.any() else student_logits.sum() * 0
