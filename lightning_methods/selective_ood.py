"""Selective classification with OOD detection (SCOD): plug-in estimators of the Bayes-optimal abstain rule.

Narasimhan, Menon, Jitkrittum, Kumar. *Plugin estimators for selective classification with out-of-distribution
detection.* ICLR 2024, arXiv:2301.12386 (v1/v2: *Learning to reject meets OOD detection*).

The problem (Sec. 2, Eq. 3). The test stream is a mixture ``P_te = pi_in P_in + (1 - pi_in) P_out`` of inliers
(labelled classes) and OOD inputs. A classifier ``h`` and a rejector ``r`` (1 = abstain) minimise::

    (1 - c_fn) * P_in(y != h(x), r(x) = 0) + c_fn * P_out(r(x) = 0)   subject to   P_te(r(x) = 1) <= b_rej

so abstaining is spent on hard inliers *and* on OOD inputs, and the budget ``b_rej`` is a fraction of the **test
mixture**, not of the inliers.

The Bayes-optimal rule (Lemma 3.1, Eq. 5). ``h*(x) = argmax_y P_in(y | x)``; the Lagrangian of the constraint
(Eq. 4) has costs ``c_in`` (rejecting an inlier) and ``c_out`` (accepting an OOD input) and rejects iff::

    (1 - c_in - c_out) * (1 - max_y P_in(y | x)) + c_out * rho(x) > c_in,      rho = dP_out / dP_in   (bayes_reject)

``c_out = 0`` is Chow's rule (threshold the max-softmax); ``c_in + c_out = 1`` is density-ratio thresholding
(pure OOD detection). Writing out the Lagrangian of Eq. 3 pointwise (accepting ``x`` costs
``(1 - c_fn)(1 - maxP) p_in + c_fn p_out``; rejecting it costs ``lam (pi_in p_in + (1 - pi_in) p_out)``) gives the
same rule as **one score thresholded at the multiplier** (:func:`plugin_score`)::

    S(x) = [(1 - c_fn) * (1 - max_y P_in(y | x)) + c_fn * rho(x)] / [pi_in + (1 - pi_in) * rho(x)]

so for every budget the optimal rejector rejects the top ``b_rej`` fraction of the test mixture by ``S``
(:func:`lagrangian_costs` maps the multiplier back to Eq. 5's ``(c_in, c_out)``; the tests check both forms agree).
``S`` needs ``pi_in``, the test mixture's inlier share: given (``inlier_share``) or estimated by maximum likelihood
from the density ratio on the unlabelled mixture the threshold is set on (:func:`estimate_inlier_share`).

The two plug-in estimators (Sec. 4), and the baselines, are ``estimator=``:

- ``"black_box"`` (Eq. 8): ``max_y P_in(y|x)`` from the classifier's softmax and ``rho`` from any OOD score ``s``
  (higher = more OOD) turned into a density ratio. A raw score is not one, and its scale is not identifiable from
  inliers alone; by default (``ratio_calibration="mixture"``) ``s`` is mapped to its CDF ``u`` among held-out
  inlier scores and ``rho(u) = a e^{au} / (e^a - 1)`` (mean 1 on inliers) with ``a`` fitted by maximum likelihood
  on the unlabelled test mixture (:func:`inlier_cdf`, :func:`uniform_tilt`, :func:`fit_tilt_slope`); or
  ``rho = exp(a s + b)`` calibrated against a wild set or on inliers only. The OOD scores: ``msp``,
  ``max_logit``, ``energy``, ``feature_norm``, ``mahalanobis`` (on a named embedding layer) or any pytorch-ood
  detector (``"pytorch_ood:<Detector>"``).
- ``"loss_based"`` (Algorithm 1): one backbone with a class head (cross-entropy on labelled inliers) and an
  inlier-vs-wild head ``f`` on the embedding (logistic loss: inliers vs an unlabelled *wild* mixture
  ``P_wild = pi_mix P_in + (1 - pi_mix) P_out``). At the optimum ``exp(f(x)) * n_in / n_wild = P_wild / P_in =
  pi_mix + (1 - pi_mix) rho(x)`` (the factor corrects the odds for unbalanced batches), so
  ``rho = max(0, exp(f) n_in / n_wild - pi_mix) / (1 - pi_mix)`` with ``pi_mix`` the median of
  ``exp(f) n_in / n_wild`` over a strictly-inlier held-out set.
- Baselines: ``"msp"`` (Chow: ``1 - max softmax``), ``"max_logit"``, ``"energy"``, ``"sirc"`` (Xia & Bouganis 2022)
  and ``"ood_score"`` (the OOD score alone).

Every estimator ends in one score per input (higher = reject) and one threshold: the ``floor(b_rej * N)``-th
highest score of an unlabelled mixture (the test inputs by default), computed from scores gathered in dataset
order across DDP ranks and saved in the checkpoint.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import move_data_to_device, rank_zero_info, rank_zero_warn
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics import MeanMetric, SumMetric

from lightning_methods._distributed import map_in_order, world
from lightning_methods._layers import default_embedding_layer, forward_with_embedding
from lightning_methods._utils import save_hparams
from lightning_methods.classifier import ClassifierModule, hard_targets
from lightning_methods.metrics import RiskCoverage, SCODRisk

__all__ = [
    "SelectiveOODModule",
    "ESTIMATORS",
    "OOD_SCORES",
    "bayes_reject",
    "lagrangian_costs",
    "plugin_score",
    "budget_threshold",
    "estimate_inlier_share",
    "inlier_cdf",
    "uniform_tilt",
    "fit_tilt_slope",
    "density_ratio",
    "sirc_score",
    "msp_score",
    "max_logit_score",
    "energy_score",
    "feature_norm_score",
    "fit_mahalanobis",
    "mahalanobis_score",
]

ESTIMATORS = ("black_box", "loss_based", "msp", "max_logit", "energy", "sirc", "ood_score")
#: built-in OOD scores (higher = more OOD); ``"pytorch_ood:<Name>"`` picks a detector of ``pytorch_ood.detector``
OOD_SCORES = ("msp", "max_logit", "energy", "feature_norm", "mahalanobis")
RATIO_CALIBRATIONS = ("mixture", "inlier", "wild")
THRESHOLD_SPLITS = ("test", "wild")
_MAX_LOG_RHO = 600.0  # exp(600) is finite in float64: S stays finite (-> c_fn / (1 - pi_in)) for huge ratios
_SLACK = 1e-7  # b * N in floating point: 0.29 * 100 = 28.999999999999996 must count as 29 (as metrics.py)


# -- the rule (pure functions) -------------------------------------------------------------------------------------
def bayes_reject(max_prob: torch.Tensor, rho: torch.Tensor, c_in: float, c_out: float) -> torch.Tensor:
    """Lemma 3.1 / Eq. 5: reject iff ``(1 - c_in - c_out)(1 - max_prob) + c_out * rho > c_in``.

    Args:
        max_prob: ``max_y P_in(y | x)``, shape ``(N,)``.
        rho: the density ratio ``P_out(x) / P_in(x)``, shape ``(N,)``.
        c_in: Lagrangian cost of rejecting an inlier.
        c_out: Lagrangian cost of accepting an OOD input (negative when the budget binds hard).
    """
    return (1 - c_in - c_out) * (1 - max_prob) + c_out * rho > c_in


def lagrangian_costs(c_fn: float, inlier_share: float, lam: float) -> tuple[float, float]:
    """Eq. 4's ``(c_in, c_out)`` for the budgeted problem with multiplier ``lam`` (normalised as in Eq. 4).

    The Lagrangian of Eq. 3 weighs (accepted inlier error, rejected inlier, accepted OOD) by
    ``(1 - c_fn, lam * pi_in, c_fn - lam * (1 - pi_in))``; Eq. 4 writes the same three weights scaled to sum to one,
    ``(1 - c_in - c_out, c_in, c_out)``. ``bayes_reject`` with these costs equals ``plugin_score > lam``.
    """
    z = 1.0 + lam * (2 * inlier_share - 1)
    return lam * inlier_share / z, (c_fn - lam * (1 - inlier_share)) / z


def plugin_score(max_prob: torch.Tensor, rho: torch.Tensor, c_fn: float, inlier_share: float) -> torch.Tensor:
    """The budgeted Bayes rule as one score (higher = reject): ``S = [(1-c_fn)(1-maxP) + c_fn rho] / [pi + (1-pi) rho]``.

    Rejecting the top ``b`` fraction of the test mixture by ``S`` is the optimal rejector of Eq. 3 at budget ``b``
    (the threshold is the Lagrange multiplier). ``rho`` may be ``inf`` (the score tends to ``c_fn / (1 - pi)``).
    Computed in float64 with numerator and denominator divided by ``max(1, rho)``; returned as float32.

    Args:
        max_prob: ``max_y P_in(y | x)``, ``(N,)``.
        rho: density ratio ``P_out / P_in``, ``(N,)``, >= 0.
        c_fn: cost of accepting an OOD input, in [0, 1].
        inlier_share: ``pi_in`` of the test mixture, in (0, 1].
    """
    log_rho = rho.double().clamp_min(0).log().clamp(max=_MAX_LOG_RHO)
    big = log_rho.clamp_min(0)  # divide through by max(1, rho)
    scale, r = torch.exp(-big), torch.exp(log_rho - big)
    err = 1 - max_prob.double()
    num = (1 - c_fn) * err * scale + c_fn * r
    den = inlier_share * scale + (1 - inlier_share) * r
    return (num / den).float()


def budget_threshold(scores: torch.Tensor, budget: float) -> float:
    """The threshold ``t`` such that ``scores > t`` rejects at most ``floor(budget * N)`` rows (ties: fewer).

    ``t`` is the ``(k + 1)``-th highest score for ``k = floor(budget * N)`` rows to reject; ``-inf`` at budget 1.
    """
    n = scores.numel()
    if n == 0:
        raise ValueError("budget_threshold: no scores to set a threshold on.")
    k = min(n, math.floor(budget * n + _SLACK))
    if k >= n:
        return float("-inf")
    return float(scores.double().sort(descending=True).values[k])


def estimate_inlier_share(rho: torch.Tensor, iters: int = 100) -> float:
    """Maximum-likelihood inlier share ``pi`` of an unlabelled mixture, given the density ratio of its rows.

    Each row's likelihood under ``pi P_in + (1 - pi) P_out`` is ``P_in(x) (pi + (1 - pi) rho(x))``, so the
    log-likelihood ``sum_i log(pi + (1 - pi) rho_i)`` is concave in ``pi``; its maximiser on [0, 1] is found by
    bisection on the derivative ``sum_i (1 - rho_i) / (pi + (1 - pi) rho_i)`` (the fixed point of the EM of
    Saerens et al. 2002 for a shift of class priors).
    """
    rho = rho.double().clamp(0, 1e250)

    def grad(p: float) -> float:
        return float(((1 - rho) / (p + (1 - p) * rho).clamp_min(1e-300)).sum())

    if grad(1.0) >= 0:
        return 1.0
    lo, hi = 0.0, 1.0
    if grad(0.0) <= 0:
        return 0.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if grad(mid) > 0 else (lo, mid)
    return 0.5 * (lo + hi)


def inlier_cdf(scores: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``u = (#{ref < s} + #{ref <= s} + 1) / (2 (n + 1))``: where each score falls among ``n`` sorted inlier scores.

    On inliers ``u`` is (nearly) uniform on (0, 1), whatever the score's scale or tails; a score above every inlier
    gets ``u = 1 - 1 / (2 (n + 1))``.
    """
    ref = reference.double()
    s = scores.double().contiguous()
    below = torch.searchsorted(ref, s, right=False).double()
    at_or_below = torch.searchsorted(ref, s, right=True).double()
    return (below + at_or_below + 1) / (2 * (len(ref) + 1))


def uniform_tilt(u: torch.Tensor, a: float) -> torch.Tensor:
    """``rho(u) = a exp(a u) / (exp(a) - 1)``: an exponential tilt of the uniform, so ``E_U[rho] = 1`` exactly."""
    u = u.double()
    if a < 1e-8:
        return torch.ones_like(u)
    return a * torch.exp(a * (u - 1)) / -math.expm1(-a)


def fit_tilt_slope(u_mix: torch.Tensor, n_reference: int, anchor: float = 0.5) -> tuple[float, float]:
    """``(a, pi)``: the tilt slope and the mixture's inlier share, from a mixture's ``u`` (:func:`inlier_cdf`).

    The OOD score of a mixture, mapped to its inlier CDF ``u``, has density ``pi + (1 - pi) rho(u)``: inliers are
    uniform in ``u``, OOD inputs pile up towards 1. A parametric tilt alone does not identify ``pi`` (a flat tilt
    with ``pi = 0`` can fit as well), so ``pi`` comes from an anchor set, as in mixture-proportion estimation: the
    lower ``anchor`` fraction of inlier scores is assumed free of OOD inputs, ``pi = P_mix(u <= anchor) / anchor``
    (capped at 1). The slope ``a`` of ``rho = uniform_tilt(u, a)`` then maximises the log-likelihood
    ``sum_i log(pi + (1 - pi) rho(u_i))`` over a log grid from 0.1 to ``2 (n + 1)`` (beyond which the tilt's mass
    lies above the largest inlier score). Needs inliers and an unlabelled mixture only.
    """
    u = u_mix.double()
    share = min(1.0, float((u <= anchor).double().mean()) / anchor)
    if share >= 1.0:
        return 0.0, 1.0
    top = math.log(2 * (n_reference + 1))
    best = (0.0, -math.inf)
    for i in range(41):
        a = math.exp(math.log(0.1) + (top - math.log(0.1)) * i / 40)
        loglik = float(torch.log(share + (1 - share) * uniform_tilt(u, a)).sum())
        if loglik > best[1]:
            best = (a, loglik)
    return best[0], share


def density_ratio(signal: torch.Tensor, a: float, b: float, pi_mix: float = 0.0) -> torch.Tensor:
    """``rho = max(0, exp(a * signal + b) - pi_mix) / (1 - pi_mix)`` (float64).

    One form for both estimators: the black box's calibrated ``exp(a s + b)`` (``pi_mix = 0`` with inlier-only
    calibration) and the loss-based head's ``P_wild / P_in`` with the mixture's inlier share removed.
    """
    w = torch.exp((a * signal.double() + b).clamp(max=_MAX_LOG_RHO))
    return (w - pi_mix).clamp_min(0) / (1 - pi_mix)


def sirc_score(max_prob: torch.Tensor, ood: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """SIRC (Xia & Bouganis, ACCV 2022), as a reject score: ``(1 - maxP) * (1 + exp(-b (S2 - a)))``, ``S2 = -ood``.

    ``S2`` is the secondary, higher-is-inlier score; ``a = mean - 3 std`` and ``b = 1 / std`` of ``S2`` on held-out
    inliers (the paper's choice), so the OOD score only sharpens rejection where ``S2`` is unusually low.
    """
    s2 = -ood.double()
    # the exponent is capped at 80 so the float32 result stays finite (e^88 overflows) for far-out scores
    return ((1 - max_prob.double()) * (1 + torch.exp((-b * (s2 - a)).clamp(max=80.0)))).float()


# -- OOD scores (higher = more OOD; the definitions of pytorch-ood, which the tests check them against) -----------
def msp_score(logits: torch.Tensor) -> torch.Tensor:
    """``-max softmax`` (Hendrycks & Gimpel 2017; ``pytorch_ood.detector.MaxSoftmax``)."""
    return -logits.softmax(-1).amax(-1)


def max_logit_score(logits: torch.Tensor) -> torch.Tensor:
    """``-max logit`` (Hendrycks et al. 2022; ``pytorch_ood.detector.MaxLogit``)."""
    return -logits.amax(-1)


def energy_score(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The energy ``-T logsumexp(logits / T)`` (Liu et al. 2020; ``pytorch_ood.detector.EnergyBased``)."""
    return -temperature * torch.logsumexp(logits / temperature, dim=-1)


def feature_norm_score(embedding: torch.Tensor) -> torch.Tensor:
    """``-||phi(x)||_2`` of the embedding (inliers have larger feature norms; SIRC's secondary score)."""
    return -embedding.flatten(1).norm(dim=1)


def fit_mahalanobis(embedding: torch.Tensor, targets: torch.Tensor, num_classes: int, ridge: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Class means and the shared precision of Lee et al. (NeurIPS 2018): ``(means (C, D), precision (D, D))``.

    The shared covariance is ``(1 / N) sum_i (z_i - mu_{y_i})(z_i - mu_{y_i})^T`` plus ``ridge * mean variance``.
    Written here rather than taken from ``pytorch_ood.detector.Mahalanobis``: that one does not divide by ``N``
    (measured with pytorch-ood 0.4: its scores are ours divided by N), so its scores are not a Gaussian
    log-density and ``exp(score)`` is not on a density-ratio scale, which the black-box plug-in relies on.
    """
    z = embedding.double().flatten(1)
    present = torch.bincount(targets, minlength=num_classes)
    if bool((present == 0).any()):
        missing = (present == 0).nonzero().flatten().tolist()
        raise ValueError(f"Mahalanobis: classes {missing} have no training example; every class needs one.")
    means = torch.zeros(num_classes, z.shape[1], dtype=z.dtype, device=z.device).index_add_(0, targets, z)
    means /= present.unsqueeze(1).to(z.dtype)
    centred = z - means[targets]
    cov = centred.T @ centred / len(z)
    cov += torch.eye(len(cov), dtype=z.dtype, device=z.device) * ridge * cov.diagonal().mean().clamp_min(1e-12)
    return means.float(), torch.linalg.inv(cov).float()


def mahalanobis_score(embedding: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """``0.5 * min_c (z - mu_c)^T Sigma^-1 (z - mu_c)``: minus the log-density of the closest class Gaussian (+ const)."""
    z = embedding.flatten(1).double()
    d = z.unsqueeze(1) - means.double().unsqueeze(0)  # (N, C, D)
    sq = torch.einsum("ncd,de,nce->nc", d, precision.double(), d)
    return (0.5 * sq.amin(1)).float()


# -- small private helpers -----------------------------------------------------------------------------------------
def _check_fraction(value: Any, name: str, fix: str, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"`{name}` must be a number in {'(' if low_open else '['}0, 1], got {value!r}. {fix}")
    if not (0.0 < value <= 1.0 if low_open else 0.0 <= value <= 1.0):
        raise ValueError(f"`{name}` must lie in {'(' if low_open else '['}0, 1], got {value!r}. {fix}")
    return float(value)


def _check_ood_score(ood_score: Any) -> str:
    if isinstance(ood_score, str) and ood_score.startswith("pytorch_ood:"):
        return ood_score
    if ood_score not in OOD_SCORES:
        raise ValueError(
            f"`ood_score` must be one of {OOD_SCORES} or 'pytorch_ood:<Detector>' (a class of pytorch_ood.detector, "
            f"e.g. 'pytorch_ood:ViM'), got {ood_score!r}."
        )
    return ood_score


def _logmeanexp(x: torch.Tensor) -> float:
    return float(torch.logsumexp(x.double(), 0) - math.log(len(x)))


def _fit_logistic_1d(s_pos: torch.Tensor, s_neg: torch.Tensor, iters: int = 50) -> tuple[float, float]:
    """``(a, b)`` of a class-balanced logistic regression ``P(pos | s) = sigmoid(a s + b)`` (LBFGS, float64).

    Balanced weights make the fitted log-odds ``a s + b`` an estimate of ``log p_pos(s) / p_neg(s)``.
    """
    s = torch.cat([s_pos, s_neg]).detach().double().cpu()  # two parameters: the CPU is fastest, on any device
    mu, sd = s.mean(), s.std().clamp_min(1e-12)
    z = (s - mu) / sd
    y = torch.cat([torch.ones(len(s_pos)), torch.zeros(len(s_neg))]).double()
    w = torch.cat([torch.full((len(s_pos),), 0.5 / len(s_pos)), torch.full((len(s_neg),), 0.5 / len(s_neg))]).double()
    params = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([params], max_iter=iters, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (w * F.binary_cross_entropy_with_logits(params[0] * z + params[1], y, reduction="none")).sum()
        loss = loss + 1e-6 * params.pow(2).sum()  # keeps the fit finite when the two samples separate perfectly
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    a, b = params.detach()
    return float(a / sd), float(b - a * mu / sd)


def _resize_buffers_hook(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """Let ``load_state_dict`` replace the Mahalanobis statistics and the ratio's reference scores whatever their size."""
    for name in ("maha_means", "maha_precision", "ratio_reference"):
        value = state_dict.get(prefix + name)
        if value is not None:
            setattr(module, name, torch.empty_like(value, device=getattr(module, name).device))


class SelectiveOODModule(ClassifierModule):
    """Classification with an abstain option for hard inliers *and* OOD inputs under one rejection budget (SCOD).

    Narasimhan et al., ICLR 2024 (see the module docstring for the equations). ``fit`` trains the backbone with
    cross-entropy (and, for ``estimator="loss_based"``, an inlier-vs-wild head on the same backbone, Algorithm 1),
    then **calibrates** the rule from the datamodule's splits: statistics of the OOD score on the training inliers
    (Mahalanobis means/precision), its density-ratio scale or ``pi_mix`` on the strictly-inlier held-out set (the
    ``val`` split), the test inlier share (given or estimated) and the threshold that rejects the ``rejection_budget``
    fraction of an unlabelled mixture (the test inputs, or the wild set). Every pass runs over whole splits split
    across DDP ranks and gathered in dataset order, so 1 and N processes give the same thresholds; everything
    calibrated is saved in the checkpoint.

    ``test`` on a mixture whose batches are ``[x, y, is_ood]`` (as :class:`datamodules.OODDataModule` yields) logs
    ``test_acc`` (inliers), ``test_scod_risk@rej{b}``, ``test_scod_auc_rc``, ``test_scod_auroc``,
    ``test_scod_fpr@95tpr`` (:class:`~lightning_methods.metrics.SCODRisk` of the score), ``test_inlier_rc_aurc``
    (:class:`~lightning_methods.metrics.RiskCoverage` on the inliers), and the decisions at the calibrated
    threshold: ``test_rejection_rate`` (on the mixture) and ``test_risk`` (SCOD risk of what was accepted).
    The curves (SCOD risk against the rejection rate, inlier risk against coverage) of the last epoch are kept in
    ``curves["test"]`` for :func:`lightning_methods.metrics.plot_curve`.
    ``predict_step`` returns ``{"pred": class, "abstain": bool, "score": float}`` per input.

    Args:
        model: the backbone, returning ``(N, num_classes)`` logits.
        num_classes: number of inlier classes (the CLI links it from the datamodule).
        estimator: ``"black_box"`` (Eq. 8), ``"loss_based"`` (Algorithm 1), or a baseline: ``"msp"`` (Chow),
            ``"max_logit"``, ``"energy"``, ``"sirc"``, ``"ood_score"`` (the OOD score alone).
        c_fn: cost of accepting an OOD input, in [0, 1]; an accepted misclassified inlier costs ``1 - c_fn``.
        rejection_budget: fraction of the test mixture to reject, in [0, 1].
        ood_score: the OOD score of ``black_box`` / ``sirc`` / ``ood_score``: ``"msp"``, ``"max_logit"``,
            ``"energy"``, ``"feature_norm"``, ``"mahalanobis"`` (class-conditional Gaussians with a shared covariance
            on ``embedding_layer``, fitted on the training inliers), or ``"pytorch_ood:<Detector>"``, a class of
            ``pytorch_ood.detector`` built as ``Detector(model, **ood_score_kwargs)`` (fitted on the training
            inliers when it needs fitting; its fitted state is not saved: call :meth:`calibrate` after reloading).
        ood_score_kwargs: keyword arguments of a pytorch-ood detector.
        inlier_share: ``pi_in`` of the test mixture; ``None`` estimates it on the unlabelled threshold split: the
            anchor estimate of :func:`fit_tilt_slope` (black box, ``ratio_calibration="mixture"``), else maximum
            likelihood given the estimated density ratio (:func:`estimate_inlier_share`).
        ratio_calibration: how ``black_box`` turns the OOD score ``s`` into a density ratio. ``"mixture"``
            (default): ``s`` is mapped to its CDF ``u`` among the held-out inliers' scores (uniform on inliers,
            whatever the score's scale and tails) and ``rho = a exp(a u) / (exp(a) - 1)`` (mean 1 on inliers), the
            slope ``a`` fitted by maximum likelihood of the unlabelled threshold split as a mixture
            ``pi + (1 - pi) rho(u)``, ``pi`` from the lower half of inlier scores taken as OOD-free
            (:func:`fit_tilt_slope`; no OOD labels, no wild set). The others use
            ``rho = exp(a s + b)``: ``"inlier"``
            (inlier data only, as the paper's black box): ``a = 1 / (ood_temperature * std)`` with ``std`` the
            score's standard deviation on the held-out inliers, and ``b`` such that ``rho`` averages 1 over them
            (``E_in[rho] = 1`` holds for any ``P_out``; the slope is not identifiable from inliers, hence the
            temperature); ``"wild"``: ``a, b`` from a class-balanced logistic regression of wild-vs-held-out-inlier
            on ``s``, then ``pi_mix`` removed as in the loss-based estimator (needs a wild set).
        ood_temperature: ``T`` of ``ratio_calibration="inlier"``, in units of the inlier standard deviation of the
            OOD score: larger ``T`` flattens the ratio (more weight on the classifier's confidence).
        threshold_split: the unlabelled mixture the threshold (and an estimated ``inlier_share``) is computed on:
            ``"test"`` (the test inputs: the budget then holds exactly on them) or ``"wild"`` (the wild set stands
            for the test stream).
        embedding_layer: submodule whose output is the embedding (``feature_norm``, ``mahalanobis``, and the
            wild head of ``loss_based``); defaults to the backbone's ``PENULTIMATE`` attribute.
        embedding_dim: width of that embedding, for the wild head; defaults to the backbone's ``embedding_dim``
            attribute, else it is inferred from the datamodule's ``input_shape`` before training.
        wild_loss_weight: weight of the inlier-vs-wild logistic loss (``loss_based``).
        budgets: rejection rates at which the test logs ``scod_risk@rej{b}``.
        grid: rejection rates over which ``scod_auc_rc`` averages the risk (None: 0, 0.05, ..., 0.95).
        calibration_batch_size: batch size of the calibration passes.
        save_path: where to write a checkpoint (weights and calibration) once ``fit`` has calibrated the rule;
            checkpoints that ``ModelCheckpoint`` writes during ``fit`` predate the calibration.
        optimizer: optimizer of the backbone (and the wild head).
        lr_scheduler: optional scheduler.
        label_smoothing: label smoothing of the cross-entropy.

    Note:
        Calibration runs when training ends (or at the start of ``fit`` when there is nothing to train: wrap a
        trained backbone with ``max_epochs=0``), and on demand (:meth:`calibrate`) or at the start of ``test`` /
        ``predict`` when the module is not calibrated. It reads ``datamodule.dataset(split)`` for ``"train"``,
        ``"val"`` (the strictly-inlier held-out set), ``"wild"`` and ``"test"`` (labels are not used except the
        training labels for Mahalanobis). :meth:`set_rule` changes the estimator, ``c_fn``, budget or OOD score of
        a trained module (the benchmark evaluates every rule on one backbone) and marks it uncalibrated.

    Example::

        >>> from lightning_methods.nets import MLP
        >>> from torch.utils.data import TensorDataset
        >>> module = SelectiveOODModule(MLP(in_features=2, num_classes=3, hidden_sizes=[8]), num_classes=3,
        ...                             estimator="black_box", ood_score="energy", c_fn=0.5, rejection_budget=0.2)
        >>> inliers = TensorDataset(torch.randn(40, 2), torch.randint(0, 3, (40,)))
        >>> mixture = TensorDataset(torch.randn(50, 2) * 3)
        >>> _ = module.calibrate(train=inliers, heldout=inliers, threshold_data=mixture)
        >>> out = module.predict(torch.randn(5, 2))
        >>> sorted(out), out["abstain"].dtype
        (['abstain', 'pred', 'score'], torch.bool)
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        estimator: Literal["black_box", "loss_based", "msp", "max_logit", "energy", "sirc", "ood_score"] = "black_box",
        c_fn: float = 0.5,
        rejection_budget: float = 0.2,
        ood_score: str = "energy",
        ood_score_kwargs: dict[str, Any] | None = None,
        inlier_share: float | None = None,
        ratio_calibration: Literal["mixture", "inlier", "wild"] = "mixture",
        ood_temperature: float = 1.0,
        threshold_split: Literal["test", "wild"] = "test",
        embedding_layer: str | None = None,
        embedding_dim: int | None = None,
        wild_loss_weight: float = 1.0,
        budgets: Sequence[float] = (0.1, 0.2, 0.3),
        grid: Sequence[float] | None = None,
        calibration_batch_size: int = 512,
        save_path: str | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(model, num_classes, optimizer, lr_scheduler, label_smoothing)
        save_hparams(self, inspect.currentframe())
        if ratio_calibration not in RATIO_CALIBRATIONS:
            raise ValueError(f"`ratio_calibration` must be one of {RATIO_CALIBRATIONS}, got {ratio_calibration!r}.")
        if threshold_split not in THRESHOLD_SPLITS:
            raise ValueError(f"`threshold_split` must be one of {THRESHOLD_SPLITS}, got {threshold_split!r}.")
        if isinstance(ood_temperature, bool) or not isinstance(ood_temperature, (int, float)) or not ood_temperature > 0:
            raise ValueError(f"`ood_temperature` must be a positive number, got {ood_temperature!r}.")
        if not isinstance(wild_loss_weight, (int, float)) or wild_loss_weight < 0:
            raise ValueError(f"`wild_loss_weight` must be a number >= 0, got {wild_loss_weight!r}.")
        if isinstance(calibration_batch_size, bool) or not isinstance(calibration_batch_size, int) or calibration_batch_size < 1:
            raise ValueError(f"`calibration_batch_size` must be a positive integer, got {calibration_batch_size!r}.")
        if embedding_dim is not None and (isinstance(embedding_dim, bool) or not isinstance(embedding_dim, int) or embedding_dim < 1):
            raise ValueError(f"`embedding_dim` must be a positive integer, got {embedding_dim!r}.")
        self.ood_score_kwargs = dict(ood_score_kwargs or {})
        self.ratio_calibration = ratio_calibration
        self.ood_temperature = float(ood_temperature)
        self.threshold_split = threshold_split
        self.wild_loss_weight = float(wild_loss_weight)
        self.calibration_batch_size = calibration_batch_size
        self.save_path = save_path
        self._embedding_layer_arg = embedding_layer
        self.embedding_layer: str | None = None
        self.ood_head: nn.Module | None = None
        self._detector: Any = None
        self.register_buffer("maha_means", torch.empty(0))
        self.register_buffer("maha_precision", torch.empty(0))
        self.register_buffer("ratio_reference", torch.empty(0))
        self.register_load_state_dict_pre_hook(_resize_buffers_hook)
        self._reset_calibration()
        self.seen_inliers = 0.0
        self.seen_wild = 0.0
        self.odds_correction = 1.0
        #: the last evaluation's curves per stage (``metrics.plot_curve(c["rejection_rate"], c["risk"], path)``)
        self.curves: dict[str, dict[str, torch.Tensor]] = {}
        self.set_rule(estimator=estimator, c_fn=c_fn, rejection_budget=rejection_budget, ood_score=ood_score,
                      inlier_share=inlier_share, _init=True)
        if self.estimator == "loss_based":
            dim = embedding_dim or getattr(model, "embedding_dim", None)
            self.ood_head = nn.Linear(dim, 1) if isinstance(dim, int) else nn.LazyLinear(1)
        self.test_scod = SCODRisk(c_fn=self.c_fn, budgets=budgets, grid=grid)
        self.test_inlier_rc = RiskCoverage()
        self.test_rejection_rate = MeanMetric()
        self.test_cost, self.test_accepted = SumMetric(), SumMetric()
        self.val_scod = SCODRisk(c_fn=self.c_fn, budgets=budgets, grid=grid)
        self.val_inlier_rc = RiskCoverage()
        self.val_rejection_rate = MeanMetric()
        self.val_cost, self.val_accepted = SumMetric(), SumMetric()

    # -- configuration -------------------------------------------------------------------------------------------
    def set_rule(
        self,
        estimator: str | None = None,
        c_fn: float | None = None,
        rejection_budget: float | None = None,
        ood_score: str | None = None,
        inlier_share: float | None | Literal["keep"] = "keep",
        _init: bool = False,
    ) -> SelectiveOODModule:
        """Change the rule (any argument left out is kept) and mark the module uncalibrated; returns ``self``.

        The backbone (and the wild head) are kept: every estimator but ``loss_based`` is post hoc, so one trained
        module evaluates them all; ``loss_based`` needs a module trained with it.
        """
        estimator = getattr(self, "estimator", None) if estimator is None else estimator
        if estimator not in ESTIMATORS:
            raise ValueError(f"`estimator` must be one of {ESTIMATORS}, got {estimator!r}.")
        if estimator == "loss_based" and not _init and self.ood_head is None:
            raise ValueError(
                "`estimator='loss_based'` needs the inlier-vs-wild head trained with the backbone (Algorithm 1): build "
                "the module with estimator='loss_based' and fit it on a datamodule with a wild set."
            )
        c_fn = self.c_fn if c_fn is None else c_fn
        c_fn = _check_fraction(c_fn, "c_fn", "It is the cost of accepting an OOD input (0: plain selective classification).")
        budget = self.rejection_budget if rejection_budget is None else rejection_budget
        budget = _check_fraction(budget, "rejection_budget", "It is the fraction of the test mixture to reject.")
        ood_score = _check_ood_score(self.ood_score if ood_score is None else ood_score)
        share = getattr(self, "inlier_share", None) if inlier_share == "keep" else inlier_share
        if share is not None:
            share = _check_fraction(share, "inlier_share", "It is the inlier share of the test mixture (None: estimate it).", low_open=True)
        needs_embedding = estimator == "loss_based" or (estimator in ("black_box", "sirc", "ood_score") and ood_score in ("feature_norm", "mahalanobis"))
        if needs_embedding:
            self.embedding_layer = default_embedding_layer(self.model, self._embedding_layer_arg)
        if ood_score.startswith("pytorch_ood:") and estimator in ("black_box", "sirc", "ood_score"):
            self._detector = self._build_detector(ood_score)
        self.estimator, self.c_fn, self.rejection_budget = estimator, c_fn, budget
        self.ood_score, self.inlier_share = ood_score, share
        for name in ("test_scod", "val_scod"):
            if hasattr(self, name):
                getattr(self, name).c_fn = c_fn
        self._reset_calibration()
        return self

    def _build_detector(self, ood_score: str) -> Any:
        name = ood_score.split(":", 1)[1]
        try:
            detectors = importlib.import_module("pytorch_ood.detector")
        except ImportError as err:
            raise ValueError(f"`ood_score={ood_score!r}` needs pytorch-ood (`pip install pytorch-ood`).") from err
        cls = getattr(detectors, name, None)
        if cls is None:
            raise ValueError(f"`ood_score={ood_score!r}`: pytorch_ood.detector has no class {name!r}.")
        return cls(self.model, **self.ood_score_kwargs)

    def _reset_calibration(self) -> None:
        self.calibrated = False
        self.threshold = float("nan")
        self.inlier_share_used = float("nan")
        self.ratio_a, self.ratio_b, self.pi_mix = 1.0, 0.0, 0.0
        self.sirc_a, self.sirc_b = 0.0, 1.0

    @property
    def uses_ratio(self) -> bool:
        return self.estimator in ("black_box", "loss_based")

    def _datamodule(self) -> Any:
        return self.trainer.datamodule if self._trainer is not None else None

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = self._datamodule()
        has_wild = bool(getattr(dm, "has_wild", False))
        if stage == "fit" and self.estimator == "loss_based" and not has_wild:
            raise ValueError(
                "`estimator='loss_based'` trains an inlier-vs-wild head and needs an unlabelled wild set: use "
                "datamodules.OODDataModule (wild_fraction > 0), or a datamodule with `has_wild = True` whose training "
                "batches are [x, y, x_wild]. Without wild data use estimator='black_box'."
            )
        if dm is not None and not has_wild and stage in ("fit", "test", "predict"):
            if self.estimator == "black_box" and self.ratio_calibration == "wild":
                raise ValueError("`ratio_calibration='wild'` needs a wild set in the datamodule; use 'inlier' without one.")
            if self.threshold_split == "wild":
                raise ValueError("`threshold_split='wild'` needs a wild set in the datamodule; use 'test' without one.")
        if self.embedding_layer is not None:
            input_shape = getattr(dm, "input_shape", None)
            if input_shape is not None:  # the layer must run in forward; also materialises a lazy wild head
                param = next(self.model.parameters())
                probe = torch.zeros(2, *input_shape, device=param.device, dtype=param.dtype)
                was_training = self.training
                self.eval()
                try:
                    with torch.no_grad():
                        self._outputs(probe)
                finally:
                    self.train(was_training)

    def configure_optimizers(self) -> Any:
        if self.ood_head is not None and any(isinstance(p, nn.parameter.UninitializedParameter) for p in self.ood_head.parameters()):
            raise ValueError(
                "The wild head of `estimator='loss_based'` does not know the embedding width: pass `embedding_dim`, or "
                "use a datamodule with `input_shape` (or a backbone with an `embedding_dim` attribute)."
            )
        return super().configure_optimizers()

    # -- forward passes --------------------------------------------------------------------------------------------
    def _outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits, and the embedding and the wild head's logit where the rule needs them."""
        if self.embedding_layer is None:
            return {"logits": self.model(x)}
        logits, emb = forward_with_embedding(self.model, self.embedding_layer, x)
        out = {"logits": logits, "embedding": emb}
        if self.ood_head is not None:
            out["wild_logit"] = self.ood_head(emb).squeeze(-1)
        return out

    def _ood(self, out: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The raw OOD score ``s`` (higher = more OOD) of ``ood_score``."""
        name = self.ood_score
        if name == "msp":
            return msp_score(out["logits"])
        if name == "max_logit":
            return max_logit_score(out["logits"])
        if name == "energy":
            return energy_score(out["logits"])
        if name == "feature_norm":
            return feature_norm_score(out["embedding"])
        if name == "mahalanobis":
            if self.maha_means.numel() == 0:
                raise ValueError("`ood_score='mahalanobis'` is not fitted: call `calibrate(...)` (fit does it).")
            return mahalanobis_score(out["embedding"], self.maha_means, self.maha_precision)
        return self._detector.predict(x).to(out["logits"].dtype).flatten()

    def signals(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per input: ``pred``, ``max_prob``, ``max_logit``, ``energy``, ``ood`` (the rule's OOD score, if it uses
        one) and ``wild_logit`` (``loss_based``): everything any rule's score is computed from."""
        out = self._outputs(x)
        logits = out["logits"].float()
        prob = logits.softmax(-1)
        sig = {
            "pred": prob.argmax(-1),
            "max_prob": prob.amax(-1),
            "max_logit": max_logit_score(logits),
            "energy": energy_score(logits),
        }
        if self.estimator in ("black_box", "sirc", "ood_score"):
            sig["ood"] = self._ood(out, x).float()
        if "wild_logit" in out:
            sig["wild_logit"] = out["wild_logit"].float()
        return sig

    def rho(self, sig: dict[str, torch.Tensor]) -> torch.Tensor:
        """The estimated density ratio ``P_out / P_in`` of each input (``black_box`` / ``loss_based``)."""
        if self.estimator == "black_box" and self.ratio_calibration == "mixture":
            if self.ratio_reference.numel() == 0:
                raise ValueError("The black-box density ratio is not calibrated: call `calibrate(...)` (fit does it).")
            return uniform_tilt(inlier_cdf(sig["ood"], self.ratio_reference), self.ratio_a)
        signal = sig["wild_logit"] if self.estimator == "loss_based" else sig["ood"]
        return density_ratio(signal, self.ratio_a, self.ratio_b, self.pi_mix)

    def rule_score(self, sig: dict[str, torch.Tensor], inlier_share: float | None = None) -> torch.Tensor:
        """The reject score of the current estimator (higher = reject) from :meth:`signals`."""
        est = self.estimator
        if est == "msp":
            return 1 - sig["max_prob"]
        if est == "max_logit":
            return sig["max_logit"]
        if est == "energy":
            return sig["energy"]
        if est == "ood_score":
            return sig["ood"]
        if est == "sirc":
            return sirc_score(sig["max_prob"], sig["ood"], self.sirc_a, self.sirc_b)
        share = self.inlier_share_used if inlier_share is None else inlier_share
        return plugin_score(sig["max_prob"], self.rho(sig), self.c_fn, share)

    # -- calibration -------------------------------------------------------------------------------------------------
    def _signals_of(self, data: Dataset | DataLoader) -> dict[str, torch.Tensor]:
        keys: list[str] = []

        def one_batch(batch: Any) -> tuple[torch.Tensor, ...]:
            x = move_data_to_device(batch[0] if isinstance(batch, (list, tuple)) else batch, self.device)
            sig = self.signals(x)
            keys[:] = list(sig)
            return tuple(v.float() if k != "pred" else v for k, v in sig.items())

        values = map_in_order(data, one_batch, self.calibration_batch_size)
        values = (values,) if isinstance(values, torch.Tensor) else values
        return dict(zip(keys, values))

    def _fit_scores(self, train: Dataset | DataLoader) -> None:
        if self.estimator not in ("black_box", "sirc", "ood_score"):
            return
        if self.ood_score == "mahalanobis":

            def one_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
                x, y = move_data_to_device((batch[0], batch[1]), self.device)
                return self._outputs(x)["embedding"].float(), hard_targets(y)

            emb, y = map_in_order(train, one_batch, self.calibration_batch_size)
            self.maha_means, self.maha_precision = fit_mahalanobis(emb, y, self.num_classes)
        elif self._detector is not None and getattr(self._detector, "requires_fit", False):
            # every rank fits on the whole split (same data, same result): no gather needed
            loader = train if isinstance(train, DataLoader) else DataLoader(train, batch_size=self.calibration_batch_size)
            self._detector.fit(loader)

    @torch.no_grad()
    def calibrate(
        self,
        train: Dataset | DataLoader | None = None,
        heldout: Dataset | DataLoader | None = None,
        wild: Dataset | DataLoader | None = None,
        threshold_data: Dataset | DataLoader | None = None,
        datamodule: Any = None,
    ) -> dict[str, float]:
        """Fit the rule's statistics and its threshold; returns what was calibrated.

        Args:
            train: labelled inliers (Mahalanobis / pytorch-ood statistics); default ``datamodule.dataset("train")``.
            heldout: strictly-inlier held-out inputs (density-ratio scale, ``pi_mix``, SIRC); default ``"val"``.
            wild: the unlabelled wild mixture (``ratio_calibration="wild"``, ``threshold_split="wild"``).
            threshold_data: the unlabelled mixture the threshold and an estimated ``inlier_share`` come from;
                default the ``threshold_split`` of the datamodule.
            datamodule: where missing splits come from (default: the Trainer's).

        Every pass is split across DDP ranks and gathered in dataset order (:func:`map_in_order`); all ranks
        compute the same numbers.
        """
        dm = datamodule if datamodule is not None else self._datamodule()

        def split(name: str, given: Any) -> Any:
            if given is not None:
                return given
            if dm is not None and callable(getattr(dm, "dataset", None)):
                return dm.dataset(name)
            raise ValueError(
                f"SelectiveOODModule.calibrate needs the {name!r} split: pass it (e.g. `calibrate({'heldout' if name == 'val' else name}=...)`) "
                "or a datamodule with `dataset(split)` (datamodules.OODDataModule)."
            )

        was_training = self.training
        self.eval()
        try:
            if self.estimator in ("black_box", "sirc", "ood_score") and (
                self.ood_score == "mahalanobis" or getattr(self._detector, "requires_fit", False)
            ):
                self._fit_scores(split("train", train))
            self._reset_calibration()
            if self.estimator in ("black_box", "loss_based", "sirc"):
                sig_h = self._signals_of(split("val", heldout))
                if self.estimator == "sirc":
                    s2 = -sig_h["ood"].double()
                    std = float(s2.std().clamp_min(1e-12))
                    self.sirc_a, self.sirc_b = float(s2.mean()) - 3 * std, 1.0 / std
                elif self.estimator == "loss_based":
                    self.ratio_a, self.ratio_b = 1.0, math.log(self._odds_correction())
                    w = torch.exp(sig_h["wild_logit"].double() + self.ratio_b)
                    self.pi_mix = float(w.median().clamp(0.0, 0.999))
                elif self.ratio_calibration == "mixture":  # the slope is fitted on the threshold split below
                    self.ratio_reference = sig_h["ood"].float().sort().values
                elif self.ratio_calibration == "inlier":
                    # scale-free: s in units of its held-out inlier std (raw Mahalanobis / energy scores grow with
                    # the embedding's width; their sample mean of exp(s) is dominated by the largest inlier score)
                    std = float(sig_h["ood"].double().std().clamp_min(1e-12))
                    self.ratio_a = 1.0 / (self.ood_temperature * std)
                    self.ratio_b = -_logmeanexp(self.ratio_a * sig_h["ood"])
                else:
                    sig_w = self._signals_of(split("wild", wild))
                    self.ratio_a, self.ratio_b = _fit_logistic_1d(sig_w["ood"], sig_h["ood"])
                    w = torch.exp(self.ratio_a * sig_h["ood"].double() + self.ratio_b)
                    self.pi_mix = float(w.median().clamp(0.0, 0.999))
            sig_t = self._signals_of(split(self.threshold_split, threshold_data))
            share, tilt_share = 1.0, None
            if self.estimator == "black_box" and self.ratio_calibration == "mixture":
                u = inlier_cdf(sig_t["ood"], self.ratio_reference)
                self.ratio_a, tilt_share = fit_tilt_slope(u, len(self.ratio_reference))
            if self.uses_ratio:
                share = self.inlier_share
                if share is None:  # the tilt's anchor estimate, or maximum likelihood given the ratio
                    share = tilt_share if tilt_share is not None else estimate_inlier_share(self.rho(sig_t))
                # an estimate of 0 would make S = c_fn (constant); keep a sliver of inliers
                share = max(share, 1e-3)
            self.inlier_share_used = share
            scores = self.rule_score(sig_t)
            self.threshold = budget_threshold(scores, self.rejection_budget)
            self.calibrated = True
        finally:
            self.train(was_training)
        info = self.calibration
        rank_zero_info(f"SelectiveOODModule calibrated ({self.estimator}, c_fn={self.c_fn}): {info}")
        return info

    def _odds_correction(self) -> float:
        """``n_in / n_wild`` of the training batches seen by this run, summed over ranks (1 for balanced batches).

        Only the ratio matters, so the per-rank counts are not saved: a resumed run counts its own batches, and
        a run without training steps keeps the ratio of the checkpoint it started from.
        """
        counts = torch.tensor([self.seen_inliers, self.seen_wild], dtype=torch.float64, device=self.device)
        if world()[0] > 1:
            dist.all_reduce(counts)
        if counts[1] > 0:
            self.odds_correction = float(counts[0] / counts[1])
        return self.odds_correction

    @property
    def calibration(self) -> dict[str, float]:
        """What calibration set: threshold, the inlier share used, ``pi_mix``, density-ratio and SIRC parameters."""
        return {
            "threshold": self.threshold,
            "inlier_share": self.inlier_share_used,
            "pi_mix": self.pi_mix,
            "ratio_a": self.ratio_a,
            "ratio_b": self.ratio_b,
            "sirc_a": self.sirc_a,
            "sirc_b": self.sirc_b,
        }

    def _require_calibration(self, when: str) -> None:
        if self.calibrated:
            return
        dm = self._datamodule()
        if dm is not None and callable(getattr(dm, "dataset", None)):
            rank_zero_warn(f"SelectiveOODModule is not calibrated: calibrating on the datamodule before {when}.")
            self.calibrate(datamodule=dm)
            return
        raise ValueError(
            f"SelectiveOODModule is not calibrated ({when}): fit it, or call `calibrate(train=..., heldout=..., "
            "threshold_data=...)` first."
        )

    # -- Lightning hooks: training, calibration, evaluation -------------------------------------------------------
    def training_loss(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.estimator != "loss_based":
            return super().training_loss(batch)
        if not isinstance(batch, (list, tuple)) or len(batch) < 3:
            raise ValueError(
                "`estimator='loss_based'` needs training batches [x, y, x_wild] (labelled inliers and wild inputs), "
                "as datamodules.OODDataModule yields."
            )
        x, y, x_wild = batch[0], batch[1], batch[2]
        if x_wild.ndim == x.ndim + 1:  # (B, k, ...): k wild inputs per inlier
            x_wild = x_wild.flatten(0, 1)
        out = self._outputs(torch.cat([x, x_wild]))
        logits, wild_logit = out["logits"][: len(x)], out["wild_logit"]
        # Algorithm 1: CE on the labelled inliers + logistic loss of inlier (0) vs wild (1), averaged over the union
        is_wild = torch.cat([torch.zeros(len(x)), torch.ones(len(x_wild))]).to(wild_logit)
        loss = self.loss(logits, y) + self.wild_loss_weight * F.binary_cross_entropy_with_logits(wild_logit, is_wild)
        self.seen_inliers += len(x)
        self.seen_wild += len(x_wild)
        return loss, logits, y

    def _nothing_to_train(self) -> bool:
        trainer = self.trainer
        return trainer.max_epochs == 0 or trainer.max_steps == 0 or trainer.limit_train_batches == 0

    def on_fit_start(self) -> None:
        if self._nothing_to_train():
            self._calibrate_after_fit()

    def on_train_end(self) -> None:
        # not `on_fit_end`: by then the strategy has torn down (model moved to CPU)
        self._calibrate_after_fit()

    def _calibrate_after_fit(self) -> None:
        dm = self._datamodule()
        if dm is None or not callable(getattr(dm, "dataset", None)):
            rank_zero_warn(
                "SelectiveOODModule was fit without a datamodule that has `dataset(split)`: the rule is not calibrated. "
                "Call `calibrate(train=..., heldout=..., threshold_data=...)` before predicting."
            )
            return
        self.calibrate()
        if self.save_path:
            self.trainer.save_checkpoint(self.save_path)

    def on_test_start(self) -> None:
        self._require_calibration("test")

    def on_predict_start(self) -> None:
        self._require_calibration("predict")

    def evaluate(self, batch: Any, stage: str) -> None:
        """Inlier batches ``[x, y]``: accuracy; mixture batches ``[x, y, is_ood]``: SCOD metrics too (once calibrated)."""
        if len(batch) < 3:
            self.update_eval_metrics(self(batch[0]), batch[1], stage)
            return
        x, y, is_ood = batch[0], batch[1], batch[2].bool()
        inl = ~is_ood
        if not self.calibrated:  # during fit: the rule is calibrated when training ends; inlier accuracy only
            if inl.any():
                getattr(self, f"{stage}_acc").update(self(x[inl]), y[inl])
            return
        sig = self.signals(x)
        score = self.rule_score(sig).float()
        if inl.any():
            getattr(self, f"{stage}_acc").update(sig["pred"][inl], y[inl])
            getattr(self, f"{stage}_inlier_rc").update(score[inl], sig["pred"][inl], y[inl])
        target = torch.where(is_ood, torch.zeros_like(y), y)
        getattr(self, f"{stage}_scod").update(score, sig["pred"], target, is_ood)
        reject = score > self.threshold
        getattr(self, f"{stage}_rejection_rate").update(reject.float())
        accepted = ~reject
        wrong = accepted & inl & (sig["pred"] != y)
        cost = (1 - self.c_fn) * wrong.float() + self.c_fn * (accepted & is_ood).float()
        getattr(self, f"{stage}_cost").update(cost.sum())
        getattr(self, f"{stage}_accepted").update(accepted.float().sum())

    def _log_mixture(self, stage: str) -> None:
        scod = self.log_metric(f"{stage}_scod")
        rc = self.log_metric(f"{stage}_inlier_rc")
        curves = {}
        if scod is not None:
            curves.update(rejection_rate=scod["rejection_rate"], risk=scod["risk"])
        if rc is not None:
            curves.update(inlier_coverage=rc["coverage"], inlier_risk=rc["risk"])
        self.curves[stage] = curves
        self.log_metric(f"{stage}_rejection_rate", prog_bar=False)
        cost, accepted = getattr(self, f"{stage}_cost"), getattr(self, f"{stage}_accepted")
        if accepted.update_count:
            self.log_global(f"{stage}_risk", cost.compute() / accepted.compute().clamp_min(1))
        cost.reset()
        accepted.reset()

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self._log_mixture("val")

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self._log_mixture("test")

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"pred", "abstain", "score"}`` for a batch of inputs (the module must be calibrated)."""
        self._require_calibration("predict")
        was_training = self.training
        self.eval()
        try:
            sig = self.signals(x)
            score = self.rule_score(sig).float()
        finally:
            self.train(was_training)
        return {"pred": sig["pred"], "abstain": score > self.threshold, "score": score}

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self.predict(x)

    # -- state -----------------------------------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {
            "rule": {"estimator": self.estimator, "c_fn": self.c_fn, "rejection_budget": self.rejection_budget,
                     "ood_score": self.ood_score, "inlier_share": self.inlier_share},
            "calibrated": self.calibrated,
            **self.calibration,
            "inlier_share_used": self.inlier_share_used,
            "odds_correction": self.odds_correction,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.odds_correction = float(state["odds_correction"])
        rule = state["rule"]
        current = {"estimator": self.estimator, "c_fn": self.c_fn, "rejection_budget": self.rejection_budget,
                   "ood_score": self.ood_score, "inlier_share": self.inlier_share}
        if not state["calibrated"]:
            self._reset_calibration()
            return
        if rule != current:
            rank_zero_warn(
                f"The checkpoint was calibrated for {rule}, this module is configured for {current}: its threshold "
                "does not apply; the module is left uncalibrated (call `calibrate`)."
            )
            self._reset_calibration()
            return
        for key in ("threshold", "pi_mix", "ratio_a", "ratio_b", "sirc_a", "sirc_b", "inlier_share_used"):
            setattr(self, key, float(state[key]))
        self.calibrated = True
