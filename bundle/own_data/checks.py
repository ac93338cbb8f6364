"""What a user should know before trusting a result: sampling, stack sizes, spots sharper than the optics allow."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)


def nyquist_voxel_size(na: float, n_immersion: float, wavelength: float) -> tuple[float, float]:
    """Largest ``(z, xy)`` voxel sizes (µm) that sample a widefield PSF at Nyquist.

    Lateral: ``λ / (4 NA)`` (the OTF's support is ``2 NA / λ``); axial: ``λ / (2 n (1 − cos α))`` with
    ``sin α = NA / n`` (the axial extent of the widefield OTF).
    """
    if not 0 < na < n_immersion:
        raise ValueError(f"need 0 < na < n_immersion, got na={na}, n_immersion={n_immersion}")
    alpha = math.asin(na / n_immersion)
    return wavelength / (2 * n_immersion * (1 - math.cos(alpha))), wavelength / (4 * na)


def _half_max_width(profile: np.ndarray, centre: int, base: float) -> float | None:
    """Full width at half maximum (samples) of a 1D peak at ``centre`` above the background ``base``."""
    half = base + 0.5 * (float(profile[centre]) - base)
    edges = []
    for step in (-1, 1):
        i = centre
        while 0 <= i + step < profile.size and profile[i + step] > half:
            i += step
        if not 0 <= i + step < profile.size:
            return None  # never falls to half within the window (e.g. along a filament)
        a, b = float(profile[i]), float(profile[i + step])
        edges.append(i + step * (a - half) / max(a - b, 1e-12))
    return abs(edges[1] - edges[0])


def spot_fwhm(volume: np.ndarray, n_spots: int = 20, radius: int = 8, exclude: int = 6) -> np.ndarray:
    """Narrowest lateral FWHM (pixels) of the brightest local maxima of a ``(Z, Y, X)`` stack.

    Each maximum (over a ``3 x (2·exclude+1)²`` neighbourhood, so maxima are at least ``exclude``
    pixels apart) is measured in its own plane: the half-maximum width of the intensity profile
    through it along 0°, 45°, 90° and 135° (``radius`` pixels each side; one background for the four,
    their lowest value), and the *narrowest* of the four is kept. Filaments are so measured across
    (along them the profile does not fall to half and is skipped), and neither a spot nor a filament
    can be narrower than the PSF.

    Returns:
        FWHMs of up to ``n_spots`` maxima, brightest first (empty when none is found).
    """
    v = np.asarray(volume, dtype=np.float32)
    peaks = (v == ndimage.maximum_filter(v, size=(3, 2 * exclude + 1, 2 * exclude + 1))) & (v > np.percentile(v, 99))
    zz, yy, xx = np.nonzero(peaks)
    order = np.argsort(v[zz, yy, xx])[::-1]
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    directions = [(1.0, 0.0), (0.0, 1.0), (math.sqrt(0.5), math.sqrt(0.5)), (math.sqrt(0.5), -math.sqrt(0.5))]
    out: list[float] = []
    for i in order:
        z, y, x = int(zz[i]), int(yy[i]), int(xx[i])
        profiles = []
        for dy, dx in directions:
            coords = np.stack([y + t * dy, x + t * dx])
            if coords.min() < 0 or coords[0].max() > v.shape[1] - 1 or coords[1].max() > v.shape[2] - 1:
                break  # too close to the border
            profiles.append(ndimage.map_coordinates(v[z], coords, order=1))
        else:
            base = float(min(p.min() for p in profiles))
            widths = [w for p in profiles if (w := _half_max_width(p, radius, base)) is not None]
            if widths:
                out.append(min(widths))
        if len(out) >= n_spots:
            break
    return np.asarray(out, dtype=np.float64)


def check_stacks(
    shapes: Sequence[Sequence[int]],
    voxel_size: Sequence[float],
    patch_size: Sequence[int],
    na: float,
    n_immersion: float,
    wavelength: float,
    volumes: Sequence[np.ndarray] = (),
    min_patches: int = 8,
    sharp_spot_ratio: float = 0.7,
    sampling_tolerance: float = 1.25,
) -> list[str]:
    """What a user should know before trusting a result on these stacks; one sentence per problem.

    Checks: stacks smaller than the crop (they are padded), too few voxels for ``min_patches``
    crops, a z step or pixel size coarser than Nyquist for the optics, and — on ``volumes`` — spots
    sharper than the optics allow: the sharpest bright spots of the stacks (10th percentile of
    :func:`spot_fwhm`) against the same measure of the theoretical vectorial PSF at the configured
    voxel size; a ratio below ``sharp_spot_ratio`` means the voxel size, NA or wavelength is wrong
    (nothing in a widefield image is sharper than its PSF). Wider spots are not flagged: extended
    structures are wider than the PSF. Also on ``volumes``: a camera's hot pixels
    (:func:`bundle.data.camera.find_hot_pixels`), which the models would sharpen into streaks; the spot
    check then measures the stacks with them replaced, so they do not pass for sharp spots.

    Args:
        shapes: ``(Z, Y, X)`` of each training stack.
        voxel_size: ``(z, y, x)`` µm.
        patch_size: training crop ``(D, H, W)``.
        na, n_immersion, wavelength: the optics keys (µm).
        volumes: the stacks themselves, for the spot check (skipped when empty).
        min_patches: fewest crops' worth of voxels before "too few" is said.
        sharp_spot_ratio: spot-width ratio below which the optics keys are doubted.
        sampling_tolerance: a voxel up to this factor above Nyquist passes (widefield stacks are
            often taken slightly under Nyquist, e.g. 100 nm pixels at NA 1.4: 1.08x).

    Returns:
        Warnings (empty: nothing found).
    """
    warnings: list[str] = []
    for i, shape in enumerate(shapes):
        small = [f"{'ZYX'[a]} {s} < {p}" for a, (s, p) in enumerate(zip(shape, patch_size, strict=True)) if s < p]
        if small:
            warnings.append(
                f"stack {i} {tuple(shape)} is smaller than the training crop {tuple(patch_size)} ({', '.join(small)}): "
                "its crops are zero-padded; use a smaller --patch_size"
            )
    total = sum(int(np.prod(s)) for s in shapes)
    if total < min_patches * int(np.prod(patch_size)):
        warnings.append(
            f"only {total} training voxels, fewer than {min_patches} crops of {tuple(patch_size)}: the networks will "
            "overfit; add stacks or use a smaller --patch_size"
        )
    dz_max, dxy_max = nyquist_voxel_size(na, n_immersion, wavelength)
    if voxel_size[0] > dz_max * sampling_tolerance:
        warnings.append(
            f"z step {voxel_size[0]:.3g} um under-samples the PSF {voxel_size[0] / dz_max:.1f}x (Nyquist for NA {na}, n {n_immersion}, wavelength "
            f"{wavelength} um: {dz_max:.3g} um): the axial blur is aliased and cannot be learned exactly"
        )
    if max(voxel_size[1:]) > dxy_max * sampling_tolerance:
        warnings.append(
            f"pixel size {max(voxel_size[1:]):.3g} um under-samples the PSF laterally {max(voxel_size[1:]) / dxy_max:.1f}x (Nyquist {dxy_max:.3g} um): "
            "lateral detail beyond the pixel grid cannot be restored"
        )
    if len(volumes):
        from bundle.data.camera import correct_hot_pixels
        from bundle.physics.psf import vectorial_psf

        corrected = [correct_hot_pixels(v) for v in volumes]
        hot = [(i, int(mask.sum()), float(mask.mean())) for i, (_, mask) in enumerate(corrected) if mask.any()]
        if hot:
            listed = ", ".join(f"stack {i}: {n} ({share:.2%})" for i, n, share in hot[:5]) + (" ..." if len(hot) > 5 else "")
            warnings.append(
                f"hot pixels (camera pixels bright in every plane, one-voxel lines along Z) in {len(hot)} of {len(volumes)} "
                f"stacks ({listed}): the models sharpen them into streaks and the PSF fit reads them as a sharper PSF; "
                "hot_pixel_threshold (4 by default; 0 switches it off) corrects them as the stacks are read, in "
                "training, validation and inference alike; or write corrected copies with scripts/correct_hot_pixels.py"
            )
        volumes = [v for v, _ in corrected]

        psf = vectorial_psf((15, 41, 41), na=na, n_immersion=n_immersion, wavelength=wavelength, voxel_size=voxel_size)
        # the window scales with the expected width (a fixed one truncates wide PSFs)
        theory = float(spot_fwhm(psf, n_spots=1, radius=15)[0])
        radius = max(8, math.ceil(1.5 * theory))
        measured = np.concatenate([spot_fwhm(v, radius=radius, exclude=radius) for v in volumes])
        if measured.size >= 3 and (sharpest := float(np.percentile(measured, 10))) < sharp_spot_ratio * theory:
            warnings.append(
                f"the sharpest structures in the stacks are {sharpest:.2f} px wide (FWHM), narrower than the PSF of the "
                f"optics keys allows ({theory:.2f} px at NA {na}, wavelength {wavelength} um, voxel "
                f"{tuple(voxel_size)} um): check --voxel_size, --na and --wavelength"
            )
    return warnings
