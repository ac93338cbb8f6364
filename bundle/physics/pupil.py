"""Differentiable vectorial (high-NA) PSF: the Richards & Wolf integrals in torch, and a learnable kernel.

The scalar paraxial Born & Wolf model (:func:`bundle.physics.psf.born_wolf_psf_torch`) cannot
match a high-NA widefield PSF at any NA (it is too long axially and lacks the polarisation terms),
so a blind PSF layer built on it fits a wrong NA. This module evaluates the vectorial model itself
in torch, so NA, wavelength, refractive index, the source depth in an index-mismatched sample and
rotationally symmetric pupil aberrations (Zernike terms) can be learned by gradient descent.

* :func:`vectorial_psf_torch`: the PSF of an isotropic (unpolarised) emitter, Richards & Wolf (Proc.
  R. Soc. A 253, 1959), as in Aguet et al., Opt. Express 17(8) 2009, with the Gibson-Lanni phase of
  a sample whose index differs from the immersion's; pixel-integrated like ``psfmodels`` (3×3).
* :func:`vectorial_pupil_psf`: the same as a float32 numpy array, for non-blind use.
* the learnable kernel on it is :class:`bundle.networks.kernels.VectorialPSFKernel`.

Conventions as in :mod:`bundle.physics.psf`: ``(Z, Y, X)`` kernels, non-negative, sum one, focus at
voxel ``s // 2``; voxel sizes ``(z, y, x)`` and wavelengths in micrometres; Zernike coefficients
in waves (of the emission wavelength) of the unit-rms (Noll-normalised) polynomials.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from bundle.physics.born_wolf import (
    _as_tensor,
    _auto_n_rho,
    _BesselJ0,
    _BesselJ1,
    _gauss_legendre_01,
    _quadrant,
    _unfold_quadrant,
)
from bundle.physics.index_mismatch import depth_phase
from bundle.physics.optics import (
    Scalar,
    _check_optics,
    _check_shape,
    _check_voxel_size,
    _device_of,
    _normalise,
    _value,
)
from bundle.physics.zernike import ZernikeKey, noll_to_nm, zernike_radial, zernike_terms

_NA_CAP = 1.0 - 1e-4  # largest NA / n_sample when the NA is capped
__all__ = ["vectorial_psf_torch", "vectorial_pupil_psf", "noll_to_nm", "zernike_radial"]  # the last two: physics.zernike

# ----------------------------------------------------------------------------------------------
# the PSF
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=32)
def _radial_geometry(
    ly: int, lx: int, dy: float, dx: float, oversample: int
) -> tuple[np.ndarray, np.ndarray]:
    """Distinct radii (µm) of the sub-pixel samples of lateral offsets ``[0, ly) × [0, lx)`` voxels,
    and for each sample ``(ly·s, lx·s)`` the index of its radius."""
    sub = (np.arange(oversample) + 0.5) / oversample - 0.5
    py = np.abs((np.arange(ly)[:, None] + sub[None, :]) * dy).reshape(-1)
    px = np.abs((np.arange(lx)[:, None] + sub[None, :]) * dx).reshape(-1)
    r2 = py[:, None] ** 2 + px[None, :] ** 2
    scale = min(dy, dx) ** 2 / oversample**2
    _, first, inverse = np.unique(np.round(r2 / scale * 1e6), return_index=True, return_inverse=True)
    radii = np.sqrt(r2.reshape(-1)[first])
    return radii, inverse.reshape(r2.shape)


def _bessel_j2(x: torch.Tensor, j0: torch.Tensor, j1: torch.Tensor) -> torch.Tensor:
    """``J2 = 2 J1(x)/x − J0(x)``, by its series below x = 0.1 (no 0/0, no cancellation)."""
    small = x.abs() < 0.1
    safe = torch.where(small, torch.ones_like(x), x)
    x2 = x * x
    series = x2 / 8.0 * (1.0 - x2 / 12.0 * (1.0 - x2 / 32.0))
    return torch.where(small, series, 2.0 * j1 / safe - j0)


def vectorial_psf_torch(
    shape: Sequence[int] = (31, 31, 31),
    na: Scalar = 1.4,
    n_immersion: Scalar = 1.5,
    wavelength: Scalar = 0.5,
    voxel_size: Sequence[float] = (0.1, 0.1, 0.1),
    *,
    spherical: Scalar = 0.0,
    zernike: Mapping[ZernikeKey, Scalar] | None = None,
    defocus: Scalar = 0.0,
    depth: Scalar = 0.0,
    n_sample: Scalar | None = None,
    oversample: int = 3,
    n_theta: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Differentiable vectorial (Richards & Wolf) widefield PSF of an isotropic emitter.

    With ``k = 2π n / λ``, ``α = asin(NA / n)`` and the pupil phase ``W(ρ) = 2π Σ c_j Z_j(ρ)``
    (``ρ = sin θ / sin α``, ``c_j`` in waves), for a lateral distance ``r`` and axial distance
    ``z`` from the focus::

        I0 = ∫_0^α √cosθ sinθ (1 + cosθ) J0(k r sinθ) exp(i (k z cosθ + W)) dθ
        I1 = ∫_0^α √cosθ sin²θ          J1(k r sinθ) exp(i (k z cosθ + W)) dθ
        I2 = ∫_0^α √cosθ sinθ (1 − cosθ) J2(k r sinθ) exp(i (k z cosθ + W)) dθ
        h(r, z) = |I0|² + 2 |I1|² + |I2|²

    This is the aberration-free model of ``psfmodels.vectorial_psf`` (Aguet et al. 2009) with
    coverslip and sample indices equal to the immersion index (:func:`bundle.physics.psf.vectorial_psf`),
    plus optional pupil aberrations. θ is integrated by Gauss-Legendre quadrature; the radial
    profile is evaluated at the distinct radii of the kernel's sub-pixel samples (``oversample``²
    per voxel, like ``psfmodels``' pixel integration) and averaged per voxel. Only the
    rotationally symmetric Zernike terms fit these radial integrals (``m = 0``: defocus Z4,
    primary spherical Z11, secondary spherical Z22, ...).

    Args:
        shape: kernel size ``(Z, Y, X)`` in voxels (odd or even); focus at voxel ``s // 2``.
        na: numerical aperture, float or 0-dim tensor (may require grad); ``0 < na < n_immersion``.
        n_immersion: refractive index of the immersion (= sample) medium, float or tensor.
        wavelength: emission wavelength in µm (vacuum), float or tensor.
        voxel_size: ``(z, y, x)`` in µm (y and x may differ).
        spherical: primary spherical aberration Z11 = Z(4, 0) = √5 (6ρ⁴ − 6ρ² + 1), in waves rms;
            float or tensor; positive values move the brightest plane toward +z, and the opposite
            sign mirrors the PSF in z. Added to ``zernike``'s own Z(4, 0) term.
        zernike: further rotationally symmetric terms ``{key: coefficient in waves}``; a key is a
            Noll index (4, 11, 22, ...), an ``(n, m)`` tuple with ``m = 0``, or their string forms
            ``"11"`` / ``"4,0"`` (JSON). Coefficients are floats or tensors.
        defocus: axial position of the focus relative to the kernel's centre voxel, µm (positive
            moves the focus to larger z); float or tensor.
        depth: source depth below the coverslip in a sample of index ``n_sample``, µm (float or
            tensor; positive into the sample, as ``psfmodels``' ``pz``): adds the Gibson-Lanni
            index-mismatch phase ``k0 depth (n_immersion cos θ − n_sample cos θ_s)``, refocused so the
            intensity peak stays at the centre voxel (:func:`bundle.physics.index_mismatch.depth_phase`);
            amplitudes stay those of a homogeneous medium. Against ``psfmodels`` (NA 1.4 capped at water's 1.33, oil 1.515,
            2 µm deep) 0.998 correlation. Needs ``n_sample >= na`` when non-zero.
        n_sample: refractive index of the sample (mounting medium); only used by ``depth``.
        oversample: sub-pixel samples per lateral axis averaged into a voxel (3 as ``psfmodels``;
            1 = sampled at voxel centres).
        n_theta: quadrature nodes over θ; ``None`` picks enough for the largest Bessel argument and
            phase variation in the kernel.
        device: output device; default the device of the first tensor argument, else CPU.
        dtype: computation and output dtype.

    Returns:
        ``(Z, Y, X)`` tensor, non-negative, sum 1, differentiable w.r.t. every tensor argument.

    Example:
        >>> na = torch.tensor(1.3, requires_grad=True)
        >>> h = vectorial_psf_torch((31, 31, 31), na, 1.515, 0.52, (0.1, 0.1, 0.1), spherical=0.1)
        >>> h.shape, float(h.sum())  # doctest: +SKIP
        (torch.Size([31, 31, 31]), 1.0)
    """
    nz, ny, nx = _check_shape(shape)
    dz, dy, dx = _check_voxel_size(voxel_size)
    _check_optics(na, n_immersion, wavelength)
    if not math.isfinite(_value(defocus)):
        raise ValueError(f"defocus must be finite, got {_value(defocus)}")
    if int(oversample) < 1:
        raise ValueError(f"oversample must be >= 1, got {oversample}")
    if n_theta is not None and int(n_theta) < 2:
        raise ValueError(f"n_theta must be >= 2, got {n_theta}")
    terms = zernike_terms(zernike, spherical)
    has_depth = isinstance(depth, torch.Tensor) or _value(depth) != 0.0
    if has_depth and (n_sample is None or not _value(n_sample) >= _value(na) > 0):
        raise ValueError(f"depth needs n_sample >= na (rays beyond it never leave the sample), got {n_sample}")
    device = _device_of(na, n_immersion, wavelength, defocus, depth, *terms.values(), device=device)

    na_t = _as_tensor(na, device, dtype)
    n_t = _as_tensor(n_immersion, device, dtype)
    wl_t = _as_tensor(wavelength, device, dtype)
    z = (torch.arange(nz, device=device, dtype=dtype) - nz // 2) * dz - _as_tensor(defocus, device, dtype)

    ly, lx = _quadrant(ny, nx)
    radii_np, inverse = _radial_geometry(ly, lx, dy, dx, int(oversample))
    radii = torch.as_tensor(radii_np, device=device, dtype=dtype)  # (R,)

    sin_alpha = na_t / n_t
    alpha = torch.asin(sin_alpha)
    k = 2.0 * math.pi * n_t / wl_t  # wavenumber in the medium, 1/µm
    if n_theta is None:
        max_arg = 2.0 * math.pi * _value(na_t) / _value(wl_t) * float(radii_np.max())
        max_phase = _value(k) * float(z.detach().abs().max()) * (1.0 - math.cos(_value(alpha)))
        max_phase += sum(4.0 * math.pi * math.sqrt(n + 1) * abs(_value(c)) for n, c in terms.items())
        max_phase += 2.0 * math.pi / _value(wl_t) * abs(_value(depth)) * _value(n_t)
        n_theta = _auto_n_rho(max_arg, max_phase)
    t_np, w_np = _gauss_legendre_01(int(n_theta))
    theta = alpha * torch.as_tensor(t_np, device=device, dtype=dtype)  # (P,)
    weight = alpha * torch.as_tensor(w_np, device=device, dtype=dtype)
    sin_t, cos_t = torch.sin(theta), torch.cos(theta)

    phase = k * z[:, None] * cos_t[None, :]  # (Z, P)
    if terms:
        rho = sin_t / sin_alpha
        pupil = sum(_as_tensor(c, device, dtype) * zernike_radial(n, rho) for n, c in terms.items())
        phase = phase + 2.0 * math.pi * pupil[None, :]
    if has_depth:
        n_s = _as_tensor(n_sample, device, dtype)
        phase = phase + depth_phase(depth, n_t, n_s, wl_t, sin_t, cos_t, weight)[None, :]
    cos_sin = torch.cat([torch.cos(phase), torch.sin(phase)])  # (2Z, P): real, imaginary parts

    x = k * radii[:, None] * sin_t[None, :]  # (R, P)
    j0, j1 = _BesselJ0.apply(x), _BesselJ1.apply(x)
    j2 = _bessel_j2(x, j0, j1)
    base = weight * torch.sqrt(cos_t) * sin_t
    profile = torch.zeros(nz, radii.numel(), device=device, dtype=dtype)
    for amplitude, bessel, multiplicity in (
        (base * (1.0 + cos_t), j0, 1.0),
        (base * sin_t, j1, 2.0),
        (base * (1.0 - cos_t), j2, 1.0),
    ):
        field = (cos_sin * amplitude) @ bessel.T  # (2Z, R)
        profile = profile + multiplicity * (field[:nz] ** 2 + field[nz:] ** 2)

    s = int(oversample)
    idx = torch.as_tensor(inverse.reshape(-1), device=device)
    h = profile[:, idx].reshape(nz, ly, s, lx, s).mean(dim=(2, 4))  # (Z, ly, lx) voxel averages
    h = _unfold_quadrant(h, ny, nx)
    return h / h.sum()


def vectorial_pupil_psf(
    shape: Sequence[int] = (31, 31, 31),
    na: float = 1.4,
    n_immersion: float = 1.5,
    wavelength: float = 0.5,
    voxel_size: Sequence[float] = (0.1, 0.1, 0.1),
    spherical: float = 0.0,
    zernike: Mapping[ZernikeKey, float] | None = None,
    defocus: float = 0.0,
    depth: float = 0.0,
    n_sample: float | None = None,
) -> np.ndarray:
    """Vectorial PSF with optional pupil aberrations as a numpy array (non-blind use, configs).

    :func:`vectorial_psf_torch` computed in float64; unlike :func:`bundle.physics.psf.vectorial_psf`
    it takes spherical aberration, a focus offset and anisotropic lateral voxels.

    Args:
        shape: kernel size ``(Z, Y, X)``.
        na: numerical aperture, ``0 < na < n_immersion``.
        n_immersion: immersion (= sample) refractive index.
        wavelength: emission wavelength, µm.
        voxel_size: ``(z, y, x)`` µm.
        spherical: primary spherical aberration Z11, waves rms.
        zernike: further rotationally symmetric Zernike terms, ``{Noll index or (n, 0): waves}``.
        defocus: focus offset from the centre voxel along z, µm.
        depth: source depth below the coverslip, µm: the refractive-index mismatch aberration
            (see :func:`vectorial_psf_torch`); needs ``n_sample``.
        n_sample: refractive index of the sample; the NA is capped at it (rays beyond its
            critical angle never leave the sample). ``None``: the immersion index.

    Returns:
        ``(Z, Y, X)`` float32 array, non-negative, sum 1.
    """
    if n_sample is not None and float(n_sample) < float(na):
        na = _NA_CAP * float(n_sample)
    h = vectorial_psf_torch(
        shape,
        float(na),
        float(n_immersion),
        float(wavelength),
        voxel_size,
        spherical=float(spherical),
        zernike=zernike,
        defocus=float(defocus),
        depth=float(depth),
        n_sample=None if n_sample is None else float(n_sample),
        dtype=torch.float64,
    )
    return _normalise(h.numpy())
