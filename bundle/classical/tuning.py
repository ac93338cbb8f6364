"""Choosing Richardson–Lucy's iteration count on data with ground truth."""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from bundle.classical.richardson_lucy import _NORMALIZE_MODES, Array, richardson_lucy
from bundle.metrics.reference import psnr

logger = logging.getLogger(__name__)


def _normalize_pair(
    prediction: torch.Tensor, target: torch.Tensor, mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring a prediction to the target's intensity scale before a PSNR (see :func:`best_iteration`)."""
    if mode == "none":
        return prediction, target
    if mode == "minmax":

        def rescale(v: torch.Tensor) -> torch.Tensor:
            lo, hi = v.min(), v.max()
            return (v - lo) / (hi - lo) if hi > lo else v - lo

        return rescale(prediction), rescale(target)
    # "affine": least-squares a * prediction + b ≈ target
    p = prediction - prediction.mean()
    var = (p * p).sum()
    a = (p * (target - target.mean())).sum() / var if var > 0 else prediction.new_zeros(())
    return a * p + target.mean(), target


def best_iteration(
    blurred: Array,
    ground_truth: Array,
    psf: Array,
    *,
    max_iter: int = 100,
    tv_weight: float = 0.0,
    pad_mode: str = "reflect",
    normalize: str = "minmax",
    init: str | float = "input",
    device: str | torch.device | None = None,
) -> tuple[int, list[float]]:
    """Richardson–Lucy's best iteration count on a volume with known ground truth, and its PSNR curve.

    Runs RL once for ``max_iter`` iterations and records the PSNR against ``ground_truth`` after
    each. Use it on the validation volume only, then deconvolve the test volumes with the returned
    count. The PSNR uses MAX = dynamic range of the (normalised) ground truth and the MSE after
    ``normalize`` is applied to the pair:

    - ``"minmax"`` (default): estimate and ground truth are each rescaled to ``[0, 1]`` by their own
      minimum and maximum (so MAX = 1); the same rule any method's output gets.
    - ``"affine"``: the estimate is mapped by the least-squares ``a * u + b`` onto the ground truth
      (scale-invariant, as in CSBDeep's evaluation); the ground truth is unchanged.
    - ``"none"``: raw intensities.

    Args:
        blurred: the blurred (noisy) stack ``(Z, Y, X)`` (or ``(B, C, D, H, W)`` tensor).
        ground_truth: the sharp object, same shape as ``blurred``.
        psf: ``(kd, kh, kw)`` PSF.
        max_iter: iterations to run (>= 1).
        tv_weight: TV weight, see :func:`richardson_lucy`.
        pad_mode: boundary model, see :func:`richardson_lucy`.
        normalize: ``"minmax"``, ``"affine"`` or ``"none"``, see above.
        init: start estimate, see :func:`richardson_lucy`.
        device: where to compute.

    Returns:
        ``(best, curve)``: ``curve[i]`` is the PSNR in dB after ``i + 1`` iterations
        (``len(curve) == max_iter``) and ``best = argmax(curve) + 1``.
    """
    if normalize not in _NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {_NORMALIZE_MODES}, got {normalize!r}")
    gt = torch.as_tensor(
        np.asarray(ground_truth) if not isinstance(ground_truth, torch.Tensor) else ground_truth.detach()
    )
    if tuple(gt.shape) != tuple(np.shape(blurred)):
        raise ValueError(
            f"ground_truth shape {tuple(gt.shape)} differs from blurred {tuple(np.shape(blurred))}"
        )
    curve: list[float] = []

    def record(_: int, estimate: torch.Tensor) -> None:
        target = gt.to(device=estimate.device, dtype=torch.float64)
        pred, target = _normalize_pair(estimate.to(torch.float64), target, normalize)
        curve.append(psnr(pred, target))

    richardson_lucy(
        blurred,
        psf,
        num_iter=max_iter,
        tv_weight=tv_weight,
        pad_mode=pad_mode,
        init=init,
        callback=record,
        device=device,
    )
    best = int(np.argmax(curve)) + 1 if not all(math.isnan(c) for c in curve) else max_iter
    return best, curve
