"""lightning_methods.metrics against scikit-learn / numpy / brute force, hand cases, input errors, and 2-process DDP."""

from __future__ import annotations

import doctest
import itertools
import math
from fractions import Fraction
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, recall_score, roc_auc_score, roc_curve
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.utilities import dim_zero_cat

import lightning_methods
from lightning_methods import metrics
from lightning_methods.metrics import DeferralCurve, RiskCoverage, SCODRisk, WorstClassAccuracy, plot_curve, scalars
from tests.helpers import cpu_trainer, ddp_trainer


def _batched_update(metric, *columns, sizes=(7, 1, 30, 0, 13)):
    """Feed ``columns`` to ``metric.update`` in uneven batches (incl. an empty one), the rest in one last batch."""
    start = 0
    for size in sizes:
        metric.update(*(c[start : start + size] for c in columns))
        start += size
    metric.update(*(c[start:] for c in columns))
    return metric.compute()


def _close(actual, expected, **kw):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64), torch.as_tensor(expected, dtype=torch.float64), atol=1e-6, rtol=1e-5, **kw)


def _floor(fraction, n):  # exact floor(b * N) from the decimal the user typed, independent of the module's slack
    return math.floor(Fraction(str(fraction)) * n)


def test_docstring_examples():
    result = doctest.testmod(metrics, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 5 and result.failed == 0


def test_lazy_exports():
    for name in ("WorstClassAccuracy", "RiskCoverage", "DeferralCurve", "SCODRisk"):
        assert getattr(lightning_methods, name) is getattr(metrics, name)
    assert lightning_methods.metrics is metrics


# -- WorstClassAccuracy --------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.parametrize("as_logits", [True, False])
def test_worst_class_accuracy_matches_sklearn(as_logits):
    g = torch.Generator().manual_seed(1)
    n, c = 300, 6
    target = torch.randint(0, c - 1, (n,), generator=g)  # class 5 never a target
    target[target == 2] = torch.randint(0, 5, ((target == 2).sum(),), generator=g)  # classes of unequal size
    logits = torch.randn(n, c, generator=g) + 1.5 * nn.functional.one_hot(target, c)
    preds = logits if as_logits else logits.argmax(1)
    result = _batched_update(WorstClassAccuracy(num_classes=c, bottom_k=3), preds, target)

    y, p = target.numpy(), logits.argmax(1).numpy()
    present = np.unique(y)
    recall = recall_score(y, p, labels=present, average=None, zero_division=0)
    per_class = result["per_class_acc"]
    assert per_class.shape == (c,) and torch.isnan(per_class[5]) and not torch.isnan(per_class[:5]).any()
    _close(per_class[present], recall)
    _close(result["balanced_acc"], balanced_accuracy_score(y, p))
    _close(result["acc"], (y == p).mean())
    _close(result["worst_class_acc"], recall.min())
    _close(result["bottom_k_acc"], np.sort(recall)[:3].mean())


def test_worst_class_accuracy_hand_cases():
    m = WorstClassAccuracy(num_classes=4, bottom_k=3)
    m.update(torch.tensor([0, 0, 1, 3]), torch.tensor([0, 1, 1, 1]))  # class 0: 1/1, class 1: 1/3, class 3 absent
    r = m.compute()
    _close(r["per_class_acc"], [1.0, 1 / 3, float("nan"), float("nan")], equal_nan=True)
    _close(r["acc"], 0.5)
    _close(r["balanced_acc"], 2 / 3)
    _close(r["worst_class_acc"], 1 / 3)
    _close(r["bottom_k_acc"], 2 / 3)  # only 2 classes present: the mean of both
    with pytest.warns(UserWarning, match="compute.*before.*update"):
        empty = WorstClassAccuracy(num_classes=2).compute()
    assert all(torch.isnan(v).all() for v in empty.values())


# -- RiskCoverage --------------------------------------------------------------------------------------------------
def _numpy_aurc(scores, errors):
    order = np.argsort(scores, kind="stable")
    risk = np.cumsum(errors[order]) / np.arange(1, len(scores) + 1)
    return risk.mean(), risk


def test_risk_coverage_matches_numpy():
    g = torch.Generator().manual_seed(2)
    n = 257
    logits = torch.randn(n, 4, generator=g)
    target = torch.randint(0, 4, (n,), generator=g)
    scores = 1 - logits.softmax(1).amax(1)  # 1 - MSP, distinct
    coverages = (0.1, 0.29, 0.5, 0.8, 1.0)
    result = _batched_update(RiskCoverage(coverages=coverages), scores, logits, target)

    errors = (logits.argmax(1) != target).numpy().astype(float)
    aurc, risk = _numpy_aurc(scores.numpy(), errors)
    _close(result["aurc"], aurc)
    _close(result["risk"], risk)
    _close(result["coverage"], np.arange(1, n + 1) / n)
    for c in coverages:
        kept = n - _floor(1 - Fraction(str(c)), n)
        _close(result[f"risk@cov{c}"], risk[kept - 1])
    assert set(scalars(result)) == {"aurc"} | {f"risk@cov{c}" for c in coverages}


def test_risk_coverage_hand_cases():
    m = RiskCoverage(coverages=[0.5])
    # distinct scores: the wrong one is the least confident -> risks 0, 0, 0, 1/4
    m.update(torch.tensor([0.4, 0.1, 0.3, 0.2]), torch.tensor([0, 1, 2, 3]), torch.tensor([1, 1, 2, 3]))
    r = m.compute()
    _close(r["risk"], [0, 0, 0, 0.25])
    _close(r["aurc"], 0.0625)
    _close(r["risk@cov0.5"], 0.0)
    # two tied scores, one wrong: either order is equally likely, risk_1 = 1/2, risk_2 = 1/2
    m = RiskCoverage(coverages=[0.5])
    m.update(torch.tensor([0.3, 0.3]), torch.tensor([0, 1]), torch.tensor([0, 0]))
    r = m.compute()
    _close(r["risk"], [0.5, 0.5])
    _close(r["aurc"], 0.5)


# -- DeferralCurve -------------------------------------------------------------------------------------------------
def _brute_force_deferral(scores, first, second, j):
    deferred = np.argsort(-scores, kind="stable")[:j]
    right = first.copy()
    right[deferred] = second[deferred]
    return right.mean()


def test_deferral_curve_matches_brute_force():
    g = torch.Generator().manual_seed(3)
    n = 100
    scores = torch.rand(n, generator=g)
    first = torch.rand(n, generator=g) > scores  # the first model is worse where the score is high
    second = torch.rand(n, generator=g) < 0.85
    budgets = (0.0, 0.1, 0.29, 0.5, 1.0)
    result = _batched_update(DeferralCurve(budgets=budgets), scores, first, second)

    s, f, sec = scores.numpy(), first.numpy().astype(float), second.numpy().astype(float)
    curve = np.array([_brute_force_deferral(s, f, sec, j) for j in range(n + 1)])
    rate = np.arange(n + 1) / n
    _close(result["accuracy"], curve)
    _close(result["deferral_rate"], rate)
    _close(result["audc"], np.sum((curve[1:] + curve[:-1]) / 2 * np.diff(rate)))
    for b in budgets:
        _close(result[f"acc@defer{b}"], curve[_floor(b, n)])
    _close(result["acc@defer0.0"], f.mean())
    _close(result["acc@defer1.0"], sec.mean())


def test_deferral_curve_hand_case_with_ties():
    m = DeferralCurve(budgets=[0.25, 0.5])
    # rows 0 and 1 tie at the top; deferring fixes row 0 and breaks row 1; rows 2, 3 stay with model 1
    m.update(torch.tensor([0.9, 0.9, 0.1, 0.0]), torch.tensor([0, 1, 1, 0]), torch.tensor([1, 0, 0, 0]))
    r = m.compute()
    # j = 0: 2/4; j = 1: either tied row, 2/4 on average; j = 2: both swapped, 2/4; j = 3, 4: row 2 broken, 1/4
    _close(r["accuracy"], [0.5, 0.5, 0.5, 0.25, 0.25])
    _close(r["acc@defer0.25"], 0.5)
    _close(r["audc"], 0.25 * (0.5 + 0.5 + 0.375 + 0.25))


# -- SCODRisk ------------------------------------------------------------------------------------------------------
def _brute_force_scod(scores, wrong, ood, c_fn, j, normalize="accepted"):
    accepted = np.argsort(-scores, kind="stable")[j:]
    acc_err = sum(1 for i in accepted if not ood[i] and wrong[i])
    acc_ood = sum(1 for i in accepted if ood[i])
    if normalize == "accepted":
        return ((1 - c_fn) * acc_err + c_fn * acc_ood) / len(accepted)
    return (1 - c_fn) * acc_err / (~ood).sum() + c_fn * acc_ood / ood.sum()


@pytest.mark.parametrize("normalize", ["accepted", "population"])
def test_scod_risk_matches_brute_force_and_sklearn(normalize):
    g = torch.Generator().manual_seed(4)
    n = 200
    is_ood = torch.rand(n, generator=g) < 0.3
    logits = torch.randn(n, 3, generator=g)
    target = torch.randint(0, 3, (n,), generator=g)
    target[is_ood] = -1  # OOD rows have no label
    # large raw scores, where a sigmoid would saturate: the ranking of the raw scores must be used
    scores = 40 + 10 * torch.randn(n, generator=g) + 8 * is_ood
    budgets, grid = (0.0, 0.1, 0.29), (0.0, 0.2, 0.4, 0.6)
    metric = SCODRisk(c_fn=0.3, budgets=budgets, grid=grid, normalize=normalize)
    result = _batched_update(metric, scores, logits, target, is_ood)

    s, ood = scores.numpy(), is_ood.numpy()
    wrong = (logits.argmax(1) != target).numpy()
    curve = np.array([_brute_force_scod(s, wrong, ood, 0.3, j, normalize) for j in range(n)])
    _close(result["risk"], curve)
    _close(result["rejection_rate"], np.arange(n) / n)
    for b in budgets:
        _close(result[f"risk@rej{b}"], curve[_floor(b, n)])
    _close(result["auc_rc"], np.mean([curve[_floor(b, n)] for b in grid]))
    fpr, tpr, _ = roc_curve(ood, s, drop_intermediate=False)
    _close(result["fpr@95tpr"], fpr[np.argmax(tpr >= 0.95)])
    _close(result["auroc"], roc_auc_score(ood, s))


def test_scod_risk_hand_cases():
    # 2 OOD (scores 0.9, 0.4), 1 wrong inlier (0.6), 1 right inlier (0.1); c_fn = 0.25
    scores, preds = torch.tensor([0.9, 0.6, 0.4, 0.1]), torch.tensor([0, 1, 0, 2])
    target, is_ood = torch.tensor([5, 0, 5, 2]), torch.tensor([True, False, True, False])
    m = SCODRisk(c_fn=0.25, budgets=[0.25, 0.5], grid=[0.0, 0.5])
    m.update(scores, preds, target, is_ood)
    r = m.compute()
    # accepted [all] -> (0.75 * 1 + 0.25 * 2) / 4; [0.6, 0.4, 0.1] -> (0.75 + 0.25) / 3; [0.4, 0.1] -> 0.25 / 2; [0.1] -> 0
    _close(r["risk"], [1.25 / 4, 1 / 3, 0.125, 0.0])
    _close(r["risk@rej0.5"], 0.125)
    _close(r["auc_rc"], (1.25 / 4 + 0.125) / 2)
    # 95% of the OOD rows need the threshold 0.4, which also flags the inlier at 0.6: FPR 1/2
    _close(r["fpr@95tpr"], 0.5)
    _close(r["auroc"], 0.75)
    m = SCODRisk(c_fn=0.25, budgets=[0.25], grid=[0.0], normalize="population")
    m.update(scores, preds, target, is_ood)
    _close(m.compute()["risk@rej0.25"], 0.75 * 1 / 2 + 0.25 * 1 / 2)  # 1 of 2 inliers accepted wrong, 1 of 2 OOD
    # TPR exactly 95% at a threshold: 19 of 20 OOD rows above every inlier, the 20th below them all -> FPR 0
    ood_scores = torch.cat([torch.arange(10.0, 29.0), torch.tensor([0.0])])
    scores2 = torch.cat([ood_scores, torch.tensor([5.0, 5.0, 6.0, -1.0])])
    is_ood2 = torch.arange(24) < 20
    m = SCODRisk()
    m.update(scores2, torch.zeros(24, dtype=torch.long), torch.zeros(24, dtype=torch.long), is_ood2)
    _close(m.compute()["fpr@95tpr"], 0.0)
    fpr, tpr, _ = roc_curve(is_ood2.numpy(), scores2.numpy(), drop_intermediate=False)
    assert fpr[np.argmax(tpr >= 0.95)] == 0.0
    only_inliers = SCODRisk(budgets=[0.0], grid=[0.0])
    only_inliers.update(scores, preds, target.clamp(max=2), torch.zeros(4, dtype=torch.bool))
    r = only_inliers.compute()
    assert torch.isnan(r["fpr@95tpr"]) and torch.isnan(r["auroc"])
    _close(r["risk@rej0.0"], 0.5 * 3 / 4)  # targets now [2, 0, 2, 2]: rows 0, 1, 2 wrong


# -- ties and row order, all curve metrics -------------------------------------------------------------------------
def _tied_rows(n=6, seed=1):
    rng = np.random.default_rng(seed)
    return (
        rng.integers(0, 3, n).astype(np.float32),  # scores with heavy ties
        rng.random(n) < 0.5,  # wrong / first right
        rng.random(n) < 0.5,  # second right / OOD
    )


def test_ties_average_over_every_order_of_the_tied_rows():
    """Brute force over all 6! row orders (stable sort: every tie-break): the metrics equal the mean over them."""
    scores, a, b = _tied_rows()
    n = len(scores)
    aurc, defer, scod = [], [], []
    for perm in itertools.permutations(range(n)):
        p = list(perm)
        aurc.append(_numpy_aurc(scores[p], a[p].astype(float))[1])
        defer.append([_brute_force_deferral(scores[p], (~a[p]).astype(float), b[p].astype(float), j) for j in range(n + 1)])
        scod.append([_brute_force_scod(scores[p], a[p], b[p], 0.5, j) for j in range(n)])

    s = torch.from_numpy(scores)
    rc = RiskCoverage()
    rc.update(s, torch.from_numpy(a).long(), torch.zeros(n, dtype=torch.long))
    _close(rc.compute()["risk"], np.mean(aurc, axis=0))
    dc = DeferralCurve()
    dc.update(s, torch.from_numpy(~a), torch.from_numpy(b))
    _close(dc.compute()["accuracy"], np.mean(defer, axis=0))
    sc = SCODRisk()
    sc.update(s, torch.from_numpy(a).long(), torch.zeros(n, dtype=torch.long), torch.from_numpy(b))
    _close(sc.compute()["risk"], np.mean(scod, axis=0))


def test_results_do_not_depend_on_row_order_or_batching():
    g = torch.Generator().manual_seed(6)
    n = 150
    scores = (torch.rand(n, generator=g) * 5).round() / 5  # 6 distinct values: many ties
    logits, target = torch.randn(n, 4, generator=g), torch.randint(0, 4, (n,), generator=g)
    flag_a, flag_b = torch.rand(n, generator=g) < 0.5, torch.rand(n, generator=g) < 0.3
    perm = torch.randperm(n, generator=g)

    def run(idx, sizes):
        return [
            _batched_update(RiskCoverage(), scores[idx], logits[idx], target[idx], sizes=sizes),
            _batched_update(DeferralCurve(), scores[idx], flag_a[idx], flag_b[idx], sizes=sizes),
            _batched_update(SCODRisk(), scores[idx], logits[idx], target[idx], flag_b[idx], sizes=sizes),
        ]

    for r1, r2 in zip(run(torch.arange(n), (50, 50)), run(perm, (3, 90, 1))):
        assert r1.keys() == r2.keys()
        for key in r1:
            _close(r1[key], r2[key])


# -- errors, empty, helpers ----------------------------------------------------------------------------------------
def test_input_errors():
    s, p, t = torch.rand(4), torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    flags = torch.tensor([True, False, True, False])
    with pytest.raises(ValueError, match=r"different lengths \(scores: 4, preds: 3, target: 4\)"):
        RiskCoverage().update(s, p[:3], t)
    with pytest.raises(ValueError, match=r"`scores` holds 1 non-finite value"):
        RiskCoverage().update(torch.tensor([0.1, float("nan"), 0.2, 0.3]), p, t)
    with pytest.raises(ValueError, match=r"`scores` holds 1 non-finite value"):
        DeferralCurve().update(torch.tensor([0.1, float("inf"), 0.2, 0.3]), flags, flags)
    with pytest.raises(TypeError, match=r"`scores` must be a floating-point tensor.*`scores.float\(\)`"):
        SCODRisk().update(torch.tensor([1, 2, 3, 4]), p, t, flags)
    with pytest.raises(ValueError, match=r"`scores` must have shape \(N,\).*squeeze\(1\)"):
        RiskCoverage().update(s.unsqueeze(1), p, t)
    with pytest.raises(TypeError, match=r"`correct_first` must be a bool tensor.*\.bool\(\)"):
        DeferralCurve().update(s, flags.float(), flags)
    with pytest.raises(ValueError, match=r"`correct_second` must hold only 0/1"):
        DeferralCurve().update(s, flags, torch.tensor([0, 1, 2, 1]))
    with pytest.raises(TypeError, match=r"`is_ood` must be a bool tensor"):
        SCODRisk().update(s, p, t, flags.double())
    with pytest.raises(TypeError, match=r"`target` must be an integer tensor.*\.long\(\)"):
        WorstClassAccuracy(3).update(p, t.float())
    with pytest.raises(TypeError, match=r"1-D `preds` must be integer class indices"):
        RiskCoverage().update(s, torch.rand(4), t)
    with pytest.raises(TypeError, match=r"`preds` must be a torch.Tensor, got list"):
        RiskCoverage().update(s, [0, 1, 2, 0], t)
    with pytest.raises(ValueError, match=r"`preds` has 3 columns but `num_classes=4`"):
        WorstClassAccuracy(4).update(p, t)
    with pytest.raises(ValueError, match=r"`target` holds class indices outside \[0, num_classes=2\)"):
        WorstClassAccuracy(2).update(torch.tensor([0, 1, 1, 0]), t)
    with pytest.raises(ValueError, match=r"`bottom_k` must be an int in \[1, num_classes=3\]"):
        WorstClassAccuracy(3, bottom_k=4)
    with pytest.raises(ValueError, match=r"`coverages` must lie in \(0.0, 1.0\]"):
        RiskCoverage(coverages=[0.0, 0.5])
    with pytest.raises(ValueError, match=r"`budgets` must lie in \[0.0, 1.0\), got 1.0"):
        SCODRisk(budgets=[0.1, 1.0])
    with pytest.raises(TypeError, match=r"`budgets` must be a sequence of numbers"):
        DeferralCurve(budgets=0.1)
    with pytest.raises(ValueError, match=r"`c_fn` must be a number in \[0, 1\]"):
        SCODRisk(c_fn=1.5)
    with pytest.raises(ValueError, match=r"`normalize` must be 'accepted' or 'population'"):
        SCODRisk(normalize="inliers")


def test_empty_metrics_give_nan_scalars_and_empty_curves():
    for metric, curve in ((RiskCoverage(), "risk"), (DeferralCurve(), "accuracy"), (SCODRisk(), "risk")):
        with pytest.warns(UserWarning, match="compute.*before.*update"):
            result = metric.compute()
        assert all(torch.isnan(v) for v in scalars(result).values()) and result[curve].shape == (0,)


def test_scalars_and_plot_curve(tmp_path):
    m = RiskCoverage(coverages=[0.5])
    m.update(torch.rand(20), torch.randint(0, 2, (20,)), torch.randint(0, 2, (20,)))
    result = m.compute()
    assert set(scalars(result)) == {"aurc", "risk@cov0.5"}
    assert all(v.dtype == torch.float32 for v in result.values())
    path = plot_curve(result["coverage"], result["risk"], tmp_path / "sub" / "rc.png", xlabel="coverage",
                      ylabel="risk", label="MSP", others={"oracle": ([0, 1], [0, 0.5])})
    assert path.exists() and path.read_bytes()[:4] == b"\x89PNG"


# -- DDP -----------------------------------------------------------------------------------------------------------
class _MetricsModule(pl.LightningModule):
    """Updates all four metrics in validation_step and saves every rank's compute() results."""

    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.layer = nn.Linear(1, 1)  # DDP refuses a module without parameters
        self.out_dir = out_dir
        self.wca = WorstClassAccuracy(num_classes=5, bottom_k=2)
        self.rc = RiskCoverage()
        self.dc = DeferralCurve()
        self.scod = SCODRisk()

    def validation_step(self, batch, batch_idx):
        scores, logits, target, is_ood, first, second = batch
        self.wca.update(logits, target)
        self.rc.update(scores, logits, target)
        self.dc.update(scores, first, second)
        self.scod.update(scores, logits, target, is_ood)

    def on_validation_epoch_end(self):
        local_rows = len(dim_zero_cat(self.rc.scores))  # before compute(), which gathers (and then restores) states
        results = {name: getattr(self, name).compute() for name in ("wca", "rc", "dc", "scod")}
        self.log_dict({f"{n}/{k}": v for n, r in results.items() for k, v in scalars(r).items()}, sync_dist=True)
        saved = {n: {k: v.cpu() for k, v in r.items()} for n, r in results.items()}
        torch.save({**saved, "local_rows": local_rows}, Path(self.out_dir) / f"rank{self.global_rank}.pt")


def _ddp_data(n=62):
    g = torch.Generator().manual_seed(7)
    target = torch.randint(0, 4, (n,), generator=g)  # class 4 never a target: NaN in per_class_acc
    logits = torch.randn(n, 5, generator=g) + nn.functional.one_hot(target, 5)
    scores = (torch.rand(n, generator=g) * 8).round() / 8  # ties, spread over both ranks
    is_ood = torch.rand(n, generator=g) < 0.3
    first, second = torch.rand(n, generator=g) < 0.6, torch.rand(n, generator=g) < 0.8
    return TensorDataset(scores, logits, target, is_ood, first, second)


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process(tmp_path):
    """2 ranks each see every other row (62 rows: no sampler padding); the gathered metrics equal 1 process."""
    data = _ddp_data()
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    cpu_trainer().validate(_MetricsModule(str(one)), DataLoader(data, batch_size=8), verbose=False)
    ddp_trainer().validate(_MetricsModule(str(two)), DataLoader(data, batch_size=8), verbose=False)

    single = torch.load(one / "rank0.pt", weights_only=True)
    assert single.pop("local_rows") == 62
    assert torch.isnan(single["wca"]["per_class_acc"][4]) and single["rc"]["risk"].shape == (62,)
    for rank in (0, 1):
        ranked = torch.load(two / f"rank{rank}.pt", weights_only=True)
        assert ranked.pop("local_rows") == 31  # each rank really saw half the rows
        for name, result in single.items():
            assert ranked[name].keys() == result.keys()
            for key, value in result.items():
                torch.testing.assert_close(ranked[name][key], value, equal_nan=True, msg=f"rank {rank} {name} {key}")
