"""Measured PSF from a bead stack: background removal, centring, resampling to the image's voxel size.

A measured PSF rarely matches the image it is used on: it is recorded at another voxel size, the
bead is off-centre, and the camera adds an offset. :func:`load_measured_psf` turns such a stack into
a PSF following the bundle's convention: float32 ``(Z, Y, X)``, non-negative, sum 1, centre at
voxel ``s // 2`` on each axis, sampled at the target voxel size.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from monai.config import PathLike
from scipy import ndimage

from bundle.io import VolumeError, load_volume, validate_psf

__all__ = ["load_measured_psf", "border_background"]


def border_background(volume: np.ndarray, *, width: int = 2) -> float:
    """Robust background level of a bead stack: the median of the voxels on its six faces.

    Args:
        volume: ``(Z, Y, X)`` bead stack.
        width: thickness of the border in voxels (clipped to half the size along each axis).

    Returns:
        The median intensity of the border voxels.
    """
    mask = np.ones(volume.shape, dtype=bool)
    inner = tuple(slice(min(width, n // 2), n - min(width, n // 2)) for n in volume.shape)
    mask[inner] = False
    return float(np.median(volume[mask]))


def _bead_centre(volume: np.ndarray, *, radius: Sequence[int]) -> np.ndarray:
    """Sub-voxel position of the bead's peak: the smoothed maximum refined by a Gaussian fit per axis.

    The peak, not the centre of mass: an aberrated PSF is asymmetric along z, and its centre of mass
    lies up to a voxel away from the focus that the bundle's PSF convention puts at ``s // 2``.
    The maximum is found on a smoothed copy (a hot pixel is not the bead); the refinement fits a
    parabola to the logarithm of the three raw values around it along each axis (exact for a
    Gaussian peak, 0 for a symmetric one; smoothing would pull it towards the heavier side of an
    asymmetric peak).

    Args:
        volume: ``(Z, Y, X)`` background-subtracted, non-negative stack.
        radius: kept for the signature (box half-size in voxels); the fit uses the 3 voxels around
            the maximum.

    Returns:
        ``(z, y, x)`` centre in voxel coordinates.
    """
    del radius
    smoothed = ndimage.gaussian_filter(volume, sigma=1.0)  # a hot pixel is not the bead
    peak = np.unravel_index(int(np.argmax(smoothed)), volume.shape)
    centre = np.array(peak, dtype=np.float64)
    for axis, p in enumerate(peak):
        if not 0 < p < volume.shape[axis] - 1:
            continue  # peak on the stack's face: no neighbour on one side
        index = list(peak)
        values = []
        for q in (p - 1, p, p + 1):
            index[axis] = q
            values.append(float(volume[tuple(index)]))
        if min(values) <= 0:
            continue
        lm, l0, lp = np.log(values)
        curvature = lm - 2.0 * l0 + lp
        if curvature < 0:
            centre[axis] += float(np.clip(0.5 * (lm - lp) / curvature, -0.5, 0.5))
    return centre


def _resample(stack: np.ndarray, grid: list[np.ndarray]) -> np.ndarray:
    """Cubic-spline samples of ``stack`` at ``grid``; where the spline undershoots below 0, linear ones.

    A cubic spline overshoots next to a sharp peak (the dark rings of a well-sampled PSF are near 0),
    and clipping that overshoot punched zero holes next to the centre; linear interpolation of a
    non-negative stack is non-negative, so it fills those voxels instead. At integer positions both
    return the stack's own values (an integer shift is exact).
    """
    cubic = ndimage.map_coordinates(stack, grid, order=3, mode="constant", cval=0.0)
    negative = cubic < 0
    if np.any(negative):
        linear = ndimage.map_coordinates(stack, [g[negative] for g in grid], order=1, mode="constant", cval=0.0)
        cubic[negative] = linear
    return cubic


def load_measured_psf(
    path: PathLike,
    *,
    target_voxel_size: Sequence[float],
    voxel_size: Sequence[float] | None = None,
    shape: Sequence[int] = (31, 31, 31),
    background: str | float | None = "auto",
    center: bool = True,
) -> np.ndarray:
    """Load a bead stack / measured PSF and turn it into a PSF on the image's voxel grid.

    Steps: load with :func:`bundle.io.load_volume`; subtract the background (``"auto"``: median of
    the border voxels) and clip negatives to 0; find the brightest blob's centre (centre of mass in a
    box around the smoothed peak); then sample the stack on a ``shape`` grid of ``target_voxel_size``
    whose voxel ``s // 2`` is that centre, by cubic-spline interpolation
    (``scipy.ndimage.map_coordinates``; linear where the spline would undershoot below 0, so no
    zero holes appear next to the centre, :func:`_resample`). Doing centring (sub-voxel shift), resampling (zoom) and
    central crop/pad in this single interpolation avoids smoothing the PSF twice and keeps the centre
    exact; outside the measured stack the PSF is 0. Finally clip negatives (spline overshoot) and
    normalise to sum 1. This is the fix for "the PSF voxel size does not match the image".

    Args:
        path: bead stack file (any format :func:`bundle.io.load_volume` reads), ``(Z, Y, X)``.
        target_voxel_size: ``(z, y, x)`` voxel size of the images the PSF is for, in µm.
        voxel_size: ``(z, y, x)`` voxel size of the bead stack in µm; None reads it from the file.
        shape: ``(Z, Y, X)`` shape of the returned PSF; odd sizes put the centre in the middle.
        background: ``"auto"`` (median of the border voxels), a value to subtract, or None (keep).
        center: move the bead centre to voxel ``s // 2``; if False the stack's own voxel
            ``n // 2`` is mapped to ``s // 2``.

    Returns:
        float32 ``(Z, Y, X)`` PSF of ``shape``, non-negative, sum 1, centred at ``s // 2``.

    Raises:
        VolumeError: unreadable file, no voxel size (neither in the file nor given), nothing above
            the background, or an invalid result (see :func:`bundle.io.validate_psf`).

    Example::

        psf = load_measured_psf("beads/bead_01.tif", target_voxel_size=(0.2, 0.1, 0.1), shape=(31, 31, 31))
    """
    stack, meta = load_volume(path, dtype=np.float64)
    if voxel_size is None:
        voxel_size = meta["voxel_size"]
    if voxel_size is None:
        raise VolumeError(
            f"{path}: the file has no voxel size; pass voxel_size=(z, y, x) in µm to load_measured_psf"
        )
    source = np.asarray(voxel_size, dtype=np.float64)
    target = np.asarray(target_voxel_size, dtype=np.float64)
    shape = tuple(int(s) for s in shape)
    if source.shape != (3,) or target.shape != (3,) or np.any(source <= 0) or np.any(target <= 0):
        raise VolumeError(
            f"{path}: voxel sizes must be 3 positive numbers (z, y, x) in µm, "
            f"got voxel_size={tuple(source)} and target_voxel_size={tuple(target)}"
        )
    if len(shape) != 3 or min(shape) < 1:
        raise VolumeError(f"{path}: shape must be 3 positive sizes (Z, Y, X), got {shape}")

    if isinstance(background, str):
        if background != "auto":
            raise ValueError(f"background must be 'auto', a number or None, got {background!r}")
        background = border_background(stack)
    if background is not None:
        stack = stack - float(background)
    stack = np.clip(stack, 0.0, None)
    if not np.any(stack > 0):
        raise VolumeError(f"{path}: nothing above the background ({background}); is this a bead stack?")

    # the box for the centre of mass: half the PSF's extent, in source voxels (at least 2)
    radius = np.maximum(np.round(0.5 * (np.array(shape) // 2) * target / source), 2).astype(int)
    centre = _bead_centre(stack, radius=radius) if center else np.array([n // 2 for n in stack.shape], float)

    # output voxel o along each axis samples the stack at centre + (o - s // 2) * target / source
    grid = np.meshgrid(
        *[
            c + (np.arange(s) - s // 2) * t / v
            for c, s, t, v in zip(centre, shape, target, source, strict=True)
        ],
        indexing="ij",
    )
    psf = np.clip(_resample(stack, grid), 0.0, None)
    total = psf.sum()
    if not total > 0:
        raise VolumeError(
            f"{path}: the resampled PSF is all zero (bead centre {tuple(centre)} outside the stack?)"
        )
    psf = (psf / total).astype(np.float32)
    validate_psf(psf, path)
    return psf
