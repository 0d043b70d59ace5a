"""SelectiveOODModule: the SCOD rule (Chow and density-ratio limits, the Lagrangian form), scores against pytorch-ood,
the budget on the test mixture, the loss-based estimator's gain, DDP thresholds, checkpoints and resume, errors.

Also runs configs/selective_ood/gaussian_loss_based.yaml through the CLI and reloads the checkpoint it writes
(tests/test_configs.py runs every selective_ood config with tiny overrides).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from datamodules import OODDataModule
from lightning_methods import SelectiveOODModule
from lightning_methods.nets import MLP
from lightning_methods.selective_ood import (
    bayes_reject,
    budget_threshold,
    density_ratio,
    energy_score,
    estimate_inlier_share,
    fit_mahalanobis,
    fit_tilt_slope,
    inlier_cdf,
    lagrangian_costs,
    mahalanobis_score,
    max_logit_score,
    msp_score,
    plugin_score,
    sirc_score,
    uniform_tilt,
)
from tests.helpers import cpu_trainer, ddp_trainer, run_cli

ROOT = Path(__file__).resolve().parents[2]


def _adam(lr=3e-3):
    return functools.partial(torch.optim.Adam, lr=lr)  # picklable, for ddp_spawn


def _module(estimator="black_box", hidden=(16,), **kwargs):
    return SelectiveOODModule(MLP(2, 3, hidden_sizes=list(hidden)), 3, estimator=estimator, optimizer=_adam(), **kwargs)


def _gaussian(n=900, **kwargs):
    return OODDataModule(source="gaussian", num_samples=n, batch_size=64, **kwargs)


# -- the rule --------------------------------------------------------------------------------------------------------
def test_rule_reduces_to_chow_without_ood_cost():
    g = torch.Generator().manual_seed(0)
    m, rho = torch.rand(200, generator=g), torch.rand(200, generator=g) * 5
    # Eq. 5 with c_out = 0: reject iff (1 - c_in)(1 - maxP) > c_in, Chow's threshold on the max-softmax
    for c_in in (0.1, 0.3):
        assert torch.equal(bayes_reject(m, rho, c_in, 0.0), 1 - m > c_in / (1 - c_in))
    # the budgeted score at c_fn = 0 on an inlier-only stream is 1 - maxP exactly: rejecting its top b is Chow
    torch.testing.assert_close(plugin_score(m, rho, c_fn=0.0, inlier_share=1.0), 1 - m)
    # hand case: with OOD in the stream, a budget on the mixture is spent where rho is small, even at c_fn = 0
    s = plugin_score(torch.tensor([0.6, 0.6]), torch.tensor([0.0, 3.0]), c_fn=0.0, inlier_share=0.5)
    torch.testing.assert_close(s, torch.tensor([0.4 / 0.5, 0.4 / 2.0]))


def test_rule_reduces_to_density_ratio_when_inlier_error_vanishes():
    g = torch.Generator().manual_seed(1)
    m, rho = torch.rand(200, generator=g), torch.rand(200, generator=g) * 4
    # Eq. 5 with c_in + c_out = 1: reject iff c_out * rho > c_in
    assert torch.equal(bayes_reject(m, rho, 0.4, 0.6), 0.6 * rho > 0.4)
    # no inlier error term (a perfect classifier, or c_fn = 1): S is increasing in rho alone. Hand values:
    torch.testing.assert_close(plugin_score(torch.ones(3), torch.tensor([0.0, 1.0, 3.0]), 0.5, 0.5),
                               torch.tensor([0.0, 0.5, 0.75]))
    torch.testing.assert_close(plugin_score(torch.tensor([0.2, 0.9, 0.5]), torch.tensor([0.0, 1.0, 3.0]), 1.0, 0.5),
                               torch.tensor([0.0, 1.0, 1.5]))
    s = plugin_score(m, rho, c_fn=1.0, inlier_share=0.7)
    assert torch.equal(s.argsort(), rho.argsort())


def test_plugin_score_hand_case_and_infinite_ratio():
    s = plugin_score(torch.tensor([0.8, 0.8]), torch.tensor([2.0, math.inf]), c_fn=0.5, inlier_share=0.7)
    # (0.5 * 0.2 + 0.5 * 2) / (0.7 + 0.3 * 2) = 1.1 / 1.3; rho -> inf: c_fn / (1 - pi) = 0.5 / 0.3
    torch.testing.assert_close(s, torch.tensor([1.1 / 1.3, 0.5 / 0.3]))


def test_plugin_score_is_the_lagrangian_rule():
    """Thresholding S at the multiplier lam is Eq. 5 with Eq. 4's (c_in, c_out) for the budgeted problem."""
    g = torch.Generator().manual_seed(2)
    m, rho = torch.rand(500, generator=g), torch.rand(500, generator=g) * 3
    for c_fn, share, lam in [(0.5, 0.7, 0.3), (0.25, 0.9, 0.1), (0.75, 0.5, 0.6), (0.0, 0.8, 0.05)]:
        c_in, c_out = lagrangian_costs(c_fn, share, lam)
        assert torch.equal(plugin_score(m, rho, c_fn, share).double() > lam, bayes_reject(m.double(), rho.double(), c_in, c_out))


def test_budget_threshold_hand_cases():
    s = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    t = budget_threshold(s, 0.4)
    assert t == 3.0 and int((s > t).sum()) == 2
    assert budget_threshold(s, 0.0) == 5.0 and budget_threshold(s, 1.0) == float("-inf")
    # ties at the boundary: never more than floor(b N) rejected
    ties = torch.tensor([1.0, 1.0, 1.0, 0.0])
    assert int((ties > budget_threshold(ties, 0.5)).sum()) == 0
    assert int((torch.arange(100.0) > budget_threshold(torch.arange(100.0), 0.29)).sum()) == 29


def test_inlier_share_mle_recovers_the_mixture_share():
    g = torch.Generator().manual_seed(3)
    n, share = 4000, 0.7
    is_in = torch.rand(n, generator=g) < share
    x = torch.where(is_in, torch.randn(n, generator=g), 2.5 + torch.randn(n, generator=g))
    rho = torch.exp(-0.5 * (x - 2.5) ** 2 + 0.5 * x**2)  # N(2.5, 1) / N(0, 1)
    assert abs(estimate_inlier_share(rho) - is_in.float().mean().item()) < 0.03
    assert estimate_inlier_share(torch.zeros(10)) == 1.0  # no row looks OOD


def test_inlier_cdf_and_uniform_tilt():
    ref = torch.tensor([1.0, 2.0, 3.0])
    # (#below + #at-or-below + 1) / (2 (n + 1)): below all, tied with the middle, above all
    torch.testing.assert_close(inlier_cdf(torch.tensor([0.0, 2.0, 9.0]), ref),
                               torch.tensor([1 / 8, 4 / 8, 7 / 8], dtype=torch.float64))
    u = (torch.arange(100000, dtype=torch.float64) + 0.5) / 100000
    for a in (0.0, 0.5, 5.0, 50.0):
        assert uniform_tilt(u, a).mean().item() == pytest.approx(1.0, rel=1e-3)  # E_in[rho] = 1
    torch.testing.assert_close(uniform_tilt(torch.tensor([0.0, 1.0]), math.log(3.0)),
                               torch.tensor([math.log(3.0) / 2, 3 * math.log(3.0) / 2], dtype=torch.float64))


def test_tilt_fit_recovers_the_share_and_the_slope():
    g = torch.Generator().manual_seed(6)
    share, a = 0.7, 8.0
    n = 6000
    is_in = torch.rand(n, generator=g) < share
    # OOD u drawn from the tilt itself (inverse CDF of a e^{au} / (e^a - 1)), inliers uniform
    v = torch.rand(n, generator=g, dtype=torch.float64)
    u = torch.where(is_in, torch.rand(n, generator=g, dtype=torch.float64), torch.log1p(v * math.expm1(a)) / a)
    a_hat, share_hat = fit_tilt_slope(u, n_reference=10000)
    assert share_hat == pytest.approx(is_in.float().mean().item(), abs=0.03)
    assert a_hat == pytest.approx(a, rel=0.25)


def test_density_ratio_hand_case():
    # loss-based: exp(f) * n_in / n_wild = P_wild / P_in = pi_mix + (1 - pi_mix) rho, here n_in / n_wild = 2
    w_logit = torch.tensor([math.log(0.2), math.log(1.0), math.log(3.0)])
    rho = density_ratio(w_logit, 1.0, math.log(2.0), pi_mix=0.5)
    torch.testing.assert_close(rho, torch.tensor([0.0, 3.0, 11.0], dtype=torch.float64))


def test_sirc_hand_case():
    s = sirc_score(torch.tensor([0.9]), torch.tensor([-2.0]), a=1.0, b=0.5)  # S2 = 2
    torch.testing.assert_close(s, torch.tensor([0.1 * (1 + math.exp(-0.5))]))
    assert torch.isfinite(sirc_score(torch.tensor([0.5]), torch.tensor([1e6]), a=0.0, b=1.0)).all()  # far OOD


def test_scores_match_pytorch_ood():
    pytorch_ood = pytest.importorskip("pytorch_ood.detector")
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(50, 4, generator=g) * 3
    torch.testing.assert_close(msp_score(logits), pytorch_ood.MaxSoftmax.score(logits))
    torch.testing.assert_close(max_logit_score(logits), pytorch_ood.MaxLogit.score(logits))
    torch.testing.assert_close(energy_score(logits), pytorch_ood.EnergyBased.score(logits))
    z, y = torch.randn(300, 5, generator=g), torch.randint(0, 3, (300,), generator=g)
    means, precision = fit_mahalanobis(z, y, 3, ridge=0.0)
    ref = pytorch_ood.Mahalanobis(None).fit_features(z, y)
    # pytorch-ood's covariance is not divided by N (see fit_mahalanobis): same ranking, scores N times smaller
    ours = mahalanobis_score(z, means, precision)
    torch.testing.assert_close(ours, 300 * ref.predict_features(z), rtol=1e-3, atol=1e-3)


# -- the module ------------------------------------------------------------------------------------------------------
def test_budget_is_met_on_the_test_mixture():
    dm = _gaussian()
    module = _module(ood_score="energy", rejection_budget=0.25)
    trainer = cpu_trainer(max_epochs=2)
    trainer.fit(module, dm)
    res = trainer.test(module, dm, verbose=False)[0]
    x, _, is_ood = dm.data["test"]
    n = len(x)
    assert math.floor(0.25 * n) - 1 <= round(res["test_rejection_rate"] * n) <= math.floor(0.25 * n)
    abstain = module.predict(x)["abstain"]
    assert abs(abstain.float().mean().item() - 0.25) <= 1 / n
    # on the inliers alone the rejection rate is something else: the budget is not on the inliers
    assert abs(abstain[~is_ood].float().mean().item() - 0.25) > 2 / n
    curves = module.curves["test"]
    assert len(curves["rejection_rate"]) == n and len(curves["inlier_risk"]) == int((~is_ood).sum())
    preds = trainer.predict(module, dm)
    assert set(preds[0]) == {"pred", "abstain", "score"} and preds[0]["abstain"].dtype == torch.bool


def test_loss_based_beats_msp_on_the_joint_risk():
    """Algorithm 1 on Gaussian inliers + confident OOD blobs: the plug-in's AUC-RC is far below Chow's (MSP)."""
    torch.manual_seed(0)
    dm = _gaussian(n=1500)
    module = _module("loss_based", hidden=(32, 32))
    trainer = cpu_trainer(max_epochs=6)
    trainer.fit(module, dm)
    lb = trainer.test(module, dm, verbose=False)[0]
    module.set_rule(estimator="msp").calibrate(datamodule=dm)
    msp = trainer.test(module, dm, verbose=False)[0]
    assert lb["test_scod_auc_rc"] < 0.6 * msp["test_scod_auc_rc"], (lb, msp)
    assert lb["test_scod_auroc"] > 0.9 > msp["test_scod_auroc"]
    # MSP is still the better inlier-only rejector (what Chow's rule is optimal for)
    assert msp["test_inlier_rc_aurc"] <= lb["test_inlier_rc_aurc"] + 0.01


def test_loss_based_corrects_the_odds_of_unbalanced_batches(tmp_path):
    dm = _gaussian(wild_per_inlier=2)
    module = _module("loss_based", save_path=str(tmp_path / "lb.ckpt"))
    cpu_trainer(max_epochs=1).fit(module, dm)
    assert module.seen_wild == pytest.approx(2 * module.seen_inliers)
    assert module.calibration["ratio_b"] == pytest.approx(math.log(0.5))
    # a checkpoint keeps the ratio: recalibrating without training steps does not fall back to balanced odds
    loaded = SelectiveOODModule.load_from_checkpoint(tmp_path / "lb.ckpt", model=MLP(2, 3, hidden_sizes=[16]))
    loaded.calibrate(datamodule=dm)
    assert loaded.calibration["ratio_b"] == pytest.approx(math.log(0.5))


@pytest.mark.parametrize("ood_score", ["mahalanobis", "feature_norm", "pytorch_ood:EnergyBased"])
def test_black_box_scores_calibrate(ood_score):
    if ood_score.startswith("pytorch_ood"):
        pytest.importorskip("pytorch_ood")
    dm = _gaussian(n=600)
    module = _module(ood_score=ood_score, embedding_layer="embedding")
    trainer = cpu_trainer(max_epochs=1)
    trainer.fit(module, dm)
    info = module.calibration
    assert module.calibrated and math.isfinite(info["threshold"]) and 0 < info["inlier_share"] <= 1
    if ood_score == "mahalanobis":
        assert module.maha_means.shape == (3, 16) and module.maha_precision.shape == (16, 16)
    res = trainer.test(module, dm, verbose=False)[0]
    assert 0 <= res["test_scod_auc_rc"] <= 1


def test_inlier_calibration_averages_one_on_heldout_inliers():
    dm = _gaussian(n=600)
    module = _module(ood_score="energy", ratio_calibration="inlier")
    cpu_trainer(max_epochs=1).fit(module, dm)
    sig = module._signals_of(dm.dataset("val"))
    assert module.rho(sig).mean().item() == pytest.approx(1.0, rel=1e-6)


def test_wild_calibration_and_wild_threshold():
    dm = _gaussian(n=600)
    module = _module(ood_score="mahalanobis", ratio_calibration="wild", threshold_split="wild")
    cpu_trainer(max_epochs=1).fit(module, dm)
    assert module.calibration["ratio_a"] > 0 and 0 <= module.calibration["pi_mix"] < 1
    wild = dm.data["wild"][0]
    assert abs(module.predict(wild)["abstain"].float().mean().item() - module.rejection_budget) <= 1 / len(wild)


def test_calibrate_without_a_trainer_and_given_share():
    module = _module(ood_score="energy", inlier_share=0.8)
    g = torch.Generator().manual_seed(5)
    inliers = TensorDataset(torch.randn(60, 2, generator=g), torch.randint(0, 3, (60,), generator=g))
    info = module.calibrate(train=inliers, heldout=inliers, threshold_data=TensorDataset(torch.randn(80, 2, generator=g)))
    assert info["inlier_share"] == 0.8
    with pytest.raises(ValueError, match="heldout"):
        _module(ood_score="energy").calibrate(train=inliers)


@pytest.mark.slow
def test_thresholds_under_ddp_equal_one_process(tmp_path):
    """Whole-split passes are gathered in dataset order: 2 processes calibrate exactly like 1."""
    results = []
    for make in (lambda: cpu_trainer(max_epochs=0), lambda: ddp_trainer(max_epochs=0)):
        torch.manual_seed(0)
        dm = _gaussian(n=601)  # odd split sizes: padding must not count twice
        module = _module(ood_score="mahalanobis")
        make().fit(module, dm)
        assert module.calibrated
        results.append((module.calibration, module.maha_means.clone(), module.maha_precision.clone(),
                        module.ratio_reference.clone()))
    (c1, m1, p1, r1), (c2, m2, p2, r2) = results
    torch.testing.assert_close(r1, r2)
    assert len(r1) == len(dm.dataset("val"))  # every held-out row exactly once
    for key in c1:
        assert c1[key] == pytest.approx(c2[key], rel=1e-5, abs=1e-6), key
    torch.testing.assert_close(m1, m2)
    torch.testing.assert_close(p1, p2, rtol=1e-4, atol=1e-4)


def test_checkpoint_and_resume_keep_thresholds(tmp_path):
    dm = _gaussian(n=600)
    module = _module("loss_based", save_path=str(tmp_path / "scod.ckpt"))
    trainer = cpu_trainer(max_epochs=2)
    trainer.fit(module, dm)
    x = dm.data["test"][0]
    expected = module.predict(x)
    # reload: threshold, pi_mix, inlier share and the odds counts come back without recalibrating
    loaded = SelectiveOODModule.load_from_checkpoint(tmp_path / "scod.ckpt", model=MLP(2, 3, hidden_sizes=[16]))
    assert loaded.calibrated and loaded.calibration == module.calibration
    assert loaded.odds_correction == module.odds_correction == 1.0
    got = loaded.predict(x)
    assert torch.equal(got["abstain"], expected["abstain"])
    torch.testing.assert_close(got["score"], expected["score"])
    # testing from the checkpoint restores the calibration instead of redoing it
    fresh = _module("loss_based")
    cpu_trainer().test(fresh, dm, ckpt_path=str(tmp_path / "scod.ckpt"), verbose=False)
    assert fresh.calibration == module.calibration
    # resuming restores the weights and the calibration, trains on and recalibrates
    resumed = _module("loss_based")
    cpu_trainer(max_epochs=3).fit(resumed, dm, ckpt_path=str(tmp_path / "scod.ckpt"))
    assert resumed.seen_inliers == pytest.approx(module.seen_inliers / 2)  # the third epoch's batches
    assert resumed.calibrated and resumed.calibration != module.calibration


def test_checkpoint_for_another_rule_is_not_applied(tmp_path):
    dm = _gaussian(n=600)
    module = _module(ood_score="energy", save_path=str(tmp_path / "bb.ckpt"))
    cpu_trainer(max_epochs=1).fit(module, dm)
    with pytest.warns(UserWarning, match="calibrated for"):
        other = SelectiveOODModule.load_from_checkpoint(tmp_path / "bb.ckpt", model=MLP(2, 3, hidden_sizes=[16]), c_fn=0.9)
    assert not other.calibrated


# -- errors before any step ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(c_fn=1.5), "c_fn"),
        (dict(c_fn=-0.1), "c_fn"),
        (dict(rejection_budget=1.2), "rejection_budget"),
        (dict(rejection_budget=-0.1), "rejection_budget"),
        (dict(inlier_share=0.0), "inlier_share"),
        (dict(estimator="plugin"), "estimator"),
        (dict(ood_score="odin"), "ood_score"),
        (dict(ood_score="mahalanobis", embedding_layer="embeding"), "embedding"),
        (dict(ratio_calibration="both"), "ratio_calibration"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _module(**kwargs)


def test_unknown_embedding_layer_names_close_ones():
    with pytest.raises(ValueError, match="Closest names.*embedding"):
        _module("loss_based", embedding_layer="embeding")


def test_loss_based_without_wild_set_fails_before_a_step():
    module = _module("loss_based")
    trainer = cpu_trainer(max_epochs=1)
    with pytest.raises(ValueError, match="wild set"):
        trainer.fit(module, _gaussian(n=600, wild_fraction=0.0))
    assert trainer.global_step == 0
    with pytest.raises(ValueError, match="wild set"):
        cpu_trainer(max_epochs=1).fit(_module(ratio_calibration="wild"), _gaussian(n=600, wild_fraction=0.0))


def test_set_rule_loss_based_needs_the_head():
    with pytest.raises(ValueError, match="wild head"):
        _module().set_rule(estimator="loss_based")


def test_uncalibrated_predict_is_a_clear_error():
    with pytest.raises(ValueError, match="not calibrated"):
        _module().predict(torch.zeros(2, 2))


# -- the CLI ---------------------------------------------------------------------------------------------------------
def test_gaussian_config_through_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = ROOT / "configs" / "selective_ood" / "gaussian_loss_based.yaml"
    cli = run_cli("fit", "--config", str(config), "--trainer.max_epochs=4", "--trainer.enable_progress_bar=false",
                  "--trainer.enable_model_summary=false", "--data.init_args.num_samples=1500")
    metrics = cli.trainer.callback_metrics
    assert abs(metrics["test_rejection_rate"].item() - 0.2) < 0.01
    assert metrics["test_scod_auroc"].item() > 0.9
    assert (tmp_path / "scod_gaussian.ckpt").is_file()
    loaded = SelectiveOODModule.load_from_checkpoint(tmp_path / "scod_gaussian.ckpt")
    assert loaded.calibrated and loaded.calibration == cli.model.calibration
