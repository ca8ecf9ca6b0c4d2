"""``synrep captions``: concepts in, a captions JSONL out (SynCLR stage 1).

Work is split by concept: concept i is written by rank ``i mod world_size`` to its own part file
``parts/concept-00007.jsonl``, atomically, with a done-marker ``parts/concept-00007.json`` holding its
counts. A rerun skips concepts whose marker exists, so a killed run resumes without duplicates.
Rank 0 then merges the parts into ``captions.jsonl`` in a seeded random interleave (every concept spread
over the whole file, so any cut of it, e.g. a generated shard, mixes concepts), streaming: memory is
O(concepts), never the captions. It writes ``captions.offsets.json`` (see :mod:`.files`) and ``summary.json``.

Failures are loud and never recorded as success. A request that gets no reply (HTTP error, timeout, refused
connection, a reply that is not JSON with ``choices``) is a *failure* with a cause, not a *rejection* (a reply
that cleaning threw away): the backend retries server faults with exponential backoff, and a concept with a
request still failed is not marked done. The replies it did get are kept in ``parts/concept-00007.replies.jsonl``,
so a rerun sends exactly the requests that failed and writes what a run without failures writes. The stage then
raises, naming the server and the failures by cause; it also raises when the finished concepts hold no captions
or fewer than ``min_fraction`` of ``concepts x per_concept``. Failures and retries by cause go into the summary.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
import typing
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, get_args

import numpy as np
import yaml
from tqdm import tqdm

from ..config import changed_settings, check_config, config_to_dict, read_yaml, require, save_config
from ..distributed import barrier, init_distributed
from ..errors import SettingsChanged, SynrepError
from ..atomic import atomic_write_json, atomic_write_text
from ..utils import set_threads, stable_seed
from .backgrounds import llm_backgrounds
from .cleaning import WordCounter, clean_caption, near_duplicate_mask, normalise
from .concepts import ConceptList, generic_backgrounds, load_backgrounds, load_concepts
from .files import (CAPTIONS_FILE, captions_path, count_captions, iter_captions, offsets_path,  # noqa: F401 - API
                    read_captions, write_jsonl_with_offsets)
from .llm_backends import CAPTION_BACKENDS, BackendError, Failed, SamplingSettings, ServerRefused, format_causes, make_backend
from .prompts import load_example_pools, prompt_input
from .requests import TEMPLATES, CaptionRequest, plan_requests

LOG = logging.getLogger("synrep.captions")
SUMMARY_FILE = "summary.json"


class CaptionsError(SynrepError, RuntimeError):
    """The captions stage cannot finish: too few captions, or part files that disagree with their done-markers."""


# SynCLR's synthesize_text.py: an object caption with p = 0.91, split 0.44 / 0.11 / 0.45 into c / c+rel / c+bg,
# an environment alone otherwise (its 0.2% texture captions are folded into bg); 3 in-context examples,
# temperature 0.8, top-p 0.9.
CAPTION_PRESETS: dict[str, dict] = {
    "demo": {"mix": [0.44, 0.45, 0.11], "num_examples": 3, "temperature": 0.8, "top_p": 0.9},
    "synclr": {"mix": [round(0.91 * 0.44, 4), round(0.91 * 0.45, 4), round(0.91 * 0.11, 4), 0.09], "num_examples": 3,
               "temperature": 0.8, "top_p": 0.9},
}


@dataclass
class CaptionsConfig:
    concepts: str = "fashion-mnist"
    out_dir: str = "runs/captions"
    preset: Literal["demo", "synclr"] = "demo"  # demo: three templates, no background-only captions; synclr: the synthesis script's template mix
    backend: str = "template"  # template | smollm2 | hf:<path-or-id> | openai:<http(s)://host:port>
    per_concept: int = 20
    concept_weights: str = ""  # "" = per_concept for every concept; a YAML file {concept: weight}; or audit:<audit.json> (more captions for concepts whose images agree least with their captions)
    seed: int = 0
    mix: list[float] = field(default_factory=lambda: [0.44, 0.45, 0.11])  # template weights c, c+bg, c+rel[, bg]; SynCLR: [0.40, 0.41, 0.10, 0.09]
    num_examples: int = 3
    examples_file: str = ""
    backgrounds: str = ""  # "" (list's own + generic), a YAML mapping file, or "llm" (the backend writes them)
    backgrounds_per_concept: int = 8
    max_retries: int = 3  # per request: retries of a failed request (server faults) and of a rejected reply
    min_words: int = 3
    max_words: int = 30
    dedup: Literal["auto", "minilm", "text", "none"] = "auto"
    near_dup_threshold: float = 0.95
    temperature: float = 0.8
    top_p: float = 0.9
    max_new_tokens: int = 40
    chat: Literal["no", "yes", "auto"] = "no"  # LLM prompt style: no = few-shot completion (SynCLR's), yes = chat template, auto = chat if the model has one
    batch_size: int = 16
    concurrency: int = 8  # openai backend: requests in flight at once
    timeout_s: float = 30.0  # openai backend: seconds one attempt may take
    backoff_s: float = 0.5  # first wait before retrying a failed request; doubles with every retry
    api_model: str = "default"
    api_key_env: str = "OPENAI_API_KEY"
    min_fraction: float = 0.9  # fail the stage when fewer than this share of concepts x per_concept captions come out
    num_threads: int = 0

    @classmethod
    def key_help(cls) -> dict[str, str]:
        """``--help`` text for keys whose choices come from a registry."""
        return {"backend": CAPTION_BACKENDS.describe()}

    def preset_values(self) -> dict:
        """The values ``preset`` sets; the config loader applies them under explicit keys."""
        return dict(CAPTION_PRESETS[self.preset])

    def check(self) -> None:
        problem = CAPTION_BACKENDS.problem(self.backend)
        require(problem is None, "backend", problem or "")
        require(bool(self.concepts), "concepts", "is empty; give a shipped list name or a concepts file")
        for key in ("per_concept", "backgrounds_per_concept", "min_words", "max_words", "max_new_tokens", "batch_size",
                    "concurrency"):
            require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        for key in ("max_retries", "num_examples", "num_threads"):
            require(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        require(self.min_words <= self.max_words, "min_words",
                f"must be <= max_words ({self.max_words}), got {self.min_words}: no caption could pass")
        require(len(self.mix) in (3, 4) and all(m >= 0 for m in self.mix) and sum(self.mix) > 0, "mix",
                f"must be three or four non-negative weights for c, c+bg, c+rel[, bg] (not all 0), got {self.mix}")
        for key in ("dedup", "chat"):  # Literal choices: the config loader checks them, this covers configs built in code
            choices = get_args(typing.get_type_hints(CaptionsConfig)[key])
            require(getattr(self, key) in choices, key, f"{getattr(self, key)!r} is not allowed; choose one of {', '.join(choices)}")
        require(0 < self.near_dup_threshold <= 1, "near_dup_threshold", f"must be in (0, 1], got {self.near_dup_threshold}")
        require(0 <= self.temperature < math.inf, "temperature", f"must be >= 0 (0 = greedy), got {self.temperature}")
        require(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        require(0 < self.timeout_s < math.inf, "timeout_s", f"must be > 0 seconds, got {self.timeout_s}")
        require(0 <= self.backoff_s < math.inf, "backoff_s", f"must be >= 0 seconds, got {self.backoff_s}")
        require(0 <= self.min_fraction <= 1, "min_fraction",
                f"must be in [0, 1] (the share of concepts x per_concept captions the stage must write), got {self.min_fraction}")
        require(self.backgrounds != "llm" or CAPTION_BACKENDS.traits(self.backend)["language_model"], "backgrounds",
                f"'llm' needs a language-model backend ({', '.join(CAPTION_BACKENDS.names_with('language_model'))}), "
                f"not {self.backend!r}")
        require(bool(self.api_key_env), "api_key_env", "is empty; name the environment variable holding the API key")
        distinct = CAPTION_BACKENDS.traits(self.backend).get("distinct_per_concept")
        require(not distinct or self.dedup == "none" or self.per_concept <= distinct, "per_concept",
                f"{self.per_concept} is more than the {distinct} distinct captions per concept that backend {self.backend!r} "
                f"writes (de-duplication would drop the rest); ask for at most {distinct}, or dedup=none to repeat them")
        only = CAPTION_BACKENDS.traits(self.backend).get("concept_list")
        require(only in (None, self.concepts), "concepts", f"backend {self.backend!r} writes captions for the {only!r} concept list only, "
                f"not {self.concepts!r}")


def validate(cfg: CaptionsConfig) -> None:
    """Check every value (also done when the config loads; here for configs built in code)."""
    check_config(cfg)


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


class _ConceptFailed(Exception):
    """Some requests of a concept got no reply (after their retries): the concept is not done."""

    def __init__(self, causes: Counter, none_answered: bool):
        super().__init__(format_causes(causes))
        self.causes, self.none_answered = causes, none_answered


REPLIES_FORMAT = "synrep-caption-replies"


class _ReplyLog:
    """The replies an unfinished concept has got so far: ``parts/concept-00007.replies.jsonl``.

    For backends whose requests can fail one by one (``remote``). One JSON line per reply, keyed by the
    request's ``(index, attempt)``, plus lines counting failures and retries. A concept whose requests
    failed is not marked done; a rerun replays the replies kept here and sends only the requests without
    one, so it repeats exactly what failed (or what a kill cut off) and writes the captions a run without
    failures writes. The first line holds the settings the replies were made with: a file made with other
    settings is ignored. The file is deleted when the concept is done.
    """

    def __init__(self, path: Path, settings: dict):
        self.path = path
        self.header = {"format": REPLIES_FORMAT, "version": 1, "settings": settings}
        self.replies: dict[tuple[int, int], str] = {}
        self.failures: Counter = Counter()  # requests that got no reply, in earlier runs and this one
        self.retries: Counter = Counter()  # failed attempts tried again
        self._started = False  # the file holds a matching header (append to it)
        if path.exists():
            self._load()

    def _load(self) -> None:
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
            head = json.loads(lines[0]) if lines else None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            LOG.info("ignoring unreadable %s (%s)", self.path, err)
            return
        if head != self.header:
            LOG.info("ignoring %s: its replies were made with other settings", self.path)
            return
        self._started = True
        for line in lines[1:]:
            try:
                rec = json.loads(line)
                if "text" in rec:
                    self.replies[(int(rec["index"]), int(rec["attempt"]))] = str(rec["text"])
                else:
                    self.failures.update({str(k): int(v) for k, v in rec.get("failed", {}).items()})
                    self.retries.update({str(k): int(v) for k, v in rec.get("retried", {}).items()})
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
                continue  # a line cut short by a kill: that request is simply sent again

    def get(self, request: CaptionRequest) -> str | None:
        return self.replies.get((request.index, request.attempt))

    def add(self, answered: list[tuple[CaptionRequest, str]], failed: Counter, retried: Counter) -> None:
        lines = []
        for req, text in answered:
            self.replies[(req.index, req.attempt)] = text
            lines.append(json.dumps({"index": req.index, "attempt": req.attempt, "text": text}))
        if failed or retried:
            lines.append(json.dumps({"failed": dict(failed), "retried": dict(retried)}))
        self.failures.update(failed)
        self.retries.update(retried)
        if not lines:
            return
        if not self._started:
            lines.insert(0, json.dumps(self.header))
            mode = "w"
        else:
            mode = "a"
            with open(self.path, "rb") as fh:  # after a line cut short by a kill, start on a fresh line
                size = fh.seek(0, 2)
                if size:
                    fh.seek(size - 1)
                    if fh.read(1) != b"\n":
                        lines.insert(0, "")
        with open(self.path, mode, encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
        self._started = True

    def finish(self) -> None:
        self.path.unlink(missing_ok=True)


def _reply_settings(cfg: CaptionsConfig, concept_name: str) -> dict:
    """What a reply to request ``(index, attempt)`` of a concept depends on, besides the server."""
    keys = ("backend", "api_model", "seed", "mix", "num_examples", "examples_file", "backgrounds", "temperature",
            "top_p", "max_new_tokens", "chat")
    return {"concept": concept_name, **{k: getattr(cfg, k) for k in keys}}


def _ask(backend, requests: list[CaptionRequest], log: _ReplyLog | None) -> list[str]:
    """The raw replies to ``requests``: from ``log`` where it has them, the others from the backend.

    Raises :class:`_ConceptFailed` when any request got no reply; the replies that did come are logged first.
    """
    replies: list = [log.get(r) if log is not None else None for r in requests]
    missing = [k for k, r in enumerate(replies) if r is None]
    if not missing:
        return replies
    retried_before = Counter(getattr(backend, "retried", {}))
    sent = backend.generate([requests[k] for k in missing])
    retried = Counter(getattr(backend, "retried", {})) - retried_before
    failed = Counter(r.cause for r in sent if isinstance(r, Failed))
    if log is not None:
        log.add([(requests[k], r) for k, r in zip(missing, sent) if not isinstance(r, Failed)], failed, retried)
    if failed:
        raise _ConceptFailed(failed, none_answered=sum(failed.values()) == len(sent))
    for k, reply in zip(missing, sent):
        replies[k] = reply
    return replies


def _concept_captions(cfg: CaptionsConfig, concepts: ConceptList, index: int, backend, pools, backgrounds,
                      deduper, log: _ReplyLog | None = None, targets: list[int] | None = None) -> tuple[list[dict], dict]:
    """Captions for one concept: batched first attempts, rejected ones retried, then de-duplicated, topped up.

    A request that gets no reply stops the concept with :class:`_ConceptFailed` (a failure is never a
    rejection: retrying it with a new sample would change what a healthy run writes).
    """
    concept = concepts.concepts[index]
    targets = targets or [cfg.per_concept] * len(concepts.concepts)
    mix = dict(zip(TEMPLATES, cfg.mix))
    bgs = backgrounds.get(concept.name) or generic_backgrounds()
    kept: list[dict] = []
    rejected, duplicates, reasons = 0, 0, Counter()
    next_index, rounds = 0, 0
    target = targets[index]
    while len(kept) < target and rounds < 1 + cfg.max_retries * 4:
        rounds += 1
        need = target - len(kept)
        requests = plan_requests(concepts, concept, need, cfg.seed, mix, bgs, pools, cfg.num_examples, start=next_index)
        next_index += need
        results = []
        pending = requests
        while pending:  # first attempts batched, then every retry round batched too
            retry = []
            for req, raw in zip(pending, _ask(backend, pending, log)):
                background_only = req.template == "bg"  # an environment alone: no object to mention, no concept label
                caption, reason = clean_caption(raw, None if background_only else concept.mentions, cfg.min_words,
                                                cfg.max_words, prompt_input(req))
                if caption is not None:
                    results.append({"caption": caption, "concept": "" if background_only else concept.name,
                                    **({"environment_of": concept.name} if background_only else {}), "template": req.template,
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
        kept = [candidates[i] for i in keep][:target]
    stats = {"concept": concept.name, "captions": len(kept), "rejected": rejected, "duplicates": duplicates,
             "reject_reasons": dict(reasons), "templates": dict(Counter(r["template"] for r in kept)),
             "request_failures": dict(log.failures) if log else {}, "request_retries": dict(log.retries) if log else {}}
    if len(kept) < target:
        LOG.warning("concept %r: only %d of %d captions after %d rounds (%d rejected, %d duplicates)",
                    concept.name, len(kept), target, rounds, rejected, duplicates)
    return kept, stats


def _make_backend(cfg: CaptionsConfig):
    settings = SamplingSettings(cfg.temperature, cfg.top_p, cfg.max_new_tokens, cfg.batch_size)
    server = dict(model=cfg.api_model, concurrency=cfg.concurrency, timeout_s=cfg.timeout_s, retries=cfg.max_retries,
                  backoff_s=cfg.backoff_s, api_key_env=cfg.api_key_env)
    return make_backend(cfg.backend, settings, chat=cfg.chat, seed=cfg.seed,
                        **(server if CAPTION_BACKENDS.traits(cfg.backend)["remote"] else {}))


def _backend_where(cfg: CaptionsConfig, backend=None) -> str:
    url = getattr(backend, "url", None)
    return url or f"the {cfg.backend} backend"


def _failure_message(where: str, failures: Counter, attempts: int, unfinished: int, not_started: int, todo: int) -> str:
    hint = ""
    if failures.get("connection refused"):
        hint = "; the server cannot be reached: is it running?"
    elif failures.get("timeout"):
        hint = "; raise timeout_s if the server is only slow"
    left = f"{unfinished} of {todo} concepts unfinished"
    if not_started:
        left += f" and {not_started} not started (stopped: the server answered none of a batch)"
    tried = "tried once each" if attempts == 1 else f"tried up to {attempts} times each"
    return (f"captions: {sum(failures.values())} requests to {where} got no reply ({tried}; {format_causes(failures)}){hint}; "
            f"{left}. Finished concepts are kept: rerun the same command to send exactly the requests that failed")


def concept_targets(cfg: CaptionsConfig, concepts: ConceptList) -> list[int]:
    """Captions to write per concept: ``per_concept`` each, or shared out by ``concept_weights`` (mean weight 1,
    so the total stays about ``per_concept x concepts``; every concept keeps at least one)."""
    weights = concept_weights(cfg.concept_weights, [c.name for c in concepts.concepts])
    if weights is None:
        return [cfg.per_concept] * len(concepts.concepts)
    mean = float(np.mean(weights))
    return [max(1, round(cfg.per_concept * w / mean)) for w in weights]


def concept_weights(spec: str, names: list[str]) -> list[float] | None:
    """Weights per concept from a YAML mapping or an audit (``audit:<audit.json>``: 1.5 - mean agreement, so a
    concept whose images show it least gets the most captions); None for ``""``."""
    if not spec:
        return None
    if spec.startswith("audit:"):
        path = Path(spec[len("audit:"):])
        try:
            audit = json.loads(path.read_text(encoding="utf-8"))
            agreement = {c: float(v["mean"]) for c, v in audit["agreement"]["per_concept"].items() if v.get("mean") is not None}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise CaptionsError(f"concept_weights: {path} is not a readable synrep audit.json with agreement per concept ({err})") from None
        mapping = {c: 1.5 - a for c, a in agreement.items()}
        missing = 1.5 - float(np.mean(list(agreement.values()))) if agreement else 1.0
        return [mapping.get(n, missing) for n in names]
    mapping = read_yaml(Path(spec), "concept weights file", CaptionsError)
    if not isinstance(mapping, dict) or not all(isinstance(v, (int, float)) and v >= 0 and math.isfinite(v) for v in mapping.values()):
        raise CaptionsError(f"concept weights file {spec} must map concept names to numbers >= 0")
    unknown = sorted(set(mapping) - set(names))
    if unknown:
        raise CaptionsError(f"concept weights file {spec} names concepts not in the list: {', '.join(map(str, unknown[:5]))}")
    weights = [float(mapping.get(n, 1.0)) for n in names]
    if not any(weights):
        raise CaptionsError(f"concept weights file {spec}: every weight is 0")
    return weights


# how the requests are sent or judged, not what the captions are (max_retries is not here: it decides how many
# rounds a rejected caption gets, so which reply is kept)
RESUMABLE_CHANGES = ("out_dir", "num_threads", "concurrency", "timeout_s", "backoff_s", "min_fraction", "api_key_env")


def _check_same_settings(cfg: CaptionsConfig, out: Path) -> None:
    """Refuse to add to finished concepts that were written with other settings (listing the differences)."""
    config = out / "config.yaml"
    if not config.exists() or not any((out / "parts").glob("concept-*.json")):
        return
    try:
        saved = read_yaml(config, "captions config", CaptionsError)
    except CaptionsError as err:
        raise SettingsChanged(f"{err}, so the finished concepts in {out / 'parts'} cannot be resumed; "
                              "use a new out_dir or delete the old parts") from None
    changed = changed_settings(saved if isinstance(saved, dict) else {}, config_to_dict(cfg), RESUMABLE_CHANGES)
    if changed:
        raise SettingsChanged(f"{out} already holds captions made with different settings ({'; '.join(changed)}); "
                              f"mixing them would make one captions file from two configs. Use a new out_dir, or delete "
                              f"{out / 'parts'} to write every concept anew")


def run_captions(cfg: CaptionsConfig) -> Path:
    """Write ``out_dir/captions.jsonl`` and ``out_dir/summary.json``; returns the captions path.

    Raises (RuntimeError) when requests failed, naming the server and the failures by cause: the concepts
    they belong to are not marked done, so a rerun sends them again. Also raises when fewer than
    ``min_fraction`` of the captions asked for come out (see :func:`merge_parts`).
    """
    validate(cfg)
    set_threads(cfg.num_threads)
    info = init_distributed()  # gloo, for the barrier before rank 0 merges/indexes (no-op in one process)
    out = Path(cfg.out_dir)
    parts = out / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    concepts = load_concepts(cfg.concepts)
    targets = concept_targets(cfg, concepts)  # a bad weights file fails here, before anything is written
    _check_same_settings(cfg, out)
    if info.is_main:
        save_config(cfg, out)
    barrier()  # every rank has compared against the old config.yaml before rank 0 replaces it
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
    made, unfinished, failures, stopped_at, refused = 0, 0, Counter(), None, None
    if todo:
        backend = backend or _make_backend(cfg)
        remote = getattr(backend, "remote", False)
        pools = load_example_pools(cfg.examples_file or None) if CAPTION_BACKENDS.traits(cfg.backend)["language_model"] else None
        deduper = _Deduper(cfg.dedup, cfg.near_dup_threshold)
        try:
            with tqdm(total=len(todo), desc=f"captions ({cfg.backend})", unit="concept", disable=not info.is_main,
                      dynamic_ncols=True) as bar:
                for k, i in enumerate(todo):
                    log = _ReplyLog(parts / f"concept-{i:05d}.replies.jsonl", _reply_settings(cfg, concepts.concepts[i].name)) \
                        if remote else None
                    try:
                        records, stats = _concept_captions(cfg, concepts, i, backend, pools, backgrounds, deduper, log, targets)
                    except _ConceptFailed as err:  # not marked done: a rerun sends the failed requests again
                        unfinished += 1
                        failures.update(err.causes)
                        if err.none_answered:  # the server is down or broken: don't hammer it concept after concept
                            stopped_at = k + 1
                            break
                        bar.update(1)
                        continue
                    made += len(records)
                    atomic_write_text(parts / f"concept-{i:05d}.jsonl", "".join(json.dumps(r) + "\n" for r in records))
                    atomic_write_json(parts / f"concept-{i:05d}.json", stats)
                    if log is not None:
                        log.finish()
                    bar.update(1)
                    bar.set_postfix(captions_per_s=f"{made / max(time.time() - start, 1e-9):.1f}")
        except ServerRefused as err:  # 401/403/404: stop at once (after the barrier, so other ranks are not left waiting)
            refused = err
        finally:
            backend.close()
    barrier()
    if refused is not None:
        raise refused
    if failures:
        raise BackendError(_failure_message(_backend_where(cfg, backend), failures, 1 + cfg.max_retries, unfinished,
                                            len(todo) - stopped_at if stopped_at else 0, len(todo)))
    if info.is_main:
        return merge_parts(cfg, concepts, time.time() - start, made)
    return out / CAPTIONS_FILE


def outputs(out_dir: str | Path) -> dict[str, Path]:
    """What the captions stage writes in ``out_dir``; ``done`` (summary.json) is written last."""
    out = Path(out_dir)
    return {"captions": out / CAPTIONS_FILE, "summary": out / SUMMARY_FILE, "done": out / SUMMARY_FILE}


def is_complete(out_dir: str | Path) -> bool:
    return outputs(out_dir)["done"].is_file()


def merge_parts(cfg: CaptionsConfig, concepts: ConceptList, seconds: float, made: int) -> Path:
    """Interleave the finished parts into ``captions.jsonl`` (ids 0..N-1 in file order) and write the summary.

    Raises CaptionsError (a RuntimeError), writing nothing, when the parts hold no captions or fewer than
    ``min_fraction`` of ``concepts x per_concept``.

    The order is a uniformly random interleave seeded by ``cfg.seed`` (each part's own order kept): the
    same as picking, line by line, a part with probability proportional to its lines left.
    """
    out = Path(cfg.out_dir)
    parts = out / "parts"
    per_concept = []
    for i in range(len(concepts.concepts)):
        marker = parts / f"concept-{i:05d}.json"
        if not marker.exists():
            raise CaptionsError(f"concept {i} ({concepts.concepts[i].name}) has no finished part in {parts}; rerun the command")
        per_concept.append(json.loads(marker.read_text()))
    counts = [int(p["captions"]) for p in per_concept]
    rejected, duplicates = sum(p["rejected"] for p in per_concept), sum(p["duplicates"] for p in per_concept)
    reasons = sum((Counter(p["reject_reasons"]) for p in per_concept), Counter())
    _check_enough(cfg, sum(counts), sum(concept_targets(cfg, concepts)), rejected, reasons, duplicates, parts)
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
        "rejected": rejected, "duplicates": duplicates, "reject_reasons": dict(reasons),
        # requests that got no reply in an earlier run (sent again since) and failed attempts retried, by cause
        "request_failures": dict(sum((Counter(p.get("request_failures", {})) for p in per_concept), Counter())),
        "request_retries": dict(sum((Counter(p.get("request_retries", {})) for p in per_concept), Counter())),
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


def _check_enough(cfg: CaptionsConfig, made: int, asked: int, rejected: int, reasons: Counter, duplicates: int,
                  parts: Path) -> None:
    if made > 0 and made >= cfg.min_fraction * asked:
        return
    share = made / asked if asked else 0.0
    what = "no captions" if made == 0 else f"only {made} of the {asked} captions asked for ({share:.0%} < min_fraction={cfg.min_fraction})"
    accept = f"rerun with min_fraction={math.floor(share * 100) / 100} to accept them, or " if made else ""
    raise CaptionsError(
        f"captions: {what} from {_backend_where(cfg)}: replies rejected by cleaning: {format_causes(reasons) or 'none'} "
        f"({rejected} requests left without a caption after {cfg.max_retries} retries), {duplicates} duplicates removed; "
        f"nothing merged. The finished concepts in {parts} are kept: "
        f"{accept}delete {parts} (or use another out_dir) to write them anew with other settings "
        "(e.g. min_words, max_words, max_retries, temperature, another model)")


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
            raise CaptionsError(f"{self.paths[i]} has fewer lines than its done-marker counts; "
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
                raise CaptionsError(f"{path} has more lines than its done-marker counts; delete it and its .json marker and rerun")

    def close(self) -> None:
        for fh in self.handles.values():
            fh.close()
        self.handles.clear()
