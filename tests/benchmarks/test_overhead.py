"""Smoke run of benchmarks/overhead.py (the full run is a script, not a test)."""

from tests.helpers import load_benchmark


def test_overhead_benchmark_smoke(tmp_path):
    module = load_benchmark("overhead")
    row, data_row = module.main(["--quick", "--settings", "mlp-digits", "--data-settings", "digits", "--out", str(tmp_path / "o.md")])
    assert row["plain_ms"] > 0 and row["lightning_ms"] > 0
    # one repeat: the reported ratio is exactly the ratio of the two measured step times
    assert abs(row["ratio"] - row["lightning_ms"] / row["plain_ms"]) < 1e-9
    assert data_row["setting"] == "digits" and data_row["batches"] == -(-data_row["rows"] // 64)
    assert data_row["ours_ms"] > 0 and data_row["ref_ms"] > 0
    assert not (tmp_path / "o.md").exists()  # --quick never overwrites a results table
