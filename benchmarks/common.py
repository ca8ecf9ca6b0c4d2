"""Shared helpers for the benchmarks: timing, tables and JSON results (not part of the test suite)."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    return {"cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "machine": platform.machine(), "python": platform.python_version()}


def timed(fn, repeat: int = 1) -> float:
    """Best wall time of ``repeat`` calls (seconds)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def report(name: str, rows: list[dict], ratios: dict) -> dict:
    """Print a table and the ratios, write ``results/<name>.json``."""
    keys = list(rows[0])
    widths = [max(len(str(k)), *(len(_fmt(r[k])) for r in rows)) for k in keys]
    print(f"\n== {name} ==")
    print("  ".join(str(k).ljust(w) for k, w in zip(keys, widths)))
    for r in rows:
        print("  ".join(_fmt(r[k]).ljust(w) for k, w in zip(keys, widths)))
    for k, v in ratios.items():
        print(f"ratio {k}: {v:.2f}")
    RESULTS.mkdir(exist_ok=True)
    out = {"benchmark": name, "machine": machine(), "rows": rows, "ratios": ratios}
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


def _fmt(v) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)
