"""Language-model datamodules on offline text (for :class:`lightning_methods.PauseTokenLM` and any causal LM).

* :class:`TextLMDataModule`: causal language modelling on local text files or on the Wikipedia articles shipped in
  gensim's test data (106 English articles, 3.1 M characters), read through HF ``datasets``, tokenized by a
  byte-level BPE tokenizer trained offline by ``tokenizers`` and saved beside the data, packed into blocks.
* :class:`PromptTargetDataModule`: prompt/target pairs from JSON(L) or CSV files through HF ``datasets``.
* :class:`SyntheticReasoningDataModule`: generated reasoning problems: multi-digit addition written
  most-significant digit first (``"123+456="`` -> ``"579"``), and a parallelizable 3SUM-like task (Pfau et al. 2024:
  is there a triple of vectors summing to zero mod 10?), as prompt/target pairs or as plain text for pretraining.

Batches are dictionaries (see :mod:`lightning_methods._tokenizer`): ``{"input_ids", "attention_mask"}`` when
``batch_format == "lm"``, ``{"prompt_ids", "prompt_mask", "target_ids", "target_mask"}`` when it is
``"prompt_target"``. Each datamodule exposes its ``tokenizer`` and the longest sequences it yields
(``max_length``, or ``max_prompt_length`` / ``max_target_length``), so a model can check its context before training.
Nothing here downloads anything.
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.util
import itertools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
from torch.utils.data import Dataset

from datamodules._base import SplitLoaders
from lightning_methods._tokenizer import (
    char_tokenizer,
    encode_prompts,
    encode_targets,
    lm_collate,
    load_tokenizer,
    prompt_target_collate,
    train_bpe_tokenizer,
)

__all__ = ["TextLMDataModule", "PromptTargetDataModule", "SyntheticReasoningDataModule", "wikipedia_articles"]

SPLITS = ("train", "val", "test")
#: the characters of every synthetic task (digits, operators, separators, answers, and "." as a filler token)
SYNTHETIC_ALPHABET = "0123456789+= ,?TF.\n"
_WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


class _Examples(Dataset):
    """A list of example dicts."""

    def __init__(self, examples: list[dict]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        return self.examples[index]


def _positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


class _TokenDataModule(SplitLoaders, pl.LightningDataModule):
    """Loaders over in-memory lists of tokenized examples, identical on every rank (private base class)."""

    batch_format: str

    def __init__(
        self,
        batch_size: int,
        eval_batch_size: int | None,
        num_workers: int,
        shuffle: bool,
        drop_last: bool,
        seed: int,
    ) -> None:
        super().__init__()
        _positive_int("batch_size", batch_size)
        _positive_int("eval_batch_size", eval_batch_size, allow_none=True)
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"`num_workers` must be a non-negative integer, got {num_workers!r}.")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.tokenizer: Any = None
        self._data: dict[str, list[dict]] | None = None

    def build(self) -> dict[str, list[dict]]:
        """Return ``{"train": [...], "val": [...], "test": [...]}`` lists of tokenized examples."""
        raise NotImplementedError

    @property
    def data(self) -> dict[str, list[dict]]:
        if self._data is None:
            self._data = self.build()
        return self._data

    def setup(self, stage: str | None = None) -> None:
        self.data  # noqa: B018 - build once, before the loaders

    def dataset(self, split: str) -> _Examples:
        if split not in SPLITS:
            raise ValueError(f"`split` must be one of {SPLITS}, got {split!r}.")
        return _Examples(self.data[split])

    def _collate(self):
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        return lm_collate(pad) if self.batch_format == "lm" else prompt_target_collate(pad)


    def _prompt_target_lengths(self) -> None:
        every = list(itertools.chain.from_iterable(self.data.values()))
        self.max_prompt_length = max(len(e["prompt_ids"]) for e in every)
        self.max_target_length = max(len(e["target_ids"]) for e in every)


def _split_indices(n: int, val_fraction: float, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    if not 0.0 < val_fraction < 1.0 or not 0.0 < test_fraction < 1.0 or val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"`val_fraction` and `test_fraction` must be in (0, 1) with a sum < 1, got {val_fraction!r}, {test_fraction!r}."
        )
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(val_fraction * n)))
    n_test = max(1, int(round(test_fraction * n)))
    if n - n_val - n_test < 1:
        raise ValueError(f"{n} documents are too few to split into train/val/test: give more text.")
    return {"val": order[:n_val], "test": order[n_val : n_val + n_test], "train": order[n_val + n_test :]}


# ----------------------------------------------------------------------------------------------------------------------
# Real text
# ----------------------------------------------------------------------------------------------------------------------
def wikipedia_articles(max_articles: int | None = None) -> list[dict[str, str]]:
    """The English Wikipedia articles of gensim's test data as ``[{"title", "text"}]``, markup stripped.

    Main-namespace articles only, redirects and stubs (< 200 characters) dropped: 106 articles, 3.1 M characters.
    """
    if importlib.util.find_spec("gensim") is None:
        raise ImportError("The Wikipedia source needs gensim's test data: `pip install gensim`.")
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    from gensim.test.utils import datapath

    articles = []
    with bz2.open(datapath(_WIKI_FILE)) as f:
        for title, text, _ in extract_pages(f, filter_namespaces=("0",)):
            text = filter_wiki(text).strip()
            if len(text) < 200 or text.lower().startswith("#redirect"):
                continue
            articles.append({"title": title, "text": text})
            if max_articles is not None and len(articles) >= max_articles:
                break
    return articles


def _default_cache_dir() -> Path:
    return Path(os.environ.get("LIGHTNING_METHODS_CACHE", Path.home() / ".cache" / "lightning_methods")) / "text"


class TextLMDataModule(_TokenDataModule):
    """Causal language modelling on local text files or gensim's Wikipedia articles, packed into fixed blocks.

    Documents (one per article, or per paragraph/file/line of the given files, see ``sample_by``) are split into
    train/val/test by document with ``seed``, tokenized, joined with EOS and cut into blocks of ``block_size``
    tokens (the standard packing; the last partial block of a split is dropped). Text is read through HF
    ``datasets`` (the ``json``/``text`` builders on local files).

    The tokenizer is a byte-level BPE of ``vocab_size`` tokens trained by ``tokenizers`` on the *training* documents,
    saved beside the data (``<cache_dir>/wikipedia/`` or next to the first text file) and reused when found again.
    Give ``tokenizer`` (an object or a directory) to use another one; a ``tokenizer`` directory that does not exist yet
    is where the trained one is saved. :class:`~lightning_methods.PauseTokenLM` built without a tokenizer takes this
    datamodule's (so a CLI config names it once).

    Args:
        data_files: local text file(s); ``None`` reads gensim's Wikipedia articles.
        tokenizer: a tokenizer, or a tokenizer directory (loaded if present, else trained and saved there).
        vocab_size: size of the trained BPE vocabulary.
        block_size: tokens per training sequence.
        sample_by: what a document is in ``data_files``: a ``"document"`` (file), ``"paragraph"`` or ``"line"``.
        max_documents: keep only the first documents (quick runs).
        cache_dir: where the extracted Wikipedia text and its tokenizer are kept (default
            ``~/.cache/lightning_methods/text``, or ``$LIGHTNING_METHODS_CACHE/text``).
        val_fraction: share of documents held out for validation.
        test_fraction: share of documents held out for testing.
        batch_size: training batch size (per device under DDP).
        eval_batch_size: validation/test batch size; defaults to ``batch_size``.
        num_workers: DataLoader workers.
        shuffle: shuffle the training blocks each epoch.
        drop_last: drop the last incomplete training batch.
        seed: seed of the document split.

    Example::

        >>> dm = TextLMDataModule(vocab_size=512, block_size=64, max_documents=10)  # doctest: +SKIP
        >>> batch = next(iter(dm.train_dataloader()))  # doctest: +SKIP
        >>> batch["input_ids"].shape  # doctest: +SKIP
        torch.Size([32, 64])
    """

    batch_format = "lm"

    def __init__(
        self,
        data_files: str | list[str] | None = None,
        tokenizer: Any = None,
        vocab_size: int = 2048,
        block_size: int = 128,
        sample_by: Literal["document", "paragraph", "line"] = "paragraph",
        max_documents: int | None = None,
        cache_dir: str | None = None,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, shuffle, drop_last, seed)
        _positive_int("block_size", block_size)
        _positive_int("max_documents", max_documents, allow_none=True)
        if sample_by not in ("document", "paragraph", "line"):
            raise ValueError(f"`sample_by` must be 'document', 'paragraph' or 'line', got {sample_by!r}.")
        if isinstance(data_files, str):
            data_files = [data_files]
        if data_files is not None:
            missing = [f for f in data_files if not Path(f).is_file()]
            if not data_files or missing:
                raise ValueError(f"`data_files` must name existing text files; not found: {missing or data_files}.")
        _split_indices(1000, val_fraction, test_fraction, seed)  # validates the fractions before any work
        self.data_files = [str(Path(f).resolve()) for f in data_files] if data_files is not None else None
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.max_length = block_size
        self.sample_by = sample_by
        self.max_documents = max_documents
        self.cache_dir = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self._documents = self._split_documents()
        # Built (or loaded) now, not in setup: a model is configured from it before training starts.
        self.tokenizer = self._tokenizer(tokenizer)

    # documents ----------------------------------------------------------------------------------------------------------
    def _wikipedia_file(self) -> Path:
        path = self.cache_dir / "wikipedia" / "articles.jsonl"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                for article in wikipedia_articles():
                    f.write(json.dumps(article) + "\n")
            os.replace(tmp, path)  # atomic: concurrent first runs never read a half-written file
        return path

    def _split_documents(self) -> dict[str, list[str]]:
        import datasets

        if self.data_files is None:
            ds = datasets.load_dataset("json", data_files=str(self._wikipedia_file()), split="train")
        else:
            ds = datasets.load_dataset("text", data_files=self.data_files, split="train", sample_by=self.sample_by)
        texts = [t for t in ds["text"] if t and t.strip()]
        if self.max_documents is not None:
            texts = texts[: self.max_documents]
        idx = _split_indices(len(texts), self.val_fraction, self.test_fraction, self.seed)
        return {split: [texts[i] for i in sorted(idx[split])] for split in SPLITS}

    # tokenizer ----------------------------------------------------------------------------------------------------------
    def default_tokenizer_dir(self) -> Path:
        """Where the trained tokenizer is saved when ``tokenizer`` is not given: beside the data."""
        fingerprint = hashlib.sha1(
            json.dumps([self.data_files, self.sample_by, self.max_documents, self.val_fraction, self.test_fraction, self.seed,
                        [(os.path.getsize(f), int(os.path.getmtime(f))) for f in self.data_files or []]]).encode()
        ).hexdigest()[:10]
        base = self.cache_dir / "wikipedia" if self.data_files is None else Path(self.data_files[0]).parent
        return base / f"tokenizer-bpe{self.vocab_size}-{fingerprint}"

    def _tokenizer(self, tokenizer: Any) -> Any:
        if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
            return load_tokenizer(tokenizer)
        directory = Path(tokenizer) if tokenizer is not None else self.default_tokenizer_dir()
        if (directory / "tokenizer.json").is_file() or (directory / "tokenizer_config.json").is_file():
            return load_tokenizer(directory)
        trained = train_bpe_tokenizer(self._documents["train"], self.vocab_size)
        tmp = directory.with_name(directory.name + f".{os.getpid()}.tmp")
        trained.save_pretrained(str(tmp))
        try:
            os.replace(tmp, directory)
        except OSError:  # another process saved it first: use theirs
            pass
        return load_tokenizer(directory)

    @property
    def tokenizer_dir(self) -> Path | None:
        """The directory the tokenizer was loaded from (``None`` when it was given as an object)."""
        path = getattr(self.tokenizer, "name_or_path", None)
        return Path(path) if path and Path(path).is_dir() else None

    # blocks -------------------------------------------------------------------------------------------------------------
    def build(self) -> dict[str, list[dict]]:
        eos = self.tokenizer.eos_token_id
        out = {}
        for split in SPLITS:
            # the tokenizer batch-encodes the list itself: `datasets.Dataset.map` added nothing here but its cache
            # fingerprint, a dill hash of the tokenizer that took ~1 s per split (11 of 13 s of a small setup)
            documents = self._documents[split]
            ids = self.tokenizer(documents, add_special_tokens=False)["input_ids"] if documents else []
            stream = np.fromiter(itertools.chain.from_iterable(doc + [eos] for doc in ids), dtype=np.int64)
            n_blocks = len(stream) // self.block_size
            if n_blocks == 0:
                raise ValueError(
                    f"The {split} split has {len(stream)} tokens, fewer than one block of {self.block_size}: lower "
                    "`block_size` or give more text."
                )
            blocks = stream[: n_blocks * self.block_size].reshape(n_blocks, self.block_size)
            out[split] = [{"input_ids": row.tolist()} for row in blocks]
        return out

    def num_tokens(self, split: str = "train") -> int:
        """Number of tokens in a split's blocks."""
        return len(self.data[split]) * self.block_size


# ----------------------------------------------------------------------------------------------------------------------
# Prompt/target pairs from files
# ----------------------------------------------------------------------------------------------------------------------
def _encode_pairs(tokenizer: Any, pairs: Sequence[tuple[str, str]]) -> list[dict]:
    prompts = encode_prompts(tokenizer, [p for p, _ in pairs])
    targets = encode_targets(tokenizer, [t for _, t in pairs])
    return [{"prompt_ids": p, "target_ids": t} for p, t in zip(prompts, targets)]


def _read_pairs(path: str, prompt_column: str, target_column: str) -> list[tuple[str, str]]:
    import datasets

    suffix = Path(path).suffix.lower()
    builder = {".json": "json", ".jsonl": "json", ".csv": "csv"}.get(suffix)
    if builder is None:
        raise ValueError(f"`{path}`: prompt/target files must be .json, .jsonl or .csv, got {suffix or 'no extension'!r}.")
    if not Path(path).is_file():
        raise ValueError(f"`{path}` does not exist.")
    ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    missing = [c for c in (prompt_column, target_column) if c not in ds.column_names]
    if missing:
        raise ValueError(
            f"`{path}` has columns {ds.column_names} but not {missing}: set `prompt_column` / `target_column`."
        )
    # CSV readers turn "42" into an int: prompts and targets are text
    return [(str(p), str(t)) for p, t in zip(ds[prompt_column], ds[target_column])]


class PromptTargetDataModule(_TokenDataModule):
    """Prompt/target pairs (question -> answer) from JSON, JSONL or CSV files, read through HF ``datasets``.

    Prompts are tokenized with the tokenizer's special tokens, targets without them and followed by EOS
    (:func:`lightning_methods._tokenizer.encode_target`). Without ``val_file`` / ``test_file``, those splits are carved from
    the training file with ``seed``.

    Args:
        train_file: a ``.json``/``.jsonl``/``.csv`` file with a prompt and a target column.
        tokenizer: a tokenizer or a tokenizer directory (e.g. the model's).
        val_file: validation pairs; default: ``val_fraction`` of ``train_file``.
        test_file: test pairs; default: ``test_fraction`` of ``train_file``.
        prompt_column: name of the prompt column.
        target_column: name of the target column.
        val_fraction: share of ``train_file`` held out for validation when there is no ``val_file``.
        test_fraction: share of ``train_file`` held out for testing when there is no ``test_file``.
        batch_size: training batch size (per device under DDP).
        eval_batch_size: validation/test batch size; defaults to ``batch_size``.
        num_workers: DataLoader workers.
        shuffle: shuffle the training pairs each epoch.
        drop_last: drop the last incomplete training batch.
        seed: seed of the split.
    """

    batch_format = "prompt_target"

    def __init__(
        self,
        train_file: str,
        tokenizer: Any,
        val_file: str | None = None,
        test_file: str | None = None,
        prompt_column: str = "prompt",
        target_column: str = "target",
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, shuffle, drop_last, seed)
        if tokenizer is None:
            raise ValueError("`tokenizer` is required: a tokenizer object or directory (usually the model's).")
        self.tokenizer = load_tokenizer(tokenizer)
        self.files = {"train": train_file, "val": val_file, "test": test_file}
        self.prompt_column, self.target_column = prompt_column, target_column
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self._prompt_target_lengths()

    def build(self) -> dict[str, list[dict]]:
        pairs = {s: _read_pairs(f, self.prompt_column, self.target_column) for s, f in self.files.items() if f is not None}
        carve = [s for s in ("val", "test") if s not in pairs]
        if carve:
            pool = pairs["train"]
            val_f = self.val_fraction if "val" in carve else 0.0
            test_f = self.test_fraction if "test" in carve else 0.0
            order = np.random.default_rng(self.seed).permutation(len(pool))
            n_val, n_test = int(round(val_f * len(pool))), int(round(test_f * len(pool)))
            if "val" in carve:
                n_val = max(1, n_val)
            if "test" in carve:
                n_test = max(1, n_test)
            if len(pool) - n_val - n_test < 1:
                raise ValueError(f"`{self.files['train']}` has {len(pool)} pairs, too few to carve val/test splits from.")
            if "val" in carve:
                pairs["val"] = [pool[i] for i in order[:n_val]]
            if "test" in carve:
                pairs["test"] = [pool[i] for i in order[n_val : n_val + n_test]]
            pairs["train"] = [pool[i] for i in order[n_val + n_test :]]
        return {split: _encode_pairs(self.tokenizer, pairs[split]) for split in SPLITS}


# ----------------------------------------------------------------------------------------------------------------------
# Synthetic reasoning tasks
# ----------------------------------------------------------------------------------------------------------------------
def synthetic_tokenizer() -> Any:
    """The character tokenizer of :class:`SyntheticReasoningDataModule` (same for every task and format)."""
    return char_tokenizer(SYNTHETIC_ALPHABET)


def _addition_problems(rng: np.random.Generator, n: int, min_digits: int, max_digits: int) -> list[tuple[str, str]]:
    digits = rng.integers(min_digits, max_digits + 1, size=(n, 2))
    low = np.where(digits == 1, 0, 10 ** (digits - 1))
    values = rng.integers(low, 10**digits)
    return [(f"{a}+{b}=", str(a + b)) for a, b in values.tolist()]


def _k_sum_problems(rng: np.random.Generator, n: int, length: int, dim: int, k: int) -> list[tuple[str, str]]:
    """Balanced k-SUM problems: ``length`` vectors of ``dim`` digits; T iff ``k`` of them sum to 0 mod 10."""
    groups = np.array(list(itertools.combinations(range(length), k)))
    out: list[tuple[str, str]] = []
    want = {True: (n + 1) // 2, False: n // 2}
    while want[True] or want[False]:
        x = rng.integers(0, 10, size=(4 * n + 64, length, dim))
        sums = x[:, groups].sum(axis=2) % 10  # (batch, n_groups, dim)
        has = (sums == 0).all(axis=2).any(axis=1)
        for row, label in zip(x, has.tolist()):
            if want[label]:
                want[label] -= 1
                out.append((" ".join("".join(map(str, v)) for v in row) + "=", "T" if label else "F"))
    order = rng.permutation(len(out))
    return [out[i] for i in order]


class SyntheticReasoningDataModule(_TokenDataModule):
    """Generated reasoning problems for pause-token experiments, as prompt/target pairs or as pretraining text.

    * ``task="addition"``: ``"a+b="`` -> ``"c"``, each operand with ``min_digits``..``max_digits`` digits (uniform
      digit count, then uniform value), written most-significant digit first: the first answer digit already depends
      on every carry, the computation a left-to-right model must do before it speaks.
    * ``task="3sum"``: ``length`` vectors of ``dim`` digits (``"37 05 91 ...="``) -> ``"T"`` if some three of them
      (``sum_of`` of them) sum to zero mod 10 in every coordinate, else ``"F"``; classes balanced. Every triple can be
      checked independently: the parallelizable kind of task on which extra (filler/pause) positions help (Pfau,
      Merrill, Bowman 2024).

    ``batch_format="prompt_target"`` yields prompt/target batches (finetuning); ``"lm"`` yields each problem as one
    right-padded text sequence ``prompt + target + EOS`` (pretraining). Validation and test problems are fixed by
    ``seed`` and never occur in the training set.

    Args:
        task: ``"addition"`` or ``"3sum"``.
        batch_format: ``"prompt_target"`` or ``"lm"``.
        num_train: training problems.
        num_val: validation problems.
        num_test: test problems.
        min_digits: fewest digits of an addition operand.
        max_digits: most digits of an addition operand.
        length: number of vectors of a 3SUM problem.
        dim: digits per 3SUM vector.
        sum_of: how many vectors must sum to zero (3 for 3SUM; 2 gives the easier 2SUM).
        batch_size: training batch size (per device under DDP).
        eval_batch_size: validation/test batch size; defaults to ``batch_size``.
        num_workers: DataLoader workers.
        shuffle: shuffle the training problems each epoch.
        drop_last: drop the last incomplete training batch.
        seed: seed of the generated problems.
    """

    def __init__(
        self,
        task: Literal["addition", "3sum"] = "addition",
        batch_format: Literal["prompt_target", "lm"] = "prompt_target",
        num_train: int = 20000,
        num_val: int = 500,
        num_test: int = 500,
        min_digits: int = 1,
        max_digits: int = 3,
        length: int = 6,
        dim: int = 1,
        sum_of: int = 3,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, shuffle, drop_last, seed)
        if task not in ("addition", "3sum"):
            raise ValueError(f"`task` must be 'addition' or '3sum', got {task!r}.")
        if batch_format not in ("prompt_target", "lm"):
            raise ValueError(f"`batch_format` must be 'prompt_target' or 'lm', got {batch_format!r}.")
        for name, value in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test), ("dim", dim)):
            _positive_int(name, value)
        _positive_int("min_digits", min_digits)
        if not isinstance(max_digits, int) or max_digits < min_digits:
            raise ValueError(f"`max_digits` must be an integer >= min_digits={min_digits}, got {max_digits!r}.")
        if not isinstance(sum_of, int) or sum_of < 2:
            raise ValueError(f"`sum_of` (vectors that must sum to zero) must be an integer >= 2, got {sum_of!r}.")
        if not isinstance(length, int) or length < sum_of:
            raise ValueError(
                f"`length` (vectors per 3SUM problem) must be an integer >= sum_of={sum_of}, got {length!r}."
            )
        self.task, self.batch_format = task, batch_format
        self.num_train, self.num_val, self.num_test = num_train, num_val, num_test
        self.min_digits, self.max_digits, self.length, self.dim, self.sum_of = min_digits, max_digits, length, dim, sum_of
        self.tokenizer = synthetic_tokenizer()
        self.pairs = self._problems()
        if batch_format == "lm":
            self.max_length = max(len(e["input_ids"]) for split in SPLITS for e in self.data[split])
        else:
            self._prompt_target_lengths()

    def _problems(self) -> dict[str, list[tuple[str, str]]]:
        rng = np.random.default_rng(self.seed)
        n_eval = self.num_val + self.num_test

        def draw(n: int) -> list[tuple[str, str]]:
            if self.task == "addition":
                return _addition_problems(rng, n, self.min_digits, self.max_digits)
            return _k_sum_problems(rng, n, self.length, self.dim, self.sum_of)

        evaluation = list(dict.fromkeys(draw(2 * n_eval + 16)))[:n_eval]
        if len(evaluation) < n_eval:
            raise ValueError("Too few distinct problems for the val/test sets: allow more digits or a longer `length`.")
        held_out = {p for p, _ in evaluation}
        train: list[tuple[str, str]] = []
        for _ in range(100):
            train += [pt for pt in draw(self.num_train) if pt[0] not in held_out]
            if len(train) >= self.num_train:
                break
        if len(train) < self.num_train:
            raise ValueError("Too few distinct training problems outside the val/test sets: allow more digits.")
        return {"train": train[: self.num_train], "val": evaluation[: self.num_val], "test": evaluation[self.num_val :]}

    def build(self) -> dict[str, list[dict]]:
        # The tokenizer maps each character to one id (no special tokens on prompts): a dict lookup gives the same
        # ids ~50x faster than calling it on 20k short strings.
        vocab, eos = self.tokenizer.get_vocab(), self.tokenizer.eos_token_id
        out = {}
        for split in SPLITS:
            examples = [
                {"prompt_ids": [vocab[c] for c in p], "target_ids": [vocab[c] for c in t] + [eos]} for p, t in self.pairs[split]
            ]
            if self.batch_format == "lm":
                examples = [{"input_ids": e["prompt_ids"] + e["target_ids"]} for e in examples]
            out[split] = examples
        return out

    def prompts(self, split: str = "test") -> list[str]:
        """The prompts of a split, as text (e.g. for :meth:`PauseTokenLM.generate`)."""
        return [p for p, _ in self.pairs[split]]

    def targets(self, split: str = "test") -> list[str]:
        """The answers of a split, as text."""
        return [t for _, t in self.pairs[split]]
