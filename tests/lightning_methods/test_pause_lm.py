"""PauseTokenLM: label masking, pause insertion, pause-inference, architectures, save/resume, DDP, errors, training."""

from __future__ import annotations

import functools
import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from datamodules import DigitsDataModule, SyntheticReasoningDataModule
from lightning_methods._tokenizer import char_tokenizer, pad_sequences
from lightning_methods import PauseTokenLM
from lightning_methods.pause_lm import finetune_inputs, insert_pauses, pretrain_labels
from tests.helpers import cpu_trainer, ddp_trainer

ALPHABET = "0123456789+= ,?TF.\n"


def gpt2_config(**kw):
    return GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **kw)


def llama_config(**kw):
    return LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, **kw,
    )


CONFIGS = {"gpt2": gpt2_config, "llama": llama_config}


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer(ALPHABET)


def adam(lr):
    return functools.partial(torch.optim.Adam, lr=lr)  # picklable, for ddp_spawn


# ----------------------------------------------------------------------------------------------------------------------
# Label masking, checked against the model's own (shifted) loss on hand-built sequences
# ----------------------------------------------------------------------------------------------------------------------
def test_pretrain_labels_mask_exactly_the_predictions_of_pauses(tok):
    lm = PauseTokenLM(gpt2_config(), tok, mode="pretrain")
    P = lm.pause_token_id
    pad = lm.pad_token_id
    ids = torch.tensor([[5, P, 6, 7, P, P, 8, pad, pad]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0, 0]])
    labels = pretrain_labels(ids, mask, P)
    assert labels.tolist() == [[5, -100, 6, 7, -100, -100, 8, -100, -100]]

    out = lm.model(input_ids=ids, attention_mask=mask, labels=labels)
    logits = out.logits[0]
    # After the model's shift, output k is trained on token k+1 unless it is a pause or padding: output 0 (-> pause)
    # and 3, 4 (-> pauses) are skipped; outputs 1 and 5 sit *on* pauses and are trained on the next real token.
    trained = {1: 6, 2: 7, 5: 8}
    manual = torch.stack([F.cross_entropy(logits[k], torch.tensor(t)) for k, t in trained.items()]).mean()
    torch.testing.assert_close(out.loss, manual)


def test_finetune_inputs_hand_built_and_loss_on_targets_only(tok):
    lm = PauseTokenLM(gpt2_config(), tok, num_pauses=2)
    P, pad, eos = lm.pause_token_id, lm.pad_token_id, tok.eos_token_id
    # prompts [3, 4] and [5]; targets [7, eos] and [8, 9, eos]; the first batch right-padded, the second left-padded
    right = {
        "prompt_ids": torch.tensor([[3, 4], [5, pad]]), "prompt_mask": torch.tensor([[1, 1], [1, 0]]),
        "target_ids": torch.tensor([[7, eos, pad], [8, 9, eos]]), "target_mask": torch.tensor([[1, 1, 0], [1, 1, 1]]),
    }
    left = {
        "prompt_ids": torch.tensor([[3, 4], [pad, 5]]), "prompt_mask": torch.tensor([[1, 1], [0, 1]]),
        "target_ids": torch.tensor([[pad, 7, eos], [8, 9, eos]]), "target_mask": torch.tensor([[0, 1, 1], [1, 1, 1]]),
    }
    for batch in (right, left):
        inputs = lm.finetune_batch(batch)
        assert inputs["input_ids"].tolist() == [[3, 4, P, P, 7, eos], [5, P, P, 8, 9, eos]]
        assert inputs["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
        assert inputs["labels"].tolist() == [[-100, -100, -100, -100, 7, eos], [-100, -100, -100, 8, 9, eos]]
    inputs = lm.finetune_batch(right)
    out = lm.model(**inputs)
    # the answer is read at the last pause (row 0: position 3 -> 7, position 4 -> eos; row 1: 2 -> 8, 3 -> 9, 4 -> eos)
    pairs = [(0, 3, 7), (0, 4, eos), (1, 2, 8), (1, 3, 9), (1, 4, eos)]
    manual = torch.stack([F.cross_entropy(out.logits[r, k], torch.tensor(t)) for r, k, t in pairs]).mean()
    torch.testing.assert_close(out.loss, manual)
    # no pauses: standard finetuning, the answer read at the last prompt token
    std = finetune_inputs(*(right[k] for k in ("prompt_ids", "prompt_mask", "target_ids", "target_mask")), 0, None, pad)
    assert std["input_ids"].tolist() == [[3, 4, 7, eos], [5, 8, 9, eos]]
    assert std["labels"].tolist() == [[-100, -100, 7, eos], [-100, 8, 9, eos]]


# ----------------------------------------------------------------------------------------------------------------------
# Pause insertion for pretraining
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("side", ["right", "left"])
def test_insert_pauses_count_order_padding_and_uniformity(side):
    P, pad = 99, 0
    rows = [list(range(1, 41)), list(range(1, 21)), list(range(1, 6)), [1]]
    ids, mask = pad_sequences(rows, pad, side)
    draws = 400
    for max_length, width in ((None, 44), (40, 40)):
        counts = torch.zeros(len(rows), width)
        seen = set()
        for seed in range(draws):
            out, out_mask = insert_pauses(ids, mask, P, 0.1, torch.Generator().manual_seed(seed), pad, max_length)
            assert out.shape == out_mask.shape == (4, width)
            assert (out[out_mask == 0] == pad).all(), "a pause landed in padding"
            for i, row in enumerate(rows):
                m = round(0.1 * len(row))
                kept = min(len(row) + m, width) - m  # all tokens fit, or the row is trimmed back to max_length
                real = out[i][out_mask[i].bool()]
                assert out_mask[i].tolist() == [1] * (kept + m) + [0] * (width - kept - m)
                assert int((real == P).sum()) == m
                assert real[real != P].tolist() == row[:kept], "real tokens keep their order; only a tail is trimmed"
            counts += (out == P).float()
            seen.add(tuple(out[0].tolist()))
        assert len(seen) > draws * 0.9, "positions must be random"
        # uniform over the slots of the 40-token row (4 pauses in 44 or 40 slots per draw)
        freq = counts[0][: width] / draws
        assert freq.mean().item() == pytest.approx(4 / width, abs=1e-6)
        assert freq.min().item() > 0.04 and freq.max().item() < 0.17
        assert counts[3].sum() == 0  # one token: round(0.1) = 0 pauses


def test_pretraining_pauses_depend_on_rank_and_step_but_are_reproducible(tok):
    lm = PauseTokenLM(gpt2_config(), tok, mode="pretrain", pretrain_pause_fraction=0.2)
    batch = {"input_ids": torch.randint(3, 15, (4, 30)), "attention_mask": torch.ones(4, 30, dtype=torch.long)}
    first = lm.pretrain_batch(batch, pauses=True, batch_idx=0)["input_ids"]
    again = lm.pretrain_batch(batch, pauses=True, batch_idx=0)["input_ids"]
    other = lm.pretrain_batch(batch, pauses=True, batch_idx=1)["input_ids"]
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert int((first == lm.pause_token_id).sum()) == 4 * 6 and first.shape == (4, 36)
    clean = lm.pretrain_batch(batch, pauses=False)["input_ids"]
    assert torch.equal(clean, batch["input_ids"])


# ----------------------------------------------------------------------------------------------------------------------
# Pause-inference
# ----------------------------------------------------------------------------------------------------------------------
def _manual_decode(model, ids, pause_id, eos_id, steps, mask_pause=True):
    """Step-by-step greedy decoding with no cache, no padding: the reference for generate()."""
    ids, out = list(ids), []
    for _ in range(steps):
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].clone()
        if mask_pause:
            logits[pause_id] = float("-inf")
        token = int(logits.argmax())
        if token == eos_id:
            break
        out.append(token)
        ids.append(token)
    return out


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_generate_equals_manual_decode_never_emits_pause_one_prefill(tok, arch):
    torch.manual_seed(1)
    lm = PauseTokenLM(CONFIGS[arch](), tok, num_pauses=3).eval()
    P = lm.pause_token_id

    def favour_pause(module, args, out):  # make <pause> the favourite output, as an untrained logit could be
        out = out.clone()
        out[..., P] += 100.0
        return out

    lm.model.get_output_embeddings().register_forward_hook(favour_pause)
    prompt = lm.tokenizer("12+345=", add_special_tokens=False)["input_ids"]
    unmasked = _manual_decode(lm.model, prompt + [P] * 3, P, -1, 6, mask_pause=False)
    assert P in unmasked, "the test must be able to catch an emitted pause"
    expected = _manual_decode(lm.model, prompt + [P] * 3, P, tok.eos_token_id, 6)

    calls = []
    hook = lm.model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"].shape[1]), with_kwargs=True)
    got = lm.generate([prompt], max_new_tokens=6)[0]
    hook.remove()
    assert got == expected
    assert P not in got
    assert calls[0] == len(prompt) + 3 and all(c == 1 for c in calls[1:]), f"one prefill then cached steps: {calls}"
    # text in, text out: the same answer
    assert lm.generate(["12+345="], max_new_tokens=6)[0] == lm.tokenizer.decode(expected, skip_special_tokens=True)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_batched_generation_equals_one_by_one(tok, arch):
    torch.manual_seed(2)
    lm = PauseTokenLM(CONFIGS[arch](), tok, num_pauses=4).eval()
    prompts = [lm.tokenizer(p)["input_ids"] for p in ["1+2=", "123+456=", "99+1=", "7 3 5 1=", "5"]]
    batched = lm.generate(prompts, max_new_tokens=5, min_new_tokens=5)
    single = [lm.generate([p], max_new_tokens=5, min_new_tokens=5)[0] for p in prompts]
    assert batched == single
    assert all(len(a) == 5 and lm.pause_token_id not in a for a in batched)
    # filler tokens instead of pauses are a different input, hence (here) a different answer
    assert lm.generate(prompts, max_new_tokens=5, filler_token=".") != batched


# ----------------------------------------------------------------------------------------------------------------------
# Training: both architectures, and the effect the paper relies on
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_both_architectures_pretrain_and_finetune(tok, arch):
    dm = SyntheticReasoningDataModule(batch_format="lm", num_train=256, num_val=32, num_test=32, batch_size=32)
    # GPT-2 gets its tokenizer; the Llama one takes the datamodule's when fitting starts (as from the CLI)
    tokenizer = dm.tokenizer if arch == "gpt2" else None
    lm = PauseTokenLM(CONFIGS[arch](), tokenizer, mode="pretrain", pretrain_pause_fraction=0.1, optimizer=adam(3e-3))
    snapshot = {}

    class Snapshot(pl.Callback):
        def on_train_start(self, trainer, module):
            snapshot["row"] = module.model.get_input_embeddings().weight[module.pause_token_id].detach().clone()

    assert (lm.model is None) == (tokenizer is None)
    trainer = cpu_trainer(max_steps=8, limit_val_batches=1, callbacks=[Snapshot()])
    trainer.fit(lm, dm)
    emb_before = snapshot["row"]
    assert lm.tokenizer.get_vocab() == {**dm.tokenizer.get_vocab(), "<pause>": len(dm.tokenizer)}
    assert math.isfinite(trainer.callback_metrics["train_loss"].item())
    assert not torch.equal(lm.model.get_input_embeddings().weight[lm.pause_token_id], emb_before)
    assert lm.model.config.pause_token_trained


@pytest.mark.slow
def test_pause_finetuning_learns_to_use_its_pauses(tok):
    """After pause-finetuning, the answer is read after M_ft pauses: with M_inf = 0 the model is lost (the paper's
    'M_inf = 0 is catastrophic'), and the pause embedding is trained."""
    torch.manual_seed(0)
    dm = SyntheticReasoningDataModule(num_train=4096, num_val=128, num_test=128, max_digits=2, batch_size=64, seed=1)
    lm = PauseTokenLM(gpt2_config(), dm.tokenizer, num_pauses=6, optimizer=adam(3e-3))
    test = next(iter(dm._loader("test", 128, False)))
    lm.eval()
    with torch.no_grad():
        loss_init = lm.model(**lm.finetune_batch(test)).loss.item()
    lm.train()
    cpu_trainer(max_steps=150, limit_val_batches=0).fit(lm, dm)
    lm.eval()
    with torch.no_grad():
        loss_m6 = lm.model(**lm.finetune_batch(test, num_pauses=6)).loss.item()
        loss_m0 = lm.model(**lm.finetune_batch(test, num_pauses=0)).loss.item()
    assert loss_m6 < 0.6 * loss_init
    assert loss_m0 > loss_m6 + 0.5, (loss_m0, loss_m6)
    # exact match by one teacher-forced pass equals greedy generation's
    em = lm.exact_match(test, num_pauses=6)
    answers = lm.generate(dm.prompts("test"), num_pauses=6, max_new_tokens=5)
    assert em.tolist() == [a == t for a, t in zip(answers, dm.targets("test"))]


# ----------------------------------------------------------------------------------------------------------------------
# Save / resume / load
# ----------------------------------------------------------------------------------------------------------------------
def test_save_resume_keeps_tokenizer_and_pause_embedding(tok, tmp_path):
    dm = SyntheticReasoningDataModule(num_train=256, num_val=32, num_test=32, batch_size=32)
    lm = PauseTokenLM(gpt2_config(), dm.tokenizer, num_pauses=3, optimizer=adam(3e-3))
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    cpu_trainer(max_steps=4, limit_val_batches=1, enable_checkpointing=True, callbacks=[ckpt]).fit(lm, dm)
    path = str(tmp_path / "last.ckpt")
    pause_row = lm.model.get_input_embeddings().weight[lm.pause_token_id].detach().clone()
    meta = torch.load(path, weights_only=True)["pause_lm"]  # plain data: loads with weights_only
    assert meta["pause_token_id"] == lm.pause_token_id and meta["pause_token_trained"]

    # 1. a new stage from the checkpoint: model, tokenizer (with <pause>) and the trained row come back
    again = PauseTokenLM(model=path, num_pauses=3)
    assert again.tokenizer.get_vocab() == lm.tokenizer.get_vocab()
    assert again.pause_token_id == lm.pause_token_id
    torch.testing.assert_close(again.model.get_input_embeddings().weight[again.pause_token_id], pause_row)
    assert again.generate(["12+3="], max_new_tokens=4) == lm.generate(["12+3="], max_new_tokens=4)
    # 2. Lightning's load_from_checkpoint with the original (pause-less) tokenizer: the pause id is re-derived
    loaded = PauseTokenLM.load_from_checkpoint(path, model=gpt2_config(), tokenizer=dm.tokenizer)
    torch.testing.assert_close(loaded.model.get_input_embeddings().weight[loaded.pause_token_id], pause_row)
    assert loaded.model.config.pause_token_trained
    # 3. resuming training restores the step and keeps training the same row
    resumed = PauseTokenLM(gpt2_config(), dm.tokenizer, num_pauses=3, optimizer=adam(3e-3))
    trainer = cpu_trainer(max_steps=6, limit_val_batches=0)
    trainer.fit(resumed, dm, ckpt_path=path)
    assert trainer.global_step == 6
    # 4. a Hugging Face directory round trip
    lm.save_pretrained(tmp_path / "hf")
    from_dir = PauseTokenLM(model=str(tmp_path / "hf"), num_pauses=3)
    assert from_dir.pause_token_id == lm.pause_token_id
    assert from_dir.generate(["12+3="], max_new_tokens=4) == lm.generate(["12+3="], max_new_tokens=4)


def test_stdpt_pauseft_reinitialises_an_untrained_pause_row(tok, tmp_path):
    """A model pretrained without pauses never used its pause row as input: pause-finetuning starts it afresh at the
    mean embedding (the paper adds the token at finetuning), while standard finetuning leaves it."""
    dm = SyntheticReasoningDataModule(batch_format="lm", num_train=128, num_val=32, num_test=32, batch_size=32)
    lm = PauseTokenLM(gpt2_config(), dm.tokenizer, mode="pretrain", pretrain_pause_fraction=0.0, optimizer=adam(1e-2))
    cpu_trainer(max_steps=5, limit_val_batches=0).fit(lm, dm)
    assert not lm.model.config.pause_token_trained
    lm.save_pretrained(tmp_path)
    pause_ft = PauseTokenLM(model=str(tmp_path), num_pauses=4)
    emb = pause_ft.model.get_input_embeddings().weight
    text_rows = [i for i in range(len(pause_ft.tokenizer)) if i != pause_ft.pause_token_id]
    torch.testing.assert_close(emb[pause_ft.pause_token_id], emb[text_rows].mean(0))
    std_ft = PauseTokenLM(model=str(tmp_path), num_pauses=0)
    old = lm.model.get_input_embeddings().weight[lm.pause_token_id]
    torch.testing.assert_close(std_ft.model.get_input_embeddings().weight[std_ft.pause_token_id], old)


# ----------------------------------------------------------------------------------------------------------------------
# DDP
# ----------------------------------------------------------------------------------------------------------------------
class _OrderedData(SyntheticReasoningDataModule):
    """Training examples in a given order (to replay in one process what two DDP ranks see together)."""

    order: list[int] | None = None

    def train_dataloader(self):
        loader = super().train_dataloader()
        if self.order is None:
            return loader
        return torch.utils.data.DataLoader(loader.dataset, batch_size=self.batch_size, sampler=self.order, collate_fn=loader.collate_fn)


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tok):
    """Two ranks of 4 examples each train exactly like one process on the same 8 examples per step."""

    def run(trainer, batch_size, order=None):
        torch.manual_seed(0)
        dm = _OrderedData(num_train=64, num_val=16, num_test=16, min_digits=3, max_digits=3, batch_size=batch_size)
        # 3+3-digit sums have 3 or 4 digits: keep 4-digit ones so both ranks average over as many target tokens
        dm.pairs = {k: [(p, t) for p, t in v if len(t) == 4] for k, v in dm.pairs.items()}
        dm._data, dm.order = None, order
        # SGD, not Adam: Adam turns float noise on exactly-zero gradients (e.g. key biases) into +-lr steps
        lm = PauseTokenLM(gpt2_config(), dm.tokenizer, num_pauses=2, optimizer=functools.partial(torch.optim.SGD, lr=0.5))
        trainer.fit(lm, dm)
        return lm, len(dm.pairs["train"])

    two, n = run(ddp_trainer(max_steps=3, limit_val_batches=0), 4)
    # Lightning's DistributedSampler (shuffled, seed 0, epoch 0): rank r takes perm[r::2]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    ranks = [perm[0::2], perm[1::2]]
    order = [i for k in range(0, n // 2, 4) for rank in ranks for i in rank[k : k + 4]]
    one, _ = run(cpu_trainer(max_steps=3, limit_val_batches=0), 8, order)
    torch.manual_seed(0)
    start = PauseTokenLM(gpt2_config(), tok, num_pauses=2).model.get_input_embeddings().weight
    pause = one.pause_token_id
    assert (one.model.get_input_embeddings().weight[pause] - start[pause]).abs().max() > 1e-3, "the pause row must train"
    for (name, a), b in zip(one.state_dict().items(), two.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


# ----------------------------------------------------------------------------------------------------------------------
# Clear errors, before training
# ----------------------------------------------------------------------------------------------------------------------
def test_tokenizer_without_pause_cannot_load_a_pause_checkpoint(tok, tmp_path):
    dm = SyntheticReasoningDataModule(num_train=64, num_val=16, num_test=16, batch_size=16)
    lm = PauseTokenLM(gpt2_config(), dm.tokenizer, num_pauses=2)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    cpu_trainer(max_steps=1, limit_val_batches=0, enable_checkpointing=True, callbacks=[ckpt]).fit(lm, dm)
    path = str(tmp_path / "last.ckpt")
    lm.save_pretrained(tmp_path / "hf")
    hf_model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    # a pause-trained model alone, with a tokenizer lacking <pause>: the pause id cannot be checked -> error
    with pytest.raises(ValueError, match="trained with the pause token '<pause>' at id 22, but the tokenizer has no"):
        PauseTokenLM(hf_model, dm.tokenizer)
    # a tokenizer without <pause> that is not the checkpoint's own (another vocabulary) -> error
    other = char_tokenizer("abc" + ALPHABET)
    for model in (path, str(tmp_path / "hf")):
        with pytest.raises(ValueError, match="has no '<pause>' token and is not the one saved with the model"):
            PauseTokenLM(model=model, tokenizer=other)
    with pytest.raises(ValueError, match="tokenizer differs|trained with"):
        PauseTokenLM.load_from_checkpoint(path, model=gpt2_config(), tokenizer=other)
    # the checkpoint's own text vocabulary (e.g. the datamodule's tokenizer, as the CLI passes it): the pause is
    # re-added at the id the model was trained with
    same = PauseTokenLM(model=path, tokenizer=dm.tokenizer)
    assert same.pause_token_id == lm.pause_token_id == 22
    assert same.tokenizer.get_vocab() == lm.tokenizer.get_vocab()


def test_prompt_longer_than_context_minus_pauses(tok):
    lm = PauseTokenLM(gpt2_config(), tok, num_pauses=10)  # context 64
    ok = "1" * 50
    assert len(lm.generate([ok], max_new_tokens=4)) == 1
    with pytest.raises(ValueError, match=r"more than the context \(64\) minus num_pauses \(10\) = 54"):
        lm.generate(["1" * 55], max_new_tokens=1)
    with pytest.raises(ValueError, match="max_new_tokens <= 4"):
        lm.generate([ok], max_new_tokens=5)
    dm = SyntheticReasoningDataModule(num_train=64, num_val=16, num_test=16)
    too_many = PauseTokenLM(gpt2_config(), dm.tokenizer, num_pauses=60)
    with pytest.raises(ValueError, match="need 73 positions but the model's context is 64"):
        cpu_trainer(max_steps=1).fit(too_many, dm)


def test_bad_arguments(tok):
    with pytest.raises(ValueError, match="`num_pauses` must be an integer >= 0"):
        PauseTokenLM(gpt2_config(), tok, num_pauses=-1)
    lm = PauseTokenLM(gpt2_config(), tok, num_pauses=2)
    with pytest.raises(ValueError, match="`num_pauses` must be an integer >= 0"):
        lm.generate(["1+1="], num_pauses=-2)
    with pytest.raises(ValueError, match="pretrain_pause_fraction"):
        PauseTokenLM(gpt2_config(), tok, pretrain_pause_fraction=1.5)
    with pytest.raises(ValueError, match="`mode`"):
        PauseTokenLM(gpt2_config(), tok, mode="inference")
    deferred = PauseTokenLM(gpt2_config())  # no tokenizer: built in setup from the datamodule's
    with pytest.raises(RuntimeError, match="not built yet"):
        deferred.generate(["1+1="])
    with pytest.raises(ValueError, match="PauseTokenLM has no tokenizer"):
        cpu_trainer(max_steps=1).fit(deferred, DigitsDataModule())
    with pytest.raises(TypeError, match="causal LM"):
        PauseTokenLM(torch.nn.Linear(2, 2), tok)
    with pytest.raises(ValueError, match="filler_token"):
        lm.generate(["1+1="], filler_token="..")
    with pytest.raises(TypeError, match="list of prompts"):
        lm.generate("1+1=")
    # batches of the other mode: caught in setup, before any step
    dm = SyntheticReasoningDataModule(batch_format="lm", num_train=64, num_val=16, num_test=16)
    with pytest.raises(ValueError, match="use mode='pretrain'"):
        cpu_trainer(max_steps=1).fit(PauseTokenLM(gpt2_config(), dm.tokenizer, mode="finetune"), dm)
    with pytest.raises(ValueError, match="different tokenizer"):
        cpu_trainer(max_steps=1).fit(PauseTokenLM(gpt2_config(), char_tokenizer("ab" + ALPHABET), mode="pretrain"), dm)


# ----------------------------------------------------------------------------------------------------------------------
# Held-out review (issue 18)
def test_a_block_that_fills_the_context_trains_every_token_once(tok):
    # a packed pretraining block as long as the context: inserting 10% pauses must not drop its last tokens
    from lightning_methods.pause_lm import IGNORE_INDEX

    lm = PauseTokenLM(gpt2_config(), tok, mode="pretrain", pretrain_pause_fraction=0.1)
    context = lm.context_length
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(tok), (3, context), generator=g)
    inputs = lm.pretrain_batch({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, pauses=True)
    assert inputs["input_ids"].shape[1] == context  # fits the model
    assert inputs["input_ids"].shape[0] == 6  # each block spilled into a second row
    # every real token but each block's first is a target exactly once (HF predicts labels[1:])
    targets = inputs["labels"][:, 1:]
    trained = targets[targets != IGNORE_INDEX]
    assert len(trained) == 3 * (context - 1)
    for row in range(3):  # and the targets are the block's tokens, all of them, in order
        first, extra = inputs["labels"][row, 1:], inputs["labels"][3 + row, 1:]
        got = torch.cat([first[first != IGNORE_INDEX], extra[extra != IGNORE_INDEX]])
        assert torch.equal(got, ids[row, 1:])
    lm.model(**inputs).loss.backward()  # and the model takes the batch


def test_generation_stops_at_the_models_end_tokens(tok):
    lm = PauseTokenLM(gpt2_config(), tok, num_pauses=2)
    turn_end = tok.convert_tokens_to_ids("?")
    lm.model.generation_config.eos_token_id = [tok.eos_token_id, turn_end]  # a chat model's list of end tokens
    assert lm.eos_token_ids == [tok.eos_token_id, turn_end]
    calls = {}

    def fake_generate(input_ids, **kwargs):  # the model "answers" 5, then its turn-end token, then junk
        calls.update(kwargs)
        tail = torch.tensor([[5, turn_end, 7]] * len(input_ids))
        return torch.cat([input_ids, tail], dim=1)

    lm.model.generate = fake_generate
    assert lm.generate([[1, 2]], max_new_tokens=3) == [[5]]
    assert calls["eos_token_id"] == [tok.eos_token_id, turn_end]


def test_the_callers_model_is_not_modified_and_two_variants_share_a_base(tok):
    base = AutoModelForCausalLM.from_config(gpt2_config(vocab_size=len(tok)))
    rows = base.get_input_embeddings().weight.shape[0]
    first = PauseTokenLM(base, tok, num_pauses=2)
    second = PauseTokenLM(base, tok, num_pauses=5)  # failed before: the base already had a pause row, the tokenizer not
    assert base.get_input_embeddings().weight.shape[0] == rows and getattr(base.config, "pause_token_id", None) is None
    assert first.model is not base and second.model is not first.model
    assert first.pause_token_id == second.pause_token_id == len(tok)


def test_model_directory_with_from_pretrained_options_and_dtype(tok, tmp_path):
    AutoModelForCausalLM.from_config(gpt2_config(vocab_size=len(tok))).to(torch.bfloat16).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    as_is = PauseTokenLM(model=str(tmp_path / "m"), num_pauses=2)
    assert next(as_is.model.parameters()).dtype == torch.bfloat16
    as_float = PauseTokenLM(model=str(tmp_path / "m"), num_pauses=2, model_kwargs={"dtype": torch.float32})
    assert next(as_float.model.parameters()).dtype == torch.float32
    with pytest.raises(TypeError, match="model_kwargs"):
        PauseTokenLM(model=str(tmp_path / "m"), model_kwargs="float32")


def test_load_from_checkpoint_needs_nothing_for_a_python_built_checkpoint(tok, tmp_path):
    dm = SyntheticReasoningDataModule(num_train=64, num_val=16, num_test=16, batch_size=16)
    lm = PauseTokenLM(gpt2_config(), dm.tokenizer, num_pauses=3, optimizer=adam(3e-3))
    trainer = cpu_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(lm, dm)
    trainer.save_checkpoint(tmp_path / "lm.ckpt")
    loaded = PauseTokenLM.load_from_checkpoint(tmp_path / "lm.ckpt")  # no model=, no tokenizer=
    assert loaded.num_pauses == 3 and loaded.pause_token_id == lm.pause_token_id
    for a, b in zip(loaded.model.state_dict().values(), lm.model.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert loaded.generate(["12+3="], max_new_tokens=4) == lm.generate(["12+3="], max_new_tokens=4)


def test_lora_adapters_train_only_the_pause_row_of_the_embeddings_and_reload(tok, tmp_path):
    from peft import LoraConfig

    dm = SyntheticReasoningDataModule(num_train=64, num_val=16, num_test=16, batch_size=16)
    base = AutoModelForCausalLM.from_config(llama_config(vocab_size=len(dm.tokenizer)))
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    lm = PauseTokenLM(base, dm.tokenizer, num_pauses=3, optimizer=adam(1e-2), peft_config=lora)
    pause = lm.pause_token_id
    emb_before = lm.model.get_input_embeddings().weight.detach().clone()
    base_before = {k: v.detach().clone() for k, v in lm.model.named_parameters() if "lora_" not in k and "token_adapter" not in k}
    trainable = {k for k, p in lm.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in k or "token_adapter" in k for k in trainable)
    trainer = cpu_trainer(max_steps=5, limit_val_batches=0)
    trainer.fit(lm, dm)
    # the input embeddings as the model now sees them: every text row exactly as before, the pause row trained
    ids = torch.arange(len(lm.tokenizer))
    after = lm.model.get_input_embeddings()(ids).detach()
    text = ids != pause
    assert torch.equal(after[text], emb_before[: len(ids)][text])
    assert not torch.allclose(after[pause], emb_before[pause])
    for k, v in lm.model.named_parameters():
        if k in base_before:
            assert torch.equal(v.detach(), base_before[k]), k  # the base model is frozen
    # the checkpoint holds the adapters and their config: load_from_checkpoint rebuilds the same model
    trainer.save_checkpoint(tmp_path / "lora.ckpt")
    loaded = PauseTokenLM.load_from_checkpoint(tmp_path / "lora.ckpt")
    assert loaded.peft_config is not None
    assert loaded.generate(["12+3="], max_new_tokens=4) == lm.generate(["12+3="], max_new_tokens=4)
    # a new stage from the LoRA checkpoint starts from the merged weights
    merged = PauseTokenLM(model=str(tmp_path / "lora.ckpt"), num_pauses=3)
    assert merged.generate(["12+3="], max_new_tokens=4) == lm.generate(["12+3="], max_new_tokens=4)
    lm.save_pretrained(tmp_path / "adapters")  # PEFT's adapter directory: not a model to start a stage from
    with pytest.raises(ValueError, match="PEFT adapter directory"):
        PauseTokenLM(model=str(tmp_path / "adapters"), num_pauses=3)


# ----------------------------------------------------------------------------------------------------------------------
# Hostile use (issue 18): other architectures, LoRA resume, end tokens and options through checkpoints
def qwen2_config(tied, **kw):
    from transformers import Qwen2Config

    return Qwen2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, tie_word_embeddings=tied, **kw,
    )


def neox_config(**kw):
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64, **kw)


@pytest.mark.parametrize(
    "arch", [("qwen2-tied", ["q_proj", "v_proj"]), ("qwen2-untied", ["q_proj", "v_proj"]), ("gpt-neox", ["query_key_value"])],
    ids=lambda a: a[0],
)
def test_lora_on_qwen2_tied_untied_and_gpt_neox_trains_only_the_pause_row(arch):
    from peft import LoraConfig

    name, targets = arch
    dm = SyntheticReasoningDataModule(num_train=32, num_val=16, num_test=16, batch_size=16)
    config = neox_config(vocab_size=len(dm.tokenizer)) if name == "gpt-neox" else qwen2_config(name == "qwen2-tied", vocab_size=len(dm.tokenizer))
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0)
    lm = PauseTokenLM(AutoModelForCausalLM.from_config(config), dm.tokenizer, num_pauses=2, optimizer=adam(1e-2), peft_config=lora)
    before = lm.model.get_input_embeddings().weight.detach().clone()
    cpu_trainer(max_steps=2, limit_val_batches=0).fit(lm, dm)
    ids = torch.arange(len(lm.tokenizer))
    after = lm.model.get_input_embeddings()(ids).detach()
    text = ids != lm.pause_token_id
    assert torch.equal(after[text], before[: len(ids)][text])
    assert not torch.allclose(after[lm.pause_token_id], before[lm.pause_token_id])


def test_lora_keeps_the_pause_row_beside_the_callers_trainable_tokens(tok):
    from peft import LoraConfig

    lora = LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[5])
    lm = PauseTokenLM(AutoModelForCausalLM.from_config(llama_config(vocab_size=len(tok))), tok, num_pauses=2, peft_config=lora)
    assert lm.peft_config.trainable_token_indices == [5, lm.pause_token_id]  # before: [5], the pause row frozen
    per_layer = LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [5]})
    lm = PauseTokenLM(AutoModelForCausalLM.from_config(llama_config(vocab_size=len(tok))), tok, num_pauses=2, peft_config=per_layer)
    assert lm.peft_config.trainable_token_indices == {"embed_tokens": [5, lm.pause_token_id]}


def test_lora_resume_restores_adapters_pause_row_and_optimizer(tmp_path):
    # resumed at an epoch boundary (the datamodules' loaders restart an interrupted epoch from its start, as Lightning
    # warns), a LoRA run ends exactly where the uninterrupted run does
    from peft import LoraConfig

    dm = SyntheticReasoningDataModule(num_train=32, num_val=16, num_test=16, batch_size=16, shuffle=False)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(qwen2_config(False, vocab_size=len(dm.tokenizer)))
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)

    def module():
        torch.manual_seed(1)  # the same adapter initialisation every time
        return PauseTokenLM(base, dm.tokenizer, num_pauses=2, optimizer=adam(1e-2), peft_config=lora)

    whole = module()
    cpu_trainer(max_steps=4, limit_val_batches=0).fit(whole, dm)
    saver = ModelCheckpoint(dirpath=tmp_path, filename="lora", every_n_train_steps=2, save_top_k=-1)
    cpu_trainer(max_steps=2, limit_val_batches=0, enable_checkpointing=True, callbacks=[saver]).fit(module(), dm)
    resumed = module()
    trainer = cpu_trainer(max_steps=4, limit_val_batches=0)
    trainer.fit(resumed, dm, ckpt_path=tmp_path / "lora.ckpt")
    assert trainer.global_step == 4
    for (name, a), (_, b) in zip(whole.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(a, b, msg=name)
    # a module built without the adapters cannot take the checkpoint: said before any step
    with pytest.raises(ValueError, match="holds LoRA adapters"):
        cpu_trainer(max_steps=5, limit_val_batches=0).fit(
            PauseTokenLM(base, dm.tokenizer, num_pauses=2), dm, ckpt_path=tmp_path / "lora.ckpt"
        )


def test_a_checkpoint_keeps_the_generation_configs_list_of_end_tokens(tmp_path):
    dm = SyntheticReasoningDataModule(num_train=32, num_val=16, num_test=16, batch_size=16)
    lm = PauseTokenLM(qwen2_config(True), dm.tokenizer, num_pauses=2)
    turn_end = dm.tokenizer.convert_tokens_to_ids("?")
    lm.model.generation_config.eos_token_id = [dm.tokenizer.eos_token_id, turn_end]  # a chat model's end tokens
    trainer = cpu_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(lm, dm)
    trainer.save_checkpoint(tmp_path / "chat.ckpt")
    # before: both fell back to the config's single EOS, so a chat model never stopped at its turn end
    assert PauseTokenLM.load_from_checkpoint(tmp_path / "chat.ckpt").eos_token_ids == [dm.tokenizer.eos_token_id, turn_end]
    assert PauseTokenLM(model=str(tmp_path / "chat.ckpt")).eos_token_ids == [dm.tokenizer.eos_token_id, turn_end]


def test_a_model_loaded_from_a_directory_trains_with_dropout_on(tok, tmp_path):
    AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=64, vocab_size=len(tok))).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    lm = PauseTokenLM(model=str(tmp_path), num_pauses=2)
    # from_pretrained returns eval mode and Lightning keeps submodule modes: dropout was off in training
    assert all(m.training for m in lm.modules())


def test_model_kwargs_with_configs_checkpoints_and_model_objects(tok, tmp_path):
    lm = PauseTokenLM(gpt2_config(), tok, num_pauses=2, model_kwargs={"dtype": torch.bfloat16, "attn_implementation": "eager"})
    assert next(lm.model.parameters()).dtype == torch.bfloat16  # before: silently float32
    assert lm.model.config._attn_implementation == "eager"
    trainer = cpu_trainer(max_steps=1, limit_val_batches=0, precision="bf16-true")
    trainer.fit(lm, SyntheticReasoningDataModule(num_train=16, num_val=16, num_test=16, batch_size=16))
    trainer.save_checkpoint(tmp_path / "bf16.ckpt")
    loaded = PauseTokenLM.load_from_checkpoint(tmp_path / "bf16.ckpt")
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    assert loaded.model.config._attn_implementation == "eager"  # before: the options (a torch dtype) were not saved
    stage = PauseTokenLM(model=str(tmp_path / "bf16.ckpt"), model_kwargs={"torch_dtype": "float32"})
    assert next(stage.model.parameters()).dtype == torch.float32  # before: the option was ignored
    with pytest.raises(ValueError, match="model directory"):  # a from_pretrained-only option with a config
        PauseTokenLM(gpt2_config(), tok, model_kwargs={"revision": "main"})
    with pytest.raises(ValueError, match="model object is used as it is"):
        PauseTokenLM(AutoModelForCausalLM.from_config(gpt2_config(vocab_size=len(tok))), tok, model_kwargs={"dtype": "float32"})


def test_lora_with_the_embedding_in_modules_to_save(tok):
    # the usual recipe when adding tokens; before, the pause row was also put in trainable_token_indices and the
    # first training step failed inside PEFT ("TrainableTokensLayer wraps an unknown layer type")
    from peft import LoraConfig

    dm = SyntheticReasoningDataModule(num_train=16, num_val=16, num_test=16, batch_size=16)
    base = AutoModelForCausalLM.from_config(qwen2_config(False, vocab_size=len(dm.tokenizer)))
    lora = LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"])
    lm = PauseTokenLM(base, dm.tokenizer, num_pauses=2, optimizer=adam(1e-2), peft_config=lora)
    before = lm.model.get_input_embeddings()(torch.tensor([lm.pause_token_id])).detach().clone()
    cpu_trainer(max_steps=1, limit_val_batches=0).fit(lm, dm)
    assert not torch.allclose(lm.model.get_input_embeddings()(torch.tensor([lm.pause_token_id])), before)
    both = LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"], trainable_token_indices=[3])
    with pytest.raises(ValueError, match="modules_to_save trains the whole input embedding"):
        PauseTokenLM(base, dm.tokenizer, num_pauses=2, peft_config=both)
