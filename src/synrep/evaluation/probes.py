"""Evaluation protocols on frozen features: linear probe, kNN, few-shot. The test split chooses nothing."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import torch

LOG = logging.getLogger("synrep.eval")


class ProbeError(ValueError):
    """Features and labels do not fit the protocol (shape mismatch, a class without examples, ...)."""


def _check(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> None:
    if train_x.ndim != 2 or test_x.ndim != 2:
        raise ProbeError(f"features must be [N, D]; got train {train_x.shape}, test {test_x.shape}")
    if train_x.shape[1] != test_x.shape[1]:
        raise ProbeError(f"feature dimension mismatch: train has {train_x.shape[1]}, test has {test_x.shape[1]}")
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise ProbeError("each feature row needs exactly one label")


def _standardise(train_x: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    mean = train_x.mean(0, keepdims=True)
    std = train_x.std(0, keepdims=True) + 1e-6
    return [(a - mean) / std for a in (train_x, *others)]


def _logreg(C: float, max_iter: int):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, max_iter=max_iter, tol=1e-3)


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 Cs: tuple[float, ...] = (0.01, 0.1, 1.0), val_fraction: float = 0.15, seed: int = 0,
                 max_iter: int = 200) -> dict:
    """Multinomial logistic regression (lbfgs) on standardised features.

    ``C`` is chosen on a validation split carved from train (stratified, ``val_fraction``), then the
    probe is refit on all of train and scored once on test. Returns top-1 (%) and the choices made.
    """
    _check(train_x, train_y, test_x, test_y)
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import train_test_split

    tr_idx, va_idx = train_test_split(np.arange(len(train_y)), test_size=val_fraction, random_state=seed, stratify=train_y)
    val_scores = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        a, b = _standardise(train_x[tr_idx], train_x[va_idx])
        for C in Cs:
            val_scores[C] = float(_logreg(C, max_iter).fit(a, train_y[tr_idx]).score(b, train_y[va_idx]) * 100)
        best = max(Cs, key=lambda c: (val_scores[c], -c))
        a, b = _standardise(train_x, test_x)
        top1 = float(_logreg(best, max_iter).fit(a, train_y).score(b, test_y) * 100)
    return {"top1": top1, "C": best, "val_top1": val_scores}


def knn_classify(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, k: int = 20,
                 temperature: float = 0.07, batch: int = 1024) -> dict:
    """Weighted kNN on cosine similarity: each of the k neighbours votes exp(sim / T) for its label."""
    _check(train_x, train_y, test_x, test_y)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    tr = torch.nn.functional.normalize(torch.from_numpy(train_x).float(), dim=1)
    te = torch.nn.functional.normalize(torch.from_numpy(test_x).float(), dim=1)
    labels = torch.from_numpy(train_y).long()
    k = min(k, len(tr))
    correct = 0
    for start in range(0, len(te), batch):
        sims, idx = (te[start:start + batch] @ tr.t()).topk(k, dim=1)
        votes = torch.zeros(len(sims), num_classes).scatter_add_(1, labels[idx], (sims / temperature).exp())
        correct += int((votes.argmax(1).numpy() == test_y[start:start + batch]).sum())
    return {"top1": 100.0 * correct / len(te), "k": k, "temperature": temperature}


def few_shot(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
             shots: tuple[int, ...] = (1, 5, 10), draws: int = 5, seed: int = 0, C: float = 1.0) -> dict:
    """Logistic regression on ``n`` labelled examples per class, ``draws`` seeded draws per n: mean ± std top-1.

    C is fixed (there is no validation data to choose it with at 1 shot).
    """
    _check(train_x, train_y, test_x, test_y)
    classes = np.unique(np.concatenate([train_y, test_y]))
    results = {}
    for n in shots:
        accs, draws_used = [], []
        for d in range(draws):
            rng = np.random.default_rng([seed, n, d])
            support = []
            for c in classes:
                pool = np.flatnonzero(train_y == c)
                if len(pool) < n:
                    raise ProbeError(f"few-shot {n}: class {int(c)} has only {len(pool)} training examples")
                support.extend(rng.choice(pool, n, replace=False).tolist())
            support = np.array(support)
            draws_used.append(support.tolist())
            a, b = _standardise(train_x[support], test_x)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                accs.append(float(_logreg(C, 500).fit(a, train_y[support]).score(b, test_y) * 100))
        results[str(n)] = {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "draws": accs,
                           "support_hash": [hash(tuple(s)) & 0xFFFFFFFF for s in draws_used]}
    return results
