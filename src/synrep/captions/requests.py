"""What a caption backend is asked for, and how requests are planned from a concept list."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from .concepts import RELATIONS, Concept, ConceptList

TEMPLATES = ("c", "c+bg", "c+rel", "bg")  # SynCLR's: object, object + environment, object + relation, environment only


@dataclass
class CaptionRequest:
    """One caption to write: a concept under one of SynCLR's templates (``bg``: the concept's environment alone).

    ``examples`` are the in-context examples an LLM prompt carries; ``attempt`` counts retries so a
    retried request gets a new sample with the same seed lineage. ``index`` is its number in the concept's
    plan: ``(index, attempt)`` names one request of a concept.
    """

    concept: Concept
    template: str
    seed: int
    background: str | None = None
    relation: str | None = None
    other: str | None = None
    examples: list[str] = field(default_factory=list)
    attempt: int = 0
    index: int = -1


def choose_template(rng: random.Random, mix: dict[str, float]) -> str:
    total = sum(mix.values())
    point = rng.random() * total
    for name in TEMPLATES:
        point -= mix.get(name, 0.0)
        if point < 0:
            return name
    return [t for t in TEMPLATES if mix.get(t, 0) > 0][-1]


def plan_requests(
    concepts: ConceptList,
    concept: Concept,
    count: int,
    seed: int,
    mix: dict[str, float],
    backgrounds: list[str],
    example_pools: dict[str, list[str]] | None = None,
    num_examples: int = 3,
    start: int = 0,
) -> list[CaptionRequest]:
    """``count`` requests for ``concept``, numbered from ``start``; a pure function of its arguments."""
    out = []
    others = [c.name for c in concepts.concepts if c.name != concept.name]
    for index in range(start, start + count):
        rng = random.Random(f"plan|{seed}|{concept.name}|{index}")
        template = choose_template(rng, mix)
        req = CaptionRequest(concept, template, seed=rng.randrange(2**31), index=index)
        if template in ("c+bg", "bg"):
            req.background = rng.choice(backgrounds)
        elif template == "c+rel":
            req.relation = rng.choice(RELATIONS)
            req.other = rng.choice(others) if others and rng.random() < 0.5 else None
        if example_pools:
            pool = example_pools[template]
            req.examples = rng.sample(pool, min(num_examples, len(pool)))
        out.append(req)
    return out
