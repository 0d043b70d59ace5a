"""SemiSupervisedDataModule: n labels per class from the training split, the rest unlabelled."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datamodules import DigitsDataModule, MNIST1DDataModule, SemiSupervisedDataModule, TabularDataModule


def _dm(**kwargs):
    dm = SemiSupervisedDataModule(DigitsDataModule(batch_size=32), **kwargs)
    dm.setup("fit")
    return dm


def test_split_has_n_labels_per_class_and_the_rest_unlabelled():
    dm = _dm(labels_per_class=7, seed=3)
    train_y = dm.datamodule.train_dataset.y.numpy()
    labeled_y = train_y[dm.labeled_indices]
    assert np.bincount(labeled_y, minlength=10).tolist() == [7] * 10
    assert len(np.intersect1d(dm.labeled_indices, dm.unlabeled_indices)) == 0
    assert len(dm.labeled_indices) + len(dm.unlabeled_indices) == len(train_y)
    # the labelled examples are the wrapped training examples with their labels
    x, y = dm.labeled_dataset[0]
    i = dm.labeled_indices[0]
    assert torch.equal(x, dm.datamodule.train_dataset.x[i]) and int(y) == train_y[i]


def test_seeded_and_identical_across_instances():
    a, b, c = _dm(seed=1), _dm(seed=1), _dm(seed=2)
    assert np.array_equal(a.labeled_indices, b.labeled_indices)
    assert not np.array_equal(a.labeled_indices, c.labeled_indices)
    assert np.array_equal(_dm(unlabeled_includes_labeled=True).unlabeled_indices, np.arange(len(a.datamodule.train_dataset)))


def test_training_batches():
    dm = _dm(labels_per_class=10, labeled_batch_size=32, unlabeled_batch_size=48)
    loader = dm.train_dataloader()
    batches = [b for b, _, _ in loader]
    assert len(batches) == -(-len(dm.unlabeled_dataset) // 48)  # an epoch is one pass over the unlabelled data
    for batch in batches:
        x, y = batch["labeled"]
        assert x.shape == (32, 1, 8, 8) and y.shape == (32,)  # labelled batches always full, cycling
        u = batch["unlabeled"]
        assert isinstance(u, torch.Tensor) and u.shape[1:] == (1, 8, 8)  # inputs only: no labels to leak
    assert batches[0]["unlabeled"].shape[0] == 48
    labeled_only = _dm(labels_per_class=10, labeled_only=True).train_dataloader()
    x, y = next(iter(labeled_only))
    assert x.shape == (32, 1, 8, 8) and len(labeled_only) == 3  # 100 labels / 32, full batches


def test_delegates_what_the_cli_links_and_evaluation_loaders():
    dm = _dm()
    assert (dm.num_classes, dm.in_features, dm.in_channels, dm.input_size, dm.input_shape) == (10, 64, 1, 8, (1, 8, 8))
    assert len(dm.val_dataloader().dataset) == len(dm.datamodule.val_dataset)
    assert len(dm.test_dataloader().dataset) == len(dm.datamodule.test_dataset)
    tab = SemiSupervisedDataModule(TabularDataModule("wine"), labels_per_class=5)
    assert tab.num_classes == 3 and tab.in_features == 13 and not hasattr(tab, "in_channels")


def test_errors():
    with pytest.raises(ValueError, match="labels_per_class"):
        SemiSupervisedDataModule(DigitsDataModule(), labels_per_class=0)
    with pytest.raises(TypeError, match="LightningDataModule"):
        SemiSupervisedDataModule(object())
    with pytest.raises(ValueError, match=r"Class \d has only \d+ training examples.*Lower `labels_per_class`"):
        _dm(labels_per_class=500)
    with pytest.raises(ValueError, match="labeled_batch_size"):
        SemiSupervisedDataModule(MNIST1DDataModule(num_samples=200), labeled_batch_size=0)
