"""How far each torchvision classification model gets through the integer pipeline, and how close it stays to float.

Per model (random init with batch-norm statistics set on the batches, so activations keep their scale instead of
vanishing as in a fresh mobilenet_v3, and zero-initialized heads given small random weights; num_classes 10, batch
4, 64x64, 224 where the architecture needs it): backend.try_pipeline (prepare_qat_fx -> calibration on 2 batches ->
a QAT backward -> convert -> check -> compile -> program == quantized model at batch 4 and 1 and after a .hir
save/load). Cosines against the float model's logits: QAT (validation state), quantized, and PyTorch's own torch.ao
FX QAT flow (x86 qconfig mapping) on the same weights and batches.

    python benchmarks/model_breadth.py [--models resnet18 vit_b_32 ...] [--max-params 100] [--out table.md]
"""
from __future__ import annotations

import argparse
import copy
import multiprocessing
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hat import backend  # noqa: E402
from hat.backend.trial import cosine  # noqa: E402

NEEDS_224 = ("maxvit", "vit_", "swin", "googlenet")  # fixed-size internals or deep downsampling
SIZES = {"inception_v3": 299}  # its stem and 5x5 branches need more than 224


def _inputs(name: str, batches: int = 3) -> list[torch.Tensor]:
    size = SIZES.get(name, 224 if name.startswith(NEEDS_224) else 64)
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(4, 3, size, size, generator=gen) for _ in range(batches)]


def run_torch_ao(float_model: torch.nn.Module, xs: list[torch.Tensor], row: dict) -> None:
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx

    x = xs[0]
    with torch.no_grad():
        reference = float_model(x)
    prepared = prepare_qat_fx(copy.deepcopy(float_model).train(), get_default_qat_qconfig_mapping("x86"), (x,))
    prepared.eval()
    with torch.no_grad():
        for batch in xs[1:]:
            prepared(batch)
        row["cos_torch_ao"] = cosine(convert_fx(prepared)(x), reference)


def _unzero_heads(model: torch.nn.Module) -> None:
    """Layers torchvision initializes to zero (ViT's head) get small random weights: a zero output makes every
    cosine 0 and says nothing."""
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and not m.weight.any():
            torch.nn.init.normal_(m.weight, std=0.02)


def _set_norm_statistics(model: torch.nn.Module, xs: list[torch.Tensor]) -> None:
    """Batch-norm running statistics = those of the batches (cumulative average); weights untouched."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for x in xs:
            model(x)
    model.eval()


def measure(name: str, max_params_m: float, trace: bool = False) -> dict:
    import torchvision

    row = {"model": name, "stage": "-", "bit_exact": "-", "cos_qat": None, "cos_quantized": None,
           "cos_torch_ao": None, "error": ""}
    started = time.perf_counter()
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    row["params_m"] = params
    if params > max_params_m:
        row["error"] = f"skipped: {params:.0f} M parameters > --max-params"
        return row
    row["stage"] = "build"
    xs = _inputs(name)
    _unzero_heads(model)
    try:
        _set_norm_statistics(model, xs)
    except Exception as exc:  # the row says where and why; the next model runs
        row["error"] = " ".join(f"{type(exc).__name__}: {exc}".split())[:160]
    else:
        trial = backend.try_pipeline(model, xs)
        row.update(stage=trial.stage, cos_qat=trial.cos_qat, cos_quantized=trial.cos_quantized,
                   bit_exact={None: "-", True: "yes", False: "NO"}[trial.bit_exact], error=trial.error[:160])
        if trial.exception is not None and trace:
            traceback.print_exception(trial.exception)
    try:
        run_torch_ao(model, xs, row)
    except Exception as exc:
        row["torch_ao_error"] = " ".join(f"{type(exc).__name__}: {exc}".split())[:80]
    row["seconds"] = time.perf_counter() - started
    return row


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def markdown(rows: list[dict]) -> str:
    done = sum(r["stage"] == "bit_exact" for r in rows)
    lines = [f"{done} of {len(rows)} models reach a bit-exact program.", "",
             "| model | M params | furthest stage | bit-exact | cos QAT/float | cos quantized/float | "
             "cos torch.ao/float | s | first error |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        error = r["error"].replace("|", "/")
        lines.append(f"| {r['model']} | {r.get('params_m', 0):.1f} | {r['stage']} | {r['bit_exact']} | "
                     f"{_fmt(r['cos_qat'])} | {_fmt(r['cos_quantized'])} | {_fmt(r['cos_torch_ao'])} | "
                     f"{r.get('seconds', 0):.0f} | {error} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    import torchvision

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", help="default: every torchvision classification model")
    parser.add_argument("--max-params", type=float, default=150.0, help="skip models above this many M parameters")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    parser.add_argument("--trace", action="store_true", help="print each failure's traceback")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    names = args.models or torchvision.models.list_models(module=torchvision.models)
    rows = []
    # one fresh process per model: 80 models in one process grew past 23 GB and were OOM-killed at the 64th
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn, max_tasks_per_child=1) as pool:
        for name in names:
            try:
                rows.append(pool.submit(measure, name, args.max_params, args.trace).result())
            except Exception as exc:  # the process died (out of memory): a row that says so
                rows.append({"model": name, "stage": "-", "bit_exact": "-", "cos_qat": None, "cos_quantized": None,
                             "cos_torch_ao": None, "error": f"the measuring process died: {type(exc).__name__}"})
            r = rows[-1]
            print(f"{name:24s} {r['stage']:12s} {r['bit_exact']:4s} qat {_fmt(r['cos_qat'])} "
                  f"q {_fmt(r['cos_quantized'])} ao {_fmt(r['cos_torch_ao'])} {r.get('seconds', 0):5.0f}s "
                  f"{r['error'][:100]}", flush=True)
    table = markdown(rows)
    print(table)
    if args.out:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
