"""Smoke runs of benchmarks/resmem.py and benchmarks/resmem_knn.py (the full runs are scripts, not tests)."""

import pytest

from tests.helpers import load_benchmark


def test_resmem_benchmark_smoke(tmp_path):
    rows = load_benchmark("resmem").main(["--quick", "--out", str(tmp_path / "r.md")])
    assert [(r["n_train"], r["width"]) for r in rows] == [(300, 16), (600, 16)]
    for r in rows:
        for key in ("base", "resmem", "knn"):
            mean = float(r[key].split(" ± ")[0])
            assert 0.0 <= mean <= 1.0
    assert not (tmp_path / "r.md").exists()  # --quick never overwrites a results table


@pytest.mark.slow  # > 3 s: outside the fast lane
def test_resmem_knn_benchmark_smoke(tmp_path):
    pytest.importorskip("faiss")
    (row,) = load_benchmark("resmem_knn").main(["--quick", "--out", str(tmp_path / "k.md")])
    assert row["same_as_faiss"] == 1.0 and row["same_as_sklearn"] == 1.0
    assert row["max_d2_diff"] < 1e-4 and all(q > 0 for q in row["qps"].values())
    assert row["peak_mib"]["torch"] is not None and row["peak_mib"]["torch"] >= 0  # measured in a fresh process
    assert not (tmp_path / "k.md").exists()
