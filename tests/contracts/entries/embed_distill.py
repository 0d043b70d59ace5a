"""EmbeddingDistillationModule: a tiny BERT student distilled from a tiny BERT teacher (MiniLM's tokenizer) on a toy
corpus through the real RetrievalDataModule; the projection is part of the student, the teacher is frozen."""

from __future__ import annotations

import functools

from transformers import AutoTokenizer

from lightning_methods import EmbeddingDistillationModule
from lightning_methods.embed_distill import MINILM, resolve_model_path
from tests.contracts.registry import Built, Entry, adam, register
from tests.lightning_methods.test_embed_distill import ToyRetrieval, tiny


@functools.lru_cache(maxsize=1)
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model_path(MINILM))


def distill(student_width: int = 16, **kwargs) -> EmbeddingDistillationModule:
    args = dict(losses={"embedding": 1.0, "kl": 1.0}, optimizer=adam(1e-3))
    return EmbeddingDistillationModule(tiny(tokenizer(), student_width), tiny(tokenizer(), 24), **{**args, **kwargs})


def data(**kwargs) -> ToyRetrieval:
    return ToyRetrieval(batch_size=4, shuffle=False, **kwargs)


register(
    Entry(
        name="EmbeddingDistillationModule",
        build=lambda: Built(distill(), data()),
        # retrieval metrics rank every evaluation query: whole validation splits only
        trainer_kwargs=dict(max_epochs=2, limit_train_batches=2, limit_val_batches=1.0, num_sanity_val_steps=0),
        reload_kwargs=lambda: {"student": tiny(tokenizer(), 16), "teacher": tiny(tokenizer(), 24)},
        predict=lambda module, batch: module.predict_step(batch, 0),
        bad_configs={
            "widths-without-projection": lambda: Built(distill(projection=False), data()),
            "empty-candidate-set": lambda: Built(distill(num_hard_negatives=0, num_random_negatives=0), data()),
        },
        ddp="validation metrics under 2 ddp_spawn processes equal 1 process in tests/lightning_methods/test_embed_distill.py",
    )
)
