"""The J5 integer program against the float model and PyTorch's own int8 model (torch.ao, x86), inference on the CPU.

python benchmarks/bench_backend.py [--rounds 10] [--iters 3] [--threads 1] [--batch 16] [--size 64] [--zoo]
                                   [--profile] [--compile-runs 3]
Per model, the same weights and the same 4 calibration batches give HAT's quantized model and integer program and
torch.ao's x86 int8 model (prepare_fx / convert_fx with the "x86" qconfig mapping). One batch then runs through the
float model, torch.ao's model, HAT's quantized model qm(x) and the program prog.run(x), under torch.inference_mode,
interleaved in rounds (order alternating); medians of per-round times and of per-round ratios. The program is
checked bit-exact against qm(x) and against its reference kernels (prog.run(x, reference=True)) in the same run.
Models: torchvision resnet18 and mobilenet_v2 (num_classes=10, random init, 3 x size x size); --zoo adds HAT's zoo
models (convnet_base at 1x28x28, the others at 3 x size x size). --profile prints each program's slowest ops.
Targets (issue 18): program / float <= 0.5 and program / torch.ao <= 1.5 on resnet18 and mobilenet_v2.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import tempfile
import time
import warnings
from typing import Callable, Optional

import torch
import torchvision

from hat import backend
from hat.engine.runtime import keep_freed_memory
from hat.integer.fast import int8_gemm_is_exact
from hat.models import create_model
from hat.quant import convert, prepare_qat, prepare_qat_fx, set_fake_quant_state

TARGETS = {"program / float": 0.5, "program / torch.ao": 1.5}


def hat_quantized(float_model, batches, fx: bool):
    """prepare (eager or fx), calibrate on the batches, convert."""
    q = prepare_qat_fx(float_model, example_inputs=(batches[0],)) if fx else prepare_qat(float_model)
    q.eval()
    set_fake_quant_state(q, "calibration")
    with torch.no_grad():
        for x in batches:
            q(x)
    set_fake_quant_state(q, "validation")
    return convert(q)


def torch_ao_quantized(float_model, batches) -> Optional[torch.nn.Module]:
    """torch.ao's x86 int8 model of the same weights, calibrated on the same batches; None when it can't build one."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prepared = prepare_fx(float_model, get_default_qconfig_mapping("x86"), (batches[0],))
            with torch.no_grad():
                for x in batches:
                    prepared(x)
            return convert_fx(prepared).eval()
    except Exception as exc:  # a model torch.ao's tracer or qconfig can't take: no column for it
        print(f"  torch.ao: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
        return None


def models(batch: int, size: int, zoo: bool) -> dict:
    """name -> (float model, torch.ao model or None, HAT quantized model, program, input batch)."""
    torch.manual_seed(0)
    picked = {name: (ctor(num_classes=10).eval(), (3, size, size), True)
              for name, ctor in (("resnet18", torchvision.models.resnet18),
                                 ("mobilenet_v2", torchvision.models.mobilenet_v2))}
    if zoo:
        for name in ("convnet_base", "resnet18", "mobilenet_v2"):
            shape = (1, 28, 28) if name.startswith("convnet") else (3, size, size)
            extra = {"in_channels": shape[0], **({"cifar_stem": True} if name == "resnet18" else {})}
            picked[f"zoo:{name}"] = (create_model(name, num_classes=10, **extra).deploy_model().eval(), shape, False)
    out = {}
    for name, (model, shape, fx) in picked.items():
        calibration = [torch.randn(batch, *shape) for _ in range(4)]
        qm = hat_quantized(model, calibration, fx)
        program = backend.compile(qm, example_inputs=(calibration[0],), march="bayes")
        out[name] = (model, torch_ao_quantized(model, calibration), qm, program, torch.randn(batch, *shape))
    return out


def timed(fn: Callable, x: torch.Tensor, iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        fn(x)
    return (time.perf_counter() - start) / iters


def load_costs(program, x, runs: int) -> dict:
    """.hir save and load (load validates and prepacks), and the loaded program's first run."""
    save_s, load_s = [], []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.hir")
        for _ in range(runs):
            t0 = time.perf_counter()
            program.save(path)
            t1 = time.perf_counter()
            loaded = backend.load(path)
            load_s.append(time.perf_counter() - t1), save_s.append(t1 - t0)
        size = os.path.getsize(path)
    with torch.inference_mode():
        exact = torch.equal(loaded.run(x), program.run(x))
    return {"save": statistics.median(save_s), "load": statistics.median(load_s), "size": size, "exact": exact}


def cpu_description() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return platform.processor()
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    flags = set(fields.get("Flags", "").split())
    wanted = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return f"{fields.get('Model name', '?').strip()} ({', '.join(wanted) or 'no avx2'})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--zoo", action="store_true", help="also HAT's zoo models")
    parser.add_argument("--profile", action="store_true", help="print each program's slowest ops")
    parser.add_argument("--compile-runs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kept = keep_freed_memory()
    built = models(args.batch, args.size, args.zoo)
    kinds = ("float", "torch.ao", "quantized", "program")
    times = {name: {k: [] for k in kinds} for name in built}
    with torch.inference_mode():
        exact = {name: torch.equal(prog.run(x), qm(x)) and torch.equal(prog.run(x, reference=True), qm(x))
                 for name, (_, _, qm, prog, x) in built.items()}
        for rnd in range(args.rounds + 1):  # round 0 warms up
            for name, (model, ao, qm, prog, x) in built.items():
                fns = {k: f for k, f in zip(kinds, (model, ao, qm, prog.run)) if f is not None}
                for kind in (list(fns) if rnd % 2 else list(fns)[::-1]):
                    elapsed = timed(fns[kind], x, args.iters)
                    if rnd:
                        times[name][kind].append(elapsed)
    print(f"{cpu_description()}; torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}, "
          f"{args.rounds} rounds x {args.iters} batches, inference_mode, keep_freed_memory={kept}, exact int8 GEMM: "
          f"{int8_gemm_is_exact()}; medians (ratios: median of per-round ratios)")
    print("| model | input | ops | float | torch.ao int8 | HAT quantized | HAT program | program / float | "
          "program / torch.ao | quantized / float | bit-exact |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    met = True
    for name, (_, ao, _, prog, x) in built.items():
        t = times[name]
        med = {k: statistics.median(v) * 1e3 if v else float("nan") for k, v in t.items()}

        def ratio(a: str, b: str) -> float:
            return statistics.median(p / q for p, q in zip(t[a], t[b])) if t[a] and t[b] else float("nan")

        vs_float, vs_ao = ratio("program", "float"), ratio("program", "torch.ao")
        if not name.startswith("zoo:"):
            met &= vs_float <= TARGETS["program / float"] and vs_ao <= TARGETS["program / torch.ao"]
        print(f"| {name} | {'x'.join(map(str, x.shape))} | {len(prog.nodes)} | {med['float']:.1f} ms | "
              f"{med['torch.ao']:.1f} ms | {med['quantized']:.1f} ms | {med['program']:.1f} ms | **{vs_float:.2f}** | "
              f"**{vs_ao:.2f}** | {ratio('quantized', 'float'):.2f} | {exact[name]} |")
    name = next(iter(built))
    costs = load_costs(built[name][3], built[name][4], args.compile_runs)
    print(f"\n{name}: .hir save {costs['save'] * 1e3:.1f} ms, load (validate + prepack) {costs['load'] * 1e3:.1f} ms, "
          f"{costs['size'] / 2 ** 20:.2f} MiB; loaded program == program: {costs['exact']}")
    print(f"targets: program / float <= {TARGETS['program / float']}, program / torch.ao <= "
          f"{TARGETS['program / torch.ao']} (resnet18, mobilenet_v2): {'met' if met else 'NOT met'}")
    if args.profile:
        for name, (_, _, _, prog, x) in built.items():
            print(f"\n{name}: " + prog.profile(x).table(top=12))
    if not all(exact.values()) or not costs["exact"]:
        raise SystemExit("the program is not bit-exact with the quantized model")


if __name__ == "__main__":
    main()
