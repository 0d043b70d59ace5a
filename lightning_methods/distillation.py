"""Knowledge distillation with a frozen teacher: KD, late (and reverse) switch, self-distillation, cached logits.

Papers:

* Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network" (arXiv 1503.02531): the loss below.
* Nagarajan, Menon, Bhojanapalli, Mobahi, Kumar, "On Student-teacher Deviations in Distillation: does it pay to
  disobey?" (arXiv 2301.12923; NeurIPS 2023, and the ICLR 2023 submission OpenReview xJz9LTHP0K):
  self-distillation with pure KD (``alpha=1``, ``temperature=1``), the teacher queried on the *same augmented batch*
  as the student, and the ICLR version's **late switch**: one-hot training first, KD from the middle of training
  on, "recovers much of" KD's gain (deviations in the initial dynamics are not crucial); the reverse switch (KD
  first, one-hot later) is its control. Section numbers differ between the versions, so they are not cited here.
* Harutyunyan, Rawat, Menon, Kim, Kumar, "Supervision Complexity and its Role in Knowledge Distillation"
  (arXiv 2301.12245, ICLR 2023): online distillation, where the teacher is a trajectory of checkpoints (see
  :class:`callbacks.TeacherTrajectory`).

The diagnostics of both papers (confidence-exaggeration slope, decile tables, supervision complexity) live in
:mod:`lightning_methods.distillation_diagnostics`.

The loss (Hinton et al. Sec. 2; the deviation paper uses it with ``alpha=1``)::

    L = (1 - alpha) * CE(y, p_s) + alpha * tau^2 * KL(p_t^tau || p_s^tau),     p^tau = softmax(z / tau)

``tau^2`` keeps the gradient scale of the KD term independent of ``tau`` (for large ``tau``, ``tau^2 KL`` tends to
half the mean squared difference of the centred logits).
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.utils.data import Dataset, default_collate

from lightning_methods._distributed import map_in_order
from lightning_methods._frozen import FrozenSlot, HoldsFrozenModels, load_backbone
from lightning_methods._utils import _cli_given_hparams, check_model_against_data, check_targets
from lightning_methods.classifier import ClassifierModule, soft_cross_entropy

__all__ = ["DistillationModule", "distillation_loss", "kd_loss", "load_backbone_weights"]


# --------------------------------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------------------------------
def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``tau^2 * KL(p_t^tau || p_s^tau)``, averaged over the batch (Hinton et al. 2015, Sec. 2).

    Args:
        student_logits: ``(N, C)`` student logits (gradients flow through them).
        teacher_logits: ``(N, C)`` teacher logits (treated as constants).
        temperature: softmax temperature ``tau > 0`` applied to both.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"Teacher logits of shape {tuple(teacher_logits.shape)} do not match student logits "
            f"{tuple(student_logits.shape)}: teacher and student must predict the same classes."
        )
    teacher_logits = teacher_logits.detach().to(student_logits.dtype)
    if temperature != 1.0:  # at tau = 1 (pure self-distillation) skip three ops: a small model's step feels each
        student_logits, teacher_logits = student_logits / temperature, teacher_logits / temperature
    log_p_s = F.log_softmax(student_logits, dim=-1)
    log_p_t = F.log_softmax(teacher_logits, dim=-1)
    loss = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return loss * (temperature * temperature) if temperature != 1.0 else loss


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    alpha: float = 1.0,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """``(1 - alpha) * CE(y, p_s) + alpha * tau^2 * KL(p_t^tau || p_s^tau)`` (the cross-entropy at ``tau = 1``).

    Args:
        student_logits: ``(N, C)`` student logits.
        teacher_logits: ``(N, C)`` teacher logits.
        targets: class indices ``(N,)`` or soft targets ``(N, C)`` for the cross-entropy term.
        temperature: distillation temperature ``tau > 0``.
        alpha: weight of the distillation term in ``[0, 1]``; ``1`` is pure KD (the deviation paper's setting).
        label_smoothing: label smoothing of the cross-entropy term.

    Example::

        >>> s, t = torch.zeros(1, 2), torch.tensor([[3.0, 1.0]]).log()
        >>> round(distillation_loss(s, t, torch.tensor([0])).item(), 4)  # KL([.75, .25] || [.5, .5])
        0.1308
    """
    kd = kd_loss(student_logits, teacher_logits, temperature)
    if alpha == 1.0:
        return kd
    return (1.0 - alpha) * soft_cross_entropy(student_logits, targets, label_smoothing) + alpha * kd


def load_backbone_weights(
    path: str | Path, backbone: nn.Module | None = None, arg: str = "teacher_checkpoint", trusted: bool = False
) -> nn.Module:
    """Load a teacher backbone from a ``ClassifierModule`` checkpoint: :func:`lightning_methods._frozen.load_backbone`
    (``weights_only=True`` unless ``trusted=True``) with this module's argument name in its error messages."""
    return load_backbone(path, backbone, arg=arg, trusted=trusted)


# --------------------------------------------------------------------------------------------------------------------
# Cached teacher logits, looked up by the content of the input
# --------------------------------------------------------------------------------------------------------------------
class _LogitCache:
    """The teacher's logits on every training example, found by an exact fingerprint of the input itself.

    The batch is never changed and the datamodule is never wrapped: whatever reaches ``training_step`` is looked up
    by content, so an input that a callback or an augmentation changed after loading (mixup, CutMix, noise) is not
    found, and goes to the live teacher. Two examples with the same input share one entry (the teacher gives them the
    same logits anyway).

    The fingerprint is exact, not approximate: the input's raw bits, read as 16-bit integers ``v_i`` (bytes for an
    odd item size), times random integer weights ``w_ik < 2**b``, summed in float64 for ``K`` columns. ``b`` is chosen
    so that every partial sum is an integer below ``2**53``, hence exact whatever the summation order, batch size or
    device, and a lookup needs no tolerance. Two different inputs agree on a column with probability at most
    ``2**-b`` over the weights, on all ``K >= 64 / b`` columns at most ``2**-64``. (An earlier version projected the
    input on one random direction and matched within a tolerance: ~0.2% of mixed CIFAR-sized inputs fell within the
    tolerance of some other of 20k training inputs and got that example's logits.)
    """

    def __init__(
        self, fingerprints: torch.Tensor, logits: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype
    ) -> None:
        self.sorted_fp, order = fingerprints[:, 0].sort()
        self.fingerprints = fingerprints[order]
        self.logits = logits[order]
        self.weights = weights
        self.dtype = dtype  # of the inputs: a float32 and an int32 input may share their bits

    @staticmethod
    def _words(x: torch.Tensor) -> torch.Tensor:
        flat = x.detach().reshape(len(x), -1).contiguous()
        if flat.dtype == torch.bool:
            flat = flat.view(torch.uint8)
        return flat.view(torch.int16 if flat.element_size() % 2 == 0 else torch.uint8)

    @staticmethod
    def make_weights(x: torch.Tensor) -> torch.Tensor:
        """Random integer weights ``(words, K)`` (float64) for inputs shaped and typed like ``x`` (a batch)."""
        words = _LogitCache._words(x)
        value_bits = 15 if words.dtype == torch.int16 else 8  # |v_i| <= 2**value_bits
        bits = min(24, 53 - value_bits - math.ceil(math.log2(max(words.shape[1], 2))))
        if bits < 8:
            raise ValueError(f"cache_teacher_logits: inputs of {words.shape[1]} 16-bit words are too large to cache.")
        columns = math.ceil(64 / bits)
        generator = torch.Generator().manual_seed(0)
        return torch.randint(0, 2**bits, (words.shape[1], columns), generator=generator).to(torch.float64)

    @staticmethod
    def fingerprint(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``(N, K)`` exact integer fingerprints (float64) of the rows of ``x``."""
        words = _LogitCache._words(x)
        return words.to(torch.float64) @ weights.to(words.device)

    def lookup(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, found)``: the cached logits of the rows found (other rows hold garbage) and a bool mask."""
        if x.dtype != self.dtype or self._words(x).shape[1] != len(self.weights):
            missing = torch.zeros(len(x), dtype=torch.long, device=self.logits.device)
            return self.logits[missing].to(x.device), torch.zeros(len(x), dtype=torch.bool, device=x.device)
        fp = self.fingerprint(x, self.weights)
        sorted_fp = self.sorted_fp.to(fp.device)
        pos = torch.searchsorted(sorted_fp, fp[:, 0].contiguous()).clamp(max=len(sorted_fp) - 1)
        # equal first columns are rare (near-duplicate inputs): the first such entry is checked, a miss is only slower
        found = (self.fingerprints.to(fp.device)[pos] == fp).all(dim=1)
        return self.logits[pos.to(self.logits.device)].to(x.device, non_blocking=True), found


# --------------------------------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------------------------------
class DistillationModule(HoldsFrozenModels, ClassifierModule):
    """Train a student on a frozen teacher's soft predictions (KD), optionally switching losses part-way.

    Loss (Hinton et al. 2015, Sec. 2; pure KD, ``alpha=1``, in Nagarajan et al. 2023)::

        L = (1 - alpha) * CE(y, p_s) + alpha * tau^2 * KL(p_t^tau || p_s^tau)

    while ``distill_start_epoch <= epoch < distill_end_epoch``; outside that window the student trains on the
    labels alone (plain cross-entropy). ``distill_start_epoch=E/2`` is the deviation paper's **late switch**;
    ``distill_end_epoch=E/2`` its reverse. **Self-distillation** is a teacher with the student's
    architecture, trained first (``configs/distillation/self_distillation.yaml``).

    The teacher sees exactly the (augmented, mixed) batch the student sees, in ``eval`` mode and under ``no_grad``.
    When inputs are not augmented, ``cache_teacher_logits=True`` computes its logits once at the start of ``fit``
    and looks each input up by its content instead; an input changed after loading (by ``MixupCallback`` or any
    other callback) is not in the table and goes to the live teacher (logged once), so the student never fits
    mixed inputs against the teacher's logits of unmixed ones. A datamodule may also yield ``[x, y, teacher_logits]``
    batches itself: a floating-point third batch element must be ``(N, num_classes)`` and is taken as the teacher's
    logits, unless a callback that changes the inputs (``changes_inputs = True``, as MixupCallback) is attached: then
    the live teacher runs on the changed inputs too.

    Logs what :class:`ClassifierModule` logs (``train_loss``, ``train_acc``, ``val_loss``, ``val_acc``, ...) plus
    ``train_kd`` (the ``tau^2 KL`` term, epoch mean) and ``distilling`` (1 in epochs that use the KD loss).

    Args:
        student: the student backbone, returning ``(N, num_classes)`` logits (trained; saved in checkpoints under
            ``model.``, so a ``ClassifierModule`` loads it).
        teacher: the teacher backbone. Its weights come from ``teacher_checkpoint`` when given (then ``teacher`` is
            only the architecture, and may be omitted for checkpoints written by the CLI), or from a
            :class:`callbacks.TeacherTrajectory`; otherwise it must already be trained.
        num_classes: number of classes (the CLI links it from the datamodule).
        temperature: distillation temperature ``tau > 0``.
        alpha: weight of the KD term in ``[0, 1]``; ``1.0`` (default) is pure distillation.
        distill_start_epoch: first epoch (0-based) trained with the KD loss; earlier epochs use one-hot labels.
        distill_end_epoch: first epoch after the KD phase (one-hot labels again from there), or ``None`` for never.
        teacher_checkpoint: path of a ``ClassifierModule`` checkpoint (or a ``DistillationModule`` checkpoint, to
            chain self-distillation generations, or a plain state dict) holding the teacher's weights. Read when
            ``fit`` starts, so the student checkpoint reloads without it.
        cache_teacher_logits: compute the teacher's logits on the training set once when ``fit`` starts (shared
            across DDP ranks) and look them up for each batch; needs a datamodule with a map-style ``train_dataset``
            and no augmentation. The datamodule is not modified.
        optimizer: a callable building the optimizer from the student's parameters.
        lr_scheduler: optional callable building a scheduler from the optimizer.
        label_smoothing: label smoothing of the cross-entropy term.

    Note:
        The teacher is deliberately *not* a registered submodule: it is not in ``parameters()``, never in the
        optimizer, in DDP's gradient buckets or in the checkpoint's ``state_dict``, and ``module.train()`` leaves it
        in ``eval`` mode. It still follows the module across devices and dtypes (``.to()``, precision plugins).
        Resume a run with the same ``teacher_checkpoint`` (the CLI does, from the config) or the same
        ``TeacherTrajectory``; in Python, pass the teacher again.

    Example::

        >>> from lightning_methods.nets import MLP
        >>> teacher = MLP(in_features=64, num_classes=10, hidden_sizes=[64])  # trained beforehand
        >>> module = DistillationModule(MLP(64, 10, hidden_sizes=[16]), teacher, num_classes=10, temperature=4.0)
        >>> module.teacher is teacher, sum(p.numel() for p in module.parameters()) == 64 * 16 + 16 + 16 * 10 + 10
        (True, True)
    """

    #: the frozen teacher (see the Note)
    teacher = FrozenSlot()

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        num_classes: int | None = None,
        temperature: float = 1.0,
        alpha: float = 1.0,
        distill_start_epoch: int = 0,
        distill_end_epoch: int | None = None,
        teacher_checkpoint: str | None = None,
        cache_teacher_logits: bool = False,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        if not isinstance(student, nn.Module):
            raise TypeError(f"`student` must be an nn.Module (the student backbone), got {type(student).__name__}.")
        if teacher is not None and not isinstance(teacher, nn.Module):
            raise TypeError(f"`teacher` must be an nn.Module (the teacher backbone) or None, got {type(teacher).__name__}.")
        if num_classes is None:
            raise ValueError("`num_classes` is required (the CLI links it from the datamodule; in Python pass it).")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"`temperature` must be a number > 0, got {temperature!r}.")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"`alpha` must be in [0, 1] (the weight of the KD term), got {alpha!r}.")
        if isinstance(distill_start_epoch, bool) or not isinstance(distill_start_epoch, int) or distill_start_epoch < 0:
            raise ValueError(f"`distill_start_epoch` must be an integer >= 0, got {distill_start_epoch!r}.")
        if distill_end_epoch is not None and (
            isinstance(distill_end_epoch, bool)
            or not isinstance(distill_end_epoch, int)
            or distill_end_epoch <= distill_start_epoch
        ):
            raise ValueError(
                f"`distill_end_epoch` must be None or an integer > `distill_start_epoch={distill_start_epoch}`, "
                f"got {distill_end_epoch!r}."
            )
        if teacher_checkpoint is not None and not isinstance(teacher_checkpoint, (str, Path)):
            raise TypeError(f"`teacher_checkpoint` must be a path, got {type(teacher_checkpoint).__name__}.")
        super().__init__(student, num_classes, optimizer, lr_scheduler, label_smoothing)
        self._check_class_counts(student, "student")
        if teacher is not None:
            self._check_class_counts(teacher, "teacher")
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.distill_start_epoch = distill_start_epoch
        self.distill_end_epoch = distill_end_epoch
        self.teacher_checkpoint = None if teacher_checkpoint is None else str(teacher_checkpoint)
        self.cache_teacher_logits = cache_teacher_logits
        # Held outside the module tree (see the Note): never trained, never checkpointed, never DDP-synchronised.
        self.teacher = teacher
        # Where the teacher's weights come from; a teacher built from a CLI config alone has random weights.
        self._teacher_source = "module" if _cli_given_hparams() is None else "config"
        self._checkpoint_loaded = False
        self._cache: _LogitCache | None = None
        self._told_live_teacher = False
        # a running sum, not a torchmetrics MeanMetric: its per-step update costs ~40 us, a few % of a small step
        self._kd_sum: torch.Tensor | None = None
        self._kd_count = 0

    # -- the teacher --------------------------------------------------------------------------------------------------
    @property
    def student(self) -> nn.Module:
        """The student backbone (``self.model``; a property so its weights appear once in the state dict)."""
        return self.model

    def _check_class_counts(self, backbone: nn.Module, arg: str) -> None:
        classes = getattr(backbone, "num_classes", None)
        if isinstance(classes, int) and classes != self.num_classes:
            raise ValueError(
                f"`{arg}` ({type(backbone).__name__}) predicts {classes} classes but `num_classes={self.num_classes}`: "
                f"teacher and student must output the same {self.num_classes} classes."
            )

    def load_teacher(self, path: str | Path, arg: str = "teacher_checkpoint") -> nn.Module:
        """Load the teacher's weights from a checkpoint (building its architecture from the checkpoint when the
        module has no teacher yet), freeze it and put it on the student's device. Used by ``TeacherTrajectory``."""
        teacher = load_backbone_weights(path, self.teacher, arg=arg)
        self._check_class_counts(teacher, arg)
        self.teacher = teacher
        self._teacher_source = "checkpoint"
        return teacher

    @torch.no_grad()
    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's logits on ``x`` (``eval`` mode, no gradient)."""
        if self.teacher is None:
            raise RuntimeError("DistillationModule has no teacher: pass `teacher` or `teacher_checkpoint`.")
        return self.teacher(x)

    # -- the schedule ---------------------------------------------------------------------------------------------------
    def distilling(self, epoch: int | None = None) -> bool:
        """Whether ``epoch`` (default: the current one) trains with the KD loss."""
        epoch = self.current_epoch if epoch is None else epoch
        return epoch >= self.distill_start_epoch and (self.distill_end_epoch is None or epoch < self.distill_end_epoch)

    # -- fail before training ---------------------------------------------------------------------------------------------
    backbone_arg = "student"

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = self.trainer.datamodule if self._trainer else None
        if stage != "fit":
            return
        if self.teacher_checkpoint is not None and not self._checkpoint_loaded:
            # a TeacherTrajectory (its setup runs first) may have loaded a teacher already: keep its architecture
            self.load_teacher(self.teacher_checkpoint)
            self._checkpoint_loaded = True
        if self.teacher is None:
            raise ValueError(
                "DistillationModule has no teacher: pass `teacher` (a trained backbone), `teacher_checkpoint` (a "
                "ClassifierModule checkpoint) or add a `callbacks.TeacherTrajectory` to the Trainer."
            )
        if self._teacher_source == "config":
            raise ValueError(
                "`teacher` was built from a config, so its weights are random: set `teacher_checkpoint` to the "
                "teacher's checkpoint (e.g. checkpoints/teacher/last.ckpt) or add a `callbacks.TeacherTrajectory`."
            )
        check_model_against_data(self.teacher, self.num_classes, datamodule, arg="teacher")
        if self.cache_teacher_logits:
            self._check_cacheable(datamodule)

    def _check_cacheable(self, datamodule: Any) -> None:
        if datamodule is None or not isinstance(getattr(datamodule, "train_dataset", None), Dataset):
            raise ValueError(
                "`cache_teacher_logits=True` needs a datamodule with a map-style `train_dataset` (e.g. any "
                "ArrayDataModule). Otherwise set it to False, or yield `[x, y, teacher_logits]` batches yourself."
            )
        if getattr(datamodule, "augment", False):
            raise ValueError(
                f"`cache_teacher_logits=True` but {type(datamodule).__name__} augments its training inputs: the "
                "teacher must see the same augmented batch as the student. Set `cache_teacher_logits=False` (or "
                "`augment=False` on the datamodule)."
            )

    def on_fit_start(self) -> None:
        self._cache = None
        if self.cache_teacher_logits:
            self._cache = self._build_cache(self.trainer.datamodule.train_dataset)

    def _build_cache(self, dataset: Dataset) -> _LogitCache:
        # Each rank computes the logits of its share of the rows and the shares are gathered in order, so every rank
        # holds the whole table (its sampler then picks its own rows). Indexing the dataset directly (no DataLoader
        # iterator, which draws a seed from the global RNG) keeps training's shuffles equal to those without cache.
        # the inputs as training_step receives them: a "bf16-true"/"64-true" precision plugin casts the batch (and
        # the teacher with the module), so the table is built from, and matches, the cast inputs
        convert = self.trainer.precision_plugin.convert_input
        first = convert(default_collate([dataset[0]])[0])
        weights = _LogitCache.make_weights(first)
        batch_size = getattr(self.trainer.datamodule, "eval_batch_size", None) or 256

        def one_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
            x = convert(batch[0].to(self.device))
            return _LogitCache.fingerprint(x, weights), self.teacher_logits(x).float()

        fingerprints, logits = map_in_order(dataset, one_batch, batch_size)
        # on the accelerator when it is small (one gather per step, no transfer); on the CPU otherwise
        logits = logits if logits.numel() * 4 <= 2**30 else logits.cpu()
        return _LogitCache(fingerprints, logits, weights, first.dtype)

    # -- training -------------------------------------------------------------------------------------------------------
    def training_loss(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = batch[0], batch[1]
        logits = self(x)
        if not self.distilling():
            return self.loss(logits, y), logits, y
        return self.kd_objective(logits, self._teacher_logits_for(batch), y), logits, y

    def _served_logits(self, batch: Any) -> torch.Tensor | None:
        """The teacher's logits a datamodule serves as a floating-point third batch element, checked for shape."""
        if len(batch) < 3 or not isinstance(batch[2], torch.Tensor) or not batch[2].is_floating_point():
            return None
        served = batch[2]
        if tuple(served.shape) != (len(batch[0]), self.num_classes):
            raise ValueError(
                "DistillationModule takes a floating-point third batch element as the teacher's logits, of shape "
                f"(batch, num_classes) = ({len(batch[0])}, {self.num_classes}); this batch's is {tuple(served.shape)}. "
                "Serve the teacher's logits there, or drop the element (per-example weights are not supported)."
            )
        return served

    def _inputs_changed_by_callbacks(self) -> bool:
        """A Trainer callback declares ``changes_inputs = True`` (MixupCallback does): it changes the training inputs
        after loading, so logits computed for the loaded inputs do not belong to what the student sees."""
        return self._trainer is not None and any(getattr(cb, "changes_inputs", False) for cb in self.trainer.callbacks)

    def _tell_live_teacher(self) -> None:
        if not self._told_live_teacher:
            rank_zero_info(
                "DistillationModule: some training inputs differ from the dataset's (a callback such as "
                "MixupCallback, or an augmentation, changed them), so the teacher is run on those inputs instead of "
                "using the cached or served logits."
            )
            self._told_live_teacher = True

    def _teacher_logits_for(self, batch: Any) -> torch.Tensor:
        x = batch[0]
        served = self._served_logits(batch)
        if served is not None:
            if not self._inputs_changed_by_callbacks():
                return served  # the datamodule serves the teacher's logits itself
            self._tell_live_teacher()  # they are the loaded inputs' logits, not the changed inputs'
        if self._cache is None:
            return self.teacher_logits(x)
        logits, found = self._cache.lookup(x)
        if not bool(found.all()):
            # inputs changed after loading (mixup, augmentation by a callback): their cached logits would be the
            # unmixed inputs' ones, so the live teacher sees exactly what the student sees
            self._tell_live_teacher()
            missing = ~found
            logits = logits.clone()
            logits[missing] = self.teacher_logits(x[missing]).to(logits.dtype)
        return logits

    def kd_term(self, logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """The distillation term of a batch, ``tau^2 KL(p_t^tau || p_s^tau)``; subclasses change the KD objective here
        (``kd_objective`` mixes it with the one-hot loss and logs it as ``train_kd``)."""
        return kd_loss(logits, teacher_logits, self.temperature)

    def kd_objective(self, logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The loss of a distilling step: ``(1 - alpha) loss(logits, targets) + alpha kd_term`` (``loss`` is the
        one-hot objective, plain cross-entropy here)."""
        if teacher_logits.shape != logits.shape:
            raise ValueError(
                f"Teacher logits of shape {tuple(teacher_logits.shape)} do not match the student's "
                f"{tuple(logits.shape)}: teacher and student must output the same `num_classes`."
            )
        kd = self.kd_term(logits, teacher_logits)
        self._kd_sum = kd.detach() * len(logits) + (0.0 if self._kd_sum is None else self._kd_sum)
        self._kd_count += len(logits)
        if self.alpha < 1.0:
            return (1.0 - self.alpha) * self.loss(logits, targets) + self.alpha * kd
        check_targets(logits, targets)
        return kd

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        if self._kd_sum is not None:  # DDP: ranks run the same number of equal batches, so the mean of means is exact
            self.log_global("train_kd", self._kd_sum / self._kd_count)
        else:  # a one-hot epoch has no KD term: do not leave the last KD epoch's value standing for this one
            self.trainer.callback_metrics.pop("train_kd", None)
        self._kd_sum, self._kd_count = None, 0
        self.log_global("distilling", float(self.distilling()))
