import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import pytest

from synrep.generate.generators import GeneratorSpecError
from synrep.config import load_config
from synrep.generate.curation import CurationConfig
from synrep.generate.stage import GenerateConfig, regenerate_image, run_generate
from synrep.shards import list_shards, read_shard


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from tiny_sd import build_tiny_sd_pipeline

    return build_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny-sd"))


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).glob("shard-*"))}


def test_diffusers_folder_end_to_end_and_single_image_regeneration(tiny_sd, captions_file, tmp_path):
    cfg = GenerateConfig(captions=str(captions_file), out_dir=str(tmp_path / "sd"), generator=f"diffusers:{tiny_sd}",
                         limit_captions=5, images_per_caption=2, steps=3, store_size=32, captions_per_shard=3,
                         batch_captions=2, scheduler="dpm", negative_prompt="blurry")
    run_generate(cfg)
    index = json.loads((tmp_path / "sd" / "index.json").read_text())
    assert index["num_groups"] == 5 and index["num_images"] == 10 and index["num_shards"] == 2
    assert index["image_shape"] == [32, 32, 3] and (tmp_path / "sd" / "preview.png").exists()
    sample = read_shard(list_shards(tmp_path / "sd")[1])[0]
    meta = sample.meta
    assert meta["generator"] == f"diffusers:{tiny_sd}" and meta["scheduler"] == "dpm" and len(meta["image_seeds"]) == 2
    assert meta["caption_id"] == 3 and meta["concept"] and meta["guidance_scale"] == 2.5
    assert not np.array_equal(sample.images[0], sample.images[1]), "each image has its own seed"
    alone = regenerate_image(cfg, meta["caption"], meta["caption_id"], 1)
    assert np.abs(alone.astype(int) - sample.images[1].astype(int)).max() <= 1


def test_latent_views_are_closer_to_their_anchor(random_generator_dir, captions_file, tmp_path):
    def spread(views, sigma=0.3):
        out = tmp_path / views
        run_generate(GenerateConfig(captions=str(captions_file), out_dir=str(out), generator=f"embedded:{random_generator_dir}",
                                    limit_captions=6, steps=3, views=views, sigma=sigma, preview=False))
        groups = [sample for shard in list_shards(out) for sample in read_shard(shard)]
        d = []
        for group in groups:
            x = group.images.reshape(4, -1).astype(float)
            d.append(np.mean([np.abs(x[i] - x[j]).mean() for i in range(4) for j in range(i + 1, 4)]))
        return np.mean(d), groups[0].meta

    latent, meta = spread("latent")
    independent, _ = spread("independent")
    assert latent < 0.8 * independent
    assert meta["views"] == "latent" and meta["sigma"] == 0.3 and "anchor_seed" in meta
    assert meta["anchor_view"] is True and meta["latent_noise"] == "truncated"


def test_latent_noise_is_the_anchor_plus_truncated_neighbours_at_unit_scale():
    from synrep.generate.stage import OFFSET_VARIANCE, initial_noise

    shape = (4, 32, 32)
    cfg = GenerateConfig(views="latent", sigma=0.5, images_per_caption=64)
    members, meta = initial_noise(cfg, 7, shape)
    anchor = torch.randn(shape, generator=torch.Generator().manual_seed(meta["anchor_seed"]))
    assert torch.equal(members[0], anchor), "GenRep: the anchor is one of the views"
    scale = (1 + 0.25 * OFFSET_VARIANCE["truncated"]) ** 0.5
    offsets = (members[1:] * scale - anchor) / 0.5
    assert offsets.abs().max() <= 2.0 + 1e-4, "offsets are truncated to [-2, 2]"
    assert abs(members[1:].var().item() - 1.0) < 0.05, "the sampler still gets unit-variance noise"
    plain, _ = initial_noise(GenerateConfig(views="latent", sigma=0.5, images_per_caption=64, latent_noise="gaussian",
                                            latent_anchor_view=False), 7, shape)
    assert not torch.equal(plain[0], anchor) and ((plain * 1.25 ** 0.5 - anchor) / 0.5).abs().max() > 2.5
    again, _ = initial_noise(cfg, 7, shape)
    assert torch.equal(again, members), "seeded: the same caption id gives the same noise"


def test_bad_inputs_are_clear_and_leave_outputs_intact(random_generator_dir, captions_file, tmp_path):
    gen = f"embedded:{random_generator_dir}"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"caption": "a coat"}\n\n{"caption": 3}\n')
    with pytest.raises(ValueError, match="line 3"):
        run_generate(GenerateConfig(captions=str(bad), out_dir=str(tmp_path / "x"), generator=gen))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_generate(GenerateConfig(captions=str(tmp_path / "none.jsonl"), out_dir=str(tmp_path / "x"), generator=gen))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty"):
        run_generate(GenerateConfig(captions=str(tmp_path / "empty.jsonl"), out_dir=str(tmp_path / "x"), generator=gen))
    for kwargs, message in [({"generator": "dalle"}, "not a known generator"), ({"generator": f"diffusers:{tmp_path}"}, "not a diffusers pipeline"),
                            ({"images_per_caption": 0}, "images_per_caption"), ({"guidance_scale": -1}, "guidance_scale"),
                            ({"guidance_scale": float("nan")}, "guidance_scale"), ({"limit_captions": -198}, "limit_captions"),
                            ({"height": 30}, "28x28"), ({"views": "latent", "sigma": 0}, "sigma")]:
        with pytest.raises((ValueError, GeneratorSpecError), match=message):
            run_generate(GenerateConfig(captions=str(captions_file), out_dir=str(tmp_path / "x"), **{"generator": gen, **kwargs}))
    good = GenerateConfig(captions=str(captions_file), out_dir=str(tmp_path / "good"), generator=gen, limit_captions=4, steps=2, preview=False)
    run_generate(good)
    before = _digests(tmp_path / "good")
    stale = tmp_path / "good" / ".shard-00000.tar.tmp4242"  # left by a run killed while writing
    stale.write_bytes(b"partial")
    run_generate(good)
    assert not stale.exists() and _digests(tmp_path / "good") == before
    assert not (tmp_path / "good" / "generate_config.json").exists(), "config.yaml is the one record of the settings"
    with pytest.raises(ValueError, match="different settings"):
        run_generate(GenerateConfig(**{**good.__dict__, "guidance_scale": 7.0}))
    assert _digests(tmp_path / "good") == before


def _cli(args, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "synrep.cli", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs)


@pytest.mark.slow
def test_sigkill_and_rerun_equals_uninterrupted_byte_for_byte(random_generator_dir, captions_file, tmp_path):
    common = [f"captions={captions_file}", f"generator=embedded:{random_generator_dir}", "steps=4", "captions_per_shard=4",
              "batch_captions=2", "preview=false", "num_threads=1"]
    assert _cli(["generate", f"out_dir={tmp_path / 'ref'}", *common]).wait() == 0
    killed = tmp_path / "killed"
    proc = _cli(["generate", f"out_dir={killed}", *common])
    deadline = time.time() + 120
    while time.time() < deadline and len(list(killed.glob("shard-*.json"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(killed.glob("shard-*.json")))
    assert 0 < done_before < 10, "the kill landed mid-run"
    assert [p.name for p in list_shards(killed)] == sorted(p.name for p in killed.glob("shard-*.tar"))
    assert _cli(["generate", f"out_dir={killed}", *common]).wait() == 0
    assert _digests(killed) == _digests(tmp_path / "ref")
    assert not list(killed.glob(".*.tmp*"))


@pytest.mark.slow
def test_two_rank_torchrun_equals_one_rank(random_generator_dir, captions_file, tmp_path):
    common = [f"captions={captions_file}", f"generator=embedded:{random_generator_dir}", "steps=3", "captions_per_shard=5",
              "preview=false", "num_threads=1"]
    assert _cli(["generate", f"out_dir={tmp_path / 'one'}", *common]).wait() == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517", "-m", "synrep.cli"]
    result = subprocess.run([*torchrun, "generate", f"out_dir={tmp_path / 'two'}", *common], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert _digests(tmp_path / "two") == _digests(tmp_path / "one")
    assert json.loads((tmp_path / "two" / "index.json").read_text())["num_groups"] == 40


def test_a_failing_batch_fails_only_its_shard_and_a_rerun_completes(random_generator_dir, captions_file, tmp_path, monkeypatch):
    from synrep.generate import generators

    cfg = GenerateConfig(captions=str(captions_file), out_dir=str(tmp_path / "run"), generator=f"embedded:{random_generator_dir}",
                         limit_captions=12, captions_per_shard=4, batch_captions=2, steps=2, preview=False)
    real_draw = generators.EmbeddedT2I.draw
    calls = {"n": 0}

    def flaky(self, captions, noise, settings, per_caption=1):
        calls["n"] += 1
        if calls["n"] == 3:  # the first batch of the second shard
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_draw(self, captions, noise, settings, per_caption)

    monkeypatch.setattr(generators.EmbeddedT2I, "draw", flaky)
    with pytest.raises(RuntimeError, match="1 shard\\(s\\) failed: shard-00001.tar"):
        run_generate(cfg)
    assert [p.name for p in list_shards(tmp_path / "run")] == ["shard-00000.tar", "shard-00002.tar"]
    assert not list((tmp_path / "run").glob(".*tmp"))
    monkeypatch.setattr(generators.EmbeddedT2I, "draw", real_draw)
    run_generate(cfg)
    reference = GenerateConfig(**{**cfg.__dict__, "out_dir": str(tmp_path / "ref")})
    run_generate(reference)
    assert _digests(tmp_path / "run") == _digests(tmp_path / "ref")


def test_a_shard_failing_on_another_rank_leaves_the_set_unfinished(random_generator_dir, captions_file, tmp_path, monkeypatch):
    from synrep.generate import generators, stage

    cfg = GenerateConfig(captions=str(captions_file), out_dir=str(tmp_path / "run"), generator=f"embedded:{random_generator_dir}",
                         limit_captions=8, captions_per_shard=4, batch_captions=2, steps=2, preview=False)
    run_generate(cfg)
    assert stage.is_complete(tmp_path / "run")
    real_sum = stage.all_reduce_sum_
    sums = []

    def other_rank_failed(tensor):  # what rank 0 sees when rank 1's shard failed: one more failure in the sum
        sums.append(tensor.clone())
        return real_sum(tensor) + (1 if len(sums) == 2 else 0)

    monkeypatch.setattr(stage, "all_reduce_sum_", other_rank_failed)
    (tmp_path / "run" / "shard-00001.tar").unlink()  # a shard to write again: the old done-marker must go
    with pytest.raises(RuntimeError, match="1 shard\\(s\\) failed on other ranks"):
        run_generate(cfg)
    assert not stage.is_complete(tmp_path / "run"), "rank 0 must not mark a set done that another rank left incomplete"
    assert [int(t.item()) for t in sums] == [1, 0], "pending shards, then this rank's failures, are summed over ranks"
    monkeypatch.setattr(generators.EmbeddedT2I, "draw", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    monkeypatch.setattr(stage, "all_reduce_sum_", real_sum)
    (tmp_path / "run" / "shard-00000.tar").unlink()
    with pytest.raises(RuntimeError, match="shard-00000.tar"):
        run_generate(cfg)
    assert not stage.is_complete(tmp_path / "run")


def test_a_resume_that_would_draw_in_another_precision_is_refused(random_generator_dir, captions_file, tmp_path, monkeypatch):
    from synrep.generate import stage

    cfg = GenerateConfig(captions=str(captions_file), out_dir=str(tmp_path / "run"), generator=f"embedded:{random_generator_dir}",
                         limit_captions=8, captions_per_shard=4, batch_captions=2, steps=2, preview=False)
    run_generate(cfg)
    assert {s.meta["precision"] for shard in list_shards(tmp_path / "run") for s in read_shard(shard)} == {"fp32"}
    real_make = stage.make_generator

    def on_a_gpu(*args, **kwargs):  # what dtype=auto gives a diffusers model on CUDA
        generator = real_make(*args, **kwargs)
        generator.precision = "fp16"
        return generator

    monkeypatch.setattr(stage, "make_generator", on_a_gpu)
    (tmp_path / "run" / "shard-00001.tar").unlink()
    from synrep.errors import SettingsChanged

    with pytest.raises(SettingsChanged, match="drawn in fp32, but this run would draw in fp16.*dtype=fp32"):
        run_generate(cfg)
    assert [p.name for p in list_shards(tmp_path / "run")] == ["shard-00000.tar"], "nothing was written"


def test_an_empty_finished_shard_reads_as_empty_and_a_broken_one_fails(tmp_path):
    from synrep.shards import ShardError, ShardWriter

    with ShardWriter(tmp_path / "shard-00000.tar") as writer:  # curation dropped every image of its captions
        pass
    assert read_shard(tmp_path / "shard-00000.tar") == []
    (tmp_path / "shard-00000.json").unlink()
    with pytest.raises(ShardError, match="no samples"):
        read_shard(tmp_path / "shard-00000.tar")


class _NoBar:
    def update(self, n):
        pass


def test_each_rank_reads_only_its_shards_lines_and_writes_the_same_shards(random_generator_dir, captions_file, tmp_path, monkeypatch):
    from synrep.captions import files
    from synrep.captions import stage as captions_stage
    from synrep.distributed import DistInfo
    from synrep.generate import stage
    from synrep.generate.generators import make_generator

    def forbidden(*args, **kwargs):
        raise AssertionError("run_generate read the whole captions file")

    calls = []
    real_iter = stage.iter_captions

    def spy(path, start=0, stop=None):
        calls.append((start, stop))
        return real_iter(path, start, stop)

    monkeypatch.setattr(files, "read_captions", forbidden)
    monkeypatch.setattr(captions_stage, "read_captions", forbidden)
    monkeypatch.setattr(stage, "iter_captions", spy)
    common = dict(captions=str(captions_file), generator=f"embedded:{random_generator_dir}", limit_captions=7,
                  captions_per_shard=3, batch_captions=2, steps=2, preview=False)
    one = GenerateConfig(out_dir=str(tmp_path / "one"), **common)
    run_generate(one)
    assert calls == [(0, 3), (3, 6), (6, 7)]
    two = GenerateConfig(out_dir=str(tmp_path / "two"), **common)
    for rank, expected in ((1, [(3, 6)]), (0, [(0, 3), (6, 7)])):  # two ranks, one after the other
        calls.clear()
        monkeypatch.setattr(stage, "init_distributed", lambda rank=rank: DistInfo(rank, 2))
        run_generate(two)
        assert calls == expected, rank
    assert _digests(tmp_path / "two") == _digests(tmp_path / "one")
    assert json.loads((tmp_path / "two" / "index.json").read_text())["num_groups"] == 7
    monkeypatch.undo()

    # the shards equal what the stage wrote from the whole file read up front, as it did before
    records = files.read_captions(captions_file)[:7]
    generator = make_generator(one.generator)
    old = tmp_path / "old"
    for k, begin in enumerate(range(0, 7, 3)):
        stage._write_shard(one, generator, stage._settings(one), records[begin:begin + 3], old / f"shard-{k:05d}.tar", _NoBar())
    assert _digests(old) == _digests(tmp_path / "one")


def test_background_encoding_writes_the_bytes_of_an_inline_writer(random_generator_dir, captions_file, tmp_path):
    common = dict(captions=str(captions_file), generator=f"embedded:{random_generator_dir}", limit_captions=10, steps=2,
                  captions_per_shard=5, batch_captions=3, preview=False)
    run_generate(GenerateConfig(out_dir=str(tmp_path / "inline"), writer_threads=0, **common))
    run_generate(GenerateConfig(out_dir=str(tmp_path / "threads"), writer_threads=3, **common))
    assert _digests(tmp_path / "threads") == _digests(tmp_path / "inline")


@pytest.mark.parametrize("mode", ["drop", "redraw"])
def test_curation_drops_or_redraws_images_below_the_agreement_threshold(random_generator_dir, captions_file, tmp_path, mode,
                                                                       fashion_mnist_available):
    if not fashion_mnist_available:
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    common = dict(captions=str(captions_file), generator=f"embedded:{random_generator_dir}", limit_captions=6, steps=2, preview=False,
                  curate=CurationConfig(mode=mode, threshold=0.3, redraws=2, classifier_train_size=3000, classifier_epochs=1,
                                        cache_dir=str(tmp_path / "classifier")))
    run_generate(GenerateConfig(out_dir=str(tmp_path / "a"), **common))
    groups = [sample for shard in list_shards(tmp_path / "a") for sample in read_shard(shard)]
    scores = [s for g in groups for s in g.meta["agreement"] if s is not None]
    assert scores and all(g.meta["curation"] == {"mode": mode, "threshold": 0.3} for g in groups)
    totals = json.loads((tmp_path / "a" / "generate_summary.json").read_text())["curation"]
    dropped = 6 * 4 - sum(len(g.images) for g in groups)  # a caption whose images all fail leaves no group
    redrawn = sum(r > 0 for g in groups for r in g.meta.get("redraws", []))
    assert (totals["scored"], totals["dropped"], totals["redrawn"]) == (6 * 4, dropped, redrawn), totals
    assert totals["passing"] == sum(s >= 0.3 for g in groups for s in g.meta["agreement"] if s is not None)
    assert totals["failed_first_draw"] >= max(dropped, redrawn) and totals["mode"] == mode
    if mode == "drop":  # a random generator draws noise: most images fail and are left out, and the meta says which
        kept = sum(len(g.images) for g in groups)
        assert kept < 6 * 4 and all(len(g.images) == 4 - len(g.meta["dropped"]) for g in groups)
        assert all(s >= 0.3 for g in groups for j, s in enumerate(g.meta["agreement"]) if j not in g.meta["dropped"] and s is not None)
        summary = json.loads((tmp_path / "a" / "generate_summary.json").read_text())
        assert summary["images_this_run"] == kept == summary["images"], "the counts are of the images kept"
    else:
        assert any(r > 0 for g in groups for r in g.meta["redraws"]) and all(len(g.images) == 4 for g in groups)
    run_generate(GenerateConfig(out_dir=str(tmp_path / "b"), **common))
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b"), "curation is seeded: the same bytes again"
    if mode == "drop":  # nothing passes: every shard is finished and empty, and the run says why, every time
        none = GenerateConfig(out_dir=str(tmp_path / "none"), **{**common, "curate": dataclasses.replace(common["curate"], threshold=1.0)})
        for _ in range(2):
            with pytest.raises(RuntimeError, match="dropped every one"):
                run_generate(none)
    with pytest.raises(ValueError, match="curate.threshold"):
        load_config(GenerateConfig, None, ["curate.mode=drop", "curate.threshold=1.5"])


def test_curation_totals_sum_the_shard_markers_and_leave_rates_empty_without_counts():
    from synrep.generate.curation import curation_totals

    counts = {"scored": 8, "failed_first_draw": 2, "redrawn": 2, "passing": 7, "dropped": 0}
    totals = curation_totals(CurationConfig(mode="redraw"), [{}, {"curation": counts}, {"curation": counts}])
    assert (totals["scored"], totals["passing"], totals["pass_rate_first_draw"], totals["pass_rate_kept"]) == (16, 14, 75.0, 87.5)
    assert (totals["shards_counted"], totals["shards_total"]) == (2, 3), "the shard without counts is reported, not hidden"
    old = curation_totals(CurationConfig(mode="drop"), [{}])  # shards written before the counts existed
    assert old["scored"] == 0 and old["pass_rate_first_draw"] is None and old["pass_rate_kept"] is None
