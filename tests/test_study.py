import dataclasses
import json

import numpy as np
import pytest

from synrep.config import load_config
from synrep.study import StudyConfig, changed_settings, expected_seconds, interval, plan_rows, run_settings, run_study


@pytest.mark.slow
def test_study_sections_and_seeds_come_from_one_command_and_resume(tmp_path, fashion_mnist_available):
    if not fashion_mnist_available:
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    cfg = load_config(StudyConfig, None, [
        f"out_dir={tmp_path}", "rows=[raw-pixels,stablerep-synthetic]", "sections=[methods,images_per_caption]",
        "images_per_caption_scaling=[1,2]", "seeds=[0,1]", "captions_per_concept=3", "images_per_caption=2", "steps=3",
        "groups_per_batch=8", "images_per_group=2", "warmup_steps=1", "eval.probe_train_size=600", "eval.protocols=[knn]",
        "backbone.name=cnn"])
    report = run_study(cfg)
    study = json.loads((tmp_path / "study.json").read_text())
    names = ["raw-pixels", "stablerep-synthetic", "stablerep-n1", "stablerep-n2"]
    assert [r["row"] for r in study["runs"]] == [n for n in names for _ in (0, 1)]
    assert all(r["knn_top1"] > 10 for r in study["runs"])
    assert [r["seed"] for r in study["runs"][:2]] == [0, 1]
    trained = [r for r in study["runs"] if r["row"] == "stablerep-synthetic"]
    assert trained[0]["encoder"] != trained[1]["encoder"], "each seed trains its own encoder"
    text = report.read_text()
    assert "## methods" in text and "## images per caption" in text and "±" in text and "Reproduce" in text
    for section in ("methods", "images_per_caption"):
        assert (tmp_path / f"study_{section}.png").exists()
    (data,) = (tmp_path / "data").iterdir()  # one folder per generator and caption source
    assert data.name.startswith("template-embedded-")
    assert (data / "shards_c3_n2_g2" / "index.json").exists() and (data / "shards_c6_n1_g2" / "index.json").exists()
    before = (tmp_path / "rows" / "stablerep-synthetic" / "seed-1" / "row.json").read_text()
    run_study(cfg)  # everything complete: skipped, same runs
    assert (tmp_path / "rows" / "stablerep-synthetic" / "seed-1" / "row.json").read_text() == before


def test_study_plan_covers_the_sections_with_fair_batches():
    cfg = load_config(StudyConfig, None, ["rows=[simclr-synthetic,stablerep-synthetic,genrep-latent-stablerep]",
                                          "guidance_sweep=[2.0,4.0]", "latent_sigma_sweep=[0.25,2.0]"])
    rows = {r.name: r for r in plan_rows(cfg)}
    assert list(rows) == ["simclr-synthetic", "stablerep-synthetic", "genrep-latent-stablerep", "stablerep-guidance-2",
                          "stablerep-guidance-4", "genrep-latent-sigma-0.25", "genrep-latent-sigma-2", "stablerep-captions-25",
                          "stablerep-captions-50", "stablerep-captions-100", "stablerep-captions-400", "stablerep-n1",
                          "stablerep-n2", "stablerep-n4", "stablerep-n8", "stablerep-uniform", "stablerep-redraw-below-0.5",
                          "stablerep-rare-concepts"]
    simclr = rows["simclr-synthetic"]
    assert (simclr.images_per_group, simclr.views, simclr.groups_per_batch) == (1, 2, 128), "one image per caption per batch"
    assert rows["genrep-latent-sigma-2"].data.sigma == 2.0 and rows["genrep-latent-stablerep"].data.sigma == 0.5
    budget = {n: rows[f"stablerep-n{n}"].data for n in (1, 2, 4, 8)}
    assert {d.captions * d.images for d in budget.values()} == {400}, "a fixed image budget"
    assert rows["stablerep-n8"].images_per_group * rows["stablerep-n8"].groups_per_batch == 256
    assert rows["stablerep-captions-400"].data.captions == 400 and expected_seconds(cfg, list(rows.values())) > 0
    unshared = [dataclasses.replace(r, run_as=None) for r in rows.values()]
    assert expected_seconds(cfg, unshared) > expected_seconds(cfg, list(rows.values())), "shared rows are not counted twice"
    # a sweep's point that equals a methods row trains once: guidance 2, sigma 0.5, 100 captions, n = 4, uniform
    shared = {name: row.run_as for name, row in rows.items() if row.run_as}
    assert shared == {"stablerep-guidance-2": "stablerep-synthetic", "stablerep-captions-100": "stablerep-synthetic",
                      "stablerep-n4": "stablerep-synthetic", "stablerep-uniform": "stablerep-synthetic"}, shared
    with_half = {r.name: r.run_as for r in plan_rows(load_config(StudyConfig, None, ["sections=[sigma]"]))}
    assert with_half == {"genrep-latent-sigma-0.25": None, "genrep-latent-sigma-0.5": "genrep-latent-stablerep",
                         "genrep-latent-sigma-1": None}
    with pytest.raises(ValueError, match="latent_sigma_sweep"):
        load_config(StudyConfig, None, ["latent_sigma_sweep=[0.5,0]"])
    with pytest.raises(ValueError, match="images_per_caption_scaling"):
        load_config(StudyConfig, None, ["images_per_caption_scaling=[3]"])
    with pytest.raises(ValueError, match="seeds"):
        load_config(StudyConfig, None, ["seeds=[1,1]"])
    # a repeated sweep value or row would make two rows of one name, pooled as if they were more seeds
    for override, key in (("guidance_sweep=[2,2.0]", "guidance_sweep"), ("rows=[raw-pixels,raw-pixels]", "rows"),
                          ("caption_scaling=[25,25]", "caption_scaling"), ("sections=[methods,methods]", "sections")):
        with pytest.raises(ValueError, match=key):
            load_config(StudyConfig, None, [override])
    with pytest.raises(ValueError, match="eval.protocols.*linear, knn"):
        load_config(StudyConfig, None, ["eval.protocols=[fewshot]"])


def test_a_finished_row_is_reused_only_with_the_same_settings():
    cfg = load_config(StudyConfig, None, ["rows=[stablerep-synthetic]", "sections=[methods]"])
    (row,) = plan_rows(cfg)
    settings = run_settings(cfg, row)
    assert changed_settings({"settings": settings}, settings) == []
    for override, key in (("steps=300", "steps"), ("base_lr=1e-3", "base_lr"), ("backbone.name=cnn", "backbone"),
                          ("eval.knn_k=10", "eval"), ("guidance_scale=4", "data"), ("groups_per_batch=32", "groups_per_batch")):
        other = load_config(StudyConfig, None, ["rows=[stablerep-synthetic]", "sections=[methods]", override])
        assert changed_settings({"settings": run_settings(other, plan_rows(other)[0])}, settings) == [key], override
    # how fast or where the features are computed does not change the scores: no rerun
    for override in ("eval.num_workers=0", "eval.batch_size=64", "eval.device=cpu", "eval.cache_dir=/tmp/x", "num_threads=1"):
        other = load_config(StudyConfig, None, ["rows=[stablerep-synthetic]", "sections=[methods]", override])
        assert changed_settings({"settings": run_settings(other, plan_rows(other)[0])}, settings) == [], override
    # a row.json from before settings were saved: compared on its data and steps
    legacy = {"data": settings["data"], "data_root": settings["data_root"], "steps": 300}
    assert changed_settings(legacy, settings) == ["steps"]
    assert changed_settings({**legacy, "steps": cfg.steps}, settings) == []


def test_a_row_rerun_with_other_settings_keeps_the_old_run_aside(tmp_path, fashion_mnist_available):
    if not fashion_mnist_available:
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    base = [f"out_dir={tmp_path}", "rows=[raw-pixels]", "sections=[methods]", "seeds=[0]", "eval.probe_train_size=600",
            "eval.protocols=[knn]", "eval.knn_ks=[5]"]
    run_study(load_config(StudyConfig, None, [*base, "eval.knn_k=5"]))
    seed_dir = tmp_path / "rows" / "raw-pixels" / "seed-0"
    first = json.loads((seed_dir / "row.json").read_text())
    assert first["settings"]["eval"]["knn_k"] == 5
    run_study(load_config(StudyConfig, None, [*base, "eval.knn_k=1"]))
    again = json.loads((seed_dir / "row.json").read_text())
    assert again["settings"]["eval"]["knn_k"] == 1, "run again with the new settings"
    kept = json.loads((tmp_path / "rows" / "raw-pixels" / "seed-0.replaced-1" / "row.json").read_text())
    assert kept == first, "the earlier run is kept, not overwritten"
    # a run stopped before it finished (settings.json, no row.json) is resumed only with the settings it started with
    (seed_dir / "row.json").unlink()
    run_study(load_config(StudyConfig, None, [*base, "eval.knn_k=5"]))
    stopped = tmp_path / "rows" / "raw-pixels" / "seed-0.replaced-2"
    assert json.loads((stopped / "settings.json").read_text())["eval"]["knn_k"] == 1 and not (stopped / "row.json").exists()
    assert json.loads((seed_dir / "row.json").read_text())["settings"]["eval"]["knn_k"] == 5


def test_paired_differences_match_seeds_within_a_section(tmp_path):
    from synrep.study import paired_differences, write_study_report

    cfg = load_config(StudyConfig, None, [f"out_dir={tmp_path}", "sections=[methods]", "eval_tasks=[mnist]"])
    base = {0: 50.0, 1: 40.0, 2: 60.0}  # seeds differ a lot; the per-seed gap is nearly constant
    gap = {0: 3.0, 1: 4.0, 2: 5.0}

    def run(row, seed, score, section="methods", steps=300):
        return {"row": row, "section": section, "x": 4.0 if section == "guidance" else None, "method": row, "seed": seed, "steps": steps, "train_seconds": 1.0,
                "scores": {cfg.eval.dataset: {"linear_top1": score, "knn_top1": score}, "mnist": {"linear_top1": 90.0, "knn_top1": 90.0}}}

    runs = [run("raw-pixels", s, 70.0, steps=0) for s in base] + [run("stablerep-synthetic", s, base[s]) for s in base] \
        + [run("stablerep+-synthetic", s, base[s] + gap[s]) for s in base] + [run("stablerep-guidance-4", s, 0.0, "guidance") for s in base]
    (pair,) = paired_differences(runs, [cfg.eval.dataset, "mnist"], "linear_top1")
    assert (pair["row"], pair["minus"], pair["seeds"]) == ("stablerep+-synthetic", "stablerep-synthetic", 3)
    mean, half = pair[cfg.eval.dataset]
    assert mean == pytest.approx(4.0) and half == pytest.approx(interval([3.0, 4.0, 5.0])[1])
    assert half < interval([base[s] + gap[s] for s in base])[1] / 5, "pairing removes the seeds' common spread"
    assert pair["mnist"] == (0.0, 0.0)
    text = write_study_report(tmp_path, cfg, runs).read_text()
    assert "| stablerep+-synthetic | stablerep-synthetic | 4.00 ± 2.48 | 0.00 ± 0.00 | 3 |" in text
    assert "| raw-pixels | 70.00 ± 0.00 |" in text, "several seeds with one score still show their (zero) interval"
    assert json.loads((tmp_path / "study.json").read_text())["paired"][0]["minus"] == "stablerep-synthetic"


def test_the_rare_concepts_mean_follows_the_current_list():
    from synrep.study import _rare_labels, with_rare_mean

    per_class = {str(k): float(10 * k) for k in range(10)}
    cfg = load_config(StudyConfig, None, ["rare_concepts=[sandal,shirt]"])
    labels = _rare_labels(cfg)
    assert sorted(labels) == [5, 6]  # sandal and shirt in Fashion-MNIST's label order
    assert with_rare_mean({"per_class_linear_top1": per_class}, labels)["rare_linear_top1"] == 55.0
    assert with_rare_mean({"per_class_linear_top1": per_class}, [9])["rare_linear_top1"] == 90.0
    stale = {"rare_linear_top1": 12.0}  # saved by an older study for some other list: not reported as this one's
    assert with_rare_mean(stale, labels)["rare_linear_top1"] is None


def test_world_captions_are_never_asked_for_more_than_they_have():
    with pytest.raises(ValueError, match="caption_scaling.*360 distinct"):
        load_config(StudyConfig, None, ["preset=world", "caption_scaling=[20,400]"])
    with pytest.raises(ValueError, match="images_per_caption_scaling.*needs 640"):
        load_config(StudyConfig, None, ["preset=world", "captions_per_concept=160", "sections=[images_per_caption]"])
    with pytest.raises(ValueError, match="rare_weight.*needs 438"):  # 320 x 10 / (7 + 3 x 0.1)
        load_config(StudyConfig, None, ["preset=world", "captions_per_concept=320", "sections=[curation]"])
    load_config(StudyConfig, None, ["preset=world"])  # the preset itself fits
    from synrep.captions.stage import CaptionsConfig

    with pytest.raises(ValueError, match="per_concept.*360 distinct"):
        load_config(CaptionsConfig, None, ["backend=world", "per_concept=361", "dedup=text"])
    assert load_config(CaptionsConfig, None, ["backend=world", "per_concept=361", "dedup=none"]).per_concept == 361


def test_interval_is_the_t_interval():
    mean, half = interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and abs(half - 4.302652729749462 * 1.0 / np.sqrt(3)) < 1e-9
    assert interval([5.0]) == (5.0, 0.0)


def test_world_preset_sets_the_worlds_generator_captions_and_tasks_under_explicit_keys():
    cfg = load_config(StudyConfig, None, ["preset=world", "steps=7"])
    assert (cfg.generator, cfg.caption_backend, cfg.caption_dedup) == ("embedded-world", "world", "text")
    assert cfg.eval.dataset == "fmnist-world:class" and "fmnist-world:class-pattern" in cfg.eval_tasks
    assert (cfg.backbone.image_size, cfg.backbone.patch_size, cfg.steps, cfg.out_dir) == (40, 8, 7, "runs/study-world")
    assert max(cfg.caption_scaling) <= 360 and max(cfg.caption_scaling) >= 16 * min(cfg.caption_scaling)
    fashion = load_config(StudyConfig, None, [])
    assert expected_seconds(cfg, plan_rows(cfg)) != expected_seconds(fashion, plan_rows(fashion))
    assert load_config(StudyConfig, None, ["preset=world", "generator=embedded"]).generator == "embedded"
    world_judge = plan_rows(load_config(StudyConfig, None, ["preset=world", "sections=[curation]"]))[1].data
    assert world_judge.judge_backgrounds == "noisy" and world_judge.name.endswith("-noisy"), \
        "the world's generator draws grey, noisy backgrounds: its curation classifier learns them too"
    with pytest.raises(ValueError, match="caption_backend"):
        load_config(StudyConfig, None, ["caption_backend=gpt"])


def test_curation_section_keeps_the_image_count_and_reports_the_rare_concepts(tmp_path):
    from synrep.study import _captions, write_study_report

    cfg = load_config(StudyConfig, None, [f"out_dir={tmp_path}", "sections=[curation]", "captions_per_concept=20",
                                          "rare_concepts=[sandal,shirt]", "rare_weight=0.1", "curate_threshold=0.6"])
    rows = plan_rows(cfg)
    assert [r.name for r in rows] == ["stablerep-uniform", "stablerep-redraw-below-0.6", "stablerep-rare-concepts"]
    uniform, redraw, rare = (r.data for r in rows)
    assert redraw.redraw_below == 0.6 and rare.rare and len({uniform.name, redraw.name, rare.name}) == 3
    other = plan_rows(load_config(StudyConfig, None, ["sections=[curation]", "rare_concepts=[sandal]"]))[2].data
    assert other.name != rare.name, "another rare mix is another data set"
    import json
    from collections import Counter

    counts = Counter(json.loads(line)["concept"] for line in _captions(cfg, 20, rare=rare.rare).read_text().splitlines())
    assert counts["sandal"] == counts["shirt"] < counts["coat"] / 5, counts
    assert abs(sum(counts.values()) - 200) <= 10, "the same total as the uniform mix"
    runs = [{"row": r.name, "section": "curation", "x": None, "method": "stablerep", "seed": s, "train_seconds": 1.0,
             "scores": {cfg.eval.dataset: {"linear_top1": 80.0 + s, "knn_top1": 70.0}}, "rare_linear_top1": 50.0 + 2 * s}
            for r in rows for s in (0, 1, 2)]
    text = write_study_report(tmp_path, cfg, runs).read_text()
    assert "rare concepts linear" in text and "52.00 ± 4.97" in text  # mean of 50, 52, 54 and its t-interval
    assert (tmp_path / "study_curation.png").exists()
    with pytest.raises(ValueError, match="rare_concepts.*'unicorn'"):
        load_config(StudyConfig, None, ["rare_concepts=[unicorn]"])
