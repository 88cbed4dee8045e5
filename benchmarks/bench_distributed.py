"""What training on two processes costs on the CPU (gloo): ResNet-18 QAT step, 32x32 images, global batch 64.

python benchmarks/bench_distributed.py [--model resnet18] [--steps 20] [--rounds 3]
one process (2 threads, batch 64) vs two DDP processes (1 thread, batch 32 each) with the QAT observers
synchronized every step (what the qat stage does) and without (what the synchronization costs). Rounds alternate
the three setups; medians of per-step times. On a 2-core machine two processes cannot beat one with two threads by
much: the numbers show the overhead, not a speed-up.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hat import quant
from hat.models import create_model
from hat.quant.observer import synchronized_observers


def qat_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = quant.prepare_qat(create_model(name, num_classes=10),
                              {"": quant.get_default_qat_qconfig(), "module_name": [("loss", None)]})
    quant.set_fake_quant_state(model, "qat")
    return model.train()


def time_steps(model: torch.nn.Module, batch: int, steps: int) -> float:
    """Median seconds per SGD step on fixed random data (after 3 warm-up steps)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    images, targets = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    times = []
    for i in range(steps + 3):
        start = time.perf_counter()
        loss, _ = model(images, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker(rank: int, args: argparse.Namespace, port: int, sync: bool, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model = qat_model(args.model)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    with synchronized_observers(model, sync):
        seconds = time_steps(ddp, 32, args.steps)
    if rank == 0:
        with open(out, "w") as f:
            f.write(str(seconds))
    dist.destroy_process_group()


def two_processes(args: argparse.Namespace, sync: bool) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.NamedTemporaryFile(suffix=".txt") as out:
        mp.spawn(worker, args=(args, port, sync, out.name), nprocs=2)
        return float(open(out.name).read())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results = {"1 process, 2 threads, batch 64": [], "2 processes, observers synchronized": [],
               "2 processes, observers not synchronized": []}
    for _ in range(args.rounds):
        torch.set_num_threads(2)
        results["1 process, 2 threads, batch 64"].append(time_steps(qat_model(args.model), 64, args.steps))
        results["2 processes, observers synchronized"].append(two_processes(args, True))
        results["2 processes, observers not synchronized"].append(two_processes(args, False))
    base = statistics.median(results["1 process, 2 threads, batch 64"])
    print(f"{args.model} QAT step, global batch 64, median of {args.rounds} rounds x {args.steps} steps")
    for name, values in results.items():
        value = statistics.median(values)
        print(f"  {name:42s} {1000 * value:7.1f} ms  ({value / base:.2f} x one process)")


if __name__ == "__main__":
    main()
