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


def clean_caption(raw: str, mentions: list[str] | None, min_words: int = 3, max_words: int = 30,
                  prompt_input: str | None = None) -> tuple[str | None, str]:
    """Return ``(caption, "ok")`` or ``(None, reason)``.

    Keeps the first non-empty line, removes prompt echoes (``input =>``), labels (``Caption:``),
    list markers and surrounding quotes, then checks length and that the concept is mentioned (unless
    ``mentions`` is None: a background-only caption).
    """
    if not isinstance(raw, str):
        return None, "not text"
    lines = [ln for ln in raw.replace("\r", "\n").split("\n") if ln.strip()]
    if not lines:
        return None, "empty"
    text = lines[0]
    if "=>" in text:
        text = text.rsplit("=>", 1)[1]
    # an echo is the input followed by a separator ("shirt: a shirt on a rack"), not a caption that opens with
    # the concept's name ("Shirt with a floral pattern ...", "Bags piled on a table")
    echo = re.match(re.escape(prompt_input.strip()) + r"\s*(?:[:=>|\-\u2013\u2014]+|$)", text.strip(), re.I) if prompt_input else None
    if echo:
        text = text.strip()[echo.end():]
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
    if mentions is not None and not mentions_concept(text, mentions):
        return None, "concept not mentioned"
    return text[0].upper() + text[1:], "ok"


def normalise(text: str) -> str:
    """Lower case, letters/digits only, single spaces: the key for exact-duplicate removal."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


EXACT_BELOW = 1024  # up to this many rows the exact check is cheap; method="auto" uses it
LSH_MISS = 1e-3  # the chance that LSH misses one pair exactly at the threshold (closer pairs: far less)
# Rough CPU costs in seconds (measured on 2 cores), used only to choose between the exact check and LSH
# and to size the tables; either way the result is the same up to LSH's rare misses.
_DOT_S = 1.6e-11  # per multiply-add in a BLAS matrix product (exact check, hashing)
_SORT_S = 6e-8  # per row per table (hash, sort, bucket bounds)
_PAIR_S = 6.5e-7  # per candidate pair LSH checks (gather two rows, one dot product)


def near_duplicate_mask(embeddings: np.ndarray, threshold: float, *, method: str = "auto", seed: int = 0) -> np.ndarray:
    """bool ``[N]``: True for rows whose cosine similarity to an earlier kept row exceeds ``threshold``.

    embeddings: float ``[N, D]``, L2-normalised. Rows are taken in order; a row is kept unless an earlier
    kept row is more similar than ``threshold``.

    ``method``: ``exact`` compares every pair (quadratic, BLAS in blocks). ``lsh`` hashes the rows into T
    seeded random-hyperplane (SimHash) tables of b bits each and computes the exact cosine only for pairs
    that share a bucket in some table. b and T come from the similarities of a sample of random pairs:
    enough tables that a pair exactly at the threshold is missed with probability ``LSH_MISS`` (closer
    pairs far less), enough bits that unrelated rows rarely share a bucket, so the work grows like N times
    the bucket sizes instead of N^2. ``auto`` uses whichever is cheaper: exact up to ``EXACT_BELOW`` rows and
    when the rows are so alike that no table separates them (it also gives up on LSH midway, for the
    exact check, when the buckets come out more crowded than the sample said), LSH otherwise.
    """
    if method not in ("auto", "exact", "lsh"):
        raise ValueError(f"method={method!r} is not allowed; choose auto, exact or lsh")
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be [N, D], got shape {emb.shape}")
    n, d = emb.shape
    if n < 2 or method == "exact" or (method == "auto" and n <= EXACT_BELOW):
        return _near_duplicates_exact(emb, threshold)
    rng = np.random.default_rng(seed)
    bits, tables, cost = _lsh_plan(emb, threshold, rng)
    budget = n * n / 2 * d * _DOT_S if method == "auto" else float("inf")
    dup = None if cost >= budget else _near_duplicates_lsh(emb, threshold, bits, tables, rng, budget)
    return _near_duplicates_exact(emb, threshold) if dup is None else dup


def _agreement(cos: np.ndarray | float) -> np.ndarray:
    """Chance that one random hyperplane puts two unit vectors with this cosine on the same side."""
    return 1.0 - np.arccos(np.clip(cos, -1.0, 1.0)) / np.pi


def _lsh_plan(emb: np.ndarray, threshold: float, rng: np.random.Generator) -> tuple[int, int, float]:
    """(bits per table, tables, estimated seconds): the cheapest plan that misses a threshold pair rarely.

    Two rows share a bucket of one b-bit table with chance agreement(cos)^b; its mean over a sample of
    random pairs estimates the share of all pairs that each table makes LSH check.
    """
    n, d = emb.shape
    i, j = rng.integers(0, n, size=(2, 2048))
    cos = np.einsum("kd,kd->k", emb[i[i != j]], emb[j[i != j]]).astype(np.float64)
    background = _agreement(cos) if len(cos) else np.zeros(1)
    p1 = float(_agreement(threshold))
    best = (16, 64, float("inf"))
    for bits in range(4, 63):
        hit = p1 ** bits
        tables = 1 if hit >= 1.0 else int(np.ceil(np.log(LSH_MISS) / np.log1p(-hit)))
        if tables > 256:
            break
        pairs = n * n / 2 * tables * float(np.mean(background ** bits))
        cost = n * tables * (d * bits * _DOT_S + _SORT_S) + pairs * _PAIR_S
        if cost < best[2]:
            best = (bits, tables, cost)
    return best


def _near_duplicates_exact(emb: np.ndarray, threshold: float, block: int = 256) -> np.ndarray:
    """The greedy rule with every pair compared: rows in blocks, each block against all kept rows so far."""
    n = len(emb)
    dup = np.zeros(n, dtype=bool)
    kept: list[int] = []
    for a in range(0, n, block):
        rows = emb[a:a + block]
        earlier = np.zeros(len(rows), dtype=bool)
        for c in range(0, len(kept), 8192):  # kept rows in column chunks: memory O(block x 8192)
            earlier |= (rows @ emb[kept[c:c + 8192]].T).max(axis=1) > threshold
        within = rows @ rows.T
        local: list[int] = []
        for r in range(len(rows)):
            if earlier[r] or (local and float(within[r, local].max()) > threshold):
                dup[a + r] = True
            else:
                local.append(r)
        kept.extend(a + r for r in local)
    return dup


def _near_duplicates_lsh(emb: np.ndarray, threshold: float, bits: int, tables: int, rng: np.random.Generator,
                         budget: float = float("inf")) -> np.ndarray | None:
    """The greedy rule over the pairs that share a bucket in some table; None when it would cost > budget.

    One table at a time (memory O(N x bits) for the hashes): seeded hyperplanes, sort by bucket, then
    every pair inside a bucket, vectorised by the distance between the two rows in the sorted order.
    """
    n, d = emb.shape
    weights = np.left_shift(np.int64(1), np.arange(bits, dtype=np.int64))
    found = [np.zeros(0, dtype=np.int64)]
    spent = 0.0
    for _ in range(tables):
        planes = rng.standard_normal((d, bits)).astype(np.float32)
        keys = np.empty(n, dtype=np.int64)
        for a in range(0, n, 16384):
            keys[a:a + 16384] = (emb[a:a + 16384] @ planes > 0).astype(np.int64) @ weights
        order = np.argsort(keys, kind="stable")  # stable: inside a bucket rows stay ascending
        sorted_keys = keys[order]
        runs = np.diff(np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1], True]))
        spent += n * (d * bits * _DOT_S + _SORT_S) + float((runs * (runs - 1) // 2).sum()) * _PAIR_S
        if spent > budget:
            return None
        gap = 1
        active = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])  # p whose row p+gap shares its bucket
        while active.size:
            first, second = order[active], order[active + gap]  # first < second
            for c in range(0, len(first), 16384):
                a, b = first[c:c + 16384], second[c:c + 16384]
                close = np.einsum("kd,kd->k", emb[a], emb[b]) > threshold
                if close.any():
                    found.append(a[close] * n + b[close])
            gap += 1
            active = active[active + gap < n]
            active = active[sorted_keys[active + gap] == sorted_keys[active]]
    pairs = np.unique(np.concatenate(found))
    dup = np.zeros(n, dtype=bool)
    earlier, later = pairs // n, pairs % n
    by_later = np.lexsort((earlier, later))
    earlier, later = earlier[by_later].tolist(), later[by_later].tolist()
    k = 0
    while k < len(later):  # rows in order: a row is a duplicate when one of its close earlier rows was kept
        j, kept_close = later[k], False
        while k < len(later) and later[k] == j:
            kept_close = kept_close or not dup[earlier[k]]
            k += 1
        dup[j] = kept_close
    return dup


def distinct_word_ratio(captions: list[str]) -> float:
    """Distinct words / total words over all captions (a simple diversity measure)."""
    counter = WordCounter()
    for c in captions:
        counter.add(c)
    return counter.ratio()


class WordCounter:
    """:func:`distinct_word_ratio` over a stream: memory grows with the vocabulary, not with the captions."""

    def __init__(self) -> None:
        self.words: set[str] = set()
        self.total = 0

    def add(self, caption: str) -> None:
        words = normalise(caption).split()
        self.words.update(words)
        self.total += len(words)

    def ratio(self) -> float:
        return len(self.words) / self.total if self.total else 0.0
