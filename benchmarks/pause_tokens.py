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
2. **Real text at equal tokens seen.** StdPT vs PausePT on gensim's Wikipedia articles (BPE trained offline): the
   pause run takes more steps so that both see the same number of real tokens; validation loss per real token on
   clean text (and, for PausePT, on text with pauses). FLOPs stated.
3. **Performance** (ratios, interleaved repeats in one run): generation time with M = 10 pauses vs none for 64-token
   answers; training tokens/s with and without pauses.

Writes ``benchmarks/results/pause_tokens.md`` (+ ``.json``, ``.png``). Full run: ~35 min of one core. ``--quick``:
seconds.

    python benchmarks/pause_tokens.py            # full
    python benchmarks/pause_tokens.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
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


def real_text(args, seeds: list[int]) -> dict:
    dm = TextLMDataModule(
        vocab_size=args.text_vocab, block_size=args.text_block, batch_size=args.text_batch,
        max_documents=args.text_documents, seed=0,
    )
    block = args.text_block
    pauses_per_block = round(0.1 * block)
    real_per_block = block - pauses_per_block
    steps = {"StdPT": args.text_steps, "PausePT": round(args.text_steps * block / real_per_block)}
    out: dict = {"StdPT": [], "PausePT": [], "PausePT_with_pauses": [], "steps": steps,
                 "train_tokens": dm.num_tokens("train"), "val_tokens": dm.num_tokens("val")}
    for seed in seeds:
        for pt, fraction in (("StdPT", 0.0), ("PausePT", 0.1)):
            pl.seed_everything(seed, verbose=False)
            lm = PauseTokenLM(
                tiny_gpt2(block), dm.tokenizer, mode="pretrain", pretrain_pause_fraction=fraction, seed=seed,
                optimizer=functools.partial(torch.optim.AdamW, lr=args.text_lr),
            )
            trainer(steps[pt]).fit(lm, dm)
            out[pt].append(clean_val_loss(lm, dm, pauses=False))
            if pt == "PausePT":
                out["PausePT_with_pauses"].append(clean_val_loss(lm, dm, pauses=True))
            print(f"seed {seed} text {pt}: {steps[pt]} steps, val loss (clean) {out[pt][-1]:.3f}", flush=True)
    out["real_tokens_seen"] = {
        "StdPT": steps["StdPT"] * args.text_batch * block,
        "PausePT": steps["PausePT"] * args.text_batch * real_per_block,
    }
    return out


def text_markdown(res: dict, args) -> str:
    seen = res["real_tokens_seen"]
    n = len(res["StdPT"])
    flops = res["steps"]["PausePT"] / res["steps"]["StdPT"]
    return "\n".join([
        f"**Wikipedia (gensim test data), {res['train_tokens']:,} training tokens, BPE {args.text_vocab}, blocks of "
        f"{args.text_block}, {n} seeds.** Validation loss per real token (nats), lower is better.\n",
        "| pretraining | steps | real tokens seen | training FLOPs | val loss, clean text | val loss, 10% pauses inserted |",
        "|---|---|---|---|---|---|",
        f"| StdPT | {res['steps']['StdPT']} | {seen['StdPT']:,} | 1.00x | {fmt(res['StdPT'], pct=False)} | - |",
        f"| PausePT | {res['steps']['PausePT']} | {seen['PausePT']:,} | {flops:.2f}x | {fmt(res['PausePT'], pct=False)} | "
        f"{fmt(res['PausePT_with_pauses'], pct=False)} |",
        "",
    ])


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
    p.add_argument("--skip", nargs="*", default=[], choices=["synthetic", "text", "perf"])
    p.add_argument("--out", default=str(RESULTS / "pause_tokens"))
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.sum_seeds, args.pt_steps, args.pt_train, args.ft_train, args.num_test = 1, 1, 3, 500, 300, 50
        args.ft_steps, args.sum_ft_steps, args.curve_at = 3, 3, [2]
        args.m_inf = [0, 8]
        args.text_seeds, args.text_steps, args.text_documents, args.text_vocab = 1, 3, 12, 300
        args.gen_repeats, args.train_repeats = 1, 1
        if args.out == str(RESULTS / "pause_tokens"):
            args.out = str(Path(tempfile.gettempdir()) / "pause_tokens_quick")
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    quiet()
    t0 = time.perf_counter()
    report: dict = {"args": vars(args)}
    sections = [f"Command: `python benchmarks/pause_tokens.py{' --quick' if args.quick else ''}` (1 CPU thread)\n"]
    if "synthetic" not in args.skip:
        report["synthetic"] = synthetic(args, list(range(args.seeds)))
        sections += ["### Synthetic reasoning: the four variants x M_inf\n", synthetic_markdown(report["synthetic"], args)]
        curve_plot(report["synthetic"], Path(args.out).with_suffix(".png"))
    if "text" not in args.skip:
        report["text"] = real_text(args, list(range(args.text_seeds)))
        sections += ["### Real text: StdPT vs PausePT at equal real tokens seen\n", text_markdown(report["text"], args)]
    if "perf" not in args.skip:
        report["generation"] = generation_ratio(args)
        report["training"] = training_throughput(args)
        sections += ["### Performance\n", perf_markdown(report["generation"], report["training"])]
    report["minutes"] = (time.perf_counter() - t0) / 60
    sections.append(f"Total time: {report['minutes']:.1f} min.\n")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(sections))
    out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
    print("\n".join(sections))
    return report


if __name__ == "__main__":
    main()
