import json

import numpy as np
import pytest
import torch

from synrep.config import load_config
from synrep.training.backbones import BackboneConfig, build_backbone
from synrep.training.export import EncoderError, load_encoder
from synrep.training.fast_paths import SpeedConfig
from synrep.training.loop import TrainConfig, TrainingError, lr_at, train
from synrep.utils import read_jsonl

FAST = ["steps=12", "groups_per_batch=8", "images_per_group=4", "log_every=1", "warmup_steps=2", "base_lr=3e-3",
        "checkpoint_every=100", "augment.crop_scale_min=0.8", "augment.jitter_p=0", "augment.blur_p=0"]


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method, extra", [
    ("simclr", []), ("supcon", []), ("stablerep", []), ("stablerep+", []), ("supervised", []),
    ("synclr", ["backbone.name=vit-micro", "backbone.embed_dim=32", "backbone.depth=2", "loss.num_prototypes=64",
                "augment.local_crops=2", "augment.local_size=12"]),
    ("stablerep", ["preset=genrep", "base_lr=0.3"]),  # SGD without clipping, head as wide as the features
])
def test_each_method_lowers_its_loss_and_exports(method, extra, shard_dir, tmp_path):
    out = tmp_path / method
    cfg = load_config(TrainConfig, None, [f"method={method}", f"data={shard_dir}", f"out_dir={out}", *FAST, *extra])
    encoder = train(cfg)
    losses = _losses(out)
    assert len(losses) == 12 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), f"{method} did not lower its loss: {losses}"
    backbone, meta = load_encoder(encoder)
    assert meta["method"] == method and backbone(torch.zeros(2, 1, 28, 28)).shape == (2, meta["feature_dim"])
    assert (out / "loss_curve.png").exists() and (encoder / "MODEL_CARD.md").exists()


def test_resume_gives_the_same_next_loss(shard_dir, tmp_path):
    base = [f"data={shard_dir}", "method=stablerep", *FAST, "steps=6"]
    full = load_config(TrainConfig, None, [*base, f"out_dir={tmp_path / 'full'}"])
    train(full)
    part = load_config(TrainConfig, None, [*base, f"out_dir={tmp_path / 'part'}", "stop_after=3"])
    train(part)
    assert len(_losses(tmp_path / "part")) == 3
    part.stop_after = 0
    train(part)
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "part")
    assert len(b) == 6
    assert b[3] == pytest.approx(a[3], rel=1e-6, abs=1e-7), "step k+1 after resume equals the uninterrupted run"
    assert b == pytest.approx(a, rel=1e-5)


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.0)
    assert lr_at(0, 1.0, cfg) == pytest.approx(0.1) and lr_at(9, 1.0, cfg) == pytest.approx(1.0)
    assert lr_at(55, 1.0, cfg) == pytest.approx(0.5) and lr_at(100, 1.0, cfg) == pytest.approx(0.0, abs=1e-9)


def test_nan_guard_stops_with_a_clear_message(shard_dir, tmp_path, monkeypatch):
    from synrep.training import methods

    monkeypatch.setattr(methods.StableRep, "extra_losses", lambda self, batch, feats: {"bad": feats.sum() * float("nan")})
    cfg = load_config(TrainConfig, None, [f"data={shard_dir}", f"out_dir={tmp_path}", *FAST])
    with pytest.raises(TrainingError, match="loss became nan"):
        train(cfg)


@pytest.mark.parametrize("override, key", [("loss.temperature=-0.1", "loss.temperature"), ("backbone.width=0", "backbone.width"),
                                           ("log_every=0", "log_every"), ("limit_groups=-1", "limit_groups"),
                                           ("method=foo", "method"), ("augment.blur_p=2", "augment.blur_p"),
                                           ("loader.prefetch_factor=0", "loader.prefetch_factor"), ("base_lr=-1", "base_lr"),
                                           ("grad_clip=-1", "grad_clip"), ("preset=dino", "preset"), ("optimizer=lars", "optimizer"),
                                           ("loss.mask_shape=grid", "loss.mask_shape"), ("loss.ema_start=1.5", "loss.ema_start"),
                                           ("loss.freeze_last_layer=2", "loss.freeze_last_layer"), ("encoder=ema", "encoder")])
def test_bad_values_fail_when_the_config_loads(override, key):
    from synrep.config import ConfigError

    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        load_config(TrainConfig, None, [override])


def test_a_new_method_is_one_class_and_one_registration(shard_dir, tmp_path):
    from synrep.training.methods import METHODS, ContrastiveMethod, register_method

    @register_method
    class SameConceptOrCaption(ContrastiveMethod):  # a toy rule: positives share the concept (as SupCon), two views
        name, positive_key, min_views = "toy-concept-2view", "concept", 2

    try:
        out = tmp_path / "toy"
        train(load_config(TrainConfig, None, [f"data={shard_dir}", f"out_dir={out}", "method=toy-concept-2view", *FAST, "steps=3"]))
        assert len(_losses(out)) == 3 and load_encoder(out / "encoder")[1]["method"] == "toy-concept-2view"
    finally:
        METHODS.pop("toy-concept-2view")


def test_resume_with_other_settings_is_refused_naming_them(shard_dir, tmp_path):
    base = [f"data={shard_dir}", f"out_dir={tmp_path}", *FAST, "steps=4"]
    train(load_config(TrainConfig, None, [*base, "stop_after=2"]))
    with pytest.raises(TrainingError, match=r"base_lr: 0.003 -> 0.01.*--no-resume"):
        train(load_config(TrainConfig, None, [*base, "base_lr=0.01"]))
    train(load_config(TrainConfig, None, [*base, "log_every=2"]))  # reporting settings may change
    assert json.loads((tmp_path / "encoder" / "encoder.json").read_text())["steps"] == 4


def test_crash_after_a_checkpoint_resumes_without_duplicate_metrics(shard_dir, tmp_path, monkeypatch):
    from synrep.training import methods

    real = methods.StableRep.after_step

    def crash_once(self, step):
        if step == 4 and not getattr(methods, "_crashed", False):
            methods._crashed = True
            raise KeyboardInterrupt("simulated kill")
        return real(self, step)

    monkeypatch.setattr(methods.StableRep, "after_step", crash_once)
    monkeypatch.setattr(methods, "_crashed", False, raising=False)
    cfg = load_config(TrainConfig, None, [f"data={shard_dir}", f"out_dir={tmp_path}", *FAST, "steps=6", "checkpoint_every=3"])
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    assert [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    train(cfg)
    assert [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]


def test_export_replaces_a_folder_atomically(tmp_path):
    from synrep.training.export import export_encoder, is_exported

    net = build_backbone(BackboneConfig())
    folder = export_encoder(net, BackboneConfig(), tmp_path / "encoder", {"method": "a"})
    assert is_exported(folder) and not list(tmp_path.glob(".encoder.*"))
    export_encoder(net, BackboneConfig(), folder, {"method": "b"})
    assert load_encoder(folder)[1]["method"] == "b" and sorted(p.name for p in tmp_path.iterdir()) == ["encoder"]


@pytest.mark.parametrize("name", ["cnn", "resnet", "vit-micro"])
def test_backbones_build_and_vit_exposes_tokens(name):
    net = build_backbone(BackboneConfig(name=name, image_size=28, in_channels=1, patch_size=7))
    assert net(torch.zeros(3, 1, 28, 28)).shape == (3, net.feature_dim)
    if name.startswith("vit"):
        cls, patches = net.forward_tokens(torch.zeros(2, 1, 28, 28), torch.ones(2, 16, dtype=torch.bool))
        assert cls.shape == (2, 128) and patches.shape == (2, 16, 128)


def test_load_encoder_refuses_non_exports(tmp_path):
    with pytest.raises(EncoderError, match="not a synrep encoder"):
        load_encoder(tmp_path)
    (tmp_path / "encoder.json").write_text(json.dumps({"type": "something-else", "backbone": {}}))
    (tmp_path / "model.safetensors").write_bytes(b"\x80\x04not safetensors")
    with pytest.raises(EncoderError):
        load_encoder(tmp_path)


@pytest.mark.slow
def test_torchrun_two_process_training_runs_and_exports(shard_dir, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533", "-m", "synrep.cli", "train",
           f"data={shard_dir}", f"out_dir={tmp_path}", "method=stablerep", "steps=4", "groups_per_batch=4", "log_every=1", "warmup_steps=1"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4], "only rank 0 writes metrics"
    backbone, meta = load_encoder(tmp_path / "encoder")
    assert "global batch 32" in result.stderr and meta["method"] == "stablerep"


def test_vit_conv_stem_keeps_the_token_grid():
    net = build_backbone(BackboneConfig(name="vit-micro", image_size=28, patch_size=4, conv_stem=True))
    cls, patches = net.forward_tokens(torch.zeros(2, 1, 28, 28))
    assert patches.shape == (2, 49, 128) and cls.shape == (2, 128)
    with pytest.raises(ValueError, match="power-of-two"):
        build_backbone(BackboneConfig(name="vit-micro", image_size=28, patch_size=7, conv_stem=True))


def test_fast_paths_apply_where_they_belong():
    from synrep.training.fast_paths import SpeedConfig, describe, optimizer_kwargs, prepare_backbone
    from synrep.training.methods import MethodConfig, build_method
    from synrep.training.augment import AugmentConfig

    def method(name):
        return build_method("stablerep", BackboneConfig(name=name), MethodConfig(), AugmentConfig(), 10, 10)

    cnn, vit = method("cnn"), method("vit-micro")
    speed = SpeedConfig()
    assert prepare_backbone(cnn, "cnn", speed, "cpu") == [] and optimizer_kwargs(speed, "cpu") == {}
    assert describe(speed, "cpu", []) == "none (eager fp32 on CPU)"
    # The device string decides (the weights may stay on the CPU here): convolutional backbones go channels-last.
    assert prepare_backbone(cnn, "cnn", speed, "cuda:0") == ["channels-last"]
    conv = next(m for m in cnn.backbone.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    assert prepare_backbone(vit, "vit-micro", speed, "cuda:0") == [], "a ViT gains nothing from channels-last"
    assert optimizer_kwargs(speed, "cuda:0") == {"fused": True}
    assert optimizer_kwargs(SpeedConfig(fused_optimizer=False), "cuda:0") == {}
    assert "tf32" in describe(speed, "cuda:0", ["channels-last"]) and "fused optimizer" in describe(speed, "cuda:0", [])


@pytest.mark.slow
def test_compiled_backbone_trains_and_exports_the_same_parameter_names(shard_dir, tmp_path):
    cfg = TrainConfig(data=str(shard_dir), out_dir=str(tmp_path / "c"), steps=2, groups_per_batch=4, images_per_group=2,
                      log_every=1, checkpoint_every=2, speed=SpeedConfig(compile="default"))
    encoder = train(cfg)
    backbone, _ = load_encoder(encoder)
    assert set(backbone.state_dict()) == set(build_backbone(BackboneConfig()).state_dict())
    assert len(read_jsonl(tmp_path / "c" / "metrics.jsonl")) == 2


def test_a_metrics_row_cut_by_a_kill_does_not_swallow_the_next_row_after_resume(tmp_path):
    from synrep.training.loop import _drop_metrics_after
    from synrep.utils import append_jsonl

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 10, "loss": 1.0}\n{"step": 20, "loss": 0.9}\n{"step": 30, "lo')  # killed mid-write
    _drop_metrics_after(path, 20)  # resuming from the step-20 checkpoint
    append_jsonl(path, {"step": 30, "loss": 0.8})
    assert [r["step"] for r in read_jsonl(path)] == [10, 20, 30]
