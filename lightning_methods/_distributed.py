"""Whole-split computations across DDP ranks: every row exactly once, in dataset order, on every rank.

Anything a technique computes from a whole split (a kNN memory, thresholds, quantiles, per-class errors, corpus
embeddings) must not depend on how many processes computed it. The convention here is the one of an unshuffled
``DistributedSampler``: rank ``r`` of ``W`` handles rows ``r, r + W, r + 2W, ...``. Lightning's validation and test
samplers are exactly that, except that they pad the last round with duplicates of the first rows so every rank has
the same number of batches; :func:`gather_in_order` drops those duplicates, so the result equals the 1-process array.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

__all__ = ["world", "rank_shard", "gather_in_order", "map_in_order"]


def world() -> tuple[int, int]:
    """``(world_size, rank)`` of the initialised process group, ``(1, 0)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def rank_shard(n: int) -> range:
    """The rows ``rank, rank + world, ...`` of ``range(n)`` this rank handles (no padding)."""
    size, rank = world()
    return range(rank, n, size)


def gather_in_order(local: torch.Tensor, n: int) -> torch.Tensor:
    """Rows ``0 .. n - 1`` on every rank, from each rank's rows ``rank, rank + world, ...``.

    Args:
        local: this rank's rows, in order. It may hold the ``ceil(n / world)`` rows of an unshuffled, padded
            ``DistributedSampler`` (its padding duplicates are dropped) or only the ``len(rank_shard(n))`` real ones.
        n: the number of rows of the whole split.

    Returns:
        ``(n, *local.shape[1:])`` on every rank; ``local`` itself in one process.
    """
    size, _ = world()
    if size == 1:
        if len(local) < n:
            raise ValueError(f"gather_in_order: got {len(local)} rows for a split of {n} in one process.")
        return local[:n]
    per_rank = -(-n // size)
    if len(local) > per_rank:
        raise ValueError(f"gather_in_order: this rank holds {len(local)} rows, more than ceil({n} / {size}) = {per_rank}.")
    # every rank must send the same shape: pad (the padding rows land beyond row n and are cut off)
    padded = local.new_zeros((per_rank, *local.shape[1:]))
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded.contiguous())
    return torch.stack(parts, dim=1).reshape(per_rank * size, *local.shape[1:])[:n]


def map_in_order(
    data: Dataset | DataLoader,
    fn: Callable[[Any], torch.Tensor | Sequence[torch.Tensor]],
    batch_size: int = 256,
    collate_fn: Callable | None = None,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Apply ``fn`` to every batch of a map-style dataset, split across ranks, and gather the rows in order.

    Each rank runs ``fn`` on its rows ``rank, rank + world, ...`` only, so the work is shared; the result equals the
    1-process result on every rank.

    Args:
        data: a map-style dataset, or a DataLoader over one (its dataset and ``collate_fn`` are used; its sampler,
            shuffling included, is not).
        fn: maps a collated batch to a tensor ``(B, ...)`` or a tuple of them (moving the batch to a device is its job).
        batch_size: examples per call of ``fn``.
        collate_fn: how to collate examples (default: the DataLoader's, or PyTorch's default collate).

    Returns:
        A tensor ``(len(data), ...)`` or a tuple of them, on the device ``fn`` returned.
    """
    if isinstance(data, DataLoader):
        data, collate_fn = data.dataset, collate_fn or data.collate_fn
    if isinstance(data, IterableDataset) or not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
        raise TypeError(f"Needs a map-style dataset (indexable, with a length), got {type(data).__name__}.")
    n = len(data)
    size, _ = world()
    if n < size:
        raise ValueError(f"The dataset has {n} examples, fewer than the {size} processes that share it.")
    # indexed directly, not through a DataLoader iterator, which draws a seed from the global RNG: a whole-split
    # pass in the middle of training must not change the training run's shuffles
    collate_fn = collate_fn or default_collate
    shard = rank_shard(n)
    outputs: list[tuple[torch.Tensor, ...]] = []
    single = False
    for start in range(0, len(shard), batch_size):
        indices = list(shard[start : start + batch_size])
        # fetched as a DataLoader fetches: a dataset with __getitems__ returns the batch its collate_fn expects
        # (the datamodules' batched view returns it already collated, for a pass-through collate_fn)
        getitems = getattr(data, "__getitems__", None)
        out = fn(collate_fn(getitems(indices) if getitems is not None else [data[i] for i in indices]))
        single = isinstance(out, torch.Tensor)
        outputs.append((out,) if single else tuple(out))
    if not outputs:
        raise ValueError("map_in_order: the dataset is empty.")
    local = [torch.cat(column) for column in zip(*outputs)]
    gathered = tuple(gather_in_order(t, n) for t in local)
    return gathered[0] if single else gathered
