"""Estimate the Poisson–Gaussian noise of blurred stacks from their variance-vs-mean relation.

A widefield stack is ``y = h * x + w`` with shot noise (variance proportional to the signal) and read
noise (constant variance): ``Var[y | mean m] = a·m + b`` (Foi et al., "Practical Poissonian-Gaussian
noise modeling and fitting for single-image raw-data", IEEE TIP 2008). The blurred signal is smooth
along the optical axis (the PSF is 3-5× longer in z than wide), so a high-order finite difference
along z removes it and leaves the noise: the residual ``r = Δ⁴_z y`` (coefficients 1, −4, 6, −4, 1)
has variance ``70 σ²`` where the noise is locally constant. Binning voxels by a local mean, taking a
robust variance per bin (median absolute deviation, so bright edges do not dominate) and fitting a line
gives ``a`` and ``b``.

No library found fits this model for 3D stacks (scikit-image's ``estimate_sigma`` assumes one Gaussian
level for the whole image), hence this short implementation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy.ndimage import uniform_filter

__all__ = ["estimate_poisson_gaussian"]

_DIFF = np.array([1.0, -4.0, 6.0, -4.0, 1.0])  # 4th-order difference; sum of squares 70
_MAD_TO_SD = 1.482602218505602


def _residual_and_mean(volume: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """The 4th difference along ``axis`` (normalised to the noise's sd) and a 3×3×3 local mean, same voxels."""
    v = np.moveaxis(volume, axis, 0)
    n = v.shape[0]
    r = sum(c * v[i : n - 4 + i] for i, c in enumerate(_DIFF)) / math.sqrt(float(np.sum(_DIFF**2)))
    m = np.moveaxis(uniform_filter(volume, size=3, mode="nearest"), axis, 0)[2 : n - 2]
    return r.ravel(), m.ravel()


def estimate_poisson_gaussian(
    volumes: np.ndarray | torch.Tensor | Sequence[np.ndarray | torch.Tensor],
    axis: int = 0,
    n_bins: int = 32,
    min_per_bin: int = 2000,
) -> dict[str, float]:
    """Fit ``Var[y] = a·y + b`` to blurred stacks; return it as Poisson–Gaussian parameters.

    Args:
        volumes: one ``(Z, Y, X)`` stack, a batch ``(B, 1, Z, Y, X)``/``(B, Z, Y, X)``, or a list of them,
            in the units the noise is wanted in (e.g. the normalised training intensities).
        axis: the axis of each ``(Z, Y, X)`` stack along which the signal is smoothest (0 = z, the
            optical axis of a widefield stack); it needs at least 5 planes.
        n_bins: bins of equal voxel count over the local mean.
        min_per_bin: fewest voxels per bin (fewer bins are used on small inputs).

    Returns:
        ``{"photons_per_unit": 1/a (inf without shot noise), "gaussian_sigma": sqrt(b) (0 when b <= 0),
        "black_level": -b/a when b < 0 (the intensity of zero shot noise, e.g. a camera offset left
        after normalisation; else 0), "slope": a, "intercept": b, "voxels": voxels used}``.

    Raises:
        ValueError: too few planes along ``axis`` or too few voxels for two bins.
    """
    if isinstance(volumes, (np.ndarray, torch.Tensor)):
        volumes = [volumes]
    residuals, means = [], []
    for vol in volumes:
        a = vol.detach().float().cpu().numpy() if isinstance(vol, torch.Tensor) else np.asarray(vol, np.float32)
        stacks = a.reshape(-1, *a.shape[-3:]) if a.ndim >= 3 else None
        if stacks is None:
            raise ValueError(f"noise estimation needs 3D stacks, got shape {a.shape}")
        for s in stacks:
            if s.shape[axis] < 5:
                raise ValueError(f"noise estimation needs >= 5 planes along axis {axis}, got shape {s.shape}")
            r, m = _residual_and_mean(s.astype(np.float64), axis)
            residuals.append(r)
            means.append(m)
    r = np.concatenate(residuals)
    m = np.concatenate(means)
    bins = min(int(n_bins), r.size // int(min_per_bin))
    if bins < 2:
        raise ValueError(f"noise estimation needs >= {2 * min_per_bin} voxels, got {r.size}")
    order = np.argsort(m, kind="stable")
    centres, variances = [], []
    for idx in np.array_split(order, bins):
        rb = r[idx]
        mad = np.median(np.abs(rb - np.median(rb)))
        centres.append(float(np.mean(m[idx])))
        variances.append(float((_MAD_TO_SD * mad) ** 2))
    slope, intercept = np.polyfit(np.asarray(centres), np.asarray(variances), 1)
    slope = max(float(slope), 0.0)
    if slope == 0.0:
        intercept = float(np.median(variances))
    photons = 1.0 / slope if slope > 0 else math.inf
    black = -intercept / slope if intercept < 0 and slope > 0 else 0.0
    return {
        "photons_per_unit": photons,
        "gaussian_sigma": math.sqrt(intercept) if intercept > 0 else 0.0,
        "black_level": float(black),
        "slope": slope,
        "intercept": float(intercept),
        "voxels": int(r.size),
    }
