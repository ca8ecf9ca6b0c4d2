import pickle

import numpy as np
import pytest

from synrep.datasets import LabeledImages
from synrep.evaluation.probes import ProbeError, few_shot, knn_classify, linear_probe
from synrep.evaluation.stage import EvalConfig, evaluate
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
    assert r["top1"] > 99 and r["C"] in (0.01, 0.1, 1.0) and set(r["val_top1"]) == {0.01, 0.1, 1.0}


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
    r = evaluate(EvalConfig(encoder="pixels", out_dir=str(tmp_path / "p"), shots=[1, 5]), train=data, test=data)
    assert r["linear"]["top1"] == 100.0 and (tmp_path / "p" / "eval.json").exists() and "| pixels |" in (tmp_path / "p" / "eval.md").read_text()
    r = evaluate(EvalConfig(encoder="random:cnn", out_dir=str(tmp_path / "r"), protocols=["knn"]), train=data, test=data)
    assert r["feature_dim"] == 256 and "linear" not in r


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
