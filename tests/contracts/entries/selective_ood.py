"""SelectiveOODModule: a SCOD rule whose statistics and threshold are calibrated over whole splits when fit ends."""

from __future__ import annotations

from torch import nn

from datamodules import OODDataModule
from lightning_methods import SelectiveOODModule
from lightning_methods.nets import MLP
from tests.contracts.registry import DDP, Built, Entry, InOrder, adam, register, sgd


class InOrderOOD(InOrder, OODDataModule):
    """The Gaussian SCOD data read in order (see InOrder); module level so that it pickles for ddp_spawn."""


def net(num_classes: int = 3) -> MLP:
    return MLP(2, num_classes, hidden_sizes=[16])


def scod(model: nn.Module | None = None, num_classes: int = 3, **kwargs) -> SelectiveOODModule:
    # loss-based: the wild head, pi_mix, the estimated inlier share and the threshold all come from the fit
    args = dict(estimator="loss_based", optimizer=adam(1e-2))
    return SelectiveOODModule(model or net(), num_classes, **{**args, **kwargs})


def data(batch_size: int = 32, **kwargs) -> OODDataModule:
    return InOrderOOD(source="gaussian", num_samples=600, batch_size=batch_size, shuffle=False, **kwargs)


register(
    Entry(
        name="SelectiveOODModule",
        build=lambda: Built(scod(), data()),
        reload_kwargs=lambda: {"model": net()},
        predict=lambda module, batch: module.predict(batch[0])["score"],
        bad_configs={
            "c_fn-outside-0-1": lambda: Built(scod(c_fn=1.5), data()),
            "budget-outside-0-1": lambda: Built(scod(rejection_budget=-0.1), data()),
            "missing-layer": lambda: Built(scod(embedding_layer="body.block9"), data()),
            "loss-based-without-wild-set": lambda: Built(scod(), data(wild_fraction=0.0)),
            "num-classes-vs-data": lambda: Built(scod(net(4), num_classes=4), data()),
        },
        # calibration passes are split across ranks and gathered in dataset order: thresholds equal 1 process's
        ddp=DDP(lambda world: Built(scod(optimizer=sgd(0.5)), data(32 // world))),
    )
)
