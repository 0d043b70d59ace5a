"""Helpers for the test suite (not fixtures: plain functions any test module may import)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
from pathlib import Path
from types import ModuleType
from typing import Any
from unittest import mock

import lightning.pytorch as pl
import torch


def cpu_trainer(**overrides: Any) -> pl.Trainer:
    """A quiet single-process CPU Trainer; keyword arguments override the defaults."""
    kwargs: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    kwargs.update(overrides)
    return pl.Trainer(**kwargs)


def printed_test_acc(stdout: str) -> float | None:
    """The ``test_acc`` of the results table Lightning prints after ``trainer.test`` (``None`` if none was printed)."""
    match = re.search(r"test_acc\s*[│|]\s*([0-9.]+)", stdout)
    return float(match.group(1)) if match else None


def ddp_trainer(**overrides: Any) -> pl.Trainer:
    """A 2-process CPU DDP Trainer through ``ddp_spawn`` (plain ``ddp`` would re-run pytest).

    The two spawned processes are started once per session (``tests/ddp_pool.py``: the same pickling and worker code
    as ``ddp_spawn``, ~7 s less per fit); ``LM_FRESH_DDP_SPAWN=1`` spawns a fresh pair per fit (plain ``ddp_spawn``).
    """
    if os.environ.get("LM_FRESH_DDP_SPAWN") == "1":
        strategy: Any = "ddp_spawn"
    else:
        from tests.ddp_pool import PooledDDPSpawnStrategy

        strategy = PooledDDPSpawnStrategy()
    return cpu_trainer(strategy=strategy, devices=2, **overrides)


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` (a script directory, not a package) so a smoke test can call its ``main``."""
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_cli(*args: str) -> Any:
    """Run the ``lightning-methods`` CLI in this process (like the console script) and return the CLI object."""
    from lightning_methods.cli import cli_main

    # LightningCLI warns when given args while sys.argv holds pytest's own arguments
    with contextlib.redirect_stdout(io.StringIO()), mock.patch("sys.argv", ["lightning-methods"]):
        return cli_main(list(args))


class TwoBackboneModule(pl.LightningModule):
    """A module with ``student`` and ``teacher`` backbones, to test CLI links into backbone arguments by name."""

    def __init__(self, student: "torch.nn.Module", teacher: "torch.nn.Module", num_classes: int) -> None:
        super().__init__()
        self.student, self.teacher, self.num_classes = student, teacher, num_classes

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        return torch.nn.functional.cross_entropy(self.student(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.student.parameters(), lr=0.1)
