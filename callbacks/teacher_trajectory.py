"""Online distillation: the student distils, at each epoch, from the matching checkpoint of the teacher's training."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

__all__ = ["TeacherTrajectory"]

_EPOCH = re.compile(r"epoch=(\d+)")
_STEP = re.compile(r"step=(\d+)")
_VERSION = re.compile(r"-v(\d+)\.[^.]+$")  # ModelCheckpoint's suffix for a file name already taken by an earlier run


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def list_checkpoints(directory: str | Path, pattern: str = "*.ckpt") -> list[str]:
    """The checkpoints of one training run in ``directory``, in training order.

    Files named by ``ModelCheckpoint``'s ``{epoch}`` / ``{step}`` fields are ordered by epoch then step, and
    other files (``last.ckpt``, a best-model copy) are left out when such files exist; otherwise names are sorted
    naturally (``2`` before ``10``).
    """
    files = [p for p in Path(directory).glob(pattern) if p.is_file()]
    tagged = [p for p in files if _EPOCH.search(p.name)]
    rerun = sorted(p.name for p in tagged if _VERSION.search(p.name))
    if rerun:
        raise ValueError(
            f"{str(directory)!r} holds checkpoints of more than one training run ({', '.join(rerun[:3])}"
            f"{' ...' if len(rerun) > 3 else ''}: ModelCheckpoint adds `-v1` when a run writes a name an earlier run "
            "already wrote), so the trajectory would mix two teachers. Give each teacher run its own directory, or "
            "pass the checkpoints of one run as an explicit list."
        )
    if tagged:

        def key(p: Path) -> tuple[int, int]:
            step = _STEP.search(p.name)
            return int(_EPOCH.search(p.name).group(1)), int(step.group(1)) if step else 0

        return [str(p) for p in sorted(tagged, key=key)]
    return [str(p) for p in sorted(files, key=lambda p: _natural_key(p.name))]


class TeacherTrajectory(Callback):
    """Give a :class:`~lightning_methods.DistillationModule` a teacher that moves along its own training trajectory.

    Online distillation (Harutyunyan et al., "Supervision Complexity and its Role in Knowledge Distillation",
    arXiv 2301.12245, ICLR 2023): the teacher is trained first for ``E`` epochs with a checkpoint per
    epoch; the student then trains for ``E`` epochs and at student epoch ``e`` distils from teacher checkpoint
    ``e``, so its targets grow in complexity as it learns (the offline baseline always uses the final checkpoint).

    At the start of every training epoch the callback loads the scheduled checkpoint into the module's teacher,
    lazily (one checkpoint in memory at a time, read only when the index changes) and on every rank. The list of
    checkpoints and the position are saved in the student's checkpoint and restored on resume.

    Args:
        checkpoints: a directory of teacher checkpoints (e.g. written by ``ModelCheckpoint(every_n_epochs=1,
            save_top_k=-1)``; ordered by their ``epoch=`` field, ``last.ckpt`` ignored) or an explicit list of paths
            in trajectory order. Each is a ``ClassifierModule`` checkpoint (or a plain state dict of the teacher).
        epochs_per_checkpoint: student epochs spent on each checkpoint: checkpoint ``e // epochs_per_checkpoint``
            at student epoch ``e`` (the paper's schedule is ``1``).
        schedule: explicit checkpoint index for each student epoch (overrides ``epochs_per_checkpoint``); the last
            entry holds for later epochs.
        pattern: glob of checkpoint files inside a directory.

    Note:
        Epochs beyond the trajectory keep the final checkpoint. The module's ``teacher`` gives the architecture;
        without one, it is rebuilt from the first checkpoint's hyperparameters (checkpoints written by the
        ``lightning-methods`` CLI). Incompatible with ``cache_teacher_logits=True`` (the teacher changes).

    Example::

        >>> trajectory = TeacherTrajectory(["t/epoch=0.ckpt", "t/epoch=1.ckpt", "t/epoch=2.ckpt"])
        >>> [trajectory.index_for_epoch(e) for e in range(5)]
        [0, 1, 2, 2, 2]
    """

    def __init__(
        self,
        checkpoints: str | Sequence[str],
        epochs_per_checkpoint: int = 1,
        schedule: Sequence[int] | None = None,
        pattern: str = "*.ckpt",
    ) -> None:
        if isinstance(checkpoints, Path):
            checkpoints = str(checkpoints)
        if not isinstance(checkpoints, str) and (
            not isinstance(checkpoints, Sequence) or not all(isinstance(c, (str, Path)) for c in checkpoints)
        ):
            raise TypeError(f"`checkpoints` must be a directory or a list of checkpoint paths, got {checkpoints!r}.")
        if isinstance(epochs_per_checkpoint, bool) or not isinstance(epochs_per_checkpoint, int) or epochs_per_checkpoint < 1:
            raise ValueError(f"`epochs_per_checkpoint` must be an integer >= 1, got {epochs_per_checkpoint!r}.")
        if schedule is not None:
            schedule = list(schedule)
            if not schedule or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in schedule):
                raise ValueError(f"`schedule` must be a non-empty list of checkpoint indices >= 0, got {schedule!r}.")
        self.checkpoints = checkpoints if isinstance(checkpoints, str) else [str(c) for c in checkpoints]
        self.epochs_per_checkpoint = epochs_per_checkpoint
        self.schedule = schedule
        self.pattern = pattern
        self.paths: list[str] = [] if isinstance(checkpoints, str) else list(self.checkpoints)
        #: index of the checkpoint held by the teacher now (None: not loaded in this process)
        self.current_index: int | None = None
        #: index in use when the last student checkpoint was saved / restored
        self.restored_index: int | None = None

    # -- the schedule -------------------------------------------------------------------------------------------------
    def index_for_epoch(self, epoch: int) -> int:
        """The trajectory index the teacher uses at student epoch ``epoch`` (clamped to the last checkpoint)."""
        if self.schedule is not None:
            index = self.schedule[min(epoch, len(self.schedule) - 1)]
        else:
            index = epoch // self.epochs_per_checkpoint
        return min(index, len(self.paths) - 1) if self.paths else index

    def _resolve(self) -> list[str]:
        if isinstance(self.checkpoints, str):
            directory = Path(self.checkpoints)
            if not directory.is_dir():
                raise FileNotFoundError(
                    f"`checkpoints={self.checkpoints!r}` is not a directory. Train the teacher with "
                    "`ModelCheckpoint(dirpath=..., every_n_epochs=1, save_top_k=-1)` first (e.g. "
                    "`lightning-methods fit --config configs/distillation/teacher.yaml`), or pass a list of paths."
                )
            paths = list_checkpoints(directory, self.pattern)
            if not paths:
                raise ValueError(
                    f"`checkpoints={self.checkpoints!r}` holds no files matching {self.pattern!r}: point it at the "
                    "teacher's checkpoint directory (or change `pattern`)."
                )
            return paths
        if not self.checkpoints:
            raise ValueError("`checkpoints` is an empty list: give the teacher checkpoints in trajectory order.")
        return list(self.checkpoints)

    # -- hooks ----------------------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not callable(getattr(pl_module, "load_teacher", None)):
            raise TypeError(
                f"TeacherTrajectory needs a DistillationModule (a module with `load_teacher`), got "
                f"{type(pl_module).__name__}."
            )
        if getattr(pl_module, "cache_teacher_logits", False):
            raise ValueError(
                "TeacherTrajectory changes the teacher every epoch, so its logits cannot be cached: set "
                "`cache_teacher_logits=False` on the DistillationModule."
            )
        self.paths = self._resolve()
        missing = [p for p in self.paths if not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(f"`checkpoints` lists files that do not exist: {missing[:3]}.")
        if self.schedule is not None and max(self.schedule) >= len(self.paths):
            raise ValueError(
                f"`schedule` refers to checkpoint {max(self.schedule)} but only {len(self.paths)} teacher "
                f"checkpoints were found in {self.checkpoints!r}."
            )
        if len(self.paths) < (trainer.max_epochs or 0) and self.schedule is None and self.epochs_per_checkpoint == 1:
            rank_zero_warn(
                f"TeacherTrajectory has {len(self.paths)} teacher checkpoints for {trainer.max_epochs} student "
                "epochs: the last checkpoint is used for the remaining epochs."
            )
        # Load the first one now: an architecture mismatch fails here, before any training step.
        pl_module.load_teacher(self.paths[self.index_for_epoch(0)], arg="checkpoints")
        self.current_index = None  # the module's own setup may still load `teacher_checkpoint` over it

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync(trainer, pl_module)
        pl_module.log("teacher_index", float(self.current_index), on_step=False, on_epoch=True, sync_dist=True)

    def _sync(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        index = self.index_for_epoch(trainer.current_epoch)
        if index != self.current_index:
            pl_module.load_teacher(self.paths[index], arg="checkpoints")
            self.current_index = index

    # -- checkpointing --------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"paths": list(self.paths), "current_index": self.current_index}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        paths = list(state_dict["paths"])
        if self.paths and paths != self.paths:
            rank_zero_warn(
                "TeacherTrajectory: the checkpoints found now differ from those of the run being resumed; "
                "continuing with the resumed run's list."
            )
        self.paths = paths
        self.restored_index = state_dict.get("current_index")
        self.current_index = None  # the teacher's weights are not in the student checkpoint: reload at train start
