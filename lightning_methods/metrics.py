"""Metrics the papers of this library report, as torchmetrics ``Metric``s that are correct under DDP by construction.

Every state is either summed (per-class counts) or concatenated (one row per example: ``dist_reduce_fx="cat"``),
so ``compute()`` sees exactly the rows all ranks were given and derives every threshold from the gathered whole;
nothing is thresholded per rank. The four metrics:

- :class:`WorstClassAccuracy`: per-class accuracy (recall), its mean over classes (balanced accuracy), the worst
  class and the mean of the ``bottom_k`` worst classes (long-tail / group-robustness papers).
- :class:`RiskCoverage`: selective risk at given coverages and its area AURC (Geifman, Uziel, El-Yaniv, ICLR 2019,
  *Bias-reduced uncertainty estimation for deep neural classifiers*), for any "higher = reject" score.
- :class:`DeferralCurve`: accuracy of a two-model cascade against the fraction deferred to the second model,
  its area (AUDC) and the accuracy at given deferral budgets (Jitkrittum et al., *When does confidence-based cascade
  deferral suffice?*, NeurIPS 2023, arXiv:2307.02764, its evaluation; Narasimhan et al., *Post-hoc
  estimators for learning to defer to an expert*, NeurIPS 2022).
- :class:`SCODRisk`: the risk of selective classification with OOD detection at a rejection budget on the test
  mixture, its mean over a grid of budgets (AUC-RC), OOD AUROC and FPR at 95% TPR (Narasimhan, Menon, Jitkrittum,
  Kumar, *Plugin estimators for selective classification with out-of-distribution detection*, ICLR 2024).

Conventions shared by all four:

- **Scores**: "higher = more reason to reject / defer / call OOD" (the library's one convention).
- **Ties** (the curve metrics): rows are sorted by score, and within a group of tied scores every curve value is the
  *average over all orders of the tied rows*, i.e. the expectation under a uniformly random tie-break. The
  cumulative count inside a tied group is interpolated linearly between the group's ends (``_tied_cumsum``). This
  depends only on the multiset of rows, never on their order, so 1 process and N DDP processes (whose gathered rows
  come in another order) give the same result. With distinct scores it is the plain sort-and-sweep definition.
- **Budgets to counts**: a fraction ``b`` of ``N`` rows means ``floor(b * N)`` rows rejected / deferred (and so
  ``N - floor((1 - c) * N) = ceil(c * N)`` rows accepted at coverage ``c``), with a 1e-7 slack so ``0.29 * 100``
  counts as 29, not 28.
- **What is counted**: exactly the rows passed to ``update``. Lightning's ``DistributedSampler`` pads the
  validation split with duplicate rows so every rank gets as many batches; those duplicates are counted like any
  other row. For exact whole-split numbers under DDP use a split size divisible by the world size, or gather in
  dataset order first.
- **Outputs**: ``compute()`` returns a dict whose 0-d tensors are the scalars to log (keys usable as log names,
  e.g. ``"risk@cov0.8"``; the budget is written with ``str(float(b))``) and whose >= 1-D tensors are curves for a
  plot. :func:`scalars` keeps the former for ``self.log_dict``. All outputs are float32 on the metric's device;
  the sweeps of the curve metrics run on the CPU in float64 (the counts are exact integers there).
- **Empty**: ``compute()`` with no rows gives NaN scalars and empty curves (torchmetrics also warns).

Logging once per epoch from a ``LightningModule``::

    def on_validation_epoch_end(self):
        result = self.val_risk.compute()  # synced across ranks: every rank holds the global values
        self.log_dict({f"val_{k}": v for k, v in scalars(result).items()}, sync_dist=True)
        self.val_risk.reset()

(``sync_dist=True`` averages values that are already equal on every rank; it only keeps Lightning from warning.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

__all__ = [
    "WorstClassAccuracy",
    "RiskCoverage",
    "DeferralCurve",
    "SCODRisk",
    "scalars",
    "plot_curve",
    "DEFAULT_SCOD_GRID",
]

#: rejection rates over which :class:`SCODRisk` averages the risk (AUC-RC) when no ``grid`` is given:
#: 0, 0.05, ..., 0.95 (rejecting everything is left out: no accepted row, the risk is undefined there)
DEFAULT_SCOD_GRID: tuple[float, ...] = tuple(i / 20 for i in range(20))

_SLACK = 1e-7  # fraction * N is computed in floating point: 0.29 * 100 = 28.999999999999996 must count as 29


# -- input checks (clear errors before anything is stored) ---------------------------------------------------------
def _check_tensor(x: Any, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}; wrap it with torch.as_tensor(...).")
    return x


def _check_scores(scores: Any, name: str = "scores") -> Tensor:
    scores = _check_tensor(scores, name)
    if not scores.is_floating_point():
        raise TypeError(
            f"`{name}` must be a floating-point tensor of shape (N,) (higher = reject / defer / OOD), got dtype "
            f"{scores.dtype}; pass `{name}.float()`."
        )
    if scores.ndim != 1:
        raise ValueError(
            f"`{name}` must have shape (N,), one score per example, got shape {tuple(scores.shape)}; "
            "flatten a (N, 1) score with `.squeeze(1)`."
        )
    finite = torch.isfinite(scores)
    if not bool(finite.all()):
        raise ValueError(
            f"`{name}` holds {int((~finite).sum())} non-finite value(s) (NaN or inf): their place in the ranking is "
            f"undefined; replace them (e.g. torch.nan_to_num({name}, posinf=..., neginf=...)) or drop those rows."
        )
    return scores.detach().float()


def _check_flags(x: Any, name: str) -> Tensor:
    x = _check_tensor(x, name)
    if x.is_floating_point() or x.is_complex():
        raise TypeError(f"`{name}` must be a bool tensor of shape (N,), got dtype {x.dtype}; pass `{name}.bool()`.")
    if x.ndim != 1:
        raise ValueError(f"`{name}` must have shape (N,), got shape {tuple(x.shape)}.")
    if x.dtype != torch.bool and bool(((x != 0) & (x != 1)).any()):
        raise ValueError(f"`{name}` must hold only 0/1 (or True/False), got values {x.unique().tolist()[:5]}.")
    return x.detach().bool()


def _check_labels(x: Any, name: str) -> Tensor:
    x = _check_tensor(x, name)
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(
            f"`{name}` must be an integer tensor of class indices, got dtype {x.dtype}; pass `{name}.long()` "
            "(soft targets: take `.argmax(-1)` first)."
        )
    if x.ndim != 1:
        raise ValueError(f"`{name}` must have shape (N,) (class indices), got shape {tuple(x.shape)}.")
    return x.detach().long()


def _to_labels(preds: Any, num_classes: int | None = None) -> Tensor:
    """Predicted class indices from ``preds``: class indices (N,) or logits / probabilities (N, C) (argmax)."""
    preds = _check_tensor(preds, "preds")
    if preds.ndim == 2:
        if not preds.is_floating_point():
            raise TypeError(
                f"2-D `preds` must be floating-point logits or probabilities (N, C), got dtype {preds.dtype}; "
                "pass class indices as a 1-D integer tensor."
            )
        if num_classes is not None and preds.shape[1] != num_classes:
            raise ValueError(
                f"`preds` has {preds.shape[1]} columns but `num_classes={num_classes}`; pass (N, {num_classes}) "
                "logits or fix `num_classes`."
            )
        return preds.detach().argmax(dim=1)
    if preds.ndim == 1:
        if preds.is_floating_point() or preds.dtype == torch.bool:
            raise TypeError(
                f"1-D `preds` must be integer class indices, got dtype {preds.dtype}; pass logits / probabilities "
                "as (N, C) (a binary model: stack (1 - p, p) into (N, 2)) or indices with `.long()`."
            )
        return preds.detach().long()
    raise ValueError(f"`preds` must be class indices (N,) or logits / probabilities (N, C), got shape {tuple(preds.shape)}.")


def _check_lengths(**tensors: Tensor) -> int:
    lengths = {name: t.shape[0] for name, t in tensors.items()}
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"{name}: {n}" for name, n in lengths.items())
        raise ValueError(f"all inputs need one row per example, got different lengths ({shown}).")
    return next(iter(lengths.values()))


def _check_fractions(values: Any, name: str, low: float, high: float, low_open: bool = False, high_open: bool = False) -> tuple[float, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"`{name}` must be a sequence of numbers, e.g. [0.1, 0.2], got {values!r}.")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise TypeError(f"`{name}` must hold finite numbers, got {v!r}.")
        too_low = v <= low if low_open else v < low
        too_high = v >= high if high_open else v > high
        if too_low or too_high:
            interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
            raise ValueError(f"every value of `{name}` must lie in {interval}, got {v}.")
        out.append(float(v))
    return tuple(out)


# -- the shared sweep ----------------------------------------------------------------------------------------------
def _count(fraction: float, n: int) -> int:
    """``floor(fraction * n)``, robust to the rounding of ``fraction * n``."""
    return min(n, math.floor(fraction * n + _SLACK))


def _tied_cumsum(sorted_scores: Tensor, values: Tensor) -> Tensor:
    """Cumulative sums over the first ``k = 0..N`` rows, averaged over every order of tied scores.

    Args:
        sorted_scores: (N,) scores in sorted order (either direction).
        values: (N, m) per-row values in the same order.

    Returns:
        (N + 1, m): row ``k`` is the sum of ``values`` over the first ``k`` rows. At the end of a group of tied
        scores that sum does not depend on the order inside the group; inside a group of ``g`` rows starting at
        ``s`` it is the expectation under a random order of the group, ``C(s) + (k - s) / g * (C(s + g) - C(s))``
        (each of the group's rows is among the first ``k - s`` with probability ``(k - s) / g``).
    """
    n = sorted_scores.shape[0]
    cum = torch.zeros(n + 1, values.shape[1], dtype=values.dtype, device=values.device)
    cum[1:] = values.cumsum(0)
    if n == 0:
        return cum
    new_group = torch.ones(n, dtype=torch.bool, device=sorted_scores.device)
    new_group[1:] = sorted_scores[1:] != sorted_scores[:-1]
    group = new_group.cumsum(0) - 1  # group index of each sorted row
    starts = new_group.nonzero().squeeze(1)
    ends = torch.cat([starts[1:], starts.new_tensor([n])])
    s, e = starts[group], ends[group]  # for k = i + 1, the group holding row i spans [s, e)
    k = torch.arange(1, n + 1, device=values.device)
    frac = ((k - s).to(values.dtype) / (e - s).to(values.dtype)).unsqueeze(1)
    cum[1:] = cum[s] + frac * (cum[e] - cum[s])
    return cum


def _group_ends(sorted_scores: Tensor) -> Tensor:
    """Positions ``k`` (1..N) that end a group of tied scores: the thresholds a ROC sweep visits."""
    n = sorted_scores.shape[0]
    last = torch.ones(n, dtype=torch.bool, device=sorted_scores.device)
    last[:-1] = sorted_scores[1:] != sorted_scores[:-1]
    return last.nonzero().squeeze(1) + 1


def _nan(device: torch.device) -> Tensor:
    return torch.tensor(float("nan"), device=device)


def _key(prefix: str, value: float) -> str:
    return f"{prefix}{float(value)}"


def _out(result: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device=device, dtype=torch.float32) for k, v in result.items()}


# -- the metrics ---------------------------------------------------------------------------------------------------
class WorstClassAccuracy(Metric):
    """Per-class accuracy (recall), balanced accuracy, the worst class and the mean of the ``bottom_k`` worst.

    The accuracy of class ``c`` is the fraction of examples whose target is ``c`` that are predicted ``c`` (its
    recall). Classes never seen as a target (in the data given to ``update``, all ranks together) have no
    accuracy: NaN in ``per_class_acc`` and left out of the mean, the minimum and the bottom-k.

    States are two summed (C,) count vectors (correct, total per class), so DDP gives the global counts exactly.

    Written here rather than with ``MulticlassAccuracy(average=None)``: torchmetrics reports 0.0 (not NaN) for a
    class absent from the targets (measured with torchmetrics 1.9: targets [0, 1, 0] of 3 classes give per-class
    [0.5, 1.0, 0.0]), which would make every split missing a class report a worst-class accuracy of 0.

    Args:
        num_classes: number of classes ``C``.
        bottom_k: how many of the lowest per-class accuracies ``bottom_k_acc`` averages (over the classes present;
            all of them if fewer than ``bottom_k`` are present).
        **kwargs: passed to :class:`torchmetrics.Metric` (e.g. ``sync_on_compute``).

    ``update(preds, target)``: ``preds`` class indices (N,) or logits / probabilities (N, C) (argmax), ``target``
    class indices (N,).

    ``compute()`` returns ``acc`` (overall accuracy), ``balanced_acc`` (mean per-class accuracy over the classes
    present), ``worst_class_acc``, ``bottom_k_acc`` and ``per_class_acc`` (C,).

    Example::

        >>> metric = WorstClassAccuracy(num_classes=3, bottom_k=2)
        >>> metric.update(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 0, 2]))
        >>> {k: round(float(v), 3) for k, v in scalars(metric.compute()).items()}
        {'acc': 0.75, 'balanced_acc': 0.833, 'worst_class_acc': 0.5, 'bottom_k_acc': 0.75}
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    correct: Tensor
    total: Tensor

    def __init__(self, num_classes: int, bottom_k: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"`num_classes` must be a positive int, got {num_classes!r}.")
        if isinstance(bottom_k, bool) or not isinstance(bottom_k, int) or not 1 <= bottom_k <= num_classes:
            raise ValueError(f"`bottom_k` must be an int in [1, num_classes={num_classes}], got {bottom_k!r}.")
        self.num_classes, self.bottom_k = num_classes, bottom_k
        self.add_state("correct", default=torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Count one batch: ``preds`` (N,) indices or (N, C) logits / probabilities, ``target`` (N,) indices."""
        labels = _to_labels(preds, self.num_classes)
        target = _check_labels(target, "target")
        _check_lengths(preds=labels, target=target)
        for name, t in (("target", target), ("preds", labels)):
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_classes):
                raise ValueError(
                    f"`{name}` holds class indices outside [0, num_classes={self.num_classes}): "
                    f"min {int(t.min())}, max {int(t.max())}; fix `num_classes` or the labels."
                )
        self.total += torch.bincount(target, minlength=self.num_classes)
        self.correct += torch.bincount(target[labels == target], minlength=self.num_classes)

    def compute(self) -> dict[str, Tensor]:
        """``acc``, ``balanced_acc``, ``worst_class_acc``, ``bottom_k_acc`` (0-d) and ``per_class_acc`` (C,)."""
        device = self.total.device
        correct, total = self.correct.double(), self.total.double()
        present = total > 0
        per_class = torch.where(present, correct / total.clamp(min=1), torch.full_like(total, float("nan")))
        if not bool(present.any()):
            result = {k: _nan(device) for k in ("acc", "balanced_acc", "worst_class_acc", "bottom_k_acc")}
            return _out({**result, "per_class_acc": per_class}, device)
        seen = per_class[present].sort().values
        result = {
            "acc": correct.sum() / total.sum(),
            "balanced_acc": seen.mean(),
            "worst_class_acc": seen[0],
            "bottom_k_acc": seen[: self.bottom_k].mean(),
            "per_class_acc": per_class,
        }
        return _out(result, device)


class _ScoredRows(Metric):
    """Base of the curve metrics: one concatenated float32 state per column, one row per example."""

    is_differentiable = False
    higher_is_better = None  # the output is a dict: risks are lower-better, accuracies higher-better
    full_state_update = False
    _columns: tuple[str, ...] = ()

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in self._columns:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def _append(self, **columns: Tensor) -> None:
        for name, value in columns.items():
            getattr(self, name).append(value.float())

    def _rows(self) -> dict[str, Tensor] | None:
        """The gathered columns as float64 CPU tensors, or None when there are no rows."""
        states = {name: getattr(self, name) for name in self._columns}
        if any(isinstance(s, list) and not s for s in states.values()):
            return None
        cols = {name: dim_zero_cat(s) for name, s in states.items()}
        if cols[self._columns[0]].numel() == 0:
            return None
        # The sweep runs once per compute() on the CPU in float64: the counts are exact integers there, MPS has no
        # float64, and no CUDA kernel can trip torch.use_deterministic_algorithms. Moving N rows once is cheap
        # next to an evaluation epoch (measured on CPU: 1M rows sort + sweep + AUROC in ~2.5 s on a shared core).
        return {name: c.to(device="cpu", dtype=torch.float64) for name, c in cols.items()}


class RiskCoverage(_ScoredRows):
    """Selective risk against coverage, its area (AURC) and the risk at given coverages.

    A selective classifier keeps (covers) the ``k`` examples with the *lowest* scores (scores: higher = reject) and
    abstains on the rest. The selective risk at ``k`` is the error rate among the ``k`` kept:
    ``risk_k = #{wrong among the k kept} / k``, at coverage ``k / N``. AURC is the mean of ``risk_k`` over
    ``k = 1..N``, the standard empirical AURC of Geifman, Uziel and El-Yaniv (ICLR 2019), i.e. the area under the
    risk-coverage curve by a right Riemann sum on the grid ``1/N, 2/N, ..., 1``. Lower is better; an oracle score
    (errors last) attains ``AURC* = r + (1 - r) ln(1 - r)`` asymptotically, ``r`` the full-coverage error.

    Ties: within a group of tied scores, ``risk_k`` is averaged over every order of the tied rows (see the module
    docstring), so AURC is the expectation of the per-``k`` definition under a random tie-break and does not depend
    on the order rows arrive in.

    Args:
        coverages: coverages ``c`` in (0, 1] to report ``risk@cov{c}`` at: the risk of the ``ceil(c * N)``
            lowest-score examples.
        **kwargs: passed to :class:`torchmetrics.Metric`.

    ``update(scores, preds, target)``: ``scores`` (N,) float, higher = reject; ``preds`` class indices (N,) or
    logits / probabilities (N, C); ``target`` class indices (N,).

    ``compute()`` returns ``aurc``, ``risk@cov{c}`` for each coverage (e.g. ``risk@cov0.8``) and the curve
    ``coverage`` (N,) = ``k / N``, ``risk`` (N,) = ``risk_k``.

    Example::

        >>> metric = RiskCoverage(coverages=[0.5, 1.0])
        >>> # the two most confident are right, then a mistake, then a right one
        >>> metric.update(torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([1, 1, 0, 1]), torch.tensor([1, 1, 1, 1]))
        >>> {k: round(float(v), 4) for k, v in scalars(metric.compute()).items()}
        {'aurc': 0.1458, 'risk@cov0.5': 0.0, 'risk@cov1.0': 0.25}
    """

    _columns = ("scores", "errors")

    scores: list[Tensor] | Tensor
    errors: list[Tensor] | Tensor

    def __init__(self, coverages: Sequence[float] = (0.5, 0.8, 0.9, 1.0), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.coverages = _check_fractions(coverages, "coverages", 0.0, 1.0, low_open=True)

    def update(self, scores: Tensor, preds: Tensor, target: Tensor) -> None:
        """Store one batch: ``scores`` (N,) higher = reject, ``preds`` (N,) or (N, C), ``target`` (N,)."""
        scores = _check_scores(scores)
        labels = _to_labels(preds)
        target = _check_labels(target, "target")
        _check_lengths(scores=scores, preds=labels, target=target)
        self._append(scores=scores, errors=labels != target)

    def compute(self) -> dict[str, Tensor]:
        """``aurc`` and ``risk@cov{c}`` (0-d), and the curve ``coverage``, ``risk`` (N,)."""
        out_device = self.device
        rows = self._rows()
        if rows is None:
            empty = torch.empty(0)
            return _out({"aurc": _nan(out_device), **{_key("risk@cov", c): _nan(out_device) for c in self.coverages},
                         "coverage": empty, "risk": empty}, out_device)
        scores, order = rows["scores"].sort()  # lowest score first: the order in which examples are accepted
        n = scores.shape[0]
        wrong = _tied_cumsum(scores, rows["errors"][order].unsqueeze(1))[1:, 0]  # errors among the k kept, k = 1..N
        k = torch.arange(1, n + 1, dtype=torch.float64, device=scores.device)
        risk = wrong / k
        result = {"aurc": risk.mean()}
        for c in self.coverages:
            kept = max(1, n - _count(1.0 - c, n))  # = ceil(c * N): reject floor((1 - c) * N)
            result[_key("risk@cov", c)] = risk[kept - 1]
        result.update(coverage=k / n, risk=risk)
        return _out(result, out_device)


class DeferralCurve(_ScoredRows):
    """Accuracy of a two-model cascade against the fraction deferred, its area (AUDC) and accuracy at budgets.

    The cascade answers with the first model, except on the examples it defers to the second model: the ``j``
    examples with the *highest* scores (scores: higher = defer). Its accuracy at ``j`` is
    ``(#{first right on the N - j kept} + #{second right on the j deferred}) / N``, at deferral rate ``j / N``.
    ``audc`` is the area under accuracy vs deferral rate on [0, 1] by the trapezoid rule over
    ``j / N, j = 0..N`` (higher is better; a random score gives the straight line between the two models'
    accuracies). ``acc@defer{b}`` defers the top ``floor(b * N)``.

    Ties: within a group of tied scores the accuracy is averaged over every order of the tied rows (see the module
    docstring), so the result does not depend on the order rows arrive in.

    Args:
        budgets: deferral rates ``b`` in [0, 1] to report ``acc@defer{b}`` at.
        **kwargs: passed to :class:`torchmetrics.Metric`.

    ``update(scores, correct_first, correct_second)``: ``scores`` (N,) float, higher = defer; ``correct_first`` /
    ``correct_second`` (N,) bool, whether model 1 / model 2 is right on the example.

    ``compute()`` returns ``audc``, ``acc@defer{b}`` for each budget (e.g. ``acc@defer0.25``) and the curve
    ``deferral_rate`` (N + 1,) = ``j / N``, ``accuracy`` (N + 1,).

    Example::

        >>> metric = DeferralCurve(budgets=[0.5])
        >>> # the first model is wrong exactly on the two highest-score examples, the second is always right:
        >>> # accuracy 0.5, 0.75, 1, 1, 1 at j = 0..4, trapezoid area 0.875
        >>> metric.update(torch.tensor([0.9, 0.8, 0.2, 0.1]), torch.tensor([False, False, True, True]),
        ...               torch.ones(4, dtype=torch.bool))
        >>> {k: round(float(v), 4) for k, v in scalars(metric.compute()).items()}
        {'audc': 0.875, 'acc@defer0.5': 1.0}
    """

    _columns = ("scores", "correct_first", "correct_second")

    scores: list[Tensor] | Tensor
    correct_first: list[Tensor] | Tensor
    correct_second: list[Tensor] | Tensor

    def __init__(self, budgets: Sequence[float] = (0.1, 0.25, 0.5), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.budgets = _check_fractions(budgets, "budgets", 0.0, 1.0)

    def update(self, scores: Tensor, correct_first: Tensor, correct_second: Tensor) -> None:
        """Store one batch: ``scores`` (N,) higher = defer, ``correct_first`` / ``correct_second`` (N,) bool."""
        scores = _check_scores(scores)
        first = _check_flags(correct_first, "correct_first")
        second = _check_flags(correct_second, "correct_second")
        _check_lengths(scores=scores, correct_first=first, correct_second=second)
        self._append(scores=scores, correct_first=first, correct_second=second)

    def compute(self) -> dict[str, Tensor]:
        """``audc`` and ``acc@defer{b}`` (0-d), and the curve ``deferral_rate``, ``accuracy`` (N + 1,)."""
        out_device = self.device
        rows = self._rows()
        if rows is None:
            empty = torch.empty(0)
            return _out({"audc": _nan(out_device), **{_key("acc@defer", b): _nan(out_device) for b in self.budgets},
                         "deferral_rate": empty, "accuracy": empty}, out_device)
        scores, order = rows["scores"].sort(descending=True)  # highest score first: the order of deferral
        n = scores.shape[0]
        first, second = rows["correct_first"][order], rows["correct_second"][order]
        # deferring a row changes the number right by (second - first) on that row
        gain = _tied_cumsum(scores, (second - first).unsqueeze(1))[:, 0]
        accuracy = (first.sum() + gain) / n
        rate = torch.arange(n + 1, dtype=torch.float64, device=scores.device) / n
        result = {"audc": torch.trapezoid(accuracy, rate)}
        for b in self.budgets:
            result[_key("acc@defer", b)] = accuracy[_count(b, n)]
        result.update(deferral_rate=rate, accuracy=accuracy)
        return _out(result, out_device)


class SCODRisk(_ScoredRows):
    """Risk of selective classification with OOD detection (SCOD) at rejection budgets on the test mixture.

    Narasimhan, Menon, Jitkrittum, Kumar, ICLR 2024 (arXiv:2301.12386). The test data is a mixture of inliers
    (labelled, classified by ``preds``) and OOD examples (``is_ood``; no correct label). At rejection budget ``b``
    the ``floor(b * N)`` examples with the *highest* scores among the whole mixture are rejected (the budget is on
    the test mixture, not on the inliers: Eq. 3's constraint ``P_te(r = 1) <= b``). The SCOD risk of what is
    accepted, with ``normalize="accepted"`` (default, the paper brief's evaluation metric)::

        risk(b) = [(1 - c_fn) * #(inlier, accepted, wrong) + c_fn * #(OOD, accepted)] / #accepted

    or with ``normalize="population"`` (the objective of Eq. 3, each term a probability under its own population)::

        risk(b) = (1 - c_fn) * #(inlier, accepted, wrong) / #inliers + c_fn * #(OOD, accepted) / #OOD

    ``auc_rc`` is the mean of ``risk(b)`` over ``grid`` (default :data:`DEFAULT_SCOD_GRID`: 0, 0.05, ..., 0.95).
    ``fpr@95tpr`` treats OOD as the positive class and the score as the detector: the fraction of inliers with a
    score at or above the highest threshold that flags at least 95% of the OOD rows (thresholds at the distinct
    score values, as :func:`sklearn.metrics.roc_curve`). ``auroc`` is OOD-vs-inlier AUROC from
    :func:`torchmetrics.functional.classification.binary_auroc`, fed the scores' dense ranks scaled into [0, 1].

    Note:
        Using :class:`torchmetrics.classification.BinaryAUROC` on raw scores directly is fine only for scores in
        [0, 1]: torchmetrics treats values outside [0, 1] as logits and applies a sigmoid, which in float32 maps
        every score above ~17 to 1.0 (measured with torchmetrics 1.9: scores [20, 30, 40, 25] with OOD labels
        [0, 1, 1, 0] give AUROC 0.5 instead of 1.0). The same sigmoid is why ``fpr@95tpr`` is swept here
        rather than read off ``binary_roc``. The ranks used for ``auroc`` keep ties and the order, so the AUROC is
        the one of the raw scores.

    Ties: the risk averages over every order of tied rows (see the module docstring); the ROC quantities use
    thresholds at distinct scores. Neither depends on row order.

    Args:
        c_fn: cost of accepting an OOD example, in [0, 1]; an accepted misclassified inlier costs ``1 - c_fn``.
        budgets: rejection rates ``b`` in [0, 1) to report ``risk@rej{b}`` at.
        grid: rejection rates in [0, 1) over which ``auc_rc`` averages the risk; None: :data:`DEFAULT_SCOD_GRID`.
        normalize: ``"accepted"`` or ``"population"``, see above.
        **kwargs: passed to :class:`torchmetrics.Metric`.

    ``update(scores, preds, target, is_ood)``: ``scores`` (N,) float, higher = reject; ``preds`` class indices (N,)
    or logits / probabilities (N, C); ``target`` class indices (N,), ignored (any value) on OOD rows; ``is_ood``
    (N,) bool.

    ``compute()`` returns ``risk@rej{b}`` for each budget (e.g. ``risk@rej0.2``), ``auc_rc``, ``fpr@95tpr``,
    ``auroc`` and the curve ``rejection_rate`` (N,) = ``j / N`` for ``j = 0..N-1``, ``risk`` (N,). A risk whose
    normaliser is zero (nothing accepted; no inlier or no OOD row with ``"population"``) is NaN, and so are
    ``fpr@95tpr`` / ``auroc`` without both inliers and OOD rows.

    Example::

        >>> metric = SCODRisk(c_fn=0.5, budgets=[0.25], grid=[0.0, 0.25])
        >>> # one OOD example (highest score), one misclassified inlier, two correct inliers
        >>> metric.update(torch.tensor([0.9, 0.5, 0.2, 0.1]), torch.tensor([0, 1, 0, 0]),
        ...               torch.tensor([-1, 0, 0, 0]), torch.tensor([True, False, False, False]))
        >>> {k: round(float(v), 4) for k, v in scalars(metric.compute()).items()}
        {'risk@rej0.25': 0.1667, 'auc_rc': 0.2083, 'fpr@95tpr': 0.0, 'auroc': 1.0}
    """

    _columns = ("scores", "inlier_errors", "is_ood")

    scores: list[Tensor] | Tensor
    inlier_errors: list[Tensor] | Tensor
    is_ood: list[Tensor] | Tensor

    def __init__(
        self,
        c_fn: float = 0.5,
        budgets: Sequence[float] = (0.1, 0.2, 0.3),
        grid: Sequence[float] | None = None,
        normalize: Literal["accepted", "population"] = "accepted",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(c_fn, bool) or not isinstance(c_fn, (int, float)) or not 0.0 <= c_fn <= 1.0:
            raise ValueError(f"`c_fn` must be a number in [0, 1] (the cost of accepting an OOD example), got {c_fn!r}.")
        if normalize not in ("accepted", "population"):
            raise ValueError(f"`normalize` must be 'accepted' or 'population', got {normalize!r}.")
        self.c_fn, self.normalize = float(c_fn), normalize
        self.budgets = _check_fractions(budgets, "budgets", 0.0, 1.0, high_open=True)
        self.grid = _check_fractions(DEFAULT_SCOD_GRID if grid is None else grid, "grid", 0.0, 1.0, high_open=True)
        if not self.grid:
            raise ValueError("`grid` must hold at least one rejection rate (None: the default 0, 0.05, ..., 0.95).")

    def update(self, scores: Tensor, preds: Tensor, target: Tensor, is_ood: Tensor) -> None:
        """Store one batch: ``scores`` (N,) higher = reject, ``preds`` (N,) or (N, C), ``target`` (N,), ``is_ood``."""
        scores = _check_scores(scores)
        labels = _to_labels(preds)
        target = _check_labels(target, "target")
        ood = _check_flags(is_ood, "is_ood")
        _check_lengths(scores=scores, preds=labels, target=target, is_ood=ood)
        self._append(scores=scores, inlier_errors=(labels != target) & ~ood, is_ood=ood)

    def compute(self) -> dict[str, Tensor]:
        """``risk@rej{b}``, ``auc_rc``, ``fpr@95tpr``, ``auroc`` (0-d), and the curve ``rejection_rate``, ``risk``."""
        out_device = self.device
        rows = self._rows()
        names = [_key("risk@rej", b) for b in self.budgets] + ["auc_rc", "fpr@95tpr", "auroc"]
        if rows is None:
            empty = torch.empty(0)
            return _out({**{k: _nan(out_device) for k in names}, "rejection_rate": empty, "risk": empty}, out_device)
        scores, order = rows["scores"].sort(descending=True)  # highest score first: the order of rejection
        n = scores.shape[0]
        err, ood = rows["inlier_errors"][order], rows["is_ood"][order]
        inlier = 1.0 - ood
        rejected = _tied_cumsum(scores, torch.stack([err, ood, inlier], dim=1))  # (N + 1, 3) counts among rejected
        totals = rejected[-1]
        accepted_err, accepted_ood = totals[0] - rejected[:, 0], totals[1] - rejected[:, 1]
        j = torch.arange(n + 1, dtype=torch.float64, device=scores.device)
        if self.normalize == "accepted":
            risk = ((1 - self.c_fn) * accepted_err + self.c_fn * accepted_ood) / (n - j)  # j = N: 0 / 0 = NaN
        else:
            n_in, n_ood = totals[2], totals[1]
            risk = (1 - self.c_fn) * accepted_err / n_in + self.c_fn * accepted_ood / n_ood  # NaN if a population is empty
        result: dict[str, Tensor] = {}
        for b in self.budgets:
            result[_key("risk@rej", b)] = risk[_count(b, n)]
        result["auc_rc"] = torch.stack([risk[_count(g, n)] for g in self.grid]).mean()

        n_ood, n_in = totals[1], totals[2]
        if n_ood > 0 and n_in > 0:
            # ROC thresholds at the distinct scores, highest first: flag everything at or above the group's score
            ends = _group_ends(scores)
            tp, fp = rejected[ends, 1], rejected[ends, 2]
            first = int((tp >= 0.95 * n_ood - 1e-9).nonzero()[0, 0])
            result["fpr@95tpr"] = fp[first] / n_in
            result["auroc"] = _rank_auroc(rows["scores"], rows["is_ood"])
        else:
            result["fpr@95tpr"] = result["auroc"] = _nan(scores.device)
        result.update(rejection_rate=j[:n] / n, risk=risk[:n])
        return _out(result, out_device)


def _rank_auroc(scores: Tensor, is_ood: Tensor) -> Tensor:
    """OOD AUROC by torchmetrics on the scores' dense ranks in [0, 1] (no sigmoid: see :class:`SCODRisk`'s note)."""
    from torchmetrics.functional.classification import binary_auroc

    _, rank = torch.unique(scores, return_inverse=True)
    unit = rank.double() / max(int(rank.max()), 1)
    return binary_auroc(unit, is_ood.long(), validate_args=False)


# -- helpers for logging and plotting ------------------------------------------------------------------------------
def scalars(result: Mapping[str, Any]) -> dict[str, Tensor]:
    """The 0-d tensors of a metric's ``compute()`` result (what ``self.log_dict`` takes), curves left out.

    Example::

        >>> scalars({"aurc": torch.tensor(0.1), "risk": torch.zeros(5)})
        {'aurc': tensor(0.1000)}
    """
    return {k: v for k, v in result.items() if isinstance(v, Tensor) and v.ndim == 0}


def plot_curve(
    x: Any,
    y: Any,
    path: str | Path,
    *,
    xlabel: str = "",
    ylabel: str = "",
    title: str = "",
    label: str | None = None,
    others: Mapping[str, tuple[Any, Any]] | None = None,
) -> Path:
    """Write a line plot of ``y`` against ``x`` (e.g. a metric's ``coverage`` and ``risk``) to a PNG file.

    matplotlib is imported here, on first use, so importing the metrics never pulls it in; the figure is drawn
    without pyplot (no global state, no display needed).

    Args:
        x: x values (tensor, array or list).
        y: y values, as many as ``x``.
        path: output file; its suffix picks the format (``.png``, ``.pdf``, ...). Parent folders are created.
        xlabel: x-axis label.
        ylabel: y-axis label.
        title: figure title.
        label: legend entry of this curve (a legend is drawn when any curve has one).
        others: more curves on the same axes, ``{label: (x, y)}`` (e.g. a baseline score's curve).

    Returns:
        The path written.
    """
    from matplotlib.figure import Figure

    def _array(v: Any) -> Any:
        return v.detach().cpu().double().numpy() if isinstance(v, Tensor) else v

    fig = Figure(figsize=(5, 3.5), tight_layout=True)
    ax = fig.subplots()
    ax.plot(_array(x), _array(y), label=label)
    for name, (ox, oy) in (others or {}).items():
        ax.plot(_array(ox), _array(oy), label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if label is not None or others:
        ax.legend()
    ax.grid(alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
