"""The ``template`` caption backend: no model, deterministic phrase patterns filled from a seed.

It writes captions of the same kinds as the LLM backends (``c``, ``c+bg``, ``c+rel``, ``bg``) by
combining a concept's synonyms and attributes with backgrounds, relations and framing phrases.
Given the same request (and so the same seed) it always returns the same caption.
"""

from __future__ import annotations

import random

from .requests import CaptionRequest

FRAMES_C = [
    "a photo of {x}", "a product photo of {x}", "a close-up photo of {x}", "{X} lying flat",
    "a studio shot of {x}", "a catalogue picture of {x}", "{X} seen from the front", "a simple picture of {x}",
    "{X}, photographed from above", "a black and white photo of {x}", "{X} on display", "a snapshot of {x}",
    "a centred photo of {x}", "{X} in soft light", "an online shop image of {x}", "a clear photo of {x}",
]
FRAMES_BG = [
    "{X} on {bg}", "a photo of {x} on {bg}", "{X} in front of {bg}", "{X} next to {bg}",
    "a product shot of {x} against {bg}", "{X} placed on {bg}", "a picture of {x} by {bg}",
    "{X} left on {bg}", "a photo of {x} with {bg} behind it",
]
FRAMES_BG_ONLY = ["a photo of {bg}", "a photo of {bg} with nothing else in view", "a wide shot of {bg}", "an empty scene with {bg}"]
FRAMES_REL = ["{X} {rel} {y}", "a photo of {x} {rel} {y}", "a picture of {x} {rel} {y}"]
OTHER_OBJECTS = ["a chair", "a box", "a lamp", "a table", "a suitcase", "a plant", "a mirror", "a basket", "a shelf", "a stool"]


PAIRED_NOUNS = {"trousers", "pants", "jeans", "slacks", "chinos", "sandals", "sneakers", "trainers", "boots", "flip-flops"}


def with_article(phrase: str) -> str:
    """``"apple" -> "an apple"``, ``"jeans" -> "a pair of jeans"``; determined phrases stay unchanged."""
    words = phrase.split()
    if not words or words[0].lower() in ("a", "an", "the", "some"):
        return phrase
    if words[-1].lower() in PAIRED_NOUNS:
        return "a pair of " + phrase
    return ("an " if words[0][:1].lower() in "aeiou" else "a ") + phrase


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def template_caption(request: CaptionRequest) -> str:
    """One caption for ``request``, a pure function of the request's fields and seed."""
    rng = random.Random(f"{request.seed}|{request.concept.name}|{request.template}|{request.attempt}")
    concept = request.concept
    noun = rng.choice(concept.mentions)
    attribute = rng.choice(concept.attributes) if concept.attributes and rng.random() < 0.75 else ""
    x = with_article(f"{attribute} {noun}".strip())
    if request.template == "c":
        frame = rng.choice(FRAMES_C)
        text = frame.format(x=x, X=_capitalise(x))
    elif request.template == "c+bg":
        frame = rng.choice(FRAMES_BG)
        text = frame.format(x=x, X=_capitalise(x), bg=request.background or "a plain background")
    elif request.template == "bg":
        bg = request.background or "a plain background"
        text = rng.choice(FRAMES_BG_ONLY).format(bg=bg)  # never starting with the input, which cleaning would cut as an echo
    elif request.template == "c+rel":
        frame = rng.choice(FRAMES_REL)
        other = request.other or rng.choice(OTHER_OBJECTS)
        text = frame.format(x=x, X=_capitalise(x), rel=request.relation or "next to", y=with_article(other))
    else:
        raise ValueError(f"unknown template {request.template!r}; choose c, c+bg, c+rel or bg")
    return _capitalise(text) + ("" if rng.random() < 0.5 else ".")


class TemplateBackend:
    """Caption backend that needs no model (fast, deterministic; for tests and the quickest demo)."""

    name = "template"

    def generate(self, requests: list[CaptionRequest]) -> list[str]:
        return [template_caption(r) for r in requests]

    def close(self) -> None:
        pass
