"""The CutMix / prob / label-smoothing math of lightning_methods.mixup against timm's ``Mixup`` (the reference users know).

timm draws from numpy's global generator inside its functions; these tests replace those draws (``np.random.rand``,
``beta``, ``randint``) by fixed values, hand the same values to our functions through a stub generator, and compare
boxes, weights, mixed inputs and targets. The math of k-point mixup itself is tested in tests/callbacks/test_mixup.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from timm.data import mixup as timm_mixup

from lightning_methods.mixup import (
    box_lam,
    check_mixing_args,
    cutmix_box,
    mix_inputs,
    mix_targets,
    mixup,
    sample_cutmix,
    smooth_targets,
    switch_mixing,
)


class _Queue:
    """A stand-in for numpy's random functions: each call returns the next prepared value."""

    def __init__(self, values):
        self.values = list(values)

    def __call__(self, *args, **kwargs):
        return self.values.pop(0)


class _StubRng:
    """The three Generator methods switch_mixing uses, each returning prepared values in order."""

    def __init__(self, random=(), beta=(), integers=()):
        self.random, self.beta, self.integers = _Queue(random), _Queue(beta), _Queue(integers)


# -- boxes ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("height, width", [(8, 8), (7, 13), (28, 28), (5, 3)])
def test_cutmix_box_is_timm_rand_bbox_with_corrected_lam(height, width, monkeypatch):
    rng = np.random.default_rng(0)
    lams = [0.0, 0.03, 0.3, 0.5, 0.77, 0.999, 1.0] + list(rng.random(20))
    for dtype in (np.float64, np.float32):  # timm's batch mode passes a float, its element mode a float32
        for lam in lams:
            lam = dtype(lam)
            for cy, cx in [(0, 0), (height - 1, width - 1), (height // 2, 0), tuple(rng.integers(0, (height, width)))]:
                calls = []

                def randint(low, high, size=None, _values=[cy, cx]):  # noqa: B006  (consumed per box)
                    calls.append((low, high))
                    return _values[len(calls) - 1]

                monkeypatch.setattr(np.random, "randint", randint)
                (yl, yh, xl, xh), lam_timm = timm_mixup.cutmix_bbox_and_lam((3, height, width), lam, correct_lam=True)
                assert calls == [(0, height), (0, width)]  # timm draws the centre uniformly over the pixels
                ours = cutmix_box(height, width, lam, cy, cx)
                assert ours.tolist() == [[yl, yh, xl, xh]], (lam, cy, cx)
                assert box_lam(ours, height, width)[0] == pytest.approx(lam_timm, abs=1e-12)


def test_box_lam_is_the_real_share_of_the_kept_image():
    # an 8x8 image, lam = 0.75: sides int(8 * 0.5) = 4; centred at (1, 6) the 4x4 box is clipped to rows [0, 3), cols [4, 8)
    box = cutmix_box(8, 8, 0.75, 1, 6)
    assert box.tolist() == [[0, 3, 4, 8]]
    assert box_lam(box, 8, 8)[0] == pytest.approx(1 - 12 / 64)  # not the drawn 0.75


# -- whole batches against timm.data.Mixup -------------------------------------------------------------------------------
def _timm(monkeypatch, x, y, mode, rand, beta, randint, **kwargs):
    monkeypatch.setattr(np.random, "rand", _Queue(rand))
    monkeypatch.setattr(np.random, "beta", _Queue(beta))
    monkeypatch.setattr(np.random, "randint", _Queue(randint))
    fn = timm_mixup.Mixup(mode=mode, **kwargs)
    return fn(x.clone(), y.clone())


def test_per_example_cutmix_mixup_prob_and_smoothing_equal_timm_elem_mode(monkeypatch):
    n, num_classes, height, width = 8, 5, 7, 9
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 3, height, width, generator=g), torch.randint(0, num_classes, (n,), generator=g)
    rng = np.random.default_rng(1)
    u_switch, u_prob = rng.random(n), rng.random(n)
    beta_cut = rng.random(n).astype(np.float32).astype(np.float64)  # values timm keeps exactly in float32
    beta_mix = rng.random(n).astype(np.float32).astype(np.float64)
    cy, cx = rng.integers(0, height, n), rng.integers(0, width, n)
    switch_prob, prob, smoothing = 0.5, 0.75, 0.1
    cut_rows = (u_switch < switch_prob) & (u_prob < prob)
    assert cut_rows.any() and (~cut_rows & (u_prob < prob)).any() and (u_prob >= prob).any()  # all three kinds

    centres = [v for i in np.flatnonzero(cut_rows) for v in (cy[i], cx[i])]  # timm draws a centre per cut element
    x_timm, y_timm = _timm(
        monkeypatch, x, y, "elem", [u_switch, u_prob], [beta_cut, beta_mix], centres,
        mixup_alpha=1.0, cutmix_alpha=1.0, prob=prob, switch_prob=switch_prob, label_smoothing=smoothing,
        num_classes=num_classes,
    )

    # ours: the same uniforms and Beta draws through switch_mixing, timm's partner flip(0) as the index
    lam_mix = np.stack([beta_mix, 1 - beta_mix], 1).astype(np.float32)
    stub = _StubRng(random=[u_switch, u_prob], beta=[beta_cut.astype(np.float32)], integers=[np.stack([cy, cx], 1)])
    lam, boxes, cut = switch_mixing(lam_mix, stub, (height, width), prob, 1.0, switch_prob)
    assert cut.tolist() == cut_rows.tolist()
    index = torch.stack([torch.arange(n), torch.arange(n).flip(0)], 1)
    lam_t = torch.from_numpy(lam).float()
    x_ours = mix_inputs(x, lam_t, index, torch.from_numpy(boxes), torch.from_numpy(cut))
    y_ours = smooth_targets(mix_targets(y, lam_t, index, num_classes), smoothing)
    torch.testing.assert_close(x_ours, x_timm)
    torch.testing.assert_close(y_ours, y_timm)
    # cut pixels are copied, not interpolated
    i = int(np.flatnonzero(cut_rows)[0])
    top, bottom, left, right = boxes[i]
    assert torch.equal(x_ours[i, :, top:bottom, left:right], x[n - 1 - i, :, top:bottom, left:right])


@pytest.mark.parametrize("case", ["cut", "blend", "skip"])
def test_per_batch_equal_timm_batch_mode(case, monkeypatch):
    n, num_classes, height, width = 6, 4, 10, 6
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(n, 2, height, width, generator=g), torch.randint(0, num_classes, (n,), generator=g)
    u_prob = {"skip": 0.9}.get(case, 0.1)
    u_switch = 0.2 if case == "cut" else 0.8
    lam_raw, cy, cx = 0.4123, 8, 1  # a box clipped at the bottom-left corner
    x_timm, y_timm = _timm(
        monkeypatch, x, y, "batch", [u_prob, u_switch], [lam_raw], [cy, cx],
        mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.6, switch_prob=0.5, label_smoothing=0.1, num_classes=num_classes,
    )
    stub = _StubRng(random=[np.array([u_switch]), np.array([u_prob])], beta=[np.array([lam_raw])], integers=[np.array([[cy, cx]])])
    lam, boxes, cut = switch_mixing(np.array([[lam_raw, 1 - lam_raw]]), stub, (height, width), 0.6, 1.0, 0.5)
    assert bool(cut[0]) == (case == "cut")
    index = torch.stack([torch.arange(n), torch.arange(n).flip(0)], 1)
    lam_t = torch.from_numpy(lam).float()
    x_ours = mix_inputs(x, lam_t, index, torch.from_numpy(boxes), torch.from_numpy(cut))
    torch.testing.assert_close(x_ours, x_timm)
    torch.testing.assert_close(smooth_targets(mix_targets(y, lam_t, index, num_classes), 0.1), y_timm)
    if case == "skip":
        torch.testing.assert_close(x_ours, x)


def test_label_smoothing_equals_timm_mixup_target():
    y, num_classes = torch.tensor([0, 3, 1, 1]), 4
    for lam in (1.0, 0.3):
        index = torch.stack([torch.arange(4), torch.arange(4).flip(0)], 1)
        ours = smooth_targets(mix_targets(y, torch.tensor([[lam, 1 - lam]]), index, num_classes), 0.2)
        torch.testing.assert_close(ours, timm_mixup.mixup_target(y, num_classes, lam, 0.2))
    soft = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    torch.testing.assert_close(smooth_targets(soft, 0.2), torch.tensor([[0.45, 0.45, 0.05, 0.05]]))


# -- distributions: our draws against timm's own sampling ------------------------------------------------------------------
def test_corrected_cutmix_weights_follow_timms_distribution():
    """Our sample_cutmix and timm's cutmix_bbox_and_lam (its own numpy draws) give the same law of the corrected lam on
    8x8 images, where truncation and clipping move it far from the drawn Beta(1, 1); the test rejects the drawn lam."""
    draws = 3000
    ours = sample_cutmix(draws, 8, 8, 1.0, np.random.default_rng(0))[1]
    np.random.seed(0)
    timm = np.array([timm_mixup.cutmix_bbox_and_lam((8, 8), np.random.beta(1.0, 1.0))[1] for _ in range(draws)])
    assert stats.ks_2samp(ours, timm).pvalue > 0.01
    assert stats.ks_2samp(np.random.default_rng(1).beta(1.0, 1.0, draws), timm).pvalue < 1e-6  # the check can fail


def test_switch_and_prob_frequencies():
    rows = 20000
    lam = np.tile([[0.6, 0.4]], (rows, 1))
    lam_out, _, cut = switch_mixing(lam, np.random.default_rng(0), (8, 8), prob=0.8, cutmix_alpha=1.0, switch_prob=0.25)
    skipped = lam_out[:, 0] == 1.0
    assert abs(cut.mean() - 0.8 * 0.25) < 0.01  # cut: mixed (0.8) and switched (0.25)
    assert abs(skipped.mean() - 0.2) < 0.012  # unmixed (a cut with an empty box also keeps weight 1: rare)
    assert not (cut & skipped & (lam_out[:, 1] > 0)).any()
    np.testing.assert_allclose(lam_out.sum(1), 1.0)


def test_functional_mixup_with_cutmix_and_smoothing():
    x, y = torch.rand(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    x_mix, y_mix, lam = mixup(x, y, num_classes=3, cutmix_alpha=1.0, switch_prob=1.0, label_smoothing=0.3,
                              rng=np.random.default_rng(0))
    torch.testing.assert_close(y_mix.sum(1), torch.ones(6))
    assert float(y_mix.min()) >= 0.1 - 1e-6
    # every pixel comes from one of the two images, and the share of own pixels is lam[:, 0]
    for i in range(6):
        own = (x_mix[i] == x[i]).float().mean()
        assert float(own) == pytest.approx(float(lam[i, 0]), abs=1e-6)
    with pytest.raises(ValueError, match=r"cutmix_alpha=0"):
        mixup(torch.rand(4, 8), y[:4], num_classes=3, cutmix_alpha=1.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(alpha=0.0), r"alpha.*switch_prob=1.0"),
        (dict(cutmix_alpha=-1.0), r"cutmix_alpha"),
        (dict(cutmix_alpha=1.0, num_points=3), r"num_points=2"),
        (dict(switch_prob=1.5), r"switch_prob"),
        (dict(prob=-0.1), r"`prob`"),
        (dict(label_smoothing=1.0), r"label_smoothing"),
        (dict(prob=True), r"`prob`"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    args = dict(alpha=1.0, num_points=2) | kwargs
    with pytest.raises(ValueError, match=match):
        check_mixing_args(**args)
