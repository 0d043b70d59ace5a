"""The `lightning-methods` CLI: the README's quickstart, datamodule-to-model links, and their errors."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_methods.cli import _link_targets, _peek_classes
from lightning_methods.nets import MLP, SmallCNN
from tests.helpers import printed_test_acc, run_cli

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
TINY = ["--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false", "--trainer.logger=false"]


@pytest.mark.slow  # ~12 s: two Python processes import torch and Lightning
def test_quickstart_under_strategy_ddp_runs_two_processes(tmp_path):
    """Real multi-GPU jobs use `strategy="ddp"`, which re-runs the command in each process: the console script,
    2 CPU processes (the quickstart as written, through the installed console script: tests/test_clean_checkout.py)."""
    args = ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.max_epochs=3"]
    proc = subprocess.run(
        ["lightning-methods", "fit", "--config", QUICKSTART, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = sorted(set(re.findall(r"GLOBAL_RANK: (\d+), MEMBER: \d+/2", proc.stdout + proc.stderr)))
    assert ranks == ["0", "1"], (proc.stdout + proc.stderr)[-2000:]
    accuracy = printed_test_acc(proc.stdout)
    assert accuracy is not None and accuracy > 0.8, proc.stdout[-2000:]  # 3 epochs of 2 x 64 examples per step


def test_print_config_shows_the_resolved_config(capsys, monkeypatch):
    from lightning_methods.cli import cli_main

    monkeypatch.setattr("sys.argv", ["lightning-methods"])
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", QUICKSTART, "--print_config"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "class_path: lightning_methods.nets.MLP" in out and "DigitsDataModule" in out


def test_links_fill_num_classes_and_input_size(tmp_path):
    cli = run_cli(
        "fit",
        "--model=lightning_methods.ClassifierModule",
        "--model.model=lightning_methods.nets.MLP",
        "--model.model.hidden_sizes=[8]",
        "--data=datamodules.TabularDataModule",
        "--data.name=wine",
        f"--trainer.default_root_dir={tmp_path}",
        *TINY,
    )
    assert cli.model.num_classes == 3
    assert cli.model.model.in_features == 13 and cli.model.model.num_classes == 3


def test_links_reach_student_and_teacher_backbones(tmp_path):
    cli = run_cli(
        "fit",
        "--model=tests.helpers.TwoBackboneModule",
        "--model.student=lightning_methods.nets.MLP",
        "--model.teacher=lightning_methods.nets.SmallCNN",
        "--data=datamodules.DigitsDataModule",
        f"--trainer.default_root_dir={tmp_path}",
        *TINY,
    )
    student, teacher = cli.model.student, cli.model.teacher
    assert isinstance(student, MLP) and student.in_features == 64 and student.num_classes == 10
    assert isinstance(teacher, SmallCNN) and teacher.head.out_features == 10
    assert teacher.body.block0[0].in_channels == 1  # in_channels and input_size (8) linked too
    assert cli.trainer.global_step == 2


def test_contradicting_value_is_an_error_not_an_override(tmp_path):
    with pytest.raises(ValueError, match=r"model.num_classes=3.*DigitsDataModule.num_classes = 10.*remove it"):
        run_cli("fit", "--config", QUICKSTART, "--model.num_classes=3", f"--trainer.default_root_dir={tmp_path}", *TINY)
    with pytest.raises(ValueError, match=r"model.model.in_features=3.*in_features = 64"):
        run_cli("fit", "--config", QUICKSTART, "--model.model.in_features=3", f"--trainer.default_root_dir={tmp_path}", *TINY)


def test_a_value_equal_to_the_data_is_accepted(tmp_path):
    cli = run_cli("fit", "--config", QUICKSTART, "--model.num_classes=10", f"--trainer.default_root_dir={tmp_path}", *TINY)
    assert cli.model.num_classes == 10


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--config", QUICKSTART], {"": "lightning_methods.ClassifierModule", "model": "lightning_methods.nets.MLP"}),
        (["--model=a.B", "--model.student=c.D"], {"": "a.B", "student": "c.D"}),
        (["--model.class_path=a.B", "--model.init_args.teacher.class_path", "c.D"], {"": "a.B", "teacher": "c.D"}),
        (["--model=a.B", "--model.teacher=c.D", "--model.teacher.init_args.width=3"], {"": "a.B", "teacher": "c.D"}),
        (["--model.student.init_args.width=3"], {"student": None}),
        ({"model": {"class_path": "a.B", "init_args": {"model": {"class_path": "c.D"}}}}, {"": "a.B", "model": "c.D"}),
    ],
)
def test_peek_reads_the_chosen_classes(args, expected):
    assert _peek_classes(args) == expected


def test_links_only_into_parameters_the_classes_take():
    targets = _link_targets({"": "lightning_methods.ClassifierModule", "model": "lightning_methods.nets.MLP"})
    assert set(targets) == {
        "model.init_args.num_classes",
        "model.init_args.model.init_args.num_classes",
        "model.init_args.model.init_args.in_features",
    }
    # a class that cannot be resolved here gets every link (jsonargparse skips missing leaves)
    assert len(_link_targets({"": None, "student": None})) == 1 + 4


@pytest.mark.slow  # a fresh interpreter: ~3 s
def test_package_imports_stay_light():
    """`import lightning_methods, callbacks, datamodules` must not pull transformers, opacus or faiss."""
    code = (
        "import sys, lightning_methods, callbacks, datamodules\n"
        "heavy = [m for m in ('transformers', 'opacus', 'faiss', 'datasets', 'lightning') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
