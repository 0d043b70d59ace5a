"""k-point mixup and CutMix as a drop-in Lightning Callback.

Papers: Chaudhry, Menon, Veit, Jayasumana, Ramalingam, Kumar, *When does mixup promote local linearity in learned
representations?* (arXiv 2210.16413), building on Zhang et al., *mixup: Beyond Empirical Risk Minimization*
(arXiv 1710.09412); Yun et al., *CutMix* (arXiv 1905.04899); label smoothing from Szegedy et al. (arXiv 1512.00567).

k-point mixup (Chaudhry et al., Sec. 3) draws weights ``lam ~ Dirichlet(alpha * 1_k)`` (for ``k = 2`` this is
Zhang et al.'s ``lam ~ Beta(alpha, alpha)``), pairs every example with ``k - 1`` partners taken from random
permutations of the batch, and trains on

    x_mix_i = sum_m lam_im x_{pi_m(i)},        y_mix_i = sum_m lam_im onehot(y_{pi_m(i)}),

with ``pi_0`` the identity. The supervised loss is the cross-entropy against the soft target ``y_mix``, so any
LightningModule whose training loss accepts probability-vector targets (``F.cross_entropy`` does) trains with
mixup without knowing about it. CutMix, the probability of mixing, switching mixing off from an epoch and label
smoothing follow ``timm.data.Mixup``.

The math lives in :mod:`lightning_methods.mixup` (shared with ``MixupConsistencyModule``); its names are
re-exported here for code written against ``callbacks.mixup``. :class:`MixupCallback` applies it to every training
batch.
"""

from __future__ import annotations

from collections.abc import MutableMapping, MutableSequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from lightning_methods._utils import check_num_classes
from lightning_methods.mixup import (  # noqa: F401  (re-exported: callbacks.mixup's names before the move)
    MixingSampler,
    _finite_batches,
    check_mixing_args,
    mix,
    mix_inputs,
    mix_targets,
    mixup,
    sample_mixing,
    smooth_targets,
    soft_targets,
    switch_mixing,
)

__all__ = ["MixupCallback", "MixingSampler", "mixup", "sample_mixing", "mix", "mix_targets"]


_BATCH_FIX = (
    "MixupCallback replaces the inputs and targets inside the training batch (a Callback cannot return a new "
    "batch), so the batch must be a list or a dict. Fix: return a list `[inputs, targets]` from your Dataset / "
    "collate_fn (PyTorch's default collate turns `(x, y)` samples into a list), or convert it in your "
    "LightningModule, which runs before this callback: `def on_after_batch_transfer(self, batch, dataloader_idx): "
    "return list(batch)` (for a NamedTuple: `return batch._asdict()` and set `input_key` / `target_key`). "
    "Or call `lightning_methods.mixup.mixup(x, y, ...)` in your own training_step instead of using the callback."
)


class MixupCallback(Callback):
    r"""k-point mixup (and CutMix) of every training batch, for any LightningModule whose loss accepts soft targets.

    Before each training step the callback replaces the batch's inputs ``x`` by ``sum_m lam_m x_{pi_m}`` and its
    targets by ``sum_m lam_m onehot(y_{pi_m})`` (Chaudhry et al. 2022, Sec. 3; Zhang et al. 2018, Eq. 1), with
    ``lam ~ Dirichlet(alpha * 1_k)`` drawn per example (or per batch) and ``k - 1`` partners from random
    permutations of the batch. Validation, test and predict batches are never touched (the callback acts only in
    ``on_train_batch_start``). The module needs no change as long as its training loss takes probability-vector
    targets: ``F.cross_entropy(logits, targets)`` does, as does :class:`~lightning_methods.ClassifierModule`.

    What timm users know from ``timm.data.Mixup`` (same names, same meaning; per example when ``per_sample``, as
    timm's ``mode="elem"``, else per batch, as ``mode="batch"``):

    * **CutMix** (``cutmix_alpha > 0``; Yun et al. 2019, Sec. 3.1): with probability ``switch_prob`` an example
      (or batch) gets a box of its partner pasted in instead of a blend; ``lam ~ Beta(cutmix_alpha, cutmix_alpha)``
      sets the box size, and the targets use the *real* (border-clipped) box area. Boxes are timm's ``rand_bbox``
      given the same ``lam`` and centre. Two points only: k-point CutMix has no canonical form (see
      :mod:`lightning_methods.mixup`), so ``num_points > 2`` with CutMix is refused. CutMix alone:
      ``switch_prob=1.0``.
    * **prob**: the probability that an example (or batch) is mixed at all; the others keep their inputs.
    * **off_epoch**: no mixing from this (0-based) epoch on, as timm's training script's ``mixup_off_epoch``.
    * **label_smoothing**: targets ``(1 - eps) y + eps / C``.

    Whenever the callback is attached, every training batch's targets become soft ``(N, C)`` targets (smoothed when
    ``label_smoothing > 0``), whether or not the batch's inputs are mixed (as timm does), so a module sees one kind
    of target throughout training.

    Supported batch forms (checked on the first batch, before the first training step):

    * a **list** ``[inputs, targets, *others]`` (what PyTorch's default collate makes of ``(x, y)`` samples, and
      what every datamodule of this package yields): ``batch[input_key]`` and ``batch[target_key]`` are replaced;
    * a **dict** (any mutable mapping), e.g. ``{"pixel_values": x, "labels": y}`` with ``input_key="pixel_values"``,
      ``target_key="labels"``.

    Why only these: Lightning passes the same batch object to ``on_train_batch_start`` and then to
    ``training_step``, and ignores what a callback returns, so the only way a callback can change the batch is to
    assign into it. Tuples, NamedTuples, bare tensors and other immutable containers raise a ``TypeError`` that
    names the fix (return a list, or convert it in the module's ``on_after_batch_transfer``).

    Inputs must be floating tensors whose first dimension is the batch (CutMix: ``(N, ..., H, W)``, boxes cut the
    last two dimensions). Targets are class indices ``(N,)`` (turned into soft ``(N, C)`` targets; needs
    ``num_classes``, taken from the datamodule or module when not given) or soft targets ``(N, C)`` (mixed as they
    are). Odd and size-1 batches are fine: partners come from permutations, not from ``flip(0)`` as in timm; a
    size-1 batch mixes the example with itself (its target just becomes one-hot).

    Randomness comes from numpy generators keyed by ``(seed, global rank, epoch)``, so runs are reproducible,
    DDP ranks draw different weights, and a run resumed from an end-of-epoch checkpoint continues exactly as the
    uninterrupted run would (the resolved seed and ``off_epoch`` are stored in the checkpoint; the epoch decides
    whether mixing is off, so a resumed run past ``off_epoch`` stays unmixed).

    Logged each epoch in which mixing is on: ``mixup/lam_max`` (mean largest weight of a training example: ``1`` is
    no mixing, ``1/k`` a uniform mix), ``mixup/lam_self`` (mean weight an example keeps of itself; ``1/k`` in
    expectation) and, with CutMix, ``mixup/cut_fraction`` (share of examples cut rather than blended).

    Args:
        alpha: Dirichlet concentration of mixup (``alpha > 0``); ``alpha = 1`` draws uniformly from the simplex,
            small values give mixes close to one example.
        num_points: ``k``, how many examples are mixed into each training example (2 is classic mixup).
        num_classes: number of classes for class-index targets; ``None`` takes ``num_classes`` from the datamodule
            (or, failing that, the LightningModule) at setup.
        per_sample: one ``lam`` (and one CutMix/prob decision) per example (Chaudhry et al.; timm's ``elem`` mode)
            or one per batch (Zhang et al.; timm's default ``batch`` mode).
        distinct_partners: no self-pairs or repeated partners (see :func:`~lightning_methods.mixup.sample_mixing`);
            ``False`` for independent permutations as in the reference implementations.
        input_key: index (list batch) or key (dict batch) of the inputs.
        target_key: index or key of the targets.
        seed: seed of the mixing draws; ``None`` uses ``torch.initial_seed()`` at the start of ``fit`` (the seed
            ``seed_everything`` set).
        log_stats: log the statistics above.
        cutmix_alpha: Beta concentration of CutMix (timm's ``cutmix_alpha``; the paper uses 1); 0 disables CutMix.
        switch_prob: probability of CutMix instead of mixup when ``cutmix_alpha > 0`` (1.0: CutMix only).
        prob: probability of mixing an example (or batch) at all (timm's ``prob``).
        off_epoch: first epoch (0-based ``trainer.current_epoch``) without mixing; ``None`` mixes in every epoch.
        label_smoothing: ``eps`` of the label smoothing of the targets; do not also smooth in the loss (a warning
            says so when the module has ``label_smoothing > 0``).

    Note:
        Metrics computed on training targets inside ``training_step`` (e.g. a torchmetrics ``Accuracy`` called with
        ``targets``) see soft targets too; use ``targets.argmax(-1)`` there (as ``ClassifierModule`` does with
        :func:`~lightning_methods.classifier.hard_targets`). A loss that only takes class indices (``nll_loss``,
        a ``CrossEntropyLoss`` with ``ignore_index`` semantics) cannot be used with mixup.

    Example::

        >>> import lightning.pytorch as pl
        >>> from datamodules import DigitsDataModule
        >>> from lightning_methods import ClassifierModule
        >>> from lightning_methods.nets import MLP
        >>> trainer = pl.Trainer(max_epochs=1, callbacks=[MixupCallback(alpha=1.0, num_points=3)])  # doctest: +SKIP
        >>> trainer.fit(ClassifierModule(MLP(64, 10), num_classes=10), DigitsDataModule())  # doctest: +SKIP
        >>> # timm's Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, label_smoothing=0.1):
        >>> cb = MixupCallback(alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.1, per_sample=False)
    """

    #: it changes the training inputs in place: DistillationModule runs its teacher on the mixed inputs instead of
    #: logits cached or served for the loaded ones (the same duck-typed flag is open to any such callback)
    changes_inputs = True

    def __init__(
        self,
        alpha: float = 1.0,
        num_points: int = 2,
        num_classes: int | None = None,
        per_sample: bool = True,
        distinct_partners: bool = True,
        input_key: int | str = 0,
        target_key: int | str = 1,
        seed: int | None = None,
        log_stats: bool = True,
        cutmix_alpha: float = 0.0,
        switch_prob: float = 0.5,
        prob: float = 1.0,
        off_epoch: int | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        check_mixing_args(alpha, num_points, cutmix_alpha, switch_prob, prob, label_smoothing)
        if num_classes is not None:
            check_num_classes(num_classes)
        if input_key == target_key:
            raise ValueError(f"`input_key` and `target_key` must differ, both are {input_key!r}.")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"`seed` must be an integer or None, got {seed!r}.")
        if off_epoch is not None and (isinstance(off_epoch, bool) or not isinstance(off_epoch, int) or off_epoch < 0):
            raise ValueError(
                f"`off_epoch` must be None (mix in every epoch) or an integer >= 0 (the first epoch without mixing), "
                f"got {off_epoch!r}."
            )
        self.alpha = float(alpha)
        self.num_points = num_points
        self.num_classes = num_classes
        self.per_sample = per_sample
        self.distinct_partners = distinct_partners
        self.input_key = input_key
        self.target_key = target_key
        self.seed = seed
        self.log_stats = log_stats
        self.cutmix_alpha = float(cutmix_alpha)
        self.switch_prob = float(switch_prob)
        self.prob = float(prob)
        self.off_epoch = off_epoch
        self.label_smoothing = float(label_smoothing)
        # CutMix and prob go through _mix_switched; plain mixup (with or without smoothing) keeps its short hot path
        self._switched = self.cutmix_alpha > 0 or self.prob < 1
        self._resolved_seed: int | None = seed
        # the key predates CutMix & co.: unchanged, so checkpoints written before them still resume
        self._state_key = self._generate_state_key(alpha=self.alpha, num_points=num_points, per_sample=per_sample)
        self._sampler: MixingSampler | None = None
        self._switch_rng: np.random.Generator | None = None
        self._epoch_ready = False
        self._mixing = True  # False from off_epoch on
        self._plain = not self._switched
        self._stats = np.zeros(4)  # switched path: sums of largest weight, own weight, cut examples; examples
        self._checked = False
        self.num_mixed_batches = 0
        self._last: tuple[torch.Tensor, ...] | None = None

    @property
    def state_key(self) -> str:
        return self._state_key  # Lightning reads it around every hook call: computed once in __init__

    # -- setup: resolve what the batch cannot tell us, fail early on contradictions --------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self._resolved_seed is None:
            self._resolved_seed = int(torch.initial_seed()) % (2**63)
        data_classes = getattr(trainer.datamodule, "num_classes", None) if trainer.datamodule is not None else None
        if self.num_classes is not None and data_classes is not None and data_classes != self.num_classes:
            raise ValueError(
                f"MixupCallback(num_classes={self.num_classes}) but {type(trainer.datamodule).__name__} has "
                f"{data_classes} classes. Set `num_classes={data_classes}` or leave it None to take it from the data."
            )
        self._classes = self.num_classes or data_classes or getattr(pl_module, "num_classes", None)
        module_smoothing = getattr(pl_module, "label_smoothing", 0.0)
        if self.label_smoothing > 0 and isinstance(module_smoothing, (int, float)) and module_smoothing > 0:
            rank_zero_warn(
                f"MixupCallback(label_smoothing={self.label_smoothing}) smooths the targets and "
                f"{type(pl_module).__name__}(label_smoothing={module_smoothing}) smooths them again in its loss. "
                "Smooth in one place: set one of the two to 0."
            )
        max_epochs = trainer.max_epochs
        if self.off_epoch is not None and max_epochs is not None and 0 < max_epochs <= self.off_epoch:
            rank_zero_warn(
                f"MixupCallback(off_epoch={self.off_epoch}) never switches mixing off in a run of "
                f"max_epochs={max_epochs} (epochs are numbered from 0)."
            )
        self._checked = False
        self._epoch_ready = False

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        self._mixing = self.off_epoch is None or epoch < self.off_epoch
        self._plain = self._mixing and not self._switched
        self._stats = np.zeros(4)
        # A stream per (seed, rank, epoch): ranks differ, and resuming at an epoch boundary replays exactly. The
        # switches draw from a second stream, so plain mixup's draws are the same with or without them.
        rng = np.random.default_rng([self._resolved_seed, trainer.global_rank, epoch])
        self._sampler = None
        if self._mixing:
            self._sampler = MixingSampler(
                self.num_points, self.alpha, rng, self.per_sample, self.distinct_partners,
                num_batches=_finite_batches(trainer),
            )
            self._switch_rng = np.random.default_rng([self._resolved_seed, trainer.global_rank, epoch, 1])
        self._epoch_ready = True

    # -- the mixing ----------------------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if not self._checked:
            self._check_batch(batch)
            self._checked = True
        if not self._epoch_ready:  # the loop always calls on_train_epoch_start first; stay reproducible regardless
            self.on_train_epoch_start(trainer, pl_module)
        if not self._plain:
            self._mix_switched(batch)
            return
        x, y = batch[self.input_key], batch[self.target_key]
        lam, index = self._sampler(x.shape[0])
        if x.device.type != "cpu":
            lam, index = lam.to(x.device, non_blocking=True), index.to(x.device, non_blocking=True)
        targets = mix_targets(y, lam, index, self._classes)
        batch[self.target_key] = smooth_targets(targets, self.label_smoothing) if self.label_smoothing else targets
        batch[self.input_key] = mix(x, lam if x.dtype == lam.dtype else lam.to(x.dtype), index)
        self.num_mixed_batches += 1
        self._last = (lam, index)

    def _mix_switched(self, batch: Any) -> None:
        """Mixing with CutMix or prob, or no mixing (from off_epoch on): timm's Mixup semantics."""
        x, y = batch[self.input_key], batch[self.target_key]
        if not self._mixing:
            batch[self.target_key] = smooth_targets(soft_targets(y, self._classes), self.label_smoothing)
            self._last = None
            return
        n = x.shape[0]
        lam, index = self._sampler(n)
        image_size = tuple(x.shape[-2:]) if self.cutmix_alpha > 0 else None
        lam_np, boxes, cut = switch_mixing(
            lam.numpy(), self._switch_rng, image_size, self.prob, self.cutmix_alpha, self.switch_prob
        )
        rows = 1.0 if self.per_sample else float(n)  # examples per row of lam
        self._stats += rows * np.array(
            [lam_np.max(1).sum(), lam_np[:, 0].sum(), 0.0 if cut is None else cut.sum(), len(lam_np)]
        )
        lam = torch.from_numpy(lam_np.astype(np.float32))
        cut_t = None if cut is None else torch.from_numpy(cut)
        boxes_t = None if boxes is None else torch.from_numpy(boxes)
        if x.device.type != "cpu":
            lam, index = lam.to(x.device, non_blocking=True), index.to(x.device, non_blocking=True)
        batch[self.target_key] = smooth_targets(mix_targets(y, lam, index, self._classes), self.label_smoothing)
        if (lam_np[:, 0] < 1.0).any():  # a batch left whole by `prob` (or cut by an empty box) is not copied
            batch[self.input_key] = mix_inputs(x, lam if x.dtype == lam.dtype else lam.to(x.dtype), index, boxes_t, cut_t)
        self.num_mixed_batches += 1
        self._last = (lam, index, boxes_t, cut_t)

    @property
    def last_lam(self) -> torch.Tensor | None:
        """Weights ``(N, k)`` the targets of the last mixed batch got (rows sum to one), for inspection.

        For a cut example, the real share of its own image; ``(1, 0, ...)`` for one left unmixed by ``prob``.
        """
        return None if self._last is None else self._last[0].expand(len(self._last[1]), self.num_points)

    @property
    def last_index(self) -> torch.Tensor | None:
        """Partner indices ``(N, k)`` of the last mixed batch; row ``i`` mixed examples ``last_index[i]``."""
        return None if self._last is None else self._last[1]

    @property
    def last_boxes(self) -> torch.Tensor | None:
        """CutMix boxes ``(N, 4)`` (or ``(1, 4)`` per batch) ``(top, bottom, left, right)`` of the last mixed batch.

        Only rows marked in :attr:`last_cut` were cut; ``None`` without CutMix.
        """
        return None if self._last is None or len(self._last) < 4 else self._last[2]

    @property
    def last_cut(self) -> torch.Tensor | None:
        """Bool ``(N,)`` (or ``(1,)`` per batch): which examples of the last mixed batch were cut; ``None`` without CutMix."""
        return None if self._last is None or len(self._last) < 4 else self._last[3]

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sampler = self._sampler
        if not self.log_stats or sampler is None or sampler.count == 0:
            return
        if self._switched:
            sum_max, sum_self, sum_cut, count = self._stats
        else:
            sum_max, sum_self, sum_cut, count = sampler.sum_max, sampler.sum_self, 0.0, sampler.count
        pl_module.log("mixup/lam_max", sum_max / count, sync_dist=True)
        pl_module.log("mixup/lam_self", sum_self / count, sync_dist=True)
        if self.cutmix_alpha > 0:
            pl_module.log("mixup/cut_fraction", sum_cut / count, sync_dist=True)

    def _check_batch(self, batch: Any) -> None:
        if isinstance(batch, tuple):
            kind = "a NamedTuple" if hasattr(batch, "_fields") else "a tuple"
            raise TypeError(f"MixupCallback got {kind} batch, which cannot be changed in place. {_BATCH_FIX}")
        if not isinstance(batch, (MutableSequence, MutableMapping)):
            raise TypeError(f"MixupCallback got a batch of type {type(batch).__name__}. {_BATCH_FIX}")
        for name in ("input_key", "target_key"):
            key = getattr(self, name)
            try:
                batch[key]
            except (KeyError, IndexError, TypeError):
                where = f"keys {list(batch)}" if isinstance(batch, MutableMapping) else f"length {len(batch)}"
                raise ValueError(
                    f"MixupCallback(`{name}={key!r}`) does not address the batch ({type(batch).__name__} with "
                    f"{where}). Set `{name}` to the index or key of the {name.split('_')[0]}s."
                ) from None
        x, y = batch[self.input_key], batch[self.target_key]
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 1:
            raise TypeError(
                f"MixupCallback mixes floating-point input tensors; `batch[{self.input_key!r}]` is "
                f"{type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype}. Point `input_key` at the inputs "
                "(token ids cannot be mixed: mix embeddings inside your model instead)."
            )
        if self.cutmix_alpha > 0 and x.ndim < 3:
            raise ValueError(
                f"MixupCallback(cutmix_alpha={self.cutmix_alpha}) cuts boxes out of the last two dimensions (H, W) "
                f"of the inputs, but `batch[{self.input_key!r}]` has shape {tuple(x.shape)}. Feed image batches "
                "(N, C, H, W) (flatten inside the model), or set `cutmix_alpha=0` for mixup only."
            )
        if not isinstance(y, torch.Tensor) or y.shape[:1] != x.shape[:1] or y.ndim not in (1, 2):
            raise ValueError(
                f"MixupCallback needs targets of shape (N,) (class indices) or (N, C) (soft) for {len(x)} inputs; "
                f"`batch[{self.target_key!r}]` is {tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}."
            )
        if y.ndim == 2 and not y.is_floating_point():
            raise TypeError(f"Soft (N, C) targets must be floating point, got {y.dtype}.")
        if y.ndim == 1:
            if y.is_floating_point():
                raise TypeError(
                    f"Class-index targets must be integers, got {y.dtype}. Cast them with `.long()` in your dataset."
                )
            if self._classes is None:
                raise ValueError(
                    "MixupCallback got integer class-index targets but does not know the number of classes: neither "
                    "the datamodule nor the LightningModule has a `num_classes` attribute. Pass "
                    "`MixupCallback(num_classes=C)`."
                )
            check_num_classes(int(self._classes))
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= self._classes):
                raise ValueError(
                    f"Targets range over [{int(y.min())}, {int(y.max())}] but num_classes={self._classes}: "
                    f"set `num_classes` to the number of classes (at least {int(y.max()) + 1})."
                )
        elif self._classes is not None and y.shape[1] != self._classes:
            raise ValueError(f"Soft targets have {y.shape[1]} classes but num_classes={self._classes}.")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # A module that needs class indices fails inside its own training_step on the first mixed batch: say why.
        if self.num_mixed_batches == 1 and trainer.training and hasattr(exception, "add_note"):
            exception.add_note(
                "MixupCallback had just turned this batch's targets into soft (N, C) probability vectors. The "
                "training_step must accept them: use F.cross_entropy(logits, targets) for the loss, and "
                "targets.argmax(-1) for metrics that need class indices."
            )

    # -- checkpointing -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"seed": self._resolved_seed, "num_mixed_batches": self.num_mixed_batches, "off_epoch": self.off_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.seed is not None and state_dict.get("seed") not in (None, self.seed):
            rank_zero_warn(
                f"MixupCallback(seed={self.seed}) resumes a run that mixed with seed {state_dict['seed']}; "
                f"keeping seed={self.seed}."
            )
        else:
            self._resolved_seed = state_dict.get("seed", self._resolved_seed)
        self.num_mixed_batches = int(state_dict.get("num_mixed_batches", 0))
        saved_off = state_dict.get("off_epoch")
        if "off_epoch" in state_dict and saved_off != self.off_epoch:
            rank_zero_warn(
                f"MixupCallback(off_epoch={self.off_epoch}) resumes a run that switched mixing off at epoch "
                f"{saved_off}; keeping off_epoch={self.off_epoch}. Pass off_epoch={saved_off} to continue as before."
            )
