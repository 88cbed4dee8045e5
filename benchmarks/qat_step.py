"""QAT train step vs float train step on ResNet-18 (32x32, batch 64, CPU), and vs PyTorch's own eager QAT.

python benchmarks/qat_step.py [--rounds 5] [--steps 10] [--threads 2] [--glibc-default]
The three train steps run interleaved in rounds on the same data; medians of per-round step times. Like every
training stage (trainer.keep_freed_memory, default on), the process keeps freed memory for reuse;
--glibc-default measures with the C library's default allocator behaviour instead.
Targets: hat QAT / float <= 1.3; hat QAT / torch.ao eager QAT <= 1.0.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from hat import ops, quant
from hat.engine.runtime import keep_freed_memory
from hat.models import create_model


def hat_models():
    torch.manual_seed(0)
    float_model = create_model("resnet18", num_classes=10)  # torchvision's architecture (ImageNet stem)
    torch.manual_seed(0)
    qat = quant.prepare_qat(create_model("resnet18", num_classes=10),
                            {"": quant.get_default_qat_qconfig(), "module_name": [("loss", None)]})
    return float_model, qat


def torch_eager_qat():
    """torchvision's quantizable ResNet-18 through torch.ao.quantization's eager QAT flow."""
    from torchvision.models.quantization import resnet18

    torch.manual_seed(0)
    model = resnet18(weights=None, quantize=False, num_classes=10)
    model.train()
    model.fuse_model(is_qat=True)
    model.qconfig = torch.ao.quantization.get_default_qat_qconfig("x86")
    return torch.ao.quantization.prepare_qat(model)


def step_fn(model, hat_style: bool):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    criterion = torch.nn.CrossEntropyLoss()

    def step(images, targets):
        if hat_style:
            loss, _ = model(images, targets)
        else:
            loss = criterion(model(images), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    return step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--glibc-default", action="store_true", help="don't keep freed memory (see docstring)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kept = not args.glibc_default and keep_freed_memory()
    float_model, qat = hat_models()
    steps = {"float": step_fn(float_model, True), "hat_qat": step_fn(qat, True),
             "torch_eager_qat": step_fn(torch_eager_qat(), False)}
    images, targets = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    times: dict[str, list[float]] = {name: [] for name in steps}
    for rnd in range(args.rounds + 1):  # round 0 warms up
        order = list(steps) if rnd % 2 else list(reversed(steps))
        for name in order:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                steps[name](images, targets)
            if rnd:
                times[name].append((time.perf_counter() - t0) / args.steps)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"ResNet-18, 32x32, batch 64, {args.threads} threads, {args.rounds} rounds x {args.steps} steps, "
          f"keep_freed_memory={kept}, hat._C loaded={ops.extension_status().loaded}")
    for name, t in median.items():
        print(f"  {name:16s} {t * 1e3:7.1f} ms/step")
    print(f"hat QAT / float            = {median['hat_qat'] / median['float']:.2f}  (target <= 1.3)")
    print(f"hat QAT / torch eager QAT  = {median['hat_qat'] / median['torch_eager_qat']:.2f}  (target <= 1.0)")


if __name__ == "__main__":
    main()
