"""DistillationModule and its two callbacks, TeacherTrajectory and DistillationDiagnostics."""

from __future__ import annotations

import functools
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from callbacks import DistillationDiagnostics, TeacherTrajectory
from datamodules import DigitsDataModule
from lightning_methods import ClassifierModule, DistillationModule
from lightning_methods.distillation import load_backbone_weights
from lightning_methods.nets import MLP
from tests.contracts.registry import DDP, Built, Entry, InOrderDigits, adam, register, scratch_dir, sgd
from tests.helpers import cpu_trainer


def teacher_net() -> nn.Module:
    return MLP(64, 10, hidden_sizes=[32])


def student_net() -> nn.Module:
    return MLP(64, 10, hidden_sizes=[16])


@functools.lru_cache(maxsize=1)
def teacher_dir() -> Path:
    """A tiny digits teacher trajectory (epoch=0.ckpt .. epoch=2.ckpt, last.ckpt), trained once per session."""
    directory = scratch_dir("distillation-teacher")
    if not (directory / "last.ckpt").is_file():
        pl.seed_everything(0)
        checkpoint = ModelCheckpoint(directory, filename="{epoch}", save_top_k=-1, every_n_epochs=1, save_last=True)
        trainer = cpu_trainer(max_epochs=3, limit_train_batches=5, limit_val_batches=0, enable_checkpointing=True,
                              callbacks=[checkpoint])
        trainer.fit(ClassifierModule(teacher_net(), 10, optimizer=adam(1e-2)), DigitsDataModule(batch_size=64))
    return directory


def trained_teacher() -> nn.Module:
    return load_backbone_weights(teacher_dir() / "last.ckpt", teacher_net())


def student(teacher: nn.Module | None = None, **kwargs) -> DistillationModule:
    args = dict(num_classes=10, temperature=2.0, alpha=0.5, optimizer=adam(1e-2))
    return DistillationModule(student_net(), teacher if teacher is not None else trained_teacher(), **{**args, **kwargs})


def reload_kwargs() -> dict:
    return {"student": student_net(), "teacher": teacher_net()}


# -- DistillationModule: the teacher from a checkpoint path (reloaded at fit and on resume), logits cached ---------------
def build() -> Built:
    module = student(teacher_net(), teacher_checkpoint=str(teacher_dir() / "last.ckpt"), cache_teacher_logits=True,
                     distill_start_epoch=1)  # a late switch: the schedule crosses the resume point
    return Built(module, InOrderDigits(batch_size=32))


def build_ddp(world: int) -> Built:
    # every rank caches the logit table of the whole training set and serves the rows its sampler picks
    module = student(cache_teacher_logits=True, optimizer=sgd(0.5))
    return Built(module, InOrderDigits(batch_size=32 // world))


register(
    Entry(
        name="DistillationModule",
        build=build,
        reload_kwargs=reload_kwargs,
        bad_configs={
            # a teacher without `num_classes` is probed on the data's input shape
            "teacher-classes": lambda: Built(student(nn.Sequential(nn.Flatten(), nn.Linear(64, 5))), DigitsDataModule()),
            "student-input-shape": lambda: Built(
                DistillationModule(MLP(30, 10), trained_teacher(), num_classes=10), DigitsDataModule()
            ),
            "teacher-checkpoint-architecture": lambda: Built(
                student(MLP(64, 10, hidden_sizes=[8]), teacher_checkpoint=str(teacher_dir() / "last.ckpt")),
                DigitsDataModule(),
            ),
            "num-classes-vs-data": lambda: Built(
                DistillationModule(MLP(64, 3), MLP(64, 3), num_classes=3), DigitsDataModule()
            ),
            "cache-with-augmentation": lambda: Built(student(cache_teacher_logits=True), DigitsDataModule(augment=True)),
        },
        ddp=DDP(build_ddp),
    )
)


# -- TeacherTrajectory: the teacher moves along epoch=0,1,2 checkpoints ------------------------------------------------
def _trajectory_build(batch_size: int = 32, optimizer=None) -> Built:
    module = student(teacher_net(), **({"optimizer": optimizer} if optimizer else {}))
    return Built(module, InOrderDigits(batch_size=batch_size), [TeacherTrajectory(str(teacher_dir()))])


register(
    Entry(
        name="TeacherTrajectory",
        build=_trajectory_build,
        reload_kwargs=reload_kwargs,
        bad_configs={
            "checkpoint-architecture": lambda: Built(
                student(MLP(64, 10, hidden_sizes=[8])), DigitsDataModule(), [TeacherTrajectory(str(teacher_dir()))]
            ),
            "schedule-beyond-trajectory": lambda: Built(
                student(teacher_net()), DigitsDataModule(), [TeacherTrajectory(str(teacher_dir()), schedule=[0, 7])]
            ),
            "empty-directory": lambda: Built(
                student(teacher_net()), DigitsDataModule(), [TeacherTrajectory(str(scratch_dir("empty-trajectory")))]
            ),
        },
        # every rank loads the scheduled checkpoint itself: the teachers (hence the students) must agree with 1 process
        ddp=DDP(lambda world: _trajectory_build(32 // world, sgd(0.5))),
    )
)


# -- DistillationDiagnostics: history of slopes and supervision complexities -------------------------------------------
def _diagnostics() -> DistillationDiagnostics:
    return DistillationDiagnostics(num_samples=40, sc_num_samples=24)


def _diagnostics_build(batch_size: int = 32, optimizer=None) -> Built:
    module = student(**({"optimizer": optimizer} if optimizer else {}))
    return Built(module, InOrderDigits(batch_size=batch_size), [_diagnostics()])


register(
    Entry(
        name="DistillationDiagnostics",
        build=_diagnostics_build,
        reload_kwargs=reload_kwargs,
        bad_configs={
            "not-a-distillation-module": lambda: Built(
                ClassifierModule(MLP(64, 10), 10), DigitsDataModule(), [_diagnostics()]
            ),
            "too-few-samples": lambda: Built(student(), DigitsDataModule(), [DistillationDiagnostics(num_samples=5)]),
        },
        # measured on the same fixed subsets on every rank, from the student's weights: equal to 1 process
        ddp=DDP(lambda world: _diagnostics_build(32 // world, sgd(0.5))),
    )
)
