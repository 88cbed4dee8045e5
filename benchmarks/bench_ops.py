"""hat's fused fake-quant kernels vs PyTorch's own ops, forward + backward, at ResNet-18 sizes.

python benchmarks/bench_ops.py [--rounds 7] [--iters 20] [--threads 2] [--device cpu|cuda]
Per-channel fake quant (axis 0 for weights, axis 1 for activations) vs torch.fake_quantize_per_channel_affine
(target: hat >= 1.5x its speed), and LSQ vs torch._fake_quantize_learnable_per_channel_affine (target >= 3x).
Interleaved rounds on the same tensors; medians of per-round times.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from hat import ops

WEIGHTS = [(64, 64, 3, 3), (128, 128, 3, 3), (256, 256, 3, 3), (512, 512, 3, 3)]
ACTIVATIONS = [(64, 64, 16, 16), (64, 64, 8, 8), (64, 128, 4, 4), (64, 512, 1, 1)]  # batch 64 at 32x32


def candidates(shape, axis, device):
    x = torch.randn(shape, device=device, requires_grad=True)
    channels = shape[axis]
    scale = torch.rand(channels, device=device) * 0.02 + 0.005
    zero_point = torch.zeros(channels, dtype=torch.int32, device=device)
    learned = scale.clone().requires_grad_()
    grad = torch.randn(shape, device=device)
    grad_factor = 1.0 / (x.numel() / channels * 127) ** 0.5

    def run(fn):
        def step():
            x.grad = learned.grad = None
            fn().backward(grad)
        return step

    return {
        "fake_quant": (run(lambda: ops.fake_quant(x, scale, axis, -128, 127)),
                       run(lambda: torch.fake_quantize_per_channel_affine(x, scale, zero_point, axis, -128, 127))),
        "lsq": (run(lambda: ops.lsq_fake_quant(x, learned, axis, -128, 127, grad_factor=grad_factor)),
                run(lambda: torch._fake_quantize_learnable_per_channel_affine(
                    x, learned, zero_point.float(), axis, -128, 127, grad_factor))),
    }


def timed(step, iters: int, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    status = ops.extension_status()
    print(f"hat._C loaded={status.loaded} cuda={status.cuda}; torch {torch.__version__}; device {args.device}; "
          f"{args.threads} threads; {args.rounds} rounds x {args.iters} iterations, forward + backward")
    targets = {"fake_quant": 1.5, "lsq": 3.0}
    print(f"{'op':10s} {'shape':18s} {'axis':>4s} {'hat ms':>8s} {'torch ms':>9s} {'speedup':>8s}")
    speedups: dict[str, list[float]] = {name: [] for name in targets}
    for shapes, axis in ((WEIGHTS, 0), (ACTIVATIONS, 1)):
        for shape in shapes:
            for name, (ours, theirs) in candidates(shape, axis, args.device).items():
                times = {"hat": [], "torch": []}
                for rnd in range(args.rounds + 1):  # round 0 warms up
                    order = [("hat", ours), ("torch", theirs)]
                    for label, step in (order if rnd % 2 else order[::-1]):
                        elapsed = timed(step, args.iters, args.device)
                        if rnd:
                            times[label].append(elapsed)
                    del order
                hat_ms, torch_ms = (statistics.median(times[k]) * 1e3 for k in ("hat", "torch"))
                speedups[name].append(torch_ms / hat_ms)
                print(f"{name:10s} {str(shape):18s} {axis:4d} {hat_ms:8.3f} {torch_ms:9.3f} {torch_ms / hat_ms:7.2f}x")
    for name, target in targets.items():
        values = speedups[name]
        print(f"{name}: speedup min {min(values):.2f}x, median {statistics.median(values):.2f}x "
              f"(target >= {target}x)")


if __name__ == "__main__":
    main()
