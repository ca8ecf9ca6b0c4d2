"""Methods pinned to their reference formulas: heads, SynCLR's teacher and masking, presets."""

import math

import pytest
import torch
from torch import nn

from synrep.config import ConfigError, load_config
from synrep.training.augment import AugmentConfig
from synrep.training.backbones import BackboneConfig
from synrep.training.heads import PatchHead, projection_head
from synrep.training.loop import TrainConfig, train
from synrep.training.masking import block_mask, masked_counts, random_mask
from synrep.training.methods import METHODS, MethodConfig, SynCLR, build_method, cosine_momentum
from synrep.training.presets import PRESETS, apply_preset

TINY_VIT = BackboneConfig(name="vit-micro", embed_dim=16, depth=1, num_heads=2)


def _synclr(total_steps=100, **loss) -> SynCLR:
    cfg = MethodConfig(num_prototypes=32, proj_hidden=32, proj_dim=8, patch_head_hidden=32, patch_head_bottleneck=8, **loss)
    return SynCLR(TINY_VIT, cfg, AugmentConfig(local_crops=2), num_classes=0, total_steps=total_steps)


def _batch(b=8):
    return {"images": torch.rand(b, 1, 28, 28, generator=torch.Generator().manual_seed(b)), "group": torch.arange(b // 2).repeat_interleave(2),
            "concept": torch.zeros(b, dtype=torch.long), "image": torch.arange(b)}


def test_patch_head_bottleneck_has_norm_one_and_prototypes_are_weight_normed():
    torch.manual_seed(0)
    head = PatchHead(16, num_prototypes=64, hidden=32, bottleneck=8, layers=3)
    x = torch.randn(50, 16) * 100
    z = head.bottleneck(x)
    assert torch.allclose(z.norm(dim=1), torch.ones(50), atol=1e-5)
    out = head(x)
    w = head.last_layer.weight
    assert torch.allclose(out, z @ (w / w.norm(dim=1, keepdim=True)).t(), atol=1e-6), "logits = cosines to unit prototypes"
    assert out.abs().max() <= 1 + 1e-5
    with torch.no_grad():
        w.mul_(torch.rand(64, 1) * 10 + 0.1)  # the length of a prototype's weight does not matter (gain fixed at 1)
    assert torch.allclose(head(x), out, atol=1e-5)
    mlp_linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert [m.out_features for m in mlp_linears] == [32, 32, 8] and not any(isinstance(m, nn.LayerNorm) for m in head.mlp)


def test_projection_heads_as_the_references_build_them():
    stablerep = projection_head(768, 4096, 256, layers=3, norm="bn", activation="relu")
    kinds = [type(m).__name__ for m in stablerep]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert stablerep[-1].bias is not None and stablerep[0].out_features == 4096 and stablerep[-1].out_features == 256
    synclr = projection_head(768, 4096, 256, layers=3, norm="ln", activation="gelu", last_norm=True)
    kinds = [type(m).__name__ for m in synclr]
    assert kinds == ["Linear", "LayerNorm", "GELU", "Linear", "LayerNorm", "GELU", "Linear", "LayerNorm"]
    assert synclr[-2].bias is None and not synclr[-1].elementwise_affine
    demo = projection_head(256, 512, 128)
    assert [type(m).__name__ for m in demo] == ["Linear", "GELU", "Linear"]


def test_prototypes_are_frozen_for_the_first_steps_and_then_train():
    torch.manual_seed(1)
    method = _synclr(total_steps=20, freeze_last_layer=0.1)  # 2 frozen steps
    assert method.freeze_steps == 2
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    protos = method.patch_head.last_layer.weight
    for step in range(3):
        before, other = protos.detach().clone(), method.patch_head.mlp[0].weight.detach().clone()
        opt.zero_grad()
        sum(method(_batch(), torch.Generator().manual_seed(step), step).values()).backward()
        assert protos.grad is not None
        method.before_optimizer_step(step)
        opt.step()
        assert not torch.equal(method.patch_head.mlp[0].weight, other), "the rest of the head trains"
        if step < 2:
            assert protos.grad is None and torch.equal(protos, before), "frozen: no update and no weight decay"
        else:
            assert not torch.equal(protos, before)


def test_ema_schedule_and_update_cover_backbone_projector_and_patch_head():
    method = _synclr(total_steps=100, ema_start=0.9, ema_end=1.0, teacher_temp_warmup_frac=0.1)
    for step in (0, 25, 50, 100):
        assert method.momentum(step) == pytest.approx(1.0 - 0.1 * (1 + math.cos(math.pi * step / 100)) / 2)
    assert cosine_momentum(10, 100, 0.994, 1.0) == pytest.approx(1 - 0.006 * (1 + math.cos(math.pi / 10)) / 2)
    assert method.teacher_temperature(0) == pytest.approx(0.04) and method.teacher_temperature(5) == pytest.approx(0.055)
    assert method.teacher_temperature(10) == pytest.approx(0.07) and method.teacher_temperature(99) == pytest.approx(0.07)
    with torch.no_grad():
        for p in method.parameters():
            p.add_(torch.randn_like(p))  # student and teacher now differ
    pairs = method.pairs()
    before = [[p.clone() for p in t.parameters()] for _, t in pairs]
    m = method.update_teacher(30)
    assert m == pytest.approx(method.momentum(30))
    for (student, teacher), old in zip(pairs, before):
        for b, t, s in zip(old, teacher.parameters(), student.parameters()):
            assert torch.allclose(t, m * b + (1 - m) * s, atol=1e-6)
    assert not any(p.requires_grad for _, t in pairs for p in t.parameters())


def test_random_masks_have_exactly_the_ratio():
    g = torch.Generator().manual_seed(2)
    for batch, grid, prob, ratio in [(64, 14, 0.5, 0.5), (10, 4, 0.3, 0.25), (7, 7, 1.0, 0.4)]:
        mask = random_mask(batch, grid, prob, ratio, g)
        images, per_image = masked_counts(batch, grid * grid, prob, ratio)
        assert (images, per_image) == (int(batch * prob), int(grid * grid * ratio))
        counts = mask.sum(1)
        assert (counts > 0).sum() == images and set(counts[counts > 0].tolist()) == {per_image}
    masks = torch.stack([random_mask(8, 4, 0.5, 0.5, g) for _ in range(200)]).float()
    assert (masks.mean(0) - 0.25).abs().max() < 0.1, "every image and token is equally likely to be masked"
    assert torch.equal(random_mask(8, 4, 0.5, 0.5, torch.Generator().manual_seed(3)), random_mask(8, 4, 0.5, 0.5, torch.Generator().manual_seed(3)))


def test_block_masks_are_rectangles_up_to_the_ratio():
    mask = block_mask(16, 14, 0.5, 0.4, torch.Generator().manual_seed(4))
    counts = mask.sum(1)
    target = int(196 * 0.4)
    assert (counts > 0).sum() == 8 and counts.max() <= target and counts[counts > 0].float().mean() > 0.8 * target
    one = mask[counts > 0][0].view(14, 14).float()
    neighbours = sum(torch.roll(one, s, d) for s in (-1, 1) for d in (0, 1))
    assert (one * neighbours).sum() / one.sum() > 2, "blocks: masked tokens have masked neighbours"


def test_synclr_contrasts_student_queries_with_teacher_keys():
    torch.manual_seed(5)
    method = _synclr()
    terms = method(_batch(), torch.Generator().manual_seed(0), 0)
    assert set(terms) == {"contrastive_global", "contrastive_local", "mim"} and all(torch.isfinite(t) for t in terms.values())
    sum(terms.values()).backward()
    assert method.predictor[0].weight.grad.abs().sum() > 0 and method.projector[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in method.teacher_backbone.parameters())
    with torch.no_grad():  # the keys come from the teacher: changing only the teacher's projector changes the loss
        again = method(_batch(), torch.Generator().manual_seed(0), 0)
        method.teacher_projector[0].weight.mul_(-1)
        changed = method(_batch(), torch.Generator().manual_seed(0), 0)
    assert torch.equal(again["contrastive_global"], terms["contrastive_global"].detach())
    assert not torch.equal(changed["contrastive_global"], again["contrastive_global"])


def test_teacher_export_exports_the_ema_weights_and_is_refused_without_a_teacher(shard_dir, tmp_path):
    from synrep.training.export import load_encoder
    from synrep.training.loop import train

    cfg = load_config(TrainConfig, None, [f"data={shard_dir}", f"out_dir={tmp_path}", "method=synclr", "encoder=teacher",
                                          "backbone.name=vit-micro", "backbone.embed_dim=16", "backbone.depth=1", "backbone.num_heads=2",
                                          "loss.num_prototypes=16", "loss.proj_hidden=16", "loss.patch_head_hidden=16",
                                          "steps=2", "groups_per_batch=4", "log_every=1", "warmup_steps=1", "augment.local_crops=1"])
    encoder = train(cfg)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    backbone, meta = load_encoder(encoder)
    assert meta["weights"] == "teacher"
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, state[f"teacher_backbone.{k}"])
    assert any(not torch.equal(v, state[f"backbone.{k}"]) for k, v in backbone.state_dict().items())
    with pytest.raises(ConfigError, match="config key 'encoder'.*no EMA teacher"):
        load_config(TrainConfig, None, ["method=stablerep", "encoder=teacher"])


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_set_what_they_claim_and_explicit_keys_win(name, tmp_path):
    vit = ["backbone.name=vit-micro"] if METHODS[PRESETS[name]["method"]].needs_patch_tokens else []  # SynCLR masks patch tokens
    if vit:
        with pytest.raises(ValueError, match="backbone.name.*patch tokens"):
            load_config(TrainConfig, None, [f"preset={name}"])  # refused when the config loads, before any data
    cfg = load_config(TrainConfig, None, [f"preset={name}", *vit])
    for key, value in PRESETS[name].items():
        section, _, leaf = key.rpartition(".")
        got = getattr(getattr(cfg, section) if section else cfg, leaf)
        assert got == pytest.approx(value) if isinstance(value, float) else got == value, key
    over = load_config(TrainConfig, None, [f"preset={name}", *vit, "loss.temperature=0.33", "augment.blur_p=0.0", "base_lr=0.123"])
    assert (over.loss.temperature, over.augment.blur_p, over.base_lr) == (0.33, 0.0, 0.123)
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(f"preset: {name}\nloss: {{proj_dim: 7}}\n" + ("backbone: {name: vit-micro}\n" if vit else ""))
    from_file = load_config(TrainConfig, yaml_file, ["loss.proj_layers=1"])
    assert from_file.loss.proj_dim == 7 and from_file.loss.proj_layers == 1 and from_file.method == PRESETS[name]["method"]
    assert apply_preset(load_config(TrainConfig, None, vit), name) == cfg, "applying a preset in code gives what load_config gives"


def test_demo_preset_is_the_default_and_presets_reach_nested_sections():
    from synrep.pipeline import RunConfig

    assert load_config(TrainConfig, None, ["preset=demo"]) == TrainConfig() == load_config(TrainConfig)
    run = load_config(RunConfig, None, ["train.preset=synclr", "train.backbone.name=vit-micro", "train.loss.mask_ratio=0.3"])
    assert run.train.method == "synclr" and run.train.loss.proj_norm == "ln" and run.train.loss.mask_ratio == 0.3
    assert run.train.steps == 1000, "a preset leaves the run's own settings (steps, batch) alone"


@pytest.mark.parametrize("name, norm, hidden", [("stablerep", nn.BatchNorm1d, 4096), ("synclr", nn.LayerNorm, 4096),
                                                ("genrep", None, 256), ("demo", None, 512)])
def test_presets_build_their_heads(name, norm, hidden):
    cfg = load_config(TrainConfig, None, [f"preset={name}"] + (["backbone.name=vit-micro"] if name == "synclr" else []))
    method = build_method(cfg.method, cfg.backbone, cfg.loss, cfg.augment, 10, 100)
    linears = [m for m in method.projector if isinstance(m, nn.Linear)]
    assert linears[0].out_features == hidden
    assert any(isinstance(m, norm) for m in method.projector) if norm else not any(
        isinstance(m, (nn.BatchNorm1d, nn.LayerNorm)) for m in method.projector)
    if name == "synclr":
        assert method.patch_head.last_layer.weight.shape == (8192, 256) and len(method.predictor) > 0


def test_text_transformer_reads_the_last_real_token_and_never_the_padding_or_later_tokens():
    from synrep.training.text_tower import TextTransformer

    torch.manual_seed(0)
    tower = TextTransformer(vocab_size=50, context=8, width=16, layers=2, heads=2).eval()
    tokens = torch.tensor([[5, 6, 7, 0, 0, 0, 0, 0], [5, 6, 7, 9, 0, 0, 0, 0]])
    out = tower(tokens)
    assert out.shape == (2, 16)
    assert not torch.allclose(out[0], out[1]), "a longer caption reads its own last token"
    # Without the causal mask the padding positions would change the last real token's features.
    assert torch.allclose(tower(tokens[:, :4])[0], out[0], atol=1e-6), "the context length after the caption does not matter"
    assert torch.allclose(tower(tokens[:1])[0], out[0], atol=1e-6), "nor the other captions of the batch"


def test_stablerep_plus_with_the_transformer_tower_trains_it(shard_dir, tmp_path):
    cfg = load_config(TrainConfig, None, [f"data={shard_dir}", f"out_dir={tmp_path / 'sp'}", "method=stablerep+", "steps=2",
                                          "groups_per_batch=4", "images_per_group=2", "loss.text_tower=transformer",
                                          "loss.text_layers=1", "loss.text_width=32", "loss.text_heads=2", "loss.text_context=16",
                                          "checkpoint_every=2", "loader.num_workers=0"])
    train(cfg)
    state = torch.load(tmp_path / "sp" / "checkpoint.pt", weights_only=True)["model"]
    torch.manual_seed(cfg.seed)
    fresh = build_method("stablerep+", cfg.backbone, cfg.loss, cfg.augment, 10, 2).state_dict()
    tower_keys = [k for k in state if k.startswith("text_projector.0.")]
    assert tower_keys and any(not torch.equal(state[k], fresh[k]) for k in tower_keys), "the text transformer is trained"
    with pytest.raises(ValueError, match="text_width"):
        load_config(TrainConfig, None, ["method=stablerep+", "loss.text_tower=transformer", "loss.text_width=30", "loss.text_heads=4"])


def test_stablerep_plus_gathers_as_many_text_rows_as_image_rows_when_a_batch_repeats_groups(monkeypatch):
    """Every rank must gather tensors of one shape: a batch padded with a repeated group (after unreadable data)
    has fewer distinct captions, so its text rows are padded to the batch size and dropped after the gather."""
    from synrep.training import methods

    cfg = load_config(TrainConfig, None, ["method=stablerep+"])
    torch.manual_seed(0)
    method = build_method("stablerep+", cfg.backbone, cfg.loss, cfg.augment, 10, 2)
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 0, 0])  # group 0 repeated to fill the batch
    batch = {"group": groups, "text": torch.randn(3, 384)[groups]}
    feats = torch.randn(len(groups), method.backbone.feature_dim, requires_grad=True)
    one_rank = method.extra_losses(batch, feats)["image_text"]
    shapes = []

    def two_ranks(tensor):  # as if a second rank sent the same rows: the shapes must agree across ranks
        shapes.append(tuple(tensor.shape))
        return torch.cat([tensor, tensor])

    monkeypatch.setattr(methods, "gather_with_grad", two_ranks)
    monkeypatch.setattr(methods, "gather_no_grad", two_ranks)
    both = method.extra_losses(batch, feats)["image_text"]
    assert [s[0] for s in shapes] == [len(groups)] * 4, shapes
    assert torch.isfinite(both) and torch.isfinite(one_rank)
    both.backward()
    assert feats.grad is not None and torch.isfinite(feats.grad).all()


def test_stablerep_with_one_image_per_group_and_one_view_is_refused(shard_dir, tmp_path):
    from synrep.training.loop import TrainingError

    cfg = load_config(TrainConfig, None, [f"data={shard_dir}", f"out_dir={tmp_path / 'one'}", "method=stablerep", "steps=1",
                                          "groups_per_batch=4", "images_per_group=1", "loader.num_workers=0"])
    with pytest.raises(TrainingError, match="images_per_group=1 and loss.views=1"):
        train(cfg)
    assert not (tmp_path / "one" / "checkpoint.pt").exists()
