"""The README's first command, as written, through the installed console script, in a fresh copy of the checkout:
it prints the test accuracy the README promises and leaves ``git status`` clean (held-out review, issue 18)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import printed_test_acc
from tests.test_readme import ACC_TOL

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_quickstart_leaves_a_clean_checkout(tmp_path):
    # a copy of the tracked files, committed in a fresh repository: what a user has after `git clone`
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    repo = tmp_path / "checkout"
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "checkout"], cwd=repo, check=True)
    env = {**os.environ, "PYTHONPATH": str(repo)}
    cmd = ["lightning-methods", "fit", "--config", "configs/quickstart.yaml"]  # the README's command, from the root
    result = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    accuracy = printed_test_acc(result.stdout)
    assert accuracy is not None, result.stdout[-2000:]
    assert accuracy >= 0.95 - ACC_TOL  # the README: "~0.95 test accuracy", within test_readme's accuracy tolerance
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=repo, capture_output=True, text=True)
    assert status.stdout == "", f"the quickstart left files behind: {status.stdout}"
    assert (repo / "runs" / "config.yaml").is_file()  # the config is still saved, in the ignored runs/ folder
