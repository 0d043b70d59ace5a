"""Smoke runs of the distillation benchmarks (the full runs are scripts, not tests): each --quick mode runs end to end
in seconds and writes nothing; the closed-form linear benchmark is cheap enough to check its claim as well."""

from __future__ import annotations

import math

import pytest

from tests.helpers import load_benchmark


def test_linear_closed_form_student_beats_an_over_trained_teacher_and_loses_to_an_under_trained_one(tmp_path):
    rows = load_benchmark("distillation_linear").main(["--quick", "--out", str(tmp_path / "l.md")])
    by_time = {r["T"]: r for r in rows}
    assert (by_time[0.3]["student"] > by_time[0.3]["teacher"]).all()  # under-trained teacher: KD shrinks it further
    assert (by_time[10.0]["student"] < by_time[10.0]["teacher"]).all()  # over-trained teacher: KD regularises
    assert not (tmp_path / "l.md").exists()


def test_linear_flow_weights_match_gradient_descent():
    import numpy as np

    bench = load_benchmark("distillation_linear")
    x, y, *_ = bench.make_problem(0, dim=10, signal=3, n_train=30, n_test=5, noise=0.5)
    w = np.zeros(10)
    lr, steps = 1e-3, 3000  # Euler steps of dw/dt = -X^T (X w - y) / n, up to time 3
    for _ in range(steps):
        w -= lr * x.T @ (x @ w - y) / len(x)
    assert np.allclose(w, bench.flow_weights(x, y, lr * steps), atol=2e-3)
    f_teacher = x @ bench.flow_weights(x, y, 3.0)
    assert np.allclose(bench.flow_weights(x, f_teacher, 2.0), bench.flow_weights(x, y, 3.0, 2.0), atol=1e-8)


def test_deviation_benchmark_smoke(tmp_path):
    (result,) = load_benchmark("distillation_deviations").main(["--quick", "--out", str(tmp_path / "d.md")])
    for mode in ("one-hot", "KD", "late switch", "reverse switch"):
        assert 0.0 <= result[mode]["test_acc"] <= 1.0 and math.isfinite(result[mode]["test_slope"])
        assert len(result[mode]["test_deciles"]) == 10
    assert not (tmp_path / "d.md").exists()


def test_online_benchmark_smoke(tmp_path):
    (result,) = load_benchmark("distillation_online").main(["--quick", "--out", str(tmp_path / "o.md")])
    assert set(result) >= {(8, "no KD"), (8, "online KD, tau=1"), (8, "offline KD, tau=4"), "sc_init", "sc_trained"}
    sc = result["sc_init"]
    assert len(sc["trajectory"][1.0]) == 3 and all(v > 0 for v in sc["sweep"])
    assert sc["sweep"][0] >= sc["sweep"][-1]  # temperature can only soften the targets
    assert not (tmp_path / "o.md").exists()


@pytest.mark.parametrize("setting", ["mlp-digits"])
def test_overhead_benchmark_smoke(setting, tmp_path):
    (row,) = load_benchmark("distillation_overhead").main(["--quick", "--settings", setting, "--out", str(tmp_path / "x.md")])
    assert row["classifier_ms"] > 0 and row["kd-cached_ms"] > 0
    # one repeat: the reported ratio is exactly the ratio of the two measured step times
    assert row["ratio_cached"] == pytest.approx(row["kd-cached_ms"] / row["classifier_ms"], rel=1e-9)
    assert not (tmp_path / "x.md").exists()
