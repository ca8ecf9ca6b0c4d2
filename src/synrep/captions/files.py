"""Reading a captions JSONL as a stream, by position, through a line-offset sidecar.

A captions file can hold 150M lines, so nothing here reads it whole. Next to ``captions.jsonl`` sits
``captions.offsets.json``: the byte offset (and line number) of every ``OFFSETS_EVERY``-th caption, the
caption count and the file size it was made for. :func:`iter_captions` seeks with it and skips at most
``OFFSETS_EVERY - 1`` lines; when the sidecar is missing or stale (another file size) one streaming scan
rebuilds it (memory O(captions / OFFSETS_EVERY)), written next to the file when that folder is writable,
else kept in memory only.

Captions are the non-blank lines, numbered from 0 in file order (a caption without ``id`` gets that number);
error messages give the 1-based line number in the file, blank lines included.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..errors import SynrepError
from ..atomic import atomic_file, atomic_write_text

LOG = logging.getLogger("synrep.captions")
CAPTIONS_FILE = "captions.jsonl"
OFFSETS_EVERY = 1024
OFFSETS_FORMAT = "synrep-captions-offsets"
_CACHE: OrderedDict[tuple, "LineOffsets"] = OrderedDict()  # (path, size, mtime) -> offsets, this process


class CaptionsFileError(SynrepError, ValueError):
    """A captions file that cannot be used: empty, a malformed line (named by file and line number)."""


class CaptionsFileMissing(CaptionsFileError, FileNotFoundError):
    """The captions file (or a folder's ``captions.jsonl``) does not exist."""


@dataclass
class LineOffsets:
    """Where caption ``k * every`` starts: byte ``offsets[k]``, file line ``lines[k]`` (1-based)."""

    every: int = OFFSETS_EVERY
    records: int = 0
    size: int = 0
    offsets: list[int] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"format": OFFSETS_FORMAT, "version": 1, "every": self.every, "records": self.records,
                "size": self.size, "offsets": self.offsets, "lines": self.lines}

    @classmethod
    def from_json(cls, obj: dict) -> "LineOffsets":
        if obj.get("format") != OFFSETS_FORMAT or obj.get("version") != 1:
            raise ValueError("not a captions offsets sidecar")
        off = cls(int(obj["every"]), int(obj["records"]), int(obj["size"]), [int(x) for x in obj["offsets"]],
                  [int(x) for x in obj["lines"]])
        if off.every < 1 or len(off.offsets) != len(off.lines) or len(off.offsets) != -(-off.records // off.every):
            raise ValueError("inconsistent captions offsets sidecar")
        return off


def captions_path(path: str | Path) -> Path:
    """The captions file (a folder means its ``captions.jsonl``); :class:`CaptionsFileMissing` (a
    FileNotFoundError) when there is none."""
    path = Path(path)
    if path.is_dir():
        path = path / CAPTIONS_FILE
    if not path.is_file():
        raise CaptionsFileMissing(f"captions file {path} does not exist; write one with `synrep captions`")
    return path


def offsets_path(path: str | Path) -> Path:
    """``captions.jsonl`` -> ``captions.offsets.json`` (any other name: its stem + ``.offsets.json``)."""
    path = Path(path)
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    return path.with_name(f"{stem}.offsets.json")


def save_offsets(path: str | Path, offsets: LineOffsets) -> bool:
    """Write the sidecar of captions file ``path`` atomically; False (and nothing written) if not writable."""
    try:
        atomic_write_text(offsets_path(path), json.dumps(offsets.to_json(), separators=(",", ":")) + "\n")
        return True
    except OSError as err:
        LOG.info("captions offsets for %s kept in memory only (%s)", path, err)
        return False


def _blank(raw: bytes) -> bool:
    stripped = raw.strip()
    if not stripped:
        return True
    return not stripped.isascii() and not stripped.decode("utf-8", errors="replace").strip()


def build_offsets(path: str | Path, every: int = OFFSETS_EVERY) -> LineOffsets:
    """One streaming scan of a captions file: offsets of every ``every``-th caption (no JSON parsing)."""
    offsets, lines = [], []
    pos = number = index = 0
    with open(path, "rb") as fh:
        for raw in fh:
            number += 1
            if not _blank(raw):
                if index % every == 0:
                    offsets.append(pos)
                    lines.append(number)
                index += 1
            pos += len(raw)
    return LineOffsets(every, index, pos, offsets, lines)


def line_offsets(path: str | Path, rebuild: bool = False) -> LineOffsets:
    """The offsets of a captions file: from this process's cache, the sidecar when it is fresh (same file
    size), else from one scan (then written as the sidecar where the folder allows)."""
    path = captions_path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if not rebuild and key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    off = None
    sidecar = offsets_path(path)
    if not rebuild and sidecar.is_file():
        try:
            off = LineOffsets.from_json(json.loads(sidecar.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as err:
            LOG.info("ignoring unreadable captions offsets %s (%s)", sidecar, err)
        if off is not None and off.size != stat.st_size:
            LOG.info("captions offsets %s are stale (made for %d bytes, the file has %d); rebuilding",
                     sidecar, off.size, stat.st_size)
            off = None
    if off is None:
        off = build_offsets(path)
        if off.size == path.stat().st_size:  # not a file still being written
            save_offsets(path, off)
    _CACHE[key] = off
    while len(_CACHE) > 8:
        _CACHE.popitem(last=False)
    return off


def count_captions(path: str | Path) -> int:
    """How many captions (non-blank lines) a captions file holds, without parsing or holding them."""
    return line_offsets(path).records


def _parse(raw: bytes, path: Path, number: int, index: int) -> dict:
    try:
        rec = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise CaptionsFileError(f"{path}, line {number}: not valid UTF-8") from None
    except json.JSONDecodeError as err:
        raise CaptionsFileError(f"{path}, line {number}: not valid JSON ({err.msg})") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("caption"), str) or not rec["caption"].strip():
        raise CaptionsFileError(f"{path}, line {number}: needs a non-empty string field 'caption'")
    rec.setdefault("id", index)
    rec.setdefault("concept", "")
    return rec


def iter_captions(path: str | Path, start: int = 0, stop: int | None = None) -> Iterator[dict]:
    """Captions ``start <= k < stop`` of a captions file, in order, read as a stream.

    Seeks with the offsets sidecar (built by one scan when missing or stale) and skips at most
    ``OFFSETS_EVERY - 1`` lines; from the start it needs no sidecar. Each caption is validated: a malformed
    line raises CaptionsFileError (a ValueError) naming the file and line number. Equal to
    ``read_captions(path)[start:stop]``.
    """
    path = captions_path(path)  # here, not at the first next(): a missing file fails the call
    if start < 0 or (stop is not None and stop < 0):
        raise ValueError(f"start and stop must be >= 0, got {start}, {stop}")
    return _iter_captions(path, start, stop)


def _iter_captions(path: Path, start: int, stop: int | None) -> Iterator[dict]:
    if stop is not None and stop <= start:
        return
    pos, number, index = 0, 0, 0
    fh = open(path, "rb")
    try:
        if start > 0:
            for attempt in (0, 1):
                off = line_offsets(path, rebuild=attempt == 1)
                if start >= off.records:
                    return
                k = start // off.every
                pos, number, index = off.offsets[k], off.lines[k] - 1, k * off.every
                fh.seek(max(pos - 1, 0))
                if pos == 0 or fh.read(1) == b"\n":
                    break
                LOG.info("captions offsets for %s do not fit the file; rebuilding them", path)  # same size, other lines
            else:
                raise CaptionsFileError(f"{path}: cannot find caption {start} (the file changed while it was read?)")
        for raw in fh:
            number += 1
            if _blank(raw):
                continue
            if index >= start:
                if stop is not None and index >= stop:
                    return
                yield _parse(raw, path, number, index)
            index += 1
    finally:
        fh.close()


def read_captions(path: str | Path) -> list[dict]:
    """All captions of a (small) captions file; a malformed line raises CaptionsFileError naming file and line."""
    path = captions_path(path)
    records = list(iter_captions(path))
    if not records:
        raise CaptionsFileError(f"captions file {path} is empty")
    return records


def write_jsonl_with_offsets(path: Path, lines: Iterator[bytes]) -> LineOffsets:
    """Write ``lines`` (each ending in a newline, none blank) to ``path`` atomically, then its sidecar.

    Streams through a temporary file that is fsynced and renamed; the old sidecar is removed first, so a
    reader never pairs the new file with old offsets.
    """
    off = LineOffsets()
    pos = 0
    with atomic_file(path) as fh:
        for line in lines:
            if off.records % off.every == 0:
                off.offsets.append(pos)
                off.lines.append(off.records + 1)
            fh.write(line)
            pos += len(line)
            off.records += 1
        off.size = pos
        offsets_path(path).unlink(missing_ok=True)
    save_offsets(path, off)
    return off
