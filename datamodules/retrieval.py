"""Retrieval data: a corpus, queries with relevance judgements, and teacher-labelled generated queries.

For :class:`lightning_methods.EmbeddingDistillationModule` (EmbedDistill, Kim et al., arXiv 2301.12005). Two sources:

* **gensim's Wikipedia test articles** (offline): each article is cut into passages of whole sentences (the
  documents); a query is one sentence of a passage, removed from it (the inverse cloze task of Lee et al. 2019, so
  the query never appears verbatim in its document), or the article's title (relevant: all its passages);
* **user files** (JSONL or CSV, read through HF ``datasets``): ``corpus_file`` rows ``{"id", "text"}``,
  ``queries_file`` rows ``{"id", "text"}`` with an optional ``"split"`` (``train`` / ``val`` / ``test``) and
  ``qrels_file`` rows ``{"query_id", "doc_id"}`` with an optional ``"relevance"`` (rows with relevance <= 0 dropped).

Splits are by document (for Wikipedia, by article: all passages of an article, and their queries, share a split),
so no evaluation query is about a document a training query was about. The corpus searched at evaluation is the
whole corpus.

**Query generation** (EmbedDistill Section 4.3) adds unlabelled training queries near the training manifold:
``"span"`` takes random word spans of training documents (cropping, as pseudo-queries), ``"dropout"`` drops words of
training queries. They carry no relevance judgement: the teacher labels them (its embedding and ranking). Every
generated query equal to, containing or contained in a validation or test query (after lower-casing and collapsing
whitespace) is dropped, as are duplicates, so no evaluation query leaks into training.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules._base import SplitLoaders

__all__ = ["RetrievalDataModule", "wikipedia_passages", "normalize_query"]

SPLITS = ("train", "val", "test")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
_MARKUP = [
    (re.compile(r"'{2,}"), ""),  # bold / italics quotes
    (re.compile(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]"), r"\1"),  # leftover links
    (re.compile(r"<[^>]+>"), " "),  # leftover tags
    (re.compile(r"\s+"), " "),
]


def normalize_query(text: str) -> str:
    """Lower case, single spaces: the form in which generated and evaluation queries are compared."""
    return " ".join(text.lower().split())


def _clean(text: str) -> str:
    for pattern, repl in _MARKUP:
        text = pattern.sub(repl, text)
    return text.strip()


def wikipedia_passages(
    max_articles: int | None = None, passage_words: int = 80, passages_per_article: int | None = None
) -> list[dict[str, Any]]:
    """Passages of whole sentences (about ``passage_words`` words) from gensim's Wikipedia test articles.

    Returns:
        ``[{"title", "article", "sentences"}]`` in article order; ``article`` is the article's index.
    """
    from datamodules.text import wikipedia_articles

    passages = []
    for a, article in enumerate(wikipedia_articles(max_articles)):
        count, chunk = 0, []
        # sentences run on across paragraphs until a passage has `passage_words` words
        for paragraph in article["text"].split("\n"):
            paragraph = paragraph.strip()
            # headings (== x ==), lists, tables, templates and captions are not prose
            if not paragraph or paragraph[0] in "=*#|{!:;" or "|" in paragraph:
                continue
            sentences = [s for s in (_clean(x) for x in _SENTENCE_END.split(_clean(paragraph))) if len(s.split()) >= 4]
            for sentence in sentences:
                chunk.append(sentence)
                if sum(len(s.split()) for s in chunk) >= passage_words:
                    passages.append({"title": article["title"], "article": a, "sentences": chunk})
                    chunk, count = [], count + 1
                    if passages_per_article is not None and count >= passages_per_article:
                        break
            if passages_per_article is not None and count >= passages_per_article:
                break
    return passages


class _Queries(Dataset):
    """``{"text", "index"}`` items of one split's queries (the index locates its embeddings and relevance)."""

    def __init__(self, texts: Sequence[str]) -> None:
        self.texts = list(texts)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"text": self.texts[index], "index": index}


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"text": [i["text"] for i in items], "index": torch.tensor([i["index"] for i in items], dtype=torch.long)}


def _positive_int(name: str, value: Any, allow_none: bool = False, minimum: int = 1) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")


def _read_table(path: str, arg: str) -> list[dict[str, Any]]:
    """Rows of a JSON(L) or CSV file, through HF ``datasets`` (local files only)."""
    import datasets

    suffix = Path(path).suffix.lower()
    builder = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv"}.get(suffix)
    if builder is None:
        raise ValueError(f"`{arg}={path!r}`: use a .jsonl, .json, .csv or .tsv file.")
    kwargs = {"delimiter": "\t"} if suffix == ".tsv" else {}
    table = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    return table.to_list()


class RetrievalDataModule(SplitLoaders, pl.LightningDataModule):
    """Queries, documents and relevance judgements for dual-encoder retrieval, split by document.

    Exposes ``corpus`` (document texts), ``queries(split)`` and ``qrels(split)`` (for each query the corpus indices
    of its relevant documents); the training split ends with the ``generated`` queries, whose relevance lists are
    empty (the teacher labels them). Loaders yield ``{"text": [...], "index": LongTensor}`` batches of one split's
    queries; evaluation loaders are in order, so the module can gather the whole split across DDP ranks.

    Args:
        corpus_file: a JSONL/CSV file of documents ``{"id", "text"}``; with ``queries_file`` and ``qrels_file``
            replaces the Wikipedia source.
        queries_file: a JSONL/CSV file of queries ``{"id", "text"}`` (optional column ``"split"``; without it queries
            are split by their first relevant document, with ``seed``).
        qrels_file: a JSONL/CSV file of judgements ``{"query_id", "doc_id"}`` (optional ``"relevance"``).
        query_type: Wikipedia queries: ``"sentence"`` (a sentence of the passage, removed from it) or ``"title"``.
        max_articles: Wikipedia articles to read (106 in all); ``None`` for all.
        passages_per_article: passages kept per article; ``None`` for all.
        passage_words: words per passage (sentences are added until a passage has at least this many).
        generated_queries: generated training queries per training document (``"span"``) or per training query
            (``"dropout"``); 0 turns query generation off.
        generation: ``"span"`` (random spans of ``span_words`` words of training documents) or ``"dropout"``
            (training queries with a fraction ``word_dropout`` of their words removed).
        generate_from: documents the spans come from: ``"train"`` (the training split's) or ``"corpus"`` (all, as
            an index is known in advance; evaluation queries still never leak, see the module docstring).
        span_words: ``(min, max)`` words of a generated span.
        word_dropout: fraction of words removed by ``"dropout"``.
        val_fraction: share of documents (articles) in the validation split.
        test_fraction: share of documents (articles) in the test split.
        batch_size: training queries per batch (per device).
        eval_batch_size: evaluation queries per batch; defaults to ``batch_size``.
        shuffle: shuffle training queries each epoch.
        drop_last: drop the last incomplete training batch.
        num_workers: DataLoader workers.
        seed: seed of the split, the query sentences and the generated queries.
        cache_dir: where a module may cache teacher embeddings (keyed by the teacher and the text); ``None``: none.
    """

    def __init__(
        self,
        corpus_file: str | None = None,
        queries_file: str | None = None,
        qrels_file: str | None = None,
        query_type: Literal["sentence", "title"] = "sentence",
        max_articles: int | None = 40,
        passages_per_article: int | None = 8,
        passage_words: int = 80,
        generated_queries: int = 0,
        generation: Literal["span", "dropout"] = "span",
        generate_from: Literal["train", "corpus"] = "train",
        span_words: tuple[int, int] = (8, 20),
        word_dropout: float = 0.3,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        shuffle: bool = True,
        drop_last: bool = False,
        num_workers: int = 0,
        seed: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        files = {"corpus_file": corpus_file, "queries_file": queries_file, "qrels_file": qrels_file}
        given = [k for k, v in files.items() if v is not None]
        if given:
            for name, path in files.items():
                if path is None:
                    raise ValueError(
                        f"`{name}` is missing: user data needs `corpus_file`, `queries_file` and `qrels_file` (the "
                        "relevance judgements: rows {'query_id', 'doc_id'})."
                    )
                if not Path(path).is_file():
                    raise FileNotFoundError(f"`{name}={path!r}` does not exist.")
        if query_type not in ("sentence", "title"):
            raise ValueError(f"`query_type` must be 'sentence' or 'title', got {query_type!r}.")
        if generation not in ("span", "dropout"):
            raise ValueError(f"`generation` must be 'span' or 'dropout', got {generation!r}.")
        if generate_from not in ("train", "corpus"):
            raise ValueError(f"`generate_from` must be 'train' or 'corpus', got {generate_from!r}.")
        _positive_int("max_articles", max_articles, allow_none=True)
        _positive_int("passages_per_article", passages_per_article, allow_none=True)
        _positive_int("passage_words", passage_words)
        _positive_int("generated_queries", generated_queries, minimum=0)
        _positive_int("batch_size", batch_size)
        _positive_int("eval_batch_size", eval_batch_size, allow_none=True)
        _positive_int("num_workers", num_workers, minimum=0)
        span_words = tuple(span_words)
        if len(span_words) != 2 or not 1 <= span_words[0] <= span_words[1]:
            raise ValueError(f"`span_words` must be (min, max) with 1 <= min <= max, got {span_words!r}.")
        if not 0.0 < word_dropout < 1.0:
            raise ValueError(f"`word_dropout` must be in (0, 1), got {word_dropout!r}.")
        if not 0.0 < val_fraction < 1.0 or not 0.0 < test_fraction < 1.0 or val_fraction + test_fraction >= 1.0:
            raise ValueError(
                f"`val_fraction` and `test_fraction` must be in (0, 1) with a sum < 1, got {val_fraction!r}, {test_fraction!r}."
            )
        self.files = files if given else None
        self.query_type = query_type
        self.max_articles = max_articles
        self.passages_per_article = passages_per_article
        self.passage_words = passage_words
        self.generated_queries = generated_queries
        self.generation = generation
        self.generate_from = generate_from
        self.span_words = span_words
        self.word_dropout = word_dropout
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.num_workers = num_workers
        self.seed = seed
        self.cache_dir = cache_dir
        self._data: dict[str, Any] | None = None

    # -- the data (built once, identically on every rank) ------------------------------------------------------------
    @property
    def data(self) -> dict[str, Any]:
        if self._data is None:
            corpus, doc_split, queries, qrels = self.load()
            self._data = {"corpus": corpus, "doc_split": doc_split, "queries": queries, "qrels": qrels}
            generated = self._generate(corpus, doc_split, queries)
            self._data["generated"] = generated
            self._data["queries"]["train"] = queries["train"] + generated
            self._data["qrels"]["train"] = qrels["train"] + [[] for _ in generated]
        return self._data

    def load(self) -> tuple[list[str], list[str], dict[str, list[str]], dict[str, list[list[int]]]]:
        """``(corpus, doc_split, queries, qrels)`` from the user files or Wikipedia (a subclass may override it):
        document texts, each document's split, and per split the query texts and their relevant documents."""
        return self._load_files() if self.files else self._load_wikipedia()

    @property
    def corpus(self) -> list[str]:
        """Document texts; relevance lists index into it."""
        return self.data["corpus"]

    @property
    def generated(self) -> list[str]:
        """The generated (teacher-labelled) training queries, the tail of ``queries("train")``."""
        return self.data["generated"]

    def queries(self, split: str) -> list[str]:
        """The query texts of ``split`` (training: labelled ones, then generated ones)."""
        self._check_split(split)
        return self.data["queries"][split]

    def qrels(self, split: str) -> list[list[int]]:
        """For each query of ``split``, the corpus indices of its relevant documents (empty: generated)."""
        self._check_split(split)
        return self.data["qrels"][split]

    def doc_split(self) -> list[str]:
        """The split of each document (the split of the queries about it)."""
        return self.data["doc_split"]

    @staticmethod
    def _check_split(split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"`split` must be one of {SPLITS}, got {split!r}.")

    def _split_units(self, n: int) -> np.ndarray:
        """The split of each of ``n`` units (articles or documents), seeded: 0 train, 1 val, 2 test."""
        order = np.random.default_rng(self.seed).permutation(n)
        n_val = max(1, int(round(self.val_fraction * n)))
        n_test = max(1, int(round(self.test_fraction * n)))
        if n - n_val - n_test < 1:
            raise ValueError(f"{n} documents are too few to split into train/val/test: give more data.")
        split = np.zeros(n, dtype=np.int64)
        split[order[:n_val]], split[order[n_val : n_val + n_test]] = 1, 2
        return split

    def _load_wikipedia(self) -> tuple[list[str], list[str], dict, dict]:
        passages = wikipedia_passages(self.max_articles, self.passage_words, self.passages_per_article)
        articles = sorted({p["article"] for p in passages})
        unit_split = dict(zip(articles, self._split_units(len(articles))))
        rng = np.random.default_rng(self.seed + 1)
        corpus, doc_split = [], []
        queries: dict[str, list[str]] = {s: [] for s in SPLITS}
        qrels: dict[str, list[list[int]]] = {s: [] for s in SPLITS}
        by_article: dict[int, list[int]] = {}
        for p in passages:
            split = SPLITS[unit_split[p["article"]]]
            sentences = list(p["sentences"])
            doc_id = len(corpus)
            if self.query_type == "sentence" and len(sentences) >= 2:
                candidates = [i for i, s in enumerate(sentences) if len(s.split()) >= 6] or list(range(len(sentences)))
                pick = int(candidates[rng.integers(len(candidates))])
                queries[split].append(sentences.pop(pick))
                qrels[split].append([doc_id])
            corpus.append(" ".join(sentences))
            doc_split.append(split)
            by_article.setdefault(p["article"], []).append(doc_id)
        if self.query_type == "title":
            for article, docs in by_article.items():
                split = SPLITS[unit_split[article]]
                queries[split].append(passages[docs[0]]["title"])
                qrels[split].append(list(docs))
        for split in SPLITS:
            if not queries[split]:
                raise ValueError(f"The {split} split has no queries: read more articles (`max_articles`).")
        return corpus, doc_split, queries, qrels

    def _load_files(self) -> tuple[list[str], list[str], dict, dict]:
        docs = _read_table(self.files["corpus_file"], "corpus_file")
        rows = _read_table(self.files["queries_file"], "queries_file")
        judgements = _read_table(self.files["qrels_file"], "qrels_file")
        for rows_, arg, columns in ((docs, "corpus_file", ("text",)), (rows, "queries_file", ("id", "text")),
                                    (judgements, "qrels_file", ("query_id", "doc_id"))):
            if not rows_:
                raise ValueError(f"`{arg}` holds no rows.")
            lacking = [c for c in columns if c not in rows_[0]]
            if lacking:
                raise ValueError(f"`{arg}` lacks the column(s) {lacking}; it has {sorted(rows_[0])}.")
        doc_ids = [str(d.get("id", i)) for i, d in enumerate(docs)]
        doc_index = {d: i for i, d in enumerate(doc_ids)}
        corpus = [str(d["text"]) for d in docs]
        relevant: dict[str, list[int]] = {}
        for j in judgements:
            relevance = j.get("relevance")  # a column missing from some rows reads as None there: relevant
            if relevance is not None and float(relevance) <= 0:
                continue
            doc = str(j["doc_id"])
            if doc not in doc_index:
                raise ValueError(f"`qrels_file` names document {doc!r}, which is not in `corpus_file`.")
            relevant.setdefault(str(j["query_id"]), []).append(doc_index[doc])
        doc_unit = self._split_units(len(corpus))
        queries: dict[str, list[str]] = {s: [] for s in SPLITS}
        qrels: dict[str, list[list[int]]] = {s: [] for s in SPLITS}
        for r in rows:
            qid = str(r["id"])
            if qid not in relevant:
                raise ValueError(f"Query {qid!r} has no relevant document in `qrels_file`: every query needs one.")
            split = r.get("split")
            if split is None:
                split = SPLITS[doc_unit[relevant[qid][0]]]
            if split not in SPLITS:
                raise ValueError(f"`queries_file`: query {qid!r} has split {split!r}; use one of {SPLITS}.")
            queries[split].append(str(r["text"]))
            qrels[split].append(relevant[qid])
        doc_split = [SPLITS[u] for u in doc_unit]
        for split in SPLITS:
            if not queries[split]:
                raise ValueError(f"The {split} split has no queries: give more queries or a `split` column.")
        return corpus, doc_split, queries, qrels

    # -- query generation --------------------------------------------------------------------------------------------
    def _generate(self, corpus: list[str], doc_split: list[str], queries: dict[str, list[str]]) -> list[str]:
        """Generated training queries, deduplicated against every evaluation query (and each other)."""
        if not self.generated_queries:
            return []
        rng = np.random.default_rng(self.seed + 2)
        raw: list[str] = []
        if self.generation == "span":
            lo, hi = self.span_words
            for doc, split in zip(corpus, doc_split):
                if self.generate_from == "train" and split != "train":
                    continue
                words = doc.split()
                for _ in range(self.generated_queries):
                    length = int(rng.integers(lo, hi + 1))
                    if len(words) <= length:
                        raw.append(" ".join(words))
                        continue
                    start = int(rng.integers(0, len(words) - length + 1))
                    raw.append(" ".join(words[start : start + length]))
        else:
            for query in queries["train"]:
                words = query.split()
                for _ in range(self.generated_queries):
                    keep = rng.random(len(words)) >= self.word_dropout
                    if not keep.any():
                        keep[rng.integers(len(words))] = True
                    raw.append(" ".join(w for w, k in zip(words, keep) if k))
        evaluation = {normalize_query(q) for s in ("val", "test") for q in queries[s]}
        seen = {normalize_query(q) for q in queries["train"]}
        kept = []
        for text in raw:
            key = normalize_query(text)
            if not key or key in seen or key in evaluation:
                continue
            # a span that contains an evaluation query, or lies inside one, leaks it as well
            if any(key in e or e in key for e in evaluation):
                continue
            seen.add(key)
            kept.append(text)
        return kept

    # -- loaders -----------------------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        self.data  # noqa: B018 - build once, before the loaders and the module's setup

    def dataset(self, split: str) -> _Queries:
        return _Queries(self.queries(split))

    def _collate(self) -> Any:
        return _collate
