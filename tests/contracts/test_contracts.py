"""The contracts every technique keeps (DESIGN.md), run for every entry of the registry (timm-style).

* ``test_bad_config_fails_before_any_step``: a mismatched config raises ValueError/TypeError, no optimizer step ran
  and the weights are untouched;
* ``test_reload_gives_identical_predictions``: fit -> checkpoint (loads with ``torch.load(weights_only=True)``) ->
  ``load_from_checkpoint`` -> the same predictions;
* ``test_resume_equals_uninterrupted_run``: a run killed after its first epoch and resumed from its checkpoint ends in
  the same state as an uninterrupted run: weights, buffers, extra state, optimizer state, callback state and whatever
  the module adds to its checkpoint;
* ``test_two_processes_equal_one`` (slow): a 2-process ``ddp_spawn`` run ends in the state of the 1-process run, on
  both ranks (where the entry's state spans the dataset or is random per rank).

How an entry opts out of a contract (with a reason) or records a known failure: see README.md beside this file.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from tests.contracts.registry import DDP, Entry, load_entries
from tests.helpers import cpu_trainer, ddp_trainer

ENTRIES = load_entries()
# each resumed run gets its own ModelCheckpoint directory on purpose
pytestmark = pytest.mark.filterwarnings("ignore:The dirpath has changed")
RTOL = 1e-5


def _params(contract: str, slow: bool = False) -> list:
    params = []
    for entry in ENTRIES:
        marks = [pytest.mark.slow] if slow else []
        value = getattr(entry, contract)
        if isinstance(value, str):
            marks.append(pytest.mark.skip(reason=f"{entry.name}: {value}"))
        if contract in entry.xfail:
            marks.append(pytest.mark.xfail(reason=entry.xfail[contract], strict=True))
        params.append(pytest.param(entry, id=entry.name, marks=marks))
    return params


def _bad_params() -> list:
    params = []
    for entry in ENTRIES:
        for name, make in entry.bad_configs.items():
            marks = []
            if f"bad_config:{name}" in entry.xfail:
                marks.append(pytest.mark.xfail(reason=entry.xfail[f"bad_config:{name}"], strict=True))
            params.append(pytest.param(entry, make, id=f"{entry.name}-{name}", marks=marks))
    return params


# ----------------------------------------------------------------------------------------------------------------------
# Comparing states
# ----------------------------------------------------------------------------------------------------------------------
def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts/lists of a checkpoint -> ``{"a/b/0": leaf}``; tensors and plain values are leaves."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}/"))
        return out
    if isinstance(value, (list, tuple)):
        out = {}
        for i, item in enumerate(value):
            out.update(_flatten(item, f"{prefix}{i}/"))
        if not value:
            out[prefix.rstrip("/")] = type(value)()
        return out
    return {prefix.rstrip("/"): value}


def _same(a: Any, b: Any, atol: float) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape:
            return False
        if a.is_floating_point() or a.is_complex():
            return torch.allclose(a.double(), b.double(), atol=atol, rtol=RTOL, equal_nan=True)
        return torch.equal(a, b)
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=RTOL, abs_tol=atol) or (math.isnan(a) and math.isnan(b))
    return type(a) is type(b) and a == b


def _differences(a: dict, b: dict, atol: float, skip: tuple[str, ...] = ()) -> list[str]:
    fa, fb = _flatten(a), _flatten(b)
    keys = sorted((set(fa) | set(fb)))
    out = []
    for key in keys:
        if key.startswith(skip):
            continue
        if key not in fa or key not in fb:
            out.append(f"{key}: only in {'the first' if key in fa else 'the second'}")
        elif not _same(fa[key], fb[key], atol):
            out.append(f"{key}: {_short(fa[key])} != {_short(fb[key])}")
    return out


def _short(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)}(max|x|={value.abs().max().item() if value.numel() else 0:.4g})"
    text = repr(value)
    return text if len(text) < 60 else text[:57] + "..."


def _technique_state(checkpoint: dict) -> dict:
    """What a technique owns in a checkpoint: everything but Lightning's loop bookkeeping, versions and the
    ModelCheckpoint callbacks of the test itself (their paths differ between runs)."""
    state = {k: v for k, v in checkpoint.items() if k not in ("loops", "pytorch-lightning_version", "hparams_name")}
    state["callbacks"] = {k: v for k, v in checkpoint.get("callbacks", {}).items() if not k.startswith("ModelCheckpoint")}
    return state


# ----------------------------------------------------------------------------------------------------------------------
# (a) a mismatched config fails before any optimizer step
# ----------------------------------------------------------------------------------------------------------------------
class _StepSpy(Callback):
    """Counts optimizer steps and training batches that reached the module."""

    def __init__(self) -> None:
        self.optimizer_steps = 0
        self.batches = 0

    def on_train_batch_start(self, *args: Any) -> None:
        self.batches += 1

    def on_before_optimizer_step(self, *args: Any) -> None:
        self.optimizer_steps += 1


def _unchanged(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.is_floating_point() and b.is_floating_point() and a.shape == b.shape:
        return torch.equal(torch.nan_to_num(a, nan=0.0), torch.nan_to_num(b, nan=0.0)) and torch.equal(a.isnan(), b.isnan())
    return torch.equal(a, b)


@pytest.mark.parametrize(("entry", "make"), _bad_params())
def test_bad_config_fails_before_any_step(entry: Entry, make):
    pl.seed_everything(0)
    try:
        built = make()
    except (ValueError, TypeError) as err:  # caught by a constructor already: nothing can have run
        assert str(err).strip(), "the error must say what is wrong"
        return
    before = copy.deepcopy(built.module.state_dict())
    spy = _StepSpy()
    trainer = cpu_trainer(**{**entry.trainer_kwargs, **built.trainer_kwargs, "callbacks": [*built.callbacks, spy]})
    with pytest.raises((ValueError, TypeError)) as info:
        trainer.fit(built.module, built.datamodule)
    assert str(info.value).strip(), "the error must say what is wrong"
    assert spy.optimizer_steps == 0 and trainer.global_step == 0, "an optimizer step ran before the error"
    after = built.module.state_dict()
    changed = [  # NaN marks unset state (e.g. thresholds before fit): equal to NaN where it was NaN
        k for k, v in before.items()
        if isinstance(v, torch.Tensor) and k in after and not _unchanged(v, after[k])
    ]
    assert not changed, f"weights changed before the error: {changed[:5]}"


def test_every_entry_has_a_bad_config():
    missing = [e.name for e in ENTRIES if not e.bad_configs]
    assert not missing, f"entries without a mismatched config to refuse: {missing}"


# ----------------------------------------------------------------------------------------------------------------------
# (b) fit -> checkpoint -> load_from_checkpoint -> identical predictions
# ----------------------------------------------------------------------------------------------------------------------
def _predict(entry: Entry, module: pl.LightningModule, batch: Any) -> torch.Tensor:
    module.eval()
    with torch.no_grad():
        out = entry.predict(module, batch)
    assert isinstance(out, torch.Tensor) and out.numel() > 0
    return out


@pytest.mark.parametrize("entry", _params("reload"))
def test_reload_gives_identical_predictions(entry: Entry, tmp_path: Path):
    pl.seed_everything(0)
    built = entry.build()
    initial = copy.deepcopy(built.module.state_dict())
    trainer = cpu_trainer(**{**entry.trainer_kwargs, "callbacks": built.callbacks})
    trainer.fit(built.module, built.datamodule)
    assert trainer.global_step > 0
    path = tmp_path / "fitted.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # plain data only: no pickled objects
    assert checkpoint["state_dict"].keys() == built.module.state_dict().keys()

    batch = entry.batch(built)
    expected = _predict(entry, built.module, batch)
    pl.seed_everything(1)  # a reload must not depend on the RNG state
    reloaded = type(built.module).load_from_checkpoint(path, map_location="cpu", weights_only=True, **entry.reload_kwargs())
    got = _predict(entry, reloaded, batch)
    torch.testing.assert_close(got, expected, atol=entry.atol, rtol=RTOL)
    # the check has teeth: a freshly built, untrained module predicts something else
    final = built.module.state_dict()
    trained = [k for k, v in initial.items() if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.equal(v, final[k])]
    assert trained, "the tiny fit changed no weight: make the entry's fit train"


# ----------------------------------------------------------------------------------------------------------------------
# (c) killed after epoch 1 and resumed == uninterrupted
# ----------------------------------------------------------------------------------------------------------------------
class _Killed(RuntimeError):
    pass


class _KillAtEpoch(Callback):
    """Stands for a crash: raises when epoch ``epoch`` starts (the checkpoint of the epoch before is on disk)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise _Killed(f"killed at the start of epoch {self.epoch}")


def _run(entry: Entry, directory: Path, kill_at: int | None = None, ckpt_path: str | None = None) -> tuple[pl.Trainer, dict]:
    pl.seed_everything(0)
    built = entry.build()
    checkpoint = ModelCheckpoint(dirpath=directory, save_last=True, save_top_k=-1, filename="{epoch}")
    callbacks = [*built.callbacks, checkpoint] + ([_KillAtEpoch(kill_at)] if kill_at is not None else [])
    trainer = cpu_trainer(**{**entry.trainer_kwargs, "enable_checkpointing": True, "callbacks": callbacks})
    trainer.fit(built.module, built.datamodule, ckpt_path=ckpt_path)
    trainer.save_checkpoint(directory / "final.ckpt")
    return trainer, torch.load(directory / "final.ckpt", map_location="cpu", weights_only=True)


@pytest.mark.parametrize("entry", _params("resume"))
def test_resume_equals_uninterrupted_run(entry: Entry, tmp_path: Path):
    assert (entry.trainer_kwargs.get("max_epochs") or 0) >= 2, "resume needs a fit of at least two epochs"
    straight, final = _run(entry, tmp_path / "straight")
    with pytest.raises(_Killed):
        _run(entry, tmp_path / "killed", kill_at=1)
    saved = tmp_path / "killed" / "epoch=0.ckpt"
    at_kill = torch.load(saved, map_location="cpu", weights_only=True)
    assert at_kill["epoch"] == 0
    resumed, resumed_final = _run(entry, tmp_path / "resumed", ckpt_path=str(saved))
    assert resumed.global_step == straight.global_step > at_kill["global_step"]
    assert resumed.current_epoch == straight.current_epoch
    differences = _differences(_technique_state(final), _technique_state(resumed_final), entry.atol)
    assert not differences, "the resumed run ended elsewhere:\n" + "\n".join(differences[:20])
    # the comparison has teeth: training went on after the kill
    assert _differences(_technique_state(at_kill)["state_dict"], final["state_dict"], entry.atol)


# ----------------------------------------------------------------------------------------------------------------------
# (d) 2 processes == 1 process
# ----------------------------------------------------------------------------------------------------------------------
class _DumpState(Callback):
    """At the end of fit, every rank writes the state a checkpoint would hold (public hooks only)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state: dict[str, Any] = {"state_dict": pl_module.state_dict(), "global_step": trainer.global_step}
        extra: dict[str, Any] = {}
        pl_module.on_save_checkpoint(extra)
        state["module_checkpoint"] = extra
        state["optimizer"] = [opt.state_dict() for opt in trainer.optimizers]
        state["callbacks"] = {
            cb.state_key: cb.state_dict()
            for cb in trainer.callbacks
            if not isinstance(cb, (ModelCheckpoint, _DumpState)) and cb.state_dict()
        }
        torch.save(state, Path(self.directory) / f"rank{trainer.global_rank}.pt")


def _ddp_run(entry: Entry, spec: DDP, world: int, directory: Path) -> dict | list[dict]:
    directory.mkdir()
    pl.seed_everything(0)
    built = spec.build(world)
    make = cpu_trainer if world == 1 else ddp_trainer
    trainer = make(**{**spec.trainer_kwargs, "callbacks": [*built.callbacks, _DumpState(str(directory))]})
    trainer.fit(built.module, built.datamodule)
    return [torch.load(directory / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.mark.parametrize("entry", _params("ddp", slow=True))
def test_two_processes_equal_one(entry: Entry, tmp_path: Path):
    spec: DDP = entry.ddp  # type: ignore[assignment]
    (single,) = _ddp_run(entry, spec, 1, tmp_path / "one")
    rank0, rank1 = _ddp_run(entry, spec, 2, tmp_path / "two")
    assert single["global_step"] == rank0["global_step"] > 0
    replicas = _differences(rank0, rank1, spec.atol)
    assert not replicas, "the two ranks hold different state:\n" + "\n".join(replicas[:20])
    vs_single = _differences(single, rank0, spec.atol, skip=spec.differs_from_single)
    assert not vs_single, "2 processes ended elsewhere than 1 process:\n" + "\n".join(vs_single[:20])
