"""DPSGDFModule step time vs a plain loop on Opacus' ``make_private``, and vs non-private Lightning training.

Same model, data, optimizer (SGD), Poisson sample rate, noise multiplier (1.0) and clip norm (1.0) in every DP arm:

* ``opacus loop``: ``PrivacyEngine().make_private(module, optimizer, data_loader)`` and a bare
  ``for x, y in loader: zero_grad, forward, cross-entropy, backward, step`` loop (Opacus' own recipe);
* ``opacus ghost loop``: the same loop on ``make_private(..., criterion=..., grad_sample_mode="ghost")`` (Opacus'
  fast gradient clipping: per-example gradient norms without per-example gradients for Linear layers, the loss
  wrapper running the two backward passes), the anchor of the ghost arm;
* ``DPSGDFModule``: the same DP-SGD through ``Trainer.fit`` (``preprocess=False``, the noise multiplier fixed so
  no calibration runs), with everything the module does per step (Poisson loader, per-sample clipping, seeded
  noise, ledger, budget guard, loss/accuracy metrics);
* ``DPSGDFModule ghost``: ``grad_sample_mode="ghost"``, otherwise as ``DPSGDFModule``;
* ``DPSGDFModule, preprocess``: DPSGD-F (the fitted transform applied in every forward; the one-off private mean
  and radius pass happens before the first step and is not in the steady state);
* ``non-private``: ``ClassifierModule`` (same model, SGD) through ``Trainer.fit`` on the ordinary loader.

Steady-state time per step (timestamps after each step, the first ``--warmup`` dropped), the arms interleaved and
their order rotated in each repeat; ratios are per repeat, reported as the median (min-max) of the repeats.

    python benchmarks/dpsgd_f_perf.py           # full run: benchmarks/results/dpsgd_f_perf.md
    python benchmarks/dpsgd_f_perf.py --quick   # smoke run, writes nothing
"""

from __future__ import annotations

import argparse
import copy
import functools
import logging
import statistics
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from datamodules import DigitsDataModule, MNISTDataModule
from lightning_methods import ClassifierModule, DPSGDFModule
from lightning_methods.nets import MLP, SmallCNN

RESULTS = Path(__file__).parent / "results"
NOISE, CLIP, LR = 1.0, 1.0, 0.1
ARMS = ("opacus loop", "DPSGDFModule", "opacus ghost loop", "DPSGDFModule ghost", "DPSGDFModule, preprocess", "non-private")


class _StepClock(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter())


def _per_step(times: list[float], warmup: int) -> float:
    return (times[-1] - times[warmup]) / (len(times) - 1 - warmup)


def opacus_loop(model: torch.nn.Module, dataset, batch_size: int, steps: int, ghost: bool = False) -> list[float]:
    from opacus import PrivacyEngine

    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True)
    if ghost:
        model, optimizer, criterion, loader = PrivacyEngine().make_private(
            module=model, optimizer=optimizer, data_loader=loader, criterion=torch.nn.CrossEntropyLoss(),
            noise_multiplier=NOISE, max_grad_norm=CLIP, grad_sample_mode="ghost",
        )
    else:
        model, optimizer, loader = PrivacyEngine().make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=NOISE, max_grad_norm=CLIP
        )
        criterion = F.cross_entropy
    model.train()
    times: list[float] = []
    while len(times) < steps:
        for x, y in loader:
            optimizer.zero_grad()
            criterion(model(x), y).backward()
            optimizer.step()
            times.append(time.perf_counter())
            if len(times) == steps:
                break
    return times


def lightning_loop(module: pl.LightningModule, datamodule, steps: int) -> list[float]:
    clock = _StepClock()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
    )
    trainer.fit(module, datamodule)
    return clock.times


def run(setting: str, steps: int, repeats: int, warmup: int) -> dict:
    if setting == "linear-digits":
        datamodule, net = DigitsDataModule(batch_size=64), MLP(64, 10, hidden_sizes=[])
    elif setting == "mlp-digits":
        datamodule, net = DigitsDataModule(batch_size=64), MLP(64, 10, hidden_sizes=[256, 256])
    else:
        datamodule, net = MNISTDataModule(batch_size=64), SmallCNN(10, input_size=28)
    datamodule.setup("fit")
    sgd = functools.partial(torch.optim.SGD, lr=LR)
    per_step: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for r in range(repeats):
        order = ARMS[r % len(ARMS) :] + ARMS[: r % len(ARMS)]  # rotate so no arm always runs first
        for arm in order:
            torch.manual_seed(r)
            model = copy.deepcopy(net)
            if arm.startswith("opacus"):
                times = opacus_loop(model, datamodule.train_dataset, 64, steps, ghost="ghost" in arm)
            elif arm == "non-private":
                times = lightning_loop(ClassifierModule(model, 10, optimizer=sgd), datamodule, steps)
            else:
                module = DPSGDFModule(
                    model, 10, target_epsilon=1e4, delta=1e-5, max_grad_norm=CLIP, noise_multiplier=NOISE,
                    preprocess=arm.endswith("preprocess"), optimizer=sgd,
                    grad_sample_mode="ghost" if arm.endswith("ghost") else "hooks",
                )
                times = lightning_loop(module, datamodule, steps)
            per_step[arm].append(_per_step(times, warmup))
        print(
            f"{setting} repeat {r}: "
            + ", ".join(f"{arm} {1e3 * per_step[arm][-1]:.3f} ms/step" for arm in ARMS),
            flush=True,
        )
    base = per_step["opacus loop"]
    ratio = [m / b for m, b in zip(per_step["DPSGDFModule"], base)]
    ratio_pre = [m / b for m, b in zip(per_step["DPSGDFModule, preprocess"], base)]
    vs_nonprivate = [m / b for m, b in zip(per_step["DPSGDFModule"], per_step["non-private"])]
    ghost = [m / b for m, b in zip(per_step["DPSGDFModule ghost"], per_step["opacus ghost loop"])]
    ghost_np = [m / b for m, b in zip(per_step["DPSGDFModule ghost"], per_step["non-private"])]
    return {
        "setting": setting,
        **{f"{arm} ms": 1e3 * statistics.median(v) for arm, v in per_step.items()},
        "ratio": statistics.median(ratio),
        "ratio_range": (min(ratio), max(ratio)),
        "ratio_pre": statistics.median(ratio_pre),
        "vs_nonprivate": statistics.median(vs_nonprivate),
        "vs_nonprivate_range": (min(vs_nonprivate), max(vs_nonprivate)),
        "ghost_ratio": statistics.median(ghost),
        "ghost_ratio_range": (min(ghost), max(ghost)),
        "ghost_vs_nonprivate": statistics.median(ghost_np),
        "ghost_vs_nonprivate_range": (min(ghost_np), max(ghost_np)),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--settings", nargs="+", default=["linear-digits", "mlp-digits", "cnn-mnist"],
        choices=["linear-digits", "mlp-digits", "cnn-mnist"],
    )
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (no results file)")
    parser.add_argument("--out", type=Path, default=RESULTS / "dpsgd_f_perf.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.repeats = 12, 2, 1
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    rows = [run(s, args.steps, args.repeats, args.warmup) for s in args.settings]
    lines = [
        f"Steady-state time per step, {args.steps} steps ({args.warmup} warm-up dropped), expected batch 64, SGD, "
        f"noise multiplier {NOISE}, clip {CLIP}, one CPU thread; median of {args.repeats} interleaved repeats "
        "(min-max of the per-repeat ratio in brackets).",
        "",
        "| setting | mode | Opacus `make_private` loop (ms/step) | DPSGDFModule (ms/step) | ratio to the Opacus loop "
        "(goal <= 1.05) | DPSGD-F (preprocess) ratio | non-private Lightning (ms/step) | DPSGDFModule / non-private |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lo, hi = row["ratio_range"]
        nlo, nhi = row["vs_nonprivate_range"]
        glo, ghi = row["ghost_ratio_range"]
        gnlo, gnhi = row["ghost_vs_nonprivate_range"]
        lines.append(
            f"| {row['setting']} | hooks | {row['opacus loop ms']:.3f} | {row['DPSGDFModule ms']:.3f} | "
            f"{row['ratio']:.3f} ({lo:.3f}-{hi:.3f}) | {row['ratio_pre']:.3f} | {row['non-private ms']:.3f} | "
            f"{row['vs_nonprivate']:.2f}x ({nlo:.2f}-{nhi:.2f}) |"
        )
        lines.append(
            f"| | ghost | {row['opacus ghost loop ms']:.3f} | {row['DPSGDFModule ghost ms']:.3f} | "
            f"{row['ghost_ratio']:.3f} ({glo:.3f}-{ghi:.3f}) | | | "
            f"{row['ghost_vs_nonprivate']:.2f}x ({gnlo:.2f}-{gnhi:.2f}) |"
        )
    table = "\n".join(lines)
    print(table)
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")
    return rows


if __name__ == "__main__":
    main()
