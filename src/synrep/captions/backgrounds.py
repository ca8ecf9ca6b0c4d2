"""Backgrounds per concept written by the language model itself (SynCLR listed them with a stronger LLM)."""

from __future__ import annotations

import logging
import re
from collections import Counter

from .concepts import ConceptList
from .llm_backends import BackendError, Failed, format_causes

LOG = logging.getLogger("synrep.captions")
BACKGROUND_PROMPT = ("List {n} different, realistic places or backgrounds where a photo of {article} {concept} could be taken. "
                     "Write one short place per line, without numbers.\n-")
_MARKER = re.compile(r"^\s*(?:[-*\u2022]+|\d+[.)])\s*")


def parse_backgrounds(text: str, limit: int) -> list[str]:
    """Short distinct lines (2-6 words, letters only) from a model's list, lower case, in order."""
    out: list[str] = []
    for line in text.replace("\r", "\n").split("\n"):
        line = _MARKER.sub("", line).strip().strip(".,;:\"'").lower()
        words = line.split()
        if 1 <= len(words) <= 6 and all(re.fullmatch(r"[a-z][a-z'-]*", w) for w in words) and line not in out:
            out.append(line)
        if len(out) >= limit:
            break
    return out


def llm_backgrounds(backend, concepts: ConceptList, per_concept: int, seed: int, fallback: list[str]) -> dict[str, list[str]]:
    """Ask the backend for ``per_concept`` backgrounds of every concept; concepts with fewer than 2 usable
    answers fall back to ``fallback`` (the generic list). A request that got no answer at all raises
    :class:`BackendError` naming the causes."""
    if not hasattr(backend, "complete"):
        raise ValueError(f"backgrounds=llm needs a language-model backend (smollm2, hf:, openai:), not {backend.name!r}")
    prompts = [backend.render_instruction(BACKGROUND_PROMPT.format(n=per_concept, article="an" if c.name[0] in "aeiou" else "a",
                                                                    concept=c.name)) for c in concepts.concepts]
    answers = backend.complete(prompts, seed)
    failed = Counter(a.cause for a in answers if isinstance(a, Failed))
    if failed:  # nothing written: a rerun asks again instead of keeping generic lists for these concepts
        raise BackendError(f"backgrounds: {sum(failed.values())} of {len(prompts)} requests to "
                           f"{getattr(backend, 'url', backend.name)} failed ({format_causes(failed)}); "
                           "nothing was written, rerun to ask again")
    mapping, fell_back = {}, 0
    for concept, answer in zip(concepts.concepts, answers):
        found = parse_backgrounds(answer, per_concept)
        if len(found) < 2:
            fell_back += 1
            found = list(fallback)
        mapping[concept.name] = found
    if fell_back:
        LOG.info("backgrounds: %d of %d concepts fell back to the generic list", fell_back, len(concepts.concepts))
    return mapping
