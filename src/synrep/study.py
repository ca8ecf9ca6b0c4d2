"""``synrep study``: the papers' comparisons in miniature, every row from one command, several seeds each.

Same encoder, same number of training steps and images per step for every trained row, all judged by the
same probes on real test images (``eval.dataset`` and any ``eval_tasks``, e.g. the attribute world's tasks).
Sections (``sections``):

- ``methods``: random init, raw pixels, SimCLR and supervised on real train, and on synthetic images only:
  SimCLR (one image per caption per batch, two crops), SupCon by concept, StableRep, StableRep+, SynCLR,
  GenRep latent views;
- ``guidance``: StableRep at each guidance scale;
- ``sigma``: StableRep on GenRep latent views at each sigma;
- ``captions``: StableRep against the number of captions per concept (4 images each);
- ``images_per_caption``: StableRep against images per caption at a fixed image budget (1 image = SimCLR's
  two crops of it, as in StableRep's figure);
- ``curation``: StableRep at the same image count on the uniform data, on it with images that fail the
  agreement check redrawn (``curate_threshold``), and on a deliberately imbalanced concept mix
  (``rare_concepts`` at ``rare_weight``); the report adds the linear probe's accuracy on the rare concepts.

Every row runs once per seed in ``seeds``; tables and PNGs show the mean and a 95% t-interval. Data sets, runs
and evaluations are skipped when complete, so a killed study resumes; the expected time is logged first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from .atomic import atomic_write_json, atomic_write_text
from .captions import stage as captions_stage
from .captions.llm_backends import CAPTION_BACKENDS
from .captions.concepts import load_concepts
from .captions.stage import CaptionsConfig, run_captions
from .config import require, save_config
from .datasets import DATASETS, concept_list_of
from .errors import SynrepError
from .evaluation.stage import RUNTIME_KEYS, EvalConfig, evaluate, is_labelling_of
from .generate import stage as generate_stage
from .generate.curation import CurationConfig
from .sources import SOURCES
from .generate.generators import GENERATORS
from .generate.stage import GenerateConfig, run_generate
from .plots import save_bar_chart, save_curve
from .training.backbones import BACKBONES, BackboneConfig
from .training.loop import TrainConfig, train

LOG = logging.getLogger("synrep.study")

ALL_ROWS = ["random-init", "raw-pixels", "simclr-real", "supervised-real", "simclr-synthetic", "supcon-synthetic",
            "stablerep-synthetic", "stablerep+-synthetic", "synclr-synthetic", "genrep-latent-stablerep"]
Section = Literal["methods", "guidance", "sigma", "captions", "images_per_caption", "curation"]
ALL_SECTIONS = ["methods", "guidance", "sigma", "captions", "images_per_caption", "curation"]
SECTION_AXIS = {"guidance": "guidance scale", "sigma": "GenRep sigma", "captions": "captions per concept",
                "images_per_caption": "images per caption (fixed image budget)"}
# Rough CPU costs for the up-front estimate (2 cores, vit-micro at 28 px): seconds per training image,
# per generated image, and per evaluation.
SECONDS_PER_TRAIN_IMAGE, SECONDS_PER_GENERATED_IMAGE, SECONDS_PER_EVAL = 0.0009, 0.035, 25.0


class StudyError(SynrepError, ValueError):
    """A study that cannot be planned (an unknown row)."""


WORLD_TASKS = ["fmnist-world:pattern", "fmnist-world:class-pattern", "fmnist-world:tone", "fmnist-world:size",
               "fmnist-world:position", "fmnist-world:tilt"]
# The attribute world (synrep.world): captions that name class + attributes, its 40 px generator, its tasks.
STUDY_PRESETS: dict[str, dict] = {
    "fashion-mnist": {},
    "world": {"out_dir": "runs/study-world", "generator": "embedded-world", "caption_backend": "world",
              "curate_classifier": "fmnist-world:class", "curate_backgrounds": "noisy",
              "caption_mix": [1.0, 0.0, 0.0], "caption_dedup": "text", "captions_per_concept": 80,
              "caption_scaling": [20, 40, 80, 320], "backbone.image_size": 40, "backbone.patch_size": 8,
              "eval.dataset": "fmnist-world:class", "eval_tasks": WORLD_TASKS},
}


@dataclass
class StudyConfig:
    preset: Literal["fashion-mnist", "world"] = "fashion-mnist"  # fashion-mnist: the shipped 28 px generator, template captions, Fashion-MNIST test; world: the attribute world's generator, captions and tasks
    out_dir: str = "runs/study"
    data_dir: str = ""  # captions + shards; "" = <out_dir>/data (point another study at it to reuse the images)
    generator: str = "embedded"  # the generator of every synthetic data set (see `synrep generate --help`)
    caption_backend: str = "template"  # the captions backend of every synthetic data set
    caption_mix: list[float] = field(default_factory=lambda: [0.44, 0.45, 0.11])  # caption template weights c, c+bg, c+rel[, bg]
    caption_dedup: Literal["auto", "minilm", "text", "none"] = "auto"
    sections: list[Section] = field(default_factory=lambda: list(ALL_SECTIONS))  # which parts of the study to run
    rows: list[str] = field(default_factory=lambda: list(ALL_ROWS))  # rows of the methods section
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # every row runs once per seed (mean and 95% interval)
    captions_per_concept: int = 100
    images_per_caption: int = 4
    guidance_scale: float = 2.0  # the guidance of every synthetic row outside the guidance section
    guidance_sweep: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0])  # guidance section
    latent_sigma: float = 0.5  # GenRep neighbour spread of the genrep-latent-stablerep row
    latent_sigma_sweep: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0])  # sigma section (GenRep reports an inverse U)
    caption_scaling: list[int] = field(default_factory=lambda: [25, 50, 100, 400])  # captions section: captions per concept
    images_per_caption_scaling: list[int] = field(default_factory=lambda: [1, 2, 4, 8])  # at captions_per_concept x images_per_caption images
    curate_threshold: float = 0.5  # curation section: images whose agreement score is below this are redrawn
    curate_classifier: str = "fashion-mnist"  # curation section: real data the agreement classifier learns from
    curate_backgrounds: Literal["clean", "noisy"] = "clean"  # curation section: noisy = the classifier also learns grey, noisy backgrounds (world: its generator draws them)
    rare_concepts: list[str] = field(default_factory=lambda: ["sandal", "shirt", "pullover"])  # curation section: concepts made rare
    rare_weight: float = 0.1  # curation section: the rare concepts' caption weight (the others have 1; same total)
    steps: int = 500
    groups_per_batch: int = 64
    images_per_group: int = 4
    base_lr: float = 2e-3
    warmup_steps: int = 50
    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(name="vit-micro", patch_size=7))
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(probe_train_size=10000, protocols=["linear", "knn"]))
    eval_tasks: list[str] = field(default_factory=list)  # more real test sets for every row, e.g. fmnist-world:pattern
    num_threads: int = 0

    def preset_values(self) -> dict:
        """The values ``preset`` sets; the config loader applies them under explicit keys."""
        return dict(STUDY_PRESETS[self.preset])

    def check(self) -> None:
        for key, registry in (("generator", GENERATORS), ("caption_backend", CAPTION_BACKENDS)):
            problem = registry.problem(getattr(self, key))
            require(problem is None, key, problem or "")
        unknown = [row for row in self.rows if row not in ALL_ROWS]
        require(not unknown, "rows", f"unknown study row(s) {', '.join(map(repr, unknown))}; choose from {', '.join(ALL_ROWS)}")
        for key in ("seeds", "sections", "rows", "guidance_sweep", "latent_sigma_sweep", "caption_scaling", "images_per_caption_scaling"):
            values = getattr(self, key)
            # a repeated value would make two rows of one name, pooled as if they were more seeds
            require(len(set(values)) == len(values), key, f"must be distinct values, got {values}")
        require(bool(self.seeds), "seeds", "is empty; give one or more seeds")
        require(any(p in self.eval.protocols for p in ("linear", "knn")), "eval.protocols",
                f"{self.eval.protocols}: the study's tables read linear and kNN top-1; include linear, knn or both")
        require(all(math.isfinite(g) and g >= 0 for g in self.guidance_sweep), "guidance_sweep",
                f"must be finite numbers >= 0, got {self.guidance_sweep}")
        require(all(math.isfinite(s) and s > 0 for s in self.latent_sigma_sweep), "latent_sigma_sweep",
                f"must be finite numbers > 0, got {self.latent_sigma_sweep}")
        require(math.isfinite(self.latent_sigma) and self.latent_sigma > 0, "latent_sigma", f"must be > 0, got {self.latent_sigma}")
        for key in ("caption_scaling", "images_per_caption_scaling"):
            require(all(v >= 1 for v in getattr(self, key)), key, f"must be counts >= 1, got {getattr(self, key)}")
        budget = self.captions_per_concept * self.images_per_caption
        require(all(budget % n == 0 for n in self.images_per_caption_scaling), "images_per_caption_scaling",
                f"each value must divide the image budget captions_per_concept x images_per_caption = {budget}")
        require(0 <= self.curate_threshold <= 1, "curate_threshold", f"must be in [0, 1], got {self.curate_threshold}")
        require(0 < self.rare_weight <= 1, "rare_weight", f"must be in (0, 1] (the others weigh 1), got {self.rare_weight}")
        require(bool(self.rare_concepts) or "curation" not in self.sections, "rare_concepts", "is empty; name one or more concepts")
        for key, specs in (("curate_classifier", [self.curate_classifier]), ("eval_tasks", self.eval_tasks)):
            for spec in specs:
                problem = None if spec.partition(":")[0] in SOURCES else DATASETS.problem(spec)
                require(problem is None, key, problem or "")
        require(len(set(self.eval_tasks)) == len(self.eval_tasks) and self.eval.dataset not in self.eval_tasks, "eval_tasks",
                f"must be distinct and other than eval.dataset ({self.eval.dataset!r}), got {self.eval_tasks}")
        require(not self.eval.tasks, "eval.tasks", "is set by the study from eval_tasks; list the tasks there")
        known = [c.name for c in load_concepts(CaptionsConfig().concepts).concepts]
        unknown = [c for c in self.rare_concepts if c not in known]
        require(not unknown, "rare_concepts", f"{', '.join(map(repr, unknown))} not in the concept list; choose from {', '.join(known)}")
        for key in ("captions_per_concept", "images_per_caption", "steps", "groups_per_batch", "images_per_group"):
            require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        distinct = CAPTION_BACKENDS.traits(self.caption_backend).get("distinct_per_concept")
        if distinct:  # more would be cut by de-duplication, silently changing a row's image budget
            need, key = captions_needed(self, len(known))
            require(need <= distinct, key, f"needs {need} captions per concept, but caption_backend={self.caption_backend!r} "
                    f"writes at most {distinct} distinct ones per concept")


def captions_needed(cfg: StudyConfig, concepts: int) -> tuple[int, str]:
    """The most captions any planned data set asks of one concept, and the config key that asks it."""
    needs = [(cfg.captions_per_concept, "captions_per_concept")]
    if "captions" in cfg.sections:
        needs += [(max(cfg.caption_scaling), "caption_scaling")]
    if "images_per_caption" in cfg.sections:
        needs += [(cfg.captions_per_concept * cfg.images_per_caption // min(cfg.images_per_caption_scaling), "images_per_caption_scaling")]
    if "curation" in cfg.sections:  # the same total, shared by weight: the common concepts get more
        weight = concepts - len(cfg.rare_concepts) + len(cfg.rare_concepts) * cfg.rare_weight
        needs += [(round(cfg.captions_per_concept * concepts / weight), "rare_weight")]
    return max(needs)


@dataclass(frozen=True)
class Data:
    """One synthetic data set: captions per concept, images per caption, guidance, GenRep sigma (None = independent)."""

    captions: int
    images: int
    guidance: float
    sigma: float | None = None
    redraw_below: float | None = None  # curation: redraw images whose agreement score is below this
    judge: str = ""  # curation: the real data set the agreement classifier learned from
    judge_backgrounds: str = "clean"  # curation: noisy = that classifier also learned grey, noisy backgrounds
    rare: str | None = None  # captions with rare concepts: a tag naming which concepts at which weight (see rare_tag)

    @property
    def name(self) -> str:
        views = "" if self.sigma is None else f"_latent_s{self.sigma:g}"
        curated = "" if self.redraw_below is None else f"_redraw{self.redraw_below:g}-{re.sub(r'[^A-Za-z0-9._-]+', '-', self.judge)}" + \
            ("-noisy" if self.judge_backgrounds == "noisy" else "")
        return f"c{self.captions}_n{self.images}_g{self.guidance:g}{views}{curated}{f'_rare-{self.rare}' if self.rare else ''}"


@dataclass(frozen=True)
class Row:
    """One study row: a section, its label, the x value on the section's axis, and what to train (None = a baseline)."""

    section: str
    name: str
    x: float | None
    method: str | None = None
    data: Data | str | None = None  # a synthetic data set, "real", or None for the baselines
    groups_per_batch: int | None = None
    images_per_group: int | None = None
    views: int | None = None
    run_as: str | None = None  # the row whose runs this row shares (same method, data and batch shape); None = its own


def _data_root(cfg: StudyConfig) -> Path:
    """Where the data sets live: one folder per generator and caption source, so studies sharing ``data_dir`` with
    other generators or captions never reuse each other's images."""
    source = [cfg.generator, cfg.caption_backend, list(cfg.caption_mix), cfg.caption_dedup]
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{cfg.caption_backend}-{cfg.generator}")[:40]
    tag = hashlib.sha256(json.dumps(source).encode()).hexdigest()[:6]
    return (Path(cfg.data_dir) if cfg.data_dir else Path(cfg.out_dir) / "data") / f"{readable}-{tag}"


def rare_tag(cfg: StudyConfig) -> str:
    """A short name for the rare-concept mix (which concepts, which weight): data sets with another mix get other folders."""
    return hashlib.sha256(json.dumps([sorted(cfg.rare_concepts), cfg.rare_weight]).encode()).hexdigest()[:8]


def _captions(cfg: StudyConfig, per_concept: int, rare: str | None = None) -> Path:
    root = _data_root(cfg)
    folder = root / f"captions_{per_concept}{f'_rare-{rare}' if rare else ''}"
    weights = ""
    if rare:  # the same total, the rare concepts at rare_weight
        weights = str(root / f"rare_concepts_{rare}.yaml")
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(weights), "".join(f"{c}: {cfg.rare_weight}\n" for c in cfg.rare_concepts))
    if not captions_stage.is_complete(folder):
        run_captions(CaptionsConfig(out_dir=str(folder), per_concept=per_concept, seed=0, num_threads=cfg.num_threads,
                                    backend=cfg.caption_backend, mix=list(cfg.caption_mix), dedup=cfg.caption_dedup,
                                    concept_weights=weights))
    return captions_stage.outputs(folder)["captions"]


def _shards(cfg: StudyConfig, data: Data) -> str:
    folder = _data_root(cfg) / f"shards_{data.name}"
    if not generate_stage.is_complete(folder):
        curate = CurationConfig() if data.redraw_below is None else \
            CurationConfig(mode="redraw", threshold=data.redraw_below, classifier_dataset=data.judge,
                           classifier_backgrounds=data.judge_backgrounds, cache_dir=str(_data_root(cfg) / "curation"))
        run_generate(GenerateConfig(captions=str(_captions(cfg, data.captions, data.rare)), out_dir=str(folder),
                                    images_per_caption=data.images, generator=cfg.generator,
                                    guidance_scale=data.guidance, views="independent" if data.sigma is None else "latent",
                                    sigma=data.sigma or cfg.latent_sigma, seed=0, num_threads=cfg.num_threads, curate=curate))
    return str(folder)


def _main_data(cfg: StudyConfig) -> Data:
    """The synthetic data set of every row that does not sweep it."""
    return Data(cfg.captions_per_concept, cfg.images_per_caption, cfg.guidance_scale)


def _single_image_batches(cfg: StudyConfig) -> dict:
    """One image per caption per batch, two crops of it (SimCLR's batches; half the groups for the same image count)."""
    return dict(groups_per_batch=cfg.groups_per_batch * cfg.images_per_group // 2, images_per_group=1, views=2)


def methods_row(cfg: StudyConfig, name: str) -> Row:
    """The methods section's row ``name`` (one of ``ALL_ROWS``)."""
    main = _main_data(cfg)
    if name in ("random-init", "raw-pixels"):
        return Row("methods", name, None)
    if name == "simclr-real":
        return Row("methods", name, None, "simclr", "real", **_single_image_batches(cfg))
    if name == "supervised-real":
        return Row("methods", name, None, "supervised", "real", groups_per_batch=cfg.groups_per_batch * cfg.images_per_group,
                   images_per_group=1)
    if name == "simclr-synthetic":
        return Row("methods", name, None, "simclr", main, **_single_image_batches(cfg))
    if name == "genrep-latent-stablerep":
        return Row("methods", name, None, "stablerep", dataclasses.replace(main, sigma=cfg.latent_sigma))
    return Row("methods", name, None, name[: -len("-synthetic")], main)


def plan_rows(cfg: StudyConfig) -> list[Row]:
    """Every row of the chosen sections, in report order (a pure function of the config)."""
    batch = cfg.groups_per_batch * cfg.images_per_group
    main = _main_data(cfg)
    single = _single_image_batches(cfg)
    rows = [methods_row(cfg, name) for name in cfg.rows] if "methods" in cfg.sections else []
    if "guidance" in cfg.sections:
        rows += [Row("guidance", f"stablerep-guidance-{g:g}", g, "stablerep", dataclasses.replace(main, guidance=g))
                 for g in cfg.guidance_sweep]
    if "sigma" in cfg.sections:
        rows += [Row("sigma", f"genrep-latent-sigma-{s:g}", s, "stablerep", dataclasses.replace(main, sigma=s))
                 for s in cfg.latent_sigma_sweep]
    if "captions" in cfg.sections:
        rows += [Row("captions", f"stablerep-captions-{c}", c, "stablerep", dataclasses.replace(main, captions=c))
                 for c in cfg.caption_scaling]
    if "images_per_caption" in cfg.sections:
        budget = cfg.captions_per_concept * cfg.images_per_caption
        for n in cfg.images_per_caption_scaling:
            data = Data(budget // n, n, cfg.guidance_scale)
            shape = single if n == 1 else dict(groups_per_batch=max(1, batch // n), images_per_group=n)
            rows.append(Row("images_per_caption", f"stablerep-n{n}", n, "stablerep", data, **shape))
    if "curation" in cfg.sections:
        rows += [Row("curation", "stablerep-uniform", None, "stablerep", main),
                 Row("curation", f"stablerep-redraw-below-{cfg.curate_threshold:g}", None, "stablerep",
                     dataclasses.replace(main, redraw_below=cfg.curate_threshold, judge=cfg.curate_classifier,
                                         judge_backgrounds=cfg.curate_backgrounds)),
                 Row("curation", "stablerep-rare-concepts", None, "stablerep", dataclasses.replace(main, rare=rare_tag(cfg)))]
    return _share_runs(cfg, rows)


def _share_runs(cfg: StudyConfig, rows: list[Row]) -> list[Row]:
    """Point every row that trains exactly what a methods row trains (same method, data and batch shape, e.g. the
    guidance sweep's default guidance) at that row's runs, so the study trains it once per seed."""
    shared = {name: methods_row(cfg, name) for name in ("stablerep-synthetic", "genrep-latent-stablerep")}

    def key(row: Row) -> tuple:
        return (row.method, row.data, row.groups_per_batch or cfg.groups_per_batch,
                row.images_per_group or cfg.images_per_group, row.views)

    by_key = {key(row): name for name, row in shared.items()}
    return [dataclasses.replace(row, run_as=by_key[key(row)])
            if row.section != "methods" and row.method and key(row) in by_key else row for row in rows]


def runs_on(cfg: StudyConfig, row: Row) -> bool:
    """Whether ``row`` can train with ``cfg.backbone`` (SynCLR's masked modelling needs patch tokens)."""
    return row.method != "synclr" or bool(BACKBONES.traits(cfg.backbone.name)["patch_tokens"])


def expected_seconds(cfg: StudyConfig, rows: list[Row]) -> float:
    """A rough estimate of the whole study on this kind of machine (data sets + training + evaluations); rows that
    share another row's runs cost nothing more."""
    rows = [r for r in rows if runs_on(cfg, r)]
    concepts = len(load_concepts(CaptionsConfig().concepts).concepts)
    images = {r.data.name: r.data.captions * r.data.images * concepts for r in rows if isinstance(r.data, Data)}
    runs = {r.run_as or r.name: r for r in rows}
    trained = sum(1 for r in runs.values() if r.method) * len(cfg.seeds)
    evals = len(runs) * len(cfg.seeds) * (1 + sum(not is_labelling_of(t, cfg.eval.dataset) for t in cfg.eval_tasks))
    batch = cfg.groups_per_batch * cfg.images_per_group
    pixels = (cfg.backbone.image_size / 28) ** 2  # the constants are for 28 px; cost grows with the pixel count
    return pixels * (sum(images.values()) * SECONDS_PER_GENERATED_IMAGE + trained * cfg.steps * batch * SECONDS_PER_TRAIN_IMAGE) \
        + evals * SECONDS_PER_EVAL


# evaluation keys that do not decide a row's scores (the study sets the encoder and tasks of every row itself)
EVAL_RUNTIME_KEYS = (*RUNTIME_KEYS, "encoder", "tasks")


def run_settings(cfg: StudyConfig, row: Row) -> dict:
    """Everything besides the seed that decides a row's numbers (as JSON values): a finished run is reused only when
    its saved settings equal these."""
    evaluation = {k: v for k, v in dataclasses.asdict(cfg.eval).items() if k not in EVAL_RUNTIME_KEYS}
    settings = {"data": row.data.name if isinstance(row.data, Data) else (row.data or "-"), "data_root": str(_data_root(cfg)),
                "steps": cfg.steps if row.method else 0, "backbone": dataclasses.asdict(cfg.backbone),
                "eval": evaluation, "eval_tasks": list(cfg.eval_tasks)}
    if row.method:
        settings.update(method=row.method, groups_per_batch=row.groups_per_batch or cfg.groups_per_batch,
                        images_per_group=row.images_per_group or cfg.images_per_group, views=row.views,
                        base_lr=cfg.base_lr, warmup_steps=cfg.warmup_steps)
    return json.loads(json.dumps(settings))


def changed_settings(saved: dict, settings: dict) -> list[str]:
    """The keys in which a finished run's ``row.json`` differs from ``settings`` (``run_settings``). Runs written
    before row.json kept its settings are compared on the data and steps they recorded."""
    if "settings" not in saved:
        old = {"data": saved.get("data"), "data_root": saved.get("data_root", settings["data_root"]),
               "steps": saved.get("steps", settings["steps"])}
        return [key for key, value in old.items() if value != settings[key]]
    return sorted(key for key in {*saved["settings"], *settings} if saved["settings"].get(key) != settings.get(key))


def _set_aside(folder: Path) -> Path:
    """Rename a run folder that will be run again to ``<name>.replaced-<k>`` (kept, never overwritten)."""
    k = 1
    while folder.with_name(f"{folder.name}.replaced-{k}").exists():
        k += 1
    return folder.rename(folder.with_name(f"{folder.name}.replaced-{k}"))


def _run_one(cfg: StudyConfig, row: Row, seed: int) -> dict:
    folder = Path(cfg.out_dir) / "rows" / (row.run_as or row.name) / f"seed-{seed}"
    done, started = folder / "row.json", folder / "settings.json"
    settings = run_settings(cfg, row)
    if done.exists():
        result = json.loads(done.read_text())
        changed = changed_settings(result, settings)
        if not changed:
            if "settings" not in result:
                LOG.warning("study row %s seed %d: %s predates saved settings; reused because its data and steps match "
                            "(its encoder, batch shape and evaluation settings cannot be checked)", row.name, seed, done)
            return {**result, "row": row.name, "section": row.section, "x": row.x}
        LOG.warning("study row %s seed %d: the finished run in %s used other settings (%s); it is kept in %s and run again",
                    row.name, seed, folder, ", ".join(changed), _set_aside(folder))
    elif started.exists():  # stopped before it finished: resume it only with the settings it started with
        changed = changed_settings({"settings": json.loads(started.read_text())}, settings)
        if changed:
            LOG.warning("study row %s seed %d: the unfinished run in %s used other settings (%s); it is kept in %s and run again",
                        row.name, seed, folder, ", ".join(changed), _set_aside(folder))
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(started, settings)
    start, train_seconds = time.time(), 0.0
    if row.method is None:
        encoder = "pixels" if row.name == "raw-pixels" else f"random:{cfg.backbone.name}"
    else:
        data = f"real:{cfg.eval.dataset}" if row.data == "real" else _shards(cfg, row.data)
        tcfg = TrainConfig(data=data, out_dir=str(folder / "train"), method=row.method, backbone=dataclasses.replace(cfg.backbone),
                           steps=cfg.steps, groups_per_batch=row.groups_per_batch or cfg.groups_per_batch,
                           images_per_group=row.images_per_group or cfg.images_per_group, base_lr=cfg.base_lr,
                           warmup_steps=cfg.warmup_steps, seed=seed, num_threads=cfg.num_threads, log_every=20)
        if row.views:
            tcfg.loss.views = row.views
        t0 = time.time()
        encoder = str(train(tcfg))
        train_seconds = time.time() - t0
    scores = {}
    # tasks that label the headline dataset's images are probed on its features; other test sets get their own run
    same_images = [t for t in cfg.eval_tasks if is_labelling_of(t, cfg.eval.dataset)]
    for dataset in [cfg.eval.dataset, *(t for t in cfg.eval_tasks if t not in same_images)]:
        sub = "eval" if dataset == cfg.eval.dataset else f"eval-{dataset.replace(':', '-')}"
        ev = dataclasses.replace(cfg.eval, encoder=encoder, dataset=dataset, out_dir=str(folder / sub), seed=seed,
                                 num_threads=cfg.num_threads, tasks=same_images if dataset == cfg.eval.dataset else [],
                                 random_backbone=dataclasses.replace(cfg.backbone, in_channels=1))
        r = evaluate(ev)
        for name, result in [(dataset, r), *r.get("tasks", {}).items()]:
            scores[name] = {"linear_top1": result.get("linear", {}).get("top1"), "knn_top1": result.get("knn", {}).get("top1")}
        if dataset == cfg.eval.dataset:
            per_class = {int(k): v for k, v in r.get("linear", {}).get("per_class_top1", {}).items()}
    result = {"row": row.name, "section": row.section, "x": row.x, "method": row.method or row.name, "seed": seed,
              "data": settings["data"], "data_root": settings["data_root"], "encoder": encoder, "scores": scores,
              "linear_top1": scores[cfg.eval.dataset]["linear_top1"], "knn_top1": scores[cfg.eval.dataset]["knn_top1"],
              "per_class_linear_top1": {str(k): v for k, v in per_class.items()},
              "train_seconds": round(train_seconds, 1), "total_seconds": round(time.time() - start, 1),
              "steps": settings["steps"], "settings": settings}
    atomic_write_json(done, result)
    return result


def _rare_labels(cfg: StudyConfig) -> list[int]:
    """The headline dataset's class labels of the study's rare concepts (the concept list's ``label`` field); none
    when the headline dataset's classes are not the concept list's (e.g. an attribute task)."""
    concepts = CaptionsConfig().concepts
    if concept_list_of(cfg.eval.dataset) != concepts:
        return []
    label_of = {c.name: c.label for c in load_concepts(concepts).concepts}
    return [label_of[c] for c in cfg.rare_concepts if label_of.get(c) is not None]


def run_study(cfg: StudyConfig) -> Path:
    rows = plan_rows(cfg)  # before anything is written: a bad plan fails at once
    root = Path(cfg.out_dir)
    root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, root)
    LOG.info("study: %d rows x %d seeds; expected about %.0f minutes on 2 CPU cores (less for what is already done)",
             len(rows), len(cfg.seeds), expected_seconds(cfg, rows) / 60)
    results: list[dict] = []
    rare_labels = _rare_labels(cfg)
    for row in rows:
        if not runs_on(cfg, row):
            LOG.warning("study row %s skipped: SynCLR's masked modelling needs a ViT backbone, not %s", row.name, cfg.backbone.name)
            continue
        for seed in cfg.seeds:
            LOG.info("study row %s, seed %d", row.name, seed)
            results.append(with_rare_mean(_run_one(cfg, row, seed), rare_labels))
    return write_study_report(root, cfg, results)


def with_rare_mean(result: dict, rare_labels: list[int]) -> dict:
    """``result`` with ``rare_linear_top1``: its linear probe's mean accuracy over ``rare_labels`` (the current
    ``rare_concepts``, so a changed list never mixes with a mean saved for another one); runs saved before per-class
    scores were kept give None."""
    per_class = result.get("per_class_linear_top1")
    rare = [per_class[str(label)] for label in rare_labels if str(label) in per_class] if per_class else []
    return {**result, "rare_linear_top1": float(np.mean(rare)) if rare else None}


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its two-sided 95% t-interval (0 for one value)."""
    xs = np.asarray([v for v in values if v is not None], dtype=float)
    if len(xs) == 0:
        return float("nan"), float("nan")
    if len(xs) == 1:
        return float(xs[0]), 0.0
    from scipy.stats import t

    return float(xs.mean()), float(t.ppf(0.975, len(xs) - 1) * xs.std(ddof=1) / math.sqrt(len(xs)))


def summarise(results: list[dict], datasets: list[str]) -> list[dict]:
    """One line per row (in first-seen order): mean and 95% half-width of each score over its seeds."""
    rows: dict[str, list[dict]] = {}
    for r in results:
        rows.setdefault(r["row"], []).append(r)
    out = []
    for name, runs in rows.items():
        line = {"row": name, "section": runs[0]["section"], "x": runs[0]["x"], "method": runs[0]["method"], "seeds": len(runs),
                "train_seconds": round(float(np.mean([r["train_seconds"] for r in runs])), 1)}
        for dataset in datasets:
            for metric in ("linear_top1", "knn_top1"):
                line[f"{dataset}|{metric}"] = interval([r["scores"].get(dataset, {}).get(metric) for r in runs])
        line["rare|linear_top1"] = interval([r.get("rare_linear_top1") for r in runs])
        out.append(line)
    return out


def paired_differences(results: list[dict], datasets: list[str], metric: str) -> list[dict]:
    """For every two trained rows of one section (in report order, ``a`` after ``b``) with two or more seeds in
    common: the per-seed difference ``a - b`` of ``metric`` on each dataset, as mean and 95% half-width over the
    shared seeds. Rows of one seed share their data and their seed's draws, so a pair's seeds are matched."""
    by_row: dict[str, dict[int, dict]] = {}
    section_of: dict[str, str] = {}
    for r in results:
        if r.get("steps"):
            by_row.setdefault(r["row"], {})[r["seed"]] = r
            section_of[r["row"]] = r["section"]
    names = list(by_row)
    out = []
    for i, a in enumerate(names):
        for b in names[:i]:
            seeds = sorted(set(by_row[a]) & set(by_row[b]))
            if section_of[a] != section_of[b] or len(seeds) < 2:
                continue
            line = {"section": section_of[a], "row": a, "minus": b, "seeds": len(seeds)}
            for dataset in datasets:
                pairs = [(by_row[a][k]["scores"].get(dataset, {}).get(metric), by_row[b][k]["scores"].get(dataset, {}).get(metric))
                         for k in seeds]
                line[dataset] = interval([x - y for x, y in pairs if x is not None and y is not None])
            out.append(line)
    return out


def _cell(value: tuple[float, float], seeds: int) -> str:
    """``mean ± half-width``; just the mean for one seed (there is no interval)."""
    mean, half = value
    return "—" if mean != mean else (f"{mean:.2f}" if seeds == 1 else f"{mean:.2f} ± {half:.2f}")


def write_study_report(root: Path, cfg: StudyConfig, results: list[dict]) -> Path:
    datasets = [cfg.eval.dataset, *cfg.eval_tasks]
    lines_by_row = summarise(results, datasets)
    batch = cfg.groups_per_batch * cfg.images_per_group
    lines = ["# synrep miniature study", "",
             f"Encoder `{cfg.backbone.name}` (patch {cfg.backbone.patch_size}) for every trained row; {cfg.steps} steps x {batch} "
             f"images per step; seeds {cfg.seeds} (mean ± 95% t-interval). Synthetic data: `{cfg.caption_backend}` captions per "
             f"concept x images from the `{cfg.generator}` generator (guidance {cfg.guidance_scale:g} unless the row says otherwise). Evaluation: frozen "
             f"features on real test images ({', '.join(datasets)}), linear probe fit on {cfg.eval.probe_train_size or 'all'} real "
             f"train images.", ""]
    summary = {}
    metric = "linear_top1" if "linear" in cfg.eval.protocols else "knn_top1"
    paired = paired_differences(results, datasets, metric)
    for section in ALL_SECTIONS:
        part = [r for r in lines_by_row if r["section"] == section]
        if not part:
            continue
        axis = section in SECTION_AXIS
        rare = section == "curation"
        header = "| row | " + (f"{SECTION_AXIS[section]} | " if axis else "") + " | ".join(
            f"{d} linear | {d} kNN" for d in datasets) + (" | rare concepts linear |" if rare else " |") + " seeds | train s |"
        lines += [f"## {section.replace('_', ' ')}", "", header, "|" + "---|" * (header.count("|") - 1)]
        for r in part:
            cells = [_cell(r[f"{d}|{m}"], r["seeds"]) for d in datasets for m in ("linear_top1", "knn_top1")]
            if rare:
                cells.append(_cell(r["rare|linear_top1"], r["seeds"]))
            lines.append(f"| {r['row']} | " + (f"{r['x']:g} | " if axis else "") + " | ".join(cells)
                         + f" | {r['seeds']} | {r['train_seconds']} |")
        png, drawn = f"study_{section}.png", False
        headline = [r[f"{cfg.eval.dataset}|{metric}"] for r in part]
        if not axis:
            scored = [(r["row"], v) for r, v in zip(part, headline) if v[0] == v[0]]
            if rare:  # the rare concepts' accuracy is what allocation should move
                scored += [(f"{r['row']} (rare)", r["rare|linear_top1"]) for r in part if r["rare|linear_top1"][0] == r["rare|linear_top1"][0]]
            if scored:
                save_bar_chart(root / png, [n for n, _ in scored], [v[0] for _, v in scored],
                               f"{section} ({cfg.backbone.name}): {metric.split('_')[0]} top-1, mean ± 95% interval", "top-1 (%)",
                               errors=[v[1] for _, v in scored])
                drawn = True
        else:
            xs = [r["x"] for r in part]
            curves = {label: [r[f"{cfg.eval.dataset}|{key}"] for r in part] for label, key in (("linear", "linear_top1"), ("kNN", "knn_top1"))}
            curves = {label: values for label, values in curves.items() if any(v[0] == v[0] for v in values)}
            drawn = bool(curves)
            if drawn:
                save_curve(root / png, {label: (xs, [v[0] for v in values]) for label, values in curves.items()},
                           title=f"{section.replace('_', ' ')}: mean ± 95% interval", xlabel=SECTION_AXIS[section], ylabel="top-1 (%)",
                           errors={label: [v[1] for v in values] for label, values in curves.items()}, logx=section == "captions")
        if drawn:
            lines += ["", f"![{section}]({png})"]
        pairs = [p for p in paired if p["section"] == section]
        if pairs:
            lines += ["", f"Paired differences (row minus the earlier row, {metric.split('_')[0]} top-1, mean ± 95% t-interval "
                      "over the seeds both ran):", "", "| row | minus | " + " | ".join(datasets) + " | seeds |",
                      "|---|---|" + "---:|" * (len(datasets) + 1)]
            lines += [f"| {p['row']} | {p['minus']} | " + " | ".join(_cell(p[d], p["seeds"]) for d in datasets)
                      + f" | {p['seeds']} |" for p in pairs]
        lines += [""]
        summary[section] = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in r.items()} for r in part]
    lines += ["Reproduce: `synrep study` (resumable; runs already done are skipped).", ""]
    atomic_write_json(root / "study.json", {"config": dataclasses.asdict(cfg), "runs": results, "summary": summary,
                                            "paired": [{k: (list(v) if isinstance(v, tuple) else v) for k, v in p.items()} for p in paired]})
    path = root / "study.md"
    atomic_write_text(path, "\n".join(lines))
    return path
