"""Evaluation protocols on frozen features: linear probe, kNN, few-shot. The test split chooses nothing.

Features may be far larger than memory (1.28M x 768 float16 is 2 GB): every protocol reads them in row
chunks (from an ``np.memmap`` or any array), moves each chunk to the device (the GPU when there is one)
and computes in float32 there; only per-row labels and small per-class or per-query state stay resident.

The linear probe is sklearn's multinomial ``LogisticRegression`` objective, ``C * sum_i CE_i + 0.5 * ||W||^2``
(bias unpenalised; binary problems use one logit, as sklearn does), minimised by full-batch, preconditioned
L-BFGS with a backtracking line search to sklearn's stopping test (max |gradient| <= tol); the loss and
gradient are accumulated over row chunks. Features are standardised with a mean and std (population, + 1e-6)
computed in one chunked pass over the training rows. ``C`` is chosen from a wide grid on a held-out part of
train, then refit on all of train (SynCLR's transfer protocol; see :func:`linear_probe`).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
from dataclasses import dataclass
from typing import Iterator, Sequence

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
        # only a whole mapping: a slice of one keeps its parent's offset, so its file position is unknown here
        if self.index is None and isinstance(self.array, np.memmap) and isinstance(self.array.base, mmap.mmap) \
                and self.array.flags.c_contiguous:
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


# sklearn C = 1 / weight decay for the reference's weight decays logspace(-6, 5, 45): 1e-05, 1.78e-05, ..., 1e+06
DEFAULT_CS = tuple(float(f"{c:.3g}") for c in np.logspace(-5, 6, 45))
PRECONDITION_ROWS = 1 << 15  # rows (evenly strided) whose second moments shape the L-BFGS preconditioner
SOFTMAX_CURVATURE = 0.25  # rough curvature of the cross-entropy per logit, to weigh the penalty in the preconditioner


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
    C: float = float("nan")
    stop: str = ""  # "gradient" (converged), "max_iter", or "line_search" (no decrease found: float32 precision reached)
    passes: int = 0  # loss-and-gradient passes over the rows
    rows: int = 0  # training rows the fit saw

    @property
    def coef_(self) -> np.ndarray:
        return self.weight.detach().cpu().numpy()

    @property
    def intercept_(self) -> np.ndarray:
        return self.bias.detach().cpu().numpy()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.addmm(self.bias, x, self.weight.t())
        return torch.cat([torch.zeros_like(z), z], 1) if z.shape[1] == 1 else z

    @torch.no_grad()
    def predict(self, x: np.ndarray | Rows | DeviceRows, rows: int | None = None) -> np.ndarray:
        """Predicted labels; ``x`` raw features, or a :class:`DeviceRows` standardised with this fit's mean and std."""
        data = x if isinstance(x, DeviceRows) else DeviceRows(as_rows(x), self.mean, self.std, self.weight.device, rows,
                                                              resident_bytes=0)
        out = np.empty(len(data.x), dtype=self.classes.dtype)
        for start, chunk in data:
            out[start:start + len(chunk)] = self.classes[self.logits(chunk).argmax(1).cpu().numpy()]
        return out

    def score(self, x: np.ndarray | Rows | DeviceRows, y: np.ndarray) -> float:
        """Top-1 accuracy in %."""
        return float((self.predict(x) == np.asarray(y)).mean() * 100)

    def summary(self) -> dict:
        return {"C": self.C, "rows": self.rows, "iterations": self.iterations, "passes": self.passes,
                "converged": self.converged, "stop": self.stop, "grad_max": self.grad_max, "loss": self.loss}


class LogRegProblem:
    """One logistic regression's rows, prepared once and fitted at any number of ``C`` values.

    Holds the standardised rows on the device (resident when they fit, else reread per pass), the targets,
    and the spectrum of the rows' second moments, which preconditions L-BFGS: the fit runs in coordinates
    ``V = W P^-1`` with ``P = (S + 1 / (c C n))^(-1/2)`` (``S`` the standardised features' second-moment
    matrix, ``c`` :data:`SOFTMAX_CURVATURE`), where the objective's Hessian is close to a multiple of the
    identity however correlated the features are. Any invertible ``P`` leaves the minimiser unchanged (the
    objective is strictly convex); this one cuts the iterations several-fold on correlated features. With
    fewer rows than dimensions (few-shot) ``P`` is the identity. The stopping test is on the gradient with
    respect to ``W`` itself, as sklearn's.
    """

    def __init__(self, x: np.ndarray | Rows, y: np.ndarray, device: str | torch.device | None = "cpu",
                 rows: int | None = None, resident_bytes: int | None = None):
        x, y = as_rows(x), np.asarray(y)
        self.device = resolve_device(device)
        self.classes = np.unique(y)
        if len(self.classes) < 2:
            raise ProbeError(f"logistic regression needs at least two classes; got {self.classes.tolist()}")
        if len(x) != len(y):
            raise ProbeError("each feature row needs exactly one label")
        self.n, self.dim = x.shape
        self.k = 1 if len(self.classes) == 2 else len(self.classes)
        self.mean, self.std = feature_stats(x, rows)
        self.data = DeviceRows(x, self.mean, self.std, self.device, rows, resident_bytes)
        self.target = torch.as_tensor(np.searchsorted(self.classes, y), dtype=torch.int64, device=self.device)
        self.passes = 0
        self._spectrum: tuple[torch.Tensor, torch.Tensor] | None = None

    def standardised(self, x: np.ndarray | Rows) -> DeviceRows:
        """Other rows (validation) standardised as these, on the device; resident when they fit in a quarter of
        what the training rows may take (on the CPU), so that scoring many fits reads them once."""
        return DeviceRows(as_rows(x), self.mean, self.std, self.device,
                          resident_bytes=CPU_RESIDENT_BYTES // 4 if self.device.type == "cpu" else None)

    def loss_grad(self, weight: torch.Tensor, bias: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
        """Mean cross-entropy over the rows and its gradients w.r.t. ``weight`` [K, D] and ``bias`` [K]: one pass."""
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        grad_w, grad_b = torch.zeros_like(weight), torch.zeros_like(bias)
        for start, chunk in self.data:
            z = torch.addmm(bias, chunk, weight.t())
            if self.k == 1:  # two classes: one logit, the other fixed at 0 (sklearn's binary parametrisation)
                z = torch.cat([torch.zeros_like(z), z], 1)
            target = self.target[start:start + len(chunk)]
            # The loss in float64 from the float32 logits: near the optimum the line search compares losses that
            # differ by less than float32 resolves (1e-7 of the loss), while the logits' own error is far smaller.
            z64 = z.double()
            lse = torch.logsumexp(z64, 1)
            total += (lse - z64.gather(1, target[:, None])[:, 0]).sum()
            p = z.sub_(lse.float()[:, None]).exp_()  # softmax; d(CE)/dz = p - onehot
            p.scatter_add_(1, target[:, None], torch.full_like(p[:, :1], -1.0))
            if self.k == 1:
                p = p[:, 1:]
            grad_w.addmm_(p.t(), chunk)
            grad_b += p.sum(0)
        self.passes += 1
        return float(total) / self.n, grad_w.div_(self.n), grad_b.div_(self.n)

    def _eigen(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._spectrum is None:
            step = max(1, -(-self.n // PRECONDITION_ROWS))
            gram = torch.zeros(self.dim, self.dim, device=self.device)
            count = 0
            for _, chunk in self.data:
                sub = chunk[::step]
                gram.addmm_(sub.t(), sub)
                count += len(sub)
            self.passes += 1
            s, u = torch.linalg.eigh(gram.double().cpu() / count)
            self._spectrum = (s.clamp_min(0).float().to(self.device), u.float().to(self.device))
        return self._spectrum

    def _preconditioner(self, C: float) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``P`` and ``P^-1`` for this C; None (the identity) with fewer rows than dimensions (few-shot), where
        the rows span few directions and a D x D eigendecomposition would cost more than the whole fit."""
        if self.n < self.dim:
            return None
        s, u = self._eigen()
        shifted = (s + 1.0 / (SOFTMAX_CURVATURE * C * self.n)).clamp_min(1e-6 * max(float(s.max()), 1e-12))
        scale = shifted.rsqrt()
        return (u * scale) @ u.t(), (u / scale) @ u.t()

    @torch.no_grad()
    def fit(self, C: float, tol: float = 1e-4, max_iter: int = 1000, history_size: int = 50,
            init: LogRegFit | None = None) -> LogRegFit:
        """Minimise ``mean_i CE_i + ||W||^2 / (2 C n)`` from zero or from ``init`` (see :func:`fit_logreg`)."""
        if not C > 0:
            raise ProbeError(f"C must be > 0, got {C}")
        weight = torch.zeros(self.k, self.dim, device=self.device)
        bias = torch.zeros(self.k, device=self.device)
        if init is not None and np.array_equal(init.classes, self.classes) and init.weight.shape == weight.shape:
            # The same linear function of the raw features, expressed in this problem's standardisation.
            raw_w = init.coef_ / init.std
            raw_b = init.intercept_ - raw_w @ init.mean
            weight += torch.as_tensor(raw_w * self.std, dtype=torch.float32, device=self.device)
            bias += torch.as_tensor(raw_b + raw_w @ self.mean, dtype=torch.float32, device=self.device)
        passes = self.passes
        penalty = 1.0 / (C * self.n)
        size = self.k * self.dim
        with cpu_threads_for(self.n * self.dim, self.device):
            precond = self._preconditioner(C)
            to_w = (lambda v: v @ precond[0]) if precond else (lambda v: v.clone())  # V -> W; dL/dW -> dL/dV likewise

            def evaluate(theta: torch.Tensor) -> tuple[float, torch.Tensor, float]:
                w = to_w(theta[:size].view(self.k, self.dim))
                loss, grad_w, grad_b = self.loss_grad(w, theta[size:])
                grad_w.add_(w, alpha=penalty)
                loss += 0.5 * penalty * float(w.pow(2).sum(dtype=torch.float64))
                grad_max = float(torch.maximum(grad_w.abs().max(), grad_b.abs().max()))
                return loss, torch.cat([to_w(grad_w).flatten(), grad_b]), grad_max

            theta = torch.cat([(weight @ precond[1] if precond else weight).flatten(), bias])
            theta, iterations, stop, loss, grad_max = _lbfgs(evaluate, theta, tol, max_iter, history_size)
            weight = to_w(theta[:size].view(self.k, self.dim))
        return LogRegFit(weight, theta[size:].clone(), self.mean, self.std, self.classes, iterations, stop == "gradient",
                         grad_max, loss, float(C), stop, self.passes - passes, self.n)


def _lbfgs(evaluate, theta: torch.Tensor, tol: float, max_iter: int, history_size: int,
           armijo: float = 1e-4, max_backtracks: int = 20, loss_noise: float = 1e-7) -> tuple[torch.Tensor, int, str, float, float]:
    """L-BFGS (two-loop recursion) with a backtracking line search, for a smooth convex objective.

    ``evaluate(theta)`` returns ``(loss, gradient, grad_max)``; the search stops when ``grad_max <= tol``
    (``stop = "gradient"``), after ``max_iter`` iterations (``"max_iter"``), or when no step along the
    search direction is accepted (``"line_search"``). A step is accepted when the loss falls by Armijo's
    sufficient decrease, or (Hager and Zhang's approximate Wolfe test, for steps whose loss change is
    below what the float32 logits resolve, ``loss_noise`` of the loss) when the directional derivative at
    the step shows the same decrease on a quadratic model. Returns ``(theta, iterations, stop, loss, grad_max)``
    at the last accepted point.
    """
    loss, grad, grad_max = evaluate(theta)
    steps: list[tuple[torch.Tensor, torch.Tensor, float]] = []  # (s, y, 1 / y.s), oldest first
    for iteration in range(max_iter + 1):
        if grad_max <= tol:
            return theta, iteration, "gradient", loss, grad_max
        if iteration == max_iter:
            return theta, iteration, "max_iter", loss, grad_max
        direction = grad.neg()
        alphas = []
        for s, y, rho in reversed(steps):
            alpha = rho * float(s @ direction)
            direction.add_(y, alpha=-alpha)
            alphas.append(alpha)
        if steps:
            s, y, rho = steps[-1]
            direction.mul_(1.0 / (rho * float(y @ y)))  # initial inverse Hessian s.y / y.y
        for (s, y, rho), alpha in zip(steps, reversed(alphas)):
            direction.add_(s, alpha=alpha - rho * float(y @ direction))
        slope = float(grad @ direction)
        if not slope < 0:  # not a descent direction (curvature lost to rounding): restart from steepest descent
            steps.clear()
            direction, slope = grad.neg(), -float(grad @ grad)
        t = 1.0 if steps else min(1.0, 1.0 / float(grad.abs().sum()))
        for _ in range(max_backtracks):
            candidate = theta + t * direction
            new_loss, new_grad, new_grad_max = evaluate(candidate)
            new_slope = float(new_grad @ direction)
            if new_loss <= loss + armijo * t * slope:
                break
            if new_loss <= loss + loss_noise * abs(loss) and new_slope <= (2 * armijo - 1) * slope:
                break  # approximate Wolfe: on a quadratic, this derivative means Armijo's decrease
            if np.isfinite(new_loss) and new_slope > 0:  # past the minimum along the line: the secant's zero
                guess = t * slope / (slope - new_slope)
            else:
                denominator = 2.0 * (new_loss - loss - slope * t)  # the quadratic through loss, slope, new_loss
                guess = -slope * t * t / denominator if np.isfinite(new_loss) and denominator > 0 else 0.5 * t
            t = min(0.5 * t, max(0.1 * t, guess))
        else:
            return theta, iteration, "line_search", loss, grad_max
        s, y = candidate - theta, new_grad - grad
        ys = float(y @ s)
        if ys > 1e-10 * float(y @ y):
            steps.append((s, y, 1.0 / ys))
            if len(steps) > history_size:
                steps.pop(0)
        theta, loss, grad, grad_max = candidate, new_loss, new_grad, new_grad_max
    raise AssertionError("unreachable")


def fit_logreg(x: np.ndarray | Rows, y: np.ndarray, C: float, device: str | torch.device | None = "cpu",
               tol: float = 1e-4, max_iter: int = 1000, rows: int | None = None, history_size: int = 50,
               resident_bytes: int | None = None, init: LogRegFit | None = None) -> LogRegFit:
    """Minimise ``mean_i CE_i + ||W||^2 / (2 C n)`` (sklearn's lbfgs objective, scaled by 1/(C n)) on standardised ``x``.

    Converged (``stop == "gradient"``) when the largest entry of the gradient with respect to ``W`` and the
    bias is at most ``tol`` (sklearn's ``tol`` for lbfgs); otherwise ``converged`` is False and ``stop`` says
    why (``max_iter`` L-BFGS iterations, or the line search found no decrease). ``init`` (a fit with the same
    classes, e.g. at another C or on a part of these rows) is a warm start: the objective is strictly convex,
    so it changes the iterations taken, not the solution. To fit the same rows at several C, build one
    :class:`LogRegProblem` and call its ``fit``.
    """
    return LogRegProblem(x, y, device, rows, resident_bytes).fit(C, tol, max_iter, history_size, init)


def _stratified_split(y: np.ndarray, test_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    try:
        a, b = train_test_split(np.arange(len(y)), test_size=test_size, random_state=seed, stratify=y)
    except ValueError as err:
        raise ProbeError(f"cannot hold out a stratified validation split ({test_size:g} of {len(y)} training rows) "
                         f"to choose C: {err}") from None
    return np.sort(a), np.sort(b)


def linear_probe(train_x: np.ndarray | Rows, train_y: np.ndarray, test_x: np.ndarray | Rows, test_y: np.ndarray,
                 Cs: tuple[float, ...] = DEFAULT_CS, val_fraction: float = 0.2, seed: int = 0,
                 max_iter: int = 1000, tol: float = 1e-4, device: str | torch.device | None = "cpu",
                 history_size: int = 50) -> dict:
    """Multinomial logistic regression (L-BFGS) on standardised features, ``C`` chosen on held-out train rows.

    As the SynCLR/StableRep reference (``main_downstream_linear.py``): a stratified, seeded ``val_fraction``
    of the training rows is held out; the probe is fitted on the rest at every ``C`` of the grid (ascending,
    each fit warm-started from the previous one, each to convergence), scored on the held-out rows, and the
    best ``C`` (ties: the smallest, i.e. the strongest regularisation) is refit on all training rows
    (train + validation, standardised with their own statistics) and scored once on test.

    Returns test top-1 (%), the chosen ``C``, the grid with validation top-1 and the convergence of every fit
    (lists aligned with ``grid``), the refit's convergence, and every fit that did not converge. Each such
    fit is also logged as a warning.
    """
    train_x, test_x = as_rows(train_x), as_rows(test_x)
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    _check(train_x, train_y, test_x, test_y)
    grid = sorted({float(c) for c in Cs})
    if not grid or not all(np.isfinite(c) and c > 0 for c in grid):
        raise ProbeError(f"Cs: give one or more finite inverse regularisation strengths > 0, got {list(Cs)}")
    if not 0 < val_fraction < 1:
        raise ProbeError(f"val_fraction must be in (0, 1), got {val_fraction}")
    tr_idx, va_idx = _stratified_split(train_y, val_fraction, seed)
    problem = LogRegProblem(train_x.take(tr_idx), train_y[tr_idx], device)
    val_rows, val_y = problem.standardised(train_x.take(va_idx)), train_y[va_idx]
    val_top1, val_fits, fits, previous = [], [], [], None
    for C in grid:  # a regularisation path: each fit starts from the previous C's solution
        previous = problem.fit(C, tol, max_iter, history_size, init=previous)
        fits.append(previous)
        val_top1.append(previous.score(val_rows, val_y))
        val_fits.append(previous.summary())
    best = int(np.argmax(val_top1))  # the first maximum: the smallest C among ties
    chosen = fits[best]
    del problem, val_rows, fits
    fit = LogRegProblem(train_x, train_y, device).fit(grid[best], tol, max_iter, history_size, init=chosen)
    predicted = fit.predict(test_x)
    test_y = np.asarray(test_y)
    top1 = float((predicted == test_y).mean() * 100)
    per_class = {int(c): round(float((predicted[test_y == c] == c).mean() * 100), 4) for c in np.unique(test_y)}
    not_converged = [dict(f, fit="selection") for f in val_fits if not f["converged"]]
    if not fit.converged:
        not_converged.append(dict(fit.summary(), fit="refit"))
    for f in not_converged:
        LOG.warning("linear probe: the %s fit at C=%g did not converge (%s after %d iterations: max |grad| %.2g > tol %g); "
                    "raise max_iter or tol", f["fit"], f["C"], f["stop"], f["iterations"], f["grad_max"], tol)
    return {"top1": top1, "per_class_top1": per_class, "C": grid[best], "val_top1_best": val_top1[best], "grid": grid, "val_top1": val_top1,
            "val_fits": val_fits, "fit": fit.summary(), "converged": not not_converged, "not_converged": not_converged,
            "iterations": fit.iterations, "passes": sum(f["passes"] for f in val_fits) + fit.passes,
            "rows": {"selection": len(tr_idx), "validation": len(va_idx), "refit": len(train_x)},
            "val_fraction": val_fraction, "seed": seed, "tol": tol, "max_iter": max_iter}


@torch.no_grad()
def knn_predict_many(train_x: np.ndarray | Rows, train_y: np.ndarray, test_x: np.ndarray | Rows, ks: Sequence[int] = (20,),
                     temperature: float = 0.07, batch: int = 1024, device: str | torch.device | None = "cpu",
                     train_rows: int | None = None, resident_bytes: int | None = None,
                     num_classes: int | None = None) -> dict[int, np.ndarray]:
    """Weighted kNN on cosine similarity at every k of ``ks``: predicted labels per k (k capped at the train rows).

    Each of the k nearest train rows votes exp(sim / T) for its label (DINO's weighted kNN). One search
    finds the ``max(ks)`` nearest rows, sorted by similarity; every k votes with the first k of them.
    Train rows stream once in chunks of ``train_rows``; for each chunk every block of ``batch`` test rows
    merges the chunk's top-k into its running top-k (``[N_test, max(ks)]`` similarities and labels are all
    that is kept). Test rows stay on the device when they fit in ``resident_bytes``, else are reread per chunk.
    """
    train_x, test_x = as_rows(train_x), as_rows(test_x)
    train_y = np.asarray(train_y)
    if not len(ks) or min(ks) < 1:
        raise ProbeError(f"kNN needs one or more k >= 1, got {list(ks)}")
    device = resolve_device(device)
    num_classes = num_classes or int(train_y.max()) + 1
    ks = sorted({min(int(k), len(train_x)) for k in ks})
    dim = train_x.shape[1]
    train_rows = train_rows or max(256, min(chunk_rows(dim), SIMILARITY_BYTES // (4 * batch)))
    if resident_bytes is None:
        resident_bytes = (torch.cuda.get_device_properties(device).total_memory // 8 if device.type == "cuda" else CPU_RESIDENT_BYTES)
    labels = torch.as_tensor(train_y, dtype=torch.int64, device=device)

    def normalised(chunk: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(chunk)).to(device).float()
        return t.div_(t.norm(dim=1, keepdim=True).clamp_min_(1e-12))  # F.normalize, in place

    predictions = {k: np.empty(len(test_x), dtype=np.int64) for k in ks}
    with cpu_threads_for((len(train_x) + len(test_x)) * dim, device):
        best_sims, best_labels = _knn_top(train_x, test_x, labels, ks[-1], batch, train_rows, normalised,
                                          len(test_x) * dim * 4 <= resident_bytes, device)
        for start in range(0, len(test_x), batch):
            rows = slice(start, start + batch)
            weights = (best_sims[rows] / temperature).exp_()
            for k in ks:
                votes = torch.zeros(len(weights), num_classes, device=device)
                votes.scatter_add_(1, best_labels[rows, :k], weights[:, :k])
                predictions[k][rows] = votes.argmax(1).cpu().numpy()
    return predictions


def knn_predict(train_x: np.ndarray | Rows, train_y: np.ndarray, test_x: np.ndarray | Rows, k: int = 20,
                temperature: float = 0.07, batch: int = 1024, device: str | torch.device | None = "cpu",
                train_rows: int | None = None, resident_bytes: int | None = None, num_classes: int | None = None) -> np.ndarray:
    """Predicted labels of the weighted kNN at one k (:func:`knn_predict_many`)."""
    return knn_predict_many(train_x, train_y, test_x, (k,), temperature, batch, device, train_rows, resident_bytes,
                            num_classes)[min(k, len(as_rows(train_x)))]


def _knn_top(train_x: Rows, test_x: Rows, labels: torch.Tensor, k: int, batch: int, train_rows: int, normalised,
             resident: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Running top-k ``[N_test, k]`` similarities (sorted, best first) and neighbour labels over train chunks x test blocks.

    A chunk can only contribute rows more similar than a test row's current k-th best, so once the running
    top-k is full only as many candidates as the most any test row of the block has above its k-th best are
    selected from the chunk (a large k then costs little more than a small one).
    """
    test_blocks = [normalised(c) for _, c in test_x.chunks(batch)] if resident else None
    best_sims = torch.full((len(test_x), k), -float("inf"), device=device)
    best_labels = torch.zeros((len(test_x), k), dtype=torch.int64, device=device)
    seen = 0
    for start, chunk in train_x.chunks(train_rows):
        tr = normalised(chunk)
        chunk_labels = labels[start:start + len(tr)]
        blocks = test_blocks if resident else (normalised(c) for _, c in test_x.chunks(batch))
        for b, te in enumerate(blocks):
            rows = slice(b * batch, b * batch + len(te))
            block = te @ tr.t()
            take = min(k, len(tr))
            if seen >= k:  # the running top-k is full: its last column is each row's k-th best
                take = min(take, int((block > best_sims[rows, -1:]).sum(1, dtype=torch.int32).max()))
                if take == 0:
                    continue
            sims, idx = block.topk(take, dim=1)
            top, pos = torch.cat([best_sims[rows], sims], 1).topk(k, dim=1)
            best_labels[rows] = torch.cat([best_labels[rows], chunk_labels[idx]], 1).gather(1, pos)
            best_sims[rows] = top
        seen += len(tr)
    return best_sims, best_labels


def knn_classify(train_x: np.ndarray | Rows, train_y: np.ndarray, test_x: np.ndarray | Rows, test_y: np.ndarray, k: int = 20,
                 temperature: float = 0.07, batch: int = 1024, device: str | torch.device | None = "cpu",
                 ks: Sequence[int] = (), **chunking) -> dict:
    """Top-1 (%) of the weighted kNN on ``test_y`` at ``k`` (the headline) and at every k of ``ks``, from one search.

    Returns ``top1`` and ``k`` (the headline; k capped at the number of train rows), ``top1_by_k``
    (``{"10": ..., "20": ...}``, every k searched, capped likewise) and ``temperature``.
    """
    train_x, test_x = as_rows(train_x), as_rows(test_x)
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    _check(train_x, train_y, test_x, test_y)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    preds = knn_predict_many(train_x, train_y, test_x, (k, *ks), temperature, batch, device, num_classes=num_classes, **chunking)
    by_k = {kk: float(100.0 * (pred == test_y).mean()) for kk, pred in preds.items()}
    headline = min(k, len(train_x))
    return {"top1": by_k[headline], "k": headline, "top1_by_k": {str(kk): v for kk, v in by_k.items()},
            "temperature": temperature}


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
            if not fit.converged:
                LOG.warning("few-shot %d, draw %d: the fit at C=%g did not converge (%s after %d iterations: max |grad| %.2g "
                            "> tol %g)", n, d, C, fit.stop, fit.iterations, fit.grad_max, tol)
        results[str(n)] = {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "draws": accs,
                           "support_hash": [hash(tuple(s)) & 0xFFFFFFFF for s in draws_used],
                           "iterations": iterations, "converged": converged}
    return results
