"""Differentiable vectorial (high-NA) PSF: the Richards & Wolf integrals in torch, and a learnable kernel.

The scalar paraxial Born & Wolf model (:func:`bundle.physics.psf.born_wolf_psf_torch`) cannot
match a high-NA widefield PSF at any NA (it is too long axially and lacks the polarisation terms),
so a blind PSF layer built on it fits a wrong NA. This module evaluates the vectorial model itself
in torch, so NA, wavelength, refractive index and rotationally symmetric pupil aberrations
(Zernike defocus and spherical terms) can be learned by gradient descent.

* :func:`vectorial_psf_torch`: the PSF of an isotropic (unpolarised) emitter in a homogeneous
  medium, Richards & Wolf (Proc. R. Soc. A 253, 1959), as in Aguet et al., Opt. Express 17(8) 2009
  with all refractive indices equal; pixel-integrated like ``psfmodels`` (3×3 sub-pixels).
* :func:`vectorial_pupil_psf`: the same as a float32 numpy array, for non-blind use.
* :class:`VectorialPSFKernel`: an ``nn.Module`` whose ``forward()`` returns the ``(Z, Y, X)``
  kernel with constrained learnable NA / spherical aberration / ..., optionally refined by a small
  non-negative residual kernel; hand it to :class:`bundle.networks.PSFLayer` as ``kernel``.

Conventions as in :mod:`bundle.physics.psf`: ``(Z, Y, X)`` kernels, non-negative, sum one, focus at
voxel ``s // 2``; voxel sizes ``(z, y, x)`` and wavelengths in micrometres; Zernike coefficients
in waves (of the emission wavelength) of the unit-rms (Noll-normalised) polynomials.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bundle.physics.psf import (
    Scalar,
    _as_tensor,
    _auto_n_rho,
    _BesselJ0,
    _BesselJ1,
    _check_optics,
    _check_shape,
    _check_voxel_size,
    _device_of,
    _gauss_legendre_01,
    _normalise,
    _quadrant,
    _unfold_quadrant,
    _value,
)

__all__ = ["vectorial_psf_torch", "vectorial_pupil_psf", "VectorialPSFKernel", "noll_to_nm", "zernike_radial"]

ZernikeKey = int | str | tuple[int, int]
LEARNABLE = ("na", "wavelength", "spherical", "secondary_spherical", "defocus")
logger = logging.getLogger(__name__)
_NA_CAP = 1.0 - 1e-4  # largest NA / n of a learned NA


# ----------------------------------------------------------------------------------------------
# Zernike terms of a rotationally symmetric pupil
# ----------------------------------------------------------------------------------------------
def noll_to_nm(j: int) -> tuple[int, int]:
    """Radial and azimuthal orders ``(n, m)`` of Noll's Zernike index ``j >= 1`` (4 → (2, 0), 11 → (4, 0))."""
    if int(j) < 1:
        raise ValueError(f"Noll indices start at 1, got {j}")
    n, rest = 0, int(j) - 1
    while rest > n:
        n += 1
        rest -= n
    m = (-1) ** int(j) * ((n % 2) + 2 * ((rest + (n + 1) % 2) // 2))
    return n, m


def _parse_zernike_key(key: ZernikeKey) -> int:
    """Radial order ``n`` of a rotationally symmetric Zernike term given as a Noll index or ``(n, m)``."""
    if isinstance(key, str):  # JSON object keys: "11" (Noll) or "4,0" / "(4, 0)"
        parts = [p for p in key.strip("()[] ").replace(" ", "").split(",") if p]
        key = int(parts[0]) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    if isinstance(key, (tuple, list)):
        if len(key) != 2:
            raise ValueError(f"a Zernike term is a Noll index or (n, m), got {key!r}")
        n, m = int(key[0]), int(key[1])
        if n < 0 or abs(m) > n or (n - m) % 2:
            raise ValueError(f"({n}, {m}) is not a Zernike term (need |m| <= n and n - m even)")
    else:
        n, m = noll_to_nm(int(key))
    if m != 0:
        raise ValueError(
            f"Zernike term {key!r} = (n={n}, m={m}) is not rotationally symmetric; the radial "
            "integrals here only take m = 0 terms (defocus 4, spherical 11, secondary spherical 22)"
        )
    return n


def zernike_radial(n: int, rho: torch.Tensor) -> torch.Tensor:
    """Unit-rms rotationally symmetric Zernike polynomial ``√(n+1) R_n^0(ρ)`` (n even), e.g. n=4:
    ``√5 (6ρ⁴ − 6ρ² + 1)``.

    Args:
        n: even radial order.
        rho: normalised pupil radius in [0, 1], any shape.

    Returns:
        Tensor shaped like ``rho``.
    """
    if n < 0 or n % 2:
        raise ValueError(f"rotationally symmetric Zernike terms have even n >= 0, got {n}")
    out = torch.zeros_like(rho)
    for k in range(n // 2 + 1):
        c = (-1) ** k * math.factorial(n - k) / (math.factorial(k) * math.factorial(n // 2 - k) ** 2)
        out = out + c * rho ** (n - 2 * k)
    return math.sqrt(n + 1) * out


def _zernike_terms(zernike: Mapping[ZernikeKey, Scalar] | None, spherical: Scalar) -> dict[int, Scalar]:
    terms: dict[int, Scalar] = {}
    for key, coef in (zernike or {}).items():
        n = _parse_zernike_key(key)
        if n > 0:  # piston changes nothing
            terms[n] = terms[n] + coef if n in terms else coef
    if isinstance(spherical, torch.Tensor) or float(spherical) != 0.0:
        terms[4] = terms[4] + spherical if 4 in terms else spherical
    for n, coef in terms.items():
        if not math.isfinite(_value(coef)):
            raise ValueError(f"Zernike coefficient of n={n} must be finite, got {_value(coef)}")
    return terms


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
    terms = _zernike_terms(zernike, spherical)
    device = _device_of(na, n_immersion, wavelength, defocus, *terms.values(), device=device)

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

    Returns:
        ``(Z, Y, X)`` float32 array, non-negative, sum 1.
    """
    h = vectorial_psf_torch(
        shape,
        float(na),
        float(n_immersion),
        float(wavelength),
        voxel_size,
        spherical=float(spherical),
        zernike=zernike,
        defocus=float(defocus),
        dtype=torch.float64,
    )
    return _normalise(h.numpy())


# ----------------------------------------------------------------------------------------------
# learnable kernel
# ----------------------------------------------------------------------------------------------
class VectorialPSFKernel(nn.Module):
    """Learnable vectorial PSF: ``forward()`` renders :func:`vectorial_psf_torch` from constrained parameters.

    A blind PSF layer built on the scalar paraxial model fits a wrong NA to data blurred by a
    high-NA microscope (see :mod:`bundle.physics.pupil`); this kernel is the vectorial model with
    a handful of physical parameters, each kept in its valid range by its parameterisation:

    - ``na = lower + (upper − lower) · sigmoid(na_raw)`` with ``(lower, upper) = na_bounds`` (an
      upper bound of ``n_immersion`` is taken as ``0.9999 n_immersion``, so that a saturated
      sigmoid cannot reach the 90° aperture);
    - ``wavelength = exp(wavelength_raw)`` (µm);
    - ``spherical = aberration_bound · tanh(spherical_raw)`` (waves rms of Z11), likewise
      ``secondary_spherical`` (Z22);
    - ``defocus = defocus_raw`` (µm).

    Parameters named in ``learn`` are ``nn.Parameter`` s, the others buffers (all in the state dict).

    Optional residual: with ``residual=True`` the rendered PSF is convolved with a small
    non-negative unit-sum kernel ``q = softmax(residual_logits)`` (``residual_size``, odd), which
    starts as the identity up to ``residual_floor`` of its mass and can absorb blur the optical
    model lacks (e.g. scattering, detector cross-talk). It is frozen until :meth:`release_residual`:
    before that it is skipped, so it has no effect and receives no gradient (``grad`` stays
    ``None``: an optimizer built over all parameters leaves it untouched, and moves it once it is
    released). Under DDP such an unused parameter needs ``find_unused_parameters=True`` until the
    residual is released.

    Args:
        shape: kernel size ``(Z, Y, X)`` in voxels.
        na: initial numerical aperture, inside ``na_bounds``.
        n_immersion: immersion (= sample) refractive index (fixed).
        wavelength: initial emission wavelength, µm.
        voxel_size: ``(z, y, x)`` µm of the volumes the kernel is applied to.
        spherical: initial primary spherical aberration (Z11), waves rms.
        secondary_spherical: initial secondary spherical aberration (Z22), waves rms.
        defocus: initial focus offset from the centre voxel, µm.
        learn: names of the learned parameters, from ``"na"``, ``"wavelength"``, ``"spherical"``,
            ``"secondary_spherical"``, ``"defocus"``.
        na_bounds: ``(lower, upper)`` of the NA; default ``(0.1, n_immersion)``;
            ``0 < lower < na < upper <= n_immersion``.
        aberration_bound: largest magnitude of the spherical coefficients, waves rms.
        residual: add the residual kernel (frozen until :meth:`release_residual`).
        residual_size: ``(z, y, x)`` size of the residual kernel, odd.
        residual_floor: initial mass of the residual kernel outside its centre voxel.
        oversample: sub-pixel samples per lateral axis (see :func:`vectorial_psf_torch`).
        n_theta: θ quadrature nodes (``None``: automatic).
        n_sample: refractive index of the sample (mounting medium), when known. Rays beyond the
            sample's critical angle never leave it, so the effective NA of a fluorophore below the
            coverslip is at most ``n_sample`` (the upper NA bound becomes ``0.9999 n_sample``; an initial
            NA above it starts at ``0.99`` of the bound). Measured on data blurred by ``psfmodels``'
            vectorial PSF (NA 1.4, oil 1.515, water 1.33, 2 µm deep), the best NA/spherical fit of this
            model to the true PSF has NA 1.25; without the cap the spectral fit
            (:class:`~bundle.physics.psf_estimation.SpectralPSFFit`) lands at NA 1.34-1.38
            (correlation 0.967-0.973 on 32×64×64 crops), with it at 1.33 (0.974-0.977). ``None``:
            no cap beyond ``n_immersion``.

    Example::

        >>> kernel = VectorialPSFKernel((31, 31, 31), na=1.2, n_immersion=1.515, wavelength=0.52)
        >>> h = kernel()  # (31, 31, 31), sum 1, differentiable w.r.t. kernel.na_raw, kernel.spherical_raw
        >>> blur = PSFLayer(kernel_size=(31, 31, 31), kernel=kernel)  # bundle.networks.PSFLayer

    In a config: ``"kernel": {"_target_": "bundle.physics.pupil.VectorialPSFKernel", "shape": ..., ...}``.
    """

    def __init__(
        self,
        shape: Sequence[int] = (31, 31, 31),
        na: float = 1.4,
        n_immersion: float = 1.5,
        wavelength: float = 0.5,
        voxel_size: Sequence[float] = (0.1, 0.1, 0.1),
        spherical: float = 0.0,
        secondary_spherical: float = 0.0,
        defocus: float = 0.0,
        learn: Sequence[str] | str = ("na", "spherical"),
        na_bounds: Sequence[float] | None = None,
        aberration_bound: float = 2.0,
        residual: bool = False,
        residual_size: Sequence[int] = (3, 3, 3),
        residual_floor: float = 1e-4,
        oversample: int = 3,
        n_theta: int | None = None,
        n_sample: float | None = None,
    ) -> None:
        super().__init__()
        self.shape = _check_shape(shape)
        self.voxel_size = _check_voxel_size(voxel_size)
        _check_optics(na, n_immersion, wavelength)
        learn = (learn,) if isinstance(learn, str) else tuple(learn)
        unknown = [name for name in learn if name not in LEARNABLE]
        if unknown:
            raise ValueError(f"learn: unknown parameter(s) {unknown}; choose from {LEARNABLE}")
        bounds = (0.1, float(n_immersion)) if na_bounds is None else tuple(float(b) for b in na_bounds)
        if len(bounds) != 2:
            raise ValueError(f"na_bounds must be (lower, upper), got {na_bounds}")
        lower, upper = bounds
        if upper <= float(n_immersion):  # keep NA / n below 1 even when the sigmoid saturates
            upper = min(upper, _NA_CAP * float(n_immersion))
        if n_sample is not None:
            if not 0.0 < float(n_sample) <= float(n_immersion) * 2:
                raise ValueError(f"n_sample must be a refractive index (> 0), got {n_sample}")
            if float(n_sample) < upper:  # light beyond the sample's critical angle never leaves it
                upper = _NA_CAP * float(n_sample)
                if float(na) >= upper:
                    logger.info(
                        f"initial NA {na} is above the sample's refractive index {n_sample}: starting at "
                        f"the effective NA {0.99 * upper:.4f}"
                    )
                    na = 0.99 * upper
        if not 0.0 < lower < float(na) < upper <= float(n_immersion):
            raise ValueError(
                f"need 0 < na_bounds[0] < na < na_bounds[1] <= n_immersion, got bounds ({lower}, {upper}), "
                f"na {na}, n_immersion {n_immersion}"
            )
        if not aberration_bound > 0:
            raise ValueError(f"aberration_bound must be positive (waves), got {aberration_bound}")
        for name, value in (("spherical", spherical), ("secondary_spherical", secondary_spherical)):
            if not abs(float(value)) < aberration_bound:
                raise ValueError(f"|{name}| must be below aberration_bound {aberration_bound}, got {value}")
        if not math.isfinite(float(defocus)):
            raise ValueError(f"defocus must be finite, got {defocus}")
        if int(oversample) < 1:
            raise ValueError(f"oversample must be >= 1, got {oversample}")
        self.n_immersion = float(n_immersion)
        self.na_bounds = (lower, upper)
        self.aberration_bound = float(aberration_bound)
        self.learn = learn
        self.oversample = int(oversample)
        self.n_theta = None if n_theta is None else int(n_theta)

        fraction = (float(na) - lower) / (upper - lower)
        self._register("na_raw", math.log(fraction / (1.0 - fraction)), "na" in learn)
        self._register("wavelength_raw", math.log(float(wavelength)), "wavelength" in learn)
        self._register("spherical_raw", math.atanh(float(spherical) / aberration_bound), "spherical" in learn)
        self._register(
            "secondary_spherical_raw",
            math.atanh(float(secondary_spherical) / aberration_bound),
            "secondary_spherical" in learn,
        )
        self._register("defocus_raw", float(defocus), "defocus" in learn)

        self.residual_size: tuple[int, int, int] | None = None
        if residual:
            rs = tuple(int(s) for s in residual_size)
            if len(rs) != 3 or any(s < 1 or s % 2 == 0 for s in rs):
                raise ValueError(
                    f"residual_size must be three odd positive sizes, got {tuple(residual_size)}"
                )
            if any(r > s for r, s in zip(rs, self.shape)):
                raise ValueError(f"residual_size {rs} is larger than the kernel {self.shape}")
            if not 0.0 < residual_floor < 1.0:
                raise ValueError(f"residual_floor must be in (0, 1), got {residual_floor}")
            count = rs[0] * rs[1] * rs[2]
            logits = torch.zeros(rs)
            if count > 1:
                logits.fill_(math.log(residual_floor / ((count - 1) * (1.0 - residual_floor))))
                logits[rs[0] // 2, rs[1] // 2, rs[2] // 2] = 0.0
            self.residual_size = rs  # type: ignore[assignment]
            self.residual_logits = nn.Parameter(logits)
            self.register_buffer("residual_released", torch.tensor(0, dtype=torch.uint8))  # 1 = released

    def _register(self, name: str, value: float, learn: bool) -> None:
        tensor = torch.tensor(float(value), dtype=torch.float32)
        if learn:
            self.register_parameter(name, nn.Parameter(tensor))
        else:
            self.register_buffer(name, tensor)

    # ------------------------------------------------------------------------------------------
    @property
    def na(self) -> torch.Tensor:
        """Numerical aperture, a 0-dim tensor inside ``na_bounds``."""
        lower, upper = self.na_bounds
        return lower + (upper - lower) * torch.sigmoid(self.na_raw)

    @property
    def wavelength(self) -> torch.Tensor:
        """Emission wavelength, µm."""
        return torch.exp(self.wavelength_raw)

    @property
    def spherical(self) -> torch.Tensor:
        """Primary spherical aberration (Z11), waves rms."""
        return self.aberration_bound * torch.tanh(self.spherical_raw)

    @property
    def secondary_spherical(self) -> torch.Tensor:
        """Secondary spherical aberration (Z22), waves rms."""
        return self.aberration_bound * torch.tanh(self.secondary_spherical_raw)

    @property
    def defocus(self) -> torch.Tensor:
        """Focus offset from the centre voxel, µm."""
        return self.defocus_raw

    @property
    def released(self) -> bool:
        """Whether the residual kernel is in use (always False without one)."""
        return self.residual_size is not None and bool(self.residual_released)

    def release_residual(self) -> VectorialPSFKernel:
        """Start using (and training) the residual kernel; returns ``self``."""
        if self.residual_size is None:
            raise RuntimeError("this kernel has no residual: build it with residual=True")
        self.residual_released.fill_(1)
        return self

    def residual_kernel(self) -> torch.Tensor:
        """The residual kernel ``q``: ``residual_size`` tensor, non-negative, sum 1."""
        if self.residual_size is None:
            raise RuntimeError("this kernel has no residual: build it with residual=True")
        return torch.softmax(self.residual_logits.flatten(), dim=0).reshape(self.residual_size)

    def optical_kernel(self) -> torch.Tensor:
        """The vectorial PSF of the current parameters, without the residual: ``(Z, Y, X)``, sum 1."""
        return vectorial_psf_torch(
            self.shape,
            self.na,
            self.n_immersion,
            self.wavelength,
            self.voxel_size,
            zernike={11: self.spherical, 22: self.secondary_spherical},
            defocus=self.defocus,
            oversample=self.oversample,
            n_theta=self.n_theta,
            device=self.na_raw.device,
            dtype=self.na_raw.dtype,
        )

    def forward(self) -> torch.Tensor:
        """Render the kernel.

        Returns:
            ``(Z, Y, X)`` tensor, non-negative, sum 1, focus at ``s // 2`` (for zero defocus and
            aberrations), differentiable w.r.t. the learned parameters.
        """
        h = self.optical_kernel()
        if not self.released:
            return h
        q = self.residual_kernel().to(h.dtype).flip(0, 1, 2)  # conv3d correlates: flip to convolve
        pad = [s // 2 for s in self.residual_size]  # type: ignore[union-attr]
        out = F.conv3d(h[None, None], q[None, None], padding=pad)[0, 0]
        return out / out.sum()

    @torch.no_grad()
    def set_na_(self, na: float) -> VectorialPSFKernel:
        """Set the numerical aperture in place (inside ``na_bounds``); returns ``self``."""
        lower, upper = self.na_bounds
        if not lower < na < upper:
            raise ValueError(f"na must be inside na_bounds ({lower}, {upper}), got {na}")
        fraction = (float(na) - lower) / (upper - lower)
        self.na_raw.fill_(math.log(fraction / (1.0 - fraction)))
        return self

    @torch.no_grad()
    def mirror_z_(self) -> VectorialPSFKernel:
        """Mirror the kernel along z in place; returns ``self``.

        Mirroring the PSF in z conjugates the pupil's phase, so it negates every aberration and the
        defocus (exact for this model); the residual kernel, if any, is flipped in z. Used to pick
        the sign of the aberrations that a power spectrum cannot see
        (:class:`~bundle.physics.psf_estimation.SpectralPSFFit`).
        """
        for name in ("spherical_raw", "secondary_spherical_raw", "defocus_raw"):
            getattr(self, name).neg_()
        if self.residual_size is not None:
            self.residual_logits.copy_(self.residual_logits.flip(0))
        return self

    def physical_parameters(self) -> dict[str, float]:
        """Current ``na``, ``wavelength`` (µm), ``spherical``, ``secondary_spherical`` (waves rms),
        ``defocus`` (µm) and, with a residual, ``residual_centre`` (its centre weight; 1 = identity),
        as plain floats."""
        out = {
            name: float(getattr(self, name).detach().cpu())
            for name in ("na", "wavelength", "spherical", "secondary_spherical", "defocus")
        }
        if self.residual_size is not None:
            centre = tuple(s // 2 for s in self.residual_size)
            out["residual_centre"] = float(self.residual_kernel().detach()[centre].cpu())
        return out

    def extra_repr(self) -> str:
        return (
            f"shape={self.shape}, voxel_size={self.voxel_size}, n_immersion={self.n_immersion}, "
            f"learn={self.learn}, na_bounds={self.na_bounds}, residual_size={self.residual_size}"
        )
