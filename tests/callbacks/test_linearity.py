"""LinearityCallback: the normalised interpolation deviation of layers (Chaudhry et al. 2022, arXiv 2210.16413)."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from callbacks import LinearityCallback
from callbacks.linearity import interpolation_deviation, plot_linearity
from datamodules import DigitsDataModule
from lightning_methods import ClassifierModule
from lightning_methods.nets import MLP
from tests.helpers import cpu_trainer


class Square(nn.Module):
    def forward(self, x):
        return x * x


class SquareNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.square = Square()

    def forward(self, x):
        return self.square(x)


def test_golden_value_for_a_square():
    """h(x) = x^2 on the points 0 and 2 mixed half-half: h(mix) = 1, mix of h = 2, so the numerator is 1; the
    endpoints deviate from their mean 2 by 2 each, so the denominator is 0.5 * 4 + 0.5 * 4 = 4: NL = 1/4."""
    x = torch.tensor([[0.0], [2.0]])
    sums = interpolation_deviation(
        SquareNet(), x, torch.tensor([[0.5, 0.5]]), torch.tensor([[0, 1]]), layers=["square"], output=False
    )
    num, den = sums["square"].tolist()
    assert (num, den) == (1.0, 4.0)
    # unequal weights 0.25 / 0.75: h(1.5) = 2.25, mix of h = 3 -> 0.5625; mean 3, spread .25*9 + .75*1 = 3
    sums = interpolation_deviation(
        SquareNet(), x, torch.tensor([[0.25, 0.75]]), torch.tensor([[0, 1]]), layers=["square"], output=False
    )
    assert sums["square"].tolist() == pytest.approx([0.5625, 3.0])


def test_zero_for_an_affine_network_positive_for_a_nonlinear_one():
    torch.manual_seed(0)
    x = torch.randn(200, 5)
    affine = nn.Sequential(nn.Linear(5, 8), nn.Linear(8, 3))
    values = LinearityCallback(["0", "1"], num_points=3, inputs=x, num_samples=200).measure(affine)
    assert values["0"] < 1e-10 and values["1"] < 1e-10 and values["logits"] < 1e-10
    assert values["probs"] > 1e-4  # the softmax itself is not affine
    relu = nn.Sequential(nn.Linear(5, 32), nn.ReLU(), nn.Linear(32, 3))
    values = LinearityCallback(["0", "1", "2"], inputs=x, num_samples=200).measure(relu)
    assert values["0"] < 1e-10  # the first Linear is still affine
    assert values["1"] > 0.05 and values["2"] > 0.05 and values["logits"] > 0.05


def _fit(callbacks, epochs=2, **kwargs):
    pl.seed_everything(0)
    module = ClassifierModule(MLP(64, 10, hidden_sizes=[32, 32]), 10)
    trainer = cpu_trainer(max_epochs=epochs, limit_train_batches=4, limit_val_batches=0, callbacks=callbacks, **kwargs)
    trainer.fit(module, DigitsDataModule(batch_size=32))
    return module, trainer


def test_callback_logs_every_n_epochs_and_keeps_history(tmp_path):
    cb = LinearityCallback(["body.block0", "model.body.block1"], every_n_epochs=2, num_samples=64)
    _, trainer = _fit([cb], epochs=4)
    assert [h["epoch"] for h in cb.history] == [0, 2, 4]
    assert [h["step"] for h in cb.history] == [0, 8, 16]
    for name in ("body.block0", "model.body.block1", "logits", "probs"):
        assert math.isfinite(float(trainer.callback_metrics[f"linearity/{name}"]))
        assert all(h[name] >= 0 for h in cb.history)
    fig = cb.plot(tmp_path / "linearity.png")
    assert (tmp_path / "linearity.png").stat().st_size > 1000
    assert len(fig.axes[0].lines) == 4
    fig2 = plot_linearity(cb.history, ["logits"], x="step")
    assert len(fig2.axes[0].lines) == 1


def test_every_n_train_steps():
    cb = LinearityCallback([], every_n_epochs=None, every_n_train_steps=3, num_samples=32, measure_at_start=False)
    _fit([cb], epochs=2)
    assert [h["step"] for h in cb.history] == [3, 6]
    assert cb.history[0]["epoch"] == pytest.approx(0.75)


def test_same_tuples_every_time_so_measurements_compare():
    x = torch.randn(50, 4)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    cb = LinearityCallback(["1"], inputs=x, num_samples=50)
    assert cb.measure(net) == cb.measure(net)
    assert LinearityCallback(["1"], inputs=x, num_samples=50, seed=1).measure(net) != cb.measure(net)


def test_clear_errors_before_training():
    with pytest.raises(TypeError, match=r"list of submodule names"):
        LinearityCallback("body.block0")
    with pytest.raises(ValueError, match="Nothing to measure"):
        LinearityCallback([], output=False)
    with pytest.raises(ValueError, match="num_points"):
        LinearityCallback(num_points=1)
    with pytest.raises(ValueError, match="every_n_epochs"):
        LinearityCallback(every_n_epochs=0)

    with pytest.raises(ValueError, match=r"'body.nope'.*Closest names: .*body.block0"):
        _fit([LinearityCallback(["body.nope"])])

    class TupleBlock(nn.Module):
        def forward(self, x):
            return x, x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.flat, self.pair, self.head = nn.Flatten(), TupleBlock(), nn.Linear(64, 10)
            self.unused = nn.Linear(64, 64)  # never called in forward

        def forward(self, x):
            return self.head(self.pair(self.flat(x))[0])

    steps = []

    class Spy(pl.Callback):
        def on_train_batch_start(self, *args):
            steps.append(1)

    with pytest.raises(ValueError, match=r"'unused'.*did not produce a tensor"):
        cpu_trainer(max_epochs=1, callbacks=[LinearityCallback(["unused"]), Spy()]).fit(
            ClassifierModule(Net(), 10), DigitsDataModule()
        )
    assert steps == []  # raised in on_fit_start, before any training step
    # a block returning a tuple (as HF blocks do) is measured on its first element, the hidden state
    nl = LinearityCallback(["pair"], inputs=torch.rand(16, 1, 8, 8), num_samples=8).measure(Net())
    assert math.isfinite(nl["pair"])
    with pytest.raises(ValueError, match=r"held-out inputs.*inputs="):
        LinearityCallback(["0"]).measure(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(TypeError, match=r"output=False"):
        LinearityCallback([], inputs=torch.randn(4, 3, 2), num_samples=4).measure(nn.Linear(2, 2))  # (N, 3, 2) out
