"""PauseTokenLM: pause-finetuning (deterministic) and pause-pretraining (pauses drawn per rank and step)."""

from __future__ import annotations

import functools

import torch
from transformers import GPT2Config

from datamodules import SyntheticReasoningDataModule
from lightning_methods import PauseTokenLM
from tests.contracts.registry import DDP, Built, Entry, InOrder, adam, register

STEPS = dict(max_epochs=2, limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=0)


def gpt2() -> GPT2Config:
    return GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


class InOrderSynthetic(InOrder, SyntheticReasoningDataModule):
    """3+3-digit sums with 4-digit answers, read in order: every example has as many target tokens, so the mean loss
    of two ranks' halves is the mean loss of one process's whole batch."""

    def __init__(self, **kwargs) -> None:
        super().__init__(min_digits=3, max_digits=3, num_train=64, num_val=16, num_test=16, **kwargs)
        self.pairs = {k: [(p, t) for p, t in v if len(t) == 4] for k, v in self.pairs.items()}
        self._data = None


def finetune(batch_size: int = 8, optimizer=None, num_pauses: int = 2) -> Built:
    dm = InOrderSynthetic(batch_size=batch_size)
    lm = PauseTokenLM(gpt2(), dm.tokenizer, num_pauses=num_pauses, optimizer=optimizer or adam(3e-3))
    return Built(lm, dm)


def pretrain(batch_size: int = 8, optimizer=None) -> Built:
    dm = InOrderSynthetic(batch_size=batch_size, batch_format="lm")
    lm = PauseTokenLM(gpt2(), dm.tokenizer, mode="pretrain", pretrain_pause_fraction=0.2, optimizer=optimizer or adam(3e-3))
    return Built(lm, dm)


def logits(module: PauseTokenLM, batch: dict) -> torch.Tensor:
    inputs = module.pretrain_batch(batch, pauses=False) if module.mode == "pretrain" else module.finetune_batch(batch)
    return module.model(**inputs).logits


def _bad_mode() -> Built:
    dm = SyntheticReasoningDataModule(batch_format="lm", num_train=32, num_val=8, num_test=8)
    return Built(PauseTokenLM(gpt2(), dm.tokenizer, mode="finetune"), dm)


def _too_many_pauses() -> Built:
    dm = SyntheticReasoningDataModule(num_train=32, num_val=8, num_test=8)
    return Built(PauseTokenLM(gpt2(), dm.tokenizer, num_pauses=60), dm)


def _no_tokenizer() -> Built:
    from datamodules import DigitsDataModule

    return Built(PauseTokenLM(gpt2()), DigitsDataModule())


SGD = functools.partial(torch.optim.SGD, lr=0.5)  # Adam turns float noise on exactly-zero gradients into +-lr steps

register(
    Entry(
        name="PauseTokenLM",
        build=finetune,
        trainer_kwargs=STEPS,
        predict=logits,
        reload_kwargs=lambda: {"model": gpt2()},
        bad_configs={"batches-of-the-other-mode": _bad_mode, "context-too-short": _too_many_pauses,
                     "no-tokenizer": _no_tokenizer},
        # finetuning inserts no random pauses: 2 ranks x 4 examples train exactly like 1 process x 8
        ddp=DDP(lambda world: finetune(8 // world, SGD), trainer_kwargs=dict(STEPS, limit_val_batches=0)),
        atol=1e-5,
    )
)

register(
    Entry(
        name="PauseTokenLM-pretrain",
        build=pretrain,
        trainer_kwargs=STEPS,
        predict=logits,
        reload_kwargs=lambda: {"model": gpt2()},
        bad_configs={"context-too-short": lambda: Built(
            PauseTokenLM(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=8), InOrderSynthetic(batch_format="lm").tokenizer,
                         mode="pretrain"),
            InOrderSynthetic(batch_format="lm"))},
        # pause positions are drawn per (seed, rank, step, batch): the weights differ from one process's by design;
        # replicas must stay identical
        ddp=DDP(lambda world: pretrain(8 // world, SGD), trainer_kwargs=dict(STEPS, limit_val_batches=0),
                differs_from_single=("state_dict/", "optimizer/")),
        atol=1e-5,
    )
)
