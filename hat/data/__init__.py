"""Datasets, transforms and loaders; importing this package registers them."""
from hat.data import coco, datasets, transforms  # noqa: F401  (registration)
from hat.data.loader import build_dataset, build_loader, start_epoch

__all__ = ["build_dataset", "build_loader", "start_epoch"]
