"""PrivacyBudget: stops before the budget is exceeded, keeps a user budget, refuses a resumed run without its ledger."""

from __future__ import annotations

import functools

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks import PrivacyBudget
from datamodules import DigitsDataModule
from lightning_methods import ClassifierModule, DPSGDFModule
from lightning_methods.nets import MLP
from tests.helpers import cpu_trainer


def module(**kwargs) -> DPSGDFModule:
    args = dict(num_classes=10, target_epsilon=1.0, delta=1e-5, max_grad_norm=1.0,
                optimizer=functools.partial(torch.optim.SGD, lr=1.0))
    args.update(kwargs)
    return DPSGDFModule(MLP(in_features=64, num_classes=10, hidden_sizes=[]), **args)


def fit(m, callbacks=(), ckpt_path=None, **trainer_kwargs):
    pl.seed_everything(0)
    kwargs = dict(limit_val_batches=0, num_sanity_val_steps=0, callbacks=list(callbacks))
    kwargs.update(trainer_kwargs)
    trainer = cpu_trainer(**kwargs)
    trainer.fit(m, DigitsDataModule(batch_size=128), ckpt_path=ckpt_path)
    return trainer


def test_smaller_budget_stops_early_at_the_last_step_that_fits():
    budget = PrivacyBudget(max_epsilon=0.5)
    m = module()
    trainer = fit(m, [budget], max_epochs=4)
    assert [c for c in trainer.callbacks if isinstance(c, PrivacyBudget)] == [budget]  # the module kept the user's
    steps = m.privacy_ledger.steps
    assert 0 < steps < 40 and m.epsilon <= 0.5 < m.privacy_ledger.epsilon(1e-5, extra_steps=1)
    assert trainer.current_epoch < 4  # stopped before max_epochs


def test_fixed_noise_runs_until_the_module_target_and_min_epochs_cannot_force_more():
    m = module(noise_multiplier=1.0)
    trainer = fit(m, max_epochs=6, min_epochs=6)  # min_epochs overrides should_stop: the module guard holds
    assert m.epsilon <= 1.0 < m.privacy_ledger.epsilon(1e-5, extra_steps=1)
    assert m.privacy_ledger.steps < 60 and trainer.current_epoch == 6
    assert float(trainer.callback_metrics["epsilon"]) == pytest.approx(m.epsilon, rel=1e-6)


def test_resume_without_the_ledger_is_refused(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    fit(module(), [checkpoint], max_epochs=2, enable_checkpointing=True)
    path = tmp_path / "epoch=0.ckpt"
    ckpt = torch.load(path, weights_only=False)
    del ckpt["state_dict"]["privacy_ledger._extra_state"]  # e.g. weights copied over by hand
    torch.save(ckpt, path)
    m = module()
    m.strict_loading = False
    with pytest.raises(RuntimeError, match="ledger was not restored"):
        fit(m, max_epochs=2, ckpt_path=path)


def test_refuses_modules_without_a_ledger_and_bad_arguments():
    with pytest.raises(TypeError, match="privacy ledger"):
        cpu_trainer(max_epochs=1, callbacks=[PrivacyBudget()]).fit(
            ClassifierModule(MLP(in_features=64, num_classes=10), num_classes=10), DigitsDataModule()
        )
    with pytest.raises(ValueError, match="max_epsilon"):
        PrivacyBudget(max_epsilon=0)
    with pytest.raises(ValueError, match="delta"):
        PrivacyBudget(delta=1.5)
