"""The contract registry: one :class:`Entry` per public module and callback, tested once for all.

An entry says how to build a tiny, fresh instance of its technique (module, datamodule, callbacks) and which
contracts do not apply to it (with the reason). ``tests/contracts/test_contracts.py`` runs every contract over
:data:`ENTRIES`; the entries live in ``tests/contracts/entries/<technique>.py`` (imported automatically by
:func:`load_entries`), so a new technique joins the suite by adding one file there. See ``README.md`` beside this
file.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from datamodules import DigitsDataModule

__all__ = [
    "Built",
    "DDP",
    "Entry",
    "ENTRIES",
    "register",
    "load_entries",
    "scratch_dir",
    "InOrder",
    "InOrderDigits",
    "sgd",
    "adam",
    "TINY_FIT",
]

#: the default tiny fit: two epochs of three batches, one validation batch, no sanity check
TINY_FIT: dict[str, Any] = dict(max_epochs=2, limit_train_batches=3, limit_val_batches=1, num_sanity_val_steps=0)


@dataclass
class Built:
    """A fresh technique: what ``trainer.fit(module, datamodule)`` needs, plus the Trainer callbacks it brings.

    ``trainer_kwargs`` (optional) override the entry's ``trainer_kwargs`` for this build only (e.g. a bad config that
    is a Trainer setting, like ``accumulate_grad_batches=2`` for DP-SGD).
    """

    module: pl.LightningModule
    datamodule: pl.LightningDataModule
    callbacks: list[pl.Callback] = field(default_factory=list)
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)


def _first_input(module: pl.LightningModule, batch: Any) -> torch.Tensor:
    return module(batch[0])


def _test_batch(built: Built) -> Any:
    dm = built.datamodule
    dm.setup("test")
    return next(iter(dm.test_dataloader()))


@dataclass
class DDP:
    """How to run an entry on 2 processes (``ddp_spawn``, CPU) against 1 process.

    Args:
        build: ``world_size -> Built``; typically the per-device batch size is the 1-process one divided by the world
            size and the training data is read in order (:func:`in_order`), so 2 ranks together see exactly the
            1-process batches.
        trainer_kwargs: the tiny fit of both runs (``use_distributed_sampler=False`` when ``build`` brings its own
            sampler).
        differs_from_single: prefixes of state keys (``"state_dict/model."``, ``"optimizer"``, ``"callbacks/..."``)
            that may differ from the 1-process run *by design* (per-rank random draws, per-rank Poisson batches); they
            must still be identical on both ranks. Say why in a comment at the entry.
        atol: absolute tolerance of float comparisons (rtol is 1e-5).
    """

    build: Callable[[int], Built]
    trainer_kwargs: dict[str, Any] = field(default_factory=lambda: dict(TINY_FIT, limit_val_batches=0))
    differs_from_single: tuple[str, ...] = ()
    atol: float = 1e-6


@dataclass
class Entry:
    """One technique in the contract suite.

    Args:
        name: test id (e.g. ``"ResMem"``).
        build: returns a fresh :class:`Built`; called once per run (seeded by the test before each call).
        trainer_kwargs: the tiny fit (``cpu_trainer`` defaults + these); keep it to a few steps.
        predict: ``(module, batch) -> Tensor`` of comparable outputs (default ``module(batch[0])``), called in eval
            mode under ``no_grad``.
        batch: ``Built -> batch`` to predict on (default: the first batch of the datamodule's test loader).
        reload_kwargs: ``() -> dict`` of what ``load_from_checkpoint`` needs besides the path (a backbone built in
            Python is not in the checkpoint: ``{"model": MLP(...)}``).
        bad_configs: name -> builder of a :class:`Built` that must raise ``ValueError``/``TypeError`` before any
            optimizer step (wrong class count, wrong input shape, a missing layer, an incompatible Trainer setting).
        reload: ``True``, or the reason the reload contract does not apply.
        resume: ``True``, or the reason the resume contract does not apply.
        ddp: a :class:`DDP` spec, or the reason the 2-process contract does not apply (no dataset-spanning or
            per-rank random state).
        xfail: contract name (``"bad_config"``, ``"reload"``, ``"resume"``, ``"ddp"``) -> reason of a known failure
            of the technique; the test is a strict xfail (it fails once the technique is fixed, so the mark goes).
        atol: absolute tolerance of float comparisons (rtol is 1e-5).
    """

    name: str
    build: Callable[[], Built]
    trainer_kwargs: dict[str, Any] = field(default_factory=lambda: dict(TINY_FIT))
    predict: Callable[[pl.LightningModule, Any], torch.Tensor] = _first_input
    batch: Callable[[Built], Any] = _test_batch
    reload_kwargs: Callable[[], dict[str, Any]] = dict
    bad_configs: dict[str, Callable[[], Built]] = field(default_factory=dict)
    reload: bool | str = True
    resume: bool | str = True
    ddp: DDP | str = "no dataset-spanning or per-rank random state"
    xfail: dict[str, str] = field(default_factory=dict)
    atol: float = 1e-6


#: every registered entry, in registration order
ENTRIES: list[Entry] = []


def register(entry: Entry) -> Entry:
    """Add ``entry`` to :data:`ENTRIES` (names must be unique); returns it."""
    if any(e.name == entry.name for e in ENTRIES):
        raise ValueError(f"A contract entry named {entry.name!r} is already registered.")
    ENTRIES.append(entry)
    return entry


def load_entries() -> list[Entry]:
    """Import every module of ``tests/contracts/entries`` (each registers its entries) and return :data:`ENTRIES`."""
    package = importlib.import_module("tests.contracts.entries")
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        importlib.import_module(f"{package.__name__}.{info.name}")
    return ENTRIES


# ----------------------------------------------------------------------------------------------------------------------
# Helpers for entries
# ----------------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _scratch_root() -> Path:
    return Path(tempfile.mkdtemp(prefix="lm-contracts-"))


def scratch_dir(name: str) -> Path:
    """A per-session directory for artefacts entries share (e.g. a teacher's checkpoints, trained once)."""
    path = _scratch_root() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def sgd(lr: float) -> Callable:
    """A picklable optimizer callable (``ddp_spawn`` pickles the module): SGD keeps 1- and 2-process runs equal."""
    return functools.partial(torch.optim.SGD, lr=lr)


def adam(lr: float) -> Callable:
    """A picklable Adam callable."""
    return functools.partial(torch.optim.Adam, lr=lr)


class InOrder:
    """Mixin for a datamodule class whose training loader must read the data in order, also under DDP.

    Lightning's own ``DistributedSampler`` always shuffles training data; with this loader (and
    ``use_distributed_sampler=False``) rank ``r`` reads examples ``r, r + W, ...``, so ``W`` ranks with batch
    ``B / W`` see exactly the examples of one process with batch ``B``. In one process the loader is unshuffled too,
    so a resumed run reads the same batches as an uninterrupted one (Lightning does not restore the global RNG a
    shuffling loader draws from). Define the subclass at module level (``class InOrderDigits(InOrder,
    DigitsDataModule)``) so that it pickles for ``ddp_spawn``.
    """

    def train_dataloader(self) -> DataLoader:
        loader = super().train_dataloader()  # type: ignore[misc]
        distributed = dist.is_available() and dist.is_initialized()
        sampler = DistributedSampler(loader.dataset, shuffle=False) if distributed else None
        return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, collate_fn=loader.collate_fn)


class InOrderDigits(InOrder, DigitsDataModule):
    """scikit-learn digits read in order (see :class:`InOrder`); the default data of most entries."""
