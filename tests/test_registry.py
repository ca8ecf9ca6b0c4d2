"""The registries of pluggable families, the atomic-write helper and the EMA update."""

import pytest
import torch
from torch import nn

from synrep.atomic import atomic_dir, atomic_file, atomic_write_text, remove_stale_temps
from synrep.captions.llm_backends import CAPTION_BACKENDS
from synrep.config import load_config
from synrep.ema import ema_update
from synrep.errors import SynrepError
from synrep.generate.generators import GENERATORS
from synrep.registry import Registry
from synrep.training.backbones import BACKBONES, BackboneConfig, build_backbone
from synrep.training.loop import TrainConfig


def test_registry_specs_are_checked_without_building_anything():
    reg = Registry("widget")
    built = []
    reg.register("plain", help="no argument")(lambda arg: built.append(arg) or "plain")
    reg.register("folder", argument="<folder>", optional_argument=True)(lambda arg: f"folder {arg}")
    reg.register("url", argument="<url>", pattern=r"https?://\S+")(lambda arg: f"url {arg}")
    assert reg.choices() == "plain, folder[:<folder>], url:<url>"
    assert [reg.problem(s) for s in ("plain", "folder", "folder:/x", "url:http://h")] == [None] * 4
    assert "not a known widget" in reg.problem("nope") and "plain, folder" in reg.problem("nope")
    assert "takes no argument" in reg.problem("plain:3")
    assert "needs an argument" in reg.problem("url")
    assert "not a valid <url>" in reg.problem("url:ftp://h")
    assert "is empty" in reg.problem("folder:")
    assert built == []
    assert reg.build("folder:/data") == "folder /data" and reg.build("folder") == "folder None"
    with pytest.raises(SynrepError, match="not a known widget"):
        reg.build("nope")
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("plain")(lambda arg: None)


def test_a_new_backbone_is_one_function_and_one_registration():
    class TinyMLP(nn.Module):
        def __init__(self, cfg: BackboneConfig):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(cfg.in_channels * cfg.image_size ** 2, 16))
            self.feature_dim = 16

        def forward(self, x):
            return self.net(x)

    BACKBONES.register("tiny-mlp", help="an MLP on pixels", patch_tokens=False)(lambda _, cfg: TinyMLP(cfg))
    try:
        cfg = load_config(TrainConfig, None, ["backbone.name=tiny-mlp"])
        assert build_backbone(cfg.backbone)(torch.zeros(2, 1, 28, 28)).shape == (2, 16)
        with pytest.raises(ValueError, match="backbone.name.*patch tokens"):
            load_config(TrainConfig, None, ["backbone.name=tiny-mlp", "method=synclr"])
    finally:
        BACKBONES._entries.pop("tiny-mlp")


def test_shipped_registries_declare_what_stages_ask():
    assert BACKBONES.names_with("patch_tokens") == ["vit-micro", "vit-tiny", "vit-small", "vit-base", "vit-large"]
    assert CAPTION_BACKENDS.names_with("remote") == ["openai:<http(s)://host:port>"]
    assert not CAPTION_BACKENDS.traits("template")["language_model"] and CAPTION_BACKENDS.traits("hf:/m")["language_model"]
    assert GENERATORS.problem("embedded") is None and GENERATORS.problem("embedded:/x") is None
    assert "needs an argument" in GENERATORS.problem("diffusers")


def test_atomic_file_keeps_the_old_file_when_a_write_fails(tmp_path):
    target = tmp_path / "out.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_file(target, "w") as fh:
            fh.write("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
    (tmp_path / ".out.json.tmp999").write_text("left by a hard kill")
    assert remove_stale_temps(target) == 1 and target.read_text() == "old"


def test_atomic_dir_swaps_whole_folders(tmp_path):
    folder = tmp_path / "encoder"
    with atomic_dir(folder) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(folder) as tmp:
            (tmp / "a").write_text("2")
            raise RuntimeError("killed")
    assert (folder / "a").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["encoder"]


def test_ema_update_moves_parameters_and_copies_buffers():
    torch.manual_seed(0)
    model, average = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)), nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    model[1].running_mean.fill_(5.0)
    before = average[0].weight.clone()
    ema_update(average, model, 0.9)
    assert torch.allclose(average[0].weight, 0.9 * before + 0.1 * model[0].weight)
    assert torch.equal(average[1].running_mean, model[1].running_mean)
    with pytest.raises(ValueError, match="different architecture"):
        ema_update(nn.Linear(3, 3), model, 0.9)
