"""Smoke runs of benchmarks/dpsgd_f.py and benchmarks/dpsgd_f_perf.py (the full runs are scripts, not tests)."""

from tests.helpers import load_benchmark


def test_accuracy_and_audit_benchmark_smoke(tmp_path):
    bench = load_benchmark("dpsgd_f")
    out = bench.main(["--quick"])
    accuracy = out["accuracy"]["counterexample"]
    assert set(accuracy) == {*bench.METHODS, "non-private"}
    assert all(0.0 <= acc <= 1.0 for method in bench.METHODS for acc in accuracy[method][1.0])
    assert all(0.0 <= row["auc"] <= 1.0 for rows in out["audit"].values() for row in rows)
    assert "| 1 |" in out["table"] and "attack AUC" in out["table"]
    assert not list(tmp_path.iterdir())  # --quick writes no results file


def test_perf_benchmark_smoke(tmp_path):
    bench = load_benchmark("dpsgd_f_perf")
    (row,) = bench.main(["--quick", "--settings", "linear-digits", "--out", str(tmp_path / "p.md")])
    assert row["opacus loop ms"] > 0 and row["DPSGDFModule ms"] > 0 and row["non-private ms"] > 0
    # one repeat: the reported ratio is exactly the ratio of the two measured step times
    assert abs(row["ratio"] - row["DPSGDFModule ms"] / row["opacus loop ms"]) < 1e-9
    assert not (tmp_path / "p.md").exists()


def test_one_run_audit_benchmark_smoke():
    bench = load_benchmark("dpsgd_f_audit")
    out = bench.main(["--quick"])
    for (arm, epsilon), rows in out["results"].items():
        assert arm in bench.ARMS and epsilon == 4.0
        assert all(row["epsilon_lower_bound"] >= 0 and row["reported"] <= 4.0 for row in rows)
    assert "bound at eps 4" in out["table"]
