"""Cost of mixing one batch with CutMix: MixupCallback against timm's ``Mixup``, same settings, same batches.

Arms (all with mixup ``alpha = 1``, CutMix ``alpha = 1``, ``switch_prob = 0.5``, ``prob = 1``, label smoothing 0.1,
timm's defaults for the last three):

  ours_mixup        MixupCallback(alpha=1, label_smoothing=0.1): plain mixup, the hot path (reference)
  ours_elem         MixupCallback(..., cutmix_alpha=1, per_sample=True): a decision and a box per example
  ours_batch        MixupCallback(..., cutmix_alpha=1, per_sample=False): one decision and box per batch
  timm_elem         timm.data.Mixup(..., mode="elem")
  timm_batch        timm.data.Mixup(..., mode="batch")

What is timed: the process CPU time of mixing one batch (the callback's ``on_train_batch_start``, or timm's
``Mixup.__call__`` as a callback would call it), not a training step; the arms run interleaved in blocks of calls, so
drift on a shared machine hits all alike. Per arm: mean over ``--rounds`` rounds of the per-call time, and its
standard deviation across rounds; the ratio is to ``ours_mixup``. Two batches: MNIST-sized ``128 x 1 x 28 x 28`` and
CIFAR-sized ``64 x 3 x 32 x 32``. For scale, a SmallCNN training step on the first is ~47 ms
(``benchmarks/mixup_speed.py``).

    python benchmarks/mixup_cutmix_speed.py            # ~1 min on one core
    python benchmarks/mixup_cutmix_speed.py --quick    # seconds: smoke test

Writes ``benchmarks/results/mixup_cutmix_speed.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from callbacks import MixupCallback  # noqa: E402

ARMS = ("ours_mixup", "ours_elem", "ours_batch", "timm_elem", "timm_batch")
COMMON = dict(switch_prob=0.5, prob=1.0, label_smoothing=0.1)


def _arms(num_classes: int) -> dict:
    from timm.data import Mixup

    trainer = SimpleNamespace(datamodule=None, max_epochs=1, global_rank=0, current_epoch=0, num_training_batches=None)
    module = SimpleNamespace(num_classes=num_classes, label_smoothing=0.0)
    steps = {}
    for name, kwargs in (
        ("ours_mixup", dict(label_smoothing=0.1)),
        ("ours_elem", dict(cutmix_alpha=1.0, per_sample=True, **COMMON)),
        ("ours_batch", dict(cutmix_alpha=1.0, per_sample=False, **COMMON)),
    ):
        cb = MixupCallback(alpha=1.0, seed=0, log_stats=False, **kwargs)
        cb.setup(trainer, module, "fit")
        cb.on_train_epoch_start(trainer, module)
        steps[name] = lambda batch, cb=cb: cb.on_train_batch_start(trainer, module, batch, 0)
    for mode in ("elem", "batch"):
        fn = Mixup(mixup_alpha=1.0, cutmix_alpha=1.0, num_classes=num_classes, mode=mode, **COMMON)

        def step(batch, fn=fn):
            batch[0], batch[1] = fn(batch[0], batch[1])  # in place, as a callback wiring timm into Lightning does

        steps[f"timm_{mode}"] = step
    return steps


def measure(shape: tuple[int, ...], rounds: int, calls: int, block: int = 10, num_classes: int = 10) -> dict:
    """Per-call CPU time (us) of each arm, one value per round."""
    np.random.seed(0)  # timm draws from numpy's global generator
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(*shape, generator=g), torch.randint(0, num_classes, (shape[0],), generator=g)
    steps = _arms(num_classes)
    # each arm its own copy of the inputs: timm mixes them in place (they stay bounded: convex mixes and copies)
    inputs = {name: x.clone() for name in steps}
    for name, step in steps.items():  # warm-up
        for _ in range(3):
            step([inputs[name], y])
    times = {name: [] for name in steps}
    for _ in range(rounds):
        spent = dict.fromkeys(steps, 0.0)
        for _ in range(max(1, calls // block)):
            for name, step in steps.items():
                xa = inputs[name]
                start = time.process_time()
                for _ in range(block):
                    step([xa, y])  # a new batch list per call, integer targets, as a loader yields them
                spent[name] += time.process_time() - start
        for name in steps:
            times[name].append(spent[name] / (max(1, calls // block) * block) * 1e6)
    return times


def table(times: dict) -> str:
    base = np.mean(times["ours_mixup"])
    lines = ["| arm | us per batch (mean ± std over rounds) | ratio to ours_mixup |", "|---|---|---|"]
    for name in ARMS:
        t = np.asarray(times[name])
        lines.append(f"| {name} | {t.mean():.0f} ± {t.std(ddof=1) if len(t) > 1 else 0.0:.0f} | {t.mean() / base:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=200, help="calls per arm per round")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    name = "mixup_cutmix_speed"
    if args.quick:
        args.rounds, args.calls, name = 2, 10, "mixup_cutmix_speed_quick"
    parts = []
    for label, shape in (("MNIST-sized batch 128 x 1 x 28 x 28", (128, 1, 28, 28)), ("CIFAR-sized batch 64 x 3 x 32 x 32", (64, 3, 32, 32))):
        parts.append(f"**{label}** ({args.rounds} rounds x {args.calls} calls per arm)\n\n" + table(measure(shape, args.rounds, args.calls)))
    command = "python benchmarks/mixup_cutmix_speed.py" + (" --quick" if args.quick else "")
    text = "\n\n".join(parts) + f"\n\nMade by `{command}` (CPU, one thread).\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.md").write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
