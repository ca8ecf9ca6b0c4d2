"""The audit's report: ``audit.md`` and its PNG figures (audit.json itself is written by the stage, last).

Every file is first written into a staging folder inside ``out_dir`` and then renamed into place, so a
report that fails half-way leaves the previous one untouched.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from ..config import save_config
from .agreement import SCORE_BINS
from .memorization import FEATURE_RANGE, HIST_BINS, PIXEL_RANGE

FIGURES = {
    "agreement_per_concept": "agreement_per_concept.png",
    "agreement_worst": "agreement_worst.png",
    "balance": "balance.png",
    "memorization_distances": "memorization_distances.png",
    "memorization_closest_pairs": "memorization_closest_pairs.png",
    "diversity": "diversity.png",
}
MAX_PANELS = 30


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _show(ax, image: np.ndarray) -> None:
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255)
    ax.set_xticks([])
    ax.set_yticks([])


def _fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _short(text: str, n: int = 60) -> str:
    text = " ".join(str(text).split()).replace("|", "/")
    return text if len(text) <= n else text[:n - 3] + "..."


# --- figures ----------------------------------------------------------------------------------------------

def agreement_figure(path: Path, hist: dict[str, np.ndarray], per: dict, threshold: float) -> None:
    plt = _plt()
    names = sorted((c for c in hist if hist[c].sum()), key=lambda c: (per[c]["mean"] if per[c]["mean"] is not None else 2, c))
    names = names[:MAX_PANELS] or ["(no scored images)"]
    cols = min(5, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 1.9 * rows + 0.6), squeeze=False, sharex=True)
    edges = np.linspace(0, 1, SCORE_BINS + 1)
    for ax, c in zip(axes.flat, names):
        h = hist.get(c, np.zeros(SCORE_BINS))
        ax.bar(edges[:-1], h / max(h.sum(), 1), width=1 / SCORE_BINS, align="edge", color="tab:blue")
        ax.axvline(threshold, color="tab:red", linewidth=0.8, linestyle="--")
        mean = per.get(c, {}).get("mean")
        ax.set_title(f"{_short(c, 22)}  (mean {_fmt(mean, 2)})", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle("caption-image agreement per concept (share of images per score bin; red: flag threshold)", fontsize=9)
    fig.supxlabel("agreement score", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def labelled_grid(path: Path, cells: list[tuple[list[np.ndarray], str]], title: str, cols: int = 6) -> None:
    """A grid of cells, each one or more images side by side with a small caption under them."""
    plt = _plt()
    if not cells:
        fig, ax = plt.subplots(figsize=(5, 1.2))
        ax.axis("off")
        ax.text(0.5, 0.5, "nothing to show", ha="center", va="center")
        fig.suptitle(title, fontsize=9)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return
    per_cell = max(len(images) for images, _ in cells)
    cols = max(1, min(cols, len(cells)))
    rows = (len(cells) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols * per_cell, figsize=(1.25 * cols * per_cell, 1.75 * rows + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, (images, label) in enumerate(cells):
        r, c = divmod(k, cols)
        for i, image in enumerate(images):
            ax = axes[r, c * per_cell + i]
            ax.axis("on")
            _show(ax, image)
        axes[r, c * per_cell].set_xlabel(label, fontsize=6, loc="left")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def balance_figure(path: Path, balance: dict) -> None:
    plt = _plt()
    concepts = balance["concepts"]["categories"]
    predicted = balance["predicted_concepts"]["categories"]
    templates = balance["templates"]["categories"]
    names = sorted(concepts)[:60]
    fig, axes = plt.subplots(1, 2, figsize=(max(7, 0.45 * len(names) + 4), 3.8), gridspec_kw={"width_ratios": [max(len(names), 3), 3]})
    x = np.arange(len(names))
    total = sum(v["observed"] for v in concepts.values()) or 1
    ax = axes[0]
    ax.bar(x - 0.27, [concepts[n]["observed"] / total for n in names], 0.27, label="captions")
    ax.bar(x, [concepts[n]["expected"] / total for n in names], 0.27, label="requested")
    ptotal = sum(v["observed"] for v in predicted.values()) or 1
    ax.bar(x + 0.27, [predicted.get(n, {}).get("observed", 0) / ptotal for n in names], 0.27, label="classifier says (images)")
    ax.set_xticks(x)
    ax.set_xticklabels([_short(n, 18) for n in names], rotation=40, ha="right", fontsize=7)
    ax.set_ylabel("share")
    ax.set_title(f"concepts (chi-square p = {balance['concepts']['p_value']:.2g})", fontsize=9)
    ax.legend(fontsize=7)
    tnames = sorted(templates)
    tx = np.arange(len(tnames))
    ttotal = sum(v["observed"] for v in templates.values()) or 1
    ax = axes[1]
    ax.bar(tx - 0.2, [templates[n]["observed"] / ttotal for n in tnames], 0.4, label="captions")
    ax.bar(tx + 0.2, [templates[n]["expected"] / ttotal for n in tnames], 0.4, label="requested")
    ax.set_xticks(tx)
    ax.set_xticklabels(tnames, fontsize=8)
    ax.set_title(f"templates (p = {balance['templates']['p_value']:.2g})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def distances_figure(path: Path, figures: dict, memo: dict) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, rng, label in ((axes[0], "pixel", PIXEL_RANGE, "RMS pixel distance to the nearest train image"),
                                (axes[1], "feature", FEATURE_RANGE, "feature distance to the nearest train image")):
        gen = figures[f"{key}_hist"]
        ref = np.histogram(np.clip(figures[f"reference_{key}"], *rng), bins=HIST_BINS, range=rng)[0]
        edges = np.linspace(*rng, HIST_BINS + 1)
        hi = edges[min(HIST_BINS, int(max(np.flatnonzero(gen).max(initial=0), np.flatnonzero(ref).max(initial=0))) + 2)]
        ax.stairs(gen / max(gen.sum(), 1), edges, label="generated -> train", fill=True, alpha=0.5)
        ax.stairs(ref / max(ref.sum(), 1), edges, label="real test -> train", linewidth=1.2)
        t = memo[key]["threshold"]
        ax.axvline(t, color="tab:red", linestyle="--", linewidth=0.9, label=f"near-copy threshold {t:.3f}")
        ax.set_xlim(0, max(hi, t * 1.2, 1e-3))
        ax.set_xlabel(label, fontsize=8)
        ax.set_ylabel("share of images", fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle("memorization: nearest training image, generated vs real held-out images", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def diversity_figure(path: Path, diversity: dict) -> None:
    plt = _plt()
    per = diversity["per_concept"]
    names = sorted(per)[:60]
    x = np.arange(len(names))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 0.5 * len(names) * 2 + 3), 3.8))
    for ax, space in zip(axes, ("pixel", "feature")):
        for off, key, label in ((-0.27, f"within_caption_{space}", "within caption"), (0.0, f"within_concept_{space}", "within concept"),
                                (0.27, f"real_within_class_{space}", "real test, same class")):
            ax.bar(x + off, [per[n][key] if per[n][key] is not None else 0 for n in names], 0.27, label=label)
        ax.set_xticks(x)
        ax.set_xticklabels([_short(n, 18) for n in names], rotation=40, ha="right", fontsize=7)
        ax.set_ylabel(f"mean pairwise {space} distance", fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle("diversity: spread of images that share a caption / a concept (0 = collapse)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- markdown ---------------------------------------------------------------------------------------------

def markdown(result: dict) -> str:
    a, b, m, d = result["agreement"], result["balance"], result["memorization"], result["diversity"]
    cls = result["classifier"]
    lines = [f"# Audit of `{result['data']}`", "",
             f"{result['images']} images in {result['groups']} caption groups, {result['shards']} shards. "
             f"Reference classifier: trained on real {cls['dataset']} train ({cls['train_size']} images, {cls['epochs']} epochs), "
             f"{cls['real_test_top1']:.1f}% top-1 on real test. Scorer: `{result['scorer']['name']}`.", "",
             "## 1. Caption-image agreement", "",
             f"Score = the probability the scorer gives to the concept the caption names (1 = clearly that concept). "
             f"Mean {_fmt(a['mean'])}; {a['flagged']} of {a['scored_images']} scored images are below {a['threshold']} "
             f"(flagged as caption mismatches)" + (f"; {a['unscored_images']} images of concepts the scorer cannot judge "
                                                    f"({', '.join(a['unscored_concepts'][:8])})" if a["unscored_images"] else "") + ". "
             f"Real test images of the concept's class score {_fmt(a['real_test_mean'])} on average "
             f"({_fmt(a['real_test_below_fraction'], 2)} below the threshold): the scorer's own error rate, the floor to compare with.", "",
             "| concept | images | mean score | real test mean | flagged | flagged share | real test flagged share |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for c, v in sorted(a["per_concept"].items(), key=lambda kv: (kv[1]["mean"] if kv[1]["mean"] is not None else 2, kv[0])):
        lines.append(f"| {_short(c, 40)} | {v['images']} | {_fmt(v['mean'])} | {_fmt(v['real_test_mean'])} | {v['below_threshold']} | "
                     f"{_fmt(v['below_fraction'], 2)} | {_fmt(v['real_test_below_fraction'], 2)} |")
    if a["per_template"]:
        lines += ["", "By caption template (a `c+rel` caption names a second object the generator may draw instead): " + "; ".join(
            f"`{t}` mean {_fmt(v['mean'])}, {_fmt(v['below_fraction'], 2)} flagged ({v['scored']} images)" for t, v in a["per_template"].items()) + "."]
    lines += ["", f"![agreement per concept]({FIGURES['agreement_per_concept']})", "",
              f"Lowest-scoring images (caption concept -> what the classifier sees): ![worst]({FIGURES['agreement_worst']})", ""]
    if a["flagged_images"]:
        lines += ["| score | concept | classifier says | shard / key / image | caption |", "|---:|---|---|---|---|"]
        for e in a["flagged_images"][:10]:
            lines.append(f"| {e['score']:.3f} | {_short(e['concept'], 24)} | {_short(e['predicted'], 24)} | "
                         f"{e['shard']} / {e['key']} / {e['image']} | {_short(e['caption'])} |")
        lines.append("")

    lines += ["## 2. Balance and bias", "",
              f"Observed caption counts against the requested mix (concepts: {b['mix_sources']['concepts']}; "
              f"templates: {b['mix_sources']['templates']}), Pearson chi-square. A small p-value says the counts are "
              "unlikely under the requested mix; the ratio observed / expected says where.", "",
              "| kind | categories | chi-square | dof | p-value | most over-represented (ratio) | most under-represented (ratio) |",
              "|---|---:|---:|---:|---:|---|---|"]
    for kind in ("concepts", "templates", "backgrounds", "relations", "predicted_concepts"):
        blk = b[kind]
        cats = blk["categories"]

        def ranked(names):
            return ", ".join(f"{_short(n, 24)} ({cats[n]['ratio']:.2f})" for n in names) or "-"

        label = "predicted concept (images) vs captioned" if kind == "predicted_concepts" else kind
        lines.append(f"| {label} | {len(cats)} | {blk['statistic']:.1f} | {blk['dof']} | {blk['p_value']:.3g} | "
                     f"{ranked(blk['over'])} | {ranked(blk['under'])} |")
    lines += ["", f"![balance]({FIGURES['balance']})", ""]

    px, ft = m["pixel"], m["feature"]
    lines += ["## 3. Memorization", "",
              f"Each image's nearest neighbour in the real train split, against the same distance for {m['real_test_images']} real "
              f"test images (never trained on). Near-copy threshold: {m['threshold_rule']} = RMS pixel distance {px['threshold']:.4f} "
              f"({px['real_test_below_threshold']:.1%} of real test images fall below it).", "",
              f"**{m['near_copies']} near-copies** ({m['near_copy_fraction']:.2%} of images). ", "",
              "| space | generated median | real test median | threshold | below threshold (generated) |", "|---|---:|---:|---:|---:|",
              f"| pixel (RMS) | {px['generated_median']:.4f} | {px['real_test_median']:.4f} | {px['threshold']:.4f} | {px['flagged']} ({px['flagged_fraction']:.2%}) |",
              f"| classifier features | {ft['generated_median']:.4f} | {ft['real_test_median']:.4f} | {ft['threshold']:.4f} | {ft['flagged']} ({ft['flagged_fraction']:.2%}) |",
              "", f"![distances]({FIGURES['memorization_distances']})", "",
              f"Closest pairs (generated, nearest train image): ![pairs]({FIGURES['memorization_closest_pairs']})", ""]
    if m["flagged_images"]:
        lines += ["| pixel distance | train index | concept | shard / key / image | caption |", "|---:|---:|---|---|---|"]
        for e in m["flagged_images"][:10]:
            lines.append(f"| {e['pixel_distance']:.4f} | {e['train_index']} | {_short(e['concept'], 24)} | "
                         f"{e['shard']} / {e['key']} / {e['image']} | {_short(e['caption'])} |")
        lines.append("")

    lines += ["## 4. Diversity", "",
              f"Mean pairwise distance between images of one caption (within caption: pixel {_fmt(d['within_caption_pixel'])}, "
              f"feature {_fmt(d['within_caption_feature'])}) and of one concept (pixel {_fmt(d['within_concept_pixel'])}, feature "
              f"{_fmt(d['within_concept_feature'])}); real test images of one class: pixel {_fmt(d['real_within_class_pixel'])}, "
              f"feature {_fmt(d['real_within_class_feature'])}. Far below the real spread means collapse.", "",
              "| concept | captions | within caption (pixel / feature) | within concept (pixel / feature) | real same class (pixel / feature) |",
              "|---|---:|---:|---:|---:|"]
    for c, v in sorted(d["per_concept"].items()):
        lines.append(f"| {_short(c, 40)} | {v['captions']} | {_fmt(v['within_caption_pixel'])} / {_fmt(v['within_caption_feature'])} | "
                     f"{_fmt(v['within_concept_pixel'])} / {_fmt(v['within_concept_feature'])} | "
                     f"{_fmt(v['real_within_class_pixel'])} / {_fmt(v['real_within_class_feature'])} |")
    lines += ["", f"![diversity]({FIGURES['diversity']})", ""]
    if d["least_diverse_captions"]:
        lines += ["Least diverse captions:", ""]
        for e in d["least_diverse_captions"][:5]:
            lines.append(f"- {e['pixel']:.4f} pixel / {e['feature']:.4f} feature: {e['shard']} / {e['key']} ({_short(e['concept'], 24)}) "
                         f"\"{_short(e['caption'])}\"")
        lines.append("")
    lines += [f"Details (every number, flagged images with their shard and key): `audit.json`. "
              f"Judged in {result['seconds_this_run']} s ({result['shards_judged_this_run']} of {result['shards']} shards this run).", ""]
    return "\n".join(lines)


def write_report(out: Path, result: dict, figures: dict, cfg, train_images: np.ndarray) -> None:
    """Write the figures, audit.md and config.yaml (staged, then renamed into ``out``); sets ``result['files']``."""
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f".report-staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        agreement_figure(staging / FIGURES["agreement_per_concept"], figures["agreement_hist"], result["agreement"]["per_concept"],
                         result["agreement"]["threshold"])
        labelled_grid(staging / FIGURES["agreement_worst"],
                      [([img], f"{e['score']:.2f} {_short(e['concept'], 12)}\n-> {_short(e['predicted'], 14)}")
                       for _, e, img in figures["worst"]],
                      "lowest caption-image agreement (score, caption concept -> classifier's class)")
        labelled_grid(staging / FIGURES["memorization_closest_pairs"],
                      [([img, train_images[e["train_index"]]], f"d={e['pixel_distance']:.3f} #{e['train_index']}")
                       for _, e, img in figures["closest"]],
                      "closest generated / train pairs (left: generated, right: nearest real train image; RMS pixel distance)", cols=4)
        balance_figure(staging / FIGURES["balance"], result["balance"])
        distances_figure(staging / FIGURES["memorization_distances"], figures, result["memorization"])
        diversity_figure(staging / FIGURES["diversity"], result["diversity"])
        (staging / "audit.md").write_text(markdown(result), encoding="utf-8")
        save_config(cfg, staging)
        names = [*FIGURES.values(), "audit.md", "config.yaml"]
        for name in names:
            os.replace(staging / name, out / name)
        result["files"] = ["audit.md", *FIGURES.values(), "config.yaml"]
    finally:
        shutil.rmtree(staging, ignore_errors=True)
