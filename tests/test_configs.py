"""Every YAML config under configs/ runs through the real CLI (timm-style: a new config is tested the moment it exists).

A config runs here with tiny overrides (one epoch, two batches) in a temporary working directory. A config that
needs something first (a teacher checkpoint, a trained base model) says `# tested-by: tests/<file>.py` in its first
lines; that file must exist and name the config, and runs it properly.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
TESTED_BY = re.compile(r"^#\s*tested-by:\s*(\S+)", re.MULTILINE)

FAST = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def _tested_by(config: Path) -> str | None:
    match = TESTED_BY.search("\n".join(config.read_text().splitlines()[:10]))
    return match.group(1) if match else None


def _rel(config: Path) -> str:
    return config.relative_to(ROOT).as_posix()


def test_configs_exist():
    assert ROOT.joinpath("configs", "quickstart.yaml") in CONFIGS


@pytest.mark.parametrize("config", [c for c in CONFIGS if _tested_by(c) is None], ids=_rel)
def test_config_runs_through_cli(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = run_cli("fit", "--config", str(config), *FAST, f"--trainer.default_root_dir={tmp_path}")
    assert cli.trainer.state.finished, f"{_rel(config)} did not finish"
    assert cli.trainer.global_step > 0


@pytest.mark.parametrize("config", [c for c in CONFIGS if _tested_by(c) is not None], ids=_rel)
def test_delegated_config_is_run_by_its_test(config):
    test_file = ROOT / _tested_by(config)
    assert test_file.is_file(), f"{_rel(config)} says it is tested by {test_file}, which does not exist"
    assert _rel(config) in test_file.read_text(), f"{test_file.name} never mentions {_rel(config)}"
