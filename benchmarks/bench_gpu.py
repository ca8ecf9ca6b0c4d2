"""GPU benchmark: generation, training and a distributed launch at the papers' shapes, with achieved FLOP/s.

    python benchmarks/bench_gpu.py                 # on a CUDA machine: the full form (H100-sized; a few minutes)
    python benchmarks/bench_gpu.py --tiny          # tiny shapes (chosen automatically when no CUDA device exists)
    python benchmarks/bench_gpu.py --compile default --peak-tflops 989.4 --sections generation,training

Sections, each measured side by side in one run:

1. generation: a Stable-Diffusion-1.5-shaped pipeline with random weights, built from configs (UNet
   block_out_channels (320, 640, 1280, 1280), cross-attention 768, 8 heads, 2 layers per block; the SD
   AutoencoderKL; a CLIP ViT-L/14-sized text model; a byte-level CLIP tokenizer written here, no hub), saved with
   ``save_pretrained`` and loaded through ``make_generator("diffusers:<folder>")``: 512 px, DDIM 50 steps,
   guidance 2, fp16 on CUDA. synrep's batched ``draw(captions, noise, settings, per_caption=n)`` against the
   reference scripts' style (one prompt, one image per call), plus the UNet alone at both batch sizes. FLOPs come
   from ``torch.utils.flop_counter.FlopCounterMode`` over one UNet forward (and one VAE decode); achieved FLOP/s =
   counted FLOPs x calls / wall time; MFU = that / the device's dense peak (``--peak-tflops``; 989.4 for H100/H200
   SXM bf16/fp16 when the device name says H100 or H200, else none unless given).
2. training: ViT-B/16 at 224 px from 256 px JPEG shards (``write_random_shards``, jpg), presets stablerep and
   synclr (multi-crop + iBOT), bf16 autocast, the ``train.speed.*`` fast paths (fused AdamW, TF32; ``--compile``).
   ``synrep train`` (the streaming loader, schedule, metrics; median images/s over logging windows, first dropped)
   against a bare forward/backward/step loop on one batch already on the device. MFU from FlopCounterMode over one
   training step (forward + backward) x steps / time.
3. distributed: ``torchrun --standalone --nproc_per_node=1`` running a few ``synrep train`` steps inside an explicit
   ``cpu:gloo,cuda:nccl`` process group (``gloo`` on CPU), after an all-reduce of a CPU tensor (and a CUDA tensor
   on GPU); pass/fail.

``--tiny`` uses tests/tiny_sd.py's shapes (64 px, 5 steps), vit-micro at 32 px and a few steps; on a CPU the MFU
stays null unless ``--peak-tflops`` is given. Results: benchmarks/results/gpu.json (``--tiny``: gpu_tiny.json).

Needs diffusers and transformers. On a GPU machine without network access that lacks diffusers, carry its wheel
(pure Python; see docs/performance.md, "GPU benchmark") and put ``src`` on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# bf16/fp16 dense peaks (TFLOP/s) by device-name substring, first match wins; anything else: pass --peak-tflops.
DENSE_PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4, "H200": 989.4}
SECTIONS = ("generation", "training", "distributed")
CAPTIONS = ["a photo of a golden retriever on a beach", "a red sports car parked next to a brick wall",
            "a bowl of ramen on a wooden table", "a lighthouse under a stormy sky", "an orange tabby cat sleeping on a sofa",
            "a snowy mountain behind a frozen lake", "a vintage bicycle leaning against a fence", "a hummingbird next to a flower",
            "a sailboat in front of a sunset", "a cup of coffee beside an open book", "a tractor in a wheat field",
            "a panda eating bamboo in a forest", "a city street at night in the rain", "a plate of sushi on a black slate",
            "a wooden cabin in a pine forest", "a child flying a kite in a park"]


# ----------------------------------------------------------------------------------------------- settings


@dataclass
class Settings:
    """Everything that defines a run (written into the results)."""

    tiny: bool
    device: str
    peak_tflops: float | None
    compile: str = "off"
    threads: int = 0  # torch CPU threads for the run (0 = leave torch's setting)
    sections: list[str] = field(default_factory=lambda: list(SECTIONS))
    # generation
    pipeline: str = "sd15"  # sd15 | tiny
    gen_size: int = 512
    gen_steps: int = 50
    guidance: float = 2.0
    gen_dtype: str = "fp16"
    captions_per_call: int = 8
    images_per_caption: int = 4
    batched_calls: int = 2
    reference_images: int = 4
    unet_repeats: int = 10
    # training
    backbone: str = "vit-base"
    image_size: int = 224
    patch_size: int = 16
    shard_size: int = 256
    shard_groups: list[int] = field(default_factory=lambda: [256] * 16)
    groups_per_batch: int = 64
    images_per_group: int = 4
    train_steps: int = 50
    log_every: int = 10
    bare_steps: int = 20
    workers: int = 8
    shuffle_buffer: int = 256
    methods: list[str] = field(default_factory=lambda: ["stablerep", "synclr"])
    head_overrides: list[str] = field(default_factory=list)
    # distributed
    nproc: int = 1
    dist_steps: int = 4
    dist_groups: int = 16


def make_settings(args: argparse.Namespace) -> Settings:
    cuda = torch.cuda.is_available() and not args.cpu
    tiny = args.tiny or not cuda
    device = "cuda" if cuda else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else ""
    peak = args.peak_tflops if args.peak_tflops is not None else \
        next((v for k, v in DENSE_PEAK_TFLOPS.items() if k in name), None)
    s = Settings(tiny=tiny, device=device, peak_tflops=peak, compile=args.compile,
                 gen_dtype="fp16" if device == "cuda" else "fp32",
                 workers=max(1, min(12, (os.cpu_count() or 2) - 2)))
    if tiny:  # tests/tiny_sd.py's pipeline shapes, vit-micro at 32 px, seconds on 2 CPU cores
        s.pipeline, s.gen_size, s.gen_steps = "tiny", 64, 5
        s.captions_per_call, s.images_per_caption, s.batched_calls, s.reference_images, s.unet_repeats = 4, 4, 2, 4, 3
        s.backbone, s.image_size, s.patch_size, s.shard_size, s.shard_groups = "vit-micro", 32, 8, 32, [32] * 4
        s.groups_per_batch, s.images_per_group, s.train_steps, s.log_every, s.bare_steps = 4, 4, 12, 2, 5
        s.workers, s.shuffle_buffer, s.dist_steps, s.dist_groups = 0, 32, 2, 4
        # One thread: on a shared 2-core machine two OpenMP threads stall at every barrier while another process
        # holds a core (a tiny-pipeline draw measured 10-100x slower with 2 threads than with 1 under such load).
        s.threads = 1
        # The presets' 4096/8192-wide heads dominate a vit-micro step on a CPU; keep them narrow here.
        s.head_overrides = ["loss.proj_hidden=256", "loss.num_prototypes=256", "loss.patch_head_hidden=256",
                            "loss.patch_head_bottleneck=64"]
    for key in ("gen_steps", "gen_size", "captions_per_call", "images_per_caption", "reference_images", "train_steps",
                "groups_per_batch", "workers", "nproc", "threads"):
        if getattr(args, key, None) is not None:
            setattr(s, key, getattr(args, key))
    if args.sections:
        s.sections = [x for x in args.sections.split(",") if x]
        unknown = set(s.sections) - set(SECTIONS)
        if unknown:
            raise SystemExit(f"--sections: unknown {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    return s


# --------------------------------------------------------------------------------------------- FLOPs, time


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out, query, key, value)


def flop_counter():
    """FlopCounterMode that also counts the CPU flash-attention kernels (torch counts the CUDA ones only)."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flops
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_sdpa_backward_flops
    return FlopCounterMode(display=False, custom_mapping=mapping)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def tflops(flops: float, seconds: float) -> float:
    return flops / seconds / 1e12


def mfu(achieved_tflops: float | None, s: Settings) -> float | None:
    return None if achieved_tflops is None or not s.peak_tflops else achieved_tflops / s.peak_tflops


# --------------------------------------------------------------------------------------------- generation


def byte_clip_tokenizer(folder: Path, max_length: int):
    """A CLIP tokenizer with the 256 byte symbols (and their end-of-word forms) and no merges: CLIP's
    pre-tokenisation and special tokens, 514 ids, written and loaded offline. Token ids index a text model of any
    vocabulary size >= 514 (SD's 49408 here), so the text encoder has its real shape."""
    from transformers import CLIPTokenizer

    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable + [256 + i for i in range(256 - len(printable))]  # GPT-2's bytes_to_unicode
    chars = [chr(c) for c in codes]
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": max_length}))
    tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    tokenizer.model_max_length = max_length
    return tokenizer


def pipeline_configs(kind: str) -> dict:
    """Constructor arguments of SD 1.5's modules (``sd15``) or of tests/tiny_sd.py's toy pipeline (``tiny``)."""
    if kind == "sd15":
        return {
            "max_length": 77,
            "text": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                         max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768),
            "unet": dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
                         down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                         up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768,
                         attention_head_dim=8, norm_num_groups=32),
            "vae": dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2, norm_num_groups=32, sample_size=512),
        }
    if kind == "tiny":  # the shapes of tests/tiny_sd.py (64 px from an 8x8x4 latent)
        return {
            "max_length": 77,  # tiny_sd.py's WordPiece context is 16; byte tokens need CLIP's 77
            "text": dict(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=77, projection_dim=32),
            "unet": dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                         cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8),
            "vae": dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32, 32),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=8, sample_size=64),
        }
    raise ValueError(f"unknown pipeline kind {kind!r}")


def build_pipeline(folder: Path, kind: str, device: str, dtype: torch.dtype, seed: int = 0) -> Path:
    """Build an SD-1.x-structured pipeline with random weights from configs and ``save_pretrained`` it (no hub)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = pipeline_configs(kind)
    tokenizer = byte_clip_tokenizer(folder / "_tokenizer_src", cfg["max_length"])
    torch.manual_seed(seed)
    with torch.device(device):  # random init on the GPU takes a second; an 860M-parameter UNet on a CPU much longer
        text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text"], bos_token_id=tokenizer.bos_token_id,
                                                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
        unet = UNet2DConditionModel(**cfg["unet"])
        vae = AutoencoderKL(**cfg["vae"])
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to("cpu", dtype)
    pipe.save_pretrained(folder / "pipeline", safe_serialization=True)
    shutil.rmtree(folder / "_tokenizer_src", ignore_errors=True)
    del pipe, unet, vae, text_encoder
    return folder / "pipeline"


def _unet_inputs(pipe, batch: int, latent: tuple[int, int, int]) -> tuple:
    unet = pipe.unet
    device, dtype = unet.device, unet.dtype
    sample = torch.randn(batch, *latent, device=device, dtype=dtype)
    context = torch.randn(batch, pipe.tokenizer.model_max_length, unet.config.cross_attention_dim, device=device, dtype=dtype)
    return sample, torch.tensor(500, device=device), context


@torch.inference_mode()
def unet_flops(pipe, batch: int, latent: tuple[int, int, int]) -> int:
    sample, t, context = _unet_inputs(pipe, batch, latent)
    with flop_counter() as counter:
        pipe.unet(sample, t, encoder_hidden_states=context)
    return int(counter.get_total_flops())


@torch.inference_mode()
def vae_decode_flops(pipe, latent: tuple[int, int, int]) -> int:
    z = torch.randn(1, *latent, device=pipe.vae.device, dtype=pipe.vae.dtype)
    with flop_counter() as counter:
        pipe.vae.decode(z / pipe.vae.config.scaling_factor)
    return int(counter.get_total_flops())


@torch.inference_mode()
def unet_alone(pipe, batch: int, latent: tuple[int, int, int], repeats: int, device: str) -> float:
    """Seconds per UNet forward at ``batch`` (inputs already on the device)."""
    sample, t, context = _unet_inputs(pipe, batch, latent)
    pipe.unet(sample, t, encoder_hidden_states=context)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        pipe.unet(sample, t, encoder_hidden_states=context)
    sync(device)
    return (time.perf_counter() - start) / repeats


def bench_generation(s: Settings, tmp: Path) -> dict:
    import diffusers

    from synrep.generate.generators import DrawSettings, make_generator

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[s.gen_dtype]
    if s.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    folder = build_pipeline(tmp / "sd", s.pipeline, s.device, dtype)
    built_s = time.perf_counter() - start
    start = time.perf_counter()
    generator = make_generator(f"diffusers:{folder}", device=s.device, dtype=s.gen_dtype, scheduler="ddim")
    load_s = time.perf_counter() - start
    pipe = generator.pipe
    settings = DrawSettings(guidance_scale=s.guidance, steps=s.gen_steps, scheduler="ddim", height=s.gen_size, width=s.gen_size)
    shape = generator.noise_shape(settings)
    rng = torch.Generator().manual_seed(0)
    c, n = s.captions_per_call, s.images_per_caption
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(c * (s.batched_calls + 1))]
    noise = torch.randn(len(captions) * n, *shape, generator=rng)
    cfg_factor = 2 if s.guidance > 1 else 1  # classifier-free guidance doubles the UNet batch

    warm = DrawSettings(guidance_scale=s.guidance, steps=2, scheduler="ddim", height=s.gen_size, width=s.gen_size)
    generator.draw(captions[:c], noise[: c * n], warm, per_caption=n)  # warm-up of both shapes (kernels, allocator)
    generator.draw(captions[:1], noise[:1], warm)

    sync(s.device)
    start = time.perf_counter()
    images = 0
    for call in range(1, s.batched_calls + 1):
        batch = captions[call * c:(call + 1) * c]
        out = generator.draw(batch, noise[call * c * n:(call + 1) * c * n], settings, per_caption=n)
        images += len(out)
    batched_s = time.perf_counter() - start
    assert images == s.batched_calls * c * n, (images, s.batched_calls, c, n)

    start = time.perf_counter()
    for i in range(s.reference_images):  # the reference scripts: one prompt, one image per pipeline call
        out = generator.draw([captions[i]], noise[i * n:i * n + 1], settings)
        assert len(out) == 1
    reference_s = time.perf_counter() - start

    big, small = cfg_factor * c * n, cfg_factor
    flops_big, flops_small = unet_flops(pipe, big, shape), unet_flops(pipe, small, shape)
    vae_flops = vae_decode_flops(pipe, shape)
    batched_tf = tflops(flops_big * s.gen_steps * s.batched_calls, batched_s)
    reference_tf = tflops(flops_small * s.gen_steps * s.reference_images, reference_s)
    per_image = flops_small * s.gen_steps + vae_flops  # UNet steps (with CFG) + one VAE decode, per image
    per_image_batched = flops_big * s.gen_steps / (c * n) + vae_flops
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if s.device == "cuda" else None
    alone_big = unet_alone(pipe, big, shape, s.unet_repeats, s.device)
    alone_small = unet_alone(pipe, small, shape, 3 * s.unet_repeats, s.device)
    result = {
        "pipeline": s.pipeline, "size_px": s.gen_size, "steps": s.gen_steps, "guidance": s.guidance, "dtype": s.gen_dtype,
        "scheduler": "ddim", "diffusers": diffusers.__version__,
        "unet_params_m": sum(p.numel() for p in pipe.unet.parameters()) / 1e6,
        "captions_per_call": c, "images_per_caption": n, "batched_images": images, "reference_images": s.reference_images,
        "build_s": built_s, "load_s": load_s,
        "batched_img_s": images / batched_s, "reference_img_s": s.reference_images / reference_s,
        "unet_flops_per_forward_batch2": flops_small, f"unet_flops_per_forward_batch{big}": flops_big,
        "unet_flops_per_sample": flops_small / small, "vae_decode_flops_per_image": vae_flops,
        "flops_per_image": per_image,
        "batched_unet_tflops": batched_tf, "reference_unet_tflops": reference_tf,
        "batched_unet_mfu": mfu(batched_tf, s), "reference_unet_mfu": mfu(reference_tf, s),
        "batched_pipeline_tflops": tflops(per_image_batched * images, batched_s),
        "reference_pipeline_tflops": tflops(per_image * s.reference_images, reference_s),
        "peak_gpu_mem_gib": peak_mem,
        "unet_alone_batch": big, "unet_alone_s": alone_big, "unet_alone_tflops": tflops(flops_big, alone_big),
        "unet_alone_mfu": mfu(tflops(flops_big, alone_big), s),
        "unet_alone_batch2_s": alone_small, "unet_alone_batch2_tflops": tflops(flops_small, alone_small),
        "unet_alone_batch2_mfu": mfu(tflops(flops_small, alone_small), s),
    }
    del generator, pipe
    _free(s.device)
    return result


# ----------------------------------------------------------------------------------------------- training


def write_shards(s: Settings, folder: Path) -> Path:
    from synrep.shards import write_random_shards

    return write_random_shards(folder, s.shard_groups, images_per_group=4, size=s.shard_size, channels=3, image_format="jpg")


def train_overrides(s: Settings, method: str, shards: Path, out_dir: Path, steps: int, groups: int) -> list[str]:
    return [f"preset={method}", f"data={shards}", f"out_dir={out_dir}", f"steps={steps}", f"groups_per_batch={groups}",
            f"images_per_group={s.images_per_group}", f"backbone.name={s.backbone}", f"backbone.image_size={s.image_size}",
            f"backbone.patch_size={s.patch_size}", "backbone.in_channels=3", f"loader.load_size={s.shard_size}",
            f"loader.num_workers={s.workers}", f"loader.shuffle_buffer={s.shuffle_buffer}", f"log_every={s.log_every}",
            f"checkpoint_every={steps}", "warmup_steps=2", "resume=false", f"device={s.device}", *s.head_overrides,
            *([f"speed.compile={s.compile}"] if s.compile != "off" else [])]


def _first_batch(cfg, device: str) -> tuple[dict, int]:
    """The first batch of ``cfg``'s stream, as the loop sees it, on ``device``; and the number of classes."""
    from synrep.streaming import BatchSpec
    from synrep.training.data import LoaderConfig, check_data, make_batches, open_data, to_device

    source = open_data(cfg.data, cfg.limit_groups, cfg.loader.real_split)
    size = check_data(source, cfg.groups_per_batch, cfg.images_per_group, cfg.short_groups, cfg.backbone.image_size, cfg.loader, 1)
    spec = BatchSpec(cfg.groups_per_batch, cfg.images_per_group, size, cfg.backbone.in_channels, cfg.short_groups,
                     cfg.loader.shuffle_buffer, cfg.seed, captions=False)
    _, batches = make_batches(source, spec, LoaderConfig(num_workers=0, shuffle_buffer=cfg.loader.shuffle_buffer), 0, 1, 0, False)
    batch = to_device(next(batches), device)
    batches.close()
    return batch, len(source.class_names)


def bare_loop(cfg, steps: int, device: str) -> dict:
    """forward/backward/step on one batch already on the device, with the loop's fast paths and autocast (no
    loader, schedule, gradient scaler, clipping or metrics). FLOPs of one step counted on the eager model."""
    from synrep.training.fast_paths import enable_tf32, prepare_backbone
    from synrep.training.loop import build_optimizer
    from synrep.training.methods import build_method

    batch, classes = _first_batch(cfg, device)
    torch.manual_seed(cfg.seed)
    model = build_method(cfg.method, cfg.backbone, cfg.loss, cfg.augment, classes, cfg.steps).to(device)
    enable_tf32(cfg.speed, device)
    optimizer = build_optimizer(cfg, model, 1e-5, device)
    amp = cfg.amp and device.startswith("cuda")

    def step(i: int, count: bool = False) -> int:
        g = torch.Generator().manual_seed(i)
        counter = flop_counter() if count else None
        with counter if counter is not None else contextlib.nullcontext():
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                terms = model(batch, g, i)
            loss = sum(terms.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        model.before_optimizer_step(i)
        optimizer.step()
        model.after_step(i)
        return int(counter.get_total_flops()) if counter is not None else 0

    model.train()
    flops = step(0, count=True)
    applied = prepare_backbone(model, cfg.backbone.name, cfg.speed, device)
    for i in range(1, 3):  # warm-up (and compilation)
        step(i)
    seconds, first = math.inf, 3
    for _ in range(2):  # the faster of two timed blocks: a shared machine's bursts hit one block, rarely both
        sync(device)
        start = time.perf_counter()
        for i in range(first, first + steps):
            step(i)
        sync(device)
        seconds = min(seconds, time.perf_counter() - start)
        first += steps
    n = len(batch["images"])
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    del model, optimizer, batch
    _free(device)
    return {"img_s": n * steps / seconds, "step_s": seconds / steps, "flops_per_step": flops, "batch": n,
            "applied": applied, "peak_gpu_mem_gib": peak_mem}


def streaming(cfg) -> dict:
    """``synrep train`` itself: median images/s over its logging windows, the first (start-up, compilation) dropped."""
    from synrep.training.loop import train

    start = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
    speeds = sorted(r["img_per_s"] for r in rows[1:]) or [rows[-1]["img_per_s"]]
    _free(cfg.device)
    return {"img_s": speeds[len(speeds) // 2], "windows": len(speeds), "wall_s": wall, "final_loss": rows[-1]["loss"]}


def bench_training(s: Settings, shards: Path, tmp: Path) -> dict:
    from synrep.config import load_config
    from synrep.training.loop import TrainConfig

    out = {"backbone": s.backbone, "image_size": s.image_size, "patch_size": s.patch_size, "shard_px": s.shard_size,
           "shard_groups": sum(s.shard_groups), "batch": s.groups_per_batch * s.images_per_group, "train_steps": s.train_steps,
           "log_every": s.log_every, "bare_steps": s.bare_steps, "loader_workers": s.workers, "compile": s.compile,
           "amp": "bf16" if s.device == "cuda" else "fp32", "methods": {}}
    for method in s.methods:
        overrides = train_overrides(s, method, shards, tmp / f"train-{method}", s.train_steps, s.groups_per_batch)
        cfg = load_config(TrainConfig, None, overrides)
        if s.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        bare = bare_loop(cfg, s.bare_steps, s.device)
        ours = streaming(cfg)
        bare_tf = tflops(bare["flops_per_step"], bare["step_s"])
        ours_tf = tflops(bare["flops_per_step"] * ours["img_s"] / bare["batch"], 1.0)
        out["methods"][method] = {
            "synrep_train_img_s": ours["img_s"], "bare_loop_img_s": bare["img_s"], "ratio": ours["img_s"] / bare["img_s"],
            "flops_per_step": bare["flops_per_step"], "flops_per_image": bare["flops_per_step"] / bare["batch"],
            "synrep_train_tflops": ours_tf, "bare_loop_tflops": bare_tf,
            "synrep_train_mfu": mfu(ours_tf, s), "bare_loop_mfu": mfu(bare_tf, s),
            "fast_paths": bare["applied"], "final_loss": ours["final_loss"], "train_wall_s": ours["wall_s"],
            "windows": ours["windows"], "peak_gpu_mem_gib": bare["peak_gpu_mem_gib"],
        }
    return out


# -------------------------------------------------------------------------------------------- distributed


def bench_distributed(s: Settings, shards: Path, tmp: Path) -> dict:
    """``torchrun --standalone --nproc_per_node=N`` this file with ``--dist-worker``: a few ``synrep train`` steps."""
    spec = {"overrides": train_overrides(s, "stablerep", shards, tmp / "train-dist", s.dist_steps, s.dist_groups),
            "device": s.device, "result": str(tmp / "dist-result.json")}
    spec["overrides"] = [o for o in spec["overrides"] if not o.startswith(("log_every=", "loader.num_workers="))] + \
        ["log_every=1", f"loader.num_workers={min(s.workers, 2)}"]
    (tmp / "dist-spec.json").write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={s.nproc}",
           str(Path(__file__).resolve()), "--dist-worker", str(tmp / "dist-spec.json")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env["OMP_NUM_THREADS"] = str(s.threads or max(1, (os.cpu_count() or 2) // s.nproc))
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300 if s.tiny else 600)
        returncode, log = proc.returncode, proc.stdout[-3000:] + "\n" + proc.stderr[-3000:]
    except subprocess.TimeoutExpired as err:
        returncode, log = None, f"timed out after {err.timeout} s"
    wall = time.perf_counter() - start
    result = json.loads(Path(spec["result"]).read_text()) if Path(spec["result"]).exists() else {}
    passed = returncode == 0 and bool(result.get("ok"))
    if not passed:
        print(f"distributed run failed (exit {returncode}):\n{log}", file=sys.stderr)
    shown = f"torchrun --standalone --nproc_per_node={s.nproc} benchmarks/bench_gpu.py --dist-worker <spec.json>"
    return {"command": shown, "nproc": s.nproc, "passed": passed, "returncode": returncode, "wall_s": wall, **result}


def dist_worker(spec_path: str) -> None:
    import torch.distributed as dist

    from synrep.config import load_config
    from synrep.training.loop import TrainConfig, train

    spec = json.loads(Path(spec_path).read_text())
    cuda = spec["device"] == "cuda"
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local)
    # The group synrep.distributed makes for world_size > 1, made here explicitly so one process exercises it too.
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    dist.init_process_group(backend=backend)
    checks = {}
    t = torch.full((1,), float(rank + 1))
    dist.all_reduce(t)
    checks["cpu_all_reduce"] = t.item() == world * (world + 1) / 2
    if cuda:
        t = torch.full((1,), float(rank + 1), device=f"cuda:{local}")
        dist.all_reduce(t)
        checks["cuda_all_reduce"] = t.item() == world * (world + 1) / 2
    cfg = load_config(TrainConfig, None, spec["overrides"])
    start = time.perf_counter()
    train(cfg)  # joins the existing group (synrep's init_distributed skips a second init); cleans it up at the end
    seconds = time.perf_counter() - start
    if rank == 0:
        rows = [json.loads(line) for line in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in rows]
        checks["finite_losses"] = bool(losses) and all(math.isfinite(x) for x in losses)
        checks["all_steps"] = bool(rows) and rows[-1]["step"] == cfg.steps
        checks["checkpoint"] = (Path(cfg.out_dir) / "checkpoint.pt").exists()
        checks["encoder"] = (Path(cfg.out_dir) / "encoder").is_dir()
        result = {"backend": backend, "world_size": world, "steps": cfg.steps, "train_s": seconds, "final_loss": losses[-1] if losses else None,
                  "checks": checks, "ok": all(checks.values())}
        Path(spec["result"]).write_text(json.dumps(result))


# ----------------------------------------------------------------------------------------------- reporting


def _free(device: str) -> None:
    import gc

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def device_info(s: Settings) -> dict:
    info = {"type": s.device, "torch": torch.__version__}
    if s.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}", memory_gib=props.total_memory / 2**30,
                    cuda=torch.version.cuda, multiprocessors=props.multi_processor_count)
    else:
        info.update(name=f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1 else f"{v:.1f}"
    return str(v)


def print_table(title: str, rows: list[dict]) -> None:
    keys = list(rows[0])
    widths = [max(len(k), *(len(_fmt(r.get(k))) for r in rows)) for k in keys]
    print(f"\n== {title} ==")
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(k)).ljust(w) for k, w in zip(keys, widths)))


def summarise(s: Settings, sections: dict) -> tuple[list[dict], dict]:
    """One row per measured case (section, case, images/s, achieved TFLOP/s, MFU) and the side-by-side ratios."""
    rows, ratios = [], {}
    gen = sections.get("generation")
    if gen:
        c, n = gen["captions_per_call"], gen["images_per_caption"]
        rows += [
            {"section": "generation", "case": f"batched draw ({c} captions x {n} per call)", "img_s": gen["batched_img_s"],
             "tflop_s": gen["batched_unet_tflops"], "mfu": gen["batched_unet_mfu"]},
            {"section": "generation", "case": "one prompt, one image per call", "img_s": gen["reference_img_s"],
             "tflop_s": gen["reference_unet_tflops"], "mfu": gen["reference_unet_mfu"]},
            {"section": "generation", "case": f"UNet forward alone, batch {gen['unet_alone_batch']}", "img_s": None,
             "tflop_s": gen["unet_alone_tflops"], "mfu": gen["unet_alone_mfu"]},
            {"section": "generation", "case": "UNet forward alone, batch 2", "img_s": None,
             "tflop_s": gen["unet_alone_batch2_tflops"], "mfu": gen["unet_alone_batch2_mfu"]},
        ]
        ratios["generation batched / one image per call"] = gen["batched_img_s"] / gen["reference_img_s"]
        ratios["generation batched draw UNet FLOP/s / UNet alone"] = gen["batched_unet_tflops"] / gen["unet_alone_tflops"]
    tr = sections.get("training")
    if tr:
        for method, m in tr["methods"].items():
            rows += [
                {"section": "training", "case": f"{method}: synrep train (streaming)", "img_s": m["synrep_train_img_s"],
                 "tflop_s": m["synrep_train_tflops"], "mfu": m["synrep_train_mfu"]},
                {"section": "training", "case": f"{method}: bare loop, batch on device", "img_s": m["bare_loop_img_s"],
                 "tflop_s": m["bare_loop_tflops"], "mfu": m["bare_loop_mfu"]},
            ]
            ratios[f"training {method} synrep/bare"] = m["ratio"]
    dist = sections.get("distributed")
    if dist:
        rows.append({"section": "distributed", "case": f"torchrun x{dist['nproc']} ({dist.get('backend', '?')}): "
                     + ("pass" if dist["passed"] else "FAIL"), "img_s": None, "tflop_s": None, "mfu": None})
    return rows, ratios


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (automatic without a CUDA device)")
    parser.add_argument("--cpu", action="store_true", help="ignore CUDA even when present (implies --tiny)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense peak of the device for MFU (default: 989.4 on an H100/H200, else none)")
    parser.add_argument("--compile", default="off", choices=["off", "default", "reduce-overhead", "max-autotune"],
                        help="train.speed.compile for the training section (both sides)")
    parser.add_argument("--sections", default="", help=f"comma-separated subset of {', '.join(SECTIONS)}")
    parser.add_argument("--out", default=None, help="results file (default benchmarks/results/gpu.json, --tiny: gpu_tiny.json)")
    parser.add_argument("--gen-steps", dest="gen_steps", type=int, default=None)
    parser.add_argument("--gen-size", dest="gen_size", type=int, default=None)
    parser.add_argument("--captions-per-call", dest="captions_per_call", type=int, default=None)
    parser.add_argument("--images-per-caption", dest="images_per_caption", type=int, default=None)
    parser.add_argument("--reference-images", dest="reference_images", type=int, default=None)
    parser.add_argument("--train-steps", dest="train_steps", type=int, default=None)
    parser.add_argument("--groups-per-batch", dest="groups_per_batch", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None, help="loader workers of synrep train")
    parser.add_argument("--nproc", type=int, default=None, help="processes for the distributed section (1 per GPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 in --tiny, else unchanged)")
    parser.add_argument("--dist-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dist_worker:
        dist_worker(args.dist_worker)
        return {}
    s = make_settings(args)
    out_path = Path(args.out) if args.out else RESULTS / ("gpu_tiny.json" if s.tiny else "gpu.json")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    sections, timings = {}, {}
    tmp = Path(tempfile.mkdtemp(prefix="synrep-bench-gpu-"))
    threads = torch.get_num_threads()
    if s.threads:
        torch.set_num_threads(s.threads)
    device = device_info(s)
    try:
        shards = None
        for name in s.sections:
            start = time.perf_counter()
            if name == "generation":
                sections[name] = bench_generation(s, tmp)
            else:
                if shards is None:
                    shards = write_shards(s, tmp / "shards")
                    timings["write_shards"] = time.perf_counter() - start
                    start = time.perf_counter()
                sections[name] = bench_training(s, shards, tmp) if name == "training" else bench_distributed(s, shards, tmp)
            timings[name] = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(tmp, ignore_errors=True)
    rows, ratios = summarise(s, sections)
    name = "gpu_tiny" if s.tiny else "gpu"
    print_table(f"{name} on {device['name']}" + (f", peak {s.peak_tflops} TFLOP/s" if s.peak_tflops else ""), rows)
    for k, v in ratios.items():
        print(f"ratio {k}: {v:.2f}")
    out = {"benchmark": name, "machine": machine(), "device": device, "settings": asdict(s), "rows": rows,
           "ratios": ratios, **sections, "timings_s": timings}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {out_path}")
    return out


if __name__ == "__main__":
    main()
