"""Point-spread-function models of a widefield fluorescence microscope, and PSF measurements.

Every PSF returned here is a float32 ``(Z, Y, X)`` array (or tensor) that is non-negative, sums
to one and has its focus at voxel ``s // 2`` along each axis. Voxel sizes are ``(z, y, x)`` in
micrometres, wavelengths in micrometres.

Models:
    * :func:`born_wolf_psf_torch` / :func:`born_wolf_psf` (from :mod:`bundle.physics.born_wolf`): the
      scalar paraxial Born & Wolf model, eq. (23) of Lim et al., "CycleGAN with a blur kernel for
      deconvolution microscopy: optimal transport geometry", IEEE TCI 2020 -- the PSF of the paper's
      simulations. The torch version is differentiable, so a PSF layer can learn NA, wavelength,
      defocus and axial scale.
    * :func:`vectorial_psf`: Richards & Wolf / Gibson-Lanni vectorial model (``psfmodels``), the
      paper's generalisation-test PSF.
    * :func:`scalar_psf`: Gibson-Lanni scalar non-paraxial model (``psfmodels``).
    * :func:`gaussian_psf`: separable Gaussian with a given FWHM per axis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from bundle.physics.born_wolf import born_wolf_psf, born_wolf_psf_torch
from bundle.physics.optics import _check_optics, _check_shape, _check_voxel_size, _normalise

__all__ = [
    "born_wolf_psf_torch",
    "born_wolf_psf",
    "vectorial_psf",
    "scalar_psf",
    "gaussian_psf",
    "make_psf",
    "fwhm",
    "psf_correlation",
    "PSF_MODELS",
]

PSF_MODELS = ("born_wolf", "vectorial", "scalar", "gaussian")


# ----------------------------------------------------------------------------------------------
# psfmodels-based models
# ----------------------------------------------------------------------------------------------
def _psfmodels_psf(
    kind: str,
    shape: Sequence[int],
    na: float,
    n_immersion: float,
    wavelength: float,
    voxel_size: Sequence[float],
    n_sample: float | None,
    depth: float = 0.0,
) -> np.ndarray:
    import psfmodels  # local: only these two models need it

    nz, ny, nx = _check_shape(shape)
    dz, dy, dx = _check_voxel_size(voxel_size)
    _check_optics(na, n_immersion, wavelength)
    if not math.isclose(dy, dx, rel_tol=1e-6):
        raise ValueError(f"psfmodels needs square lateral voxels, got y={dy} x={dx} micrometres")
    ns = float(n_immersion if n_sample is None else n_sample)
    if not (math.isfinite(ns) and ns >= 1.0):
        raise ValueError(f"n_sample must be a refractive index >= 1, got {ns}")
    n_i = float(n_immersion)
    # coverslip and sample matched to the immersion: aberration-free (source at the coverslip)
    params = {"NA": float(na), "ni": n_i, "ni0": n_i, "ng": n_i, "ng0": n_i, "ns": ns}
    m = max(ny, nx)
    m += 1 - m % 2  # psfmodels needs an odd lateral size; crop afterwards
    if not (math.isfinite(depth) and depth >= 0):
        raise ValueError(f"depth (of the source below the coverslip, µm) must be >= 0, got {depth}")
    fn = psfmodels.vectorial_psf if kind == "vectorial" else psfmodels.scalar_psf
    focus = 0.0
    if depth > 0:  # the refractive-index mismatch moves the intensity peak: find it on the axis
        scan = np.arange(-3.0, 1.5 * depth + 3.0, min(dz, 0.1) / 4)
        axial = np.asarray(fn(zv=scan, nx=1, dxy=dy, pz=float(depth), wvl=float(wavelength), params=params, normalize=False))
        focus = float(scan[int(np.argmax(axial.reshape(len(scan), -1)[:, 0]))])
    zv = focus + (np.arange(nz) - nz // 2) * dz
    psf = np.asarray(fn(zv=zv, nx=m, dxy=dy, pz=float(depth), wvl=float(wavelength), params=params, normalize=False))
    psf = psf.reshape(nz, m, m)
    y0, x0 = m // 2 - ny // 2, m // 2 - nx // 2  # keeps the focus at s // 2 for even sizes
    return _normalise(psf[:, y0 : y0 + ny, x0 : x0 + nx])


def vectorial_psf(
    shape: Sequence[int] = (31, 31, 31),
    na: float = 1.4,
    n_immersion: float = 1.5,
    wavelength: float = 0.5,
    voxel_size: Sequence[float] = (0.1, 0.1, 0.1),
    n_sample: float | None = None,
    depth: float = 0.0,
) -> np.ndarray:
    """Vectorial (Richards & Wolf / Gibson-Lanni) PSF from ``psfmodels`` (Aguet et al. 2009).

    The paper's generalisation-test PSF. Coverslip and sample indices default to the immersion
    index and the source sits at the coverslip, so the PSF is aberration-free and symmetric in z.
    A source ``depth`` µm below the coverslip in a sample of another index (``n_sample``) gives the
    spherical aberration of a refractive-index mismatch; the intensity peak (shifted along z by the
    mismatch) is then put at ``s // 2``.
    ``psfmodels`` integrates over pixels (3x oversampling) and needs odd, square lateral sizes:
    the PSF is computed on an odd square grid and cropped so its focus is at ``s // 2``.

    Args:
        shape: kernel size ``(Z, Y, X)`` (odd or even).
        na: numerical aperture, ``0 < na < n_immersion``.
        n_immersion: immersion refractive index (also used for the coverslip).
        wavelength: emission wavelength, micrometres.
        voxel_size: ``(z, y, x)`` micrometres; ``y`` must equal ``x``.
        n_sample: sample refractive index; ``None`` = ``n_immersion``.
        depth: source depth below the coverslip, µm (>= 0); aberrated when ``n_sample`` differs.

    Returns:
        ``(Z, Y, X)`` float32 array, non-negative, sum 1.
    """
    return _psfmodels_psf("vectorial", shape, na, n_immersion, wavelength, voxel_size, n_sample, depth)


def scalar_psf(
    shape: Sequence[int] = (31, 31, 31),
    na: float = 1.4,
    n_immersion: float = 1.5,
    wavelength: float = 0.5,
    voxel_size: Sequence[float] = (0.1, 0.1, 0.1),
    n_sample: float | None = None,
    depth: float = 0.0,
) -> np.ndarray:
    """Scalar non-paraxial Gibson-Lanni PSF from ``psfmodels``; same arguments as :func:`vectorial_psf`.

    Unlike :func:`born_wolf_psf` (paraxial), it keeps the full aperture angle, so its axial
    extent at high NA is ~30 % shorter.

    Returns:
        ``(Z, Y, X)`` float32 array, non-negative, sum 1.
    """
    return _psfmodels_psf("scalar", shape, na, n_immersion, wavelength, voxel_size, n_sample, depth)


# ----------------------------------------------------------------------------------------------
# Gaussian
# ----------------------------------------------------------------------------------------------
_FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


def gaussian_psf(
    shape: Sequence[int] = (31, 31, 31),
    fwhm: Sequence[float] | float = (0.5, 0.2, 0.2),
    voxel_size: Sequence[float] = (0.1, 0.1, 0.1),
) -> np.ndarray:
    """Separable Gaussian PSF sampled at voxel centres, focus at ``s // 2``, sum 1.

    A common initialisation of a learnable PSF layer and a crude widefield model.

    Args:
        shape: kernel size ``(Z, Y, X)``.
        fwhm: full width at half maximum per axis ``(z, y, x)`` in micrometres (or one value).
        voxel_size: ``(z, y, x)`` micrometres.

    Returns:
        ``(Z, Y, X)`` float32 array, non-negative, sum 1.
    """
    shape = _check_shape(shape)
    vs = _check_voxel_size(voxel_size)
    fw = (float(fwhm),) * 3 if np.isscalar(fwhm) else tuple(float(f) for f in fwhm)  # type: ignore[arg-type]
    if len(fw) != 3 or not all(math.isfinite(f) and f > 0 for f in fw):
        raise ValueError(f"fwhm must be three positive widths (z, y, x) in micrometres, got {fw}")
    psf = np.ones((1, 1, 1))
    for axis, (n, f, v) in enumerate(zip(shape, fw, vs, strict=True)):
        sigma = f * _FWHM_TO_SIGMA / v
        g = np.exp(-0.5 * ((np.arange(n) - n // 2) / sigma) ** 2)
        psf = psf * g.reshape([-1 if a == axis else 1 for a in range(3)])
    return _normalise(psf)


def make_psf(model: str = "born_wolf", **kwargs: Any) -> np.ndarray:
    """Build a PSF by model name (for configs: ``{"_target_": "bundle.physics.psf.make_psf", ...}``).

    Args:
        model: ``"born_wolf"`` (:func:`born_wolf_psf`), ``"vectorial"`` (:func:`vectorial_psf`),
            ``"scalar"`` (:func:`scalar_psf`) or ``"gaussian"`` (:func:`gaussian_psf`).
        kwargs: keyword arguments of that function.

    Returns:
        ``(Z, Y, X)`` float32 array, non-negative, sum 1.
    """
    builders = {
        "born_wolf": born_wolf_psf,
        "vectorial": vectorial_psf,
        "scalar": scalar_psf,
        "gaussian": gaussian_psf,
    }
    key = str(model).lower().replace("-", "_").replace("&", "_").replace(" ", "_")
    key = {"bornwolf": "born_wolf", "born__wolf": "born_wolf", "richards_wolf": "vectorial"}.get(key, key)
    if key not in builders:
        raise ValueError(f"unknown PSF model {model!r}; choose one of {PSF_MODELS}")
    return builders[key](**kwargs)


# ----------------------------------------------------------------------------------------------
# measurements
# ----------------------------------------------------------------------------------------------
def fwhm(
    profile_or_psf: np.ndarray | torch.Tensor,
    axis: int | None = None,
    voxel_size: Sequence[float] | float = 1.0,
) -> float:
    """Full width at half maximum through the peak, sub-voxel by linear interpolation.

    For a 1D profile the width of the peak around its maximum; for an N-D PSF the width of the
    line profile along ``axis`` through the brightest voxel. Half maximum is half the peak value
    (no background subtraction). Returns ``nan`` if the profile does not fall below half maximum
    on both sides of the peak (the PSF is wider than its array).

    Args:
        profile_or_psf: 1D profile or N-D array/tensor (e.g. a ``(Z, Y, X)`` PSF).
        axis: axis of the N-D array to measure along (0 = z, 1 = y, 2 = x); ignored for 1D.
        voxel_size: sample spacing, one value or one per axis (e.g. ``(z, y, x)`` µm).

    Returns:
        FWHM in the units of ``voxel_size``.
    """
    a = (
        profile_or_psf.detach().cpu().numpy()
        if isinstance(profile_or_psf, torch.Tensor)
        else np.asarray(profile_or_psf)
    )
    a = a.astype(np.float64)
    if a.ndim == 0 or a.size < 2:
        raise ValueError(f"need a profile of at least 2 samples, got shape {a.shape}")
    if a.ndim == 1:
        axis = 0
        profile = a
    else:
        if axis is None:
            raise ValueError(f"axis is required for a {a.ndim}-D array")
        if not -a.ndim <= axis < a.ndim:
            raise ValueError(f"axis {axis} out of range for shape {a.shape}")
        axis = axis % a.ndim
        peak = np.unravel_index(np.argmax(a), a.shape)
        index = list(peak)
        index[axis] = slice(None)
        profile = a[tuple(index)]
    if np.isscalar(voxel_size):
        spacing = float(voxel_size)  # type: ignore[arg-type]
    else:
        vs = list(voxel_size)  # type: ignore[arg-type]
        spacing = float(vs[axis] if len(vs) > 1 else vs[0])
    i = int(np.argmax(profile))
    half = profile[i] / 2.0
    if not profile[i] > 0:
        return float("nan")
    # left crossing: last index j < i with profile[j] < half
    left = np.nonzero(profile[:i] < half)[0]
    right = np.nonzero(profile[i + 1 :] < half)[0]
    if left.size == 0 or right.size == 0:
        return float("nan")
    j = left[-1]  # profile[j] < half <= profile[j + 1]
    xl = j + (half - profile[j]) / (profile[j + 1] - profile[j])
    k = i + 1 + right[0]  # profile[k - 1] >= half > profile[k]
    xr = k - 1 + (profile[k - 1] - half) / (profile[k - 1] - profile[k])
    return float((xr - xl) * spacing)


def psf_correlation(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Normalised cross-correlation (Pearson over voxels) of two PSFs.

    If the shapes differ, each axis of the larger one is cropped about its centre voxel
    ``s // 2`` to the smaller size, so PSFs centred by this module's convention stay aligned.

    Args:
        a: ``(Z, Y, X)`` PSF (array or tensor).
        b: ``(Z, Y, X)`` PSF with the same number of dimensions.

    Returns:
        Correlation in ``[-1, 1]`` (``nan`` if either PSF is constant).
    """
    x = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    y = b.detach().cpu().numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
    if x.ndim != y.ndim:
        raise ValueError(f"PSFs need the same number of dimensions, got {x.shape} and {y.shape}")
    target = [min(p, q) for p, q in zip(x.shape, y.shape, strict=True)]

    def crop(v: np.ndarray) -> np.ndarray:
        sl = tuple(slice(s // 2 - t // 2, s // 2 - t // 2 + t) for s, t in zip(v.shape, target, strict=True))
        return v[sl].astype(np.float64).ravel()

    x, y = crop(x), crop(y)
    x, y = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return float((x * y).sum() / denom) if denom > 0 else float("nan")
