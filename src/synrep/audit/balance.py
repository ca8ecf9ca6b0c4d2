"""Balance and bias: are concepts, templates, backgrounds and relations drawn in the mix that was asked for?

Observed counts (captions per category, from the shards' provenance) are compared with the requested mix
(uniform unless told: a configured mix, or the captions run's own ``mix`` found through the shard folder's
``config.yaml``) by Pearson's chi-square test; categories are ranked by observed / expected.
The classifier's predicted concepts (per image) are compared with the captions' concepts the same way:
a generator that draws one concept for another shows up there even when the captions are balanced.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from ..captions.requests import TEMPLATES
from ..config import read_yaml
from ..generate import stage as generate_stage

LOG = logging.getLogger("synrep.audit")


def chi_square(observed: dict[str, float], weights: dict[str, float]) -> dict:
    """Pearson's chi-square of ``observed`` counts against a mix given by ``weights`` (any scale).

    Categories in either mapping take part (missing ones count 0). A category with weight 0 but a count
    makes the statistic infinite (p = 0). Returns statistic, dof, p-value, and per category observed,
    expected and observed / expected, ranked.
    """
    names = sorted(set(observed) | set(weights))
    obs = np.array([float(observed.get(n, 0)) for n in names])
    w = np.array([float(weights.get(n, 0)) for n in names])
    total = obs.sum()
    if total == 0 or w.sum() <= 0 or len(names) < 2:
        return {"statistic": 0.0, "dof": max(len(names) - 1, 0), "p_value": 1.0, "categories": {}, "over": [], "under": []}
    exp = w / w.sum() * total
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(exp > 0, (obs - exp) ** 2 / np.where(exp > 0, exp, 1), np.where(obs > 0, np.inf, 0.0))
        ratio = np.where(exp > 0, obs / np.where(exp > 0, exp, 1), np.where(obs > 0, np.inf, 1.0))
    stat = float(terms.sum())
    dof = int((w > 0).sum()) - 1
    p = chi2_sf(stat, dof) if math.isfinite(stat) else 0.0
    cats = {n: {"observed": int(o), "expected": float(e), "ratio": float(r)} for n, o, e, r in zip(names, obs, exp, ratio)}
    order = sorted(names, key=lambda n: (-cats[n]["ratio"], n))
    over = [n for n in order if cats[n]["ratio"] > 1]
    under = [n for n in reversed(order) if cats[n]["ratio"] < 1]
    return {"statistic": stat, "dof": dof, "p_value": p, "categories": cats, "over": over, "under": under}


def chi2_sf(stat: float, dof: int) -> float:
    """Survival function of the chi-square distribution (scipy when installed, else a series / continued fraction)."""
    if dof <= 0:
        return 1.0
    try:
        from scipy.stats import chi2

        return float(chi2.sf(stat, dof))
    except ImportError:  # pragma: no cover - scipy comes with scikit-learn
        return _gamma_q(dof / 2.0, stat / 2.0)


def _gamma_q(a: float, x: float) -> float:
    """Regularised upper incomplete gamma Q(a, x) (Numerical Recipes' gser / gcf)."""
    if x <= 0:
        return 1.0
    lg = math.lgamma(a)
    if x < a + 1:
        term = total = 1.0 / a
        ap = a
        for _ in range(1000):
            ap += 1
            term *= x / ap
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return max(0.0, 1.0 - total * math.exp(-x + a * math.log(x) - lg))
    b, c, d = x + 1 - a, 1e300, 1.0 / (x + 1 - a)
    h = d
    for i in range(1, 1000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = 1e-300 if abs(d) < 1e-300 else d
        c = b + an / c
        c = 1e-300 if abs(c) < 1e-300 else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-15:
            break
    return math.exp(-x + a * math.log(x) - lg) * h


def captions_run_config(data: Path) -> tuple[dict | None, str]:
    """The config of the captions run that made the shards in ``data`` (through the generate stage's record of its
    settings), and where it was found; ``(None, reason)`` when it cannot be found."""
    settings = generate_stage.saved_settings(data)
    if not settings or not settings.get("captions"):
        return None, f"no readable {generate_stage.outputs(data)['config']}"
    captions = Path(settings["captions"])
    folder = captions if captions.is_dir() else captions.parent
    path = folder / "config.yaml"
    try:
        cfg = read_yaml(path, "captions config", ValueError)
    except ValueError as err:
        return None, f"cannot read {path} ({err})"
    return (cfg, str(path)) if isinstance(cfg, dict) else (None, f"{path} holds no mapping")


def requested_mix(data: Path, concept_mix: dict[str, float], template_mix: dict[str, float],
                  observed_concepts: list[str], listed_concepts: list[str]) -> dict:
    """The mix each category was asked for: ``{"concepts": {...}, "templates": {...}, "sources": {...}}``.

    Concepts: ``concept_mix`` when given, else uniform over the observed concepts plus those of the concept
    list when the observed ones all belong to it (so a concept that never appears counts as missing).
    Templates: ``template_mix`` when given, else the captions run's ``mix``, else uniform over the observed ones.
    """
    sources = {}
    if concept_mix:
        concepts = {str(k): float(v) for k, v in concept_mix.items()}
        sources["concepts"] = "config concept_mix"
    else:
        names = set(observed_concepts)
        if listed_concepts and names <= set(listed_concepts):
            names |= set(listed_concepts)
        concepts = {c: 1.0 for c in sorted(names)}
        sources["concepts"] = "uniform"
    if template_mix:
        templates = {str(k): float(v) for k, v in template_mix.items()}
        sources["templates"] = "config template_mix"
    else:
        cfg, where = captions_run_config(data)
        mix = cfg.get("mix") if cfg else None
        if isinstance(mix, list) and len(mix) in (len(TEMPLATES) - 1, len(TEMPLATES)):  # the bg weight is optional
            templates = {t: w for t, w in zip(TEMPLATES, (float(m) for m in mix)) if w > 0}
            sources["templates"] = f"captions run mix ({where})"
        else:
            templates = {}
            sources["templates"] = f"uniform over the observed templates ({where})"
    return {"concepts": concepts, "templates": templates, "sources": sources}


def balance_section(counts: dict[str, dict[str, int]], mix: dict, predicted: dict[str, int], caption_images: dict[str, int],
                    relations: list[str], top: int) -> dict:
    """All balance numbers: one chi-square block per category kind, plus predicted vs captioned concepts."""
    def block(observed: dict[str, int], weights: dict[str, float]) -> dict:
        result = chi_square(observed, weights or {k: 1.0 for k in observed})
        result["over"], result["under"] = result["over"][:top], result["under"][:top]
        return result

    backgrounds = {k: v for k, v in counts["background"].items() if k}
    observed_relations = {k: v for k, v in counts["relation"].items() if k}
    return {
        "mix_sources": mix["sources"],
        "concepts": block(counts["concept"], mix["concepts"]),
        "templates": block({k or "(none)": v for k, v in counts["template"].items()}, mix["templates"]),
        "backgrounds": block(backgrounds, {k: 1.0 for k in backgrounds}),
        "relations": block(observed_relations, {k: 1.0 for k in set(relations) | set(observed_relations)} if observed_relations else {}),
        "predicted_concepts": block(predicted, {k: float(v) for k, v in caption_images.items()}),
    }


class BalanceTotals:
    """Streams per-shard parts into caption counts per concept / template / background / relation, and
    images per captioned and per predicted concept."""

    def __init__(self, predicted_name):
        self.predicted_name = predicted_name  # class index -> concept name
        self.counts: dict[str, dict[str, int]] = {k: {} for k in ("concept", "template", "background", "relation")}
        self.predicted: dict[str, int] = {}
        self.caption_images: dict[str, int] = {}

    def add(self, part: dict[str, np.ndarray], shard: str) -> None:
        for kind in self.counts:
            values, counts = np.unique(part[f"g_{kind}"], return_counts=True)
            for v, n in zip(values, counts):
                self.counts[kind][str(v)] = self.counts[kind].get(str(v), 0) + int(n)
        labels, counts = np.unique(part["i_pred"], return_counts=True)
        for label, n in zip(labels, counts):
            name = self.predicted_name(int(label))
            self.predicted[name] = self.predicted.get(name, 0) + int(n)
        concepts, counts = np.unique(part["g_concept"][part["i_group"]], return_counts=True)
        for c, n in zip(concepts, counts):
            self.caption_images[str(c)] = self.caption_images.get(str(c), 0) + int(n)
