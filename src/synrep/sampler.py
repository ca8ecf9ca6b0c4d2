"""Multi-positive batch sampling: C caption groups x m images per group.

StableRep builds batches from captions: sample C captions, then m of each caption's images without
replacement. Batches are a pure function of (seed, epoch, batch index), split across ranks so that
every rank gets a disjoint slice of each epoch's group order; the sampler works inside a
``DataLoader`` with any number of workers (it runs in the main process) and resumes from
``state_dict()``.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

SHORT_GROUP_POLICIES = ("error", "fewer", "skip")


class SamplerError(ValueError):
    """The requested batch shape cannot be drawn from the groups given."""


class MultiPositiveBatchSampler:
    """Yield batches of flat image indices ``[C * m]`` (fewer where groups are short and policy allows).

    group_offsets: int ``[G + 1]``; group g owns flat indices ``offsets[g]:offsets[g+1]``.
    short_groups: what to do with a group of fewer than ``m`` images: ``error`` (raise),
    ``fewer`` (use all it has: fewer positives, never duplicates) or ``skip`` (leave it out).
    """

    def __init__(self, group_offsets: np.ndarray, groups_per_batch: int, images_per_group: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, short_groups: str = "error", drop_last: bool = True):
        offsets = np.asarray(group_offsets, dtype=np.int64)
        if groups_per_batch < 1 or images_per_group < 1:
            raise SamplerError(f"groups_per_batch ({groups_per_batch}) and images_per_group ({images_per_group}) must be >= 1")
        if short_groups not in SHORT_GROUP_POLICIES:
            raise SamplerError(f"short_groups={short_groups!r} is not allowed; choose one of {SHORT_GROUP_POLICIES}")
        if not 0 <= rank < world_size:
            raise SamplerError(f"rank {rank} is outside world size {world_size}")
        sizes = np.diff(offsets)
        short = np.flatnonzero(sizes < images_per_group)
        if len(short) and short_groups == "error":
            raise SamplerError(f"{len(short)} caption groups have fewer than images_per_group={images_per_group} images "
                               f"(smallest has {int(sizes.min())}); lower images_per_group or set short_groups=fewer or skip")
        self.offsets = offsets
        self.sizes = sizes
        self.groups = np.flatnonzero(sizes >= (images_per_group if short_groups == "skip" else 1))
        self.C, self.m = groups_per_batch, images_per_group
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.drop_last = drop_last
        self.epoch = 0
        self.position = 0  # batches of this epoch already yielded on this rank
        if len(self.groups) < groups_per_batch * world_size:
            raise SamplerError(f"only {len(self.groups)} usable caption groups for {world_size} rank(s) x "
                               f"{groups_per_batch} groups per batch; generate more captions or lower groups_per_batch")

    def __len__(self) -> int:
        per_rank = len(self.groups) // self.world_size
        return per_rank // self.C if self.drop_last else -(-per_rank // self.C)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.position = 0

    def batch(self, epoch: int, index: int) -> np.ndarray:
        """The flat image indices of batch ``index`` of ``epoch`` on this rank."""
        rng = np.random.default_rng([self.seed, epoch])
        order = self.groups[rng.permutation(len(self.groups))]
        per_rank = len(order) // self.world_size
        mine = order[self.rank * per_rank:(self.rank + 1) * per_rank]
        chosen = mine[index * self.C:(index + 1) * self.C]
        pick = np.random.default_rng([self.seed, epoch, self.rank, index])
        out = []
        for g in chosen:
            take = min(self.m, int(self.sizes[g]))
            out.append(self.offsets[g] + pick.choice(int(self.sizes[g]), size=take, replace=False))
        return np.concatenate(out)

    def __iter__(self) -> Iterator[list[int]]:
        while self.position < len(self):
            batch = self.batch(self.epoch, self.position)
            self.position += 1
            yield batch.tolist()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
