"""The main job end to end, timed: float -> calibration -> qat -> int_infer on a project, with accuracy targets.

python benchmarks/accuracy.py --config projects/fashion_mnist/convnet.yaml [--work-dir DIR] [overrides ...]
Runs every stage in this process (as tools/train.py does, --overwrite), prints one table (the evaluator's main
metric per stage: top-1, mAP or mIoU; wall time per stage) and checks the targets: float >= --min-float (default
93.0) and integer program >= float - --max-drop (default 0.3). Exit code 0 when both hold, 1 when not. The results
also land in DIR/accuracy.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hat.config import STAGE_ORDER, load_config  # noqa: E402
from hat.engine.stages import build_evaluator, run_stage  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--work-dir", help="default: the config's work_dir")
    parser.add_argument("--min-float", type=float, default=93.0)
    parser.add_argument("--max-drop", type=float, default=0.3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    overrides = [*args.overrides, "trainer.progress_bar=false"]
    overrides += [f"work_dir={args.work_dir}"] if args.work_dir else []
    cfg = load_config(args.config, overrides)
    key = build_evaluator(cfg).main_metric
    results = {}
    for stage in STAGE_ORDER:
        start = time.perf_counter()
        metrics = run_stage(cfg, stage, overwrite=True)
        results[stage] = {key: metrics.get(f"best/{key}", metrics[key]),  # best.pt's: what the next stage reads "seconds": time.perf_counter() - start, "metrics": metrics}
    float_value, program_value = results["float"][key], results["int_infer"][key]
    passed = float_value >= args.min_float and program_value >= float_value - args.max_drop
    lines = [f"{args.config} ({' '.join(args.overrides) or 'no overrides'})", "", f"| stage | {key} % | wall time |",
             "| --- | --- | --- |"]
    lines += [f"| {stage} | {r[key]:.2f} | {r['seconds']:.0f} s |" for stage, r in results.items()]
    int_metrics = results["int_infer"]["metrics"]
    agreement = int_metrics.get("val/agreement_qat_int")
    lines += ["", f"quantized model {int_metrics[key + '_quantized']:.2f}"
              + (f", QAT vs program agreement {agreement:.2f}%" if agreement is not None else "")
              + f", program vs quantized: {int(int_metrics['val/bit_exact_mismatches'])} differing elements",
              f"targets: float >= {args.min_float} and program >= float - {args.max_drop}: "
              f"{'met' if passed else 'NOT met'}"]
    print("\n".join(lines))
    (Path(cfg.work_dir) / "accuracy.json").write_text(json.dumps(results, indent=2))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
