"""Tokenizers and the token-level conventions shared by :mod:`pause_lm` and the language-model datamodules (private;
in `lightning_methods` so that the core never imports `datamodules`).

Everything here is offline: tokenizers are trained by the ``tokenizers`` library on local text (seconds) or built
from a fixed character set, and saved as Hugging Face tokenizer directories (``tokenizer.json`` +
``tokenizer_config.json``) that ``AutoTokenizer.from_pretrained`` reloads.

The conventions (one place, so that finetuning data and generation tokenize a prompt identically):

* a **prompt** is encoded with the tokenizer's own special tokens (``add_special_tokens=True``: a BOS for Llama-style
  tokenizers, nothing for ours), a **target** without them, followed by EOS, so that a model learns to stop;
* batches are dictionaries of right-padded ``int64`` tensors with ``0/1`` masks: ``input_ids`` / ``attention_mask``
  for language modelling, ``prompt_ids`` / ``prompt_mask`` / ``target_ids`` / ``target_mask`` for prompt/target pairs.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "PAD",
    "EOS",
    "UNK",
    "char_tokenizer",
    "train_bpe_tokenizer",
    "load_tokenizer",
    "tokenizer_to_files",
    "tokenizer_from_files",
    "encode_prompt",
    "encode_prompts",
    "encode_target",
    "encode_targets",
    "pad_sequences",
    "lm_collate",
    "prompt_target_collate",
]

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
_SPECIALS = [PAD, EOS, UNK]


def _wrap(backend: Any) -> Any:
    """A ``transformers`` fast tokenizer around a ``tokenizers.Tokenizer`` with our pad/eos/unk tokens."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, eos_token=EOS, unk_token=UNK)


def char_tokenizer(alphabet: str) -> Any:
    """A character-level tokenizer over ``alphabet`` (one token per character, plus ``<pad>``, ``<eos>``, ``<unk>``).

    Decoding concatenates characters (no spaces inserted), so ``decode(encode(s)) == s`` for any ``s`` over the
    alphabet.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = list(dict.fromkeys(alphabet))
    vocab = {token: i for i, token in enumerate(_SPECIALS + chars)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return _wrap(backend)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> Any:
    """Train a byte-level BPE tokenizer (GPT-2 style) of ``vocab_size`` tokens on ``texts``, offline.

    Byte-level means every string is encodable (no ``<unk>``) and ``decode(encode(s)) == s``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if not isinstance(vocab_size, int) or vocab_size < 300:
        raise ValueError(f"`vocab_size` must be an integer >= 300 (256 bytes + specials + merges), got {vocab_size!r}.")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return _wrap(backend)


def load_tokenizer(tokenizer: Any) -> Any:
    """A tokenizer object from a tokenizer object (returned as is) or a Hugging Face tokenizer directory (offline)."""
    from transformers import PreTrainedTokenizerBase

    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    if isinstance(tokenizer, (str, os.PathLike)):
        path = Path(tokenizer)
        if not path.is_dir() or not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
            raise ValueError(
                f"`tokenizer={str(tokenizer)!r}` is not a tokenizer directory (one holding `tokenizer.json` or "
                "`tokenizer_config.json`, as `tokenizer.save_pretrained(dir)` writes). Nothing is downloaded: pass a "
                "local directory or a tokenizer object."
            )
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    raise TypeError(
        f"`tokenizer` must be a Hugging Face tokenizer or the path of a tokenizer directory, got {type(tokenizer).__name__}."
    )


def tokenizer_to_files(tokenizer: Any) -> dict[str, str]:
    """The files ``save_pretrained`` writes for ``tokenizer``, as ``{name: text}`` (plain data for a checkpoint)."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_text(encoding="utf-8") for p in Path(tmp).iterdir() if p.is_file()}


def tokenizer_from_files(files: dict[str, str]) -> Any:
    """Rebuild a tokenizer from :func:`tokenizer_to_files`' output."""
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in files.items():
            Path(tmp, name).write_text(text, encoding="utf-8")
        return load_tokenizer(tmp)


def encode_prompts(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of prompts: with the tokenizer's own special tokens (e.g. a BOS), no EOS appended."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=True)["input_ids"]]


def encode_targets(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of targets (answers): no special tokens, then EOS so the model learns where an answer ends."""
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no EOS token; targets need one to mark the end of an answer.")
    if not texts:
        return []
    return [list(ids) + [tokenizer.eos_token_id] for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """:func:`encode_prompts` of one prompt."""
    return encode_prompts(tokenizer, [text])[0]


def encode_target(tokenizer: Any, text: str) -> list[int]:
    """:func:`encode_targets` of one target."""
    return encode_targets(tokenizer, [text])[0]


def pad_sequences(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad lists of token ids to one ``(N, L)`` tensor and its ``0/1`` mask, on the ``"right"`` or ``"left"``."""
    if side not in ("right", "left"):
        raise ValueError(f"`side` must be 'right' or 'left', got {side!r}.")
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if not len(s):
            continue
        sl = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[i, sl] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def lm_collate(pad_id: int):
    """Collate ``{"input_ids": list[int]}`` examples into right-padded ``input_ids`` / ``attention_mask``."""

    def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
        ids, mask = pad_sequences([e["input_ids"] for e in examples], pad_id)
        return {"input_ids": ids, "attention_mask": mask}

    return collate


def prompt_target_collate(pad_id: int):
    """Collate ``{"prompt_ids", "target_ids"}`` examples into right-padded id/mask tensors for both parts."""

    def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
        prompt_ids, prompt_mask = pad_sequences([e["prompt_ids"] for e in examples], pad_id)
        target_ids, target_mask = pad_sequences([e["target_ids"] for e in examples], pad_id)
        return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "target_ids": target_ids, "target_mask": target_mask}

    return collate
