"""`synrep train` vs a bare loop doing the same forward/backward/step on one batch already in memory.

Augmentation runs inside each method's forward, so it is on both sides; what the ratio measures is the
cost of everything else in the loop (the streaming loader, LR schedule, metrics, checkpoints).
The data pipeline alone is measured in bench_data.py.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from common import report
from synrep.config import load_config
from synrep.training.data import LoaderConfig, make_batches, open_data, to_device
from synrep.training.loop import TrainConfig, train
from synrep.training.methods import build_method

METHODS = [("stablerep", "cnn"), ("simclr", "cnn"), ("supcon", "cnn"), ("stablerep+", "cnn"), ("synclr", "vit-micro")]


def one_batch(cfg: TrainConfig) -> tuple[dict, int]:
    """The first batch of ``cfg``'s stream on the CPU (as the loop sees it) and the number of classes."""
    from synrep.streaming import BatchSpec

    source = open_data(cfg.data, cfg.limit_groups, cfg.loader.real_split)
    spec = BatchSpec(cfg.groups_per_batch, cfg.images_per_group, cfg.backbone.image_size, cfg.backbone.in_channels,
                     cfg.short_groups, 0, cfg.seed, captions=cfg.method == "stablerep+")
    _, batches = make_batches(source, spec, LoaderConfig(num_workers=0), 0, 1, 0, False)
    batch = to_device(next(batches), "cpu")
    batches.close()
    return batch, len(source.class_names)


def bare_loop(cfg: TrainConfig, steps: int) -> float:
    batch, classes = one_batch(cfg)
    torch.manual_seed(0)
    model = build_method(cfg.method, cfg.backbone, cfg.loss, cfg.augment, classes, cfg.steps)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    n = len(batch["images"])
    g = torch.Generator().manual_seed(0)
    for step in range(steps + 2):
        if step == 2:
            start = time.perf_counter()
        loss = sum(model(batch, g, step).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return n * steps / (time.perf_counter() - start)


def main(shards: str | None = None, steps: int = 20) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="synrep-bench-train-"))
    try:
        if shards is None:
            from bench_data import make_shards

            shards = make_shards(tmp)
        rows, ratios = [], {}
        for method, backbone in METHODS:
            overrides = [f"method={method}", f"data={shards}", f"out_dir={tmp / method}", f"steps={steps + 5}", "groups_per_batch=64",
                         "images_per_group=4", f"backbone.name={backbone}", "log_every=5", "checkpoint_every=1000", "warmup_steps=2"]
            cfg = load_config(TrainConfig, None, overrides)
            bare = bare_loop(load_config(TrainConfig, None, overrides), steps)
            train(cfg)
            metrics = [json.loads(line) for line in (tmp / method / "metrics.jsonl").read_text().splitlines()]
            ours = sorted(m["img_per_s"] for m in metrics[1:])[len(metrics[1:]) // 2]
            rows.append({"method": method, "backbone": backbone, "synrep_train_img_s": ours, "bare_loop_img_s": bare})
            ratios[f"{method} synrep/bare"] = ours / bare
        return report("training", rows, ratios)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
