"""Memory and speed of the streaming data path as the dataset grows: 10k, 100k and 1M images.

Builds shard sets of random-content 64 px RGB JPEG caption groups (4 images each), runs the same
`synrep train` (same steps, batch and loader workers) on each, and records the peak memory of the whole
process tree (training process + loader workers; PSS, so pages shared after fork count once) and the
training images/s. Then the loader alone with two workers on the largest set, against what the CNN
training step consumes, and an `imagefolder:` evaluation of 10k and 100k images.

    python benchmarks/bench_scale.py                     # 10k, 100k, 1M images (~15 min, ~4 GB of disk)
    python benchmarks/bench_scale.py --sizes 10000,100000 --steps 20
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import report

IMAGES_PER_GROUP = 4
GROUPS_PER_SHARD = 1000
SIZE = 64


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class PeakMemory:
    """Polls the peak summed PSS (MB) of a process and all its descendants."""

    def __init__(self, pid: int, every: float = 0.2):
        self.pid, self.every, self.peak_mb, self.peak_main_mb = pid, every, 0.0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            pids, todo = [], [self.pid]
            while todo:
                p = todo.pop()
                pids.append(p)
                todo += _children(p)
            total = sum(_pss_kb(p) for p in pids) / 1024
            self.peak_mb = max(self.peak_mb, total)
            self.peak_main_mb = max(self.peak_main_mb, _pss_kb(self.pid) / 1024)
            time.sleep(self.every)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_measured(cmd: list[str]) -> tuple[float, float, float, str]:
    """Run ``cmd``; returns (wall seconds, peak tree MB, peak main-process MB, stderr)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    probe = PeakMemory(proc.pid)
    out, err = proc.communicate()
    probe.stop()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return time.perf_counter() - start, probe.peak_mb, probe.peak_main_mb, err


def build_shards(folder: Path, images: int) -> Path:
    from synrep.shards import write_random_shards

    if (folder / "index.json").exists():
        return folder
    groups = images // IMAGES_PER_GROUP
    counts = [GROUPS_PER_SHARD] * (groups // GROUPS_PER_SHARD) + ([groups % GROUPS_PER_SHARD] if groups % GROUPS_PER_SHARD else [])
    start = time.perf_counter()
    write_random_shards(folder, counts, IMAGES_PER_GROUP, SIZE, 3, "jpg", concepts=100, distinct=512)
    print(f"built {images} images in {len(counts)} shards in {time.perf_counter() - start:.0f} s", flush=True)
    return folder


def build_image_folder(root: Path, train: int, val: int, classes: int = 100) -> Path:
    import numpy as np

    from synrep.shards import encode_image

    if (root / "done").exists():
        return root
    rng = np.random.default_rng(0)
    pool = [encode_image(rng.integers(0, 256, (SIZE + 8 * (i % 3), SIZE, 3), dtype=np.uint8), "jpg") for i in range(256)]
    for split, n in (("train", train), ("val", val)):
        for c in range(classes):
            (root / split / f"class{c:03d}").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (root / split / f"class{i % classes:03d}" / f"{i:07d}.JPEG").write_bytes(pool[i % len(pool)])
    (root / "done").write_text("")
    return root


def train_run(data: Path, out: Path, steps: int, groups: int, workers: int) -> dict:
    cmd = [sys.executable, "-m", "synrep.cli", "train", f"data={data}", f"out_dir={out}", "method=stablerep", f"steps={steps}",
           f"groups_per_batch={groups}", f"images_per_group={IMAGES_PER_GROUP}", "backbone.name=cnn", f"backbone.image_size={SIZE}",
           "backbone.in_channels=3", f"loader.num_workers={workers}", "log_every=5", "checkpoint_every=100000", "warmup_steps=2"]
    wall, peak, main_peak, _ = run_measured(cmd)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = sorted(m["img_per_s"] for m in metrics[1:])
    return {"wall_s": wall, "peak_tree_mb": peak, "peak_main_mb": main_peak, "train_img_s": speeds[len(speeds) // 2]}


def loader_only(data: Path, workers: int, batches: int, groups: int) -> float:
    from synrep.sources import ShardSource
    from synrep.streaming import BatchSpec
    from synrep.training.data import LoaderConfig, make_batches, to_device

    spec = BatchSpec(groups, IMAGES_PER_GROUP, SIZE, 3, shuffle_buffer=1000)
    _, stream = make_batches(ShardSource(data), spec, LoaderConfig(num_workers=workers), 0, 1, 0, False)
    next(stream)
    n, start = 0, time.perf_counter()
    for _ in range(batches):
        n += len(to_device(next(stream), "cpu")["images"])
    seconds = time.perf_counter() - start
    stream.close()
    return n / seconds


def eval_run(root: Path, out: Path) -> dict:
    cmd = [sys.executable, "-m", "synrep.cli", "eval", "encoder=random:cnn", f"dataset=imagefolder:{root}", "train_split=train",
           "test_split=val", f"out_dir={out}", "protocols=[linear,knn]", f"random_backbone.image_size={SIZE}",
           "random_backbone.in_channels=3", "num_workers=2"]
    wall, peak, main_peak, _ = run_measured(cmd)
    return {"wall_s": wall, "peak_tree_mb": peak, "peak_main_mb": main_peak}


def main(sizes: list[int], steps: int = 40, groups: int = 32, workers: int = 2, eval_sizes: list[int] = (10_000, 100_000),
         keep: str | None = None) -> dict:
    tmp = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="synrep-bench-scale-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        rows, ratios = [], {}
        for images in sizes:
            data = build_shards(tmp / f"shards-{images}", images)
            r = train_run(data, tmp / f"train-{images}", steps, groups, workers)
            rows.append({"case": f"train {images} images", **r})
            print(rows[-1], flush=True)
        small, large = rows[0], rows[-1]
        ratios["peak memory largest / smallest"] = large["peak_tree_mb"] / small["peak_tree_mb"]
        ratios["train img/s largest / smallest"] = large["train_img_s"] / small["train_img_s"]
        loader = loader_only(tmp / f"shards-{sizes[-1]}", 2, 60, groups)
        rows.append({"case": f"loader only, 2 workers, {sizes[-1]} images", "wall_s": 0.0, "peak_tree_mb": 0.0, "peak_main_mb": 0.0,
                     "train_img_s": loader})
        ratios["loader (2 workers) / training consumption"] = loader / large["train_img_s"]
        evals = []
        for n in eval_sizes:
            root = build_image_folder(tmp / f"folder-{n}", n, max(1000, n // 10))
            r = eval_run(root, tmp / f"eval-{n}")
            evals.append(r)
            rows.append({"case": f"eval imagefolder {n} train images", **r, "train_img_s": 0.0})
            print(rows[-1], flush=True)
        if len(evals) > 1:
            ratios["eval peak memory largest / smallest"] = evals[-1]["peak_tree_mb"] / evals[0]["peak_tree_mb"]
        return report("scale", rows, ratios)
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--eval-sizes", default="10000,100000")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--keep", default=None, help="build data in this folder and keep it (reused by a rerun)")
    args = parser.parse_args()
    main([int(s) for s in args.sizes.split(",")], args.steps, eval_sizes=[int(s) for s in args.eval_sizes.split(",") if s],
         keep=args.keep)
