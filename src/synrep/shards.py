"""Image shards: WebDataset-compatible tar files, one sample per caption group.

A sample is a caption's ``n`` images plus one JSON of provenance. Member names follow WebDataset's
``<key>.<ext>`` rule: ``000000042.json``, ``000000042.0.png``, ``000000042.1.png`` ... so
``webdataset`` reads the shards as they are (key ``000000042``, fields ``json``, ``0.png`` ...).

Writing is crash-safe: a shard is written to ``.shard-00003.tar.tmp<pid>``, fsynced, renamed to
``shard-00003.tar``, and only then is its stats file ``shard-00003.json`` (the done-marker: sample
and image counts, bytes, sha256) written. Readers see only renamed shards; a rerun rewrites any shard
without a valid marker. ``index.json`` at the top describes the whole dataset.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator

import numpy as np

from .errors import SynrepError
from .atomic import atomic_file, atomic_write_json

LOG = logging.getLogger("synrep.shards")
SHARD_FORMAT = "synrep-shards-v1"
INDEX_FILE = "index.json"
IMAGE_EXTS = ("png", "jpg", "jpeg")


class ShardError(SynrepError, RuntimeError):
    """A shard is corrupt, truncated, or holds an unsafe or inconsistent member."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.tar"


def marker_path(shard: Path) -> Path:
    return shard.with_suffix(".json")


def check_member_name(name: str) -> str:
    """Refuse member names that could escape the extraction folder or break the key.ext rule."""
    path = PurePosixPath(name)
    if not name or name.startswith(("/", "\\")) or path.is_absolute() or ".." in path.parts or "\\" in name:
        raise ShardError(f"unsafe member name {name!r}: absolute paths and '..' are not allowed")
    if len(path.parts) != 1 or name.startswith("."):
        raise ShardError(f"member name {name!r} must be a plain file name (no folders, no leading dot)")
    return name


def encode_image(image: np.ndarray, fmt: str = "png", quality: int = 95) -> bytes:
    """uint8 ``[H, W]``, ``[H, W, 1]`` or ``[H, W, 3]`` to PNG/JPEG bytes (deterministic)."""
    from PIL import Image

    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {array.dtype}")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    buf = io.BytesIO()
    pil = Image.fromarray(array)
    if fmt == "png":
        pil.save(buf, format="PNG", optimize=False)
    elif fmt in ("jpg", "jpeg"):
        pil.save(buf, format="JPEG", quality=quality)
    else:
        raise ValueError(f"image format {fmt!r} is not supported; choose png or jpg")
    return buf.getvalue()


def decode_image(data: bytes, channels: int | None = None) -> np.ndarray:
    """Image bytes to uint8 ``[H, W, C]``."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if channels == 3 or (channels is None and im.mode not in ("L", "1", "I;16")):
            arr = np.asarray(im.convert("RGB"))
        else:
            arr = np.asarray(im.convert("L"))[..., None]
    return arr


@dataclass
class GroupSample:
    """One caption group: ``images`` uint8 ``[n, H, W, C]`` and its provenance ``meta``."""

    key: str
    images: np.ndarray
    meta: dict


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(check_member_name(name))
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


class ShardWriter:
    """Write one shard atomically. Use as a context manager; an exception discards the partial file."""

    def __init__(self, path: str | Path, image_format: str = "png", extra_stats: dict | None = None):
        if image_format not in ("png", "jpg"):
            raise ValueError(f"image_format {image_format!r} is not allowed; choose png or jpg")
        self.path = Path(path)
        self.image_format = image_format
        self.samples = 0
        self.images = 0
        self.min_images: int | None = None  # the smallest group (curation may drop images)
        self.extra_stats = extra_stats or {}
        self.concepts: dict[str, int] = {}
        self._file = None
        self._tar = None

    def __enter__(self) -> "ShardWriter":
        self._file = atomic_file(self.path)
        self._tar = tarfile.open(fileobj=self._file.__enter__(), mode="w", format=tarfile.USTAR_FORMAT)
        return self

    def add(self, key: str, images: Iterable[np.ndarray], meta: dict) -> None:
        """Add a caption group: ``images`` is a sequence of uint8 ``[H, W, C]`` arrays."""
        self.add_encoded(key, [encode_image(img, self.image_format) for img in images], meta)

    def add_encoded(self, key: str, images: list[bytes], meta: dict) -> None:
        """Add a caption group whose images are already encoded in this writer's ``image_format``."""
        if "." in key:
            raise ShardError(f"sample key {key!r} must not contain '.'")
        meta = {**meta, "key": key, "n_images": len(images), "image_format": self.image_format}
        _add_member(self._tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
        for i, data in enumerate(images):
            _add_member(self._tar, f"{key}.{i}.{self.image_format}", data)
        self.samples += 1
        self.images += len(images)
        self.min_images = len(images) if self.min_images is None else min(self.min_images, len(images))
        concept = str(meta.get("concept", ""))
        self.concepts[concept] = self.concepts.get(concept, 0) + 1

    def __exit__(self, exc_type, exc, tb) -> None:
        # The temporary file goes whenever the shard did not complete: an error while writing, or one while
        # closing (e.g. disk full); it never becomes visible under the shard's name.
        try:
            self._tar.close()
        except BaseException as err:
            self._file.__exit__(type(err), err, err.__traceback__)
            raise
        self._file.__exit__(exc_type, exc, tb)
        if exc_type is not None:
            return
        digest = hashlib.sha256(self.path.read_bytes()).hexdigest()
        atomic_write_json(marker_path(self.path), {"shard": self.path.name, "samples": self.samples, "images": self.images,
                                                    "bytes": self.path.stat().st_size, "sha256": digest, "concepts": self.concepts,
                                                    "min_images": self.min_images, **self.extra_stats})


def shard_done(path: str | Path) -> bool:
    """True when the shard and its done-marker exist and agree on the file size."""
    path = Path(path)
    marker = marker_path(path)
    if not path.exists() or not marker.exists():
        return False
    try:
        stats = json.loads(marker.read_text())
    except (json.JSONDecodeError, OSError):
        return False
    return stats.get("bytes") == path.stat().st_size


def iter_tar_samples(path: Path, start: int = 0, stop: int | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """WebDataset samples ``(key, {ext: bytes})`` of one tar, from sample ``start`` to ``stop``.

    Members of samples before ``start`` are skipped by seeking over their data. Raises ShardError on
    an unsafe member name or a truncated/corrupt tar.
    """
    index, key, fields = -1, None, {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                name = check_member_name(member.name)
                if not member.isfile():
                    raise ShardError(f"{path}: member {name!r} is not a regular file")
                k, _, ext = name.partition(".")
                if k != key:
                    if key is not None and index >= start:
                        yield key, fields
                    index += 1
                    key, fields = k, {}
                    if stop is not None and index >= stop:
                        return
                if index < start:
                    continue
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    raise ShardError(f"{path}: member {name!r} is truncated")
                fields[ext] = data
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ShardError(f"{path}: unreadable or truncated tar ({err})") from None
    if key is not None and index >= start and (stop is None or index < stop):
        yield key, fields


def read_shard(path: str | Path) -> list[GroupSample]:
    """All samples of one shard, fully checked; raises ShardError on any corruption."""
    path = Path(path)
    groups = dict(iter_tar_samples(path))
    order = list(groups)
    samples = []
    for key in order:
        fields = groups[key]
        if "json" not in fields:
            raise ShardError(f"{path}: sample {key} has no json metadata")
        try:
            meta = json.loads(fields["json"])
        except json.JSONDecodeError as err:
            raise ShardError(f"{path}: sample {key} has invalid json ({err})") from None
        n = int(meta.get("n_images", -1))
        images = []
        for i in range(n):
            data = next((fields[f"{i}.{e}"] for e in IMAGE_EXTS if f"{i}.{e}" in fields), None)
            if data is None:
                raise ShardError(f"{path}: sample {key} lacks image {i} of {n}")
            try:
                images.append(decode_image(data))
            except OSError as err:
                raise ShardError(f"{path}: sample {key} image {i} cannot be decoded ({err})") from None
        if n < 1 or len({im.shape for im in images}) != 1:
            raise ShardError(f"{path}: sample {key} has {n} images or images of different sizes")
        samples.append(GroupSample(key, np.stack(images), meta))
    if not samples:
        if _marked_empty(path):  # curation may drop every image of a shard: a finished, empty shard
            return []
        raise ShardError(f"{path}: shard holds no samples")
    return samples


def _marked_empty(path: Path) -> bool:
    """Whether the done-marker of ``path`` records a finished shard of 0 samples."""
    try:
        return json.loads(marker_path(path).read_text()).get("samples") == 0
    except (OSError, ValueError, AttributeError):
        return False


def list_shards(folder: str | Path) -> list[Path]:
    """Completed shards in ``folder`` (renamed ``shard-*.tar``; temporary files are never listed)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ShardError(f"shard folder {folder} does not exist")
    return sorted(p for p in folder.glob("shard-*.tar") if p.is_file())


def write_index(folder: str | Path, info: dict) -> Path:
    """Write ``index.json``: dataset-level facts plus every shard's stats."""
    folder = Path(folder)
    shards = []
    for shard in list_shards(folder):
        marker = marker_path(shard)
        if marker.exists():
            shards.append(json.loads(marker.read_text()))
    concepts: dict[str, int] = {}
    for s in shards:
        for name, n in s.get("concepts", {}).items():
            concepts[name] = concepts.get(name, 0) + n
    # The concept list (sorted) fixes every concept's integer id for training, on every rank and worker.
    # the smallest group over the shards (None when a shard predates the count): what short_groups must expect
    sizes = [s.get("min_images", -1) for s in shards if s.get("samples")]
    smallest = min(sizes) if sizes and -1 not in sizes else None
    index = {"format": SHARD_FORMAT, **info, "min_images_per_group": smallest, "num_shards": len(shards),
             "num_groups": sum(s["samples"] for s in shards), "num_images": sum(s["images"] for s in shards),
             "concepts": sorted(concepts), "concept_counts": {c: concepts[c] for c in sorted(concepts)}, "shards": shards}
    atomic_write_json(folder / INDEX_FILE, index)
    return folder / INDEX_FILE


def read_index(folder: str | Path) -> dict:
    path = Path(folder) / INDEX_FILE
    if not path.exists():
        raise ShardError(f"{path} does not exist: the folder is not a finished synrep shard dataset")
    return json.loads(path.read_text())


def write_random_shards(folder: str | Path, groups_per_shard: list[int], images_per_group: int = 4, size: int = 16,
                        channels: int = 3, image_format: str = "jpg", concepts: int = 10, distinct: int = 64,
                        seed: int = 0, short: dict[int, int] | None = None) -> Path:
    """A finished shard folder of random-content caption groups, for tests and loader benchmarks.

    Shard k holds ``groups_per_shard[k]`` groups; group g's concept is ``concept-{g % concepts}``; group g has
    ``short[g]`` images where ``short`` names it (as curation's drop leaves), else ``images_per_group``. Only
    ``distinct`` different images are encoded and their bytes reused, so a million images take seconds.
    """
    short = short or {}
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    pool = [encode_image(rng.integers(0, 256, (size, size, channels), dtype=np.uint8), image_format) for _ in range(distinct)]
    g = 0
    for k, count in enumerate(groups_per_shard):
        with ShardWriter(folder / shard_name(k), image_format) as writer:
            for _ in range(count):
                images = [pool[(g * images_per_group + j) % distinct] for j in range(short.get(g, images_per_group))]
                writer.add_encoded(f"{g:09d}", images, {"caption": f"caption {g}", "caption_id": g, "concept": f"concept-{g % concepts}"})
                g += 1
    write_index(folder, {"generator": "random", "images_per_caption": images_per_group, "image_format": image_format,
                         "image_shape": [size, size, channels]})
    return folder
