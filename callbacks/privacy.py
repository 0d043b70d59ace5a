"""Privacy-budget enforcement for differentially private training (DP-SGD, DPSGD-F)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

__all__ = ["PrivacyBudget"]


class PrivacyBudget(Callback):
    """Stop training before the next differentially private step would spend more than a privacy budget.

    Reads the module's privacy ledger (the composed history of Gaussian releases kept by
    :class:`~lightning_methods.DPSGDFModule`), computes once how many more steps fit in ``max_epsilon`` at
    ``delta``, caps the module's steps there (the module skips any batch beyond the cap) and sets
    ``trainer.should_stop`` when the cap is reached, so training ends cleanly (validation and checkpointing still
    run).

    Its state (the epsilon spent when a checkpoint was written) is saved in the checkpoint; on resume, a module
    whose restored ledger reports less than that (its ledger was lost, e.g. weights loaded without the
    ``privacy_ledger`` entry) is refused instead of silently restarting the accounting from zero.

    Args:
        max_epsilon: the budget; ``None`` uses the module's ``target_epsilon``. A smaller value stops earlier.
        delta: the delta at which epsilon is measured; ``None`` uses the module's ``delta``.

    Note:
        :class:`~lightning_methods.DPSGDFModule` adds a ``PrivacyBudget()`` itself (through
        ``configure_callbacks``) unless the Trainer already has one, and never exceeds its own ``target_epsilon``
        even without this callback; the callback adds a graceful stop, a possibly smaller budget, and the resume
        check. It works with any LightningModule exposing ``privacy_ledger``, ``delta``, ``target_epsilon`` and
        ``cap_private_steps(n)``.

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

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._step_limit is not None:
            return
        # the first batch: the module has fitted its preprocessing and calibrated its noise in on_train_start
        ledger = pl_module.privacy_ledger
        epsilon, delta = self._budget(pl_module)
        spent = ledger.epsilon(delta)
        if self._restored_spent is not None and spent < self._restored_spent - 1e-9:
            raise RuntimeError(
                f"The checkpoint recorded epsilon={self._restored_spent:.4f} spent, but the module's privacy ledger "
                f"reports {spent:.4f}: its ledger was not restored. Resume with `trainer.fit(..., ckpt_path=...)` "
                "on a module whose state_dict includes `privacy_ledger._extra_state`."
            )
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
