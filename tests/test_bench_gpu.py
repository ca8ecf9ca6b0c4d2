"""benchmarks/bench_gpu.py: its tiny CPU form runs end to end and reports sane numbers; its full-size configs are SD 1.5's."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_gpu  # noqa: E402


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_tiny_form_runs_and_reports_sane_numbers(tmp_path):
    out_path = tmp_path / "gpu_tiny.json"
    out = bench_gpu.main(["--tiny", "--cpu", "--peak-tflops", "1", "--out", str(out_path)])

    saved = json.loads(out_path.read_text())
    assert saved == json.loads(json.dumps(out))
    assert {"benchmark", "machine", "device", "settings", "rows", "ratios", "generation", "training", "distributed",
            "timings_s"} <= set(saved)
    assert saved["benchmark"] == "gpu_tiny" and saved["settings"]["tiny"] and saved["device"]["type"] == "cpu"

    gen = saved["generation"]
    assert gen["pipeline"] == "tiny" and gen["batched_images"] == gen["captions_per_call"] * gen["images_per_caption"] * 2
    for key in ("batched_img_s", "reference_img_s", "unet_flops_per_forward_batch2", "unet_flops_per_sample",
                "vae_decode_flops_per_image", "batched_unet_tflops", "reference_unet_tflops", "unet_alone_tflops"):
        assert _positive(gen[key]), key
    big = gen["unet_alone_batch"]
    assert gen[f"unet_flops_per_forward_batch{big}"] == gen["unet_flops_per_forward_batch2"] * big // 2  # FLOPs scale with batch
    assert gen["batched_unet_mfu"] == pytest.approx(gen["batched_unet_tflops"])  # --peak-tflops 1
    assert _positive(saved["ratios"]["generation batched / one image per call"])  # recorded, not asserted (timing)

    tr = saved["training"]
    assert set(tr["methods"]) == {"stablerep", "synclr"}
    for method, m in tr["methods"].items():
        for key in ("synrep_train_img_s", "bare_loop_img_s", "ratio", "flops_per_step", "synrep_train_tflops", "bare_loop_mfu"):
            assert _positive(m[key]), (method, key)
        assert math.isfinite(m["final_loss"])
        assert saved["ratios"][f"training {method} synrep/bare"] == pytest.approx(m["ratio"])
    # SynCLR's step (multi-crop, EMA teacher, iBOT heads) costs more than StableRep's on the same batch.
    assert tr["methods"]["synclr"]["flops_per_step"] > tr["methods"]["stablerep"]["flops_per_step"]

    dist = saved["distributed"]
    assert dist["passed"] and dist["backend"] == "gloo" and dist["world_size"] == 1
    assert all(dist["checks"].values())
    assert {r["section"] for r in saved["rows"]} == {"generation", "training", "distributed"}


def test_flop_counter_counts_cpu_attention():
    q = torch.randn(2, 4, 16, 8, requires_grad=True)
    with bench_gpu.flop_counter() as counter:
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert counter.get_total_flops() == 2 * (2 * 2 * 4 * 16 * 16 * 8)  # QK^T and AV, 2 FLOPs per multiply-add
    with bench_gpu.flop_counter() as counter:
        out.sum().backward()
    assert counter.get_total_flops() > 0


def test_byte_clip_tokenizer_is_offline_and_fits_the_text_model(tmp_path):
    tok = bench_gpu.byte_clip_tokenizer(tmp_path / "tok", 77)
    ids = tok(["a photo of a cat"], padding="max_length", max_length=77, truncation=True).input_ids[0]
    assert len(ids) == 77 and ids[0] == tok.bos_token_id and tok.eos_token_id in ids
    assert max(ids) < bench_gpu.pipeline_configs("sd15")["text"]["vocab_size"]
    assert max(ids) < bench_gpu.pipeline_configs("tiny")["text"]["vocab_size"]


def test_sd15_configs_have_sd15_size_and_cost():
    """The full form's UNet is SD 1.5's (859.5M parameters, ~0.8 TFLOP per sample at 512 px), built on the meta device."""
    pytest.importorskip("diffusers")
    from diffusers import UNet2DConditionModel

    cfg = bench_gpu.pipeline_configs("sd15")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg["unet"])
        assert sum(p.numel() for p in unet.parameters()) == 859_520_964
        with torch.no_grad(), bench_gpu.flop_counter() as counter:
            unet(torch.randn(1, 4, 64, 64), torch.tensor(500), encoder_hidden_states=torch.randn(1, 77, 768))
    assert 0.75e12 < counter.get_total_flops() < 0.85e12
