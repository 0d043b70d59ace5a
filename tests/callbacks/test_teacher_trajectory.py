"""TeacherTrajectory: checkpoint ordering, the schedule (teacher checkpoint e at student epoch e) and the clear errors.
Resume and the 2-process run are contracts of its entry in tests/contracts/entries/distillation.py."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from callbacks import TeacherTrajectory
from callbacks.teacher_trajectory import list_checkpoints
from lightning_methods import ClassifierModule, DistillationModule
from lightning_methods.distillation import load_backbone_weights
from tests.helpers import cpu_trainer
from tests.lightning_methods.test_distillation import (  # noqa: F401  (teacher_dir is a fixture)
    TEACHER_EPOCHS,
    digits,
    student_net,
    teacher_dir,
    teacher_net,
)


class _RecordTeacher(pl.Callback):
    """At each epoch start (after the trajectory's), which checkpoint the teacher holds; one JSON line per rank."""

    def __init__(self, heads: list[torch.Tensor], out: Path | None = None) -> None:
        self.heads, self.out, self.seen = heads, out, []

    def on_train_epoch_start(self, trainer, module):
        held = module.teacher.head.weight.detach().cpu()
        (index,) = [i for i, head in enumerate(self.heads) if torch.equal(head, held)]
        self.seen.append((trainer.current_epoch, index))
        if self.out is not None:
            with open(self.out / f"rank{trainer.global_rank}.jsonl", "a") as f:
                f.write(json.dumps([trainer.current_epoch, index]) + "\n")


def _heads(teacher_dir: Path) -> list[torch.Tensor]:
    return [load_backbone_weights(p, teacher_net()).head.weight.detach() for p in list_checkpoints(teacher_dir)]


def _module() -> DistillationModule:
    pl.seed_everything(0)
    return DistillationModule(student_net(), teacher_net(), num_classes=10, temperature=2.0)


def test_checkpoints_are_listed_in_training_order(tmp_path):
    for name in ["epoch=10.ckpt", "epoch=2.ckpt", "last.ckpt", "epoch=1-step=50.ckpt", "epoch=1-step=20.ckpt", "notes.txt"]:
        (tmp_path / name).write_bytes(b"")
    assert [Path(p).name for p in list_checkpoints(tmp_path)] == [
        "epoch=1-step=20.ckpt", "epoch=1-step=50.ckpt", "epoch=2.ckpt", "epoch=10.ckpt"
    ]
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ["t10.pt", "t2.pt", "t1.pt"]:
        (plain / name).write_bytes(b"")
    assert [Path(p).name for p in list_checkpoints(plain, "*.pt")] == ["t1.pt", "t2.pt", "t10.pt"]
    # a second teacher run into the same folder: ModelCheckpoint writes epoch=0-v1.ckpt beside epoch=0.ckpt
    (tmp_path / "epoch=1-step=20-v1.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"more than one training run.*epoch=1-step=20-v1.ckpt.*own directory"):
        list_checkpoints(tmp_path)


def test_index_for_epoch():
    paths = [f"c{i}.ckpt" for i in range(4)]
    assert [TeacherTrajectory(paths).index_for_epoch(e) for e in range(6)] == [0, 1, 2, 3, 3, 3]
    assert [TeacherTrajectory(paths, epochs_per_checkpoint=2).index_for_epoch(e) for e in range(6)] == [0, 0, 1, 1, 2, 2]
    assert [TeacherTrajectory(paths, schedule=[0, 0, 3, 1]).index_for_epoch(e) for e in range(6)] == [0, 0, 3, 1, 1, 1]


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [({}, [0, 1, 2, 3]), ({"schedule": [0, 2, 5]}, [0, 2, 5, 5]), ({"epochs_per_checkpoint": 3}, [0, 0, 0, 1])],
    ids=["epoch", "schedule", "every-3"],
)
def test_student_epoch_e_distils_from_the_scheduled_checkpoint(teacher_dir, kwargs, expected):
    record = _RecordTeacher(_heads(teacher_dir))
    trajectory = TeacherTrajectory(str(teacher_dir), **kwargs)
    trainer = cpu_trainer(max_epochs=4, limit_train_batches=2, limit_val_batches=0, callbacks=[trajectory, record])
    trainer.fit(_module(), digits())
    assert record.seen == list(enumerate(expected))
    assert len(trajectory.paths) == TEACHER_EPOCHS and trajectory.current_index == expected[-1]
    assert trainer.callback_metrics["teacher_index"] == expected[-1]


def test_trajectory_errors(teacher_dir, tmp_path):
    with pytest.raises(TypeError, match="`checkpoints` must be"):
        TeacherTrajectory(3)
    with pytest.raises(ValueError, match="`epochs_per_checkpoint`"):
        TeacherTrajectory(str(teacher_dir), epochs_per_checkpoint=0)
    with pytest.raises(ValueError, match="`schedule`"):
        TeacherTrajectory(str(teacher_dir), schedule=[0, -1])

    def fails(callback, module, error, match):
        trainer = cpu_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0, callbacks=[callback])
        with pytest.raises(error, match=match):
            trainer.fit(module, digits())
        assert trainer.global_step == 0

    fails(TeacherTrajectory(str(tmp_path / "missing")), _module(), FileNotFoundError, "is not a directory")
    (tmp_path / "empty").mkdir()
    fails(TeacherTrajectory(str(tmp_path / "empty")), _module(), ValueError, "holds no files matching")
    fails(TeacherTrajectory(str(teacher_dir), schedule=[0, 9]), _module(), ValueError, "refers to checkpoint 9")
    fails(TeacherTrajectory(str(teacher_dir)), ClassifierModule(student_net(), num_classes=10), TypeError, "DistillationModule")
    cached = DistillationModule(student_net(), teacher_net(), num_classes=10, cache_teacher_logits=True)
    fails(TeacherTrajectory(str(teacher_dir)), cached, ValueError, "cache_teacher_logits=False")
    wrong = DistillationModule(student_net(), student_net(), num_classes=10)  # the teacher's architecture differs
    fails(TeacherTrajectory(str(teacher_dir)), wrong, ValueError, "`checkpoints=.*` holds weights of another architecture")
