"""EmbedDistill benchmark: a small asymmetric student distilled from the real MiniLM, arm by arm.

Claims checked (Kim et al., arXiv 2301.12005): (1) a much smaller asymmetric student (documents keep the teacher's
embeddings, only the query encoder is trained) keeps most of the teacher's quality; (2) embedding matching and
query generation beat score distillation alone.

Setup: gensim's Wikipedia test articles cut into passages of ~80 words (the corpus); each passage yields one query,
a sentence removed from it (inverse cloze). Splits by article; metrics on the held-out test queries, ranking the
whole corpus by exact search. Teacher: all-MiniLM-L6-v2 (6 layers, 384-d, mean pooling + L2 normalisation).
Student: MiniLM's embeddings and first 2 layers (token embeddings frozen), trained as a query encoder only.
Arms (same number of steps each): one-hot contrastive (in-batch negatives), score KD (listwise KL on a limited
candidate set: the positive, 4 teacher-ranked and 4 random negatives), embedding matching (plain L2), embedding
matching + score KD; each without and with query generation (random word spans of the training passages, 2 per
passage, labelled by the teacher only, none equal to / inside / containing an evaluation query). Reported as % of
the teacher's Recall@10 / MRR@10 / nDCG@10, mean and standard deviation over seeds, plus the query-encoding speed
of student and teacher measured in the same run.

    python benchmarks/embed_distill.py            # 3 seeds; 13.7 min measured on the shared 2-core machine
    python benchmarks/embed_distill.py --quick    # smoke test
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules import RetrievalDataModule  # noqa: E402
from lightning_methods.embed_distill import MINILM, EmbeddingDistillationModule, SentenceEncoder  # noqa: E402

ARMS = {
    "one-hot contrastive": {"contrastive": 1.0},
    "score KD (listwise KL)": {"kl": 1.0},
    "embedding matching": {"embedding": 1.0},
    "embedding + score KD": {"embedding": 1.0, "kl": 1.0},
}
METRICS = ("recall@10", "mrr@10", "ndcg@10")
RESULTS = Path(__file__).resolve().parent / "results"


def trainer(max_steps: int) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
    )


def queries_per_second(encoder: SentenceEncoder, texts: list[str], repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        encoder.encode(texts, batch_size=32)
        best = min(best, time.perf_counter() - start)
    return len(texts) / best


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    started = time.perf_counter()
    data_kw = dict(max_articles=args.articles, passages_per_article=args.passages, batch_size=args.batch_size,
                   cache_dir=args.cache_dir, seed=0)
    data = {False: RetrievalDataModule(**data_kw),
            True: RetrievalDataModule(generated_queries=args.generated, generation="span", **data_kw)}
    for dm in data.values():
        dm.setup()
    plain = data[False]
    sizes = {"documents": len(plain.corpus), "train queries": len(plain.queries("train")),
             "generated queries": len(data[True].generated), "test queries": len(plain.queries("test"))}
    print(sizes, flush=True)
    teacher = SentenceEncoder(MINILM)
    base_student = SentenceEncoder(MINILM, num_layers=args.layers, max_length=64, freeze_token_embeddings=True)
    results: dict[str, dict] = {"sizes": sizes, "arms": {}, "args": vars(args)}
    teacher_metrics = None
    for qgen in (False, True):
        for arm, losses in ARMS.items():
            name = f"{arm}{' + query generation' if qgen else ''}"
            rows = []
            for seed in range(args.seeds):
                pl.seed_everything(seed, verbose=False)
                module = EmbeddingDistillationModule(
                    copy.deepcopy(base_student), teacher, losses=losses, temperature=0.05, num_hard_negatives=4,
                    num_random_negatives=4, recall_at=[10], seed=seed,
                    optimizer=functools.partial(torch.optim.Adam, lr=args.lr),
                )
                t = trainer(args.steps)
                t.fit(module, data[qgen])
                out = t.test(module, data[qgen], verbose=False)[0]
                if teacher_metrics is None:
                    teacher_metrics = {m: out[f"test_teacher_{m}"] for m in METRICS}
                rows.append({m: out[f"test_{m}"] for m in METRICS})
            results["arms"][name] = rows
            mean = {m: statistics.mean(r[m] for r in rows) for m in METRICS}
            print(f"{name:45s} " + " ".join(f"{m}={mean[m]:.3f}" for m in METRICS),
                  f"({time.perf_counter() - started:.0f}s)", flush=True)
    # before any training: the 2-layer student as cut from the teacher (identity of the lower layers)
    pl.seed_everything(0, verbose=False)
    untrained = EmbeddingDistillationModule(copy.deepcopy(base_student), teacher, recall_at=[10])
    out = trainer(1).test(untrained, plain, verbose=False)[0]
    results["untrained"] = {m: out[f"test_{m}"] for m in METRICS}
    results["teacher"] = teacher_metrics
    test_queries = plain.queries("test") * max(1, args.speed_queries // len(plain.queries("test")))
    repeats = 1 if args.quick else 3
    results["speed"] = {
        "queries": len(test_queries),
        "teacher_qps": queries_per_second(teacher, test_queries, repeats),
        "student_qps": queries_per_second(base_student, test_queries, repeats),
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "student_params": sum(p.numel() for p in base_student.parameters()),
        "teacher_layer_params": sum(p.numel() for p in teacher.model.encoder.parameters()),
        "student_layer_params": sum(p.numel() for p in base_student.model.encoder.parameters()),
    }
    results["seconds"] = time.perf_counter() - started
    return results


def table(results: dict) -> str:
    teacher = results["teacher"]
    sizes, speed, args = results["sizes"], results["speed"], results["args"]

    def pct(value: float, metric: str) -> float:
        return 100.0 * value / teacher[metric]

    lines = [
        f"Corpus: {sizes['documents']} Wikipedia passages; {sizes['train queries']} training queries "
        f"(+{sizes['generated queries']} generated), {sizes['test queries']} held-out test queries ranked against the "
        f"whole corpus. Student: MiniLM's first {args['layers']} of 6 layers (query encoder only; documents keep the "
        f"teacher's embeddings), {args['steps']} steps of batch {args['batch_size']}, Adam lr {args['lr']}, "
        f"{args['seeds']} seeds (mean ± std). Teacher (all-MiniLM-L6-v2): Recall@10 {teacher['recall@10']:.3f}, "
        f"MRR@10 {teacher['mrr@10']:.3f}, nDCG@10 {teacher['ndcg@10']:.3f}.",
        "",
        "| student (asymmetric) | % teacher Recall@10 | % teacher MRR@10 | % teacher nDCG@10 |",
        "|---|---|---|---|",
    ]
    u = results["untrained"]
    lines.append("| untrained (cut from the teacher) | " + " | ".join(f"{pct(u[m], m):.1f}" for m in METRICS) + " |")
    for name, rows in results["arms"].items():
        cells = []
        for m in METRICS:
            values = [pct(r[m], m) for r in rows]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.1f} ± {sd:.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Query encoding, same run, 1 thread, batch 32, {speed['queries']} queries: teacher "
        f"{speed['teacher_qps']:.0f} queries/s, student {speed['student_qps']:.0f} queries/s "
        f"({speed['student_qps'] / speed['teacher_qps']:.2f}x). Transformer-layer parameters: student "
        f"{speed['student_layer_params'] / 1e6:.1f} M vs teacher {speed['teacher_layer_params'] / 1e6:.1f} M "
        f"(all parameters incl. token embeddings: {speed['student_params'] / 1e6:.1f} M vs "
        f"{speed['teacher_params'] / 1e6:.1f} M). Total benchmark time {results['seconds'] / 60:.1f} min.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--articles", type=int, default=None, help="Wikipedia articles (None: all 106)")
    parser.add_argument("--passages", type=int, default=6, help="passages per article")
    parser.add_argument("--generated", type=int, default=2, help="generated queries per training passage")
    parser.add_argument("--cache-dir", default=None, help="teacher embedding cache (default: a temporary directory)")
    parser.add_argument("--out", default=str(RESULTS / "embed_distill.md"))
    parser.add_argument("--speed-queries", type=int, default=256, help="test queries (repeated) timed per encoder")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 seed, 2 steps, 8 articles, 32 timed queries once")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.articles, args.passages, args.speed_queries = 1, 2, 8, 3, 32
    with tempfile.TemporaryDirectory() as tmp:
        if args.cache_dir is None:
            args.cache_dir = tmp
        results = run(args)
    text = table(results)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("# EmbedDistill: asymmetric MiniLM student\n\n`python benchmarks/embed_distill.py`\n\n" + text)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
