"""What flows through the engine for any task: a batch is `(images, targets)`, where targets may be a label tensor
(classification), a semantic mask (segmentation) or a list of per-image dicts (detection); a loss is a tensor or a
dict of named terms."""
from __future__ import annotations

from typing import Any, Union

import torch
from torch.utils._pytree import tree_map

Loss = Union[torch.Tensor, dict[str, torch.Tensor]]


def to_device(value: Any, device: torch.device | str) -> Any:
    """Every tensor in a (nested) batch moved to `device`; anything else unchanged."""
    return tree_map(lambda x: x.to(device, non_blocking=True) if isinstance(x, torch.Tensor) else x, value)


def total_loss(loss: Loss) -> torch.Tensor:
    """The sum of a loss dict's terms (the tensor itself for a single loss): what backward runs on."""
    if isinstance(loss, dict):
        if not loss:
            raise ValueError("the model returned an empty loss dict")
        return sum(loss.values())
    return loss


def loss_terms(loss: Loss) -> dict[str, float]:
    """A loss dict's terms as floats for logging (`train/loss_cls`, ...); empty for a single tensor."""
    return {name: float(value.detach()) for name, value in loss.items()} if isinstance(loss, dict) else {}
