"""The scalar paraxial Born & Wolf PSF: eq. (23) of Lim et al., IEEE TCI 2020, in torch.

The PSF of the paper's simulations. The torch version is differentiable (NA, wavelength, defocus and
axial scale can be learned by a PSF layer); :func:`born_wolf_psf` is the NumPy face. Conventions as in
:mod:`bundle.physics.psf`. Hand-written: no library offers a differentiable Born & Wolf model (the
Bessel functions' autograd below included).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from bundle.physics.optics import (
    Scalar,
    _check_optics,
    _check_shape,
    _check_voxel_size,
    _device_of,
    _normalise,
    _value,
)

__all__ = ["born_wolf_psf_torch", "born_wolf_psf"]


def _quadrant(ny: int, nx: int) -> tuple[int, int]:
    """``(ly, lx)``: the distinct lateral offsets ``|dy|``, ``|dx|`` of a ``ny × nx`` kernel centred at ``s // 2``."""
    cy, cx = ny // 2, nx // 2
    return max(cy, ny - 1 - cy) + 1, max(cx, nx - 1 - cx) + 1


def _unfold_quadrant(h: torch.Tensor, ny: int, nx: int) -> torch.Tensor:
    """``(Z, ny, nx)`` kernel from its values ``(Z, ly, lx)`` at the distinct lateral offsets (radial symmetry)."""
    iy = (torch.arange(ny, device=h.device) - ny // 2).abs()
    ix = (torch.arange(nx, device=h.device) - nx // 2).abs()
    return h[:, iy][:, :, ix]


# ----------------------------------------------------------------------------------------------
# Born & Wolf (paper eq. 23), differentiable
# ----------------------------------------------------------------------------------------------
class _BesselJ0(torch.autograd.Function):
    """``J0`` with autograd (``torch.special.bessel_j0`` has no derivative): ``J0' = -J1``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.special.bessel_j0(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return -grad * _BesselJ1.apply(x)


class _BesselJ1(torch.autograd.Function):
    """``J1`` with autograd: ``J1' = J0 - J1 / x`` (limit 1/2 at x = 0)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.special.bessel_j1(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        small = x.abs() < 1e-6
        safe = torch.where(small, torch.ones_like(x), x)
        d = torch.where(small, torch.full_like(x, 0.5), _BesselJ0.apply(x) - _BesselJ1.apply(x) / safe)
        return grad * d


@functools.lru_cache(maxsize=32)
def _gauss_legendre_01(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre nodes and weights on [0, 1] (float64)."""
    x, w = np.polynomial.legendre.leggauss(n)
    return (x + 1.0) / 2.0, w / 2.0


def _auto_n_rho(max_bessel_arg: float, max_phase: float) -> int:
    """Quadrature order resolving ``J0(A rho) exp(-j Phi rho^2)`` on [0, 1] (A, Phi in radians)."""
    return int(min(2048, max(48, math.ceil(0.5 * max_bessel_arg + max_phase) + 32)))


def _as_tensor(x: Scalar, device: torch.device | None, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype)
    return torch.tensor(float(x), device=device, dtype=dtype)


def born_wolf_psf_torch(
    na: Scalar,
    *,
    shape: Sequence[int] = (31, 31, 31),
    voxel_size: Sequence[float] = (0.1, 0.1, 0.1),
    wavelength: Scalar = 0.5,
    n_immersion: float = 1.5,
    defocus: Scalar = 0.0,
    axial_scale: Scalar = 1.0,
    n_rho: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Differentiable scalar paraxial Born & Wolf PSF, eq. (23) of Lim et al. (IEEE TCI 2020).

    ``h(r, z) = | C ∫_0^1 J0(k NA/n_i ρ r) exp(-½ j k ρ² z (NA/n_i)²) ρ dρ |²`` with
    ``k = 2π n_i / λ`` the wavenumber in the immersion medium (so the lateral argument is
    ``2π NA ρ r / λ`` and the in-focus lateral FWHM is the textbook ≈ 0.51 λ/NA; taking
    ``k = 2π/λ`` literally would make the PSF ``n_i`` times too wide). Sampled at voxel centres,
    focus at voxel ``s // 2`` (shifted by ``defocus``), normalised to sum one.

    Hand-written because no library offers a differentiable (torch) Born & Wolf PSF; it is
    rendered at every step of a learnable PSF layer. The ρ integral uses Gauss-Legendre
    quadrature; radial symmetry is exploited by evaluating only the distinct lateral offsets
    ``(|dy|, |dx|)`` and filling the kernel by indexing (~1-5 ms for 31³ on one CPU core).
    ``torch.special.bessel_j0`` has no autograd formula, so ``J0' = -J1`` is supplied here.

    Args:
        na: numerical aperture, float or 0-dim tensor (may require grad); ``0 < na < n_immersion``.
        shape: kernel size ``(Z, Y, X)`` in voxels (odd or even).
        voxel_size: ``(z, y, x)`` voxel size in micrometres.
        wavelength: emission wavelength in micrometres, float or 0-dim tensor.
        n_immersion: refractive index of the immersion medium.
        defocus: axial position of the focus relative to the kernel's centre voxel, micrometres
            (float or 0-dim tensor); positive moves the brightest plane to larger z.
        axial_scale: multiplies the axial coordinate (``z_eff = axial_scale (z - defocus)``);
            > 1 shortens the PSF along z. Float or 0-dim tensor.
        n_rho: quadrature nodes over ρ; ``None`` picks enough for the largest Bessel argument
            and defocus phase in the kernel (48-2048).
        device: output device; default the device of the first tensor argument, else CPU.
        dtype: output dtype (``torch.float32`` or ``torch.float64``); computation uses it too.

    Returns:
        ``(Z, Y, X)`` tensor, non-negative, sum 1, differentiable w.r.t. every tensor argument.

    Example:
        >>> na = torch.tensor(1.2, requires_grad=True)
        >>> h = born_wolf_psf_torch(na, shape=(31, 31, 31), voxel_size=(0.1, 0.1, 0.1))
        >>> h.sum().item()  # doctest: +SKIP
        1.0
    """
    nz, ny, nx = _check_shape(shape)
    dz, dy, dx = _check_voxel_size(voxel_size)
    _check_optics(na, n_immersion, wavelength)
    if not _value(axial_scale) > 0:
        raise ValueError(f"axial_scale must be positive, got {_value(axial_scale)}")
    if not math.isfinite(_value(defocus)):
        raise ValueError(f"defocus must be finite, got {_value(defocus)}")
    if n_rho is not None and int(n_rho) < 2:
        raise ValueError(f"n_rho must be >= 2, got {n_rho}")
    device = _device_of(na, wavelength, defocus, axial_scale, device=device)

    na_t = _as_tensor(na, device, dtype)
    wl_t = _as_tensor(wavelength, device, dtype)
    df_t = _as_tensor(defocus, device, dtype)
    ax_t = _as_tensor(axial_scale, device, dtype)
    n_i = float(n_immersion)

    cz = nz // 2
    ly, lx = _quadrant(ny, nx)
    ry = torch.arange(ly, device=device, dtype=dtype) * dy
    rx = torch.arange(lx, device=device, dtype=dtype) * dx
    r = torch.sqrt(ry[:, None] ** 2 + rx[None, :] ** 2).reshape(-1)  # (R,) micrometres
    z = (torch.arange(nz, device=device, dtype=dtype) - cz) * dz
    z_eff = ax_t * (z - df_t)  # (Z,)

    lateral = 2.0 * math.pi * na_t / wl_t  # k NA / n_i with k = 2π n_i / λ   [1/µm]
    axial = math.pi * na_t**2 / (n_i * wl_t)  # ½ k (NA / n_i)^2                [1/µm]

    if n_rho is None:
        max_arg = _value(lateral) * float(r.max())
        max_phase = _value(axial) * float(z_eff.detach().abs().max())
        n_rho = _auto_n_rho(max_arg, max_phase)
    rho_np, w_np = _gauss_legendre_01(int(n_rho))
    rho = torch.as_tensor(rho_np, device=device, dtype=dtype)
    w_rho = torch.as_tensor(w_np * rho_np, device=device, dtype=dtype)  # weight · ρ

    bessel = _BesselJ0.apply(lateral * r[:, None] * rho[None, :])  # (R, P)
    phase = axial * z_eff[:, None] * rho[None, :] ** 2  # (Z, P)
    re = (torch.cos(phase) * w_rho) @ bessel.T  # (Z, R)
    im = (torch.sin(phase) * w_rho) @ bessel.T
    h = _unfold_quadrant((re**2 + im**2).reshape(nz, ly, lx), ny, nx)
    return h / h.sum()


def born_wolf_psf(
    shape: Sequence[int] = (31, 31, 31),
    na: float = 1.4,
    n_immersion: float = 1.5,
    wavelength: float = 0.5,
    voxel_size: Sequence[float] = (0.1, 0.1, 0.1),
    defocus: float = 0.0,
) -> np.ndarray:
    """Scalar paraxial Born & Wolf PSF (paper eq. 23) as a numpy array.

    Thin wrapper over :func:`born_wolf_psf_torch` (computed in float64, returned as float32).
    Defaults are the paper's simulation PSF: NA 1.4, n_i 1.5, λ 500 nm, 100 nm voxels, 31³.

    Args:
        shape: kernel size ``(Z, Y, X)``.
        na: numerical aperture, ``0 < na < n_immersion``.
        n_immersion: immersion refractive index.
        wavelength: emission wavelength, micrometres.
        voxel_size: ``(z, y, x)`` micrometres.
        defocus: focus offset from the centre voxel along z, micrometres.

    Returns:
        ``(Z, Y, X)`` float32 array, non-negative, sum 1, focus at ``s // 2``.
    """
    h = born_wolf_psf_torch(
        float(na),
        shape=shape,
        voxel_size=voxel_size,
        wavelength=float(wavelength),
        n_immersion=float(n_immersion),
        defocus=float(defocus),
        dtype=torch.float64,
    )
    return _normalise(h.numpy())
