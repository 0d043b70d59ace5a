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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torch.utils.data import Dataset, default_collate

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


# --------------------------------------------------------------------------------------------------------------------
# Teacher weights from a checkpoint
# --------------------------------------------------------------------------------------------------------------------
def _read_checkpoint(path: str | Path, arg: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"`{arg}={str(path)!r}` does not exist. Point it at a checkpoint of a trained ClassifierModule (e.g. the "
            "`last.ckpt` a ModelCheckpoint wrote; `lightning-methods fit --config configs/distillation/teacher.yaml` "
            "writes checkpoints/teacher/last.ckpt)."
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        # Lightning checkpoints may hold hyperparameter objects that the safe unpickler refuses (a Namespace, a
        # class in an optimizer config); this is the user's own checkpoint, named by them.
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:
            raise ValueError(f"`{arg}={str(path)!r}` is not a readable PyTorch checkpoint: {err}") from err
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"`{arg}={str(path)!r}` holds a {type(checkpoint).__name__}, not a checkpoint or state dict.")
    return dict(checkpoint)


def _backbone_state_dict(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    """The backbone's weights in a ClassifierModule / DistillationModule checkpoint, or a plain state dict."""
    state = checkpoint.get("state_dict", checkpoint)
    # ClassifierModule and its subclasses (DistillationModule included: the student is `model`) hold the backbone
    # under `model.`; anything else (a bare `torch.save(net.state_dict())`) is taken as the backbone itself.
    prefixed = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    return prefixed or {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _backbone_config(checkpoint: Mapping) -> Mapping | None:
    """The ``class_path``/``init_args`` config of the backbone, when the checkpoint was written by the CLI."""
    hparams = checkpoint.get("hyper_parameters") or {}
    for name in ("model", "student"):
        config = hparams.get(name)
        if isinstance(config, Mapping) and "class_path" in config:
            return config
    return None


def _build_backbone(config: Mapping) -> nn.Module:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--backbone", type=nn.Module)
    parsed = parser.parse_object({"backbone": dict(config)})
    return parser.instantiate_classes(parsed).backbone


def load_backbone_weights(
    path: str | Path, backbone: nn.Module | None = None, arg: str = "teacher_checkpoint"
) -> nn.Module:
    """Load a backbone from a ``ClassifierModule`` (or ``DistillationModule``) checkpoint or a plain state dict.

    Args:
        path: the checkpoint file.
        backbone: the architecture to load into. When omitted, it is rebuilt from the checkpoint's hyperparameters,
            which works for checkpoints written by the ``lightning-methods`` CLI.
        arg: the argument name used in error messages.

    Returns:
        The backbone with the checkpoint's weights (the given object when ``backbone`` is passed).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the checkpoint holds another architecture, or records none and ``backbone`` is missing.
    """
    checkpoint = _read_checkpoint(path, arg)
    if backbone is None:
        config = _backbone_config(checkpoint)
        if config is None:
            raise ValueError(
                f"`{arg}={str(path)!r}` does not record its backbone's architecture (it was not written by the "
                "lightning-methods CLI): pass the architecture too, e.g. `teacher=SmallCNN(num_classes=10)`."
            )
        backbone = _build_backbone(config)
    state = _backbone_state_dict(checkpoint)
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as err:
        detail = str(err).split("\n\t", 1)[-1][:400]
        raise ValueError(
            f"`{arg}={str(path)!r}` holds weights of another architecture than the given "
            f"{type(backbone).__name__}: {detail}. Pass the backbone (and its arguments) the checkpoint was trained with."
        ) from err
    return backbone


# --------------------------------------------------------------------------------------------------------------------
# Cached teacher logits
# --------------------------------------------------------------------------------------------------------------------
class _WithIndex(Dataset):
    """``(x, y, index)`` from a map-style ``(x, y)`` dataset: batches carry the rows of the cached logit table.

    The index, not the logits row, travels with each example: one gather per batch instead of a tensor index and a
    stack per example (which cost a small model's step ~10%).
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple:
        item = self.dataset[index]
        return (item[0], item[1], index)


# --------------------------------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------------------------------
class DistillationModule(ClassifierModule):
    """Train a student on a frozen teacher's soft predictions (KD), optionally switching losses part-way.

    Loss (Hinton et al. 2015, Sec. 2; pure KD, ``alpha=1``, in Nagarajan et al. 2023)::

        L = (1 - alpha) * CE(y, p_s) + alpha * tau^2 * KL(p_t^tau || p_s^tau)

    while ``distill_start_epoch <= epoch < distill_end_epoch``; outside that window the student trains on the
    labels alone (plain cross-entropy). ``distill_start_epoch=E/2`` is the deviation paper's **late switch**;
    ``distill_end_epoch=E/2`` its reverse. **Self-distillation** is a teacher with the student's
    architecture, trained first (``configs/distillation/self_distillation.yaml``).

    The teacher sees exactly the (augmented) batch the student sees, in ``eval`` mode and under ``no_grad``. When
    inputs are not augmented, ``cache_teacher_logits=True`` computes its logits once at the start of ``fit`` and
    looks them up for each batch instead. A datamodule may also yield ``[x, y, teacher_logits]`` batches itself: a
    floating-point third batch element ``(N, C)`` is taken as the teacher's logits (an integer one ``(N,)`` indexes
    the cached table).

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
        cache_teacher_logits: compute the teacher's logits on the training set once when ``fit`` starts (on every
            rank) and serve them with the batches; needs a datamodule with a map-style ``train_dataset`` and no
            augmentation.
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
        self.__dict__["_teacher"] = None
        # Where the teacher's weights come from; a teacher built from a CLI config alone has random weights.
        self._teacher_source = "module" if _cli_given_hparams() is None else "config"
        if teacher is not None:
            self._set_teacher(teacher)
        self._checkpoint_loaded = False
        self._batch_teacher_logits: torch.Tensor | None = None
        self._logit_table: torch.Tensor | None = None
        # a running sum, not a torchmetrics MeanMetric: its per-step update costs ~40 us, a few % of a small step
        self._kd_sum: torch.Tensor | None = None
        self._kd_count = 0

    # -- the teacher --------------------------------------------------------------------------------------------------
    @property
    def student(self) -> nn.Module:
        """The student backbone (``self.model``; a property so its weights appear once in the state dict)."""
        return self.model

    @property
    def teacher(self) -> nn.Module | None:
        """The frozen teacher backbone (not a registered submodule)."""
        return self.__dict__["_teacher"]

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "teacher":  # nn.Module.__setattr__ would register it as a submodule, bypassing the property
            self._set_teacher(value)
        else:
            super().__setattr__(name, value)

    def _set_teacher(self, teacher: nn.Module) -> None:
        teacher.requires_grad_(False)
        teacher.eval()
        param = next(self.model.parameters(), None)
        if param is not None:
            teacher.to(device=param.device)
        self.__dict__["_teacher"] = teacher

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
        self._set_teacher(teacher)
        self._teacher_source = "checkpoint"
        return teacher

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> DistillationModule:
        super()._apply(fn, *args, **kwargs)
        if self.__dict__.get("_teacher") is not None:  # .to(device) / .double() / precision plugins reach the hidden teacher too
            self.teacher._apply(fn, *args, **kwargs)
        return self

    @torch.no_grad()
    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's logits on ``x`` (``eval`` mode, no gradient)."""
        if self.teacher is None:
            raise RuntimeError("DistillationModule has no teacher: pass `teacher` or `teacher_checkpoint`.")
        if self.teacher.training:  # someone called teacher.train(): a frozen teacher never uses dropout/BN updates
            self.teacher.eval()
        return self.teacher(x)

    # -- the schedule ---------------------------------------------------------------------------------------------------
    def distilling(self, epoch: int | None = None) -> bool:
        """Whether ``epoch`` (default: the current one) trains with the KD loss."""
        epoch = self.current_epoch if epoch is None else epoch
        return epoch >= self.distill_start_epoch and (self.distill_end_epoch is None or epoch < self.distill_end_epoch)

    # -- fail before training ---------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule if self._trainer else None
        check_model_against_data(self.model, self.num_classes, datamodule, arg="student")
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
        if self.cache_teacher_logits:
            datamodule = self.trainer.datamodule
            base = datamodule.train_dataset
            if isinstance(base, _WithIndex):  # a second fit on the same datamodule: recompute
                base = base.dataset
            table = self._logits_over(base)
            # on the accelerator when it is small (one gather per step, no transfer); on the CPU otherwise
            self._logit_table = table.to(self.device) if table.numel() * 4 <= 2**30 else table
            datamodule.train_dataset = _WithIndex(base)

    def _logits_over(self, dataset: Dataset) -> torch.Tensor:
        # Every rank computes the whole table (the sampler then picks its own indices): identical by construction.
        # Indexed directly rather than through a DataLoader, whose iterator draws a seed from the global RNG: with
        # the cache, training then sees the same shuffles as without it.
        batch_size = getattr(self.trainer.datamodule, "eval_batch_size", None) or 256
        chunks = []
        for start in range(0, len(dataset), batch_size):
            batch = default_collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            chunks.append(self.teacher_logits(batch[0].to(self.device)).float().cpu())
        return torch.cat(chunks)

    # -- training -------------------------------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        # ClassifierModule's step (forward, metrics, logging) with this module's `loss`; the teacher's logits for
        # the batch are looked up here, where the inputs are at hand, and only in epochs that distil.
        self._batch_teacher_logits = None
        if self.distilling():
            self._batch_teacher_logits = self._teacher_logits_for(batch)
        return super().training_step(batch, batch_idx)

    def _teacher_logits_for(self, batch: Any) -> torch.Tensor:
        if len(batch) < 3:
            return self.teacher_logits(batch[0])
        extra = batch[2]
        if extra.is_floating_point():
            return extra
        if self._logit_table is None:
            raise ValueError(
                "The batch's third element holds integer indices but no teacher logits were cached: set "
                "`cache_teacher_logits=True`, or yield the teacher's (N, C) logits as the third element."
            )
        return self._logit_table[extra.to(self._logit_table.device)].to(self.device, non_blocking=True)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The KD loss in distilling epochs (teacher logits of the current batch), the plain cross-entropy otherwise."""
        teacher_logits = getattr(self, "_batch_teacher_logits", None)
        if teacher_logits is None:
            return super().loss(logits, targets)
        self._batch_teacher_logits = None
        if teacher_logits.shape != logits.shape:
            raise ValueError(
                f"Teacher logits of shape {tuple(teacher_logits.shape)} do not match the student's "
                f"{tuple(logits.shape)}: teacher and student must output the same `num_classes`."
            )
        kd = kd_loss(logits, teacher_logits, self.temperature)
        self._kd_sum = kd.detach() * len(logits) + (0.0 if self._kd_sum is None else self._kd_sum)
        self._kd_count += len(logits)
        if self.alpha < 1.0:
            return (1.0 - self.alpha) * super().loss(logits, targets) + self.alpha * kd
        check_targets(logits, targets)
        return kd

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        if self._kd_sum is not None:  # DDP: ranks run the same number of equal batches, so the mean of means is exact
            self.log("train_kd", self._kd_sum / self._kd_count, sync_dist=True)
        self._kd_sum, self._kd_count = None, 0
        self.log("distilling", float(self.distilling()), sync_dist=True)  # equal on every rank: silences the DDP warning
