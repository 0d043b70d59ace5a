"""ResMem: residual math, exact memorization, the gain on MNIST-1D, DDP-gathered memory, checkpoints, errors.

Also runs configs/resmem/mnist1d.yaml through the CLI and reloads the checkpoint it writes (tests/test_configs.py
runs both resmem configs with tiny overrides).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from datamodules import DigitsDataModule, MNIST1DDataModule
from lightning_methods import ResMem
from lightning_methods._knn import faiss_available
from lightning_methods.nets import MLP
from lightning_methods.resmem import combine, resmem_weights, residuals
from tests.helpers import cpu_trainer, ddp_trainer, run_cli

ROOT = Path(__file__).resolve().parents[2]


def _adam(lr):
    return functools.partial(torch.optim.Adam, lr=lr)  # picklable, for ddp_spawn


def _toy(n=300, dim=8, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, dim, generator=g), torch.randint(0, classes, (n,), generator=g))


def _resmem(dim=8, classes=10, hidden=(32,), **kwargs):
    return ResMem(MLP(dim, classes, hidden_sizes=list(hidden)), num_classes=classes, **kwargs)


# -- the math ------------------------------------------------------------------------------------------------------
def test_residuals_hand_cases():
    logits = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]])
    y = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    r = residuals(y, logits, temperature=1.0)
    z = math.e**2 + 2
    torch.testing.assert_close(r, torch.tensor([[2 / 3, -1 / 3, -1 / 3], [-math.e**2 / z, 1 - 1 / z, -1 / z]]))
    # T = 2 halves the logits: softmax([1, 0, 0])
    z2 = math.e + 2
    torch.testing.assert_close(residuals(y[1:], logits[1:], 2.0), torch.tensor([[-math.e / z2, 1 - 1 / z2, -1 / z2]]))
    # regression: target minus prediction, temperature unused
    torch.testing.assert_close(residuals(torch.tensor([[3.0]]), torch.tensor([[1.0]]), 5.0, "regression"), torch.tensor([[2.0]]))


def test_weights_and_combination_hand_case():
    sq = torch.tensor([[0.0, 1.0, 4.0]])  # distances 0, 1, 2
    w = resmem_weights(sq, sigma=1.0)
    expected = torch.tensor([1.0, math.exp(-1), math.exp(-2)])
    torch.testing.assert_close(w[0], expected / expected.sum())
    torch.testing.assert_close(resmem_weights(sq, sigma=1e-6), torch.tensor([[1.0, 0.0, 0.0]]))
    base = torch.tensor([[0.5, 0.5]])
    r = torch.tensor([[[1.0, -1.0], [0.0, 0.0], [-1.0, 1.0]]])
    shift = (w[0, 0] - w[0, 2]).item()
    torch.testing.assert_close(combine(base, r, sq, 1.0), torch.tensor([[0.5 + shift, 0.5 - shift]]))


@pytest.mark.parametrize("k", [1, 5])
def test_tiny_sigma_reproduces_the_training_labels_exactly(k):
    data = _toy()
    resmem = _resmem(k=k, sigma=1e-6).eval()
    resmem.build_memory(data)
    scores = resmem.predict(data.tensors[0])
    assert torch.equal(scores.argmax(1), data.tensors[1])
    torch.testing.assert_close(scores, torch.eye(10)[data.tensors[1]], atol=1e-5, rtol=0)
    # and the memory holds what it should: integer labels and the model's logits, in dataset order
    assert torch.equal(resmem.memory_targets, data.tensors[1]) and not resmem.memory_targets.is_floating_point()
    torch.testing.assert_close(resmem.memory_outputs, resmem(data.tensors[0]))
    torch.testing.assert_close(resmem.memory_residuals, torch.eye(10)[data.tensors[1]] - resmem(data.tensors[0]).softmax(1))


def test_regression_memorizes_the_training_targets():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 4, generator=g)
    y = x.sum(1) + 0.3 * torch.randn(200, generator=g)
    resmem = ResMem(MLP(4, 1, hidden_sizes=[16]), task="regression", k=1, sigma=1e-6).eval()
    resmem.build_memory(TensorDataset(x, y))
    pred = resmem.predict(x)
    assert pred.shape == (200, 1)
    torch.testing.assert_close(pred[:, 0], y, atol=1e-5, rtol=0)


def test_torchvision_resnet_by_layer_name():
    torchvision = pytest.importorskip("torchvision")
    net = torchvision.models.resnet18(num_classes=4)
    resmem = ResMem(net, num_classes=4, embedding_layer="avgpool", k=1, sigma=1e-6).eval()
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(24, 3, 32, 32, generator=g), torch.randint(0, 4, (24,), generator=g))
    resmem.build_memory(data)
    assert resmem.memory_embeddings.shape == (24, 512)  # avgpool's (N, 512, 1, 1), flattened
    assert torch.equal(resmem.predict(data.tensors[0]).argmax(1), data.tensors[1])


@pytest.mark.skipif(not faiss_available(), reason="faiss not installed")
def test_faiss_backend_predicts_identically():
    data = _toy(500)
    resmem = _resmem(k=10, sigma=0.1).eval()
    resmem.build_memory(data)
    queries = torch.randn(100, 8)
    by_torch = resmem.predict(queries)
    resmem.knn_backend = "faiss"
    assert torch.equal(resmem.predict(queries), by_torch)


# -- tuning --------------------------------------------------------------------------------------------------------
def test_tune_scores_every_grid_point_and_keeps_the_best():
    resmem = _resmem(k=3).eval()
    resmem.build_memory(_toy(400))
    held_out = _toy(150, seed=1)
    result = resmem.tune(held_out, k=[1, 4, 16], sigma=[0.05, 0.5], temperature=[1.0, 3.0])
    assert len(result["results"]) == 12 and result["metric"] == "accuracy"
    x, y = held_out.tensors
    for point in result["results"]:  # each reported score is what predict gives with those settings
        resmem.k, resmem.sigma, resmem.temperature = point["k"], point["sigma"], point["temperature"]
        assert (resmem.predict(x).argmax(1) == y).float().mean().item() == pytest.approx(point["score"])
    best = max(result["results"], key=lambda p: p["score"])
    assert result["score"] == best["score"]
    resmem.tune(held_out, k=[1, 4, 16], sigma=[0.05, 0.5], temperature=[1.0, 3.0])
    assert (resmem.k, resmem.sigma, resmem.temperature) == (result["k"], result["sigma"], result["temperature"])
    assert result["base_score"] == pytest.approx((resmem(x).argmax(1) == y).float().mean().item())


def test_leave_one_out_tuning_never_uses_a_point_as_its_own_neighbour():
    # random labels: with itself as neighbour, k = 1 would score 100%; leave-one-out it is at chance level
    resmem = _resmem().eval()
    resmem.build_memory(_toy(400))
    result = resmem.tune(None, k=[1], sigma=[1e-6], temperature=[1.0])
    assert result["score"] < 0.3


# -- training, checkpoints, CLI ------------------------------------------------------------------------------------
@pytest.mark.slow  # > 3 s: outside the fast lane
def test_resmem_beats_its_base_model_on_mnist1d_and_reloads_identically(tmp_path, monkeypatch):
    pl.seed_everything(0)
    dm = MNIST1DDataModule(num_samples=4000, batch_size=128)
    resmem = ResMem(
        MLP(40, 10, hidden_sizes=[32, 32]), num_classes=10, tune_on_val=True,
        save_path=str(tmp_path / "resmem.ckpt"), optimizer=_adam(3e-3),
    )
    trainer = cpu_trainer(max_epochs=25)
    trainer.fit(resmem, dm)
    assert resmem.memory_size == len(dm.dataset("train"))
    metrics = trainer.test(resmem, dm, verbose=False)[0]
    # measured: base 0.463, ResMem 0.490 (seed 0)
    assert metrics["test_resmem_acc"] > metrics["test_acc"] + 0.01

    # the checkpoint holds the memory and the tuned (k, sigma, T): predictions are identical, nothing is rebuilt
    monkeypatch.setattr(ResMem, "embed", lambda *a, **k: pytest.fail("the memory was rebuilt"))
    loaded = ResMem.load_from_checkpoint(tmp_path / "resmem.ckpt", model=MLP(40, 10, hidden_sizes=[32, 32]), weights_only=True)
    assert (loaded.k, loaded.sigma, loaded.temperature) == (resmem.k, resmem.sigma, resmem.temperature)
    x = dm.dataset("test").x
    assert torch.equal(loaded.eval().predict(x), resmem.eval().predict(x))


def test_mnist1d_config_runs_and_its_checkpoint_reloads_without_the_backbone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = str(ROOT / "configs/resmem/mnist1d.yaml")
    tiny = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.enable_progress_bar=false",
            "--data.init_args.num_samples=1000", "--test_after_fit=false"]
    cli = run_cli("fit", "--config", config, *tiny)
    assert cli.model.has_memory and (tmp_path / "resmem_mnist1d.ckpt").is_file()
    loaded = ResMem.load_from_checkpoint(tmp_path / "resmem_mnist1d.ckpt")  # backbone rebuilt from the saved config
    x = cli.datamodule.dataset("test").x
    assert torch.equal(loaded.eval().predict(x), cli.model.eval().predict(x))
    predicted = run_cli("predict", "--config", config, *tiny[2:4], "--ckpt_path", "resmem_mnist1d.ckpt")
    assert predicted.trainer.state.finished


def test_a_checkpoint_written_before_the_memory_loads_without_one(tmp_path):
    dm = DigitsDataModule(batch_size=64)
    resmem = _resmem(64, hidden=(32,), k=5)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    cpu_trainer(max_epochs=1, enable_checkpointing=True, callbacks=[checkpoint]).fit(resmem, dm)
    assert resmem.has_memory  # built when training ended, after ModelCheckpoint saved
    stale = ResMem.load_from_checkpoint(checkpoint.last_model_path, model=MLP(64, 10, hidden_sizes=[32]))
    assert not stale.has_memory
    with pytest.raises(RuntimeError, match="no memory yet"):
        stale.predict(torch.zeros(2, 1, 8, 8))


class _SaveMemoryOnEveryRank(Callback):
    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_fit_end(self, trainer, pl_module):
        torch.save(pl_module.memory_embeddings.clone(), Path(self.directory) / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow  # > 3 s: outside the fast lane
def test_ddp_memory_equals_the_single_process_memory(tmp_path):
    """2 processes each embed half the training set; the all-gathered memory is the 1-process memory, on every rank."""
    torch.manual_seed(0)
    backbone = MLP(64, 10, hidden_sizes=[32])
    grid = {"k": [1, 5], "sigma": [0.05, 0.5], "temperature": [1.0, 2.0]}
    single, double = (
        ResMem(MLP(64, 10, hidden_sizes=[32]), num_classes=10, k=5, tune_on_val=True, tune_grid=grid) for _ in range(2)
    )
    single.model.load_state_dict(backbone.state_dict())
    double.model.load_state_dict(backbone.state_dict())
    dm = DigitsDataModule(batch_size=64, shuffle=False)
    # max_epochs=0: wrap a (here random) backbone as it is; the memory is built when fit starts
    cpu_trainer(max_epochs=0).fit(single, dm)
    ddp_trainer(max_epochs=0, callbacks=[_SaveMemoryOnEveryRank(str(tmp_path))]).fit(double, dm)

    n = len(dm.dataset("train"))
    assert single.memory_size == double.memory_size == n  # the state_dict came back from the spawned rank 0
    for name in ("memory_embeddings", "memory_outputs", "memory_targets"):
        a, b = getattr(single, name), getattr(double, name)
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)  # in dataset order...
        torch.testing.assert_close(_sorted_rows(a), _sorted_rows(b), atol=1e-6, rtol=1e-5)  # ...hence as sets
    for rank in (0, 1):  # every rank holds the full memory
        torch.testing.assert_close(torch.load(tmp_path / f"rank{rank}.pt"), single.memory_embeddings, atol=1e-6, rtol=1e-5)
    assert (double.k, double.sigma, double.temperature) == (single.k, single.sigma, single.temperature)


def _sorted_rows(t: torch.Tensor) -> torch.Tensor:
    rounded = (t.reshape(len(t), -1) * 1e4).round()
    for col in reversed(range(rounded.shape[1])):  # lexicographic row order, last key first (stable sorts)
        rounded = rounded[rounded[:, col].argsort(stable=True)]
    return rounded


def test_regression_fit_without_a_datamodule_memorizes_the_train_loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4, generator=g)
    y = (x**2).sum(1, keepdim=True)
    train = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    val = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=64)
    resmem = ResMem(MLP(4, 1, hidden_sizes=[16]), task="regression", k=1, sigma=1e-6, optimizer=_adam(1e-2))
    trainer = cpu_trainer(max_epochs=3)
    trainer.fit(resmem, train, val)
    assert resmem.memory_size == 256 and "train_loss" in trainer.callback_metrics
    metrics = trainer.validate(resmem, val, verbose=False)[0]
    # the validation points are training points: memorized exactly
    assert metrics["val_resmem_mse"] < 1e-8 < metrics["val_mse"]


# -- errors --------------------------------------------------------------------------------------------------------
def test_unknown_or_missing_embedding_layer():
    with pytest.raises(ValueError, match=r"`embedding_layer='embeding'`: MLP has no submodule.*'embedding'"):
        _resmem(embedding_layer="embeding")
    torchvision = pytest.importorskip("torchvision")
    resnet = torchvision.models.resnet18(num_classes=4)
    with pytest.raises(ValueError, match="has no `PENULTIMATE`.*'avgpool'"):
        ResMem(resnet, num_classes=4)
    with pytest.raises(ValueError, match="ResNet has no submodule of that name"):
        ResMem(resnet, num_classes=4, embedding_layer="embedding")


class _UnusedLayer(MLP):
    def __init__(self) -> None:
        super().__init__(64, 10, hidden_sizes=[16])
        self.unused = nn.Linear(16, 16)


def test_a_layer_that_forward_never_runs_fails_before_training():
    resmem = ResMem(_UnusedLayer(), num_classes=10, embedding_layer="unused")
    trainer = cpu_trainer(max_epochs=1)
    with pytest.raises(ValueError, match="did not produce a tensor"):
        trainer.fit(resmem, DigitsDataModule())
    assert trainer.global_step == 0


def test_predict_before_the_memory_exists():
    with pytest.raises(RuntimeError, match="no memory yet.*build_memory"):
        _resmem().predict(torch.randn(2, 8))
    with pytest.raises(RuntimeError, match="no memory yet"):
        _resmem().tune(_toy(10))


def test_k_larger_than_the_memory():
    with pytest.raises(ValueError, match=r"`k=50` is larger than the memory \(20 examples\)"):
        _resmem(k=50).build_memory(_toy(20))
    resmem = _resmem(k=5)
    resmem.build_memory(_toy(20))
    with pytest.raises(ValueError, match="`k=30` is larger than the memory"):
        resmem.tune(_toy(10, seed=1), k=[5, 30])
    with pytest.raises(ValueError, match="minus the query itself"):
        resmem.tune(None, k=[20])
    trainer = cpu_trainer(max_epochs=1)
    with pytest.raises(ValueError, match=r"`k=5000` is larger than the training set \(\d+ examples\)"):
        trainer.fit(_resmem(64, k=5000), DigitsDataModule())
    assert trainer.global_step == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, "`k`"),
        ({"sigma": 0.0}, "`sigma`"),
        ({"temperature": -1.0}, "`temperature`"),
        ({"task": "ranking"}, "`task`"),
        ({"knn_backend": "annoy"}, "`knn_backend`"),
        ({"block_size": 0}, "`block_size`"),
        ({"tune_grid": {"lr": [1.0]}}, "`tune_grid`"),
        ({"tune_grid": {"k": [2.5]}}, "integers"),
        ({"tune_grid": {"sigma": [0.1, -1.0]}}, "`sigma`"),
    ],
)
def test_bad_arguments_fail_in_init(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _resmem(**kwargs)


def test_other_configuration_errors(monkeypatch):
    with pytest.raises(ValueError, match="leave it unset with `task='regression'`"):
        ResMem(MLP(4, 1), num_classes=3, task="regression")
    with pytest.raises(ValueError, match="`num_classes` must be an integer"):
        ResMem(MLP(4, 3))
    monkeypatch.setattr("lightning_methods.resmem.faiss_available", lambda: False)
    with pytest.raises(ValueError, match="pip install faiss-cpu"):
        _resmem(knn_backend="faiss")
    with pytest.raises(ValueError, match=r"expected \(batch, num_classes=10\)"):
        ResMem(MLP(8, 5), num_classes=10).build_memory(_toy(20))

    class Stream(IterableDataset):
        def __iter__(self):
            yield from zip(torch.randn(4, 8), torch.zeros(4, dtype=torch.long))

    with pytest.raises(TypeError, match="map-style dataset"):
        _resmem().build_memory(Stream())


# -- held-out review (issue 18): what users hit -----------------------------------------------------------------------
def test_tuning_grid_is_checked_before_training_and_the_default_is_clipped(tmp_path):
    from datamodules import TabularDataModule

    steps = []

    class Spy(Callback):
        def on_train_batch_start(self, *args):
            steps.append(1)

    dm = TabularDataModule("iris")  # 90 training rows: a given k of 100 cannot be memorised
    module = ResMem(MLP(4, 3, hidden_sizes=[8]), num_classes=3, tune_on_val=True, tune_grid={"k": [5, 100]})
    with pytest.raises(ValueError, match=r"tune_grid\['k'\].*\[100\].*90 training examples"):
        cpu_trainer(max_epochs=1, callbacks=[Spy()]).fit(module, dm)
    assert steps == []
    # the default grid (k up to 50) is clipped to a 30-row memory and fit completes, writing save_path
    small = TabularDataModule("iris", val_fraction=0.4, test_fraction=0.4)
    module = ResMem(MLP(4, 3, hidden_sizes=[8]), num_classes=3, tune_on_val=True, save_path=str(tmp_path / "r.ckpt"))
    cpu_trainer(max_epochs=1).fit(module, small)
    assert module.memory_size == 30 and module.k <= 30 and (tmp_path / "r.ckpt").is_file()


def test_tuned_values_are_the_checkpoints_hyperparameters_and_explicit_overrides_win(tmp_path):
    dm = DigitsDataModule(batch_size=64)
    grid = {"k": [1, 7], "sigma": [0.013, 0.5], "temperature": [1.0, 3.0]}
    module = ResMem(MLP(64, 10, hidden_sizes=[32]), num_classes=10, k=20, tune_on_val=True, tune_grid=grid,
                    save_path=str(tmp_path / "r.ckpt"))
    cpu_trainer(max_epochs=1).fit(module, dm)
    tuned = (module.k, module.sigma, module.temperature)
    assert tuned != (20, 0.1, 1.0)
    stored = torch.load(tmp_path / "r.ckpt", weights_only=True)["hyper_parameters"]
    assert (stored["k"], stored["sigma"], stored["temperature"]) == tuned
    assert (module.hparams.k, module.hparams.sigma, module.hparams.temperature) == tuned
    loaded = ResMem.load_from_checkpoint(tmp_path / "r.ckpt", model=MLP(64, 10, hidden_sizes=[32]))
    assert (loaded.k, loaded.sigma, loaded.temperature) == tuned
    overridden = ResMem.load_from_checkpoint(tmp_path / "r.ckpt", model=MLP(64, 10, hidden_sizes=[32]), k=3)
    assert (overridden.k, overridden.sigma, overridden.temperature) == (3, *tuned[1:])


def test_a_second_fit_never_evaluates_against_the_previous_memory():
    dm = DigitsDataModule(batch_size=64)
    module = ResMem(MLP(64, 10, hidden_sizes=[32]), num_classes=10, k=5)
    cpu_trainer(max_epochs=1).fit(module, dm)
    assert module.has_memory
    during = []

    class Check(Callback):
        def on_validation_epoch_end(self, trainer, pl_module):
            during.append((pl_module.has_memory, "val_resmem_acc" in trainer.callback_metrics))

    cpu_trainer(max_epochs=2, callbacks=[Check()], num_sanity_val_steps=0).fit(module, dm)
    assert during == [(False, False), (False, False)]
    assert module.has_memory  # rebuilt from the new base model when training ended


def test_predict_runs_the_backbone_in_eval_mode():
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 10))
    module = ResMem(net, num_classes=10, embedding_layer="2", k=3)
    data = _toy()
    module.build_memory(data)
    module.train()
    x = data.tensors[0][:16]
    first, second = module.predict(x), module.predict(x)
    torch.testing.assert_close(first, second)  # no dropout noise
    assert module.model.training  # the caller's mode is restored


def test_sparse_residuals_keep_the_top_m_entries_and_shrink_the_memory():
    data = _toy(classes=10)
    dense = _resmem(k=5, sigma=0.2).eval()
    dense.build_memory(data)
    x = data.tensors[0][:50]
    full = dense.predict(x)
    dense_bytes = dense.memory_bytes
    r = dense.memory_residuals
    dense.sparsify(10)  # all C entries: the same predictions
    torch.testing.assert_close(dense.predict(x), full, atol=1e-6, rtol=0)
    sparse = _resmem(k=5, sigma=0.2).eval()
    sparse.model.load_state_dict(dense.model.state_dict())
    sparse.build_memory(data)
    sparse.sparsify(2)
    kept = sparse.memory_residuals
    assert ((kept != 0).sum(1) <= 2).all()
    top = r.abs().topk(2, dim=1).indices
    torch.testing.assert_close(kept.gather(1, top), r.gather(1, top))  # exactly the two largest entries
    emb_bytes = sparse.memory_embeddings.numel() * 4
    assert sparse.memory_bytes - emb_bytes < (dense_bytes - emb_bytes) / 2  # 2 values + 2 indices vs 10 logits + label
    with pytest.raises(RuntimeError, match="tune before"):
        sparse.tune(data)
    with pytest.raises(ValueError, match="residual_top_m"):
        _resmem(residual_top_m=11)
