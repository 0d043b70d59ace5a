"""RobustClassifierModule and RobustDistillationModule: class-DRO multipliers updated from per-class errors on the
balanced validation split (gathered over the whole split, identical on every rank), held in buffers."""

from __future__ import annotations

from datamodules import DigitsDataModule, LongTailedDataModule
from lightning_methods import RobustClassifierModule, RobustDistillationModule
from lightning_methods.nets import MLP
from tests.contracts.entries.distillation import student_net, teacher_dir, teacher_net, trained_teacher
from tests.contracts.registry import DDP, Built, Entry, InOrder, adam, register, sgd


class InOrderLongTailed(InOrder, LongTailedDataModule):
    """Long-tailed digits read in order (module level: it pickles for ddp_spawn)."""


def data(batch_size: int = 32) -> LongTailedDataModule:
    return InOrderLongTailed(DigitsDataModule(batch_size=batch_size, shuffle=False), imbalance_ratio=10)


def teacher_module(**kwargs) -> RobustClassifierModule:
    args = dict(objective="dro", eg_step=1.0, eg_every_n_steps=2, optimizer=adam(1e-2))
    return RobustClassifierModule(teacher_net(), 10, **{**args, **kwargs})


def student_module(**kwargs) -> RobustDistillationModule:
    args = dict(objective="dro_kd", eg_every_n_steps=2, optimizer=adam(1e-2))
    return RobustDistillationModule(student_net(), trained_teacher(), 10, **{**args, **kwargs})


# trained during the tiny fit: the multipliers move every 2 steps, from the gathered validation errors
TINY = dict(max_epochs=2, limit_train_batches=4, limit_val_batches=1.0, num_sanity_val_steps=0)

register(
    Entry(
        name="RobustClassifierModule",
        build=lambda: Built(teacher_module(), data()),
        trainer_kwargs=TINY,
        reload_kwargs=lambda: {"model": teacher_net()},
        bad_configs={
            "unknown-objective": lambda: Built(teacher_module(objective="worst"), data()),
            "priors-not-summing-to-1": lambda: Built(teacher_module(priors=[0.2] * 10), data()),
            "num-classes-vs-data": lambda: Built(RobustClassifierModule(MLP(64, 5), 5, objective="dro"), data()),
        },
        ddp=DDP(lambda world: Built(teacher_module(optimizer=sgd(0.5)), data(32 // world)),
                trainer_kwargs=dict(TINY, use_distributed_sampler=False)),
    )
)

register(
    Entry(
        name="RobustDistillationModule",
        # the teacher from a checkpoint path: reloaded at fit and on resume, never in the student's checkpoint
        build=lambda: Built(
            RobustDistillationModule(
                student_net(), teacher_net(), 10, objective="dro_kd", eg_every_n_steps=2, optimizer=adam(1e-2),
                teacher_checkpoint=str(teacher_dir() / "last.ckpt"),
            ),
            data(),
        ),
        trainer_kwargs=TINY,
        reload_kwargs=lambda: {"student": student_net(), "teacher": teacher_net()},
        bad_configs={
            "unknown-objective": lambda: Built(student_module(objective="robust"), data()),
            "priors-not-summing-to-1": lambda: Built(student_module(priors=[0.2] * 10), data()),
            "student-class-count": lambda: Built(
                RobustDistillationModule(MLP(64, 5), trained_teacher(), 10, objective="dro_kd"), data()
            ),
        },
        ddp=DDP(lambda world: Built(student_module(optimizer=sgd(0.5)), data(32 // world)),
                trainer_kwargs=dict(TINY, use_distributed_sampler=False)),
    )
)
