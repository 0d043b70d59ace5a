"""Long-tailed view of a classification datamodule: an exponentially imbalanced training split, balanced val/test."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_methods.robust_distillation import dataset_labels

__all__ = ["LongTailedDataModule", "long_tailed_counts"]


def long_tailed_counts(n_max: int, num_classes: int, imbalance_ratio: float) -> list[int]:
    """The exponential profile ``n_c = floor(n_max * rho^(-c / (C - 1)))``, at least 1 (Cao et al. 2019; the
    CIFAR-LT profile of Wang et al. 2023, Sec. 5), so class 0 has ``n_max`` examples and class ``C - 1``
    ``n_max / rho``.

    Example::

        >>> long_tailed_counts(100, 3, 100.0)
        [100, 10, 1]
    """
    if isinstance(n_max, bool) or not isinstance(n_max, int) or n_max < 1:
        raise ValueError(f"`n_max` must be a positive integer, got {n_max!r}.")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"`num_classes` must be an integer >= 2, got {num_classes!r}.")
    if isinstance(imbalance_ratio, bool) or not isinstance(imbalance_ratio, (int, float)) or not imbalance_ratio >= 1:
        raise ValueError(f"`imbalance_ratio` must be a number >= 1 (n_max / n_min), got {imbalance_ratio!r}.")
    # the small epsilon keeps exact powers (100 * 100^(-1/2) = 10) from rounding down to 9
    return [max(1, int(np.floor(n_max * imbalance_ratio ** (-c / (num_classes - 1)) + 1e-9))) for c in range(num_classes)]


class LabelledSubset(Dataset):
    """Rows ``indices`` of a ``(x, y)`` dataset, with their labels as ``y`` (read without loading the inputs)."""

    def __init__(self, dataset: Dataset, indices: np.ndarray, labels: np.ndarray) -> None:
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        self.y = torch.as_tensor(labels[self.indices], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[int(self.indices[index])]


class LongTailedDataModule(pl.LightningDataModule):
    """Make a datamodule's training split long-tailed; make its validation and test splits balanced.

    The standard long-tail protocol (CIFAR-10/100-LT of Cao et al. 2019, used by Wang et al. 2023, *Robust
    Distillation for Worst-class Performance*, Sec. 5): class ``c`` keeps ``n_c = n_max * rho^(-c/(C-1))`` training
    examples (class 0 the head, class ``C-1`` the tail, ``rho = imbalance_ratio = n_0 / n_{C-1}``), chosen with a
    seeded generator, so every DDP rank and every run with the same ``seed`` sees the same subset. The validation and
    test splits are cut to the same number of examples in every class (the smallest class count of that split), so
    their accuracy is the balanced accuracy and every class is there: the held-out **balanced validation set with
    true labels** from which class-DRO's multipliers are learnt.

    ``class_priors`` (the training class frequencies ``pi``) and ``class_counts`` are exposed for logit adjustment
    and reweighting; :class:`lightning_methods.RobustClassifierModule` and
    :class:`lightning_methods.RobustDistillationModule` read them from here when not given. ``num_classes``,
    ``input_shape``, ``in_features``, ``in_channels``, ``input_size``, ``batch_size`` and ``augment`` are those of
    the wrapped datamodule, so the CLI links them into models as usual.

    Args:
        base: the datamodule to wrap (any whose ``train_dataset`` / ``val_dataset`` / ``test_dataset`` yield
            ``(x, y)`` after ``setup``; every classification datamodule of this package).
        imbalance_ratio: ``rho >= 1``, the head-to-tail ratio of training class sizes (1 keeps it balanced).
        n_max: training examples of the head class (default: the smallest class count of the base training split,
            so every class can supply its share).
        val_per_class: validation examples per class (default: the smallest class count of the base validation split).
        test_per_class: test examples per class (default: likewise).
        seed: seed of the subsampling.

    Example::

        >>> from datamodules import DigitsDataModule
        >>> dm = LongTailedDataModule(DigitsDataModule(batch_size=32), imbalance_ratio=10)
        >>> dm.setup("fit"); dm.class_counts[:3], dm.class_counts[-1], round(sum(dm.class_priors), 6)
        ([121, 93, 72], 12, 1.0)
    """

    def __init__(
        self,
        base: pl.LightningDataModule,
        imbalance_ratio: float = 100.0,
        n_max: int | None = None,
        val_per_class: int | None = None,
        test_per_class: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(base, pl.LightningDataModule):
            raise TypeError(f"`base` must be a LightningDataModule (the datamodule to wrap), got {type(base).__name__}.")
        if isinstance(imbalance_ratio, bool) or not isinstance(imbalance_ratio, (int, float)) or not imbalance_ratio >= 1:
            raise ValueError(f"`imbalance_ratio` must be a number >= 1 (n_max / n_min), got {imbalance_ratio!r}.")
        for name, value in (("n_max", n_max), ("val_per_class", val_per_class), ("test_per_class", test_per_class)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"`{name}` must be a positive integer or None, got {value!r}.")
        self.base = base
        self.imbalance_ratio = float(imbalance_ratio)
        self.n_max = n_max
        self.val_per_class = val_per_class
        self.test_per_class = test_per_class
        self.seed = seed
        self.train_dataset: LabelledSubset | None = None
        self.val_dataset: LabelledSubset | None = None
        self.test_dataset: LabelledSubset | None = None
        #: training examples per class after subsampling (class order as the labels)
        self.class_counts: list[int] = []

    # What the CLI links into the model comes from the wrapped datamodule.
    @property
    def num_classes(self) -> int:
        return self.base.num_classes

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.base.input_shape

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def in_channels(self) -> int:
        return self.base.in_channels

    @property
    def input_size(self) -> int:
        return self.base.input_size

    @property
    def batch_size(self) -> int:
        return getattr(self.base, "batch_size", 64)

    @property
    def eval_batch_size(self) -> int:
        return getattr(self.base, "eval_batch_size", None) or self.batch_size

    @property
    def augment(self) -> bool:
        return bool(getattr(self.base, "augment", False))

    @property
    def class_priors(self) -> list[float]:
        """The training class frequencies ``pi_c = n_c / sum n`` (known after ``setup``)."""
        if not self.class_counts:
            self.setup("fit")
        total = sum(self.class_counts)
        return [n / total for n in self.class_counts]

    def prepare_data(self) -> None:
        self.base.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        self.base.setup("fit")
        num_classes = self.num_classes
        rng = np.random.default_rng(self.seed)
        datasets = {}
        for split in ("train", "val", "test"):
            dataset = getattr(self.base, f"{split}_dataset", None)
            if dataset is None and split == "test":
                self.base.setup("test")
                dataset = getattr(self.base, "test_dataset", None)
            if dataset is None:
                raise ValueError(
                    f"{type(self.base).__name__} has no `{split}_dataset` after setup; LongTailedDataModule needs "
                    "train, val and test datasets of (x, y) pairs."
                )
            datasets[split] = dataset
        labels = {split: dataset_labels(d).numpy() for split, d in datasets.items()}
        for split, y in labels.items():
            counts = np.bincount(y, minlength=num_classes)
            if len(counts) > num_classes or (counts == 0).any():
                raise ValueError(
                    f"The base {split} split has class counts {counts.tolist()} for `num_classes={num_classes}`: every "
                    "class must appear in every split (enlarge the base datamodule's split fractions)."
                )
        train_counts = np.bincount(labels["train"], minlength=num_classes)
        n_max = self.n_max if self.n_max is not None else int(train_counts.min())
        wanted = long_tailed_counts(n_max, num_classes, self.imbalance_ratio)
        short = [c for c in range(num_classes) if train_counts[c] < wanted[c]]
        if short:
            raise ValueError(
                f"`n_max={n_max}` asks for {[wanted[c] for c in short]} training examples of classes {short}, which have "
                f"only {[int(train_counts[c]) for c in short]}: lower `n_max` (at most {int(train_counts.min())} always works)."
            )
        self.class_counts = wanted
        self.train_dataset = LabelledSubset(datasets["train"], self._pick(labels["train"], wanted, rng), labels["train"])
        for split, per_class in (("val", self.val_per_class), ("test", self.test_per_class)):
            counts = np.bincount(labels[split], minlength=num_classes)
            per_class = int(counts.min()) if per_class is None else per_class
            if per_class > counts.min():
                raise ValueError(
                    f"`{split}_per_class={per_class}` but the base {split} split has only {int(counts.min())} examples of "
                    f"class {int(counts.argmin())}: lower it or leave it None."
                )
            subset = LabelledSubset(datasets[split], self._pick(labels[split], [per_class] * num_classes, rng), labels[split])
            setattr(self, f"{split}_dataset", subset)

    @staticmethod
    def _pick(labels: np.ndarray, counts: list[int], rng: np.random.Generator) -> np.ndarray:
        chosen = [rng.choice(np.flatnonzero(labels == c), n, replace=False) for c, n in enumerate(counts)]
        # sorted: the base split's (already shuffled) order, so the rows are not grouped by class
        return np.sort(np.concatenate(chosen))

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        workers = getattr(self.base, "num_workers", 0)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=shuffle and bool(getattr(self.base, "drop_last", False)),
            num_workers=workers,
            persistent_workers=workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        return self._loader(self.train_dataset, self.batch_size, bool(getattr(self.base, "shuffle", True)))

    def val_dataloader(self) -> DataLoader:
        self.setup("fit")
        return self._loader(self.val_dataset, self.eval_batch_size, False)

    def test_dataloader(self) -> DataLoader:
        self.setup("test")
        return self._loader(self.test_dataset, self.eval_batch_size, False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
