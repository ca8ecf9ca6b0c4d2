"""Frozen features of one split, extracted once in a streaming pass and cached on disk (resumable).

Images stream through :class:`~synrep.streaming.SequentialImages` (decoded in data-loader workers, a chunk of
``batch_size`` images at a time) and through the encoder; each chunk's features are written as their own
float16 ``.npy`` file (temporary name, then a rename). When every chunk is there they are assembled into one
``features.npy`` that evaluation opens with ``mmap_mode="r"``, so neither the images nor the feature matrix
is ever held in memory whole. Layout of ``<cache_dir>/<split>/``:

| file | written | holds |
|---|---|---|
| ``progress.json`` | when extraction starts | the settings and the chunk size of the partial work |
| ``chunk-000012.npy`` / ``chunk-000012.labels.npy`` | per chunk (labels first) | float16 ``[b, D]`` / int64 ``[b]`` of images ``12 b ...`` |
| ``features.npy``, ``labels.npy`` | when all chunks are done | float16 ``[N, D]``, int64 ``[N]`` (chunks then removed) |
| ``manifest.json`` | last: the done-marker | settings (encoder identity, dataset, split, size, crop), count, feature_dim |

A rerun with a finished cache and the same settings loads it without opening the dataset; a killed run
resumes at the chunks not yet written; a cache made with other settings is rebuilt (with a warning naming
what changed), and partial chunks made with other settings or another chunk size are discarded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from ..errors import SynrepError
from ..sources import ArraySource, ImageFolderSource, RawGroup, Source, UnitTable
from ..streaming import SequentialImages, sequential_loader
from ..training.backbones import BackboneConfig, build_backbone
from ..training.export import ENCODER_FILE, WEIGHTS_FILE, EncoderError, load_encoder
from ..training.methods import normalize_images
from ..atomic import atomic_file, atomic_write_json
from ..utils import sha256_arrays
from .probes import ProbeError

LOG = logging.getLogger("synrep.eval")
CACHE_FORMAT = 1
MANIFEST, PROGRESS, FEATURES, LABELS = "manifest.json", "progress.json", "features.npy", "labels.npy"
CHUNK_RE = re.compile(r"^chunk-(\d+)\.npy$")
_OWN_FILES = re.compile(r"^(\.?chunk-\d+(\.labels)?\.npy(\.tmp\d*)?|\.?(features|labels)\.npy(\.tmp\d*)?|\.?(manifest|progress)\.json(\.tmp\d*)?)$")


class FeatureCacheError(SynrepError, RuntimeError):
    """A feature cache cannot be written or read back; the message names the file."""


# --- encoders ---------------------------------------------------------------------------------------------

@dataclass
class FeatureEncoder:
    """What turns uint8 images ``[b, size, size, channels]`` into features, and what identifies it in a cache."""

    spec: str
    size: int
    channels: int
    identity: dict  # compared with a cache's settings
    info: dict = field(default_factory=dict)  # recorded, not compared (e.g. the folder's path)
    build: Callable[[], torch.nn.Module | None] = field(default=lambda: None, repr=False)  # None: raw pixels


def file_sha256(path: Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            h.update(chunk)
    return h.hexdigest()


def resolve_encoder(spec: str, random_backbone: BackboneConfig, seed: int,
                    stored_shape: Callable[[], tuple[int, int, int] | None]) -> FeatureEncoder:
    """``spec`` is an exported encoder folder, ``random:<backbone>`` or ``pixels``.

    ``random:`` takes its image size and channels from ``random_backbone``; ``pixels`` takes the dataset's stored
    shape (``stored_shape()``, called only for pixels) or, for data of mixed sizes, ``random_backbone``'s size.
    """
    if spec == "pixels":
        shape = stored_shape()
        size, channels = (shape[0], shape[2]) if shape and shape[0] == shape[1] else (random_backbone.image_size, random_backbone.in_channels)
        return FeatureEncoder(spec, int(size), int(channels), {"kind": "pixels"})
    if spec.startswith("random:"):
        cfg = replace(random_backbone, name=spec.split(":", 1)[1])

        def build() -> torch.nn.Module:
            torch.manual_seed(seed)
            return build_backbone(cfg)
        return FeatureEncoder(spec, cfg.image_size, cfg.in_channels, {"kind": "random", "backbone": asdict(cfg), "seed": seed}, build=build)
    path = Path(spec)
    folder = path.parent if path.is_file() else path
    meta_path, weights = folder / ENCODER_FILE, folder / WEIGHTS_FILE
    if not meta_path.is_file() or not weights.is_file():
        raise EncoderError(f"encoder {spec!r} is not pixels, random:<backbone> or an exported encoder folder "
                           f"(needs {ENCODER_FILE} and {WEIGHTS_FILE}; `synrep train` writes <out_dir>/encoder)")
    try:
        backbone = json.loads(meta_path.read_text(encoding="utf-8"))["backbone"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise EncoderError(f"{meta_path} is not a valid encoder description ({err})") from None
    identity = {"kind": "folder", "sha256": file_sha256(weights), "backbone": backbone}
    return FeatureEncoder(spec, int(backbone["image_size"]), int(backbone["in_channels"]), identity,
                          {"path": str(folder.resolve())}, build=lambda: load_encoder(folder)[0])


def dataset_identity(spec: str, given: Source | None) -> dict:
    """What names the images of a split in a cache: the dataset spec, or for data passed in memory its content hash."""
    if given is None:
        return {"spec": spec}
    if isinstance(given, ArraySource):
        return {"given": given.description, "sha256": sha256_arrays(given.images, given.labels)}
    return {"given": given.description, "units": sha256_arrays(np.asarray(given.units.names, dtype=str), given.units.counts)}


# --- stratified subsets (probe_train_size) ----------------------------------------------------------------

def stratified_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray | None:
    """Sorted positions of a stratified subset of ``size`` of ``labels`` (None: ``size`` is 0 or covers them all)."""
    if not size or size >= len(labels):
        return None
    from sklearn.model_selection import train_test_split

    try:
        keep, _ = train_test_split(np.arange(len(labels)), train_size=size, random_state=seed, stratify=labels)
    except ValueError as err:
        raise ProbeError(f"probe_train_size={size}: cannot draw a stratified subset of {len(labels)} images ({err})") from None
    return np.sort(keep)


def known_labels(source: Source) -> np.ndarray | None:
    """Every image's label when the source knows them without reading images (arrays, class folders), else None."""
    if isinstance(source, ArraySource):
        return np.asarray(source.labels, dtype=np.int64)
    if isinstance(source, ImageFolderSource):
        return np.repeat(np.arange(len(source.units.counts), dtype=np.int64), source.units.counts)
    return None


class SubsetSource(Source):
    """The images at sorted positions ``keep`` of ``base`` (same units, fewer images each); others are never decoded."""

    def __init__(self, base: Source, keep: np.ndarray):
        self.base = base
        offsets = base.units.offsets
        unit_of = np.searchsorted(offsets, keep, side="right") - 1
        self.positions = [keep[unit_of == u] - offsets[u] for u in range(len(base.units.counts))]
        self.units = UnitTable(list(base.units.names), np.asarray([len(p) for p in self.positions], dtype=np.int64))
        self.class_names, self.images_per_group, self.image_shape = base.class_names, 1, base.image_shape
        self.description = f"{base.description}, stratified subset of {len(keep)}"

    def read(self, unit: int, start: int = 0, stop: int | None = None) -> Iterator[RawGroup]:
        wanted = self.positions[unit][start:stop]
        if not len(wanted):
            return
        base_first, first = int(self.base.units.offsets[unit]), int(self.units.offsets[unit])
        j = 0
        for raw in self.base.read(unit, int(wanted[0]), int(wanted[-1]) + 1):
            if raw.group_id - base_first == wanted[j]:
                yield RawGroup(first + start + j, raw.label, raw.caption, raw.count, raw.load, raw.meta)
                j += 1
                if j == len(wanted):
                    return


# --- the cache --------------------------------------------------------------------------------------------

@dataclass
class SplitFeatures:
    """A finished cache: ``features`` float16 ``[N, D]`` memory-mapped, ``labels`` int64 ``[N]``; ``rows`` to use (None: all)."""

    folder: Path
    features: np.ndarray
    labels: np.ndarray
    manifest: dict
    reused: bool
    rows: np.ndarray | None = None
    resumed_chunks: int = 0
    seconds: float = 0.0

    def summary(self) -> dict:
        return {"path": str(self.folder), "reused": self.reused, "rows": self.manifest["settings"]["rows"],
                "resumed_chunks": self.resumed_chunks, "seconds": round(self.seconds, 1)}


def _canonical(obj: dict) -> dict:
    return json.loads(json.dumps(obj, sort_keys=True))


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {json.dumps(a)} -> {json.dumps(b)}")
    return out


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        LOG.warning("%s is not valid JSON (cut by a kill?); ignoring it", path)
        return None


def _clear(folder: Path) -> None:
    """Remove this module's files from ``folder`` (and nothing else)."""
    for entry in os.scandir(folder):
        if entry.is_file() and _OWN_FILES.match(entry.name):
            os.unlink(entry.path)


def _chunk_path(folder: Path, chunk: int, labels: bool = False) -> Path:
    return folder / (f"chunk-{chunk:06d}.labels.npy" if labels else f"chunk-{chunk:06d}.npy")


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_file(path) as fh:
        np.save(fh, array)


def _done_chunks(folder: Path) -> set[int]:
    """Chunks whose features (the chunk's marker) and labels are both on disk; temporary files of a killed run go."""
    done = set()
    for entry in os.scandir(folder):
        if entry.name.startswith(".") and _OWN_FILES.match(entry.name):
            os.unlink(entry.path)
            continue
        m = CHUNK_RE.match(entry.name)
        if m and _chunk_path(folder, int(m.group(1)), labels=True).exists():
            done.add(int(m.group(1)))
    return done


def _open_finished(folder: Path, manifest: dict) -> tuple[np.ndarray, np.ndarray]:
    try:
        feats = np.load(folder / FEATURES, mmap_mode="r")
        labels = np.load(folder / LABELS)
    except (OSError, ValueError) as err:
        raise FeatureCacheError(f"feature cache {folder} is damaged ({err}); delete {folder / MANIFEST} to rebuild it") from None
    if feats.shape != (manifest["count"], manifest["feature_dim"]) or labels.shape != (manifest["count"],):
        raise FeatureCacheError(f"feature cache {folder}: {FEATURES} {feats.shape} / {LABELS} {labels.shape} disagree with "
                                f"{MANIFEST} (count {manifest['count']}, feature_dim {manifest['feature_dim']}); "
                                f"delete {folder / MANIFEST} to rebuild it")
    return feats, labels


def split_features(folder: str | Path, encoder: FeatureEncoder, dataset: dict, split: str,
                   open_source: Callable[[], Source], crop_fraction: float = 0.875, batch_size: int = 512,
                   num_workers: int = 2, device: str | torch.device = "cpu", subset: tuple[int, int] | None = None) -> SplitFeatures:
    """The features of ``split`` under ``encoder``: loaded from ``folder`` when finished there, else extracted (resuming).

    ``subset = (size, seed)`` asks for a stratified subset of the split: a finished cache of the whole split
    serves it by row selection; otherwise, when the source knows its labels without reading images, only
    the subset's images are encoded (and cached as such), else the whole split is.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = {"format": CACHE_FORMAT, "encoder": encoder.identity, "dataset": dataset, "split": split,
            "size": encoder.size, "channels": encoder.channels, "crop_fraction": crop_fraction}
    whole = _canonical({**base, "rows": "all"})
    part = _canonical({**base, "rows": {"stratified_subset": subset[0], "seed": subset[1]}}) if subset and subset[0] else None
    start = time.time()
    manifest = _read_json(folder / MANIFEST)
    if manifest is not None:
        got = manifest.get("settings")
        if got in (whole, part):
            feats, labels = _open_finished(folder, manifest)
            rows = stratified_subset(labels, *subset) if part and got == whole else None
            LOG.info("%s features: reusing the finished cache %s (%d x %d%s)", split, folder, *feats.shape,
                     f", {len(rows)} rows of it" if rows is not None else "")
            return SplitFeatures(folder, feats, labels, manifest, reused=True, rows=rows, seconds=time.time() - start)
        changed = _differences(got or {}, part or whole)
        LOG.warning("feature cache %s was made with different settings (%s); rebuilding it", folder, "; ".join(changed[:6]))
        _clear(folder)

    source = open_source()
    settings = whole
    if part:
        labels = known_labels(source)
        keep = stratified_subset(labels, *subset) if labels is not None else None
        if keep is not None:
            settings, source = part, SubsetSource(source, keep)
    count = len(source)
    progress = _canonical({"settings": settings, "chunk_size": batch_size, "count": count})
    before = _read_json(folder / PROGRESS)
    done = _done_chunks(folder)
    if before != progress and (before is not None or done):
        changed = _differences(before or {}, progress) if before else ["no progress.json"]
        LOG.warning("feature cache %s: discarding %d partial chunk(s) made with different settings (%s)", folder, len(done),
                    "; ".join(changed[:6]))
        _clear(folder)
        done = set()
    if before != progress:
        atomic_write_json(folder / PROGRESS, progress)
    num_chunks = math.ceil(count / batch_size)
    done = {c for c in done if c < num_chunks}
    if done:
        LOG.info("%s features: resuming %s, %d of %d chunks already written", split, folder, len(done), num_chunks)
    if len(done) < num_chunks:
        _extract(source, encoder, folder, split, batch_size, crop_fraction, num_workers, torch.device(device), done)
    manifest = _assemble(folder, settings, encoder, count, num_chunks, batch_size, time.time() - start)
    feats, labels = _open_finished(folder, manifest)
    rows = stratified_subset(labels, *subset) if part and settings == whole else None
    return SplitFeatures(folder, feats, labels, manifest, reused=False, rows=rows, resumed_chunks=len(done),
                         seconds=time.time() - start)


@torch.no_grad()
def encode_batch(model: torch.nn.Module | None, images: torch.Tensor, device: torch.device) -> np.ndarray:
    """uint8 ``[b, H, W, C]`` -> float16 ``[b, D]`` (``model`` None: raw pixels in [0, 1])."""
    if model is None:
        return images.reshape(len(images), -1).float().div_(255.0).numpy().astype(np.float16)
    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        feats = model(normalize_images(x))
    return feats.float().cpu().numpy().astype(np.float16)


def _write_chunk(folder: Path, chunk: int, feats: np.ndarray, labels: np.ndarray) -> None:
    _save_npy(_chunk_path(folder, chunk, labels=True), labels)
    _save_npy(_chunk_path(folder, chunk), feats)  # the chunk's done-marker: written last


def _extract(source: Source, encoder: FeatureEncoder, folder: Path, split: str, batch_size: int, crop_fraction: float,
             num_workers: int, device: torch.device, done: set[int]) -> None:
    model = encoder.build()
    if model is not None:
        model = model.to(device).eval()
    dataset = SequentialImages(source, encoder.size, encoder.channels, batch_size, crop_fraction,
                               skip_chunks=frozenset(done).__contains__)
    remaining = dataset.num_chunks - len(done)
    loader = sequential_loader(dataset, min(num_workers, remaining), pin_memory=device.type == "cuda" and model is not None)
    LOG.info("%s features: %s on %s, %d images in %d chunks of %d", split, encoder.spec, source.description,
             len(source), remaining, batch_size)
    for item in tqdm(loader, total=remaining, desc=f"{split} features", unit="chunk", leave=False, dynamic_ncols=True):
        feats = encode_batch(model, item["images"], device)
        if not np.isfinite(feats).all():
            raise FeatureCacheError(f"encoder {encoder.spec}: features of {split} chunk {int(item['chunk'])} are not finite "
                                    "in float16 (|value| > 65504 or NaN)")
        _write_chunk(folder, int(item["chunk"]), feats, item["labels"].numpy())


def _assemble(folder: Path, settings: dict, encoder: FeatureEncoder, count: int, num_chunks: int, batch_size: int,
              seconds: float) -> dict:
    """Chunks -> ``features.npy`` + ``labels.npy``, then ``manifest.json`` (last), then the chunks are removed."""
    dim = None
    labels = np.empty(count, dtype=np.int64)
    with atomic_file(folder / FEATURES) as out:  # plain sequential writes: a writable mapping would keep every page resident
        for chunk in range(num_chunks):
            path = _chunk_path(folder, chunk)
            begin, end = chunk * batch_size, min(count, (chunk + 1) * batch_size)
            try:
                feats = np.load(path)
                chunk_labels = np.load(_chunk_path(folder, chunk, labels=True))
            except (OSError, ValueError) as err:
                raise FeatureCacheError(f"feature chunk {path} is missing or unreadable ({err}); rerun to extract it again") from None
            if dim is None:
                dim = int(feats.shape[1])
                np.lib.format.write_array_header_1_0(out, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)),
                                                           "fortran_order": False, "shape": (count, dim)})
            if feats.shape != (end - begin, dim) or chunk_labels.shape != (end - begin,):
                path.unlink()
                raise FeatureCacheError(f"feature chunk {path} holds {feats.shape} features / {chunk_labels.shape} labels, "
                                        f"expected ({end - begin}, {dim}); it was removed, rerun to extract it again")
            out.write(np.ascontiguousarray(feats, dtype=np.float16).tobytes())
            labels[begin:end] = chunk_labels
    _save_npy(folder / LABELS, labels)
    manifest = {"settings": settings, "count": count, "feature_dim": dim, "dtype": "float16",
                "encoder": encoder.spec, "encoder_info": encoder.info, "dataset": settings["dataset"], "split": settings["split"],
                "rows": settings["rows"], "size": encoder.size, "crop_fraction": settings["crop_fraction"],
                "seconds": round(seconds, 1)}
    atomic_write_json(folder / MANIFEST, manifest)
    for chunk in range(num_chunks):
        _chunk_path(folder, chunk).unlink(missing_ok=True)
        _chunk_path(folder, chunk, labels=True).unlink(missing_ok=True)
    (folder / PROGRESS).unlink(missing_ok=True)
    return manifest
