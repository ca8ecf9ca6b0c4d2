"""The GPU fast paths of training: fused optimizer kernels, TF32 matmuls, channels-last convolutions and
``torch.compile``. Each is a switch in :class:`SpeedConfig`; on a CPU only ``compile`` applies (the others
are CUDA features and are skipped, which the start-up log line says).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch

from .backbones import BACKBONES

LOG = logging.getLogger("synrep.train")
CompileMode = Literal["off", "default", "reduce-overhead", "max-autotune"]


@dataclass
class SpeedConfig:
    fused_optimizer: bool = True  # fused AdamW / SGD kernels (CUDA): one kernel per step instead of one per tensor
    tf32: bool = True  # TF32 tensor cores for fp32 matmuls and convolutions (CUDA, Ampere and newer)
    channels_last: bool = True  # NHWC memory format for convolutional backbones (CUDA)
    compile: CompileMode = "off"  # torch.compile the backbone with this mode (off = eager); the first steps compile


def enable_tf32(speed: SpeedConfig, device: str) -> bool:
    """Let fp32 matmuls and cuDNN convolutions use TF32 on CUDA when ``speed.tf32`` (a process-wide setting, so
    it is made here, once, at the start of training). Returns whether it is on."""
    if not (speed.tf32 and device.startswith("cuda")):
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


def optimizer_kwargs(speed: SpeedConfig, device: str) -> dict:
    """Keyword arguments for AdamW / SGD: ``fused=True`` on CUDA when asked, else torch's default (foreach)."""
    return {"fused": True} if speed.fused_optimizer and device.startswith("cuda") else {}


def prepare_backbone(model: torch.nn.Module, backbone_name: str, speed: SpeedConfig, device: str) -> list[str]:
    """Apply channels-last and compilation to ``model.backbone`` in place (parameter names are unchanged, so
    checkpoints and exports are the same as without). Returns the names of what was applied."""
    applied = []
    if speed.channels_last and device.startswith("cuda") and BACKBONES.traits(backbone_name).get("convolutional"):
        model.backbone.to(memory_format=torch.channels_last)
        applied.append("channels-last")
    if speed.compile != "off":
        model.backbone.compile(mode=speed.compile)
        applied.append(f"compile({speed.compile})")
    return applied


def describe(speed: SpeedConfig, device: str, applied: list[str]) -> str:
    on = applied + (["tf32"] if speed.tf32 and device.startswith("cuda") else []) \
        + (["fused optimizer"] if optimizer_kwargs(speed, device) else [])
    return ", ".join(on) if on else "none (eager fp32 on CPU)"
