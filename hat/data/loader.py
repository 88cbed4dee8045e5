"""DataLoaders from the `data:` config section, with a sampler whose shuffle is a function of (seed, epoch)."""
from __future__ import annotations

from typing import Iterator

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from hat.data.transforms import compose
from hat.registry import build


def build_dataset(data_cfg: DictConfig, split: str) -> Dataset:
    """`data.train` or `data.val` built with its `data.<split>_transforms` list."""
    transforms = data_cfg.get(f"{split}_transforms")
    transform = compose([build(t, f"data.{split}_transforms[{i}]", kind="transform")
                         for i, t in enumerate(transforms or [])])
    return build(data_cfg[split], f"data.{split}", kind="dataset", transform=transform)


def build_loader(dataset: Dataset, data_cfg: DictConfig, train: bool, seed: int,
                 num_replicas: int = 1, rank: int = 0) -> DataLoader:
    """A loader whose order depends only on (seed, epoch): call `loader.sampler.set_epoch(e)` each epoch.

    Training: the same DistributedSampler serves one process and many (rank r of n takes every n-th index of the
    epoch's permutation), so resume and multi-process runs see the same order. Evaluation: each rank takes its
    share of the dataset in order, every image exactly once.
    """
    if train:
        sampler = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                                     drop_last=False)
    else:
        sampler = ShardSampler(dataset, num_replicas, rank, seed)
    batch_size = data_cfg.batch_size if train else (data_cfg.val_batch_size or data_cfg.batch_size)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=data_cfg.num_workers,
                      drop_last=False, generator=torch.Generator().manual_seed(seed),
                      collate_fn=getattr(dataset, "collate_fn", None))


class ShardSampler(Sampler[int]):
    """Indices rank, rank + n, rank + 2n, ...: unlike DistributedSampler no index is repeated to even the shards
    out, so sums over the shards count every image once."""

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        self.num_replicas, self.seed = num_replicas, seed
        self.indices = range(rank, len(dataset), num_replicas)

    def set_epoch(self, epoch: int) -> None:
        """The order is the same every epoch (the loader's generator still seeds random transforms per epoch)."""

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def start_epoch(loader: DataLoader, epoch: int) -> None:
    """Make this epoch's shuffle and worker seeds a function of (seed, epoch) alone, so a resumed run matches."""
    loader.sampler.set_epoch(epoch)
    loader.generator.manual_seed(loader.sampler.seed + epoch)
