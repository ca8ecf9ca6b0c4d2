"""Data pipeline (shard read + sampler + batch assembly + augmentation) vs what a training step consumes."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import torch

from common import report
from synrep.sampler import MultiPositiveBatchSampler
from synrep.shards import load_groups
from synrep.training.augment import AugmentConfig, augment
from synrep.training.data import load_train_data, make_batch
from synrep.training.methods import MethodConfig, build_method
from synrep.training.backbones import BackboneConfig


def make_shards(tmp: Path, captions: int = 160) -> str:
    """A shard folder from the shipped embedded generator (captions x 4 images)."""
    from synrep.captions.stage import CaptionsConfig, run_captions
    from synrep.generate.stage import GenerateConfig, run_generate

    cap = run_captions(CaptionsConfig(out_dir=str(tmp / "captions"), per_concept=captions // 10, dedup="text"))
    run_generate(GenerateConfig(captions=str(cap), out_dir=str(tmp / "shards"), captions_per_shard=40, preview=False))
    return str(tmp / "shards")


def main(shards: str | None = None) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="synrep-bench-data-"))
    try:
        shards = shards or make_shards(tmp)
        start = time.perf_counter()
        groups = load_groups(shards)
        read_img_s = len(groups.images) / (time.perf_counter() - start)
        data = load_train_data(shards)
        sampler = MultiPositiveBatchSampler(data.offsets, 32, 4, seed=0)
        gof = data.group_of_image()
        g = torch.Generator().manual_seed(0)
        n, start = 0, time.perf_counter()
        for epoch in range(5):
            sampler.set_epoch(epoch)
            for idx in sampler:
                batch = make_batch(data, idx, gof, "cpu")
                augment(batch["images"], g, AugmentConfig())
                n += len(idx)
        loader_img_s = n / (time.perf_counter() - start)
        torch.manual_seed(0)
        model = build_method("stablerep", BackboneConfig(), MethodConfig(), AugmentConfig(), 10, 100)
        opt = torch.optim.AdamW(model.parameters())
        batch = make_batch(data, list(range(256)), gof, "cpu")
        start = time.perf_counter()
        for step in range(5):
            loss = sum(model(batch, g, step).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
        train_img_s = 5 * 256 / (time.perf_counter() - start)
        rows = [{"stage": "shard read (decode PNG)", "img_s": read_img_s},
                {"stage": "sampler + batch + augmentation", "img_s": loader_img_s},
                {"stage": "training step (stablerep, cnn)", "img_s": train_img_s}]
        return report("data", rows, {"loader / training consumption": loader_img_s / train_img_s,
                                     "shard read / training consumption": read_img_s / train_img_s})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
