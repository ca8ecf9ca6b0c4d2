"""Diversity: how different the images of one caption, and of one concept, are from each other.

Within-caption spread is the mean pairwise distance between a caption's images (every group is measured
as it streams by). Within-concept spread is the same over a bounded sample of each concept's images: the
``k`` images with the smallest ``stable hash`` of (caption id, image index), a choice that does not depend
on shard order, so per-shard samples merge into the global one exactly. Both in pixel space (RMS of [0, 1]
pixels) and in the reference classifier's feature space (Euclidean, normalised features); 0 means collapse.
Real test images of the matching class, sampled the same way, give the reference a generator should reach.
"""

from __future__ import annotations

import numpy as np

from ..utils import stable_seed


def pairwise_pixel(images: np.ndarray) -> float:
    """Mean pairwise RMS distance of uint8 ``[n, ...]`` images (pixels in [0, 1]); NaN for fewer than 2."""
    if len(images) < 2:
        return float("nan")
    x = images.reshape(len(images), -1).astype(np.float64) / 255.0
    sq = (x ** 2).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None] - 2 * x @ x.T, 0.0) / x.shape[1]
    iu = np.triu_indices(len(x), 1)
    return float(np.sqrt(d2[iu]).mean())


def pairwise_feature(features: np.ndarray) -> float:
    """Mean pairwise Euclidean distance of float ``[n, D]`` features; NaN for fewer than 2."""
    if len(features) < 2:
        return float("nan")
    f = features.astype(np.float64)
    sq = (f ** 2).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None] - 2 * f @ f.T, 0.0)
    iu = np.triu_indices(len(f), 1)
    return float(np.sqrt(d2[iu]).mean())


def sample_hash(caption_id: int, j: int) -> int:
    """The order key of image ``j`` of caption ``caption_id`` in the within-concept sample (63 bits)."""
    return stable_seed("audit-diversity", int(caption_id), int(j))


class ConceptSample:
    """Per concept, the ``k`` entries with the smallest hash seen so far (payload arrays kept alongside)."""

    def __init__(self, k: int):
        self.k = k
        self.items: dict[str, list[tuple[int, np.ndarray, np.ndarray]]] = {}

    def offer(self, concept: str, key: int, image: np.ndarray, feature: np.ndarray) -> None:
        items = self.items.setdefault(concept, [])
        if len(items) >= self.k and key >= items[-1][0]:
            return
        items.append((int(key), image, feature))
        items.sort(key=lambda t: t[0])
        del items[self.k:]

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Flat arrays for an ``.npz`` (concept names, hashes, images, features)."""
        rows = [(c, h, im, f) for c, items in self.items.items() for h, im, f in items]
        if not rows:
            return {"div_concept": np.zeros(0, dtype="U1"), "div_hash": np.zeros(0, np.uint64),
                    "div_images": np.zeros((0, 1, 1, 1), np.uint8), "div_features": np.zeros((0, 1), np.float16)}
        return {"div_concept": np.array([r[0] for r in rows]), "div_hash": np.array([r[1] for r in rows], dtype=np.uint64),
                "div_images": np.stack([r[2] for r in rows]), "div_features": np.stack([r[3] for r in rows]).astype(np.float16)}

    def merge_arrays(self, arrays) -> None:
        for c, h, im, f in zip(arrays["div_concept"], arrays["div_hash"], arrays["div_images"], arrays["div_features"]):
            self.offer(str(c), int(h), im, f.astype(np.float32))

    def spread(self) -> dict[str, dict]:
        """Per concept: sample size and mean pairwise pixel / feature distance."""
        out = {}
        for c, items in sorted(self.items.items()):
            images = np.stack([it[1] for it in items])
            feats = np.stack([it[2] for it in items])
            out[c] = {"sample": len(items), "pixel": pairwise_pixel(images), "feature": pairwise_feature(feats)}
        return out


def class_sample_rows(labels: np.ndarray, k: int, seed: int) -> dict[int, np.ndarray]:
    """Per class label: ``k`` random row indices of that class (the real reference sample)."""
    rng = np.random.default_rng(seed)
    out = {}
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        out[int(label)] = np.sort(rng.choice(rows, min(k, len(rows)), replace=False))
    return out


class DiversityTotals:
    """Streams per-shard parts into within-caption means per concept and the merged within-concept sample."""

    def __init__(self, k: int, list_limit: int):
        self.sample = ConceptSample(k)
        self.list_limit = list_limit
        self.sums: dict[str, np.ndarray] = {}  # concept -> [sum pixel, sum feature, groups]
        self.lowest: list[tuple[float, dict]] = []

    def add(self, part: dict[str, np.ndarray], shard: str) -> None:
        pix, feat = part["g_div_pixel"], part["g_div_feature"]
        for g, c in enumerate(part["g_concept"]):
            if np.isnan(pix[g]):
                continue
            s = self.sums.setdefault(str(c), np.zeros(3))
            s += (pix[g], feat[g], 1)
            self.lowest.append((float(pix[g]), {"shard": shard, "key": str(part["g_key"][g]), "caption_id": int(part["g_caption_id"][g]),
                                                "concept": str(c), "caption": str(part["g_caption"][g]),
                                                "pixel": round(float(pix[g]), 4), "feature": round(float(feat[g]), 4)}))
        self.lowest.sort(key=lambda t: t[0])
        del self.lowest[self.list_limit:]
        self.sample.merge_arrays(part)

    def result(self, real: dict[str, dict]) -> dict:
        """``real``: concept -> the real reference spread of its class (absent when the concept has no class)."""
        concept_spread = self.sample.spread()
        per = {}
        for c in sorted(set(self.sums) | set(concept_spread)):
            s = self.sums.get(c, np.zeros(3))
            within = concept_spread.get(c, {})
            ref = real.get(c, {})
            per[c] = {"captions": int(s[2]), "within_caption_pixel": s[0] / s[2] if s[2] else None,
                      "within_caption_feature": s[1] / s[2] if s[2] else None,
                      "within_concept_pixel": within.get("pixel"), "within_concept_feature": within.get("feature"),
                      "within_concept_sample": within.get("sample", 0),
                      "real_within_class_pixel": ref.get("pixel"), "real_within_class_feature": ref.get("feature")}
        total = np.sum(list(self.sums.values()), axis=0) if self.sums else np.zeros(3)

        def mean(key: str) -> float | None:
            vals = [v[key] for v in per.values() if v[key] is not None and v[key] == v[key]]
            return float(np.mean(vals)) if vals else None

        return {"within_caption_pixel": total[0] / total[2] if total[2] else None,
                "within_caption_feature": total[1] / total[2] if total[2] else None,
                "within_concept_pixel": mean("within_concept_pixel"), "within_concept_feature": mean("within_concept_feature"),
                "real_within_class_pixel": mean("real_within_class_pixel"), "real_within_class_feature": mean("real_within_class_feature"),
                "per_concept": per, "least_diverse_captions": [e for _, e in self.lowest]}
