"""Memorization: how close each generated image lies to the generator's training set.

For every image, its nearest neighbour in the real train split in pixel space (RMS distance of [0, 1]
pixels, so 0 = identical and 1 = black vs white) and in the reference classifier's feature space (Euclidean
distance of L2-normalised features, in [0, 2]). The same distances for real *test* images give the
reference: a real test image is, by construction, not a copy. Images closer than a low quantile of that
reference (or a configured distance) are flagged as near-copies.

The search is exact and chunked, so memory is ``batch x chunk`` whatever the train set's size. Features
(``[N, 128]``) are compared directly (``|q|^2 + |t|^2 - 2 q.t``). Pixels use a lower bound first: with an
orthonormal basis U of the train images' top ``rank`` principal directions and the residual norm r of what
U misses, ``|x - t|^2 >= |x|^2 + |t|^2 - 2 (Ux.Ut + r_x r_t)`` (centred), a product of ``rank + 1`` numbers
instead of H*W*C. The exact distance of one train image (the smallest bound in the first chunk) bounds the
answer from above; only train images whose bound is below the best distance found so far are compared
pixel by pixel, in integers, so the answer is the exact nearest neighbour and an exact copy reads 0.
"""

from __future__ import annotations

import numpy as np
import torch

PIXEL_RANGE = (0.0, 1.0)
FEATURE_RANGE = (0.0, 2.0)
HIST_BINS = 200


def flatten_pixels(images: np.ndarray) -> np.ndarray:
    """uint8 ``[B, H, W, C]`` -> float32 ``[B, H*W*C]`` in [0, 1]."""
    return images.reshape(len(images), -1).astype(np.float32) / 255.0


class NearestNeighbours:
    """Exact nearest neighbours of float feature rows in a fixed float bank ``[N, D]``, chunked.

    ``query(q)`` takes float ``[B, D]`` and returns ``(Euclidean distance [B], index [B])``.
    """

    def __init__(self, bank: np.ndarray, chunk: int = 8192, device: str = "cpu"):
        self.bank = np.asarray(bank, dtype=np.float32).reshape(len(bank), -1)
        self.chunk = max(1, int(chunk))
        self.device = torch.device(device)
        self._chunks = [torch.from_numpy(np.ascontiguousarray(self.bank[s:s + self.chunk])).to(self.device)
                        for s in range(0, len(self.bank), self.chunk)]
        self._norms = [c.pow(2).sum(1) for c in self._chunks]

    def __len__(self) -> int:
        return len(self.bank)

    @torch.no_grad()
    def query(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(q) == 0:
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        flat = np.ascontiguousarray(q, dtype=np.float32).reshape(len(q), -1)
        qt = torch.from_numpy(flat).to(self.device)
        best = torch.full((len(q),), float("inf"), device=self.device)
        arg = torch.zeros(len(q), dtype=torch.int64, device=self.device)
        for k, rows in enumerate(self._chunks):  # |q - t|^2 - |q|^2 = |t|^2 - 2 q.t: one fused product per chunk
            val, idx = torch.addmm(self._norms[k].unsqueeze(0), qt, rows.T, alpha=-2.0).min(dim=1)
            better = val < best
            best = torch.where(better, val, best)
            arg = torch.where(better, idx + k * self.chunk, arg)
        index = arg.cpu().numpy()
        dist = np.sqrt(((flat.astype(np.float64) - self.bank[index].astype(np.float64)) ** 2).sum(1))
        return dist.astype(np.float32), index


def _orthonormal(w: torch.Tensor) -> torch.Tensor:
    """Columns of float64 ``w [D, r]`` made orthonormal (Cholesky QR: two small products, no LAPACK QR)."""
    chol = torch.linalg.cholesky(w.T @ w)
    return torch.linalg.solve_triangular(chol, w.T, upper=False).T


def top_directions(centred: torch.Tensor, rank: int, seed: int, iterations: int = 4) -> torch.Tensor:
    """An orthonormal float64 basis ``[D, rank]`` close to the top principal directions of float64 ``centred
    [n, D]`` rows (subspace iteration). Any orthonormal basis keeps the search exact; a better one prunes more."""
    d = centred.shape[1]
    cov = centred.T @ centred if d <= 4096 else None  # small D: iterate on the D x D covariance
    ridge = 1e-6 * float(centred.pow(2).sum()) / d + 1e-9  # keeps every column alive when the sample has rank < ``rank``
    v = _orthonormal(torch.randn(d, rank, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    for _ in range(iterations):
        v = _orthonormal((cov @ v if cov is not None else centred.T @ (centred @ v)) + ridge * v)
    return v


class PixelNeighbours:
    """Exact nearest neighbours of uint8 images in a uint8 image bank ``[N, ...]``, pruned by a projection bound.

    ``query(q)`` takes uint8 images ``[B, ...]`` shaped like the bank's and returns ``(RMS distance of [0, 1]
    pixels [B], index [B])``. Ties go to the lower index. ``rank`` = 0 compares every pair (no pruning).
    """

    def __init__(self, bank: np.ndarray, chunk: int = 8192, device: str = "cpu", rank: int = 64, seed: int = 0,
                 fit_rows: int = 10000):
        if bank.dtype != np.uint8:
            raise TypeError("a pixel bank holds uint8 images")
        self.bank = bank.reshape(len(bank), -1)
        n, self.dim = self.bank.shape
        self.chunk = max(1, int(chunk))
        self.device = torch.device(device)
        rank = max(0, min(int(rank), self.dim, n))
        if rank:
            rows = np.sort(np.random.default_rng(seed).choice(n, min(n, fit_rows), replace=False))
            sample = torch.from_numpy(self.bank[rows]).double()
            self.mean = sample.mean(0).float()
            self.basis = top_directions(sample - sample.mean(0), rank, seed).float().to(self.device)
        else:
            self.mean, self.basis = torch.zeros(self.dim), torch.zeros(self.dim, 0)
        self.mean = self.mean.to(self.device)
        self.rank = rank
        # per chunk: keys [c, rank + 1] and squared norms [c]; the bound for a query is |q|^2 + |x|^2 - 2 key_q . key_x
        self._keys, self._sq = [], []
        for start in range(0, n, self.chunk):
            key, norm = self._key(self._rows(start))
            self._keys.append(key.T.contiguous())  # stored transposed: the product needs [rank + 1, c]
            self._sq.append(norm[None])

    def __len__(self) -> int:
        return len(self.bank)

    def _rows(self, start: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.bank[start:start + self.chunk])).to(self.device).float()

    def _key(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``([c, rank + 1] projection and residual norm, [c] squared norm)`` of grey-level rows, centred."""
        x = x - self.mean
        p = x @ self.basis
        norm = x.pow(2).sum(1)
        residual = (norm - p.pow(2).sum(1)).clamp_min(0).sqrt()
        return torch.cat([p, residual[:, None]], dim=1), norm

    def _exact(self, flat: np.ndarray, qi: np.ndarray, ti: np.ndarray, block: int = 4096) -> np.ndarray:
        """int64 squared grey-level distance of query ``qi[p]`` to bank row ``ti[p]`` for every pair p."""
        out = np.empty(len(qi), np.int64)
        wide = self.dim * 255 * 255 >= 2**31  # int32 sums would overflow
        for s in range(0, len(qi), block):
            diff = np.subtract(self.bank[ti[s:s + block]], flat[qi[s:s + block]], dtype=np.int64 if wide else np.int32)
            out[s:s + block] = np.einsum("ij,ij->i", diff, diff)
        return out

    @torch.no_grad()
    def query(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(q) == 0:
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        if q.dtype != np.uint8:
            raise TypeError("a pixel bank is queried with uint8 images")
        flat = np.ascontiguousarray(q.reshape(len(q), -1))
        if flat.shape[1] != self.dim:
            raise ValueError(f"query images have {flat.shape[1]} values, the bank's have {self.dim}")
        b = len(flat)
        key, norm = self._key(torch.from_numpy(flat).to(self.device).float())
        slack = 64.0 + 1e-5 * norm  # float32 rounding of the bound, in grey levels^2

        def bounds(k: int) -> torch.Tensor:  # bound(q, t) - |q|^2 = |t|^2 - 2 key_q . key_t: one fused product per chunk
            return torch.addmm(self._sq[k], key, self._keys[k], alpha=-2.0)

        # An upper bound to start from: the exact distance of the first chunk's row with the smallest bound.
        arg = bounds(0).argmin(dim=1).cpu().numpy()
        best = self._exact(flat, np.arange(b), arg)
        dense_limit = max(4096, b * self.chunk // 8)
        for k in range(len(self._keys)):
            limit = torch.from_numpy(best * (1 + 1e-4)).float().to(self.device) + slack - norm
            qi, ti = (bounds(k) <= limit[:, None]).nonzero(as_tuple=True) if self.rank else ((), ())
            if not self.rank or len(qi) > dense_limit:  # the bound does not prune here: compare all pixels
                x = torch.from_numpy(flat).to(self.device).float()
                rows = self._rows(k * self.chunk)
                qi, ti = (torch.addmm(rows.pow(2).sum(1)[None], x, rows.T, alpha=-2.0)
                          <= (limit + norm - x.pow(2).sum(1))[:, None]).nonzero(as_tuple=True)
            qi, ti = qi.cpu().numpy(), ti.cpu().numpy()
            if not len(qi):
                continue
            ti = ti + k * self.chunk
            d2 = self._exact(flat, qi, ti)
            order = np.lexsort((ti, d2, qi))  # per query: smallest distance, then lowest index
            qi, ti, d2 = qi[order], ti[order], d2[order]
            first = np.r_[True, qi[1:] != qi[:-1]]
            qi, ti, d2 = qi[first], ti[first], d2[first]
            better = (d2 < best[qi]) | ((d2 == best[qi]) & (ti < arg[qi]))
            best[qi[better]], arg[qi[better]] = d2[better], ti[better]
        return (np.sqrt(best / self.dim) / 255.0).astype(np.float32), arg


def histogram(values: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    """int64 ``[HIST_BINS]`` counts of ``values`` over ``value_range`` (values outside are clipped in)."""
    lo, hi = value_range
    v = np.clip(np.asarray(values, dtype=np.float64), lo, hi)
    return np.histogram(v, bins=HIST_BINS, range=value_range)[0].astype(np.int64)


def copy_threshold(reference: np.ndarray, quantile: float, fixed: float) -> float:
    """The near-copy distance: ``fixed`` when > 0, else the ``quantile`` of the real-test distances."""
    if fixed > 0:
        return float(fixed)
    return float(np.quantile(reference, quantile)) if len(reference) else 0.0


def summarize(reference: np.ndarray, hist: np.ndarray, value_range: tuple[float, float], threshold: float,
              flagged: int, total: int) -> dict:
    """Numbers of one space (pixel or feature): generated distances (from their histogram) vs the real-test ones."""
    edges = np.linspace(*value_range, HIST_BINS + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    n = int(hist.sum())
    mean = float((hist * centres).sum() / n) if n else float("nan")
    cdf = np.cumsum(hist) / max(n, 1)
    median = float(centres[np.searchsorted(cdf, 0.5)]) if n else float("nan")
    return {"threshold": threshold, "flagged": int(flagged), "flagged_fraction": flagged / total if total else 0.0,
            "generated_mean": mean, "generated_median": median,
            "real_test_mean": float(np.mean(reference)) if len(reference) else float("nan"),
            "real_test_median": float(np.median(reference)) if len(reference) else float("nan"),
            "real_test_below_threshold": float(np.mean(reference < threshold)) if len(reference) else float("nan")}


class MemorizationTotals:
    """Streams per-shard parts into distance histograms, the near-copy list and the closest pairs."""

    def __init__(self, pixel_threshold: float, feature_threshold: float, list_limit: int, grid_k: int):
        self.pixel_threshold, self.feature_threshold = pixel_threshold, feature_threshold
        self.list_limit, self.grid_k = list_limit, grid_k
        self.pixel_hist = np.zeros(HIST_BINS, np.int64)
        self.feature_hist = np.zeros(HIST_BINS, np.int64)
        self.images = 0
        self.copies = 0
        self.feature_close = 0
        self.flagged: list[tuple[float, dict]] = []
        self.closest: list[tuple[float, dict, np.ndarray]] = []

    def add(self, part: dict[str, np.ndarray], shard: str) -> None:
        from .parts import image_ref

        pix, feat = part["i_pix_d"], part["i_feat_d"]
        self.images += len(pix)
        self.pixel_hist += histogram(pix, PIXEL_RANGE)
        self.feature_hist += histogram(feat, FEATURE_RANGE)
        rows = np.flatnonzero(pix < self.pixel_threshold)
        self.copies += len(rows)
        self.feature_close += int((feat < self.feature_threshold).sum())

        def entry(r: int) -> dict:
            return {**image_ref(part, r, shard), "pixel_distance": round(float(pix[r]), 5),
                    "feature_distance": round(float(feat[r]), 5), "train_index": int(part["i_pix_idx"][r]),
                    "feature_train_index": int(part["i_feat_idx"][r])}

        for r in rows[np.argsort(pix[rows], kind="stable")][:self.list_limit]:
            self.flagged.append((float(pix[r]), entry(int(r))))
        self.flagged.sort(key=lambda t: t[0])
        del self.flagged[self.list_limit:]
        for r, image in zip(part["close_rows"], part["close_images"]):
            self.closest.append((float(pix[r]), entry(int(r)), image))
        self.closest.sort(key=lambda t: t[0])
        del self.closest[self.grid_k:]

    def result(self, reference_pixel: np.ndarray, reference_feature: np.ndarray, quantile: float, fixed: float) -> dict:
        return {"near_copies": self.copies, "near_copy_fraction": self.copies / self.images if self.images else 0.0,
                "threshold_rule": f"fixed pixel distance {fixed}" if fixed > 0 else f"quantile {quantile} of real test -> train distances",
                "real_test_images": int(len(reference_pixel)),
                "pixel": summarize(reference_pixel, self.pixel_hist, PIXEL_RANGE, self.pixel_threshold, self.copies, self.images),
                "feature": summarize(reference_feature, self.feature_hist, FEATURE_RANGE, self.feature_threshold,
                                     self.feature_close, self.images),
                "flagged_images": [e for _, e in self.flagged],
                "flagged_images_listed": min(self.copies, self.list_limit)}
