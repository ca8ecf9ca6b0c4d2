"""The attribute world built from the real Fashion-MNIST splits."""

import numpy as np
import pytest

from synrep.config import load_config
from synrep.datasets import DatasetError, load_dataset
from synrep.world import ATTRIBUTES, CANVAS, PATTERNS, TASKS, build_split, caption, draw_attributes, garment_tone_values, tone_cuts


@pytest.fixture(scope="module")
def world(fashion_mnist_available):
    if not fashion_mnist_available:
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    return build_split("test")


def test_attributes_are_seeded_balanced_and_named_in_the_captions(world):
    images, classes, attrs, captions = world
    assert images.shape == (10000, CANVAS, CANVAS, 1) and images.dtype == np.uint8
    assert draw_attributes("test", 7) == draw_attributes("test", 7) != draw_attributes("train", 7)
    for name, values in ATTRIBUTES.items():
        share = np.bincount(attrs[name], minlength=len(values)) / len(classes)
        assert share.min() > 0.5 / len(values), (name, share)  # every value is common
    i = 123
    named = {name: ATTRIBUTES[name][attrs[name][i]] for name in ATTRIBUTES}
    text = captions[i]
    assert all(v in text for k, v in named.items() if (k, v) != ("tilt", "upright"))
    assert caption({**named, "tilt": "tilted left", "position": "centre"}, "Sneaker") == \
        f"a {named['size']} {named['tone']} {named['pattern']} sneaker tilted left in the centre"


def test_tone_is_measured_from_the_pixels_and_the_layout_is_visible(world, fashion_mnist_available):
    from synrep.datasets import load_fashion_mnist

    images, _, attrs, _ = world
    real = load_fashion_mnist("test")
    low, high = tone_cuts()
    expected = np.digitize(garment_tone_values(real.images), [low, high])
    assert np.array_equal(attrs["tone"], expected), "tone is the garment's own brightness, by the train tertiles"
    ink = images[..., 0] > 16
    large = attrs["size"] == ATTRIBUTES["size"].index("large")
    assert ink[large].sum((1, 2)).mean() > 1.5 * ink[~large].sum((1, 2)).mean()
    top_left = attrs["position"] == ATTRIBUTES["position"].index("top left")
    rows = np.arange(CANVAS)
    centre_row = (ink[top_left].sum(2) * rows).sum(1) / np.maximum(ink[top_left].sum((1, 2)), 1)
    assert centre_row.mean() < CANVAS / 2
    plain = attrs["pattern"] == PATTERNS.index("plain")
    striped = attrs["pattern"] == PATTERNS.index("striped")
    row_profile = lambda sel: np.abs(np.diff(images[sel, ..., 0].astype(float), axis=1)).mean()
    assert row_profile(striped) > 1.3 * row_profile(plain), "stripes add row-to-row contrast"


def test_world_tasks_as_datasets_and_in_eval(world, tmp_path):
    from synrep.evaluation.stage import EvalConfig, evaluate

    for task in TASKS:
        data = load_dataset(f"fmnist-world:{task}", "test")
        assert len(data) == 10000 and data.labels.max() < len(data.class_names)
    assert len(load_dataset("fmnist-world:class-pattern", "test").class_names) == 40
    with pytest.raises(DatasetError, match="not a valid <task>"):
        load_dataset("fmnist-world:colour", "test")
    with pytest.raises(DatasetError, match="split"):
        load_dataset("fmnist-world", "val")
    cfg = load_config(EvalConfig, None, ["encoder=pixels", "dataset=fmnist-world:position", f"out_dir={tmp_path}",
                                         "protocols=[knn]", "probe_train_size=2000"])
    result = evaluate(cfg)
    assert result["knn"]["top1"] > 60, "raw pixels see where a garment is (chance is 20%)"
