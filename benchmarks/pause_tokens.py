"""Pause tokens (Goyal et al., ICLR 2024, arXiv:2310.02226) at CPU scale: the four variants, M_inf, fillers, real text.

What it measures (all with :class:`lightning_methods.PauseTokenLM` and the Lightning ``Trainer``, 1 thread):

1. **Synthetic reasoning, the paper's 4-variant x M_inf table.** A tiny GPT-2 (2 layers, d=64, built from its config)
   is pretrained on 1-3 digit additions written most-significant digit first ("pretraining text"), with
   (PausePT, 10% random pauses) or without (StdPT) pauses, at equal real tokens seen. Each pretrained model is then
   finetuned with (PauseFT, M_ft pauses) or without (StdFT) pauses on two downstream tasks: 3+3-digit addition and a
   parallelizable 3SUM-like task (Pfau et al. 2024). Greedy exact match on fixed test problems at M_inf in
   {0, 2, 4, 8, 16} pauses, and with M_ft filler "." tokens instead of pauses. Several seeds: mean +- std, min-max.
   Both stages go through a plateau (exact match ~0 for hundreds of steps, then a jump) whose length varies with the
   seed, so the benchmark also records the pretrained models' exact match before finetuning and, for addition, the
   exact match at M_inf = M_ft along finetuning (a table and ``pause_tokens.png``): a single short budget would only
   measure which runs happened to leave the plateau in time.
2. **Real text at equal real-token targets trained.** StdPT vs PausePT on gensim's Wikipedia articles (BPE trained
   offline). PausePT packs blocks with room for its pauses (58 real tokens + 6 pauses = the 64-position context, so
   no block spills into an extra row) and takes more steps so that both train on the same number of real-token
   targets; validation loss per real token on the same clean validation blocks (and, for PausePT, with pauses).
   Rows, targets and FLOPs are counted from the batches the model ran (see :func:`real_text` for why this packing
   is the fair one; ``--text-spill`` adds PausePT on full 64-token blocks, whose overflow spills into extra rows).
   Runs alone with ``--only text`` (14.2 min with ``--text-spill`` on our shared 2-core machine; the spill arm
   runs 25,600 of its 52,544 training rows), replacing only that section of the results file.
3. **Performance** (ratios, interleaved repeats in one run): generation time with M = 10 pauses vs none for 64-token
   answers; training tokens/s with and without pauses.

Writes ``benchmarks/results/pause_tokens.md`` (+ ``.json``, ``.png``). Full run: ~35 min of one core. ``--quick``:
seconds.

    python benchmarks/pause_tokens.py                           # full
    python benchmarks/pause_tokens.py --quick                   # smoke run
    python benchmarks/pause_tokens.py --only text --text-spill  # the real-text part alone
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import re
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)

import lightning.pytorch as pl  # noqa: E402
from transformers import GPT2Config  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from datamodules import SyntheticReasoningDataModule, TextLMDataModule  # noqa: E402
from lightning_methods import PauseTokenLM  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PARTS = ["synthetic", "text", "perf"]
VARIANTS = [("StdPT", "StdFT"), ("StdPT", "PauseFT"), ("PausePT", "StdFT"), ("PausePT", "PauseFT")]


def quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "transformers", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def trainer(steps: int, **kw) -> pl.Trainer:
    return pl.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, **kw,
    )


def tiny_gpt2(context: int, d: int = 64, layers: int = 2) -> GPT2Config:
    return GPT2Config(
        n_layer=layers, n_embd=d, n_head=4, n_positions=context, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        activation_function="gelu",
    )


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list[float], pct: bool = True) -> str:
    m, s = mean_std(values)
    k = 100.0 if pct else 1.0
    return f"{k * m:.1f} ± {k * s:.1f}" if pct else f"{m:.3f} ± {s:.3f}"


# ----------------------------------------------------------------------------------------------------------------------
# 1. Synthetic reasoning
# ----------------------------------------------------------------------------------------------------------------------
class ExactMatchCurve(pl.Callback):
    """Test exact match at one M_inf after given numbers of optimizer steps (cheap: one teacher-forced pass)."""

    def __init__(self, dm: SyntheticReasoningDataModule, num_pauses: int, at: list[int]) -> None:
        self.dm, self.num_pauses, self.at, self.curve = dm, num_pauses, set(at), {}

    def on_train_batch_end(self, trainer, lm, outputs, batch, batch_idx) -> None:
        if trainer.global_step in self.at:
            # the test loader draws from the global RNG: without fork_rng, measuring the curve would change the
            # training data order that follows, so the final numbers would depend on --curve-at
            with torch.random.fork_rng():
                self.curve[trainer.global_step] = exact_match(lm, self.dm, self.num_pauses)


def exact_match(lm: PauseTokenLM, dm: SyntheticReasoningDataModule, m: int, token: int | None = None) -> float:
    hits = [lm.exact_match(batch, num_pauses=m, insert_token_id=token) for batch in dm._loader("test", 250, False)]
    return torch.cat(hits).float().mean().item()


def exact_match_table(lm: PauseTokenLM, dm: SyntheticReasoningDataModule, m_infs: list[int], filler_m: int) -> dict:
    """Greedy exact match on the test set at each M_inf, and with ``filler_m`` "." fillers instead of pauses."""
    filler = lm._token_id(".", "filler")
    settings = {**{str(m): (m, None) for m in m_infs}, f"filler{filler_m}": (filler_m, filler)}
    return {key: exact_match(lm, dm, m, token) for key, (m, token) in settings.items()}


def synthetic(args, seeds: list[int]) -> dict:
    tasks = {
        "addition": dict(task="addition", min_digits=3, max_digits=3),
        "3sum": dict(task="3sum", length=args.sum_length, dim=args.sum_dim, sum_of=3),
    }
    ft_steps = {"addition": args.ft_steps, "3sum": args.sum_ft_steps}
    results: dict = {task: {f"{pt}_{ft}": [] for pt, ft in VARIANTS} for task in tasks}
    curves: dict = {f"{pt}_{ft}": [] for pt, ft in VARIANTS}
    pretrained: dict = {"StdPT": [], "PausePT": []}
    timings: dict = {}
    for seed in seeds:
        # Data is fixed across seeds (seed 0); the seed drives model init, data order and pause positions.
        downstream = {
            name: SyntheticReasoningDataModule(num_train=args.ft_train, num_val=16, num_test=args.num_test, batch_size=args.batch_size, seed=0, **kw)
            for name, kw in tasks.items()
            if name == "addition" or seed < args.sum_seeds
        }
        pretrain = SyntheticReasoningDataModule(
            batch_format="lm", min_digits=1, max_digits=3, num_train=args.pt_train, num_val=16, num_test=16,
            batch_size=args.batch_size, seed=0,
        )
        held_out = set(downstream["addition"].prompts("test"))
        pretrain.pairs["train"] = [(p, t) for p, t in pretrain.pairs["train"] if p not in held_out]
        pretrain._data = None
        with tempfile.TemporaryDirectory() as tmp:
            for pt in ("StdPT", "PausePT"):
                fraction = 0.1 if pt == "PausePT" else 0.0
                pl.seed_everything(seed, verbose=False)
                lm = PauseTokenLM(
                    tiny_gpt2(64), pretrain.tokenizer, mode="pretrain", pretrain_pause_fraction=fraction, seed=seed,
                    optimizer=functools.partial(torch.optim.AdamW, lr=args.pt_lr),
                )
                # Equal real tokens seen: a problem is ~11 tokens, one of which becomes a pause when pausing, so
                # both runs see the same problems; only the pause slots are extra (the FLOPs, reported).
                t0 = time.perf_counter()
                trainer(args.pt_steps).fit(lm, pretrain)
                timings[f"{pt} seed{seed}"] = time.perf_counter() - t0
                # has pretraining (on additions of 1-3 digits, 3+3 test problems held out) already solved the task?
                pretrained[pt].append(exact_match(lm, downstream["addition"], 0))
                print(f"seed {seed} {pt} pretrained: exact match {100 * pretrained[pt][-1]:.1f}% on the 3+3 test", flush=True)
                lm.save_pretrained(Path(tmp) / pt)
            for task, dm in downstream.items():
                for pt, ft in VARIANTS:
                    pl.seed_everything(seed, verbose=False)
                    lm = PauseTokenLM(
                        model=str(Path(tmp) / pt), num_pauses=args.m_ft if ft == "PauseFT" else 0, seed=seed,
                        optimizer=functools.partial(torch.optim.AdamW, lr=args.ft_lr),
                    )
                    m_ft = args.m_ft if ft == "PauseFT" else 0
                    probe = ExactMatchCurve(dm, m_ft, [s for s in args.curve_at if s <= ft_steps[task]])
                    trainer(ft_steps[task], callbacks=[probe] if task == "addition" else []).fit(lm, dm)
                    table = exact_match_table(lm, dm, args.m_inf, args.m_ft)
                    results[task][f"{pt}_{ft}"].append(table)
                    if task == "addition":
                        end = table[str(m_ft)] if str(m_ft) in table else exact_match(lm, dm, m_ft)
                        curves[f"{pt}_{ft}"].append({**probe.curve, ft_steps[task]: end})
                    print(f"seed {seed} {task:8s} {pt}_{ft:7s} " + " ".join(f"M={k}:{100 * v:5.1f}" for k, v in table.items()), flush=True)
    return {"results": results, "curves": curves, "pretrained": pretrained, "ft_steps": ft_steps, "timings": timings}


def synthetic_markdown(res: dict, args) -> str:
    lines = []
    cols = [str(m) for m in args.m_inf] + [f"filler{args.m_ft}"]
    pre = res["pretrained"]
    lines.append(f"**Pretrained models before finetuning** (addition test, M_inf = 0, {len(pre['StdPT'])} seeds): "
                 + "; ".join(f"{pt} {fmt(v)}% (per seed: {', '.join(f'{100 * x:.1f}' for x in v)})" for pt, v in pre.items())
                 + "\n")
    for task, variants in res["results"].items():
        lines.append(f"**{task}** after {res['ft_steps'][task]} finetuning steps (greedy exact match %, "
                     f"{len(next(iter(variants.values())))} seeds, mean ± std; M_ft = {args.m_ft} for PauseFT, 0 for StdFT)\n")
        lines.append("| variant | " + " | ".join(f"M_inf={c}" if not c.startswith("filler") else f"{args.m_ft} fillers '.'" for c in cols) + " | best M_inf: min-max over seeds |")
        lines.append("|---" * (len(cols) + 2) + "|")
        for name, runs in variants.items():
            cells = [fmt([r[c] for r in runs]) for c in cols]
            own = str(args.m_ft) if name.endswith("PauseFT") else "0"
            per_seed = [100 * r[own] for r in runs]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {min(per_seed):.1f}-{max(per_seed):.1f} (M_inf={own}) |")
        lines.append("")
    curves = res["curves"]
    steps = sorted({int(s) for runs in curves.values() for run in runs for s in run})
    if steps:
        lines.append(f"**addition along finetuning** (exact match % at M_inf = M_ft, mean ± std; in brackets: seeds "
                     "above 50%)\n")
        lines.append("| variant | " + " | ".join(f"{s} steps" for s in steps) + " |")
        lines.append("|---" * (len(steps) + 1) + "|")
        for name, runs in curves.items():
            cells = []
            for s in steps:
                vals = [run[s] for run in runs]
                cells.append(f"{fmt(vals)} [{sum(v > 0.5 for v in vals)}/{len(vals)}]")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def curve_plot(res: dict, path: Path) -> None:
    """Exact match along finetuning, one line per seed, one panel per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = res["curves"]
    fig, axes = plt.subplots(1, len(curves), figsize=(3.2 * len(curves), 3), sharey=True)
    for ax, (name, runs) in zip(axes, curves.items()):
        for run in runs:
            steps = sorted(run)
            ax.plot(steps, [100 * run[s] for s in steps], marker="o", ms=3, alpha=0.8)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("finetuning steps")
    axes[0].set_ylabel("exact match % (M_inf = M_ft)")
    fig.suptitle("3+3-digit addition: finetuning curves, one line per seed", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------------
# 2. Real text at equal tokens seen
# ----------------------------------------------------------------------------------------------------------------------
def clean_val_loss(lm: PauseTokenLM, dm: TextLMDataModule, pauses: bool) -> float:
    """Mean loss per predicted real token on the validation blocks (pauses inserted with a fixed seed if asked)."""
    lm.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i, batch in enumerate(dm.val_dataloader()):
            inputs = lm.pretrain_batch(batch, pauses=pauses, batch_idx=10_000 + i)
            n = int((inputs["labels"][:, 1:] != -100).sum())
            total += lm.model(**inputs).loss.item() * n
            count += n
    lm.train()
    return total / count


class TrainedCount:
    """What a module's training steps actually ran: rows, positions (rows x width) and trained real-token targets.

    Wraps ``lm.pretrain_batch`` (the batch the model sees) instead of deriving these from the step count: with
    pauses, a block that no longer fits the context spills into an extra row (``split_overflow``), so rows per
    step and targets per block depend on the packing, and the equal-tokens claim should rest on measured counts.
    """

    def __init__(self, lm: PauseTokenLM) -> None:
        self.rows = self.positions = self.targets = self.real_inputs = 0
        inner = lm.pretrain_batch

        def counted(batch, pauses, batch_idx=0):
            inputs = inner(batch, pauses, batch_idx)
            if pauses:  # training batches only (validation calls it with pauses=False through the Trainer)
                ids, labels = inputs["input_ids"], inputs["labels"]
                self.rows += ids.shape[0]
                self.positions += ids.numel()
                # HF predicts labels[:, 1:] from positions [:, :-1]; pauses are never targets
                self.targets += int((labels[:, 1:] != -100).sum())
            return inputs

        lm.pretrain_batch = counted


def real_text(args, seeds: list[int]) -> dict:
    """StdPT vs PausePT on real text, at equal real-token targets trained.

    Fairness: the StdPT blocks fill the context (``text_block`` tokens). A PausePT block of the same size gets
    ``round(0.1 * block)`` pauses and no longer fits, so each block would spill into a second row that trains only
    its last few tokens: every token trained once, but twice the rows per step (about 2x the FLOPs for the same
    text), which would charge PausePT for a packing choice rather than for its pauses. The main PausePT arm
    therefore packs *with room for the pauses*: blocks of ``floor(context / 1.1)`` tokens, which fill the context
    exactly once their pauses are in (58 + 6 = 64), so no extra rows run and the only extra compute is the pause
    slots themselves (what the paper pays). It runs as many more steps as it takes to train on the same number of
    real-token targets as StdPT (each block's first token is never a target: ``block - 1`` per block). The
    spill arm (full 64-token blocks plus pauses, StdPT's step count: the same real tokens) runs with
    ``--text-spill`` (and in ``--quick``), to show what that packing costs. Every arm is evaluated on the same clean 64-token
    validation blocks; rows, positions and targets are counted from the batches the model actually ran.
    """
    block = args.text_block  # = the model's context
    room = int(block / 1.1)  # a block that fits the context with its round(0.1 * room) pauses
    assert room + round(0.1 * room) <= block
    common = dict(vocab_size=args.text_vocab, batch_size=args.text_batch, max_documents=args.text_documents, seed=0)
    dm = TextLMDataModule(block_size=block, **common)
    dm_room = TextLMDataModule(block_size=room, **common)  # same documents, same tokenizer (keyed by the data only)
    arms = {  # name: (datamodule, pause fraction, steps)
        "StdPT": (dm, 0.0, args.text_steps),
        f"PausePT, {room}-token blocks": (dm_room, 0.1, round(args.text_steps * (block - 1) / (room - 1))),
    }
    if args.text_spill or args.quick:
        arms[f"PausePT, {block}-token blocks (spill rows)"] = (dm, 0.1, args.text_steps)
    out: dict = {"arms": {name: {"steps": s, "block": d.block_size, "clean": [], "with_pauses": [], "rows": [],
                                 "positions": [], "targets": [], "minutes": []} for name, (d, _, s) in arms.items()},
                 "context": block, "batch": args.text_batch,
                 "train_tokens": dm.num_tokens("train"), "val_tokens": dm.num_tokens("val")}
    for seed in seeds:
        for name, (data, fraction, steps) in arms.items():
            pl.seed_everything(seed, verbose=False)
            lm = PauseTokenLM(
                tiny_gpt2(block), data.tokenizer, mode="pretrain", pretrain_pause_fraction=fraction, seed=seed,
                optimizer=functools.partial(torch.optim.AdamW, lr=args.text_lr),
            )
            count = TrainedCount(lm)
            t0 = time.perf_counter()
            trainer(steps).fit(lm, data)
            del lm.pretrain_batch  # stop counting: the validation passes below are not training
            arm = out["arms"][name]
            arm["minutes"].append((time.perf_counter() - t0) / 60)
            arm["rows"].append(count.rows)
            arm["positions"].append(count.positions)
            arm["targets"].append(count.targets)
            arm["clean"].append(clean_val_loss(lm, dm, pauses=False))  # StdPT's validation blocks for every arm
            if fraction > 0:
                arm["with_pauses"].append(clean_val_loss(lm, dm, pauses=True))
            print(f"seed {seed} text {name}: {steps} steps, {count.rows} rows, {count.targets} targets, "
                  f"val loss (clean) {arm['clean'][-1]:.3f}", flush=True)
    return out


def text_markdown(res: dict, args) -> str:
    arms = res["arms"]
    base = arms["StdPT"]
    n = len(base["clean"])
    lines = [
        f"**Wikipedia (gensim test data), {res['train_tokens']:,} training tokens, BPE {args.text_vocab}, context "
        f"{res['context']}, batch {res['batch']}, {n} seeds.** Validation loss per real token (nats, lower is better) on "
        f"the same clean {res['context']}-token validation blocks for every arm. Rows, positions and real-token targets "
        "are counted from the batches the model ran (targets: mean over seeds, which differ by < 0.01%: a pause drawn "
        "before a block's first token makes it a target); training FLOPs ~ positions run.\n",
        "| pretraining | block (real tokens) | steps | rows run | real-token targets trained | training FLOPs (positions) "
        "| val loss, clean text | val loss, 10% pauses inserted |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, arm in arms.items():
        pauses = fmt(arm["with_pauses"], pct=False) if arm["with_pauses"] else "-"
        lines.append(
            f"| {name} | {arm['block']} | {arm['steps']} | {arm['rows'][0]:,} | {round(statistics.fmean(arm['targets'])):,} | "
            f"{arm['positions'][0] / base['positions'][0]:.2f}x | {fmt(arm['clean'], pct=False)} | {pauses} |"
        )
    lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# 3. Performance
# ----------------------------------------------------------------------------------------------------------------------
def generation_ratio(args) -> dict:
    """Wall time of generate() with M = 10 pauses vs none, 64-token answers, interleaved repeats."""
    from datamodules.text import synthetic_tokenizer

    tok = synthetic_tokenizer()
    out = {}
    settings = [("d=64, 2 layers", 64, 2, 32), ("d=256, 4 layers", 256, 4, 32), ("d=256, 4 layers", 256, 4, 128)]
    for label, d, layers, prompt_len in settings:
        torch.manual_seed(0)
        lm = PauseTokenLM(tiny_gpt2(256, d=d, layers=layers), tok).eval()
        for batch in (1, 8):
            prompts = [[4 + (i + j) % 10 for j in range(prompt_len)] for i in range(batch)]
            times = {0: [], 10: []}
            for _ in range(args.gen_repeats):
                for m in (0, 10):
                    t0 = time.perf_counter()
                    answers = lm.generate(prompts, num_pauses=m, max_new_tokens=64, min_new_tokens=64)
                    times[m].append(time.perf_counter() - t0)
                    assert all(len(a) == 64 for a in answers)
            ratio = statistics.median(times[10]) / statistics.median(times[0])
            key = f"{label}, {prompt_len}-token prompts, batch {batch}"
            # tokens pushed through the layers: prompt (+ pauses) once, then 64 single-token steps
            out[key] = {
                "ratio": ratio,
                "token_ratio": (prompt_len + 10 + 64) / (prompt_len + 64),
                "ms_no_pauses": 1e3 * statistics.median(times[0]),
            }
            print(f"generation {key}: M=10 / M=0 = {ratio:.3f}x", flush=True)
    return out


def training_throughput(args) -> dict:
    """Training tokens/s of the same module with and without pause insertion (interleaved, same batches)."""
    dm = SyntheticReasoningDataModule(batch_format="lm", num_train=2048, num_val=16, num_test=16, batch_size=64)
    batches = [b for _, b in zip(range(8), dm.train_dataloader())]
    # packed 64-token blocks as well: the pretraining shape of real text
    stream = torch.cat([b["input_ids"][b["attention_mask"].bool()] for b in batches])
    packed = {"input_ids": stream[: 16 * 64].view(16, 64), "attention_mask": torch.ones(16, 64, dtype=torch.long)}
    out = {}
    for label, data in {"synthetic rows (padded)": batches, "packed 64-token blocks": [packed] * 8}.items():
        stats = {}
        torch.manual_seed(0)
        modules = {f: PauseTokenLM(tiny_gpt2(64), dm.tokenizer, mode="pretrain", pretrain_pause_fraction=f) for f in (0.0, 0.1)}
        opts = {f: torch.optim.AdamW(m.parameters(), lr=1e-3) for f, m in modules.items()}
        secs = {f: 0.0 for f in modules}
        real = {f: 0 for f in modules}
        slots = {f: 0 for f in modules}
        for rep in range(args.train_repeats):
            for f, lm in modules.items():
                for i, batch in enumerate(data):
                    t0 = time.perf_counter()
                    inputs = lm.pretrain_batch(batch, pauses=True, batch_idx=i)
                    loss = lm.model(**inputs).loss
                    loss.backward()
                    opts[f].step()
                    opts[f].zero_grad()
                    secs[f] += time.perf_counter() - t0
                    mask = inputs["attention_mask"].bool()
                    real[f] += int((mask & (inputs["input_ids"] != lm.pause_token_id)).sum())
                    slots[f] += int(mask.sum())
        for f in modules:
            stats[f] = {"real_tokens_per_s": real[f] / secs[f], "tokens_per_s": slots[f] / secs[f]}
        out[label] = stats
        print(f"training {label}: real tok/s {stats[0.0]['real_tokens_per_s']:.0f} -> {stats[0.1]['real_tokens_per_s']:.0f}, "
              f"all tok/s {stats[0.0]['tokens_per_s']:.0f} -> {stats[0.1]['tokens_per_s']:.0f}", flush=True)
    return out


def perf_markdown(gen: dict, train: dict) -> str:
    lines = ["| generation of 64-token answers (GPT-2 from config) | M=10 / M=0 time (median of interleaved repeats) | "
             "M=10 / M=0 tokens through the layers | M=0 time |",
             "|---|---|---|---|"]
    lines += [f"| {k} | {v['ratio']:.3f}x | {v['token_ratio']:.3f}x | {v['ms_no_pauses']:.0f} ms |" for k, v in gen.items()]
    lines += ["", "| training (tiny GPT-2, 1 thread) | real tokens/s, no pauses | real tokens/s, 10% pauses | ratio | all tokens/s ratio |",
              "|---|---|---|---|---|"]
    for k, v in train.items():
        a, b = v[0.0], v[0.1]
        lines.append(f"| {k} | {a['real_tokens_per_s']:.0f} | {b['real_tokens_per_s']:.0f} | "
                     f"{b['real_tokens_per_s'] / a['real_tokens_per_s']:.2f}x | {b['tokens_per_s'] / a['tokens_per_s']:.2f}x |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------------
def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny run (seconds): smoke test of the whole pipeline")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--pt-steps", type=int, default=1500)
    p.add_argument("--ft-steps", type=int, default=2000, help="finetuning steps on addition")
    p.add_argument("--sum-ft-steps", type=int, default=500, help="finetuning steps on 3SUM")
    p.add_argument("--curve-at", type=int, nargs="+", default=[250, 500, 1000, 1500],
                   help="finetuning steps at which the addition exact match is recorded (and at the end)")
    p.add_argument("--pt-train", type=int, default=40000)
    p.add_argument("--ft-train", type=int, default=20000)
    p.add_argument("--num-test", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--pt-lr", type=float, default=3e-3)
    p.add_argument("--ft-lr", type=float, default=1e-3)
    p.add_argument("--m-ft", type=int, default=8)
    p.add_argument("--m-inf", type=int, nargs="+", default=[0, 2, 4, 8, 16])
    p.add_argument("--sum-length", type=int, default=6)
    p.add_argument("--sum-dim", type=int, default=1)
    p.add_argument("--sum-seeds", type=int, default=3, help="seeds of the 3SUM task (the first ones of --seeds)")
    p.add_argument("--text-seeds", type=int, default=3)
    p.add_argument("--text-steps", type=int, default=800)
    p.add_argument("--text-vocab", type=int, default=1024)
    p.add_argument("--text-block", type=int, default=64)
    p.add_argument("--text-batch", type=int, default=16)
    p.add_argument("--text-lr", type=float, default=3e-3)
    p.add_argument("--text-documents", type=int, default=None)
    p.add_argument("--gen-repeats", type=int, default=7)
    p.add_argument("--train-repeats", type=int, default=5)
    p.add_argument("--text-spill", action="store_true",
                   help="also run PausePT on full-context blocks whose overflow spills into extra rows (~2x its FLOPs)")
    p.add_argument("--skip", nargs="*", default=[], choices=PARTS)
    p.add_argument("--only", nargs="+", default=None, choices=PARTS,
                   help="run only these parts; their sections replace the same sections of an existing results file, "
                        "the rest of it is kept")
    p.add_argument("--out", default=str(RESULTS / "pause_tokens"))
    args = p.parse_args(argv)
    if args.only is not None:
        args.skip = [part for part in PARTS if part not in args.only]
    if args.quick:
        args.seeds, args.sum_seeds, args.pt_steps, args.pt_train, args.ft_train, args.num_test = 1, 1, 3, 500, 300, 50
        args.ft_steps, args.sum_ft_steps, args.curve_at = 3, 3, [2]
        args.m_inf = [0, 8]
        args.text_seeds, args.text_steps, args.text_documents, args.text_vocab = 1, 3, 12, 300
        args.gen_repeats, args.train_repeats = 1, 1
        args.text_block = 32  # 300 BPE tokens over 12 documents: a few blocks of 64 per split would be too few
        if args.out == str(RESULTS / "pause_tokens"):
            args.out = str(Path(tempfile.gettempdir()) / "pause_tokens_quick")
    return args


TITLES = {
    "synthetic": "### Synthetic reasoning: the four variants x M_inf\n",
    "text": "### Real text: StdPT vs PausePT at equal real-token targets trained\n",
    "perf": "### Performance\n",
}


def splice(old: str, parts: dict[str, str], note: str) -> str:
    """``old`` results with the sections of ``parts`` (keyed by part name) replaced; the other sections are kept."""
    total = re.search(r"(?m)^Total time:.*$", old)
    if total is not None:
        old = old[: total.start()] + old[total.end() :]
    chunks = re.split(r"(?m)^(?=### )", old)
    key = lambda text: text.split("\n", 1)[0].split(":")[0]  # noqa: E731 - "### Real text" etc.
    new = {key(TITLES[part]): TITLES[part] + "\n" + body for part, body in parts.items()}
    out = [chunks[0]] + [new.pop(key(c), c).rstrip("\n") + "\n\n" for c in chunks[1:]] + list(new.values())
    return "".join(out).rstrip("\n") + "\n\n" + (total.group(0) + " " if total else "") + note + "\n"


def main(argv=None) -> dict:
    args = parse(argv)
    quiet()
    t0 = time.perf_counter()
    report: dict = {"args": vars(args)}
    parts: dict[str, str] = {}
    if "synthetic" not in args.skip:
        report["synthetic"] = synthetic(args, list(range(args.seeds)))
        parts["synthetic"] = synthetic_markdown(report["synthetic"], args)
        curve_plot(report["synthetic"], Path(args.out).with_suffix(".png"))
    if "text" not in args.skip:
        report["text"] = real_text(args, list(range(args.text_seeds)))
        parts["text"] = text_markdown(report["text"], args)
    if "perf" not in args.skip:
        report["generation"] = generation_ratio(args)
        report["training"] = training_throughput(args)
        parts["perf"] = perf_markdown(report["generation"], report["training"])
    report["minutes"] = (time.perf_counter() - t0) / 60
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    md, js = out.with_suffix(".md"), out.with_suffix(".json")
    if args.only is not None and md.is_file():
        # a partial rerun: replace its sections, keep the others (and their numbers in the JSON) as they were
        flags = f"--only {' '.join(args.only)}" + (" --text-spill" if args.text_spill else "") + (" --quick" if args.quick else "")
        note = f"Rerun of `python benchmarks/pause_tokens.py {flags}`: {report['minutes']:.1f} min."
        text = splice(md.read_text(), parts, note)
        old = json.loads(js.read_text()) if js.is_file() else {}
        report = {**old, **{k: v for k, v in report.items() if k not in ("args", "minutes")},
                  f"rerun_{'_'.join(args.only)}": {"args": vars(args), "minutes": report["minutes"]}}
    else:
        flags = (" --quick" if args.quick else "") + (f" --only {' '.join(args.only)}" if args.only else "")
        sections = [f"Command: `python benchmarks/pause_tokens.py{flags}` (1 CPU thread)\n"]
        for part, body in parts.items():
            sections += [TITLES[part], body]
        sections.append(f"Total time: {report['minutes']:.1f} min.\n")
        text = "\n".join(sections)
    md.write_text(text)
    js.write_text(json.dumps(report, indent=1, default=str))
    print(text)
    return report


if __name__ == "__main__":
    main()
