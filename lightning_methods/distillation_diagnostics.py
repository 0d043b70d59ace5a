"""Diagnostics of a distilled student: confidence exaggeration and supervision complexity.

* **Confidence exaggeration** (Nagarajan et al., "On Student-teacher Deviations in Distillation: does it pay to
  disobey?", arXiv 2301.12923, NeurIPS 2023 version): for every input take the teacher's top class ``y*``,
  and regress ``logit(p_s[y*])`` on ``logit(p_t[y*])`` (``logit(p) = log(p / (1 - p))``, ``p`` clipped to
  ``[eps, 1 - eps]``). A slope above 1 means the student *exaggerates* the teacher's confidence: lower where the
  teacher is unsure, higher where it is sure. The ICLR version reports the same through deciles of the teacher's
  confidence (:func:`confidence_deciles`; OpenReview xJz9LTHP0K). Report train and test points separately.
* **Supervision complexity** (Harutyunyan et al., "Supervision Complexity and its Role in Knowledge Distillation",
  arXiv 2301.12245, ICLR 2023; the complexity of the teacher's targets and the adjusted, scale-free form its
  experiments plot): for the student linearised at its current weights, ``f(x) ~ <w, phi(x)>`` with
  ``phi(x) = d f(x) / d theta`` (the empirical NTK features), and targets ``Y (n x k)``::

      SC(Y; K) = sum_j Y_j^T K^-1 Y_j,          adjusted SC = sqrt(SC * tr K) / n

  The adjusted value is the margin-bound term and does not change when the kernel is rescaled. Lower = targets the
  student can fit with a smaller-norm function.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

__all__ = [
    "exaggeration_slope",
    "confidence_deciles",
    "collect_logits",
    "empirical_ntk",
    "supervision_complexity",
    "supervision_complexity_from_kernel",
]


# --------------------------------------------------------------------------------------------------------------------
# Confidence exaggeration
# --------------------------------------------------------------------------------------------------------------------
def _check_probs(student_probs: torch.Tensor, teacher_probs: torch.Tensor) -> None:
    if student_probs.ndim != 2 or student_probs.shape != teacher_probs.shape:
        raise ValueError(
            "`student_probs` and `teacher_probs` must both be (N, C) probability matrices of the same shape, got "
            f"{tuple(student_probs.shape)} and {tuple(teacher_probs.shape)}."
        )
    if len(teacher_probs) < 2:
        raise ValueError("Need at least 2 points to fit a slope.")


def _top_class_logits(student_probs: torch.Tensor, teacher_probs: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    top = teacher_probs.argmax(dim=-1, keepdim=True)
    p_t = teacher_probs.double().gather(1, top).squeeze(1).clamp(eps, 1 - eps)
    p_s = student_probs.double().gather(1, top).squeeze(1).clamp(eps, 1 - eps)
    return torch.logit(p_t), torch.logit(p_s)


def exaggeration_slope(student_probs: torch.Tensor, teacher_probs: torch.Tensor, eps: float = 1e-4) -> dict[str, float]:
    """Least-squares fit of ``logit(p_s[y*]) = slope * logit(p_t[y*]) + intercept`` over points (NeurIPS version).

    Args:
        student_probs: ``(N, C)`` student probabilities.
        teacher_probs: ``(N, C)`` teacher probabilities; ``y*`` is their argmax.
        eps: probabilities are clipped to ``[eps, 1 - eps]`` before the logit.

    Returns:
        ``{"slope", "intercept", "n"}``; ``slope > 1`` is confidence exaggeration.

    Example::

        >>> t = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
        >>> round(exaggeration_slope(t, t)["slope"], 6)  # a perfect copy of the teacher
        1.0
    """
    _check_probs(student_probs, teacher_probs)
    a, b = _top_class_logits(student_probs, teacher_probs, eps)
    a_c = a - a.mean()
    var = (a_c * a_c).sum()
    if var <= 0:
        rank_zero_warn("exaggeration_slope: the teacher's confidence is the same on every point; the slope is undefined.")
        slope = float("nan")
    else:
        slope = float((a_c * (b - b.mean())).sum() / var)
    intercept = float(b.mean() - slope * a.mean()) if not math.isnan(slope) else float("nan")
    return {"slope": slope, "intercept": intercept, "n": len(a)}


def confidence_deciles(
    student_probs: torch.Tensor, teacher_probs: torch.Tensor, num_bins: int = 10
) -> list[dict[str, float]]:
    """Mean teacher and student confidence on the teacher's top class, per bin of the teacher's confidence (ICLR).

    Points are sorted by the teacher's confidence and split into ``num_bins`` bins of (nearly) equal size; the first
    rows are where the teacher is least sure, where the deviation paper finds the student even less sure.

    Returns:
        One dict per bin: ``bin``, ``n``, ``teacher_conf``, ``student_conf``, ``student_minus_teacher`` and
        ``frac_student_below`` (fraction of points where the student is less confident than the teacher).
    """
    _check_probs(student_probs, teacher_probs)
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or not 1 <= num_bins <= len(teacher_probs):
        raise ValueError(f"`num_bins` must be an integer in [1, {len(teacher_probs)}], got {num_bins!r}.")
    top = teacher_probs.argmax(dim=-1, keepdim=True)
    p_t = teacher_probs.double().gather(1, top).squeeze(1)
    p_s = student_probs.double().gather(1, top).squeeze(1)
    order = p_t.argsort(stable=True)
    rows = []
    for i, idx in enumerate(torch.tensor_split(order, num_bins)):
        t, s = p_t[idx], p_s[idx]
        rows.append(
            {
                "bin": i,
                "n": len(idx),
                "teacher_conf": float(t.mean()),
                "student_conf": float(s.mean()),
                "student_minus_teacher": float((s - t).mean()),
                "frac_student_below": float((s < t).double().mean()),
            }
        )
    return rows


@torch.no_grad()
def collect_logits(model: nn.Module, batches: Iterable[Any] | torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Logits of ``model`` (in ``eval`` mode, restored afterwards) over a tensor of inputs or an iterable of batches
    (``[x, ...]`` lists or bare inputs), on the model's device; returned on the CPU as float32."""
    was_training = model.training
    model.eval()
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    if isinstance(batches, torch.Tensor):
        batches = batches.split(batch_size)
    try:
        out = [model((b[0] if isinstance(b, (list, tuple)) else b).to(device)).float().cpu() for b in batches]
    finally:
        model.train(was_training)
    return torch.cat(out)


# --------------------------------------------------------------------------------------------------------------------
# Supervision complexity
# --------------------------------------------------------------------------------------------------------------------
def _jacobian_rows(model: nn.Module, names: list[str], params: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
    """``(len(x), k * P)`` Jacobian of the ``k`` outputs w.r.t. the ``P`` trainable parameters (one row per input)."""
    from torch.func import functional_call, jacrev, vmap

    def f(p: dict, xi: torch.Tensor) -> torch.Tensor:
        return functional_call(model, (p, buffers), (xi.unsqueeze(0),)).squeeze(0)

    jac = vmap(jacrev(f), in_dims=(None, 0))(params, x)  # name -> (c, k, *param.shape)
    return torch.cat([jac[name].flatten(2) for name in names], dim=2).flatten(1)


def empirical_ntk(
    model: nn.Module, inputs: torch.Tensor, chunk_size: int = 64, max_memory_mb: float = 1024.0
) -> torch.Tensor:
    """The output-averaged empirical NTK ``K[a, b] = (1/k) sum_j <d f_j(x_a)/d theta, d f_j(x_b)/d theta>`` (float64).

    The gradient is taken w.r.t. every parameter with ``requires_grad``, with the model in ``eval`` mode (dropout off,
    BatchNorm on running statistics), through ``torch.func`` (``vmap`` of ``jacrev``), so any backbone works. The
    average over the ``k`` outputs is the single kernel used for every target compared (Harutyunyan et al.
    linearise each output with the same features; comparing targets needs one fixed kernel).

    Args:
        model: the (student) network, mapping ``(c, ...)`` inputs to ``(c, k)`` outputs.
        inputs: ``(n, ...)`` inputs.
        chunk_size: inputs per Jacobian evaluation.
        max_memory_mb: Jacobians of all inputs are kept when they fit in this budget (``n * k * P * 4`` bytes);
            otherwise they are recomputed block by block (slower, memory ``2 * chunk_size * k * P * 4`` bytes).
    """
    if not isinstance(inputs, torch.Tensor) or inputs.ndim < 2 or len(inputs) < 1:
        raise ValueError(f"`inputs` must be a batch of inputs (n, ...), got {getattr(inputs, 'shape', inputs)!r}.")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not names:
        raise ValueError(f"`model` ({type(model).__name__}) has no trainable parameters: its NTK is zero.")
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    buffers.update({n: p.detach() for n, p in model.named_parameters() if not p.requires_grad})
    device = next(iter(params.values())).device
    x = inputs.to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            k = model(x[:1]).shape[-1]
        n_params = sum(params[name].numel() for name in names)
        chunks = list(torch.arange(len(x), device=device).split(chunk_size))
        keep_all = len(x) * k * n_params * 4 <= max_memory_mb * 2**20
        cache: dict[int, torch.Tensor] = {}

        def rows(i: int) -> torch.Tensor:
            if i in cache:
                return cache[i]
            jac = _jacobian_rows(model, names, params, buffers, x[chunks[i]])
            if keep_all:
                cache[i] = jac
            return jac

        kernel = torch.empty(len(x), len(x), dtype=torch.float64, device=device)
        for a in range(len(chunks)):
            ja = rows(a).double()
            for b in range(a + 1):
                jb = ja if a == b else rows(b).double()
                block = ja @ jb.T / k
                if a == b:  # J @ J.T is not bit-symmetric in every BLAS: make the kernel exactly symmetric
                    block = (block + block.T) / 2
                kernel[chunks[a][:, None], chunks[b][None, :]] = block
                kernel[chunks[b][:, None], chunks[a][None, :]] = block.T
    finally:
        model.train(was_training)
    return kernel


def _targets_matrix(targets: torch.Tensor, n: int, num_classes: int | None) -> torch.Tensor:
    if targets.ndim == 1:
        if targets.is_floating_point():
            raise TypeError("Class-index `targets` must have an integer dtype; soft targets must be (n, k).")
        if num_classes is None:
            num_classes = int(targets.max()) + 1
        targets = F.one_hot(targets.long(), num_classes)
    elif targets.ndim != 2:
        raise ValueError(f"`targets` must be class indices (n,) or a target matrix (n, k), got {tuple(targets.shape)}.")
    if len(targets) != n:
        raise ValueError(f"Got {len(targets)} targets for a kernel on {n} points.")
    return targets.double()


def supervision_complexity_from_kernel(
    kernel: torch.Tensor,
    targets: torch.Tensor,
    ridge: float = 1e-6,
    adjusted: bool = True,
    num_classes: int | None = None,
) -> float:
    """``sum_j Y_j^T (K + ridge * tr(K)/n * I)^-1 Y_j`` by a float64 Cholesky solve, or its adjusted form.

    Args:
        kernel: ``(n, n)`` positive semi-definite Gram matrix.
        targets: ``(n, k)`` target matrix (probabilities, one-hot, logits...) or ``(n,)`` class indices (one-hot).
        ridge: relative ridge added to the diagonal, in units of the mean eigenvalue ``tr(K) / n``. It is raised
            tenfold (with a warning) until the Cholesky factorisation succeeds.
        adjusted: return ``sqrt(SC * tr K) / n`` (scale-invariant) instead of the raw ``SC``.
        num_classes: width of the one-hot matrix for class-index targets (default: the largest index + 1).
    """
    if kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1]:
        raise ValueError(f"`kernel` must be a square (n, n) matrix, got {tuple(kernel.shape)}.")
    if not ridge >= 0:
        raise ValueError(f"`ridge` must be >= 0, got {ridge!r}.")
    n = kernel.shape[0]
    k64 = kernel.double()
    y = _targets_matrix(targets.to(k64.device), n, num_classes)
    trace = float(k64.diagonal().sum())
    if not trace > 0:
        raise ValueError("`kernel` has a zero trace: the model's outputs do not depend on its parameters here.")
    eye = torch.eye(n, dtype=torch.float64, device=k64.device)
    scale, tries = ridge * trace / n, 0
    while True:
        chol, info = torch.linalg.cholesky_ex(k64 + scale * eye)
        if int(info) == 0:
            break
        tries += 1
        if tries > 12:
            raise ValueError("The kernel is not positive definite even with a large ridge: check for NaNs.")
        scale = max(scale, 1e-12 * trace / n) * 10.0
    if tries:
        rank_zero_warn(
            f"supervision_complexity: K is ill-conditioned; used ridge {scale * n / trace:.1e} x tr(K)/n instead of "
            f"{ridge:.1e}. Use fewer points than the student has parameters."
        )
    z = torch.linalg.solve_triangular(chol, y, upper=False)  # K^-1 = L^-T L^-1, so Y^T K^-1 Y = |L^-1 Y|^2
    sc = float((z * z).sum())
    return math.sqrt(sc * trace) / n if adjusted else sc


def supervision_complexity(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    ridge: float = 1e-6,
    adjusted: bool = True,
    num_classes: int | None = None,
    chunk_size: int = 64,
    max_memory_mb: float = 1024.0,
) -> float:
    """Supervision complexity of ``targets`` for the student ``model`` under its empirical NTK on ``inputs``.

    ``adjusted=True`` (default) returns ``sqrt(SC * tr K) / n``, the quantity Harutyunyan et al. plot:
    it rises along the teacher's training trajectory, falls with the distillation temperature, and stays below the
    one-hot labels'. Use fewer points than the student has parameters (``K`` is otherwise singular), e.g. 500-2000.

    Args:
        model: the student network (its current weights define the kernel; at initialisation, or during training).
        inputs: ``(n, ...)`` training inputs.
        targets: ``(n,)`` class indices (one-hot targets) or an ``(n, k)`` target matrix, e.g. the teacher's
            ``softmax(logits / tau)``.
        ridge, adjusted, num_classes: see :func:`supervision_complexity_from_kernel`.
        chunk_size, max_memory_mb: see :func:`empirical_ntk`.

    Example::

        >>> net = nn.Linear(3, 2, bias=False)  # K = X X^T for a linear model
        >>> x = torch.eye(3)
        >>> round(supervision_complexity(net, x, torch.tensor([0, 1, 1]), adjusted=False, ridge=0.0), 6)
        3.0
    """
    kernel = empirical_ntk(model, inputs, chunk_size=chunk_size, max_memory_mb=max_memory_mb)
    return supervision_complexity_from_kernel(kernel, targets, ridge=ridge, adjusted=adjusted, num_classes=num_classes)
