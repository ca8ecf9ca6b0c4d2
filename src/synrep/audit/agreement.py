"""Caption-image agreement: does each image show the concept its caption names?

Each image's score comes from the configured scorer (:mod:`.scorers`): with the default ``classifier`` it is
the probability that a classifier trained on the real train split gives to the caption's concept. Images
scoring below ``agreement_threshold`` are flagged as mismatches. Summaries per concept: mean, the share
flagged, and a histogram (for the distribution figure); the lowest-scoring images go into a grid.
"""

from __future__ import annotations

import numpy as np

from .parts import image_ref

SCORE_BINS = 20


class AgreementTotals:
    """Streams per-shard parts into per-concept score summaries, the flagged list and the worst images."""

    def __init__(self, threshold: float, list_limit: int, grid_k: int, class_names: list[str], concept_of_class: dict[int, str]):
        self.threshold, self.list_limit, self.grid_k = threshold, list_limit, grid_k
        self.class_names, self.concept_of_class = class_names, concept_of_class
        self.hist: dict[str, np.ndarray] = {}
        self.sum: dict[str, float] = {}
        self.n: dict[str, int] = {}
        self.unscored: dict[str, int] = {}
        self.below: dict[str, int] = {}
        self.flagged: list[tuple[float, dict]] = []
        self.flagged_total = 0
        self.worst: list[tuple[float, dict, np.ndarray]] = []
        self.by_template: dict[str, np.ndarray] = {}  # template -> [sum of scores, scored, below threshold]

    def predicted_name(self, label: int) -> str:
        return self.concept_of_class.get(int(label), f"class:{self.class_names[int(label)]}")

    def add(self, part: dict[str, np.ndarray], shard: str) -> None:
        scores, groups = part["i_score"], part["i_group"]
        concepts = part["g_concept"][groups] if len(groups) else np.zeros(0, dtype="U1")
        for c in np.unique(concepts):
            s = scores[concepts == c]
            c = str(c)
            ok = s[~np.isnan(s)]
            self.hist[c] = self.hist.get(c, np.zeros(SCORE_BINS, np.int64)) + np.histogram(np.clip(ok, 0, 1), SCORE_BINS, (0, 1))[0]
            self.sum[c] = self.sum.get(c, 0.0) + float(ok.sum())
            self.n[c] = self.n.get(c, 0) + len(ok)
            self.unscored[c] = self.unscored.get(c, 0) + int(len(s) - len(ok))
            self.below[c] = self.below.get(c, 0) + int((ok < self.threshold).sum())
        templates = part["g_template"][groups] if len(groups) else np.zeros(0, dtype="U1")
        for t in np.unique(templates):
            s = scores[templates == t]
            s = s[~np.isnan(s)]
            self.by_template.setdefault(str(t) or "(none)", np.zeros(3))[:] += (s.sum(), len(s), (s < self.threshold).sum())
        rows = np.flatnonzero(scores < self.threshold)  # NaN compares False: unscored images are never flagged
        self.flagged_total += len(rows)
        for r in rows[np.argsort(scores[rows], kind="stable")][:self.list_limit]:
            self.flagged.append((float(scores[r]), self._entry(part, int(r), shard)))
        self.flagged.sort(key=lambda t: t[0])
        del self.flagged[self.list_limit:]
        for r, image in zip(part["worst_rows"], part["worst_images"]):
            self.worst.append((float(scores[r]), self._entry(part, int(r), shard), image))
        self.worst.sort(key=lambda t: t[0])
        del self.worst[self.grid_k:]

    def _entry(self, part: dict, row: int, shard: str) -> dict:
        return {**image_ref(part, row, shard), "score": round(float(part["i_score"][row]), 4),
                "predicted": self.predicted_name(part["i_pred"][row])}

    def result(self) -> dict:
        per = {}
        for c in sorted(self.n):
            n = self.n[c]
            per[c] = {"images": n + self.unscored[c], "scored": n, "mean": self.sum[c] / n if n else None,
                      "below_threshold": self.below[c], "below_fraction": self.below[c] / n if n else None}
        total = sum(self.n.values())
        return {"threshold": self.threshold, "mean": sum(self.sum.values()) / total if total else None,
                "scored_images": total, "unscored_images": sum(self.unscored.values()),
                "flagged": self.flagged_total, "per_concept": per,
                "per_template": {t: {"scored": int(v[1]), "mean": v[0] / v[1] if v[1] else None,
                                     "below_fraction": v[2] / v[1] if v[1] else None} for t, v in sorted(self.by_template.items())},
                "unscored_concepts": sorted(c for c, u in self.unscored.items() if u and not self.n[c]),
                "flagged_images": [e for _, e in self.flagged],
                "flagged_images_listed": min(self.flagged_total, self.list_limit)}


def lowest_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """Rows of the ``k`` lowest non-NaN scores (ascending)."""
    rows = np.flatnonzero(~np.isnan(scores))
    return rows[np.argsort(scores[rows], kind="stable")][:k]
