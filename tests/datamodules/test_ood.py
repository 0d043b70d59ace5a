"""OODDataModule: disjoint splits, mixture shares, the covering / unseen switch, batches, the oracle, errors."""

from __future__ import annotations

import math

import pytest
import torch

from datamodules import OODDataModule
from datamodules.ood import GAUSSIAN_BLOB_RADIUS, _gaussian_means


def _rows(t: torch.Tensor) -> set:
    return {tuple(r) for r in t.flatten(1).tolist()}


@pytest.mark.parametrize("kwargs", [dict(source="gaussian", num_samples=900), dict(source="mnist"),
                                    dict(source="digits", ood=["mnist_resized", "noise"])])
def test_splits_are_disjoint_and_shares_hold(kwargs):
    dm = OODDataModule(test_ood_fraction=0.3, wild_ood_fraction=0.4, **kwargs)
    dm.setup()
    train, val, test, wild = (dm.data[k][0] for k in ("train", "val", "test", "wild"))
    sets = [_rows(t) for t in (train, val, test, wild)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not sets[i] & sets[j], (i, j)
    x, y, is_ood = dm.data["test"]
    assert is_ood.float().mean().item() == pytest.approx(0.3, abs=0.01)
    assert dm.wild_is_ood.float().mean().item() == pytest.approx(0.4, abs=0.01)
    assert bool((y[is_ood] == -1).all()) and bool((y[~is_ood] >= 0).all()) and int(y.max()) == dm.num_classes - 1
    assert x.shape[1:] == dm.input_shape and dm.data["train"][1].max() == dm.num_classes - 1
    assert bool(dm.data["train"][1].bincount().min() > 0)  # every inlier class is labelled


def test_batches_and_datasets():
    dm = OODDataModule(source="gaussian", num_samples=600, batch_size=16, wild_per_inlier=2)
    x, y, x_wild = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 2) and y.shape == (16,) and x_wild.shape == (16, 2, 2)
    assert len(next(iter(dm.val_dataloader()))) == 2
    xt, yt, ood = next(iter(dm.test_dataloader()))
    assert ood.dtype == torch.bool and len(next(iter(dm.predict_dataloader()))) == 1
    assert len(dm.dataset("wild")[0]) == 1 and len(dm.dataset("heldout")) == len(dm.dataset("val"))
    no_wild = OODDataModule(source="gaussian", num_samples=600, wild_fraction=0.0)
    assert not no_wild.has_wild and len(next(iter(no_wild.train_dataloader()))) == 2
    with pytest.raises(ValueError, match="no wild set"):
        no_wild.dataset("wild")


def test_same_seed_same_data_other_seed_other_split():
    a, b = OODDataModule(source="gaussian", num_samples=600), OODDataModule(source="gaussian", num_samples=600)
    assert torch.equal(a.data["test"][0], b.data["test"][0])
    c = OODDataModule(source="gaussian", num_samples=600, seed=1)
    assert not torch.equal(a.data["test"][0], c.data["test"][0])


def test_unseen_switch_splits_the_ood_groups():
    _, blobs = _gaussian_means()

    def nearest_blob(points):
        return torch.cdist(points.double(), torch.from_numpy(blobs)).argmin(1)

    cover = OODDataModule(source="gaussian", num_samples=1200, wild_covers_test_ood=True)
    unseen = OODDataModule(source="gaussian", num_samples=1200, wild_covers_test_ood=False)
    for dm, same in ((cover, True), (unseen, False)):
        x, _, is_ood = dm.data["test"]
        test_blobs = set(nearest_blob(x[is_ood]).tolist())
        wild_blobs = set(nearest_blob(dm.data["wild"][0][dm.wild_is_ood]).tolist())
        assert (test_blobs == wild_blobs == {0, 1}) if same else (wild_blobs == {0} and test_blobs == {1})
    assert unseen.test_ood_groups == ("blobs:1",)
    mnist = OODDataModule(source="mnist", wild_covers_test_ood=False)
    mnist.setup()
    assert mnist.test_ood_groups == ("held_out_classes:8", "held_out_classes:9")


def test_oracle_density_ratio():
    dm = OODDataModule(source="gaussian", num_samples=600)
    means, blobs = _gaussian_means()
    posterior, rho = dm.oracle(torch.tensor(means, dtype=torch.float32).clone())
    torch.testing.assert_close(posterior.sum(1), torch.ones(3))
    assert bool((posterior.argmax(1) == torch.arange(3)).all()) and bool((rho < 1e-3).all())
    _, rho_blob = dm.oracle(torch.tensor(blobs, dtype=torch.float32))
    assert bool((rho_blob > 1e3).all())
    # hand value at the origin: p_in = N(0; mu, I) (equal for all classes), p_out = mean of the two blob densities
    p_in = math.exp(-0.5 * 2.0**2) / (2 * math.pi)
    p_out = math.exp(-0.5 * GAUSSIAN_BLOB_RADIUS**2 / 0.75**2) / (2 * math.pi * 0.75**2)
    assert dm.oracle(torch.zeros(1, 2))[1].item() == pytest.approx(p_out / p_in, rel=1e-6)
    with pytest.raises(ValueError, match="gaussian"):
        OODDataModule(source="mnist").oracle(torch.zeros(1, 1, 28, 28))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(source="cifar"), "source"),
        (dict(source="mnist", ood=["blobs"]), "ood"),
        (dict(source="digits", ood=["held_out_classes"]), "inlier_classes"),
        (dict(source="mnist", inlier_classes=[3]), "inlier_classes"),
        (dict(test_ood_fraction=1.0), "test_ood_fraction"),
        (dict(val_fraction=0.5, wild_fraction=0.3, test_fraction=0.3), "fractions"),
        (dict(wild_per_inlier=0), "wild_per_inlier"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OODDataModule(**kwargs)
