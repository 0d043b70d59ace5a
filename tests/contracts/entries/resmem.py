"""ResMem: a kNN memory of training residuals, built over the whole training set when fit ends."""

from __future__ import annotations

from torch import nn

from datamodules import DigitsDataModule
from lightning_methods import ResMem
from lightning_methods.nets import MLP
from tests.contracts.registry import DDP, Built, Entry, InOrderDigits, adam, register, sgd


def net(in_features: int = 64, num_classes: int = 10) -> MLP:
    return MLP(in_features, num_classes, hidden_sizes=[16])


def resmem(model: nn.Module | None = None, num_classes: int = 10, **kwargs) -> ResMem:
    # tuning picks k and sigma off the constructor's values, so a reload that lost them predicts differently
    args = dict(k=3, sigma=0.2, optimizer=adam(1e-2), tune_on_val=True, tune_grid={"k": [1, 5], "sigma": [0.05, 0.5]})
    return ResMem(model or net(), num_classes, **{**args, **kwargs})


class _UnusedLayer(MLP):
    """An MLP with a layer its forward never runs."""

    def __init__(self) -> None:
        super().__init__(64, 10, hidden_sizes=[16])
        self.unused = nn.Identity()


register(
    Entry(
        name="ResMem",
        build=lambda: Built(resmem(), InOrderDigits(batch_size=32)),
        reload_kwargs=lambda: {"model": net()},
        predict=lambda module, batch: module.predict(batch[0]),
        bad_configs={
            "missing-layer": lambda: Built(resmem(embedding_layer="body.block9"), DigitsDataModule()),
            "layer-not-in-forward": lambda: Built(resmem(_UnusedLayer(), embedding_layer="unused"), DigitsDataModule()),
            "num-classes-vs-data": lambda: Built(resmem(MLP(64, 3), num_classes=3), DigitsDataModule()),
            "input-shape": lambda: Built(resmem(MLP(30, 10)), DigitsDataModule()),
            "k-larger-than-data": lambda: Built(resmem(k=5000), DigitsDataModule()),
        },
        # each rank embeds an interleaved shard; the all-gathered memory (and the tuned k, sigma) equals 1 process's
        ddp=DDP(lambda world: Built(resmem(optimizer=sgd(0.5)), InOrderDigits(batch_size=32 // world))),
    )
)
