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


def test_world_caption_backend_writes_distinct_balanced_captions_in_the_worlds_wording(tmp_path):
    from collections import Counter

    from synrep.captions.stage import CaptionsConfig, run_captions
    from synrep.world import attribute_combinations, planned_caption

    assert len(attribute_combinations()) == 360 == len({caption(c, "bag") for c in attribute_combinations()})
    from synrep.captions.llm_backends import CAPTION_BACKENDS

    assert CAPTION_BACKENDS.traits("world")["distinct_per_concept"] == len(attribute_combinations())
    first = [planned_caption("bag", 0, i) for i in range(360)]
    assert len(set(first)) == 360, "a class's first 360 captions are its 360 combinations"
    assert first != [planned_caption("bag", 1, i) for i in range(360)], "the seed orders them"
    cfg = load_config(CaptionsConfig, None, ["backend=world", "per_concept=40", "dedup=text", "mix=[1,0,0]",
                                             f"out_dir={tmp_path}"])
    path = run_captions(cfg)
    import json

    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 400 and Counter(r["concept"] for r in records) == Counter({c: 40 for c in set(r["concept"] for r in records)})
    texts = [r["caption"].lower() for r in records]
    assert len(set(texts)) == 400
    assert all(t.startswith(("a small ", "a large ")) for t in texts)
    from synrep.datasets import FASHION_MNIST_CLASSES

    for record, text in zip(records, texts):  # the class is named as the world's generator learned it
        assert any(f" {name} " in f" {text} " for name in FASHION_MNIST_CLASSES), text
    patterns = Counter(next(p for p in PATTERNS if f" {p} " in t) for t in texts)
    assert min(patterns.values()) >= 80, patterns  # 100 each when perfectly balanced


def test_eval_tasks_are_probed_on_the_same_features_with_aligned_labels(world, tmp_path):
    from synrep.evaluation.features import stratified_subset
    from synrep.evaluation.probes import Rows, knn_classify
    from synrep.evaluation.stage import EvalConfig, evaluate

    cfg = load_config(EvalConfig, None, ["encoder=pixels", "dataset=fmnist-world", f"out_dir={tmp_path}", "protocols=[knn]",
                                         "probe_train_size=1500", "knn_ks=[20]", "tasks=[fmnist-world:position,fmnist-world:pattern]"])
    result = evaluate(cfg)
    assert set(result["tasks"]) == {"fmnist-world:position", "fmnist-world:pattern"}
    train = load_dataset("fmnist-world:class", "train")
    rows = stratified_subset(train.labels, 1500, 0)
    test_x = world[0].reshape(len(world[0]), -1).astype(np.float32) / 255
    train_x = train.images[rows].reshape(len(rows), -1).astype(np.float32) / 255
    for task in ("position", "pattern"):  # the same numbers as a kNN on these rows with the task's labels
        labels = load_dataset(f"fmnist-world:{task}", "train").labels[rows]
        direct = knn_classify(Rows(train_x), labels, Rows(test_x), load_dataset(f"fmnist-world:{task}", "test").labels, 20, 0.07,
                              ks=(20,))
        assert result["tasks"][f"fmnist-world:{task}"]["knn"]["top1"] == pytest.approx(direct["top1"], abs=0.05)
    assert result["tasks"]["fmnist-world:position"]["knn"]["top1"] > 60
    with pytest.raises(ValueError, match="tasks.*another labelling"):
        load_config(EvalConfig, None, ["dataset=fmnist-world", "tasks=[fashion-mnist]"])


def test_world_captions_and_tasks_refuse_what_they_cannot_label(tmp_path):
    from synrep.captions.stage import CaptionsConfig
    from synrep.datasets import concept_list_of
    from synrep.evaluation.stage import EvalConfig, evaluate

    with pytest.raises(ValueError, match="concepts.*'world' writes captions for the 'fashion-mnist' concept list only"):
        load_config(CaptionsConfig, None, ["backend=world", "concepts=imagenet-1k"])
    assert concept_list_of("fmnist-world") == concept_list_of("fmnist-world:class") == concept_list_of("fashion-mnist") == "fashion-mnist"
    assert concept_list_of("fmnist-world:pattern") is None and concept_list_of("mnist") is None
    small = load_dataset("fmnist-world:class", "test")
    cfg = load_config(EvalConfig, None, ["encoder=pixels", "dataset=fmnist-world", f"out_dir={tmp_path}", "protocols=[knn]",
                                         "tasks=[fmnist-world:tone]"])
    with pytest.raises(ValueError, match="passed in memory"):
        evaluate(cfg, train=small, test=small)
