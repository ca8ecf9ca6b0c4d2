"""The attribute world: Fashion-MNIST garments with visible, measurable attributes beyond their class.

Every real Fashion-MNIST image (train and test) becomes a 40 x 40 picture with five attributes:

- ``tone``: dark / mid / light, *measured*: the garment's mean pixel value against the tertiles of the train
  split (the image is not changed);
- ``pattern``: plain / striped / checked / dotted, laid over the garment (the background stays black);
- ``size``: small (20 px) / large (28 px);
- ``position``: top left / top right / bottom left / bottom right / centre on the canvas;
- ``tilt``: upright / tilted left / tilted right (15 degrees).

Pattern, size, position and tilt are drawn from ``(split, index)`` with a fixed seed, so the world is the same
on every machine; each image gets a caption naming everything ("a small dark striped sneaker tilted left in
the top left"). As a dataset (``fmnist-world[:<task>]``) the labels are the task's: ``class`` (default), one
attribute, or ``class-pattern`` (fine-grained: 40 classes).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

from .datasets import FASHION_MNIST_CLASSES, DatasetError, LabeledImages, load_fashion_mnist
from .utils import stable_seed

CANVAS = 40
TONES = ("dark", "mid", "light")
PATTERNS = ("plain", "striped", "checked", "dotted")
SIZES = {"small": 20, "large": 28}
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "centre")
TILTS = {"upright": 0.0, "tilted left": 15.0, "tilted right": -15.0}
ATTRIBUTES = {"tone": TONES, "pattern": PATTERNS, "size": tuple(SIZES), "position": POSITIONS, "tilt": tuple(TILTS)}
TASKS = ("class", *ATTRIBUTES, "class-pattern")
GARMENT_THRESHOLD = 16  # pixels above this belong to the garment (Fashion-MNIST backgrounds are 0)


def garment_tone_values(images: np.ndarray) -> np.ndarray:
    """Mean value of the garment pixels of uint8 images ``[N, H, W, 1]`` -> float ``[N]``."""
    flat = images.reshape(len(images), -1).astype(np.float32)
    mask = flat > GARMENT_THRESHOLD
    return (flat * mask).sum(1) / np.maximum(mask.sum(1), 1)


@lru_cache(maxsize=1)
def tone_cuts() -> tuple[float, float]:
    """The tertiles of the train split's garment tone (the dark/mid and mid/light borders)."""
    values = garment_tone_values(load_fashion_mnist("train").images)
    low, high = np.quantile(values, [1 / 3, 2 / 3])
    return float(low), float(high)


def _pattern_mask(pattern: str, size: int = 28) -> np.ndarray:
    """Multiplier ``[size, size]`` in {0.35, 1}: where the pattern darkens the garment."""
    yy, xx = np.mgrid[0:size, 0:size]
    if pattern == "plain":
        on = np.zeros((size, size), bool)
    elif pattern == "striped":
        on = (yy // 3) % 2 == 1
    elif pattern == "checked":
        on = ((yy // 4) + (xx // 4)) % 2 == 1
    elif pattern == "dotted":
        on = ((yy % 5) - 2) ** 2 + ((xx % 5) - 2) ** 2 <= 1
    else:
        raise DatasetError(f"unknown pattern {pattern!r}; choose one of {', '.join(PATTERNS)}")
    return np.where(on, 0.35, 1.0).astype(np.float32)


def _place(garment: np.ndarray, size: str, position: str, tilt: str) -> np.ndarray:
    """A 28 x 28 uint8 garment -> the 40 x 40 canvas: tilted, resized, placed."""
    img = Image.fromarray(garment)
    if TILTS[tilt]:
        img = img.rotate(TILTS[tilt], resample=Image.BILINEAR)
    px = SIZES[size]
    if px != garment.shape[0]:
        img = img.resize((px, px), Image.BILINEAR)
    free = CANVAS - px
    x, y = {"top left": (0, 0), "top right": (free, 0), "bottom left": (0, free), "bottom right": (free, free),
            "centre": (free // 2, free // 2)}[position]
    canvas = np.zeros((CANVAS, CANVAS), np.uint8)
    canvas[y:y + px, x:x + px] = np.asarray(img)
    return canvas


def draw_attributes(split: str, index: int) -> dict[str, str]:
    """The drawn attributes (pattern, size, position, tilt) of image ``index`` of ``split``."""
    rng = np.random.default_rng(stable_seed("world", split, index))
    return {"pattern": PATTERNS[rng.integers(len(PATTERNS))], "size": tuple(SIZES)[rng.integers(len(SIZES))],
            "position": POSITIONS[rng.integers(len(POSITIONS))], "tilt": tuple(TILTS)[rng.integers(len(TILTS))]}


def caption(attrs: dict[str, str], class_name: str) -> str:
    """"a small dark striped sneaker tilted left in the top left" ("plain" is said; upright is left unsaid)."""
    tilt = "" if attrs["tilt"] == "upright" else f" {attrs['tilt']}"
    where = "in the centre" if attrs["position"] == "centre" else f"in the {attrs['position']}"
    return f"a {attrs['size']} {attrs['tone']} {attrs['pattern']} {class_name.lower()}{tilt} {where}"


@lru_cache(maxsize=2)
def build_split(split: str) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], tuple[str, ...]]:
    """``(images uint8 [N, 40, 40, 1], class labels [N], attribute index arrays, captions)`` of one split."""
    real = load_fashion_mnist(split)
    low, high = tone_cuts()
    tones = np.digitize(garment_tone_values(real.images), [low, high])
    images = np.empty((len(real), CANVAS, CANVAS, 1), np.uint8)
    attrs = {name: np.empty(len(real), np.int64) for name in ATTRIBUTES}
    captions = []
    masks = {p: _pattern_mask(p) for p in PATTERNS}
    for i, (garment, label) in enumerate(zip(real.images[..., 0], real.labels)):
        drawn = {**draw_attributes(split, i), "tone": TONES[tones[i]]}
        patterned = (garment.astype(np.float32) * masks[drawn["pattern"]]).round().astype(np.uint8)
        images[i, ..., 0] = _place(patterned, drawn["size"], drawn["position"], drawn["tilt"])
        for name, values in ATTRIBUTES.items():
            attrs[name][i] = values.index(drawn[name])
        captions.append(caption(drawn, FASHION_MNIST_CLASSES[label]))
    return images, real.labels, attrs, tuple(captions)


def load_world(split: str = "train", task: str | None = None) -> LabeledImages:
    """One split of the attribute world labelled for ``task`` (``class`` when None)."""
    task = task or "class"
    if task not in TASKS:
        raise DatasetError(f"fmnist-world task {task!r} is not allowed; choose one of {', '.join(TASKS)}")
    if split not in ("train", "test"):
        raise DatasetError(f"fmnist-world split {split!r} is not allowed; choose 'train' or 'test'")
    images, classes, attrs, _ = build_split(split)
    if task == "class":
        labels, names = classes, list(FASHION_MNIST_CLASSES)
    elif task == "class-pattern":
        labels = classes * len(PATTERNS) + attrs["pattern"]
        names = [f"{c} {p}" for c in FASHION_MNIST_CLASSES for p in PATTERNS]
    else:
        labels, names = attrs[task], list(ATTRIBUTES[task])
    return LabeledImages(images, labels.copy(), names, f"fmnist-world:{task}", split)


def world_captions(split: str = "train") -> list[str]:
    """The caption of every image of ``split``, in order."""
    return list(build_split(split)[3])


def attribute_combinations() -> list[dict[str, str]]:
    """Every combination of the five attributes (3 x 4 x 2 x 5 x 3 = 360), in a fixed order."""
    combos = [{}]
    for name, values in ATTRIBUTES.items():
        combos = [{**c, name: v} for c in combos for v in values]
    return combos


@lru_cache(maxsize=64)
def _planned_order(seed: int, class_name: str) -> tuple[str, ...]:
    """A class's 360 captions in its seeded plan order (built once per class, not per caption)."""
    combos = attribute_combinations()
    order = np.random.default_rng(stable_seed("world-captions", seed, class_name)).permutation(len(combos))
    return tuple(caption(combos[i], class_name) for i in order)


def planned_caption(class_name: str, seed: int, index: int) -> str:
    """Caption number ``index`` of a class in a captions plan: the classes' attribute combinations in a seeded
    order, so the first 360 captions of a class are all different and every attribute value about equally common
    (exactly, over all 360)."""
    plan = _planned_order(seed, class_name)
    return plan[index % len(plan)]
