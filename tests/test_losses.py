import math

import pytest
import torch
import torch.nn.functional as F

from synrep.training.losses import (ibot_patch_loss, image_text_contrastive, masked_token_distillation, multi_positive_contrastive,
                                    multi_positive_to_keys, nt_xent, sinkhorn_knopp, supcon, synclr_contrastive)


def double_loop_reference(z, ids, tau):
    """The StableRep formula written plainly: for each anchor, softmax over all others, uniform target over positives."""
    n = len(z)
    total, anchors = 0.0, 0
    for i in range(n):
        others = [j for j in range(n) if j != i]
        logits = torch.stack([z[i] @ z[j] / tau for j in others])
        log_q = logits - torch.logsumexp(logits, 0)
        pos = [k for k, j in enumerate(others) if ids[j] == ids[i]]
        if not pos:
            continue
        total = total - sum(log_q[k] for k in pos) / len(pos)
        anchors += 1
    return total / anchors


def plain_nt_xent(z1, z2, tau):
    z = torch.cat([z1, z2])
    n = len(z1)
    sim = z @ z.t() / tau
    sim.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(sim, targets)


def test_multi_positive_equals_double_loop_values_and_gradients():
    torch.manual_seed(0)
    raw = torch.randn(12, 8, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4, 4])  # group 3 has no positive: left out of the mean
    ours = multi_positive_contrastive(F.normalize(raw, dim=1), ids, temperature=0.1)
    (g_ours,) = torch.autograd.grad(ours, raw)
    ref = double_loop_reference(F.normalize(raw, dim=1), ids.tolist(), 0.1)
    (g_ref,) = torch.autograd.grad(ref, raw)
    assert torch.allclose(ours, ref, atol=1e-10) and torch.allclose(g_ours, g_ref, atol=1e-10)


def test_equals_nt_xent_with_groups_of_two():
    torch.manual_seed(1)
    z1, z2 = F.normalize(torch.randn(6, 5, dtype=torch.float64), dim=1), F.normalize(torch.randn(6, 5, dtype=torch.float64), dim=1)
    assert torch.allclose(nt_xent(z1, z2, 0.2), plain_nt_xent(z1, z2, 0.2), atol=1e-10)
    ids = torch.arange(6)
    assert torch.allclose(multi_positive_contrastive(torch.cat([z1, z2]), torch.cat([ids, ids]), temperature=0.2),
                          plain_nt_xent(z1, z2, 0.2), atol=1e-10)


def test_invariant_to_batch_order():
    torch.manual_seed(2)
    z = F.normalize(torch.randn(16, 4, dtype=torch.float64), dim=1)
    ids = torch.randint(0, 5, (16,))
    perm = torch.randperm(16)
    assert torch.allclose(multi_positive_contrastive(z, ids), multi_positive_contrastive(z[perm], ids[perm]), atol=1e-12)
    assert torch.allclose(supcon(z, ids), multi_positive_contrastive(z, ids))


def test_anchor_offset_matches_full_batch():
    torch.manual_seed(3)
    z = F.normalize(torch.randn(8, 4, dtype=torch.float64), dim=1)
    ids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    full = multi_positive_contrastive(z, ids)
    halves = [multi_positive_contrastive(z[s:s + 4], ids[s:s + 4], z, ids, anchor_offset=s) for s in (0, 4)]
    assert torch.allclose(full, sum(halves) / 2)


def test_image_text_loss_multi_positive():
    img = F.normalize(torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1.0]]), dim=1)
    txt = F.normalize(torch.tensor([[1.0, 0], [0, 1.0]]), dim=1)
    good = image_text_contrastive(img, torch.tensor([5, 5, 7]), txt, torch.tensor([5, 7]), torch.tensor(10.0))
    bad = image_text_contrastive(img, torch.tensor([7, 7, 5]), txt, torch.tensor([5, 7]), torch.tensor(10.0))
    assert good < bad
    with pytest.raises(ValueError):
        image_text_contrastive(img, torch.tensor([5, 5, 9]), txt, torch.tensor([5, 7]), torch.tensor(10.0))


def test_sinkhorn_balances_prototypes_and_mim_uses_masked_patches_only():
    torch.manual_seed(4)
    q = sinkhorn_knopp(torch.randn(64, 8) * 3, temperature=1.0, iterations=20)
    assert torch.allclose(q.sum(1), torch.ones(64), atol=1e-4)
    assert torch.allclose(q.sum(0), torch.full((8,), 8.0), atol=0.1)
    student = torch.randn(2, 4, 8, requires_grad=True)
    mask = torch.tensor([[True, False, False, False], [False, False, False, False]])
    loss = masked_token_distillation(student, q[:8].view(2, 4, 8), mask)
    (grad,) = torch.autograd.grad(loss, student)
    assert grad[0, 0].abs().sum() > 0 and grad[0, 1:].abs().sum() == 0 and grad[1].abs().sum() == 0


def test_synclr_contrastive_on_a_hand_computed_case():
    """Three images (captions 7, 7, 9), one local crop each, tau = 1, unit vectors with dot products in {-1, 0, 1}.

    Global query i never sees teacher key i (the same crop); local query i does (a positive)."""
    e = torch.tensor
    keys = e([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    ids = e([7, 7, 9])
    glob = e([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    local = e([[0.0, 1.0], [1.0, 0.0], [0.0, -1.0]])
    g, l = synclr_contrastive(glob, local, ids, keys, ids, temperature=1.0)
    # q0 sees k1 (positive, dot 0) and k2 (negative, dot -1); q1 sees k0 (positive, 0) and k2 (negative, 0);
    # q2 sees k0 and k1, both negatives: no positive, left out of the mean.
    expected_global = (math.log(1 + math.exp(-1)) + math.log(2)) / 2
    # l0 = (0,1): positives k0 (0) and k1 (1), negative k2 (0); l1 = (1,0): positives k0 (1), k1 (0), negative k2 (-1);
    # l2 = (0,-1): positive k2 (0), negatives k0 (0), k1 (-1).
    l0 = math.log(2 + math.e) - 0.5
    l1 = math.log(math.e + 1 + math.exp(-1)) - 0.5
    l2 = math.log(2 + math.exp(-1))
    assert g.item() == pytest.approx(expected_global, abs=1e-6)
    assert l.item() == pytest.approx((l0 + l1 + l2) / 3, abs=1e-6)
    # Excluding a local crop's own image: l2 loses its only positive; l0 keeps k1, l1 keeps k0.
    _, l_ex = synclr_contrastive(glob, local, ids, keys, ids, temperature=1.0, local_excludes_own_global=True)
    l0_ex = math.log(1 + math.exp(-1))  # l0 sees k1 (positive, dot 1) and k2 (negative, dot 0)
    l1_ex = math.log(1 + math.exp(-2))  # l1 sees k0 (positive, dot 1) and k2 (negative, dot -1)
    assert l_ex.item() == pytest.approx((l0_ex + l1_ex) / 2, abs=1e-6)


def reference_supcon_momentum(q, k, s_labels, t_labels, tau, n_img):
    """SynCLR's SupConMomentumLoss written as its matrices (one rank, avoid_local_global_same=False)."""
    mask = (s_labels[:, None] == t_labels[None, :]).double()
    logits_mask = torch.ones_like(mask)
    logits_mask[torch.arange(n_img), torch.arange(n_img)] = 0
    mask = mask * logits_mask
    logits = q @ k.t() / tau
    logits = logits - logits.max(dim=1, keepdim=True).values
    log_prob = logits - torch.log((torch.exp(logits) * logits_mask).sum(1, keepdim=True))
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1)
    return -mean_log_prob_pos[:n_img].mean() - mean_log_prob_pos[n_img:].mean()


def test_synclr_contrastive_equals_the_reference_matrices_and_weighs_global_as_much_as_all_locals():
    torch.manual_seed(7)
    b, crops = 8, 4
    ids = torch.arange(4).repeat_interleave(2)
    q = F.normalize(torch.randn(b * (1 + crops), 16, dtype=torch.float64), dim=1)
    k = F.normalize(torch.randn(b, 16, dtype=torch.float64), dim=1)
    g, l = synclr_contrastive(q[:b], q[b:], ids, k, ids, temperature=0.08)
    ref = reference_supcon_momentum(q, k, torch.cat([ids, ids.repeat(crops)]), ids, 0.08, b)
    assert torch.allclose(g + l, ref, atol=1e-10)
    pooled = multi_positive_to_keys(q, torch.cat([ids, ids.repeat(crops)]), k, ids, 0.08,
                                    torch.cat([torch.arange(b), torch.full((b * crops,), -1)]))[0].mean()
    assert not torch.allclose(g + l, 2 * pooled), "a pooled mean gives the global crop 1/5 of the weight, not 1/2"


def test_synclr_contrastive_key_offset_matches_the_gathered_batch():
    torch.manual_seed(8)
    ids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    q = F.normalize(torch.randn(8 * 3, 6, dtype=torch.float64), dim=1)  # 8 globals then 2 x 8 locals
    k = F.normalize(torch.randn(8, 6, dtype=torch.float64), dim=1)
    full = sum(synclr_contrastive(q[:8], q[8:], ids, k, ids, 0.1))
    halves = []
    for r in (0, 1):
        rows = slice(4 * r, 4 * r + 4)
        local = torch.cat([q[8:16][rows], q[16:24][rows]])
        halves.append(sum(synclr_contrastive(q[:8][rows], local, ids[rows], k, ids, 0.1, key_offset=4 * r)))
    assert torch.allclose(full, sum(halves) / 2, atol=1e-10)


def plain_sinkhorn(logits, temperature, iterations=3):
    """The SwAV/iBOT reference in the exp domain (one process)."""
    q = torch.exp(logits.double() / temperature).t()
    k, n = q.shape
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= n
    return (q * n).t()


def test_sinkhorn_equals_the_reference_on_moderate_logits():
    torch.manual_seed(9)
    logits = torch.randn(50, 12) * 0.5
    assert torch.allclose(sinkhorn_knopp(logits, 0.07).double(), plain_sinkhorn(logits, 0.07), atol=1e-5)


@pytest.mark.parametrize("scale", [1e2, 1e4, 1e6, 1e30])
def test_sinkhorn_is_never_nan_on_extreme_logits(scale):
    torch.manual_seed(10)
    logits = torch.randn(64, 16) * scale
    logits[:, 3] = -scale * 10  # a prototype no sample is near: its mass underflows in the exp domain
    logits[5] = scale  # a sample equally close to all
    with torch.no_grad():
        assert torch.isnan(plain_sinkhorn(logits.clamp(-1e4, 1e4), 0.04)).any(), "the exp-domain reference does give 0/0 here"
    q = sinkhorn_knopp(logits, temperature=0.04, iterations=3)
    assert torch.isfinite(q).all() and (q >= 0).all()
    assert torch.allclose(q.sum(1), torch.ones(64), atol=1e-4)
    q16 = sinkhorn_knopp(logits.clamp(-6e4, 6e4).half(), temperature=0.04)
    assert torch.isfinite(q16).all()
    assert sinkhorn_knopp(torch.zeros(0, 16), 0.04).shape == (0, 16)


def test_ibot_patch_loss_is_a_mean_over_images_of_means_over_their_masked_tokens():
    torch.manual_seed(11)
    s = torch.randn(5, 6)
    t = torch.softmax(torch.randn(5, 6), dim=1)
    image = torch.tensor([0, 0, 0, 3, 3])  # image 0 has 3 masked tokens, image 3 has 2
    ce = -(t * F.log_softmax(s / 0.1, dim=1)).sum(1)
    expected = (ce[:3].mean() + ce[3:].mean()) / 2
    assert torch.allclose(ibot_patch_loss(s, t, image, 0.1), expected)
    assert ibot_patch_loss(s[:0], t[:0], image[:0]).item() == 0.0


def _ddp_worker(rank, world, init_file, z_full, ids_full, w, out):
    import torch.distributed as dist

    from synrep.training.methods import _gathered_loss

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    weight = torch.nn.Parameter(w.clone())
    local = slice(rank * 4, rank * 4 + 4)
    z = F.normalize(z_full[local] @ weight, dim=1)
    loss = _gathered_loss(z, ids_full[local], 0.1)
    loss.backward()
    dist.all_reduce(weight.grad)
    weight.grad /= world
    out[rank] = (loss.detach().clone(), weight.grad.clone())
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_gloo_matches_one_process(tmp_path):
    import torch.multiprocessing as mp

    torch.manual_seed(5)
    x = torch.randn(8, 6, dtype=torch.float64)
    ids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    w = torch.randn(6, 4, dtype=torch.float64)
    weight = torch.nn.Parameter(w.clone())
    one = multi_positive_contrastive(F.normalize(x @ weight, dim=1), ids, temperature=0.1)
    one.backward()
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), x, ids, w, out), nprocs=2, join=True)
    losses = [out[r][0] for r in range(2)]
    assert torch.allclose(sum(losses) / 2, one, atol=1e-10), "mean of the ranks' losses = the one-process loss"
    for r in range(2):
        assert torch.allclose(out[r][1], weight.grad, atol=1e-10), "DDP-averaged gradients = the one-process gradients"
