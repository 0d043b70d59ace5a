"""RetrievalDataModule: Wikipedia inverse-cloze queries split by article, user JSONL/CSV files, query generation that
never leaks an evaluation query, loaders."""

from __future__ import annotations

import json

import pytest
import torch

from datamodules import RetrievalDataModule
from datamodules.retrieval import normalize_query

SPLITS = ("train", "val", "test")


def _leaks(dm: RetrievalDataModule) -> list[tuple[str, str]]:
    evaluation = [normalize_query(q) for s in ("val", "test") for q in dm.queries(s)]
    return [(g, e) for g in dm.generated for e in evaluation if e in normalize_query(g) or normalize_query(g) in e]


@pytest.fixture(scope="module")
def wiki():
    return RetrievalDataModule(max_articles=10, passages_per_article=4, generated_queries=3, generate_from="corpus",
                               batch_size=8)


@pytest.mark.slow  # parses the articles twice more
def test_wikipedia_queries_split_by_article_and_removed_from_their_passage(wiki):
    dm = wiki
    corpus, doc_split = dm.corpus, dm.doc_split()
    assert len(corpus) == len(doc_split) >= 20
    labelled = len(dm.queries("train")) - len(dm.generated)
    for split in SPLITS:
        queries, qrels = dm.queries(split), dm.qrels(split)
        assert queries and len(queries) == len(qrels)
        n = labelled if split == "train" else len(queries)
        for query, rel in zip(queries[:n], qrels[:n]):
            assert len(rel) == 1 and doc_split[rel[0]] == split, "a query lives in its document's split"
            assert len(query.split()) >= 4 and query not in corpus[rel[0]], "the query sentence left its passage"
        assert all(r == [] for r in qrels[n:]), "generated queries carry no relevance label"
    # by article: the passages of one article never straddle two splits (passages of an article are consecutive)
    from datamodules.retrieval import wikipedia_passages

    articles = [p["article"] for p in wikipedia_passages(10, 80, 4)]
    assert len(articles) == len(corpus)
    for a in set(articles):
        assert len({doc_split[i] for i, x in enumerate(articles) if x == a}) == 1
    # the same seed gives the same data
    again = RetrievalDataModule(max_articles=10, passages_per_article=4, generated_queries=3, generate_from="corpus")
    assert again.corpus == corpus and again.queries("test") == dm.queries("test") and again.generated == dm.generated


def test_wikipedia_generated_queries_never_leak_an_evaluation_query(wiki):
    assert len(wiki.generated) > 50
    assert _leaks(wiki) == []
    batch = next(iter(wiki.train_dataloader()))
    assert isinstance(batch["text"], list) and batch["index"].dtype == torch.long and len(batch["text"]) == 8


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def files(tmp_path):
    # a test query ("beta gamma") sits verbatim inside a training document, and a training query contains it
    docs = [{"id": "d0", "text": "alpha beta gamma delta"}, {"id": "d1", "text": "epsilon zeta eta theta"},
            {"id": "d2", "text": "iota kappa lambda mu"}, {"id": "d3", "text": "nu xi omicron pi"}]
    queries = [{"id": "q0", "text": "alpha beta gamma", "split": "train"},
               {"id": "q1", "text": "zeta eta", "split": "train"},
               {"id": "q2", "text": "kappa lambda", "split": "val"},
               {"id": "q3", "text": "Beta  Gamma", "split": "test"}]
    qrels = [{"query_id": "q0", "doc_id": "d0"}, {"query_id": "q1", "doc_id": "d1"},
             {"query_id": "q2", "doc_id": "d2"}, {"query_id": "q3", "doc_id": "d0"},
             {"query_id": "q3", "doc_id": "d3", "relevance": 0}]
    return {"corpus_file": write_jsonl(tmp_path / "corpus.jsonl", docs),
            "queries_file": write_jsonl(tmp_path / "queries.jsonl", queries),
            "qrels_file": write_jsonl(tmp_path / "qrels.jsonl", qrels)}


@pytest.mark.parametrize("generation", ["span", "dropout"])
def test_generation_drops_every_query_equal_to_inside_or_containing_an_evaluation_query(files, generation):
    dm = RetrievalDataModule(**files, generated_queries=30, generation=generation, generate_from="corpus",
                             span_words=(1, 4), word_dropout=0.3)
    assert dm.queries("test") == ["Beta  Gamma"] and dm.qrels("test") == [[0]]  # relevance 0 dropped
    assert dm.generated, "something is generated"
    assert _leaks(dm) == []
    assert not {normalize_query(g) for g in dm.generated} & {normalize_query(q) for q in dm.queries("train")[:2]}
    assert len(set(dm.generated)) == len(dm.generated)


def test_user_files_jsonl_and_csv_and_split_by_document(files, tmp_path):
    dm = RetrievalDataModule(**files)
    assert dm.corpus[1] == "epsilon zeta eta theta"
    assert dm.queries("train") == ["alpha beta gamma", "zeta eta"] and dm.qrels("train") == [[0], [1]]
    assert dm.queries("val") == ["kappa lambda"] and dm.qrels("val") == [[2]]
    # CSV without a split column: queries follow their first relevant document's split
    docs = "id,text\n" + "".join(f"d{i},document number {i}\n" for i in range(20))
    (tmp_path / "c.csv").write_text(docs)
    (tmp_path / "q.csv").write_text("id,text\n" + "".join(f"q{i},query {i}\n" for i in range(20)))
    (tmp_path / "r.csv").write_text("query_id,doc_id\n" + "".join(f"q{i},d{i}\n" for i in range(20)))
    csv = RetrievalDataModule(corpus_file=str(tmp_path / "c.csv"), queries_file=str(tmp_path / "q.csv"),
                              qrels_file=str(tmp_path / "r.csv"), val_fraction=0.2, test_fraction=0.2)
    split = csv.doc_split()
    for s in SPLITS:
        assert all(split[r[0]] == s for r in csv.qrels(s))
    assert sorted(len(csv.queries(s)) for s in SPLITS) == [4, 4, 12]


def test_user_file_errors(files, tmp_path):
    with pytest.raises(ValueError, match="qrels_file"):
        RetrievalDataModule(corpus_file=files["corpus_file"], queries_file=files["queries_file"])
    with pytest.raises(FileNotFoundError, match="qrels_file"):
        RetrievalDataModule(**{**files, "qrels_file": str(tmp_path / "nope.jsonl")})
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"query_id": "q0", "doc_id": "d9"}])
    with pytest.raises(ValueError, match="not in `corpus_file`"):
        RetrievalDataModule(**{**files, "qrels_file": bad}).corpus
    partial = write_jsonl(tmp_path / "partial.jsonl", [{"query_id": "q0", "doc_id": "d0"}])
    with pytest.raises(ValueError, match="no relevant document"):
        RetrievalDataModule(**{**files, "qrels_file": partial}).corpus
    nocol = write_jsonl(tmp_path / "nocol.jsonl", [{"query": "q0", "doc_id": "d0"}])
    with pytest.raises(ValueError, match="query_id"):
        RetrievalDataModule(**{**files, "qrels_file": nocol}).corpus
    with pytest.raises(ValueError, match="generation"):
        RetrievalDataModule(generation="paraphrase")
