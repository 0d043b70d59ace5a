"""DPSGDFModule (private feature preprocessing + DP-SGD) and its PrivacyBudget callback."""

from __future__ import annotations

import functools

import torch
from torch import nn

from callbacks import PrivacyBudget
from datamodules import DigitsDataModule
from lightning_methods import ClassifierModule, DPSGDFModule
from lightning_methods.nets import MLP
from tests.contracts.registry import DDP, Built, Entry, register

SGD = functools.partial(torch.optim.SGD, lr=1.0)
# Poisson sampling draws q = 1 / len(loader) of the data per step: full epochs of a few large batches keep it tiny
FIT = dict(max_epochs=2, limit_val_batches=1, num_sanity_val_steps=0)
DDP_FIT = dict(max_epochs=2, limit_val_batches=0, num_sanity_val_steps=0, use_distributed_sampler=False)


def linear(in_features: int = 64, num_classes: int = 10) -> nn.Module:
    return MLP(in_features, num_classes, hidden_sizes=[])


def dp(model: nn.Module | None = None, num_classes: int = 10, **kwargs) -> DPSGDFModule:
    args = dict(target_epsilon=1.0, delta=1e-5, max_grad_norm=1.0, optimizer=SGD)
    return DPSGDFModule(model or linear(), num_classes, **{**args, **kwargs})


def digits() -> DigitsDataModule:
    return DigitsDataModule(batch_size=256)


BAD = {
    "num-classes-vs-data": lambda: Built(dp(linear(64, 3), 3), digits()),
    "input-shape": lambda: Built(dp(linear(30)), digits()),
    "batchnorm-layer": lambda: Built(dp(MLP(64, 10, hidden_sizes=[8], norm="batch")), digits()),
    "gradient-accumulation": lambda: Built(dp(), digits(), trainer_kwargs={"accumulate_grad_batches": 2}),
    "delta-above-1-over-n": lambda: Built(dp(delta=1e-2), digits()),
}

# DP noise and Poisson sampling are secret (never from a stored seed, DESIGN.md): two runs never take the same steps, so
# a resumed run cannot equal an uninterrupted one. The ledger's continuity on resume is tested in test_dpsgd_f.py.
SECRET = {"resume": "DP randomness is secret by design: no two runs (resumed or not) take the same noisy steps"}

# Under DDP each rank Poisson-samples its own shard with secret randomness, so the batches, the noise and the fitted
# preprocessing cannot equal one process's; the privacy accounting (ledger, epsilon) and replica identity must.
DIFFERS = ("state_dict/model.", "state_dict/preprocessor.", "optimizer/")

register(
    Entry(
        name="DPSGDFModule",
        build=lambda: Built(dp(), digits()),
        trainer_kwargs=FIT,
        reload_kwargs=lambda: {"model": linear()},
        bad_configs=BAD,
        xfail=SECRET,
        ddp=DDP(lambda world: Built(dp(), digits()), trainer_kwargs=DDP_FIT, differs_from_single=DIFFERS),
    )
)

register(
    Entry(
        name="PrivacyBudget",
        build=lambda: Built(dp(), digits(), [PrivacyBudget(max_epsilon=0.8)]),
        trainer_kwargs=dict(FIT, max_epochs=3),
        reload_kwargs=lambda: {"model": linear()},
        bad_configs={
            "module-without-ledger": lambda: Built(ClassifierModule(MLP(64, 10), 10), digits(), [PrivacyBudget()]),
            "bad-delta": lambda: Built(dp(), digits(), [PrivacyBudget(delta=1.5)]),
        },
        xfail=SECRET,
        ddp=DDP(
            lambda world: Built(dp(), digits(), [PrivacyBudget(max_epsilon=0.8)]),
            trainer_kwargs=dict(DDP_FIT, max_epochs=3),
            differs_from_single=DIFFERS,
        ),
    )
)
