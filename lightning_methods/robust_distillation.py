"""Robust distillation for worst-class performance: robust teacher objectives and robust KD students.

Paper: Wang, Narasimhan, Zhou, Hooker, Lukasik, Menon, "Robust Distillation for Worst-class Performance: on the
Interplay Between Teacher and Student Objectives" (UAI 2023, arXiv 2206.06479). No official code; the exponentiated
gradient (EG) machinery follows the authors' related work (DROPS, Narasimhan & Menon 2021, and the logit adjustment
of Menon et al., "Long-tail learning via logit adjustment", ICLR 2021).

Per-class risk ``R_y(f) = E[l(y, f(x)) | Y = y]``, training class priors ``pi``. Objectives (paper, Sec. 3):

* standard ``sum_y pi_y R_y``; balanced ``(1/C) sum_y R_y``; worst-class ``max_y R_y = max_{lam in simplex}
  sum_y lam_y R_y``; trade-off ``(1 - a) * standard + a * robust`` (``a`` is ``worst_class_weight``), whose sweep
  over ``a`` traces the (average, worst-class) Pareto curve.
* A student replaces the one-hot label by the teacher's probabilities: the *distilled* per-class risk is
  ``R^d_y(f) = E_x[p_t,y(x) l(y, f(x))] / pi_y``, an unbiased estimate of ``R_y`` only when the teacher's scores are
  calibrated per class for the training distribution: the paper's theory, and why ``teacher_calibration`` exists.

Every objective is one per-example reweighting: with class weights ``w`` (a point of the simplex), ``sum_y w_y R_y``
is estimated on a batch by ``mean_i (w_{y_i} / pi_{y_i}) l_i`` (one-hot) or ``mean_i sum_y (w_y / pi_y) p_t,y(x_i)
l(y, f(x_i))`` (distilled), so ``w = pi`` is plain CE / plain KD and ``w = 1/C`` the balanced objective.

Class-DRO (``objective="dro"`` / ``"dro_kd"``): ``w = (1 - a) pi + a lam``; the multipliers ``lam`` start uniform and
are updated by exponentiated gradient ``lam_y <- lam_y exp(eta_t err_y)``, renormalised, ``eta_t = eg_step *
eg_decay^t``, from the per-class 0-1 errors of the current model on a **held-out, balanced validation split with true
labels** (multipliers learnt from training error collapse once the model fits its training set). Errors come from the
whole validation split gathered in dataset order across DDP ranks (:func:`lightning_methods._distributed.map_in_order`),
so every rank holds the same ``lam``, equal to the 1-process ``lam``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torch.utils.data import Dataset

from lightning_methods._distributed import map_in_order
from lightning_methods._utils import check_targets
from lightning_methods.classifier import ClassifierModule, hard_targets, soft_cross_entropy
from lightning_methods.distillation import DistillationModule

__all__ = [
    "RobustClassifierModule",
    "RobustDistillationModule",
    "check_priors",
    "class_weighted_cross_entropy",
    "class_weighted_kd_loss",
    "dataset_labels",
    "eg_update",
    "logit_adjusted_cross_entropy",
    "pareto_front",
    "per_class_error",
    "plot_pareto",
    "posthoc_logit_adjustment",
]

TEACHER_OBJECTIVES = ("erm", "balanced", "posthoc", "dro")
STUDENT_OBJECTIVES = ("kd", "balanced_kd", "dro_kd")
CALIBRATIONS = ("none", "posthoc", "per_class")
#: a validation split whose smallest class has fewer than this share of the largest one is "not balanced"
BALANCE_TOLERANCE = 0.8


# --------------------------------------------------------------------------------------------------------------------
# The math
# --------------------------------------------------------------------------------------------------------------------
def check_priors(priors: Any, num_classes: int, arg: str = "priors") -> torch.Tensor:
    """The class priors as a float tensor ``(C,)``: finite, positive and summing to 1 (within 1e-3), else ValueError."""
    try:
        tensor = torch.as_tensor(priors, dtype=torch.float64).flatten().cpu()
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"`{arg}` must be a sequence of {num_classes} class probabilities, got {priors!r}.") from err
    if tensor.numel() != num_classes:
        raise ValueError(f"`{arg}` has {tensor.numel()} entries but `num_classes={num_classes}`: give one prior per class.")
    if not bool(torch.isfinite(tensor).all()) or bool((tensor <= 0).any()):
        raise ValueError(
            f"`{arg}` must be finite and > 0 (a class with prior 0 has no training example to reweight), got "
            f"{tensor.tolist()}."
        )
    total = float(tensor.sum())
    if abs(total - 1.0) > 1e-3:
        raise ValueError(
            f"`{arg}` must sum to 1 (they are the training class frequencies), got a sum of {total:.6g}: divide the "
            "class counts by their total."
        )
    return (tensor / total).float()


def logit_adjusted_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, priors: torch.Tensor, tau: float = 1.0
) -> torch.Tensor:
    """Logit-adjusted cross-entropy ``CE(f(x) + tau log pi, y)`` (Menon et al. 2021, Eq. 10), batch mean.

    Its minimiser is ``f_y(x) = log p(y|x) - tau log pi_y + const``: at ``tau = 1`` the Bayes-optimal classifier for
    the balanced error. Targets may be class indices or soft ``(N, C)`` targets.

    Example::

        >>> logits, pi = torch.zeros(1, 2), torch.tensor([0.75, 0.25])
        >>> round(logit_adjusted_cross_entropy(logits, torch.tensor([1]), pi).item(), 4)  # -log(.25 / (.75 + .25))
        1.3863
    """
    return soft_cross_entropy(logits + tau * priors.to(logits).log(), targets)


def posthoc_logit_adjustment(logits: torch.Tensor, priors: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Post-hoc logit adjustment ``f_y(x) - tau log pi_y`` (Menon et al. 2021, Eq. 6): the argmax of an ERM model's
    adjusted scores is the balanced-error Bayes classifier when its probabilities are calibrated."""
    return logits - tau * priors.to(logits).log()


def class_weighted_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, example_weights: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """``mean_i c_{y_i} CE(y_i, f(x_i))``, or ``mean_i sum_y c_y q_y(x_i) (-log p_y(x_i))`` for soft targets ``q``.

    With ``c_y = w_y / pi_y`` this is the batch estimate of ``sum_y w_y R_y`` (``c = 1``: plain cross-entropy).

    Args:
        logits: ``(N, C)``.
        targets: class indices ``(N,)`` or soft targets ``(N, C)``.
        example_weights: ``c``, ``(C,)``: the weight of an example of class ``y`` (or of the mass on ``y``).
        label_smoothing: label smoothing of class-index targets.
    """
    check_targets(logits, targets)
    c = example_weights.to(logits)
    if targets.ndim == 2:
        return -(c * targets.to(logits) * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()
    per_example = F.cross_entropy(logits, targets, reduction="none", label_smoothing=label_smoothing)
    return (c[targets] * per_example).mean()


def class_weighted_kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, example_weights: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Distilled risk ``sum_y w_y R^d_y`` with ``c_y = w_y / pi_y``: ``tau^2 mean_i sum_y c_y p_t,y (log p_t,y - log
    p_s,y)`` at temperature ``tau``.

    Written as a weighted KL rather than a weighted cross-entropy: the two differ by a constant (the weighted
    teacher entropy) and have the same gradients, and with ``c = 1`` this is exactly
    :func:`lightning_methods.distillation.kd_loss` (Hinton et al. 2015), so ``objective="kd"`` logs the same
    ``train_kd`` as :class:`DistillationModule`.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"Teacher logits of shape {tuple(teacher_logits.shape)} do not match student logits "
            f"{tuple(student_logits.shape)}: teacher and student must predict the same classes."
        )
    teacher_logits = teacher_logits.detach().to(student_logits.dtype)
    log_p_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    c = example_weights.to(student_logits)
    per_example = (c * log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)
    return per_example.mean() * (temperature * temperature)


def per_class_error(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """0-1 error of each class ``err_y = 1 - acc_y`` from predicted and true class indices (``(C,)``, float).

    A class absent from ``targets`` has no error: NaN (the callers refuse such a validation split before training).
    """
    targets = targets.long()
    total = torch.bincount(targets, minlength=num_classes).double()
    wrong = torch.bincount(targets[preds.long() != targets], minlength=num_classes).double()
    return torch.where(total > 0, wrong / total.clamp(min=1), torch.full_like(total, float("nan"))).float()


def eg_update(multipliers: torch.Tensor, errors: torch.Tensor, step: float) -> torch.Tensor:
    """One exponentiated-gradient ascent step on the simplex: ``lam_y <- lam_y exp(step * err_y) / Z``.

    The gradient of ``sum_y lam_y R_y`` in ``lam`` is the vector of per-class risks, here their 0-1 validation
    estimates ``err``; computed in log space so a long run cannot overflow.

    Example::

        >>> lam = eg_update(torch.tensor([0.5, 0.5]), torch.tensor([0.0, 1.0]), step=math.log(3))
        >>> lam.tolist()  # [0.5, 0.5 * 3] / 2
        [0.25, 0.75]
    """
    if not bool(torch.isfinite(errors).all()):
        raise ValueError(f"Per-class errors must be finite (is a class missing from the validation split?), got {errors.tolist()}.")
    logits = multipliers.double().clamp(min=1e-300).log() + step * errors.double()
    return torch.softmax(logits, dim=0).to(multipliers.dtype)


def dataset_labels(dataset: Dataset) -> torch.Tensor:
    """Class labels of a ``(x, y)`` dataset: its ``y`` / ``targets`` tensor when it has one, else read one by one."""
    for attr in ("y", "targets"):
        labels = getattr(dataset, attr, None)
        if labels is not None:
            return torch.as_tensor(labels).long().cpu()
    return torch.as_tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------------------------
# Pareto helpers (average vs worst-class accuracy)
# --------------------------------------------------------------------------------------------------------------------
def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats in both coordinates (both higher-is-better), sorted by the first.

    Example::

        >>> pareto_front([(0.9, 0.5), (0.8, 0.7), (0.85, 0.4), (0.7, 0.7)])
        [1, 0]
    """
    front = []
    for i, (a, b) in enumerate(points):
        dominated = any((a2 >= a and b2 >= b) and (a2 > a or b2 > b) for j, (a2, b2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def plot_pareto(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    path: str | Path,
    xlabel: str = "average accuracy",
    ylabel: str = "worst-class accuracy",
    title: str | None = None,
    ax: Any = None,
) -> Path | None:
    """Scatter (average, worst-class) points per method, each method's points joined in the given order (an
    ``a``-sweep), with the Pareto front of all points as a dashed line; writes a PNG and returns its path.

    With ``ax`` (a matplotlib Axes, e.g. one panel of a grid) it draws there and writes nothing (``path`` unused).
    """
    import matplotlib

    if ax is None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.0, 4.5))
    everything: list[tuple[float, float]] = []
    for label, points in curves.items():
        points = [(float(a), float(b)) for a, b in points]
        everything += points
        xs, ys = zip(*points) if points else ((), ())
        ax.plot(xs, ys, marker="o", linestyle="-" if len(points) > 1 else "none", label=label, alpha=0.85)
    if everything:
        front = [everything[i] for i in pareto_front(everything)]
        ax.plot(*zip(*front), linestyle="--", color="black", linewidth=1, label="Pareto front")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    if fig is None:
        return None
    path = Path(path)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------------------------
# What the teacher's and the student's modules share: priors, class weights, the multipliers and their updates
# --------------------------------------------------------------------------------------------------------------------
class _ClassRobust:
    """Mixin (before the LightningModule base) holding the priors, the EG multipliers and their schedule.

    Buffers (saved in checkpoints, restored on resume, the same on every rank): ``class_priors`` ``(C,)``,
    ``class_multipliers`` ``(C,)`` and ``eg_updates`` (how many EG steps were taken: the step size decays with it).
    """

    num_classes: int
    objective: str

    def _init_robust(
        self,
        objective: str,
        allowed: tuple[str, ...],
        priors: Sequence[float] | None,
        worst_class_weight: float,
        eg_step: float,
        eg_decay: float,
        eg_every_n_steps: int | None,
    ) -> None:
        if objective not in allowed:
            raise ValueError(f"`objective` must be one of {list(allowed)}, got {objective!r}.")
        for name, value, low in (("worst_class_weight", worst_class_weight, 0.0), ("eg_decay", eg_decay, 1e-12)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= 1.0:
                raise ValueError(f"`{name}` must be a number in [{low:g}, 1], got {value!r}.")
        if isinstance(eg_step, bool) or not isinstance(eg_step, (int, float)) or not eg_step > 0 or math.isinf(eg_step):
            raise ValueError(f"`eg_step` must be a finite number > 0 (the EG step size eta), got {eg_step!r}.")
        if eg_every_n_steps is not None and (
            isinstance(eg_every_n_steps, bool) or not isinstance(eg_every_n_steps, int) or eg_every_n_steps < 1
        ):
            raise ValueError(
                f"`eg_every_n_steps` must be a positive integer, or None to update at the end of each validation, got "
                f"{eg_every_n_steps!r}."
            )
        self.objective = objective
        self.worst_class_weight = float(worst_class_weight)
        self.eg_step = float(eg_step)
        self.eg_decay = float(eg_decay)
        self.eg_every_n_steps = eg_every_n_steps
        self._priors_given = priors is not None
        initial = check_priors(priors, self.num_classes) if priors is not None else torch.full((self.num_classes,), 1.0 / self.num_classes)
        self.register_buffer("class_priors", initial)  # type: ignore[attr-defined]
        self.register_buffer("class_multipliers", torch.full((self.num_classes,), 1.0 / self.num_classes))  # type: ignore[attr-defined]
        self.register_buffer("eg_updates", torch.zeros((), dtype=torch.long))  # type: ignore[attr-defined]
        self._last_eg_step = -1
        self._priors_resolved = priors is not None

    # -- what the objective needs ---------------------------------------------------------------------------------------
    @property
    def uses_multipliers(self) -> bool:
        """Whether the objective is class-DRO (EG multipliers from the validation split)."""
        return self.objective.startswith("dro")

    @property
    def needs_validation_split(self) -> bool:
        return self.uses_multipliers

    def class_weights(self) -> torch.Tensor:
        """``w = (1 - a) pi + a * robust`` with ``robust = 1/C`` (balanced) or the EG multipliers ``lam`` (DRO)."""
        pi = self.class_priors
        if self.objective.startswith("balanced"):
            robust = torch.full_like(pi, 1.0 / self.num_classes)
        elif self.uses_multipliers:
            robust = self.class_multipliers
        else:
            return pi
        return (1.0 - self.worst_class_weight) * pi + self.worst_class_weight * robust

    def example_weights(self) -> torch.Tensor:
        """``c = w / pi``: the weight of one training example of each class in the batch estimate of ``sum_y w_y R_y``."""
        return self.class_weights() / self.class_priors

    # -- fail before training -----------------------------------------------------------------------------------------------
    def _resolve_priors(self, datamodule: Any) -> None:
        """Take the priors from the datamodule (``class_priors``, else the label counts of ``train_dataset``)."""
        if self._priors_given:
            return
        priors = getattr(datamodule, "class_priors", None) if datamodule is not None else None
        source = f"{type(datamodule).__name__}.class_priors"
        if priors is None:
            train = getattr(datamodule, "train_dataset", None) if datamodule is not None else None
            if train is None:
                raise ValueError(
                    f"`objective={self.objective!r}` needs the training class priors: pass `priors` (C class frequencies "
                    "summing to 1) or use a datamodule with `class_priors` (datamodules.LongTailedDataModule) or a "
                    "`train_dataset`."
                )
            counts = torch.bincount(dataset_labels(train), minlength=self.num_classes)[: self.num_classes].double()
            if bool((counts == 0).any()):
                raise ValueError(
                    f"Classes {torch.nonzero(counts == 0).flatten().tolist()} have no training example: their priors would "
                    "be 0. Every class needs training data."
                )
            priors, source = (counts / counts.sum()).tolist(), "the training label counts"
        tensor = check_priors(priors, self.num_classes, arg=source)
        self.class_priors.copy_(tensor.to(self.class_priors))
        self._priors_resolved = True

    def _validation_dataset(self) -> Dataset | None:
        trainer = self._trainer  # type: ignore[attr-defined]
        datamodule = trainer.datamodule if trainer is not None else None
        return getattr(datamodule, "val_dataset", None) if datamodule is not None else None

    def _check_validation_split(self, what: str) -> None:
        dataset = self._validation_dataset()
        if dataset is None:
            raise ValueError(
                f"{what} needs a held-out validation split with true labels: use a datamodule with a `val_dataset` "
                "(e.g. datamodules.LongTailedDataModule, whose validation split is balanced)."
            )
        counts = torch.bincount(dataset_labels(dataset), minlength=self.num_classes)
        if len(counts) > self.num_classes:
            raise ValueError(f"The validation split has labels >= `num_classes={self.num_classes}`.")
        missing = torch.nonzero(counts == 0).flatten().tolist()
        if missing:
            raise ValueError(
                f"{what} needs every class in the validation split, but classes {missing} have no validation example "
                f"(counts {counts.tolist()}). Use a balanced validation split (datamodules.LongTailedDataModule)."
            )
        if int(counts.min()) < BALANCE_TOLERANCE * int(counts.max()):
            raise ValueError(
                f"{what} needs a balanced validation split (every class about equally often), got class counts "
                f"{counts.tolist()}: per-class errors on it would be as noisy as the tail. Wrap the datamodule in "
                "datamodules.LongTailedDataModule, whose validation split has the same count for every class."
            )

    def _setup_robust(self, stage: str) -> None:
        trainer = self._trainer  # type: ignore[attr-defined]
        datamodule = trainer.datamodule if trainer is not None else None
        if stage != "fit":
            return
        self._resolve_priors(datamodule)
        if self.needs_validation_split:
            self._check_validation_split(f"`{self._what_needs_validation()}`")

    def _what_needs_validation(self) -> str:
        return f"objective={self.objective!r}"

    # -- the multipliers ------------------------------------------------------------------------------------------------------
    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """The logits the model predicts with (subclasses adjust them)."""
        return self(x)  # type: ignore[operator]

    @torch.no_grad()
    def validation_class_errors(self) -> torch.Tensor:
        """Per-class 0-1 errors of the current model on the whole validation split, gathered in dataset order across
        DDP ranks (each rank predicts its share), so every rank gets the 1-process result."""
        dataset = self._validation_dataset()
        trainer = self._trainer  # type: ignore[attr-defined]
        batch_size = getattr(trainer.datamodule, "eval_batch_size", None) or 256
        was_training = self.training  # type: ignore[attr-defined]
        self.eval()  # type: ignore[attr-defined]
        try:
            def predict(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
                x, y = batch[0].to(self.device), batch[1].to(self.device)  # type: ignore[attr-defined]
                return self.scores(x).argmax(dim=-1), y

            preds, labels = map_in_order(dataset, predict, batch_size)
        finally:
            self.train(was_training)  # type: ignore[attr-defined]
        return per_class_error(preds, labels, self.num_classes)

    def update_multipliers(self, errors: torch.Tensor | None = None) -> torch.Tensor:
        """One EG step ``lam <- lam * exp(eta_t err) / Z`` with ``eta_t = eg_step * eg_decay^t`` from the validation
        errors (computed when not given); returns the new multipliers."""
        errors = self.validation_class_errors() if errors is None else errors
        step = self.eg_step * self.eg_decay ** int(self.eg_updates)
        self.class_multipliers.copy_(eg_update(self.class_multipliers, errors.to(self.class_multipliers), step))
        self.eg_updates += 1
        return self.class_multipliers

    def _in_fit(self) -> bool:
        trainer = self._trainer  # type: ignore[attr-defined]
        return trainer is not None and trainer.state.fn == "fit" and not trainer.sanity_checking

    def _maybe_update_after_step(self) -> None:
        step = self.global_step  # type: ignore[attr-defined]
        if self.uses_multipliers and self.eg_every_n_steps and step != self._last_eg_step and step % self.eg_every_n_steps == 0:
            self._last_eg_step = step
            self.update_multipliers()

    def _maybe_update_after_validation(self) -> None:
        if self.uses_multipliers and self.eg_every_n_steps is None and self._in_fit():
            self.update_multipliers()

    def _log_multipliers(self) -> None:
        if self.uses_multipliers:
            for c, value in enumerate(self.class_multipliers.tolist()):
                self.log_global(f"class_multiplier_{c}", value)  # type: ignore[attr-defined]

    # -- evaluation: average, balanced, worst-class and bottom-k accuracy ----------------------------------------------------------
    def _make_eval_metrics(self, bottom_k: int) -> None:
        from lightning_methods.metrics import WorstClassAccuracy

        self.val_classes = WorstClassAccuracy(self.num_classes, bottom_k=bottom_k)
        self.test_classes = WorstClassAccuracy(self.num_classes, bottom_k=bottom_k)

    def update_eval_metrics(self, logits: torch.Tensor, targets: torch.Tensor, stage: str) -> None:
        getattr(self, f"{stage}_classes").update(logits.detach(), hard_targets(targets))
        loss = soft_cross_entropy(logits, targets)
        self.log(f"{stage}_loss", loss, prog_bar=stage == "val", sync_dist=True, batch_size=len(targets))  # type: ignore[attr-defined]

    def epoch_metrics(self, stage: str) -> list[str]:
        return []  # `{stage}_classes` is logged as `{stage}_acc`, `{stage}_worst_class_acc`, ... below

    def _log_class_metrics(self, stage: str) -> None:
        self.log_metric(stage, getattr(self, f"{stage}_classes"))  # type: ignore[attr-defined]

    # -- the Lightning hooks both modules share (the mixin comes first in their bases, so super() is the Lightning base)
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._maybe_update_after_step()

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        self._log_multipliers()

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self._log_class_metrics("val")
        self._maybe_update_after_validation()

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self._log_class_metrics("test")


def _check_bottom_k(bottom_k: int | None, num_classes: int) -> int:
    if bottom_k is None:
        return min(3, num_classes)
    if isinstance(bottom_k, bool) or not isinstance(bottom_k, int) or not 1 <= bottom_k <= num_classes:
        raise ValueError(f"`bottom_k` must be an integer in [1, num_classes={num_classes}], got {bottom_k!r}.")
    return bottom_k


# --------------------------------------------------------------------------------------------------------------------
# The teacher
# --------------------------------------------------------------------------------------------------------------------



class RobustClassifierModule(_ClassRobust, ClassifierModule):
    """A classifier trained for worst-class accuracy: the robust teachers of Wang et al. (2023), Sec. 3.

    Objectives (``a = worst_class_weight`` trades the standard objective against the robust one):

    * ``"erm"``: cross-entropy (the standard objective; ``a`` unused).
    * ``"balanced"``: ``(1 - a) CE(f(x), y) + a CE(f(x) + log pi, y)``, the logit-adjusted loss of Menon et al.
      (2021, Eq. 10), consistent for the balanced error.
    * ``"posthoc"``: trained by ERM, predicts with ``f(x) - a log pi`` (post-hoc logit adjustment, Menon et al. 2021,
      Eq. 6). Only the predictions change: a student distilling from it must apply the same adjustment
      (``RobustDistillationModule(teacher_calibration="posthoc")``), since checkpoints hold the raw backbone.
    * ``"dro"``: class-DRO ``min_f max_lam sum_y lam_y R_y(f)`` traded off with the standard risk:
      ``mean_i (w_{y_i}/pi_{y_i}) CE_i`` with ``w = (1 - a) pi + a lam``; ``lam`` by exponentiated gradient on the
      per-class 0-1 errors of the **balanced validation split** (see the module docstring), every
      ``eg_every_n_steps`` optimizer steps or, when None, at the end of every validation during ``fit``.

    Logs what :class:`ClassifierModule` logs, with evaluation through :class:`lightning_methods.metrics.WorstClassAccuracy`:
    ``{stage}_acc``, ``{stage}_balanced_acc``, ``{stage}_worst_class_acc``, ``{stage}_bottom_k_acc`` (``stage`` in
    ``val``, ``test``), plus ``class_multiplier_{c}`` each training epoch (DRO).

    Args:
        model: the backbone, returning logits.
        num_classes: number of classes (the CLI links it from the datamodule).
        objective: ``"erm"``, ``"balanced"``, ``"posthoc"`` or ``"dro"``.
        priors: training class frequencies ``pi`` (C numbers summing to 1); default: the datamodule's
            ``class_priors`` (``datamodules.LongTailedDataModule``), else the training label counts.
        worst_class_weight: ``a`` in ``[0, 1]``, the weight of the robust (balanced / worst-class) objective in the
            trade-off ``(1 - a) * standard + a * robust`` (not to be confused with ``DistillationModule``'s
            ``alpha``, the weight of the KD term).
        eg_step: the EG step size ``eta`` of the multipliers.
        eg_decay: ``eta_t = eg_step * eg_decay^t`` after ``t`` updates.
        eg_every_n_steps: update the multipliers every this many optimizer steps; None: at the end of each validation.
        bottom_k: how many worst classes ``{stage}_bottom_k_acc`` averages (default ``min(3, C)``).
        optimizer: a callable building the optimizer from the parameters.
        lr_scheduler: optional callable building a scheduler from the optimizer.
        label_smoothing: label smoothing of the cross-entropy on class-index targets.

    Example::

        >>> from lightning_methods.nets import MLP
        >>> module = RobustClassifierModule(MLP(64, 3), num_classes=3, objective="balanced", priors=[0.7, 0.2, 0.1])
        >>> module.class_priors.tolist() == torch.tensor([0.7, 0.2, 0.1]).tolist(), module.class_multipliers.shape
        (True, torch.Size([3]))
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        objective: Literal["erm", "balanced", "posthoc", "dro"] = "dro",
        priors: list[float] | None = None,
        worst_class_weight: float = 1.0,
        eg_step: float = 1.0,
        eg_decay: float = 1.0,
        eg_every_n_steps: int | None = None,
        bottom_k: int | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(model, num_classes, optimizer, lr_scheduler, label_smoothing)
        self._init_robust(objective, TEACHER_OBJECTIVES, priors, worst_class_weight, eg_step, eg_decay, eg_every_n_steps)
        self.bottom_k = _check_bottom_k(bottom_k, num_classes)
        self._make_eval_metrics(self.bottom_k)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        self._setup_robust(stage)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """The logits this model predicts with: ``f(x) - a log pi`` for ``"posthoc"``, ``f(x)`` otherwise."""
        logits = self(x)
        if self.objective == "posthoc":
            return posthoc_logit_adjustment(logits, self.class_priors, self.worst_class_weight)
        return logits

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.objective in ("erm", "posthoc"):
            return soft_cross_entropy(logits, targets, self.label_smoothing)
        if self.objective == "balanced":
            la = logit_adjusted_cross_entropy(logits, targets, self.class_priors)
            if self.worst_class_weight == 1.0:
                return la
            standard = soft_cross_entropy(logits, targets, self.label_smoothing)
            return (1.0 - self.worst_class_weight) * standard + self.worst_class_weight * la
        return class_weighted_cross_entropy(logits, targets, self.example_weights(), self.label_smoothing)

    def evaluate(self, batch: Any, stage: str) -> None:
        x, y = batch[0], batch[1]
        self.update_eval_metrics(self.scores(x), y, stage)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self.scores(x).softmax(dim=-1)



# --------------------------------------------------------------------------------------------------------------------
# The student
# --------------------------------------------------------------------------------------------------------------------
class RobustDistillationModule(_ClassRobust, DistillationModule):
    """Distil a frozen teacher into a student for worst-class accuracy (Wang et al. 2023, Sec. 3).

    Student objectives, over the *distilled* per-class risks ``R^d_y = E_x[p_t,y(x) l(y, f(x))] / pi_y``
    (``a = worst_class_weight``):

    * ``"kd"``: standard distillation ``sum_y pi_y R^d_y`` (Hinton et al.): exactly :class:`DistillationModule`.
    * ``"balanced_kd"``: ``sum_y w_y R^d_y`` with ``w = (1 - a) pi + a / C`` (``a = 1``: every class weighted
      equally).
    * ``"dro_kd"``: ``sum_y w_y R^d_y`` with ``w = (1 - a) pi + a lam``, ``lam`` by exponentiated gradient on the
      student's per-class 0-1 errors on the **balanced validation split with true labels** (never on training
      error, which collapses once the student fits it), gathered across DDP ranks; every ``eg_every_n_steps``
      optimizer steps or, when None, at the end of every validation.

    The loss of a distilling step is ``(1 - alpha) * sum_y w_y R_y + alpha * sum_y w_y R^d_y`` (``alpha`` is
    :class:`DistillationModule`'s KD weight; the one-hot part is reweighted with the same ``w``), the KD part at
    temperature ``tau`` scaled by ``tau^2``. One-hot epochs (outside ``distill_start_epoch``/``distill_end_epoch``)
    use ``sum_y w_y R_y``.

    **Teacher calibration** (the paper's theory: ``R^d_y`` estimates ``R_y`` only when the teacher's scores are
    calibrated per class for the training distribution), applied to the teacher's logits before the temperature:

    * ``"none"``: the teacher's logits as they are.
    * ``"posthoc"``: ``z - log pi`` (post-hoc logit adjustment): turns an ERM teacher into a balanced one; use it
      with a ``RobustClassifierModule(objective="posthoc")`` teacher, whose checkpoint holds the raw model.
    * ``"per_class"``: ``z / T + b + log pi`` with a temperature ``T`` and per-class biases ``b`` fitted (NLL, L-BFGS)
      on the balanced validation split when ``fit`` starts, identically on every rank: the teacher's balanced
      posterior calibrated per class, moved back to the training distribution by Bayes' rule. This undoes the
      *double correction* of a balanced / DRO teacher feeding a robust student (each re-weights the tail once).
      Distil a calibrated teacher at ``temperature=1``: ``T`` is already fitted, and a distillation temperature on top
      spreads probability onto the tail classes that ``w / pi`` then multiplies (measured: balanced accuracy 0.74 at
      ``tau = 1`` vs 0.16 at ``tau = 3`` on long-tailed digits, rho = 100).

    Logs what :class:`DistillationModule` logs with evaluation through ``WorstClassAccuracy`` (``{stage}_acc``,
    ``{stage}_balanced_acc``, ``{stage}_worst_class_acc``, ``{stage}_bottom_k_acc``), plus ``class_multiplier_{c}``
    each training epoch (``dro_kd``). The multipliers, priors and the fitted calibration are buffers: saved in the
    checkpoint, restored on resume.

    Args:
        student: the student backbone.
        teacher: the teacher backbone (trained, or its architecture with ``teacher_checkpoint``).
        num_classes: number of classes (the CLI links it from the datamodule).
        objective: ``"kd"``, ``"balanced_kd"`` or ``"dro_kd"``.
        priors: training class frequencies ``pi``; default: the datamodule's ``class_priors``, else label counts.
        worst_class_weight: ``a`` in ``[0, 1]``: ``(1 - a) * standard + a * robust`` (distinct from ``alpha``).
        eg_step: EG step size ``eta`` of the multipliers.
        eg_decay: ``eta_t = eg_step * eg_decay^t``.
        eg_every_n_steps: update every this many optimizer steps; None: at the end of each validation.
        teacher_calibration: ``"none"``, ``"posthoc"`` or ``"per_class"`` (see above).
        temperature: distillation temperature ``tau > 0``.
        alpha: weight of the KD term (``DistillationModule``'s), ``1.0`` is pure distillation.
        bottom_k: how many worst classes ``{stage}_bottom_k_acc`` averages (default ``min(3, C)``).
        **others**: see :class:`DistillationModule`.

    Example::

        >>> from lightning_methods.nets import MLP
        >>> teacher = MLP(64, 3, hidden_sizes=[32])  # trained beforehand
        >>> module = RobustDistillationModule(MLP(64, 3), teacher, num_classes=3, objective="balanced_kd",
        ...                                   priors=[0.7, 0.2, 0.1], temperature=2.0)
        >>> [round(c, 3) for c in module.example_weights().tolist()]  # (1/C) / pi
        [0.476, 1.667, 3.333]
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        num_classes: int | None = None,
        objective: Literal["kd", "balanced_kd", "dro_kd"] = "balanced_kd",
        priors: list[float] | None = None,
        worst_class_weight: float = 1.0,
        eg_step: float = 1.0,
        eg_decay: float = 1.0,
        eg_every_n_steps: int | None = None,
        teacher_calibration: Literal["none", "posthoc", "per_class"] = "none",
        temperature: float = 1.0,
        alpha: float = 1.0,
        bottom_k: int | None = None,
        distill_start_epoch: int = 0,
        distill_end_epoch: int | None = None,
        teacher_checkpoint: str | None = None,
        cache_teacher_logits: bool = False,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        if teacher_calibration not in CALIBRATIONS:
            raise ValueError(f"`teacher_calibration` must be one of {list(CALIBRATIONS)}, got {teacher_calibration!r}.")
        super().__init__(
            student, teacher, num_classes, temperature, alpha, distill_start_epoch, distill_end_epoch,
            teacher_checkpoint, cache_teacher_logits, optimizer, lr_scheduler, label_smoothing,
        )
        self._init_robust(objective, STUDENT_OBJECTIVES, priors, worst_class_weight, eg_step, eg_decay, eg_every_n_steps)
        self.bottom_k = _check_bottom_k(bottom_k, self.num_classes)
        self.teacher_calibration = teacher_calibration
        self.register_buffer("teacher_bias", torch.zeros(self.num_classes))
        self.register_buffer("teacher_log_scale", torch.zeros(()))  # log(1 / T)
        self._make_eval_metrics(self.bottom_k)

    @property
    def needs_validation_split(self) -> bool:
        return self.uses_multipliers or self.teacher_calibration == "per_class"

    def _what_needs_validation(self) -> str:
        if self.uses_multipliers:
            return f"objective={self.objective!r}"
        return "teacher_calibration='per_class'"

    def setup(self, stage: str) -> None:
        super().setup(stage)
        self._setup_robust(stage)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.teacher_calibration == "per_class":
            self.fit_teacher_calibration()

    # -- the teacher's scores ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def fit_teacher_calibration(
        self, logits: torch.Tensor | None = None, labels: torch.Tensor | None = None, max_iter: int = 100
    ) -> tuple[float, list[float]]:
        """Fit ``T`` and ``b`` of ``softmax(z / T + b)`` to the balanced validation split (NLL, L-BFGS in float64).

        The teacher's logits on the split are gathered in dataset order across ranks, and the fit is a deterministic
        function of them, so every rank gets the same ``(T, b)``. ``logits`` / ``labels`` (the teacher's validation
        logits and the true labels) skip that pass, e.g. outside a Trainer. Returns ``(T, b)``.
        """
        if logits is None or labels is None:
            dataset = self._validation_dataset()
            batch_size = getattr(self.trainer.datamodule, "eval_batch_size", None) or 256

            def teacher_rows(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
                return self.teacher_logits(batch[0].to(self.device)).float(), batch[1].to(self.device)

            logits, labels = map_in_order(dataset, teacher_rows, batch_size)
        logits, labels = logits.double().cpu(), labels.long().cpu()
        log_scale = torch.zeros((), dtype=torch.float64, requires_grad=True)
        bias = torch.zeros(self.num_classes, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([log_scale, bias], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(logits * log_scale.exp() + bias, labels)
            loss.backward()
            return loss

        with torch.enable_grad():
            optimizer.step(closure)
        bias_value = (bias - bias.mean()).detach()  # softmax is shift-invariant: centre it
        self.teacher_log_scale.copy_(log_scale.detach().to(self.teacher_log_scale))
        self.teacher_bias.copy_(bias_value.to(self.teacher_bias))
        return float((-log_scale).exp()), bias_value.tolist()

    def calibrate_teacher(self, teacher_logits: torch.Tensor) -> torch.Tensor:
        """The teacher's logits after ``teacher_calibration`` (before the distillation temperature)."""
        if self.teacher_calibration == "posthoc":
            return posthoc_logit_adjustment(teacher_logits, self.class_priors)
        if self.teacher_calibration == "per_class":
            z = teacher_logits * self.teacher_log_scale.exp().to(teacher_logits) + self.teacher_bias.to(teacher_logits)
            return z + self.class_priors.to(teacher_logits).log()
        return teacher_logits

    # -- the objective ------------------------------------------------------------------------------------------------------
    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The one-hot part: ``sum_y w_y R_y`` (plain cross-entropy for ``"kd"``)."""
        if self.objective == "kd":
            return soft_cross_entropy(logits, targets, self.label_smoothing)
        return class_weighted_cross_entropy(logits, targets, self.example_weights(), self.label_smoothing)

    def kd_term(self, logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """``sum_y w_y R^d_y`` on the calibrated teacher's scores (DistillationModule's ``kd_objective`` mixes it as
        ``(1 - alpha) sum_y w_y R_y + alpha sum_y w_y R^d_y``, ``loss`` being the weighted one-hot risk)."""
        teacher_logits = self.calibrate_teacher(teacher_logits)
        if self.objective == "kd":
            return super().kd_term(logits, teacher_logits)
        return class_weighted_kd_loss(logits, teacher_logits, self.example_weights(), self.temperature)
