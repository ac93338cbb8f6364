"""Checks of a loaded volume or PSF, with errors that name the file and the problem."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from monai.config import PathLike

from bundle.io.formats import _err

logger = logging.getLogger(__name__)


def validate_volume(volume: np.ndarray, path: PathLike | None, *, allow_constant: bool = False) -> None:
    """Check that ``volume`` is a usable ``(Z, Y, X)`` stack.

    Args:
        volume: array to check, expected shape ``(Z, Y, X)``.
        path: file the volume came from (or goes to), used at the start of error messages.
        allow_constant: accept a volume whose voxels are all equal.

    Raises:
        VolumeError: empty, 2D, 4D/multichannel, other non-3D shapes, NaN/Inf voxels, constant volume.
    """
    volume = np.asarray(volume)
    if volume.size == 0:
        raise _err(path, f"volume is empty (shape {volume.shape})")
    if volume.ndim == 2:
        raise _err(path, f"is 2D (shape {volume.shape}); a 3D stack (Z, Y, X) is needed")
    if volume.ndim == 4:
        raise _err(
            path,
            f"has 4 dimensions (shape {volume.shape}): a multichannel stack; choose one channel with the "
            "`channel` argument (e.g. channel=0) to get a 3D stack (Z, Y, X)",
        )
    if volume.ndim != 3:
        raise _err(
            path, f"has {volume.ndim} dimensions (shape {volume.shape}); a 3D stack (Z, Y, X) is needed"
        )
    if volume.dtype.kind in "fc":
        n_bad = int(volume.size - np.count_nonzero(np.isfinite(volume)))
        if n_bad:
            raise _err(path, f"volume contains {n_bad} NaN/Inf voxels")
    if not allow_constant:
        lo, hi = volume.min(), volume.max()
        if lo == hi:
            raise _err(path, f"volume is constant (every voxel = {lo}); nothing to process")


def validate_psf(
    psf: np.ndarray, path: PathLike | None, *, volume_shape: Sequence[int] | None = None
) -> None:
    """Check that ``psf`` is a usable ``(Z, Y, X)`` point spread function.

    Args:
        psf: array to check, expected shape ``(Z, Y, X)``, non-negative, not all zero.
        path: file the PSF came from, used at the start of error messages.
        volume_shape: ``(Z, Y, X)`` of the volume it will be applied to; the PSF must not be larger.

    Raises:
        VolumeError: not 3D, NaN/Inf, negative values (beyond rounding: < -1e-6 × max), all zero,
            larger than the volume along an axis.
    """
    psf = np.asarray(psf)
    if psf.ndim != 3 or psf.size == 0:
        raise _err(path, f"PSF must be a 3D stack (Z, Y, X), got shape {psf.shape}")
    n_bad = int(psf.size - np.count_nonzero(np.isfinite(psf)))
    if n_bad:
        raise _err(path, f"PSF contains {n_bad} NaN/Inf voxels")
    peak = float(np.abs(psf).max())
    if peak == 0:
        raise _err(path, "PSF is all zero")
    n_neg = int(np.count_nonzero(psf < -1e-6 * peak))
    if n_neg:
        raise _err(
            path,
            f"PSF has {n_neg} negative voxels (min {float(psf.min()):.3g}, max {peak:.3g}); "
            "subtract the background and clip at 0 (bundle.physics.measured.load_measured_psf does this)",
        )
    if volume_shape is not None:
        for name, n_psf, n_vol in zip("ZYX", psf.shape, tuple(volume_shape)[-3:], strict=False):
            if n_psf > n_vol:
                raise _err(
                    path,
                    f"PSF shape {psf.shape} is larger than the volume {tuple(volume_shape)} along {name}; "
                    "crop the PSF (e.g. load_measured_psf(shape=...)) or use a larger volume",
                )


# ----------------------------------------------------------------------------------------------------------
# Plain load/save
# ----------------------------------------------------------------------------------------------------------
