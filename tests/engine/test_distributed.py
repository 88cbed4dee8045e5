"""Multi-process training as users launch it: torchrun over loopback, gloo on the CPU."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hat.checkpoint import load_checkpoint
from hat.engine import distributed
from hat.engine.stages import run_stage
from hat.errors import ConfigError
from tests.conftest import DIGITS, ROOT

FAST = ["trainer.progress_bar=false", "trainer.epochs=1", "stages.qat.trainer.epochs=1"]
# 1440 training images: 6 full steps of 240 for one process, or of 2 x 120 for two (no padded index)
EVEN_DATA = ["+data.train.val_fraction=0.1987", "trainer.sync_bn=true"]
BOUND = 60  # seconds for a job to end after one of its ranks died (it takes ~1 s here)
TOLERANCE = 1e-5  # max |difference| of any weight: float32 sums taken in another order, nothing more


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(*args: str, nproc: int = 2, launcher: tuple[str, ...] = ("--standalone",)) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launcher, f"--nproc_per_node={nproc}", *args]


def torchrun(*overrides: str, nproc: int = 2, script: str = "tools/train.py",
             timeout: float = 180) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=N script --config digits overrides...`, run to the end."""
    return subprocess.run(torchrun_command(script, "--config", str(DIGITS), *overrides, nproc=nproc), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=_env())


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr + result.stdout


def _max_difference(a: Path, b: Path) -> float:
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert wa.keys() == wb.keys()
    return max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa if wa[k].numel())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """float -> calibration -> qat with one process (batch 240) and with two (batch 120 each), the two-process
    calibration starting from the one-process float weights so that their ranges can be compared exactly."""
    one, two = tmp_path_factory.mktemp("one_process"), tmp_path_factory.mktemp("two_processes")
    logs = {}
    logs["float1"] = _ok(torchrun(*FAST, *EVEN_DATA, f"work_dir={one}", "data.batch_size=240", nproc=1))
    logs["float2"] = _ok(torchrun(*FAST, *EVEN_DATA, f"work_dir={two}", "data.batch_size=120"))
    shutil.copytree(one / "float", two / "float_one_process")
    for stage in ("calibration", "qat"):
        logs[f"{stage}1"] = _ok(torchrun(*FAST, *EVEN_DATA, f"work_dir={one}", "data.batch_size=240", "--stage",
                                         stage, nproc=1))
        if stage == "calibration":  # same float weights as the one-process run
            os.replace(two / "float", two / "float_two_processes")
            os.replace(two / "float_one_process", two / "float")
        logs[f"{stage}2"] = _ok(torchrun(*FAST, *EVEN_DATA, f"work_dir={two}", "data.batch_size=120", "--stage",
                                         stage))
    return one, two, logs


def test_two_ranks_of_batch_b_train_like_one_of_batch_2b(runs):
    one, two, logs = runs
    assert _max_difference(one / "float" / "last.pt", two / "float_two_processes" / "last.pt") < TOLERANCE
    for log, per_device, processes in (("float1", 240, 1), ("float2", 120, 2)):  # lr x 240 / base_batch_size 64
        assert (f"LR: lr 0.1875 = optimizer.lr 0.05 x 3.75 (linear scaling: global batch 240 = {per_device} per "
                f"device x {processes} processes x 1 accumulation steps, optimizer.base_batch_size 64)") in logs[log]


def test_calibration_on_two_ranks_ends_with_the_ranges_of_the_global_batch(runs):
    one, two, _ = runs
    a = load_checkpoint(one / "calibration" / "best.pt")["model"]
    b = load_checkpoint(two / "calibration" / "best.pt")["model"]
    ranges = [k for k in a if k.endswith(("min_val", "max_val", ".scale"))]
    assert len(ranges) > 10
    for key in ranges:
        assert torch.equal(a[key], b[key]), key


def test_qat_on_two_ranks_matches_one_process_and_only_rank_0_writes(runs):
    one, two, logs = runs
    # fake quant rounds: a 1e-7 difference in a batch-norm output can move an activation by a whole step, so the
    # runs part by up to ~5e-4 here (without SyncBN: 1.3e-2)
    assert _max_difference(one / "qat" / "last.pt", two / "qat" / "last.pt") < 2e-3
    assert sorted(p.name for p in (two / "qat").iterdir()) == ["best.pt", "config.yaml", "last.pt", "metrics.json",
                                                               "tb"]
    assert len(list((two / "qat" / "tb").iterdir())) == 1  # one event file: rank 0's
    assert "[rank 0] INFO stage qat done" in logs["qat2"] and "[rank 1] INFO" not in logs["qat2"]


def test_validation_metrics_are_those_of_the_whole_set(runs):
    """Each rank evaluates a shard; the all-reduced numbers equal one process evaluating the saved checkpoint."""
    _, two, logs = runs
    reported = json.loads((two / "qat" / "metrics.json").read_text())  # the last epoch's: last.pt's
    predicted = subprocess.run([sys.executable, "tools/predict.py", "--config", str(DIGITS), "--stage", "qat",
                                f"work_dir={two}", "--ckpt", str(two / "qat" / "last.pt")], cwd=ROOT,
                               capture_output=True, text=True, timeout=120, env=_env())
    top1 = re.search(r"val/top1 (\S+)", predicted.stdout)
    assert abs(reported["val/top1"] - float(top1.group(1))) < 0.01, predicted.stdout + predicted.stderr


def _nodes(tmp_path: Path, *overrides: str) -> list[subprocess.Popen]:
    """Two simulated machines on 127.0.0.1, one process each: torchrun --nnodes=2 --node_rank=0/1."""
    port = free_port()
    return [subprocess.Popen(torchrun_command("tools/train.py", "--config", str(DIGITS), f"work_dir={tmp_path}",
                                              *overrides, nproc=1,
                                              launcher=("--nnodes=2", f"--node_rank={rank}", "--master_addr=127.0.0.1",
                                                        f"--master_port={port}")),
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
            for rank in (0, 1)]


def test_two_nodes_on_loopback_train_the_float_stage(tmp_path):
    nodes = _nodes(tmp_path, *FAST)
    outputs = [node.communicate(timeout=180)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert "process group: 2 processes, backend gloo, this is rank 0" in outputs[0]
    assert "global batch 128 = 64 per device x 2 processes" in outputs[0]
    assert load_checkpoint(tmp_path / "float" / "last.pt", required=("model", "epoch"))["epoch"] == 1


def _worker_pid(launcher: subprocess.Popen) -> int:
    """The pid of the training process `launcher` (torchrun, one process) started, read from /proc."""
    for entry in Path("/proc").iterdir():
        try:
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == launcher.pid:
                return int(entry.name)
        except (OSError, ValueError):
            continue
    raise AssertionError("no worker process found")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the worker process in /proc")
def test_a_killed_rank_ends_the_job_and_keeps_the_last_checkpoint(tmp_path):
    nodes = _nodes(tmp_path, "trainer.progress_bar=false", "trainer.epochs=500")
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "float" / "last.pt").exists() and time.monotonic() < deadline:
            assert all(node.poll() is None for node in nodes), "the job ended early"
            time.sleep(0.2)
        os.kill(_worker_pid(nodes[1]), signal.SIGKILL)  # rank 1, on the second machine
        killed = time.monotonic()
        outputs = [node.communicate(timeout=BOUND)[0] for node in nodes]
        took = time.monotonic() - killed
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [1, 1] and took < BOUND
    # the survivor says what happened; torchrun on the dead rank's machine names it
    assert "error (rank 0): lost contact with another process of the job" in outputs[0], outputs[0][-3000:]
    assert re.search(r"rank\s*:\s*1 \(local_rank: 0\)\s+exitcode\s*:\s*-9", outputs[1]), outputs[1][-3000:]
    state = load_checkpoint(tmp_path / "float" / "last.pt", required=("model", "optimizer", "epoch"))
    assert 1 <= state["epoch"] < 500


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_a_nan_image_on_one_rank_stops_or_skips_on_every_rank(tmp_path, mode):
    result = torchrun(*FAST, f"work_dir={tmp_path}", f"trainer.on_nonfinite={mode}", "data.train.type=PoisonedDigits",
                      script="tests/engine/torchrun_poisoned.py", timeout=120)
    output = result.stderr + result.stdout
    if mode == "stop":
        assert result.returncode != 0
        for rank in (0, 1):  # both ranks stop at the same step, naming the rank that met the NaN
            assert re.search(rf"error \(rank {rank}\): non-finite input batch \(NaN/Inf in the data\) on rank [01] at "
                             r"epoch 1, step \d+", output), output[-3000:]
        assert not (tmp_path / "float" / "last.pt").exists()
    else:
        assert result.returncode == 0, output[-3000:]
        assert re.search(r"skipped a step \(1 so far\): non-finite input batch .* on rank [01]", output), output[-3000:]
        assert load_checkpoint(tmp_path / "float" / "last.pt", required=("model",))["step"] == 11  # 12 minus 1


def test_world_comes_from_torchrun_environment(monkeypatch):
    monkeypatch.setenv("RANK", "3"), monkeypatch.setenv("WORLD_SIZE", "4"), monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.world() == distributed.World(rank=3, size=4, local_rank=1)
    assert not distributed.world().is_main
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ConfigError, match="launch with torchrun"):
        distributed.world()


def test_a_lost_peer_is_told_as_such_and_other_errors_are_not():
    gloo = RuntimeError("[pair.cc:545] Read error [127.0.0.1]:4009: Connection reset by peer. This is typically ...")
    message = distributed.peer_failure_message(gloo)
    assert message.startswith("lost contact with another process of the job ([pair.cc:545] Read error")
    assert "continue with --resume" in message
    assert distributed.peer_failure_message(ValueError("a bug")) is None


def test_int_infer_runs_on_rank_0_alone(digits_cfg, monkeypatch, tmp_path):
    monkeypatch.setenv("RANK", "1"), monkeypatch.setenv("WORLD_SIZE", "2")
    assert run_stage(digits_cfg("stage=int_infer")) == {}
    assert not (tmp_path / "int_infer").exists()


def test_a_detector_on_two_ranks_reports_the_map_of_the_whole_val_set(tmp_path):
    """Box targets as lists through DDP; each rank evaluates a shard and the COCO evaluator gathers the shards:
    the job's val/mAP equals one process evaluating the saved checkpoint."""
    from hat.data.scenes import make_scenes

    config = ROOT / "projects" / "detection" / "fcos_digits.yaml"
    scenes = ["data.train.scenes.num_train=96", "data.train.scenes.num_val=13"]  # 7 + 6 val images on the ranks
    make_scenes(tmp_path / "scenes", num_train=96, num_val=13)
    overrides = [f"work_dir={tmp_path / 'run'}", f"data.train.root={tmp_path / 'scenes'}", *scenes,
                 "data.batch_size=8", "trainer.progress_bar=false", "trainer.epochs=5"]
    log = _ok(subprocess.run(torchrun_command("tools/train.py", "--config", str(config), *overrides), cwd=ROOT,
                             capture_output=True, text=True, timeout=180, env=_env()))
    reported = json.loads((tmp_path / "run" / "float" / "metrics.json").read_text())  # the last epoch's: last.pt's
    predicted = subprocess.run([sys.executable, "tools/predict.py", "--config", str(config), "--stage", "float",
                                "--ckpt", str(tmp_path / "run" / "float" / "last.pt"), *overrides], cwd=ROOT,
                               capture_output=True, text=True, timeout=120, env=_env())
    alone = re.search(r"val/mAP (\S+)  val/mAP50 (\S+)", predicted.stdout)
    assert alone, log[-2000:] + predicted.stdout + predicted.stderr[-2000:]
    assert float(alone.group(2)) > 0, "nothing detected: the comparison would be 0 == 0"
    assert abs(reported["val/mAP"] - float(alone.group(1))) < 0.01
    assert abs(reported["val/mAP50"] - float(alone.group(2))) < 0.01
