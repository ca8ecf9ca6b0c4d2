"""Released encoders: ``model.safetensors`` (backbone only) + ``encoder.json`` + ``MODEL_CARD.md``.

:func:`load_encoder` is the one call evaluation uses; it reads safetensors only (no pickle).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..atomic import atomic_dir
from ..errors import SynrepError
from .backbones import BackboneConfig, build_backbone

ENCODER_FILE = "encoder.json"
WEIGHTS_FILE = "model.safetensors"


class EncoderError(SynrepError, RuntimeError):
    """A folder or file is not a synrep encoder export."""


def export_encoder(backbone: torch.nn.Module, backbone_cfg: BackboneConfig, folder: str | Path, info: dict,
                   card: str | None = None) -> Path:
    """Write ``folder`` (weights, ``encoder.json``, card) atomically: built under a temporary name, then renamed.

    A kill at any moment leaves either the previous complete export or the new one, never a mix.
    """
    folder = Path(folder)
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    meta = {"type": "synrep-encoder", "backbone": asdict(backbone_cfg), "feature_dim": int(backbone.feature_dim),
            "input": "float images in [0, 1], normalised as (x - 0.5) / 0.5", **info}
    with atomic_dir(folder) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "synrep-encoder"})
        (tmp / ENCODER_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if card:
            (tmp / "MODEL_CARD.md").write_text(card)
    return folder


def encoder_dir(train_out_dir: str | Path) -> Path:
    """Where ``synrep train`` exports its encoder inside its ``out_dir``."""
    return Path(train_out_dir) / "encoder"


def is_exported(folder: str | Path) -> bool:
    """True when ``folder`` is a complete export (both files; the folder appears only when complete)."""
    folder = Path(folder)
    return (folder / WEIGHTS_FILE).is_file() and (folder / ENCODER_FILE).is_file()


def load_encoder(path: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, dict]:
    """Load an exported encoder folder (or its ``model.safetensors``): returns ``(backbone in eval mode, meta)``."""
    path = Path(path)
    folder = path.parent if path.is_file() else path
    meta_path = folder / ENCODER_FILE
    weights = folder / WEIGHTS_FILE
    if not folder.exists():
        raise EncoderError(f"encoder {path} does not exist")
    if not meta_path.exists() or not weights.exists():
        raise EncoderError(f"{path} is not a synrep encoder export (needs {ENCODER_FILE} and {WEIGHTS_FILE}); "
                           "export one with `synrep train` (it writes <out_dir>/encoder)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise EncoderError(f"{meta_path} is not valid JSON: {err}") from None
    if meta.get("type") != "synrep-encoder":
        raise EncoderError(f"{meta_path}: type {meta.get('type')!r} is not 'synrep-encoder'")
    fields = BackboneConfig.__dataclass_fields__
    cfg = BackboneConfig(**{k: v for k, v in meta["backbone"].items() if k in fields})
    backbone = build_backbone(cfg)
    try:
        state = load_file(str(weights))
    except Exception as err:  # noqa: BLE001 - safetensors raises several types on corrupt files
        raise EncoderError(f"{weights} is not a valid safetensors file: {err}") from None
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise EncoderError(f"{weights} does not match backbone {cfg.name}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return backbone.to(device).eval(), meta
