"""Scores against a ground truth: the least-squares affine fit, PSNR, SSIM, dim structure, and MONAI metric classes."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from monai.metrics import PSNRMetric, SSIMMetric

logger = logging.getLogger(__name__)


def affine_fit(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Return ``a * prediction + b`` with ``(a, b)`` the least-squares fit to ``target``, per sample.

    Args:
        prediction: ``(B, C, D, H, W)`` (or any ``(B, ...)``) tensor.
        target: tensor of the same shape.

    Returns:
        Tensor of ``prediction``'s shape, float32 or float64.
    """
    p = prediction.reshape(prediction.shape[0], -1).double()
    t = target.reshape(target.shape[0], -1).double()
    pc = p - p.mean(dim=1, keepdim=True)
    tc = t - t.mean(dim=1, keepdim=True)
    var = (pc * pc).mean(dim=1, keepdim=True)
    a = torch.where(var > 0, (pc * tc).mean(dim=1, keepdim=True) / var.clamp_min(1e-30), torch.zeros_like(var))
    b = t.mean(dim=1, keepdim=True) - a * p.mean(dim=1, keepdim=True)
    return (a * p + b).reshape(prediction.shape).to(prediction.dtype if prediction.is_floating_point() else torch.float32)


def psnr(prediction: Any, target: Any, data_range: float | None = None) -> float:
    """PSNR in dB, ``10 log10(MAX² / MSE)``, with ``MAX`` the ground truth's dynamic range (the paper's
    definition), computed in float64 by ``monai.metrics.PSNRMetric``. The one PSNR of the bundle
    (Richardson–Lucy's iteration choice, evaluation, validation helpers).

    Args:
        prediction: tensor or array; ``(B, C, D, H, W)`` is scored per item and averaged, any other
            shape over all its voxels at once.
        target: the ground truth, same shape.
        data_range: ``MAX``; default ``target.max() - target.min()``.

    Returns:
        PSNR in dB (``inf`` for identical inputs).
    """
    p, t = _as_float64(prediction), _as_float64(target)
    if p.shape != t.shape:
        raise ValueError(f"prediction and target shapes differ: {tuple(p.shape)} vs {tuple(t.shape)}")
    t = t.to(p.device)
    rng = float(t.max() - t.min()) if data_range is None else float(data_range)
    if rng <= 0:
        raise ValueError("data_range must be > 0 (the target is constant)")
    items = p.shape[0] if p.ndim == 5 else 1
    return float(PSNRMetric(max_val=rng)(p.reshape(items, 1, -1), t.reshape(items, 1, -1)).mean())


def _as_float64(x: Any) -> torch.Tensor:
    x = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return x.to(torch.float64)


def ssim(prediction: torch.Tensor, target: torch.Tensor, data_range: float | None = None) -> float:
    """3D SSIM (k1 = 0.01, k2 = 0.03, Gaussian window) via MONAI's ``SSIMMetric``; shapes as :func:`psnr`."""
    pred, tgt = _batched(prediction), _batched(target)
    rng = float(tgt.max() - tgt.min()) if data_range is None else float(data_range)
    win = max(3, min(7, *[s if s % 2 else s - 1 for s in tgt.shape[2:]]))
    metric = SSIMMetric(spatial_dims=3, data_range=rng, win_size=win, k1=0.01, k2=0.03)
    return float(metric(pred.float(), tgt.float()).mean())


def dim_structure(
    prediction: torch.Tensor,
    target: torch.Tensor,
    low: float = 0.05,
    high: float = 0.3,
    keep: float = 0.5,
    fit: bool = True,
) -> dict[str, float]:
    """How much faint structure an output keeps: recall of dim truth voxels, and its precision.

    A PSNR can rise while dim filaments vanish (they hold little energy), so this scores them alone.
    With ``m`` the truth's maximum (after ``prediction`` is mapped onto ``target`` by
    :func:`affine_fit` when ``fit``, as PSNR is):

    - *dim truth voxels*: ``low·m <= target <= high·m``;
    - ``recall``: the share of them that the output brings back to at least ``keep`` × their value;
    - ``precision``: of the output voxels in the same dim band, the share where the truth is not
      background (``target >= low·m``); output dim where the truth is empty counts against it.

    Args:
        prediction: ``(D, H, W)`` or ``(B, C, D, H, W)``.
        target: ground truth, same shape.
        low, high: the dim band as fractions of the truth's maximum (default 5-30 %).
        keep: fraction of the true value a dim voxel must reach to count as recovered.
        fit: map ``prediction`` onto ``target`` by the least-squares affine fit first.

    Returns:
        ``{"dim_recall", "dim_precision", "dim_voxels"}`` (NaN where a share has no voxel).
    """
    pred, tgt = _batched(prediction).double(), _batched(target).double()
    if fit:
        pred = affine_fit(pred, tgt)
    m = float(tgt.max())
    dim = (tgt >= low * m) & (tgt <= high * m)
    n_dim = int(dim.sum())
    recall = float((pred[dim] >= keep * tgt[dim]).double().mean()) if n_dim else float("nan")
    out_dim = (pred >= low * m) & (pred <= high * m)
    n_out = int(out_dim.sum())
    precision = float((tgt[out_dim] >= low * m).double().mean()) if n_out else float("nan")
    return {"dim_recall": recall, "dim_precision": precision, "dim_voxels": n_dim}


def _batched(x: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x)
    return x[None, None] if x.ndim == 3 else x


class AffineFitPSNRMetric(PSNRMetric):
    """MONAI ``PSNRMetric`` of ``y_pred`` after its least-squares affine fit to ``y``.

    Scores a blurred input at its most favourable intensity scaling; use it as the baseline a
    deconvolution has to beat. Args as ``monai.metrics.PSNRMetric``.
    """

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor):  # type: ignore[override]
        return super()._compute_tensor(affine_fit(y_pred, y), y)


class AffineFitSSIMMetric(SSIMMetric):
    """MONAI ``SSIMMetric`` of ``y_pred`` after its least-squares affine fit to ``y``; args as ``SSIMMetric``."""

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor):  # type: ignore[override]
        return super()._compute_tensor(affine_fit(y_pred, y), y)
