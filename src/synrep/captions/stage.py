"""``synrep captions``: concepts in, a captions JSONL out (SynCLR stage 1).

Work is split by concept: concept i is written by rank ``i mod world_size`` to its own part file
``parts/concept-00007.jsonl``, atomically, with a done-marker ``parts/concept-00007.json`` holding its
counts. A rerun skips concepts whose marker exists, so a killed run resumes without duplicates.
Rank 0 then merges the parts into ``captions.jsonl`` in a seeded random interleave (every concept spread
over the whole file, so any cut of it, e.g. a generated shard, mixes concepts), streaming: memory is
O(concepts), never the captions. It writes ``captions.offsets.json`` (see :mod:`.files`) and ``summary.json``.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import yaml
from tqdm import tqdm

from ..config import save_config
from ..distributed import barrier, init_distributed
from ..utils import atomic_write_json, atomic_write_text, set_threads, stable_seed
from .backgrounds import llm_backgrounds
from .cleaning import WordCounter, clean_caption, near_duplicate_mask, normalise
from .concepts import ConceptList, generic_backgrounds, load_backgrounds, load_concepts
from .files import (CAPTIONS_FILE, captions_path, count_captions, iter_captions, offsets_path,  # noqa: F401 - API
                    read_captions, write_jsonl_with_offsets)
from .llm_backends import SamplingSettings, make_backend
from .prompts import load_example_pools, prompt_input
from .requests import TEMPLATES, plan_requests

LOG = logging.getLogger("synrep.captions")
SUMMARY_FILE = "summary.json"


@dataclass
class CaptionsConfig:
    concepts: str = "fashion-mnist"
    out_dir: str = "runs/captions"
    backend: str = "template"
    per_concept: int = 20
    seed: int = 0
    mix: list[float] = field(default_factory=lambda: [0.44, 0.45, 0.11])  # c, c+bg, c+rel
    num_examples: int = 3
    examples_file: str = ""
    backgrounds: str = ""  # "" (list's own + generic), a YAML mapping file, or "llm" (the backend writes them)
    backgrounds_per_concept: int = 8
    max_retries: int = 3
    min_words: int = 3
    max_words: int = 30
    dedup: str = "auto"  # auto | minilm | text | none
    near_dup_threshold: float = 0.95
    temperature: float = 0.8
    top_p: float = 0.9
    max_new_tokens: int = 40
    chat: str = "no"  # LLM prompt style: no = few-shot completion (SynCLR's), yes = chat template, auto = chat if the model has one
    batch_size: int = 16
    concurrency: int = 8
    timeout_s: float = 30.0
    api_model: str = "default"
    api_key_env: str = "OPENAI_API_KEY"
    num_threads: int = 0


def validate(cfg: CaptionsConfig) -> None:
    if cfg.per_concept < 1:
        raise ValueError(f"per_concept must be >= 1, got {cfg.per_concept}")
    if len(cfg.mix) != 3 or any(m < 0 for m in cfg.mix) or sum(cfg.mix) <= 0:
        raise ValueError(f"mix must be three non-negative weights for c, c+bg, c+rel; got {cfg.mix}")
    if cfg.dedup not in ("auto", "minilm", "text", "none"):
        raise ValueError(f"dedup={cfg.dedup!r} is not allowed; choose auto, minilm, text or none")
    if not 0 < cfg.near_dup_threshold <= 1:
        raise ValueError(f"near_dup_threshold must be in (0, 1], got {cfg.near_dup_threshold}")


class _Deduper:
    """Exact duplicates by normalised text; near duplicates by MiniLM cosine when available."""

    def __init__(self, mode: str, threshold: float):
        self.encoder = None
        if mode in ("auto", "minilm"):
            try:
                from ..text_encoder import MiniLMEncoder

                self.encoder = MiniLMEncoder(max_length=48)
            except Exception as err:  # noqa: BLE001 - optional dependency
                if mode == "minilm":
                    raise
                LOG.info("near-duplicate removal by normalised text only (MiniLM unavailable: %s)", err)
        self.mode, self.threshold = mode, threshold

    def filter(self, captions: list[str]) -> tuple[list[int], int]:
        """Indices of captions to keep, and the count removed."""
        if self.mode == "none":
            return list(range(len(captions))), 0
        seen, keep = set(), []
        for i, c in enumerate(captions):
            key = normalise(c)
            if key not in seen:
                seen.add(key)
                keep.append(i)
        if self.encoder is not None and len(keep) > 1:
            _, pooled = self.encoder.encode([captions[i] for i in keep])
            dup = near_duplicate_mask(pooled.numpy(), self.threshold)
            keep = [i for i, d in zip(keep, dup) if not d]
        return keep, len(captions) - len(keep)


def _concept_captions(cfg: CaptionsConfig, concepts: ConceptList, index: int, backend, pools, backgrounds,
                      deduper) -> tuple[list[dict], dict]:
    """Captions for one concept: batched first attempts, failed ones retried, then de-duplicated, topped up."""
    concept = concepts.concepts[index]
    mix = dict(zip(TEMPLATES, cfg.mix))
    bgs = backgrounds.get(concept.name) or generic_backgrounds()
    kept: list[dict] = []
    rejected, duplicates, reasons = 0, 0, Counter()
    next_index, rounds = 0, 0
    while len(kept) < cfg.per_concept and rounds < 1 + cfg.max_retries * 4:
        rounds += 1
        need = cfg.per_concept - len(kept)
        requests = plan_requests(concepts, concept, need, cfg.seed, mix, bgs, pools, cfg.num_examples, start=next_index)
        next_index += need
        results = []
        pending = requests
        while pending:  # first attempts batched, then every retry round batched too
            retry = []
            for req, raw in zip(pending, backend.generate(pending)):
                caption, reason = clean_caption(raw, concept.mentions, cfg.min_words, cfg.max_words, prompt_input(req))
                if caption is not None:
                    results.append({"caption": caption, "concept": concept.name, "template": req.template,
                                    "background": req.background, "relation": req.relation, "backend": backend.name,
                                    "seed": req.seed, "attempt": req.attempt})
                    continue
                reasons[reason] += 1
                if req.attempt < cfg.max_retries:
                    req.attempt += 1
                    retry.append(req)
                else:
                    rejected += 1
            pending = retry
        candidates = kept + results
        keep, removed = deduper.filter([r["caption"] for r in candidates])
        duplicates += removed
        kept = [candidates[i] for i in keep][: cfg.per_concept]
    stats = {"concept": concept.name, "captions": len(kept), "rejected": rejected, "duplicates": duplicates,
             "reject_reasons": dict(reasons), "templates": dict(Counter(r["template"] for r in kept))}
    if len(kept) < cfg.per_concept:
        LOG.warning("concept %r: only %d of %d captions after %d rounds (%d rejected, %d duplicates)",
                    concept.name, len(kept), cfg.per_concept, rounds, rejected, duplicates)
    return kept, stats


def _make_backend(cfg: CaptionsConfig):
    settings = SamplingSettings(cfg.temperature, cfg.top_p, cfg.max_new_tokens, cfg.batch_size)
    if cfg.backend.startswith("openai:"):
        return make_backend(cfg.backend, settings, model=cfg.api_model, concurrency=cfg.concurrency,
                            timeout_s=cfg.timeout_s, retries=cfg.max_retries, api_key_env=cfg.api_key_env)
    return make_backend(cfg.backend, settings, chat=cfg.chat)


def run_captions(cfg: CaptionsConfig) -> Path:
    """Write ``out_dir/captions.jsonl`` and ``out_dir/summary.json``; returns the captions path."""
    validate(cfg)
    set_threads(cfg.num_threads)
    info = init_distributed()  # gloo, for the barrier before rank 0 merges/indexes (no-op in one process)
    out = Path(cfg.out_dir)
    parts = out / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    concepts = load_concepts(cfg.concepts)
    if info.is_main:
        save_config(cfg, out)
    backend = None
    backgrounds = dict(concepts.backgrounds)
    if cfg.backgrounds == "llm":
        written = out / "backgrounds.yaml"
        if not written.exists() and info.is_main:
            backend = _make_backend(cfg)
            mapping = llm_backgrounds(backend, concepts, cfg.backgrounds_per_concept, cfg.seed, generic_backgrounds())
            atomic_write_text(written, yaml.safe_dump(mapping, sort_keys=False))
        barrier()
        backgrounds.update(load_backgrounds(written))
    elif cfg.backgrounds:
        backgrounds.update(load_backgrounds(cfg.backgrounds))
    mine = [i for i in range(len(concepts.concepts)) if i % info.world_size == info.rank]
    todo = [i for i in mine if not (parts / f"concept-{i:05d}.json").exists()]
    if len(todo) < len(mine):
        LOG.info("resuming: %d of %d concepts already done", len(mine) - len(todo), len(mine))
    start = time.time()
    made = 0
    if todo:
        backend = backend or _make_backend(cfg)
        pools = load_example_pools(cfg.examples_file or None) if cfg.backend != "template" else None
        deduper = _Deduper(cfg.dedup, cfg.near_dup_threshold)
        with tqdm(total=len(todo), desc=f"captions ({cfg.backend})", unit="concept", disable=not info.is_main,
                  dynamic_ncols=True) as bar:
            for i in todo:
                records, stats = _concept_captions(cfg, concepts, i, backend, pools, backgrounds, deduper)
                made += len(records)
                atomic_write_text(parts / f"concept-{i:05d}.jsonl", "".join(json.dumps(r) + "\n" for r in records))
                atomic_write_json(parts / f"concept-{i:05d}.json", stats)
                bar.update(1)
                bar.set_postfix(captions_per_s=f"{made / max(time.time() - start, 1e-9):.1f}")
        backend.close()
    barrier()
    if info.is_main:
        return merge_parts(cfg, concepts, time.time() - start, made)
    return out / CAPTIONS_FILE


def merge_parts(cfg: CaptionsConfig, concepts: ConceptList, seconds: float, made: int) -> Path:
    """Interleave the finished parts into ``captions.jsonl`` (ids 0..N-1 in file order) and write the summary.

    The order is a uniformly random interleave seeded by ``cfg.seed`` (each part's own order kept): the
    same as picking, line by line, a part with probability proportional to its lines left.
    """
    out = Path(cfg.out_dir)
    parts = out / "parts"
    per_concept = []
    for i in range(len(concepts.concepts)):
        marker = parts / f"concept-{i:05d}.json"
        if not marker.exists():
            raise RuntimeError(f"concept {i} ({concepts.concepts[i].name}) has no finished part in {parts}; rerun the command")
        per_concept.append(json.loads(marker.read_text()))
    counts = [int(p["captions"]) for p in per_concept]
    templates: Counter = Counter()
    words = WordCounter()
    reader = _PartLines([parts / f"concept-{i:05d}.jsonl" for i in range(len(counts))], counts)

    def lines() -> Iterator[bytes]:
        n = 0
        for block in interleave_order(counts, cfg.seed):
            for part in block.tolist():
                rec = json.loads(reader.next_line(part))
                rec["id"] = n
                n += 1
                templates[rec.get("template")] += 1
                words.add(rec["caption"])
                yield (json.dumps(rec) + "\n").encode("utf-8")
        reader.check_finished()

    try:
        written = write_jsonl_with_offsets(out / CAPTIONS_FILE, lines())
    finally:
        reader.close()
    summary = {
        "captions": written.records, "concepts": len(concepts.concepts), "backend": cfg.backend,
        "per_concept": {p["concept"]: p["captions"] for p in per_concept},
        "per_template": dict(templates),
        "rejected": sum(p["rejected"] for p in per_concept), "duplicates": sum(p["duplicates"] for p in per_concept),
        "reject_reasons": dict(sum((Counter(p["reject_reasons"]) for p in per_concept), Counter())),
        "distinct_word_ratio": round(words.ratio(), 4),
        "min_per_concept": int(min(counts)), "max_per_concept": int(max(counts)),
        "seconds_this_run": round(seconds, 2), "captions_this_run": made,
        "captions_per_second": round(made / seconds, 2) if seconds > 0 and made else None,
    }
    atomic_write_json(out / SUMMARY_FILE, summary)
    LOG.info("captions: %d for %d concepts (%s per template; %d rejected, %d duplicates; distinct-word ratio %.3f) -> %s",
             written.records, len(concepts.concepts), summary["per_template"], summary["rejected"], summary["duplicates"],
             summary["distinct_word_ratio"], out / CAPTIONS_FILE)
    return out / CAPTIONS_FILE


_ROUND = 500_000_000  # numpy's multivariate hypergeometric needs totals below 1e9: longer files go in rounds


def interleave_order(counts: list[int], seed: int, block: int = 65536) -> Iterator[np.ndarray]:
    """The part of every output line, in blocks: a uniformly random interleave of parts of these sizes.

    A block of B lines takes its per-part counts from the multivariate hypergeometric distribution (the
    counts in the first B places of a uniformly random arrangement) and shuffles them, so the whole is
    exactly a uniform interleave, drawn in O(parts + B) memory. Above ``_ROUND`` lines the file is cut
    into rounds that each take their share of every part (then each round is a uniform interleave).
    """
    rng = np.random.default_rng(stable_seed("captions-order", seed))
    counts_arr = np.asarray(counts, dtype=np.int64)
    names = np.arange(len(counts_arr))
    rounds = max(1, -(-int(counts_arr.sum()) // _ROUND))
    step = max(block, len(counts_arr))
    for r in range(rounds):
        remaining = counts_arr * (r + 1) // rounds - counts_arr * r // rounds
        left = int(remaining.sum())
        while left > 0:
            take = min(step, left)
            drawn = remaining.copy() if take == left else rng.multivariate_hypergeometric(remaining, take)
            remaining -= drawn
            left -= take
            labels = np.repeat(names, drawn)
            rng.shuffle(labels)
            yield labels


_MERGE_BUFFER_BYTES = 64 << 20  # read-ahead shared by all parts
_MERGE_MAX_OPEN = 64  # part files kept open at once (least recently used closed first)


class _PartLines:
    """Next line of any of many part files, read ahead in chunks: memory O(parts + buffer), few open files."""

    def __init__(self, paths: list[Path], counts: list[int]):
        self.paths, self.remaining = paths, list(counts)
        self.pos = [0] * len(paths)
        self.buffers: list[list[bytes]] = [[] for _ in paths]
        self.chunk = int(min(1 << 20, max(256, _MERGE_BUFFER_BYTES // max(len(paths), 1))))
        self.handles: OrderedDict[int, object] = OrderedDict()

    def next_line(self, i: int) -> bytes:
        if self.remaining[i] <= 0:
            raise RuntimeError(f"{self.paths[i]}: more lines wanted than its done-marker counts")
        buf = self.buffers[i]
        while not buf:
            buf = self.buffers[i] = self._read(i)
        self.remaining[i] -= 1
        line = buf.pop()
        if not self.remaining[i]:
            self._close(i)
        return line

    def _read(self, i: int) -> list[bytes]:
        fh = self.handles.get(i)
        if fh is None:
            fh = self.handles[i] = open(self.paths[i], "rb")
            if len(self.handles) > _MERGE_MAX_OPEN:
                self.handles.popitem(last=False)[1].close()
        self.handles.move_to_end(i)
        fh.seek(self.pos[i])
        data = fh.read(self.chunk)
        if data and not data.endswith(b"\n"):
            data += fh.readline()
        if not data:
            raise RuntimeError(f"{self.paths[i]} has fewer lines than its done-marker counts; "
                               "delete it and its .json marker and rerun")
        self.pos[i] += len(data)
        return [ln for ln in reversed(data.split(b"\n")) if ln.strip()]  # reversed: pop() takes the next

    def _close(self, i: int) -> None:
        fh = self.handles.pop(i, None)
        if fh is not None:
            fh.close()

    def check_finished(self) -> None:
        for i, path in enumerate(self.paths):
            extra = bool(self.buffers[i])
            if not extra and self.pos[i] < path.stat().st_size:
                with open(path, "rb") as fh:
                    fh.seek(self.pos[i])
                    extra = any(line.strip() for line in fh)
            if extra:
                raise RuntimeError(f"{path} has more lines than its done-marker counts; delete it and its .json marker and rerun")

    def close(self) -> None:
        for fh in self.handles.values():
            fh.close()
        self.handles.clear()
