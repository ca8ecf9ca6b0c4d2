import json

import pytest

from synrep.config import load_config
from synrep.study import StudyConfig, run_study


@pytest.mark.slow
def test_study_rows_come_from_one_command_and_resume(tmp_path, fashion_mnist_available):
    if not fashion_mnist_available:
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    cfg = load_config(StudyConfig, None, [
        f"out_dir={tmp_path}", "rows=[raw-pixels,stablerep-synthetic,genrep-latent-stablerep]", "guidance_sweep=[1.0]",
        "latent_sigma_sweep=[1.0]",
        "captions_per_concept=3", "images_per_caption=2", "steps=3", "groups_per_batch=8", "images_per_group=2",
        "warmup_steps=1", "eval.probe_train_size=600", "eval.protocols=[knn]", "backbone.name=cnn"])
    report = run_study(cfg)
    rows = json.loads((tmp_path / "study.json").read_text())["rows"]
    assert [r["row"] for r in rows] == ["raw-pixels", "stablerep-synthetic", "genrep-latent-stablerep", "stablerep-guidance-1",
                                        "genrep-latent-sigma-1"]
    assert all(r["knn_top1"] > 10 for r in rows) and rows[1]["steps"] == 3
    text = report.read_text()
    assert "stablerep-guidance-1" in text and "Reproduce" in text
    assert (tmp_path / "data" / "shards_latent_g2" / "index.json").exists() and (tmp_path / "data" / "shards_g1" / "index.json").exists()
    assert (tmp_path / "data" / "shards_latent_g2_s1" / "index.json").exists()
    before = (tmp_path / "rows" / "stablerep-synthetic" / "row.json").read_text()
    run_study(cfg)  # everything complete: skipped, same rows
    assert (tmp_path / "rows" / "stablerep-synthetic" / "row.json").read_text() == before


def test_study_plan_sweeps_guidance_and_genrep_sigma_and_checks_values():
    from synrep.study import _row_plan

    cfg = load_config(StudyConfig, None, ["rows=[stablerep-synthetic,genrep-latent-stablerep]", "guidance_sweep=[2.0,4.0]",
                                          "latent_sigma_sweep=[0.25,0.5,2.0]"])
    plan = dict(_row_plan(cfg))
    assert list(plan) == ["stablerep-synthetic", "genrep-latent-stablerep", "stablerep-guidance-4", "genrep-latent-sigma-0.25",
                          "genrep-latent-sigma-2"]
    assert plan["genrep-latent-sigma-2"]["data"] == ("latent", 2.0, 2.0) and plan["genrep-latent-stablerep"]["data"][2] == 0.5
    no_genrep = load_config(StudyConfig, None, ["rows=[stablerep-synthetic]", "guidance_sweep=[]"])
    assert [name for name, _ in _row_plan(no_genrep)] == ["stablerep-synthetic"]
    with pytest.raises(ValueError, match="latent_sigma_sweep"):
        load_config(StudyConfig, None, ["latent_sigma_sweep=[0.5,0]"])
