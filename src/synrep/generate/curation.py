"""Curation while generating: drop or redraw images that do not show their caption's concept.

Each drawn image is scored by the audit's agreement scorer (the probability that a classifier trained on the
real train split gives to the class of the caption's concept). With ``curate.mode=drop`` an image below
``curate.threshold`` is left out (a caption whose images all fail is left out whole); with ``redraw`` it is
drawn again from fresh noise (seeded by caption, image and attempt) up to ``curate.redraws`` times, and the
first image that passes (else the best one) is kept. Provenance records every image's score and redraws.
Concepts without a class label are not scored (kept as drawn).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ..config import require
from ..utils import stable_seed


@dataclass
class CurationConfig:
    mode: Literal["off", "drop", "redraw"] = "off"  # off, drop images below threshold, or redraw them
    threshold: float = 0.5  # agreement score in [0, 1] below which an image is dropped or redrawn
    redraws: int = 2  # redraw: attempts per failing image before the best one is kept
    classifier_dataset: str = "fashion-mnist"  # real data the agreement classifier is trained on (its train split)
    classifier_train_size: int = 0  # real train images for the classifier (0 = all)
    classifier_epochs: int = 2
    classifier_backgrounds: Literal["clean", "noisy"] = "clean"  # noisy: the classifier also learns grey, noisy backgrounds (generators that draw them)
    concepts: str = "fashion-mnist"  # concept list that maps each caption concept to the classifier's class (its label field)
    cache_dir: str = ""  # where the trained classifier is kept ("" = <out_dir>/curation)

    def check(self) -> None:
        require(0 <= self.threshold <= 1 and math.isfinite(self.threshold), "threshold", f"must be in [0, 1], got {self.threshold}")
        require(self.redraws >= 1, "redraws", f"must be >= 1, got {self.redraws}")
        require(self.classifier_epochs >= 1, "classifier_epochs", f"must be >= 1, got {self.classifier_epochs}")
        require(self.classifier_train_size >= 0, "classifier_train_size", f"must be >= 0, got {self.classifier_train_size}")


class Curator:
    """Scores uint8 images ``[B, H, W, C]`` against the concepts their captions name."""

    def __init__(self, cfg: CurationConfig, out_dir: Path, device: str = "cpu"):
        from ..audit.classifier import ClassifierSpec, load_or_train
        from ..captions.concepts import load_concepts

        self.cfg = cfg
        spec = ClassifierSpec(cfg.classifier_dataset, cfg.classifier_train_size, cfg.classifier_epochs, 16, 0, cfg.classifier_backgrounds)
        self.classifier = load_or_train(spec, Path(cfg.cache_dir) if cfg.cache_dir else out_dir / "curation", device)
        self.label_of = {c.name: c.label for c in load_concepts(cfg.concepts).concepts}
        self.device = device

    def scores(self, images: np.ndarray, concepts: list[str]) -> np.ndarray:
        """float ``[B]``: the probability of each image's concept class (NaN: the concept has no class label)."""
        from ..audit.classifier import embed_images
        from ..sources import convert_channels, fit_image

        h, _, c = self.classifier.image_shape
        fitted = np.stack([fit_image(convert_channels(image, c), h) for image in images])
        probs, _ = embed_images(self.classifier.model, fitted, self.device)
        out = np.full(len(images), np.nan)
        for i, concept in enumerate(concepts):
            label = self.label_of.get(concept)
            if label is not None and label < probs.shape[1]:
                out[i] = probs[i, label]
        return out

    def passes(self, scores: np.ndarray) -> np.ndarray:
        return np.isnan(scores) | (scores >= self.cfg.threshold)


OUTCOMES = ("scored", "failed_first_draw", "redrawn", "passing", "dropped")


def new_counts() -> dict[str, int]:
    """Per-shard curation counters (kept in the shard's done-marker): images ``scored`` (their concept has a class),
    those that ``failed_first_draw``, were ``redrawn`` (a later draw kept), end ``passing`` the threshold, or were
    ``dropped``."""
    return dict.fromkeys(OUTCOMES, 0)


def count_outcomes(counts: dict[str, int], curator: Curator, first_scores: np.ndarray, final_scores: np.ndarray,
                   redraws: np.ndarray, keep: np.ndarray) -> None:
    """Add one chunk's outcomes to ``counts``; the arrays are ``[B]`` over the chunk's images."""
    scored = ~np.isnan(first_scores)
    counts["scored"] += int(scored.sum())
    counts["failed_first_draw"] += int((scored & ~curator.passes(first_scores)).sum())
    counts["redrawn"] += int((redraws > 0).sum())
    counts["passing"] += int((scored & curator.passes(final_scores)).sum())
    counts["dropped"] += int((~keep).sum())


def curation_totals(cfg: CurationConfig, markers: list[dict]) -> dict:
    """The shard markers' counts summed, with the pass rates before and after curation (%). ``shards_counted`` of
    ``shards_total`` say how many shards had counts (shards written before curation counted have none). In drop mode
    ``pass_rate_kept`` is 100 by construction: ``dropped`` is the figure to read."""
    totals = new_counts()
    counted = [marker["curation"] for marker in markers if "curation" in marker]
    for counts in counted:
        for key, value in counts.items():
            totals[key] = totals.get(key, 0) + int(value)
    scored = totals["scored"]  # 0: no concept had a class, or every shard predates these counts
    return {"mode": cfg.mode, "threshold": cfg.threshold, "shards_counted": len(counted), "shards_total": len(markers), **totals,
            "pass_rate_first_draw": round(100 * (1 - totals["failed_first_draw"] / scored), 2) if scored else None,
            "pass_rate_kept": round(100 * totals["passing"] / (scored - totals["dropped"]), 2) if scored > totals["dropped"] else None}


def redraw_seed(run_seed: int, caption_id: int, image: int, attempt: int) -> int:
    """The noise seed of redraw ``attempt`` (1, 2, ...) of image ``image`` of caption ``caption_id``."""
    return stable_seed("redraw", run_seed, caption_id, image, attempt) % 2**63


def redraw_noise(shape: tuple[int, ...], seed: int, anchor: torch.Tensor | None, sigma: float, variance: float) -> torch.Tensor:
    """Fresh noise ``shape`` for a redraw: a plain normal draw, or for latent views a new neighbour of ``anchor``."""
    eps = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return eps if anchor is None else (anchor + sigma * eps) / math.sqrt(1 + sigma ** 2 * variance)
