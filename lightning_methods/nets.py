"""Small backbones for configs, tests and benchmarks.

Every network here ends in the same two named submodules so that techniques reading a representation
(ResMem, linearity probes, deferral, SCOD) can hook it by name, as they would a torchvision model's ``avgpool``:

* ``embedding``: an ``nn.Identity`` whose output is the penultimate (pre-logit) representation;
* ``head``: the final ``nn.Linear`` producing logits.

Intermediate blocks are named too (``body.block0``, ``body.block1``, ...; ``stages.0`` for the ResNet), and
``PENULTIMATE`` names the embedding layer. None of them uses BatchNorm unless asked (``norm="batch"``), so they
work with Opacus' per-sample gradients out of the box.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

__all__ = ["MLP", "SmallCNN", "SmallResNet"]

Norm = Literal["none", "batch", "group", "layer"]
Activation = Literal["relu", "gelu", "tanh", "silu"]

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


def _activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"`activation` must be one of {sorted(_ACTIVATIONS)}, got {name!r}.")
    return _ACTIVATIONS[name]()


def _norm2d(norm: str, channels: int) -> nn.Module:
    if norm == "none":
        return nn.Identity()
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(min(8, channels), channels)
    raise ValueError(f"`norm` must be one of 'none', 'batch', 'group' for conv nets, got {norm!r}.")


def _positive_ints(name: str, values: Sequence[int], allow_empty: bool = True) -> list[int]:
    values = list(values)
    if (not values and not allow_empty) or any(not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"`{name}` must be a list of positive integers, got {values!r}.")
    return values


class MLP(nn.Module):
    """Multi-layer perceptron on flattened inputs.

    Layers: ``flatten`` -> ``body.block{i}`` (Linear, norm, activation, dropout) -> ``embedding`` -> ``head``.
    ``hidden_sizes=[]`` gives a linear (softmax-regression) model whose embedding is the flattened input.

    Args:
        in_features: size of one flattened input (the CLI links it from the datamodule's ``in_features``).
        num_classes: number of output logits.
        hidden_sizes: width of each hidden block.
        activation: nonlinearity of the hidden blocks.
        dropout: dropout probability after each hidden activation.
        norm: ``"layer"`` adds LayerNorm before each activation; ``"batch"`` BatchNorm1d (not Opacus-compatible).
        bias: whether linear layers have a bias.

    Example::

        >>> net = MLP(in_features=64, num_classes=10, hidden_sizes=[32])
        >>> net(torch.zeros(4, 1, 8, 8)).shape
        torch.Size([4, 10])
    """

    PENULTIMATE = "embedding"

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden_sizes: Sequence[int] = (256, 256),
        activation: Activation = "relu",
        dropout: float = 0.0,
        norm: Literal["none", "layer", "batch"] = "none",
        bias: bool = True,
    ) -> None:
        super().__init__()
        hidden_sizes = _positive_ints("hidden_sizes", hidden_sizes)
        if not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"`in_features` must be a positive integer, got {in_features!r}.")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"`num_classes` must be a positive integer, got {num_classes!r}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {dropout!r}.")
        self.in_features = in_features
        self.num_classes = num_classes
        self.flatten = nn.Flatten()
        blocks: OrderedDict[str, nn.Module] = OrderedDict()
        width = in_features
        for i, h in enumerate(hidden_sizes):
            layers: list[nn.Module] = [nn.Linear(width, h, bias=bias)]
            if norm == "layer":
                layers.append(nn.LayerNorm(h))
            elif norm == "batch":
                layers.append(nn.BatchNorm1d(h))
            elif norm != "none":
                raise ValueError(f"`norm` must be 'none', 'layer' or 'batch', got {norm!r}.")
            layers.append(_activation(activation))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            blocks[f"block{i}"] = nn.Sequential(*layers)
            width = h
        self.body = nn.Sequential(blocks)
        self.embedding = nn.Identity()
        self.embedding_dim = width
        self.head = nn.Linear(width, num_classes, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(self.body(self.flatten(x))))


class SmallCNN(nn.Module):
    """A small VGG-style CNN for 28x28 (MNIST) or 8x8 (digits) images, or any size divisible by 2**len(channels).

    Layers: ``body.block{i}`` (3x3 conv, norm, ReLU, 2x2 max-pool) -> ``flatten`` -> ``fc`` (Linear + ReLU)
    -> ``embedding`` -> ``head``.

    Args:
        num_classes: number of output logits.
        in_channels: input channels.
        input_size: input height (= width); the CLI links it from the datamodule.
        channels: output channels of each conv block (each halves the resolution).
        hidden: width of the fully connected layer before the head (the embedding size).
        dropout: dropout before the head.
        norm: ``"none"`` (default; Opacus-compatible), ``"group"`` or ``"batch"``.

    Example::

        >>> SmallCNN(num_classes=10, input_size=8)(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    PENULTIMATE = "embedding"

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 1,
        input_size: int = 28,
        channels: Sequence[int] = (32, 64),
        hidden: int = 128,
        dropout: float = 0.0,
        norm: Norm = "none",
    ) -> None:
        super().__init__()
        channels = _positive_ints("channels", channels, allow_empty=False)
        factor = 2 ** len(channels)
        if input_size % factor:
            raise ValueError(
                f"`input_size={input_size}` must be divisible by 2**len(channels) = {factor} "
                f"(each of the {len(channels)} conv blocks halves the resolution); use fewer `channels`."
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {dropout!r}.")
        self.num_classes = num_classes
        blocks: OrderedDict[str, nn.Module] = OrderedDict()
        c_in = in_channels
        for i, c in enumerate(channels):
            blocks[f"block{i}"] = nn.Sequential(
                nn.Conv2d(c_in, c, 3, padding=1), _norm2d(norm, c), nn.ReLU(), nn.MaxPool2d(2)
            )
            c_in = c
        self.body = nn.Sequential(blocks)
        self.flatten = nn.Flatten()
        spatial = input_size // factor
        self.fc = nn.Sequential(nn.Linear(c_in * spatial * spatial, hidden), nn.ReLU())
        self.embedding = nn.Identity()
        self.embedding_dim = hidden
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.embedding(self.fc(self.flatten(self.body(x))))))


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm2d(norm, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = _norm2d(norm, c_out)
        self.act = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), _norm2d(norm, c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """A CIFAR-style ResNet (He et al. 2016, Sec. 4.2): 3x3 stem, stages of basic blocks, global average pool.

    ``SmallResNet(widths=(16, 32, 64), blocks_per_stage=3)`` is ResNet-20; the defaults give a ResNet-8 that trains
    in minutes on CPU. Layers: ``stem`` -> ``stages.{i}`` -> ``avgpool`` -> ``flatten`` -> ``embedding`` -> ``head``.

    Args:
        num_classes: number of output logits.
        in_channels: input channels.
        widths: channels of each stage; every stage after the first halves the resolution.
        blocks_per_stage: basic blocks per stage.
        norm: ``"batch"`` (the paper's), ``"group"`` (Opacus-compatible) or ``"none"``.

    Example::

        >>> SmallResNet(num_classes=10, in_channels=1)(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    PENULTIMATE = "embedding"

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        widths: Sequence[int] = (16, 32, 64),
        blocks_per_stage: int = 1,
        norm: Norm = "batch",
    ) -> None:
        super().__init__()
        widths = _positive_ints("widths", widths, allow_empty=False)
        if blocks_per_stage < 1:
            raise ValueError(f"`blocks_per_stage` must be >= 1, got {blocks_per_stage!r}.")
        self.num_classes = num_classes
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False), _norm2d(norm, widths[0]), nn.ReLU()
        )
        stages = []
        c_in = widths[0]
        for i, w in enumerate(widths):
            blocks = [_BasicBlock(c_in if b == 0 else w, w, 2 if (i > 0 and b == 0) else 1, norm) for b in range(blocks_per_stage)]
            stages.append(nn.Sequential(*blocks))
            c_in = w
        self.stages = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.embedding = nn.Identity()
        self.embedding_dim = c_in
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(self.flatten(self.avgpool(self.stages(self.stem(x))))))
