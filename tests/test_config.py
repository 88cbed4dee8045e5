import dataclasses
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from hat.config import DataSchema, TrainerSchema, load_config, stage_config
from hat.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "projects" / "digits" / "convnet.yaml"
PROJECT_CONFIGS = sorted(p for p in (ROOT / "projects").rglob("*.yaml") if "_base_" not in p.parts)


@pytest.mark.parametrize("path", PROJECT_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_project_config_composes(path):
    cfg = load_config(path)
    assert cfg.model.type and cfg.data.train.type and cfg.optimizer.type


def test_defaults_list_pulls_shared_base_groups():
    cfg = load_config(DIGITS)
    assert cfg.optimizer.type == "SGD" and cfg.optimizer.momentum == 0.9  # from _base_/optimizer/sgd.yaml
    assert cfg.optimizer.lr == 0.05  # the project's own value wins (_self_ last)
    assert cfg.scheduler.type == "CosineLR"


def test_overrides_set_add_and_delete():
    cfg = load_config(DIGITS, ["trainer.epochs=1", "optimizer.lr=0.01", "+_x=1", "~scheduler",
                               "data.train.split=val", "+_extra.list=[1,2]", "+_lr_copy=${optimizer.lr}"])
    assert cfg.trainer.epochs == 1 and cfg.optimizer.lr == 0.01
    assert cfg._x == 1 and list(cfg._extra.list) == [1, 2] and cfg._lr_copy == 0.01  # new top-level keys: '_' names
    assert cfg.scheduler is None
    assert cfg.data.train.split == "val"


def test_optimizer_group_can_be_swapped():
    cfg = load_config(DIGITS, ["optimizer=adamw"])
    assert cfg.optimizer.type == "AdamW"


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        load_config("nope.yaml")


@pytest.mark.parametrize("override,message", [
    ("trainer.epochs=[1,", r"override syntax error.*key=value"),
    ("trainer.epochz=1", r"Could not override 'trainer\.epochz'.*\+trainer\.epochz=1"),
    ("+trainer.epochz=1", r"unknown key 'trainer\.epochz'\. Did you mean 'trainer\.epochs'\?"),
    ("~nokey", r"'nokey' does not exist"),
    ("trainer.epochs=abc", r"bad value at 'trainer\.epochs'.*'abc'"),
    ("stage=qta", r"unknown stage 'qta'"),
], ids=["bad-syntax", "missing-key-without-plus", "typo-in-typed-section", "delete-missing", "wrong-type",
        "unknown-stage"])
def test_override_mistakes_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DIGITS, [override])


def test_missing_defaults_entry(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("defaults:\n  - /optimizer: sgdd\n  - _self_\n")
    with pytest.raises(ConfigError, match="sgdd"):
        load_config(bad)


def test_stage_overrides_merge_over_the_top_level():
    cfg = load_config(DIGITS, ["stages.qat.optimizer.lr=0.001", "stages.qat.trainer.epochs=3"])
    qat = stage_config(cfg, "qat")
    assert (qat.stage, qat.optimizer.lr, qat.trainer.epochs) == ("qat", 0.001, 3)
    assert qat.optimizer.type == "SGD" and stage_config(cfg, "float").optimizer.lr == 0.05


def test_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(DIGITS, ["trainer.epochs=2"])
    saved = tmp_path / "saved.yaml"
    saved.write_text(OmegaConf.to_yaml(cfg))
    assert load_config(saved) == cfg


@pytest.mark.parametrize("override,message", [
    ("trainer.accum_steps=0", "trainer.accum_steps=0 is out of range; it must be >= 1"),
    ("trainer.log_interval=0", "trainer.log_interval=0 is out of range"),
    ("data.batch_size=-3", "data.batch_size=-3 is out of range"),
    ("trainer.epochs=0", "trainer.epochs=0 is out of range"),
    ("trainer.clip_grad_norm=-1", "trainer.clip_grad_norm=-1.0 must be > 0"),
    ("+stages.flaot.trainer.epochs=1", "stages.flaot: not a stage"),
])
def test_out_of_range_values(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(DIGITS, [override])


def test_stage_override_typo_is_a_config_error():
    cfg = load_config(DIGITS, ["+stages.float.trainer.epochz=2"])
    with pytest.raises(ConfigError, match=r"stages\.float: unknown key 'trainer\.epochz'\. Did you mean 'trainer\.epochs'"):
        stage_config(cfg, "float")


def test_every_typed_key_can_be_overridden_without_plus():
    """The base configs name every schema key, so `data.num_workers=2` works like `trainer.epochs=2`."""
    base = load_config(DIGITS)
    plain = lambda v: "null" if v is None else str(v).lower() if isinstance(v, bool) else v  # noqa: E731
    overrides = [f"{section}.{f.name}={plain(base[section][f.name])}"
                 for section, schema in (("trainer", TrainerSchema), ("data", DataSchema))
                 for f in dataclasses.fields(schema) if f.name not in ("train", "val")]
    assert load_config(DIGITS, overrides) == base
    assert load_config(DIGITS, ["data.num_workers=1"]).data.num_workers == 1


def test_misspelled_top_level_keys_are_refused_with_a_suggestion(tmp_path):
    typo = tmp_path / "typo.yaml"
    typo.write_text(f"defaults:\n  - {Path(DIGITS).stem}\n  - _self_\ntraner:\n  epochs: 1\n")
    (tmp_path / f"{Path(DIGITS).stem}.yaml").write_text(Path(DIGITS).read_text())
    with pytest.raises(ConfigError, match=r"typo\.yaml: unknown top-level key 'traner'\. Did you mean 'trainer'\?"):
        load_config(typo)
    with pytest.raises(ConfigError, match=r"unknown top-level key 'qaunt'\. Did you mean 'quant'\?"):
        load_config(DIGITS, ["+qaunt={high_precision_outputs: [fc]}"])
    with pytest.raises(ConfigError, match=r"stages\.qat: unknown top-level key 'traner'"):  # at load, not at the stage
        load_config(DIGITS, ["+stages.qat.traner.epochs=2"])
    assert load_config(DIGITS, ["+_size=32"])._size == 32  # a name starting with '_' is the user's own
