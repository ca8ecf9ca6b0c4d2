import pytest
import torch
import torch.nn.functional as F

from synrep.training.losses import (image_text_contrastive, masked_token_distillation, multi_positive_contrastive, nt_xent,
                                    sinkhorn_knopp, supcon)


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
