"""tools/debug_quant.py: where a quantized model loses accuracy, from a project's config and its work_dir.

summary: per layer params, MACs, output size. similarity: per layer float vs QAT vs quantized vs program.
sensitivity: per layer, the metric with that layer alone at int16 (or float), the most helpful first, and the
suggested config list. Each writes <out>/<command>.txt (the console table), .csv, .json and .png.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

from hat.errors import CheckpointError, HatError

COMMANDS = ("summary", "similarity", "sensitivity", "all")


def debug_quant_main(argv: Optional[Sequence[str]] = None) -> int:
    from hat.cli import _run

    return _run(_debug_quant, argv)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="debug_quant.py", description=__doc__.split("\n\n")[0],
                                     epilog="Overrides use Hydra's grammar: data.batch_size=32 quant.int16_modules=[a]")
    parser.add_argument("command", choices=COMMANDS, help="what to compute (all: the three)")
    parser.add_argument("--config", help="project YAML, e.g. projects/digits/convnet.yaml")
    parser.add_argument("--ckpt", help="calibration/QAT checkpoint (default: work_dir/qat/best.pt, else "
                                       "work_dir/calibration/best.pt)")
    parser.add_argument("--float-ckpt", help="float checkpoint (default: work_dir/float/best.pt)")
    parser.add_argument("--batches", type=int, default=4, help="validation batches to measure on (default 4)")
    parser.add_argument("--precision", choices=("int16", "float"), default="int16",
                        help="sensitivity: give each layer in turn an int16 output (deployable) or leave it in float")
    parser.add_argument("--layers", help="sensitivity: only these layers (comma-separated module names)")
    parser.add_argument("--suggest", type=int, default=3, help="sensitivity: how many layers to suggest (default 3)")
    parser.add_argument("--out", help="output folder (default: work_dir/debug)")
    parser.add_argument("overrides", nargs="*", help="Hydra override strings")
    return parser


def _debug_quant(argv: Optional[Sequence[str]]) -> int:
    from hat.cli import _load
    from hat.config import stage_config
    from hat.data import build_dataset, build_loader

    args = _parser().parse_intermixed_args(argv)
    args.stage = None
    if args.batches < 1:
        raise HatError(f"--batches must be at least 1, got {args.batches}")
    cfg = stage_config(_load(args), "int_infer")
    out = Path(args.out or Path(cfg.work_dir) / "debug")
    out.mkdir(parents=True, exist_ok=True)
    loader = build_loader(build_dataset(cfg.data, "val"), cfg.data, train=False, seed=cfg.seed)
    batches = [batch for _, batch in zip(range(args.batches), loader)]
    commands = COMMANDS[:3] if args.command == "all" else (args.command,)
    for command in commands:
        text, written = RUNNERS[command](cfg, args, batches, out)
        (out / f"{command}.txt").write_text(text + "\n")
        print(f"{text}\n{command} written to {', '.join(str(p) for p in [out / f'{command}.txt', *written])}\n")
    return 0


def _float_model(cfg, args, required: bool):
    from hat.checkpoint import load_checkpoint, load_weights
    from hat.engine.stages import build_model

    model = build_model(cfg)
    from hat.cli import zoo_checkpoint

    path = Path(zoo_checkpoint(args.float_ckpt, "float") or Path(cfg.work_dir) / "float" / "best.pt")
    if path.is_file() or args.float_ckpt or required:
        if not path.is_file():
            raise CheckpointError(f"{path} not found: run the float stage first, or pass --float-ckpt")
        load_weights(model, load_checkpoint(path, required=("model",))["model"], path,
                     "use the config that trained it")
    return model.eval()


def _qat_model(cfg, args):
    """The prepared model with the QAT (else calibration) checkpoint's weights and ranges, validation state."""
    from hat.engine.quant_stages import load_quantized_weights, prepared_model

    work_dir = Path(cfg.work_dir)
    found = [p for p in (work_dir / "qat" / "best.pt", work_dir / "calibration" / "best.pt") if p.is_file()]
    from hat.cli import zoo_checkpoint

    path = Path(zoo_checkpoint(args.ckpt, "qat")) if args.ckpt else (found[0] if found else None)
    if path is None:
        raise CheckpointError(f"no calibration or QAT checkpoint in {work_dir}: run --stage calibration (and qat) "
                              f"first, or pass --ckpt")
    model = prepared_model(cfg)
    load_quantized_weights(model, cfg, path, "debug it with the config it was trained with")
    return model.eval()


def _summary(cfg, args, batches, out: Path):
    from hat.debug.plots import plot_bars
    from hat.debug.summary import model_summary
    from hat.engine.int_infer import deploy_part
    from hat.table import write_table

    report = model_summary(deploy_part(_float_model(cfg, args, required=False)), batches[0][0])
    written = write_table(out / "summary", report.header, report.rows())
    written.append(plot_bars([s.name for s in report], [s.macs / 1e6 for s in report], "MMAC per image",
                             "MACs per layer", out / "summary.png"))
    return str(report), written


def _similarity(cfg, args, batches, out: Path):
    from hat import backend
    from hat.debug.plots import plot_similarity
    from hat.debug.similarity import layer_similarity
    from hat.engine.int_infer import deploy_part
    from hat.quant import convert
    from hat.table import write_table

    qat = _qat_model(cfg, args)
    quantized = deploy_part(convert(qat))
    check = backend.check_model(quantized, example_inputs=(batches[0][0],), march=cfg.quant.march)
    program = check.program if check.deployable else None
    report = layer_similarity(deploy_part(_float_model(cfg, args, required=True)), deploy_part(qat), quantized,
                              program, (images for images, _ in batches))
    written = write_table(out / "similarity", report.header(), report.rows())
    written.append(plot_similarity(report, out / "similarity.png"))
    note = "" if program is not None else f"\n(no integer program: the model is not deployable)\n{check}"
    return f"{report}{note}", written


def _sensitivity(cfg, args, batches, out: Path):
    from hat.debug.plots import plot_bars
    from hat.debug.sensitivity import sensitivity
    from hat.engine.runtime import select_device
    from hat.engine.stages import build_evaluator
    from hat.engine.trainer import evaluate
    from hat.table import write_table

    device = select_device(cfg.trainer.device)
    evaluator = build_evaluator(cfg)
    metric = cfg.trainer.best_metric or evaluator.main_metric
    layers = [n.strip() for n in args.layers.split(",") if n.strip()] if args.layers else []
    qat = _qat_model(cfg, args).to(device)
    known = {name for name, _ in qat.named_modules()}
    unknown = [n for n in layers if n not in known]
    if unknown:
        raise HatError(f"--layers: no module named {', '.join(unknown)} in the QAT model")
    report = sensitivity(qat, _float_model(cfg, args, required=True).to(device),
                         lambda model: evaluate(model, batches, device, evaluator), metric,
                         cfg.trainer.best_mode == "max", args.precision, layers)
    written = write_table(out / "sensitivity", report.header(), report.rows())
    written.append(plot_bars([layer.name for layer in report.layers], [report.gain(layer) for layer in report.layers],
                             f"{metric} gain", f"{metric} with one layer at {args.precision}",
                             out / "sensitivity.png"))
    return report.text(args.suggest), written


RUNNERS = {"summary": _summary, "similarity": _similarity, "sensitivity": _sensitivity}
