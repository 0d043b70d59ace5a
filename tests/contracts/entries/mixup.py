"""MixupCallback, LinearityCallback and MixupConsistencyModule (k-point mixup, Chaudhry et al. 2022 / ICT)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from callbacks import LinearityCallback, MixupCallback
from datamodules import DigitsDataModule, SemiSupervisedDataModule
from lightning_methods import ClassifierModule, MixupConsistencyModule
from lightning_methods.nets import MLP
from tests.contracts.registry import DDP, Built, Entry, InOrderDigits, adam, register, sgd


def net(in_features: int = 64, num_classes: int = 10) -> MLP:
    return MLP(in_features, num_classes, hidden_sizes=[16])


def classifier(optimizer=None) -> ClassifierModule:
    return ClassifierModule(net(), 10, optimizer=optimizer or adam(1e-2))


# -- MixupCallback ----------------------------------------------------------------------------------------------------
def _mixup_build(batch_size: int = 32, optimizer=None) -> Built:
    return Built(classifier(optimizer), InOrderDigits(batch_size=batch_size), [MixupCallback(alpha=1.0, num_points=3)])


class _Tuples:
    """A loader's batches as tuples, which a callback cannot change in place."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return (tuple(batch) for batch in self.loader)


class _TupleBatches(DigitsDataModule):
    def train_dataloader(self):
        return _Tuples(super().train_dataloader())


register(
    Entry(
        name="MixupCallback",
        build=_mixup_build,
        reload_kwargs=lambda: {"model": net()},
        bad_configs={
            "num-classes-vs-data": lambda: Built(classifier(), DigitsDataModule(), [MixupCallback(num_classes=5)]),
            "tuple-batches": lambda: Built(classifier(), _TupleBatches(), [MixupCallback()]),
            "input-key": lambda: Built(classifier(), DigitsDataModule(), [MixupCallback(input_key=3, target_key=1)]),
        },
        # Each rank draws its own mixing weights (seeded by rank), so the weights cannot equal one process's run; what
        # must hold is identical replicas and the same callback state (resolved seed, batches mixed) on both ranks.
        ddp=DDP(lambda world: _mixup_build(32 // world, sgd(0.5)), differs_from_single=("state_dict/", "optimizer/")),
    )
)


# -- LinearityCallback ----------------------------------------------------------------------------------------------------
def _linearity() -> LinearityCallback:
    return LinearityCallback(layers=["body.block0"], num_samples=41, every_n_train_steps=2)


def _linearity_build(batch_size: int = 32, optimizer=None) -> Built:
    return Built(classifier(optimizer), InOrderDigits(batch_size=batch_size), [_linearity()])


register(
    Entry(
        name="LinearityCallback",
        build=_linearity_build,
        reload_kwargs=lambda: {"model": net()},
        bad_configs={
            "missing-layer": lambda: Built(classifier(), DigitsDataModule(), [LinearityCallback(layers=["body.block7"])]),
            "layers-as-string": lambda: Built(classifier(), DigitsDataModule(), [LinearityCallback(layers="body.block0")]),
            "no-held-out-split": lambda: Built(classifier(), _NoVal(), [LinearityCallback(split="val")]),
        },
        # each rank measures a share of the tuples and the sums are all-reduced: the history equals 1 process's
        ddp=DDP(lambda world: _linearity_build(32 // world, sgd(0.5))),
    )
)


class _NoVal(DigitsDataModule):
    val_dataloader = None  # type: ignore[assignment]

    def __getattribute__(self, name):
        if name == "val_dataloader":
            raise AttributeError(name)
        return super().__getattribute__(name)


# -- MixupConsistencyModule ---------------------------------------------------------------------------------------------
class InOrderSemiSupervised(SemiSupervisedDataModule):
    """SemiSupervisedDataModule without shuffling (it always shuffles from the global RNG, which a resumed run does not
    restore), so that resume compares the module's own state, not the loader's draws."""

    def _loader(self, dataset, batch_size, drop_last):
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=drop_last)


def consistency(optimizer=None, model=None, num_classes: int = 10) -> MixupConsistencyModule:
    return MixupConsistencyModule(model or net(), num_classes, optimizer=optimizer or adam(1e-2), num_points=3,
                                  ema_decay=0.9, rampup_epochs=1.0)


def semi(batch_size: int = 16, ordered: bool = True) -> SemiSupervisedDataModule:
    cls = InOrderSemiSupervised if ordered else SemiSupervisedDataModule
    return cls(DigitsDataModule(batch_size=batch_size), labels_per_class=5, unlabeled_batch_size=2 * batch_size)


register(
    Entry(
        name="MixupConsistencyModule",
        build=lambda: Built(consistency(), semi()),
        reload_kwargs=lambda: {"model": net()},
        predict=lambda module, batch: torch.cat([module(batch[0]), module.teacher_logits(batch[0])], dim=1),
        bad_configs={
            "num-classes-vs-data": lambda: Built(consistency(model=MLP(64, 3), num_classes=3), semi(ordered=False)),
            "input-shape": lambda: Built(consistency(model=MLP(30, 10)), semi(ordered=False)),
        },
        # Per-rank mixing draws (seeded by rank) make the student differ from 1 process; the EMA teacher follows the
        # student, so replicas must stay identical. SemiSupervisedDataModule shuffles under DDP as Lightning does.
        ddp=DDP(
            lambda world: Built(consistency(sgd(0.5)), semi(16 // world, ordered=False)),
            differs_from_single=("state_dict/", "optimizer/"),
        ),
    )
)
