"""Hydra-style multirun: `tools/train.py -m optimizer.lr=0.1,0.05 trainer.epochs=1,2` runs one job per combination
of the swept values, one after the other, each in its own sub-folder work_dir/<n>/, then prints and writes a summary.
"""
from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path
from typing import Optional, Sequence

from hat.config import load_config
from hat.errors import ConfigError
from hat.fileio import atomic_write

log = logging.getLogger("hat")
SUMMARY_FILE = "multirun.md"


def expand(overrides: Sequence[str]) -> list[list[str]]:
    """Every combination of the sweep overrides (`key=a,b`, `key=range(1,3)`, ...) with the fixed ones, in order."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception as exc:  # Hydra's parser errors: the user's input
        raise ConfigError(f"override syntax error: {str(exc).splitlines()[0]}") from None
    choices = []
    for override in parsed:
        prefix = override.get_key_element()
        if override.is_sweep_override():
            choices.append([f"{prefix}={value}" for value in override.sweep_string_iterator()])
        else:
            choices.append([override.input_line])
    return [list(job) for job in itertools.product(*choices)]


def run_sweep(config: str, overrides: Sequence[str], resume: Optional[str], overwrite: bool) -> list[dict]:
    """Run the stage once per job into work_dir/<n>/; the summary (markdown) is printed and written beside them."""
    from hat.engine.stages import build_evaluator, run_stage

    jobs = expand(overrides)
    if any(line.lstrip("+~").startswith("work_dir=") for line in overrides if "," in line):
        raise ConfigError("work_dir cannot be swept: each job of a multirun writes into work_dir/<job number>/")
    base = Path(load_config(config, jobs[0]).work_dir)
    swept = [i for i, line in enumerate(jobs[0]) if len({job[i] for job in jobs}) > 1]
    rows = []
    for number, job in enumerate(jobs):
        cfg = load_config(config, [*job, f"work_dir={base / str(number)}"])
        log.info("multirun job %d/%d: %s", number + 1, len(jobs), " ".join(job[i] for i in swept))
        metrics = run_stage(cfg, resume=resume, overwrite=overwrite)
        key = build_evaluator(cfg).main_metric
        rows.append({"job": number, "overrides": [job[i] for i in swept], "work_dir": str(cfg.work_dir),
                     "metric": key, "value": metrics.get(f"best/{key}", metrics.get(key))})
    summary = _table(rows, cfg.stage)
    base.mkdir(parents=True, exist_ok=True)
    atomic_write(base / SUMMARY_FILE, lambda f: f.write(summary.encode()))
    atomic_write(base / "multirun.json", lambda f: f.write(json.dumps(rows, indent=2).encode()))
    print(summary)
    log.info("multirun summary: %s", base / SUMMARY_FILE)
    return rows


def _table(rows: list[dict], stage: str) -> str:
    metric = rows[0]["metric"] if rows else "metric"
    lines = [f"multirun of stage {stage}: {len(rows)} jobs", "", f"| job | overrides | {metric} | work_dir |",
             "| --- | --- | --- | --- |"]
    for row in rows:
        value = "-" if row["value"] is None else f"{row['value']:.4g}"
        lines.append(f"| {row['job']} | {' '.join(row['overrides'])} | {value} | {row['work_dir']} |")
    return "\n".join(lines) + "\n"
