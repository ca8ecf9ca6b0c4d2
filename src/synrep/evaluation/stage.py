"""``synrep eval``: frozen features of an encoder on a real dataset, judged by linear / kNN / few-shot.

The encoder is an exported synrep encoder folder, ``random:<backbone>`` (random init, seeded, sized by
``random_backbone``) or ``pixels`` (raw pixels, the classic baseline). Each split streams once through the
encoder into a feature cache on disk (``cache_dir``, resumable; see :mod:`.features`); the probes then read
the cached float16 features in chunks, on the GPU when there is one. Results go to ``out_dir/eval.json``
and ``eval.md``.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ..config import check_config, require, save_config
from ..datasets import DATASETS, LabeledImages
from ..sources import SOURCES, ArraySource, Source, open_real
from ..training.backbones import BackboneConfig
from ..atomic import atomic_write_json, atomic_write_text
from ..utils import bound_heap_growth, set_threads
from .features import (FeatureCacheError, SplitFeatures, dataset_identity, known_labels, resolve_encoder, split_features,
                       stratified_subset)
from .probes import DEFAULT_CS, ProbeError, Rows, few_shot, knn_classify, linear_probe, resolve_device

LOG = logging.getLogger("synrep.eval")
PROTOCOLS = ("linear", "knn", "fewshot")
Protocol = Literal["linear", "knn", "fewshot"]
DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


# keys that decide where, how fast or with what cache features are computed, not the scores
RUNTIME_KEYS = ("out_dir", "num_workers", "batch_size", "device", "cache_dir", "num_threads")


@dataclass
class EvalConfig:
    encoder: str = "runs/train/encoder"  # an exported encoder folder, random:<backbone> or pixels
    dataset: str = "fashion-mnist"  # fashion-mnist[:<dir>], mnist, imagefolder:<root>, wds:<folder>
    out_dir: str = "runs/eval"
    train_split: str = "train"
    test_split: str = "test"  # ImageNet-style folders: val
    protocols: list[Protocol] = field(default_factory=lambda: ["linear", "knn", "fewshot"])
    probe_train_size: int = 0  # 0 = the whole train split; else a stratified subset of this size
    Cs: list[float] = field(default_factory=lambda: list(DEFAULT_CS))  # linear probe: sklearn C values tried (default: the reference's 45, 1e-5..1e6)
    val_fraction: float = 0.2  # linear probe: seeded, stratified share of train held out to choose C; then refit on all of train
    linear_tol: float = 1e-4  # linear probe and few-shot: a fit converges when max |gradient| <= this (sklearn's lbfgs tol)
    linear_max_iter: int = 1000  # linear probe and few-shot: L-BFGS iterations per fit; a fit stopped here is reported as not converged
    knn_k: int = 20  # kNN: the headline k
    knn_ks: list[int] = field(default_factory=lambda: [10, 20, 100, 200])  # kNN: further k also reported (one search for the largest)
    knn_temperature: float = 0.07  # each neighbour votes exp(cosine / T)
    shots: list[int] = field(default_factory=lambda: [1, 5, 10])  # few-shot: labelled images per class
    draws: int = 5  # few-shot: seeded draws per shot count
    seed: int = 0
    batch_size: int = 512  # images per feature chunk
    crop_fraction: float = 0.875  # resize the shorter side to size / crop_fraction, centre crop (same-size images untouched)
    num_workers: int = 2  # data-loader processes decoding images
    cache_dir: str = ""  # feature cache; "" = <out_dir>/features
    tasks: list[str] = field(default_factory=list)  # more labellings of the same images, probed on the same features (e.g. fmnist-world:pattern)
    device: str = "auto"  # auto (cuda when available), cpu, cuda, cuda:N
    random_backbone: BackboneConfig = field(default_factory=BackboneConfig)  # random:<name> and its input size; pixels of mixed sizes
    num_threads: int = 0

    def check(self) -> None:
        require(bool(self.protocols) and all(p in PROTOCOLS for p in self.protocols), "protocols",
                f"{self.protocols!r} is not allowed; choose one or more of {', '.join(PROTOCOLS)}")
        require(bool(self.encoder), "encoder", "is empty; give an exported encoder folder, random:<backbone> or pixels")
        for key in ("train_split", "test_split"):
            value = getattr(self, key)
            require(bool(value) and "/" not in value, key, f"{value!r} is not a split folder name (e.g. train, test, val)")
        prefix = self.dataset.partition(":")[0]
        problem = None if prefix in SOURCES else DATASETS.problem(self.dataset)  # wds:/imagefolder: stream; the rest load
        require(problem is None, "dataset", f"{problem}; or a streamed source: {', '.join(f'{p}:<folder>' for p in SOURCES)}")
        for task in self.tasks:
            require(is_labelling_of(task, self.dataset), "tasks",
                    f"{task!r}: a task is another labelling of the images of dataset={self.dataset!r}; datasets with "
                    f"several labellings: {', '.join(DATASETS.names_with('labellings'))}")
        require(self.train_split != self.test_split, "test_split",
                f"{self.test_split!r} must differ from train_split (the probe would be scored on its own training images)")
        require(bool(self.Cs) and all(math.isfinite(c) and c > 0 for c in self.Cs), "Cs",
                f"{self.Cs!r}: give one or more finite inverse regularisation strengths > 0 (sklearn's C)")
        require(0 < self.val_fraction < 1, "val_fraction",
                f"must be in (0, 1) (the share of train held out to choose C), got {self.val_fraction}")
        require(math.isfinite(self.linear_tol) and self.linear_tol > 0, "linear_tol", f"must be > 0, got {self.linear_tol}")
        require(all(k >= 1 for k in self.knn_ks), "knn_ks", f"{self.knn_ks!r}: every k must be >= 1")
        require(self.knn_temperature > 0, "knn_temperature", f"must be > 0, got {self.knn_temperature}")
        require(bool(self.shots) and all(n >= 1 for n in self.shots), "shots", f"{self.shots!r}: give one or more shot counts >= 1")
        for key in ("knn_k", "linear_max_iter", "draws", "batch_size"):
            require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        for key in ("probe_train_size", "num_workers", "num_threads"):
            require(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        require(0 < self.crop_fraction <= 1, "crop_fraction",
                f"must be in (0, 1] (1 keeps the whole shorter side; 0.875 is the usual centre crop), got {self.crop_fraction}")
        require(bool(DEVICE_RE.match(self.device)), "device", f"{self.device!r} is not allowed; choose auto, cpu, cuda or cuda:<index>")


def is_labelling_of(task: str, dataset: str) -> bool:
    """Whether ``task`` labels the same images as ``dataset`` (``fmnist-world:pattern`` of ``fmnist-world:class``)."""
    return (task.partition(":")[0] == dataset.partition(":")[0] and DATASETS.problem(task) is None
            and bool(DATASETS.traits(task).get("labellings")))


def validate(cfg: EvalConfig) -> None:
    """Check every value (also done when the config loads; here for configs built in code) and the device."""
    check_config(cfg)
    require(not cfg.device.startswith("cuda") or torch.cuda.is_available(), "device",
            f"{cfg.device!r}: no CUDA device is available here; use auto or cpu")


def _as_source(data: LabeledImages | Source | None) -> Source | None:
    if data is None or isinstance(data, Source):
        return data
    return ArraySource(data.images, data.labels, data.class_names, f"{data.name or 'given'} {data.split}".strip())


def outputs(out_dir: str | Path) -> dict[str, Path]:
    """What ``synrep eval`` writes in ``out_dir``; ``done`` (eval.json) is written last."""
    out = Path(out_dir)
    return {"results": out / "eval.json", "table": out / "eval.md", "done": out / "eval.json"}


def is_complete(out_dir: str | Path) -> bool:
    return outputs(out_dir)["done"].is_file()


def evaluate(cfg: EvalConfig, train: LabeledImages | Source | None = None, test: LabeledImages | Source | None = None) -> dict:
    """Run the protocols; returns the results dict (also written to ``out_dir``).

    ``train`` / ``test`` replace ``cfg.dataset``'s splits with data in hand (tests, notebooks).
    """
    validate(cfg)
    bound_heap_growth()  # memory must not grow with the number of feature chunks streamed
    set_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    given = {cfg.train_split: _as_source(train), cfg.test_split: _as_source(test)}
    opened: dict[str, Source] = {}

    def source(split: str) -> Source:
        if split not in opened:
            opened[split] = given[split] if given[split] is not None else open_real(cfg.dataset, split)
        return opened[split]

    cache = Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.out_dir) / "features"
    start = time.time()

    def stored_shape():  # pixels only: folders and tars (SOURCES) hold images of any size; arrays know theirs
        if given[cfg.train_split] is None and cfg.dataset.partition(":")[0] in SOURCES:
            return None
        return source(cfg.train_split).image_shape

    encoder = resolve_encoder(cfg.encoder, cfg.random_backbone, cfg.seed, stored_shape)
    feats = {split: split_features(cache / split, encoder, dataset_identity(cfg.dataset, given[split]), split,
                                   lambda split=split: source(split), cfg.crop_fraction, cfg.batch_size, cfg.num_workers, device,
                                   subset=(cfg.probe_train_size, cfg.seed) if split == cfg.train_split else None)
             for split in (cfg.train_split, cfg.test_split)}
    tr, te = feats[cfg.train_split], feats[cfg.test_split]
    if tr.features.shape[1] != te.features.shape[1]:
        raise FeatureCacheError(f"feature caches {tr.folder} and {te.folder} disagree on the feature dimension")
    train_x = Rows(tr.features, tr.rows)
    train_y = tr.labels if tr.rows is None else tr.labels[tr.rows]
    test_x = Rows(te.features)
    results = {"encoder": cfg.encoder, "dataset": cfg.dataset, "train_split": cfg.train_split, "test_split": cfg.test_split,
               "train_images": len(train_x), "test_images": len(test_x), "feature_dim": int(te.features.shape[1]),
               "image_size": encoder.size, "crop_fraction": cfg.crop_fraction, "device": str(device),
               "feature_seconds": round(time.time() - start, 1),
               "feature_cache": {"train": tr.summary(), "test": te.summary()}}
    results["protocol_seconds"] = _run_protocols(cfg, results, train_x, train_y, test_x, te.labels, device)
    if cfg.tasks:
        if any(given.values()):
            raise ProbeError("tasks label the images of dataset=" + repr(cfg.dataset) + "; they cannot be used with train/test "
                            "data passed in memory")
        if not np.array_equal(known_labels(source(cfg.test_split)), te.labels):
            raise FeatureCacheError(f"feature cache {te.folder}: its labels do not match {cfg.dataset} {cfg.test_split}; "
                                    "delete the cache to rebuild it")
        results["tasks"] = {}
        positions = _train_positions(cfg, tr, lambda: source(cfg.train_split))
        for task in cfg.tasks:
            task_train, task_test = (known_labels(open_real(task, split)) for split in (cfg.train_split, cfg.test_split))
            scores: dict = {}
            scores["protocol_seconds"] = _run_protocols(cfg, scores, train_x, task_train if positions is None else task_train[positions],
                                                        test_x, task_test, device)
            results["tasks"][task] = scores
            LOG.info("eval %s on %s (same features): %s", cfg.encoder, task, headline(scores))
    results["seconds"] = round(time.time() - start, 1)
    out = Path(cfg.out_dir)
    save_config(cfg, out)
    atomic_write_text(out / "eval.md", results_table([results]))
    atomic_write_json(outputs(out)["results"], results)  # the stage's done-marker: written last
    LOG.info("eval %s on %s: %s", cfg.encoder, cfg.dataset, headline(results))
    return results


def _run_protocols(cfg: EvalConfig, results: dict, train_x, train_y: np.ndarray, test_x, test_y: np.ndarray, device) -> dict:
    """Each protocol of ``cfg`` on these features and labels, into ``results``; returns seconds per protocol."""
    timings = {}
    for name in PROTOCOLS:
        if name not in cfg.protocols:
            continue
        t0 = time.time()
        if name == "linear":
            results["linear"] = linear_probe(train_x, train_y, test_x, test_y, tuple(cfg.Cs), cfg.val_fraction, cfg.seed,
                                             cfg.linear_max_iter, cfg.linear_tol, device=device)
        elif name == "knn":
            results["knn"] = knn_classify(train_x, train_y, test_x, test_y, cfg.knn_k, cfg.knn_temperature, device=device,
                                          ks=tuple(cfg.knn_ks))
        else:
            results["fewshot"] = few_shot(train_x, train_y, test_x, test_y, tuple(cfg.shots), cfg.draws, cfg.seed, device=device,
                                          tol=cfg.linear_tol, max_iter=cfg.linear_max_iter)
        timings[name] = round(time.time() - t0, 1)
    return timings


def _train_positions(cfg: EvalConfig, tr: SplitFeatures, open_train) -> np.ndarray | None:
    """Positions in the whole train split of the rows the probes use (None: all of them, in order).

    The cache holds the whole split (``tr.rows`` picks the subset) or only the stratified subset, whose positions
    are drawn again from the dataset's labels; either way they are checked against the cached labels.
    """
    full = known_labels(open_train())
    if tr.rows is not None:
        positions = tr.rows
    elif tr.manifest["settings"]["rows"] == "all":
        positions = None
    else:
        positions = stratified_subset(full, cfg.probe_train_size, cfg.seed)
    used = tr.labels if tr.rows is None else tr.labels[tr.rows]
    expected = full if positions is None else full[positions]
    if len(used) != len(expected) or not np.array_equal(used, expected):
        raise FeatureCacheError(f"feature cache {tr.folder}: its rows do not match {cfg.dataset} {cfg.train_split}; "
                                "the task labels cannot be aligned (delete the cache to rebuild it)")
    return positions


def headline(r: dict) -> str:
    parts = []
    if "linear" in r:
        parts.append(f"linear {r['linear']['top1']:.1f}%")
    if "knn" in r:
        parts.append(f"kNN {r['knn']['top1']:.1f}%")
    if "fewshot" in r:
        parts.append(", ".join(f"{n}-shot {v['mean']:.1f}±{v['std']:.1f}%" for n, v in r["fewshot"].items()))
    return "; ".join(parts)


def results_table(rows: list[dict], names: list[str] | None = None) -> str:
    """Markdown table of eval results (one row per encoder)."""
    shots = sorted({n for r in rows for n in r.get("fewshot", {})}, key=int)
    head = "| encoder | linear top-1 | kNN top-1 | " + " | ".join(f"{n}-shot" for n in shots) + " |"
    sep = "|---|---:|---:|" + "---:|" * len(shots)
    lines = [head, sep]
    for i, r in enumerate(rows):
        name = names[i] if names else r["encoder"]
        lin = f"{r['linear']['top1']:.2f}" if "linear" in r else "—"
        knn = f"{r['knn']['top1']:.2f}" if "knn" in r else "—"
        fs = " | ".join(f"{r['fewshot'][n]['mean']:.1f} ± {r['fewshot'][n]['std']:.1f}" if n in r.get("fewshot", {}) else "—" for n in shots)
        lines.append(f"| {name} | {lin} | {knn} | {fs} |")
    return "\n".join(lines) + "\n"


def load_results(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())
