"""Datamodules for cascades (:class:`lightning_methods.CascadeModule`): held-out data for the deferral rule, and the
failure modes of confidence-based deferral (Jitkrittum et al., NeurIPS 2023, arXiv:2307.02764).

* :class:`DeferralDataModule`: trains the deferral rule on one part of a datamodule's *validation* split and chooses
  the thresholds on the other part (data neither model was trained on); tests on the test split.
* :class:`FailureModeDataModule`: a view of a datamodule in one of the paper's failure modes of confidence-based
  deferral: a **specialist** (only some classes, relabelled ``0..k-1``, to train a specialist model), **label noise**
  injected into chosen classes, and a **shift of the class priors** at test time.

Both wrap any :class:`~datamodules._base.ArrayDataModule` (MNIST-1D, digits, MNIST-5k, ...) and keep its split,
batch sizes and seed, so every view of one datamodule shares the same examples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from ._base import ArrayDataModule, Splits, _stratified_split

__all__ = ["DeferralDataModule", "FailureModeDataModule"]


def _check_wrapped(datamodule: object, name: str) -> ArrayDataModule:
    if not isinstance(datamodule, ArrayDataModule):
        raise TypeError(
            f"`datamodule` of {name} must be an ArrayDataModule (MNIST1DDataModule, DigitsDataModule, MNISTDataModule, "
            f"or another {name} / FailureModeDataModule), got {type(datamodule).__name__}."
        )
    return datamodule


class _Wrapper(ArrayDataModule):
    """An ArrayDataModule whose splits are computed from another one's (loaders and ``dataset(split)`` inherited)."""

    def __init__(self, datamodule: ArrayDataModule) -> None:
        self.datamodule = datamodule
        self.is_image = datamodule.is_image  # before super().__init__, which checks `augment` against it
        super().__init__(
            batch_size=datamodule.batch_size,
            eval_batch_size=datamodule.eval_batch_size,
            val_fraction=datamodule.val_fraction,
            test_fraction=datamodule.test_fraction,
            seed=datamodule.seed,
            num_workers=datamodule.num_workers,
            shuffle=datamodule.shuffle,
            drop_last=datamodule.drop_last,
            augment=datamodule.augment,
            max_shift=datamodule.max_shift,
        )

    @property
    def input_shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return self.datamodule.input_shape

    @property
    def in_channels(self) -> int:
        return self.datamodule.in_channels

    @property
    def input_size(self) -> int:
        return self.datamodule.input_size

    @property
    def splits(self) -> Splits:  # type: ignore[override]
        if self._splits is None:
            self._splits = self.transform(self.datamodule.splits)
        return self._splits

    def transform(self, splits: Splits) -> Splits:
        raise NotImplementedError


class DeferralDataModule(_Wrapper):
    """Held-out data for a cascade's deferral rule: train on part of the validation split, thresholds on the rest.

    The models of a cascade are trained on the wrapped datamodule's training split; their confidence there is
    overfit, so the post-hoc rule and the thresholds are fitted on data they never saw (Jitkrittum et al. 2023,
    Sec. 4). Here the validation split is divided (stratified, seeded): ``1 - threshold_fraction`` of it becomes this
    datamodule's training split (what ``CascadeModule.fit`` trains ``g`` on), ``threshold_fraction`` its validation
    split (where the thresholds are chosen when the fit ends, and ``g``'s validation loss is measured). The test split
    is the wrapped one. ``deferral_fit_split`` tells the cascade which split it trains on.

    Args:
        datamodule: the datamodule the cascade's models were trained with (an ArrayDataModule).
        threshold_fraction: share of the validation split kept back for choosing thresholds, in (0, 1).
        fit_split: ``"val"`` (default). ``"train"`` trains on the models' own training split (the cascade refuses
            it unless ``allow_training_split=True``); the thresholds still come from the validation split.

    Example::

        >>> from datamodules import MNIST1DDataModule
        >>> dm = DeferralDataModule(MNIST1DDataModule(num_samples=1000), threshold_fraction=0.4)
        >>> len(dm.dataset("train")), len(dm.dataset("val")), len(dm.dataset("test")), dm.deferral_fit_split
        (60, 40, 200, 'val')
    """

    def __init__(
        self, datamodule: ArrayDataModule, threshold_fraction: float = 0.25, fit_split: Literal["val", "train"] = "val"
    ) -> None:
        _check_wrapped(datamodule, "DeferralDataModule")
        if isinstance(threshold_fraction, bool) or not isinstance(threshold_fraction, (int, float)) or not 0 < threshold_fraction < 1:
            raise ValueError(f"`threshold_fraction` must be in (0, 1), got {threshold_fraction!r}.")
        if fit_split not in ("val", "train"):
            raise ValueError(f"`fit_split` must be 'val' or 'train', got {fit_split!r}.")
        super().__init__(datamodule)
        self.threshold_fraction = float(threshold_fraction)
        #: the split of the wrapped datamodule the deferral rule trains on (read by CascadeModule)
        self.deferral_fit_split = fit_split
        self.augment = False  # held-out data is scored as it is; the models were augmented, not the rule's data

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        return self.datamodule.num_classes

    def transform(self, splits: Splits) -> Splits:
        x, y = splits["val"]
        fit, held = _stratified_split(np.arange(len(y)), np.asarray(y), self.threshold_fraction, self.seed)
        train = splits["train"] if self.deferral_fit_split == "train" else (x[fit], y[fit])
        return Splits(train=train, val=(x[held], y[held]), test=splits["test"])

    def threshold_dataset(self):
        """The examples the thresholds are chosen on (this datamodule's validation split)."""
        return self.dataset("val")


class FailureModeDataModule(_Wrapper):
    """A datamodule in one of the failure modes of confidence-based deferral (Jitkrittum et al. 2023, Sec. 3-5).

    * ``classes``: keep only these classes in every split, relabelled ``0..k-1`` in the given order: the data a
      **specialist** model is trained on. ``CascadeModule(class_subsets=[None, classes])`` maps its probabilities
      back to the full label space.
    * ``noisy_classes`` / ``noise_rate``: in the splits ``noise_splits``, the label of an example of a noisy class
      is replaced, with probability ``noise_rate``, by a different class drawn uniformly: **label noise** that no
      model can fix, where deferring wastes budget.
    * ``test_prior``: the test split is subsampled (without replacement, seeded) to these class proportions: a
      **shift in the class priors** at test time, while the rule was fitted on the validation split's priors.

    Everything is seeded by ``seed`` and computed from the wrapped datamodule's split, so it is identical on every
    DDP rank and in every run.

    Args:
        datamodule: the datamodule to wrap (an ArrayDataModule).
        classes: classes to keep (specialist view), or None for all.
        noisy_classes: classes whose labels are corrupted, or None.
        noise_rate: probability that a noisy class's label is replaced, in [0, 1].
        noise_splits: the splits whose labels are corrupted (the noise is part of the data: all three by default).
        test_prior: class proportions of the test split (``num_classes`` non-negative numbers, normalised), or None.
        seed: seed of the noise and of the prior-shift subsample.

    Example::

        >>> from datamodules import MNIST1DDataModule
        >>> dm = FailureModeDataModule(MNIST1DDataModule(num_samples=1000), classes=[0, 1, 2, 3, 4])
        >>> dm.num_classes, sorted(set(dm.dataset("train").y.tolist()))
        (5, [0, 1, 2, 3, 4])
    """

    def __init__(
        self,
        datamodule: ArrayDataModule,
        classes: Sequence[int] | None = None,
        noisy_classes: Sequence[int] | None = None,
        noise_rate: float = 0.5,
        noise_splits: Sequence[str] = ("train", "val", "test"),
        test_prior: Sequence[float] | None = None,
        seed: int = 0,
    ) -> None:
        _check_wrapped(datamodule, "FailureModeDataModule")
        c = datamodule.num_classes
        if classes is not None:
            classes = [int(k) for k in classes]
            if len(classes) < 2 or len(set(classes)) != len(classes) or any(not 0 <= k < c for k in classes):
                raise ValueError(f"`classes` must list at least two distinct classes in 0..{c - 1}, got {classes!r}.")
        if noisy_classes is not None:
            noisy_classes = [int(k) for k in noisy_classes]
            if any(not 0 <= k < c for k in noisy_classes):
                raise ValueError(f"`noisy_classes` must be classes in 0..{c - 1}, got {noisy_classes!r}.")
        if isinstance(noise_rate, bool) or not isinstance(noise_rate, (int, float)) or not 0 <= noise_rate <= 1:
            raise ValueError(f"`noise_rate` must be in [0, 1], got {noise_rate!r}.")
        bad = [s for s in noise_splits if s not in ("train", "val", "test")]
        if isinstance(noise_splits, str) or bad:
            raise ValueError(f"`noise_splits` must be a list of 'train', 'val', 'test', got {noise_splits!r}.")
        if test_prior is not None:
            test_prior = [float(p) for p in test_prior]
            if len(test_prior) != c or any(p < 0 for p in test_prior) or sum(test_prior) <= 0:
                raise ValueError(f"`test_prior` must be {c} non-negative class proportions, got {test_prior!r}.")
        if classes is not None and (noisy_classes is not None or test_prior is not None):
            raise ValueError("`classes` (the specialist view) cannot be combined with `noisy_classes` / `test_prior`.")
        super().__init__(datamodule)
        self.classes = classes
        self.noisy_classes = noisy_classes
        self.noise_rate = float(noise_rate)
        self.noise_splits = tuple(noise_splits)
        self.test_prior = test_prior
        self.noise_seed = seed

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        return len(self.classes) if self.classes is not None else self.datamodule.num_classes

    def transform(self, splits: Splits) -> Splits:
        out = Splits()
        c = self.datamodule.num_classes
        for index, (split, (x, y)) in enumerate(splits.items()):
            x, y = torch.as_tensor(x), torch.as_tensor(y).clone()
            if self.classes is not None:
                keep = torch.isin(y, torch.tensor(self.classes))
                lookup = torch.full((c,), -1, dtype=torch.long)
                lookup[torch.tensor(self.classes)] = torch.arange(len(self.classes))
                x, y = x[keep], lookup[y[keep]]
            if self.noisy_classes and self.noise_rate > 0 and split in self.noise_splits:
                g = torch.Generator().manual_seed(self.noise_seed * 1000 + index)
                flip = torch.isin(y, torch.tensor(self.noisy_classes)) & (torch.rand(len(y), generator=g) < self.noise_rate)
                # a different class, uniformly: shift by 1..c-1 modulo c
                shift = torch.randint(1, c, (len(y),), generator=g)
                y = torch.where(flip, (y + shift) % c, y)
            if split == "test" and self.test_prior is not None:
                x, y = self._shift_prior(x, y)
            out[split] = (x, y)
        return out

    def _shift_prior(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        prior = np.asarray(self.test_prior) / sum(self.test_prior)
        counts = np.bincount(y.numpy(), minlength=len(prior))
        # the largest test set with these proportions that the available examples allow
        total = min(counts[k] / prior[k] for k in range(len(prior)) if prior[k] > 0)
        rng = np.random.default_rng(self.noise_seed)
        chosen = []
        for k in range(len(prior)):
            members = np.flatnonzero(y.numpy() == k)
            take = min(len(members), int(np.floor(prior[k] * total + 1e-9)))
            chosen.append(rng.choice(members, take, replace=False))
        index = torch.as_tensor(np.sort(np.concatenate(chosen)))
        return x[index], y[index]
