"""``synrep audit``: judge a generated shard folder before training on it.

Four parts, each in its own module: caption-image agreement (:mod:`.agreement`, with the scorers of
:mod:`.scorers`), balance and bias (:mod:`.balance`), memorization (:mod:`.memorization`) and diversity
(:mod:`.diversity`). This module holds the config and the orchestration:

1. check everything that can be checked before any work (config values, the shard folder and its
   provenance, the scorer), so bad input fails with one message and nothing written;
2. the reference classifier (:mod:`.classifier`, cached) and the real-test reference distances (cached);
3. one streaming pass over the shards, group by group, in batches of ``batch_size`` images; each shard's
   result goes to ``<out_dir>/cache/<settings>/shard-XXXXX-<sha>.npz`` (:mod:`.parts`), so a killed audit
   resumes at the next unfinished shard;
4. a merge of the per-shard parts into the report (:mod:`.report`), and ``audit.json`` written last.

A rerun with the same settings on the same shards returns the finished ``audit.json`` without work.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm import tqdm

from ..config import check_config, config_to_dict, require
from ..datasets import DatasetError, load_dataset
from ..errors import SynrepError
from ..shards import ShardError
from ..sources import ShardSource, SourceError, convert_channels, fit_image
from ..atomic import atomic_write_json
from ..utils import bound_heap_growth, set_threads
from .agreement import AgreementTotals, lowest_rows
from .balance import BalanceTotals, balance_section, requested_mix
from .classifier import ClassifierSpec, LoadedClassifier, embed_images, load_or_train
from .diversity import ConceptSample, DiversityTotals, class_sample_rows, pairwise_feature, pairwise_pixel, sample_hash
from .memorization import MemorizationTotals, NearestNeighbours, PixelNeighbours, copy_threshold
from .parts import load_part, part_name, save_part
from .scorers import ScoreBatch, Scorer, ScorerContext, check_scorer_spec, make_scorer

LOG = logging.getLogger("synrep.audit")
AUDIT_FORMAT = "synrep-audit-v1"
DONE_FILE = "audit.json"
DISPLAY_MAX = 96


class AuditError(SynrepError, ValueError):
    """The audit cannot run on this input: not a shard folder, no provenance, unmapped concepts..."""


@dataclass
class AuditConfig:
    data: str = "runs/shards"  # shard folder to audit (written by `synrep generate`; needs index.json and per-group provenance)
    out_dir: str = "runs/audit"  # where audit.md, the PNGs and audit.json (written last) go, plus cache/ for resuming
    scorer: str = "classifier"  # agreement scorer: classifier (trained on the real train split), clip:<folder>, or a CLIP model folder
    dataset: str = "fashion-mnist"  # the generator's real training data: train split = classifier + copy search, test split = reference
    concepts: str = "fashion-mnist"  # concept list mapping caption concepts to the dataset's classes ('' = match class names only)
    classifier_dir: str = ""  # cache folder for the trained reference classifier ('' = <out_dir>/classifier)
    classifier_train_size: int = 20000  # real train images the classifier learns from, a seeded random subset (0 = all)
    classifier_epochs: int = 2  # classifier training epochs over those images
    classifier_width: int = 16  # channels of the classifier's first conv layer (its second has twice as many)
    classifier_backgrounds: Literal["clean", "noisy"] = "clean"  # noisy: trained with half its images on grey, noisy backgrounds (for generators that draw them, e.g. embedded-world)
    agreement_threshold: float = 0.5  # flag an image as a caption mismatch when its agreement score is below this (in [0, 1])
    copy_quantile: float = 0.01  # near-copy threshold = this quantile of real-test -> train nearest distances (in [0, 1])
    copy_threshold: float = 0.0  # a fixed near-copy RMS pixel distance in [0, 1] instead (0 = use copy_quantile)
    reference_test_size: int = 2000  # real test images whose nearest-train distances form the reference (0 = all)
    concept_mix: dict[str, float] = field(default_factory=dict)  # requested concept weights, e.g. {bag: 2, coat: 1} (empty = uniform)
    template_mix: dict[str, float] = field(default_factory=dict)  # requested template weights (empty = the captions run's mix, else uniform)
    diversity_sample: int = 64  # images per concept for the within-concept spread (and real test images per class)
    grid_size: int = 24  # images in the worst-agreement grid and pairs in the closest-pairs grid
    list_limit: int = 200  # flagged images listed per part in audit.json (counts are always complete)
    top: int = 5  # most over- and under-represented categories listed per kind
    batch_size: int = 512  # images judged per batch (memory is bounded by this, nn_chunk and one caption group)
    nn_chunk: int = 8192  # train images per block of the exact nearest-neighbour search
    nn_rank: int = 128  # principal directions of the pixel search's lower bound (only speed; 0 = compare every pixel pair)
    device: str = "auto"  # auto, cpu, cuda or cuda:N
    seed: int = 0  # seeds the classifier and the real reference samples
    num_threads: int = 0  # torch CPU threads (0 = torch's default)

    def check(self) -> None:
        require(bool(self.data), "data", "is empty; give a shard folder written by `synrep generate`")
        require(bool(self.out_dir), "out_dir", "is empty; give a folder for the report")
        require(bool(self.scorer), "scorer", "is empty; choose classifier, clip:<folder>, or a CLIP model folder")
        for key in ("agreement_threshold", "copy_quantile", "copy_threshold"):
            value = getattr(self, key)
            require(math.isfinite(value) and 0.0 <= value <= 1.0, key, f"must be in [0, 1], got {value}")
        for key in ("classifier_epochs", "classifier_width", "diversity_sample", "grid_size", "batch_size", "nn_chunk", "top"):
            require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        for key in ("classifier_train_size", "reference_test_size", "list_limit", "num_threads", "nn_rank"):
            require(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        for key in ("concept_mix", "template_mix"):
            mix = getattr(self, key)
            ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0 for v in mix.values())
            require(ok and (not mix or sum(mix.values()) > 0), key,
                    f"must map names to non-negative numbers, not all 0 (empty = the default mix), got {mix}")
        require(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"), "device",
                f"{self.device!r} is not allowed; choose auto, cpu, cuda or cuda:N")


def outputs(out_dir: str | Path) -> dict[str, Path]:
    """What the audit writes in ``out_dir``; ``done`` (audit.json) is written last."""
    out = Path(out_dir)
    return {"report": out / "audit.md", "done": out / DONE_FILE, "config": out / "config.yaml", "cache": out / "cache"}


# --- checks before any work -------------------------------------------------------------------------------

def open_shards(data: str) -> tuple[ShardSource, list[dict]]:
    """The shard folder as a source plus its index's shard stats; AuditError when it is not a provenance-carrying one."""
    folder = Path(data)
    try:
        source = ShardSource(folder)
    except (SourceError, ShardError) as err:
        raise AuditError(f"data={data} is not a synrep shard folder: {err}") from None
    index = json.loads((folder / "index.json").read_text())
    stats = {s["shard"]: s for s in index.get("shards", [])}
    shard_stats = [stats[Path(name).name] for name in source.units.names]
    first = Path(source.units.names[0])
    try:
        group = next(iter(source.read(0, 0, 1)), None)
    except ShardError as err:
        raise AuditError(f"data={data}: {err}") from None
    if group is None:
        raise AuditError(f"data={data}: {first} holds no caption groups")
    check_provenance(group.meta, first)
    return source, shard_stats


def check_provenance(meta: dict, shard: Path) -> None:
    missing = [k for k in ("caption", "concept") if not str(meta.get(k) or "").strip()]
    if missing:
        raise AuditError(f"{shard}: sample {meta.get('key', '?')} has no provenance {' or '.join(repr(m) for m in missing)} "
                         "in its JSON; the audit needs shards written by `synrep generate` from a captions file with concepts")


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def concept_labels(spec: str, class_names: list[str], observed: list[str]) -> tuple[dict[str, int | None], list[str]]:
    """Each observed concept's class index in the dataset (None: no class), and the concept list's names.

    A concept maps through the list's ``label`` field, else by its name or a synonym matching a class name
    (``t-shirt/top`` matches ``t-shirt`` and ``top``)."""
    listed: dict[str, int | None] = {}
    synonyms: dict[str, int] = {}
    if spec:
        from ..captions.concepts import ConceptError, load_concepts

        try:
            clist = load_concepts(spec)
        except ConceptError as err:
            raise AuditError(f"config key 'concepts': {err}") from None
        for c in clist.concepts:
            label = c.label if isinstance(c.label, int) and 0 <= c.label < len(class_names) else None
            listed[c.name] = label
            if label is not None:
                for word in c.mentions:
                    synonyms.setdefault(word, label)
    by_name: dict[str, int] = {}
    for i, name in enumerate(class_names):
        for part in [name, *name.split("/")]:
            by_name.setdefault(part.strip().lower(), i)
    out = {}
    for c in observed:
        label = listed.get(c)
        if label is None:
            label = by_name.get(c.lower(), synonyms.get(c.lower()))
        out[c] = label
    return out, list(listed)


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def settings_of(cfg: AuditConfig) -> dict:
    """The settings that identify an audit's results (not where it is written or how fast it runs)."""
    d = config_to_dict(cfg)
    for key in ("out_dir", "num_threads", "batch_size", "nn_chunk", "nn_rank", "device", "classifier_dir"):
        d.pop(key)
    d["data"] = str(Path(cfg.data).resolve())
    if d["classifier_backgrounds"] == "clean":  # the default, left out so that audits from before the key still resume
        d.pop("classifier_backgrounds")
    return d


def cache_key(cfg: AuditConfig) -> str:
    """Settings that change a per-shard part (not thresholds, mixes or list lengths: those act at the merge)."""
    s = settings_of(cfg)
    keys = ("data", "scorer", "dataset", "concepts", "classifier_train_size", "classifier_epochs", "classifier_width",
            "classifier_backgrounds", "seed", "grid_size", "diversity_sample")
    return _hash({k: s[k] for k in keys if k in s})[:16]


# --- the run ----------------------------------------------------------------------------------------------

def run_audit(cfg: AuditConfig) -> dict:
    """Audit ``cfg.data`` into ``cfg.out_dir``; returns the contents of ``audit.json``."""
    check_config(cfg)
    start = time.time()
    set_threads(cfg.num_threads)
    bound_heap_growth()  # batches of equal size are streamed: freed ones must go back to the OS
    source, shard_stats = open_shards(cfg.data)
    check_scorer_spec(cfg.scorer)
    out = Path(cfg.out_dir)
    fingerprint = _hash({"format": AUDIT_FORMAT, "settings": settings_of(cfg),
                         "shards": [(s["shard"], s.get("sha256"), s.get("bytes")) for s in shard_stats]})
    done = outputs(out)["done"]
    finished = _finished(done, fingerprint)
    if finished is not None:
        LOG.info("audit of %s is already complete in %s (same settings and shards); delete %s to redo it", cfg.data, out, done)
        return finished

    device = resolve_device(cfg.device)
    try:
        test = load_dataset(cfg.dataset, "test")
    except DatasetError as err:
        raise AuditError(f"config key 'dataset': {err}") from None
    observed = list(source.class_names)
    label_of, listed = concept_labels(cfg.concepts, test.class_names, observed)
    concept_of_class: dict[int, str] = {}
    for c in observed:
        if label_of[c] is not None:
            concept_of_class.setdefault(label_of[c], c)
    if cfg.scorer == "classifier" and all(v is None for v in label_of.values()):
        raise AuditError(f"no concept of {cfg.data} ({', '.join(observed[:8])}) maps to a class of {cfg.dataset} "
                         f"({', '.join(test.class_names[:10])}) through concepts={cfg.concepts!r}: the classifier scorer cannot "
                         "judge them (give the concept list with 'label' fields, or scorer=clip:<folder>)")
    unmapped = [c for c, v in label_of.items() if v is None]
    if unmapped:
        LOG.warning("%d concept(s) map to no class of %s and get no classifier score: %s", len(unmapped), cfg.dataset,
                    ", ".join(unmapped[:10]))
    expected_concepts = sorted(set(observed) | (set(listed) if set(observed) <= set(listed) else set()))
    scorer = make_scorer(cfg.scorer, ScorerContext(expected_concepts, label_of, device))

    cache = outputs(out)["cache"] / cache_key(cfg)
    cache.mkdir(parents=True, exist_ok=True)
    classifier = load_or_train(ClassifierSpec(cfg.dataset, cfg.classifier_train_size, cfg.classifier_epochs,
                                              cfg.classifier_width, cfg.seed, cfg.classifier_backgrounds),
                               cfg.classifier_dir or out / "classifier", device)
    via = stored_shape(source.image_shape, classifier.image_shape)
    bank = classifier.train.images if via is None else roundtrip(classifier.train.images, via, "train images")
    pixel_nn = PixelNeighbours(bank, cfg.nn_chunk, device, rank=cfg.nn_rank, seed=cfg.seed)
    feature_nn = NearestNeighbours(classifier.train_features, cfg.nn_chunk, device)
    reference = real_reference(cfg, classifier, test, pixel_nn, feature_nn, cache, device, scorer, concept_of_class, via)

    shape = source.image_shape
    display = (min(DISPLAY_MAX, shape[0]) if shape else 64, 1 if shape and shape[2] == 1 else 3)
    pending = [u for u in range(len(source.units.names)) if load_part(cache / _part(source, shard_stats, u)) is None]
    if pending:
        bar = tqdm(total=int(sum(source.units.counts[u] for u in pending)), desc="audit", unit="group", dynamic_ncols=True)
        for u in pending:
            arrays = audit_shard(source, u, cfg, classifier, scorer, pixel_nn, feature_nn, display, device, bar)
            save_part(cache / _part(source, shard_stats, u), arrays)
        bar.close()
    LOG.info("audit: %d shard(s) judged now, %d reused from %s", len(pending), len(source.units.names) - len(pending), cache)

    result, figures = merge(cfg, source, shard_stats, cache, reference, label_of, concept_of_class,
                            expected_concepts, listed, test.class_names)
    result.update({"format": AUDIT_FORMAT, "fingerprint": fingerprint, "data": str(Path(cfg.data).resolve()),
                   "settings": settings_of(cfg), "scorer": scorer.describe(),
                   "classifier": {"dataset": cfg.dataset, "real_test_top1": classifier.test_top1, "folder": str(classifier.folder),
                                  "train_size": cfg.classifier_train_size or len(classifier.train),
                                  "epochs": cfg.classifier_epochs, "width": cfg.classifier_width},
                   "shards_judged_this_run": len(pending), "seconds_this_run": round(time.time() - start, 1)})
    from .report import write_report

    write_report(out, result, figures, cfg, classifier.train.images)
    atomic_write_json(done, result)
    for stale in outputs(out)["cache"].iterdir():  # parts of other settings: superseded by this finished audit
        if stale.is_dir() and stale != cache:
            shutil.rmtree(stale, ignore_errors=True)
    LOG.info("audit written to %s in %.0f s", out, time.time() - start)
    return result


def stored_shape(shard_shape: tuple | None, train_shape: tuple) -> tuple[int, int, int] | None:
    """The shape generated images are stored at, when it differs from the train images' (else None)."""
    if not shard_shape or tuple(shard_shape) == tuple(train_shape):
        return None
    return int(shard_shape[0]), int(shard_shape[1]), int(shard_shape[2])


def roundtrip(images: np.ndarray, via: tuple[int, int, int], desc: str | None = None) -> np.ndarray:
    """uint8 ``[N, h, w, c]`` images as the audit sees a copy of them stored at shape ``via``: converted and
    fitted to ``via``, then back to ``[h, w, c]`` (the resampling blur a stored copy has; JPEG loss is not modelled)."""
    h, _, c = images.shape[1:]
    out = np.empty_like(images)
    for i in tqdm(range(len(images)), desc=desc and f"audit: {desc} through {via[0]}x{via[1]}x{via[2]} and back",
                  unit="img", dynamic_ncols=True, leave=False, disable=desc is None, mininterval=1.0):
        up = fit_image(convert_channels(images[i], via[2]), via[0])
        out[i] = fit_image(convert_channels(up, c), h)
    return out


def _part(source: ShardSource, stats: list[dict], unit: int) -> str:
    s = stats[unit]
    return part_name(source.units.names[unit], str(s.get("sha256") or s.get("bytes")))


def _finished(done: Path, fingerprint: str) -> dict | None:
    try:
        result = json.loads(done.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if result.get("fingerprint") != fingerprint:
        return None
    files = [done.parent / f for f in result.get("files", [])]
    return result if files and all(f.is_file() for f in files) else None


def real_reference(cfg: AuditConfig, classifier: LoadedClassifier, test, pixel_nn: PixelNeighbours,
                   feature_nn: NearestNeighbours, cache: Path, device: str, scorer: Scorer,
                   concept_of_class: dict[int, str], via: tuple[int, int, int] | None) -> dict:
    """What real test images score: agreement with their own class's concept, nearest-train distances, per-class
    spread (cached in ``cache``). With ``via``, the test images go through the generated images' round trip
    (stored at that shape, fitted back) before the pixel search, as the train bank did."""
    key = _hash([cfg.reference_test_size, cfg.diversity_sample, cfg.seed, sorted(concept_of_class.items()), via])
    path = cache / f"reference-{key[:12]}.npz"
    if path.is_file():
        try:
            with np.load(path) as data:
                return {k: data[k] for k in data.files}
        except (OSError, ValueError, EOFError):
            LOG.warning("%s is unreadable; measuring the real reference again", path)
    rng = np.random.default_rng(cfg.seed)
    n = len(test)
    rows = np.arange(n) if cfg.reference_test_size in (0,) or cfg.reference_test_size >= n \
        else np.sort(rng.choice(n, cfg.reference_test_size, replace=False))
    pix, feat, real_score = [], [], []
    for s in tqdm(range(0, len(rows), cfg.batch_size), desc="audit reference (real test -> train)", unit="batch",
                  dynamic_ncols=True, leave=False):
        batch = rows[s:s + cfg.batch_size]
        images = test.images[batch]
        p, f = embed_images(classifier.model, images, device)
        concepts = [concept_of_class.get(int(label), "") for label in test.labels[batch]]
        real_score.append(scorer.score(ScoreBatch(list(images), concepts, p)))
        pix.append(pixel_nn.query(images if via is None else roundtrip(images, via))[0])
        feat.append(feature_nn.query(f)[0])
    classes = class_sample_rows(test.labels, cfg.diversity_sample, cfg.seed)
    labels, cpix, cfeat, csize = [], [], [], []
    for label, picked in classes.items():
        images = test.images[picked] if via is None else roundtrip(test.images[picked], via)
        _, f = embed_images(classifier.model, images, device)
        labels.append(label)
        cpix.append(pairwise_pixel(images))
        cfeat.append(pairwise_feature(f))
        csize.append(len(picked))
    ref = {"pixel": np.concatenate(pix), "feature": np.concatenate(feat), "labels": test.labels[rows].astype(np.int64),
           "real_score": np.concatenate(real_score).astype(np.float32), "class_label": np.array(labels, np.int64),
           "class_pixel": np.array(cpix), "class_feature": np.array(cfeat), "class_sample": np.array(csize, np.int64)}
    save_part(path, ref)
    return ref


def _keep_lowest(cands: list, values: np.ndarray, rows: np.ndarray, images: list[np.ndarray], k: int) -> None:
    """Add ``(value, row, image)`` for the ``k`` lowest non-NaN values of a batch to ``cands`` and keep its ``k`` lowest."""
    for i in lowest_rows(values, k):
        cands.append((float(values[i]), int(rows[i]), images[i]))
    cands.sort(key=lambda t: t[0])
    del cands[k:]


def audit_shard(source: ShardSource, unit: int, cfg: AuditConfig, classifier: LoadedClassifier, scorer: Scorer,
                pixel_nn: PixelNeighbours, feature_nn: NearestNeighbours, display: tuple[int, int], device: str, bar) -> dict:
    """Judge every image of one shard; returns its part arrays (see :mod:`.parts`)."""
    shard = Path(source.units.names[unit])
    ref_h, _, ref_c = classifier.image_shape
    raw_c = source.image_shape[2] if source.image_shape else 3
    groups: dict[str, list] = {k: [] for k in ("key", "caption_id", "concept", "template", "background", "relation",
                                                "caption", "div_pixel", "div_feature")}
    images: dict[str, list] = {k: [] for k in ("group", "j", "score", "pred", "pix_d", "pix_idx", "feat_d", "feat_idx")}
    worst: list = []
    close: list = []
    sample = ConceptSample(cfg.diversity_sample)
    buffer: dict[str, list] = {"raw": [], "fitted": [], "display": [], "group": [], "j": [], "concept": [], "hash": []}

    def flush() -> None:
        if not buffer["raw"]:
            return
        fitted = np.stack(buffer["fitted"])
        probs, feats = embed_images(classifier.model, fitted, device, batch=len(fitted))
        scores = scorer.score(ScoreBatch(buffer["raw"], buffer["concept"], probs)).astype(np.float32)
        pix_d, pix_i = pixel_nn.query(fitted)
        feat_d, feat_i = feature_nn.query(feats)
        first_row = len(images["group"])
        rows = np.arange(first_row, first_row + len(fitted))
        group_rows = np.asarray(buffer["group"])
        for g in np.unique(group_rows):  # groups are never split across batches
            members = np.flatnonzero(group_rows == g)
            groups["div_pixel"][g] = pairwise_pixel(fitted[members])
            groups["div_feature"][g] = pairwise_feature(feats[members])
        for i in range(len(fitted)):
            sample.offer(buffer["concept"][i], buffer["hash"][i], fitted[i], feats[i])
        _keep_lowest(worst, scores, rows, buffer["display"], cfg.grid_size)
        _keep_lowest(close, pix_d, rows, buffer["display"], cfg.grid_size)
        images["group"] += buffer["group"]
        images["j"] += buffer["j"]
        images["score"].append(scores)
        images["pred"].append(probs.argmax(1))
        images["pix_d"].append(pix_d)
        images["pix_idx"].append(pix_i)
        images["feat_d"].append(feat_d)
        images["feat_idx"].append(feat_i)
        for v in buffer.values():
            v.clear()

    for group in source.read(unit):
        meta = group.meta
        check_provenance(meta, shard)
        g = len(groups["key"])
        concept = str(meta["concept"])
        caption_id = int(meta.get("caption_id", group.group_id))
        for k, v in (("key", str(meta.get("key", ""))), ("caption_id", caption_id), ("concept", concept),
                     ("template", meta.get("template")), ("background", meta.get("background")),
                     ("relation", meta.get("relation")), ("caption", meta.get("caption")), ("div_pixel", np.nan),
                     ("div_feature", np.nan)):
            groups[k].append("" if v is None else v)
        for j in range(group.count):
            raw = group.load(j, raw_c)
            buffer["raw"].append(raw)
            buffer["fitted"].append(fit_image(convert_channels(raw, ref_c), ref_h))
            buffer["display"].append(fit_image(convert_channels(raw, display[1]), display[0]))
            buffer["group"].append(g)
            buffer["j"].append(j)
            buffer["concept"].append(concept)
            buffer["hash"].append(sample_hash(caption_id, j))
        if len(buffer["raw"]) >= cfg.batch_size:
            flush()
        bar.update()
    flush()

    def cat(key: str, dtype) -> np.ndarray:
        return np.concatenate(images[key]).astype(dtype) if images[key] else np.zeros(0, dtype)

    def cands(items: list) -> tuple[np.ndarray, np.ndarray]:
        if not items:
            return np.zeros(0, np.int32), np.zeros((0, display[0], display[0], display[1]), np.uint8)
        return np.array([r for _, r, _ in items], np.int32), np.stack([im for _, _, im in items])

    worst_rows, worst_images = cands(worst)
    close_rows, close_images = cands(close)
    return {"g_key": np.array(groups["key"], dtype=str), "g_caption_id": np.array(groups["caption_id"], np.int64),
            **{f"g_{k}": np.array([str(x) for x in groups[k]], dtype=str) for k in ("concept", "template", "background", "relation", "caption")},
            "g_div_pixel": np.array(groups["div_pixel"], np.float32), "g_div_feature": np.array(groups["div_feature"], np.float32),
            "i_group": np.array(images["group"], np.int32), "i_j": np.array(images["j"], np.int16),
            "i_score": cat("score", np.float32), "i_pred": cat("pred", np.int16), "i_pix_d": cat("pix_d", np.float32),
            "i_pix_idx": cat("pix_idx", np.int64), "i_feat_d": cat("feat_d", np.float32), "i_feat_idx": cat("feat_idx", np.int64),
            "worst_rows": worst_rows, "worst_images": worst_images, "close_rows": close_rows, "close_images": close_images,
            **sample.to_arrays()}


def merge(cfg: AuditConfig, source: ShardSource, shard_stats: list[dict], cache: Path, reference: dict, label_of: dict,
          concept_of_class: dict[int, str], expected_concepts: list[str], listed: list[str],
          class_names: list[str]) -> tuple[dict, dict]:
    """Stream every shard's part into the four parts' totals; returns the numbers for audit.json and, apart,
    what only the figures need (histograms, the bounded candidate images, the real reference distances)."""
    pixel_t = copy_threshold(reference["pixel"], cfg.copy_quantile, cfg.copy_threshold)
    feature_t = copy_threshold(reference["feature"], cfg.copy_quantile, 0.0)
    agreement = AgreementTotals(cfg.agreement_threshold, cfg.list_limit, cfg.grid_size, class_names, concept_of_class)
    memo = MemorizationTotals(pixel_t, feature_t, cfg.list_limit, cfg.grid_size)
    diversity = DiversityTotals(cfg.diversity_sample, cfg.list_limit)
    balance = BalanceTotals(agreement.predicted_name)
    groups = images = 0
    for u, name in enumerate(source.units.names):
        part = load_part(cache / _part(source, shard_stats, u))
        if part is None:
            raise AuditError(f"the audit of {name} vanished from {cache} while merging; run the audit again")
        shard = Path(name).name
        for totals in (agreement, memo, diversity, balance):
            totals.add(part, shard)
        groups += len(part["g_key"])
        images += len(part["i_group"])
    mix = requested_mix(Path(cfg.data), cfg.concept_mix, cfg.template_mix, list(source.class_names), listed)
    from ..captions.concepts import RELATIONS

    real_spread = {}
    for label, p, f, n in zip(reference["class_label"], reference["class_pixel"], reference["class_feature"], reference["class_sample"]):
        for c, lab in label_of.items():
            if lab == int(label):
                real_spread[c] = {"pixel": float(p), "feature": float(f), "sample": int(n)}
    agreement_result = agreement.result()
    for c, v in agreement_result["per_concept"].items():  # the same score on real test images of the concept's class
        real = reference["real_score"][reference["labels"] == label_of[c]] if label_of.get(c) is not None else np.zeros(0)
        real = real[~np.isnan(real)]
        v["real_test_mean"] = float(np.mean(real)) if len(real) else None
        v["real_test_below_fraction"] = float(np.mean(real < cfg.agreement_threshold)) if len(real) else None
    real = reference["real_score"][~np.isnan(reference["real_score"])]
    agreement_result["real_test_mean"] = float(np.mean(real)) if len(real) else None
    agreement_result["real_test_below_fraction"] = float(np.mean(real < cfg.agreement_threshold)) if len(real) else None
    result = {"shards": len(source.units.names), "skipped_shards": list(source.skipped_shards), "groups": groups, "images": images,
              "expected_concepts": expected_concepts,
              "concept_classes": {c: (class_names[v] if v is not None else None) for c, v in label_of.items()},
              "agreement": agreement_result,
              "balance": balance_section(balance.counts, mix, balance.predicted, balance.caption_images, RELATIONS, cfg.top),
              "memorization": memo.result(reference["pixel"], reference["feature"], cfg.copy_quantile, cfg.copy_threshold),
              "diversity": diversity.result(real_spread)}
    figures = {"agreement_hist": agreement.hist, "worst": agreement.worst, "closest": memo.closest,
               "pixel_hist": memo.pixel_hist, "feature_hist": memo.feature_hist,
               "reference_pixel": reference["pixel"], "reference_feature": reference["feature"]}
    return result, figures


def headline(result: dict, out_dir: str | Path) -> str:
    """One short summary of a finished audit for the command line."""
    a, m, b = result["agreement"], result["memorization"], result["balance"]["concepts"]
    mean = f"{a['mean']:.3f}" if a["mean"] is not None else "n/a"
    return (f"{Path(out_dir) / 'audit.md'}: {result['images']} images; agreement mean {mean}, {a['flagged']} flagged; "
            f"concept balance p={b['p_value']:.3g}; {m['near_copies']} near-copies; "
            f"within-caption spread {result['diversity']['within_caption_pixel'] or float('nan'):.3f}")
