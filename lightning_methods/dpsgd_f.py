"""DPSGD-F: differentially private SGD with private feature preprocessing, on Opacus, for Lightning.

Paper: Ziteng Sun, Ananda Theertha Suresh, Aditya Krishna Menon. *The importance of feature preprocessing for
differentially private linear optimization.* ICLR 2024, arXiv:2307.11106.

The paper shows (Sec. 3) that DP-SGD's excess risk on linear classification scales with the *maximum* feature
norm ``R``: on ``x = mu e1 +- e2`` with ``mu`` large, clipping plus noise calibrated to ``R`` drowns the ``+-e2``
signal. DPSGD-F (Sec. 4, Algorithm 2; the experiments' variant, Sec. 5) first spends a small part of the budget on
private preprocessing so that the excess risk scales with the *diameter* of the data instead:

1. normalise each example to unit norm (per-example and data independent: free);
2. private mean ``mu_hat = (sum_i clip(x_i, R) + N(0, (z_mean R)^2 I)) / n`` (Gaussian mechanism);
3. private radius ``tau_hat``: a DP quantile of ``||x_i - mu_hat||`` read from a Gaussian-noised histogram on a
   geometric grid (sensitivity 1: one example moves one bin count by one);
4. centre and rescale ``x_tilde = clip((x - mu_hat) / tau_hat, 1)``;
5. DP-SGD (per-example clipping to ``max_grad_norm``, Gaussian noise, Poisson sampling) on ``x_tilde`` with the
   rest of the budget.

The transform is a buffer-only submodule (:class:`FeaturePreprocessor`) saved with the weights, so
``module(raw_x)`` (or the plain ``nn.Sequential`` from :meth:`DPSGDFModule.export`) runs inference on raw inputs in
one call. ``preprocess=False`` skips steps 1-4 and is plain DP-SGD on exactly the same code path (the baseline).

Privacy accounting (add/remove adjacency, as Opacus). The two preprocessing releases are Gaussian mechanisms and
are entered into Opacus' accountant as full-batch events ``(noise_multiplier, sample_rate=1, steps=1)`` next to
the Poisson-subsampled SGD steps, so one accountant (RDP or PRV) composes everything. The budget split is set in
zero-concentrated DP, the natural currency of Gaussian mechanisms: preprocessing gets
``preprocessing_budget_fraction`` of ``rho(target_epsilon, delta)`` (``eps = rho + 2 sqrt(rho log(1/delta))``,
Bun & Steinke 2016), split between mean and radius by ``mean_budget_share``; the SGD noise multiplier is then
calibrated so that the *composed* total meets ``(target_epsilon, delta)``. The dataset size ``n`` is treated as
public, as Opacus does (it divides by the expected batch size ``q n``).

Lightning integration (written against ``lightning.pytorch``, not ``opacus.lightning``):

* Poisson sampling: the training loader of the datamodule is replaced by a :class:`PoissonDataLoader` (Opacus'
  ``DPDataLoader`` with a per-rank shard); each example of the dataset is drawn independently with probability
  ``q = 1 / len(user_loader)`` at every step, empty batches included.
* DDP: per-sample gradients (Opacus ``GradSampleModule`` hooks, built in ``configure_model`` so ``ddp_spawn`` works)
  are clipped on every rank, the clipped sums are all-reduced once by Opacus' ``DistributedDPOptimizer`` and the
  noise is added on rank 0 only, so replicas stay bit-identical; DDP's own (redundant) gradient all-reduce is
  switched off with ``no_sync``. The global expected batch is the same as on one device, so the epsilon is too.
* The accountant's history lives in the module's ``state_dict`` (``privacy_ledger._extra_state``): checkpoints
  carry it, a resumed run reports the same epsilon, and the module never takes a step that would exceed
  ``target_epsilon`` (:class:`callbacks.PrivacyBudget`, added automatically, stops training gracefully).
* Everything that would void the guarantee is refused before the first step: gradient accumulation, Lightning's
  gradient clipping, layers without per-example gradients (BatchNorm, ...), loaders whose sampling cannot be made
  Poisson, ``delta >= 1/n``.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from opacus.accountants import create_accountant
from opacus.data_loader import DPDataLoader, dtype_safe, shape_safe, wrap_collate_with_empty
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DistributedDPOptimizer, DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, RandomSampler, SequentialSampler, Subset
from torch.utils.data._utils.collate import default_collate

from lightning_methods._utils import check_model_against_data, check_targets, save_hparams
from lightning_methods.classifier import ClassifierModule, hard_targets

__all__ = [
    "DPSGDFModule",
    "FeaturePreprocessor",
    "PoissonDataLoader",
    "PrivacyLedger",
    "calibrate_noise_multiplier",
    "noisy_histogram",
    "private_mean",
    "private_radius",
    "radius_grid",
    "zcdp_rho",
]

Mechanism = Literal["rdp", "prv"]

#: the radius grid: ``max_radius * ratio**-j`` for j = 0..size-1, plus a bin down to 0. sqrt(2) steps are fine
#: enough (the rescale only needs tau up to a constant) and coarse enough that few noisy bins are summed.
GRID_RATIO = math.sqrt(2.0)
GRID_SIZE = 24


# ---------------------------------------------------------------------------------------------------------------
# Accounting: budget split in zCDP, composition through Opacus' accountants
# ---------------------------------------------------------------------------------------------------------------
def zcdp_rho(epsilon: float, delta: float) -> float:
    """The zCDP ``rho`` whose standard conversion gives ``(epsilon, delta)``: ``eps = rho + 2 sqrt(rho log(1/delta))``.

    Bun & Steinke 2016, Prop. 1.3. A Gaussian mechanism with noise multiplier ``z`` is ``1 / (2 z^2)``-zCDP, so
    ``rho`` shares translate directly into noise multipliers.
    """
    log_inv_delta = math.log(1.0 / delta)
    root = math.sqrt(log_inv_delta + epsilon) - math.sqrt(log_inv_delta)
    return root * root


def preprocessing_noise(
    target_epsilon: float, delta: float, fraction: float, mean_share: float
) -> tuple[float, float]:
    """Noise multipliers ``(z_mean, z_radius)`` of the two preprocessing releases for a budget ``fraction``.

    Preprocessing gets ``fraction * rho(target_epsilon, delta)``; the mean gets ``mean_share`` of that and the
    radius histogram the rest. Each release with noise multiplier ``z`` costs ``1 / (2 z^2)``.
    """
    rho = fraction * zcdp_rho(target_epsilon, delta)
    return 1.0 / math.sqrt(2.0 * mean_share * rho), 1.0 / math.sqrt(2.0 * (1.0 - mean_share) * rho)


def _merge(history: Sequence[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    merged: list[tuple[float, float, int]] = []
    for z, q, steps in history:
        if steps <= 0:
            continue
        if merged and merged[-1][0] == z and merged[-1][1] == q:
            merged[-1] = (z, q, merged[-1][2] + steps)
        else:
            merged.append((float(z), float(q), int(steps)))
    return merged


@functools.lru_cache(maxsize=1024)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """One step's RDP curve at Opacus' default orders (the expensive part: ~0.1 s for a subsampled Gaussian)."""
    from opacus.accountants.analysis.rdp import compute_rdp

    return np.asarray(compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=_RDP_ORDERS))


_RDP_ORDERS = create_accountant("rdp").DEFAULT_ALPHAS


@functools.lru_cache(maxsize=512)
def _epsilon_cached(history: tuple[tuple[float, float, int], ...], delta: float, mechanism: str) -> float:
    if not history:
        return 0.0
    if mechanism == "rdp":
        # exactly Opacus' RDPAccountant.get_epsilon (RDP adds up over steps), with each step's curve cached so that
        # calibration and the budget search do not recompute it for every candidate step count
        from opacus.accountants.analysis.rdp import get_privacy_spent

        rdp = sum(_rdp_per_step(z, q) * steps for z, q, steps in history)
        epsilon, _ = get_privacy_spent(orders=_RDP_ORDERS, rdp=rdp, delta=delta)
        return float(epsilon)
    accountant = create_accountant(mechanism)
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta))


def epsilon_of(history: Sequence[tuple[float, float, int]], delta: float, mechanism: Mechanism = "rdp") -> float:
    """Epsilon of a composition of (subsampled) Gaussian mechanisms ``(noise_multiplier, sample_rate, steps)``."""
    return _epsilon_cached(tuple(_merge(history)), float(delta), mechanism)


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    prior_history: Sequence[tuple[float, float, int]] = (),
    mechanism: Mechanism = "rdp",
    rel_tolerance: float = 0.005,
) -> float:
    """The smallest SGD noise multiplier (to ``rel_tolerance``) whose composition with ``prior_history`` meets the target.

    Like Opacus' ``get_noise_multiplier``, but the composed total includes earlier releases (here: the private
    preprocessing). The returned multiplier always satisfies ``epsilon <= target_epsilon``.
    """
    if epsilon_of(prior_history, delta, mechanism) >= target_epsilon:
        raise ValueError(
            f"The preprocessing alone spends the whole `target_epsilon={target_epsilon}`: lower "
            "`preprocessing_budget_fraction`."
        )

    def eps(z: float) -> float:
        return epsilon_of([*prior_history, (z, sample_rate, steps)], delta, mechanism)

    lo, hi = 0.0, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, 2.0 * hi
        if hi > 1e6:
            raise ValueError(f"No noise multiplier below 1e6 reaches target_epsilon={target_epsilon}.")
    for _ in range(60):
        if target_epsilon - eps(hi) <= rel_tolerance * target_epsilon or hi - lo < 1e-6:
            break
        mid = 0.5 * (lo + hi)
        if eps(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi


class PrivacyLedger(nn.Module):
    """Everything the privacy guarantee depends on, stored in the ``state_dict`` (no tensors: ``_extra_state``).

    Holds the accountant's history (a list of ``(noise_multiplier, sample_rate, steps)`` Gaussian events, the
    preprocessing releases first), the calibrated SGD noise multiplier, the sample rate and the seed of the DP
    randomness. Being module state, it travels in every checkpoint and in ``ddp_spawn``'s weight transfer, and a
    resumed run continues the same ledger, so it reports the same epsilon as an uninterrupted one.

    Args:
        mechanism: the Opacus accountant composing the events: ``"rdp"`` or ``"prv"``.
    """

    def __init__(self, mechanism: Mechanism = "rdp") -> None:
        super().__init__()
        if mechanism not in ("rdp", "prv"):
            raise ValueError(f"`accountant` must be 'rdp' or 'prv', got {mechanism!r}.")
        self.mechanism = mechanism
        self.reset()

    def reset(self) -> None:
        self.history: list[tuple[float, float, int]] = []
        self.noise_multiplier: float | None = None
        self.sample_rate: float | None = None
        self.planned_steps: int | None = None
        self.seed: int | None = None
        self.preprocessing_noise: tuple[float, float] | None = None
        self.steps = 0

    def record(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        self.history = _merge([*self.history, (noise_multiplier, sample_rate, steps)])

    def record_step(self) -> None:
        """One DP-SGD step at the current noise multiplier and sample rate."""
        assert self.noise_multiplier is not None and self.sample_rate is not None
        self.record(self.noise_multiplier, self.sample_rate, 1)
        self.steps += 1

    def epsilon(self, delta: float, extra_steps: int = 0) -> float:
        """Epsilon spent so far (plus ``extra_steps`` further SGD steps) at ``delta``."""
        history = list(self.history)
        if extra_steps:
            assert self.noise_multiplier is not None and self.sample_rate is not None
            history.append((self.noise_multiplier, self.sample_rate, extra_steps))
        return epsilon_of(history, delta, self.mechanism)

    def steps_within(self, epsilon: float, delta: float) -> int:
        """How many more SGD steps fit in ``epsilon`` (binary search; cheap for RDP, ~0.3 s an evaluation for PRV)."""
        if self.noise_multiplier is None or self.epsilon(delta) > epsilon:
            return 0
        lo, hi = 0, 1
        while self.epsilon(delta, hi) <= epsilon:
            lo, hi = hi, 2 * hi
            if hi > 10**9:
                return hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.epsilon(delta, mid) <= epsilon:
                lo = mid
            else:
                hi = mid
        return lo

    def get_extra_state(self) -> dict:
        return {
            "version": 1,
            "mechanism": self.mechanism,
            "history": [list(event) for event in self.history],
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "planned_steps": self.planned_steps,
            "seed": self.seed,
            "preprocessing_noise": list(self.preprocessing_noise) if self.preprocessing_noise else None,
            "steps": self.steps,
        }

    def set_extra_state(self, state: dict) -> None:
        if state.get("mechanism", self.mechanism) != self.mechanism:
            raise ValueError(
                f"The checkpoint's privacy ledger was kept with the {state['mechanism']!r} accountant but this module "
                f"uses `accountant={self.mechanism!r}`: resume with `accountant={state['mechanism']!r}`."
            )
        self.history = [(float(z), float(q), int(s)) for z, q, s in state["history"]]
        self.noise_multiplier = state["noise_multiplier"]
        self.sample_rate = state["sample_rate"]
        self.planned_steps = state["planned_steps"]
        self.seed = state["seed"]
        noise = state["preprocessing_noise"]
        self.preprocessing_noise = (float(noise[0]), float(noise[1])) if noise else None
        self.steps = int(state["steps"])

    def extra_repr(self) -> str:
        return f"mechanism={self.mechanism!r}, steps={self.steps}, noise_multiplier={self.noise_multiplier}"


# ---------------------------------------------------------------------------------------------------------------
# Private preprocessing (Sec. 4, Algorithm 2; Sec. 5)
# ---------------------------------------------------------------------------------------------------------------
def unit_normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` scaled to unit L2 norm (all-zero rows stay zero)."""
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def clip_rows(x: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Rows of ``x`` projected onto the L2 ball of radius ``max_norm``."""
    norms = x.norm(dim=1, keepdim=True)
    return x * (max_norm / norms.clamp_min(1e-12)).clamp(max=1.0)


def _gaussian(shape: Sequence[int], std: float, generator: torch.Generator | None) -> torch.Tensor:
    noise = torch.randn(*shape, generator=generator, dtype=torch.float64)
    return noise * std


def private_mean(
    clipped_sum: torch.Tensor, n: int, clip_norm: float, noise_multiplier: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Gaussian mechanism for the mean: ``(sum_i clip(x_i, R) + N(0, (z R)^2 I)) / n``.

    Under add/remove adjacency one example moves the clipped sum by at most ``R``, so noise ``z R`` costs
    ``1 / (2 z^2)`` zCDP. ``n`` is treated as public. ``noise_multiplier=0`` gives the exact clipped mean.
    """
    noise = _gaussian(clipped_sum.shape, noise_multiplier * clip_norm, generator) if noise_multiplier > 0 else 0.0
    return (clipped_sum.double() + noise) / max(int(n), 1)


def radius_grid(max_radius: float, size: int = GRID_SIZE, ratio: float = GRID_RATIO) -> torch.Tensor:
    """Bin edges ``[0, r_{size-1}, ..., r_1, r_0 = max_radius]``, ``r_j = max_radius * ratio**-j`` (ascending)."""
    upper = max_radius * ratio ** -torch.arange(size - 1, -1, -1, dtype=torch.float64)
    return torch.cat([torch.zeros(1, dtype=torch.float64), upper])


def noisy_histogram(
    counts: torch.Tensor, noise_multiplier: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Bin counts plus ``N(0, z^2)`` each: one example changes one count by one (L2 sensitivity 1)."""
    counts = counts.double()
    if noise_multiplier <= 0:
        return counts
    return counts + _gaussian(counts.shape, noise_multiplier, generator)


def histogram_counts(norms: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Counts of ``norms`` in the bins ``[edges[i], edges[i+1])`` (the last bin is closed; larger norms join it)."""
    index = torch.bucketize(norms.double().clamp(max=float(edges[-1])), edges[1:-1], right=True)
    return torch.bincount(index, minlength=len(edges) - 1).double()


def private_radius(
    noisy_counts: torch.Tensor, edges: torch.Tensor, n: int, quantile: float, noise_std: float = 0.0
) -> float:
    """The DP ``quantile`` of the norms from a noisy histogram: the smallest edge with at most ``(1-q) n`` above it.

    Post-processing of :func:`noisy_histogram` only. The edges are scanned downwards from the top of the grid and
    the scan stops at the first edge with too many examples beyond it, so noise in the (nearly full) cumulative
    counts far below the data cannot select a tiny radius. With exact counts the answer is the grid point just
    above the true quantile (an over-estimate by at most a factor ``GRID_RATIO``). With noise, the count beyond an
    edge sums ``k`` noisy bins (std ``noise_std * sqrt(k)``) and is accepted within two standard deviations of the
    target: the rule errs towards clipping a few more examples rather than towards a radius that noise pushed to
    the top of the grid, which would shrink every preprocessed feature (the expensive mistake for DP-SGD, whose
    noise does not shrink with them).
    """
    bins = len(noisy_counts)
    beyond = torch.flip(torch.cumsum(torch.flip(noisy_counts, [0]), 0), [0])  # beyond[i]: noisy count in bins >= i
    target = (1.0 - quantile) * n
    radius = float(edges[-1])  # nothing lies beyond the top edge
    for i in range(bins - 1, 0, -1):  # edges[i] is the upper edge of bin i - 1; bins i.. lie beyond it
        if float(beyond[i]) > target + 2.0 * noise_std * math.sqrt(bins - i):
            break
        radius = float(edges[i])
    return radius


class FeaturePreprocessor(nn.Module):
    """The fitted DPSGD-F transform ``x -> clip((normalize(x) - mu_hat) / tau_hat, 1)`` on flattened features.

    Buffers only (``mean``, ``radius``), so it is saved with the weights and needs no Opacus or Lightning at
    inference. Until fitted it applies the unit normalisation alone (``mean = 0``, ``radius = 1``); with
    ``unit_normalize=False`` and unfitted it is the identity.

    Args:
        unit_normalize: scale every example to unit norm first (DPSGD-F's step 1).
    """

    def __init__(self, unit_normalize: bool = True) -> None:
        super().__init__()
        self.unit_normalize = unit_normalize
        self.register_buffer("mean", torch.zeros(0))
        self.register_buffer("radius", torch.ones(()))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def set(self, mean: torch.Tensor, radius: float) -> None:
        self.mean = mean.detach().to(self.radius.device, torch.float32).flatten().clone()
        self.radius.fill_(float(radius))
        self.fitted.fill_(True)

    def normalize(self, flat: torch.Tensor) -> torch.Tensor:
        return unit_normalize(flat) if self.unit_normalize else flat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.fitted):
            return x if not self.unit_normalize else self.normalize(x.flatten(1)).view_as(x)
        flat = self.normalize(x.flatten(1))
        if flat.shape[1] != self.mean.numel():
            raise ValueError(
                f"FeaturePreprocessor was fitted on {self.mean.numel()} features but got inputs with {flat.shape[1]}."
            )
        return clip_rows((flat - self.mean) / self.radius, 1.0).view_as(x)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        # the mean's size is the feature dimension, known only once fitted: take it from the checkpoint
        key = prefix + "mean"
        if key in state_dict and state_dict[key].shape != self.mean.shape:
            self.mean = torch.empty_like(state_dict[key], device=self.radius.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"unit_normalize={self.unit_normalize}, fitted={bool(self.fitted)}"


# ---------------------------------------------------------------------------------------------------------------
# Poisson sampling: Opacus' DPDataLoader, sharded per DDP rank
# ---------------------------------------------------------------------------------------------------------------
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers with splitmix64 (cheap enough to call every step, platform independent)."""
    state = 0
    for part in parts:
        state = _splitmix64(state ^ (int(part) & _MASK64))
    return state >> 1


_SAMPLER_REFUSAL = (
    "Lightning tried to replace the Poisson sampler of DPSGDFModule's training loader (with "
    "`{sampler}`): DP-SGD's privacy analysis needs every example drawn independently with probability q. Under "
    "DDP set `Trainer(use_distributed_sampler=False)`: DPSGDFModule shards the data across ranks itself."
)


class _PoissonBatchSampler(UniformWithReplacementSampler):
    """Opacus' Poisson batch sampler over this rank's shard (``rank::world_size``), reseeded every epoch.

    Every rank yields exactly ``steps`` batches (possibly empty), so DDP ranks stay in lockstep (Opacus'
    ``DistributedUniformWithReplacementSampler`` skips a rank's empty batches, which desynchronises collectives).
    The union over ranks of independent ``q``-subsamples of disjoint shards is a ``q``-subsample of the dataset.
    """

    def __init__(
        self,
        sampler: Any = None,
        batch_size: Any = None,
        drop_last: bool = False,
        *,
        num_samples: int = 0,
        sample_rate: float = 0.0,
        steps: int = 0,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if sampler is not None:
            # Lightning re-instantiates custom batch samplers as `cls(sampler, batch_size=..., drop_last=...)` when it
            # injects a DistributedSampler (`use_distributed_sampler=True` under DDP): refuse, naming the fix.
            raise ValueError(_SAMPLER_REFUSAL.format(sampler=type(sampler).__name__))
        if num_samples <= rank:
            raise ValueError(f"The training set has {num_samples} examples, fewer than the {world_size} DDP ranks.")
        self.shard = torch.arange(rank, num_samples, world_size)
        super().__init__(num_samples=len(self.shard), sample_rate=sample_rate, generator=torch.Generator(), steps=steps)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        # attributes Lightning looks for to recognise a batch sampler it could re-instantiate (and then refuse above)
        self.batch_size, self.drop_last = None, False
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        # a fresh stream per (seed, epoch, rank): a run resumed at an epoch boundary draws the same batches
        self.generator.manual_seed(derive_seed(self.seed, 0, epoch, self.rank))

    def __iter__(self):
        for local in super().__iter__():
            yield self.shard[local].tolist()


class PoissonDataLoader(DPDataLoader):
    """Opacus' ``DPDataLoader`` whose Poisson sampler covers one DDP rank's shard and yields a fixed number of steps.

    Each step, every example of ``dataset`` enters the (global) batch independently with probability
    ``sample_rate``; under DDP rank ``r`` draws from examples ``r, r + W, ...``. Empty batches are kept (Opacus'
    collate wrapper builds zero-length tensors), as the privacy analysis requires.

    Build one from an ordinary loader with :meth:`from_loader`.

    Args:
        dataset: a map-style dataset.
        sample_rate: the probability ``q`` of drawing each example at each step.
        steps: batches per epoch (Opacus' default is ``int(1 / q)``).
        seed: seed of the sampling (mixed with the epoch and the rank).
        rank: this process' rank; ``world_size``: the number of processes.
        collate_fn: the collate function of the original loader.
        **kwargs: other ``DataLoader`` arguments (``num_workers``, ``pin_memory``, ...).
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        sample_rate: float,
        steps: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        collate_fn: Callable | None = None,
        **kwargs: Any,
    ) -> None:
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"`sample_rate` must be in (0, 1], got {sample_rate!r}.")
        if kwargs.pop("sampler", None) is not None or kwargs.pop("batch_sampler", None) is not None:
            raise ValueError(_SAMPLER_REFUSAL.format(sampler="sampler"))
        kwargs.pop("drop_last", None)
        kwargs.pop("batch_size", None)
        kwargs.pop("shuffle", None)
        steps = int(steps) if steps is not None else int(1.0 / sample_rate)
        batch_sampler = _PoissonBatchSampler(
            num_samples=len(dataset), sample_rate=sample_rate, steps=steps, seed=seed, rank=rank, world_size=world_size
        )
        first = dataset[0]
        collate = wrap_collate_with_empty(
            collate_fn=collate_fn or default_collate,
            sample_empty_shapes=[(0, *shape_safe(v)) for v in first],
            dtypes=[dtype_safe(v) for v in first],
        )
        # DPDataLoader.__init__ would build Opacus' own (unsharded) sampler: set the same attributes, our sampler
        DataLoader.__init__(self, dataset, batch_sampler=batch_sampler, collate_fn=collate, **kwargs)
        self.sample_rate = sample_rate
        self.distributed = world_size > 1
        self.seed = seed

    @classmethod
    def from_loader(
        cls, loader: DataLoader, *, seed: int = 0, rank: int = 0, world_size: int = 1, delta: float | None = None
    ) -> PoissonDataLoader:
        """The Poisson-sampled version of ``loader``: ``q = 1 / len(loader)`` (Opacus' convention), same data and collate.

        Refuses loaders whose sampling cannot be replaced without changing what the user asked for (an
        ``IterableDataset``, a custom or weighted sampler) and ``delta >= 1 / n``.
        """
        if isinstance(loader, PoissonDataLoader):
            if (loader.batch_sampler.rank, loader.batch_sampler.world_size) == (rank, world_size):
                return loader
            dataset, sample_rate, steps, collate = (
                loader.dataset, loader.sample_rate, len(loader.batch_sampler), loader.collate_fn.wrapped_collator_fn
            )
        else:
            if not isinstance(loader, DataLoader):
                raise TypeError(f"The training loader must be a torch DataLoader, got {type(loader).__name__}.")
            if isinstance(loader.dataset, IterableDataset):
                raise ValueError(
                    "DP-SGD needs Poisson sampling (every example drawn independently with probability q), which an "
                    f"IterableDataset ({type(loader.dataset).__name__}) cannot provide: use a map-style dataset "
                    "(with `__getitem__` and `__len__`)."
                )
            if isinstance(loader, DPDataLoader):
                sample_rate, steps = loader.sample_rate, len(loader)
            else:
                batch_sampler = loader.batch_sampler
                if batch_sampler is None or type(batch_sampler) is not BatchSampler or type(loader.sampler) not in (
                    SequentialSampler,
                    RandomSampler,
                ):
                    custom = type(batch_sampler if type(batch_sampler) is not BatchSampler else loader.sampler).__name__
                    raise ValueError(
                        f"The training loader draws its batches with a custom `{custom}`. DPSGDFModule replaces the "
                        "sampling with Poisson sampling (each example drawn independently with probability "
                        "q = batch_size / n), which the privacy analysis assumes, and would silently drop yours: build "
                        "the loader with `batch_size=` and plain `shuffle=` (put class weighting in the loss instead)."
                    )
                if loader.drop_last:
                    rank_zero_warn("`drop_last=True` is ignored: Poisson-sampled batches have random sizes.")
                sample_rate, steps = 1.0 / len(loader), len(loader)
            dataset, collate = loader.dataset, loader.collate_fn
        n = len(dataset)  # type: ignore[arg-type]
        if delta is not None and delta >= 1.0 / n:
            raise ValueError(
                f"`delta={delta}` is not below 1/n = {1.0 / n:.3g} for the n={n} training examples: such a delta "
                f"allows releasing a whole example. Use `delta < 1/n`, typically "
                f"`delta <= {10 ** math.floor(math.log10(0.1 / n)):.0e}`."
            )
        return cls(
            dataset,
            sample_rate=sample_rate,
            steps=steps,
            seed=seed,
            rank=rank,
            world_size=world_size,
            collate_fn=collate,
            num_workers=loader.num_workers,
            pin_memory=loader.pin_memory,
            timeout=loader.timeout,
            worker_init_fn=loader.worker_init_fn,
            multiprocessing_context=loader.multiprocessing_context,
            prefetch_factor=loader.prefetch_factor,
            persistent_workers=loader.persistent_workers,
        )


# ---------------------------------------------------------------------------------------------------------------
# The LightningModule
# ---------------------------------------------------------------------------------------------------------------
_FIXES = {
    "BatchNorm": "replace it with GroupNorm/LayerNorm (e.g. `nets.SmallCNN(norm='group')`, `nets.MLP(norm='layer')`)",
    "SyncBatchNorm": "replace it with GroupNorm/LayerNorm",
    "InstanceNorm": "set `track_running_stats=False`",
    "LSTM": "use `opacus.layers.DPLSTM`",
    "GRU": "use `opacus.layers.DPGRU`",
    "MultiheadAttention": "use `opacus.layers.DPMultiheadAttention`",
}


def check_private_layers(model: nn.Module, arg: str = "model") -> None:
    """Refuse layers without per-example gradients (Opacus' ``ModuleValidator``), naming each one and its fix.

    Checked on every submodule, trainable or not: a BatchNorm mixes the examples of a batch even when frozen.
    """
    problems = []
    for name, sub in model.named_modules():
        validator = ModuleValidator.VALIDATORS.get(type(sub))
        if validator is None or not validator(sub):
            continue
        kind = type(sub).__name__
        fix = next((f for key, f in _FIXES.items() if kind.startswith(key)), "see `opacus.validators.ModuleValidator.fix`")
        problems.append(f"`{arg}.{name or '<root>'}` ({kind}): {fix}")
    if problems:
        raise ValueError(
            f"`{arg}` has layers Opacus cannot compute per-example gradients for, so DP-SGD cannot train it:\n  "
            + "\n  ".join(problems)
            + "\n`opacus.validators.ModuleValidator.fix(model)` replaces them automatically."
        )
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"`{arg}` has no trainable parameters: nothing for DP-SGD to train.")


class DPSGDFModule(ClassifierModule):
    """Differentially private training with private feature preprocessing (DPSGD-F), or plain DP-SGD.

    ``forward(x) = model(preprocessor(feature_extractor(x)))``: the frozen ``feature_extractor`` (optional,
    pretrained on *other* data: the paper's pretrained-features setting) maps raw inputs to features; the
    :class:`FeaturePreprocessor` applies the privately fitted unit-norm / centre / rescale transform; ``model``
    (typically a linear head, ``nets.MLP(hidden_sizes=[])``) is trained by DP-SGD. The preprocessing is fitted at
    the start of ``fit`` on the training set (gathered across DDP ranks) and saved in the ``state_dict``.

    Paper: Sun, Suresh, Menon, *The importance of feature preprocessing for differentially private linear
    optimization*, ICLR 2024 (arXiv:2307.11106): Algorithm 2 (DPSGD-F) and Sec. 5 (unit normalisation first).

    Args:
        model: the trainable network on (preprocessed) features; no BatchNorm or other layer Opacus cannot handle.
        num_classes: number of classes (the CLI links it from the datamodule).
        target_epsilon: the total privacy budget (preprocessing + all SGD steps).
        delta: the target delta; must be below ``1/n``.
        max_grad_norm: per-example gradient clipping norm ``C``; the SGD noise std is ``noise_multiplier * C``.
        preprocess: DPSGD-F's private preprocessing; ``False`` gives plain DP-SGD on the same code path.
        preprocessing_budget_fraction: share of the budget (in zCDP ``rho``) spent on the private mean and radius.
        feature_extractor: optional frozen network mapping raw inputs to features (never trained here).
        unit_normalize: normalise each example's features to unit norm; defaults to ``preprocess``.
        feature_norm_bound: ``R``, the clip norm of features for the private mean (1 after unit normalisation).
        radius_quantile: which quantile of the centred norms becomes ``tau_hat`` (examples above it are clipped).
        mean_budget_share: share of the preprocessing budget spent on the mean (the rest on the radius).
        noise_multiplier: fix the SGD noise multiplier instead of calibrating it to the planned steps; training
            then stops when the next step would exceed ``target_epsilon``.
        accountant: ``"rdp"`` (default) or ``"prv"`` (tighter, slower), Opacus' accountants.
        noise_seed: seed of the DP randomness (Poisson sampling, noise); ``None`` draws one from torch's RNG at
            the start of ``fit`` (so ``seed_everything`` makes runs reproducible). Stored in the checkpoint.
        optimizer: a callable building the optimizer from ``model``'s parameters (Opacus wraps it).
        lr_scheduler: optional callable building a scheduler from the optimizer.
        label_smoothing: label smoothing of the cross-entropy.

    Note:
        The global expected batch size is ``q n`` with ``q = 1 / len(train_loader)`` of the datamodule's loader, on
        any number of devices (under DDP each rank draws ``q`` of its shard), so a DDP run has the privacy of the
        single-device run. Logs ``epsilon`` every epoch and ``train_loss``/``train_acc``/``val_*``/``test_*``.
        Hyperparameters (learning rate, ``max_grad_norm``, epochs) tuned on the private data are not covered by
        the guarantee.

    Example::

        >>> from lightning_methods.nets import MLP
        >>> module = DPSGDFModule(MLP(in_features=64, num_classes=10, hidden_sizes=[]), num_classes=10,
        ...                       target_epsilon=1.0, delta=1e-5, max_grad_norm=1.0)
        >>> module(torch.zeros(3, 1, 8, 8)).shape
        torch.Size([3, 10])
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        target_epsilon: float,
        delta: float,
        max_grad_norm: float,
        preprocess: bool = True,
        preprocessing_budget_fraction: float = 0.1,
        feature_extractor: nn.Module | None = None,
        unit_normalize: bool | None = None,
        feature_norm_bound: float = 1.0,
        radius_quantile: float = 0.95,
        mean_budget_share: float = 0.75,
        noise_multiplier: float | None = None,
        accountant: Mechanism = "rdp",
        noise_seed: int | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(model, num_classes, optimizer, lr_scheduler, label_smoothing)
        positive = {"target_epsilon": target_epsilon, "max_grad_norm": max_grad_norm, "feature_norm_bound": feature_norm_bound}
        for name, value in positive.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
                raise ValueError(f"`{name}` must be a positive number, got {value!r}.")
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0.0 < delta < 1.0:
            raise ValueError(f"`delta` must be in (0, 1) (and below 1/n), got {delta!r}.")
        if not 0.0 < preprocessing_budget_fraction < 1.0:
            raise ValueError(f"`preprocessing_budget_fraction` must be in (0, 1), got {preprocessing_budget_fraction!r}.")
        if not 0.0 < mean_budget_share < 1.0:
            raise ValueError(f"`mean_budget_share` must be in (0, 1), got {mean_budget_share!r}.")
        if not 0.0 < radius_quantile <= 1.0:
            raise ValueError(f"`radius_quantile` must be in (0, 1], got {radius_quantile!r}.")
        if noise_multiplier is not None and not noise_multiplier >= 0:
            raise ValueError(f"`noise_multiplier` must be >= 0 (or None to calibrate it), got {noise_multiplier!r}.")
        if feature_extractor is not None and not isinstance(feature_extractor, nn.Module):
            raise TypeError(f"`feature_extractor` must be an nn.Module or None, got {type(feature_extractor).__name__}.")
        check_private_layers(model)
        save_hparams(self, inspect.currentframe())
        self.target_epsilon = float(target_epsilon)
        self.delta = float(delta)
        self.max_grad_norm = float(max_grad_norm)
        self.preprocess = preprocess
        self.preprocessing_budget_fraction = preprocessing_budget_fraction
        self.feature_norm_bound = float(feature_norm_bound)
        self.radius_quantile = radius_quantile
        self.mean_budget_share = mean_budget_share
        self.fixed_noise_multiplier = noise_multiplier
        self.noise_seed = noise_seed
        if feature_extractor is not None:
            feature_extractor.requires_grad_(False).eval()
        self.feature_extractor = feature_extractor
        self.preprocessor = FeaturePreprocessor(unit_normalize=preprocess if unit_normalize is None else unit_normalize)
        self.privacy_ledger = PrivacyLedger(accountant)
        # Opacus objects, rebuilt in every process (never pickled: ddp_spawn would strip the per-parameter state)
        self._grad_sample_module: GradSampleModule | None = None
        self._dp_optimizer: DPOptimizer | None = None
        self._original_train_dataloader: Callable | None = None
        self._no_sync: Any = None
        self._allowed_steps: int | None = None

    # -- inference: one call on raw inputs ---------------------------------------------------------------------------
    def train(self, mode: bool = True) -> DPSGDFModule:
        super().train(mode)
        if self.feature_extractor is not None:
            self.feature_extractor.eval()  # frozen: its dropout / BatchNorm statistics never switch to training
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Raw inputs -> the features ``model`` sees (extractor, then the fitted private transform)."""
        if self.feature_extractor is not None:
            with torch.no_grad():
                x = self.feature_extractor(x)
        return self.preprocessor(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.features(x))

    def export(self) -> nn.Sequential:
        """A plain ``nn.Sequential`` (extractor, fitted preprocessor, model) for deployment without Lightning/Opacus."""
        parts: OrderedDict[str, nn.Module] = OrderedDict()
        if self.feature_extractor is not None:
            parts["feature_extractor"] = self.feature_extractor
        parts["preprocessor"] = self.preprocessor
        parts["model"] = self.model
        return nn.Sequential(parts).eval()

    @property
    def epsilon(self) -> float:
        """Privacy spent so far at ``delta`` (preprocessing + SGD steps taken)."""
        return self.privacy_ledger.epsilon(self.delta)

    @property
    def noise_multiplier(self) -> float | None:
        """The SGD noise multiplier in use (calibrated at the start of ``fit`` unless fixed)."""
        return self.privacy_ledger.noise_multiplier

    # -- checks before training ----------------------------------------------------------------------------------------
    def configure_callbacks(self) -> list[pl.Callback]:
        from callbacks.privacy import PrivacyBudget

        trainer = self._trainer
        if trainer is not None and any(isinstance(c, PrivacyBudget) for c in trainer.callbacks):
            return []  # the user configured their own (e.g. a smaller budget): keep it
        return [PrivacyBudget()]

    def setup(self, stage: str) -> None:
        trainer = self.trainer
        # probe the whole pipeline (extractor, transform, model) on the datamodule's raw input shape
        check_model_against_data(self, self.num_classes, trainer.datamodule)
        if stage != "fit":
            return
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                f"`Trainer(accumulate_grad_batches={trainer.accumulate_grad_batches})` would sum several Poisson "
                "batches into one noisy step, which the privacy accounting does not cover. Remove it and raise the "
                "datamodule's `batch_size` instead (the expected batch size is what DP-SGD's noise is divided by)."
            )
        if trainer.gradient_clip_val:
            raise ValueError(
                f"`Trainer(gradient_clip_val={trainer.gradient_clip_val})` clips the aggregated gradient, not each "
                "example's: it gives no privacy and DP-SGD already clips per example. Remove it and set "
                "`max_grad_norm` on DPSGDFModule instead."
            )
        from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

        if not isinstance(trainer.strategy, (SingleDeviceStrategy, DDPStrategy)):
            raise ValueError(
                f"DPSGDFModule runs on one device or with DDP (`strategy='ddp'` / `'ddp_spawn'`), not with "
                f"{type(trainer.strategy).__name__}: per-sample gradients and the noise reduction are DDP-specific."
            )
        datamodule = trainer.datamodule
        if datamodule is not None and self._original_train_dataloader is None:
            self._original_train_dataloader = datamodule.train_dataloader
            datamodule.train_dataloader = self._poisson_train_dataloader  # type: ignore[method-assign]

    def _poisson_train_dataloader(self) -> PoissonDataLoader:
        assert self._original_train_dataloader is not None
        trainer = self.trainer
        return PoissonDataLoader.from_loader(
            self._original_train_dataloader(),
            seed=self._dp_seed(),
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            delta=self.delta,
        )

    def _dp_seed(self) -> int:
        if self.privacy_ledger.seed is None:
            seed = self.noise_seed if self.noise_seed is not None else int(torch.randint(0, 2**62, ()).item())
            # every rank must use rank 0's seed: the preprocessing noise is drawn on all ranks, identically
            self.privacy_ledger.seed = int(self.trainer.strategy.broadcast(seed, src=0))
        return self.privacy_ledger.seed

    def teardown(self, stage: str) -> None:
        if self._grad_sample_module is not None:
            self._grad_sample_module.remove_hooks()
            self._grad_sample_module = None
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if datamodule is not None and vars(datamodule).get("train_dataloader") == self._poisson_train_dataloader:
            del datamodule.train_dataloader  # back to the datamodule's own method
        self._original_train_dataloader = None

    # -- Opacus: per-sample gradients and the DP optimizer ------------------------------------------------------------
    def configure_model(self) -> None:
        if self._trainer is None or self.trainer.state.fn != "fit":
            return
        if self._grad_sample_module is not None:
            self._grad_sample_module.remove_hooks()
        # the hooks are registered on `self.model`'s layers, so the state_dict keys stay those of the plain model;
        # the per-example loss is summed in `training_step`, hence loss_reduction="sum" here
        # plain attribute, not a registered submodule: its parameters are `self.model`'s, under other state_dict keys
        object.__setattr__(self, "_grad_sample_module", GradSampleModule(self.model, loss_reduction="sum", strict=False))

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer(self.model.parameters())
        cls = DistributedDPOptimizer if self._trainer is not None and self.trainer.world_size > 1 else DPOptimizer
        # noise multiplier and expected batch size are set in on_train_start, once the Poisson loader exists
        dp_optimizer = cls(
            optimizer, noise_multiplier=0.0, max_grad_norm=self.max_grad_norm, expected_batch_size=1, loss_reduction="mean"
        )
        dp_optimizer.attach_step_hook(lambda _: self.privacy_ledger.record_step())
        self._dp_optimizer = dp_optimizer
        if self.lr_scheduler is None:
            return dp_optimizer
        scheduler = self.lr_scheduler(dp_optimizer)
        config: dict[str, Any] = {"scheduler": scheduler}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = "val_loss"
        return {"optimizer": dp_optimizer, "lr_scheduler": config}

    # -- the start of fit: Poisson loader check, preprocessing, noise calibration --------------------------------------
    def on_train_start(self) -> None:
        trainer = self.trainer
        loader = trainer.train_dataloader
        if not isinstance(loader, PoissonDataLoader):
            raise ValueError(
                f"DPSGDFModule needs a Poisson-sampled training loader, got {type(loader).__name__}. Fit with a "
                "LightningDataModule (its training loader is converted automatically) or pass "
                "`train_dataloaders=PoissonDataLoader.from_loader(loader, delta=...)` (single device)."
            )
        sampler = loader.batch_sampler
        if (sampler.rank, sampler.world_size) != (trainer.global_rank, trainer.world_size):
            raise ValueError(
                "The Poisson loader was built for another process layout; under DDP fit with a LightningDataModule."
            )
        n = len(loader.dataset)  # type: ignore[arg-type]
        if self.delta >= 1.0 / n:
            raise ValueError(f"`delta={self.delta}` is not below 1/n = {1.0 / n:.3g} (n={n}): use `delta < 1/n`.")
        ledger = self.privacy_ledger
        self._dp_seed()
        if ledger.preprocessing_noise is None and self.preprocess:
            self._fit_preprocessing(loader)
        if ledger.noise_multiplier is None:
            ledger.sample_rate = float(loader.sample_rate)
            if self.fixed_noise_multiplier is not None:
                ledger.noise_multiplier = float(self.fixed_noise_multiplier)
            else:
                steps = trainer.estimated_stepping_batches
                if not math.isfinite(steps):
                    raise ValueError(
                        "DPSGDFModule calibrates its noise to the number of steps: set `Trainer(max_epochs=...)` or "
                        "`max_steps`, or pass a fixed `noise_multiplier`."
                    )
                ledger.planned_steps = int(steps)
                ledger.noise_multiplier = calibrate_noise_multiplier(
                    self.target_epsilon, self.delta, ledger.sample_rate, int(steps), ledger.history, ledger.mechanism
                )
            rank_zero_info(
                f"DPSGDFModule: noise multiplier {ledger.noise_multiplier:.4g}, sample rate {ledger.sample_rate:.4g} "
                f"(expected batch {ledger.sample_rate * n:.1f}), planned steps {ledger.planned_steps}, "
                f"target (epsilon={self.target_epsilon}, delta={self.delta})."
            )
        elif abs(float(loader.sample_rate) - float(ledger.sample_rate)) > 1e-12:
            rank_zero_warn(
                f"The sample rate changed from {ledger.sample_rate:.4g} to {loader.sample_rate:.4g} since the ledger "
                "started; the accountant composes both."
            )
            ledger.sample_rate = float(loader.sample_rate)
        self._allowed_steps = ledger.steps + ledger.steps_within(self.target_epsilon, self.delta)
        optimizer = self._dp_optimizer
        assert optimizer is not None, "configure_optimizers did not run"
        optimizer.noise_multiplier = ledger.noise_multiplier
        optimizer.expected_batch_size = ledger.sample_rate * n / trainer.world_size
        # Opacus all-reduces the clipped per-sample gradient sums itself (noise on rank 0): DDP's own all-reduce of
        # the non-private gradients would be redundant work, so it is switched off for the whole fit.
        from torch.nn.parallel import DistributedDataParallel

        if isinstance(trainer.strategy.model, DistributedDataParallel) and self._no_sync is None:
            self._no_sync = trainer.strategy.model.no_sync()
            self._no_sync.__enter__()

    def on_train_end(self) -> None:
        if self._no_sync is not None:
            self._no_sync.__exit__(None, None, None)
            self._no_sync = None

    @torch.no_grad()
    def _fit_preprocessing(self, loader: PoissonDataLoader) -> None:
        """DPSGD-F steps 1-3 on the whole training set (each rank reads its shard; sums are all-reduced)."""
        strategy = self.trainer.strategy
        ledger = self.privacy_ledger
        z_mean, z_radius = preprocessing_noise(
            self.target_epsilon, self.delta, self.preprocessing_budget_fraction, self.mean_budget_share
        )
        sampler = loader.batch_sampler
        shard = Subset(loader.dataset, sampler.shard.tolist())
        sequential = DataLoader(shard, batch_size=512, collate_fn=loader.collate_fn.wrapped_collator_fn)
        bound = self.feature_norm_bound
        was_training = self.training
        self.eval()

        def clipped_features() -> Any:
            for batch in sequential:
                x = batch[0] if isinstance(batch, (list, tuple)) else batch
                x = x.to(self.device)
                if self.feature_extractor is not None:
                    x = self.feature_extractor(x)
                yield clip_rows(self.preprocessor.normalize(x.flatten(1).float()), bound).double()

        local_sum, local_n = None, 0
        for feats in clipped_features():
            local_sum = feats.sum(0) if local_sum is None else local_sum + feats.sum(0)
            local_n += len(feats)
        total = strategy.reduce(local_sum, reduce_op="sum")
        n = int(strategy.reduce(torch.tensor(float(local_n), device=self.device), reduce_op="sum").item())
        generator = torch.Generator().manual_seed(derive_seed(ledger.seed, 1))
        mean = private_mean(total.cpu(), n, bound, z_mean, generator)
        mean = clip_rows(mean[None], bound)[0]  # post-processing: keeps every ||x - mean|| <= 2R

        edges = radius_grid(2.0 * bound)
        counts = torch.zeros(len(edges) - 1, dtype=torch.float64, device=self.device)
        centre = mean.to(self.device)
        for feats in clipped_features():
            counts += histogram_counts((feats - centre).norm(dim=1), edges.to(self.device))
        counts = strategy.reduce(counts, reduce_op="sum").cpu()
        radius = private_radius(noisy_histogram(counts, z_radius, generator), edges, n, self.radius_quantile, z_radius)

        self.preprocessor.set(mean, radius)
        ledger.record(z_mean, 1.0, 1)
        ledger.record(z_radius, 1.0, 1)
        ledger.preprocessing_noise = (z_mean, z_radius)
        self.train(was_training)
        rank_zero_info(
            f"DPSGDFModule: private mean (noise multiplier {z_mean:.3g}, ||mean|| = {mean.norm():.3f}) and "
            f"{self.radius_quantile:.0%}-quantile radius {radius:.4g} (noise multiplier {z_radius:.3g}) on n={n}."
        )

    # -- training -------------------------------------------------------------------------------------------------------
    def cap_private_steps(self, steps: int) -> None:
        """Take at most ``steps`` DP-SGD steps in total (used by :class:`callbacks.PrivacyBudget` for smaller budgets)."""
        self._allowed_steps = steps if self._allowed_steps is None else min(self._allowed_steps, steps)

    def on_train_epoch_start(self) -> None:
        # Lightning sets the epoch on `loader.sampler` / `batch_sampler.sampler` only; the Poisson sampler is the
        # batch sampler itself (the iterator is created after this hook)
        loader = self.trainer.train_dataloader
        if isinstance(loader, PoissonDataLoader):
            loader.batch_sampler.set_epoch(self.current_epoch)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        # the hard guarantee: never take a step that would exceed target_epsilon (whatever min_epochs says)
        if self._allowed_steps is not None and self.privacy_ledger.steps >= self._allowed_steps:
            self.trainer.should_stop = True
            return -1
        return None

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch[0], batch[1]
        logits = self(x)
        check_targets(logits, y)
        targets = y.to(logits.dtype) if y.ndim == 2 else y
        losses = F.cross_entropy(logits, targets, reduction="none", label_smoothing=self.label_smoothing)
        if len(y):  # Poisson batches may be empty: nothing to record (the noisy step still happens)
            self.train_acc.update(logits.detach(), hard_targets(y))
            self.train_loss_mean.update(losses.detach().mean(), len(y))
            if self.global_step % self.trainer.log_every_n_steps == 0:
                self.log("train_loss_step", losses.detach().mean(), prog_bar=True)
        # summed, so Opacus' hooks see each example's own gradient; DPOptimizer divides by the expected batch size
        return losses.sum()

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        dp_optimizer = self._dp_optimizer
        if dp_optimizer is not None and self.privacy_ledger.seed is not None:
            # noise drawn from (seed, step): a run resumed at an epoch boundary adds exactly the same noise
            dp_optimizer.generator = torch.Generator(device=self.device).manual_seed(
                derive_seed(self.privacy_ledger.seed, 2, self.privacy_ledger.steps)
            )

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        # every rank holds the same ledger; the (identical) values are averaged so Lightning sees a synced metric
        self.log("epsilon", self.epsilon, prog_bar=True, sync_dist=True)
