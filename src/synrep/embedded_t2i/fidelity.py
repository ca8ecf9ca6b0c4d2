"""``synrep generator fidelity``: how faithful and how diverse the embedded generator's images are.

Fidelity: a small CNN classifier trained on real Fashion-MNIST *train* labels images generated from
class captions; its accuracy per class and on average (chance = 10%). Diversity: the mean pairwise
RMS pixel distance between images that share a caption (0 would mean collapse), with the same
number measured on real test images of one class as a reference. Both at several guidance scales:
StableRep's fidelity/diversity trade-off in miniature. One sample grid PNG per scale.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..captions.concepts import load_concepts
from ..config import require, save_config
from ..datasets import DATASETS, load_dataset
from ..images import randomise_background, to_uint8
from ..plots import save_curve, save_image_grid
from ..training.backbones import SmallCNN
from ..atomic import atomic_torch_save, atomic_write_json, atomic_write_text
from ..utils import set_threads, stable_seed
from .model import load_embedded_generator

LOG = logging.getLogger("synrep.generator")
FIDELITY_TEMPLATES = ["a photo of a {}", "a product photo of a {}", "a {} on a white background", "a close-up photo of a {}"]


@dataclass
class FidelityConfig:
    generator: str = ""  # folder; empty = the shipped model
    out_dir: str = "runs/fidelity"
    dataset: str = "fashion-mnist"
    concepts: str = "fashion-mnist"
    guidance_scales: list[float] = field(default_factory=lambda: [1.0, 2.0, 2.5, 3.0, 5.0, 8.0])
    captions_per_class: int = 4
    seeds_per_caption: int = 8
    steps: int = 10
    classifier_epochs: int = 2
    classifier_train_size: int = 0  # real train images for the classifiers (0 = all)
    classifier_test_size: int = 0  # real test images that score the classifiers themselves, the first ones (0 = all)
    attribute_captions: int = 300  # attribute world (dataset=fmnist-world): real test captions drawn for per-attribute fidelity
    seed: int = 0
    num_threads: int = 0

    def check(self) -> None:
        problem = DATASETS.problem(self.dataset)
        require(problem is None, "dataset", problem or "")
        require(bool(self.guidance_scales) and all(math.isfinite(g) and g >= 0 for g in self.guidance_scales),
                "guidance_scales", f"must be finite numbers >= 0 (at least one), got {self.guidance_scales}")
        for key in ("captions_per_class", "seeds_per_caption", "steps", "classifier_epochs"):
            require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        require(self.seeds_per_caption >= 2, "seeds_per_caption", f"must be >= 2 (diversity compares images of a caption), got {self.seeds_per_caption}")
        for key in ("num_threads", "classifier_train_size", "classifier_test_size"):
            require(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        require(self.attribute_captions >= 6, "attribute_captions", f"must be >= 6, got {self.attribute_captions}")


class SpatialClassifier(nn.Module):
    """The small CNN with a 3 x 3 pooled map instead of a global mean, so that where things are (the attribute
    world's position, size) survives to the linear head: ``[B, 1, H, W]`` -> logits ``[B, classes]``."""

    def __init__(self, classes: int):
        super().__init__()
        self.cnn = SmallCNN(1, 32)
        self.pool = nn.AdaptiveAvgPool2d(3)
        self.head = nn.Linear(self.cnn.feature_dim * 9, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.cnn.features(x)).flatten(1))


def _first(images, limit: int = 0):
    """``images`` (LabeledImages), or their first ``limit`` when > 0."""
    return images.subset(np.arange(min(limit, len(images)))) if limit else images


def _real_test(dataset: str, limit: int = 0):
    """The real test split, or its first ``limit`` images when > 0."""
    return _first(load_dataset(dataset, "test"), limit)


def train_classifier(out_dir: Path, dataset: str, epochs: int, seed: int, limit: int = 0,
                     test_limit: int = 0) -> tuple[nn.Module, float]:
    """Small CNN + linear head on real train (the first ``limit`` images when > 0; cached in ``out_dir``); returns it
    and its accuracy (%) on real test (the first ``test_limit`` images when > 0).

    On the attribute world (``fmnist-world:<task>``) half of each batch is put on a random grey, noisy background
    (:func:`randomise_background`): trained on clean black canvases only, the classifiers read real images with grey
    noise at chance (class 15%, position 17%) although the generator's garments are where their captions say."""
    world = ":" in dataset
    name = "classifier.pt" if not world else f"classifier-{dataset.replace(':', '-')}-bg.pt"
    path = out_dir / name
    test = _real_test(dataset, test_limit)
    model = SpatialClassifier(len(test.class_names)) if world else nn.Sequential(SmallCNN(1, 32), nn.Linear(256, len(test.class_names)))
    xt = torch.from_numpy(test.images).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    if path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    else:
        train = load_dataset(dataset, "train")
        if limit:
            train = train.subset(np.arange(min(limit, len(train))))
        x = torch.from_numpy(train.images).permute(0, 3, 1, 2).float().div(127.5).sub(1)
        y = torch.from_numpy(train.labels)
        torch.manual_seed(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
        steps = epochs * (len(x) // 256)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
        g = torch.Generator().manual_seed(seed)
        model.train()
        for _ in tqdm(range(epochs), desc="fidelity classifier (real train)", unit="epoch", dynamic_ncols=True):
            order = torch.randperm(len(x), generator=g)
            for i in range(len(x) // 256):
                idx = order[i * 256:(i + 1) * 256]
                batch = randomise_background(x[idx], g) if world else x[idx]
                loss = nn.functional.cross_entropy(model(batch), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        atomic_torch_save(model.state_dict(), path)
    model.eval()
    with torch.no_grad():
        acc = float((torch.cat([model(xt[i:i + 1000]).argmax(1) for i in range(0, len(xt), 1000)]).numpy() == test.labels).mean() * 100)
    return model, acc


def accuracy_on_noisy_background(model: nn.Module, dataset: str, seed: int, limit: int = 0) -> float:
    """Top-1 (%) of ``model`` on the real test split (its first ``limit`` images when > 0) with every image on a
    random grey, noisy background: how well the classifier reads images like the generator's (a fidelity far below
    this is the generator's, not its)."""
    test = _real_test(dataset, limit)
    g = torch.Generator().manual_seed(seed)
    preds = []
    with torch.no_grad():
        for i in range(0, len(test), 1000):
            x = torch.from_numpy(test.images[i:i + 1000]).permute(0, 3, 1, 2).float().div(127.5).sub(1)
            preds.append(model(randomise_background(x, g, p=1.0)).argmax(1))
    return float((torch.cat(preds).numpy() == test.labels).mean() * 100)


def within_group_distance(images: np.ndarray) -> float:
    """Mean pairwise RMS distance (pixels in [0, 1]) within a group: uint8 ``[n, H, W, C]``."""
    x = images.reshape(len(images), -1).astype(np.float64) / 255.0
    d = np.sqrt(((x[:, None] - x[None]) ** 2).mean(-1))
    iu = np.triu_indices(len(x), 1)
    return float(d[iu].mean())


def run_fidelity(cfg: FidelityConfig) -> dict:
    set_threads(cfg.num_threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    generator = load_embedded_generator(cfg.generator or None)  # a bad generator or concept list fails before any training
    concepts = load_concepts(cfg.concepts)
    classifier, real_acc = train_classifier(out, cfg.dataset, cfg.classifier_epochs, cfg.seed, cfg.classifier_train_size,
                                            cfg.classifier_test_size)
    LOG.info("fidelity classifier: %.2f%% on real %s test", real_acc, cfg.dataset)
    classes = sorted((c for c in concepts.concepts if c.label is not None), key=lambda c: c.label)
    test = load_dataset(cfg.dataset, "test")
    rng = np.random.default_rng(cfg.seed)
    real_div = float(np.mean([within_group_distance(test.images[rng.choice(np.flatnonzero(test.labels == c.label), cfg.seeds_per_caption, replace=False)])
                              for c in classes for _ in range(cfg.captions_per_class)]))
    results = {"generator": cfg.generator or "shipped", "classifier_real_test_top1": real_acc, "steps": cfg.steps,
               "classifier_test_images": len(_first(test, cfg.classifier_test_size)),
               "real_within_class_distance": real_div, "scales": {}}
    for scale in cfg.guidance_scales:
        start = time.time()
        per_class, dists, grid_rows, grid_labels = {}, [], [], []
        for c in tqdm(classes, desc=f"fidelity @ guidance {scale}", unit="class", dynamic_ncols=True):
            captions = [FIDELITY_TEMPLATES[i % len(FIDELITY_TEMPLATES)].format(c.name) for i in range(cfg.captions_per_class)]
            prompts = [cap for cap in captions for _ in range(cfg.seeds_per_caption)]
            noise = torch.stack([torch.randn(generator.latent_shape(1)[1:], generator=torch.Generator().manual_seed(
                stable_seed("fidelity", cfg.seed, cap, j) % 2**63)) for cap in captions for j in range(cfg.seeds_per_caption)])
            images = generator.sample(prompts, noise, scale, cfg.steps)
            with torch.no_grad():
                pred = classifier(images * 2 - 1).argmax(1).numpy()
            per_class[c.name] = float((pred == c.label).mean() * 100)
            uint8 = to_uint8(images)
            uint8 = uint8.reshape(cfg.captions_per_class, cfg.seeds_per_caption, *uint8.shape[1:])
            dists.extend(within_group_distance(g) for g in uint8)
            grid_rows.append(list(uint8[0]))
            grid_labels.append(captions[0])
        seconds = time.time() - start
        n_images = len(classes) * cfg.captions_per_class * cfg.seeds_per_caption
        results["scales"][str(scale)] = {"mean_fidelity": float(np.mean(list(per_class.values()))), "per_class": per_class,
                                         "within_caption_distance": float(np.mean(dists)), "min_within_caption_distance": float(np.min(dists)),
                                         "images_per_second": n_images / seconds}
        save_image_grid(out / f"samples_guidance_{scale:g}.png", grid_rows, grid_labels,
                        title=f"embedded generator, guidance {scale:g}, {cfg.steps} DDIM steps (rows: captions, columns: seeds)")
        LOG.info("guidance %g: fidelity %.1f%%, within-caption distance %.3f, %.1f img/s", scale,
                 results["scales"][str(scale)]["mean_fidelity"], results["scales"][str(scale)]["within_caption_distance"], n_images / seconds)
    scales = [float(s) for s in results["scales"]]
    save_curve(out / "fidelity_diversity.png",
               {"fidelity (%)": (scales, [results["scales"][str(s)]["mean_fidelity"] for s in cfg.guidance_scales]),
                "diversity x 100": (scales, [100 * results["scales"][str(s)]["within_caption_distance"] for s in cfg.guidance_scales])},
               title="fidelity vs diversity over guidance scale", xlabel="guidance scale", ylabel="value")
    if DATASETS.traits(cfg.dataset).get("image_captions"):
        results["attributes"] = attribute_fidelity(cfg, generator, out)
    atomic_write_json(out / "fidelity.json", results)
    atomic_write_text(out / "fidelity.md", fidelity_table(results))
    return results


def attribute_fidelity(cfg: FidelityConfig, generator, out: Path) -> dict:
    """Per-attribute fidelity on the attribute world: images drawn from real *test* captions (at the first guidance
    scale), each attribute read back by a classifier trained on the real *train* split for that attribute."""
    from ..world import ATTRIBUTES, build_split

    _, classes, attrs, captions = build_split("test")
    rng = np.random.default_rng(cfg.seed)
    rows = np.sort(rng.choice(len(captions), min(cfg.attribute_captions, len(captions)), replace=False))
    prompts = [captions[i] for i in rows]
    noise = torch.stack([torch.randn(generator.latent_shape(1)[1:], generator=torch.Generator().manual_seed(
        stable_seed("attribute-fidelity", cfg.seed, int(i)) % 2**63)) for i in rows])
    images = torch.cat([generator.sample(prompts[k:k + 64], noise[k:k + 64], cfg.guidance_scales[0], cfg.steps)
                        for k in range(0, len(prompts), 64)])
    truth = {"class": classes[rows], **{name: values[rows] for name, values in attrs.items()}}
    result = {"guidance": cfg.guidance_scales[0], "captions": len(rows), "tasks": {}}
    for task in ("class", *ATTRIBUTES):
        classifier, real_acc = train_classifier(out, f"fmnist-world:{task}", cfg.classifier_epochs, cfg.seed, cfg.classifier_train_size,
                                                cfg.classifier_test_size)
        with torch.no_grad():
            pred = classifier(images * 2 - 1).argmax(1).numpy()
        chance = 100.0 / (10 if task == "class" else len(ATTRIBUTES[task]))
        noisy_acc = accuracy_on_noisy_background(classifier, f"fmnist-world:{task}", cfg.seed, cfg.classifier_test_size)
        result["tasks"][task] = {"fidelity": float((pred == truth[task]).mean() * 100), "chance": chance,
                                 "classifier_real_test_top1": real_acc, "classifier_noisy_real_test_top1": noisy_acc}
        LOG.info("attribute fidelity %s: %.1f%% (chance %.1f%%, classifier on real test %.1f%%, on real test with noisy "
                 "backgrounds %.1f%%)", task, result["tasks"][task]["fidelity"], chance, real_acc, noisy_acc)
    shown = prompts[:6]  # rows: captions, columns: seeds, so each row's label is every image's caption
    grid_noise = torch.stack([torch.randn(generator.latent_shape(1)[1:], generator=torch.Generator().manual_seed(
        stable_seed("attribute-grid", cfg.seed, k, j) % 2**63)) for k in range(len(shown)) for j in range(6)])
    grid = to_uint8(generator.sample([c for c in shown for _ in range(6)], grid_noise, cfg.guidance_scales[0], cfg.steps))
    save_image_grid(out / "attribute_samples.png", [list(grid[k * 6:(k + 1) * 6]) for k in range(len(shown))], shown,
                    title=f"attribute world, guidance {cfg.guidance_scales[0]:g}: real test captions (rows), seeds (columns)")
    return result


def fidelity_table(results: dict) -> str:
    classes = list(next(iter(results["scales"].values()))["per_class"])
    lines = [f"Classifier trained on real train: {results['classifier_real_test_top1']:.2f}% on real test. "
             f"Real test images of one class: mean pairwise RMS distance {results['real_within_class_distance']:.3f}.", "",
             "| guidance | mean fidelity (%) | within-caption distance | min over captions | img/s | " + " | ".join(classes) + " |",
             "|---:|---:|---:|---:|---:|" + "---:|" * len(classes)]
    for scale, r in results["scales"].items():
        lines.append(f"| {scale} | {r['mean_fidelity']:.1f} | {r['within_caption_distance']:.3f} | {r['min_within_caption_distance']:.3f} | "
                     f"{r['images_per_second']:.1f} | " + " | ".join(f"{r['per_class'][c]:.0f}" for c in classes) + " |")
    if "attributes" in results:
        a = results["attributes"]
        lines += ["", f"Per-attribute fidelity: {a['captions']} real test captions of the attribute world drawn at guidance "
                      f"{a['guidance']:g}; each attribute read back by a classifier trained on the real train split.", "",
                  "| attribute | fidelity (%) | chance (%) | its classifier on real test (%) | on real test, noisy grey backgrounds (%) |",
                  "|---|---:|---:|---:|---:|"]
        lines += [f"| {t} | {v['fidelity']:.1f} | {v['chance']:.1f} | {v['classifier_real_test_top1']:.1f} | "
                  f"{v['classifier_noisy_real_test_top1']:.1f} |" for t, v in a["tasks"].items()]
    return "\n".join(lines) + "\n"
