"""ResMem's claim at CPU scale: adding a kNN memory of training residuals improves a base model's test accuracy,
more so for larger training sets (and, in the paper, for smaller base models).

MNIST-1D (generated locally: 24,000 examples, one fixed 70/10/20 train/val/test split), base model an
``MLP(width, width)`` trained by :class:`lightning_methods.ResMem`'s ``fit`` (Adam, fixed epochs) on a random subset
of ``n_train`` training examples per seed. Three predictors share the same trained network and embedding (its
penultimate layer, L2-normalised):

* **base**: the network alone (argmax of its logits);
* **ResMem**: ``softmax(z / T) + sum_i w_i r_i`` over the k nearest training points, (k, sigma, T) tuned on the
  validation split over k in {5, 20, 50}, sigma in {0.05, 0.2}, T in {1, 2} (the paper-brief's grid);
* **kNN-only**: the same kernel-weighted kNN on the training *labels* (``sum_i w_i y_i``), (k, sigma) tuned on the
  same validation split: does the memory help beyond what the embedding's neighbours know?

Every (n_train, width) runs with several seeds; the table gives mean ± std test accuracy and the gain.

    python benchmarks/resmem.py            # full run (~5 min on one core), writes benchmarks/results/resmem.{md,png}
    python benchmarks/resmem.py --quick    # smoke run, writes nothing
"""

from __future__ import annotations

import argparse
import functools
import itertools
import statistics
import time
from collections import Counter
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from datamodules import MNIST1DDataModule
from lightning_methods import ResMem
from lightning_methods.nets import MLP
from lightning_methods.resmem import resmem_weights

RESULTS = Path(__file__).parent / "results"
GRID = {"k": [5, 20, 50], "sigma": [0.05, 0.2], "temperature": [1.0, 2.0]}


def knn_only(model: ResMem, val: TensorDataset, test: TensorDataset, ks: list[int], sigmas: list[float]) -> tuple[float, dict]:
    """Kernel-weighted kNN on the memorized labels, (k, sigma) picked on ``val``; returns test accuracy and the pick."""

    def scores(data: TensorDataset) -> tuple[dict, torch.Tensor]:
        emb, _, targets = model.embed(data)  # class indices (the memory stores integer labels)
        sq, idx = model.search(emb, max(ks))
        labels = torch.nn.functional.one_hot(model.memory_targets[idx], model.num_classes).float()
        return {(k, s): (resmem_weights(sq[:, :k], s).unsqueeze(-1) * labels[:, :k]).sum(1) for k in ks for s in sigmas}, targets

    val_scores, val_y = scores(val)
    best = max(val_scores, key=lambda key: (val_scores[key].argmax(1) == val_y).float().mean().item())
    test_scores, test_y = scores(test)
    return (test_scores[best].argmax(1) == test_y).float().mean().item(), {"k": best[0], "sigma": best[1]}


def run_one(splits, n_train: int, width: int, seed: int, epochs: int, batch_size: int, lr: float) -> dict:
    pl.seed_everything(seed, verbose=False)
    x, y = splits["train"]
    subset = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:n_train]
    train = TensorDataset(x[subset], y[subset])
    val, test = TensorDataset(*splits["val"]), TensorDataset(*splits["test"])
    model = ResMem(
        MLP(x.shape[1], 10, hidden_sizes=[width, width]), num_classes=10,
        optimizer=functools.partial(torch.optim.Adam, lr=lr),
    )
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    trainer.fit(model, DataLoader(train, batch_size=batch_size, shuffle=True))  # the memory is built when fit ends
    tuned = model.tune(val, **GRID)
    model.eval()
    with torch.no_grad():
        test_x, test_y = test.tensors
        base_acc = (model(test_x).argmax(1) == test_y).float().mean().item()
        resmem_acc = (model.predict(test_x).argmax(1) == test_y).float().mean().item()
    knn_acc, knn_pick = knn_only(model, val, test, GRID["k"], GRID["sigma"])
    train_acc = (model.memory_outputs.argmax(1) == model.memory_targets).float().mean().item()
    return {
        "n_train": n_train, "width": width, "seed": seed, "base": base_acc, "resmem": resmem_acc, "knn": knn_acc,
        "base_train": train_acc, "pick": (tuned["k"], tuned["sigma"], tuned["temperature"]), "knn_pick": knn_pick,
        "seconds": time.perf_counter() - start,
    }


def _mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f}"


def summarize(runs: list[dict]) -> list[dict]:
    rows = []
    for (n, w), group in itertools.groupby(sorted(runs, key=lambda r: (r["n_train"], r["width"])), key=lambda r: (r["n_train"], r["width"])):
        group = list(group)
        gains = [r["resmem"] - r["base"] for r in group]
        rows.append({
            "n_train": n, "width": w, "seeds": len(group),
            "base": _mean_std([r["base"] for r in group]),
            "resmem": _mean_std([r["resmem"] for r in group]),
            "knn": _mean_std([r["knn"] for r in group]),
            "gain": _mean_std(gains), "gain_mean": statistics.mean(gains),
            "wins": f"{sum(g > 0 for g in gains)}/{sum(g < 0 for g in gains)}",
            "base_train": _mean_std([r["base_train"] for r in group]),
            "pick": Counter(r["pick"] for r in group).most_common(1)[0][0],
        })
    return rows


def markdown(rows: list[dict], args: argparse.Namespace, minutes: float) -> str:
    lines = [
        "# ResMem on MNIST-1D: base vs ResMem vs kNN-only (test accuracy)",
        "",
        f"`python benchmarks/resmem.py` ({len(args.seeds)} seeds, {args.epochs} epochs, Adam lr {args.lr}, batch "
        f"{args.batch_size}, MNIST-1D {args.num_samples} examples with fixed val/test splits; {minutes:.1f} min on one "
        "CPU core). Mean ± std over seeds; *gain* = ResMem − base; *wins* = seeds where ResMem beats / trails the base. "
        "(k, σ, T) tuned on the validation split; *pick* is the most frequent choice.",
        "",
        "| n_train | width | base | ResMem | kNN-only | gain | wins | base train acc | pick (k, σ, T) |",
        "|---:|---:|---:|---:|---:|---:|:---:|---:|:---:|",
    ]
    for r in rows:
        pick = f"{r['pick'][0]}, {r['pick'][1]:g}, {r['pick'][2]:g}"
        lines.append(
            f"| {r['n_train']} | {r['width']} | {r['base']} | {r['resmem']} | {r['knn']} | {r['gain']} | {r['wins']} | "
            f"{r['base_train']} | {pick} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for n in sorted({r["n_train"] for r in rows}):
        sel = [r for r in rows if r["n_train"] == n]
        means = [r["gain_mean"] * 100 for r in sel]
        stds = [float(r["gain"].split("± ")[1]) * 100 for r in sel]
        ax.errorbar([r["width"] for r in sel], means, yerr=stds, marker="o", capsize=3, label=f"n_train = {n}")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("MLP width")
    ax.set_ylabel("ResMem − base (test acc, points)")
    ax.set_title("ResMem gain on MNIST-1D")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4000, 16000])
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 64, 256])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--num_samples", type=int, default=24000)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run; writes nothing")
    parser.add_argument("--out", type=Path, default=RESULTS / "resmem.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.widths, args.seeds, args.epochs, args.num_samples = [300, 600], [16], [0], 2, 1200
    torch.set_num_threads(1)
    start = time.perf_counter()
    dm = MNIST1DDataModule(num_samples=args.num_samples, seed=0)
    splits = dm.splits
    if max(args.sizes) > len(splits["train"][1]):
        parser.error(f"--sizes up to {max(args.sizes)} need more than {len(splits['train'][1])} training examples.")
    runs = []
    for n, width, seed in itertools.product(args.sizes, args.widths, args.seeds):
        run = run_one(splits, n, width, seed, args.epochs, args.batch_size, args.lr)
        runs.append(run)
        print(
            f"n={n:6d} width={width:4d} seed={seed}: base {run['base']:.3f} ResMem {run['resmem']:.3f} "
            f"kNN {run['knn']:.3f} (train {run['base_train']:.3f}; pick {run['pick']}; {run['seconds']:.1f}s)",
            flush=True,
        )
    rows = summarize(runs)
    table = markdown(rows, args, (time.perf_counter() - start) / 60)
    print(table)
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
        plot(rows, args.out.with_suffix(".png"))
    return rows


if __name__ == "__main__":
    main()
