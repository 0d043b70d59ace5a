"""RobustClassifierModule / RobustDistillationModule (Wang et al. 2023): the math against hand computations, errors
before any step, multipliers across ranks and on resume, the configs configs/robust_distillation/teacher.yaml,
configs/robust_distillation/balanced_kd.yaml and configs/robust_distillation/dro_kd.yaml through the CLI, and the
benchmark's smoke run."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from datamodules import DigitsDataModule, LongTailedDataModule
from datamodules.long_tailed import LabelledSubset
from lightning_methods import DistillationModule, RobustClassifierModule, RobustDistillationModule
from lightning_methods.distillation import kd_loss
from lightning_methods.nets import MLP
from lightning_methods.robust_distillation import (
    check_priors,
    class_weighted_cross_entropy,
    class_weighted_kd_loss,
    eg_update,
    logit_adjusted_cross_entropy,
    pareto_front,
    per_class_error,
    plot_pareto,
    posthoc_logit_adjustment,
)
from tests.helpers import cpu_trainer, ddp_trainer, load_benchmark, run_cli

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "robust_distillation"
ADAM = functools.partial(torch.optim.Adam, lr=3e-3)


def _lt_digits(rho: float = 100.0, shuffle: bool = True, batch_size: int = 64) -> LongTailedDataModule:
    return LongTailedDataModule(DigitsDataModule(batch_size=batch_size, shuffle=shuffle), imbalance_ratio=rho)


# --------------------------------------------------------------------------------------------------------------------
# The math, by hand
# --------------------------------------------------------------------------------------------------------------------
def test_eg_update_on_hand_cases():
    lam = eg_update(torch.tensor([0.5, 0.5]), torch.tensor([0.0, 1.0]), step=math.log(3))
    assert torch.allclose(lam, torch.tensor([0.25, 0.75]))
    # equal errors leave the multipliers where they are, whatever the step
    start = torch.tensor([0.2, 0.3, 0.5])
    assert torch.allclose(eg_update(start, torch.full((3,), 0.4), step=5.0), start)
    # three classes: lam_y * exp(eta * err_y) / Z with eta = 2
    errors = torch.tensor([0.1, 0.5, 0.0])
    raw = torch.tensor([0.2 * math.exp(0.2), 0.3 * math.exp(1.0), 0.5 * math.exp(0.0)])
    assert torch.allclose(eg_update(start, errors, step=2.0), raw / raw.sum())
    with pytest.raises(ValueError, match="finite"):
        eg_update(start, torch.tensor([0.1, float("nan"), 0.0]), 1.0)


def test_module_eg_steps_decay_and_start_uniform():
    module = RobustClassifierModule(MLP(64, 3), 3, objective="dro", priors=[0.6, 0.3, 0.1], eg_step=2.0, eg_decay=0.5)
    assert torch.allclose(module.class_multipliers, torch.full((3,), 1 / 3))
    errors = torch.tensor([0.0, 0.5, 1.0])
    module.update_multipliers(errors)  # eta_0 = 2
    module.update_multipliers(errors)  # eta_1 = 1
    expected = torch.tensor([1.0, math.exp(0.5 * 3), math.exp(1.0 * 3)])  # exp((2 + 1) * err)
    assert torch.allclose(module.class_multipliers, expected / expected.sum())
    assert int(module.eg_updates) == 2


def test_per_class_error_by_hand():
    preds, targets = torch.tensor([0, 1, 1, 2, 0, 2]), torch.tensor([0, 0, 1, 2, 2, 2])
    assert torch.allclose(per_class_error(preds, targets, 4)[:3], torch.tensor([0.5, 0.0, 1 / 3]))
    assert math.isnan(per_class_error(preds, targets, 4)[3])


def test_logit_adjusted_cross_entropy_against_hand_computation():
    logits, pi = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([0.5, 0.3, 0.2])
    # CE(f + log pi, y=2) = -log(0.2 / (0.5 e + 0.3 + 0.2))
    expected = -math.log(0.2 / (0.5 * math.e + 0.5))
    assert logit_adjusted_cross_entropy(logits, torch.tensor([2]), pi).item() == pytest.approx(expected, rel=1e-6)
    assert torch.allclose(posthoc_logit_adjustment(logits, pi), logits - pi.log())
    # soft targets: the same loss against a one-hot vector
    assert logit_adjusted_cross_entropy(logits, torch.tensor([[0.0, 0.0, 1.0]]), pi).item() == pytest.approx(expected, rel=1e-6)


def test_balanced_cross_entropy_is_the_mean_of_per_class_risks():
    torch.manual_seed(1)
    logits = torch.randn(4, 2)
    targets = torch.tensor([0, 0, 0, 1])  # the batch has the training priors [0.75, 0.25]
    pi = torch.tensor([0.75, 0.25])
    c = torch.full((2,), 0.5) / pi  # balanced: w = 1/C
    losses = F.cross_entropy(logits, targets, reduction="none")
    hand = 0.5 * losses[:3].mean() + 0.5 * losses[3]  # (1/C) sum_y R_y
    assert class_weighted_cross_entropy(logits, targets, c).item() == pytest.approx(hand.item(), rel=1e-6)
    # c = 1 is plain cross-entropy; soft one-hot targets give the same value
    assert class_weighted_cross_entropy(logits, targets, torch.ones(2)).item() == pytest.approx(F.cross_entropy(logits, targets).item())
    onehot = F.one_hot(targets, 2).float()
    assert class_weighted_cross_entropy(logits, onehot, c).item() == pytest.approx(hand.item(), rel=1e-6)


def test_class_weighted_kd_against_hand_computation_and_plain_kd():
    student = torch.tensor([[0.0, math.log(3.0)]])  # p_s = [0.25, 0.75]
    teacher = torch.zeros(1, 2)  # p_t = [0.5, 0.5]
    c = torch.tensor([1.0, 3.0])
    hand = 1.0 * 0.5 * math.log(0.5 / 0.25) + 3.0 * 0.5 * math.log(0.5 / 0.75)
    assert class_weighted_kd_loss(student, teacher, c).item() == pytest.approx(hand, rel=1e-6)
    torch.manual_seed(0)
    s, t = torch.randn(5, 4), torch.randn(5, 4)
    assert class_weighted_kd_loss(s, t, torch.ones(4), 3.0).item() == pytest.approx(kd_loss(s, t, 3.0).item(), rel=1e-5)


def test_kd_objective_equals_distillation_module_and_balanced_kd_reweights():
    torch.manual_seed(0)
    logits, teacher_logits, y = torch.randn(6, 3), torch.randn(6, 3), torch.tensor([0, 0, 0, 1, 1, 2])
    pi = [0.5, 0.3, 0.2]
    plain = DistillationModule(MLP(64, 3), MLP(64, 3), 3, temperature=2.0, alpha=0.7)
    robust = RobustDistillationModule(MLP(64, 3), MLP(64, 3), 3, objective="kd", priors=pi, temperature=2.0, alpha=0.7)
    assert robust.kd_objective(logits, teacher_logits, y).item() == pytest.approx(
        plain.kd_objective(logits, teacher_logits, y).item(), rel=1e-6
    )
    balanced = RobustDistillationModule(MLP(64, 3), MLP(64, 3), 3, objective="balanced_kd", priors=pi, temperature=2.0, alpha=0.7)
    c = torch.tensor([1 / 3]) / torch.tensor(pi)
    hand = 0.3 * class_weighted_cross_entropy(logits, y, c) + 0.7 * class_weighted_kd_loss(logits, teacher_logits, c, 2.0)
    assert balanced.kd_objective(logits, teacher_logits, y).item() == pytest.approx(hand.item(), rel=1e-6)
    # the trade-off: w = (1 - a) pi + a / C
    half = RobustDistillationModule(MLP(64, 3), MLP(64, 3), 3, objective="balanced_kd", priors=pi, worst_class_weight=0.5)
    assert torch.allclose(half.class_weights(), 0.5 * torch.tensor(pi) + 0.5 / 3)


def test_dro_weights_trade_off_priors_and_multipliers():
    module = RobustClassifierModule(MLP(64, 2), 2, objective="dro", priors=[0.8, 0.2], worst_class_weight=0.25)
    module.class_multipliers.copy_(torch.tensor([0.1, 0.9]))
    w = 0.75 * torch.tensor([0.8, 0.2]) + 0.25 * torch.tensor([0.1, 0.9])
    assert torch.allclose(module.class_weights(), w)
    assert torch.allclose(module.example_weights(), w / torch.tensor([0.8, 0.2]))
    logits, y = torch.randn(3, 2), torch.tensor([0, 1, 1])
    per_example = F.cross_entropy(logits, y, reduction="none") * (w / torch.tensor([0.8, 0.2]))[y]
    assert module.loss(logits, y).item() == pytest.approx(per_example.mean().item(), rel=1e-6)


def test_posthoc_teacher_predicts_adjusted_scores_and_calibration_shifts():
    net = MLP(64, 3)
    module = RobustClassifierModule(net, 3, objective="posthoc", priors=[0.6, 0.3, 0.1])
    x = torch.randn(4, 1, 8, 8)
    assert torch.allclose(module.scores(x), net(x) - torch.tensor([0.6, 0.3, 0.1]).log())
    student = RobustDistillationModule(MLP(64, 3), net, 3, priors=[0.6, 0.3, 0.1], teacher_calibration="per_class")
    student.teacher_bias.copy_(torch.tensor([0.5, 0.0, -0.5]))
    student.teacher_log_scale.fill_(math.log(0.5))  # T = 2
    z = torch.randn(4, 3)
    expected = z / 2 + torch.tensor([0.5, 0.0, -0.5]) + torch.tensor([0.6, 0.3, 0.1]).log()
    assert torch.allclose(student.calibrate_teacher(z), expected)


def test_check_priors():
    assert torch.allclose(check_priors([0.5, 0.5], 2), torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="sum to 1"):
        check_priors([0.5, 0.6], 2)
    with pytest.raises(ValueError, match="one prior per class"):
        check_priors([1.0], 2)
    with pytest.raises(ValueError, match="> 0"):
        check_priors([1.0, 0.0], 2)


def test_pareto_front_and_plot(tmp_path):
    points = [(0.9, 0.5), (0.8, 0.7), (0.85, 0.4), (0.7, 0.7), (0.9, 0.5)]
    assert pareto_front(points) == [1, 0, 4]  # (0.85, 0.4) and (0.7, 0.7) are dominated; ties both stay
    path = plot_pareto({"a": points[:2], "b": points[2:]}, tmp_path / "p.png")
    assert path.stat().st_size > 1000


# --------------------------------------------------------------------------------------------------------------------
# Clear errors before any step
# --------------------------------------------------------------------------------------------------------------------
def test_constructor_errors():
    with pytest.raises(ValueError, match="`objective` must be one of"):
        RobustDistillationModule(MLP(64, 3), MLP(64, 3), 3, objective="robust")
    with pytest.raises(ValueError, match="`objective` must be one of"):
        RobustClassifierModule(MLP(64, 3), 3, objective="dro_kd")
    with pytest.raises(ValueError, match="sum to 1"):
        RobustDistillationModule(MLP(64, 3), MLP(64, 3), 3, priors=[0.5, 0.3, 0.3])
    with pytest.raises(ValueError, match="worst_class_weight"):
        RobustClassifierModule(MLP(64, 3), 3, worst_class_weight=1.5)
    with pytest.raises(ValueError, match="eg_step"):
        RobustClassifierModule(MLP(64, 3), 3, eg_step=0.0)
    with pytest.raises(ValueError, match="eg_every_n_steps"):
        RobustClassifierModule(MLP(64, 3), 3, eg_every_n_steps=0)
    with pytest.raises(ValueError, match="teacher_calibration"):
        RobustDistillationModule(MLP(64, 3), MLP(64, 3), 3, teacher_calibration="platt")


class _NoStep(pl.Callback):
    def on_train_batch_start(self, *args):  # pragma: no cover - reached only when the check failed
        raise AssertionError("a training step ran before the configuration error")


def _fit_fails(module, datamodule, match):
    trainer = cpu_trainer(max_epochs=1, callbacks=[_NoStep()])
    with pytest.raises(ValueError, match=match):
        trainer.fit(module, datamodule)
    assert trainer.global_step == 0


def _with_val(datamodule, keep):
    datamodule.setup("fit")
    labels = datamodule.val_dataset.y
    rows = torch.cat([torch.nonzero(labels == c).flatten()[:n] for c, n in enumerate(keep)]).numpy()
    base_val = datamodule.val_dataset.dataset
    all_labels = torch.full((len(base_val),), -1, dtype=torch.long)
    all_labels[datamodule.val_dataset.indices] = labels
    datamodule.val_dataset = LabelledSubset(base_val, datamodule.val_dataset.indices[rows], all_labels.numpy())
    return datamodule


def test_validation_split_lacking_a_class_or_unbalanced_is_refused():
    missing = _with_val(_lt_digits(), [18] * 9 + [0])
    _fit_fails(RobustClassifierModule(MLP(64, 10), 10, objective="dro"), missing, r"classes \[9\] have no validation")
    unbalanced = _with_val(_lt_digits(), [18] * 9 + [5])
    teacher = MLP(64, 10)
    student = RobustDistillationModule(MLP(64, 10), teacher, 10, objective="kd", teacher_calibration="per_class")
    _fit_fails(student, unbalanced, "balanced validation split")
    # balanced / ERM objectives do not use the validation split: they train
    module = RobustClassifierModule(MLP(64, 10), 10, objective="balanced")
    cpu_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1).fit(module, unbalanced)


def test_priors_missing_or_wrong_from_the_datamodule():
    class BadPriors(LongTailedDataModule):
        @property
        def class_priors(self):
            return [0.2] * 10

    _fit_fails(RobustClassifierModule(MLP(64, 10), 10, objective="balanced"), BadPriors(DigitsDataModule()), "sum to 1")
    # without class_priors the label counts of the training set are used
    module = RobustClassifierModule(MLP(64, 10), 10, objective="balanced")
    data = DigitsDataModule()
    cpu_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0).fit(module, data)
    counts = torch.bincount(data.train_dataset.y, minlength=10).float()
    assert torch.allclose(module.class_priors, counts / counts.sum())


# --------------------------------------------------------------------------------------------------------------------
# Training: the multipliers, logging, resume, DDP
# --------------------------------------------------------------------------------------------------------------------
def test_dro_multipliers_update_every_k_steps_and_are_logged():
    data = _lt_digits()
    module = RobustClassifierModule(MLP(64, 10, hidden_sizes=[32]), 10, objective="dro", eg_every_n_steps=2, optimizer=ADAM)
    trainer = cpu_trainer(max_epochs=2, limit_train_batches=3)
    trainer.fit(module, data)
    assert int(module.eg_updates) == 3  # steps 2, 4, 6
    metrics = trainer.callback_metrics
    logged = torch.stack([metrics[f"class_multiplier_{c}"] for c in range(10)])
    assert torch.allclose(logged, module.class_multipliers) and logged.sum().item() == pytest.approx(1.0, abs=1e-5)
    for key in ("val_acc", "val_balanced_acc", "val_worst_class_acc", "val_bottom_k_acc"):
        assert key in metrics
    # the tail classes (few training examples) are the ones that gain weight
    assert module.class_multipliers[-3:].sum() > module.class_multipliers[:3].sum()


def test_multipliers_update_at_validation_ends_only_during_fit():
    data = _lt_digits()
    module = RobustClassifierModule(MLP(64, 10, hidden_sizes=[32]), 10, objective="dro", optimizer=ADAM)
    trainer = cpu_trainer(max_epochs=2, limit_train_batches=2, num_sanity_val_steps=1)
    trainer.fit(module, data)
    assert int(module.eg_updates) == 2  # one per epoch's validation, none in the sanity check
    trainer.validate(module, data, verbose=False)
    assert int(module.eg_updates) == 2


class _RecordMultipliers(pl.Callback):
    """Each rank writes its multipliers and teacher calibration when fitting ends (module level: ddp_spawn pickles it)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_train_end(self, trainer, module):
        state = {k: v.clone() for k, v in module.state_dict().items()}
        torch.save(state, Path(self.directory) / f"rank{trainer.global_rank}_of{trainer.world_size}.pt")


def _dro_student(teacher):
    # lr = 0: Lightning always shuffles a DDP training sampler, so 2 ranks cannot see the batches of 1 process; with
    # the student fixed, the multipliers depend only on the gathered validation errors, which must match exactly
    return RobustDistillationModule(
        MLP(64, 10, hidden_sizes=[16]), teacher, 10, objective="dro_kd", eg_every_n_steps=2, temperature=2.0,
        teacher_calibration="per_class", optimizer=functools.partial(torch.optim.SGD, lr=0.0),
    )


@pytest.mark.slow
def test_multipliers_identical_on_two_ranks_and_equal_to_one_process(tmp_path):
    pl.seed_everything(0)
    teacher = MLP(64, 10, hidden_sizes=[32])
    torch.manual_seed(1)
    init = _dro_student(teacher).student.state_dict()

    def run(trainer_fn, batch_size):
        module = _dro_student(teacher)
        module.student.load_state_dict(init)
        trainer = trainer_fn(max_epochs=1, limit_train_batches=4, limit_val_batches=0, callbacks=[_RecordMultipliers(str(tmp_path))])
        trainer.fit(module, _lt_digits(shuffle=False, batch_size=batch_size))

    run(cpu_trainer, 32)
    run(ddp_trainer, 16)
    one = torch.load(tmp_path / "rank0_of1.pt")
    rank0, rank1 = torch.load(tmp_path / "rank0_of2.pt"), torch.load(tmp_path / "rank1_of2.pt")
    for key in one:
        assert torch.equal(rank0[key], rank1[key]), key
    for key in one:
        assert torch.allclose(rank0[key], one[key], atol=1e-6), (key, rank0[key], one[key])
    assert int(one["eg_updates"]) == 2  # steps 2 and 4
    assert not torch.allclose(one["class_multipliers"], torch.full((10,), 0.1))  # they did move


@pytest.mark.slow
def test_multipliers_restored_on_resume(tmp_path):
    def fit(max_epochs, ckpt_path=None, save=False):
        pl.seed_everything(0)
        module = RobustClassifierModule(MLP(64, 10, hidden_sizes=[32]), 10, objective="dro", eg_every_n_steps=3, eg_decay=0.9, optimizer=ADAM)
        callbacks = [pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)] if save else []
        trainer = cpu_trainer(max_epochs=max_epochs, enable_checkpointing=save, callbacks=callbacks, limit_val_batches=0)
        trainer.fit(module, _lt_digits(shuffle=False), ckpt_path=ckpt_path)
        return module

    straight = fit(4)
    fit(2, save=True)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert int(saved["eg_updates"]) == 3 and not torch.allclose(saved["class_multipliers"], torch.full((10,), 0.1))
    resumed = fit(4, ckpt_path=str(tmp_path / "last.ckpt"))
    assert int(resumed.eg_updates) == int(straight.eg_updates) == 6
    assert torch.allclose(resumed.class_multipliers, straight.class_multipliers, atol=1e-5)


@pytest.mark.slow
def test_robust_teachers_raise_worst_class_accuracy_over_erm():
    results = {}
    for objective in ("erm", "balanced", "dro"):
        pl.seed_everything(0)
        data = _lt_digits()
        module = RobustClassifierModule(MLP(64, 10, hidden_sizes=[64]), 10, objective=objective, eg_every_n_steps=5, optimizer=ADAM)
        trainer = cpu_trainer(max_epochs=25)
        trainer.fit(module, data)
        results[objective] = trainer.test(module, data, verbose=False)[0]
    erm = results["erm"]["test_worst_class_acc"]
    assert results["balanced"]["test_worst_class_acc"] > erm + 0.2
    assert results["dro"]["test_worst_class_acc"] > erm + 0.2


# --------------------------------------------------------------------------------------------------------------------
# Configs and benchmark
# --------------------------------------------------------------------------------------------------------------------
FAST = [
    "--trainer.max_epochs=2",
    "--trainer.limit_train_batches=3",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


@pytest.mark.slow
def test_configs_run_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = run_cli("fit", "--config", str(CONFIGS / "teacher.yaml"), *FAST, f"--trainer.default_root_dir={tmp_path}")
    assert cli.model.objective == "dro" and int(cli.model.eg_updates) == 1  # step 5 of 6
    assert (tmp_path / "checkpoints" / "robust_teacher" / "last.ckpt").is_file()
    assert "test_worst_class_acc" in cli.trainer.callback_metrics
    cli = run_cli("fit", "--config", str(CONFIGS / "balanced_kd.yaml"), *FAST, f"--trainer.default_root_dir={tmp_path}")
    module = cli.model
    assert module.objective == "balanced_kd" and module.teacher_calibration == "per_class"
    assert not torch.allclose(module.teacher_bias, torch.zeros(10))  # fitted on the validation split
    assert torch.allclose(module.class_priors, torch.tensor(cli.datamodule.class_priors))
    # no test after fit: it would replace the training metrics checked here
    cli = run_cli(
        "fit", "--config", str(CONFIGS / "dro_kd.yaml"), *FAST, f"--trainer.default_root_dir={tmp_path}", "--test_after_fit=false"
    )
    assert cli.model.objective == "dro_kd" and int(cli.model.eg_updates) == 2  # one per validation
    metrics = cli.trainer.callback_metrics
    assert torch.allclose(torch.stack([metrics[f"class_multiplier_{c}"] for c in range(10)]), cli.model.class_multipliers)
    assert "val_bottom_k_acc" in metrics and "val_worst_class_acc" in metrics


@pytest.mark.slow
def test_benchmark_quick_mode(tmp_path):
    bench = load_benchmark("robust_distillation")
    rows = bench.main(["--quick", "--out", str(tmp_path / "rd")])
    assert (tmp_path / "rd.md").is_file() and (tmp_path / "rd.png").is_file()
    assert rows and all(0.0 <= r["avg"] <= 1.0 and 0.0 <= r["worst"] <= 1.0 for r in rows)
