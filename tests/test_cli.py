"""The tools as a user runs them: one real subprocess for the wiring, in-process calls for the rest."""
import subprocess
import sys
from pathlib import Path

from hat.cli import predict_main, train_main

ROOT = Path(__file__).resolve().parent.parent
DIGITS = str(ROOT / "projects" / "digits" / "convnet.yaml")


def test_train_tool_runs_and_prints_tensorboard_path(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "train.py"), "--config", DIGITS, "--stage", "float",
                             "trainer.epochs=1", f"work_dir={tmp_path}", "trainer.progress_bar=false"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"tensorboard --logdir {tmp_path}/float/tb" in result.stderr
    assert "stage float done" in result.stderr


def test_predict_evaluates_the_trained_checkpoint(tmp_path, capsys):
    common = ["--config", DIGITS, f"work_dir={tmp_path}", "trainer.progress_bar=false"]
    assert train_main([*common, "trainer.epochs=2"]) == 0
    assert predict_main(common) == 0
    out = capsys.readouterr().out
    assert f"float {tmp_path}/float/best.pt: val/loss" in out and "val/top1" in out


def test_a_finished_run_is_never_overwritten_silently(tmp_path, capsys):
    common = ["--config", DIGITS, f"work_dir={tmp_path}", "trainer.progress_bar=false", "trainer.epochs=1"]
    assert train_main(common) == 0
    before = (tmp_path / "float" / "best.pt").read_bytes()
    assert train_main(common) == 2
    assert f"{tmp_path}/float already holds a run (last.pt); continue it with --resume" in capsys.readouterr().err
    assert (tmp_path / "float" / "best.pt").read_bytes() == before
    assert train_main([*common, "--overwrite", "seed=1"]) == 0
    assert (tmp_path / "float" / "best.pt").read_bytes() != before
    assert len(list((tmp_path / "float" / "tb").iterdir())) == 1  # the replaced run's curves are gone


def test_user_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    cases = {("--config", "missing.yaml"): "error: config file not found: missing.yaml",
             ("--config", DIGITS, "trainer.epochz=1"): "error: override rejected: Could not override 'trainer.epochz'",
             ("--config", DIGITS, "model.type=resnet81", f"work_dir={tmp_path}"):
                 "error: model.type: unknown model or structure name 'resnet81'. Did you mean 'resnet18'",
             ("--config", DIGITS, "--stage", "int_infer", f"work_dir={tmp_path}"):
                 f"error: {tmp_path}/qat/best.pt not found: run the qat stage first",
             ("--config", DIGITS, "quant.march=nash", f"work_dir={tmp_path}"):
                 f"error: {DIGITS}: quant.march: unknown march 'nash'; known: bayes",
             ("--config", DIGITS, "--stage", "qat", f"work_dir={tmp_path}"):
                 f"error: {tmp_path}/calibration/best.pt not found: run the calibration stage first",
             ("--config", DIGITS, "work_dir=/proc/hat"): "error: No such file or directory: /proc/hat",
             ("--config", DIGITS, "optimizer.lr=-1", f"work_dir={tmp_path}"):
                 "error: optimizer.lr=-1 must be a positive number (e.g. optimizer.lr=0.05)",
             ("--config", DIGITS, "--resume", f"work_dir={tmp_path}"):
                 f"error: checkpoint not found: {tmp_path}/float/last.pt",
             ("--config", DIGITS, "optimizer.lr=abc", f"work_dir={tmp_path}"):
                 "error: optimizer.lr='abc' must be a positive number (e.g. optimizer.lr=0.05)",
             ("--config", DIGITS, "seed=99999999999999999999", f"work_dir={tmp_path}"):
                 f"error: {DIGITS}: seed=99999999999999999999 is out of range; use an integer from 0 to 2147483647",
             ("--config", DIGITS, "+model.extra={type: float}", f"work_dir={tmp_path}"):
                 "error: model.extra.type: 'float' is of kind stage, but this key takes kind model or structure"}
    for argv, message in cases.items():
        assert train_main(list(argv)) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(message), (argv, err)
        assert not any("Traceback" in line for line in err)


def test_predict_with_a_checkpoint_of_another_model(tmp_path, capsys):
    common = ["--config", DIGITS, f"work_dir={tmp_path}", "trainer.progress_bar=false", "trainer.epochs=1"]
    assert train_main(common) == 0
    assert predict_main([*common, "model.type=convnet_base"]) == 2
    err = capsys.readouterr().err
    assert f"error: {tmp_path}/float/best.pt does not fit this config's model (Error(s) in loading" in err
    assert "evaluate it with the config that trained it (model.type 'convnet_base' here)" in err


def test_list_shows_registered_names(capsys):
    assert train_main(["--list", "model"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "model: convnet_base, convnet_small, mobilenet_v2, resnet18, resnet34, torchvision"
    assert lines[1].startswith("zoo (") and lines[1].endswith("no entries (tools/zoo.py register)")  # none in tests
    assert train_main(["--list"]) == 0
    assert "optimizer: AdamW, SGD" in capsys.readouterr().out


def test_calibrating_the_checkpoint_of_another_architecture_is_one_line(tmp_path, capsys):
    common = ["--config", DIGITS, f"work_dir={tmp_path}", "trainer.progress_bar=false", "trainer.epochs=1"]
    assert train_main(common) == 0
    assert train_main([*common, "--stage", "calibration", "model.type=convnet_base"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {tmp_path}/float/best.pt does not fit this config's model (Error(s) in "
                              f"loading state_dict"), err
    assert err[-1].endswith("use the config it was trained with, or rerun --stage float")
    assert not (tmp_path / "calibration").exists()


def test_docs_ops_md_is_generated_from_the_op_table(capsys):
    from hat.cli import ops_doc_main

    assert ops_doc_main(["--check"]) == 0, "docs/ops.md is stale: run python tools/ops_doc.py"
    assert "up to date" in capsys.readouterr().out
