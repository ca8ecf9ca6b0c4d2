"""Registries of the pluggable families (backbones, generators, caption backends).

A spec names an entry either exactly (``cnn``, ``template``) or as ``name:<argument>`` for entries that take
one (``timm:vit_small_patch16_224``, ``diffusers:/models/sd15``, ``openai:http://host:8080``). Each entry is a
factory registered once, with what it declares about itself (``traits``); configs check a spec with
:meth:`Registry.check` when they load, and stages build with :meth:`Registry.build`. Adding a backbone, a
generator or a caption backend is one function and one ``@REGISTRY.register(...)`` line::

    @BACKBONES.register("tiny-mlp", help="a two-layer MLP on flattened pixels")
    def _tiny_mlp(argument, cfg):
        return TinyMLP(cfg)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import SynrepError


@dataclass(frozen=True)
class Entry:
    name: str
    factory: Callable[..., Any]
    argument: str = ""  # "" = the spec is the bare name; else a placeholder such as "<folder>", the spec is name:<argument>
    optional_argument: bool = False  # both ``name`` and ``name:<argument>`` are accepted
    pattern: str = ""  # a regex the argument must match in full ("" = any non-empty text)
    help: str = ""
    traits: dict[str, Any] = field(default_factory=dict)

    def usage(self) -> str:
        if not self.argument:
            return self.name
        return f"{self.name}[:{self.argument}]" if self.optional_argument else f"{self.name}:{self.argument}"


class Registry:
    """Named factories of one family; specs are ``name`` or ``name:<argument>``."""

    def __init__(self, family: str, error: type[SynrepError] = SynrepError):
        self.family = family
        self.error = error
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, *, argument: str = "", optional_argument: bool = False, pattern: str = "",
                 help: str = "", **traits: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: ``factory(argument, *args, **kwargs)`` builds the entry (``argument`` is None for a bare name)."""
        if ":" in name:
            raise ValueError(f"{self.family} name {name!r} may not contain ':'")

        def add(factory: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._entries and self._entries[name].factory is not factory:
                raise ValueError(f"{self.family} {name!r} is registered twice")
            self._entries[name] = Entry(name, factory, argument, optional_argument, pattern, help, traits)
            return factory
        return add

    def names(self) -> list[str]:
        return list(self._entries)

    def choices(self) -> str:
        """The allowed specs as one line: ``cnn, resnet, timm:<name>``."""
        return ", ".join(e.usage() for e in self._entries.values())

    def problem(self, spec: str) -> str | None:
        """Why ``spec`` is not a valid spec of this family, or None when it is (nothing is built or loaded)."""
        name, sep, argument = str(spec).partition(":")
        entry = self._entries.get(name)
        if entry is None:
            return f"{spec!r} is not a known {self.family}; choose one of {self.choices()}"
        if not sep and entry.argument and not entry.optional_argument:
            return f"{spec!r} needs an argument: {entry.usage()}"
        if sep and not entry.argument:
            return f"{spec!r}: {self.family} {name!r} takes no argument; write {name}"
        if sep and not argument:
            return f"{spec!r}: the argument after '{name}:' is empty; write {entry.usage()}"
        if sep and entry.pattern and not re.fullmatch(entry.pattern, argument):
            return f"{spec!r}: {argument!r} is not a valid {entry.argument} for {name}; write {entry.usage()}"
        return None

    def entry(self, spec: str) -> tuple[Entry, str | None]:
        """The entry ``spec`` names and its argument (None for a bare name); raises ``self.error`` if invalid."""
        problem = self.problem(spec)
        if problem:
            raise self.error(problem)
        name, sep, argument = str(spec).partition(":")
        return self._entries[name], (argument if sep else None)

    def traits(self, spec: str) -> dict[str, Any]:
        """What the entry ``spec`` names declares about itself; raises ``self.error`` if ``spec`` is invalid."""
        return dict(self.entry(spec)[0].traits)

    def names_with(self, trait: str) -> list[str]:
        """The usages of the entries whose ``trait`` is true."""
        return [e.usage() for e in self._entries.values() if e.traits.get(trait)]

    def build(self, spec: str, *args: Any, **kwargs: Any) -> Any:
        entry, argument = self.entry(spec)
        return entry.factory(argument, *args, **kwargs)

    def describe(self) -> str:
        """One line for ``--help``: every spec with its meaning."""
        return "; ".join(f"{e.usage()} = {e.help}" if e.help else e.usage() for e in self._entries.values())
