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

* Poisson sampling: the training loader Lightning builds (from the datamodule or the loader passed to ``fit``) is
  replaced, as it passes through the strategy's public ``process_dataloader`` hook, by a :class:`PoissonDataLoader`
  (Opacus' ``DPDataLoader`` with a per-rank shard); each example of the dataset is drawn independently with
  probability ``q = 1 / len(user_loader)`` at every step, empty batches included. The datamodule is not modified.
* Secret randomness: the Poisson draws and all noise (mean, radius histogram, SGD) come from generators seeded from
  the OS' entropy pool at every ``fit`` and never saved, so ``seed_everything`` does not fix them, no checkpoint
  regenerates them, and a resumed run or a new ``fit`` draws fresh batches. ``insecure_debug_seed`` makes them
  reproducible and marks the run as not private.
* DDP: per-sample gradients (Opacus ``GradSampleModule`` hooks, built in ``configure_model`` so ``ddp_spawn`` works)
  are clipped on every rank, the clipped sums are all-reduced once by Opacus' ``DistributedDPOptimizer`` and the
  noise is added on rank 0 only, so replicas stay bit-identical; DDP's own (redundant) gradient all-reduce is
  switched off with ``no_sync``. The preprocessing noise is drawn on rank 0 and broadcast. The global expected
  batch is the same as on one device, so the epsilon is too.
* ``grad_sample_mode="ghost"``: Opacus' fast gradient clipping (per-example gradient norms without per-example
  gradients, then a second backward of the rescaled loss, run in ``LightningModule.backward``);
  ``max_physical_batch_size``: each Poisson batch in micro-batches, one noisy step per logical batch (Opacus'
  ``BatchMemoryManager`` mechanism: skipped steps accumulate the clipped sum). Same guarantee and accounting.
* The accountant's history lives in the module's ``state_dict`` (``privacy_ledger._extra_state``): checkpoints
  carry it, a resumed run continues it, and the module never takes a step that would exceed ``target_epsilon``
  (:class:`callbacks.PrivacyBudget`, added automatically, stops training gracefully).
* Everything that would void the guarantee is refused before the first release: gradient accumulation, Lightning's
  gradient clipping, layers without per-example gradients (BatchNorm, ...), loaders whose sampling cannot be made
  Poisson, ``delta >= 1/n``, non-finite inputs, a datamodule that standardises with exact training statistics, a
  ``PrivacyBudget`` below the preprocessing cost, a training set too small for the private radius.
"""

from __future__ import annotations

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
from opacus.data_loader import DPDataLoader, dtype_safe, shape_safe, wrap_collate_with_empty
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import (
    DistributedDPOptimizer,
    DistributedDPOptimizerFastGradientClipping,
    DPOptimizer,
    DPOptimizerFastGradientClipping,
)
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    Subset,
)
from torch.utils.data._utils.collate import default_collate

from lightning_methods._privacy import (
    Mechanism,
    PrivacyBudget,
    PrivacyLedger,
    calibrate_noise_multiplier,
    debug_generator,
    epsilon_of,
    preprocessing_noise,
    secret_generator,
    zcdp_rho,
)
from lightning_methods._utils import check_model_against_data, check_targets, save_hparams
from lightning_methods.classifier import ClassifierModule, hard_targets

__all__ = [
    "DPSGDFModule",
    "audit",
    "audit_epsilon_lower_bound",
    "audit_p_value",
    "canary_scores",
    "dirac_canaries",
    "FeaturePreprocessor",
    "PoissonDataLoader",
    "PrivacyBudget",
    "PrivacyLedger",
    "calibrate_noise_multiplier",
    "epsilon_of",
    "secret_generator",
    "smallest_n_for_radius",
    "noisy_histogram",
    "private_mean",
    "private_radius",
    "radius_grid",
    "zcdp_rho",
]

#: the radius grid: ``max_radius * ratio**-j`` for j = 0..size-1, plus a bin down to 0. sqrt(2) steps are fine
#: enough (the rescale only needs tau up to a constant) and coarse enough that few noisy bins are summed.
GRID_RATIO = math.sqrt(2.0)
GRID_SIZE = 24


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
# Poisson sampling: Opacus' DPDataLoader, sharded per DDP rank, drawn from a secret generator
# ---------------------------------------------------------------------------------------------------------------
_SAMPLER_REFUSAL = (
    "Lightning tried to replace the Poisson sampler of DPSGDFModule's training loader (with "
    "`{sampler}`): DP-SGD's privacy analysis needs every example drawn independently with probability q. Under "
    "DDP set `Trainer(use_distributed_sampler=False)`: DPSGDFModule shards the data across ranks itself."
)


class _PoissonBatchSampler(UniformWithReplacementSampler):
    """Opacus' Poisson batch sampler over this rank's shard (``rank::world_size``), drawing from ``generator``.

    Every rank yields exactly ``steps`` batches (possibly empty), so DDP ranks stay in lockstep. Opacus'
    ``DistributedUniformWithReplacementSampler`` is not used for a reason read in its source (opacus 1.6,
    ``utils/uniform_sampler.py``): it skips a rank's empty batches (``if len(selected_examples) > 0: yield``), so
    the ranks would run different numbers of steps and the gradient all-reduce would deadlock or pair different
    steps. The union over ranks of independent ``q``-subsamples of disjoint shards is a ``q``-subsample of the
    dataset, as in Opacus' sampler.

    The generator is never reseeded: each batch is a fresh draw from a stream that, by default, starts from a
    secret seed every time a loader is built (every ``fit``), so a resumed run or a new ``fit`` after
    ``load_from_checkpoint`` never replays earlier batches.
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
        generator: torch.Generator | None = None,
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
        super().__init__(
            num_samples=len(self.shard),
            sample_rate=sample_rate,
            generator=generator if generator is not None else secret_generator(),
            steps=steps,
        )
        self.rank, self.world_size = rank, world_size
        # attributes Lightning looks for to recognise a batch sampler it could re-instantiate (and then refuse above)
        self.batch_size, self.drop_last = None, False

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
        generator: the source of the sampling; ``None`` (the default, and the only private choice unless you
            manage a secret generator yourself) seeds one from the OS' entropy pool. A generator with a known seed
            makes the batches public, and privacy amplification by subsampling no longer holds.
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
        generator: torch.Generator | None = None,
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
            num_samples=len(dataset), sample_rate=sample_rate, steps=steps, generator=generator, rank=rank,
            world_size=world_size,
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

    @classmethod
    def from_loader(
        cls,
        loader: DataLoader,
        *,
        generator: torch.Generator | None = None,
        rank: int = 0,
        world_size: int = 1,
        delta: float | None = None,
    ) -> PoissonDataLoader:
        """The Poisson-sampled version of ``loader``: ``q = 1 / len(loader)`` (Opacus' convention), same data and collate.

        The sampling draws from ``generator`` (default: a fresh generator seeded from OS entropy; there is no fixed
        default seed, since known batches void privacy amplification by subsampling). Refuses loaders whose sampling
        cannot be replaced without changing what the user asked for (an ``IterableDataset``, a custom or weighted
        sampler, a ``DistributedSampler`` injected by Lightning) and ``delta >= 1 / n``.
        """
        if isinstance(loader, PoissonDataLoader):
            if (loader.batch_sampler.rank, loader.batch_sampler.world_size) == (rank, world_size) and generator is None:
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
                if isinstance(loader.sampler, DistributedSampler):
                    raise ValueError(_SAMPLER_REFUSAL.format(sampler=type(loader.sampler).__name__))
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
            generator=generator,
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


GradSampleMode = Literal["hooks", "ghost"]


def check_ghost_layers(model: nn.Module, arg: str = "model") -> None:
    """Refuse, for ``grad_sample_mode="ghost"``, layers Opacus' fast gradient clipping does not handle.

    Opacus' ``GradSampleModuleFastGradientClipping`` computes per-example gradient *norms* without per-example
    gradients for ``Linear`` and ``Embedding`` (ghost clipping) and from one layer's per-example gradients at a time
    for the layers it has a grad sampler for (``Conv*``, ``LayerNorm``, ``GroupNorm``, ...). A layer with its own
    parameters and neither (a custom layer, Opacus' DP RNNs) and parameters shared between layers (tying; Opacus
    raises mid-training) are refused here, before training.
    """
    from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleModuleFastGradientClipping

    supported = set(GradSampleModuleFastGradientClipping.NORM_SAMPLERS) | set(GradSampleModuleFastGradientClipping.GRAD_SAMPLERS)
    problems, owners = [], {}
    for name, sub in model.named_modules():
        own = [p for p in sub.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if type(sub) not in supported:
            problems.append(f"`{arg}.{name or '<root>'}` ({type(sub).__name__}): no ghost/fast-clipping rule in Opacus")
        for p in own:
            if id(p) in owners:
                problems.append(f"`{arg}.{name}` shares a parameter with `{arg}.{owners[id(p)]}` (tied weights)")
            owners[id(p)] = name
    if problems:
        raise ValueError(
            "`grad_sample_mode='ghost'` cannot clip these layers:\n  " + "\n  ".join(problems)
            + "\nUse `grad_sample_mode='hooks'` (per-example gradients through Opacus' GradSampleModule), which supports them."
        )


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
        secure_mode: Opacus' ``secure_mode`` noise (each Gaussian is the mean of four draws, robust to the
            floating-point attacks of arXiv:2107.10138 / 2112.05307) and a generator reseeded from OS entropy at
            every step (so no single 63-bit seed governs more than one step); ``torchcsprng``'s ``/dev/urandom``
            generator is used when it is installed. Slower noise; off by default, as in Opacus.
        insecure_debug_seed: **not private.** Derive every DP draw (sampling, all noise) from this seed, so runs
            are reproducible for debugging. The privacy ledger then marks the run (and every later run continuing
            it) as not private, ``epsilon`` reports ``inf`` and a warning is raised at every ``fit``. By default
            (``None``) all DP randomness comes from generators seeded from the OS' entropy pool at every ``fit``:
            ``seed_everything`` does not fix them and nothing saved (``state_dict``, checkpoint, hyperparameters,
            logs) regenerates them.
        grad_sample_mode: how the clipped sum is computed, named as in Opacus: ``"hooks"`` (per-example gradients
            from ``GradSampleModule``) or ``"ghost"`` (Opacus' fast gradient clipping: per-example gradient *norms*
            without per-example gradients for Linear/Embedding layers, then a second backward on the loss rescaled by
            the clipping factors; Li et al. 2022, Bu et al. 2023). Same clipping, noise, sampling and accounting.
        max_physical_batch_size: process each Poisson batch in micro-batches of at most this many examples (like
            Opacus' ``BatchMemoryManager``): the clipped per-example gradients are summed over the micro-batches and
            one noisy step is taken per (logical) Poisson batch, so the privacy accounting is unchanged. ``None``:
            the whole batch at once.
        log_train_metrics: log ``train_loss`` / ``train_acc`` / ``train_loss_step``. They are computed on the
            training batches without noise, so they are **outside the privacy guarantee**: off by default.
        optimizer: a callable building the optimizer from ``model``'s parameters (Opacus wraps it).
        lr_scheduler: optional callable building a scheduler from the optimizer.
        label_smoothing: label smoothing of the cross-entropy.

    Note:
        The global expected batch size is ``q n`` with ``q = 1 / len(train_loader)`` of the datamodule's loader, on
        any number of devices (under DDP each rank draws ``q`` of its shard), so a DDP run has the privacy of the
        single-device run. Logs ``epsilon`` every epoch and ``val_*``/``test_*`` (evaluation data is not
        protected). Hyperparameters (learning rate, ``max_grad_norm``, epochs) tuned on the private data are not
        covered by the guarantee.

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
        secure_mode: bool = False,
        insecure_debug_seed: int | None = None,
        log_train_metrics: bool = False,
        grad_sample_mode: GradSampleMode = "hooks",
        max_physical_batch_size: int | None = None,
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
        if insecure_debug_seed is not None and (isinstance(insecure_debug_seed, bool) or not isinstance(insecure_debug_seed, int)):
            raise TypeError(f"`insecure_debug_seed` must be an int or None, got {insecure_debug_seed!r}.")
        if grad_sample_mode not in ("hooks", "ghost"):
            raise ValueError(f"`grad_sample_mode` must be 'hooks' or 'ghost', got {grad_sample_mode!r}.")
        if max_physical_batch_size is not None and (
            isinstance(max_physical_batch_size, bool) or not isinstance(max_physical_batch_size, int) or max_physical_batch_size < 1
        ):
            raise ValueError(f"`max_physical_batch_size` must be a positive integer or None, got {max_physical_batch_size!r}.")
        check_private_layers(model)
        if grad_sample_mode == "ghost":
            check_ghost_layers(model)
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
        self.secure_mode = bool(secure_mode)
        self.insecure_debug_seed = insecure_debug_seed
        self.log_train_metrics = bool(log_train_metrics)
        self.grad_sample_mode = grad_sample_mode
        self.max_physical_batch_size = max_physical_batch_size
        if feature_extractor is not None:
            feature_extractor.requires_grad_(False).eval()
        self.feature_extractor = feature_extractor
        self.preprocessor = FeaturePreprocessor(unit_normalize=preprocess if unit_normalize is None else unit_normalize)
        self.privacy_ledger = PrivacyLedger(accountant)
        # Opacus objects and DP generators, rebuilt in every process and every fit (never pickled: ddp_spawn would
        # strip the per-parameter state; never saved: the generators are the secret of the noise)
        self._grad_sample_module: GradSampleModule | None = None
        self._dp_optimizer: DPOptimizer | None = None
        self._wrapped_strategy: Any = None
        self._no_sync: Any = None
        self._allowed_steps: int | None = None
        self._noise_generator: torch.Generator | None = None
        self._last_losses: torch.Tensor | None = None
        #: the last preprocessing releases (noisy clipped sum and noisy histogram): DP outputs, kept for inspection
        self.releases: dict[str, torch.Tensor] = {}

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
        """Privacy spent so far at ``delta`` (preprocessing + SGD steps taken); ``inf`` for a run that is not private.

        A run is not private once any of its releases used ``insecure_debug_seed`` (the ledger remembers it across
        checkpoints); :attr:`accounted_epsilon` is then what the accounting would have said.
        """
        return self.accounted_epsilon if self.privacy_ledger.private else math.inf

    @property
    def accounted_epsilon(self) -> float:
        """The accountant's epsilon at ``delta``, whether or not the randomness was secret."""
        return self.privacy_ledger.epsilon(self.delta)

    @property
    def noise_multiplier(self) -> float | None:
        """The SGD noise multiplier in use (calibrated at the start of ``fit`` unless fixed)."""
        return self.privacy_ledger.noise_multiplier

    def epsilon_at_start(self, delta: float) -> float:
        """The epsilon at ``delta`` that ``fit`` spends before its first step: the ledger plus pending preprocessing."""
        history = list(self.privacy_ledger.history)
        if self.preprocess and self.privacy_ledger.preprocessing_noise is None:
            z_mean, z_radius = self._preprocessing_noise()
            history += [(z_mean, 1.0, 1), (z_radius, 1.0, 1)]
        return epsilon_of(history, delta, self.privacy_ledger.mechanism)

    def _preprocessing_noise(self) -> tuple[float, float]:
        return preprocessing_noise(self.target_epsilon, self.delta, self.preprocessing_budget_fraction, self.mean_budget_share)

    # -- DP randomness: secret unless the loudly named debug seed is set -----------------------------------------------
    def _generator(self, purpose: int, device: torch.device | str = "cpu") -> torch.Generator:
        """A fresh generator for one kind of DP draw: secret (OS entropy), or derived from ``insecure_debug_seed``.

        The debug stream mixes in the rank and the ledger's step count, so even a debug run continued from a
        checkpoint does not replay its earlier batches.
        """
        if self.insecure_debug_seed is None:
            return secret_generator(device)
        rank = self.trainer.global_rank if self._trainer is not None else 0
        return debug_generator(self.insecure_debug_seed, purpose, rank, self.privacy_ledger.steps, device=device)

    # -- checks before training ----------------------------------------------------------------------------------------
    def configure_callbacks(self) -> list[pl.Callback]:
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
        if datamodule is not None and getattr(datamodule, "data_dependent_transform", False):
            raise ValueError(
                f"{type(datamodule).__name__} transforms the training data with statistics computed from it exactly "
                f"({getattr(datamodule, 'data_dependent_transform_name', 'standardisation')}), which no privacy "
                "accounting covers: the guarantee of DPSGDFModule would not hold. Turn it off (e.g. "
                "`TabularDataModule(standardize=False)`): DPSGDFModule centres and rescales the features privately."
            )
        if self.insecure_debug_seed is not None:
            rank_zero_warn(
                f"DPSGDFModule(insecure_debug_seed={self.insecure_debug_seed}): every DP draw is reproducible from this "
                "seed, so this run is NOT differentially private (epsilon is reported as inf). Use it for debugging "
                "only.",
            )
        self._wrap_train_loader()

    def _wrap_train_loader(self) -> None:
        """Poisson-sample the training loader, wherever it comes from, without changing the user's datamodule.

        Lightning hands every loader it builds to ``trainer.strategy.process_dataloader`` (a public Strategy hook);
        for the duration of ``fit`` this module wraps that method on the strategy *instance*, so the training loader
        (``trainer.training`` is set while it is built) is replaced by its :class:`PoissonDataLoader` version drawing
        from a fresh secret generator; validation and test loaders pass through. ``teardown`` unwraps it.
        """
        strategy = self.trainer.strategy
        if "process_dataloader" in vars(strategy):
            return
        original = strategy.process_dataloader

        def process_dataloader(dataloader: object) -> object:
            dataloader = original(dataloader)
            trainer = self._trainer
            if trainer is None or not trainer.training or trainer.sanity_checking:
                return dataloader
            return PoissonDataLoader.from_loader(
                dataloader,  # type: ignore[arg-type]
                generator=self._generator(0),
                rank=trainer.global_rank,
                world_size=trainer.world_size,
                delta=self.delta,
            )

        strategy.process_dataloader = process_dataloader  # type: ignore[method-assign]
        self._wrapped_strategy = strategy

    def teardown(self, stage: str) -> None:
        if self._grad_sample_module is not None:
            self._grad_sample_module.remove_hooks()
            self._grad_sample_module = None
        if self._wrapped_strategy is not None:
            vars(self._wrapped_strategy).pop("process_dataloader", None)  # back to the strategy's own method
            self._wrapped_strategy = None
        self._noise_generator = None

    # -- Opacus: per-sample gradients and the DP optimizer ------------------------------------------------------------
    def configure_model(self) -> None:
        if self._trainer is None or self.trainer.state.fn != "fit":
            return
        if self._grad_sample_module is not None:
            self._grad_sample_module.remove_hooks()
        # the hooks are registered on `self.model`'s layers, so the state_dict keys stay those of the plain model;
        # the per-example loss is summed in `training_step`, hence loss_reduction="sum" here
        # plain attribute, not a registered submodule: its parameters are `self.model`'s, under other state_dict keys
        if self.grad_sample_mode == "ghost":
            from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (
                GradSampleModuleFastGradientClipping,
            )

            gsm = GradSampleModuleFastGradientClipping(
                self.model, loss_reduction="sum", strict=False, max_grad_norm=self.max_grad_norm, use_ghost_clipping=True
            )
        else:
            gsm = GradSampleModule(self.model, loss_reduction="sum", strict=False)
        object.__setattr__(self, "_grad_sample_module", gsm)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer(self.model.parameters())
        distributed = self._trainer is not None and self.trainer.world_size > 1
        if self.grad_sample_mode == "ghost":
            cls = DistributedDPOptimizerFastGradientClipping if distributed else DPOptimizerFastGradientClipping
        else:
            cls = DistributedDPOptimizer if distributed else DPOptimizer
        # noise multiplier and expected batch size are set in on_train_start, once the Poisson loader exists
        dp_optimizer = cls(
            optimizer,
            noise_multiplier=0.0,
            max_grad_norm=self.max_grad_norm,
            expected_batch_size=1,
            loss_reduction="mean",
            secure_mode=self.secure_mode,
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

    # -- the start of fit: Poisson loader check, input check, preprocessing, noise calibration -------------------------
    def on_train_start(self) -> None:
        trainer = self.trainer
        loader = trainer.train_dataloader
        if not isinstance(loader, PoissonDataLoader):
            raise ValueError(
                f"DPSGDFModule needs a Poisson-sampled training loader, got {type(loader).__name__}: fit with a "
                "LightningDataModule or a torch DataLoader (converted automatically) or a `PoissonDataLoader`."
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
        if self.insecure_debug_seed is not None:
            ledger.private = False
        need_preprocessing = ledger.preprocessing_noise is None and self.preprocess
        if need_preprocessing:
            self._check_radius_budget(n)
        # every check before the first release: a non-finite row would make the release (and the weights) NaN
        self._check_finite(loader)
        if need_preprocessing:
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
        # the SGD noise (added on rank 0 only by Opacus' DistributedDPOptimizer) draws from this fit's generator
        self._noise_generator = self._generator(2, self.device)
        optimizer.generator = self._noise_generator
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

    def _check_radius_budget(self, n: int) -> None:
        """Refuse, before any release, a training set too small for the private radius at this budget."""
        _, z_radius = self._preprocessing_noise()
        smallest = smallest_n_for_radius(z_radius, self.radius_quantile)
        if n < smallest:
            raise ValueError(
                f"The private radius needs at least n={smallest} training examples at this budget "
                f"(target_epsilon={self.target_epsilon}, preprocessing_budget_fraction="
                f"{self.preprocessing_budget_fraction}, mean_budget_share={self.mean_budget_share}: radius noise "
                f"multiplier {z_radius:.3g}), got n={n}: its noisy histogram could not tell the data from the noise "
                "and would clip every example. Raise `preprocessing_budget_fraction` or lower `mean_budget_share`, "
                "raise `target_epsilon`, or use `preprocess=False` (plain DP-SGD)."
            )

    def _shard_batches(self, loader: PoissonDataLoader) -> Any:
        """This rank's shard of the training set, in order, as ``(features after the extractor, batch)`` pairs."""
        shard = Subset(loader.dataset, loader.batch_sampler.shard.tolist())
        sequential = DataLoader(shard, batch_size=512, collate_fn=loader.collate_fn.wrapped_collator_fn)
        for batch in sequential:
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            x = x.to(self.device)
            if self.feature_extractor is not None:
                with torch.no_grad():
                    x = self.feature_extractor(x)
            yield x, batch

    @torch.no_grad()
    def _check_finite(self, loader: PoissonDataLoader) -> None:
        """Refuse non-finite training inputs or soft targets before any release, on every rank together.

        One NaN or inf row makes the private mean and every later update NaN, whatever the noise: a release that
        tells neighbouring datasets apart with certainty. Each rank counts its shard's bad rows; the counts are summed,
        so all ranks raise together.
        """
        bad, first = 0, None
        offset = 0
        shard = loader.batch_sampler.shard
        for x, batch in self._shard_batches(loader):
            rows = ~torch.isfinite(x.flatten(1).float()).all(dim=1)
            if isinstance(batch, (list, tuple)) and len(batch) > 1 and torch.is_tensor(batch[1]) and batch[1].is_floating_point():
                rows |= ~torch.isfinite(batch[1].reshape(len(batch[1]), -1)).all(dim=1).to(rows.device)
            if first is None and bool(rows.any()):
                first = int(shard[offset + int(rows.nonzero()[0])])
            bad += int(rows.sum())
            offset += len(x)
        total = int(self.trainer.strategy.reduce(torch.tensor(float(bad), device=self.device), reduce_op="sum").item())
        if total:
            where = f" (e.g. example {first} of the training set)" if first is not None else ""
            raise ValueError(
                f"{total} training example(s) have non-finite inputs or targets{where}, seen through the feature "
                "extractor if any. DP training would turn them into NaN releases that reveal them: remove or impute "
                "them before fitting."
            )

    @torch.no_grad()
    def _fit_preprocessing(self, loader: PoissonDataLoader) -> None:
        """DPSGD-F steps 1-3 on the whole training set (each rank reads its shard; sums are all-reduced).

        The noise of both releases is drawn once, on rank 0, and broadcast: every rank holds the same released
        values and the noise is added once, not once per rank.
        """
        strategy = self.trainer.strategy
        ledger = self.privacy_ledger
        z_mean, z_radius = self._preprocessing_noise()
        bound = self.feature_norm_bound
        was_training = self.training
        self.eval()

        def clipped_features() -> Any:
            for x, _ in self._shard_batches(loader):
                yield clip_rows(self.preprocessor.normalize(x.flatten(1).float()), bound).double()

        local_sum, local_n = None, 0
        for feats in clipped_features():
            local_sum = feats.sum(0) if local_sum is None else local_sum + feats.sum(0)
            local_n += len(feats)
        total = strategy.reduce(local_sum, reduce_op="sum").cpu()
        n = int(strategy.reduce(torch.tensor(float(local_n), device=self.device), reduce_op="sum").item())
        generator = self._generator(1) if self.trainer.global_rank == 0 else None
        mean = private_mean(total, n, bound, z_mean, generator) if generator is not None else torch.zeros_like(total)
        mean = strategy.broadcast(mean, src=0)
        self.releases = {"noisy_mean": mean.clone()}
        mean = clip_rows(mean[None], bound)[0]  # post-processing: keeps every ||x - mean|| <= 2R

        edges = radius_grid(2.0 * bound)
        counts = torch.zeros(len(edges) - 1, dtype=torch.float64, device=self.device)
        centre = mean.to(self.device)
        for feats in clipped_features():
            counts += histogram_counts((feats - centre).norm(dim=1), edges.to(self.device))
        counts = strategy.reduce(counts, reduce_op="sum").cpu()
        noisy = noisy_histogram(counts, z_radius, generator) if generator is not None else torch.zeros_like(counts)
        noisy = strategy.broadcast(noisy, src=0)
        self.releases["noisy_histogram"] = noisy.clone()
        radius = private_radius(noisy, edges, n, self.radius_quantile, z_radius)

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

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        # the hard guarantee: never take a step that would exceed target_epsilon (whatever min_epochs says)
        if self._allowed_steps is not None and self.privacy_ledger.steps >= self._allowed_steps:
            self.trainer.should_stop = True
            return -1
        return None

    def _per_example_losses(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self(x)
        check_targets(logits, y)
        targets = y.to(logits.dtype) if y.ndim == 2 else y
        losses = F.cross_entropy(logits, targets, reduction="none", label_smoothing=self.label_smoothing)
        # training statistics are computed without noise: outside the guarantee, logged only on request
        if self.log_train_metrics and len(y):  # Poisson batches may be empty
            self.train_acc.update(logits.detach(), hard_targets(y))
            self.train_loss_mean.update(losses.detach().mean(), len(y))
        return losses

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch[0], batch[1]
        size = self.max_physical_batch_size
        if size is not None and len(y) > size:
            # BatchMemoryManager-style: every micro-batch but the last is clipped and summed into the optimizer's
            # `summed_grad` by a *skipped* step (Opacus' signal_skip_step: no noise, no update, no ledger entry);
            # the last one goes through Lightning's step, which adds the noise once for the whole Poisson batch
            optimizer = self._dp_optimizer
            assert optimizer is not None
            # Lightning zeroes the gradients only after training_step: clear the previous step's clipped sum first
            optimizer.zero_grad()
            starts = list(range(0, len(y), size))
            for start in starts[:-1]:
                losses = self._per_example_losses(x[start : start + size], y[start : start + size])
                self._clipped_backward(losses)
                optimizer.signal_skip_step(do_skip=True)
                optimizer.step()
                optimizer.zero_grad()
            x, y = x[starts[-1] :], y[starts[-1] :]
        losses = self._per_example_losses(x, y)
        if self.log_train_metrics and len(y) and self.global_step % self.trainer.log_every_n_steps == 0:
            self.log("train_loss_step", losses.detach().mean(), prog_bar=True)
        self._last_losses = losses
        # summed, so Opacus' hooks see each example's own gradient; DPOptimizer divides by the expected batch size
        return losses.sum()

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        if self.grad_sample_mode == "ghost":
            assert self._last_losses is not None
            self._clipped_backward(self._last_losses)
            self._last_losses = None
            return
        super().backward(loss, *args, **kwargs)

    def _clipped_backward(self, losses: torch.Tensor) -> None:
        """Backward of one (micro-)batch: plain for hooks; for ghost, Opacus' two passes (norms, then rescaled loss).

        The ghost passes are those of Opacus' ``DPTensorFastGradientClipping.backward``, written out because
        Lightning's automatic optimisation owns the ``backward`` call: the first pass only feeds the norm hooks,
        its (unclipped) gradients are dropped, and the second pass, with hooks off, leaves the sum of clipped
        per-example gradients in ``.grad``, which ``DPOptimizerFastGradientClipping`` noises.
        """
        if self.grad_sample_mode != "ghost":
            losses.sum().backward()
            return
        gsm = self._grad_sample_module
        assert gsm is not None
        params = [p for p in self.model.parameters() if p.requires_grad]
        losses.sum().backward(retain_graph=True)
        for p in params:
            p.grad = None
        if len(losses) == 0:  # an empty Poisson batch: a zero clipped sum (the noise is still added)
            for p in params:
                p.grad = torch.zeros_like(p)
            return
        coefficients = gsm.get_clipping_coef().to(losses.device)
        gsm.disable_hooks()
        try:
            (coefficients * losses).sum().backward()
        finally:
            gsm.enable_hooks()

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        dp_optimizer = self._dp_optimizer
        if dp_optimizer is None:
            return
        if self.secure_mode and self.insecure_debug_seed is None:
            # a fresh secret seed for every step: recovering one generator state reveals one step's noise at most
            self._noise_generator = _secure_generator(self.device)
        dp_optimizer.generator = self._noise_generator

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        # every rank holds the same ledger; the (identical) values are averaged so Lightning sees a synced metric
        self.log("epsilon", self.epsilon, prog_bar=True, sync_dist=True)


def smallest_n_for_radius(z_radius: float, quantile: float, bins: int = GRID_SIZE) -> int:
    """The smallest training-set size at which the private radius can find the data (a refusal threshold).

    The top-down scan of :func:`private_radius` accepts an edge while the noisy count beyond it stays within
    ``(1 - quantile) n + 2 z sqrt(k)`` (``k`` noisy bins summed). At the lowest edge all ``n`` examples lie beyond it,
    ``k = bins - 1``; below ``quantile * n >= 4 z sqrt(bins - 1)`` the count there does not clear the threshold with
    ~98% probability, the scan runs to the grid floor and every example is clipped to a meaningless radius (measured:
    n = 140 at epsilon 1 collapsed in 2 of 5 seeds). The factor 4 (not 2) leaves two standard deviations of margin.
    """
    return int(math.ceil(4.0 * z_radius * math.sqrt(bins - 1) / quantile))


def _secure_generator(device: torch.device | str) -> torch.Generator:
    try:  # pragma: no cover - torchcsprng is optional and unmaintained for recent torch releases
        import torchcsprng

        return torchcsprng.create_random_device_generator("/dev/urandom")
    except ImportError:
        return secret_generator(device)


# ---------------------------------------------------------------------------------------------------------------
# Empirical audit in one training run (Steinke, Nasr, Jagielski, NeurIPS 2023, arXiv:2305.08846)
# ---------------------------------------------------------------------------------------------------------------
def audit_p_value(num_canaries: int, num_guesses: int, num_correct: int, epsilon: float, delta: float) -> float:
    """P[at least ``num_correct`` of ``num_guesses`` guesses are right] if training were ``(epsilon, delta)``-DP.

    Steinke, Nasr & Jagielski (2023), Theorem 5.2 / Algorithm 3 ("Privacy auditing with one (1) training run"):
    with ``m`` canaries each included independently with probability 1/2, the number of correct guesses of an
    ``epsilon``-DP run is dominated by ``Binomial(r, e^eps / (1 + e^eps))``; ``delta`` adds
    ``2 m delta * max_i P[v > B >= v - i] / i`` (Lemma 5.6). Written from the paper's statement.
    """
    from scipy import stats

    m, r, v = int(num_canaries), int(num_guesses), int(num_correct)
    if not 0 <= v <= r <= m:
        raise ValueError(f"Need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m}).")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    beta = float(stats.binom.sf(v - 1, r, q))
    alpha, mass = 0.0, 0.0
    if delta > 0:
        pmf = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P[B = v - i] for i = 1..v
        cumulative = np.cumsum(pmf)
        if len(cumulative):
            alpha = float(np.max(cumulative / np.arange(1, v + 1)))
        mass = alpha * delta * 2 * m
    return min(1.0, beta + mass)


def audit_epsilon_lower_bound(
    num_canaries: int, num_guesses: int, num_correct: int, delta: float, confidence: float = 0.95
) -> float:
    """The largest ``epsilon`` that the observed guesses refute at ``confidence`` (0 if none): an empirical lower bound.

    Binary search on :func:`audit_p_value` (monotone in ``epsilon``): training is *not* ``(eps, delta)``-DP for any
    ``eps`` below the returned value, with probability ``confidence`` over the canaries' inclusion coins.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"`confidence` must be in (0, 1), got {confidence!r}.")
    level = 1.0 - confidence
    if audit_p_value(num_canaries, num_guesses, num_correct, 0.0, delta) >= level:
        return 0.0
    lo, hi = 0.0, 1.0
    while audit_p_value(num_canaries, num_guesses, num_correct, hi, delta) < level:
        lo, hi = hi, 2.0 * hi
        if hi > 1e3:
            return lo
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if audit_p_value(num_canaries, num_guesses, num_correct, mid, delta) < level:
            lo = mid
        else:
            hi = mid
    return lo


def audit(
    scores: torch.Tensor | np.ndarray,
    included: torch.Tensor | np.ndarray,
    delta: float,
    confidence: float = 0.95,
    guesses: Sequence[int] | None = None,
) -> dict[str, float]:
    """One-run privacy audit: an empirical lower bound on epsilon from membership scores of random canaries.

    Steinke, Nasr & Jagielski, *Privacy Auditing with One (1) Training Run*, NeurIPS 2023. Before training, each of
    ``m`` canaries was put into the training set independently with probability 1/2 (``included``, drawn secretly);
    after training, ``scores`` (higher = "more likely a member") rank the canaries. The auditor guesses "in" for the
    ``k`` highest scores and "out" for the ``k`` lowest, abstaining on the rest, and converts the number of correct
    guesses into a lower bound on epsilon (:func:`audit_epsilon_lower_bound`). Several ``k`` may be tried: the
    confidence is split among them (Bonferroni), so the reported bound keeps its ``confidence``.

    A correct ``(epsilon, delta)``-DP run gives a bound below its epsilon with probability ``confidence``; a bound
    above the reported epsilon proves an implementation or accounting error. With ``m`` canaries the bound cannot
    exceed about ``log(m)`` even for a run without any noise.

    Args:
        scores: one membership score per canary.
        included: whether each canary was in the training set (the coin flips).
        delta: the delta of the guarantee being audited.
        confidence: the probability the bound is valid (over the coin flips).
        guesses: numbers of guesses on *each* side to try (default: 5%, 10%, 20% and 40% of the canaries per side).

    Returns:
        ``{"epsilon_lower_bound", "guesses", "correct", "canaries"}`` for the best ``k``.
    """
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    included = torch.as_tensor(included).flatten().bool()
    m = len(scores)
    if len(included) != m or m < 2:
        raise ValueError(f"`scores` ({m}) and `included` ({len(included)}) need one entry per canary, at least 2.")
    if not torch.isfinite(scores).all():
        raise ValueError("`scores` has non-finite values: score every canary with a finite number.")
    if guesses is None:
        guesses = sorted({max(1, int(f * m)) for f in (0.05, 0.1, 0.2, 0.4)})
    guesses = [int(k) for k in guesses if 1 <= 2 * int(k) <= m]
    if not guesses:
        raise ValueError(f"`guesses` must hold numbers of guesses per side between 1 and {m // 2}.")
    # ties are broken by a fresh random permutation, so equal scores (e.g. a canary untouched by training) carry no
    # information about membership
    order = torch.randperm(m, generator=secret_generator())
    ranked = order[torch.argsort(scores[order], stable=True)]
    per_test = 1.0 - (1.0 - confidence) / len(guesses)
    best = {"epsilon_lower_bound": 0.0, "guesses": 0.0, "correct": 0.0, "canaries": float(m)}
    for k in guesses:
        correct = int(included[ranked[-k:]].sum()) + int((~included[ranked[:k]]).sum())
        bound = audit_epsilon_lower_bound(m, 2 * k, correct, delta, per_test)
        if bound > best["epsilon_lower_bound"] or best["guesses"] == 0:
            best = {"epsilon_lower_bound": bound, "guesses": float(2 * k), "correct": float(correct), "canaries": float(m)}
    return best


def dirac_canaries(
    num_canaries: int, num_classes: int, generator: torch.Generator | None = None, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input-space canaries for linear models: canary ``i`` is ``scale * e_i`` on ``num_canaries`` extra features.

    Returns ``(x, y, included)``: inputs ``(m, m)`` to append as new feature columns (real examples get zeros
    there), random labels, and the inclusion coins (probability 1/2 each, from ``generator`` or a secret one). Each
    canary is the only example with a non-zero value in its column, the easiest case for a membership attack on a
    linear model (Steinke et al.'s input-space canaries, made orthogonal).
    """
    generator = generator if generator is not None else secret_generator()
    x = scale * torch.eye(num_canaries)
    y = torch.randint(0, num_classes, (num_canaries,), generator=generator)
    included = torch.rand(num_canaries, generator=generator) < 0.5
    return x, y, included


@torch.no_grad()
def canary_scores(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, initial: nn.Module | None = None, null: torch.Tensor | None = None
) -> torch.Tensor:
    """Membership scores: how much training raised each canary's label margin (higher = more likely a member).

    ``margin(f, x) = f(x)_y - mean_{c != y} f(x)_c``; the score is ``margin(model, x) - margin(model, null)`` (the
    ``null`` input, default zeros, removes what every input shares, e.g. the bias), minus the same quantity under the
    ``initial`` model when the auditor knows it (white-box initialisation).
    """
    null = torch.zeros_like(x[:1]) if null is None else null

    def margins(f: nn.Module) -> torch.Tensor:
        was_training = f.training
        f.eval()
        logits, base = f(x).double(), f(null).double().expand(len(x), -1)
        f.train(was_training)
        delta = logits - base
        own = delta.gather(1, y.view(-1, 1)).squeeze(1)
        return own - (delta.sum(1) - own) / (delta.shape[1] - 1)

    scores = margins(model)
    if initial is not None:
        scores = scores - margins(initial)
    return scores
