"""Diagnostics of distillation: the exaggeration slope and decile table on constructed cases, the empirical NTK
against autograd, supervision complexity against the closed form of a linear model, its fall with temperature and
rise along the teacher's trajectory, and the DistillationDiagnostics callback."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks import DistillationDiagnostics
from lightning_methods import ClassifierModule, DistillationModule
from lightning_methods.distillation_diagnostics import (
    confidence_deciles,
    empirical_ntk,
    exaggeration_slope,
    supervision_complexity,
    supervision_complexity_from_kernel,
)
from tests.helpers import cpu_trainer
from tests.lightning_methods.test_distillation import (  # noqa: F401  (teacher_dir is a fixture)
    digits,
    student_net,
    teacher_dir,
    teacher_net,
    trained_teacher,
)
from lightning_methods.distillation import load_backbone_weights


# --------------------------------------------------------------------------------------------------------------------
# Confidence exaggeration
# --------------------------------------------------------------------------------------------------------------------
def _probs_with_top(top_prob: torch.Tensor, top_class: torch.Tensor, num_classes: int = 4) -> torch.Tensor:
    """Rows with probability ``top_prob`` on ``top_class`` and the rest spread evenly."""
    rest = ((1 - top_prob) / (num_classes - 1)).unsqueeze(1).expand(-1, num_classes).clone()
    rest.scatter_(1, top_class.unsqueeze(1), top_prob.unsqueeze(1))
    return rest.double()


def test_exaggeration_slope_recovers_a_known_linear_relation():
    torch.manual_seed(0)
    n = 200
    q = torch.rand(n, dtype=torch.float64) * 0.6 + 0.35  # the teacher's top class stays the argmax (> 1/4 each)
    top = torch.randint(0, 4, (n,))
    teacher = _probs_with_top(q, top)
    student = _probs_with_top(torch.sigmoid(2.0 * torch.logit(q) + 0.5), top)  # the student's top may differ
    fit = exaggeration_slope(student, teacher)
    assert fit["slope"] == pytest.approx(2.0, abs=1e-9) and fit["intercept"] == pytest.approx(0.5, abs=1e-9)
    assert fit["n"] == n
    assert exaggeration_slope(teacher, teacher)["slope"] == pytest.approx(1.0, abs=1e-12)
    # probabilities of exactly 0 / 1 are clipped, not infinite
    hard = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.3]])
    assert math.isfinite(exaggeration_slope(hard, torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]))["slope"])


def test_confidence_deciles_show_the_student_below_the_teacher_where_the_teacher_is_unsure():
    q = torch.linspace(0.3, 0.99, 100, dtype=torch.float64)
    top = torch.zeros(100, dtype=torch.long)
    teacher = _probs_with_top(q, top)
    student = _probs_with_top(torch.sigmoid(1.5 * torch.logit(q)), top)  # exaggerates around p = 1/2
    rows = confidence_deciles(student, teacher, num_bins=10)
    assert [r["n"] for r in rows] == [10] * 10
    assert [r["teacher_conf"] for r in rows] == sorted(r["teacher_conf"] for r in rows)
    assert rows[0]["student_minus_teacher"] < 0 and rows[0]["frac_student_below"] == 1.0
    assert rows[-1]["student_minus_teacher"] > 0 and rows[-1]["frac_student_below"] == 0.0
    assert rows[0]["teacher_conf"] == pytest.approx(float(q[:10].mean()))
    with pytest.raises(ValueError, match="num_bins"):
        confidence_deciles(student, teacher, num_bins=0)
    with pytest.raises(ValueError, match="same shape"):
        exaggeration_slope(student[:, :3], teacher)


# --------------------------------------------------------------------------------------------------------------------
# Empirical NTK and supervision complexity
# --------------------------------------------------------------------------------------------------------------------
def test_empirical_ntk_matches_autograd_in_every_chunking():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(13, 5)
    rows = []
    for i in range(len(x)):
        per_output = []
        for j in range(3):
            net.zero_grad()
            net(x[i : i + 1])[0, j].backward()
            per_output.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
        rows.append(torch.stack(per_output))
    jac = torch.stack(rows).double()
    expected = torch.einsum("ajp,bjp->ab", jac, jac) / 3  # averaged over the 3 outputs
    for kwargs in ({}, {"chunk_size": 4}, {"chunk_size": 4, "max_memory_mb": 1e-6}):  # the last recomputes blocks
        kernel = empirical_ntk(net, x, **kwargs)
        assert kernel.dtype == torch.float64 and torch.allclose(kernel, expected, atol=1e-5)
        assert torch.equal(kernel, kernel.T)


@pytest.mark.parametrize("bias", [False, True])
def test_supervision_complexity_equals_the_closed_form_of_a_linear_model(bias):
    # f(x) = W x (+ b): d f_j / dW = e_j x^T, so every output's kernel is x.x' (+ 1 for the bias) and so is the mean
    torch.manual_seed(0)
    n, d, k = 20, 30, 4
    x = torch.randn(n, d)
    y = torch.randint(0, k, (n,))
    net = nn.Linear(d, k, bias=bias)
    xd = x.double().numpy()
    gram = xd @ xd.T + (1.0 if bias else 0.0)
    ridge = 1e-6 * np.trace(gram) / n
    onehot = np.eye(k)[y.numpy()]
    sc = float(np.trace(onehot.T @ np.linalg.solve(gram + ridge * np.eye(n), onehot)))
    assert supervision_complexity(net, x, y, adjusted=False, num_classes=k) == pytest.approx(sc, rel=1e-5)
    adjusted = math.sqrt(sc * np.trace(gram)) / n
    assert supervision_complexity(net, x, y, num_classes=k) == pytest.approx(adjusted, rel=1e-5)
    # soft targets give Y^T K^-1 Y with the same kernel; the adjusted value does not depend on the kernel's scale
    soft = torch.softmax(torch.randn(n, k), dim=1)
    kernel = torch.from_numpy(gram)
    raw = float(np.trace(soft.double().numpy().T @ np.linalg.solve(gram + ridge * np.eye(n), soft.double().numpy())))
    assert supervision_complexity_from_kernel(kernel, soft, adjusted=False) == pytest.approx(raw, rel=1e-8)
    assert supervision_complexity_from_kernel(7.0 * kernel, soft) == pytest.approx(
        supervision_complexity_from_kernel(kernel, soft), rel=1e-8
    )


def test_singular_kernel_gets_a_larger_ridge_with_a_warning():
    x = torch.randn(6, 2)
    kernel = (x @ x.T).double()  # rank 2
    with pytest.warns(UserWarning, match="ill-conditioned"):
        value = supervision_complexity_from_kernel(kernel, torch.randn(6, 3), ridge=0.0)
    assert math.isfinite(value)
    with pytest.raises(ValueError, match="square"):
        supervision_complexity_from_kernel(torch.zeros(3, 4), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="targets for a kernel on 6 points"):
        supervision_complexity_from_kernel(kernel + torch.eye(6), torch.zeros(5, 2))


def test_supervision_complexity_falls_with_temperature_and_rises_along_the_trajectory(teacher_dir):
    dm = digits()
    dm.setup()
    x, y = dm.splits["train"]
    x, y = x[:300], y[:300]
    torch.manual_seed(0)
    student = student_net()  # 1,210 parameters > 300 points
    kernel = empirical_ntk(student, x)
    with torch.no_grad():
        final = load_backbone_weights(teacher_dir / "last.ckpt", teacher_net())(x)
        first = load_backbone_weights(teacher_dir / "epoch=0.ckpt", teacher_net())(x)
    by_tau = [supervision_complexity_from_kernel(kernel, (final / tau).softmax(-1)) for tau in (1, 2, 4, 8)]
    one_hot = supervision_complexity_from_kernel(kernel, y, num_classes=10)
    assert all(a > b for a, b in zip(by_tau, by_tau[1:])), by_tau
    assert one_hot > by_tau[0]
    early = supervision_complexity_from_kernel(kernel, first.softmax(-1))
    assert early < by_tau[0]  # the teacher's targets grow more complex as it trains
    assert supervision_complexity(student, x, (final / 2).softmax(-1)) == pytest.approx(by_tau[1], rel=1e-9)


# --------------------------------------------------------------------------------------------------------------------
# The callback
# --------------------------------------------------------------------------------------------------------------------
def test_diagnostics_callback_logs_both_diagnostics_and_keeps_history(teacher_dir):
    callback = DistillationDiagnostics(num_samples=100, every_n_epochs=2, sc_num_samples=60, splits=["train", "val"])
    module = DistillationModule(student_net(), trained_teacher(teacher_dir), num_classes=10, temperature=2.0)
    trainer = cpu_trainer(max_epochs=3, limit_train_batches=3, limit_val_batches=1, callbacks=[callback])
    trainer.fit(module, digits())
    assert [r["epoch"] for r in callback.history] == [1, 2]  # every 2nd epoch, and the last one
    metrics = trainer.callback_metrics
    for key in ("train_exaggeration_slope", "val_exaggeration_slope", "val_low_conf_gap", "sc_teacher", "sc_onehot"):
        assert torch.isfinite(metrics[key]), key
    assert 0 < metrics["sc_teacher"] < metrics["sc_onehot"]
    assert len(callback.history[-1]["val_deciles"]) == 10
    restored = DistillationDiagnostics()
    restored.load_state_dict(callback.state_dict())
    assert restored.history == callback.history


def test_diagnostics_callback_errors():
    with pytest.raises(ValueError, match="`splits`"):
        DistillationDiagnostics(splits=["training"])
    with pytest.raises(ValueError, match="`num_samples`"):
        DistillationDiagnostics(num_samples=5)
    trainer = cpu_trainer(max_epochs=1, limit_train_batches=1, callbacks=[DistillationDiagnostics()])
    with pytest.raises(TypeError, match="needs a DistillationModule"):
        trainer.fit(ClassifierModule(student_net(), num_classes=10), digits())
    assert trainer.global_step == 0
    # no datamodule to draw fixed, un-augmented subsets from
    loader = DataLoader(TensorDataset(torch.rand(8, 1, 8, 8), torch.arange(8)), batch_size=4)
    trainer = cpu_trainer(max_epochs=1, limit_train_batches=1, callbacks=[DistillationDiagnostics()])
    with pytest.raises(ValueError, match=r"needs a datamodule with `dataset\(split\)`"):
        trainer.fit(DistillationModule(student_net(), teacher_net(), num_classes=10), loader)
    assert trainer.global_step == 0


def test_diagnostic_functions_reject_bad_input():
    with pytest.raises(ValueError, match="`inputs` must be a batch"):
        empirical_ntk(nn.Linear(3, 2), torch.randn(3))
    with pytest.raises(ValueError, match="no trainable parameters"):
        empirical_ntk(nn.Linear(3, 2).requires_grad_(False), torch.randn(4, 3))
    kernel = torch.eye(4, dtype=torch.float64)
    with pytest.raises(TypeError, match="integer dtype"):
        supervision_complexity_from_kernel(kernel, torch.tensor([0.0, 1.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match=r"class indices \(n,\) or a target matrix"):
        supervision_complexity_from_kernel(kernel, torch.zeros(4, 2, 1))
    with pytest.raises(ValueError, match="`ridge` must be >= 0"):
        supervision_complexity_from_kernel(kernel, torch.zeros(4, 2), ridge=-1.0)
    with pytest.raises(ValueError, match="zero trace"):
        supervision_complexity_from_kernel(torch.zeros(4, 4, dtype=torch.float64), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="at least 2 points"):
        exaggeration_slope(torch.tensor([[0.5, 0.5]]), torch.tensor([[0.5, 0.5]]))
