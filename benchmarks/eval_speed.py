"""Evaluating a finished run: the float model vs the integer program (and the quantized model), same batches.

python benchmarks/eval_speed.py --config projects/fashion_mnist/convnet.yaml [--threads 2] [overrides...]
After all four stages of the config ran: the float stage's best.pt, the int_infer program (model.hir) and the QAT
checkpoint converted, each run on every validation batch, interleaved per batch (order alternating), under
torch.inference_mode; the time is the models' forward only (the loader and the metrics are shared). Prints the
seconds per pass over the validation set and program / float. Target (issue 18): program faster than float.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hat import backend  # noqa: E402
from hat.checkpoint import load_checkpoint, load_weights  # noqa: E402
from hat.config import load_config, stage_config  # noqa: E402
from hat.data import build_dataset, build_loader  # noqa: E402
from hat.engine.int_infer import PROGRAM_FILE, deploy_part, quantized_models  # noqa: E402
from hat.engine.runtime import keep_freed_memory  # noqa: E402
from hat.engine.stages import build_model  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    cfg = load_config(args.config, args.overrides)
    work_dir = Path(cfg.work_dir)
    float_cfg = stage_config(cfg, "float")
    model = build_model(float_cfg)
    path = work_dir / "float" / "best.pt"
    load_weights(model, load_checkpoint(path, required=("model",))["model"], path, "the config that trained it")
    runs = {"float": deploy_part(model).eval(), "program": backend.load(work_dir / "int_infer" / PROGRAM_FILE),
            "quantized": quantized_models(stage_config(cfg, "qat"), work_dir / "qat" / "best.pt").quantized}
    loader = build_loader(build_dataset(float_cfg.data, "val"), float_cfg.data, train=False, seed=cfg.seed)
    seconds, images = dict.fromkeys(runs, 0.0), 0
    with torch.inference_mode():
        for i, (x, _) in enumerate(loader):
            for name in (list(runs) if i % 2 else list(runs)[::-1]):
                start = time.perf_counter()
                runs[name](x)
                seconds[name] += time.perf_counter() - start
            images += len(x)
    print(f"{images} validation images, {args.threads} thread(s), forward time per pass: "
          + ", ".join(f"{name} {s:.2f} s" for name, s in seconds.items())
          + f"; program / float {seconds['program'] / seconds['float']:.2f}")
    return 0 if seconds["program"] < seconds["float"] else 1


if __name__ == "__main__":
    sys.exit(main())
