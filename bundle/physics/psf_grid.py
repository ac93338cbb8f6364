"""The grid start of the spectral PSF fit (:class:`~bundle.physics.psf_estimation.SpectralPSFFit`): one
PSF parameter tried over a grid before the gradient fit, whose log-spectral loss has local minima in it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from bundle.physics.spectra import fit_scale_noise

__all__ = ["grid_start"]


def grid_start(
    blur: nn.Module,
    name: str,
    current: float,
    grid: Sequence[float],
    model_power: Callable[[], torch.Tensor],
    log_by: torch.Tensor,
    log_scale: torch.Tensor,
    log_noise: torch.Tensor,
    steps: int,
) -> dict[str, Any]:
    """Try ``current`` and every ``grid`` value of the PSF layer's ``name`` (``"na"`` or ``"depth"``), the scale
    and noise floor fitted for each with the PSF held; leave the layer at the best, with ``log_scale`` /
    ``log_noise`` at its values.

    Args:
        blur: the PSF layer (``set_na_`` for the NA; its kernel module's ``depth_raw`` for the depth).
        name: ``"na"`` or ``"depth"``.
        current: the parameter's value now (tried first).
        grid: the values to try; those outside the kernel's bounds are skipped.
        model_power: the blurred spectrum per bin that the layer's current kernel predicts.
        log_by: log of the blurred crops' spectrum per bin.
        log_scale: log of the scale ``a`` (0-d tensor, updated in place).
        log_noise: log of the noise floor ``s`` (0-d tensor, updated in place).
        steps: Adam steps of each scale/noise fit.

    Returns:
        ``{"start_<name>", "best_<name>", "best_loss", "tried"}``.
    """
    if name == "na":
        setter = blur.set_na_
    else:
        raw = blur.kernel_module.depth_raw

        def setter(value: float) -> None:
            with torch.no_grad():
                raw.fill_(value)

    start = (log_scale.detach().clone(), log_noise.detach().clone())
    results = []
    for value in [current, *grid]:
        try:
            setter(value)
        except ValueError:  # outside this kernel's bounds
            continue
        a, s = start[0].clone().requires_grad_(True), start[1].clone().requires_grad_(True)
        loss = fit_scale_noise(model_power(), log_by, a, s, steps)
        results.append((loss, value, float(a.detach()), float(s.detach())))
    best = min(results)
    setter(best[1])
    with torch.no_grad():
        log_scale.fill_(best[2])
        log_noise.fill_(best[3])
    return {f"start_{name}": current, f"best_{name}": best[1], "best_loss": best[0], "tried": len(results)}
