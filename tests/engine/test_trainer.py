"""The loop on the real digits config: learning, clipping, accumulation, AMP, TensorBoard, resume."""
import json
import logging

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from omegaconf import OmegaConf
from torch import nn

from hat.data import build_loader
from hat.data.datasets import DigitsDataset
from hat.engine import Callback, Trainer
from hat.models import Classifier
from hat.engine.callbacks import CheckpointCallback
from hat.engine.stages import build_model, build_trainer, float_stage, run_stage
from hat.checkpoint import load_checkpoint
from hat.errors import CheckpointError, ConfigError


def _trainer(cfg, tmp_path):
    torch.manual_seed(cfg.seed)
    return build_trainer(cfg, build_model(cfg), tmp_path)


def test_float_stage_learns_digits_and_writes_its_outputs(digits_cfg, tmp_path):
    metrics = run_stage(digits_cfg("trainer.epochs=3"))
    assert metrics["val/top1"] > 90.0
    out = tmp_path / "float"
    assert {"config.yaml", "last.pt", "best.pt", "metrics.json", "tb"} <= {p.name for p in out.iterdir()}
    assert "epochs: 3" in (out / "config.yaml").read_text()


def test_tensorboard_scalars_read_back(digits_cfg, tmp_path):
    run_stage(digits_cfg("trainer.epochs=2", "trainer.log_interval=5"))
    events = EventAccumulator(str(tmp_path / "float" / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/images_per_sec", "val/top1", "val/loss"} <= tags
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == list(range(5, 47, 5))  # 23 steps per epoch, 2 epochs
    assert [e.step for e in events.Scalars("val/top1")] == [23, 46]


class Recorder(Callback):
    def __init__(self):
        self.norms, self.points = [], []

    def before_train(self, trainer):
        self.points.append("before_train")

    def after_step(self, trainer):
        self.norms.append(trainer.grad_norm)

    def after_train(self, trainer):
        self.points.append("after_train")


def test_clipping_logs_the_pre_clip_norm_and_bounds_the_update(digits_cfg, tmp_path):
    cfg = digits_cfg("trainer.epochs=1", "trainer.clip_grad_norm=0.01", "~scheduler")
    trainer = _trainer(cfg, tmp_path)
    recorder = Recorder()
    trainer.callbacks = [recorder]
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train_epoch()
    assert len(recorder.norms) == 23 and all(n is not None and n > 0.01 for n in recorder.norms)
    # plain SGD momentum 0.9: every step moves the weights by at most lr * (sum of momenta) * clip norm
    step = torch.sqrt(sum(((p - b) ** 2).sum() for p, b in zip(trainer.model.parameters(), before)))
    assert step <= 0.05 * 0.01 * 23 / (1 - 0.9) * 1.01 + 0.05 * 5e-4 * 23 * 10


def test_grad_norm_only_measured_at_log_steps_without_clipping(digits_cfg, tmp_path):
    trainer = _trainer(digits_cfg("trainer.epochs=1", "trainer.log_interval=10"), tmp_path)
    recorder = Recorder()
    trainer.callbacks = [recorder]
    trainer.fit()
    assert [i + 1 for i, n in enumerate(recorder.norms) if n is not None] == [10, 20]
    assert recorder.points == ["before_train", "after_train"]


@pytest.mark.parametrize("micro_batch,accum", [(32, 2), (32, 4)], ids=["even-groups", "short-last-group"])
def test_accumulation_matches_one_large_batch(digits_cfg, micro_batch, accum):
    """A model without BatchNorm: micro-batches accumulated give the same step as one batch of all 64 samples,
    also when the epoch's last group is shorter than accum_steps (2 micro-batches for accum 4)."""
    cfg = digits_cfg()
    dataset = DigitsDataset("train")
    dataset.images, dataset.labels = dataset.images[:64], dataset.labels[:64]
    results = []
    for batch, steps in ((64, 1), (micro_batch, accum)):
        torch.manual_seed(0)
        model = Classifier(nn.Flatten(), nn.Linear(64, 10))
        loader = build_loader(dataset, OmegaConf.merge(cfg.data, {"batch_size": batch}), train=False, seed=0)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        trainer = Trainer(model, optimizer, loader, epochs=1, accum_steps=steps)
        trainer.fit()
        assert trainer.step == 1
        results.append((model.head.weight.detach().clone(), float(trainer.loss)))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-5)  # the logged loss is the group's mean
    assert not torch.equal(results[0][0], Classifier(nn.Flatten(), nn.Linear(64, 10)).head.weight)


def test_accum_steps_count_optimizer_steps(digits_cfg, tmp_path):
    trainer = _trainer(digits_cfg("trainer.epochs=1", "trainer.accum_steps=4"), tmp_path)
    trainer.callbacks = []
    trainer.fit()
    assert trainer.step == 6  # ceil(23 / 4)


def test_amp_on_cpu_uses_bfloat16_autocast(digits_cfg, tmp_path):
    trainer = _trainer(digits_cfg("trainer.epochs=1", "trainer.amp=true"), tmp_path)
    dtypes = []
    trainer.model.head.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    trainer.callbacks = []
    trainer.fit()
    assert dtypes and set(dtypes) == {torch.bfloat16} and torch.isfinite(trainer.loss)


class Crash(Callback):
    def __init__(self, after_epoch):
        self.at = after_epoch

    def after_epoch(self, trainer):
        if trainer.epoch == self.at:
            raise KeyboardInterrupt  # the checkpoint callback before it has written last.pt


@pytest.mark.parametrize("scheduler", ["cosine", "onecycle"])
def test_resume_ends_with_the_same_weights(digits_cfg, tmp_path, scheduler):
    cfg = digits_cfg("trainer.epochs=3", f"scheduler={scheduler}", "+data.train_transforms=[{type: RandomAffine, degrees: 10}]")
    torch.manual_seed(cfg.seed)  # run_stage seeds; the stage function alone does not
    full = float_stage(cfg, tmp_path / "full", None)
    full_weights = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["model"]

    trainer = _trainer(cfg, tmp_path / "cut")
    trainer.callbacks.append(Crash(after_epoch=1))
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    resumed = float_stage(cfg, tmp_path / "cut", "auto")
    resumed_weights = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["model"]
    assert resumed == full
    for key, value in full_weights.items():
        assert torch.equal(value, resumed_weights[key]), key


def test_best_checkpoint_is_written_only_when_the_metric_improves(tmp_path):
    class FakeTrainer:
        epoch, metrics, bare_model = 0, {}, nn.Linear(1, 1)

        def state_dict(self):
            return {"epoch": self.epoch}

    trainer, callback = FakeTrainer(), CheckpointCallback(tmp_path, "config: 1")
    for epoch, top1 in enumerate([50.0, 70.0, 60.0], start=1):
        trainer.epoch, trainer.metrics = epoch, {"val/top1": top1}
        callback.after_epoch(trainer)
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert (best["epoch"], best["metrics"]["val/top1"]) == (2, 70.0)
    assert (last["epoch"], last["metrics"]["val/top1"], last["best_metric"]) == (3, 60.0, 70.0)


def test_eval_interval_reports_metrics_only_for_evaluated_epochs(digits_cfg, tmp_path):
    run_stage(digits_cfg("trainer.epochs=3", "trainer.eval_interval=2"))
    events = EventAccumulator(str(tmp_path / "float" / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("val/top1")] == [46, 69]  # epoch 2, and the last epoch
    every = EventAccumulator(str(tmp_path / "float" / "tb"), size_guidance={"histograms": 0}).Reload()  # keep all
    assert [e.step for e in every.Histograms("float/weights/backbone.0.0.weight")] == [23, 46, 69]  # every epoch


def test_histogram_interval_zero_writes_no_histograms(digits_cfg, tmp_path):
    run_stage(digits_cfg("trainer.epochs=1", "trainer.histogram_interval=0"))
    assert EventAccumulator(str(tmp_path / "float" / "tb")).Reload().Tags()["histograms"] == []
    with pytest.raises(ConfigError, match="trainer.histogram_interval=-1 is out of range; it must be >= 0"):
        digits_cfg("trainer.histogram_interval=-1")


def test_resuming_a_finished_run_keeps_its_metrics(digits_cfg, tmp_path):
    cfg = digits_cfg("trainer.epochs=1")
    first = run_stage(cfg)
    assert run_stage(cfg, resume="auto") == first
    assert json.loads((tmp_path / "float" / "metrics.json").read_text()) == first


def test_resuming_with_another_model_names_what_differs(digits_cfg, tmp_path):
    run_stage(digits_cfg("trainer.epochs=1"))
    with pytest.raises(CheckpointError, match=r"last\.pt: model differ from the run that wrote it"):
        run_stage(digits_cfg("trainer.epochs=2", "model.type=convnet_base"), resume="auto")
    with pytest.raises(CheckpointError, match=r"optimizer\.type: SGD -> AdamW, scheduler\.type: CosineLR -> OneCycleLR differ"):
        run_stage(digits_cfg("trainer.epochs=2", "optimizer=adamw", "scheduler=onecycle"), resume="auto")


def test_model_that_does_not_fit_the_data_is_a_config_error(digits_cfg):
    with pytest.raises(ConfigError, match=r"model 'convnet_small' does not fit data 'DigitsDataset' \(images "
                                          r"\(1, 8, 8\), 10 classes\).*Check the model's num_classes "
                                          r"\(model\.num_classes"):
        run_stage(digits_cfg("model.num_classes=2"))


def test_a_stage_reports_the_best_epoch_that_best_pt_holds_and_the_last(digits_cfg, tmp_path, caplog):
    """best.pt (what the next stage reads) and the last epoch differ: metrics.json and the summary say both."""
    caplog.set_level(logging.INFO, logger="hat")
    cfg = digits_cfg("trainer.epochs=3", "trainer.best_mode=min")  # best = lowest top-1: an early epoch, not the last
    metrics = run_stage(cfg)
    saved = json.loads((tmp_path / "float" / "metrics.json").read_text())
    assert saved == pytest.approx(metrics) and saved["best/epoch"] < 3
    assert saved["best/val/top1"] < saved["val/top1"]
    best = load_checkpoint(tmp_path / "float" / "best.pt")
    assert best["metrics"]["val/top1"] == saved["best/val/top1"] and best["best_epoch"] == saved["best/epoch"]
    summary = [r.getMessage() for r in caplog.records if "stage float done" in r.getMessage() or "last epoch" in
               r.getMessage() or "outputs:" in r.getMessage()]
    assert summary[0].startswith(f"stage float done: best epoch {int(saved['best/epoch'])}/3 (best.pt): val/loss")
    assert summary[1].startswith("  last epoch (last.pt): val/loss") and "best.pt, config.yaml, last.pt" in summary[2]
    from hat.engine.int_infer import accuracy_table

    table = accuracy_table(tmp_path, {"val/bit_exact_mismatches": 0.0}, ("val/top1",))
    assert f"| float | {saved['best/val/top1']:.2f} |" in table  # the checkpoint that was quantized


def test_the_train_tool_ends_with_the_next_command(tmp_path, caplog):
    from hat.cli import next_command

    assert next_command("float", "p/x.yaml", ["work_dir=/tmp/a b", "stage=float"]) == \
        "python tools/train.py --config p/x.yaml 'work_dir=/tmp/a b' --stage calibration"
    assert next_command("int_infer", "p/x.yaml", []).startswith("python tools/predict.py --config p/x.yaml --stage "
                                                                "int_infer --profile")
