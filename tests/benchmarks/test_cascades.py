"""Smoke run of benchmarks/cascades.py (the full run is a script, not a test)."""

import pytest

from tests.helpers import load_benchmark


@pytest.mark.slow
def test_cascades_benchmark_smoke(tmp_path):
    rows = load_benchmark("cascades").main(["--quick", "--out", str(tmp_path / "c.md")])
    scenarios = ("generalist", "specialist", "label noise", "prior shift")
    rules = ("confidence", "entropy", "margin", "random", "posthoc diff01", "posthoc diffprob", "oracle")
    assert [(r["scenario"], r["rule"]) for r in rows] == [(s, r) for s in scenarios for r in rules]
    for row in rows:
        assert 0.0 <= float(row["audc"]) <= 1.0
    for scenario in scenarios:  # the oracle is the upper envelope of every rule
        by_rule = {r["rule"]: float(r["audc"]) for r in rows if r["scenario"] == scenario}
        assert by_rule["oracle"] == max(by_rule.values())
    assert not (tmp_path / "c.md").exists()  # --quick never overwrites a results table
