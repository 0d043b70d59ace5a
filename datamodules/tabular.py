"""Small real tabular classification datasets that ship with scikit-learn."""

from __future__ import annotations

import functools

import numpy as np

from ._base import ArrayDataModule, Splits

__all__ = ["TabularDataModule", "TABULAR_DATASETS"]

#: name -> (scikit-learn loader, number of classes, number of features)
TABULAR_DATASETS = {
    "iris": ("load_iris", 3, 4),
    "wine": ("load_wine", 3, 13),
    "breast_cancer": ("load_breast_cancer", 2, 30),
}


@functools.lru_cache(maxsize=None)
def _load(name: str) -> tuple[np.ndarray, np.ndarray]:
    import sklearn.datasets

    data = getattr(sklearn.datasets, TABULAR_DATASETS[name][0])()
    return data.data.astype(np.float32), data.target.astype(np.int64)


class TabularDataModule(ArrayDataModule):
    """scikit-learn's iris, wine or breast-cancer table, standardised with training-split statistics only.

    Features are centred and scaled by the mean and standard deviation of the *training* split (validation and test
    rows never leak into them). Inputs have shape ``(num_features,)``.

    Args:
        name: one of ``"iris"``, ``"wine"``, ``"breast_cancer"``.
        standardize: apply the train-split standardisation. It uses the exact training mean and std, so it is
            outside any differential-privacy guarantee: ``DPSGDFModule`` refuses it (set ``standardize=False``; the
            module centres and rescales privately).
        **others**: see :class:`~datamodules._base.ArrayDataModule` (default split 60 / 20 / 20: these tables are tiny).

    Example::

        >>> dm = TabularDataModule("wine")
        >>> dm.num_classes, dm.in_features
        (3, 13)
    """

    def __init__(
        self,
        name: str = "iris",
        standardize: bool = True,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        seed: int = 0,
        num_workers: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        if name not in TABULAR_DATASETS:
            raise ValueError(f"Unknown tabular dataset `name={name!r}`; choose one of {sorted(TABULAR_DATASETS)}.")
        super().__init__(batch_size, eval_batch_size, val_fraction, test_fraction, seed, num_workers, shuffle, drop_last)
        self.name = name
        self.standardize = standardize
        self.save_hyperparameters()

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        return TABULAR_DATASETS[self.name][1]

    @property
    def input_shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return (TABULAR_DATASETS[self.name][2],)

    @property
    def data_dependent_transform(self) -> bool:
        """Whether the served features are transformed with exact statistics of the training split (DP modules refuse)."""
        return bool(self.standardize)

    data_dependent_transform_name = "standardize=True: the exact training mean and std"

    def load_arrays(self):
        return _load(self.name)

    def fit_transform(self, splits: Splits) -> Splits:
        if not self.standardize:
            return splits
        x_train = splits["train"][0]
        mean = x_train.mean(axis=0)
        std = x_train.std(axis=0)
        std = np.where(std > 0, std, 1.0)
        self.feature_mean, self.feature_std = mean, std
        return Splits({k: ((x - mean) / std, y) for k, (x, y) in splits.items()})
