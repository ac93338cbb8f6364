"""Rotationally symmetric Zernike terms of a pupil (defocus, spherical, secondary spherical, ...).

Coefficients are in waves (of the emission wavelength) of the unit-rms (Noll-normalised) polynomials.
Only m = 0 terms are taken: the vectorial PSF's radial integrals (:mod:`bundle.physics.pupil`) assume
a rotationally symmetric pupil. Written here because the PSF model needs them in torch, differentiable
in the coefficients; the few lines do not justify a dependency.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from bundle.physics.optics import Scalar, _value

__all__ = ["ZernikeKey", "noll_to_nm", "zernike_radial", "zernike_terms"]

ZernikeKey = int | str | tuple[int, int]


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


def zernike_terms(zernike: Mapping[ZernikeKey, Scalar] | None, spherical: Scalar) -> dict[int, Scalar]:
    """Coefficient (waves) per even radial order ``n`` of the pupil's phase: ``zernike`` (Noll index or
    ``(n, m)`` keys, m = 0 only) with ``spherical`` added to n = 4; piston dropped, duplicates summed."""
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
