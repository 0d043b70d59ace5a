"""The distillation configs run through the real CLI, in the README's order: configs/distillation/teacher.yaml trains
the teacher (one checkpoint per epoch + last.ckpt), then configs/distillation/kd.yaml,
configs/distillation/self_distillation.yaml, configs/distillation/late_switch.yaml and
configs/distillation/online.yaml distil from it (tiny overrides: two epochs of two batches)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from callbacks import DistillationDiagnostics, TeacherTrajectory
from lightning_methods.distillation import load_backbone_weights
from tests.helpers import run_cli

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "distillation"
FAST = [
    "--trainer.max_epochs=2",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A working directory holding checkpoints/teacher/ from configs/distillation/teacher.yaml."""
    directory = tmp_path_factory.mktemp("distillation_cli")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(directory)
        cli = run_cli("fit", "--config", str(CONFIGS / "teacher.yaml"), *FAST, f"--trainer.default_root_dir={directory}")
    assert cli.trainer.state.finished
    names = sorted(p.name for p in (directory / "checkpoints" / "teacher").iterdir())
    assert names == ["epoch=0.ckpt", "epoch=1.ckpt", "last.ckpt"]
    return directory


def _fit(workdir: Path, monkeypatch, config: str, *extra: str):
    monkeypatch.chdir(workdir)
    # no test run after fit: it would replace the training metrics checked here (test_configs.py runs the rest)
    cli = run_cli(
        "fit", "--config", str(CONFIGS / config), *FAST, f"--trainer.default_root_dir={workdir}", "--test_after_fit=false", *extra
    )
    assert cli.trainer.state.finished and cli.trainer.global_step == 4
    return cli


def test_kd_config_distils_from_the_teacher_checkpoint(workdir, monkeypatch):
    cli = _fit(workdir, monkeypatch, "kd.yaml")
    module = cli.model
    assert (module.temperature, module.alpha) == (4.0, 0.9)
    reference = load_backbone_weights(workdir / "checkpoints" / "teacher" / "last.ckpt")  # rebuilt from its hparams
    for name, value in reference.state_dict().items():
        assert torch.equal(module.teacher.state_dict()[name], value)
    assert sum(p.numel() for p in module.parameters()) < sum(p.numel() for p in module.teacher.parameters()) / 10
    assert cli.trainer.callback_metrics["distilling"] == 1.0


def test_self_distillation_config_logs_the_exaggeration_slope(workdir, monkeypatch):
    cli = _fit(workdir, monkeypatch, "self_distillation.yaml")
    module = cli.model
    assert type(module.student) is type(module.teacher)  # same architecture, read from the teacher's checkpoint
    assert [p.shape for p in module.student.parameters()] == [p.shape for p in module.teacher.parameters()]
    assert any(isinstance(cb, DistillationDiagnostics) for cb in cli.trainer.callbacks)
    for key in ("train_exaggeration_slope", "test_exaggeration_slope", "train_low_conf_gap"):
        assert torch.isfinite(cli.trainer.callback_metrics[key])


def test_late_switch_config_switches_at_the_configured_epoch(workdir, monkeypatch):
    cli = _fit(workdir, monkeypatch, "late_switch.yaml")
    assert cli.model.distill_start_epoch == 7 and cli.trainer.callback_metrics["distilling"] == 0.0  # 2 epochs < 7
    cli = _fit(workdir, monkeypatch, "late_switch.yaml", "--model.init_args.distill_start_epoch=1")
    assert [cli.model.distilling(e) for e in (0, 1)] == [False, True]
    assert cli.trainer.callback_metrics["distilling"] == 1.0


def test_online_config_walks_the_teacher_trajectory(workdir, monkeypatch):
    cli = _fit(workdir, monkeypatch, "online.yaml")
    (trajectory,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, TeacherTrajectory)]
    assert [Path(p).name for p in trajectory.paths] == ["epoch=0.ckpt", "epoch=1.ckpt"]
    assert trajectory.current_index == 1 and cli.trainer.callback_metrics["teacher_index"] == 1.0
    final = load_backbone_weights(workdir / "checkpoints" / "teacher" / "epoch=1.ckpt")
    assert torch.equal(cli.model.teacher.head.weight, final.head.weight)
    metrics = cli.trainer.callback_metrics
    assert 0 < metrics["sc_teacher"] < metrics["sc_onehot"]
