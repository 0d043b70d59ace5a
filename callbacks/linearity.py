"""How linear is each layer between data points? The interpolation-deviation probe of the mixup-linearity paper.

Paper: Chaudhry, Menon, Veit, Jayasumana, Ramalingam, Kumar, *When does mixup promote local linearity in learned
representations?* (arXiv 2210.16413). The paper asks whether mixup, which asks the *output* to be linear between
training points, makes the *intermediate* layers linear too. It measures, per layer, how far the representation of a
mixed input is from the mix of the representations. This module implements that measure, normalised so that layers
of different widths and scales are comparable:

    NL_l = E || h_l(sum_m lam_m x_m) - sum_m lam_m h_l(x_m) ||^2
           / E [ sum_m lam_m || h_l(x_m) - sum_m' lam_m' h_l(x_m') ||^2 ],

where the expectations run over held-out k-tuples ``(x_1..x_k)`` and weights ``lam ~ Dirichlet(alpha 1_k)`` (use the
training distribution of ``lam``). The numerator is the interpolation error of the layer; the denominator is the
lam-weighted spread of the endpoint representations, the error a layer would make if it mapped every mix to one
endpoint's representation. ``NL = 0`` exactly for an affine map; larger is less linear. The output is measured in
logit space (``logits``) and in probability space (``probs``): mixup asks for linearity of the probabilities, and in
logit space a network trained without mixup can look more linear than one trained with it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_methods._layers import capture_layers, layer_output, resolve_layer
from lightning_methods.mixup import sample_mixing

__all__ = ["LinearityCallback", "interpolation_deviation", "plot_linearity", "OUTPUT_NAMES"]

#: names under which the output is reported, in logit and in probability space
OUTPUT_NAMES = ("logits", "probs")


def _resolve_layers(module: nn.Module, layers: Sequence[str]) -> dict[str, nn.Module]:
    """Submodules by name: a full name under ``module``, or a name under its ``model`` (the injected backbone)."""
    for name in layers:
        if name in OUTPUT_NAMES:
            raise ValueError(f"Layer name {name!r} is reserved for the output; name a submodule instead.")
    return {name: resolve_layer(module, name, arg="LinearityCallback(layers)", under="model") for name in layers}


@torch.no_grad()
def interpolation_deviation(
    module: nn.Module,
    inputs: torch.Tensor,
    lam: torch.Tensor,
    index: torch.Tensor,
    layers: Sequence[str] = (),
    output: bool = True,
    batch_size: int = 256,
) -> dict[str, torch.Tensor]:
    """Sums of the numerator and denominator of ``NL`` (module docstring) over the tuples ``(lam, index)``.

    Args:
        module: the network (its ``forward`` returns logits ``(N, C)`` when ``output`` is on); run as it is (put it
            in eval mode first for a deterministic measurement).
        inputs: the held-out points ``(n, ...)``.
        lam: mixing weights ``(T, k)`` (rows sum to one), on ``inputs``' device.
        index: int64 indices into ``inputs`` ``(T, k)``; tuple ``t`` mixes ``inputs[index[t]]`` with ``lam[t]``.
        layers: submodule names (see :class:`LinearityCallback`).
        output: also measure the output as ``logits`` and ``probs``.
        batch_size: tuples per forward pass.

    Returns:
        ``{name: tensor([numerator_sum, denominator_sum])}`` in float64; ``NL = numerator / denominator``. Sums, not
        ratios, so shards of the tuples (DDP ranks) can be added before dividing.
    """
    targets = _resolve_layers(module, layers)
    names = list(targets) + (list(OUTPUT_NAMES) if output else [])
    sums = {name: torch.zeros(2, dtype=torch.float64, device=inputs.device) for name in names}
    k = index.shape[1]
    with capture_layers(targets) as captured:
        for start in range(0, len(index), batch_size):
            idx, weights = index[start : start + batch_size], lam[start : start + batch_size]
            b = len(idx)

            def features(x: torch.Tensor) -> dict[str, torch.Tensor]:
                captured.clear()
                out = module(x)
                feats = {
                    name: layer_output(captured, name, layer, module, len(x), "LinearityCallback(layers)").reshape(len(x), -1).double()
                    for name, layer in targets.items()
                }
                if output:
                    if not isinstance(out, torch.Tensor) or out.ndim != 2:
                        raise TypeError(
                            f"LinearityCallback(output=True) needs the module to return logits (N, C); got "
                            f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}. "
                            "Set `output=False`."
                        )
                    feats["logits"] = out.double()
                    feats["probs"] = out.double().softmax(-1)
                return feats

            x_end = inputs[idx.reshape(-1)]  # the k endpoints of every tuple, tuple-major
            shape = (b, k) + (1,) * (inputs.ndim - 1)
            x_mix = (weights.to(inputs.dtype).reshape(shape) * x_end.reshape(b, k, *inputs.shape[1:])).sum(1)
            ends, mixed = features(x_end), features(x_mix)
            w = weights.double().unsqueeze(-1)  # (b, k, 1)
            for name in names:
                h_end = ends[name].reshape(b, k, -1)
                h_bar = (w * h_end).sum(1)  # sum_m lam_m h(x_m)
                sums[name][0] += (mixed[name] - h_bar).pow(2).sum()
                sums[name][1] += (w * (h_end - h_bar.unsqueeze(1)).pow(2)).sum()
    return sums


class LinearityCallback(Callback):
    r"""Log how linear each named layer is between held-out points (normalised interpolation deviation).

    Every ``every_n_epochs`` epochs (or ``every_n_train_steps`` steps) the callback puts the module in eval mode and
    computes, for each layer in ``layers`` and for the output in logit and probability space, the normalised
    interpolation deviation ``NL`` of the module docstring (0 for an affine map, larger is less linear) on a fixed
    set of ``num_samples`` held-out k-tuples with weights ``lam ~ Dirichlet(alpha 1_k)``. The tuples are drawn once
    (seeded) so successive measurements are comparable. Values are logged as ``linearity/<layer>``,
    ``linearity/logits`` and ``linearity/probs``, and kept in :attr:`history` (saved in the checkpoint), which
    :meth:`plot` / :func:`plot_linearity` draw.

    The held-out points are the first ``num_samples`` inputs of the datamodule's ``split`` loader (``val`` by default),
    or ``inputs`` when given. Under DDP every rank reads the same points, measures a disjoint share of the tuples and
    the sums are added across ranks, so the value equals the single-process one.

    Args:
        layers: submodule names, full (``"model.body.block0"``) or relative to the module's backbone ``model``
            (``"body.block0"``); each must return a tensor. May be empty to measure only the output.
        every_n_epochs: measure at the end of every n-th training epoch (``None`` to disable).
        every_n_train_steps: measure every n optimizer steps instead (``None`` to disable).
        num_points: ``k``, points per interpolation (the training ``num_points`` of mixup).
        alpha: Dirichlet concentration of ``lam`` (the training ``alpha``).
        num_samples: held-out points, and number of k-tuples.
        batch_size: tuples per forward pass.
        split: datamodule split the points come from (``"val"``, ``"test"`` or ``"train"``).
        output: also measure the output (``logits`` and ``probs``); the module must return ``(N, C)`` logits.
        measure_at_start: record a measurement before the first step (in :attr:`history`, not logged).
        seed: seed of the tuples and weights.
        inputs: held-out inputs to use instead of the datamodule's.

    Note:
        The measurement costs ``(k + 1) * num_samples`` forward passes (split across DDP ranks). Layers with
        BatchNorm or dropout are measured in eval mode, i.e. as the deployed network.

    Example::

        >>> from lightning_methods.nets import MLP
        >>> net = MLP(in_features=4, num_classes=3, hidden_sizes=[8])
        >>> cb = LinearityCallback(layers=["body.block0"], inputs=torch.randn(64, 4), num_samples=64)
        >>> sorted(cb.measure(net))
        ['body.block0', 'logits', 'probs']
    """

    def __init__(
        self,
        layers: Sequence[str] = (),
        every_n_epochs: int | None = 1,
        every_n_train_steps: int | None = None,
        num_points: int = 2,
        alpha: float = 1.0,
        num_samples: int = 512,
        batch_size: int = 256,
        split: Literal["val", "test", "train"] = "val",
        output: bool = True,
        measure_at_start: bool = True,
        seed: int = 0,
        inputs: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if isinstance(layers, str):
            raise TypeError(f"`layers` must be a list of submodule names, got the string {layers!r}: use [{layers!r}].")
        layers = list(layers)
        if not layers and not output:
            raise ValueError("Nothing to measure: give `layers` or set `output=True`.")
        for name, value in (("every_n_epochs", every_n_epochs), ("every_n_train_steps", every_n_train_steps)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"`{name}` must be a positive integer or None, got {value!r}.")
        if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 2:
            raise ValueError(f"`num_points` must be an integer >= 2, got {num_points!r}.")
        if not alpha > 0:
            raise ValueError(f"`alpha` must be positive, got {alpha!r}.")
        if not isinstance(num_samples, int) or num_samples < 2:
            raise ValueError(f"`num_samples` must be an integer >= 2, got {num_samples!r}.")
        if split not in ("val", "test", "train"):
            raise ValueError(f"`split` must be 'val', 'test' or 'train', got {split!r}.")
        self.layers = layers
        self.every_n_epochs = every_n_epochs
        self.every_n_train_steps = every_n_train_steps
        self.num_points = num_points
        self.alpha = float(alpha)
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.split = split
        self.output = output
        self.measure_at_start = measure_at_start
        self.seed = seed
        self.inputs = inputs
        self._state_key = self._generate_state_key(layers=tuple(layers), num_points=num_points, alpha=self.alpha)
        #: one dict per measurement: ``epoch``, ``step`` and ``NL`` per layer name (and ``logits`` / ``probs``)
        self.history: list[dict[str, float]] = []
        self._probe: torch.Tensor | None = None

    @property
    def state_key(self) -> str:
        return self._state_key  # Lightning reads it around every hook call: computed once in __init__

    @property
    def names(self) -> list[str]:
        """The reported names: the layers, then ``logits`` and ``probs`` when ``output`` is on."""
        return self.layers + (list(OUTPUT_NAMES) if self.output else [])

    # -- held-out points and tuples ---------------------------------------------------------------------------------
    def _probe_inputs(self, trainer: pl.Trainer | None) -> torch.Tensor:
        if self.inputs is not None:
            return torch.as_tensor(self.inputs)[: self.num_samples]
        datamodule = trainer.datamodule if trainer is not None else None
        if datamodule is None or not hasattr(datamodule, f"{self.split}_dataloader"):
            raise ValueError(
                "LinearityCallback needs held-out inputs: fit with a datamodule that has a "
                f"`{self.split}_dataloader` (`trainer.fit(model, datamodule=...)`) or pass `inputs=` a tensor."
            )
        # The datamodule's own loader, not the Trainer's: it is not sharded, so every DDP rank sees the same points.
        chunks, count = [], 0
        for batch in getattr(datamodule, f"{self.split}_dataloader")():
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            if not isinstance(x, torch.Tensor):
                raise TypeError(
                    f"LinearityCallback reads inputs as `batch[0]` of the {self.split} loader; got "
                    f"{type(x).__name__}. Pass `inputs=` a tensor instead."
                )
            chunks.append(x)
            count += len(x)
            if count >= self.num_samples:
                break
        if count < 2:
            raise ValueError(f"The {self.split} split has {count} examples; LinearityCallback needs at least 2.")
        return torch.cat(chunks)[: self.num_samples]

    def _tuples(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        lam, index = sample_mixing(n, self.num_points, self.alpha, np.random.default_rng(self.seed))
        return torch.from_numpy(lam), torch.from_numpy(index)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Fail before training on a missing layer, a non-tensor layer output or an output that is not logits.
        self._probe = self._probe_inputs(trainer)
        _resolve_layers(pl_module, self.layers)
        x = self._probe[:2].to(pl_module.device)
        was_training = pl_module.training
        pl_module.eval()
        try:
            interpolation_deviation(
                pl_module, x, torch.full((2, 2), 0.5, device=x.device), torch.tensor([[0, 1], [1, 0]], device=x.device),
                self.layers, self.output,
            )
        finally:
            pl_module.train(was_training)

    # -- measuring -------------------------------------------------------------------------------------------------
    def measure(self, module: nn.Module, trainer: pl.Trainer | None = None) -> dict[str, float]:
        """``NL`` of every layer (and of ``logits`` / ``probs``) now, on the held-out tuples; module in eval mode.

        Usable outside training (``trainer=None``, with ``inputs`` given); with a DDP ``trainer`` it must be called on
        every rank (the sums are all-reduced).
        """
        if self._probe is None:
            self._probe = self._probe_inputs(trainer)
        param = next(module.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        inputs = self._probe.to(device)
        lam, index = self._tuples(len(inputs))
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        share = torch.arange(rank, len(inputs), world)
        was_training = module.training
        module.eval()
        try:
            sums = interpolation_deviation(
                module, inputs, lam[share].to(device), index[share].to(device), self.layers, self.output, self.batch_size
            )
        finally:
            module.train(was_training)
        stacked = torch.stack([sums[name] for name in self.names])
        if trainer is not None and world > 1:
            stacked = trainer.strategy.reduce(stacked, reduce_op="sum")
        stacked = stacked.cpu()
        return {
            name: float(num / den) if den > 0 else (0.0 if num == 0 else math.inf)
            for name, (num, den) in zip(self.names, stacked.tolist())
        }

    def _record(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, epochs: float, on_step: bool | None
    ) -> None:
        # `epoch` is in completed (possibly fractional) epochs, so start, step and epoch-end points share one axis
        values = self.measure(pl_module, trainer)
        self.history.append({"epoch": epochs, "step": trainer.global_step, **values})
        if on_step is not None:
            for name, value in values.items():
                pl_module.log(f"linearity/{name}", value, on_step=on_step, on_epoch=not on_step, rank_zero_only=True)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.measure_at_start and not self.history:  # a resumed run already has its starting point
            self._record(trainer, pl_module, 0, on_step=None)  # recorded, not logged (no step to log it at)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        n = self.every_n_train_steps
        step = trainer.global_step
        if n and step % n == 0 and (not self.history or self.history[-1]["step"] != step):
            epochs = trainer.current_epoch + (batch_idx + 1) / max(1, trainer.num_training_batches)
            self._record(trainer, pl_module, epochs, on_step=True)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        n = self.every_n_epochs
        if n and (trainer.current_epoch + 1) % n == 0:
            self._record(trainer, pl_module, trainer.current_epoch + 1, on_step=False)

    # -- checkpointing and plotting ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(entry) for entry in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(entry) for entry in state_dict.get("history", [])]

    def plot(self, path: str | None = None, x: Literal["epoch", "step"] = "epoch") -> Any:
        """Draw :attr:`history` (one curve per layer) and save it to ``path`` when given; returns the figure."""
        fig = plot_linearity(self.history, self.names, x=x)
        if path is not None:
            fig.savefig(path, dpi=120, bbox_inches="tight")
        return fig


def plot_linearity(
    history: Sequence[dict[str, float]], names: Sequence[str] | None = None, x: str = "epoch", ax: Any = None
) -> Any:
    """Plot ``NL`` per layer against ``x`` (``"epoch"`` or ``"step"``) from a :attr:`LinearityCallback.history`.

    Args:
        history: the measurements.
        names: layers to draw (default: every name in the history).
        x: the horizontal axis.
        ax: a matplotlib axes to draw into (a new figure otherwise).

    Returns:
        The matplotlib figure.
    """
    from matplotlib.figure import Figure  # no pyplot: works under any backend, leaves global state alone

    if names is None:
        names = [k for k in (history[0] if history else {}) if k not in ("epoch", "step")]
    if ax is None:
        fig = Figure(figsize=(6, 4))
        ax = fig.subplots()
    else:
        fig = ax.figure
    xs = [entry[x] for entry in history]
    for name in names:
        ax.plot(xs, [entry[name] for entry in history], marker="o", ms=3, label=name)
    ax.set_xlabel(x)
    ax.set_ylabel("normalised interpolation deviation (0 = linear)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig
