"""Concept lists: what the captions are about.

A concept list is YAML (``concepts:`` entries with name, synonyms, attributes, optional label,
plus an optional ``backgrounds:`` mapping) or plain text (one concept per line, optionally
``name: synonym, synonym``; ``#`` starts a comment). Shipped lists live in ``synrep/data/concepts``
and are named without their suffix (``fashion-mnist``, ``imagenet-1k`` ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from ..config import read_yaml

from ..errors import SynrepError

RELATIONS = ["in", "on", "next to", "behind", "in front of", "over", "under", "above", "below", "beside"]


class ConceptError(SynrepError, ValueError):
    """A concept list or background mapping is missing, empty or malformed."""


@dataclass
class Concept:
    name: str
    synonyms: list[str] = field(default_factory=list)
    attributes: list[str] = field(default_factory=list)
    label: int | None = None

    @property
    def mentions(self) -> list[str]:
        """Words any caption of this concept must contain one of (name first)."""
        seen = []
        for word in [self.name, *self.synonyms]:
            if word and word.lower() not in seen:
                seen.append(word.lower())
        return seen


@dataclass
class ConceptList:
    name: str
    concepts: list[Concept]
    backgrounds: dict[str, list[str]] = field(default_factory=dict)
    licence: str = ""

    def names(self) -> list[str]:
        return [c.name for c in self.concepts]

    def by_name(self, name: str) -> Concept:
        for c in self.concepts:
            if c.name == name:
                return c
        raise KeyError(name)


def shipped_lists() -> dict[str, Path]:
    """Shipped concept lists by name (file stem with underscores as dashes)."""
    folder = resources.files("synrep") / "data" / "concepts"
    out = {}
    for entry in folder.iterdir():
        if entry.name.endswith((".yaml", ".txt")) and not entry.name.startswith("backgrounds"):
            out[entry.name.rsplit(".", 1)[0].replace("_", "-")] = Path(str(entry))
    return out


def generic_backgrounds() -> list[str]:
    path = resources.files("synrep") / "data" / "concepts" / "backgrounds.txt"
    return _read_lines(Path(str(path)))


def _read_lines(path: Path) -> list[str]:
    lines = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            lines.append(line)
    return lines


def load_concepts(source: str | Path) -> ConceptList:
    """Load a shipped list by name or a user file (``.yaml``/``.yml`` or plain text)."""
    shipped = shipped_lists()
    if str(source) in shipped:
        path = shipped[str(source)]
    else:
        path = Path(source)
        if not path.is_file():
            raise ConceptError(
                f"concept list {source!r} is neither a file nor a shipped list; shipped: {', '.join(sorted(shipped))}"
            )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConceptError(f"cannot read concept list {path}: {err}") from None
    if path.suffix in (".yaml", ".yml"):
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConceptError(f"concept list {path} is not valid YAML: {err}") from None
        if not isinstance(data, dict) or not isinstance(data.get("concepts"), list):
            raise ConceptError(f"concept list {path} must have a 'concepts:' list")
        concepts = []
        for i, entry in enumerate(data["concepts"]):
            if isinstance(entry, str):
                entry = {"name": entry}
            if not isinstance(entry, dict) or not str(entry.get("name", "")).strip():
                raise ConceptError(f"concept list {path}: entry {i} has no 'name'")
            unknown = set(entry) - {"name", "synonyms", "attributes", "label"}
            if unknown:
                raise ConceptError(f"concept list {path}: entry {i} has unknown field(s) {sorted(unknown)}; allowed: name, synonyms, attributes, label")
            concepts.append(Concept(str(entry["name"]).strip(), [str(s) for s in entry.get("synonyms", [])],
                                    [str(a) for a in entry.get("attributes", [])], entry.get("label")))
        backgrounds = {str(k): [str(v) for v in vs] for k, vs in (data.get("backgrounds") or {}).items()}
        result = ConceptList(str(data.get("name", path.stem)), concepts, backgrounds, str(data.get("licence", "")))
    else:
        concepts = []
        for line in _read_lines(path):
            name, _, syn = line.partition(":")
            concepts.append(Concept(name.strip(), [s.strip() for s in syn.split(",") if s.strip()]))
        result = ConceptList(path.stem, concepts)
    if not result.concepts:
        raise ConceptError(f"concept list {path} is empty")
    names = [c.name for c in result.concepts]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConceptError(f"concept list {path} names these concepts twice: {dupes}")
    return result


def load_backgrounds(path: str | Path) -> dict[str, list[str]]:
    """A user mapping ``concept: [background, ...]`` in YAML."""
    data = read_yaml(Path(path), "background mapping", ConceptError)
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise ConceptError(f"background mapping {path} must map each concept to a list of backgrounds")
    return {str(k): [str(v) for v in vs] for k, vs in data.items()}
