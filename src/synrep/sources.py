"""Where images come from: one registry of data sources, all read as streams of groups.

A *source* is a sequence of *units* (a tar shard, a class folder, a chunk of an in-memory array), each
holding a known number of *groups* (a caption's images, or one labelled real image). Only the unit list
and counts are held in memory; groups are read unit by unit, from position ``start`` to ``stop``, and
their images decoded only when a consumer asks (``RawGroup.decode``), so skipping groups is cheap.

| spec | kind | groups |
|---|---|---|
| ``<folder>`` (with ``index.json``) | synrep shards | a caption and its n images (provenance in ``meta``) |
| ``wds:<folder>`` | labelled WebDataset tars | one image with its ``cls`` label (``<folder>/<split>/*.tar`` when split folders exist) |
| ``imagefolder:<root>`` | ``<root>/<split>/<class>/<image>`` | one image, label = class folder (ImageNet layout) |
| ``fashion-mnist``, ``fashion-mnist:<dir>``, ``mnist`` | in-memory arrays shipped in packages | one image, its label |

Global group ids are ``unit offset + position`` (int64); image ``j`` of group ``g`` has id ``g * 1024 + j``.
"""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Iterator

import numpy as np

from .datasets import IMAGE_SUFFIXES, DatasetError, load_dataset
from .shards import IMAGE_EXTS, INDEX_FILE, ShardError, iter_tar_samples

LOG = logging.getLogger("synrep.sources")
MAX_IMAGES_PER_GROUP = 1024
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class SourceError(DatasetError):
    """A data source is missing, empty or malformed; the message names the file or value."""


def image_id(group_id: int, j: int) -> int:
    return group_id * MAX_IMAGES_PER_GROUP + j


# --- decoding and fitting ---------------------------------------------------------------------------------

def decode_bytes(data: bytes, channels: int) -> np.ndarray:
    """Encoded image bytes -> uint8 ``[H, W, channels]`` (channels 1 = grayscale, 3 = RGB)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.draft("RGB" if channels == 3 else "L", None)  # JPEG: decode no larger than needed
        arr = np.asarray(im.convert("RGB" if channels == 3 else "L"))
    return arr if channels == 3 else arr[..., None]


def convert_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """uint8 ``[H, W, C]`` to ``channels`` (gray -> RGB repeats; RGB -> gray by luminance)."""
    if image.shape[-1] == channels:
        return image
    if channels == 3:
        return np.repeat(image, 3, axis=-1)
    gray = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return np.clip(np.rint(gray), 0, 255).astype(np.uint8)[..., None]


def fit_image(image: np.ndarray, size: int, crop_fraction: float = 1.0) -> np.ndarray:
    """uint8 ``[H, W, C]`` -> ``[size, size, C]``: resize the shorter side to ``size / crop_fraction``, centre crop.

    ``crop_fraction`` 1.0 is the training load (keep the whole shorter side); 0.875 is the usual evaluation
    transform (resize 256, centre crop 224). An image already ``size`` x ``size`` is returned unchanged.
    """
    h, w = image.shape[:2]
    if h == size and w == size:
        return image
    from PIL import Image

    short = max(size, int(round(size / crop_fraction)))
    scale = short / min(h, w)
    nh, nw = max(short, int(round(h * scale))), max(short, int(round(w * scale)))
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    pil = pil.resize((nw, nh), Image.BICUBIC if scale > 1 else Image.BILINEAR, reducing_gap=None if scale > 1 else 2.0)
    top, left = (nh - size) // 2, (nw - size) // 2
    arr = np.asarray(pil)[top:top + size, left:left + size]
    return arr[..., None] if arr.ndim == 2 else arr


# --- groups and units -------------------------------------------------------------------------------------

@dataclass
class RawGroup:
    """One group as read: ``count`` images not yet decoded (``load(j)`` decodes image j to uint8 ``[H, W, C]``)."""

    group_id: int
    label: int
    caption: str
    count: int
    load: Callable[[int, int], np.ndarray] = field(repr=False)  # (j, channels) -> uint8 [H, W, C]
    meta: dict = field(default_factory=dict)


@dataclass
class UnitTable:
    """Unit names and group counts; ``offsets[u]`` is the global id of unit u's first group."""

    names: list[str]
    counts: np.ndarray  # int64 [U]

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)

    @property
    def total(self) -> int:
        return int(self.counts.sum())


class Source:
    """Base class: a kind of data source. Subclasses declare ``prefix`` and are found by :func:`open_source`."""

    prefix: ClassVar[str] = ""
    captioned: ClassVar[bool] = False  # groups carry captions (StableRep+ can use them)
    units: UnitTable
    class_names: list[str]
    images_per_group: int  # the most images any group has (1 for labelled real data)
    min_images_per_group: int = 0  # the fewest images any group has, where known (0: unknown, take images_per_group)
    image_shape: tuple[int, int, int] | None  # (H, W, C) when every image has it, else None
    description: str

    def read(self, unit: int, start: int = 0, stop: int | None = None) -> Iterator[RawGroup]:
        """Groups ``start:stop`` of ``unit`` in stored order (earlier ones are passed over without decoding)."""
        raise NotImplementedError

    def __len__(self) -> int:
        return self.units.total


# --- synrep shards and labelled WebDataset tars -----------------------------------------------------------

def _image_field(fields: dict[str, bytes], j: int | None = None) -> bytes | None:
    for ext in IMAGE_EXTS + ("webp",):
        name = ext if j is None else f"{j}.{ext}"
        if name in fields:
            return fields[name]
    return None


class ShardSource(Source):
    """A synrep shard folder: units are the shards listed in ``index.json`` whose files are complete."""

    prefix = ""
    captioned = True

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise SourceError(f"shard folder {self.folder} does not exist; run `synrep generate` first")
        try:
            index = json.loads((self.folder / INDEX_FILE).read_text())
        except FileNotFoundError:
            raise SourceError(f"{self.folder / INDEX_FILE} does not exist: {self.folder} is not a finished synrep shard "
                              f"dataset (finish it with `synrep generate`, or use wds:{self.folder} for other tar shards)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise SourceError(f"{self.folder / INDEX_FILE} is not valid JSON ({err})") from None
        names, counts, skipped = [], [], []
        for stats in index.get("shards", []):
            path = self.folder / stats["shard"]
            if not path.is_file() or path.stat().st_size != stats.get("bytes"):
                skipped.append(stats["shard"])
                continue
            names.append(str(path))
            counts.append(int(stats["samples"]))
        if skipped:
            LOG.warning("%s: %d shard(s) are missing or differ in size from index.json and are left out: %s",
                        self.folder, len(skipped), ", ".join(skipped[:5]))
        if not names:
            raise SourceError(f"shard folder {self.folder} holds no readable shards listed in its index.json")
        self.skipped_shards = skipped
        self.units = UnitTable(names, np.asarray(counts, dtype=np.int64))
        concepts = index.get("concepts")
        if concepts is None:  # an index written before concept lists were recorded: read the JSON members once
            concepts = sorted({str(f.get("concept", "")) for _, f in _metas(self.units.names)})
        self.class_names = list(concepts)
        self._concept_ids = {c: i for i, c in enumerate(self.class_names)}
        self.images_per_group = int(index.get("images_per_caption") or 0)
        self.min_images_per_group = int(index.get("min_images_per_group") or 0)  # fewer after curate.mode=drop
        shape = index.get("image_shape")
        self.image_shape = tuple(shape) if shape and len(shape) == 3 else None
        self.description = f"{self.folder} ({self.units.total} caption groups in {len(names)} shards)"

    def read(self, unit: int, start: int = 0, stop: int | None = None) -> Iterator[RawGroup]:
        path = Path(self.units.names[unit])
        first = int(self.units.offsets[unit])
        for pos, (key, fields) in enumerate(iter_tar_samples(path, start, stop), start=start):
            if "json" not in fields:
                raise ShardError(f"{path}: sample {key} has no json metadata")
            try:
                meta = json.loads(fields["json"])
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ShardError(f"{path}: sample {key} has invalid json ({err})") from None
            n = int(meta.get("n_images", 0))
            images = [_image_field(fields, j) for j in range(n)]
            if n < 1 or any(im is None for im in images):
                raise ShardError(f"{path}: sample {key} lacks some of its {n} images")
            label = self._concept_ids.get(str(meta.get("concept", "")), -1)
            yield RawGroup(first + pos, label, str(meta.get("caption", "")), n, _bytes_loader(images, path, key), meta)


def _metas(shards: list[str]) -> Iterator[tuple[str, dict]]:
    for shard in shards:
        for key, fields in iter_tar_samples(Path(shard)):
            try:
                yield key, json.loads(fields.get("json", b"{}"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                yield key, {}


def _bytes_loader(images: list[bytes], path: Path, key: str) -> Callable[[int, int], np.ndarray]:
    def load(j: int, channels: int) -> np.ndarray:
        try:
            return decode_bytes(images[j], channels)
        except OSError as err:
            raise ShardError(f"{path}: sample {key} image {j} cannot be decoded ({err})") from None
    return load


class WebDatasetSource(Source):
    """Labelled WebDataset tars (``<key>.jpg|png|webp`` + ``<key>.cls``), e.g. ImageNet converted for WebDataset.

    The label is the integer in ``cls`` (or ``json['label']``); class names come from ``classes.txt`` in the
    folder when present. Counting samples needs one pass over the tar headers, done at start-up.
    """

    prefix = "wds"

    def __init__(self, folder: str | Path, split: str | None = None):
        root = Path(folder)
        if split and (root / split).is_dir():
            root = root / split
        if not root.is_dir():
            raise SourceError(f"WebDataset folder {root} does not exist")
        tars = sorted(p for p in root.glob("*.tar") if p.is_file())
        if not tars:
            raise SourceError(f"WebDataset folder {root} holds no .tar shards")
        counts, labels = [], set()
        for tar in tars:
            n = 0
            for key, fields in iter_tar_samples(tar):
                n += 1
                labels.add(self._label(fields, tar, key))
            counts.append(n)
        self.root = root
        self.units = UnitTable([str(t) for t in tars], np.asarray(counts, dtype=np.int64))
        names_file = Path(folder) / "classes.txt"
        if names_file.is_file():
            self.class_names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
        else:
            self.class_names = [str(i) for i in range(max(labels) + 1)]
        self.images_per_group, self.image_shape = 1, None
        self.description = f"wds:{root} ({self.units.total} images in {len(tars)} shards)"

    @staticmethod
    def _label(fields: dict[str, bytes], tar: Path, key: str) -> int:
        try:
            if "cls" in fields:
                return int(fields["cls"].decode().strip())
            if "json" in fields:
                return int(json.loads(fields["json"])["label"])
        except (ValueError, KeyError, UnicodeDecodeError, json.JSONDecodeError):
            pass
        raise SourceError(f"{tar}: sample {key} has no integer label (a .cls member or json 'label')")

    def read(self, unit: int, start: int = 0, stop: int | None = None) -> Iterator[RawGroup]:
        path = Path(self.units.names[unit])
        first = int(self.units.offsets[unit])
        for pos, (key, fields) in enumerate(iter_tar_samples(path, start, stop), start=start):
            data = _image_field(fields)
            if data is None:
                raise ShardError(f"{path}: sample {key} has no image ({', '.join(WDS_IMAGE_EXTS)})")
            yield RawGroup(first + pos, self._label(fields, path, key), "", 1, _bytes_loader([data], path, key), {"key": key})


# --- image folders ----------------------------------------------------------------------------------------

def _image_files(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_file() and Path(e.name).suffix.lower() in IMAGE_SUFFIXES)


class ImageFolderSource(Source):
    """``<root>/<split>/<class>/<image>`` (ImageNet's layout): units are class folders, read in sorted order."""

    prefix = "imagefolder"

    def __init__(self, root: str | Path, split: str | None = None):
        base = Path(root)
        folder = base / split if split else base
        if not folder.is_dir():
            found = sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
            raise SourceError(f"image folder {folder} does not exist" + (f"; {base} holds {', '.join(found[:8])} "
                              "(name the split folders in the config, e.g. train_split=train test_split=val)" if found else ""))
        classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
        if not classes:
            raise SourceError(f"image folder {folder} has no class subfolders (expected {folder}/<class>/<image files>)")
        counts = np.asarray([len(_image_files(folder / c)) for c in classes], dtype=np.int64)
        if counts.sum() == 0:
            raise SourceError(f"image folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        self.folder, self.class_names = folder, classes
        self.units = UnitTable([str(folder / c) for c in classes], counts)
        self.images_per_group, self.image_shape = 1, None
        self.description = f"imagefolder:{folder} ({self.units.total} images, {len(classes)} classes)"
        self._listing: tuple[int, list[str]] | None = None

    def read(self, unit: int, start: int = 0, stop: int | None = None) -> Iterator[RawGroup]:
        if self._listing is None or self._listing[0] != unit:
            self._listing = (unit, _image_files(Path(self.units.names[unit])))
        files = self._listing[1]
        first = int(self.units.offsets[unit])
        for pos in range(start, min(len(files), stop if stop is not None else len(files))):
            path = Path(self.units.names[unit]) / files[pos]
            yield RawGroup(first + pos, unit, "", 1, _file_loader(path), {"file": str(path)})


def _file_loader(path: Path) -> Callable[[int, int], np.ndarray]:
    def load(j: int, channels: int) -> np.ndarray:
        try:
            return decode_bytes(path.read_bytes(), channels)
        except OSError as err:
            raise SourceError(f"cannot read image {path}: {err}") from None
    return load


# --- in-memory arrays (the small datasets shipped in packages) -------------------------------------------

class ArraySource(Source):
    """A labelled dataset that ships as arrays (Fashion-MNIST, MNIST): units are chunks of ``chunk`` images."""

    prefix = "array"

    def __init__(self, images: np.ndarray, labels: np.ndarray, class_names: list[str], name: str, chunk: int = 1000):
        self.images, self.labels = images, labels
        n = len(labels)
        counts = [min(chunk, n - s) for s in range(0, n, chunk)]
        self.units = UnitTable([f"{name}[{s}:{s + c}]" for s, c in zip(range(0, n, chunk), counts)], np.asarray(counts, dtype=np.int64))
        self.class_names = list(class_names)
        self.images_per_group = 1
        self.image_shape = tuple(int(s) for s in images.shape[1:])
        self.description = f"{name} ({n} images)"

    def read(self, unit: int, start: int = 0, stop: int | None = None) -> Iterator[RawGroup]:
        first = int(self.units.offsets[unit])
        end = int(self.units.counts[unit]) if stop is None else min(stop, int(self.units.counts[unit]))
        for pos in range(start, end):
            i = first + pos
            yield RawGroup(i, int(self.labels[i]), "", 1, self._loader(i))

    def _loader(self, i: int) -> Callable[[int, int], np.ndarray]:
        return lambda j, channels: convert_channels(self.images[i], channels)


SOURCES: dict[str, type[Source]] = {cls.prefix: cls for cls in (WebDatasetSource, ImageFolderSource)}
REAL_SPECS = "fashion-mnist, fashion-mnist:<dir>, mnist, fmnist-world[:<task>], imagefolder:<root>, wds:<folder>"


def open_real(spec: str, split: str) -> Source:
    """A labelled real dataset's ``split`` as a source: ``fashion-mnist[:<dir>]``, ``mnist``, ``imagefolder:``, ``wds:``."""
    prefix, _, rest = spec.partition(":")
    if prefix in SOURCES and rest:
        return SOURCES[prefix](rest, split)
    if prefix in ("fashion-mnist", "mnist", "fmnist-world"):
        data = load_dataset(spec, split)
        return ArraySource(data.images, data.labels, data.class_names, f"{spec} {split}")
    raise SourceError(f"unknown dataset {spec!r}; choose one of {REAL_SPECS}")


def open_training_source(spec: str, split: str = "train") -> Source:
    """``<shard folder>`` (synthetic caption groups) or ``real:<dataset>`` (its ``split``) for training."""
    if spec.startswith("real:"):
        return open_real(spec[5:], split)
    if spec.partition(":")[0] in SOURCES:
        return open_real(spec, split)
    return ShardSource(spec)


__all__ = ["ArraySource", "ImageFolderSource", "RawGroup", "ShardSource", "Source", "SourceError", "UnitTable",
           "WebDatasetSource", "convert_channels", "decode_bytes", "fit_image", "image_id", "iter_tar_samples",
           "open_real", "open_training_source"]
