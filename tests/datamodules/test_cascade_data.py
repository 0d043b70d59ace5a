"""DeferralDataModule (held-out data for the deferral rule) and FailureModeDataModule (specialist, label noise,
prior shift) on MNIST-1D."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datamodules import DeferralDataModule, DigitsDataModule, FailureModeDataModule, MNIST1DDataModule


@pytest.fixture(scope="module")
def base():
    return MNIST1DDataModule(num_samples=2000, batch_size=32, seed=1)


def _rows(x: torch.Tensor) -> set:
    return {tuple(r) for r in x.numpy().round(5).tolist()}


def test_deferral_data_is_the_validation_split_divided(base):
    dm = DeferralDataModule(base, threshold_fraction=0.3)
    fit_x, fit_y = dm.splits["train"]
    held_x, held_y = dm.splits["val"]
    val_x, val_y = base.splits["val"]
    assert len(fit_y) + len(held_y) == len(val_y) == 200 and len(held_y) == 60
    assert _rows(fit_x) | _rows(held_x) == _rows(val_x) and not _rows(fit_x) & _rows(held_x)
    assert not _rows(fit_x) & _rows(base.splits["train"][0])  # never the models' training data
    torch.testing.assert_close(dm.splits["test"][0], base.splits["test"][0])
    assert np.bincount(held_y.numpy()).min() >= 5  # stratified
    assert dm.deferral_fit_split == "val" and len(dm.threshold_dataset()) == 60
    assert (dm.num_classes, dm.input_shape, dm.in_features) == (10, (40,), 40)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 40) and y.dtype == torch.long
    train = DeferralDataModule(base, fit_split="train")
    assert train.deferral_fit_split == "train" and len(train.splits["train"][1]) == len(base.splits["train"][1])


def test_specialist_view_keeps_and_renumbers_classes(base):
    dm = FailureModeDataModule(base, classes=[7, 2, 5])
    assert dm.num_classes == 3
    for split in ("train", "val", "test"):
        x, y = dm.splits[split]
        bx, by = base.splits[split]
        keep = (by == 7) | (by == 2) | (by == 5)
        torch.testing.assert_close(x, bx[keep])
        lookup = {7: 0, 2: 1, 5: 2}
        assert y.tolist() == [lookup[int(c)] for c in by[keep]]


def test_label_noise_only_in_chosen_classes(base):
    dm = FailureModeDataModule(base, noisy_classes=[5, 6, 7, 8, 9], noise_rate=0.5, seed=3)
    x, y = dm.splits["train"]
    bx, by = base.splits["train"]
    torch.testing.assert_close(x, bx)
    changed = y != by
    assert not changed[by < 5].any()  # clean classes untouched
    rate = changed[by >= 5].float().mean().item()
    assert 0.4 < rate < 0.6  # every replaced label is another class
    again = FailureModeDataModule(base, noisy_classes=[5, 6, 7, 8, 9], noise_rate=0.5, seed=3)
    torch.testing.assert_close(again.splits["train"][1], y)  # seeded
    clean_test = FailureModeDataModule(base, noisy_classes=[5], noise_splits=["train"])
    torch.testing.assert_close(clean_test.splits["test"][1], base.splits["test"][1])


def test_prior_shift_only_at_test_time(base):
    prior = [0.02] * 5 + [0.18] * 5
    dm = FailureModeDataModule(base, test_prior=prior)
    y = dm.splits["test"][1]
    share = np.bincount(y.numpy(), minlength=10) / len(y)
    np.testing.assert_allclose(share, prior, atol=0.01)
    assert _rows(dm.splits["test"][0]) <= _rows(base.splits["test"][0])  # a subsample, no duplicates
    assert len(_rows(dm.splits["test"][0])) == len(y)
    torch.testing.assert_close(dm.splits["val"][1], base.splits["val"][1])
    # the failure modes compose with the held-out split
    held = DeferralDataModule(dm)
    assert len(held.splits["test"][1]) == len(y)


def test_image_datamodules_wrap_too():
    dm = DeferralDataModule(FailureModeDataModule(DigitsDataModule(), classes=[0, 1]))
    assert dm.input_shape == (1, 8, 8) and dm.in_channels == 1 and dm.num_classes == 2


def test_errors(base):
    with pytest.raises(TypeError, match="must be an ArrayDataModule"):
        DeferralDataModule(object())
    with pytest.raises(ValueError, match="threshold_fraction"):
        DeferralDataModule(base, threshold_fraction=1.0)
    with pytest.raises(ValueError, match="fit_split"):
        DeferralDataModule(base, fit_split="test")
    with pytest.raises(ValueError, match="`classes` must list"):
        FailureModeDataModule(base, classes=[3])
    with pytest.raises(ValueError, match="noisy_classes"):
        FailureModeDataModule(base, noisy_classes=[10])
    with pytest.raises(ValueError, match="noise_rate"):
        FailureModeDataModule(base, noisy_classes=[1], noise_rate=1.5)
    with pytest.raises(ValueError, match="test_prior"):
        FailureModeDataModule(base, test_prior=[1.0] * 9)
    with pytest.raises(ValueError, match="cannot be combined"):
        FailureModeDataModule(base, classes=[0, 1], noisy_classes=[0])
