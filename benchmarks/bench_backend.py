"""The J5 integer program vs the float and the quantized model (inference, CPU), and compile / save / load costs.

python benchmarks/bench_backend.py [--rounds 10] [--iters 3] [--threads 2] [--compile-runs 5] [--breakdown]
                                   [--glibc-default]
Per model, the same batch through the float model (eval), the quantized model qm(x) and the compiled program
prog.run(x), under torch.inference_mode, interleaved in rounds (order alternating); medians of per-round times
and of per-round ratios. Models: convnet_base (1x28x28, batch 256, prepare_qat of its deploy model) and
torchvision's resnet18(num_classes=10) (3x32x32, batch 64, prepare_qat_fx). Also: backend.compile of ResNet-18,
its op count, .hir save / load time and file size; prog.run(x) == qm(x) exactly (also after load).
--breakdown times each kernel (hat.integer.kernels.KERNELS) inside prog.run and qm(x), and each torch function
inside the conv2d and linear kernels. Like every hat stage (trainer.keep_freed_memory), the process keeps freed
memory for reuse; --glibc-default measures with the C library's default (each large tensor a fresh mmap, page-faulted
in on every call).
Target: program / float <= 2.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections import defaultdict

import torch
import torchvision
from torch.overrides import TorchFunctionMode

from hat import backend
from hat.integer import kernels
from hat.engine.runtime import keep_freed_memory
from hat.models import create_model
from hat.quant import convert, prepare_qat, prepare_qat_fx, set_fake_quant_state


def quantized(float_model, x, fx: bool):
    """prepare (eager or fx), calibrate on a few random batches, convert."""
    q = prepare_qat_fx(float_model, example_inputs=(x,)) if fx else prepare_qat(float_model)
    q.eval()
    set_fake_quant_state(q, "calibration")
    with torch.no_grad():
        for _ in range(4):
            q(torch.randn_like(x))
    set_fake_quant_state(q, "validation")
    return convert(q)


def models():
    """name -> (float model, quantized model, program, batch)."""
    out = {}
    torch.manual_seed(0)
    convnet, x = create_model("convnet_base").deploy_model().eval(), torch.randn(256, 1, 28, 28)
    resnet, y = torchvision.models.resnet18(num_classes=10).eval(), torch.randn(64, 3, 32, 32)
    for name, (model, batch, fx) in {"convnet_base": (convnet, x, False), "resnet18": (resnet, y, True)}.items():
        qm = quantized(model, batch, fx)
        out[name] = (model, qm, backend.compile(qm, example_inputs=(batch,), march="bayes"), batch)
    return out


def timed(fn, x, iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        fn(x)
    return (time.perf_counter() - start) / iters


def compile_costs(qm, x, runs: int):
    compile_s, save_s, load_s = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "resnet18.hir")
        for _ in range(runs):
            t0 = time.perf_counter()
            prog = backend.compile(qm, example_inputs=(x,), march="bayes")
            t1 = time.perf_counter()
            prog.save(path)
            t2 = time.perf_counter()
            loaded = backend.load(path)
            t3 = time.perf_counter()
            compile_s.append(t1 - t0), save_s.append(t2 - t1), load_s.append(t3 - t2)
        size = os.path.getsize(path)
        with torch.inference_mode():
            exact = torch.equal(loaded.run(x), qm(x))
    return {"compile": statistics.median(compile_s), "save": statistics.median(save_s),
            "load": statistics.median(load_s), "size": size, "ops": len(prog.nodes), "exact": exact}


class TorchOpTimes(TorchFunctionMode):
    """ms spent in each torch function (conv2d / linear by input dtype) while active; nested calls not counted twice."""

    def __init__(self):
        super().__init__()
        self.spent: dict[str, float] = defaultdict(float)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in ("conv2d", "linear") and args and isinstance(args[0], torch.Tensor):
            name = f"{name}[{str(args[0].dtype).replace('torch.', '')}]"
        t0 = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        self.spent[name] += (time.perf_counter() - t0) * 1e3
        return out


def breakdown(qm, prog, x, iters: int) -> dict[str, tuple[dict[str, float], dict[str, float]]]:
    """ms per batch in each kernel op inside prog.run and qm(x), and in each torch function inside conv2d + linear."""
    spent: dict[str, float] = defaultdict(float)
    original = dict(kernels.KERNELS)
    inside = TorchOpTimes()

    def timing(op, fn):
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            if op in ("conv2d", "linear"):
                with inside:
                    out = fn(*args, **kwargs)
            else:
                out = fn(*args, **kwargs)
            spent[op] += (time.perf_counter() - t0) * 1e3
            return out
        return run

    result = {}
    try:
        kernels.KERNELS.update({op: timing(op, fn) for op, fn in original.items()})
        with torch.inference_mode():
            for label, fn in (("program", prog.run), ("quantized", qm)):
                fn(x)
                spent.clear(), inside.spent.clear()
                total = timed(fn, x, iters) * 1e3
                ops = {op: t / iters for op, t in spent.items()}
                ops["(outside kernels)"] = total - sum(ops.values())
                result[label] = ops, {op: t / iters for op, t in inside.spent.items()}
    finally:
        kernels.KERNELS.update(original)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile-runs", type=int, default=5)
    parser.add_argument("--breakdown", action="store_true", help="time each kernel inside prog.run and qm(x)")
    parser.add_argument("--glibc-default", action="store_true", help="don't keep freed memory (see docstring)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kept = not args.glibc_default and keep_freed_memory()
    built = models()
    kinds = ("float", "quantized", "program")
    times = {name: {k: [] for k in kinds} for name in built}
    with torch.inference_mode():
        exact = {name: torch.equal(prog.run(x), qm(x)) for name, (_, qm, prog, x) in built.items()}
        for rnd in range(args.rounds + 1):  # round 0 warms up
            for name, (model, qm, prog, x) in built.items():
                fns = dict(zip(kinds, (model, qm, prog.run)))
                for kind in (kinds if rnd % 2 else kinds[::-1]):
                    elapsed = timed(fns[kind], x, args.iters)
                    if rnd:
                        times[name][kind].append(elapsed)
    costs = compile_costs(built["resnet18"][1], built["resnet18"][3], args.compile_runs)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.rounds} rounds x {args.iters} batches, "
          f"inference_mode, keep_freed_memory={kept}; medians (ratios: median of per-round ratios)")
    print("| model | batch | ops | float | quantized | program | program / float | quantized / float | "
          "program == qm |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, (_, _, prog, x) in built.items():
        t = times[name]
        med = {k: statistics.median(v) * 1e3 for k, v in t.items()}
        ratio = {k: statistics.median(a / b for a, b in zip(t[k], t["float"])) for k in ("program", "quantized")}
        print(f"| {name} | {x.shape[0]} | {len(prog.nodes)} | {med['float']:.1f} ms | {med['quantized']:.1f} ms | "
              f"{med['program']:.1f} ms | {ratio['program']:.2f} | {ratio['quantized']:.2f} | {exact[name]} |")
    print(f"\nresnet18 backend.compile {costs['compile'] * 1e3:.0f} ms ({args.compile_runs} runs), {costs['ops']} ops; "
          f".hir save {costs['save'] * 1e3:.1f} ms, load {costs['load'] * 1e3:.1f} ms, "
          f"{costs['size'] / 2 ** 20:.2f} MiB; loaded program == qm: {costs['exact']}")
    print("target: program / float <= 2")
    if args.breakdown:
        print("\nms per batch in each kernel (share of the run); inside conv2d + linear:")
        for name, (_, qm, prog, x) in built.items():
            for label, (ops, inside) in breakdown(qm, prog, x, args.iters * 3).items():
                total = sum(ops.values())
                ops, inside = (sorted(d.items(), key=lambda kv: -kv[1]) for d in (ops, inside))
                print(f"{name} {label} {total:.1f} ms: "
                      + ", ".join(f"{op} {t:.1f} ({t / total:.0%})" for op, t in ops if t >= .05))
                print("    in conv2d + linear: " + ", ".join(f"{op} {t:.1f}" for op, t in inside if t >= .05))
    if not all(exact.values()) or not costs["exact"]:
        raise SystemExit("the program is not bit-exact with the quantized model")


if __name__ == "__main__":
    main()
