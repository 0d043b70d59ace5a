"""benchmarks/overhead.py measures what it says: both arms run the requested steps of the same work (the same
training update on the same batches), and the smoke run reports positive step times without overwriting the table."""

import copy
import math

import torch

from datamodules import DigitsDataModule
from lightning_methods.nets import MLP
from tests.helpers import load_benchmark


def test_both_arms_do_the_same_work_per_step():
    module = load_benchmark("overhead")
    dm = DigitsDataModule(batch_size=64, shuffle=False)  # the same batches in both arms
    dm.setup("fit")
    torch.manual_seed(0)
    net = MLP(64, 10, hidden_sizes=[32])
    plain, lightning = copy.deepcopy(net), copy.deepcopy(net)
    plain_times, _ = module.plain_loop(plain, dm.train_dataloader(), steps=6)
    light_times, _ = module.lightning_loop(lightning, dm, steps=6)
    assert len(plain_times) == len(light_times) == 6  # one timestamp per step, as many steps in each arm
    assert all(b > a for a, b in zip(plain_times, plain_times[1:]))
    # the same update (forward, cross-entropy, backward, Adam step) on the same batches: the same weights
    moved = [not torch.allclose(a, b) for a, b in zip(net.parameters(), plain.parameters())]
    assert all(moved)
    for a, b in zip(plain.parameters(), lightning.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_quick_run_reports_step_times_and_keeps_the_table(tmp_path):
    module = load_benchmark("overhead")
    row, data_row = module.main(
        ["--quick", "--settings", "mlp-digits", "--data-settings", "digits", "--out", str(tmp_path / "o.md")]
    )
    assert row["setting"] == "mlp-digits"
    for key in ("plain_ms", "lightning_ms", "ratio", "nolog_ratio", "e2e"):
        assert math.isfinite(row[key]) and row[key] > 0, (key, row[key])
    assert row["ratio_min"] <= row["ratio"] <= row["ratio_max"]
    # the data-path arm read one whole epoch of batches of 64
    assert data_row["setting"] == "digits" and data_row["batches"] == -(-data_row["rows"] // 64)
    assert data_row["ours_ms"] > 0 and data_row["ref_ms"] > 0
    assert not (tmp_path / "o.md").exists()  # --quick never overwrites a results table
