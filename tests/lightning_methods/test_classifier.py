"""ClassifierModule: loss math, accuracy on real digits, CLI checkpoints and errors raised before training (reload,
resume and 2 processes = 1 are contracts of its entry in tests/contracts/entries/classifier.py)."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from datamodules import DigitsDataModule, TabularDataModule
from lightning_methods import ClassifierModule
from lightning_methods.classifier import hard_targets, soft_cross_entropy
from lightning_methods.nets import MLP
from tests.helpers import cpu_trainer, run_cli


def _adam(lr):
    return functools.partial(torch.optim.Adam, lr=lr)  # picklable, for ddp_spawn


def _module(hidden=(64,), lr=3e-3, num_classes=10, in_features=64):
    return ClassifierModule(MLP(in_features, num_classes, hidden_sizes=list(hidden)), num_classes, optimizer=_adam(lr))


# -- the loss ------------------------------------------------------------------------------------------------------
def test_soft_cross_entropy_golden_values():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    lse = math.log(math.exp(2.0) + 1.0 + math.exp(-1.0))
    assert soft_cross_entropy(logits, torch.tensor([0])).item() == pytest.approx(lse - 2.0)
    assert soft_cross_entropy(logits, torch.tensor([2])).item() == pytest.approx(lse + 1.0)
    soft = torch.tensor([[0.5, 0.5, 0.0]])
    assert soft_cross_entropy(logits, soft).item() == pytest.approx(0.5 * (lse - 2.0) + 0.5 * lse)


def test_loss_and_training_step_apply_label_smoothing():
    """eps = 0.3 over 3 classes trains towards (0.8, 0.1, 0.1): hand-computed, through `loss` and `training_step`."""
    module = ClassifierModule(MLP(4, 3, hidden_sizes=[]), 3, label_smoothing=0.3)
    logits, y = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([0])
    log_p = logits.log_softmax(-1)[0]
    expected = -(0.8 * log_p[0] + 0.1 * log_p[1] + 0.1 * log_p[2])
    assert module.loss(logits, y).item() == pytest.approx(expected.item(), rel=1e-6)
    assert module.loss(logits, y).item() != pytest.approx(soft_cross_entropy(logits, y).item(), rel=1e-3)
    x = torch.randn(5, 4)
    targets = torch.tensor([0, 1, 2, 1, 0])
    with torch.no_grad():
        log_p = module(x).log_softmax(-1)
        smoothed = 0.7 * torch.eye(3)[targets] + 0.1
        by_hand = -(smoothed * log_p).sum(-1).mean()
        assert module.training_step([x, targets], 0).item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_one_hot_soft_targets_equal_class_indices():
    logits = torch.randn(6, 4)
    y = torch.tensor([0, 1, 2, 3, 1, 0])
    torch.testing.assert_close(soft_cross_entropy(logits, torch.eye(4)[y]), soft_cross_entropy(logits, y))
    assert torch.equal(hard_targets(torch.eye(4)[y]), y)


@pytest.mark.parametrize(
    ("targets", "error", "match"),
    [
        (torch.zeros(5, dtype=torch.long), ValueError, "5 targets for 4"),
        (torch.zeros(4, 3), ValueError, "do not match"),
        (torch.zeros(4), TypeError, "integer dtype"),
        (torch.zeros(4, 3, 1), ValueError, r"\(N,\) or soft"),
    ],
)
def test_bad_targets_are_reported(targets, error, match):
    with pytest.raises(error, match=match):
        soft_cross_entropy(torch.zeros(4, 3 if targets.ndim != 2 else 5), targets)


# -- training ------------------------------------------------------------------------------------------------------
def test_reaches_90_percent_on_digits():
    pl.seed_everything(0)
    module, dm = _module(hidden=(128,)), DigitsDataModule(batch_size=64)
    trainer = cpu_trainer(max_epochs=15)
    trainer.fit(module, dm)
    (result,) = trainer.test(module, dm, verbose=False)
    assert result["test_acc"] >= 0.90, result
    # the torchmetrics value is the plain accuracy over the whole test split
    x, y = dm.splits["test"]
    with torch.no_grad():
        acc = (module(x).argmax(-1) == y).float().mean().item()
    assert result["test_acc"] == pytest.approx(acc, abs=1e-6)


def test_trains_on_soft_targets():
    """Soft targets (here: one-hot mixed with uniform) flow through training_step and the accuracy metric."""

    class SoftDigits(DigitsDataModule):
        def setup(self, stage=None):
            super().setup(stage)
            x, y = self.train_dataset.x, self.train_dataset.y
            self.train_dataset.y = 0.9 * torch.eye(10)[y] + 0.01

    pl.seed_everything(0)
    module = _module()
    trainer = cpu_trainer(max_epochs=5)
    trainer.fit(module, SoftDigits())
    assert trainer.callback_metrics["train_acc"] > 0.8
    assert trainer.callback_metrics["val_acc"] > 0.8


def test_predict_returns_probabilities():
    module, dm = _module(), DigitsDataModule(batch_size=100)
    batches = cpu_trainer().predict(module, dm)
    probs = torch.cat(batches)
    assert probs.shape == (len(dm.splits["test"][1]), 10)
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(probs)))
    assert (probs >= 0).all()


def test_plateau_scheduler_monitors_val_loss():
    module = ClassifierModule(
        MLP(64, 10, [16]),
        10,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0),
    )
    trainer = cpu_trainer(max_epochs=2, limit_train_batches=2)
    trainer.fit(module, DigitsDataModule())
    assert trainer.lr_scheduler_configs[0].monitor == "val_loss"


# -- checkpoints ---------------------------------------------------------------------------------------------------
def test_cli_checkpoint_reloads_without_arguments(tmp_path, monkeypatch):
    """A checkpoint written by the CLI stores the backbone's config, so load_from_checkpoint needs nothing else."""
    monkeypatch.chdir(tmp_path)
    cli = run_cli(
        "fit",
        "--config",
        str(Path(__file__).parents[2] / "configs" / "quickstart.yaml"),
        "--trainer.max_epochs=1",
        "--trainer.enable_checkpointing=true",
        f"--trainer.default_root_dir={tmp_path}",
        "--test_after_fit=false",
    )
    path = cli.trainer.checkpoint_callback.best_model_path
    reloaded = ClassifierModule.load_from_checkpoint(path)
    assert isinstance(reloaded.model, MLP) and reloaded.model.in_features == 64
    x = cli.datamodule.splits["test"][0]
    cli.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), cli.model(x), rtol=0, atol=0)
    # and the CLI itself evaluates the checkpoint
    test_cli = run_cli("test", "--config", str(tmp_path / "config.yaml"), f"--ckpt_path={path}", "--trainer.logger=false")
    assert test_cli.trainer.callback_metrics["test_acc"] > 0.5


# -- DDP -----------------------------------------------------------------------------------------------------------
# -- errors before training ----------------------------------------------------------------------------------------
class _CountSteps(Callback):
    def __init__(self):
        self.steps = 0

    def on_train_batch_start(self, *args):
        self.steps += 1


@pytest.mark.parametrize(
    ("module", "dm", "match"),
    [
        (lambda: ClassifierModule(MLP(64, 3), 3), DigitsDataModule, "num_classes=3.*10 classes"),
        (lambda: ClassifierModule(MLP(64, 7), 10), DigitsDataModule, "outputs shape \\(7,\\).*num_classes=10"),
        (lambda: ClassifierModule(MLP(30, 10), 10), DigitsDataModule, "cannot take inputs of shape \\(1, 8, 8\\)"),
        (lambda: ClassifierModule(MLP(4, 2), 2), lambda: TabularDataModule("iris"), "num_classes=2.*3 classes"),
    ],
    ids=["num-classes-vs-data", "head-width", "input-size", "tabular"],
)
def test_mismatches_fail_before_the_first_step(module, dm, match):
    counter = _CountSteps()
    trainer = cpu_trainer(max_epochs=1, callbacks=[counter])
    with pytest.raises(ValueError, match=match):
        trainer.fit(module(), dm())
    assert counter.steps == 0


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: ClassifierModule("mlp", 10), TypeError, "nn.Module"),
        (lambda: ClassifierModule(MLP(64, 10), 1), ValueError, "num_classes"),
        (lambda: ClassifierModule(MLP(64, 10), 10, label_smoothing=1.5), ValueError, "label_smoothing"),
    ],
)
def test_bad_constructor_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_checkpoint_callback_with_val_acc(tmp_path):
    """The logged names work with ModelCheckpoint (no '/' in metric names, so no stray sub-directories)."""
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val_acc", mode="max", filename="{epoch}-{val_acc:.3f}")
    trainer = cpu_trainer(max_epochs=2, limit_train_batches=3, callbacks=[ckpt], enable_checkpointing=True)
    trainer.fit(_module(), DigitsDataModule())
    assert ckpt.best_model_path.startswith(str(tmp_path)) and "val_acc=" in ckpt.best_model_path
