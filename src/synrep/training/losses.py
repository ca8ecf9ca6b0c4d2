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


def multi_positive_to_keys(queries: torch.Tensor, query_ids: torch.Tensor, keys: torch.Tensor, key_ids: torch.Tensor,
                           temperature: float, excluded_key: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query multi-positive loss against a separate key set (SynCLR's student queries vs EMA-teacher keys).

    queries: ``[Q, D]``, keys: ``[N, D]`` (both L2-normalised); query_ids ``[Q]`` / key_ids ``[N]`` caption ids;
    excluded_key: int ``[Q]``, the key each query must not see (its own crop seen by the teacher), -1 for none.
    For query i over the keys j it may see: q_ij = softmax_j(q_i·k_j / τ), positives P_i = {j: id_j = id_i},
    loss_i = -(1/|P_i|) Σ_{j∈P_i} log q_ij. Returns ``(loss [Q], valid [Q])``; a query without a positive is
    not valid and its loss is 0 (the reference code divides by zero there).
    """
    _check(queries, query_ids, keys, key_ids)
    logits = queries @ keys.t() / temperature  # [Q, N]
    seen = torch.ones_like(logits, dtype=torch.bool)
    if excluded_key is not None:
        rows = torch.nonzero(excluded_key >= 0).flatten()
        seen[rows, excluded_key[rows]] = False
    log_q = F.log_softmax(logits.masked_fill(~seen, float("-inf")), dim=1).masked_fill(~seen, 0.0)
    positives = (query_ids[:, None] == key_ids[None, :]) & seen
    counts = positives.sum(1)
    loss = -(positives * log_q).sum(1) / counts.clamp_min(1)
    return loss, counts > 0


def _masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return values[valid].mean() if valid.any() else values.sum() * 0.0


def synclr_contrastive(global_queries: torch.Tensor, local_queries: torch.Tensor, ids: torch.Tensor, keys: torch.Tensor,
                       key_ids: torch.Tensor, temperature: float = 0.08, key_offset: int = 0,
                       local_excludes_own_global: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """SynCLR's contrastive term (``SupConMomentumLoss``): student queries against EMA-teacher keys of the global crops.

    global_queries: ``[B, D]`` student (projection + predictor) embeddings of this rank's global crops;
    local_queries: ``[L*B, D]`` of its local crops, crop-major (crop l of image i at ``l*B + i``); ids: ``[B]``
    caption ids of the images; keys: ``[N, D]`` teacher embeddings of the global crops of all ranks, key_ids ``[N]``;
    this rank's image i is key ``key_offset + i``. All embeddings L2-normalised.
    A global query does not see its own key (the teacher saw the same crop); a local query sees it (it is a
    positive) unless ``local_excludes_own_global``. Returns ``(global mean, local mean)`` of
    :func:`multi_positive_to_keys` over valid queries; the SynCLR loss is their sum, so the global crops weigh
    as much as all local crops together. The local mean is 0 without local crops.
    """
    b = global_queries.shape[0]
    if local_queries.shape[0] % max(b, 1) or (local_queries.numel() and local_queries.shape[1] != global_queries.shape[1]):
        raise ValueError(f"local_queries {tuple(local_queries.shape)} must be [L*B, D] for global_queries {tuple(global_queries.shape)}")
    own = key_offset + torch.arange(b, device=global_queries.device)
    g_loss, g_valid = multi_positive_to_keys(global_queries, ids, keys, key_ids, temperature, own)
    if local_queries.shape[0] == 0:
        return _masked_mean(g_loss, g_valid), global_queries.sum() * 0.0
    crops = local_queries.shape[0] // b
    excluded = own.repeat(crops) if local_excludes_own_global else torch.full_like(own.repeat(crops), -1)
    l_loss, l_valid = multi_positive_to_keys(local_queries, ids.repeat(crops), keys, key_ids, temperature, excluded)
    return _masked_mean(g_loss, g_valid), _masked_mean(l_loss, l_valid)


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, temperature: float, iterations: int = 3,
                   all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   all_reduce_max: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Sinkhorn-Knopp centring of teacher outputs (SwAV/iBOT): ``[N, K]`` logits -> ``[N, K]`` soft targets.

    Q ∝ exp(logits / temperature); ``iterations`` times: scale each prototype (column here) to total mass 1/K
    over the samples of *all* ranks, then each sample (row) to sum 1. Rows of the result sum to 1 and the K
    prototypes are used equally often. Computed in the log domain, so no logits (however large or spread out)
    can underflow a prototype's mass to 0 and give 0/0: finite logits always give finite targets.
    Under torch.distributed pass in-place reductions over ranks (``synrep.distributed.all_reduce_sum_`` and
    ``all_reduce_max_``); every rank then gets its rows of the targets one process would compute for the
    whole gathered batch (a rank with N = 0 rows still takes part in the reductions).
    """
    reduce_sum = all_reduce_sum or (lambda t: t)
    reduce_max = all_reduce_max or (lambda t: t)
    log_q = teacher_logits.float() / temperature  # [N, K]; the reference's first division by the total is a constant
    n, k = log_q.shape
    for _ in range(iterations):
        peak = log_q.max(dim=0).values if n else torch.full((k,), float("-inf"), device=log_q.device)
        peak = reduce_max(peak.clone())
        peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
        mass = reduce_sum(torch.exp(log_q - peak).sum(dim=0))  # [K], >= 1 where any rank has a sample
        log_q = log_q - (peak + torch.log(mass.clamp_min(torch.finfo(mass.dtype).tiny)))
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True)
    return log_q.exp()


def masked_token_distillation(student_logits: torch.Tensor, teacher_probs: torch.Tensor, mask: torch.Tensor,
                              student_temperature: float = 0.1) -> torch.Tensor:
    """iBOT masked-image-modelling loss: cross-entropy from teacher to student on masked patches only.

    student_logits: ``[B, N, K]``; teacher_probs: ``[B, N, K]`` (rows sum to 1); mask: bool ``[B, N]``.
    Each image's loss is averaged over its masked patches, then over images that have any.
    """
    rows = torch.nonzero(mask)
    return ibot_patch_loss(student_logits[mask], teacher_probs[mask], rows[:, 0], student_temperature)


def ibot_patch_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, token_image: torch.Tensor,
                    student_temperature: float = 0.1) -> torch.Tensor:
    """iBOT's patch loss on the masked tokens only (``iBOTPatchLoss.forward_masked``).

    student_logits: ``[M, K]`` at the M masked tokens; teacher_probs: ``[M, K]`` (rows sum to 1); token_image:
    int ``[M]``, the image each token belongs to. loss = mean over masked images of the mean over the image's
    masked tokens of -Σ_k t_k log softmax(s / τ_s)_k. 0 (with a gradient path) when M = 0.
    """
    if student_logits.shape != teacher_probs.shape or token_image.shape != student_logits.shape[:1]:
        raise ValueError(f"student {tuple(student_logits.shape)}, teacher {tuple(teacher_probs.shape)} and token_image "
                         f"{tuple(token_image.shape)} must be [M, K], [M, K] and [M]")
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    per_token = -(teacher_probs * F.log_softmax(student_logits.float() / student_temperature, dim=-1)).sum(-1)  # [M]
    images, index, counts = torch.unique(token_image, return_inverse=True, return_counts=True)
    return (per_token / counts[index]).sum() / len(images)
