"""Split sizes mean what the docstring says, and a split that leaves a class untrained is refused."""

import numpy as np
import pytest

from datamodules import ArrayDataModule, TabularDataModule


def test_fractions_are_of_the_whole_dataset():
    dm = TabularDataModule("iris", val_fraction=0.5, test_fraction=0.3)
    dm.setup("fit")
    sizes = {k: len(v[1]) for k, v in dm.splits.items()}
    assert sizes == {"train": 30, "val": 75, "test": 45}  # 150 rows: 50% / 30% of all of them, the rest trains


class _OneRareClass(ArrayDataModule):
    num_classes = 3
    input_shape = (2,)

    def load_arrays(self):
        y = np.array([0] * 10 + [1] * 10 + [2])  # one example of class 2: the split cannot stratify
        return np.random.default_rng(0).normal(size=(len(y), 2)).astype(np.float32), y


def test_a_split_without_training_rows_of_a_class_is_refused():
    for seed in range(20):  # some seed puts the single class-2 example outside the training split
        dm = _OneRareClass(val_fraction=0.3, test_fraction=0.3, seed=seed)
        try:
            dm.setup("fit")
        except ValueError as err:
            assert "no training example of class(es) [2]" in str(err) and "lower them" in str(err)
            return
        assert 2 in dm.splits["train"][1].tolist()
    pytest.fail("no seed left class 2 out of training: the check was never exercised")
