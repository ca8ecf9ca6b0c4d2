import numpy as np
import pytest
import torch

from synrep.config import load_config
from synrep.embedded_t2i.model import GeneratorError, load_embedded_generator, shipped_generator_dir
from synrep.embedded_t2i.train import GeneratorTrainConfig, train_generator


def test_builds_from_config_and_samples_shape_dtype_range(random_generator_dir):
    gen = load_embedded_generator(random_generator_dir)
    noise = torch.randn(3, 1, 28, 28)
    images = gen.sample(["a photo of a coat", "a sandal", "a bag"], noise, guidance_scale=2.0, steps=3)
    assert images.shape == (3, 1, 28, 28) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    again = gen.sample(["a photo of a coat", "a sandal", "a bag"], noise, guidance_scale=2.0, steps=3)
    assert torch.equal(images, again), "DDIM with eta=0 is deterministic given the noise"


def test_not_a_generator_folder(tmp_path):
    with pytest.raises(GeneratorError, match="not a synrep embedded generator"):
        load_embedded_generator(tmp_path)


def test_training_lowers_loss_and_resumes(tmp_path, fashion_mnist_available):
    if not fashion_mnist_available:
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    small = ["model.block_out_channels=[8,16,16]", "model.attention_head_dim=4", "model.norm_num_groups=4",
             "limit_images=512", "batch_size=32", "captions_per_class=4", "checkpoint_every=15", "lr=3e-3", "warmup_steps=5"]
    cfg = load_config(GeneratorTrainConfig, None, [f"out_dir={tmp_path / 'a'}", "steps=30", *small])
    folder = train_generator(cfg)
    state = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    losses = state["losses"]
    assert len(losses) == 30 and np.mean(losses[-5:]) < np.mean(losses[:5])
    card = (folder / "MODEL_CARD.md").read_text()
    assert "steps | 30" in card and "sha256" in card and (folder / "loss_curve.png").exists()
    # Resume: a run stopped at 15 and continued equals the uninterrupted run.
    part = load_config(GeneratorTrainConfig, None, [f"out_dir={tmp_path / 'b'}", "steps=15", *small])
    train_generator(part)
    part.steps = 30
    train_generator(part)
    resumed = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["losses"]
    assert resumed == pytest.approx(losses, rel=1e-5)


@pytest.mark.slow
def test_shipped_weights_load_offline_and_draw_recognisable_images(fashion_mnist_available):
    if not (shipped_generator_dir() / "synrep_generator.json").exists():
        pytest.fail("the shipped generator weights are missing from the package")
    if not fashion_mnist_available:
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    from torch import nn

    from synrep.datasets import load_fashion_mnist
    from synrep.training.backbones import SmallCNN

    size = sum(p.stat().st_size for p in shipped_generator_dir().rglob("*") if p.is_file())
    assert size < 25 * 2**20
    gen = load_embedded_generator()
    # A quick real-train classifier (one pass over 20k images) labels generated images.
    train = load_fashion_mnist("train")
    x = torch.from_numpy(train.images[:20000]).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    y = torch.from_numpy(train.labels[:20000])
    torch.manual_seed(0)
    clf = nn.Sequential(SmallCNN(1, 16), nn.Linear(128, 10))
    opt = torch.optim.Adam(clf.parameters(), 3e-3)
    for i in range(0, 20000, 128):
        loss = nn.functional.cross_entropy(clf(x[i:i + 128]), y[i:i + 128])
        opt.zero_grad()
        loss.backward()
        opt.step()
    names = ["t-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
    captions = [f"a photo of a {n}" for n in names for _ in range(4)]
    labels = np.repeat(np.arange(10), 4)
    images = gen.sample(captions, torch.randn(40, 1, 28, 28, generator=torch.Generator().manual_seed(0)), 2.5, 10)
    with torch.no_grad():
        accuracy = (clf.eval()(images * 2 - 1).argmax(1).numpy() == labels).mean()
    assert accuracy > 0.5, f"fidelity {accuracy:.2f} is not far above chance (0.10)"


@pytest.mark.slow
def test_generator_trains_on_the_attribute_world_with_per_image_captions(tmp_path, fashion_mnist_available):
    if not fashion_mnist_available:
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    from synrep.config import load_config
    from synrep.embedded_t2i.model import load_embedded_generator
    from synrep.embedded_t2i.train import GeneratorTrainConfig, train_generator
    from synrep.world import world_captions

    cfg = load_config(GeneratorTrainConfig, None, [f"out_dir={tmp_path}", "dataset=fmnist-world", "model.image_size=40", "steps=2",
                                                   "batch_size=8", "limit_images=64", "checkpoint_every=2"])
    folder = train_generator(cfg)
    written = (tmp_path / "train_captions.txt").read_text().splitlines()
    assert written == sorted(set(world_captions("train")[:64])), "each image's own caption, each distinct one encoded once"
    assert "one per image" in (folder / "MODEL_CARD.md").read_text()
    generator = load_embedded_generator(folder)
    assert generator.cfg.image_size == 40
    from synrep.embedded_t2i.fidelity import FidelityConfig, run_fidelity

    fid = load_config(FidelityConfig, None, [f"generator={folder}", f"out_dir={tmp_path / 'fid'}", "dataset=fmnist-world",
                                            "guidance_scales=[2]", "captions_per_class=1", "seeds_per_caption=2", "steps=2",
                                            "classifier_epochs=3", "classifier_train_size=2048", "classifier_test_size=2000",
                                            "attribute_captions=12"])
    results = run_fidelity(fid)
    assert results["classifier_test_images"] == 2000
    tasks = results["attributes"]["tasks"]
    assert set(tasks) == {"class", "tone", "pattern", "size", "position", "tilt"}
    assert all(0 <= t["fidelity"] <= 100 and t["chance"] > 0 for t in tasks.values())
    assert tasks["position"]["classifier_real_test_top1"] > 2 * tasks["position"]["chance"], "position is easy to read from real images"
    assert tasks["position"]["classifier_noisy_real_test_top1"] > 2 * tasks["position"]["chance"], \
        "trained with randomised backgrounds, the classifier still reads real images put on grey noise"
    assert "Per-attribute fidelity" in (tmp_path / "fid" / "fidelity.md").read_text()
    assert (tmp_path / "fid" / "attribute_samples.png").exists()
    wrong = load_config(GeneratorTrainConfig, None, [f"out_dir={tmp_path / 'w'}", "dataset=fmnist-world", "steps=1", "limit_images=8"])
    with pytest.raises(Exception, match="model expects"):
        train_generator(wrong)


def test_shipped_world_generator_draws_where_size_and_pattern_the_caption_says():
    """The attribute world's shipped model: the caption moves the garment, scales it and lays the pattern."""
    from synrep.embedded_t2i.model import shipped_world_generator_dir
    from synrep.generate.generators import make_generator

    if not (shipped_world_generator_dir() / "synrep_generator.json").exists():
        pytest.fail("the shipped attribute-world generator is missing from the package")
    gen = make_generator("embedded-world").model
    assert gen.cfg.image_size == 40
    n = 6
    groups = ["a large light plain bag in the top left", "a large light plain bag in the bottom right",
              "a small light plain bag in the centre", "a large light plain bag in the centre", "a large light striped bag in the centre"]
    noise = torch.randn(len(groups) * n, 1, 40, 40, generator=torch.Generator().manual_seed(0))
    images = gen.sample([g for g in groups for _ in range(n)], noise, 2.0, 10)[:, 0].numpy()
    top_left, bottom_right, small, plain, striped = (slice(i * n, (i + 1) * n) for i in range(len(groups)))
    ink = images > 0.25
    rows, cols = np.arange(40)[None, :, None], np.arange(40)[None, None, :]
    mass = np.maximum(ink.sum((1, 2)), 1)
    centre_row, centre_col = (ink * rows).sum((1, 2)) / mass, (ink * cols).sum((1, 2)) / mass
    assert centre_row[top_left].mean() + 6 < centre_row[bottom_right].mean()
    assert centre_col[top_left].mean() + 6 < centre_col[bottom_right].mean()
    assert ink[small].sum((1, 2)).mean() < 0.75 * ink[plain].sum((1, 2)).mean(), "small garments cover less of the canvas"
    row_contrast = lambda sel: np.abs(np.diff(images[sel], axis=1)).mean()
    assert row_contrast(striped) > 1.2 * row_contrast(plain), "stripes add row-to-row contrast"
