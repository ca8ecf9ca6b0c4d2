"""StableRep+'s text side: what turns a caption into the vector the image-text loss contrasts with.

Two towers, chosen by ``loss.text_tower``:

- ``minilm`` (the CPU default): the loader worker embeds each caption with the frozen MiniLM (``text``
  ``[B, 384]``); the method trains an MLP on top.
- ``transformer`` (the paper's): the loader worker only tokenises (``text_tokens`` ``[B, L]`` int64, 0 = padding,
  with MiniLM's WordPiece vocabulary); the method trains a CLIP-style text transformer from scratch: token and
  position embeddings, pre-norm blocks with a causal mask, a final LayerNorm, and the features of each caption's
  last real token (CLIP's end-of-text token), projected linearly.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ..sources import SourceError
from .backbones import Block

TextTower = Literal["minilm", "transformer"]


class TextTransformer(nn.Module):
    """Token ids ``[B, L]`` (0 = padding, real tokens first) -> features ``[B, width]`` of each row's last real token."""

    def __init__(self, vocab_size: int, context: int, width: int, layers: int, heads: int):
        super().__init__()
        self.token_embed = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, context, width))
        self.blocks = nn.Sequential(*[Block(width, heads, causal=True) for _ in range(layers)])
        self.norm = nn.LayerNorm(width)
        nn.init.normal_(self.token_embed.weight, std=0.02)  # CLIP's initialisation of both embeddings
        nn.init.normal_(self.pos_embed, std=0.01)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.token_embed(tokens) + self.pos_embed[:, : tokens.shape[1]]
        x = self.norm(self.blocks(x))
        last = (tokens != 0).sum(dim=1).clamp(min=1) - 1  # causal attention: padding after it never reaches it
        return x[torch.arange(len(tokens), device=tokens.device), last]


class CaptionEmbedder:
    """Loader-worker transform for ``minilm``: adds ``text`` ``[B, 384]``, the frozen-MiniLM pooled embedding of
    each image's caption. The encoder is loaded once per process on first use."""

    def __init__(self, context: int = 32):
        self.context = context
        self._encoder = None

    def __call__(self, batch: dict) -> dict:
        captions = _captions(batch)
        if self._encoder is None:
            from ..text_encoder import MiniLMEncoder

            self._encoder = MiniLMEncoder(max_length=self.context)
        unique = sorted(set(captions))
        _, pooled = self._encoder.encode(unique)
        where = {c: i for i, c in enumerate(unique)}
        batch["text"] = pooled[torch.tensor([where[c] for c in captions])]
        return batch


class CaptionTokenizer:
    """Loader-worker transform for ``transformer``: adds ``text_tokens`` ``[B, context]`` int64 (MiniLM's WordPiece
    ids with [CLS] ... [SEP], padded with 0)."""

    def __init__(self, context: int = 77):
        self.context = context
        self._tokenizer = None

    def __call__(self, batch: dict) -> dict:
        captions = _captions(batch)
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer()
        ids = self._tokenizer(list(captions), padding="max_length", truncation=True, max_length=self.context,
                              return_tensors="pt")["input_ids"]
        batch["text_tokens"] = ids.to(torch.int64)
        return batch


def load_tokenizer():
    """MiniLM's tokenizer (shipped offline with the MiniLM package)."""
    from transformers import AutoTokenizer

    from ..text_encoder import minilm_dir

    return AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)


def caption_transform(tower: TextTower, context: int):
    """The loader-worker transform a text tower needs."""
    return CaptionTokenizer(context) if tower == "transformer" else CaptionEmbedder()


def _captions(batch: dict) -> list[str]:
    captions = batch.pop("captions")
    if not any(captions):
        raise SourceError("method stablerep+ needs captions; this data has none (use a synthetic shard folder)")
    return captions
