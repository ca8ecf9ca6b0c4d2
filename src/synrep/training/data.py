"""Training data: synthetic shard folders or real labelled datasets, as caption groups in memory.

Both become a :class:`GroupData`: uint8 images ``[N, H, W, C]``, group offsets ``[G + 1]`` and per-group
concept ids; a real dataset is N groups of one image each (label = concept). Batches are drawn by
:class:`synrep.sampler.MultiPositiveBatchSampler` and turned into tensors by :func:`make_batch`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from ..datasets import load_dataset
from ..shards import load_groups

LOG = logging.getLogger("synrep.train")


@dataclass
class GroupData:
    images: torch.Tensor  # uint8 [N, H, W, C]
    offsets: np.ndarray  # int64 [G + 1]
    concept_ids: torch.Tensor  # int64 [G]
    class_names: list[str]
    captions: list[str] | None
    source: str
    text: torch.Tensor | None = None  # float [G, 384] caption embeddings (StableRep+ only)

    @property
    def num_groups(self) -> int:
        return len(self.offsets) - 1

    def group_of_image(self) -> torch.Tensor:
        return torch.from_numpy(np.repeat(np.arange(self.num_groups), np.diff(self.offsets)))


def load_train_data(source: str, limit_groups: int = 0) -> GroupData:
    """``source`` is a shard folder, or ``real:<dataset>`` (train split) for the real-data baselines."""
    if source.startswith("real:"):
        data = load_dataset(source[5:], "train")
        n = len(data) if not limit_groups else min(limit_groups, len(data))
        return GroupData(torch.from_numpy(data.images[:n]), np.arange(n + 1, dtype=np.int64),
                         torch.from_numpy(data.labels[:n]), data.class_names, None, source)
    groups = load_groups(source)
    g = len(groups) if not limit_groups else min(limit_groups, len(groups))
    offsets = groups.offsets[: g + 1]
    images = torch.from_numpy(groups.images[: offsets[-1]])
    captions = [str(m.get("caption", "")) for m in groups.metas[:g]]
    return GroupData(images, offsets, torch.from_numpy(groups.concept_ids[:g]), groups.concepts, captions, source)


def attach_text_embeddings(data: GroupData) -> None:
    """Pooled frozen-MiniLM embeddings of every group's caption (StableRep+'s text input)."""
    if data.captions is None:
        raise ValueError(f"method stablerep+ needs captions; {data.source} has none (use a synthetic shard folder)")
    from ..text_encoder import MiniLMEncoder

    _, pooled = MiniLMEncoder(max_length=32).encode(data.captions)
    data.text = pooled


def make_batch(data: GroupData, indices: list[int], group_of_image: torch.Tensor, device: str) -> dict:
    """Flat image indices -> float images ``[B, C, H, W]`` in [0, 1] and int ids ``group``/``concept``/``image``."""
    idx = torch.as_tensor(indices, dtype=torch.long)
    images = data.images[idx].permute(0, 3, 1, 2).float().div_(255.0)
    groups = group_of_image[idx]
    batch = {"images": images.to(device), "group": groups.to(device), "concept": data.concept_ids[groups].to(device),
             "image": idx.to(device)}  # flat indices are global, so unique across ranks
    if data.text is not None:
        batch["text"] = data.text[groups].to(device)
    return batch
