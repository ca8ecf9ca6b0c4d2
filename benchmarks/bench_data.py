"""The streaming data path (tar read + decode + batch assembly in workers, then device conversion and
augmentation) vs what a training step consumes, with 0 and 2 loader workers."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import torch

from common import report
from synrep.sources import ShardSource
from synrep.streaming import BatchSpec
from synrep.training.augment import AugmentConfig, augment
from synrep.training.backbones import BackboneConfig
from synrep.training.data import LoaderConfig, make_batches, to_device
from synrep.training.methods import MethodConfig, build_method


def make_shards(tmp: Path, captions: int = 160) -> str:
    """A shard folder from the shipped embedded generator (captions x 4 images)."""
    from synrep.captions.stage import CaptionsConfig, run_captions
    from synrep.generate.stage import GenerateConfig, run_generate

    cap = run_captions(CaptionsConfig(out_dir=str(tmp / "captions"), per_concept=captions // 10, dedup="text"))
    run_generate(GenerateConfig(captions=str(cap), out_dir=str(tmp / "shards"), captions_per_shard=40, preview=False))
    return str(tmp / "shards")


def loader_speed(shards: str, workers: int, batches: int = 40, groups: int = 32, images: int = 4) -> float:
    """Images/s delivered by the streaming loader, converted and augmented as the training loop does."""
    spec = BatchSpec(groups, images, 28, 1, shuffle_buffer=1000)
    _, stream = make_batches(ShardSource(shards), spec, LoaderConfig(num_workers=workers), 0, 1, 0, False)
    g = torch.Generator().manual_seed(0)
    next(stream)  # worker start-up is not throughput
    n, start = 0, time.perf_counter()
    for _ in range(batches):
        batch = to_device(next(stream), "cpu")
        augment(batch["images"], g, AugmentConfig())
        n += len(batch["images"])
    seconds = time.perf_counter() - start
    stream.close()
    return n / seconds


def training_speed(shards: str, steps: int = 5) -> float:
    spec = BatchSpec(64, 4, 28, 1, shuffle_buffer=0)
    _, stream = make_batches(ShardSource(shards), spec, LoaderConfig(num_workers=0), 0, 1, 0, False)
    batch = to_device(next(stream), "cpu")
    stream.close()
    torch.manual_seed(0)
    model = build_method("stablerep", BackboneConfig(), MethodConfig(), AugmentConfig(), 10, 100)
    opt = torch.optim.AdamW(model.parameters())
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for step in range(steps):
        loss = sum(model(batch, g, step).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * len(batch["images"]) / (time.perf_counter() - start)


def main(shards: str | None = None) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="synrep-bench-data-"))
    try:
        shards = shards or make_shards(tmp)
        in_process, two_workers = loader_speed(shards, 0), loader_speed(shards, 2)
        train_img_s = training_speed(shards)
        rows = [{"stage": "streaming loader, in the training process", "img_s": in_process},
                {"stage": "streaming loader, 2 workers", "img_s": two_workers},
                {"stage": "training step (stablerep, cnn)", "img_s": train_img_s}]
        return report("data", rows, {"loader / training consumption": two_workers / train_img_s,
                                     "in-process loader / training consumption": in_process / train_img_s})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
