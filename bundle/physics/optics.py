"""Checks and conventions shared by the PSF models: shapes, voxel sizes, optics, devices.

Voxel sizes are ``(z, y, x)`` in micrometres, wavelengths in micrometres; a PSF shape is three odd
sizes ``(Z, Y, X)`` with the focus at voxel ``s // 2``. Optical parameters may be floats or (for the
differentiable models) tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

Scalar = float | torch.Tensor


# ----------------------------------------------------------------------------------------------
# parameter checks
# ----------------------------------------------------------------------------------------------
def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or any(s < 1 for s in shape):
        raise ValueError(f"shape must be three positive sizes (Z, Y, X), got {shape}")
    return shape  # type: ignore[return-value]


def _check_voxel_size(voxel_size: Sequence[float] | float) -> tuple[float, float, float]:
    if np.isscalar(voxel_size):
        voxel_size = (float(voxel_size),) * 3  # type: ignore[arg-type]
    vs = tuple(float(v) for v in voxel_size)  # type: ignore[union-attr]
    if len(vs) != 3 or not all(math.isfinite(v) and v > 0 for v in vs):
        raise ValueError(f"voxel_size must be three positive sizes (z, y, x) in micrometres, got {vs}")
    return vs  # type: ignore[return-value]


def _value(x: Scalar) -> float:
    return float(x.detach().cpu()) if isinstance(x, torch.Tensor) else float(x)


def _check_optics(na: Scalar, n_immersion: Scalar, wavelength: Scalar) -> None:
    na_v, n_v, wl_v = _value(na), _value(n_immersion), _value(wavelength)
    if not (math.isfinite(n_v) and n_v >= 1.0):
        raise ValueError(f"n_immersion must be a refractive index >= 1, got {n_v}")
    if not (math.isfinite(na_v) and 0.0 < na_v < n_v):
        raise ValueError(f"na must satisfy 0 < na < n_immersion ({n_v}), got {na_v}")
    if not (math.isfinite(wl_v) and wl_v > 0.0):
        raise ValueError(f"wavelength must be positive (micrometres), got {wl_v}")
    if wl_v > 100.0:
        raise ValueError(f"wavelength is in micrometres (e.g. 0.5), got {wl_v}: did you pass nanometres?")


def _device_of(*values: Any, device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else the device of the first tensor among ``values``, else the CPU."""
    if device is None:
        device = next((v.device for v in values if isinstance(v, torch.Tensor)), None)
    return torch.device(device) if device is not None else torch.device("cpu")


def _normalise(psf: np.ndarray) -> np.ndarray:
    psf = np.clip(np.asarray(psf, dtype=np.float64), 0.0, None)
    total = psf.sum()
    if not (np.isfinite(total) and total > 0):
        raise ValueError("PSF is all zero or not finite; check the optical parameters")
    return (psf / total).astype(np.float32)
