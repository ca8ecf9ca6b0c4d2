import json
import logging
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import synrep.evaluation.features as features_mod
import synrep.evaluation.probes as probes_mod
import synrep.evaluation.stage as stage_mod
from synrep.config import ConfigError, load_config
from synrep.datasets import LabeledImages
from synrep.evaluation.probes import (DEFAULT_CS, LogRegProblem, ProbeError, Rows, few_shot, fit_logreg, knn_classify,
                                      knn_predict, knn_predict_many, linear_probe)
from synrep.evaluation.stage import EvalConfig, evaluate
from synrep.sources import SourceError
from synrep.training.backbones import BackboneConfig
from synrep.training.export import EncoderError, load_encoder


def _toy(n=300, d=5, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    centres = np.eye(3, d) * 6
    return (centres[y] + rng.normal(size=(n, d))).astype(np.float32), y


def test_linear_probe_recovers_separable_toy_problem():
    x, y = _toy()
    xt, yt = _toy(seed=1)
    r = linear_probe(x, y, xt, yt)
    assert r["top1"] > 99 and r["grid"] == sorted(DEFAULT_CS) and len(r["val_top1"]) == len(r["val_fits"]) == len(DEFAULT_CS)
    assert r["C"] in r["grid"] and r["converged"] and r["not_converged"] == []
    assert DEFAULT_CS[0] == pytest.approx(1e-5) and DEFAULT_CS[-1] == pytest.approx(1e6) and len(DEFAULT_CS) >= 12


def test_knn_on_identical_train_and_test_is_perfect():
    x, y = _toy(seed=2)
    assert knn_classify(x, y, x, y, k=1)["top1"] == 100.0
    assert knn_classify(x, y, x, y, k=20)["top1"] > 95


def test_few_shot_draws_are_seeded_and_distinct():
    x, y = _toy(seed=3)
    a = few_shot(x, y, x, y, shots=(1, 5), draws=4, seed=0)
    b = few_shot(x, y, x, y, shots=(1, 5), draws=4, seed=0)
    c = few_shot(x, y, x, y, shots=(1, 5), draws=4, seed=1)
    assert a == b and a["1"]["support_hash"] != c["1"]["support_hash"]
    assert len(set(a["5"]["support_hash"])) == 4, "the draws differ from each other"
    assert a["5"]["mean"] > 90


def test_probe_errors_are_clear():
    x, y = _toy()
    with pytest.raises(ProbeError, match="feature dimension mismatch"):
        linear_probe(x, y, x[:, :3], y)
    y_missing = y.copy()
    y_missing[y_missing == 2] = 0
    with pytest.raises(ProbeError, match="class 2 has only 0"):
        few_shot(x, y_missing, x, y, shots=(1,))


def test_eval_stage_pixels_and_random_on_tiny_dataset(tmp_path):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(2), 60)
    images = np.zeros((120, 8, 8, 1), np.uint8)
    images[y == 1, :4] = 200
    images = np.clip(images + rng.integers(0, 40, images.shape), 0, 255).astype(np.uint8)
    data = LabeledImages(images, y, ["a", "b"], "toy", "train")
    r = evaluate(EvalConfig(encoder="pixels", out_dir=str(tmp_path / "p"), shots=[1, 5], num_workers=0), train=data, test=data)
    assert r["linear"]["top1"] == 100.0 and (tmp_path / "p" / "eval.json").exists() and "| pixels |" in (tmp_path / "p" / "eval.md").read_text()
    assert r["linear"]["converged"] and r["feature_dim"] == 64
    # eval.json records the grid, validation top-1 and convergence per C, the choice, the refit and kNN per k.
    saved = json.loads((tmp_path / "p" / "eval.json").read_text())["linear"]
    assert saved["grid"] == sorted(DEFAULT_CS) and len(saved["val_top1"]) == len(saved["val_fits"]) == len(saved["grid"])
    assert saved["C"] in saved["grid"] and saved["rows"] == {"selection": 96, "validation": 24, "refit": 120}
    assert all(f["stop"] == "gradient" for f in saved["val_fits"]) and saved["fit"]["rows"] == 120
    r = evaluate(EvalConfig(encoder="random:cnn", out_dir=str(tmp_path / "r"), protocols=["knn"], num_workers=0, knn_ks=[5, 200],
                            random_backbone=BackboneConfig(image_size=8)), train=data, test=data)
    assert r["feature_dim"] == 256 and "linear" not in r
    assert r["knn"]["k"] == 20 and sorted(r["knn"]["top1_by_k"], key=int) == ["5", "20", "120"]
    assert json.loads((tmp_path / "r" / "eval.json").read_text())["knn"]["top1_by_k"] == r["knn"]["top1_by_k"]


def test_tampered_pickle_checkpoint_is_refused_without_loading(tmp_path):
    class Boom:
        def __reduce__(self):
            return (exec, ("open('" + str(tmp_path / "pwned") + "', 'w').write('x')",))

    bad = tmp_path / "ckpt"
    bad.mkdir()
    (bad / "checkpoint.pt").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(EncoderError, match="not a synrep encoder"):
        load_encoder(bad / "checkpoint.pt")
    assert not (tmp_path / "pwned").exists()


# --- the torch probes against sklearn and direct computations ---------------------------------------------

def _overlapping(n, d, k, seed):
    centres = np.random.default_rng(k).normal(size=(k, d)) * 1.5  # the same classes for every seed
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    return (centres[y] + rng.normal(size=(n, d)) * np.linspace(0.5, 3, d)).astype(np.float32), y


@pytest.mark.parametrize("classes", [4, 2])
def test_torch_logistic_regression_matches_sklearn(classes):
    from sklearn.linear_model import LogisticRegression

    x, y = _overlapping(600, 12, classes, seed=classes)
    xt, yt = _overlapping(2000, 12, classes, seed=classes + 10)
    fit = fit_logreg(x, y, C=0.05, tol=1e-6, max_iter=2000)
    assert fit.converged and fit.grad_max < 1e-4  # float32 compute: stops near 1e-5
    z = (x - fit.mean) / fit.std
    ref = LogisticRegression(C=0.05, tol=1e-10, max_iter=10000).fit(z, y)
    assert fit.coef_.shape == ref.coef_.shape  # binary: one logit vector, as sklearn
    np.testing.assert_allclose(fit.coef_, ref.coef_, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(fit.intercept_, ref.intercept_, rtol=1e-3, atol=1e-3)
    ours, theirs = fit.score(xt, yt), ref.score((xt - fit.mean) / fit.std, yt) * 100
    assert abs(ours - theirs) <= 0.5 and ours > 100 / classes + 10
    # Chunked accumulation (7-row chunks, nothing resident) and a memmap-style row view give the same fit.
    order = np.random.default_rng(0).permutation(len(x) + 50)
    big = np.zeros((len(x) + 50, 12), np.float16)
    big[order[:len(x)]] = x
    rows = Rows(big, np.sort(order[:len(x)]))
    chunked = fit_logreg(rows, y[np.argsort(order[:len(x)])], C=0.05, tol=1e-6, max_iter=2000, rows=7, resident_bytes=0)
    np.testing.assert_allclose(chunked.coef_, fit.coef_, rtol=2e-2, atol=2e-3)  # float16 storage
    # A warm start (another C, other rows, other standardisation) reaches the same solution.
    warm = fit_logreg(x, y, C=0.05, tol=1e-6, max_iter=2000, init=fit_logreg(x[:300] * 2 + 1, y[:300], C=1.0))
    np.testing.assert_allclose(warm.coef_, fit.coef_, rtol=1e-3, atol=1e-3)
    # Fewer rows than dimensions (few-shot fits: no preconditioner) reach sklearn's solution too.
    xw, yw = _overlapping(40, 60, classes, seed=classes + 20)
    wide = fit_logreg(xw, yw, C=0.05, tol=1e-6)
    ref = LogisticRegression(C=0.05, tol=1e-10, max_iter=10000).fit((xw - wide.mean) / wide.std, yw)
    assert wide.converged and wide.passes < 100
    np.testing.assert_allclose(wide.coef_, ref.coef_, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(wide.intercept_, ref.intercept_, rtol=1e-3, atol=1e-3)


def test_linear_probe_reports_convergence_instead_of_hiding_it(caplog):
    x, y = _overlapping(400, 10, 3, seed=5)
    with caplog.at_level(logging.WARNING, logger="synrep.eval"):
        r = linear_probe(x, y, x, y, Cs=(0.01, 1.0), max_iter=2)
    assert r["converged"] is False and r["iterations"] == 2 and [f["iterations"] for f in r["val_fits"]] == [2, 2]
    # Every fit that stopped early is listed (both selection fits and the refit) and logged with its C.
    assert [(f["fit"], f["C"], f["stop"]) for f in r["not_converged"]] == [
        ("selection", 0.01, "max_iter"), ("selection", 1.0, "max_iter"), ("refit", r["C"], "max_iter")]
    assert all(f["grad_max"] > 1e-4 and not f["converged"] for f in r["not_converged"])
    assert caplog.text.count("did not converge") == 3 and "selection fit at C=0.01" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="synrep.eval"):
        r = linear_probe(x, y, x, y, Cs=(0.01, 1.0))
    assert r["converged"] is True and r["not_converged"] == [] and "did not converge" not in caplog.text
    assert r["fit"]["grad_max"] <= 1e-4 and all(f["stop"] == "gradient" and f["grad_max"] <= 1e-4 for f in r["val_fits"])
    # A tighter tol is met too (the loss is summed in float64, so the line search still resolves the last steps).
    tight = fit_logreg(x, y, C=1.0, tol=1e-7)
    assert tight.converged and tight.grad_max <= 1e-7


def _noisy_high_dim(n, seed):
    """Two classes told apart by a weak signal in 5 dimensions, among 400 pure-noise dimensions."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, 405)).astype(np.float32)
    x[:, :5] += 0.5 * (2 * y - 1)[:, None]
    return x, y


def _hidden_direction(n, seed):
    """Separable only along x0 - x1: the class means differ by a little, a shared noise is large."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    shared = rng.normal(size=n)
    x = np.stack([shared + 0.1 * (2 * y - 1), shared, rng.normal(size=n)], 1).astype(np.float32)
    return x, y


def test_grid_selection_picks_the_best_validation_value():
    grid = tuple(np.logspace(-5, 6, 12))
    # Few rows, many noise dimensions: weak regularisation overfits the noise, strong regularisation wins.
    # (600 rows fit, 1400 score: a validation top-1 precise enough to see it.)
    x, y = _noisy_high_dim(2000, seed=0)
    xt, yt = _noisy_high_dim(2000, seed=1)
    noisy = linear_probe(x, y, xt, yt, Cs=grid, val_fraction=0.7)
    val = noisy["val_top1"]
    assert noisy["C"] == noisy["grid"][int(np.argmax(val))], "the first (smallest) C with the best validation top-1"
    assert noisy["C"] <= 1e-2 and max(val) >= val[-1] + 5 and noisy["top1"] > 80
    assert val[0] < 55, "the strongest regularisation leaves only the bias: the majority class"
    # The discriminating direction is not the class-mean difference: only weak regularisation finds it.
    x, y = _hidden_direction(600, seed=2)
    xt, yt = _hidden_direction(2000, seed=3)
    hidden = linear_probe(x, y, xt, yt, Cs=grid)
    val = hidden["val_top1"]
    assert hidden["C"] == hidden["grid"][int(np.argmax(val))] and hidden["C"] >= 1
    assert val[0] < 70 and max(val) > 98 and hidden["top1"] > 98
    # Ties go to the stronger regularisation: a problem every C solves perfectly picks the smallest.
    x, y = _toy()
    easy = linear_probe(x, y, x, y, Cs=(10.0, 0.1, 1.0))
    assert easy["grid"] == [0.1, 1.0, 10.0] and easy["val_top1"] == [100.0] * 3 and easy["C"] == 0.1


def test_grid_is_a_warm_started_path_and_the_refit_sees_train_plus_validation(monkeypatch):
    x, y = _overlapping(500, 8, 3, seed=11)
    problems, fits = [], []
    real_init, real_fit = LogRegProblem.__init__, LogRegProblem.fit

    def init(self, rows, labels, *a, **k):
        problems.append(len(rows))
        real_init(self, rows, labels, *a, **k)

    def fit(self, C, *a, init=None, **k):
        fits.append((self.n, C, None if init is None else init.C))
        return real_fit(self, C, *a, init=init, **k)
    monkeypatch.setattr(LogRegProblem, "__init__", init)
    monkeypatch.setattr(LogRegProblem, "fit", fit)
    r = linear_probe(x, y, x[:50], y[:50], Cs=(1.0, 0.01, 0.1), val_fraction=0.3, seed=4)
    assert r["rows"] == {"selection": 350, "validation": 150, "refit": 500}
    assert problems == [350, 500], "one problem for the whole grid, one for the refit on train + validation"
    assert fits[:3] == [(350, 0.01, None), (350, 0.1, 0.01), (350, 1.0, 0.1)], "ascending C, each from the last"
    assert fits[3] == (500, r["C"], r["C"]) and r["fit"]["rows"] == 500 and r["fit"]["C"] == r["C"]
    # The refit is the fit on all rows at the chosen C (warm start or not).
    monkeypatch.undo()
    direct = fit_logreg(x, y, C=r["C"], tol=1e-6)
    again = linear_probe(x, y, x, y, Cs=(1.0, 0.01, 0.1), val_fraction=0.3, seed=4, tol=1e-6)
    assert again["C"] == r["C"] and again["top1"] == pytest.approx(direct.score(x, y), abs=0.21)
    # The held-out rows are seeded and stratified.
    a, b = probes_mod._stratified_split(y, 0.3, 4), probes_mod._stratified_split(y, 0.3, 4)
    assert all((u == v).all() for u, v in zip(a, b)) and not (a[1] == probes_mod._stratified_split(y, 0.3, 5)[1]).all()
    np.testing.assert_allclose(np.bincount(y[a[1]]) / len(a[1]), np.bincount(y) / len(y), atol=0.01)


def test_chunked_knn_equals_direct_computation():
    x, y = _overlapping(500, 16, 5, seed=7)
    xt, yt = _overlapping(130, 16, 5, seed=8)
    k, temperature = 7, 0.1
    a = torch.nn.functional.normalize(torch.from_numpy(xt), dim=1)
    b = torch.nn.functional.normalize(torch.from_numpy(x), dim=1)
    sims, idx = (a @ b.t()).topk(k, dim=1)
    votes = torch.zeros(len(xt), 5).scatter_add_(1, torch.from_numpy(y)[idx], (sims / temperature).exp())
    direct = votes.argmax(1).numpy()
    chunked = knn_predict(x, y, xt, k, temperature, batch=32, train_rows=45, resident_bytes=0)
    resident = knn_predict(x, y, xt, k, temperature, batch=32, train_rows=45)
    assert (chunked == direct).all() and (resident == direct).all()
    assert knn_classify(x, y, xt, yt, k, temperature, batch=17, train_rows=3)["top1"] == pytest.approx(100 * (direct == yt).mean())


def test_knn_at_many_k_from_one_search_equals_separate_searches(monkeypatch):
    x, y = _overlapping(700, 16, 5, seed=12)
    xt, yt = _overlapping(150, 16, 5, seed=13)
    searches = []
    real_top = probes_mod._knn_top
    monkeypatch.setattr(probes_mod, "_knn_top", lambda *a: searches.append(a[3]) or real_top(*a))
    many = knn_predict_many(x, y, xt, (100, 1, 20, 7), 0.07, batch=32, train_rows=64)
    assert searches == [100], "one search, for the largest k"
    assert sorted(many) == [1, 7, 20, 100]
    for k, pred in many.items():
        np.testing.assert_array_equal(pred, knn_predict(x, y, xt, k, 0.07, batch=50, train_rows=90))
    r = knn_classify(x, y, xt, yt, k=20, ks=(10, 100, 1000))
    assert r["k"] == 20 and sorted(r["top1_by_k"], key=int) == ["10", "20", "100", "700"], "k is capped at the train rows"
    for k, top1 in r["top1_by_k"].items():
        assert top1 == pytest.approx(knn_classify(x, y, xt, yt, k=int(k))["top1"])
    assert r["top1"] == r["top1_by_k"]["20"] and len(set(r["top1_by_k"].values())) > 1
    with pytest.raises(ProbeError, match="k >= 1"):
        knn_predict_many(x, y, xt, (0, 5))


# --- the stage: config, feature cache, image folders ------------------------------------------------------

def test_eval_config_values_are_checked_with_the_key_named(tmp_path):
    with pytest.raises(ConfigError, match="crop_fraction"):
        evaluate(EvalConfig(crop_fraction=1.5, out_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match="test_split"):
        evaluate(EvalConfig(test_split="train", out_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match="device"):
        evaluate(EvalConfig(device="gpu0", out_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match="protocols"):
        load_config(EvalConfig, overrides=["protocols=linear,svm"])
    with pytest.raises(ConfigError, match="'num_workers': must be >= 0"):
        load_config(EvalConfig, overrides=["num_workers=-1"])
    for override, key in [("Cs=0.1,-1", "Cs"), ("Cs=0.1,inf", "Cs"), ("val_fraction=0", "val_fraction"),
                          ("val_fraction=1", "val_fraction"), ("linear_tol=0", "linear_tol"),
                          ("linear_max_iter=0", "linear_max_iter"), ("knn_ks=10,0", "knn_ks"), ("knn_k=0", "knn_k")]:
        with pytest.raises(ConfigError, match=f"config key '{key}'"):
            load_config(EvalConfig, overrides=[override])
    with pytest.raises(ConfigError, match="config key 'Cs'"):
        evaluate(EvalConfig(Cs=[], out_dir=str(tmp_path)))
    cfg = load_config(EvalConfig, overrides=["Cs=0.5,2", "knn_ks=5,50", "val_fraction=0.25"])
    assert cfg.Cs == [0.5, 2.0] and cfg.knn_ks == [5, 50] and cfg.val_fraction == 0.25
    assert not any(tmp_path.iterdir()), "nothing is written for a bad config"


def _image_folder(root, splits=("train", "val"), per_class=6, broken=None):
    """Two classes (dark, bright) of RGB images whose sizes differ from image to image."""
    rng = np.random.default_rng(0)
    sizes = [(12, 16), (16, 16), (20, 9), (9, 14), (16, 24), (30, 30)]
    for split in splits:
        for c, cls in enumerate(["dark", "bright"]):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                h, w = sizes[i % len(sizes)]
                img = np.clip(60 + 120 * c + rng.integers(-30, 30, (h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(root / split / cls / f"{i}.png")
    if broken:
        (root / broken).write_bytes(b"not a png at all")
    return root


def _folder_cfg(root, out, **kw):
    base = dict(encoder="random:cnn", dataset=f"imagefolder:{root}", test_split="val", out_dir=str(out), num_workers=0,
                batch_size=4, protocols=["linear", "knn"], Cs=[1.0], knn_k=3,
                random_backbone=BackboneConfig(name="cnn", image_size=16, in_channels=3, width=8))
    base.update(kw)
    return EvalConfig(**base)


def test_image_folder_with_val_split_and_mixed_sizes(tmp_path):
    root = _image_folder(tmp_path / "data")
    r = evaluate(_folder_cfg(root, tmp_path / "e"))
    assert r["train_images"] == 12 and r["test_images"] == 12 and r["test_split"] == "val" and r["image_size"] == 16
    assert r["linear"]["top1"] == 100.0 and r["knn"]["top1"] == 100.0
    manifest = json.loads((tmp_path / "e" / "features" / "val" / "manifest.json").read_text())
    assert manifest["count"] == 12 and manifest["split"] == "val" and manifest["crop_fraction"] == 0.875
    # pixels on images of mixed sizes: the size comes from random_backbone (16 x 16 x 3 = 768 values).
    r = evaluate(_folder_cfg(root, tmp_path / "p", encoder="pixels", num_workers=1))
    assert r["feature_dim"] == 16 * 16 * 3 and r["linear"]["top1"] == 100.0


def test_unreadable_image_is_named(tmp_path):
    root = _image_folder(tmp_path / "data", broken="train/bright/zz-broken.png")
    for workers in (0, 1):
        with pytest.raises(SourceError, match="zz-broken.png"):
            evaluate(_folder_cfg(root, tmp_path / f"e{workers}", num_workers=workers))


def test_feature_cache_is_reused_resumed_and_rebuilt(tmp_path, monkeypatch, caplog):
    root = _image_folder(tmp_path / "data", per_class=9)  # 18 images per split: 5 chunks of 4
    out = tmp_path / "e"
    cache = out / "features" / "train"
    encoded = []
    real_encode = features_mod.encode_batch
    monkeypatch.setattr(features_mod, "encode_batch", lambda *a: encoded.append(len(a[1])) or real_encode(*a))

    first = evaluate(_folder_cfg(root, out))
    feats = np.load(cache / "features.npy")
    assert feats.dtype == np.float16 and feats.shape == (18, 8 * 8) and sum(encoded) == 36
    assert sorted(p.name for p in cache.iterdir()) == ["features.npy", "labels.npy", "manifest.json"]
    assert not first["feature_cache"]["train"]["reused"]

    # A rerun reads no image: the dataset is never even opened.
    def no_images(*a, **k):
        raise AssertionError("images were read again")
    monkeypatch.setattr(stage_mod, "open_real", no_images)
    monkeypatch.setattr(features_mod, "SequentialImages", no_images)
    again = evaluate(_folder_cfg(root, out, batch_size=5))  # the chunk size does not change finished features
    assert again["feature_cache"]["train"]["reused"] and again["linear"]["top1"] == first["linear"]["top1"]
    monkeypatch.undo()
    monkeypatch.setattr(features_mod, "encode_batch", lambda *a: encoded.append(len(a[1])) or real_encode(*a))

    # Killed after two chunks: they stay on disk and a rerun encodes only the other three.
    for name in ("manifest.json", "features.npy", "labels.npy"):
        (cache / name).unlink()
    real_write, writes = features_mod._write_chunk, []

    def dying_write(*a):
        if len(writes) == 2:
            raise KeyboardInterrupt
        writes.append(a[1])
        real_write(*a)
    monkeypatch.setattr(features_mod, "_write_chunk", dying_write)
    with pytest.raises(KeyboardInterrupt):
        evaluate(_folder_cfg(root, out))
    assert len(list(cache.glob("chunk-*.labels.npy"))) == 2 and (cache / "progress.json").exists()
    assert not (cache / "manifest.json").exists()
    monkeypatch.setattr(features_mod, "_write_chunk", real_write)
    encoded.clear()
    resumed = evaluate(_folder_cfg(root, out))
    assert resumed["feature_cache"]["train"]["resumed_chunks"] == 2 and len(encoded) == 3
    np.testing.assert_array_equal(np.load(cache / "features.npy"), feats)

    # Other settings: the finished cache is rebuilt, with a warning naming what changed.
    encoded.clear()
    with caplog.at_level(logging.WARNING, logger="synrep.eval"):
        changed = evaluate(_folder_cfg(root, out, crop_fraction=1.0))
    assert "rebuilding" in caplog.text and "crop_fraction: 0.875 -> 1.0" in caplog.text
    assert sum(encoded) == 36 and not changed["feature_cache"]["train"]["reused"]
    assert json.loads((cache / "manifest.json").read_text())["crop_fraction"] == 1.0

    # Partial chunks of another chunk size are discarded, not mixed in.
    for name in ("manifest.json", "features.npy", "labels.npy"):
        (cache / name).unlink()
    monkeypatch.setattr(features_mod, "_write_chunk", dying_write)
    writes.clear()
    with pytest.raises(KeyboardInterrupt):
        evaluate(_folder_cfg(root, out, crop_fraction=1.0))
    monkeypatch.setattr(features_mod, "_write_chunk", real_write)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="synrep.eval"):
        r = evaluate(_folder_cfg(root, out, crop_fraction=1.0, batch_size=5))
    assert "discarding 2 partial chunk(s)" in caplog.text and r["feature_cache"]["train"]["resumed_chunks"] == 0
    assert r["linear"]["top1"] == changed["linear"]["top1"]


def test_probe_train_size_encodes_only_the_subset_or_reads_rows_of_a_whole_cache(tmp_path, monkeypatch):
    root = _image_folder(tmp_path / "data", per_class=9)
    encoded = []
    real_encode = features_mod.encode_batch
    monkeypatch.setattr(features_mod, "encode_batch", lambda *a: encoded.append(len(a[1])) or real_encode(*a))
    with pytest.raises(ProbeError, match="validation split"):
        evaluate(_folder_cfg(root, tmp_path / "tiny", probe_train_size=4, protocols=["linear"]))
    encoded.clear()
    sub = evaluate(_folder_cfg(root, tmp_path / "s", probe_train_size=14))
    assert sub["train_images"] == 14 and sum(encoded) == 14 + 18, "only the subset of train is encoded"
    manifest = json.loads((tmp_path / "s" / "features" / "train" / "manifest.json").read_text())
    assert manifest["rows"] == {"stratified_subset": 14, "seed": 0} and manifest["count"] == 14
    sub_labels = np.load(tmp_path / "s" / "features" / "train" / "labels.npy")
    assert np.bincount(sub_labels).tolist() == [7, 7]

    whole = evaluate(_folder_cfg(root, tmp_path / "w"))
    assert whole["train_images"] == 18
    encoded.clear()
    again = evaluate(_folder_cfg(root, tmp_path / "w", probe_train_size=14))
    assert encoded == [] and again["feature_cache"]["train"]["reused"] and again["train_images"] == 14
    # The same subset both ways.
    keep = features_mod.stratified_subset(np.load(tmp_path / "w" / "features" / "train" / "labels.npy"), 14, 0)
    whole_feats = np.load(tmp_path / "w" / "features" / "train" / "features.npy")
    np.testing.assert_allclose(np.load(tmp_path / "s" / "features" / "train" / "features.npy").astype(np.float32),
                               whole_feats[keep].astype(np.float32), atol=2e-3)
    assert again["linear"]["top1"] == sub["linear"]["top1"]


def test_rows_of_a_memory_map_read_the_right_rows_whole_or_sliced(tmp_path):
    data = np.arange(60, dtype=np.float32).reshape(15, 4)
    np.save(tmp_path / "f.npy", data)
    mapped = np.load(tmp_path / "f.npy", mmap_mode="r")
    np.testing.assert_array_equal(Rows(mapped).read(3, 6), data[3:6])
    np.testing.assert_array_equal(Rows(mapped[5:]).read(0, 2), data[5:7])  # a slice keeps its parent's offset
    np.testing.assert_array_equal(Rows(mapped[5:]).take(np.array([1, 3])).read(0, 2), data[[6, 8]])
