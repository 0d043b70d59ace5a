"""Cascades of classifiers with confidence-based and post-hoc deferral.

Jitkrittum, Gupta, Menon, Narasimhan, Rawat, Kumar. *When Does Confidence-Based Cascade Deferral Suffice?*
NeurIPS 2023, arXiv:2307.02764.

A cascade runs a cheap model ``h1`` on every input and sends ("defers") some inputs to an expensive model ``h2``;
a deferral rule ``r(x)`` decides which. The paper's objective is the 0-1 error plus a cost ``c`` per deferred input,
i.e. the cascade's accuracy at a given deferral rate, and where each step lives below:

* **Bayes-optimal rule** (the paper's Prop. 3.1): ``r*(x) = 1[eta_{h2(x)}(x) - eta_{h1(x)}(x) > c]``: defer when
  the expected gain in accuracy from ``h2`` exceeds the cost. :func:`oracle_scores` is its empirical upper envelope
  (``1[h2 right] - 1[h1 right]``, needs labels: evaluation only).
* **Confidence-based deferral** (Chow's rule): defer the inputs where ``h1`` is least confident, by maximum
  probability, entropy or top-1 minus top-2 margin (:func:`deferral_scores`). The paper shows it is optimal when
  ``h1``'s confidence orders inputs as the gain does, and fails with a *specialist* ``h2``, *label noise* (deferring
  inherently noisy inputs wastes budget) and *distribution shift*.
* **Post-hoc deferral** (the paper's Sec. 4): a small MLP ``g`` trained on held-out labelled data, on features of
  ``h1``'s output (:func:`posthoc_features`: the probability vector, the sorted probabilities, the margin, the
  entropy, optionally an embedding), regressing with a squared loss either **Diff-01** ``1[y = h2(x)] - 1[y = h1(x)]``
  or **Diff-Prob** ``p2_y(x) - p1_y(x)`` (:func:`posthoc_targets`); defer the inputs with the largest ``g(x)``.
* Rules are compared at equal **deferral rates** (the deferral curve: accuracy against the fraction deferred, its
  area AUDC, accuracy at fixed rates; :class:`lightning_methods.metrics.DeferralCurve`), and a threshold is chosen on
  held-out scores for a target rate or a cost budget (:func:`threshold_for_rate`).

Scores follow the library's convention: **higher = defer**. A cascade of more than two models applies the same rule
at every stage: stage ``i``'s score, computed from model ``i``'s output, decides whether model ``i + 1`` runs.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import move_data_to_device, rank_zero_info
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from lightning_methods._distributed import map_in_order, world
from lightning_methods._frozen import HoldsFrozenModels, load_backbone
from lightning_methods._layers import forward_with_embedding, resolve_layer
from lightning_methods._utils import _cli_given_hparams, check_num_classes, probe_output, save_hparams
from lightning_methods.metrics import DeferralCurve

__all__ = [
    "CascadeModule",
    "RULES",
    "TARGETS",
    "deferral_scores",
    "posthoc_features",
    "posthoc_targets",
    "oracle_scores",
    "threshold_for_rate",
    "rate_for_cost_budget",
    "relative_cost",
    "cost_to_reach",
    "plot_deferral_curves",
]

#: the deferral rules a :class:`CascadeModule` runs (``oracle`` needs labels: it is reported in evaluation only)
RULES = ("confidence", "entropy", "margin", "random", "posthoc")
#: the regression targets of the post-hoc rule
TARGETS = ("diff01", "diffprob")


# -- the math (pure functions) ---------------------------------------------------------------------------------------
def _softmax(logits: torch.Tensor) -> torch.Tensor:
    # torch.softmax over a short last dimension (10 classes) took 1.26 ms for 3000 rows on one CPU thread here, this
    # exp-normalise 0.45 ms: the cascade computes it on every input, next to models that cost a few ms per batch
    e = (logits - logits.amax(dim=-1, keepdim=True)).exp_()
    return e.div_(e.sum(dim=-1, keepdim=True))


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    return -torch.special.xlogy(probs, probs).sum(-1)


def _top2(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    top = probs.topk(2, dim=-1).values
    return top[..., 0], top[..., 1]


def deferral_scores(
    probs: torch.Tensor, rule: str = "confidence", generator: torch.Generator | None = None
) -> torch.Tensor:
    """Confidence-based deferral scores of the cheaper model's probabilities ``(N, C)``; higher = defer.

    * ``confidence`` (Chow's rule): ``1 - max_y p_y(x)``;
    * ``entropy``: ``-sum_y p_y log p_y``;
    * ``margin``: ``1 - (p_(1) - p_(2))``, one minus the gap between the two largest probabilities;
    * ``random``: ``U(0, 1)`` independent of ``x`` (the baseline every rule must beat), drawn from ``generator``.

    Example::

        >>> p = torch.tensor([[0.9, 0.1, 0.0], [0.5, 0.4, 0.1]])
        >>> deferral_scores(p, "confidence"), deferral_scores(p, "margin")
        (tensor([0.1000, 0.5000]), tensor([0.2000, 0.9000]))
    """
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError(f"`probs` must be (N, C) class probabilities with C >= 2, got shape {tuple(probs.shape)}.")
    if rule == "confidence":
        return 1.0 - probs.amax(dim=-1)
    if rule == "entropy":
        return _entropy(probs)
    if rule == "margin":
        top1, top2 = _top2(probs)
        return 1.0 - (top1 - top2)
    if rule == "random":
        return torch.rand(len(probs), generator=generator, device="cpu").to(probs.device, probs.dtype)
    raise ValueError(
        f"`rule={rule!r}` has no confidence-based score: use one of 'confidence', 'entropy', 'margin', 'random' "
        "('posthoc' scores come from a fitted CascadeModule, 'oracle' from oracle_scores)."
    )


def posthoc_features(probs: torch.Tensor, embedding: torch.Tensor | None = None) -> torch.Tensor:
    """The inputs of the post-hoc rule ``g``: ``[p(x), sorted p(x), p_(1) - p_(2), entropy(p), embedding]``.

    The full probability vector lets ``g`` learn class-dependent deferral (what a specialist ``h2`` needs); the
    sorted probabilities, margin and entropy are the confidence signals of the confidence-based rules.

    Args:
        probs: ``(N, C)`` probabilities of the cheaper model.
        embedding: optional ``(N, D)`` representation of the cheaper model (appended).

    Returns:
        ``(N, 2C + 2 [+ D])``.
    """
    ordered = probs.sort(dim=-1, descending=True).values
    top1, top2 = ordered[:, 0], ordered[:, 1]
    parts = [probs, ordered, (top1 - top2).unsqueeze(1), _entropy(probs).unsqueeze(1)]
    if embedding is not None:
        parts.append(embedding.flatten(1).to(probs.dtype))
    return torch.cat(parts, dim=1)


def posthoc_targets(
    probs_first: torch.Tensor, probs_second: torch.Tensor, targets: torch.Tensor, target: str = "diff01"
) -> torch.Tensor:
    """Regression targets of the post-hoc rule (the paper's Sec. 4): the gain from deferring each example.

    * ``diff01``: ``1[y = h2(x)] - 1[y = h1(x)]`` in {-1, 0, 1};
    * ``diffprob``: ``p2_y(x) - p1_y(x)`` in [-1, 1].

    Example::

        >>> p1 = torch.tensor([[0.6, 0.4], [0.3, 0.7]]); p2 = torch.tensor([[0.2, 0.8], [0.1, 0.9]])
        >>> posthoc_targets(p1, p2, torch.tensor([1, 1])), posthoc_targets(p1, p2, torch.tensor([1, 1]), "diffprob")
        (tensor([1., 0.]), tensor([0.4000, 0.2000]))
    """
    if probs_first.shape != probs_second.shape:
        raise ValueError(
            f"The two models' probabilities differ in shape: {tuple(probs_first.shape)} vs {tuple(probs_second.shape)}."
        )
    targets = targets.argmax(-1) if targets.ndim == 2 else targets
    if target == "diff01":
        right_first = probs_first.argmax(-1) == targets
        right_second = probs_second.argmax(-1) == targets
        return right_second.to(probs_first.dtype) - right_first.to(probs_first.dtype)
    if target == "diffprob":
        index = targets.unsqueeze(1)
        return (probs_second.gather(1, index) - probs_first.gather(1, index)).squeeze(1)
    raise ValueError(f"`target={target!r}`: use 'diff01' or 'diffprob'.")


def oracle_scores(correct_first: torch.Tensor, correct_second: torch.Tensor) -> torch.Tensor:
    """The oracle rule's scores ``1[h2 right] - 1[h1 right]``: it defers exactly where ``h2`` is right and ``h1``
    wrong first, and never where deferring loses (needs the labels: an upper envelope for evaluation only)."""
    return correct_second.float() - correct_first.float()


def threshold_for_rate(scores: torch.Tensor, rate: float) -> float:
    """The threshold ``t`` such that deferring ``scores > t`` defers ``floor(rate * N)`` of the ``N`` scores.

    ``t`` lies halfway between the last score deferred and the first kept (``+inf`` for rate 0, ``-inf`` for rate
    1), so new inputs are split as the held-out ones were. With tied scores at the boundary the tied inputs fall on
    the same side (all kept): the rate reached is then below the target.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"`rate` must be in [0, 1], got {rate!r}.")
    n = scores.numel()
    if n == 0:
        raise ValueError("Cannot choose a threshold from zero scores.")
    k = min(n, math.floor(rate * n + 1e-7))
    if k == 0:
        return math.inf
    if k == n:
        return -math.inf
    ordered = scores.flatten().double().sort(descending=True).values
    return float((ordered[k - 1] + ordered[k]) / 2)


def relative_cost(reach: Sequence[float], costs: Sequence[float]) -> float:
    """Expected cost per input relative to always running the last model: ``sum_i reach_i c_i / c_last``.

    Args:
        reach: fraction of inputs each stage runs on (``reach[0] = 1``; ``reach[1]`` is the deferral rate of a
            two-model cascade).
        costs: cost of each stage (a stage's model plus, before the last, its deferral rule).
    """
    return float(sum(r * c for r, c in zip(reach, costs)) / costs[-1])


def rate_for_cost_budget(budget: float, costs: Sequence[float]) -> float:
    """The largest per-stage deferral rate ``r`` whose expected relative cost ``sum_i r^i c_i / c_last`` fits
    ``budget`` (for two models ``r = (budget c_2 - c_1) / c_2``), clipped to [0, 1]."""
    if budget < costs[0] / costs[-1]:
        raise ValueError(
            f"`cost_budget={budget}` is below the cost of the first stage alone ({costs[0] / costs[-1]:.4g} of the "
            "last model's): no deferral rate fits it. Raise the budget."
        )

    def cost(r: float) -> float:
        return relative_cost([r**i for i in range(len(costs))], costs)

    if cost(1.0) <= budget:
        return 1.0
    low, high = 0.0, 1.0
    for _ in range(60):  # bisection: cost(r) increases with r
        mid = (low + high) / 2
        low, high = (mid, high) if cost(mid) <= budget else (low, mid)
    return low


def cost_to_reach(
    rate: torch.Tensor, accuracy: torch.Tensor, target: float, costs: Sequence[float]
) -> tuple[float, float]:
    """``(deferral rate, relative cost)`` of the first point of a deferral curve whose accuracy reaches ``target``.

    Args:
        rate: the curve's deferral rates ``(N + 1,)`` (:class:`~lightning_methods.metrics.DeferralCurve`).
        accuracy: the curve's accuracies.
        target: the accuracy to reach, e.g. 99% of the expensive model's.
        costs: costs of the two stages (first model + rule, second model).

    Returns:
        ``(nan, nan)`` when the curve never reaches ``target``.
    """
    reached = (accuracy >= target - 1e-7).nonzero()
    if len(reached) == 0:
        return math.nan, math.nan
    r = float(rate[reached[0, 0]])
    return r, relative_cost([1.0, r], costs)


def plot_deferral_curves(curves: dict[str, tuple[Any, Any]], path: str | Path, title: str = "") -> Path:
    """Write the deferral curves ``{label: (deferral_rate, accuracy)}`` of several rules to one PNG.

    Example::

        >>> result = module.test_curves()  # doctest: +SKIP
        >>> plot_deferral_curves({"confidence": (result["deferral_rate"], result["accuracy"])}, "curve.png")  # doctest: +SKIP
    """
    from lightning_methods.metrics import plot_curve

    if not curves:
        raise ValueError("`curves` is empty: pass {label: (deferral_rate, accuracy)}.")
    (first, (x, y)), *rest = curves.items()
    return plot_curve(
        x, y, path, xlabel="fraction deferred to the expensive model", ylabel="cascade accuracy", title=title,
        label=first, others=dict(rest),
    )


# -- checking arguments ------------------------------------------------------------------------------------------------
def _fraction(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= 1:
        raise ValueError(f"`{name}` must be a number in [0, 1] (the fraction of inputs deferred), got {value!r}.")
    return float(value)


def _as_list(value: Any, n: int, name: str) -> list:
    if value is None:
        return [None] * n
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"`{name}` must be a list with one entry per model, got {value!r}.")
    if len(value) != n:
        raise ValueError(f"`{name}` has {len(value)} entries for {n} models: give one per model, cheapest first.")
    return list(value)


def _mlp_head(in_features: int | None, hidden_sizes: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden_sizes:
        layers += [nn.Linear(width, h) if width is not None else nn.LazyLinear(h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, 1) if width is not None else nn.LazyLinear(1))
    return nn.Sequential(*layers)


def _uninitialized(module: nn.Module) -> bool:
    return any(isinstance(p, nn.parameter.UninitializedParameter) for p in module.parameters())


# -- the module --------------------------------------------------------------------------------------------------------
class CascadeModule(HoldsFrozenModels, pl.LightningModule):
    """A cascade of trained classifiers, cheapest first, with a deferral rule and thresholds chosen on held-out data.

    The models are frozen (never trained here, held outside ``parameters()``, the optimizer and the checkpoint; see
    :mod:`lightning_methods._frozen`). ``fit`` fits what the rule learns on **held-out labelled data** (the post-hoc
    MLP ``g``; nothing for the confidence-based rules) and then chooses the deferral thresholds on the validation
    data of that fit, from scores gathered in dataset order across DDP ranks (so 1 and N processes choose the same
    thresholds). Use :class:`datamodules.DeferralDataModule`: it trains on one part of a datamodule's *validation*
    split and chooses thresholds on the other part. Fitting on the models' own training split is refused (their
    confidence there is overfit and the post-hoc targets are nearly all 0) unless ``allow_training_split=True``.

    ``predict_step`` runs model ``i + 1`` only on the inputs model ``i`` defers (batched), and returns
    ``{"preds", "probs", "answered_by"}``; after ``trainer.predict`` :attr:`predict_stats` holds the fraction of
    inputs answered by each model, the fraction deferred and the cost relative to always running the last model.

    ``validate``/``test`` log, with ``{stage}`` = ``val``/``test``: ``{stage}_acc_model{i}`` (each model alone),
    ``{stage}_audc`` and ``{stage}_acc@defer{b}`` (the rule's deferral curve between the first two models: accuracy
    against the fraction deferred, :class:`~lightning_methods.metrics.DeferralCurve`), ``{stage}_oracle_audc``,
    ``{stage}_cost_for_99`` / ``{stage}_rate_for_99`` (relative cost and deferral rate at which the curve first reaches
    99% of the second model's accuracy) and, once thresholds are set, ``{stage}_acc`` (the cascade at its
    thresholds), ``{stage}_deferred`` and ``{stage}_relative_cost``; during ``fit``, ``train_loss``/``val_loss`` of
    ``g`` (post-hoc).

    Args:
        models: the trained classifiers, cheapest first: modules returning logits, or checkpoint paths (a
            ``ClassifierModule`` checkpoint written by the CLI, whose architecture is rebuilt from it).
        num_classes: number of classes (the CLI links it from the datamodule; default: read off the models).
        deferral: ``"confidence"``, ``"entropy"``, ``"margin"``, ``"random"`` or ``"posthoc"``.
        deferral_rate: fraction of the inputs reaching each stage that it defers to the next (for two models: the
            fraction sent to the expensive one), in [0, 1]. Or a list with one rate per deferring stage.
        costs: cost of running each model (any unit: FLOPs, milliseconds). Default: measured FLOPs per example
            (``torch.utils.flop_counter``), with the post-hoc ``g``'s FLOPs added to each deferring stage.
        cost_budget: instead of ``deferral_rate``: the expected cost per input relative to always running the last
            model (e.g. ``0.5``); the largest deferral rate that fits is used.
        thresholds: set the thresholds by hand (one per deferring stage; defer when ``score > threshold``) instead of
            choosing them at the end of ``fit``.
        target: the post-hoc regression target, ``"diff01"`` or ``"diffprob"``.
        hidden_sizes: hidden widths of the post-hoc MLP ``g``.
        embedding_layer: a submodule of each deferring model whose output is appended to ``g``'s features.
        class_subsets: per model, ``None`` or the classes of the full label space its outputs stand for (a
            specialist trained on a subset of the classes, its labels renumbered ``0..k-1``): its probabilities are
            mapped back to the full label space, zero elsewhere.
        checkpoints: per model, ``None`` or a checkpoint path holding its weights (then ``models[i]`` is the
            architecture, as built from a CLI config).
        allow_training_split: allow fitting on a datamodule that does not declare a held-out split (see above).
        budgets: deferral rates at which ``acc@defer{b}`` is reported.
        optimizer: a callable building the optimizer of ``g``.
        seed: seed of the ``random`` rule's scores.

    Note:
        The models are not in the cascade's checkpoint. Built from the CLI (or from checkpoint paths) they are
        rebuilt by ``load_from_checkpoint``; built in Python, pass them again:
        ``CascadeModule.load_from_checkpoint(path, models=[h1, h2])``. ``g`` and the thresholds are in the
        checkpoint (and restored on resume).

    Example::

        >>> from lightning_methods.nets import MLP
        >>> cascade = CascadeModule([MLP(40, 10, [16]), MLP(40, 10, [256])], num_classes=10, deferral_rate=0.3)
        >>> cascade.set_thresholds([0.5]); out = cascade.cascade_predict(torch.randn(8, 40))
        >>> sorted(out), out["answered_by"].shape
        (['answered_by', 'preds', 'probs'], torch.Size([8]))
    """

    def __init__(
        self,
        models: Sequence[nn.Module | str],
        num_classes: int | None = None,
        deferral: Literal["confidence", "entropy", "margin", "random", "posthoc"] = "confidence",
        deferral_rate: float | Sequence[float] | None = None,
        costs: Sequence[float] | None = None,
        cost_budget: float | None = None,
        thresholds: Sequence[float] | None = None,
        target: Literal["diff01", "diffprob"] = "diff01",
        hidden_sizes: Sequence[int] = (64, 64),
        embedding_layer: str | None = None,
        class_subsets: Sequence[Sequence[int] | None] | None = None,
        checkpoints: Sequence[str | None] | None = None,
        allow_training_split: bool = False,
        budgets: Sequence[float] = (0.1, 0.25, 0.5),
        optimizer: OptimizerCallable = torch.optim.Adam,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if isinstance(models, (str, bytes, nn.Module)) or not isinstance(models, Sequence) or len(models) < 2:
            raise TypeError(
                "`models` must be a list of two or more trained classifiers (modules or checkpoint paths), cheapest "
                f"first; got {type(models).__name__}."
            )
        if deferral == "oracle":
            raise ValueError(
                "`deferral='oracle'` needs the labels, so it cannot run a cascade: it is reported in evaluation "
                "(`test_oracle_audc`). Choose one of " + ", ".join(repr(r) for r in RULES) + "."
            )
        if deferral not in RULES:
            raise ValueError(f"`deferral={deferral!r}`: choose one of {', '.join(repr(r) for r in RULES)}.")
        if target not in TARGETS:
            raise ValueError(f"`target={target!r}`: choose 'diff01' or 'diffprob'.")
        n = len(models)
        stages = n - 1
        if deferral_rate is not None and cost_budget is not None:
            raise ValueError("Give `deferral_rate` or `cost_budget`, not both.")
        if isinstance(deferral_rate, Sequence) and not isinstance(deferral_rate, (str, bytes)):
            rates = [_fraction(r, "deferral_rate") for r in _as_list(deferral_rate, stages, "deferral_rate (per stage)")]
        else:
            rates = None if deferral_rate is None else [_fraction(deferral_rate, "deferral_rate")] * stages
        if cost_budget is not None and (
            isinstance(cost_budget, bool) or not isinstance(cost_budget, (int, float)) or not cost_budget > 0
        ):
            raise ValueError(f"`cost_budget` must be a positive number (cost relative to the last model), got {cost_budget!r}.")
        costs = None if costs is None else _as_list(costs, n, "costs")
        if costs is not None and any(
            isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c <= 0 for c in costs
        ):
            raise ValueError(f"`costs` must be positive numbers, one per model, got {costs!r}.")
        if thresholds is not None:
            thresholds = [float(t) for t in _as_list(thresholds, stages, "thresholds (one per deferring stage)")]
        hidden_sizes = list(hidden_sizes)
        if any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden_sizes):
            raise ValueError(f"`hidden_sizes` must be positive integers, got {hidden_sizes!r}.")
        checkpoints = _as_list(checkpoints, n, "checkpoints")
        subsets = _as_list(class_subsets, n, "class_subsets")
        save_hparams(self, inspect.currentframe())

        built: list[nn.Module] = []
        from_config = _cli_given_hparams() is not None
        for i, (model, ckpt) in enumerate(zip(models, checkpoints)):
            arg = f"models[{i}]"
            if isinstance(model, (str, Path)):
                model = load_backbone(model, None, arg=arg)
            elif not isinstance(model, nn.Module):
                raise TypeError(f"`{arg}` must be an nn.Module or a checkpoint path, got {type(model).__name__}.")
            elif ckpt is not None:
                model = load_backbone(ckpt, model, arg=f"checkpoints[{i}]")
            elif from_config:
                raise ValueError(
                    f"`{arg}` ({type(model).__name__}) was built from a config, so its weights are random: give its "
                    f"trained weights in `checkpoints[{i}]`, or give `{arg}` as a checkpoint path."
                )
            built.append(model)

        self.num_models = n
        self.class_subsets = [None if s is None else [int(c) for c in s] for s in subsets]
        self.num_classes = self._resolve_num_classes(built, num_classes)
        for i, model in enumerate(built):
            self.set_frozen(f"stage{i}", model)
        self.deferral = deferral
        self.target = target
        self.deferral_rates = rates
        self.cost_budget = None if cost_budget is None else float(cost_budget)
        self.given_costs = None if costs is None else [float(c) for c in costs]
        self.embedding_layer = embedding_layer
        if embedding_layer is not None:
            for i, model in enumerate(built[:-1]):
                resolve_layer(model, embedding_layer, arg="embedding_layer")
        self.allow_training_split = allow_training_split
        self.budgets = tuple(_fraction(b, "budgets") for b in budgets)
        self.optimizer = optimizer
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)

        # what the cascade learns outside the frozen models: saved in the checkpoint, restored on resume
        if deferral == "posthoc":
            dim = None if embedding_layer is not None else 2 * self.num_classes + 2
            self.heads = nn.ModuleList([_mlp_head(dim, hidden_sizes) for _ in range(stages)])
        else:
            self.heads = None
            # DDP refuses to wrap a module without a trainable parameter, and a confidence rule learns nothing: an
            # empty parameter lets `fit` (which then only chooses thresholds) run under DDP; it is never optimized
            self._ddp_anchor = nn.Parameter(torch.zeros(0))
        self.register_buffer("thresholds", torch.full((stages,), math.nan, dtype=torch.float64))
        self.register_buffer("head_fitted", torch.zeros((), dtype=torch.bool))
        self.register_buffer("measured_costs", torch.full((n,), math.nan, dtype=torch.float64))
        if thresholds is not None:
            self.set_thresholds(thresholds)

        for stage in ("val", "test"):
            for i in range(n):
                setattr(self, f"{stage}_acc_model{i}", MulticlassAccuracy(self.num_classes, average="micro"))
            setattr(self, f"{stage}_curve", DeferralCurve(self.budgets))
            setattr(self, f"{stage}_oracle_curve", DeferralCurve(self.budgets))
            setattr(self, f"{stage}_acc", MulticlassAccuracy(self.num_classes, average="micro"))
            setattr(self, f"{stage}_deferred", MeanMetric())
            setattr(self, f"{stage}_relative_cost", MeanMetric())
        self._answered: torch.Tensor | None = None
        #: after ``trainer.predict``: fraction answered by each model, fraction deferred, relative cost
        self.predict_stats: dict[str, Any] = {}

    # -- the models ------------------------------------------------------------------------------------------------
    @property
    def cascade_models(self) -> list[nn.Module]:
        """The frozen models, cheapest first."""
        held = self.frozen_models()
        return [held[f"stage{i}"] for i in range(self.num_models)]

    def _outputs_of(self, i: int, model: nn.Module) -> int | None:
        classes = getattr(model, "num_classes", None)
        return classes if isinstance(classes, int) and not isinstance(classes, bool) else None

    def _resolve_num_classes(self, models: list[nn.Module], num_classes: int | None) -> int:
        for i, subset in enumerate(self.class_subsets):
            if subset is not None and (len(set(subset)) != len(subset) or not subset):
                raise ValueError(f"`class_subsets[{i}]` must list distinct classes, got {subset!r}.")
        full = [getattr(m, "num_classes", None) for i, m in enumerate(models) if self.class_subsets[i] is None]
        known = [c for c in full if isinstance(c, int) and not isinstance(c, bool)]
        if num_classes is None:
            if not known:
                raise ValueError("`num_classes` is required (the CLI links it from the datamodule; in Python pass it).")
            num_classes = known[0]
        check_num_classes(num_classes)
        for i, model in enumerate(models):
            self._check_width(i, self._outputs_of(i, model), num_classes, model)
        return num_classes

    def _check_width(self, i: int, width: int | None, num_classes: int, model: nn.Module) -> None:
        subset = self.class_subsets[i]
        if subset is not None:
            if any(c < 0 or c >= num_classes for c in subset):
                raise ValueError(f"`class_subsets[{i}]={subset}` holds classes outside 0..{num_classes - 1}.")
            if width is not None and width != len(subset):
                raise ValueError(
                    f"`models[{i}]` ({type(model).__name__}) outputs {width} classes but `class_subsets[{i}]` lists "
                    f"{len(subset)}: give the classes its outputs stand for, in order."
                )
        elif width is not None and width != num_classes:
            raise ValueError(
                f"`models[{i}]` ({type(model).__name__}) outputs {width} classes but the cascade has "
                f"`num_classes={num_classes}`: every model must predict the same classes. For a specialist trained "
                f"on a subset of the classes, set `class_subsets[{i}]` to the classes its outputs stand for."
            )

    def probabilities(self, i: int, x: Any, logits: torch.Tensor | None = None) -> torch.Tensor:
        """Model ``i``'s class probabilities on ``x`` in the full label space ``(N, num_classes)``."""
        if logits is None:
            with torch.no_grad():
                logits = self.cascade_models[i](x)
        probs = _softmax(logits.float())
        subset = self.class_subsets[i]
        if subset is None:
            return probs
        full = probs.new_zeros(len(probs), self.num_classes)
        full[:, torch.tensor(subset, device=probs.device)] = probs
        return full

    def _run(self, i: int, x: Any, embed: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(probs, embedding or None)`` of model ``i`` on ``x`` (one forward)."""
        model = self.cascade_models[i]
        with torch.no_grad():
            if embed:
                logits, emb = forward_with_embedding(model, self.embedding_layer, x)
            else:
                logits, emb = model(x), None
        return self.probabilities(i, x, logits), emb

    def _needs_embedding(self, i: int) -> bool:
        return self.deferral == "posthoc" and self.embedding_layer is not None and i < self.num_models - 1

    # -- scores and thresholds -----------------------------------------------------------------------------------------
    def stage_scores(self, i: int, probs: torch.Tensor, embedding: torch.Tensor | None = None) -> torch.Tensor:
        """Deferral scores of stage ``i`` (higher = defer to model ``i + 1``) from model ``i``'s probabilities."""
        if self.deferral != "posthoc":
            return deferral_scores(probs, self.deferral, self._generator)
        self._require_head()
        return self.heads[i](posthoc_features(probs, embedding)).squeeze(-1)

    def _require_head(self) -> None:
        if not bool(self.head_fitted):
            raise ValueError(
                "`deferral='posthoc'` but its rule g has not been fitted: fit the cascade first (`trainer.fit(cascade, "
                "datamodule=DeferralDataModule(dm))` trains g on held-out data) or load a checkpoint written after "
                "fitting."
            )

    def set_thresholds(self, thresholds: Sequence[float]) -> None:
        """Set the thresholds by hand: stage ``i`` defers when its score is above ``thresholds[i]``."""
        values = _as_list(list(thresholds), self.num_models - 1, "thresholds (one per deferring stage)")
        if any(not isinstance(t, (int, float)) or math.isnan(t) for t in values):
            raise ValueError(f"`thresholds` must be numbers (inf allowed), got {values!r}.")
        self.thresholds.copy_(torch.tensor(values, dtype=torch.float64))

    @property
    def has_thresholds(self) -> bool:
        return not bool(torch.isnan(self.thresholds).any())

    def stage_costs(self, x: Any | None = None) -> list[float]:
        """Cost of each stage: the given ``costs``, or FLOPs per example measured on ``x`` (once, then kept),
        the post-hoc ``g``'s FLOPs added to every deferring stage."""
        if self.given_costs is not None:
            return list(self.given_costs)
        if bool(torch.isnan(self.measured_costs).any()):
            if x is None:
                raise ValueError("The costs were neither given (`costs`) nor measured yet: pass an input batch.")
            self.measured_costs.copy_(torch.tensor(self._measure_flops(x), dtype=torch.float64))
        return self.measured_costs.tolist()

    def _measure_flops(self, x: Any) -> list[float]:
        from torch.utils.flop_counter import FlopCounterMode

        x = x[:1]
        costs = []
        for i, model in enumerate(self.cascade_models):
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                logits = model(x)
                if self.deferral == "posthoc" and i < self.num_models - 1 and not _uninitialized(self.heads[i]):
                    emb = forward_with_embedding(model, self.embedding_layer, x)[1] if self.embedding_layer else None
                    self.heads[i](posthoc_features(self.probabilities(i, x, logits), emb))
            flops = float(counter.get_total_flops())
            # a model without matrix multiplies (counted ops) still costs something: its parameters as a fallback
            costs.append(flops if flops > 0 else float(sum(p.numel() for p in model.parameters()) or 1))
        return costs

    def target_rates(self, costs: Sequence[float] | None = None) -> list[float] | None:
        """The per-stage deferral rates the thresholds aim at (from ``deferral_rate`` or ``cost_budget``)."""
        if self.deferral_rates is not None:
            return list(self.deferral_rates)
        if self.cost_budget is not None:
            return [rate_for_cost_budget(self.cost_budget, costs or self.stage_costs())] * (self.num_models - 1)
        return None

    @torch.no_grad()
    def calibrate(self, data: Dataset | DataLoader, batch_size: int = 256) -> list[float]:
        """Choose the thresholds on held-out ``data`` for ``deferral_rate`` / ``cost_budget`` and set them.

        Every rank scores its share of ``data`` and the scores are gathered in dataset order
        (:func:`~lightning_methods._distributed.map_in_order`), so the thresholds equal the 1-process ones. Stage
        ``i``'s threshold is chosen on the inputs that stage ``i - 1``'s threshold passes on. The ``random`` rule's
        scores are uniform on [0, 1): its threshold is ``1 - rate``, on every rank alike.

        Returns:
            The thresholds set.
        """
        if self.deferral == "posthoc":
            self._require_head()
        if isinstance(data, DataLoader):  # its dataset, example by example (a loader's collate may expect whole batches)
            data = data.dataset
        sample = data[0][0]
        costs = self.stage_costs(move_data_to_device(sample.unsqueeze(0), self.device))
        rates = self.target_rates(costs)
        if rates is None:
            raise ValueError(
                "Nothing to choose thresholds for: set `deferral_rate` (fraction deferred, e.g. 0.3) or `cost_budget` "
                "(cost relative to the last model, e.g. 0.5), or set the thresholds by hand (`thresholds`)."
            )
        if self.deferral == "random":
            self.set_thresholds([1.0 - r if r > 0 else math.inf for r in rates])
            return self.thresholds.tolist()
        was_training = self.training
        self.eval()
        try:
            def one_batch(batch: Any) -> torch.Tensor:
                x = move_data_to_device(batch[0], self.device)
                out = []
                for i in range(self.num_models - 1):
                    probs, emb = self._run(i, x, self._needs_embedding(i))
                    out.append(self.stage_scores(i, probs, emb).double())
                return torch.stack(out, dim=1)

            scores = map_in_order(data, one_batch, batch_size)
        finally:
            self.train(was_training)
        reaching = torch.ones(len(scores), dtype=torch.bool, device=scores.device)
        chosen = []
        for i, rate in enumerate(rates):
            stage_scores = scores[reaching, i]
            t = threshold_for_rate(stage_scores, rate) if len(stage_scores) else math.inf
            chosen.append(t)
            reaching = reaching & (scores[:, i] > t)
        self.set_thresholds(chosen)
        return chosen

    # -- the cascade -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def cascade_predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the cascade on a batch: model ``i + 1`` sees only the inputs stage ``i`` defers.

        Returns:
            ``{"preds": (N,), "probs": (N, num_classes), "answered_by": (N,) index of the model that answered}``.
        """
        if not self.has_thresholds:
            raise ValueError(
                "The cascade has no thresholds yet: fit it (thresholds are chosen on held-out data for `deferral_rate`"
                " / `cost_budget`), call `calibrate(held_out_data)`, or set them with `thresholds`."
            )
        # The first model's answers fill the output; each deferred subset is gathered once (index_select), run through
        # the next model and written back over its rows (index_copy_). Boolean-mask indexing of every tensor at every
        # stage cost as much as a quarter of a small expensive model's forward (measured on one CPU thread).
        probs_out, emb = self._run(0, x, self._needs_embedding(0))
        probs_out = probs_out.contiguous()
        answered = torch.zeros(len(x), dtype=torch.long, device=probs_out.device)
        index: torch.Tensor | None = None  # rows of x that reach the current stage (None: all of them)
        probs = probs_out
        for i in range(self.num_models - 1):
            defer = (self.stage_scores(i, probs, emb) > self.thresholds[i].to(probs.dtype)).nonzero().squeeze(1)
            if len(defer) == 0:
                break
            index = defer if index is None else index.index_select(0, defer)
            probs, emb = self._run(i + 1, x.index_select(0, index), self._needs_embedding(i + 1))
            probs_out.index_copy_(0, index, probs.to(probs_out.dtype))
            answered.index_fill_(0, index, i + 1)
        return {"preds": probs_out.argmax(-1), "probs": probs_out, "answered_by": answered}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The cascade's class probabilities (see :meth:`cascade_predict`)."""
        return self.cascade_predict(x)["probs"]

    # -- Lightning: checks before any step ----------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        self._check_models_against_data(datamodule)
        if self.heads is not None and any(_uninitialized(h) for h in self.heads):
            self._materialize_heads(datamodule)
        if stage == "fit":
            self._check_fit_split(datamodule)
            if not self._has_target and not self.has_thresholds:
                rank_zero_info("CascadeModule: no `deferral_rate` / `cost_budget`: fit chooses no thresholds.")

    # What a checkpoint restores (g, thresholds) is checked when a stage starts: Lightning restores `ckpt_path` after
    # `setup`, and before these hooks and any step.
    def _check_ready(self, predicting: bool = False) -> None:
        if self.deferral == "posthoc":
            self._require_head()
        if predicting and not self.has_thresholds:
            raise ValueError(
                "`trainer.predict` runs the cascade at its thresholds, and it has none: fit it with `deferral_rate` or "
                "`cost_budget` (the thresholds are chosen on held-out data), or set `thresholds`."
            )

    def on_test_start(self) -> None:
        self._check_ready()

    def on_predict_start(self) -> None:
        self._check_ready(predicting=True)

    def _check_models_against_data(self, datamodule: Any) -> None:
        data_classes = getattr(datamodule, "num_classes", None) if datamodule is not None else None
        if isinstance(data_classes, int) and data_classes != self.num_classes:
            raise ValueError(
                f"`num_classes={self.num_classes}` but {type(datamodule).__name__} has {data_classes} classes. "
                f"Set `num_classes={data_classes}` (the CLI links it from the datamodule when you leave it out)."
            )
        input_shape = getattr(datamodule, "input_shape", None) if datamodule is not None else None
        if input_shape is None:
            return
        for i, model in enumerate(self.cascade_models):
            try:
                out = probe_output(model, tuple(input_shape))
            except Exception as err:
                raise ValueError(
                    f"`models[{i}]` ({type(model).__name__}) cannot take inputs of shape {tuple(input_shape)} from "
                    f"{type(datamodule).__name__}: {err}."
                ) from err
            if out.ndim != 2:
                raise ValueError(f"`models[{i}]` outputs shape {tuple(out.shape)}, not (batch, classes) logits.")
            self._check_width(i, out.shape[1], self.num_classes, model)

    def _materialize_heads(self, datamodule: Any) -> None:
        input_shape = getattr(datamodule, "input_shape", None) if datamodule is not None else None
        if input_shape is None:
            raise ValueError(
                "`embedding_layer` makes g's input size depend on the embedding: fit with a datamodule that has an "
                "`input_shape` (every datamodule of this library), so g can be built before training."
            )
        device = next(iter(self.buffers())).device
        x = torch.zeros(2, *input_shape, device=device)
        with torch.no_grad():
            for i, head in enumerate(self.heads):
                probs, emb = self._run(i, x, True)
                head(posthoc_features(probs, emb))

    @property
    def _has_target(self) -> bool:
        return self.deferral_rates is not None or self.cost_budget is not None

    def _nothing_to_train(self) -> bool:
        trainer = self.trainer
        return trainer.max_epochs == 0 or trainer.max_steps == 0 or trainer.limit_train_batches == 0

    def _check_fit_split(self, datamodule: Any) -> None:
        split = getattr(datamodule, "deferral_fit_split", None) if datamodule is not None else None
        if self.allow_training_split or (split is not None and split != "train"):
            return
        where = f"{type(datamodule).__name__}'s training split" if datamodule is not None else "the given dataloaders"
        raise ValueError(
            f"CascadeModule.fit would fit the deferral rule and its thresholds on {where}, which the models were "
            "trained on (their confidence there is overfit: the thresholds would be wrong and g would learn nothing). "
            "Wrap the datamodule in `datamodules.DeferralDataModule(dm)`, which fits on its validation split and keeps "
            "part of it for the thresholds; if your data really is held out from the models, set "
            "`allow_training_split=True`."
        )

    # -- Lightning: fitting g, then the thresholds -------------------------------------------------------------------
    def _probs_all(self, x: Any) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        probs, embs = [], []
        for i in range(self.num_models):
            p, e = self._run(i, x, self._needs_embedding(i))
            probs.append(p)
            embs.append(e)
        return probs, embs

    def _head_loss(self, probs: list[torch.Tensor], embs: list, y: torch.Tensor) -> tuple[torch.Tensor, list, list]:
        losses, preds, targets = [], [], []
        for i, head in enumerate(self.heads):
            pred = head(posthoc_features(probs[i], embs[i])).squeeze(-1)
            tgt = posthoc_targets(probs[i], probs[i + 1], y, self.target)
            losses.append(F.mse_loss(pred, tgt))
            preds.append(pred.detach())
            targets.append(tgt)
        return torch.stack(losses).sum(), preds, targets

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        if self.heads is None:
            return None  # nothing to learn: the fit only chooses thresholds when it ends
        x, y = batch[0], batch[1]
        probs, embs = self._probs_all(x)
        loss, _, _ = self._head_loss(probs, embs, y)
        self.log("train_loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=len(y), sync_dist=True)
        return loss

    def configure_optimizers(self) -> Any:
        if self.heads is None:
            return None
        return self.optimizer(self.heads.parameters())

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        return -1 if self.heads is None else None  # nothing to learn: skip the epoch (Lightning's documented -1)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.heads is not None and not bool(self.head_fitted):
            self.head_fitted.fill_(True)  # g has been trained (a resumed or stopped fit can use it as it is)

    def on_fit_start(self) -> None:
        if self.deferral == "posthoc" and self._nothing_to_train() and not bool(self.head_fitted):
            raise ValueError(
                "`deferral='posthoc'` learns its rule g, but this fit runs no training step (max_epochs=0 / "
                "max_steps=0 / limit_train_batches=0): give it some epochs, or load a fitted cascade first."
            )
        if self.heads is None or self._nothing_to_train():
            self._calibrate_after_fit()  # nothing to learn: the thresholds are chosen once

    def on_validation_start(self) -> None:
        if self.trainer.state.fn != "fit":
            self._check_ready()
        # g changes during fit: re-choose its thresholds before each validation epoch, so the epoch's cascade metrics
        # and the checkpoints written after it hold thresholds of the current g
        if self.heads is not None and self.trainer.state.fn == "fit" and not self.trainer.sanity_checking and bool(self.head_fitted):
            self._calibrate_after_fit(verbose=False)

    def on_train_end(self) -> None:
        # not `on_fit_end`: by then the strategy has torn down (the module is back on the CPU, no process group)
        if self.heads is not None and bool(self.head_fitted):
            self._calibrate_after_fit()

    def _calibrate_after_fit(self, verbose: bool = True) -> None:
        if not self._has_target:
            return
        data = self._threshold_data()
        thresholds = self.calibrate(data, getattr(self.trainer.datamodule, "eval_batch_size", None) or 256)
        if verbose:
            rank_zero_info(f"CascadeModule: thresholds {['%.4g' % t for t in thresholds]} chosen on {len(data)} held-out examples.")

    def _threshold_data(self) -> Dataset:
        dm = self.trainer.datamodule
        if dm is not None and callable(getattr(dm, "threshold_dataset", None)):
            return dm.threshold_dataset()
        loader = self.trainer.val_dataloaders
        if loader is None and dm is not None:
            loader = dm.val_dataloader()
        if isinstance(loader, (list, tuple)) and len(loader) == 1:
            loader = loader[0]
        if not isinstance(loader, DataLoader):
            raise ValueError(
                "CascadeModule chooses its thresholds on the validation data of the fit, and there is none: fit with a "
                "`datamodules.DeferralDataModule` (or pass `val_dataloaders` of held-out data)."
            )
        return loader.dataset

    # -- Lightning: evaluation --------------------------------------------------------------------------------------
    def _evaluate(self, batch: Any, stage: str) -> None:
        x, y = batch[0], batch[1]
        y = y.argmax(-1) if y.ndim == 2 else y
        probs, embs = self._probs_all(x)
        right = [p.argmax(-1) == y for p in probs]
        costs = self.stage_costs(x)
        for i in range(self.num_models):
            getattr(self, f"{stage}_acc_model{i}").update(probs[i], y)
        if stage == "val" and self.heads is not None and self.trainer.state.fn == "fit":
            loss, preds, targets = self._head_loss(probs, embs, y)
            self.log("val_loss", loss, prog_bar=True, batch_size=len(y), sync_dist=True)
            if bool(self.head_fitted) is False:
                return  # g is still training: its curve is not the rule's yet
        scores = self.stage_scores(0, probs[0], embs[0])
        getattr(self, f"{stage}_curve").update(scores.float(), right[0], right[1])
        getattr(self, f"{stage}_oracle_curve").update(oracle_scores(right[0], right[1]), right[0], right[1])
        if self.has_thresholds:
            out = self._cascade_from(probs, embs, scores)
            getattr(self, f"{stage}_acc").update(out["probs"], y)
            reach = [(out["answered_by"] >= i).float() for i in range(self.num_models)]
            getattr(self, f"{stage}_deferred").update(reach[1])
            getattr(self, f"{stage}_relative_cost").update(sum(r * c for r, c in zip(reach, costs)) / costs[-1])

    def _cascade_from(self, probs: list[torch.Tensor], embs: list, first_scores: torch.Tensor) -> dict[str, torch.Tensor]:
        """The cascade's answers from every model's outputs (evaluation runs all models anyway, for the curves)."""
        n = len(probs[0])
        out = probs[-1].clone()
        answered = torch.full((n,), self.num_models - 1, dtype=torch.long, device=out.device)
        open_ = torch.ones(n, dtype=torch.bool, device=out.device)
        for i in range(self.num_models - 1):
            scores = first_scores if i == 0 else self.stage_scores(i, probs[i], embs[i])
            stop = open_ & ~(scores > self.thresholds[i])
            out[stop] = probs[i][stop]
            answered[stop] = i
            open_ &= ~stop
        return {"probs": out, "answered_by": answered}

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _log_epoch(self, stage: str) -> None:
        accs = []
        for i in range(self.num_models):
            metric = getattr(self, f"{stage}_acc_model{i}")
            if metric.update_count:
                accs.append(metric.compute())
                self.log(f"{stage}_acc_model{i}", accs[-1], sync_dist=True)
            metric.reset()
        curve = getattr(self, f"{stage}_curve")
        if curve.update_count:
            result = curve.compute()
            for key, value in result.items():
                if value.ndim == 0:
                    self.log(f"{stage}_{key}", value, sync_dist=True)
            if len(accs) > 1:
                costs = self.stage_costs()
                rate, cost = cost_to_reach(result["deferral_rate"], result["accuracy"], 0.99 * float(accs[1]), costs[:2])
                self.log(f"{stage}_rate_for_99", rate, sync_dist=True)
                self.log(f"{stage}_cost_for_99", cost, sync_dist=True)
            self._last_curves[stage] = {k: v for k, v in result.items() if v.ndim > 0}
        curve.reset()
        oracle = getattr(self, f"{stage}_oracle_curve")
        if oracle.update_count:
            self.log(f"{stage}_oracle_audc", oracle.compute()["audc"], sync_dist=True)
        oracle.reset()
        for name in ("acc", "deferred", "relative_cost"):
            metric = getattr(self, f"{stage}_{name}")
            if metric.update_count:
                self.log(f"{stage}_{name}", metric.compute(), sync_dist=True)
            metric.reset()

    @property
    def _last_curves(self) -> dict[str, dict[str, torch.Tensor]]:
        return self.__dict__.setdefault("_curves", {})

    def curve(self, stage: str = "test") -> dict[str, torch.Tensor]:
        """The deferral curve (``deferral_rate``, ``accuracy``) of the last ``validate``/``test`` epoch."""
        if stage not in self._last_curves:
            raise ValueError(f"No {stage} curve yet: run `trainer.{'test' if stage == 'test' else 'validate'}` first.")
        return self._last_curves[stage]

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    # -- Lightning: inference that saves compute -----------------------------------------------------------------------
    def on_predict_epoch_start(self) -> None:
        self._answered = torch.zeros(self.num_models, dtype=torch.float64, device=self.device)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        self.stage_costs(x)
        out = self.cascade_predict(x)
        self._answered += torch.bincount(out["answered_by"], minlength=self.num_models).to(self._answered)
        return out

    def on_predict_epoch_end(self) -> None:
        answered = self._answered
        if world()[0] > 1:
            dist.all_reduce(answered)
        total = float(answered.sum())
        if total == 0:
            return
        share = (answered / total).tolist()
        reach = [sum(share[i:]) for i in range(self.num_models)]
        self.predict_stats = {
            "answered_by": share,
            "deferred": reach[1],
            "relative_cost": relative_cost(reach, self.stage_costs()),
            "examples": int(total),
        }
        rank_zero_info(
            f"CascadeModule: {reach[1]:.1%} of {int(total)} inputs deferred; cost {self.predict_stats['relative_cost']:.3f}"
            " x always running the last model."
        )

    # -- state -----------------------------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_generator"] = None  # a torch.Generator does not pickle (ddp_spawn): rebuilt from the seed
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._generator = torch.Generator().manual_seed(self.seed)
