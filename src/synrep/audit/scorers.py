"""Caption-image agreement scorers: a small registry.

A scorer gives each image a number in [0, 1]: how much the image shows the concept its caption names.

| ``scorer=`` | what it is |
|---|---|
| ``classifier`` | the reference classifier trained on the real train split: its probability of the concept's class |
| ``clip:<folder>`` or ``<folder>`` | a local transformers CLIP model (``save_pretrained`` layout): the softmax over ``a photo of a <concept>.`` prompts of all audited concepts |

Add one by writing a class with ``name``, ``describe()`` and ``score(batch)`` and registering a factory in
:data:`SCORERS`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch

from ..errors import SynrepError
from ..sources import convert_channels, fit_image

LOG = logging.getLogger("synrep.audit")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ScorerError(SynrepError, ValueError):
    """An unknown scorer, or a scorer folder that is not a usable image-text model."""


@dataclass
class ScoreBatch:
    """What a scorer sees: the images as stored, their caption concepts, and the reference classifier's view."""

    raw: list[np.ndarray]  # uint8 [H, W, C] each, as stored in the shards
    concepts: list[str]  # the concept each image's caption names
    class_probs: np.ndarray  # float32 [B, K]: the reference classifier's class probabilities


@dataclass
class ScorerContext:
    """What a scorer may need to know about the audit."""

    concepts: list[str]  # every concept being audited (the candidates an image-text scorer chooses among)
    label_of: dict[str, int | None]  # concept -> class index of the reference classifier (None: no class)
    device: str = "cpu"


class Scorer(Protocol):
    name: str

    def score(self, batch: ScoreBatch) -> np.ndarray:
        """float32 ``[B]`` in [0, 1] (NaN where the scorer cannot judge the concept)."""

    def describe(self) -> dict:
        """What to record about the scorer in audit.json."""


class ClassifierScorer:
    """The reference classifier's probability of the class of the caption's concept."""

    name = "classifier"

    def __init__(self, ctx: ScorerContext):
        self.label_of = ctx.label_of

    def score(self, batch: ScoreBatch) -> np.ndarray:
        out = np.full(len(batch.concepts), np.nan, dtype=np.float32)
        for i, c in enumerate(batch.concepts):
            label = self.label_of.get(c)
            if label is not None:
                out[i] = batch.class_probs[i, label]
        return out

    def describe(self) -> dict:
        return {"name": self.name}


class ClipScorer:
    """A local CLIP model: the probability of the caption's concept among ``a photo of a <concept>.`` prompts."""

    name = "clip"

    def __init__(self, folder: str | Path, ctx: ScorerContext):
        self.folder = Path(folder)
        self.device = ctx.device
        self.concepts = list(ctx.concepts)
        self.index = {c: i for i, c in enumerate(self.concepts)}
        self.model, tokenizer, self.size, mean, std = _load_clip(self.folder)
        self.model.to(self.device).eval()
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        prompts = [f"a photo of a {c}." for c in self.concepts]
        with torch.no_grad():
            tokens = tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(self.device)
            text = self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens.get("attention_mask"))
            text = getattr(text, "pooler_output", text)
        self.text = torch.nn.functional.normalize(text.float(), dim=-1)

    @torch.no_grad()
    def score(self, batch: ScoreBatch) -> np.ndarray:
        pixels = np.stack([fit_image(convert_channels(im, 3), self.size) for im in batch.raw])
        x = torch.from_numpy(pixels).to(self.device).permute(0, 3, 1, 2).float().div(255.0)
        image = self.model.get_image_features(pixel_values=(x - self.mean) / self.std)
        image = torch.nn.functional.normalize(getattr(image, "pooler_output", image).float(), dim=-1)
        probs = torch.softmax(self.model.logit_scale.exp() * image @ self.text.T, dim=-1).cpu().numpy()
        out = np.full(len(batch.concepts), np.nan, dtype=np.float32)
        for i, c in enumerate(batch.concepts):
            if c in self.index:
                out[i] = probs[i, self.index[c]]
        return out

    def describe(self) -> dict:
        return {"name": self.name, "folder": str(self.folder), "image_size": self.size, "prompts": "a photo of a {concept}."}


def _load_clip(folder: Path):
    """``(model, tokenizer, image size, mean, std)`` of a transformers CLIP folder, or ScorerError naming it."""
    what = "a transformers CLIP model saved with save_pretrained (config.json with model_type 'clip', weights, tokenizer files)"
    if not folder.is_dir():
        raise ScorerError(f"scorer folder {folder} does not exist (expected {what})")
    config_file = folder / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except FileNotFoundError:
        raise ScorerError(f"scorer folder {folder} is not a usable image-text model: it has no config.json (expected {what})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ScorerError(f"scorer folder {folder} is not a usable image-text model: {config_file} is unreadable ({err})") from None
    if not isinstance(config, dict) or config.get("model_type") != "clip":
        kind = config.get("model_type") if isinstance(config, dict) else None
        raise ScorerError(f"scorer folder {folder} is not a usable image-text model: {config_file} has model_type {kind!r}, "
                          f"expected 'clip' ({what})")
    try:
        from transformers import AutoTokenizer, CLIPModel

        model = CLIPModel.from_pretrained(str(folder), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:  # transformers raises OSError, ValueError, EnvironmentError ... for broken folders
        reason = " ".join(str(err).split())[:300]
        raise ScorerError(f"scorer folder {folder} is not a usable image-text model: loading it failed ({type(err).__name__}: {reason})") from None
    size = int(model.config.vision_config.image_size)
    mean, std = CLIP_MEAN, CLIP_STD
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        try:
            p = json.loads(pre.read_text())
            mean, std = tuple(p.get("image_mean", mean)), tuple(p.get("image_std", std))
        except (OSError, json.JSONDecodeError):
            LOG.warning("%s is unreadable; using CLIP's default mean and std", pre)
    return model, tokenizer, size, mean, std


def _classifier(arg: str, ctx: ScorerContext) -> Scorer:
    if arg:
        raise ScorerError(f"scorer 'classifier' takes no argument, got 'classifier:{arg}'")
    return ClassifierScorer(ctx)


def _clip(arg: str, ctx: ScorerContext) -> Scorer:
    if not arg:
        raise ScorerError("scorer 'clip:' needs a folder: clip:<folder of a transformers CLIP model>")
    return ClipScorer(arg, ctx)


SCORERS: dict[str, Callable[[str, ScorerContext], Scorer]] = {"classifier": _classifier, "clip": _clip}
ALLOWED = "classifier, clip:<folder>, or a local folder holding a CLIP model"


def check_scorer_spec(spec: str) -> None:
    """Fail early (before any work) on a scorer that names nothing known."""
    name, sep, _ = spec.partition(":")
    if name in SCORERS:
        return
    if spec and Path(spec).exists():
        if not Path(spec).is_dir():
            raise ScorerError(f"scorer {spec!r} is a file; a scorer folder must hold a CLIP model ({ALLOWED})")
        return
    raise ScorerError(f"unknown scorer {spec!r}: it is neither a registered scorer nor an existing folder; choose {ALLOWED}")


def make_scorer(spec: str, ctx: ScorerContext) -> Scorer:
    """The scorer named by ``spec`` (see the module table); ScorerError for anything else."""
    check_scorer_spec(spec)
    name, _, arg = spec.partition(":")
    if name in SCORERS:
        return SCORERS[name](arg, ctx)
    return SCORERS["clip"](spec, ctx)
