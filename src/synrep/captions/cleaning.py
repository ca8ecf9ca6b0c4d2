"""Turning raw language-model output into one clean caption, and removing duplicates."""

from __future__ import annotations

import re

import numpy as np

_LIST_MARKER = re.compile(r"^\s*(?:[-*\u2022>]+|\(?\d+[.)]|[a-z][.)])\s+", re.IGNORECASE)
_LABEL = re.compile(r"^\s*(?:caption|output|answer|assistant|response)\s*[:\-]\s*", re.IGNORECASE)
# Chatty preambles small instruction models put before the caption ("The caption for X is: ...").
_PREAMBLE = re.compile(r"^\s*(?:here(?:'s| is) (?:a |the |your )?(?:caption|description)[^:]*:|"
                       r"(?:the |a |my )?(?:image )?(?:caption|sentence|description)(?: for [^:]{0,60})? (?:is|would be|reads)\s*:?|"
                       r"sure[,!.]?(?: here[^:]*:)?)\s*", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[a-z0-9)\]])[.!?](?:\s|$)")
_QUOTES = "\"'`\u201c\u201d\u2018\u2019\u00ab\u00bb"
_SPACES = re.compile(r"\s+")


def mentions_concept(caption: str, mentions: list[str]) -> bool:
    """True when the caption contains any mention as whole words (a trailing plural s/es allowed)."""
    text = caption.lower()
    for word in mentions:
        pattern = r"(?<![a-z0-9])" + re.escape(word.lower()) + r"(?:s|es)?(?![a-z0-9])"
        if re.search(pattern, text):
            return True
    return False


def clean_caption(raw: str, mentions: list[str], min_words: int = 3, max_words: int = 30,
                  prompt_input: str | None = None) -> tuple[str | None, str]:
    """Return ``(caption, "ok")`` or ``(None, reason)``.

    Keeps the first non-empty line, removes prompt echoes (``input =>``), labels (``Caption:``),
    list markers and surrounding quotes, then checks length and that the concept is mentioned.
    """
    if not isinstance(raw, str):
        return None, "not text"
    lines = [ln for ln in raw.replace("\r", "\n").split("\n") if ln.strip()]
    if not lines:
        return None, "empty"
    text = lines[0]
    if "=>" in text:
        text = text.rsplit("=>", 1)[1]
    if prompt_input and text.strip().lower().startswith(prompt_input.lower()):
        text = text.strip()[len(prompt_input):]
    for _ in range(3):
        text = _PREAMBLE.sub("", text)
        text = _LABEL.sub("", text)
        text = _LIST_MARKER.sub("", text)
        text = text.strip().strip(_QUOTES).strip()
    if prompt_input and normalise(text) == normalise(prompt_input):
        return None, "prompt echo"
    end = _SENTENCE_END.search(text)
    if end:  # one sentence per caption
        text = text[: end.start() + 1]
    text = _SPACES.sub(" ", text).strip(" ,;:-")
    if not text:
        return None, "empty"
    if any(ord(ch) < 32 for ch in text):
        return None, "control characters"
    words = text.split()
    if len(words) < min_words:
        return None, "too short"
    if len(words) > max_words:
        return None, "too long"
    if not mentions_concept(text, mentions):
        return None, "concept not mentioned"
    return text[0].upper() + text[1:], "ok"


def normalise(text: str) -> str:
    """Lower case, letters/digits only, single spaces: the key for exact-duplicate removal."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def near_duplicate_mask(embeddings: np.ndarray, threshold: float) -> np.ndarray:
    """bool ``[N]``: True for rows whose cosine similarity to an earlier kept row exceeds ``threshold``.

    embeddings: float ``[N, D]``, L2-normalised.
    """
    keep: list[int] = []
    dup = np.zeros(len(embeddings), dtype=bool)
    for i in range(len(embeddings)):
        if keep and float(np.max(embeddings[keep] @ embeddings[i])) > threshold:
            dup[i] = True
        else:
            keep.append(i)
    return dup


def distinct_word_ratio(captions: list[str]) -> float:
    """Distinct words / total words over all captions (a simple diversity measure)."""
    words = [w for c in captions for w in normalise(c).split()]
    return len(set(words)) / len(words) if words else 0.0
