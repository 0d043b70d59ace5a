"""Unsupervised (consistency) mixup for semi-supervised learning: Interpolation Consistency Training, k-point.

Papers:
    Chaudhry, Menon, Veit, Jayasumana, Ramalingam, Kumar, *When does mixup promote local linearity in learned
    representations?* (arXiv 2210.16413): mixup used as an **unsupervised** loss on unlabelled points makes all layers
    more linear and training converge faster; mixing more than two points strengthens the constraint.
    Verma, Lamb, Kannala, Bengio, Lopez-Paz, *Interpolation Consistency Training for Semi-Supervised Learning*
    (ICT, arXiv 1903.03825, IJCAI 2019), whose released code is the reference for the loss below.

The objective on a labelled batch ``(x, y)`` and an unlabelled batch ``u`` (ICT Eq. 2-3, k-point as in Chaudhry et
al. Sec. 3):

    z'      = f_{theta'}(u)                              # EMA teacher logits on the *unmixed* unlabelled points
    u_mix_i = sum_m lam_im u_{pi_m(i)},   lam_i ~ Dirichlet(alpha 1_k)
    target  = softmax(sum_m lam_im z'_{pi_m(i)})         # mix the teacher's logits, then softmax (as ICT's code)
    L_cons  = mean_{i,c} (softmax(f_theta(u_mix))_ic - target_ic)^2
    L       = CE(f_theta(x), y) + w * sigmoid_rampup(t) * L_cons

``theta'`` is an exponential moving average of ``theta`` with decay ``min(1 - 1/(step + 1), ema_decay)`` (Mean
Teacher, Tarvainen & Valpola 2017), ``sigmoid_rampup(t) = exp(-5 (1 - t/T)^2)`` for ``t < T`` epochs. ``L_cons`` is
normalised as in ICT's code (``softmax_mse_loss`` summed, divided by the number of classes and by the batch size),
i.e. the squared error averaged over the batch *and the classes*, so ICT's weight ``w = 100`` carries over.
"""

from __future__ import annotations

import copy
import inspect
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from lightning_methods._utils import save_hparams
from lightning_methods._frozen import FrozenSlot, HoldsFrozenModels
from lightning_methods.classifier import ClassifierModule, hard_targets
from lightning_methods.mixup import MixingSampler, _finite_batches, mix, mix_targets

__all__ = ["MixupConsistencyModule", "sigmoid_rampup", "ict_consistency_loss"]


def sigmoid_rampup(current: float, length: float) -> float:
    """``exp(-5 (1 - current/length)^2)`` clipped to ``[0, length]``: 0.0067 at the start, 1 from ``length`` on."""
    if length <= 0:
        return 1.0
    phase = 1.0 - min(max(current, 0.0), length) / length
    return float(math.exp(-5.0 * phase * phase))


def ict_consistency_loss(student_logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Squared error between the student's probabilities and the target, averaged over examples and classes."""
    return F.mse_loss(student_logits.softmax(dim=-1), target_probs, reduction="mean")


class MixupConsistencyModule(HoldsFrozenModels, ClassifierModule):
    """Semi-supervised training with unsupervised k-point mixup (ICT) against an EMA teacher.

    Supervised cross-entropy on the labelled part of each batch plus the interpolation-consistency loss of the module
    docstring on the unlabelled part: the student's prediction at a k-point mix of unlabelled inputs must match the
    softmax of the same mix of the EMA teacher's logits at the endpoints. The weight ramps up with ICT's sigmoid
    schedule over ``rampup_epochs`` (fractional epochs, so short runs ramp smoothly).

    Built as a LightningModule (not a callback) because the loss needs a second network (the EMA teacher), a second
    input stream (unlabelled data) and a second loss term: all of those live naturally in ``training_step``.

    Batches: training batches are ``{"labeled": [x, y], "unlabeled": u}`` as :class:`datamodules.SemiSupervisedDataModule`
    yields them (``u`` a tensor or a list whose first element is the inputs); a plain ``[x, y]`` batch is also
    accepted and then serves as both streams (its labels used for the supervised term only). Validation and test
    batches are ``[x, y]``; the student is evaluated (``val_acc``) and the teacher too (``val_ema_acc``). Logged per
    epoch: ``train_loss``, ``train_acc``, ``train_sup_loss``, ``train_consistency_loss``, ``consistency_weight``.

    Args:
        model: the backbone (returns logits).
        num_classes: number of classes (the CLI links it from the datamodule).
        optimizer: optimizer callable (the frozen teacher's parameters never receive gradients).
        lr_scheduler: optional scheduler callable.
        consistency_weight: ``w``, the final weight of the consistency loss (ICT: 100 for CIFAR-10 / SVHN).
        rampup_epochs: ``T`` of the sigmoid ramp-up, in epochs (ICT: 100 of 400 on CIFAR-10); 0 disables it.
        alpha: Dirichlet concentration of the unsupervised mix (ICT: 1.0).
        num_points: ``k``, unlabelled points per mix (2 is ICT; Chaudhry et al. study larger ``k``).
        per_sample: one ``lam`` per mixed example (Chaudhry et al.) or one per batch (ICT's code).
        ema_decay: decay of the teacher (Mean Teacher / ICT: 0.999).
        supervised_alpha: when set, the supervised term uses k-point mixup of the labelled batch too, with this
            ``alpha`` (ICT's code does, with ``mixup_sup_alpha``); ``None`` is plain ERM on the labels, the
            "ERM + unsupervised mixup" arm of Chaudhry et al.
        seed: seed of the mixing draws (``None``: ``torch.initial_seed()`` at the start of fit).
        label_smoothing: label smoothing of the supervised cross-entropy.

    Note:
        The teacher is a frozen copy of the backbone (``requires_grad_(False)``, run in eval mode under ``no_grad``,
        see :meth:`teacher_logits`) averaged
        over parameters and floating-point buffers (so BatchNorm statistics are averaged too); ICT runs its EMA model
        in train mode, which differs only for dropout / BatchNorm. The teacher is part of the ``state_dict``, so it
        is checkpointed and restored on resume. Under DDP every rank holds the same student weights after each step,
        so the teachers stay identical without communication.

    Example::

        >>> from lightning_methods.nets import MLP
        >>> module = MixupConsistencyModule(MLP(in_features=64, num_classes=10), num_classes=10, num_points=4)
        >>> module.teacher is not module.model, all(not p.requires_grad for p in module.teacher.parameters())
        (True, True)
    """

    #: the EMA teacher: frozen (never in the optimizer or DDP's buckets), saved in the checkpoint under `teacher.`
    teacher = FrozenSlot(persistent=True)

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        consistency_weight: float = 100.0,
        rampup_epochs: float = 30.0,
        alpha: float = 1.0,
        num_points: int = 2,
        per_sample: bool = True,
        ema_decay: float = 0.999,
        supervised_alpha: float | None = None,
        seed: int | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(model, num_classes, optimizer, lr_scheduler, label_smoothing)
        if not consistency_weight >= 0:
            raise ValueError(f"`consistency_weight` must be >= 0, got {consistency_weight!r}.")
        if not rampup_epochs >= 0:
            raise ValueError(f"`rampup_epochs` must be >= 0, got {rampup_epochs!r}.")
        if not alpha > 0:
            raise ValueError(f"`alpha` must be positive (the Dirichlet concentration), got {alpha!r}.")
        if supervised_alpha is not None and not supervised_alpha > 0:
            raise ValueError(f"`supervised_alpha` must be positive or None (no supervised mixup), got {supervised_alpha!r}.")
        if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 2:
            raise ValueError(f"`num_points` must be an integer >= 2, got {num_points!r}.")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"`ema_decay` must be in [0, 1), got {ema_decay!r}.")
        save_hparams(self, inspect.currentframe())
        self.consistency_weight = float(consistency_weight)
        self.rampup_epochs = float(rampup_epochs)
        self.alpha = float(alpha)
        self.num_points = num_points
        self.per_sample = per_sample
        self.ema_decay = float(ema_decay)
        self.supervised_alpha = supervised_alpha
        self.seed = seed
        self.teacher = copy.deepcopy(model)
        self.sup_loss_mean, self.consistency_loss_mean = MeanMetric(), MeanMetric()
        self._weight = 0.0
        self.val_ema_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_ema_acc = MulticlassAccuracy(num_classes, average="micro")
        self._samplers: dict[str, MixingSampler] = {}  # one mixing stream per input stream
        self._batch_idx = 0
        self._ema_step = 0  # optimizer steps folded into the teacher (equals global_step; kept to skip repeats)

    # -- the teacher -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The EMA teacher's logits, always computed in eval mode and without gradients."""
        return self.teacher(x)

    @torch.no_grad()
    def update_teacher(self, step: int) -> None:
        """One EMA step ``theta' <- d theta' + (1 - d) theta`` with ``d = min(1 - 1/(step + 1), ema_decay)``."""
        decay = min(1.0 - 1.0 / (step + 1), self.ema_decay)
        student = self.model.state_dict()
        for name, value in self.teacher.state_dict().items():
            if value.is_floating_point():
                value.mul_(decay).add_(student[name].detach(), alpha=1.0 - decay)
            else:
                value.copy_(student[name])  # counters such as BatchNorm's num_batches_tracked

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # once per optimizer step (gradient accumulation steps less often than batches)
        if self.trainer.global_step > self._ema_step:
            self._ema_step = self.trainer.global_step
            self.update_teacher(self._ema_step)

    # -- training ----------------------------------------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        if self.seed is None:
            self.seed = int(torch.initial_seed()) % (2**63)
        # a stream per (seed, rank, epoch): DDP ranks differ, an end-of-epoch resume replays the same draws
        rng = np.random.default_rng([self.seed, self.global_rank, self.current_epoch])
        alphas = {"unlabeled": self.alpha}
        if self.supervised_alpha is not None:
            alphas["labeled"] = self.supervised_alpha
        batches = _finite_batches(self.trainer) if self._trainer is not None else None
        self._samplers = {
            stream: MixingSampler(self.num_points, a, rng, self.per_sample, num_batches=batches)
            for stream, a in alphas.items()
        }

    def consistency_ramp(self, batch_idx: int = 0) -> float:
        """The ramp-up factor at the current (fractional) epoch."""
        epochs = self.current_epoch + batch_idx / max(1, self.trainer.num_training_batches)
        return sigmoid_rampup(epochs, self.rampup_epochs)

    def _draw(self, n: int, stream: str, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._samplers:
            self.on_train_epoch_start()
        lam, index = self._samplers[stream](n)
        return lam.to(device=device, dtype=dtype), index.to(device)

    def _split_batch(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if isinstance(batch, dict):
            if "labeled" not in batch or "unlabeled" not in batch:
                raise ValueError(
                    f"MixupConsistencyModule needs training batches {{'labeled': [x, y], 'unlabeled': u}} (as "
                    f"SemiSupervisedDataModule yields them); got keys {sorted(batch)}."
                )
            x, y = batch["labeled"][0], batch["labeled"][1]
            u = batch["unlabeled"]
            u = u[0] if isinstance(u, (list, tuple)) else u
            return x, y, u
        if isinstance(batch, (list, tuple)):
            return batch[0], batch[1], batch[0]
        raise TypeError(
            f"MixupConsistencyModule got a training batch of type {type(batch).__name__}; use "
            "SemiSupervisedDataModule (dict batches) or [inputs, targets] lists."
        )

    def consistency_loss(self, u: torch.Tensor, lam: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """ICT's loss for unlabelled inputs ``u`` mixed with weights ``lam`` ``(N, k)`` over partners ``index``."""
        teacher_logits = self.teacher_logits(u)  # at the unmixed points
        target = mix(teacher_logits, lam.to(teacher_logits.dtype), index).softmax(dim=-1)
        return ict_consistency_loss(self(mix(u, lam, index)), target)

    def training_loss(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y, u = self._split_batch(batch)

        # supervised term: ERM on the labels, or k-point supervised mixup when `supervised_alpha` is set
        if self.supervised_alpha is not None:
            lam, index = self._draw(len(x), "labeled", x.device, x.dtype)
            logits = self(mix(x, lam, index))
            y = mix_targets(y, lam, index, self.num_classes)  # train_acc then scores the dominant class
        else:
            logits = self(x)
        sup_loss = self.loss(logits, y)

        # unsupervised term (ICT): the student at a mix of unlabelled points vs softmax of the teacher's mixed logits
        lam, index = self._draw(len(u), "unlabeled", u.device, u.dtype)
        cons_loss = self.consistency_loss(u, lam, index)
        weight = self.consistency_weight * self.consistency_ramp(self._batch_idx)
        self.sup_loss_mean.update(sup_loss.detach(), len(x))
        self.consistency_loss_mean.update(cons_loss.detach(), len(u))
        self._weight = weight
        return sup_loss + weight * cons_loss, logits, y

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self._batch_idx = batch_idx  # the ramp-up is per (fractional) epoch
        return super().training_step(batch, batch_idx)

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        # compute() already reduced the means across DDP ranks and the weight is the same on every rank: sync_dist
        # averages identical values (and keeps Lightning from warning about unsynced epoch-level logs)
        self.log_metric("train_sup_loss", self.sup_loss_mean)
        self.log_metric("train_consistency_loss", self.consistency_loss_mean)
        self.log_global("consistency_weight", self._weight)

    # -- evaluation: the student as in ClassifierModule, plus the teacher --------------------------------------------
    def evaluate(self, batch: Any, stage: str) -> None:
        super().evaluate(batch, stage)
        getattr(self, f"{stage}_ema_acc").update(self.teacher_logits(batch[0]), hard_targets(batch[1]))

    def epoch_metrics(self, stage: str) -> list[str]:
        return super().epoch_metrics(stage) + [f"{stage}_ema_acc"]

    # -- checkpointing -------------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the teacher's weights are in the state_dict; the seed is what a seed=None run resolved
        checkpoint["mixup_consistency"] = {"seed": self.seed, "ema_step": self._ema_step}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("mixup_consistency", {})
        if self.hparams.get("seed") is None and state.get("seed") is not None:
            self.seed = state["seed"]
        self._ema_step = int(state.get("ema_step", 0))
