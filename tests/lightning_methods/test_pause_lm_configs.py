"""The pause-token configs through the real CLI: the two pretraining stages, then the four variants finetuned from them.

Runs configs/pause_tokens/pretrain_std.yaml and configs/pause_tokens/pretrain_pause.yaml, then
configs/pause_tokens/stdpt_stdft.yaml, configs/pause_tokens/stdpt_pauseft.yaml, configs/pause_tokens/pausept_stdft.yaml
and configs/pause_tokens/pausept_pauseft.yaml (which start from the pretraining checkpoints), with tiny overrides.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lightning_methods import PauseTokenLM
from tests.helpers import run_cli

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "pause_tokens"
FAST = [
    "--trainer.max_steps=3",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--data.init_args.num_train=256",
    "--data.init_args.num_val=32",
    "--data.init_args.num_test=32",
]
PRETRAIN = {"stdpt": "pretrain_std.yaml", "pausept": "pretrain_pause.yaml"}
VARIANTS = {
    "stdpt_stdft.yaml": ("stdpt", 0),
    "stdpt_pauseft.yaml": ("stdpt", 8),
    "pausept_stdft.yaml": ("pausept", 0),
    "pausept_pauseft.yaml": ("pausept", 8),
}


def test_four_variants_run_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted([*PRETRAIN.values(), *VARIANTS])
    for stage, config in PRETRAIN.items():
        cli = run_cli("fit", "--config", str(CONFIGS / config), *FAST, f"--trainer.default_root_dir={tmp_path}")
        assert cli.trainer.global_step == 3
        assert (cli.model.pretrain_pause_fraction > 0) == (stage == "pausept")
        assert cli.model.model.config.pause_token_trained == (stage == "pausept")
        ckpt = tmp_path / "pause_runs" / stage / "last.ckpt"
        assert ckpt.is_file()
        # a CLI checkpoint rebuilds itself: model config and tokenizer (with <pause>) are in it
        loaded = PauseTokenLM.load_from_checkpoint(str(ckpt))
        torch.testing.assert_close(loaded.model.get_input_embeddings().weight, cli.model.model.get_input_embeddings().weight)
        assert loaded.tokenizer.get_vocab() == cli.model.tokenizer.get_vocab()
    for config, (stage, pauses) in VARIANTS.items():
        cli = run_cli("fit", "--config", str(CONFIGS / config), *FAST, f"--trainer.default_root_dir={tmp_path}")
        assert cli.trainer.global_step == 3
        assert cli.model.num_pauses == pauses and cli.model.mode == "finetune"
        assert "test_exact_match" in cli.trainer.callback_metrics  # test_after_fit ran
        # the finetuned model started from its pretraining stage (same tokenizer, pause id included)
        pretrained = PauseTokenLM(model=str(tmp_path / "pause_runs" / stage / "last.ckpt"))
        assert cli.model.pause_token_id == pretrained.pause_token_id
        assert cli.model.tokenizer.get_vocab() == pretrained.tokenizer.get_vocab()
