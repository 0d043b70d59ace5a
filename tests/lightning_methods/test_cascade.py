"""CascadeModule: each deferral rule on hand cases, post-hoc vs confidence on a constructed specialist, compute saved
at inference (forward calls counted), thresholds under DDP, resume, errors before any step, and the configs
configs/cascade/confidence.yaml and configs/cascade/posthoc.yaml through the CLI (after configs/cascade/cheap.yaml
and configs/cascade/expensive.yaml train the two models)."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from datamodules import DeferralDataModule, MNIST1DDataModule
from lightning_methods import CascadeModule
from lightning_methods.cascade import (
    cost_to_reach,
    deferral_scores,
    oracle_scores,
    posthoc_features,
    posthoc_targets,
    rate_for_cost_budget,
    relative_cost,
    threshold_for_rate,
)
from lightning_methods.metrics import DeferralCurve
from lightning_methods.nets import MLP
from tests.helpers import cpu_trainer, ddp_trainer, run_cli

ROOT = Path(__file__).resolve().parents[2]
C = 10


class Slice(nn.Module):
    """A "model" reading its logits off its input: columns ``[start, start + C)`` (hand-constructed cascades)."""

    def __init__(self, start: int, classes: int = C) -> None:
        super().__init__()
        self.start, self.num_classes = start, classes
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(len(x))
        return x[:, self.start : self.start + self.num_classes]


def _adam(lr=3e-3):
    return functools.partial(torch.optim.Adam, lr=lr)  # picklable, for ddp_spawn


# -- the rules on hand cases ---------------------------------------------------------------------------------------
def test_confidence_entropy_margin_hand_cases():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.4, 0.2], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(deferral_scores(p, "confidence"), torch.tensor([0.3, 0.6, 0.0]))
    entropy = torch.tensor([-(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1)),
                            -(2 * 0.4 * math.log(0.4) + 0.2 * math.log(0.2)), 0.0])
    torch.testing.assert_close(deferral_scores(p, "entropy"), entropy)
    torch.testing.assert_close(deferral_scores(p, "margin"), torch.tensor([0.5, 1.0, 0.0]))
    # higher = defer: the least sure row is deferred first by every rule
    for rule in ("confidence", "entropy", "margin"):
        assert deferral_scores(p, rule).argmax() == 1 and deferral_scores(p, rule).argmin() == 2


def test_random_rule_ignores_the_input_and_is_seeded():
    p = torch.softmax(torch.randn(1000, C), -1)
    a = deferral_scores(p, "random", torch.Generator().manual_seed(3))
    b = deferral_scores(p.flip(0), "random", torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)  # the same draws whatever the probabilities
    assert 0 <= a.min() and a.max() < 1 and abs(a.mean() - 0.5) < 0.05


def test_posthoc_features_and_targets_hand_case():
    p1 = torch.tensor([[0.2, 0.5, 0.3]])
    f = posthoc_features(p1, embedding=torch.tensor([[7.0, 8.0]]))
    entropy = -(0.2 * math.log(0.2) + 0.5 * math.log(0.5) + 0.3 * math.log(0.3))
    torch.testing.assert_close(f, torch.tensor([[0.2, 0.5, 0.3, 0.5, 0.3, 0.2, 0.2, entropy, 7.0, 8.0]]))
    p1 = torch.tensor([[0.6, 0.4], [0.3, 0.7], [0.9, 0.1]])
    p2 = torch.tensor([[0.2, 0.8], [0.1, 0.9], [0.4, 0.6]])
    y = torch.tensor([1, 1, 0])
    # h1 right on rows 1, 2; h2 right on rows 0, 1
    torch.testing.assert_close(posthoc_targets(p1, p2, y, "diff01"), torch.tensor([1.0, 0.0, -1.0]))
    torch.testing.assert_close(posthoc_targets(p1, p2, y, "diffprob"), torch.tensor([0.4, 0.2, -0.5]))
    torch.testing.assert_close(oracle_scores(torch.tensor([False, True, True]), torch.tensor([True, True, False])),
                               torch.tensor([1.0, 0.0, -1.0]))


def test_thresholds_costs_and_budgets_hand_cases():
    s = torch.tensor([0.9, 0.1, 0.5, 0.7])
    assert threshold_for_rate(s, 0.5) == pytest.approx(0.6)  # defers 0.9 and 0.7
    assert threshold_for_rate(s, 0.25) == pytest.approx(0.8)
    assert threshold_for_rate(s, 0.0) == math.inf and threshold_for_rate(s, 1.0) == -math.inf
    assert threshold_for_rate(s, 0.6) == pytest.approx(0.6)  # floor(2.4) = 2 deferred
    assert relative_cost([1.0, 0.3], [1.0, 10.0]) == pytest.approx(0.4)
    assert rate_for_cost_budget(0.4, [1.0, 10.0]) == pytest.approx(0.3)  # (0.4 * 10 - 1) / 10
    assert rate_for_cost_budget(5.0, [1.0, 10.0]) == 1.0
    # three stages at one per-stage rate r: 1 + 10 r + 100 r^2 = 0.5 * 100 -> r = (-10 + sqrt(100 + 19600)) / 200
    assert rate_for_cost_budget(0.5, [1.0, 10.0, 100.0]) == pytest.approx((-10 + math.sqrt(19700)) / 200, abs=1e-9)
    with pytest.raises(ValueError, match="below the cost of the first stage"):
        rate_for_cost_budget(0.05, [1.0, 10.0])
    rate, cost = cost_to_reach(torch.tensor([0.0, 0.5, 1.0]), torch.tensor([0.5, 0.8, 0.9]), 0.8, [1.0, 10.0])
    assert (rate, cost) == (0.5, pytest.approx(0.6))
    assert all(math.isnan(v) for v in cost_to_reach(torch.tensor([0.0, 1.0]), torch.tensor([0.5, 0.6]), 0.9, [1, 1]))


# -- hand-constructed cascades ---------------------------------------------------------------------------------------
def _specialist_data(n: int, seed: int) -> TensorDataset:
    """h1: 60% right, its confidence independent of the class; h2: a specialist, right on classes 0-4 only."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (n,), generator=g)
    h1_right = torch.rand(n, generator=g) < 0.6
    h1_pred = torch.where(h1_right, y, (y + torch.randint(1, C, (n,), generator=g)) % C)
    strength = 1.0 + 3.0 * torch.rand(n, generator=g) + 1.5 * h1_right.float()  # confidence says something
    logits1 = torch.nn.functional.one_hot(h1_pred, C) * strength.unsqueeze(1)
    h2_pred = torch.where(y < 5, y, (y + 1) % C)
    logits2 = torch.nn.functional.one_hot(h2_pred, C) * 4.0
    return TensorDataset(torch.cat([logits1, logits2], 1).float(), y)


def _audc(cascade: CascadeModule, data: TensorDataset) -> float:
    x, y = data.tensors
    p1, p2 = cascade.probabilities(0, x), cascade.probabilities(1, x)
    with torch.no_grad():
        scores = cascade.stage_scores(0, p1)
    metric = DeferralCurve()
    metric.update(scores.float(), p1.argmax(-1) == y, p2.argmax(-1) == y)
    return float(metric.compute()["audc"])


@pytest.mark.slow
def test_posthoc_beats_confidence_with_a_specialist():
    fit, held, test = _specialist_data(3000, 1), _specialist_data(500, 2), _specialist_data(2000, 3)
    confidence = CascadeModule([Slice(0), Slice(C)], C, deferral="confidence")
    posthoc = CascadeModule([Slice(0), Slice(C)], C, deferral="posthoc", target="diff01", allow_training_split=True,
                            optimizer=_adam(1e-2))
    cpu_trainer(max_epochs=8).fit(posthoc, DataLoader(fit, batch_size=256, shuffle=True), DataLoader(held, batch_size=500))
    a_conf, a_post = _audc(confidence, test), _audc(posthoc, test)
    # the oracle of this construction defers classes 0-4 where h1 is wrong; confidence wastes half its budget on 5-9
    assert a_post > a_conf + 0.03, (a_post, a_conf)


def test_only_deferred_inputs_reach_the_expensive_model():
    data = _specialist_data(300, 0)
    h1, h2 = Slice(0), Slice(C)
    cascade = CascadeModule([h1, h2], C, deferral="margin", thresholds=[0.6], costs=[1.0, 10.0])
    h1.calls.clear(), h2.calls.clear()
    outs = cpu_trainer().predict(cascade, DataLoader(data, batch_size=64))
    x = data.tensors[0]
    p1, p2 = x[:, :C].softmax(-1), x[:, C:].softmax(-1)
    deferred = deferral_scores(p1, "margin") > 0.6
    assert 0 < deferred.sum() < len(x)
    assert sum(h1.calls) == len(x) and sum(h2.calls) == int(deferred.sum())  # h2 saw the deferred rows only
    assert len(h2.calls) == len(outs)  # one batched call per batch
    answered = torch.cat([o["answered_by"] for o in outs])
    torch.testing.assert_close(answered, deferred.long())
    preds = torch.cat([o["preds"] for o in outs])
    torch.testing.assert_close(preds, torch.where(deferred, p2.argmax(-1), p1.argmax(-1)))
    stats = cascade.predict_stats
    assert stats["deferred"] == pytest.approx(deferred.float().mean().item())
    assert stats["relative_cost"] == pytest.approx(relative_cost([1.0, stats["deferred"]], cascade.stage_costs()))


def test_three_models_defer_stage_by_stage_and_specialist_probabilities_are_mapped_back():
    x = torch.randn(50, 3 * C)
    spec = Slice(2 * C, classes=5)
    cascade = CascadeModule([Slice(0), Slice(C), spec], C, class_subsets=[None, None, [5, 6, 7, 8, 9]],
                            thresholds=[0.5, 0.6], costs=[1.0, 2.0, 4.0])
    probs = cascade.probabilities(2, x)
    assert torch.all(probs[:, :5] == 0) and torch.allclose(probs[:, 5:], x[:, 2 * C : 2 * C + 5].softmax(-1))
    spec.calls.clear()
    out = cascade.cascade_predict(x)
    s1 = deferral_scores(x[:, :C].softmax(-1), "confidence")
    s2 = deferral_scores(x[:, C : 2 * C].softmax(-1), "confidence")
    expected = torch.where(s1 <= 0.5, 0, torch.where(s2 <= 0.6, 1, 2))
    torch.testing.assert_close(out["answered_by"], expected)
    assert sum(spec.calls) == int((expected == 2).sum())


def test_thresholds_from_a_cost_budget_and_measured_flops():
    cascade = CascadeModule([MLP(40, C, [8]), MLP(40, C, [128, 128])], C, cost_budget=0.5)
    costs = cascade.stage_costs(torch.zeros(3, 40))
    assert costs[0] == 2 * (40 * 8 + 8 * C) and costs[1] == 2 * (40 * 128 + 128 * 128 + 128 * C)  # matmul FLOPs
    assert cascade.target_rates() == [pytest.approx((0.5 * costs[1] - costs[0]) / costs[1])]


# -- Lightning: fit on held-out data, DDP, resume -------------------------------------------------------------------------
def _models(seed=0):
    torch.manual_seed(seed)
    return [MLP(40, C, [8]), MLP(40, C, [32])]


def _dm(**kw):
    return DeferralDataModule(MNIST1DDataModule(num_samples=1010, batch_size=32, shuffle=False), threshold_fraction=0.31, **kw)


def test_confidence_fit_only_chooses_thresholds_on_held_out_data():
    cascade = CascadeModule(_models(), C, deferral="entropy", deferral_rate=0.4)
    dm = _dm()
    cpu_trainer(max_epochs=1).fit(cascade, datamodule=dm)
    x, _ = dm.splits["val"]  # the 31 threshold examples
    scores = deferral_scores(cascade.probabilities(0, x), "entropy")
    assert cascade.thresholds.item() == pytest.approx(threshold_for_rate(scores, 0.4))
    assert int((scores > cascade.thresholds.item()).sum()) == math.floor(0.4 * len(x))
    assert sum(p.numel() for p in cascade.parameters()) == 0  # the models are frozen, outside parameters()
    results = cpu_trainer().test(cascade, datamodule=dm, verbose=False)[0]
    for key in ("test_audc", "test_acc@defer0.25", "test_oracle_audc", "test_acc", "test_deferred", "test_relative_cost",
                "test_acc_model0", "test_acc_model1", "test_cost_for_99"):
        assert key in results
    assert results["test_oracle_audc"] >= results["test_audc"]


@pytest.mark.slow
def test_thresholds_under_two_processes_equal_one_process():
    thresholds = {}
    for name, trainer in (("one", cpu_trainer(max_epochs=1)), ("two", ddp_trainer(max_epochs=1))):
        cascade = CascadeModule(_models(), C, deferral="margin", deferral_rate=0.3)
        trainer.fit(cascade, datamodule=_dm())
        thresholds[name] = cascade.thresholds.clone()
    assert torch.isfinite(thresholds["one"]).all()
    torch.testing.assert_close(thresholds["two"], thresholds["one"], rtol=0, atol=1e-12)


@pytest.mark.slow
def test_posthoc_thresholds_under_two_processes_equal_one_process():
    fitted = CascadeModule(_models(), C, deferral="posthoc", hidden_sizes=[16], optimizer=_adam())
    cpu_trainer(max_epochs=2).fit(fitted, datamodule=_dm())
    thresholds = {}
    for name, trainer in (("one", cpu_trainer(max_epochs=0)), ("two", ddp_trainer(max_epochs=0))):
        cascade = CascadeModule(_models(), C, deferral="posthoc", hidden_sizes=[16], deferral_rate=0.45)
        cascade.load_state_dict(fitted.state_dict())  # the fitted g: this fit only chooses thresholds from its scores
        trainer.fit(cascade, datamodule=_dm())
        thresholds[name] = cascade.thresholds.clone()
    assert torch.isfinite(thresholds["one"]).all()
    torch.testing.assert_close(thresholds["two"], thresholds["one"], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_resume_restores_g_and_thresholds(tmp_path):
    def run(epochs, ckpt_path=None, callbacks=()):
        torch.manual_seed(0)
        cascade = CascadeModule(_models(), C, deferral="posthoc", target="diffprob", deferral_rate=0.25,
                                hidden_sizes=[16], optimizer=_adam())
        trainer = cpu_trainer(max_epochs=epochs, callbacks=list(callbacks), enable_checkpointing=bool(callbacks))
        trainer.fit(cascade, datamodule=_dm(), ckpt_path=ckpt_path)
        return cascade

    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    first = run(2, callbacks=[ckpt])
    # the checkpoint holds g and the thresholds of g at that point, and loads back with the models given again
    restored = CascadeModule.load_from_checkpoint(tmp_path / "last.ckpt", models=_models(), weights_only=True)
    torch.testing.assert_close(restored.thresholds, first.thresholds)
    assert bool(restored.head_fitted) and torch.isfinite(restored.thresholds).all()
    for a, b in zip(restored.heads.parameters(), first.heads.parameters()):
        torch.testing.assert_close(a, b)
    resumed = run(3, ckpt_path=tmp_path / "last.ckpt")
    straight = run(3)
    for a, b in zip(resumed.heads.parameters(), straight.heads.parameters()):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(resumed.thresholds, straight.thresholds)


# -- errors before any step -----------------------------------------------------------------------------------------
def test_models_with_different_class_counts_fail_at_construction():
    with pytest.raises(ValueError, match=r"`models\[1\]` \(MLP\) outputs 5 classes .* `class_subsets\[1\]`"):
        CascadeModule([MLP(40, 10, [8]), MLP(40, 5, [8])], 10)
    with pytest.raises(ValueError, match=r"outputs 5 classes but `class_subsets\[1\]` lists 4"):
        CascadeModule([MLP(40, 10, [8]), MLP(40, 5, [8])], 10, class_subsets=[None, [0, 1, 2, 3]])
    CascadeModule([MLP(40, 10, [8]), MLP(40, 5, [8])], 10, class_subsets=[None, [0, 1, 2, 3, 4]])


def test_models_without_a_class_attribute_are_checked_before_any_step():
    h2 = nn.Sequential(nn.Flatten(), nn.Linear(40, 7))  # no num_classes attribute: found by a probe in setup
    cascade = CascadeModule([MLP(40, C, [8]), h2], C, deferral_rate=0.3)
    calls = []
    h2.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=r"`models\[1\]` \(Sequential\) outputs 7 classes"):
        cpu_trainer(max_epochs=1).fit(cascade, datamodule=_dm())
    assert len(calls) == 1  # the probe only


@pytest.mark.parametrize("rate", [-0.1, 1.5, float("nan"), [0.2, 0.3]])
def test_deferral_rate_outside_unit_interval_is_refused(rate):
    with pytest.raises(ValueError, match="deferral_rate"):
        CascadeModule(_models(), C, deferral_rate=rate)


def test_other_bad_arguments():
    with pytest.raises(ValueError, match="oracle.*needs the labels"):
        CascadeModule(_models(), C, deferral="oracle")
    with pytest.raises(ValueError, match="deferral='nope'"):
        CascadeModule(_models(), C, deferral="nope")
    with pytest.raises(TypeError, match="two or more"):
        CascadeModule([MLP(40, C, [8])], C)
    with pytest.raises(ValueError, match="not both"):
        CascadeModule(_models(), C, deferral_rate=0.2, cost_budget=0.5)
    with pytest.raises(ValueError, match="`costs` has 3 entries for 2 models"):
        CascadeModule(_models(), C, costs=[1, 2, 3])
    with pytest.raises(FileNotFoundError, match=r"models\[1\]"):
        CascadeModule([MLP(40, C, [8]), "no/such.ckpt"], C)


def test_posthoc_rule_used_before_g_is_fitted_is_refused():
    cascade = CascadeModule(_models(), C, deferral="posthoc", thresholds=[0.0])
    with pytest.raises(ValueError, match="g has not been fitted"):
        cpu_trainer().test(cascade, datamodule=_dm())
    with pytest.raises(ValueError, match="g has not been fitted"):
        cpu_trainer().predict(cascade, datamodule=_dm())
    with pytest.raises(ValueError, match="g has not been fitted"):
        cascade.cascade_predict(torch.zeros(2, 40))
    with pytest.raises(ValueError, match="runs no training step"):
        cpu_trainer(max_epochs=0).fit(cascade, datamodule=_dm())


def test_fitting_on_the_models_training_split_is_refused_unless_allowed():
    calls = []
    models = _models()
    models[1].register_forward_hook(lambda *a: calls.append(1))
    for dm in (MNIST1DDataModule(num_samples=1010), _dm(fit_split="train")):
        cascade = CascadeModule(models, C, deferral="posthoc", deferral_rate=0.3)
        with pytest.raises(ValueError, match="which the models were trained on.*allow_training_split=True"):
            cpu_trainer(max_epochs=1).fit(cascade, datamodule=dm)
    assert len(calls) == 2  # the probes of setup, no step
    cascade = CascadeModule(models, C, deferral="posthoc", deferral_rate=0.3, allow_training_split=True, hidden_sizes=[8])
    cpu_trainer(max_epochs=1, limit_train_batches=2).fit(cascade, datamodule=_dm(fit_split="train"))
    assert bool(cascade.head_fitted) and cascade.has_thresholds


def test_predict_without_thresholds_is_refused():
    cascade = CascadeModule(_models(), C)
    with pytest.raises(ValueError, match="has none: fit it with `deferral_rate`"):
        cpu_trainer().predict(cascade, datamodule=_dm())


# -- the configs through the CLI -------------------------------------------------------------------------------------
FAST = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=3",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


@pytest.mark.slow
def test_cascade_configs_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    small = ["--data.init_args.num_samples=1400"]
    for name in ("cheap", "expensive"):
        cli = run_cli("fit", "--config", str(ROOT / "configs/cascade" / f"{name}.yaml"), *FAST, *small, "--test_after_fit=false")
        assert (tmp_path / "checkpoints/cascade" / name / "last.ckpt").is_file()
    data_small = ["--data.init_args.datamodule.init_args.num_samples=1400"]
    # confidence.yaml: architectures from class_path entries (the CLI links num_classes / in_features into each)
    cli = run_cli("fit", "--config", str(ROOT / "configs/cascade/confidence.yaml"), *FAST, *data_small)
    cascade = cli.model
    assert [m.in_features for m in cascade.cascade_models] == [40, 40]
    assert [m.num_classes for m in cascade.cascade_models] == [10, 10]
    assert cascade.has_thresholds and "test_audc" in cli.trainer.callback_metrics
    assert 0.2 < float(cli.trainer.callback_metrics["test_deferred"]) < 0.4  # 30% targeted on held-out data
    # posthoc.yaml: models given as checkpoint paths; g fitted, the threshold set for half the cost of h2
    cli = run_cli("fit", "--config", str(ROOT / "configs/cascade/posthoc.yaml"), *FAST, *data_small)
    cascade = cli.model
    assert bool(cascade.head_fitted) and cascade.has_thresholds
    assert float(cli.trainer.callback_metrics["test_relative_cost"]) == pytest.approx(0.5, abs=0.1)
    ckpt = tmp_path / "checkpoints/cascade/posthoc/last.ckpt"
    cli = run_cli("predict", "--config", str(ROOT / "configs/cascade/posthoc.yaml"), *data_small, f"--ckpt_path={ckpt}",
                  "--trainer.enable_progress_bar=false")
    assert cli.model.predict_stats["examples"] == 300
    reloaded = CascadeModule.load_from_checkpoint(ckpt, weights_only=True)  # models rebuilt from their paths
    torch.testing.assert_close(reloaded.thresholds, cascade.thresholds)


def test_cli_refuses_a_contradicting_value_in_models(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = (ROOT / "configs/cascade/confidence.yaml").read_text().replace("hidden_sizes: [16, 16]", "hidden_sizes: [16, 16]\n          in_features: 64")
    (tmp_path / "bad.yaml").write_text(config)
    with pytest.raises(ValueError, match="`in_features=64` of lightning_methods.nets.MLP in `models` contradicts"):
        run_cli("fit", "--config", str(tmp_path / "bad.yaml"))


def test_plot_deferral_curves_writes_a_png(tmp_path):
    from lightning_methods.cascade import plot_deferral_curves

    rate = torch.linspace(0, 1, 11)
    path = plot_deferral_curves({"confidence": (rate, 0.5 + 0.2 * rate), "random": (rate, 0.5 + 0.1 * rate)},
                                tmp_path / "curves.png", title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="empty"):
        plot_deferral_curves({}, tmp_path / "none.png")
