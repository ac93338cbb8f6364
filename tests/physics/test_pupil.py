"""Checks of the differentiable vectorial PSF (bundle.physics.pupil); its learnable kernel: tests/networks/test_kernels.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bundle.physics.psf import psf_correlation, vectorial_psf
from bundle.physics.pupil import (
    noll_to_nm,
    vectorial_psf_torch,
    vectorial_pupil_psf,
    zernike_radial,
)

OIL = dict(na=1.4, n_immersion=1.515, wavelength=0.52, voxel_size=(0.1, 0.1, 0.1))
WATER = dict(na=1.2, n_immersion=1.33, wavelength=0.6, voxel_size=(0.1, 0.1, 0.1))
AIR = dict(na=0.8, n_immersion=1.0, wavelength=0.5, voxel_size=(0.2, 0.1, 0.1))


def _peak(h: torch.Tensor | np.ndarray) -> tuple[int, ...]:
    a = h.detach().numpy() if isinstance(h, torch.Tensor) else h
    return tuple(int(i) for i in np.unravel_index(np.argmax(a), a.shape))


@pytest.mark.parametrize("optics", [OIL, WATER, AIR], ids=["oil", "water", "air"])
@pytest.mark.parametrize("shape", [(31, 31, 31), (33, 32, 32)])
def test_matches_psfmodels_vectorial(optics, shape):
    """Measured: correlation 0.99997-0.99999 (0.9986 without pixel integration, 0.93-0.97 for Born & Wolf)."""
    ref = vectorial_psf(shape, **optics)
    h = vectorial_psf_torch(shape, **optics)
    assert psf_correlation(h, ref) > 0.9995
    assert _peak(h) == tuple(s // 2 for s in shape)


@pytest.mark.parametrize("shape", [(31, 31, 31), (20, 24, 18), (9, 16, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conventions(shape, dtype):
    h = vectorial_psf_torch(shape, **OIL, dtype=dtype)
    assert h.shape == shape and h.dtype == dtype
    assert (h >= 0).all()
    assert h.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert _peak(h) == tuple(s // 2 for s in shape)


def test_symmetric_without_aberration():
    h = vectorial_psf_torch((21, 21, 21), **OIL, dtype=torch.float64)
    torch.testing.assert_close(h, h.flip(0), rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(h, h.flip(1), rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(h, h.transpose(1, 2), rtol=1e-6, atol=1e-12)


def test_anisotropic_lateral_voxels():
    h = vectorial_psf_torch((9, 40, 20), 1.4, 1.515, 0.52, (0.1, 0.025, 0.05), oversample=1)
    ref = vectorial_psf_torch((9, 41, 41), 1.4, 1.515, 0.52, (0.1, 0.025, 0.025), oversample=1)
    # x voxels twice as large: every other column of the fine grid, same physical profile
    np.testing.assert_allclose(
        h.numpy() / h.max().item(), (ref[:, :40, 0:40:2] / ref.max()).numpy(), atol=1e-4
    )


def test_spherical_aberration_breaks_z_symmetry_and_lowers_the_peak():
    h0 = vectorial_psf_torch((31, 31, 31), **OIL, dtype=torch.float64)
    h = vectorial_psf_torch((31, 31, 31), **OIL, spherical=0.1, dtype=torch.float64)
    assert (h - h.flip(0)).abs().max() > 0.1 * h.max()
    # Maréchal: Strehl ratio exp(-(2π σ)²) for σ waves rms
    assert (h.max() / h0.max()).item() == pytest.approx(math.exp(-((2 * math.pi * 0.1) ** 2)), rel=0.05)
    # the opposite sign mirrors the PSF in z
    mirrored = vectorial_psf_torch((31, 31, 31), **OIL, spherical=-0.1, dtype=torch.float64)
    torch.testing.assert_close(mirrored, h.flip(0), rtol=1e-6, atol=1e-12)


def test_defocus_moves_the_focus():
    h = vectorial_psf_torch((31, 15, 15), **OIL, defocus=0.5)
    assert _peak(h) == (15 + 5, 7, 7)


def test_zernike_terms():
    assert [noll_to_nm(j) for j in (1, 2, 3, 4, 11, 22)] == [(0, 0), (1, 1), (1, -1), (2, 0), (4, 0), (6, 0)]
    rho = torch.linspace(0, 1, 20001, dtype=torch.float64)
    for n in (2, 4, 6):  # unit rms over the unit disc: ∫ Z² 2ρ dρ = 1
        z = zernike_radial(n, rho)
        assert torch.trapezoid(z**2 * 2 * rho, rho).item() == pytest.approx(1.0, rel=1e-6)
    torch.testing.assert_close(zernike_radial(4, rho), math.sqrt(5) * (6 * rho**4 - 6 * rho**2 + 1))
    kw = dict(shape=(11, 11, 11), dtype=torch.float64, **OIL)
    a = vectorial_psf_torch(spherical=0.07, **kw)
    for zernike in ({11: 0.07}, {"11": 0.07}, {(4, 0): 0.07}, {"4,0": 0.03, 11: 0.04}):
        torch.testing.assert_close(vectorial_psf_torch(zernike=zernike, **kw), a)
    # pupil defocus Z4 behaves like a focus offset (in the paraxial limit): the peak leaves the centre
    assert _peak(vectorial_psf_torch(zernike={4: 0.5}, **kw))[0] != 5
    with pytest.raises(ValueError, match="rotationally symmetric"):
        vectorial_psf_torch(zernike={5: 0.1}, **kw)


def test_quadrature_converged():
    kw = dict(shape=(31, 41, 41), dtype=torch.float64, spherical=0.5, **OIL)
    a = vectorial_psf_torch(**kw)
    b = vectorial_psf_torch(n_theta=1500, **kw)
    assert (a - b).abs().max() < 1e-6 * b.max()


def _objective(h: torch.Tensor) -> torch.Tensor:
    w = torch.linspace(-1.0, 2.0, h.numel(), dtype=h.dtype).reshape(h.shape)
    return (h * w).sum() * 1e3


@pytest.mark.parametrize("name", ["na", "n_immersion", "wavelength", "spherical", "defocus", "z22"])
def test_gradient_matches_finite_difference(name):
    base = dict(na=1.3, n_immersion=1.515, wavelength=0.52, spherical=0.2, defocus=0.05)
    value = 0.1 if name == "z22" else base[name]

    def f(v):
        kw = dict(base)
        if name == "z22":
            kw["zernike"] = {22: v}
        else:
            kw[name] = v
        return _objective(vectorial_psf_torch((15, 17, 17), n_theta=200, dtype=torch.float64, **kw))

    p = torch.tensor(value, dtype=torch.float64, requires_grad=True)
    f(p).backward()
    eps = 1e-6
    fd = (f(value + eps).item() - f(value - eps).item()) / (2 * eps)
    assert np.isfinite(p.grad.item()) and abs(p.grad.item()) > 1e-3
    assert p.grad.item() == pytest.approx(fd, rel=1e-4)


def test_gradients_finite_in_float32_at_zero_aberration():
    na = torch.tensor(1.3, requires_grad=True)
    spherical = torch.tensor(0.0, requires_grad=True)
    h = vectorial_psf_torch((31, 31, 31), na, 1.515, 0.52, spherical=spherical)
    grads = torch.autograd.grad(_objective(h) + h.max(), [na, spherical])
    assert all(torch.isfinite(g) for g in grads)
    assert grads[1].abs() > 0  # the peak falls with any aberration


@pytest.mark.parametrize("depth", [2.0, 5.0])
def test_depth_matches_psfmodels_index_mismatch(depth):
    """Oil objective, source in water, 21³ voxels of 0.1 µm: measured 0.998 (2 µm deep) and 0.999 (5 µm);
    the same NA without the depth term 0.959 and 0.906."""
    optics = dict(OIL, n_sample=1.33)
    ref = vectorial_psf((21, 21, 21), depth=depth, **optics)
    psf = vectorial_pupil_psf((21, 21, 21), depth=depth, **optics)
    assert psf_correlation(psf, ref) > 0.995
    assert _peak(psf) == (10, 10, 10)  # refocused on the intensity peak, as the simulation centres it
    assert psf_correlation(vectorial_pupil_psf((21, 21, 21), **optics), ref) < 0.97


def test_depth_is_differentiable_and_mirrors():
    depth = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    args = dict(na=1.3, n_immersion=1.515, wavelength=0.52, n_sample=1.33, dtype=torch.float64)
    h = vectorial_psf_torch((15, 9, 9), depth=depth, **args)
    (h[7:, 4, 4].sum()).backward()
    assert depth.grad is not None and math.isfinite(float(depth.grad)) and float(depth.grad) != 0.0
    mirrored = vectorial_psf_torch((15, 9, 9), depth=-2.0, **args)
    torch.testing.assert_close(mirrored, h.detach().flip(0), rtol=1e-3, atol=1e-6)
    with pytest.raises(ValueError, match="n_sample"):
        vectorial_psf_torch((9, 9, 9), 1.4, 1.515, 0.52, depth=1.0)
    with pytest.raises(ValueError, match="n_sample"):
        vectorial_psf_torch((9, 9, 9), 1.4, 1.515, 0.52, depth=1.0, n_sample=1.33)  # NA above it


def test_numpy_wrapper():
    psf = vectorial_pupil_psf((15, 16, 17), spherical=0.05, **OIL)
    assert psf.dtype == np.float32 and psf.shape == (15, 16, 17)
    assert abs(float(psf.sum(dtype=np.float64)) - 1.0) < 1e-5
    ref = vectorial_psf_torch((15, 16, 17), spherical=0.05, dtype=torch.float64, **OIL).numpy()
    np.testing.assert_allclose(psf, ref, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(na=1.6), "na"),
        (dict(na=1.515), "na"),
        (dict(wavelength=520.0), "nanometres"),
        (dict(shape=(31, 31)), "shape"),
        (dict(voxel_size=(0.1, 0.0, 0.1)), "voxel_size"),
        (dict(oversample=0), "oversample"),
        (dict(n_theta=1), "n_theta"),
        (dict(zernike={(3, 1): 0.1}), "rotationally symmetric"),
        (dict(zernike={(4, 1): 0.1}), "not a Zernike term"),
        (dict(spherical=float("nan")), "finite"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = dict(shape=(9, 9, 9), na=1.4, n_immersion=1.515, wavelength=0.52)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        vectorial_psf_torch(**args)
