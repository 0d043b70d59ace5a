"""Smoke tests: the mixup benchmarks run end to end in their --quick mode and write their tables (and plot)."""

from __future__ import annotations

import pytest

from tests.helpers import load_benchmark


@pytest.mark.slow  # ~3 s
def test_mixup_linearity_quick(tmp_path):
    text = load_benchmark("mixup_linearity").main(["--quick", "--out", str(tmp_path)])
    for arm in ("erm", "mixup_k2", "mixup_k4", "ict_k2", "ict_k4"):
        assert f"| {arm} |" in text
    assert "NL(ict_k4) - NL(erm)" in text
    assert (tmp_path / "mixup_linearity_quick.md").read_text().count("\n|") >= 7
    assert (tmp_path / "mixup_linearity_quick.png").stat().st_size > 10_000


def test_mixup_speed_quick(tmp_path):
    text = load_benchmark("mixup_speed").main(["--quick", "--out", str(tmp_path)])
    for arm in ("none", "ours_sample", "ours_k4", "timm_batch", "timm_elem"):
        assert f"| {arm} |" in text
    assert "| none | " in text and "1.000x" in text
    assert (tmp_path / "mixup_speed_quick.md").is_file()


def test_mixup_cutmix_speed_quick(tmp_path):
    text = load_benchmark("mixup_cutmix_speed").main(["--quick", "--out", str(tmp_path)])
    for arm in ("ours_mixup", "ours_elem", "ours_batch", "timm_elem", "timm_batch"):
        assert text.count(f"| {arm} |") == 2  # both batch shapes
    assert (tmp_path / "mixup_cutmix_speed_quick.md").is_file()
