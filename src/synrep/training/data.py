"""Training data: a source (synthetic shards or a real dataset) streamed as multi-positive batches.

The source is opened with :func:`synrep.sources.open_training_source`; :func:`check_data` checks at start-up
what can be checked before any model is built; :func:`make_batches` streams batches of G groups x k images
through data-loader workers (:mod:`synrep.streaming`); :func:`to_device` moves a batch to the device and
converts it to float there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from ..config import require
from ..images import uint8_to_float
from ..sources import Source, SourceError, UnitTable, open_training_source
from ..streaming import BatchSpec, GroupBatchStream, ShortGroups, batch_loader, steps_per_epoch
from .text_tower import TextTower, caption_transform

LOG = logging.getLogger("synrep.train")


@dataclass
class LoaderConfig:
    num_workers: int = 2  # data-loader processes per rank that read and decode (0 = in the training process)
    shuffle_buffer: int = 1000  # caption groups each worker holds (encoded) for shuffling
    prefetch_factor: int = 2  # batches each worker prepares ahead
    load_size: int = 0  # px the workers resize (shorter side) + centre-crop to; 0 = backbone.image_size
    allow_resize: bool = True  # false: stored images must already be load_size (an error otherwise)
    real_split: str = "train"  # the split a real:<dataset> source trains on

    def check(self) -> None:
        for key in ("num_workers", "shuffle_buffer", "load_size"):
            require(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        require(self.prefetch_factor >= 1, "prefetch_factor", f"must be >= 1, got {self.prefetch_factor}")


class LimitedSource(Source):
    """The first ``limit`` groups of ``source`` (its units in stored order)."""

    def __init__(self, source: Source, limit: int):
        ends = np.cumsum(source.units.counts)
        keep = int(np.searchsorted(ends, limit)) + 1
        counts = source.units.counts[:keep].copy()
        counts[-1] -= max(0, int(ends[keep - 1]) - limit)
        self.inner = source
        self.units = UnitTable(source.units.names[:keep], counts)
        self.captioned, self.class_names = source.captioned, source.class_names
        self.images_per_group, self.image_shape = source.images_per_group, source.image_shape
        self.min_images_per_group = source.min_images_per_group
        self.description = f"{source.description}, first {limit} groups"

    def read(self, unit: int, start: int = 0, stop: int | None = None):
        stop = int(self.units.counts[unit]) if stop is None else min(stop, int(self.units.counts[unit]))
        return self.inner.read(unit, start, stop)


def open_data(spec: str, limit_groups: int, real_split: str) -> Source:
    source = open_training_source(spec, real_split)
    if limit_groups and limit_groups < source.units.total:
        source = LimitedSource(source, limit_groups)
    return source


def check_data(source: Source, groups_per_batch: int, images_per_group: int, short_groups: ShortGroups,
               image_size: int, loader: LoaderConfig, world_size: int) -> int:
    """Start-up checks that need no model; returns the load size. Raises SourceError naming the value."""
    have = source.images_per_group
    if have and images_per_group > have and short_groups != "fewer":
        kind = "caption in the shards" if source.captioned else "group (real data has one image per label)"
        raise SourceError(f"images_per_group={images_per_group} but {source.description} has {have} image(s) per {kind}; "
                          f"set images_per_group<={have}" + ("" if source.captioned else " (images_per_group=1 for real data)")
                          + " or short_groups=fewer")
    smallest = source.min_images_per_group or have
    if smallest and smallest < images_per_group <= have and short_groups == "error":
        raise SourceError(f"{source.description} has groups of only {smallest} image(s) (curation dropped some), fewer than "
                          f"images_per_group={images_per_group}; set short_groups=skip (leave them out) or fewer, or "
                          f"images_per_group<={smallest}")
    if world_size > 1 and short_groups == "fewer" and (not smallest or smallest < images_per_group):
        raise SourceError(f"short_groups=fewer gives batches of different sizes across {world_size} ranks, which the global "
                          f"batch cannot gather; with {source.description} use short_groups=skip or images_per_group<={smallest or 1}")
    steps = steps_per_epoch(source.units.total, groups_per_batch, world_size)
    if steps < 1:
        raise SourceError(f"{source.description}: {source.units.total} groups are too few for {world_size} rank(s) x "
                          f"groups_per_batch={groups_per_batch}; generate more captions or lower groups_per_batch")
    size = loader.load_size or image_size
    if size < image_size:
        raise SourceError(f"loader.load_size={size} is smaller than backbone.image_size={image_size}; crops are taken from "
                          "the loaded images, so load_size must be >= image_size (0 = image_size)")
    stored = source.image_shape
    if stored is not None and (stored[0], stored[1]) != (size, size):
        if not loader.allow_resize:
            raise SourceError(f"{source.description} stores {stored[0]}x{stored[1]} images but the loader needs {size}x{size} "
                              f"(backbone.image_size={image_size}, loader.load_size={loader.load_size}) and loader.allow_resize=false")
        if min(stored[0], stored[1]) < size:
            LOG.warning("%s stores %dx%d images: they are upscaled to %d px for the backbone", source.description, stored[0], stored[1], size)
    return size


class _WithTransform(GroupBatchStream):
    def __init__(self, *args, transform=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.transform = transform

    def __iter__(self) -> Iterator[dict]:
        for batch in super().__iter__():
            yield self.transform(batch) if self.transform else batch


def make_batches(source: Source, spec: BatchSpec, loader: LoaderConfig, rank: int, world_size: int, start_step: int,
                 pin_memory: bool, text_tower: TextTower = "minilm", text_context: int = 77) -> tuple[GroupBatchStream, Iterator[dict]]:
    """The rank's stream from ``start_step`` and an iterator over its batches in step order; with captions, the
    worker adds what ``text_tower`` needs (see :mod:`synrep.training.text_tower`)."""
    dataset = _WithTransform(source, spec, rank, world_size, loader.num_workers, start_step,
                             transform=caption_transform(text_tower, text_context) if spec.captions else None)
    return dataset, batch_loader(dataset, loader.num_workers, loader.prefetch_factor, pin_memory)


def to_device(batch: dict, device: str | torch.device) -> dict:
    """uint8 ``[B, H, W, C]`` -> float ``[B, C, H, W]`` in [0, 1] on ``device`` (converted there); ids as int64."""
    out = {"images": uint8_to_float(batch["images"].to(device, non_blocking=True))}
    for key in ("group", "concept", "image", "text", "text_tokens"):
        if key in batch:
            out[key] = batch[key].to(device, non_blocking=True)
    return out
