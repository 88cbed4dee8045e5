"""`--config FILE.yaml` + Hydra override strings -> one validated OmegaConf tree.

Hydra's compose API does the merging (defaults lists, `a.b=1`, `+new=1`, `~key`, interpolations). The config's
own folder is the primary search path; every `_base_` folder above it (nearest first) and the repository's
`projects/_base_` follow, so a project config can say `defaults: [/trainer: default, /optimizer: sgd, _self_]`.
"""
from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from hat.integer.profile import PROFILES
from hat.errors import ConfigError
from hat.fileio import atomic_write
from hat.plugins import import_config_modules

STAGE_ORDER = ("float", "calibration", "qat", "int_infer")
TYPED_SECTIONS = ("trainer", "data", "quant")
_REPO_BASE = Path(__file__).resolve().parent.parent / "projects" / "_base_"


@dataclasses.dataclass
class TrainerSchema:
    """Every trainer option, with its type: a typo or a wrong type is an error, never silently ignored."""

    epochs: int = 10
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = False  # bfloat16 autocast on CPU, float16 + GradScaler on CUDA
    clip_grad_norm: Optional[float] = None  # max total L2 norm; the pre-clip norm is logged either way
    accum_steps: int = 1
    log_interval: int = 10  # optimizer steps between TensorBoard scalars
    eval_interval: int = 1  # epochs between evaluations
    progress_bar: bool = True
    deterministic: bool = True
    on_nonfinite: str = "stop"  # NaN/Inf input, loss or gradient: stop with the likely causes, or skip the step
    keep_freed_memory: bool = True  # Linux: reuse freed pages instead of page-faulting them in every step
    sync_bn: bool = False  # under torchrun: batch-norm statistics over every rank's batch (CPU and GPU)
    dist_timeout_s: float = 300.0  # under torchrun: a rank waiting this long for another fails instead of hanging
    best_metric: Optional[str] = None  # the validation metric best.pt follows; null: the evaluator's main metric
    best_mode: str = "max"  # max | min: whether a larger or a smaller best_metric is better
    histogram_interval: int = 1  # epochs between TensorBoard histograms of the weights (QAT: and scales); 0: none


@dataclasses.dataclass
class DataSchema:
    train: Any = None  # a `type:` mapping naming a registered dataset
    val: Any = None
    batch_size: int = 64
    val_batch_size: Optional[int] = None
    num_workers: int = 0
    train_transforms: Any = None  # list of `type:` mappings
    val_transforms: Any = None


@dataclasses.dataclass
class QuantSchema:
    """How the calibration and QAT stages quantize the deploy part of the model (module names as in
    model.named_modules(), e.g. backbone.3.0 or head.2)."""

    activation_dtype: str = "qint8"  # qint8 | qint16
    algorithm: str = "fake_quant"  # fake_quant | lsq | pact
    int16_modules: list = dataclasses.field(default_factory=list)  # outputs kept in int16
    high_precision_outputs: list = dataclasses.field(default_factory=list)  # int32 outputs: model-output layers only
    float_modules: list = dataclasses.field(default_factory=list)  # left unquantized
    calibration_batches: int = 20  # training batches observed by the calibration stage
    freeze_bn_epoch: Optional[int] = None  # QAT epoch from which batch-norm statistics stop updating
    sgd_fallback_lr: float = 0.005  # QAT LR when the float recipe was adaptive/OneCycle and QAT sets no optimizer
    march: str = "bayes"  # the integer arithmetic and limits int_infer compiles and checks for
    export_on_check_failure: bool = False  # int_infer writes the program even when the check fails (HNN_MODEL_EXPORT)


@dataclasses.dataclass
class Schema:
    """The top level; `model`, `optimizer` and `scheduler` are `type:` mappings checked when built."""

    model: Any = None
    data: DataSchema = dataclasses.field(default_factory=DataSchema)
    optimizer: Any = None
    scheduler: Any = None
    evaluator: Any = None  # a `type:` mapping (Accuracy, COCOEvaluator, MeanIoU); null: Accuracy (top-1)
    trainer: TrainerSchema = dataclasses.field(default_factory=TrainerSchema)
    quant: QuantSchema = dataclasses.field(default_factory=QuantSchema)
    work_dir: str = "work_dirs/default"
    seed: int = 0
    stage: str = "float"
    pretrained: Any = None  # checkpoint path, zoo:NAME or true (the zoo entry named like model.type): float start
    stages: Any = dataclasses.field(default_factory=dict)  # per-stage overrides: stages.qat.optimizer...
    imports: Any = None  # modules of the user's own code, imported before anything is built (hat/plugins.py)


def load_config(config_file: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """Compose `config_file` with Hydra `overrides` and validate it; every failure is one ConfigError line."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    path = Path(config_file)
    if path.suffix not in (".yaml", ".yml"):
        path = path.with_suffix(".yaml") if not path.exists() else path
    if not path.is_file():
        raise ConfigError(f"config file not found: {config_file} (give a path like projects/digits/convnet.yaml)")
    path = path.resolve()
    hydra_keys = [o for o in overrides if o.lstrip("+~").startswith("hydra.")]
    if hydra_keys:
        raise ConfigError(f"override {hydra_keys[0]!r}: hat does not use Hydra's own settings (hydra.run.dir, "
                          f"hydra.job...): each stage writes into work_dir/<stage>/; set work_dir=... instead")
    search = [f"file://{p}" for p in _base_dirs(path)]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(path.parent), version_base=None):
            cfg = compose(config_name=path.stem, overrides=[*overrides, f"hydra.searchpath=[{','.join(search)}]"])
    except Exception as exc:  # Hydra raises several types; all of them are the user's input
        raise ConfigError(_hydra_message(exc, path)) from None
    finally:
        GlobalHydra.instance().clear()
    import_config_modules(cfg.get("imports"), path.parent)  # before validation: its names may be the user's
    return validate(cfg, source=str(path))


def validate(cfg: DictConfig, source: str = "config", *more: Optional[DictConfig]) -> DictConfig:
    """Merge `cfg` (then `more`, e.g. stage overrides) onto the typed schema and check value ranges.

    Unknown keys in typed sections, wrong value types and out-of-range values raise one-line ConfigErrors.
    """
    for part in (cfg, *more):
        _check_top_level(part, source)
    schema = OmegaConf.structured(Schema)
    OmegaConf.set_struct(schema, False)  # `_`-prefixed top-level keys are the user's (_check_top_level) ...
    for typed in TYPED_SECTIONS:  # ... but the typed sections reject unknown keys
        OmegaConf.set_struct(schema[typed], True)
    try:
        merged = OmegaConf.merge(schema, cfg, *(m for m in more if m is not None))
        OmegaConf.resolve(merged)
    except ConfigKeyError as exc:
        key = getattr(exc, "full_key", None) or "?"
        section, _, name = key.rpartition(".")
        section = section.split(".")[-1]
        known = list(schema[section].keys()) if section in TYPED_SECTIONS else []
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean '{section}.{close[0]}'?" if close else ""
        raise ConfigError(f"{source}: unknown key '{key}'.{hint} Known {section} keys: {', '.join(known)}") from None
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        reason = str(exc).splitlines()[0]
        raise ConfigError(f"{source}: bad value at '{key}': {reason}") from None
    _check_ranges(merged, source)
    return merged


def _check_top_level(part: Optional[DictConfig], source: str) -> None:
    """Every top-level key is one of the schema's (a misspelled `traner:` must not train the defaults); names
    starting with `_` are free, for the user's own anchors and interpolation values."""
    known = [f.name for f in dataclasses.fields(Schema)]
    for key in (part.keys() if part is not None else ()):
        if key in known or str(key).startswith("_"):
            continue
        close = difflib.get_close_matches(str(key), known, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{source}: unknown top-level key '{key}'.{hint} Top-level keys: {', '.join(known)} "
                          f"(your own values: a name starting with '_', e.g. _size: 32)")


MAX_SEED = 2**31 - 1  # 32-bit seeds (numpy) with room for the rank and the epoch added to them
_AT_LEAST = {"quant.calibration_batches": 1, "trainer.dist_timeout_s": 1, "trainer.epochs": 1, "trainer.accum_steps": 1,
             "trainer.log_interval": 1, "trainer.eval_interval": 1, "trainer.histogram_interval": 0,
             "data.batch_size": 1, "data.val_batch_size": 1, "data.num_workers": 0}


def _check_ranges(cfg: DictConfig, source: str) -> None:
    if cfg.stage not in STAGE_ORDER:
        raise ConfigError(f"stage: unknown stage '{cfg.stage}'; choose one of {', '.join(STAGE_ORDER)}")
    if cfg.quant.march not in PROFILES:
        raise ConfigError(f"{source}: quant.march: unknown march '{cfg.quant.march}'; known: {', '.join(PROFILES)}")
    unknown = [k for k in (cfg.stages or {}) if k not in STAGE_ORDER]
    if unknown:
        raise ConfigError(f"{source}: stages.{unknown[0]}: not a stage; per-stage overrides go under "
                          f"stages.<{'|'.join(STAGE_ORDER)}>")
    for name, override in (cfg.stages or {}).items():  # checked now, not when that stage runs
        _check_top_level(override, f"{source}: stages.{name}")
    if cfg.work_dir is None or not str(cfg.work_dir).strip():
        raise ConfigError(f"{source}: work_dir is empty; set work_dir=work_dirs/NAME (each stage writes "
                          f"work_dir/<stage>/)")
    if not 0 <= cfg.seed <= MAX_SEED:
        raise ConfigError(f"{source}: seed={cfg.seed} is out of range; use an integer from 0 to {MAX_SEED}")
    for key, low in _AT_LEAST.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and value < low:
            raise ConfigError(f"{source}: {key}={value} is out of range; it must be >= {low}")
    if cfg.trainer.on_nonfinite not in ("stop", "skip"):
        raise ConfigError(f"{source}: trainer.on_nonfinite must be stop or skip, got '{cfg.trainer.on_nonfinite}'")
    if cfg.trainer.best_mode not in ("max", "min"):
        raise ConfigError(f"{source}: trainer.best_mode must be max or min, got '{cfg.trainer.best_mode}'")
    clip = cfg.trainer.clip_grad_norm
    if clip is not None and clip <= 0:
        raise ConfigError(f"{source}: trainer.clip_grad_norm={clip} must be > 0 (or null for no clipping)")


def stage_config(cfg: DictConfig, stage: str) -> DictConfig:
    """The config one stage runs with: the top level merged with `stages.<stage>` (if any), stage set."""
    override = cfg.stages.get(stage) if cfg.stages else None
    return validate(cfg, f"stages.{stage}", override, OmegaConf.create({"stage": stage}))


def save_config(cfg: DictConfig, path: str | Path) -> None:
    atomic_write(path, lambda f: f.write(OmegaConf.to_yaml(cfg).encode()))


def search_path(config_file: str | Path) -> list[Path]:
    """Where `defaults:` entries of a config are looked up: its own folder, then every `_base_` above it."""
    path = Path(config_file).resolve()
    return [path.parent, *_base_dirs(path)]


def _base_dirs(path: Path) -> list[Path]:
    dirs = [parent / "_base_" for parent in path.parents if (parent / "_base_").is_dir()]
    if _REPO_BASE.is_dir() and _REPO_BASE not in dirs:
        dirs.append(_REPO_BASE)
    return dirs


def _hydra_message(exc: Exception, path: Path) -> str:
    text = " ".join(str(exc).split())
    if "Could not override" in text or "Could not delete" in text or "Could not append" in text:
        return f"override rejected: {text}"
    if type(exc).__name__ == "OverrideParseException":
        return f"override syntax error: {text} (grammar: key=value, +new_key=value, ~key; quote values with spaces)"
    if "Could not find" in text or "MissingConfigException" in type(exc).__name__:
        return f"{path}: defaults list entry not found: {text.split(' Config search path')[0]}"
    return f"{path}: {text}"
