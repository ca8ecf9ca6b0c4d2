"""The reference classifier: a small CNN trained on the real *train* split of the generator's training set.

It generalises ``embedded_t2i.fidelity.train_classifier`` (any dataset ``load_dataset`` knows, a train subset,
a width, a device) and is what the audit judges generated images with: class probabilities (caption-image
agreement, predicted-concept counts) and an L2-normalised feature vector (nearest neighbours, diversity).

A trained classifier is cached in ``<folder>/<dataset>-n<train_size>-e<epochs>-w<width>-s<seed>/``:
``classifier.pt`` (state dict, loaded with ``weights_only=True``), ``train_features.npy`` (float16
``[N, 128]`` normalised features of every train image) and ``classifier.json`` (settings, real test
accuracy), written last as the done-marker.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..datasets import LabeledImages, load_dataset
from ..images import randomise_background
from ..atomic import atomic_torch_save, atomic_write_bytes, atomic_write_json

LOG = logging.getLogger("synrep.audit")
FEATURE_DIM = 128


@dataclass(frozen=True)
class ClassifierSpec:
    dataset: str  # load_dataset spec of the real data (train split trains it, test split measures it)
    train_size: int  # train images used (0 = all)
    epochs: int
    width: int  # channels of the first conv layer
    seed: int
    backgrounds: Literal["clean", "noisy"] = "clean"  # noisy: half of each batch on a random grey, noisy background

    def folder_name(self) -> str:
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.dataset).strip("_")[:40]
        return f"{slug}-n{self.train_size}-e{self.epochs}-w{self.width}-s{self.seed}{'-noisy' if self.backgrounds == 'noisy' else ''}"


class ReferenceClassifier(nn.Module):
    """Two conv + max-pool blocks, a 128-d feature layer and a linear head. Input float ``[B, C, H, W]`` in [-1, 1]."""

    def __init__(self, channels: int, size: int, num_classes: int, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * width * (size // 4) ** 2, FEATURE_DIM), nn.ReLU(inplace=True))
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @torch.inference_mode()
    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(probs [B, K], normalised features [B, 128])`` of float ``[B, C, H, W]`` in [-1, 1]."""
        f = self.features(x)
        return torch.softmax(self.head(f), dim=1), nn.functional.normalize(f, dim=1)


def to_input(images: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 ``[B, H, W, C]`` -> float ``[B, C, H, W]`` in [-1, 1] on ``device``."""
    return torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def embed_images(model: ReferenceClassifier, images: np.ndarray, device: str, batch: int = 1000,
                 desc: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(probs float32 [N, K], features float32 [N, 128])`` of uint8 ``[N, H, W, C]`` images, in batches."""
    probs, feats = [], []
    starts = range(0, len(images), batch)
    for s in tqdm(starts, desc=desc, unit="batch", dynamic_ncols=True, disable=desc is None, leave=False):
        p, f = model.embed(to_input(images[s:s + batch], device))
        probs.append(p.float().cpu().numpy())
        feats.append(f.float().cpu().numpy())
    if not probs:
        return np.zeros((0, model.head.out_features), np.float32), np.zeros((0, FEATURE_DIM), np.float32)
    return np.concatenate(probs), np.concatenate(feats)


@dataclass
class LoadedClassifier:
    """A trained reference classifier with what the audit needs of its training set."""

    model: ReferenceClassifier
    spec: ClassifierSpec
    train: LabeledImages  # the real train split (all of it: the nearest-neighbour bank)
    train_features: np.ndarray  # float32 [N, 128], L2-normalised
    test_top1: float  # % on the real test split
    folder: Path

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.train.images.shape[1:])


def _train(spec: ClassifierSpec, train: LabeledImages, device: str) -> ReferenceClassifier:
    h, w, c = train.images.shape[1:]
    if h != w or h % 4:
        raise ValueError(f"the reference classifier needs square images with a side divisible by 4, got {h}x{w}")
    torch.manual_seed(spec.seed)
    model = ReferenceClassifier(c, h, len(train.class_names), spec.width).to(device)
    rng = np.random.default_rng(spec.seed)
    rows = np.arange(len(train)) if spec.train_size in (0, len(train)) or spec.train_size > len(train) \
        else np.sort(rng.choice(len(train), spec.train_size, replace=False))
    x = train.images[rows]
    y = torch.from_numpy(train.labels[rows].astype(np.int64))
    batch = 256
    steps_per_epoch = max(1, len(rows) // batch)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=spec.epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(spec.seed)
    model.train()
    bar = tqdm(total=spec.epochs * steps_per_epoch, desc=f"audit classifier (real {spec.dataset} train)", unit="step",
               dynamic_ncols=True, leave=False)
    for _ in range(spec.epochs):
        order = torch.randperm(len(rows), generator=g).numpy()
        for i in range(steps_per_epoch):
            idx = order[i * batch:(i + 1) * batch]
            batch_x = to_input(x[idx])
            if spec.backgrounds == "noisy":  # so that it reads generated images drawn on grey, noisy backgrounds
                batch_x = randomise_background(batch_x, g)
            loss = nn.functional.cross_entropy(model(batch_x.to(device)), y[idx].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
    bar.close()
    model.eval()
    return model


def load_or_train(spec: ClassifierSpec, root: str | Path, device: str = "cpu") -> LoadedClassifier:
    """The classifier for ``spec`` from its cache folder under ``root``, trained (and cached) when missing."""
    folder = Path(root) / spec.folder_name()
    marker = folder / "classifier.json"
    train = load_dataset(spec.dataset, "train")
    h, w, c = train.images.shape[1:]
    if marker.is_file():
        try:
            info = json.loads(marker.read_text())
            # caches from before ``backgrounds`` existed were trained on clean backgrounds
            if {"backgrounds": "clean", **info.get("spec", {})} == asdict(spec):
                model = ReferenceClassifier(c, h, len(train.class_names), spec.width)
                model.load_state_dict(torch.load(folder / "classifier.pt", map_location="cpu", weights_only=True))
                feats = np.load(folder / "train_features.npy")
                if feats.shape == (len(train), FEATURE_DIM):
                    LOG.info("audit classifier: cached in %s (%.2f%% on real test)", folder, info["test_top1"])
                    return LoadedClassifier(model.to(device).eval(), spec, train, feats.astype(np.float32),
                                            float(info["test_top1"]), folder)
        except (OSError, ValueError, KeyError, RuntimeError, json.JSONDecodeError) as err:
            LOG.warning("audit classifier cache %s is unusable (%s); training again", folder, err)
    start = time.time()
    model = _train(spec, train, device)
    test = load_dataset(spec.dataset, "test")
    probs, _ = embed_images(model, test.images, device)
    top1 = float((probs.argmax(1) == test.labels).mean() * 100)
    _, feats = embed_images(model, train.images, device, desc="audit classifier: train-set features")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_torch_save({k: v.cpu() for k, v in model.state_dict().items()}, folder / "classifier.pt")
    buf = _npy_bytes(feats.astype(np.float16))
    atomic_write_bytes(folder / "train_features.npy", buf)
    atomic_write_json(marker, {"spec": asdict(spec), "test_top1": top1, "classes": train.class_names,
                               "train_images": len(train), "seconds": round(time.time() - start, 1)})
    LOG.info("audit classifier: trained in %.0f s, %.2f%% on real %s test", time.time() - start, top1, spec.dataset)
    return LoadedClassifier(model, spec, train, feats.astype(np.float16).astype(np.float32), top1, folder)


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()
