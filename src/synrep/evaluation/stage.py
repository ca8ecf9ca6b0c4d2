"""``synrep eval``: frozen features of an encoder on a real dataset, judged by linear / kNN / few-shot.

The encoder is an exported synrep encoder folder, ``random:<backbone>`` (random init, seeded) or
``pixels`` (raw pixels, the classic baseline). Results go to ``out_dir/eval.json`` and ``eval.md``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..config import save_config
from ..datasets import LabeledImages, load_dataset
from ..training.backbones import BackboneConfig, build_backbone
from ..training.export import load_encoder
from ..training.methods import normalize_images
from ..utils import atomic_write_json, atomic_write_text, set_threads
from .probes import few_shot, knn_classify, linear_probe

LOG = logging.getLogger("synrep.eval")
PROTOCOLS = ("linear", "knn", "fewshot")


@dataclass
class EvalConfig:
    encoder: str = "runs/train/encoder"
    dataset: str = "fashion-mnist"
    out_dir: str = "runs/eval"
    protocols: list[str] = field(default_factory=lambda: ["linear", "knn", "fewshot"])
    probe_train_size: int = 0  # 0 = the whole train split; else a stratified subset of this size
    Cs: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0])
    knn_k: int = 20
    knn_temperature: float = 0.07
    shots: list[int] = field(default_factory=lambda: [1, 5, 10])
    draws: int = 5
    seed: int = 0
    batch_size: int = 512
    random_backbone: BackboneConfig = field(default_factory=BackboneConfig)
    num_threads: int = 0


def _to_input(images: np.ndarray, channels: int, size: int) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0)
    if x.shape[1] != channels:
        x = x.mean(1, keepdim=True) if channels == 1 else x.expand(-1, channels, -1, -1)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


@torch.no_grad()
def extract_features(encoder: str, data: LabeledImages, batch_size: int = 512, seed: int = 0,
                     random_backbone: BackboneConfig | None = None, desc: str = "features") -> np.ndarray:
    """float32 ``[N, D]`` features of ``data`` under ``encoder`` (a folder, ``random:<backbone>`` or ``pixels``)."""
    if encoder == "pixels":
        return data.images.reshape(len(data), -1).astype(np.float32) / 255.0
    if encoder.startswith("random:"):
        cfg = random_backbone or BackboneConfig()
        cfg = BackboneConfig(**{**cfg.__dict__, "name": encoder.split(":", 1)[1],
                                "image_size": data.images.shape[1], "in_channels": data.images.shape[-1]})
        torch.manual_seed(seed)
        model = build_backbone(cfg).eval()
        channels, size = cfg.in_channels, cfg.image_size
    else:
        model, meta = load_encoder(encoder)
        channels, size = meta["backbone"]["in_channels"], meta["backbone"]["image_size"]
    feats = []
    for start in tqdm(range(0, len(data), batch_size), desc=desc, unit="batch", leave=False, dynamic_ncols=True):
        x = _to_input(data.images[start:start + batch_size], channels, size)
        feats.append(model(normalize_images(x)).float().numpy())
    return np.concatenate(feats)


def _subset(data: LabeledImages, size: int, seed: int) -> LabeledImages:
    if not size or size >= len(data):
        return data
    from sklearn.model_selection import train_test_split

    keep, _ = train_test_split(np.arange(len(data)), train_size=size, random_state=seed, stratify=data.labels)
    return data.subset(np.sort(keep))


def evaluate(cfg: EvalConfig, train: LabeledImages | None = None, test: LabeledImages | None = None) -> dict:
    """Run the protocols; returns the results dict (also written to ``out_dir``)."""
    unknown = [p for p in cfg.protocols if p not in PROTOCOLS]
    if unknown:
        raise ValueError(f"unknown protocol(s) {unknown}; choose from {', '.join(PROTOCOLS)}")
    set_threads(cfg.num_threads)
    train = train if train is not None else load_dataset(cfg.dataset, "train")
    test = test if test is not None else load_dataset(cfg.dataset, "test")
    train = _subset(train, cfg.probe_train_size, cfg.seed)
    start = time.time()
    tr = extract_features(cfg.encoder, train, cfg.batch_size, cfg.seed, cfg.random_backbone, "train features")
    te = extract_features(cfg.encoder, test, cfg.batch_size, cfg.seed, cfg.random_backbone, "test features")
    results = {"encoder": cfg.encoder, "dataset": cfg.dataset, "train_images": len(train), "test_images": len(test),
               "feature_dim": int(tr.shape[1]), "feature_seconds": round(time.time() - start, 1)}
    if "linear" in cfg.protocols:
        results["linear"] = linear_probe(tr, train.labels, te, test.labels, tuple(cfg.Cs), seed=cfg.seed)
    if "knn" in cfg.protocols:
        results["knn"] = knn_classify(tr, train.labels, te, test.labels, cfg.knn_k, cfg.knn_temperature)
    if "fewshot" in cfg.protocols:
        results["fewshot"] = few_shot(tr, train.labels, te, test.labels, tuple(cfg.shots), cfg.draws, cfg.seed)
    results["seconds"] = round(time.time() - start, 1)
    out = Path(cfg.out_dir)
    save_config(cfg, out)
    atomic_write_json(out / "eval.json", results)
    atomic_write_text(out / "eval.md", results_table([results]))
    LOG.info("eval %s on %s: %s", cfg.encoder, cfg.dataset, headline(results))
    return results


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
