"""The plain supervised classifier: the base model, teacher and baseline of every technique in this library."""

from __future__ import annotations

import inspect
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import MulticlassAccuracy

from lightning_methods._utils import check_model_against_data, check_num_classes, check_targets, save_hparams

__all__ = ["ClassifierModule", "hard_targets", "soft_cross_entropy"]


def hard_targets(targets: torch.Tensor) -> torch.Tensor:
    """Class indices from class-index ``(N,)`` or soft ``(N, C)`` targets (the argmax of a soft target)."""
    return targets.argmax(dim=-1) if targets.ndim == 2 else targets


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy against class indices ``(N,)`` or probability vectors ``(N, C)`` (e.g. mixup targets)."""
    check_targets(logits, targets)
    if targets.ndim == 2:
        targets = targets.to(logits.dtype)
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


class ClassifierModule(pl.LightningModule):
    """Supervised classification of any backbone with (soft-target) cross-entropy.

    The backbone is injected (``model``), so any ``nn.Module`` that maps a batch of inputs to ``(N, num_classes)``
    logits works: the networks of :mod:`lightning_methods.nets`, torchvision or timm models. Targets may be class
    indices ``(N,)`` or probability vectors ``(N, C)`` (mixup, label smoothing, teachers). Logs ``train_loss``,
    ``train_acc``, ``val_loss``, ``val_acc``, ``test_loss``, ``test_acc`` (torchmetrics, DDP-reduced);
    ``predict_step`` returns class probabilities.

    Args:
        model: the backbone, returning logits.
        num_classes: number of classes (the CLI links it from the datamodule).
        optimizer: a callable building the optimizer from the parameters (a class path in YAML).
        lr_scheduler: optional callable building a scheduler from the optimizer; ``ReduceLROnPlateau``
            monitors ``val_loss``.
        label_smoothing: label smoothing of the cross-entropy on class-index targets.

    Note:
        Built in Python, the backbone is not stored in the checkpoint's hyperparameters (its weights are in the
        ``state_dict``): reload with ``ClassifierModule.load_from_checkpoint(path, model=MLP(...))``. Built by the
        ``lightning-methods`` CLI, its config is stored and ``load_from_checkpoint(path)`` rebuilds it.

    Example::

        >>> from lightning_methods.nets import MLP
        >>> module = ClassifierModule(MLP(in_features=64, num_classes=10), num_classes=10)
        >>> module(torch.zeros(3, 1, 8, 8)).shape
        torch.Size([3, 10])
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be an nn.Module (the backbone), got {type(model).__name__}.")
        check_num_classes(num_classes)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"`label_smoothing` must be in [0, 1), got {label_smoothing!r}.")
        save_hparams(self, inspect.currentframe())
        self.model = model
        self.num_classes = num_classes
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.label_smoothing = label_smoothing
        self.train_loss_mean = MeanMetric()
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    # -- extension points --------------------------------------------------------------------------------------------
    # A subclass changes the objective with `loss` (or `training_loss` when it needs more of the batch than logits),
    # adds evaluation with `evaluate` / `update_eval_metrics` and `epoch_metrics`, and checks its configuration in
    # `check_data` / `setup` (calling super()). Logging follows one rule: names are `{stage}_{what}`
    # (`train_`, `val_`, `test_`); values that are already global (a torchmetrics compute(), a rank-identical number)
    # go through `log_metric` / `log_global`, which log once per epoch with `sync_dist=True`.

    #: the name of the backbone argument, in error messages (DistillationModule calls it `student`)
    backbone_arg = "model"

    def setup(self, stage: str) -> None:
        # Runs after the datamodule's setup and before any step: the place to catch a config that cannot work.
        self.check_data(self.trainer.datamodule if self._trainer else None)

    def check_data(self, datamodule: Any) -> None:
        """Fail before training when the backbone, ``num_classes`` and the datamodule disagree (subclasses extend)."""
        check_model_against_data(self.model, self.num_classes, datamodule, arg=self.backbone_arg)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Training loss; subclasses override this to change the objective while keeping logging and metrics."""
        return soft_cross_entropy(logits, targets, self.label_smoothing)

    def training_loss(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loss, logits, targets)`` of one training batch; override when the objective needs more of the batch
        than the logits (extra batch elements, a second network), and keep ``training_step``'s metrics and logging."""
        x, y = batch[0], batch[1]
        logits = self(x)
        return self.loss(logits, y), logits, y

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss, logits, targets = self.training_loss(batch)
        self.update_train_metrics(loss, logits, targets)
        return loss

    def update_train_metrics(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Accumulate ``train_loss`` / ``train_acc`` (logged once per epoch) and log the step loss."""
        # Accuracy is accumulated here and logged once per epoch: a Metric's forward, or logging the Metric object
        # every step, costs more than a small model's whole training step on CPU.
        self.train_acc.update(logits.detach(), hard_targets(targets))
        self.train_loss_mean.update(loss.detach(), len(targets))
        # self.log costs ~1 ms per call on CPU, whatever the logger does with it: log the step loss only on the
        # steps a logger would record anyway, and the epoch mean once per epoch
        if self._trainer is not None and self.global_step % self.trainer.log_every_n_steps == 0:
            self.log("train_loss_step", loss, prog_bar=True)

    def log_global(self, name: str, value: Any, prog_bar: bool = False) -> None:
        """Log a value that is the same on every rank (or already reduced), once per epoch, without DDP warnings."""
        self.log(name, value, prog_bar=prog_bar, sync_dist=True)

    def log_metric(self, name: str, metric: Metric | None = None, prog_bar: bool | None = None) -> Any:
        """Compute a torchmetrics ``Metric`` over the epoch (DDP-reduced by torchmetrics), log it and reset it.

        A metric whose ``compute()`` returns a dict (the curve metrics of :mod:`lightning_methods.metrics`) logs each
        0-d entry as ``{name}_{key}``; its curves (tensors of 1 or more dimensions) are returned, not logged.

        Args:
            name: the log name (``{stage}_{what}``); also the attribute holding the metric when ``metric`` is None.
            metric: the metric (default ``getattr(self, name)``).
            prog_bar: show in the progress bar (default: for ``val_`` names).

        Returns:
            What ``compute()`` returned, or None when the metric saw no update this epoch.
        """
        metric = getattr(self, name) if metric is None else metric
        prog_bar = name.startswith("val_") if prog_bar is None else prog_bar
        value = None
        if metric.update_count:  # compute() syncs across DDP ranks: every rank logs the global value
            value = metric.compute()
            if isinstance(value, dict):
                for key, entry in value.items():
                    if isinstance(entry, torch.Tensor) and entry.ndim == 0:
                        self.log_global(f"{name}_{key}", entry, prog_bar=False)
            else:
                self.log_global(name, value, prog_bar=prog_bar)
        metric.reset()
        return value

    def epoch_metrics(self, stage: str) -> list[str]:
        """Names of the torchmetrics attributes logged at the end of a ``stage`` epoch; subclasses add theirs."""
        return [f"{stage}_acc"]

    def on_train_epoch_end(self) -> None:
        if self.train_loss_mean.update_count:
            self.log_global("train_loss", self.train_loss_mean.compute())
        self.train_loss_mean.reset()
        self.log_metric("train_acc")

    def on_validation_epoch_end(self) -> None:
        for name in self.epoch_metrics("val"):
            self.log_metric(name)

    def on_test_epoch_end(self) -> None:
        for name in self.epoch_metrics("test"):
            self.log_metric(name)

    def evaluate(self, batch: Any, stage: str) -> None:
        """One validation / test batch (``stage`` is ``"val"`` or ``"test"``); subclasses override to add metrics."""
        x, y = batch[0], batch[1]
        self.update_eval_metrics(self(x), y, stage)

    def update_eval_metrics(self, logits: torch.Tensor, targets: torch.Tensor, stage: str) -> None:
        """Accumulate ``{stage}_acc`` and log ``{stage}_loss`` for one evaluation batch (subclasses reuse it)."""
        getattr(self, f"{stage}_acc").update(logits, hard_targets(targets))
        loss = soft_cross_entropy(logits, targets)
        self.log(f"{stage}_loss", loss, prog_bar=stage == "val", sync_dist=True, batch_size=len(targets))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.evaluate(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(x).softmax(dim=-1)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer(self.parameters())
        if self.lr_scheduler is None:
            return optimizer
        scheduler = self.lr_scheduler(optimizer)
        config: dict[str, Any] = {"scheduler": scheduler}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = "val_loss"
        return {"optimizer": optimizer, "lr_scheduler": config}
