"""Trainer vs a bare PyTorch loop: same model, data, seed, optimizer and schedule, epochs interleaved.

python benchmarks/trainer_overhead.py [--model convnet_base] [--rounds 20] [--epochs 3] [--threads 2]
Prints the median time per step of each and the median of the per-round ratios (target: Trainer / bare <= 1.03).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hat.config import load_config  # noqa: E402
from hat.data import build_dataset, build_loader, start_epoch  # noqa: E402
from hat.engine.callbacks import ProgressCallback, TensorBoardCallback  # noqa: E402
from hat.engine.optim import build_optimizer  # noqa: E402
from hat.engine.stages import build_model  # noqa: E402
from hat.engine.trainer import Trainer  # noqa: E402
from hat.registry import build  # noqa: E402

CONFIG = Path(__file__).resolve().parent.parent / "projects" / "digits" / "convnet.yaml"


def setup(model_name: str, seed: int = 0):
    cfg = load_config(CONFIG, [f"model.type={model_name}", "trainer.epochs=100"])
    torch.manual_seed(seed)
    model = build_model(cfg)
    loader = build_loader(build_dataset(cfg.data, "train"), cfg.data, train=True, seed=seed)
    optimizer, _ = build_optimizer(cfg, model.parameters())
    scheduler = build(cfg.scheduler, kind="scheduler", optimizer=optimizer, epochs=100, steps_per_epoch=len(loader))
    return cfg, model, loader, optimizer, scheduler


def bare_epoch(model, loader, optimizer, scheduler, epoch: int) -> None:
    start_epoch(loader, epoch)
    model.train()
    for images, targets in loader:
        loss, _ = model(images, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="convnet_base")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds; each runs both loops, order alternating")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per loop per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-callbacks", action="store_true", help="the bare Trainer loop, without TB/progress")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    _, *bare = setup(args.model)
    cfg, model, loader, optimizer, scheduler = setup(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        # the per-step callbacks a user runs with: TensorBoard scalars and the progress bar
        callbacks = [TensorBoardCallback(Path(tmp) / "tb", cfg.trainer.log_interval), ProgressCallback(bar=True)]
        callbacks = [] if args.no_callbacks else callbacks
        trainer = Trainer(model, optimizer, loader, epochs=0, scheduler=scheduler, callbacks=callbacks,
                          log_interval=cfg.trainer.log_interval)

        def run_bare() -> float:
            t0 = time.perf_counter()
            for _ in range(args.epochs):
                bare_epoch(*bare, epoch=trainer.epoch)
            return time.perf_counter() - t0

        def run_trainer() -> float:
            t0 = time.perf_counter()
            trainer.epochs += args.epochs
            trainer.fit()  # a whole fit(): its start/finish cost is counted too
            return time.perf_counter() - t0

        ratios, bare_times, trainer_times = [], [], []
        for rnd in range(args.rounds + 1):  # round 0 warms both up
            if rnd % 2:
                b, t = run_bare(), run_trainer()
            else:
                t, b = run_trainer(), run_bare()
            if rnd:
                ratios.append(t / b)
                bare_times.append(b)
                trainer_times.append(t)
    steps = len(loader) * args.epochs
    print(f"model {args.model}, digits, batch {cfg.data.batch_size}, {len(loader)} steps/epoch, "
          f"{args.threads} threads, "
          f"{args.rounds} rounds x {args.epochs} epochs per loop, order alternating, "
          f"callbacks: {'none' if args.no_callbacks else 'TensorBoard + progress bar'}")
    print(f"bare loop  {statistics.median(bare_times) * 1e3 / steps:.2f} ms/step (median)")
    print(f"Trainer    {statistics.median(trainer_times) * 1e3 / steps:.2f} ms/step (median)")
    print(f"ratio Trainer / bare = {statistics.median(ratios):.3f} (median of rounds; min {min(ratios):.3f}, "
          f"max {max(ratios):.3f}; target <= 1.03)")


if __name__ == "__main__":
    main()
