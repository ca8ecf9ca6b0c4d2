"""Batched `synrep generate` vs the reference style (one prompt, one image per pipeline call), same model and steps."""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import report

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny SD pipeline lives with the tests
from synrep.captions.stage import CaptionsConfig, run_captions
from synrep.generate.generators import DrawSettings, make_generator
from synrep.generate.stage import GenerateConfig, initial_noise, run_generate


def reference_style(generator, captions: list[dict], cfg: GenerateConfig) -> float:
    """One caption, one image per call (the reference scripts' loop); returns images/s."""
    settings = DrawSettings(cfg.guidance_scale, cfg.steps, cfg.scheduler)
    shape = generator.noise_shape(settings)
    start, n = time.perf_counter(), 0
    for rec in captions:
        noise, _ = initial_noise(cfg, rec["id"], shape)
        for j in range(cfg.images_per_caption):
            generator.draw([rec["caption"]], noise[j:j + 1], settings)
            n += 1
    return n / (time.perf_counter() - start)


def main() -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="synrep-bench-gen-"))
    try:
        captions = run_captions(CaptionsConfig(out_dir=str(tmp / "captions"), per_concept=4, dedup="text"))
        from synrep.captions.stage import read_captions
        from tiny_sd import build_tiny_sd_pipeline

        tiny = build_tiny_sd_pipeline(tmp / "tiny-sd")
        rows, ratios = [], {}
        for name, spec, n_captions, steps in (("tiny diffusers SD", f"diffusers:{tiny}", 16, 10), ("embedded", "embedded", 40, 10)):
            cfg = GenerateConfig(captions=str(captions), out_dir=str(tmp / name.replace(" ", "_")), generator=spec,
                                 limit_captions=n_captions, steps=steps, captions_per_shard=n_captions, batch_captions=16, preview=False)
            generator = make_generator(spec)
            records = read_captions(captions)[:n_captions]
            ref = reference_style(generator, records[: max(4, n_captions // 4)], cfg)
            start = time.perf_counter()
            run_generate(cfg)
            batched = n_captions * cfg.images_per_caption / (time.perf_counter() - start)
            rows.append({"generator": name, "steps": steps, "batched_img_s": batched, "reference_img_s": ref})
            ratios[f"{name} batched / reference"] = batched / ref
        return report("generation", rows, ratios)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
