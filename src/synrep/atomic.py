"""Atomic writes: every file and folder synrep writes appears complete under its name or not at all.

Each write goes to a temporary name beside the target (``.<name>.tmp<pid>``), is flushed and fsynced, and is
renamed onto the target; an error on the way removes the temporary file. Done-markers written with these
helpers are therefore safe to test with a plain ``exists()``.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

import torch


def temp_path(path: str | Path) -> Path:
    """The temporary name a write to ``path`` goes through (unique per process)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def remove_stale_temps(path: str | Path) -> int:
    """Remove temporary files that killed writes to ``path`` left behind; returns how many."""
    path = Path(path)
    removed = 0
    for stale in path.parent.glob(f".{path.name}.tmp*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        removed += 1
    return removed


@contextmanager
def atomic_file(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file for writing; on a clean exit it is fsynced and renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a no-op after the rename


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_file(path, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    with atomic_file(path, "wb") as fh:
        torch.save(obj, fh)


@contextmanager
def atomic_dir(folder: str | Path) -> Iterator[Path]:
    """Build a folder under a temporary name, then swap it in for ``folder``: a kill at any moment leaves either
    the previous complete folder or the new one, never a mix."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        old = folder.with_name(f".{folder.name}.old{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
