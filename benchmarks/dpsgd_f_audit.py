"""One-run privacy audit of DPSGDFModule (Steinke, Nasr & Jagielski, NeurIPS 2023, arXiv:2305.08846).

An empirical *lower bound* on epsilon, with 95% confidence over the canaries' secret coin flips, from one training
run per row: ``m`` Dirac canaries (canary ``i`` is the unit vector on its own extra input feature, with a random
label) each join scikit-learn's digits training set independently with probability 1/2; a linear model is trained
with DP-SGD or DPSGD-F at epsilon in {1, 4, 8}; each canary is scored by how much training raised its label margin
(white-box: the auditor knows the initialisation, :func:`lightning_methods.dpsgd_f.canary_scores`); the auditor
guesses "in" for the highest and "out" for the lowest scores and the number of correct guesses becomes the bound
(:func:`lightning_methods.dpsgd_f.audit`, Bonferroni over 4 guess counts).

A correct implementation must give bounds below the reported epsilon. The "broken" rows switch the optimizer's noise
off while the ledger still reports the calibrated multiplier (the bug a half-noise or no-noise change would be): the
audit must then give a bound above the reported epsilon, up to the ceiling ``m`` canaries allow (about 5.2 for
m = 1000 with every guess right).

    python benchmarks/dpsgd_f_audit.py           # full run (~5 min on one core): benchmarks/results/dpsgd_f_audit.md
    python benchmarks/dpsgd_f_audit.py --quick   # smoke run
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
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from lightning_methods.dpsgd_f import DPSGDFModule, audit, audit_epsilon_lower_bound, canary_scores, dirac_canaries
from lightning_methods.nets import MLP

RESULTS = Path(__file__).parent / "results"
DELTA = 1e-5
ARMS = ("DP-SGD", "DPSGD-F", "DP-SGD, noise off (broken)")


class _NoNoise(pl.Callback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        optimizer.noise_multiplier = 0.0


def run(arm: str, epsilon: float, seed: int, args: argparse.Namespace) -> dict[str, float]:
    pl.seed_everything(seed, verbose=False)  # the model's initialisation; the DP randomness stays secret
    x, y = load_digits(return_X_y=True)
    x = torch.as_tensor(x / 16.0, dtype=torch.float32)
    y = torch.as_tensor(y)
    m = args.canaries
    cx, cy, included = dirac_canaries(m, 10)
    train_x = torch.cat([torch.cat([x, torch.zeros(len(x), m)], 1), torch.cat([torch.zeros(int(included.sum()), 64), cx[included]], 1)])
    train_y = torch.cat([y, cy[included]])
    model = MLP(in_features=64 + m, num_classes=10, hidden_sizes=[])
    initial = copy.deepcopy(model)
    module = DPSGDFModule(
        model, 10, target_epsilon=epsilon, delta=DELTA, max_grad_norm=1.0, preprocess=arm == "DPSGD-F",
        optimizer=functools.partial(torch.optim.SGD, lr=args.lr),
    )
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=args.epochs, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[_NoNoise()] if "broken" in arm else [],
    )
    trainer.fit(module, train_dataloaders=DataLoader(TensorDataset(train_x, train_y), batch_size=args.batch_size, shuffle=True))
    canaries = torch.cat([torch.zeros(m, 64), cx], 1)
    # DPSGD-F's forward includes the fitted private transform: score the whole module, the initial one unfitted
    # with the same transform (so only the weights' change counts)
    if arm == "DPSGD-F":
        start = torch.nn.Sequential(copy.deepcopy(module.preprocessor), initial)
        scores = canary_scores(module.export(), canaries, cy, initial=start)
    else:
        scores = canary_scores(module.model, canaries, cy, initial=initial)
    result = audit(scores, included, delta=DELTA)
    result["reported"] = module.epsilon
    return result


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "opacus"):
        logging.getLogger(name).setLevel(logging.ERROR)
    epsilons = (1.0, 4.0, 8.0)
    if args.quick:
        args.seeds, args.canaries, args.epochs, epsilons = 1, 100, 2, (4.0,)
    out = args.out if args.out is not None else (None if args.quick else RESULTS / "dpsgd_f_audit")
    start = time.time()
    results = {(a, e): [] for a in ARMS for e in epsilons}
    for seed in range(args.seeds):
        for epsilon in epsilons:
            for arm in ARMS:
                r = run(arm, epsilon, seed, args)
                results[(arm, epsilon)].append(r)
                print(f"eps={epsilon:g} seed={seed} {arm:28s} bound={r['epsilon_lower_bound']:.3f} "
                      f"({r['correct']:.0f}/{r['guesses']:.0f} correct)  ({time.time() - start:.0f}s)", flush=True)
    ceiling = audit_epsilon_lower_bound(args.canaries, int(0.8 * args.canaries), int(0.8 * args.canaries), DELTA, 1 - 0.05 / 4)
    lines = [
        "# One-run privacy audit of DPSGDFModule (Steinke, Nasr & Jagielski 2023)",
        "",
        f"Digits (n = 1797) plus {args.canaries} Dirac canaries, each included with probability 1/2; linear model, "
        f"{args.epochs} epochs, expected batch {args.batch_size}, SGD lr {args.lr}, clip 1, delta {DELTA:g}. Lower "
        f"bound on epsilon with 95% confidence (Bonferroni over 4 guess counts), white-box canary scores; mean ± sd "
        f"over {args.seeds} seeds (max in brackets). The most {args.canaries} canaries can certify (every guess "
        f"right) is {ceiling:.2f}.",
        "",
        "| training | reported epsilon | " + " | ".join(f"bound at eps {e:g}" for e in epsilons) + " |",
        "|---|---|" + "---|" * len(epsilons),
    ]
    for arm in ARMS:
        cells = []
        for e in epsilons:
            bounds = [r["epsilon_lower_bound"] for r in results[(arm, e)]]
            cells.append(f"{mean_sd(bounds)} [{max(bounds):.2f}]")
        reported = " / ".join(f"{statistics.mean(r['reported'] for r in results[(arm, e)]):.2f}" for e in epsilons)
        lines.append(f"| {arm} | {reported} | " + " | ".join(cells) + " |")
    lines += ["", f"Total time {time.time() - start:.0f} s on one CPU thread."]
    text = "\n".join(lines) + "\n"
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(text)
        print(f"wrote {out.with_suffix('.md')}")
    return {"results": results, "table": text}


if __name__ == "__main__":
    main()
