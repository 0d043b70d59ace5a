"""Pause tokens: pause-pretraining, pause-finetuning and pause-inference for any Hugging Face causal LM.

Goyal, Ji, Rawat, Menon, Kumar, Nagarajan. *Think before you speak: Training language models with pause tokens.*
ICLR 2024, arXiv:2310.02226.

A decoder-only model computes the ``(K+1)``-th token from ``K`` hidden vectors per layer. The paper gives it more:
a new learnable token ``<pause>`` is appended ``M`` times to the prefix, and the model's outputs are ignored until
the last pause, so the answer is computed from ``K + M`` vectors. Read next to the paper:

* **the pause token** (Section 2): one new token outside the text vocabulary with its own embedding row
  (:meth:`PauseTokenLM._add_pause_token`; the row starts at the mean embedding and is trained like every other
  parameter);
* **pause-pretraining** (Section 3.1, Algorithm 1): ``M_pt`` pauses at uniformly random positions of each
  pretraining sequence; a packed block that no longer fits the context spills into a second row whose labels cover
  only the spilled tokens (:func:`split_overflow`: the paper trims instead, which never trains a full block's last
  ~10%); next-token
  cross-entropy everywhere except at the positions whose *next* token is a pause, ``S_ignore = {k : p~_{k+1} =
  <pause>}`` (:func:`pretrain_labels`);
* **pause-finetuning** (Section 3.2, Algorithm 2): ``M_ft`` pauses appended to the prefix; the loss is on the target
  tokens only (:func:`finetune_inputs`);
* **pause-inference** (Section 3.3, Algorithm 3): ``M_inf`` pauses appended to the prompt, the first answer token
  read at the last pause, then ordinary decoding (:meth:`PauseTokenLM.generate`);
* **the four variants** (Section 4): ``StdPT_StdFT``, ``StdPT_PauseFT``, ``PausePT_StdFT``, ``PausePT_PauseFT`` are
  this one module with pauses on or off: ``mode="pretrain"`` with ``pretrain_pause_fraction`` 0 or ~0.1, then
  ``mode="finetune"`` with ``num_pauses`` 0 or ``M_ft``, started from the pretraining checkpoint.
"""

from __future__ import annotations

import copy
import enum
import inspect
import os
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import MeanMetric
from transformers import AddedToken, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from lightning_methods._tokenizer import (
    encode_prompts,
    load_tokenizer,
    pad_sequences,
    tokenizer_from_files,
    tokenizer_to_files,
)
from lightning_methods._utils import _cli_given_hparams, save_hparams

__all__ = ["PauseTokenLM", "insert_pauses", "pretrain_labels", "finetune_inputs", "IGNORE_INDEX"]

#: the label value Hugging Face losses ignore
IGNORE_INDEX = -100
_CKPT_KEY = "pause_lm"


# ----------------------------------------------------------------------------------------------------------------------
# Batch construction: pure functions on tensors, so that they can be tested on hand-built sequences.
# ----------------------------------------------------------------------------------------------------------------------
def _compact(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's real tokens (``mask == 1``) to the front, in order: any padding side becomes right padding."""
    order = torch.sort((mask == 0).to(torch.int8), dim=1, stable=True).indices
    return ids.gather(1, order), mask.gather(1, order)


def insert_pauses(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    pause_token_id: int,
    fraction: float,
    generator: torch.Generator | None = None,
    pad_token_id: int = 0,
    max_length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Insert pauses at uniformly random positions of each sequence, then trim to ``max_length`` (Algorithm 1).

    A row with ``n`` real tokens (``attention_mask == 1``) gets exactly ``m = round(fraction * n)`` pauses. The
    pause-injected row has ``n' = min(n + m, W)`` slots, ``W`` being the batch width plus room for the pauses, at most
    ``max_length`` (the context): the ``m`` pauses take ``m`` distinct slots drawn uniformly among the ``n'``, and the
    other slots hold the row's first ``n' - m`` tokens in order. A row that fits keeps all its tokens; a row at the
    context length (a packed pretraining block) is trimmed back to it, as the paper trims a pause-injected sequence.
    Padding is never a candidate slot: a pause always sits between (or before) real tokens.

    Args:
        input_ids: ``(N, L)`` token ids, padded on either side.
        attention_mask: ``(N, L)`` 0/1 mask of real tokens; ``None`` means no padding.
        pause_token_id: id of ``<pause>``.
        fraction: pauses per real token (the paper uses 10% of the sequence length).
        generator: random generator on the device of ``input_ids`` (for reproducible positions).
        pad_token_id: id written into padding.
        max_length: longest allowed row (the model's context); ``None`` for no limit.

    Returns:
        ``(ids, mask)`` of shape ``(N, W)``, right-padded.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    ids, mask = _compact(input_ids, attention_mask)
    n = mask.sum(dim=1, keepdim=True)
    m = torch.round(n.to(torch.float64) * fraction).long()
    width = ids.shape[1] + int(m.max()) if m.numel() else ids.shape[1]
    if max_length is not None:
        width = max(ids.shape[1], min(width, max_length))
    new_n = torch.minimum(n + m, torch.full_like(n, width))
    j = torch.arange(width, device=ids.device).unsqueeze(0)
    slots = j < new_n
    # m distinct uniform slots among the n' ones: the m smallest of n' i.i.d. uniforms
    scores = torch.rand((ids.shape[0], width), generator=generator, device=ids.device).masked_fill(~slots, 2.0)
    is_pause = scores.argsort(dim=1).argsort(dim=1) < m
    # the k-th non-pause slot takes the k-th real token
    source = (slots & ~is_pause).long().cumsum(dim=1) - 1
    padded = torch.cat([ids, ids.new_full((ids.shape[0], width - ids.shape[1]), pad_token_id)], dim=1)
    out = padded.gather(1, source.clamp(min=0))
    out = torch.where(is_pause, torch.full_like(out, pause_token_id), out)
    out = torch.where(slots, out, torch.full_like(out, pad_token_id))
    return out, slots.long()


def split_overflow(
    ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, context: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fit right-padded rows longer than ``context`` into the context without dropping any token's training signal.

    Inserting pauses into a packed block that already fills the context makes it ``~10%`` longer. Trimming it back
    would never train on the block's last tokens (9.4% of the text in our real-text benchmark). Instead, a row of
    ``L > context`` real slots keeps its first ``context`` slots and adds a second row holding its last ``context``
    slots, whose labels are ignored where the first row already trains them (absolute positions ``< context``): every
    label is trained exactly once, each with the full preceding context the model can hold.

    Returns:
        ``(ids, mask, labels)`` of width ``min(width, context)``, with one extra row per overflowing row (appended).
    """
    if ids.shape[1] <= context:
        return ids, mask, labels
    length = mask.sum(dim=1)
    over = (length > context).nonzero().squeeze(1)
    start = (length[over] - context).unsqueeze(1)
    cols = start + torch.arange(context, device=ids.device).unsqueeze(0)
    extra_ids, extra_mask = ids[over].gather(1, cols), mask[over].gather(1, cols)
    extra_labels = labels[over].gather(1, cols)
    extra_labels = extra_labels.masked_fill(cols < context, IGNORE_INDEX)  # trained in the first row already
    return (
        torch.cat([ids[:, :context], extra_ids]),
        torch.cat([mask[:, :context], extra_mask]),
        torch.cat([labels[:, :context], extra_labels]),
    )


def pretrain_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, pause_token_id: int) -> torch.Tensor:
    """Labels for (pause-)pretraining, to be passed to a Hugging Face causal LM (which shifts them by one inside).

    The model's output at position ``k`` is trained on ``labels[k + 1]``; putting ``IGNORE_INDEX`` on the pauses
    themselves therefore drops exactly the terms ``k in S_ignore = {k : p~_{k+1} = <pause>}`` of the paper's loss
    (Section 3.1), while the output *at* a pause is still trained on the real token that follows it. Padding is
    ignored too.
    """
    labels = input_ids.masked_fill(input_ids == pause_token_id, IGNORE_INDEX)
    if attention_mask is not None:
        labels = labels.masked_fill(attention_mask == 0, IGNORE_INDEX)
    return labels


def finetune_inputs(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    target_ids: torch.Tensor,
    target_mask: torch.Tensor,
    num_pauses: int,
    insert_token_id: int | None,
    pad_token_id: int,
) -> dict[str, torch.Tensor]:
    """``prompt + num_pauses x <pause> + target`` per row, right-padded, with labels on the target only (Algorithm 2).

    Prompts and targets may be padded on either side. Every row starts at position 0, as in :meth:`PauseTokenLM.generate`
    (which left-pads but gives the model positions counted from the first real token), so training and inference see
    the same positions.

    Returns:
        ``input_ids``, ``attention_mask`` and ``labels`` (``IGNORE_INDEX`` except on target tokens), each ``(N, W)``.
    """
    if num_pauses > 0 and insert_token_id is None:
        raise ValueError("`insert_token_id` is needed when `num_pauses > 0`.")
    prompt, prompt_mask = _compact(prompt_ids, prompt_mask)
    target, target_mask = _compact(target_ids, target_mask)
    n_prompt = prompt_mask.sum(dim=1, keepdim=True)
    n_target = target_mask.sum(dim=1, keepdim=True)
    total = n_prompt + num_pauses + n_target
    width = int(total.max()) if total.numel() else 0
    j = torch.arange(width, device=prompt.device).unsqueeze(0)
    in_prompt = j < n_prompt
    in_pause = (j >= n_prompt) & (j < n_prompt + num_pauses)
    in_target = (j >= n_prompt + num_pauses) & (j < total)
    ids = torch.full((prompt.shape[0], width), pad_token_id, dtype=torch.long, device=prompt.device)
    if prompt.shape[1]:
        ids = torch.where(in_prompt, prompt.gather(1, j.clamp(max=prompt.shape[1] - 1).expand_as(ids)), ids)
    if num_pauses:
        ids = ids.masked_fill(in_pause, insert_token_id)
    if target.shape[1]:
        tj = (j - n_prompt - num_pauses).clamp(0, target.shape[1] - 1)
        ids = torch.where(in_target, target.gather(1, tj), ids)
    labels = ids.masked_fill(~in_target, IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": (j < total).long(), "labels": labels}


# ----------------------------------------------------------------------------------------------------------------------
# The module
# ----------------------------------------------------------------------------------------------------------------------
def _context_length(config: Any) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _stored_config(meta: dict) -> PretrainedConfig:
    from transformers import AutoConfig

    config_dict = dict(meta["config"])
    return AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)


def _stored_peft_config(meta: dict) -> Any:
    from peft import get_peft_config

    stored = {k: v for k, v in meta["peft_config"].items() if v is not None}
    return get_peft_config(stored)


def _read_checkpoint(path: Any) -> dict:
    # mmap: tensors are mapped, not read, so looking at the metadata costs little and the weights are read once
    mmap = isinstance(path, (str, os.PathLike))
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def _load_lightning_checkpoint(path: str, model_kwargs: dict[str, Any] | None = None) -> tuple[PreTrainedModel, Any]:
    """The Hugging Face model and tokenizer stored in a :class:`PauseTokenLM` Lightning checkpoint."""
    checkpoint = _read_checkpoint(path)
    if _CKPT_KEY not in checkpoint:
        raise ValueError(f"`model={path!r}` is not a PauseTokenLM checkpoint (it has no {_CKPT_KEY!r} entry).")
    meta = checkpoint[_CKPT_KEY]
    config = _stored_config(meta)
    model = AutoModelForCausalLM.from_config(config, **_build_kwargs(model_kwargs or {}, "a checkpoint"))
    _restore_generation_config(model, meta)
    if meta.get("peft_config") is not None:  # adapters: rebuild them, load, and merge into the next stage's model
        from peft import get_peft_model

        model = get_peft_model(model, _stored_peft_config(meta))
    state = {k[len("model.") :]: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"`model={path!r}`: the stored weights do not match the stored config: {err}") from err
    if meta.get("peft_config") is not None:
        model = model.merge_and_unload()
    return model, tokenizer_from_files(meta["tokenizer_files"])


# What AutoModelForCausalLM.from_config takes: the options that shape a model built here (from a config or a
# checkpoint), unlike from_pretrained's options about finding and reading files (revision, cache_dir, ...).
_BUILD_KWARGS = ("dtype", "torch_dtype", "attn_implementation", "trust_remote_code")


def _build_kwargs(model_kwargs: dict[str, Any], what: str) -> dict[str, Any]:
    """``model_kwargs`` for ``from_config`` when the module builds the model from ``what`` (a config, a checkpoint)."""
    unknown = sorted(k for k in model_kwargs if k not in _BUILD_KWARGS)
    if unknown:
        raise ValueError(
            f"`model_kwargs` {unknown} only apply when `model` is a model directory (from_pretrained options); "
            f"with {what} the model is built by from_config, which takes {list(_BUILD_KWARGS)}."
        )
    kwargs = dict(model_kwargs)
    if "torch_dtype" in kwargs:  # the older name of `dtype`
        kwargs.setdefault("dtype", kwargs.pop("torch_dtype"))
    if kwargs.get("dtype") == "auto":  # from_config's default already follows the config's dtype
        kwargs.pop("dtype")
    return kwargs


def _base_model(model: Any) -> Any:
    """The Hugging Face model inside a PEFT wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _restore_generation_config(model: Any, meta: dict) -> None:
    # The generation config (a chat model's list of end tokens, ...) is not part of the model config: rebuilt from
    # the config alone, it would fall back to the config's single EOS
    stored = meta.get("generation_config")
    if stored is not None:
        from transformers import GenerationConfig

        _base_model(model).generation_config = GenerationConfig.from_dict(dict(stored))


class PauseTokenLM(pl.LightningModule):
    """Pause-training of any Hugging Face causal LM: delayed next-token prediction with a learnable ``<pause>`` token.

    Adds ``pause_token`` to the tokenizer (a copy: the caller's object is untouched), grows the embedding matrix and
    starts the new row at the mean embedding. Then, by ``mode``:

    * ``"pretrain"``: batches ``{"input_ids", "attention_mask"}`` of text. With ``pretrain_pause_fraction > 0``
      (pause-pretraining) each sequence gets ``round(fraction * length)`` pauses at uniformly random positions (never
      in padding), and predicting a pause is never trained while the output at a pause is trained on the next real
      token. With ``pretrain_pause_fraction=0`` it is standard pretraining. Logs ``train_loss`` and ``val_loss``
      (on clean text, no pauses, so that runs with and without pauses compare).
    * ``"finetune"``: batches ``{"prompt_ids", "prompt_mask", "target_ids", "target_mask"}``. Each example becomes
      ``prompt + num_pauses x <pause> + target``, with the loss on the target only (``num_pauses=0`` is standard
      finetuning). Logs ``train_loss``, ``val_loss``, ``val_exact_match`` and the ``test_`` counterparts; exact match
      is computed in one teacher-forced pass with the pause logit masked, which equals greedy decoding's exact match.

    :meth:`generate` is pause-inference: ``M`` pauses appended to each prompt, one prefill, KV-cached decoding,
    the pause logit masked so it is never emitted, batches left-padded so no padding sits between pauses and answer.

    Args:
        model: a causal LM (``AutoModelForCausalLM``), a config to build one from scratch (its ``vocab_size`` is
            set to the tokenizer's), a Hugging Face model directory, or a ``.ckpt`` written by this module (e.g. the
            pretraining stage, to finetune from it; its tokenizer comes along).
        tokenizer: a Hugging Face tokenizer or a tokenizer directory. Optional: a directory or checkpoint ``model``
            brings its own, and otherwise the model is built when fitting starts, from the datamodule's ``tokenizer``
            (how the CLI configs work; pass it explicitly for ``strategy="ddp_spawn"`` or to generate before fitting).
        pause_token: the pause token's text; it must not be a token of the text vocabulary.
        pretrain_pause_fraction: pauses per real token in pause-pretraining (the paper: 10%); 0 turns them off.
        num_pauses: ``M_ft`` pauses appended to each prompt in finetuning, and the default ``M_inf`` of
            :meth:`generate`; 0 turns them off.
        mode: ``"pretrain"`` or ``"finetune"`` (which batches and loss :meth:`training_step` expects).
        optimizer: a callable building the optimizer from the parameters.
        lr_scheduler: optional callable building a scheduler from the optimizer (stepped every optimizer step).
        seed: seed of the pause positions; each (rank, step, batch) draws from its own stream, so runs and resumed
            runs insert the same pauses.
        model_kwargs: keyword arguments of ``from_pretrained`` when ``model`` is a directory (``dtype``,
            ``attn_implementation``, ``trust_remote_code``, ...); with a config or a checkpoint, those of them that
            shape the model built here (``dtype``, ``attn_implementation``, ``trust_remote_code``) go to
            ``from_config``; a model object is used as it is (``model_kwargs`` with one is an error). The weights train
            in the dtype they are loaded in:
            a bfloat16 release loaded as is trains in pure bfloat16 (no float32 master weights; ``fit`` says so);
            ``model_kwargs={"dtype": "float32"}`` with ``precision="bf16-mixed"`` is mixed precision.
        peft_config: train adapters instead of the whole model: a ``peft.LoraConfig`` (or its dict, as in a YAML
            config). The pause token is added to the base model first; then only the adapters and the pause
            token's embedding row train (PEFT's ``trainable_token_indices``: the other rows stay exactly as they
            were; with the embedding in ``modules_to_save`` it trains whole instead). Checkpoints hold the adapters and the config, and ``load_from_checkpoint`` rebuilds them;
            :meth:`save_pretrained` writes a PEFT adapter directory.

    Note:
        A model object you pass is copied: the module trains (and resizes the embeddings of) its own copy, so the
        object you hold is unchanged and several variants can be built from one loaded base. A directory or a
        checkpoint is loaded once, without a copy.
        Checkpoints carry the tokenizer (with the pause token) and the model config: ``PauseTokenLM(model="x.ckpt",
        mode="finetune", ...)`` starts a new stage from one (the four variants of the paper), and
        ``load_from_checkpoint(path)`` defaults to the stored tokenizer and rejects one with another vocabulary.
        A pause-trained model is never paired with a tokenizer lacking the pause token unless that tokenizer is
        exactly the stored one's text vocabulary (then the pause is re-added at its trained id); otherwise it is
        an error, since the pause row's id would be a guess. :meth:`save_pretrained` writes a plain Hugging Face
        directory (``config.pause_token_id`` set). A model pretrained *without* pauses gets a fresh pause row (the
        mean embedding) when pause-finetuning starts, as the paper adds the token at that point.

    Example::

        >>> from transformers import GPT2Config
        >>> from lightning_methods._tokenizer import char_tokenizer
        >>> tok = char_tokenizer("0123456789+=")
        >>> lm = PauseTokenLM(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64), tok, num_pauses=4)
        >>> lm.pause_token_id == len(tok)  # one new token after the text vocabulary
        True
        >>> len(lm.generate(["12+34="], max_new_tokens=3)[0]) <= 3
        True
    """

    def __init__(
        self,
        model: PreTrainedModel | PretrainedConfig | str,
        tokenizer: PreTrainedTokenizerBase | str | None = None,
        pause_token: str = "<pause>",
        pretrain_pause_fraction: float = 0.1,
        num_pauses: int = 10,
        mode: Literal["pretrain", "finetune"] = "finetune",
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        seed: int = 0,
        model_kwargs: dict[str, Any] | None = None,
        peft_config: Any = None,
    ) -> None:
        super().__init__()
        if model_kwargs is not None and not isinstance(model_kwargs, dict):
            raise TypeError(f"`model_kwargs` must be a dict of from_pretrained arguments, got {type(model_kwargs).__name__}.")
        if model_kwargs is not None:
            # dtypes by name (from_pretrained and from_config take both): the options stay plain data, so they are
            # saved as hyperparameters and load_from_checkpoint rebuilds the model with them (attention kernel...)
            model_kwargs = {k: str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v for k, v in model_kwargs.items()}
        if mode not in ("pretrain", "finetune"):
            raise ValueError(f"`mode` must be 'pretrain' or 'finetune', got {mode!r}.")
        if isinstance(pretrain_pause_fraction, bool) or not 0.0 <= float(pretrain_pause_fraction) < 1.0:
            raise ValueError(
                f"`pretrain_pause_fraction` must be in [0, 1) (the paper uses 0.1; 0 is standard pretraining), got "
                f"{pretrain_pause_fraction!r}."
            )
        _check_num_pauses(num_pauses, "num_pauses")
        if not isinstance(pause_token, str) or not pause_token:
            raise ValueError(f"`pause_token` must be a non-empty string, got {pause_token!r}.")
        # Objects (a model, a config, a tokenizer) are not hyperparameters: a checkpoint must stay plain data
        # (torch.load(weights_only=True)); their content is saved by on_save_checkpoint instead. From the CLI they are
        # plain configs (class_path/init_args) and kept, so load_from_checkpoint(path) rebuilds them.
        given = _cli_given_hparams()
        values = given if given is not None else {"model": model, "tokenizer": tokenizer}
        save_hparams(
            self,
            inspect.currentframe(),
            ignore=[k for k in ("model", "tokenizer") if not isinstance(values.get(k), (str, dict, type(None)))],
        )
        self.pause_token = pause_token
        self.pretrain_pause_fraction = float(pretrain_pause_fraction)
        self.num_pauses = int(num_pauses)
        self.mode = mode
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.seed = int(seed)
        self.peft_config = _peft_config(peft_config)
        self._model_kwargs = dict(model_kwargs or {})
        if self._model_kwargs and isinstance(model, PreTrainedModel):
            raise ValueError(
                "`model_kwargs` apply when PauseTokenLM loads or builds the model (a directory, a config or a "
                "checkpoint); a model object is used as it is: convert it yourself (e.g. `model.to(torch.float32)`)."
            )
        if isinstance(model, PretrainedConfig):
            _build_kwargs(self._model_kwargs, "a config")  # unknown options fail now, not when fitting starts
        self.val_exact_match = MeanMetric()
        self.test_exact_match = MeanMetric()
        self.model: PreTrainedModel | None = None
        self.tokenizer: Any = None
        self.pause_token_id: int | None = None
        self.pad_token_id: int | None = None
        hf_model, saved_tokenizer = self._resolve_model(model, model_kwargs or {})
        if hf_model is model and isinstance(model, PreTrainedModel):
            hf_model = copy.deepcopy(model)  # the caller's object stays as it was (see the Note)
        if tokenizer is None and saved_tokenizer is None:
            # No tokenizer yet (the CLI case: the datamodule has it): the model is built in setup(). A tuple keeps
            # a model object from being registered as a submodule until then.
            self._pending: tuple | None = (hf_model,)
        else:
            self._pending = None
            self._build(hf_model, load_tokenizer(tokenizer if tokenizer is not None else saved_tokenizer), saved_tokenizer)

    # -- building ------------------------------------------------------------------------------------------------------
    @staticmethod
    def _resolve_model(model: Any, model_kwargs: dict[str, Any]) -> tuple[PreTrainedModel | PretrainedConfig, Any]:
        """The model (or config) and, for a directory or checkpoint, the tokenizer saved with it."""
        if isinstance(model, (PreTrainedModel, PretrainedConfig)):
            return model, None
        if isinstance(model, (str, os.PathLike)):
            path = Path(model)
            if path.is_file():
                return _load_lightning_checkpoint(str(path), model_kwargs)
            if path.is_dir() and (path / "config.json").is_file():
                kwargs = {"local_files_only": True, **model_kwargs}
                hf_model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
                has_tok = any((path / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json"))
                return hf_model, (load_tokenizer(str(path)) if has_tok else None)
            if path.is_dir() and (path / "adapter_config.json").is_file():
                raise ValueError(
                    f"`model={str(model)!r}` is a PEFT adapter directory (save_pretrained with `peft_config`), not a "
                    "whole model: start the next stage from the Lightning checkpoint of that run (its adapters are "
                    "merged), or merge them yourself (PeftModel.from_pretrained(base, dir).merge_and_unload()) and "
                    "pass the merged model."
                )
            raise ValueError(
                f"`model={str(model)!r}` is neither a PauseTokenLM checkpoint file nor a Hugging Face model directory "
                "(with config.json). Nothing is downloaded: give a local path, a model or a config."
            )
        raise TypeError(
            "`model` must be a Hugging Face causal LM (e.g. `AutoModelForCausalLM.from_config(cfg)`), a config (e.g. "
            f"`GPT2Config(...)`), a model directory or a PauseTokenLM checkpoint, got {type(model).__name__}."
        )

    @staticmethod
    def _pad_id(tokenizer: Any) -> int:
        for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
            if token_id is not None:
                return int(token_id)
        raise ValueError("The tokenizer has neither a pad nor an EOS token: set `tokenizer.pad_token` before passing it.")

    def _build(self, model: Any, tokenizer: Any, saved_tokenizer: Any = None) -> None:
        tokenizer, model = self._add_pause_token(tokenizer, model, self.pause_token, saved_tokenizer)
        self.tokenizer = tokenizer
        self.pause_token_id = self.tokenizer.convert_tokens_to_ids(self.pause_token)
        self.pad_token_id = self._pad_id(self.tokenizer)
        if self.peft_config is not None:
            from peft import get_peft_model

            config = copy.deepcopy(self.peft_config)
            embedding = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
            # PEFT matches modules_to_save by name suffix; a saved embedding trains whole, the pause row included
            saved = any(embedding == t or embedding.endswith("." + t) for t in (config.modules_to_save or []))
            if saved and config.trainable_token_indices:
                raise ValueError(
                    f"`peft_config`: modules_to_save trains the whole input embedding ({embedding!r}) and "
                    "trainable_token_indices trains some of its rows: PEFT cannot do both on one layer. Keep one: "
                    "without modules_to_save, PauseTokenLM adds the pause row to trainable_token_indices."
                )
            if self.uses_pauses and not saved:  # the new row trains, no other row does (beside rows asked for)
                config.trainable_token_indices = _with_pause_row(config.trainable_token_indices, self.pause_token_id)
            self.peft_config = config  # what the checkpoint records: the adapters exactly as built
            model = get_peft_model(model, config)
        # from_pretrained returns a model in eval mode, and Lightning keeps each submodule's mode when fitting
        # starts: without this, a model loaded from a directory would finetune with dropout off
        model.train(self.training)
        self.model = model

    def _add_pause_token(self, tokenizer: Any, model: Any, pause_token: str, saved_tokenizer: Any = None) -> tuple:
        """Add ``<pause>`` to (a copy of) the tokenizer and a row for it to the embeddings, initialised sensibly.

        A model that already has a pause row (``config.pause_token_id``, set by this module) needs the tokenizer it
        was trained with: either one holding the pause token at that id, or, when the model came with its saved
        tokenizer, exactly that tokenizer's text vocabulary (the pause is then re-added at the same id).
        """
        config = model if isinstance(model, PretrainedConfig) else getattr(model, "config", None)
        model_pause_id = getattr(config, "pause_token_id", None)
        vocab = tokenizer.get_vocab()
        existing = vocab.get(pause_token)
        if model_pause_id is not None and existing is None:
            saved = saved_tokenizer.get_vocab() if saved_tokenizer is not None else None
            if saved is None or saved.get(pause_token) != model_pause_id or {t: i for t, i in saved.items() if t != pause_token} != vocab:
                raise ValueError(
                    f"The model was trained with the pause token {pause_token!r} at id {model_pause_id}, but the "
                    f"tokenizer has no {pause_token!r} token"
                    + (" and is not the one saved with the model" if saved is not None else "")
                    + ": pass the tokenizer saved with the model (leave `tokenizer` unset when `model` is a PauseTokenLM "
                    "checkpoint or a directory written by `save_pretrained`)."
                )
        if model_pause_id is not None and existing is not None and existing != model_pause_id:
            raise ValueError(
                f"The tokenizer has {pause_token!r} at id {existing} but the model was trained with it at id "
                f"{model_pause_id}: pass the tokenizer saved with the model."
            )
        if existing is None:
            tokenizer = copy.deepcopy(tokenizer)
            tokenizer.add_tokens([AddedToken(pause_token, special=True, normalized=False)], special_tokens=True)
        pause_id = tokenizer.convert_tokens_to_ids(pause_token)
        if model_pause_id is not None and pause_id != model_pause_id:  # pragma: no cover - excluded by the checks above
            raise ValueError(f"The pause token got id {pause_id} but the model was trained with it at id {model_pause_id}.")
        vocab_size = max(len(tokenizer), pause_id + 1)

        if isinstance(model, PretrainedConfig):
            config = copy.deepcopy(model)
            # a new model gets the tokenizer's size; a trained model's stored config keeps its (possibly padded) size
            config.vocab_size = vocab_size if model_pause_id is None else max(vocab_size, config.vocab_size)
            # a from-scratch model takes its special ids from the tokenizer, not from the config's defaults; a trained
            # model's stored config keeps its own (e.g. a list of EOS ids)
            if model_pause_id is None:
                for name in ("bos_token_id", "eos_token_id"):
                    setattr(config, name, tokenizer.eos_token_id)
            config.pad_token_id = self._pad_id(tokenizer)
            model = AutoModelForCausalLM.from_config(config, **_build_kwargs(self._model_kwargs, "a config"))
        if not isinstance(model, PreTrainedModel) or model.get_output_embeddings() is None:
            raise TypeError(
                f"`model` must be a causal LM with a language-modelling head (AutoModelForCausalLM), got "
                f"{type(model).__name__}."
            )
        rows = model.get_input_embeddings().weight.shape[0]
        if rows < vocab_size:
            model.resize_token_embeddings(vocab_size, mean_resizing=False)
        trained = bool(getattr(model.config, "pause_token_trained", False))
        if model_pause_id is None or (self.uses_pauses and not trained):
            # First use of the row (a new token, or a model pretrained without pauses that now learns them, as the
            # paper's StdPT_PauseFT does): start at the mean of the text embeddings, a "typical" token.
            self._init_pause_row(model, pause_id, len(tokenizer))
        model.config.pause_token_id = pause_id
        model.config.pause_token = pause_token
        model.config.pause_token_trained = trained
        return tokenizer, model

    @staticmethod
    @torch.no_grad()
    def _init_pause_row(model: PreTrainedModel, pause_id: int, vocab_len: int) -> None:
        text_rows = torch.ones(vocab_len, dtype=torch.bool)
        text_rows[pause_id] = False
        emb = model.get_input_embeddings().weight
        emb[pause_id] = emb[: len(text_rows)][text_rows].mean(dim=0)
        head = model.get_output_embeddings()
        if head.weight is not emb:
            head.weight[pause_id] = head.weight[: len(text_rows)][text_rows].mean(dim=0)
        if getattr(head, "bias", None) is not None:
            head.bias[pause_id] = head.bias[: len(text_rows)][text_rows].mean()

    @property
    def uses_pauses(self) -> bool:
        """Whether this stage trains with pauses in its inputs (pause-pretraining or pause-finetuning)."""
        return (self.pretrain_pause_fraction > 0) if self.mode == "pretrain" else (self.num_pauses > 0)

    @property
    def context_length(self) -> int | None:
        """The model's maximum number of positions (``None`` if its config does not say)."""
        return _context_length(self._require_model().config)

    def _require_model(self) -> PreTrainedModel:
        if self.model is None:
            raise RuntimeError(
                "The model is not built yet: without `tokenizer`, PauseTokenLM builds it when fitting (or validating, "
                "testing, predicting) starts, from the datamodule's tokenizer. Pass `tokenizer=` to use it before."
            )
        return self.model

    # -- checks before training ----------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if self._pending is not None:
            data_tokenizer = getattr(datamodule, "tokenizer", None)
            if data_tokenizer is None:
                raise ValueError(
                    "PauseTokenLM has no tokenizer: pass `tokenizer=` (an object or a directory), or train with a "
                    "datamodule that has a `tokenizer` attribute (TextLMDataModule, PromptTargetDataModule, "
                    "SyntheticReasoningDataModule)."
                )
            self._build(self._pending[0], load_tokenizer(data_tokenizer))
            self._pending = None
        if datamodule is None:
            return
        expected = "lm" if self.mode == "pretrain" else "prompt_target"
        fmt = getattr(datamodule, "batch_format", None)
        if fmt is not None and fmt != expected:
            raise ValueError(
                f"`mode={self.mode!r}` trains on {expected!r} batches but {type(datamodule).__name__} yields {fmt!r} "
                f"batches: use mode={'pretrain' if fmt == 'lm' else 'finetune'!r} or a matching datamodule."
            )
        data_tokenizer = getattr(datamodule, "tokenizer", None)
        if data_tokenizer is not None and data_tokenizer is not self.tokenizer:
            ours = self.tokenizer.get_vocab()
            theirs = data_tokenizer.get_vocab()
            clash = [t for t, i in theirs.items() if t != self.pause_token and ours.get(t) != i]
            if clash:
                raise ValueError(
                    f"{type(datamodule).__name__} tokenizes with a different tokenizer than the module ({len(clash)} "
                    f"tokens differ, e.g. {clash[:3]}): build both from the same tokenizer (its directory)."
                )
        context = self.context_length
        needed = None
        if self.mode == "finetune" and getattr(datamodule, "max_prompt_length", None) is not None:
            needed = datamodule.max_prompt_length + self.num_pauses + datamodule.max_target_length
            what = (
                f"prompts of up to {datamodule.max_prompt_length} tokens + num_pauses={self.num_pauses} + targets of "
                f"up to {datamodule.max_target_length} tokens"
            )
        elif self.mode == "pretrain" and getattr(datamodule, "max_length", None) is not None:
            needed, what = datamodule.max_length, f"sequences of {datamodule.max_length} tokens"
            with_pauses = datamodule.max_length + round(self.pretrain_pause_fraction * datamodule.max_length)
            if context is not None and needed <= context < with_pauses:
                rank_zero_warn(
                    f"PauseTokenLM: blocks of {needed} tokens plus {self.pretrain_pause_fraction:.0%} pauses need "
                    f"{with_pauses} positions, more than the context of {context}: each block's overflow trains in an "
                    "extra row (every token is still trained once, at extra compute). To pack with room for the "
                    f"pauses, use blocks of at most {int(context / (1 + self.pretrain_pause_fraction))} tokens."
                )
        if context is not None and needed is not None and needed > context:
            raise ValueError(
                f"{what} need {needed} positions but the model's context is {context}: raise the config's "
                "`max_position_embeddings`/`n_positions`, shorten the data or use fewer pauses."
            )

    def on_train_start(self) -> None:
        if self.uses_pauses:
            self.model.config.pause_token_trained = True
        dtype = next(self.model.parameters()).dtype
        if dtype in (torch.bfloat16, torch.float16) and "true" not in str(self.trainer.precision):
            rank_zero_warn(
                f"PauseTokenLM: the model's weights are {dtype} and the Trainer's precision is "
                f"{self.trainer.precision!r}: they train in pure {dtype} (no float32 master weights). For mixed "
                "precision load them in float32 (`model_kwargs={'dtype': 'float32'}`) with precision='bf16-mixed'."
            )
        else:
            rank_zero_info(f"PauseTokenLM trains {type(self.model).__name__} with {dtype} weights.")

    # -- training ------------------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def _generator(self, device: torch.device, batch_idx: int) -> torch.Generator:
        # One stream per (seed, rank, step, batch): reproducible, different on every rank, identical after a resume.
        state = np.random.SeedSequence([self.seed, self.global_rank, self.global_step, batch_idx]).generate_state(1)
        return torch.Generator(device=device).manual_seed(int(state[0]))

    def pretrain_batch(self, batch: dict, pauses: bool, batch_idx: int = 0) -> dict[str, torch.Tensor]:
        """Model inputs and labels of a language-modelling batch, with pauses inserted when ``pauses`` is on."""
        self._require_model()
        ids = _batch_key(batch, "input_ids", "pretrain")
        mask = batch.get("attention_mask")
        if pauses and self.pretrain_pause_fraction > 0:
            ids, mask = insert_pauses(
                ids, mask, self.pause_token_id, self.pretrain_pause_fraction, self._generator(ids.device, batch_idx),
                self.pad_token_id,
            )
            labels = pretrain_labels(ids, mask, self.pause_token_id)
            if self.context_length is not None:  # a block that filled the context spills into a second row
                ids, mask, labels = split_overflow(ids, mask, labels, self.context_length)
            return {"input_ids": ids, "attention_mask": mask, "labels": labels}
        self._check_length(ids.shape[1], "a training sequence")
        return {"input_ids": ids, "attention_mask": mask, "labels": pretrain_labels(ids, mask, self.pause_token_id)}

    def finetune_batch(self, batch: dict, num_pauses: int | None = None, insert_token_id: int | None = None) -> dict:
        """Model inputs and labels of a prompt/target batch with ``num_pauses`` copies of ``insert_token_id``
        (default: ``self.num_pauses`` pauses) between prompt and target."""
        self._require_model()
        num_pauses = self.num_pauses if num_pauses is None else _check_num_pauses(num_pauses, "num_pauses")
        inputs = finetune_inputs(
            _batch_key(batch, "prompt_ids", "finetune"),
            _batch_key(batch, "prompt_mask", "finetune"),
            _batch_key(batch, "target_ids", "finetune"),
            _batch_key(batch, "target_mask", "finetune"),
            num_pauses,
            self.pause_token_id if insert_token_id is None else insert_token_id,
            self.pad_token_id,
        )
        self._check_length(inputs["input_ids"].shape[1], f"prompt + {num_pauses} pauses + target")
        return inputs

    def _check_length(self, length: int, what: str) -> None:
        context = self.context_length
        if context is not None and length > context:
            raise ValueError(f"{what} has {length} tokens but the model's context is {context} positions.")

    def _inputs(self, batch: dict, train: bool, batch_idx: int) -> dict[str, torch.Tensor]:
        if self.mode == "pretrain":
            return self.pretrain_batch(batch, pauses=train, batch_idx=batch_idx)
        return self.finetune_batch(batch)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        inputs = self._inputs(batch, train=True, batch_idx=batch_idx)
        loss = self.model(**inputs).loss
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=inputs["input_ids"].shape[0])
        return loss

    def _evaluate(self, batch: dict, stage: str, batch_idx: int) -> None:
        inputs = self._inputs(batch, train=False, batch_idx=batch_idx)
        out = self.model(**inputs)
        size = inputs["input_ids"].shape[0]
        self.log(f"{stage}_loss", out.loss, prog_bar=stage == "val", sync_dist=True, batch_size=size)
        if self.mode == "finetune":
            metric = getattr(self, f"{stage}_exact_match")
            metric.update(_exact_match(out.logits, inputs["labels"], self.pause_token_id).float())
            self.log(f"{stage}_exact_match", metric, prog_bar=stage == "val")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "val", batch_idx)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "test", batch_idx)

    @torch.no_grad()
    def exact_match(self, batch: dict, num_pauses: int | None = None, insert_token_id: int | None = None) -> torch.Tensor:
        """Per-example greedy exact match of a prompt/target batch at ``num_pauses`` inference pauses (``M_inf``).

        One teacher-forced forward pass: an answer is reproduced exactly by greedy decoding (pause logit masked) iff
        every target token is the arg-max given the true prefix. ``insert_token_id`` replaces the pause (e.g. a
        filler ``"."``, the paper's filler-token ablation).
        """
        self._require_model()
        was_training = self.model.training
        self.model.eval()
        try:
            inputs = self.finetune_batch(batch, num_pauses, insert_token_id)
            logits = self.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        finally:
            self.model.train(was_training)
        return _exact_match(logits, inputs["labels"], self.pause_token_id)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer(self.parameters())
        if self.lr_scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.lr_scheduler(optimizer), "interval": "step"}}

    # -- pause-inference -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompts: list[str] | list[list[int]],
        num_pauses: int | None = None,
        max_new_tokens: int = 32,
        filler_token: str | None = None,
        **generate_kwargs: Any,
    ) -> list[str] | list[list[int]]:
        """Pause-inference (Algorithm 3): append ``num_pauses`` pauses to each prompt and decode the answer.

        The batch is left-padded (``pad, prompt, pauses``), so the answer always follows the last pause directly;
        positions are counted from each row's first real token (as in training). One prefill over prompt + pauses
        fills the KV cache, then decoding is incremental (``model.generate``). The pause logit is masked at every
        step, so ``<pause>`` is never emitted (its output row was never trained to be predicted).

        Args:
            prompts: prompt strings (tokenized like the finetuning data) or lists of token ids.
            num_pauses: ``M_inf``; defaults to ``num_pauses`` of the module (``M_ft``).
            max_new_tokens: most answer tokens per prompt; decoding stops earlier at an end token
                (:attr:`eos_token_ids`: the model's generation config's, e.g. a chat model's turn end, and the
                tokenizer's EOS).
            filler_token: append this token instead of the pause (the paper's filler ablation, e.g. ``"."``).
            generate_kwargs: passed to ``transformers`` ``generate`` (``do_sample``, ``num_beams``, ``temperature``...;
                greedy by default).

        Returns:
            The answers, as strings (special tokens removed) when ``prompts`` are strings, else as token-id lists;
            EOS and everything after it are cut.
        """
        self._require_model()
        num_pauses = self.num_pauses if num_pauses is None else _check_num_pauses(num_pauses, "num_pauses")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"`max_new_tokens` must be a positive integer, got {max_new_tokens!r}.")
        if isinstance(prompts, str):
            raise TypeError("`prompts` must be a list of prompts; wrap a single prompt as `[prompt]`.")
        prompts = list(prompts)
        if not prompts:
            return []
        as_text = isinstance(prompts[0], str)
        if any(isinstance(p, str) != as_text for p in prompts):
            raise TypeError("`prompts` must be all strings or all lists of token ids, not a mix.")
        encoded = encode_prompts(self.tokenizer, prompts) if as_text else [[int(t) for t in p] for p in prompts]
        insert_id = self.pause_token_id if filler_token is None else self._token_id(filler_token, "filler_token")
        context = self.context_length
        for i, ids in enumerate(encoded):
            if not ids and num_pauses == 0:
                raise ValueError(f"Prompt {i} is empty: give at least one token or some pauses.")
            if context is not None and len(ids) > context - num_pauses:
                raise ValueError(
                    f"Prompt {i} has {len(ids)} tokens, more than the context ({context}) minus num_pauses "
                    f"({num_pauses}) = {context - num_pauses}: shorten the prompt or use fewer pauses."
                )
            if context is not None and len(ids) + num_pauses + max_new_tokens > context:
                raise ValueError(
                    f"Prompt {i} ({len(ids)} tokens) + {num_pauses} pauses + max_new_tokens={max_new_tokens} exceed the "
                    f"model's context of {context} positions: use max_new_tokens <= {context - len(ids) - num_pauses}."
                )
        device = self.device
        input_ids, attention_mask = pad_sequences([ids + [insert_id] * num_pauses for ids in encoded], self.pad_token_id, "left")
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        kwargs: dict[str, Any] = dict(do_sample=False)
        kwargs.update(generate_kwargs)
        eos = self.eos_token_ids if kwargs.get("eos_token_id") is None else _as_list(kwargs.pop("eos_token_id"))
        kwargs.pop("eos_token_id", None)
        suppress = sorted({self.pause_token_id, *(kwargs.pop("suppress_tokens", None) or [])})
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                suppress_tokens=suppress,
                pad_token_id=self.pad_token_id,
                eos_token_id=eos,
                **kwargs,
            )
        finally:
            self.model.train(was_training)
        answers = []
        for row in out[:, input_ids.shape[1] :].tolist():
            stop = next((i for i, t in enumerate(row) if t in eos), len(row))
            answers.append(row[:stop])
        if as_text:
            return [self.tokenizer.decode(a, skip_special_tokens=True) for a in answers]
        return answers

    @property
    def eos_token_ids(self) -> list[int]:
        """The ids that end an answer: the model's generation config's (a chat model's turn-end tokens included),
        else the tokenizer's EOS."""
        model_eos = getattr(getattr(self._require_model(), "generation_config", None), "eos_token_id", None)
        ids = _as_list(model_eos) if model_eos is not None else []
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(int(self.tokenizer.eos_token_id))
        return ids

    def _token_id(self, token: str, name: str) -> int:
        ids = self.tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"`{name}={token!r}` must be exactly one token of the tokenizer, got ids {ids}.")
        return int(ids[0])

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> list[list[int]]:
        """Pause-inference on the prompts of a prompt/target batch: the generated answers' token ids."""
        prompts, mask = _batch_key(batch, "prompt_ids", "predict"), _batch_key(batch, "prompt_mask", "predict")
        return self.generate([row[m.bool()].tolist() for row, m in zip(prompts, mask)])

    # -- saving ---------------------------------------------------------------------------------------------------------
    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls, checkpoint_path: Any, map_location: Any = None, hparams_file: Any = None, strict: bool | None = None, **kwargs: Any
    ) -> "PauseTokenLM":
        """Lightning's ``load_from_checkpoint``; the tokenizer (with the pause token) and, for a checkpoint written
        from Python, the model's architecture default to the checkpoint's, so ``load_from_checkpoint(path)`` needs no
        argument either way (a CLI-built checkpoint rebuilds its model from the stored config). The file is read once.
        """
        checkpoint = _read_checkpoint(checkpoint_path)
        meta = checkpoint.get(_CKPT_KEY)
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        if meta is not None and kwargs.get("tokenizer") is None:
            kwargs["tokenizer"] = tokenizer_from_files(meta["tokenizer_files"])
        if meta is None or "_instantiator" in hparams or hparams_file is not None:
            # not ours, or built by the CLI: Lightning's loader (the mapped file is not read twice)
            return super().load_from_checkpoint(
                checkpoint_path, map_location=map_location, hparams_file=hparams_file, strict=strict, **kwargs
            )
        params = inspect.signature(cls.__init__).parameters
        init = {k: v for k, v in {**hparams, **kwargs}.items() if k in params}
        if init.get("model") is None:
            init["model"] = _stored_config(meta)  # the architecture; the weights come from the state dict below
        if isinstance(init["model"], PreTrainedModel):
            init.pop("model_kwargs", None)  # a model object is used as given
        elif isinstance(init["model"], PretrainedConfig) and init.get("model_kwargs"):
            # a directory-built module's from_pretrained options: keep those that shape the rebuilt model (dtype...)
            init["model_kwargs"] = {k: v for k, v in init["model_kwargs"].items() if k in _BUILD_KWARGS}
        if init.get("peft_config") is None and meta.get("peft_config") is not None:
            init["peft_config"] = _stored_peft_config(meta)
        module = cls(**init)
        module.on_load_checkpoint(checkpoint)
        module.load_state_dict(checkpoint["state_dict"], strict=True if strict is None else strict)
        if map_location is not None:
            module.to(map_location if not isinstance(map_location, dict) else "cpu")
        return module

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        if self.model is None and any(k.startswith("model.") for k in state_dict):
            raise RuntimeError(
                "Cannot load weights into a PauseTokenLM whose model is not built yet (no tokenizer was given: it is "
                "built in setup from the datamodule's). Pass `tokenizer=` when constructing it (this includes "
                "`strategy='ddp_spawn'`, which loads the trained weights back into the main process's module)."
            )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[_CKPT_KEY] = {
            "tokenizer_files": tokenizer_to_files(self.tokenizer),
            "pause_token": self.pause_token,
            "pause_token_id": self.pause_token_id,
            "pause_token_trained": bool(self.model.config.pause_token_trained),
            "config": self.model.config.to_dict(),
            "peft_config": None if self.peft_config is None else _plain(self.peft_config.to_dict()),
            "generation_config": _generation_config_dict(self.model),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get(_CKPT_KEY)
        if meta is None:
            return
        if (meta.get("peft_config") is None) != (self.peft_config is None):
            has = "holds LoRA adapters" if meta.get("peft_config") is not None else "holds a whole model, no adapters"
            raise ValueError(
                f"This checkpoint {has} but the module was built {'without' if self.peft_config is None else 'with'} "
                "`peft_config`: build it as the checkpoint was (`load_from_checkpoint(path)` does), or start a new "
                "stage from the checkpoint with `PauseTokenLM(model=<ckpt path>, ...)` (adapters merged)."
            )
        if meta["pause_token_id"] != self.pause_token_id or meta["pause_token"] != self.pause_token:
            raise ValueError(
                f"This checkpoint was trained with {meta['pause_token']!r} at id {meta['pause_token_id']}, but the module "
                f"has {self.pause_token!r} at id {self.pause_token_id}: pass the tokenizer saved in the checkpoint "
                "(`PauseTokenLM(model=<ckpt path>)` uses it)."
            )
        saved = tokenizer_from_files(meta["tokenizer_files"]).get_vocab()
        if saved != self.tokenizer.get_vocab():
            raise ValueError(
                "The tokenizer differs from the one this checkpoint was trained with (their vocabularies differ): pass "
                "the tokenizer saved in the checkpoint (`PauseTokenLM(model=<ckpt path>)` uses it)."
            )
        self.model.config.pause_token_trained = bool(meta["pause_token_trained"])
        _restore_generation_config(self.model, meta)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the model and its tokenizer (with the pause token) as a Hugging Face directory.

        ``PauseTokenLM(model=directory)`` reloads both; so do ``AutoModelForCausalLM`` / ``AutoTokenizer``. With
        ``peft_config`` it writes PEFT's adapter directory (adapters and the trained pause row) and the tokenizer:
        ``PeftModel.from_pretrained(base, directory)`` on the base model with the pause token added reloads it.
        """
        self._require_model()
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)


def _exact_match(logits: torch.Tensor, labels: torch.Tensor, pause_token_id: int) -> torch.Tensor:
    """Rows whose every labelled token is the arg-max (pause logit masked) of the previous position's output."""
    logits = logits[:, :-1].clone()
    logits[..., pause_token_id] = float("-inf")
    target = labels[:, 1:]
    labelled = target != IGNORE_INDEX
    right = (logits.argmax(dim=-1) == target) | ~labelled
    return right.all(dim=1) & labelled.any(dim=1)


def _generation_config_dict(model: Any) -> dict | None:
    config = getattr(_base_model(model), "generation_config", None)
    return None if config is None else _plain(config.to_diff_dict())


def _peft_config(config: Any) -> Any:
    """A ``peft.LoraConfig`` from a config object or its dict (None stays None)."""
    if config is None:
        return None
    from peft import LoraConfig, PeftConfig, get_peft_config

    if isinstance(config, dict):
        config = get_peft_config({"peft_type": "LORA", "task_type": "CAUSAL_LM", **config})
    if not isinstance(config, PeftConfig):
        raise TypeError(f"`peft_config` must be a peft LoraConfig or its dict, got {type(config).__name__}.")
    if not isinstance(config, LoraConfig):
        raise TypeError(f"`peft_config` must be a LoraConfig (adapters + a trainable pause row), got {type(config).__name__}.")
    return copy.deepcopy(config)


def _plain(value: Any) -> Any:
    """A PEFT config dict as plain data (sets become sorted lists, enums strings): checkpoints load with weights_only."""
    if isinstance(value, enum.Enum):  # PeftType / TaskType subclass str: test before str
        return value.value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        items = [_plain(v) for v in value]
        return sorted(items, key=str) if isinstance(value, set) else items
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(getattr(value, "value", value))


def _with_pause_row(indices: Any, pause_id: int) -> Any:
    """PEFT's ``trainable_token_indices`` with the pause row added (a list, or a dict of lists per embedding layer)."""
    if not indices:
        return [pause_id]
    if isinstance(indices, dict):
        return {name: _with_pause_row(ids, pause_id) for name, ids in indices.items()}
    return list(indices) + ([pause_id] if pause_id not in indices else [])


def _as_list(ids: Any) -> list[int]:
    return [int(i) for i in ids] if isinstance(ids, (list, tuple)) else [int(ids)]


def _check_num_pauses(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"`{name}` must be an integer >= 0 (0 turns pauses off), got {value!r}.")
    return value


def _batch_key(batch: Any, key: str, mode: str) -> torch.Tensor:
    if not isinstance(batch, dict) or key not in batch:
        got = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        expected = (
            "{'input_ids', 'attention_mask'} (language modelling)"
            if key in ("input_ids", "attention_mask")
            else "{'prompt_ids', 'prompt_mask', 'target_ids', 'target_mask'} (prompt/target pairs)"
        )
        raise ValueError(f"{mode} batches must be dicts with {expected}; got {got}. Check `mode` and the datamodule.")
    return batch[key]
