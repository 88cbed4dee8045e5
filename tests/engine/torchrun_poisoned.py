"""torchrun worker for test_distributed: train digits where one training image is NaN, so exactly one rank meets
it. Usage: torchrun ... tests/engine/torchrun_poisoned.py --config projects/digits/convnet.yaml [overrides]"""
import sys

import torch

from hat.cli import train_main
from hat.data.datasets import DigitsDataset
from hat.registry import register

POISONED_INDEX = 5


@register(kind="dataset")
class PoisonedDigits(DigitsDataset):
    def __getitem__(self, index: int):
        image, label = super().__getitem__(index)
        return (torch.full_like(image, float("nan")) if index == POISONED_INDEX else image), label


if __name__ == "__main__":
    sys.exit(train_main())
