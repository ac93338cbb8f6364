"""The pupil phase of a refractive-index mismatch between immersion and sample (Gibson & Lanni, J. Opt.
Soc. Am. A 8(10), 1991), for :func:`bundle.physics.pupil.vectorial_psf_torch`."""

from __future__ import annotations

import math

import torch

__all__ = ["depth_phase"]


def depth_phase(
    depth: torch.Tensor | float,
    n_i: torch.Tensor,
    n_s: torch.Tensor,
    wavelength: torch.Tensor,
    sin_t: torch.Tensor,
    cos_t: torch.Tensor,
    weight: torch.Tensor,
) -> torch.Tensor:
    """Gibson-Lanni index-mismatch phase ``k0 depth (n_i cos θ − n_s cos θ_s)`` over the θ nodes,
    refocused so that the intensity peak sits at the centre voxel, as ``psfmodels``-based
    simulations centre it (:func:`bundle.physics.psf.vectorial_psf`).

    Hand-written (no library renders this in torch): the piston and defocus (``cos θ``) parts are
    removed by a least-squares fit weighted by the on-axis field's amplitude; the remaining focus
    shift ``z*`` (the on-axis intensity peak, where a rotationally symmetric PSF peaks) is found by a
    scan refined parabolically, and enters to first order, ``z* + (dz*/d depth)(depth − depth₀)``,
    with the slope from the implicit function theorem on ``∂I/∂z = 0`` (finite differences), so
    the gradient w.r.t. the depth is that of the refocused PSF.

    Args:
        depth: source depth below the coverslip, µm (0-dim tensor or float; positive into the sample).
        n_i: immersion refractive index (0-dim tensor).
        n_s: sample refractive index (0-dim tensor), ``>= n_i sin θ`` at every node.
        wavelength: emission wavelength in vacuum, µm (0-dim tensor).
        sin_t, cos_t: ``(P,)`` sine and cosine of the immersion-side angles θ of the quadrature nodes.
        weight: ``(P,)`` quadrature weights over θ.

    Returns:
        ``(P,)`` pupil phase in radians, differentiable w.r.t. ``depth``.
    """
    cos_s = torch.sqrt(torch.clamp(1.0 - (n_i * sin_t / n_s) ** 2, min=0.0))
    k0 = 2.0 * math.pi / wavelength
    unit = k0 * (n_i * cos_t - n_s * cos_s)  # the phase of 1 µm depth
    basis = torch.stack([torch.ones_like(cos_t), cos_t], dim=1)  # (P, 2)
    a = weight * torch.sqrt(cos_t) * sin_t * (1.0 + cos_t)  # the on-axis field's amplitude
    unit = unit - basis @ torch.linalg.solve(basis.T @ (a[:, None] * basis), basis.T @ (a * unit))
    with torch.no_grad():
        k, d0 = float(k0 * n_i), float(depth)
        u, amp, c = unit.detach(), a.detach(), cos_t.detach()

        def on_axis(z: torch.Tensor, d: float) -> torch.Tensor:
            phase = k * z[:, None] * c[None, :] + d * u[None, :]
            return (torch.cos(phase) @ amp) ** 2 + (torch.sin(phase) @ amp) ** 2

        half, step = 0.25 * abs(d0) + 1.0, float(wavelength) / (40.0 * float(n_i))  # µm
        z = torch.arange(-half, half + step, step, dtype=u.dtype, device=u.device)
        values = on_axis(z, d0)
        i = int(values.argmax().clamp(1, len(z) - 2))
        y0, y1, y2 = (float(v) for v in values[i - 1 : i + 2])
        curvature = y0 - 2.0 * y1 + y2
        peak = float(z[i]) + (0.5 * step * (y0 - y2) / curvature if curvature < 0 else 0.0)
        h, delta = step / 4.0, 1e-3
        zs = torch.tensor([peak - h, peak, peak + h], dtype=u.dtype, device=u.device)
        i_z = on_axis(zs, d0)
        i_zz = float(i_z[0] - 2.0 * i_z[1] + i_z[2]) / h**2
        plus, minus = on_axis(zs[::2], d0 + delta), on_axis(zs[::2], d0 - delta)
        i_zd = float((plus[1] - plus[0]) - (minus[1] - minus[0])) / (4.0 * h * delta)
        slope = -i_zd / i_zz if i_zz < 0 else 0.0
    return depth * unit + k * (peak + slope * (depth - d0)) * cos_t
