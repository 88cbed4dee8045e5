"""Look-up-table accuracy and speed: every op of hat/quant/optable.OPS as J5 integer tables, against f in float64.

python benchmarks/lut_accuracy.py [--repeats 50] [--no-softmax] [--softmax-rows 2000]
Per op: the largest and mean error in output LSBs over every input integer of the int8 exact table (int8 in, int8
out) and of the segmented table (int16 in, int16 out and int8 out; --splits for the dividing-point rules), the
error measured against f(q * s_in) / s_out before rounding, saturated, NaN -> 0. Then the time of
kernels.segment_lookup on a 1x64x56x56 int16 tensor against kernels.requantize of the same tensor. Prints Markdown.

--softmax (on by default; --no-softmax skips it): kernels.softmax_lut with lut.softmax_params (as QuantizedSoftmax
builds them) for softmax and log_softmax over 10, 100 and 1000 classes, int8/int16 in x int8/int16 out: random logits
(--softmax-rows rows, N(0, 3)) quantized with scale amax / 127.5 or / 32767.5 (kernels.quantize), against float64
softmax / log_softmax of the dequantized integers divided by the output scale (1 / divisor for softmax, 16 / divisor
for log_softmax), saturated; log_softmax references below the output range (they saturate) are left out.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hat.integer import kernels, lut  # noqa: E402
from hat.integer.profile import J5  # noqa: E402
from hat.quant.optable import OPS, reference  # noqa: E402

# op -> (input amax, output amax): scale = amax / J5.scale_divisor(dtype) (the same as tests/backend/test_lut.py)
RANGES = {"sigmoid": (8, 1), "tanh": (8, 1), "silu": (8, 8), "hardswish": (8, 8), "hardsigmoid": (8, 1),
          "gelu": (8, 8), "gelu_tanh": (8, 8), "exp": (8, 8), "log": (8, 8), "reciprocal": (8, 16),
          "sqrt": (8, 8 ** 0.5), "rsqrt": (8, 16), "pow": (8, 64), "leaky_relu": (8, 8), "elu": (8, 8),
          "softplus": (8, 8), "mish": (8, 8)}


def error(op, q: torch.Tensor, y: torch.Tensor, s_in: float, s_out: float, out_dtype: str) -> tuple[float, float]:
    """(max, mean) of |y - f(q s_in) / s_out| in output LSBs, the ideal saturated and NaN -> 0."""
    qmin, qmax = J5.qrange(out_dtype)
    ideal = torch.nan_to_num(reference(op, q.double() * s_in) / s_out, nan=0.0, posinf=qmax, neginf=qmin)
    e = (y.double() - ideal.clamp(qmin, qmax)).abs()
    return float(e.max()), float(e.mean())


def scales(op, in_dtype: str, out_dtype: str) -> tuple[float, float]:
    in_amax, out_amax = RANGES[op.name]
    return in_amax / J5.scale_divisor(in_dtype), out_amax / J5.scale_divisor(out_dtype)


def exact(op) -> tuple[float, float]:
    q = torch.arange(-128, 128, dtype=torch.int8)
    s_in, s_out = scales(op, "qint8", "qint8")
    table = lut.exact_table(lambda x: reference(op, x), s_in, "qint8", s_out, "qint8", J5)
    return error(op, q, kernels.lookup(q, table=table, out_dtype="qint8"), s_in, s_out, "qint8")


def segmented(op, out_dtype: str, split: str) -> tuple[float, float]:
    q = torch.arange(-32768, 32768, dtype=torch.int16)
    s_in, s_out = scales(op, "qint16", out_dtype)
    params = lut.segment_table(lambda x: reference(op, x), s_in, "qint16", s_out, out_dtype, odd=op.odd,
                               split=split, profile=J5)
    return error(op, q, kernels.segment_lookup(q, **params), s_in, s_out, out_dtype)


SOFTMAX_CLASSES = (10, 100, 1000)
SOFTMAX_STD = 3.0  # logits ~ N(0, 3)
LOG_SOFTMAX_AMAX = 16.0  # log_softmax output amax; softmax's is 1


def softmax_error(classes: int, in_dtype: str, out_dtype: str, log: bool, rows: int) -> tuple[float, float, float]:
    """(max, mean, share left out) of |softmax_lut - f(q s_in) / s_out| in output LSBs over `rows` random rows of
    `classes` logits, f = softmax or log_softmax in float64 on the dequantized integers, the ideal saturated above;
    log_softmax ideals below the output range (saturated by design) are left out."""
    x = torch.randn(rows, classes, generator=torch.Generator().manual_seed(classes), dtype=torch.float64)
    x = x * SOFTMAX_STD
    s_in = float(x.abs().max()) / J5.scale_divisor(in_dtype)
    q = kernels.quantize(x, scale=torch.tensor(s_in, dtype=torch.float64), dtype=in_dtype)
    s_out = (LOG_SOFTMAX_AMAX if log else 1.0) / J5.scale_divisor(out_dtype)
    params = lut.softmax_params(s_in, in_dtype, s_out, out_dtype, log=log, profile=J5)
    y = kernels.softmax_lut(q, dim=-1, **params)
    ideal = (torch.log_softmax if log else torch.softmax)(q.double() * s_in, -1) / s_out
    qmin, qmax = J5.qrange(out_dtype)
    kept = ideal >= qmin
    e = (y.double() - ideal.clamp(qmin, qmax)).abs()[kept]
    return float(e.max()), float(e.mean()), 1.0 - float(kept.double().mean())


def softmax_section(rows: int) -> None:
    pairs = [(i, o) for i in ("qint8", "qint16") for o in ("qint8", "qint16")]
    head = ["op", "classes"] + [f"{i[1:]} -> {o[1:]} max/mean" for i, o in pairs] + ["left out (saturated)"]
    print(f"\nsoftmax_lut against float64 ({rows} rows of N(0, {SOFTMAX_STD:g}) logits, output amax 1 for softmax, "
          f"{LOG_SOFTMAX_AMAX:g} for log_softmax), error in output LSBs:\n")
    print("| " + " | ".join(head) + " |\n|" + " --- |" * len(head))
    for log in (False, True):
        for classes in SOFTMAX_CLASSES:
            results = [softmax_error(classes, i, o, log, rows) for i, o in pairs]
            cells = ["log_softmax" if log else "softmax", str(classes)]
            cells += ["%.2f / %.3f" % r[:2] for r in results]
            cells.append("%.1f%%" % (100 * max(r[2] for r in results)))
            print("| " + " | ".join(cells) + " |")


def timed(fn, repeats: int) -> tuple[float, float]:
    """(median, min) milliseconds of fn() after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), min(times)


def cpu_model() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--splits", nargs="+", default=["minimax", "evenly", "curvature"], choices=lut.SPLITS)
    parser.add_argument("--softmax", action=argparse.BooleanOptionalAction, default=True,
                        help="the softmax / log_softmax section (default: on)")
    parser.add_argument("--softmax-rows", type=int, default=2000)
    args = parser.parse_args()
    head = ["op", "int8 exact max/mean"] + [f"int16->{o} {s} max/mean" for s in args.splits for o in ("int16", "int8")]
    print("| " + " | ".join(head) + " |\n|" + " --- |" * len(head))
    for op in OPS:
        cells = [op.name, "%.2f / %.3f" % exact(op)]
        cells += ["%.2f / %.3f" % segmented(op, o, s) for s in args.splits for o in ("qint16", "qint8")]
        print("| " + " | ".join(cells) + " |")
    x = torch.randint(-32768, 32768, (1, 64, 56, 56), generator=torch.Generator().manual_seed(0), dtype=torch.int16)
    s_in, s_out = 8 / J5.scale_divisor("qint16"), 1 / J5.scale_divisor("qint16")
    params = lut.segment_table(torch.sigmoid, s_in, "qint16", s_out, "qint16", profile=J5)
    lookup = timed(lambda: kernels.segment_lookup(x, **params), args.repeats)
    requantize = timed(lambda: kernels.requantize(x, 20000, 15, "qint16"), args.repeats)
    small = x.reshape(-1)[:65536]
    direct = timed(lambda: kernels.segment_lookup(small, **params), args.repeats)
    print(f"\n{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}; 1x64x56x56 int16 "
          f"(median / min of {args.repeats}):")
    print(f"- segment_lookup: {lookup[0]:.2f} / {lookup[1]:.2f} ms")
    print(f"- requantize: {requantize[0]:.2f} / {requantize[1]:.2f} ms (ratio of medians "
          f"{lookup[0] / requantize[0]:.1f}x)")
    print(f"- segment_lookup on 65536 elements (computed directly, no expansion): {direct[0]:.2f} / {direct[1]:.2f} ms")
    if args.softmax:
        softmax_section(args.softmax_rows)


if __name__ == "__main__":
    main()
