"""``synrep report <run-dir>``: rebuild ``report.md`` and its PNGs from what a run folder holds."""

from __future__ import annotations

import json
from pathlib import Path

from .captions.stage import iter_captions
from .errors import SynrepError
from .evaluation.stage import results_table
from .plots import save_bar_chart, save_metrics_curve
from .atomic import atomic_write_text
from .utils import read_jsonl


class ReportError(SynrepError, RuntimeError):
    """The folder is not a synrep run folder, or a summary in it is damaged."""


def _load(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReportError(f"{path} is not valid JSON ({err}); delete it and rerun the stage that writes it") from None


def write_report(run_dir: str | Path) -> Path:
    from .captions import stage as captions_stage
    from .evaluation import stage as eval_stage
    from .generate import stage as generate_stage
    from .pipeline import stage_dirs
    from .training.export import ENCODER_FILE, encoder_dir
    from .training.loop import METRICS

    root = Path(run_dir)
    if not root.is_dir():
        raise ReportError(f"run folder {root} does not exist")
    dirs = stage_dirs(root)
    if not any(folder.exists() for folder in dirs.values()):
        raise ReportError(f"{root} is not a synrep run folder (no captions/, shards/, train/ or eval/ inside)")
    figures = root / "figures"
    figures.mkdir(exist_ok=True)
    lines = [f"# synrep run report: `{root}`", ""]
    timings = _load(root / "timings.json") or {}

    captions = _load(captions_stage.outputs(dirs["captions"])["summary"])
    if captions:
        lines += ["## 1. Captions", "",
                  f"{captions['captions']} captions for {captions['concepts']} concepts from the `{captions['backend']}` backend; "
                  f"per template {captions['per_template']}; {captions['rejected']} rejected, {captions['duplicates']} duplicates removed; "
                  f"distinct-word ratio {captions['distinct_word_ratio']}.", ""]
        step = max(1, captions["captions"] // 8)
        sample = [rec for i, rec in enumerate(iter_captions(captions_stage.outputs(dirs["captions"])["captions"], 0, 8 * step)) if i % step == 0][:8]
        lines += [f"- *{r['caption']}* ({r['concept']}, {r['template']})" for r in sample] + [""]

    gen = _load(generate_stage.outputs(dirs["shards"])["summary"])
    if gen:
        from .generate.stage import write_preview

        write_preview(dirs["shards"], path=figures / "samples.png")
        speed = f", {gen['images_per_second']} images/s" if gen.get("images_per_second") else ""
        settings = generate_stage.saved_settings(dirs["shards"]) or {}
        lines += ["## 2. Images", "",
                  f"{gen['images']} images ({gen['captions']} captions x {settings.get('images_per_caption', '?')}) from `{gen['generator']}`, "
                  f"guidance {settings.get('guidance_scale', '?')}, {settings.get('steps', '?')} steps, views `{settings.get('views', '?')}`{speed}.", "",
                  "![captions and their generated images](figures/samples.png)", ""]

    metrics = read_jsonl(dirs["train"] / METRICS)
    encoder_meta = _load(encoder_dir(dirs["train"]) / ENCODER_FILE)
    if metrics:
        save_metrics_curve(figures / "loss_curve.png", metrics, "training loss")
        speed = sorted(m["img_per_s"] for m in metrics if "img_per_s" in m)
        method = encoder_meta["method"] if encoder_meta else "?"
        backbone = encoder_meta["backbone"]["name"] if encoder_meta else "?"
        speed_text = f", ≈{speed[len(speed) // 2]:.0f} images/s" if speed else ""
        lines += ["## 3. Training", "",
                  f"Method `{method}`, backbone `{backbone}`, {metrics[-1]['step']} steps, "
                  f"loss {metrics[0]['loss']:.3f} → {metrics[-1]['loss']:.3f}{speed_text}.", "",
                  "![training loss](figures/loss_curve.png)", ""]

    names, rows = [], []
    labels = {"encoder": "synthetic-trained encoder", "pixels": "raw pixels", "random": "random-init encoder (same architecture)"}
    for name in ("encoder", "random", "pixels"):
        r = _load(eval_stage.outputs(dirs["eval"] / name)["results"])
        if r:
            names.append(labels[name])
            rows.append(r)
    if rows:
        lines += ["## 4. Evaluation on real images", "",
                  f"Frozen features on the real `{rows[0]['dataset']}` test split ({rows[0]['test_images']} images); "
                  f"probes fit on {rows[0]['train_images']} real train images (regularisation chosen on a split of train).", "",
                  results_table(rows, names)]
        if all("linear" in r for r in rows):
            save_bar_chart(figures / "eval.png", names, [r["linear"]["top1"] for r in rows], "linear probe on real test", "top-1 (%)")
            lines += ["![linear probe](figures/eval.png)", ""]
            ours = rows[0]["linear"]["top1"] if names[0] == labels["encoder"] else None
            if ours is not None and len(rows) > 1:
                best_base = max(r["linear"]["top1"] for r in rows[1:])
                verdict = "beats" if ours > best_base else "does not beat"
                lines += [f"**Headline:** the encoder trained on synthetic images only reaches {ours:.2f}% linear top-1 and "
                          f"{verdict} the best baseline ({best_base:.2f}%).", ""]
    if timings:
        lines += ["## Wall time", "", "| stage | seconds |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in timings.items()] + [""]
    path = root / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
