"""DPSGDFModule: the private preprocessing math, Opacus accounting, clipping, DDP, resume, refusals.

The configs under configs/dpsgd_f/ run through tests/test_configs.py; the README example through tests/test_readme.py.
"""

from __future__ import annotations

import functools
import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset, WeightedRandomSampler

from datamodules import CounterexampleDataModule, DigitsDataModule, PretrainedFeaturesDataModule
from lightning_methods.dpsgd_f import (
    DPSGDFModule,
    FeaturePreprocessor,
    PoissonDataLoader,
    calibrate_noise_multiplier,
    clip_rows,
    histogram_counts,
    noisy_histogram,
    preprocessing_noise,
    private_mean,
    private_radius,
    radius_grid,
    unit_normalize,
    zcdp_rho,
)
from lightning_methods.nets import MLP
from tests.helpers import cpu_trainer, ddp_trainer

SGD = functools.partial(torch.optim.SGD, lr=1.0)


def linear(d: int = 64, c: int = 10) -> nn.Module:
    return MLP(in_features=d, num_classes=c, hidden_sizes=[])


def module(**kwargs) -> DPSGDFModule:
    args = dict(num_classes=10, target_epsilon=1.0, delta=1e-5, max_grad_norm=1.0, optimizer=SGD)
    args.update(kwargs)
    return DPSGDFModule(args.pop("model", None) or linear(), **args)


def flat_params(m: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in m.parameters()])


# ---------------------------------------------------------------------------------------------------------------
# The private preprocessing primitives
# ---------------------------------------------------------------------------------------------------------------
def test_private_mean_is_the_clipped_mean_without_noise():
    x = torch.randn(500, 8, dtype=torch.float64) * 3
    clipped = clip_rows(x, 2.0)
    assert clipped.norm(dim=1).max() <= 2.0 + 1e-9
    inside = x.norm(dim=1) <= 2.0
    assert torch.allclose(clipped[inside], x[inside])  # rows already inside the ball are untouched
    assert torch.allclose(private_mean(clipped.sum(0), 500, 2.0, 0.0), clipped.mean(0))


def test_private_mean_is_unbiased_with_noise_of_scale_z_R_over_n():
    torch.manual_seed(0)
    x = clip_rows(torch.randn(200, 5, dtype=torch.float64), 1.5)
    truth, z, R, n = x.mean(0), 3.0, 1.5, 200
    generator = torch.Generator().manual_seed(1)
    errors = torch.stack([private_mean(x.sum(0), n, R, z, generator) - truth for _ in range(4000)])  # (4000, 5)
    expected_std = z * R / n
    std = errors.std(0)
    assert torch.all((std / expected_std - 1).abs() < 0.05), std / expected_std  # 4000 draws: ~1.1% sd
    assert torch.all(errors.mean(0).abs() < 4 * expected_std / math.sqrt(4000))  # unbiased


def test_histogram_counts_and_noise_scale():
    edges = radius_grid(2.0)
    assert edges[0] == 0 and edges[-1] == 2.0 and torch.all(edges[1:] > edges[:-1])
    assert torch.allclose(edges[-1] / edges[-2], torch.tensor(math.sqrt(2.0), dtype=torch.float64))
    norms = torch.tensor([0.0, 1e-9, 0.5, 1.0, 1.999, 2.0, 3.0])  # 3.0 is beyond the grid: counted in the top bin
    counts = histogram_counts(norms, edges)
    assert counts.sum() == len(norms) and counts[-1] == 3  # [sqrt2, 2] holds 1.999, 2.0 and 3.0
    generator = torch.Generator().manual_seed(0)
    noisy = torch.stack([noisy_histogram(counts, 7.0, generator) for _ in range(3000)])
    assert torch.allclose(noisy.mean(0), counts, atol=4 * 7.0 / math.sqrt(3000))
    assert abs(float((noisy - counts).std()) / 7.0 - 1) < 0.02
    assert torch.equal(noisy_histogram(counts, 0.0), counts)


def test_private_radius_brackets_the_quantile_without_noise_and_is_close_with_noise():
    torch.manual_seed(0)
    norms = torch.rand(4000, dtype=torch.float64) * 0.6 + 0.05
    edges = radius_grid(2.0)
    counts = histogram_counts(norms, edges)
    for q in (0.5, 0.9, 0.95):
        true_q = float(torch.quantile(norms, q))
        tau = private_radius(counts, edges, len(norms), q)
        assert true_q <= tau < math.sqrt(2.0) * true_q + 1e-12  # the grid point just above the quantile
    # with noise: within a grid step of the quantile in most draws, and never pushed to the top of the grid
    # (which would shrink every feature); n = 1258 and z = 61 are digits at epsilon = 0.5
    for n, z in ((4000, 31.0), (1258, 61.0)):
        sample = norms[:n]
        counts = histogram_counts(sample, edges)
        generator = torch.Generator().manual_seed(0)
        taus = np.array([private_radius(noisy_histogram(counts, z, generator), edges, n, 0.95, z) for _ in range(300)])
        q95, q60 = float(torch.quantile(sample, 0.95)), float(torch.quantile(sample, 0.6))
        assert np.mean((taus >= q60) & (taus <= math.sqrt(2.0) * q95 + 1e-12)) > 0.95, np.unique(taus, return_counts=True)
        assert np.all(taus < 2.0)


def test_feature_preprocessor_math_and_checkpoint_roundtrip():
    pre = FeaturePreprocessor()
    x = torch.randn(6, 1, 2, 2) * 5
    assert torch.allclose(pre(x).flatten(1).norm(dim=1), torch.ones(6))  # unfitted: unit normalisation only
    mean, radius = torch.full((4,), 0.3), 0.25
    pre.set(mean, radius)
    expected = clip_rows((unit_normalize(x.flatten(1)) - mean) / radius, 1.0).view_as(x)
    assert torch.allclose(pre(x), expected)
    fresh = FeaturePreprocessor()
    fresh.load_state_dict(pre.state_dict())  # the mean's size comes from the checkpoint
    assert torch.allclose(fresh(x), expected)
    with pytest.raises(ValueError, match="fitted on 4 features"):
        pre(torch.randn(2, 5))


def test_budget_split_is_in_zcdp():
    rho = zcdp_rho(1.0, 1e-5)
    assert math.isclose(rho + 2 * math.sqrt(rho * math.log(1e5)), 1.0)
    z_mean, z_radius = preprocessing_noise(1.0, 1e-5, 0.1, 0.75)
    assert math.isclose(1 / (2 * z_mean**2) + 1 / (2 * z_radius**2), 0.1 * rho)
    assert math.isclose((1 / z_mean**2) / (1 / z_mean**2 + 1 / z_radius**2), 0.75)


# ---------------------------------------------------------------------------------------------------------------
# Accounting against Opacus' own accountant
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preprocess", [False, True])
def test_epsilon_equals_opacus_accountant_plus_preprocessing(preprocess):
    from opacus.accountants import RDPAccountant
    from opacus.accountants.utils import get_noise_multiplier

    pl.seed_everything(0)
    m = module(preprocess=preprocess)
    trainer = cpu_trainer(max_epochs=2, limit_train_batches=5, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(m, DigitsDataModule(batch_size=64))
    n = 1258  # digits' training split
    q, z, steps = 1 / math.ceil(n / 64), m.noise_multiplier, 10
    assert m.privacy_ledger.steps == steps and math.isclose(m.privacy_ledger.sample_rate, q)
    accountant = RDPAccountant()
    if preprocess:  # the two Gaussian releases, recomputed here from the zCDP split
        rho = 0.1 * zcdp_rho(1.0, 1e-5)
        accountant.history += [(1 / math.sqrt(2 * 0.75 * rho), 1.0, 1), (1 / math.sqrt(2 * 0.25 * rho), 1.0, 1)]
    accountant.history.append((z, q, steps))
    assert m.epsilon == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-12)
    assert float(trainer.callback_metrics["epsilon"]) == pytest.approx(m.epsilon, rel=1e-6)
    assert 0.99 <= m.epsilon <= 1.0  # calibrated to the composed total
    if not preprocess:  # same calibration as Opacus' get_noise_multiplier (its tolerance is 0.01 in epsilon)
        assert z == pytest.approx(get_noise_multiplier(target_epsilon=1.0, target_delta=1e-5, sample_rate=q, steps=steps), rel=0.02)


def test_calibration_composes_prior_releases_and_prv_is_tighter():
    z_alone = calibrate_noise_multiplier(2.0, 1e-5, 0.01, 1000)
    z_after = calibrate_noise_multiplier(2.0, 1e-5, 0.01, 1000, prior_history=[(5.0, 1.0, 1)])
    assert z_after > z_alone  # part of the budget is gone
    z_prv = calibrate_noise_multiplier(2.0, 1e-5, 0.01, 1000, mechanism="prv")
    assert z_prv < z_alone
    with pytest.raises(ValueError, match="preprocessing_budget_fraction"):
        calibrate_noise_multiplier(1.0, 1e-5, 0.01, 10, prior_history=[(0.5, 1.0, 1)])


# ---------------------------------------------------------------------------------------------------------------
# DP-SGD mechanics: per-sample clipping, Poisson sampling, empty batches
# ---------------------------------------------------------------------------------------------------------------
class _Capture(pl.Callback):
    """Records the batch and the weights around one step, with the DP noise switched off for that step.

    The ledger keeps the calibrated noise (a module refuses to step with noise 0: its epsilon would be infinite);
    only the optimizer's draw is zeroed, after the module seeded it, so the update is exactly the clipped sum.
    """

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        optimizer.noise_multiplier = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch = [t.clone() for t in batch]
        self.before = {k: v.detach().clone() for k, v in pl_module.model.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after = {k: v.detach().clone() for k, v in pl_module.model.named_parameters()}


def test_update_is_the_sum_of_per_example_clipped_gradients():
    pl.seed_everything(0)
    # a hidden layer so per-example gradients span several parameters; no noise so the update is exact
    m = module(model=MLP(in_features=64, num_classes=10, hidden_sizes=[16]), preprocess=False, max_grad_norm=0.05)
    capture = _Capture()
    trainer = cpu_trainer(max_steps=1, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[capture])
    trainer.fit(m, DigitsDataModule(batch_size=64))
    x, y = capture.batch
    assert 20 < len(y) < 110  # a Poisson batch around q n = 62.9
    reference = MLP(in_features=64, num_classes=10, hidden_sizes=[16])
    reference.load_state_dict({k: v for k, v in capture.before.items()})
    clipped_sum = {k: torch.zeros_like(v) for k, v in capture.before.items()}
    norms = []
    for i in range(len(y)):
        reference.zero_grad()
        nn.functional.cross_entropy(reference(x[i : i + 1]), y[i : i + 1]).backward()
        grads = {k: p.grad.clone() for k, p in reference.named_parameters()}
        norm = torch.sqrt(sum((g**2).sum() for g in grads.values()))
        norms.append(float(norm))
        for k, g in grads.items():
            clipped_sum[k] += g * min(1.0, 0.05 / (float(norm) + 1e-6))
    assert min(norms) > 0.05  # every example was actually clipped
    expected_batch = m.privacy_ledger.sample_rate * 1258
    for k in clipped_sum:
        update = capture.before[k] - capture.after[k]  # SGD, lr = 1
        assert torch.allclose(update, clipped_sum[k] / expected_batch, atol=1e-6), k
    # the clipped update's norm is bounded by (batch size * C) / expected batch size
    total = torch.sqrt(sum(((capture.before[k] - capture.after[k]) ** 2).sum() for k in clipped_sum))
    assert total <= len(y) * 0.05 / expected_batch + 1e-6


def test_poisson_loader_samples_each_example_independently_and_keeps_empty_batches():
    data = TensorDataset(torch.arange(1000).float()[:, None], torch.zeros(1000, dtype=torch.long))
    loader = PoissonDataLoader.from_loader(DataLoader(data, batch_size=50, shuffle=True))
    assert loader.sample_rate == pytest.approx(1 / 20) and len(loader) == 20
    sizes = [len(b[1]) for b in loader]
    assert len(sizes) == 20 and abs(np.mean(sizes) - 50) < 3 * math.sqrt(50 * 0.95 / 20)
    # two DDP ranks: disjoint shards, same number of steps
    ranks = [PoissonDataLoader.from_loader(DataLoader(data, batch_size=50), rank=r, world_size=2) for r in (0, 1)]
    seen = [torch.cat([b[0].flatten() for b in r]).long() % 2 for r in ranks]
    assert torch.all(seen[0] == 0) and torch.all(seen[1] == 1) and len(ranks[0]) == len(ranks[1]) == 20
    tiny = PoissonDataLoader(data, sample_rate=1e-4, steps=5)
    batches = list(tiny)
    assert len(batches) == 5 and all(b[0].shape[1:] == (1,) for b in batches)
    assert sum(len(b[1]) for b in batches) < 5  # mostly empty batches, still yielded


# ---------------------------------------------------------------------------------------------------------------
# The claim: centring and rescaling rescue DP-SGD where the max norm dwarfs the diameter
# ---------------------------------------------------------------------------------------------------------------
def test_dpsgd_f_beats_dpsgd_on_the_counterexample():
    accuracy = {}
    for preprocess in (False, True):
        pl.seed_everything(0)
        dm = CounterexampleDataModule(num_samples=3000, batch_size=128)
        m = module(model=linear(10, 2), num_classes=2, preprocess=preprocess)
        trainer = cpu_trainer(max_epochs=6, limit_val_batches=0, num_sanity_val_steps=0)
        trainer.fit(m, dm)
        accuracy[preprocess] = trainer.test(m, dm, verbose=False)[0]["test_acc"]
        assert m.epsilon <= 1.0
    assert accuracy[True] > 0.95 and accuracy[True] > accuracy[False] + 0.1, accuracy


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: resume, load_from_checkpoint, export
# ---------------------------------------------------------------------------------------------------------------
def test_resume_continues_the_ledger_and_stops_at_the_budget(tmp_path):
    def run(max_epochs, ckpt_path=None, root="a"):
        pl.seed_everything(0)
        m = module()
        checkpoint = ModelCheckpoint(dirpath=tmp_path / root, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
        trainer = cpu_trainer(max_epochs=max_epochs, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[checkpoint],
                              enable_checkpointing=True)
        trainer.fit(m, DigitsDataModule(batch_size=128), ckpt_path=ckpt_path)
        return m

    full = run(3)
    resumed = run(3, ckpt_path=tmp_path / "a" / "epoch=0.ckpt", root="b")
    # the ledger continues: same noise multiplier and sample rate, same steps, so the same epsilon (the noise and the
    # batches themselves are fresh secret draws, so the weights differ)
    assert resumed.epsilon == full.epsilon and resumed.privacy_ledger.history == full.privacy_ledger.history
    assert not torch.equal(flat_params(resumed), flat_params(full))
    ckpt = torch.load(tmp_path / "a" / "epoch=0.ckpt", weights_only=True)
    assert torch.equal(resumed.preprocessor.mean, ckpt["state_dict"]["preprocessor.mean"])  # not refitted
    # resuming with more epochs than planned: stops at the budget instead of exceeding it
    longer = run(6, ckpt_path=tmp_path / "a" / "epoch=2.ckpt", root="c")
    assert longer.epsilon <= 1.0 and full.privacy_ledger.steps <= longer.privacy_ledger.steps < full.privacy_ledger.steps + 3

    # load_from_checkpoint restores the transform and the ledger; export() runs raw inputs without Lightning
    loaded = DPSGDFModule.load_from_checkpoint(tmp_path / "a" / "epoch=2.ckpt", model=linear())
    assert loaded.epsilon == full.epsilon and bool(loaded.preprocessor.fitted)
    x = torch.rand(5, 1, 8, 8)
    assert torch.allclose(loaded(x), full.eval()(x)) and torch.allclose(loaded.export()(x), loaded(x))


# ---------------------------------------------------------------------------------------------------------------
# DDP: replicas identical, same epsilon as one process
# ---------------------------------------------------------------------------------------------------------------
class _ReplicaCheck(pl.Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        gathered = pl_module.all_gather(flat_params(pl_module.model))
        diff = (gathered - gathered[0]).abs().max() if gathered.ndim == 2 else torch.zeros(())
        pl_module.log("replica_max_abs_diff", diff)


@pytest.mark.slow
def test_ddp_keeps_replicas_identical_and_the_single_process_epsilon():
    runs = {}
    for name, make_trainer in (("ddp", ddp_trainer), ("single", cpu_trainer)):
        pl.seed_everything(0)
        m = module(insecure_debug_seed=0)  # the same (not private) noise in both runs, to compare the releases
        trainer = make_trainer(max_epochs=2, limit_val_batches=0, num_sanity_val_steps=0, use_distributed_sampler=False,
                               callbacks=[_ReplicaCheck()])
        trainer.fit(m, DigitsDataModule(batch_size=128))
        runs[name] = (m, {k: float(v) for k, v in trainer.callback_metrics.items()})
    (ddp_module, ddp_metrics), (single_module, single_metrics) = runs["ddp"], runs["single"]
    assert ddp_metrics["replica_max_abs_diff"] == 0.0  # bit-identical replicas
    assert ddp_metrics["epsilon"] == single_metrics["epsilon"] == math.inf  # the debug seed: marked not private
    # ddp_spawn hands the trained state back: weights, fitted preprocessing and the privacy ledger
    assert ddp_module.privacy_ledger.steps == single_module.privacy_ledger.steps == 2 * 10
    assert ddp_module.accounted_epsilon == pytest.approx(single_module.accounted_epsilon, rel=1e-12)
    assert ddp_module.accounted_epsilon <= 1.0
    assert not ddp_module.privacy_ledger.private
    assert bool(ddp_module.preprocessor.fitted)
    # same debug seed: the preprocessing noise is identical (drawn on rank 0 only); the statistics are sums over the
    # same examples
    assert torch.allclose(ddp_module.preprocessor.mean, single_module.preprocessor.mean, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Frozen feature extractor
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_frozen_extractor_matches_precomputed_features():
    features = PretrainedFeaturesDataModule(batch_size=128)
    raw = PretrainedFeaturesDataModule(batch_size=128, raw=True)
    extractor = raw.extractor()
    results = []
    for dm, kwargs in ((features, {}), (raw, {"feature_extractor": extractor})):
        pl.seed_everything(0)
        m = module(model=linear(64), insecure_debug_seed=0, **kwargs)  # same batches and noise in both runs
        trainer = cpu_trainer(max_steps=3, limit_val_batches=0, num_sanity_val_steps=0)
        trainer.fit(m, dm)
        results.append(m)
    on_features, on_raw = results
    assert all(not p.requires_grad for p in extractor.parameters()) and not on_raw.feature_extractor.training
    assert torch.allclose(on_raw.preprocessor.mean, on_features.preprocessor.mean, atol=1e-5)
    assert torch.equal(on_raw.preprocessor.radius, on_features.preprocessor.radius)
    assert torch.allclose(flat_params(on_raw.model), flat_params(on_features.model), atol=1e-5)
    raw.setup()
    x = raw.splits["test"][0][:4]
    assert torch.allclose(on_raw(x), on_features(extractor(x)), atol=1e-5)  # inference on raw images: one call
    # evaluation through the Trainer on raw images (the shape check probes extractor + transform + model)
    tested = cpu_trainer(limit_test_batches=2).test(on_raw, raw, verbose=False)[0]["test_acc"]
    x, y = raw.splits["test"][0][:256], raw.splits["test"][1][:256]
    assert tested == pytest.approx(float((on_raw(x).argmax(1) == y).float().mean()), abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Refusals, before any step
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "trainer_kwargs, match",
    [({"accumulate_grad_batches": 2}, "accumulate_grad_batches=2"), ({"gradient_clip_val": 1.0}, "gradient_clip_val=1.0")],
)
def test_refuses_trainer_settings_that_void_the_guarantee(trainer_kwargs, match):
    m = module()
    with pytest.raises(ValueError, match=match):
        cpu_trainer(max_epochs=1, **trainer_kwargs).fit(m, DigitsDataModule())
    assert m.privacy_ledger.steps == 0


def test_refuses_layers_without_per_example_gradients_naming_them():
    bad = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8), nn.Linear(8, 10))
    with pytest.raises(ValueError, match=r"`model.2` \(BatchNorm1d\).*GroupNorm"):
        module(model=bad)
    with pytest.raises(ValueError, match=r"`model.body.block0.1` \(BatchNorm1d\)"):
        module(model=MLP(in_features=64, num_classes=10, hidden_sizes=[8], norm="batch"))

    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(8, 8)
            self.head = nn.Linear(8, 10)

    with pytest.raises(ValueError, match=r"`model.lstm` \(LSTM\): use `opacus.layers.DPLSTM`"):
        module(model=Recurrent())


def test_refuses_loaders_that_break_poisson_sampling_and_large_delta():
    data = TensorDataset(torch.rand(100, 1, 8, 8), torch.randint(0, 10, (100,)))
    weighted = DataLoader(data, batch_size=10, sampler=WeightedRandomSampler(torch.ones(100), 100))
    with pytest.raises(ValueError, match="custom `WeightedRandomSampler`"):
        PoissonDataLoader.from_loader(weighted)

    class Stream(IterableDataset):
        def __iter__(self):
            yield from data

    with pytest.raises(ValueError, match="IterableDataset"):
        PoissonDataLoader.from_loader(DataLoader(Stream(), batch_size=10))
    with pytest.raises(ValueError, match=r"delta=0.02` is not below 1/n"):
        PoissonDataLoader.from_loader(DataLoader(data, batch_size=10), delta=0.02)
    # through fit: delta >= 1/n (digits has n = 1258) and a plain loader passed without a datamodule
    with pytest.raises(ValueError, match="not below 1/n"):
        cpu_trainer(max_epochs=1).fit(module(delta=1e-3), DigitsDataModule())
    # a plain loader passed to fit is Poisson-sampled too (q = 1 / len(loader))
    m = module(preprocess=False)
    trainer = cpu_trainer(max_steps=2, num_sanity_val_steps=0)
    trainer.fit(m, train_dataloaders=DataLoader(data, batch_size=10))
    assert isinstance(trainer.train_dataloader, PoissonDataLoader) and m.privacy_ledger.sample_rate == pytest.approx(0.1)
    # Lightning's DistributedSampler injection (use_distributed_sampler=True under DDP) re-instantiates the batch
    # sampler through this utility: the Poisson sampler refuses, naming the Trainer flag
    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data import DistributedSampler

    poisson = PoissonDataLoader.from_loader(DataLoader(data, batch_size=10))
    with pytest.raises(ValueError, match=r"use_distributed_sampler=False"):
        _update_dataloader(poisson, DistributedSampler(data, num_replicas=2, rank=0))
    # the Poisson loader itself is accepted without a datamodule on one device
    m = module(preprocess=False)
    cpu_trainer(max_steps=2, num_sanity_val_steps=0).fit(m, train_dataloaders=PoissonDataLoader.from_loader(
        DataLoader(data, batch_size=10), delta=1e-5))
    assert m.privacy_ledger.steps == 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"target_epsilon": 0.0}, "target_epsilon"),
        ({"delta": 1.0}, "delta"),
        ({"max_grad_norm": -1.0}, "max_grad_norm"),
        ({"preprocessing_budget_fraction": 1.0}, "preprocessing_budget_fraction"),
        ({"radius_quantile": 0.0}, "radius_quantile"),
        ({"accountant": "gdp"}, "accountant"),
        ({"feature_extractor": "resnet"}, "feature_extractor"),
    ],
)
def test_refuses_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        module(**kwargs)


def test_refuses_unbounded_training_without_fixed_noise():
    with pytest.raises(ValueError, match="max_epochs"):
        cpu_trainer(max_epochs=-1, num_sanity_val_steps=0).fit(module(), DigitsDataModule())
