"""Smoke test of benchmarks/pause_tokens.py: the whole pipeline in its --quick mode, a few seconds."""

from __future__ import annotations

import pytest

from tests.helpers import load_benchmark


@pytest.mark.slow  # > 3 s: outside the fast lane
def test_quick_run_writes_every_table(tmp_path):
    bench = load_benchmark("pause_tokens")
    report = bench.main(["--quick", "--out", str(tmp_path / "pause_tokens")])
    md = (tmp_path / "pause_tokens.md").read_text()
    for heading in ("four variants x M_inf", "equal real tokens seen", "Performance"):
        assert heading in md
    for variant in ("StdPT_StdFT", "StdPT_PauseFT", "PausePT_StdFT", "PausePT_PauseFT"):
        assert md.count(f"| {variant} |") == 3  # addition and 3SUM tables, addition curve
        for task in ("addition", "3sum"):
            runs = report["synthetic"]["results"][task][variant]
            assert len(runs) == 1 and set(runs[0]) == {"0", "8", "filler8"}
            assert all(0.0 <= v <= 1.0 for v in runs[0].values())
    curves = report["synthetic"]["curves"]
    assert set(curves) == set(report["synthetic"]["results"]["addition"])
    assert all(len(runs) == 1 and sorted(runs[0]) == [2, 3] for runs in curves.values())  # --curve-at 2, then the end
    assert "addition along finetuning" in md and "Pretrained models before finetuning" in md
    assert (tmp_path / "pause_tokens.png").is_file()
    assert set(report["text"]) >= {"StdPT", "PausePT", "PausePT_with_pauses", "real_tokens_seen"}
    assert all(v["ratio"] > 0 for v in report["generation"].values())
    assert (tmp_path / "pause_tokens.json").is_file()
