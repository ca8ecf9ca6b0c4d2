"""Small shared helpers: logging, seeding, JSON lines, hashing, threads (atomic writes live in synrep.atomic)."""

from __future__ import annotations

import hashlib
import json
import logging
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch


LOG = logging.getLogger("synrep")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (so redirections and test capture see the messages)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(rank: int = 0, level: int = logging.INFO) -> None:
    """stdlib logging to stderr on rank 0 only (other ranks log warnings and errors)."""
    root = logging.getLogger("synrep")
    if root.handlers:
        root.setLevel(level if rank == 0 else logging.WARNING)
        return
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level if rank == 0 else logging.WARNING)
    root.propagate = False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def stable_seed(*parts: Any) -> int:
    """A 63-bit seed that depends only on ``parts`` (not on Python's hash randomisation)."""
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def append_jsonl(path: str | Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a kill mid-write: skip it
    return out


def sha256_arrays(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def set_threads(num_threads: int) -> None:
    if num_threads and num_threads > 0:
        torch.set_num_threads(num_threads)


def bound_heap_growth(threshold_bytes: int = 1 << 20) -> bool:
    """Serve allocations above ``threshold_bytes`` with mmap and return them to the OS when freed (glibc only).

    glibc raises its mmap threshold after each large free, so streaming many equal chunks (features, images)
    makes the heap keep every freed chunk: peak memory then grows with the number of chunks, not their size.
    Fixing the threshold keeps it flat. Returns False where this is not glibc (nothing changes).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, int(threshold_bytes)))  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False
