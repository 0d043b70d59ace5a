"""Lightning Trainer step time vs a plain PyTorch loop: same model, same data, same work per step.

Both loops do forward, cross-entropy, backward, Adam step and a torchmetrics accuracy update on the same
DataLoader; the Trainer runs `ClassifierModule` (which also accumulates the epoch loss and logs the step loss through
`self.log` every `log_every_n_steps`), and a third arm runs a module that never calls `self.log`, to separate the
Trainer loop's cost from logging's. Timing is
steady-state time per step (timestamps after each step, the first `--warmup` steps dropped), the two loops
interleaved in each repeat so machine noise hits both alike; the result is a ratio measured in one run.

A second table times the data path alone: one epoch of our datamodule's training loader (the batched fetch of
`BatchedArrayDataset`: one index operation per batch) against a `TensorDataset` + default `DataLoader` over the same
arrays (an index and a collate per example), interleaved. Both loops of the first table read the datamodule's
loader, so they share the fast path.

    python benchmarks/overhead.py                 # full run, writes benchmarks/results/overhead.md
    python benchmarks/overhead.py --quick         # smoke run
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torchmetrics.classification import MulticlassAccuracy

from torch.utils.data import DataLoader, TensorDataset

from datamodules import DigitsDataModule, MNIST1DDataModule, MNISTDataModule
from lightning_methods import ClassifierModule
from lightning_methods.nets import MLP, SmallCNN

RESULTS = Path(__file__).parent / "results"


class _StepClock(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter())


def _per_step(times: list[float], warmup: int) -> float:
    return (times[-1] - times[warmup]) / (len(times) - 1 - warmup)


def plain_loop(model: torch.nn.Module, loader, steps: int) -> tuple[list[float], float]:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    accuracy = MulticlassAccuracy(10, average="micro")
    model.train()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < steps:
        for x, y in loader:
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            accuracy.update(logits.detach(), y)
            times.append(time.perf_counter())
            if len(times) == steps:
                break
    return times, times[-1] - start


class _NoLogClassifier(ClassifierModule):
    """ClassifierModule without the per-step ``self.log``: isolates the Trainer loop's own cost from logging's."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.train_acc.update(logits.detach(), y)
        return self.loss(logits, y)


def lightning_loop(model: torch.nn.Module, datamodule, steps: int, log: bool = True) -> tuple[list[float], float]:
    module = (ClassifierModule if log else _NoLogClassifier)(model, 10)
    clock = _StepClock()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule)
    return clock.times, time.perf_counter() - start


def run(setting: str, steps: int, repeats: int, warmup: int) -> dict:
    if setting == "mlp-digits":
        datamodule, net = DigitsDataModule(batch_size=64), MLP(64, 10, hidden_sizes=[256, 256])
    else:
        datamodule, net = MNISTDataModule(batch_size=64), SmallCNN(10, input_size=28)
    datamodule.setup("fit")
    ratios, nolog_ratios, e2e, plain_ms, light_ms = [], [], [], [], []
    arms = ("plain", "lightning", "lightning-nolog")
    for r in range(repeats):
        order = arms[r % 3 :] + arms[: r % 3]  # rotate so no arm always runs first
        out = {}
        for which in order:
            torch.manual_seed(r)
            model = copy.deepcopy(net)
            if which == "plain":
                out[which] = plain_loop(model, datamodule.train_dataloader(), steps)
            else:
                out[which] = lightning_loop(model, datamodule, steps, log=which == "lightning")
        p, lt = _per_step(out["plain"][0], warmup), _per_step(out["lightning"][0], warmup)
        nolog = _per_step(out["lightning-nolog"][0], warmup)
        plain_ms.append(1e3 * p)
        light_ms.append(1e3 * lt)
        ratios.append(lt / p)
        nolog_ratios.append(nolog / p)
        e2e.append(out["lightning"][1] / out["plain"][1])
        print(
            f"{setting} repeat {r}: plain {1e3 * p:.3f} ms/step, lightning {1e3 * lt:.3f} ms/step "
            f"(ratio {lt / p:.3f}), without self.log {1e3 * nolog:.3f} ms/step (ratio {nolog / p:.3f})"
        )
    return {
        "setting": setting,
        "plain_ms": statistics.median(plain_ms),
        "lightning_ms": statistics.median(light_ms),
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "nolog_ratio": statistics.median(nolog_ratios),
        "e2e": statistics.median(e2e),
    }


def _epoch_time(loader: DataLoader) -> tuple[float, int]:
    start = time.perf_counter()
    batches = sum(1 for _ in loader)
    return time.perf_counter() - start, batches


def data_path(setting: str, repeats: int) -> dict:
    """One epoch of the datamodule's loader vs TensorDataset + default DataLoader over the same arrays."""
    dm = DigitsDataModule(batch_size=64) if setting == "digits" else MNIST1DDataModule(batch_size=64)
    dm.setup("fit")
    x, y = dm.splits["train"]
    loaders = {"ours": dm.train_dataloader(), "tensordataset": DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)}
    times: dict[str, list[float]] = {name: [] for name in loaders}
    batches = 0
    for r in range(repeats):
        for name in (("ours", "tensordataset") if r % 2 == 0 else ("tensordataset", "ours")):
            seconds, batches = _epoch_time(loaders[name])
            times[name].append(seconds)
    ours, ref = statistics.median(times["ours"]), statistics.median(times["tensordataset"])
    ratios = [t / o for t, o in zip(times["tensordataset"], times["ours"])]
    print(f"data {setting}: ours {1e3 * ours:.2f} ms/epoch, TensorDataset {1e3 * ref:.2f} ms/epoch ({ref / ours:.2f}x)")
    return {
        "setting": setting, "rows": len(y), "batches": batches, "ours_ms": 1e3 * ours, "ref_ms": 1e3 * ref,
        "speedup": statistics.median(ratios), "speedup_min": min(ratios), "speedup_max": max(ratios),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--settings", nargs="+", default=["mlp-digits", "cnn-mnist"], choices=["mlp-digits", "cnn-mnist"])
    parser.add_argument("--data-settings", nargs="*", default=["digits", "mnist1d"], choices=["digits", "mnist1d"])
    parser.add_argument("--data-repeats", type=int, default=21)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (no results file)")
    parser.add_argument("--out", type=Path, default=RESULTS / "overhead.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.repeats, args.data_repeats = 12, 2, 1, 2
    torch.set_num_threads(1)
    rows = [run(s, args.steps, args.repeats, args.warmup) for s in args.settings]
    data_rows = [data_path(s, args.data_repeats) for s in args.data_settings]
    lines = [
        f"Steady-state time per training step, {args.steps} steps ({args.warmup} warm-up dropped), batch 64, one CPU "
        f"thread, median of {args.repeats} interleaved repeats (min-max of the per-repeat ratio in brackets).",
        "",
        "| setting | plain loop (ms/step) | Trainer + ClassifierModule (ms/step) | ratio (goal <= 1.10) | "
        "ratio, a module that never calls `self.log` | whole run incl. Trainer start-up |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['setting']} | {row['plain_ms']:.3f} | {row['lightning_ms']:.3f} | "
            f"{row['ratio']:.3f} ({row['ratio_min']:.3f}-{row['ratio_max']:.3f}) | {row['nolog_ratio']:.3f} | "
            f"{row['e2e']:.2f}x |"
        )
    if data_rows:
        lines += [
            "",
            f"Data path alone: one training epoch (batch 64, shuffled), median of {args.data_repeats} interleaved "
            "epochs (min-max of the per-epoch speed-up in brackets).",
            "",
            "| data | rows | batches | our datamodule's loader (ms/epoch) | TensorDataset + DataLoader (ms/epoch) | "
            "speed-up (goal >= 1.5x) |",
            "|---|---|---|---|---|---|",
        ]
        for row in data_rows:
            lines.append(
                f"| {row['setting']} | {row['rows']} | {row['batches']} | {row['ours_ms']:.2f} | {row['ref_ms']:.2f} | "
                f"{row['speedup']:.2f}x ({row['speedup_min']:.2f}-{row['speedup_max']:.2f}) |"
            )
    table = "\n".join(lines)
    print(table)
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")
    return rows + data_rows


if __name__ == "__main__":
    main()
