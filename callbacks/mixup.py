"""k-point mixup as a drop-in Lightning Callback.

Paper: Chaudhry, Menon, Veit, Jayasumana, Ramalingam, Kumar, *When does mixup promote local linearity in learned
representations?* (arXiv 2210.16413), building on Zhang et al., *mixup: Beyond Empirical Risk Minimization*
(arXiv 1710.09412).

k-point mixup (Chaudhry et al., Sec. 3) draws weights ``lam ~ Dirichlet(alpha * 1_k)`` (for ``k = 2`` this is
Zhang et al.'s ``lam ~ Beta(alpha, alpha)``), pairs every example with ``k - 1`` partners taken from random
permutations of the batch, and trains on

    x_mix_i = sum_m lam_im x_{pi_m(i)},        y_mix_i = sum_m lam_im onehot(y_{pi_m(i)}),

with ``pi_0`` the identity. The supervised loss is the cross-entropy against the soft target ``y_mix``, so any
LightningModule whose training loss accepts probability-vector targets (``F.cross_entropy`` does) trains with
mixup without knowing about it.

The functions :func:`sample_mixing` and :func:`mix` hold the math; :func:`mixup` mixes one ``(inputs, targets)``
pair (for batches the callback cannot mix in place); :class:`MixupCallback` applies it to every training batch.
"""

from __future__ import annotations

import functools
from collections.abc import MutableMapping, MutableSequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from lightning_methods._utils import check_num_classes

__all__ = ["MixupCallback", "MixingSampler", "mixup", "sample_mixing", "mix", "mix_targets"]


# -- the math -----------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _cyclic_table(n: int, k: int) -> np.ndarray:
    return (np.arange(n)[:, None] + np.arange(k)[None, :]) % n


def _partners(n: int, k: int, rng: np.random.Generator, distinct: bool, batches: int = 1) -> np.ndarray:
    """Indices ``(batches, n, k)``: column 0 the identity, columns 1.. random permutations (see sample_mixing)."""
    rows = np.arange(batches)[:, None]
    if distinct:
        # walk one random cyclic order of the batch: example order[j] is mixed with order[j+1], ..., order[j+k-1]
        orders = rng.permuted(np.tile(np.arange(n), (batches, 1)), axis=1)
        index = np.empty((batches, n, k), dtype=np.int64)
        index[rows, orders] = orders[:, _cyclic_table(n, k)]
        return index
    index = np.empty((batches, n, k), dtype=np.int64)
    index[:, :, 0] = np.arange(n)
    for m in range(1, k):
        index[:, :, m] = rng.permuted(np.tile(np.arange(n), (batches, 1)), axis=1)
    return index


def sample_mixing(
    batch_size: int,
    num_points: int,
    alpha: float,
    rng: np.random.Generator,
    per_sample: bool = True,
    distinct_partners: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw k-point mixup weights and partners for a batch (Chaudhry et al. 2022, Sec. 3).

    Args:
        batch_size: number of examples ``N`` in the batch.
        num_points: ``k``, the number of examples mixed into each output (2 is classic mixup).
        alpha: Dirichlet concentration; ``lam ~ Dirichlet(alpha * 1_k)``.
        rng: the numpy generator every draw comes from (seeded by the caller, so runs are reproducible).
        per_sample: one weight vector per example (``(N, k)``) or one for the whole batch (``(1, k)``).
        distinct_partners: take the ``k - 1`` partners as the next ``k - 1`` examples of one random cyclic order of
            the batch, so no example is paired with itself or twice with the same partner (whenever ``N >= k``);
            each partner column is still a uniformly random permutation. ``False`` draws ``k - 1`` independent
            permutations as Zhang et al. and ICT do, where an example is its own partner with probability ``1/N``
            and that part of the mix is wasted, which matters for small batches.

    Returns:
        ``(lam, index)``: weights of shape ``(N, k)`` or ``(1, k)`` (rows sum to one) and int64 indices ``(N, k)``
        with ``index[:, 0] = arange(N)``; output ``i`` mixes examples ``index[i, 0], ..., index[i, k-1]``.
    """
    n, k = int(batch_size), int(num_points)
    lam = rng.dirichlet(np.full(k, float(alpha)), size=n if per_sample else 1)
    return lam, _partners(n, k, rng, distinct_partners)[0]


class MixingSampler:
    """:func:`sample_mixing` for a stream of batches, as torch tensors, cheaply.

    Weights and partner indices are drawn in pools (a few numpy calls per pool instead of per batch) and kept as
    tensors, so a batch costs two slices. When the number of batches to come is known (``num_batches``, e.g. the
    epoch's), the first pools cover exactly those batches (up to ``pool_size`` examples): one draw per epoch, and
    none wasted. Otherwise pools start small and double up to ``pool_size`` examples, so a short stream does not pay
    for draws it never uses. Running statistics of the weights handed out are kept on the side.

    Args:
        num_points: ``k``.
        alpha: Dirichlet concentration.
        rng: the generator (its draws, hence the whole stream, are reproducible).
        per_sample: one weight vector per example or per batch.
        distinct_partners: see :func:`sample_mixing`.
        pool_size: the largest pool, in examples.
        num_batches: how many batches the stream will serve, if known (sizes the pools; the draws stay a function
            of the generator and of this number).
    """

    def __init__(
        self,
        num_points: int,
        alpha: float,
        rng: np.random.Generator,
        per_sample: bool = True,
        distinct_partners: bool = True,
        pool_size: int = 4096,
        num_batches: int | None = None,
    ) -> None:
        self.k, self.alpha, self.rng = num_points, float(alpha), rng
        self._next_rows = 128  # size of the next weight pool when num_batches is unknown (doubles up to pool_size)
        self.num_batches = num_batches
        self._served = 0  # batches served so far
        self.per_sample, self.distinct_partners, self.pool_size = per_sample, distinct_partners, pool_size
        self._pool_np = np.empty((0, num_points))
        self._pool = torch.empty(0, num_points)
        self._pos = self._pool_len = 0  # plain ints: len() of a tensor costs microseconds on the hot path
        self._partner_pools: dict[int, list] = {}  # batch size -> [M index views (n, k), next batch, next M, M]
        self._batch_sizes: list[int] = []  # per-batch mode: the size each row of the pool was used for
        self._done = np.zeros(2)  # (sum of largest weight, sum of own weight) over pools already used up
        #: number of examples mixed so far
        self.count = 0

    def _consumed(self) -> np.ndarray:
        used = self._pool_np[: self._pos]
        weights = np.asarray(self._batch_sizes[-self._pos :] if self._pos else [], dtype=float)
        if self.per_sample:
            weights = np.ones(self._pos)
        return np.array([weights @ used.max(1), weights @ used[:, 0]]) if self._pos else np.zeros(2)

    @property
    def sum_max(self) -> float:
        """Sum over the examples mixed so far of their largest weight."""
        return float(self._done[0] + self._consumed()[0])

    @property
    def sum_self(self) -> float:
        """Sum over the examples mixed so far of the weight each kept of itself."""
        return float(self._done[1] + self._consumed()[1])

    def _batches_left(self) -> int | None:
        return None if self.num_batches is None else max(1, self.num_batches - self._served)

    def _refill(self, rows: int) -> None:
        self._done += self._consumed()  # statistics are computed once per pool, not per batch
        left = self._batches_left()
        if left is not None:  # the rest of the stream, as far as pool_size allows
            size = max(rows, min(left * rows, self.pool_size))
        else:
            size = max(rows, self._next_rows)
            self._next_rows = min(2 * self._next_rows, self.pool_size)
        self._pool_np = self.rng.dirichlet(np.full(self.k, self.alpha), size=size)
        # stored as (k, rows) so that a batch's column lam[:, m] is a contiguous slice
        self._pool = torch.from_numpy(np.ascontiguousarray(self._pool_np.T, dtype=np.float32)).T
        self._pos, self._pool_len = 0, size

    def __call__(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights ``(n, k)`` (or ``(1, k)`` per batch), float32, and partner indices ``(n, k)``, int64, on the CPU."""
        rows = n if self.per_sample else 1
        if self._pos + rows > self._pool_len:
            self._refill(rows)
        lam = self._pool[self._pos : self._pos + rows]
        self._pos += rows
        self.count += n
        if not self.per_sample:
            self._batch_sizes.append(n)
        pool = self._partner_pools.get(n)
        if pool is None or pool[1] == pool[3]:
            most = max(1, self.pool_size // max(n, 1))
            left = self._batches_left()
            batches = min(left, most) if left is not None else (2 if pool is None else pool[2])
            indices = _partners(n, self.k, self.rng, self.distinct_partners, batches)
            # (batches, k, n) storage: a batch's partner column index[:, m] is contiguous; one unbind makes every
            # batch's (n, k) view at once, so a batch costs a tuple lookup rather than two tensor ops
            indices = torch.from_numpy(np.ascontiguousarray(indices.transpose(0, 2, 1))).transpose(1, 2).unbind(0)
            pool = self._partner_pools[n] = [indices, 0, min(2 * batches, most), batches]
        index = pool[0][pool[1]]
        pool[1] += 1
        self._served += 1
        return lam, index


def mix(tensor: torch.Tensor, lam: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``out[i] = sum_m lam[i, m] * tensor[index[i, m]]`` for any tensor whose first dimension is the batch.

    ``lam`` is ``(N, k)`` or ``(1, k)`` on ``tensor``'s device, rows summing to one; ``index`` is ``(N, k)`` with
    ``index[:, 0]`` the identity (as :func:`sample_mixing` returns), so the first term needs no gather. A new tensor
    is returned; the input is left untouched (unlike timm's ``Mixup``, which overwrites the batch).
    """
    # index_select is several times cheaper than advanced indexing for tiny batches, where per-op cost dominates
    shape = (lam.shape[0],) + (1,) * (tensor.ndim - 1)
    if index.shape[1] == 2:  # lam_0 x + lam_1 x_pi = x_pi + lam_0 (x - x_pi): one gather, one fused op
        return torch.lerp(tensor.index_select(0, index[:, 1]), tensor, lam[:, 0].reshape(shape))
    out = tensor * lam[:, 0].reshape(shape)
    for m in range(1, index.shape[1]):
        out.addcmul_(tensor.index_select(0, index[:, m]), lam[:, m].reshape(shape))
    return out


def mix_targets(
    targets: torch.Tensor, lam: torch.Tensor, index: torch.Tensor, num_classes: int | None = None
) -> torch.Tensor:
    """Soft targets ``sum_m lam_m onehot(y_m)`` from class indices ``(N,)`` or mixed soft targets ``(N, C)``."""
    if targets.is_floating_point():
        return mix(targets, lam if lam.dtype == targets.dtype else lam.to(targets.dtype), index)
    if num_classes is None:
        raise ValueError("Integer class-index targets need `num_classes` to become soft mixup targets.")
    n, k = index.shape
    lam = lam if lam.dtype == torch.float32 else lam.float()
    out = torch.zeros(n, num_classes, dtype=torch.float32, device=targets.device)
    # one scatter: each output row receives weight lam[i, m] at class y[index[i, m]]
    return out.scatter_add_(1, targets.take(index), lam.expand(n, k))


def mixup(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    num_classes: int | None = None,
    alpha: float = 1.0,
    num_points: int = 2,
    per_sample: bool = True,
    distinct_partners: bool = True,
    rng: np.random.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mix one batch: returns ``(mixed_inputs, soft_targets, lam)`` as new tensors (``lam`` is ``(N, k)``).

    The functional form of :class:`MixupCallback`, for code that cannot use the callback (a tuple batch, a loss
    computed on a sub-batch). ``rng`` defaults to a generator seeded from torch's global generator.

    Example::

        >>> x, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 1, 0])
        >>> x_mix, y_mix, lam = mixup(x, y, num_classes=3, num_points=3, rng=np.random.default_rng(0))
        >>> x_mix.shape, y_mix.shape, bool(torch.allclose(y_mix.sum(1), torch.ones(5)))
        (torch.Size([5, 3]), torch.Size([5, 3]), True)
    """
    if rng is None:
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))
    lam_np, index_np = sample_mixing(len(inputs), num_points, alpha, rng, per_sample, distinct_partners)
    dtype = inputs.dtype if inputs.is_floating_point() else torch.float32
    lam = torch.from_numpy(lam_np).to(device=inputs.device, dtype=dtype)
    index = torch.from_numpy(index_np).to(inputs.device)
    return mix(inputs, lam, index), mix_targets(targets, lam, index, num_classes), lam.expand(len(inputs), num_points)


# -- the callback -------------------------------------------------------------------------------------------------
def _finite_batches(trainer: pl.Trainer) -> int | None:
    """Training batches in this epoch, or None when unknown (an iterable dataset without a length)."""
    batches = trainer.num_training_batches
    return int(batches) if isinstance(batches, (int, float)) and 0 < batches < float("inf") else None


_BATCH_FIX = (
    "MixupCallback replaces the inputs and targets inside the training batch (a Callback cannot return a new "
    "batch), so the batch must be a list or a dict. Fix: return a list `[inputs, targets]` from your Dataset / "
    "collate_fn (PyTorch's default collate turns `(x, y)` samples into a list), or convert it in your "
    "LightningModule, which runs before this callback: `def on_after_batch_transfer(self, batch, dataloader_idx): "
    "return list(batch)` (for a NamedTuple: `return batch._asdict()` and set `input_key` / `target_key`). "
    "Or call `callbacks.mixup.mixup(x, y, ...)` in your own training_step instead of using the callback."
)


class MixupCallback(Callback):
    r"""k-point mixup of every training batch, for any LightningModule whose loss accepts soft targets.

    Before each training step the callback replaces the batch's inputs ``x`` by ``sum_m lam_m x_{pi_m}`` and its
    targets by ``sum_m lam_m onehot(y_{pi_m})`` (Chaudhry et al. 2022, Sec. 3; Zhang et al. 2018, Eq. 1), with
    ``lam ~ Dirichlet(alpha * 1_k)`` drawn per example (or per batch) and ``k - 1`` partners from random
    permutations of the batch. Validation, test and predict batches are never touched (the callback acts only in
    ``on_train_batch_start``). The module needs no change as long as its training loss takes probability-vector
    targets: ``F.cross_entropy(logits, targets)`` does, as does :class:`~lightning_methods.ClassifierModule`.

    Supported batch forms (checked on the first batch, before the first training step):

    * a **list** ``[inputs, targets, *others]`` (what PyTorch's default collate makes of ``(x, y)`` samples, and
      what every datamodule of this package yields): ``batch[input_key]`` and ``batch[target_key]`` are replaced;
    * a **dict** (any mutable mapping), e.g. ``{"pixel_values": x, "labels": y}`` with ``input_key="pixel_values"``,
      ``target_key="labels"``.

    Why only these: Lightning passes the same batch object to ``on_train_batch_start`` and then to
    ``training_step``, and ignores what a callback returns, so the only way a callback can change the batch is to
    assign into it. Tuples, NamedTuples, bare tensors and other immutable containers raise a ``TypeError`` that
    names the fix (return a list, or convert it in the module's ``on_after_batch_transfer``).

    Inputs must be floating tensors whose first dimension is the batch. Targets are class indices ``(N,)``
    (turned into soft ``(N, C)`` targets; needs ``num_classes``, taken from the datamodule or module when not
    given) or soft targets ``(N, C)`` (mixed as they are). Odd and size-1 batches are fine: partners come from
    permutations, not from ``flip(0)`` as in timm; a size-1 batch mixes the example with itself (its target just
    becomes one-hot).

    Randomness comes from a numpy generator keyed by ``(seed, global rank, epoch)``, so runs are reproducible,
    DDP ranks draw different weights, and a run resumed from an end-of-epoch checkpoint continues exactly as the
    uninterrupted run would (the resolved seed is stored in the checkpoint).

    Logged each epoch: ``mixup/lam_max`` (mean largest weight of a mixed example: ``1`` is no mixing, ``1/k`` a
    uniform mix) and ``mixup/lam_self`` (mean weight an example keeps of itself; ``1/k`` in expectation).

    Args:
        alpha: Dirichlet concentration (``alpha > 0``); ``alpha = 1`` draws uniformly from the simplex, small
            values give mixes close to one example.
        num_points: ``k``, how many examples are mixed into each training example (2 is classic mixup).
        num_classes: number of classes for class-index targets; ``None`` takes ``num_classes`` from the datamodule
            (or, failing that, the LightningModule) at setup.
        per_sample: one ``lam`` per example (Chaudhry et al.) or one per batch (Zhang et al., timm's default).
        distinct_partners: no self-pairs or repeated partners (see :func:`sample_mixing`); ``False`` for
            independent permutations as in the reference implementations.
        input_key: index (list batch) or key (dict batch) of the inputs.
        target_key: index or key of the targets.
        seed: seed of the mixing draws; ``None`` uses ``torch.initial_seed()`` at the start of ``fit`` (the seed
            ``seed_everything`` set).
        log_stats: log the lambda statistics above.

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
    """

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
    ) -> None:
        super().__init__()
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise ValueError(f"`alpha` must be a positive number (the Dirichlet concentration), got {alpha!r}.")
        if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 2:
            raise ValueError(f"`num_points` must be an integer >= 2 (examples mixed per output), got {num_points!r}.")
        if num_classes is not None:
            check_num_classes(num_classes)
        if input_key == target_key:
            raise ValueError(f"`input_key` and `target_key` must differ, both are {input_key!r}.")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"`seed` must be an integer or None, got {seed!r}.")
        self.alpha = float(alpha)
        self.num_points = num_points
        self.num_classes = num_classes
        self.per_sample = per_sample
        self.distinct_partners = distinct_partners
        self.input_key = input_key
        self.target_key = target_key
        self.seed = seed
        self.log_stats = log_stats
        self._resolved_seed: int | None = seed
        self._state_key = self._generate_state_key(alpha=self.alpha, num_points=num_points, per_sample=per_sample)
        self._sampler: MixingSampler | None = None
        self._checked = False
        self.num_mixed_batches = 0
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

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
        self._checked = False

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A stream per (seed, rank, epoch): ranks differ, and resuming at an epoch boundary replays exactly.
        rng = np.random.default_rng([self._resolved_seed, trainer.global_rank, trainer.current_epoch])
        self._sampler = MixingSampler(
            self.num_points, self.alpha, rng, self.per_sample, self.distinct_partners,
            num_batches=_finite_batches(trainer),
        )

    # -- the mixing ----------------------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if not self._checked:
            self._check_batch(batch)
            self._checked = True
        if self._sampler is None:  # the loop always calls on_train_epoch_start first; stay reproducible regardless
            self.on_train_epoch_start(trainer, pl_module)
        x, y = batch[self.input_key], batch[self.target_key]
        lam, index = self._sampler(x.shape[0])
        if x.device.type != "cpu":
            lam, index = lam.to(x.device, non_blocking=True), index.to(x.device, non_blocking=True)
        batch[self.target_key] = mix_targets(y, lam, index, self._classes)
        batch[self.input_key] = mix(x, lam if x.dtype == lam.dtype else lam.to(x.dtype), index)
        self.num_mixed_batches += 1
        self._last = (lam, index)

    @property
    def last_lam(self) -> torch.Tensor | None:
        """Weights ``(N, k)`` of the last mixed batch (rows sum to one), for inspection."""
        return None if self._last is None else self._last[0].expand(len(self._last[1]), self.num_points)

    @property
    def last_index(self) -> torch.Tensor | None:
        """Partner indices ``(N, k)`` of the last mixed batch; row ``i`` mixed examples ``last_index[i]``."""
        return None if self._last is None else self._last[1]

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sampler = self._sampler
        if self.log_stats and sampler is not None and sampler.count > 0:
            pl_module.log("mixup/lam_max", sampler.sum_max / sampler.count, sync_dist=True)
            pl_module.log("mixup/lam_self", sampler.sum_self / sampler.count, sync_dist=True)

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
        return {"seed": self._resolved_seed, "num_mixed_batches": self.num_mixed_batches}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.seed is not None and state_dict.get("seed") not in (None, self.seed):
            rank_zero_warn(
                f"MixupCallback(seed={self.seed}) resumes a run that mixed with seed {state_dict['seed']}; "
                f"keeping seed={self.seed}."
            )
        else:
            self._resolved_seed = state_dict.get("seed", self._resolved_seed)
        self.num_mixed_batches = int(state_dict.get("num_mixed_batches", 0))
