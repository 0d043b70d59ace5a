"""Privacy accounting, the privacy ledger, secret randomness and the budget callback of DP training.

Private to ``lightning_methods`` (re-exported by :mod:`lightning_methods.dpsgd_f` and, for the callback, by
:mod:`callbacks.privacy`): the module and the callback both need these pieces, and ``lightning_methods`` never
imports ``callbacks``.
"""

from __future__ import annotations

import functools
import math
import secrets
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from opacus.accountants import create_accountant
from torch import nn

Mechanism = Literal["rdp", "prv"]


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
    preprocessing releases first), the calibrated SGD noise multiplier, the sample rate, and whether every release
    so far drew its randomness from a secret source (``private``). Being module state, it travels in every
    checkpoint and in ``ddp_spawn``'s weight transfer, and a resumed run or a new ``fit`` after
    ``load_from_checkpoint`` continues the same ledger: the accounting never restarts.

    It holds nothing that regenerates the noise or the Poisson batches: those draw from secret generators that live
    only in memory for one ``fit`` (:func:`secret_generator`), never in the ``state_dict``, the checkpoint, the
    hyperparameters or the logs.

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
        self.private = True
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
            "version": 2,
            "mechanism": self.mechanism,
            "history": [list(event) for event in self.history],
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "planned_steps": self.planned_steps,
            "private": self.private,
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
        # version 1 also stored the seed of the DP randomness: it is ignored (and dropped at the next save), the
        # noise of this run comes from a fresh secret generator
        self.private = bool(state.get("private", True))
        noise = state["preprocessing_noise"]
        self.preprocessing_noise = (float(noise[0]), float(noise[1])) if noise else None
        self.steps = int(state["steps"])

    def extra_repr(self) -> str:
        return (
            f"mechanism={self.mechanism!r}, steps={self.steps}, noise_multiplier={self.noise_multiplier}, "
            f"private={self.private}"
        )


# ---------------------------------------------------------------------------------------------------------------
# Randomness of the DP releases: secret by default
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


def secret_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator seeded with 63 bits from the OS' entropy pool (``secrets``), never stored anywhere.

    The default source of every DP draw (Poisson sampling, the noise of the mean, of the radius histogram and of
    each SGD step): ``seed_everything`` cannot fix it and no checkpoint, ``state_dict`` or log can regenerate it.
    It is torch's generator (Philox on GPU, Mersenne Twister on CPU), as in Opacus without ``secure_mode``; see
    :class:`~lightning_methods.DPSGDFModule`'s ``secure_mode`` for reseeding every step and noise robust to
    floating-point attacks.
    """
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


def debug_generator(seed: int, *parts: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A *reproducible* generator from ``(seed, *parts)``: only for ``insecure_debug_seed`` runs (not private)."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, *parts))


# ---------------------------------------------------------------------------------------------------------------
# The budget callback
# ---------------------------------------------------------------------------------------------------------------

class PrivacyBudget(Callback):
    """Stop training before the next differentially private step would spend more than a privacy budget.

    Reads the module's privacy ledger (the composed history of Gaussian releases kept by
    :class:`~lightning_methods.DPSGDFModule`), computes once how many more steps fit in ``max_epsilon`` at
    ``delta``, caps the module's steps there (the module skips any batch beyond the cap) and sets
    ``trainer.should_stop`` when the cap is reached, so training ends cleanly (validation and checkpointing still
    run).

    Its state (the epsilon spent when a checkpoint was written) is saved in the checkpoint; on resume, a module
    whose restored ledger reports less than that (its ledger was lost, e.g. weights loaded without the
    ``privacy_ledger`` entry) is refused instead of silently restarting the accounting from zero. A budget below
    what the start of ``fit`` spends by itself (the private preprocessing, or a ledger restored from a checkpoint)
    is refused too. Both checks run in ``on_train_start``, which Lightning calls on callbacks before the module's
    own ``on_train_start``, where the first release happens: nothing is released before the refusal.

    Args:
        max_epsilon: the budget; ``None`` uses the module's ``target_epsilon``. A smaller value stops earlier.
        delta: the delta at which epsilon is measured; ``None`` uses the module's ``delta``.

    Note:
        :class:`~lightning_methods.DPSGDFModule` adds a ``PrivacyBudget()`` itself (through
        ``configure_callbacks``) unless the Trainer already has one, and never exceeds its own ``target_epsilon``
        even without this callback; the callback adds a graceful stop, a possibly smaller budget, and the resume
        check. It works with any LightningModule exposing ``privacy_ledger``, ``delta``, ``target_epsilon`` and
        ``cap_private_steps(n)`` (and, optionally, ``epsilon_at_start(delta)``: the epsilon spent before the first
        step).

    Example::

        >>> budget = PrivacyBudget(max_epsilon=0.5)  # stop at epsilon 0.5 even if the module targets more
        >>> trainer = pl.Trainer(callbacks=[budget], max_epochs=30)  # doctest: +SKIP
    """

    def __init__(self, max_epsilon: float | None = None, delta: float | None = None) -> None:
        if max_epsilon is not None and not max_epsilon > 0:
            raise ValueError(f"`max_epsilon` must be positive (or None for the module's target), got {max_epsilon!r}.")
        if delta is not None and not 0.0 < delta < 1.0:
            raise ValueError(f"`delta` must be in (0, 1) (or None for the module's), got {delta!r}.")
        self.max_epsilon = max_epsilon
        self.delta = delta
        self._module: Any = None
        self._step_limit: int | None = None
        self._restored_spent: float | None = None
        self._announced = False
        self._state_key: str | None = None

    @property
    def state_key(self) -> str:
        # Lightning reads this on every hook call: build it once
        if self._state_key is None:
            self._state_key = self._generate_state_key(max_epsilon=self.max_epsilon, delta=self.delta)
        return self._state_key

    def _budget(self, pl_module: Any) -> tuple[float, float]:
        epsilon = self.max_epsilon if self.max_epsilon is not None else pl_module.target_epsilon
        delta = self.delta if self.delta is not None else pl_module.delta
        return float(epsilon), float(delta)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        missing = [a for a in ("privacy_ledger", "delta", "target_epsilon", "cap_private_steps") if not hasattr(pl_module, a)]
        if missing:
            raise TypeError(
                f"PrivacyBudget needs a module that keeps a privacy ledger (e.g. lightning_methods.DPSGDFModule); "
                f"{type(pl_module).__name__} lacks {', '.join(missing)}."
            )
        self._module = pl_module
        self._step_limit = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        # before any release: the module's on_train_start (preprocessing) runs after the callbacks'
        ledger = pl_module.privacy_ledger
        epsilon, delta = self._budget(pl_module)
        spent = ledger.epsilon(delta)
        if self._restored_spent is not None and spent < self._restored_spent - 1e-9:
            raise RuntimeError(
                f"The checkpoint recorded epsilon={self._restored_spent:.4f} spent, but the module's privacy ledger "
                f"reports {spent:.4f}: its ledger was not restored. Resume with `trainer.fit(..., ckpt_path=...)` "
                "on a module whose state_dict includes `privacy_ledger._extra_state`."
            )
        at_start = pl_module.epsilon_at_start(delta) if hasattr(pl_module, "epsilon_at_start") else spent
        if at_start > epsilon:
            raise ValueError(
                f"`PrivacyBudget(max_epsilon={epsilon})` is below the epsilon={at_start:.4g} (delta={delta}) that "
                "this fit spends before its first step (the private preprocessing and any ledger restored from a "
                "checkpoint): raise `max_epsilon`, or lower the module's `preprocessing_budget_fraction`."
            )

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._step_limit is not None:
            return
        # the first batch: the module has fitted its preprocessing and calibrated its noise in on_train_start
        ledger = pl_module.privacy_ledger
        epsilon, delta = self._budget(pl_module)
        self._step_limit = ledger.steps + ledger.steps_within(epsilon, delta)
        pl_module.cap_private_steps(self._step_limit)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._step_limit is not None and pl_module.privacy_ledger.steps >= self._step_limit:
            trainer.should_stop = True
            if not self._announced:
                epsilon, delta = self._budget(pl_module)
                rank_zero_info(
                    f"PrivacyBudget: stopping after {pl_module.privacy_ledger.steps} private steps; one more would "
                    f"exceed epsilon={epsilon} at delta={delta}."
                )
                self._announced = True

    def state_dict(self) -> dict[str, Any]:
        if self._module is None:
            return {}
        _, delta = self._budget(self._module)
        return {"spent_epsilon": self._module.privacy_ledger.epsilon(delta), "delta": delta}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored_spent = state_dict.get("spent_epsilon")
