"""The shared layer: ordered gather across ranks, embeddings from a named layer, frozen second models."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DistributedSampler, TensorDataset

from lightning_methods._distributed import gather_in_order, map_in_order, rank_shard
from lightning_methods._frozen import FrozenSlot, HoldsFrozenModels, load_backbone, read_checkpoint
from lightning_methods._layers import capture_layers, forward_with_embedding, resolve_layer
from lightning_methods.nets import MLP


# -- ordered gather -------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gather_worker(rank: int, world: int, port: int, n: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        data = torch.arange(n * 3, dtype=torch.float64).reshape(n, 3)
        # what a validation loop sees: Lightning's unshuffled DistributedSampler pads the last round with duplicates
        padded = list(DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=False))
        from_loop = gather_in_order(data[padded], n)
        from_shard = gather_in_order(data[list(rank_shard(n))], n)
        mapped = map_in_order(TensorDataset(data), lambda batch: batch[0] * 2, batch_size=2)
        torch.save({"loop": from_loop, "shard": from_shard, "mapped": mapped, "padded_len": len(padded)}, f"{out}{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_gather_an_odd_split_exactly_once_in_order(tmp_path):
    n = 7  # odd: the sampler pads rank 1 with a duplicate of row 0
    mp.spawn(_gather_worker, args=(2, _free_port(), n, str(tmp_path / "r")), nprocs=2)
    expected = torch.arange(n * 3, dtype=torch.float64).reshape(n, 3)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"r{rank}.pt")
        assert got["padded_len"] == 4
        assert torch.equal(got["loop"], expected) and torch.equal(got["shard"], expected)  # exactly, every rank
        assert torch.equal(got["mapped"], 2 * expected)


def test_one_process_gather_and_map_are_the_identity():
    data = torch.randn(5, 2)
    assert torch.equal(gather_in_order(data, 5), data)
    a, b = map_in_order(TensorDataset(data, data + 1), lambda batch: (batch[0], batch[1]), batch_size=2)
    assert torch.equal(a, data) and torch.equal(b, data + 1)
    with pytest.raises(ValueError, match="3 rows for a split of 5"):
        gather_in_order(data[:3], 5)
    with pytest.raises(TypeError, match="map-style"):
        map_in_order(iter([1, 2]), lambda b: b)


def test_map_in_order_leaves_the_global_rng_alone():
    # a whole-split pass in the middle of training must not change the training run's shuffles
    torch.manual_seed(0)
    map_in_order(TensorDataset(torch.randn(10, 2)), lambda batch: batch[0], batch_size=3)
    after = torch.rand(1)
    torch.manual_seed(0)
    torch.randn(10, 2)
    assert torch.equal(after, torch.rand(1))


# -- embeddings from a named layer ----------------------------------------------------------------------------------
def test_named_layer_embedding_suggestions_and_errors():
    net = MLP(8, 3, hidden_sizes=[16])
    out, emb = forward_with_embedding(net, "embedding", torch.randn(4, 8))
    assert out.shape == (4, 3) and emb.shape[0] == 4 and emb.ndim == 2
    with pytest.raises(ValueError, match=r"'embeding'.*Closest names: \['embedding'"):
        resolve_layer(net, "embeding")
    with pytest.raises(TypeError, match="submodule name"):
        resolve_layer(net, 3)
    net.unused = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="did not produce a tensor"):
        forward_with_embedding(net, "unused", torch.randn(4, 8))
    layer = net.get_submodule("embedding")
    with capture_layers({"embedding": layer}):
        pass
    assert not layer._forward_hooks  # hooks are removed


# -- frozen second models --------------------------------------------------------------------------------------------
def test_a_layer_with_one_number_per_example_gives_a_one_column_embedding():
    # review: a (batch,) layer output passed the row check and then failed in flatten(1) with an IndexError
    class Scorer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.score, self.head = nn.Linear(3, 1), nn.Identity()

        def forward(self, x):
            return self.head(self.score(x).squeeze(1))[:, None]

    x = torch.randn(4, 3)
    model = Scorer()
    _, emb = forward_with_embedding(model, "head", x)
    assert emb.shape == (4, 1) and torch.allclose(emb[:, 0], model.score(x)[:, 0])


class _Holder(HoldsFrozenModels, nn.Module):
    teacher = FrozenSlot()
    ema = FrozenSlot(persistent=True)

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(3, 2)
        self.teacher = nn.Sequential(nn.Linear(3, 2), nn.Dropout(0.5))
        self.ema = nn.Linear(3, 2)


def test_frozen_models_stay_out_of_parameters_optimizer_and_checkpoint_and_follow_casts():
    holder = _Holder()
    assert [n for n, _ in holder.named_parameters()] == ["net.weight", "net.bias"]
    assert not any(p.requires_grad for p in holder.teacher.parameters())
    holder.train()
    assert not holder.teacher.training  # module.train() does not reach it
    holder.teacher.train()
    assert not holder.teacher.training  # and reading it puts it back in eval mode
    keys = set(holder.state_dict())
    assert keys == {"net.weight", "net.bias", "ema.weight", "ema.bias"}  # a teacher is never saved; an EMA copy is
    holder.double()
    assert holder.teacher[0].weight.dtype == torch.float64 and holder.ema.weight.dtype == torch.float64
    # a persistent model's weights round-trip through load_state_dict
    state = holder.state_dict()
    other = _Holder().double()
    other.load_state_dict(state)
    assert torch.equal(other.ema.weight, holder.ema.weight)
    assert not torch.equal(other.teacher[0].weight, holder.teacher[0].weight)


def test_a_frozen_model_set_after_a_cast_takes_the_modules_dtype():
    # review: a teacher assigned after a "64-true"/"bf16-true" plugin (or .double()) cast the module stayed float32
    # and failed on the cast inputs (dtype mismatch)
    holder = _Holder().double()
    holder.teacher = nn.Linear(3, 2)
    assert holder.teacher.weight.dtype == torch.float64
    assert holder.teacher(torch.randn(4, 3, dtype=torch.float64)).dtype == torch.float64
    # an uncast (default-dtype) module keeps a teacher the user deliberately gave in another dtype
    plain = _Holder()
    plain.teacher = nn.Linear(3, 2).to(torch.bfloat16)
    assert plain.teacher.weight.dtype == torch.bfloat16


def test_a_plain_state_dict_of_a_backbone_with_a_model_submodule_loads(tmp_path):
    # review: the `model.` prefix of a ClassifierModule checkpoint was stripped from a plain state dict too, so a
    # backbone with its own `model` submodule (HF's *ForSequenceClassification: model.*, score.*) never loaded
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model, self.score = nn.Linear(3, 4), nn.Linear(4, 2)

    net = Net()
    torch.save(net.state_dict(), tmp_path / "plain.pt")
    loaded = load_backbone(tmp_path / "plain.pt", Net())
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), net.state_dict().values()))


class _Pickled:
    pass


def test_load_backbone_uses_weights_only_unless_trusted(tmp_path):
    net = MLP(8, 3, hidden_sizes=[4])
    torch.save({"state_dict": {f"model.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "plain.ckpt")
    loaded = load_backbone(tmp_path / "plain.ckpt", MLP(8, 3, hidden_sizes=[4]))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), net.state_dict().values()))

    # an arbitrary pickled object: never unpickled by default
    torch.save({"state_dict": net.state_dict(), "extra": _Pickled()}, tmp_path / "pickled.ckpt")
    with pytest.raises(ValueError, match="trusted=True"):
        read_checkpoint(tmp_path / "pickled.ckpt")
    assert "extra" in read_checkpoint(tmp_path / "pickled.ckpt", trusted=True)
    with pytest.raises(FileNotFoundError):
        load_backbone(tmp_path / "missing.ckpt", net)
    with pytest.raises(ValueError, match="another architecture"):
        load_backbone(tmp_path / "plain.ckpt", MLP(8, 3, hidden_sizes=[5]))
