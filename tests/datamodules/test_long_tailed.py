"""LongTailedDataModule: the exponential training profile, balanced validation/test splits, priors, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datamodules import DigitsDataModule, LongTailedDataModule, MNIST1DDataModule
from datamodules.long_tailed import long_tailed_counts


def test_profile_by_hand():
    assert long_tailed_counts(100, 3, 100.0) == [100, 10, 1]
    assert long_tailed_counts(50, 2, 1.0) == [50, 50]
    # n_c = n_max * rho^(-c/(C-1)), floored, at least 1
    counts = long_tailed_counts(121, 10, 10.0)
    assert counts == [int(np.floor(121 * 10 ** (-c / 9) + 1e-9)) for c in range(10)]
    assert long_tailed_counts(10, 3, 1000.0)[-1] == 1


@pytest.mark.parametrize("rho", [10, 100])
def test_training_split_follows_the_profile_and_eval_splits_are_balanced(rho):
    dm = LongTailedDataModule(DigitsDataModule(batch_size=32), imbalance_ratio=rho)
    dm.setup("fit")
    train_counts = torch.bincount(dm.train_dataset.y, minlength=10).tolist()
    assert train_counts == dm.class_counts == long_tailed_counts(dm.class_counts[0], 10, rho)
    assert dm.class_counts[-1] == max(1, dm.class_counts[0] // rho)
    for split in ("val", "test"):
        counts = torch.bincount(getattr(dm, f"{split}_dataset").y, minlength=10)
        assert counts.min() == counts.max() > 0
    assert sum(dm.class_priors) == pytest.approx(1.0)
    assert dm.class_priors[0] > dm.class_priors[-1]
    # labels served by the dataset are the ones recorded
    x, y = dm.train_dataset[3]
    assert int(y) == int(dm.train_dataset.y[3]) and x.shape == (1, 8, 8)
    assert dm.num_classes == 10 and dm.in_features == 64 and dm.input_shape == (1, 8, 8)


def test_deterministic_and_disjoint_from_eval_splits():
    a = LongTailedDataModule(MNIST1DDataModule(num_samples=1000), imbalance_ratio=10, seed=3)
    b = LongTailedDataModule(MNIST1DDataModule(num_samples=1000), imbalance_ratio=10, seed=3)
    a.setup("fit"), b.setup("fit")
    assert np.array_equal(a.train_dataset.indices, b.train_dataset.indices)
    assert np.array_equal(a.val_dataset.indices, b.val_dataset.indices)
    batch = next(iter(a.train_dataloader()))
    assert batch[0].shape[1:] == (40,) and len(batch) == 2
    c = LongTailedDataModule(MNIST1DDataModule(num_samples=1000), imbalance_ratio=10, seed=4)
    c.setup("fit")
    assert not np.array_equal(a.train_dataset.indices, c.train_dataset.indices)


def test_sizes_given_by_hand_and_errors():
    dm = LongTailedDataModule(DigitsDataModule(), imbalance_ratio=4, n_max=40, val_per_class=10, test_per_class=20)
    dm.setup("fit")
    assert dm.class_counts[0] == 40 and dm.class_counts[-1] == 10
    assert len(dm.val_dataset) == 100 and len(dm.test_dataset) == 200
    with pytest.raises(ValueError, match="imbalance_ratio"):
        LongTailedDataModule(DigitsDataModule(), imbalance_ratio=0.5)
    with pytest.raises(TypeError, match="LightningDataModule"):
        LongTailedDataModule(object(), imbalance_ratio=10)
    with pytest.raises(ValueError, match="lower `n_max`"):
        LongTailedDataModule(DigitsDataModule(), imbalance_ratio=10, n_max=10_000).setup("fit")
    with pytest.raises(ValueError, match="val_per_class"):
        LongTailedDataModule(DigitsDataModule(), imbalance_ratio=10, val_per_class=1000).setup("fit")
