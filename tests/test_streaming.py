"""The streaming data path: epoch plan, exactly-once reading, equal steps, exact resume, unreadable data."""

import json
import logging
import os
import subprocess
import sys
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from synrep.shards import list_shards, write_random_shards
from synrep.sources import ImageFolderSource, ShardSource, SourceError, WebDatasetSource, fit_image, open_real
from synrep.streaming import (BatchSpec, GroupBatchStream, SequentialImages, StreamError, batch_loader, reader_range,
                              segments, sequential_loader, steps_per_epoch, worker_batches)

UNEVEN = [7, 3, 5, 9, 6, 1, 8]  # 39 groups in 7 shards of different sizes


def _take(source, spec, steps, rank=0, world=1, workers=0, start=0):
    ds = GroupBatchStream(source, spec, rank, world, workers, start)
    it = batch_loader(ds, workers)
    out = list(islice(it, steps))
    it.close()
    return out


def test_segments_and_reader_ranges_tile_the_epoch():
    counts = np.array(UNEVEN)
    order = np.random.default_rng(0).permutation(len(counts))
    pieces = segments(counts, order, 5, 20)
    assert sum(e - b for _, b, e in pieces) == 20 and all(0 <= b < e <= counts[u] for u, b, e in pieces)
    steps, groups, world, workers = 4, 3, 2, 3
    for epoch in range(3):
        spans = sorted(reader_range(epoch, steps, groups, r, w, workers) for r in range(world) for w in range(workers))
        pos = 0
        for start, length in spans:
            assert start == pos
            pos += length
        assert pos == world * steps * groups, "readers tile the epoch's stream exactly"
        owned = sorted(b for w in range(workers) for b in worker_batches(epoch, steps, w, workers))
        assert owned == list(range(steps)) and all((epoch * steps + b) % workers == w
                                                   for w in range(workers) for b in worker_batches(epoch, steps, w, workers))


@pytest.mark.parametrize("workers", [0, 2])
def test_two_ranks_read_every_group_at_most_once_per_epoch_with_equal_steps(tmp_path, workers):
    source = ShardSource(write_random_shards(tmp_path, UNEVEN, images_per_group=3, size=8))
    spec = BatchSpec(groups=4, images=2, size=8, channels=3, shuffle_buffer=6, seed=1)
    steps = steps_per_epoch(len(source), 4, 2)
    assert steps == 4  # 39 groups // (2 ranks x 4): 32 read per epoch, 7 wait for the next epoch's order
    per_rank = [_take(source, spec, 2 * steps, rank, 2, workers) for rank in range(2)]
    for epoch in range(2):
        seen = Counter()
        for batches in per_rank:
            mine = [b for b in batches if b["epoch"] == epoch]
            assert [b["step"] for b in mine] == list(range(epoch * steps, (epoch + 1) * steps)), "same steps on each rank"
            for b in mine:
                assert b["images"].shape == (8, 8, 8, 3) and b["images"].dtype == torch.uint8
                groups, counts = torch.unique(b["group"], return_counts=True)
                assert len(groups) == 4 and (counts == 2).all(), "G whole groups x k images"
                assert len(set(b["image"].tolist())) == 8, "k distinct images per group"
                seen.update(groups.tolist())
        assert len(seen) == 32 and max(seen.values()) == 1, "no group twice in an epoch, across ranks"
    firsts = [{g for b in r if b["epoch"] == 0 for g in b["group"].tolist()} for r in per_rank]
    seconds = [{g for b in r if b["epoch"] == 1 for g in b["group"].tolist()} for r in per_rank]
    assert firsts != seconds, "the order changes every epoch"


def test_divisible_epoch_reads_every_group_exactly_once(tmp_path):
    source = ShardSource(write_random_shards(tmp_path, [5, 11, 4, 4], images_per_group=2, size=8))  # 24 = 2 x 3 x 4
    spec = BatchSpec(groups=4, images=2, size=8, channels=3, shuffle_buffer=3)
    seen = Counter(g for rank in range(2) for b in _take(source, spec, 3, rank, 2, workers=2) for g in b["group"].tolist())
    assert sorted(seen) == list(range(24)) and set(seen.values()) == {2}


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_at_step_k_gives_the_same_batches_without_decoding_the_skipped(tmp_path, workers, monkeypatch):
    source = ShardSource(write_random_shards(tmp_path, UNEVEN, images_per_group=3, size=8))
    spec = BatchSpec(groups=4, images=2, size=8, channels=3, shuffle_buffer=5, seed=3)
    full = _take(source, spec, 14, workers=workers)
    resumed = _take(source, spec, 9, workers=workers, start=5)
    for a, b in zip(full[5:], resumed):
        assert a["step"] == b["step"] and torch.equal(a["group"], b["group"]) and torch.equal(a["images"], b["images"])
    if workers == 0:  # count decodes in-process: resuming at step 5 decodes only what it returns
        import synrep.streaming as streaming

        calls = []
        real = streaming.fit_image
        monkeypatch.setattr(streaming, "fit_image", lambda *a, **k: calls.append(1) or real(*a, **k))
        _take(source, spec, 2, start=5)
        assert len(calls) == 2 * 4 * 2


def test_corrupt_shard_met_mid_stream_is_skipped_with_a_warning_and_ranks_stay_in_step(tmp_path, caplog):
    folder = write_random_shards(tmp_path, [10, 10, 10], images_per_group=2, size=8, image_format="png")
    bad = list_shards(folder)[1]
    data = bytearray(bad.read_bytes())
    data[len(data) // 2: len(data) // 2 + 4096] = b"\0" * 4096  # same size, so only reading can tell
    bad.write_bytes(bytes(data))
    source = ShardSource(folder)
    spec = BatchSpec(groups=4, images=2, size=8, channels=3, shuffle_buffer=0)
    with caplog.at_level(logging.WARNING, logger="synrep.streaming"):
        ds = GroupBatchStream(source, spec)
        batches = list(islice(iter(ds), 7))
    assert [b["step"] for b in batches] == list(range(7)) and all(len(b["group"]) == 8 for b in batches)
    assert ds.counts.groups_skipped >= 1 and "shard-00001.tar" in caplog.text


def test_truncated_shard_is_left_out_at_start(tmp_path, caplog):
    folder = write_random_shards(tmp_path, [6, 6, 6], images_per_group=2, size=8)
    bad = list_shards(folder)[2]
    bad.write_bytes(bad.read_bytes()[:1000])
    with caplog.at_level(logging.WARNING, logger="synrep.sources"):
        source = ShardSource(folder)
    assert len(source) == 12 and "shard-00002.tar" in caplog.text


def test_empty_or_unfinished_shard_folder_is_a_clear_error(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        ShardSource(tmp_path / "missing")
    with pytest.raises(SourceError, match="index.json does not exist"):
        ShardSource(tmp_path)
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(SourceError, match="not valid JSON"):
        ShardSource(tmp_path)


@pytest.mark.parametrize("start", [1, 3, 4])
def test_resume_with_skipped_short_groups_gives_the_same_batches(tmp_path, start):
    # short groups are left out, so the end of each epoch's range runs short and is filled with recent groups
    source = ShardSource(write_random_shards(tmp_path, [6, 6, 8], images_per_group=3, size=8, short={3: 1, 7: 2, 9: 1, 11: 2, 13: 1}))
    spec = BatchSpec(groups=4, images=3, size=8, channels=3, shuffle_buffer=0, seed=0, short_groups="skip")
    full = _take(source, spec, 10)
    resumed = _take(source, spec, 10 - start, start=start)
    seen = [g for b in full[:5] for g in set(b["group"].tolist())]  # epoch 0 (5 steps of 4 groups)
    assert len(seen) > len(set(seen)), "some batch was filled with groups of earlier batches"
    for a, b in zip(full[start:], resumed):
        assert a["step"] == b["step"] and torch.equal(a["group"], b["group"]) and torch.equal(a["images"], b["images"])


def test_too_few_groups_and_short_groups_are_clear_errors(tmp_path):
    source = ShardSource(write_random_shards(tmp_path, [3, 3], images_per_group=2, size=8))
    with pytest.raises(StreamError, match="too few"):
        GroupBatchStream(source, BatchSpec(groups=4, images=2, size=8, channels=3), world_size=2)
    ds = GroupBatchStream(source, BatchSpec(groups=2, images=3, size=8, channels=3, short_groups="error"))
    with pytest.raises(StreamError, match="images_per_group=3"):
        next(iter(ds))
    fewer = next(iter(GroupBatchStream(source, BatchSpec(groups=2, images=3, size=8, channels=3, short_groups="fewer"))))
    assert len(fewer["group"]) == 4, "fewer: all a group has, never duplicates"


def _image_folder(root: Path, split: str, sizes: dict[str, list[tuple[int, int]]]):
    from PIL import Image

    for cls, shapes in sizes.items():
        (root / split / cls).mkdir(parents=True, exist_ok=True)
        for i, (h, w) in enumerate(shapes):
            Image.fromarray(np.full((h, w, 3), 40 * i, dtype=np.uint8)).save(root / split / cls / f"{i}.JPEG")


def test_image_folder_streams_images_of_any_size_with_named_splits(tmp_path):
    _image_folder(tmp_path, "train", {"cat": [(30, 40), (50, 20), (16, 16)], "dog": [(64, 64), (20, 33)]})
    _image_folder(tmp_path, "val", {"cat": [(24, 24)], "dog": [(40, 30)]})
    train = open_real(f"imagefolder:{tmp_path}", "train")
    assert train.class_names == ["cat", "dog"] and len(train) == 5
    batches = _take(train, BatchSpec(groups=2, images=1, size=16, channels=3, shuffle_buffer=4), 2)
    assert all(b["images"].shape == (2, 16, 16, 3) for b in batches)
    val = SequentialImages(open_real(f"imagefolder:{tmp_path}", "val"), size=12, channels=1, batch_size=4, crop_fraction=0.875)
    (item,) = list(sequential_loader(val))
    assert item["images"].shape == (2, 12, 12, 1) and item["labels"].tolist() == [0, 1]
    with pytest.raises(SourceError, match="test_split=val"):
        ImageFolderSource(tmp_path, "test")


def test_image_folder_with_an_unreadable_file(tmp_path, caplog):
    _image_folder(tmp_path, "train", {"a": [(8, 8)] * 4, "b": [(8, 8)] * 4})
    broken = tmp_path / "train" / "b" / "1.JPEG"
    broken.write_bytes(b"this is not an image")
    source = open_real(f"imagefolder:{tmp_path}", "train")
    with caplog.at_level(logging.WARNING, logger="synrep.streaming"):
        ds = GroupBatchStream(source, BatchSpec(groups=4, images=1, size=8, channels=3, shuffle_buffer=0))
        batches = list(islice(iter(ds), 2))
    assert all(len(b["group"]) == 4 for b in batches) and ds.counts.groups_skipped == 1 and str(broken) in caplog.text
    with pytest.raises(SourceError, match="1.JPEG"):  # a sequential (evaluation) pass names the file and stops
        list(sequential_loader(SequentialImages(source, 8, 3, batch_size=8)))


def test_labelled_webdataset_shards_and_webdataset_reads_synrep_shards(tmp_path):
    import tarfile
    import io

    from synrep.shards import encode_image

    wds_dir = tmp_path / "wds" / "train"
    wds_dir.mkdir(parents=True)
    with tarfile.open(wds_dir / "part-0.tar", "w") as tar:
        for i in range(6):
            for name, data in ((f"s{i}.jpg", encode_image(np.full((10, 12, 3), i * 30, np.uint8), "jpg")), (f"s{i}.cls", str(i % 3).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    source = open_real(f"wds:{tmp_path / 'wds'}", "train")
    assert isinstance(source, WebDatasetSource) and len(source) == 6 and source.class_names == ["0", "1", "2"]
    labels = sorted(int(x) for b in _take(source, BatchSpec(groups=3, images=1, size=8, channels=3), 2) for x in b["concept"])
    assert labels == [0, 0, 1, 1, 2, 2]

    import webdataset as wds

    folder = write_random_shards(tmp_path / "synrep", [3, 2], images_per_group=2, size=8)
    samples = list(wds.WebDataset([str(p) for p in list_shards(folder)], shardshuffle=False))
    assert [s["__key__"] for s in samples] == [f"{g:09d}" for g in range(5)]
    assert {"json", "0.jpg", "1.jpg"} <= set(samples[0]) and json.loads(samples[0]["json"])["caption"] == "caption 0"


def test_fit_image_resizes_the_shorter_side_and_centre_crops():
    image = np.zeros((20, 40, 3), np.uint8)
    image[:, 10:30] = 255  # the centre half is white
    out = fit_image(image, 10)
    assert out.shape == (10, 10, 3) and out.min() > 200, "the centre crop of the resized image"
    assert fit_image(image[:10, :10], 10) is not None and fit_image(np.ones((10, 10, 1), np.uint8), 10).shape == (10, 10, 1)


@pytest.mark.slow
def test_torchrun_two_ranks_stream_an_uneven_shard_set_without_hanging(tmp_path):
    folder = write_random_shards(tmp_path / "shards", UNEVEN, images_per_group=3, size=8)
    script = tmp_path / "ranks.py"
    script.write_text(f"""
import json, os, torch, torch.distributed as dist
from synrep.sources import ShardSource
from synrep.streaming import BatchSpec, GroupBatchStream, batch_loader
dist.init_process_group("gloo")
rank = dist.get_rank()
ds = GroupBatchStream(ShardSource({str(folder)!r}), BatchSpec(groups=4, images=2, size=8, channels=3, shuffle_buffer=6), rank, 2, 2)
it = batch_loader(ds, 2)
log = []
for step in range(3 * ds.steps):
    batch = next(it)
    groups = torch.unique(batch["group"])
    every = [torch.zeros_like(groups) for _ in range(2)]
    dist.all_gather(every, groups)  # a collective each step: a rank that ran out would hang here
    log.append({{"step": batch["step"], "epoch": batch["epoch"], "groups": groups.tolist()}})
it.close()
json.dump(log, open(os.path.join({str(tmp_path)!r}, f"rank{{rank}}.json"), "w"))
dist.destroy_process_group()
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541", str(script)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    logs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [e["step"] for e in logs[0]] == [e["step"] for e in logs[1]] == list(range(12))
    for epoch in range(3):
        seen = Counter(g for log in logs for e in log if e["epoch"] == epoch for g in e["groups"])
        assert len(seen) == 32 and max(seen.values()) == 1


def test_short_groups_fewer_is_refused_across_ranks_when_batches_could_differ(tmp_path):
    from synrep.training.data import LoaderConfig, check_data

    source = ShardSource(write_random_shards(tmp_path, [8, 8], images_per_group=2, size=8))
    args = dict(groups_per_batch=2, image_size=8, loader=LoaderConfig())
    assert check_data(source, images_per_group=3, short_groups="fewer", world_size=1, **args) == 8
    with pytest.raises(SourceError, match="different sizes across 2 ranks"):
        check_data(source, images_per_group=3, short_groups="fewer", world_size=2, **args)
    assert check_data(source, images_per_group=2, short_groups="fewer", world_size=2, **args) == 8
    # curation's drop leaves short groups: index.json records the smallest, and the checks use it at start
    curated = ShardSource(write_random_shards(tmp_path / "curated", [8, 8], images_per_group=2, size=8, short={5: 1}))
    assert (curated.images_per_group, curated.min_images_per_group) == (2, 1)
    with pytest.raises(SourceError, match="groups of only 1 image.*short_groups=skip"):
        check_data(curated, images_per_group=2, short_groups="error", world_size=1, **args)
    with pytest.raises(SourceError, match="different sizes across 2 ranks"):
        check_data(curated, images_per_group=2, short_groups="fewer", world_size=2, **args)
    assert check_data(curated, images_per_group=2, short_groups="skip", world_size=2, **args) == 8
    assert check_data(curated, images_per_group=1, short_groups="error", world_size=2, **args) == 8
