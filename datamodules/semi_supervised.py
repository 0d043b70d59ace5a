"""Semi-supervised view of a classification datamodule: ``n`` labels per class, the rest of the training set unlabelled."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset, Subset

__all__ = ["SemiSupervisedDataModule", "InputsOnly"]


class InputsOnly(Dataset):
    """The inputs of a ``(x, y)`` dataset without their labels, so unlabelled batches cannot leak them."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.dataset[index][0]


def _labels(dataset: Dataset) -> np.ndarray:
    """Class labels of a ``(x, y)`` dataset: its ``y`` / ``targets`` tensor when it has one, else read one by one."""
    for attr in ("y", "targets"):
        labels = getattr(dataset, attr, None)
        if labels is not None:
            return np.asarray(torch.as_tensor(labels).cpu()).astype(np.int64)
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))], dtype=np.int64)  # type: ignore[arg-type]


class SemiSupervisedDataModule(pl.LightningDataModule):
    """Keep ``labels_per_class`` labels per class of a datamodule's training split; the rest becomes unlabelled.

    Wraps any classification datamodule whose ``train_dataset`` yields ``(x, y)`` (every datamodule of this
    package): the labelled subset is chosen per class with a seeded generator from the training split only, so it is
    identical on every DDP rank and in every run with the same ``seed``; validation and test come from the wrapped
    datamodule unchanged. This is the standard semi-supervised protocol of ICT (Verma et al. 2019) and of the
    mixup-linearity paper (Chaudhry et al. 2022), e.g. 10 labels per class.

    Training batches are a dict ``{"labeled": [x, y], "unlabeled": u}`` (Lightning's ``CombinedLoader`` in
    ``max_size_cycle`` mode: an epoch is one pass over the unlabelled data, the small labelled loader cycles, and
    its batches are always full). With ``labeled_only=True`` training batches are plain ``[x, y]`` lists of the
    labelled subset, for supervised baselines (``ClassifierModule``, ``MixupCallback``) on the same labels.

    ``num_classes``, ``input_shape``, ``in_features``, ``in_channels`` and ``input_size`` are those of the wrapped
    datamodule, so the CLI links them into the model as usual.

    Args:
        datamodule: the datamodule to wrap (its training split is divided; its ``batch_size`` is the labelled
            batch size unless ``labeled_batch_size`` is given).
        labels_per_class: labelled examples kept per class.
        labeled_batch_size: batch size of labelled batches (default: the wrapped datamodule's ``batch_size``,
            capped at the number of labelled examples).
        unlabeled_batch_size: batch size of unlabelled batches (default: the wrapped ``batch_size``).
        unlabeled_includes_labeled: also put the labelled examples (without labels) into the unlabelled pool.
        labeled_only: yield only the labelled subset, as ``[x, y]`` lists.
        seed: seed of the choice of labelled examples.

    Example::

        >>> from datamodules import DigitsDataModule
        >>> dm = SemiSupervisedDataModule(DigitsDataModule(batch_size=32), labels_per_class=10)
        >>> dm.setup("fit"); len(dm.labeled_dataset), len(dm.unlabeled_dataset), dm.num_classes
        (100, 1158, 10)
    """

    def __init__(
        self,
        datamodule: pl.LightningDataModule,
        labels_per_class: int = 10,
        labeled_batch_size: int | None = None,
        unlabeled_batch_size: int | None = None,
        unlabeled_includes_labeled: bool = False,
        labeled_only: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(datamodule, pl.LightningDataModule):
            raise TypeError(f"`datamodule` must be a LightningDataModule, got {type(datamodule).__name__}.")
        if isinstance(labels_per_class, bool) or not isinstance(labels_per_class, int) or labels_per_class < 1:
            raise ValueError(f"`labels_per_class` must be a positive integer, got {labels_per_class!r}.")
        for name, value in (("labeled_batch_size", labeled_batch_size), ("unlabeled_batch_size", unlabeled_batch_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"`{name}` must be a positive integer or None, got {value!r}.")
        self.datamodule = datamodule
        self.labels_per_class = labels_per_class
        default_batch = getattr(datamodule, "batch_size", 64)
        self.labeled_batch_size = labeled_batch_size or default_batch
        self.unlabeled_batch_size = unlabeled_batch_size or default_batch
        self.unlabeled_includes_labeled = unlabeled_includes_labeled
        self.labeled_only = labeled_only
        self.seed = seed
        self.labeled_indices: np.ndarray | None = None
        self.unlabeled_indices: np.ndarray | None = None
        self.labeled_dataset: Dataset | None = None
        self.unlabeled_dataset: Dataset | None = None

    # What the CLI links into the model comes from the wrapped datamodule; an attribute it lacks (``in_channels``
    # of tabular data) is missing here too.
    @property
    def num_classes(self) -> int:
        return self.datamodule.num_classes

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.datamodule.input_shape

    @property
    def in_features(self) -> int:
        return self.datamodule.in_features

    @property
    def in_channels(self) -> int:
        return self.datamodule.in_channels

    @property
    def input_size(self) -> int:
        return self.datamodule.input_size

    def prepare_data(self) -> None:
        self.datamodule.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        self.datamodule.setup(stage or "fit")
        if stage not in (None, "fit") or self.labeled_dataset is not None:
            return
        train = getattr(self.datamodule, "train_dataset", None)
        if train is None:
            raise ValueError(
                f"{type(self.datamodule).__name__} has no `train_dataset` after setup('fit'); "
                "SemiSupervisedDataModule needs one of (x, y) pairs to split."
            )
        labels = _labels(train)
        rng = np.random.default_rng(self.seed)
        chosen = []
        for c in np.unique(labels):
            members = np.flatnonzero(labels == c)
            if len(members) < self.labels_per_class:
                raise ValueError(
                    f"Class {c} has only {len(members)} training examples, fewer than `labels_per_class="
                    f"{self.labels_per_class}`. Lower `labels_per_class`."
                )
            chosen.append(rng.choice(members, self.labels_per_class, replace=False))
        self.labeled_indices = np.sort(np.concatenate(chosen))
        rest = np.setdiff1d(np.arange(len(labels)), self.labeled_indices)
        self.unlabeled_indices = np.arange(len(labels)) if self.unlabeled_includes_labeled else rest
        if len(self.unlabeled_indices) == 0 and not self.labeled_only:
            raise ValueError("No unlabelled examples are left: lower `labels_per_class`.")
        self.labeled_dataset = Subset(train, self.labeled_indices.tolist())
        self.unlabeled_dataset = InputsOnly(Subset(train, self.unlabeled_indices.tolist()))

    def _loader(self, dataset: Dataset, batch_size: int, drop_last: bool) -> DataLoader:
        workers = getattr(self.datamodule, "num_workers", 0)
        return DataLoader(
            dataset, batch_size=batch_size, shuffle=True, drop_last=drop_last, num_workers=workers,
            persistent_workers=workers > 0,
        )

    def labeled_dataloader(self) -> DataLoader:
        """Shuffled batches of the labelled subset; always full (the remainder changes every pass)."""
        if self.labeled_dataset is None:
            self.setup("fit")
        # each DDP rank gets 1/world of the labelled set: keep at least one full batch per rank
        world = self.trainer.world_size if self.trainer is not None else 1
        batch_size = max(1, min(self.labeled_batch_size, len(self.labeled_dataset) // world))  # type: ignore[arg-type]
        return self._loader(self.labeled_dataset, batch_size, drop_last=True)  # type: ignore[arg-type]

    def unlabeled_dataloader(self) -> DataLoader:
        """Shuffled batches of unlabelled inputs (tensors, no labels)."""
        if self.unlabeled_dataset is None:
            self.setup("fit")
        return self._loader(self.unlabeled_dataset, self.unlabeled_batch_size, drop_last=False)  # type: ignore[arg-type]

    def train_dataloader(self) -> Any:
        if self.labeled_only:
            return self.labeled_dataloader()
        loaders = {"labeled": self.labeled_dataloader(), "unlabeled": self.unlabeled_dataloader()}
        return CombinedLoader(loaders, mode="max_size_cycle")

    def val_dataloader(self) -> Any:
        return self.datamodule.val_dataloader()

    def test_dataloader(self) -> Any:
        return self.datamodule.test_dataloader()

    def predict_dataloader(self) -> Any:
        return self.datamodule.predict_dataloader()
