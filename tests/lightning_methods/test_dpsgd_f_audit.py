"""One-run privacy audit (Steinke, Nasr & Jagielski 2023): the bound math, and that it separates a correct DPSGDFModule
run (bound below the reported epsilon) from a broken one (noise switched off: bound above it)."""

from __future__ import annotations

import copy
import functools
import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from lightning_methods.dpsgd_f import (
    DPSGDFModule,
    audit,
    audit_epsilon_lower_bound,
    audit_p_value,
    canary_scores,
    dirac_canaries,
)
from lightning_methods.nets import MLP
from tests.helpers import cpu_trainer


def test_p_value_is_the_binomial_tail_without_delta_and_grows_with_delta():
    # pure DP: correct guesses are dominated by Binomial(r, e^eps / (1 + e^eps))
    for eps in (0.0, 1.0, 3.0):
        q = math.exp(eps) / (1 + math.exp(eps))
        assert audit_p_value(500, 100, 70, eps, 0.0) == pytest.approx(stats.binom.sf(69, 100, q), rel=1e-12)
    assert audit_p_value(500, 100, 70, 1.0, 1e-3) > audit_p_value(500, 100, 70, 1.0, 0.0)
    # hand-checked: r guesses all correct at eps = 0 has probability 2^-r
    assert audit_p_value(10, 5, 5, 0.0, 0.0) == pytest.approx(1 / 32)


def test_lower_bound_inverts_the_p_value_and_saturates_with_few_canaries():
    bound = audit_epsilon_lower_bound(1000, 100, 100, 0.0, confidence=0.95)
    # all r correct: 0.95 confidence refutes eps while q^r < 0.05, i.e. eps < log(p / (1 - p)) with p = 0.05^(1/r)
    p = 0.05 ** (1 / 100)
    assert bound == pytest.approx(math.log(p / (1 - p)), rel=1e-6)
    assert audit_epsilon_lower_bound(1000, 100, 50, 1e-5) == 0.0  # chance-level guesses prove nothing
    assert audit_epsilon_lower_bound(1000, 100, 100, 1e-5) < bound  # delta weakens the bound


def test_audit_on_synthetic_scores():
    generator = torch.Generator().manual_seed(0)
    included = torch.rand(400, generator=generator) < 0.5
    random_scores = torch.randn(400, generator=generator)
    assert audit(random_scores, included, delta=1e-5)["epsilon_lower_bound"] < 0.5
    perfect = included.double() + 0.01 * torch.randn(400, generator=generator, dtype=torch.float64)
    result = audit(perfect, included, delta=1e-5)
    assert result["correct"] == result["guesses"] == 320 and result["epsilon_lower_bound"] > 3.0  # 40% per side
    with pytest.raises(ValueError, match="one entry per canary"):
        audit(random_scores, included[:10], delta=1e-5)
    with pytest.raises(ValueError, match="non-finite"):
        audit(torch.full((400,), float("nan")), included, delta=1e-5)


class _NoNoise(pl.Callback):
    """The broken implementation: the optimizer adds no noise, while the ledger still reports the calibrated one."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        optimizer.noise_multiplier = 0.0


def _audited_run(broken: bool, num_canaries: int = 200, epsilon: float = 1.0) -> tuple[float, float]:
    x, y = load_digits(return_X_y=True)
    x = torch.as_tensor(x / 16.0, dtype=torch.float32)
    y = torch.as_tensor(y)
    cx, cy, included = dirac_canaries(num_canaries, 10)
    train_x = torch.cat([torch.cat([x, torch.zeros(len(x), num_canaries)], 1),
                         torch.cat([torch.zeros(int(included.sum()), 64), cx[included]], 1)])
    train_y = torch.cat([y, cy[included]])
    model = MLP(in_features=64 + num_canaries, num_classes=10, hidden_sizes=[])
    initial = copy.deepcopy(model)
    module = DPSGDFModule(model, num_classes=10, target_epsilon=epsilon, delta=1e-5, max_grad_norm=1.0, preprocess=False,
                          optimizer=functools.partial(torch.optim.SGD, lr=1.0))
    trainer = cpu_trainer(max_epochs=8, num_sanity_val_steps=0, callbacks=[_NoNoise()] if broken else [])
    trainer.fit(module, train_dataloaders=DataLoader(TensorDataset(train_x, train_y), batch_size=128, shuffle=True))
    canaries = torch.cat([torch.zeros(num_canaries, 64), cx], 1)
    scores = canary_scores(module.model, canaries, cy, initial=initial)
    return audit(scores, included, delta=1e-5)["epsilon_lower_bound"], module.epsilon


@pytest.mark.slow
def test_audit_bound_stays_below_a_correct_run_and_exceeds_a_broken_one():
    pl.seed_everything(0)
    correct_bound, reported = _audited_run(broken=False)
    assert reported <= 1.0 and correct_bound < reported
    broken_bound, reported = _audited_run(broken=True)
    assert reported <= 1.0 and broken_bound > reported, broken_bound  # the audit catches the missing noise
