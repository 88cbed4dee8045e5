"""Augmentations on float CHW tensors, registered so configs can list them: `[{type: RandomCrop, size: 32}]`."""
from __future__ import annotations

from typing import Sequence

from torchvision.transforms import v2

from hat.registry import register


@register(kind="transform")
def RandomCrop(size: int, padding: int = 0) -> v2.RandomCrop:
    return v2.RandomCrop(size, padding=padding)


@register(kind="transform")
def Resize(size: int) -> v2.Resize:
    """Bilinear resize to size x size (e.g. 8x8 digits for a network built for 32x32 inputs)."""
    return v2.Resize((size, size), antialias=True)


@register(kind="transform")
def RandomHorizontalFlip(p: float = 0.5) -> v2.RandomHorizontalFlip:
    return v2.RandomHorizontalFlip(p)


@register(kind="transform")
def RandomAffine(degrees: float = 0.0, translate: Sequence[float] | None = None) -> v2.RandomAffine:
    return v2.RandomAffine(degrees, translate=translate)


def compose(transforms: Sequence | None) -> v2.Compose | None:
    """The built transforms of a config list as one callable; None when the list is empty."""
    return v2.Compose(list(transforms)) if transforms else None
