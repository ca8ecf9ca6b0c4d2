import re
from dataclasses import dataclass, field

import pytest
import yaml

from synrep.config import ConfigError, load_config, save_config
from synrep.training.loop import TrainConfig


@dataclass
class Inner:
    name: str = "cnn"
    size: int = 28


@dataclass
class Outer:
    steps: int = 10
    lr: float = 0.1
    flag: bool = False
    tags: list[str] = field(default_factory=lambda: ["a"])
    inner: Inner = field(default_factory=Inner)


def test_overrides_change_values_with_types():
    cfg = load_config(Outer, None, ["steps=5", "lr=1e-3", "flag=true", "inner.name=vit-micro", "tags=[x,y]"])
    assert cfg.steps == 5 and cfg.lr == pytest.approx(1e-3) and cfg.flag is True
    assert cfg.inner.name == "vit-micro" and cfg.tags == ["x", "y"]
    assert Outer().inner.name == "cnn", "defaults must not be mutated"


def test_unknown_key_names_key_and_valid_choices():
    with pytest.raises(ConfigError) as err:
        load_config(Outer, None, ["stepz=3"])
    assert "stepz" in str(err.value) and "steps" in str(err.value) and "did you mean" in str(err.value)
    with pytest.raises(ConfigError, match="inner.nmae"):
        load_config(Outer, None, ["inner.nmae=x"])


def test_wrong_type_is_an_error():
    with pytest.raises(ConfigError, match="steps.*integer"):
        load_config(Outer, None, ["steps=many"])
    with pytest.raises(ConfigError, match="flag"):
        load_config(Outer, None, ["flag=maybe"])


def test_yaml_then_overrides_and_resolved_config_written(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"steps": 7, "inner": {"size": 32}}))
    cfg = load_config(Outer, path, ["lr=0.5"])
    assert (cfg.steps, cfg.inner.size, cfg.lr) == (7, 32, 0.5)
    written = save_config(cfg, tmp_path / "run")
    assert yaml.safe_load(written.read_text()) == {"steps": 7, "lr": 0.5, "flag": False, "tags": ["a"], "inner": {"name": "cnn", "size": 32}}


def test_bad_yaml_key_names_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  colour: red\n")
    with pytest.raises(ConfigError, match=r"c.yaml.*inner.colour"):
        load_config(Outer, path)


@pytest.mark.parametrize("command, override, key", [
    ("run", "baselines=[pixels,foo]", "baselines[1]"),
    ("run", "train.images_per_group=6", "train.images_per_group"),
    ("run", "train.steps=0", "train.steps"),
    ("run", "generate.guidance_scale=nan", "generate.guidance_scale"),
    ("generate", "scheduler=plms", "scheduler"),
    ("train", "augment.crop_scale_min=0", "augment.crop_scale_min"),
])
def test_every_value_is_checked_when_the_config_loads(command, override, key):
    from synrep.cli import _config_class

    with pytest.raises(ConfigError, match=f"config key '{re.escape(key)}'"):
        load_config(_config_class(command, None), None, [override])


def test_binary_config_file_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ConfigError, match="bad.yaml is not UTF-8"):
        load_config(TrainConfig, bad)


def test_yaml_booleans_are_read_back_as_the_words_a_choice_field_allows(tmp_path):
    from synrep.captions.stage import CaptionsConfig
    from synrep.training.loop import TrainConfig

    # YAML 1.1 reads yes/no/off as booleans; a choice field of those words takes the word back
    assert load_config(CaptionsConfig, None, ["chat=yes"]).chat == "yes"
    assert load_config(CaptionsConfig, None, ["chat=no"]).chat == "no"
    cfg = load_config(TrainConfig, None, ["speed.compile=off", "speed.fused_optimizer=0", "speed.tf32=1"])
    assert (cfg.speed.compile, cfg.speed.fused_optimizer, cfg.speed.tf32) == ("off", False, True)
    (tmp_path / "c.yaml").write_text("chat: yes\n")
    assert load_config(CaptionsConfig, str(tmp_path / "c.yaml"), []).chat == "yes"
    with pytest.raises(ConfigError, match="chat"):
        load_config(CaptionsConfig, None, ["chat=maybe"])
    with pytest.raises(ConfigError, match="expected true or false, got 2"):
        load_config(TrainConfig, None, ["speed.tf32=2"])
