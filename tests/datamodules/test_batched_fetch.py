"""The batched fetch of in-memory datasets gives the batches per-example fetching gives (issue 19)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from datamodules import DigitsDataModule, MNIST1DDataModule, TabularDataModule
from datamodules._base import BatchedArrayDataset


def _per_example(loader: DataLoader) -> DataLoader:
    """The same loader fetching example by example with the default collate (what the datamodules did before)."""
    dataset = loader.dataset.dataset if isinstance(loader.dataset, BatchedArrayDataset) else loader.dataset
    return DataLoader(dataset, batch_size=loader.batch_size, shuffle=False, sampler=loader.sampler, drop_last=loader.drop_last)


def _batches(loader: DataLoader, seed: int) -> list[list[torch.Tensor]]:
    torch.manual_seed(seed)
    return [list(b) for b in loader]


@pytest.mark.parametrize(
    "make",
    [
        lambda: DigitsDataModule(batch_size=64),
        lambda: DigitsDataModule(batch_size=50, drop_last=True, augment=True),
        lambda: MNIST1DDataModule(num_samples=600, batch_size=32),
        lambda: TabularDataModule("wine", batch_size=16, shuffle=False),
    ],
    ids=["digits", "digits-augment-drop_last", "mnist1d", "wine-ordered"],
)
def test_batches_order_and_random_draws_are_identical(make):
    dm = make()
    dm.setup("fit")
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        assert isinstance(loader.dataset, BatchedArrayDataset)
        fast = _batches(loader, seed=3)
        torch.manual_seed(3)
        # the per-example loader shares the sampler object: replay its draws from the same RNG state
        slow = _batches(_per_example(loader), seed=3)
        assert len(fast) == len(slow) > 0
        for (fx, fy), (sx, sy) in zip(fast, slow):
            assert torch.equal(fx, sx) and torch.equal(fy, sy)


def test_under_a_distributed_sampler_each_rank_gets_the_same_batches():
    dm = DigitsDataModule(batch_size=32)
    dm.setup("fit")
    loader = dm.train_dataloader()
    for rank in (0, 1):
        sampler = DistributedSampler(loader.dataset, num_replicas=2, rank=rank, shuffle=True, seed=5)
        fast = DataLoader(loader.dataset, batch_size=32, sampler=sampler, collate_fn=loader.collate_fn)
        slow = DataLoader(dm.train_dataset, batch_size=32, sampler=sampler)
        for (fx, fy), (sx, sy) in zip(fast, slow):
            assert torch.equal(fx, sx) and torch.equal(fy, sy)


def test_a_trainer_run_is_unchanged_by_the_batched_fetch():
    from lightning_methods import ClassifierModule
    from lightning_methods.nets import MLP
    from tests.helpers import cpu_trainer

    finals = []
    for batched in (True, False):
        pl.seed_everything(0)
        dm = DigitsDataModule(batch_size=64)
        if not batched:
            dm._loader = lambda ds, bs, shuffle, drop_last=False: DataLoader(ds, batch_size=bs, shuffle=shuffle, drop_last=drop_last)
        module = ClassifierModule(MLP(64, 10, hidden_sizes=[16]), 10)
        cpu_trainer(max_epochs=2, limit_val_batches=0).fit(module, dm)
        finals.append(torch.cat([p.detach().flatten() for p in module.parameters()]))
    torch.testing.assert_close(finals[0], finals[1])


def test_a_dataset_subclass_overriding_getitem_keeps_its_own_examples():
    # review: a user's ArrayDataset subclass with its own __getitem__ (noise, relabelling) was wrapped into the
    # batched view, whose batch() reads the arrays directly: the override was silently skipped by the loaders
    from datamodules._base import ArrayDataset

    class Negated(ArrayDataset):
        def __getitem__(self, index):
            x, y = super().__getitem__(index)
            return -x, y

    dm = DigitsDataModule(batch_size=8, shuffle=False)
    dm.setup("fit")
    dm.train_dataset = Negated(dm.train_dataset.x, dm.train_dataset.y)
    x, _ = next(iter(dm.train_dataloader()))
    assert torch.equal(x, -dm.train_dataset.x[:8])


def test_whole_split_passes_over_a_datamodules_loader_get_collated_batches():
    # review: map_in_order (ResMem's build_memory/tune/embed, the distillation cache) took a loader's dataset and
    # collate_fn but fetched example by example: with the batched view's pass-through collate, fn got a list of
    # (x, y) pairs instead of [x, y], so `resmem.build_memory(dm.train_dataloader())` failed
    from lightning_methods._distributed import map_in_order

    dm = DigitsDataModule(batch_size=16, shuffle=False)
    dm.setup("fit")
    xs, ys = map_in_order(dm.val_dataloader(), lambda batch: (batch[0], batch[1]), batch_size=32)
    assert torch.equal(xs, dm.val_dataset.x) and torch.equal(ys, dm.val_dataset.y)
