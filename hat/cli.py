"""What the tools do (train, predict, check_model, export_onnx, zoo, check_env, ops_doc), callable from Python; each
tool is a two-line wrapper."""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

from hat.errors import HatError

log = logging.getLogger("hat")


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     epilog="Overrides use Hydra's grammar: trainer.epochs=5 +new.key=1 ~scheduler")
    parser.add_argument("--config", help="project YAML, e.g. projects/digits/convnet.yaml")
    parser.add_argument("--stage", help="float | calibration | qat | int_infer (same as the override stage=...)")
    parser.add_argument("overrides", nargs="*", help="Hydra override strings")
    return parser


def _rank() -> Optional[str]:
    """This process's rank under torchrun with several processes (RANK/WORLD_SIZE set by torchrun), else None."""
    return os.environ.get("RANK") if os.environ.get("WORLD_SIZE", "1") != "1" else None


def _setup_logging() -> None:
    """One log per job: under torchrun rank 0 logs, the other ranks only errors (their warnings repeat rank 0's)."""
    rank = _rank()
    tag = f" [rank {rank}]" if rank is not None else ""
    level = logging.INFO if rank in (None, "0") else logging.ERROR
    logging.basicConfig(level=level, format=f"%(asctime)s{tag} %(levelname)s %(message)s", datefmt="%H:%M:%S")


def _load(args: argparse.Namespace):
    from hat.config import load_config

    if not args.config:
        raise HatError("--config FILE is required (e.g. --config projects/digits/convnet.yaml)")
    return load_config(args.config, _overrides(args))


def _overrides(args: argparse.Namespace) -> list[str]:
    """The command line's overrides, --stage as one of them."""
    return list(args.overrides) + ([f"++stage={args.stage}"] if args.stage else [])


def _run(main, argv: Optional[Sequence[str]]) -> int:
    """Run `main`; a user error becomes one `error:` line and exit code 2, never a traceback. Under torchrun the
    line names the rank, and a rank that lost its peers says so (exit code 1) instead of a gloo/NCCL traceback."""
    _setup_logging()
    where = f" (rank {_rank()})" if _rank() is not None else ""
    try:
        return main(argv)
    except HatError as exc:
        print(f"error{where}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an unwritable work_dir, a full disk: the user's environment, not a bug
        print(f"error{where}: {exc.strerror or exc}: {exc.filename or ''}", file=sys.stderr)
        return 2
    except Exception as exc:
        from hat.engine.distributed import peer_failure_message

        message = peer_failure_message(exc)
        if message is None:
            raise
        print(f"error{where}: {message}", file=sys.stderr)
        return 1
    finally:
        if "torch.distributed" in sys.modules:
            from hat.engine.distributed import shutdown

            shutdown()


def train_main(argv: Optional[Sequence[str]] = None) -> int:
    return _run(_train, argv)


def predict_main(argv: Optional[Sequence[str]] = None) -> int:
    return _run(_predict, argv)


def check_model_main(argv: Optional[Sequence[str]] = None) -> int:
    return _run(_check_model, argv)


def zoo_main(argv: Optional[Sequence[str]] = None) -> int:
    return _run(_zoo, argv)


def export_onnx_main(argv: Optional[Sequence[str]] = None) -> int:
    return _run(_export_onnx, argv)


def check_env_main(argv: Optional[Sequence[str]] = None) -> int:
    return _run(_check_env, argv)


def ops_doc_main(argv: Optional[Sequence[str]] = None) -> int:
    return _run(_ops_doc, argv)


OPS_DOC = Path(__file__).resolve().parent.parent / "docs" / "ops.md"


def _ops_doc(argv: Optional[Sequence[str]]) -> int:
    parser = argparse.ArgumentParser(prog="ops_doc.py", description="Write docs/ops.md from the operator table.")
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/ops.md is not up to date")
    args = parser.parse_args(argv)
    from hat.backend.ops_doc import ops_markdown

    text = ops_markdown()
    if args.check:
        current = OPS_DOC.read_text() if OPS_DOC.is_file() else ""
        print(f"{OPS_DOC}: {'up to date' if current == text else 'stale: run python tools/ops_doc.py'}")
        return 0 if current == text else 1
    OPS_DOC.parent.mkdir(exist_ok=True)
    OPS_DOC.write_text(text)
    print(f"wrote {OPS_DOC}")
    return 0


def _check_env(argv: Optional[Sequence[str]]) -> int:
    parser = argparse.ArgumentParser(prog="check_env.py", description="Can this environment train with HAT? "
                                     "Prints one line per check; exit 0 if all pass, 1 if not (with what to do).")
    parser.add_argument("--require-gpu", action="store_true", help="no usable GPU is a failure")
    args = parser.parse_args(argv)
    from hat.env_check import run_checks

    checks = run_checks(args.require_gpu)
    print("\n".join(map(str, checks)))
    failed = [c.name for c in checks if not c.ok]
    print(f"\n{'NOT ready: ' + ', '.join(failed) if failed else 'ready'}")
    return 1 if failed else 0


def _train(argv: Optional[Sequence[str]]) -> int:
    parser = _parser("train.py", "Run one stage of a project config (default: the config's `stage`, float).")
    parser.add_argument("--resume", action="store_true", help="continue from work_dir/<stage>/last.pt")
    parser.add_argument("--resume-from", metavar="CKPT", help="continue from this checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run of the stage")
    parser.add_argument("--list", nargs="?", const="all", metavar="KIND",
                        help="list registered names (all, or one kind: model, dataset, optimizer, ...) and exit")
    parser.add_argument("-m", "--multirun", action="store_true",
                        help="sweep: key=a,b (or range(...)) overrides run one job per combination, one after the "
                             "other, each into work_dir/<n>/, then a summary table (work_dir/multirun.md)")
    parser.add_argument("--cfg", choices=["job"], help="print the composed config (job) and run nothing")
    parser.add_argument("--info", action="store_true", help="print where the config comes from and run nothing")
    args = parser.parse_intermixed_args(argv)
    if args.list:
        return _list(args.list)
    from hat.engine.stages import run_stage

    resume = args.resume_from or ("auto" if args.resume else None)
    if args.multirun and not (args.cfg or args.info):
        from hat.engine.sweep import run_sweep

        if not args.config:
            raise HatError("--config FILE is required (e.g. --config projects/digits/convnet.yaml)")
        run_sweep(args.config, _overrides(args), resume, args.overwrite)
        return 0
    cfg = _load(args)
    if args.cfg or args.info:
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(cfg) if args.cfg else _info(args, cfg), end="")
        return 0
    run_stage(cfg, resume=resume, overwrite=args.overwrite)
    log.info("next: %s", next_command(cfg.stage, args.config, args.overrides))
    return 0


def _info(args: argparse.Namespace, cfg) -> str:
    from hat.config import search_path

    return "\n".join([f"config: {Path(args.config).resolve()}",
                      "search path (defaults: entries): " + ", ".join(map(str, search_path(args.config))),
                      f"overrides: {' '.join(_overrides(args)) or '(none)'}", f"stage: {cfg.stage}",
                      f"work_dir: {cfg.work_dir} (each stage writes work_dir/<stage>/)",
                      f"imports: {list(cfg.imports or [])}", ""])


def next_command(stage: str, config: str, overrides: Sequence[str]) -> str:
    """The command that continues the pipeline after `stage`, with the same config and overrides."""
    from hat.config import STAGE_ORDER

    tail = " ".join([f"--config {config}", *(shlex.quote(o) for o in overrides if not o.startswith("stage="))])
    if stage == STAGE_ORDER[-1]:
        return (f"python tools/predict.py {tail} --stage int_infer --profile   (or tools/export_onnx.py "
                f"{tail} --stage int_infer)")
    return f"python tools/train.py {tail} --stage {STAGE_ORDER[STAGE_ORDER.index(stage) + 1]}"


def _list(kind: str) -> int:
    from hat.registry import kinds, list_registered

    chosen = kinds() if kind == "all" else [kind]
    if kind != "all" and kind not in kinds():
        raise HatError(f"--list: unknown kind '{kind}'; kinds: {', '.join(kinds())}")
    for k in chosen:
        print(f"{k}: {', '.join(list_registered(k))}")
    if "model" in chosen:
        from hat.models import list_models, zoo_index

        entries = list_models(pretrained=True)
        print(f"zoo ({zoo_index.zoo_dir()}; create_model(NAME), or pretrained: zoo:NAME in a config): "
              f"{', '.join(entries) or 'no entries (tools/zoo.py register)'}")
    return 0


ZOO_KINDS = {"float": "float", "calibration": "qat", "qat": "qat", "int_infer": "program"}  # --ckpt zoo:NAME's file


def zoo_checkpoint(ckpt: Optional[str], kind: str) -> Optional[str]:
    """A tool's --ckpt, with `zoo:NAME` replaced by the verified path of that zoo entry's `kind` file."""
    if not ckpt:
        return ckpt
    from hat.models import zoo_index

    return zoo_index.resolve(ckpt, kind)


def _predict(argv: Optional[Sequence[str]]) -> int:
    parser = _parser("predict.py", "Evaluate a stage's checkpoint on the config's validation data.")
    parser.add_argument("--ckpt", help="checkpoint to evaluate (default: work_dir/<stage>/best.pt; for int_infer the "
                                       "integer program, work_dir/int_infer/model.hir); zoo:NAME: the zoo entry's")
    parser.add_argument("--draw", type=int, default=0, metavar="N",
                        help="also draw the predictions (boxes, masks) on the first N validation images into "
                             "work_dir/<stage>/predictions/")
    parser.add_argument("--profile", action="store_true",
                        help="int_infer: also time each op of the integer program on one validation batch (time, "
                             "MACs, bytes, how it ran; slowest first)")
    args = parser.parse_intermixed_args(argv)
    from hat import backend
    from hat.checkpoint import load_checkpoint, load_weights
    from hat.config import stage_config
    from hat.data import build_dataset, build_loader
    from hat.engine.int_infer import PROGRAM_FILE, evaluate_program, structure_postprocess
    from hat.engine.preview import draw_to_folder
    from hat.engine.quant_stages import load_quantized_weights, prepared_model
    from hat.engine.runtime import select_device
    from hat.engine.stages import build_evaluator, build_model
    from hat.engine.trainer import evaluate

    cfg = _load(args)
    cfg = stage_config(cfg, cfg.stage)
    if args.profile and cfg.stage != "int_infer":
        raise HatError(f"--profile times the integer program's ops; it needs --stage int_infer (got '{cfg.stage}')")
    loader = build_loader(build_dataset(cfg.data, "val"), cfg.data, train=False, seed=cfg.seed)
    args.ckpt = zoo_checkpoint(args.ckpt, ZOO_KINDS[cfg.stage])
    if cfg.stage == "int_infer":  # the integer program file
        path = Path(args.ckpt or Path(cfg.work_dir) / "int_infer" / PROGRAM_FILE)
        run, postprocess = backend.load(path), structure_postprocess(cfg)
        metrics = {k: v for k, v in evaluate_program(run, loader, build_evaluator(cfg), postprocess).items()
                   if "/" in k}
    else:
        path = Path(args.ckpt or Path(cfg.work_dir) / cfg.stage / "best.pt")
        quantized = cfg.stage in ("calibration", "qat")
        run = prepared_model(cfg) if quantized else build_model(cfg)
        if quantized:
            load_quantized_weights(run, cfg, path, "evaluate it with the config it was trained with")
        else:
            load_weights(run, load_checkpoint(path, required=("model",))["model"], path,
                         f"evaluate it with the config that trained it (model.type '{cfg.model.type}' here)")
        device = select_device(cfg.trainer.device)
        metrics = evaluate(run.to(device), loader, device, build_evaluator(cfg))
        run, postprocess = run.cpu().eval(), getattr(run, "postprocess", None)
    print(f"{cfg.stage} {path}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    if args.profile:
        print(run.profile(next(iter(loader))[0]).table(top=25))
    if args.draw > 0:
        folder = Path(cfg.work_dir) / cfg.stage / "predictions"
        written = draw_to_folder(run, postprocess, loader, args.draw, folder)
        print(f"{len(written)} images with their predictions written to {folder}")
    return 0


def _check_model(argv: Optional[Sequence[str]]) -> int:
    parser = _parser("check_model.py", "Is the project's model deployable? Prints the report; exit 0 if it is, 1 if "
                                       "not (2: a usage or config error).")
    parser.add_argument("--ckpt", help="calibration/QAT checkpoint (default: work_dir/qat or calibration best.pt, "
                                       "else the float weights calibrated on 2 batches)")
    parser.add_argument("--export", metavar="PATH", help="write the integer program here, even when the check fails "
                                                         "(like HNN_MODEL_EXPORT=1)")
    args = parser.parse_intermixed_args(argv)
    from hat import backend
    from hat.config import stage_config
    from hat.data import build_dataset, build_loader
    from hat.engine.int_infer import model_to_check
    from hat.quant import QuantizationError

    cfg = stage_config(_load(args), "int_infer")
    try:
        qmodel, source = model_to_check(cfg, zoo_checkpoint(args.ckpt, "qat"))
    except QuantizationError as exc:  # the model cannot even run quantized: not deployable, and why
        print(f"{cfg.model.type}: NOT deployable on {cfg.quant.march}: {exc}")
        return 1
    loader = build_loader(build_dataset(cfg.data, "val"), cfg.data, train=False, seed=cfg.seed)
    report = backend.check_model(qmodel, example_inputs=(next(iter(loader))[0],), march=cfg.quant.march)
    print(f"{cfg.model.type}, {source}\n{report}")
    if args.export and report.program is not None:
        print(f"integer program written to {report.program.save(args.export)}")
    return 0 if report.deployable else 1


def _export_onnx(argv: Optional[Sequence[str]]) -> int:
    parser = _parser("export_onnx.py", "Export a stage's model to ONNX (FAQ 2.3 Q3): float, qat (fake quant as "
                                       "QuantizeLinear/DequantizeLinear) or int_infer (the quantized model, QDQ form).")
    parser.add_argument("--ckpt", help="checkpoint (default: work_dir/<stage>/best.pt; int_infer: the QAT one)")
    parser.add_argument("--out", help="ONNX file to write (default: work_dir/<stage>/model.onnx)")
    args = parser.parse_intermixed_args(argv)
    from hat.checkpoint import load_checkpoint, load_weights
    from hat.config import stage_config
    from hat.data import build_dataset, build_loader
    from hat.engine.int_infer import deploy_part, quantized_models
    from hat.engine.stages import build_model
    from hat.quant.onnx_helper import export_quantized_onnx, export_to_onnx

    cfg = _load(args)
    stage = cfg.stage
    cfg = stage_config(cfg, stage)
    source = "qat" if stage == "int_infer" else stage
    ckpt = Path(zoo_checkpoint(args.ckpt, "float" if stage == "float" else "qat")
                or Path(cfg.work_dir) / source / "best.pt")
    out = Path(args.out or Path(cfg.work_dir) / stage / "model.onnx")
    loader = build_loader(build_dataset(cfg.data, "val"), cfg.data, train=False, seed=cfg.seed)
    example = next(iter(loader))[0][:1]
    if stage == "float":
        model = build_model(cfg)
        load_weights(model, load_checkpoint(ckpt, required=("model",))["model"], ckpt,
                     "export it with the config that trained it")
        path = export_to_onnx(deploy_part(model).eval(), example, out)
    elif stage in ("calibration", "qat"):
        path = export_to_onnx(quantized_models(cfg, ckpt).qat, example, out)
    else:
        path = export_quantized_onnx(quantized_models(cfg, ckpt).quantized, example, out, march=cfg.quant.march)
    print(f"{stage} model from {ckpt} written to {path}")
    return 0


def _zoo(argv: Optional[Sequence[str]]) -> int:
    parser = argparse.ArgumentParser(prog="zoo.py", description="The local model zoo ($HAT_HOME/zoo): finished "
                                     "projects' float weights, QAT checkpoint and integer program, reusable with "
                                     "create_model(NAME, pretrained=True), the config key pretrained: zoo:NAME, or "
                                     "--ckpt zoo:NAME of predict, check_model and export_onnx.")
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("register", help="add a project's float/best.pt (and qat/best.pt, int_infer/model.hir "
                                               "when those stages ran) under a name")
    add.add_argument("--config", required=True)
    add.add_argument("--name", help="entry name (default: the project folder and the model, e.g. digits_convnet_small)")
    add.add_argument("--overwrite", action="store_true")
    add.add_argument("overrides", nargs="*")
    commands.add_parser("list", help="the entries, with their metrics and files")
    drop = commands.add_parser("remove", help="delete an entry and its files")
    drop.add_argument("name")
    where = commands.add_parser("path", help="print the verified path of an entry's file")
    where.add_argument("name")
    where.add_argument("--kind", choices=("float", "qat", "program"), default="float")
    args = parser.parse_args(argv)
    from hat.models import zoo_index

    if args.command == "list":
        index = zoo_index.read_index()
        print(f"{zoo_index.zoo_dir()}: {len(index)} entries")
        for name, item in sorted(index.items()):
            metrics = "  ".join(f"{k} {v:.4g}" for k, v in item.get("metrics", {}).items())
            print(f"  {name:28s} {item['model'].get('type', '?'):16s} {metrics}  files: "
                  f"{'+'.join(zoo_index.artifacts(item))}  sha256 {item['sha256'][:12]}")
        return 0
    if args.command == "remove":
        zoo_index.remove(args.name)
        print(f"removed {args.name}")
        return 0
    if args.command == "path":
        print(zoo_index.verified_checkpoint(args.name, args.kind))
        return 0
    from omegaconf import OmegaConf

    from hat.checkpoint import load_checkpoint

    args.stage = None
    cfg = _load(args)
    work_dir = Path(cfg.work_dir)
    checkpoint, qat, program = (work_dir / "float" / "best.pt", work_dir / "qat" / "best.pt",
                                work_dir / "int_infer" / "model.hir")
    finished = (work_dir / "int_infer" / "metrics.json").is_file()  # the program passed the check and was evaluated
    name = args.name or f"{Path(args.config).resolve().parent.name}_{cfg.model.type}"
    state_metrics = load_checkpoint(checkpoint, required=("model",)).get("metrics") or {}
    item = zoo_index.register_checkpoint(name, checkpoint, OmegaConf.to_container(cfg.model, resolve=True),
                                         dict(state_metrics), OmegaConf.to_yaml(cfg), args.overwrite,
                                         qat if qat.is_file() else None,
                                         program if finished and program.is_file() else None)
    files = zoo_index.artifacts(item)
    print(f"registered {name} ({cfg.model.type}, {checkpoint}) in {zoo_index.zoo_dir()}, sha256 {item['sha256']}; "
          f"files: {', '.join(zoo_index.ARTIFACTS[k] for k in files)}"
          + ("" if "program" in files else " (not deployable yet: run the qat and int_infer stages, then register "
                                           "again with --overwrite)"))
    return 0
