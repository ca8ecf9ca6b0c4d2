"""``synrep captions``: concepts in, a captions JSONL out (SynCLR stage 1).

Work is split by concept: concept i is written by rank ``i mod world_size`` to its own part file
``parts/concept-00007.jsonl``, atomically, with a done-marker ``parts/concept-00007.json`` holding its
counts. A rerun skips concepts whose marker exists, so a killed run resumes without duplicates.
Rank 0 then merges the parts, in concept order, into ``captions.jsonl`` and writes ``summary.json``.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from tqdm import tqdm

from ..config import save_config
from ..distributed import barrier, init_distributed
from ..utils import atomic_write_json, atomic_write_text, set_threads
from .backgrounds import llm_backgrounds
from .cleaning import clean_caption, distinct_word_ratio, near_duplicate_mask, normalise
from .concepts import ConceptList, generic_backgrounds, load_backgrounds, load_concepts
from .llm_backends import SamplingSettings, make_backend
from .prompts import load_example_pools, prompt_input
from .requests import TEMPLATES, plan_requests

LOG = logging.getLogger("synrep.captions")
CAPTIONS_FILE = "captions.jsonl"
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
    out = Path(cfg.out_dir)
    parts = out / "parts"
    records, per_concept = [], []
    for i in range(len(concepts.concepts)):
        marker = parts / f"concept-{i:05d}.json"
        if not marker.exists():
            raise RuntimeError(f"concept {i} ({concepts.concepts[i].name}) has no finished part in {parts}; rerun the command")
        per_concept.append(json.loads(marker.read_text()))
        for line in (parts / f"concept-{i:05d}.jsonl").read_text().splitlines():
            records.append(json.loads(line))
    for n, rec in enumerate(records):
        rec["id"] = n
    atomic_write_text(out / CAPTIONS_FILE, "".join(json.dumps(r) + "\n" for r in records))
    counts = [p["captions"] for p in per_concept]
    summary = {
        "captions": len(records), "concepts": len(concepts.concepts), "backend": cfg.backend,
        "per_concept": {p["concept"]: p["captions"] for p in per_concept},
        "per_template": dict(Counter(r["template"] for r in records)),
        "rejected": sum(p["rejected"] for p in per_concept), "duplicates": sum(p["duplicates"] for p in per_concept),
        "reject_reasons": dict(sum((Counter(p["reject_reasons"]) for p in per_concept), Counter())),
        "distinct_word_ratio": round(distinct_word_ratio([r["caption"] for r in records]), 4),
        "min_per_concept": int(min(counts)), "max_per_concept": int(max(counts)),
        "seconds_this_run": round(seconds, 2), "captions_this_run": made,
        "captions_per_second": round(made / seconds, 2) if seconds > 0 and made else None,
    }
    atomic_write_json(out / SUMMARY_FILE, summary)
    LOG.info("captions: %d for %d concepts (%s per template; %d rejected, %d duplicates; distinct-word ratio %.3f) -> %s",
             len(records), len(concepts.concepts), summary["per_template"], summary["rejected"], summary["duplicates"],
             summary["distinct_word_ratio"], out / CAPTIONS_FILE)
    return out / CAPTIONS_FILE


def read_captions(path: str | Path) -> list[dict]:
    """Read a captions JSONL; a malformed line raises ValueError naming the file and line number."""
    path = Path(path)
    if path.is_dir():
        path = path / CAPTIONS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"captions file {path} does not exist; write one with `synrep captions`")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("caption"), str) or not rec["caption"].strip():
            raise ValueError(f"{path}, line {number}: needs a non-empty string field 'caption'")
        rec.setdefault("id", len(records))
        rec.setdefault("concept", "")
        records.append(rec)
    if not records:
        raise ValueError(f"captions file {path} is empty")
    return records

