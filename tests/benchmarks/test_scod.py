"""Smoke run of benchmarks/scod.py (the full run is a script, not a test)."""

import pytest

from tests.helpers import load_benchmark


@pytest.mark.slow
def test_scod_benchmark_smoke(tmp_path):
    summary = load_benchmark("scod").main(["--quick", "--out", str(tmp_path / "s.md")])
    rows = summary["table"]
    assert [(r["setting"], r["c_fn"]) for r in rows] == [
        (f"gaussian, {s}", c) for s in ("covering", "unseen") for c in (0.25, 0.5, 0.75)
    ]
    for r in rows:
        for arm in ("Oracle", "MSP", "BB", "LB"):
            assert 0.0 <= float(r[arm].split(" ± ")[0]) <= 1.0
    assert not (tmp_path / "s.md").exists()  # --quick never overwrites a results table
