"""Two gloo processes against one process: what must agree across ranks when training under torchrun."""

import pytest
import torch
import torch.nn.functional as F

from synrep.training.losses import multi_positive_contrastive, sinkhorn_knopp


def _worker(rank, world, init_file, data, out):
    import torch.distributed as dist

    from synrep.distributed import all_reduce_max_, all_reduce_sum_, gather_no_grad
    from synrep.training.methods import _gathered_loss
    from synrep.training.metrics import MetricWindow

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    half = slice(rank * 8, rank * 8 + 8)
    result = {}
    # Sinkhorn-Knopp centring over both ranks' rows.
    result["sinkhorn"] = sinkhorn_knopp(data["logits"][half], 0.5, 5, all_reduce_sum_, all_reduce_max_)
    # Caption ids above 2^24 stay distinct through the gather (float32 would merge 2^24 and 2^24 + 1).
    ids = data["ids"][half]
    result["ids"] = gather_no_grad(ids)
    z = data["z"][half].clone().requires_grad_(True)
    result["loss"] = _gathered_loss(z, ids, 0.1).detach()
    # A NaN on one rank stops every rank at the same read.
    window = MetricWindow("cpu")
    window.add(0, torch.tensor(float("nan") if rank == 1 else 1.0), {}, torch.tensor(0.0))
    result["bad"] = window.read()[1] is not None
    out[rank] = result
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_agree_with_one_process(tmp_path):
    import torch.multiprocessing as mp

    torch.manual_seed(0)
    base = 2 ** 24
    data = {"logits": torch.randn(16, 6) * 3, "z": F.normalize(torch.randn(16, 5, dtype=torch.float64), dim=1),
            "ids": torch.tensor([base + i // 2 for i in range(16)], dtype=torch.int64)}
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), data, out), nprocs=2, join=True)
    one_sinkhorn = sinkhorn_knopp(data["logits"], 0.5, 5)
    assert torch.allclose(torch.cat([out[0]["sinkhorn"], out[1]["sinkhorn"]]), one_sinkhorn, atol=1e-6), \
        "each rank gets its rows of the one-process targets"
    assert torch.equal(out[0]["ids"], data["ids"]) and torch.equal(out[1]["ids"], data["ids"])
    one_loss = multi_positive_contrastive(data["z"], data["ids"], temperature=0.1)
    assert torch.allclose((out[0]["loss"] + out[1]["loss"]) / 2, one_loss, atol=1e-10)
    assert out[0]["bad"] and out[1]["bad"], "both ranks see the NaN of rank 1"


def test_batchnorm_backbones_are_synchronised_on_gpus_only():
    from synrep.training.backbones import BackboneConfig, build_backbone
    from synrep.training.loop import sync_batchnorm

    net = build_backbone(BackboneConfig(name="cnn"))
    assert sync_batchnorm(net, "cpu") is net
    converted = sync_batchnorm(net, "cuda:0")  # conversion itself needs no GPU
    kinds = {type(m).__name__ for m in converted.modules()}
    assert "SyncBatchNorm" in kinds and "BatchNorm2d" not in kinds
