"""DPSGDFModule(grad_sample_mode="ghost") and max_physical_batch_size (issue 19 part 1): the clipped sum equals the
hooks mode's / the unsplit batch's (noise off), the accounting is the same, DDP and resume work, and layers ghost
clipping cannot handle are refused before training."""

from __future__ import annotations

import functools

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from datamodules import DigitsDataModule
from lightning_methods.dpsgd_f import DPSGDFModule
from lightning_methods.nets import MLP
from tests.helpers import cpu_trainer, ddp_trainer

SGD = functools.partial(torch.optim.SGD, lr=1.0)


class TokenNet(nn.Module):
    """Embedding -> mean over tokens -> LayerNorm -> Linear."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.norm(self.embed(x).mean(1)))


class ConvNet(nn.Module):
    """Conv2d -> ReLU -> LayerNorm -> Linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.norm = nn.LayerNorm([4, 6, 6])
        self.head = nn.Linear(144, 3)

    def forward(self, x):
        return self.head(self.norm(torch.relu(self.conv(x))).flatten(1))


def data(kind: str, n: int = 200):
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 20, (n, 6), generator=generator) if kind == "tokens" else torch.randn(n, 1, 8, 8, generator=generator)
    return TensorDataset(x, torch.randint(0, 3, (n,), generator=generator))


class _NoNoiseCapture(pl.Callback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        optimizer.noise_multiplier = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.size = len(batch[1])
        self.before = torch.cat([p.detach().flatten().clone() for p in pl_module.model.parameters()])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.update = self.before - torch.cat([p.detach().flatten() for p in pl_module.model.parameters()])


def one_step(net_cls, kind: str, steps: int = 1, **kwargs) -> tuple[torch.Tensor, DPSGDFModule, int]:
    """The update of the last of ``steps`` noise-free steps (the batches come from one debug seed)."""
    torch.manual_seed(0)
    m = DPSGDFModule(net_cls(), num_classes=3, target_epsilon=4.0, delta=1e-5, max_grad_norm=0.1, preprocess=False,
                     optimizer=SGD, insecure_debug_seed=3, **kwargs)  # the same Poisson batch in every mode
    capture = _NoNoiseCapture()
    cpu_trainer(max_steps=steps, num_sanity_val_steps=0, callbacks=[capture]).fit(
        m, train_dataloaders=DataLoader(data(kind), batch_size=40))
    return capture.update, m, capture.size


@pytest.mark.parametrize("net_cls, kind", [(TokenNet, "tokens"), (ConvNet, "images")])
def test_ghost_clipped_sum_equals_hooks(net_cls, kind):
    hooks, m_hooks, size = one_step(net_cls, kind, grad_sample_mode="hooks")
    ghost, m_ghost, size_ghost = one_step(net_cls, kind, grad_sample_mode="ghost")
    assert size == size_ghost > 20  # one and the same Poisson batch
    assert hooks.abs().max() > 1e-4  # the step did something
    assert torch.allclose(ghost, hooks, atol=1e-6, rtol=1e-5), (ghost - hooks).abs().max()
    assert m_ghost.privacy_ledger.history == m_hooks.privacy_ledger.history


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_micro_batches_give_the_unsplit_clipped_sum_and_the_same_accounting(mode):
    # two steps: the second one's clipped sum must not carry anything over from the first
    whole, m_whole, size = one_step(ConvNet, "images", steps=2, grad_sample_mode=mode)
    split, m_split, _ = one_step(ConvNet, "images", steps=2, grad_sample_mode=mode, max_physical_batch_size=7)
    assert size > 14  # at least three micro-batches
    assert torch.allclose(split, whole, atol=1e-6, rtol=1e-5), (split - whole).abs().max()
    assert m_split.privacy_ledger.steps == m_whole.privacy_ledger.steps == 2
    assert m_split.accounted_epsilon == m_whole.accounted_epsilon


def test_ghost_refuses_unsupported_layers_before_training():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(64))

        def forward(self, x):
            return x.flatten(1) * self.weight

    with pytest.raises(ValueError, match=r"(?s)`model.0` \(Scale\).*grad_sample_mode='hooks'"):
        DPSGDFModule(nn.Sequential(Scale(), nn.Linear(64, 10)), num_classes=10, target_epsilon=1.0, delta=1e-5,
                     max_grad_norm=1.0, grad_sample_mode="ghost")
    tied = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 10))
    tied[2].weight = tied[1].weight
    with pytest.raises(ValueError, match="tied weights"):
        DPSGDFModule(tied, num_classes=10, target_epsilon=1.0, delta=1e-5, max_grad_norm=1.0, grad_sample_mode="ghost")
    for bad in ({"grad_sample_mode": "fast"}, {"max_physical_batch_size": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            DPSGDFModule(MLP(in_features=64, num_classes=10, hidden_sizes=[]), num_classes=10, target_epsilon=1.0,
                         delta=1e-5, max_grad_norm=1.0, **bad)


class _ReplicaCheck(pl.Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        flat = torch.cat([p.detach().flatten() for p in pl_module.model.parameters()])
        gathered = pl_module.all_gather(flat)
        pl_module.log("replica_max_abs_diff", (gathered - gathered[0]).abs().max())


@pytest.mark.slow
def test_ghost_under_ddp_with_micro_batches_keeps_replicas_identical_and_the_epsilon():
    runs = {}
    for name, make in (("ddp", ddp_trainer), ("single", cpu_trainer)):
        pl.seed_everything(0)
        m = DPSGDFModule(MLP(in_features=64, num_classes=10, hidden_sizes=[32]), num_classes=10, target_epsilon=1.0,
                         delta=1e-5, max_grad_norm=1.0, optimizer=SGD, grad_sample_mode="ghost", max_physical_batch_size=32)
        trainer = make(max_epochs=2, limit_val_batches=0, num_sanity_val_steps=0, use_distributed_sampler=False,
                       callbacks=[_ReplicaCheck()])
        trainer.fit(m, DigitsDataModule(batch_size=128))
        runs[name] = (m, {k: float(v) for k, v in trainer.callback_metrics.items()})
    (ddp, ddp_metrics), (single, single_metrics) = runs["ddp"], runs["single"]
    assert ddp_metrics["replica_max_abs_diff"] == 0.0
    assert ddp.privacy_ledger.steps == single.privacy_ledger.steps == 20
    assert ddp_metrics["epsilon"] == pytest.approx(single_metrics["epsilon"], rel=1e-6) and ddp.epsilon <= 1.0


@pytest.mark.slow
def test_ghost_resume_continues_the_ledger(tmp_path):
    def run(ckpt_path=None, root="a"):
        pl.seed_everything(0)
        m = DPSGDFModule(MLP(in_features=64, num_classes=10, hidden_sizes=[]), num_classes=10, target_epsilon=1.0,
                         delta=1e-5, max_grad_norm=1.0, optimizer=SGD, grad_sample_mode="ghost")
        ckpt = ModelCheckpoint(dirpath=tmp_path / root, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
        trainer = cpu_trainer(max_epochs=2, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[ckpt],
                              enable_checkpointing=True)
        trainer.fit(m, DigitsDataModule(batch_size=128), ckpt_path=ckpt_path)
        return m

    full = run()
    resumed = run(tmp_path / "a" / "epoch=0.ckpt", root="b")
    assert resumed.privacy_ledger.history == full.privacy_ledger.history and resumed.epsilon == full.epsilon <= 1.0
    ckpt = torch.load(tmp_path / "a" / "epoch=0.ckpt", weights_only=True)
    assert torch.equal(resumed.preprocessor.mean, ckpt["state_dict"]["preprocessor.mean"])  # restored, not refitted


def test_ghost_with_micro_batches_takes_empty_poisson_batches():
    sizes = []

    class Sizes(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            sizes.append(len(batch[1]))

    m = DPSGDFModule(MLP(in_features=8, num_classes=3, hidden_sizes=[4]), num_classes=3, target_epsilon=50.0,
                     delta=1e-3, max_grad_norm=1.0, preprocess=False, noise_multiplier=1.0, grad_sample_mode="ghost",
                     max_physical_batch_size=1, optimizer=SGD, insecure_debug_seed=0)
    generator = torch.Generator().manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(100, 8, generator=generator), torch.randint(0, 3, (100,), generator=generator)),
                        batch_size=1)  # q = 0.01: about a third of the batches are empty
    cpu_trainer(max_steps=30, num_sanity_val_steps=0, callbacks=[Sizes()]).fit(m, train_dataloaders=loader)
    assert 0 in sizes and max(sizes) > 1 and m.privacy_ledger.steps == 30
    assert all(torch.isfinite(p).all() for p in m.model.parameters())
