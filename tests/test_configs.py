"""Every YAML config under configs/ runs through the real CLI and produces what it is for (timm-style: a config
without an entry in ``EXPECT`` fails, so a new config is tested the moment it exists).

Each config runs with tiny overrides (one epoch of two batches, one evaluation batch) in a temporary working
directory, and the test asserts on what the run produced: finite metrics in ``trainer.callback_metrics`` (the test
metrics when the config tests after fitting), the files it writes (checkpoints load with ``weights_only=True``) and,
where the config is about one thing, that thing (the teacher it loaded, the pauses it inserts). A config that needs
another's output (a teacher checkpoint, a pretraining stage) names it in ``after``; the two run in order in the same
working directory.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))

FAST = (
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
)
TWO_EPOCHS = ("--trainer.max_epochs=2", "--test_after_fit=false")
TINY_TEXT = ("--data.init_args.num_train=256", "--data.init_args.num_val=32", "--data.init_args.num_test=32")


@dataclass(frozen=True)
class Expect:
    """What one config must produce.

    Args:
        metrics: names that must be in ``trainer.callback_metrics`` with finite values (accuracies in [0, 1]).
        files: paths (relative to the working directory) the run must write; ``.ckpt`` files must load with
            ``torch.load(weights_only=True)`` and hold a ``state_dict``.
        after: the config (relative to configs/) whose outputs this one reads; it runs first, in the same directory.
        args: extra overrides for this config (after the tiny ones).
        check: ``(cli, workdir) -> None`` asserting what the config is about.
        slow: mark the run slow (its data takes seconds to build).
        trains: the fit takes optimizer steps (False for a cascade rule with nothing to learn: it sets thresholds).
    """

    metrics: tuple[str, ...] = ()
    files: tuple[str, ...] = ()
    after: str | None = None
    args: tuple[str, ...] = ()
    check: Callable[[Any, Path], None] | None = None
    slow: bool = False
    trains: bool = True


# -- technique-specific checks -------------------------------------------------------------------------------------------
def _teacher_is_the_checkpoint(cli: Any, workdir: Path) -> None:
    from lightning_methods.distillation import load_backbone_weights

    reference = load_backbone_weights(workdir / "checkpoints" / "teacher" / "last.ckpt")  # rebuilt from its hparams
    for name, value in reference.state_dict().items():
        assert torch.equal(cli.model.teacher.state_dict()[name], value), name
    assert cli.trainer.callback_metrics["distilling"] == 1.0


def _kd(cli: Any, workdir: Path) -> None:
    _teacher_is_the_checkpoint(cli, workdir)
    assert (cli.model.temperature, cli.model.alpha) == (4.0, 0.9)
    assert sum(p.numel() for p in cli.model.parameters()) < sum(p.numel() for p in cli.model.teacher.parameters()) / 10


def _self_distillation(cli: Any, workdir: Path) -> None:
    _teacher_is_the_checkpoint(cli, workdir)
    assert [p.shape for p in cli.model.student.parameters()] == [p.shape for p in cli.model.teacher.parameters()]


def _late_switch(cli: Any, workdir: Path) -> None:
    # the override moves the switch to epoch 1 of 2: one-hot first, KD after
    assert [cli.model.distilling(e) for e in (0, 1)] == [False, True]
    assert cli.trainer.callback_metrics["distilling"] == 1.0


def _online(cli: Any, workdir: Path) -> None:
    from callbacks import TeacherTrajectory
    from lightning_methods.distillation import load_backbone_weights

    (trajectory,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, TeacherTrajectory)]
    assert [Path(p).name for p in trajectory.paths] == ["epoch=0.ckpt"]  # the teacher config ran one epoch here
    final = load_backbone_weights(workdir / "checkpoints" / "teacher" / "epoch=0.ckpt")
    assert torch.equal(cli.model.teacher.head.weight, final.head.weight)
    metrics = cli.trainer.callback_metrics
    assert 0 < metrics["sc_teacher"] < metrics["sc_onehot"]


def _pretrained(stage: str, pauses_trained: bool) -> Callable[[Any, Path], None]:
    def check(cli: Any, workdir: Path) -> None:
        from lightning_methods import PauseTokenLM

        assert (cli.model.pretrain_pause_fraction > 0) == pauses_trained
        assert cli.model.model.config.pause_token_trained == pauses_trained
        loaded = PauseTokenLM.load_from_checkpoint(str(workdir / "pause_runs" / stage / "last.ckpt"))
        torch.testing.assert_close(loaded.model.get_input_embeddings().weight, cli.model.model.get_input_embeddings().weight)
        assert loaded.tokenizer.get_vocab() == cli.model.tokenizer.get_vocab()

    return check


def _finetuned(stage: str, pauses: int) -> Callable[[Any, Path], None]:
    def check(cli: Any, workdir: Path) -> None:
        from lightning_methods import PauseTokenLM

        assert cli.model.num_pauses == pauses and cli.model.mode == "finetune"
        pretrained = PauseTokenLM(model=str(workdir / "pause_runs" / stage / "last.ckpt"))
        assert cli.model.pause_token_id == pretrained.pause_token_id
        assert cli.model.tokenizer.get_vocab() == pretrained.tokenizer.get_vocab()

    return check


def _resmem(path: str) -> Callable[[Any, Path], None]:
    def check(cli: Any, workdir: Path) -> None:
        from lightning_methods import ResMem

        assert cli.model.has_memory
        loaded = ResMem.load_from_checkpoint(workdir / path)  # the backbone is rebuilt from the saved config
        x = cli.datamodule.dataset("test").x[:64]
        torch.testing.assert_close(loaded.eval().predict(x), cli.model.eval().predict(x))

    return check


def _private(cli: Any, workdir: Path) -> None:
    module = cli.model
    assert 0 < module.epsilon <= module.target_epsilon
    assert bool(module.preprocessor.fitted) == module.preprocess


def _exported_student(cli: Any, workdir: Path) -> None:
    """The exported student loads in sentence-transformers and encodes queries as the module does."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(workdir / cli.model.export_dir), device="cpu")
    torch.testing.assert_close(torch.as_tensor(st.encode(["a query"])), cli.model.encode_queries(["a query"]),
                               atol=1e-5, rtol=1e-4)


def _between(value: Any, low: float, high: float) -> None:
    assert low <= float(value) <= high, f"{float(value)} not in [{low}, {high}]"


CLASSIFIER = ("test_acc", "test_loss")
PAUSE_FT = ("test_loss", "test_exact_match")
EXPECT: dict[str, Expect] = {
    "quickstart.yaml": Expect(CLASSIFIER, files=("config.yaml",)),
    "distillation/teacher.yaml": Expect(CLASSIFIER, files=("checkpoints/teacher/epoch=0.ckpt", "checkpoints/teacher/last.ckpt"),
                                        slow=True),  # its chain runs five configs
    "distillation/kd.yaml": Expect(("train_kd", "distilling", "val_acc"), after="distillation/teacher.yaml",
                                   args=TWO_EPOCHS, check=_kd),
    "distillation/self_distillation.yaml": Expect(
        ("train_exaggeration_slope", "test_exaggeration_slope", "train_low_conf_gap", "train_kd"),
        after="distillation/teacher.yaml", args=TWO_EPOCHS, check=_self_distillation,
    ),
    "distillation/late_switch.yaml": Expect(
        ("train_kd", "distilling"), after="distillation/teacher.yaml",
        args=(*TWO_EPOCHS, "--model.init_args.distill_start_epoch=1"), check=_late_switch,
    ),
    "distillation/online.yaml": Expect(("teacher_index", "sc_teacher", "sc_onehot", "train_kd"),
                                       after="distillation/teacher.yaml", args=TWO_EPOCHS, check=_online),
    "dpsgd_f/digits_dpsgd.yaml": Expect(CLASSIFIER, files=("checkpoints/dpsgd_digits/epoch=0-step=2.ckpt",), check=_private),
    "dpsgd_f/digits_dpsgd_f.yaml": Expect(CLASSIFIER, files=("checkpoints/dpsgd_f_digits/epoch=0-step=2.ckpt",),
                                          check=_private),
    "dpsgd_f/digits_dpsgd_ghost.yaml": Expect(CLASSIFIER, files=("checkpoints/dpsgd_ghost_digits/epoch=0-step=2.ckpt",),
                                              check=_private),
    "dpsgd_f/mnist_features_dpsgd.yaml": Expect(
        CLASSIFIER, files=("checkpoints/dpsgd_mnist_features/epoch=0-step=2.ckpt",), check=_private, slow=True
    ),
    "dpsgd_f/mnist_features_dpsgd_f.yaml": Expect(
        CLASSIFIER, files=("checkpoints/dpsgd_f_mnist_features/epoch=0-step=2.ckpt",), check=_private, slow=True
    ),
    "mixup/ict.yaml": Expect((*CLASSIFIER, "test_ema_acc")),
    # timm-style mixup + CutMix: about half of the mixed examples (80%) are cut
    "mixup/cutmix.yaml": Expect(("train_loss", "val_acc", "mixup/lam_max", "mixup/cut_fraction"), args=("--test_after_fit=false",),
                                check=lambda cli, _: _between(cli.trainer.callback_metrics["mixup/cut_fraction"], 0.15, 0.7)),
    "mixup/linearity.yaml": Expect(
        ("mixup/lam_max", "linearity/body.block0", "linearity/body.block1", "linearity/logits", "linearity/probs"),
        files=("logs/mixup_linearity/version_0/metrics.csv",),
        args=("--trainer.max_epochs=5", "--trainer.limit_train_batches=1"),  # it measures every 5 epochs
    ),
    # without a test run after fitting, its metrics are the training ones, mixup's included
    "mixup/supervised.yaml": Expect(("train_loss", "train_acc", "val_acc", "mixup/lam_max"), args=("--test_after_fit=false",)),
    "pause_tokens/pretrain_std.yaml": Expect(("train_loss", "val_loss"), files=("pause_runs/stdpt/last.ckpt",),
                                             args=TINY_TEXT, check=_pretrained("stdpt", False), slow=True),
    "pause_tokens/pretrain_pause.yaml": Expect(("train_loss", "val_loss"), files=("pause_runs/pausept/last.ckpt",),
                                               args=TINY_TEXT, check=_pretrained("pausept", True), slow=True),
    "pause_tokens/stdpt_stdft.yaml": Expect(PAUSE_FT, after="pause_tokens/pretrain_std.yaml", args=TINY_TEXT,
                                            check=_finetuned("stdpt", 0)),
    "pause_tokens/stdpt_pauseft.yaml": Expect(PAUSE_FT, after="pause_tokens/pretrain_std.yaml", args=TINY_TEXT,
                                              check=_finetuned("stdpt", 8)),
    "pause_tokens/pausept_stdft.yaml": Expect(PAUSE_FT, after="pause_tokens/pretrain_pause.yaml", args=TINY_TEXT,
                                              check=_finetuned("pausept", 0)),
    "pause_tokens/pausept_pauseft.yaml": Expect(PAUSE_FT, after="pause_tokens/pretrain_pause.yaml", args=TINY_TEXT,
                                                check=_finetuned("pausept", 8)),
    "selective_ood/digits_unseen_ood.yaml": Expect(("test_acc", "test_scod_auroc", "test_risk", "test_rejection_rate")),
    "selective_ood/gaussian_loss_based.yaml": Expect(("test_acc", "test_scod_auroc", "test_risk", "test_rejection_rate"),
                                                     files=("scod_gaussian.ckpt",)),
    "selective_ood/mnist_black_box.yaml": Expect(("test_acc", "test_scod_auroc", "test_risk", "test_rejection_rate")),
    # retrieval metrics rank every evaluation query: whole evaluation splits (~25 s each, so slow)
    **{
        f"embed_distill/{name}.yaml": Expect(
            ("test_recall@10", "test_mrr@10", "test_ndcg@10", "test_teacher_recall@10"),
            files=("embed_distill_student/1_Pooling/config.json",),
            args=("--trainer.limit_val_batches=1.0", "--trainer.limit_test_batches=1.0",
                  "--data.init_args.max_articles=12", "--data.init_args.passages_per_article=3"), slow=True,
            check=_exported_student,
        )
        for name in ("asymmetric", "embed_qgen", "score_kd", "symmetric")
    },
    "resmem/mnist1d.yaml": Expect((*CLASSIFIER, "test_resmem_acc"), files=("resmem_mnist1d.ckpt",),
                                  args=("--data.init_args.num_samples=1000",), check=_resmem("resmem_mnist1d.ckpt")),
    "resmem/mnist5k.yaml": Expect((*CLASSIFIER, "test_resmem_acc"), files=("resmem_mnist5k.ckpt",),
                                  check=_resmem("resmem_mnist5k.ckpt"), slow=True),
    # cascades on MNIST-1D: the two models first, then the cascade configs that read their checkpoints
    "cascade/cheap.yaml": Expect(("test_acc",), files=("checkpoints/cascade/cheap/last.ckpt",),
                                 args=("--data.init_args.num_samples=1400",), slow=True),
    "cascade/expensive.yaml": Expect(("test_acc",), files=("checkpoints/cascade/expensive/last.ckpt",), after="cascade/cheap.yaml",
                                     args=("--data.init_args.num_samples=1400",), slow=True),
    "cascade/confidence.yaml": Expect(("test_audc", "test_deferred", "test_acc"), after="cascade/expensive.yaml", trains=False,
                                      args=("--data.init_args.datamodule.init_args.num_samples=1400",), slow=True),
    "cascade/posthoc.yaml": Expect(("test_audc", "test_relative_cost", "test_acc"), after="cascade/expensive.yaml",
                                   files=("checkpoints/cascade/posthoc/last.ckpt",),
                                   args=("--data.init_args.datamodule.init_args.num_samples=1400",), slow=True),
    # robust distillation on long-tailed digits: the DRO teacher first, then the two students
    "robust_distillation/teacher.yaml": Expect(("test_worst_class_acc", "test_balanced_acc"),
                                               files=("checkpoints/robust_teacher/last.ckpt",), slow=True),
    "robust_distillation/balanced_kd.yaml": Expect(("val_worst_class_acc", "train_kd"), after="robust_distillation/teacher.yaml",
                                                   args=("--test_after_fit=false",), slow=True),
    "robust_distillation/dro_kd.yaml": Expect(("val_worst_class_acc", "class_multiplier_0"), after="robust_distillation/teacher.yaml",
                                              args=("--test_after_fit=false",), slow=True),
}


def _rel(config: Path) -> str:
    return config.relative_to(ROOT / "configs").as_posix()


def _root(name: str) -> str:
    while EXPECT[name].after:
        name = EXPECT[name].after
    return name


def _chains() -> list[list[str]]:
    """One chain per config that needs no other: it, then every config that needs it (directly or not), in order."""
    def depth(name: str) -> int:
        return 0 if not EXPECT[name].after else 1 + depth(EXPECT[name].after)

    roots = [name for name in EXPECT if not EXPECT[name].after]
    return [sorted((n for n in EXPECT if _root(n) == root), key=depth) for root in roots]


def test_every_config_has_expectations():
    names = {_rel(c) for c in CONFIGS}
    assert "quickstart.yaml" in names
    assert not names - set(EXPECT), f"configs without an entry in EXPECT (say what they produce): {sorted(names - set(EXPECT))}"
    assert not set(EXPECT) - names, f"EXPECT names configs that do not exist: {sorted(set(EXPECT) - names)}"


def _run(name: str, workdir: Path) -> None:
    expect = EXPECT[name]
    cli = run_cli("fit", "--config", str(ROOT / "configs" / name), *FAST, *expect.args, f"--trainer.default_root_dir={workdir}")
    assert cli.trainer.state.finished and (cli.trainer.global_step > 0) == expect.trains, f"{name}: steps {cli.trainer.global_step}"
    metrics = cli.trainer.callback_metrics
    missing = [m for m in expect.metrics if m not in metrics]
    assert not missing, f"{name} logged no {missing} (it logged {sorted(metrics)})"
    for metric in expect.metrics:
        value = float(metrics[metric])
        assert math.isfinite(value), f"{name}: {metric} = {value}"
        if metric.endswith(("_acc", "exact_match")):
            assert 0.0 <= value <= 1.0, f"{name}: {metric} = {value}"
    for file in expect.files:
        path = workdir / file
        assert path.is_file() and path.stat().st_size > 0, f"{name} did not write {file}"
        if path.suffix == ".ckpt":
            assert "state_dict" in torch.load(path, map_location="cpu", weights_only=True)
    if expect.check is not None:
        expect.check(cli, workdir)


def _chain_params() -> list:
    return [
        pytest.param(chain, id=chain[0], marks=[pytest.mark.slow] if any(EXPECT[c].slow for c in chain) else [])
        for chain in _chains()
    ]


@pytest.mark.parametrize("chain", _chain_params())
def test_config_runs_through_cli_and_produces_its_outputs(chain, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in chain:
        _run(name, tmp_path)
