import json
import os
import subprocess
import sys

import pytest

from synrep.cli import main


def test_help_lists_every_stage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("captions", "generate", "train", "eval", "run", "report", "study", "generator"):
        assert command in out


def test_command_help_lists_every_config_key_with_type_and_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "loader.num_workers" in out and "backbone.image_size" in out
    assert "short_groups" in out and "one of 'error', 'fewer', 'skip'" in out and "default 'error'" in out


def test_bad_override_is_a_clear_error_with_exit_code_2(capsys):
    assert main(["train", "stepz=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'stepz'" in err and "steps" in err


def test_show_config_prints_resolved_values(capsys):
    assert main(["run", "--quick", "--show-config", "train.steps=7"]) == 0
    out = capsys.readouterr().out
    assert "steps: 7" in out and "out_dir: runs/quick" in out


def test_quick_profile_yields_to_the_config_file_and_the_overrides(tmp_path, capsys):
    config = tmp_path / "mine.yaml"
    config.write_text("out_dir: runs/mine\ntrain:\n  steps: 33\n")
    assert main(["run", "--quick", "--config", str(config), "--show-config", "eval.probe_train_size=77"]) == 0
    out = capsys.readouterr().out
    assert "out_dir: runs/mine" in out and "steps: 33" in out and "probe_train_size: 77" in out
    assert "per_concept: 50" in out  # what neither names still comes from the quick profile


def test_run_refuses_a_stage_path_it_would_replace(tmp_path, capsys):
    assert main(["run", "--show-config", f"train.data={tmp_path}/elsewhere"]) == 2
    err = capsys.readouterr().err
    assert "train.data" in err and "runs/demo/shards" in err and "set out_dir instead" in err


def test_a_runs_saved_config_loads_again(tmp_path, capsys):
    from synrep.config import load_config, save_config
    from synrep.pipeline import RunConfig, stage_paths

    saved = save_config(stage_paths(load_config(RunConfig, None, [f"out_dir={tmp_path}/run"])), tmp_path)
    assert load_config(RunConfig, saved).train.data == f"{tmp_path}/run/shards"


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "not a synrep run folder" in capsys.readouterr().err


@pytest.mark.slow
def test_run_quick_end_to_end_writes_report_with_figures(tmp_path, fashion_mnist_available):
    if not fashion_mnist_available:
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    out = tmp_path / "quick"
    # The quick profile, smaller still: this test checks the stages' wiring, outputs and reruns, not accuracy.
    run = [sys.executable, "-m", "synrep.cli", "run", "--quick", f"out_dir={out}", "captions.per_concept=20",
           "train.steps=60", "train.warmup_steps=5", "eval.probe_train_size=2000"]
    result = subprocess.run(run, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "report:" in result.stdout and "linear" in result.stdout
    report = (out / "report.md").read_text()
    for figure in ("samples.png", "loss_curve.png", "eval.png"):
        assert f"figures/{figure}" in report and (out / "figures" / figure).stat().st_size > 1000
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["linear_top1"]) == {"encoder", "pixels", "random"}
    # Rerunning skips every completed stage and rebuilds the same report.
    again = subprocess.run(run, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stderr.count("complete, skipped") >= 3
    # Other settings are refused, not answered with the old outputs (which the run would skip to).
    for override, named in (("train.method=simclr", ("train holds training made with other settings", "method: 'stablerep' -> 'simclr'")),
                            ("eval.knn_k=5", ("eval/encoder holds an evaluation made with other settings", "knn_k: 20 -> 5"))):
        other = subprocess.run([*run, override], capture_output=True, text=True, timeout=300)
        assert other.returncode != 0 and all(n in other.stderr for n in named), other.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text()) == summary, "nothing was rewritten"
    more_threads = subprocess.run([*run, "num_threads=1", "eval.num_workers=0"], capture_output=True, text=True, timeout=300)
    assert more_threads.returncode == 0, "where and how fast a stage runs may change"


def test_a_run_refuses_outputs_made_from_a_stage_it_will_redo(tmp_path):
    from synrep.config import load_config
    from synrep.errors import SettingsChanged
    from synrep.pipeline import RunConfig, check_reuse, stage_paths

    cfg = stage_paths(load_config(RunConfig, None, [f"out_dir={tmp_path}"]))
    check_reuse(cfg)  # a new folder
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "shard-00000.tar").write_bytes(b"")  # images of captions that are gone
    with pytest.raises(SettingsChanged, match="shards holds images made from the captions that this run will make again"):
        check_reuse(cfg)


def test_each_stage_reports_completion_by_its_own_done_marker(tmp_path):
    from synrep.captions import stage as captions_stage
    from synrep.evaluation import stage as eval_stage
    from synrep.generate import stage as generate_stage

    (tmp_path / "index.json").write_text("{}")  # a run killed after the index, before the summary
    assert not generate_stage.is_complete(tmp_path) and not captions_stage.is_complete(tmp_path)
    (tmp_path / "generate_summary.json").write_text("{}")
    assert generate_stage.is_complete(tmp_path)
    assert not eval_stage.is_complete(tmp_path) and eval_stage.outputs(tmp_path)["done"].name == "eval.json"


# One bad input per row: (command line with {tmp} for the test's folder, what the one error line must name).
BAD_INPUTS = [
    ("captions per_concep=3", "unknown config key 'per_concep'"),
    ("captions --config {tmp}/binary.yaml", "binary.yaml is not UTF-8"),
    ("captions concepts={tmp}/none.yaml out_dir={tmp}/c", "none.yaml' is neither a file nor a shipped list"),
    ("captions backgrounds={tmp}/none.yaml out_dir={tmp}/c", "background mapping {tmp}/none.yaml does not exist"),
    ("generate guidance=2", "unknown config key 'guidance'"),
    ("generate captions={tmp}/none.jsonl out_dir={tmp}/g", "captions file {tmp}/none.jsonl does not exist"),
    ("generate captions={tmp}/bad.jsonl out_dir={tmp}/g", "bad.jsonl, line 2: not valid JSON"),
    ("generate captions={tmp}/ok.jsonl out_dir={tmp}/g generator=dalle", "'dalle' is not a known generator"),
    ("generate --preview out_dir={tmp}/empty", "shard folder {tmp}/empty holds no finished shards"),
    ("train stepz=3", "unknown config key 'stepz'"),
    ("train --config {tmp}/binary.yaml", "binary.yaml is not UTF-8"),
    ("train steps=-1", "config key 'steps'"),
    ("train data={tmp}/none out_dir={tmp}/t", "shard folder {tmp}/none does not exist"),
    ("eval knn=3", "unknown config key 'knn'"),
    ("eval encoder=pixels dataset=cifar-99 out_dir={tmp}/e", "config key 'dataset': 'cifar-99' is not a known dataset"),
    ("eval encoder={tmp}/none out_dir={tmp}/e", "encoder '{tmp}/none' is not pixels"),
    ("run train.stepz=3", "unknown config key 'train.stepz'"),
    ("run --config {tmp}/binary.yaml", "binary.yaml is not UTF-8"),
    ("run out_dir={tmp}/r captions.concepts={tmp}/none.txt", "none.txt' is neither a file nor a shipped list"),
    ("report {tmp}/none", "run folder {tmp}/none does not exist"),
    ("report {tmp}/damaged", "summary.json is not valid JSON"),
    ("study stepz=3", "unknown config key 'stepz'"),
    ("study rows=[simclr-real,foo]", "config key 'rows': unknown study row(s) 'foo'"),
    ("generator train stepz=3", "unknown config key 'stepz'"),
    ("generator train dataset=nope out_dir={tmp}/gt", "'nope' is not a known dataset"),
    ("generator train lr=-1 out_dir={tmp}/gt", "config key 'lr': must be a positive number"),
    ("generator train ema_decay=1 out_dir={tmp}/gt", "config key 'ema_decay': must be in [0, 1)"),
    ("generator fidelity guidance_scales=[2,nan] out_dir={tmp}/f", "config key 'guidance_scales'"),
    ("generator fidelity dataset=cifar-99 out_dir={tmp}/f", "'cifar-99' is not a known dataset"),
    ("train method=synclr backbone.name=resnet", "config key 'backbone.name': method synclr needs a backbone with patch tokens"),
    ("train backbone.name=timm", "'timm' needs an argument: timm:<name>"),
    ("captions backend=openai:localhost:8000", "write openai:<http(s)://host:port>"),
    ("generate generator=diffusers", "'diffusers' needs an argument"),
    ("generator fidelity --config {tmp}/binary.yaml", "binary.yaml is not UTF-8"),
    ("generator fidelity generator={tmp}/none out_dir={tmp}/f", "{tmp}/none is not a synrep embedded generator"),
]


@pytest.mark.parametrize("command, names", BAD_INPUTS, ids=[c.replace("{tmp}/", "") for c, _ in BAD_INPUTS])
def test_bad_inputs_of_every_command_give_one_line_and_exit_code_2(command, names, tmp_path, capsys):
    (tmp_path / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe\x00")
    (tmp_path / "bad.jsonl").write_text('{"caption": "a coat"}\nnot json\n')
    (tmp_path / "ok.jsonl").write_text('{"caption": "a coat"}\n{"caption": "a bag"}\n')
    (tmp_path / "empty").mkdir()
    (tmp_path / "damaged" / "captions").mkdir(parents=True)
    (tmp_path / "damaged" / "captions" / "summary.json").write_text('{"captions": 3,')  # cut short
    capsys.readouterr()
    assert main([part.format(tmp=tmp_path) for part in command.split()]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if " ERROR " in line]
    assert len(errors) == 1, err
    assert names.format(tmp=tmp_path) in errors[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize("error", [ZeroDivisionError("a bug"), PermissionError(13, "Permission denied")])
def test_errors_that_are_not_synreps_propagate_with_their_traceback(error, tmp_path, monkeypatch):
    from synrep.captions import stage as captions_stage

    def broken(cfg):
        raise error

    monkeypatch.setattr(captions_stage, "run_captions", broken)
    with pytest.raises(type(error)):
        main(["captions", f"out_dir={tmp_path}"])


def test_synrep_errors_keep_their_builtin_base():
    from synrep.captions.files import CaptionsFileMissing
    from synrep.config import ConfigError
    from synrep.errors import SynrepError
    from synrep.errors import SettingsChanged
    from synrep.generate.stage import GenerateError
    from synrep.shards import ShardError
    from synrep.streaming import StreamError

    assert issubclass(ConfigError, SynrepError) and issubclass(ConfigError, ValueError)
    assert issubclass(CaptionsFileMissing, SynrepError) and issubclass(CaptionsFileMissing, FileNotFoundError)
    assert issubclass(StreamError, SynrepError) and issubclass(StreamError, RuntimeError)
    assert issubclass(ShardError, RuntimeError) and issubclass(GenerateError, RuntimeError)
    assert issubclass(SettingsChanged, ValueError)


def test_help_piped_into_a_reader_that_stops_early_is_quiet():
    """`synrep train --help | head -1`: the closed pipe is not a traceback. The reader is closed before synrep
    writes anything, so the first write of the help always meets the closed pipe."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([sys.executable, "-m", "synrep.cli", "train", "--help"], stdout=write_end,
                                stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert result.returncode == 0 and result.stderr == "", result.stderr
