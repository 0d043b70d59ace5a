"""The small backbones: output shapes, the named layers techniques hook, and argument errors."""

import pytest
import torch

from lightning_methods.nets import MLP, SmallCNN, SmallResNet


@pytest.mark.parametrize(
    ("net", "x", "layers"),
    [
        (MLP(64, 10, hidden_sizes=[32, 16]), torch.randn(3, 1, 8, 8), ["body.block0", "body.block1", "embedding", "head"]),
        (MLP(40, 10, hidden_sizes=[]), torch.randn(3, 40), ["embedding", "head"]),
        (SmallCNN(10, input_size=28), torch.randn(3, 1, 28, 28), ["body.block0", "body.block1", "fc", "embedding", "head"]),
        (SmallCNN(10, input_size=8), torch.randn(3, 1, 8, 8), ["body.block0", "embedding", "head"]),
        (SmallResNet(10, in_channels=1), torch.randn(3, 1, 28, 28), ["stages.0", "stages.2", "avgpool", "embedding", "head"]),
        (SmallResNet(5, in_channels=3, norm="group"), torch.randn(3, 3, 32, 32), ["stages.1", "embedding", "head"]),
    ],
    ids=["mlp", "linear", "cnn28", "cnn8", "resnet-bn", "resnet-gn"],
)
def test_forward_and_named_layers(net, x, layers):
    out = net(x)
    assert out.shape == (3, net.head.out_features)
    captured = {}
    handles = [net.get_submodule(name).register_forward_hook(lambda m, i, o, n=name: captured.setdefault(n, o)) for name in layers]
    net(x)
    for h in handles:
        h.remove()
    assert set(captured) == set(layers)
    # the embedding is exactly what the head reads
    torch.testing.assert_close(net.head(captured["embedding"]), out)
    assert captured["embedding"].shape == (3, net.embedding_dim)


def test_linear_model_embedding_is_the_input():
    net = MLP(40, 10, hidden_sizes=[])
    x = torch.randn(2, 40)
    torch.testing.assert_close(net.embedding(net.body(net.flatten(x))), x)


def test_no_batchnorm_by_default():
    for net in (MLP(64, 10), SmallCNN(10)):
        assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: SmallCNN(10, input_size=30), "divisible"),
        (lambda: MLP(0, 10), "in_features"),
        (lambda: MLP(64, 10, hidden_sizes=[0]), "hidden_sizes"),
        (lambda: MLP(64, 10, activation="swish"), "activation"),
        (lambda: MLP(64, 10, dropout=1.0), "dropout"),
        (lambda: SmallResNet(10, norm="instance"), "norm"),
    ],
)
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()
