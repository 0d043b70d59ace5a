"""MixupConsistencyModule: unsupervised k-point mixup (ICT, Verma et al. 2019; Chaudhry et al. 2022)."""

from __future__ import annotations

import copy
import functools
import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from callbacks import LinearityCallback
from datamodules import DigitsDataModule, SemiSupervisedDataModule
from lightning_methods import ClassifierModule, MixupConsistencyModule
from lightning_methods.mixup_consistency import ict_consistency_loss, sigmoid_rampup
from lightning_methods.nets import MLP
from tests.helpers import cpu_trainer, ddp_trainer


def test_sigmoid_rampup_golden_values():
    assert sigmoid_rampup(0, 10) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(5, 10) == pytest.approx(math.exp(-1.25))
    assert sigmoid_rampup(10, 10) == sigmoid_rampup(25, 10) == sigmoid_rampup(3, 0) == 1.0
    assert sigmoid_rampup(-1, 10) == pytest.approx(math.exp(-5))


def test_consistency_loss_by_hand():
    student, teacher = nn.Linear(2, 3), nn.Linear(2, 3)
    with torch.no_grad():
        student.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        student.bias.zero_()
        teacher.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 1.0]]))
        teacher.bias.copy_(torch.tensor([0.0, 1.0, 0.0]))
    module = MixupConsistencyModule(student, num_classes=3)
    module.teacher.load_state_dict(teacher.state_dict())
    u = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    lam = torch.tensor([[0.5, 0.5], [0.2, 0.8], [1.0, 0.0]])
    index = torch.tensor([[0, 1], [1, 2], [2, 0]])
    loss = module.consistency_loss(u, lam, index)
    # by hand: teacher logits at the unmixed points, mixed, softmaxed; student probabilities at the mixed inputs
    z = torch.stack([teacher(p) for p in u]).detach()
    expected = 0.0
    for i in range(3):
        u_mix = sum(lam[i, m] * u[index[i, m]] for m in range(2))
        target = torch.softmax(sum(lam[i, m] * z[index[i, m]] for m in range(2)), dim=0)
        expected += ((torch.softmax(student(u_mix), dim=0) - target) ** 2).sum() / 3  # mean over classes
    assert float(loss) == pytest.approx(float(expected / 3), rel=1e-5)  # and over the batch
    # a linear student equal to its teacher satisfies the constraint exactly: mixing commutes with an affine map
    module.teacher.load_state_dict(student.state_dict())
    assert float(module.consistency_loss(u, lam, index)) < 1e-12
    assert float(ict_consistency_loss(torch.zeros(2, 4), torch.full((2, 4), 0.25))) == 0.0


class _RecordStudent(pl.Callback):
    def __init__(self):
        self.snapshots = []

    def on_train_batch_end(self, trainer, module, *args):
        self.snapshots.append(copy.deepcopy(module.model.state_dict()))


def test_teacher_is_the_ema_of_the_student():
    pl.seed_everything(0)
    module = MixupConsistencyModule(MLP(64, 10, hidden_sizes=[16]), 10, ema_decay=0.9)
    initial = copy.deepcopy(module.model.state_dict())
    recorder = _RecordStudent()  # runs after the module's on_train_batch_end, so the teacher is already updated
    trainer = cpu_trainer(max_epochs=1, limit_train_batches=12, limit_val_batches=0, callbacks=[recorder])
    trainer.fit(module, SemiSupervisedDataModule(DigitsDataModule(batch_size=16), labels_per_class=5))
    # replay Mean Teacher's recursion with decay min(1 - 1/(step + 1), 0.9) from the initial weights
    ema = {k: v.clone() for k, v in initial.items()}
    for step, student in enumerate(recorder.snapshots, start=1):
        d = min(1 - 1 / (step + 1), 0.9)
        ema = {k: d * ema[k] + (1 - d) * student[k] for k in ema}
    for name, value in module.teacher.state_dict().items():
        torch.testing.assert_close(value, ema[name])
    assert not any(p.requires_grad for p in module.teacher.parameters())
    assert not torch.allclose(module.teacher.head.weight, module.model.head.weight)


def _semi(seed=0, **kwargs):
    return SemiSupervisedDataModule(DigitsDataModule(batch_size=32, seed=seed), labels_per_class=10, unlabeled_batch_size=64, **kwargs)


def test_unsupervised_mixup_makes_predictions_linear_between_points():
    """The claim of ICT / Chaudhry et al. on the output: with the consistency loss, the predicted probabilities are
    (close to) linear between unlabelled points, which ERM on the same 100 labels does not give."""
    adam = functools.partial(torch.optim.Adam, lr=3e-3)
    pl.seed_everything(0)
    erm = ClassifierModule(MLP(64, 10, hidden_sizes=[64]), 10, optimizer=adam)
    cpu_trainer(max_steps=150, limit_val_batches=0).fit(erm, _semi(labeled_only=True))
    pl.seed_everything(0)
    ict = MixupConsistencyModule(MLP(64, 10, hidden_sizes=[64]), 10, optimizer=adam, rampup_epochs=2, num_points=2)
    trainer = cpu_trainer(max_steps=150, limit_val_batches=0)
    trainer.fit(ict, _semi())
    assert float(trainer.callback_metrics["consistency_weight"]) == pytest.approx(100.0)
    dm = DigitsDataModule(seed=0)
    dm.setup()
    probe = dict(layers=[], inputs=dm.splits["test"][0], num_samples=300)
    nl_erm = LinearityCallback(**probe).measure(erm)["probs"]
    nl_ict = LinearityCallback(**probe).measure(ict)["probs"]
    assert nl_ict < 0.6 * nl_erm, (nl_ict, nl_erm)  # measured 0.11 vs 0.30


def test_supervised_mixup_option_and_plain_batches():
    pl.seed_everything(0)
    module = MixupConsistencyModule(MLP(64, 10, hidden_sizes=[16]), 10, supervised_alpha=1.0, num_points=3)
    trainer = cpu_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1)
    trainer.fit(module, DigitsDataModule(batch_size=16))  # a plain [x, y] batch serves as both streams
    assert trainer.global_step == 3
    assert {"val_acc", "val_ema_acc", "train_consistency_loss"} <= set(trainer.callback_metrics)


def test_checkpoint_restores_teacher_and_resume_continues(tmp_path):
    def run(max_steps, ckpt=None):
        pl.seed_everything(0)
        module = MixupConsistencyModule(MLP(64, 10, hidden_sizes=[16]), 10, num_points=3, ema_decay=0.99)
        trainer = cpu_trainer(max_steps=max_steps, limit_val_batches=0, enable_checkpointing=True, default_root_dir=tmp_path)
        trainer.fit(module, _semi(), ckpt_path=ckpt)
        return module, trainer

    half, trainer = run(19)  # one epoch: 1158 unlabelled examples in batches of 64
    path = trainer.checkpoint_callback.best_model_path
    reloaded = MixupConsistencyModule.load_from_checkpoint(path, model=MLP(64, 10, hidden_sizes=[16]))
    for (name, a), b in zip(half.teacher.state_dict().items(), reloaded.teacher.state_dict().values()):
        assert torch.equal(a, b), name
    assert reloaded.hparams.num_points == 3 and reloaded._ema_step == 19
    # resuming continues the EMA from the saved teacher with the saved step count: d = min(1 - 1/21, 0.99)
    resumed, _ = run(20, ckpt=path)
    assert resumed._ema_step == 20
    d = 1 - 1 / 21
    for name, value in resumed.teacher.state_dict().items():
        expected = d * half.teacher.state_dict()[name] + (1 - d) * resumed.model.state_dict()[name]
        torch.testing.assert_close(value, expected)


class _RankCheck(pl.Callback):
    """Under DDP: teachers stay identical across ranks, and every rank chose the same labelled examples."""

    def on_train_epoch_end(self, trainer, module):
        flat = torch.cat([p.flatten() for p in module.teacher.parameters()])
        labeled = torch.as_tensor(trainer.datamodule.labeled_indices)
        gathered, gathered_idx = module.all_gather(flat), module.all_gather(labeled)
        module.log("check/teacher_diff", (gathered[0] - gathered[1]).abs().max(), rank_zero_only=True)
        module.log("check/labels_diff", (gathered_idx[0] - gathered_idx[1]).abs().max().float(), rank_zero_only=True)
        module.log("check/teacher_moved", (flat - torch.cat([p.flatten() for p in module.model.parameters()])).abs().max(), rank_zero_only=True)


@pytest.mark.slow  # > 3 s: outside the fast lane
def test_ddp_two_processes():
    pl.seed_everything(0)
    module = MixupConsistencyModule(MLP(64, 10, hidden_sizes=[16]), 10, num_points=3, ema_decay=0.9)
    trainer = ddp_trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=2, callbacks=[_RankCheck()])
    trainer.fit(module, _semi())
    metrics = trainer.callback_metrics
    assert float(metrics["check/teacher_diff"]) == 0.0
    assert float(metrics["check/labels_diff"]) == 0.0
    assert float(metrics["check/teacher_moved"]) > 0.0
    assert "val_ema_acc" in metrics


def test_errors():
    net = MLP(64, 10, hidden_sizes=[8])
    for kwargs, match in [
        ({"consistency_weight": -1.0}, "consistency_weight"),
        ({"alpha": 0.0}, "alpha"),
        ({"num_points": 1}, "num_points"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"supervised_alpha": 0.0}, "supervised_alpha"),
        ({"rampup_epochs": -1}, "rampup_epochs"),
    ]:
        with pytest.raises(ValueError, match=match):
            MixupConsistencyModule(net, 10, **kwargs)
    module = MixupConsistencyModule(net, 10)
    with pytest.raises(ValueError, match=r"'labeled'.*SemiSupervisedDataModule"):
        module._split_batch({"x": torch.zeros(2, 64)})
    with pytest.raises(TypeError, match=r"SemiSupervisedDataModule \(dict batches\) or \[inputs, targets\] lists"):
        module._split_batch(torch.zeros(2, 64))
    with pytest.raises(ValueError, match="num_classes=3"):  # the foundation's backbone/data check still runs
        cpu_trainer(max_epochs=1).fit(MixupConsistencyModule(MLP(64, 3), 3), _semi())
