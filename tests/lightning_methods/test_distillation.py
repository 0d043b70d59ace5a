"""DistillationModule: the loss against hand-computed values, the frozen teacher, the late/reverse switch, teacher
checkpoints, cached logits, resume, the clear errors, and a training run showing KD makes the student follow the
teacher. The teacher trajectory fixture here is shared by the other distillation test files."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from datamodules import DigitsDataModule
from lightning_methods import ClassifierModule, DistillationModule
from lightning_methods.distillation import distillation_loss, kd_loss, load_backbone_weights
from lightning_methods.nets import MLP
from tests.helpers import cpu_trainer

TEACHER_EPOCHS = 6


def teacher_net() -> nn.Module:
    return MLP(64, 10, hidden_sizes=[64])


def student_net() -> nn.Module:
    return MLP(64, 10, hidden_sizes=[16])


def digits(**kwargs) -> DigitsDataModule:
    return DigitsDataModule(**{"batch_size": 64, **kwargs})


def adam(lr: float):
    return lambda params: torch.optim.Adam(params, lr=lr)


def train_teacher_trajectory(directory: Path, epochs: int = TEACHER_EPOCHS) -> Path:
    """Train an MLP teacher on digits with one checkpoint per epoch (epoch=0.ckpt, ...) and last.ckpt."""
    pl.seed_everything(0)
    checkpoint = ModelCheckpoint(dirpath=directory, filename="{epoch}", save_top_k=-1, every_n_epochs=1, save_last=True)
    trainer = cpu_trainer(max_epochs=epochs, enable_checkpointing=True, callbacks=[checkpoint])
    trainer.fit(ClassifierModule(teacher_net(), num_classes=10, optimizer=adam(3e-3)), digits())
    return directory


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory) -> Path:
    """A digits teacher trajectory, trained once per session (every distillation test file reuses it)."""
    directory = tmp_path_factory.getbasetemp() / "distillation_teacher"
    if not (directory / "last.ckpt").is_file():
        train_teacher_trajectory(directory)
    return directory


def trained_teacher(teacher_dir: Path) -> nn.Module:
    return load_backbone_weights(teacher_dir / "last.ckpt", teacher_net())


# --------------------------------------------------------------------------------------------------------------------
# The loss: golden values
# --------------------------------------------------------------------------------------------------------------------
def test_kd_loss_hand_computed():
    student = torch.zeros(1, 2, dtype=torch.float64)  # p_s = [1/2, 1/2]
    teacher = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)  # p_t = [3/4, 1/4] at tau = 1
    expected_t1 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert expected_t1 == pytest.approx(0.1308120, abs=1e-7)
    assert kd_loss(student, teacher, 1.0).item() == pytest.approx(expected_t1, abs=1e-12)
    # tau = 2: p_t = softmax([ln 3 / 2, 0]) = [sqrt 3, 1] / (sqrt 3 + 1), and the tau^2 = 4 factor
    p = [math.sqrt(3) / (math.sqrt(3) + 1), 1 / (math.sqrt(3) + 1)]
    expected_t2 = 4.0 * sum(pi * math.log(pi / 0.5) for pi in p)
    assert expected_t2 == pytest.approx(0.1453631, abs=1e-6)
    assert kd_loss(student, teacher, 2.0).item() == pytest.approx(expected_t2, abs=1e-12)
    # the mixture with the cross-entropy on the label (CE of a uniform prediction = ln 2), class-index or soft
    for target in (torch.tensor([1]), torch.tensor([[0.0, 1.0]], dtype=torch.float64)):
        loss = distillation_loss(student, teacher, target, temperature=2.0, alpha=0.25)
        assert loss.item() == pytest.approx(0.75 * math.log(2.0) + 0.25 * expected_t2, abs=1e-12)
    assert distillation_loss(student, teacher, torch.tensor([1]), alpha=0.0).item() == pytest.approx(math.log(2.0))


def test_kd_loss_batch_mean_and_large_temperature_limit():
    torch.manual_seed(0)
    s, t = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    per_row = [kd_loss(s[i : i + 1], t[i : i + 1], 3.0).item() for i in range(5)]
    assert kd_loss(s, t, 3.0).item() == pytest.approx(sum(per_row) / 5, rel=1e-12)
    # Hinton et al. Sec. 2.1: for large tau, tau^2 KL -> mean over rows of (1 / 2C) * |centred (z_t - z_s)|^2
    d = t - s
    d = d - d.mean(dim=1, keepdim=True)
    limit = (d * d).sum(dim=1).mean().item() / (2 * 7)
    assert kd_loss(s, t, 1000.0).item() == pytest.approx(limit, rel=5e-3)
    assert kd_loss(s, t, 1.0).item() != pytest.approx(limit, rel=0.05)  # the limit is not a coincidence at tau = 1
    # the teacher side is a constant
    s.requires_grad_(True)
    t.requires_grad_(True)
    kd_loss(s, t, 2.0).backward()
    assert t.grad is None and s.grad is not None


# --------------------------------------------------------------------------------------------------------------------
# The frozen teacher
# --------------------------------------------------------------------------------------------------------------------
def test_teacher_gets_no_gradient_no_optimizer_state_and_no_checkpoint_entry(teacher_dir, tmp_path):
    teacher = trained_teacher(teacher_dir)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    module = DistillationModule(student_net(), teacher, num_classes=10, temperature=2.0, alpha=0.5)
    trainer = cpu_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1, default_root_dir=tmp_path)
    trainer.fit(module, digits())
    assert trainer.global_step == 3 and trainer.callback_metrics["train_kd"] > 0
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    assert not teacher.training  # module.train() between epochs never reaches the teacher
    teacher_ids = {id(p) for p in teacher.parameters()}
    optimizer = trainer.optimizers[0]
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in module.student.parameters()} and not in_optimizer & teacher_ids
    assert not {id(p) for p in optimizer.state} & teacher_ids and len(optimizer.state) > 0
    assert all(k.startswith("model.") for k in module.state_dict())
    assert sum(p.numel() for p in module.parameters()) == sum(p.numel() for p in module.student.parameters())
    # the teacher follows the module across dtypes
    module.double()
    assert next(teacher.parameters()).dtype == torch.float64


def test_teacher_attribute_is_never_registered():
    module = DistillationModule(student_net(), teacher_net(), num_classes=10)
    module.teacher = teacher_net()  # assigning goes through the frozen-teacher path, not nn.Module registration
    assert "teacher" not in dict(module.named_children())
    assert not any(p.requires_grad for p in module.teacher.parameters())


# --------------------------------------------------------------------------------------------------------------------
# Late switch and reverse switch
# --------------------------------------------------------------------------------------------------------------------
class _RecordLosses(pl.Callback):
    """Before each step, the one-hot CE and the KD loss of the current weights; after it, the loss the step used."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, float, float, float]] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        with torch.no_grad():
            logits = module.student(batch[0])
            self._expected = (
                F.cross_entropy(logits, batch[1]).item(),
                kd_loss(logits, module.teacher(batch[0]), module.temperature).item(),
            )

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.rows.append((trainer.current_epoch, outputs["loss"].item(), *self._expected))


@pytest.mark.parametrize(("start", "end", "kd_epochs"), [(2, None, {2, 3}), (0, 2, {0, 1})], ids=["late", "reverse"])
def test_switch_changes_the_loss_exactly_at_the_epoch(teacher_dir, start, end, kd_epochs):
    record = _RecordLosses()
    module = DistillationModule(
        student_net(), trained_teacher(teacher_dir), num_classes=10, temperature=2.0,
        distill_start_epoch=start, distill_end_epoch=end,
    )
    trainer = cpu_trainer(max_epochs=4, limit_train_batches=2, limit_val_batches=0, callbacks=[record])
    trainer.fit(module, digits())
    assert [r[0] for r in record.rows] == [0, 0, 1, 1, 2, 2, 3, 3]
    for epoch, loss, ce, kd in record.rows:
        assert abs(ce - kd) > 0.05  # the two losses are distinguishable
        assert loss == pytest.approx(kd if epoch in kd_epochs else ce, abs=1e-5), (epoch, loss, ce, kd)
    assert [module.distilling(e) for e in range(4)] == [e in kd_epochs for e in range(4)]
    # the KD term is reported only for a run whose last epoch distilled: a one-hot epoch does not keep a stale value
    assert ("train_kd" in trainer.callback_metrics) == (3 in kd_epochs)


# --------------------------------------------------------------------------------------------------------------------
# Teacher from a checkpoint; cached logits; resume
# --------------------------------------------------------------------------------------------------------------------
def test_teacher_loaded_from_classifier_checkpoint_at_fit(teacher_dir):
    path = teacher_dir / "last.ckpt"
    reference = ClassifierModule.load_from_checkpoint(path, model=teacher_net()).model
    module = DistillationModule(student_net(), teacher_net(), num_classes=10, teacher_checkpoint=str(path))
    cpu_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0).fit(module, digits())
    for name, value in reference.state_dict().items():
        assert torch.equal(module.teacher.state_dict()[name], value)


def test_cached_teacher_logits_train_exactly_like_the_live_teacher(teacher_dir):
    finals = []
    for cache in (False, True):
        pl.seed_everything(3)
        module = DistillationModule(
            student_net(), trained_teacher(teacher_dir), num_classes=10, temperature=2.0, alpha=0.5,
            cache_teacher_logits=cache,
        )
        dm = digits()
        dm.setup("fit")
        dataset = dm.train_dataset
        cpu_trainer(max_epochs=2, limit_train_batches=5, limit_val_batches=0).fit(module, dm)
        finals.append(torch.cat([p.detach().flatten() for p in module.student.parameters()]))
        # the user's datamodule is left alone (no wrapper dataset yielding an extra index)
        assert type(dm.train_dataset) is type(dataset) and len(dm.train_dataset[0]) == 2
        if cache:
            x = torch.stack([dataset[i][0] for i in (7, 3, 7)])
            logits, found = module._cache.lookup(x)
            assert found.all() and torch.allclose(logits, module.teacher(x), atol=1e-5)
            _, found = module._cache.lookup(x + 1e-4)  # any change of an input misses the cache
            assert not found.any()
    assert torch.allclose(finals[0], finals[1], atol=1e-5)


def test_cached_logits_are_never_another_inputs_logits():
    # review: the old fingerprint (one random projection, matched within a tolerance) served ~2-7% of mixed inputs
    # the logits of some other training example here (pixel-scale inputs with a common offset): a mixed input must
    # either miss the cache (live teacher) or be an exact training input
    torch.manual_seed(0)
    x = 1000.0 + torch.rand(2000, 256)
    module = DistillationModule(MLP(256, 10, hidden_sizes=[8]), MLP(256, 10, hidden_sizes=[8]), num_classes=10)
    module.trainer = cpu_trainer()
    cache = module._build_cache(torch.utils.data.TensorDataset(x, torch.zeros(2000, dtype=torch.long)))
    _, found = cache.lookup(0.5 * x + 0.5 * x.roll(1, 0))
    assert not found.any()
    order = torch.randperm(2000)
    logits, found = cache.lookup(x[order])
    assert found.all() and torch.allclose(logits, module.teacher(x[order]), atol=1e-5)
    _, found = cache.lookup(x.double())  # another dtype is another input
    assert not found.any()


@pytest.mark.parametrize("precision", ["bf16-true", "64-true"])
def test_cached_logits_under_a_true_precision_plugin_match_the_cast_inputs(teacher_dir, precision):
    # review: the table was built from the dataset's float32 inputs but the teacher had been cast with the module
    # (dtype mismatch crash), and training_step receives the plugin's cast inputs, which would all miss the table
    module = DistillationModule(student_net(), trained_teacher(teacher_dir), num_classes=10, cache_teacher_logits=True)
    dm = digits()
    cpu_trainer(precision=precision, max_epochs=1, limit_train_batches=2, limit_val_batches=0).fit(module, dm)
    assert not module._told_live_teacher  # every training input was found in the table
    x = module.trainer.precision_plugin.convert_input(dm.train_dataset[0][0][None])
    logits, found = module._cache.lookup(x)
    assert found.all() and torch.allclose(logits, module.teacher(x).float(), atol=1e-2)


def test_third_batch_element_is_teacher_logits():
    module = DistillationModule(student_net(), teacher_net(), num_classes=10)
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    given = torch.randn(4, 10)
    assert module._teacher_logits_for([x, y, given]) is given  # a datamodule's own cached logits
    assert torch.equal(module._teacher_logits_for([x, y]), module.teacher(x))


def test_cached_logits_with_mixup_use_the_teacher_on_the_mixed_inputs(teacher_dir):
    # held-out review: with cached logits, MixupCallback mixed inputs and targets but the student was fitted against
    # the teacher's logits of the unmixed inputs. Every distilling step must use the teacher's logits of the batch
    # the student actually sees.
    from callbacks import MixupCallback

    seen = []

    class Check(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            # runs after MixupCallback (callbacks run in order): record what the module will use
            seen.append((pl_module._teacher_logits_for(batch), pl_module.teacher(batch[0])))

    module = DistillationModule(student_net(), trained_teacher(teacher_dir), num_classes=10, cache_teacher_logits=True)
    cpu_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=0, callbacks=[MixupCallback(alpha=1.0), Check()]).fit(
        module, digits()
    )
    assert len(seen) == 3
    for used, live in seen:
        assert torch.allclose(used, live, atol=1e-5)


def test_resume_reloads_the_teacher_and_matches_an_uninterrupted_run(teacher_dir, tmp_path):
    path = str(teacher_dir / "last.ckpt")

    def module() -> DistillationModule:
        pl.seed_everything(0)
        return DistillationModule(student_net(), teacher_net(), num_classes=10, temperature=2.0, teacher_checkpoint=path)

    def fit(m, epochs, run, **kwargs):
        checkpoint = ModelCheckpoint(dirpath=tmp_path / run, save_last=True)
        trainer = cpu_trainer(
            max_epochs=epochs, limit_train_batches=4, limit_val_batches=0, enable_checkpointing=True, callbacks=[checkpoint]
        )
        trainer.fit(m, digits(shuffle=False), **kwargs)
        return m

    straight = fit(module(), 3, "straight")
    interrupted = fit(module(), 2, "interrupted")
    resumed = fit(module(), 3, "interrupted", ckpt_path=str(tmp_path / "interrupted" / "last.ckpt"))
    assert resumed.trainer.global_step == 12 and resumed.trainer.current_epoch == 3
    for a, b, c in zip(straight.student.parameters(), resumed.student.parameters(), interrupted.student.parameters()):
        assert torch.allclose(a, b, atol=1e-6) and not torch.allclose(a, c, atol=1e-4)
    # the student checkpoint is a ClassifierModule checkpoint of the student
    classifier = ClassifierModule.load_from_checkpoint(tmp_path / "interrupted" / "last.ckpt", model=student_net())
    assert torch.equal(classifier.model.head.weight, resumed.student.head.weight)
    reloaded = DistillationModule.load_from_checkpoint(tmp_path / "interrupted" / "last.ckpt", student=student_net(), teacher=teacher_net())
    assert reloaded.temperature == 2.0 and reloaded.teacher_checkpoint == path


# --------------------------------------------------------------------------------------------------------------------
# KD does what it claims: the student follows the teacher's probabilities
# --------------------------------------------------------------------------------------------------------------------
def test_kd_student_matches_the_teacher_much_better_than_a_one_hot_student(teacher_dir):
    teacher = trained_teacher(teacher_dir)
    dm = digits()
    dm.setup()
    x_test, _ = dm.splits["test"]
    with torch.no_grad():
        p_t = teacher(x_test).softmax(-1)
    kl = {}
    for name, start in (("kd", 0), ("one_hot", 10_000)):
        pl.seed_everything(0)
        module = DistillationModule(
            student_net(), teacher, num_classes=10, temperature=1.0, distill_start_epoch=start, optimizer=adam(1e-2)
        )
        cpu_trainer(max_epochs=6, limit_val_batches=0).fit(module, digits())
        with torch.no_grad():
            log_p_s = module.student(x_test).log_softmax(-1)
        kl[name] = F.kl_div(log_p_s, p_t, reduction="batchmean").item()
    assert kl["kd"] < 0.4 * kl["one_hot"], kl  # measured 0.026 vs 0.126


# --------------------------------------------------------------------------------------------------------------------
# Clear errors, before any training step
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"alpha": 1.5}, ValueError, "`alpha` must be in"),
        ({"alpha": -0.1}, ValueError, "`alpha` must be in"),
        ({"temperature": 0.0}, ValueError, "`temperature` must be a number > 0"),
        ({"temperature": -2.0}, ValueError, "`temperature` must be a number > 0"),
        ({"distill_start_epoch": 3, "distill_end_epoch": 3}, ValueError, "`distill_end_epoch` must be"),
        ({"distill_start_epoch": -1}, ValueError, "`distill_start_epoch`"),
        ({"teacher": MLP(64, 5, hidden_sizes=[8])}, ValueError, "`teacher` .* predicts 5 classes"),
        ({"student": "mlp"}, TypeError, "`student` must be an nn.Module"),
        ({"num_classes": None}, ValueError, "`num_classes` is required"),
    ],
)
def test_bad_arguments_fail_at_init(kwargs, error, match):
    args = {"student": student_net(), "teacher": teacher_net(), "num_classes": 10, **kwargs}
    with pytest.raises(error, match=match):
        DistillationModule(**args)


def test_kd_loss_rejects_logits_of_different_class_counts():
    with pytest.raises(ValueError, match="teacher and student must predict the same classes"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="teacher and student must predict the same classes"):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.tensor([0, 1]), alpha=0.5)


def _fit_fails(module, dm, error, match):
    trainer = cpu_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0)
    with pytest.raises(error, match=match):
        trainer.fit(module, dm)
    assert trainer.global_step == 0


def test_bad_setups_fail_before_training(teacher_dir, tmp_path):
    good = str(teacher_dir / "last.ckpt")
    # a teacher without a `num_classes` attribute is probed on the datamodule's input shape
    sequential = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
    _fit_fails(DistillationModule(student_net(), sequential, num_classes=10), digits(), ValueError, "`teacher` .* 10 logits")
    _fit_fails(
        DistillationModule(student_net(), teacher_net(), num_classes=10, teacher_checkpoint=str(tmp_path / "nope.ckpt")),
        digits(), FileNotFoundError, "`teacher_checkpoint=.*nope.ckpt'` does not exist",
    )
    other = MLP(64, 10, hidden_sizes=[32])
    _fit_fails(
        DistillationModule(student_net(), other, num_classes=10, teacher_checkpoint=good),
        digits(), ValueError, "holds weights of another architecture than the given MLP",
    )
    # a checkpoint written in Python does not record the architecture: the teacher must be given
    _fit_fails(
        DistillationModule(student_net(), None, num_classes=10, teacher_checkpoint=good),
        digits(), ValueError, "does not record its backbone's architecture",
    )
    _fit_fails(DistillationModule(student_net(), None, num_classes=10), digits(), ValueError, "has no teacher")
    _fit_fails(
        DistillationModule(student_net(), trained_teacher(teacher_dir), num_classes=10, cache_teacher_logits=True),
        digits(augment=True), ValueError, "augments its training inputs",
    )


class _ServedDigits(pl.LightningDataModule):
    """Digits whose batches carry a third element: ``extra(x)`` (teacher logits, or anything else a user adds)."""

    def __init__(self, extra) -> None:
        super().__init__()
        from sklearn.datasets import load_digits

        data = load_digits()
        self.x = torch.tensor(data.data[:256], dtype=torch.float32) / 16.0
        self.y = torch.tensor(data.target[:256])
        self.third = extra(self.x)
        self.num_classes = 10

    def train_dataloader(self):
        dataset = torch.utils.data.TensorDataset(self.x, self.y, self.third)
        return torch.utils.data.DataLoader(dataset, batch_size=32)


def test_a_third_batch_element_that_is_not_logits_is_refused_before_any_step(teacher_dir):
    # a float third element used to be taken as teacher logits whatever its shape: per-example weights (N,) broadcast
    # against (N, C) logits (silently, when N == C) instead of failing
    module = DistillationModule(student_net(), trained_teacher(teacher_dir), num_classes=10)
    before = copy.deepcopy(module.student.state_dict())
    trainer = cpu_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0)
    with pytest.raises(ValueError, match=r"third batch element .* \(32, 10\).*\(32,\)"):
        trainer.fit(module, _ServedDigits(lambda x: torch.ones(len(x))))
    assert trainer.global_step == 0
    assert all(torch.equal(v, module.student.state_dict()[k]) for k, v in before.items())


def test_served_logits_with_mixup_use_the_teacher_on_the_mixed_inputs(teacher_dir):
    # the datamodule's logits belong to the unmixed inputs: after MixupCallback changed them, the live teacher runs on
    # what the student sees (as with cache_teacher_logits=True)
    from callbacks import MixupCallback

    teacher = trained_teacher(teacher_dir)
    seen = []

    class Check(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((pl_module._teacher_logits_for(batch), pl_module.teacher(batch[0]), batch[2]))

    module = DistillationModule(student_net(), teacher, num_classes=10)
    with torch.no_grad():
        data = _ServedDigits(lambda x: teacher(x) + 5.0)  # served logits, marked by an offset
    cpu_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=0, callbacks=[MixupCallback(alpha=1.0), Check()]).fit(
        module, data
    )
    assert len(seen) == 3
    for used, live, served in seen:
        assert torch.allclose(used, live, atol=1e-5) and not torch.allclose(used, served, atol=1.0)
    # without such a callback the served logits are used as they are
    seen.clear()
    fresh = DistillationModule(student_net(), teacher, num_classes=10)
    cpu_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, callbacks=[Check()]).fit(fresh, data)
    assert len(seen) == 2 and all(used is served for used, _, served in seen)
