"""k-point mixup and CutMix as functions on tensors: the math that :class:`callbacks.MixupCallback` and
:class:`lightning_methods.MixupConsistencyModule` (ICT) share.

Papers:
    Chaudhry, Menon, Veit, Jayasumana, Ramalingam, Kumar, *When does mixup promote local linearity in learned
    representations?* (arXiv 2210.16413), Sec. 3: k-point mixup.
    Zhang, Cisse, Dauphin, Lopez-Paz, *mixup: Beyond Empirical Risk Minimization* (arXiv 1710.09412), Eq. 1.
    Yun, Han, Oh, Chun, Choe, Yoo, *CutMix: Regularization Strategy to Train Strong Classifiers with Localizable
    Features* (arXiv 1905.04899), Sec. 3.1.
    Szegedy, Vanhoucke, Ioffe, Shlens, Wojna, *Rethinking the Inception Architecture for Computer Vision*
    (arXiv 1512.00567), Sec. 7: label smoothing.

**k-point mixup** (Chaudhry et al., Sec. 3) draws weights ``lam ~ Dirichlet(alpha * 1_k)`` (for ``k = 2`` this is
Zhang et al.'s ``lam ~ Beta(alpha, alpha)``), pairs every example with ``k - 1`` partners taken from random
permutations of the batch, and trains on

    x_mix_i = sum_m lam_im x_{pi_m(i)},        y_mix_i = sum_m lam_im onehot(y_{pi_m(i)}),

with ``pi_0`` the identity (:func:`sample_mixing`, :class:`MixingSampler`, :func:`mix`, :func:`mix_targets`).

**CutMix** (Yun et al., Sec. 3.1, Eq. 1) pastes a box of the partner into the image instead of blending:
``x_mix = M * x_A + (1 - M) * x_B`` with a binary mask ``M`` that is 0 inside a box and 1 elsewhere. ``lam ~
Beta(alpha, alpha)``; the box has sides ``H sqrt(1 - lam)`` and ``W sqrt(1 - lam)`` (truncated to integers) and a
centre drawn uniformly over the pixels, and is clipped at the image border; the targets use the *real* share of
each image, ``lam_c = 1 - area(box) / (H W)``, not the drawn ``lam`` (the paper's code and timm's
``correct_lam=True``). :func:`cutmix_box` builds the box exactly as timm's ``rand_bbox`` does from the same ``lam`` and
centre, so the two agree box for box. CutMix is defined here for **two points only**: a box's area fixes one
weight, and there is no canonical way to cut ``k > 2`` regions whose real areas follow ``Dirichlet(alpha 1_k)``
(boxes pasted one after the other overlap, so the visible areas, which the labels must use, depend on the pasting
order and are no longer Dirichlet; a fixed split such as YOLOv4's Mosaic quadrants is a different augmentation).

**timm's switches** (:func:`switch_mixing`, as ``timm.data.Mixup`` does them): with probability ``switch_prob`` an
example (``per_sample``) or a batch is cut (CutMix) instead of blended (mixup), and with probability ``1 - prob`` it
is left unmixed (weights ``(1, 0, ...)``); **label smoothing** (:func:`smooth_targets`) turns any target
distribution ``q`` into ``(1 - eps) q + eps / C`` (Szegedy et al., Sec. 7), which for mixed one-hot targets is what
timm's ``mixup_target`` gives (it smooths each one-hot vector, then mixes: the same, by linearity).

:func:`mixup` does all of it for one ``(inputs, targets)`` batch.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any

import numpy as np
import torch

__all__ = [
    "sample_mixing",
    "MixingSampler",
    "mix",
    "mix_targets",
    "cutmix_box",
    "box_lam",
    "sample_cutmix",
    "switch_mixing",
    "mix_inputs",
    "smooth_targets",
    "soft_targets",
    "check_mixing_args",
    "mixup",
]


# -- k-point mixup --------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _cyclic_table(n: int, k: int) -> np.ndarray:
    return (np.arange(n)[:, None] + np.arange(k)[None, :]) % n


def _partners(n: int, k: int, rng: np.random.Generator, distinct: bool, batches: int = 1) -> np.ndarray:
    """Indices ``(batches, n, k)``: column 0 the identity, columns 1.. random permutations (see sample_mixing)."""
    rows = np.arange(batches)[:, None]
    if distinct:
        # walk one random cyclic order of the batch: example order[j] is mixed with order[j+1], ..., order[j+k-1]
        orders = rng.permuted(np.tile(np.arange(n), (batches, 1)), axis=1)
        index = np.empty((batches, n, k), dtype=np.int64)
        index[rows, orders] = orders[:, _cyclic_table(n, k)]
        return index
    index = np.empty((batches, n, k), dtype=np.int64)
    index[:, :, 0] = np.arange(n)
    for m in range(1, k):
        index[:, :, m] = rng.permuted(np.tile(np.arange(n), (batches, 1)), axis=1)
    return index


def sample_mixing(
    batch_size: int,
    num_points: int,
    alpha: float,
    rng: np.random.Generator,
    per_sample: bool = True,
    distinct_partners: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw k-point mixup weights and partners for a batch (Chaudhry et al. 2022, Sec. 3).

    Args:
        batch_size: number of examples ``N`` in the batch.
        num_points: ``k``, the number of examples mixed into each output (2 is classic mixup).
        alpha: Dirichlet concentration; ``lam ~ Dirichlet(alpha * 1_k)``.
        rng: the numpy generator every draw comes from (seeded by the caller, so runs are reproducible).
        per_sample: one weight vector per example (``(N, k)``) or one for the whole batch (``(1, k)``).
        distinct_partners: take the ``k - 1`` partners as the next ``k - 1`` examples of one random cyclic order of
            the batch, so no example is paired with itself or twice with the same partner (whenever ``N >= k``);
            each partner column is still a uniformly random permutation. ``False`` draws ``k - 1`` independent
            permutations as Zhang et al. and ICT do, where an example is its own partner with probability ``1/N``
            and that part of the mix is wasted, which matters for small batches.

    Returns:
        ``(lam, index)``: weights of shape ``(N, k)`` or ``(1, k)`` (rows sum to one) and int64 indices ``(N, k)``
        with ``index[:, 0] = arange(N)``; output ``i`` mixes examples ``index[i, 0], ..., index[i, k-1]``.
    """
    n, k = int(batch_size), int(num_points)
    lam = rng.dirichlet(np.full(k, float(alpha)), size=n if per_sample else 1)
    return lam, _partners(n, k, rng, distinct_partners)[0]


class MixingSampler:
    """:func:`sample_mixing` for a stream of batches, as torch tensors, cheaply.

    Weights and partner indices are drawn in pools (a few numpy calls per pool instead of per batch) and kept as
    tensors, so a batch costs two slices. When the number of batches to come is known (``num_batches``, e.g. the
    epoch's), the first pools cover exactly those batches (up to ``pool_size`` examples): one draw per epoch, and
    none wasted. Otherwise pools start small and double up to ``pool_size`` examples, so a short stream does not pay
    for draws it never uses. Running statistics of the weights handed out are kept on the side.

    Args:
        num_points: ``k``.
        alpha: Dirichlet concentration.
        rng: the generator (its draws, hence the whole stream, are reproducible).
        per_sample: one weight vector per example or per batch.
        distinct_partners: see :func:`sample_mixing`.
        pool_size: the largest pool, in examples.
        num_batches: how many batches the stream will serve, if known (sizes the pools; the draws stay a function
            of the generator and of this number).
    """

    def __init__(
        self,
        num_points: int,
        alpha: float,
        rng: np.random.Generator,
        per_sample: bool = True,
        distinct_partners: bool = True,
        pool_size: int = 4096,
        num_batches: int | None = None,
    ) -> None:
        self.k, self.alpha, self.rng = num_points, float(alpha), rng
        self._next_rows = 128  # size of the next weight pool when num_batches is unknown (doubles up to pool_size)
        self.num_batches = num_batches
        self._served = 0  # batches served so far
        self.per_sample, self.distinct_partners, self.pool_size = per_sample, distinct_partners, pool_size
        self._pool_np = np.empty((0, num_points))
        self._pool = torch.empty(0, num_points)
        self._pos = self._pool_len = 0  # plain ints: len() of a tensor costs microseconds on the hot path
        self._partner_pools: dict[int, list] = {}  # batch size -> [M index views (n, k), next batch, next M, M]
        self._batch_sizes: list[int] = []  # per-batch mode: the size each row of the pool was used for
        self._done = np.zeros(2)  # (sum of largest weight, sum of own weight) over pools already used up
        #: number of examples mixed so far
        self.count = 0

    def _consumed(self) -> np.ndarray:
        used = self._pool_np[: self._pos]
        weights = np.asarray(self._batch_sizes[-self._pos :] if self._pos else [], dtype=float)
        if self.per_sample:
            weights = np.ones(self._pos)
        return np.array([weights @ used.max(1), weights @ used[:, 0]]) if self._pos else np.zeros(2)

    @property
    def sum_max(self) -> float:
        """Sum over the examples mixed so far of their largest weight."""
        return float(self._done[0] + self._consumed()[0])

    @property
    def sum_self(self) -> float:
        """Sum over the examples mixed so far of the weight each kept of itself."""
        return float(self._done[1] + self._consumed()[1])

    def _batches_left(self) -> int | None:
        return None if self.num_batches is None else max(1, self.num_batches - self._served)

    def _refill(self, rows: int) -> None:
        self._done += self._consumed()  # statistics are computed once per pool, not per batch
        left = self._batches_left()
        if left is not None:  # the rest of the stream, as far as pool_size allows
            size = max(rows, min(left * rows, self.pool_size))
        else:
            size = max(rows, self._next_rows)
            self._next_rows = min(2 * self._next_rows, self.pool_size)
        self._pool_np = self.rng.dirichlet(np.full(self.k, self.alpha), size=size)
        # stored as (k, rows) so that a batch's column lam[:, m] is a contiguous slice
        self._pool = torch.from_numpy(np.ascontiguousarray(self._pool_np.T, dtype=np.float32)).T
        self._pos, self._pool_len = 0, size

    def __call__(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights ``(n, k)`` (or ``(1, k)`` per batch), float32, and partner indices ``(n, k)``, int64, on the CPU."""
        rows = n if self.per_sample else 1
        if self._pos + rows > self._pool_len:
            self._refill(rows)
        lam = self._pool[self._pos : self._pos + rows]
        self._pos += rows
        self.count += n
        if not self.per_sample:
            self._batch_sizes.append(n)
        pool = self._partner_pools.get(n)
        if pool is None or pool[1] == pool[3]:
            most = max(1, self.pool_size // max(n, 1))
            left = self._batches_left()
            batches = min(left, most) if left is not None else (2 if pool is None else pool[2])
            indices = _partners(n, self.k, self.rng, self.distinct_partners, batches)
            # (batches, k, n) storage: a batch's partner column index[:, m] is contiguous; one unbind makes every
            # batch's (n, k) view at once, so a batch costs a tuple lookup rather than two tensor ops
            indices = torch.from_numpy(np.ascontiguousarray(indices.transpose(0, 2, 1))).transpose(1, 2).unbind(0)
            pool = self._partner_pools[n] = [indices, 0, min(2 * batches, most), batches]
        index = pool[0][pool[1]]
        pool[1] += 1
        self._served += 1
        return lam, index


def mix(tensor: torch.Tensor, lam: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``out[i] = sum_m lam[i, m] * tensor[index[i, m]]`` for any tensor whose first dimension is the batch.

    ``lam`` is ``(N, k)`` or ``(1, k)`` on ``tensor``'s device, rows summing to one; ``index`` is ``(N, k)`` with
    ``index[:, 0]`` the identity (as :func:`sample_mixing` returns), so the first term needs no gather. A new tensor
    is returned; the input is left untouched (unlike timm's ``Mixup``, which overwrites the batch).
    """
    # index_select is several times cheaper than advanced indexing for tiny batches, where per-op cost dominates
    shape = (lam.shape[0],) + (1,) * (tensor.ndim - 1)
    if index.shape[1] == 2:  # lam_0 x + lam_1 x_pi = x_pi + lam_0 (x - x_pi): one gather, one fused op
        return torch.lerp(tensor.index_select(0, index[:, 1]), tensor, lam[:, 0].reshape(shape))
    out = tensor * lam[:, 0].reshape(shape)
    for m in range(1, index.shape[1]):
        out.addcmul_(tensor.index_select(0, index[:, m]), lam[:, m].reshape(shape))
    return out


def mix_targets(
    targets: torch.Tensor, lam: torch.Tensor, index: torch.Tensor, num_classes: int | None = None
) -> torch.Tensor:
    """Soft targets ``sum_m lam_m onehot(y_m)`` from class indices ``(N,)`` or mixed soft targets ``(N, C)``."""
    if targets.is_floating_point():
        return mix(targets, lam if lam.dtype == targets.dtype else lam.to(targets.dtype), index)
    if num_classes is None:
        raise ValueError("Integer class-index targets need `num_classes` to become soft mixup targets.")
    n, k = index.shape
    lam = lam if lam.dtype == torch.float32 else lam.float()
    out = torch.zeros(n, num_classes, dtype=torch.float32, device=targets.device)
    # one scatter: each output row receives weight lam[i, m] at class y[index[i, m]]
    return out.scatter_add_(1, targets.take(index), lam.expand(n, k))


def soft_targets(targets: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """Class indices ``(N,)`` as one-hot float ``(N, C)`` targets; soft ``(N, C)`` targets are returned as they are."""
    if targets.is_floating_point():
        return targets
    if num_classes is None:
        raise ValueError("Integer class-index targets need `num_classes` to become soft targets.")
    return torch.zeros(len(targets), num_classes, device=targets.device).scatter_(1, targets.reshape(-1, 1), 1.0)


def smooth_targets(targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """``(1 - eps) q + eps / C`` for soft targets ``q`` ``(N, C)`` (Szegedy et al. 2016, Sec. 7); a new tensor.

    Smoothing a mix of one-hot vectors equals mixing smoothed one-hot vectors (the map is affine and the weights sum
    to one), so this matches timm's ``mixup_target(..., smoothing=eps)``, which smooths first and mixes after.
    """
    if not label_smoothing:
        return targets
    return targets * (1.0 - label_smoothing) + label_smoothing / targets.shape[-1]


# -- CutMix ---------------------------------------------------------------------------------------------------------
def cutmix_box(height: int, width: int, lam: Any, center_y: Any, center_x: Any) -> np.ndarray:
    """CutMix boxes for weights ``lam`` and box centres, exactly as timm's ``rand_bbox`` builds them.

    Sides ``int(H sqrt(1 - lam))`` and ``int(W sqrt(1 - lam))`` around the centre (Yun et al. 2019, Sec. 3.1; the
    odd pixel goes below / right of the centre, as in timm), clipped to the image.

    Args:
        height: image height ``H`` (the second-to-last dimension of the inputs).
        width: image width ``W`` (the last dimension).
        lam: drawn CutMix weight(s) of the kept image, scalar or ``(n,)``; the computation keeps their float type
            (timm's per-element mode passes float32), so the truncation matches timm's.
        center_y: box centre row(s) in ``[0, H)``.
        center_x: box centre column(s) in ``[0, W)``.

    Returns:
        int64 ``(n, 4)`` rows ``(top, bottom, left, right)``: the box is ``[top, bottom) x [left, right)``.
    """
    lam = np.asarray(lam).reshape(-1)
    if lam.dtype.kind != "f":
        lam = lam.astype(np.float64)
    ratio = np.sqrt(1.0 - lam)
    cut_h = (height * ratio).astype(np.int64)
    cut_w = (width * ratio).astype(np.int64)
    cy = np.asarray(center_y, dtype=np.int64).reshape(-1)
    cx = np.asarray(center_x, dtype=np.int64).reshape(-1)
    # column assignment and ufuncs: np.stack / np.clip cost tens of microseconds per call for a one-row batch
    boxes = np.empty((max(len(lam), len(cy), len(cx)), 4), dtype=np.int64)
    boxes[:, 0], boxes[:, 1] = cy - cut_h // 2, cy + (cut_h + 1) // 2
    boxes[:, 2], boxes[:, 3] = cx - cut_w // 2, cx + (cut_w + 1) // 2
    np.maximum(boxes, 0, out=boxes)
    return np.minimum(boxes, (height, height, width, width), out=boxes)


def box_lam(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """The weight the kept image really has after pasting each box: ``1 - area / (H W)`` (timm's ``correct_lam``)."""
    boxes = np.asarray(boxes)
    area = (boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2])
    return 1.0 - area / float(height * width)


def sample_cutmix(rows: int, height: int, width: int, alpha: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``rows`` CutMix boxes: ``lam ~ Beta(alpha, alpha)``, centres uniform over the pixels.

    Returns:
        ``(boxes, lam)``: int64 boxes ``(rows, 4)`` (see :func:`cutmix_box`) and the area-corrected weights of the
        kept image ``(rows,)`` (see :func:`box_lam`).
    """
    lam = rng.beta(alpha, alpha, size=rows)
    centers = rng.integers(0, (height, width), size=(rows, 2))  # (row, column), uniform over the pixels
    boxes = cutmix_box(height, width, lam, centers[:, 0], centers[:, 1])
    return boxes, box_lam(boxes, height, width)


def switch_mixing(
    lam: np.ndarray,
    rng: np.random.Generator,
    image_size: tuple[int, int] | None = None,
    prob: float = 1.0,
    cutmix_alpha: float = 0.0,
    switch_prob: float = 0.5,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """timm's per-example (or per-batch) choices on top of drawn mixup weights: CutMix instead, or no mixing.

    Each row of ``lam`` (one per example, or one for the whole batch) is, independently: cut with a CutMix box with
    probability ``switch_prob`` when ``cutmix_alpha > 0`` (its weights become the box's area-corrected
    ``(lam_c, 1 - lam_c)``); then left unmixed (weights ``(1, 0, ..., 0)``, no box) with probability ``1 - prob``.
    These are ``timm.data.Mixup``'s ``switch_prob`` and ``prob``, in its ``elem`` (per example) or ``batch`` mode.

    Args:
        lam: mixup weights ``(rows, k)`` (rows sum to one); not modified.
        rng: the generator of the switches and boxes.
        image_size: ``(H, W)``, needed when ``cutmix_alpha > 0``.
        prob: probability that a row is mixed at all.
        cutmix_alpha: Beta concentration of CutMix's ``lam``; 0 disables CutMix.
        switch_prob: probability of CutMix instead of mixup for a mixed row (1: CutMix only).

    Returns:
        ``(lam, boxes, cut)``: the weights the targets get ``(rows, k)`` (a new float64 array), the boxes ``(rows, 4)``
        and a bool ``(rows,)`` mask of the rows that are cut (both ``None`` without CutMix). Boxes of rows that are
        not cut are drawn too (so the stream of draws does not depend on the outcomes) and must be ignored.
    """
    lam = np.array(lam, dtype=np.float64)
    rows, k = lam.shape
    boxes = cut = None
    if cutmix_alpha > 0:
        if k != 2:
            raise ValueError(f"CutMix mixes two images; got {k}-point weights. Use num_points=2 with CutMix.")
        if image_size is None:
            raise ValueError("CutMix needs `image_size=(H, W)` to draw boxes.")
        cut = rng.random(rows) < switch_prob
        boxes, lam_cut = sample_cutmix(rows, int(image_size[0]), int(image_size[1]), cutmix_alpha, rng)
        lam[cut, 0], lam[cut, 1] = lam_cut[cut], 1.0 - lam_cut[cut]
    if prob < 1:
        skip = rng.random(rows) >= prob
        lam[skip] = 0.0
        lam[skip, 0] = 1.0
        if cut is not None:
            cut &= ~skip
    return lam, boxes, cut


def mix_inputs(
    tensor: torch.Tensor,
    lam: torch.Tensor,
    index: torch.Tensor,
    boxes: torch.Tensor | None = None,
    cut: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mix a batch by mixup, and cut the rows marked in ``cut`` by CutMix (Yun et al. 2019, Eq. 1); a new tensor.

    Args:
        tensor: inputs ``(N, ..., H, W)``; CutMix boxes cut the last two dimensions, across all the others.
        lam: weights ``(N, k)`` or ``(1, k)`` (rows of cut examples are ignored here; their targets use them).
        index: partners ``(N, k)``, ``index[:, 0]`` the identity; a cut row takes the box from ``index[i, 1]``.
        boxes: int64 ``(N, 4)`` or ``(1, 4)`` boxes ``(top, bottom, left, right)``, on any device.
        cut: bool ``(N,)`` or ``(1,)``, on the CPU: which rows are cut rather than blended.
    """
    if cut is None or not bool(cut.any()):
        return mix(tensor, lam, index)
    if index.shape[1] != 2:
        raise ValueError(f"CutMix mixes two images; got {index.shape[1]}-point partners. Use num_points=2 with CutMix.")
    if cut.shape[0] == 1:  # one box for the whole batch: copy the partners' box region into a copy of the batch
        top, bottom, left, right = (int(v) for v in boxes[0].tolist())
        out = tensor.clone()
        out[..., top:bottom, left:right] = tensor[..., top:bottom, left:right].index_select(0, index[:, 1])
        return out
    partner = tensor.index_select(0, index[:, 1])
    # per example: a per-pixel weight of the example itself (0 in its box if cut, 1 elsewhere; lam_0 everywhere if
    # blended), built as own - [row in box] * [column in box] by broadcasting, then one lerp for the whole batch.
    # All values are exact (1 - 1 = 0, lam_0 - 0 = lam_0), and lerp(a, b, 1) = b, lerp(a, b, 0) = a exactly, so cut
    # pixels are copied unchanged. Several times cheaper than a boolean mask and torch.where (measured on CPU).
    height, width = tensor.shape[-2:]
    device, dtype = tensor.device, tensor.dtype
    boxes = boxes.to(device)
    cut_dev = cut.to(device)
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    in_rows = ((rows >= boxes[:, 0:1]) & (rows < boxes[:, 1:2]) & cut_dev[:, None]).to(dtype)  # 0 for blended rows
    in_cols = ((cols >= boxes[:, 2:3]) & (cols < boxes[:, 3:4])).to(dtype)
    own = lam[:, 0].to(dtype).masked_fill(cut_dev, 1.0)
    weight = own.reshape(-1, 1, 1) - in_rows.unsqueeze(2) * in_cols.unsqueeze(1)  # (addcmul: 2x slower on CPU)
    weight = weight.reshape((tensor.shape[0],) + (1,) * (tensor.ndim - 3) + (height, width))
    return torch.lerp(partner, tensor, weight)


# -- arguments and the functional form -------------------------------------------------------------------------------
def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_mixing_args(
    alpha: float,
    num_points: int,
    cutmix_alpha: float = 0.0,
    switch_prob: float = 0.5,
    prob: float = 1.0,
    label_smoothing: float = 0.0,
) -> None:
    """Raise a ValueError naming the argument and the fix for any argument of :func:`mixup` that cannot work."""
    if not _is_number(alpha) or not alpha > 0:
        raise ValueError(
            f"`alpha` must be a positive number (the mixup Dirichlet/Beta concentration), got {alpha!r}. For CutMix "
            "only, keep alpha and set `cutmix_alpha > 0` with `switch_prob=1.0`."
        )
    if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 2:
        raise ValueError(f"`num_points` must be an integer >= 2 (examples mixed per output), got {num_points!r}.")
    if not _is_number(cutmix_alpha) or not cutmix_alpha >= 0 or not np.isfinite(cutmix_alpha):
        raise ValueError(f"`cutmix_alpha` must be a number >= 0 (0 disables CutMix), got {cutmix_alpha!r}.")
    if cutmix_alpha > 0 and num_points != 2:
        raise ValueError(
            f"CutMix is defined for two images; got `num_points={num_points}` with `cutmix_alpha={cutmix_alpha}`. "
            "k-point CutMix has no canonical form (overlapping boxes make the label weights order-dependent), so "
            "set `num_points=2` for CutMix, or `cutmix_alpha=0` for k-point mixup."
        )
    for name, value in (("switch_prob", switch_prob), ("prob", prob)):
        if not _is_number(value) or not 0.0 <= value <= 1.0:
            raise ValueError(f"`{name}` must be a probability in [0, 1], got {value!r}.")
    if not _is_number(label_smoothing) or not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"`label_smoothing` must be in [0, 1), got {label_smoothing!r}.")


def mixup(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    num_classes: int | None = None,
    alpha: float = 1.0,
    num_points: int = 2,
    per_sample: bool = True,
    distinct_partners: bool = True,
    rng: np.random.Generator | None = None,
    *,
    cutmix_alpha: float = 0.0,
    switch_prob: float = 0.5,
    prob: float = 1.0,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mix one batch: returns ``(mixed_inputs, soft_targets, lam)`` as new tensors (``lam`` is ``(N, k)``).

    The functional form of :class:`callbacks.MixupCallback`, for code that cannot use the callback (a tuple batch, a
    loss computed on a sub-batch). ``rng`` defaults to a generator seeded from torch's global generator. ``lam`` are
    the weights the targets got (for a cut example, the real share of its own image; ``(1, 0, ...)`` for an example
    left unmixed). See :func:`check_mixing_args` for the arguments; ``cutmix_alpha``, ``switch_prob``, ``prob`` and
    ``label_smoothing`` behave as in ``timm.data.Mixup`` (per example when ``per_sample``, else per batch).

    Example::

        >>> x, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 1, 0])
        >>> x_mix, y_mix, lam = mixup(x, y, num_classes=3, num_points=3, rng=np.random.default_rng(0))
        >>> x_mix.shape, y_mix.shape, bool(torch.allclose(y_mix.sum(1), torch.ones(5)))
        (torch.Size([5, 3]), torch.Size([5, 3]), True)
        >>> images = torch.rand(4, 3, 8, 8)
        >>> _, y_cut, lam = mixup(images, y[:4], num_classes=3, cutmix_alpha=1.0, switch_prob=1.0,
        ...                       label_smoothing=0.1, rng=np.random.default_rng(0))
        >>> bool(torch.allclose(y_cut.sum(1), torch.ones(4))), bool((y_cut >= 0.1 / 3 - 1e-7).all())
        (True, True)
    """
    check_mixing_args(alpha, num_points, cutmix_alpha, switch_prob, prob, label_smoothing)
    if cutmix_alpha > 0 and inputs.ndim < 3:
        raise ValueError(
            f"CutMix cuts boxes out of the last two dimensions (H, W); inputs have shape {tuple(inputs.shape)}. "
            "Pass image batches (N, C, H, W), or set `cutmix_alpha=0`."
        )
    if rng is None:
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))
    lam_np, index_np = sample_mixing(len(inputs), num_points, alpha, rng, per_sample, distinct_partners)
    lam_np, boxes, cut = switch_mixing(lam_np, rng, tuple(inputs.shape[-2:]), prob, cutmix_alpha, switch_prob)
    dtype = inputs.dtype if inputs.is_floating_point() else torch.float32
    lam = torch.from_numpy(lam_np).to(device=inputs.device, dtype=dtype)
    index = torch.from_numpy(index_np).to(inputs.device)
    boxes_t = None if boxes is None else torch.from_numpy(boxes)
    cut_t = None if cut is None else torch.from_numpy(cut)
    soft = smooth_targets(mix_targets(targets, lam, index, num_classes), label_smoothing)
    return mix_inputs(inputs, lam, index, boxes_t, cut_t), soft, lam.expand(len(inputs), num_points)


def _finite_batches(trainer: Any) -> int | None:
    """Training batches in this epoch, or None when unknown (an iterable dataset without a length)."""
    batches = trainer.num_training_batches
    return int(batches) if isinstance(batches, (int, float)) and 0 < batches < float("inf") else None
