"""Smoke test of benchmarks/pause_tokens.py: the whole pipeline in its --quick mode, a few seconds."""

from __future__ import annotations

import pytest

from tests.helpers import load_benchmark


@pytest.mark.slow
def test_quick_run_writes_every_table(tmp_path):
    bench = load_benchmark("pause_tokens")
    report = bench.main(["--quick", "--out", str(tmp_path / "pause_tokens")])
    md = (tmp_path / "pause_tokens.md").read_text()
    for heading in ("four variants x M_inf", "equal real-token targets trained", "Performance"):
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
    check_text_accounting(report["text"])
    assert all(v["ratio"] > 0 for v in report["generation"].values())
    assert (tmp_path / "pause_tokens.json").is_file()


def check_text_accounting(text: dict) -> None:
    """Rows and targets are what the model ran: the PausePT arm packed with room for its pauses runs one row per
    block (StdPT's rows per step) and trains about as many real-token targets as StdPT; the spill arm, two rows."""
    std, room, spill = text["arms"].values()
    batch = text["batch"]
    assert std["rows"] == [std["steps"] * batch] and room["rows"] == [room["steps"] * batch]
    assert spill["rows"] == [2 * spill["steps"] * batch]  # every full block plus pauses overflows the context
    assert std["targets"] == [std["steps"] * batch * (std["block"] - 1)]
    assert abs(room["targets"][0] - std["targets"][0]) <= 0.1 * std["targets"][0]
    assert len(room["clean"]) == len(room["with_pauses"]) == 1 and not std["with_pauses"]


@pytest.mark.slow
def test_only_text_replaces_its_section_and_keeps_the_others(tmp_path):
    bench = load_benchmark("pause_tokens")
    out = tmp_path / "pause_tokens"
    out.with_suffix(".md").write_text(
        "Command: x\n\n### Synthetic reasoning: the four variants x M_inf\n\nSYNTH\n\n### Real text: old\n\nOLD\n\n"
        "### Performance\n\nPERF\n\nTotal time: 33.1 min.\n"
    )
    out.with_suffix(".json").write_text('{"synthetic": "kept"}')
    report = bench.main(["--quick", "--only", "text", "--out", str(out)])
    md = out.with_suffix(".md").read_text()
    assert "OLD" not in md and md.index("SYNTH") < md.index("equal real-token targets trained") < md.index("PERF")
    assert "Total time: 33.1 min. Rerun of `python benchmarks/pause_tokens.py --only text --quick`" in md
    assert report["synthetic"] == "kept" and "generation" not in report
    check_text_accounting(report["text"])
