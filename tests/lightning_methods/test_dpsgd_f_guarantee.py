"""DPSGDFModule: the guarantee in normal use (issue 13).

Secret noise (nothing saved or seedable regenerates it), fresh Poisson batches on resume and on a new fit, no public
sampling seed, refusals before any release (budget below the preprocessing cost, non-finite inputs, exact
standardisation, too few examples for the private radius), no non-private training statistics by default, and the
noise actually added measured against the ledger's multiplier in one process and under 2-process DDP.
"""

from __future__ import annotations

import math
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, TensorDataset

from callbacks import PrivacyBudget
from datamodules import CounterexampleDataModule, DigitsDataModule, PretrainedFeaturesDataModule, TabularDataModule
from datamodules._base import ArrayDataModule
from lightning_methods.dpsgd_f import (
    DPSGDFModule,
    PoissonDataLoader,
    clip_rows,
    histogram_counts,
    radius_grid,
    smallest_n_for_radius,
    unit_normalize,
)
from tests.helpers import cpu_trainer, ddp_trainer
from tests.lightning_methods.test_dpsgd_f import SGD, linear, module  # one set of builders for the DP tests


def quiet(**kwargs) -> pl.Trainer:
    return cpu_trainer(limit_val_batches=0, num_sanity_val_steps=0, **kwargs)


def flat_params(m: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in m.parameters()])


class _Batches(pl.Callback):
    """Records every training batch's inputs (rows identify examples)."""

    def __init__(self):
        self.batches: list[frozenset] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(frozenset(tuple(row.tolist()) for row in batch[0].flatten(1)))


# ---------------------------------------------------------------------------------------------------------------
# Bug 1: the noise is secret
# ---------------------------------------------------------------------------------------------------------------
def test_noise_is_not_fixed_by_seed_everything_and_nothing_saved_regenerates_it(tmp_path):
    runs = []
    for root in ("a", "b"):
        pl.seed_everything(0)  # the README example and every config do this
        m = module()
        ckpt = ModelCheckpoint(dirpath=tmp_path / root, filename="last")
        quiet(max_steps=2, callbacks=[ckpt], enable_checkpointing=True).fit(m, DigitsDataModule(batch_size=128))
        runs.append(m)
    # the same seed, the same data: different noise in the mean release and in the SGD steps
    assert not torch.allclose(runs[0].preprocessor.mean, runs[1].preprocessor.mean)
    assert not torch.allclose(flat_params(runs[0].model), flat_params(runs[1].model))
    # nothing in the checkpoint that could seed the noise: the ledger keeps accounting only, the hparams no seed
    ckpt = torch.load(tmp_path / "a" / "last.ckpt", weights_only=True)
    ledger = ckpt["state_dict"]["privacy_ledger._extra_state"]
    assert set(ledger) == {"version", "mechanism", "history", "noise_multiplier", "sample_rate", "planned_steps",
                           "private", "preprocessing_noise", "steps"}
    assert ledger["private"] is True
    assert ckpt["hyper_parameters"]["insecure_debug_seed"] is None
    assert not any("seed" in k for k in ckpt["hyper_parameters"] if k != "insecure_debug_seed")


def test_debug_seed_is_reproducible_and_marks_the_run_not_private(tmp_path):
    runs = []
    for root in ("a", "b"):
        torch.manual_seed(0)  # the same initial weights
        m = module(insecure_debug_seed=7)
        torch.manual_seed(int(root == "b"))  # the debug stream ignores torch's global RNG
        ckpt = ModelCheckpoint(dirpath=tmp_path / root, filename="last")
        with pytest.warns(UserWarning, match="NOT differentially private"):
            quiet(max_steps=2, callbacks=[ckpt], enable_checkpointing=True).fit(m, DigitsDataModule(batch_size=128))
        runs.append(m)
    assert torch.equal(runs[0].preprocessor.mean, runs[1].preprocessor.mean)
    assert torch.equal(flat_params(runs[0].model), flat_params(runs[1].model))
    assert runs[0].epsilon == math.inf and 0 < runs[0].accounted_epsilon < 1.0
    # the mark survives the checkpoint, even into a module built without the debug seed
    loaded = DPSGDFModule.load_from_checkpoint(tmp_path / "a" / "last.ckpt", model=linear(), insecure_debug_seed=None)
    assert not loaded.privacy_ledger.private and loaded.epsilon == math.inf
    with pytest.raises(TypeError, match="insecure_debug_seed"):
        module(insecure_debug_seed="0")


def test_secure_mode_uses_opacus_secure_noise_and_a_fresh_generator_each_step():
    pl.seed_everything(0)
    m = module(secure_mode=True, preprocess=False)
    generators = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            generators.append(pl_module._dp_optimizer.generator)

    quiet(max_steps=3, callbacks=[Spy()]).fit(m, DigitsDataModule(batch_size=128))
    assert m._dp_optimizer is not None and m._dp_optimizer.secure_mode
    assert len({id(g) for g in generators}) == 3 and m.epsilon < 1.0


# ---------------------------------------------------------------------------------------------------------------
# Bug 2: resume and a new fit draw fresh batches; the accounting continues
# ---------------------------------------------------------------------------------------------------------------
def test_mid_epoch_resume_draws_fresh_batches_and_continues_the_ledger(tmp_path):
    first = _Batches()
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1, filename="{step}")
    pl.seed_everything(0)
    full = module(preprocess=False)
    quiet(max_epochs=2, callbacks=[first, ckpt], enable_checkpointing=True).fit(full, DigitsDataModule(batch_size=128))
    second = _Batches()
    pl.seed_everything(0)
    resumed = module(preprocess=False)
    quiet(max_epochs=2, callbacks=[second]).fit(resumed, DigitsDataModule(batch_size=128), ckpt_path=tmp_path / "step=4.ckpt")
    assert second.batches  # it trained after resuming mid-epoch
    # every Poisson draw the ledger records is fresh: no batch of the resumed run replays one of the first run
    assert not set(second.batches) & set(first.batches)
    assert resumed.privacy_ledger.steps == full.privacy_ledger.steps and resumed.epsilon == full.epsilon <= 1.0


def test_new_fit_after_load_from_checkpoint_continues_the_accounting_with_fresh_batches(tmp_path):
    first = _Batches()
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="last")
    m = module(preprocess=False, noise_multiplier=3.0, target_epsilon=8.0)
    quiet(max_epochs=1, callbacks=[first, ckpt], enable_checkpointing=True).fit(m, DigitsDataModule(batch_size=128))
    eps_first = m.epsilon
    loaded = DPSGDFModule.load_from_checkpoint(tmp_path / "last.ckpt", model=linear())
    assert loaded.privacy_ledger.steps == 10 and loaded.epsilon == eps_first
    second = _Batches()
    quiet(max_epochs=1, callbacks=[second]).fit(loaded, DigitsDataModule(batch_size=128))
    assert loaded.privacy_ledger.steps == 20 and loaded.epsilon > eps_first  # the ledger continued, not restarted
    assert not set(second.batches) & set(first.batches)


# ---------------------------------------------------------------------------------------------------------------
# Bug 3: no public sampling seed
# ---------------------------------------------------------------------------------------------------------------
def test_poisson_loader_has_no_seed_default_and_draws_secret_batches():
    data = TensorDataset(torch.arange(500).float()[:, None], torch.zeros(500, dtype=torch.long))
    draws = []
    for _ in range(2):
        torch.manual_seed(0)
        loader = PoissonDataLoader.from_loader(DataLoader(data, batch_size=50))
        draws.append([tuple(b[0].flatten().tolist()) for b in loader])
    assert draws[0] != draws[1]
    with pytest.raises(TypeError):
        PoissonDataLoader.from_loader(DataLoader(data, batch_size=50), seed=0)  # the old public default is gone
    # an explicit generator is the caller's responsibility (and reproducible)
    same = [[tuple(b[0].flatten().tolist()) for b in PoissonDataLoader.from_loader(
        DataLoader(data, batch_size=50), generator=torch.Generator().manual_seed(3))] for _ in range(2)]
    assert same[0] == same[1]


# ---------------------------------------------------------------------------------------------------------------
# Bug 4 and 5, honest surfaces: refusals before any release
# ---------------------------------------------------------------------------------------------------------------
def _assert_nothing_released(m: DPSGDFModule) -> None:
    assert not bool(m.preprocessor.fitted) and m.privacy_ledger.history == [] and m.privacy_ledger.steps == 0
    assert m.releases == {}


def test_budget_below_the_preprocessing_cost_is_refused_before_any_release():
    m = module()
    cost = m.epsilon_at_start(1e-5)
    assert 0 < cost < 1.0
    with pytest.raises(ValueError, match=r"PrivacyBudget\(max_epsilon=0.05\)` is below"):
        quiet(max_epochs=1, callbacks=[PrivacyBudget(max_epsilon=0.05)]).fit(m, DigitsDataModule(batch_size=128))
    _assert_nothing_released(m)


class _Arrays(ArrayDataModule):
    num_classes = 10

    def __init__(self, x, y, **kwargs):
        super().__init__(batch_size=64, val_fraction=0.1, test_fraction=0.1, **kwargs)
        self._x, self._y = x, y

    @property
    def input_shape(self):
        return tuple(self._x.shape[1:])

    def load_arrays(self):
        return self._x, self._y


@pytest.mark.parametrize("preprocess", [True, False])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_are_refused_before_any_release(preprocess, bad):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1000, 8)).astype(np.float32)
    x[:, 0] += 3
    y = rng.integers(0, 10, 1000)
    x[:30, 3] = bad  # some of them land in the training split
    m = module(model=linear(8), preprocess=preprocess)
    with pytest.raises(ValueError, match="non-finite inputs"):
        quiet(max_epochs=1).fit(m, _Arrays(x, y))
    _assert_nothing_released(m)
    assert torch.isfinite(flat_params(m.model)).all()


def test_exact_standardisation_is_refused_and_the_private_setting_accepted():
    m = module(model=linear(30, 2), num_classes=2, preprocess=False)
    with pytest.raises(ValueError, match=r"standardize=False"):
        quiet(max_epochs=1).fit(m, TabularDataModule("breast_cancer", standardize=True))
    _assert_nothing_released(m)
    assert not TabularDataModule("breast_cancer", standardize=False).data_dependent_transform


def test_private_radius_refuses_training_sets_it_cannot_handle_naming_the_smallest_n():
    m = module(model=linear(10, 2), num_classes=2)
    _, z_radius = m._preprocessing_noise()
    smallest = smallest_n_for_radius(z_radius, 0.95)
    dm = CounterexampleDataModule(num_samples=200, batch_size=16)  # n = 140 training examples
    with pytest.raises(ValueError, match=rf"at least n={smallest} .* got n=140"):
        quiet(max_epochs=1).fit(m, dm)
    _assert_nothing_released(m)


def test_private_radius_does_not_collapse_at_the_smallest_supported_n():
    # simulated releases at epsilon 1 (z_radius ~ 31): at the smallest n the radius stays above the grid floor
    from lightning_methods.dpsgd_f import noisy_histogram, private_radius

    m = module()
    _, z = m._preprocessing_noise()
    n = smallest_n_for_radius(z, 0.95)
    norms = torch.rand(n, dtype=torch.float64) * 0.5 + 0.3
    edges = radius_grid(2.0)
    counts = histogram_counts(norms, edges)
    generator = torch.Generator().manual_seed(0)
    taus = np.array([private_radius(noisy_histogram(counts, z, generator), edges, n, 0.95, z) for _ in range(400)])
    assert np.mean(taus <= float(edges[1])) < 0.03, np.unique(taus, return_counts=True)


def test_training_statistics_are_not_logged_unless_asked():
    for opt_in in (False, True):
        pl.seed_everything(0)
        m = module(log_train_metrics=opt_in)
        trainer = cpu_trainer(max_epochs=1, limit_val_batches=2, num_sanity_val_steps=0, log_every_n_steps=1)
        trainer.fit(m, DigitsDataModule(batch_size=128))
        logged = set(trainer.callback_metrics) | set(trainer.progress_bar_metrics)
        assert "epsilon" in logged and "val_acc" in logged
        assert bool({"train_loss", "train_acc", "train_loss_step"} & logged) == opt_in, logged


# ---------------------------------------------------------------------------------------------------------------
# Issue 11: the user's objects are not modified
# ---------------------------------------------------------------------------------------------------------------
def test_datamodule_is_not_modified_during_or_after_fit():
    dm = DigitsDataModule(batch_size=128)
    dm.setup("fit")
    before = dict(vars(dm))
    seen = []

    class Look(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append("train_dataloader" in vars(trainer.datamodule))

    trainer = quiet(max_steps=2, callbacks=[Look()])
    trainer.fit(module(), dm)
    assert seen and not any(seen)  # the datamodule's method was never replaced
    assert isinstance(trainer.train_dataloader, PoissonDataLoader)
    # Lightning sets `trainer`; the datamodule's own setup() (called by the Trainer) rebuilds its three datasets
    rebuilt = {"trainer", "train_dataset", "val_dataset", "test_dataset"}
    after = {k: v for k, v in vars(dm).items() if k not in rebuilt}
    assert after.keys() == {k for k in before if k not in rebuilt}
    assert all(after[k] is before[k] for k in after), [k for k in after if after[k] is not before[k]]
    assert type(dm.train_dataloader()).__name__ == "DataLoader"
    assert "process_dataloader" not in vars(trainer.strategy)  # the strategy is unwrapped after fit


def test_pretrained_extractor_is_a_new_module_per_call():
    dm = PretrainedFeaturesDataModule(raw=True)
    a, b = dm.extractor(), dm.extractor()
    assert a is not b
    x = torch.rand(3, 1, 28, 28)
    expected = b(x)
    with torch.no_grad():
        next(a.parameters()).add_(1.0)  # a caller changing its copy
    assert torch.equal(dm.extractor()(x), expected) and torch.equal(b(x), expected)


# ---------------------------------------------------------------------------------------------------------------
# Bug 6: the noise actually added has the ledger's standard deviation
# ---------------------------------------------------------------------------------------------------------------
def clipped_sum(reference: nn.Module, params: dict, feats: torch.Tensor, y: torch.Tensor, clip: float) -> torch.Tensor:
    """Sum of per-example gradients clipped to ``clip`` (Opacus' factor ``min(1, C / (norm + 1e-6))``), flattened."""

    def loss(p, x, t):
        return F.cross_entropy(functional_call(reference, p, (x[None],)), t[None])

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, feats, y)
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values()))
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    return torch.cat([(g * factor.view(-1, *[1] * (g.ndim - 1))).sum(0).flatten() for g in grads.values()])


class _NoiseProbe(pl.Callback):
    """Per step: the applied update minus an independently computed clipped sum, in units of ``z C`` (all ranks)."""

    def __init__(self, d: int, c: int):
        self.d, self.c = d, c
        self.noise: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.x, self.y = batch[0].clone(), batch[1].clone()
        self.before = {k: v.detach().clone() for k, v in pl_module.model.named_parameters()}

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        reference = linear(self.d, self.c)
        feats = pl_module.features(self.x)
        with torch.enable_grad():
            local = clipped_sum(reference, self.before, feats, self.y, pl_module.max_grad_norm)
        total = trainer.strategy.reduce(local, reduce_op="sum")
        ledger = pl_module.privacy_ledger
        expected_batch = ledger.sample_rate * len(trainer.train_dataloader.dataset)
        update = torch.cat([(self.before[k] - v.detach()).flatten() for k, v in pl_module.model.named_parameters()])
        noise = update * expected_batch - total  # SGD with lr 1: update = (clipped sum + noise) / expected batch
        self.noise.append(noise / (ledger.noise_multiplier * pl_module.max_grad_norm))

    def on_train_epoch_end(self, trainer, pl_module):
        releases = pl_module.releases
        # the released mean: (sum of clipped unit-norm features + N(0, (z R)^2)) / n, recomputed exactly here
        x = torch.as_tensor(trainer.datamodule.splits["train"][0]).double()
        exact_sum = clip_rows(unit_normalize(x.flatten(1)), pl_module.feature_norm_bound).sum(0)
        z_mean, z_radius = pl_module.privacy_ledger.preprocessing_noise
        self.mean_noise = (releases["noisy_mean"] * len(x) - exact_sum) / (z_mean * pl_module.feature_norm_bound)
        feats = clip_rows(unit_normalize(x.flatten(1)), pl_module.feature_norm_bound)
        centre = pl_module.preprocessor.mean.double()
        counts = histogram_counts((feats - centre).norm(dim=1), radius_grid(2.0 * pl_module.feature_norm_bound))
        self.histogram_noise = (releases["noisy_histogram"] - counts) / z_radius
        steps = torch.cat(self.noise)
        pl_module.log_dict({
            "sgd_noise_std_ratio": steps.std(), "sgd_noise_draws": float(len(steps)),
            "mean_noise_std_ratio": self.mean_noise.std().float(),
        }, rank_zero_only=True)


def _std_tolerance(draws: int) -> float:
    """Four standard errors of a sample standard deviation of ``draws`` unit Gaussians (1 / sqrt(2 N))."""
    return 4.0 / math.sqrt(2 * draws)


D, C = 256, 2


@pytest.mark.slow
def test_noise_added_has_the_ledger_std_in_the_update_the_mean_and_the_histogram():
    sgd, mean, hist = [], [], []
    for _ in range(3):
        m = module(model=linear(D, C), num_classes=C, max_grad_norm=0.5)
        probe = _NoiseProbe(D, C)
        dm = CounterexampleDataModule(num_samples=2000, dim=D, batch_size=128)
        quiet(max_steps=4, callbacks=[probe]).fit(m, dm)
        sgd.append(torch.cat(probe.noise))
        mean.append(probe.mean_noise)
        hist.append(probe.histogram_noise)
    for name, values in (("sgd update", torch.cat(sgd)), ("mean", torch.cat(mean)), ("histogram", torch.cat(hist))):
        values = values.double()
        ratio = float(values.std())
        assert abs(ratio - 1) < _std_tolerance(len(values)), (name, ratio, len(values))
        assert abs(float(values.mean())) < 4 / math.sqrt(len(values)), (name, float(values.mean()))


@pytest.mark.slow
def test_noise_is_added_once_under_ddp():
    m = module(model=linear(D, C), num_classes=C, max_grad_norm=0.5)
    trainer = ddp_trainer(max_steps=4, limit_val_batches=0, num_sanity_val_steps=0, use_distributed_sampler=False,
                          callbacks=[_NoiseProbe(D, C)])
    trainer.fit(m, CounterexampleDataModule(num_samples=2000, dim=D, batch_size=128))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    draws = metrics["sgd_noise_draws"]
    assert draws == 4 * (D * C + C)
    # noise added on both ranks would give sqrt(2) = 1.41 here; none would give 0
    assert abs(metrics["sgd_noise_std_ratio"] - 1) < _std_tolerance(int(draws)), metrics
    assert abs(metrics["mean_noise_std_ratio"] - 1) < _std_tolerance(D), metrics


@pytest.mark.slow  # a fresh interpreter importing lightning and opacus: ~10 s
def test_the_callback_is_the_accounting_class_dpsgd_f_uses():
    # DPSGDFModule loads without callbacks/datamodules: tests/test_import_direction.py (a fresh interpreter)
    from lightning_methods._privacy import PrivacyBudget as Core

    assert PrivacyBudget is Core
