"""Evaluation protocols on frozen features: linear probe, kNN, few-shot. The test split chooses nothing.

Features may be far larger than memory (1.28M x 768 float16 is 2 GB): every protocol reads them in row
chunks (from an ``np.memmap`` or any array), moves each chunk to the device (the GPU when there is one)
and computes in float32 there; only per-row labels and small per-class or per-query state stay resident.

The linear probe is sklearn's multinomial ``LogisticRegression`` objective, ``C * sum_i CE_i + 0.5 * ||W||^2``
(bias unpenalised; binary problems use one logit, as sklearn does), minimised by full-batch L-BFGS with a
strong-Wolfe line search; the loss and gradient are accumulated over row chunks. Features are standardised
with a mean and std (population, + 1e-6) computed in one chunked pass over the training rows.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from ..errors import SynrepError

LOG = logging.getLogger("synrep.eval")
CHUNK_BYTES = 16 << 20  # float32 bytes of one row chunk on the device
CPU_RESIDENT_BYTES = 96 << 20  # standardised float32 rows kept in memory across L-BFGS passes on the CPU (more: reread)
SIMILARITY_BYTES = 16 << 20  # kNN: float32 bytes of one [test block, train chunk] similarity matrix


class ProbeError(SynrepError, ValueError):
    """Features and labels do not fit the protocol (shape mismatch, a class without examples, ...)."""


class Rows:
    """Rows ``index`` (or all rows) of a 2-D feature array (``np.memmap`` or ndarray), read a chunk at a time."""

    def __init__(self, array: np.ndarray, index: np.ndarray | None = None):
        if isinstance(array, Rows):
            index = array.index if index is None else (array.index[index] if array.index is not None else np.asarray(index))
            array = array.array
        self.array = array
        self.index = None if index is None else np.asarray(index, dtype=np.int64)

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), int(self.array.shape[1]) if self.array.ndim == 2 else -1)

    @property
    def ndim(self) -> int:
        return self.array.ndim

    def __len__(self) -> int:
        return len(self.array) if self.index is None else len(self.index)

    def take(self, positions: np.ndarray) -> "Rows":
        """The rows at ``positions`` of this view (sort them for sequential reads of a memmap)."""
        positions = np.asarray(positions, dtype=np.int64)
        return Rows(self.array, positions if self.index is None else self.index[positions])

    def read(self, start: int, stop: int) -> np.ndarray:
        if self.index is None and isinstance(self.array, np.memmap) and self.array.flags.c_contiguous:
            # A plain read, not a slice of the mapping: mapped pages would stay resident in this process.
            row_bytes = self.array.shape[1] * self.array.dtype.itemsize
            out = np.fromfile(self.array.filename, dtype=self.array.dtype, count=(stop - start) * self.array.shape[1],
                              offset=self.array.offset + start * row_bytes)
            return out.reshape(stop - start, self.array.shape[1])
        if self.index is None:
            return np.array(self.array[start:stop])
        return np.asarray(self.array[self.index[start:stop]])

    def chunks(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        for start in range(0, len(self), rows):
            yield start, self.read(start, min(len(self), start + rows))


def as_rows(x: np.ndarray | Rows) -> Rows:
    return x if isinstance(x, Rows) else Rows(x)


def chunk_rows(dim: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    return max(256, chunk_bytes // (4 * max(1, dim)))


SMALL_PROBLEM = 1 << 21  # rows x dims below which CPU fits run on one thread (tiny ops only lose to thread hand-offs)


@contextlib.contextmanager
def cpu_threads_for(values: int, device: torch.device):
    """One intra-op thread for a small CPU problem (restored after): parallel tiny ops mostly wait on each other."""
    if device.type != "cpu" or values >= SMALL_PROBLEM or torch.get_num_threads() == 1:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _check(train_x: Rows, train_y: np.ndarray, test_x: Rows, test_y: np.ndarray) -> None:
    if train_x.ndim != 2 or test_x.ndim != 2:
        raise ProbeError(f"features must be [N, D]; got train {train_x.shape}, test {test_x.shape}")
    if train_x.shape[1] != test_x.shape[1]:
        raise ProbeError(f"feature dimension mismatch: train has {train_x.shape[1]}, test has {test_x.shape[1]}")
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise ProbeError("each feature row needs exactly one label")
    if len(train_x) == 0 or len(test_x) == 0:
        raise ProbeError("no training or no test rows")
    if train_y.min() < 0 or test_y.min() < 0:
        raise ProbeError("labels must be non-negative class indices")


def feature_stats(x: Rows, rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and population std + 1e-6 of ``x`` in one chunked pass (float64 sums)."""
    total = np.zeros(x.shape[1], dtype=np.float64)
    squares = np.zeros(x.shape[1], dtype=np.float64)
    for _, chunk in x.chunks(rows or chunk_rows(x.shape[1])):
        c = chunk.astype(np.float32, copy=False)
        total += c.sum(0, dtype=np.float64)
        squares += np.square(c).sum(0, dtype=np.float64)
    mean = total / len(x)
    var = np.maximum(squares / len(x) - mean ** 2, 0.0)
    return mean, np.sqrt(var) + 1e-6


class DeviceRows:
    """Standardised float32 chunks of ``x`` on ``device``; kept resident when they fit, else reread each pass."""

    def __init__(self, x: Rows, mean: np.ndarray, std: np.ndarray, device: torch.device, rows: int | None = None,
                 resident_bytes: int | None = None):
        self.x, self.device = x, device
        self.rows = rows or chunk_rows(x.shape[1])
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=device)
        self.inv_std = 1.0 / torch.as_tensor(std, dtype=torch.float32, device=device)
        if resident_bytes is None:
            resident_bytes = (torch.cuda.get_device_properties(device).total_memory // 4 if device.type == "cuda"
                              else CPU_RESIDENT_BYTES)
        # On a GPU the rows stay as stored (float16) and are standardised per pass; on the CPU standardised float32.
        self.keep_raw = device.type == "cuda"
        per_value = x.array.dtype.itemsize if self.keep_raw else 4
        self.resident = None
        if len(x) * x.shape[1] * per_value <= resident_bytes:
            self.resident = [(start, self._load(chunk, standardise=not self.keep_raw)) for start, chunk in x.chunks(self.rows)]

    def _load(self, chunk: np.ndarray, standardise: bool = True) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(chunk))
        if self.device.type == "cuda":
            t = t.pin_memory().to(self.device, non_blocking=True)
        return self._standardise(t) if standardise else t

    def _standardise(self, t: torch.Tensor) -> torch.Tensor:
        t = t.float() if t.dtype != torch.float32 else t.clone()
        return t.sub_(self.mean).mul_(self.inv_std)

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        if self.resident is not None:
            for start, t in self.resident:
                yield start, (self._standardise(t) if self.keep_raw else t)
        else:
            for start, chunk in self.x.chunks(self.rows):
                yield start, self._load(chunk)


@dataclass
class LogRegFit:
    """A fitted multinomial logistic regression on standardised features (coef/intercept as in sklearn)."""

    weight: torch.Tensor  # [K, D] (K = 1 for two classes: the logit of classes[1])
    bias: torch.Tensor  # [K]
    mean: np.ndarray
    std: np.ndarray
    classes: np.ndarray
    iterations: int
    converged: bool
    grad_max: float
    loss: float

    @property
    def coef_(self) -> np.ndarray:
        return self.weight.detach().cpu().numpy()

    @property
    def intercept_(self) -> np.ndarray:
        return self.bias.detach().cpu().numpy()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        z = x @ self.weight.t() + self.bias
        return torch.cat([torch.zeros_like(z), z], 1) if z.shape[1] == 1 else z

    @torch.no_grad()
    def predict(self, x: np.ndarray | Rows, rows: int | None = None) -> np.ndarray:
        x = as_rows(x)
        data = DeviceRows(x, self.mean, self.std, self.weight.device, rows, resident_bytes=0)
        out = np.empty(len(x), dtype=self.classes.dtype)
        for start, chunk in data:
            out[start:start + len(chunk)] = self.classes[self.logits(chunk).argmax(1).cpu().numpy()]
        return out

    def score(self, x: np.ndarray | Rows, y: np.ndarray) -> float:
        """Top-1 accuracy in %."""
        return float((self.predict(x) == np.asarray(y)).mean() * 100)

    def summary(self) -> dict:
        return {"iterations": self.iterations, "converged": self.converged, "grad_max": self.grad_max}


def fit_logreg(x: np.ndarray | Rows, y: np.ndarray, C: float, device: str | torch.device | None = "cpu",
               tol: float = 1e-4, max_iter: int = 1000, rows: int | None = None, history_size: int = 50,
               resident_bytes: int | None = None, init: LogRegFit | None = None) -> LogRegFit:
    """Minimise ``mean_i CE_i + ||W||^2 / (2 C n)`` (sklearn's lbfgs objective, scaled by 1/(C n)) on standardised ``x``.

    Stops when the largest gradient entry is below ``tol`` (sklearn's ``tol`` for lbfgs), when the loss stops
    changing, or after ``max_iter`` L-BFGS iterations (then ``converged`` is False). ``init`` (a fit with the
    same classes, e.g. at another C or on a part of these rows) is a warm start: the objective is strictly
    convex, so it changes the iterations taken, not the solution.
    """
    x, y = as_rows(x), np.asarray(y)
    device = resolve_device(device)
    classes = np.unique(y)
    if len(classes) < 2:
        raise ProbeError(f"logistic regression needs at least two classes; got {classes.tolist()}")
    if len(x) != len(y):
        raise ProbeError("each feature row needs exactly one label")
    mean, std = feature_stats(x, rows)
    data = DeviceRows(x, mean, std, device, rows, resident_bytes)
    target = torch.as_tensor(np.searchsorted(classes, y), dtype=torch.int64, device=device)
    n, dim = x.shape
    k = 1 if len(classes) == 2 else len(classes)
    weight = torch.zeros(k, dim, device=device)
    bias = torch.zeros(k, device=device)
    if init is not None and np.array_equal(init.classes, classes) and init.weight.shape == weight.shape:
        # The same linear function of the raw features, expressed in this fit's standardisation.
        raw_w = init.coef_ / init.std
        raw_b = init.intercept_ - raw_w @ init.mean
        weight += torch.as_tensor(raw_w * std, dtype=torch.float32, device=device)
        bias += torch.as_tensor(raw_b + raw_w @ mean, dtype=torch.float32, device=device)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    penalty = 0.5 / (C * n)
    fit = LogRegFit(weight, bias, mean, std, classes, 0, False, float("nan"), float("nan"))
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, max_eval=max_iter * 10, tolerance_grad=tol,
                                  tolerance_change=1e-12, history_size=history_size, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=False)
        total = torch.zeros((), dtype=torch.float64, device=device)
        for start, chunk in data:
            loss = torch.nn.functional.cross_entropy(fit.logits(chunk), target[start:start + len(chunk)], reduction="sum") / n
            loss.backward()
            total += loss.detach().double()
        reg = penalty * weight.pow(2).sum()
        reg.backward()
        return total + reg.detach().double()

    with cpu_threads_for(n * dim, device):
        optimizer.step(closure)
        loss = float(closure())  # the gradient at the final point, for the report
    iterations = int(optimizer.state[weight].get("n_iter", 0))
    grad_max = float(max(weight.grad.abs().max(), bias.grad.abs().max()))
    weight.requires_grad_(False)
    bias.requires_grad_(False)
    fit.iterations, fit.converged, fit.grad_max, fit.loss = iterations, iterations < max_iter, grad_max, loss
    return fit


def _stratified_split(y: np.ndarray, test_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    try:
        a, b = train_test_split(np.arange(len(y)), test_size=test_size, random_state=seed, stratify=y)
    except ValueError as err:
        raise ProbeError(f"cannot hold out a stratified validation split ({test_size:g} of {len(y)} training rows) "
                         f"to choose C: {err}") from None
    return np.sort(a), np.sort(b)


def linear_probe(train_x: np.ndarray | Rows, train_y: np.ndarray, test_x: np.ndarray | Rows, test_y: np.ndarray,
                 Cs: tuple[float, ...] = (0.01, 0.1, 1.0), val_fraction: float = 0.15, seed: int = 0,
                 max_iter: int = 1000, tol: float = 1e-4, device: str | torch.device | None = "cpu") -> dict:
    """Multinomial logistic regression (L-BFGS) on standardised features.

    ``C`` is chosen on a validation split carved from train (stratified, ``val_fraction``), then the
    probe is refit on all of train and scored once on test. Returns top-1 (%), the choices made and
    how each fit converged.
    """
    train_x, test_x = as_rows(train_x), as_rows(test_x)
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    _check(train_x, train_y, test_x, test_y)
    tr_idx, va_idx = _stratified_split(train_y, val_fraction, seed)
    val_scores, val_fits, fits = {}, {}, {}
    previous = None
    for C in sorted(Cs):  # each fit warm-starts from the previous C's solution (a regularisation path)
        fit = previous = fit_logreg(train_x.take(tr_idx), train_y[tr_idx], C, device, tol, max_iter, init=previous)
        fits[C] = fit
        val_scores[C] = fit.score(train_x.take(va_idx), train_y[va_idx])
        val_fits[C] = fit.summary()
    val_scores, val_fits = {C: val_scores[C] for C in Cs}, {C: val_fits[C] for C in Cs}
    best = max(Cs, key=lambda c: (val_scores[c], -c))
    fit = fit_logreg(train_x, train_y, best, device, tol, max_iter, init=fits[best])
    top1 = fit.score(test_x, test_y)
    converged = fit.converged and all(f["converged"] for f in val_fits.values())
    if not converged:
        LOG.warning("linear probe: L-BFGS stopped at max_iter=%d before the gradient fell below tol=%g (C=%g: %d iterations, "
                    "max |grad| %.2g); raise max_iter for a converged probe", max_iter, tol, best, fit.iterations, fit.grad_max)
    return {"top1": top1, "C": best, "val_top1": val_scores, "converged": converged, "iterations": fit.iterations,
            "fit": fit.summary(), "val_fits": val_fits, "tol": tol, "max_iter": max_iter}


@torch.no_grad()
def knn_predict(train_x: np.ndarray | Rows, train_y: np.ndarray, test_x: np.ndarray | Rows, k: int = 20,
                temperature: float = 0.07, batch: int = 1024, device: str | torch.device | None = "cpu",
                train_rows: int | None = None, resident_bytes: int | None = None, num_classes: int | None = None) -> np.ndarray:
    """Weighted kNN on cosine similarity: each of the k neighbours votes exp(sim / T) for its label; predicted labels.

    Train rows stream once in chunks of ``train_rows``; for each chunk every block of ``batch`` test rows
    merges the chunk's top-k into its running top-k (``[N_test, k]`` similarities and labels are all that
    is kept). Test rows stay on the device when they fit in ``resident_bytes``, else are reread per chunk.
    """
    train_x, test_x = as_rows(train_x), as_rows(test_x)
    train_y = np.asarray(train_y)
    device = resolve_device(device)
    num_classes = num_classes or int(train_y.max()) + 1
    k = min(k, len(train_x))
    dim = train_x.shape[1]
    train_rows = train_rows or max(256, min(chunk_rows(dim), SIMILARITY_BYTES // (4 * batch)))
    if resident_bytes is None:
        resident_bytes = (torch.cuda.get_device_properties(device).total_memory // 8 if device.type == "cuda" else CPU_RESIDENT_BYTES)
    labels = torch.as_tensor(train_y, dtype=torch.int64, device=device)

    def normalised(chunk: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(chunk)).to(device).float()
        return t.div_(t.norm(dim=1, keepdim=True).clamp_min_(1e-12))  # F.normalize, in place

    predictions = np.empty(len(test_x), dtype=np.int64)
    with cpu_threads_for((len(train_x) + len(test_x)) * dim, device):
        best_sims, best_labels = _knn_top(train_x, test_x, labels, k, batch, train_rows, normalised,
                                          len(test_x) * dim * 4 <= resident_bytes, device)
        for start in range(0, len(test_x), batch):
            rows = slice(start, start + batch)
            votes = torch.zeros(len(best_sims[rows]), num_classes, device=device)
            votes.scatter_add_(1, best_labels[rows], (best_sims[rows] / temperature).exp())
            predictions[rows] = votes.argmax(1).cpu().numpy()
    return predictions


def _knn_top(train_x: Rows, test_x: Rows, labels: torch.Tensor, k: int, batch: int, train_rows: int, normalised,
             resident: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Running top-k ``[N_test, k]`` similarities and neighbour labels over train chunks x test blocks."""
    test_blocks = [normalised(c) for _, c in test_x.chunks(batch)] if resident else None
    best_sims = torch.full((len(test_x), k), -float("inf"), device=device)
    best_labels = torch.zeros((len(test_x), k), dtype=torch.int64, device=device)
    for start, chunk in train_x.chunks(train_rows):
        tr = normalised(chunk)
        chunk_labels = labels[start:start + len(tr)]
        blocks = test_blocks if resident else (normalised(c) for _, c in test_x.chunks(batch))
        for b, te in enumerate(blocks):
            rows = slice(b * batch, b * batch + len(te))
            sims, idx = (te @ tr.t()).topk(min(k, len(tr)), dim=1)
            top, pos = torch.cat([best_sims[rows], sims], 1).topk(k, dim=1)
            best_labels[rows] = torch.cat([best_labels[rows], chunk_labels[idx]], 1).gather(1, pos)
            best_sims[rows] = top
    return best_sims, best_labels


def knn_classify(train_x: np.ndarray | Rows, train_y: np.ndarray, test_x: np.ndarray | Rows, test_y: np.ndarray, k: int = 20,
                 temperature: float = 0.07, batch: int = 1024, device: str | torch.device | None = "cpu", **chunking) -> dict:
    """Top-1 (%) of :func:`knn_predict` on ``test_y``."""
    train_x, test_x = as_rows(train_x), as_rows(test_x)
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    _check(train_x, train_y, test_x, test_y)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    pred = knn_predict(train_x, train_y, test_x, k, temperature, batch, device, num_classes=num_classes, **chunking)
    return {"top1": float(100.0 * (pred == test_y).mean()), "k": min(k, len(train_x)), "temperature": temperature}


def few_shot(train_x: np.ndarray | Rows, train_y: np.ndarray, test_x: np.ndarray | Rows, test_y: np.ndarray,
             shots: tuple[int, ...] = (1, 5, 10), draws: int = 5, seed: int = 0, C: float = 1.0,
             device: str | torch.device | None = "cpu", tol: float = 1e-4, max_iter: int = 1000) -> dict:
    """Logistic regression (the linear probe's) on ``n`` labelled examples per class, ``draws`` seeded draws per n.

    Returns mean ± std top-1 per n. C is fixed (there is no validation data to choose it with at 1 shot).
    """
    train_x, test_x = as_rows(train_x), as_rows(test_x)
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    _check(train_x, train_y, test_x, test_y)
    classes = np.unique(np.concatenate([train_y, test_y]))
    pools = {int(c): np.flatnonzero(train_y == c) for c in classes}
    results = {}
    for n in shots:
        accs, draws_used, iterations, converged = [], [], [], True
        for d in range(draws):
            rng = np.random.default_rng([seed, n, d])
            support = []
            for c in classes:
                pool = pools[int(c)]
                if len(pool) < n:
                    raise ProbeError(f"few-shot {n}: class {int(c)} has only {len(pool)} training examples")
                support.extend(rng.choice(pool, n, replace=False).tolist())
            support = np.array(support)
            draws_used.append(support.tolist())
            order = np.sort(support)
            fit = fit_logreg(train_x.take(order), train_y[order], C, device, tol, max_iter)
            accs.append(fit.score(test_x, test_y))
            iterations.append(fit.iterations)
            converged = converged and fit.converged
        results[str(n)] = {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "draws": accs,
                           "support_hash": [hash(tuple(s)) & 0xFFFFFFFF for s in draws_used],
                           "iterations": iterations, "converged": converged}
    return results
