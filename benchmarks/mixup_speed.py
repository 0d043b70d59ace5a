"""Step-time overhead of MixupCallback, with timm's ``Mixup`` as the anchor, measured in one run.

Same LightningModule (``ClassifierModule``), same data, same Trainer; only the callback differs:

  none            no mixup (the baseline)
  onehot_only     targets turned into one-hot float targets, inputs untouched: the cost of the soft-target loss path
                  that any mixup pays, whoever mixes
  ours_sample     MixupCallback(alpha=1, num_points=2, per_sample=True)   one lam per example (the paper's)
  ours_batch      MixupCallback(alpha=1, num_points=2, per_sample=False)  one lam per batch
  ours_k4         MixupCallback(alpha=1, num_points=4)                    4-point mixup
  timm_batch      timm.data.Mixup(mixup_alpha=1, cutmix_alpha=0, mode="batch") applied in a callback
  timm_elem       timm.data.Mixup(..., mode="elem"), timm's per-example lam

All arms run in one training run, interleaved step by step (step i uses arm i mod 7), so drift and other processes on
a shared machine hit every arm alike. A step's time is the process CPU time from ``on_train_batch_start`` (before any
mixing) to ``on_train_batch_end`` (after the optimizer step): mixing, forward, backward, optimizer, logging; data
loading is identical for every arm and left out, which makes the ratios slightly conservative. Since an arm runs one
step in 7, its callback's epoch hooks run once every 7 epochs (after as many of its own steps as a real epoch has),
so per-epoch work (MixupCallback draws an epoch's mixing weights at once and logs its statistics at the end) is
amortised as in a real run; the time of those hooks is added to the arm's total. Reported per arm: the median step
(the steady per-step cost) and the mean step including the per-epoch work (the whole cost), each as a ratio to
``none`` with a bootstrap 95% interval. Two workloads: a small CNN on MNIST-5k at batch 128 (realistic) and an MLP on
digits at batch 64 (framework-bound: the worst case for any per-step overhead, where the soft-target loss itself
costs more than integer targets). Batches are kept even (``drop_last``) because timm's ``Mixup`` requires it.

    python benchmarks/mixup_speed.py            # ~5 min on one core
    python benchmarks/mixup_speed.py --quick    # seconds: smoke test

Writes ``benchmarks/results/mixup_speed.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning.pytorch as pl  # noqa: E402
import numpy as np  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

from callbacks import MixupCallback  # noqa: E402
from datamodules import DigitsDataModule, MNISTDataModule  # noqa: E402
from lightning_methods import ClassifierModule  # noqa: E402
from lightning_methods.nets import MLP, SmallCNN  # noqa: E402

ARMS = ("none", "onehot_only", "ours_sample", "ours_batch", "ours_k4", "timm_batch", "timm_elem")


class _Interleaved(Callback):
    """Runs the arms in turn, one training step each (step i uses arm i mod #arms), timing each step.

    An arm's callback gets ``on_train_epoch_start`` / ``on_train_epoch_end`` once every #arms epochs, i.e. after as
    many of its own steps as one epoch has; their CPU time is kept per arm in ``hook_time``. ``times[arm]`` holds the
    arm's step times after ``warmup`` steps; CPU time rather than wall time keeps time stolen by other processes out.
    """

    def __init__(self, arms: dict[str, Callback | None], warmup: int) -> None:
        self.arms, self.names, self.warmup = arms, list(arms), warmup
        self.times: dict[str, list[float]] = {name: [] for name in arms}
        self.hook_time = dict.fromkeys(arms, 0.0)
        self._current: str | None = None

    def _each(self, hook: str, trainer, *args) -> None:
        for name, cb in self.arms.items():
            if cb is not None:
                start = time.process_time()
                getattr(cb, hook)(trainer, *args)
                if trainer.global_step > self.warmup:
                    self.hook_time[name] += time.process_time() - start

    def setup(self, trainer, module, stage):
        for cb in self.arms.values():
            if cb is not None:
                cb.setup(trainer, module, stage)

    def on_train_epoch_start(self, trainer, module):
        if trainer.current_epoch % len(self.names) == 0:
            self._each("on_train_epoch_start", trainer, module)

    def on_train_epoch_end(self, trainer, module):
        if trainer.current_epoch % len(self.names) == len(self.names) - 1:
            self._each("on_train_epoch_end", trainer, module)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._current = self.names[trainer.global_step % len(self.names)]
        self._start = time.process_time()
        cb = self.arms[self._current]
        if cb is not None:
            cb.on_train_batch_start(trainer, module, batch, batch_idx)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        elapsed = time.process_time() - self._start
        if trainer.global_step > self.warmup:
            self.times[self._current].append(elapsed)


class _TimmMixup(Callback):
    """timm's Mixup applied to each training batch, the way a user would wire it into Lightning."""

    def __init__(self, mode: str, num_classes: int) -> None:
        from timm.data import Mixup

        self.fn = Mixup(mixup_alpha=1.0, cutmix_alpha=0.0, label_smoothing=0.0, num_classes=num_classes, mode=mode)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        batch[0], batch[1] = self.fn(batch[0], batch[1])


class _OneHotOnly(Callback):
    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        batch[1] = torch.nn.functional.one_hot(batch[1], self.num_classes).float()


def _callback(arm: str, num_classes: int) -> Callback | None:
    if arm == "none":
        return None
    if arm == "onehot_only":
        return _OneHotOnly(num_classes)
    if arm.startswith("timm"):
        return _TimmMixup(arm.split("_")[1], num_classes)
    return MixupCallback(
        alpha=1.0, num_points=4 if arm == "ours_k4" else 2, per_sample=arm != "ours_batch", seed=0, log_stats=True
    )


def _workloads(quick: bool) -> dict:
    def cnn():
        dm = MNISTDataModule(batch_size=128, drop_last=True)
        return dm, SmallCNN(num_classes=10, in_channels=1, input_size=28, channels=(16, 32), hidden=64)

    def mlp():
        dm = DigitsDataModule(batch_size=64, drop_last=True)
        return dm, MLP(64, 10, hidden_sizes=[256, 256])

    return {"SmallCNN, MNIST-5k, batch 128": cnn, "MLP 256x2, digits, batch 64": mlp}


def time_arms(make, steps: int, warmup: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    pl.seed_everything(0)
    dm, net = make()
    timer = _Interleaved({arm: _callback(arm, dm.num_classes) for arm in ARMS}, warmup)
    trainer = pl.Trainer(
        max_steps=warmup + 1 + steps * len(ARMS), max_epochs=-1, accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0, callbacks=[timer],
    )
    trainer.fit(ClassifierModule(net, dm.num_classes), datamodule=dm)
    return timer.times, timer.hook_time


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=800, help="timed steps per arm and workload")
    parser.add_argument("--warmup", type=int, default=14)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    name = "mixup_speed"
    if args.quick:
        args.steps, args.warmup, name = 3, 2, "mixup_speed_quick"
    args.out.mkdir(parents=True, exist_ok=True)

    sections = []
    for label, make in _workloads(args.quick).items():
        times, hook_time = time_arms(make, args.steps, args.warmup)
        t0 = np.asarray(times["none"])
        rows = [
            "| arm | median step (ms) | ratio | 95% CI | mean step incl. per-epoch work (ms) | ratio | 95% CI |",
            "|---|---|---|---|---|---|---|",
        ]
        rng = np.random.default_rng(0)
        for arm in ARMS:
            t = np.asarray(times[arm])
            extra = hook_time[arm] / len(t)  # the arm's epoch hooks, spread over its steps
            med, mean = float(np.median(t)), float(t.mean()) + extra
            med_ratio, mean_ratio = med / float(np.median(t0)), mean / (float(t0.mean()) + hook_time["none"] / len(t0))
            # bootstrap over steps: how much each ratio could move with other draws of steps
            boot = np.array([
                (np.median(a) / np.median(b), (a.mean() + extra) / b.mean())
                for a, b in ((rng.choice(t, len(t)), rng.choice(t0, len(t0))) for _ in range(500))
            ])
            (lo_m, lo_a), (hi_m, hi_a) = np.percentile(boot, [2.5, 97.5], axis=0)
            rows.append(
                f"| {arm} | {1e3 * med:.3f} | {med_ratio:.3f}x | {lo_m:.3f}-{hi_m:.3f} | "
                f"{1e3 * mean:.3f} | {mean_ratio:.3f}x | {lo_a:.3f}-{hi_a:.3f} |"
            )
            print(f"{label}: {arm:12s} median {med_ratio:.3f}x [{lo_m:.3f}, {hi_m:.3f}]  "
                  f"mean {mean_ratio:.3f}x [{lo_a:.3f}, {hi_a:.3f}]", flush=True)
        sections.append(
            f"**{label}** ({len(t0)} steps per arm, interleaved step by step)\n\n" + "\n".join(rows)
        )
    command = "python benchmarks/mixup_speed.py" + (" --quick" if args.quick else "")
    text = (
        f"# Mixup step-time overhead\n\n`{command}` (one CPU thread; process CPU time per iteration; compare ratios within this run only)\n\n"
        + "\n\n".join(sections) + "\n"
    )
    (args.out / f"{name}.md").write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
