"""Hydra's own features through the real CLI: multirun sweeps, --cfg job, --info, hydra.* refused."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from hat.cli import train_main
from hat.engine.sweep import expand
from hat.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
DIGITS = str(ROOT / "projects" / "digits" / "convnet.yaml")


def test_a_2x2_multirun_runs_four_jobs_into_their_folders_and_summarizes(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "train.py"), "--config", DIGITS, "-m",
                             "optimizer.lr=0.1,0.05", "trainer.epochs=1,2", f"work_dir={tmp_path}",
                             "trainer.progress_bar=false"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["0", "1", "2", "3"]
    rows = json.loads((tmp_path / "multirun.json").read_text())
    assert [r["overrides"] for r in rows] == [["optimizer.lr=0.1", "trainer.epochs=1"],
                                              ["optimizer.lr=0.1", "trainer.epochs=2"],
                                              ["optimizer.lr=0.05", "trainer.epochs=1"],
                                              ["optimizer.lr=0.05", "trainer.epochs=2"]]
    for row in rows:  # each job really ran with its values, into its own folder
        metrics = json.loads((Path(row["work_dir"]) / "float" / "metrics.json").read_text())
        assert row["value"] == metrics["best/val/top1"] and metrics["best/epoch"] <= int(row["overrides"][1][-1])
        saved = (Path(row["work_dir"]) / "float" / "config.yaml").read_text()
        assert f"lr: {row['overrides'][0].split('=')[1]}" in saved
    summary = (tmp_path / "multirun.md").read_text()
    assert summary in result.stdout and "| job | overrides | val/top1 | work_dir |" in summary


def test_expand_keeps_fixed_overrides_and_orders_the_product():
    assert expand(["a=1,2", "b=x", "+c=range(0,2)"]) == [["a=1", "b=x", "+c=0"], ["a=1", "b=x", "+c=1"],
                                                          ["a=2", "b=x", "+c=0"], ["a=2", "b=x", "+c=1"]]
    with pytest.raises(ConfigError, match="override syntax error"):
        expand(["a=[1,"])


def test_cfg_job_and_info_print_and_run_nothing(tmp_path, capsys):
    assert train_main(["--config", DIGITS, "--cfg", "job", "trainer.epochs=3", f"work_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "epochs: 3" in out and f"work_dir: {tmp_path}" in out
    assert train_main(["--config", DIGITS, "--info", "--stage", "qat", f"work_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "search path (defaults: entries):" in out and "projects/_base_" in out and "stage: qat" in out
    assert not any(tmp_path.iterdir())  # nothing ran


def test_hydra_settings_and_a_swept_work_dir_are_refused(tmp_path, capsys):
    assert train_main(["--config", DIGITS, "hydra.run.dir=/tmp/elsewhere"]) == 2
    assert "set work_dir=... instead" in capsys.readouterr().err
    assert train_main(["--config", DIGITS, "-m", f"work_dir={tmp_path}/a,{tmp_path}/b"]) == 2
    assert "work_dir cannot be swept" in capsys.readouterr().err
    assert train_main(["--config", DIGITS, "optimizer.lr=0.1,0.05", f"work_dir={tmp_path}"]) == 2
    assert "add --multirun" in capsys.readouterr().err  # Hydra's hint, now true: -m / --multirun exists
