"""The suite's reusable ``ddp_spawn`` workers (tests/ddp_pool.py) behave like a fresh ``ddp_spawn`` pair."""

from __future__ import annotations

import os
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.demos.boring_classes import BoringModel

from tests.contracts.registry import load_entries
from tests.contracts.test_contracts import _ddp_run, _differences
from tests.helpers import ddp_trainer


class _FailsOnRank(BoringModel):
    """Raises in its second training step on one rank; with ``hang``, the other rank then waits in a collective."""

    def __init__(self, rank: int, hang: bool = False) -> None:
        super().__init__()
        self.rank, self.hang = rank, hang

    def training_step(self, batch, batch_idx):
        if batch_idx == 1 and self.global_rank == self.rank:
            raise RuntimeError(f"planted failure on rank {self.rank}")
        if batch_idx == 1 and self.hang:
            dist.barrier()  # never matched: the failing rank left
        return super().training_step(batch, batch_idx)


class _ExitsOnRank1(BoringModel):
    """Rank 1's process dies in its second step (a segfault or an out-of-memory kill looks like this)."""

    def training_step(self, batch, batch_idx):
        if batch_idx == 1 and self.global_rank == 1:
            os._exit(3)
        return super().training_step(batch, batch_idx)


class _Rank1WaitsAtTheEnd(pl.Callback):
    """Rank 1 enters a collective rank 0 never joins, after a fit both finished."""

    def on_fit_end(self, trainer, pl_module):
        if trainer.global_rank == 1:
            dist.barrier()


class _LogsItsRank(BoringModel):
    def training_step(self, batch, batch_idx):
        self.log("rank_sum", float(self.global_rank), sync_dist=True, reduce_fx="sum")
        return super().training_step(batch, batch_idx)


class _WritesWhereItRuns(pl.Callback):
    def on_fit_start(self, trainer, pl_module):
        Path(f"rank{trainer.global_rank}.txt").write_text(os.environ.get("LM_POOL_PROBE", "unset"))


def _fit(module: pl.LightningModule, **kwargs) -> pl.Trainer:
    trainer = ddp_trainer(max_steps=3, limit_val_batches=0, num_sanity_val_steps=0, **kwargs)
    trainer.fit(module)
    return trainer


@pytest.mark.slow  # one fresh ddp_spawn pair (~8 s)
def test_pooled_workers_end_in_the_state_of_a_fresh_ddp_spawn_pair(tmp_path, monkeypatch):
    (entry,) = [e for e in load_entries() if e.name == "DistillationModule"]  # dataset-spanning state: the logit cache
    pooled = _ddp_run(entry, entry.ddp, 2, tmp_path / "pooled")
    monkeypatch.setenv("LM_FRESH_DDP_SPAWN", "1")
    fresh = _ddp_run(entry, entry.ddp, 2, tmp_path / "fresh")
    for rank in range(2):
        assert pooled[rank]["global_step"] == fresh[rank]["global_step"] > 0
        assert not _differences(pooled[rank], fresh[rank], 1e-6)


@pytest.mark.slow  # starts a second pair of workers (~8 s)
def test_a_failure_on_one_rank_is_raised_and_the_next_fit_gets_fresh_workers():
    start = time.perf_counter()
    with pytest.raises(mp.ProcessRaisedException, match="planted failure on rank 1"):
        _fit(_FailsOnRank(rank=1, hang=True))
    assert time.perf_counter() - start < 60  # rank 0, left waiting in a collective, does not hang the test
    module = BoringModel()
    before = module.layer.weight.detach().clone()
    trainer = _fit(module)
    assert trainer.state.finished and not torch.equal(module.layer.weight, before)


@pytest.mark.slow  # starts the session's workers when it runs first (~8 s)
@pytest.mark.slow  # starts a second pair of workers (~8 s)
def test_a_dead_rank_is_reported_with_its_exit_code():
    with pytest.raises(mp.ProcessExitedException, match="exit code 3"):
        _fit(_ExitsOnRank1())


@pytest.mark.slow  # starts a second pair of workers (~8 s)
def test_a_rank_left_alone_in_a_collective_fails_fast_like_under_ddp_spawn():
    """Under ddp_spawn the finished rank exits and its peer's collective fails; the pool destroys the finished rank's
    process group, with the same effect (not a hang until the timeout)."""
    start = time.perf_counter()
    with pytest.raises(mp.ProcessRaisedException, match="Process 1 terminated"):
        _fit(BoringModel(), callbacks=[_Rank1WaitsAtTheEnd()])
    assert time.perf_counter() - start < 60


def test_weights_and_metrics_come_back_and_workers_see_the_tests_folder_and_environment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LM_POOL_PROBE", "probe")
    module = _LogsItsRank()
    before = module.layer.weight.detach().clone()
    trainer = _fit(module, callbacks=[_WritesWhereItRuns()])
    assert not torch.equal(module.layer.weight, before), "rank 0's trained weights did not come back"
    assert trainer.state.finished and trainer.callback_metrics["rank_sum"].item() == 1.0  # 0 + 1, synced
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)] == ["probe", "probe"]
