"""PNG figures: image grids, curves and bar charts (matplotlib, headless)."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_image_grid(path: str | Path, rows: Sequence[Sequence[np.ndarray]], row_labels: Sequence[str] | None = None,
                    title: str | None = None, cell_inches: float = 0.9) -> Path:
    """Grid PNG: ``rows[r][c]`` is a uint8 image ``[H, W]``, ``[H, W, 1]`` or ``[H, W, 3]``."""
    plt = _plt()
    n_rows = len(rows)
    n_cols = max(len(r) for r in rows) if rows else 1
    label_width = 3.2 if row_labels else 0.0
    fig = plt.figure(figsize=(n_cols * cell_inches + label_width, n_rows * cell_inches + (0.4 if title else 0.1)))
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            ax = fig.add_axes([(label_width + c * cell_inches) / fig.get_figwidth(),
                               1 - ((r + 1) * cell_inches + (0.4 if title else 0.05)) / fig.get_figheight(),
                               cell_inches * 0.95 / fig.get_figwidth(), cell_inches * 0.95 / fig.get_figheight()])
            img = np.asarray(img)
            if img.ndim == 3 and img.shape[-1] == 1:
                img = img[..., 0]
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
        if row_labels:
            text = "\n".join(textwrap.wrap(row_labels[r], 44, max_lines=2, placeholder="..."))  # whole captions, two lines
            fig.text(0.01, 1 - ((r + 0.5) * cell_inches + (0.4 if title else 0.05)) / fig.get_figheight(), text,
                     fontsize=7, va="center")
    if title:
        fig.suptitle(title, fontsize=9, y=1 - 0.1 / fig.get_figheight())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_curve(path: str | Path, series: dict[str, tuple[Sequence[float], Sequence[float]]], title: str,
               xlabel: str = "step", ylabel: str = "loss", logy: bool = False, logx: bool = False,
               errors: dict[str, Sequence[float]] | None = None) -> Path:
    """Line plot PNG of one or more named ``(x, y)`` series; ``errors`` adds error bars (half-widths) per series."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, (xs, ys) in series.items():
        if errors and name in errors:
            ax.errorbar(list(xs), list(ys), yerr=list(errors[name]), label=name, linewidth=1.2, marker="o", markersize=3, capsize=3)
        else:
            ax.plot(list(xs), list(ys), label=name, linewidth=1.2)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if logx:
        ax.set_xscale("log")
    if len(series) > 1:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_bar_chart(path: str | Path, labels: Sequence[str], values: Sequence[float], title: str, ylabel: str,
                   errors: Sequence[float] | None = None, colors: Sequence[str] | None = None) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(labels) + 2), 4))
    ax.bar(range(len(labels)), values, yerr=errors, color=colors, capsize=3)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    finite = [v for v in values if v == v]
    if finite:
        lo = min(finite)
        ax.set_ylim(max(0.0, lo - 10), min(100.0, max(finite) + 5) if max(finite) <= 100 else None)
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


NON_LOSS_METRICS = ("step", "lr", "grad_norm", "epoch", "img_per_s", "ema_momentum", "teacher_temp", "logit_scale")


def save_metrics_curve(path: str | Path, metrics: list[dict], title: str) -> Path:
    """Loss curve PNG from training metrics records (``step`` plus one series per loss term)."""
    keys = [k for k in metrics[-1] if k not in NON_LOSS_METRICS]
    return save_curve(path, {k: ([m["step"] for m in metrics], [m[k] for m in metrics]) for k in keys}, title=title)
