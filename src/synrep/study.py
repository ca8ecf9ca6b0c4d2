"""``synrep study``: the papers' comparisons in miniature, every row from one command.

Same encoder, same number of training steps and images per step for every trained row, all judged
by the same probes on real Fashion-MNIST test images. Rows: random init, raw pixels, SimCLR and
supervised on real train, and on synthetic images only: SimCLR, SupCon by concept, StableRep
(multi-positive by caption), StableRep+, SynCLR, GenRep latent views, plus a guidance sweep for
StableRep and a sigma sweep for the GenRep views. Every data set, row and evaluation is skipped when already complete (resumable).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from .captions import stage as captions_stage
from .captions.stage import CaptionsConfig, run_captions
from .config import require, save_config
from .errors import SynrepError
from .evaluation.stage import EvalConfig, evaluate
from .generate import stage as generate_stage
from .generate.stage import GenerateConfig, run_generate
from .plots import save_bar_chart
from .training.backbones import BACKBONES, BackboneConfig
from .training.loop import TrainConfig, train
from .atomic import atomic_write_json, atomic_write_text

LOG = logging.getLogger("synrep.study")

ALL_ROWS = ["random-init", "raw-pixels", "simclr-real", "supervised-real", "simclr-synthetic", "supcon-synthetic",
            "stablerep-synthetic", "stablerep+-synthetic", "synclr-synthetic", "genrep-latent-stablerep"]


class StudyError(SynrepError, ValueError):
    """A study that cannot be planned (an unknown row)."""


@dataclass
class StudyConfig:
    out_dir: str = "runs/study"
    data_dir: str = ""  # captions + shards; "" = <out_dir>/data (point another study at it to reuse the images)
    rows: list[str] = field(default_factory=lambda: list(ALL_ROWS))
    captions_per_concept: int = 100
    images_per_caption: int = 4
    guidance_scale: float = 2.0
    guidance_sweep: list[float] = field(default_factory=lambda: [1.0, 4.0, 8.0])
    latent_sigma: float = 0.5  # GenRep neighbour spread of the genrep-latent-stablerep row
    latent_sigma_sweep: list[float] = field(default_factory=lambda: [0.25, 1.0])  # more GenRep sigmas, one row each (GenRep reports an inverse U)
    steps: int = 500
    groups_per_batch: int = 64
    images_per_group: int = 4
    base_lr: float = 2e-3
    warmup_steps: int = 50
    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(name="vit-micro", patch_size=7))
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(probe_train_size=10000, protocols=["linear", "knn"]))
    seed: int = 0
    num_threads: int = 0

    def check(self) -> None:
        unknown = [row for row in self.rows if row not in ALL_ROWS]
        require(not unknown, "rows", f"unknown study row(s) {', '.join(map(repr, unknown))}; choose from {', '.join(ALL_ROWS)}")
        for key in ("latent_sigma_sweep", "guidance_sweep"):
            values = getattr(self, key)
            require(all(math.isfinite(v) and v > (0 if key.startswith("latent") else -1e-12) for v in values), key,
                    f"must be finite numbers {'> 0' if key.startswith('latent') else '>= 0'}, got {values}")
        require(math.isfinite(self.latent_sigma) and self.latent_sigma > 0, "latent_sigma", f"must be > 0, got {self.latent_sigma}")


def _data_root(cfg: StudyConfig) -> Path:
    return Path(cfg.data_dir) if cfg.data_dir else Path(cfg.out_dir) / "data"


def _shards(cfg: StudyConfig, guidance: float, sigma: float | None = None) -> str:
    """The shard folder for one guidance scale, with GenRep latent views of spread ``sigma`` when it is given."""
    name = f"shards_g{guidance:g}" if sigma is None else (
        f"shards_latent_g{guidance:g}" if sigma == cfg.latent_sigma else f"shards_latent_g{guidance:g}_s{sigma:g}")
    folder = _data_root(cfg) / name
    if not generate_stage.is_complete(folder):
        run_generate(GenerateConfig(captions=str(captions_stage.outputs(_data_root(cfg) / "captions")["captions"]), out_dir=str(folder),
                                    images_per_caption=cfg.images_per_caption, guidance_scale=guidance,
                                    views="independent" if sigma is None else "latent", sigma=sigma or cfg.latent_sigma,
                                    seed=cfg.seed, num_threads=cfg.num_threads))
    return str(folder)


def _row_plan(cfg: StudyConfig) -> list[tuple[str, dict]]:
    """(row name, training overrides or a fixed baseline) in order."""
    batch = cfg.groups_per_batch * cfg.images_per_group
    plan = []
    for row in cfg.rows:
        if row in ("random-init", "raw-pixels"):
            plan.append((row, {}))
        elif row.endswith("-real"):
            plan.append((row, {"method": row.split("-")[0], "data": f"real:{cfg.eval.dataset}", "groups_per_batch": batch, "images_per_group": 1}))
        elif row.endswith("-synthetic"):
            plan.append((row, {"method": row[: -len("-synthetic")], "data": ("g", cfg.guidance_scale)}))
        elif row == "genrep-latent-stablerep":
            plan.append((row, {"method": "stablerep", "data": ("latent", cfg.guidance_scale, cfg.latent_sigma)}))
        else:
            raise StudyError(f"unknown study row {row!r}; choose from {', '.join(ALL_ROWS)}")
    for g in cfg.guidance_sweep:
        if g != cfg.guidance_scale:
            plan.append((f"stablerep-guidance-{g:g}", {"method": "stablerep", "data": ("g", g)}))
    if "genrep-latent-stablerep" in cfg.rows:
        for sigma in cfg.latent_sigma_sweep:
            if sigma != cfg.latent_sigma:
                plan.append((f"genrep-latent-sigma-{sigma:g}", {"method": "stablerep", "data": ("latent", cfg.guidance_scale, sigma)}))
    return plan


def run_study(cfg: StudyConfig) -> Path:
    plan = _row_plan(cfg)  # before anything is written: an unknown row fails at once
    root = Path(cfg.out_dir)
    root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, root)
    if not captions_stage.is_complete(_data_root(cfg) / "captions"):
        run_captions(CaptionsConfig(out_dir=str(_data_root(cfg) / "captions"), per_concept=cfg.captions_per_concept,
                                    seed=cfg.seed, num_threads=cfg.num_threads))
    results = {}
    for name, spec in plan:
        folder = root / "rows" / name
        if (folder / "row.json").exists():
            results[name] = json.loads((folder / "row.json").read_text())
            LOG.info("study row %s: complete, skipped", name)
            continue
        if spec.get("method") == "synclr" and not BACKBONES.traits(cfg.backbone.name)["patch_tokens"]:
            LOG.warning("study row %s skipped: SynCLR's masked modelling needs a ViT backbone, not %s", name, cfg.backbone.name)
            results[name] = {"row": name, "method": "synclr", "data": "-", "encoder": "-", "linear_top1": None, "knn_top1": None,
                             "train_seconds": 0.0, "total_seconds": 0.0, "seed": cfg.seed, "steps": 0,
                             "note": f"needs a ViT backbone (got {cfg.backbone.name})"}
            continue
        LOG.info("study row %s", name)
        start = time.time()
        train_seconds = 0.0
        if name == "raw-pixels":
            encoder = "pixels"
        elif name == "random-init":
            encoder = f"random:{cfg.backbone.name}"
        else:
            data = spec["data"]
            if isinstance(data, tuple):
                data = _shards(cfg, data[1], data[2] if data[0] == "latent" else None)
            t0 = time.time()
            tcfg = TrainConfig(data=data, out_dir=str(folder / "train"), method=spec["method"], backbone=dataclasses.replace(cfg.backbone),
                               steps=cfg.steps, groups_per_batch=spec.get("groups_per_batch", cfg.groups_per_batch),
                               images_per_group=spec.get("images_per_group", cfg.images_per_group), base_lr=cfg.base_lr,
                               warmup_steps=cfg.warmup_steps,
                               seed=cfg.seed, num_threads=cfg.num_threads, log_every=20)
            encoder = str(train(tcfg))
            train_seconds = time.time() - t0
        ev = dataclasses.replace(cfg.eval, encoder=encoder, out_dir=str(folder / "eval"), seed=cfg.seed, num_threads=cfg.num_threads,
                                 random_backbone=dataclasses.replace(cfg.backbone, image_size=28, in_channels=1))
        r = evaluate(ev)
        row = {"row": name, "method": spec.get("method", name), "data": str(spec.get("data", "-")), "encoder": encoder,
               "linear_top1": r.get("linear", {}).get("top1"), "knn_top1": r.get("knn", {}).get("top1"),
               "train_seconds": round(train_seconds, 1), "total_seconds": round(time.time() - start, 1), "seed": cfg.seed,
               "steps": 0 if name in ("raw-pixels", "random-init") else cfg.steps}
        atomic_write_json(folder / "row.json", row)
        results[name] = row
    return write_study_report(root, cfg, results)


def write_study_report(root: Path, cfg: StudyConfig, results: dict) -> Path:
    rows = list(results.values())
    batch = cfg.groups_per_batch * cfg.images_per_group
    lines = ["# synrep miniature study", "",
             f"Encoder `{cfg.backbone.name}` (patch {cfg.backbone.patch_size}) for every trained row; {cfg.steps} steps x {batch} images per step; "
             f"seed {cfg.seed}. Synthetic data: {cfg.captions_per_concept} template captions per Fashion-MNIST concept x "
             f"{cfg.images_per_caption} images from the embedded generator (guidance {cfg.guidance_scale:g} unless the row says otherwise). "
             f"Evaluation: frozen features on the real Fashion-MNIST test split, linear probe fit on {cfg.eval.probe_train_size or 60000} real train images.", "",
             "| row | method | linear top-1 (%) | kNN top-1 (%) | train s | total s |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lin = f"{r['linear_top1']:.2f}" if r["linear_top1"] is not None else "—"
        knn = f"{r['knn_top1']:.2f}" if r["knn_top1"] is not None else "—"
        lines.append(f"| {r['row']} | {r['method']} | {lin} | {knn} | {r['train_seconds']} | {r['total_seconds']} |")
    lines += ["", "![linear probe per row](study.png)", "", "Reproduce: `synrep study` (resumable; rows already done are skipped).", ""]
    scored = [r for r in rows if r["linear_top1"] is not None]
    if scored:
        save_bar_chart(root / "study.png", [r["row"] for r in scored], [r["linear_top1"] for r in scored],
                       f"miniature study ({cfg.backbone.name}): linear probe on real Fashion-MNIST test", "top-1 (%)")
    atomic_write_json(root / "study.json", {"config": dataclasses.asdict(cfg), "rows": rows})
    path = root / "study.md"
    atomic_write_text(path, "\n".join(lines))
    return path
