"""``synrep run``: captions -> images -> training -> evaluation -> report, from one config.

Each stage writes into its own folder of the run directory and is skipped when its outputs are
complete, so a killed run continues where it stopped (and the stages themselves resume inside).
Stages only talk through files; this module only sequences them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .captions import stage as captions_stage
from .captions.stage import CaptionsConfig, run_captions
from .config import changed_settings, config_to_dict, read_yaml, require, save_config
from .errors import SettingsChanged
from .evaluation import stage as eval_stage
from .evaluation.stage import EvalConfig, evaluate, headline
from .generate import stage as generate_stage
from .generate.stage import GenerateConfig, run_generate
from .report import write_report
from .training.export import ENCODER_FILE, encoder_dir, is_exported
from .training import loop as train_stage
from .training.loop import TrainConfig, train
from .atomic import atomic_write_json

LOG = logging.getLogger("synrep.run")


@dataclass
class RunConfig:
    out_dir: str = "runs/demo"  # run folder: captions/, shards/, train/, eval/, report.md
    baselines: list[Literal["pixels", "random"]] = field(default_factory=lambda: ["pixels", "random"])  # reference encoders evaluated beside the trained one: pixels, random
    num_threads: int = 0  # torch CPU threads for every stage (0 = each stage's own setting)
    captions: CaptionsConfig = field(default_factory=lambda: CaptionsConfig(per_concept=100))
    generate: GenerateConfig = field(default_factory=lambda: GenerateConfig(images_per_caption=4))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=1000, warmup_steps=50, groups_per_batch=64, images_per_group=4))
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(probe_train_size=20000))

    def check(self) -> None:
        """Across stages (each stage's own values are checked by its section's ``check``)."""
        require(self.num_threads >= 0, "num_threads", f"must be >= 0, got {self.num_threads}")
        if self.train.short_groups != "fewer":
            require(self.train.images_per_group <= self.generate.images_per_caption, "train.images_per_group",
                    f"{self.train.images_per_group} is more than generate.images_per_caption={self.generate.images_per_caption}")
        # The run wires its stages together; a path set by hand would be replaced without a word. Accepted: the
        # default, or what the run sets itself (a run's saved config.yaml holds those, so it loads again).
        def value(cfg: RunConfig, key: str):
            section, name = key.split(".")
            return getattr(getattr(cfg, section), name)

        defaults, wired = RunConfig(), stage_paths(self)
        for key in STAGE_PATH_KEYS:
            given, derived = value(self, key), value(wired, key)
            require(given in (value(defaults, key), derived), key,
                    f"{given!r}: synrep run sets it to {derived!r} from out_dir; set out_dir instead, or run the "
                    f"stage by itself (synrep captions / generate / train / eval)")


# Keys that stage_paths sets from out_dir (each stage reads the previous stage's outputs).
STAGE_PATH_KEYS = ("captions.out_dir", "generate.captions", "generate.out_dir", "train.data", "train.out_dir",
                   "eval.encoder", "eval.out_dir")


QUICK_OVERRIDES = [
    "out_dir=runs/quick", "captions.per_concept=50", "train.steps=400", "train.warmup_steps=20",
    "eval.probe_train_size=5000", "eval.protocols=[linear,knn]",
]


def stage_dirs(root: str | Path) -> dict[str, Path]:
    """A run folder's layout: one folder per stage (each stage owns what it writes inside its folder)."""
    root = Path(root)
    return {"captions": root / "captions", "shards": root / "shards", "train": root / "train", "eval": root / "eval"}


def stage_paths(cfg: RunConfig) -> RunConfig:
    """Point every stage at its folder inside ``out_dir`` and at the previous stage's outputs."""
    dirs = stage_dirs(cfg.out_dir)
    cap = dataclasses.replace(cfg.captions, out_dir=str(dirs["captions"]), num_threads=cfg.num_threads or cfg.captions.num_threads)
    gen = dataclasses.replace(cfg.generate, captions=str(captions_stage.outputs(dirs["captions"])["captions"]),
                              out_dir=str(dirs["shards"]), num_threads=cfg.num_threads or cfg.generate.num_threads)
    trn = dataclasses.replace(cfg.train, data=str(dirs["shards"]), out_dir=str(dirs["train"]),
                              num_threads=cfg.num_threads or cfg.train.num_threads)
    ev = dataclasses.replace(cfg.eval, encoder=str(encoder_dir(dirs["train"])), out_dir=str(dirs["eval"] / "encoder"),
                             num_threads=cfg.num_threads or cfg.eval.num_threads)
    return dataclasses.replace(cfg, captions=cap, generate=gen, train=trn, eval=ev)


def _timed(timings: dict, name: str, fn, *args):
    start = time.time()
    result = fn(*args)
    timings[name] = round(time.time() - start, 1)
    return result


def _eval_config(cfg: RunConfig, name: str, encoder: str, backbone: dict) -> EvalConfig:
    """The evaluation of encoder ``name`` (the trained one, pixels or random init of its backbone)."""
    return dataclasses.replace(cfg.eval, encoder=encoder, out_dir=str(stage_dirs(cfg.out_dir)["eval"] / name),
                               random_backbone=dataclasses.replace(cfg.train.backbone, **{k: backbone[k] for k in ("image_size", "in_channels")}))


def check_reuse(cfg: RunConfig) -> None:
    """Refuse a run whose folder holds stage outputs that this config would not make: a finished stage made with
    other settings (it would be skipped), or outputs of a stage after the first unfinished one (they were made
    from what that stage will now redo). ``cfg`` has its stage paths set (:func:`stage_paths`)."""
    chain = [("captions", Path(cfg.captions.out_dir), cfg.captions, captions_stage.RESUMABLE_CHANGES,
              captions_stage.is_complete(cfg.captions.out_dir)),
             ("images", Path(cfg.generate.out_dir), cfg.generate, (*generate_stage.RUN_ONLY_KEYS, *generate_stage.RESUMABLE_CHANGES),
              generate_stage.is_complete(cfg.generate.out_dir)),
             ("training", Path(cfg.train.out_dir), cfg.train, train_stage.RESUMABLE_CHANGES, is_exported(encoder_dir(cfg.train.out_dir)))]
    redone = None  # the first stage that will run
    for name, folder, now, may_change, complete in chain:
        if redone and folder.exists() and any(folder.iterdir()):
            raise SettingsChanged(f"{folder} holds {name} made from the {redone} that this run will make again; delete {folder} "
                                  f"and the stages after it to redo them too, or use a new out_dir")
        if complete and (folder / "config.yaml").exists():
            changed = changed_settings(read_yaml(folder / "config.yaml", f"{name} settings", SettingsChanged), config_to_dict(now), may_change)
            if changed:
                raise SettingsChanged(f"{folder} holds {name} made with other settings ({'; '.join(changed)}); they would be "
                                      f"reused as they are. Use a new out_dir, or delete {folder} and the stages after it to redo them")
        redone = redone or (None if complete else name)
    evals = stage_dirs(cfg.out_dir)["eval"]
    if redone and evals.exists() and (evals / "encoder").exists():
        raise SettingsChanged(f"{evals / 'encoder'} holds the evaluation of an encoder that this run will train again; delete it, "
                              "or use a new out_dir")
    if not redone:
        backbone = json.loads((encoder_dir(cfg.train.out_dir) / ENCODER_FILE).read_text())["backbone"]
        for name, encoder in _encoders(cfg, backbone["name"]).items():
            saved = evals / name / "config.yaml"
            if eval_stage.is_complete(evals / name) and saved.exists():
                now = _eval_config(cfg, name, encoder, backbone)
                changed = changed_settings(read_yaml(saved, "evaluation settings", SettingsChanged), config_to_dict(now),
                                           (*eval_stage.RUNTIME_KEYS, "encoder", "random_backbone"))
                if changed:
                    raise SettingsChanged(f"{evals / name} holds an evaluation made with other settings ({'; '.join(changed)}); "
                                          f"use a new out_dir, or delete {evals / name} to evaluate again")


def _encoders(cfg: RunConfig, backbone_name: str = "") -> dict[str, str]:
    """The encoders the run evaluates: its own, and the baselines it names."""
    encoders = {"encoder": str(encoder_dir(cfg.train.out_dir))}
    if "pixels" in cfg.baselines:
        encoders["pixels"] = "pixels"
    if "random" in cfg.baselines:
        encoders["random"] = f"random:{backbone_name or cfg.train.backbone.name}"
    return encoders


def run_pipeline(cfg: RunConfig) -> dict:
    cfg = stage_paths(cfg)
    root = Path(cfg.out_dir)
    check_reuse(cfg)  # before anything is written or skipped
    root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, root)
    timings_path = root / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}

    if captions_stage.is_complete(cfg.captions.out_dir):
        LOG.info("[1/4] captions: complete, skipped")
    else:
        LOG.info("[1/4] captions: %s backend, %d per concept of %s", cfg.captions.backend, cfg.captions.per_concept, cfg.captions.concepts)
        _timed(timings, "captions", run_captions, cfg.captions)
        atomic_write_json(timings_path, timings)

    if generate_stage.is_complete(cfg.generate.out_dir):
        LOG.info("[2/4] images: complete, skipped")
    else:
        LOG.info("[2/4] images: %s, %d per caption, guidance %g", cfg.generate.generator, cfg.generate.images_per_caption, cfg.generate.guidance_scale)
        _timed(timings, "generate", run_generate, cfg.generate)
        atomic_write_json(timings_path, timings)

    if is_exported(encoder_dir(cfg.train.out_dir)):
        LOG.info("[3/4] training: complete, skipped")
    else:
        LOG.info("[3/4] training: %s on %s, %d steps", cfg.train.method, cfg.train.backbone.name, cfg.train.steps)
        _timed(timings, "train", train, cfg.train)
        atomic_write_json(timings_path, timings)

    results = {}
    backbone = json.loads((encoder_dir(cfg.train.out_dir) / ENCODER_FILE).read_text())["backbone"]
    for name, encoder in _encoders(cfg, backbone["name"]).items():
        folder = stage_dirs(root)["eval"] / name
        if eval_stage.is_complete(folder):
            LOG.info("[4/4] evaluation of %s: complete, skipped", name)
            results[name] = json.loads(eval_stage.outputs(folder)["results"].read_text())
            continue
        LOG.info("[4/4] evaluation of %s on real %s test", name, cfg.eval.dataset)
        ev = _eval_config(cfg, name, encoder, backbone)
        results[name] = _timed(timings, f"eval_{name}", evaluate, ev)
        atomic_write_json(timings_path, timings)
    report = write_report(root)
    summary = {"report": str(report), "timings_s": timings, "headline": {k: headline(v) for k, v in results.items()},
               "linear_top1": {k: v["linear"]["top1"] for k, v in results.items() if "linear" in v}}
    atomic_write_json(root / "summary.json", summary)
    return summary

