"""Cost of checkpoint integrity: content sha256 and fsync'd atomic write vs a bare torch.save/torch.load.

python benchmarks/checkpoint_io.py   (ResNet-18 CIFAR stem + SGD momentum state, 85 MiB; medians of 5)
"""
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hat.checkpoint import content_checksum, load_checkpoint, save_checkpoint  # noqa: E402
from hat.models import create_model  # noqa: E402


def median_ms(fn, n: int = 5) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    torch.set_num_threads(2)
    model = create_model("resnet18", num_classes=10, cifar_stem=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))[0].backward()
    optimizer.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    folder = tempfile.mkdtemp()
    plain, checked = f"{folder}/plain.pt", f"{folder}/checked.pt"
    times = {"torch.save": median_ms(lambda: torch.save(state, plain)),
             "content_checksum": median_ms(lambda: content_checksum(state)),
             "save_checkpoint": median_ms(lambda: save_checkpoint(state, checked)),
             "torch.load": median_ms(lambda: torch.load(plain, weights_only=True)),
             "load_checkpoint": median_ms(lambda: load_checkpoint(checked))}
    print(f"{os.path.getsize(checked) / 2**20:.1f} MiB: " + "; ".join(f"{k} {v:.0f} ms" for k, v in times.items()))


if __name__ == "__main__":
    main()
