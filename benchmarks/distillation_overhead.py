"""Step time of DistillationModule with cached teacher logits vs a plain ClassifierModule (goal: <= 1.05x).

With ``cache_teacher_logits=True`` the teacher runs once over the training set when ``fit`` starts; each step then
adds only a KL term (two log-softmaxes) and the logits' transfer with the batch. Both arms train the same student
on the same data with the same Trainer settings; a third arm (live teacher forward every step) shows what the cache
saves. Timing is steady-state time per step (timestamps at each ``on_train_batch_end``, so data loading is included,
the first ``--warmup`` steps dropped), the arms interleaved in each repeat (order alternating) so machine noise hits
them alike; the ratio is taken per repeat and the median reported, all in one run.

    python benchmarks/distillation_overhead.py            # full run, writes benchmarks/results/distillation_overhead.md
    python benchmarks/distillation_overhead.py --quick    # smoke run, writes nothing
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from datamodules import DigitsDataModule, MNISTDataModule
from lightning_methods import ClassifierModule, DistillationModule
from lightning_methods.nets import MLP, SmallCNN

RESULTS = Path(__file__).parent / "results"
SETTINGS = {
    # name: (datamodule factory, student factory, teacher factory)
    "cnn-mnist": (
        lambda: MNISTDataModule(batch_size=64, seed=0),
        lambda: SmallCNN(10, channels=(16, 32), hidden=64),
        lambda: SmallCNN(10, channels=(32, 64), hidden=128),
    ),
    "mlp-digits": (
        lambda: DigitsDataModule(batch_size=64, seed=0),
        lambda: MLP(64, 10, hidden_sizes=[64]),
        lambda: MLP(64, 10, hidden_sizes=[256, 256]),
    ),
}
# arm: (alpha, temperature, cache) of the DistillationModule; pure KD is the papers' setting, 0.9 / 4 the classic one
ARMS = {"classifier": None, "kd-pure-cached": (1.0, 1.0, True), "kd-cached": (0.9, 4.0, True), "kd-live": (0.9, 4.0, False)}


class _StepClock(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter())


def time_arm(arm: str, student: torch.nn.Module, teacher: torch.nn.Module, datamodule, steps: int, warmup: int) -> float:
    if ARMS[arm] is None:
        module: pl.LightningModule = ClassifierModule(copy.deepcopy(student), num_classes=10)
    else:
        alpha, temperature, cache = ARMS[arm]
        module = DistillationModule(
            copy.deepcopy(student), teacher, num_classes=10, temperature=temperature, alpha=alpha,
            cache_teacher_logits=cache,
        )
    clock = _StepClock()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, max_epochs=-1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[clock],
    )
    trainer.fit(module, datamodule)
    times = clock.times
    return (times[-1] - times[warmup]) / (len(times) - 1 - warmup)


def run(setting: str, repeats: int, steps: int, warmup: int) -> dict:
    make_data, make_student, make_teacher = SETTINGS[setting]
    torch.manual_seed(0)
    student, teacher = make_student(), make_teacher()
    datamodule = make_data()
    per_step = {arm: [] for arm in ARMS}
    for r in range(repeats):
        for arm in list(ARMS) if r % 2 == 0 else list(ARMS)[::-1]:
            per_step[arm].append(time_arm(arm, student, teacher, datamodule, steps, warmup))
    row = {"setting": setting, **{f"{arm}_ms": 1000 * statistics.median(v) for arm, v in per_step.items()}}
    for arm, key in (("kd-pure-cached", "pure"), ("kd-cached", "cached"), ("kd-live", "live")):
        ratios = [c / p for c, p in zip(per_step[arm], per_step["classifier"])]
        row[f"ratio_{key}"] = statistics.median(ratios)
        row[f"ratio_{key}_range"] = (min(ratios), max(ratios))
    return row


def table(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"Steady-state time per training step, {args.steps} steps ({args.warmup} warm-up dropped), batch 64, one CPU "
        f"thread, median of {args.repeats} interleaved repeats; ratios to ClassifierModule are medians of the "
        "per-repeat ratios (min-max in brackets). Pure KD: alpha = 1, tau = 1 (the deviation paper's setting: the "
        "KL replaces the cross-entropy); classic KD: alpha = 0.9, tau = 4 (cross-entropy and KL both computed).",
        "",
        "| setting | ClassifierModule (ms/step) | pure KD, cached logits | ratio (goal <= 1.05) | classic KD, cached logits | ratio (goal <= 1.05) | classic KD, live teacher | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = []
        for arm, key in (("kd-pure-cached", "pure"), ("kd-cached", "cached"), ("kd-live", "live")):
            lo, hi = r[f"ratio_{key}_range"]
            cells += [f"{r[f'{arm}_ms']:.3f}", f"{r[f'ratio_{key}']:.3f} ({lo:.3f}-{hi:.3f})"]
        lines.append(f"| {r['setting']} | {r['classifier_ms']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="1 repeat of 12 steps; writes nothing")
    parser.add_argument("--out", type=Path, default=RESULTS / "distillation_overhead.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.steps, args.warmup = 1, 12, 2
    torch.set_num_threads(1)
    rows = [run(s, args.repeats, args.steps, args.warmup) for s in args.settings]
    text = table(rows, args)
    print(text)
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\nCommand: `python benchmarks/distillation_overhead.py`\n")
    return rows


if __name__ == "__main__":
    main()
