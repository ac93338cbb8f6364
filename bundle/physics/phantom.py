"""Synthetic phantoms in ``[0, 1]``: microtubule networks, and vesicles with puncta.

The paper (Lim et al., IEEE TCI 2020, Sec. IV-A) trains on a synthetic microtubule network data
set of 256 x 512 x 128 volumes that it does not publish; :func:`microtubule_phantom` stands in for
it. :func:`vesicle_phantom` is a second, independent structure family (hollow shells and point-like
puncta, many of them dim) for testing models on data they were not tuned on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

__all__ = ["microtubule_phantom", "vesicle_phantom", "make_phantom", "PHANTOM_MODELS"]


def _rng(seed: int | np.random.Generator | None) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _default_n_filaments(shape: tuple[int, int, int], radius: tuple[float, float, float]) -> int:
    """About 1.5 % of the voxels above half the filament's intensity (before blending crossings).

    A filament crosses the lateral field of view (length ~ mean of Y and X) and is ~2 radius wide
    at half maximum in each cross-section direction, so it covers ~pi * radius^2 * 1.4 voxels per
    unit length; the count scales with the volume.
    """
    z, y, x = shape
    length = 0.5 * (y + x)
    cross = math.pi * 1.4 * radius[1] * max(radius[0], radius[2])
    return max(1, round(0.015 * z * y * x / (length * cross)))


def _walk(t: np.ndarray, noise: np.ndarray, pull: np.ndarray) -> np.ndarray:
    """Unit tangents ``(N, F, 3)`` of ``F`` chains: ``t <- normalise(pull * t + noise[i])``."""
    out = np.empty_like(noise)
    for i in range(noise.shape[0]):
        out[i] = t
        t = pull * t + noise[i]
        t = t / np.linalg.norm(t, axis=1, keepdims=True)
    return out


def microtubule_phantom(
    shape: Sequence[int] = (64, 128, 128),
    n_filaments: int | None = None,
    persistence_length: float = 30.0,
    radius: float | Sequence[float] = 1.0,
    intensity_range: Sequence[float] = (0.5, 1.0),
    lateral_bias: float = 0.8,
    seed: int | np.random.Generator | None = None,
) -> np.ndarray:
    """Random network of smooth 3D filaments (worm-like chains) resembling microtubules.

    Each filament is a worm-like chain: its unit tangent performs a random walk on the sphere
    with tangent correlation ``exp(-s / persistence_length)`` along the arc length ``s``. It
    starts at a random voxel and is traced in both directions until it leaves the volume, so
    filaments cross the field of view like real microtubules. ``lateral_bias`` flattens the
    tangent's excursions out of the XY plane (smaller z kicks, pulled back to the plane), so
    filaments lie mostly in XY planes as in a flat adherent cell. The curves
    are splatted (trilinear, 0.5-voxel steps) into the grid and blurred with a Gaussian
    (``scipy.ndimage.gaussian_filter``) of standard deviation ``radius``, scaled so a lone
    filament's centre line has its own intensity; crossings saturate at 1 (clipped).

    Hand-written because no library generates 3D filament phantoms; vectorised over filaments
    (~0.6 s for 128 x 256 x 256 on one CPU core).

    Args:
        shape: output size ``(Z, Y, X)`` in voxels.
        n_filaments: number of filaments; ``None`` scales with the volume so that ~1-2 % of the
            voxels are above 0.25 (e.g. 28 filaments for 64 x 128 x 128, 112 for 128 x 256 x 256).
        persistence_length: tangent correlation length, voxels (> 0); larger = straighter.
        radius: Gaussian cross-section standard deviation, voxels, one value or ``(z, y, x)``
            (e.g. larger in y/x than z for anisotropic voxels). Typically 1-2.
        intensity_range: ``(low, high)`` in ``(0, 1]``; each filament's intensity is uniform in it.
        lateral_bias: in ``[0, 1)``; 0 = isotropic directions, 0.8 = rms tilt out of XY ~9 degrees.
        seed: int or ``numpy.random.Generator`` for reproducibility; ``None`` = fresh entropy.

    Returns:
        ``(Z, Y, X)`` float32 array in ``[0, 1]``, background 0.

    Example:
        >>> vol = microtubule_phantom((32, 64, 64), seed=0)
        >>> vol.shape, vol.dtype
        ((32, 64, 64), dtype('float32'))
    """
    shape_t = tuple(int(s) for s in shape)
    if len(shape_t) != 3 or any(s < 1 for s in shape_t):
        raise ValueError(f"shape must be three positive sizes (Z, Y, X), got {tuple(shape)}")
    rad = (float(radius),) * 3 if np.isscalar(radius) else tuple(float(r) for r in radius)  # type: ignore[arg-type]
    if len(rad) != 3 or not all(math.isfinite(r) and r > 0 for r in rad):
        raise ValueError(f"radius must be positive (voxels), one value or (z, y, x), got {radius}")
    if not (math.isfinite(persistence_length) and persistence_length > 0):
        raise ValueError(f"persistence_length must be positive (voxels), got {persistence_length}")
    lo, hi = (float(v) for v in intensity_range)
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"intensity_range must satisfy 0 < low <= high <= 1, got {tuple(intensity_range)}")
    if not 0 <= lateral_bias < 1:
        raise ValueError(f"lateral_bias must be in [0, 1), got {lateral_bias}")
    if n_filaments is None:
        n_filaments = _default_n_filaments(shape_t, rad)  # type: ignore[arg-type]
    if int(n_filaments) < 0:
        raise ValueError(f"n_filaments must be >= 0, got {n_filaments}")
    n_fil = int(n_filaments)
    rng = _rng(seed)
    out = np.zeros(shape_t, dtype=np.float32)
    if n_fil == 0:
        return out

    dims = np.asarray(shape_t, dtype=np.float64)
    step = 0.5  # voxels per step: dense enough for a gap-free splat before the Gaussian
    n_steps = int(math.ceil(2.0 * float(np.sqrt((dims**2).sum())) / step))  # per direction
    sigma_turn = math.sqrt(step / persistence_length)  # WLC: <t(s).t(0)> = exp(-s / Lp)
    # lateral bias: smaller z kicks and a pull of the tangent's z component back to 0, so the
    # stationary tilt out of the XY plane has rms ~ (1 - b) / sqrt(2 b) (b = 0.8: ~9 degrees)
    kick = np.array([1.0 - lateral_bias, 1.0, 1.0]) * sigma_turn
    pull = np.array([1.0 - lateral_bias * step / persistence_length, 1.0, 1.0])

    start = rng.uniform(0, 1, (n_fil, 3)) * (dims - 1)
    t0 = rng.normal(size=(n_fil, 3)) * np.array([1.0 - lateral_bias, 1.0, 1.0])
    t0 /= np.linalg.norm(t0, axis=1, keepdims=True)
    intensity = rng.uniform(lo, hi, n_fil)

    margin = 3.0 * np.asarray(rad)
    pieces = []
    for sign in (1.0, -1.0):  # trace forward and backward from the start point
        noise = rng.normal(size=(n_steps, n_fil, 3)) * kick
        t = sign * t0
        path = start + step * np.cumsum(_walk(t, noise, pull), axis=0)  # (N, F, 3)
        inside = np.all((path > -margin) & (path < dims - 1 + margin), axis=2)  # (N, F)
        alive = np.cumprod(inside, axis=0).astype(bool)  # stop at the first exit
        pieces.append((path[alive], np.broadcast_to(intensity, (n_steps, n_fil))[alive]))
    points = np.concatenate([start] + [p for p, _ in pieces])
    weights = np.concatenate([intensity] + [w for _, w in pieces])

    # trilinear splat of line density (intensity * step per point), then Gaussian cross-section
    base = np.floor(points).astype(np.int64)
    frac = points - base
    flat_size = int(np.prod(shape_t))
    acc = np.zeros(flat_size, dtype=np.float64)
    for corner in range(8):
        offs = np.array([(corner >> 2) & 1, (corner >> 1) & 1, corner & 1])
        idx = base + offs
        w = weights * step * np.prod(np.where(offs == 1, frac, 1.0 - frac), axis=1)
        ok = np.all((idx >= 0) & (idx < dims.astype(np.int64)), axis=1)
        flat = np.ravel_multi_index(tuple(idx[ok].T), shape_t)
        acc += np.bincount(flat, weights=w[ok], minlength=flat_size)
    vol = ndimage.gaussian_filter(acc.reshape(shape_t).astype(np.float32), sigma=rad, mode="constant")
    # a line of unit density blurred by a 3D Gaussian peaks at 1 / (2 pi sigma_a sigma_b) across it;
    # (cross-section of a mostly lateral filament: z radius times the mean lateral radius)
    vol *= 2.0 * math.pi * rad[0] * math.sqrt(rad[1] * rad[2])
    np.clip(vol, 0.0, 1.0, out=vol)
    return vol.astype(np.float32, copy=False)


def vesicle_phantom(
    shape: Sequence[int] = (64, 128, 128),
    n_vesicles: int | None = None,
    radius_range: Sequence[float] = (3.0, 9.0),
    shell_width: float = 0.8,
    n_puncta: int | None = None,
    punctum_radius_range: Sequence[float] = (0.6, 1.2),
    intensity_range: Sequence[float] = (0.15, 1.0),
    z_scale: float = 1.0,
    seed: int | np.random.Generator | None = None,
) -> np.ndarray:
    """Hollow spherical shells (vesicles, membranes in cross-section) and point-like puncta.

    A structure family unlike filaments: closed 2D surfaces and isolated spots instead of 1D curves,
    so a model tuned on microtubules meets other shapes and other spatial frequencies. Each vesicle
    is a shell ``I * exp(-(d - R)^2 / (2 w^2))`` around a random centre (``d`` the distance, ``z``
    distances multiplied by ``z_scale`` for anisotropic voxels); each punctum a Gaussian spot.
    Intensities are drawn log-uniformly in ``intensity_range``, so many structures are dim (a test
    of faint-structure recovery). Overlaps add and saturate at 1 (clipped).

    Hand-written because no library generates such fluorescence phantoms; each object is drawn in
    its own bounding box (~0.3 s for 64 x 128 x 128).

    Args:
        shape: output size ``(Z, Y, X)`` in voxels.
        n_vesicles: number of shells; ``None``: one per ~40 000 voxels (12 for 32 x 128 x 128).
        radius_range: ``(low, high)`` shell radius in voxels.
        shell_width: Gaussian standard deviation of the shell wall, voxels.
        n_puncta: number of spots; ``None``: one per ~5 000 voxels (105 for 32 x 128 x 128).
        punctum_radius_range: ``(low, high)`` Gaussian standard deviation of a spot, voxels.
        intensity_range: ``(low, high)`` in ``(0, 1]``, drawn log-uniformly per object.
        z_scale: z voxel size over lateral voxel size (shapes stay round in µm).
        seed: int or ``numpy.random.Generator``; ``None`` = fresh entropy.

    Returns:
        ``(Z, Y, X)`` float32 array in ``[0, 1]``, background 0.

    Example:
        >>> vol = vesicle_phantom((16, 48, 48), seed=0)
        >>> vol.shape, float(vol.max()) <= 1.0
        ((16, 48, 48), True)
    """
    shape_t = tuple(int(s) for s in shape)
    if len(shape_t) != 3 or any(s < 1 for s in shape_t):
        raise ValueError(f"shape must be three positive sizes (Z, Y, X), got {tuple(shape)}")
    r_lo, r_hi = (float(v) for v in radius_range)
    p_lo, p_hi = (float(v) for v in punctum_radius_range)
    i_lo, i_hi = (float(v) for v in intensity_range)
    if not 0 < r_lo <= r_hi or not 0 < p_lo <= p_hi:
        raise ValueError(f"radius ranges must satisfy 0 < low <= high, got {radius_range}, {punctum_radius_range}")
    if not 0 < i_lo <= i_hi <= 1:
        raise ValueError(f"intensity_range must satisfy 0 < low <= high <= 1, got {tuple(intensity_range)}")
    if not (shell_width > 0 and z_scale > 0):
        raise ValueError(f"shell_width and z_scale must be positive, got {shell_width}, {z_scale}")
    n_voxels = int(np.prod(shape_t))
    n_ves = max(1, round(n_voxels / 40_000)) if n_vesicles is None else int(n_vesicles)
    n_pun = max(1, round(n_voxels / 5_000)) if n_puncta is None else int(n_puncta)
    if n_ves < 0 or n_pun < 0:
        raise ValueError(f"n_vesicles and n_puncta must be >= 0, got {n_vesicles}, {n_puncta}")
    rng = _rng(seed)
    out = np.zeros(shape_t, dtype=np.float64)
    dims = np.asarray(shape_t, dtype=np.float64)
    scale = np.array([z_scale, 1.0, 1.0])

    def draw(centre: np.ndarray, extent: float, profile) -> None:
        half = np.ceil(extent / scale).astype(int)
        lo = np.maximum(np.floor(centre).astype(int) - half, 0)
        hi = np.minimum(np.floor(centre).astype(int) + half + 2, shape_t)
        if np.any(hi <= lo):
            return
        grids = np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi, strict=True)], indexing="ij", sparse=True)
        d = np.sqrt(sum(((g - c) * s) ** 2 for g, c, s in zip(grids, centre, scale, strict=True)))
        out[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] += profile(d)

    log_i = np.log([i_lo, i_hi])
    for _ in range(n_ves):
        r = rng.uniform(r_lo, r_hi)
        level = math.exp(rng.uniform(*log_i))
        draw(rng.uniform(0, 1, 3) * (dims - 1), r + 4 * shell_width,
             lambda d, r=r, a=level: a * np.exp(-0.5 * ((d - r) / shell_width) ** 2))  # fmt: skip
    for _ in range(n_pun):
        s = rng.uniform(p_lo, p_hi)
        level = math.exp(rng.uniform(*log_i))
        draw(rng.uniform(0, 1, 3) * (dims - 1), 4 * s, lambda d, s=s, a=level: a * np.exp(-0.5 * (d / s) ** 2))
    np.clip(out, 0.0, 1.0, out=out)
    return out.astype(np.float32)


PHANTOM_MODELS = {"microtubules": microtubule_phantom, "vesicles": vesicle_phantom}


def make_phantom(model: str = "microtubules", **kwargs) -> np.ndarray:
    """The phantom of family ``model`` (a key of :data:`PHANTOM_MODELS`) with ``kwargs``.

    Raises:
        ValueError: unknown family (the message lists the known ones).
    """
    if model not in PHANTOM_MODELS:
        raise ValueError(f"unknown phantom model {model!r}; choose one of {sorted(PHANTOM_MODELS)}")
    return PHANTOM_MODELS[model](**kwargs)
