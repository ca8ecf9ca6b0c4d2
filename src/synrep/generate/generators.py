"""Text-to-image generators behind one interface.

``noise_shape(height, width)`` gives the per-image initial noise shape; ``draw(captions, noise, settings,
per_caption)`` turns C captions plus initial noise ``[C * per_caption, *noise_shape]`` (caption-major: the
images of caption 0 first) into uint8 images ``[C * per_caption, H, W, C]``; each caption's text is encoded once. Because
the noise is passed in, the stage controls every image's seed (and GenRep latent views), and
deterministic samplers make an image reproducible alone.

- ``embedded`` / ``embedded:<folder>``: synrep's shipped text-to-image model (28x28 grayscale).
- ``diffusers:<folder-or-hub-id>``: any Stable-Diffusion-style pipeline diffusers loads (SD 1.x/2.x/XL).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import SynrepError
from ..images import to_uint8
from ..registry import Registry

LOG = logging.getLogger("synrep.generate")
SCHEDULERS = ("ddim", "dpm", "euler")


class GeneratorSpecError(SynrepError, ValueError):
    """Unknown generator, a folder that is not a pipeline, or settings the model cannot honour."""


@dataclass
class DrawSettings:
    guidance_scale: float = 2.5
    steps: int = 10
    scheduler: str = "ddim"
    negative_prompt: str = ""
    height: int = 0
    width: int = 0


class EmbeddedT2I:
    """The embedded model. Only DDIM sampling (deterministic, eta = 0) is offered."""

    def __init__(self, folder: str | None = None, device: str = "cpu", name: str = ""):
        from ..embedded_t2i.model import GeneratorError, load_embedded_generator

        try:
            self.model = load_embedded_generator(folder, device=device)
        except GeneratorError as err:
            raise GeneratorSpecError(str(err)) from None
        self.name = name or ("embedded" if folder is None else f"embedded:{folder}")
        self.precision = "fp32"  # the embedded model always samples in fp32
        self.size = self.model.cfg.image_size
        self.factor = self.model.cfg.downsample_factor

    def check(self, settings: DrawSettings) -> None:
        for what, value in (("height", settings.height), ("width", settings.width)):
            if value not in (0, self.size):
                raise GeneratorSpecError(f"{what}={value}: the embedded generator draws {self.size}x{self.size} images only (use 0)")
        if settings.scheduler != "ddim":
            raise GeneratorSpecError(f"scheduler={settings.scheduler!r}: the embedded generator samples with ddim only")

    def noise_shape(self, settings: DrawSettings) -> tuple[int, ...]:
        return self.model.latent_shape(1)[1:]

    def draw(self, captions: list[str], noise: torch.Tensor, settings: DrawSettings, per_caption: int = 1) -> np.ndarray:
        prompts = [c for c in captions for _ in range(per_caption)]
        images = self.model.sample(prompts, noise, settings.guidance_scale, settings.steps, settings.negative_prompt)
        return to_uint8(images)


class DiffusersT2I:
    """A diffusers text-to-image pipeline (StableDiffusion, StableDiffusionXL, ...) from a folder or hub id."""

    def __init__(self, source: str, device: str = "cpu", dtype: str = "auto", attention_slicing: bool = False,
                 vae_slicing: bool = False, cpu_offload: bool = False, scheduler: str = "ddim"):
        from diffusers import DiffusionPipeline

        path = Path(source)
        if source.startswith((".", "/", "~")) or path.exists():
            if not path.is_dir():
                raise GeneratorSpecError(f"diffusers model folder {source} does not exist")
            if not (path / "model_index.json").exists():
                raise GeneratorSpecError(f"{source} is not a diffusers pipeline folder (no model_index.json)")
        torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(dtype)
        if dtype == "auto":
            torch_dtype = torch.float16 if device.startswith("cuda") else torch.float32
        if torch_dtype is None:
            raise GeneratorSpecError(f"dtype={dtype!r} is not allowed; choose auto, fp32, fp16 or bf16")
        # recorded with every image: a resume must not mix precisions (dtype=auto follows the device)
        self.precision = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[torch_dtype]
        try:
            pipe = DiffusionPipeline.from_pretrained(source, torch_dtype=torch_dtype, local_files_only=path.exists(),
                                                     safety_checker=None, requires_safety_checker=False)
        except (OSError, ValueError, TypeError) as err:
            raise GeneratorSpecError(f"cannot load diffusers pipeline {source!r}: {err}") from None
        if not hasattr(pipe, "vae") or not hasattr(pipe, "unet") and not hasattr(pipe, "transformer"):
            raise GeneratorSpecError(f"{source} is a {type(pipe).__name__}, not a text-to-image pipeline with a VAE")
        pipe.set_progress_bar_config(disable=True)
        if cpu_offload:
            pipe.enable_model_cpu_offload()
        else:
            pipe = pipe.to(device)
        if attention_slicing:
            pipe.enable_attention_slicing()
        if vae_slicing and hasattr(pipe, "vae"):
            pipe.vae.enable_slicing()
        self.pipe = pipe
        self.name = f"diffusers:{source}"
        self.factor = int(getattr(pipe, "vae_scale_factor", 8))
        denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer")
        self.default_size = int(denoiser.config.sample_size) * self.factor
        self.latent_channels = int(denoiser.config.in_channels)
        self._set_scheduler(scheduler)

    def _set_scheduler(self, name: str) -> None:
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

        classes = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler}
        if name not in classes:
            raise GeneratorSpecError(f"scheduler={name!r} is not allowed; choose one of {', '.join(SCHEDULERS)}")
        self.pipe.scheduler = classes[name].from_config(self.pipe.scheduler.config)
        self.scheduler = name

    def _size(self, settings: DrawSettings) -> tuple[int, int]:
        h = settings.height or self.default_size
        w = settings.width or self.default_size
        for what, value in (("height", h), ("width", w)):
            if value % self.factor:
                raise GeneratorSpecError(f"{what}={value} is not divisible by the model's factor {self.factor}")
        return h, w

    def check(self, settings: DrawSettings) -> None:
        self._size(settings)
        if settings.scheduler != self.scheduler:
            self._set_scheduler(settings.scheduler)

    def noise_shape(self, settings: DrawSettings) -> tuple[int, ...]:
        h, w = self._size(settings)
        return (self.latent_channels, h // self.factor, w // self.factor)

    @torch.no_grad()
    def draw(self, captions: list[str], noise: torch.Tensor, settings: DrawSettings, per_caption: int = 1) -> np.ndarray:
        h, w = self._size(settings)
        kwargs = {}
        if settings.negative_prompt:
            kwargs["negative_prompt"] = [settings.negative_prompt] * len(captions)
        if self.scheduler == "ddim":
            kwargs["eta"] = 0.0
        denoiser = getattr(self.pipe, "unet", None) or self.pipe.transformer
        out = self.pipe(prompt=list(captions), num_images_per_prompt=per_caption, height=h, width=w, num_inference_steps=settings.steps,
                        guidance_scale=settings.guidance_scale, latents=noise.to(self.pipe.device, denoiser.dtype),
                        output_type="np", **kwargs)
        return to_uint8(np.asarray(out.images, dtype=np.float32))


GENERATORS = Registry("generator", GeneratorSpecError)
"""Every text-to-image generator: ``factory(argument, device, dtype, attention_slicing, vae_slicing, cpu_offload,
scheduler)`` returns an object with ``name``, ``precision`` (``fp32``, ``fp16`` or ``bf16``: what it samples in),
``check``, ``noise_shape`` and ``draw`` (see the module docstring)."""


@GENERATORS.register("embedded", argument="<folder>", optional_argument=True,
                     help="synrep's shipped 28x28 model, or one trained by `synrep generator train` (a folder)")
def _embedded(folder: str | None, device: str, *_: object) -> EmbeddedT2I:
    return EmbeddedT2I(folder, device)


@GENERATORS.register("embedded-world", help="synrep's shipped 40x40 attribute-world model (captions from the `world` caption backend)")
def _embedded_world(_, device: str, *__: object) -> EmbeddedT2I:
    from ..embedded_t2i.model import shipped_world_generator_dir

    return EmbeddedT2I(str(shipped_world_generator_dir()), device, name="embedded-world")


@GENERATORS.register("diffusers", argument="<folder-or-hub-id>",
                     help="any Stable-Diffusion-style diffusers pipeline (SD 1.x/2.x/XL)")
def _diffusers(source: str, device: str, dtype: str, attention_slicing: bool, vae_slicing: bool, cpu_offload: bool,
               scheduler: str) -> DiffusersT2I:
    return DiffusersT2I(source, device, dtype, attention_slicing, vae_slicing, cpu_offload, scheduler)


def make_generator(spec: str, device: str = "cpu", dtype: str = "auto", attention_slicing: bool = False,
                   vae_slicing: bool = False, cpu_offload: bool = False, scheduler: str = "ddim"):
    """Load the generator ``spec`` names (see :data:`GENERATORS`)."""
    return GENERATORS.build(spec, device, dtype, attention_slicing, vae_slicing, cpu_offload, scheduler)
