import json
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


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "not a synrep run folder" in capsys.readouterr().err


@pytest.mark.slow
def test_run_quick_end_to_end_writes_report_with_figures(tmp_path, fashion_mnist_available):
    if not fashion_mnist_available:
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    out = tmp_path / "quick"
    result = subprocess.run([sys.executable, "-m", "synrep.cli", "run", "--quick", f"out_dir={out}"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "report:" in result.stdout and "linear" in result.stdout
    report = (out / "report.md").read_text()
    for figure in ("samples.png", "loss_curve.png", "eval.png"):
        assert f"figures/{figure}" in report and (out / "figures" / figure).stat().st_size > 1000
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["linear_top1"]) == {"encoder", "pixels", "random"}
    # Rerunning skips every completed stage and rebuilds the same report.
    again = subprocess.run([sys.executable, "-m", "synrep.cli", "run", "--quick", f"out_dir={out}"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stderr.count("complete, skipped") >= 3


def test_each_stage_reports_completion_by_its_own_done_marker(tmp_path):
    from synrep.captions import stage as captions_stage
    from synrep.evaluation import stage as eval_stage
    from synrep.generate import stage as generate_stage

    (tmp_path / "index.json").write_text("{}")  # a run killed after the index, before the summary
    assert not generate_stage.is_complete(tmp_path) and not captions_stage.is_complete(tmp_path)
    (tmp_path / "generate_summary.json").write_text("{}")
    assert generate_stage.is_complete(tmp_path)
    assert not eval_stage.is_complete(tmp_path) and eval_stage.outputs(tmp_path)["done"].name == "eval.json"
