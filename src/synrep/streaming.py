"""Streaming multi-positive batches: G caption groups x k images, in memory that does not grow with the data.

The plan of an epoch is a pure function of (seed, epoch) and the source's unit counts:

1. the units (shards) are permuted with ``rng(seed, epoch)`` and laid end to end as one virtual stream;
2. every rank takes ``S = total_groups // (world_size * G)`` batches per epoch (the same on every rank;
   fewer than ``world_size * G`` groups at the stream's end wait for the next epoch's order);
3. global batch ``t = epoch * S + b`` is built by data-loader worker ``t mod W`` of its rank, so the
   ``DataLoader``'s round-robin delivers batches in order; each (rank, worker) reads one contiguous range
   of the stream, whose groups pass through a seeded shuffle buffer of ``shuffle_buffer`` groups and are cut
   into batches of G groups; k images per group are drawn with ``rng(seed, epoch, group_id)`` without
   replacement and only those are decoded.

So every group is read at most once per epoch by the whole job, all ranks take the same number of steps,
and batch t is the same whether a run reaches it directly or resumes at step t (skipped batches are read
from the tars but never decoded). Changing ``num_workers`` or the world size changes the order (a resumed
run must keep them). A group that cannot be read mid-stream is skipped with a warning and a count, and its
place in the batch is taken by a recent good group, so that no rank falls out of step.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .shards import ShardError
from .sources import RawGroup, Source, SourceError, fit_image, image_id

LOG = logging.getLogger("synrep.streaming")
ShortGroups = Literal["error", "fewer", "skip"]


class StreamError(SourceError):
    """The requested batches cannot be drawn from this source."""


@dataclass(frozen=True)
class BatchSpec:
    """What one batch is: ``groups`` caption groups x ``images`` images each, at ``size`` px with ``channels``."""

    groups: int
    images: int
    size: int
    channels: int
    short_groups: ShortGroups = "error"
    shuffle_buffer: int = 1000
    seed: int = 0
    captions: bool = False  # attach each group's caption (StableRep+ needs them)


def steps_per_epoch(total_groups: int, groups_per_batch: int, world_size: int) -> int:
    """Batches per rank per epoch: whole batches only, the same on every rank."""
    return total_groups // (groups_per_batch * world_size)


def worker_batches(epoch: int, steps: int, worker: int, num_workers: int) -> list[int]:
    """Batch positions ``b`` of ``epoch`` built by ``worker``: those with ``(epoch * steps + b) % num_workers == worker``."""
    first = (worker - epoch * steps) % num_workers
    return list(range(first, steps, num_workers))


def reader_range(epoch: int, steps: int, groups: int, rank: int, worker: int, num_workers: int) -> tuple[int, int]:
    """``(start, length)`` in the epoch's virtual stream of groups read by (rank, worker)."""
    before = sum(len(worker_batches(epoch, steps, w, num_workers)) for w in range(worker))
    start = rank * steps * groups + before * groups
    return start, len(worker_batches(epoch, steps, worker, num_workers)) * groups


def unit_order(num_units: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 7]).permutation(num_units) if shuffle else np.arange(num_units)


def segments(counts: np.ndarray, order: np.ndarray, start: int, length: int) -> list[tuple[int, int, int]]:
    """The ``(unit, begin, end)`` pieces of the virtual stream ``[start, start + length)`` laid out in ``order``."""
    if length <= 0:
        return []
    ordered = counts[order]
    ends = np.cumsum(ordered)
    out = []
    i = int(np.searchsorted(ends, start, side="right"))
    pos, stop = start, start + length
    while pos < stop and i < len(order):
        unit_start = int(ends[i] - ordered[i])
        begin, end = pos - unit_start, min(int(ends[i]), stop) - unit_start
        if end > begin:
            out.append((int(order[i]), begin, end))
        pos = unit_start + end
        i += 1
    return out


def shuffle_buffer(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """Seeded reservoir shuffle holding at most ``size`` items (``size`` <= 1 passes items through)."""
    if size <= 1:
        yield from items
        return
    buf: list = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = int(rng.integers(size))
        yield buf[i]
        buf[i] = item
    for i in rng.permutation(len(buf)):
        yield buf[i]


@dataclass
class ReadCounts:
    groups_read: int = 0
    groups_skipped: int = 0
    groups_repeated: int = 0


class GroupBatchStream(IterableDataset):
    """Batches from ``start_step`` on, forever (epoch after epoch), for one rank; see the module docstring.

    Each item is a dict: ``images`` uint8 ``[B, size, size, C]``, ``group`` / ``concept`` / ``image`` int64 ``[B]``
    (global ids; ``concept`` is -1 where unknown), ``step`` (global batch index) and ``epoch``, and with
    ``spec.captions`` the list ``captions`` of the B images' captions.
    """

    def __init__(self, source: Source, spec: BatchSpec, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 start_step: int = 0, shuffle: bool = True):
        self.source, self.spec = source, spec
        self.rank, self.world_size, self.num_workers = rank, world_size, max(1, num_workers)
        self.start_step, self.shuffle = start_step, shuffle
        self.steps = steps_per_epoch(source.units.total, spec.groups, world_size)
        if self.steps < 1:
            raise StreamError(f"{source.description} has {source.units.total} groups: too few for {world_size} rank(s) x "
                              f"{spec.groups} groups per batch; generate more captions or lower groups_per_batch")
        self.counts = ReadCounts()

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        # The first global step >= start_step that this worker builds.
        step = self.start_step + (worker - self.start_step) % self.num_workers
        epoch = step // self.steps
        while True:
            yield from self._epoch(epoch, worker)
            epoch += 1

    def _epoch(self, epoch: int, worker: int) -> Iterator[dict]:
        spec, units = self.spec, self.source.units
        positions = worker_batches(epoch, self.steps, worker, self.num_workers)
        start, length = reader_range(epoch, self.steps, spec.groups, self.rank, worker, self.num_workers)
        order = unit_order(len(units.counts), spec.seed, epoch, self.shuffle)
        stream = self._read(segments(units.counts, order, start, length))
        rng = np.random.default_rng([spec.seed, epoch, self.rank, worker, 11])
        mixed = shuffle_buffer(stream, spec.shuffle_buffer if self.shuffle else 0, rng)
        # The last G good groups, to fill in for missing ones: decoded, or raw when read before start_step (decoded
        # only if a batch needs them; decoding is seeded per group, so a resumed run fills in the same images).
        recent: list = []
        for b in positions:
            step = epoch * self.steps + b
            if step < self.start_step:  # read (the shuffle buffer needs it), never decoded
                recent = (recent + list(itertools.islice(mixed, spec.groups)))[-spec.groups:]
                continue
            chosen = []
            for raw in mixed:
                decoded = self._decode(raw, epoch)
                if decoded is not None:
                    chosen.append(decoded)
                    if len(chosen) == spec.groups:
                        break
            recent = (recent + chosen)[-spec.groups:]
            if len(chosen) < spec.groups:  # groups were unreadable: keep every rank in step with recent good ones
                recent = [g for g in (g if isinstance(g, tuple) else self._decode(g, epoch) for g in recent) if g is not None]
                if not recent:
                    raise StreamError(f"{self.source.description}: no readable group for batch {step} on rank {self.rank}")
                missing = spec.groups - len(chosen)
                self.counts.groups_repeated += missing
                LOG.warning("batch %d: %d group(s) missing after unreadable data; repeating recent groups to keep ranks in step", step, missing)
                chosen += [recent[i % len(recent)] for i in range(missing)]
            yield self._assemble(chosen, epoch, step)

    def _decode(self, raw: RawGroup, epoch: int) -> tuple | None:
        """``(raw, picked image indices, uint8 [k, size, size, C])``, or None (warned, counted) when unreadable."""
        take = min(self.spec.images, raw.count)
        pick = np.random.default_rng([self.spec.seed, epoch, raw.group_id, 13]).choice(raw.count, size=take, replace=False)
        try:
            images = [fit_image(raw.load(j, self.spec.channels), self.spec.size) for j in pick.tolist()]
        except (ShardError, SourceError) as err:
            self.counts.groups_skipped += 1
            LOG.warning("skipping an unreadable group (%d so far): %s", self.counts.groups_skipped, err)
            return None
        return raw, pick.tolist(), images

    def _read(self, pieces: list[tuple[int, int, int]]) -> Iterator[RawGroup]:
        for unit, begin, end in pieces:
            try:
                for raw in self.source.read(unit, begin, end):
                    if raw.count < self.spec.images:
                        if self.spec.short_groups == "error":
                            raise StreamError(f"{self.source.units.names[unit]}: group {raw.group_id} has {raw.count} images, fewer than "
                                              f"images_per_group={self.spec.images}; lower it or set short_groups=fewer or skip")
                        if self.spec.short_groups == "skip":
                            self.counts.groups_skipped += 1
                            continue
                    self.counts.groups_read += 1
                    yield raw
            except (ShardError, SourceError) as err:
                if isinstance(err, StreamError):
                    raise
                self.counts.groups_skipped += 1
                LOG.warning("skipping the rest of %s (%d unreadable so far): %s", self.source.units.names[unit],
                            self.counts.groups_skipped, err)

    def _assemble(self, groups: list[tuple], epoch: int, step: int) -> dict:
        images, gids, concepts, iids, captions = [], [], [], [], []
        for raw, pick, decoded in groups:
            images += decoded
            gids += [raw.group_id] * len(pick)
            concepts += [raw.label] * len(pick)
            iids += [image_id(raw.group_id, j) for j in pick]
            captions += [raw.caption] * len(pick)
        batch = {"images": torch.from_numpy(np.stack(images)), "group": torch.tensor(gids, dtype=torch.int64),
                 "concept": torch.tensor(concepts, dtype=torch.int64), "image": torch.tensor(iids, dtype=torch.int64),
                 "step": step, "epoch": epoch}
        if self.spec.captions:
            batch["captions"] = captions
        return batch


def in_order(items: Iterator[dict], first: int) -> Iterator[dict]:
    """Reorder batches by ``step`` (workers deliver round-robin; after a resume the first may come second)."""
    pending: dict[int, dict] = {}
    want = first
    for item in items:
        pending[item["step"]] = item
        while want in pending:
            yield pending.pop(want)
            want += 1
        if len(pending) > 64:
            raise StreamError(f"data-loader workers are out of order (waiting for batch {want}, holding {sorted(pending)[:4]}...)")


def batch_loader(dataset: GroupBatchStream, num_workers: int, prefetch_factor: int = 2, pin_memory: bool = False) -> Iterator[dict]:
    """Iterate ``dataset`` through a ``DataLoader`` (decoding in ``num_workers`` processes), batches in step order."""
    kwargs = {"prefetch_factor": prefetch_factor} if num_workers > 0 else {}
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory, **kwargs)
    return in_order(iter(loader), dataset.start_step)


# --- sequential passes (evaluation, feature extraction) --------------------------------------------------

class SequentialImages(IterableDataset):
    """Every image of a labelled source once, in stored order, split by data-loader worker and by rank.

    Items: ``images`` uint8 ``[b, size, size, C]`` (resized and centre-cropped with ``crop_fraction``),
    ``labels`` int64 ``[b]``, ``index`` int64 ``[b]`` (global image position). Chunks of ``batch_size``
    consecutive images go to reader ``chunk mod (world_size * workers)``.
    """

    def __init__(self, source: Source, size: int, channels: int, batch_size: int = 256, crop_fraction: float = 1.0,
                 rank: int = 0, world_size: int = 1, skip_chunks: Callable[[int], bool] | None = None):
        self.source, self.size, self.channels = source, size, channels
        self.batch_size, self.crop_fraction = batch_size, crop_fraction
        self.rank, self.world_size = rank, world_size
        self.skip_chunks = skip_chunks
        self.num_chunks = math.ceil(source.units.total / batch_size)

    def chunks(self, worker: int, num_workers: int) -> list[int]:
        readers = self.world_size * num_workers
        me = self.rank * num_workers + worker
        return [c for c in range(me, self.num_chunks, readers) if not (self.skip_chunks and self.skip_chunks(c))]

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        units = self.source.units
        order = np.arange(len(units.counts))
        for chunk in self.chunks(worker, workers):
            start = chunk * self.batch_size
            length = min(self.batch_size, units.total - start)
            images, labels = [], []
            for unit, begin, end in segments(units.counts, order, start, length):
                for raw in self.source.read(unit, begin, end):
                    images.append(fit_image(raw.load(0, self.channels), self.size, self.crop_fraction))
                    labels.append(raw.label)
            if len(images) != length:
                raise SourceError(f"{self.source.description}: expected {length} images at position {start}, read {len(images)}")
            yield {"images": torch.from_numpy(np.stack(images)), "labels": torch.tensor(labels, dtype=torch.int64),
                   "index": torch.arange(start, start + length, dtype=torch.int64), "chunk": chunk}


def sequential_loader(dataset: SequentialImages, num_workers: int = 0, pin_memory: bool = False) -> Iterator[dict]:
    """Chunks of a :class:`SequentialImages` through a ``DataLoader`` (any order; each carries its ``chunk``)."""
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory)
    return iter(loader)
