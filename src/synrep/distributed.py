"""torch.distributed helpers that fall back to one process when no process group exists.

``torchrun`` (and SLURM, through the same variables: RANK/WORLD_SIZE/LOCAL_RANK or
SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID) starts the processes; :func:`init_distributed` joins
them with gloo on CPU and NCCL on GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_dist_info() -> DistInfo:
    """Rank and world size from torchrun's (or SLURM's) environment, without joining a group."""
    env = os.environ
    if "WORLD_SIZE" in env and "RANK" in env:
        return DistInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_NTASKS" in env and "SLURM_PROCID" in env and "MASTER_ADDR" in env:
        return DistInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return DistInfo()


def init_distributed(device: str = "cpu") -> DistInfo:
    """Join the process group when launched by torchrun/SLURM with world size > 1; else one process."""
    info = env_dist_info()
    if info.world_size > 1 and not dist.is_initialized():
        os.environ.setdefault("RANK", str(info.rank))
        os.environ.setdefault("WORLD_SIZE", str(info.world_size))
        os.environ.setdefault("MASTER_PORT", "29500")
        # NCCL reduces only CUDA tensors; with one group per device type CPU tensors still go through gloo.
        backend = "cpu:gloo,cuda:nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return info


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the incoming gradients and returns this rank's slice."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = [torch.zeros_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(out, tensor.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:
        stacked = torch.stack(grads)
        dist.all_reduce(stacked)
        return stacked[dist.get_rank()]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` ``[B, ...]`` from all ranks along dim 0 -> ``[world * B, ...]``.

    Gradients flow back to every rank's own slice (the loss on each rank sees the whole batch).
    With one process it returns ``tensor`` unchanged.
    """
    if get_world_size() == 1:
        return tensor
    return torch.cat(_GatherWithGrad.apply(tensor), dim=0)


def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    if get_world_size() == 1:
        return tensor
    out = [torch.zeros_like(tensor) for _ in range(get_world_size())]
    dist.all_gather(out, tensor.contiguous())
    return torch.cat(out, dim=0)


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` over ranks in place (on its own device, no host sync); returns it."""
    if get_world_size() > 1:
        dist.all_reduce(tensor)
        tensor /= get_world_size()
    return tensor


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place; returns it (unchanged with one process)."""
    if get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def all_reduce_max_(tensor: torch.Tensor) -> torch.Tensor:
    """Elementwise maximum of ``tensor`` over ranks in place; returns it."""
    if get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
