"""CascadeModule: two frozen models, a post-hoc rule g fitted on held-out data and deferral thresholds chosen from
scores gathered over the whole threshold split (so 2 processes must choose the thresholds of 1)."""

from __future__ import annotations

import torch

from datamodules import DeferralDataModule, DigitsDataModule, FailureModeDataModule
from lightning_methods import CascadeModule
from lightning_methods.nets import MLP
from tests.contracts.registry import DDP, Built, Entry, InOrder, adam, register, sgd


class InOrderDeferral(InOrder, DeferralDataModule):
    """Held-out digits for the deferral rule, read in order (module level: it pickles for ddp_spawn)."""


def models(in_features: int = 64, classes: tuple[int, int] = (10, 10)) -> list[MLP]:
    # the frozen models are not in the checkpoint: a reload gets them again, so they are built from a fixed seed
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        return [MLP(in_features, classes[0], hidden_sizes=[8]), MLP(in_features, classes[1], hidden_sizes=[32])]


def cascade(cascade_models: list | None = None, **kwargs) -> CascadeModule:
    args = dict(deferral="posthoc", deferral_rate=0.3, hidden_sizes=[8], optimizer=adam(1e-2))
    return CascadeModule(cascade_models or models(), 10, **{**args, **kwargs})


def held_out(batch_size: int = 16) -> InOrderDeferral:
    return InOrderDeferral(DigitsDataModule(batch_size=batch_size))


register(
    Entry(
        name="CascadeModule",
        build=lambda: Built(cascade(), held_out()),
        reload_kwargs=lambda: {"models": models()},
        bad_configs={
            "class-counts": lambda: Built(cascade(models(classes=(10, 5))), held_out()),
            "num-classes-vs-data": lambda: Built(
                cascade(), DeferralDataModule(FailureModeDataModule(DigitsDataModule(), classes=[0, 1, 2]))
            ),
            "input-shape": lambda: Built(cascade(models(in_features=30)), held_out()),
            "models-training-split": lambda: Built(cascade(), DigitsDataModule()),
            "deferral-rate": lambda: Built(cascade(deferral_rate=1.5), held_out()),
        },
        # g is trained under DDP on in-order shards (SGD: the 2-process steps equal the 1-process ones) and every rank
        # scores its share of the threshold split; the gathered scores give the 1-process thresholds
        ddp=DDP(lambda world: Built(cascade(optimizer=sgd(0.5)), held_out(16 // world))),
    )
)
